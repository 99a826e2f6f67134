"""2-D convolution as Triton kernels: implicit GEMM, plus direct kernels where each output channel reads one input
channel. The contract is csrc/conv.h's (mltoolkit/ops/conv.py is the only caller; mltoolkit/ops/reference/conv.py
writes it in plain PyTorch):

    y[n, k, p, q] = act(bias[k] + residual[n, k, p, q]
                        + sum_{c in group(k), r, s} x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] * w[k, c', r, s])

x (N, C, H, W), weight (K, C/groups, R, S), bias (K,), residual (N, K, P, Q) are read through their strides, so
NCHW and channels_last (and any other strides) work; y and dx come back in x's memory format, dweight in weight's.
Dtypes float16, bfloat16 (float32 accumulation, rounded once at the store) and float32 (input_precision="ieee":
exact fp32 products, as the contract's tolerance needs; no TF32); no float64 (the backend table declines it).

Kernels (implicit GEMM after NVIDIA's cuDNN / CUTLASS formulation; the tile loop after the Triton matmul tutorial):
  _conv_fwd_kernel        rows = N*P*Q output pixels, columns = the K/groups output channels of group
                          program_id(1), reduction over (r, s, c) as one loop (c innermost, BLOCK_K channels at a
                          time), so that the pipeliner sees a single loop. Channels_last x with C/groups a
                          multiple of BLOCK_K is the fast path: each row of the A tile is one contiguous load.
                          C/groups < 16 (FLAT): the K blocks run over the flattened (r, s, c) instead.
                          Fused epilogue: bias, residual, activation, one rounding at the store.
  _conv_dx_kernel         dx as the transposed convolution, one launch per stride phase (h % sh, w % sw): within a
                          phase the taps r, s that reach an output pixel are the same for every input pixel, so the
                          reduction runs over (valid taps, k) only, with no divisibility mask (stride 2 does 1/4
                          of the work a masked loop would).
  _conv_dw_kernel         dweight per (r, s): rows = K/groups, columns = C/groups, reduction over N*P*Q split into
                          program_id(2) chunks; each program writes float32 partial sums to its own slice of a
                          buffer, summed afterwards in a fixed order (deterministic, no atomics).
  _conv_direct_fwd_kernel, _conv_direct_dx_kernel, _conv_direct_dw_kernel
                          C/groups == 1 (depthwise, depthwise with a channel multiplier, or a single input
                          channel): elementwise multiply-adds over [pixels, channels] tiles, no tensor cores (a GEMM
                          with a reduction of R*S would waste them).
dbias is dy summed over (N, P, Q) in float32 by torch.

Launch blocks: autotuned on the GPU (configs below, for H100/H200; float32 takes smaller tiles, its dots run on FMA
units); under TRITON_INTERPRET=1 one config from the INTERPRET_BLOCK_* knobs. AUTOTUNE = False (or
MLTK_TRITON_AUTOTUNE=0 in the environment at import) launches the first config of each list without benchmarking.
SPLIT_ROWS: the fewest N*P*Q rows one weight-gradient program reduces (more rows per program: fewer partial sums;
fewer: more parallelism). The knobs are read at every call, so tests can change them.
"""
import functools
import numbers
import os

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from .host import cdiv, next_power_of_2
from .norm import _cuda_sm_count, _interpreting, _on_device, _round_to

__all__ = ["conv2d_forward", "conv2d_backward", "INTERPRET_BLOCK_M", "INTERPRET_BLOCK_N", "INTERPRET_BLOCK_K",
           "AUTOTUNE", "SPLIT_ROWS"]

INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 16
INTERPRET_BLOCK_K = 16
AUTOTUNE = os.environ.get("MLTK_TRITON_AUTOTUNE", "1") != "0"
SPLIT_ROWS = 1024

ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUPS = 65535  # groups run on grid dimension 1
_MAX_SPLIT = 64
_MAX_PARTIAL_ELEMS = 1 << 26  # float32 partial sums of dweight: at most 256 MiB
_INTERPRET_SM_COUNT = 4
_GROUP_M = 8  # row tiles per band of the L2-friendly program order

# Integer arguments that change from launch to launch of one convolution (the stride phase and its taps): not
# specialized, so that the phases of a stride-2 backward share one compiled kernel.
_PHASE_ARGS = ["a", "b", "r0", "r_step", "nr", "s0", "s_step", "ns"]


# ----------------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, walking GROUP_M row tiles down each column before moving right,
    so that programs running together share their A rows and B columns in L2 (the Triton matmul tutorial)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += a @ b in float32. DOT_F32: the interpreter's bfloat16 dot is broken, so go through float32 there."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _tanh(v):
    # Triton has no portable tanh; 1 - 2 / (e^2v + 1) saturates correctly at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)


@triton.jit
def _activation(v, ACT: tl.constexpr):
    """csrc/conv_epilogue.h's apply_activation, in float32."""
    if ACT == "relu":  # NaN passes through, as in F.relu
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == "relu6":
        v = tl.where(v < 0.0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == "silu":
        v = v / (1.0 + tl.exp(-v))
    elif ACT == "gelu":
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.70710678118654752440))
    elif ACT == "gelu_tanh":
        v = 0.5 * v * (1.0 + _tanh(0.79788456080286535588 * (v + 0.044715 * v * v * v)))
    elif ACT == "hardswish":
        t = v + 3.0
        v = v * tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0
    return v


@triton.jit
def _epilogue(acc, n, p, q, row_ok, k, k_ok, BIAS, RES, Y, syn, syk, syp, syq, srn, srk, srp, srq,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, FIX_BF16: tl.constexpr):
    """y[n, k, p, q] = act(acc + bias[k] + residual[n, k, p, q]) for a [rows, channels] tile; n is int64."""
    mask = row_ok[:, None] & k_ok[None, :]
    k64 = k.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(BIAS + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_ptrs = RES + (n * srn + p * srp + q * srq)[:, None] + (k64 * srk)[None, :]
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc = _activation(acc, ACT)
    y_ptrs = Y + (n * syn + p * syp + q * syq)[:, None] + (k64 * syk)[None, :]
    tl.store(y_ptrs, _round_to(acc, Y.dtype.element_ty, FIX_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Implicit GEMM kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.heuristics({"EVEN_C": lambda a: a["Cg"] % a["BLOCK_K"] == 0, "FLAT": lambda a: a["Cg"] < 16})
@triton.jit
def _conv_fwd_kernel(X, Wt, BIAS, RES, Y, H, W, P, Q, Cg, Kg, R, S, M, TUNE_M,
                     sh, sw, ph, pw, dh, dw,
                     sxn, sxc, sxh, sxw, swk, swc, swr, sws, syn, syk, syp, syq, srn, srk, srp, srq,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                     DOT_F32: tl.constexpr, FIX_BF16: tl.constexpr, EVEN_C: tl.constexpr, FLAT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # TUNE_M (the power of two of M) is an autotune key only.
    g = tl.program_id(1)
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Kg, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < Kg
    n = (rows // (P * Q)).to(tl.int64)
    p = rows % (P * Q) // Q
    q = rows % Q
    h0 = p * sh - ph
    w0 = q * sw - pw
    x_rows = X + n * sxn + h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw + (g * Cg).to(tl.int64) * sxc
    k_abs = g * Kg + cols
    w_cols = Wt + k_abs.to(tl.int64) * swk
    offs_c = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT:
        # C/groups < 16, tl.dot's smallest K block (a network's first layer, small groups): reduce over the
        # flattened (r, s, c), so that one K block spans several taps instead of padding each tap's channels.
        for k0 in range(0, R * S * Cg, BLOCK_K):
            kk = k0 + offs_c
            kk_ok = kk < R * S * Cg
            c = kk % Cg
            r = kk // Cg // S
            s = kk // Cg % S
            h = h0[:, None] + (r * dh)[None, :]
            w = w0[:, None] + (s * dw)[None, :]
            ok = row_ok[:, None] & kk_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a = tl.load(x_rows[:, None] + (r * dh * sxh + s * dw * sxw + c * sxc)[None, :], mask=ok, other=0.0)
            b = tl.load(w_cols[None, :] + (c * swc + r * swr + s * sws)[:, None],
                        mask=kk_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PREC, DOT_F32)
    else:
        c_blocks = tl.cdiv(Cg, BLOCK_K)
        for t in range(0, R * S * c_blocks):
            rs = t // c_blocks
            c = (t - rs * c_blocks) * BLOCK_K + offs_c
            r = rs // S
            s = rs - r * S
            h = h0 + r * dh
            w = w0 + s * dw
            ok = row_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_ptrs = x_rows[:, None] + (r * dh * sxh + s * dw * sxw) + c[None, :] * sxc
            b_ptrs = w_cols[None, :] + c[:, None] * swc + (r * swr + s * sws)
            if EVEN_C:
                a = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                c_ok = c < Cg
                a = tl.load(a_ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PREC, DOT_F32)

    _epilogue(acc, n, p, q, row_ok, k_abs, col_ok, BIAS, RES, Y, syn, syk, syp, syq, srn, srk, srp, srq,
              HAS_BIAS, HAS_RES, ACT, FIX_BF16)


@triton.heuristics({"EVEN_K": lambda a: a["Kg"] % a["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=_PHASE_ARGS)
def _conv_dx_kernel(DY, Wt, DX, H, W, P, Q, Cg, Kg, M, Hp, Wp, TUNE_M,
                    a, b, r0, r_step, nr, s0, s_step, ns, sh, sw, ph, pw, dh, dw,
                    sdn, sdk, sdp, sdq, swk, swc, swr, sws, sxn, sxc, sxh, sxw,
                    PREC: tl.constexpr, DOT_F32: tl.constexpr, FIX_BF16: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dx[n, c, h, w] = sum_{k in group, r, s} dy[n, k, (h + ph - r*dh) / sh, (w + pw - s*dw) / sw] * w[k, c, r, s]
    over the taps where the divisions are exact and land inside (P, Q), for the input pixels h = a + i*sh,
    w = b + j*sw of one stride phase (M = N * Hp * Wp rows). The phase's taps are r = r0 + tr*r_step (tr < nr) and
    s = s0 + ts*s_step (ts < ns); each shifts the phase grid by a whole number of output pixels."""
    g = tl.program_id(1)
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Cg, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < Cg
    n = (rows // (Hp * Wp)).to(tl.int64)
    i = rows % (Hp * Wp) // Wp
    j = rows % Wp
    dy_rows = DY + n * sdn + i.to(tl.int64) * sdp + j.to(tl.int64) * sdq + (g * Kg).to(tl.int64) * sdk
    w_cols = Wt + (g * Kg).to(tl.int64) * swk + cols.to(tl.int64) * swc
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_blocks = tl.cdiv(Kg, BLOCK_K)
    for t in range(0, nr * ns * k_blocks):
        tap = t // k_blocks
        kk = (t - tap * k_blocks) * BLOCK_K + offs_k
        tr = tap // ns
        r = r0 + tr * r_step
        s = s0 + (tap - tr * ns) * s_step
        dp = (a + ph - r * dh) // sh  # exact: the host picked taps that divide
        dq = (b + pw - s * dw) // sw
        pp = i + dp
        qq = j + dq
        ok = row_ok & (pp >= 0) & (pp < P) & (qq >= 0) & (qq < Q)
        a_ptrs = dy_rows[:, None] + (dp * sdp + dq * sdq) + kk[None, :] * sdk
        b_ptrs = w_cols[None, :] + kk[:, None] * swk + (r * swr + s * sws)
        if EVEN_K:
            av = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
            bv = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = kk < Kg
            av = tl.load(a_ptrs, mask=ok[:, None] & k_ok[None, :], other=0.0)
            bv = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(av, bv, acc, PREC, DOT_F32)

    h = a + i * sh
    w = b + j * sw
    x_ptrs = (DX + (n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None]
              + ((g * Cg + cols).to(tl.int64) * sxc)[None, :])
    tl.store(x_ptrs, _round_to(acc, DX.dtype.element_ty, FIX_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv_dw_kernel(DY, X, PART, H, W, P, Q, Cg, Kg, K, R, S, NPQ, TUNE_M,
                    sh, sw, ph, pw, dh, dw, sdn, sdk, sdp, sdq, sxn, sxc, sxh, sxw,
                    PREC: tl.constexpr, DOT_F32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """PART[split, k, r, s, c] = sum over split's rows m of N*P*Q of dy[n, k, p, q] * x[n, c, h(p, r), w(q, s)],
    for output channels k (rows) and input channels c (columns) of group program_id(1), tap (r, s) from
    program_id(0)."""
    g = tl.program_id(1)
    split = tl.program_id(2)
    num_m = tl.cdiv(Kg, BLOCK_M)
    num_n = tl.cdiv(Cg, BLOCK_N)
    rs = tl.program_id(0) // (num_m * num_n)
    pid_m, pid_n = _tile_of(tl.program_id(0) % (num_m * num_n), num_m, num_n, GROUP_M)
    r = rs // S
    s = rs % S
    ks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < Kg
    c_ok = cs < Cg
    dy_rows = DY + (g * Kg + ks).to(tl.int64) * sdk
    x_cols = X + (g * Cg + cs).to(tl.int64) * sxc
    offs = tl.arange(0, BLOCK_K)
    # This program's share of the N*P*Q rows, a whole number of BLOCK_K blocks (empty for the last splits when
    # the rows run out: the program then writes zeros).
    chunk = tl.cdiv(tl.cdiv(NPQ, tl.num_programs(2)), BLOCK_K) * BLOCK_K
    start = split * chunk
    end = tl.minimum(start + chunk, NPQ)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_K):
        m = m0 + offs
        m_ok = m < end
        n = (m // (P * Q)).to(tl.int64)
        p = m % (P * Q) // Q
        q = m % Q
        h = p * sh - ph + r * dh
        w = q * sw - pw + s * dw
        ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        dyv = tl.load(dy_rows[:, None] + (n * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq)[None, :],
                      mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        xv = tl.load(x_cols[None, :] + (n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None],
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(dyv, xv, acc, PREC, DOT_F32)

    out = (PART + (split.to(tl.int64) * K + g * Kg + ks)[:, None] * (R * S * Cg) + rs * Cg + cs[None, :])
    tl.store(out, acc, mask=k_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Direct kernels: C / groups == 1, output channel k reads input channel k // (K / groups)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _conv_direct_fwd_kernel(X, Wt, BIAS, RES, Y, H, W, P, Q, K, Kg, R, S, M, TUNE_M,
                            sh, sw, ph, pw, dh, dw,
                            sxn, sxc, sxh, sxw, swk, swr, sws, syn, syk, syp, syq, srn, srk, srp, srq,
                            HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                            FIX_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    k_ok = ks < K
    n = (rows // (P * Q)).to(tl.int64)
    p = rows % (P * Q) // Q
    q = rows % Q
    h0 = p * sh - ph
    w0 = q * sw - pw
    x_rows = X + n * sxn + h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
    x_cols = (ks // Kg).to(tl.int64) * sxc
    w_cols = Wt + ks.to(tl.int64) * swk

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r in range(0, R):
        h = h0 + r * dh
        h_ok = row_ok & (h >= 0) & (h < H)
        for s in range(0, S):
            w = w0 + s * dw
            ok = h_ok & (w >= 0) & (w < W)
            xv = tl.load(x_rows[:, None] + (r * dh * sxh + s * dw * sxw) + x_cols[None, :],
                         mask=ok[:, None] & k_ok[None, :], other=0.0)
            wv = tl.load(w_cols + (r * swr + s * sws), mask=k_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    _epilogue(acc, n, p, q, row_ok, ks, k_ok, BIAS, RES, Y, syn, syk, syp, syq, srn, srk, srp, srq,
              HAS_BIAS, HAS_RES, ACT, FIX_BF16)


@triton.jit
def _conv_direct_dx_kernel(DY, Wt, DX, H, W, P, Q, C, Kg, R, S, M, TUNE_M,
                           sh, sw, ph, pw, dh, dw, sdn, sdk, sdp, sdq, swk, swr, sws, sxn, sxc, sxh, sxw,
                           FIX_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[n, c, h, w] = sum_{j < Kg, r, s} dy[n, c*Kg + j, p, q] * w[c*Kg + j, 0, r, s] where p = (h + ph - r*dh) / sh
    and q divide exactly and land inside (P, Q); M = N*H*W rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    c_ok = cs < C
    n = (rows // (H * W)).to(tl.int64)
    h = rows % (H * W) // W
    w = rows % W
    dy_rows = DY + n * sdn

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r in range(0, R):
        num_h = h + ph - r * dh
        p = num_h // sh
        h_ok = row_ok & (num_h >= 0) & (num_h % sh == 0) & (p < P)
        for s in range(0, S):
            num_w = w + pw - s * dw
            q = num_w // sw
            ok = h_ok & (num_w >= 0) & (num_w % sw == 0) & (q < Q)
            pix = dy_rows + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq
            for jj in range(0, Kg):
                k = (cs * Kg + jj).to(tl.int64)
                dyv = tl.load(pix[:, None] + (k * sdk)[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(Wt + k * swk + (r * swr + s * sws), mask=c_ok, other=0.0)
                acc += dyv.to(tl.float32) * wv.to(tl.float32)[None, :]

    x_ptrs = (DX + (n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None]
              + (cs.to(tl.int64) * sxc)[None, :])
    tl.store(x_ptrs, _round_to(acc, DX.dtype.element_ty, FIX_BF16), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_direct_dw_kernel(DY, X, PART, H, W, P, Q, K, Kg, S, NPQ, TUNE_M,
                           sh, sw, ph, pw, dh, dw, sdn, sdk, sdp, sdq, sxn, sxc, sxh, sxw,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """PART[split, r*S + s, k] = sum over split's rows of N*P*Q of dy[n, k, p, q] * x[n, k // Kg, h, w]."""
    ks = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rs = tl.program_id(1)
    split = tl.program_id(2)
    r = rs // S
    s = rs % S
    k_ok = ks < K
    dy_cols = DY + ks.to(tl.int64) * sdk
    x_cols = X + (ks // Kg).to(tl.int64) * sxc
    offs = tl.arange(0, BLOCK_M)
    chunk = tl.cdiv(tl.cdiv(NPQ, tl.num_programs(2)), BLOCK_M) * BLOCK_M
    start = split * chunk
    end = tl.minimum(start + chunk, NPQ)

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + offs
        m_ok = m < end
        n = (m // (P * Q)).to(tl.int64)
        p = m % (P * Q) // Q
        q = m % Q
        h = p * sh - ph + r * dh
        w = q * sw - pw + s * dw
        ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        dyv = tl.load(dy_cols[None, :] + (n * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq)[:, None],
                      mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        xv = tl.load(x_cols[None, :] + (n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None],
                     mask=ok[:, None] & k_ok[None, :], other=0.0)
        acc += dyv.to(tl.float32) * xv.to(tl.float32)

    out = PART + (split.to(tl.int64) * tl.num_programs(1) + rs) * K + ks
    tl.store(out, tl.sum(acc, axis=0), mask=k_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------

# GEMM kernels: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). 16-bit inputs run on tensor cores (wgmma on
# sm_90): the usual large Triton matmul tiles, plus small ones for small channel counts. Compiled for sm_90 by
# Triton 3.8 without a GPU, none spills registers except on the FLAT path (C/groups < 16: gathers, 2-D masks),
# where only the last three stay spill-free; (128, 64, 32, 8, 3) is there for it. float32 ("ieee") dots run on
# FMA units with the tiles in registers: small tiles.
_GEMM_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                 (128, 256, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 32, 8, 3), (64, 32, 32, 4, 4))
_GEMM_CONFIGS_FP32 = ((64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (64, 32, 16, 4, 2))
# dweight: rows are output channels, columns input channels, the reduction N*P*Q pixels.
_DW_CONFIGS = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
               (64, 32, 64, 4, 3))
# Direct kernels: (BLOCK_M pixels, BLOCK_C channels, num_warps); channels_last wants wide channel tiles, NCHW
# long pixel rows.
_DIRECT_CONFIGS = ((32, 64, 4), (16, 128, 4), (64, 32, 4), (128, 16, 4), (256, 8, 4))
_DIRECT_DW_CONFIGS = ((64, 64, 4), (32, 128, 4), (128, 32, 4), (256, 16, 4))

# What changes the best config, per kernel (the autotuner adds the tensors' dtypes); sxc tells the layouts apart.
_KEYS = {
    _conv_fwd_kernel: ["Cg", "Kg", "R", "S", "TUNE_M", "sh", "sw", "sxc"],
    _conv_dx_kernel: ["Cg", "Kg", "nr", "ns", "TUNE_M", "sh", "sw", "sxc"],
    _conv_dw_kernel: ["Cg", "Kg", "R", "S", "TUNE_M", "sh", "sw", "sxc"],
    _conv_direct_fwd_kernel: ["K", "Kg", "R", "S", "TUNE_M", "sh", "sw", "sxc"],
    _conv_direct_dx_kernel: ["C", "Kg", "R", "S", "TUNE_M", "sh", "sw", "sxc"],
    _conv_direct_dw_kernel: ["K", "Kg", "TUNE_M", "sh", "sw", "sxc"],
}


@functools.cache
def _tuned(kernel, configs):
    if len(configs[0]) == 3:  # direct kernels
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w) for bm, bc, w in configs]
    else:
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": _GROUP_M}, num_warps=w,
                              num_stages=st) for bm, bn, bk, w, st in configs]
    return triton.autotune(configs=cfgs, key=_KEYS[kernel])(kernel)


def _interpret_blocks():
    """(BLOCK_M, BLOCK_N, BLOCK_K) from the module knobs, validated at each call."""
    blocks = (INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, INTERPRET_BLOCK_K)
    for name, v in zip(("INTERPRET_BLOCK_M", "INTERPRET_BLOCK_N", "INTERPRET_BLOCK_K"), blocks):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 16 or v & (v - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (tl.dot's minimum), got {v!r}")
    return tuple(int(v) for v in blocks)


def _launch(kernel, configs, grid, args, consts):
    """Launch on grid(meta): autotuned over `configs` on the GPU (only the first when AUTOTUNE is off), with the
    INTERPRET_BLOCK_* blocks under the interpreter."""
    if _interpreting():
        bm, bn, bk = _interpret_blocks()
        direct = len(configs[0]) == 3
        meta = dict(BLOCK_M=bm, BLOCK_C=bn) if direct else dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2)
        kernel[grid(meta)](*args, **consts, **meta)
    else:
        _tuned(kernel, configs if AUTOTUNE else configs[:1])[grid](*args, **consts)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda" or _interpreting():
        return _INTERPRET_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _splits(rows: int, tiles: int, partial_row: int, device: torch.device) -> int:
    """How many programs share the N*P*Q reduction of the weight gradient: enough for ~4 waves of programs over
    `tiles` output tiles, each reducing at least SPLIT_ROWS rows, with the partial buffer (splits x partial_row
    floats) bounded."""
    if isinstance(SPLIT_ROWS, bool) or not isinstance(SPLIT_ROWS, numbers.Integral) or SPLIT_ROWS < 1:
        raise ValueError(f"SPLIT_ROWS: expected a positive int, got {SPLIT_ROWS!r}")
    want = cdiv(4 * _sm_count(device), max(1, tiles))
    return max(1, min(want, cdiv(rows, int(SPLIT_ROWS)), _MAX_SPLIT, _MAX_PARTIAL_ELEMS // partial_row))


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last when t is dense NHWC (ambiguous strides resolved as torch does), else contiguous_format."""
    if t.is_contiguous(memory_format=torch.channels_last) and suggest_memory_format(t) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def _ints(fn, name, v, minimum):
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{fn}: {name} must be a list of 2 ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {list(v)}")
    return int(v[0]), int(v[1])


def _check_tensor(fn, t, name, x=None, shape=None):
    """t is a Tensor of a supported dtype on a device the kernels reach; like x (dtype, device) when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if x is None:
        if t.dtype not in _DTYPES:
            raise TypeError(f"{fn}: {name} must be float16, bfloat16 or float32 (the Triton kernels have no "
                            f"{t.dtype} variant), got {t.dtype}")
        if t.device.type != "cuda" and not _interpreting():
            raise ValueError(f"{fn}: the Triton kernels need CUDA tensors, got {name} on {t.device} "
                             "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU)")
    else:
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if t.layout != torch.strided:
        raise ValueError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


class _Geometry:
    """The checked sizes of one convolution (csrc/conv.h's names)."""

    def __init__(self, fn, x, weight, stride, padding, dilation, groups):
        _check_tensor(fn, x, "x")
        _check_tensor(fn, weight, "weight", x)
        if x.dim() != 4:
            raise ValueError(f"{fn}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        if weight.dim() != 4:
            raise ValueError(f"{fn}: weight must be 4-D (K, C / groups, R, S), got shape {tuple(weight.shape)}")
        self.sh, self.sw = _ints(fn, "stride", stride, 1)
        self.ph, self.pw = _ints(fn, "padding", padding, 0)
        self.dh, self.dw = _ints(fn, "dilation", dilation, 1)
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
            raise ValueError(f"{fn}: groups must be an int >= 1, got {groups!r}")
        self.N, self.C, self.H, self.W = x.shape
        self.K, self.Cg, self.R, self.S = weight.shape
        self.G = int(groups)
        if self.C < 1:
            raise ValueError(f"{fn}: x must have at least one channel, got shape {tuple(x.shape)}")
        if self.C % self.G:
            raise ValueError(f"{fn}: x's channels ({self.C}) must be divisible by groups ({self.G})")
        if self.K % self.G:
            raise ValueError(f"{fn}: weight's output channels ({self.K}) must be divisible by groups ({self.G})")
        if self.Cg * self.G != self.C:
            raise ValueError(f"{fn}: weight.shape[1] must be C / groups = {self.C // self.G}, got weight of shape "
                             f"{tuple(weight.shape)}")
        if min(self.K, self.R, self.S) < 1:
            raise ValueError(f"{fn}: weight must not be empty, got shape {tuple(weight.shape)}")
        if self.G > MAX_GROUPS and self.Cg > 1:
            raise ValueError(f"{fn}: at most {MAX_GROUPS} groups (a grid dimension), got {self.G}")
        self.Kg = self.K // self.G
        self.P = (self.H + 2 * self.ph - self.dh * (self.R - 1) - 1) // self.sh + 1
        self.Q = (self.W + 2 * self.pw - self.dw * (self.S - 1) - 1) // self.sw + 1
        if self.P < 1 or self.Q < 1:
            raise ValueError(f"{fn}: output size must be >= 1, got ({self.P}, {self.Q}) for x of shape "
                             f"{tuple(x.shape)}, weight of shape {tuple(weight.shape)}, padding "
                             f"({self.ph}, {self.pw}), dilation ({self.dh}, {self.dw})")
        self.fmt = _memory_format(x)
        self.direct = self.Cg == 1
        dot_f32 = _interpreting() and x.dtype == torch.bfloat16
        # float32: exact products (the default TF32 would miss the contract's tolerance); 16-bit: PREC is unused.
        self.consts = dict(PREC="ieee" if x.dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32)
        self.gemm_configs = _GEMM_CONFIGS_FP32 if x.dtype == torch.float32 else _GEMM_CONFIGS
        self.fix_bf16 = _interpreting()

    def conv_args(self):
        return (self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)


def conv2d_forward(x, weight, bias, stride, padding, dilation, groups, residual, activation):
    """Convolution forward (csrc/conv.h): returns [y], y = act(conv(x, weight) + bias + residual) (N, K, P, Q) in
    x's memory format.

    x (N, C, H, W) and weight (K, C / groups, R, S) float16 / bfloat16 / float32, any strides; bias (K,) or None;
    residual (N, K, P, Q) or None, any strides; stride, dilation >= 1 and padding >= 0, two ints each; activation
    one of ACTIVATIONS.
    """
    fn = "conv2d_forward"
    g = _Geometry(fn, x, weight, stride, padding, dilation, groups)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if bias is not None:
        _check_tensor(fn, bias, "bias", x, (g.K,))
        bias = bias.contiguous()
    if residual is not None:
        _check_tensor(fn, residual, "residual", x, (g.N, g.K, g.P, g.Q))
    y = torch.empty((g.N, g.K, g.P, g.Q), dtype=x.dtype, device=x.device, memory_format=g.fmt)
    if g.N == 0:
        return [y]
    # Stand-ins for absent bias / residual: HAS_BIAS / HAS_RES keep the kernels off them.
    bias_arg = bias if bias is not None else y
    res = residual if residual is not None else y
    M = g.N * g.P * g.Q
    consts = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=activation, FIX_BF16=g.fix_bf16)
    with _on_device(x.device):
        if g.direct:  # weight (K, 1, R, S): no input-channel stride
            _launch(_conv_direct_fwd_kernel, _DIRECT_CONFIGS,
                    lambda m: (cdiv(M, m["BLOCK_M"]), cdiv(g.K, m["BLOCK_C"])),
                    (x, weight, bias_arg, res, y, g.H, g.W, g.P, g.Q, g.K, g.Kg, g.R, g.S, M,
                     next_power_of_2(M), *g.conv_args(), *x.stride(), weight.stride(0),
                     *weight.stride()[2:], *y.stride(), *res.stride()), consts)
        else:
            _launch(_conv_fwd_kernel, g.gemm_configs,
                    lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(g.Kg, m["BLOCK_N"]), g.G),
                    (x, weight, bias_arg, res, y, g.H, g.W, g.P, g.Q, g.Cg, g.Kg, g.R, g.S, M,
                     next_power_of_2(M), *g.conv_args(), *x.stride(), *weight.stride(), *y.stride(),
                     *res.stride()), {**consts, **g.consts})
    return [y]


def _phase_taps(phase, pad, dil, stride, taps):
    """(first, step, count) of the taps t < taps with (phase + pad - t*dil) % stride == 0: the taps that reach
    input rows h = phase (mod stride). They form an arithmetic progression."""
    valid = [t for t in range(taps) if (phase + pad - t * dil) % stride == 0]
    if not valid:
        return 0, 1, 0
    return valid[0], (valid[1] - valid[0]) if len(valid) > 1 else 1, len(valid)


def _input_grad(g, dy, x, weight):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=g.fmt)
    if g.direct:
        M = g.N * g.H * g.W
        _launch(_conv_direct_dx_kernel, _DIRECT_CONFIGS,
                lambda m: (cdiv(M, m["BLOCK_M"]), cdiv(g.C, m["BLOCK_C"])),
                (dy, weight, dx, g.H, g.W, g.P, g.Q, g.C, g.Kg, g.R, g.S, M, next_power_of_2(M),
                 *g.conv_args(), *dy.stride(), weight.stride(0), *weight.stride()[2:], *dx.stride()),
                dict(FIX_BF16=g.fix_bf16))
        return dx
    for a in range(min(g.sh, g.H)):
        for b in range(min(g.sw, g.W)):
            Hp, Wp = cdiv(g.H - a, g.sh), cdiv(g.W - b, g.sw)
            M = g.N * Hp * Wp
            taps = (*_phase_taps(a, g.ph, g.dh, g.sh, g.R), *_phase_taps(b, g.pw, g.dw, g.sw, g.S))
            _launch(_conv_dx_kernel, g.gemm_configs,
                    lambda m, M=M: (cdiv(M, m["BLOCK_M"]) * cdiv(g.Cg, m["BLOCK_N"]), g.G),
                    (dy, weight, dx, g.H, g.W, g.P, g.Q, g.Cg, g.Kg, M, Hp, Wp, next_power_of_2(M),
                     a, b, *taps, *g.conv_args(), *dy.stride(), *weight.stride(), *dx.stride()),
                    dict(g.consts, FIX_BF16=g.fix_bf16))
    return dx


def _weight_grad(g, dy, x, weight):
    NPQ = g.N * g.P * g.Q
    if g.direct:
        splits = _splits(NPQ, cdiv(g.K, 64) * g.R * g.S, g.R * g.S * g.K, x.device)
        part = torch.empty((splits, g.R * g.S, g.K), dtype=torch.float32, device=x.device)
        _launch(_conv_direct_dw_kernel, _DIRECT_DW_CONFIGS,
                lambda m: (cdiv(g.K, m["BLOCK_C"]), g.R * g.S, splits),
                (dy, x, part, g.H, g.W, g.P, g.Q, g.K, g.Kg, g.S, NPQ, next_power_of_2(NPQ),
                 *g.conv_args(), *dy.stride(), *x.stride()), {})
        dw = part.sum(0).t().reshape(g.K, 1, g.R, g.S)
    else:
        tiles = cdiv(g.Kg, 128) * cdiv(g.Cg, 128) * g.R * g.S * g.G
        splits = _splits(NPQ, tiles, g.K * g.R * g.S * g.Cg, x.device)
        part = torch.empty((splits, g.K, g.R, g.S, g.Cg), dtype=torch.float32, device=x.device)
        _launch(_conv_dw_kernel, _GEMM_CONFIGS_FP32 if x.dtype == torch.float32 else _DW_CONFIGS,
                lambda m: (cdiv(g.Kg, m["BLOCK_M"]) * cdiv(g.Cg, m["BLOCK_N"]) * g.R * g.S, g.G,
                           splits),
                (dy, x, part, g.H, g.W, g.P, g.Q, g.Cg, g.Kg, g.K, g.R, g.S, NPQ, next_power_of_2(NPQ),
                 *g.conv_args(), *dy.stride(), *x.stride()), g.consts)
        dw = part.sum(0).permute(0, 3, 1, 2)
    return dw.to(weight.dtype).contiguous(memory_format=_memory_format(weight))


def conv2d_backward(dy, x, weight, stride, padding, dilation, groups, output_mask):
    """Convolution backward (csrc/conv.h): returns [dx, dweight, dbias], each None unless output_mask (x, weight,
    bias) asks for it. dy: the gradient of the convolution's own output (N, K, P, Q), x's dtype, any strides.
    dx comes back in x's memory format, dweight in weight's; dbias = dy summed over (N, P, Q)."""
    fn = "conv2d_backward"
    g = _Geometry(fn, x, weight, stride, padding, dilation, groups)
    if (not isinstance(output_mask, (list, tuple)) or len(output_mask) != 3
            or not all(isinstance(v, bool) for v in output_mask)):
        raise TypeError(f"{fn}: output_mask must be 3 bools (x, weight, bias), got {output_mask!r}")
    _check_tensor(fn, dy, "dy", x, (g.N, g.K, g.P, g.Q))
    dx = dw = db = None
    with _on_device(x.device):
        if output_mask[0]:
            dx = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=g.fmt) if g.N == 0
                  else _input_grad(g, dy, x, weight))
        if output_mask[1]:
            if g.N == 0:
                dw = torch.zeros_like(weight, memory_format=_memory_format(weight))
            else:
                dw = _weight_grad(g, dy, x, weight)
    if output_mask[2]:
        db = dy.sum(dim=(0, 2, 3), dtype=torch.float32).to(x.dtype)
    return [dx, dw, db]
