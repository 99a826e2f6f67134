"""mltoolkit.optim.AdamW(state_bits=8): block-wise 8-bit moments track 32-bit AdamW on a small training problem,
the state takes about a quarter of the memory, small tensors keep float32 state, state_dicts round-trip (and
convert to / from 32-bit state explicitly), bf16 parameters, and bad input."""
import copy
import io

import pytest
import torch

from mltoolkit.ops.fused_adam8bit import state_to_32bit
from mltoolkit.optim import AdamW


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(seed=0, n=512, d=32, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


def _mlp(seed=0, d=32, h=128, classes=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, h), torch.nn.GELU(),
                               torch.nn.Linear(h, classes))


def _train(model, opt, steps=120, batch=64):
    x, y = _data()
    losses = []
    for k in range(steps):
        i = (k * batch) % x.shape[0]
        loss = torch.nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tracks_32bit_adamw():
    m32, m8 = _mlp(), _mlp()
    l32 = _train(m32, AdamW(m32.parameters(), lr=3e-3))
    opt8 = AdamW(m8.parameters(), lr=3e-3, state_bits=8, min_8bit_size=4096)
    l8 = _train(m8, opt8)
    # the 128 x 128 and 128 x 32 weights use 8-bit state, the rest (biases, the 4 x 128 head) float32
    kinds = {tuple(p.shape): ("exp_avg_codes" in opt8.state[p]) for p in m8.parameters()}
    assert kinds[(128, 128)] and kinds[(128, 32)] and not kinds[(128,)] and not kinds[(4, 128)]
    avg = lambda ls: sum(ls) / len(ls)  # noqa: E731
    assert l8[-1] < 0.5 * l8[0]
    for a, b in ((l32[-20:], l8[-20:]), (l32[40:60], l8[40:60])):
        assert abs(avg(a) - avg(b)) <= 0.15 * avg(a) + 0.02, (avg(a), avg(b))


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")


def test_state_memory():
    p32, p8 = torch.nn.Parameter(torch.randn(1 << 20)), torch.nn.Parameter(torch.randn(1 << 20))
    o32, o8 = AdamW([p32]), AdamW([p8], state_bits=8)
    for p, o in ((p32, o32), (p8, o8)):
        p.grad = torch.randn_like(p)
        o.step()
    ratio = _state_bytes(o8) / _state_bytes(o32)
    assert ratio <= 0.27, ratio
    assert abs(ratio - 2 * (1 + 4 / 256) / 8) < 1e-3


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


def test_state_dict_roundtrip():
    model = _mlp(h=96)
    opt = AdamW(model.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1000)
    _steps(model, opt, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    ref_model, ref_opt = copy.deepcopy(model), None
    ref_opt = AdamW(ref_model.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1000)
    ref_opt.load_state_dict(opt.state_dict())
    _steps(model, opt, 3, seed=1)  # uninterrupted
    buf.seek(0)
    ck = torch.load(buf)
    model2 = _mlp(h=96)
    model2.load_state_dict(ck["model"])
    opt2 = AdamW(model2.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1000)
    opt2.load_state_dict(ck["opt"])
    _steps(model2, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_8bit_state_into_32bit_adamw():
    model = _mlp(h=96)
    opt = AdamW(model.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1000)
    _steps(model, opt, 2, seed=0)
    sd = opt.state_dict()
    m32 = copy.deepcopy(model)
    o32 = AdamW(m32.parameters(), lr=1e-2)
    o32.load_state_dict(sd)  # the loading optimizer keeps its state_bits: 8-bit state is refused at the step
    assert "state_bits" not in o32.param_groups[0]
    with pytest.raises(RuntimeError, match="8-bit state.*state_bits=8.*state_to_32bit"):
        _steps(m32, o32, 1, seed=1)
    # explicit conversion: dequantized moments, loadable by AdamW and torch.optim.AdamW
    conv = state_to_32bit(sd, list(model.parameters()))
    for cls in (AdamW, torch.optim.AdamW):
        m = copy.deepcopy(model)
        o = cls(m.parameters(), lr=1e-2)
        o.load_state_dict(conv)
        _steps(m, o, 1, seed=1)
        assert all(o.state[p]["exp_avg"].shape == p.shape for p in m.parameters())
    # and back: 32-bit state loads into an 8-bit AdamW and is quantized on its first step
    m8 = copy.deepcopy(model)
    o8 = AdamW(m8.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1000)
    o8.load_state_dict(o.state_dict())
    _steps(m8, o8, 1, seed=2)
    big = [p for p in m8.parameters() if p.numel() >= 1000]
    assert big and all("exp_avg_codes" in o8.state[p] and "exp_avg" not in o8.state[p] for p in big)


def test_bf16_params_keep_float32_absmax():
    model = _mlp(h=96).to(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1000)
    _steps(model, opt, 2, seed=0)
    opt2 = AdamW(model.parameters(), lr=1e-2, state_bits=8, min_8bit_size=1000)
    opt2.load_state_dict(opt.state_dict())
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            if k in sa:
                assert sb[k].dtype == torch.float32 and torch.equal(sa[k], sb[k])
    _steps(model, opt2, 1, seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_input():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="state_bits must be 32 or 8, got 4"):
        AdamW([p], state_bits=4)
    with pytest.raises(ValueError, match="amsgrad is not supported with state_bits=8"):
        AdamW([p], state_bits=8, amsgrad=True)
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamW([p], state_bits=8, min_8bit_size=-1)
