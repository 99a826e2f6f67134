"""Self-check of the CUDA multi-tensor optimizer kernels (csrc/cuda/fused_optim.cu) on a GPU: a few correctness
cases against the CPU kernels / torch, the bad-input errors, then step times (median ms, CUDA events) of the CUDA C++
and Triton backends against torch's own, for N parameters in 200 tensors:
    AdamW: cuda, triton, torch.optim.AdamW(fused=True), torch.optim.AdamW(foreach=True)
    LAMB:  cuda, triton, the per-tensor loop (the reference backend)
    clip:  cuda, triton, torch.nn.utils.clip_grad_norm_ (foreach)
The ratios decide which of cuda / triton stays first in the backend tables (the default).
    python scripts/optim_cuda_selfcheck.py [--sizes 10e6,100e6] [--reps 20] [--no-bench]
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import expect_named_errors, median_ms  # noqa: E402

import mltoolkit  # noqa: E402
from mltoolkit import _ext  # noqa: E402
from mltoolkit.ops import fused_adam, fused_lamb  # noqa: E402, F401  (register the ops the benchmark calls)
from mltoolkit.ops.reference.fused_adam import fused_adamw_ as reference_adamw_  # noqa: E402

FAILURES = []


def fail(case, msg):
    FAILURES.append(case)
    print(f"FAIL {case}: {msg}")


def close(case, got, want, rtol, atol):
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        print(f"ok   {case}")
    except AssertionError as e:
        fail(case, str(e).splitlines()[0:3])


def correctness():
    C = _ext._C
    shapes = [(1,), (7,), (97,), (123, 5), (0,), (65537,), (3 * 65536 + 5,)] * 6  # 42 tensors: > one table
    g = torch.Generator().manual_seed(0)
    mk = lambda scale=1.0: [torch.randn(s, generator=g) * scale for s in shapes]  # noqa: E731
    for amsgrad, maximize in ((False, False), (True, True)):
        cpu = [mk(), mk(), mk(0.1), [t.abs() for t in mk(0.01)]]
        cpu.append([t * 1.5 for t in cpu[3]] if amsgrad else [])
        cpu.append([torch.tensor(2.0) for _ in shapes])
        gpu = [[t.cuda() if i < 5 else t.clone() for t in lst] for i, lst in enumerate(cpu)]
        hp = (1e-2, 0.9, 0.99, 0.05, 1e-8, amsgrad, maximize)
        C.fused_adamw_cuda(*gpu, *hp)
        reference_adamw_(*cpu, *hp)
        for k in (0, 2, 3):
            close(f"adamw amsgrad={amsgrad} maximize={maximize} list {k}",
                  torch.cat([t.flatten().cpu() for t in gpu[k]]), torch.cat([t.flatten() for t in cpu[k]]), 1e-5, 1e-6)
    for dtype in (torch.float32, torch.float64):
        cpu = [[t.to(dtype) for t in lst] for lst in (mk(), mk(0.1), mk(0.01), [t.abs() for t in mk(0.001)])]
        gpu = [[t.cuda() for t in lst] for lst in cpu]
        args = (1e-2, 0.9, 0.999, 1e-6, 0.01, 3, True, True, True, 0.0)
        C.fused_lamb_cuda(*gpu, *args)
        C.fused_lamb_cpu(*cpu, *args)
        tol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-14)
        close(f"lamb {dtype}", torch.cat([t.flatten().cpu() for t in gpu[0]]), torch.cat([t.flatten() for t in cpu[0]]),
              *tol)
    for norm_type in (2.0, math.inf, 1.0):
        grads = [t.cuda() for t in mk() if t.numel()]  # torch's inf norm refuses empty tensors
        ref = [torch.nn.Parameter(torch.empty_like(t)) for t in grads]
        for p, t in zip(ref, grads):
            p.grad = t.clone()
        total = C.fused_clip_grad_norm_cuda(grads, 0.5, norm_type, False)
        want = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type)
        close(f"clip norm {norm_type} total", total, want, 1e-5, 0)
        close(f"clip norm {norm_type} grads", torch.cat([t.flatten() for t in grads]),
              torch.cat([p.grad.flatten() for p in ref]), 1e-5, 1e-7)
    x = [torch.randn(5, device="cuda")]
    s = [torch.tensor(0.0)]
    n = expect_named_errors([
        ("adamw grads dtype", lambda: C.fused_adamw_cuda(x, [x[0].half()], x, x, [], s, 1e-3, 0.9, 0.999, 0.0, 1e-8,
                                                         False, False), "grads[0]"),
        ("adamw cpu param", lambda: C.fused_adamw_cuda([torch.zeros(5)], x, x, x, [], s, 1e-3, 0.9, 0.999, 0.0, 1e-8,
                                                       False, False), "params[0]"),
        ("lamb fp16", lambda: C.fused_lamb_cuda([x[0].half()], x, x, x, 1e-3, 0.9, 0.999, 1e-6, 0.0, 1, True, True,
                                                True, 0.0), "params[0]"),
        ("clip norm_type", lambda: C.fused_clip_grad_norm_cuda(x, 1.0, -2.0, False), "norm_type"),
    ], fail)
    print(f"bad input: {n} cases")


def bench_size(total, reps):
    from mltoolkit.backends import backend

    n_t = 200
    per = int(total) // n_t
    shapes = [(per + (i % 7) * 3,) for i in range(n_t)]
    ps = [torch.randn(s, device="cuda") for s in shapes]
    gs = [torch.randn_like(p) for p in ps]
    rows = []
    # AdamW
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    st = [torch.tensor(0.0) for _ in ps]
    op = torch.ops.mltoolkit.fused_adamw_
    for name in ("cuda", "triton"):
        with backend(name):
            rows.append((f"adamw {name}", median_ms(lambda: op(ps, gs, m, v, [], st, 1e-3, 0.9, 0.999, 0.01, 1e-8,
                                                             False, False), reps)))
    for kind in ("fused", "foreach"):
        params = [torch.nn.Parameter(p.clone()) for p in ps]
        for p, g in zip(params, gs):
            p.grad = g
        opt = torch.optim.AdamW(params, **{kind: True})
        rows.append((f"adamw torch {kind}", median_ms(opt.step, reps)))
        del opt, params
    # LAMB
    lamb = torch.ops.mltoolkit.fused_lamb_
    for name in ("cuda", "triton", "reference"):
        with backend(name):
            r = reps if name != "reference" else max(3, reps // 4)
            rows.append((f"lamb {name}", median_ms(lambda: lamb(ps, gs, m, v, 1e-3, 0.9, 0.999, 1e-6, 0.01, 5, True,
                                                                True, True, 0.0), r)))
    # clip (max_norm large: the grads stay as they are)
    clip = torch.ops.mltoolkit.fused_clip_grad_norm_
    for name in ("cuda", "triton"):
        with backend(name):
            rows.append((f"clip {name}", median_ms(lambda: clip(gs, 1e30, 2.0, False), reps)))
    holders = [torch.nn.Parameter(torch.empty_like(g)) for g in gs]
    for p, g in zip(holders, gs):
        p.grad = g
    rows.append(("clip torch foreach", median_ms(lambda: torch.nn.utils.clip_grad_norm_(holders, 1e30), reps)))
    print(f"--- {total / 1e6:.0f}M float32 parameters in {n_t} tensors (median ms over {reps})")
    base = dict(rows)
    against = {"adamw": ("adamw torch fused", "torch fused"), "lamb": ("lamb reference", "per-tensor loop"),
               "clip": ("clip torch foreach", "torch")}
    for name, ms in rows:
        key, label = against[name.split()[0]]
        print(f"{name:24s} {ms:9.3f} ms   x{base[key] / ms:5.2f} vs {label}")


def bench(sizes, reps):
    for total in sizes:
        bench_size(total, reps)
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10e6,100e6")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-bench", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available() or _ext.cuda_unavailable():
        print(f"skipped: {_ext.cuda_unavailable() or 'no GPU'}")
        return 0
    print(torch.cuda.get_device_name(), "mltoolkit", mltoolkit.__name__)
    correctness()
    if not a.no_bench:
        bench([float(s) for s in a.sizes.split(",")], a.reps)
    print(f"{'passed' if not FAILURES else 'failed'}: {len(FAILURES)} failures")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
