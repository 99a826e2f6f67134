"""Data sharding across ranks: a resumable distributed sampler and the DataLoader rewrite the strategies share.

Each rank gets ``batch_size`` samples per step from its own shard, so the global batch is world_size x batch_size.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from mltoolkit.train.checkpoint import CheckpointMismatchError, ResumableSampler

__all__ = ["DistributedResumableSampler", "shard_loader"]


class DistributedResumableSampler(torch.utils.data.Sampler[int]):
    """ResumableSampler's order, split across ranks, with a position that can be saved and restored.

    Epoch e uses the permutation ResumableSampler(n, seed=seed, shuffle=shuffle) gives for epoch e (the same on every
    rank), padded by repeating its head to a multiple of world_size (drop_last=False) or cut to one
    (drop_last=True); rank r takes positions r, r + W, r + 2W, ... so the shards are disjoint and together cover the
    epoch. The position is the number of samples of the epoch consumed by all ranks together (``index`` per rank x
    world_size), so a checkpoint written by rank 0 restores every rank, and also restores into another world size
    when that global position is a multiple of it. Like ResumableSampler, an iteration that runs to the end moves to
    the next epoch, and set_epoch(e) is a no-op for the current epoch (so it does not undo a resume).
    """

    def __init__(self, data_source: Union[int, Any], *, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self._base = ResumableSampler(data_source, shuffle=shuffle, seed=seed)
        if num_replicas is None or rank is None:
            import torch.distributed as dist
            if not dist.is_initialized():
                raise RuntimeError("DistributedResumableSampler: no process group; pass num_replicas= and rank=")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"DistributedResumableSampler: num_replicas must be an int >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"DistributedResumableSampler: rank must be in [0, {num_replicas}), got {rank!r}")
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = bool(drop_last)
        n = self._base.num_samples
        if self.drop_last:
            self.num_samples = n // num_replicas
        else:
            self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0   # global position the current pass started from (a resume)
        self.index = 0   # samples this rank handed out since `start`

    @property
    def seed(self) -> int:
        return self._base.seed

    @property
    def shuffle(self) -> bool:
        return self._base.shuffle

    def __len__(self) -> int:
        return self.num_samples

    @property
    def position(self) -> int:
        """Samples of the current epoch consumed by all ranks together."""
        return self.start + self.index * self.num_replicas

    def order(self, epoch: Optional[int] = None) -> list[int]:
        """The padded (or cut) global order of epoch `epoch`, total_size long."""
        order = self._base.permutation(self.epoch if epoch is None else epoch)
        if self.drop_last:
            return order[:self.total_size]
        pad = self.total_size - len(order)
        while pad > 0:
            extra = order[:pad]
            order += extra
            pad -= len(extra)
        return order

    def shard(self, epoch: Optional[int] = None) -> list[int]:
        """This rank's indices of a whole epoch."""
        return self.order(epoch)[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        while self.position + self.rank < self.total_size:
            i = order[self.position + self.rank]
            self.index += 1
            yield i
        self.epoch += 1
        self.start = 0
        self.index = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.start = 0
            self.index = 0

    def state_dict(self, consumed: Optional[int] = None) -> dict[str, int]:
        """{"epoch", "index" (global position: samples of the epoch consumed by all ranks), "seed", "num_samples"
        (dataset length), "shuffle", "world_size"}; `consumed` (samples this rank consumed this epoch) overrides the
        position, for loaders with workers."""
        position = self.position if consumed is None else int(consumed) * self.num_replicas
        if not 0 <= position <= self.total_size:
            raise ValueError(f"DistributedResumableSampler.state_dict: consumed must be in [0, {self.num_samples}]")
        return {"epoch": self.epoch, "index": position,
                "seed": self.seed, "num_samples": self._base.num_samples, "shuffle": int(self.shuffle),
                "world_size": self.num_replicas}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("epoch", "index") if k not in state]
        if missing:
            raise CheckpointMismatchError(f"DistributedResumableSampler.load_state_dict: state lacks {missing}")
        n = state.get("num_samples", self._base.num_samples)
        if n != self._base.num_samples:
            raise CheckpointMismatchError(f"DistributedResumableSampler.load_state_dict: saved for a dataset of {n} "
                                          f"samples, this sampler has {self._base.num_samples}")
        if state.get("seed", self.seed) != self.seed or bool(state.get("shuffle", self.shuffle)) != self.shuffle:
            warnings.warn(f"DistributedResumableSampler: restoring a position saved with seed={state.get('seed')}, "
                          f"shuffle={bool(state.get('shuffle'))}; the saved seed and shuffle flag are used",
                          stacklevel=2)
            self._base.seed = int(state.get("seed", self.seed))
            self._base.shuffle = bool(state.get("shuffle", self.shuffle))
        position = int(state["index"])
        if position % self.num_replicas:
            warnings.warn(f"DistributedResumableSampler: saved position {position} (world size "
                          f"{state.get('world_size')}) is not a multiple of this world size {self.num_replicas}; "
                          f"resuming from {position - position % self.num_replicas}", stacklevel=2)
            position -= position % self.num_replicas
        self.epoch = int(state["epoch"])
        self.start = min(position, self.total_size)
        self.index = 0


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The DataLoader `loader` with its sampler replaced by this rank's share, everything else kept (batch size per
    rank = the loader's batch size). ResumableSampler -> DistributedResumableSampler (same seed, resumable);
    RandomSampler -> DistributedSampler(shuffle=True), SequentialSampler -> DistributedSampler(shuffle=False) (call
    sampler.set_epoch(e) each epoch); a loader already over a distributed sampler is returned unchanged."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"prepare_loader: expected a torch.utils.data.DataLoader, got {type(loader).__name__}")
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        warnings.warn("prepare_loader: an IterableDataset cannot be sharded by a sampler; it must yield each rank's "
                      "share itself (torch.utils.data.get_worker_info / torch.distributed.get_rank)", stacklevel=3)
        return loader
    sampler = loader.sampler
    if isinstance(sampler, (DistributedSampler, DistributedResumableSampler)):
        return loader
    if loader.batch_size is None and loader.batch_sampler is not None:
        raise ValueError("prepare_loader: the loader uses a custom batch_sampler; give it a sampler and batch_size "
                         "instead, or shard the batch sampler yourself")
    if isinstance(sampler, ResumableSampler):
        new = DistributedResumableSampler(sampler.num_samples, num_replicas=world_size, rank=rank,
                                          shuffle=sampler.shuffle, seed=sampler.seed, drop_last=loader.drop_last)
        new.epoch = sampler.epoch
    elif isinstance(sampler, (RandomSampler, SequentialSampler)):
        new = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                 shuffle=isinstance(sampler, RandomSampler), seed=0, drop_last=loader.drop_last)
    else:
        raise ValueError(f"prepare_loader: cannot shard a loader whose sampler is {type(sampler).__name__}; use a "
                         "ResumableSampler, a RandomSampler / shuffle=True, a SequentialSampler, or pass an already "
                         "distributed sampler")
    kwargs = dict(batch_size=loader.batch_size, sampler=new, num_workers=loader.num_workers,
                  collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                  persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, **kwargs)
