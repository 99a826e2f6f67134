"""The CUDA entry points' input checks, run without a GPU: fake CUDA tensors (FakeTensorMode) carry a CUDA device
and real shapes but no storage, and every check runs before the first CUDA call. Each bad input must raise a
RuntimeError that names the argument (on the first GPU run, such messages crashed the process: tests/test_build.py)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mltoolkit import _ext

pytestmark = pytest.mark.skipif(_ext.cuda_unavailable() is not None, reason=str(_ext.cuda_unavailable()))


def fake_cuda(*shape, dtype=torch.float16):
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(*shape, device="cuda", dtype=dtype)


A = ([1, 1], [0, 0], [1, 1], 1)  # stride, padding, dilation, groups


def conv_cases():
    x, w, dy = fake_cuda(2, 8, 6, 6), fake_cuda(8, 8, 3, 3), fake_cuda(2, 8, 4, 4)
    fwd = lambda *a: _ext._C.conv2d_forward_cuda(*a)
    bwd = lambda *a: _ext._C.conv2d_backward_cuda(*a)
    return [
        ("weight channels", lambda: fwd(x, w[:, :4], None, *A, None, "none"), "weight.size(1) must be C / groups"),
        ("groups", lambda: fwd(x, w, None, [1, 1], [0, 0], [1, 1], 3, None, "none"), "divisible by groups (3)"),
        ("stride", lambda: fwd(x, w, None, [0, 1], [0, 0], [1, 1], 1, None, "none"), "stride must be >= 1"),
        ("empty output", lambda: fwd(x, fake_cuda(8, 8, 9, 9), None, *A, None, "none"), "output size must be >= 1"),
        ("bias shape", lambda: fwd(x, w, fake_cuda(7), *A, None, "none"), "bias"),
        ("residual shape", lambda: fwd(x, w, None, *A, fake_cuda(2, 8, 6, 6), "none"), "residual"),
        ("activation", lambda: fwd(x, w, None, *A, None, "tanh"), "activation must be one of"),
        ("x 3-D", lambda: fwd(x[0], w, None, *A, None, "none"), "x must be 4-D"),
        ("dy shape", lambda: bwd(dy[:, :4], x, w, *A, [True, True, True]), "dy must have shape"),
        ("output_mask", lambda: bwd(dy, x, w, *A, [True, True]), "output_mask"),
    ]


def norm_cases():
    x = fake_cuda(4, 8, dtype=torch.float32)
    fwd = lambda *a: _ext._C.norm_forward_cuda(*a)
    return [
        ("x 3-D", lambda: fwd(fake_cuda(2, 2, 8, dtype=torch.float32), None, None, None, 1e-5, False), "2-D"),
        ("weight size", lambda: fwd(x, None, fake_cuda(7, dtype=torch.float32), None, 1e-5, False), "weight"),
        ("x int", lambda: fwd(fake_cuda(4, 8, dtype=torch.int32), None, None, None, 1e-5, False), "dtype"),
    ]


def attention_cases():
    q = fake_cuda(1, 2, 8, 64)
    fwd = lambda *a: _ext._C.attention_forward_cuda(*a)
    tail = (None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, 0)
    return [
        ("q 3-D", lambda: fwd(q[0], q, q, *tail), "q must be 4-D"),
        ("v shape", lambda: fwd(q, q, q[:, :, :4], *tail), "v"),
        ("k dtype", lambda: fwd(q, fake_cuda(1, 2, 8, 64, dtype=torch.bfloat16), q, *tail), "k"),
        ("head dim 300", lambda: fwd(*(fake_cuda(1, 1, 4, 300),) * 3, *tail), "D"),
    ]


@pytest.mark.parametrize("cases", [conv_cases, norm_cases, attention_cases], ids=["conv", "norm", "attention"])
def test_bad_input_names_the_argument(cases):
    for name, call, needle in cases():
        with pytest.raises(RuntimeError) as info:
            call()
        assert needle in str(info.value), f"{name}: {info.value}"
