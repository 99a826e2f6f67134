"""DDPStrategy: torch.nn.parallel.DistributedDataParallel with optional gradient-compression communication hooks.

    strategy = DDPStrategy(comm_hook="powersgd", powersgd_rank=2)    # or get_strategy("ddp", comm_hook="fp16")
    strategy.setup()                                                # process group from torchrun's environment
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.prepare_loader(loader)                        # each rank: batch_size samples of its shard

Each rank runs the user's batch size on its own shard, so the global batch is world_size x batch_size; DDP averages
the gradients, which makes a step equal to a single-process step on the global batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from mltoolkit.distributed._env import DistributedBase
from mltoolkit.distributed.sampler import shard_loader
from mltoolkit.distributed.strategy import OptimizerLike, Strategy, rebuild_optimizer
from mltoolkit.train.checkpoint import Checkpoint, capture_rng_state, restore_rng_state

__all__ = ["DDPStrategy", "COMM_HOOKS"]

COMM_HOOKS = ("fp16", "bf16", "powersgd", None)
_TAG = "__mltoolkit_ddp__"


class DDPStrategy(DistributedBase, Strategy):
    """Data parallel over all ranks of the default process group (NCCL on GPUs, gloo on the CPU).

    Args: comm_hook None (plain all-reduce), "fp16" / "bf16" (gradients all-reduced in half precision, then averaged
    back in their dtype), "powersgd" (low-rank PowerSGD compression with error feedback; powersgd_rank,
    powersgd_start_iter: plain all-reduce for the first iterations, powersgd_warm_start: reuse the low-rank factors of
    the previous step); backend (None: nccl with CUDA, else gloo); device; find_unused_parameters, static_graph,
    gradient_as_bucket_view, bucket_cap_mb (passed to DistributedDataParallel).
    """

    name = "ddp"

    def __init__(self, device: Union[str, torch.device, None] = None, *, comm_hook: Optional[str] = None,
                 powersgd_rank: int = 1, powersgd_start_iter: int = 2, powersgd_warm_start: bool = True,
                 backend: Optional[str] = None, find_unused_parameters: bool = False, static_graph: bool = False,
                 gradient_as_bucket_view: bool = False, bucket_cap_mb: Optional[float] = None) -> None:
        super().__init__(device)
        if comm_hook not in COMM_HOOKS:
            raise ValueError(f"DDPStrategy: unknown comm_hook {comm_hook!r}; choose one of "
                             f"{[h for h in COMM_HOOKS if h]} or None")
        if isinstance(powersgd_rank, bool) or not isinstance(powersgd_rank, int) or powersgd_rank < 1:
            raise ValueError(f"DDPStrategy: powersgd_rank must be an int >= 1, got {powersgd_rank!r}")
        if isinstance(powersgd_start_iter, bool) or not isinstance(powersgd_start_iter, int) \
                or powersgd_start_iter < 2:
            raise ValueError(f"DDPStrategy: powersgd_start_iter must be an int >= 2 (PowerSGD's error feedback and "
                             f"warm start need a plain all-reduce first), got {powersgd_start_iter!r}")
        self.comm_hook = comm_hook
        self.powersgd_rank = powersgd_rank
        self.powersgd_start_iter = powersgd_start_iter
        self.powersgd_warm_start = bool(powersgd_warm_start)
        self.backend = backend
        self.ddp_kwargs: dict[str, Any] = dict(find_unused_parameters=find_unused_parameters, static_graph=static_graph,
                                               gradient_as_bucket_view=gradient_as_bucket_view)
        if bucket_cap_mb is not None:
            self.ddp_kwargs["bucket_cap_mb"] = bucket_cap_mb
        self.hook_state: Any = None

    # -- model ------------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: OptimizerLike) -> tuple[nn.Module, torch.optim.Optimizer]:
        self._require()
        names = {id(p): n for n, p in model.named_parameters()}
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, **self.ddp_kwargs)
        self._register_hook(ddp)
        return ddp, rebuild_optimizer(optimizer, names, ddp.module)

    def _register_hook(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        if self.comm_hook is None:
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        if self.comm_hook == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif self.comm_hook == "bf16":
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        else:
            self.hook_state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=self.powersgd_rank,
                start_powerSGD_iter=self.powersgd_start_iter, warm_start=self.powersgd_warm_start,
                use_error_feedback=True, random_seed=0)
            ddp.register_comm_hook(self.hook_state, powerSGD_hook.powerSGD_hook)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """DDP's no_sync: gradients accumulate locally; the backward after the context all-reduces them all."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def prepare_loader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        return shard_loader(loader, self.rank, self.world_size)

    # -- checkpoints: one file written by rank 0, read by every rank ------------------------------------------------
    def save_checkpoint(self, manager: Any, step: int, *, model: nn.Module, optimizer: Any = None,
                        scheduler: Any = None, scaler: Any = None, sampler: Any = None, epoch: Optional[int] = None,
                        extra: Any = None) -> Optional[str]:
        """Rank 0 writes the file (the model and optimizer are the same on every rank); the RNG states of all ranks
        are gathered into it so each rank restores its own. Barriers before and after, so no rank reads a
        half-written checkpoint or runs ahead."""
        rngs = gather_rng_states()
        self.barrier()
        path = None
        if self.is_main:
            path = manager.save(step, model=self.unwrap(model), optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, sampler=sampler, epoch=epoch,
                                extra={_TAG: 1, "extra": extra, "rank_rng": rngs})
        self.barrier()
        return path

    def load_checkpoint(self, manager: Any, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                        scaler: Any = None, sampler: Any = None) -> Optional[Checkpoint]:
        self.barrier()
        ck = manager.load_latest(model=self.unwrap(model), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                 sampler=sampler, map_location="cpu")
        if ck is not None:
            unwrap_rank_extra(ck, self.rank, self.world_size)
        return ck


def gather_rng_states() -> Optional[list[Any]]:
    """Every rank's RNG states, on rank 0 (None elsewhere)."""
    state = capture_rng_state()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [state]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, out, dst=0)
    return out


def unwrap_rank_extra(ck: Checkpoint, rank: int, world_size: int) -> None:
    """Restore this rank's RNG state from a DDP checkpoint and give the Checkpoint the user's `extra` back."""
    extra = ck.extra
    if isinstance(extra, dict) and extra.get(_TAG) == 1:
        rngs = extra.get("rank_rng") or []
        if len(rngs) == world_size:
            restore_rng_state(rngs[rank])
        ck.extra = extra.get("extra")
