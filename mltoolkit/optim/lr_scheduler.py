"""Learning-rate schedules (issue 6, part 2): linear warmup, then cosine / linear / polynomial / inverse-sqrt /
constant decay; a warmup wrapper around any scheduler; one-cycle; a factory by name.

All are ``torch.optim.lr_scheduler.LRScheduler`` subclasses, so they work with any optimizer and have ``step()``,
``get_last_lr()``, ``state_dict()`` / ``load_state_dict()``. Step ``t`` is the scheduler's ``last_epoch``: 0 after
construction, +1 at each ``scheduler.step()`` (call it once per optimizer step, after ``optimizer.step()``).

With ``W = warmup_steps``, ``T = total_steps``, ``base`` a param group's initial lr and ``floor`` its minimum lr
(``min_lr`` if given, else ``min_lr_ratio * base``), the lr of every group is, for ``t < W``::

    base * (start_factor + (1 - start_factor) * t / W)          # linear warmup; start_factor=0 gives lr 0 at t=0

and for ``t >= W``, with ``p = min(1, (t - W) / max(1, T - W))``::

    cosine       floor + (base - floor) * 0.5 * (1 + cos(pi * p))
    linear       floor + (base - floor) * (1 - p)
    polynomial   floor + (base - floor) * (1 - p) ** power
    constant     base
    inverse_sqrt max(floor, base * sqrt(tau / (t - W + tau)))   # tau = timescale, default max(W, 1): sqrt(W / t)

so the lr reaches ``base`` at ``t = W`` and ``floor`` at ``t = T`` (``W + 1`` if ``T = W``), and stays at
``floor`` after ``T``. The values are a closed form of ``t`` and the base lrs (not recursive), so resuming from
``state_dict`` is exact.

One-cycle is torch's ``OneCycleLR`` (it already is an LRScheduler with state_dict, and also cycles momentum);
``get_scheduler("one_cycle", opt, warmup_steps=W, total_steps=T)`` builds it with ``max_lr`` = the groups' current
lrs and ``pct_start = W / T``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR

__all__ = [
    "WarmupDecayLR", "WarmupCosineLR", "WarmupLinearLR", "WarmupPolynomialLR", "WarmupInverseSqrtLR",
    "WarmupConstantLR", "WarmupLR", "get_scheduler", "SCHEDULERS", "DECAYS",
]

DECAYS = ("cosine", "linear", "polynomial", "inverse_sqrt", "constant")
_NEEDS_TOTAL = ("cosine", "linear", "polynomial")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _warmup_factor(t: int, warmup_steps: int, start_factor: float) -> float:
    return start_factor + (1.0 - start_factor) * t / warmup_steps


class WarmupDecayLR(LRScheduler):
    """Linear warmup over ``warmup_steps``, then ``decay`` (one of :data:`DECAYS`) down to the floor at
    ``total_steps`` (formulas in the module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer``; each param group keeps its own base lr.
        warmup_steps: steps of linear warmup (0: none).
        total_steps: step at which the decay reaches the floor; required for cosine / linear / polynomial,
            ignored by constant and inverse_sqrt.
        decay: "cosine", "linear", "polynomial", "inverse_sqrt" or "constant".
        min_lr: absolute floor (a float for all groups, or one per group); overrides ``min_lr_ratio``.
        min_lr_ratio: floor as a fraction of each group's base lr (default 0).
        power: exponent of the polynomial decay (1 = linear).
        start_factor: warmup starts at ``start_factor * base`` (default 0, as in HF transformers).
        timescale: inverse-sqrt timescale tau (default ``max(warmup_steps, 1)``).
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: Optional[int] = None,
                 decay: str = "cosine", *, min_lr: Union[float, Sequence[float], None] = None,
                 min_lr_ratio: float = 0.0, power: float = 1.0, start_factor: float = 0.0,
                 timescale: Optional[float] = None, last_epoch: int = -1) -> None:
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}; got {decay!r}")
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if total_steps is not None:
            _check_int("total_steps", total_steps, 0)
            if total_steps < warmup_steps:
                raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
        elif decay in _NEEDS_TOTAL:
            raise ValueError(f"total_steps is required for decay={decay!r}")
        self.total_steps = total_steps
        self.decay = decay
        self.min_lr_ratio = _check_unit("min_lr_ratio", min_lr_ratio)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or power <= 0:
            raise ValueError(f"power must be a positive number, got {power!r}")
        self.power = float(power)
        self.start_factor = _check_unit("start_factor", start_factor)
        if timescale is not None and (not isinstance(timescale, (int, float)) or timescale <= 0):
            raise ValueError(f"timescale must be a positive number, got {timescale!r}")
        self.timescale = float(timescale) if timescale is not None else float(max(warmup_steps, 1))
        n = len(optimizer.param_groups)
        if min_lr is None:
            self.min_lrs: Optional[list[float]] = None
        else:
            mins = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * n
            if len(mins) != n:
                raise ValueError(f"min_lr has {len(mins)} values but the optimizer has {n} param groups")
            if any(not isinstance(m, (int, float)) or m < 0 for m in mins):
                raise ValueError(f"min_lr must be non-negative numbers, got {min_lr!r}")
            self.min_lrs = [float(m) for m in mins]
        super().__init__(optimizer, last_epoch)

    # the shape of the decay, 1 at t = W going to 0 at t = T (or the inverse-sqrt factor)
    def _decay_shape(self, t: int) -> float:
        w = self.warmup_steps
        if self.decay == "constant":
            return 1.0
        if self.decay == "inverse_sqrt":
            return math.sqrt(self.timescale / (t - w + self.timescale))
        p = min(1.0, (t - w) / max(1, self.total_steps - w))
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if self.decay == "linear":
            return 1.0 - p
        return (1.0 - p) ** self.power

    def lr_at(self, t: int) -> list[float]:
        """The lrs of all param groups at step ``t`` (closed form; does not change the scheduler)."""
        out = []
        for i, base in enumerate(self.base_lrs):
            base = float(base)
            floor = self.min_lrs[i] if self.min_lrs is not None else self.min_lr_ratio * base
            if t < self.warmup_steps:
                out.append(base * _warmup_factor(t, self.warmup_steps, self.start_factor))
            elif self.decay == "inverse_sqrt":
                out.append(max(floor, base * self._decay_shape(t)))
            elif self.decay == "constant":
                out.append(base)
            else:
                out.append(floor + (base - floor) * self._decay_shape(t))
        return out

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)


class WarmupCosineLR(WarmupDecayLR):
    """Linear warmup, then cosine decay to the floor at ``total_steps``."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, **kw: Any) -> None:
        super().__init__(optimizer, warmup_steps, total_steps, "cosine", **kw)


class WarmupLinearLR(WarmupDecayLR):
    """Linear warmup, then linear decay to the floor at ``total_steps``."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, **kw: Any) -> None:
        super().__init__(optimizer, warmup_steps, total_steps, "linear", **kw)


class WarmupPolynomialLR(WarmupDecayLR):
    """Linear warmup, then ``(1 - p) ** power`` decay to the floor at ``total_steps``."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, power: float = 1.0,
                 **kw: Any) -> None:
        super().__init__(optimizer, warmup_steps, total_steps, "polynomial", power=power, **kw)


class WarmupInverseSqrtLR(WarmupDecayLR):
    """Linear warmup, then ``base * sqrt(tau / (t - W + tau))`` (the Transformer schedule for tau = W)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: Optional[int] = None,
                 **kw: Any) -> None:
        super().__init__(optimizer, warmup_steps, total_steps, "inverse_sqrt", **kw)


class WarmupConstantLR(WarmupDecayLR):
    """Linear warmup, then the base lr."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: Optional[int] = None,
                 **kw: Any) -> None:
        super().__init__(optimizer, warmup_steps, total_steps, "constant", **kw)


class WarmupLR(LRScheduler):
    """Linear warmup in front of any other scheduler (torch's or ours, recursive or closed-form).

    ``inner`` must be freshly built on the same optimizer (``last_epoch=-1``, not stepped yet). For ``t < W`` the lr
    is ``inner_lr0 * (start_factor + (1 - start_factor) * t / W)``, where ``inner_lr0`` is the lr the inner
    scheduler set at its step 0; at ``t = W`` the lr is ``inner_lr0`` and from then on each ``step()`` steps the
    inner scheduler, which thus runs its own step ``t - W``, unshifted. (Unlike torch's ``SequentialLR``, recursive
    schedulers such as ``CosineAnnealingLR`` or ``ExponentialLR`` see exactly the lrs they set themselves.)
    ``state_dict`` holds the inner scheduler's state.

        sched = WarmupLR(opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99), warmup_steps=100)
    """

    def __init__(self, optimizer: Optimizer, inner: LRScheduler, warmup_steps: int, start_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        if not isinstance(inner, LRScheduler):
            raise TypeError(f"inner must be an LRScheduler, got {type(inner).__name__}")
        if inner.optimizer is not optimizer:
            raise ValueError("inner must be a scheduler of the same optimizer")
        if inner.last_epoch != 0:
            raise ValueError(f"inner must be freshly built (last_epoch 0), got last_epoch={inner.last_epoch}")
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.start_factor = _check_unit("start_factor", start_factor)
        self.inner = inner
        self.inner_lr0 = [float(lr) for lr in inner.get_last_lr()]
        super().__init__(optimizer, last_epoch)

    def step(self, epoch: None = None) -> None:  # type: ignore[override]
        if epoch is not None:
            raise TypeError("WarmupLR.step() takes no epoch argument")
        self._step_count = getattr(self, "_step_count", 0) + 1
        self.last_epoch += 1
        t, w = self.last_epoch, self.warmup_steps
        if t < w:
            lrs = [lr0 * _warmup_factor(t, w, self.start_factor) for lr0 in self.inner_lr0]
        elif t == w:
            lrs = list(self.inner_lr0)
        else:
            self.inner.step()
            lrs = None
        if lrs is not None:
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "inner")}
        state["inner"] = self.inner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        inner = state.pop("inner")
        self.__dict__.update(state)
        self.inner.load_state_dict(inner)


def _one_cycle(optimizer: Optimizer, warmup_steps: int, total_steps: Optional[int], **kw: Any) -> OneCycleLR:
    if total_steps is None or total_steps < 1:
        raise ValueError("total_steps (>= 1) is required for 'one_cycle'")
    kw.setdefault("max_lr", [float(g["lr"]) for g in optimizer.param_groups])
    kw.setdefault("pct_start", warmup_steps / total_steps if warmup_steps else 0.3)
    if "cycle_momentum" not in kw:
        kw["cycle_momentum"] = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
    return OneCycleLR(optimizer, total_steps=total_steps, **kw)


SCHEDULERS = {
    "cosine": WarmupCosineLR,
    "linear": WarmupLinearLR,
    "polynomial": WarmupPolynomialLR,
    "inverse_sqrt": WarmupInverseSqrtLR,
    "constant": WarmupConstantLR,
    "one_cycle": _one_cycle,
}


def get_scheduler(name: str, optimizer: Optimizer, warmup_steps: int = 0, total_steps: Optional[int] = None,
                  **kw: Any) -> LRScheduler:
    """Build a schedule by name: one of :data:`SCHEDULERS` ("cosine", "linear", "polynomial", "inverse_sqrt",
    "constant", "one_cycle"). Extra keyword arguments go to the class (``min_lr_ratio``, ``min_lr``, ``power``,
    ``start_factor``, ``timescale``; for one_cycle those of ``torch.optim.lr_scheduler.OneCycleLR``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known schedulers: {', '.join(sorted(SCHEDULERS))}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return SCHEDULERS[key](optimizer, warmup_steps=warmup_steps, total_steps=total_steps, **kw)

