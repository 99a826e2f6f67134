#!/usr/bin/env python3
"""Self-check of the CUDA attention kernels (csrc/cuda/attention.cu) against the plain-PyTorch reference.

Needs a CUDA GPU and the built extension. Calls the raw entry points of csrc/attention.h:
    attention_forward_cuda(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, wl, wr, bottom_right, dropout_p, seed)
        -> [out, lse]
    attention_backward_cuda(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, wl, wr, bottom_right,
                            dropout_p, seed, deterministic) -> [dq, dk, dv]
on many small cases (dtypes, head dims incl. ones that are not multiples of 8, GQA, Lq != Lk, causal top-left and
bottom-right, sliding windows, additive broadcast masks with -inf, fully masked rows, varlen, dropout, strided and
stride-0 inputs, empty sizes), plus determinism and bad-input errors.

Rule (flash-attention's): max|ours - ref32| <= 2 * max|torch_same_dtype - ref32| + eps, where ref32 is the reference
in float32 and torch_same_dtype the same reference computed in the input dtype (out, lse, dq, dk, dv); lse +inf rows
must match exactly. Dropout replays reference.dropout_keep, which must match the kernel bit for bit.
One row per case in a pass/fail table with the max errors; a failing or raising case does not stop the rest;
exit code 1 on any failure.

    python scripts/cuda_attention_selfcheck.py [--quick] [--bench]
    python scripts/cuda_attention_selfcheck.py --backend cpu --quick   # the same checks on the CPU kernels
"""
import argparse
import functools
import importlib
import math
import os
import sys
import time
import traceback

import torch
from cuda_timing import median_ms  # scripts/ is sys.path[0] when a script runs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mltoolkit.ops.reference import attention as ref  # noqa: E402

EPS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEV = "cuda"  # --backend cpu runs the same checks on the C++ CPU kernels
FWD = BWD = None
rows = []  # (case, status, details)


def graph(q, k, v, mask, cu_q, cu_k, scale, wl, wr, br, p, seed, ct):
    """The reference forward (reference._forward_graph's sequence loop) computed in dtype ct, differentiable."""
    outs, lses = [], []
    seqs = [(None, slice(None), slice(None))] if cu_q is None else [
        (b, slice(a, e), slice(c, f)) for b, (a, e, c, f) in
        enumerate(zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:]))]
    for b, rq, rk in seqs:
        qs, ks, vs = q[:, :, rq], k[:, :, rk], v[:, :, rk]
        keep = None
        if p > 0:
            keep = ref.dropout_keep(seed, p, q.shape[1], qs.shape[2], ks.shape[2],
                                    batch=q.shape[0] if b is None else 1, first_batch=b or 0, device=q.device)
        o, lse = ref.attention(qs, ks, vs, mask, scale, wl, wr, br, keep, p, ct)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def run_ref(q, k, v, dout, mask, cu_q, cu_k, scale, wl, wr, br, p, seed, ct):
    leaves = [t.detach().to(ct).requires_grad_(True) for t in (q, k, v)]
    m = None if mask is None else mask.to(ct)
    o, lse = graph(*leaves, m, cu_q, cu_k, scale, wl, wr, br, p, seed, ct)
    grads = torch.autograd.grad(o, leaves, dout.to(ct), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return [o.detach(), lse.detach().float()] + [g.detach() for g in grads]


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    return float(torch.nan_to_num(d, nan=math.inf).max())


def check_case(name, q, k, v, dout, mask=None, cu_q=None, cu_k=None, max_q=0, max_k=0, scale=None, wl=-1, wr=-1,
               br=False, p=0.0, seed=0, determinism=False):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    try:
        out, lse = FWD(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, p, seed)
        dq, dk, dv = BWD(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, wl,
                                               wr, br, p, seed, True)
        if DEV == "cuda":
            torch.cuda.synchronize()
        r32 = run_ref(q, k, v, dout, mask, cu_q, cu_k, scale, wl, wr, br, p, seed, torch.float32)
        rlo = run_ref(q, k, v, dout, mask, cu_q, cu_k, scale, wl, wr, br, p, seed, q.dtype)
        problems, errs = [], []
        for nm, ours, like in (("out", out, q), ("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            if ours.shape != like.shape or ours.dtype != like.dtype or ours.stride() != torch.empty_like(like).stride():
                problems.append(f"{nm} shape/dtype/strides {tuple(ours.shape)} {ours.dtype} {ours.stride()}")
        if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or not lse.is_contiguous():
            problems.append(f"lse shape/dtype {tuple(lse.shape)} {lse.dtype}")
        if not problems:
            inf_ref = torch.isinf(r32[1])
            if not torch.equal(torch.isinf(lse) & (lse > 0), inf_ref):
                problems.append(f"lse +inf rows differ ({int((torch.isinf(lse) != inf_ref).sum())})")
            for i, (nm, ours) in enumerate((("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv))):
                a, b, c = ours, r32[i], rlo[i]
                if nm == "lse":
                    fin = ~inf_ref
                    a, b, c = a[fin], b[fin], c[fin]
                e_ours, e_base = max_err(a, b), max_err(c, b)
                scale_ref = float(b.abs().max()) if b.numel() else 0.0
                eps = EPS[q.dtype] * max(1.0, scale_ref)
                errs.append(f"{nm} {e_ours:.2e}/{e_base:.2e}")
                if not e_ours <= 2 * e_base + eps:
                    problems.append(f"{nm} max err {e_ours:.3g} > 2 x {e_base:.3g} + {eps:.2g}")
        if determinism and not problems:
            again = BWD(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, wl,
                                              wr, br, p, seed, True)
            o2, _ = FWD(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, p, seed)
            for nm, x, y in (("out", out, o2), ("dq", dq, again[0]), ("dk", dk, again[1]), ("dv", dv, again[2])):
                if not torch.equal(x, y):
                    problems.append(f"{nm} differs between two identical calls")
        rows.append((name, "FAIL" if problems else "ok", "; ".join(problems) if problems else "  ".join(errs)))
    except Exception as e:  # noqa: BLE001 - report and go on
        msg = str(e).splitlines()[0] if str(e) else ""
        rows.append((name, "FAIL", f"raised {type(e).__name__}: {msg}"))
        if os.environ.get("MLTK_SELFCHECK_TRACE"):
            traceback.print_exc()
    print(f"{rows[-1][1]:4s}  {name:58s}  {rows[-1][2]}", flush=True)


def rnd(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32) * scale).to(dtype)


def std_case(name, B, Hq, Hkv, Lq, Lk, D, dtype, gen, layout="contig", dout_kind="plain", **kw):
    if layout == "blhd":  # (B, L, H, D) storage viewed as (B, H, L, D): non-contiguous, common in models
        q = rnd(B, Lq, Hq, D, dtype=dtype, gen=gen).transpose(1, 2)
        k = rnd(B, Lk, Hkv, D, dtype=dtype, gen=gen).transpose(1, 2)
        v = rnd(B, Lk, Hkv, D, dtype=dtype, gen=gen).transpose(1, 2)
    elif layout == "sliced":  # head-dim slice of a wider tensor: row stride != D, offset base
        q = rnd(B, Hq, Lq, D + 24, dtype=dtype, gen=gen)[..., 3:3 + D]
        k = rnd(B, Hkv, Lk, D + 24, dtype=dtype, gen=gen)[..., 8:8 + D]
        v = rnd(B, Hkv, Lk, D + 24, dtype=dtype, gen=gen)[..., :D]
    else:
        q = rnd(B, Hq, Lq, D, dtype=dtype, gen=gen)
        k = rnd(B, Hkv, Lk, D, dtype=dtype, gen=gen)
        v = rnd(B, Hkv, Lk, D, dtype=dtype, gen=gen)
    if dout_kind == "expanded":  # what .sum().backward() hands down: every stride 0
        dout = torch.ones((), device=DEV, dtype=dtype).expand(B, Hq, Lq, D)
    else:
        dout = rnd(B, Hq, Lq, D, dtype=dtype, gen=gen)
    check_case(name, q, k, v, dout, **kw)


def all_cases(quick):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (8, 16, 32, 40, 64, 80, 96, 128, 160, 192, 256, 7, 100) if not quick else (7, 64, 96, 128, 256)
    for dt in dtypes:
        tn = str(dt).replace("torch.", "")
        for D in head_dims:
            std_case(f"{tn} D={D} B2 H3 Lq=97 Lk=123", 2, 3, 3, 97, 123, D, dt, gen, determinism=(D == 64))
        for D in (64, 128) if quick else (32, 64, 128, 256):
            for lq, lk in ((1, 1), (1, 1000), (7, 97), (123, 64), (128, 128), (257, 300), (300, 33)):
                std_case(f"{tn} D={D} Lq={lq} Lk={lk}", 1, 2, 1, lq, lk, D, dt, gen)
        for D in (64, 128, 256):
            sc = f"{tn} D={D}"
            std_case(f"{sc} GQA 8/2 Lq=130 Lk=190", 2, 8, 2, 130, 190, D, dt, gen, determinism=True)
            std_case(f"{sc} MQA 4/1", 1, 4, 1, 65, 129, D, dt, gen)
            std_case(f"{sc} causal top-left Lq=150 Lk=200", 1, 2, 2, 150, 200, D, dt, gen, wl=-1, wr=0)
            std_case(f"{sc} causal top-left Lq=200 Lk=150", 1, 2, 2, 200, 150, D, dt, gen, wl=-1, wr=0)
            std_case(f"{sc} causal bottom-right Lq=150 Lk=200", 1, 2, 1, 150, 200, D, dt, gen, wl=-1, wr=0, br=True)
            # Lq > Lk bottom-right: the first Lq - Lk rows see no key (out 0, lse +inf, zero grads)
            std_case(f"{sc} causal bottom-right Lq=200 Lk=70", 1, 2, 1, 200, 70, D, dt, gen, wl=-1, wr=0, br=True)
            std_case(f"{sc} window (32, 0) bottom-right", 1, 2, 2, 300, 300, D, dt, gen, wl=32, wr=0, br=True)
            std_case(f"{sc} window (5, 17)", 1, 2, 2, 257, 190, D, dt, gen, wl=5, wr=17)
            std_case(f"{sc} window (0, 0)", 1, 2, 2, 70, 90, D, dt, gen, wl=0, wr=0)
            std_case(f"{sc} layout BLHD", 2, 4, 2, 77, 99, D, dt, gen, layout="blhd")
            std_case(f"{sc} sliced head dim, dout stride 0", 1, 2, 1, 50, 61, D, dt, gen, layout="sliced",
                     dout_kind="expanded")
            std_case(f"{sc} scale 0.3", 1, 2, 2, 64, 64, D, dt, gen, scale=0.3)
            std_case(f"{sc} dropout 0.17", 2, 3, 1, 97, 131, D, dt, gen, p=0.17, seed=123456789012345,
                     determinism=True)
            std_case(f"{sc} dropout 0.5 causal", 1, 2, 2, 130, 130, D, dt, gen, p=0.5, seed=7, wl=-1, wr=0)
            # Additive masks: broadcast over batch and heads (stride 0), with -inf entries and a fully -inf row.
            B, H, Lq, Lk = 2, 4, 70, 133
            mask = rnd(1, 1, Lq, Lk, dtype=dt, gen=gen)
            mask[..., ::3] = -math.inf
            mask[..., 5, :] = -math.inf
            mask = mask.expand(B, H, Lq, Lk)
            std_case(f"{sc} additive mask broadcast, -inf row", B, H, 2, Lq, Lk, D, dt, gen, mask=mask)
            mask2 = rnd(B, H, Lk, Lq, dtype=dt, gen=gen).transpose(-1, -2)  # transposed strides
            std_case(f"{sc} additive mask transposed + causal", B, H, 1, Lq, Lk, D, dt, gen, mask=mask2, wl=-1,
                     wr=0, br=True)
            std_case(f"{sc} mask + dropout", B, H, H, Lq, Lk, D, dt, gen, mask=mask, p=0.25, seed=99)
            # Varlen: packed sequences, one empty, B == 1.
            lens_q, lens_k = [5, 0, 125, 70, 1], [9, 3, 140, 64, 2]
            cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
            cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
            tq, tk = sum(lens_q), sum(lens_k)
            for extra in ({}, {"wl": -1, "wr": 0, "br": True}, {"p": 0.2, "seed": 5}, {"wl": 8, "wr": 0}):
                tag = ",".join(f"{a}={b}" for a, b in extra.items()) or "plain"
                std_case(f"{sc} varlen 5 seqs ({tag})", 1, 4, 2, tq, tk, D, dt, gen, cu_q=cu_q, cu_k=cu_k,
                         max_q=max(lens_q), max_k=max(lens_k), **extra)
            # max_seqlen smaller than the real longest sequence: the kernels must still cover every row.
            std_case(f"{sc} varlen, max_seqlen too small", 1, 2, 2, tq, tk, D, dt, gen, cu_q=cu_q, cu_k=cu_k,
                     max_q=16, max_k=16)
        for B, Lq, Lk in ((1, 5, 0), (1, 0, 5), (0, 5, 5)):
            check_empty(f"{tn} empty B={B} Lq={Lq} Lk={Lk}", B, Lq, Lk, dt)
        if not quick:
            std_case(f"{tn} D=128 long Lq=Lk=1025", 1, 2, 1, 1025, 1025, 128, dt, gen)
            std_case(f"{tn} D=64 scale 1 (large logits)", 1, 2, 2, 200, 200, 64, dt, gen, scale=1.0)


def check_empty(name, B, Lq, Lk, dtype):
    """Empty sizes (the reference cannot take Lk = 0): no key means out 0, lse +inf, zero gradients."""
    q = torch.randn(B, 2, Lq, 64, device=DEV, dtype=dtype)
    k = torch.randn(B, 2, Lk, 64, device=DEV, dtype=dtype)
    try:
        out, lse = FWD(q, k, k, None, None, None, 0, 0, 0.125, -1, -1, False, 0.0, 0)
        dq, dk, dv = BWD(q, q, k, k, out, lse, None, None, None, 0, 0, 0.125, -1, -1, False,
                                               0.0, 0, True)
        ok = (out.shape == q.shape and lse.shape == q.shape[:3] and dq.shape == q.shape and dk.shape == k.shape
              and dv.shape == k.shape and bool((out == 0).all()) and bool(torch.isinf(lse).all())
              and bool((dq == 0).all()) and bool((dk == 0).all()) and bool((dv == 0).all()))
        rows.append((name, "ok" if ok else "FAIL", "" if ok else "wrong shapes or values"))
    except Exception as e:  # noqa: BLE001
        rows.append((name, "FAIL", f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    print(f"{rows[-1][1]:4s}  {name:58s}  {rows[-1][2]}", flush=True)


def check_bad_inputs():
    q = torch.randn(1, 2, 8, 64, device=DEV, dtype=torch.float16)
    F, B = FWD, BWD
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    cases = [
        ("q float32", lambda: F(q.float(), q.float(), q.float(), None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, 0),
         "q must be float16 or bfloat16"),
        ("q float64", lambda: F(q.double(), q.double(), q.double(), None, None, None, 0, 0, 1.0, -1, -1, False, 0.0,
                                0), "q must be float16 or bfloat16"),
        ("k dtype", lambda: F(q, q.bfloat16(), q, None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, 0), "k"),
        ("k on another device", lambda: F(q, q.cpu() if DEV == "cuda" else q.to("meta"), q, None, None, None, 0, 0,
                                          1.0, -1, -1, False, 0.0, 0), "k"),
        ("q 3-D", lambda: F(q[0], q, q, None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, 0), "q"),
        ("v shape", lambda: F(q, q, q[:, :, :4], None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, 0), "v"),
        ("head dim 300", lambda: F(*(torch.zeros(1, 1, 4, 300, device=DEV, dtype=torch.float16),) * 3, None, None,
                                   None, 0, 0, 1.0, -1, -1, False, 0.0, 0), "D"),
        ("GQA heads", lambda: F(torch.zeros(1, 3, 8, 64, device=DEV, dtype=torch.float16), q, q, None, None, None,
                                0, 0, 1.0, -1, -1, False, 0.0, 0), "head"),
        ("mask shape", lambda: F(q, q, q, q[:, :, :, :7], None, None, 0, 0, 1.0, -1, -1, False, 0.0, 0), "mask"),
        ("mask dtype", lambda: F(q, q, q, torch.zeros(1, 2, 8, 8, device=DEV), None, None, 0, 0, 1.0, -1, -1,
                                 False, 0.0, 0), "mask"),
        ("cu_seqlens int64", lambda: F(q, q, q, None, cu.long(), cu, 8, 8, 1.0, -1, -1, False, 0.0, 0),
         "cu_seqlens_q"),
        ("cu_seqlens alone", lambda: F(q, q, q, None, cu, None, 8, 8, 1.0, -1, -1, False, 0.0, 0), "cu_seqlens"),
        ("dropout 1.0", lambda: F(q, q, q, None, None, None, 0, 0, 1.0, -1, -1, False, 1.0, 0), "dropout_p"),
        ("lse dtype", lambda: B(q, q, q, q, q, torch.zeros(1, 2, 8, device=DEV, dtype=torch.float16), None, None,
                                None, 0, 0, 1.0, -1, -1, False, 0.0, 0, True), "lse"),
        ("dout shape", lambda: B(q[:, :1], q, q, q, q, torch.zeros(1, 2, 8, device=DEV), None, None, None, 0, 0,
                                 1.0, -1, -1, False, 0.0, 0, True), "dout"),
    ]
    for name, fn, needle in cases:
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
        print(f"{rows[-1][1]:4s}  {rows[-1][0]:58s}  {rows[-1][2]}", flush=True)


def bench():
    """bf16 D=128 non-causal and causal, forward and backward TFLOP/s (4 and 10 B H L^2 D flops; causal halves)."""
    timeit = functools.partial(median_ms, reps=20)

    import torch.nn.functional as Fn
    print(f"\nbench on {torch.cuda.get_device_name()}")
    for D, L, B, H, causal in ((128, 8192, 2, 16, False), (128, 8192, 2, 16, True), (64, 8192, 2, 32, False),
                               (256, 4096, 2, 8, False)):
        q, k, v, do = (torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
        wr = 0 if causal else -1
        sc = 1 / math.sqrt(D)
        flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
        out, lse = FWD(q, k, v, None, None, None, 0, 0, sc, -1, wr, False, 0.0, 0)
        tf = timeit(lambda: FWD(q, k, v, None, None, None, 0, 0, sc, -1, wr, False, 0.0, 0))
        tb = timeit(lambda: BWD(do, q, k, v, out, lse, None, None, None, 0, 0, sc, -1, wr,
                                                      False, 0.0, 0, True))
        qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
        ts_f = timeit(lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=causal))
        o_s = Fn.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        ts_b = timeit(lambda: torch.autograd.grad(o_s, (qs, ks, vs), do, retain_graph=True))
        print(f"  D={D} L={L} B={B} H={H} causal={causal}: mltk fwd {tf:.2f} ms {flops / tf / 1e9:.0f} TFLOP/s, "
              f"bwd {tb:.2f} ms {2.5 * flops / tb / 1e9:.0f} TFLOP/s | torch sdpa fwd {flops / ts_f / 1e9:.0f}, "
              f"bwd {2.5 * flops / ts_b / 1e9:.0f} TFLOP/s")


def main():
    global DEV, FWD, BWD
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default="mltoolkit._C")
    ap.add_argument("--backend", choices=("cuda", "cpu"), default="cuda", help="kernels to check (default cuda)")
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--bench", action="store_true", help="also time bf16 L=8192 against torch SDPA")
    args = ap.parse_args()
    DEV = args.backend
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    mod = importlib.import_module(args.module)
    if not hasattr(mod, f"attention_forward_{DEV}"):
        print(f"{args.module} has no attention_forward_{DEV}" + (" (built without CUDA?)" if DEV == "cuda" else ""))
        return 2
    FWD, BWD = getattr(mod, f"attention_forward_{DEV}"), getattr(mod, f"attention_backward_{DEV}")
    t0 = time.time()
    all_cases(args.quick)
    check_bad_inputs()
    fails = [r for r in rows if r[1] != "ok"]
    where = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"\n{len(rows)} cases, {len(fails)} failures, {time.time() - t0:.1f} s on {where}")
    for r in fails:
        print(f"FAIL  {r[0]}: {r[2]}")
    if args.bench and DEV == "cuda":
        try:
            bench()
        except Exception as e:  # noqa: BLE001
            print(f"bench raised {type(e).__name__}: {e}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
