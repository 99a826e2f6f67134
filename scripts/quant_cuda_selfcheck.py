#!/usr/bin/env python3
"""Self-check of the CUDA quantization kernels (csrc/cuda/int8_linear.cu, int4_linear.cu) against the reference.

Needs a CUDA GPU and the built extension. Calls the raw entry points of csrc/int8_linear.h and csrc/int4_linear.h:
    quantize_rows_cuda(x) -> [q, scale]                                  bit-exact
    int8_linear_cuda(xq, x_scale, wq, w_scale, bias, out_dtype) -> y     bit-exact, paths gemv, mma and dp4a
    dequantize_int4_cuda(packed, scales, zeros, group) -> w'             bit-exact
    int4_weight_only_linear_cuda(x, packed, scales, zeros, group, bias)  SQNR vs float64 x @ w'^T,
        paths gemv, tcgemv (tensor-core GEMV) and mma
on odd shapes, with outputs poisoned (NaN) before each call; then bad-input errors. One line per failure, a summary,
exit code 1 on any failure. --bench also times (CUDA events, median; inputs rotated among several sets so that the
weights do not sit in L2 between calls):
    int8: M = 4096, K = N = 4096: int8_linear (pre-quantized x) and quantize + int8_linear vs bf16 F.linear
    int4: M = 1, K = N = 8192, group 128: int4_weight_only_linear vs bf16 F.linear (and M = 16, M = 4096)

    python scripts/quant_cuda_selfcheck.py [--bench] [--quick]
"""
import argparse
import functools
import importlib
import itertools
import os
import sys
import time

import torch
from cuda_timing import expect_named_errors, median_ms  # scripts/ is sys.path[0] when a script runs

failures = []
C = None


def fail(case, msg):
    failures.append((case, msg))
    print(f"FAIL {case}: {msg}", flush=True)


def poison(nbytes):
    """Fill soon-to-be-reused allocator blocks with NaN (0xFF bytes), so an unwritten output cannot pass."""
    t = torch.empty(max(1, nbytes), dtype=torch.uint8, device="cuda")
    t.fill_(255)
    del t


class env_path:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def sqnr(ref, out):
    ref, out = ref.double(), out.double()
    err = (ref - out).norm().item()
    return float("inf") if err == 0 else 20 * torch.log10(ref.norm() / err).item()


def check_int8(quick):
    from mltoolkit.ops.reference import int8 as ref8

    gen = torch.Generator(device="cuda").manual_seed(1)
    count = 0
    for dtype, (r, k) in itertools.product((torch.float32, torch.float16, torch.bfloat16),
                                           [(1, 1), (7, 97), (123, 1025), (64, 4096), (3, 0)]):
        case = f"quantize_rows {str(dtype)[6:]} ({r}, {k})"
        try:
            x = (torch.randn(r, k, generator=gen, device="cuda") * 3).to(dtype)
            poison(r * k + 4 * r)
            q, s = C.quantize_rows_cuda(x)
            qr, sr = ref8.quantize_rows(x)
            if not (torch.equal(q, qr) and torch.equal(s, sr)):
                fail(case, f"{int((q != qr).sum())} q and {int((s != sr).sum())} scales differ")
        except Exception as e:  # noqa: BLE001 - report and go on
            fail(case, f"raised {type(e).__name__}: {str(e).splitlines()[0]}")
        count += 1
    shapes = [(1, 1, 1), (7, 97, 123), (97, 123, 1025), (1, 4096, 4096), (123, 97, 64), (1111, 4001, 256),
              (512, 512, 4096), (3, 300, 4112), (8, 33, 80)]
    if quick:
        shapes = shapes[:3] + shapes[4:6] + shapes[7:]
    for path, (m, n, k) in itertools.product(("gemv", "mma", "dp4a"), shapes):
        if path != "dp4a" and k % 16 or path == "gemv" and m > 8:
            continue
        case = f"int8_linear {path} M={m} N={n} K={k}"
        try:
            xq = torch.randint(-128, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
            wq = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
            xs = torch.rand(m, generator=gen, device="cuda") * 1e-2
            ws = torch.rand(n, generator=gen, device="cuda") * 1e-2
            b = torch.randn(n, generator=gen, device="cuda")
            for out_dtype, bias in ((torch.float32, b), (torch.bfloat16, None), (torch.float16, b)):
                poison(m * n * 4)
                with env_path("MLTK_INT8_CUDA_PATH", path):
                    y = C.int8_linear_cuda(xq, xs, wq, ws, bias, out_dtype)
                yr = ref8.int8_linear(xq, xs, wq, ws, bias, out_dtype)
                if not torch.equal(y, yr):
                    bad = (y.float() != yr.float()) | y.isnan()
                    fail(case, f"{out_dtype}: {int(bad.sum())}/{y.numel()} outputs differ, first at flat index "
                               f"{int(bad.flatten().nonzero()[0])}")
        except Exception as e:  # noqa: BLE001
            fail(case, f"raised {type(e).__name__}: {str(e).splitlines()[0]}")
        count += 1
    return count


FLOOR = {torch.float32: 80.0, torch.float16: 55.0, torch.bfloat16: 38.0}


def check_int4(quick):
    from mltoolkit.ops.reference import int4 as ref4

    gen = torch.Generator(device="cuda").manual_seed(2)
    count = 0
    weights = [(7, 96, 32), (123, 1152, 128), (97, 320, 64), (33, 2048, 256), (9, 16640, 128)]
    for n, k, group in weights:
        case = f"dequantize_int4 N={n} K={k} G={group}"
        try:
            w = torch.randn(n, k, generator=gen, device="cuda")
            packed, scales, zeros = ref4.quantize_int4(w, group)
            poison(n * k * 4)
            out = C.dequantize_int4_cuda(packed, scales, zeros, group)
            if not torch.equal(out, ref4.dequantize_int4(packed, scales, zeros, group)):
                fail(case, "differs from the reference")
        except Exception as e:  # noqa: BLE001
            fail(case, f"raised {type(e).__name__}: {str(e).splitlines()[0]}")
        count += 1
    ms = [1, 3, 16, 17, 300] if not quick else [1, 16, 300]
    for (n, k, group), m, dtype, path in itertools.product(weights, ms, (torch.float32, torch.float16,
                                                                          torch.bfloat16),
                                                        ("gemv", "tcgemv", "mma")):
        if path != "gemv" and dtype == torch.float32:
            continue
        if path == "tcgemv" and (m > 16 or group < 128):
            continue
        case = f"int4_linear {path} {str(dtype)[6:]} M={m} N={n} K={k} G={group}"
        try:
            w = torch.randn(n, k, generator=gen, device="cuda")
            packed, scales, zeros = ref4.quantize_int4(w, group)
            x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
            bias = torch.randn(n, generator=gen, device="cuda").to(dtype) if m % 2 else None
            poison(m * n * 4)
            with env_path("MLTK_INT4_CUDA_PATH", path):
                y = C.int4_weight_only_linear_cuda(x, packed, scales, zeros, group, bias)
            ref = x.double() @ ref4.dequantize_int4(packed, scales, zeros, group).double().t()
            if bias is not None:
                ref = ref + bias.double()
            db = sqnr(ref, y)
            if not (db >= FLOOR[dtype]):
                fail(case, f"SQNR {db:.1f} dB < {FLOOR[dtype]} dB")
        except Exception as e:  # noqa: BLE001
            fail(case, f"raised {type(e).__name__}: {str(e).splitlines()[0]}")
        count += 1
    return count


def check_bad_inputs():
    xq = torch.zeros(4, 64, dtype=torch.int8, device="cuda")
    xs = torch.ones(4, device="cuda")
    pk = torch.zeros(8, 32, dtype=torch.uint8, device="cuda")
    sc = torch.ones(8, 2, device="cuda")
    cases = [
        ("xq float", lambda: C.int8_linear_cuda(xq.float(), xs, xq, xs, None, torch.float32), "xq"),
        ("wq on cpu", lambda: C.int8_linear_cuda(xq, xs, xq.cpu(), xs, None, torch.float32), "wq"),
        ("x_scale shape", lambda: C.int8_linear_cuda(xq, xs[:3], xq, xs, None, torch.float32), "x_scale"),
        ("quantize x int", lambda: C.quantize_rows_cuda(xq), "x"),
        ("group size", lambda: C.dequantize_int4_cuda(pk, sc, sc, 48), "group_size"),
        ("zeros shape", lambda: C.dequantize_int4_cuda(pk, sc, sc[:, :1], 32), "zeros"),
        ("int4 x K", lambda: C.int4_weight_only_linear_cuda(xs.view(1, 4), pk, sc, sc, 32, None), "x"),
        ("int4 bias dtype", lambda: C.int4_weight_only_linear_cuda(torch.zeros(2, 64, device="cuda"), pk, sc, sc, 32,
                                                                   torch.zeros(8, device="cuda").half()), "bias"),
    ]
    return expect_named_errors(cases, fail)


def bench():
    import torch.nn.functional as F

    from mltoolkit.ops.reference import int4 as ref4

    timeit = functools.partial(median_ms, reps=50)
    print(f"\nbench: {torch.cuda.get_device_name()} (median of CUDA-event timings, inputs rotated over sets)")

    def rotating(fn, sets):
        state = {"i": 0}

        def call():
            i = state["i"] = (state["i"] + 1) % len(sets)
            return fn(*sets[i])

        return call

    # int8: M = K = N = 4096
    M = K = N = 4096
    sets = []
    for _ in range(3):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        xq, xs = C.quantize_rows_cuda(x)
        wq, ws = C.quantize_rows_cuda(w)
        sets.append((x, w, xq, xs, wq, ws))
    flops = 2 * M * N * K
    t_bf16 = timeit(rotating(lambda x, w, *_: F.linear(x, w), sets))
    t_i8 = timeit(rotating(lambda x, w, xq, xs, wq, ws: C.int8_linear_cuda(xq, xs, wq, ws, None, torch.bfloat16), sets))

    def dynamic(x, w, xq, xs, wq, ws):
        q, s = C.quantize_rows_cuda(x)
        return C.int8_linear_cuda(q, s, wq, ws, None, torch.bfloat16)

    t_dyn = timeit(rotating(dynamic, sets))
    t_q = timeit(rotating(lambda x, *_: C.quantize_rows_cuda(x), sets))
    with env_path("MLTK_INT8_CUDA_PATH", "dp4a"):
        t_dp = median_ms(rotating(lambda x, w, xq, xs, wq, ws: C.int8_linear_cuda(xq, xs, wq, ws, None,
                                                                                    torch.bfloat16), sets), 5)
    print(f"  int8 M=N=K=4096: bf16 F.linear {t_bf16 * 1e3:8.1f} us {flops / t_bf16 / 1e9:6.0f} TFLOP/s")
    print(f"    int8_linear (mma)     {t_i8 * 1e3:8.1f} us {flops / t_i8 / 1e9:6.0f} TOP/s   "
          f"ratio vs bf16 x{t_bf16 / t_i8:.2f}")
    print(f"    quantize + int8_linear{t_dyn * 1e3:8.1f} us                 ratio vs bf16 x{t_bf16 / t_dyn:.2f}")
    print(f"    quantize_rows alone   {t_q * 1e3:8.1f} us;  dp4a path {t_dp * 1e3:8.1f} us")
    # The Triton GEMM (the backend that takes M = 4096 unforced): its TMA kernel against the cp.async one (A/B).
    from mltoolkit.triton_kernels import quant as tq
    for tma in (True, False):
        tq.INT8_TMA = tma
        t_tr = timeit(rotating(lambda x, w, xq, xs, wq, ws: tq.int8_linear(xq, xs, wq, ws, None, torch.bfloat16), sets))
        print(f"    Triton int8_linear ({'TMA' if tma else 'cp.async'}) {t_tr * 1e3:8.1f} us "
              f"{flops / t_tr / 1e9:6.0f} TOP/s   ratio vs bf16 x{t_bf16 / t_tr:.2f}")
    tq.INT8_TMA = None

    # int8 decode: M = 1 and 8, K = N = 4096 (weights rotated over 4 sets of 16 MB + their bf16 32 MB: beyond L2)
    wsets8 = []
    for _ in range(4):
        w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        wsets8.append((w, *C.quantize_rows_cuda(w)))
    for m in (1, 8):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        t_ref = timeit(rotating(lambda w, *_: F.linear(x, w), wsets8))
        def dyn(w, wq, ws):
            q, s = C.quantize_rows_cuda(x)
            return C.int8_linear_cuda(q, s, wq, ws, None, torch.bfloat16)

        times = {}
        for path in ("gemv", "mma"):
            with env_path("MLTK_INT8_CUDA_PATH", path):
                times[path] = timeit(rotating(dyn, wsets8))
        print(f"  int8 dynamic M={m} K=N=4096: bf16 F.linear {t_ref * 1e3:7.1f} us;  quantize + gemv "
              f"{times['gemv'] * 1e3:7.1f} us (x{t_ref / times['gemv']:.2f}), + mma tiles {times['mma'] * 1e3:7.1f} us "
              f"(x{t_ref / times['mma']:.2f})")

    # int4: K = N = 8192, group 128
    K = N = 8192
    wsets = []
    for _ in range(4):  # 4 x 32 MB packed: more than an H100's 50 MB L2
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        wsets.append((w, *ref4.quantize_int4(w, 128)))
    gbytes = (N * K / 2 + 2 * N * (K // 128) * 4) / 1e9
    for M in (1, 8, 16, 4096):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        t_ref = timeit(rotating(lambda w, *_: F.linear(x, w), wsets))
        # up to 16 rows auto is the tensor-core GEMV, gemv the ALU kernel
        for path in ("auto", "gemv") if M <= 8 else ("auto",):
            with env_path("MLTK_INT4_CUDA_PATH", path):
                t_4 = timeit(rotating(lambda w, p, s, z: C.int4_weight_only_linear_cuda(x, p, s, z, 128, None),
                                      wsets))
            if M <= 16:
                extra = f"{gbytes / (t_4 * 1e-3):6.0f} GB/s of weight"
            else:
                extra = f"{2 * M * N * K / t_4 / 1e9:6.0f} TFLOP/s"
            print(f"  int4 M={M} K=N=8192 g128 path {path}: bf16 F.linear {t_ref * 1e3:8.1f} us;  int4 "
                  f"{t_4 * 1e3:8.1f} us ({extra})   ratio vs bf16 x{t_ref / t_4:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default="mltoolkit._C", help="extension module to import (default mltoolkit._C)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--bench", action="store_true", help="also time int8 4096^3 and int4 M=1 K=N=8192 vs bf16")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    global C
    C = importlib.import_module(args.module)
    for fn in ("quantize_rows_cuda", "int8_linear_cuda", "dequantize_int4_cuda", "int4_weight_only_linear_cuda"):
        if not hasattr(C, fn):
            print(f"{args.module} has no {fn} (built without CUDA?)")
            return 2
    t0 = time.time()
    n = check_int8(args.quick) + check_int4(args.quick) + check_bad_inputs()
    torch.cuda.synchronize()
    print(f"\n{n} cases, {len(failures)} failures, {time.time() - t0:.1f} s on {torch.cuda.get_device_name()}")
    if args.bench:
        bench()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
