"""Builds mltoolkit._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment: CUDA_HOME (toolkit root), TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible),
MAX_JOBS (parallel compile jobs), MLTK_SKIP_CUDA=1 (CPU kernels only), MLTK_CPU_ISA=avx512|avx2|none (x86-64
vector ISA for the CPU kernels; default: the widest of those the build machine has), MLTK_PCH=0 (no precompiled
header).
"""
import glob
import hashlib
import inspect
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def _cuda_home_from_nvcc():
    """The toolkit root, seeing through an `nvcc` on PATH that is a wrapper script exec'ing the real compiler."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            match = re.search(rb"(/\S+/bin/nvcc)\b", head)
            if match and os.path.exists(match.group(1).decode()):
                real = os.path.realpath(match.group(1).decode())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so settle it first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    home = _cuda_home_from_nvcc()
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = home

import torch  # noqa: E402
import torch.utils.cpp_extension as cpp_extension  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    if os.environ.get("MLTK_SKIP_CUDA", "0") == "1":
        return False, "MLTK_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def _cpu_isa_flags():
    isa = os.environ.get("MLTK_CPU_ISA")
    if isa is not None and isa not in ("avx512", "avx2", "none"):
        raise SystemExit(f"MLTK_CPU_ISA must be avx512, avx2 or none, got {isa!r}")
    if isa is None:
        isa = "none"
        if platform.machine() in ("x86_64", "AMD64"):
            try:
                with open("/proc/cpuinfo") as f:
                    flags = f.read()
                if re.search(r"\bavx2\b", flags) and re.search(r"\bfma\b", flags):
                    isa = "avx2"
                    if all(re.search(rf"\b{f}\b", flags) for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
                        isa = "avx512"
            except OSError:
                pass
    if isa == "avx512":
        # torch's own AVX512 flags; at::vec becomes 512 bits wide (32 registers: the conv kernel's larger blocks).
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512",
                "-DCPU_CAPABILITY=AVX512"], "avx512"
    if isa == "avx2":
        # CPU_CAPABILITY=AVX2 puts at::vec in its own inline namespace, as torch does for its per-ISA files.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"], "avx2"
    return [], "none"


def _runtime_libstdcxx():
    """The path of the libstdc++.so.6 this process runs on (torch, imported above, loaded it; _C will run on it
    too), or None off Linux."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so.6" in line}
    except OSError:
        return None
    found = sorted(p for p in paths if os.path.exists(p))
    return found[0] if found else None


# The shared libstdc++ first, whatever the toolchain adds later: torch runs on the process's shared libstdc++, and a
# second, static copy inside _C keeps its own locale ids, so the first error message that formats a number (a shape,
# a size) crashed the process. The GPU machines' image links with a g++ (/opt/gcc) that adds -static-libstdc++ and
# whose own library folder holds only libstdc++.a, so "-Bdynamic -lstdc++" still found the archive there: name the
# very file torch runs on instead. An archive linked after it finds nothing left to resolve.
_LIBSTDCXX = _runtime_libstdcxx()
LINK_ARGS = ["-fopenmp", "-Wl,--push-state,--no-as-needed,-Bdynamic",
             _LIBSTDCXX if _LIBSTDCXX else "-lstdc++", "-Wl,--pop-state"]


PRECOMPILED_HEADER = os.path.join(ROOT, "csrc", "precompiled.h")


def _is_gcc(cxx):
    try:
        macros = subprocess.run(shlex.split(cxx) + ["-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "__GNUC__" in macros and "__clang__" not in macros


def _precompiled_header_flags(build_directory, cflags, post_cflags):
    """`-include <build>/pch/<key>/precompiled.h` for every C++ file, and beside it (GCC only) that header compiled
    with the very flags ninja gives those files; GCC falls back to the text where a .gch does not match, and
    -Winvalid-pch says so. The key hashes the header, the flags and torch: a change of any of them changes every
    C++ command line, so ninja rebuilds everything (GCC's dependency files do not list what came from a .gch), and
    an unchanged key keeps an incremental build incremental. MLTK_PCH=0 turns it off."""
    if os.environ.get("MLTK_PCH", "1") == "0":
        return []
    cxx = cpp_extension.get_cxx_compiler()
    with open(PRECOMPILED_HEADER) as f:
        text = f.read()
    key = hashlib.sha256("\n".join([cxx, *cflags, *post_cflags, text, torch.__version__, torch.__file__]).encode())
    pch_root = os.path.join(build_directory, "pch")
    out_dir = os.path.join(pch_root, key.hexdigest()[:16])
    header = os.path.join(out_dir, "precompiled.h")
    gch = header + ".gch"
    flags = ["-include", shlex.quote(header)]
    if os.path.exists(gch):
        return flags + ["-Winvalid-pch"]
    if not os.path.exists(header):  # a new key
        shutil.rmtree(pch_root, ignore_errors=True)  # older keys' headers (~200 MB each)
        os.makedirs(out_dir)
        with open(header, "w") as f:
            f.write(text)
    if not _is_gcc(cxx):
        return flags
    # ninja's own command for a C++ file (torch.utils.cpp_extension: $cxx -MMD -MF $out.d $cflags -c $in -o $out
    # $post_cflags; the flags arrive shell-quoted), quiet: warnings do not change what the header holds.
    tmp = gch + ".tmp"
    command = " ".join([cxx, "-x c++-header", *cflags, "-c", shlex.quote(header), "-o", shlex.quote(tmp),
                        *post_cflags, "-w"])
    print("mltoolkit: precompiling csrc/precompiled.h", file=sys.stderr)
    if subprocess.run(command, shell=True).returncode != 0:
        print("mltoolkit: the precompiled header failed to build; compiling without it", file=sys.stderr)
        if os.path.exists(tmp):
            os.remove(tmp)
        return flags
    os.replace(tmp, gch)
    return flags + ["-Winvalid-pch"]


_write_ninja_file_and_compile_objects = cpp_extension._write_ninja_file_and_compile_objects


def _compile_with_precompiled_header(*args, **kwargs):
    call = inspect.signature(_write_ninja_file_and_compile_objects).bind(*args, **kwargs)
    a = call.arguments
    if {"build_directory", "cflags", "post_cflags"} <= a.keys():  # else a torch whose builder we do not know
        a["post_cflags"] = list(a["post_cflags"] or []) + _precompiled_header_flags(
            a["build_directory"], a["cflags"] or [], a["post_cflags"] or [])
    return _write_ninja_file_and_compile_objects(*call.args, **call.kwargs)


# BuildExtension's ninja compile looks this function up in its module when it runs.
cpp_extension._write_ninja_file_and_compile_objects = _compile_with_precompiled_header


def _extensions():
    with_cuda, why = _want_cuda()
    print(f"mltoolkit: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})", file=sys.stderr)
    isa_flags, isa = _cpu_isa_flags()
    # -g0: Python's build flags carry -g, whose debug info made the template-heavy kernels compile ~1.6x longer.
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++20", f'-DMLTK_CPU_FLAGS="{isa}"'] + isa_flags
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return [CppExtension("mltoolkit._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=LINK_ARGS)]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPU")
    # The pip CUDA build of torch keeps CUDA library headers (cusparse.h, ...) in site-packages/nvidia/*/include.
    for site in sys.path:
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    defines = ["-DMLTK_WITH_CUDA", f'-DMLTK_CUDA_ARCH_LIST="{arch_list}"']
    nvcc = ["-O3", "--use_fast_math", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"] + defines
    return [CUDAExtension("mltoolkit._C", sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc}, extra_link_args=LINK_ARGS)]


setup(
    name="mltoolkit",
    version="0.1.0",
    description="Fused PyTorch kernels (C++, CUDA, Triton) as torch.ops.mltoolkit ops, with drop-in modules",
    packages=find_packages(include=["mltoolkit", "mltoolkit.*"]) + ["mltoolkit.triton_kernels"],
    package_dir={"mltoolkit.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
)
