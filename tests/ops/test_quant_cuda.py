"""The CUDA C++ quantization kernels (csrc/cuda/int8_linear.cu, int4_linear.cu) against the reference: int8
quantizers, int8_linear and dequantize_int4 bit-exact, int4_weight_only_linear by SQNR against the float64 product
with the dequantized weight. Every kernel path is forced in turn (MLTK_INT8_CUDA_PATH=gemv|mma|dp4a,
MLTK_INT4_CUDA_PATH=gemv|tcgemv|mma), on odd shapes, padded / misaligned layouts, with and without bias (the
CPU-only packed int8 weight layout goes through the op, which unpacks it).
Skipped without a GPU (scripts/gpu_check.sh runs them); the backend-table test runs everywhere."""
import pytest
import torch
import torch.nn.functional as F

from mltoolkit import _ext, ops
from mltoolkit.backends import backend, table
from mltoolkit.ops.reference import int4 as ref4
from mltoolkit.ops.reference import int8 as ref8
from mltoolkit.testing import sqnr

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
cuda = pytest.mark.cuda


def test_cuda_backends_registered_first():
    for name in ("int8", "int4"):
        tab = table(name)
        assert tab.backends[0].name == "cuda", [b.name for b in tab.backends]
        cpu = torch.zeros(2, 32)
        assert tab.get("cuda").reason(cpu) is not None  # never picked for CPU tensors


@pytest.mark.parametrize("name,most_rows", [("int8", 16), ("int4", 2)])
def test_cuda_defers_larger_batches_to_triton(name, most_rows):
    defer = table(name).get("cuda").defer
    assert defer(torch.zeros(most_rows, 32)) is None and defer(torch.zeros(1, most_rows, 32)) is None
    assert "Triton" in defer(torch.zeros(most_rows + 1, 32)) and "Triton" in defer(torch.zeros(3, most_rows, 32))


def test_int4_cuda_keeps_up_to_16_rows_for_the_tensor_core_gemv():
    defer = table("int4").get("cuda").defer
    x = torch.zeros(16, 256, dtype=torch.bfloat16)
    assert defer(x, 128) is None and defer(x, 256) is None
    assert "Triton" in defer(torch.zeros(17, 256, dtype=torch.bfloat16), 128)
    assert "Triton" in defer(torch.zeros(3, 256, dtype=torch.bfloat16), 64)  # below the GEMV's group sizes
    assert "Triton" in defer(x, 64) and "Triton" in defer(x.float(), 128)  # the ALU GEMV takes these: 2 rows


def _c():
    why = _ext.cuda_unavailable()
    if why is not None:
        pytest.skip(why)
    return _ext._C


def _gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


def _ints(*shape, gen, lo=-128, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, device="cuda", dtype=torch.int8)


# ---- int8 -------------------------------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rows,k", [(1, 1), (7, 97), (123, 1025), (3, 16), (64, 4096), (5, 0)])
def test_quantize_rows_bit_exact(dtype, rows, k):
    C = _c()
    x = (torch.randn(rows, k, generator=_gen(), device="cuda") * 3).to(dtype)
    q, s = C.quantize_rows_cuda(x)
    q_ref, s_ref = ref8.quantize_rows(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


@cuda
def test_quantize_rows_ties_zero_rows_and_strides():
    C = _c()
    # absmax 127: scale 1, every x.5 is a tie (to even); a zero row gets scale 1; a tiny row a subnormal scale -> 1.
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 2.5, -0.5], [0.0] * 6, [1e-40, 0, 0, 0, 0, 0]], device="cuda")
    for t in (x, x[:, 1:], x.t().contiguous().t(), torch.cat([x, x], 1)[:, ::2]):
        q, s = C.quantize_rows_cuda(t)
        q_ref, s_ref = ref8.quantize_rows(t)
        assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


def _linear_cases():
    # (M, N, K): odd sizes, K tails for the dp4a path, multiples of 16 for the tensor cores, and a grid large enough
    # for the 128 x 256 tile on an H100 (>= 132 tiles); decode sizes for the GEMV (K not a multiple of its 64-k
    # blocks, N not of its 16 rows, up to its 8 rows).
    return [(1, 1, 1), (7, 97, 123), (97, 123, 1025), (1, 7, 16), (123, 97, 64), (33, 257, 4096), (1111, 4001, 256),
            (3, 300, 4112), (8, 4096, 4096), (5, 33, 80)]


@pytest.fixture(params=["auto", "gemv", "mma", "dp4a"])
def int8_path(request, monkeypatch):
    monkeypatch.setenv("MLTK_INT8_CUDA_PATH", request.param)
    return request.param


def _int8_refusal(path, m, k, aligned=True):
    """What a forced tensor-core path says to an input it cannot take (None: it takes it)."""
    if path not in ("gemv", "mma"):
        return None
    if k % 16:
        return "multiple of 16"
    if not aligned:
        return "16-byte aligned"
    return "at most 8 rows" if path == "gemv" and m > 8 else None


@cuda
@pytest.mark.parametrize("m,n,k", _linear_cases())
def test_int8_linear_bit_exact(int8_path, m, n, k):
    C = _c()
    g = _gen(m * 7 + n)
    xq, wq = _ints(m, k, gen=g), _ints(n, k, gen=g)
    xs = torch.rand(m, generator=g, device="cuda") * 0.01 + 1e-4
    ws = torch.rand(n, generator=g, device="cuda") * 0.01 + 1e-4
    bias = torch.randn(n, generator=g, device="cuda")
    for out_dtype, b in ((torch.float32, bias), (torch.bfloat16, None), (torch.float16, bias)):
        refusal = _int8_refusal(int8_path, m, k)
        if refusal:
            with pytest.raises(RuntimeError, match=refusal):
                C.int8_linear_cuda(xq, xs, wq, ws, b, out_dtype)
            continue
        y = C.int8_linear_cuda(xq, xs, wq, ws, b, out_dtype)
        y_ref = ref8.int8_linear(xq, xs, wq, ws, b, out_dtype)
        assert y.dtype == out_dtype and torch.equal(y, y_ref), (out_dtype, (y.float() - y_ref.float()).abs().max())


@cuda
def test_int8_linear_extreme_values_and_layouts(int8_path):
    C = _c()
    g = _gen(3)
    m, n, k = (5 if int8_path == "gemv" else 37), 45, 4096
    # All -128 (the largest products) stay exact in int32.
    xq = torch.full((m, k), -128, dtype=torch.int8, device="cuda")
    wq = torch.full((n, k), -128, dtype=torch.int8, device="cuda")
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    assert torch.equal(C.int8_linear_cuda(xq, ones_m, wq, ones_n, None, torch.float32),
                       ref8.int8_linear(xq, ones_m, wq, ones_n, None, torch.float32))
    # Padded rows (16-byte aligned stride) and a misaligned view (dp4a in auto; refused by a forced mma).
    big = _ints(m, k + 32, gen=g)
    wbig = _ints(n, k + 32, gen=g)
    xs, ws = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
    for xv, wv in ((big[:, :k], wbig[:, :k]), (big[:, 1:k + 1], wbig[:, 3:k + 3])):
        refusal = _int8_refusal(int8_path, m, k, xv.data_ptr() % 16 == 0 and wv.data_ptr() % 16 == 0)
        if refusal:
            with pytest.raises(RuntimeError, match=refusal):
                C.int8_linear_cuda(xv, xs, wv, ws, None, torch.float32)
            continue
        assert torch.equal(C.int8_linear_cuda(xv, xs, wv, ws, None, torch.float32),
                           ref8.int8_linear(xv, xs, wv, ws, None, torch.float32))


@cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_dynamic_through_the_op(dtype):
    _c()
    g = _gen(5)
    x = torch.randn(3, 41, 256, generator=g, device="cuda").to(dtype)
    w = torch.randn(97, 256, generator=g, device="cuda")
    b = torch.randn(97, generator=g, device="cuda").to(dtype)
    wq, ws = ops.quantize_per_channel(w)
    with backend("cuda"):
        y = ops.int8_linear_dynamic(x, wq, ws, b)
        y_packed = ops.int8_linear_dynamic(x, ops.int8_pack_weight(wq), ws, b)
    y_ref = ref8.int8_linear_dynamic(x, wq, ws, b)
    assert torch.equal(y, y_ref) and torch.equal(y_packed, y_ref)
    assert sqnr(F.linear(x.double(), w.double(), b.double()), y) >= 30


@cuda
def test_int8_opcheck_and_compile():
    _c()
    g = _gen(6)
    xq, wq = _ints(5, 64, gen=g), _ints(9, 64, gen=g)
    xs, ws = torch.rand(5, device="cuda"), torch.rand(9, device="cuda")
    torch.library.opcheck(torch.ops.mltoolkit.int8_linear.default, (xq, xs, wq, ws, None, torch.float32))
    x = torch.randn(5, 64, device="cuda")
    torch.library.opcheck(torch.ops.mltoolkit.quantize_per_token.default, (x,))
    f = torch.compile(lambda x: ops.int8_linear_dynamic(x, wq, ws), fullgraph=True)
    assert torch.equal(f(x), ref8.int8_linear_dynamic(x, wq, ws))


# ---- int4 -------------------------------------------------------------------------------------------------------

def _int4_weight(n, k, group, seed=0):
    w = torch.randn(n, k, generator=_gen(seed), device="cuda")
    return (w, *ref4.quantize_int4(w, group))


@cuda
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (7, 96, 32), (97, 320, 64), (123, 1152, 128), (5, 512, 256)])
def test_dequantize_bit_exact(n, k, group):
    C = _c()
    _, packed, scales, zeros = _int4_weight(n, k, group)
    assert torch.equal(C.dequantize_int4_cuda(packed, scales, zeros, group),
                       ref4.dequantize_int4(packed, scales, zeros, group))
    # A view at an odd byte offset (copied to an aligned buffer by the glue).
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    view = buf[1:].view(packed.shape)
    view.copy_(packed)
    assert torch.equal(C.dequantize_int4_cuda(view, scales, zeros, group),
                       ref4.dequantize_int4(packed, scales, zeros, group))


# SQNR floors against the float64 product with the dequantized weight, per x dtype: float32 accumulation alone
# (float32), plus the output rounding and, on the tensor-core path, w' rounded to x's dtype (fp16, bf16).
FLOOR = {torch.float32: 80.0, torch.float16: 55.0, torch.bfloat16: 38.0}


@pytest.fixture(params=["auto", "gemv", "tcgemv", "mma"])
def int4_path(request, monkeypatch):
    monkeypatch.setenv("MLTK_INT4_CUDA_PATH", request.param)
    return request.param


def _int4_check(C, x, packed, scales, zeros, group, bias, path):
    misaligned = x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16
    if path == "mma" and (x.dtype == torch.float32 or misaligned):
        with pytest.raises(RuntimeError, match="tensor-core path"):
            C.int4_weight_only_linear_cuda(x, packed, scales, zeros, group, bias)
        return
    if path == "tcgemv" and (x.dtype == torch.float32 or misaligned or x.shape[0] > 16 or group < 128):
        with pytest.raises(RuntimeError, match="tensor-core GEMV"):
            C.int4_weight_only_linear_cuda(x, packed, scales, zeros, group, bias)
        return
    y = C.int4_weight_only_linear_cuda(x, packed, scales, zeros, group, bias)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], packed.shape[0])
    assert bool(torch.isfinite(y).all())
    w = ref4.dequantize_int4(packed, scales, zeros, group).double()
    ref = x.double() @ w.t() + (bias.double() if bias is not None else 0)
    db = sqnr(ref, y)
    assert db >= FLOOR[x.dtype], (path, x.dtype, tuple(x.shape), db)


@cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16, 17, 97, 300])
@pytest.mark.parametrize("n,k,group", [(7, 96, 32), (123, 1152, 128), (97, 320, 64), (40, 1536, 256)])
def test_int4_linear_sqnr(int4_path, dtype, m, n, k, group):
    C = _c()
    _, packed, scales, zeros = _int4_weight(n, k, group, seed=m)
    x = torch.randn(m, k, generator=_gen(m + 1), device="cuda").to(dtype)
    bias = torch.randn(n, generator=_gen(2), device="cuda").to(dtype) if m % 2 else None
    _int4_check(C, x, packed, scales, zeros, group, bias, int4_path)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_linear_slabs_and_layouts(int4_path, dtype):
    C = _c()
    # M = 1 with K above one slab (16384 values), M = 16 with K above its slab (1024), a padded x (aligned rows), a
    # misaligned view, and a large batch on the tensor cores.
    for m, n, k, group in ((1, 9, 16640, 128), (16, 33, 2048, 64), (300, 257, 512, 128), (1, 8192, 8192, 128)):
        _, packed, scales, zeros = _int4_weight(n, k, group, seed=k)
        big = torch.randn(m, k + 8, generator=_gen(k), device="cuda").to(dtype)
        for x in (big[:, :k], big[:, 1:k + 1], big[:, :k].contiguous()):
            _int4_check(C, x, packed, scales, zeros, group, None, int4_path)


@cuda
def test_int4_against_float_weights_and_autograd():
    _c()
    w, packed, scales, zeros = _int4_weight(96, 1024, 128, seed=9)
    x = torch.randn(4, 1024, device="cuda", requires_grad=True)
    with backend("cuda"):
        y = ops.int4_weight_only_linear(x, packed, scales, zeros, 128)
        y.sum().backward()
    assert sqnr(F.linear(x.detach().double(), w.double()), y.detach()) >= 18
    w_deq = ref4.dequantize_int4(packed, scales, zeros, 128)
    torch.testing.assert_close(x.grad, torch.ones(4, 96, device="cuda") @ w_deq)
    torch.library.opcheck(torch.ops.mltoolkit.int4_weight_only_linear.default,
                          (x.detach(), packed, scales, zeros, 128, None))
    torch.library.opcheck(torch.ops.mltoolkit.dequantize_int4.default, (packed, scales, zeros, 128))
