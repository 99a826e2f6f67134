"""LayerNorm / RMSNorm (plain and fused residual add) on every backend against the fp32 reference."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import _ext, ops
from mltoolkit.backends import NoBackendError, table
from mltoolkit.ops.reference import norm as ref
from mltoolkit.testing import PassThroughMode, Sample, assert_close, check_op, outputs

CPU_BACKENDS = ["cpp", "reference", "triton"]
CUDA_BACKENDS = ["cuda", "triton", "reference"]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in CUDA_BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KINDS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


def interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def skip_unavailable(backend, device="cpu"):
    why = table("norm").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if interpreted(device, backend) and not _ext.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")


def make_case(kind, shape, dtype, device, affine=True, bias=True):
    """Returns (fn, reference, args): args are leaf tensors requiring grad."""
    width = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    w = (torch.randn(width, dtype=dtype, device=device) if affine else None)
    b = (torch.randn(width, dtype=dtype, device=device) if bias else None)
    r = torch.randn(shape, dtype=dtype, device=device)
    leaves = lambda *ts: tuple(t.requires_grad_(True) if t is not None else None for t in ts)
    # ours takes torch's default RMS eps (finfo of the input dtype); the reference runs on upcast copies.
    eps = torch.finfo(dtype).eps
    if kind == "layer_norm":
        return (lambda x, w, b: ops.layer_norm(x, (width,), w, b), lambda x, w, b: ref.layer_norm(x, (width,), w, b),
                leaves(x, w, b))
    if kind == "rms_norm":
        return (lambda x, w: ops.rms_norm(x, (width,), w), lambda x, w: ref.rms_norm(x, (width,), w, eps), leaves(x, w))
    if kind == "add_layer_norm":
        return (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, normalized_shape=(width,)),
                lambda x, r, w, b: ref.add_layer_norm(x, r, w, b, normalized_shape=(width,), sum_dtype=dtype),
                leaves(x, r, w, b))
    return (lambda x, r, w: ops.add_rms_norm(x, r, w, normalized_shape=(width,)),
            lambda x, r, w: ref.add_rms_norm(x, r, w, eps, normalized_shape=(width,), sum_dtype=dtype),
            leaves(x, r, w))


def compare(fn, reference, args, backend):
    """Outputs and all gradients (random cotangents) against the reference on upcast copies."""
    with mltoolkit.backend(backend):
        check_op(fn, [Sample(tuple(args))], reference, gradcheck=False, opcheck=False, compile=False)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, backend, kind, dtype):
    skip_unavailable(backend, device)
    widths = [1, 7, 97, 123, 1025] if interpreted(device, backend) else [1, 7, 97, 123, 1025, 4096]
    rows = [(1,), (3,), (2, 9)] if interpreted(device, backend) else [(1,), (3,), (4, 65)]
    for width in widths:
        for lead in rows:
            fn, reference, args = make_case(kind, (*lead, width), dtype, device)
            compare(fn, reference, args, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine,bias", [(False, False), (True, False), (False, True)])
def test_optional_weight_and_bias(device, backend, kind, affine, bias):
    skip_unavailable(backend, device)
    if "rms" in kind and bias and not affine:
        pytest.skip("rms norm has no bias")
    fn, reference, args = make_case(kind, (5, 33), torch.float32, device, affine=affine, bias=bias)
    compare(fn, reference, args, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer_norm", "add_rms_norm"])
def test_wide_rows(device, backend, kind, monkeypatch):
    """Rows wider than one block: 65536 on compiled backends; the Triton looped path forced on a small width."""
    skip_unavailable(backend, device)
    if interpreted(device, backend):
        from mltoolkit.triton_kernels import norm as triton_norm
        monkeypatch.setattr(triton_norm, "LOOP_THRESHOLD", 64)
        shape = (3, 300)
    else:
        shape = (3, 65536)
    fn, reference, args = make_case(kind, shape, torch.float32, device)
    compare(fn, reference, args, backend)
    fn, reference, args = make_case(kind, shape, torch.bfloat16, device)
    compare(fn, reference, args, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_input_and_expanded_grad(device, backend):
    skip_unavailable(backend, device)
    base = torch.randn(24, 10, 6, device=device)
    x = base.transpose(0, 1)[:, ::2].requires_grad_(False)  # (10, 12, 6), strided
    assert not x.is_contiguous()
    x = x.detach().requires_grad_(True)
    w = torch.randn(6, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    with mltoolkit.backend(backend):
        y = ops.layer_norm(x, (6,), w, b)
        y.sum().backward()  # dy arrives expanded: stride 0
    x2 = x.detach().clone().requires_grad_(True)
    w2, b2 = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y2 = F.layer_norm(x2, (6,), w2, b2)
    y2.sum().backward()
    assert_close(y, y2)
    for g, g2, name in ((x.grad, x2.grad, "dx"), (w.grad, w2.grad, "dw"), (b.grad, b2.grad, "db")):
        assert_close(g, g2, name=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_multi_dim_normalized_shape(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    w = torch.randn(4, 5, device=device, requires_grad=True)
    with mltoolkit.backend(backend):
        y = ops.rms_norm(x, (4, 5), w, eps=1e-6)
    assert_close(y, F.rms_norm(x, (4, 5), w, eps=1e-6))
    with mltoolkit.backend(backend):
        y = ops.layer_norm(x, [3, 4, 5])
    assert_close(y, F.layer_norm(x, [3, 4, 5]))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mixed_precision_weight(device, backend):
    """bf16 activations with fp32 parameters (common in HF checkpoints): output bf16, grads in fp32 for w."""
    skip_unavailable(backend, device)
    x = torch.randn(4, 96, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = torch.randn(96, device=device, requires_grad=True)
    b = torch.randn(96, device=device, requires_grad=True)
    with mltoolkit.backend(backend):
        y = ops.layer_norm(x, (96,), w, b)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref.layer_norm(x.float(), (96,), w, b), dtype=torch.bfloat16)
    with mltoolkit.backend(backend):
        y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_rows(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    with mltoolkit.backend(backend):
        y = ops.rms_norm(x, (16,), w)
        y.sum().backward()
    assert y.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_check_op(device, backend, kind):
    """Reference, gradients, fp64 gradcheck, opcheck and torch.compile(fullgraph=True) in one call."""
    skip_unavailable(backend, device)
    fn, reference, args = make_case(kind, (3, 19), torch.float32, device)
    with mltoolkit.backend(backend):
        check_op(fn, [Sample(args)], reference, name=f"{kind}[{backend}]",
                 compile=not interpreted(device, backend) or kind == "rms_norm")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_backward_op(device, backend):
    skip_unavailable(backend, device)
    x = torch.randn(4, 10, device=device)
    w = torch.randn(10, device=device)
    with mltoolkit.backend(backend):
        _, _, mean, rstd = torch.ops.mltoolkit.norm_fwd(x, None, w, None, 1e-5, False)
        dy, dres = torch.randn_like(x), torch.randn_like(x)
        torch.library.opcheck(torch.ops.mltoolkit.norm_bwd, (dy, x, w, mean, rstd, dres, True, False))


def test_compile_model_has_no_graph_break():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                torch.nn.Linear(32, 16), torch.nn.RMSNorm(16))
    mltoolkit.optimize(model)
    x = torch.randn(4, 16)
    compiled = torch.compile(model, fullgraph=True)
    assert_close(compiled(x), model(x))


def test_export():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    mltoolkit.optimize(model)
    x = torch.randn(3, 8)
    ep = torch.export.export(model, (x,))
    code = ep.graph_module.code
    assert "mltoolkit.norm_fwd" in code
    assert_close(ep.module()(x), model(x))


# ---- backend choice --------------------------------------------------------------------------------------------

def test_default_cpu_backend_is_cpp():
    if _ext.cpp_unavailable():
        pytest.skip(_ext.cpp_unavailable())
    assert table("norm").select(torch.randn(2, 2)).name == "cpp"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("MLTK_BACKEND", "reference")
    assert table("norm").select(torch.randn(2, 2)).name == "reference"
    with mltoolkit.backend(None):  # lifts the environment's choice too
        assert table("norm").select(torch.randn(2, 2)).name != "reference" or _ext.cpp_unavailable()


def test_forced_backend_that_refuses_lists_every_reason():
    x = torch.randn(2, 8)
    with mltoolkit.backend("cuda"):
        with pytest.raises(NoBackendError) as info:
            ops.rms_norm(x, (8,))
    msg = str(info.value)
    assert "forced backend 'cuda' refused" in msg
    for name in ("cuda", "triton", "cpp", "reference"):
        assert f"  {name}:" in msg


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        with mltoolkit.backend("fastest"):
            pass


def test_falls_back_when_extension_missing(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "C_ERROR", "mltoolkit._C is not built (test)")
    x = torch.randn(3, 8)
    reasons = table("norm").reasons(x)
    assert reasons["cpp"] == "mltoolkit._C is not built (test)"
    assert table("norm").select(x).name == "reference"
    assert_close(ops.rms_norm(x, (8,)), F.rms_norm(x, (8,)))


def test_extension_built_with_cuda_when_toolchain_present():
    """CI uses the CUDA build of torch so the CUDA sources must have compiled and linked."""
    import shutil
    if _ext._C is None:
        pytest.fail(_ext.C_ERROR)
    if torch.version.cuda and shutil.which("nvcc") and os.environ.get("MLTK_SKIP_CUDA") != "1":
        assert _ext._C.with_cuda, "torch has CUDA and nvcc is on PATH, but _C was built without CUDA kernels"


# ---- bad input -------------------------------------------------------------------------------------------------

def test_bad_dtype():
    with pytest.raises(TypeError, match="input must be float32"):
        ops.layer_norm(torch.ones(2, 4, dtype=torch.int64), (4,))


def test_normalized_shape_mismatch():
    with pytest.raises(ValueError, match="normalized_shape"):
        ops.layer_norm(torch.randn(2, 4), (5,))
    with pytest.raises(ValueError, match="normalized_shape"):
        ops.rms_norm(torch.randn(4), (2, 4))


def test_weight_of_wrong_size():
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(torch.randn(2, 4), (4,), torch.randn(5))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.layer_norm(torch.randn(2, 4), (4,), torch.randn(4), torch.randn(3))


def test_device_mismatch():
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.rms_norm(torch.randn(2, 4), (4,), torch.randn(4, device="meta"))


def test_residual_mismatch():
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_rms_norm(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        ops.add_rms_norm(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_kernel_rejects_bad_raw_input(backend):
    """Calling the registered op directly with a wrong-size weight is an error, never a crash."""
    skip_unavailable(backend)
    with mltoolkit.backend(backend), pytest.raises((RuntimeError, ValueError)):
        torch.ops.mltoolkit.norm_fwd(torch.randn(2, 4), None, torch.randn(3), None, 1e-5, False)


@pytest.mark.cuda
def test_cuda_kernel_rejects_cpu_tensor_without_crashing():
    """A raw call of the CUDA entry point with a CPU tensor must raise, not kill the process (run in a child so
    that a crash fails this test instead of the whole session)."""
    import subprocess
    import sys
    code = ("import torch, mltoolkit\nfrom mltoolkit import _ext\n"
            "try:\n    _ext._C.norm_forward_cuda(torch.randn(4, 8), None, None, None, 1e-5, False)\n"
            "except RuntimeError as e:\n    assert 'x must be a CUDA tensor' in str(e), e\n    print('raised')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "raised" in out.stdout, (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_eager_fast_path_matches_registered_op(device, backend, kind):
    """Plain eager calls skip the custom-op dispatch; any active mode takes the registered op. Both must agree
    bit for bit, gradients included."""
    skip_unavailable(backend, device)
    fn, _, args = make_case(kind, (5, 37), torch.float32, device)
    results = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        with mltoolkit.backend(backend), mode:
            outs = outputs(fn(*leaves))
            node = outs[0].grad_fn  # the op's node, under the view back to x's shape when there is one
            node = node.next_functions[0][0] if "View" in type(node).__name__ else node
            grad_fn = type(node).__name__
            grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) * 0.5 for o in outs])
        results.append((grad_fn, outs, grads))
    (fast_fn, fast_out, fast_grads), (op_fn, op_out, op_grads) = results
    assert "EagerNorm" in fast_fn and "norm_fwd" in op_fn, (fast_fn, op_fn)
    for a, b in zip([*fast_out, *fast_grads], [*op_out, *op_grads]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("via_op", [False, True], ids=["eager-fast-path", "registered-op"])
def test_double_backward_is_an_error(via_op):
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    with PassThroughMode() if via_op else contextlib.nullcontext():
        y = ops.rms_norm(x, (8,), w)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(gx.sum(), x)
