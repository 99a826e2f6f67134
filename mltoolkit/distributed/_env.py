"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and the
helpers every distributed strategy shares."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["init_process_group", "env_rank", "env_world_size", "env_local_rank", "default_device", "DistributedBase"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def env_rank() -> int:
    return _env_int("RANK", 0)


def env_world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def env_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def default_device(backend: Optional[str] = None) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (and the backend is not gloo), else the CPU."""
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", env_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> str:
    """Initialise the default process group from torchrun's environment variables; idempotent (an existing group is
    kept). backend None: "nccl" when CUDA is available, else "gloo". Returns the backend in use."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if dist.is_initialized():
        return dist.get_backend()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "mpi", "ucc", "xccl", "cpu:gloo,cuda:nccl"):
        raise ValueError(f"unknown process-group backend {backend!r}; use 'nccl' (GPUs) or 'gloo' (CPU)")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and env_world_size() > 1:
        raise RuntimeError(f"WORLD_SIZE={env_world_size()} but {missing} are not set: start the script with torchrun "
                           "(torchrun --nproc-per-node=N train.py)")
    if env_world_size() == 1:  # a distributed strategy in a plain single process: a one-rank group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(default_device(backend))
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, rank=env_rank(), world_size=env_world_size(), **kwargs)
    return backend


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedBase:
    """Mixin of the identity / life-cycle methods for strategies on the default process group."""

    backend: Optional[str] = None
    _owns_group = False

    def setup(self) -> None:
        if not dist.is_initialized():
            self._owns_group = True
        self.backend = init_process_group(self.backend)
        if self._device is None or (self._device.type == "cuda" and self._device.index is None):
            self._device = default_device(self.backend)   # "cuda" alone: this process's GPU, cuda:LOCAL_RANK
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)

    def teardown(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def _require(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__}: call strategy.setup() first (no process group)")

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else env_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else env_world_size()

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = default_device(self.backend)
        return self._device

    def barrier(self) -> None:
        if dist.is_initialized():
            if dist.get_backend() == "nccl" and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def reduce_mean(self, value) -> float:
        t = value.detach().float().mean() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(t.item())
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev, torch.float64).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / dist.get_world_size()
