"""int8 weight-only linear (int8 weights, float activations) on every CPU backend against the plain-PyTorch
reference and the float linear (SQNR), gradients, opcheck, compile and bad input."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference import int8 as reference
from mltoolkit.testing import PassThroughMode, Sample, check_op, sqnr

BACKENDS = ["cpp", "reference"]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def skip_unavailable(backend):
    why = table("int8_weight_only").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def weights(n, k, seed=0):
    w = torch.randn(n, k, generator=gen(seed)) / k ** 0.5
    wq, ws = ops.quantize_per_channel(w)
    return w, wq, ws


def _tol(dtype, k):
    """Float32 accumulation in another order than the reference's matmul, then one rounding to dtype."""
    return {torch.float32: 1e-5 * k ** 0.5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 97, 123), (2, 123, 7), (3, 1025, 97), (7, 64, 33), (16, 4096, 9),
                                   (17, 97, 123), (33, 15, 5), (97, 123, 7), (123, 1025, 97), (300, 7, 1025)])
def test_matches_reference(backend, M, K, N):
    skip_unavailable(backend)
    _, wq, ws = weights(N, K, M + K + N)
    x = torch.randn(M, K, generator=gen(M))
    b = torch.randn(N, generator=gen(N))
    with mltoolkit.backend(backend):
        y = ops.int8_weight_only_linear(x, wq, ws, b)
        y0 = ops.int8_weight_only_linear(x, wq, ws)
    want = reference.int8_weight_only_linear(x.double(), wq, ws, b.double()).double()
    scale = want.abs().max().item() + 1
    assert (y.double() - want).abs().max().item() <= _tol(torch.float32, K) * scale
    want0 = reference.int8_weight_only_linear(x.double(), wq, ws).double()
    assert (y0.double() - want0).abs().max().item() <= _tol(torch.float32, K) * scale


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M", [1, 5, 40])
def test_dtypes_and_sqnr(dtype, M):
    w, wq, ws = weights(257, 1024, 3)
    x = torch.randn(2, M, 1024, generator=gen(4)).to(dtype)
    b = (torch.randn(257, generator=gen(5)) * 0.1).to(dtype)
    y = ops.int8_weight_only_linear(x, wq, ws, b)
    assert y.shape == (2, M, 257) and y.dtype == dtype
    want = F.linear(x.double(), w.double(), b.double())
    floor = 38 if dtype == torch.float32 else 30  # the weight's int8 error (~40 dB), plus bf16 rounding of y
    assert sqnr(want, y) >= floor, f"SQNR {sqnr(want, y):.1f} dB"
    ref = reference.int8_weight_only_linear(x.reshape(-1, 1024), wq, ws, b).reshape(y.shape)
    assert (y.float() - ref.float()).abs().max() <= 2 * _tol(dtype, 1024) * (ref.float().abs().max() + 1)


def test_extreme_weights():
    # -128 is a legal weight code even though quantize_per_channel never makes it
    wq = torch.full((5, 300), -128, dtype=torch.int8)
    wq[1] = 127
    ws = torch.tensor([1.0, 0.5, 2.0, 1e-3, 3.0])
    for M in (1, 3, 20):
        x = torch.ones(M, 300)
        y = ops.int8_weight_only_linear(x, wq, ws)
        assert torch.allclose(y, reference.int8_weight_only_linear(x, wq, ws), rtol=1e-6)


def test_noncontiguous():
    _, wq, ws = weights(40, 97, 6)
    x = torch.randn(11, 300, generator=gen(7))[:, 13:110]  # row stride 300
    want = reference.int8_weight_only_linear(x.contiguous(), wq, ws)
    torch.testing.assert_close(ops.int8_weight_only_linear(x, wq, ws), want, rtol=1e-5, atol=1e-5)
    wt = wq.T.contiguous().T  # (40, 97) column-major
    torch.testing.assert_close(ops.int8_weight_only_linear(x, wt, ws), want, rtol=1e-5, atol=1e-5)
    xt = torch.randn(97, 30, generator=gen(8)).T  # (30, 97) column-major: more than 16 rows, the tiled path
    torch.testing.assert_close(ops.int8_weight_only_linear(xt, wq, ws),
                               reference.int8_weight_only_linear(xt.contiguous(), wq, ws), rtol=1e-5, atol=1e-5)


def test_paths_agree(monkeypatch):
    # the register-blocked path (default) and the dequantized-tiles-through-BLAS path on the same rows
    skip_unavailable("cpp")
    _, wq, ws = weights(100, 515, 9)
    x = torch.randn(40, 515, generator=gen(10))
    b = torch.randn(100, generator=gen(11))
    want = reference.int8_weight_only_linear(x, wq, ws, b)
    got = {}
    for path in ("gemv", "tiled"):
        monkeypatch.setenv("MLTK_INT8_WO_PATH", path)
        got[path] = ops.int8_weight_only_linear(x, wq, ws, b)
        torch.testing.assert_close(got[path], want, rtol=1e-5, atol=1e-5)
        for M in (1, 3, 17):
            torch.testing.assert_close(ops.int8_weight_only_linear(x[:M], wq, ws, None),
                                       reference.int8_weight_only_linear(x[:M], wq, ws), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["gemv"], got["tiled"], rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("MLTK_INT8_WO_PATH", "fast")
    with pytest.raises(RuntimeError, match="MLTK_INT8_WO_PATH must be auto, gemv or tiled"):
        ops.int8_weight_only_linear(x, wq, ws, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_opcheck_compile(backend):
    skip_unavailable(backend)
    _, wq, ws = weights(19, 65, 12)

    def fn(x, b=None):
        return ops.int8_weight_only_linear(x, wq, ws, b)

    def ref(x, b=None):
        return F.linear(x, (wq.double() * ws.double()[:, None]).to(x.dtype), b)

    samples = [Sample((torch.randn(5, 65, generator=gen(13)).requires_grad_(True),
                       torch.randn(19, generator=gen(14)).requires_grad_(True))),
               Sample((torch.randn(2, 3, 65, generator=gen(15)).requires_grad_(True),)),
               Sample((torch.randn(20, 65, generator=gen(16)).requires_grad_(True),
                       torch.randn(19, generator=gen(17)).requires_grad_(True)))]
    with mltoolkit.backend(backend):
        check_op(fn, samples, ref, name=f"int8_weight_only_linear {backend}", gradcheck=False)
        x = torch.randn(3, 65, dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.mltoolkit.int8_weight_only_linear.default,
                              (x, wq, ws, torch.randn(19, dtype=torch.bfloat16)))
        torch.library.opcheck(torch.ops.mltoolkit.int8_weight_only_linear.default,
                              (torch.randn(30, 65, requires_grad=True), wq, ws, None))
    torch._dynamo.reset()
    x = torch.randn(4, 65)
    with mltoolkit.backend(backend):
        assert torch.equal(torch.compile(fn, fullgraph=True)(x), fn(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_fast_path_matches_registered_op(backend):
    """Plain eager calls skip the custom-op dispatch; any active mode takes the registered op. Both agree bit for
    bit, gradients included, with and without autograd recording."""
    skip_unavailable(backend)
    _, wq, ws = weights(33, 64, 5)
    x0, b0 = torch.randn(3, 2, 64, generator=gen(13)), torch.randn(33, generator=gen(14))
    dy = torch.randn(3, 2, 33, generator=gen(15))
    results = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        x, b = x0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        with mltoolkit.backend(backend), mode:
            y = ops.int8_weight_only_linear(x, wq, ws, b)
            with torch.no_grad():
                y_nograd = ops.int8_weight_only_linear(x, wq, ws, b)
        results.append((y.detach(), y_nograd, *torch.autograd.grad(y, (x, b), dy)))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_bad_input():
    x = torch.randn(4, 8)
    wq, ws = reference.quantize_rows(torch.randn(3, 8))
    fn = ops.int8_weight_only_linear
    cases = [
        (lambda: fn(x, wq.float(), ws), TypeError, "int8_weight_only_linear: wq must be int8"),
        (lambda: fn(x, wq[None], ws), ValueError, r"wq must be 2-D"),
        (lambda: fn(x, wq, ws.double()), TypeError, "w_scale must be float32"),
        (lambda: fn(x, wq, ws[:2]), ValueError, r"w_scale must have shape \(N,\) = \(3,\)"),
        (lambda: fn(x.long(), wq, ws), TypeError, "x must be float32"),
        (lambda: fn(x[:, :7], wq, ws), ValueError, "x must have in_features K = wq.shape.1. = 8"),
        (lambda: fn(x, wq, ws, torch.zeros(3, dtype=torch.float16)), TypeError, "bias dtype"),
        (lambda: fn(x, wq, ws, torch.zeros(4)), ValueError, r"bias must have shape \(N,\) = \(3,\)"),
        (lambda: fn(x, "w", ws), TypeError, "wq must be a Tensor"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
    skip_unavailable("cpp")
    C = mltoolkit._ext._C
    with pytest.raises(RuntimeError, match="int8_weight_only_linear_cpu: wq must be int8"):
        C.int8_weight_only_linear_cpu(x, wq.float(), ws, None)
    with pytest.raises(RuntimeError, match=r"int8_weight_only_linear_cpu: x must be \(M, K\) with K = 8"):
        C.int8_weight_only_linear_cpu(x[:, :5], wq, ws, None)
    with pytest.raises(RuntimeError, match=r"int8_weight_only_linear_cpu: w_scale must have shape \(N,\) = \(3,\)"):
        C.int8_weight_only_linear_cpu(x, wq, ws[:1], None)
    with pytest.raises(RuntimeError, match="int8_weight_only_linear_cpu: bias must have x's dtype"):
        C.int8_weight_only_linear_cpu(x, wq, ws, torch.zeros(3, dtype=torch.float64))
