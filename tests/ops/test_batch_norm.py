"""ops.batch_norm_act = act(F.batch_norm(x) + residual) on every backend against torch in the oracle dtype
(float64 for float32 inputs): outputs, all gradients, running statistics, opcheck, compile(fullgraph=True) with the
running-stat mutation, and bad input. Triton runs under the interpreter on the CPU (tiny shapes, float32 and
float16)."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import _ext, ops
from mltoolkit.backends import table
from mltoolkit.ops.reference.conv import ACTIVATIONS as TORCH_ACT  # torch's functions (hardswish written out)
from mltoolkit.testing import (
    PassThroughMode,
    Sample,
    assert_close,
    assert_close_flash,
    check_op,
    oracle_dtype,
    tolerance,
)

CPU_BACKENDS = ["cpp", "reference", "triton"]
CUDA_BACKENDS = ["triton", "reference"]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in CUDA_BACKENDS]
ACTIVATIONS = list(TORCH_ACT)
EPS = 1e-5


def interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def skip_unavailable(backend, device="cpu"):
    why = table("batch_norm").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if interpreted(device, backend) and not _ext.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")


# ---- the torch oracle -------------------------------------------------------------------------------------------

def torch_bn_act(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=EPS, activation="none",
                 residual=None):
    """What the eager sequence computes: F.batch_norm, the residual add, the activation."""
    if weight is None and bias is not None and x.is_cuda:
        # torch's CUDA batch-norm backward fails ("tensor does not have a device") for a bias without a weight;
        # a weight of ones computes the same thing.
        weight = torch.ones_like(bias)
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return TORCH_ACT[activation](z)


# name: (shape, memory format). 2-D, 3-D, 4-D in both layouts, 5-D channels_last_3d, odd sizes.
LAYOUTS = {
    "2d": ((7, 5), None),
    "3d": ((3, 4, 9), None),
    "nchw": ((2, 5, 6, 7), None),
    "nhwc": ((2, 5, 6, 7), torch.channels_last),
    "ndhwc": ((2, 3, 3, 4, 5), torch.channels_last_3d),
}
# The Triton interpreter is slow: fewer layouts there, one dtype each.
INTERPRETED_CASES = [("2d", torch.float32), ("3d", torch.float16), ("nchw", torch.float32),
                     ("nhwc", torch.float16)]


def make_inputs(shape, fmt, dtype, device, *, affine=True, residual=False, running=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 1.5 + 0.7).to(device=device, dtype=dtype)
    r = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if residual else None
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
        r = None if r is None else r.contiguous(memory_format=fmt)
    w = torch.randn(c, generator=g).to(device=device, dtype=dtype) if affine else None
    b = torch.randn(c, generator=g).to(device=device, dtype=dtype) if affine else None
    rm = (torch.randn(c, generator=g) * 0.5).to(device=device, dtype=dtype) if running else None
    rv = (torch.rand(c, generator=g) + 0.5).to(device=device, dtype=dtype) if running else None
    return x, w, b, r, rm, rv


def compare(x, w, b, r, rm, rv, training, activation, backend, momentum=0.1, **check_kw):
    """Outputs and gradients (check_op against the oracle on upcast copies), then the running stats after one
    step against torch's, computed in the oracle dtype."""
    rm_ours = None if rm is None else rm.clone()
    rv_ours = None if rv is None else rv.clone()

    def ours(x, w, b, r):
        return ops.batch_norm_act(x, w, b, rm_ours, rv_ours, training, momentum, EPS, activation, r)

    def oracle(x, w, b, r):
        # Copies: check_op calls this more than once; the running stats are compared below.
        stats = [None if s is None else s.to(x.dtype, copy=True) for s in (rm, rv)]
        return torch_bn_act(x, w, b, *stats, training, momentum, EPS, activation, r)

    leaves = tuple(None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b, r))
    with mltoolkit.backend(backend):
        check_op(ours, [Sample(leaves)], oracle, **{"gradcheck": False, "opcheck": False, "compile": False,
                                                    **check_kw})
    if rm is not None and training:
        rm_ours.copy_(rm)
        rv_ours.copy_(rv)
        with mltoolkit.backend(backend):
            ours(x, w, b, r)
        up = oracle_dtype(x.dtype)
        rm_ref, rv_ref = rm.to(up), rv.to(up)
        torch_bn_act(x.to(up), *(None if t is None else t.to(up) for t in (w, b)), rm_ref, rv_ref, True, momentum,
                     EPS, activation, None if r is None else r.to(up))
        assert_close(rm_ours, rm_ref, dtype=rm.dtype, name="running_mean")
        assert_close(rv_ours, rv_ref, dtype=rv.dtype, name="running_var")


# ---- every activation, mode, residual, layout and dtype -----------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_matches_torch(device, backend, activation, training, residual):
    skip_unavailable(backend, device)
    if interpreted(device, backend):
        cases = INTERPRETED_CASES
    else:
        cases = [(name, dtype) for name in LAYOUTS for dtype in (torch.float32, torch.float16, torch.bfloat16)]
    for name, dtype in cases:
        shape, fmt = LAYOUTS[name]
        x, w, b, r, rm, rv = make_inputs(shape, fmt, dtype, device, residual=residual, seed=len(name))
        compare(x, w, b, r, rm, rv, training, activation, backend)
        with mltoolkit.backend(backend):
            y = ops.batch_norm_act(x, w, b, rm, rv, training, activation=activation, residual=r)
        assert y.dtype == dtype and y.stride() == x.stride(), f"{name}: output strides {y.stride()} vs {x.stride()}"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("affine,running,training", [
    (False, True, True), (False, True, False), (True, False, True), (False, False, True)],
    ids=["no-affine-train", "no-affine-eval", "no-running-train", "bare-train"])
def test_optional_params(device, backend, affine, running, training):
    """weight/bias None (affine=False) and running stats None (batch stats, nothing updated)."""
    skip_unavailable(backend, device)
    x, w, b, r, rm, rv = make_inputs((3, 4, 5, 6), torch.channels_last, torch.float32, device, affine=affine,
                                     residual=True, running=running)
    compare(x, w, b, r, rm, rv, training, "silu", backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_one_of_weight_and_bias(device, backend):
    skip_unavailable(backend, device)
    x, w, b, _, rm, rv = make_inputs((4, 3, 5), None, torch.float32, device)
    compare(x, w, None, None, rm, rv, True, "gelu", backend)
    compare(x, None, b, None, rm, rv, True, "relu", backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", [
    ("nchw", True, "relu", True), ("nhwc", True, "gelu_tanh", False), ("3d", False, "silu", True),
    ("2d", True, "hardswish", False), ("ndhwc", False, "relu6", True)], ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_opcheck_compile(device, backend, case):
    """fp64 gradcheck (through the batch statistics in training), opcheck of the forward op (running-stat mutation
    included) and compile(fullgraph=True)."""
    skip_unavailable(backend, device)
    name, training, activation, residual = case
    shape, fmt = LAYOUTS[name]
    if interpreted(device, backend):  # gradcheck calls the op twice per input element: batch and channels of at
        shape = tuple(min(s, 3 if i < 2 else 2) for i, s in enumerate(shape))  # most 3, spatial sizes of at most 2
    x, w, b, r, rm, rv = make_inputs(shape, fmt, torch.float64, device, residual=residual)
    compare(x, w, b, r, rm, rv, training, activation, backend, gradcheck=True, opcheck=True,
            compile=not interpreted(device, backend) or name == "nhwc")


# ---- running statistics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name,dtype,stat_dtype", [
    ("nchw", torch.float32, torch.float32), ("nhwc", torch.float32, torch.float32),
    ("nhwc", torch.float16, torch.float32), ("3d", torch.bfloat16, torch.bfloat16)],
    ids=["nchw-fp32", "nhwc-fp32", "nhwc-fp16-fp32stats", "3d-bf16"])
def test_running_stats_several_steps(device, backend, name, dtype, stat_dtype):
    """Five training steps (momentum 0.3) leave running_mean / running_var where torch's leave them (unbiased
    variance), then eval uses them."""
    skip_unavailable(backend, device)
    if interpreted(device, backend) and dtype == torch.bfloat16:
        pytest.skip("interpreted Triton is tested in float32 and float16")
    shape, fmt = LAYOUTS[name]
    c = shape[1]
    rm, rv = torch.zeros(c, device=device, dtype=stat_dtype), torch.ones(c, device=device, dtype=stat_dtype)
    up = oracle_dtype(dtype)
    rm_ref, rv_ref = rm.to(up), rv.to(up)
    w, b = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
    for step in range(5):
        x = make_inputs(shape, fmt, dtype, device, seed=step)[0] * (step + 1) + step
        with mltoolkit.backend(backend):
            ops.batch_norm_act(x, w, b, rm, rv, True, 0.3, EPS, "relu")
        torch_bn_act(x.to(up), w.to(up), b.to(up), rm_ref, rv_ref, True, 0.3, EPS, "relu")
    assert_close(rm, rm_ref, dtype=stat_dtype, name="running_mean")
    assert_close(rv, rv_ref, dtype=stat_dtype, atol=tolerance(stat_dtype)[0] * rv_ref.abs().max().item(),
                 name="running_var")
    x = make_inputs(shape, fmt, dtype, device, seed=9)[0]
    with mltoolkit.backend(backend):
        y = ops.batch_norm_act(x, w, b, rm, rv, False, activation="relu")
    assert_close(y, torch_bn_act(x.to(up), w.to(up), b.to(up), rm.to(up), rv.to(up), False, activation="relu"),
                 dtype=dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_running_stats_version_bump_and_eval_untouched(device, backend):
    skip_unavailable(backend, device)
    x, w, b, _, rm, rv = make_inputs((4, 3, 5), None, torch.float32, device)
    versions = (rm._version, rv._version)
    before = (rm.clone(), rv.clone())
    with mltoolkit.backend(backend):
        ops.batch_norm_act(x, w, b, rm, rv, False)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    with mltoolkit.backend(backend):
        ops.batch_norm_act(x, w, b, rm, rv, True)
    assert rm._version > versions[0] and rv._version > versions[1]
    assert not torch.equal(rm, before[0])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_eager_fast_path_matches_registered_op(device, backend):
    """Plain eager calls skip the op dispatch (_EagerBatchNormAct); any active mode takes the registered op. Both
    must agree bit for bit: output, gradients of input, weight, bias and residual, running stats and versions."""
    skip_unavailable(backend, device)
    x, w, b, r, rm, rv = make_inputs((4, 3, 5), None, torch.float32, device, residual=True)
    results = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, r)]
        stats = [rm.clone(), rv.clone()]
        with mltoolkit.backend(backend), mode:
            y = ops.batch_norm_act(leaves[0], leaves[1], leaves[2], *stats, True, 0.1, EPS, "silu", leaves[3])
            grads = torch.autograd.grad(y, leaves, torch.ones_like(y) * 0.5)
        assert all(s._version > 0 for s in stats)
        results.append((type(y.grad_fn).__name__, [y, *grads, *stats]))
    (fast_fn, fast), (op_fn, op) = results
    assert "EagerBatchNormAct" in fast_fn and "EagerBatchNormAct" not in op_fn, (fast_fn, op_fn)
    for a, b_ in zip(fast, op):
        assert torch.equal(a, b_)


# ---- compile: a BN + residual + relu block trained for a few steps -----------------------------------------------

class _Block(torch.nn.Module):
    """The ResNet tail act(bn(x) + shortcut), with nn.BatchNorm2d's parameters and buffers."""

    def __init__(self, c, ours, activation="relu"):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(c, momentum=0.2)
        self.ours, self.activation = ours, activation

    def forward(self, x, shortcut):
        if self.ours:
            return ops.batch_norm_act(x, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var,
                                      self.training, self.bn.momentum, self.bn.eps, self.activation, shortcut)
        return TORCH_ACT[self.activation](self.bn(x) + shortcut)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compile_training_steps_with_running_stats(device, backend, channels_last):
    """torch.compile(fullgraph=True) of the block: three training steps (outputs, grads, running stats, the
    mutation included in the graph) and eval, against eager torch."""
    skip_unavailable(backend, device)
    if interpreted(device, backend) and not channels_last:
        pytest.skip("one layout under the interpreter")
    torch._dynamo.reset()
    ours, ref = _Block(4, True).to(device), _Block(4, False).to(device)
    with torch.no_grad():
        for m in (ours, ref):
            m.bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
            m.bn.bias.copy_(torch.linspace(-0.2, 0.3, 4))
    compiled = torch.compile(ours, fullgraph=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(3, 4, 5, 6, device=device) * 2 + step).contiguous(memory_format=fmt)
        s = torch.randn(3, 4, 5, 6, device=device).contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with mltoolkit.backend(backend):
            ya = compiled(xa, s)
            ga = torch.autograd.grad(ya.square().sum(), (xa, ours.bn.weight, ours.bn.bias))
        yb = ref(xb, s)
        gb = torch.autograd.grad(yb.square().sum(), (xb, ref.bn.weight, ref.bn.bias))
        assert_close(ya, yb, atol=1e-4, name=f"step {step} y")
        for a, e, name in zip(ga, gb, ("dx", "dweight", "dbias")):
            assert_close(a, e, atol=1e-4 * max(1.0, e.abs().max().item()), name=f"step {step} {name}")
        assert_close(ours.bn.running_mean, ref.bn.running_mean, atol=1e-5, name=f"step {step} running_mean")
        assert_close(ours.bn.running_var, ref.bn.running_var, atol=1e-5, name=f"step {step} running_var")
    ours.eval()
    ref.eval()
    x = torch.randn(2, 4, 5, 6, device=device).contiguous(memory_format=fmt)
    s = torch.randn(2, 4, 5, 6, device=device).contiguous(memory_format=fmt)
    with mltoolkit.backend(backend):
        y = torch.compile(ours, fullgraph=True)(x, s)
    assert_close(y, ref(x, s), atol=1e-5, name="eval")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_dynamic_shapes(device, backend):
    """One dynamic graph serves several batch and image sizes (and a recompile the other layout), running stats
    included."""
    skip_unavailable(backend, device)
    if interpreted(device, backend):
        pytest.skip("covered by the static compile tests under the interpreter")
    torch._dynamo.reset()
    w = torch.randn(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    compiled = torch.compile(lambda x, r: ops.batch_norm_act(x, w, b, rm, rv, True, 0.1, EPS, "gelu", r),
                             fullgraph=True, dynamic=True)
    for shape, fmt in (((2, 4, 9, 11), None), ((3, 4, 7, 6), torch.channels_last), ((5, 4, 3, 2), None)):
        x, _, _, r, _, _ = make_inputs(shape, fmt, torch.float32, device, residual=True)
        x.requires_grad_(True)
        with mltoolkit.backend(backend):
            y = compiled(x, r)
            g = torch.autograd.grad(y.square().sum(), (x, w, b))
        y_ref = torch_bn_act(x, w, b, rm_ref, rv_ref, True, 0.1, EPS, "gelu", r)
        g_ref = torch.autograd.grad(y_ref.square().sum(), (x, w, b))
        assert y.stride() == y_ref.stride()
        assert_close(y, y_ref, atol=1e-5)
        for a, e, name in zip(g, g_ref, ("dx", "dw", "db")):
            assert_close(a, e, atol=1e-4 * max(1.0, e.abs().max().item()), name=name)
        assert_close(rm, rm_ref, name="running_mean")
        assert_close(rv, rv_ref, name="running_var")


# ---- the registered ops directly ------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_ops(device, backend):
    skip_unavailable(backend, device)
    fwd, bwd = torch.ops.mltoolkit.batch_norm_act_fwd, torch.ops.mltoolkit.batch_norm_act_bwd
    for fmt in (None, torch.channels_last):
        x, w, b, r, rm, rv = make_inputs((2, 3, 4, 5), fmt, torch.float32, device, residual=True)
        with mltoolkit.backend(backend):
            torch.library.opcheck(fwd, (x, w, b, rm, rv, True, 0.1, EPS, "silu", r))
            torch.library.opcheck(fwd, (x, w, b, rm, rv, False, 0.1, EPS, "relu", None))
            torch.library.opcheck(fwd, (x, None, None, None, None, True, 0.1, EPS, "none", None))
            _, mean, invstd = fwd(x, w, b, rm, rv, True, 0.1, EPS, "gelu", r)
            dy = torch.randn_like(x)
            for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, False],
                         [False, False, False, True]):
                torch.library.opcheck(bwd, (dy, x, w, b, mean, invstd, r, True, "gelu", mask))
            torch.library.opcheck(bwd, (dy, x, None, None, mean, invstd, None, False, "relu6",
                                        [True, True, True, False]))


# ---- numerics, layouts and corner cases -------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_is_stable(device, backend, channels_last):
    """|mean| >> std: a one-pass sum(x^2) - M mean^2 variance would lose every digit here. invstd must match the
    float64 one closely; y cannot (the float32 mean itself is off by up to half an ulp of 1e4, 3% of std), so it
    is held to torch's own float32 error (the flash-attention rule)."""
    skip_unavailable(backend, device)
    shape = (2, 3, 5, 6) if interpreted(device, backend) else (4, 3, 40, 41)
    x, w, b, _, _, _ = make_inputs(shape, torch.channels_last if channels_last else None, torch.float32, device)
    x = (x - 0.7) * 1e-2 + 1e4  # std ~0.015
    with mltoolkit.backend(backend):
        y, mean, invstd = torch.ops.mltoolkit.batch_norm_act_fwd(x, w, b, None, None, True, 0.1, EPS, "none", None)
    var64, mean64 = torch.var_mean(x.double(), [0, 2, 3], correction=0)
    assert_close(invstd, (var64 + EPS).rsqrt(), atol=0, rtol=1e-4, name="invstd")
    assert_close(mean, mean64, atol=5e-4, rtol=0, name="mean")  # half an ulp of float32 at 1e4 is 4.9e-4
    y64 = torch_bn_act(x.double(), w.double(), b.double(), None, None, True)
    assert_close_flash(y, y64, torch_bn_act(x, w, b, None, None, True))


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_many_blocks(backend, dtype, channels_last):
    """Shapes that split each channel's reduction into several blocks (merged with Chan's formula) and across
    threads: NCHW rows of 4160 values, 8 images; NHWC 33280 rows of 3 channels."""
    skip_unavailable(backend)
    x, w, b, r, rm, rv = make_inputs((8, 3, 64, 65), torch.channels_last if channels_last else None, dtype, "cpu",
                                     residual=True)
    compare(x, w, b, r, rm, rv, True, "relu", backend)


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_same_bits_for_any_thread_count(backend, channels_last):
    skip_unavailable(backend)
    x, w, b, r, rm, rv = make_inputs((8, 6, 33, 35), torch.channels_last if channels_last else None, torch.float32,
                                     "cpu", residual=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, r)]
            stats = [rm.clone(), rv.clone()]
            with mltoolkit.backend(backend):
                y = ops.batch_norm_act(leaves[0], leaves[1], leaves[2], *stats, True, 0.1, EPS, "gelu", leaves[3])
                grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
            results.append([y, *grads, *stats])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_batch(device, backend):
    """N = 0, as torch: empty output, running stats untouched, zero parameter gradients."""
    skip_unavailable(backend, device)
    x, w, b, _, rm, rv = make_inputs((0, 3, 4, 4), None, torch.float32, device)
    before = (rm.clone(), rv.clone())
    w.requires_grad_(True)
    b.requires_grad_(True)
    with mltoolkit.backend(backend):
        y = ops.batch_norm_act(x.requires_grad_(True), w, b, rm, rv, True, activation="relu")
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert y.shape == x.shape and gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_input_and_expanded_grad(device, backend):
    skip_unavailable(backend, device)
    base = torch.randn(5, 4, 3, 6, device=device)
    x = base.permute(2, 1, 0, 3)[:, :, ::2]  # (3, 4, 3, 6), neither layout
    w = torch.randn(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    xa, xb = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    with mltoolkit.backend(backend):
        y = ops.batch_norm_act(xa, w, b, None, None, True, activation="silu")
        ga = torch.autograd.grad(y.sum(), (xa, w, b))  # dy arrives expanded: stride 0
    yb = torch_bn_act(xb, w, b, None, None, True, activation="silu")
    gb = torch.autograd.grad(yb.sum(), (xb, w, b))
    assert y.is_contiguous()
    assert_close(y, yb, atol=1e-5)
    for a, e, name in zip(ga, gb, ("dx", "dw", "db")):
        assert_close(a, e, atol=1e-4, name=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mixed_precision_params(device, backend):
    """bf16 activations with float32 weight, bias and running stats (as under autocast): output bf16, parameter
    gradients float32 (to bf16 accuracy: dy is bf16), running stats updated in float32."""
    skip_unavailable(backend, device)
    if interpreted(device, backend):
        pytest.skip("interpreted Triton is tested in float32 and float16")
    x, _, _, r, _, _ = make_inputs((4, 6, 5, 5), torch.channels_last, torch.bfloat16, device, residual=True)
    _, w, b, _, rm, rv = make_inputs((4, 6, 5, 5), None, torch.float32, device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    with mltoolkit.backend(backend):
        y = ops.batch_norm_act(*leaves, rm, rv, True, 0.1, EPS, "hardswish", r)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in (x, w, b)]
    y_ref = torch_bn_act(*ref_leaves, rm_ref, rv_ref, True, 0.1, EPS, "hardswish", r.float())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, dtype=torch.bfloat16)
    assert_close(rm, rm_ref, name="running_mean")
    assert_close(rv, rv_ref, name="running_var")
    dy = torch.randn_like(y)
    with mltoolkit.backend(backend):
        grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.float())
    for g, e, leaf, name in zip(grads, ref_grads, leaves, ("dx", "dweight", "dbias")):
        assert g.dtype == leaf.dtype, name
        assert_close(g, e, dtype=torch.bfloat16, atol=2e-2 * max(1.0, e.abs().max().item()), name=name)


def test_default_cpu_backend_is_cpp():
    if table("batch_norm").get("cpp").available() is not None:
        pytest.skip("C++ extension not built")
    assert table("batch_norm").select(torch.randn(2, 3)).name == "cpp"


def test_double_backward_is_an_error():
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = ops.batch_norm_act(x, None, None, None, None, True, activation="silu")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


# ---- bad input ------------------------------------------------------------------------------------------------

def _bad(**kw):
    x, w, b, _, rm, rv = make_inputs((2, 3, 4, 4), None, torch.float32, "cpu")
    args = dict(input=x, weight=w, bias=b, running_mean=rm, running_var=rv, training=True)
    args.update(kw)
    return lambda: ops.batch_norm_act(**args)


BAD = [
    (_bad(training=False, running_mean=None, running_var=None), ValueError, "must be given in evaluation mode"),
    (_bad(running_var=None), ValueError, "running_mean and running_var must both be given"),
    (_bad(input=torch.randn(1, 3, 1, 1)), ValueError, "Expected more than 1 value per channel when training"),
    (_bad(input=torch.randn(1, 3)), ValueError, "Expected more than 1 value per channel when training"),
    (_bad(input=torch.randn(3)), ValueError, "input must be \\(N, C, \\*\\)"),
    (_bad(input=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "input must be float32"),
    (_bad(weight=torch.randn(4)), ValueError, "weight must have shape \\(C,\\) = \\(3,\\)"),
    (_bad(bias=torch.randn(3, 1)), ValueError, "bias must have shape"),
    (_bad(weight=torch.ones(3, dtype=torch.int32)), TypeError, "weight must be"),
    (_bad(running_mean=torch.zeros(3, dtype=torch.float64)), TypeError, "running_mean must be"),
    (_bad(running_var=torch.ones(5)), ValueError, "running_var must have shape"),
    (_bad(residual=torch.randn(2, 3, 4, 5)), ValueError, "residual must have input's shape"),
    (_bad(residual=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "residual must have input's dtype"),
    (_bad(activation="tanh"), ValueError, "activation must be one of"),
    (_bad(momentum=math.nan), ValueError, "momentum must be a finite float"),
    (_bad(eps=-1.0), ValueError, "eps must be >= 0"),
    (_bad(training=1), TypeError, "training must be a bool"),
    (_bad(weight=torch.randn(3, device="meta")), ValueError, "weight is on meta"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kernels_reject_bad_raw_input(device, backend):
    """The kernels behind the registered ops check what the public function would, naming the argument."""
    skip_unavailable(backend, device)
    kernels = table("batch_norm").get(backend).kernels
    x = torch.randn(2, 3, 4, 5, device=device)
    bad = [
        (lambda: kernels["forward"](x[..., ::2], None, None, None, None, True, 0.1, EPS, "none", None), r"\bx\b"),
        (lambda: kernels["forward"](x, torch.randn(4, device=device), None, None, None, True, 0.1, EPS, "none",
                                    None), "weight"),
        (lambda: kernels["forward"](x, None, None, None, None, False, 0.1, EPS, "none", None), "running_mean"),
        (lambda: kernels["forward"](x, None, None, None, None, True, 0.1, EPS, "swish", None), "activation"),
        (lambda: kernels["forward"](x, None, None, None, None, True, 0.1, EPS, "none",
                                    x.contiguous(memory_format=torch.channels_last)), "residual"),
    ]
    if backend == "reference":  # plain torch: only what it needs to decide
        bad = [bad[2], bad[3]]
    for call, name in bad:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
            call()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_relu_keeps_nan(device, backend):
    """Eval mode: a NaN input element stays NaN through relu (F.relu's semantics), the others are unaffected."""
    skip_unavailable(backend, device)
    x, w, b, _, rm, rv = make_inputs((4, 3, 5), None, torch.float32, device)
    x[1, 2, 3] = float("nan")
    with mltoolkit.backend(backend):
        y = ops.batch_norm_act(x, w, b, rm, rv, False, activation="relu")
    assert torch.equal(torch.isnan(y), torch.isnan(x))
