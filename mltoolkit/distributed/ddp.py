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
import math
import warnings
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
        self._powersgd: Optional[_PowerSGDCheckpointing] = None

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
            self._powersgd = _PowerSGDCheckpointing(self.hook_state, ddp.module)
            ddp.register_comm_hook(self.hook_state, self._powersgd.hook)

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
        are gathered into it so each rank restores its own, and so is each rank's PowerSGD state (error feedback,
        low-rank factors, iteration and seed generator: world_size x the compressed gradients' size), so that a resume
        continues exactly. Barriers before and after, so no rank reads a half-written checkpoint or runs ahead."""
        rngs = gather_rng_states()
        hooks = _gather(self._powersgd.state_dict()) if self._powersgd is not None else None
        self.barrier()
        path = None
        if self.is_main:
            tagged = {_TAG: 1, "extra": extra, "rank_rng": rngs}
            if hooks is not None:
                tagged["powersgd"] = hooks
            path = manager.save(step, model=self.unwrap(model), optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, sampler=sampler, epoch=epoch, extra=tagged)
        self.barrier()
        return path

    def load_checkpoint(self, manager: Any, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                        scaler: Any = None, sampler: Any = None) -> Optional[Checkpoint]:
        self.barrier()
        ck = manager.load_latest(model=self.unwrap(model), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                 sampler=sampler, map_location="cpu")
        if ck is not None:
            hooks = ck.extra.get("powersgd") if isinstance(ck.extra, dict) and ck.extra.get(_TAG) == 1 else None
            unwrap_rank_extra(ck, self.rank, self.world_size)
            if self._powersgd is not None:
                if hooks is not None and len(hooks) == self.world_size:
                    self._powersgd.load_state_dict(hooks[self.rank])
                else:
                    warnings.warn(f"{ck.path}: no PowerSGD state for world size {self.world_size} in the checkpoint; "
                                  "PowerSGD's error feedback and iteration count restart", stacklevel=2)
        return ck


def _gather(obj: Any) -> Optional[list[Any]]:
    """Every rank's `obj` on rank 0 (None elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


class _PowerSGDCheckpointing:
    """torch's powerSGD_hook behind a thin wrapper that makes its state checkpointable.

    PowerSGDState keys its error feedback and low-rank factors by DDP bucket index, and DDP's buckets depend on the
    run (a fresh DDP starts with its initial buckets and rebuilds them after the first iteration). So the state is
    saved per parameter (by name): the wrapper records which parameters each bucket holds, state_dict() cuts the
    bucket tensors into per-parameter pieces, and after load_state_dict the pieces are assembled into each bucket of
    the new run's layout when the bucket is first seen; a layout change (DDP's bucket rebuild) is handled the same
    way. A state saved before PowerSGD started (still plain all-reduce) holds only the iteration count and seed."""

    def __init__(self, state: Any, module: nn.Module) -> None:
        self.state = state
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.layouts: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
        self.pending: Optional[dict[str, dict[str, torch.Tensor]]] = None
        self.relayouts = 0   # bucket layout changes seen (DDP's rebuild after the first iteration)

    def _layout(self, bucket: Any) -> list[tuple[str, tuple[int, ...]]]:
        return [(self.names.get(id(p), f"?{id(p)}"), tuple(p.shape)) for p in bucket.parameters()]

    def _compressed(self, layout: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, int, int]]:
        """(name, P size, Q size) of the compressed tensors, in powerSGD_hook's order (grouped by matrix shape in
        order of first appearance, bucket order within a shape)."""
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress
        st = self.state
        by_shape: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        for name, shape in layout:
            n = shape[0] if shape else 1
            m = math.prod(shape) // n if n else 0
            r = min(n, m, st.matrix_approximation_rank)
            if _should_compress(n, m, r, st.min_compression_rate)[0]:
                by_shape.setdefault((n, m), []).append((name, n * r, m * r))
        return [e for group in by_shape.values() for e in group]

    def hook(self, state, bucket):  # noqa: ANN001, ANN201 - DDP refuses a hook whose annotations are not its types
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook
        idx = bucket.index()
        layout = self._layout(bucket)
        known = self.layouts.get(idx)
        if known is not None and known != layout:   # DDP rebuilt its buckets: re-cut the state for the new layout
            self.pending = self._pieces()
            self.relayouts += 1
            self.layouts = {}
            for d in (state.error_dict, state.p_memory_dict, state.q_memory_dict):
                d.clear()
            known = None
        if known is None:
            self.layouts[idx] = layout
            if self.pending is not None:
                self._install(idx, layout, bucket.buffer())
        return powerSGD_hook(state, bucket)

    def _pieces(self) -> dict[str, dict[str, torch.Tensor]]:
        st, out = self.state, {"error": {}, "p": {}, "q": {}}
        if self.pending is not None:  # pieces not yet installed (buckets not seen since the load)
            for kind in out:
                out[kind].update(self.pending[kind])
        for idx, layout in self.layouts.items():
            if idx in st.error_dict:
                flat, off = st.error_dict[idx], 0
                for name, shape in layout:
                    numel = math.prod(shape)
                    out["error"][name] = flat[off:off + numel].detach().cpu().clone()
                    off += numel
            if idx in st.p_memory_dict and idx in st.q_memory_dict:
                p_off = q_off = 0
                for name, np_, nq in self._compressed(layout):
                    out["p"][name] = st.p_memory_dict[idx][p_off:p_off + np_].detach().cpu().clone()
                    out["q"][name] = st.q_memory_dict[idx][q_off:q_off + nq].detach().cpu().clone()
                    p_off, q_off = p_off + np_, q_off + nq
        return out

    def _install(self, idx: int, layout: list[tuple[str, tuple[int, ...]]], buffer: torch.Tensor) -> None:
        st, pending = self.state, self.pending
        if not pending["error"]:
            return   # saved before PowerSGD started: nothing to restore
        sizes = [(n, math.prod(shape)) for n, shape in layout]
        if not all(n in pending["error"] and pending["error"][n].numel() == k for n, k in sizes):
            warnings.warn(f"PowerSGD: the checkpoint's state does not fit DDP bucket {idx} (saved from another "
                          "model?): its error feedback and low-rank factors restart", stacklevel=2)
            return
        st.error_dict[idx] = torch.cat([pending["error"][n].reshape(-1) for n, _ in sizes]).to(buffer)
        comp = self._compressed(layout)
        if comp and all(n in pending["p"] and n in pending["q"] and pending["p"][n].numel() == np_
                        and pending["q"][n].numel() == nq for n, np_, nq in comp):
            st.p_memory_dict[idx] = torch.cat([pending["p"][n] for n, _, _ in comp]).to(buffer)
            st.q_memory_dict[idx] = torch.cat([pending["q"][n] for n, _, _ in comp]).to(buffer)

    def state_dict(self) -> dict[str, Any]:
        st = self.state
        kind, keys, pos, has_gauss, gauss = st.rng.get_state()   # plain types: loads with weights_only=True
        rng = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
               "has_gauss": int(has_gauss), "gauss": float(gauss)}
        return {"iter": st.iter, "rng": rng, "next_stats_report": st.next_stats_report,
                "matrix_approximation_rank": st.matrix_approximation_rank, **self._pieces()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        st = self.state
        if sd.get("matrix_approximation_rank", st.matrix_approximation_rank) != st.matrix_approximation_rank:
            warnings.warn(f"PowerSGD: the checkpoint was written with rank {sd['matrix_approximation_rank']}, this "
                          f"run uses {st.matrix_approximation_rank}: the low-rank factors restart", stacklevel=3)
            sd = {**sd, "p": {}, "q": {}}
        st.iter = int(sd["iter"])
        r = sd["rng"]
        st.rng.set_state((r["kind"], r["keys"].numpy().astype("uint32"), r["pos"], r["has_gauss"], r["gauss"]))
        st.next_stats_report = int(sd.get("next_stats_report", st.next_stats_report))
        for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            d.clear()
        self.layouts = {}
        self.pending = {k: dict(sd.get(k) or {}) for k in ("error", "p", "q")}


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
