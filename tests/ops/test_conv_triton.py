"""The Triton convolution kernels (triton_kernels/conv.py) against the reference and F.conv2d: forward with every
epilogue, all three gradients, the weight gradient's split reduction, the stride phases of the input gradient, the
direct (C/groups == 1) kernels, opcheck, and the backend table's choices.

Each test runs on the CPU under TRITON_INTERPRET=1 (set by conftest without a GPU), on tiny shapes, and on CUDA
tensors where there is a GPU (marked cuda); the full grid of tests/ops/test_conv.py runs the Triton backend there
too. bfloat16 runs interpreted as well: the kernels take their bfloat16 dots through float32 there (the
interpreter's bfloat16 tl.dot is broken, see ENVIRONMENT.md).
"""
import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import NoBackendError, table
from mltoolkit.ops.reference.conv import ACTIVATIONS as TORCH_ACT  # torch's functions (hardswish written out)
from mltoolkit.testing import Sample, assert_close, check_op, triton_forced

ACTIVATIONS = list(TORCH_ACT)


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every test runs forced to the triton backend: on the CPU under the interpreter, or on a GPU."""
    with triton_forced("conv", request.param):
        yield request.param


def _kernels():
    from mltoolkit.triton_kernels import conv

    return conv


def _inputs(device, n, c, k, size, kernel, groups=1, dtype=torch.float32, channels_last=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *size, generator=g).to(device, dtype)
    w = (torch.randn(k, c // groups, *kernel, generator=g) * 0.5).to(device, dtype)
    b = torch.randn(k, generator=g).to(device, dtype) if bias else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    return x, w, b


# (n, c, k, (H, W), (R, S), stride, padding, dilation, groups, dtype, channels_last, bias)
CASES = {
    "1x1": (1, 8, 3, (5, 6), (1, 1), 1, 0, 1, 1, torch.float32, False, True),
    "3x3-s2-d2-nhwc": (2, 4, 6, (9, 8), (3, 3), 2, 2, 2, 1, torch.float32, True, True),
    "groups2-c20-fp16": (1, 40, 6, (5, 4), (3, 3), 1, 1, 1, 2, torch.float16, False, True),
    "depthwise-nhwc-fp16": (2, 6, 6, (7, 5), (3, 3), 1, 1, 1, 6, torch.float16, True, True),
    "depthwise-x2-s2": (2, 3, 6, (7, 9), (3, 3), 2, 1, 1, 3, torch.float32, False, False),
    "odd-batch1-5x3": (1, 3, 5, (11, 7), (5, 3), (2, 1), (2, 1), 1, 1, torch.float32, False, True),
    "even-c-nhwc-fp16": (2, 32, 16, (3, 4), (3, 3), 1, 1, 1, 1, torch.float16, True, False),
    "nhwc-bf16": (1, 16, 16, (4, 5), (3, 3), 1, 1, 1, 1, torch.bfloat16, True, True),
}


@pytest.mark.parametrize("name", CASES)
def test_conv2d_and_grads_match_torch(device, name):
    n, c, k, size, kernel, stride, padding, dilation, groups, dtype, channels_last, bias = CASES[name]
    x, w, b = _inputs(device, n, c, k, size, kernel, groups, dtype, channels_last, bias)
    leaves = tuple(t.requires_grad_(True) for t in (x, w, b) if t is not None)
    ours = lambda x, w, b=None: ops.conv2d(x, w, b, stride, padding, dilation, groups)
    ref = lambda x, w, b=None: F.conv2d(x, w, b, stride, padding, dilation, groups)
    check_op(ours, [Sample(leaves)], ref, gradcheck=False, opcheck=False, compile=False)
    y = ours(*leaves)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


def _epilogue_inputs(device, dtype, channels_last):
    x, w, b = _inputs(device, 2, 4, 6, (7, 6), (3, 3), dtype=dtype, channels_last=channels_last, seed=7)
    r = (torch.randn(2, 6, 4, 3, generator=torch.Generator().manual_seed(8)) * 2).to(device, dtype)
    if channels_last:
        r = r.to(memory_format=torch.channels_last)
    return x, w, b, r


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_epilogue_matches_torch(device, act):
    """y = act(conv + bias + residual) and the gradients of x, weight, bias and residual, alternating layouts."""
    x, w, b, r = _epilogue_inputs(device, torch.float32, channels_last=ACTIVATIONS.index(act) % 2 == 1)
    fwd = lambda x, w, b, r: torch.ops.mltoolkit.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, r, act)
    ref = lambda x, w, b, r: TORCH_ACT[act](F.conv2d(x, w, b, 2, 1) + r)
    check_op(fwd, [Sample(tuple(t.requires_grad_(True) for t in (x, w, b, r)))], ref, gradcheck=False,
             opcheck=False, compile=False)


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "direct"])
def test_relu_keeps_nan(device, groups):
    """A NaN stays NaN through the relu epilogue (F.relu's semantics), in the GEMM and the direct kernels."""
    x, w, b, r = _epilogue_inputs(device, torch.float32, channels_last=True)
    x = x.clone()
    x[0, 0, 2, 2] = float("nan")
    if groups > 1:  # depthwise: one input channel per group
        w, b = w[:groups, :1].contiguous(), b[:groups]
    y = torch.ops.mltoolkit.conv2d_fwd(x, w, b, [1, 1], [1, 1], [1, 1], groups, None, "relu")
    want = F.relu(F.conv2d(x, w, b, 1, 1, 1, groups))
    assert torch.isnan(want).any() and torch.equal(torch.isnan(y), torch.isnan(want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_epilogue_half(device, dtype):
    """Residual and gelu in a 16-bit type: accumulated in float32, rounded once (to nearest even) at the store."""
    x, w, b, r = _epilogue_inputs(device, dtype, channels_last=True)
    y = torch.ops.mltoolkit.conv2d_fwd(x, w, b, [2, 2], [1, 1], [1, 1], 1, r, "gelu")
    expected = F.gelu(F.conv2d(x.float(), w.float(), b.float(), 2, 1) + r.float())
    assert_close(y, expected, dtype=dtype)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "direct"])
def test_weight_grad_split_reduction(device, monkeypatch, groups):
    """With few rows per program the N*P*Q reduction of dweight is split over programs (partial sums added in a
    fixed order afterwards): same result, and the same bits on a second run."""
    kernels = _kernels()
    monkeypatch.setattr(kernels, "SPLIT_ROWS", 5)
    x, w, _ = _inputs(device, 2, 4, 8, (6, 7), (3, 3), groups)
    dy = torch.randn(2, 8, 6, 7, device=device)
    args = ([1, 1], [1, 1], [1, 1], groups, [False, True, False])
    _, dw, _ = kernels.conv2d_backward(dy, x, w, *args)
    expected = torch.nn.grad.conv2d_weight(x.double(), list(w.shape), dy.double(), 1, 1, 1, groups)
    assert_close(dw, expected, atol=1e-4)
    assert torch.equal(dw, kernels.conv2d_backward(dy, x, w, *args)[1])
    assert kernels._splits(2 * 6 * 7, 1, 1, x.device) > 1


@pytest.mark.parametrize("stride,dilation,padding,kernel", [
    ((3, 2), (2, 1), (2, 0), (3, 2)),   # phases whose taps are sparse (r in steps), and a phase with none in w
    ((2, 2), (1, 1), (0, 0), (1, 1)),   # 1x1 stride 2: three of four phases get no tap (dx = 0 there)
    ((4, 1), (1, 1), (1, 1), (3, 3)),   # stride above the kernel height
])
def test_input_grad_stride_phases(device, stride, dilation, padding, kernel):
    x, w, _ = _inputs(device, 2, 4, 6, (9, 7), kernel, channels_last=True, bias=False)
    p = (9 + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    q = (7 + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    dy = torch.randn(2, 6, p, q, device=device)
    dx, _, db = _kernels().conv2d_backward(dy, x, w, list(stride), list(padding), list(dilation), 1,
                                           [True, False, True])
    expected = torch.nn.grad.conv2d_input(list(x.shape), w.double(), dy.double(), stride, padding, dilation)
    assert_close(dx, expected)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert_close(db, dy.double().sum((0, 2, 3)))


def test_expanded_gradient_and_partial_mask(device):
    """dy arriving expanded (stride 0, from .sum().backward()) and only some gradients asked for."""
    x, w, b = _inputs(device, 1, 4, 4, (6, 5), (3, 3), channels_last=True)
    x.requires_grad_(True)
    y = ops.conv2d(x, w, b, padding=1)
    (dx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (dx2,) = torch.autograd.grad(F.conv2d(x2, w, b, padding=1).sum(), x2)
    assert_close(dx, dx2, atol=1e-4)
    dx, dw, db = _kernels().conv2d_backward(torch.ones(1, 4, 6, 5, device=device).expand(1, 4, 6, 5), x.detach(),
                                            w, [1, 1], [1, 1], [1, 1], 1, [False, True, False])
    assert dx is None and db is None and dw.shape == w.shape


def test_opcheck(device):
    x, w, b = _inputs(device, 1, 4, 4, (5, 4), (3, 3), groups=2)
    r = torch.randn(1, 4, 3, 2, device=device)
    torch.library.opcheck(torch.ops.mltoolkit.conv2d_fwd, (x, w, b, [2, 2], [1, 1], [1, 1], 2, r, "silu"))
    dy = torch.randn(1, 4, 3, 2, device=device)
    torch.library.opcheck(torch.ops.mltoolkit.conv2d_bwd, (dy, x, w, [2, 2], [1, 1], [1, 1], 2, [True, True, True]))


def test_backend_table(device):
    """float64 is declined (a forced triton names the reason); on the CPU triton runs only when forced."""
    x, w, _ = _inputs(device, 1, 2, 2, (4, 4), (3, 3), dtype=torch.float64)
    with pytest.raises(NoBackendError, match="triton.*float64"):
        ops.conv2d(x, w)
    if device == "cpu":
        x, w, _ = _inputs(device, 1, 2, 2, (4, 4), (3, 3))
        with mltoolkit.backend(None):
            assert table("conv").select(x).name != "triton"


def test_bad_input(device):
    conv = _kernels()
    x, w, b = _inputs(device, 1, 4, 4, (5, 5), (3, 3))
    args = ([1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="activation"):
        conv.conv2d_forward(x, w, b, *args, None, "tanh")
    with pytest.raises(ValueError, match="residual must have shape"):
        conv.conv2d_forward(x, w, b, *args, torch.randn(1, 4, 4, 5, device=device), "none")
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        conv.conv2d_forward(x, w, b.half(), *args, None, "none")
    with pytest.raises(TypeError, match="no torch.float64 variant"):
        conv.conv2d_forward(x.double(), w.double(), None, *args, None, "none")
    with pytest.raises(ValueError, match="weight.shape\\[1\\]"):
        conv.conv2d_forward(x, w[:, :2], None, *args, None, "none")
    with pytest.raises(ValueError, match="output size"):
        conv.conv2d_forward(x, w, None, [1, 1], [0, 0], [3, 3], 1, None, "none")
    with pytest.raises(ValueError, match="dy must have shape"):
        conv.conv2d_backward(torch.randn(1, 4, 4, 4, device=device), x, w, *args, [True, True, True])
    with pytest.raises(TypeError, match="output_mask"):
        conv.conv2d_backward(torch.randn(1, 4, 5, 5, device=device), x, w, *args, [True, True])
