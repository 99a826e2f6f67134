#!/usr/bin/env python3
"""The kernels whose H100 targets are unmet, one call each inside a profiler range, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python scripts/ncu_kernels.py

Warm-up (module load, Triton compilation and autotuning) happens before the range; inside it every case runs once,
ours beside torch's kernel for the same work, in an NVTX range named after the case (ncu --print-nvtx-rename or the
report's NVTX column tells them apart). --cases picks some (default: all).

    int4_m1      int4 g128, M = 1, K = N = 8192: tensor-core GEMV, ALU GEMV, bf16 F.linear
    int8_m4096   int8 dynamic linear, M = K = N = 4096: Triton (quantize + GEMM), bf16 F.linear
    attention    B = 2, H = 16, L = 4096, D = 128, bf16 forward: Triton, torch SDPA
    conv3x3      3x3 64 -> 64, 56 x 56, N = 32, fp16 channels_last: CUDA C++, cuDNN
    rms_norm_bwd 16384 x 8192 bf16 backward: CUDA C++, torch.compile's
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mltoolkit import ops  # noqa: E402
from mltoolkit.backends import backend  # noqa: E402


def int4_m1():
    k = n = 8192
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    packed, scales, zeros = ops.quantize_int4(w, 128)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

    def path(name):
        def call():
            os.environ["MLTK_INT4_CUDA_PATH"] = name
            with backend("cuda"):
                ops.int4_weight_only_linear(x, packed, scales, zeros, 128)
            os.environ.pop("MLTK_INT4_CUDA_PATH")
        return call

    return {"int4 tcgemv": path("tcgemv"), "bf16 linear 8192": lambda: F.linear(x, w)}


def int8_m4096():
    m = k = n = 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    wq, ws = ops.quantize_per_channel(w)

    def ours():
        with backend("triton"):
            ops.int8_linear_dynamic(x, wq, ws)

    return {"int8 triton": ours, "bf16 linear 4096": lambda: F.linear(x, w)}


def attention():
    q, k, v = (torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def ours():
        with backend("triton"):
            ops.scaled_dot_product_attention(q, k, v)

    return {"attention triton": ours, "attention sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}


def conv3x3():
    x = torch.randn(32, 64, 56, 56, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last) * 0.05

    def ours():
        with backend("cuda"):
            ops.conv2d(x, w, None, 1, 1)

    return {"conv cuda": ours, "conv cudnn": lambda: F.conv2d(x, w, None, 1, 1)}


def rms_norm_bwd():
    x = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    with backend("cuda"):
        y = ops.rms_norm(x, (8192,), weight)
    compiled = torch.compile(lambda x, w: F.rms_norm(x, (8192,), w))
    yc = compiled(x, weight)

    def ours():
        torch.autograd.grad(y, (x, weight), dy, retain_graph=True)

    def theirs():
        torch.autograd.grad(yc, (x, weight), dy, retain_graph=True)

    return {"rms_norm bwd cuda": ours, "rms_norm bwd compiled": theirs}


CASES = {f.__name__: f for f in (int4_m1, int8_m4096, attention, conv3x3, rms_norm_bwd)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    calls = {}
    for name in args.cases:
        try:
            calls.update(CASES[name]())
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            print(f"{name}: setup raised {type(e).__name__}: {e}")
    for call in calls.values():  # warm-up: compilation and autotuning stay outside the profiled range
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for label, call in calls.items():
        torch.cuda.nvtx.range_push(label)
        call()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled:", ", ".join(calls))


if __name__ == "__main__":
    main()
