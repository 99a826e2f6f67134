"""torch.ops.mltoolkit.fused_adamw8bit_ (8-bit AdamW step, block-wise quantized moments): the quantization maps and
(de)quantizers, the C++ kernel and the Triton kernel (interpreter on CPU; CUDA where there is a GPU) against the
plain-PyTorch reference over several steps, thread-count independence, opcheck, torch.compile and bad input.

Codes: the C++ kernel copies the reference's float32 operations (torch's lerp fma, mul_ then addcmul_'s fma, an IEEE
division, the same midpoint table), so its codes and absmax equal the reference's exactly. The Triton kernel under
the interpreter computes its fma without a fused rounding (numpy), so a moment can be 1 ulp away from the
reference's: absmax then differs by 1 ulp and a value lying within 1 ulp of a midpoint takes the neighbouring code
(we allow codes to differ by one step for a small fraction of elements). Parameters differ by float32 rounding
(torch's CPU sqrt is not always correctly rounded, see tests/test_optim_adamw.py)."""
import pytest
import torch

from mltoolkit.backends import backend, table
from mltoolkit.ops import fused_adam8bit as F8
from mltoolkit.ops.fused_adam8bit import STATE_KEYS, new_state, quantization_maps
from mltoolkit.ops.reference.fused_adam8bit import (
    BLOCK,
    dequantize_blockwise,
    midpoints,
    quantize_blockwise,
)
from mltoolkit.ops.reference.fused_adam8bit import (
    fused_adamw8bit_ as reference_step,
)
from mltoolkit.testing import triton_forced

SHAPES = [(1,), (7,), (97,), (123, 5), (256,), (257,), (0,), (33, 17)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpp_or_skip():
    why = table("fused_adamw8bit").get("cpp").available()
    if why:
        pytest.skip(why)


def _setup(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    states = [new_state(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    return params, states, steps


def _step(fn, params, states, steps, grads, lr=1e-2, wd=1e-2, maximize=False, betas=(0.9, 0.999)):
    qs, qu = quantization_maps(params[0].device if params else "cpu")
    fn(params, grads, *[[s[k] for s in states] for k in STATE_KEYS], steps, qs, qu, lr, betas[0], betas[1], wd,
       1e-8, maximize)


def _run(fn, shapes, n_steps=4, dtype=torch.float32, device="cpu", **kw):
    params, states, steps = _setup(shapes, dtype, device)
    g = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        grads = [torch.randn(p.shape, generator=g).to(device, dtype) for p in params]
        _step(fn, params, states, steps, grads, **kw)
    return params, states, steps


def _compare(a, b, exact_codes, p_tol=(1e-5, 1e-6)):
    for pa, pb in zip(a[0], b[0]):
        torch.testing.assert_close(pa.float().cpu(), pb.float().cpu(), rtol=p_tol[0], atol=p_tol[1])
    for sa, sb in zip(a[1], b[1]):
        for k in ("exp_avg_codes", "exp_avg_sq_codes"):
            ca, cb = sa[k].cpu().int(), sb[k].cpu().int()
            if exact_codes:
                assert torch.equal(ca, cb), f"{k}: {(ca != cb).sum()} codes differ"
            else:
                assert (ca - cb).abs().max().item() <= 1 if ca.numel() else True
                assert (ca != cb).float().mean().item() <= 0.01 if ca.numel() else True
        for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            if exact_codes:
                assert torch.equal(sa[k].cpu(), sb[k].cpu()), k
            else:
                torch.testing.assert_close(sa[k].cpu(), sb[k].cpu(), rtol=1e-6, atol=0)
    assert [s.item() for s in a[2]] == [s.item() for s in b[2]]


# ---- maps and the block-wise quantizer ----

def test_maps():
    qs, qu = quantization_maps()
    for q in (qs, qu):
        assert q.shape == (256,) and q.dtype == torch.float32
        assert bool((q[1:] > q[:-1]).all())
        assert q[-1].item() == 1.0 and 0.0 in q.tolist()
    assert qu[0].item() == 0.0 and qs[0].item() > -1.0
    assert (qs < 0).sum().item() == 127 and (qs > 0).sum().item() == 128


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_roundtrip(signed):
    qs, qu = quantization_maps()
    q = qs if signed else qu
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.logspace(-6, 0, 1000)
    x = x if signed else x.abs()
    x[256:512] = 0.0  # an all-zero block: absmax 0, codes of 0.0, dequantized exactly 0
    codes, absmax = quantize_blockwise(x, q)
    assert codes.dtype == torch.uint8 and absmax.shape == ((1000 + BLOCK - 1) // BLOCK,)
    y = dequantize_blockwise(codes, absmax, q)
    assert torch.equal(y[256:512], torch.zeros(256))
    # nearest code: no other map value is closer to x / absmax
    scale = absmax.repeat_interleave(BLOCK)[:1000].clamp_min(1e-30)
    xn = x / scale
    best = (q[None, :] - xn[:, None]).abs().min(dim=1).values
    assert torch.all((q[codes.long()] - xn).abs() <= best + 1e-7)
    # the dynamic map: relative error small for values near the block's absmax
    big = xn.abs() > 0.25
    assert ((y - x).abs()[big] / x.abs()[big]).max() < 0.05
    assert torch.equal(torch.searchsorted(midpoints(q), q), torch.arange(256))  # each map value is its own code


# ---- kernels against the reference ----

@pytest.mark.parametrize("wd,maximize,betas", [(1e-2, False, (0.9, 0.999)), (0.0, True, (0.9, 0.999)),
                                               (0.1, False, (0.3, 0.9))])
def test_cpp_matches_reference(wd, maximize, betas):
    _cpp_or_skip()
    with backend("cpp"):
        a = _run(torch.ops.mltoolkit.fused_adamw8bit_, SHAPES + [(5000,)], wd=wd, maximize=maximize, betas=betas)
    b = _run(reference_step, SHAPES + [(5000,)], wd=wd, maximize=maximize, betas=betas)
    _compare(a, b, exact_codes=True)


def test_cpp_thread_count_independent():
    _cpp_or_skip()
    shapes = [(100_000,), (3, 3000), (77,)]
    with backend("cpp"):
        a = _run(torch.ops.mltoolkit.fused_adamw8bit_, shapes, n_steps=2)
        torch.set_num_threads(2)
        b = _run(torch.ops.mltoolkit.fused_adamw8bit_, shapes, n_steps=2)
    for x, y in zip(a[0] + [s[k] for s in a[1] for k in STATE_KEYS], b[0] + [s[k] for s in b[1] for k in STATE_KEYS]):
        assert torch.equal(x, y)


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def triton_device(request):
    with triton_forced("fused_adamw8bit", request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(triton_device, dtype):
    shapes = [(7,), (257,), (33, 17)] if triton_device == "cpu" else SHAPES + [(100_000,)]
    a = _run(torch.ops.mltoolkit.fused_adamw8bit_, shapes, n_steps=3, dtype=dtype, device=triton_device)
    with backend("reference"):
        b = _run(reference_step, shapes, n_steps=3, dtype=dtype, device=triton_device)
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (4 * 2**-7, 1e-2)  # bf16: a few ulps (3 steps)
    _compare(a, b, exact_codes=False, p_tol=tol)


def test_backend_choice():
    p = [torch.randn(10)]
    grads = [torch.randn(10)]
    t = table("fused_adamw8bit")
    assert t.select(p, grads).name in ("cpp", "reference")
    assert t.select([x.t() for x in [torch.randn(4, 5)]], [torch.randn(5, 4)]).name in ("triton", "reference")
    assert t.select([torch.randn(10, dtype=torch.bfloat16)], [torch.randn(10, dtype=torch.bfloat16)]).name != "cpp"


# ---- registration ----

def test_opcheck():
    params, states, steps = _setup([(7,), (300,)])
    grads = [torch.randn_like(p) for p in params]
    qs, qu = quantization_maps()
    args = (params, grads, *[[s[k] for s in states] for k in STATE_KEYS], steps, qs, qu, 1e-2, 0.9, 0.999, 1e-2,
            1e-8, False)
    torch.library.opcheck(torch.ops.mltoolkit.fused_adamw8bit_.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compile_fullgraph():
    a = _setup([(300,), (5,)])
    b = _setup([(300,), (5,)])
    grads = [torch.randn(300), torch.randn(5)]
    qs, qu = quantization_maps()

    def step(params, grads, mc, ma, vc, va, steps):
        torch.ops.mltoolkit.fused_adamw8bit_(params, grads, mc, ma, vc, va, steps, qs, qu, 1e-2, 0.9, 0.999, 0.0,
                                             1e-8, False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for fn, (params, states, steps) in ((step, a), (compiled, b)):
        fn(params, grads, *[[s[k] for s in states] for k in STATE_KEYS], steps)
    _compare(a, b, exact_codes=True, p_tol=(0, 0))


# ---- bad input ----

def test_bad_input():
    params, states, steps = _setup([(300,)])
    grads = [torch.randn(300)]
    qs, qu = quantization_maps()
    op = torch.ops.mltoolkit.fused_adamw8bit_
    lists = [[s[k] for s in states] for k in STATE_KEYS]
    with pytest.raises(TypeError, match="exp_avg_codes\\[0\\] must be torch.uint8"):
        op(params, grads, [lists[0][0].float()], *lists[1:], steps, qs, qu, 1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(ValueError, match="exp_avg_absmax\\[0\\] must be a contiguous tensor of 2 elements"):
        op(params, grads, lists[0], [torch.zeros(1)], *lists[2:], steps, qs, qu, 1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(ValueError, match="grads has 0 tensors"):
        op(params, [], *lists, steps, qs, qu, 1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(ValueError, match="qmap_signed must be a float32 tensor of 256"):
        op(params, grads, *lists, steps, qs[:10], qu, 1e-3, 0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(TypeError, match="params\\[0\\] must be a floating-point"):
        op([torch.zeros(300, dtype=torch.int32)], grads, *lists, steps, qs, qu, 1e-3, 0.9, 0.999, 0.0, 1e-8, False)


def test_cpp_bad_input():
    _cpp_or_skip()
    from mltoolkit import _ext

    params, states, steps = _setup([(300,)])
    qs, qu = quantization_maps()
    lists = [[s[k] for s in states] for k in STATE_KEYS]
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cpu: grads\\[0\\] must be Float"):
        _ext._C.fused_adamw8bit_cpu(params, [torch.randn(300, dtype=torch.float64)], *lists, steps, qs, qu, 1e-3,
                                    0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cpu: exp_avg_sq_absmax\\[0\\] must have 2 elements"):
        _ext._C.fused_adamw8bit_cpu(params, [torch.randn(300)], *lists[:3], [torch.zeros(3)], steps, qs, qu, 1e-3,
                                    0.9, 0.999, 0.0, 1e-8, False)
    with pytest.raises(RuntimeError, match="fused_adamw8bit_cpu: qmap_unsigned must be a float32 CPU tensor"):
        _ext._C.fused_adamw8bit_cpu(params, [torch.randn(300)], *lists, steps, qs, qu.double(), 1e-3, 0.9, 0.999,
                                    0.0, 1e-8, False)


def test_state_helpers():
    p = torch.randn(1000)
    m, v = torch.randn(1000) * 1e-3, torch.rand(1000) * 1e-6
    st = F8.quantize_state(m, v)
    back = F8.dequantize_state(st, p)
    assert back["exp_avg"].shape == p.shape
    assert (back["exp_avg"] - m).abs().max() <= 0.05 * m.abs().max()
    assert (back["exp_avg_sq"] - v).abs().max() <= 0.05 * v.abs().max()


# ---- the C++ kernel's search-free quantizer (candidate by arithmetic + one midpoint check) ----

def _next(x: torch.Tensor, k: int) -> torch.Tensor:
    """x moved by k float32 ulps (towards +inf for k > 0)."""
    out = x.clone()
    for _ in range(abs(k)):
        out = torch.nextafter(out, torch.full_like(out, float("inf") if k > 0 else float("-inf")))
    return out


def _kernel_codes(values: torch.Tensor, qs=None, qu=None):
    """The C++ kernel's codes for exp_avg = values and exp_avg_sq = values**2 (one step from zero state with
    beta1 = beta2 = 0, so m = g and v = g * g exactly; every block starts with 1.0, so both absmax are 1 and
    x = m (resp. v) exactly). Returns (m codes, v codes) of the values."""
    from mltoolkit import _ext

    n = values.numel()
    per = BLOCK - 1
    nb = (n + 3 + per - 1) // per
    g = torch.zeros(nb, BLOCK)
    g[:, 0] = 1.0
    flat = torch.zeros(nb * per)
    flat[:n] = values
    g[:, 1:] = flat.view(nb, per)
    g = g.reshape(-1)[: nb * BLOCK - 3].contiguous()  # an odd length: the last block's tail takes the scalar path
    p = torch.zeros_like(g)
    st = new_state(p)
    dq_s, dq_u = quantization_maps()
    qs = dq_s if qs is None else qs
    qu = dq_u if qu is None else qu
    _ext._C.fused_adamw8bit_cpu([p], [g], [st["exp_avg_codes"]], [st["exp_avg_absmax"]], [st["exp_avg_sq_codes"]],
                                [st["exp_avg_sq_absmax"]], [torch.tensor(0.0)], qs, qu, 0.0, 0.0, 0.0, 0.0, 1e-8,
                                False)
    assert torch.equal(st["exp_avg_absmax"], torch.ones(nb)) and torch.equal(st["exp_avg_sq_absmax"], torch.ones(nb))
    keep = torch.ones(nb * BLOCK, dtype=torch.bool)
    keep[::BLOCK] = False
    keep = keep[: nb * BLOCK - 3]
    return st["exp_avg_codes"][keep][:n], st["exp_avg_sq_codes"][keep][:n], g[keep][:n]


def _expected(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """#{k : mid_k < x} (the contract; 0 for NaN)."""
    c = torch.searchsorted(midpoints(q), x.contiguous(), side="left")
    return torch.where(torch.isnan(x), torch.zeros_like(c), c)


def _probe_points(q: torch.Tensor) -> torch.Tensor:
    mid = midpoints(q)
    pts = [q, mid, -mid, -q]
    for k in (-3, -2, -1, 1, 2, 3):
        pts += [_next(mid, k), _next(-mid, k), _next(q, k)]
    g = torch.Generator().manual_seed(0)
    pts += [torch.rand(200_000, generator=g) * 2 - 1,
            torch.sign(torch.randn(200_000, generator=g)) * torch.exp(torch.empty(200_000).uniform_(-21, 0,
                                                                                                   generator=g)),
            torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 1e-45, -1e-45, 2.0**-30, 2.0**-31, 0.5, -0.5])]
    x = torch.cat(pts)
    return x[x.abs() <= 1]


def test_cpp_fast_quantizer_signed():
    _cpp_or_skip()
    qs, _ = quantization_maps()
    x = _probe_points(qs)
    mc, _, g = _kernel_codes(x)
    assert torch.equal(g, x)
    exp = _expected(x, qs)
    bad = (mc.long() != exp).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. x={x[bad[:5, 0]].tolist()}"


def test_cpp_fast_quantizer_unsigned():
    _cpp_or_skip()
    _, qu = quantization_maps()
    # g with g * g on both sides of every unsigned midpoint / map value, plus random magnitudes
    targets = torch.cat([midpoints(qu), qu]).double().clamp_min(0).sqrt().float()
    x = torch.cat([_next(targets, k) for k in range(-4, 5)] + [_probe_points(qu)])
    x = x[x.abs() <= 1]
    _, vc, g = _kernel_codes(x)
    v = g * g
    exp = _expected(v, qu)
    bad = (vc.long() != exp).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. v={v[bad[:5, 0]].tolist()}"


def test_cpp_quantizer_nan_inf_and_other_maps():
    """A block with a NaN gets a NaN absmax and scale 1, so x may leave [-1, 1]: codes still follow the contract
    (NaN -> 0, beyond the map -> 0 or 255); a map that is not piecewise linear takes the binary search."""
    _cpp_or_skip()
    from mltoolkit import _ext

    g = torch.tensor([float("nan"), 3e38, -3e38, 5.0, -7.0, 0.3, -0.2, 1e-3, 0.0] * 3)  # m = g (beta1 = 0)
    p = torch.zeros_like(g)
    st = new_state(p)
    qs, qu = quantization_maps()
    _ext._C.fused_adamw8bit_cpu([p], [g], [st["exp_avg_codes"]], [st["exp_avg_absmax"]], [st["exp_avg_sq_codes"]],
                                [st["exp_avg_sq_absmax"]], [torch.tensor(0.0)], qs, qu, 0.0, 0.0, 0.0, 0.0, 1e-8,
                                False)
    assert torch.isnan(st["exp_avg_absmax"]).all()
    assert torch.equal(st["exp_avg_codes"].long(), _expected(g, qs))
    # other maps: sorted random values (no linear runs) and a uniform map (one run per side)
    gen = torch.Generator().manual_seed(3)
    rnd = torch.sort(torch.cat([torch.rand(254, generator=gen) * 2 - 1, torch.tensor([0.0, 1.0])])).values
    uni = torch.linspace(-1, 1, 256)
    for q in (rnd, uni):
        x = _probe_points(q)[:100_000]
        mc, vc, gx = _kernel_codes(x, qs=q, qu=q)
        assert torch.equal(mc.long(), _expected(gx, q))
        assert torch.equal(vc.long(), _expected(gx * gx, q))
