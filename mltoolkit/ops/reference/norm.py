"""Plain-PyTorch LayerNorm / RMSNorm.

Two layers: the oracle functions (`layer_norm`, `rms_norm`, `add_*`) compute in float32 (float64 for float64
input) with autograd and are what tests compare against; `norm_forward` / `norm_backward` implement the kernel
contract of csrc/norm.h with explicit formulas and serve as the `reference` backend.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


def _upcast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms compute and keep mean/rstd in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims (biased var)."""
    ct = stat_dtype(x.dtype)
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.to(ct)
    mean = xf.mean(dim=dims, keepdim=True)
    var = (xf - mean).square().mean(dim=dims, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _upcast(weight, ct)
    if bias is not None:
        y = y + _upcast(bias, ct)
    return y.to(x.dtype)


def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight; eps=None means torch.finfo(x.dtype).eps, as in torch."""
    ct = stat_dtype(x.dtype)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * _upcast(weight, ct)
    return y.to(x.dtype)


def _rounded_sum(x: Tensor, residual: Tensor, sum_dtype: Optional[torch.dtype]) -> Tensor:
    # The fused kernels store x + residual in the input dtype and normalize that stored sum; an oracle running on
    # upcast copies rounds the same way when told the original dtype (the rounding passes gradients through).
    s = x + residual
    return s if sum_dtype is None else s.to(sum_dtype).to(s.dtype)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, normalized_shape: Optional[Sequence[int]] = None,
                   sum_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(layer_norm(x + residual), x + residual), the sum rounded to `sum_dtype` (default x's dtype), as a
    transformer block stores it."""
    s = _rounded_sum(x, residual, sum_dtype)
    shape = normalized_shape or (weight.shape if weight is not None else (x.shape[-1],))
    return layer_norm(s, shape, weight, bias, eps), s


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None,
                 normalized_shape: Optional[Sequence[int]] = None,
                 sum_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to `sum_dtype` (default x's dtype)."""
    s = _rounded_sum(x, residual, sum_dtype)
    shape = normalized_shape or (weight.shape if weight is not None else (x.shape[-1],))
    return rms_norm(s, shape, weight, eps), s


# ---- the kernel contract (csrc/norm.h), as the `reference` backend -------------------------------------------

def norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, is_rms: bool):
    ct = stat_dtype(x.dtype)
    s = x if residual is None else (x.to(ct) + residual.to(ct)).to(x.dtype)
    sf = s.to(ct)
    if is_rms:
        mean = None
        rstd = torch.rsqrt(sf.square().mean(dim=1) + eps)
        xhat = sf * rstd[:, None]
    else:
        mean = sf.mean(dim=1)
        rstd = torch.rsqrt((sf - mean[:, None]).square().mean(dim=1) + eps)
        xhat = (sf - mean[:, None]) * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype), (s if residual is not None else None), mean, rstd


def norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor,
                  dresidual_out: Optional[Tensor], has_bias: bool, is_rms: bool):
    ct = stat_dtype(x.dtype)
    xf, dyf, rstd = x.to(ct), dy.to(ct), rstd.to(ct)
    xhat = (xf if is_rms else xf - mean.to(ct)[:, None]) * rstd[:, None]
    g = dyf * weight.to(ct) if weight is not None else dyf
    inner = g - xhat * (g * xhat).mean(dim=1, keepdim=True)
    if not is_rms:
        inner = inner - g.mean(dim=1, keepdim=True)
    dx = inner * rstd[:, None]
    if dresidual_out is not None:
        dx = dx + dresidual_out.to(ct)
    dweight = (dyf * xhat).sum(dim=0).to(weight.dtype) if weight is not None else None
    dbias = dyf.sum(dim=0).to(weight.dtype if weight is not None else x.dtype) if has_bias else None
    return dx.to(x.dtype), dweight, dbias
