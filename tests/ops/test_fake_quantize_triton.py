"""The Triton fake_quantize kernels (triton_kernels/fake_quantize.py) against the plain-PyTorch reference: forward
bit-exact for every granularity (per tensor, per channel on the first, a middle and the last axis, per group) and
both zero-point domains, in float32 / float16 / bfloat16, with ties, NaN / inf and huge zero points; the backward's
dx bit-exact and the LSQ scale / zero-point gradients (tile partial sums + ordered second stage) against the
reference to float32 rounding, deterministic run to run; output_mask; non-contiguous inputs; opcheck with the
backend forced (compile is covered by test_fake_quantize.py: the same registered op); bad scales; the table's choices.

Each test runs forced to the triton backend: on the CPU under TRITON_INTERPRET=1 (set by conftest without a GPU),
on tiny shapes, and on CUDA tensors where there is a GPU (marked cuda), where a large case also covers the GPU
tile sizes.
"""
import pytest
import torch

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference import fake_quantize as ref
from mltoolkit.testing import assert_close, triton_forced

# (name, x shape, axis, group_size, qmin, qmax, domain)
CASES = [
    ("tensor-int8", (7, 37), None, None, -128, 127, "int"),
    ("tensor-float", (301,), None, None, 0, 15, "float"),
    ("channel0-int8sym", (9, 33), 0, None, -127, 127, "int"),
    ("channel1-uint8", (3, 5, 9), 1, None, 0, 255, "int"),
    ("channel-last", (37, 7), -1, None, -8, 7, "int"),
    ("channel-long-rows", (2, 300), 0, None, -127, 127, "int"),
    ("channel-float", (6, 4, 5), 1, None, 0, 15, "float"),
    ("group32-int4", (5, 64), None, 32, 0, 15, "float"),
    ("group7-3d", (2, 3, 21), None, 7, 0, 15, "float"),
    ("group-int", (3, 32), None, 16, -8, 7, "int"),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def device(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with triton_forced("fake_quantize", request.param):
            yield request.param
    finally:
        torch.set_num_threads(threads)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make(case, device, dtype=torch.float32, seed=0, zero_point=True):
    _, shape, axis, group, qmin, qmax, domain = case
    x = (torch.randn(shape, generator=gen(seed)) * 3).to(dtype)
    if group:
        pshape = (*shape[:-1], shape[-1] // group)
    elif axis is not None:
        pshape = (shape[axis],)
    else:
        pshape = ()
    scale = (torch.rand(pshape, generator=gen(seed + 1)) + 0.5) * 6 / (qmax - qmin)  # clamps at both ends
    if not zero_point:
        zp = None
    elif domain == "float":
        zp = torch.randn(pshape, generator=gen(seed + 2)) - 1.0
    else:
        zp = torch.randint(qmin // 2, qmax // 2 + 1, pshape, generator=gen(seed + 2)).float()
    kw = dict(qmin=qmin, qmax=qmax, axis=axis, group_size=group, zero_point_domain=domain)
    return x.to(device), scale.to(device), None if zp is None else zp.to(device), kw


def ref_args(x, kw):
    axis = kw["axis"]
    return (kw["qmin"], kw["qmax"], None if axis is None else axis % x.dim(), kw["group_size"],
            kw["zero_point_domain"] == "float")


def _kernels():
    from mltoolkit.triton_kernels import fake_quantize as k

    return k


# ---- forward --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_bit_exact(device, case):
    for dtype, zp_on in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        x, scale, zp, kw = make(case, device, dtype, zero_point=zp_on)
        y = ops.fake_quantize(x, scale, zp, **kw)
        want = ref.fake_quantize(x, scale, zp, *ref_args(x, kw))
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.equal(y, want), f"{dtype}: {int((y != want).sum())} values differ"


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's numpy: 3e38 / 0.5 = inf, as on the GPU
def test_forward_ties_nan_inf_and_large_zero_points(device):
    # scale 0.5: x = k * 0.25 makes x / s = k / 2, every odd k a tie (to even)
    x = torch.arange(-40, 41, dtype=torch.float32) * 0.25
    x = torch.cat([x, torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, 1e-45])]).to(device)
    s = torch.tensor(0.5, device=device)
    for zp, domain in ((torch.tensor(2.5), "int"), (torch.tensor(3.5), "int"), (torch.tensor(-0.25), "float"),
                       (torch.tensor(1e7 + 1), "int"), (torch.tensor(-5e6 - 0.5), "float")):
        y = ops.fake_quantize(x, s, zp.to(device), -10, 10, zero_point_domain=domain)
        want = ref.fake_quantize(x, s, zp.to(device), -10, 10, None, None, domain == "float")
        assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(want))
        assert bool(torch.isnan(y[81])) and torch.equal(torch.isnan(y), torch.isnan(want))
    y = ops.fake_quantize(x[:81], s, None, -128, 127)
    assert y[:6].tolist() == [-10.0, -10.0, -9.5, -9.0, -9.0, -9.0]  # half to even: -19.5, -18.5 -> -20, -18
    assert torch.equal(y, ref.fake_quantize(x[:81], s, None, -128, 127, None, None, False))


def test_forward_non_contiguous(device):
    g = gen(3)
    x = torch.randn(40, 12, generator=g).to(device).T  # (12, 40) column-major
    s = (torch.rand(12, generator=g) + 0.1).to(device) / 20
    for axis in (0, 1):
        sc = s if axis == 0 else torch.full((40,), 0.07, device=device)
        y = ops.fake_quantize(x, sc, None, -127, 127, axis=axis)
        assert torch.equal(y, ref.fake_quantize(x.contiguous(), sc, None, -127, 127, axis, None, False))
    xs = torch.randn(4, 96, generator=g).to(device)[:, 16:80]  # row stride 96
    sg = (torch.rand(4, 2, generator=g) + 0.1).to(device) / 4
    zg = torch.randn(4, 2, generator=g).to(device)
    y = ops.fake_quantize(xs, sg, zg, 0, 15, group_size=32, zero_point_domain="float")
    assert torch.equal(y, ref.fake_quantize(xs.contiguous(), sg, zg, 0, 15, None, 32, True))


# ---- backward -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_reference(device, case):
    dtype = torch.bfloat16 if case[0].startswith("channel-last") else torch.float32
    x, scale, zp, kw = make(case, device, dtype, seed=4)
    leaves = [x.clone().requires_grad_(True), scale.clone().requires_grad_(True), zp.clone().requires_grad_(True)]
    y = ops.fake_quantize(*leaves, **kw, grad_scale="lsq")
    dy = torch.randn(x.shape, generator=gen(5)).to(device, dtype)
    dx, ds, dz = torch.autograd.grad(y, leaves, dy)
    o, c, i = ref.layout(tuple(x.shape), ref_args(x, kw)[2], kw["group_size"])
    gs = 1.0 / (max(1, o * i) * max(1, abs(kw["qmax"]))) ** 0.5
    want = ref.fake_quantize_backward(dy, x, scale, zp, *ref_args(x, kw), gs, [True, True, True])
    assert torch.equal(dx, want[0])
    assert_close(ds, want[1], atol=1e-6, rtol=1e-5)
    assert_close(dz, want[2], atol=1e-6, rtol=1e-5)


def test_backward_output_mask_deterministic_and_no_zero_point(device):
    case = CASES[4]  # channel-last: several row blocks, so several partial sums per channel
    x, scale, zp, kw = make(case, device, seed=6)
    dy = torch.randn(x.shape, generator=gen(7)).to(device)
    args = (dy, x, scale, zp, *ref_args(x, kw), 0.25)
    k = _kernels()
    full = k.fake_quantize_backward(*args, [True, True, True])
    again = k.fake_quantize_backward(*args, [True, True, True])
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    want = ref.fake_quantize_backward(*args, [True, True, True])
    for got, w in zip(full, want):
        assert_close(got, w, atol=1e-6, rtol=1e-5)
    only_s = k.fake_quantize_backward(*args, [False, True, False])
    assert only_s[0] is None and only_s[2] is None and torch.equal(only_s[1], full[1])
    only_z = k.fake_quantize_backward(*args, [False, False, True])
    assert only_z[0] is None and only_z[1] is None and torch.equal(only_z[2], full[2])
    nozp = k.fake_quantize_backward(dy, x, scale, None, *ref_args(x, kw), 1.0, [True, True, True])
    want = ref.fake_quantize_backward(dy, x, scale, None, *ref_args(x, kw), 1.0, [True, True, True])
    assert nozp[2] is None and torch.equal(nozp[0], want[0])
    assert_close(nozp[1], want[1], atol=1e-6, rtol=1e-5)


def test_empty_and_bad_scale(device, monkeypatch):
    x = torch.empty(0, 8, device=device)
    s = torch.ones(8, device=device)
    assert ops.fake_quantize(x, s, None, -8, 7, axis=1).shape == (0, 8)
    with pytest.raises(ValueError, match="scale"):
        ops.fake_quantize(torch.ones(3, device=device), torch.tensor(0.0, device=device), None, -8, 7)
    with pytest.raises(ValueError, match="zero_point"):
        ops.fake_quantize(torch.ones(3, device=device), torch.tensor(1.0, device=device),
                          torch.tensor(float("nan"), device=device), -8, 7)
    monkeypatch.setattr(_kernels(), "CHECK_PARAMS", False)  # no host check: no error, NaN for a NaN scale
    y = ops.fake_quantize(torch.ones(3, device=device), torch.tensor(float("nan"), device=device), None, -8, 7)
    assert not bool(torch.isfinite(y).any())


def test_opcheck(device):
    x, scale, zp, kw = make(CASES[9], device)
    qmin, qmax, axis, group, fzp = ref_args(x, kw)
    args = (x.clone().requires_grad_(True), scale.clone().requires_grad_(True), zp.clone().requires_grad_(True),
            qmin, qmax, axis, group, fzp, 0.5)
    torch.library.opcheck(torch.ops.mltoolkit.fake_quantize.default, args)
    dy = torch.randn(x.shape, generator=gen(1)).to(device)
    torch.library.opcheck(torch.ops.mltoolkit.fake_quantize_backward.default,
                          (dy, x, scale, zp, qmin, qmax, axis, group, fzp, 0.5, [True, False, True]))



def test_table_choice():
    fq = table("fake_quantize")
    names = [b.name for b in fq.backends]
    assert names.index("triton") < names.index("cpp")
    x = torch.ones(4)
    assert fq.get("triton").supports(x) is not None  # CPU tensors: only when forced
    if torch.cuda.is_available() and fq.get("triton").available() is None:
        assert fq.select(x.cuda()).name == "triton"


@pytest.mark.cuda
def test_large_gpu_tiles():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with mltoolkit.backend("triton"):
        for case in (("w", (512, 4096), 0, None, -127, 127, "int"), ("a", (4096, 512), -1, None, -128, 127, "int"),
                     ("g", (256, 4096), None, 128, 0, 15, "float"), ("t", (1 << 20,), None, None, -128, 127, "int")):
            for dtype in (torch.float32, torch.bfloat16):
                x, scale, zp, kw = make(case, "cuda", dtype)
                leaves = [x.clone().requires_grad_(True), scale.clone().requires_grad_(True),
                          zp.clone().requires_grad_(True)]
                y = ops.fake_quantize(*leaves, **kw)
                assert torch.equal(y, ref.fake_quantize(x, scale, zp, *ref_args(x, kw)))
                dy = torch.randn_like(y)
                got = torch.autograd.grad(y, leaves, dy)
                want = ref.fake_quantize_backward(dy, x, scale, zp, *ref_args(x, kw), 1.0, [True, True, True])
                assert torch.equal(got[0], want[0])
                assert_close(got[1], want[1], atol=1e-3, rtol=1e-4)
                assert_close(got[2], want[2], atol=1e-3, rtol=1e-4)
