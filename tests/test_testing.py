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


@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_error_stats_matches_whole_tensor_formulas(monkeypatch, chunk):
    """error_stats (the benchmark gate's one-pass comparison, chunked) against the whole-tensor formulas it
    replaces: max |diff| with NaN as inf, sqnr(), and assert_close's count of failing elements, NaN included."""
    import mltoolkit.testing as testing

    monkeypatch.setattr(testing, "_STATS_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    want = torch.randn(5, 13, generator=g)
    got = want + 1e-4 * torch.randn(5, 13, generator=g)
    got[1, 2] += 0.5  # one element out of tolerance
    for a, e in ((got, want), (got.bfloat16(), want), (want.clone(), want)):
        max_err, db, bad = testing.error_stats(a, e, 2e-5, 2e-5)
        diff = (a.double() - e.double()).abs()
        assert max_err == diff.max().item()
        assert db == testing.sqnr(e, a) or math.isclose(db, testing.sqnr(e, a), rel_tol=1e-9)
        assert bad == int((~(diff <= 2e-5 + 2e-5 * e.double().abs())).sum())
    nan = want.clone()
    nan[0, 0] = float("nan")
    max_err, db, bad = testing.error_stats(nan, want, 1.0, 0.0)
    assert max_err == math.inf and math.isnan(db) and bad == 1
    assert testing.error_stats(torch.empty(0, 3), torch.empty(0, 3), 0.0, 0.0) == (0.0, math.inf, 0)
    with pytest.raises(ValueError, match="shapes"):
        testing.error_stats(want, want.t(), 0.0, 0.0)
