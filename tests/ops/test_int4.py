"""int4 weight-only linear, quantize and dequantize on every CPU backend against the plain-PyTorch reference
(mltoolkit/ops/reference/int4.py), plus SQNR against the float linear, gradients, opcheck, compile and bad input."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference import int4 as ref
from mltoolkit.testing import PassThroughMode, Sample, assert_close, check_op, sqnr

BACKENDS = ["cpp", "reference"]
GROUPS = [32, 64, 128, 256]


def skip_unavailable(backend):
    why = table("int4").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def quantized(n, k, group, seed=0, dtype=torch.float32):
    w = torch.randn(n, k, generator=gen(seed)).to(dtype)
    return w, ref.quantize_int4(w, group)


# ---- format -------------------------------------------------------------------------------------------------------

def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (7, 64), generator=gen(1), dtype=torch.uint8)
    packed = ref.pack_int4(q)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(ref.unpack_int4(packed), q)
    # element 2j in the low nibble, 2j+1 in the high one
    assert torch.equal(packed[:, 0], q[:, 0] | (q[:, 1] << 4))
    all_bytes = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(ref.pack_int4(ref.unpack_int4(all_bytes)), all_bytes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_bit_exact(backend, group, dtype):
    skip_unavailable(backend)
    w = (torch.randn(97, 2 * group, generator=gen(group)) * 3).to(dtype)
    with mltoolkit.backend(backend):
        packed, scales, zeros = ops.quantize_int4(w, group)
    want = ref.quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and scales.dtype == torch.float32 and zeros.dtype == torch.float32
    for got, exp, name in zip((packed, scales, zeros), want, ("packed", "scales", "zeros")):
        assert torch.equal(got, exp), name
    with mltoolkit.backend(backend):
        w2 = ops.dequantize_int4(packed, scales, zeros, group)
    assert torch.equal(w2, ref.dequantize_int4(*want, group))
    # every weight within half a step of its group
    err = (w2 - w.float()).abs().reshape(97, -1, group)
    assert bool((err <= scales[..., None] * 0.5001 + 1e-6).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_ties_and_constant_groups(backend):
    skip_unavailable(backend)
    # group 0: min 0, max 15 -> scale 1; x.5 values round half to even. group 1: constant. group 2: all zero.
    # group 3: constant negative.
    g0 = torch.tensor([0.0, 15.0, 0.5, 1.5, 2.5, 3.5, 4.5, 13.5, 14.5] + [7.0] * 23)
    w = torch.stack([g0, torch.full((32,), 0.3), torch.zeros(32), torch.full((32,), -2.75)]).reshape(1, 128)
    with mltoolkit.backend(backend):
        packed, scales, zeros = ops.quantize_int4(w, 32)
        w2 = ops.dequantize_int4(packed, scales, zeros, 32)
    q = ref.unpack_int4(packed)[0]
    assert q[:9].tolist() == [0, 15, 0, 2, 2, 4, 4, 14, 14]
    assert torch.equal(w2[0, 32:], w[0, 32:]), "constant groups must come back exactly"
    assert torch.equal(w2[0, :9], torch.tensor([0.0, 15.0, 0.0, 2.0, 2.0, 4.0, 4.0, 14.0, 14.0]))
    want = ref.quantize_int4(w, 32)
    assert all(torch.equal(a, b) for a, b in zip((packed, scales, zeros), want))


# ---- linear -------------------------------------------------------------------------------------------------------

def _ref_linear(x, packed, scales, zeros, group, bias=None):
    return ref.int4_weight_only_linear(x, packed, scales, zeros, group, bias)


# (M, N, K, group): odd M and N, every group size, one and several blocks of x (the C++ kernel takes 256 KB of x
# per block: 16 rows at K = 4096), N not a multiple of the kernel's row tile.
CASES = [(37, 19, 4096, 256), (1, 123, 256, 32), (7, 97, 128, 64), (97, 7, 256, 128), (123, 1, 512, 256),
         (16, 123, 256, 128), (17, 64, 128, 32), (1, 1, 64, 32), (4, 33, 512, 64), (300, 130, 256, 128)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k,group", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(backend, m, n, k, group, bias):
    skip_unavailable(backend)
    _, (packed, scales, zeros) = quantized(n, k, group, seed=m * n)
    x = torch.randn(m, k, generator=gen(m))
    b = torch.randn(n, generator=gen(n)) if bias else None
    with mltoolkit.backend(backend):
        y = ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)
    want = _ref_linear(x.double(), packed, scales.double(), zeros.double(), group, None if b is None else b.double())
    # float32 accumulation over K terms of size |x| * |w'|
    assert_close(y, want, atol=2e-5 * k ** 0.5 * 4, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 97])
def test_linear_half_inputs(backend, dtype, m):
    skip_unavailable(backend)
    n, k, group = 97, 256, 64
    _, (packed, scales, zeros) = quantized(n, k, group)
    x = torch.randn(m, k, generator=gen(3)).to(dtype)
    b = torch.randn(n, generator=gen(4)).to(dtype)
    with mltoolkit.backend(backend):
        y = ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)
    assert y.dtype == dtype
    want = _ref_linear(x.float(), packed, scales, zeros, group, b.float())
    assert_close(y, want, dtype=dtype, atol=tol_abs(dtype, want), rtol=tol_rel(dtype))


def tol_abs(dtype, want):
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * max(1.0, want.abs().max().item())


def tol_rel(dtype):
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_non_contiguous_and_batched(backend):
    skip_unavailable(backend)
    n, k, group = 33, 256, 128
    _, (packed, scales, zeros) = quantized(n, k, group)
    base = torch.randn(2 * k, 5, generator=gen(5))
    x = base.t()[:, ::2]  # (5, k), strides (1, 10)
    assert not x.is_contiguous()
    with mltoolkit.backend(backend):
        y = ops.int4_weight_only_linear(x, packed, scales, zeros, group)
        y3 = ops.int4_weight_only_linear(x.contiguous().reshape(5, 1, k), packed, scales, zeros, group)
    want = _ref_linear(x.double(), packed, scales.double(), zeros.double(), group)
    assert_close(y, want, atol=1e-4)
    assert y3.shape == (5, 1, n)
    assert_close(y3.reshape(5, n), y, atol=1e-4)


@pytest.mark.parametrize("group", GROUPS)
def test_sqnr_against_float_linear(group):
    m, n, k = 16, 256, 1024
    w = torch.randn(n, k, generator=gen(6))
    x = torch.randn(m, k, generator=gen(7))
    packed, scales, zeros = ops.quantize_int4(w, group)
    y = ops.int4_weight_only_linear(x, packed, scales, zeros, group)
    db = sqnr(F.linear(x.double(), w.double()), y)
    assert db >= 18.0, f"group {group}: SQNR {db:.1f} dB"


def test_sqnr_rises_as_group_shrinks():
    m, n, k = 16, 256, 1024
    w = torch.randn(n, k, generator=gen(8))
    x = torch.randn(m, k, generator=gen(9))
    dbs = []
    for group in (256, 128, 64, 32):
        y = ops.int4_weight_only_linear(x, *ops.quantize_int4(w, group), group)
        dbs.append(sqnr(F.linear(x.double(), w.double()), y))
    assert dbs == sorted(dbs) and dbs[-1] > dbs[0] + 1.0, dbs


# ---- autograd, opcheck, compile -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 7, 33])
def test_gradients_opcheck_compile(backend, m):
    skip_unavailable(backend)
    n, k, group = 97, 128, 64
    _, (packed, scales, zeros) = quantized(n, k, group)
    x = torch.randn(m, k, generator=gen(10)).requires_grad_(True)
    b = torch.randn(n, generator=gen(11)).requires_grad_(True)

    def fn(x, b):
        return ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)

    def reference(x, b):
        w = ref.dequantize_int4(packed, scales, zeros, group).to(x.dtype)
        return F.linear(x, w, b)

    with mltoolkit.backend(backend):
        check_op(fn, [Sample((x, b))], reference, name=f"int4 {backend}", gradcheck=False)  # no float64 kernel


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_half_and_no_bias(backend):
    skip_unavailable(backend)
    n, k, group = 40, 128, 32
    _, (packed, scales, zeros) = quantized(n, k, group)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, k, generator=gen(12)).to(dtype).requires_grad_(True)
        with mltoolkit.backend(backend):
            y = ops.int4_weight_only_linear(x, packed, scales, zeros, group)
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, dy)
        assert dx.dtype == dtype
        want = dy.float() @ ref.dequantize_int4(packed, scales, zeros, group)
        assert_close(dx, want, dtype=dtype, atol=1e-4 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_fast_path_matches_registered_op(backend):
    """Plain eager calls skip the custom-op dispatch; any active mode takes the registered op. Both agree bit for
    bit, gradients included, with and without autograd recording."""
    skip_unavailable(backend)
    n, k, group = 33, 64, 32
    _, (packed, scales, zeros) = quantized(n, k, group)
    x0, b0 = torch.randn(3, 2, k, generator=gen(13)), torch.randn(n, generator=gen(14))
    dy = torch.randn(3, 2, n, generator=gen(15))
    results = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        x, b = x0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        with mltoolkit.backend(backend), mode:
            y = ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)
            with torch.no_grad():
                y_nograd = ops.int4_weight_only_linear(x, packed, scales, zeros, group, b)
        results.append((y.detach(), y_nograd, *torch.autograd.grad(y, (x, b), dy)))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    # double backward (a gradient penalty on x) works on both paths too, with the same result
    second = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        x = x0.clone().requires_grad_(True)
        with mltoolkit.backend(backend), mode:
            y = ops.int4_weight_only_linear(x, packed, scales, zeros, group)
            (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
            second.append(torch.autograd.grad((dx * dx).sum(), x)[0])
    assert torch.equal(*second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_quantize_dequantize(backend):
    skip_unavailable(backend)
    w = torch.randn(7, 128, generator=gen(13))
    with mltoolkit.backend(backend):
        torch.library.opcheck(torch.ops.mltoolkit.quantize_int4.default, (w, 64))
        packed, scales, zeros = ops.quantize_int4(w, 64)
        torch.library.opcheck(torch.ops.mltoolkit.dequantize_int4.default, (packed, scales, zeros, 64))


def test_compile_quantize_and_linear():
    w = torch.randn(33, 256, generator=gen(14))
    x = torch.randn(3, 256, generator=gen(15))

    def fn(w, x):
        packed, scales, zeros = ops.quantize_int4(w, 128)
        return ops.int4_weight_only_linear(x, packed, scales, zeros, 128)

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(w, x)
    assert torch.equal(got, fn(w, x))


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_bad_input_python():
    _, (packed, scales, zeros) = quantized(8, 128, 64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="group_size"):
        ops.quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        ops.quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_weight_only_linear(torch.randn(2, 96), packed[:, :48], scales, zeros, 64)
    with pytest.raises(TypeError, match="packed must be uint8"):
        ops.int4_weight_only_linear(x, packed.to(torch.int8), scales, zeros, 64)
    with pytest.raises(ValueError, match="packed must be 2-D"):
        ops.int4_weight_only_linear(x, packed.flatten(), scales, zeros, 64)
    with pytest.raises(ValueError, match="x must have in_features"):
        ops.int4_weight_only_linear(torch.randn(2, 64), packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="scales must have shape"):
        ops.int4_weight_only_linear(x, packed, scales[:, :1], zeros, 64)
    with pytest.raises(TypeError, match="zeros must be float32"):
        ops.int4_weight_only_linear(x, packed, scales, zeros.half(), 64)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.int4_weight_only_linear(x.double(), packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int4_weight_only_linear(x, packed, scales, zeros, 64, torch.randn(7))
    with pytest.raises(ValueError, match="finite"):
        with mltoolkit.backend("reference"):
            ops.quantize_int4(torch.tensor([[float("nan")] * 32]), 32)


def test_bad_input_cpp_kernel():
    skip_unavailable("cpp")
    from mltoolkit._ext import _C

    _, (packed, scales, zeros) = quantized(8, 128, 64)
    x = torch.randn(2, 128)
    with pytest.raises(RuntimeError, match="int4_weight_only_linear_cpu: group_size"):
        _C.int4_weight_only_linear_cpu(x, packed, scales, zeros, 48, None)
    with pytest.raises(RuntimeError, match="int4_weight_only_linear_cpu: packed must be uint8"):
        _C.int4_weight_only_linear_cpu(x, packed.to(torch.int8), scales, zeros, 64, None)
    with pytest.raises(RuntimeError, match="int4_weight_only_linear_cpu: scales must have shape"):
        _C.int4_weight_only_linear_cpu(x, packed, scales.t(), zeros, 64, None)
    with pytest.raises(RuntimeError, match="int4_weight_only_linear_cpu: x must be"):
        _C.int4_weight_only_linear_cpu(torch.randn(2, 64), packed, scales, zeros, 64, None)
    with pytest.raises(RuntimeError, match="dequantize_int4_cpu: in_features K"):
        _C.dequantize_int4_cpu(packed[:, :48], scales, zeros, 64)
    with pytest.raises(RuntimeError, match="quantize_int4_cpu: in_features K"):
        _C.quantize_int4_cpu(torch.randn(4, 96), 64)
    with pytest.raises(RuntimeError, match="quantize_int4_cpu: w must be finite"):
        _C.quantize_int4_cpu(torch.tensor([[float("inf")] + [0.0] * 31]), 32)
