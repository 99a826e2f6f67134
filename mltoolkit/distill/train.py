"""distill(student, teacher, loader, optimizer): the training loop of knowledge distillation. The teacher runs in
eval mode under no_grad; the student trains on DistillationLoss (plus, optionally, a FeatureDistiller's feature
loss); the losses come back as a history."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from mltoolkit.distill.features import FeatureDistiller
from mltoolkit.distill.loss import DistillationLoss, DistillationOutput

_LABEL_KEYS = ("labels", "label", "target", "targets")


@dataclasses.dataclass
class DistillHistory:
    """Per optimizer step: the total loss, its soft (T^2-scaled KL) and hard (cross-entropy) parts, unweighted, and
    the feature loss (0 without a FeatureDistiller); per epoch: the mean total loss and the learning rate of the
    first parameter group at the end of the epoch."""
    loss: list[float] = dataclasses.field(default_factory=list)
    soft: list[float] = dataclasses.field(default_factory=list)
    hard: list[float] = dataclasses.field(default_factory=list)
    feature: list[float] = dataclasses.field(default_factory=list)
    epoch_loss: list[float] = dataclasses.field(default_factory=list)
    lr: list[float] = dataclasses.field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.loss)

    def __str__(self) -> str:
        if not self.loss:
            return "DistillHistory(no steps)"
        epochs = ", ".join(f"{v:.4f}" for v in self.epoch_loss)
        return f"DistillHistory({self.steps} steps, {len(self.epoch_loss)} epochs, mean loss per epoch: {epochs})"


def split_batch(batch) -> tuple[Any, Optional[Tensor]]:
    """The default batch_fn: (inputs, target) from a data-loader batch. A tensor is inputs without a target; a tuple
    or list is (inputs..., target) (one element: inputs only); a dict passes its items as keyword inputs, with the
    target taken out of "labels" / "label" / "target" / "targets"."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        inputs = dict(batch)
        target = None
        for key in _LABEL_KEYS:
            if key in inputs:
                target = inputs.pop(key)
                break
        return inputs, target
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) > 2:
            return tuple(batch[:-1]), batch[-1]
    raise TypeError(f"distill: cannot split a batch of type {type(batch).__name__} into inputs and target; pass "
                    f"batch_fn=lambda batch: (inputs, target)")


def default_logits(output) -> Tensor:
    """The default logits_fn: the model output if it is a tensor, else its .logits / ["logits"] / first element."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"distill: cannot find logits in a model output of type {type(output).__name__}; pass "
                    f"logits_fn=")


def _to(obj, device: torch.device):
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=obj.is_pinned())
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def distill(student: nn.Module, teacher: nn.Module, train_loader: Iterable, optimizer: torch.optim.Optimizer, *,
            epochs: int = 1, loss: Optional[Callable] = None, features: Optional[FeatureDistiller] = None,
            feature_weight: float = 1.0, device: Union[str, torch.device, None] = None,
            scheduler: Optional[Any] = None, scheduler_interval: str = "epoch", log_every: Optional[int] = None,
            log_fn: Callable[[str], None] = print, amp: Union[bool, torch.dtype] = False,
            max_grad_norm: Optional[float] = None, max_steps: Optional[int] = None,
            batch_fn: Callable = split_batch, logits_fn: Callable = default_logits) -> DistillHistory:
    """Trains `student` to imitate the frozen `teacher` over `epochs` passes of `train_loader`:

        history = distill(student, teacher, loader, torch.optim.AdamW(student.parameters(), 1e-3), epochs=10,
                          loss=DistillationLoss(temperature=4.0, alpha=0.9))

    Each step runs the teacher in eval mode under torch.no_grad, the student in train mode, and minimises
    loss(student_logits, teacher_logits, target) (default DistillationLoss(); any callable returning a tensor or a
    DistillationOutput works) plus feature_weight * features() when a FeatureDistiller of these two models is
    given (its projections must be in the optimizer). The teacher gets no gradient and no optimizer step; the
    optimizer must not hold its parameters.

    device: where to train (both models are moved there, in place, and every batch); default the student's device.
    scheduler: stepped every epoch (scheduler_interval="epoch", ReduceLROnPlateau gets the epoch's mean loss) or
    every optimizer step ("batch"). amp: True or a dtype runs the forwards under torch.autocast (True: bfloat16 on
    CPU, float16 on CUDA, with a GradScaler for float16); the loss is computed in float32. max_grad_norm clips the
    student's gradient norm; max_steps stops after that many steps in all. log_every=N calls log_fn with a progress
    line every N steps and at the end of every epoch. batch_fn(batch) -> (inputs, target) and logits_fn(output) ->
    logits adapt other batch and output layouts (see split_batch and default_logits; dict inputs are passed as
    keyword arguments, tuples as positional ones). Both models are left in the train / eval mode they had.
    Returns a DistillHistory of per-step and per-epoch losses."""
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"distill: {name} must be an nn.Module, got {type(model).__name__}")
    if student is teacher:
        raise ValueError("distill: student and teacher are the same module")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"distill: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"distill: epochs must be a positive int, got {epochs!r}")
    if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1):
        raise ValueError(f"distill: log_every must be a positive int or None, got {log_every!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"distill: max_steps must be a positive int or None, got {max_steps!r}")
    if scheduler_interval not in ("epoch", "batch"):
        raise ValueError(f"distill: scheduler_interval must be 'epoch' or 'batch', got {scheduler_interval!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"distill: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    if loss is None:
        loss = DistillationLoss()
    elif not callable(loss):
        raise TypeError(f"distill: loss must be callable (e.g. DistillationLoss), got {type(loss).__name__}")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(p) in optimized for p in teacher.parameters()):
        raise ValueError("distill: the optimizer holds parameters of the teacher, which must stay frozen; build it "
                         "from student.parameters() (and features.parameters())")
    if features is not None:
        if not isinstance(features, FeatureDistiller):
            raise TypeError(f"distill: features must be a FeatureDistiller, got {type(features).__name__}")
        if features.student is not student or features.teacher is not teacher:
            raise ValueError("distill: features was built for another student or teacher")
        missing = [n for n, p in features.named_parameters() if p.requires_grad and id(p) not in optimized]
        if missing:
            raise ValueError(f"distill: the optimizer does not hold the feature projections' parameters {missing}; "
                             f"add features.parameters() to it")
    if not any(id(p) in optimized for p in student.parameters()):
        raise ValueError("distill: the optimizer holds none of the student's parameters")

    device = torch.device(device) if device is not None else _model_device(student)
    student.to(device)
    teacher.to(device)
    if features is not None:
        features.to(device)
    amp_dtype = None
    if amp is True:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    elif isinstance(amp, torch.dtype):
        amp_dtype = amp
    elif amp is not False:
        raise ValueError(f"distill: amp must be a bool or a torch.dtype, got {amp!r}")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    clip_params = [p for group in optimizer.param_groups for p in group["params"]]

    history = DistillHistory()
    modes = (student.training, teacher.training)
    attached_here = features is not None and not features.attached
    if attached_here:
        features.attach()
    student.train()
    teacher.eval()
    step = 0
    try:
        for epoch in range(epochs):
            per_step: list[Tensor] = []
            epoch_steps = 0
            for batch in train_loader:
                inputs, target = batch_fn(batch)
                inputs, target = _to(inputs, device), _to(target, device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    with torch.no_grad():
                        teacher_logits = logits_fn(_call(teacher, inputs))
                    student_logits = logits_fn(_call(student, inputs))
                    if features is not None:
                        feature_loss = features()
                # the loss outside autocast: DistillationLoss upcasts half logits to float32 itself
                if isinstance(loss, DistillationLoss):
                    out = loss(student_logits, teacher_logits, target, return_parts=True)
                else:
                    out = loss(student_logits, teacher_logits, target)
                if isinstance(out, DistillationOutput):
                    total, soft, hard = out
                else:
                    total = out
                    soft = hard = torch.zeros((), device=device)
                if total.dim() != 0:
                    raise ValueError(f"distill: the loss must be a scalar, got shape {tuple(total.shape)} (use "
                                     f"reduction='mean' or 'sum')")
                if features is not None:
                    total = total + feature_weight * feature_loss.float()
                else:
                    feature_loss = torch.zeros((), device=device)

                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(clip_params, max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None and scheduler_interval == "batch" and not plateau:
                    scheduler.step()

                # one device sync per epoch (and per log line), not per step
                per_step.append(torch.stack([total.detach().float(), soft.detach().float(),
                                             hard.detach().float(), feature_loss.detach().float()]))
                step += 1
                epoch_steps += 1
                if log_every is not None and step % log_every == 0:
                    values = per_step[-1].tolist()
                    log_fn(f"distill: epoch {epoch + 1}/{epochs} step {step}: loss {values[0]:.4f} (soft "
                           f"{values[1]:.4f}, hard {values[2]:.4f}, feature {values[3]:.4f}) lr "
                           f"{optimizer.param_groups[0]['lr']:.3g}")
                if max_steps is not None and step >= max_steps:
                    break
            if not per_step:
                if epoch == 0:
                    raise ValueError("distill: train_loader gave no batches")
                break
            values = torch.stack(per_step).cpu()
            history.loss += values[:, 0].tolist()
            history.soft += values[:, 1].tolist()
            history.hard += values[:, 2].tolist()
            history.feature += values[:, 3].tolist()
            mean = values[:, 0].mean().item()
            history.epoch_loss.append(mean)
            if plateau:
                scheduler.step(mean)
            elif scheduler is not None and scheduler_interval == "epoch":
                scheduler.step()
            history.lr.append(optimizer.param_groups[0]["lr"])
            if log_every is not None:
                log_fn(f"distill: epoch {epoch + 1}/{epochs} done, {epoch_steps} steps, mean loss {mean:.4f}")
            if max_steps is not None and step >= max_steps:
                break
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
        if attached_here:
            features.remove()
        elif features is not None:
            features.clear()
    return history
