"""Plain-PyTorch batch norm + residual + activation: the kernel contract of csrc/batch_norm.h, serving as the
`reference` backend.

    training: mean, var = biased batch moments per channel, running stats updated in place (unbiased var)
    eval:     mean, var = running_mean, running_var
    z = (x - mean) * invstd * weight + bias + residual, y = act(z)

Half types compute in float32 and round once at the end; mean and invstd come back in float32 (float64 for float64
x). Outputs come back in x's memory format.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from mltoolkit.ops.reference.conv import ACTIVATIONS, OUTPUT_DERIVABLE, activation, activation_backward


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last (4-D) / channels_last_3d (5-D) when `t` is dense in it and torch would call it so (tensors that
    are both, C = 1 or spatial size 1, are told apart by their strides as torch's suggest_memory_format does), else
    contiguous_format."""
    for dims, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dims and t.is_contiguous(memory_format=fmt) and suggest_memory_format(t) == fmt:
            return fmt
    return torch.contiguous_format


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _pre_activation(xc: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor]) -> Tensor:
    """z = (x - mean) * invstd * weight + bias + residual, given xc = x - mean in the compute dtype."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    z = xc * _per_channel(scale, xc)
    if bias is not None:
        z = z + _per_channel(bias.to(invstd.dtype), xc)
    if residual is not None:
        z = z + residual.to(invstd.dtype)
    return z


def batch_norm_act_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                           momentum: float, eps: float, activation_name: str,
                           residual: Optional[Tensor]) -> list[Tensor]:
    """[y, mean, invstd]; updates running_mean / running_var in place in training mode."""
    if activation_name not in ACTIVATIONS:
        raise ValueError(f"batch_norm_act_forward: activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activation_name!r}")
    ct = stat_dtype(x.dtype)
    xf = x.to(ct)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if training:
        if count == 1:
            raise ValueError(f"batch_norm_act_forward: expected more than 1 value per channel when training, got "
                             f"input of shape {list(x.shape)}")
        if count == 0:
            mean = xf.new_zeros(x.shape[1])
            var = xf.new_zeros(x.shape[1])
        else:
            var, mean = torch.var_mean(xf, _reduce_dims(x), correction=0)
            if running_mean is not None:
                with torch.no_grad():
                    running_mean.copy_((1 - momentum) * running_mean.to(ct) + momentum * mean)
                    running_var.copy_((1 - momentum) * running_var.to(ct) + momentum * var * count / (count - 1))
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm_act_forward: running_mean and running_var must be given in evaluation mode")
        mean, var = running_mean.to(ct).clone(), running_var.to(ct)
    invstd = torch.rsqrt(var + eps)
    z = _pre_activation(xf - _per_channel(mean, xf), invstd, weight, bias, residual)
    y = activation(z, activation_name).to(x.dtype).contiguous(memory_format=memory_format(x))
    return [y, mean, invstd]


def batch_norm_act_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                            invstd: Tensor, residual: Optional[Tensor], training: bool, activation_name: str,
                            output_mask: Sequence[bool]) -> list[Optional[Tensor]]:
    """[dx, dweight, dbias, dresidual], each None unless asked for (output_mask = x, weight, bias, residual)."""
    ct = stat_dtype(x.dtype)
    fmt = memory_format(x)
    xc = x.to(ct) - _per_channel(mean.to(ct), x)
    invstd = invstd.to(ct)
    z = _pre_activation(xc, invstd, weight, bias, residual)
    y = activation(z, activation_name) if activation_name in OUTPUT_DERIVABLE else None
    dz = activation_backward(dy.to(ct), z, y, activation_name)
    dims = _reduce_dims(x)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    sum_dz = dz.sum(dims)
    sum_dz_xhat = (dz * xc).sum(dims) * invstd
    dx = dweight = dbias = dresidual = None
    if output_mask[0]:
        scale = invstd if weight is None else invstd * weight.to(ct)
        g = dz
        if training and count > 0:
            g = dz - _per_channel(sum_dz / count, x) - xc * _per_channel(invstd * sum_dz_xhat / count, x)
        dx = (g * _per_channel(scale, x)).to(x.dtype).contiguous(memory_format=fmt)
    if output_mask[1]:
        dweight = sum_dz_xhat.to(weight.dtype if weight is not None else x.dtype)
    if output_mask[2]:
        dbias = sum_dz.to(bias.dtype if bias is not None else x.dtype)
    if output_mask[3]:
        dresidual = dz.to(x.dtype, copy=True).contiguous(memory_format=fmt)  # with "none", dz may be dy itself
    return [dx, dweight, dbias, dresidual]
