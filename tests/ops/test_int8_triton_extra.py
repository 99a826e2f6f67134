"""The Triton kernels of the newer int8 ops (triton_kernels/int8_extra.py): int8_weight_only_linear on each of its
paths (GEMV, split-K dot, tiled dot) against the reference (float32 to summation order, 16-bit outputs to one
rounding), its backward (the forward kernel on the transposed problem) and opcheck / compile; quantize_static and
im2col_int8 bit-exact (NCHW, channels_last, strided); the static int8 convolution end to end; the tables' order.

Each test runs forced to the triton backend: on the CPU under TRITON_INTERPRET=1 (set by conftest without a GPU), on
tiny odd shapes, and on CUDA tensors where there is a GPU (marked cuda), where test_wo_large_gpu also covers the
autotuned and decode (split-K) launch configurations.
"""
import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference import int8 as ref8
from mltoolkit.testing import triton_forced

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def device(request):
    with triton_forced("int8_weight_only", request.param):
        yield request.param


def _k():
    from mltoolkit.triton_kernels import int8_extra

    return int8_extra


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _weight(n, k, seed):
    """Any int8 value, -128 included, with per-channel float32 scales."""
    g = gen(seed)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.02 + 1e-3
    return wq, ws


def _tol(dtype, k):
    """Float32 accumulation in another order than the reference's matmul, then one rounding to dtype."""
    return {torch.float32: 1e-5 * k ** 0.5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _check_wo(y, x, wq, ws, b):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], wq.shape[0])
    xc, wc, sc = x.cpu(), wq.cpu(), ws.cpu()
    want = ref8.int8_weight_only_linear(xc.double(), wc, sc.double(), None if b is None else b.cpu().double())
    scale = want.abs().max().item() + 1
    err = (y.cpu().double() - want).abs().max().item()
    assert err <= 2 * _tol(x.dtype, x.shape[1]) * scale, f"max error {err:.3g} (scale {scale:.3g})"


# ---- int8_weight_only_linear --------------------------------------------------------------------------------------

# (M, K, N): M <= 2 GEMV, M <= 16 split-K dot (on a GPU), beyond: tiled dot; odd K and N everywhere.
SHAPES = [(1, 1, 1), (1, 97, 7), (2, 33, 5), (5, 70, 9), (16, 7, 3), (17, 41, 13)]


@pytest.mark.parametrize("M,K,N", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp16", "bf16"])
def test_wo_matches_reference(device, M, K, N, dtype):
    wq, ws = _weight(N, K, M + K + N)
    g = gen(M)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype)
    wq, ws = wq.to(device), ws.to(device)
    _check_wo(ops.int8_weight_only_linear(x, wq, ws, b), x, wq, ws, b)
    _check_wo(ops.int8_weight_only_linear(x, wq, ws), x, wq, ws, None)


@pytest.mark.parametrize("gemv_max_m", [0, 8], ids=["dot", "gemv"])
def test_wo_paths_strides_and_split(device, monkeypatch, gemv_max_m):
    """Each path on strided x (column-major and sliced rows) and a column-major wq, with K long enough to split
    (under the interpreter 4 'SMs' ask for several K splits of a single N tile), and leading dims."""
    monkeypatch.setattr(_k(), "GEMV_MAX_M", gemv_max_m)
    wq, ws = _weight(5, 300, 1)
    g = gen(2)
    wq, ws = wq.to(device), ws.to(device)
    wt = wq.T.contiguous().T  # (5, 300), column-major
    x = torch.randn(300, 3, generator=g).to(device).T  # (3, 300), column-major
    xs = torch.randn(3, 400, generator=g).to(device)[:, 50:350]  # row stride 400
    b = torch.randn(5, generator=g).to(device)
    for xx in (x, xs):
        for ww in (wq, wt):
            _check_wo(ops.int8_weight_only_linear(xx, ww, ws, b), xx, wq, ws, b)
    y3 = ops.int8_weight_only_linear(x.reshape(1, 3, 300), wq, ws, b)
    assert y3.shape == (1, 3, 5)
    torch.testing.assert_close(y3[0], ops.int8_weight_only_linear(x.contiguous(), wq, ws, b), rtol=1e-6, atol=1e-6)


def test_wo_empty(device):
    wq, ws = _weight(4, 6, 3)
    wq, ws = wq.to(device), ws.to(device)
    assert ops.int8_weight_only_linear(torch.randn(0, 6, device=device), wq, ws).shape == (0, 4)
    b = torch.randn(4, device=device)
    y = ops.int8_weight_only_linear(torch.randn(3, 0, device=device), wq[:, :0], ws, b)
    assert torch.equal(y, b.expand(3, 4))


@pytest.mark.parametrize("M", [1, 6])
def test_wo_gradients_opcheck(device, M):
    """dx (the forward kernel on the transposed problem) and dbias against the reference formula; opcheck."""
    wq, ws = _weight(9, 37, 4)
    wq, ws = wq.to(device), ws.to(device)
    g = gen(5)
    x = torch.randn(M, 37, generator=g).to(device).requires_grad_(True)
    b = torch.randn(9, generator=g).to(device).requires_grad_(True)
    dy = torch.randn(M, 9, generator=g).to(device)
    ops.int8_weight_only_linear(x, wq, ws, b).backward(dy)
    w = ref8.dequantize_int8(wq, ws)
    torch.testing.assert_close(x.grad, dy @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, dy.sum(0), rtol=1e-6, atol=1e-6)
    dx16 = _k().int8_weight_only_dx(dy.bfloat16(), wq, ws, torch.bfloat16)
    torch.testing.assert_close(dx16.float(), (dy.bfloat16().float() @ w), rtol=1.6e-2, atol=1.6e-2)
    torch.library.opcheck(torch.ops.mltoolkit.int8_weight_only_linear.default, (x.detach(), wq, ws, b.detach()))


def test_wo_compile(device):
    wq, ws = _weight(7, 20, 6)
    wq, ws = wq.to(device), ws.to(device)
    x = torch.randn(3, 20, generator=gen(7)).to(device)

    def fn(x):
        return ops.int8_weight_only_linear(x, wq, ws) * 2

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(got, fn(x), rtol=1e-6, atol=1e-6)


# ---- quantize_static ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp16", "bf16"])
def test_quantize_static_bit_exact(device, dtype):
    g = gen(8)
    ties = torch.cat([torch.arange(-130.5, 131, 0.5), torch.tensor([1e30, -1e30, 0.0, -0.0, 254.0, -255.0])])
    cases = [(ties, torch.tensor(1.0)), (ties, torch.tensor(2.0)),  # every x.5 is a tie (to even); clamps
             (torch.randn(7, 97, generator=g) * 3, torch.tensor(0.021)),
             (torch.randn(3, 5, 7, generator=g).transpose(0, 2), torch.tensor(0.01)),  # strided: copied
             (torch.randn(1, generator=g), torch.tensor(1e-3))]
    for i, (x, s) in enumerate(cases):
        x = x.to(dtype)
        if dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
        x, s = x.to(device), s.to(device)
        q = ops.quantize_static(x, s)
        want = ref8.quantize_static(x.cpu(), s.cpu())
        assert q.dtype == torch.int8 and q.shape == x.shape
        assert torch.equal(q.cpu(), want), f"case {i}: {int((q.cpu() != want).sum())} values differ"
    q = ops.quantize_static(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5], device=device, dtype=dtype),
                            torch.tensor(1.0, device=device))
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_quantize_static_channels_last(device):
    x = torch.randn(2, 5, 3, 7, generator=gen(9)).to(device)
    s = torch.tensor(0.02, device=device)
    want = ref8.quantize_static(x.cpu(), s.cpu())
    cl = x.contiguous(memory_format=torch.channels_last)
    q = ops.quantize_static(cl, s)
    assert q.is_contiguous(memory_format=torch.channels_last) and not q.is_contiguous()
    assert torch.equal(q.cpu(), want)
    assert ops.quantize_static(x, s).is_contiguous() and torch.equal(ops.quantize_static(x, s).cpu(), want)
    assert ops.quantize_static(torch.empty(0, 3, device=device), s).shape == (0, 3)
    torch.library.opcheck(torch.ops.mltoolkit.quantize_static.default, (cl, s))


# ---- im2col_int8 --------------------------------------------------------------------------------------------------

# (C, H, W, kernel, stride, padding, dilation)
GEOMETRIES = [(3, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1)), (5, 9, 6, (3, 2), (2, 1), (1, 0), (1, 2)),
              (1, 4, 4, (2, 2), (2, 2), (0, 0), (1, 1)), (17, 3, 5, (1, 3), (1, 2), (0, 2), (1, 1)),
              (2, 1, 1, (1, 1), (1, 1), (1, 1), (1, 1))]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_im2col_bit_exact(device, geometry):
    C, H, W, k, s, p, d = geometry
    xq = torch.randint(-128, 128, (2, C, H, W), generator=gen(C * H), dtype=torch.int8)
    want = ref8.im2col_int8(xq, k, s, p, d)
    xq = xq.to(device)
    for x in (xq, xq.contiguous(memory_format=torch.channels_last), xq.transpose(2, 3).contiguous().transpose(2, 3)):
        got = ops.im2col_int8(x, k, s, p, d)
        assert got.shape == want.shape and torch.equal(got.cpu(), want)
    torch.library.opcheck(torch.ops.mltoolkit.im2col_int8.default, (xq, list(k), list(s), list(p), list(d)))


def test_conv2d_static_end_to_end(device):
    """quantize_static -> im2col_int8 -> int8_linear, every step on the triton backend, equals the cpp / reference
    composition exactly (integer path, the same float32 epilogue), in both memory formats."""
    g = gen(10)
    x = torch.randn(2, 3, 6, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g) / 5
    b = torch.randn(4, generator=g)
    s = (x.abs().amax() / 127).reshape(())
    with mltoolkit.backend(None):  # the CPU side: the fixture forces 'triton', which takes CUDA tensors on a GPU
        wq, ws = ops.quantize_per_channel(ref8.conv_weight_2d(w))
        want = ops.int8_conv2d_static(x, s, wq, ws, b, 3, 2, 1, 1)
    args = [t.to(device) for t in (x, s, wq, ws, b)]
    got = ops.int8_conv2d_static(*args, 3, 2, 1, 1)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)  # integer sums, same epilogue
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    got = ops.int8_conv2d_static(*args, 3, 2, 1, 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


# ---- tables -------------------------------------------------------------------------------------------------------

def test_tables_order_and_choice():
    for name in ("int8_weight_only", "int8_static"):
        names = [b.name for b in table(name).backends]
        assert names.index("triton") < names.index("cpp") < names.index("reference"), names
    x = torch.randn(2, 3)
    # Unforced, a CPU tensor never takes the interpreter: cpp (or the reference without the extension).
    assert table("int8_weight_only").select(x).name != "triton"
    assert table("int8_static").select(x).name != "triton"


# ---- GPU only: realistic shapes (autotuned large M, split-K decode) ------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 2, 7, 16, 64, 300])
@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "fp16", "bf16"])
def test_wo_large_gpu(M, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    K, N = 1024, 515
    w = torch.randn(N, K, generator=gen(11)) / K ** 0.5
    wq, ws = ops.quantize_per_channel(w)
    x = torch.randn(M, K, generator=gen(M)).to(dtype)
    b = (torch.randn(N, generator=gen(12)) * 0.1).to(dtype)
    with mltoolkit.backend("triton"):
        y = ops.int8_weight_only_linear(x.cuda(), wq.cuda(), ws.cuda(), b.cuda())
    _check_wo(y, x, wq, ws, b)
    assert table("int8_weight_only").select(x.cuda()).name == "triton"
    assert table("int8_static").select(x.cuda()).name == "triton"
    want = F.linear(x.double(), w.double(), b.double())
    err = (y.cpu().double() - want).pow(2).mean() / want.pow(2).mean()
    assert err < 10 ** -3.0  # >= 30 dB: the int8 weight's error plus the output rounding
