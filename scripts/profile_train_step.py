#!/usr/bin/env python3
"""Where a GPT-2 small training step spends its GPU time: the benchmark's step (benchmarks/models/bench_text_models.py,
bf16 autocast, fused AdamW) under torch.profiler, for mltoolkit's model eager and compiled and for transformers'
model compiled (the target to beat). Prints, per provider, the step's median time and its top kernels by total GPU
time, then the GPU time of mltoolkit's own ops (attention, norm) against everything else.

    python scripts/profile_train_step.py [--batch 8] [--steps 3] [--providers "mltoolkit,torch.compile"]

CUDA only; about a minute on an H100 (two torch.compile builds).
"""
import argparse
import sys
import time
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--providers", default="mltoolkit,torch.compile(mltoolkit),torch.compile")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script on the CPU (no GPU times)")
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
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (the compiled providers build here)
            step(ids)
        sync()
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(5):  # a step ends with the optimizer's kernels: wall time after a sync is GPU-bound time
            t0 = time.perf_counter()
            step(ids)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                step(ids)
            sync()
        print(f"\n== {name}: {sorted(times)[2]:.2f} ms a step (median of 5; warm-up {warm_s:.0f} s); "
              f"kernels over {a.steps} steps:")
        print(_kernel_table(prof, a.rows), flush=True)


if __name__ == "__main__":
    main()
