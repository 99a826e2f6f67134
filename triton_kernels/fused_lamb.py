"""Fused LAMB step and fused global-norm gradient clip as Triton kernels (contract: csrc/fused_lamb.h; the only
caller is mltoolkit/ops/fused_lamb.py).

    _lamb_pass1_kernel   per BLOCK of one tensor: m, v updated in place; partial sums of p^2 and u^2 written to
                         its own slot (no atomics: the per-tensor norms are deterministic), u recomputed in pass 2
    _lamb_pass2_kernel   p -= scale * u with scale = lr * trust read from a device tensor (no host sync)
    _sumsq_kernel        per-BLOCK partial sums of squares (or max |g|) for the clip
    _scale_kernel        g *= coef, coef read from a device tensor

Launches are per tensor (one pass-1 launch per tensor, the trust ratios of all tensors in one torch op, one pass-2
launch per tensor); a single launch over a pointer table is not done yet. Arithmetic in the tensors' dtype
(float32 or float64); partial sums are added in float64 with torch.
"""
import math

import torch
import triton
import triton.language as tl

from .host import cdiv

BLOCK = 1024


@triton.jit
def _direction(m, v, p, inv_bc1, inv_bc2, eps, wd):
    return (m * inv_bc1) / (tl.sqrt(v * inv_bc2) + eps) + wd * p


@triton.jit
def _lamb_pass1_kernel(p_ptr, g_ptr, m_ptr, v_ptr, part_ptr, n, beta1, beta2, beta3, inv_bc1, inv_bc2, eps, wd,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + beta3 * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * g * g
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    u = tl.where(mask, _direction(m, v, p, inv_bc1, inv_bc2, eps, wd), 0.0)
    tl.store(part_ptr + 2 * pid, tl.sum(p * p, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(u * u, axis=0))


@triton.jit
def _lamb_pass2_kernel(p_ptr, m_ptr, v_ptr, scale_ptr, n, inv_bc1, inv_bc2, eps, wd, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(scale_ptr)
    u = _direction(m, v, p, inv_bc1, inv_bc2, eps, wd)
    tl.store(p_ptr + offs, p - scale * u, mask=mask)


@triton.jit
def _sumsq_kernel(x_ptr, part_ptr, n, INF_NORM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    if INF_NORM:
        tl.store(part_ptr + pid, tl.max(tl.abs(x), axis=0))
    else:
        tl.store(part_ptr + pid, tl.sum(x * x, axis=0))


@triton.jit
def _scale_kernel(x_ptr, coef_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(x_ptr + offs, x * tl.load(coef_ptr), mask=mask)


def fused_lamb_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                    bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio):
    if not params:
        return
    beta3 = 1.0 - beta1 if grad_averaging else 1.0
    inv_bc1 = 1.0 / (1.0 - beta1 ** step) if bias_correction else 1.0
    inv_bc2 = 1.0 / (1.0 - beta2 ** step) if bias_correction else 1.0
    device, dtype = params[0].device, params[0].dtype
    sums = torch.zeros(len(params), 2, dtype=torch.float64, device=device)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        n = p.numel()
        if n == 0:
            continue
        blocks = cdiv(n, BLOCK)
        part = torch.empty(blocks, 2, dtype=dtype, device=device)
        _lamb_pass1_kernel[(blocks,)](p, g, m, v, part, n, beta1, beta2, beta3, inv_bc1, inv_bc2, eps,
                                      weight_decay, BLOCK=BLOCK)
        sums[i] = part.double().sum(0)
    norms = sums.sqrt()
    w, u = norms[:, 0], norms[:, 1]
    ones = torch.ones_like(w)
    trust = torch.where((w > 0) & (u > 0), w / u, ones) if use_trust_ratio else ones
    if max_trust_ratio > 0.0:
        trust = trust.clamp(max=max_trust_ratio)
    scales = (trust * lr).to(dtype)
    for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        n = p.numel()
        if n == 0:
            continue
        _lamb_pass2_kernel[(cdiv(n, BLOCK),)](p, m, v, scales[i:i + 1], n, inv_bc1, inv_bc2, eps,
                                                     weight_decay, BLOCK=BLOCK)


def fused_clip_grad_norm(grads, max_norm, norm_type, error_if_nonfinite):
    inf_norm = math.isinf(norm_type)
    if not inf_norm and norm_type != 2.0:
        raise ValueError(f"fused_clip_grad_norm_: norm_type must be 2 or inf, got {norm_type}")
    dtype, device = grads[0].dtype, grads[0].device
    totals = []
    for g in grads:
        n = g.numel()
        if n == 0:
            continue
        blocks = cdiv(n, BLOCK)
        part = torch.empty(blocks, dtype=dtype, device=device)
        _sumsq_kernel[(blocks,)](g, part, n, INF_NORM=inf_norm, BLOCK=BLOCK)
        totals.append(part.double().max() if inf_norm else part.double().sum())
    if not totals:
        total = torch.zeros((), dtype=torch.float64, device=device)
    else:
        total = torch.stack(totals)
        total = total.max() if inf_norm else total.sum().sqrt()
    total = total.to(dtype)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"fused_clip_grad_norm_: the total norm of order {norm_type} for gradients from "
                           "`parameters` is non-finite, so it cannot be clipped. To disable this error and scale the "
                           "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0).reshape(1)
    for g in grads:
        if g.numel():
            _scale_kernel[(cdiv(g.numel(), BLOCK),)](g, coef, g.numel(), BLOCK=BLOCK)
    return total
