"""fake_quantize on every CPU backend against the plain-PyTorch reference (mltoolkit/ops/reference/fake_quantize.py):
bit-exact forward, STE / LSQ gradients against the reference backward and against autograd of a differentiable
formula, agreement with torch's fake_quantize_per_*_affine and with the int4 / int8 quantizers, opcheck, compile,
odd shapes, non-contiguous inputs and bad input."""
import pytest
import torch

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference import fake_quantize as ref
from mltoolkit.ops.reference import int4 as ref_int4
from mltoolkit.testing import assert_close

BACKENDS = ["cpp", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_unavailable(backend):
    why = table("fake_quantize").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# (name, x shape, axis, group_size, qmin, qmax, domain): the granularities and both zero-point domains
CASES = [
    ("tensor-int8", (7, 97), None, None, -128, 127, "int"),
    ("tensor-1", (1,), None, None, -127, 127, "int"),
    ("channel0-int8sym", (123, 33), 0, None, -127, 127, "int"),
    ("channel1-uint8", (5, 7, 9), 1, None, 0, 255, "int"),
    ("channel-last", (13, 7), -1, None, -8, 7, "int"),
    ("channel-long-rows", (3, 9000), 0, None, -127, 127, "int"),
    ("group32-int4", (97, 64), None, 32, 0, 15, "float"),
    ("group7-3d", (3, 5, 21), None, 7, 0, 15, "float"),
    ("group-int-domain", (9, 64), None, 16, -8, 7, "int"),
    ("tensor-float-domain", (1025,), None, None, 0, 15, "float"),
]


def make(case, dtype=torch.float32, seed=0, zero_point=True):
    _, shape, axis, group, qmin, qmax, domain = case
    x = (torch.randn(shape, generator=gen(seed)) * 3).to(dtype)
    if group:
        pshape = (*shape[:-1], shape[-1] // group)
    elif axis is not None:
        pshape = (shape[axis],)
    else:
        pshape = ()
    # scales such that a good part of the values clamps at both ends
    scale = (torch.rand(pshape, generator=gen(seed + 1)) + 0.5) * 6 / (qmax - qmin)
    if not zero_point:
        zp = None
    elif domain == "float":
        zp = torch.randn(pshape, generator=gen(seed + 2)) - 1.0
    else:
        zp = torch.randint(qmin // 2, qmax // 2 + 1, pshape, generator=gen(seed + 2)).float()
    return x, scale, zp, dict(qmin=qmin, qmax=qmax, axis=axis, group_size=group, zero_point_domain=domain)


def ref_args(x, kw):
    axis = None if kw["axis"] is None else kw["axis"] % x.dim()
    return kw["qmin"], kw["qmax"], axis, kw["group_size"], kw["zero_point_domain"] == "float"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_bit_exact(backend, case, dtype):
    skip_unavailable(backend)
    x, scale, zp, kw = make(case, dtype)
    with mltoolkit.backend(backend):
        y = ops.fake_quantize(x, scale, zp, **kw)
    want = ref.fake_quantize(x, scale, zp, *ref_args(x, kw))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, want)
    # it really quantizes: every value is on the grid and some clamp
    assert y.float().unique().numel() <= (kw["qmax"] - kw["qmin"] + 1) * max(1, scale.numel())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_vs_reference_and_autograd(backend, case):
    skip_unavailable(backend)
    x, scale, zp, kw = make(case)
    x.requires_grad_(True)
    scale.requires_grad_(True)
    zp.requires_grad_(True)
    g = 0.37
    with mltoolkit.backend(backend):
        y = ops.fake_quantize(x, scale, zp, grad_scale=g, **kw)
    dy = torch.randn(y.shape, generator=gen(5))
    dx, ds, dz = torch.autograd.grad(y, (x, scale, zp), dy)
    want_dx, want_ds, want_dz = ref.fake_quantize_backward(dy, x.detach(), scale.detach(), zp.detach(),
                                                           *ref_args(x, kw), g, [True, True, True])
    assert torch.equal(dx, want_dx), "dx is the straight-through mask times dy, exactly"
    assert_close(ds, want_ds, atol=1e-4 * max(1.0, want_ds.abs().max().item()), rtol=1e-4, name="dscale")
    assert_close(dz, want_dz, atol=1e-4 * max(1.0, want_dz.abs().max().item()), rtol=1e-4, name="dzero_point")
    # An independent derivation: autograd through the STE / LSQ formula.
    xa, sa, za = (t.detach().requires_grad_(True) for t in (x, scale, zp))
    ya = ref.fake_quantize_autograd(xa, sa, za, *ref_args(x, kw), grad_scale=g)
    ax, as_, az = torch.autograd.grad(ya, (xa, sa, za), dy)
    assert_close(dx, ax, atol=1e-6, rtol=1e-6, name="dx vs autograd")  # autograd multiplies by s and 1 / s
    assert_close(ds, as_, atol=1e-4 * max(1.0, as_.abs().max().item()), rtol=1e-4, name="dscale vs autograd")
    assert_close(dz, az, atol=1e-4 * max(1.0, az.abs().max().item()), rtol=1e-4, name="dzero_point vs autograd")
    if x.numel() > 10:
        clamped = int((dx == 0).sum())
        assert 0 < clamped < x.numel(), "the sample must exercise both the clamped and the inside case"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_half_types_and_partial_masks(backend):
    skip_unavailable(backend)
    x, scale, zp, kw = make(CASES[6], torch.bfloat16)
    dy = torch.randn(x.shape, generator=gen(3)).to(torch.bfloat16)
    with mltoolkit.backend(backend):
        dx, ds, dz = torch.ops.mltoolkit.fake_quantize_backward(dy, x, scale, zp, 0, 15, None, 32, True, 1.0,
                                                                [True, False, False])
    want_dx, _, _ = ref.fake_quantize_backward(dy, x, scale, zp, 0, 15, None, 32, True, 1.0, [True, False, False])
    assert dx.dtype == torch.bfloat16 and torch.equal(dx, want_dx)
    assert ds.numel() == 0 and dz.numel() == 0
    # only the scale gradient (the LSQ path of a frozen weight)
    with mltoolkit.backend(backend):
        dx, ds, dz = torch.ops.mltoolkit.fake_quantize_backward(dy, x, scale, zp, 0, 15, None, 32, True, 1.0,
                                                                [False, True, False])
    _, want_ds, _ = ref.fake_quantize_backward(dy, x, scale, zp, 0, 15, None, 32, True, 1.0, [False, True, False])
    assert dx.numel() == 0 and dz.numel() == 0
    assert_close(ds, want_ds, atol=1e-3 * max(1.0, want_ds.abs().max().item()), rtol=1e-3)


def test_lsq_scale_gradient_finite_difference():
    """Where every value clamps, LSQ's scale gradient is the true derivative (q - zp) * sum(dy): compare with a
    central finite difference of the forward itself; and grad_scale='lsq' is 1 / sqrt(n * qmax)."""
    x = torch.tensor([[5.0, -7.0, 9.0, -6.5], [0.1, 0.2, -0.3, 0.06]])
    scale = torch.tensor([0.5, 0.01], requires_grad=True)
    zp = torch.tensor([1.0, -2.0])
    y = ops.fake_quantize(x, scale, zp, -4, 3, axis=0)
    dy = torch.tensor([[1.0, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    (ds,) = torch.autograd.grad(y, scale, dy)
    eps = 1e-3
    for c in range(2):
        hi, lo = scale.detach().clone(), scale.detach().clone()
        hi[c] += eps
        lo[c] -= eps
        fd = ((ops.fake_quantize(x, hi, zp, -4, 3, axis=0) - ops.fake_quantize(x, lo, zp, -4, 3, axis=0)) * dy)[c]
        assert abs(fd.sum().item() / (2 * eps) - ds[c].item()) < 1e-2 * max(1.0, abs(ds[c].item()))
    (ds_lsq,) = torch.autograd.grad(ops.fake_quantize(x, scale, zp, -4, 3, axis=0, grad_scale="lsq"), scale, dy)
    assert_close(ds_lsq, ds / (4 * 3) ** 0.5, atol=1e-6, rtol=1e-6)


def test_matches_torch_fake_quantize():
    """torch's fake_quantize_per_{tensor,channel}_affine multiplies by 1 / scale where we divide; with power-of-two
    scales both are exact, so the results must agree bit for bit (gradient of x too)."""
    x = torch.randn(33, 70, generator=gen(7)) * 4
    scale = 2.0 ** torch.randint(-4, 1, (33,), generator=gen(8)).float()
    zp = torch.randint(-3, 4, (33,), generator=gen(9)).int()
    y = ops.fake_quantize(x, scale, zp, -128, 127, axis=0)
    assert torch.equal(y, torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -128, 127))
    y = ops.fake_quantize(x, scale[:1], zp[:1], 0, 15)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, scale[0].item(), int(zp[0]), 0, 15))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = torch.randn(x.shape, generator=gen(10))
    ops.fake_quantize(xa, scale, zp, -128, 127, axis=0).backward(dy)
    torch.fake_quantize_per_channel_affine(xb, scale, zp, 0, -128, 127).backward(dy)
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_exactly_as_quantize_int4(backend, group):
    """With the int4 min-max rule's scale and offset (the group minimum), fake quantization is bit-identical to
    dequantize_int4(quantize_int4(w)): the weight QAT trains against is the one the int4 kernel will use."""
    skip_unavailable(backend)
    w = torch.randn(97, 2 * group, generator=gen(group)) * 0.05
    w[3, :group] = 0.25  # a constant group (the contract's fallback scale)
    w[5, 4] = 1e3  # an outlier
    mn, scale, zero = ref_int4.group_params(w, group)
    with mltoolkit.backend(backend):
        fq = ops.fake_quantize(w, scale, mn, 0, 15, group_size=group, zero_point_domain="float")
        packed, scales, zeros = ops.quantize_int4(w, group)
        deq = ops.dequantize_int4(packed, scales, zeros, group)
    assert torch.equal(scales, scale) and torch.equal(zeros, mn + 8 * scale)
    assert torch.equal(fq, deq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_exactly_as_quantize_per_channel_and_token(backend):
    skip_unavailable(backend)
    w = torch.randn(61, 45, generator=gen(1))
    w[2] = 0  # the all-zero row's scale 1
    with mltoolkit.backend(backend):
        wq, ws = ops.quantize_per_channel(w)
        fq = ops.fake_quantize(w, ws, None, -127, 127, axis=0)
    assert torch.equal(fq, wq.float() * ws[:, None])
    x = torch.randn(4, 3, 45, generator=gen(2)).to(torch.bfloat16)
    with mltoolkit.backend(backend):
        xq, xs = ops.quantize_per_token(x)
        fq = ops.fake_quantize(x.reshape(-1, 45), xs.reshape(-1), None, -127, 127, axis=0)
    assert torch.equal(fq, (xq.float() * xs[..., None]).to(torch.bfloat16).reshape(-1, 45))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded_gradient(backend):
    skip_unavailable(backend)
    base = torch.randn(40, 96, generator=gen(4)) * 2
    x = base[::2, ::3]  # (20, 32), strided
    scale = torch.rand(20, 1, generator=gen(5)) + 0.2
    zp = torch.randn(20, 1, generator=gen(6))
    xc = x.contiguous()
    with mltoolkit.backend(backend):
        assert torch.equal(ops.fake_quantize(x, scale, zp, 0, 15, group_size=32, zero_point_domain="float"),
                           ops.fake_quantize(xc, scale, zp, 0, 15, group_size=32, zero_point_domain="float"))
        xt = torch.randn(32, 20, generator=gen(7)).t()  # transposed, per channel along axis 0
        s = torch.rand(20, generator=gen(8)) + 0.1
        assert torch.equal(ops.fake_quantize(xt, s, None, -8, 7, axis=0),
                           ops.fake_quantize(xt.contiguous(), s, None, -8, 7, axis=0))
        # .sum().backward() hands the backward a stride-0 dy
        xg, sg = xc.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        ops.fake_quantize(xg, sg, zp, 0, 15, group_size=32, zero_point_domain="float").sum().backward()
    want_dx, want_ds, _ = ref.fake_quantize_backward(torch.ones_like(xc), xc, scale, zp, 0, 15, None, 32, True, 1.0,
                                                     [True, True, False])
    assert torch.equal(xg.grad, want_dx)
    assert_close(sg.grad, want_ds, atol=1e-4, rtol=1e-4)


def test_empty_and_thread_count_independent():
    x = torch.empty(0, 8)
    assert ops.fake_quantize(x, torch.ones(()), None).shape == (0, 8)
    x = torch.randn(3, 50000, generator=gen(11)).requires_grad_(True)
    s = torch.full((3,), 0.02, requires_grad=True)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(ops.fake_quantize(x, s, None, -127, 127, axis=0).sum(), (x, s)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=[CASES[2][0], CASES[6][0]])
def test_opcheck(case):
    x, scale, zp, kw = make(case)
    qmin, qmax, axis, group, fzp = ref_args(x, kw)
    for req in ((True, True, True), (True, False, False), (False, True, False)):
        args = (x.clone().requires_grad_(req[0]), scale.clone().requires_grad_(req[1]),
                zp.clone().requires_grad_(req[2]), qmin, qmax, axis, group, fzp, 0.5)
        torch.library.opcheck(torch.ops.mltoolkit.fake_quantize.default, args)
    dy = torch.randn(x.shape, generator=gen(1))
    torch.library.opcheck(torch.ops.mltoolkit.fake_quantize_backward.default,
                          (dy, x, scale, zp, qmin, qmax, axis, group, fzp, 0.5, [True, True, True]))
    torch.library.opcheck(torch.ops.mltoolkit.fake_quantize.default,
                          (x, scale, None, qmin, qmax, axis, group, fzp, 1.0))


def test_compile_fullgraph():
    x, scale, zp, kw = make(CASES[6])

    def f(x, scale, zp):
        return ops.fake_quantize(x, scale, zp, 0, 15, group_size=32, zero_point_domain="float",
                                 grad_scale="lsq") * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    leaves_e = [t.clone().requires_grad_(True) for t in (x, scale, zp)]
    leaves_c = [t.clone().requires_grad_(True) for t in (x, scale, zp)]
    ye, yc = f(*leaves_e), compiled(*leaves_c)
    assert torch.equal(ye, yc)
    dy = torch.randn(ye.shape, generator=gen(2))
    ge = torch.autograd.grad(ye, leaves_e, dy)
    gc = torch.autograd.grad(yc, leaves_c, dy)
    for a, b in zip(ge, gc):
        assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 64)
    s = torch.ones(4)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.fake_quantize(x.double(), s, axis=0)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        ops.fake_quantize([1.0], s)
    with pytest.raises(ValueError, match="qmin must be below qmax"):
        ops.fake_quantize(x, s, None, 5, 5, axis=0)
    with pytest.raises(TypeError, match="qmin must be an int"):
        ops.fake_quantize(x, s, None, -1.5, 5, axis=0)
    with pytest.raises(ValueError, match="scale must have shape \\(4,\\)"):
        ops.fake_quantize(x, torch.ones(64), axis=0)
    with pytest.raises(ValueError, match="scale must have one element"):
        ops.fake_quantize(x, s)
    with pytest.raises(ValueError, match="zero_point must have shape"):
        ops.fake_quantize(x, s, torch.zeros(3), axis=0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ops.fake_quantize(x, torch.ones(4, 2), group_size=48)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ops.fake_quantize(x, s, axis=2)
    with pytest.raises(ValueError, match="not both"):
        ops.fake_quantize(x, s, axis=0, group_size=32)
    with pytest.raises(ValueError, match="zero_point_domain"):
        ops.fake_quantize(x, s, axis=0, zero_point_domain="fp")
    with pytest.raises(ValueError, match="grad_scale"):
        ops.fake_quantize(x, s, axis=0, grad_scale="lsq+")
    with pytest.raises(TypeError, match="scale must be a floating"):
        ops.fake_quantize(x, torch.ones(4, dtype=torch.int32), axis=0)
    for backend in BACKENDS:
        if table("fake_quantize").get(backend).available() is not None:
            continue
        with mltoolkit.backend(backend), pytest.raises((RuntimeError, ValueError), match="scale must be positive"):
            ops.fake_quantize(x, torch.tensor([1.0, 0.0, 1.0, 1.0]), axis=0)
        with mltoolkit.backend(backend), pytest.raises((RuntimeError, ValueError), match="scale must be positive"):
            ops.fake_quantize(x, torch.tensor([1.0, float("nan"), 1.0, 1.0]), axis=0)
    if _cpp_available():
        with pytest.raises(RuntimeError, match="fake_quantize_cpu: scale must have shape"):
            torch.ops.mltoolkit.fake_quantize(x, torch.ones(5), None, 0, 15, 0, None, False, 1.0)
        with pytest.raises(RuntimeError, match="fake_quantize_backward_cpu: dy must have x's shape"):
            torch.ops.mltoolkit.fake_quantize_backward(x[:2], x, s, None, 0, 15, 0, None, False, 1.0,
                                                       [True, True, False])


def _cpp_available():
    return table("fake_quantize").get("cpp").available() is None
