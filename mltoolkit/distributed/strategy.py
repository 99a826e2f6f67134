"""How a training run is spread over processes: the interface the Trainer talks to, and the single-process strategy.

A Strategy owns everything that differs between one process and many: setting up the process group, wrapping the
model (DDP / FSDP2 / tensor parallel), building the optimizer over the wrapped parameters, sharding the data loader,
averaging metrics, gradient-accumulation without communication, clipping over sharded gradients, and writing and
reading checkpoints (one file, or a sharded torch.distributed.checkpoint directory). The Trainer calls only these
methods, so `Trainer(..., strategy="ddp")` and `Trainer(..., strategy="single")` run the same loop.

    strategy = get_strategy("auto")      # "ddp" under torchrun with WORLD_SIZE > 1, else "single"
    strategy.setup()
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.prepare_loader(loader)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["Strategy", "SingleProcess", "get_strategy", "register_strategy", "rebuild_optimizer", "STRATEGIES"]

OptimizerLike = Union[torch.optim.Optimizer, Callable[[Iterable[Any]], torch.optim.Optimizer]]


def rebuild_optimizer(optimizer: OptimizerLike, old_model_params: dict[int, str], model: nn.Module
                      ) -> torch.optim.Optimizer:
    """The optimizer over `model`'s current parameters. A factory is called with the model's param groups; a built
    optimizer whose parameters the wrapping replaced (FSDP2 / tensor parallel swap in DTensor parameters) is rebuilt
    with the same class, param-group hyperparameters and grouping. `old_model_params` maps id(old parameter) to its
    name in the model before wrapping. An optimizer that already holds state cannot be rebuilt: it is refused."""
    named = dict(model.named_parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable params -> Optimizer, got "
                            f"{type(optimizer).__name__}")
        built = optimizer(model.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(built).__name__}, not a torch.optim.Optimizer")
        return built
    current = {id(p) for p in named.values()}
    if all(id(p) in current for g in optimizer.param_groups for p in g["params"]):
        return optimizer  # the wrapping kept the parameter objects (single process, DDP)
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError("optimizer already holds state for parameters that the strategy replaces; build it after "
                         "strategy.prepare, or pass a factory (lambda params: AdamW(params, lr=...))")
    groups = []
    for g in optimizer.param_groups:
        params = []
        for p in g["params"]:
            name = old_model_params.get(id(p))
            if name is None or name not in named:
                raise ValueError("optimizer holds a parameter that is not in the model; cannot rebuild it over the "
                                 "wrapped model's parameters")
            params.append(named[name])
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    return type(optimizer)(groups, **optimizer.defaults)


class Strategy:
    """Base class: the single-process behaviour; distributed strategies override what differs."""

    name = "base"

    def __init__(self, device: Union[str, torch.device, None] = None) -> None:
        self._device = None if device is None else torch.device(device)

    # -- identity ---------------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, prints and shows the progress bar."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        return self._device

    # -- life cycle -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Initialise what the strategy needs (a process group); idempotent."""

    def teardown(self) -> None:
        """Release what setup() created."""

    def barrier(self) -> None:
        """Wait for every process."""

    # -- model, optimizer, data -------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: OptimizerLike) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move the model to the device, wrap it, and return it with the optimizer over the wrapped parameters."""
        names = {id(p): n for n, p in model.named_parameters()}
        model = model.to(self.device)
        return model, rebuild_optimizer(optimizer, names, model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside any wrapper."""
        return getattr(model, "module", model)

    def prepare_loader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        """The loader each process iterates (the distributed strategies give each rank its share)."""
        return loader

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context for the micro-batches of a gradient-accumulation step that must not communicate."""
        return contextlib.nullcontext()

    def reduce_mean(self, value: Union[Tensor, float]) -> float:
        """The mean of a scalar metric over processes."""
        return float(value.detach().float().mean().item() if isinstance(value, Tensor) else value)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip the gradients of `model` to a global 2-norm of `max_norm`; returns the norm before clipping."""
        from mltoolkit.optim import clip_grad_norm_
        return clip_grad_norm_(model.parameters(), max_norm)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save_checkpoint(self, manager: Any, step: int, *, model: nn.Module, optimizer: Any = None,
                        scheduler: Any = None, scaler: Any = None, sampler: Any = None, epoch: Optional[int] = None,
                        extra: Any = None) -> Optional[str]:
        """Write the checkpoint of `step` through `manager` (a mltoolkit.train.CheckpointManager); returns its path
        on the process that wrote it."""
        return manager.save(step, model=self.unwrap(model), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            sampler=sampler, epoch=epoch, extra=extra)

    def load_checkpoint(self, manager: Any, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                        scaler: Any = None, sampler: Any = None) -> Any:
        """Restore the newest good checkpoint of `manager`; returns its Checkpoint, or None when there is none."""
        return manager.load_latest(model=self.unwrap(model), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                   sampler=sampler, map_location="cpu")


class SingleProcess(Strategy):
    """One process, one device (the default)."""

    name = "single"


STRATEGIES: dict[str, Callable[..., Strategy]] = {"single": SingleProcess}


def register_strategy(name: str, factory: Callable[..., Strategy]) -> None:
    STRATEGIES[name] = factory


def get_strategy(strategy: Union[str, Strategy, None] = "auto", **kwargs: Any) -> Strategy:
    """A Strategy from a name ("auto", "single", and those the distributed modules register: "ddp", "fsdp", "tp") or
    the object itself. "auto" is "ddp" when torchrun started more than one process (WORLD_SIZE > 1), else "single"."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None or strategy == "auto":
        strategy = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a name or a Strategy, got {type(strategy).__name__}")
    import mltoolkit.distributed  # noqa: F401  (registers the distributed strategies)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {sorted(STRATEGIES)} or 'auto'")
    return STRATEGIES[strategy](**kwargs)
