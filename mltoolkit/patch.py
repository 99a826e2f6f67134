"""Route torch.nn.functional.scaled_dot_product_attention to mltoolkit's, and back.

    mltoolkit.patch_torch()          # F.scaled_dot_product_attention is now mltoolkit's (also inside torch's own
    ...                              # F.multi_head_attention_forward, which looks it up as a module global)
    mltoolkit.unpatch_torch()        # the original builtin again, the very same object
    with mltoolkit.patched_torch(): ...

Only lookups made after patching are routed: a name bound earlier (`from torch.nn.functional import
scaled_dot_product_attention`) keeps torch's function, and TorchScript code keeps calling torch's builtin. Calls
outside mltoolkit's domain run torch's original, so patched code computes what it computed before; see
`scaled_dot_product_attention` below. torch.nn.attention.sdpa_kernel() backend choices do not apply to the calls
mltoolkit serves (use mltoolkit.backend(...) for those).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mltoolkit.ops import attention as attention_ops

# Saved at import, before anything here can have replaced it; the fallback of every patched call.
_TORCH_SDPA = F.scaled_dot_product_attention
# What F.scaled_dot_product_attention was when patch_torch() replaced it (restored by unpatch_torch()).
_replaced = None


def _why_torch(query, key, value, attn_mask) -> Optional[str]:
    """Why a call goes to torch's original (None: mltoolkit serves it). The cases are those mltoolkit's op rejects
    and torch may accept, or that only torch's dispatch handles; torch then computes the call or raises its own
    error, as it would unpatched."""
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if not all(isinstance(t, Tensor) for t in tensors):
        return "an argument is not a Tensor"
    if torch.overrides.has_torch_function(tensors):
        return "tensor subclass with __torch_function__"
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    if query.dtype not in attention_ops.SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtypes"
    if any(t.device != query.device for t in tensors):
        return "devices differ"
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        return "fewer than 3 dims, or different numbers of dims"
    if key.shape[:-3] != query.shape[:-3] or value.shape[:-3] != query.shape[:-3]:
        return "batch dims that broadcast"
    if max(query.shape[-1], value.shape[-1]) > attention_ops.MAX_HEAD_DIM:
        return f"head_dim > {attention_ops.MAX_HEAD_DIM}"
    if attn_mask is not None and ((attn_mask.dtype != torch.bool and not attn_mask.is_floating_point())
                                  or attn_mask.dim() > query.dim()):
        return "attn_mask dtype or rank"
    return None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention (same signature and semantics) served by
    mltoolkit.ops.scaled_dot_product_attention where it can: plain tensors of one floating dtype and device, at
    least 3 dims with equal batch dims, head dims <= 256. Anything else (nested tensors, tensor subclasses, integer
    dtypes, broadcast batch dims, 2-D inputs, head_dim > 256...) runs torch's original. Under autocast the inputs
    are cast as torch's autocast casts them for this op (to the autocast dtype, float64 excepted). Dropout draws
    mltoolkit's mask (reproducible under torch.manual_seed, not the same mask as torch's)."""
    if _why_torch(query, key, value, attn_mask) is not None:
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    return attention_ops.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                      is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def is_patched() -> bool:
    return F.scaled_dot_product_attention is scaled_dot_product_attention


def patch_torch() -> None:
    """Make torch.nn.functional.scaled_dot_product_attention mltoolkit's (idempotent)."""
    global _replaced
    if is_patched():
        return
    _replaced = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention


def unpatch_torch() -> None:
    """Put back the function patch_torch() replaced, the same object (idempotent). Does nothing when someone else
    has since replaced F.scaled_dot_product_attention: theirs stays."""
    global _replaced
    if is_patched():
        F.scaled_dot_product_attention = _replaced
        _replaced = None


@contextlib.contextmanager
def patched_torch() -> Iterator[None]:
    """patch_torch() for the block; on exit, unpatched again unless it was already patched on entry."""
    was_patched = is_patched()
    patch_torch()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_torch()
