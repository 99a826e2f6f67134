"""mltoolkit: fused PyTorch kernels (C++, CUDA C++, Triton) as torch.ops.mltoolkit ops, with drop-in modules.

    import mltoolkit
    y = mltoolkit.ops.rms_norm(x, (4096,), weight)     # same signature as F.rms_norm
    model = mltoolkit.optimize(model)                   # swap matching torch modules, fuse conv + bn + act
    with mltoolkit.backend("triton"): ...               # force one backend (also MLTK_BACKEND=triton)
    mltoolkit.patch_torch()                             # F.scaled_dot_product_attention -> mltoolkit's
    mltoolkit.clear_caches()                            # drop weight layouts kept for inference
"""
from mltoolkit import nn, ops
from mltoolkit._ext import clear_caches
from mltoolkit.backends import NoBackendError, backend
from mltoolkit.fusion import fuse_conv_bn_act
from mltoolkit.optimize import optimize, register_swap
from mltoolkit.patch import patch_torch, patched_torch, unpatch_torch

__version__ = "0.1.0"

__all__ = ["ops", "nn", "optimize", "fuse_conv_bn_act", "register_swap", "backend", "NoBackendError", "patch_torch",
           "unpatch_torch", "patched_torch", "clear_caches", "__version__"]
