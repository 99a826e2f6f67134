"""Knowledge-distillation loss on logits (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network"): a temperature-softened KL divergence from the teacher's distribution to the student's, scaled by T^2 so
that its gradients keep their size as T changes, mixed with the ordinary cross-entropy on the hard labels."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_REDUCTIONS = ("mean", "sum", "none")


class DistillationOutput(NamedTuple):
    """The total loss and its two parts, unweighted (for logging): `soft` is T^2 * KL(teacher || student) at
    temperature T, `hard` the cross-entropy on the labels (zero when no target was given). With the same reduction,
    loss = alpha * soft + (1 - alpha) * hard."""
    loss: Tensor
    soft: Tensor
    hard: Tensor


def _check_config(temperature: float, alpha: float, reduction: str, label_smoothing: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number in [0, 1], got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the distillation term), got {alpha}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _count(count, dtype: torch.dtype):
    if isinstance(count, Tensor):
        return count.clamp(min=1).to(dtype)
    return max(int(count), 1)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      temperature: float = 4.0, alpha: float = 0.5, reduction: str = "mean",
                      ignore_index: int = -100, mask_soft: bool = True, label_smoothing: float = 0.0,
                      return_parts: bool = False):
    """Hinton distillation loss. The class dimension is the LAST one: logits of shape (N, C) or (N, ..., C)
    (a language model's (batch, seq, vocab)); target, when given, has shape logits.shape[:-1] and integer class
    indices.

        soft = T^2 * KL(softmax(teacher / T) || softmax(student / T))   per position, summed over classes
        hard = cross_entropy(student, target)                            per position (T = 1)
        loss = alpha * soft + (1 - alpha) * hard

    alpha is the weight of the distillation term: alpha = 1 is pure distillation (no target needed), alpha = 0 plain
    supervised training. The teacher's logits are detached: no gradient reaches the teacher through this loss.
    Positions whose target is `ignore_index` have no hard term; with `mask_soft` (default) they have no soft term
    either (padding), with mask_soft=False the teacher is still distilled there (unlabelled positions, as in
    semi-supervised distillation). reduction="mean" averages each term over the positions it counts (the KL is the
    "batchmean" of Hinton's loss, not a mean over classes; the cross-entropy matches F.cross_entropy's mean with
    ignore_index) and gives 0, not NaN, when a batch counts no position; "sum" sums; "none" returns per-position
    losses of shape logits.shape[:-1] (zero at excluded positions). Half and bfloat16 logits are upcast to float32,
    both distributions come from log_softmax (KL in log space), so large logits and zero probabilities are safe.
    return_parts=True returns a DistillationOutput(loss, soft, hard)."""
    _check_config(temperature, alpha, reduction, label_smoothing)
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a Tensor, got {type(student_logits).__name__}")
    if not isinstance(teacher_logits, Tensor):
        raise TypeError(f"teacher_logits must be a Tensor, got {type(teacher_logits).__name__}")
    if student_logits.dim() < 1 or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point with a class dimension last, got dtype "
                         f"{student_logits.dtype} and shape {tuple(student_logits.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape (..., num_classes), got "
                         f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)}")
    if not teacher_logits.is_floating_point():
        raise ValueError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got "
                         f"{student_logits.device} and {teacher_logits.device}")
    if target is None:
        if alpha < 1.0:
            raise ValueError(f"target is required when alpha < 1 (the hard-label term has weight 1 - alpha = "
                             f"{1.0 - alpha}); pass alpha=1.0 for pure distillation without labels")
    else:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a Tensor of class indices, got {type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
        if target.shape != student_logits.shape[:-1]:
            raise ValueError(f"target must have shape student_logits.shape[:-1] = "
                             f"{tuple(student_logits.shape[:-1])}, got target {tuple(target.shape)}")
        if target.device != student_logits.device:
            raise ValueError(f"target must be on the device of student_logits ({student_logits.device}), got "
                             f"{target.device}")

    # float32 arithmetic for half / bfloat16 logits; no copy when they already are float32 / float64
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    num_classes = student_logits.shape[-1]
    s = student_logits.to(compute_dtype).reshape(-1, num_classes)
    t = teacher_logits.detach().to(compute_dtype).reshape(-1, num_classes)
    positions = student_logits.shape[:-1]

    # soft term: KL(p_t || p_s) = sum p_t (log p_t - log p_s), with both in log space (no 0 * log 0)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * (temperature * temperature)

    if target is not None:
        flat_target = target.reshape(-1)
        valid = flat_target != ignore_index
        hard = F.cross_entropy(s, flat_target, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)
        if mask_soft:
            soft = torch.where(valid, soft, torch.zeros_like(soft))
            soft_count = valid.sum()
        else:
            soft_count = soft.shape[0]
        hard_count = valid.sum()
    else:
        hard = torch.zeros_like(soft)
        soft_count = hard_count = soft.shape[0]

    if reduction == "none":
        soft, hard = soft.reshape(positions), hard.reshape(positions)
    elif reduction == "sum":
        soft, hard = soft.sum(), hard.sum()
    else:  # mean over the counted positions; 0 (with a gradient of 0) when none is counted
        soft = soft.sum() / _count(soft_count, compute_dtype)
        hard = hard.sum() / _count(hard_count, compute_dtype)
    # the term with weight 0 is left out rather than multiplied by 0: 0 * inf would be NaN
    if alpha == 1.0:
        loss = soft
    elif alpha == 0.0:
        loss = hard
    else:
        loss = alpha * soft + (1.0 - alpha) * hard
    if return_parts:
        return DistillationOutput(loss, soft, hard)
    return loss


class DistillationLoss(nn.Module):
    """Module form of distillation_loss (see there for the formula, shapes and options):

        criterion = DistillationLoss(temperature=4.0, alpha=0.9)
        loss = criterion(student(x), teacher_logits, y)
        loss, soft, hard = criterion(student(x), teacher_logits, y, return_parts=True)   # parts for logging

    temperature > 0 softens both distributions (T = 1: the plain distributions); the soft term is multiplied by
    T^2. alpha in [0, 1] weighs the distillation term, 1 - alpha the hard-label cross-entropy. The class dimension
    is the last one."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, reduction: str = "mean", *,
                 ignore_index: int = -100, mask_soft: bool = True, label_smoothing: float = 0.0,
                 return_parts: bool = False):
        super().__init__()
        _check_config(temperature, alpha, reduction, label_smoothing)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.mask_soft = bool(mask_soft)
        self.label_smoothing = float(label_smoothing)
        self.return_parts = bool(return_parts)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                return_parts: Optional[bool] = None):
        return distillation_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                                 alpha=self.alpha, reduction=self.reduction, ignore_index=self.ignore_index,
                                 mask_soft=self.mask_soft, label_smoothing=self.label_smoothing,
                                 return_parts=self.return_parts if return_parts is None else return_parts)

    def extra_repr(self) -> str:
        extra = f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}"
        if self.ignore_index != -100:
            extra += f", ignore_index={self.ignore_index}"
        if not self.mask_soft:
            extra += ", mask_soft=False"
        if self.label_smoothing:
            extra += f", label_smoothing={self.label_smoothing}"
        return extra
