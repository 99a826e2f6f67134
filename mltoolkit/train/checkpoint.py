"""Checkpoints that survive being killed, and resume that continues exactly where training stopped.

    from mltoolkit.train.checkpoint import CheckpointManager, ResumableSampler

    sampler = ResumableSampler(len(dataset), seed=1234)                 # a new permutation each epoch
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, generator=torch.Generator())
    ckpt = CheckpointManager("runs/exp1/checkpoints", keep_last=3)
    state = ckpt.load_latest(model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler)
    step = state.step if state else 0                                   # None: nothing saved yet, start fresh
    while step < total_steps:
        for x, y in loader:                                             # after a resume: the rest of the epoch
            ...train one step...; step += 1
            if step % 500 == 0:
                ckpt.save(step, model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler)
            if step == total_steps:
                break

A checkpoint (one file, ``<prefix>-<step:08d>.pt``, written with torch.save) holds the model, optimizer, LR-scheduler
and grad-scaler state dicts, the RNG states (python ``random``, numpy's global generator when numpy is installed, torch
CPU and every CUDA device), step, epoch, the sampler position, user ``extra`` data, a format version and a model
fingerprint (state-dict names and shapes).

Crash safety. A checkpoint is written to a temp file in the same directory, flushed and fsync'ed, renamed over its
final name with os.replace and the directory fsync'ed; only then is the pointer file ``<prefix>-latest.json`` (which
lists the kept checkpoints with their size and SHA-256) rewritten the same way, and only after that are checkpoints
beyond ``keep_last`` deleted. A process killed at any moment leaves the previous pointer and checkpoint intact (and at
most a temp file, removed by the next save). ``load_latest`` checks each file against its recorded size and hash,
warns and falls back to the previous checkpoint when one is corrupt or missing. One process (rank 0) writes a
directory.

Bad input. Loading a checkpoint saved from another model (names or shapes differ), or one that lacks a state the
caller asks for, raises CheckpointMismatchError naming what differs, before anything is modified; nothing on disk is
touched by a load, and a manager refuses to save a different model into a directory that holds checkpoints of
another one (``allow_model_change=True`` to override) so that pruning never deletes them.

Exact resume on CPU. With the same code, data and thread count, a run killed after any step and resumed from its
latest checkpoint ends with parameters bit-identical to an uninterrupted run, provided every source of randomness is
either captured here (global RNGs, the sampler) or seeded from them. Two DataLoader details matter: (1) pass the
DataLoader its own ``generator=torch.Generator()``: each ``iter(loader)`` otherwise draws a seed from the global torch
RNG, and the resumed run's extra ``iter`` at the resume point would shift every later dropout mask; (2) with
``num_workers=0`` the sampler knows how many samples the loop has received; with workers the loader prefetches
ahead, so save ``sampler=sampler.state_dict(consumed=n)`` with n the samples consumed in the current epoch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed with torch in practice
    _np = None

FORMAT_NAME = "mltoolkit.checkpoint"
FORMAT_VERSION = 1
_POINTER_VERSION = 1

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "ResumableSampler",
    "capture_rng_state",
    "load_checkpoint",
    "model_fingerprint",
    "restore_rng_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, altered or unreadable."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit what it is loaded into (another model, missing state)."""


# --------------------------------------------------------------------------------------------------------------------
# Resumable sampler
# --------------------------------------------------------------------------------------------------------------------


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A shuffling sampler whose position can be saved and restored, so that a resumed DataLoader yields exactly the
    batches the interrupted one had not yet yielded.

    Epoch e visits the indices in the order torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
    (0..n-1 in order with shuffle=False), whatever the global RNG state. ``state_dict()`` gives ``epoch`` and ``index``
    (samples of that epoch already handed out); ``load_state_dict`` makes the next ``iter`` start there. When an
    iteration runs to the end, the sampler moves to the next epoch by itself, so a loop ``for x in loader`` over
    several epochs needs no set_epoch call; ``set_epoch(e)`` (DistributedSampler's API) moves to the start of epoch e,
    and is a no-op for the current epoch, so that calling it at the top of every epoch does not undo a resume.
    An iteration abandoned midway (``break``) leaves the position where it stopped: the next ``iter`` continues.

    Use with ``DataLoader(dataset, batch_size=B, sampler=sampler, generator=torch.Generator())``; with
    ``num_workers=0`` (the main-process loader fetches indices only as batches are requested) the recorded position
    is exactly what the loop consumed. With ``num_workers > 0`` the loader runs ahead of the loop: record the
    position yourself with ``sampler.state_dict(consumed=batches_done_this_epoch * B)``.
    """

    def __init__(self, data_source: Union[int, Any], *, shuffle: bool = True, seed: int = 0):
        if isinstance(data_source, bool) or not isinstance(data_source, int):
            try:
                data_source = len(data_source)
            except TypeError as e:
                raise TypeError("ResumableSampler: data_source must be a dataset with __len__ or an int, got "
                                f"{type(data_source).__name__}") from e
        if data_source < 0:
            raise ValueError(f"ResumableSampler: data_source length must be >= 0, got {data_source}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"ResumableSampler: seed must be an int, got {type(seed).__name__}")
        self.num_samples = int(data_source)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.epoch = 0
        self.index = 0

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self, epoch: Optional[int] = None) -> list[int]:
        """The order of epoch `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.permutation()
        while self.index < self.num_samples:
            i = order[self.index]
            self.index += 1
            yield i
        self.epoch += 1
        self.index = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.index = 0

    def state_dict(self, consumed: Optional[int] = None) -> dict[str, int]:
        """{"epoch", "index", "seed", "num_samples", "shuffle"}; `consumed` overrides the index (for loaders with
        workers, which fetch ahead of the training loop)."""
        index = self.index if consumed is None else int(consumed)
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"ResumableSampler.state_dict: consumed must be in [0, {self.num_samples}], got {index}")
        return {"epoch": self.epoch, "index": index, "seed": self.seed, "num_samples": self.num_samples,
                "shuffle": int(self.shuffle)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("epoch", "index") if k not in state]
        if missing:
            raise CheckpointMismatchError(f"ResumableSampler.load_state_dict: state lacks {missing}")
        n = state.get("num_samples", self.num_samples)
        if n != self.num_samples:
            raise CheckpointMismatchError(f"ResumableSampler.load_state_dict: saved for a dataset of {n} samples, "
                                          f"this sampler has {self.num_samples}")
        if state.get("seed", self.seed) != self.seed or bool(state.get("shuffle", self.shuffle)) != self.shuffle:
            warnings.warn(f"ResumableSampler: restoring a position saved with seed={state.get('seed')}, "
                          f"shuffle={bool(state.get('shuffle'))} into a sampler with seed={self.seed}, "
                          f"shuffle={self.shuffle}; the saved seed and shuffle flag are used", stacklevel=2)
            self.seed = int(state.get("seed", self.seed))
            self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])


def _sampler_of(obj: Any) -> Any:
    """The object whose state_dict is the data position: a sampler, or a DataLoader's (batch) sampler."""
    if isinstance(obj, torch.utils.data.DataLoader):
        for cand in (obj.sampler, getattr(obj.batch_sampler, "sampler", None), obj.batch_sampler):
            if cand is not None and hasattr(cand, "state_dict") and hasattr(cand, "load_state_dict"):
                return cand
        raise TypeError("CheckpointManager: sampler= is a DataLoader whose sampler has no state_dict / "
                        "load_state_dict; give it a ResumableSampler")
    if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
        raise TypeError(f"CheckpointManager: sampler= must have state_dict/load_state_dict (e.g. ResumableSampler) "
                        f"or be a DataLoader over one, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------------------------------------
# RNG state and model fingerprint
# --------------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python random, numpy's global generator (if installed), torch CPU and every initialized CUDA device. Stored
    in plain types and tensors only, so the checkpoint loads with torch.load(weights_only=True)."""
    pv, pstate, pg = random.getstate()
    state: dict[str, Any] = {"python": [pv, list(pstate), pg], "torch": torch.get_rng_state()}
    if _np is not None:
        kind, keys, pos, has_gauss, gauss = _np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(_np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state (missing parts are left alone)."""
    if "python" in state:
        pv, pstate, pg = state["python"]
        random.setstate((int(pv), tuple(int(v) for v in pstate), pg))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state and _np is not None:
        s = state["numpy"]
        keys = s["keys"].cpu().numpy().astype(_np.uint32)
        _np.random.set_state((s["kind"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["gauss"])))
    if state.get("cuda") and torch.cuda.is_available():
        saved = list(state["cuda"])
        n = torch.cuda.device_count()
        if len(saved) != n:
            warnings.warn(f"checkpoint holds RNG states of {len(saved)} CUDA devices, this process sees {n}: "
                          f"restoring the first {min(n, len(saved))}", stacklevel=3)
        for i in range(min(n, len(saved))):
            torch.cuda.set_rng_state(saved[i].cpu(), i)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers, so that checkpoints move
    between wrapped and plain models."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _entries(state_dict: Mapping[str, Any]) -> list[list[Any]]:
    return [[k, list(v.shape)] for k, v in state_dict.items() if isinstance(v, torch.Tensor)]


def model_fingerprint(model_or_state_dict: Union[nn.Module, Mapping[str, Any]]) -> dict[str, Any]:
    """{"entries": [[name, shape], ...] over the state dict's tensors (parameters and buffers), "digest": sha256}.
    Dtypes and devices are left out: a checkpoint of an fp32 CPU model loads into the same model in bf16 on a GPU."""
    sd = (_unwrap(model_or_state_dict).state_dict() if isinstance(model_or_state_dict, nn.Module)
          else model_or_state_dict)
    entries = _entries(sd)
    digest = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()
    return {"entries": entries, "digest": digest}


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _model_diff(saved: Mapping[str, Any], model: nn.Module, strict: bool) -> Optional[str]:
    """What differs between a saved model state dict and `model` (None when it fits)."""
    have = {k: tuple(v.shape) for k, v in saved.items() if isinstance(v, torch.Tensor)}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k} (checkpoint {list(have[k])}, model {list(want[k])})" for k in want if k in have
              and have[k] != want[k]]
    parts = []
    if missing and strict:
        parts.append(f"missing in the checkpoint: {_list(missing)}")
    if unexpected and strict:
        parts.append(f"not in the model: {_list(unexpected)}")
    if shapes:
        parts.append(f"shape differs: {_list(shapes, 5)}")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------------------------


class _HashingWriter:
    """File wrapper that hashes what torch.save writes (no second read of a large file)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _replace(src: str, dst: str) -> None:
    """os.replace (a seam for tests that simulate a crash between writing and publishing)."""
    os.replace(src, dst)


def _atomic_write(path: str, write: Callable[[Any], None]) -> tuple[str, int]:
    """Write `path` through `write(file)` via a temp file in the same directory + fsync + os.replace + directory
    fsync. Returns (sha256 hex, size). On any error the temp file is removed and `path` is untouched."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:
            w = _HashingWriter(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return w.sha.hexdigest(), w.size


def _file_sha256(path: str) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: `state` is the whole dict that torch.load returned."""

    path: str
    step: int
    epoch: Optional[int]
    extra: Any
    state: dict[str, Any]


_REQUIRED = ("format", "format_version", "step", "model", "fingerprint")


def _read(path: str, map_location: Any, weights_only: bool) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as e:
        if weights_only and "Unpickl" in type(e).__name__:
            raise CheckpointError(f"{path}: holds objects that torch.load(weights_only=True) refuses (in `extra`?); "
                                  f"if you trust the file, load it with weights_only=False. ({e})") from e
        raise CorruptCheckpointError(f"{path}: cannot be read by torch.load ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an mltoolkit checkpoint (no format tag '{FORMAT_NAME}')")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointMismatchError(f"{path}: checkpoint lacks the keys {missing}")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state['format_version']} is newer than this "
                              f"mltoolkit reads ({FORMAT_VERSION}); upgrade mltoolkit")
    return state


def _apply(path: str, state: dict[str, Any], *, model, optimizer, scheduler, scaler, sampler, restore_rng: bool,
           strict: bool) -> Checkpoint:
    """Check everything that can be checked, then load into the given objects."""
    wanted = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "sampler": sampler}
    absent = [k for k, obj in wanted.items() if obj is not None and state.get(k) is None]
    if absent:
        raise CheckpointMismatchError(f"{path}: checkpoint holds no {' / '.join(absent)} state (it was saved without "
                                      f"{', '.join(k + '=' for k in absent)}); pass None for them to load the rest")
    if restore_rng and state.get("rng") is None:
        raise CheckpointMismatchError(f"{path}: checkpoint holds no RNG state; pass restore_rng=False")
    if model is not None:
        model = _unwrap(model)
        diff = _model_diff(state["model"], model, strict)
        if diff is not None:
            ours = model_fingerprint(model)["digest"][:12]
            theirs = state["fingerprint"]["digest"][:12]
            raise CheckpointMismatchError(f"{path}: checkpoint was saved from a different model (fingerprint {theirs}, "
                                          f"this model {ours}): {diff}. Nothing was loaded.")
    if sampler is not None:
        sampler = _sampler_of(sampler)
    if scaler is not None and not state["scaler"] and getattr(scaler, "is_enabled", lambda: False)():
        raise CheckpointMismatchError(f"{path}: checkpoint's grad-scaler state is empty (saved from a disabled "
                                      "GradScaler) but the given scaler is enabled")
    if optimizer is not None:  # torch checks group sizes only while loading: check first, so nothing half-loads
        saved_groups = state["optimizer"].get("param_groups", [])
        ours = [len(g["params"]) for g in optimizer.param_groups]
        theirs = [len(g["params"]) for g in saved_groups]
        if ours != theirs:
            raise CheckpointMismatchError(f"{path}: optimizer parameter groups differ: checkpoint has groups of "
                                          f"{theirs} parameters, this optimizer {ours}. Nothing was loaded.")
    if model is not None:
        model.load_state_dict(state["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return Checkpoint(path=path, step=int(state["step"]), epoch=state.get("epoch"), extra=state.get("extra"),
                      state=state)


def load_checkpoint(path: Union[str, os.PathLike], *, model: Optional[nn.Module] = None, optimizer=None,
                    scheduler=None, scaler=None, sampler=None, restore_rng: bool = True, strict: bool = True,
                    map_location: Any = "cpu", weights_only: bool = True) -> Checkpoint:
    """Load one checkpoint file into the given objects (each optional; None: left alone). Every check (model
    names and shapes, presence of each requested state, optimizer groups) runs before anything is modified.
    strict=False lets model keys be missing / unexpected (shapes must still match)."""
    path = os.fspath(path)
    state = _read(path, map_location, weights_only)
    return _apply(path, state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, sampler=sampler,
                  restore_rng=restore_rng, strict=strict)


# --------------------------------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves checkpoints `<prefix>-<step:08d>.pt` in `directory`, keeps the last `keep_last` (None: all), and loads
    the newest good one. See the module docstring for the guarantees.

        mgr = CheckpointManager("ckpts", keep_last=3)
        mgr.save(step, model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler, epoch=epoch,
                 extra={"best_loss": best})
        ck = mgr.load_latest(model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler)
        if ck is not None: step, extra = ck.step, ck.extra
    """

    def __init__(self, directory: Union[str, os.PathLike], keep_last: Optional[int] = 3, prefix: str = "ckpt", *,
                 allow_model_change: bool = False):
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            raise ValueError(f"CheckpointManager: keep_last must be an int >= 1 or None, got {keep_last!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", prefix):
            raise ValueError(f"CheckpointManager: prefix must be a plain file-name stem (letters, digits, _ . -), "
                             f"got {prefix!r}")
        self.directory = os.fspath(directory)
        self.keep_last = keep_last
        self.prefix = prefix
        self.allow_model_change = allow_model_change
        self._file_re = re.compile(rf"{re.escape(prefix)}-(\d+)\.pt")
        self._tmp_re = re.compile(rf"\.{re.escape(prefix)}-(\d+\.pt|latest\.json)\.tmp\.\d+\.[0-9a-f]{{8}}")
        os.makedirs(self.directory, exist_ok=True)

    # -- files -------------------------------------------------------------------------------------------------------
    @property
    def pointer_path(self) -> str:
        return os.path.join(self.directory, f"{self.prefix}-latest.json")

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"{self.prefix}-{step:08d}.pt")

    def _read_pointer(self) -> Optional[dict[str, Any]]:
        try:
            with open(self.pointer_path, encoding="utf-8") as f:
                pointer = json.load(f)
            if not isinstance(pointer.get("checkpoints"), list):
                raise ValueError("no checkpoint list")
            return pointer
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            warnings.warn(f"{self.pointer_path} is unreadable ({e}); falling back to the checkpoint files on disk "
                          "(checked by loading, without hashes)", stacklevel=3)
            return None

    def _entries(self) -> list[dict[str, Any]]:
        """Kept checkpoints, oldest first: from the pointer, or (pointer lost) from the files on disk by step."""
        pointer = self._read_pointer()
        if pointer is not None:
            return list(pointer["checkpoints"])
        found = []
        for name in os.listdir(self.directory):
            m = self._file_re.fullmatch(name)
            if m:
                found.append({"file": name, "step": int(m.group(1)), "sha256": None, "bytes": None,
                              "fingerprint": None})
        return sorted(found, key=lambda e: e["step"])

    def checkpoints(self) -> list[str]:
        """Paths of the kept checkpoints, oldest first (as recorded; not verified)."""
        return [os.path.join(self.directory, e["file"]) for e in self._entries()]

    def latest_path(self) -> Optional[str]:
        """The newest recorded checkpoint (not verified; load_latest verifies)."""
        entries = self._entries()
        return os.path.join(self.directory, entries[-1]["file"]) if entries else None

    def _cleanup_temps(self) -> None:
        for name in os.listdir(self.directory):
            if self._tmp_re.fullmatch(name):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass

    # -- save --------------------------------------------------------------------------------------------------------
    def save(self, step: int, *, model: nn.Module, optimizer=None, scheduler=None, scaler=None, sampler=None,
             epoch: Optional[int] = None, extra: Any = None, rng: bool = True) -> str:
        """Write the checkpoint of `step` atomically, point `latest` at it, then delete checkpoints beyond
        keep_last. `sampler` is a ResumableSampler (or any object with state_dict), a DataLoader over one, or a
        position dict (e.g. sampler.state_dict(consumed=n)). Returns the path."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"CheckpointManager.save: step must be an int >= 0, got {step!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"CheckpointManager.save: model must be an nn.Module, got {type(model).__name__}")
        base = _unwrap(model)
        fingerprint = model_fingerprint(base)
        entries = self._entries()
        if entries and not self.allow_model_change:
            prev = entries[-1].get("fingerprint")
            if prev is not None and prev != fingerprint["digest"]:
                raise CheckpointMismatchError(
                    f"CheckpointManager.save: {self.directory} holds checkpoints of a different model (fingerprint "
                    f"{prev[:12]}, this model {fingerprint['digest'][:12]}); saving here would rotate them out. "
                    "Use another directory or CheckpointManager(..., allow_model_change=True).")
        self._cleanup_temps()  # left by a process killed mid-save
        if sampler is None or isinstance(sampler, Mapping):
            sampler_state = None if sampler is None else dict(sampler)
        else:
            sampler_state = _sampler_of(sampler).state_dict()
        state = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "model": base.state_dict(),
            "fingerprint": fingerprint,
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "sampler": sampler_state,
            "rng": capture_rng_state() if rng else None,
            "extra": extra,
            "torch_version": str(torch.__version__),
            "time": time.time(),
        }
        path = self.path_for(step)
        sha, size = _atomic_write(path, lambda f: torch.save(state, f))
        entry = {"file": os.path.basename(path), "step": step, "sha256": sha, "bytes": size,
                 "fingerprint": fingerprint["digest"], "time": state["time"]}
        entries = [e for e in entries if e["file"] != entry["file"]] + [entry]
        kept = entries if self.keep_last is None else entries[-self.keep_last:]
        pointer = {"format": FORMAT_NAME, "version": _POINTER_VERSION, "latest": entry["file"], "checkpoints": kept}
        data = json.dumps(pointer, indent=1).encode()
        _atomic_write(self.pointer_path, lambda f: f.write(data))
        # Only now, with the new checkpoint and pointer in place, remove what fell out of the list (and files a
        # killed process renamed into place but never recorded).
        keep = {e["file"] for e in kept}
        removed = False
        for name in os.listdir(self.directory):
            if self._file_re.fullmatch(name) and name not in keep:
                try:
                    os.unlink(os.path.join(self.directory, name))
                    removed = True
                except OSError:
                    pass
        if removed:
            _fsync_dir(self.directory)
        return path

    # -- load --------------------------------------------------------------------------------------------------------
    def load(self, path: Union[str, os.PathLike], **kwargs) -> Checkpoint:
        """load_checkpoint(path, ...) with the file's hash checked against the pointer when it is recorded there."""
        path = os.fspath(path)
        if not os.path.exists(path) and not os.path.isabs(path):
            path = os.path.join(self.directory, path)
        for e in self._entries():
            if os.path.abspath(os.path.join(self.directory, e["file"])) == os.path.abspath(path):
                self._verify(path, e)
        return load_checkpoint(path, **kwargs)

    def _verify(self, path: str, entry: Mapping[str, Any]) -> None:
        if not os.path.exists(path):
            raise CorruptCheckpointError(f"{path}: recorded in {self.pointer_path} but missing")
        if entry.get("sha256") is None:
            return
        sha, size = _file_sha256(path)
        if size != entry.get("bytes") or sha != entry["sha256"]:
            raise CorruptCheckpointError(f"{path}: contents differ from what was written ({size} bytes, sha256 "
                                         f"{sha[:12]}; recorded {entry.get('bytes')} bytes, {entry['sha256'][:12]})")

    def load_latest(self, *, model: Optional[nn.Module] = None, optimizer=None, scheduler=None, scaler=None,
                    sampler=None, restore_rng: bool = True, strict: bool = True, map_location: Any = "cpu",
                    weights_only: bool = True) -> Optional[Checkpoint]:
        """Load the newest good checkpoint into the given objects; None when the directory holds none. A corrupt,
        truncated or missing file is skipped with a warning (the previous one is tried); a checkpoint that does not
        fit (CheckpointMismatchError) raises at once: falling back would silently resume from an older state."""
        entries = self._entries()
        if not entries:
            return None
        problems = []
        for e in reversed(entries):
            path = os.path.join(self.directory, e["file"])
            try:
                self._verify(path, e)
                state = _read(path, map_location, weights_only)
            except (CorruptCheckpointError, FileNotFoundError) as err:
                problems.append(str(err))
                warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
                continue
            return _apply(path, state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                          sampler=sampler, restore_rng=restore_rng, strict=strict)
        raise CorruptCheckpointError(f"no usable checkpoint in {self.directory}: " + " | ".join(problems))
