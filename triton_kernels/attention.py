"""Scaled dot-product attention as Triton kernels: FlashAttention-2 forward and backward.

The contract is csrc/attention.h's, shared by every backend (mltoolkit/ops/reference/attention.py writes it in plain
PyTorch). In short, per sequence b, query head h (key/value head h // (Hq / Hkv)), query row i and key row j:

    s[i,j]  = scale * q[i].k[j] + mask[b,h,i,j]   over keys the window allows (causal / sliding / bottom-right)
    lse[i]  = log(sum_j exp(s[i,j]))               (+inf, and out = 0, for a row with no allowed key)
    out[i]  = sum_j exp(s[i,j] - lse[i]) * keep[i,j] / (1 - dropout_p) * v[j]
    keep    = Philox4x32-10 word (j & 3) of counter (j >> 2, i, b * Hq + h, 0), key (seed lo, seed hi), >= T

Kernels (ported in spirit from Tri Dao's FlashAttention-2 paper and the Triton fused-attention tutorial):
  _attention_fwd_kernel       one program per (query block, query head, sequence); online softmax over the key
                              blocks that intersect the window band: the band's edge blocks (and the ragged last
                              block) are masked, the blocks in between are not. Writes out and lse.
  _attention_bwd_preprocess_kernel   delta = rowsum(dout * out) in float32 (the softmax-gradient row term).
  _attention_bwd_dkdv_kernel  one program per (key block, key/value head, sequence): loops over the query heads of
                              its GQA group and their query blocks in the band, accumulating dk and dv in registers
                              (no atomics). Tiles are [keys, queries] (k q^T, v do^T), so that p and ds feed
                              dv += p^T do and dk += ds^T q without transposing a register tile.
  _attention_bwd_dq_kernel    one program per (query block, query head, sequence): loops over the key blocks.
The backward is deterministic whatever `deterministic` says: no program adds into another's output.

Arithmetic: dots in the input dtype with float32 accumulation (float32 inputs: input_precision="ieee", not TF32),
softmax in float32 in the log2 domain (exp2). Dropout's Philox is written out here in uint32 arithmetic, so that
the mask is bit-identical to reference.dropout_keep whatever the Triton version.

Limits: head dim 1..256 (the block is the next power of two >= 16, masked); at most 65535 heads and sequences (grid
dimensions 1 and 2); float32 is exact-ish but slow (FMA dots, no tensor cores). cu_seqlens / max_seqlen values are
checked when on the CPU and trusted on the GPU (checking them there would synchronize every call).

Launch blocks: autotuned on the GPU (configs per head-dim class, keyed on head dim, flags, dtype and the power of two
of the sequence lengths); under TRITON_INTERPRET=1 one config, INTERPRET_BLOCK_M x INTERPRET_BLOCK_N (module knobs,
read at every call, so tests can change them). AUTOTUNE = False (or MLTK_TRITON_AUTOTUNE=0 in the environment at
import) runs the first config of each class instead: one compile per kernel variant rather than one per config and
no benchmarking (for test runs on a fresh GPU machine), and the same blocks, hence bit-identical results, in every
process (the autotuner's pick depends on timings).
"""
import contextlib
import functools
import math
import numbers
import os

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

__all__ = ["attention_forward", "attention_backward", "INTERPRET_BLOCK_M", "INTERPRET_BLOCK_N", "AUTOTUNE"]

INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 16
AUTOTUNE = os.environ.get("MLTK_TRITON_AUTOTUNE", "1") != "0"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2 (heads, sequences)
_LOG2E = 1.4426950408889634

# Integer arguments whose value changes from call to call: not specialized (divisibility by 16, == 1), so that a
# new seed or window does not compile a new kernel.
_NO_SPECIALIZE = ["Lq", "Lk", "TUNE_LQ", "TUNE_LK", "window_left", "window_right", "seed_lo", "seed_hi",
                  "drop_thresh"]


# ----------------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _sequence(CU_Q, CU_K, seq, Lq, Lk, IS_VARLEN: tl.constexpr):
    """(batch index, first query row, first key row, query rows, key rows) of logical sequence `seq`."""
    zero = seq * 0  # tensors in both branches, whatever Lq / Lk were specialized to
    if IS_VARLEN:
        q0 = tl.load(CU_Q + seq)
        k0 = tl.load(CU_K + seq)
        lq = tl.load(CU_Q + seq + 1) - q0
        lk = tl.load(CU_K + seq + 1) - k0
        bat = zero
    else:
        q0 = zero
        k0 = zero
        lq = zero + Lq
        lk = zero + Lk
        bat = seq
    return bat.to(tl.int64), q0.to(tl.int64), k0.to(tl.int64), lq, lk


@triton.jit
def _band(first, last, length, diag, w_lo, w_hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    """Blocks of the other axis that rows first..last may see, where row r sees columns
    r + diag - w_lo <= c <= r + diag + w_hi (a bound is absent without HAS_LO / HAS_HI) and c < length.

    Returns (lo, full_lo, full_hi, hi), all block-aligned starts except hi: [lo, hi) holds every visible column;
    the blocks in [full_lo, full_hi) are visible from every row and lie inside `length` (no mask needed), those in
    [lo, full_lo) and [full_hi, hi) need the mask. Empty ranges come out as start >= end.
    """
    lo = first * 0
    full_lo = lo
    hi = length + lo
    limit = hi
    if HAS_LO:
        lo = tl.maximum(first + diag - w_lo, 0) // BLOCK * BLOCK
        full_lo = tl.maximum((tl.maximum(last + diag - w_lo, 0) + BLOCK - 1) // BLOCK * BLOCK, lo)
    if HAS_HI:
        hi = tl.minimum(tl.maximum(last + diag + w_hi + 1, 0), length)
        limit = tl.minimum(tl.maximum(first + diag + w_hi + 1, 0), length)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(limit // BLOCK * BLOCK, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _allowed(i, j, ok, diag, window_left, window_right, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr):
    """ok & the window rule of attention.h, for query rows i and key columns j (broadcastable 2-D)."""
    if WIN_LEFT:
        ok = ok & (j >= i + (diag - window_left))
    if WIN_RIGHT:
        ok = ok & (j <= i + (diag + window_right))
    return ok


@triton.jit
def _load(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows and padded head-dim columns are masked only where they can be out of range."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _dropout_draws(rows, col0, head, seed_lo, seed_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Philox4x32-10 draws for query rows `rows` (local) and key columns col0 .. col0 + BLOCK_N - 1 (col0 % 4 == 0)
    of head index `head` (b * Hq + h): [BLOCK_M, BLOCK_N] int32, the uint32 draw minus 2^31 (so that a signed
    comparison with T - 2^31 is the unsigned comparison with T). One Philox call covers 4 consecutive columns."""
    G: tl.constexpr = BLOCK_N // 4
    zero = tl.zeros([BLOCK_M, G], dtype=tl.uint32)
    c0 = zero + (col0 // 4 + tl.arange(0, G)).to(tl.uint32)[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    c2 = zero + head
    c3 = zero
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = tl.mul(c0, 0xD2511F53, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = tl.mul(c2, 0xCD9E8D57, sanitize_overflow=False)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    # join(join(w0, w2), join(w1, w3))[r, g, x, y] is word 2x + y (y picks the outer operand), so the row-major
    # reshape puts word w at column 4g + w.
    words = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK_M, BLOCK_N])
    return (words ^ 0x80000000).to(tl.int32, bitcast=True)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, start, end, rows, rows64, row_ok, offs_n, offs_d,
                d_ok, Lk_b, diag, window_left, window_right, stride_kn, stride_vn, stride_mm, stride_mn, qk_scale,
                seed_lo, seed_hi, drop_thresh, drop_head,
                MASKED: tl.constexpr, HAS_MASK: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk_b
        cols64 = cols.to(tl.int64)
        k = _load(k_base + cols64[:, None] * stride_kn + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if HAS_MASK:
            bounds = row_ok[:, None]
            if MASKED:
                bounds = bounds & col_ok[None, :]
            am = tl.load(mask_base + rows64[:, None] * stride_mm + cols64[None, :] * stride_mn, mask=bounds,
                         other=0.0)
            s += am.to(tl.float32) * 1.4426950408889634
        if MASKED:
            ok = _allowed(rows[:, None], cols[None, :], col_ok[None, :], diag, window_left, window_right,
                          WIN_LEFT, WIN_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_MASK:
            # A row with only -inf so far: subtract 0, not -inf (-inf - -inf would be nan).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + cols64[:, None] * stride_vn + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        if HAS_DROPOUT:
            keep = _dropout_draws(rows, start_n, drop_head, seed_lo, seed_hi, BLOCK_M, BLOCK_N) >= drop_thresh
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attention_fwd_kernel(Q, K, V, MASK, OUT, LSE, CU_Q, CU_K,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_mb, stride_mh, stride_mm, stride_mn,
                          stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                          Lq, Lk, TUNE_LQ, TUNE_LK, qk_scale, out_scale, window_left, window_right,
                          seed_lo, seed_hi, drop_thresh, Hq, GROUP, D,
                          HAS_MASK: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                          BOTTOM_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
                          EVEN_D: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # TUNE_LQ / TUNE_LK are autotune keys only (powers of two of the lengths).
    # Last query blocks first: under a causal window they have the most work, so they should not run last.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    bat, q0, k0, Lq_b, Lk_b = _sequence(CU_Q, CU_K, seq, Lq, Lk, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq_b:
        return
    m_last = tl.minimum(m0 + BLOCK_M, Lq_b) - 1
    if BOTTOM_RIGHT:
        diag = Lk_b - Lq_b
    else:
        diag = Lk_b * 0
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq_b
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = _load(Q + bat * stride_qb + h64 * stride_qh + (q0 + rows64)[:, None] * stride_qm + offs_d[None, :],
              row_ok, d_ok, True, EVEN_D)
    k_base = K + bat * stride_kb + hk64 * stride_kh + k0 * stride_kn
    v_base = V + bat * stride_vb + hk64 * stride_vh + k0 * stride_vn
    mask_base = MASK + bat * stride_mb + h64 * stride_mh
    drop_head = (seq * Hq + h).to(tl.uint32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _band(m0, m_last, Lk_b, diag, window_left, window_right, WIN_LEFT, WIN_RIGHT,
                                     BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, lo, full_lo, rows, rows64, row_ok,
                                offs_n, offs_d, d_ok, Lk_b, diag, window_left, window_right, stride_kn, stride_vn,
                                stride_mm, stride_mn, qk_scale, seed_lo, seed_hi, drop_thresh, drop_head,
                                True, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT, EVEN_D, PREC, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, full_lo, full_hi, rows, rows64,
                                row_ok, offs_n, offs_d, d_ok, Lk_b, diag, window_left, window_right, stride_kn,
                                stride_vn, stride_mm, stride_mn, qk_scale, seed_lo, seed_hi, drop_thresh, drop_head,
                                False, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT, EVEN_D, PREC, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, full_hi, hi, rows, rows64, row_ok,
                                offs_n, offs_d, d_ok, Lk_b, diag, window_left, window_right, stride_kn, stride_vn,
                                stride_mm, stride_mn, qk_scale, seed_lo, seed_hi, drop_thresh, drop_head,
                                True, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT, EVEN_D, PREC, BLOCK_M, BLOCK_N)

    # A row with no allowed key (l == 0) has acc == 0: out 0, lse +inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (out_scale / l_safe)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = OUT + bat * stride_ob + h64 * stride_oh + (q0 + rows64)[:, None] * stride_om + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bat * stride_lb + h64 * stride_lh + q0 + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _attention_bwd_preprocess_kernel(OUT, DOUT, DELTA, L, stride_ob, stride_oh, stride_om,
                                     stride_db, stride_dh, stride_dm, stride_lb, stride_lh, D,
                                     EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows of (B, Hq, L): with varlen, L is the packed length and sequences do not matter here.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    row_ok = rows < L
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    o = _load(OUT + b64 * stride_ob + h64 * stride_oh + rows64[:, None] * stride_om + offs_d[None, :], row_ok,
              d_ok, True, EVEN_D)
    do = _load(DOUT + b64 * stride_db + h64 * stride_dh + rows64[:, None] * stride_dm + offs_d[None, :], row_ok,
               d_ok, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + rows, delta, mask=row_ok)


@triton.jit
def _bwd_kv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start, end, cols, cols64, col_ok,
                   offs_m, offs_d, d_ok, Lq_b, diag, window_left, window_right, stride_qm, stride_dom, stride_mm,
                   stride_mn, qk_scale, inv_keep, seed_lo, seed_hi, drop_thresh, drop_head, n0,
                   MASKED: tl.constexpr, HAS_MASK: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Tiles are transposed, [keys, queries]: k q^T and v do^T, so that dk and dv come out of plain dots.
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Lq_b
        rows64 = rows.to(tl.int64)
        q = _load(q_base + rows64[:, None] * stride_qm + offs_d[None, :], row_ok, d_ok, MASKED, EVEN_D)
        do = _load(do_base + rows64[:, None] * stride_dom + offs_d[None, :], row_ok, d_ok, MASKED, EVEN_D)
        if MASKED:
            # lse +inf makes p 0 on rows past the end.
            lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        if HAS_MASK:
            bounds = col_ok[:, None]
            if MASKED:
                bounds = bounds & row_ok[None, :]
            am = tl.load(mask_base + rows64[None, :] * stride_mm + cols64[:, None] * stride_mn, mask=bounds,
                         other=0.0)
            s_t += am.to(tl.float32) * 1.4426950408889634
        # lse +inf (a row with no allowed key) gives p 0, also where s is -inf.
        p_t = tl.math.exp2(s_t - (lse * 1.4426950408889634)[None, :])
        if MASKED:
            ok = _allowed(rows[None, :], cols[:, None], row_ok[None, :], diag, window_left, window_right,
                          WIN_LEFT, WIN_RIGHT)
            p_t = tl.where(ok, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        if HAS_DROPOUT:
            keep_t = tl.trans(_dropout_draws(rows, n0, drop_head, seed_lo, seed_hi, BLOCK_M, BLOCK_N)) >= drop_thresh
            pd_t = tl.where(keep_t, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            pd_t = p_t
        dv = tl.dot(pd_t.to(do.dtype), do, dv, input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attention_bwd_dkdv_kernel(Q, K, V, MASK, DOUT, LSE, DELTA, DK, DV, CU_Q, CU_K,
                               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                               stride_vb, stride_vh, stride_vn, stride_mb, stride_mh, stride_mm, stride_mn,
                               stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
                               stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                               Lq, Lk, TUNE_LQ, TUNE_LK, scale, qk_scale, inv_keep, window_left, window_right,
                               seed_lo, seed_hi, drop_thresh, Hq, GROUP, D,
                               HAS_MASK: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                               BOTTOM_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
                               EVEN_D: tl.constexpr, PREC: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # TUNE_LQ / TUNE_LK are autotune keys only.
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    seq = tl.program_id(2)
    bat, q0, k0, Lq_b, Lk_b = _sequence(CU_Q, CU_K, seq, Lq, Lk, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= Lk_b:
        return
    n_last = tl.minimum(n0 + BLOCK_N, Lk_b) - 1
    if BOTTOM_RIGHT:
        diag = Lk_b - Lq_b
    else:
        diag = Lk_b * 0
    hk64 = hk.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Lk_b
    cols64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = _load(K + bat * stride_kb + hk64 * stride_kh + (k0 + cols64)[:, None] * stride_kn + offs_d[None, :],
              col_ok, d_ok, True, EVEN_D)
    v = _load(V + bat * stride_vb + hk64 * stride_vh + (k0 + cols64)[:, None] * stride_vn + offs_d[None, :],
              col_ok, d_ok, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query rows i that see key j: j - diag - window_right <= i <= j - diag + window_left.
    lo, full_lo, full_hi, hi = _band(n0, n_last, Lq_b, -diag, window_right, window_left, WIN_RIGHT, WIN_LEFT,
                                     BLOCK_M)
    for g in range(GROUP):
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        q_base = Q + bat * stride_qb + h64 * stride_qh + q0 * stride_qm
        do_base = DOUT + bat * stride_dob + h64 * stride_doh + q0 * stride_dom
        lse_base = LSE + bat * stride_lb + h64 * stride_lh + q0
        delta_base = DELTA + bat * stride_lb + h64 * stride_lh + q0
        mask_base = MASK + bat * stride_mb + h64 * stride_mh
        drop_head = (seq * Hq + h).to(tl.uint32)
        dk, dv = _bwd_kv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, lo, full_lo, cols,
                                cols64, col_ok, offs_m, offs_d, d_ok, Lq_b, diag, window_left, window_right,
                                stride_qm, stride_dom, stride_mm, stride_mn, qk_scale, inv_keep, seed_lo, seed_hi,
                                drop_thresh, drop_head, n0, True, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT,
                                EVEN_D, PREC, BLOCK_M, BLOCK_N)
        dk, dv = _bwd_kv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, full_lo, full_hi,
                                cols, cols64, col_ok, offs_m, offs_d, d_ok, Lq_b, diag, window_left, window_right,
                                stride_qm, stride_dom, stride_mm, stride_mn, qk_scale, inv_keep, seed_lo, seed_hi,
                                drop_thresh, drop_head, n0, False, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT,
                                EVEN_D, PREC, BLOCK_M, BLOCK_N)
        dk, dv = _bwd_kv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, full_hi, hi, cols,
                                cols64, col_ok, offs_m, offs_d, d_ok, Lq_b, diag, window_left, window_right,
                                stride_qm, stride_dom, stride_mm, stride_mn, qk_scale, inv_keep, seed_lo, seed_hi,
                                drop_thresh, drop_head, n0, True, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT,
                                EVEN_D, PREC, BLOCK_M, BLOCK_N)
    dk = dk * scale
    if EVEN_D:
        st_mask = col_ok[:, None]
    else:
        st_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + bat * stride_dkb + hk64 * stride_dkh + (k0 + cols64)[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + bat * stride_dvb + hk64 * stride_dvh + (k0 + cols64)[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _bwd_q_blocks(dq, q, do, lse2, delta, k_base, v_base, mask_base, start, end, rows, rows64, row_ok, offs_n,
                  offs_d, d_ok, Lk_b, diag, window_left, window_right, stride_kn, stride_vn, stride_mm, stride_mn,
                  qk_scale, inv_keep, seed_lo, seed_hi, drop_thresh, drop_head,
                  MASKED: tl.constexpr, HAS_MASK: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk_b
        cols64 = cols.to(tl.int64)
        k = _load(k_base + cols64[:, None] * stride_kn + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        v = _load(v_base + cols64[:, None] * stride_vn + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if HAS_MASK:
            bounds = row_ok[:, None]
            if MASKED:
                bounds = bounds & col_ok[None, :]
            am = tl.load(mask_base + rows64[:, None] * stride_mm + cols64[None, :] * stride_mn, mask=bounds,
                         other=0.0)
            s += am.to(tl.float32) * 1.4426950408889634
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            ok = _allowed(rows[:, None], cols[None, :], col_ok[None, :], diag, window_left, window_right,
                          WIN_LEFT, WIN_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if HAS_DROPOUT:
            keep = _dropout_draws(rows, start_n, drop_head, seed_lo, seed_hi, BLOCK_M, BLOCK_N) >= drop_thresh
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attention_bwd_dq_kernel(Q, K, V, MASK, DOUT, LSE, DELTA, DQ, CU_Q, CU_K,
                             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn, stride_mb, stride_mh, stride_mm, stride_mn,
                             stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
                             stride_dqb, stride_dqh, stride_dqm,
                             Lq, Lk, TUNE_LQ, TUNE_LK, scale, qk_scale, inv_keep, window_left, window_right,
                             seed_lo, seed_hi, drop_thresh, Hq, GROUP, D,
                             HAS_MASK: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                             BOTTOM_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
                             EVEN_D: tl.constexpr, PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # TUNE_LQ / TUNE_LK are autotune keys only. Last query blocks first, as in the forward.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    bat, q0, k0, Lq_b, Lk_b = _sequence(CU_Q, CU_K, seq, Lq, Lk, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq_b:
        return
    m_last = tl.minimum(m0 + BLOCK_M, Lq_b) - 1
    if BOTTOM_RIGHT:
        diag = Lk_b - Lq_b
    else:
        diag = Lk_b * 0
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq_b
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load(Q + bat * stride_qb + h64 * stride_qh + (q0 + rows64)[:, None] * stride_qm + offs_d[None, :],
              row_ok, d_ok, True, EVEN_D)
    do = _load(DOUT + bat * stride_dob + h64 * stride_doh + (q0 + rows64)[:, None] * stride_dom + offs_d[None, :],
               row_ok, d_ok, True, EVEN_D)
    # lse +inf on rows past the end (and on rows with no allowed key) makes p 0 there.
    lse = tl.load(LSE + bat * stride_lb + h64 * stride_lh + q0 + rows, mask=row_ok, other=float("inf"))
    lse2 = lse * 1.4426950408889634
    delta = tl.load(DELTA + bat * stride_lb + h64 * stride_lh + q0 + rows, mask=row_ok, other=0.0)
    k_base = K + bat * stride_kb + hk64 * stride_kh + k0 * stride_kn
    v_base = V + bat * stride_vb + hk64 * stride_vh + k0 * stride_vn
    mask_base = MASK + bat * stride_mb + h64 * stride_mh
    drop_head = (seq * Hq + h).to(tl.uint32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _band(m0, m_last, Lk_b, diag, window_left, window_right, WIN_LEFT, WIN_RIGHT,
                                     BLOCK_N)
    dq = _bwd_q_blocks(dq, q, do, lse2, delta, k_base, v_base, mask_base, lo, full_lo, rows, rows64, row_ok, offs_n,
                       offs_d, d_ok, Lk_b, diag, window_left, window_right, stride_kn, stride_vn, stride_mm,
                       stride_mn, qk_scale, inv_keep, seed_lo, seed_hi, drop_thresh, drop_head,
                       True, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT, EVEN_D, PREC, BLOCK_M, BLOCK_N)
    dq = _bwd_q_blocks(dq, q, do, lse2, delta, k_base, v_base, mask_base, full_lo, full_hi, rows, rows64, row_ok,
                       offs_n, offs_d, d_ok, Lk_b, diag, window_left, window_right, stride_kn, stride_vn, stride_mm,
                       stride_mn, qk_scale, inv_keep, seed_lo, seed_hi, drop_thresh, drop_head,
                       False, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT, EVEN_D, PREC, BLOCK_M, BLOCK_N)
    dq = _bwd_q_blocks(dq, q, do, lse2, delta, k_base, v_base, mask_base, full_hi, hi, rows, rows64, row_ok, offs_n,
                       offs_d, d_ok, Lk_b, diag, window_left, window_right, stride_kn, stride_vn, stride_mm,
                       stride_mn, qk_scale, inv_keep, seed_lo, seed_hi, drop_thresh, drop_head,
                       True, HAS_MASK, WIN_LEFT, WIN_RIGHT, HAS_DROPOUT, EVEN_D, PREC, BLOCK_M, BLOCK_N)
    dq = dq * scale
    dq_ptrs = DQ + bat * stride_dqb + h64 * stride_dqh + (q0 + rows64)[:, None] * stride_dqm + offs_d[None, :]
    if EVEN_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _decorated_for_interpreter() -> bool:
    # @triton.jit picks the interpreter when this module is imported (TRITON_INTERPRET=1 set before), so ask it.
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - other Triton layouts
        return False
    return isinstance(_attention_fwd_kernel, InterpretedFunction)


_INTERPRETED = _decorated_for_interpreter()


def _interpreting() -> bool:
    return _INTERPRETED


# Autotune configs (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages) per head-dim class (BLOCK_D <= 64,
# 128, 256), for H100/H200. 16-bit inputs use wgmma; configs that spilled registers when compiled for sm_90 are left
# out. float32 (input_precision="ieee") has no tensor-core path: its dots run on FMA units with whole head-dim rows
# in registers, so it takes small tiles.
_FWD_CONFIGS = {
    64: ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)),
    128: ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)),
    256: ((128, 64, 8, 2), (64, 32, 4, 2)),
}
# dk/dv: BLOCK_N keys per program, BLOCK_M query rows per step.
_DKDV_CONFIGS = {
    64: ((64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2)),
    128: ((64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 2)),
    256: ((32, 64, 8, 2), (32, 32, 4, 2)),
}
_DQ_CONFIGS = {
    64: ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)),
    128: ((128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)),
    256: ((64, 32, 8, 2), (32, 32, 4, 2)),
}
_FWD_CONFIGS_FP32 = {
    64: ((32, 32, 4, 2),),
    128: ((16, 16, 4, 2), (32, 32, 8, 2)),
    256: ((16, 16, 4, 2), (16, 16, 8, 1), (16, 32, 8, 2)),
}
_DKDV_CONFIGS_FP32 = {
    64: ((32, 32, 4, 2),),
    128: ((16, 32, 8, 2), (16, 16, 4, 2)),
    256: ((16, 16, 8, 2), (16, 16, 4, 2)),
}
_DQ_CONFIGS_FP32 = {
    64: ((32, 32, 4, 2),),
    128: ((32, 16, 8, 2), (16, 16, 4, 2)),
    256: ((16, 16, 8, 2), (16, 16, 4, 2)),
}
# Everything that changes which config is best; the tensors' dtypes are added by the autotuner.
_TUNE_KEY = ["BLOCK_D", "EVEN_D", "HAS_MASK", "WIN_LEFT", "WIN_RIGHT", "BOTTOM_RIGHT", "HAS_DROPOUT", "IS_VARLEN",
             "GROUP", "TUNE_LQ", "TUNE_LK"]


@functools.cache
def _tuned(kernel, configs):
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                 for bm, bn, w, st in configs],
        key=_TUNE_KEY)(kernel)


def _interpret_blocks():
    """(BLOCK_M, BLOCK_N) from the module knobs, validated at each call."""
    blocks = (INTERPRET_BLOCK_M, INTERPRET_BLOCK_N)
    for name, b in zip(("INTERPRET_BLOCK_M", "INTERPRET_BLOCK_N"), blocks):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 16 or b & (b - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (tl.dot's minimum), got {b!r}")
    return int(blocks[0]), int(blocks[1])


def _launch(kernel, tables, pb, grid, args):
    """Launch `kernel` on grid(meta): on the GPU autotuned over the configs of pb's head-dim class in tables
    (16-bit, float32), or with the first of them when AUTOTUNE is off; under the interpreter with the
    INTERPRET_BLOCK_* config."""
    if _interpreting():
        bm, bn = _interpret_blocks()
        meta = dict(BLOCK_M=bm, BLOCK_N=bn)
        kernel[grid(meta)](*args, **pb.consts(), **meta)
    else:
        configs = tables[1 if pb.fp32 else 0][max(64, pb.block_d)]
        if not AUTOTUNE:
            configs = configs[:1]  # an autotuner with one config launches it without benchmarking
        _tuned(kernel, configs)[grid](*args, **pb.consts())


def _device_guard(device):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_tensor(t, name, dtype=None, ndim=4):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if dtype is None:
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_device(t, q, name):
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (as q), got {t.device}")


def _check_last_stride(t, name):
    # A head dim of 1 is read at offset 0 whatever its stride.
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected stride(-1) == 1 (any other strides), got strides {tuple(t.stride())}")


def _check_int(value, name):
    if type(value) is int:  # the common case, without the ABC check (~1 us each, several a call)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def _check_qkv(q, k, v):
    _check_tensor(q, "q")
    _check_tensor(k, "k", q.dtype)
    _check_tensor(v, "v", q.dtype)
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"q: the Triton kernels need a CUDA tensor, got device {q.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU)")
    _check_device(k, q, "k")
    _check_device(v, q, "v")
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k: expected batch {B} (as q), got shape {tuple(k.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k: expected head dim {D} (as q), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (as k), got {tuple(v.shape)}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in 1..{_MAX_HEAD_DIM}, got shape {tuple(q.shape)}")
    if k.shape[1] < 1 or Hq % k.shape[1]:
        raise ValueError(f"k: its heads ({k.shape[1]}) must divide q's ({Hq}) (GQA)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_last_stride(t, name)


class _Problem:
    """Validated arguments shared by the forward and the backward, in the form the kernels take."""

    def __init__(self, q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                 window_right, bottom_right, dropout_p, seed):
        _check_qkv(q, k, v)
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        if type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
            raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite value, got {scale}")
        window_left = _check_int(window_left, "window_left")
        window_right = _check_int(window_right, "window_right")
        if not isinstance(bottom_right, bool):
            raise TypeError(f"bottom_right: expected a bool, got {type(bottom_right).__name__}")
        if type(dropout_p) is not float and (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)):
            raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")
        seed = _check_int(seed, "seed")

        self.varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
        if self.varlen:
            self.cu_q = self._check_cu(cu_seqlens_q, "cu_seqlens_q", q)
            self.cu_k = self._check_cu(cu_seqlens_k, "cu_seqlens_k", q)
            if self.cu_q.numel() != self.cu_k.numel():
                raise ValueError(f"cu_seqlens_k: expected {self.cu_q.numel()} entries (as cu_seqlens_q), "
                                 f"got {self.cu_k.numel()}")
            if B != 1:
                raise ValueError(f"q: varlen (cu_seqlens) takes packed tensors with batch 1, "
                                 f"got shape {tuple(q.shape)}")
            if mask is not None:
                raise ValueError("mask: not supported with varlen (cu_seqlens); expected None")
            self.max_q = _check_int(max_seqlen_q, "max_seqlen_q")
            self.max_k = _check_int(max_seqlen_k, "max_seqlen_k")
            if self.max_q < 0 or self.max_k < 0:
                raise ValueError(f"max_seqlen_q, max_seqlen_k: expected >= 0, got {self.max_q}, {self.max_k}")
            self.nseq = self.cu_q.numel() - 1
            if self.cu_q.device.type == "cpu":
                # Free to check on the CPU; on the GPU it would cost a synchronization per call, so there the
                # caller's cu_seqlens / max_seqlen are trusted.
                self._check_cu_values(self.cu_q, "cu_seqlens_q", Lq, self.max_q, "max_seqlen_q")
                self._check_cu_values(self.cu_k, "cu_seqlens_k", Lk, self.max_k, "max_seqlen_k")
        else:
            # max_seqlen_q / max_seqlen_k only bound varlen sequences: the batch's are Lq and Lk.
            self.cu_q = self.cu_k = None
            self.max_q, self.max_k, self.nseq = Lq, Lk, B

        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask: expected a Tensor or None, got {type(mask).__name__}")
            if mask.dtype != q.dtype:
                raise TypeError(f"mask: expected an additive mask of q's dtype {q.dtype}, got {mask.dtype}")
            _check_device(mask, q, "mask")
            if mask.dim() != 4:
                raise ValueError(f"mask: expected a 4-D tensor broadcastable to {(B, Hq, Lq, Lk)}, "
                                 f"got shape {tuple(mask.shape)}")
            try:
                mask = mask.expand(B, Hq, Lq, Lk)
            except RuntimeError:
                raise ValueError(f"mask: expected shape {(B, Hq, Lq, Lk)} (broadcast dims may be 1), "
                                 f"got {tuple(mask.shape)}") from None
        if max(Hq, Hkv) > _MAX_GRID_YZ or self.nseq > _MAX_GRID_YZ:
            raise ValueError(f"q: at most {_MAX_GRID_YZ} heads and {_MAX_GRID_YZ} sequences, got {Hq} heads and "
                             f"{self.nseq} sequences")

        self.q, self.k, self.v, self.mask = q, k, v, mask
        self.B, self.Hq, self.Hkv, self.Lq, self.Lk, self.D = B, Hq, Hkv, Lq, Lk, D
        self.block_d = max(16, next_power_of_2(D))
        self.fp32 = q.dtype == torch.float32
        self.scale = float(scale)
        self.bottom_right = bottom_right
        self.dropout_p = float(dropout_p)
        # A window reaching past every row is no window (and keeps the kernels' int32 arithmetic in range).
        bound = self.max_q + self.max_k
        self.window_left = -1 if window_left < 0 or window_left >= bound else window_left
        self.window_right = -1 if window_right < 0 or window_right >= bound else window_right
        # Philox key words and the keep threshold T = floor(p * 2^32) (reference.dropout_threshold), as int32
        # bit patterns minus 2^31 for the threshold (see _dropout_draws).
        self.seed_lo = _as_int32(seed & 0xFFFFFFFF)
        self.seed_hi = _as_int32((seed >> 32) & 0xFFFFFFFF)
        self.drop_thresh = min(int(math.floor(self.dropout_p * 4294967296.0)), 0xFFFFFFFF) - 2**31

    @staticmethod
    def _check_cu(cu, name, q):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name}: expected an int32 Tensor with both cu_seqlens_q and cu_seqlens_k, "
                            f"got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name}: expected a 1-D tensor of nseq + 1 >= 2 entries, "
                             f"got shape {tuple(cu.shape)}")
        _check_device(cu, q, name)
        return cu.contiguous()

    @staticmethod
    def _check_cu_values(cu, name, rows, max_len, max_name):
        c = cu.tolist()
        lengths = [b - a for a, b in zip(c, c[1:])]
        if c[0] != 0 or c[-1] != rows or min(lengths) < 0:
            raise ValueError(f"{name}: expected increasing offsets from 0 to the packed length {rows}, got {c}")
        if max(lengths) > max_len:
            raise ValueError(f"{max_name}: {max_len} is less than the longest sequence, {max(lengths)}")

    def consts(self):
        """The kernels' constexpr flags."""
        return dict(HAS_MASK=self.mask is not None, WIN_LEFT=self.window_left >= 0,
                    WIN_RIGHT=self.window_right >= 0, BOTTOM_RIGHT=self.bottom_right,
                    HAS_DROPOUT=self.dropout_p > 0, IS_VARLEN=self.varlen, EVEN_D=self.D == self.block_d,
                    PREC="ieee" if self.fp32 else "tf32", BLOCK_D=self.block_d)

    def pointers(self):
        """(mask, its strides, cu_seqlens_q, cu_seqlens_k): stand-ins when absent (the flags keep the kernels from
        reading them)."""
        if self.mask is not None:
            mask, mstrides = self.mask, self.mask.stride()
        else:
            mask, mstrides = self.q, (0, 0, 0, 0)
        cu_q = self.cu_q if self.varlen else self.q
        cu_k = self.cu_k if self.varlen else self.q
        return mask, mstrides, cu_q, cu_k

    def lengths(self):
        """Lq, Lk and the autotune length buckets TUNE_LQ, TUNE_LK."""
        return (self.Lq, self.Lk, next_power_of_2(max(1, self.max_q)),
                next_power_of_2(max(1, self.max_k)))

    def query_grid(self, meta):
        return (cdiv(self.max_q, meta["BLOCK_M"]), self.Hq, self.nseq)

    def key_grid(self, meta):
        return (cdiv(self.max_k, meta["BLOCK_N"]), self.Hkv, self.nseq)


def _as_int32(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


def attention_forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                      window_right, bottom_right, dropout_p, seed):
    """Attention forward (csrc/attention.h): returns (out, lse).

    q: (B, Hq, Lq, D), k, v: (B, Hkv, Lk, D), Hq % Hkv == 0, 1 <= D <= 256, float16 / bfloat16 / float32, any strides
    with stride(-1) == 1. mask: None or an additive mask of q's dtype broadcastable to (B, Hq, Lq, Lk), read through
    its strides (not with varlen). cu_seqlens_q / cu_seqlens_k: None or int32 (nseq + 1,) offsets of packed
    sequences (B == 1), with max_seqlen_q / max_seqlen_k bounding their lengths (read only with varlen).
    window_left / window_right: < 0 for none; bottom_right aligns the window's diagonal to the last key.
    dropout_p in [0, 1) with the Philox stream of `seed`.
    out: empty_like(q) (q's strides); lse: float32 (B, Hq, Lq), +inf (and out 0) on rows with no allowed key.
    """
    pb = _Problem(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                  window_right, bottom_right, dropout_p, seed)
    out = torch.empty_like(q)
    lse = torch.empty((pb.B, pb.Hq, pb.Lq), dtype=torch.float32, device=q.device)
    if pb.max_q == 0 or pb.Hq == 0 or pb.nseq == 0:
        return out, lse
    mask, ms, cu_q, cu_k = pb.pointers()
    args = (q, k, v, mask, out, lse, cu_q, cu_k, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms,
            *out.stride()[:3], *lse.stride()[:2],
            *pb.lengths(), pb.scale * _LOG2E, 1.0 / (1.0 - pb.dropout_p), pb.window_left, pb.window_right,
            pb.seed_lo, pb.seed_hi, pb.drop_thresh, pb.Hq, pb.Hq // pb.Hkv, pb.D)
    with _device_guard(q.device):
        _launch(_attention_fwd_kernel, (_FWD_CONFIGS, _FWD_CONFIGS_FP32), pb, pb.query_grid, args)
    return out, lse


def _check_like_q(t, q, name):
    _check_tensor(t, name, q.dtype)
    if t.shape != q.shape:
        raise ValueError(f"{name}: expected shape {tuple(q.shape)} (as q), got {tuple(t.shape)}")
    _check_device(t, q, name)
    _check_last_stride(t, name)


def attention_backward(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       window_left, window_right, bottom_right, dropout_p, seed, deterministic):
    """Attention backward (csrc/attention.h): returns (dq, dk, dv), laid out as empty_like(q / k / v).

    dout, out: q's shape and dtype, stride(-1) == 1; lse: float32 (B, Hq, Lq) from attention_forward; the other
    arguments as attention_forward's. dk and dv sum over the query heads of each GQA group. Always deterministic
    (no atomics: each dk/dv/dq tile has one writer), so `deterministic` is honoured whatever its value.
    """
    pb = _Problem(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                  window_right, bottom_right, dropout_p, seed)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")
    _check_like_q(dout, q, "dout")
    _check_like_q(out, q, "out")
    _check_tensor(lse, "lse", torch.float32, ndim=3)
    if lse.shape != (pb.B, pb.Hq, pb.Lq):
        raise ValueError(f"lse: expected shape {(pb.B, pb.Hq, pb.Lq)}, got {tuple(lse.shape)}")
    _check_device(lse, q, "lse")
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if pb.nseq == 0:
        return dq, dk, dv
    mask, ms, cu_q, cu_k = pb.pointers()
    delta = torch.empty_like(lse)
    scalars = (*pb.lengths(), pb.scale, pb.scale * _LOG2E, 1.0 / (1.0 - pb.dropout_p), pb.window_left,
               pb.window_right, pb.seed_lo, pb.seed_hi, pb.drop_thresh, pb.Hq, pb.Hq // pb.Hkv, pb.D)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, *dout.stride()[:3], *lse.stride()[:2])
    with _device_guard(q.device):
        if pb.Lq > 0 and pb.Hq > 0:
            # ~4K elements per tile of out / dout (16 rows at D = 256, 128 at D <= 32).
            block = min(128, max(16, 4096 // pb.block_d))
            _attention_bwd_preprocess_kernel[(cdiv(pb.Lq, block), pb.Hq, pb.B)](
                out, dout, delta, pb.Lq, *out.stride()[:3], *dout.stride()[:3], *delta.stride()[:2], pb.D,
                EVEN_D=pb.D == pb.block_d, BLOCK_M=block, BLOCK_D=pb.block_d, num_warps=4)
        if pb.max_k > 0:
            _launch(_attention_bwd_dkdv_kernel, (_DKDV_CONFIGS, _DKDV_CONFIGS_FP32), pb, pb.key_grid,
                    (q, k, v, mask, dout, lse, delta, dk, dv, cu_q, cu_k, *common,
                     *dk.stride()[:3], *dv.stride()[:3], *scalars))
        if pb.max_q > 0 and pb.Hq > 0:
            _launch(_attention_bwd_dq_kernel, (_DQ_CONFIGS, _DQ_CONFIGS_FP32), pb, pb.query_grid,
                    (q, k, v, mask, dout, lse, delta, dq, cu_q, cu_k, *common,
                     *dq.stride()[:3], *scalars))
    return dq, dk, dv
