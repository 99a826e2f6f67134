"""Benchmark harness internals: providers, correctness gate, timers, result rows and reports."""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

import mltoolkit
from mltoolkit.backends import NoBackendError, table
from mltoolkit.backends import backend as force_backend
from mltoolkit.testing import assert_close, error_stats, oracle_dtype, outputs, tolerance

MODES = ("fwd", "bwd", "fwd+bwd")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Datasheet memory bandwidth (GB/s) by device-name fragment; the harness also measures a copy for each run.
DATASHEET_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                  "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


@dataclass
class Benchmark:
    """One op to time. `inputs(config, dtype, device)` returns the positional args; those at `grad_args` are
    differentiated in bwd modes. `bytes(config, dtype, mode)` is the fewest bytes a call must move."""

    op: str
    table: str  # backend table name in mltoolkit.backends
    fn: Callable[..., Any]  # the mltoolkit function
    eager: Callable[..., Any]  # torch's own function (or expression) doing the same job
    reference: Callable[..., Any]  # the fp32 oracle
    inputs: Callable[[dict, torch.dtype, str], tuple]
    configs: Sequence[dict]
    dtypes: Sequence[torch.dtype]
    grad_args: Sequence[int] = ()
    bytes: Optional[Callable[[dict, torch.dtype, str], int]] = None
    flops: Optional[Callable[[dict, torch.dtype, str], int]] = None
    modes: Sequence[str] = MODES
    include_reference_backend: bool = False
    # More yardsticks beside torch eager and torch.compile: name -> fn, given the device (e.g. each SDPA backend).
    baselines: Optional[Callable[[str], dict[str, Callable[..., Any]]]] = None
    compile_baseline: bool = True
    # False: skip the correctness gate (cases too large for the reference; the tests cover correctness).
    check: bool = True
    # Cap on timed repetitions (1: one cold call, no warm-up) for cases that take minutes.
    max_reps: Optional[int] = None
    # Quantized ops: outputs are judged by their signal-to-noise ratio against the (float) reference, in dB, instead
    # of the tolerance table; a provider below the floor fails the gate. Rows then carry sqnr_db.
    sqnr_floor: Optional[float] = None


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


# ---- timers ---------------------------------------------------------------------------------------------------

# CPU calls shorter than this are timed after an untimed call of their own (see _Timer.interleaved).
_OWN_CACHE_S = 0.05


class _Timer:
    def __init__(self, device: str, budget_s: float, min_cpu_reps: int = 5):
        self.device, self.budget_s, self.min_cpu_reps = device, budget_s, min_cpu_reps
        # 256 MB, five times an H100's or H200's L2, zero-filled once: reading it evicts every input (see _cuda).
        self._flush = torch.zeros(64 * 1024 * 1024, dtype=torch.float32, device="cuda") if device == "cuda" else None

    def __call__(self, fn: Callable[[], Any], max_reps: Optional[int] = None,
                 once_s: Optional[float] = None) -> Timing:
        if max_reps == 1:  # one cold call
            if self.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
            return _summary([(time.perf_counter() - t0) * 1e3])
        if self.device == "cuda":
            return self._cuda(fn, max_reps)
        return self.interleaved({"": fn}, max_reps, None if once_s is None else {"": once_s})[""]

    def interleaved(self, fns: dict[str, Callable[[], Any]], max_reps: Optional[int] = None,
                    once_s: Optional[dict[str, float]] = None) -> dict[str, Timing]:
        """CPU timing of several providers call by call in turn. Each provider's reps (with their untimed calls) are
        as many as fit its share of the budget, at least min_cpu_reps (max_reps at most), judged from one untimed
        call: `once_s[name]` where the caller has just made one (the harness's peak-memory call), else one made
        here; those with more reps go on alone at the end. With several providers, each timed call shorter than
        _OWN_CACHE_S follows an untimed call of its own: a call's time depended on which provider ran before it
        where x and y approach L3's size (a channels-last depthwise convolution, 29 MB: ours 0.70 ms after itself,
        0.83 after oneDNN's; oneDNN's 0.56 after itself, 0.70 after ours; 2026-11-28, 2-core VM), and in provider
        order torch eager and torch.compile followed oneDNN's own calls (the reference provider's, eager's) while
        ours always followed another's. A longer call reads its inputs from memory whatever ran before it, and the
        extra call would double the quick run's slowest timings."""
        reps, own_cache = {}, {}
        for name, fn in fns.items():
            once = (once_s or {}).get(name)
            if once is None:
                t0 = time.perf_counter()
                fn()
                once = time.perf_counter() - t0
            own_cache[name] = len(fns) > 1 and once < _OWN_CACHE_S
            per_rep = once * (2 if own_cache[name] else 1)
            reps[name] = int(min(max_reps or 100, max(self.min_cpu_reps, self.budget_s / max(per_rep, 1e-6))))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for i in range(max(reps.values(), default=0)):
            for name, fn in fns.items():
                if i < reps[name]:
                    if own_cache[name]:
                        fn()
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        return {name: _summary(t) for name, t in times.items()}

    def _cuda(self, fn, max_reps=None):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        once = start.elapsed_time(end) / 3e3
        reps = int(min(max_reps or 1000, max(10, self.budget_s / max(once, 1e-6))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            # Cold L2: every rep reads its inputs from HBM. A read, not a write, so L2 holds clean lines: after a
            # memset it held ~50 MB of dirty ones, and a rep that read X bytes wrote up to X more back to HBM
            # evicting them, a cost that grows the less a kernel moves (an int4 GEMV against its bf16 F.linear).
            self._flush.sum()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _summary(times: list[float]) -> Timing:
    t = sorted(times)
    q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))]
    return Timing(q(0.5), q(0.2), q(0.8), len(t))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _malloc_mode(measure_peak: bool) -> None:
    """glibc malloc settings for the CPU runs. Measuring peak memory: blocks over 128 KB are mmapped and unmapped on
    free, so the resident set follows live memory and its peak measures a run. Timing: glibc's own steady state (its
    dynamic mmap threshold rises to at most 32 MB, the trim threshold to twice that), so a timed call does not pay
    the page faults of fresh mappings that a long-running program would not pay either."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mmap, trim = (128 * 1024, 128 * 1024) if measure_peak else (32 << 20, 64 << 20)
        libc.mallopt(_M_MMAP_THRESHOLD, mmap)
        libc.mallopt(_M_TRIM_THRESHOLD, trim)
        if measure_peak:  # free heap memory kept by the timed calls goes back, so reusing it shows in the RSS again
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_peak_reset() -> Optional[int]:
    """Resets the process's peak resident set (Linux /proc/self/clear_refs) and returns the current RSS in bytes;
    None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmRSS") * 1024
    except (OSError, ValueError):
        return None


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{field}:\s+(\d+)", f.read())
    if not m:
        raise ValueError(field)
    return int(m.group(1))


def _cpu_peak_bytes(base: Optional[int]) -> Optional[int]:
    """Growth of the peak resident set since _cpu_peak_reset: the memory a CPU run needed on top of what it had."""
    if base is None:
        return None
    try:
        return max(0, _proc_status_kb("VmHWM") * 1024 - base)
    except (OSError, ValueError):
        return None


def measure_copy_gbps(device: str) -> Optional[float]:
    """Device-to-device copy rate (bytes read + written), the practical bandwidth ceiling."""
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.int8, device="cuda").random_(-128, 127)
    dst = torch.empty_like(src)
    timing = _Timer("cuda", 0.5)(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (timing.median_ms * 1e-3) / 1e9


# ---- providers ------------------------------------------------------------------------------------------------

def _providers(bench: Benchmark, sample: tuple, device: str) -> dict[str, Callable[..., Any]]:
    providers: dict[str, Callable[..., Any]] = {}
    for b in table(bench.table).backends:
        if b.name == "reference" and not bench.include_reference_backend:
            continue
        with force_backend(b.name):
            if table(bench.table).get(b.name).reason(*sample) is not None:
                continue

        def call(*args, _name=b.name):
            with force_backend(_name):
                return bench.fn(*args)

        providers[f"mltoolkit[{b.name}]"] = call
    if sum(name != "mltoolkit[reference]" for name in providers) > 1:  # what a user gets without forcing
        providers["mltoolkit"] = bench.fn
    providers["torch eager"] = bench.eager
    if bench.compile_baseline:
        providers["torch.compile"] = torch.compile(bench.eager, dynamic=False)
    if bench.baselines:
        providers.update(bench.baselines(device))
    return providers


def _make_step(fn: Callable, args: tuple, grad_idx: Sequence[int], mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*args)
        return step
    leaves = [args[i] for i in grad_idx]
    if mode == "bwd":
        outs = outputs(fn(*args))
        cots = [torch.randn_like(o) for o in outs]
        return lambda: torch.autograd.grad(outs, leaves, cots, retain_graph=True)

    cots = None

    def step():
        nonlocal cots
        outs = outputs(fn(*args))
        cots = cots or [torch.randn_like(o) for o in outs]
        return torch.autograd.grad(outs, leaves, cots)
    return step


def _check(fn: Callable, args: tuple, ref_out: list[torch.Tensor], ref_grads: list[torch.Tensor],
           grad_idx: Sequence[int], cots: list[torch.Tensor], dtype: torch.dtype,
           sqnr_floor: Optional[float] = None) -> tuple[list[float], Optional[str], list[float]]:
    """Max abs error of each output and gradient against the reference, the first failure (None when all pass:
    the tolerance table, or the SQNR floor when one is given), and the SQNR of each tensor in dB."""
    leaves = [args[i].detach().clone().requires_grad_(True) for i in grad_idx]
    call_args = list(args)
    for i, leaf in zip(grad_idx, leaves):
        call_args[i] = leaf
    with torch.set_grad_enabled(bool(leaves)):  # as timed: a forward-only case runs under no_grad
        outs = outputs(fn(*call_args))
    errs: list[float] = []
    sqnrs: list[float] = []
    failure: Optional[str] = None

    def compare(got, want, name, atol=None):
        nonlocal failure
        table_atol, rtol = tolerance(dtype)
        atol = table_atol if atol is None else atol
        if got.shape != want.shape:
            errs.append(math.inf)
            sqnrs.append(-math.inf)
            failure = failure or f"{name}: shape {list(got.shape)} != expected {list(want.shape)}"
            return
        max_err, db, bad = error_stats(got, want, atol, rtol)
        errs.append(max_err)
        sqnrs.append(db)
        if sqnr_floor is not None:
            if not db >= sqnr_floor:
                failure = failure or f"{name}: SQNR {db:.1f} dB below the floor of {sqnr_floor} dB"
            return
        if bad:
            try:  # assert_close's message: where the worst mismatches are
                assert_close(got, want, dtype=dtype, name=name, atol=atol, rtol=rtol)
            except AssertionError as exc:
                failure = failure or str(exc)

    for k, (o, r) in enumerate(zip(outs, ref_out)):
        compare(o, r, f"output {k}")
    if leaves:
        grads = torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(cots, outs)], allow_unused=True)
        for k, (g, r) in enumerate(zip(grads, ref_grads)):
            atol = max(1e-5, (2e-2 if dtype in (torch.float16, torch.bfloat16) else 2e-5) * r.abs().max().item())
            compare(g, r, f"grad {k}", atol=atol)
    return errs, failure, sqnrs


def _within_twice(errs: list[float], torch_errs: Optional[list[float]]) -> bool:
    """FlashAttention's rule: no tensor further from the reference than twice torch eager's own result in the same
    dtype. It decides where torch itself is outside the tolerance table (16-bit gradients at ReLU's kink)."""
    return torch_errs is not None and all(e <= 2 * t for e, t in zip(errs, torch_errs))


def _reference(bench: Benchmark, args: tuple, grad_idx: Sequence[int]):
    up = oracle_dtype(args[0].dtype)
    ref_args = [a.detach().to(up).requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) and
                a.is_floating_point() else a for i, a in enumerate(args)]
    outs = outputs(bench.reference(*ref_args))
    cots = [torch.randn_like(o) for o in outs]
    leaves = [ref_args[i] for i in grad_idx]
    grads = list(torch.autograd.grad(outs, leaves, cots)) if leaves else []
    return [o.detach() for o in outs], [g.detach() for g in grads], cots


# ---- running --------------------------------------------------------------------------------------------------

def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            name = m.group(1).strip() if m else name
    except OSError:
        pass
    return name


def device_slug(device: str) -> str:
    name = _device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if device == "cpu":
        # A VM's model name hides the CPU generation ("AMD EPYC" was Zen 4 with AVX-512 one day, AVX2 only
        # another, 1.6-4x slower): the vector ISA torch's kernels use keeps their results apart.
        slug = "cpu-" + re.sub(r"-\d+-core-processor$", "", slug) + "-" + _cpu_capability().lower()
    return slug


def _cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to ("AVX512", "AVX2", "DEFAULT", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def _git_sha() -> str:
    if os.environ.get("MLTK_GIT_SHA"):  # set by scripts/gpu_check.sh where the tree travels without .git
        return os.environ["MLTK_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "mltoolkit": mltoolkit.__version__, "git_sha": _git_sha()}


def discover(bench_dir: Path) -> list[Path]:
    return sorted(p for p in bench_dir.rglob("bench_*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"mltoolkit_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(device: str = "cpu", quick: bool = False, ops: Optional[Sequence[str]] = None,
        bench_dir: Optional[Path] = None, out_dir: Optional[Path] = None, log=print) -> list[dict]:
    """Run every benchmark (or those whose op is in `ops`) on `device`; returns the rows it wrote."""
    bench_dir = Path(bench_dir or REPO_ROOT / "benchmarks")
    out_dir = Path(out_dir or bench_dir / "results")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch sees no CUDA device")
    benches = [b for path in discover(bench_dir) for b in _load(path).benchmarks(device, quick)]
    if ops:
        unknown = set(ops) - {b.op for b in benches}
        if unknown:
            raise SystemExit(f"bench: no benchmark for {sorted(unknown)}; have {sorted({b.op for b in benches})}")
        benches = [b for b in benches if b.op in ops]
    if quick and device == "cpu":
        # One mode per op on the CPU: fwd+bwd where an op trains (the CPU targets' mode), else its own. Each mode
        # is a torch.compile build of its own, a few seconds each on 2 cores.
        benches = [replace(b, modes=("fwd+bwd",)) if "fwd+bwd" in b.modes else b for b in benches]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # bwd mode replays one graph's backward (retain_graph=True), which compiled graphs with donated buffers refuse.
    torch._functorch.config.donated_buffer = False

    copy_gbps = measure_copy_gbps(device)
    name = _device_name(device)
    peak_gbps = next((v for k, v in DATASHEET_GBPS.items() if k in name), None) if device == "cuda" else None
    meta = {"device": device, "device_name": name, "threads": torch.get_num_threads(),
            **({"cpu_capability": _cpu_capability()} if device == "cpu" else {}),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **_versions()}
    if copy_gbps:
        log(f"# {name}: device-to-device copy {copy_gbps:.0f} GB/s" + (f" (datasheet {peak_gbps:.0f})"
                                                                      if peak_gbps else ""))
    # --quick: a quarter second and at least 3 calls a provider (timing was 60% of the quick run on 2 CPU cores)
    timer = _Timer(device, budget_s=0.25 if quick else 1.5, min_cpu_reps=3 if quick else 5)
    rows: list[dict] = []
    for bench in benches:
        t0, n = time.perf_counter(), len(rows)
        for config in bench.configs:
            for dtype in bench.dtypes:
                rows += _run_one(bench, config, dtype, device, timer, meta, copy_gbps, peak_gbps, log)
        log(f"# {bench.op}: {len(rows) - n} rows in {time.perf_counter() - t0:.0f} s")
    write_results(rows, out_dir, device_slug(device), {b.op for b in benches})
    return rows


def _run_one(bench, config, dtype, device, timer, meta, copy_gbps, peak_gbps, log) -> list[dict]:
    torch.manual_seed(0)
    args = bench.inputs(config, dtype, device)
    grad_idx = list(bench.grad_args)
    providers = _providers(bench, args, device)
    cfg = ",".join(f"{k}={v}" for k, v in config.items())
    dname = str(dtype).replace("torch.", "")
    rows = []
    errors: dict[str, Optional[float]] = dict.fromkeys(providers)
    baseline_errors: dict[str, str] = {}
    # The gate checks what is timed: gradients only where a timed mode differentiates (a forward-only case would
    # otherwise build torch.compile's backward graph: 11 min for a 2 x 128-step LSTM on the 2-core VM).
    check_idx = grad_idx if any(mode != "fwd" for mode in bench.modes) else []
    if bench.check:
        ref_out, ref_grads, cots = _reference(bench, args, check_idx)
    else:
        log(f"  {bench.op} {cfg} {dname}: correctness not checked at this size (see the tests)")
    # torch eager first: its own error is the yardstick of the others where it is itself outside the table
    order = sorted(providers, key=lambda name: name != "torch eager")
    torch_errs: Optional[list[float]] = None
    sqnr_db: dict[str, float] = {}
    for pname in order if bench.check else ():
        try:
            errs, failure, sqnrs = _check(providers[pname], args, ref_out, ref_grads, check_idx, cots, dtype,
                                          bench.sqnr_floor)
            if bench.sqnr_floor is not None and sqnrs:
                sqnr_db[pname] = min(sqnrs)
        except Exception as exc:
            errs, failure = None, str(exc) or type(exc).__name__
            # a baseline that does not run this case, or a forced backend that one of the ops inside refuses
            if pname.startswith("torch") or isinstance(exc, NoBackendError):
                log(f"  {bench.op} {cfg} {dname} {pname}: not applicable: {failure.splitlines()[0]}")
                del providers[pname]
                continue
        if pname == "torch eager":
            torch_errs = errs
        first = failure.splitlines()[0] if failure else ""
        if failure is None or pname.startswith("torch"):
            errors[pname] = max(errs) if errs and failure is None else None
            if failure is not None:  # a baseline stays the yardstick; its row carries the finding
                log(f"  {bench.op} {cfg} {dname} {pname}: outside tolerance (timed anyway): {first}")
                baseline_errors[pname] = failure[:500]
        elif errs is not None and _within_twice(errs, torch_errs):
            errors[pname] = max(errs)
            log(f"  {bench.op} {cfg} {dname} {pname}: outside the table but within 2x torch eager's error: {first}")
        else:
            log(f"  {bench.op} {cfg} {dname} {pname}: FAILED correctness: {first}")  # reported, never timed
            rows.append({**meta, "op": bench.op, "provider": pname, "config": cfg, "dtype": dname,
                         "error": failure[:500]})
            del providers[pname]
    for mode in bench.modes:
        if mode != "fwd" and not grad_idx:
            continue
        # CPU providers are timed call by call in turn, so that a machine's drift (other tenants, frequency) falls
        # on all of them alike; bwd mode keeps every provider's graph alive, so it (and one-call cases) go in turn.
        interleave = device == "cpu" and mode != "bwd" and bench.max_reps != 1
        steps: dict[str, Callable[[], Any]] = {}
        peaks: dict[str, Optional[int]] = {}
        once_s: dict[str, float] = {}  # each provider's peak-memory call, the untimed call before its timed ones
        timings: dict[str, Timing] = {}
        for pname, fn in providers.items():
            call_args = tuple(a.detach().requires_grad_(i in grad_idx and mode != "fwd")
                              if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                              for i, a in enumerate(args))
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step = _make_step(fn, call_args, grad_idx, mode)
                timings[pname] = timer(step, bench.max_reps)
                peaks[pname] = torch.cuda.max_memory_allocated() - base
                continue
            # peak memory from one call of its own; the timed calls run with the usual malloc settings
            _malloc_mode(measure_peak=True)
            base = _cpu_peak_reset()
            step = _make_step(fn, call_args, grad_idx, mode)
            t0 = time.perf_counter()
            step()
            once_s[pname] = time.perf_counter() - t0
            peaks[pname] = _cpu_peak_bytes(base)
            _malloc_mode(measure_peak=False)
            if interleave:
                steps[pname] = step
            else:
                timings[pname] = timer(step, bench.max_reps, once_s[pname])
        if interleave:
            timings = timer.interleaved(steps, bench.max_reps, once_s)
        timed: dict[str, dict] = {}
        for pname, t in timings.items():
            row = {**meta, "op": bench.op, "provider": pname, "mode": mode, "config": cfg, "dtype": dname,
                   "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps,
                   "max_abs_err": errors[pname], "peak_mem_bytes": peaks[pname], "gbps": None, "tflops": None,
                   "pct_of_peak": None, "pct_of_copy": None}
            if pname in baseline_errors:
                row["baseline_outside_tolerance"] = baseline_errors[pname]
            if pname in sqnr_db:
                row["sqnr_db"] = sqnr_db[pname]
            if bench.bytes:
                gbps = bench.bytes(config, dtype, mode) / (t.median_ms * 1e-3) / 1e9
                row["gbps"] = gbps
                row["pct_of_peak"] = 100 * gbps / peak_gbps if peak_gbps else None
                row["pct_of_copy"] = 100 * gbps / copy_gbps if copy_gbps else None
            if bench.flops:
                row["tflops"] = bench.flops(config, dtype, mode) / (t.median_ms * 1e-3) / 1e12
            timed[pname] = row
        eager = timed.get("torch eager", {}).get("median_ms")
        comp = timed.get("torch.compile", {}).get("median_ms")
        for row in timed.values():
            row["speedup_vs_eager"] = eager / row["median_ms"] if eager else None
            row["speedup_vs_compile"] = comp / row["median_ms"] if comp else None
            log(_format_row(row))
            rows.append(row)
    return rows


def _mb(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 2**20


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _format_row(r: dict) -> str:
    bw = f"{_fmt(r.get('gbps'), '.1f')} GB/s" if r.get("gbps") is not None else ""
    pct = f" ({_fmt(r.get('pct_of_copy'), '.0f')}% of copy)" if r.get("pct_of_copy") is not None else ""
    if r.get("tflops") is not None:
        bw += f" {r['tflops']:.3g} TFLOP/s"
    if r.get("peak_mem_bytes") is not None:
        bw += f" peak {_mb(r['peak_mem_bytes']):.0f} MB"
    return (f"  {r['op']:<16} {r['config']:<14} {r['dtype']:<9} {r['mode']:<8} {r['provider']:<20} "
            f"{r['median_ms']:9.3f} ms  x{_fmt(r['speedup_vs_eager'], '.2f')} eager  "
            f"x{_fmt(r['speedup_vs_compile'], '.2f')} compile  {bw}{pct}")


# ---- reports --------------------------------------------------------------------------------------------------

def write_results(rows: list[dict], out_dir: Path, slug: str, ops_run: set[str]) -> None:
    """Rows of the ops just run replace their old rows in <slug>.jsonl; the table and plot cover the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slug}.jsonl"
    kept = []
    if path.exists():
        kept = [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
                if r.get("op") not in ops_run]
    all_rows = kept + rows
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    os.replace(tmp, path)
    (out_dir / f"{slug}.md").write_text(markdown_table(all_rows))
    plot(all_rows, out_dir / f"{slug}.png")


def markdown_table(rows: list[dict]) -> str:
    timed = [r for r in rows if "median_ms" in r]
    if not timed:
        return "No results.\n"
    head = timed[0]
    # rows of several runs share a file (write_results replaces an op's rows only): say which runs
    times = sorted(r["timestamp"] for r in timed)
    when = times[0] if times[0] == times[-1] else f"from {times[0]} to {times[-1]}"
    shas = ", ".join(sorted({str(r.get("git_sha")) for r in timed}))
    versions = ", ".join(sorted({f"torch {r['torch']}, triton {r['triton']}" for r in timed}))
    lines = [f"# Benchmarks on {head['device_name']} ({head['device']})", "",
             f"Measured {when} (each row's time and commit are in the .jsonl), {versions}, mltoolkit {shas}, "
             f"{head['threads']} CPU threads. Times are medians; speedups are torch's time over the provider's.", "",
             "| op | config | dtype | mode | provider | median ms | vs eager | vs compile | GB/s | % of copy | "
             "% of peak | TFLOP/s | peak MB | SQNR dB |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in timed:
        lines.append(f"| {r['op']} | {r['config']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                     f"{r['median_ms']:.3f} | {_fmt(r['speedup_vs_eager'], '.2f')} | "
                     f"{_fmt(r['speedup_vs_compile'], '.2f')} | {_fmt(r.get('gbps'), '.0f')} | "
                     f"{_fmt(r.get('pct_of_copy'), '.0f')} | {_fmt(r.get('pct_of_peak'), '.0f')} | "
                     f"{_fmt(r.get('tflops'), '.3g')} | {_fmt(_mb(r.get('peak_mem_bytes')), '.0f')} | "
                     f"{_fmt(r.get('sqnr_db'), '.1f')} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed correctness (not timed):", ""]
        lines += [f"- {r['op']} {r['config']} {r['dtype']} {r['provider']}: {r['error'].splitlines()[0]}"
                  for r in failed]
    off = {(r["op"], r["config"], r["dtype"], r["provider"]): r["baseline_outside_tolerance"]
           for r in timed if r.get("baseline_outside_tolerance")}
    if off:
        lines += ["", "torch baselines outside the tolerance table against the reference (timed anyway):", ""]
        lines += [f"- {op} {cfg} {dt} {prov}: {msg.splitlines()[0]}" for (op, cfg, dt, prov), msg in off.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of each mltoolkit provider's speedup over torch eager and torch.compile, one bar group per case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ours = [r for r in rows if "median_ms" in r and r["provider"].startswith("mltoolkit")]
    if not ours:
        return
    labels = [f"{r['op']} {r['mode']}\n{r['config']} {r['dtype']}\n{r['provider'][10:-1]}" for r in ours]
    x = range(len(ours))
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(ours)), 5))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r["speedup_vs_eager"] or 0 for r in ours], w, label="vs torch eager")
    ax.bar([i + w / 2 for i in x], [r["speedup_vs_compile"] or 0 for r in ours], w, label="vs torch.compile")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
    ax.set_ylabel("speedup (x)")
    ax.set_title(f"mltoolkit on {ours[0]['device_name']} ({ours[0]['timestamp'][:10]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mltoolkit bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small set of cases (under 3 minutes on 2 CPU cores)")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--bench-dir", type=Path, default=None, help="where bench_*.py files live (default: benchmarks/)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = [o for o in a.ops.split(",") if o] or None
    t0 = time.time()
    rows = run(device, a.quick, ops, a.bench_dir, a.out)
    failed = [r for r in rows if "error" in r]
    print(f"# {len(rows)} rows in {time.time() - t0:.0f} s; results in "
          f"{(a.out or (a.bench_dir or REPO_ROOT / 'benchmarks') / 'results')}/{device_slug(device)}.*"
          + (f"; {len(failed)} provider(s) FAILED correctness" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
