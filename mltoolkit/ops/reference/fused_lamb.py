"""Plain-PyTorch LAMB step and global-norm gradient clip: the `reference` backend of mltoolkit/ops/fused_lamb.py
(contract: csrc/fused_lamb.h) and the per-tensor-loop baseline of benchmarks/ops/bench_lamb.py.

One tensor at a time, in torch ops, in the parameters' dtype (norms in float64 as the kernels do). Works on any
device, dtype and stride; updates params, exp_avgs and exp_avg_sqs in place.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def lamb_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
              bias_correction: bool, grad_averaging: bool, use_trust_ratio: bool, max_trust_ratio: float) -> None:
    beta3 = 1.0 - beta1 if grad_averaging else 1.0
    bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** step if bias_correction else 1.0
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = g.to(p.dtype)
        m.mul_(beta1).add_(g, alpha=beta3)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        if weight_decay != 0.0:
            u.add_(p, alpha=weight_decay)
        trust = 1.0
        if use_trust_ratio:
            w_norm = torch.linalg.vector_norm(p, dtype=torch.float64)
            u_norm = torch.linalg.vector_norm(u, dtype=torch.float64)
            trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            if max_trust_ratio > 0.0:
                trust = trust.clamp(max=max_trust_ratio)
            trust = trust.to(p.dtype)
        elif max_trust_ratio > 0.0:
            trust = min(trust, max_trust_ratio)
        p.sub_(u * (trust * lr))


def clip_grad_norm(grads: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ on a list of gradients (norm_type 2 or inf), with the total in float64."""
    if math.isinf(norm_type):
        # (an empty gradient contributes 0: max() of an empty tensor raises)
        total = torch.stack([g.detach().abs().max().double() if g.numel() else g.new_zeros((), dtype=torch.float64)
                             for g in grads]).max()
    else:
        total = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum().sqrt()
    total = total.to(grads[0].dtype)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"fused_clip_grad_norm_: the total norm of order {norm_type} for gradients from "
                           "`parameters` is non-finite, so it cannot be clipped. To disable this error and scale the "
                           "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
