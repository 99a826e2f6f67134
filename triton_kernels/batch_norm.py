"""Batch norm + residual + activation as Triton kernels (the GPU path); the contract is csrc/batch_norm.h
(mltoolkit/ops/batch_norm.py is the only caller):

    training: mean, var = biased batch moments per channel (running stats updated in place, unbiased var)
    eval:     mean, var = running_mean, running_var
    y = act((x - mean) * invstd * weight + bias + residual)
    backward: z recomputed, dz = dy * act'(z); dbias = sum(dz), dweight = sum(dz * xhat), dresidual = dz,
              dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat))   (eval: weight * invstd * dz)

x (N, C, *) is read in place in either layout: NCL (contiguous) or NLC (channels-last, channels innermost).
Arithmetic in float32 (float64 for float64 x); mean and invstd float32 (float64). Outputs are rounded to nearest
even (the interpreter's bf16 truncation is corrected, see norm._round_to).

Kernels:
  _bn_stats_kernel      grid (channel blocks, groups): one group's per-channel (mean, M2) of x - (the channel's
                        first value), tile by tile, each tile by the corrected two-pass formula in registers,
                        merged with Chan's formula.
  _bn_finalize_kernel   grid (channel blocks,): merges the groups in order, writes mean and invstd, updates the
                        running stats in place.
  _bn_fwd_kernel        elementwise y = act(z).
  _bn_bwd_reduce_kernel grid (channel blocks, groups): per-group sum(dz) and sum(dz * (x - mean)), dresidual = dz.
  _bn_bwd_dx_kernel     elementwise dx (and dresidual when no reduction pass ran).
NCL tiles are [channels, positions] (a contiguous run of one (n, c) row per tile row); NLC tiles are [rows,
channels]. The groups partition the reduction in a fixed way for a given shape and device, and the partials are
combined in group order: no atomics.
"""
import math
import numbers
import struct

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .norm import _cuda_sm_count, _interpreting, _on_device, _round_to

__all__ = ["batch_norm_act_forward", "batch_norm_act_backward", "ACTIVATIONS"]

ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5, "hardswish": 6}
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Elements per tile, and reduction programs per SM (under the interpreter: a few programs in all, each walking
# several tiles, so that the group merging runs as on the GPU).
_TILE_ELEMS = 4096
_PROGRAMS_PER_SM = 4
_INTERPRET_PROGRAMS = 4


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    # 1 - 2 / (e^2u + 1): exact limits at +-inf (no tanh in triton.language).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act(v, ACT: tl.constexpr):
    """The activations of csrc/conv_epilogue.h (apply_activation), torch's formulas."""
    if ACT == 1:  # NaN passes through, as in F.relu
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0.0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == 3:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 4:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 5:
        v = 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    elif ACT == 6:
        t = v + 3.0
        v = v * tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0
    return v


@triton.jit
def _act_grad(v, ACT: tl.constexpr):
    """act'(v) as csrc/conv_epilogue.h's activation_grad (torch's backward kernels, kinks included)."""
    if ACT == 1:
        d = tl.where(v > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where((v > 0.0) & (v < 6.0), 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-v))
        d = s * (1.0 + v * (1.0 - s))
    elif ACT == 4:
        d = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476)) + v * tl.exp(-0.5 * v * v) * 0.3989422804014327
    elif ACT == 5:
        # Literal constants: a constant bound to a name becomes a float32 scalar, too coarse for float64.
        t = _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))
        d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v)
    elif ACT == 6:
        d = tl.where(v < -3.0, 0.0, tl.where(v <= 3.0, v / 3.0 + 0.5, 1.0))
    else:
        d = tl.full(v.shape, 1.0, v.dtype)
    return d


@triton.jit
def _chan_merge(mean, m2, count, b_mean, b_m2, b_count):
    """Chan et al.'s merge of the moments (b_count > 0 values, mean b_mean, M2 b_m2) into (count, mean, m2)."""
    total = count + b_count
    w = b_count / total
    delta = b_mean - mean
    return mean + delta * w, m2 + b_m2 + delta * delta * count * w, total


@triton.jit
def _corrected(t_mean, d, AXIS: tl.constexpr, n):
    """(mean, M2) of a tile from its first-pass mean and the deviations d from it (zero where masked): the
    corrected two-pass formula, which takes the first mean's rounding out of both."""
    dev = tl.sum(d, axis=AXIS)
    return t_mean + dev / n, tl.maximum(tl.sum(d * d, axis=AXIS) - dev * dev / n, 0.0)


@triton.jit
def _shift(X, cs, c_ok, L, CL: tl.constexpr, ACC: tl.constexpr):
    """Each channel's first value. The statistics are taken of x - shift, so that the tile means hold the spread of
    the data and not its offset: with |mean| >> std, means near the offset would each be rounded by up to half an
    ulp of it, and Chan's merge would add those roundings squared to the variance."""
    if CL:
        first = cs
    else:
        first = cs.to(tl.int64) * L
    return tl.load(X + first, mask=c_ok, other=0.0).to(ACC)


@triton.jit
def _tile(N, C, L, g, GROUP, CL: tl.constexpr):
    """The [first, end) rows (NLC: rows of C; NCL: images) of group g."""
    first = g * GROUP
    if CL:
        end = tl.minimum(first + GROUP, N * L)
    else:
        end = tl.minimum(first + GROUP, N)
    return first, end


@triton.jit
def _bn_stats_kernel(X, PMEAN, PM2, N, C, L, GROUP, CL: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    g = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    first, end = _tile(N, C, L, g, GROUP, CL)
    shift = _shift(X, cs, c_ok, L, CL, ACC)
    if CL:
        for start in range(first, end, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            mask = (rows < end)[:, None] & c_ok[None, :]
            x = tl.load(X + rows.to(tl.int64)[:, None] * C + cs[None, :], mask=mask, other=0.0).to(ACC)
            x = tl.where(mask, x - shift[None, :], 0.0)
            n_t = tl.minimum(end - start, BLOCK_R).to(ACC)
            t_mean = tl.sum(x, axis=0) / n_t
            d = tl.where(mask, x - t_mean[None, :], 0.0)
            t_mean, t_m2 = _corrected(t_mean, d, 0, n_t)
            mean, m2, count = _chan_merge(mean, m2, count, t_mean, t_m2, n_t)
    else:
        for n in range(first, end):
            row = X + (cs.to(tl.int64) + n * C) * L
            for l0 in range(0, L, BLOCK_R):
                ls = l0 + tl.arange(0, BLOCK_R)
                mask = c_ok[:, None] & (ls < L)[None, :]
                x = tl.load(row[:, None] + ls[None, :], mask=mask, other=0.0).to(ACC)
                x = tl.where(mask, x - shift[:, None], 0.0)
                n_t = tl.minimum(L - l0, BLOCK_R).to(ACC)
                t_mean = tl.sum(x, axis=1) / n_t
                d = tl.where(mask, x - t_mean[:, None], 0.0)
                t_mean, t_m2 = _corrected(t_mean, d, 1, n_t)
                mean, m2, count = _chan_merge(mean, m2, count, t_mean, t_m2, n_t)
    out = g.to(tl.int64) * C + cs
    tl.store(PMEAN + out, mean, mask=c_ok)
    tl.store(PM2 + out, m2, mask=c_ok)


@triton.jit
def _bn_finalize_kernel(X, PMEAN, PM2, MEAN, INVSTD, RM, RV, C, L, M, GROUPS, GROUP_VALUES,
                        eps_hi, eps_lo, mom_hi, mom_lo, HAS_RUNNING: tl.constexpr, CL: tl.constexpr,
                        ACC: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_C: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    for g in range(0, GROUPS):
        n_g = tl.minimum(GROUP_VALUES, M - g * GROUP_VALUES).to(ACC)
        at = g * C + cs
        mean, m2, count = _chan_merge(mean, m2, count, tl.load(PMEAN + at, mask=c_ok, other=0.0),
                                      tl.load(PM2 + at, mask=c_ok, other=0.0), n_g)
    # Float arguments arrive as float32: eps and momentum come in two parts so that float64 keeps their value.
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    mean += _shift(X, cs, c_ok, L, CL, ACC)
    var = m2 / M
    tl.store(MEAN + cs, mean, mask=c_ok)
    tl.store(INVSTD + cs, 1.0 / tl.sqrt(var + eps), mask=c_ok)
    if HAS_RUNNING:
        mom = tl.cast(mom_hi, ACC) + tl.cast(mom_lo, ACC)
        rm = tl.load(RM + cs, mask=c_ok, other=0.0).to(ACC)
        rv = tl.load(RV + cs, mask=c_ok, other=0.0).to(ACC)
        rm = (1.0 - mom) * rm + mom * mean
        rv = (1.0 - mom) * rv + mom * (m2 / (M - 1))
        tl.store(RM + cs, _round_to(rm, RM.dtype.element_ty, FIX_BF16), mask=c_ok)
        tl.store(RV + cs, _round_to(rv, RV.dtype.element_ty, FIX_BF16), mask=c_ok)


@triton.jit
def _elementwise_tile(N, C, L, CL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(offsets, mask, channel index) of this program's tile: NLC [BLOCK_R rows, BLOCK_C channels] (grid: row
    blocks, channel blocks); NCL one (n, c) row's BLOCK_R positions (grid: N * C rows, position blocks)."""
    if CL:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        mask = (rows < N * L)[:, None] & c_ok[None, :]
        offs = rows[:, None] * C + cs[None, :]
        return offs, mask, cs[None, :], c_ok[None, :]
    else:
        row = tl.program_id(0).to(tl.int64)
        ls = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        return row * L + ls, ls < L, (row % C).to(tl.int32), row >= 0


@triton.jit
def _affine(MEAN, INVSTD, W, B, c, c_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (mean, scale = invstd * weight, shift = bias) at channel index c."""
    mean = tl.load(MEAN + c, mask=c_ok, other=0.0).to(ACC)
    scale = tl.load(INVSTD + c, mask=c_ok, other=0.0).to(ACC)
    if HAS_W:
        scale = scale * tl.load(W + c, mask=c_ok, other=0.0).to(ACC)
    if HAS_B:
        shift = tl.load(B + c, mask=c_ok, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(mean)
    return mean, scale, shift


@triton.jit
def _bn_fwd_kernel(X, R, Y, MEAN, INVSTD, W, B, N, C, L, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                   FIX_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, c, c_ok = _elementwise_tile(N, C, L, CL, BLOCK_R, BLOCK_C)
    mean, scale, shift = _affine(MEAN, INVSTD, W, B, c, c_ok, HAS_W, HAS_B, ACC)
    z = (tl.load(X + offs, mask=mask, other=0.0).to(ACC) - mean) * scale + shift
    if HAS_R:
        z += tl.load(R + offs, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, _round_to(_act(z, ACT), Y.dtype.element_ty, FIX_BF16), mask=mask)


@triton.jit
def _dz(X, DY, R, offs, mask, mean, scale, shift, HAS_R: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """(x - mean, dz = dy * act'(z)) on a tile, z recomputed as in the forward."""
    xc = tl.load(X + offs, mask=mask, other=0.0).to(ACC) - mean
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    if ACT != 0:
        z = xc * scale + shift
        if HAS_R:
            z += tl.load(R + offs, mask=mask, other=0.0).to(ACC)
        dz = dz * _act_grad(z, ACT)
    return xc, dz


@triton.jit
def _bn_bwd_reduce_kernel(X, DY, R, DRES, MEAN, INVSTD, W, B, PDZ, PDZX, N, C, L, GROUP,
                          HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_DRES: tl.constexpr,
                          ACT: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, FIX_BF16: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    g = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    first, end = _tile(N, C, L, g, GROUP, CL)
    if CL:
        mean, scale, shift = _affine(MEAN, INVSTD, W, B, cs[None, :], c_ok[None, :], HAS_W, HAS_B, ACC)
        s_dz = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        s_dzx = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        for start in range(first, end, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            mask = (rows < end)[:, None] & c_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * C + cs[None, :]
            xc, dz = _dz(X, DY, R, offs, mask, mean, scale, shift, HAS_R, ACT, ACC)
            dz = tl.where(mask, dz, 0.0)
            if STORE_DRES:
                tl.store(DRES + offs, _round_to(dz, DRES.dtype.element_ty, FIX_BF16), mask=mask)
            s_dz += dz
            s_dzx += dz * xc
        sum_dz = tl.sum(s_dz, axis=0)
        sum_dzx = tl.sum(s_dzx, axis=0)
    else:
        mean, scale, shift = _affine(MEAN, INVSTD, W, B, cs[:, None], c_ok[:, None], HAS_W, HAS_B, ACC)
        s_dz = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
        s_dzx = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
        for n in range(first, end):
            row = (cs.to(tl.int64) + n * C) * L
            for l0 in range(0, L, BLOCK_R):
                ls = l0 + tl.arange(0, BLOCK_R)
                mask = c_ok[:, None] & (ls < L)[None, :]
                offs = row[:, None] + ls[None, :]
                xc, dz = _dz(X, DY, R, offs, mask, mean, scale, shift, HAS_R, ACT, ACC)
                dz = tl.where(mask, dz, 0.0)
                if STORE_DRES:
                    tl.store(DRES + offs, _round_to(dz, DRES.dtype.element_ty, FIX_BF16), mask=mask)
                s_dz += dz
                s_dzx += dz * xc
        sum_dz = tl.sum(s_dz, axis=1)
        sum_dzx = tl.sum(s_dzx, axis=1)
    out = g.to(tl.int64) * C + cs
    tl.store(PDZ + out, sum_dz, mask=c_ok)
    tl.store(PDZX + out, sum_dzx, mask=c_ok)


@triton.jit
def _bn_bwd_dx_kernel(X, DY, R, DX, DRES, MEAN, INVSTD, W, B, C1, C2, N, C, L,
                      HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, TRAINING: tl.constexpr,
                      STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr,
                      ACC: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, c, c_ok = _elementwise_tile(N, C, L, CL, BLOCK_R, BLOCK_C)
    mean, scale, shift = _affine(MEAN, INVSTD, W, B, c, c_ok, HAS_W, HAS_B, ACC)
    xc, dz = _dz(X, DY, R, offs, mask, mean, scale, shift, HAS_R, ACT, ACC)
    if STORE_DRES:
        tl.store(DRES + offs, _round_to(dz, DRES.dtype.element_ty, FIX_BF16), mask=mask)
    if STORE_DX:
        if TRAINING:
            c1 = tl.load(C1 + c, mask=c_ok, other=0.0)
            c2 = tl.load(C2 + c, mask=c_ok, other=0.0)
            dz = dz - c1 - xc * c2
        tl.store(DX + offs, _round_to(scale * dz, DX.dtype.element_ty, FIX_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda" or _interpreting():
        return _INTERPRET_PROGRAMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device()) * \
        _PROGRAMS_PER_SM


def _dense_channels_last(t: torch.Tensor) -> bool:
    """Dense with channels innermost, strides (C*L, 1, ..., C) over (N, C, spatial...), size-1 dims ignored."""
    expected = 1
    for d in (1, *range(t.dim() - 1, 1, -1), 0):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


class _Geometry:
    def __init__(self, x: torch.Tensor):
        self.N, self.C = x.shape[0], x.shape[1]
        self.L = math.prod(x.shape[2:])
        self.M = self.N * self.L
        # With L == 1 both layouts are the same memory; the NLC kernels read it.
        self.cl = self.L == 1 or not x.is_contiguous()


def _check_input(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor, got device {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU)")
    if not (x.is_contiguous() or _dense_channels_last(x)):
        raise ValueError(f"{name}: expected contiguous NCHW or dense channels-last, got strides {x.stride()}")
    return _Geometry(x)


def _check_like(t, x, geo, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name}: expected x's shape {tuple(x.shape)}, dtype {x.dtype} and device {x.device}, got "
                         f"{tuple(t.shape)}, {t.dtype}, {t.device}")
    if not (_dense_channels_last(t) if geo.cl else t.is_contiguous()):
        raise ValueError(f"{name}: expected x's memory layout ({'channels-last' if geo.cl else 'NCHW'}), got "
                         f"strides {t.stride()}")


def _check_channels(t, x, geo, name, dtypes=None):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
    allowed = dtypes or (x.dtype, torch.float32)
    if t.dtype not in allowed:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if t.shape != (geo.C,) or not t.is_contiguous() or t.device != x.device:
        raise ValueError(f"{name}: expected a contiguous ({geo.C},) tensor on {x.device}, got shape "
                         f"{tuple(t.shape)} on {t.device}")


def _activation_code(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _acc(dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _to_float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _split_float(v: float) -> tuple[float, float]:
    """v = hi + lo with hi, lo float32 values (Triton passes Python floats as float32)."""
    hi = _to_float32(v)
    return hi, _to_float32(v - hi)


def _elementwise_config(geo):
    """(grid, BLOCK_R, BLOCK_C, num_warps) of the elementwise kernels."""
    if geo.cl:
        block_c = min(next_power_of_2(geo.C), 256)
        block_r = max(1, min(_TILE_ELEMS // block_c, next_power_of_2(geo.M)))
        grid = (cdiv(geo.M, block_r), cdiv(geo.C, block_c))
    else:
        block_c = 1
        block_r = min(next_power_of_2(geo.L), _TILE_ELEMS)
        grid = (geo.N * geo.C, cdiv(geo.L, block_r))
    return grid, block_r, block_c, max(1, min(8, block_r * block_c // 512))


def _reduction_config(geo, device):
    """(grid, GROUP, GROUP_VALUES, BLOCK_R, BLOCK_C, num_warps) of the reduction kernels: GROUP rows (NLC) or
    images (NCL) per group, sized so that the grid has about _target_programs programs."""
    if geo.cl:
        block_c = min(next_power_of_2(geo.C), 64)
        block_r = max(1, min(_TILE_ELEMS // block_c, next_power_of_2(geo.M)))
        rows, values_per_row = geo.M, 1
    else:
        block_r = min(next_power_of_2(geo.L), 1024)
        block_c = max(1, min(next_power_of_2(geo.C), _TILE_ELEMS // block_r))
        rows, values_per_row = geo.N, geo.L
    c_blocks = cdiv(geo.C, block_c)
    groups = max(1, min(rows, cdiv(_target_programs(device), c_blocks)))
    group = cdiv(rows, groups)
    if geo.cl:  # whole tiles per group
        group = cdiv(group, block_r) * block_r
    groups = cdiv(rows, group)
    return (c_blocks, groups), group, group * values_per_row, block_r, block_c, \
        max(1, min(8, block_r * block_c // 512))


def batch_norm_act_forward(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float,
                           activation: str, residual):
    """Returns (y in x's layout, mean, invstd); updates running_mean / running_var in place in training mode.

    x (N, C, *) contiguous or dense channels-last; weight, bias, running_mean, running_var: (C,) of x's dtype or
    float32, or None; residual: x's shape, dtype and layout, or None. See the module docstring.
    """
    geo = _check_input(x)
    act = _activation_code(activation)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channels(t, x, geo, name)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean: required in evaluation mode (training=False)")
    if training and geo.M == 1:
        raise ValueError(f"x: expected more than 1 value per channel when training, got shape {tuple(x.shape)}")
    for name, v in (("momentum", momentum), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite float, got {v!r}")
    if eps < 0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")
    if residual is not None:
        _check_like(residual, x, geo, "residual")
    acc_torch, acc_tl = _acc(x.dtype)
    y = torch.empty_like(x)
    if not training:
        mean = running_mean.to(acc_torch, copy=True)
        invstd = torch.rsqrt(running_var.to(acc_torch) + eps)
    elif geo.M == 0:  # the contract's values for an empty batch; the running stats stay as they are
        mean = torch.zeros(geo.C, dtype=acc_torch, device=x.device)
        invstd = torch.full((geo.C,), 1.0 / math.sqrt(eps) if eps > 0 else math.inf, dtype=acc_torch,
                            device=x.device)
    else:
        mean = torch.empty(geo.C, dtype=acc_torch, device=x.device)
        invstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, invstd
    fix = _interpreting()
    with _on_device(x.device):
        if training:
            grid, group, group_values, block_r, block_c, warps = _reduction_config(geo, x.device)
            pmean = torch.empty((grid[1], geo.C), dtype=acc_torch, device=x.device)
            pm2 = torch.empty_like(pmean)
            _bn_stats_kernel[grid](x, pmean, pm2, geo.N, geo.C, geo.L, group, CL=geo.cl, ACC=acc_tl,
                                   BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
            block = min(next_power_of_2(geo.C), 1024)
            has_running = running_mean is not None
            _bn_finalize_kernel[(cdiv(geo.C, block),)](
                x, pmean, pm2, mean, invstd, running_mean if has_running else mean,
                running_var if has_running else mean, geo.C, geo.L, geo.M, grid[1], group_values,
                *_split_float(eps), *_split_float(momentum), HAS_RUNNING=has_running, CL=geo.cl, ACC=acc_tl,
                FIX_BF16=fix, BLOCK_C=block, num_warps=4)
        grid, block_r, block_c, warps = _elementwise_config(geo)
        _bn_fwd_kernel[grid](x, residual if residual is not None else x, y, mean, invstd,
                             weight if weight is not None else mean, bias if bias is not None else mean,
                             geo.N, geo.C, geo.L, HAS_R=residual is not None, HAS_W=weight is not None,
                             HAS_B=bias is not None, ACT=act, CL=geo.cl, ACC=acc_tl, FIX_BF16=fix,
                             BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return y, mean, invstd


def batch_norm_act_backward(dy, x, weight, bias, mean, invstd, residual, training: bool, activation: str,
                            output_mask):
    """Returns (dx, dweight, dbias, dresidual), each None unless asked for by output_mask (x, weight, bias,
    residual); dweight / dbias in weight's / bias's dtype (x's when absent). mean, invstd: the forward's."""
    geo = _check_input(x)
    _check_like(dy, x, geo, "dy")
    act = _activation_code(activation)
    if len(output_mask) != 4:
        raise ValueError(f"output_mask: expected 4 entries (x, weight, bias, residual), got {len(output_mask)}")
    acc_torch, acc_tl = _acc(x.dtype)
    _check_channels(weight, x, geo, "weight")
    _check_channels(bias, x, geo, "bias")
    _check_channels(mean, x, geo, "mean", (acc_torch,))
    _check_channels(invstd, x, geo, "invstd", (acc_torch,))
    if residual is not None:
        _check_like(residual, x, geo, "residual")
    want_dx, want_dw, want_db, want_dres = (bool(m) for m in output_mask)
    dx = torch.empty_like(x) if want_dx else None
    dres = torch.empty_like(x) if want_dres else None
    need_sums = want_dw or want_db or (training and want_dx)
    sum_dz = sum_dzx = torch.zeros(geo.C, dtype=acc_torch, device=x.device) if need_sums else None
    fix = _interpreting()
    common = dict(HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, ACT=act, CL=geo.cl,
                  ACC=acc_tl, FIX_BF16=fix)
    r_arg = residual if residual is not None else x
    w_arg = weight if weight is not None else mean
    b_arg = bias if bias is not None else mean
    with _on_device(x.device):
        if need_sums and x.numel() > 0:
            grid, group, _, block_r, block_c, warps = _reduction_config(geo, x.device)
            pdz = torch.empty((grid[1], geo.C), dtype=acc_torch, device=x.device)
            pdzx = torch.empty_like(pdz)
            _bn_bwd_reduce_kernel[grid](x, dy, r_arg, dres if want_dres else x, mean, invstd, w_arg, b_arg, pdz, pdzx,
                                        geo.N, geo.C, geo.L, group, STORE_DRES=want_dres, **common,
                                        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
            sum_dz, sum_dzx = pdz.sum(0), pdzx.sum(0)
        store_dres = want_dres and not need_sums
        if (want_dx or store_dres) and x.numel() > 0:
            # dx = scale * (dz - c1 - (x - mean) * c2) in training
            c1, c2 = (sum_dz / geo.M, invstd * invstd * sum_dzx / geo.M) if training and want_dx else (mean, mean)
            grid, block_r, block_c, warps = _elementwise_config(geo)
            _bn_bwd_dx_kernel[grid](x, dy, r_arg, dx if want_dx else x, dres if store_dres else x, mean, invstd,
                                    w_arg, b_arg, c1, c2, geo.N, geo.C, geo.L, TRAINING=training,
                                    STORE_DX=want_dx, STORE_DRES=store_dres, **common, BLOCK_R=block_r,
                                    BLOCK_C=block_c, num_warps=warps)
    dweight = (sum_dzx * invstd).to(weight.dtype if weight is not None else x.dtype) if want_dw else None
    dbias = sum_dz.to(bias.dtype if bias is not None else x.dtype) if want_db else None
    return dx, dweight, dbias, dres
