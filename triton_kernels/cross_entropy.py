"""Softmax cross-entropy as Triton kernels; the contract is csrc/cross_entropy.h (mltoolkit/ops/loss.py is
the only caller):

    logits (N, C), stride 1 along classes, any row stride; target int64 (N); per row i with t = target[i]:
        lse_i = log(sum_j exp(x_ij)),  loss_i = lse_i - (1 - e) x_it - (e / C) sum_j x_ij   (0 where t is ignored)
        dlogits_ij = dloss_i (exp(x_ij - lse_i) - e / C - (1 - e) [j == t])                 (0 on ignored rows)

Math in float32 (float64 for float64 logits). The forward is one program per row, an online softmax over column
blocks kept per lane (one max and one rescaled sum per lane, reduced once at the end), so a row is read once. The
backward is one program per (row, column block): it reads each logit once and writes each gradient once. A target
outside [0, C) that is not ignore_index gives a NaN loss (the kernels cannot raise; the CPU kernel does).
"""
import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .norm import _interpreting, _on_device, _round_to

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Column block of the forward's loop and of a backward program (a 50k vocabulary: 13 blocks of 4096).
_BLOCK = 4096


@triton.jit
def _smoothing(keep, spread, CONSTS, CONSTS_IN_MEMORY: tl.constexpr):
    # Python floats reach a kernel as float32: float64 math reads its (1 - e, e / C) from a float64 tensor instead.
    if CONSTS_IN_MEMORY:
        keep = tl.load(CONSTS)
        spread = tl.load(CONSTS + 1)
    return keep, spread


@triton.jit
def _ce_fwd_kernel(X, T, LOSS, LSE, C, stride_x, ignore_index, keep, spread, CONSTS,
                   SMOOTHED: tl.constexpr, ACC: tl.constexpr, CONSTS_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    keep, spread = _smoothing(keep, spread, CONSTS, CONSTS_IN_MEMORY)
    x_row = X + row * stride_x
    cols0 = tl.arange(0, BLOCK)
    # Per-lane running max and sum of exp(x - max). The max starts finite so that masked lanes (-inf) and -inf
    # logits add exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
    m = tl.full([BLOCK], -3.0e38, ACC)
    s = tl.zeros([BLOCK], ACC)
    sum_x = tl.zeros([BLOCK], ACC)
    for start in range(0, C, BLOCK):
        cols = start + cols0
        ok = cols < C
        x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        if SMOOTHED:
            sum_x += tl.where(ok, x, 0.0)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    tl.store(LSE + row, lse)
    t = tl.load(T + row)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < C)
    x_t = tl.load(x_row + t, mask=valid & in_range, other=0.0).to(ACC)
    loss = lse - keep * x_t
    if SMOOTHED:
        loss -= spread * tl.sum(sum_x, axis=0)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))


@triton.jit
def _ce_bwd_kernel(G, X, T, LSE, DX, C, stride_x, ignore_index, keep, spread, CONSTS,
                   ACC: tl.constexpr, CONSTS_IN_MEMORY: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    keep, spread = _smoothing(keep, spread, CONSTS, CONSTS_IN_MEMORY)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    t = tl.load(T + row)
    g = tl.load(G + row).to(ACC)
    lse = tl.load(LSE + row).to(ACC)
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(ACC)
    d = g * (tl.exp(x - lse) - spread - tl.where(cols == t, keep, 0.0))
    d = tl.where(t != ignore_index, d, 0.0)
    tl.store(DX + row * C + cols, _round_to(d, DX.dtype.element_ty, FIX_BF16), mask=ok)


def _check(logits, target):
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits: expected float32, float64, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits: expected shape (N, C) with C >= 1, got {tuple(logits.shape)}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits: expected stride 1 along classes, got strides {logits.stride()}")
    if target.dtype != torch.int64 or target.shape != logits.shape[:1] or not target.is_contiguous():
        raise ValueError(f"target: expected contiguous int64 of shape ({logits.shape[0]},), got {target.dtype} "
                         f"{tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target: expected logits' device {logits.device}, got {target.device}")


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _smoothing_args(logits, label_smoothing: float):
    """(keep, spread, consts, consts_in_memory): 1 - e and e / C as floats, and for float64 logits in a tensor."""
    keep, spread = 1.0 - label_smoothing, label_smoothing / logits.shape[1]
    if logits.dtype != torch.float64:
        return keep, spread, logits, False
    return keep, spread, torch.tensor([keep, spread], dtype=torch.float64, device=logits.device), True


def _block(c: int) -> int:
    return min(_BLOCK, next_power_of_2(c))


def cross_entropy_forward(logits, target, ignore_index: int, label_smoothing: float):
    """(loss, lse), each (N,) float32 (float64 for float64 logits); see the module docstring."""
    _check(logits, target)
    n, c = logits.shape
    loss = torch.empty(n, dtype=_stat_dtype(logits.dtype), device=logits.device)
    lse = torch.empty_like(loss)
    if n == 0:
        return loss, lse
    block = _block(c)
    with _on_device(logits.device):
        keep, spread, consts, in_memory = _smoothing_args(logits, label_smoothing)
        _ce_fwd_kernel[(n,)](logits, target, loss, lse, c, logits.stride(0), ignore_index, keep, spread, consts,
                             SMOOTHED=label_smoothing != 0.0, ACC=_acc(logits.dtype), CONSTS_IN_MEMORY=in_memory,
                             BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss, lse


def cross_entropy_backward(dloss, logits, target, lse, ignore_index: int, label_smoothing: float):
    """dlogits (N, C), contiguous, in logits' dtype; see the module docstring."""
    _check(logits, target)
    stat = _stat_dtype(logits.dtype)
    for name, t in (("dloss", dloss), ("lse", lse)):
        if t.dtype != stat or t.shape != logits.shape[:1] or not t.is_contiguous() or t.device != logits.device:
            raise ValueError(f"{name}: expected contiguous {stat} of shape ({logits.shape[0]},) on "
                             f"{logits.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    n, c = logits.shape
    dlogits = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return dlogits
    block = _block(c)
    with _on_device(logits.device):
        keep, spread, consts, in_memory = _smoothing_args(logits, label_smoothing)
        _ce_bwd_kernel[(n, cdiv(c, block))](
            dloss, logits, target, lse, dlogits, c, logits.stride(0), ignore_index, keep, spread, consts,
            ACC=_acc(logits.dtype), CONSTS_IN_MEMORY=in_memory, FIX_BF16=_interpreting(), BLOCK=block,
            num_warps=8 if block >= 2048 else 4)
    return dlogits
