"""The Triton quantized kernels (triton_kernels/quant.py) against the plain-PyTorch references: int8 quantizers and
int8_linear bit-exact (plain and packed weights, every out dtype, bias or not, strided inputs), int4 quantize /
dequantize bit-exact for every group size, int4_weight_only_linear on each of its paths (GEMV, split-K dot, tiled
dot) against the float64 oracle, its backward, opcheck and compile with the backend forced, and the backend tables'
choices.

Each test runs forced to the triton backend: on the CPU under TRITON_INTERPRET=1 (set by conftest without a GPU),
on tiny shapes, and on CUDA tensors where there is a GPU (marked cuda), where the large-shape tests also cover the
autotuned paths.
"""
import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import _ext, ops
from mltoolkit.backends import NoBackendError, table
from mltoolkit.ops.reference import int4 as ref4
from mltoolkit.ops.reference import int8 as ref8
from mltoolkit.testing import Sample, assert_close, check_op, sqnr, triton_forced

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [32, 64, 128, 256]


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def device(request):
    with triton_forced("int8", request.param):
        yield request.param


def _quant():
    from mltoolkit.triton_kernels import quant

    return quant


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _ints(*shape, g, lo=-128, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)


# ---- int8 quantizers ------------------------------------------------------------------------------------------

def _tie_rows():
    # absmax 127 -> scale 1: every x.5 is a tie (to even); absmax 254 -> scale 2; a zero row and a row whose
    # absmax / 127 is subnormal get scale 1.
    row = torch.cat([torch.arange(-126.5, 127, 1.0), torch.tensor([127.0, -127.0])])
    return torch.stack([row, row * 2, torch.zeros_like(row), torch.full_like(row, 1e-38), torch.full_like(row, -5)])


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_rows_bit_exact(device, dtype):
    g = gen(0)
    cases = [torch.randn(1, 1, generator=g), torch.randn(7, 97, generator=g) * 3, _tie_rows(),
             torch.randn(70, 9, generator=g).T,  # (9, 70) column-major
             torch.randn(3, 300, generator=g)[:, 37:237]]  # row stride 300
    for i, x in enumerate(cases):
        x = x.to(device, dtype)
        want_q, want_s = ref8.quantize_rows(x.contiguous())
        fn = ops.quantize_per_token if i % 2 else ops.quantize_per_channel
        q, s = fn(x)
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert torch.equal(s, want_s), f"case {i}: scales differ"
        assert torch.equal(q, want_q), f"case {i}: {int((q != want_q).sum())} values differ"
    q, s = ops.quantize_per_token(_tie_rows().to(device, dtype))
    if dtype == torch.float32:
        assert q[0, :4].tolist() == [-126, -126, -124, -124]
    assert s[2] == 1 and s[3] == 1 and (q[2] == 0).all() and (q[3] == 0).all() and (q[4] == -127).all()


def test_quantize_leading_dims_and_empty(device):
    x = torch.randn(2, 3, 65, generator=gen(1)).to(device)
    q, s = ops.quantize_per_token(x)
    want_q, want_s = ref8.quantize_rows(x.reshape(-1, 65))
    assert q.shape == (2, 3, 65) and s.shape == (2, 3)
    assert torch.equal(q.reshape(-1, 65), want_q) and torch.equal(s.reshape(-1), want_s)
    q, s = ops.quantize_per_channel(torch.randn(4, 0, device=device))
    assert q.shape == (4, 0) and torch.equal(s, torch.ones(4, device=device))


# ---- int8_linear ----------------------------------------------------------------------------------------------

def _exact(xq, xs, wq, ws, bias, out_dtype=torch.float32):
    y = ops.int8_linear(xq, xs, wq, ws, bias, out_dtype=out_dtype)
    n = ws.shape[0]
    w_plain = ref8.unpack_weight(wq, n, xq.shape[-1]) if wq.dim() == 4 else wq
    want = ref8.int8_linear(xq.cpu().reshape(-1, xq.shape[-1]), xs.cpu().reshape(-1), w_plain.cpu(), ws.cpu(),
                            None if bias is None else bias.cpu(), out_dtype).reshape(y.shape)
    assert y.dtype == out_dtype
    assert torch.equal(y.cpu(), want), f"{int((y.cpu() != want).sum())} of {y.numel()} differ from the reference"


# (M, K, N): K below, at and above the block, N and M odd, one and several tiles
LINEAR8 = [(1, 1, 1), (7, 97, 33), (33, 130, 7), (16, 64, 40)]


@pytest.mark.parametrize("M,K,N", LINEAR8)
def test_int8_linear_bit_exact(device, M, K, N):
    g = gen(M * 1000 + K + N)
    xq, wq = _ints(M, K, g=g).to(device), _ints(N, K, g=g).to(device)  # the full range, -128 included
    xs, ws = (torch.rand(M, generator=g) + 0.01).to(device), (torch.rand(N, generator=g) * 1e-2).to(device)
    bias = torch.randn(N, generator=g).to(device)
    _exact(xq, xs, wq, ws, bias if M % 2 else None)
    # packed layout, and the other bias choice
    _exact(xq, xs, ref8.pack_weight(wq), ws, None if M % 2 else bias)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_int8_linear_out_dtypes(device, out_dtype):
    g = gen(3)
    xq, wq = _ints(9, 70, g=g).to(device), _ints(33, 70, g=g).to(device)
    xs, ws = (torch.rand(9, generator=g) * 1e-2).to(device), (torch.rand(33, generator=g) * 1e-2).to(device)
    _exact(xq, xs, wq, ws, torch.randn(33, generator=g).to(device, out_dtype), out_dtype)
    _exact(xq, xs, ref8.pack_weight(wq), ws, None, out_dtype)


def test_int8_linear_noncontiguous(device):
    g = gen(4)
    xq = _ints(11, 300, g=g).to(device)[:, 13:110]  # (11, 97), row stride 300
    wq = _ints(97, 40, g=g).to(device).T  # (40, 97), column-major
    xs = torch.rand(22, generator=g).to(device)[::2]
    ws = torch.rand(80, generator=g).to(device)[::2]
    _exact(xq, xs, wq, ws, None)
    _exact(_ints(2, 3, 97, g=g).to(device), torch.rand(2, 3, generator=g).to(device), wq, ws, None)


def test_int8_linear_extremes(device):
    # all -128 (and 127 against -128): the largest sums; exact in int32
    K = 1025
    for a, b in ((-128, -128), (127, -128)):
        xq = torch.full((2, K), a, dtype=torch.int8, device=device)
        wq = torch.full((5, K), b, dtype=torch.int8, device=device)
        y = ops.int8_linear(xq, torch.ones(2, device=device), wq, torch.ones(5, device=device))
        assert (y == float(a * b * K)).all()
    with pytest.raises(RuntimeError, match="K must be at most 131071"):
        z = torch.zeros(1, 131072, dtype=torch.int8, device=device)
        ops.int8_linear(z, torch.ones(1, device=device), z, torch.ones(1, device=device))


# (M, K, N) for the TMA kernel: K a multiple of 16 (its rule) below / above the block, tails in M and N, more tiles
# than programs (the persistent loop); on a GPU 300 rows also take it unforced (above TMA_MIN_M).
LINEAR8_TMA = [(5, 48, 9), (33, 128, 70), (100, 64, 130), (300, 256, 200)]


@pytest.mark.parametrize("M,K,N", LINEAR8_TMA)
def test_int8_linear_tma_bit_exact(device, monkeypatch, M, K, N):
    quant = _quant()
    if quant.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors")
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    monkeypatch.setattr(quant, "INT8_TMA", True)
    g = gen(M + K + N)
    xq, wq = _ints(M, K, g=g).to(device), _ints(N, K, g=g).to(device)
    assert quant._use_tma(xq, wq, M)
    xs, ws = (torch.rand(M, generator=g) + 0.01).to(device), (torch.rand(N, generator=g) * 1e-2).to(device)
    bias = torch.randn(N, generator=g).to(device)
    _exact(xq, xs, wq, ws, bias if M % 2 else None)
    _exact(xq, xs, wq, ws, bias.bfloat16(), torch.bfloat16)


def test_int8_tma_only_where_descriptors_can_address(monkeypatch):
    quant = _quant()
    monkeypatch.setattr(quant, "INT8_TMA", True)
    wq = torch.zeros(8, 64, dtype=torch.int8)
    ok = quant.TensorDescriptor is not None
    assert quant._use_tma(torch.zeros(4, 64, dtype=torch.int8), wq, 4) == ok
    assert not quant._use_tma(torch.zeros(4, 40, dtype=torch.int8), torch.zeros(8, 40, dtype=torch.int8), 4)  # K % 16
    assert not quant._use_tma(torch.zeros(4, 64, dtype=torch.int8), ref8.pack_weight(wq), 4)  # packed layout
    assert not quant._use_tma(torch.zeros(4, 72, dtype=torch.int8)[:, :64], wq, 4)  # row stride 72
    assert not quant._use_tma(torch.zeros(272, dtype=torch.int8)[1:257].view(4, 64), wq, 4)  # base + 1 byte
    monkeypatch.setattr(quant, "INT8_TMA", None)
    assert not quant._use_tma(torch.zeros(4096, 64, dtype=torch.int8), wq, 4096)  # CPU / interpreter: never unforced


def test_int8_tma_build_failure_falls_back_with_a_warning(monkeypatch):
    quant = _quant()

    def broken(*_):
        raise TypeError("tl.range() got an unexpected keyword argument 'flatten'")

    monkeypatch.setattr(quant, "_TMA_FAILED", None)
    monkeypatch.setattr(quant, "_int8_linear_tma", broken)
    monkeypatch.setattr(quant, "_use_tma", lambda *_: quant._TMA_FAILED is None)
    g = gen(11)
    xq, wq = _ints(6, 64, g=g), _ints(5, 64, g=g)
    xs, ws = torch.rand(6, generator=g), torch.rand(5, generator=g)
    want = ref8.int8_linear(xq, xs, wq, ws, None, torch.float32)
    with pytest.warns(RuntimeWarning, match="TMA kernel does not build"):
        assert torch.equal(quant.int8_linear(xq, xs, wq, ws, None, torch.float32), want)
    assert "flatten" in quant._TMA_FAILED
    assert torch.equal(quant.int8_linear(xq, xs, wq, ws, None, torch.float32), want)  # no second attempt
    monkeypatch.setattr(quant, "INT8_TMA", True)
    monkeypatch.setattr(quant, "_use_tma", lambda *_: True)
    with pytest.raises(TypeError, match="flatten"):  # forced: the failure is the caller's to see
        quant.int8_linear(xq, xs, wq, ws, None, torch.float32)


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_dynamic_sqnr(device, dtype):
    g = gen(5)
    x = torch.randn(2, 5, 256, generator=g).to(device, dtype)
    w = torch.randn(40, 256, generator=g) / 16
    b = torch.randn(40, generator=g).to(dtype)
    wq, ws = (t.to(device) for t in ref8.quantize_rows(w))  # the quantizer has its own tests
    y = ops.int8_linear_dynamic(x, wq, ws, b.to(device))
    assert y.shape == (2, 5, 40) and y.dtype == dtype
    assert torch.equal(y.cpu(), ref8.int8_linear_dynamic(x.cpu(), wq.cpu(), ws.cpu(), b))
    db = sqnr(F.linear(x.cpu().double(), w.double(), b.double()), y.cpu())
    assert db >= 35, f"SQNR {db:.1f} dB"


def test_int8_opcheck(device):
    g = gen(8)
    x = torch.randn(2, 33, generator=g).to(device)
    xq, xs = ref8.quantize_rows(x)
    wq, ws = ref8.quantize_rows(torch.randn(7, 33, generator=g).to(device))
    torch.library.opcheck(torch.ops.mltoolkit.quantize_per_token.default, (x.bfloat16(),))
    torch.library.opcheck(torch.ops.mltoolkit.int8_linear.default,
                          (xq, xs, wq, ws, torch.randn(7, generator=g).to(device), torch.bfloat16))
    torch.library.opcheck(torch.ops.mltoolkit.int8_linear.default,
                          (xq, xs, ref8.pack_weight(wq), ws, None, torch.float32))


# ---- int4 quantize / dequantize -------------------------------------------------------------------------------

@pytest.mark.parametrize("group", GROUPS)
def test_int4_quantize_dequantize_bit_exact(device, group):
    dtype = torch.bfloat16 if group == 64 else torch.float32
    w = (torch.randn(9, 2 * group, generator=gen(group)) * 3).to(dtype)
    if group == 32:  # ties (group 0), constant groups (1, 3), a zero group (2), column-major storage
        g0 = torch.tensor([0.0, 15.0, 0.5, 1.5, 2.5, 3.5, 4.5, 13.5, 14.5] + [7.0] * 23)
        w = torch.cat([w, torch.stack([g0, torch.full((32,), 0.3), torch.zeros(32), torch.full((32,), -2.75)])
                       .reshape(2, 64)]).T.contiguous().T
    packed, scales, zeros = ops.quantize_int4(w.to(device), group)
    want = ref4.quantize_int4(w, group)
    for got, exp, name in zip((packed, scales, zeros), want, ("packed", "scales", "zeros")):
        assert torch.equal(got.cpu(), exp), name
    w2 = ops.dequantize_int4(packed, scales, zeros, group)
    assert w2.dtype == torch.float32 and torch.equal(w2.cpu(), ref4.dequantize_int4(*want, group))
    with pytest.raises(ValueError, match="must be finite"):
        bad = w.clone()
        bad[0, 0] = float("nan")
        ops.quantize_int4(bad.to(device), group)


# ---- int4_weight_only_linear ----------------------------------------------------------------------------------

def _int4_weight(n, k, group, seed, device):
    w = torch.randn(n, k, generator=gen(seed))
    return w, tuple(t.to(device) for t in ref4.quantize_int4(w, group))


def _want4(x, packed, scales, zeros, group, bias):
    return ref4.int4_weight_only_linear(x.cpu().double(), packed.cpu(), scales.cpu().double(), zeros.cpu().double(),
                                        group, None if bias is None else bias.cpu().double())


# (M, N, K, group): M = 1, 2 take the GEMV kernel (split-K with the reduction), 7 and 16 the split-K dot,
# 20 the one-split tiled dot; every group size; N not a multiple of the tile.
LINEAR4 = [(1, 37, 256, 32), (2, 33, 512, 128), (7, 40, 256, 64), (16, 9, 512, 256), (20, 37, 128, 64)]


@pytest.mark.parametrize("m,n,k,group", LINEAR4)
def test_int4_linear_fp32(device, m, n, k, group):
    _, (packed, scales, zeros) = _int4_weight(n, k, group, m * n, device)
    x = torch.randn(m, k, generator=gen(m)).to(device)
    b = torch.randn(n, generator=gen(n)).to(device) if m % 2 else None
    y = ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert_close(y.cpu(), _want4(x, packed, scales, zeros, group, b), atol=2e-5 * k ** 0.5 * 4, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7])
def test_int4_linear_half(device, dtype, m):
    """16-bit x: the dot paths round w' to x's dtype (tensor-core operands); within the 16-bit tolerance of the
    float32 result, and no further from it than torch's own 16-bit F.linear on the dequantized weight."""
    n, k, group = 40, 256, 64
    _, (packed, scales, zeros) = _int4_weight(n, k, group, 2, device)
    x = torch.randn(m, k, generator=gen(3)).to(device, dtype)
    b = torch.randn(n, generator=gen(4)).to(device, dtype)
    y = ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)
    assert y.dtype == dtype
    want = _want4(x, packed, scales, zeros, group, b)
    w = ref4.dequantize_int4(packed.cpu(), scales.cpu(), zeros.cpu(), group)
    torch_err = (F.linear(x.cpu().float(), w.to(dtype).float(), b.cpu().float()).to(dtype).double() - want).abs()
    err = (y.cpu().double() - want).abs()
    assert err.max() <= 2 * torch_err.max() + 1e-2 * want.abs().max(), (err.max(), torch_err.max())


def test_int4_linear_noncontiguous_and_batched(device):
    n, k, group = 33, 256, 128
    _, (packed, scales, zeros) = _int4_weight(n, k, group, 5, device)
    x = torch.randn(2 * k, 5, generator=gen(5)).to(device).t()[:, ::2]  # (5, k), strides (1, 10)
    assert not x.is_contiguous()
    y = ops.int4_weight_only_linear(x, packed, scales, zeros, group)
    assert_close(y.cpu(), _want4(x, packed, scales, zeros, group, None), atol=1e-4)
    y3 = ops.int4_weight_only_linear(x[:2].reshape(1, 2, k), packed, scales, zeros, group)  # GEMV, leading dims
    assert y3.shape == (1, 2, n)
    assert_close(y3.reshape(2, n).cpu(), y[:2].cpu(), atol=1e-4)


def test_int4_sqnr_g128(device):
    w = torch.randn(64, 512, generator=gen(6))
    x = torch.randn(3, 512, generator=gen(7))
    packed, scales, zeros = ops.quantize_int4(w.to(device), 128)
    for xs in (x[:1], x):  # GEMV and dot paths
        y = ops.int4_weight_only_linear(xs.to(device), packed, scales, zeros, 128)
        db = sqnr(F.linear(xs.double(), w.double()), y.cpu())
        assert db >= 18.0, f"SQNR {db:.1f} dB"


def test_int4_gradients_opcheck_compile(device):
    """Forward, dx (dequantize_int4 on the triton backend, then a matmul) and dbias against F.linear on the
    dequantized weight; opcheck of every op called; torch.compile(fullgraph=True)."""
    n, k, group = 9, 64, 32
    _, (packed, scales, zeros) = _int4_weight(n, k, group, 9, device)
    x = torch.randn(3, k, generator=gen(10)).to(device).requires_grad_(True)
    b = torch.randn(n, generator=gen(11)).to(device).requires_grad_(True)

    def fn(x, b):
        return ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)

    def reference(x, b):
        return F.linear(x, ref4.dequantize_int4(packed, scales, zeros, group).to(x.dtype), b)

    torch._dynamo.reset()
    check_op(fn, [Sample((x, b))], reference, name="int4 triton", gradcheck=False)
    torch.library.opcheck(torch.ops.mltoolkit.dequantize_int4.default, (packed, scales, zeros, group))


def test_int4_backward_bf16_no_bias(device):
    n, k, group = 40, 128, 32
    _, (packed, scales, zeros) = _int4_weight(n, k, group, 12, device)
    x = torch.randn(1, k, generator=gen(12)).to(device, torch.bfloat16).requires_grad_(True)
    y = ops.int4_weight_only_linear(x, packed, scales, zeros, group)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.dtype == torch.bfloat16
    want = dy.float().cpu() @ ref4.dequantize_int4(packed.cpu(), scales.cpu(), zeros.cpu(), group)
    assert_close(dx.cpu(), want, dtype=torch.bfloat16, atol=0.05)


# ---- backend tables -------------------------------------------------------------------------------------------

def test_backend_choices():
    """On CPU tensors Triton runs only when forced (the interpreter is a correctness tool); int4's float64 (the
    reference's oracle dtype) is refused with its reason."""
    for name in ("int8", "int4"):
        names = [b.name for b in table(name).backends]
        assert names.index("triton") < names.index("cpp") < names.index("reference"), names
    tri8, tri4 = table("int8").get("triton"), table("int4").get("triton")
    if tri8.available() is not None:
        pytest.skip(f"triton unavailable: {tri8.available()}")
    x = torch.randn(3, 64)
    if not torch.cuda.is_available():
        assert "only when forced" in (table("int8").reasons(x)["triton"] or "")
        assert table("int8").select(x).name in ("cpp", "reference")
        assert table("int4").select(x).name in ("cpp", "reference")
    if _ext.triton_interpreted():
        with mltoolkit.backend("triton"):
            assert table("int8").select(x).name == "triton"
            assert table("int4").select(x).name == "triton"
            assert tri4.reason(x.double()) == "no float64 kernel"
            with pytest.raises(NoBackendError, match="no float64 kernel"):
                table("int4").select(x.double())


# ---- GPU: the autotuned and larger-shape paths ----------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 300])
def test_cuda_large_shapes(M):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with mltoolkit.backend("triton"):
        g = gen(M)
        K, N = 4096, 1000
        xq, wq = _ints(M, K, g=g).cuda(), _ints(N, K, g=g).cuda()
        xs, ws = torch.rand(M, generator=g).cuda(), (torch.rand(N, generator=g) * 1e-3).cuda()
        bias = torch.randn(N, generator=g).cuda()
        for out_dtype in (torch.float32, torch.bfloat16):
            _exact(xq, xs, wq, ws, bias, out_dtype)
        _exact(xq, xs, ref8.pack_weight(wq), ws, None)
        for group in (32, 128):
            w, (packed, scales, zeros) = _int4_weight(N, K, group, M, "cuda")
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(M, K, generator=g).cuda().to(dtype)
                y = ops.int4_weight_only_linear(x, packed, scales, zeros, group, None)
                want = _want4(x, packed, scales, zeros, group, None)
                if dtype == torch.float32:
                    assert_close(y.cpu(), want, atol=2e-5 * K ** 0.5 * 4, rtol=2e-5)
                else:
                    assert sqnr(want, y.cpu()) >= 40
                assert sqnr(F.linear(x.cpu().double(), w.double()), y.cpu()) >= 18.0


def test_int8_tma_configs_fit_shared_memory(monkeypatch):
    """The TMA GEMM's configs are those whose shared memory (stages + the output tile's epilogue buffer) fits the
    device: with a float32 output the 128 x 256 x 128 tiles do not (272 KiB under Triton 3.6 on an H200, where the
    first config failed to launch), with bfloat16 they do."""
    quant = _quant()
    props = type("Props", (), {"shared_memory_per_block_optin": 232448})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    quant._tma_configs.cache_clear()
    try:
        fp32 = quant._tma_configs(4, torch.device("cuda", 0))
        bf16 = quant._tma_configs(2, torch.device("cuda", 0))
    finally:
        quant._tma_configs.cache_clear()
    assert (128, 256, 128, 8, 3) not in fp32 and (128, 256, 128, 8, 3) == bf16[0]
    assert fp32 and all(quant._tma_smem_estimate(c, 4) <= 232448 for c in fp32)
    assert set(fp32) < set(bf16) <= set(quant._INT8_TMA)
