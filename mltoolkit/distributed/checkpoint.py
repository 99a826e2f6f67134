"""Sharded checkpoints through torch.distributed.checkpoint (DCP), for models whose parameters are DTensors (FSDP2,
tensor parallel): each rank writes its own shards, nobody gathers the full model.

Layout, next to a CheckpointManager's files in its directory (same prefix and keep_last):

    <prefix>-<step:08d>.dcp/          one checkpoint: DCP's shard files and .metadata (model + optimizer state),
        meta.pt                       step, epoch, scheduler, grad scaler, sampler position, extra, model fingerprint
        rng-<rank>.pt                 each rank's RNG states
    <prefix>-dcp-latest.json          the pointer: kept checkpoints, oldest first

Crash safety, as CheckpointManager does for files: every rank writes into one temp directory
``.<prefix>-<step:08d>.dcp.tmp.<id>`` (the id is chosen by rank 0 and broadcast); after a barrier, rank 0 renames it
to its final name, fsyncs the directory, rewrites the pointer atomically, and only then deletes the checkpoints beyond
keep_last; a final barrier lets no rank run ahead. A process killed at any moment leaves the previous pointer and
checkpoints intact. The directory must be on a file system every rank sees (a shared one for multi-node runs).
Loading: every rank reads the same (newest complete) checkpoint, chosen by rank 0; a checkpoint of another model raises
CheckpointMismatchError before anything is loaded.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from mltoolkit.train.checkpoint import (
    FORMAT_NAME,
    Checkpoint,
    CheckpointMismatchError,
    CorruptCheckpointError,
    _atomic_write,
    _fsync_dir,
    _sampler_of,
    capture_rng_state,
    model_fingerprint,
    restore_rng_state,
)

__all__ = ["ShardedCheckpointer"]

_FORMAT = FORMAT_NAME + ".sharded"
_VERSION = 1


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when there is no process group: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class ShardedCheckpointer:
    """save / load of sharded checkpoints in a CheckpointManager's directory (its prefix and keep_last)."""

    def __init__(self, directory: str, prefix: str = "ckpt", keep_last: Optional[int] = 3) -> None:
        self.directory = os.fspath(directory)
        self.prefix = prefix
        self.keep_last = keep_last

    @classmethod
    def of(cls, manager: Any) -> ShardedCheckpointer:
        """From a mltoolkit.train.CheckpointManager (or anything with directory / prefix / keep_last)."""
        if isinstance(manager, (str, os.PathLike)):
            return cls(os.fspath(manager))
        return cls(manager.directory, getattr(manager, "prefix", "ckpt"), getattr(manager, "keep_last", 3))

    @property
    def pointer_path(self) -> str:
        return os.path.join(self.directory, f"{self.prefix}-dcp-latest.json")

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"{self.prefix}-{step:08d}.dcp")

    def entries(self) -> list[dict[str, Any]]:
        try:
            with open(self.pointer_path, encoding="utf-8") as f:
                pointer = json.load(f)
            return list(pointer["checkpoints"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"{self.pointer_path} is unreadable ({e}); using the checkpoint directories on disk",
                          stacklevel=3)
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            if name.startswith(self.prefix + "-") and name.endswith(".dcp") and not name.startswith("."):
                stem = name[len(self.prefix) + 1:-4]
                if stem.isdigit():
                    found.append({"dir": name, "step": int(stem)})
        return sorted(found, key=lambda e: e["step"])

    # -- save --------------------------------------------------------------------------------------------------------
    def save(self, step: int, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
             sampler: Any = None, epoch: Optional[int] = None, extra: Any = None) -> str:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
        rank = dist.get_rank() if dist.is_initialized() else 0
        final = self.path_for(step)
        tmp_name = _broadcast(f".{os.path.basename(final)}.tmp.{uuid.uuid4().hex[:8]}" if rank == 0 else None)
        tmp = os.path.join(self.directory, tmp_name)
        if rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            self._cleanup_temps()
            os.makedirs(tmp)
        _barrier()
        try:
            if optimizer is not None:
                msd, osd = get_state_dict(model, optimizer)
                state = {"model": msd, "optimizer": osd}
            else:
                state = {"model": get_model_state_dict(model)}
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
            torch.save(capture_rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
            fingerprint = model_fingerprint(state["model"])
            if rank == 0:
                if sampler is None or isinstance(sampler, Mapping):
                    sampler_state = None if sampler is None else dict(sampler)
                else:
                    sampler_state = _sampler_of(sampler).state_dict()
                meta = {"format": _FORMAT, "format_version": _VERSION, "step": step, "epoch": epoch,
                        "fingerprint": fingerprint, "has_optimizer": optimizer is not None,
                        "scheduler": None if scheduler is None else scheduler.state_dict(),
                        "scaler": None if scaler is None else scaler.state_dict(),
                        "sampler": sampler_state, "extra": extra,
                        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                        "torch_version": str(torch.__version__), "time": time.time()}
                _atomic_write(os.path.join(tmp, "meta.pt"), lambda f: torch.save(meta, f))
            ok = True
        except BaseException:
            ok = False
            raise
        finally:
            # every rank must reach the barrier, also when one failed, so that no rank hangs
            oks = [None] * dist.get_world_size() if dist.is_initialized() else [ok]
            if dist.is_initialized():
                dist.all_gather_object(oks, ok)
            if rank == 0 and not all(oks):
                shutil.rmtree(tmp, ignore_errors=True)
        if not all(oks):
            raise RuntimeError(f"save_checkpoint: another rank failed while writing step {step}; nothing was published")
        if rank == 0:
            self._publish(tmp, final, step, fingerprint["digest"])
        _barrier()
        return final

    def _publish(self, tmp: str, final: str, step: int, digest: str) -> None:
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # re-saving a step: move the old one aside, delete it after the pointer is written
            old = final + f".old.{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        entries = [e for e in self.entries() if e["dir"] != os.path.basename(final)]
        entries.append({"dir": os.path.basename(final), "step": step, "fingerprint": digest, "time": time.time()})
        kept = entries if self.keep_last is None else entries[-self.keep_last:]
        pointer = {"format": _FORMAT, "version": _VERSION, "latest": kept[-1]["dir"], "checkpoints": kept}
        data = json.dumps(pointer, indent=1).encode()
        _atomic_write(self.pointer_path, lambda f: f.write(data))
        keep = {e["dir"] for e in kept}
        for e in entries:
            if e["dir"] not in keep:
                shutil.rmtree(os.path.join(self.directory, e["dir"]), ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.directory)

    def _cleanup_temps(self) -> None:
        stem = f".{self.prefix}-"
        for name in os.listdir(self.directory):
            if name.startswith(stem) and (".dcp.tmp." in name or ".dcp.old." in name):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # -- load --------------------------------------------------------------------------------------------------------
    def _choose(self) -> tuple[Optional[str], list[str]]:
        """Rank 0 picks the newest complete checkpoint (a .metadata and meta.pt present)."""
        problems = []
        for e in reversed(self.entries()):
            path = os.path.join(self.directory, e["dir"])
            if all(os.path.exists(os.path.join(path, f)) for f in (".metadata", "meta.pt")):
                return path, problems
            problems.append(f"{path}: missing or incomplete")
            warnings.warn(f"skipping sharded checkpoint {path}: missing or incomplete", stacklevel=3)
        return None, problems

    def load_latest(self, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
                    sampler: Any = None, restore_rng: bool = True) -> Optional[Checkpoint]:
        """Collective. Loads the newest complete checkpoint into the given objects; None when there is none."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        chosen = _broadcast(self._choose() if rank == 0 else None)
        path, problems = chosen
        if path is None:
            if problems:
                raise CorruptCheckpointError(f"no usable sharded checkpoint in {self.directory}: "
                                             + " | ".join(problems))
            return None
        return self.load(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                         sampler=sampler, restore_rng=restore_rng)

    def load(self, path: str, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
             sampler: Any = None, restore_rng: bool = True) -> Checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        meta = torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise CorruptCheckpointError(f"{path}: not an mltoolkit sharded checkpoint")
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optimizer": osd}
        else:
            state = {"model": get_model_state_dict(model)}
        ours = model_fingerprint(state["model"])
        if ours["digest"] != meta["fingerprint"]["digest"]:
            have = {k: tuple(s) for k, s in meta["fingerprint"]["entries"]}
            want = {k: tuple(s) for k, s in ours["entries"]}
            diff = [f"missing in the checkpoint: {k}" for k in want if k not in have][:4]
            diff += [f"not in the model: {k}" for k in have if k not in want][:4]
            diff += [f"shape of {k}: checkpoint {list(have[k])}, model {list(want[k])}" for k in want
                     if k in have and have[k] != want[k]][:4]
            raise CheckpointMismatchError(f"{path}: checkpoint was saved from a different model: "
                                          f"{'; '.join(diff)}. Nothing was loaded.")
        wanted = {"optimizer": optimizer if not meta.get("has_optimizer") else None, "scheduler": scheduler,
                  "sampler": sampler}
        absent = [k for k, obj in wanted.items() if obj is not None and (k == "optimizer" or meta.get(k) is None)]
        if absent:
            raise CheckpointMismatchError(f"{path}: checkpoint holds no {' / '.join(absent)} state; pass None for "
                                          "them to load the rest")
        rng_file = os.path.join(path, f"rng-{dist.get_rank() if dist.is_initialized() else 0}.pt")
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        else:
            set_model_state_dict(model, state["model"])
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        if sampler is not None:
            _sampler_of(sampler).load_state_dict(meta["sampler"])
        if restore_rng:
            if os.path.exists(rng_file):
                restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
            else:
                warnings.warn(f"{path}: no RNG state for this rank (saved with world size {meta.get('world_size')}); "
                              "RNG not restored", stacklevel=3)
        return Checkpoint(path=path, step=int(meta["step"]), epoch=meta.get("epoch"), extra=meta.get("extra"),
                          state=meta)
