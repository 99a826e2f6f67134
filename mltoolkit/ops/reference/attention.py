"""Plain-PyTorch attention and rotary embedding: the contract of csrc/attention.h, written out.

`attention` is the oracle tests compare against (autograd, any compute dtype, the attention matrix materialized);
`attention_forward` / `attention_backward` implement the kernel contract on top of it and are the `reference`
backend. `philox4x32_10` and `dropout_keep` draw exactly the dropout mask every kernel draws, so a test can replay a
kernel's dropout in the oracle bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # (hi, lo) 32-bit halves of a * b for a < 2^32 and b < 2^32 held in int64, without overflowing int64.
    b_hi, b_lo = b >> 16, b & 0xFFFF
    x = a * b_lo                       # < 2^48
    y = a * b_hi + (x >> 16)           # < 2^49
    return y >> 16, ((y & 0xFFFF) << 16) | (x & 0xFFFF)


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Philox4x32-10 (Random123, as in curand and triton.language.philox) on int64 tensors holding uint32 values."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """keep iff the uint32 draw >= this (floor(p * 2^32) in double precision)."""
    return min(int(math.floor(dropout_p * 4294967296.0)), _MASK32)


def dropout_keep(seed: int, dropout_p: float, heads: int, lq: int, lk: int, batch: int = 1, first_batch: int = 0,
                 device: torch.device | str = "cpu") -> Tensor:
    """The keep mask (batch, heads, lq, lk) for sequences first_batch .. first_batch + batch - 1 (see attention.h)."""
    b = torch.arange(first_batch, first_batch + batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    i = torch.arange(lq, device=device).view(1, 1, -1, 1)
    j = torch.arange(lk, device=device).view(1, 1, 1, -1)
    shape = (batch, heads, lq, lk)
    words = philox4x32_10((j >> 2).expand(shape), i.expand(shape), (b * heads + h).expand(shape),
                          torch.zeros(shape, dtype=torch.int64, device=device), seed & _MASK32, (seed >> 32) & _MASK32)
    word = torch.stack(words, dim=-1).gather(-1, (j & 3).expand(shape).unsqueeze(-1)).squeeze(-1)
    return word >= dropout_threshold(dropout_p)


def window_allowed(lq: int, lk: int, window_left: int = -1, window_right: int = -1, bottom_right: bool = False,
                   device: torch.device | str = "cpu") -> Tensor:
    """Bool (lq, lk): which keys the causal / sliding-window band lets each query see (see attention.h)."""
    i = torch.arange(lq, device=device).view(-1, 1) + (lk - lq if bottom_right else 0)
    j = torch.arange(lk, device=device).view(1, -1)
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= i - window_left
    if window_right >= 0:
        ok &= j <= i + window_right
    return ok


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, scale: Optional[float] = None,
              window_left: int = -1, window_right: int = -1, bottom_right: bool = False,
              dropout_keep_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              compute_dtype: Optional[torch.dtype] = None, return_probs: bool = False):
    """(out, lse) of (B, Hq, Lq, D) attention with GQA, a bool or additive mask, a window and a given dropout mask,
    computed in `compute_dtype` (default q's) with autograd. Rows with no allowed key give out 0 and lse +inf.
    return_probs: the softmax probabilities (before dropout) instead."""
    ct = compute_dtype or q.dtype
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv:
        kf = kf.repeat_interleave(hq // hkv, dim=-3)
        vf = vf.repeat_interleave(hq // hkv, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    lq, lk = s.shape[-2], s.shape[-1]
    allowed = window_allowed(lq, lk, window_left, window_right, bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(ct)
    s = s.masked_fill(~allowed, -math.inf)
    if lk == 0:  # no keys at all: every row is empty
        row_max = s.new_full((*s.shape[:-1], 1), -math.inf)
    else:
        row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = torch.where(denom > 0, e / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(e))
    lse = torch.where(denom.squeeze(-1) > 0, (row_max + torch.log(denom)).squeeze(-1),
                      torch.full_like(denom.squeeze(-1), math.inf))
    if return_probs:
        return p
    if dropout_keep_mask is not None and dropout_p > 0:
        p = p * dropout_keep_mask.to(ct) / (1.0 - dropout_p)
    return torch.matmul(p, vf), lse


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequences(q: Tensor, k: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor]):
    """(b, query rows, key rows) per logical sequence: slices of dim 2 of the (B, H, L, D) tensors."""
    if cu_seqlens_q is None:
        return [(None, slice(None), slice(None))]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def attention_forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                      window_right, bottom_right, dropout_p, seed):
    ct = _compute_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for b, rq, rk in _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        qs, ks, vs = q[:, :, rq], k[:, :, rk], v[:, :, rk]
        keep = None
        if dropout_p > 0:
            keep = dropout_keep(seed, dropout_p, q.shape[1], qs.shape[2], ks.shape[2],
                                batch=q.shape[0] if b is None else 1, first_batch=b or 0, device=q.device)
        o, row_lse = attention(qs, ks, vs, mask, scale, window_left, window_right, bottom_right, keep, dropout_p, ct)
        out[:, :, rq], lse[:, :, rq] = o, row_lse
    return out, lse


def attention_backward(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       window_left, window_right, bottom_right, dropout_p, seed, deterministic):
    # Explicit formulas (a custom op's kernel runs below autograd): with P the softmax, Z = keep / (1 - p),
    # dV = (P Z)^T dO, dP = (dO V^T) Z, dS = P (dP - rowsum(P dP)), dQ = scale dS K, dK = scale dS^T Q.
    ct = _compute_dtype(q.dtype)
    hq, hkv = q.shape[1], k.shape[1]
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    for b, rq, rk in _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        qs, ks, vs, dos = q[:, :, rq].to(ct), k[:, :, rk].to(ct), v[:, :, rk].to(ct), dout[:, :, rq].to(ct)
        if hq != hkv:
            ks, vs = ks.repeat_interleave(hq // hkv, dim=1), vs.repeat_interleave(hq // hkv, dim=1)
        p = attention(qs, ks, vs, mask, scale, window_left, window_right, bottom_right, compute_dtype=ct,
                      return_probs=True)
        z = torch.ones_like(p)
        if dropout_p > 0:
            z = dropout_keep(seed, dropout_p, hq, qs.shape[2], ks.shape[2], batch=q.shape[0] if b is None else 1,
                             first_batch=b or 0, device=q.device).to(ct) / (1.0 - dropout_p)
        dvs = torch.matmul((p * z).transpose(-1, -2), dos)
        dp = torch.matmul(dos, vs.transpose(-1, -2)) * z
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dqs = torch.matmul(ds, ks) * scale
        dks = torch.matmul(ds.transpose(-1, -2), qs) * scale
        if hq != hkv:
            dks = dks.unflatten(1, (hkv, hq // hkv)).sum(dim=2)
            dvs = dvs.unflatten(1, (hkv, hq // hkv)).sum(dim=2)
        dq[:, :, rq], dk[:, :, rk], dv[:, :, rk] = dqs, dks, dvs
    return dq, dk, dv


# ---- rotary embedding -----------------------------------------------------------------------------------------------

def rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, conjugate: bool = False) -> Tensor:
    """Rotary embedding of x (B, L, H, D) by cos/sin (L, R/2), differentiable in x, cos and sin (see attention.h)."""
    ct = _compute_dtype(x.dtype)
    r = 2 * cos.shape[-1]
    xf = x.to(ct)
    c = cos.to(ct).unsqueeze(-2)
    s = sin.to(ct).unsqueeze(-2)
    if conjugate:
        s = -s
    xr = xf[..., :r]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        y = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((y, xf[..., r:]), dim=-1).to(x.dtype)
