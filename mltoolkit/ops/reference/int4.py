"""int4 weight-only quantization in plain PyTorch: the oracle and the fallback backend. Contract: csrc/int4_linear.h.

Per group of G consecutive k of a weight row (float32 math): scale = (max - min) / 15 (a zero scale becomes
|min| / 8, or 1), zero = min + 8 * scale, q = clamp(round_half_even((w - min) / scale), 0, 15); the weight it stands
for is (q - 8) * scale + zero. packed (N, K/2) uint8 holds q[2j] in the low nibble and q[2j+1] in the high one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mltoolkit.ops.reference.int8 import div_exact

GROUP_SIZES = (32, 64, 128, 256)


def pack_int4(q: Tensor) -> Tensor:
    """q (N, K) integers in [0, 15] -> (N, K/2) uint8, element 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> q (N, K) uint8 in [0, 15]."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def group_params(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(min, scale, zero), each (N, K/G) float32, of w's groups."""
    n, k = w.shape
    g = w.to(torch.float32).reshape(n, k // group_size, group_size)
    mn, mx = g.amin(dim=-1), g.amax(dim=-1)
    scale = div_exact(mx - mn, 15)
    safe = mn.abs() / 8
    safe = torch.where(safe == 0, torch.ones_like(safe), safe)
    scale = torch.where(scale == 0, safe, scale)
    zero = mn + 8 * scale
    return mn, scale, zero


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) float -> (packed (N, K/2) uint8, scales (N, K/G) float32, zeros (N, K/G) float32)."""
    n, k = w.shape
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_int4: w must be finite (it has inf or nan)")
    mn, scale, zero = group_params(w, group_size)
    g = w.to(torch.float32).reshape(n, k // group_size, group_size)
    q = torch.round((g - mn[..., None]) / scale[..., None]).clamp_(0, 15).reshape(n, k)
    return pack_int4(q), scale, zero


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """-> w' (N, K) float32 = (q - 8) * scale + zero, the product rounded before the add."""
    n = packed.shape[0]
    q = unpack_int4(packed).to(torch.float32).reshape(n, -1, group_size)
    prod = (q - 8) * scales[..., None]
    return (prod + zeros[..., None]).reshape(n, -1)


def int4_weight_only_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                            bias: Optional[Tensor] = None) -> Tensor:
    """y (M, N) in x's dtype = x @ dequantize(packed, scales, zeros)^T + bias, in float32 (float64 for float64 x,
    the oracle's dtype)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_int4(packed, scales, zeros, group_size).to(ct)
    y = x.to(ct) @ w.t()
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def int4_weight_only_linear_backward(dy: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                                     need_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(dx, dbias) of int4_weight_only_linear: dx = dy @ w' (M, K), dbias = dy summed over rows, in dy's dtype."""
    ct = torch.float64 if dy.dtype == torch.float64 else torch.float32
    w = dequantize_int4(packed, scales, zeros, group_size).to(ct)
    dyc = dy.to(ct)
    dx = (dyc @ w).to(dy.dtype)
    db = dyc.sum(0).to(dy.dtype) if need_bias else None
    return dx, db
