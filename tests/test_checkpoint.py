"""mltoolkit.train.checkpoint: round trip of every state, keep_last pruning, atomic writes (a crash mid-write keeps
the previous checkpoint), fallback past corrupt files, wrong-model / missing-key errors that touch nothing on disk,
the resumable sampler, and kill-and-resume: a training process SIGKILLed after a random step and again in the middle
of a save, resumed twice, ends bit-identical to an uninterrupted run."""
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mltoolkit.train import checkpoint as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP threads spinning on a busy 2-core machine made training
    tests up to 50x slower; one thread also makes in-process and subprocess runs compute identically."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_global_rngs():
    """These tests restore RNG states on purpose: leave the session's generators as they were."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(pt)


def mlp(hidden=16, extra_layer=False):
    layers = [nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 3)]
    if extra_layer:
        layers.append(nn.Linear(3, 3))
    return nn.Sequential(*layers)


def trained(seed=0):
    """An MLP, AdamW, a warmup schedule and a CPU GradScaler after a few steps (non-trivial states everywhere)."""
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=50)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        loss = model(torch.randn(8, 6)).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    scaler.update(new_scale=123.0)
    return model, opt, sched, scaler


def files(d):
    return sorted(os.listdir(d))


def digests(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in files(d)}


def assert_tree_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------------------------------


def test_round_trip_every_state(tmp_path):
    model, opt, sched, scaler = trained(0)
    sampler = C.ResumableSampler(40, seed=7)
    it = iter(sampler)
    [next(it) for _ in range(13)]
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    mgr = C.CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(17, model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler, epoch=0,
                    extra={"best": 0.25, "note": "x"})
    assert os.path.basename(path) == "ckpt-00000017.pt"
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    want = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "scaler": scaler.state_dict(), "sampler": sampler.state_dict()}
    assert want["scaler"]["scale"] == 123.0

    model2, opt2, sched2, scaler2 = trained(1)  # different values everywhere
    sampler2 = C.ResumableSampler(40, seed=7)
    random.random()
    np.random.rand(4)
    torch.rand(9)
    ck = mgr.load_latest(model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2, sampler=sampler2)
    assert (ck.step, ck.epoch, ck.extra, ck.path) == (17, 0, {"best": 0.25, "note": "x"}, path)
    assert ck.state["format_version"] == C.FORMAT_VERSION
    assert ck.state["fingerprint"] == C.model_fingerprint(model)
    got = {"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict(),
           "scaler": scaler2.state_dict(), "sampler": sampler2.state_dict()}
    assert_tree_equal(want, got)
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
    assert list(sampler2) == list(sampler)  # the remaining 27 indices of epoch 0, in the same order
    # the file loads with weights_only=True (no pickled code) and through load(path)
    assert torch.load(path, weights_only=True)["step"] == 17
    assert mgr.load(path, restore_rng=False).step == 17


def test_wrapped_model_loads_into_plain(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    mgr = C.CheckpointManager(tmp_path)
    mgr.save(1, model=nn.DataParallel(model))
    assert set(torch.load(mgr.latest_path())["model"]) == set(model.state_dict())  # no "module." prefix
    plain = mlp()
    mgr.load_latest(model=plain, restore_rng=False)
    assert_tree_equal(model.state_dict(), plain.state_dict())


def test_keep_last_pruning(tmp_path):
    model = mlp()
    mgr = C.CheckpointManager(tmp_path, keep_last=2, prefix="run")
    for step in (10, 20, 30, 40, 50):
        mgr.save(step, model=model)
        assert len([f for f in files(tmp_path) if f.endswith(".pt")]) == min(2, step // 10)
    assert files(tmp_path) == ["run-00000040.pt", "run-00000050.pt", "run-latest.json"]
    assert mgr.checkpoints() == [str(tmp_path / "run-00000040.pt"), str(tmp_path / "run-00000050.pt")]
    assert mgr.load_latest(model=model).step == 50
    # another prefix in the same directory is left alone; keep_last=None keeps everything
    other = C.CheckpointManager(tmp_path, keep_last=None, prefix="run-b")
    for step in (1, 2, 3):
        other.save(step, model=model)
    assert len(other.checkpoints()) == 3 and len(mgr.checkpoints()) == 2
    assert mgr.load_latest(model=model).step == 50
    with pytest.raises(ValueError, match="keep_last"):
        C.CheckpointManager(tmp_path, keep_last=0)


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    model, opt, sched, scaler = trained(0)
    mgr = C.CheckpointManager(tmp_path, keep_last=1)
    mgr.save(5, model=model, optimizer=opt)
    before = digests(tmp_path)

    def crash(src, dst):  # the temp file is fully written and fsync'ed; the process "dies" before the rename
        assert os.path.getsize(src) > 0
        raise OSError("simulated crash before os.replace")

    monkeypatch.setattr(C, "_replace", crash)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError, match="simulated crash"):
        mgr.save(6, model=model, optimizer=opt)
    assert digests(tmp_path) == before  # no temp file left, previous checkpoint and pointer untouched
    monkeypatch.undo()
    fresh = mlp()
    assert mgr.load_latest(model=fresh, restore_rng=False).step == 5

    # A process killed with SIGKILL cannot clean up: its temp file stays until the next save, and is never loaded.
    stray = tmp_path / ".ckpt-00000006.pt.tmp.4242.deadbeef"
    stray.write_bytes(b"half a checkpoint")
    assert mgr.load_latest(model=fresh, restore_rng=False).step == 5
    mgr.save(7, model=model)
    assert files(tmp_path) == ["ckpt-00000007.pt", "ckpt-latest.json"]


def test_corrupt_latest_falls_back_with_warning(tmp_path):
    model = mlp()
    mgr = C.CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].bias.fill_(step)
        mgr.save(step, model=model)
    p3, p2 = mgr.path_for(3), mgr.path_for(2)
    with open(p3, "r+b") as f:  # truncated (a partial write)
        f.truncate(os.path.getsize(p3) // 2)
    data = bytearray(open(p2, "rb").read())  # same size, one byte flipped inside the tensor data
    data[len(data) // 2] ^= 0xFF
    open(p2, "wb").write(bytes(data))
    fresh = mlp()
    with pytest.warns(UserWarning, match="skipping checkpoint") as rec:
        ck = mgr.load_latest(model=fresh, restore_rng=False)
    assert ck.step == 1 and torch.all(fresh[0].bias == 1)
    assert len(rec) == 2 and "ckpt-00000003.pt" in str(rec[0].message) and "ckpt-00000002.pt" in str(rec[1].message)
    with pytest.raises(C.CorruptCheckpointError, match="differ from what was written"):
        mgr.load(p2)
    os.remove(mgr.path_for(1))
    with pytest.warns(UserWarning), pytest.raises(C.CorruptCheckpointError, match="no usable checkpoint"):
        mgr.load_latest(model=fresh)


def test_pointer_lost_falls_back_to_files(tmp_path):
    model = mlp()
    mgr = C.CheckpointManager(tmp_path, keep_last=2)
    for step in (3, 4):
        mgr.save(step, model=model)
    os.remove(mgr.pointer_path)
    assert mgr.load_latest(model=model).step == 4
    open(mgr.pointer_path, "w").write("{garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        assert mgr.load_latest(model=model).step == 4
    assert C.CheckpointManager(tmp_path / "empty").load_latest(model=model) is None


def test_wrong_model_clear_error_and_nothing_touched(tmp_path):
    model, opt, _, _ = trained(0)
    mgr = C.CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, model=model, optimizer=opt)
    mgr.save(2, model=model, optimizer=opt)
    before = digests(tmp_path)
    other = mlp(hidden=24)
    other_before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(C.CheckpointMismatchError) as e:
        mgr.load_latest(model=other, optimizer=torch.optim.AdamW(other.parameters()))
    msg = str(e.value)
    assert "different model" in msg and "shape differs" in msg and "0.weight (checkpoint [16, 6], model [24, 6])" in msg
    assert "Nothing was loaded" in msg
    assert_tree_equal(other_before, other.state_dict())
    # the manager refuses to rotate the good checkpoints out with another model's
    with pytest.raises(C.CheckpointMismatchError, match="different model"):
        mgr.save(3, model=other)
    assert digests(tmp_path) == before
    C.CheckpointManager(tmp_path / "new").save(3, model=other)  # a fresh directory is fine
    C.CheckpointManager(tmp_path, keep_last=2, allow_model_change=True).save(3, model=other)
    assert len(mgr.checkpoints()) == 2


def test_missing_keys_clear_error(tmp_path):
    model, opt, sched, _ = trained(0)
    mgr = C.CheckpointManager(tmp_path / "a")
    mgr.save(1, model=model)  # no optimizer / scheduler / scaler / sampler state
    before = digests(tmp_path / "a")
    bigger = mlp(extra_layer=True)
    with pytest.raises(C.CheckpointMismatchError, match=r"missing in the checkpoint: 5\.weight, 5\.bias"):
        mgr.load_latest(model=bigger)
    smaller = nn.Sequential(*list(mlp())[:2])
    with pytest.raises(C.CheckpointMismatchError, match=r"not in the model: 4\.weight, 4\.bias"):
        mgr.load_latest(model=smaller)
    ck = mgr.load_latest(model=bigger, strict=False, restore_rng=False)  # the shared part loads
    assert ck.step == 1 and torch.equal(bigger[0].weight, model[0].weight)
    fresh = mlp()
    w = fresh[0].weight.clone()
    with pytest.raises(C.CheckpointMismatchError, match=r"no optimizer / scheduler state .*optimizer=, scheduler="):
        mgr.load_latest(model=fresh, optimizer=opt, scheduler=sched)
    assert torch.equal(fresh[0].weight, w)  # checks run before anything is loaded
    with pytest.raises(C.CheckpointMismatchError, match="no sampler state"):
        mgr.load_latest(model=fresh, sampler=C.ResumableSampler(10))
    # optimizer over other parameter groups
    mgr2 = C.CheckpointManager(tmp_path / "b")
    mgr2.save(1, model=model, optimizer=opt)
    opt2 = torch.optim.AdamW([{"params": list(fresh.parameters())[:2]}, {"params": list(fresh.parameters())[2:]}])
    with pytest.raises(C.CheckpointMismatchError, match="optimizer parameter groups differ"):
        mgr2.load_latest(model=fresh, optimizer=opt2)
    assert torch.equal(fresh[0].weight, w)
    # a hand-made file without the model
    bad = tmp_path / "bad.pt"
    state = torch.load(mgr.latest_path(), weights_only=True)
    del state["model"]
    torch.save(state, bad)
    with pytest.raises(C.CheckpointMismatchError, match=r"lacks the keys \['model'\]"):
        C.load_checkpoint(bad, model=fresh)
    torch.save({"weights": 1}, bad)
    with pytest.raises(C.CheckpointError, match="not an mltoolkit checkpoint"):
        C.load_checkpoint(bad)
    assert digests(tmp_path / "a") == before


class Opaque:
    def __init__(self, v):
        self.v = v


def test_extra_objects_need_weights_only_false(tmp_path):
    mgr = C.CheckpointManager(tmp_path)
    mgr.save(1, model=mlp(), extra=Opaque(3))
    with pytest.raises(C.CheckpointError, match="weights_only=False"):
        mgr.load_latest(restore_rng=False)
    assert mgr.load_latest(restore_rng=False, weights_only=False).extra.v == 3


def test_resumable_sampler_with_dataloader():
    ds = TensorDataset(torch.arange(23))
    sampler = C.ResumableSampler(ds, seed=3)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, generator=torch.Generator())
    full = [[b[0].tolist() for b in loader] for _ in range(3)]  # 3 epochs, uninterrupted
    assert all(sorted(sum(e, [])) == list(range(23)) for e in full) and full[0] != full[1]
    assert sampler.state_dict()["epoch"] == 3

    sampler = C.ResumableSampler(ds, seed=3)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, generator=torch.Generator())
    it = iter(loader)
    first = [next(it)[0].tolist() for _ in range(2)]
    state = sampler.state_dict()
    assert state == {"epoch": 0, "index": 8, "seed": 3, "num_samples": 23, "shuffle": 1}

    resumed = C.ResumableSampler(ds, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a no-op for the current epoch: keeps the position
    loader2 = DataLoader(ds, batch_size=4, sampler=resumed, generator=torch.Generator())
    rest = [b[0].tolist() for b in loader2]
    assert first + rest == full[0]
    assert [b[0].tolist() for b in loader2] == full[1]
    resumed.set_epoch(2)
    assert [b[0].tolist() for b in loader2] == full[2]
    assert sampler.state_dict(consumed=4)["index"] == 4
    with pytest.raises(ValueError, match="consumed"):
        sampler.state_dict(consumed=99)
    with pytest.raises(C.CheckpointMismatchError, match="23 samples"):
        C.ResumableSampler(10).load_state_dict(state)
    assert list(C.ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="data_source"):
        C.ResumableSampler(object())


# ---------------------------------------------------------------------------------------------------------------------
# kill and resume

TRAIN_SCRIPT = textwrap.dedent("""
    import os, random, signal, sys
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from mltoolkit.train import checkpoint as C

    def train(ckpt_dir, total=40, every=5, kill_after=None, kill_in_save=None):
        torch.set_num_threads(1)
        random.seed(0); np.random.seed(0); torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(100, 8, generator=g)
        ds = TensorDataset(x, x.sum(1, keepdim=True).sin())
        sampler = C.ResumableSampler(ds, seed=1234)
        loader = DataLoader(ds, batch_size=8, sampler=sampler, generator=torch.Generator())  # 13 batches an epoch
        mgr = C.CheckpointManager(ckpt_dir, keep_last=2)
        ck = mgr.load_latest(model=model, optimizer=opt, scheduler=sched, sampler=sampler)
        step = ck.step if ck else 0
        if kill_in_save is not None:  # die between writing the temp file and renaming it
            real = C._replace
            def dying(src, dst):
                if dst.endswith(f"-{kill_in_save:08d}.pt"):
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst)
            C._replace = dying
        while step < total:
            for xb, yb in loader:
                xb = xb + 0.01 * torch.from_numpy(np.random.randn(*xb.shape).astype(np.float32))
                loss = ((model(xb) - yb) ** 2).mean() * (1.0 + 0.1 * random.random())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % every == 0:
                    mgr.save(step, model=model, optimizer=opt, scheduler=sched, sampler=sampler, epoch=sampler.epoch)
                if step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == total:
                    break
        return {"model": model.state_dict(), "opt": opt.state_dict(), "sampler": sampler.state_dict(), "step": step}

    if __name__ == "__main__":
        ckpt_dir, out, kill_after, kill_in_save = sys.argv[1:5]
        res = train(ckpt_dir, kill_after=int(kill_after) if kill_after != "-" else None,
                    kill_in_save=int(kill_in_save) if kill_in_save != "-" else None)
        torch.save(res, out)
""")


def test_kill_and_resume_bit_identical(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    ns = {"__name__": "train_script"}
    exec(compile(TRAIN_SCRIPT, str(script), "exec"), ns)
    reference = ns["train"](str(tmp_path / "ref"))  # uninterrupted, in this process

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    ckdir, out = tmp_path / "ck", tmp_path / "out.pt"
    kill_after = random.SystemRandom().randint(5, 29)  # a random step; checkpoints every 5 steps
    last_saved = kill_after - kill_after % 5
    info = f"(killed after step {kill_after})"

    def run(kill_after="-", kill_in_save="-"):
        return subprocess.run([sys.executable, str(script), str(ckdir), str(out), str(kill_after), str(kill_in_save)],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    p = run(kill_after=kill_after)
    assert p.returncode == -signal.SIGKILL, p.stderr + info
    mgr = C.CheckpointManager(ckdir, keep_last=2)
    assert mgr.latest_path().endswith(f"ckpt-{last_saved:08d}.pt"), info
    # second run: resumes, then dies in the middle of its first save (temp file written, not yet renamed)
    p = run(kill_in_save=last_saved + 5)
    assert p.returncode == -signal.SIGKILL, p.stderr + info
    assert any(f.startswith(".ckpt-") and ".tmp." in f for f in files(ckdir)), files(ckdir)
    assert mgr.latest_path().endswith(f"ckpt-{last_saved:08d}.pt"), info
    # third run: resumes from the same checkpoint and finishes
    p = run()
    assert p.returncode == 0, p.stderr + info
    resumed = torch.load(out, weights_only=True)
    assert resumed["step"] == reference["step"] == 40
    for k, v in reference["model"].items():
        assert torch.equal(v, resumed["model"][k]), f"parameter {k} differs {info}"
    assert_tree_equal(reference["opt"], resumed["opt"], "optimizer")
    assert resumed["sampler"] == reference["sampler"]
    assert files(ckdir) == ["ckpt-00000035.pt", "ckpt-00000040.pt", "ckpt-latest.json"]  # stray temp file gone


@pytest.mark.cuda
def test_cuda_rng_and_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = mlp().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 6, device="cuda")).square().mean().backward()
    opt.step()
    torch.cuda.manual_seed_all(3)
    mgr = C.CheckpointManager(tmp_path)
    mgr.save(1, model=model, optimizer=opt)
    assert len(torch.load(mgr.latest_path(), weights_only=True)["rng"]["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(5, device="cuda")
    torch.rand(100, device="cuda")
    fresh = mlp().cuda()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    mgr.load_latest(model=fresh, optimizer=opt2)
    assert torch.equal(torch.rand(5, device="cuda"), expected)
    assert_tree_equal(model.state_dict(), fresh.state_dict())
    assert opt2.state_dict()["state"][0]["exp_avg"].is_cuda
    assert_tree_equal(opt.state_dict(), opt2.state_dict())
    cpu_model = mlp()  # a GPU checkpoint loads into a CPU model
    mgr.load_latest(model=cpu_model, restore_rng=False)
    assert torch.equal(cpu_model[0].weight, model[0].weight.cpu())
