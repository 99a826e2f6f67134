"""conv2d / conv1d on every backend against F.conv2d / F.conv1d (F.pad for the padding modes) in the oracle dtype.

The shape grid is sampled (fixed seed) from the product of kernel, stride, dilation, groups, padding, padding
mode, odd sizes, batch, layout and dtype, so that the file stays fast on 2 cores with the C++ kernel; the
hand-picked cases below it pin the corners (1x1, depthwise, batch 1, "same" with even kernels, ...).
"""
import contextlib
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference.conv import ACTIVATIONS as TORCH_ACT  # torch's functions (hardswish written out)
from mltoolkit.testing import PassThroughMode, Sample, assert_close, check_op

CPU_BACKENDS = ["cpp", "reference"]
CUDA_BACKENDS = ["triton", "cuda", "reference"]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in CUDA_BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_unavailable(backend, device="cpu", dtype=None):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = table("conv").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if dtype is not None:  # a dtype the backend declines (triton: float64)
        why = table("conv").get(backend).supports(torch.empty(0, dtype=dtype, device=device))
        if why is not None:
            pytest.skip(f"{backend} backend declines {dtype}: {why}")


# ---- the torch oracle ---------------------------------------------------------------------------------------------

def _same_pads(kernel, dilation):
    # torch's "same": total d*(k-1), the odd extra on the right / bottom.
    return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]


def torch_conv(x, w, b, stride, padding, dilation, groups, padding_mode, spatial=2):
    """What nn.Conv2d / nn.Conv1d compute (F.pad for the non-zero modes, as nn.ConvNd._conv_forward does)."""
    conv = F.conv2d if spatial == 2 else F.conv1d
    if padding_mode == "zeros":
        return conv(x, w, b, stride, padding, dilation, groups)
    kernel = w.shape[2:]
    if padding == "valid":
        return conv(x, w, b, stride, 0, dilation, groups)
    dil = [dilation] * spatial if isinstance(dilation, int) else dilation
    if padding == "same":
        pads = _same_pads(kernel, dil)
    else:
        pads = [(p, p) for p in ([padding] * spatial if isinstance(padding, int) else padding)]
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad: last dim first
    return conv(F.pad(x, flat, mode=padding_mode), w, b, stride, 0, dilation, groups)


# ---- the grid -----------------------------------------------------------------------------------------------------

KERNELS = [1, 3, 5, 7]
MODES = ["zeros", "reflect", "replicate", "circular"]


def _grid(n, seed, spatial=2):
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        k = rng.choice(KERNELS)
        stride, dilation = rng.choice([1, 2]), rng.choice([1, 2])
        groups_kind = rng.choice(["1", "2", "depthwise"])
        c = rng.choice([2, 4, 6]) if groups_kind != "1" else rng.choice([1, 3, 4])
        groups = {"1": 1, "2": 2, "depthwise": c}[groups_kind]
        kout = groups * rng.choice([1, 2]) if groups_kind == "depthwise" else rng.choice([2, 4]) * (
            1 if groups == 1 else groups)
        padding = rng.choice([0, k // 2, "same", "valid", "tuple"])
        if padding == "same" and stride != 1:
            stride = 1
        mode = rng.choice(MODES)
        size = [rng.choice([5, 7, 9, 11, 13]) for _ in range(spatial)]
        kernel = [k] * spatial
        if spatial == 2 and rng.random() < 0.3:  # non-square kernel
            kernel = [k, rng.choice(KERNELS)]
        if padding == "tuple":
            padding = tuple(rng.choice([0, 1, 2]) for _ in range(spatial))
        # keep the padded input at least as large as the dilated kernel, and reflect padding below the size
        pads = (_same_pads(kernel, [dilation] * spatial) if padding == "same" else
                [(0, 0)] * spatial if padding == "valid" else
                [(p, p) for p in ([padding] * spatial if isinstance(padding, int) else padding)])
        if any(s + a + b < dilation * (kk - 1) + 1 for s, (a, b), kk in zip(size, pads, kernel)):
            continue
        if mode == "reflect" and any(max(a, b) >= s for s, (a, b) in zip(size, pads)):
            continue
        if mode == "circular" and any(max(a, b) > s for s, (a, b) in zip(size, pads)):
            continue
        cases.append(dict(n=rng.choice([1, 2]), c=c, k=kout, size=size, kernel=kernel, stride=stride,
                          dilation=dilation, groups=groups, padding=padding, mode=mode, bias=rng.random() < 0.7,
                          channels_last=spatial == 2 and rng.random() < 0.35, dtype=rng.choice(DTYPES)))
    return cases


def _id(case):
    ks = "x".join(map(str, case["kernel"]))
    return (f"n{case['n']}c{case['c']}k{case['k']}-{'x'.join(map(str, case['size']))}-k{ks}-s{case['stride']}"
            f"-d{case['dilation']}-g{case['groups']}-p{case['padding']}-{case['mode']}"
            f"{'-cl' if case['channels_last'] else ''}{'' if case['bias'] else '-nobias'}-{str(case['dtype'])[6:]}")


GRID2D = _grid(36, seed=0)
GRID1D = _grid(12, seed=1, spatial=1)


def make_case(case, device, spatial=2):
    g = torch.Generator().manual_seed(zlib.crc32(_id(case).encode()))
    dtype = case["dtype"]
    x = torch.randn(case["n"], case["c"], *case["size"], generator=g).to(device=device, dtype=dtype)
    w = torch.randn(case["k"], case["c"] // case["groups"], *case["kernel"], generator=g).to(device=device,
                                                                                              dtype=dtype)
    b = torch.randn(case["k"], generator=g).to(device=device, dtype=dtype) if case["bias"] else None
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
              padding_mode=case["mode"])
    fn = ops.conv2d if spatial == 2 else ops.conv1d
    ours = lambda x, w, b: fn(x, w, b, **kw)
    ref = lambda x, w, b: torch_conv(x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"],
                                     kw["padding_mode"], spatial)
    leaves = tuple(t.requires_grad_(True) if t is not None else None for t in (x, w, b))
    return ours, ref, leaves


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", GRID2D, ids=_id)
def test_conv2d_matches_torch(device, backend, case):
    skip_unavailable(backend, device)
    fn, ref, args = make_case(case, device)
    with mltoolkit.backend(backend):
        check_op(fn, [Sample(args)], ref, gradcheck=False, opcheck=False, compile=False)
        y = fn(*args)
    expected = torch.channels_last if case["channels_last"] else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", GRID1D, ids=_id)
def test_conv1d_matches_torch(device, backend, case):
    skip_unavailable(backend, device)
    fn, ref, args = make_case(case, device, spatial=1)
    with mltoolkit.backend(backend):
        check_op(fn, [Sample(args)], ref, gradcheck=False, opcheck=False, compile=False)


# ---- hand-picked corners --------------------------------------------------------------------------------------

def _case(**kw):
    base = dict(n=2, c=4, k=4, size=[7, 9], kernel=[3, 3], stride=1, dilation=1, groups=1, padding=1,
                mode="zeros", bias=True, channels_last=False, dtype=torch.float32)
    base.update(kw)
    return base


CORNERS = [
    _case(kernel=[1, 1], padding=0, c=8, k=3),                                   # pointwise
    _case(c=6, k=6, groups=6, channels_last=True),                               # depthwise, NHWC
    _case(c=3, k=6, groups=3, stride=2, dilation=2, padding=2),                  # depthwise multiplier 2
    _case(n=1, size=[1, 1], kernel=[1, 1], padding=0),                           # 1x1 image
    _case(n=1, size=[13, 5], kernel=[7, 7], padding=3, stride=2),                # big kernel, odd size
    _case(kernel=[2, 4], padding="same", dilation=(1, 3)),                       # "same", even kernels
    _case(kernel=[2, 2], padding="same", mode="reflect", channels_last=True),    # asymmetric reflect
    _case(kernel=[5, 3], padding=(2, 1), mode="circular", stride=(2, 1)),        # per-dim stride
    _case(size=[3, 4], kernel=[3, 3], padding=2, mode="replicate"),              # pad beyond the size
    _case(size=[3, 4], kernel=[3, 3], padding=3, mode="circular"),               # wrap exactly once
    _case(c=4, k=2, groups=2, padding="valid", dtype=torch.bfloat16, channels_last=True),
    _case(c=4, k=8, padding="same", kernel=[5, 5], dtype=torch.float16),
    # Past 1024 output pixels the channels-last forward keeps pixel order (below, pixels go in the order of the taps
    # they see): one case on each side, 20 output channels (a partial panel).
    _case(n=1, c=24, k=20, size=[35, 33], padding=1, channels_last=True),
    _case(n=3, c=24, k=20, size=[9, 11], stride=(1, 2), padding=(2, 1), dilation=(2, 1), channels_last=True),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", CORNERS, ids=_id)
def test_conv2d_corners(device, backend, case):
    skip_unavailable(backend, device)
    fn, ref, args = make_case(case, device)
    with mltoolkit.backend(backend):
        check_op(fn, [Sample(args)], ref, gradcheck=False, opcheck=False, compile=False)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", [
    _case(n=1, c=2, k=2, size=[5, 4], stride=2, dilation=(1, 2), padding=(1, 2), dtype=torch.float64),
    _case(n=1, c=4, k=2, size=[4, 5], groups=2, kernel=[2, 3], padding="same", mode="reflect",
          channels_last=True, dtype=torch.float64),
    _case(n=2, c=3, k=3, size=[4, 4], groups=3, padding=1, mode="circular", bias=False, dtype=torch.float64),
], ids=_id)
def test_gradcheck_opcheck_compile(device, backend, case):
    """fp64 gradcheck, opcheck of conv2d_fwd (and, through autograd, conv2d_bwd), compile(fullgraph=True)."""
    skip_unavailable(backend, device, torch.float64)
    fn, ref, args = make_case(case, device)
    with mltoolkit.backend(backend):
        check_op(fn, [Sample(args)], ref)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_backward_op(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(2, 4, 6, 7, device=device)
    w = torch.randn(6, 2, 3, 3, device=device)
    dy = torch.randn(2, 6, 3, 4, device=device)
    with mltoolkit.backend(backend):
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(torch.ops.mltoolkit.conv2d_bwd, (dy, x, w, [2, 2], [1, 1], [1, 1], 2, mask))
        torch.library.opcheck(torch.ops.mltoolkit.conv2d_bwd,
                              (dy.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last), w,
                               [2, 2], [1, 1], [1, 1], 2, [True, True, True]))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_channels_last_layout_and_grads(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(2, 8, 9, 9, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(16, 8, 3, 3, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    with mltoolkit.backend(backend):
        y = ops.conv2d(x, w, padding=1)
        y.sum().backward()  # dy arrives expanded: stride 0
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.conv2d(x2, w2, padding=1).sum().backward()
    assert_close(x.grad, x2.grad, atol=1e-4, name="dx")
    assert_close(w.grad, w2.grad, atol=1e-3, name="dw")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_other_layouts_and_partial_grads(device, backend):
    """Strided (transposed, sliced) input becomes contiguous; only the grads asked for are computed."""
    skip_unavailable(backend, device)
    base = torch.randn(2, 9, 4, 12, device=device)
    x = base.permute(0, 2, 1, 3)[..., ::2]  # (2, 4, 9, 6), neither layout
    w = torch.randn(3, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(3, device=device)
    with mltoolkit.backend(backend):
        y = ops.conv2d(x, w, b, padding=1)
        (dw,) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert y.is_contiguous()
    assert_close(y, F.conv2d(x, w, b, padding=1), atol=1e-4)
    w2 = w.detach().clone().requires_grad_(True)
    (dw2,) = torch.autograd.grad(F.conv2d(x, w2, b, padding=1).sum(), w2)
    assert_close(dw, dw2, atol=1e-3)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unbatched(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(3, 8, 7, device=device)
    w = torch.randn(5, 3, 3, 3, device=device)
    with mltoolkit.backend(backend):
        assert_close(ops.conv2d(x, w, padding="same", padding_mode="reflect"),
                     F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w), atol=1e-4)
        x1, w1 = torch.randn(3, 11, device=device), torch.randn(4, 3, 5, device=device)
        assert_close(ops.conv1d(x1, w1, padding=2), F.conv1d(x1, w1, padding=2), atol=1e-4)


def test_nn_module_padding_modes_match():
    """Against nn.Conv2d itself (not our oracle) for each padding mode, with "same" and an odd dilation."""
    x = torch.randn(2, 4, 8, 9)
    for mode in MODES:
        m = torch.nn.Conv2d(4, 6, (3, 4), padding="same", dilation=(2, 1), padding_mode=mode)
        with mltoolkit.backend("reference"):
            y = ops.conv2d(x, m.weight, m.bias, padding="same", dilation=(2, 1), padding_mode=mode)
        assert_close(y, m(x), atol=1e-5, name=mode)
        m = torch.nn.Conv1d(4, 6, 4, padding="same", padding_mode=mode)
        with mltoolkit.backend("reference"):
            y = ops.conv1d(x[:, :, 0], m.weight, m.bias, padding="same", padding_mode=mode)
        assert_close(y, m(x[:, :, 0]), atol=1e-5, name=f"1d {mode}")


# ---- bad input ------------------------------------------------------------------------------------------------

BAD = [
    (lambda x, w: ops.conv2d(x[:, :3], w), ValueError, "input has 3"),
    (lambda x, w: ops.conv2d(x, w, groups=3), ValueError, "not divisible by groups"),
    (lambda x, w: ops.conv2d(x, torch.randn(6, 2, 3, 3), groups=3), ValueError, "input channels 4"),
    (lambda x, w: ops.conv2d(x, w[:, :2]), ValueError, "weight"),
    (lambda x, w: ops.conv2d(x, w, padding=5, padding_mode="reflect"), ValueError, "reflect padding"),
    (lambda x, w: ops.conv2d(x, w, padding=6, padding_mode="circular"), ValueError, "circular padding"),
    (lambda x, w: ops.conv2d(x[0, 0], w), ValueError, "input must be 4-D"),
    (lambda x, w: ops.conv2d(x, w[0]), ValueError, "weight must be 4-D"),
    (lambda x, w: ops.conv2d(x.double(), w), TypeError, "weight dtype"),
    (lambda x, w: ops.conv2d(x.long(), w.long()), TypeError, "input must be float"),
    (lambda x, w: ops.conv2d(x, w, torch.randn(5)), ValueError, "bias must have shape"),
    (lambda x, w: ops.conv2d(x, w, torch.randn(6).half()), TypeError, "bias dtype"),
    (lambda x, w: ops.conv2d(x, w, stride=0), ValueError, "stride"),
    (lambda x, w: ops.conv2d(x, w, stride=(1, 2, 3)), TypeError, "stride"),
    (lambda x, w: ops.conv2d(x, w, dilation=0), ValueError, "dilation"),
    (lambda x, w: ops.conv2d(x, w, padding=-1), ValueError, "padding"),
    (lambda x, w: ops.conv2d(x, w, padding="full"), ValueError, "padding"),
    (lambda x, w: ops.conv2d(x, w, stride=2, padding="same"), ValueError, "stride 1"),
    (lambda x, w: ops.conv2d(x, w, padding_mode="mirror"), ValueError, "padding_mode"),
    (lambda x, w: ops.conv2d(x, w, groups=0), ValueError, "groups"),
    (lambda x, w: ops.conv2d(x, torch.randn(6, 4, 9, 9)), ValueError, "smaller than the dilated kernel"),
    (lambda x, w: ops.conv1d(x, w), ValueError, "input must be 3-D"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(call, exc, match):
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with mltoolkit.backend("reference"), pytest.raises(exc, match=match):
        call(x, w)


@pytest.mark.cuda
def test_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(ValueError, match="weight is on"):
        ops.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3, device="cuda"))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_dynamic_shapes(device, backend):
    """One dynamic graph serves several batch and image sizes, both layouts, a padding mode and groups."""
    skip_unavailable(backend, device)
    torch._dynamo.reset()
    fn = lambda x, w, b: ops.conv2d(x, w, b, padding="same", padding_mode="reflect", groups=2)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    for shape, cl in (((2, 4, 9, 11), False), ((3, 4, 7, 6), True), ((1, 4, 13, 5), False)):
        x = torch.randn(shape, device=device)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        with mltoolkit.backend(backend):
            y = compiled(x, w, b)
            g = torch.autograd.grad(y.square().sum(), (x, w, b))
        y2 = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, b, groups=2)
        g2 = torch.autograd.grad(y2.square().sum(), (x, w, b))
        assert_close(y, y2, atol=1e-4)
        assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for a, e, name in zip(g, g2, ("dx", "dw", "db")):
            assert_close(a, e, atol=1e-3 * max(1.0, e.abs().max().item()), name=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nn_modules(device, backend):
    """mltoolkit.nn.Conv2d / Conv1d: torch's constructor and state_dict keys, the same outputs and grads."""
    skip_unavailable(backend, device)
    from mltoolkit import nn as mnn

    for ours_cls, torch_cls, shape, kw in (
            (mnn.Conv2d, torch.nn.Conv2d, (2, 4, 9, 8), dict(kernel_size=3, padding="same", padding_mode="circular")),
            (mnn.Conv2d, torch.nn.Conv2d, (2, 4, 9, 8), dict(kernel_size=(3, 2), stride=2, padding=(1, 0),
                                                             groups=2, bias=False)),
            (mnn.Conv1d, torch.nn.Conv1d, (2, 4, 15), dict(kernel_size=4, padding="same", dilation=2,
                                                           padding_mode="replicate"))):
        ref_m = torch_cls(4, 6, **kw).to(device)
        ours = ours_cls.from_torch(ref_m)
        assert isinstance(ours, torch_cls) and ours.weight is ref_m.weight
        fresh = ours_cls(4, 6, **kw)
        assert fresh.state_dict().keys() == ref_m.state_dict().keys()
        x = torch.randn(shape, device=device)
        with mltoolkit.backend(backend):
            y = ours(x)
            (dw,) = torch.autograd.grad(y.sum(), ours.weight)
        y2 = ref_m(x)
        (dw2,) = torch.autograd.grad(y2.sum(), ref_m.weight)
        assert_close(y, y2, atol=1e-4)
        assert_close(dw, dw2, atol=1e-3 * max(1.0, dw2.abs().max().item()))


# ---- the fused epilogue: act(conv + bias + residual) ----------------------------------------------------------

ACTIVATIONS = list(TORCH_ACT)


def _epilogue_args(device, dtype, channels_last, groups=1, residual=True):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 7, 6, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g).to(device=device, dtype=dtype) * 0.5
    b = torch.randn(6, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(2, 6, 4, 3, generator=g).to(device=device, dtype=dtype) * 2 if residual else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        r = None if r is None else r.to(memory_format=torch.channels_last)
    return x, w, b, r


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_epilogue_matches_torch(device, backend, act, dtype):
    """y = act(conv + bias + residual) and its gradients (x, weight, bias, residual) against the eager sequence."""
    skip_unavailable(backend, device)
    channels_last = dtype != torch.float32  # both layouts across the dtypes
    x, w, b, r = _epilogue_args(device, dtype, channels_last)
    fwd = lambda x, w, b, r: torch.ops.mltoolkit.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, r, act)
    ref = lambda x, w, b, r: TORCH_ACT[act](F.conv2d(x, w, b, 2, 1) + r)
    leaves = tuple(t.requires_grad_(True) for t in (x, w, b, r))
    with mltoolkit.backend(backend):
        check_op(fwd, [Sample(leaves)], ref, gradcheck=False, opcheck=False, compile=False)
        y = fwd(*leaves)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu6", "silu", "hardswish"])
@pytest.mark.parametrize("groups", [1, 4], ids=["dense-residual", "depthwise"])
def test_epilogue_gradcheck_opcheck_compile(device, backend, act, groups):
    """fp64 gradcheck (with a residual; a depthwise NHWC case without one), opcheck, compile."""
    skip_unavailable(backend, device, torch.float64)
    x, w, b, r = _epilogue_args(device, torch.float64, channels_last=groups == 4, groups=groups,
                                residual=groups == 1)
    if groups == 4:
        w, b = w[:4], b[:4]
    fwd = lambda x, w, b, r=None: torch.ops.mltoolkit.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], groups, r, act)
    ref = lambda x, w, b, r=None: TORCH_ACT[act](F.conv2d(x, w, b, 2, 1, 1, groups) + (0 if r is None else r))
    leaves = tuple(t.requires_grad_(True) for t in (x, w, b, r) if t is not None)
    with mltoolkit.backend(backend):
        check_op(fwd, [Sample(leaves)], ref)


def test_epilogue_bad_activation():
    x, w, b, r = _epilogue_args("cpu", torch.float32, False)
    with pytest.raises((ValueError, RuntimeError), match="activation"):
        torch.ops.mltoolkit.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, r, "tanh")
    with pytest.raises((ValueError, RuntimeError), match="residual"):
        torch.ops.mltoolkit.conv2d_fwd(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, "relu")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_eager_fast_path_matches_registered_op(device, backend, act):
    """Plain eager calls skip the custom-op dispatch (_EagerConv); any active mode takes the registered op. Both
    must agree bit for bit, gradients of x, weight, bias and residual included."""
    skip_unavailable(backend, device)
    args = _epilogue_args(device, torch.float32, channels_last=True)
    results = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        x, w, b, r = leaves
        with mltoolkit.backend(backend), mode:
            y = ops.conv2d_act(x, w, b, stride=2, padding=1, residual=r, activation=act)
            grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
                                        .to(device))
        results.append((type(y.grad_fn).__name__, y, grads))
    (fast_fn, fast_y, fast_grads), (op_fn, op_y, op_grads) = results
    assert "EagerConv" in fast_fn and "conv2d_fwd" in op_fn, (fast_fn, op_fn)
    for a, b in zip([fast_y, *fast_grads], [op_y, *op_grads]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("via_op", [False, True], ids=["eager-fast-path", "registered-op"])
def test_double_backward_is_an_error(via_op):
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    with PassThroughMode() if via_op else contextlib.nullcontext():
        (gx,) = torch.autograd.grad(ops.conv2d(x, w, padding=1).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(gx.sum(), w)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "relu6"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_epilogue_keeps_nan(device, backend, act, channels_last):
    """A NaN in the input stays NaN through relu / relu6 (F.relu's semantics), in the vector paths too."""
    skip_unavailable(backend, device)
    x, w, b, _ = _epilogue_args(device, torch.float32, channels_last, residual=False)
    x = x.clone()
    x[0, 1, 3, 2] = float("nan")
    with mltoolkit.backend(backend):
        y = ops.conv2d_act(x, w, b, padding=1, activation=act)
    want = TORCH_ACT[act](F.conv2d(x, w, b, 1, 1))
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(y), torch.isnan(want))


# ---- NCHW weight gradient through channels-last copies (inputs from 28 x 28 with >= 16 channels per group) ----------

NCHW_DW_VIA_CHANNELS_LAST = [
    _case(n=1, c=16, k=8, size=[28, 30], kernel=[3, 3]),
    _case(n=2, c=32, k=12, groups=2, size=[29, 28], kernel=[3, 3], stride=2, bias=False),
    _case(n=1, c=24, k=40, size=[28, 28], kernel=[1, 1], padding=0),
    _case(n=1, c=16, k=16, size=[31, 28], kernel=[3, 3], dilation=2, padding=2, dtype=torch.float64),
]


@pytest.mark.parametrize("case", NCHW_DW_VIA_CHANNELS_LAST, ids=_id)
def test_nchw_weight_grad_via_channels_last(case):
    """Forward and all gradients, dW above all: the NCHW layers whose weight gradient runs on channels-last copies
    (csrc/cpu/conv.cpp, nchw_weight_grad_via_channels_last) give torch's, in torch's (K, C, R, S) weight layout."""
    skip_unavailable("cpp")
    fn, ref, args = make_case(case, "cpu")
    with mltoolkit.backend("cpp"):
        check_op(fn, [Sample(args)], ref, gradcheck=False, opcheck=False, compile=False)


@pytest.mark.parametrize("cg,kernel,groups,dtype", [(40, 3, 1, torch.float32), (32, 3, 1, torch.float32),
                                                    (40, 1, 1, torch.float32), (40, 2, 2, torch.float32),
                                                    (40, 3, 1, torch.float64), (40, 5, 1, torch.float32)])
def test_nchw_dx_weight_panels(cg, kernel, groups, dtype):
    """dx of stride-1 NCHW layers (the forward on dy with the flipped weight, packed from (c, r, s) rows 16 input
    channels at a time; one by one the channels past the last 16 (cg = 40) and the weight's last block (cg = 32: its
    16-wide reads would run past the weight); 5x5: 25 taps, one by one) against torch."""
    skip_unavailable("cpp")
    g = torch.Generator().manual_seed(kernel * 10 + groups)
    c, k = cg * groups, 24 * groups
    x = torch.randn(2, c, 9, 8, generator=g, dtype=dtype)
    w = torch.randn(k, c // groups, kernel, kernel, generator=g, dtype=dtype)
    dy = torch.randn(F.conv2d(x, w, None, 1, kernel // 2, 1, groups).shape, generator=g, dtype=dtype)
    pad = [kernel // 2] * 2
    want = torch.ops.aten.convolution_backward(dy.double(), x.double(), w.double(), None, [1, 1], pad, [1, 1], False,
                                               [0, 0], groups, [True, False, False])[0]
    with mltoolkit.backend("cpp"):
        got = torch.ops.mltoolkit.conv2d_bwd(dy, x, w, [1, 1], pad, [1, 1], groups, [True, False, False])[0]
    assert_close(got.double(), want, atol=1e-4, rtol=1e-4, name="dx")


# ---- depthwise: the direct channels-last kernels (blocks of pixels, border pixels, channel tails, strides) ----------

DEPTHWISE = [
    _case(n=2, c=37, k=37, groups=37, size=[23, 21], kernel=[5, 5], padding=2),                  # tail channels
    _case(n=2, c=37, k=37, groups=37, size=[23, 21], kernel=[5, 5], padding=2, channels_last=True),
    _case(n=3, c=20, k=20, groups=20, size=[19, 25], kernel=[3, 3], stride=2, padding=1, channels_last=True),
    _case(n=1, c=16, k=16, groups=16, size=[30, 33], kernel=[5, 5], stride=2, padding=2, bias=False),
    _case(n=2, c=17, k=17, groups=17, size=[15, 29], kernel=[3, 3], dilation=2, padding=2, channels_last=True),
    _case(n=2, c=33, k=33, groups=33, size=[13, 27], kernel=[3, 5], stride=(1, 2), dilation=(2, 1), padding=(1, 0)),
    _case(n=1, c=32, k=32, groups=32, size=[7, 7], kernel=[5, 5], padding=2, channels_last=True),
    # Pairs of output rows in the forward (stride 1 in height) with stride 2 in width, residual-free, partial vector.
    _case(n=2, c=20, k=20, groups=20, size=[12, 25], kernel=[5, 5], stride=(1, 2), padding=2, channels_last=True),
    # ConvNeXt's 7x7: dW in tiles of 3 + 3 + 1 kernel rows; 56 channels = a pair of vectors, one more, a partial one.
    _case(n=2, c=56, k=56, groups=56, size=[14, 15], kernel=[7, 7], padding=3, channels_last=True),
    # x and y beyond 24 MB (x from DRAM): the stride-1 row kernels prefetch the next rows; rows 400 wide, so 56
    # channels in blocks of 48 and 8 (prefetched pixel by pixel).
    _case(n=2, c=56, k=56, groups=56, size=[130, 398], kernel=[3, 3], padding=1, channels_last=True),
    _case(n=2, c=9, k=9, groups=9, size=[11, 26], kernel=[3, 3], padding="same", mode="reflect",
          channels_last=True),
    _case(n=2, c=9, k=9, groups=9, size=[12, 20], kernel=[4, 3], stride=3, padding=0, mode="zeros"),
    _case(n=1, c=5, k=5, groups=5, size=[3, 2], kernel=[5, 5], padding=3),                      # all border
    # Images narrower than the kernel's reach (EfficientNet's 5x5 layers on a small input): taps that miss x for
    # every pixel.
    _case(n=2, c=16, k=16, groups=16, size=[4, 1], kernel=[5, 5], padding=2),
    _case(n=2, c=40, k=40, groups=40, size=[1, 1], kernel=[5, 5], padding=2, channels_last=True),
    _case(n=2, c=24, k=24, groups=24, size=[17, 18], kernel=[3, 3], padding=1, mode="circular",
          dtype=torch.float64, channels_last=True),
    _case(n=2, c=24, k=24, groups=24, size=[9, 19], kernel=[3, 3], stride=2, padding=1, dtype=torch.bfloat16),
    # NCHW dW on the planes in place (stride 1 or 2 in width, rows of >= 16 positions): strides, dilation, a
    # stride-2 row whose spread dy ends inside a vector (Q = 19).
    _case(n=2, c=5, k=5, groups=5, size=[20, 61], kernel=[3, 5], stride=(2, 1), dilation=(2, 2), padding=(1, 3)),
    _case(n=2, c=3, k=3, groups=3, size=[9, 40], kernel=[3, 5], stride=(1, 2), dilation=(1, 2), padding=(2, 3)),
    # NCHW staging with a wide channel block (its pixel pitch padded by one vector; narrower blocks stay dense).
    _case(n=2, c=144, k=144, groups=144, size=[7, 9], kernel=[3, 3], padding=1),
    # NCHW planes too big for the staged kernel: the flat per-plane kernel (phase planes for strides and dilation).
    _case(n=1, c=3, k=3, groups=3, size=[97, 123], kernel=[3, 3], padding=1),
    _case(n=1, c=2, k=2, groups=2, size=[160, 131], kernel=[5, 5], stride=2, padding=2, bias=False),
    _case(n=1, c=2, k=2, groups=2, size=[130, 127], kernel=[3, 5], stride=(3, 2), dilation=(2, 3), padding=(1, 4)),
]


@pytest.mark.parametrize("case", DEPTHWISE, ids=_id)
def test_depthwise_matches_torch(case):
    """Forward and all gradients of depthwise convolutions (odd sizes, strides, dilation, padding modes, layouts)."""
    skip_unavailable("cpp")
    fn, ref, args = make_case(case, "cpu")
    with mltoolkit.backend("cpp"):
        check_op(fn, [Sample(args)], ref, gradcheck=False, opcheck=False, compile=False)
        y = fn(*args)
    expected = torch.channels_last if case["channels_last"] else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)


@pytest.mark.parametrize("act", ["relu6", "silu"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_depthwise_epilogue(act, stride, channels_last):
    """act(conv + bias + residual) of the depthwise kernels and its gradients against the eager sequence."""
    skip_unavailable("cpp")
    g = torch.Generator().manual_seed(3)
    c = 35
    x = torch.randn(2, c, 17, 22, generator=g)
    w = torch.randn(c, 1, 5, 5, generator=g) * 0.3
    b = torch.randn(c, generator=g)
    r = torch.randn(F.conv2d(x, w, None, stride, 2, 1, c).shape, generator=g)
    if channels_last:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    fwd = lambda x, w, b, r: torch.ops.mltoolkit.conv2d_fwd(x, w, b, [stride] * 2, [2, 2], [1, 1], c, r, act)
    ref = lambda x, w, b, r: TORCH_ACT[act](F.conv2d(x, w, b, stride, 2, 1, c) + r)
    leaves = tuple(t.requires_grad_(True) for t in (x, w, b, r))
    with mltoolkit.backend("cpp"):
        check_op(fwd, [Sample(leaves)], ref, gradcheck=False, opcheck=False, compile=False)


@pytest.mark.parametrize("stride,kernel,act", [(1, 3, "silu"), (2, 5, "relu6")])
def test_depthwise_streamed_output(stride, kernel, act):
    """Channels-last depthwise layers whose x and y pass 24 MB write y (and, at stride 1, dx) with non-temporal stores,
    the epilogue (bias, residual, activation) in registers: against torch, and bitwise equal to each image alone
    (small enough to take the cached path)."""
    skip_unavailable("cpp")
    g = torch.Generator().manual_seed(7)
    c, size, pad = 32, 160 if stride == 1 else 224, kernel // 2
    x = torch.randn(4, c, size, size, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(c, 1, kernel, kernel, generator=g) * 0.3
    b = torch.randn(c, generator=g)
    r = torch.randn(F.conv2d(x[:1], w, None, stride, pad, 1, c).shape[2:], generator=g).expand(4, c, -1, -1)
    r = r.contiguous(memory_format=torch.channels_last)
    conv = lambda x, r: torch.ops.mltoolkit.conv2d_fwd(x, w, b, [stride] * 2, [pad] * 2, [1, 1], c, r, act)
    with mltoolkit.backend("cpp"):
        y = conv(x, r)
        alone = torch.cat([conv(x[i:i + 1], r[i:i + 1]) for i in range(4)])
        dx = torch.ops.mltoolkit.conv2d_bwd(y, x, w, [stride] * 2, [pad] * 2, [1, 1], c, [True, False, False])[0]
        dx_alone = torch.cat([torch.ops.mltoolkit.conv2d_bwd(y[i:i + 1], x[i:i + 1], w, [stride] * 2, [pad] * 2,
                                                             [1, 1], c, [True, False, False])[0] for i in range(4)])
    assert torch.equal(y, alone)
    assert torch.equal(dx, dx_alone)
    assert_close(y, TORCH_ACT[act](F.conv2d(x, w, b, stride, pad, 1, c) + r), atol=1e-4, rtol=1e-4, name="y")
    want_dx = torch.ops.aten.convolution_backward(y, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], c,
                                                  [True, False, False])[0]
    assert_close(dx, want_dx, atol=1e-4, rtol=1e-4, name="dx")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_depthwise_same_for_any_thread_count(stride, channels_last):
    """Depthwise y, dx, dw and db are bitwise the same with 1 and 2 threads (fixed reduction orders; dW and db in
    several chunks of rows)."""
    skip_unavailable("cpp")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 48, 41, 39, generator=g)
    w = torch.randn(48, 1, 3, 3, generator=g)
    b = torch.randn(48, generator=g)
    dy = torch.randn(F.conv2d(x, w, None, stride, 1, 1, 48).shape, generator=g)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xl, wl, bl = (t.clone().requires_grad_(True) for t in (x, w, b))
            with mltoolkit.backend("cpp"):
                y = ops.conv2d(xl, wl, bl, stride, 1, 1, 48)
                grads = torch.autograd.grad(y, (xl, wl, bl), dy)
            results.append((y, *grads))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("c,k,kernel,stride,pad", [(48, 16, 1, 1, 0), (16, 24, 3, 1, 1), (24, 8, 3, 2, 1),
                                                     (32, 40, 1, 2, 0)])
def test_small_weight_grad_split_over_pixels(c, k, kernel, stride, pad):
    """Channels-last dW of a small weight on many pixels (the path that splits the pixels into fixed chunks, x read in
    place for 1x1 stride 1): against float64 torch, and bitwise the same with 1 and 2 threads."""
    skip_unavailable("cpp")
    g = torch.Generator().manual_seed(c + k + kernel + stride)
    x = torch.randn(3, c, 31, 33, generator=g).to(memory_format=torch.channels_last)  # >= 2 * 256 output pixels
    w = (torch.randn(k, c, kernel, kernel, generator=g) / (c * kernel * kernel) ** 0.5).to(
        memory_format=torch.channels_last)
    dy = torch.randn(F.conv2d(x, w, None, stride, pad).shape, generator=g).to(memory_format=torch.channels_last)
    want = torch.ops.aten.convolution_backward(dy.double(), x.double(), w.double(), None, [stride] * 2, [pad] * 2,
                                               [1, 1], False, [0, 0], 1, [True, True, False])
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with mltoolkit.backend("cpp"):
                results.append(torch.ops.mltoolkit.conv2d_bwd(dy, x, w, [stride] * 2, [pad] * 2, [1, 1], 1,
                                                              [True, True, False]))
    finally:
        torch.set_num_threads(threads)
    for got, ref, name in zip(results[0][:2], want[:2], ("dx", "dw")):
        assert_close(got, ref.float(), atol=1e-4, rtol=1e-4, name=name)
    for a, b in zip(results[0][:2], results[1][:2]):
        assert torch.equal(a, b)


# ---- weights prepared once for inference (the C++ CPU kernel) --------------------------------------------------

def _prepared_case(c, k, hw, kernel, stride, groups, channels_last):
    g = torch.Generator().manual_seed(c * 7 + hw + kernel + stride)
    x = torch.randn(2, c, hw, hw, generator=g)
    w = torch.randn(k, c // groups, kernel, kernel, generator=g) / (c * kernel * kernel / groups) ** 0.5
    b, r = torch.randn(k, generator=g), torch.randn(2, k, (hw - 1) // stride + 1, (hw - 1) // stride + 1, generator=g)
    if channels_last:
        x, w, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, r))
    return x, w, b, r


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("c,k,hw,kernel,stride,groups", [
    (40, 48, 14, 3, 1, 1),  # Winograd with or without the prepared transform: the same bits
    (40, 48, 9, 3, 2, 1),   # direct (stride 2)
    (24, 36, 10, 1, 1, 1),  # 1x1 (NCHW: the pointwise kernel, which reads the weight itself)
    (24, 36, 11, 3, 1, 2),  # groups
    (3, 20, 15, 7, 2, 1),   # the RGB stem's filter-row taps
])
def test_prepared_weights_give_the_same_bits(c, k, hw, kernel, stride, groups, channels_last):
    skip_unavailable("cpp")
    x, w, b, r = _prepared_case(c, k, hw, kernel, stride, groups, channels_last)
    prepared = ops.conv.prepare_weight(w, groups, (stride, stride), (1, 1))
    assert prepared is not None and prepared[0] is not None
    assert (prepared[1] is not None) == (kernel == 3 and stride == 1 and groups == 1)
    pad = kernel // 2
    with torch.no_grad():
        plain = ops.conv.conv2d_act(x, w, b, stride, pad, 1, groups, activation="relu", residual=r)
        fast = ops.conv._forward_kernel(x, w, b, [stride] * 2, [pad] * 2, [1, 1], groups, r, "relu", prepared)
    assert torch.equal(plain, fast)
    assert fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("hw", [7, 5])
def test_prepared_winograd_runs_on_small_images(hw, channels_last):
    """With the transform prepared, 3x3 stride-1 layers on 7x7 (and 5x5) images take Winograd, which without it
    they do not: other bits than the direct kernel's, within the same tolerance against float64."""
    skip_unavailable("cpp")
    x, w, b, r = _prepared_case(64, 64, hw, 3, 1, 1, channels_last)
    prepared = ops.conv.prepare_weight(w, 1, (1, 1), (1, 1))
    with torch.no_grad():
        direct = ops.conv.conv2d_act(x, w, b, 1, 1, activation="relu", residual=r)
        fast = ops.conv._forward_kernel(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, "relu", prepared)
    want = torch.relu(F.conv2d(x.double(), w.double(), b.double(), 1, 1) + r.double())
    assert not torch.equal(direct, fast)
    for got in (direct, fast):
        assert (got.double() - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("x_cl", [False, True], ids=["x_nchw", "x_nhwc"])
@pytest.mark.parametrize("w_cl", [False, True], ids=["w_nchw", "w_nhwc"])
def test_output_layout_follows_torch(kernel, x_cl, w_cl):
    """The output is channels_last when the input or the weight is (a 1x1 weight, dense in both layouts, by its
    strides), as F.conv2d's: a model converted to channels_last runs so whatever its input's layout."""
    skip_unavailable("cpp")
    x, w = torch.randn(2, 8, 9, 9), torch.randn(16, 8, kernel, kernel)
    x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
    w = w.contiguous(memory_format=torch.channels_last) if w_cl else w
    want = F.conv2d(x, w, padding=kernel // 2)
    for got, ref in ((ops.conv2d(x, w, padding=kernel // 2), want),
                     (ops.conv.conv2d_act(x, w, padding=kernel // 2, activation="relu"), torch.relu(want))):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert got.stride() == want.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("hw,activation", [(7, "relu"), (12, "gelu")])
def test_winograd_by_output_panels(hw, activation, channels_last, dtype):
    """Layers whose Winograd transform is large (here 16 x 192 x 192 values) against small images run Winograd by
    panels of output channels after transforming every tile (fwd_winograd_by_panels): against float64, forward with
    bias, residual and an activation (vector and per-element), prepared or not, and dx (a forward on the flipped
    weight, the same sizes)."""
    skip_unavailable("cpp")
    x, w, b, r = (t.to(dtype) for t in _prepared_case(192, 192, hw, 3, 1, 1, channels_last))
    prepared = ops.conv.prepare_weight(w, 1, (1, 1), (1, 1))
    assert prepared[1] is not None
    want = getattr(F, activation)(F.conv2d(x.double(), w.double(), b.double(), 1, 1) + r.double())
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    with torch.no_grad():
        outs = [ops.conv._forward_kernel(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, activation, prepared)]
        if hw > 7:  # 7x7 images take Winograd only with the transform prepared
            outs.append(ops.conv.conv2d_act(x, w, b, 1, 1, activation=activation, residual=r))
    for got in outs:
        assert got.dtype == dtype
        assert (got.double() - want).abs().max().item() < tol
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    ops.conv.conv2d(xg, wg, None, 1, 1).backward(r)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    F.conv2d(xd, wd, None, 1, 1).backward(r.double())
    assert (xg.grad.double() - xd.grad).abs().max().item() < tol * 10
    assert (wg.grad.double() - wd.grad).abs().max().item() < tol * 100


def test_prepared_weights_are_checked():
    skip_unavailable("cpp")
    x, w, b, _ = _prepared_case(40, 48, 14, 3, 1, 1, False)
    panels, winograd = ops.conv.prepare_weight(w, 1, (1, 1), (1, 1))
    C = mltoolkit._ext._C
    args = (x, w, b, [1, 1], [1, 1], [1, 1], 1, None, "none")
    with pytest.raises(RuntimeError, match="prepared_panels does not match this weight"):
        C.conv2d_forward_prepared_cpu(*args, panels[:-1], None)
    with pytest.raises(RuntimeError, match="prepared_panels does not match this weight"):
        C.conv2d_forward_prepared_cpu(*args, panels.double(), None)
    with pytest.raises(RuntimeError, match="prepared_winograd given for a convolution that Winograd does not run"):
        C.conv2d_forward_prepared_cpu(x, w, b, [2, 2], [1, 1], [1, 1], 1, None, "none", panels, winograd)
    with pytest.raises(RuntimeError, match="prepared_winograd does not match this weight"):
        C.conv2d_forward_prepared_cpu(*args, None, winograd[1:])
    depthwise = torch.randn(8, 1, 3, 3)
    assert ops.conv.prepare_weight(depthwise, 8, (1, 1), (1, 1)) is None
    with pytest.raises(RuntimeError, match="groups must be >= 1 and divide K"):
        C.conv2d_prepare_weight_cpu(w, 5, [1, 1], [1, 1])


@pytest.mark.cuda
def test_prepare_weight_is_cpu_only():
    assert ops.conv.prepare_weight(torch.randn(8, 8, 3, 3, device="cuda"), 1, (1, 1), (1, 1)) is None


@pytest.mark.parametrize("stride,hw", [((2, 2), (16, 16)), ((2, 1), (16, 8)), ((3, 3), (24, 22)), ((2, 2), (57, 57))])
def test_strided_pointwise_nchw(stride, hw):
    """NCHW 1x1 convolutions with a stride and images whose subsampled pixels fill the pointwise kernel's panels run
    it on the gathered pixels (ResNet's downsampling shortcuts); same results as torch, epilogue included."""
    skip_unavailable("cpp")
    g = torch.Generator().manual_seed(sum(hw))
    x, w, b = torch.randn(2, 24, *hw, generator=g), torch.randn(40, 24, 1, 1, generator=g), torch.randn(40, generator=g)
    want = F.conv2d(x.double(), w.double(), b.double(), stride)
    r = torch.randn(want.shape, generator=g)
    with mltoolkit.backend("cpp"):
        got = ops.conv2d_act(x, w, b, stride, activation="relu", residual=r)
    assert_close(got, torch.relu(want + r.double()).float(), atol=1e-5)
    assert got.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_cpu_output_reuses_memory_and_stays_an_ordinary_tensor(channels_last):
    """A CPU output of 1 MiB or more takes the block an earlier one of its size freed (csrc/cpu/reused_memory.h:
    glibc would give it back to the kernel, and its pages would fault again), in the input's layout, with the same
    values; it is an ordinary tensor all the same (its storage grows under resize_)."""
    if table("conv").get("cpp").available() is not None:
        pytest.skip("C++ extension not built")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 16, 64, 64).to(memory_format=fmt)  # a 4 MiB output
    w = torch.randn(32, 16, 3, 3).to(memory_format=fmt)
    with mltoolkit.backend("cpp"):
        first = ops.conv2d(x, w, padding=1)
        address, expected = first.data_ptr(), first.clone()
        del first
        second = ops.conv2d(x, w, padding=1)
    assert second.data_ptr() == address and second.is_contiguous(memory_format=fmt)
    assert torch.equal(second, expected)
    assert_close(second, F.conv2d(x.double(), w.double(), padding=1).float(), name="y")
    second.resize_(2 * second.numel()).fill_(1.0)
    assert second.sum().item() == second.numel()
    nbytes = second.untyped_storage().nbytes()
    del second
    assert mltoolkit._ext._C.release_reused_memory() >= nbytes  # the kept blocks, the one just freed among them
    with mltoolkit.backend("cpp"):
        ops.conv2d(x, w, padding=1)  # freed at once: one more block kept...
    mltoolkit.clear_caches()  # ...which clear_caches hands back
    assert mltoolkit._ext._C.release_reused_memory() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c,k,kernel,stride,hw,act,residual", [
    (3, 32, 3, 2, (37, 41), "silu", False),    # the RGB stem: filter rows read in place across whole blocks
    (24, 144, 1, 1, (13, 11), "relu6", True),  # 9 vectors of channels: panels of 3, 8-row register blocks
    (32, 16, 1, 1, (9, 9), "none", False),     # one vector of channels: 8 x 1 blocks
    (16, 96, 1, 1, (7, 5), "silu", True),
    (20, 64, 1, 1, (6, 7), "gelu", True),      # 6 x 4 blocks, erf in the epilogue
])
def test_cpu_register_blocks_and_whole_tile_epilogue(dtype, c, k, kernel, stride, hw, act, residual):
    """The CPU forward's register blocks (rows per block by panel width), its whole-tile epilogue (bias, residual,
    activation from the stored tile) and its fast pointer set-ups (1x1 stride 1, filter rows in place) against
    torch, pixel counts not a multiple of the block rows, channels_last (the layout that stores from the tiles)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, c, *hw, generator=g, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(k, c, kernel, kernel, generator=g, dtype=dtype) / (c * kernel * kernel) ** 0.5
    b = torch.randn(k, generator=g, dtype=dtype)
    pad = kernel // 2
    ref = F.conv2d(x, w, b, stride, pad)
    r = torch.randn(ref.shape, generator=g, dtype=dtype).to(memory_format=torch.channels_last) if residual else None
    want = TORCH_ACT[act](ref + r if residual else ref)
    with mltoolkit.backend("cpp"):
        got = torch.ops.mltoolkit.conv2d_fwd(x, w, b, [stride] * 2, [pad] * 2, [1, 1], 1, r, act)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, want)


def test_cpu_silu_epilogue_over_the_float_range():
    """The CPU epilogue's SiLU (a polynomial exp and a refined reciprocal for float32) against torch's in float64,
    from where exp(-x) overflows float32 to where it underflows (infinities would reach every channel of their
    pixel through the identity weight's zeros: test_epilogue_keeps_nan covers NaN)."""
    x = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 89.0, -89.0,
                                                                   103.9, -104.0, 3e38, -3e38])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 16)).reshape(1, -1, 1, 16).permute(0, 3, 2, 1)  # (1, 16, 1, n)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.eye(16).reshape(16, 16, 1, 1)
    with mltoolkit.backend("cpp"):
        got = torch.ops.mltoolkit.conv2d_fwd(x, w, None, [1, 1], [0, 0], [1, 1], 1, None, "silu")
    assert_close(got, torch.nn.functional.silu(x.double()).float())
