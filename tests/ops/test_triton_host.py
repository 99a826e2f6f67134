"""The plain-Python integer helpers of the Triton kernels' host code (triton_kernels/host.py) against Triton's own."""
import pytest

triton = pytest.importorskip("triton")

from mltoolkit.triton_kernels.host import cdiv, next_power_of_2  # noqa: E402

VALUES = list(range(0, 130)) + [1023, 1024, 1025, 65535, 65536, 2**31 - 1, 2**31, 2**40 + 1]


def test_next_power_of_2_matches_triton():
    for n in VALUES:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton():
    for n in VALUES:
        for d in (1, 2, 3, 16, 64, 100, 4096):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
