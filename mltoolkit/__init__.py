"""mltoolkit: fused PyTorch kernels (C++, CUDA C++, Triton) as torch.ops.mltoolkit ops, with drop-in modules.

    import mltoolkit
    y = mltoolkit.ops.rms_norm(x, (4096,), weight)     # same signature as F.rms_norm
    model = mltoolkit.optimize(model)                   # swap matching torch modules in place
    with mltoolkit.backend("triton"): ...               # force one backend (also MLTK_BACKEND=triton)
"""
from mltoolkit import nn, ops
from mltoolkit.backends import NoBackendError, backend
from mltoolkit.optimize import optimize, register_swap

__version__ = "0.1.0"

__all__ = ["ops", "nn", "optimize", "register_swap", "backend", "NoBackendError", "__version__"]
