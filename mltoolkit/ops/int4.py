"""int4 weight-only linear: weights packed two per byte with group-wise scales and float zero points.

Three registered ops carry the family (contract and exact format in csrc/int4_linear.h):

    torch.ops.mltoolkit.quantize_int4(w, group_size) -> (packed, scales, zeros)
    torch.ops.mltoolkit.dequantize_int4(packed, scales, zeros, group_size) -> w'
    torch.ops.mltoolkit.int4_weight_only_linear(x, packed, scales, zeros, group_size, bias?) -> y

w (N, K) -> packed (N, K/2) uint8 (k even in the low nibble), scales and zeros (N, K/group_size) float32; the weight
stands for w' = (q - 8) * scale + zero. y = x @ w'^T + bias in x's dtype, accumulated in float32. Only x and bias
are differentiable (frozen quantized weights, as in QLoRA): dx = dy @ w', dbias = dy summed over rows.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import int4 as reference
from mltoolkit.ops.reference.int4 import GROUP_SIZES

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INT4 = table("int4")

# CUDA C++ (csrc/cuda/int4_linear.cu): weight-streaming GEMV kernels for M <= 16 (on the tensor cores for fp16 / bf16
# x and group_size >= 128), tensor-core tiles for larger fp16 / bf16 batches; unforced, up to 16 or 2 rows
# (_cuda_defer).
# H100, bf16, K = N = 8192, g128 (benchmarks/results/nvidia-h100-80gb-hbm3.md, 2026-11-27): the ALU GEMV took
# 0.041 ms at M = 1 (Triton 0.138) but 0.663 ms at M = 16, where Triton's split-K kernel took 0.158. The first
# tensor-core GEMV (M <= 8) took 0.027 ms at M = 1 and 0.033 at M = 8 (2026-11-27 14:54); its pipelined successor,
# which also takes up to 16 rows, is untested on a GPU. quantize_int4 / dequantize_int4 (one-time
# conversions, bit-exact on both backends) follow the same rule on w / packed: the CUDA backend's quantize is the
# reference's torch ops on the GPU.
def _cuda_defer(x: Tensor, group_size: int = 128, *_) -> Optional[str]:
    """Up to 16 rows when the tensor-core GEMV takes x (fp16 / bf16, group_size >= 128), else up to 2 (the ALU GEMV's
    wider variants ran slower than Triton's split-K); the rest goes to Triton unless forced."""
    return _ext.rows_above(x, 16 if x.dtype != torch.float32 and group_size >= 128 else 2, "the Triton kernel")


INT4.register("cuda", _ext.on_cuda, _ext.cuda_unavailable, defer=_cuda_defer,
              linear=lambda *a: _ext._C.int4_weight_only_linear_cuda(*a),
              quantize=reference.quantize_int4,
              dequantize=lambda *a: _ext._C.dequantize_int4_cuda(*a))
def _triton_kernels():
    from mltoolkit.triton_kernels import quant

    return quant


def _triton_accepts(t: Tensor, *_) -> Optional[str]:
    # t: x (linear), w (quantize) or packed (dequantize). float64 is the reference's oracle dtype only.
    return "no float64 kernel" if t.dtype == torch.float64 else _ext.triton_device(t)


INT4.register("triton", _triton_accepts, _ext.triton_unavailable,
              linear=lambda *a: _triton_kernels().int4_weight_only_linear(*a),
              quantize=lambda *a: _triton_kernels().quantize_int4(*a),
              dequantize=lambda *a: _triton_kernels().dequantize_int4(*a))
INT4.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
              linear=lambda *a: _ext._C.int4_weight_only_linear_cpu(*a),
              quantize=lambda *a: tuple(_ext._C.quantize_int4_cpu(*a)),
              dequantize=lambda *a: _ext._C.dequantize_int4_cpu(*a))
INT4.register("reference", lambda *_: None, linear=reference.int4_weight_only_linear,
              quantize=reference.quantize_int4, dequantize=reference.dequantize_int4)


# ---- argument checks (shared by the public functions and the fake kernels) --------------------------------------

def _check_group(fn: str, group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{fn}: group_size must be an int, got {type(group_size).__name__}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{fn}: group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def _check_weight(fn: str, packed, scales, zeros, group_size) -> tuple[int, int]:
    """(N, K) of a quantized weight, or TypeError / ValueError naming the argument."""
    _check_group(fn, group_size)
    for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"{fn}: packed must be uint8 (two 4-bit values per byte), got {packed.dtype}")
    n, k = packed.shape[0], 2 * packed.shape[1]
    if k % group_size:
        raise ValueError(f"{fn}: in_features K = 2 * packed.shape[1] = {k} must be a multiple of group_size "
                         f"{group_size}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float32:
            raise TypeError(f"{fn}: {name} must be float32, got {t.dtype}")
        if tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"{fn}: {name} must have shape (N, K / group_size) = {(n, k // group_size)}, got "
                             f"{tuple(t.shape)}")
        if t.device != packed.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but packed is on {packed.device}")
    return n, k


def check_linear_bias(fn: str, bias, x: Tensor, n: int) -> None:
    """A linear's bias: None, or an (N,) tensor of x's dtype on x's device (also int8_weight_only_linear's rule)."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{fn}: bias must be a Tensor or None, got {type(bias).__name__}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{fn}: bias dtype {bias.dtype} must match x's dtype {x.dtype}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{fn}: bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{fn}: bias is on {bias.device} but x is on {x.device}")


def _check_x(fn: str, x, k: int, n: int, device, bias) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have in_features K = 2 * packed.shape[1] = {k} as its last dim, got shape "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{fn}: x is on {x.device} but packed is on {device}")
    check_linear_bias(fn, bias, x, n)


# ---- registered ops ---------------------------------------------------------------------------------------------

@torch.library.custom_op("mltoolkit::quantize_int4", mutates_args=())
def quantize_int4_op(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    packed, scales, zeros = INT4.select(w).kernels["quantize"](w, group_size)
    return packed, scales, zeros


@quantize_int4_op.register_fake
def _(w, group_size):
    torch._check(w.dim() == 2, lambda: "quantize_int4: w must be 2-D")
    n, k = w.shape
    torch._check(k % group_size == 0, lambda: "quantize_int4: K must be a multiple of group_size")
    groups = k // group_size
    return (w.new_empty((n, k // 2), dtype=torch.uint8), w.new_empty((n, groups), dtype=torch.float32),
            w.new_empty((n, groups), dtype=torch.float32))


@torch.library.custom_op("mltoolkit::dequantize_int4", mutates_args=())
def dequantize_int4_op(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    return INT4.select(packed).kernels["dequantize"](packed, scales, zeros, group_size)


@dequantize_int4_op.register_fake
def _(packed, scales, zeros, group_size):
    torch._check(packed.dim() == 2, lambda: "dequantize_int4: packed must be 2-D")
    return packed.new_empty((packed.shape[0], 2 * packed.shape[1]), dtype=torch.float32)


def _linear_impl(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 bias: Optional[Tensor] = None) -> Tensor:
    return INT4.select(x, group_size).kernels["linear"](x, packed, scales, zeros, group_size, bias)


int4_weight_only_linear_op = torch.library.custom_op("mltoolkit::int4_weight_only_linear",
                                                     mutates_args=())(_linear_impl)


@int4_weight_only_linear_op.register_fake
def _(x, packed, scales, zeros, group_size, bias=None):
    torch._check(x.dim() == 2, lambda: "int4_weight_only_linear: x must be 2-D")
    torch._check(x.shape[1] == 2 * packed.shape[1], lambda: "int4_weight_only_linear: x.shape[1] != K")
    return x.new_empty((x.shape[0], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _backward(ctx, dy):
    packed, scales, zeros = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * (6 - len(ctx.needs_input_grad))
    dx = db = None
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        if needs[0]:
            # dx = dy @ w' (the float weight exists for the backward's duration; frozen, so no weight gradient).
            w = torch.ops.mltoolkit.dequantize_int4(packed, scales, zeros, ctx.group_size)
            dx = (dy.to(torch.float32) @ w).to(ctx.x_dtype)
        if ctx.has_bias and needs[5]:
            db = dy.to(torch.float32).sum(0).to(ctx.x_dtype)
    return (dx, None, None, None, None, db)[:len(ctx.needs_input_grad)]


int4_weight_only_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerInt4Linear(torch.autograd.Function):
    """int4_weight_only_linear's forward and backward without the custom-op dispatch: at decode sizes (M = 1) its
    host time (~25 us of a ~36 us call, measured on the CPU) exceeded the kernel's; plain eager calls only (see
    mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, x, packed, scales, zeros, group_size, bias):
        args = (x, packed, scales, zeros, group_size, bias)
        y = _linear_impl(*args)
        _setup_context(ctx, args, y)
        return y

    @staticmethod
    def backward(ctx, dy):  # differentiable (dy @ w'), as the registered op's backward is
        return _backward(ctx, dy)


# ---- public API -------------------------------------------------------------------------------------------------

def quantize_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) float32 / float16 / bfloat16 -> (packed (N, K/2) uint8, scales (N, K/G) float32, zeros (N, K/G)
    float32): asymmetric min-max per group of group_size consecutive k, q = clamp(round_half_even((w - min) /
    scale), 0, 15), scale = (max - min) / 15, zero = min + 8 * scale; w ~ (q - 8) * scale + zero.
    K must be a multiple of group_size (32, 64, 128 or 256)."""
    fn = "quantize_int4"
    _check_group(fn, group_size)
    if not isinstance(w, Tensor):
        raise TypeError(f"{fn}: w must be a Tensor, got {type(w).__name__}")
    if w.dtype not in X_DTYPES:
        raise TypeError(f"{fn}: w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{fn}: w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.shape[1] % group_size:
        raise ValueError(f"{fn}: in_features K = w.shape[1] = {w.shape[1]} must be a multiple of group_size "
                         f"{group_size}")
    return torch.ops.mltoolkit.quantize_int4(w.detach(), group_size)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int = 128) -> Tensor:
    """The float32 weight (N, K) a quantized one stands for: (q - 8) * scale + zero."""
    _check_weight("dequantize_int4", packed, scales, zeros, group_size)
    return torch.ops.mltoolkit.dequantize_int4(packed, scales, zeros, group_size)


def int4_weight_only_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int = 128,
                            bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, dequantize_int4(packed, scales, zeros, group_size), bias) without the float weight.

    x: (..., K) float32 / float16 / bfloat16; packed (N, K/2) uint8; scales, zeros (N, K/G) float32; bias (N,) of
    x's dtype or None. Returns (..., N) in x's dtype, accumulated in float32. Differentiable in x and bias."""
    fn = "int4_weight_only_linear"
    n, k = _check_weight(fn, packed, scales, zeros, group_size)
    _check_x(fn, x, k, n, packed.device, bias)
    x2 = _ext.as_rows(x)
    y = _ext.call_op(torch.ops.mltoolkit.int4_weight_only_linear, _EagerInt4Linear, _linear_impl,
                     (x2, packed, scales, zeros, group_size, bias), (x2, packed, scales, zeros, bias), (x2, bias))
    return _ext.from_rows(y, x)
