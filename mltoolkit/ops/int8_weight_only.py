"""int8 weight-only linear: int8 weights with one float32 scale per output channel (quantize_per_channel), float
activations, the weight converted to float inside the kernel (contract in csrc/int8_weight_only_linear.h, reference in
mltoolkit/ops/reference/int8.py).

    torch.ops.mltoolkit.int8_weight_only_linear(x (M, K) float, wq int8 (N, K), w_scale f32 (N,), bias (N,)?)
        -> y (M, N)

y = x @ (wq * w_scale[:, None])^T + bias in x's dtype, accumulated in float32. Only x and bias are differentiable
(frozen quantized weights): dx = (dy * w_scale) @ wq, dbias = dy summed over rows. The CPU kernel widens the int8
weight to float in registers; for decode shapes it streams the int8 weight once (a quarter of float32's bytes: that is
the point of weight-only int8). MLTK_INT8_WO_PATH=tiled selects its second path (dequantized tiles of rows through
BLAS), measured slower here. On a GPU the Triton backend (triton_kernels/int8_extra.py) runs: a weight-streaming
GEMV / split-K kernel for decode M, tiled tl.dot (int8 converted to x's dtype in registers, exact) beyond; its dx is
the same kernel on the transposed problem.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.int4 import check_linear_bias
from mltoolkit.ops.reference import int8 as reference

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INT8_WO = table("int8_weight_only")


def _triton_kernels():
    from mltoolkit.triton_kernels import int8_extra

    return int8_extra


def _dx(dy: Tensor, wq: Tensor, w_scale: Tensor, x_dtype: torch.dtype) -> Tensor:
    # The scale moves onto dy (M x N multiplies instead of N x K); the float weight exists only here.
    return ((dy.to(torch.float32) * w_scale) @ wq.to(torch.float32)).to(x_dtype)


# Triton (triton_kernels/int8_extra.py): a weight-streaming GEMV / split-K kernel for decode M, tiled tl.dot beyond;
# dx is the same kernel on the transposed problem (wq^T through strides: no float weight).
INT8_WO.register("triton", _ext.triton_device, _ext.triton_unavailable,
                 linear=lambda *a: _triton_kernels().int8_weight_only_linear(*a),
                 dx=lambda *a: _triton_kernels().int8_weight_only_dx(*a))
INT8_WO.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
                 linear=lambda *a: _ext._C.int8_weight_only_linear_cpu(*a), dx=_dx)
INT8_WO.register("reference", lambda *_: None, linear=reference.int8_weight_only_linear, dx=_dx)


def _linear_impl(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return INT8_WO.select(x).kernels["linear"](x, wq, w_scale, bias)


int8_weight_only_linear_op = torch.library.custom_op("mltoolkit::int8_weight_only_linear",
                                                     mutates_args=())(_linear_impl)


@int8_weight_only_linear_op.register_fake
def _(x, wq, w_scale, bias=None):
    torch._check(x.dim() == 2 and wq.dim() == 2, lambda: "int8_weight_only_linear: x and wq must be 2-D")
    torch._check(x.shape[1] == wq.shape[1], lambda: "int8_weight_only_linear: x.shape[1] != K")
    return x.new_empty((x.shape[0], wq.shape[0]))


def _setup_context(ctx, inputs, output):
    x, wq, w_scale, bias = inputs
    ctx.save_for_backward(wq, w_scale)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.forced_backend = forced_backend()  # backward may run on another thread


def _backward(ctx, dy):
    wq, w_scale = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * (4 - len(ctx.needs_input_grad))
    dx = db = None
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        if needs[0]:
            dx = INT8_WO.select(dy).kernels["dx"](dy, wq, w_scale, ctx.x_dtype)
        if ctx.has_bias and needs[3]:
            db = dy.to(torch.float32).sum(0).to(ctx.x_dtype)
    return dx, None, None, db


int8_weight_only_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerInt8WeightOnlyLinear(torch.autograd.Function):
    """The registered op's forward and backward without the custom-op dispatch (most of a decode-size call's host
    time); plain eager calls only (see mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, x, wq, w_scale, bias):
        y = _linear_impl(x, wq, w_scale, bias)
        _setup_context(ctx, (x, wq, w_scale, bias), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy)


def int8_weight_only_linear(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, wq * w_scale[:, None], bias) without the float weight.

    x (..., K) float32 / float16 / bfloat16; wq int8 (N, K) and w_scale float32 (N,) (from quantize_per_channel);
    bias (N,) of x's dtype or None. Returns (..., N) in x's dtype, accumulated in float32. Differentiable in x and
    bias (the weight is frozen)."""
    fn = "int8_weight_only_linear"
    for name, t in (("x", x), ("wq", wq), ("w_scale", w_scale)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if wq.dtype != torch.int8:
        raise TypeError(f"{fn}: wq must be int8, got {wq.dtype}")
    if wq.dim() != 2:
        raise ValueError(f"{fn}: wq must be 2-D (N, K), got shape {tuple(wq.shape)}")
    n, k = wq.shape
    if w_scale.dtype != torch.float32:
        raise TypeError(f"{fn}: w_scale must be float32, got {w_scale.dtype}")
    if tuple(w_scale.shape) != (n,):
        raise ValueError(f"{fn}: w_scale must have shape (N,) = ({n},), got {tuple(w_scale.shape)}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have in_features K = wq.shape[1] = {k} as its last dim, got shape "
                         f"{tuple(x.shape)}")
    for name, t in (("wq", wq), ("w_scale", w_scale)):
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    check_linear_bias(fn, bias, x, n)
    x2 = _ext.as_rows(x)
    y = _ext.call_op(torch.ops.mltoolkit.int8_weight_only_linear, _EagerInt8WeightOnlyLinear, _linear_impl,
                     (x2, wq, w_scale, bias), (x2, wq, w_scale, bias), (x2, bias))
    return _ext.from_rows(y, x)
