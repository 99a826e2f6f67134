"""`python -m mltoolkit info`: versions, devices, what was built, and which backends can run (and why not)."""
from __future__ import annotations

import platform
import shutil
import subprocess

import torch

import mltoolkit
from mltoolkit import _ext
from mltoolkit.backends import all_tables, forced_backend


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[-1] if out.strip() else "unknown"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed ({exc})"


def report() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable ({exc})"
    lines = [
        f"mltoolkit {mltoolkit.__version__}",
        f"python    {platform.python_version()} ({platform.machine()})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'}, {torch.get_num_threads()} CPU threads)",
        f"triton    {triton_version}" + ("  [TRITON_INTERPRET=1]" if _ext.triton_interpreted() else ""),
        f"nvcc      {_nvcc_version()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}    {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                         f"{p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("cuda      no device visible")
    C = _ext._C
    if C is None:
        lines.append(f"_C        NOT BUILT: {_ext.C_ERROR}")
    else:
        lines.append(f"_C        built with {C.compiler}; CPU ISA {C.cpu_flags or 'baseline'}; CUDA kernels "
                     + (f"yes (archs {C.cuda_arch_list})" if C.with_cuda else "no"))
    forced = forced_backend()
    lines.append(f"forced    {forced or 'none'} (MLTK_BACKEND / mltoolkit.backend)")
    lines.append("backends (in order of preference):")
    for name, tab in sorted(all_tables().items()):
        for b in tab.backends:
            why = b.available()
            lines.append(f"  {name:<10} {b.name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)
