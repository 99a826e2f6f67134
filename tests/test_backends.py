"""The backend table's choice: first accepting backend, a backend's deferral to a later kernel (never to the
reference), forcing, and the error that lists every backend's answer."""
import pytest

from mltoolkit.backends import BackendTable, NoBackendError, backend


def _table(with_triton=True):
    t = BackendTable("demo")
    t.register("cuda", lambda n: None, defer=lambda n: "the triton kernel is faster" if n > 16 else None, run=lambda: 0)
    if with_triton:
        t.register("triton", lambda n: None if n < 1000 else "too big", run=lambda: 1)
    t.register("reference", lambda n: None, run=lambda: 3)
    return t


def test_defer_goes_to_the_next_accepting_kernel():
    t = _table()
    assert t.select(4).name == "cuda"
    assert t.select(64).name == "triton"
    assert t.select(5000).name == "cuda"  # triton refuses: nothing to defer to but the reference


def test_never_defers_to_the_reference():
    assert _table(with_triton=False).select(64).name == "cuda"


def test_forcing_ignores_defer_and_errors_list_every_backend():
    t = _table()
    with backend("cuda"):
        assert t.select(64).name == "cuda"
    with backend("triton"), pytest.raises(NoBackendError) as err:
        t.select(5000)
    msg = str(err.value)
    assert "forced backend 'triton' refused: too big" in msg
    assert "cuda: accepts, defers when not forced: the triton kernel is faster" in msg
    assert "reference: accepts" in msg
