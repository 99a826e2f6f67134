"""Plain-PyTorch int8 quantization and int8 linear: the kernel contract of csrc/int8_linear.h, serving as the
`reference` backend and the test oracle (bit-exact with the kernels, float32 epilogue included).

    quantize_rows(x (R, K)):  scale = absmax(row) / 127 (1 where that is below FLT_MIN: zero rows),
                              q = clamp(round_half_to_even(x / scale), -127, 127)          (float32 arithmetic)
    pack_weight:              (N, K) -> (ceil(N / 64), ceil(K / 4), 64, 4): 64-channel panels, 4 k per step,
                              sign bit flipped (w ^ 0x80)
    int8_linear:              acc = xq . wq^T exactly (wq plain or packed);
                              y = ((float32(acc) * x_scale[m]) * w_scale[n]) + bias[n]

The exact sums run as a float64 matmul: every product and partial sum is an integer below 2^31, exact in float64,
and float64 matmul exists on every device (integer matmul does not on CUDA).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_TINY = torch.finfo(torch.float32).tiny  # FLT_MIN


def div_exact(x: Tensor, divisor: int) -> Tensor:
    """float32 x / divisor, correctly rounded on every device (the kernels' IEEE division). torch's CUDA kernel
    multiplies by a rounded 1 / divisor when the divisor is a Python number (1 ulp off for some x); a float64
    quotient rounded to float32 is the correctly rounded float32 quotient."""
    return (x.double() / divisor).float()


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (R, K) float -> (q int8 (R, K), scale float32 (R,))."""
    xf = x.float()
    if xf.shape[-1] == 0:
        return torch.empty(xf.shape, dtype=torch.int8, device=x.device), xf.new_ones(xf.shape[:-1])
    scale = div_exact(xf.abs().amax(dim=-1), 127)
    scale = torch.where(scale >= _TINY, scale, torch.ones_like(scale))
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_weight(wq: Tensor) -> Tensor:
    """wq (N, K) int8 -> the packed layout (ceil(N / 64), ceil(K / 4), 64, 4): packed[p, q, j, t] =
    wq[64p + j, 4q + t] ^ 0x80, zero weights (0x80) in the padding (csrc/int8_linear.h)."""
    n, k = wq.shape
    p, q = (n + 63) // 64, (k + 3) // 4
    padded = torch.zeros(p * 64, q * 4, dtype=wq.dtype, device=wq.device)
    padded[:n, :k] = wq
    return torch.bitwise_xor(padded.reshape(p, 64, q, 4).permute(0, 2, 1, 3), -128).contiguous()


def unpack_weight(packed: Tensor, n: int, k: int) -> Tensor:
    """The inverse of pack_weight: (N, K) from the packed layout."""
    p, q = packed.shape[:2]
    return torch.bitwise_xor(packed.permute(0, 2, 1, 3).reshape(p * 64, q * 4)[:n, :k], -128)


def int_matmul(xq: Tensor, wq: Tensor) -> Tensor:
    """The exact int8 x int8 sums acc[m, n] = sum_k xq[m, k] * wq[n, k], as float64 holding integers."""
    return xq.double() @ wq.double().T


def int8_linear(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                out_dtype: torch.dtype) -> Tensor:
    if wq.dim() == 4:
        wq = unpack_weight(wq, w_scale.shape[0], xq.shape[1])
    acc = int_matmul(xq, wq).float()
    y = acc * x_scale.float().unsqueeze(1)
    y = y * w_scale.float().unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_linear_dynamic(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Quantize x (..., K) per token, then int8_linear; output in x's dtype."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    y = int8_linear(xq, xs, wq, w_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w_scale.shape[0])


# ---- weight-only int8 (contract: csrc/int8_weight_only_linear.h) ----------------------------------------------------

def dequantize_int8(wq: Tensor, w_scale: Tensor) -> Tensor:
    """The float32 weight (N, K) an int8 one stands for: wq * w_scale[:, None]."""
    return wq.float() * w_scale.float().unsqueeze(1)


def int8_weight_only_linear(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ (wq * w_scale)^T + bias accumulated in float32, in x's dtype. x (M, K)."""
    y = x.float() @ dequantize_int8(wq, w_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- static activation quantization and int8 im2col (contract: csrc/int8_static.h) --------------------------------

def quantize_static(x: Tensor, scale: Tensor) -> Tensor:
    """q = clamp(round_half_to_even(float32(x) / scale), -127, 127) as int8, x's shape (one float32 scale)."""
    return torch.round(x.float() / scale.float().reshape(())).clamp_(-127, 127).to(torch.int8)


def im2col_int8(xq: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> Tensor:
    """xq (B, C, H, W) int8 -> cols (B * OH * OW, KH * KW * C), column order (kh, kw, c), zeros outside the image.
    Exact integer gathering through float64 unfold (every int8 value is exact there)."""
    B, C = xq.shape[:2]
    cols = torch.nn.functional.unfold(xq.double(), kernel, dilation=dilation, padding=padding, stride=stride)
    L = cols.shape[-1]
    kh, kw = kernel
    cols = cols.reshape(B, C, kh * kw, L).permute(0, 3, 2, 1).reshape(B * L, kh * kw * C)
    return cols.to(torch.int8)


def conv_weight_2d(w: Tensor) -> Tensor:
    """A conv weight (OC, C, KH, KW) as the (OC, KH * KW * C) matrix that multiplies im2col_int8's columns."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
