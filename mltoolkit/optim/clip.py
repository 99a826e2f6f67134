"""Global-norm gradient clipping on the fused op torch.ops.mltoolkit.fused_clip_grad_norm_.

clip_grad_norm_ is a drop-in for torch.nn.utils.clip_grad_norm_: the total norm over all gradients, then every
gradient scaled in place by min(1, max_norm / (total_norm + 1e-6)); returns the total norm. norm_type 2 and inf
run fused (one op for all gradients of one device); other norm types, gradients on several devices, and
foreach=False go to torch.nn.utils.clip_grad_norm_ unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional, Union

import torch
from torch import Tensor

from mltoolkit.ops.fused_lamb import fused_clip_grad_norm_

_Params = Union[Tensor, Iterable[Tensor]]


def clip_grad_norm_(parameters: _Params, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None) -> Tensor:
    """Clips the gradients of `parameters` (a tensor or an iterable of tensors) to a total norm of max_norm."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        parameters = list(parameters)
    for i, p in enumerate(parameters):
        if not isinstance(p, Tensor):
            raise TypeError(f"clip_grad_norm_: parameters[{i}] must be a tensor, got {type(p).__name__}")
    if isinstance(max_norm, Tensor):
        max_norm = float(max_norm.item())
    max_norm, norm_type = float(max_norm), float(norm_type)
    grads = [p.grad for p in parameters if p.grad is not None]
    from mltoolkit.distributed._dtensor import any_dtensor, clip_grad_norm_sharded
    if any_dtensor(grads):  # FSDP2 / tensor parallel: the norm over the full tensors, all-reduced across ranks
        return clip_grad_norm_sharded(parameters, max_norm, norm_type, error_if_nonfinite)
    fused = norm_type == 2.0 or (math.isinf(norm_type) and norm_type > 0)
    if not grads or not fused or foreach is False or len({g.device for g in grads}) > 1 \
            or any(g.is_sparse or not g.is_floating_point() for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    if len({g.dtype for g in grads}) > 1:
        # torch returns the total in float32 for mixed dtypes; the fused kernels take one dtype.
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    return fused_clip_grad_norm_(grads, max_norm, norm_type, error_if_nonfinite)
