"""torch.ops.mltoolkit.fused_lamb8bit_ (8-bit LAMB step, block-wise quantized moments): the C++ kernel (both of its
pass-2 paths: the stored direction of a wave and the recomputed one of a tensor over the wave size) and the Triton
kernel (interpreter on CPU; CUDA where there is a GPU) against the plain-PyTorch reference over several steps,
thread-count independence, opcheck, torch.compile and bad input.

The new moments do not depend on the parameters (m, v come from the old codes and g), so the codes and absmax of
every backend equal the reference's exactly (every product and sum is rounded on its own in all of them). The
parameters differ only through the norms ||p||, ||u|| (float32 block sums added in float64 in the kernels, torch's
float64 norm in the reference): trust and scale within an ulp, p within ~1e-7 relative."""
import pytest
import torch

from mltoolkit.backends import NoBackendError, backend, table
from mltoolkit.ops import fused_lamb8bit as L8
from mltoolkit.ops.fused_adam8bit import STATE_KEYS, new_state, quantization_maps
from mltoolkit.ops.reference.fused_lamb8bit import fused_lamb8bit_ as reference_step
from mltoolkit.testing import triton_forced

SHAPES = [(1,), (7,), (97,), (123, 5), (256,), (257,), (0,), (33, 17), (5000,)]
WAVE = 1 << 20  # csrc/cpu/fused_lamb8bit.cpp's kWave


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpp_or_skip():
    why = table("fused_lamb8bit").get("cpp").available()
    if why:
        pytest.skip(why)


def _setup(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    return params, [new_state(p) for p in params]


def _run(fn, shapes, n_steps=4, dtype=torch.float32, device="cpu", lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=1e-2,
         bias_correction=True, grad_averaging=True, use_trust_ratio=True, max_trust_ratio=0.0):
    params, states = _setup(shapes, dtype, device)
    g = torch.Generator().manual_seed(1)
    qs, qu = quantization_maps(device)
    for step in range(1, n_steps + 1):
        grads = [(torch.randn(p.shape, generator=g) * 0.1).to(device, dtype) for p in params]
        fn(params, grads, *[[s[k] for s in states] for k in STATE_KEYS], qs, qu, lr, betas[0], betas[1], eps, wd,
           step, bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio)
    return params, states


def _compare(a, b, p_tol=(1e-6, 1e-7)):
    for pa, pb in zip(a[0], b[0]):
        torch.testing.assert_close(pa.float().cpu(), pb.float().cpu(), rtol=p_tol[0], atol=p_tol[1])
    for sa, sb in zip(a[1], b[1]):
        for k in STATE_KEYS:
            assert torch.equal(sa[k].cpu(), sb[k].cpu()), f"{k}: {(sa[k].cpu() != sb[k].cpu()).sum()} differ"


OPTIONS = [dict(), dict(wd=0.0), dict(bias_correction=False, grad_averaging=False),
           dict(use_trust_ratio=False, max_trust_ratio=0.5), dict(max_trust_ratio=0.02, betas=(0.3, 0.9))]


@pytest.mark.parametrize("kw", OPTIONS, ids=["default", "no_wd", "no_bc_no_avg", "no_trust_clamp", "clamp"])
def test_cpp_matches_reference(kw):
    _cpp_or_skip()
    with backend("cpp"):
        a = _run(torch.ops.mltoolkit.fused_lamb8bit_, SHAPES, **kw)
    b = _run(reference_step, SHAPES, **kw)
    _compare(a, b)


def test_cpp_large_tensor_recomputes():
    """A tensor over the wave size takes the recompute path (pass 1 leaves the codes alone, pass 2 recomputes m, v,
    u); the small tensors around it take the stored path. Both equal the reference."""
    _cpp_or_skip()
    shapes = [(300,), (WAVE + 77,), (1000,)]
    with backend("cpp"):
        a = _run(torch.ops.mltoolkit.fused_lamb8bit_, shapes, n_steps=2)
    b = _run(reference_step, shapes, n_steps=2)
    _compare(a, b)


def test_cpp_thread_count_independent():
    _cpp_or_skip()
    shapes = [(100_000,), (3, 3000), (77,), (WAVE + 5,)]
    with backend("cpp"):
        a = _run(torch.ops.mltoolkit.fused_lamb8bit_, shapes, n_steps=2)
        torch.set_num_threads(2)
        b = _run(torch.ops.mltoolkit.fused_lamb8bit_, shapes, n_steps=2)
    for x, y in zip(a[0] + [s[k] for s in a[1] for k in STATE_KEYS], b[0] + [s[k] for s in b[1] for k in STATE_KEYS]):
        assert torch.equal(x, y)


def test_noncontiguous_grads():
    _cpp_or_skip()
    params, states = _setup([(20, 30)])
    ref_params, ref_states = _setup([(20, 30)])
    g = torch.randn(30, 20).t()  # strided: the op copies it
    qs, qu = quantization_maps()
    for fn, ps, sts in ((torch.ops.mltoolkit.fused_lamb8bit_, params, states), (reference_step, ref_params,
                                                                              ref_states)):
        fn(ps, [g], *[[s[k] for s in sts] for k in STATE_KEYS], qs, qu, 1e-2, 0.9, 0.999, 1e-6, 0.01, 1, True, True,
           True, 0.0)
    _compare((params, states), (ref_params, ref_states))


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def triton_device(request):
    with triton_forced("fused_lamb8bit", request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(triton_device, dtype):
    shapes = [(7,), (257,), (33, 17), (0,)] if triton_device == "cpu" else SHAPES + [(WAVE + 77,)]
    a = _run(torch.ops.mltoolkit.fused_lamb8bit_, shapes, n_steps=3, dtype=dtype, device=triton_device)
    with backend("reference"):
        b = _run(reference_step, shapes, n_steps=3, dtype=dtype, device=triton_device)
    # bf16: a float32 p an ulp apart can round to the neighbouring bf16 value, and that feeds the next steps
    _compare(a, b, p_tol=(1e-6, 1e-7) if dtype == torch.float32 else (4 * 2**-7, 1e-2))


def test_backend_choice():
    t = table("fused_lamb8bit")
    names = [b.name for b in t.backends]
    assert names == ["cpp", "triton", "reference"]  # no CUDA C++ kernel: CUDA tensors take Triton
    p, g = [torch.randn(10)], [torch.randn(10)]
    assert t.select(p, g).name in ("cpp", "reference")
    bf = [torch.randn(10, dtype=torch.bfloat16)]
    assert t.select(bf, bf).name == "reference"
    assert t.get("triton").supports([torch.randn(4, 5).t()], [torch.randn(5, 4)]) is not None
    assert "float32 only" in t.get("cpp").supports(bf, bf)
    with backend("triton"), pytest.raises(NoBackendError, match="forced backend 'triton' refused"):
        t.select([torch.randn(4, 5).t()], [torch.randn(5, 4)])


# ---- registration ----

def _args(shapes=((7,), (300,))):
    params, states = _setup(list(shapes))
    grads = [torch.randn_like(p) for p in params]
    qs, qu = quantization_maps()
    return (params, grads, *[[s[k] for s in states] for k in STATE_KEYS], qs, qu, 1e-2, 0.9, 0.999, 1e-6, 1e-2, 1,
            True, True, True, 0.0)


def test_opcheck():
    torch.library.opcheck(torch.ops.mltoolkit.fused_lamb8bit_.default, _args(),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compile_fullgraph():
    a, b = _setup([(300,), (5,)]), _setup([(300,), (5,)])
    grads = [torch.randn(300), torch.randn(5)]
    qs, qu = quantization_maps()

    def step(params, grads, mc, ma, vc, va):
        torch.ops.mltoolkit.fused_lamb8bit_(params, grads, mc, ma, vc, va, qs, qu, 1e-2, 0.9, 0.999, 1e-6, 0.01, 1,
                                            True, True, True, 0.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for fn, (params, states) in ((step, a), (compiled, b)):
        fn(params, grads, *[[s[k] for s in states] for k in STATE_KEYS])
    _compare(a, b, p_tol=(0, 0))


# ---- bad input ----

def test_bad_input():
    params, states = _setup([(300,)])
    grads = [torch.randn(300)]
    qs, qu = quantization_maps()
    op = torch.ops.mltoolkit.fused_lamb8bit_
    lists = [[s[k] for s in states] for k in STATE_KEYS]
    hyper = (1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True, True, 0.0)
    with pytest.raises(TypeError, match="exp_avg_codes\\[0\\] must be torch.uint8"):
        op(params, grads, [lists[0][0].float()], *lists[1:], qs, qu, *hyper)
    with pytest.raises(ValueError, match="exp_avg_absmax\\[0\\] must be a contiguous tensor of 2 elements"):
        op(params, grads, lists[0], [torch.zeros(1)], *lists[2:], qs, qu, *hyper)
    with pytest.raises(ValueError, match="grads has 0 tensors"):
        op(params, [], *lists, qs, qu, *hyper)
    with pytest.raises(ValueError, match="grads\\[0\\] has shape \\(30,\\)"):
        op(params, [torch.randn(30)], *lists, qs, qu, *hyper)
    with pytest.raises(ValueError, match="qmap_signed must be a float32 tensor of 256"):
        op(params, grads, *lists, qs[:10], qu, *hyper)
    with pytest.raises(TypeError, match="params\\[0\\] must be a floating-point"):
        op([torch.zeros(300, dtype=torch.int32)], grads, *lists, qs, qu, *hyper)
    with pytest.raises(ValueError, match="step must be >= 1"):
        op(params, grads, *lists, qs, qu, *hyper[:5], 0, *hyper[6:])
    # the public function
    with pytest.raises(TypeError, match="exp_avg_codes must be a list of tensors"):
        L8.fused_lamb8bit_(params, grads, lists[0][0], *lists[1:], lr=1e-3, step=1)
    with pytest.raises(ValueError, match="beta2 must be in \\[0, 1\\)"):
        L8.fused_lamb8bit_(params, grads, *lists, lr=1e-3, beta2=1.0, step=1)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        L8.fused_lamb8bit_(params, grads, *lists, lr=1e-3, step=0)
    with pytest.raises(ValueError, match="max_trust_ratio must be > 0 or None"):
        L8.fused_lamb8bit_(params, grads, *lists, lr=1e-3, step=1, max_trust_ratio=0.0)


def test_cpp_bad_input():
    _cpp_or_skip()
    from mltoolkit import _ext

    params, states = _setup([(300,)])
    qs, qu = quantization_maps()
    lists = [[s[k] for s in states] for k in STATE_KEYS]
    hyper = (1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True, True, 0.0)
    fn = _ext._C.fused_lamb8bit_cpu
    with pytest.raises(RuntimeError, match="fused_lamb8bit_cpu: grads\\[0\\] must be Float"):
        fn(params, [torch.randn(300, dtype=torch.float64)], *lists, qs, qu, *hyper)
    with pytest.raises(RuntimeError, match="fused_lamb8bit_cpu: exp_avg_sq_absmax\\[0\\] must have 2 elements"):
        fn(params, [torch.randn(300)], *lists[:3], [torch.zeros(3)], qs, qu, *hyper)
    with pytest.raises(RuntimeError, match="fused_lamb8bit_cpu: qmap_unsigned must be a float32 CPU tensor"):
        fn(params, [torch.randn(300)], *lists, qs, qu.double(), *hyper)
    with pytest.raises(RuntimeError, match="fused_lamb8bit_cpu: params\\[0\\] must be contiguous"):
        fn([torch.randn(20, 15).t()], [torch.randn(15, 20)], *lists, qs, qu, *hyper)
    with pytest.raises(RuntimeError, match="fused_lamb8bit_cpu: step must be >= 1"):
        fn(params, [torch.randn(300)], *lists, qs, qu, *hyper[:5], 0, *hyper[6:])
    with pytest.raises(RuntimeError, match="fused_lamb8bit_cpu: params, grads, .* must have one length"):
        fn(params, [], *lists, qs, qu, *hyper)
