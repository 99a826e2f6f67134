"""Trainer callbacks: hooks into :class:`mltoolkit.train.Trainer`'s loop, with state that checkpoints keep.

    Callback                      base class; override the hooks you need (all optional, all get the trainer)
    EarlyStopping(monitor, ...)   stop fit when a monitored metric stops improving; its counters survive a resume
    BestCheckpoint(monitor, ...)  keep the checkpoint with the best monitored metric (atomic write, one file)
    LearningRateMonitor()         add every param group's lr (and momentum / beta1) to each logged row
    LambdaCallback(on_..=fn)      a callback from plain functions

Hooks, in the order the Trainer calls them (every process calls them, with metrics already averaged over
processes, so callbacks decide the same thing everywhere; only rank 0 writes logs):

    on_fit_start(trainer)                     after set-up and resume, before the first batch
    on_epoch_start(trainer, epoch)            before the epoch's first batch (also for a resumed, half-done epoch)
    on_train_batch_end(trainer, step, loss)   after each optimizer step (one per grad_accum_steps batches); `loss`
                                              is the step's mean loss as a detached tensor (no device sync)
    on_log(trainer, metrics)                  before a row goes to history and the loggers; may add keys to it
    on_evaluate_end(trainer, metrics)         after an evaluation inside fit (keys "eval/loss", "eval/<metric>")
    on_epoch_end(trainer, epoch, metrics)     after an epoch (metrics: that epoch's row)
    on_checkpoint_save(trainer, path)         after the Trainer wrote a checkpoint
    on_fit_end(trainer)                       after the last step and the final checkpoint

``state_dict()`` / ``load_state_dict()`` (plain Python values and tensors) are stored in the Trainer's checkpoints
and restored on resume. ``trainer.should_stop = True`` ends fit after the current step (cleanly: final evaluation,
final checkpoint, on_fit_end, loggers closed).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from mltoolkit.train.trainer import Trainer

__all__ = ["Callback", "EarlyStopping", "BestCheckpoint", "LearningRateMonitor", "LambdaCallback"]

HOOKS = ("on_fit_start", "on_fit_end", "on_epoch_start", "on_epoch_end", "on_train_batch_end", "on_log",
         "on_evaluate_end", "on_checkpoint_save")


class Callback:
    """Base class: every hook is a no-op. ``state_key`` names the callback's entry in a checkpoint (default: the
    class name; the Trainer appends ``#i`` when two callbacks share one)."""

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_train_batch_end(self, trainer: Trainer, step: int, loss: Any) -> None: ...

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_evaluate_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_checkpoint_save(self, trainer: Trainer, path: Optional[str]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


def _monitored(metrics: dict[str, Any], monitor: str, who: str) -> Optional[float]:
    if monitor not in metrics:
        raise KeyError(f"{who}: monitor={monitor!r} is not among the evaluation metrics {sorted(metrics)}")
    value = float(metrics[monitor])
    return None if math.isnan(value) else value


class _Monitor(Callback):
    """Shared logic: is a value an improvement over the best so far (by more than min_delta)?"""

    def __init__(self, monitor: str, mode: str, min_delta: float) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be a metric name such as 'eval/loss', got {monitor!r}")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.min_delta = monitor, _check_mode(mode), float(min_delta)
        self.best: Optional[float] = None

    def _improved(self, value: Optional[float]) -> bool:
        if value is None:  # nan never improves
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stop fit when ``monitor`` (an evaluation metric, e.g. "eval/loss" or "eval/accuracy") has not improved by more
    than ``min_delta`` for ``patience`` evaluations in a row. A NaN counts as no improvement. The counters (best,
    wait) are part of the Trainer's checkpoints, so a resumed run stops where the uninterrupted one would have."""

    def __init__(self, monitor: str = "eval/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0,
                 verbose: bool = True) -> None:
        super().__init__(monitor, mode, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.patience, self.verbose = patience, verbose
        self.wait = 0
        self.stopped_step: Optional[int] = None

    def on_evaluate_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = _monitored(metrics, self.monitor, "EarlyStopping")
        if self._improved(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_step = trainer.step
            trainer.should_stop = True
            if self.verbose:
                trainer.print(f"EarlyStopping: {self.monitor} did not improve on {self.best} for {self.wait} "
                              f"evaluations; stopping at step {trainer.step}")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.stopped_step = state["best"], int(state["wait"]), state["stopped_step"]


class BestCheckpoint(_Monitor):
    """Keep the Trainer checkpoint with the best ``monitor`` value: after each evaluation that improves it, write a
    full checkpoint (model, optimizer, ... as the Trainer's own) to ``dirpath`` (default
    ``<checkpoint_dir or log_dir>/best``) through a CheckpointManager with ``keep_last=1`` and prefix ``best``: the
    file is written to a temp file, fsync'ed and renamed, and the previous best is deleted only afterwards.
    ``best_path`` / ``best`` give the current best; ``load_best(model)`` loads its weights."""

    def __init__(self, monitor: str = "eval/loss", mode: str = "min", dirpath: Optional[str] = None,
                 min_delta: float = 0.0) -> None:
        super().__init__(monitor, mode, min_delta)
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.best_path: Optional[str] = None
        self.best_step: Optional[int] = None
        self._manager: Any = None

    def _mgr(self, trainer: Trainer) -> Any:
        if self._manager is None:
            from mltoolkit.train.checkpoint import CheckpointManager
            if self.dirpath is None:
                self.dirpath = os.path.join(trainer.checkpoint_dir or trainer.log_dir, "best")
            self._manager = CheckpointManager(self.dirpath, keep_last=1, prefix="best")
        return self._manager

    def on_evaluate_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = _monitored(metrics, self.monitor, "BestCheckpoint")
        if not self._improved(value):
            return
        self.best, self.best_step = value, trainer.step
        self.best_path = trainer.save_checkpoint(self._mgr(trainer), notify=False) or self.best_path

    def load_best(self, model: Any, **kwargs: Any) -> Any:
        """Load the best checkpoint's weights into ``model`` (kwargs go to CheckpointManager.load_latest)."""
        if self.dirpath is None:
            raise RuntimeError("BestCheckpoint.load_best: nothing saved yet")
        from mltoolkit.train.checkpoint import CheckpointManager
        kwargs.setdefault("restore_rng", False)
        return CheckpointManager(self.dirpath, keep_last=1, prefix="best").load_latest(model=model, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_path": self.best_path, "best_step": self.best_step, "dirpath": self.dirpath}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_path, self.best_step = state["best"], state["best_path"], state["best_step"]
        if self.dirpath is None:
            self.dirpath = state["dirpath"]


class LearningRateMonitor(Callback):
    """Add each param group's learning rate to every logged training row: ``lr/group0``, ``lr/group1``, ... (a
    group's ``"name"`` entry replaces ``group<i>``), and with ``log_momentum=True`` its momentum (SGD) or beta1
    (Adam-like) as ``momentum/<group>``."""

    def __init__(self, log_momentum: bool = False) -> None:
        self.log_momentum = log_momentum

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if "train/loss" not in metrics or trainer.optimizer is None:
            return
        for i, g in enumerate(trainer.optimizer.param_groups):
            name = str(g.get("name", f"group{i}"))
            metrics[f"lr/{name}"] = float(g["lr"])
            if self.log_momentum:
                m = g.get("momentum", g.get("betas", (None,))[0])
                if m is not None:
                    metrics[f"momentum/{name}"] = float(m)


class LambdaCallback(Callback):
    """A callback from functions: ``LambdaCallback(on_epoch_end=lambda trainer, epoch, metrics: ...)``."""

    def __init__(self, **hooks: Callable[..., Any]) -> None:
        unknown = sorted(set(hooks) - set(HOOKS))
        if unknown:
            raise TypeError(f"LambdaCallback: unknown hooks {unknown}; known: {list(HOOKS)}")
        for name, fn in hooks.items():
            if not callable(fn):
                raise TypeError(f"LambdaCallback: {name} must be callable, got {type(fn).__name__}")
            setattr(self, name, fn)
