"""Scaled dot-product attention, dense and varlen, with torch's and flash-attn's semantics.

Two registered ops carry every variant (one kernel pair per backend, contract in csrc/attention.h):

    torch.ops.mltoolkit.attn_fwd(q, k, v, mask?, cu_seqlens_q?, cu_seqlens_k?, max_seqlen_q, max_seqlen_k, scale,
                                 window_left, window_right, bottom_right, dropout_p, seed?) -> (out, lse)
    torch.ops.mltoolkit.attn_bwd(dout, q, k, v, out, lse, <same options>, deterministic) -> (dq, dk, dv)

q is (B, Hq, Lq, D) and k, v are (B, Hkv, Lk, D), any strides with a contiguous last dim; varlen calls pass packed
tensors as (1, H, total, D) views. mask is additive in q's dtype, an expanded (B, Hq, Lq, Lk) view. seed is an int64
scalar tensor (a tensor, so that compiled graphs do not specialize on it). The backward saves q, k, v, out and the
float32 logsumexp, never the attention matrix.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import attention as reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256

ATTENTION = table("attention")


# ---- backends -------------------------------------------------------------------------------------------------

def _grid_limits(q: Tensor, cu_seqlens_q: Optional[Tensor]) -> Optional[str]:
    sequences = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    if q.shape[1] > 65535 or sequences > 65535:
        return "more than 65535 heads or sequences (a grid dimension)"
    return None


def _cuda_accepts(q: Tensor, k=None, v=None, mask=None, cu_seqlens_q=None, *_) -> Optional[str]:
    if not q.is_cuda:
        return _ext.on_cuda(q)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"tensor-core kernel takes float16/bfloat16, got {q.dtype}"
    capability = torch.cuda.get_device_capability(q.device)
    if capability not in ((8, 0), (9, 0)):
        # sm_86/89 run the sm_80 code with 99 KB of shared memory, too little for the larger head dims
        return f"built for compute capability 8.0 and 9.0, device has {capability[0]}.{capability[1]}"
    return _grid_limits(q, cu_seqlens_q)


def _triton_accepts(q: Tensor, k=None, v=None, mask=None, cu_seqlens_q=None, *_) -> Optional[str]:
    if q.dtype == torch.float64:
        return "no float64 kernel"
    return _grid_limits(q, cu_seqlens_q) or _ext.triton_device(q)


def _triton_kernels():
    from mltoolkit.triton_kernels import attention as triton_attention

    return triton_attention


# Not yet timed on a GPU: Triton first on CUDA because its kernels have run (interpreted) against the reference,
# the CUDA C++ kernels only compiled. Revisit with benchmarks/results once both have run on an H100/H200.
ATTENTION.register("triton", _triton_accepts, _ext.triton_unavailable,
                   forward=lambda *a: _triton_kernels().attention_forward(*a),
                   backward=lambda *a: _triton_kernels().attention_backward(*a))
ATTENTION.register("cuda", _cuda_accepts, _ext.cuda_unavailable,
                   forward=lambda *a: _ext._C.attention_forward_cuda(*a),
                   backward=lambda *a: _ext._C.attention_backward_cuda(*a))
ATTENTION.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
                   forward=lambda *a: _ext._C.attention_forward_cpu(*a),
                   backward=lambda *a: _ext._C.attention_backward_cpu(*a))
ATTENTION.register("reference", lambda *_: None,
                   forward=reference.attention_forward, backward=reference.attention_backward)


# ---- registered ops -------------------------------------------------------------------------------------------

def _check_cu_seqlens(cu: Tensor, total: int, max_seqlen: int, name: str) -> None:
    """Values of cu_seqlens (the public function checks dtype and shape): from 0 to the packed length,
    non-decreasing, no sequence longer than max_seqlen."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} ends at {values[-1]} but the packed tensor has {total} rows")
    if max(lengths) > max_seqlen:
        raise ValueError(f"a sequence of length {max(lengths)} exceeds max_seqlen {max_seqlen} ({name})")


def _seed_value(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _forward_kernels(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                     window_right, bottom_right, dropout_p, seed):
    if cu_seqlens_q is not None:
        _check_cu_seqlens(cu_seqlens_q, q.shape[2], max_seqlen_q, "cu_seqlens_q")
        _check_cu_seqlens(cu_seqlens_k, k.shape[2], max_seqlen_k, "cu_seqlens_k")
    forward = ATTENTION.select(q, k, v, mask, cu_seqlens_q).kernels["forward"]
    return forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                   window_right, bottom_right, dropout_p, _seed_value(seed))


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
             cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
             window_right: int, bottom_right: bool, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out, lse = _forward_kernels(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                window_left, window_right, bottom_right, dropout_p, seed)
    return out, lse


attn_fwd = torch.library.custom_op("mltoolkit::attn_fwd", mutates_args=())(_fwd_impl)


@attn_fwd.register_fake
def _(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
      bottom_right, dropout_p, seed):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attn_fwd: q, k, v must be 4-D")
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
             cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
             scale: float, window_left: int, window_right: int, bottom_right: bool, dropout_p: float,
             seed: Optional[Tensor], deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = ATTENTION.select(q, k, v, mask, cu_seqlens_q).kernels["backward"](
        dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
        window_right, bottom_right, dropout_p, _seed_value(seed), deterministic)
    return dq, dk, dv


attn_bwd = torch.library.custom_op("mltoolkit::attn_bwd", mutates_args=())(_bwd_impl)


@attn_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, bottom_right, dropout_p, seed, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_OPTIONS = ("mask", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "scale", "window_left",
            "window_right", "bottom_right", "dropout_p", "seed")


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed)
    ctx.options = (max_q, max_k, scale, wl, wr, br, p)
    ctx.set_materialize_grads(False)
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _backward(ctx, dout, dlse, eager=False):
    """The gradients; eager=True (from _EagerAttention) calls the kernels' Python body, not the registered op."""
    if dlse is not None:
        raise RuntimeError("mltoolkit attention: the returned logsumexp is not differentiable; detach it before "
                           "using it in a loss")
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, scale, wl, wr, br, p = ctx.options
    if dout is None:
        dout = torch.zeros_like(out)
    dout = _last_dim_contiguous(dout)  # .sum().backward() hands in an expanded, all-stride-0 gradient
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        bwd = _bwd_impl if eager else torch.ops.mltoolkit.attn_bwd
        dq, dk, dv = bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, p, seed,
                         torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """attn_fwd's forward and backward without the custom-op dispatch (tens of microseconds of host time, as much
    as a short sequence's kernel), for plain eager calls only (see mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, *args):
        out, lse = _fwd_impl(*args)
        _setup_context(ctx, args, (out, lse))
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, eager=True)


def _attn_fwd(*args):
    """torch.ops.mltoolkit.attn_fwd(*args), through _EagerAttention in plain eager mode."""
    q, k, v, mask, cu_q, cu_k, *_, seed = args
    return _ext.call_op(torch.ops.mltoolkit.attn_fwd, _EagerAttention, _fwd_impl, args,
                        (q, k, v, mask, cu_q, cu_k, seed))


# ---- public API -----------------------------------------------------------------------------------------------

def draw_seed() -> Tensor:
    """The dropout seed of one call: an int64 scalar from torch's default generator (so torch.manual_seed makes
    dropout reproducible). Tests draw it the same way to replay a call's mask with reference.dropout_keep."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _check_tensor(fn: str, name: str, t, like: Optional[Tensor] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but query has {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but query is on {like.device}")


def _check_dropout(fn: str, dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    return float(dropout_p)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _additive_mask(fn: str, attn_mask: Tensor, q: Tensor, shape: tuple[int, ...]) -> Tensor:
    """attn_mask (bool: True attends; float: added to the scores) as an additive mask of q's dtype expanded to
    `shape` (stride 0 on broadcast dims, so a key-padding mask stays (B, 1, 1, Lk) in memory)."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{fn}: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device != q.device:
        raise ValueError(f"{fn}: attn_mask is on {attn_mask.device} but query is on {q.device}")
    try:
        torch.broadcast_shapes(attn_mask.shape, shape)
        if attn_mask.dim() > len(shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{fn}: attn_mask of shape {list(attn_mask.shape)} does not broadcast to the attention "
                         f"shape {list(shape)} (batch..., heads, query length, key length)") from None
    if attn_mask.dtype == torch.bool:
        mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
    elif attn_mask.is_floating_point():
        mask = attn_mask.to(q.dtype)
    else:
        raise TypeError(f"{fn}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    return mask.expand(shape)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed flash-style (memory linear in sequence length).

    query (*batch, Hq, Lq, D), key (*batch, Hkv, Lk, D), value (*batch, Hkv, Lk, Dv); 3-D inputs have no head dim.
    attn_mask: bool (True = attend) or additive float, broadcastable to (*batch, Hq, Lq, Lk); a (B, 1, 1, Lk)
    key-padding mask is read in place. is_causal: top-left causal mask (torch's), not combinable with attn_mask.
    dropout_p: drawn from torch's default generator (reproducible under torch.manual_seed), applied whenever > 0
    (as torch does; pass 0.0 in eval). enable_gqa: Hq may be a multiple of Hkv. D and Dv must be <= 256.
    Rows whose keys are all masked give 0, as in torch. Under autocast, inputs are cast as torch casts them for
    SDPA (to the autocast dtype, float64 excepted).
    """
    fn = "scaled_dot_product_attention"
    _check_tensor(fn, "query", query)
    _check_tensor(fn, "key", key, query)
    _check_tensor(fn, "value", value, query)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{fn}: {name} must have at least 2 dims (..., length, head_dim), got {t.dim()}")
    d, dv = query.shape[-1], value.shape[-1]
    if key.shape[-1] != d:
        raise ValueError(f"{fn}: key head_dim {key.shape[-1]} != query head_dim {d}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{fn}: key length {key.shape[-2]} != value length {value.shape[-2]}")
    if max(d, dv) > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim {max(d, dv)} > {MAX_HEAD_DIM} is not supported")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}: attn_mask must be None when is_causal=True")
    dropout_p = _check_dropout(fn, dropout_p)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    (query, key, value), autocast_off = _autocast(query, key, value)
    with autocast_off:
        return _sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _autocast(*tensors: Tensor):
    """Torch lists SDPA among autocast's lower-precision ops: under autocast, inputs other than float64 go to the
    autocast dtype and the op runs with autocast off. Returns the inputs and the context to run in."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors, contextlib.nullcontext()
    if tensors[0].dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        tensors = tuple(t.to(dtype) for t in tensors)
    return tensors, torch.autocast(device_type, enabled=False)


def _sdpa(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    d, dv = query.shape[-1], value.shape[-1]
    q, k, v, out_lead = _broadcast_heads(fn, query, key, value, enable_gqa)
    lq, lk = q.shape[2], k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = _additive_mask(fn, attn_mask, query, (*out_lead, lq, lk)).reshape(q.shape[0], q.shape[1], lq, lk)
    window_right = 0 if is_causal else -1
    seed = draw_seed() if dropout_p > 0 else None

    if dv != d or dropout_p == 1.0 or (isinstance(attn_mask, Tensor) and attn_mask.requires_grad):
        # No kernel covers these; plain torch does, with autograd (and the attention matrix in memory).
        out = _reference_sdpa(q, k, v, mask, scale, window_right, dropout_p, seed)
    else:
        out, _lse = _attn_fwd(q, k, v, mask, None, None, lq, lk, scale, -1, window_right, False, dropout_p, seed)
    return out.reshape(*out_lead, lq, dv)


def _broadcast_heads(fn: str, query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """torch's shape rules: dims before (length, head_dim) broadcast, the last of them being heads, where
    enable_gqa lets query heads be a multiple of key/value heads (one key/value head broadcasts anyway).
    Returns 4-D (B, H, L, D) q, k, v with a contiguous last dim and the output's leading shape."""
    lead = query.shape[:2]
    if query.dim() == key.dim() == value.dim() == 4 and lead == key.shape[:2] == value.shape[:2]:
        # The common call: (B, H, L, D) with the same batch and heads throughout, nothing to broadcast.
        return _last_dim_contiguous(query), _last_dim_contiguous(key), _last_dim_contiguous(value), tuple(lead)
    leads = [t.shape[:-2] if t.dim() > 2 else (1,) for t in (query, key, value)]
    heads = [lead[-1] if lead else 1 for lead in leads]
    hq, hk, hv = heads
    if hk != hv:
        raise ValueError(f"{fn}: key has {hk} heads but value has {hv}")
    try:  # torch.broadcast_shapes costs ~10 us: only where the batch dims differ
        same = leads[0][:-1] == leads[1][:-1] == leads[2][:-1]
        batch = tuple(leads[0][:-1]) if same else torch.broadcast_shapes(*(lead[:-1] for lead in leads))
    except RuntimeError:
        raise ValueError(f"{fn}: batch dims of query {list(leads[0][:-1])}, key {list(leads[1][:-1])} and value "
                         f"{list(leads[2][:-1])} do not broadcast") from None
    if hq != hk and hk != 1 and hq != 1:
        if not enable_gqa:
            raise ValueError(f"{fn}: query has {hq} heads and key/value {hk}; pass enable_gqa=True for "
                             "grouped-query attention")
        if hq % hk != 0:
            raise ValueError(f"{fn}: query heads ({hq}) must be a multiple of key/value heads ({hk}) for GQA")
    out_heads = max(hq, hk)

    def four_d(t: Tensor, h: int) -> Tensor:
        if t.dim() == 4 and tuple(t.shape[:2]) == (*batch, h):  # already (B, H, L, D)
            return _last_dim_contiguous(t)
        t = t.reshape(1, *t.shape) if t.dim() == 2 else t
        t = t.expand(*batch, h, *t.shape[-2:]).reshape(-1, h, *t.shape[-2:])
        return _last_dim_contiguous(t)

    lead_out = (*batch, out_heads) if max(t.dim() for t in (query, key, value)) > 2 else ()
    return four_d(query, out_heads), four_d(key, hk), four_d(value, hk), lead_out


def _reference_sdpa(q, k, v, mask, scale, window_right, dropout_p, seed):
    keep = None
    if dropout_p > 0:
        keep = reference.dropout_keep(int(seed), dropout_p, q.shape[1], q.shape[2], k.shape[2], batch=q.shape[0],
                                      device=q.device)
    if dropout_p == 1.0:
        keep = torch.zeros_like(keep)
        dropout_p = 0.5  # keep is all False: the output is 0 and this only avoids dividing by 1 - 1
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, _ = reference.attention(q, k, v, mask, scale, -1, window_right, False, keep, dropout_p, ct)
    return out.to(q.dtype)


def flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0, causal: bool = False,
                      scale: Optional[float] = None, window_size: Sequence[int] = (-1, -1),
                      return_lse: bool = False):
    """Attention over packed variable-length sequences, as flash_attn.flash_attn_varlen_func.

    q (total_q, Hq, D), k and v (total_k, Hkv, D) with Hq a multiple of Hkv (GQA/MQA). cu_seqlens_q/_k: int32
    cumulative lengths (nseq + 1 entries, from 0); sequence b is rows cu[b]:cu[b+1]. max_seqlen_*: the longest
    sequence. causal and window_size=(left, right) (-1 = unbounded) align the diagonal to the bottom-right of each
    sequence's score matrix, as flash-attn does; causal sets right = 0. Returns out (total_q, Hq, D), plus the
    float32 logsumexp (Hq, total_q) with return_lse (not differentiable). cu_seqlens values are checked, which
    copies them to the host once per call.
    """
    fn = "flash_attn_varlen"
    _check_tensor(fn, "q", q)
    _check_tensor(fn, "k", k, q)
    _check_tensor(fn, "v", v, q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total_tokens, heads, head_dim), got {list(t.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"{fn}: q, k, v must share head_dim, got {d}, {k.shape[-1]}, {v.shape[-1]}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim {d} > {MAX_HEAD_DIM} is not supported")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{fn}: k {list(k.shape)} and v {list(v.shape)} must have the same tokens and heads")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{fn}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{fn}: {name} must be a 1-D int32 tensor with at least 2 entries")
        if cu.device != q.device:
            raise ValueError(f"{fn}: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative int, got {n!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"{fn}: window_size must be (left, right) ints >= -1, got {window_size!r}")
    dropout_p = _check_dropout(fn, dropout_p)
    if dropout_p == 1.0:
        raise ValueError(f"{fn}: dropout_p must be < 1")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    window_left, window_right = window_size
    if causal:
        window_right = 0
    seed = draw_seed() if dropout_p > 0 else None

    as_4d = lambda t: _last_dim_contiguous(t).unsqueeze(0).transpose(1, 2)  # (1, H, total, D) view
    (q, k, v), autocast_off = _autocast(q, k, v)
    with autocast_off:
        out, lse = _attn_fwd(as_4d(q), as_4d(k), as_4d(v), None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, scale, window_left, window_right, True, dropout_p, seed)
    out = out.squeeze(0).transpose(0, 1)
    return (out, lse.squeeze(0)) if return_lse else out
