"""Worker processes of tests/test_trainer_distributed.py: each rank of a 2-process gloo group on the CPU trains with
mltoolkit.train.Trainer under a distributed strategy and compares with a single-process Trainer run computed in the
same process (same seed, same global batch: DDP / FSDP give each rank batch_size B, the reference 2B; tensor parallel
reads the same batches on every rank)."""
from __future__ import annotations

import os
import time
import traceback
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.dist_workers import quiesce

N, B = 40, 4          # 40 samples; per-rank batch 4, global 8: 5 batches an epoch, 3 steps with accumulation over 2


class Killed(Exception):
    pass


def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def _regression() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, generator=g)
    return TensorDataset(x, torch.tanh(x[:, :4] * 2) + 0.1 * torch.randn(N, 4, generator=g))


def _tokens() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 64, (N, 9), generator=g)
    return TensorDataset(t[:, :-1], t[:, 1:])    # (inputs, targets): the Trainer's default token cross-entropy


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 4))


class _Reversed(nn.Module):
    """An MLP whose modules are registered in the reverse of their use: DDP's initial buckets (reverse registration
    order) differ from the ones it rebuilds after the first iteration (gradient-ready order)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.out = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.2)
        self.inp = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.inp(x))))


def _transformer() -> nn.Module:
    from mltoolkit.distributed import TinyTransformer
    torch.manual_seed(0)
    return TinyTransformer(depth=2)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters (DTensors gathered). The key-projection bias is left out: its exact gradient is 0, so Adam turns
    rounding noise into full-size steps that differ between runs (see tests/dist_workers.py)."""
    from mltoolkit.distributed._dtensor import is_dtensor
    model = getattr(model, "module", model)
    return {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()
            if not n.endswith("k_proj.bias")}


def _close(a, b, atol, rtol, what) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
        for k in a:
            _close(a[k], b[k], atol, rtol, f"{what}[{k}]")
        return
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs diff {err:.3g}\n{a}\n{b}"


def _series(history, key):
    return [r[key] for r in history if key in r]


def _trainer(model, loader, **kw):
    from mltoolkit.optim import AdamW
    from mltoolkit.train import Trainer
    kw.setdefault("max_epochs", 2)
    kw.setdefault("strategy", "single")
    if kw["strategy"] == "single":
        kw.setdefault("device", "cpu")
    return Trainer(model, lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.01), loader, grad_accum_steps=2,
                   max_grad_norm=0.5, log_every=1, progress_bar=None, seed=0, **kw)


def _compare(tr, ref, atol, rtol, what) -> None:
    """Logged training losses, gradient norms, lrs and the final parameters of `tr` against the reference run."""
    assert tr.step == ref.step, (what, tr.step, ref.step)
    for key in ("train/loss", "grad_norm", "lr"):
        got, want = _series(tr.history, key), _series(ref.history, key)
        assert len(got) == len(want) > 0, (what, key, len(got), len(want))
        _close(got, want, atol, rtol, f"{what} {key}")
    _close(_full(tr.model), _full(ref.model), atol * 5, rtol * 10, f"{what} params")


# --------------------------------------------------------------------------------------------------------------------


def check_ddp(rank: int, world: int, tmp: str) -> None:
    """strategy="auto" under a torchrun-like environment (DDP) over a ResumableSampler loader, and strategy="ddp" over a
    shuffle=True loader (DistributedSampler: the Trainer must call set_epoch each epoch), against single-process runs
    with batch 2B; rank-0-only CSV logs."""
    from mltoolkit.distributed import DDPStrategy, DistributedResumableSampler
    from mltoolkit.train import ResumableSampler

    ds = _regression()
    ref = _trainer(_mlp(), DataLoader(ds, batch_size=world * B, sampler=ResumableSampler(N, seed=3)))
    ref.fit()
    logs = os.path.join(tmp, f"logs-rank{rank}")
    tr = _trainer(_mlp(), DataLoader(ds, batch_size=B, sampler=ResumableSampler(N, seed=3)), strategy="auto",
                  loggers=("csv",), log_dir=logs)
    assert isinstance(tr.strategy, DDPStrategy), type(tr.strategy)
    tr.fit()
    assert isinstance(tr.train_loader.sampler, DistributedResumableSampler) and len(tr.train_loader) == 5
    _compare(tr, ref, 1e-6, 1e-5, "ddp[auto]")
    if rank == 0:
        import csv
        with open(os.path.join(logs, "metrics.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted(os.listdir(logs)) == ["hparams.json", "metrics.csv"], os.listdir(logs)
        assert [int(r["step"]) for r in rows] == [r["step"] for r in tr.history], rows
        _close([float(r["train/loss"]) for r in rows], _series(tr.history, "train/loss"), 1e-6, 1e-6, "csv loss")
    else:
        assert not os.path.exists(logs), f"rank 1 wrote logs: {os.listdir(logs)}"
    # shuffle=True: DistributedSampler(seed=0) deals randperm(N, seed 0 + epoch) round-robin, which is the order of
    # ResumableSampler(seed=0) on one process; without set_epoch, epoch 1 would repeat epoch 0's order.
    ref = _trainer(_mlp(), DataLoader(ds, batch_size=world * B, sampler=ResumableSampler(N, seed=0)), max_epochs=3)
    ref.fit()
    tr = _trainer(_mlp(), DataLoader(ds, batch_size=B, shuffle=True), strategy="ddp", max_epochs=3)
    tr.fit()
    assert isinstance(tr.train_loader.sampler, torch.utils.data.DistributedSampler)
    assert tr.train_loader.sampler.epoch == 2
    _compare(tr, ref, 1e-6, 1e-5, "ddp[shuffle]")


def check_fsdp(rank: int, world: int, tmp: str) -> None:
    from mltoolkit.train import ResumableSampler
    ds = _tokens()
    ref = _trainer(_transformer(), DataLoader(ds, batch_size=world * B, sampler=ResumableSampler(N, seed=4)))
    ref.fit()
    tr = _trainer(_transformer(), DataLoader(ds, batch_size=B, sampler=ResumableSampler(N, seed=4)), strategy="fsdp")
    tr.fit()
    _compare(tr, ref, 2e-5, 1e-5, "fsdp")


def check_tp(rank: int, world: int, tmp: str) -> None:
    from mltoolkit.train import ResumableSampler
    ds = _tokens()
    ref = _trainer(_transformer(), DataLoader(ds, batch_size=world * B, sampler=ResumableSampler(N, seed=4)))
    ref.fit()
    tr = _trainer(_transformer(), DataLoader(ds, batch_size=world * B, sampler=ResumableSampler(N, seed=4)),
                  strategy="tp")
    tr.fit()
    assert tr.model.layers[0].attn.num_heads == 4 // world
    _compare(tr, ref, 2e-5, 1e-5, "tp")


def _resume_pair(tmp: str, name: str, build, kill_at: int, expect_warning: bool) -> tuple:
    """An uninterrupted run; a run killed by a callback exception after step `kill_at`; a fresh Trainer over the killed
    run's checkpoint directory that resumes and finishes. Returns (reference, resumed, steps the resumed run did)."""
    from mltoolkit.train import LambdaCallback
    ref = build(os.path.join(tmp, f"{name}-ref"), [])
    ref.fit()

    def kill(trainer, step, loss):
        if step == kill_at:
            raise Killed(f"kill after step {step}")
    run_dir = os.path.join(tmp, f"{name}-run")
    try:
        build(run_dir, [LambdaCallback(on_train_batch_end=kill)]).fit()
    except Killed:
        pass
    else:
        raise AssertionError(f"{name}: the kill did not happen")
    ran = []
    tr = build(run_dir, [LambdaCallback(on_train_batch_end=lambda t, s, loss: ran.append(s))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit()
    skipped = [w for w in caught if "re-reading and skipping" in str(w.message)]
    assert bool(skipped) == expect_warning, (name, [str(w.message) for w in caught])
    return ref, tr, ran


def check_ddp_resume(rank: int, world: int, tmp: str) -> None:
    """DDP with PowerSGD (its error feedback, factors and iteration count are in the checkpoint; the model's DDP buckets
    are rebuilt after the first iteration, so the resumed run's first step has another bucket layout than the one the
    state was saved from), dropout (each rank's RNG), a shuffle=True loader (DistributedSampler: resumed by re-reading),
    a named scheduler: killed after step 5, resumed from the step-4 checkpoint (mid-epoch), ends bit-identical to the
    uninterrupted run."""
    from mltoolkit.distributed import DDPStrategy
    ds = _regression()

    def build(ckdir, callbacks):
        return _trainer(_Reversed(), DataLoader(ds, batch_size=B, shuffle=True), max_epochs=None, max_steps=8,
                        strategy=DDPStrategy(comm_hook="powersgd", powersgd_start_iter=2), checkpoint_dir=ckdir,
                        checkpoint_every=2, callbacks=callbacks, scheduler="cosine",
                        scheduler_kwargs={"warmup_steps": 2})
    ref, tr, ran = _resume_pair(tmp, "ddp", build, kill_at=5, expect_warning=True)
    assert ran == [5, 6, 7, 8], ran
    assert tr.strategy.hook_state.iter == ref.strategy.hook_state.iter > 2
    _close(_full(tr.model), _full(ref.model), 0.0, 0.0, "ddp resumed params")
    assert tr.history == ref.history, (tr.history, ref.history)
    assert tr.scheduler.state_dict() == ref.scheduler.state_dict()
    assert tr.strategy._powersgd.relayouts == 1, tr.strategy._powersgd.relayouts   # state re-cut after the rebuild


def check_fsdp_resume(rank: int, world: int, tmp: str) -> None:
    """FSDP2 with a ResumableSampler loader (a DistributedResumableSampler per rank: its position is restored, no
    batch is re-read) and sharded checkpoints: killed after step 5, resumed from step 4, ends equal."""
    from mltoolkit.train import ResumableSampler
    ds = _tokens()

    def build(ckdir, callbacks):
        return _trainer(_transformer(), DataLoader(ds, batch_size=B, sampler=ResumableSampler(N, seed=4)),
                        max_epochs=None, max_steps=8, strategy="fsdp", checkpoint_dir=ckdir, checkpoint_every=2,
                        callbacks=callbacks)
    ref, tr, ran = _resume_pair(tmp, "fsdp", build, kill_at=5, expect_warning=False)
    assert ran == [5, 6, 7, 8], ran
    _close(_full(tr.model), _full(ref.model), 0.0, 0.0, "fsdp resumed params")
    assert tr.history == ref.history, (tr.history, ref.history)


CHECKS = {"ddp": check_ddp, "fsdp": check_fsdp, "tp": check_tp, "ddp_resume": check_ddp_resume,
          "fsdp_resume": check_fsdp_resume}


def worker(rank: int, world: int, port: int, tmp: str, names: list[str]) -> None:
    import torch.distributed as dist

    from mltoolkit.distributed import init_process_group
    _setup(rank, world, port)
    init_process_group("gloo")
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                CHECKS[name](rank, world, tmp)
            except BaseException as e:
                raise AssertionError(f"rank {rank}, check {name}: {type(e).__name__}: {e}\n"
                                     f"{traceback.format_exc()}") from None
            if rank == 0 and os.environ.get("MLTK_DIST_TIMES"):
                print(f"check {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        quiesce()
    finally:
        dist.destroy_process_group()
