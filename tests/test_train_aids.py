"""Training aids: gradient noise, gradient accumulation, activation checkpointing, AMP, device prefetcher."""
import contextlib
import copy
import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from mltoolkit.train import (
    Amp,
    DevicePrefetcher,
    GradAccumulator,
    GradientNoise,
    checkpoint_modules,
    move_to_device,
    uncheckpoint_modules,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(dropout=0.0):
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


# ---- gradient noise ---------------------------------------------------------------------------------------------
def test_gradient_noise_sigma_schedule_and_statistics():
    p = nn.Parameter(torch.zeros(200_000))
    noise = GradientNoise([p], eta=0.3, gamma=0.55, seed=1)
    for t in range(3):
        p.grad = torch.zeros_like(p)
        sigma = noise.add_()
        assert sigma == pytest.approx(math.sqrt(0.3 / (1 + t) ** 0.55))
        assert p.grad.mean().abs() < 5 * sigma / math.sqrt(p.numel())
        assert p.grad.std().item() == pytest.approx(sigma, rel=0.01)
    assert noise.t == 3


def test_gradient_noise_seeded_and_resumable():
    def run(steps, noise=None, state=None):
        p = nn.Parameter(torch.zeros(10))
        noise = GradientNoise([p], eta=1.0, seed=7)
        if state is not None:
            noise.load_state_dict(state)
        out = []
        for _ in range(steps):
            p.grad = torch.ones(10)
            noise.add_()
            out.append(p.grad.clone())
        return out, noise.state_dict()

    ref, _ = run(6)
    again, _ = run(6)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    first, state = run(2)
    second, _ = run(4, state=state)
    assert all(torch.equal(a, b) for a, b in zip(ref, first + second))
    assert not torch.equal(ref[0], ref[1])


def test_gradient_noise_skips_missing_grads_and_checks_args():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    a.grad = torch.zeros(3)
    GradientNoise(nn.ParameterList([a, b]), seed=0).add_()
    assert b.grad is None and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="eta"):
        GradientNoise([a], eta=-1)
    with pytest.raises(TypeError, match="params"):
        GradientNoise(3)
    with pytest.raises(KeyError, match="missing keys"):
        GradientNoise([a]).load_state_dict({"t": 0})


# ---- gradient accumulation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3])
def test_accumulation_equals_big_batch(steps):
    torch.manual_seed(0)
    model = _mlp().double()
    big = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    acc = GradAccumulator(model, opt, steps=steps, max_grad_norm=0.5)
    for _ in range(2):  # two optimizer steps
        x, y = torch.randn(4 * steps, 8, dtype=torch.float64), torch.randn(4 * steps, 4, dtype=torch.float64)
        stepped = []
        for xb, yb in zip(x.chunk(steps), y.chunk(steps)):
            with acc.accumulate():
                acc.backward(nn.functional.mse_loss(model(xb), yb))
            stepped.append(acc.step())
        assert stepped == [False] * (steps - 1) + [True]
        nn.functional.mse_loss(big(x), y).backward()
        norm = nn.utils.clip_grad_norm_(big.parameters(), 0.5)
        opt_big.step()
        opt_big.zero_grad()
        torch.testing.assert_close(acc.last_grad_norm, norm)
        for p, q in zip(model.parameters(), big.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
            assert p.grad is None


class _FakeDDP(nn.Module):
    """Stands for DistributedDataParallel: records when no_sync is active during backward."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.syncing = True

    def forward(self, x):
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True


def test_accumulation_uses_no_sync_except_on_last_micro_batch():
    model = _FakeDDP(_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, opt, steps=3)
    seen = []
    for _ in range(6):
        with acc.accumulate():
            seen.append(model.syncing)
            acc.backward(model(torch.randn(2, 8)).sum())
        acc.step()
    assert seen == [False, False, True] * 2


def test_accumulation_resume_and_force_and_args():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, opt, steps=4)
    acc.backward(model(torch.randn(2, 8)).sum())
    assert not acc.step()
    state = acc.state_dict()
    acc2 = GradAccumulator(model, opt, steps=4)
    acc2.load_state_dict(state)
    assert acc2.micro == 1 and not acc2.is_sync_step
    assert acc2.step(force=True) and acc2.micro == 0
    with pytest.raises(ValueError, match="steps"):
        GradAccumulator(model, opt, steps=0)
    with pytest.raises(ValueError, match="steps=4"):
        GradAccumulator(model, opt, steps=2).load_state_dict(state)


def test_accumulation_runs_before_step_hooks_with_gradient_noise():
    model = _mlp()
    ref = copy.deepcopy(model)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    noise, noise_ref = GradientNoise(model, seed=3), GradientNoise(ref, seed=3)
    acc = GradAccumulator(model, opt, steps=2, before_step=[noise.add_])
    x = torch.randn(4, 8)
    for xb in x.chunk(2):
        acc.backward(model(xb).pow(2).mean())
        acc.step()
    (ref(x[:2]).pow(2).mean() / 2 + ref(x[2:]).pow(2).mean() / 2).backward()
    noise_ref.add_()
    opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    assert noise.t == 1


# ---- activation checkpointing -----------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3)
        self.calls = 0

    def forward(self, x, scale=1.0):
        self.calls += 1
        return x + self.drop(torch.tanh(self.fc(x))) * scale


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.out(h)


@pytest.mark.parametrize("select", [_Block, (_Block, nn.Embedding), lambda name, m: name.startswith("blocks.")])
def test_checkpoint_modules_same_output_and_grads(select):
    torch.manual_seed(0)
    plain = _Net()
    ck = copy.deepcopy(plain)
    names = checkpoint_modules(ck, select)
    # the predicate also matches blocks.0.fc etc.: only the outermost are wrapped
    assert names == ["blocks.0", "blocks.1", "blocks.2"]
    assert list(ck.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y = plain(x)
    y.square().sum().backward()
    torch.manual_seed(1)
    y2 = ck(x2)
    assert all(b.calls == 1 for b in ck.blocks)
    y2.square().sum().backward()
    assert all(b.calls == 2 for b in ck.blocks)  # recomputed during backward
    assert torch.equal(y, y2)  # dropout replayed with the same RNG
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    for p, q in zip(plain.parameters(), ck.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_checkpoint_modules_plain_in_eval_and_undo():
    net = _Net()
    checkpoint_modules(net, _Block)
    net.eval()
    net(torch.randn(2, 8)).sum().backward()
    assert all(b.calls == 1 for b in net.blocks)  # eval: no recomputation
    assert uncheckpoint_modules(net) == ["blocks.0", "blocks.1", "blocks.2"]
    net.train()
    net(torch.randn(2, 8)).sum().backward()
    assert all(b.calls == 2 for b in net.blocks)
    assert checkpoint_modules(net, nn.Conv2d) == []
    with pytest.raises(TypeError, match="select"):
        checkpoint_modules(net, "Linear")
    with pytest.raises(TypeError, match="model"):
        checkpoint_modules(object(), nn.Linear)
    copy.deepcopy(net)


# ---- AMP --------------------------------------------------------------------------------------------------------
def test_amp_none_is_plain_fp32():
    torch.manual_seed(0)
    model = _mlp()
    ref = copy.deepcopy(model)
    amp = Amp(None, "cpu")
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(3, 8)
    with amp.autocast():
        loss = model(x).sum()
    assert loss.dtype == torch.float32
    amp.backward(loss)
    assert amp.step(opt, max_grad_norm=0.1)
    ref(x).sum().backward()
    nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert amp.state_dict() == {"dtype": "None", "scaler": None}


def test_amp_bf16_autocast_cpu():
    model = _mlp()
    amp = Amp("bf16", "cpu")
    assert amp.scaler is None
    with amp.autocast():
        out = model(torch.randn(3, 8))
    assert out.dtype == torch.bfloat16
    amp.backward(out.float().sum())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert amp.step(torch.optim.SGD(model.parameters(), lr=0.1))


def test_amp_fp16_scaler_unscales_clips_and_skips_inf():
    """fp16 with GradScaler, run on the CPU here (torch's GradScaler supports it): the update equals the fp32
    update of the unscaled, clipped gradients; an inf gradient skips the step and halves the scale."""
    model = nn.Linear(4, 1)
    ref = copy.deepcopy(model)
    amp = Amp("fp16", "cpu", scaler_kwargs={"init_scale": 1024.0})
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    amp.backward(model(x).pow(2).mean())
    assert model.weight.grad.abs().max() > 10  # scaled
    norm = amp.clip_grad_norm_(opt, 0.5)
    assert amp.step(opt)  # does not unscale twice
    ref(x).pow(2).mean().backward()
    norm_ref = nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt_ref.step()
    torch.testing.assert_close(norm, norm_ref)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    # overflow: step skipped, scale halved
    opt.zero_grad()
    before = [p.clone() for p in model.parameters()]
    amp.backward(model(x).sum() * float("inf"))
    assert not amp.step(opt) and amp.last_step_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = amp.state_dict()
    assert state["scaler"]["scale"] == 512.0
    amp2 = Amp("fp16", "cpu")
    amp2.load_state_dict(state)
    assert amp2.scaler.get_scale() == 512.0
    with pytest.raises(ValueError, match="dtype"):
        Amp("bf16", "cpu").load_state_dict(state)
    with pytest.raises(ValueError, match="dtype"):
        Amp("int8", "cpu")
    with pytest.raises(ValueError, match="scaler_kwargs"):
        Amp("bf16", "cpu", scaler_kwargs={"init_scale": 8.0})


def test_accumulation_with_fp16_amp():
    model = nn.Linear(4, 1)
    ref = copy.deepcopy(model)
    amp = Amp("fp16", "cpu", scaler_kwargs={"init_scale": 256.0})
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    acc = GradAccumulator(model, opt, steps=2, amp=amp, max_grad_norm=0.3)
    x = torch.randn(6, 4)
    for xb in x.chunk(2):
        acc.backward(model(xb).pow(2).mean())
        acc.step()
    ref(x).pow(2).mean().backward()
    nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
    opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


# ---- prefetcher -------------------------------------------------------------------------------------------------
Pair = namedtuple("Pair", "a b")


def _batches():
    return [(torch.full((2, 3), float(i)), {"y": [torch.tensor([i]), "label"], "p": Pair(torch.ones(1) * i, 3)})
            for i in range(4)]


def test_prefetcher_cpu_pass_through():
    data = _batches()
    pf = DevicePrefetcher(data, "cpu")
    assert len(pf) == 4 and not pf.uses_stream
    out = list(pf)
    assert len(out) == 4
    for got, want in zip(out, data):
        assert torch.equal(got[0], want[0]) and got[1]["y"][1] == "label"
        assert isinstance(got[1]["p"], Pair) and got[1]["p"].b == 3
    assert list(DevicePrefetcher([], "cpu")) == []
    assert move_to_device({"a": (torch.ones(1),)}, "cpu")["a"][0].device.type == "cpu"


@pytest.mark.cuda
def test_prefetcher_cuda_values_and_streams():
    data = _batches()
    loader = torch.utils.data.DataLoader(torch.arange(64.0).view(16, 4), batch_size=4, pin_memory=True)
    pf = DevicePrefetcher(loader, "cuda")
    assert pf.uses_stream
    total = torch.zeros((), device="cuda")
    for i, b in enumerate(pf):
        assert b.is_cuda
        total += (b @ b.T).sum()  # work on the compute stream while the next copy runs
        torch.testing.assert_close(b.cpu(), torch.arange(64.0).view(16, 4)[4 * i:4 * i + 4])
    want = sum((c @ c.T).sum() for c in torch.arange(64.0).view(16, 4).split(4))
    torch.testing.assert_close(total.cpu(), want)
    for got, want in zip(DevicePrefetcher(data, "cuda"), data):  # unpinned input, nested structure
        assert got[0].is_cuda and got[1]["y"][0].is_cuda and got[1]["p"].a.is_cuda
        assert torch.equal(got[0].cpu(), want[0])


@pytest.mark.cuda
def test_amp_fp16_and_bf16_cuda():
    for dtype in ("fp16", "bf16"):
        model = _mlp().cuda()
        # GradScaler's default first scale (2^16) overflows float16 at once: the gradient of the float16 output is
        # the scale itself, above float16's largest value (65504), and that step would be skipped (correctly).
        amp = Amp(dtype, "cuda", scaler_kwargs={"init_scale": 1024.0} if dtype == "fp16" else None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with amp.autocast():
            out = model(torch.randn(3, 8, device="cuda"))
        assert out.dtype == (torch.float16 if dtype == "fp16" else torch.bfloat16)
        amp.backward(out.float().sum())
        assert amp.step(opt, max_grad_norm=1.0)
        assert (amp.scaler is not None) == (dtype == "fp16")


@pytest.mark.cuda
def test_gradient_noise_cuda_seeded():
    outs = []
    for _ in range(2):
        p = nn.Parameter(torch.zeros(1000, device="cuda"))
        p.grad = torch.zeros_like(p)
        GradientNoise([p], seed=5).add_()
        outs.append(p.grad.clone())
    assert torch.equal(outs[0], outs[1])
