"""int8 dynamic quantization: symmetric per-row quantizers and an int8 x int8 linear with exact int32 accumulation
and a fused dequantize epilogue (contract in csrc/int8_linear.h, reference in mltoolkit/ops/reference/int8.py).

Registered ops (2-D; the public functions below add leading dims and argument checks):

    torch.ops.mltoolkit.quantize_per_token(x (M, K) float) -> (xq int8 (M, K), scale float32 (M,))
    torch.ops.mltoolkit.quantize_per_channel(w (N, K) float) -> (wq int8 (N, K), scale float32 (N,))
    torch.ops.mltoolkit.int8_linear(xq int8 (M, K), x_scale f32 (M,), wq int8 (N, K) or packed, w_scale f32 (N,),
                                    bias (N,)?, out_dtype) -> y (M, N)
    torch.ops.mltoolkit.int8_pack_weight(wq int8 (N, K)) -> packed int8 (ceil(N / 64), ceil(K / 4), 64, 4)

Both quantizers use one rule per row: scale = absmax / 127 (1 for an all-zero row, or one whose absmax / 127 is
below FLT_MIN), q = clamp(round_half_to_even(x / scale), -127, 127). int8_linear computes
y = ((float32(sum_k xq * wq) * x_scale[m]) * w_scale[n]) + bias[n] in float32, then rounds to out_dtype.

The weight may stay in its plain (N, K) layout or be packed once (int8_pack_weight: panels of 64 output channels,
4 consecutive k per 256-byte step, sign bit flipped, the form the CPU VNNI kernel streams; format in
csrc/int8_linear.h).
No autograd: the inputs of int8_linear are integers (quantization-aware training uses fake_quantize).
On the CPU, MLTK_INT8_ISA=vnni|avx2|scalar forces one of the kernel's paths (`isa()` names the one in use).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops.reference import int8 as reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INT8 = table("int8")


# ---- backends -------------------------------------------------------------------------------------------------

def _cuda_accepts(x, *_) -> Optional[str]:
    if not x.is_cuda:
        return _ext.on_cuda(x)
    major, minor = torch.cuda.get_device_capability(x.device)
    return None if (major, minor) >= (6, 1) else f"needs compute capability 6.1+ (dp4a), device has {major}.{minor}"


def _cuda_linear(xq, x_scale, wq, w_scale, bias, out_dtype):
    if wq.dim() == 4:  # the packed layout is the CPU kernel's: the CUDA kernels read plain rows (a copy per call)
        wq = reference.unpack_weight(wq, w_scale.shape[0], xq.shape[1])
    return _ext._C.int8_linear_cuda(xq, x_scale, wq, w_scale, None if bias is None else bias.float(), out_dtype)


def _cpp_linear(xq, x_scale, wq, w_scale, bias, out_dtype):
    return _ext._C.int8_linear_cpu(xq, x_scale, wq, w_scale, None if bias is None else bias.float(), out_dtype)


# CUDA C++ (csrc/cuda/int8_linear.cu): int8 tensor cores on sm_80+ (a weight-streaming GEMV up to 8 rows, tiles
# beyond), dp4a otherwise; up to 16 rows unless forced. H100, bf16, K = N = 4096
# (benchmarks/results/nvidia-h100-80gb-hbm3.md, 2026-11-27): the tile kernel took 0.041 / 0.053 ms at M = 1 / 16
# (Triton 0.088 / 0.216), the Triton GEMM 0.161 ms at M = 4096 (CUDA 0.288). The tensor-core GEMV (2026-11-27 14:54):
# quantize + GEMV 0.024 ms at M = 1 in the self-check (bf16 F.linear 0.029), 0.025 in the harness (F.linear 0.019,
# where two launches' host time shows); Triton's TMA GEMM for M = 4096 is untested on a GPU.
INT8.register("cuda", _cuda_accepts, _ext.cuda_unavailable, defer=_ext.defer_above_rows(16, "the Triton GEMM"),
              quantize=lambda x: tuple(_ext._C.quantize_rows_cuda(x)), linear=_cuda_linear,
              pack=reference.pack_weight)


def _triton_kernels():
    from mltoolkit.triton_kernels import quant

    return quant


# Triton reads both weight layouts in the kernel (a 64-channel panel of int8_pack_weight's layout is one contiguous
# run of bytes per 4 k, so a 64-aligned tile needs no copy); pack stays a one-time torch copy.
INT8.register("triton", _ext.triton_device, _ext.triton_unavailable,
              quantize=lambda x: _triton_kernels().quantize_rows(x),
              linear=lambda *a: _triton_kernels().int8_linear(*a), pack=reference.pack_weight)
INT8.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
              quantize=lambda x: tuple(_ext._C.quantize_rows_cpu(x)), linear=_cpp_linear,
              pack=reference.pack_weight)  # a one-time copy: torch's own ops do it well
INT8.register("reference", lambda *_: None, quantize=reference.quantize_rows, linear=reference.int8_linear,
              pack=reference.pack_weight)


def isa() -> Optional[str]:
    """The CPU kernel's path a call would take now ("vnni", "avx2" or "scalar"; MLTK_INT8_ISA forces one), or None
    when the C++ extension is not built."""
    return None if _ext._C is None else _ext._C.int8_isa_cpu()


def cpu_packing_pays() -> bool:
    """Whether the CPU kernel reads an int8_pack_weight weight as it is (its VNNI path); its other paths unpack it on
    every call (26 ms against 1.9 at M = 1, K = N = 4096, AVX2 VM, 2026-11-28), so weights stay plain there."""
    return isa() == "vnni"


# ---- registered ops -------------------------------------------------------------------------------------------

def _quantize_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    return INT8.select(x).kernels["quantize"](x)


def _quantize_fake(x):
    torch._check(x.dim() == 2, lambda: "quantize: x must be 2-D")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def _quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_impl(x)


def _quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    return _quantize_impl(w)


quantize_per_token_op = torch.library.custom_op("mltoolkit::quantize_per_token", mutates_args=())(_quantize_per_token)
quantize_per_token_op.register_fake(_quantize_fake)
quantize_per_channel_op = torch.library.custom_op("mltoolkit::quantize_per_channel",
                                                  mutates_args=())(_quantize_per_channel)
quantize_per_channel_op.register_fake(_quantize_fake)


def _linear_impl(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 out_dtype: torch.dtype) -> Tensor:
    return INT8.select(xq).kernels["linear"](xq, x_scale, wq, w_scale, bias, out_dtype)


int8_linear_op = torch.library.custom_op("mltoolkit::int8_linear", mutates_args=())(_linear_impl)


@int8_linear_op.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype):
    torch._check(xq.dim() == 2 and wq.dim() in (2, 4), lambda: "int8_linear: xq must be 2-D, wq 2-D or packed 4-D")
    if wq.dim() == 2:
        torch._check(xq.shape[1] == wq.shape[1], lambda: "int8_linear: xq and wq must have the same K")
    return xq.new_empty((xq.shape[0], w_scale.shape[0]), dtype=out_dtype)


def _pack_impl(wq: Tensor) -> Tensor:
    return INT8.select(wq).kernels["pack"](wq)


int8_pack_weight_op = torch.library.custom_op("mltoolkit::int8_pack_weight", mutates_args=())(_pack_impl)


@int8_pack_weight_op.register_fake
def _(wq):
    torch._check(wq.dim() == 2, lambda: "int8_pack_weight: wq must be 2-D")
    return wq.new_empty(packed_shape(wq.shape[0], wq.shape[1]))


# ---- public API -----------------------------------------------------------------------------------------------

def _tensor(fn: str, name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    return t


def _float_input(fn: str, name: str, x, min_dim: int = 1) -> Tensor:
    _tensor(fn, name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{fn}: {name} must have at least {min_dim} dims, got shape {list(x.shape)}")
    return x


def _same_device(fn: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _quantize(x: Tensor, op) -> tuple[Tensor, Tensor]:
    if _ext.plain_eager(x):
        return _quantize_impl(x)
    return op(x)


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of each row of x (..., K) (float32 / float16 / bfloat16): returns
    xq int8 (..., K) and scale float32 (...) with x ~= xq * scale[..., None]."""
    fn = "quantize_per_token"
    _float_input(fn, "x", x)
    lead = x.shape[:-1]
    xq, scale = _quantize(x.reshape(lead.numel(), x.shape[-1]), quantize_per_token_op)
    return xq.reshape(x.shape), scale.reshape(lead)


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of each output channel (row) of a linear weight w (N, K): returns wq int8 (N, K)
    and scale float32 (N,) with w ~= wq * scale[:, None]."""
    fn = "quantize_per_channel"
    _float_input(fn, "w", w)
    if w.dim() != 2:
        raise ValueError(f"{fn}: w must be 2-D (N, K), got shape {list(w.shape)}")
    return _quantize(w, quantize_per_channel_op)


def packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    """The shape int8_pack_weight gives an (n, k) weight."""
    return ((n + 63) // 64, (k + 3) // 4, 64, 4)


def _check_linear(fn: str, K: int, lead: tuple, x_scale: Optional[Tensor], wq, w_scale, bias, ref: Tensor,
                  ref_name: str) -> int:
    """Checks the arguments; returns N."""
    _tensor(fn, "wq", wq)
    _tensor(fn, "w_scale", w_scale)
    if wq.dtype != torch.int8:
        raise TypeError(f"{fn}: wq must be int8, got {wq.dtype}")
    if wq.dim() == 4:  # packed: N is w_scale's length
        if w_scale.dim() != 1:
            raise ValueError(f"{fn}: w_scale must be 1-D (N,), got shape {tuple(w_scale.shape)}")
        n = w_scale.shape[0]
        if tuple(wq.shape) != packed_shape(n, K):
            raise ValueError(f"{fn}: packed wq must have shape (ceil(N / 64), ceil(K / 4), 64, 4) = "
                             f"{packed_shape(n, K)} for N = {n} (w_scale's length), K = {K}, got {tuple(wq.shape)}")
    elif wq.dim() != 2:
        raise ValueError(f"{fn}: wq must be 2-D (N, K) or packed by int8_pack_weight, got shape {list(wq.shape)}")
    elif wq.shape[1] != K:
        raise ValueError(f"{fn}: wq must be (N, K) with K = {K} ({ref_name}'s last dim), got shape {list(wq.shape)}")
    _same_device(fn, "wq", wq, ref, ref_name)
    n = w_scale.shape[0] if wq.dim() == 4 else wq.shape[0]
    for name, s, shape in (("x_scale", x_scale, lead), ("w_scale", w_scale, (n,))):
        if name == "x_scale" and s is None:
            continue
        _tensor(fn, name, s)
        if s.dtype != torch.float32:
            raise TypeError(f"{fn}: {name} must be float32, got {s.dtype}")
        if tuple(s.shape) != tuple(shape):
            raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(s.shape)}")
        _same_device(fn, name, s, ref, ref_name)
    if bias is not None:
        _tensor(fn, "bias", bias)
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: bias must be float32, float16 or bfloat16, got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{fn}: bias must have shape ({n},), got {tuple(bias.shape)}")
        _same_device(fn, "bias", bias, ref, ref_name)
    return n


def _linear(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
            out_dtype: torch.dtype) -> Tensor:
    if _ext.plain_eager(xq, x_scale, wq, w_scale, bias):
        return _linear_impl(xq, x_scale, wq, w_scale, bias, out_dtype)
    return int8_linear_op(xq, x_scale, wq, w_scale, bias, out_dtype)


def int8_linear(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                out_dtype: torch.dtype = torch.float32) -> Tensor:
    """y = (xq . wq^T, exact in int32) * x_scale[..., None] * w_scale + bias, in out_dtype.

    xq int8 (..., K), x_scale float32 (...) (per token), wq int8 (N, K) or int8_pack_weight(wq), w_scale float32
    (N,) (per output channel), bias (N,) or None, out_dtype float32 / float16 / bfloat16. Returns (..., N)."""
    fn = "int8_linear"
    _tensor(fn, "xq", xq)
    if xq.dtype != torch.int8:
        raise TypeError(f"{fn}: xq must be int8, got {xq.dtype}")
    if xq.dim() < 1:
        raise ValueError(f"{fn}: xq must have at least 1 dim, got shape {list(xq.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    lead, K = tuple(xq.shape[:-1]), xq.shape[-1]
    n = _check_linear(fn, K, lead, x_scale, wq, w_scale, bias, xq, "xq")
    y = _linear(xq.reshape(math.prod(lead), K), x_scale.reshape(-1), wq, w_scale, bias, out_dtype)
    return y.reshape(*lead, n)


def int8_linear_dynamic(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, wq * w_scale[:, None], bias) with x quantized to int8 per token on the fly (dynamic
    quantization): y = int8_linear(*quantize_per_token(x), wq, w_scale, bias, out_dtype=x.dtype).

    x (..., K) float32 / float16 / bfloat16, wq int8 (N, K) and w_scale float32 (N,) (from quantize_per_channel;
    wq may be packed by int8_pack_weight, the fastest form on the CPU), bias (N,) or None. Returns (..., N) in x's
    dtype."""
    fn = "int8_linear_dynamic"
    _float_input(fn, "x", x)
    lead, K = tuple(x.shape[:-1]), x.shape[-1]
    _check_linear(fn, K, lead, None, wq, w_scale, bias, x, "x")
    xq, xs = _quantize(_ext.as_rows(x), quantize_per_token_op)
    return _ext.from_rows(_linear(xq, xs, wq, w_scale, bias, x.dtype), x)


def int8_pack_weight(wq: Tensor) -> Tensor:
    """wq int8 (N, K) -> the packed layout (ceil(N / 64), ceil(K / 4), 64, 4) that int8_linear and
    int8_linear_dynamic also accept: packed[p, q, j, t] = wq[64 p + j, 4 q + t] ^ 0x80, zero weights in the padding.
    The CPU VNNI kernel's form (elsewhere it is unpacked per call): pack once, at conversion time; N then travels as
    w_scale's length."""
    fn = "int8_pack_weight"
    _tensor(fn, "wq", wq)
    if wq.dtype != torch.int8:
        raise TypeError(f"{fn}: wq must be int8, got {wq.dtype}")
    if wq.dim() != 2:
        raise ValueError(f"{fn}: wq must be 2-D (N, K), got shape {list(wq.shape)}")
    return _pack_impl(wq) if _ext.plain_eager(wq) else int8_pack_weight_op(wq)
