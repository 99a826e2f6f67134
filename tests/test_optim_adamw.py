"""mltoolkit.optim.AdamW and torch.ops.mltoolkit.fused_adamw_ against torch.optim.AdamW(foreach=False): over
100 steps, parameters and state bit-equal on float32 for the reference backend and within float32 rounding for the
C++ kernel; several shapes (odd, 0-size, transposed, sliced), weight decay, amsgrad, maximize, param groups, grads
that are None, lr as a tensor, state_dicts loaded both ways, opcheck, the Triton kernel under the interpreter, and
bad input."""
import contextlib
import copy

import pytest
import torch

import mltoolkit
from mltoolkit.backends import table
from mltoolkit.ops.fused_adam import fused_adamw
from mltoolkit.ops.reference.fused_adam import fused_adamw_ as reference_adamw_
from mltoolkit.optim import AdamW
from mltoolkit.testing import triton_forced

SHAPES = [(7,), (97, 3), (0,), (123, 5), (1,), (1025,), (4, 0, 3), (33, 17)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread on a loaded 2-core machine (see tests/test_qat.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(seed=0, shapes=SHAPES, layouts=True):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g) for s in shapes]
    if layouts:
        ps.append(torch.randn(9, 13, generator=g).t())  # dense, not contiguous: state keeps its strides
        ps.append(torch.randn(10, 12, generator=g)[:, 1:8])  # not dense: goes to the reference backend
    return [torch.nn.Parameter(p) for p in ps]


def _run(opt, params, steps, seed=1, none_every=0):
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for j, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
            p.grad = None if none_every and (k + j) % none_every == 0 else grad
        opt.step()


def _same(a, b, exact, what=""):
    """Bit-equal (reference backend) or within float32 rounding (C++ kernel: its sqrt is correctly rounded, torch
    2.14's CPU sqrt is not, so a few elements of a step differ by 1 ulp)."""
    if exact:
        assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max() if a.numel() else 0}"
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _cpp_or_skip():
    why = table("fused_adamw").get("cpp").available()
    if why:
        pytest.skip(f"cpp backend unavailable: {why}")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("amsgrad,maximize,weight_decay", [(False, False, 0.01), (True, False, 0.1),
                                                           (False, True, 0.0)])
def test_matches_torch_adamw(backend, amsgrad, maximize, weight_decay):
    if backend == "cpp":
        _cpp_or_skip()
    ours, theirs = _params(), _params()
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours_opt, torch_opt = AdamW(ours, **kw), torch.optim.AdamW(theirs, foreach=False, **kw)
    # the non-dense parameter always goes to the reference; forcing cpp would refuse it
    with mltoolkit.backend(backend) if backend == "reference" else contextlib.nullcontext():
        _run(ours_opt, ours, 100, none_every=7)
    _run(torch_opt, theirs, 100, none_every=7)
    exact = backend == "reference"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        _same(a, b, exact, f"param {i} {tuple(a.shape)}")
        sa, sb = ours_opt.state[a], torch_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            _same(sa[key], sb[key], exact, f"param {i} state {key}")
            assert sa[key].stride() == sb[key].stride() and sa[key].dtype == sb[key].dtype


def test_cpp_kernel_is_chosen_and_handles_large_tensors_across_chunks():
    _cpp_or_skip()
    ours, theirs = _params(shapes=[(40000,), (16384,), (16385,), (3,)], layouts=False), _params(
        shapes=[(40000,), (16384,), (16385,), (3,)], layouts=False)
    grads = [torch.randn(p.shape) for p in ours]
    assert table("fused_adamw").select(ours, grads, grads, grads, [], []).name == "cpp"
    ours_opt, torch_opt = AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    torch.set_num_threads(2)  # chunks shared by two threads give the same bits
    _run(ours_opt, ours, 5)
    _run(torch_opt, theirs, 5)
    for a, b in zip(ours, theirs):
        _same(a, b, False)


def test_param_groups_and_tensor_lr():
    ours, theirs = _params(layouts=False), _params(layouts=False)

    def groups(ps, lr0):
        return [{"params": ps[:3], "lr": lr0, "weight_decay": 0.0},
                {"params": ps[3:], "lr": 1e-2, "betas": (0.5, 0.9), "amsgrad": True}]

    ours_opt = AdamW(groups(ours, torch.tensor(3e-3)), weight_decay=0.05)
    torch_opt = torch.optim.AdamW(groups(theirs, 3e-3), weight_decay=0.05, foreach=False)
    _run(ours_opt, ours, 30, none_every=5)
    _run(torch_opt, theirs, 30, none_every=5)
    for a, b in zip(ours, theirs):  # lr read as a float: torch's float-lr arithmetic
        _same(a, b, False)
    # a tensor lr in torch computes its scalars in float32: equal to float tolerance
    theirs2 = _params(layouts=False)
    torch_opt2 = torch.optim.AdamW(groups(theirs2, torch.tensor(3e-3)), weight_decay=0.05, foreach=False)
    _run(torch_opt2, theirs2, 30, none_every=5)
    for a, b in zip(ours, theirs2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kept_lists_follow_every_change():
    """From its second step AdamW reuses a group's lists of parameters and state (mltoolkit.optim.adamw._Plan)
    instead of walking the parameters. Every change torch.optim.AdamW would see must be seen: a missing or sparse
    gradient, a gradient in other strides, replaced or cleared state, a loaded state_dict, a new param group, a
    changed lr."""
    _cpp_or_skip()
    shapes = [(7,), (33, 17), (1025,), (1,)]
    ours_p, ref_p = _params(shapes=shapes, layouts=False), _params(shapes=shapes, layouts=False)
    ours = AdamW(ours_p, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(3)

    def step(change=None):
        grads = [torch.randn(p.shape, generator=g) for p in ours_p]
        for ps, opt in ((ours_p, ours), (ref_p, ref)):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            if change:
                change(ps, opt)
            opt.step()
        for a, b in zip(ours_p, ref_p):
            _same(a, b, False, "param")
            sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
            assert sa.keys() == sb.keys()
            for k in sa:
                _same(sa[k], sb[k], k == "step", k)

    step()
    step()
    assert len(ours._plans) == 1  # the kept lists are in use from here on
    version = ours_p[0]._version
    step()
    assert ours_p[0]._version > version  # autograd sees the in-place update
    for _ in range(3):  # skipped, its step count stays (a frozen parameter: the kept lists leave it out)
        step(lambda ps, opt: setattr(ps[2], "grad", None))
    assert len(ours._plans) == 1
    step(lambda ps, opt: setattr(ps[1], "grad", ps[1].grad.t().contiguous().t()))  # other strides: copied
    step()
    step(lambda ps, opt: opt.state[ps[0]].__setitem__("exp_avg", torch.ones_like(ps[0])))
    step()
    step(lambda ps, opt: opt.state.clear())
    step()
    step(lambda ps, opt: opt.param_groups[0].__setitem__("lr", 3e-3))
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    step()
    step()
    extra_ours, extra_ref = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    ours.add_param_group({"params": [extra_ours]})
    ref.add_param_group({"params": [extra_ref]})
    ours_p.append(extra_ours)
    ref_p.append(extra_ref)
    step()
    step()
    before = {k: v.clone() for k, v in ours.state[ours_p[0]].items()}
    ours_p[3].grad = torch.ones(1).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        ours.step()
    for k, v in before.items():  # refused before anything was written
        assert torch.equal(ours.state[ours_p[0]][k], v), k


def test_state_in_other_strides_takes_the_parameters_layout():
    """A checkpoint made before optimize() put the weights in channels_last holds NCHW state: loaded, it is rewritten
    in the parameter's layout at the first step (the kernels walk one memory order; else every step would take the
    slow reference backend), and the updates are torch.optim.AdamW's."""
    _cpp_or_skip()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 3, 3, 3, generator=g)
    ours_p = torch.nn.Parameter(w.clone())
    ref_p = torch.nn.Parameter(w.clone())
    donor = AdamW([torch.nn.Parameter(w.clone())], lr=1e-2)
    donor.param_groups[0]["params"][0].grad = torch.randn(w.shape, generator=g)
    donor.step()
    sd = copy.deepcopy(donor.state_dict())
    with torch.no_grad():
        ours_p.data = ours_p.data.contiguous(memory_format=torch.channels_last)
    ours, ref = AdamW([ours_p], lr=1e-2), torch.optim.AdamW([ref_p], lr=1e-2, foreach=False)
    ours.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(copy.deepcopy(sd))
    assert ours.state[ours_p]["exp_avg"].stride() != ours_p.stride()
    for _ in range(3):
        grad = torch.randn(w.shape, generator=g)
        ours_p.grad, ref_p.grad = grad.contiguous(memory_format=torch.channels_last), grad.clone()
        ours.step()
        ref.step()
        _same(ours_p, ref_p, False, "param")
    for key in ("exp_avg", "exp_avg_sq"):
        assert ours.state[ours_p][key].stride() == ours_p.stride(), key
        _same(ours.state[ours_p][key], ref.state[ref_p][key], False, key)
    assert len(ours._plans) == 1  # the C++ kernel, through the kept lists


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip(direction):
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    first, second = (torch.optim.AdamW, AdamW) if direction == "torch_to_ours" else (AdamW, torch.optim.AdamW)
    a, b = _params(layouts=False), _params(layouts=False)
    opt_a = first(a, **kw)
    _run(opt_a, a, 10)
    sd = copy.deepcopy(opt_a.state_dict())  # state_dict() shares the live state tensors
    with torch.no_grad():
        for pa, pb in zip(a, b):
            pb.copy_(pa)
    opt_b = second(b, **kw)
    opt_b.load_state_dict(sd)
    assert opt_b.state_dict()["param_groups"][0].keys() == sd["param_groups"][0].keys()
    _run(opt_a, a, 10, seed=2)
    _run(opt_b, b, 10, seed=2)
    for pa, pb in zip(a, b):
        _same(pa, pb, False)
    for sa, sb in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert sa.keys() == sb.keys()
        for k in sa:
            _same(sa[k], sb[k], k == "step", k)
        assert sb["step"].item() == 20 and sb["step"].device.type == "cpu"


def test_closure_complex_and_training_converges():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(5))
    target = torch.arange(5.0)
    opt = AdamW([w], lr=0.1, weight_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(200):
        last = opt.step(closure).item()
    assert last < 1e-3 * first
    z, zt = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64)), None
    zt = torch.nn.Parameter(z.detach().clone())
    oz, ozt = AdamW([z], lr=1e-2), torch.optim.AdamW([zt], lr=1e-2, foreach=False)
    _run(oz, [z], 5)
    _run(ozt, [zt], 5)
    _same(z, zt, False)


def test_opcheck_and_functional():
    ps = [torch.randn(7), torch.randn(3, 5)]
    args = ([p.clone() for p in ps], [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [], [torch.tensor(0.0) for _ in ps], 1e-3, 0.9, 0.999, 0.01, 1e-8,
            False, False)
    torch.library.opcheck(torch.ops.mltoolkit.fused_adamw_.default, args)
    p, g, m, v, _, s = (list(x) for x in args[:6])
    p2, m2, v2, s2 = [x.clone() for x in p], [x.clone() for x in m], [x.clone() for x in v], [x.clone() for x in s]
    fused_adamw(p, g, m, v, s, lr=1e-3)
    reference_adamw_(p2, g, m2, v2, [], s2, 1e-3, 0.9, 0.999, 0.01, 1e-8, False, False)
    for a, b in zip(p + m + v + s, p2 + m2 + v2 + s2):
        _same(a, b, False)


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_triton_kernel_matches_torch(device, amsgrad, maximize):
    shapes = [(7,), (97,), (0,), (130, 3), (1,)]
    ours = [torch.nn.Parameter(p.to(device)) for p in _params(shapes=shapes, layouts=False)]
    theirs = [torch.nn.Parameter(p.to(device)) for p in _params(shapes=shapes, layouts=False)]
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    ours_opt, torch_opt = AdamW(ours, **kw), torch.optim.AdamW(theirs, foreach=False, **kw)
    with triton_forced("fused_adamw", device):
        assert table("fused_adamw").select(ours, ours, ours, ours, [], []).name == "triton"
        _run(ours_opt, ours, 20, none_every=4)
    _run(torch_opt, theirs, 20, none_every=4)
    for a, b in zip(ours, theirs):  # one rounding of the fma may differ (interpreter): float tolerance
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_state_float32_math(device, dtype):
    g = torch.Generator().manual_seed(0)
    p32 = torch.randn(200, generator=g)
    grad32, m32, v32 = torch.randn(200, generator=g), torch.randn(200, generator=g) * 0.1, torch.rand(200, generator=g)
    p, grad, m, v = (t.to(device, dtype) for t in (p32, grad32, m32, v32))
    s = [torch.tensor(4.0)]
    with triton_forced("fused_adamw", device):
        torch.ops.mltoolkit.fused_adamw_([p], [grad], [m], [v], [], s, 1e-2, 0.9, 0.999, 0.1, 1e-8, False, False)
    up = [[t.float().cpu()] for t in (p32.to(dtype), grad32.to(dtype), m32.to(dtype), v32.to(dtype))]
    reference_adamw_(up[0], up[1], up[2], up[3], [], [torch.tensor(4.0)], 1e-2, 0.9, 0.999, 0.1, 1e-8, False, False)
    for got, want in ((p, up[0][0]), (m, up[2][0]), (v, up[3][0])):
        torch.testing.assert_close(got.float().cpu(), want.to(dtype).float(), rtol=1e-2, atol=1e-3)
    assert s[0].item() == 5.0


def test_bad_input():
    p = torch.nn.Parameter(torch.randn(4))
    for kw, word in [(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "beta"), (dict(eps=-1e-8), "eps"),
                     (dict(weight_decay=-0.1), "weight_decay"), (dict(lr=torch.tensor([1.0, 2.0])), "lr")]:
        with pytest.raises(ValueError, match=word):
            AdamW([p], **kw)
    e = torch.nn.Embedding(10, 3, sparse=True)
    e(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW(e.parameters()).step()
    x = [torch.randn(3)]
    with pytest.raises(ValueError, match="grads"):
        torch.ops.mltoolkit.fused_adamw_(x, [], x, x, [], [torch.tensor(0.0)], 1e-3, 0.9, 0.999, 0.0, 1e-8, False,
                                         False)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        torch.ops.mltoolkit.fused_adamw_(x, x, [torch.randn(4)], x, [], [torch.tensor(0.0)], 1e-3, 0.9, 0.999, 0.0,
                                         1e-8, False, False)
    with pytest.raises(ValueError, match="max_exp_avg_sqs"):
        torch.ops.mltoolkit.fused_adamw_(x, x, x, x, [], [torch.tensor(0.0)], 1e-3, 0.9, 0.999, 0.0, 1e-8, True,
                                         False)
    _cpp_or_skip()
    from mltoolkit import _ext
    d = [torch.randn(3, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match=r"fused_adamw_cpu: params\[0\] must be float32"):
        _ext._C.fused_adamw_cpu(d, d, d, d, [], [torch.tensor(0.0)], 1e-3, 0.9, 0.999, 0.0, 1e-8, False, False)
    y = [torch.randn(3)]
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have params\[0\]'s shape"):
        _ext._C.fused_adamw_cpu(y, [torch.randn(4)], y, y, [], [torch.tensor(0.0)], 1e-3, 0.9, 0.999, 0.0, 1e-8,
                                False, False)


def test_op_under_torch_compile_fullgraph():
    ps = [torch.randn(7), torch.randn(3, 5)]
    gs = [torch.randn_like(p) for p in ps]
    state = [[torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps], [torch.tensor(0.0) for _ in ps]]
    twin = [[t.clone() for t in ps]] + [[t.clone() for t in lst] for lst in state]

    @torch.compile(fullgraph=True)
    def step(ps, gs, m, v, s):
        torch.ops.mltoolkit.fused_adamw_(ps, gs, m, v, [], s, 1e-3, 0.9, 0.999, 0.01, 1e-8, False, False)

    for _ in range(3):
        step(ps, gs, *state)
        reference_adamw_(twin[0], gs, twin[1], twin[2], [], twin[3], 1e-3, 0.9, 0.999, 0.01, 1e-8, False, False)
    for a, b in zip(ps + sum(state, []), sum(twin, [])):
        _same(a, b, False)
