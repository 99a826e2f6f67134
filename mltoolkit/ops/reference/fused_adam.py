"""Plain-PyTorch AdamW step over lists of tensors: torch.optim.AdamW's single-tensor (for-loop) arithmetic, op for
op, so that on float32 it gives torch's parameters bit for bit. The oracle of mltoolkit.ops.fused_adam and its
fallback backend (any dtype, any strides, any device)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def step_coefficients(step: float, lr: float, beta1: float, beta2: float, weight_decay: float):
    """Host scalars of one tensor's update, in Python float (double) arithmetic exactly as torch.optim.AdamW:
    (decay = 1 - lr * wd, step_size = lr / (1 - beta1^step), bias_correction2_sqrt = (1 - beta2^step) ** 0.5)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return 1 - lr * weight_decay, lr / bias_correction1, bias_correction2**0.5


@torch.no_grad()
def fused_adamw_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor],
                 lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool,
                 maximize: bool) -> None:
    """One AdamW step for every i, in place: state_steps[i] += 1, then params[i], exp_avgs[i], exp_avg_sqs[i]
    (and max_exp_avg_sqs[i] when amsgrad) are updated as torch.optim.AdamW(foreach=False) does."""
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        step_t += 1
        step = step_t.item()
        decay, step_size, bias_correction2_sqrt = step_coefficients(step, lr, beta1, beta2, weight_decay)
        if weight_decay != 0:
            param.mul_(decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
