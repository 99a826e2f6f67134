"""Fused LAMB (mltoolkit.optim.lamb.LAMB, torch.ops.mltoolkit.fused_lamb_) and fused global-norm clipping
(mltoolkit.optim.clip.clip_grad_norm_, torch.ops.mltoolkit.fused_clip_grad_norm_) against an independent per-tensor
implementation of the paper's update written here, and against torch.nn.utils.clip_grad_norm_."""
import contextlib
import copy
import math

import pytest
import torch

from mltoolkit import _ext
from mltoolkit.backends import NoBackendError, backend
from mltoolkit.ops import fused_lamb as lamb_ops
from mltoolkit.optim.clip import clip_grad_norm_
from mltoolkit.optim.lamb import LAMB
from mltoolkit.testing import triton_forced

needs_cpp = pytest.mark.skipif(_ext.cpp_unavailable() is not None, reason="mltoolkit._C not built")
SHAPES = [(1,), (7,), (97,), (123, 5), (33, 33), (40000,)]  # 40000 spans several 16384-element chunks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def paper_lamb(params, grads_per_step, lr, betas, eps, wd, bias_correction=True, grad_averaging=True,
               adapt=True, max_trust=None):
    """You et al. 2019, Algorithm 2, one tensor at a time, written independently of mltoolkit."""
    b1, b2 = betas
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (x, g) in enumerate(zip(ps, grads)):
            ms[i] = b1 * ms[i] + ((1 - b1) if grad_averaging else 1.0) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            m_hat = ms[i] / (1 - b1 ** t) if bias_correction else ms[i]
            v_hat = vs[i] / (1 - b2 ** t) if bias_correction else vs[i]
            r = m_hat / (v_hat.sqrt() + eps) + wd * x
            x_norm, r_norm = float(torch.linalg.vector_norm(x.double())), float(torch.linalg.vector_norm(r.double()))
            ratio = x_norm / r_norm if (adapt and x_norm > 0 and r_norm > 0) else 1.0
            if max_trust is not None:
                ratio = min(ratio, max_trust)
            ps[i] = x - lr * ratio * r
    return ps


def _problem(shapes, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) * 0.1 for s in shapes] for _ in range(steps)]
    return params, grads


def _run_lamb(params, grads_per_step, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LAMB(ps, **kw)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


BACKENDS = [pytest.param("cpp", marks=needs_cpp), "reference"]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lamb_matches_paper_100_steps(name, dtype):
    params, grads = _problem(SHAPES, 100, dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    want = paper_lamb(params, grads, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"])
    with backend(name):
        got, _ = _run_lamb(params, grads, **kw)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
        assert not torch.equal(a, params[0]) or a.numel() == 0


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("opts", [dict(bias_correction=False), dict(grad_averaging=False),
                                  dict(max_trust_ratio=0.5), dict(weight_decay=0.0)])
def test_lamb_options(name, opts):
    params, grads = _problem(SHAPES[:5], 20, torch.float64, seed=1)
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=opts.get("weight_decay", 0.05))
    want = paper_lamb(params, grads, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"],
                      bias_correction=opts.get("bias_correction", True),
                      grad_averaging=opts.get("grad_averaging", True), max_trust=opts.get("max_trust_ratio"))
    with backend(name):
        got, _ = _run_lamb(params, grads, **{**kw, **opts})
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", BACKENDS)
def test_param_group_exclusion(name):
    params, grads = _problem([(17, 9), (9,), (9,)], 10, torch.float64, seed=2)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LAMB([{"params": ps[:1]},
                {"params": ps[1:], "weight_decay": 0.0, "exclude_from_layer_adaptation": True}],
               lr=1e-2, weight_decay=0.1)
    with backend(name):
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
    want_w = paper_lamb(params[:1], [s[:1] for s in grads], 1e-2, (0.9, 0.999), 1e-6, 0.1)
    want_b = paper_lamb(params[1:], [s[1:] for s in grads], 1e-2, (0.9, 0.999), 1e-6, 0.0, adapt=False)
    for a, b in zip(ps, want_w + want_b):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", BACKENDS)
def test_zero_norm_edge_cases(name):
    # p = 0: ||p|| = 0 -> trust 1 (plain Adam step); g = 0 with wd = 0 and fresh state: u = 0 -> p unchanged;
    # an empty tensor is skipped.
    zero_p = torch.zeros(5, dtype=torch.float64)
    ones_g = torch.ones(5, dtype=torch.float64)
    p2 = torch.randn(6, dtype=torch.float64)
    params = [zero_p, p2, torch.zeros(0, dtype=torch.float64)]
    grads = [[ones_g, torch.zeros(6, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)]]
    with backend(name):
        got, _ = _run_lamb(params, grads, lr=0.1, weight_decay=0.0)
    # Adam's first bias-corrected step is g/(|g| + eps) = 1/(1+eps) per element.
    torch.testing.assert_close(got[0], torch.full((5,), -0.1 / (1 + 1e-6), dtype=torch.float64))
    assert torch.equal(got[1], p2)
    assert got[2].numel() == 0


@needs_cpp
def test_cpp_deterministic_across_threads():
    # (1100000,) is over the kernel's wave size: its pass 2 recomputes u instead of reading it back.
    params, grads = _problem([(70001,), (3, 50000), (1100000,)], 3, torch.float32, seed=3)
    want = paper_lamb(params, grads, 1e-2, (0.9, 0.999), 1e-6, 0.01)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            with backend("cpp"):
                got, _ = _run_lamb(params, grads, lr=1e-2)
        finally:
            torch.set_num_threads(1)
        outs.append(got)
    for a, b, c in zip(*outs, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_state_dict_round_trip(name):
    params, grads = _problem(SHAPES[:4], 10, torch.float32, seed=4)
    with backend(name):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = LAMB(ps, lr=1e-2, max_trust_ratio=10.0)
        for step in grads[:5]:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        sd = copy.deepcopy(opt.state_dict())
        ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt2 = LAMB(ps2, lr=1.0)
        opt2.load_state_dict(sd)
        assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["max_trust_ratio"] == 10.0
        for step in grads[5:]:
            for p, p2, g in zip(ps, ps2, step):
                p.grad, p2.grad = g.clone(), g.clone()
            opt.step()
            opt2.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    assert float(opt2.state[ps2[0]]["step"]) == 10.0


def test_lamb_noncontiguous_and_expanded_grad():
    base = torch.randn(8, 6, dtype=torch.float64)
    p = torch.nn.Parameter(base.clone())
    g = torch.randn(6, dtype=torch.float64).expand(8, 6)  # stride-0 gradient
    p.grad = g
    LAMB([p], lr=1e-2).step()
    want = paper_lamb([base], [[g.contiguous()]], 1e-2, (0.9, 0.999), 1e-6, 0.01)[0]
    torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)
    # A dense non-contiguous parameter (a transposed view's storage, or a channels_last weight after optimize()):
    # the C++ kernel walks its memory in order, the gradient copied into its layout, the state updated in place.
    for q in (torch.randn(6, 8, dtype=torch.float64).t(),
              torch.randn(4, 3, 2, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)):
        grad = torch.randn(q.shape, dtype=torch.float64)  # contiguous: not in q's strides
        want = paper_lamb([q], [[grad]], 1e-2, (0.9, 0.999), 1e-6, 0.01)[0]
        m, v = torch.zeros_like(q), torch.zeros_like(q)
        with backend("cpp") if _ext.cpp_unavailable() is None else contextlib.nullcontext():
            lamb_ops.fused_lamb_([q], [grad], [m], [v], lr=1e-2, weight_decay=0.01, step=1)
        torch.testing.assert_close(q, want, rtol=1e-10, atol=1e-12)
        assert m.stride() == q.stride()
    # Not dense (a slice): the reference backend, in place.
    r = torch.randn(6, 10, dtype=torch.float64)[:, :8]
    want = paper_lamb([r], [[g.t().contiguous()[:6]]], 1e-2, (0.9, 0.999), 1e-6, 0.01)[0]
    lamb_ops.fused_lamb_([r], [g.t()[:6]], [torch.zeros_like(r)], [torch.zeros_like(r)], lr=1e-2, weight_decay=0.01,
                         step=1)
    torch.testing.assert_close(r, want, rtol=1e-10, atol=1e-12)


def _op_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    shapes = [(7,), (3, 4)]
    ps = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    gs = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    ms = [torch.randn(s, generator=g, dtype=dtype) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=g, dtype=dtype) for s in shapes]
    return ps, gs, ms, vs


@pytest.mark.parametrize("name", BACKENDS)
def test_opcheck(name):
    ps, gs, ms, vs = _op_args()
    with backend(name):
        torch.library.opcheck(torch.ops.mltoolkit.fused_lamb_.default,
                              (ps, gs, ms, vs, 1e-2, 0.9, 0.999, 1e-6, 0.01, 3, True, True, True, 0.0))
        torch.library.opcheck(torch.ops.mltoolkit.fused_clip_grad_norm_.default, ([g.clone() for g in gs], 0.5, 2.0,
                                                                                  False))


def test_compile_fullgraph():
    ps, gs, ms, vs = _op_args()
    ps2, ms2, vs2 = [p.clone() for p in ps], [m.clone() for m in ms], [v.clone() for v in vs]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ps, gs, ms, vs):
        torch.ops.mltoolkit.fused_lamb_(ps, gs, ms, vs, 1e-2, 0.9, 0.999, 1e-6, 0.01, 2, True, True, True, 0.0)

    step(ps, gs, ms, vs)
    lamb_ops.fused_lamb_(ps2, gs, ms2, vs2, lr=1e-2, weight_decay=0.01, step=2)
    for a, b in zip(ps + ms + vs, ps2 + ms2 + vs2):
        torch.testing.assert_close(a, b)


@pytest.fixture
def triton_cpu():
    with triton_forced("fused_lamb", "cpu"):
        yield


@pytest.mark.usefixtures("triton_cpu")
def test_triton_lamb_interpreted():
    params, grads = _problem([(1,), (7,), (1500,), (33, 33)], 4, torch.float32, seed=6)
    want = paper_lamb(params, grads, 1e-2, (0.9, 0.999), 1e-6, 0.01, max_trust=2.0)
    got, _ = _run_lamb(params, grads, lr=1e-2, weight_decay=0.01, max_trust_ratio=2.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    zero = [torch.zeros(5)]
    got, _ = _run_lamb(zero, [[torch.ones(5)]], lr=0.1, weight_decay=0.0)
    torch.testing.assert_close(got[0], torch.full((5,), -0.1 / (1 + 1e-6)))


@pytest.mark.usefixtures("triton_cpu")
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_triton_clip_interpreted(norm_type):
    with backend("triton"):
        _check_clip([(7,), (1500,), (3, 5)], 0.5, norm_type)


def _check_clip(shapes, max_norm, norm_type, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(7)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, p2 in zip(ps, ps2):
        p2.grad = p.grad.clone()
    got = clip_grad_norm_(ps, max_norm, norm_type, **kw)
    want = torch.nn.utils.clip_grad_norm_(ps2, max_norm, norm_type, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for p, p2 in zip(ps, ps2):
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_matches_torch(name, norm_type, max_norm, dtype):
    with backend(name):
        _check_clip(SHAPES, max_norm, float(norm_type), dtype)


def test_clip_fallbacks_and_edge_cases():
    _check_clip([(7,), (5, 3)], 0.5, 1.0)  # other norm types: torch's own
    _check_clip([(7,), (5, 3)], 0.5, 2.0, foreach=False)
    assert float(clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0)) == 0.0  # no grads
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(clip_grad_norm_(p, 1.0)) == 5.0  # a single tensor
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0, 0.0]) / (5.0 + 1e-6))


@pytest.mark.parametrize("name", BACKENDS)
def test_clip_nonfinite(name):
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 2.0])
    with backend(name):
        with pytest.raises(RuntimeError, match="non-finite"):
            clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
        assert torch.equal(p.grad, torch.tensor([1.0, float("inf"), 0.0, 2.0]))
        total = clip_grad_norm_([p], 1.0)
    assert math.isinf(float(total))


def test_bad_inputs():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="grads has 0 tensors"):
        lamb_ops.fused_lamb_([p], [], [p.clone()], [p.clone()], lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has shape"):
        lamb_ops.fused_lamb_([p], [p.clone()], [torch.zeros(4)], [p.clone()], lr=1e-3, step=1)
    with pytest.raises(ValueError, match="step must be an int"):
        lamb_ops.fused_lamb_([p], [p.clone()], [p.clone()], [p.clone()], lr=1e-3, step=0)
    with pytest.raises(ValueError, match="beta1"):
        lamb_ops.fused_lamb_([p], [p.clone()], [p.clone()], [p.clone()], lr=1e-3, beta1=1.0, step=1)
    with pytest.raises(TypeError, match="params must be a list"):
        lamb_ops.fused_lamb_(p, [p], [p], [p], lr=1e-3, step=1)
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating-point"):
        lamb_ops.fused_lamb_([torch.zeros(3, dtype=torch.int32)], [p], [p], [p], lr=1e-3, step=1)
    with pytest.raises(ValueError, match="norm_type must be 2 or inf"):
        lamb_ops.fused_clip_grad_norm_([p], 1.0, 1.0)
    with pytest.raises(ValueError, match="grads must not be empty"):
        lamb_ops.fused_clip_grad_norm_([], 1.0)
    for kw, match in ((dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
                      (dict(weight_decay=-0.1), "weight_decay"), (dict(max_trust_ratio=0.0), "max_trust_ratio")):
        with pytest.raises(ValueError, match=match):
            LAMB([torch.nn.Parameter(p.clone())], **kw)
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        LAMB([q]).step()
    with backend("cpp"), pytest.raises(NoBackendError, match="cpp"):
        lamb_ops.fused_lamb_([p.half()], [p.half()], [p.half()], [p.half()], lr=1e-3, step=1)


@needs_cpp
def test_cpp_kernel_checks():
    C = _ext._C
    p = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"fused_lamb_cpu: grads\[0\] has dtype"):
        C.fused_lamb_cpu([p], [p.double()], [p], [p], 1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True, True, 0.0)
    with pytest.raises(RuntimeError, match=r"fused_lamb_cpu: exp_avgs\[0\] must have params\[0\]'s strides"):
        C.fused_lamb_cpu([torch.zeros(3, 3)], [torch.zeros(3, 3)], [torch.zeros(3, 3).t()], [torch.zeros(3, 3)],
                         1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True, True, 0.0)
    with pytest.raises(RuntimeError, match=r"fused_lamb_cpu: params\[0\] must be non-overlapping and dense"):
        C.fused_lamb_cpu([torch.zeros(3, 4)[:, :2]], [torch.zeros(3, 2)], [torch.zeros(3, 2)], [torch.zeros(3, 2)],
                         1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True, True, 0.0)
    with pytest.raises(RuntimeError, match="fused_lamb_cpu: tensor 0 of grads"):
        C.fused_lamb_cpu([p], [torch.zeros(4)], [p], [p], 1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True, True, 0.0)
    with pytest.raises(RuntimeError, match="fused_clip_grad_norm_cpu: norm_type"):
        C.fused_clip_grad_norm_cpu([p], 1.0, 1.0, False)
    with pytest.raises(RuntimeError, match=r"fused_clip_grad_norm_cpu: grads\[0\] must be float32"):
        C.fused_clip_grad_norm_cpu([torch.zeros(3, dtype=torch.int32)], 1.0, 2.0, False)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_empty_gradient(name, norm_type):
    """An empty gradient among others contributes nothing to the total (inf norm: max() of it would raise)."""
    empty, p = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(2))
    empty.grad, p.grad = torch.zeros(0), torch.tensor([3.0, -4.0])
    with backend(name):
        total = clip_grad_norm_([empty, p], 1.0, norm_type)
    assert float(total) == (5.0 if norm_type == 2.0 else 4.0)
