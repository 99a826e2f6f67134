"""Plain-PyTorch 2-D convolution: the kernel contract of csrc/conv.h, serving as the `reference` backend.

    y[n, k, p, q] = bias[k] + sum_{c in group(k), r, s} x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] * w[k, c', r, s]

Forward is F.conv2d; backward spells out the two transposed convolutions through torch.nn.grad and sums dy for
the bias. Half types compute in float32 (as the kernels accumulate) and round once at the end. Outputs come back
in x's memory format (dweight in weight's), as the contract asks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last when `t` is dense NHWC, else contiguous_format. Tensors that are both (C = 1, or H = W = 1)
    are told apart by their strides as torch's suggest_memory_format does, so outputs match F.conv2d's."""
    if (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and suggest_memory_format(t) == torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def output_size(h: int, w: int, r: int, s: int, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> tuple[int, int]:
    """(P, Q) = ((H + 2ph - dh(R-1) - 1) // sh + 1, likewise for W)."""
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def conv2d_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int) -> list[Tensor]:
    """x (N, C, H, W), weight (K, C/groups, R, S), bias (K,) or None -> [y (N, K, P, Q)] in x's memory format."""
    ct = compute_dtype(x.dtype)
    b = None if bias is None else bias.to(ct)
    y = F.conv2d(x.to(ct), weight.to(ct), b, list(stride), list(padding), list(dilation), groups)
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
