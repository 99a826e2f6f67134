"""Plain-PyTorch 8-bit LAMB step (LAMB with block-wise quantized moments): the oracle of
mltoolkit.ops.fused_lamb8bit and its fallback backend (any float dtype, any device). The contract is
csrc/fused_lamb8bit.h; the maps and the block-wise (de)quantizers are the 8-bit AdamW's
(mltoolkit/ops/reference/fused_adam8bit.py), so the two optimizers keep their 8-bit state the same way.

Every product and sum is one torch op on float32 tensors (a Python scalar operand is rounded to float32 by torch),
so each is rounded on its own as the kernels do; division is tensor by tensor (torch turns a division by a Python
scalar into a multiplication by its reciprocal); sqrt is taken in float64 and rounded (correctly rounded, as the
kernels' sqrt is)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mltoolkit.ops.reference.fused_adam8bit import dequantize_blockwise, quantize_blockwise


def coefficients(lr: float, beta1: float, beta2: float, weight_decay: float, step: int, bias_correction: bool,
                 grad_averaging: bool) -> dict[str, float]:
    """The host constants of csrc/fused_lamb8bit.h, in double (the kernels round each to float32 once)."""
    return dict(b1=beta1, b3=1.0 - beta1 if grad_averaging else 1.0, b2=beta2, c2=1.0 - beta2,
                ibc1=1.0 / (1.0 - beta1 ** step) if bias_correction else 1.0,
                ibc2=1.0 / (1.0 - beta2 ** step) if bias_correction else 1.0, wd=weight_decay)


def direction(p: Tensor, g: Tensor, m: Tensor, v: Tensor, eps: float, c: dict[str, float]) -> tuple[Tensor, ...]:
    """(new m, new v, u) in float32 from float32 p, g and the dequantized m, v (csrc/fused_lamb8bit.h's order)."""
    m = m * c["b1"] + g * c["b3"]
    v = v * c["b2"] + (g * g) * c["c2"]
    # torch's float32 CPU sqrt is not correctly rounded (1 ulp off for ~15% of values); through float64 it is
    u = (m * c["ibc1"]) / ((v * c["ibc2"]).double().sqrt().float() + eps)
    if c["wd"] != 0.0:
        u = u + p * c["wd"]
    return m, v, u


def trust_scale(p: Tensor, u: Tensor, lr: float, use_trust_ratio: bool, max_trust_ratio: float) -> float:
    """lr * trust (a double; the kernels round it to float32), trust = ||p|| / ||u|| with csrc/fused_lamb.h's rules."""
    trust = 1.0
    if use_trust_ratio:
        w = float(torch.linalg.vector_norm(p, dtype=torch.float64))
        n = float(torch.linalg.vector_norm(u, dtype=torch.float64))
        trust = w / n if w > 0.0 and n > 0.0 else 1.0
    if max_trust_ratio > 0.0:
        trust = min(trust, max_trust_ratio)
    return lr * trust


@torch.no_grad()
def fused_lamb8bit_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg_codes: Sequence[Tensor],
                    exp_avg_absmax: Sequence[Tensor], exp_avg_sq_codes: Sequence[Tensor],
                    exp_avg_sq_absmax: Sequence[Tensor], qmap_signed: Tensor, qmap_unsigned: Tensor, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, step: int, bias_correction: bool,
                    grad_averaging: bool, use_trust_ratio: bool, max_trust_ratio: float) -> None:
    """One 8-bit LAMB step for every tensor, in place (csrc/fused_lamb8bit.h): dequantize the moments, update them,
    compute u and the trust ratio, update the parameter, requantize the new moments block by block."""
    c = coefficients(lr, beta1, beta2, weight_decay, step, bias_correction, grad_averaging)
    for i, param in enumerate(params):
        if param.numel() == 0:
            continue
        p = param.detach().reshape(-1).float()
        g = grads[i].reshape(-1).float()
        m = dequantize_blockwise(exp_avg_codes[i], exp_avg_absmax[i], qmap_signed)
        v = dequantize_blockwise(exp_avg_sq_codes[i], exp_avg_sq_absmax[i], qmap_unsigned)
        m, v, u = direction(p, g, m, v, eps, c)
        scale = trust_scale(p, u, lr, use_trust_ratio, max_trust_ratio)
        p = p - u * scale
        param.copy_(p.view(param.shape))
        for codes, absmax, x, qmap in ((exp_avg_codes[i], exp_avg_absmax[i], m, qmap_signed),
                                       (exp_avg_sq_codes[i], exp_avg_sq_absmax[i], v, qmap_unsigned)):
            cq, a = quantize_blockwise(x, qmap)
            codes.copy_(cq.view(codes.shape))
            absmax.copy_(a)
