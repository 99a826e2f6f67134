"""Plain-PyTorch 2-D convolution: the kernel contract of csrc/conv.h, serving as the `reference` backend.

    y[n, k, p, q] = bias[k] + sum_{c in group(k), r, s} x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] * w[k, c', r, s]

Forward is F.conv2d followed by the fused epilogue act(conv + bias + residual); backward spells out the two
transposed convolutions through torch.nn.grad and sums dy for
the bias. Half types compute in float32 (as the kernels accumulate) and round once at the end. Outputs come back
in x's memory format (dweight in weight's), as the contract asks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format


def _hardswish(z: Tensor) -> Tensor:
    # F.hardswish's formula written out: torch's CUDA kernel multiplies by 1/6 rounded to float32 even for float64
    # input (a relative error of 3e-8), which would make a float64 reference on the GPU inexact.
    return z * (z + 3).clamp(0, 6) / 6


# The epilogue activations of the kernels (csrc/conv_epilogue.h): torch's functions, hardswish's written out.
ACTIVATIONS = {
    "none": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "hardswish": _hardswish,
}
# Activations whose derivative can be read off their output (no need to keep or recompute the input).
OUTPUT_DERIVABLE = ("none", "relu", "relu6")


def activation(z: Tensor, name: str) -> Tensor:
    return ACTIVATIONS[name](z)


def activation_backward(dy: Tensor, z: Optional[Tensor], y: Optional[Tensor], name: str) -> Tensor:
    """dy * act'(z), the formulas of torch's own backward kernels (including their values at the kinks). relu and
    relu6 read the derivative off the output y, the others need the input z."""
    if name == "none":
        return dy
    if name == "relu":
        return dy * (y > 0)
    if name == "relu6":  # hardtanh's backward: strictly inside (0, 6)
        return dy * ((y > 0) & (y < 6))
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if name == "silu":
        s = torch.sigmoid(zf)
        d = s * (1 + zf * (1 - s))
    elif name == "gelu":
        d = 0.5 * (1 + torch.erf(zf * 0.5 ** 0.5)) + zf * torch.exp(-0.5 * zf * zf) / math.sqrt(2 * math.pi)
    elif name == "gelu_tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (zf + 0.044715 * zf ** 3))
        d = 0.5 * (1 + t) + 0.5 * zf * (1 - t * t) * k * (1 + 3 * 0.044715 * zf * zf)
    elif name == "hardswish":
        d = torch.where(zf < -3, 0.0, torch.where(zf <= 3, zf / 3 + 0.5, 1.0))
    else:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return (dy * d).to(dy.dtype)


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last when `t` is dense NHWC, else contiguous_format. Tensors that are both (C = 1, or H = W = 1)
    are told apart by their strides as torch's suggest_memory_format does, so outputs match F.conv2d's."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    if not t.is_contiguous():
        return torch.channels_last
    # Both layouts at once: torch's rule (slow, Python) decides; only here, as conv calls this on every tensor.
    return torch.channels_last if suggest_memory_format(t) == torch.channels_last else torch.contiguous_format


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def output_size(h: int, w: int, r: int, s: int, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> tuple[int, int]:
    """(P, Q) = ((H + 2ph - dh(R-1) - 1) // sh + 1, likewise for W)."""
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def conv2d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int, residual: Optional[Tensor] = None,
                   activation_name: str = "none") -> list[Tensor]:
    """x (N, C, H, W), weight (K, C/groups, R, S), bias (K,) or None, residual (N, K, P, Q) or None ->
    [y = act(conv + bias + residual)] in x's memory format."""
    if activation_name not in ACTIVATIONS:
        raise ValueError(f"conv2d_forward: activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activation_name!r}")
    ct = compute_dtype(x.dtype)
    b = None if bias is None else bias.to(ct)
    y = F.conv2d(x.to(ct), weight.to(ct), b, list(stride), list(padding), list(dilation), groups)
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(f"conv2d_forward: residual must have the output's shape {list(y.shape)}, got "
                             f"{list(residual.shape)}")
        y = y + residual.to(ct)
    y = activation(y, activation_name)
    return [y.to(x.dtype).contiguous(memory_format=memory_format(x))]


def conv2d_backward(dy: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, output_mask: Sequence[bool]) -> list[Optional[Tensor]]:
    """[dx, dweight, dbias], each None unless asked for by output_mask = (x, weight, bias).

    dx = conv_transpose2d(dy, w) (the cropped full correlation with the flipped kernel), dweight = the correlation
    of x with dy per group, dbias = dy summed over (N, P, Q).
    """
    ct = compute_dtype(x.dtype)
    dyc, xc, wc = dy.to(ct), x.to(ct), weight.to(ct)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    dx = dw = db = None
    if output_mask[0]:
        dx = torch.nn.grad.conv2d_input(list(x.shape), wc, dyc, stride, padding, dilation, groups)
        dx = dx.to(x.dtype).contiguous(memory_format=memory_format(x))
    if output_mask[1]:
        dw = torch.nn.grad.conv2d_weight(xc, list(weight.shape), dyc, stride, padding, dilation, groups)
        dw = dw.to(weight.dtype).contiguous(memory_format=memory_format(weight))
    if output_mask[2]:
        db = dyc.sum(dim=(0, 2, 3)).to(x.dtype).contiguous()
    return [dx, dw, db]
