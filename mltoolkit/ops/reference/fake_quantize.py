"""Fake quantization in plain PyTorch: the oracle and the fallback backend. Contract: csrc/fake_quantize.h.

x is seen as (outer, C, inner) with quantizer c for the elements (o, c, :) (per tensor, per channel along `axis`, or
per group of `group_size` consecutive elements of the last dim); all arithmetic in float32:

    integer zero point: r = round_half_even(x / s), v = r + round(zp), q = clamp(v, qmin, qmax), y = (q - zp) * s
    float zero point:   r = round_half_even((x - beta) / s), v = r, q = clamp(r, qmin, qmax),
                        y = (q - cm) * s + (beta + cm * s), cm = (qmin + qmax + 1) // 2

Backward (STE, LSQ / LSQ+ scale and offset gradients), mask = qmin <= v <= qmax:
    dx = mask * dy;  dscale = g * sum(dy * (mask ? r - u : q - zp));  dzero_point = g * sum(~mask * dy) * (-s or 1)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def layout(shape: tuple, axis: Optional[int], group_size: Optional[int]) -> tuple[int, int, int]:
    """(outer, C, inner) of x's shape for the granularity (axis and group_size None: per tensor)."""
    numel = 1
    for d in shape:
        numel *= d
    if group_size:
        return 1, numel // group_size, group_size
    if axis is not None:
        outer = inner = 1
        for d in shape[:axis]:
            outer *= d
        for d in shape[axis + 1:]:
            inner *= d
        return outer, shape[axis], inner
    return 1, 1, numel


def centre(qmin: int, qmax: int) -> int:
    return (qmin + qmax + 1) // 2


def _prepare(x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point):
    o, c, i = layout(tuple(x.shape), axis, group_size)
    xf = x.to(torch.float32).reshape(o, c, i)
    s = scale.to(torch.float32).reshape(1, c, 1)
    if not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError("fake_quantize: scale must be positive and finite")
    if zero_point is None:
        b = torch.zeros_like(s)
    else:
        b = zero_point.to(torch.float32).reshape(1, c, 1)
        if not bool(torch.isfinite(b).all()):
            raise ValueError("fake_quantize: zero_point must be finite")
        if not float_zero_point:
            b = torch.round(b)
    u = (xf - b) / s if float_zero_point else xf / s
    r = torch.round(u)
    v = r if float_zero_point else r + b
    q = v.clamp(qmin, qmax)
    return xf, s, b, u, r, v, q


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int, axis: Optional[int],
                  group_size: Optional[int], float_zero_point: bool) -> Tensor:
    """y of x's shape and dtype."""
    _, s, b, _, _, _, q = _prepare(x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point)
    if float_zero_point:
        cm = centre(qmin, qmax)
        y = (q - cm) * s + (b + cm * s)
    else:
        y = (q - b) * s
    return y.reshape(x.shape).to(x.dtype)


def fake_quantize_backward(dy: Tensor, x: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int,
                           axis: Optional[int], group_size: Optional[int], float_zero_point: bool, grad_scale: float,
                           output_mask: list[bool]) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx in x's dtype, dscale and dzero_point float32 of scale's shape), None where output_mask says no."""
    _, s, b, u, r, v, q = _prepare(x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point)
    g = dy.to(torch.float32).reshape(u.shape)
    inside = (v >= qmin) & (v <= qmax)
    dx = torch.where(inside, g, torch.zeros_like(g)).reshape(x.shape).to(x.dtype) if output_mask[0] else None
    dscale = dzero = None
    if output_mask[1]:
        term = torch.where(inside, r - u, q if float_zero_point else q - b)
        dscale = ((g * term).sum((0, 2)) * grad_scale).reshape(scale.shape)
    if output_mask[2] and zero_point is not None:
        clamped = torch.where(inside, torch.zeros_like(g), g).sum((0, 2))
        if not float_zero_point:
            clamped = -s.reshape(-1) * clamped
        dzero = (clamped * grad_scale).reshape(scale.shape)
    return dx, dscale, dzero


def fake_quantize_autograd(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int,
                           axis: Optional[int] = None, group_size: Optional[int] = None,
                           float_zero_point: bool = False, grad_scale: float = 1.0) -> Tensor:
    """The same gradients written as a differentiable formula (round with a straight-through detach, LSQ's gradient
    scaling as s * g + (s - s * g).detach()): an independent check of fake_quantize_backward by autograd. Its
    forward value is only close to fake_quantize's (it rounds differently); use it for gradients."""
    with torch.no_grad():
        _, _, _, _, r, v, q = _prepare(x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point)
        inside = (v >= qmin) & (v <= qmax)
    o, c, i = layout(tuple(x.shape), axis, group_size)
    xf = x.to(torch.float32).reshape(o, c, i)
    sc = scale.to(torch.float32)
    sc = sc * grad_scale + (sc - sc * grad_scale).detach()
    s = sc.reshape(1, c, 1)
    if zero_point is None:
        b = torch.zeros_like(s)
    else:
        zp = zero_point.to(torch.float32)
        zp = zp * grad_scale + (zp - zp * grad_scale).detach()
        b = zp.reshape(1, c, 1)
        if not float_zero_point:
            b = b + (torch.round(b) - b).detach()
    u = (xf - b) / s if float_zero_point else xf / s
    r_ste = u + (r - u).detach()
    if float_zero_point:
        y = torch.where(inside, r_ste, q) * s + b
    else:
        y = (torch.where(inside, r_ste + b, q) - b) * s
    return y.reshape(x.shape)
