"""Triton kernels of the newer int8 ops: the int8 weight-only linear (contract in csrc/int8_weight_only_linear.h),
static per-tensor activation quantization and the int8 im2col (both in csrc/int8_static.h).
mltoolkit/ops/int8_weight_only.py and mltoolkit/ops/int8_static.py are the only callers; the plain-PyTorch oracles in
mltoolkit/ops/reference/int8.py are theirs. Style, knobs and interpreter workarounds follow triton_kernels/quant.py.

int8 weight-only (y = x @ (wq * w_scale)^T + bias, float32 accumulation, x's dtype out). The epilogue order is the C++
main path's: acc = sum_k float(x) * float(wq) (unscaled), then y = acc * w_scale[n] + bias[n], one rounding to x's
dtype. Any int8 value (-128 included) is exact in bfloat16 / float16 / float32, so converting the weight to x's dtype
in registers loses nothing: the 16-bit dots multiply exactly the numbers the reference multiplies, only the summation
order differs (the contract allows it).
  _wo_gemv_kernel   M <= GEMV_MAX_M (decode): one row of x per program column, a [BLOCK_N, BLOCK_K] int8 weight tile
                    per step (row-contiguous loads), widened to float32 and multiplied by the x chunk; split-K over
                    program_id(1) when the N tiles alone cannot fill the GPU (float32 partials of the unscaled sums;
                    quant.py's _splitk_reduce_kernel adds them in a fixed order, then scale and bias: deterministic,
                    no atomics).
  _wo_mm_kernel     M > GEMV_MAX_M: [BLOCK_M, BLOCK_N] tiles, the int8 tile converted to x's dtype (bf16 / fp16 dots
                    on tensor cores; float32 x uses "ieee" dots: TF32 would round x), float32 accumulator, scale and
                    bias in the epilogue. M <= SPLITK_MAX_M (decode batches): one 16-row tile streams the weight once,
                    split-K as above; beyond: autotuned tiles.
  The weight is read through (swn, swk) strides, so the backward's dx = (dy * w_scale) @ wq is the same kernel on the
  transposed problem: x' = dy * w_scale (float32, M x N), weight wq^T (a stride view, no copy), scale 1, no bias
  (int8_weight_only_dx).
quantize_static:    q = clamp(rint(div_rn(float(x), scale)), -127, 127), elementwise over x in its memory order
                    (row-major or channels_last; other strides are copied to the output's layout first). Bit-exact:
                    correctly rounded division, clamp before the round-half-even trick (|v| <= 127 < 2^22).
im2col_int8:        grid (row tiles, kh * KW + kw, channel tiles): each program gathers a [BLOCK_R, BLOCK_C] block of
                    xq (any strides: NCHW and channels_last without a copy; zero outside the image) into
                    cols[r, (kh * KW + kw) * C + c]. Pure data movement, bit-exact.

Interpreter (TRITON_INTERPRET=1, CPU tensors): one fixed config per kernel (INTERPRET_* knobs), no autotuning;
16-bit dots go through float32 (the interpreter's bfloat16 tl.dot is broken; the values are the same 16-bit ones);
bfloat16 stores rounded to nearest even (the interpreter truncates).

Knobs (module attributes, read at every call): AUTOTUNE (MLTK_TRITON_AUTOTUNE=0 at import: first config only),
GEMV_MAX_M, SPLITK_MAX_M, INTERPRET_BLOCK_M / _N / _K.
"""
import os

import torch
import triton
import triton.language as tl

from .conv import _tile_of
from .host import cdiv, next_power_of_2
from .norm import _interpreting, _round_to
from .quant import _GROUP_M, _TL, _rint, _splitk_reduce_kernel, _splits, _tuned

__all__ = ["int8_weight_only_linear", "int8_weight_only_dx", "quantize_static", "im2col_int8",
           "AUTOTUNE", "GEMV_MAX_M", "SPLITK_MAX_M"]

AUTOTUNE = os.environ.get("MLTK_TRITON_AUTOTUNE", "1") != "0"
GEMV_MAX_M = 2
SPLITK_MAX_M = 16
INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 16
INTERPRET_BLOCK_K = 32



# ----------------------------------------------------------------------------------------------------------------
# int8 weight-only linear
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _wo_gemv_kernel(X, W, S, BIAS, Y, PART, M, N, K, k_per_split, sxm, sxk, swn, swk, sym, syn,
                    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = W + cols.to(tl.int64) * swn
    x_row = X + m.to(tl.int64) * sxm
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_hi
        x = tl.load(x_row + k.to(tl.int64) * sxk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows[:, None] + (k.to(tl.int64) * swk)[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT:
        tl.store(PART + (split * M + m).to(tl.int64) * N + cols, y, mask=col_ok)
    else:
        y = y * tl.load(S + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(Y + m.to(tl.int64) * sym + cols * syn, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=col_ok)


@triton.jit
def _wo_mm_kernel(X, W, S, BIAS, Y, PART, M, N, K, k_per_split, TUNE_M, sxm, sxk, swn, swk, sym, syn,
                  SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
                  PREC: tl.constexpr, FIX_BF16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # TUNE_M (M's power of two) is an autotune key only. k_per_split is a multiple of BLOCK_K.
    split = tl.program_id(1)
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = X + rows.to(tl.int64) * sxm
    w_cols = W + cols.to(tl.int64) * swn
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_hi
        a = tl.load(x_rows[:, None] + (k.to(tl.int64) * sxk)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(w_cols[None, :] + (k.to(tl.int64) * swk)[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0)
        if DOT_F32:  # interpreter: its 16-bit dots (and int8 -> bfloat16 casts) are unreliable; same values in f32
            a, b = a.to(tl.float32), b.to(tl.float32)
        else:
            b = b.to(DOT_DTYPE)  # exact: |q| <= 128
        acc = tl.dot(a, b, acc, input_precision=PREC)
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        tl.store(PART + (split * M + rows).to(tl.int64)[:, None] * N + cols[None, :], acc, mask=mask)
    else:
        y = acc * tl.load(S + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = Y + rows.to(tl.int64)[:, None] * sym + cols[None, :] * syn
        tl.store(y_ptrs, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# static quantization and im2col
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _quantize_static_kernel(X, S, Q, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    s = tl.load(S)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.math.div_rn(x, s)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)  # clamp first: the rounding trick needs |v| < 2^22
    v = _rint(v)
    tl.store(Q + offs, v.to(tl.int8), mask=ok)


@triton.jit
def _im2col_kernel(XQ, COLS, C, H, W, OH, OW, R, sb, sc, sh, sw, KW, SH, SW, PH, PW, DH, DW,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    tap = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    kh = tap // KW
    kw = tap % KW
    row_ok = rows < R
    c_ok = c < C
    ow = rows % OW
    t = rows // OW
    oh = t % OH
    b = t // OH
    ih = oh * SH - PH + kh * DH
    iw = ow * SW - PW + kw * DW
    inside = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    src = XQ + (b * sb + ih * sh + iw * sw)[:, None] + (c.to(tl.int64) * sc)[None, :]
    v = tl.load(src, mask=inside[:, None] & c_ok[None, :], other=0)
    dst = COLS + (rows * tl.num_programs(1) * C)[:, None] + (tap * C + c)[None, :]
    tl.store(dst, v, mask=row_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations (H100 / H200, sm_90)
# ----------------------------------------------------------------------------------------------------------------

# Large M, 16-bit x: the bf16 GEMM tiles of the Triton matmul tutorial (the int8 tile is converted in registers
# between the load and the dot, so very wide tiles are avoided). Float32 x runs "ieee" dots (FMA, no tensor cores):
# smaller tiles.
_WO_LARGE_16 = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                (64, 64, 128, 4, 3))
_WO_LARGE_32 = ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (32, 64, 64, 4, 3))
_WO_KEY = ["N", "K", "TUNE_M", "HAS_BIAS", "PREC"]


def _linear(x, w, swn, swk, N, scale, bias, out_dtype):
    """y (M, N) out_dtype = (x (M, K) @ w^T) * scale + bias, w (N, K) read through strides (swn, swk)."""
    M, K = x.shape
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    scale = scale.contiguous()
    b = bias.contiguous() if bias is not None else scale
    interp = _interpreting()
    common = dict(HAS_BIAS=bias is not None, FIX_BF16=interp)

    def finish(part, splits):
        block = 1024
        _splitk_reduce_kernel[(cdiv(M * N, block),)](part, scale, b, y, M, N, splits, y.stride(0),
                                                             y.stride(1), HAS_SCALE=True, BLOCK=block, **common)

    if M <= GEMV_MAX_M:
        # 8 KiB of int8 weight per program and step (64 bytes per thread at 4 warps).
        block_k = INTERPRET_BLOCK_K if interp else 256
        block_n = INTERPRET_BLOCK_N if interp else 32
        tiles = cdiv(N, block_n)
        splits, per = _splits(tiles * M, cdiv(K, block_k), x.device, 4)
        part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
        _wo_gemv_kernel[(tiles, splits, M)](x, w, scale, b, y, part, M, N, K, per * block_k,
                                            x.stride(0), x.stride(1), swn, swk, y.stride(0), y.stride(1),
                                            SPLIT=splits > 1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
                                            num_stages=1 if interp else 3, **common)
        if splits > 1:
            finish(part, splits)
        return y

    f32 = x.dtype == torch.float32
    consts = dict(DOT_DTYPE=_TL[x.dtype], DOT_F32=interp and not f32, PREC="ieee", **common)
    tail = (x.stride(0), x.stride(1), swn, swk, y.stride(0), y.stride(1))
    if interp or M <= SPLITK_MAX_M:
        if interp:
            bm, bn, bk, warps, stages = INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, INTERPRET_BLOCK_K, 4, 1
        else:  # decode batches: one 16-row tile streams the weight once, split-K for parallelism
            bm, bn, bk, warps, stages = 16, 64, (64 if f32 else 128), 4, 4
        tiles = cdiv(M, bm) * cdiv(N, bn)
        k_blocks = cdiv(K, bk)
        splits, per = _splits(tiles, k_blocks, x.device, 2) if M <= SPLITK_MAX_M else (1, k_blocks)
        part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
        _wo_mm_kernel[(tiles, splits)](x, w, scale, b, y, part, M, N, K, per * bk, next_power_of_2(M),
                                       *tail, SPLIT=splits > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                       GROUP_M=_GROUP_M, num_warps=warps, num_stages=stages, **consts)
        if splits > 1:
            finish(part, splits)
        return y

    configs = _WO_LARGE_32 if f32 else _WO_LARGE_16

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), 1)

    # k_per_split = K rounded up to a multiple of every config's BLOCK_K (one split).
    k_all = cdiv(K, 128) * 128
    _tuned(_wo_mm_kernel, configs if AUTOTUNE else configs[:1], tuple(_WO_KEY))[grid](
        x, w, scale, b, y, y, M, N, K, k_all, next_power_of_2(M), *tail, SPLIT=False, **consts)
    return y


def int8_weight_only_linear(x, wq, w_scale, bias):
    """csrc/int8_weight_only_linear.h: x (M, K) float32 / float16 / bfloat16 (any strides), wq int8 (N, K) (any
    strides), w_scale float32 (N,), bias (N,) of x's dtype or None -> y (M, N) in x's dtype."""
    return _linear(x, wq, wq.stride(0), wq.stride(1), wq.shape[0], w_scale, bias, x.dtype)


def int8_weight_only_dx(dy, wq, w_scale, x_dtype):
    """dx (M, K) in x_dtype = (dy * w_scale) @ wq: the forward kernel on the transposed problem (wq^T read through
    strides, no copy), with dy * w_scale formed in float32 (so float32 dots: no rounding of dy beyond the
    reference's) and a scale of ones."""
    dys = dy.to(torch.float32) * w_scale
    K = wq.shape[1]
    ones = torch.ones(K, dtype=torch.float32, device=dy.device)
    return _linear(dys, wq, wq.stride(1), wq.stride(0), K, ones, None, torch.float32).to(x_dtype)


def _out_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def quantize_static(x, scale):
    """csrc/int8_static.h's quantize_static: x float (any shape), scale float32 (one element) -> q int8, x's shape,
    channels_last for a channels_last 4-D x, else row-major. Bit-exact with the reference."""
    fmt = _out_format(x)
    if not x.is_contiguous(memory_format=fmt):
        x = x.contiguous(memory_format=fmt)  # other strides: one copy into the output's layout
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device, memory_format=fmt)
    n = x.numel()
    if n == 0:
        return q
    block = 1024 if _interpreting() else 4096
    _quantize_static_kernel[(cdiv(n, block),)](x, scale.reshape(1).contiguous(), q, n, BLOCK=block,
                                                      num_warps=4 if _interpreting() else 8, enable_fp_fusion=False)
    return q


def im2col_int8(xq, kernel, stride, padding, dilation):
    """csrc/int8_static.h's im2col_int8: xq int8 (B, C, H, W), any strides -> cols int8 (B * OH * OW, KH * KW * C),
    column order (kh, kw, c), zeros outside the image. Bit-exact."""
    B, C, H, W = xq.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel, stride, padding, dilation
    OH = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1
    OW = (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1
    R = B * OH * OW
    cols = torch.empty((R, KH * KW * C), dtype=torch.int8, device=xq.device)
    if cols.numel() == 0:
        return cols
    block_c = min(128, next_power_of_2(C))
    block_r = max(16, 4096 // block_c) if not _interpreting() else max(8, 256 // block_c)
    grid = (cdiv(R, block_r), KH * KW, cdiv(C, block_c))
    _im2col_kernel[grid](xq, cols, C, H, W, OH, OW, R, *xq.stride(), KW, SH, SW, PH, PW, DH, DW,
                         BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return cols
