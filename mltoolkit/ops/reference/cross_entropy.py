"""Plain-PyTorch softmax cross-entropy: the kernel contract of csrc/cross_entropy.h with explicit formulas, the
`reference` backend of mltoolkit.ops.cross_entropy (tests compare against torch.nn.functional.cross_entropy)."""
from __future__ import annotations

import torch
from torch import Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row loss and logsumexp: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_targets(target: Tensor, classes: int, ignore_index: int) -> Tensor:
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"cross_entropy: target[{i}] = {int(target[i])} is out of bounds for {classes} classes "
                         f"(and is not ignore_index = {ignore_index})")
    return valid


def forward(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(loss, lse) per row: lse = logsumexp(x), loss = lse - (1 - e) x[t] - (e / C) sum(x), 0 on ignored rows."""
    x = logits.to(stat_dtype(logits.dtype))
    classes = x.shape[1]
    valid = _check_targets(target, classes, ignore_index)
    lse = torch.logsumexp(x, dim=1)
    x_t = x.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    loss = lse - (1.0 - label_smoothing) * x_t
    if label_smoothing:
        loss = loss - (label_smoothing / classes) * x.sum(dim=1)
    return torch.where(valid, loss, 0.0), lse


def backward(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
             label_smoothing: float) -> Tensor:
    """dlogits = dloss (softmax(x) - e / C - (1 - e) onehot(t)), 0 on ignored rows, in logits' dtype."""
    x = logits.to(lse.dtype)
    classes = x.shape[1]
    valid = _check_targets(target, classes, ignore_index)
    d = torch.exp(x - lse[:, None]) - label_smoothing / classes
    d.scatter_add_(1, torch.where(valid, target, 0)[:, None],
                   torch.full((x.shape[0], 1), label_smoothing - 1.0, dtype=d.dtype, device=d.device))
    d = torch.where(valid[:, None], d * dloss[:, None], 0.0)
    return d.to(logits.dtype).contiguous()
