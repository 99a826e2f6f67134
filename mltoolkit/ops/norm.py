"""LayerNorm and RMSNorm, plain and with a fused residual add.

Two registered ops carry the whole family (one kernel pair per backend, as in csrc/norm.h):

    torch.ops.mltoolkit.norm_fwd(x, residual?, weight?, bias?, eps, is_rms) -> (y, residual_out, mean, rstd)
    torch.ops.mltoolkit.norm_bwd(dy, x, weight?, mean, rstd, dresidual_out?, has_bias, is_rms) -> (dx, dw, db)

x is 2-D (rows, width). Outputs that do not apply (residual_out without residual, mean for RMSNorm, dw without
weight, db without bias) are empty tensors. The public functions below take torch's signatures and any leading
shape. The backward saves only the input (or the residual sum), mean and rstd.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import norm as reference

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

NORM = table("norm")


# ---- backends -------------------------------------------------------------------------------------------------

def _triton_kernels():
    from mltoolkit.triton_kernels import norm as triton_norm

    return triton_norm


# Order measured on an H200 (benchmarks/results/nvidia-h200.md, 2026-11-26): the CUDA C++ kernels win forward +
# backward; the Triton forward alone is ~10% faster, but its launch overhead costs more than that in training.
NORM.register("cuda", _ext.on_cuda, _ext.cuda_unavailable,
              forward=lambda *a: _ext._C.norm_forward_cuda(*a),
              backward=lambda *a: _ext._C.norm_backward_cuda(*a))
NORM.register("triton", _ext.triton_device, _ext.triton_unavailable,
              forward=lambda *a: _triton_kernels().norm_forward(*a),
              backward=lambda *a: _triton_kernels().norm_backward(*a))
NORM.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
              forward=lambda *a: _ext._C.norm_forward_cpu(*a),
              backward=lambda *a: _ext._C.norm_backward_cpu(*a))
NORM.register("reference", lambda *_: None, forward=reference.norm_forward, backward=reference.norm_backward)


# ---- registered ops -------------------------------------------------------------------------------------------

def _or_empty(t: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty(0, dtype=dtype) if t is None else t


def _opt_contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _forward_kernels(x, residual, weight, bias, eps, is_rms):
    """The chosen backend's forward on contiguous inputs; outputs that do not apply are None."""
    x, residual, weight, bias = x.contiguous(), _opt_contig(residual), _opt_contig(weight), _opt_contig(bias)
    return NORM.select(x).kernels["forward"](x, residual, weight, bias, eps, is_rms)


def _backward_kernels(dy, x, weight, mean, rstd, dresidual_out, has_bias, is_rms):
    dy, x, weight, dresidual_out = dy.contiguous(), x.contiguous(), _opt_contig(weight), _opt_contig(dresidual_out)
    return NORM.select(x).kernels["backward"](dy, x, weight, None if is_rms else mean, rstd, dresidual_out,
                                              has_bias, is_rms)


@torch.library.custom_op("mltoolkit::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, residual_out, mean, rstd = _forward_kernels(x, residual, weight, bias, eps, is_rms)
    return y, _or_empty(residual_out, x), _or_empty(mean, x, reference.stat_dtype(x.dtype)), rstd


@norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    torch._check(x.dim() == 2, lambda: f"norm_fwd: x must be 2-D (rows, width), got {x.dim()}-D")
    rows, width = x.shape
    if residual is not None:
        torch._check(residual.shape == x.shape, lambda: "norm_fwd: residual must have x's shape")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            torch._check(p.dim() == 1 and p.shape[0] == width,
                         lambda name=name: f"norm_fwd: {name} must have shape (width,)")
    stat = reference.stat_dtype(x.dtype)
    return (x.new_empty(rows, width), x.new_empty(rows, width) if residual is not None else x.new_empty(0),
            x.new_empty(0 if is_rms else rows, dtype=stat), x.new_empty(rows, dtype=stat))


@torch.library.custom_op("mltoolkit::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
             dresidual_out: Optional[Tensor], has_bias: bool, is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _backward_kernels(dy, x, weight, mean, rstd, dresidual_out, has_bias, is_rms)
    return dx, _or_empty(dweight, x), _or_empty(dbias, x)


@norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dresidual_out, has_bias, is_rms):
    torch._check(dy.shape == x.shape, lambda: "norm_bwd: dy must have x's shape")
    width = x.shape[1]
    param_dtype = weight.dtype if weight is not None else x.dtype
    return (x.new_empty(x.shape), x.new_empty(width if weight is not None else 0, dtype=param_dtype),
            x.new_empty(width if has_bias else 0, dtype=param_dtype))


def _save(ctx, normalized_input, weight, mean, rstd, has_residual, bias, is_rms):
    ctx.save_for_backward(normalized_input, weight, mean, rstd)
    ctx.has_residual, ctx.is_rms = has_residual, is_rms
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.set_materialize_grads(False)
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _input_grads(ctx, dy, dresidual_out, run_backward):
    """(dx, dresidual, dweight, dbias) from the saved state; run_backward is the registered op or the kernels."""
    saved, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(saved)
    has_bias = ctx.bias_dtype is not None
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        dx, dweight, dbias = run_backward(dy, saved, weight, mean, rstd,
                                          dresidual_out if ctx.has_residual else None, has_bias, ctx.is_rms)
    dweight = dweight.to(weight.dtype) if weight is not None else None
    dbias = dbias.to(ctx.bias_dtype) if has_bias else None
    return dx, (dx if ctx.has_residual else None), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, is_rms = inputs
    _y, residual_out, mean, rstd = output
    _save(ctx, residual_out if residual is not None else x, weight, mean, rstd, residual is not None, bias, is_rms)


def _backward(ctx, dy, dresidual_out, _dmean, _drstd):
    return (*_input_grads(ctx, dy, dresidual_out, torch.ops.mltoolkit.norm_bwd), None, None)


norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerNorm(torch.autograd.Function):
    """The same forward and backward as the registered op, without the custom-op dispatch, which costs about two
    thirds of a small call's host time. Used only in plain eager mode (see mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms):
        x = x.contiguous()
        y, residual_out, mean, rstd = _forward_kernels(x, residual, weight, bias, eps, is_rms)
        _save(ctx, residual_out if residual is not None else x, weight, mean, rstd, residual is not None, bias,
              is_rms)
        return (y, residual_out) if residual is not None else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dresidual_out=None):
        return (*_input_grads(ctx, dy, dresidual_out, _backward_kernels), None, None)


# ---- public API -----------------------------------------------------------------------------------------------

def _check_args(fn: str, input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor],
                bias: Optional[Tensor], residual: Optional[Tensor] = None) -> tuple[int, ...]:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"{fn}: normalized_shape {list(shape)} must match the trailing dims of input "
                         f"{list(input.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape normalized_shape {list(shape)}, got {list(p.shape)}")
        if p.device != input.device:
            raise ValueError(f"{fn}: {name} is on {p.device} but input is on {input.device}")
        if not p.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor, got {p.dtype}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{fn}: residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"{fn}: residual must have x's shape {list(input.shape)}, got {list(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{fn}: residual must have x's dtype {input.dtype}, got {residual.dtype}")
        if residual.device != input.device:
            raise ValueError(f"{fn}: residual is on {residual.device} but x is on {input.device}")
    return shape


def _param(p: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Kernels take parameters in the input's dtype or float32 (output stays in the input's dtype, as in torch).
    if p is None or p.dtype in (dtype, torch.float32):
        return p
    return p.to(dtype)


def _run(fn: str, x: Tensor, residual: Optional[Tensor], normalized_shape, weight, bias, eps: float, is_rms: bool):
    shape = _check_args(fn, x, normalized_shape, weight, bias, residual)
    width = math.prod(shape)
    # reshape costs ~0.6 us a call even when it changes nothing: skipped where the shapes are already right
    rows_2d = x.dim() == 2 and len(shape) == 1
    flat = lambda t: t if t is None or rows_2d else t.reshape(-1, width)
    flat_param = lambda p: None if p is None else _param(p, x.dtype) if len(shape) == 1 else \
        _param(p, x.dtype).reshape(width)
    args = (flat(x), flat(residual), flat_param(weight), flat_param(bias), float(eps), is_rms)
    if _ext.plain_eager(*args[:4]):
        if _ext.needs_grad(*args[:4]):
            out = _EagerNorm.apply(*args)
            y, residual_out = out if residual is not None else (out, None)
        else:  # nothing to record: the kernels alone (autograd.Function.apply costs ~4 us a call)
            y, residual_out, _mean, _rstd = _forward_kernels(*args)
    else:
        y, residual_out, _mean, _rstd = torch.ops.mltoolkit.norm_fwd(*args)
    if residual is None:
        residual_out = None
    if not rows_2d:
        y, residual_out = y.view(x.shape), (residual_out.view(x.shape) if residual is not None else None)
    return y, residual_out


def layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Layer normalization over the trailing `normalized_shape` dims; same signature as F.layer_norm.

    y = (x - mean) / sqrt(var + eps) * weight + bias, var biased; input (*, *normalized_shape).
    """
    return _run("layer_norm", input, None, normalized_shape, weight, bias, eps, False)[0]


def rms_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """RMS normalization; same signature as F.rms_norm. y = x / sqrt(mean(x^2) + eps) * weight.

    eps=None uses torch.finfo(input.dtype).eps, as torch does.
    """
    eps = _default_rms_eps(input) if eps is None else eps
    return _run("rms_norm", input, None, normalized_shape, weight, None, eps, True)[0]


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, normalized_shape: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """Fused residual add + layer norm: returns (layer_norm(x + residual), x + residual).

    normalized_shape defaults to weight's shape, or the last dim without weight. The sum is rounded to x's
    dtype, which is what a transformer block stores and normalizes.
    """
    shape = _default_shape(x, weight, normalized_shape)
    return _run("add_layer_norm", x, residual, shape, weight, bias, eps, False)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None,
                 normalized_shape: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """Fused residual add + RMS norm: returns (rms_norm(x + residual), x + residual)."""
    shape = _default_shape(x, weight, normalized_shape)
    eps = _default_rms_eps(x) if eps is None else eps
    return _run("add_rms_norm", x, residual, shape, weight, None, eps, True)


def _default_shape(x: Tensor, weight: Optional[Tensor], normalized_shape) -> Sequence[int]:
    if normalized_shape is not None:
        return normalized_shape
    if isinstance(weight, Tensor):
        return tuple(weight.shape)
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError("x must be a Tensor with at least one dim")
    return (x.shape[-1],)


def _default_rms_eps(x: Tensor) -> float:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return 0.0  # _check_args reports the real problem
    return torch.finfo(x.dtype).eps
