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


def quant_cases():
    C = _ext._C
    f32, f16, i8, u8 = torch.float32, torch.float16, torch.int8, torch.uint8
    x, xq, xs = fake_cuda(4, 64, dtype=f32), fake_cuda(4, 64, dtype=i8), fake_cuda(4, dtype=f32)
    wq, ws = fake_cuda(8, 64, dtype=i8), fake_cuda(8, dtype=f32)
    lin = lambda *a: C.int8_linear_cuda(*a)
    big_k = (fake_cuda(1, 131072, dtype=i8), fake_cuda(1, dtype=f32), fake_cuda(1, 131072, dtype=i8),
             fake_cuda(1, dtype=f32))
    pk, sc = fake_cuda(8, 32, dtype=u8), fake_cuda(8, 2, dtype=f32)  # N = 8, K = 64, group 32
    x4 = fake_cuda(3, 64, dtype=f16)
    dq = lambda *a: C.dequantize_int4_cuda(*a)
    l4 = lambda *a: C.int4_weight_only_linear_cuda(*a)
    return [
        ("quantize x 3-D", lambda: C.quantize_rows_cuda(fake_cuda(2, 2, 8, dtype=f32)), "x must be 2-D"),
        ("quantize x int8", lambda: C.quantize_rows_cuda(xq), "x must be float32, float16 or bfloat16"),
        ("quantize x on cpu", lambda: C.quantize_rows_cuda(torch.zeros(2, 8)), "x must be a CUDA tensor"),
        ("xq float", lambda: lin(x, xs, wq, ws, None, f32), "xq must be int8"),
        ("wq float", lambda: lin(xq, xs, fake_cuda(8, 64, dtype=f32), ws, None, f32), "wq must be int8"),
        ("wq K", lambda: lin(xq, xs, wq[:, :32], ws, None, f32), "wq must be (N, K)"),
        ("wq 3-D", lambda: lin(xq, xs, fake_cuda(2, 8, 64, dtype=i8), ws, None, f32), "wq must be 2-D"),
        ("packed wq", lambda: lin(xq, xs, fake_cuda(2, 1, 4, 64, dtype=i8), ws, None, f32), "unpack it first"),
        ("x_scale shape", lambda: lin(xq, xs[:3], wq, ws, None, f32), "x_scale must have shape"),
        ("x_scale dtype", lambda: lin(xq, fake_cuda(4, dtype=f16), wq, ws, None, f32), "x_scale must be float32"),
        ("w_scale shape", lambda: lin(xq, xs, wq, ws[:7], None, f32), "w_scale must have shape"),
        ("bias dtype", lambda: lin(xq, xs, wq, ws, fake_cuda(8, dtype=f16), f32), "bias must be float32"),
        ("bias shape", lambda: lin(xq, xs, wq, ws, fake_cuda(7, dtype=f32), f32), "bias must have shape"),
        ("out_dtype", lambda: lin(xq, xs, wq, ws, None, torch.int32), "out_dtype must be"),
        ("K too large", lambda: lin(*big_k, None, f32), "K must be at most 131071"),
        ("wq on cpu", lambda: lin(xq, xs, torch.zeros(8, 64, dtype=i8), ws, None, f32), "wq must be a CUDA tensor"),
        ("group size", lambda: dq(pk, sc, sc, 48), "group_size must be one of"),
        ("packed int8", lambda: dq(fake_cuda(8, 32, dtype=i8), sc, sc, 32), "packed must be uint8"),
        ("K not multiple of group", lambda: dq(fake_cuda(8, 24, dtype=u8), fake_cuda(8, 1, dtype=f32),
                                               fake_cuda(8, 1, dtype=f32), 32), "multiple of group_size"),
        ("scales dtype", lambda: dq(pk, fake_cuda(8, 2, dtype=f16), sc, 32), "scales must be float32"),
        ("zeros shape", lambda: dq(pk, sc, fake_cuda(8, 3, dtype=f32), 32), "zeros must have shape"),
        ("scales on cpu", lambda: dq(pk, torch.zeros(8, 2), sc, 32), "scales must be a CUDA tensor"),
        ("int4 x K", lambda: l4(fake_cuda(3, 32, dtype=f16), pk, sc, sc, 32, None), "x must be (M, K)"),
        ("int4 x int", lambda: l4(fake_cuda(3, 64, dtype=torch.int32), pk, sc, sc, 32, None), "x must be float32"),
        ("int4 x on cpu", lambda: l4(torch.zeros(3, 64, dtype=f16), pk, sc, sc, 32, None), "x must be a CUDA"),
        ("int4 bias dtype", lambda: l4(x4, pk, sc, sc, 32, fake_cuda(8, dtype=f32)), "bias must have x's dtype"),
        ("int4 bias shape", lambda: l4(x4, pk, sc, sc, 32, fake_cuda(7, dtype=f16)), "bias must have shape"),
    ]


def test_quant_path_switches_are_checked(monkeypatch):
    xq, xs = fake_cuda(4, 64, dtype=torch.int8), fake_cuda(4, dtype=torch.float32)
    monkeypatch.setenv("MLTK_INT8_CUDA_PATH", "wmma")
    with pytest.raises(RuntimeError, match="MLTK_INT8_CUDA_PATH must be auto, gemv, mma or dp4a"):
        _ext._C.int8_linear_cuda(xq, xs, xq, xs, None, torch.float32)
    pk, sc = fake_cuda(8, 32, dtype=torch.uint8), fake_cuda(8, 2, dtype=torch.float32)
    monkeypatch.setenv("MLTK_INT4_CUDA_PATH", "tiled")
    with pytest.raises(RuntimeError, match="MLTK_INT4_CUDA_PATH must be auto, gemv, tcgemv or mma"):
        _ext._C.int4_weight_only_linear_cuda(fake_cuda(3, 64), pk, sc, sc, 32, None)


@pytest.mark.parametrize("cases", [conv_cases, norm_cases, attention_cases, quant_cases],
                         ids=["conv", "norm", "attention", "quant"])
def test_bad_input_names_the_argument(cases):
    for name, call, needle in cases():
        with pytest.raises(RuntimeError) as info:
            call()
        assert needle in str(info.value), f"{name}: {info.value}"
