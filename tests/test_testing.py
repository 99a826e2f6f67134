"""The debugging utilities must fail when they should: a checker that cannot fail is a defect."""
import math

import pytest
import torch

from mltoolkit.ops.reference import norm as ref
from mltoolkit.testing import Sample, assert_close, assert_close_flash, check_op, sqnr, tolerance


def test_assert_close_reports_worst_mismatches():
    a = torch.zeros(4, 5)
    b = a.clone()
    b[2, 3] = 1.0
    b[0, 1] = 0.5
    with pytest.raises(AssertionError) as info:
        assert_close(a, b, name="y")
    msg = str(info.value)
    assert "y: 2 of 20 elements differ" in msg
    assert msg.index("(2, 3)") < msg.index("(0, 1)")  # worst first


def test_assert_close_catches_nan_and_shape():
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("nan")]), torch.tensor([0.0]))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
    assert_close(torch.tensor([1.0]), torch.tensor([1.0 + 1e-6]))


def test_tolerance_table_is_per_dtype():
    assert tolerance(torch.bfloat16)[1] > tolerance(torch.float16)[1] > tolerance(torch.float32)[1]
    with pytest.raises(KeyError):
        tolerance(torch.int8)


def test_flash_rule():
    ref32 = torch.randn(100)
    lowp = ref32.bfloat16()
    assert_close_flash(lowp, ref32, lowp)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_flash(lowp + 0.5, ref32, lowp)


def test_sqnr():
    x = torch.randn(1000)
    assert sqnr(x, x) == math.inf
    assert 15 < sqnr(x, x + 0.1 * torch.randn(1000)) < 25


def test_check_op_catches_wrong_values_and_wrong_gradients():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    sample = [Sample((x, w))]
    reference = lambda x, w: ref.rms_norm(x, (8,), w)
    with pytest.raises(AssertionError, match="output 0"):
        check_op(lambda x, w: ref.rms_norm(x, (8,), w) * 1.01, sample, reference, opcheck=False, compile=False)

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return ref.rms_norm(x, (8,), w)

        @staticmethod
        def backward(ctx, dy):
            return dy, dy.sum(0)

    with pytest.raises(AssertionError, match="grad"):
        check_op(WrongGrad.apply, sample, reference, gradcheck=False, opcheck=False, compile=False)
    check_op(lambda x, w: ref.rms_norm(x, (8,), w), sample, reference, opcheck=False)
