"""Rotary embedding (apply_rotary_emb, mltoolkit::rotary / rotary_) on every backend against the reference."""
import contextlib

import pytest
import torch

import mltoolkit
from mltoolkit import _ext, ops
from mltoolkit.backends import NoBackendError, table
from mltoolkit.ops.reference import attention as ref
from mltoolkit.testing import PassThroughMode, Sample, assert_close, check_op

CPU_BACKENDS = ["cpp", "reference", "triton"]
CUDA_BACKENDS = ["cuda", "triton", "reference"]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in CUDA_BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (batch, seqlen, nheads, headdim, rotary_dim): tiny, odd headdim with a partial rotary dim, rotary_dim = headdim,
# a pair count that is not a multiple of any vector width, and a long sequence.
SHAPES = [(1, 1, 1, 2, 2), (2, 7, 3, 16, 16), (1, 5, 2, 37, 20), (2, 3, 2, 64, 46), (1, 97, 2, 128, 128)]
SMALL_SHAPES = [(1, 1, 1, 2, 2), (2, 7, 3, 16, 16), (1, 5, 2, 37, 20), (2, 3, 2, 64, 46)]
EXTRA_TABLE_ROWS = 3  # seqlen_ro > seqlen: only the first seqlen rows may be read


def interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def skip_unavailable(backend, device="cpu"):
    why = table("rotary").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if interpreted(device, backend) and not _ext.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")


def tables(seqlen, rotary_dim, dtype, device, extra=EXTRA_TABLE_ROWS):
    """cos/sin of real angles (positions x inverse frequencies), (seqlen + extra, rotary_dim / 2)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / max(rotary_dim, 1)))
    angles = torch.arange(seqlen + extra, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def rope(interleaved):
    """(ours, reference) taking (x, cos, sin) with seqlen_ro >= seqlen."""
    def ours(x, cos, sin):
        return ops.apply_rotary_emb(x, cos, sin, interleaved=interleaved)

    def reference(x, cos, sin):
        return ref.rotary(x, cos[: x.shape[1]], sin[: x.shape[1]], interleaved)
    return ours, reference


def sample(shape, dtype, device, table_dtype=None, table_grad=False):
    b, seqlen, h, d, r = shape
    x = torch.randn(b, seqlen, h, d, dtype=dtype, device=device, requires_grad=True)
    cos, sin = tables(seqlen, r, table_dtype or dtype, device)
    return Sample((x, cos.requires_grad_(table_grad), sin.requires_grad_(table_grad)))


def compare(ours, reference, samples, backend):
    """Outputs and gradients (random cotangents) against the reference on upcast copies."""
    with mltoolkit.backend(backend):
        check_op(ours, samples, reference, gradcheck=False, opcheck=False, compile=False)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, backend, interleaved, dtype):
    skip_unavailable(backend, device)
    shapes = SMALL_SHAPES if interpreted(device, backend) else SHAPES
    ours, reference = rope(interleaved)
    # Tables in x's dtype, and float32 tables with half-precision x (the common mixed case).
    table_dtypes = {dtype, torch.float32} if dtype != torch.float64 else {dtype}
    compare(ours, reference, [sample(s, dtype, device, t) for s in shapes for t in sorted(table_dtypes, key=str)],
            backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_table_gradients(device, backend, interleaved):
    """cos and sin that require grad get their gradients (summed over batch and heads), in their own dtype."""
    skip_unavailable(backend, device)
    ours, reference = rope(interleaved)
    samples = [sample((2, 5, 3, 16, 12), torch.float32, device, table_grad=True),
               sample((2, 5, 3, 16, 12), torch.bfloat16, device, table_grad=True)]
    compare(ours, reference, samples, backend)
    # float32 tables with bf16 x: the gradient reaching them is bf16, so bf16's tolerance applies, in float32.
    x, cos, sin = sample((2, 5, 3, 16, 12), torch.bfloat16, device, torch.float32, table_grad=True).args
    dy = torch.randn(x.shape, device=device)
    with mltoolkit.backend(backend):
        grads = torch.autograd.grad(ours(x, cos, sin), (cos, sin), dy.bfloat16())
    x2, cos2, sin2 = (t.detach().float().requires_grad_(True) for t in (x, cos, sin))
    grads2 = torch.autograd.grad(reference(x2, cos2, sin2), (cos2, sin2), dy.bfloat16().float())
    for g, g2, name in zip(grads, grads2, ["dcos", "dsin"]):
        assert g.dtype == torch.float32
        assert_close(g, g2, dtype=torch.bfloat16, atol=1.6e-2 * g2.abs().max().item(), name=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_strided_qkv_and_expanded_grad(device, backend, interleaved):
    """q and k as slices of a packed (B, L, 3, H, D) tensor; `.sum().backward()` sends a stride-0 gradient."""
    skip_unavailable(backend, device)
    qkv = torch.randn(2, 9, 3, 4, 24, device=device, requires_grad=True)
    cos, sin = tables(9, 16, torch.float32, device)
    with mltoolkit.backend(backend):
        q = ops.apply_rotary_emb(qkv[:, :, 0], cos, sin, interleaved)
        k = ops.apply_rotary_emb(qkv[:, :, 1], cos, sin, interleaved)
        (q.sum() + (2 * k).sum()).backward()
    qkv2 = qkv.detach().clone().requires_grad_(True)
    q2 = ref.rotary(qkv2[:, :, 0], cos[:9], sin[:9], interleaved)
    k2 = ref.rotary(qkv2[:, :, 1], cos[:9], sin[:9], interleaved)
    (q2.sum() + (2 * k2).sum()).backward()
    assert_close(q, q2, name="q")
    assert_close(k, k2, name="k")
    assert_close(qkv.grad, qkv2.grad, name="dqkv")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_inplace_without_grad(device, backend, interleaved):
    """Written into x itself (here a slice of qkv: the other slices stay untouched); same values as out of place."""
    skip_unavailable(backend, device)
    qkv = torch.randn(2, 6, 3, 2, 20, dtype=torch.bfloat16, device=device)
    cos, sin = tables(6, 12, torch.bfloat16, device)
    before = qkv.clone()
    with mltoolkit.backend(backend):
        expected = ops.apply_rotary_emb(qkv[:, :, 0], cos, sin, interleaved)
        q = qkv[:, :, 0]
        out = ops.apply_rotary_emb(q, cos, sin, interleaved, inplace=True)
    assert out is q
    assert torch.equal(qkv[:, :, 0], expected)
    assert torch.equal(qkv[:, :, 1:], before[:, :, 1:])
    # A leaf that requires grad may be rotated in place under no_grad.
    x = torch.randn(2, 6, 2, 20, device=device, requires_grad=True)
    expected = ref.rotary(x.detach(), cos.float()[:6], sin.float()[:6], interleaved)
    with torch.no_grad(), mltoolkit.backend(backend):
        assert ops.apply_rotary_emb(x, cos.float(), sin.float(), interleaved, inplace=True) is x
    assert_close(x.detach(), expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("table_grad", [False, True], ids=["x-grad", "x-and-table-grads"])
def test_inplace_with_grad(device, backend, table_grad):
    """inplace=True while recording autograd: x (a non-leaf) holds the result and the gradients are right."""
    skip_unavailable(backend, device)
    leaf = torch.randn(2, 5, 3, 16, device=device, requires_grad=True)
    cos, sin = (t.requires_grad_(table_grad) for t in tables(5, 16, torch.float32, device))
    dy = torch.randn(2, 5, 3, 16, device=device)
    with mltoolkit.backend(backend):
        x = leaf * 1.0
        out = ops.apply_rotary_emb(x, cos, sin, inplace=True)
        assert out is x
        grads = torch.autograd.grad(out, [leaf, cos, sin] if table_grad else [leaf], dy)
    leaf2, cos2, sin2 = (t.detach().double().requires_grad_(True) for t in (leaf, cos, sin))
    out2 = ref.rotary(leaf2, cos2[:5], sin2[:5])
    grads2 = torch.autograd.grad(out2, [leaf2, cos2, sin2] if table_grad else [leaf2], dy.double())
    assert_close(out, out2)
    for g, g2, name in zip(grads, grads2, ["dx", "dcos", "dsin"]):
        assert_close(g, g2, dtype=torch.float32, atol=1e-4, name=name)


def test_inplace_on_leaf_requiring_grad_is_an_error():
    x = torch.randn(1, 2, 1, 4, requires_grad=True)
    cos, sin = tables(2, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.apply_rotary_emb(x, cos, sin, inplace=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_zero_rotary_dim_and_empty_batch(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(2, 3, 2, 8, device=device)
    cos, sin = tables(3, 0, torch.float32, device)
    with mltoolkit.backend(backend):
        assert torch.equal(ops.apply_rotary_emb(x, cos, sin), x)
        empty = torch.randn(0, 3, 2, 8, device=device)
        assert ops.apply_rotary_emb(empty, *tables(3, 8, torch.float32, device)).shape == empty.shape


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_check_op(device, backend, interleaved):
    """Reference, gradients of x, cos and sin, fp64 gradcheck, opcheck and torch.compile(fullgraph=True)."""
    skip_unavailable(backend, device)
    ours, reference = rope(interleaved)
    # Small: gradcheck perturbs every element, and the Triton interpreter is slow.
    samples = [sample((2, 3, 1, 7, 6), torch.float32, device, table_grad=True),
               sample((1, 2, 2, 8, 8), torch.float32, device)]
    with mltoolkit.backend(backend):
        check_op(ours, samples, reference, name=f"rotary[{backend}]")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_inplace_op_and_compile(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(2, 3, 2, 10, device=device)
    cos, sin = (t[:3] for t in tables(3, 6, torch.float32, device))
    with mltoolkit.backend(backend):
        torch.library.opcheck(torch.ops.mltoolkit.rotary_, (x.clone(), cos, sin, True, False))
        torch.library.opcheck(torch.ops.mltoolkit.rotary_, (x[:, :, :, :8].clone(), cos, sin, False, True))

        def rotate_qk(qkv):
            ops.apply_rotary_emb(qkv[:, :, 0], cos, sin, inplace=True)
            ops.apply_rotary_emb(qkv[:, :, 1], cos, sin, inplace=True)
            return qkv

        torch._dynamo.reset()
        qkv = torch.randn(2, 3, 3, 2, 10, device=device)
        eager = rotate_qk(qkv.clone())
        compiled = torch.compile(rotate_qk, fullgraph=True)(qkv.clone())
    assert torch.equal(compiled, eager)
    for i in (0, 1):
        assert_close(eager[:, :, i], ref.rotary(qkv[:, :, i], cos, sin), name=f"qkv[:, :, {i}]")
    assert torch.equal(eager[:, :, 2], qkv[:, :, 2])


def test_double_backward():
    """The backward is the op itself with conjugate flipped, so gradients of gradients work."""
    if _ext.cpp_unavailable():
        pytest.skip(_ext.cpp_unavailable())
    x = torch.randn(1, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.requires_grad_(True) for t in tables(3, 4, torch.float64, "cpu", extra=0))
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        with mode:
            torch.autograd.gradgradcheck(lambda *a: ops.apply_rotary_emb(*a, interleaved=True), (x, cos, sin))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_eager_fast_path_matches_registered_op(device, backend):
    """Plain eager calls skip the custom-op dispatch; any active mode takes the registered op. Both must agree
    bit for bit, gradients included."""
    skip_unavailable(backend, device)
    x0 = torch.randn(2, 4, 3, 12, device=device)
    cos0, sin0 = tables(4, 8, torch.float32, device)
    dy = torch.randn(2, 4, 3, 12, device=device)
    results = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        x, cos, sin = (t.detach().clone().requires_grad_(True) for t in (x0, cos0, sin0))
        with mltoolkit.backend(backend), mode:
            out = ops.apply_rotary_emb(x, cos, sin)
            grads = torch.autograd.grad(out, (x, cos, sin), dy)
        results.append((type(out.grad_fn).__name__, [out, *grads]))
    (fast_fn, fast), (op_fn, via_op) = results
    assert "EagerRotary" in fast_fn and "rotary" in op_fn and "EagerRotary" not in op_fn, (fast_fn, op_fn)
    for a, b in zip(fast, via_op):
        assert torch.equal(a, b)


# ---- backend choice --------------------------------------------------------------------------------------------

def test_default_cpu_backend_is_cpp():
    if _ext.cpp_unavailable():
        pytest.skip(_ext.cpp_unavailable())
    assert table("rotary").select(torch.randn(1, 1, 1, 2)).name == "cpp"


def test_forced_backend_that_refuses_lists_every_reason():
    x = torch.randn(1, 2, 1, 4)
    with mltoolkit.backend("cuda"), pytest.raises(NoBackendError) as info:
        ops.apply_rotary_emb(x, *tables(2, 4, torch.float32, "cpu"))
    msg = str(info.value)
    assert "forced backend 'cuda' refused" in msg
    for name in ("cuda", "triton", "cpp", "reference"):
        assert f"  {name}:" in msg


def test_falls_back_to_reference_when_extension_missing(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "C_ERROR", "mltoolkit._C is not built (test)")
    x = torch.randn(2, 3, 2, 8)
    cos, sin = tables(3, 8, torch.float32, "cpu")
    assert table("rotary").reasons(x)["cpp"] == "mltoolkit._C is not built (test)"
    assert table("rotary").select(x).name == "reference"
    assert_close(ops.apply_rotary_emb(x, cos, sin), ref.rotary(x, cos[:3], sin[:3]))


# ---- bad input -------------------------------------------------------------------------------------------------

def _good():
    return torch.randn(2, 4, 3, 16), *tables(4, 8, torch.float32, "cpu")


@pytest.mark.parametrize("change,error,match", [
    (lambda x, c, s: (x.long(), c, s), TypeError, "x must be float32"),
    (lambda x, c, s: (x[0], c, s), ValueError, r"x must be 4-D \(batch, seqlen, nheads, headdim\)"),
    (lambda x, c, s: (x, c.long(), s), TypeError, "cos must be a floating tensor"),
    (lambda x, c, s: (x, c, s[None]), ValueError, "sin must be 2-D"),
    (lambda x, c, s: (x, c, s[:, :2]), ValueError, "sin must have cos's shape"),
    (lambda x, c, s: (x, c[:3], s[:3]), ValueError, "seqlen_ro = 3 rows, fewer than x's seqlen 4"),
    (lambda x, c, s: (x[..., :6], c, s), ValueError, "rotary_dim = 8 exceeds x's headdim 6"),
    (lambda x, c, s: (x, c.to("meta"), s), ValueError, "cos is on meta but x is on cpu"),
    (lambda x, c, s: ("x", c, s), TypeError, "x must be a Tensor"),
])
def test_bad_input_names_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        ops.apply_rotary_emb(*change(*_good()))


def test_bad_flag():
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        ops.apply_rotary_emb(*_good(), interleaved=1)


def test_registered_op_wants_exact_seqlen():
    x, cos, sin = _good()
    with pytest.raises(ValueError, match="cos has 7 rows, expected x's seqlen 4"):
        torch.ops.mltoolkit.rotary(x, cos, sin, False, False)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_kernel_rejects_bad_raw_input(backend):
    """The raw kernels check their arguments too: an error naming the argument, never a crash."""
    skip_unavailable(backend)
    x, cos, sin = _good()
    cos, sin = cos[:4], sin[:4]
    if backend == "cpp":
        kernel, error = _ext._C.rotary_cpu, RuntimeError
    else:
        from mltoolkit.triton_kernels import rotary as triton_rotary
        kernel, error = triton_rotary.rotary, (TypeError, ValueError)
    for args, match in [((x, cos, sin, torch.empty(2, 4, 3, 15)), "out"),
                        ((x, cos, sin, torch.empty_like(x).half()), "out"),
                        ((x, cos[:, :3].contiguous(), sin, torch.empty_like(x)), "sin"),
                        ((x, cos[:3], sin[:3], torch.empty_like(x)), "cos"),
                        ((x, cos.t().contiguous().t(), sin, torch.empty_like(x)), "cos"),
                        ((x.transpose(2, 3), cos, sin, torch.empty_like(x).transpose(2, 3)), "x")]:
        with pytest.raises(error, match=match):
            kernel(*args, False, False)


def test_cpp_kernel_rejects_partial_overlap():
    if _ext.cpp_unavailable():
        pytest.skip(_ext.cpp_unavailable())
    buf = torch.randn(3, 4, 2, 8)
    cos, sin = tables(4, 8, torch.float32, "cpu", extra=0)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        _ext._C.rotary_cpu(buf[:2], cos, sin, buf[1:], False, False)


@pytest.mark.cuda
def test_cuda_kernel_rejects_cpu_tensor_without_crashing():
    """A raw call of the CUDA entry point with a CPU tensor must raise, not kill the process (run in a child so
    that a crash fails this test instead of the whole session)."""
    import subprocess
    import sys
    code = ("import torch, mltoolkit\nfrom mltoolkit import _ext\nx = torch.randn(1, 2, 1, 4)\n"
            "try:\n    _ext._C.rotary_cuda(x, torch.ones(2, 2), torch.zeros(2, 2), x, False, False)\n"
            "except RuntimeError as e:\n    assert 'x must be a CUDA tensor' in str(e), e\n    print('raised')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "raised" in out.stdout, (out.returncode, out.stderr[-2000:])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_cuda_large_and_misaligned(backend, interleaved):
    """A real-size bf16 case, and views whose strides or offsets rule out vector access (the scalar path)."""
    skip_unavailable(backend, "cuda")
    ours, reference = rope(interleaved)
    qkv = torch.randn(2, 256, 3, 8, 128, dtype=torch.bfloat16, device="cuda")
    cos, sin = tables(256, 128, torch.float32, "cuda")
    odd = torch.randn(2, 33, 3, 67, dtype=torch.float16, device="cuda")[..., 1:]  # offset 1 element, D = 66
    cos_odd, sin_odd = tables(33, 62, torch.float16, "cuda")
    for x, c, s in [(qkv[:, :, 0], cos, sin), (odd, cos_odd, sin_odd)]:
        with mltoolkit.backend(backend):
            out = ours(x, c, s)
        assert_close(out, reference(x.float(), c.float(), s.float()), dtype=x.dtype)
