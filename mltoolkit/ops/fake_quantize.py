"""Fake quantization (quantize, then dequantize, in float) with a straight-through-estimator backward and LSQ
learnable scale / zero-point gradients: the building block of quantization-aware training.

Two registered ops carry the family (contract and exact arithmetic in csrc/fake_quantize.h):

    torch.ops.mltoolkit.fake_quantize(x, scale, zero_point?, qmin, qmax, axis?, group_size?, float_zero_point,
                                      grad_scale) -> y
    torch.ops.mltoolkit.fake_quantize_backward(dy, x, scale, zero_point?, qmin, qmax, axis?, group_size?,
                                               float_zero_point, grad_scale, output_mask) -> (dx, dscale, dzero_point)

One quantizer per tensor, per channel (`axis`) or per group of `group_size` consecutive elements of the last dim.
The backward is one fused pass (dx and the per-scale partial sums); gradients not asked for come back as empty
tensors. grad_scale rides along in the forward op so that the backward op gets it.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import fake_quantize as reference

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ZERO_POINT_DOMAINS = ("int", "float")
Q_LIMIT = 65536

FAKE_QUANTIZE = table("fake_quantize")


# ---- backends -------------------------------------------------------------------------------------------------

def _cpp_forward(x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point):
    return _ext._C.fake_quantize_cpu(x, scale, zero_point, qmin, qmax, -1 if axis is None else axis,
                                     group_size or 0, float_zero_point)


def _cpp_backward(dy, x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale, mask):
    dx, ds, dz = _ext._C.fake_quantize_backward_cpu(dy, x, scale, zero_point, qmin, qmax,
                                                    -1 if axis is None else axis, group_size or 0,
                                                    float_zero_point, grad_scale, list(mask))
    return dx, ds, dz


def _triton_kernels():
    from mltoolkit.triton_kernels import fake_quantize as kernels

    return kernels


# Triton (triton_kernels/fake_quantize.py): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 when forced.
FAKE_QUANTIZE.register("triton", _ext.triton_device, _ext.triton_unavailable,
                       forward=lambda *a: _triton_kernels().fake_quantize(*a),
                       backward=lambda *a: _triton_kernels().fake_quantize_backward(*a))
FAKE_QUANTIZE.register("cpp", _ext.on_cpu, _ext.cpp_unavailable, forward=_cpp_forward, backward=_cpp_backward)
FAKE_QUANTIZE.register("reference", lambda *_: None, forward=reference.fake_quantize,
                       backward=reference.fake_quantize_backward)


# ---- registered ops -------------------------------------------------------------------------------------------

def _forward_impl(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int, axis: Optional[int],
                  group_size: Optional[int], float_zero_point: bool, grad_scale: float) -> Tensor:
    return FAKE_QUANTIZE.select(x).kernels["forward"](x, scale, zero_point, qmin, qmax, axis, group_size,
                                                       float_zero_point)


fake_quantize_op = torch.library.custom_op("mltoolkit::fake_quantize", mutates_args=())(_forward_impl)


@fake_quantize_op.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale):
    torch._check(qmin < qmax, lambda: "fake_quantize: qmin must be below qmax")
    torch._check(zero_point is None or zero_point.shape == scale.shape,
                 lambda: "fake_quantize: zero_point must have scale's shape")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_impl(dy: Tensor, x: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int,
                   axis: Optional[int], group_size: Optional[int], float_zero_point: bool, grad_scale: float,
                   output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    dx, ds, dz = FAKE_QUANTIZE.select(x).kernels["backward"](dy, x, scale, zero_point, qmin, qmax, axis, group_size,
                                                            float_zero_point, grad_scale, list(output_mask))
    empty = x.new_empty(0)
    return (empty if dx is None else dx, scale.new_empty(0) if ds is None else ds,
            scale.new_empty(0) if dz is None else dz)


fake_quantize_backward_op = torch.library.custom_op("mltoolkit::fake_quantize_backward",
                                                    mutates_args=())(_backward_impl)


@fake_quantize_backward_op.register_fake
def _(dy, x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale, output_mask):
    torch._check(dy.shape == x.shape, lambda: "fake_quantize_backward: dy must have x's shape")
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty(0)
    ds = scale.new_empty(scale.shape) if output_mask[1] else scale.new_empty(0)
    dz = scale.new_empty(scale.shape) if output_mask[2] and zero_point is not None else scale.new_empty(0)
    return dx, ds, dz


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.options = (qmin, qmax, axis, group_size, float_zero_point, grad_scale)
    ctx.has_zero_point = zero_point is not None
    ctx.set_materialize_grads(False)
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _backward(ctx, dy, eager=False):
    needs = tuple(ctx.needs_input_grad) + (False,) * (9 - len(ctx.needs_input_grad))
    mask = [needs[0], needs[1], ctx.has_zero_point and needs[2]]
    grads = [None] * len(ctx.needs_input_grad)
    if dy is None or not any(mask):
        return tuple(grads)
    x, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis, group_size, float_zero_point, grad_scale = ctx.options
    bwd = _backward_impl if eager else torch.ops.mltoolkit.fake_quantize_backward
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        dx, ds, dz = bwd(dy, x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale, mask)
    for k, g in enumerate((dx, ds, dz)):
        if mask[k]:
            grads[k] = g
    return tuple(grads)


fake_quantize_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFakeQuantize(torch.autograd.Function):
    """fake_quantize's forward and backward without the custom-op dispatch (its host time is comparable to the
    kernel's at QAT layer sizes); plain eager calls only (see mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale):
        args = (x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale)
        y = _forward_impl(*args)
        _setup_context(ctx, args, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _backward(ctx, dy, eager=True)


# ---- public API -----------------------------------------------------------------------------------------------

def _int(fn: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    return v


def _param_tensor(fn: str, name: str, t, x: Tensor, shape: tuple) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be a real floating or integer tensor, got {t.dtype}")
    if name == "scale" and not t.is_floating_point():
        raise TypeError(f"{fn}: scale must be a floating tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if shape == () and t.numel() != 1:  # per tensor: any shape with one element
        raise ValueError(f"{fn}: {name} must have one element for per-tensor quantization (axis and group_size "
                         f"None), got shape {tuple(t.shape)}")
    if shape != () and tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, qmin: int = -128, qmax: int = 127,
                  axis: Optional[int] = None, group_size: Optional[int] = None, zero_point_domain: str = "int",
                  grad_scale: Union[float, str] = 1.0) -> Tensor:
    """y = dequantize(quantize(x)) in x's dtype, differentiable in x (straight-through: dy where the value was not
    clamped, 0 where it was), scale and zero_point (LSQ / LSQ+ gradients).

    x: any shape, float32 / float16 / bfloat16. One quantizer per tensor (axis and group_size None: scale and
    zero_point with one element), per channel along `axis` (scale (x.shape[axis],)) or per group of `group_size`
    consecutive elements of the last dim (scale (*x.shape[:-1], x.shape[-1] // group_size)). zero_point: scale's
    shape or None (0); integer tensors are accepted.

    zero_point_domain "int" (torch's fake_quantize_per_*_affine): y = (clamp(round(x / scale) + zp, qmin, qmax) -
    zp) * scale, zp = round(zero_point). "float" (int4 weights, LSQ+): zero_point is a float offset beta,
    q = clamp(round((x - beta) / scale), qmin, qmax), y = (q - cm) * scale + (beta + cm * scale) with
    cm = (qmin + qmax + 1) // 2; with qmin, qmax = 0, 15 and beta the group minimum this is exactly
    dequantize_int4(quantize_int4(w)) (whose stored zero is beta + 8 * scale). Rounding is half to even.

    grad_scale: multiplies the scale and zero-point gradients; "lsq" is LSQ's 1 / sqrt(n * qmax), n the number of
    elements per quantizer (x.numel() per tensor)."""
    fn = "fake_quantize"
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    qmin, qmax = _int(fn, "qmin", qmin), _int(fn, "qmax", qmax)
    if not qmin < qmax:
        raise ValueError(f"{fn}: qmin must be below qmax, got qmin = {qmin}, qmax = {qmax}")
    if qmin < -Q_LIMIT or qmax > Q_LIMIT:
        raise ValueError(f"{fn}: qmin and qmax must lie in [-{Q_LIMIT}, {Q_LIMIT}], got {qmin}, {qmax}")
    if zero_point_domain not in ZERO_POINT_DOMAINS:
        raise ValueError(f"{fn}: zero_point_domain must be 'int' or 'float', got {zero_point_domain!r}")
    if axis is not None and group_size is not None:
        raise ValueError(f"{fn}: give axis (per channel) or group_size (per group), not both")
    if axis is not None:
        axis = _int(fn, "axis", axis)
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"{fn}: axis {axis} is out of range for x of shape {tuple(x.shape)}")
        axis %= x.dim()
        shape = (x.shape[axis],)
    elif group_size is not None:
        group_size = _int(fn, "group_size", group_size)
        if group_size <= 0:
            raise ValueError(f"{fn}: group_size must be positive, got {group_size}")
        if x.dim() < 1 or x.shape[-1] % group_size:
            raise ValueError(f"{fn}: x's last dim must be a multiple of group_size {group_size}, got shape "
                             f"{tuple(x.shape)}")
        shape = (*x.shape[:-1], x.shape[-1] // group_size)
    else:
        shape = ()
    scale = _param_tensor(fn, "scale", scale, x, tuple(shape))
    if zero_point is not None:
        zero_point = _param_tensor(fn, "zero_point", zero_point, x, tuple(scale.shape))
    per_quantizer = reference.layout(tuple(x.shape), axis, group_size)
    if isinstance(grad_scale, str):
        if grad_scale != "lsq":
            raise ValueError(f"{fn}: grad_scale must be a float or 'lsq', got {grad_scale!r}")
        n = per_quantizer[0] * per_quantizer[2]
        grad_scale = 1.0 / math.sqrt(max(1, n) * max(1, abs(qmax)))
    elif isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
        raise TypeError(f"{fn}: grad_scale must be a float or 'lsq', got {type(grad_scale).__name__}")
    args = (x, scale, zero_point, qmin, qmax, axis, group_size, zero_point_domain == "float", float(grad_scale))
    return _ext.call_op(torch.ops.mltoolkit.fake_quantize, _EagerFakeQuantize, _forward_impl, args,
                        (x, scale, zero_point))
