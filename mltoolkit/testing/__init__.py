"""Test helpers shared by the test suite and the benchmark harness: one tolerance table, a verbose allclose,
SQNR, and `check_op`, which runs the reference comparison, gradients, gradcheck, opcheck and compile in one call.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def triton_forced(op_table: str, device: str) -> Iterator[str]:
    """Runs a test body with the triton backend of `op_table` forced on `device` ("cpu": the interpreter, "cuda"), or
    skips the test (pytest.skip) where that backend cannot run: triton missing, or CPU tensors without
    TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU)."""
    import pytest

    from mltoolkit import _ext
    from mltoolkit.backends import backend, table

    why = table(op_table).get("triton").available()
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    if device == "cpu" and not _ext.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")
    with backend("triton"):
        yield device


# (atol, rtol) for an op's output in the given dtype against the float32 (float64) reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference runs in: float32 for half types, float64 for float32 and float64 (an fp32 oracle
    would carry rounding errors as large as the kernel's own)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}; add it to mltoolkit.testing.TOLERANCES")
    return TOLERANCES[dtype]


def _mismatch_report(actual: Tensor, expected: Tensor, bad: Tensor, err: Tensor, show: int) -> str:
    flat_err = torch.where(bad, err, torch.zeros_like(err)).flatten()
    worst = torch.topk(flat_err, min(show, int(bad.sum()))).indices
    lines = []
    for i in worst.tolist():
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), actual.shape))
        lines.append(f"    at {idx}: actual {actual.flatten()[i].item():.6g}, expected "
                     f"{expected.flatten()[i].item():.6g}, |diff| {err.flatten()[i].item():.3g}")
    return "\n".join(lines)


def assert_close(actual: Tensor, expected: Tensor, *, dtype: Optional[torch.dtype] = None,
                 atol: Optional[float] = None, rtol: Optional[float] = None, name: str = "output",
                 show: int = 5) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, tolerances from the table by `dtype`
    (default: actual's dtype). On failure the message lists the worst mismatches and where they are."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}")
    table_atol, table_rtol = tolerance(dtype or actual.dtype)
    atol = table_atol if atol is None else atol
    rtol = table_rtol if rtol is None else rtol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN counts as bad
    bad |= torch.isnan(a) != torch.isnan(e)
    if bool(bad.any()):
        err = torch.nan_to_num(err, nan=math.inf)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol:g}, rtol={rtol:g}, "
            f"max |diff| {err.max().item():.3g})\n" + _mismatch_report(a, e, bad, err, show))


def assert_close_flash(actual: Tensor, reference: Tensor, baseline: Tensor, *, name: str = "output",
                       factor: float = 2.0, eps: Optional[float] = None) -> None:
    """The flash-attention rule for low-precision reductions:
    max|actual - reference| <= factor * max|baseline - reference| + eps, where `reference` is computed in fp32
    and `baseline` is torch's own result in actual's dtype."""
    ref = reference.detach().double().cpu()
    ours = (actual.detach().double().cpu() - ref).abs().max().item()
    theirs = (baseline.detach().double().cpu() - ref).abs().max().item()
    eps = tolerance(actual.dtype)[0] if eps is None else eps
    if not ours <= factor * theirs + eps:
        raise AssertionError(f"{name}: max error {ours:.3g} exceeds {factor:g} x torch's {theirs:.3g} + {eps:g}")


_STATS_CHUNK = 1 << 18  # elements per chunk of error_stats: 2 MB of float64, cache-resident on the CPU


def error_stats(actual: Tensor, expected: Tensor, atol: float, rtol: float) -> tuple[float, float, int]:
    """In one pass over same-shape tensors, in float64: max |actual - expected| (NaN counted as inf), the SQNR of
    actual against expected in dB (sqnr's value), and how many elements fail assert_close's test
    |actual - expected| <= atol + rtol * |expected| (NaN fails). A chunk at a time: the benchmark gate compares
    16M-element tensors, where whole-tensor float64 temporaries took ~0.8 s a tensor on the 2-core VM."""
    if actual.shape != expected.shape:
        raise ValueError(f"error_stats: shapes {list(actual.shape)} and {list(expected.shape)} differ")
    a_flat, e_flat = actual.detach().reshape(-1), expected.detach().reshape(-1)
    zero = torch.zeros((), dtype=torch.float64, device=actual.device)
    max_err, noise, signal, bad = zero, zero, zero, torch.zeros((), dtype=torch.int64, device=actual.device)
    for start in range(0, a_flat.numel(), _STATS_CHUNK):
        a = a_flat[start:start + _STATS_CHUNK].double()
        e = e_flat[start:start + _STATS_CHUNK].double()
        diff = a - e
        err = diff.abs()
        max_err = torch.maximum(max_err, err.nan_to_num(nan=math.inf).max())
        noise = noise + diff.square().sum()
        signal = signal + e.square().sum()
        bad = bad + (~(err <= atol + rtol * e.abs()) | (torch.isnan(a) != torch.isnan(e))).sum()
    return max_err.item(), _db(math.sqrt(signal.item()), math.sqrt(noise.item())), int(bad.item())


def sqnr(reference: Tensor, actual: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - actual||) (inf when equal)."""
    ref = reference.detach().double()
    return _db(torch.linalg.vector_norm(ref).item(), torch.linalg.vector_norm(ref - actual.detach().double()).item())


def _db(signal: float, noise: float) -> float:
    """20 log10(signal / noise) of two norms: inf when noise is 0, -inf when only the signal is."""
    return math.inf if noise == 0 else 20 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class Sample:
    """One input to check_op: positional and keyword arguments of the function under test."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def map_tensors(self, fn: Callable[[Tensor], Any]) -> Sample:
        conv = lambda v: fn(v) if isinstance(v, Tensor) else v
        return Sample(tuple(conv(a) for a in self.args), {k: conv(v) for k, v in self.kwargs.items()})

    def tensors(self) -> list[Tensor]:
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, Tensor)]


def outputs(out: Any) -> list[Tensor]:
    """The tensors an op returned, as a list (one tensor, or the tensors of a tuple/list)."""
    if isinstance(out, Tensor):
        return [out]
    return [t for t in out if isinstance(t, Tensor)] if isinstance(out, (tuple, list)) else []


def _fresh(sample: Sample, dtype: Optional[torch.dtype] = None) -> Sample:
    """Copies of the sample's tensors (optionally cast), floating ones requiring grad where the original did."""
    def copy(t: Tensor) -> Tensor:
        c = t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach().clone()
        return c.requires_grad_(t.requires_grad)
    return sample.map_tensors(copy)


def _grads(fn: Callable, sample: Sample, cotangents: list[Tensor]) -> tuple[list[Tensor], list[Optional[Tensor]]]:
    outs = outputs(fn(*sample.args, **sample.kwargs))
    leaves = [t for t in sample.tensors() if t.requires_grad]
    pairs = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
    if not leaves or not pairs:
        return outs, []
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c.to(o.dtype) for o, c in pairs],
                                allow_unused=True)
    return outs, list(grads)


class PassThroughMode(TorchFunctionMode):
    """A mode that changes nothing: inside it the ops take their registered (custom-op) path instead of the plain
    eager fast path (mltoolkit._ext.plain_eager), so tests can compare the two."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _RecordCustomOps(TorchFunctionMode):
    """Records the mltoolkit custom-op calls a function makes, with their arguments, for opcheck."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "mltoolkit":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def check_op(fn: Callable, samples: Sequence[Sample], reference: Callable, *, name: str = "op",
             grad: bool = True, gradcheck: bool = True, opcheck: bool = True, compile: bool = True,
             compile_samples: int = 1) -> None:
    """Check `fn` on every sample against `reference` (called on upcast copies):

    1. outputs within the dtype's tolerance (reference in `oracle_dtype`); 2. gradients of every input that
    requires grad, against the reference's autograd, with random cotangents (so a kernel ignoring dy fails); 3.
    torch.autograd.gradcheck in float64 (skipped with gradcheck=False for kernels without fp64); 4.
    torch.library.opcheck on every mltoolkit op `fn` calls; 5. torch.compile(fullgraph=True) of `fn` on the
    first `compile_samples` samples gives the eager outputs and gradients.
    """
    for i, sample in enumerate(samples):
        where = f"{name} sample {i}"
        tensors = sample.tensors()
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
        ref_dtype = oracle_dtype(dtype)

        ours_in = _fresh(sample)
        ref_in = _fresh(sample, ref_dtype)
        with _RecordCustomOps() as recorder:
            ours = outputs(fn(*ours_in.args, **ours_in.kwargs))
        ref = outputs(reference(*ref_in.args, **ref_in.kwargs))
        if len(ours) != len(ref):
            raise AssertionError(f"{where}: {len(ours)} outputs, reference has {len(ref)}")
        for k, (o, r) in enumerate(zip(ours, ref)):
            if o.dtype != dtype and o.is_floating_point():
                raise AssertionError(f"{where}: output {k} has dtype {o.dtype}, expected {dtype}")
            assert_close(o, r, dtype=dtype, name=f"{where} output {k}")

        if grad and any(t.requires_grad for t in tensors):
            cot = [torch.randn_like(r) for r in ref]
            _, g_ours = _grads(fn, _fresh(sample), cot)
            _, g_ref = _grads(reference, _fresh(sample, ref_dtype), cot)
            leaves = [t for t in tensors if t.requires_grad]
            for k, (go, gr, leaf) in enumerate(zip(g_ours, g_ref, leaves)):
                if (go is None) != (gr is None):
                    raise AssertionError(f"{where}: grad {k} is {'missing' if go is None else 'unexpected'}")
                if go is not None:
                    if go.dtype != leaf.dtype:
                        raise AssertionError(f"{where}: grad of input {k} has dtype {go.dtype}, input {leaf.dtype}")
                    # Parameter grads are sums over rows: scale atol by the reference's size.
                    atol = tolerance(leaf.dtype)[0] * max(1.0, gr.abs().max().item())
                    assert_close(go, gr, dtype=leaf.dtype, atol=atol, name=f"{where} grad of input {k}")

        if gradcheck and grad and any(t.requires_grad for t in tensors):
            fp64 = _fresh(sample, torch.float64)
            diff = [t for t in fp64.tensors() if t.requires_grad]

            def call(*leaves, _s=fp64):
                it = iter(leaves)
                s = _s.map_tensors(lambda v: next(it) if v.requires_grad else v)
                return tuple(outputs(fn(*s.args, **s.kwargs)))

            if sum(t.numel() for t in diff) <= 4096:  # finite differences cost one call per element
                torch.autograd.gradcheck(call, tuple(diff), eps=1e-6, atol=1e-5, rtol=1e-4)

        if opcheck:
            for op, args, kwargs in recorder.calls:
                torch.library.opcheck(op, args, kwargs)

        if compile and i < compile_samples:
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True)
            c_in, e_in = _fresh(sample), _fresh(sample)
            c_out = outputs(compiled(*c_in.args, **c_in.kwargs))
            e_out = outputs(fn(*e_in.args, **e_in.kwargs))
            for k, (c, e) in enumerate(zip(c_out, e_out)):
                assert_close(c, e, dtype=dtype, name=f"{where} compiled output {k}")
            if grad and any(t.requires_grad for t in tensors):
                cot = [torch.randn_like(e) for e in e_out]
                _, gc = _grads(compiled, _fresh(sample), cot)
                _, ge = _grads(fn, _fresh(sample), cot)
                for k, (a, b) in enumerate(zip(gc, ge)):
                    if a is not None:
                        atol = tolerance(a.dtype)[0] * max(1.0, b.abs().max().item())
                        assert_close(a, b, atol=atol, name=f"{where} compiled grad {k}")
