#!/usr/bin/env python3
"""Self-check of the CUDA convolution kernels (csrc/cuda/conv.cu) against the plain-PyTorch reference, and their
speed against cuDNN.

Needs a CUDA GPU and the built extension. Calls the raw entry points of csrc/conv.h:
    conv2d_forward_cuda(x, weight, bias, stride, padding, dilation, groups, residual, activation) -> [y]
    conv2d_backward_cuda(dy, x, weight, stride, padding, dilation, groups, output_mask) -> [dx, dw, db]
on a spread of cases: every kernel family (tensor-core fp16/bf16 NHWC and NCHW, SIMT float32/float64 and odd channel
counts, depthwise both layouts), strides, padding, dilation, groups, ragged tiles, the fused epilogue (bias, residual,
the 7 activations), expanded (stride-0) gradients, determinism of the backward, and bad-input errors.

Rule (flash-attention's): max|ours - ref| <= 2 * max|torch_same_dtype - ref| + eps * max(1, max|ref|), where ref is
the reference (mltoolkit/ops/reference/conv.py) in float64 and torch_same_dtype the eager torch sequence (cuDNN) in
the input dtype (TF32 off). One row per case; a failing or raising case does not stop the rest; exit code 1 on any
failure. Then times ResNet-50's 3x3 and 1x1 layers (fp16, channels_last; batch 32 with --quick, 256 without) against
F.conv2d with cudnn.benchmark on, CUDA events, median: TFLOP/s and the ratio.

    python scripts/cuda_conv_selfcheck.py [--quick] [--no-bench] [--only SUBSTRING]
    python scripts/cuda_conv_selfcheck.py --backend cpu --quick   # the same checks on the C++ CPU kernels
"""
import argparse
import functools
import importlib
import math
import os
import sys
import time
import traceback
import zlib

import torch
import torch.nn.functional as F
from cuda_timing import median_ms  # scripts/ is sys.path[0] when a script runs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mltoolkit.ops.reference import conv as ref  # noqa: E402

EPS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}
ACTS = ["none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish"]
DEV = "cuda"  # --backend cpu runs the same checks on the C++ CPU kernels
FWD = BWD = None
ONLY = None
rows = []  # (case, status, details)


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    return float(torch.nan_to_num(d, nan=math.inf).max())


def judge(name, ours, want, base, dtype, problems, errs):
    e_ours, e_base = max_err(ours, want), max_err(base, want)
    eps = EPS[dtype] * max(1.0, float(want.abs().max()) if want.numel() else 0.0)
    errs.append(f"{name} {e_ours:.2e}/{e_base:.2e}")
    if not e_ours <= 2 * e_base + eps:
        problems.append(f"{name} max err {e_ours:.3g} > 2 x {e_base:.3g} + {eps:.2g}")


def torch_forward(x, w, b, stride, padding, dilation, groups, residual, act):
    """The eager sequence in x's dtype (the baseline of the error rule)."""
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return ref.activation(y, act)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def record(name, problems, errs):
    rows.append((name, "FAIL" if problems else "ok", "; ".join(problems) if problems else "  ".join(errs)))
    print(f"{rows[-1][1]:4s}  {name:64s}  {rows[-1][2]}", flush=True)


def check_case(name, n, c, h, w, k, r, s, dtype, cl=False, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
               groups=1, bias=True, residual=False, act="none", dy_kind="plain", determinism=False, wcl=False):
    name = f"{str(dtype)[6:]} {'NHWC' if cl else 'NCHW'} {name}"
    if ONLY and ONLY not in name:
        return
    gen = torch.Generator(device=DEV).manual_seed(zlib.crc32(name.encode()))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEV) * scale).to(dtype)

    try:
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = rnd(n, c, h, w).contiguous(memory_format=fmt)
        wt = rnd(k, c // groups, r, s, scale=1.0 / math.sqrt(c // groups * r * s))
        if wcl:
            wt = wt.contiguous(memory_format=torch.channels_last)
        b = rnd(k) if bias else None
        p, q = ref.output_size(h, w, r, s, stride, padding, dilation)
        res = rnd(n, k, p, q).contiguous(memory_format=fmt) if residual else None
        args = (list(stride), list(padding), list(dilation), groups)
        (y,) = FWD(x, wt, b, *args, res, act)
        sync()
        problems, errs = [], []
        if tuple(y.shape) != (n, k, p, q) or y.dtype != dtype or not y.is_contiguous(memory_format=fmt):
            problems.append(f"y shape/dtype/layout {tuple(y.shape)} {y.dtype} {y.stride()}")
        f64 = torch.float64
        want = ref.conv2d_forward(x.to(f64), wt.to(f64), None if b is None else b.to(f64), *args,
                                  None if res is None else res.to(f64), act)[0]
        base = torch_forward(x, wt, b, *args, res, act)
        if not problems:
            judge("y", y, want, base, dtype, problems, errs)

        if dy_kind == "expanded":  # what .sum().backward() hands down
            dy = torch.ones((), device=DEV, dtype=dtype).expand(n, k, p, q)
        else:
            dy = rnd(n, k, p, q).contiguous(memory_format=fmt)
        mask = [True, True, bias]
        dx, dw, db = BWD(dy, x, wt, *args, mask)
        sync()
        if not problems:
            if tuple(dx.shape) != tuple(x.shape) or not dx.is_contiguous(memory_format=fmt):
                problems.append(f"dx shape/layout {tuple(dx.shape)} {dx.stride()}")
            wfmt = torch.channels_last if wcl else torch.contiguous_format
            if tuple(dw.shape) != tuple(wt.shape) or not dw.is_contiguous(memory_format=wfmt):
                problems.append(f"dw shape/layout {tuple(dw.shape)} {dw.stride()}")
            if bias and tuple(db.shape) != (k,):
                problems.append(f"db shape {tuple(db.shape)}")
            if not bias and db is not None:
                problems.append("db returned without being asked for")
        if not problems:
            rdx, rdw, rdb = ref.conv2d_backward(dy.to(f64), x.to(f64), wt.to(f64), *args, mask)
            bdx = torch.nn.grad.conv2d_input(list(x.shape), wt, dy, *args)
            bdw = torch.nn.grad.conv2d_weight(x, list(wt.shape), dy, *args)
            judge("dx", dx, rdx, bdx, dtype, problems, errs)
            judge("dw", dw, rdw, bdw, dtype, problems, errs)
            if bias:
                judge("db", db, rdb, dy.sum(dim=(0, 2, 3)), dtype, problems, errs)
        if determinism and not problems:
            again = BWD(dy, x, wt, *args, mask)
            (y2,) = FWD(x, wt, b, *args, res, act)
            for nm, u, v in (("y", y, y2), ("dx", dx, again[0]), ("dw", dw, again[1]), ("db", db, again[2])):
                if u is not None and not torch.equal(u, v):
                    problems.append(f"{nm} differs between two identical calls")
        record(name, problems, errs)
    except Exception as e:  # noqa: BLE001 - report and go on
        msg = str(e).splitlines()[0] if str(e) else ""
        record(name, [f"raised {type(e).__name__}: {msg}"], [])
        if os.environ.get("MLTK_SELFCHECK_TRACE"):
            traceback.print_exc()


def all_cases(quick):
    half = (torch.float16, torch.bfloat16)
    for dt in half:
        for cl in (True, False):
            # tensor cores: ResNet-like 3x3, ragged rows (N*P*Q not a multiple of 128), two column tiles, a ragged
            # channel block (C = 40), strides, dilation, groups, 1x1
            check_case("3x3 C64 K64 14x14 pad1", 2, 64, 14, 14, 64, 3, 3, dt, cl, padding=(1, 1), determinism=True)
            check_case("3x3 C40 K192 9x11 pad1 stride2", 3, 40, 9, 11, 192, 3, 3, dt, cl, stride=(2, 2),
                       padding=(1, 1))
            check_case("1x1 C64 K136 7x5", 2, 64, 7, 5, 136, 1, 1, dt, cl, determinism=True)
            check_case("5x3 C16 K24 dil(2,1) pad(3,1) stride(1,2)", 2, 16, 12, 9, 24, 5, 3, dt, cl,
                       stride=(1, 2), padding=(3, 1), dilation=(2, 1))
            check_case("3x3 grouped g4 C64 K128", 2, 64, 10, 10, 128, 3, 3, dt, cl, padding=(1, 1), groups=4)
            check_case("3x3 C32 K64 1x1 image pad1", 1, 32, 1, 1, 64, 3, 3, dt, cl, padding=(1, 1))
            # SIMT: channels not multiples of 8
            check_case("7x7 C3 K16 stride2 pad3", 2, 3, 19, 17, 16, 7, 7, dt, cl, stride=(2, 2), padding=(3, 3))
            check_case("3x3 g3 C6 K12", 2, 6, 9, 8, 12, 3, 3, dt, cl, padding=(1, 1), groups=3)
            # depthwise: vectorized (C % 8 == 0) and scalar NHWC, multiplier 2 (SIMT)
            check_case("depthwise 3x3 C32 stride2", 2, 32, 13, 11, 32, 3, 3, dt, cl, stride=(2, 2), padding=(1, 1),
                       groups=32)
            check_case("depthwise 5x5 C6 dil2", 2, 6, 12, 10, 6, 5, 5, dt, cl, padding=(4, 4), dilation=(2, 2),
                       groups=6)
            check_case("depthwise x2 3x3 C8 K16", 2, 8, 9, 9, 16, 3, 3, dt, cl, padding=(1, 1), groups=8)
        for act in ACTS:  # the epilogue on each kernel family
            check_case(f"epilogue {act} tc", 2, 32, 9, 9, 48, 3, 3, dt, True, padding=(1, 1), residual=True,
                       act=act)
            if not quick or act in ("silu", "gelu"):
                check_case(f"epilogue {act} simt", 2, 5, 9, 9, 7, 3, 3, dt, True, padding=(1, 1), residual=True,
                           act=act)
                check_case(f"epilogue {act} depthwise", 2, 16, 9, 9, 16, 3, 3, dt, False, padding=(1, 1),
                           groups=16, residual=True, act=act)
        check_case("expanded dy, no bias, weight channels_last", 2, 32, 8, 8, 64, 3, 3, dt, True, padding=(1, 1),
                   bias=False, dy_kind="expanded", wcl=True)
    for dt in (torch.float32, torch.float64):
        for cl in (True, False):
            check_case("3x3 C16 K24 pad1 stride2", 2, 16, 11, 9, 24, 3, 3, dt, cl, stride=(2, 2), padding=(1, 1),
                       determinism=True)
            check_case("5x3 g2 C6 K10 dil(1,2)", 2, 6, 9, 12, 10, 5, 3, dt, cl, padding=(2, 2), dilation=(1, 2),
                       groups=2)
            check_case("depthwise 3x3 C12", 2, 12, 7, 9, 12, 3, 3, dt, cl, padding=(1, 1), groups=12)
            check_case("epilogue gelu_tanh + residual", 2, 8, 7, 7, 12, 3, 3, dt, cl, padding=(1, 1),
                       residual=True, act="gelu_tanh")
    if not quick:
        for dt in half:  # a larger reduction: split-K partials over many pixels
            check_case("3x3 C128 K128 28x28 batch8", 8, 128, 28, 28, 128, 3, 3, dt, True, padding=(1, 1),
                       determinism=True)


def check_bad_inputs():
    x = torch.randn(2, 8, 6, 6, device=DEV, dtype=torch.float16)
    w = torch.randn(8, 8, 3, 3, device=DEV, dtype=torch.float16)
    dy = torch.randn(2, 8, 4, 4, device=DEV, dtype=torch.float16)
    other = "meta" if DEV == "cpu" else "cpu"
    a = ([1, 1], [0, 0], [1, 1], 1)
    cases = [
        ("x on another device", lambda: FWD(x.to(other), w, None, *a, None, "none"),
         f"x must be a {DEV.upper()} tensor"),
        ("weight dtype", lambda: FWD(x, w.float(), None, *a, None, "none"), "weight"),
        ("weight channels", lambda: FWD(x, w[:, :4], None, *a, None, "none"), "weight"),
        ("bias shape", lambda: FWD(x, w, torch.zeros(7, device=DEV, dtype=torch.float16), *a, None, "none"),
         "bias"),
        ("residual shape", lambda: FWD(x, w, None, *a, torch.zeros_like(x), "none"), "residual"),
        ("activation", lambda: FWD(x, w, None, *a, None, "tanh"), "activation"),
        ("groups", lambda: FWD(x, w, None, [1, 1], [0, 0], [1, 1], 3, None, "none"), "groups"),
        ("empty output", lambda: FWD(x, torch.zeros(8, 8, 9, 9, device=DEV, dtype=torch.float16), None, *a,
                                     None, "none"), "output size"),
        ("dy shape", lambda: BWD(dy[:, :4], x, w, *a, [True, True, True]), "dy"),
        ("output_mask", lambda: BWD(dy, x, w, *a, [True, True]), "output_mask"),
        ("int x", lambda: FWD(x.long(), w.long(), None, *a, None, "none"), "x must be float"),
    ]
    for name, fn, needle in cases:
        if ONLY and ONLY not in f"bad input: {name}":
            continue
        try:
            fn()
        except RuntimeError as e:
            ok = needle in str(e)
            rows.append((f"bad input: {name}", "ok" if ok else "FAIL",
                         str(e).splitlines()[0][:100] if ok else f"error does not mention '{needle}': {e}"))
        except Exception as e:  # noqa: BLE001
            rows.append((f"bad input: {name}", "FAIL", f"raised {type(e).__name__} instead of RuntimeError"))
        else:
            rows.append((f"bad input: {name}", "FAIL", "no error raised"))
        print(f"{rows[-1][1]:4s}  {rows[-1][0]:64s}  {rows[-1][2]}", flush=True)


# ResNet-50 (torchvision v1.5): (C, K, H=W of the input, R, stride) of the distinct 3x3 and 1x1 convolutions; --quick
# times the first four and the 1x1 layers marked by QUICK.
RESNET50 = [
    (64, 64, 56, 3, 1), (128, 128, 28, 3, 1), (256, 256, 14, 3, 1), (512, 512, 7, 3, 1),
    (128, 128, 56, 3, 2), (256, 256, 28, 3, 2), (512, 512, 14, 3, 2),
    (64, 64, 56, 1, 1), (64, 256, 56, 1, 1), (256, 64, 56, 1, 1), (256, 128, 56, 1, 1), (128, 512, 28, 1, 1),
    (512, 128, 28, 1, 1), (512, 256, 28, 1, 1), (256, 1024, 14, 1, 1), (1024, 256, 14, 1, 1),
    (1024, 512, 14, 1, 1), (512, 2048, 7, 1, 1), (2048, 512, 7, 1, 1),
]
QUICK = [0, 1, 2, 3, 8, 9, 15, 17]


def bench(batch, reps, quick):
    timeit = functools.partial(median_ms, reps=reps)

    torch.backends.cudnn.benchmark = True
    print(f"\nbench on {torch.cuda.get_device_name()}: ResNet-50 layers, fp16 channels_last, batch {batch}, "
          f"median of {reps} (ms, TFLOP/s); ratio = mltk / cuDNN speed")
    print(f"{'layer':28s} {'fwd mltk':>16s} {'fwd cudnn':>16s} {'ratio':>6s} {'bwd mltk':>16s} {'bwd cudnn':>16s} "
          f"{'ratio':>6s}")
    ratios = {}
    for c, k, hw, r, st in [RESNET50[i] for i in QUICK] if quick else RESNET50:
        pad = r // 2
        x = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        w = (torch.randn(k, c, r, r, device="cuda", dtype=torch.float16) / math.sqrt(c * r * r)).contiguous(
            memory_format=torch.channels_last)
        p = (hw + 2 * pad - r) // st + 1
        dy = torch.randn(batch, k, p, p, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        a = ([st, st], [pad, pad], [1, 1], 1)
        flops = 2.0 * batch * k * p * p * c * r * r
        tf = timeit(lambda: FWD(x, w, None, *a, None, "none"))
        tc = timeit(lambda: F.conv2d(x, w, None, st, pad))
        xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        yg = F.conv2d(xg, wg, None, st, pad)
        tb = timeit(lambda: BWD(dy, x, w, *a, [True, True, False]))
        tcb = timeit(lambda: torch.autograd.grad(yg, (xg, wg), dy, retain_graph=True))
        name = f"{r}x{r} {c}->{k} {hw}x{hw} s{st}"
        fr, br = tc / tf, tcb / tb
        ratios.setdefault(f"{r}x{r}", []).append((fr, br))
        print(f"{name:28s} {tf:7.3f} {flops / tf / 1e9:6.0f}TF {tc:7.3f} {flops / tc / 1e9:6.0f}TF {fr:6.2f} "
              f"{tb:7.3f} {2 * flops / tb / 1e9:6.0f}TF {tcb:7.3f} {2 * flops / tcb / 1e9:6.0f}TF {br:6.2f}",
              flush=True)
    for kind, rs in ratios.items():
        gf = math.exp(sum(math.log(f) for f, _ in rs) / len(rs))
        gb = math.exp(sum(math.log(b) for _, b in rs) / len(rs))
        print(f"geomean {kind}: forward {gf:.2f}x cuDNN, backward (dx + dw) {gb:.2f}x cuDNN")


def main():
    global DEV, FWD, BWD, ONLY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default="mltoolkit._C")
    ap.add_argument("--backend", choices=("cuda", "cpu"), default="cuda", help="kernels to check (default cuda)")
    ap.add_argument("--quick", action="store_true", help="fewer cases, batch 32 timings")
    ap.add_argument("--no-bench", action="store_true", help="skip the cuDNN comparison")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = ap.parse_args()
    ONLY, DEV = args.only, args.backend
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    mod = importlib.import_module(args.module)
    if not hasattr(mod, f"conv2d_forward_{DEV}"):
        print(f"{args.module} has no conv2d_forward_{DEV}" + (" (built without CUDA?)" if DEV == "cuda" else ""))
        return 2
    FWD, BWD = getattr(mod, f"conv2d_forward_{DEV}"), getattr(mod, f"conv2d_backward_{DEV}")
    torch.backends.cudnn.allow_tf32 = False  # the float32 baseline in full float32
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    all_cases(args.quick)
    check_bad_inputs()
    fails = [r for r in rows if r[1] != "ok"]
    where = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"\n{len(rows)} cases, {len(fails)} failures, {time.time() - t0:.1f} s on {where}")
    for r in fails:
        print(f"FAIL  {r[0]}: {r[2]}")
    if not args.no_bench and not ONLY and DEV == "cuda":
        try:
            bench(32 if args.quick else 256, 10 if args.quick else 20, args.quick)
        except Exception as e:  # noqa: BLE001
            print(f"bench raised {type(e).__name__}: {e}")
            if os.environ.get("MLTK_SELFCHECK_TRACE"):
                traceback.print_exc()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
