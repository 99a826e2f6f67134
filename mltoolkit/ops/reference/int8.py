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


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (R, K) float -> (q int8 (R, K), scale float32 (R,))."""
    xf = x.float()
    if xf.shape[-1] == 0:
        return torch.empty(xf.shape, dtype=torch.int8, device=x.device), xf.new_ones(xf.shape[:-1])
    scale = xf.abs().amax(dim=-1) / 127
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
