"""mltoolkit.triton_kernels: @triton.jit kernels and their launch helpers, one module per op family.

Modules are imported on first use, so that importing this package does not import Triton (a missing Triton is
reported by the backend table, never a crash at import):

    from mltoolkit.triton_kernels import norm          # norm.norm_forward / norm.norm_backward
    from mltoolkit.triton_kernels import norm_forward  # same function
    from mltoolkit.triton_kernels import attention     # attention.attention_forward / attention.attention_backward
    from mltoolkit.triton_kernels import rotary        # rotary.rotary (module and function share the op's name)
    from mltoolkit.triton_kernels import conv          # conv.conv2d_forward / conv.conv2d_backward

Knobs live on the module that reads them (e.g. `norm.LOOP_THRESHOLD`); set them there, not on this package.
"""
import importlib

_LAZY_ATTRS = {
    "norm_forward": "norm",
    "norm_backward": "norm",
    "attention_forward": "attention",
    "attention_backward": "attention",
    "conv2d_forward": "conv",
    "conv2d_backward": "conv",
}
_MODULES = ("norm", "attention", "rotary", "conv")

__all__ = [*_MODULES, *_LAZY_ATTRS]


def __getattr__(name):
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_ATTRS[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
