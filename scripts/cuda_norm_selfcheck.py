#!/usr/bin/env python3
"""Self-check of the CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norm.cu) against a float64 reference.

Needs a CUDA GPU and the built extension. Calls the raw entry points of csrc/norm.h:
    norm_forward_cuda(x, residual, weight, bias, eps, is_rms) -> [y, residual_out, mean, rstd]
    norm_backward_cuda(dy, x(=s), weight, mean, rstd, dresidual_out, has_bias, is_rms) -> [dx, dweight, dbias]
and checks every combination of: layer/rms, weight/bias present or not, residual/dresidual present or not, x dtype
float32/float64/float16/bfloat16 with weight in x's dtype or float32, N in 1 7 97 123 1025 4096 8192 65536, M in
0 1 3 257; plus misaligned (scalar-path) inputs, determinism of the backward, and bad-input errors.
One line per failure, a summary, exit code 1 on any failure.

    python scripts/cuda_norm_selfcheck.py                      # imports mltoolkit._C
    python scripts/cuda_norm_selfcheck.py --module mltk_cuda_dev --path /tmp/cuda_dev/build
    python scripts/cuda_norm_selfcheck.py --bench [--compile]  # also time bf16 M=16384 N=8192
    python scripts/cuda_norm_selfcheck.py --backend cpu --quick  # the same checks on the CPU kernels
"""
import argparse
import functools
import importlib
import itertools
import math
import os
import sys
import time

import torch
from cuda_timing import expect_named_errors, median_ms  # scripts/ is sys.path[0] when a script runs

NS = [1, 7, 97, 123, 1025, 4096, 8192, 65536]
MS = [0, 1, 3, 257]
EPS = 1e-5
# (rtol, atol relative to max |ref|) per output dtype: a little over one rounding of the output dtype, or the error of
# float32 arithmetic with fast-math rsqrt for float32 outputs.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
}

failures = []
DEV = "cuda"  # --backend cpu checks the CPU kernels (norm_forward_cpu / norm_backward_cpu) with the same cases
FWD = BWD = None


def fail(case, msg):
    failures.append((case, msg))
    print(f"FAIL {case}: {msg}", flush=True)


def compare(case, name, out, ref, dtype=None, scale=None):
    """out (any dtype) vs ref (float64): |out - ref| <= rtol |ref| + atol scale, NaN never passes.
    scale: max|ref| unless given (dx passes the size of the terms that cancel in it)."""
    if out is None:  # an undefined tensor comes back as None
        fail(case, f"{name} is missing")
        return
    if tuple(out.shape) != tuple(ref.shape):
        fail(case, f"{name} shape {tuple(out.shape)} != {tuple(ref.shape)}")
        return
    dtype = dtype or out.dtype
    if out.dtype != dtype:
        fail(case, f"{name} dtype {out.dtype} != {dtype}")
        return
    if ref.numel() == 0:
        return
    rtol, atol = TOL[dtype]
    o = out.double()
    scale = max(ref.abs().max().item(), scale or 0.0)
    err = (o - ref).abs()
    bound = rtol * ref.abs() + atol * max(scale, 1e-300)
    bad = ~(err <= bound)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        rel = (o - ref).norm().item() / max(ref.norm().item(), 1e-300)
        fail(case, f"{name}: {int(bad.sum())}/{ref.numel()} elements off, first at flat index {idx}: "
                   f"{o.flatten()[idx].item():.6g} vs {ref.flatten()[idx].item():.6g}; "
                   f"max err {err.max().item():.3g}, rel L2 err {rel:.3g}")


def reference(x, res, w, b, dy, dres, is_rms):
    """float64 forward and backward of the contract in csrc/norm.h, through autograd."""
    if res is None:
        s = x
    elif x.dtype == torch.float64:
        s = x + res
    else:
        s = (x.float() + res.float()).to(x.dtype)  # add in float32, round to x's dtype
    s64 = s.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if w is not None else None
    b64 = b.double().requires_grad_(True) if b is not None else None
    if is_rms:
        mean = None
        rstd = torch.rsqrt((s64 * s64).mean(-1, keepdim=True) + EPS)
        xhat = s64 * rstd
    else:
        mean = s64.mean(-1, keepdim=True)
        rstd = torch.rsqrt(((s64 - mean) ** 2).mean(-1, keepdim=True) + EPS)
        xhat = (s64 - mean) * rstd
    y = xhat
    if w64 is not None:
        y = y * w64
    if b64 is not None:
        y = y + b64
    leaves = [t for t in (s64, w64, b64) if t is not None]
    grads = torch.autograd.grad((y * dy.double()).sum(), leaves, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    dx = grads[0].detach()
    if dres is not None:
        dx = dx + dres.double()
    dw = grads[1].detach() if w64 is not None else None
    db = grads[-1].detach() if b64 is not None else None
    return dict(s=s, y=y.detach(), mean=None if mean is None else mean.detach().squeeze(-1),
                rstd=rstd.detach().squeeze(-1), dx=dx, dw=dw, db=db)


def poison(*shapes_dtypes):
    """Fill soon-to-be-reused allocator blocks with NaN (0xFF bytes), so an unwritten output cannot pass."""
    bufs = []
    for shape, dtype in shapes_dtypes:
        n = max(1, math.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        t = torch.empty(n, dtype=torch.uint8, device="cuda")
        t.fill_(255)
        bufs.append(t)
    del bufs


def run_case(C, case, x, res, w, b, dy, dres, is_rms, check_determinism=False):
    M, N = x.shape
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if DEV == "cuda":
        poison(((M, N), x.dtype), ((M, N), x.dtype), ((M,), stats_dtype), ((M,), stats_dtype))
    y, res_out, mean, rstd = FWD(x, res, w, b, EPS, is_rms)
    ref = reference(x, res, w, b, dy, dres, is_rms)
    compare(case, "y", y, ref["y"], x.dtype)
    if res is not None:
        if res_out is None or tuple(res_out.shape) != (M, N) or res_out.dtype != x.dtype:
            fail(case, "residual_out missing or wrong shape/dtype")
        elif not torch.equal(res_out, ref["s"]):
            fail(case, f"residual_out != round(x + residual): {int((res_out != ref['s']).sum())} elements differ")
    elif res_out is not None:
        fail(case, "residual_out should be undefined without residual")
    if is_rms:
        if mean is not None:
            fail(case, "mean should be undefined for rms")
    else:
        compare(case, "mean", mean, ref["mean"], stats_dtype)
    compare(case, "rstd", rstd, ref["rstd"], stats_dtype)

    s = res_out if res is not None else x
    mean_in = None if is_rms else mean
    if rstd is None or (not is_rms and mean is None) or (res is not None and res_out is None):
        return
    if DEV == "cuda":
        poison(((M, N), x.dtype), ((N,), torch.float32), ((N,), torch.float32))
    dx, dw, db = BWD(dy, s, w, mean_in, rstd, dres, b is not None, is_rms)
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) can cancel to far below its terms (rms with N=1: 1 - xhat^2).
    g = dy.double() * (w.double() if w is not None else 1.0)
    terms = (ref["rstd"][:, None] * g.abs()).max().item() if g.numel() else 0.0
    compare(case, "dx", dx, ref["dx"], x.dtype, scale=terms)
    if w is not None:
        compare(case, "dweight", dw, ref["dw"], w.dtype)
    elif dw is not None:
        fail(case, "dweight should be undefined without weight")
    if b is not None:
        compare(case, "dbias", db, ref["db"], (w if w is not None else x).dtype)
    elif db is not None:
        fail(case, "dbias should be undefined without bias")
    if check_determinism:
        dx2, dw2, db2 = BWD(dy, s, w, mean_in, rstd, dres, b is not None, is_rms)
        y2 = FWD(x, res, w, b, EPS, is_rms)[0]
        for name, a1, a2 in (("y", y, y2), ("dx", dx, dx2), ("dweight", dw, dw2), ("dbias", db, db2)):
            if a1 is not None and not torch.equal(a1, a2):
                fail(case, f"{name} differs between two identical calls (race or nondeterminism)")


def make_inputs(M, N, dtype, pdtype, has_w, has_b, has_res, has_dres, gen, misalign=False):
    def rows(scale=1.0, offset=0.0):
        if misalign:  # contiguous, but 1 element past a 16-byte boundary: forces the scalar path
            buf = torch.empty(M * N + 1, dtype=dtype, device=DEV)
            t = buf[1:].view(M, N)
        else:
            t = torch.empty(M, N, dtype=dtype, device=DEV)
        t.copy_(torch.randn(M, N, generator=gen, device=DEV, dtype=torch.float64) * scale + offset)
        return t

    x = rows(1.0, 0.5)  # offset mean: exercises the two-pass variance
    res = rows(1.0, -0.25) if has_res else None
    dy = rows()
    dres = rows() if has_dres else None
    w = (torch.randn(N, generator=gen, device=DEV, dtype=torch.float64) * 0.2 + 1.0).to(pdtype) if has_w else None
    b = (torch.randn(N, generator=gen, device=DEV, dtype=torch.float64) * 0.2).to(pdtype) if has_b else None
    return x, res, w, b, dy, dres


def dtype_name(t):
    return str(t).replace("torch.", "")


def check_all(C, quick=False):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(1234)
    dtype_pairs = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float64, torch.float32),
                   (torch.float16, torch.float16), (torch.float16, torch.float32),
                   (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
    flag_sets = []
    for is_rms in (False, True):
        for has_w, has_b in itertools.product((False, True), repeat=2):
            if is_rms and has_b:
                continue  # the contract's rms has no bias
            for has_res, has_dres in ((False, False), (True, False), (True, True), (False, True)):
                flag_sets.append((is_rms, has_w, has_b, has_res, has_dres))
    ns = NS if not quick else [1, 97, 1025, 8192]
    ms = MS if not quick else [0, 3, 257]
    count = 0
    for (dtype, pdtype), flags in itertools.product(dtype_pairs, flag_sets):
        is_rms, has_w, has_b, has_res, has_dres = flags
        if pdtype != dtype and not (has_w or has_b):
            continue  # same as the unmixed case
        for N, M in itertools.product(ns, ms):
            case = (f"{'rms' if is_rms else 'layer'} x={dtype_name(dtype)} w/b={dtype_name(pdtype)} "
                    f"w={int(has_w)} b={int(has_b)} res={int(has_res)} dres={int(has_dres)} M={M} N={N}")
            try:
                inputs = make_inputs(M, N, dtype, pdtype, has_w, has_b, has_res, has_dres, gen)
                run_case(C, case, *inputs, is_rms, check_determinism=(M == 257))
            except Exception as e:  # noqa: BLE001 - report and go on
                fail(case, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            count += 1
    # Misaligned (scalar, and for large N the re-reading / chunked) paths.
    for dtype, is_rms, N in itertools.product((torch.float32, torch.bfloat16, torch.float16, torch.float64),
                                              (False, True), (8, 4096, 8192)):
        case = (f"misaligned {'rms' if is_rms else 'layer'} x={dtype_name(dtype)} M=33 N={N} w=1 "
                f"b={int(not is_rms)} res=1 dres=1")
        try:
            inputs = make_inputs(33, N, dtype, dtype, True, not is_rms, True, True, gen, misalign=True)
            run_case(C, case, *inputs, is_rms, check_determinism=True)
        except Exception as e:  # noqa: BLE001
            fail(case, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        count += 1
    return count


def check_bad_inputs(C):
    x = torch.randn(4, 8, device=DEV)
    w = torch.ones(8, device=DEV)
    rstd = torch.ones(4, device=DEV)
    cases = [
        ("x on cpu", lambda: FWD(x.cpu(), None, None, None, EPS, False), "x") if DEV == "cuda" else None,
        ("x 3-D", lambda: FWD(x.view(2, 2, 8), None, None, None, EPS, False), "x"),
        ("x int", lambda: FWD(x.int(), None, None, None, EPS, False), "x"),
        ("x non-contiguous", lambda: FWD(x.t(), None, None, None, EPS, False), "x"),
        ("weight wrong size", lambda: FWD(x, None, torch.ones(7, device=DEV), None, EPS, False),
         "weight"),
        ("weight on cpu", lambda: FWD(x, None, w.cpu(), None, EPS, False), "weight") if DEV == "cuda" else None,
        ("weight float16 for float32 x", lambda: FWD(x, None, w.half(), None, EPS, False), "weight"),
        ("bias wrong dtype", lambda: FWD(x.half(), None, None, w.double(), EPS, False), "bias"),
        ("residual wrong shape", lambda: FWD(x, x[:2], None, None, EPS, False), "residual"),
        ("residual wrong dtype", lambda: FWD(x, x.double(), None, None, EPS, False), "residual"),
        ("dy wrong shape", lambda: BWD(x[:2], x, None, rstd, rstd, None, False, False), "dy"),
        ("mean missing (layer)", lambda: BWD(x, x, None, None, rstd, None, False, False), "mean"),
        ("rstd wrong dtype", lambda: BWD(x, x, None, None, rstd.double(), None, False, True), "rstd"),
        ("rstd wrong size", lambda: BWD(x, x, None, None, rstd[:3], None, False, True), "rstd"),
        ("dresidual_out wrong dtype",
         lambda: BWD(x, x, None, None, rstd, x.half(), False, True), "dresidual_out"),
    ]
    cases = [c for c in cases if c is not None]
    return expect_named_errors(cases, fail)


def bench(C, use_compile):
    import torch.nn.functional as F

    M, N, dtype = 16384, 8192, torch.bfloat16
    x = torch.randn(M, N, device=DEV, dtype=dtype)
    dy = torch.randn(M, N, device=DEV, dtype=dtype)
    w = torch.randn(N, device=DEV, dtype=dtype) * 0.1 + 1
    b = torch.randn(N, device=DEV, dtype=dtype) * 0.1
    nbytes = M * N * x.element_size()

    timeit = functools.partial(median_ms, reps=30)

    print(f"\nbench: {torch.cuda.get_device_name()}, bf16 M={M} N={N} (GB/s counts bytes read + written once)")
    for is_rms in (False, True):
        kind = "rms" if is_rms else "layer"
        bb = None if is_rms else b
        y, _, mean, rstd = FWD(x, None, w, bb, EPS, is_rms)
        t_f = timeit(lambda: FWD(x, None, w, bb, EPS, is_rms))
        t_b = timeit(lambda: BWD(dy, x, w, mean, rstd, None, bb is not None, is_rms))
        print(f"  mltk {kind:5s} fwd {t_f * 1e3:8.1f} us {2 * nbytes / t_f / 1e6:7.0f} GB/s   "
              f"bwd {t_b * 1e3:8.1f} us {3 * nbytes / t_b / 1e6:7.0f} GB/s")
        wr = w.detach().requires_grad_(True)
        br = b.detach().requires_grad_(True)
        if is_rms:
            ref_fn = lambda xx, ww, bb_: F.rms_norm(xx, (N,), ww, EPS)  # noqa: E731
            params = [wr]
        else:
            ref_fn = lambda xx, ww, bb_: F.layer_norm(xx, (N,), ww, bb_, EPS)  # noqa: E731
            params = [wr, br]
        fns = [("eager", ref_fn)]
        if use_compile:
            fns.append(("compile", torch.compile(ref_fn)))
        for name, fn in fns:
            xr = x.detach().requires_grad_(True)
            with torch.no_grad():
                t_f = timeit(lambda: fn(x, w, b))
            out = fn(xr, wr, br)
            t_b = timeit(lambda: torch.autograd.grad(out, [xr] + params, dy, retain_graph=True))
            print(f"  {name:7s}{kind:5s} fwd {t_f * 1e3:8.1f} us {2 * nbytes / t_f / 1e6:7.0f} GB/s   "
                  f"bwd {t_b * 1e3:8.1f} us {3 * nbytes / t_b / 1e6:7.0f} GB/s (x grad + weight grads)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default="mltoolkit._C", help="extension module to import (default mltoolkit._C)")
    ap.add_argument("--path", action="append", default=[], help="directory to prepend to sys.path (repeatable)")
    ap.add_argument("--backend", choices=("cuda", "cpu"), default="cuda", help="kernels to check (default cuda)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--bench", action="store_true", help="also time bf16 M=16384 N=8192")
    ap.add_argument("--compile", action="store_true", help="with --bench: also time torch.compile")
    args = ap.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for p in reversed(args.path):
        sys.path.insert(0, p)
    global DEV, FWD, BWD
    DEV = args.backend
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    C = importlib.import_module(args.module)
    for fn in (f"norm_forward_{DEV}", f"norm_backward_{DEV}"):
        if not hasattr(C, fn):
            print(f"{args.module} has no {fn}" + (" (built without CUDA?)" if DEV == "cuda" else ""))
            return 2
    FWD = getattr(C, f"norm_forward_{DEV}")
    BWD = getattr(C, f"norm_backward_{DEV}")
    t0 = time.time()
    n = check_all(C, quick=args.quick)
    n += check_bad_inputs(C)
    where = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"\n{n} cases, {len(failures)} failures, {time.time() - t0:.1f} s on {where}")
    if args.bench and DEV == "cuda":
        bench(C, args.compile)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
