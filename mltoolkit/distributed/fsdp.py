"""FSDPStrategy: fully sharded data parallel with FSDP2 (torch.distributed.fsdp.fully_shard).

    strategy = FSDPStrategy(shard_modules=(Block,), mixed_precision="bf16")   # or get_strategy("fsdp", ...)
    strategy.setup()
    model, optimizer = strategy.prepare(model, lambda params: AdamW(params, lr=1e-3))
    loader = strategy.prepare_loader(loader)                 # each rank: batch_size samples; global = W x batch

fully_shard is applied to every submodule of the chosen types (default: the elements of each nn.ModuleList, i.e. the
layers of a transformer), then to the root. The parameters become DTensors sharded on dim 0 over all ranks; the
optimizer is rebuilt over them (mltoolkit's AdamW / LAMB and torch.optim work on DTensor parameters). Checkpoints are
sharded (torch.distributed.checkpoint, see mltoolkit.distributed.checkpoint); clip_grad_norm_ takes the global norm.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from mltoolkit.distributed._env import DistributedBase
from mltoolkit.distributed.checkpoint import ShardedCheckpointer
from mltoolkit.distributed.sampler import shard_loader
from mltoolkit.distributed.strategy import OptimizerLike, Strategy, rebuild_optimizer
from mltoolkit.train.checkpoint import Checkpoint

__all__ = ["FSDPStrategy", "ShardedCheckpointMixin"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           None: None, "fp32": None, "no": None}


class ShardedCheckpointMixin:
    """save / load through torch.distributed.checkpoint into the manager's directory. Both are collective: every
    rank must call them (each writes / reads its own shards)."""

    def save_checkpoint(self, manager: Any, step: int, *, model: nn.Module, optimizer: Any = None,
                        scheduler: Any = None, scaler: Any = None, sampler: Any = None, epoch: Optional[int] = None,
                        extra: Any = None) -> Optional[str]:
        path = ShardedCheckpointer.of(manager).save(step, model=model, optimizer=optimizer, scheduler=scheduler,
                                                    scaler=scaler, sampler=sampler, epoch=epoch, extra=extra)
        return path if self.is_main else None

    def load_checkpoint(self, manager: Any, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                        scaler: Any = None, sampler: Any = None) -> Optional[Checkpoint]:
        ckpt = ShardedCheckpointer.of(manager)
        path = getattr(manager, "path", None)   # a manager for one named checkpoint (Trainer(resume="...dcp"))
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            return ckpt.load(os.fspath(path), model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                             sampler=sampler)
        return ckpt.load_latest(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                sampler=sampler)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global 2-norm over the full (sharded) gradients: squared local norms all-reduced."""
        from mltoolkit.optim import clip_grad_norm_
        return clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)


class FSDPStrategy(ShardedCheckpointMixin, DistributedBase, Strategy):
    """FSDP2 over all ranks of the default process group.

    Args: shard_modules: module classes (or a predicate module -> bool) to shard as units before the root; default
    None: the elements of every nn.ModuleList. mixed_precision: None (fp32), "bf16" or "fp16": parameters gathered
    and computed in that dtype, gradients reduced in float32 (reduce_dtype), the sharded master weights stay fp32.
    reshard_after_forward: free the gathered parameters after forward (True, ZeRO-3) or keep them until backward
    (False, ZeRO-2-like: more memory, one all-gather less). backend, device as DDPStrategy.
    """

    name = "fsdp"

    def __init__(self, device: Union[str, torch.device, None] = None, *,
                 shard_modules: Union[tuple[type, ...], list[type], type, Callable[[nn.Module], bool], None] = None,
                 mixed_precision: Optional[str] = None, reshard_after_forward: bool = True,
                 backend: Optional[str] = None) -> None:
        super().__init__(device)
        if mixed_precision not in _DTYPES:
            raise ValueError(f"FSDPStrategy: mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}")
        if isinstance(shard_modules, type):
            shard_modules = (shard_modules,)
        if isinstance(shard_modules, list):
            shard_modules = tuple(shard_modules)
        if shard_modules is not None and not callable(shard_modules) and not (
                isinstance(shard_modules, tuple) and all(isinstance(t, type) for t in shard_modules)):
            raise TypeError("FSDPStrategy: shard_modules must be module classes or a predicate module -> bool")
        self.shard_modules = shard_modules
        self.param_dtype = _DTYPES[mixed_precision]
        self.reshard_after_forward = bool(reshard_after_forward)
        self.backend = backend
        self.mesh = None

    def _units(self, model: nn.Module) -> Iterator[nn.Module]:
        if self.shard_modules is None:
            seen = set()
            for m in model.modules():
                if isinstance(m, nn.ModuleList):
                    for child in m:
                        if id(child) not in seen and any(True for _ in child.parameters()):
                            seen.add(id(child))
                            yield child
        elif isinstance(self.shard_modules, tuple):
            yield from (m for m in model.modules() if m is not model and isinstance(m, self.shard_modules))
        else:
            yield from (m for m in model.modules() if m is not model and self.shard_modules(m))

    def prepare(self, model: nn.Module, optimizer: OptimizerLike) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._require()
        names = {id(p): n for n, p in model.named_parameters()}
        model = model.to(self.device)
        if self.mesh is None:
            self.mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        kwargs: dict[str, Any] = dict(mesh=self.mesh, reshard_after_forward=self.reshard_after_forward)
        if self.param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        units = list(self._units(model))
        # innermost first: fully_shard on a module whose descendants are already sharded skips their parameters
        depth = {id(m): n.count(".") + 1 for n, m in model.named_modules()}
        for m in sorted(units, key=lambda m: -depth[id(m)]):
            fully_shard(m, **kwargs)
        fully_shard(model, **kwargs)
        return model, rebuild_optimizer(optimizer, names, model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard changes the module in place

    def prepare_loader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        return shard_loader(loader, self.rank, self.world_size)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Micro-batches without gradient reduce-scatter (the gradients accumulate unsharded until the last
        micro-batch's backward, which reduces them all)."""
        return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    if not hasattr(model, "set_requires_gradient_sync"):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
