"""Static int8 activation quantization (quantize_static), the int8 im2col, and the static int8 linear and convolution
built on int8_linear: bit-exact against the integer reference on every CPU backend, SQNR against float, layouts,
opcheck, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference import int8 as reference
from mltoolkit.testing import sqnr

BACKENDS = ["cpp", "reference"]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def skip_unavailable(backend):
    why = table("int8_static").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def scale_of(x):
    return (x.abs().max().float() / 127).reshape(())


# ---- quantize_static ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_static_bit_exact(backend, dtype):
    skip_unavailable(backend)
    for shape in [(1,), (7, 97), (3, 5, 123), (2, 3, 9, 11), (4097,)]:
        x = (torch.randn(*shape, generator=gen(len(shape))) * 3).to(dtype)
        s = scale_of(x) * 0.8  # 20% of the range clips
        with mltoolkit.backend(backend):
            q = ops.quantize_static(x, s)
        assert q.dtype == torch.int8 and q.shape == x.shape
        assert torch.equal(q, reference.quantize_static(x, s))
        assert int(q.min()) >= -127
    # ties round half to even (scale 1: x.5 halfway), clamping, zeros
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, 300.0, -300.0, 0.0, -0.0])
    with mltoolkit.backend(backend):
        q = ops.quantize_static(x, torch.tensor(1.0))
    assert q.tolist() == [0, 2, 2, 0, -2, 126, 127, 127, -127, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_static_layouts(backend):
    skip_unavailable(backend)
    x = torch.randn(2, 5, 7, 9, generator=gen(1))
    s = scale_of(x)
    want = reference.quantize_static(x, s)
    cl = x.contiguous(memory_format=torch.channels_last)
    with mltoolkit.backend(backend):
        q = ops.quantize_static(cl, s)
        assert q.is_contiguous(memory_format=torch.channels_last) and torch.equal(q, want)
        q = ops.quantize_static(x[:, :, 1:6, ::2], s)  # not dense: comes back row-major
        assert q.is_contiguous() and torch.equal(q, want[:, :, 1:6, ::2])
        q = ops.quantize_static(x.transpose(1, 3), s)
        assert q.is_contiguous() and torch.equal(q, want.transpose(1, 3))


# ---- im2col -------------------------------------------------------------------------------------------------------

GEOMETRIES = [  # (C, H, W, kernel, stride, padding, dilation)
    (3, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (5, 7, 13, (2, 3), (2, 1), (0, 2), (1, 2)),
    (4, 6, 6, (1, 1), (2, 2), (0, 0), (1, 1)),
    (7, 5, 5, (5, 5), (1, 1), (2, 2), (1, 1)),
    (2, 10, 3, (3, 1), (3, 1), (1, 0), (2, 1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_im2col_exact(backend, geometry):
    skip_unavailable(backend)
    C, H, W, k, s, p, d = geometry
    xq = torch.randint(-128, 128, (2, C, H, W), generator=gen(C * H), dtype=torch.int8)
    want = reference.im2col_int8(xq, k, s, p, d)
    with mltoolkit.backend(backend):
        cl = xq.contiguous(memory_format=torch.channels_last)
        for x in (xq, cl, xq.transpose(2, 3).contiguous().transpose(2, 3)):
            got = ops.im2col_int8(x, k, s, p, d)
            assert got.shape == want.shape and torch.equal(got, want)
    # against float unfold directly, in its own column order
    cols = F.unfold(xq.float(), k, d, p, s)  # (B, C * KH * KW, L)
    B, L = cols.shape[0], cols.shape[-1]
    alt = cols.reshape(B, C, k[0] * k[1], L).permute(0, 3, 2, 1).reshape(B * L, -1)
    assert torch.equal(want.float(), alt)


def test_im2col_pointwise_is_a_view():
    xq = torch.randint(-128, 128, (2, 6, 4, 5), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    cols = ops.im2col_int8(xq, 1)
    assert cols.data_ptr() == xq.data_ptr() and torch.equal(cols, reference.im2col_int8(xq, (1, 1), (1, 1), (0, 0),
                                                                                          (1, 1)))


# ---- static linear and convolution --------------------------------------------------------------------------------

@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 97, 123), (123, 64, 7), (16, 1025, 97)])
def test_linear_static_exact(M, K, N):
    x = torch.randn(M, K, generator=gen(M + K))
    w = torch.randn(N, K, generator=gen(N))
    wq, ws = ops.quantize_per_channel(w)
    b = torch.randn(N, generator=gen(3))
    s = scale_of(x) * 0.9
    y = ops.int8_linear_static(x, s, wq, ws, b)
    # the integer path: quantize with the static scale, exact int sums, the float32 epilogue in the contract's order
    xq = reference.quantize_static(x, s)
    want = reference.int8_linear(xq, s.expand(M), wq, ws, b, torch.float32)
    assert torch.equal(y, want)
    assert torch.equal(ops.int8_linear_static(x, s, ops.int8_pack_weight(wq), ws, b), want)
    with mltoolkit.backend("reference"):
        assert torch.equal(ops.int8_linear_static(x, s, wq, ws, b), want)


def test_linear_static_batched_and_empty_k():
    """Leading batch dims come back on y; K = 0 gives the bias (the sums over no k are 0), not a reshape error."""
    x = torch.randn(2, 3, 16, generator=gen(5))
    wq, ws = ops.quantize_per_channel(torch.randn(5, 16, generator=gen(6)))
    b = torch.randn(5, generator=gen(7))
    s = scale_of(x)
    y = ops.int8_linear_static(x, s, wq, ws, b)
    assert y.shape == (2, 3, 5)
    assert torch.equal(y.reshape(6, 5), ops.int8_linear_static(x.reshape(6, 16), s, wq, ws, b))
    empty = ops.int8_linear_static(torch.randn(2, 3, 0), torch.tensor(0.5), torch.zeros(5, 0, dtype=torch.int8),
                                   torch.ones(5), b)
    assert empty.shape == (2, 3, 5) and torch.equal(empty, b.expand(2, 3, 5))


@pytest.mark.parametrize("dtype", FLOATS)
def test_linear_static_sqnr(dtype):
    x = torch.randn(4, 32, 512, generator=gen(5)).to(dtype)
    w = torch.randn(257, 512, generator=gen(6)) / 16
    wq, ws = ops.quantize_per_channel(w)
    y = ops.int8_linear_static(x, scale_of(x), wq, ws)
    assert y.shape == (4, 32, 257) and y.dtype == dtype
    got = sqnr(F.linear(x.double(), w.double()), y)
    assert got >= 30, f"SQNR {got:.1f} dB"  # a per-tensor scale over Gaussian data: ~3 dB under per-token


def _conv_case(C, OC, k, seed):
    w = torch.randn(OC, C, *k, generator=gen(seed)) / (C * k[0] * k[1]) ** 0.5
    wq, ws = ops.quantize_per_channel(reference.conv_weight_2d(w))
    return w, wq, ws


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_conv_static_exact_and_sqnr(geometry):
    C, H, W, k, s, p, d = geometry
    w, wq, ws = _conv_case(C, 6, k, C + H)
    x = torch.randn(3, C, H, W, generator=gen(W))
    b = torch.randn(6, generator=gen(1))
    xs = scale_of(x)
    y = ops.int8_conv2d_static(x, xs, wq, ws, b, k, s, p, d)
    want_f = F.conv2d(x.double(), w.double(), b.double(), s, p, d)
    assert y.shape == want_f.shape and y.is_contiguous()
    # the integer path: exact sums of the int8 im2col columns and int8 weights, the epilogue in float32
    cols = reference.im2col_int8(reference.quantize_static(x, xs), k, s, p, d)
    want = reference.int8_linear(cols, xs.expand(cols.shape[0]), wq, ws, b, torch.float32)
    assert torch.equal(y.permute(0, 2, 3, 1).reshape(-1, 6), want)
    assert sqnr(want_f, y) >= 30, f"SQNR {sqnr(want_f, y):.1f} dB"
    # channels_last in, channels_last out, same values; packed weight too
    ycl = ops.int8_conv2d_static(x.contiguous(memory_format=torch.channels_last), xs, ops.int8_pack_weight(wq), ws,
                                 b, k, s, p, d)
    assert (C == 1 or ycl.is_contiguous(memory_format=torch.channels_last)) and torch.equal(ycl, y)


def test_conv_static_half():
    w, wq, ws = _conv_case(8, 16, (3, 3), 2)
    x = torch.randn(2, 8, 12, 12, generator=gen(3)).to(torch.bfloat16)
    y = ops.int8_conv2d_static(x, scale_of(x), wq, ws, None, 3, 1, 1)
    assert y.dtype == torch.bfloat16
    assert sqnr(F.conv2d(x.double(), w.double(), None, 1, 1), y) >= 30


# ---- opcheck, compile, bad input ----------------------------------------------------------------------------------

def test_opcheck_and_compile():
    x = torch.randn(2, 3, 7, 6, generator=gen(7))
    s = scale_of(x)
    for dtype in FLOATS:
        torch.library.opcheck(torch.ops.mltoolkit.quantize_static.default, (x.to(dtype), s))
    torch.library.opcheck(torch.ops.mltoolkit.quantize_static.default,
                          (x.contiguous(memory_format=torch.channels_last), s))
    xq = reference.quantize_static(x, s)
    torch.library.opcheck(torch.ops.mltoolkit.im2col_int8.default, (xq, [3, 2], [2, 1], [1, 0], [1, 2]))
    torch.library.opcheck(torch.ops.mltoolkit.im2col_int8.default,
                          (xq.contiguous(memory_format=torch.channels_last), [3, 3], [1, 1], [1, 1], [1, 1]))
    w, wq, ws = _conv_case(3, 5, (3, 3), 8)
    lw, lwq, lws = _conv_case(6, 4, (1, 1), 9)

    def f(x):
        y = ops.int8_conv2d_static(x, s, wq, ws, None, 3, 1, 1)
        return ops.int8_linear_static(y.flatten(1)[:, :6], s, lwq, lws)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_bad_input():
    x = torch.randn(2, 3, 5, 5)
    s = scale_of(x)
    _, wq, ws = _conv_case(3, 4, (3, 3), 1)
    xq = reference.quantize_static(x, s)
    cases = [
        (lambda: ops.quantize_static(x.long(), s), TypeError, "quantize_static: x must be float32"),
        (lambda: ops.quantize_static(x, 0.1), TypeError, "quantize_static: scale must be a float32 Tensor"),
        (lambda: ops.quantize_static(x, s.double()), TypeError, "quantize_static: scale must be float32"),
        (lambda: ops.quantize_static(x, torch.ones(2)), ValueError, "scale must have one element"),
        (lambda: ops.im2col_int8(x, 3), TypeError, "im2col_int8: xq must be int8"),
        (lambda: ops.im2col_int8(xq[0], 3), ValueError, r"im2col_int8: xq must be 4-D"),
        (lambda: ops.im2col_int8(xq, 0), ValueError, "kernel_size must be at least 1"),
        (lambda: ops.im2col_int8(xq, 3, stride=(1, 0)), ValueError, "stride must be at least 1"),
        (lambda: ops.im2col_int8(xq, 3, padding=-1), ValueError, "padding must be at least 0"),
        (lambda: ops.im2col_int8(xq, 7), ValueError, "smaller than the dilated kernel"),
        (lambda: ops.im2col_int8(xq, 2.5), TypeError, "kernel_size must be an int or a pair"),
        (lambda: ops.int8_linear_static(x, s, wq.float(), ws), TypeError, "int8_linear_static: wq must be int8"),
        (lambda: ops.int8_linear_static(x[0, 0], s[None, None], wq, ws), ValueError,
         "int8_linear_static: wq must be .N, K. with K = 5"),
        (lambda: ops.int8_conv2d_static(x[0], s, wq, ws, None, 3), ValueError, "int8_conv2d_static: x must be 4-D"),
        (lambda: ops.int8_conv2d_static(x, s, wq, ws, None, 2), ValueError,
         r"int8_conv2d_static: wq must be \(OC, KH \* KW \* C\) with KH \* KW \* C = 12"),
        (lambda: ops.int8_conv2d_static(x, s, wq, ws[:2], None, 3), ValueError, "w_scale must have shape"),
        (lambda: ops.int8_conv2d_static(x, s.double(), wq, ws, None, 3), TypeError, "x_scale must be float32"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
    if table("int8_static").get("cpp").available() is None:
        C = mltoolkit._ext._C
        with pytest.raises(RuntimeError, match="quantize_static_cpu: scale must be finite and at least FLT_MIN"):
            C.quantize_static_cpu(x, torch.tensor(0.0))
        with pytest.raises(RuntimeError, match="quantize_static_cpu: scale must be float32"):
            C.quantize_static_cpu(x, torch.tensor(1.0, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="im2col_int8_cpu: xq must be int8"):
            C.im2col_int8_cpu(x, [3, 3], [1, 1], [0, 0], [1, 1])
        with pytest.raises(RuntimeError, match="im2col_int8_cpu: stride must be at least 1"):
            C.im2col_int8_cpu(xq, [3, 3], [0, 1], [0, 0], [1, 1])
