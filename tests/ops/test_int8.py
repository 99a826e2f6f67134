"""int8 quantizers and int8_linear against the integer reference (bit-exact), int8_linear_dynamic against F.linear
(SQNR), on every CPU path of the C++ kernel (MLTK_INT8_ISA forces vnni / avx2 / scalar where the CPU has them)."""
import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops import int8 as int8_ops
from mltoolkit.ops.reference import int8 as reference
from mltoolkit.testing import sqnr

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 97, 123, 1025]


def _cpp_or_skip():
    why = table("int8").get("cpp").available()
    if why is not None:
        pytest.skip(f"cpp backend unavailable: {why}")


def _isa_supported(isa):
    import os

    old = os.environ.get("MLTK_INT8_ISA")
    os.environ["MLTK_INT8_ISA"] = isa
    try:
        return int8_ops.isa() == isa
    except RuntimeError:
        return False
    finally:
        if old is None:
            del os.environ["MLTK_INT8_ISA"]
        else:
            os.environ["MLTK_INT8_ISA"] = old


@pytest.fixture(params=["vnni", "avx2", "scalar"])
def isa(request, monkeypatch):
    _cpp_or_skip()
    if not _isa_supported(request.param):
        pytest.skip(f"this CPU has no {request.param} path")
    monkeypatch.setenv("MLTK_INT8_ISA", request.param)
    assert int8_ops.isa() == request.param
    return request.param


def _ints(*shape, gen, lo=-128, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)


# ---- quantizers -----------------------------------------------------------------------------------------------

def _quant_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(r, k, generator=g).to(dtype) * 3 for r, k in [(1, 1), (7, 97), (123, 1025), (3, 16)]]
    # Ties: absmax 127 gives scale 1, so every x.5 is exactly halfway (to even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2);
    # absmax 254 gives scale 2 and odd integers land on ties too.
    ties = torch.arange(-126.5, 127, 1.0)
    row = torch.cat([ties, torch.tensor([127.0, -127.0])])
    cases.append(torch.stack([row, row * 2, torch.zeros_like(row), torch.full_like(row, 1e-38),
                              torch.full_like(row, -5.0)]).to(dtype))
    return cases


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_quantize_bit_exact(backend, dtype):
    if backend == "cpp":
        _cpp_or_skip()
    for x in _quant_inputs(dtype):
        want_q, want_s = reference.quantize_rows(x)
        with mltoolkit.backend(backend):
            for fn in (ops.quantize_per_token, ops.quantize_per_channel):
                q, s = fn(x)
                assert q.dtype == torch.int8 and s.dtype == torch.float32
                assert torch.equal(s, want_s), f"{fn.__name__}: scales differ"
                assert torch.equal(q, want_q), f"{fn.__name__}: {int((q != want_q).sum())} values differ"
    # the hand-checked corners
    x = _quant_inputs(torch.float32)[-1]
    q, s = ops.quantize_per_token(x)
    assert s[0] == 1 and s[1] == 2 and s[2] == 1 and s[3] == 1
    assert q[0, :4].tolist() == [-126, -126, -124, -124]  # -126.5, -125.5, -124.5, -123.5 to even
    assert q[1, :4].tolist() == [-126, -126, -124, -124]
    assert (q[2] == 0).all() and (q[3] == 0).all() and (q[4] == -127).all()


def test_quantize_shapes_and_noncontiguous():
    _cpp_or_skip()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 97, generator=g)
    q, s = ops.quantize_per_token(x)
    assert q.shape == (4, 5, 97) and s.shape == (4, 5)
    wq, ws = reference.quantize_rows(x.reshape(-1, 97))
    assert torch.equal(q.reshape(-1, 97), wq) and torch.equal(s.reshape(-1), ws)
    w = torch.randn(97, 123, generator=g).T  # (123, 97), column-major
    q, s = ops.quantize_per_channel(w)
    wq, ws = reference.quantize_rows(w.contiguous())
    assert torch.equal(q, wq) and torch.equal(s, ws)
    big = torch.randn(7, 300, generator=g)[:, 50:147]  # row stride 300
    assert torch.equal(ops.quantize_per_token(big)[0], reference.quantize_rows(big.contiguous())[0])


# ---- int8_linear: exact accumulation --------------------------------------------------------------------------

def _check_exact(xq, xs, wq, ws, bias):
    """float32 output: identical to the reference, and within the epilogue's float32 rounding of the float64 value
    computed from exact int64 sums."""
    y = ops.int8_linear(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    want = reference.int8_linear(xq, xs, wq, ws, bias, torch.float32)
    acc64 = xq.long() @ wq.long().T
    exact = acc64.double() * xs.double()[:, None] * ws.double()[None, :]
    exact = exact + (bias.double() if bias is not None else 0)
    bound = 4 * torch.finfo(torch.float32).eps * ((acc64.double() * xs.double()[:, None] * ws.double()).abs()
                                                  + (bias.double().abs() if bias is not None else 0))
    assert ((y.double() - exact).abs() <= bound).all(), "outside the float32 rounding of the epilogue"
    assert torch.equal(y, want), f"{int((y != want).sum())} of {y.numel()} differ from the reference"


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 97, 123), (123, 7, 97), (1, 1025, 7), (97, 123, 1025),
                                   (16, 1025, 97), (1025, 123, 7), (3, 64, 5), (5, 128, 9)])
def test_int8_linear_exact(isa, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    xq, wq = _ints(M, K, gen=g), _ints(N, K, gen=g)  # the full range, -128 included
    xs, ws = torch.rand(M, generator=g) + 0.01, torch.rand(N, generator=g) * 1e-2
    bias = torch.randn(N, generator=g) if (M + N) % 2 else None
    _check_exact(xq, xs, wq, ws, bias)
    _check_exact(xq, xs, wq, ws, torch.randn(N, generator=g))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 97, 123), (16, 1025, 97), (123, 64, 5), (5, 128, 9),
                                   (1, 4096, 33), (13, 6, 64), (130, 37, 65), (6, 3, 129)])
def test_int8_linear_packed(isa, M, K, N):
    g = torch.Generator().manual_seed(M + K * 7 + N * 13)
    xq, wq = _ints(M, K, gen=g), _ints(N, K, gen=g)
    xs, ws = torch.rand(M, generator=g), torch.rand(N, generator=g) * 1e-2
    packed = ops.int8_pack_weight(wq)
    assert packed.shape == ((N + 63) // 64, (K + 3) // 4, 64, 4)
    assert torch.equal(packed, reference.pack_weight(wq))
    assert packed[0, 0, 0, 0] == wq[0, 0] ^ -128 and packed[-1, -1, -1, -1] == -128  # sign flipped; zero padding
    assert torch.equal(reference.unpack_weight(packed, N, K), wq)
    bias = torch.randn(N, generator=g)
    want = ops.int8_linear(xq, xs, wq, ws, bias)
    assert torch.equal(ops.int8_linear(xq, xs, packed, ws, bias), want)
    assert torch.equal(reference.int8_linear(xq, xs, packed, ws, bias, torch.float32), want)
    x = torch.randn(M, K, generator=g)
    assert torch.equal(ops.int8_linear_dynamic(x, packed, ws, bias), ops.int8_linear_dynamic(x, wq, ws, bias))


def test_int8_linear_extremes(isa):
    # All -128 (and all 127 against -128): the largest sums; K at the contract's limit stays exact.
    for K in (1025, 131071):
        for a, b in ((-128, -128), (127, -128), (-128, 127)):
            xq, wq = torch.full((2, K), a, dtype=torch.int8), torch.full((5, K), b, dtype=torch.int8)
            for w in (wq, ops.int8_pack_weight(wq)):
                y = ops.int8_linear(xq, torch.ones(2), w, torch.ones(5))
                assert (y == float(torch.tensor(a * b * K, dtype=torch.float32))).all()
    with pytest.raises(RuntimeError, match="K must be at most 131071"):
        ops.int8_linear(torch.zeros(1, 131072, dtype=torch.int8), torch.ones(1),
                        torch.zeros(1, 131072, dtype=torch.int8), torch.ones(1))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_int8_linear_out_dtypes(isa, out_dtype):
    g = torch.Generator().manual_seed(3)
    xq, wq = _ints(9, 130, gen=g), _ints(33, 130, gen=g)
    xs, ws = torch.rand(9, generator=g) * 1e-2, torch.rand(33, generator=g) * 1e-2
    bias = torch.randn(33, generator=g).to(out_dtype)
    y = ops.int8_linear(xq, xs, wq, ws, bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    assert torch.equal(y, reference.int8_linear(xq, xs, wq, ws, bias, out_dtype))


def test_int8_linear_noncontiguous(isa):
    g = torch.Generator().manual_seed(4)
    xq = _ints(11, 300, gen=g)[:, 13:110]  # (11, 97), row stride 300, contiguous rows
    wq = _ints(97, 40, gen=g).T  # (40, 97), column-major
    xs_big = torch.rand(22, generator=g)
    xs = xs_big[::2]  # strided scales
    ws = torch.rand(80, generator=g)[::2]
    _check_exact(xq, xs, wq, ws, None)
    x3 = _ints(2, 3, 97, gen=g)  # leading dims
    y = ops.int8_linear(x3, torch.rand(2, 3, generator=g), wq, ws)
    assert y.shape == (2, 3, 40)


# ---- int8_linear_dynamic ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
def test_dynamic_sqnr(isa, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 1024, generator=g).to(dtype)
    w = torch.randn(257, 1024, generator=g) / 32
    b = torch.randn(257, generator=g)
    wq, ws = ops.quantize_per_channel(w)
    y = ops.int8_linear_dynamic(x, wq, ws, b.to(dtype))
    assert y.shape == (2, 16, 257) and y.dtype == dtype
    want = F.linear(x.double(), w.double(), b.double())
    assert sqnr(want, y) >= 35, f"SQNR {sqnr(want, y):.1f} dB"
    assert torch.equal(y, reference.int8_linear_dynamic(x, wq, ws, b.to(dtype)))


def test_dynamic_odd_sizes(isa):
    g = torch.Generator().manual_seed(6)
    for M, K, N in [(1, 7, 1), (7, 1, 97), (97, 123, 7), (1025, 97, 123), (1, 1025, 1025)]:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        wq, ws = ops.quantize_per_channel(w)
        y = ops.int8_linear_dynamic(x, wq, ws)
        assert torch.equal(y, reference.int8_linear_dynamic(x, wq, ws))
        if K > 1:
            assert sqnr(F.linear(x.double(), w.double()), y) >= 35


def test_paths_agree():
    _cpp_or_skip()
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(33, 515, generator=g), torch.randn(70, 515, generator=g)
    wq, ws = ops.quantize_per_channel(w)
    with mltoolkit.backend("reference"):
        want = ops.int8_linear_dynamic(x, wq, ws)
    assert torch.equal(ops.int8_linear_dynamic(x, wq, ws), want)


# ---- opcheck, compile ---------------------------------------------------------------------------------------------

def test_opcheck():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 33, generator=g)
    wq, ws = reference.quantize_rows(torch.randn(7, 33, generator=g))
    xq, xs = reference.quantize_rows(x)
    for dtype in FLOATS:
        torch.library.opcheck(torch.ops.mltoolkit.quantize_per_token.default, (x.to(dtype),))
        torch.library.opcheck(torch.ops.mltoolkit.quantize_per_channel.default, (x.to(dtype),))
        torch.library.opcheck(torch.ops.mltoolkit.int8_linear.default,
                              (xq, xs, wq, ws, torch.randn(7, generator=g), dtype))
    torch.library.opcheck(torch.ops.mltoolkit.int8_linear.default, (xq, xs, wq, ws, None, torch.float32))
    packed = reference.pack_weight(wq)
    torch.library.opcheck(torch.ops.mltoolkit.int8_linear.default, (xq, xs, packed, ws, None, torch.float32))
    torch.library.opcheck(torch.ops.mltoolkit.int8_pack_weight.default, (wq,))


def test_compile():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(19, 65, generator=g)
    wq, ws = ops.quantize_per_channel(w)
    b = torch.randn(19, generator=g)

    def f(x):
        return ops.int8_linear_dynamic(x, wq, ws, b)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for m in (3, 8):
        x = torch.randn(2, m, 65, generator=g)
        assert torch.equal(compiled(x), f(x))

    def q(x):
        xq, xs = ops.quantize_per_token(x)
        return ops.int8_linear(xq, xs, wq, ws, None, torch.bfloat16)

    x = torch.randn(6, 65, generator=g)
    assert torch.equal(torch.compile(q, fullgraph=True)(x), q(x))

    def packed(x):
        return ops.int8_linear_dynamic(x, ops.int8_pack_weight(wq), ws, b)

    assert torch.equal(torch.compile(packed, fullgraph=True)(x), f(x))


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_bad_input():
    x = torch.randn(4, 8)
    wq, ws = reference.quantize_rows(torch.randn(3, 8))
    xq, xs = reference.quantize_rows(x)
    cases = [
        (lambda: ops.quantize_per_token(x.long()), TypeError, "quantize_per_token: x must be float32"),
        (lambda: ops.quantize_per_channel(torch.randn(2, 3, 4)), ValueError, "quantize_per_channel: w must be 2-D"),
        (lambda: ops.int8_linear_dynamic(x, wq.float(), ws), TypeError, "int8_linear_dynamic: wq must be int8"),
        (lambda: ops.int8_linear_dynamic(x, wq[:, :7], ws), ValueError, r"wq must be \(N, K\) with K = 8"),
        (lambda: ops.int8_linear_dynamic(x, wq, ws[:2]), ValueError, r"w_scale must have shape \(3,\)"),
        (lambda: ops.int8_linear_dynamic(x, wq, ws.double()), TypeError, "w_scale must be float32"),
        (lambda: ops.int8_linear_dynamic(x, wq, ws, torch.zeros(4)), ValueError, r"bias must have shape \(3,\)"),
        (lambda: ops.int8_linear_dynamic(x.double(), wq, ws), TypeError, "int8_linear_dynamic: x must be float32"),
        (lambda: ops.int8_linear(x, xs, wq, ws), TypeError, "int8_linear: xq must be int8"),
        (lambda: ops.int8_linear(xq, xs[:3], wq, ws), ValueError, r"x_scale must have shape \(4,\)"),
        (lambda: ops.int8_linear(xq, xs, wq, ws, out_dtype=torch.int32), TypeError, "out_dtype must be"),
        (lambda: ops.int8_linear(xq, xs, wq.T.contiguous(), ws), ValueError, "K = 8"),
        (lambda: ops.int8_linear(xq, xs, reference.pack_weight(wq), torch.ones(65)), ValueError,
         r"packed wq must have shape .* = \(2, 2, 64, 4\) for N = 65"),
        (lambda: ops.int8_linear(xq, xs, wq[None], ws), ValueError, "wq must be 2-D"),
        (lambda: ops.int8_pack_weight(wq.float()), TypeError, "int8_pack_weight: wq must be int8"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_kernel_checks():
    _cpp_or_skip()
    C = mltoolkit._ext._C
    wq = torch.zeros(3, 8, dtype=torch.int8)
    xq = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8_linear_cpu: wq must be int8"):
        C.int8_linear_cpu(xq, torch.ones(4), wq.float(), torch.ones(3), None, torch.float32)
    with pytest.raises(RuntimeError, match=r"int8_linear_cpu: wq must be \(N, K\) with K = 8"):
        C.int8_linear_cpu(xq, torch.ones(4), wq[:, :5], torch.ones(3), None, torch.float32)
    with pytest.raises(RuntimeError, match=r"int8_linear_cpu: x_scale must have shape \(M,\) = \(4,\)"):
        C.int8_linear_cpu(xq, torch.ones(3), wq, torch.ones(3), None, torch.float32)
    with pytest.raises(RuntimeError, match="int8_linear_cpu: bias must be float32"):
        C.int8_linear_cpu(xq, torch.ones(4), wq, torch.ones(3), torch.ones(3).double(), torch.float32)
    with pytest.raises(RuntimeError, match=r"int8_linear_cpu: packed wq must have shape .* = \(1, 2, 64, 4\)"):
        C.int8_linear_cpu(xq, torch.ones(4), torch.zeros(2, 1, 4, 64, dtype=torch.int8), torch.ones(3), None,
                          torch.float32)
    with pytest.raises(RuntimeError, match="quantize_rows_cpu: x must be float32, float16 or bfloat16"):
        C.quantize_rows_cpu(torch.zeros(2, 3, dtype=torch.int32))


def test_isa_env(monkeypatch):
    _cpp_or_skip()
    monkeypatch.setenv("MLTK_INT8_ISA", "sse9")
    with pytest.raises(RuntimeError, match="MLTK_INT8_ISA must be auto, vnni, avx2 or scalar"):
        ops.int8_linear(torch.zeros(1, 4, dtype=torch.int8), torch.ones(1), torch.zeros(2, 4, dtype=torch.int8),
                        torch.ones(2))


def test_empty_shapes():
    # K = 0: scale 1 and empty rows; zero tokens: empty outputs (reshape must not infer -1 from a zero-size dim).
    xq, scale = ops.quantize_per_token(torch.zeros(2, 3, 0))
    assert xq.shape == (2, 3, 0) and torch.equal(scale, torch.ones(2, 3))
    wq, ws = ops.quantize_per_channel(torch.randn(5, 8))
    y = ops.int8_linear_dynamic(torch.zeros(0, 4, 8), wq, ws)
    assert y.shape == (0, 4, 5)
    y = ops.int8_linear(torch.zeros(2, 0, 8, dtype=torch.int8), torch.ones(2, 0), wq, ws)
    assert y.shape == (2, 0, 5)
