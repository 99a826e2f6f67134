#!/usr/bin/env python3
"""Host time per call of mltoolkit's ops against torch's, on tensors so small that the kernels take next to no time:
what the CPU spends issuing one call (argument checks, backend choice, custom-op dispatch, autograd, the kernel
launch: Triton's launcher or a CUDA C++ call). The 2026-11-27 profile of the GPT-2 train step found the GPU waiting
on the host (mltoolkit compiled: ~25 ms of kernels in a 40 ms step), and these are the ops that step calls about 90
times a step (norms, attention, cross-entropy).

For each op: eager forward, eager forward + backward, and the forward inside a torch.compile(fullgraph=True) graph
(20 calls per graph), each in microseconds per call, the mean over `--calls` back-to-back calls after a warm-up with
one synchronization at the end (the GPU runs far behind the host: the host time is what is measured).

    python scripts/host_overhead.py [--device cuda] [--calls 200] [--cprofile]

--cprofile adds, per op, the Python functions that take the most host time over the eager forward + backward calls
(cProfile, own time): where the microseconds go on the machine at hand (the GPU machine's CPU is not this VM's).
"""
import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import mltoolkit
from mltoolkit import ops


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _per_call_us(fn, calls: int, device: str) -> float:
    for _ in range(5):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start  # host time: the queue is far from full at these sizes
    _sync(device)
    return elapsed / calls * 1e6


def _cases(device, dtype):
    x = torch.randn(8, 768, device=device, dtype=dtype)
    w, b = torch.ones(768, device=device, dtype=dtype), torch.zeros(768, device=device, dtype=dtype)
    q = torch.randn(1, 12, 16, 64, device=device, dtype=dtype)
    logits = torch.randn(16, 1000, device=device, dtype=dtype)
    target = torch.randint(0, 1000, (16,), device=device)
    return {
        "layer_norm": ((x, w, b), lambda x, w, b: ops.layer_norm(x, (768,), w, b),
                       lambda x, w, b: F.layer_norm(x, (768,), w, b)),
        "rms_norm": ((x, w), lambda x, w: ops.rms_norm(x, (768,), w), lambda x, w: F.rms_norm(x, (768,), w)),
        "attention (causal)": ((q, q, q),
                               lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "cross_entropy": ((logits, target), lambda x, t: ops.cross_entropy(x, t), lambda x, t: F.cross_entropy(x, t)),
    }


def _print_profile(name, fn, calls: int, device: str, top: int = 15) -> None:
    """The `top` functions by own time over `calls` calls of fn, in microseconds per call."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    _sync(device)
    stats = pstats.Stats(profiler)
    print(f"  {name}: own host time per eager fwd+bwd call, us (cProfile's overhead included)")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{'/'.join(file.split('/')[-2:])}:{line}({func})"
        print(f"    {tottime / calls * 1e6:8.1f} own {cumtime / calls * 1e6:8.1f} cum {ncalls / calls:5.1f}x  "
              f"{where[-90:]}")


def _repeat(fn, n=20):
    """n calls, each on the previous one's output (unused outputs would be dropped from the compiled graph)."""
    def many(first, *rest):
        for _ in range(n):
            out = fn(first, *rest)
            first = out if out.shape == first.shape else first + out  # cross_entropy: a scalar
        return first
    return many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--cprofile", action="store_true", help="per op: the functions with the most own host time")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"host time per call, us ({args.device}, {dtype}, mltoolkit {mltoolkit.__version__}, torch "
          f"{torch.__version__})")
    print(f"  {'op':<20} {'mode':<16} {'mltoolkit':>10} {'torch':>10}")
    for name, (inputs, ours, theirs) in _cases(args.device, dtype).items():
        rows = {}
        for who, fn in (("mltoolkit", ours), ("torch", theirs)):
            rows.setdefault("eager fwd", {})[who] = _per_call_us(lambda: fn(*inputs), args.calls, args.device)
            leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]

            def fwd_bwd():
                fn(*leaves).float().sum().backward()
            rows.setdefault("eager fwd+bwd", {})[who] = _per_call_us(fwd_bwd, args.calls, args.device)
            if args.cprofile and who == "mltoolkit":
                _print_profile(name, fwd_bwd, args.calls, args.device)
            try:
                compiled = torch.compile(_repeat(fn), fullgraph=True)
                with torch.no_grad():
                    per_graph = _per_call_us(lambda: compiled(*inputs), max(1, args.calls // 20), args.device)
                rows.setdefault("compiled fwd", {})[who] = per_graph / 20
            except Exception as exc:  # report and go on: the point is the table
                print(f"  {name} {who}: torch.compile failed: {type(exc).__name__}: {exc}"[:200])
        for mode, by in rows.items():
            print(f"  {name:<20} {mode:<16} {by.get('mltoolkit', float('nan')):10.1f} "
                  f"{by.get('torch', float('nan')):10.1f}")


if __name__ == "__main__":
    main()
