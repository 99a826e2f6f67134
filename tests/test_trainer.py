"""mltoolkit.train.Trainer: training works; it matches a hand-written loop bit for bit (fp32, gradient accumulation,
clipping, scheduler, gradient noise); bf16 / fp16 autocast on the CPU; metrics averaged over batches of different
sizes; batch conventions and overridable steps; callbacks (early stopping, best checkpoint, lr monitor, lambda);
everything distribution-specific goes through the Strategy; kill-and-resume is bit-exact (an exception from a
callback mid-epoch, with and without a resumable sampler, and a real SIGKILL of a subprocess); bad input."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mltoolkit.distributed import SingleProcess
from mltoolkit.optim import AdamW, WarmupCosineLR, clip_grad_norm_
from mltoolkit.train import (
    BestCheckpoint,
    Callback,
    CheckpointManager,
    EarlyStopping,
    GradientNoise,
    LambdaCallback,
    LearningRateMonitor,
    ResumableSampler,
    Trainer,
    accuracy,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads and spinning OpenMP threads on a busy 2-core machine made training tests
    up to 50x slower; one thread also makes in-process and subprocess runs compute identically."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_global_rngs():
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(pt)


def dataset(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = ((x[:, 0] + x[:, 1] * x[:, 2]) > 0).long() + (x[:, 3] > 1).long()  # 3 classes
    return TensorDataset(x, y)


def mlp(dropout=0.2):
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Dropout(dropout), nn.Linear(24, 3))


def params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def quiet(**kw):
    """No progress bar; on the CPU even where a GPU is present (the bit-exact comparisons are CPU runs)."""
    kw.setdefault("progress_bar", None)
    if "strategy" not in kw:
        kw.setdefault("device", "cpu")
    return kw


# ---- training -----------------------------------------------------------------------------------------------------
def test_training_reduces_loss_and_history():
    torch.manual_seed(0)
    ds = dataset(192)
    model = mlp(0.0)
    tr = Trainer(model, lambda p: AdamW(p, lr=2e-2), DataLoader(ds, batch_size=32, shuffle=True),
                 eval_loader=DataLoader(ds, batch_size=64), metrics={"accuracy": accuracy}, max_epochs=6,
                 log_every=3, **quiet())
    before = tr.evaluate()
    history = tr.fit()
    after = tr.evaluate()
    assert after["eval/loss"] < 0.7 * before["eval/loss"] and after["eval/accuracy"] > 0.8
    assert set(before) == {"eval/loss", "eval/accuracy"}
    evals = [r for r in history if "eval/loss" in r]
    trains = [r for r in history if "train/loss" in r]
    assert [r["epoch"] for r in evals] == list(range(6)) and [r["step"] for r in evals] == [6 * (e + 1) for e in
                                                                                              range(6)]
    assert [r["step"] for r in trains] == list(range(3, 37, 3)) and all("lr" in r and "train/accuracy" in r
                                                                        for r in trains)
    assert evals[-1]["eval/loss"] == pytest.approx(after["eval/loss"]) and tr.step == 36 and tr.epoch == 6


def hand_loop(steps, acc=1, clip=None, sched=False, noise=False, seed=0):
    """The loop the Trainer must reproduce exactly."""
    torch.manual_seed(seed)
    model = mlp()
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = WarmupCosineLR(opt, 3, steps) if sched else None
    gn = GradientNoise(model, eta=0.05, seed=7) if noise else None
    loader = DataLoader(dataset(), batch_size=16, shuffle=True)  # 6 batches an epoch
    step = 0
    while step < steps:
        for i, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y)
            (loss / acc if acc > 1 else loss).backward()
            if (i + 1) % acc:
                continue
            if gn is not None:
                gn.add_()
            if clip is not None:
                clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            step += 1
            if step == steps:
                break
    return model


@pytest.mark.parametrize("acc,clip,sched,noise", [(1, None, False, False), (2, None, False, False),
                                                  (1, 0.05, False, False), (1, None, True, False),
                                                  (3, 0.1, True, True)],
                         ids=["fp32", "accum", "clip", "scheduler", "all"])
def test_matches_hand_written_loop(acc, clip, sched, noise):
    steps = 8
    ref = hand_loop(steps, acc, clip, sched, noise)
    torch.manual_seed(0)
    model = mlp()
    tr = Trainer(model, lambda p: AdamW(p, lr=1e-2, weight_decay=0.01), DataLoader(dataset(), batch_size=16,
                                                                                    shuffle=True),
                 max_steps=steps, grad_accum_steps=acc, max_grad_norm=clip,
                 scheduler=(lambda o: WarmupCosineLR(o, 3, steps)) if sched else None,
                 gradient_noise={"eta": 0.05, "seed": 7} if noise else None, **quiet())
    tr.fit()
    assert tr.step == steps
    assert params_equal(ref, model)
    if clip is not None:
        assert all("grad_norm" in r for r in tr.history if "train/loss" in r)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(precision, tmp_path):
    torch.manual_seed(0)
    model = mlp(0.0)
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, step, loss):
            seen.append(loss.dtype)

    ds = dataset()
    tr = Trainer(model, lambda p: torch.optim.AdamW(p, lr=1e-2), DataLoader(ds, batch_size=16), max_steps=12,
                 precision=precision, eval_loader=DataLoader(ds, batch_size=48), checkpoint_dir=tmp_path,
                 callbacks=[Probe()], **quiet())
    first = tr.evaluate()["eval/loss"]
    with tr.amp.autocast():
        assert model(torch.randn(2, 6)).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    tr.fit()
    assert tr.history[-1]["eval/loss"] < first and all(p.dtype == torch.float32 for p in model.parameters())
    saved = torch.load(CheckpointManager(tmp_path).latest_path(), weights_only=True)
    assert (saved["scaler"] is not None) == (precision == "fp16")
    assert len(seen) == 12


def test_metrics_weighted_by_batch_size():
    """Batches of 5, 5 and 1 samples: the mean is over the 11 samples, not over the 3 batches."""
    model = nn.Linear(6, 3)
    ds = dataset(11)
    loader = DataLoader(ds, batch_size=5)
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, max_steps=1,
                 metrics=[accuracy], **quiet())
    res = tr.evaluate(loader)
    with torch.no_grad():
        logits = model(ds.tensors[0])
    assert res["eval/loss"] == pytest.approx(F.cross_entropy(logits, ds.tensors[1]).item(), rel=1e-6)
    assert res["eval/accuracy"] == pytest.approx((logits.argmax(1) == ds.tensors[1]).float().mean().item())
    assert model.training  # evaluate restores the mode


class DictModel(nn.Module):
    """Hugging Face style: takes a dict batch with labels and returns an object with .loss and .logits."""

    def __init__(self):
        super().__init__()
        self.net = mlp(0.0)

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = type("Out", (), {})()
        out.logits, out.loss = logits, None if labels is None else F.cross_entropy(logits, labels)
        return out


def test_batch_conventions_and_overridable_steps():
    ds = dataset(32)
    dict_batches = [{"x": ds.tensors[0][i:i + 8], "labels": ds.tensors[1][i:i + 8]} for i in range(0, 32, 8)]
    torch.manual_seed(0)
    m = DictModel()
    tr = Trainer(m, lambda p: AdamW(p, lr=1e-2), dict_batches, eval_loader=dict_batches, metrics={"acc": accuracy},
                 max_epochs=2, **quiet())
    res = tr.evaluate()
    with torch.no_grad():
        want = F.cross_entropy(m.net(ds.tensors[0]), ds.tensors[1]).item()
    assert res["eval/loss"] == pytest.approx(want, rel=1e-5) and "eval/acc" in res
    tr.fit()
    # dict batch + loss_fn: the labels are popped and given to loss_fn
    tr2 = Trainer(mlp(0.0), lambda p: AdamW(p), [{"input": b["x"], "labels": b["labels"]} for b in dict_batches],
                  loss_fn=lambda out, y: F.cross_entropy(out, y), max_steps=2, **quiet())
    tr2.model.forward = lambda input: nn.Sequential.forward(tr2.model, input)
    tr2.fit()
    # float targets: MSE; a model returning a scalar loss from the inputs alone
    reg = [(ds.tensors[0][i:i + 8], ds.tensors[0][i:i + 8, :3]) for i in range(0, 32, 8)]
    Trainer(mlp(0.0), lambda p: AdamW(p), reg, max_steps=2, **quiet()).fit()

    class Subclassed(Trainer):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.model(x), y) * 0.0 + self.model(x).square().mean()

        def evaluation_step(self, batch):
            return {"loss": torch.tensor(2.0), "outputs": None, "targets": None, "batch_size": 1}

    tr3 = Subclassed(mlp(0.0), lambda p: AdamW(p, lr=1e-2), reg[:2], eval_loader=reg[:3], max_steps=3, **quiet())
    tr3.fit()
    assert tr3.evaluate() == {"eval/loss": pytest.approx(2.0)}
    with pytest.raises(TypeError, match="cannot compute a loss"):
        Trainer(mlp(), lambda p: AdamW(p), [(ds.tensors[0][:4],)], max_steps=1, **quiet()).fit()


# ---- callbacks ----------------------------------------------------------------------------------------------------
def test_early_stopping_stops_cleanly_and_keeps_counters(tmp_path):
    ds = dataset()
    events = []
    es = EarlyStopping(monitor="eval/loss", patience=2, verbose=False)
    model = mlp(0.0)
    tr = Trainer(model, lambda p: torch.optim.SGD(p, lr=0.0), DataLoader(ds, batch_size=16),
                 eval_loader=DataLoader(ds, batch_size=96), eval_every=2, max_epochs=50, checkpoint_dir=tmp_path,
                 callbacks=[es, LambdaCallback(on_fit_end=lambda t: events.append(("end", t.step)),
                                               on_checkpoint_save=lambda t, p: events.append(("ckpt", t.step)))],
                 **quiet())
    tr.fit()  # lr 0: the loss never improves; stop after the 1st evaluation + 2 without improvement
    assert es.wait == 2 and es.stopped_step == 6 and tr.step == 6 and tr.should_stop
    assert events[-2:] == [("ckpt", 6), ("end", 6)]
    saved = torch.load(CheckpointManager(tmp_path).latest_path(), weights_only=True)
    assert saved["extra"]["trainer"]["callbacks"]["EarlyStopping"] == {"best": es.best, "wait": 2, "stopped_step": 6}
    es2 = EarlyStopping(monitor="eval/loss", patience=2)
    Trainer(mlp(0.0), lambda p: torch.optim.SGD(p, lr=0.0), DataLoader(ds, batch_size=16),
            eval_loader=DataLoader(ds, batch_size=96), eval_every=2, max_steps=6, checkpoint_dir=tmp_path,
            callbacks=[es2], **quiet()).fit()  # resumes at step 6 = max_steps: nothing to do, counters restored
    assert (es2.best, es2.wait) == (es.best, 2)
    with pytest.raises(KeyError, match="monitor='eval/acc'"):
        Trainer(mlp(), lambda p: AdamW(p), DataLoader(ds, batch_size=16), eval_loader=DataLoader(ds, batch_size=96),
                max_steps=2, callbacks=[EarlyStopping("eval/acc")], **quiet()).fit()


def test_best_checkpoint_and_lr_monitor(tmp_path):
    ds = dataset()
    torch.manual_seed(0)
    model = mlp(0.0)
    best = BestCheckpoint(monitor="eval/accuracy", mode="max")
    evals = []
    tr = Trainer(model, lambda p: AdamW([{"params": list(p), "name": "all"}], lr=2e-2),
                 DataLoader(ds, batch_size=16, shuffle=True), eval_loader=DataLoader(ds, batch_size=32),
                 metrics={"accuracy": accuracy}, eval_every=3, max_steps=24, log_every=3,
                 scheduler=lambda o: WarmupCosineLR(o, 4, 24), checkpoint_dir=tmp_path / "ck",
                 callbacks=[best, LearningRateMonitor(log_momentum=True),
                            LambdaCallback(on_evaluate_end=lambda t, m: evals.append((t.step, m["eval/accuracy"])))],
                 **quiet())
    tr.fit()
    top_step, top = max(evals, key=lambda e: (e[1], -e[0]))
    assert best.best == top and best.best_step == top_step
    files = sorted(os.listdir(tmp_path / "ck" / "best"))
    assert files == [f"best-{top_step:08d}.pt", "best-latest.json"]
    fresh = mlp(0.0)
    assert best.load_best(fresh).step == top_step
    tr2 = Trainer(fresh, lambda p: AdamW(p), DataLoader(ds, batch_size=16), metrics={"accuracy": accuracy},
                  max_steps=1, **quiet())
    assert tr2.evaluate(DataLoader(ds, batch_size=32))["eval/accuracy"] == pytest.approx(top)
    lrs = [r["lr/all"] for r in tr.history if "lr/all" in r]
    assert len(lrs) == 8 and lrs[0] == pytest.approx(2e-2 * 3 / 4) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(r["momentum/all"] == 0.9 for r in tr.history if "lr/all" in r)


class Recording(SingleProcess):
    """A strategy that records which of its methods the Trainer calls (and can pretend to be rank 1)."""

    def __init__(self, rank=0):
        super().__init__("cpu")
        self._rank, self.calls = rank, []

    @property
    def rank(self):
        return self._rank

    def _rec(name):  # noqa: N805
        def method(self, *a, **k):
            self.calls.append(name)
            return getattr(SingleProcess, name)(self, *a, **k)
        return method

    prepare = _rec("prepare")
    prepare_loader = _rec("prepare_loader")
    no_sync = _rec("no_sync")
    reduce_mean = _rec("reduce_mean")
    clip_grad_norm_ = _rec("clip_grad_norm_")
    save_checkpoint = _rec("save_checkpoint")
    load_checkpoint = _rec("load_checkpoint")


@pytest.mark.parametrize("rank", [0, 1])
def test_distribution_goes_through_the_strategy(rank, tmp_path, capsys):
    strategy = Recording(rank)
    ds = dataset()
    tr = Trainer(mlp(), lambda p: AdamW(p), DataLoader(ds, batch_size=16), eval_loader=DataLoader(ds, batch_size=32),
                 max_steps=4, grad_accum_steps=2, max_grad_norm=1.0, strategy=strategy, loggers=("csv",),
                 log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", log_every=1, progress_bar="tqdm")
    tr.fit()
    tr.print("hello from the trainer")
    calls = set(strategy.calls)
    assert {"prepare", "prepare_loader", "no_sync", "reduce_mean", "clip_grad_norm_", "save_checkpoint",
            "load_checkpoint"} <= calls
    assert strategy.calls.count("no_sync") == 4  # one micro-batch of each 2 without gradient sync
    err = capsys.readouterr()
    assert (os.path.exists(tmp_path / "logs" / "metrics.csv")) == (rank == 0)
    assert ("hello from the trainer" in err.out) == (rank == 0) and ("epoch 0" in err.err) == (rank == 0)
    assert len(tr.history) > 0  # every rank keeps the (reduced) history


# ---- kill and resume ----------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def resume_run(ckdir, loader_kind, kill_at=None, resume=True, device="cpu", precision="fp32", checkpoint_every=3):
    """20 steps with dropout, AdamW, warmup-cosine, accumulation over 2 (7 batches an epoch: a short last group),
    gradient noise, evaluation, early-stopping counters, checkpoints every 3 steps."""
    ds = dataset(100)
    if loader_kind == "resumable":
        loader = DataLoader(ds, batch_size=16, sampler=ResumableSampler(ds, seed=3), generator=torch.Generator())
    elif loader_kind == "shuffle":  # global-RNG shuffling, no generator: skipped on resume
        loader = DataLoader(ds, batch_size=16, shuffle=True)
    else:  # its own generator
        loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))

    ran = []

    def kill(trainer, step, loss):
        ran.append(step)
        if step == kill_at:
            raise Killed(f"simulated kill after step {step}")

    torch.manual_seed(123)  # a different init unless the checkpoint restores it
    model = mlp(0.3)
    es = EarlyStopping(patience=100, verbose=False)
    tr = Trainer(model, lambda p: AdamW(p, lr=1e-2, weight_decay=0.01), loader,
                 eval_loader=DataLoader(ds, batch_size=50), eval_every=4, max_steps=20, grad_accum_steps=2,
                 max_grad_norm=0.5, scheduler=lambda o: WarmupCosineLR(o, 3, 20), gradient_noise=0.01,
                 checkpoint_dir=ckdir, checkpoint_every=checkpoint_every, keep_last=2, log_every=2, seed=0,
                 resume=resume,
                 callbacks=[es, LambdaCallback(on_train_batch_end=kill)], precision=precision, device=device,
                 progress_bar=None)
    tr.steps_run = ran  # the steps this run did itself (a resumed run starts after the checkpoint)
    return tr, tr.fit(), es


@pytest.mark.parametrize("loader_kind,precision,every", [("resumable", "fp32", 3), ("shuffle", "fp32", 3),
                                                         ("generator", "fp32", 3), ("resumable", "fp16", 3),
                                                         ("shuffle", "bf16", None)],
                         ids=["resumable-sampler", "global-shuffle", "own-generator", "fp16-scaler", "epoch-ckpt"])
def test_kill_and_resume_bit_exact(loader_kind, precision, every, tmp_path):
    kw = dict(precision=precision, checkpoint_every=every)
    ref, ref_hist, ref_es = resume_run(tmp_path / "ref", loader_kind, **kw)
    kill_at = 10  # mid-epoch 2 (4 steps an epoch)
    with pytest.raises(Killed):
        resume_run(tmp_path / "run", loader_kind, kill_at=kill_at, **kw)
    last = 9 if every == 3 else 8  # every 3 steps, or at each epoch's end
    assert CheckpointManager(tmp_path / "run").latest_path().endswith(f"ckpt-{last:08d}.pt")
    if loader_kind == "resumable" or every is None:
        tr, hist, es = resume_run(tmp_path / "run", loader_kind, **kw)
    else:  # step 9 is the 2nd of epoch 2's 4 steps: 2 batches of 2 to re-read
        with pytest.warns(UserWarning, match="re-reading and skipping the 2 batches"):
            tr, hist, es = resume_run(tmp_path / "run", loader_kind, **kw)
    assert tr.step == ref.step == 20 and tr.steps_run == list(range(last + 1, 21))
    assert params_equal(ref.model, tr.model)
    sa, sb = ref.optimizer.state_dict(), tr.optimizer.state_dict()
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])
    assert hist == ref_hist and es.state_dict() == ref_es.state_dict()
    assert tr.grad_noise.state_dict()["t"] == 20
    assert tr.scheduler.state_dict() == ref.scheduler.state_dict()
    if precision == "fp16":
        assert tr.amp.scaler.state_dict() == ref.amp.scaler.state_dict()


def test_resume_from_path_and_resume_false(tmp_path):
    ref, _, _ = resume_run(tmp_path / "ref", "resumable")
    mgr = CheckpointManager(tmp_path / "ref")
    first = mgr.checkpoints()[0]  # step 18 (kept: 18 and the final 20)
    tr, _, _ = resume_run(tmp_path / "other", "resumable", resume=first)
    assert params_equal(ref.model, tr.model) and tr.steps_run == [19, 20]
    with pytest.warns(UserWarning, match="resume=False"):
        tr2, _, _ = resume_run(tmp_path / "ref", "resumable", resume=False)
    assert params_equal(ref.model, tr2.model) and len(tr2.steps_run) == 20  # a fresh run, same seed: same result


TRAIN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from mltoolkit.optim import AdamW
    from mltoolkit.train import LambdaCallback, ResumableSampler, Trainer

    def train(ckpt_dir, kill_at=None):
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(90, 8, generator=g)
        ds = TensorDataset(x, (x.sum(1) > 0).long())
        loader = DataLoader(ds, batch_size=8, sampler=ResumableSampler(ds, seed=2), generator=torch.Generator())
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

        ran = []

        def kill(trainer, step, loss):
            ran.append(step)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        tr = Trainer(model, lambda p: AdamW(p, lr=1e-2), loader, max_steps=25, grad_accum_steps=2,
                     scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 4, 0.8), gradient_noise=0.01,
                     checkpoint_dir=ckpt_dir, checkpoint_every=4, seed=0, progress_bar=None, device="cpu",
                     callbacks=[LambdaCallback(on_train_batch_end=kill)])
        tr.fit()
        return {k: v.clone() for k, v in model.state_dict().items()}, ran

    if __name__ == "__main__":
        ckpt_dir, out, kill_at = sys.argv[1:4]
        torch.save(train(ckpt_dir, int(kill_at) if kill_at != "-" else None)[0], out)
""")


def test_sigkill_and_resume_bit_exact(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    ns = {"__name__": "train_script"}
    exec(compile(TRAIN_SCRIPT, str(script), "exec"), ns)
    reference, ran = ns["train"](str(tmp_path / "ref"))
    assert ran == list(range(1, 26))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    kill_at = random.SystemRandom().randint(5, 22)
    out = tmp_path / "out.pt"

    def run(kill):
        return subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), str(out), str(kill)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    p = run(kill_at)  # a real process, SIGKILLed after a random step
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert CheckpointManager(tmp_path / "ck").latest_path() is not None
    resumed, ran = ns["train"](str(tmp_path / "ck"))  # resumed here (one subprocess is enough: torch imports slowly)
    last_saved = (kill_at - 1) // 4 * 4  # on_train_batch_end runs before that step's checkpoint is written
    assert ran == list(range(last_saved + 1, 26)), kill_at  # it continued from the checkpoint, not from scratch
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), f"{k} differs (killed after step {kill_at})"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_kill_and_resume(precision, tmp_path):
    """On a GPU: autocast, the fp16 grad scaler's state and the CUDA RNG (dropout) survive a kill; the resumed run
    ends where the uninterrupted one does."""
    ref, ref_hist, _ = resume_run(tmp_path / "ref", "resumable", device="cuda", precision=precision)
    assert next(ref.model.parameters()).is_cuda
    with pytest.raises(Killed):
        resume_run(tmp_path / "run", "resumable", kill_at=10, device="cuda", precision=precision)
    saved = torch.load(CheckpointManager(tmp_path / "run").latest_path(), weights_only=True)
    assert "cuda" in saved["rng"] and (saved["scaler"] is not None) == (precision == "fp16")
    tr, hist, _ = resume_run(tmp_path / "run", "resumable", device="cuda", precision=precision)
    assert params_equal(ref.model, tr.model) and hist == ref_hist


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_clear_errors(tmp_path):
    ds = dataset(16)
    loader = DataLoader(ds, batch_size=8)
    model = mlp()

    def make(**kw):
        args = dict(max_steps=1, progress_bar=None)
        args.update(kw)
        if "strategy" not in args:
            args.setdefault("device", "cpu")
        return Trainer(args.pop("model", model), args.pop("optimizer", lambda p: AdamW(p)),
                       args.pop("train_loader", loader), **args)

    cases = [
        (dict(max_steps=None), ValueError, "max_epochs and max_steps are both None"),
        (dict(precision="fp8"), ValueError, "precision"),
        (dict(loggers=("csv", "nope")), ValueError, "loggers: unknown logger 'nope'"),
        (dict(loggers=(3,)), TypeError, "loggers"),
        (dict(strategy="nope"), ValueError, "unknown strategy 'nope'"),
        (dict(train_loader=5), TypeError, "train_loader must be an iterable"),
        (dict(train_loader=iter(loader)), TypeError, "train_loader is an iterator"),
        (dict(eval_loader="data"), TypeError, "eval_loader"),
        (dict(eval_every=5), ValueError, "eval_every is set but there is no eval_loader"),
        (dict(checkpoint_every=5), ValueError, "checkpoint_every is set but checkpoint_dir is None"),
        (dict(grad_accum_steps=0), ValueError, "grad_accum_steps must be >= 1"),
        (dict(max_epochs=1.5), TypeError, "max_epochs must be an int"),
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
        (dict(optimizer=3), TypeError, "optimizer must be"),
        (dict(model="m"), TypeError, "model must be an nn.Module"),
        (dict(scheduler_interval="batch"), ValueError, "scheduler_interval"),
        (dict(scheduler=3), TypeError, "scheduler must be"),
        (dict(metrics={"loss": accuracy}), ValueError, "'loss' is reserved"),
        (dict(metrics={"acc": 3}), TypeError, "metrics"),
        (dict(callbacks=[object()]), TypeError, r"callbacks\[0\]"),
        (dict(resume=str(tmp_path / "missing.pt")), FileNotFoundError, "resume: no checkpoint file"),
        (dict(progress_bar="fancy"), ValueError, "progress_bar"),
        (dict(gradient_noise="lots"), TypeError, "gradient_noise"),
        (dict(strategy=SingleProcess(), device="cpu"), ValueError, "device="),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            make(**kw)
    other = AdamW(mlp().parameters())
    with pytest.raises(ValueError, match="scheduler was built on another optimizer"):
        make(scheduler=WarmupCosineLR(other, 1, 5)).fit()
    with pytest.raises(ValueError, match="evaluate: no loader"):
        make().evaluate()
    with pytest.raises(ValueError, match="yielded no batches"):
        make(train_loader=[]).fit()
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode"):
        BestCheckpoint(mode="best")
    with pytest.raises(TypeError, match="unknown hooks"):
        LambdaCallback(on_batch=print)
