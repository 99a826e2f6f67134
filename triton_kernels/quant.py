"""Quantized linear layers as Triton kernels: int8 dynamic quantization (csrc/int8_linear.h) and int4 weight-only
(csrc/int4_linear.h). mltoolkit/ops/int8.py and mltoolkit/ops/int4.py are the only callers; the contracts, and the
plain-PyTorch oracles in mltoolkit/ops/reference/, are theirs.

int8 (bit-exact with the reference on every input the contract covers):
  _quantize_rows_kernel   one row per program, two passes over K in BLOCK_K chunks (absmax, then quantize):
                          scale = div_rn(absmax, 127) (1 below FLT_MIN), q = clamp(rint(div_rn(x, scale)), +-127).
                          Correctly rounded divisions (Triton's `/` is approximate on the GPU) and round half to even
                          by adding and subtracting 1.5 * 2^23 (|x / scale| <= 127.x, far below 2^22).
  _int8_linear_kernel     int8 x int8 tl.dot with an int32 accumulator (exact: K <= 131071), fused epilogue
                          y = ((float(acc) * x_scale[m]) * w_scale[n]) + bias[n], one rounding to out_dtype. Launched
                          with enable_fp_fusion=False so that no FMA contracts the epilogue. wq is read in its plain
                          (N, K) layout (any strides) or in int8_pack_weight's packed layout (PACKED: the tile's
                          addresses follow packed[n / 64, k / 4, n % 64, k % 4] ^ 0x80: a 64-column slice of a tile
                          reads 256 contiguous bytes per 4 k, 4-byte loads instead of the plain layout's 16).
  _int8_linear_tma_kernel the same product and epilogue for large M on Hopper (sm_90+, plain weight, K % 16 == 0):
                          persistent programs (one per SM, each walking tiles in _tile_of's grouped order), both
                          operands copied into shared memory by the TMA engine through host-side tensor descriptors
                          (out-of-bounds rows and k read as zeros), so the pipeline issues no per-thread loads.
int4 weight-only (w' = (q - 8) * scale + zero, two nibbles per byte, k even in the low nibble):
  _int4_gemv_kernel       M <= GEMV_MAX_M (decode): one row of x per program column, a [BLOCK_N, BLOCK_K / 2] tile of
                          packed bytes per step (contiguous, vectorized loads), split into its low / high nibbles,
                          dequantized in float32 and multiplied by x's even / odd elements (x loaded contiguously and
                          split in registers). Split-K over program_id(1): each split writes float32 partial sums,
                          _splitk_reduce_kernel adds them in a fixed order (deterministic, no atomics) with the bias.
  _int4_mm_kernel         larger M: [BLOCK_M, BLOCK_N] tiles; per K step the weight's low and high nibbles are
                          dequantized to x's dtype (bf16 / fp16, or fp32 with "ieee" dots) and two tl.dots run against
                          x's even / odd columns, float32 accumulation. M <= SPLITK_MAX_M: BLOCK_M = 16 and split-K as
                          above (few row tiles cannot fill the GPU); beyond: autotuned tiles, the epilogue fused.
                          BLOCK_K divides group_size, so each step reads one scale and one zero per column.
  _dequantize_int4_kernel w' (N, K) float32, bit-identical to the reference (enable_fp_fusion=False: the product is
                          rounded before the add); the backward's dx = dy @ w' uses it.
  _quantize_int4_kernel   min-max per group (float32, the reference's operations in its order), packed output.
The 16-bit dots round w' to x's dtype before the multiply (tensor cores take 16-bit operands): the sum is still
accumulated in float32 and rounded once, but each weight carries a relative error of at most 2^-9 (bf16) / 2^-11
(fp16) beyond the contract's float32 w'. The float32 and GEMV paths keep w' in float32.

Interpreter (TRITON_INTERPRET=1, CPU tensors): one fixed config per kernel (the INTERPRET_* knobs), no autotuning;
bfloat16 / float16 dots go through float32 (the interpreter's bfloat16 tl.dot is broken; the values entering the
dot are the same 16-bit ones, so the arithmetic matches the GPU's); bfloat16 stores are rounded to nearest even
(the interpreter truncates). The int8 tl.dot is exact there.

Knobs (module attributes, read at every call): AUTOTUNE (MLTK_TRITON_AUTOTUNE=0 at import: first config only),
GEMV_MAX_M, SPLITK_MAX_M, INT8_TMA (None: the TMA kernel above TMA_MIN_M rows on sm_90+; True / False force it on or
off where it can run, the interpreter included), INTERPRET_BLOCK_M / _N / _K.
"""
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from .conv import _tile_of
from .host import cdiv, next_power_of_2
from .norm import _cuda_sm_count, _interpreting, _round_to

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4: no host-side tensor descriptors, no TMA kernel
    TensorDescriptor = None
from triton.compiler.errors import CompilationError

__all__ = ["quantize_rows", "int8_linear", "int4_weight_only_linear", "dequantize_int4", "quantize_int4",
           "AUTOTUNE", "GEMV_MAX_M", "SPLITK_MAX_M", "INT8_TMA", "TMA_MIN_M"]

AUTOTUNE = os.environ.get("MLTK_TRITON_AUTOTUNE", "1") != "0"
GEMV_MAX_M = 2
SPLITK_MAX_M = 16
INT8_TMA = None
TMA_MIN_M = 256
_TMA_FAILED = None  # why this Triton could not build the TMA kernel (then the cp.async kernel runs)
INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 32
INTERPRET_BLOCK_K = 64

_FLT_MIN = tl.constexpr(1.1754943508222875e-38)
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + magic - magic rounds |v| < 2^22 to an integer, half to even
_MAX_K_INT8 = 131071
_MAX_SPLIT = 16
_INTERPRET_SM_COUNT = 4
_GROUP_M = 8
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# int8 kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _rint(v):
    return (v + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _quantize_rows_kernel(X, Q, S, K, sxr, sxk, sqr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * sxr
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        x = tl.load(x_row + k * sxk, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    s = tl.where(s >= _FLT_MIN, s, 1.0)
    tl.store(S + row, s)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        ok = k < K
        x = tl.load(x_row + k * sxk, mask=ok, other=0.0).to(tl.float32)
        q = _rint(tl.math.div_rn(x, s))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(Q + row * sqr + k, q.to(tl.int8), mask=ok)


@triton.jit
def _int8_linear_kernel(XQ, XS, WQ, WS, BIAS, Y, M, N, K, TUNE_M, sxm, sxk, swn, swk, sym, syn, w_steps,
                        PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # TUNE_M (M's power of two) is an autotune key only. w_steps = ceil(K / 4), the packed layout's dim 1.
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = XQ + rows.to(tl.int64) * sxm
    if PACKED:
        # packed[n // 64, k // 4, n % 64, k % 4], contiguous: panels of 64 * 4 * w_steps bytes.
        w_cols = WQ + (cols // 64).to(tl.int64) * (w_steps * 256) + (cols % 64) * 4
    else:
        w_cols = WQ + cols.to(tl.int64) * swn
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        a = tl.load(x_rows[:, None] + (k * sxk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        if PACKED:  # stored with the sign bit flipped; 0x80 (-128) is a zero weight
            b = tl.load(w_cols[None, :] + ((k // 4) * 256 + k % 4)[:, None], mask=b_mask, other=-128)
            b = (b.to(tl.int32) ^ 128).to(tl.int8)
        else:
            b = tl.load(w_cols[None, :] + (k * swk)[:, None], mask=b_mask, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    _int8_epilogue(acc, XS, WS, BIAS, Y, M, N, sym, syn, rows, cols, HAS_BIAS, FIX_BF16)


@triton.jit
def _int8_epilogue(acc, XS, WS, BIAS, Y, M, N, sym, syn, rows, cols, HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr):
    row_ok = rows < M
    col_ok = cols < N
    xs = tl.load(XS + rows, mask=row_ok, other=0.0)
    ws = tl.load(WS + cols, mask=col_ok, other=0.0)
    y = acc.to(tl.float32) * xs[:, None]
    y = y * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rows.to(tl.int64)[:, None] * sym + cols[None, :] * syn
    tl.store(y_ptrs, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _int8_linear_tma_kernel(XQ_DESC, WQ_DESC, XS, WS, BIAS, Y, M, N, K, TUNE_M, sym, syn,
                            HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr, PROGRAMS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    # TUNE_M is an autotune key only. XQ_DESC / WQ_DESC: (M, K) / (N, K) int8 descriptors of [BLOCK_M, BLOCK_K] /
    # [BLOCK_N, BLOCK_K] blocks. PROGRAMS (the grid when there are at least as many tiles) strides the tile loop.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for ks in range(steps):
            a = XQ_DESC.load([pid_m * BLOCK_M, ks * BLOCK_K])
            b = WQ_DESC.load([pid_n * BLOCK_N, ks * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _int8_epilogue(acc, XS, WS, BIAS, Y, M, N, sym, syn, rows, cols, HAS_BIAS, FIX_BF16)


# ----------------------------------------------------------------------------------------------------------------
# int4 kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _nibbles(b):
    """(low, high) nibbles of uint8 bytes, as float32 (q - 8)."""
    b = b.to(tl.int32)
    return (b & 15).to(tl.float32) - 8.0, (b >> 4).to(tl.float32) - 8.0


@triton.jit
def _even_odd(x, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [ROWS, BLOCK_K] -> (x[:, 0::2], x[:, 1::2]), without strided loads."""
    return tl.split(tl.reshape(x, [ROWS, BLOCK_K // 2, 2]))


@triton.jit
def _int4_gemv_kernel(X, P, SC, ZE, BIAS, Y, PART, M, N, K, G, ngroups, blocks_per_split,
                      sxm, sxk, spn, sym, syn,
                      SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    p_rows = P + cols.to(tl.int64) * spn
    g_rows = cols.to(tl.int64) * ngroups
    x_row = X + m.to(tl.int64) * sxm
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    kb0 = split * blocks_per_split
    kb1 = tl.minimum(kb0 + blocks_per_split, K // BLOCK_K)
    for kb in range(kb0, kb1):
        k0 = kb * BLOCK_K
        # K is a multiple of group_size, which BLOCK_K divides: no mask along k, one group per step.
        x = tl.load(x_row + (k0 + offs_k) * sxk).to(tl.float32)
        xe, xo = _even_odd(x[None, :], 1, BLOCK_K)
        b = tl.load(p_rows[:, None] + (k0 // 2 + offs_b)[None, :], mask=col_ok[:, None], other=0)
        g = k0 // G
        s = tl.load(SC + g_rows + g, mask=col_ok, other=0.0)[:, None]
        z = tl.load(ZE + g_rows + g, mask=col_ok, other=0.0)[:, None]
        lo, hi = _nibbles(b)
        acc += (lo * s + z) * xe + (hi * s + z) * xo
    y = tl.sum(acc, axis=1)
    if SPLIT:
        tl.store(PART + (split * M + m).to(tl.int64) * N + cols, y, mask=col_ok)
    else:
        if HAS_BIAS:
            y += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(Y + m.to(tl.int64) * sym + cols * syn, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=col_ok)


@triton.jit
def _int4_mm_kernel(X, P, SC, ZE, BIAS, Y, PART, M, N, K, G, ngroups, blocks_per_split, TUNE_M,
                    sxm, sxk, spn, sym, syn,
                    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
                    PREC: tl.constexpr, FIX_BF16: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # TUNE_M (M's power of two) is an autotune key only.
    split = tl.program_id(1)
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = X + rows.to(tl.int64) * sxm
    p_cols = P + cols.to(tl.int64) * spn
    g_cols = cols.to(tl.int64) * ngroups
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = split * blocks_per_split
    kb1 = tl.minimum(kb0 + blocks_per_split, K // BLOCK_K)
    for kb in range(kb0, kb1):
        k0 = kb * BLOCK_K
        x = tl.load(x_rows[:, None] + ((k0 + offs_k) * sxk)[None, :], mask=row_ok[:, None], other=0.0)
        xe, xo = _even_odd(x, BLOCK_M, BLOCK_K)
        b = tl.load(p_cols[None, :] + (k0 // 2 + offs_b)[:, None], mask=col_ok[None, :], other=0)
        g = k0 // G
        s = tl.load(SC + g_cols + g, mask=col_ok, other=0.0)[None, :]
        z = tl.load(ZE + g_cols + g, mask=col_ok, other=0.0)[None, :]
        lo, hi = _nibbles(b)
        w_lo = (lo * s + z).to(DOT_DTYPE)
        w_hi = (hi * s + z).to(DOT_DTYPE)
        if DOT_F32:  # interpreter: its 16-bit dots are unreliable; the 16-bit values are exact in float32
            xe, xo, w_lo, w_hi = xe.to(tl.float32), xo.to(tl.float32), w_lo.to(tl.float32), w_hi.to(tl.float32)
        acc = tl.dot(xe, w_lo, acc, input_precision=PREC)
        acc = tl.dot(xo, w_hi, acc, input_precision=PREC)
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        tl.store(PART + (split * M + rows).to(tl.int64)[:, None] * N + cols[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = Y + rows.to(tl.int64)[:, None] * sym + cols[None, :] * syn
        tl.store(y_ptrs, _round_to(acc, Y.dtype.element_ty, FIX_BF16), mask=mask)


@triton.jit
def _splitk_reduce_kernel(PART, S, BIAS, Y, M, N, splits, sym, syn, HAS_SCALE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = (sum over splits, in order, of PART[s, m, n]) (* scale[n] with HAS_SCALE) + bias[n]."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(PART + s * M * N + idx, mask=ok, other=0.0)
    n = idx % N
    if HAS_SCALE:
        acc = acc * tl.load(S + n, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + (idx // N) * sym + n * syn, _round_to(acc, Y.dtype.element_ty, FIX_BF16), mask=ok)


@triton.jit
def _dequantize_int4_kernel(P, SC, ZE, W, N, K, G, ngroups, spn,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (k < K)[None, :]
    b = tl.load(P + rows.to(tl.int64)[:, None] * spn + (k // 2)[None, :], mask=mask, other=0).to(tl.int32)
    q = (b >> ((k & 1) * 4)[None, :]) & 15
    gi = rows.to(tl.int64)[:, None] * ngroups + (k // G)[None, :]
    s = tl.load(SC + gi, mask=mask, other=0.0)
    z = tl.load(ZE + gi, mask=mask, other=0.0)
    w = (q.to(tl.float32) - 8.0) * s
    w = w + z
    tl.store(W + rows.to(tl.int64)[:, None] * K + k[None, :], w, mask=mask)


@triton.jit
def _quantize_int4_kernel(Wt, P, SC, ZE, N, K, swn, swk, ngroups,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """One group (GROUP consecutive k) of BLOCK_N rows per program."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    row_ok = rows < N
    j = tl.arange(0, GROUP // 2)
    k_even = (g * GROUP + 2 * j).to(tl.int64)
    base = Wt + rows.to(tl.int64)[:, None] * swn
    we = tl.load(base + (k_even * swk)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    wo = tl.load(base + ((k_even + 1) * swk)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    mn = tl.minimum(tl.min(we, axis=1), tl.min(wo, axis=1))
    mx = tl.maximum(tl.max(we, axis=1), tl.max(wo, axis=1))
    scale = tl.math.div_rn(mx - mn, 15.0)
    safe = tl.abs(mn) * 0.125  # exact: a power of two (the reference divides by 8, the same value)
    safe = tl.where(safe == 0.0, 1.0, safe)
    scale = tl.where(scale == 0.0, safe, scale)
    zero = mn + 8.0 * scale  # 8 * scale is exact, so a fused multiply-add gives the same value
    qe = _rint(tl.math.div_rn(we - mn[:, None], scale[:, None]))
    qo = _rint(tl.math.div_rn(wo - mn[:, None], scale[:, None]))
    qe = tl.minimum(tl.maximum(qe, 0.0), 15.0).to(tl.int32)
    qo = tl.minimum(tl.maximum(qo, 0.0), 15.0).to(tl.int32)
    byte = (qe | (qo << 4)).to(tl.uint8)
    tl.store(P + rows.to(tl.int64)[:, None] * (K // 2) + (g * (GROUP // 2) + j)[None, :], byte,
             mask=row_ok[:, None])
    gi = rows.to(tl.int64) * ngroups + g
    tl.store(SC + gi, scale, mask=row_ok)
    tl.store(ZE + gi, zero, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations (H100 / H200, sm_90)
# ----------------------------------------------------------------------------------------------------------------

# int8 GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). int8 wgmma takes K = 32 per instruction and runs at
# twice bf16's rate, so BLOCK_K = 128 keeps as many bytes in flight as the bf16 GEMMs' 64. Shared memory per stage
# (BLOCK_M + BLOCK_N) * BLOCK_K bytes: 48 KiB for 128 x 256 x 128, 3 stages fit in sm_90's 227 KiB.
_INT8_LARGE = ((128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 64, 4, 4),
               (64, 128, 128, 4, 4), (128, 64, 128, 4, 4))
# The TMA kernel (Hopper): the same tile shapes; stages cost (BLOCK_M + BLOCK_N) * BLOCK_K bytes each, no register
# staging. The epilogue adds a shared-memory buffer of up to BLOCK_M * BLOCK_N output elements: a float32 output
# made the first config need 272 KiB (Triton 3.6, sm_90: test failures on an H200, 2026-11-28, with autotuning
# off), so without autotuning the first config of _tma_configs runs, whose estimate fits the device.
_INT8_TMA = ((128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
             (128, 256, 64, 8, 4), (128, 128, 128, 4, 4))
# Small M (decode, M <= 64): the weight is streamed once; narrow N tiles give enough programs to fill 132 SMs
# (N = 4096 / 32 = 128 tiles), long K steps keep loads in flight.
_INT8_SMALL = ((16, 64, 256, 4, 4), (16, 32, 256, 4, 4), (32, 64, 256, 4, 3), (16, 128, 128, 4, 4),
               (64, 64, 128, 4, 4), (16, 64, 512, 4, 3))
# int4 GEMM (large M): BLOCK_K is capped at group_size at launch (one scale per step); the weight tile is
# dequantized in registers, so tiles stay moderate (128 x 256 reaches 255 registers).
# Compiled for sm_90 by Triton 3.8 without a GPU (16-divisible pointers, strides and K), every config of these lists
# and the GEMV / reduce / dequantize / quantize kernels build with no register spills; the multi-stage ones use
# cp.async pipelines (e.g. 144 KiB of shared memory for int8 128 x 256 x 128, 3 stages), the epilogues no FMA.
_INT4_LARGE = ((128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               (64, 64, 128, 4, 3))

_INT8_KEY = ["N", "K", "TUNE_M", "PACKED", "HAS_BIAS"]
_INT8_TMA_KEY = ["N", "K", "TUNE_M", "HAS_BIAS"]
_INT4_KEY = ["N", "K", "G", "TUNE_M", "HAS_BIAS"]


def _set_tma_blocks(meta):
    """A config's pre-hook: the descriptors' block shapes follow its tile (the autotuner tries several)."""
    meta["XQ_DESC"].block_shape = [meta["BLOCK_M"], meta["BLOCK_K"]]
    meta["WQ_DESC"].block_shape = [meta["BLOCK_N"], meta["BLOCK_K"]]


@functools.cache
def _tuned(kernel, configs, key, pre_hook=None):
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": _GROUP_M}, num_warps=w,
                          num_stages=st, pre_hook=pre_hook) for bm, bn, bk, w, st in configs]
    return triton.autotune(configs=cfgs, key=list(key))(kernel)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda" or _interpreting():
        return _INTERPRET_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _pow2_bucket(m: int) -> int:
    return next_power_of_2(max(1, m))


# ----------------------------------------------------------------------------------------------------------------
# Host side: int8
# ----------------------------------------------------------------------------------------------------------------


def _interpret_int8_meta() -> dict:
    """The one config of both int8 GEMMs under the interpreter (INTERPRET_BLOCK_*, N and K at least 64 / 32)."""
    return dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=max(64, INTERPRET_BLOCK_N), BLOCK_K=max(32, INTERPRET_BLOCK_K),
                GROUP_M=2)


def quantize_rows(x: torch.Tensor):
    """x (R, K) float32 / float16 / bfloat16, any strides -> (q int8 (R, K), scale float32 (R,))."""
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"quantize_rows_triton: x must be 2-D float32 / float16 / bfloat16, got {x.dtype} "
                         f"{tuple(x.shape)}")
    R, K = x.shape
    q = torch.empty((R, K), dtype=torch.int8, device=x.device)
    s = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R == 0:
        return q, s
    if K == 0:
        return q, s.fill_(1.0)
    if _interpreting():
        block, warps = 128, 4
    else:  # one pass over a row of up to 4096 elements in registers per chunk, 16 bytes per thread per load
        block = min(4096, max(128, next_power_of_2(K)))
        warps = 4 if block <= 1024 else 8
    _quantize_rows_kernel[(R,)](x, q, s, K, x.stride(0), x.stride(1), q.stride(0), BLOCK_K=block, num_warps=warps,
                                enable_fp_fusion=False)
    return q, s


def int8_linear(xq, x_scale, wq, w_scale, bias, out_dtype):
    """csrc/int8_linear.h's int8_linear: xq int8 (M, K), x_scale float32 (M,), wq int8 (N, K) or packed
    (ceil(N / 64), ceil(K / 4), 64, 4), w_scale float32 (N,), bias (N,) or None -> y (M, N) in out_dtype."""
    M, K = xq.shape
    N = w_scale.shape[0]
    if K > _MAX_K_INT8:
        raise RuntimeError(f"int8_linear_triton: K must be at most {_MAX_K_INT8} (int32 accumulation), got {K}")
    packed = wq.dim() == 4
    if packed:
        wq = wq.contiguous()
        swn, swk, steps = 0, 1, wq.shape[1]
    else:
        swn, swk, steps = wq.stride(0), wq.stride(1), 0
    y = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(torch.zeros(1, device=xq.device) if bias is None else bias.float().expand(M, N))
    xs, ws = x_scale.contiguous(), w_scale.contiguous()
    b = bias.contiguous() if bias is not None else xs
    if _use_tma(xq, wq, M):
        try:
            return _int8_linear_tma(xq, xs, wq, ws, b, y, bias is not None)
        except (CompilationError, TypeError, AttributeError) as e:  # this Triton's API or compiler refused it
            if INT8_TMA:
                raise
            _tma_failed(e)
    args = (xq, xs, wq, ws, b, y, M, N, K, _pow2_bucket(M), xq.stride(0), xq.stride(1), swn, swk,
            y.stride(0), y.stride(1), steps)
    consts = dict(PACKED=packed, HAS_BIAS=bias is not None, FIX_BF16=_interpreting())

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    if _interpreting():
        meta = _interpret_int8_meta()
        _int8_linear_kernel[grid(meta)](*args, **consts, **meta)
    else:
        configs = _INT8_SMALL if M <= 64 else _INT8_LARGE
        _tuned(_int8_linear_kernel, configs if AUTOTUNE else configs[:1], tuple(_INT8_KEY))[grid](
            *args, **consts, enable_fp_fusion=False)
    return y


def _tma_layout_ok(t: torch.Tensor) -> bool:
    """A tensor descriptor's rules: 16-byte aligned base and row stride, contiguous rows."""
    return t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0


def _use_tma(xq, wq, M: int) -> bool:
    """The TMA kernel for this call: INT8_TMA, or by default on sm_90+ above TMA_MIN_M rows; never where it cannot
    run (no tensor descriptors in this Triton, the packed weight, a layout TMA cannot address)."""
    if TensorDescriptor is None or wq.dim() != 2 or not (_tma_layout_ok(xq) and _tma_layout_ok(wq)):
        return False
    if INT8_TMA is not None:
        return bool(INT8_TMA)
    return (_TMA_FAILED is None and not _interpreting() and M > TMA_MIN_M and xq.is_cuda
            and torch.cuda.get_device_capability(xq.device)[0] >= 9)


def _tma_failed(e: Exception) -> None:
    global _TMA_FAILED
    _TMA_FAILED = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    warnings.warn(f"int8_linear_triton: the TMA kernel does not build with Triton {triton.__version__} "
                  f"({_TMA_FAILED}); the cp.async kernel runs instead", RuntimeWarning, stacklevel=3)


def _tma_smem_estimate(config, out_bytes: int) -> int:
    """Shared memory of a TMA config: its stages, an epilogue buffer of the output tile and 1 KiB for barriers.
    Compiled for sm_90 by Triton 3.6 and 3.8, the estimate is at or above the kernel's own figure (e.g. 128 x 256 x
    128, 3 stages: float32 output 279552 estimated / 278552 compiled, bfloat16 214016 / 180248)."""
    bm, bn, bk, _, stages = config
    return stages * (bm + bn) * bk + bm * bn * out_bytes + 1024


@functools.cache
def _tma_configs(out_bytes: int, device: torch.device) -> tuple:
    """The _INT8_TMA configs that fit the device's shared memory (all of them if none is known to fit)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Where torch's properties lack the figure (ROCm builds), 48 KiB: no config fits and all are kept.
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 49152)
    return tuple(c for c in _INT8_TMA if _tma_smem_estimate(c, out_bytes) <= limit) or _INT8_TMA


def _int8_linear_tma(xq, xs, wq, ws, b, y, has_bias: bool):
    M, K = xq.shape
    N = wq.shape[0]
    programs = _sm_count(xq.device)
    # Block shapes are placeholders until a config's pre-hook (or the interpreter's config below) sets them.
    x_desc = TensorDescriptor(xq, [M, K], [xq.stride(0), 1], [16, 32])
    w_desc = TensorDescriptor(wq, [N, K], [wq.stride(0), 1], [16, 32])
    args = (x_desc, w_desc, xs, ws, b, y, M, N, K, _pow2_bucket(M), y.stride(0), y.stride(1))
    consts = dict(HAS_BIAS=has_bias, FIX_BF16=_interpreting(), PROGRAMS=programs)

    def grid(meta):
        return (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)

    if _interpreting():
        meta = _interpret_int8_meta()
        _set_tma_blocks({"XQ_DESC": x_desc, "WQ_DESC": w_desc, **meta})
        _int8_linear_tma_kernel[grid(meta)](*args, **consts, **meta)
    else:
        # The autotuner skips a config that runs out of shared memory; without it, the first one that fits runs.
        configs = _INT8_TMA if AUTOTUNE else _tma_configs(y.element_size(), xq.device)[:1]
        _tuned(_int8_linear_tma_kernel, configs, tuple(_INT8_TMA_KEY), _set_tma_blocks)[grid](
            *args, **consts, enable_fp_fusion=False)
    return y


# ----------------------------------------------------------------------------------------------------------------
# Host side: int4
# ----------------------------------------------------------------------------------------------------------------


def _splits(tiles: int, k_blocks: int, device, per_sm: int) -> tuple[int, int]:
    """(splits, k blocks per split): about `per_sm` programs per SM (enough loads in flight to stream the weight at
    full bandwidth), at most _MAX_SPLIT, never an empty split."""
    want = max(1, min(_MAX_SPLIT, k_blocks, cdiv(per_sm * _sm_count(device), max(1, tiles))))
    per = cdiv(k_blocks, want)
    return cdiv(k_blocks, per), per


def int4_weight_only_linear(x, packed, scales, zeros, group_size, bias):
    """csrc/int4_linear.h's int4_weight_only_linear: x (M, K) float32 / float16 / bfloat16 (any strides), packed
    (N, K/2) uint8, scales / zeros (N, K/G) float32, bias (N,) of x's dtype or None -> y (M, N) in x's dtype."""
    M, K = x.shape
    N = packed.shape[0]
    G = int(group_size)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    scales, zeros = scales.contiguous(), zeros.contiguous()
    b = bias.contiguous() if bias is not None else scales
    interp = _interpreting()
    ngroups = K // G
    common = dict(HAS_BIAS=bias is not None, FIX_BF16=interp)

    def finish(part, splits):
        block = 1024
        _splitk_reduce_kernel[(cdiv(M * N, block),)](part, b, b, y, M, N, splits, y.stride(0), y.stride(1),
                                                             HAS_SCALE=False, BLOCK=block, **common)

    if M <= GEMV_MAX_M:
        # 4 KiB of packed weight per program and step (32 bytes per thread at 4 warps), 3 steps in flight.
        block_k = min(G, INTERPRET_BLOCK_K if interp else 128)
        block_n = INTERPRET_BLOCK_N if interp else max(16, min(128, 8192 // block_k))
        tiles = cdiv(N, block_n)
        splits, per = _splits(tiles * M, K // block_k, x.device, 4)
        part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
        _int4_gemv_kernel[(tiles, splits, M)](x, packed, scales, zeros, b, y, part, M, N, K, G, ngroups, per,
                                              x.stride(0), x.stride(1), packed.stride(0), y.stride(0), y.stride(1),
                                              SPLIT=splits > 1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
                                              num_stages=1 if interp else 3, **common)
        if splits > 1:
            finish(part, splits)
        return y

    dot_dtype = _TL[x.dtype]
    consts = dict(DOT_DTYPE=dot_dtype, DOT_F32=interp and x.dtype != torch.float32,
                  PREC="ieee" if x.dtype == torch.float32 or interp else "tf32", **common)
    args_tail = (x.stride(0), x.stride(1), packed.stride(0), y.stride(0), y.stride(1))
    if interp or M <= SPLITK_MAX_M:
        if interp:
            bm, bn, bk, warps, stages = INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, INTERPRET_BLOCK_K, 4, 1
        else:  # decode-sized M: one row tile, split-K for parallelism (see _splits)
            bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
        bk = min(bk, G)
        tiles = cdiv(M, bm) * cdiv(N, bn)
        splits, per = _splits(tiles, K // bk, x.device, 2) if M <= SPLITK_MAX_M else (1, K // bk)
        part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
        _int4_mm_kernel[(tiles, splits)](x, packed, scales, zeros, b, y, part, M, N, K, G, ngroups, per,
                                         _pow2_bucket(M), *args_tail, SPLIT=splits > 1, BLOCK_M=bm, BLOCK_N=bn,
                                         BLOCK_K=bk, GROUP_M=_GROUP_M, num_warps=warps, num_stages=stages,
                                         **consts)
        if splits > 1:
            finish(part, splits)
        return y

    # Large M: autotuned tiles, one split (blocks_per_split = every K block), epilogue fused. BLOCK_K <= G.
    configs = tuple((bm, bn, min(bk, G), w, st) for bm, bn, bk, w, st in _INT4_LARGE)
    configs = tuple(dict.fromkeys(configs))

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), 1)

    _tuned(_int4_mm_kernel, configs if AUTOTUNE else configs[:1], tuple(_INT4_KEY))[grid](
        x, packed, scales, zeros, b, y, y, M, N, K, G, ngroups, K, _pow2_bucket(M), *args_tail, SPLIT=False,
        **consts)
    return y


def dequantize_int4(packed, scales, zeros, group_size):
    """w' (N, K) float32 = (q - 8) * scale + zero, bit-identical to the reference."""
    N, K = packed.shape[0], 2 * packed.shape[1]
    G = int(group_size)
    w = torch.empty((N, K), dtype=torch.float32, device=packed.device)
    if N == 0 or K == 0:
        return w
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    bn, bk = 32, 128
    _dequantize_int4_kernel[(cdiv(N, bn), cdiv(K, bk))](
        packed, scales.contiguous(), zeros.contiguous(), w, N, K, G, K // G, packed.stride(0),
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4, enable_fp_fusion=False)
    return w


def quantize_int4(w, group_size):
    """w (N, K) float32 / float16 / bfloat16 (any strides) -> (packed (N, K/2) uint8, scales (N, K/G) float32,
    zeros (N, K/G) float32), bit-identical to the reference."""
    N, K = w.shape
    G = int(group_size)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_int4: w must be finite (it has inf or nan)")
    packed = torch.empty((N, K // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((N, K // G), dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    if N == 0 or K == 0:
        return packed, scales, zeros
    bn = 16 if _interpreting() else max(1, 2048 // G)
    _quantize_int4_kernel[(cdiv(N, bn), K // G)](w, packed, scales, zeros, N, K, w.stride(0), w.stride(1),
                                                        K // G, GROUP=G, BLOCK_N=bn, num_warps=4,
                                                        enable_fp_fusion=False)
    return packed, scales, zeros
