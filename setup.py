"""Builds mltoolkit._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment: CUDA_HOME (toolkit root), TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible),
MAX_JOBS (parallel compile jobs), MLTK_SKIP_CUDA=1 (CPU kernels only), MLTK_CPU_ISA=avx512|avx2|none (x86-64
vector ISA for the CPU kernels; default: the widest of those the build machine has).
"""
import glob
import os
import platform
import re
import shutil
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
