"""mltoolkit.train.Trainer: a small, legible training loop with mixed precision, gradient accumulation, clipping,
gradient noise, LR schedules, evaluation and metrics, callbacks, loggers, a progress bar, crash-safe checkpoints with
exact resume, and a pluggable distribution Strategy.

    trainer = Trainer(model, lambda params: AdamW(params, lr=1e-3), train_loader, eval_loader=val_loader,
                      metrics={"accuracy": accuracy}, max_epochs=10, precision="bf16",
                      scheduler=lambda opt: WarmupCosineLR(opt, 100, 1000), loggers=("csv", "tensorboard"),
                      log_dir="runs/exp1", checkpoint_dir="runs/exp1/ckpt", checkpoint_every=200)
    history = trainer.fit()          # run again after a kill: it resumes from the latest checkpoint
    print(trainer.evaluate())        # {"eval/loss": ..., "eval/accuracy": ...}

Batches. A batch is
  * ``(inputs, targets)``: ``outputs = model(inputs)`` (``model(*inputs)`` for a tuple/list of inputs,
    ``model(**inputs)`` for a dict); ``(x1, x2, ..., targets)`` with more than two entries calls ``model(x1, x2, ...)``;
  * a dict: with a ``loss_fn``, the targets are popped from the first of the keys "labels", "label", "targets",
    "target", "y" and the rest goes to ``model(**batch)``; without one, the whole dict goes to the model (Hugging
    Face style: the model gets ``labels`` and returns its loss);
  * anything else (a tensor, a 1-tuple): ``model(batch)``, which must return the loss.
The loss is ``loss_fn(outputs, targets)`` when ``loss_fn`` is given; else the model's own loss (``outputs.loss``,
``outputs["loss"]``); else, with targets, cross-entropy for integer targets (class ids; class dimension 1, or last
when ``logits.shape[:-1] == targets.shape`` as for token sequences, ignore_index=-100) and MSE for float targets.
Metrics are ``callable(outputs, targets) -> float or tensor`` (``outputs`` is the model's output tensor, its
``.logits`` / ``["logits"]`` for output objects), averaged over samples (weighted by batch size, so a short last batch
counts for what it holds) and over processes. Subclass and override ``training_step(batch)`` /
``evaluation_step(batch)`` (return the loss, or a dict with "loss" and optionally "outputs", "targets",
"batch_size") for anything else.

Steps and epochs. ``step`` counts optimizer steps; one step takes ``grad_accum_steps`` batches (their mean loss:
each batch's loss is divided by the number of batches in its group; an epoch whose length is not a multiple ends
with a smaller group, divided by its own size). ``max_steps`` and ``max_epochs`` stop training, whichever comes
first. ``log_every`` (steps) logs the mean training loss since the last log, the lr and (with clipping) the gradient
norm; ``eval_every`` (steps) evaluates every so many steps, otherwise an ``eval_loader`` is evaluated at each
epoch's end; a final evaluation runs at the end of fit when the last step was not evaluated.

Checkpoints and resume. With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps (default:
at each epoch's end) and at the end of fit, through mltoolkit.train.CheckpointManager (atomic, ``keep_last``). It
holds the model, optimizer, scheduler, fp16 grad scaler, RNG states (python, numpy, torch CPU and CUDA), step, epoch,
the loader position, and in ``extra["trainer"]``: the callbacks' states, the gradient-noise state, the history, the
RNG states at the start of the current epoch (global and the loader's own generators) and the batches done in it.
``resume=True`` (default) continues from the newest good checkpoint of ``checkpoint_dir`` (none: a fresh start),
``resume="path/to/ckpt.pt"`` from that file, ``resume=False`` starts fresh. The data position is restored in one of
two ways:
  * the loader's sampler has ``state_dict``/``load_state_dict`` (``mltoolkit.train.ResumableSampler``:
    ``DataLoader(ds, batch_size=B, sampler=ResumableSampler(ds, seed=0))``, and the per-rank
    DistributedResumableSampler a distributed strategy's prepare_loader puts in its place): the position is loaded
    into it and the loader continues with the next batch, without reading the ones already done. The position saved
    is the Trainer's own count of the batches done in the epoch, so it is exact also with loader workers (which fetch
    ahead of the loop, and at an epoch's end have already moved the sampler on);
  * otherwise the Trainer warns, rebuilds the epoch's iterator from the epoch-start RNG states (so a
    ``shuffle=True`` loader, seeded from the global RNG or from its own ``generator``, produces the same order) and
    skips the batches already done (reading them again: slow for large epochs — use a ResumableSampler).
Either way, with the same code, data and thread count, a run killed at any point and resumed ends, on CPU, with
parameters bit-identical to the uninterrupted run (the loop itself draws nothing from the global RNG, and evaluation
runs under a forked RNG so it never changes training's random numbers); ``fit()`` also returns the same history.
A resumed run's loggers append: rows logged between the last checkpoint and the kill appear again (same steps) in
the CSV / TensorBoard / MLflow logs. ``fit()`` over a directory whose latest checkpoint is already at max_steps /
max_epochs returns at once (``resume=False`` or another directory trains again). The history is stored in every
checkpoint; with a very small ``log_every`` over a very long run, raise ``log_every``.

Distribution. Everything that differs between one process and many goes through the Strategy
(mltoolkit.distributed): ``prepare`` (device, wrapping, the optimizer over the wrapped parameters), ``prepare_loader``,
``no_sync`` for the accumulation micro-batches, ``clip_grad_norm_``, ``reduce_mean`` for metrics,
``save_checkpoint``/``load_checkpoint``, ``is_main``. Only rank 0 logs, prints and shows the progress bar. Under
torchrun, ``strategy="auto"`` picks DDP. DDP and FSDP give each rank ``batch_size`` samples of its shard (global batch
world_size x batch_size), tensor parallelism gives every rank the same batches: a loader over a ResumableSampler gets
a DistributedResumableSampler (same order, resumable), a ``shuffle=True`` or sequential one a DistributedSampler,
whose ``set_epoch`` the Trainer calls at each epoch's start (it resumes by re-reading, as above). The logged losses
and the final parameters match a single-process run with the global batch (tests/test_trainer_distributed.py).
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mltoolkit.train.aids import Amp, GradientNoise, move_to_device
from mltoolkit.train.callbacks import Callback
from mltoolkit.train.checkpoint import (
    CheckpointManager,
    ResumableSampler,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from mltoolkit.train.loggers import Logger, get_logger

__all__ = ["Trainer", "accuracy", "default_loss"]

_PRECISIONS = {"fp32": None, "32": None, "float32": None, "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16",
               "fp16": "fp16", "float16": "fp16", "16": "fp16", "16-mixed": "fp16"}
_TARGET_KEYS = ("labels", "label", "targets", "target", "y")
_STATE_VERSION = 1


# ---- helpers ------------------------------------------------------------------------------------------------------
def _logits(outputs: Any) -> Any:
    """The tensor to score: the output itself, its ``.logits`` / ``["logits"]``, or the first of a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs.get("logits", outputs)
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    return outputs


def _model_loss(outputs: Any) -> Optional[Tensor]:
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    else:
        loss = getattr(outputs, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def default_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Cross-entropy for integer class-id targets (class dim 1, or last when ``logits.shape[:-1] ==
    targets.shape``; ignore_index=-100), mean-squared error for float targets."""
    logits = _logits(outputs)
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("the default loss needs tensor outputs and targets; pass loss_fn= or override training_step")
    if not targets.is_floating_point() and not targets.is_complex():
        if logits.dim() > 2 and logits.shape[:-1] == targets.shape:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return F.cross_entropy(logits.float(), targets, ignore_index=-100)
    return F.mse_loss(logits.float(), targets.float())


def accuracy(outputs: Any, targets: Tensor) -> Tensor:
    """Top-1 accuracy of class logits against class ids (a metric for ``Trainer(metrics={"accuracy": accuracy})``);
    targets of -100 are ignored."""
    logits = _logits(outputs)
    dim = -1 if logits.dim() > 2 and logits.shape[:-1] == targets.shape else 1
    pred = logits.argmax(dim if logits.dim() > 1 else 0)
    keep = targets != -100
    return (pred[keep] == targets[keep]).float().mean() if keep.any() else torch.zeros((), device=logits.device)


def _call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(*objs: Any) -> int:
    for obj in objs:
        if isinstance(obj, Tensor) and obj.dim() > 0:
            return int(obj.shape[0])
        if isinstance(obj, Mapping):
            obj = list(obj.values())
        if isinstance(obj, (tuple, list)):
            n = _batch_size(*obj)
            if n:
                return n
    return 0


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _sampler_with_state(loader: Any) -> Any:
    """The loader's sampler when it can save and restore its position (e.g. ResumableSampler), else None."""
    for cand in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None),
                 getattr(loader, "batch_sampler", None)):
        if cand is not None and callable(getattr(cand, "state_dict", None)) \
                and callable(getattr(cand, "load_state_dict", None)):
            return cand
    return None


def _is_distributed_resumable(sampler: Any) -> bool:
    """mltoolkit.distributed.DistributedResumableSampler (checked by name: importing it loads torch.distributed)."""
    return any(c.__name__ == "DistributedResumableSampler" and c.__module__.startswith("mltoolkit.distributed")
               for c in type(sampler).__mro__)


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch.Generators a loader draws its order / worker seeds from (its own, its samplers')."""
    gens: list[torch.Generator] = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def _set_epoch(loader: Any, epoch: int) -> None:
    """DistributedSampler / ResumableSampler style set_epoch on the loader's samplers."""
    seen = []
    for obj in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None),
                getattr(loader, "batch_sampler", None)):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn) and all(obj is not s for s in seen):
            seen.append(obj)
            fn(epoch)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy (when installed) and torch (CPU and every CUDA device)."""
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


class _PathManager:
    """``resume="file.pt"``: a CheckpointManager-like object whose load_latest loads that one file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))

    def load_latest(self, **kwargs: Any) -> Any:
        return load_checkpoint(self.path, **kwargs)


class _Bar:
    """A minimal progress bar over tqdm or rich."""

    def __init__(self, kind: str, total: Optional[int], desc: str) -> None:
        self.kind = kind
        if kind == "tqdm":
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[postfix]}"), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(desc, total=total, postfix="")

    def update(self, n: int = 1) -> None:
        if self.kind == "tqdm":
            self.bar.update(n)
        else:
            self.bar.advance(self.task, n)

    def set_postfix(self, values: Mapping[str, float]) -> None:
        text = {k: f"{v:.4g}" for k, v in values.items()}
        if self.kind == "tqdm":
            self.bar.set_postfix(text, refresh=False)
        else:
            self.bar.update(self.task, postfix=" ".join(f"{k}={v}" for k, v in text.items()))

    def close(self) -> None:
        if self.kind == "tqdm":
            self.bar.close()
        else:
            self.bar.stop()


def _bar_kind(progress_bar: Any) -> Optional[str]:
    if progress_bar in (None, False):
        return None
    if progress_bar not in ("auto", True, "tqdm", "rich"):
        raise ValueError(f"progress_bar must be 'auto', 'tqdm', 'rich' or None, got {progress_bar!r}")
    if progress_bar in ("tqdm", "rich"):
        try:
            __import__(progress_bar)
        except ImportError as e:
            raise ImportError(f"install {progress_bar} to use progress_bar={progress_bar!r}") from e
        return progress_bar
    if progress_bar == "auto" and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    for kind in ("tqdm", "rich"):
        try:
            __import__(kind)
            return kind
        except ImportError:
            continue
    return None


# ---- the Trainer --------------------------------------------------------------------------------------------------
class Trainer:
    """Train ``model`` with ``optimizer`` on ``train_loader``; see the module docstring for the conventions.

    Args:
        model: an nn.Module.
        optimizer: a torch.optim.Optimizer, or a factory ``params -> Optimizer`` (needed when the strategy replaces
            the parameters, FSDP2 / tensor parallel).
        train_loader: a re-iterable of batches (a DataLoader); one pass is one epoch.
        eval_loader: batches for ``evaluate()``.
        loss_fn: ``(outputs, targets) -> loss``; default: the model's own loss, else cross-entropy / MSE.
        metrics: ``{name: fn(outputs, targets)}`` or a sequence of functions (named by ``__name__``).
        max_epochs, max_steps: when to stop (at least one; whichever comes first).
        grad_accum_steps: batches per optimizer step.
        max_grad_norm: clip the global gradient 2-norm (through the strategy, after unscaling and gradient noise).
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler).
        scheduler: an LR scheduler, a factory ``optimizer -> scheduler``, or a name of mltoolkit.optim.SCHEDULERS
            ("cosine", "linear", "polynomial", "inverse_sqrt", "constant", "one_cycle") built by
            mltoolkit.optim.get_scheduler with ``scheduler_kwargs`` (warmup_steps, min_lr_ratio, ...; total_steps
            defaults to the run's length: max_steps, or max_epochs x steps an epoch); ``scheduler_interval``: "step"
            (after each optimizer step that was not skipped) or "epoch".
        gradient_noise: annealed Gaussian gradient noise: a GradientNoise, eta as a float, or a dict of its
            arguments (eta, gamma, seed).
        callbacks: Callback objects. loggers: Logger objects or names "csv", "tensorboard", "mlflow", "wandb",
            written to ``log_dir``. hparams: extra configuration to log.
        log_every: steps between training-loss logs. eval_every: steps between evaluations (default: each epoch).
        checkpoint_dir, checkpoint_every, keep_last, resume: see the module docstring.
        progress_bar: "auto" (tqdm, else rich, when stderr is a terminal), "tqdm", "rich" (forced) or None.
        strategy: "auto", "single", a registered name ("ddp", "fsdp", "tp") or a Strategy. device: for a named
            strategy (default: CUDA when available).
        seed: seed python, numpy and torch at the start of fit (before anything random happens in it).
    """

    def __init__(self, model: nn.Module, optimizer: Any, train_loader: Iterable[Any], *,
                 eval_loader: Optional[Iterable[Any]] = None, loss_fn: Optional[Callable[..., Tensor]] = None,
                 metrics: Union[Mapping[str, Callable[..., Any]], Sequence[Callable[..., Any]], None] = None,
                 max_epochs: Optional[int] = None, max_steps: Optional[int] = None, grad_accum_steps: int = 1,
                 max_grad_norm: Optional[float] = None, precision: str = "fp32", scheduler: Any = None,
                 scheduler_interval: str = "step", scheduler_kwargs: Optional[Mapping[str, Any]] = None,
                 gradient_noise: Any = None, callbacks: Iterable[Callback] = (),
                 loggers: Iterable[Any] = (), log_dir: Union[str, os.PathLike] = "runs", log_every: int = 50,
                 eval_every: Optional[int] = None, checkpoint_dir: Union[str, os.PathLike, None] = None,
                 checkpoint_every: Optional[int] = None, keep_last: Optional[int] = 3,
                 resume: Union[bool, str, os.PathLike] = True, progress_bar: Any = "auto", strategy: Any = "auto",
                 device: Union[str, torch.device, None] = None, seed: Optional[int] = None,
                 hparams: Optional[Mapping[str, Any]] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer) and not callable(optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable params -> Optimizer, got "
                            f"{type(optimizer).__name__}")
        self._check_loader("train_loader", train_loader)
        if eval_loader is not None:
            self._check_loader("eval_loader", eval_loader)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
        self.metrics = self._check_metrics(metrics)
        self.max_epochs = _check_int("max_epochs", max_epochs, 1)
        self.max_steps = _check_int("max_steps", max_steps, 1)
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("max_epochs and max_steps are both None: give at least one of them")
        self.grad_accum_steps = _check_int("grad_accum_steps", grad_accum_steps, 1, allow_none=False)
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        key = precision.lower() if isinstance(precision, str) else precision
        if key not in _PRECISIONS:
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        if isinstance(scheduler, str):
            from mltoolkit.optim import SCHEDULERS
            if scheduler.lower().replace("-", "_") not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {scheduler!r}; known schedulers: {', '.join(sorted(SCHEDULERS))}"
                                 " (or pass an LR scheduler, or a callable optimizer -> scheduler)")
        elif scheduler is not None and not callable(getattr(scheduler, "step", None)) and not callable(scheduler):
            raise TypeError(f"scheduler must be a name, an LR scheduler or a callable optimizer -> scheduler, got "
                            f"{type(scheduler).__name__}")
        if scheduler_kwargs is not None:
            if not isinstance(scheduler, str):
                raise ValueError("scheduler_kwargs is for a scheduler given by name (scheduler='cosine', ...)")
            if not isinstance(scheduler_kwargs, Mapping) or not all(isinstance(k, str) for k in scheduler_kwargs):
                raise TypeError(f"scheduler_kwargs must be a dict of keyword arguments, got "
                                f"{type(scheduler_kwargs).__name__}")
        if gradient_noise is not None and not isinstance(gradient_noise, (GradientNoise, int, float, Mapping)):
            raise TypeError(f"gradient_noise must be a GradientNoise, an eta (float) or a dict of GradientNoise "
                            f"arguments, got {type(gradient_noise).__name__}")
        self.callbacks = list(callbacks)
        for i, cb in enumerate(self.callbacks):
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks[{i}] must be a mltoolkit.train.Callback, got {type(cb).__name__}")
        self.log_every = _check_int("log_every", log_every, 1, allow_none=False)
        self.eval_every = _check_int("eval_every", eval_every, 1)
        if self.eval_every is not None and eval_loader is None:
            raise ValueError("eval_every is set but there is no eval_loader to evaluate")
        self.checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
        if self.checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every is set but checkpoint_dir is None: give a directory for the checkpoints")
        if not isinstance(resume, (bool, str, os.PathLike)):
            raise TypeError(f"resume must be True, False or a checkpoint path, got {type(resume).__name__}")
        if isinstance(resume, (str, os.PathLike)) and not os.path.isfile(resume):
            raise FileNotFoundError(f"resume: no checkpoint file {os.fspath(resume)!r}")
        if seed is not None:
            _check_int("seed", seed, 0)
        self._bar_kind = _bar_kind(progress_bar)

        from mltoolkit.distributed import Strategy, get_strategy
        if isinstance(strategy, Strategy):
            if device is not None:
                raise ValueError("device= is for a strategy name; a Strategy object already has its device")
            self.strategy = strategy
        else:
            self.strategy = get_strategy(strategy, **({} if device is None else {"device": device}))

        self.log_dir = os.fspath(log_dir)
        self.loggers: list[Logger] = [get_logger(lg, self.log_dir) for lg in
                                      ((loggers,) if isinstance(loggers, str) else loggers)]
        self.model, self.optimizer = model, optimizer
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.loss_fn, self.max_grad_norm = loss_fn, (None if max_grad_norm is None else float(max_grad_norm))
        self.precision = _PRECISIONS[key] or "fp32"
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.scheduler_kwargs = dict(scheduler_kwargs or {})
        self._noise_arg = gradient_noise
        self.grad_noise: Optional[GradientNoise] = None
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.keep_last, self.resume, self.seed = keep_last, resume, seed
        self.hparams = dict(hparams or {})
        self.checkpoint_manager: Optional[CheckpointManager] = None
        if self.checkpoint_dir is not None:
            self.checkpoint_manager = CheckpointManager(self.checkpoint_dir, keep_last=keep_last)

        self.step = 0  # optimizer steps done
        self.epoch = 0  # epochs completed (the current epoch's index)
        self.history: list[dict[str, Any]] = []
        self.should_stop = False
        self.fitting = False
        self.amp: Optional[Amp] = None
        self._prepared = False
        self._batch_in_epoch = 0
        self._epoch_rng: Optional[dict[str, Any]] = None
        self._resume_rng: Optional[dict[str, Any]] = None
        self._last_eval_step: Optional[int] = None
        self._last_ckpt_step: Optional[int] = None
        self._bar: Optional[_Bar] = None
        self._postfix: dict[str, float] = {}
        self._window: dict[str, Any] = {}  # sums of the training loss / metrics since the last log, "__count"
        self._grad_norm: Optional[Tensor] = None
        self._skip = 0  # batches to skip on resume (loaders without a resumable sampler)

    # ---- argument checks ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_loader(name: str, loader: Any) -> None:
        if isinstance(loader, (str, bytes, Mapping)) or not hasattr(loader, "__iter__"):
            raise TypeError(f"{name} must be an iterable of batches (a DataLoader), got {type(loader).__name__}")
        if isinstance(loader, Iterator):
            raise TypeError(f"{name} is an iterator, which can be iterated only once; pass a DataLoader or another "
                            "re-iterable (a list of batches)")

    @staticmethod
    def _check_metrics(metrics: Any) -> dict[str, Callable[..., Any]]:
        if metrics is None:
            return {}
        if isinstance(metrics, Mapping):
            items = list(metrics.items())
        elif callable(metrics):
            items = [(getattr(metrics, "__name__", "metric"), metrics)]
        else:
            try:
                items = [(getattr(m, "__name__", f"metric{i}"), m) for i, m in enumerate(metrics)]
            except TypeError:
                raise TypeError(f"metrics must be a dict name -> callable or a sequence of callables, got "
                                f"{type(metrics).__name__}") from None
        for name, fn in items:
            if not isinstance(name, str) or not callable(fn):
                raise TypeError(f"metrics: {name!r} must map a name to a callable(outputs, targets)")
            if name == "loss":
                raise ValueError("metrics: 'loss' is reserved for the loss")
        return dict(items)

    # ---- printing -------------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print on rank 0 only (through the progress bar when one is shown)."""
        if not self.is_main:
            return
        if self._bar is not None and self._bar.kind == "tqdm":
            from tqdm.auto import tqdm
            tqdm.write(" ".join(str(a) for a in args), file=sys.stderr)
        else:
            print(*args, **kwargs)

    # ---- set-up ---------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        if self._prepared:
            return
        self.strategy.setup()
        self.model, self.optimizer = self.strategy.prepare(self.model, self.optimizer)
        self.device = self.strategy.device
        self.amp = Amp(None if self.precision == "fp32" else self.precision, self.device)
        self.train_loader = self.strategy.prepare_loader(self.train_loader)
        if self.eval_loader is not None:
            self.eval_loader = self.strategy.prepare_loader(self.eval_loader)
        sched = self.scheduler
        if isinstance(sched, str):
            from mltoolkit.optim import get_scheduler
            kw = dict(self.scheduler_kwargs)
            if kw.get("total_steps") is None:
                kw["total_steps"] = self._schedule_length()
            sched = get_scheduler(sched, self.optimizer, **kw)
        elif sched is not None and not callable(getattr(sched, "step", None)):
            sched = sched(self.optimizer)
            if not callable(getattr(sched, "step", None)):
                raise TypeError(f"the scheduler factory returned {type(sched).__name__}, not an LR scheduler")
        if sched is not None and getattr(sched, "optimizer", self.optimizer) is not self.optimizer:
            raise ValueError("scheduler was built on another optimizer than the one training uses (the strategy "
                             "rebuilt it over the wrapped model); pass a factory: scheduler=lambda opt: ...")
        self.scheduler = sched
        noise = self._noise_arg
        if isinstance(noise, GradientNoise):
            self.grad_noise = noise
        elif isinstance(noise, Mapping):
            self.grad_noise = GradientNoise(self.model, **noise)
        elif noise is not None:
            self.grad_noise = GradientNoise(self.model, eta=float(noise))
        self._prepared = True

    def _schedule_length(self) -> Optional[int]:
        """A named scheduler's default total_steps: max_steps, else max_epochs x optimizer steps an epoch (epochs with
        scheduler_interval="epoch"); None when neither is known."""
        if self.scheduler_interval == "epoch":
            return self.max_epochs
        try:
            per_epoch = -(-len(self.train_loader) // self.grad_accum_steps)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        by_epochs = None if self.max_epochs is None or per_epoch is None else self.max_epochs * per_epoch
        if self.max_steps is None:
            return by_epochs
        return self.max_steps if by_epochs is None else min(self.max_steps, by_epochs)

    def _callback_keys(self) -> list[str]:
        keys, seen = [], {}
        for cb in self.callbacks:
            k = cb.state_key
            seen[k] = seen.get(k, 0) + 1
            keys.append(k if seen[k] == 1 else f"{k}#{seen[k] - 1}")
        return keys

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def _sampler_position(self) -> Optional[dict[str, Any]]:
        sampler = _sampler_with_state(self.train_loader)
        if sampler is None:
            return None
        bs = getattr(self.train_loader, "batch_size", None) or 0
        if isinstance(sampler, ResumableSampler):
            # The trainer's own count: exact with loader workers (which fetch ahead) and at epoch boundaries.
            state = sampler.state_dict()
            index = min(self._batch_in_epoch * bs, sampler.num_samples) if bs else state["index"]
            return {**state, "epoch": self.epoch, "index": index}
        if _is_distributed_resumable(sampler) and bs:
            # The same for the per-rank sampler strategy.prepare_loader installs: this rank consumed batch_in_epoch
            # batches of its shard (its iterator may have run ahead, or on to the next epoch, with workers).
            consumed = min(self._batch_in_epoch * bs, sampler.num_samples)
            return {**sampler.state_dict(consumed=consumed), "epoch": self.epoch}
        return sampler.state_dict()

    def save_checkpoint(self, manager: Any = None, notify: bool = True) -> Optional[str]:
        """Write a checkpoint of the current state through ``manager`` (default: the Trainer's); returns the path
        on the process that wrote it. Called by fit at optimizer-step boundaries."""
        manager = manager if manager is not None else self.checkpoint_manager
        if manager is None:
            raise ValueError("save_checkpoint: no checkpoint_dir was given to the Trainer and no manager passed")
        self._setup()
        extra = {"trainer": {
            "version": _STATE_VERSION, "step": self.step, "epoch": self.epoch, "batch_in_epoch": self._batch_in_epoch,
            "epoch_rng": self._epoch_rng, "history": self.history, "last_eval_step": self._last_eval_step,
            "grad_noise": None if self.grad_noise is None else self.grad_noise.state_dict(),
            "callbacks": {k: cb.state_dict() for k, cb in zip(self._callback_keys(), self.callbacks)},
            "window": {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in self._window.items()}}}
        path = self.strategy.save_checkpoint(manager, self.step, model=self.model, optimizer=self.optimizer,
                                             scheduler=self.scheduler, scaler=self.amp.scaler,
                                             sampler=self._sampler_position(), epoch=self.epoch, extra=extra)
        if manager is self.checkpoint_manager:
            self._last_ckpt_step = self.step
        if notify:
            self._call("on_checkpoint_save", path)
        return path

    def _restore(self) -> None:
        """Load the checkpoint that ``resume`` names into every object; sets the counters and RNG plans."""
        if self.resume is False:
            if self.checkpoint_manager is not None and self.checkpoint_manager.latest_path() is not None:
                warnings.warn(f"resume=False: starting fresh although {self.checkpoint_dir} holds checkpoints; new "
                              "ones will rotate them out", stacklevel=3)
            return
        if isinstance(self.resume, (str, os.PathLike)):
            manager: Any = _PathManager(os.fspath(self.resume))
        elif self.checkpoint_manager is not None:
            manager = self.checkpoint_manager
        else:
            return
        ck = self.strategy.load_checkpoint(manager, model=self.model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, scaler=self.amp.scaler)
        if ck is None:
            return
        self._resume_rng = capture_rng_state()  # restored by the load; re-applied after the loader is rebuilt
        state = (ck.extra or {}).get("trainer") if isinstance(ck.extra, Mapping) else None
        if state is None:
            warnings.warn(f"{ck.path}: not written by the Trainer (no trainer state): resuming at step {ck.step}, "
                          f"epoch {ck.epoch or 0} from the epoch's start", stacklevel=3)
            self.step, self.epoch, self._batch_in_epoch = ck.step, int(ck.epoch or 0), 0
            return
        self.step, self.epoch, self._batch_in_epoch = int(state["step"]), int(state["epoch"]), \
            int(state["batch_in_epoch"])
        self.history = list(state["history"])
        self._last_eval_step = state.get("last_eval_step")
        self._last_ckpt_step = self.step
        self._epoch_rng = state.get("epoch_rng")
        self._window = {k: (v.to(self.device) if isinstance(v, Tensor) else v)
                        for k, v in state.get("window", {}).items()}
        if self.grad_noise is not None:
            if state.get("grad_noise") is None:
                warnings.warn("the checkpoint holds no gradient-noise state; the noise restarts", stacklevel=3)
            else:
                self.grad_noise.load_state_dict(state["grad_noise"])
        saved_cbs = state.get("callbacks", {})
        for key, cb in zip(self._callback_keys(), self.callbacks):
            if key in saved_cbs:
                cb.load_state_dict(saved_cbs[key])
        sampler = _sampler_with_state(self.train_loader)
        position = ck.state.get("sampler") if isinstance(getattr(ck, "state", None), Mapping) else None
        if sampler is not None and position is not None:
            sampler.load_state_dict(position)
            self._skip = 0
        else:
            self._skip = self._batch_in_epoch
            if self._skip:
                warnings.warn(f"train_loader's sampler cannot restore its position (it has no state_dict / "
                              f"load_state_dict): resuming at step {self.step} by re-reading and skipping the "
                              f"{self._skip} batches already done in epoch {self.epoch}; for a fast resume, build the "
                              "DataLoader with sampler=mltoolkit.train.ResumableSampler(dataset, seed=...) and the "
                              "same batch size", stacklevel=3)
        self.print(f"resumed from {ck.path} at step {self.step} (epoch {self.epoch}, batch {self._batch_in_epoch})")

    # ---- steps ----------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Any) -> dict[str, Any]:
        """Forward one batch and compute its loss following the batch convention (module docstring). Returns
        {"loss", "outputs", "targets", "batch_size"}."""
        targets = None
        if isinstance(batch, Mapping):
            inputs = dict(batch)
            if self.loss_fn is not None:
                for k in _TARGET_KEYS:
                    if k in inputs:
                        targets = inputs.pop(k)
                        break
            else:
                targets = next((inputs[k] for k in _TARGET_KEYS if k in inputs), None)
            outputs = self.model(**inputs)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            inputs = batch[0] if len(batch) == 2 else tuple(batch[:-1])
            targets = batch[-1]
            outputs = _call_model(self.model, inputs) if len(batch) == 2 else self.model(*inputs)
        else:
            inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 1 else batch
            outputs = self.model(inputs)
        if self.loss_fn is not None and targets is not None:
            loss = self.loss_fn(outputs, targets)
        else:
            loss = _model_loss(outputs)
            if loss is None and isinstance(outputs, Tensor) and outputs.dim() == 0 and targets is None:
                loss = outputs
            if loss is None:
                if targets is None:
                    raise TypeError("cannot compute a loss: the batch has no targets and the model's output has no "
                                    "loss; pass loss_fn= or override Trainer.training_step")
                loss = default_loss(outputs, targets)
        return {"loss": loss, "outputs": outputs, "targets": targets, "batch_size": _batch_size(targets, inputs)}

    def training_step(self, batch: Any) -> Any:
        """One batch's forward and loss (under autocast); the Trainer does backward and the optimizer step.
        Return the loss tensor or a dict with "loss" (and "outputs", "targets", "batch_size" for metrics)."""
        return self.compute_loss(batch)

    def evaluation_step(self, batch: Any) -> Any:
        """Like training_step, under torch.no_grad() and model.eval()."""
        return self.compute_loss(batch)

    @staticmethod
    def _unpack(out: Any, batch: Any) -> dict[str, Any]:
        if isinstance(out, Tensor):
            out = {"loss": out}
        if not isinstance(out, Mapping) or not isinstance(out.get("loss"), Tensor):
            raise TypeError("training_step / evaluation_step must return the loss tensor or a dict with a 'loss' "
                            f"tensor, got {type(out).__name__}")
        out = dict(out)
        if not out.get("batch_size"):
            out["batch_size"] = _batch_size(out.get("targets"), batch) or 1
        return out

    def _metric_values(self, out: Mapping[str, Any]) -> dict[str, Tensor]:
        if not self.metrics or out.get("targets") is None or out.get("outputs") is None:
            return {}
        vals = {}
        with torch.no_grad():
            logits = _logits(out["outputs"])
            for name, fn in self.metrics.items():
                v = fn(logits, out["targets"])
                vals[name] = (v.detach().double().mean() if isinstance(v, Tensor)
                              else torch.tensor(float(v), dtype=torch.float64))
        return vals

    def _optimizer_step(self) -> None:
        amp, opt = self.amp, self.optimizer
        if self.grad_noise is not None or self.max_grad_norm is not None:
            amp.unscale_(opt)
        if self.grad_noise is not None:
            self.grad_noise.add_()
        if self.max_grad_norm is not None:
            self._grad_norm = self.strategy.clip_grad_norm_(self.model, self.max_grad_norm)
        stepped = amp.step(opt)
        opt.zero_grad(set_to_none=True)
        if stepped and self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        self.step += 1

    # ---- logging --------------------------------------------------------------------------------------------------
    def _mean(self, total: Tensor, count: Tensor) -> float:
        n = self.strategy.reduce_mean(count)
        return self.strategy.reduce_mean(total) / n if n else float("nan")

    def log(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Add a row (with "step" and "epoch") to the history and send it to the loggers (rank 0)."""
        row = {"step": self.step, "epoch": self.epoch, **metrics}
        self._call("on_log", row)
        self.history.append(row)
        if self.is_main:
            for lg in self.loggers:
                lg.log_metrics({k: v for k, v in row.items() if k != "step"}, self.step)
        return row

    def _log_train(self) -> None:
        """Log the mean training loss / metrics since the last log (the window), the lr and the last step's gradient
        norm before clipping."""
        window, self._window = self._window, {}
        count = window.pop("__count")
        row = {f"train/{k}": self._mean(v, count) for k, v in window.items()}
        row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self._grad_norm is not None:
            row["grad_norm"] = self.strategy.reduce_mean(self._grad_norm)
        self.log(row)
        self._postfix = {"loss": row["train/loss"], "lr": row["lr"]}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)

    def _hparams(self) -> dict[str, Any]:
        opt = self.optimizer
        hp = {"model": type(self.strategy.unwrap(self.model)).__name__,
              "parameters": sum(p.numel() for p in self.model.parameters()),
              "optimizer": type(opt).__name__, "lr": opt.param_groups[0].get("lr"),
              "weight_decay": opt.param_groups[0].get("weight_decay"),
              "batch_size": getattr(self.train_loader, "batch_size", None), "max_epochs": self.max_epochs,
              "max_steps": self.max_steps, "grad_accum_steps": self.grad_accum_steps,
              "max_grad_norm": self.max_grad_norm, "precision": self.precision,
              "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
              "gradient_noise_eta": self.grad_noise.eta if self.grad_noise is not None else None,
              "strategy": self.strategy.name, "world_size": self.strategy.world_size, "seed": self.seed}
        hp.update(self.hparams)
        return hp

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, loader: Optional[Iterable[Any]] = None, prefix: str = "eval/") -> dict[str, float]:
        """Mean loss and metrics over ``loader`` (default: eval_loader), weighted by batch size and averaged over
        processes: {"eval/loss": ..., "eval/<metric>": ...}. Runs in eval mode under no_grad, autocast and a forked
        RNG (training's random numbers are unchanged)."""
        self._setup()
        if loader is None:
            if self.eval_loader is None:
                raise ValueError("evaluate: no loader given and the Trainer has no eval_loader")
            loader = self.eval_loader
        else:
            self._check_loader("loader", loader)
            loader = self.strategy.prepare_loader(loader)
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, Tensor] = {}
        count = 0.0
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                for batch in loader:
                    batch = move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
                    with self.amp.autocast():
                        out = self._unpack(self.evaluation_step(batch), batch)
                    n = out["batch_size"]
                    vals = {"loss": out["loss"].detach().double(), **self._metric_values(out)}
                    for k, v in vals.items():
                        sums[k] = sums.get(k, 0) + v * n
                    count += n
        finally:
            model.train(was_training)
        return {f"{prefix}{k}": self._mean(v, count) for k, v in sums.items()}

    def _run_eval(self) -> dict[str, float]:
        result = self.evaluate()
        self._last_eval_step = self.step
        self._call("on_evaluate_end", result)
        return result

    # ---- fit ------------------------------------------------------------------------------------------------------
    def _stop(self) -> bool:
        return self.should_stop or (self.max_steps is not None and self.step >= self.max_steps)

    def _epoch_iterator(self) -> Iterator[Any]:
        """The current epoch's iterator, positioned after the batches already done (resume)."""
        loader = self.train_loader
        _set_epoch(loader, self.epoch)
        gens = _loader_generators(loader)
        skip, self._skip = self._skip, 0
        if self._resume_rng is not None and self._batch_in_epoch and self._epoch_rng is not None:
            restore_rng_state(self._epoch_rng["global"])  # iter() and the shuffle draw what they drew back then
            for g, s in zip(gens, self._epoch_rng["loaders"]):
                g.set_state(s)
            it = iter(loader)
            for _ in range(skip):
                next(it)
            restore_rng_state(self._resume_rng)
        else:
            if skip:
                warnings.warn("no epoch-start RNG state in the checkpoint: the skipped batches may differ",
                              stacklevel=2)
            self._epoch_rng = {"global": capture_rng_state(), "loaders": [g.get_state() for g in gens]}
            it = iter(loader)
            for _ in range(skip):
                next(it)
        self._resume_rng = None
        return it

    def _train_epoch(self) -> bool:
        """Train until the epoch ends (True) or training must stop (False)."""
        model, acc = self.model, self.grad_accum_steps
        try:
            nb: Optional[int] = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            nb = None
        it = self._epoch_iterator()
        if self._bar_kind is not None and self.is_main:
            self._bar = _Bar(self._bar_kind, nb, f"epoch {self.epoch}")
            self._bar.update(self._batch_in_epoch)
            if self._postfix:
                self._bar.set_postfix(self._postfix)
        model.train()
        step_loss = torch.zeros((), dtype=torch.float64)
        pending = 0
        try:
            for batch in it:
                i = self._batch_in_epoch
                g0 = i - i % acc
                group = acc if nb is None else min(acc, nb - g0)  # a short last group is averaged over its size
                last = i - g0 + 1 >= group
                batch = move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
                with contextlib.nullcontext() if last else self.strategy.no_sync(model):
                    with self.amp.autocast():
                        out = self._unpack(self.training_step(batch), batch)
                    loss = out["loss"]
                    self.amp.backward(loss / group if group > 1 else loss)
                n = out["batch_size"]
                detached = loss.detach().double()
                step_loss = step_loss + detached / group
                window = self._window
                for k, v in {"loss": detached, **self._metric_values(out)}.items():
                    window[k] = window.get(k, 0) + v * n
                window["__count"] = window.get("__count", 0) + float(n)
                self._batch_in_epoch += 1
                pending += 1
                if self._bar is not None:
                    self._bar.update(1)
                if last:
                    self._after_step(step_loss)
                    pending, step_loss = 0, torch.zeros((), dtype=torch.float64)
                    if self._stop():
                        return nb is not None and self._batch_in_epoch >= nb
            if pending:  # a loader without __len__ ended inside an accumulation group (its losses were / acc)
                self._after_step(step_loss * acc / pending)
            if self._batch_in_epoch == 0:
                raise ValueError(f"train_loader yielded no batches in epoch {self.epoch}")
            return True
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _after_step(self, step_loss: Tensor) -> None:
        """Everything after an optimizer step: log, evaluate, callbacks, checkpoint (in this order)."""
        self._optimizer_step()
        if self.step % self.log_every == 0 and self._window:
            self._log_train()
        if self.eval_every is not None and self.step % self.eval_every == 0:
            self.log(self._run_eval())
        self._call("on_train_batch_end", self.step, step_loss)
        if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
            self.save_checkpoint()

    def _end_epoch(self) -> None:
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        if self._window:
            self._log_train()
        row: dict[str, Any] = {}
        if self.eval_loader is not None and self.eval_every is None:
            row = self.log(self._run_eval())
        self._call("on_epoch_end", self.epoch, row)
        self.epoch += 1
        self._batch_in_epoch = 0
        self._epoch_rng = None
        if self.checkpoint_manager is not None and self.checkpoint_every is None:
            self.save_checkpoint()

    def fit(self) -> list[dict[str, Any]]:
        """Train until max_steps / max_epochs / a callback's stop; returns the history (every logged row:
        {"step", "epoch", "train/loss", "lr", ...} and {"step", "epoch", "eval/loss", ...})."""
        if self.seed is not None:
            seed_everything(self.seed)
        self._setup()
        self.should_stop = False
        self._restore()
        main = self.is_main
        loggers = self.loggers if main else []
        if main:
            hp = self._hparams()
            for lg in loggers:
                lg.log_hparams(hp)
        status = "failed"
        self.fitting = True
        try:
            self._call("on_fit_start")
            while not self._stop() and (self.max_epochs is None or self.epoch < self.max_epochs):
                self._call("on_epoch_start", self.epoch)
                finished = self._train_epoch()
                if finished:
                    self._end_epoch()
                if not finished or self.should_stop:
                    break
            if self._window:
                self._log_train()
            if self.eval_loader is not None and self._last_eval_step != self.step:
                self.log(self._run_eval())
            if self.checkpoint_manager is not None and self._last_ckpt_step != self.step:
                self.save_checkpoint()
            self._call("on_fit_end")
            status = "success"
        finally:
            self.fitting = False
            for lg in loggers:
                try:
                    lg.finalize(status)
                except Exception as e:  # noqa: BLE001 - a failing logger must not hide the training error
                    warnings.warn(f"{type(lg).__name__}.finalize failed: {e}", stacklevel=2)
        return self.history

