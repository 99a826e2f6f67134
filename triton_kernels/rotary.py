"""Rotary embedding (RoPE) as a Triton kernel; the contract is the "Rotary embedding" part of csrc/attention.h
(mltoolkit/ops/rotary.py is the only caller):

    x, out (B, L, H, D), stride 1 in the last dim; cos, sin (L, R/2); for each row (b, l, h) and pair r < R/2,
    with (x1, x2) = (x[r], x[r + R/2]) (half-split) or (x[2r], x[2r+1]) (interleaved):
        y1 = x1*cos[l, r] - x2*sin[l, r],  y2 = x1*sin[l, r] + x2*cos[l, r]     (conjugate: sin -> -sin)
    dims R .. D-1 are copied; out may be x (in place).

Math in float32 (float64 for float64 x). cos and sin: x's dtype or float32 each; when they differ both are read as
float32, and for float64 x as float64 (one table dtype per launch, as in the C++ kernels).

One program rotates a [BLOCK_M rows, R] tile (rows ordered b, l, h, so that a tile's rows share a few cos/sin rows):
half-split rows load the two halves as two tiles; interleaved rows load the pairs as one contiguous tile and split
it in registers (as flash-attn's Triton rotary does), so both layouts read x in full contiguous rows.
"""
import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .norm import _interpreting, _on_device, _round_to

__all__ = ["rotary"]

# Elements of x per program tile (the tile is [BLOCK_M, max(R, D - R)]).
_TILE_ELEMS = 4096
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@triton.jit
def _rotary_fwd_kernel(X, COS, SIN, OUT, ROWS, L, H, HALF, D,
                       stride_xb, stride_xl, stride_xh, stride_ob, stride_ol, stride_oh,
                       INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_TAIL: tl.constexpr,
                       ACC: tl.constexpr, FIX_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    head = rows % H
    pos = (rows // H) % L
    batch = rows // (H * L)
    x_row = X + (batch * stride_xb + pos * stride_xl + head * stride_xh)[:, None]
    o_row = OUT + (batch * stride_ob + pos * stride_ol + head * stride_oh)[:, None]
    k = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (k < HALF)[None, :]
    table = pos[:, None] * HALF + k[None, :]
    c = tl.load(COS + table, mask=mask, other=0.0).to(ACC)
    s = tl.load(SIN + table, mask=mask, other=0.0).to(ACC)
    if CONJUGATE:
        s = -s
    if INTERLEAVED:
        j = tl.arange(0, 2 * BLOCK_K)
        pair_mask = row_ok[:, None] & (j < 2 * HALF)[None, :]
        xx = tl.load(x_row + j[None, :], mask=pair_mask, other=0.0).to(ACC)
        x1, x2 = tl.split(tl.reshape(xx, [BLOCK_M, BLOCK_K, 2]))
        y = tl.reshape(tl.join(x1 * c - x2 * s, x1 * s + x2 * c), [BLOCK_M, 2 * BLOCK_K])
        tl.store(o_row + j[None, :], _round_to(y, OUT.dtype.element_ty, FIX_BF16), mask=pair_mask)
    else:
        x1 = tl.load(x_row + k[None, :], mask=mask, other=0.0).to(ACC)
        x2 = tl.load(x_row + (k + HALF)[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(o_row + k[None, :], _round_to(x1 * c - x2 * s, OUT.dtype.element_ty, FIX_BF16), mask=mask)
        tl.store(o_row + (k + HALF)[None, :], _round_to(x1 * s + x2 * c, OUT.dtype.element_ty, FIX_BF16),
                 mask=mask)
    if COPY_TAIL:
        t = 2 * HALF + tl.arange(0, BLOCK_T)
        tail_mask = row_ok[:, None] & (t < D)[None, :]
        tl.store(o_row + t[None, :], tl.load(x_row + t[None, :], mask=tail_mask), mask=tail_mask)


def _check_rows(t, name, x=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (batch, seqlen, nheads, headdim) tensor, got shape {tuple(t.shape)}")
    if t.shape[3] > 1 and t.stride(3) != 1:
        raise ValueError(f"{name}: expected stride 1 in the last dim, got strides {t.stride()}")
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor, got device {t.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU)")
    if x is not None:
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected x's device {x.device}, got {t.device}")


def _check_table(t, name, x):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name}: expected x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{name}: expected shape (seqlen, rotary_dim / 2) with seqlen = {x.shape[1]}, "
                         f"got {tuple(t.shape)}")
    if 2 * t.shape[1] > x.shape[3]:
        raise ValueError(f"{name}: rotary_dim = {2 * t.shape[1]} exceeds headdim = {x.shape[3]}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected x's device {x.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")


def rotary(x, cos, sin, out, interleaved: bool, conjugate: bool) -> None:
    """Writes the rotary embedding of x by (cos, sin) into out (which may be x itself); see the module docstring."""
    for name, flag in (("interleaved", interleaved), ("conjugate", conjugate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    _check_rows(x, "x")
    _check_rows(out, "out", x)
    _check_table(cos, "cos", x)
    _check_table(sin, "sin", x)
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    in_place = out.data_ptr() == x.data_ptr()
    if in_place and out.stride() != x.stride():
        raise ValueError(f"out: starts where x does but has strides {out.stride()} (x: {x.stride()}); "
                         "in place, pass x itself as out")
    if x.numel() == 0:
        return
    table_dtype = torch.float64 if x.dtype == torch.float64 else cos.dtype if cos.dtype == sin.dtype else \
        torch.float32
    cos, sin = cos.to(table_dtype), sin.to(table_dtype)
    B, L, H, D = x.shape
    half = cos.shape[1]
    rows = B * L * H
    block_k = next_power_of_2(max(half, 1))
    copy_tail = 2 * half < D and not in_place
    block_t = next_power_of_2(max(D - 2 * half, 1))
    width = max(2 * block_k, block_t if copy_tail else 1)
    block_m = max(1, min(_TILE_ELEMS // width, next_power_of_2(rows)))
    num_warps = max(1, min(8, block_m * width // 1024))
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    with _on_device(x.device):
        _rotary_fwd_kernel[(cdiv(rows, block_m),)](
            x, cos, sin, out, rows, L, H, half, D, x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_TAIL=copy_tail, ACC=acc, FIX_BF16=_interpreting(),
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=num_warps)
