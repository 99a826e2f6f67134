"""Fused softmax cross-entropy (ops.cross_entropy, mltoolkit::cross_entropy_rows[_backward]) on every backend
against torch.nn.functional.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import _ext, ops
from mltoolkit.backends import table
from mltoolkit.testing import Sample, assert_close, check_op

CPU_BACKENDS = ["cpp", "reference", "triton"]
CUDA_BACKENDS = ["triton", "cuda", "reference"]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in CUDA_BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, C): one class, widths that are not multiples of any vector width, one past the Triton block (4096), and a
# row count that splits unevenly across threads.
SHAPES = [(1, 1), (4, 7), (37, 1031), (3, 4100), (129, 50)]
SMALL_SHAPES = [(1, 1), (4, 7), (9, 130), (2, 4100)]


def interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def skip_unavailable(backend, device="cpu"):
    why = table("cross_entropy").get(backend).available()
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if interpreted(device, backend) and not _ext.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")


def targets(n, c, device, ignored=True):
    t = torch.randint(0, c, (n,), device=device)
    if ignored and n > 2:
        t[1] = -100
        t[-1] = c - 1
    return t


def sample(shape, dtype, device, ignored=True):
    n, c = shape
    # Spread wider than randn, as trained logits are: softmax far from uniform.
    x = (3 * torch.randn(n, c, dtype=torch.float64)).to(dtype).to(device).requires_grad_(True)
    return Sample((x, targets(n, c, device, ignored)))


def losses(reduction, label_smoothing=0.0, ignore_index=-100):
    def ours(x, t):
        return ops.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing)

    def reference(x, t):
        return F.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return ours, reference


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch(device, backend, reduction, label_smoothing, dtype):
    skip_unavailable(backend, device)
    shapes = SMALL_SHAPES if interpreted(device, backend) else SHAPES
    ours, reference = losses(reduction, label_smoothing)
    with mltoolkit.backend(backend):
        check_op(ours, [sample(s, dtype, device) for s in shapes], reference, gradcheck=False, opcheck=False,
                 compile=False)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_gradcheck_compile(device, backend):
    """float64 gradcheck, opcheck of both registered ops, and torch.compile(fullgraph=True) with its gradients."""
    skip_unavailable(backend, device)
    ours, reference = losses("mean", 0.1)
    with mltoolkit.backend(backend):
        check_op(ours, [sample((5, 11), torch.float32, device), sample((3, 6), torch.bfloat16, device)], reference,
                 name="cross_entropy")
    n, c = 4, 9
    x = torch.randn(n, c, device=device, requires_grad=True)
    t = targets(n, c, device)
    with mltoolkit.backend(backend):
        loss, lse = torch.ops.mltoolkit.cross_entropy_rows(x, t, -100, 0.2)
        dlogits = torch.ops.mltoolkit.cross_entropy_rows_backward(torch.randn(n, device=device), x, t, lse, -100,
                                                                  0.2)
        torch.library.opcheck(torch.ops.mltoolkit.cross_entropy_rows.default, (x, t, -100, 0.2))
        torch.library.opcheck(torch.ops.mltoolkit.cross_entropy_rows_backward.default,
                              (torch.randn(n, device=device), x.detach(), t, lse.detach(), -100, 0.2))
    assert loss.dtype == lse.dtype == dlogits.dtype == torch.float32
    assert_close(lse, torch.logsumexp(x.detach().double(), 1).float(), name="lse")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_lse_gradient(device, backend):
    """lse is an output of the registered op: its gradient (the softmax) reaches the logits too."""
    skip_unavailable(backend, device)
    x = torch.randn(6, 13, dtype=torch.float64, device=device, requires_grad=True)
    t = targets(6, 13, device)
    with mltoolkit.backend(backend):
        loss, lse = torch.ops.mltoolkit.cross_entropy_rows(x, t, -100, 0.0)
        (loss.sum() + 2 * lse.sum()).backward()
    x2 = x.detach().clone().requires_grad_(True)
    (F.cross_entropy(x2, t, reduction="sum") + 2 * torch.logsumexp(x2, 1).sum()).backward()
    assert_close(x.grad, x2.grad, name="dlogits")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_and_nd_inputs(device, backend):
    """A slice of wider rows (a padded vocabulary) read in place, transposed logits, (N, C, d) input, (C,) input."""
    skip_unavailable(backend, device)
    wide = torch.randn(8, 64, device=device, requires_grad=True)
    t = targets(8, 50, device)
    with mltoolkit.backend(backend):
        a = ops.cross_entropy(wide[:, :50], t)
    a.backward()
    w2 = wide.detach().clone().requires_grad_(True)
    F.cross_entropy(w2[:, :50], t).backward()
    assert_close(a, F.cross_entropy(wide.detach()[:, :50], t), name="loss of a slice")
    assert_close(wide.grad, w2.grad, name="grad of the wide rows")
    assert torch.equal(wide.grad[:, 50:], torch.zeros_like(wide.grad[:, 50:]))

    xt = torch.randn(11, 6, device=device).t()  # (6, 11), class stride 6
    tt = targets(6, 11, device)
    with mltoolkit.backend(backend):
        assert_close(ops.cross_entropy(xt, tt, reduction="none"), F.cross_entropy(xt, tt, reduction="none"),
                     name="transposed")
    x3 = torch.randn(2, 5, 3, device=device, requires_grad=True)
    t3 = torch.randint(0, 5, (2, 3), device=device)
    with mltoolkit.backend(backend):
        check_op(lambda x, t: ops.cross_entropy(x, t, reduction="none"), [Sample((x3, t3))],
                 lambda x, t: F.cross_entropy(x, t, reduction="none"), gradcheck=False, opcheck=False, compile=False)
        x1 = torch.randn(7, device=device)
        assert_close(ops.cross_entropy(x1, torch.tensor(3, device=device)),
                     F.cross_entropy(x1, torch.tensor(3, device=device)), name="(C,) input")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_edge_values(device, backend):
    """-inf logits (a masked vocabulary), every target ignored (NaN mean, as torch), a custom ignore_index, and
    out_dtype=float32 for bf16 logits (the loss in float32 from the float32 math, not rounded to bf16)."""
    skip_unavailable(backend, device)
    x = torch.randn(4, 10, device=device)
    x[:, 7:] = float("-inf")
    t = torch.tensor([0, 3, 6, 2], device=device)
    with mltoolkit.backend(backend):
        assert_close(ops.cross_entropy(x, t, reduction="none"), F.cross_entropy(x, t, reduction="none"),
                     name="-inf logits")
        all_ignored = ops.cross_entropy(x, torch.full((4,), -100, device=device))
        assert torch.isnan(all_ignored) and torch.isnan(F.cross_entropy(x, torch.full((4,), -100, device=device)))
        t5 = torch.tensor([5, 0, 5, 1], device=device)
        assert_close(ops.cross_entropy(x[:, :7], t5, ignore_index=5), F.cross_entropy(x[:, :7], t5, ignore_index=5),
                     name="ignore_index=5")
        xb = (4 * torch.randn(16, 300, device=device)).bfloat16()
        tb = torch.randint(0, 300, (16,), device=device)
        fp32 = ops.cross_entropy(xb, tb, out_dtype=torch.float32)
    assert fp32.dtype == torch.float32
    assert_close(fp32, F.cross_entropy(xb.double(), tb).float(), name="out_dtype=float32")


def test_bad_input():
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(NotImplementedError, match="weight"):
        ops.cross_entropy(x, t, weight=torch.ones(5))
    with pytest.raises(NotImplementedError, match="class-probability"):
        ops.cross_entropy(x, torch.softmax(x, 1))
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="target must have shape"):
        ops.cross_entropy(x, t[:3])
    with pytest.raises(TypeError, match="logits must be float32"):
        ops.cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="class dimension"):
        ops.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    for backend in ("cpp", "reference"):
        with mltoolkit.backend(backend), pytest.raises((RuntimeError, ValueError), match=r"target\[2\] = 9"):
            ops.cross_entropy(x, torch.tensor([0, 1, 9, 3]))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_out_of_range_target_on_gpu_is_nan(backend):
    """The GPU kernels cannot raise: a target out of range gives a NaN loss instead of a wrong number."""
    x = torch.randn(3, 5, device="cuda")
    with mltoolkit.backend(backend):
        loss = ops.cross_entropy(x, torch.tensor([0, 7, 1], device="cuda"), reduction="none")
    assert torch.isnan(loss[1]) and not torch.isnan(loss[0]) and not torch.isnan(loss[2])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpt2_sized_rows_on_gpu(backend, dtype):
    """A 50257-wide vocabulary read as a slice of 50304-wide rows (the padded LM head), against float64 torch."""
    wide = (3 * torch.randn(64, 50304, device="cuda")).to(dtype).requires_grad_(True)
    t = torch.randint(0, 50257, (64,), device="cuda")
    t[5] = -100
    with mltoolkit.backend(backend):
        loss = ops.cross_entropy(wide[:, :50257], t, out_dtype=torch.float32, label_smoothing=0.05)
    loss.backward()
    w64 = wide.detach().double().requires_grad_(True)
    ref = F.cross_entropy(w64[:, :50257], t, label_smoothing=0.05)
    ref.backward()
    assert_close(loss, ref.float(), dtype=dtype, name="loss")
    assert_close(wide.grad, w64.grad.to(dtype), dtype=dtype, name="dlogits")


def test_cpu_picks_the_cpp_kernel():
    if table("cross_entropy").get("cpp").available() is not None:
        pytest.skip("C++ extension not built")
    assert table("cross_entropy").select(torch.randn(2, 3)).name == "cpp"


def test_autocast_and_empty():
    """Under autocast the result is float32, as torch's (which upcasts the logits; ours reads them as they are);
    no rows gives torch's NaN mean and zero sum."""
    x = torch.randn(6, 9).bfloat16()
    t = torch.randint(0, 9, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, expected = ops.cross_entropy(x, t), F.cross_entropy(x, t)
    assert ours.dtype == expected.dtype == torch.float32
    assert_close(ours, expected, name="autocast loss")
    assert ops.cross_entropy(x, t).dtype == torch.bfloat16
    empty = torch.zeros(0, 5, requires_grad=True)
    no_targets = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(ops.cross_entropy(empty, no_targets))
    total = ops.cross_entropy(empty, no_targets, reduction="sum")
    total.backward()
    assert total.item() == 0 and empty.grad.shape == (0, 5)


def test_large_cpu_gradient_reuses_memory():
    """A large CPU gradient (1 MiB or more) takes a block freed by an earlier one of its size (glibc would give it
    back to the kernel, and its pages would fault again on the next write); the values are the same."""
    if table("cross_entropy").get("cpp").available() is not None:
        pytest.skip("C++ extension not built")
    x = torch.randn(1024, 8200, requires_grad=True)  # a 33.6 MB gradient
    t = torch.randint(0, 8200, (1024,))
    with mltoolkit.backend("cpp"):
        first = torch.autograd.grad(ops.cross_entropy(x, t), x)[0]
        address, expected = first.data_ptr(), first.clone()
        del first
        second = torch.autograd.grad(ops.cross_entropy(x, t), x)[0]
    assert second.data_ptr() == address
    assert torch.equal(second, expected)
    assert_close(second, torch.autograd.grad(F.cross_entropy(x.double(), t), x)[0], name="dlogits")
