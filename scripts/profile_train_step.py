#!/usr/bin/env python3
"""Where a GPT-2 small training step spends its time: the benchmark's step (benchmarks/models/bench_text_models.py,
bf16 autocast, fused AdamW) under torch.profiler, for mltoolkit's model eager and compiled and for transformers'
model compiled (the target to beat). Prints, per provider:
- the step's median wall time and the time the CPU takes to issue it (enqueue): enqueue close to wall means the
  step is bound by the host (or waits on the GPU inside);
- every synchronizing CUDA call one step makes (torch.cuda.set_sync_debug_mode), with where it came from;
- its top kernels by GPU time, the GPU time of mltoolkit's own ops, and how busy the GPU was: kernel time against
  the profiled wall time, and the longest idle stretches between two kernels, summed by the pair around them;
- the top host-side ops by self CPU time;
- what torch.compile built: frames and graphs in the warm-up, any rebuilt during the timed steps (recompiles), and
  the graph breaks with their reasons.
The 2026-11-27 profile found mltoolkit's compiled step at 40 ms of wall time for ~24 ms of kernels: the host side is
what these views are for. --trace DIR writes each provider's Chrome trace there (gzipped).

    python scripts/profile_train_step.py [--batch 8] [--steps 3] [--providers "mltoolkit,torch.compile"]

CUDA only; about a minute on an H100 (two torch.compile builds).
"""
import argparse
import gzip
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.models import bench_text_models as text  # noqa: E402


def _kernel_table(prof, rows: int) -> str:
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = sorted((e for e in events if getattr(e, attr) > 0 and e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in kernels) or 1
    lines = [f"  {'GPU ms':>8} {'share':>6} {'calls':>6}  kernel"]
    for e in kernels[:rows]:
        t = getattr(e, attr)
        lines.append(f"  {t / 1e3:8.2f} {100 * t / total:5.1f}% {e.count:6d}  {e.key[:110]}")
    lines.append(f"  {total / 1e3:8.2f} total GPU time of the profiled steps")
    ours = {}
    for e in events:  # mltoolkit's registered ops, CPU-side ranges that enclose their kernels
        if e.key.startswith("mltoolkit::"):
            ours[e.key] = ours.get(e.key, 0) + getattr(e, attr)
    for name, t in sorted(ours.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {t / 1e3:8.2f} {100 * t / total:5.1f}%         {name} (op range)")
    return "\n".join(lines)


def _is_kernel(e) -> bool:
    return e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)


def _busy_table(prof, wall_ms: float, rows: int = 8, min_gap_us: float = 20.0) -> str:
    """GPU busy time (the union of kernel intervals) against the profiled wall time, and the idle stretches
    between consecutive kernels longer than min_gap_us, summed by the (kernel before, kernel after) pair."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if _is_kernel(e))
    if not spans:
        return "  no kernels recorded"
    busy, gaps = 0.0, {}
    cur_start, cur_end, cur_name = spans[0]
    for start, end, name in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            if start - cur_end >= min_gap_us:
                key = (cur_name[:60], name[:60])
                total, count = gaps.get(key, (0.0, 0))
                gaps[key] = (total + start - cur_end, count + 1)
            cur_start = start
        if end >= cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    idle = sum(t for t, _ in gaps.values())
    lines = [f"  GPU busy {busy / 1e3:.2f} ms of {wall_ms:.2f} ms wall (profiler on); idle stretches over "
             f"{min_gap_us:.0f} us: {idle / 1e3:.2f} ms in {sum(c for _, c in gaps.values())}",
             f"  {'idle ms':>8} {'count':>6}  between"]
    for (before, after), (t, c) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"  {t / 1e3:8.2f} {c:6d}  {before}  ->  {after}")
    return "\n".join(lines)


def _sync_report(step, ids) -> str:
    """Every synchronizing CUDA call of one step, with the innermost frames of where it came from."""
    seen: dict[str, list] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename][-6:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        seen.setdefault(where, [str(message).split(".")[0], 0])[1] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(ids)
            torch.cuda.current_stream().synchronize()  # not an op: not reported
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if not seen:
        return "  no synchronizing CUDA calls in a step"
    return "\n".join(f"  {count:4d} x {msg}: {where}" for where, (msg, count) in
                     sorted(seen.items(), key=lambda kv: -kv[1][1]))


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters
    return {"frames": counters["frames"].get("total", 0), "graphs": counters["stats"].get("unique_graphs", 0),
            "breaks": sum(counters["graph_break"].values()), "reasons": dict(counters["graph_break"])}


def _dynamo_report(start: dict, warm: dict, end: dict) -> str:
    """What torch.compile captured: frames and graphs built in the warm-up, any built again during the timed steps
    (recompiles: each costs the host a trace and a compile), and the graph breaks with their reasons (each splits
    the step into more graphs and runs the code between them eagerly)."""
    grew = lambda a, b, k: b[k] - a[k]
    lines = [f"  warm-up: {grew(start, warm, 'frames')} frames, {grew(start, warm, 'graphs')} graphs, "
             f"{grew(start, warm, 'breaks')} graph breaks; timed steps: {grew(warm, end, 'frames')} frames, "
             f"{grew(warm, end, 'graphs')} graphs (recompiles when not 0)"]
    new = {r: n - start["reasons"].get(r, 0) for r, n in end["reasons"].items() if n > start["reasons"].get(r, 0)}
    for reason, n in sorted(new.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  {n:4d} x break: " + " ".join(reason.split())[:300])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--providers", default="mltoolkit,torch.compile(mltoolkit),torch.compile")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script on the CPU (no GPU times)")
    ap.add_argument("--trace", type=Path, help="a folder for each provider's Chrome trace (gzipped)")
    a = ap.parse_args()
    if not (a.cpu or torch.cuda.is_available()):
        raise SystemExit("profile_train_step: needs a CUDA GPU (or --cpu for a smoke test)")
    device = "cpu" if a.cpu else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    (ids,) = text._gpt2_inputs({"batch": a.batch, "seq": a.seq}, torch.float32, device)
    where = torch.cuda.get_device_name() if device == "cuda" else "the CPU"
    print(f"GPT-2 small train step, batch {a.batch}, seq {a.seq}, bf16 autocast, on {where}")
    for name in a.providers.split(","):
        step = text._gpt2_step(name)
        counts = [_dynamo_counts()]
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (the compiled providers build here)
            step(ids)
        sync()
        warm_s = time.perf_counter() - t0
        counts.append(_dynamo_counts())
        times, enqueue = [], []
        for _ in range(5):  # a step ends with the optimizer's kernels: wall time after a sync is GPU-bound time
            t0 = time.perf_counter()
            step(ids)
            enqueue.append((time.perf_counter() - t0) * 1e3)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        counts.append(_dynamo_counts())
        syncs = _sync_report(step, ids) if device == "cuda" else "  (CPU run: not checked)"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(ids)
            sync()
            profiled_ms = (time.perf_counter() - t0) * 1e3
        print(f"\n== {name}: {sorted(times)[2]:.2f} ms a step (median of 5; the CPU issues it in "
              f"{sorted(enqueue)[2]:.2f} ms; warm-up {warm_s:.0f} s)")
        print("torch.compile:\n" + _dynamo_report(*counts))
        print("synchronizing calls in one step:\n" + syncs)
        print(f"kernels over {a.steps} steps:\n" + _kernel_table(prof, a.rows))
        print(_busy_table(prof, profiled_ms))
        print(f"host-side ops over {a.steps} steps, by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70),
              flush=True)
        if a.trace:
            a.trace.mkdir(parents=True, exist_ok=True)
            raw = a.trace / f"trace-{name.replace('(', '-').replace(')', '').replace('.', '_')}.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()


if __name__ == "__main__":
    main()
