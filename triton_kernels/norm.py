"""LayerNorm / RMSNorm with an optional fused residual add, as Triton kernels.

The contract and the math are csrc/norm.h's, shared by every backend (mltoolkit/ops/norm.py is the only caller):

    forward, per row r of x (M, N), with s = x + residual (added in float, rounded to x's dtype) or s = x:
      layer: mean = sum(s)/N, rstd = 1/sqrt(sum((s-mean)^2)/N + eps), y = (s-mean)*rstd*weight + bias
      rms:   rstd = 1/sqrt(sum(s^2)/N + eps),                       y = s*rstd*weight
    backward, with xhat = (s-mean)*rstd (rms: s*rstd) and g = dy*weight (dy without weight):
      dx = rstd*(g - mean_row(g) - xhat*mean_row(g*xhat))  (rms: no mean_row(g) term)  [+ dresidual_out]
      dweight = sum_rows(dy*xhat), dbias = sum_rows(dy)

Arithmetic is float32; for float64 x it is float64 throughout (mean/rstd are float64, and so is the
dweight/dbias accumulation). Outputs are rounded to nearest even (the interpreter's bf16 truncation is corrected,
see _round_to). dbias comes back in weight's dtype (x's without weight) unless bias_dtype is given.

Kernels (ported in spirit from the Triton LayerNorm tutorial and flash-attention's / Liger's Triton norms):
  _norm_fwd_kernel          N <= LOOP_THRESHOLD: a [BLOCK_M, BLOCK_N] tile per program, BLOCK_N = next_pow2(N),
                            BLOCK_M rows per program when N is small (tile ~ _TILE_ELEMS elements).
  _norm_fwd_looped_kernel   N >  LOOP_THRESHOLD: one row per program, passes over the row in BLOCK_N chunks
                            (sum, then centred sum of squares, then write; the row stays in L2 between passes).
  _norm_bwd_kernel          N <= LOOP_THRESHOLD: persistent grid (SMs * k programs) walking a strided set of row
                            tiles; dx per row, dweight/dbias accumulated in registers, one partial row per program.
                            Weight is held in registers, or re-read per row when BLOCK_N > LOOP_THRESHOLD / 2.
  _norm_bwd_looped_stats_kernel + _norm_bwd_looped_kernel   N > LOOP_THRESHOLD: per-row mean_row(g*xhat) and
                            mean_row(g) first, then a (column chunks x row groups) grid writing dx and partials.
The partials (programs, N) are summed with torch (partials.sum(0)).

Knobs (module attributes, read at every call, so tests can change them):
  LOOP_THRESHOLD  (elements) rows wider than this take the looped kernels, forward and backward; default 16384
                  (a whole bf16/fp32 row of up to 16384 elements stays in registers at 16 warps). The looped chunk is
                  min(LOOP_BLOCK_N, largest power of two <= LOOP_THRESHOLD), so lowering LOOP_THRESHOLD (e.g. to 16)
                  forces the looped path, with several chunks, on small N.
  LOOP_BLOCK_N    chunk width of the looped kernels (power of two); default 4096.
"""
import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

__all__ = ["norm_forward", "norm_backward", "LOOP_THRESHOLD", "LOOP_BLOCK_N"]

LOOP_THRESHOLD = 16384
LOOP_BLOCK_N = 4096

# Elements per program tile when N is small (several rows per program), and the SM count used under the interpreter
# (small, so that the persistent backward still has several programs each walking several tiles).
_TILE_ELEMS = 4096
_INTERPRET_SM_COUNT = 4
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_to(v, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """v (float32/float64) rounded to dtype, to nearest even.

    The GPU converts to bfloat16 to nearest even; the Triton interpreter (3.8) truncates. Under the interpreter
    (FIX_BF16) round the float32 bits first, so that the final conversion is exact (NaN kept as is).
    """
    if FIX_BF16:
        if dtype == tl.bfloat16:
            u = v.to(tl.uint32, bitcast=True)
            r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            v = tl.where(v != v, v, r)
    return v.to(dtype)


@triton.jit
def _norm_fwd_kernel(X, R, W, B, Y, RES_OUT, MEAN, RSTD, M, N, eps,
                     HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr,
                     ACC: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0)
        # s is rounded to x's dtype before it is normalized, so that residual_out and y agree with each other.
        x = _round_to(x.to(ACC) + r.to(ACC), X.dtype.element_ty, FIX_BF16)
        tl.store(RES_OUT + offs, x, mask=mask)
    xf = x.to(ACC)
    if IS_RMS:
        var = tl.sum(xf * xf, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        xhat = xf * rstd[:, None]
    else:
        mean = tl.sum(xf, axis=1) / N
        xc = tl.where(mask, xf - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        xhat = xc * rstd[:, None]
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = xhat
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)
        y = y + b[None, :]
    tl.store(Y + offs, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=mask)


@triton.jit
def _norm_fwd_looped_kernel(X, R, W, B, Y, RES_OUT, MEAN, RSTD, M, N, eps,
                            HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr,
                            ACC: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols0 = tl.arange(0, BLOCK_N)
    # Pass 1: s (stored as residual_out when there is a residual) and sum(s) or sum(s^2).
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        x = tl.load(X + base + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + base + cols, mask=m, other=0.0)
            x = _round_to(x.to(ACC) + r.to(ACC), X.dtype.element_ty, FIX_BF16)
            tl.store(RES_OUT + base + cols, x, mask=m)
        xf = x.to(ACC)
        if IS_RMS:
            acc += xf * xf
        else:
            acc += xf
    if HAS_RES:
        # Later passes read s back from residual_out: make this program's stores visible to all its threads.
        tl.debug_barrier()
        S = RES_OUT
    else:
        S = X
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            m = cols < N
            y = tl.load(S + base + cols, mask=m, other=0.0).to(ACC) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=m, other=0.0).to(ACC)
            tl.store(Y + base + cols, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=m)
    else:
        mean = tl.sum(acc, axis=0) / N
        # Pass 2: centred sum of squares (two-pass variance: no cancellation).
        acc2 = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            m = cols < N
            xc = tl.where(m, tl.load(S + base + cols, mask=m, other=0.0).to(ACC) - mean, 0.0)
            acc2 += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=0) / N + eps)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        # Pass 3: write y.
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            m = cols < N
            y = (tl.load(S + base + cols, mask=m, other=0.0).to(ACC) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=m, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + cols, mask=m, other=0.0).to(ACC)
            tl.store(Y + base + cols, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=m)


@triton.jit
def _norm_bwd_kernel(DY, X, W, MEAN, RSTD, DRES, DX, DW_PART, DB_PART, M, N,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DRES: tl.constexpr, IS_RMS: tl.constexpr,
                     RELOAD_W: tl.constexpr, ACC: tl.constexpr, FIX_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        if not RELOAD_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    num_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        # dy is 0 outside the tile, which zeroes every masked term below (g, g*xhat, dy*xhat).
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(ACC)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0).to(ACC)
            xhat = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            if RELOAD_W:
                # Wide rows: re-read weight (an L1/L2 hit) rather than hold it, to keep registers for dw/db.
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / N
            dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty, FIX_BF16), mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    part = pid.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DW_PART + part, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DB_PART + part, tl.sum(db, axis=0), mask=col_ok)


@triton.jit
def _norm_bwd_looped_stats_kernel(DY, X, W, MEAN, RSTD, C1, C2, N,
                                  HAS_W: tl.constexpr, IS_RMS: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_N: tl.constexpr):
    # One row per program: c1 = mean_row(g*xhat), c2 = mean_row(g).
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols0 = tl.arange(0, BLOCK_N)
    rstd = tl.load(RSTD + row).to(ACC)
    if not IS_RMS:
        mean = tl.load(MEAN + row).to(ACC)
    a1 = tl.zeros([BLOCK_N], dtype=ACC)
    a2 = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        x = tl.load(X + base + cols, mask=m, other=0.0).to(ACC)
        g = tl.load(DY + base + cols, mask=m, other=0.0).to(ACC)
        if HAS_W:
            g = g * tl.load(W + cols, mask=m, other=0.0).to(ACC)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = (x - mean) * rstd
            a2 += g
        a1 += g * xhat
    tl.store(C1 + row, tl.sum(a1, axis=0) / N)
    if not IS_RMS:
        tl.store(C2 + row, tl.sum(a2, axis=0) / N)


@triton.jit
def _norm_bwd_looped_kernel(DY, X, W, MEAN, RSTD, C1, C2, DRES, DX, DW_PART, DB_PART, M, N,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DRES: tl.constexpr,
                            IS_RMS: tl.constexpr, ACC: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (column chunks, row groups): each program owns one column chunk of a strided set of rows, so its
    # dweight/dbias chunk stays in registers; it writes one partial row (its group's) for that chunk.
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    ngroups = tl.num_programs(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    # The row offset is carried in int64 (M * N may pass 2**31); `row` itself stays int32.
    base = group.to(tl.int64) * N
    step = ngroups.to(tl.int64) * N
    for row in range(group, M, ngroups):
        offs = base + cols
        base += step
        x = tl.load(X + offs, mask=col_ok, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=col_ok, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row).to(ACC)
        c1 = tl.load(C1 + row).to(ACC)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = (x - tl.load(MEAN + row).to(ACC)) * rstd
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - tl.load(C2 + row).to(ACC) - xhat * c1) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=col_ok, other=0.0).to(ACC)
        tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty, FIX_BF16), mask=col_ok)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    part = group.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DW_PART + part, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB_PART + part, db, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _decorated_for_interpreter() -> bool:
    # @triton.jit picks the interpreter when this module is imported (TRITON_INTERPRET=1 set before), so ask it.
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - other Triton layouts
        return False
    return isinstance(_norm_fwd_kernel, InterpretedFunction)


_INTERPRETED = _decorated_for_interpreter()


def _interpreting() -> bool:
    return _INTERPRETED


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(device: torch.device, num_warps: int) -> int:
    """How many programs the backward's persistent grid aims for: SMs * k, k ~ 32 warps' worth per SM.

    Under the interpreter: a few programs (k = 1), so that each walks several row tiles, as on the GPU.
    """
    if device.type != "cuda" or _interpreting():
        return _INTERPRET_SM_COUNT
    sms = _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return sms * max(1, 32 // num_warps)


def _loop_config():
    """(threshold, chunk) from the module knobs, validated at each call."""
    threshold = LOOP_THRESHOLD
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral) or threshold < 1:
        raise ValueError(f"LOOP_THRESHOLD: expected a positive int (elements), got {threshold!r}")
    block = LOOP_BLOCK_N
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1 or block & (block - 1):
        raise ValueError(f"LOOP_BLOCK_N: expected a positive power of two, got {block!r}")
    largest_pow2 = 1 << (int(threshold).bit_length() - 1)
    return int(threshold), min(int(block), largest_pow2)


def _num_warps(tile_elems: int) -> int:
    # ~16 elements per thread for wide tiles, between 1 and 16 warps.
    return max(1, min(16, tile_elems // 512))


def _tile(M: int, N: int):
    block_n = next_power_of_2(N)
    block_m = max(1, min(_TILE_ELEMS // block_n, next_power_of_2(M)))
    return block_m, block_n


def _acc_dtype(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _check_x(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (M, N) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: expected N >= 1 columns, got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor, got device {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU)")


def _check_like(t, x, name, ref_name="x"):
    """A tensor of x's shape, dtype and device (residual, dy, dresidual_out), made contiguous."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (as {ref_name}), got {t.dtype}")
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (as {ref_name}), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (as {ref_name}), got {t.device}")
    return t.contiguous()


def _check_param(t, x, name):
    """weight/bias: (N,), x's dtype or float32, x's device."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name}: expected dtype {x.dtype} (as x) or float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{name}: expected shape ({x.shape[1]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")
    return t.contiguous()


def _check_stat(t, x, dtype, name):
    """mean/rstd: (M,), float32 (float64 for float64 x), x's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} for x of dtype {x.dtype}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")
    return t.contiguous()


class _on_device:
    """Launch on x's GPU even when another one is current (Triton launches on the current device)."""

    def __init__(self, device):
        self.ctx = None
        if device.type == "cuda" and not _interpreting() and device.index is not None:
            if device.index != torch.cuda.current_device():
                self.ctx = torch.cuda.device(device.index)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def norm_forward(x, residual, weight, bias, eps: float, is_rms: bool):
    """LayerNorm / RMSNorm forward with an optional fused residual add.

    x, residual: (M, N), one dtype (float32, float64, float16, bfloat16); weight, bias: (N,), x's dtype or float32
    (bias must be None for RMSNorm). Returns (y (M, N) in x's dtype, residual_out = s (M, N) or None,
    mean (M,) or None for RMSNorm, rstd (M,)); mean/rstd are float32, float64 for float64 x.
    """
    _check_bool(is_rms, "is_rms")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    _check_x(x, "x")
    x = x.contiguous()
    residual = _check_like(residual, x, "residual")
    weight = _check_param(weight, x, "weight")
    bias = _check_param(bias, x, "bias")
    if is_rms and bias is not None:
        raise ValueError("bias: RMSNorm has no bias (expected None)")
    M, N = x.shape
    acc_torch, acc_tl = _acc_dtype(x.dtype)
    y = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else None
    mean = None if is_rms else torch.empty(M, dtype=acc_torch, device=x.device)
    rstd = torch.empty(M, dtype=acc_torch, device=x.device)
    if M == 0:
        return y, residual_out, mean, rstd
    threshold, loop_block = _loop_config()
    # Unused pointers get a harmless stand-in; the constexpr flags keep the kernel from touching them.
    args = (x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, y, residual_out if residual_out is not None else y,
            mean if mean is not None else rstd, rstd, M, N, eps)
    flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, IS_RMS=is_rms,
                 ACC=acc_tl, FIX_BF16=_interpreting())
    with _on_device(x.device):
        if N <= threshold:
            block_m, block_n = _tile(M, N)
            _norm_fwd_kernel[(cdiv(M, block_m),)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                                          num_warps=_num_warps(block_m * block_n))
        else:
            _norm_fwd_looped_kernel[(M,)](*args, **flags, BLOCK_N=loop_block, num_warps=_num_warps(loop_block))
    return y, residual_out, mean, rstd


def norm_backward(dy, x, weight, mean, rstd, dresidual_out, has_bias: bool, is_rms: bool, *, bias_dtype=None):
    """LayerNorm / RMSNorm backward.

    dy, x (= s, the normalized input: x + residual when the forward had a residual), dresidual_out: (M, N), one
    dtype; weight: (N,) or None; mean (None for RMSNorm), rstd: (M,) as returned by norm_forward.
    Returns (dx (M, N) in x's dtype, including dresidual_out when given; dweight in weight's dtype or None;
    dbias or None). dweight/dbias are accumulated in float32 (float64 for float64 x); dbias is returned in
    bias_dtype when given, else in weight's dtype, else in x's dtype.
    """
    _check_bool(has_bias, "has_bias")
    _check_bool(is_rms, "is_rms")
    if is_rms and has_bias:
        raise ValueError("has_bias: RMSNorm has no bias (expected False)")
    _check_x(x, "x")
    x = x.contiguous()
    dy = _check_like(dy, x, "dy")
    if dy is None:
        raise TypeError("dy: expected a Tensor, got NoneType")
    dresidual_out = _check_like(dresidual_out, x, "dresidual_out")
    weight = _check_param(weight, x, "weight")
    acc_torch, acc_tl = _acc_dtype(x.dtype)
    rstd = _check_stat(rstd, x, acc_torch, "rstd")
    if is_rms:
        mean = None
    else:
        if mean is None:
            raise ValueError("mean: required for LayerNorm (is_rms=False), got None")
        mean = _check_stat(mean, x, acc_torch, "mean")
    if bias_dtype is None:
        bias_dtype = weight.dtype if weight is not None else x.dtype
    M, N = x.shape
    dx = torch.empty_like(x)
    if M == 0:
        dweight = torch.zeros_like(weight) if weight is not None else None
        dbias = torch.zeros(N, dtype=bias_dtype, device=x.device) if has_bias else None
        return dx, dweight, dbias
    threshold, loop_block = _loop_config()
    has_w = weight is not None
    w_arg = weight if has_w else x
    mean_arg = mean if mean is not None else rstd
    dres_arg = dresidual_out if dresidual_out is not None else x
    with _on_device(x.device):
        if N <= threshold:
            block_m, block_n = _tile(M, N)
            num_warps = _num_warps(block_m * block_n)
            num_tiles = cdiv(M, block_m)
            programs = max(1, min(num_tiles, _persistent_programs(x.device, num_warps)))
            dw_part = torch.empty((programs, N), dtype=acc_torch, device=x.device) if has_w else None
            db_part = torch.empty((programs, N), dtype=acc_torch, device=x.device) if has_bias else None
            _norm_bwd_kernel[(programs,)](
                dy, x, w_arg, mean_arg, rstd, dres_arg, dx,
                dw_part if has_w else rstd, db_part if has_bias else rstd, M, N,
                HAS_W=has_w, HAS_B=has_bias, HAS_DRES=dresidual_out is not None, IS_RMS=is_rms,
                # Hold weight in registers unless the tile is in the upper half of what fits (see the kernel).
                RELOAD_W=block_n * 2 > threshold, ACC=acc_tl, FIX_BF16=_interpreting(),
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        else:
            num_warps = _num_warps(loop_block)
            c1 = torch.empty(M, dtype=acc_torch, device=x.device)
            c2 = torch.empty(M, dtype=acc_torch, device=x.device) if not is_rms else c1
            _norm_bwd_looped_stats_kernel[(M,)](dy, x, w_arg, mean_arg, rstd, c1, c2, N, HAS_W=has_w,
                                                IS_RMS=is_rms, ACC=acc_tl, BLOCK_N=loop_block,
                                                num_warps=num_warps)
            chunks = cdiv(N, loop_block)
            groups = max(1, min(M, cdiv(_persistent_programs(x.device, num_warps), chunks)))
            dw_part = torch.empty((groups, N), dtype=acc_torch, device=x.device) if has_w else None
            db_part = torch.empty((groups, N), dtype=acc_torch, device=x.device) if has_bias else None
            _norm_bwd_looped_kernel[(chunks, groups)](
                dy, x, w_arg, mean_arg, rstd, c1, c2, dres_arg, dx,
                dw_part if has_w else rstd, db_part if has_bias else rstd, M, N,
                HAS_W=has_w, HAS_B=has_bias, HAS_DRES=dresidual_out is not None, IS_RMS=is_rms,
                ACC=acc_tl, FIX_BF16=_interpreting(), BLOCK_N=loop_block, num_warps=num_warps)
    dweight = dw_part.sum(0).to(weight.dtype) if has_w else None
    dbias = db_part.sum(0).to(bias_dtype) if has_bias else None
    return dx, dweight, dbias
