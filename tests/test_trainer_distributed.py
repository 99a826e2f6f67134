"""mltoolkit.train.Trainer under the distributed strategies, and the Trainer's handling of distributed samplers.

One spawn of 2 processes on the CPU (gloo, tests/trainer_dist_workers.py) runs the Trainer with strategy="auto" (under
a torchrun-like environment: DDP), "ddp", "fsdp" and "tp", with gradient accumulation and clipping, against
single-process Trainer runs with the same global batch (logged losses, gradient norms, lrs, final parameters), checks
that only rank 0 writes logs, and kills and resumes DDP (PowerSGD, dropout, shuffle=True loader) and FSDP runs through
the Trainer. The rest runs in this process: the position of a DistributedResumableSampler with and without loader
workers, and schedulers by name."""
from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mltoolkit.optim import AdamW, WarmupCosineLR
from mltoolkit.train import LambdaCallback, Trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    torch.set_num_threads(n)
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(pt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_trainer_ddp_fsdp_tp_match_single_process_and_resume(tmp_path):
    import torch.multiprocessing as mp

    from tests import trainer_dist_workers
    checks = ["ddp", "fsdp", "tp", "ddp_resume", "fsdp_resume"]
    mp.spawn(trainer_dist_workers.worker, args=(2, _free_port(), str(tmp_path), checks), nprocs=2, join=True)


# ---- in this process ------------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def _run(ckdir, num_workers, kill_at=None):
    """Rank 0's share of a 2-rank DistributedResumableSampler (what strategy.prepare_loader installs), with loader
    workers or not; 24 samples, 12 for this rank, batch 2: 6 batches an epoch, 3 steps with accumulation over 2."""
    from mltoolkit.distributed import DistributedResumableSampler
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, generator=g)
    ds = TensorDataset(x, x @ torch.randn(5, 2, generator=g))
    sampler = DistributedResumableSampler(24, num_replicas=2, rank=0, seed=7)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=num_workers, generator=torch.Generator())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    seen = []

    def record(trainer, step, loss):
        if step == kill_at:
            raise Killed()
    tr = Trainer(model, lambda p: AdamW(p, lr=1e-2), loader, max_steps=8, grad_accum_steps=2, checkpoint_dir=ckdir,
                 checkpoint_every=2, seed=0, progress_bar=None, device="cpu",
                 callbacks=[LambdaCallback(on_train_batch_end=record)])
    orig = tr.training_step
    tr.training_step = lambda batch: (seen.append(batch[0].sum().item()), orig(batch))[1]
    tr.fit()
    return tr, seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_distributed_resumable_sampler_position_with_and_without_workers(num_workers, tmp_path):
    """A checkpoint mid-epoch (step 4) and one at the end of an epoch (step 6): resuming reads exactly the batches not
    yet trained on. With workers the loader's iterator runs ahead of the loop (at the end of an epoch it has already
    moved the sampler to the next epoch): the Trainer records its own count, not the sampler's."""
    ref, ref_seen = _run(tmp_path / "ref", num_workers)
    for kill_at, batches_done in ((5, 8), (7, 12)):   # resumed from step 4 (mid-epoch 1), step 6 (its end)
        with pytest.raises(Killed):
            _run(tmp_path / f"run{kill_at}", num_workers, kill_at=kill_at)
        tr, seen = _run(tmp_path / f"run{kill_at}", num_workers)
        assert seen == ref_seen[batches_done:], (kill_at, seen, ref_seen)
        assert all(torch.equal(a, b) for a, b in zip(tr.model.state_dict().values(), ref.model.state_dict().values()))


def test_scheduler_by_name(tmp_path):
    from mltoolkit.optim import SCHEDULERS
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True))

    def fit(**kw):
        torch.manual_seed(0)
        tr = Trainer(nn.Linear(4, 1), lambda p: AdamW(p, lr=0.1), DataLoader(ds, batch_size=8), log_every=1,
                     progress_bar=None, device="cpu", **kw)
        tr.fit()
        return tr

    by_name = fit(max_steps=10, scheduler="cosine", scheduler_kwargs={"warmup_steps": 3, "min_lr_ratio": 0.1})
    by_obj = fit(max_steps=10, scheduler=lambda o: WarmupCosineLR(o, 3, 10, min_lr_ratio=0.1))
    assert isinstance(by_name.scheduler, WarmupCosineLR)
    assert [r["lr"] for r in by_name.history] == [r["lr"] for r in by_obj.history]
    # total_steps defaults to the run's length: 3 epochs of 4 batches, accumulation over 2 -> 6 steps
    tr = fit(max_epochs=3, grad_accum_steps=2, scheduler="linear")
    assert tr.scheduler.total_steps == 6 and tr.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    tr = fit(max_steps=4, scheduler="Inverse-Sqrt", scheduler_kwargs={"warmup_steps": 2})
    assert type(tr.scheduler).__name__ == "WarmupInverseSqrtLR"
    with pytest.raises(ValueError, match="unknown scheduler 'cosinus'; known schedulers: " +
                       ", ".join(sorted(SCHEDULERS))):
        Trainer(nn.Linear(4, 1), lambda p: AdamW(p), DataLoader(ds), max_steps=1, scheduler="cosinus")
    with pytest.raises(ValueError, match="scheduler_kwargs is for a scheduler given by name"):
        Trainer(nn.Linear(4, 1), lambda p: AdamW(p), DataLoader(ds), max_steps=1,
                scheduler=lambda o: WarmupCosineLR(o, 1, 2), scheduler_kwargs={"warmup_steps": 1})
    with pytest.raises(TypeError, match="scheduler_kwargs must be a dict"):
        Trainer(nn.Linear(4, 1), lambda p: AdamW(p), DataLoader(ds), max_steps=1, scheduler="cosine",
                scheduler_kwargs=[("warmup_steps", 1)])
    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup'"):
        fit(max_steps=2, scheduler="cosine", scheduler_kwargs={"warmup": 1})
    assert not os.path.exists(tmp_path / "runs")
