"""Fake quantization (quantize, then dequantize, in float) and its STE / LSQ backward as Triton kernels.
mltoolkit/ops/fake_quantize.py is the only caller; the contract (granularities, both zero-point domains, the exact
arithmetic) is csrc/fake_quantize.h, the plain-PyTorch oracle mltoolkit/ops/reference/fake_quantize.py.

x is seen as the contiguous (outer, C, inner) array of the contract (quantizer c for the elements (o, c, :)). Every
kernel walks it in 3-D tiles [BLOCK_O, BLOCK_C, BLOCK_I] of at most TILE elements, inner fastest, so that one tiling
covers the three granularities with coalesced loads and no integer division per element:
  per tensor (1, 1, numel):       [1, 1, TILE] chunks of the flat tensor;
  per channel, axis 0 (1, C, I):  [1, 1, I] rows (I <= TILE), or TILE-long chunks of them;
  per channel, last axis (O, C, 1): [BLOCK_O, BLOCK_C, 1] tiles, contiguous along c;
  per group (1, numel / G, G):     [1, TILE / G, G] tiles, several groups per program.
  _fq_forward_kernel   y = fake_quantize(x), bit-exact with the reference: correctly rounded divisions
                       (tl.math.div_rn; Triton's `/` is approximate on the GPU), round half to even by adding and
                       subtracting 2^23 to |v| (exact for every float32: |v| >= 2^23 is an integer already),
                       launched with enable_fp_fusion=False so that no FMA contracts (q - cm) * s + z or the
                       products of the int domain. NaN x gives NaN y (the reference's clamp keeps it).
  _fq_backward_kernel  one fused pass over x and dy: dx = mask ? dy : 0, and per tile the partial sums
                       sum(dy * (mask ? r - u : q - zp)) and sum(mask ? 0 : dy) for each of its BLOCK_C quantizers,
                       written to PART[p, c] (p = the tile's (o block, i block) index). No atomics.
  _fq_reduce_kernel    dscale[c] = (sum over p, in order, of PART_S[p, c]) * grad_scale,
                       dzero_point[c] = ((-s or 1) * sum PART_Z[p, c]) * grad_scale: a fixed order that depends on
                       the shape and the tiling only (the same results on every run; not bit-equal to the CPU
                       kernel's, whose chunks differ; the sums agree to float32 rounding).
Gradients not asked for (output_mask) are neither computed nor written (constexpr flags).

Interpreter (TRITON_INTERPRET=1, CPU tensors): TILE is INTERPRET_TILE (small, so that tiny test shapes span several
tiles and partial sums); bfloat16 stores are rounded to nearest even by hand (the interpreter truncates).

The contract's checks (scale positive and finite, zero point finite) run on the host: one reduction and one
device-to-host copy per call, a synchronization likely comparable to the kernel itself on a 4096 x 4096 GPU tensor
(an estimate, not measured). CHECK_PARAMS = False skips them (invalid parameters then give meaningless values, NaN
for a NaN scale, instead of an error).

Knobs (module attributes, read at every call): TILE, INTERPRET_TILE, REDUCE_BLOCK_P, CHECK_PARAMS.
"""
import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .norm import _interpreting, _round_to

__all__ = ["fake_quantize", "fake_quantize_backward", "TILE", "INTERPRET_TILE", "CHECK_PARAMS"]

CHECK_PARAMS = True
TILE = 4096
INTERPRET_TILE = 64
REDUCE_BLOCK_P = 32
_REDUCE_BLOCK_C = 128
_MIN_O_BLOCK = 16  # last-axis per channel: reduce at least this many rows in a tile (fewer partial sums)

_TWO23 = tl.constexpr(8388608.0)  # 2^23


@triton.jit
def _rint(v):
    """Round half to even, exact for every float32 (|v| >= 2^23 is an integer already; inf and NaN kept)."""
    a = tl.abs(v)
    r = tl.where(a < _TWO23, (a + _TWO23) - _TWO23, a)
    return tl.where(v < 0, -r, r)


@triton.jit
def _tile(pid, outer, C, inner, n_cb, n_ib, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """The tile of program pid (pid = (o block * n_cb + c block) * n_ib + i block): element offsets [O, C, I] (int64),
    in-bounds mask, the channel indices [BLOCK_C] and their mask, and the tile's partial-sum row (o block * n_ib +
    i block)."""
    ib = pid % n_ib
    rest = pid // n_ib
    cb = rest % n_cb
    ob = rest // n_cb
    o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    c_ok = c < C
    off = ((o.to(tl.int64) * C)[:, None, None] + c.to(tl.int64)[None, :, None]) * inner + i[None, None, :]
    ok = (o < outer)[:, None, None] & c_ok[None, :, None] & (i < inner)[None, None, :]
    return off, ok, c, c_ok, ob * n_ib + ib


@triton.jit
def _quantize(x, s, b, qmin, qmax, FLOAT_ZP: tl.constexpr):
    """(u, r, v, q) of the contract, float32; s, b broadcast against x (b = round(zp) in the int domain)."""
    if FLOAT_ZP:
        u = tl.math.div_rn(x - b, s)
        r = _rint(u)
        v = r
    else:
        u = tl.math.div_rn(x, s)
        r = _rint(u)
        v = r + b
    q = tl.minimum(tl.maximum(v, qmin), qmax)
    q = tl.where(v != v, v, q)  # NaN stays NaN, as torch's clamp
    return u, r, v, q


@triton.jit
def _params(S, Z, c, c_ok, HAS_ZP: tl.constexpr, FLOAT_ZP: tl.constexpr):
    s = tl.load(S + c, mask=c_ok, other=1.0)[None, :, None]
    if HAS_ZP:
        b = tl.load(Z + c, mask=c_ok, other=0.0)[None, :, None]
        if not FLOAT_ZP:
            b = _rint(b)
    else:
        b = tl.zeros_like(s)
    return s, b


@triton.jit
def _fq_forward_kernel(X, S, Z, Y, outer, C, inner, n_cb, n_ib, qmin, qmax, cm,
                       HAS_ZP: tl.constexpr, FLOAT_ZP: tl.constexpr, FIX_BF16: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    off, ok, c, c_ok, _ = _tile(tl.program_id(0), outer, C, inner, n_cb, n_ib, BLOCK_O, BLOCK_C, BLOCK_I)
    x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
    s, b = _params(S, Z, c, c_ok, HAS_ZP, FLOAT_ZP)
    _, _, _, q = _quantize(x, s, b, qmin, qmax, FLOAT_ZP)
    if FLOAT_ZP:
        y = (q - cm) * s
        z = cm * s
        z = b + z
        y = y + z
    else:
        y = (q - b) * s
    tl.store(Y + off, _round_to(y, Y.dtype.element_ty, FIX_BF16), mask=ok)


@triton.jit
def _fq_backward_kernel(DY, X, S, Z, DX, PART_S, PART_Z, outer, C, inner, n_cb, n_ib, qmin, qmax,
                        HAS_ZP: tl.constexpr, FLOAT_ZP: tl.constexpr, NEED_DX: tl.constexpr,
                        NEED_DS: tl.constexpr, NEED_DZ: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    off, ok, c, c_ok, p = _tile(tl.program_id(0), outer, C, inner, n_cb, n_ib, BLOCK_O, BLOCK_C, BLOCK_I)
    x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
    dy_raw = tl.load(DY + off, mask=ok, other=0.0)
    s, b = _params(S, Z, c, c_ok, HAS_ZP, FLOAT_ZP)
    u, r, v, q = _quantize(x, s, b, qmin, qmax, FLOAT_ZP)
    inside = (v >= qmin) & (v <= qmax)
    if NEED_DX:
        tl.store(DX + off, tl.where(inside, dy_raw, tl.zeros_like(dy_raw)), mask=ok)
    g = dy_raw.to(tl.float32)
    if NEED_DS:
        if FLOAT_ZP:
            out = q
        else:
            out = q - b
        term = tl.where(inside, r - u, out)
        ts = tl.where(ok, g * term, 0.0)
        tl.store(PART_S + p.to(tl.int64) * C + c, tl.sum(tl.sum(ts, axis=2), axis=0), mask=c_ok)
    if NEED_DZ:
        tz = tl.where(ok, tl.where(inside, 0.0, g), 0.0)
        tl.store(PART_Z + p.to(tl.int64) * C + c, tl.sum(tl.sum(tz, axis=2), axis=0), mask=c_ok)


@triton.jit
def _fq_reduce_kernel(PART_S, PART_Z, S, DS, DZ, C, P, grad_scale,
                      NEED_DS: tl.constexpr, NEED_DZ: tl.constexpr, FLOAT_ZP: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs_p = tl.arange(0, BLOCK_P)
    acc_s = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + offs_p
        idx = p.to(tl.int64)[:, None] * C + c[None, :]
        m = (p < P)[:, None] & c_ok[None, :]
        if NEED_DS:
            acc_s += tl.load(PART_S + idx, mask=m, other=0.0)
        if NEED_DZ:
            acc_z += tl.load(PART_Z + idx, mask=m, other=0.0)
    if NEED_DS:
        tl.store(DS + c, tl.sum(acc_s, axis=0) * grad_scale, mask=c_ok)
    if NEED_DZ:
        z = tl.sum(acc_z, axis=0)
        if not FLOAT_ZP:
            z = -tl.load(S + c, mask=c_ok, other=0.0) * z
        tl.store(DZ + c, z * grad_scale, mask=c_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _layout(shape, axis, group_size):
    numel = 1
    for d in shape:
        numel *= d
    if group_size:
        return 1, numel // group_size, group_size
    if axis is not None and axis >= 0:
        outer = inner = 1
        for d in shape[:axis]:
            outer *= d
        for d in shape[axis + 1:]:
            inner *= d
        return outer, shape[axis], inner
    return 1, 1, numel


def _blocks(outer, C, inner):
    """(BLOCK_O, BLOCK_C, BLOCK_I, n_ob, n_cb, n_ib): at most TILE elements per tile, inner first; on the last-axis
    layout (inner 1) at least _MIN_O_BLOCK rows per tile where there are that many, so that the backward reduces
    rows in registers and writes few partial sums."""
    tile = INTERPRET_TILE if _interpreting() else TILE
    bi = min(next_power_of_2(inner), tile)
    rest = tile // bi
    bo_min = min(next_power_of_2(outer), _MIN_O_BLOCK, rest)
    bc = min(next_power_of_2(C), max(1, rest // bo_min))
    bo = min(next_power_of_2(outer), max(1, rest // bc))
    return bo, bc, bi, cdiv(outer, bo), cdiv(C, bc), cdiv(inner, bi)


def _warps(bo, bc, bi):
    n = bo * bc * bi
    return 8 if n >= 4096 else 4 if n >= 1024 else 2 if n >= 256 else 1


def _check_params(scale, zero_point):
    ok = ((scale > 0) & torch.isfinite(scale)).all()
    if zero_point is not None:
        zok = torch.isfinite(zero_point).all()
        bad = torch.stack([~ok, ~zok]).cpu().tolist()  # one synchronization for both checks
        if bad[0]:
            raise ValueError("fake_quantize: scale must be positive and finite")
        if bad[1]:
            raise ValueError("fake_quantize: zero_point must be finite")
    elif not bool(ok):
        raise ValueError("fake_quantize: scale must be positive and finite")


def _prepare(x, scale, zero_point, axis, group_size):
    if CHECK_PARAMS:
        _check_params(scale, zero_point)
    outer, C, inner = _layout(tuple(x.shape), axis, group_size)
    s = scale.reshape(-1).to(torch.float32).contiguous()
    z = zero_point.reshape(-1).to(torch.float32).contiguous() if zero_point is not None else s
    return x.contiguous(), s, z, (outer, C, inner)


def fake_quantize(x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point):
    """csrc/fake_quantize.h's fake_quantize: y of x's shape and dtype (contiguous), bit-exact with the reference."""
    xc, s, z, (outer, C, inner) = _prepare(x, scale, zero_point, axis, group_size)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    bo, bc, bi, n_ob, n_cb, n_ib = _blocks(outer, C, inner)
    cm = (qmin + qmax + 1) // 2
    _fq_forward_kernel[(n_ob * n_cb * n_ib,)](
        xc, s, z, y, outer, C, inner, n_cb, n_ib, float(qmin), float(qmax), float(cm),
        HAS_ZP=zero_point is not None, FLOAT_ZP=bool(float_zero_point), FIX_BF16=_interpreting(),
        BLOCK_O=bo, BLOCK_C=bc, BLOCK_I=bi, num_warps=_warps(bo, bc, bi), enable_fp_fusion=False)
    return y


def fake_quantize_backward(dy, x, scale, zero_point, qmin, qmax, axis, group_size, float_zero_point, grad_scale,
                           output_mask):
    """csrc/fake_quantize.h's fake_quantize_backward: (dx in x's dtype or None, dscale float32 of scale's shape or
    None, dzero_point likewise or None)."""
    xc, s, z, (outer, C, inner) = _prepare(x, scale, zero_point, axis, group_size)
    dyc = dy.contiguous()
    need_dx, need_ds = bool(output_mask[0]), bool(output_mask[1])
    need_dz = bool(output_mask[2]) and zero_point is not None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    ds = torch.zeros(scale.shape, dtype=torch.float32, device=x.device) if need_ds else None
    dz = torch.zeros(scale.shape, dtype=torch.float32, device=x.device) if need_dz else None
    if x.numel() == 0 or not (need_dx or need_ds or need_dz):
        return dx, ds, dz
    bo, bc, bi, n_ob, n_cb, n_ib = _blocks(outer, C, inner)
    P = n_ob * n_ib
    part_s = torch.empty((P, C), dtype=torch.float32, device=x.device) if need_ds else s
    part_z = torch.empty((P, C), dtype=torch.float32, device=x.device) if need_dz else s
    flags = dict(FLOAT_ZP=bool(float_zero_point), NEED_DS=need_ds, NEED_DZ=need_dz)
    _fq_backward_kernel[(n_ob * n_cb * n_ib,)](
        dyc, xc, s, z, dx if need_dx else xc, part_s, part_z, outer, C, inner, n_cb, n_ib, float(qmin), float(qmax),
        HAS_ZP=zero_point is not None, NEED_DX=need_dx, BLOCK_O=bo, BLOCK_C=bc, BLOCK_I=bi,
        num_warps=_warps(bo, bc, bi), enable_fp_fusion=False, **flags)
    if need_ds or need_dz:
        bp = REDUCE_BLOCK_P if not _interpreting() else 4
        bcr = min(_REDUCE_BLOCK_C, next_power_of_2(C))
        _fq_reduce_kernel[(cdiv(C, bcr),)](
            part_s, part_z, s, ds if need_ds else s, dz if need_dz else s, C, P, float(grad_scale),
            BLOCK_P=bp, BLOCK_C=bcr, num_warps=4, enable_fp_fusion=False, **flags)
    return dx, ds, dz
