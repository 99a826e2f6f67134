"""Loads the compiled extension mltoolkit._C without ever failing the import of mltoolkit."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

try:
    from mltoolkit import _C  # type: ignore[attr-defined]

    C_ERROR: Optional[str] = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    if importlib.util.find_spec("mltoolkit._C") is None:
        C_ERROR = "mltoolkit._C is not built; build it with `pip install --no-build-isolation --no-deps -e .`"
    else:
        C_ERROR = f"mltoolkit._C failed to load ({exc}); rebuild it against this torch"


def cpp_unavailable() -> Optional[str]:
    return C_ERROR


def cuda_unavailable() -> Optional[str]:
    if _C is None:
        return C_ERROR
    if not _C.with_cuda:
        return "mltoolkit._C was built without CUDA kernels (CPU torch, no nvcc, or MLTK_SKIP_CUDA=1)"
    return None


def triton_unavailable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
