"""MultiheadAttention as a subclass of torch's: same constructor, parameters, state_dict keys and outputs, with the
attention itself computed by mltoolkit.ops.scaled_dot_product_attention (flash-style, no (L, S) matrix in memory)."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mltoolkit.ops import attention as attention_ops


def _additive_mask(mask, name: str, query: Tensor, shapes: tuple[tuple[int, ...], ...]) -> Optional[Tensor]:
    """An nn.MultiheadAttention mask (bool: True = NOT allowed, the opposite of SDPA's; float: added to the scores)
    as an additive float mask, as torch's F._canonical_mask makes it (bool -> query's dtype, float unchanged)."""
    if mask is None:
        return None
    fn = "MultiheadAttention"
    if not isinstance(mask, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.device != query.device:
        raise ValueError(f"{fn}: {name} is on {mask.device} but query is on {query.device}")
    if tuple(mask.shape) not in shapes:
        expected = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{fn}: {name} has shape {list(mask.shape)}, expected {expected}")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=query.dtype).masked_fill_(mask, -math.inf)
    if not mask.is_floating_point():
        raise TypeError(f"{fn}: {name} must be bool or floating point, got {mask.dtype}")
    return mask


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs through mltoolkit.ops.scaled_dot_product_attention.

    Constructor, forward signature, outputs and state_dict are torch's; `from_torch` wraps an existing module without
    copying its parameters. Calls with need_weights=False (what nn.Transformer* layers pass) take the fused path:
    in-projection, one attention call with key_padding_mask and attn_mask merged as torch merges them (a
    key_padding_mask alone reaches the kernel as a (B, 1, 1, S) mask, never expanded to (B, H, L, S)), out-projection.
    Dropout (self.dropout, in training only) draws mltoolkit's Philox mask, reproducible under torch.manual_seed but
    not the same mask as torch's. is_causal is torch's hint: it requires attn_mask, and with no key_padding_mask the
    kernel applies its own causal mask in place of attn_mask.

    Everything else runs torch's own forward (super().forward), so the result is torch's: need_weights=True (the
    kernel never forms the attention matrix), add_bias_kv, add_zero_attn, nested tensors, tensor subclasses, dtypes
    the op does not take, head_dim > 256. Note that nn.TransformerEncoderLayer in eval mode without autograd may take
    torch's fused "fast path", which reads self_attn's weights directly and never calls this forward; that result is
    torch's and correct. In training this forward runs.

    Bad input on the fused path raises ValueError / TypeError naming the argument (torch raises AssertionError or
    RuntimeError for most of the same cases); is_causal=True without attn_mask raises RuntimeError, as torch does.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self._why_not_fused(query, key, value, need_weights) is not None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _why_not_fused(self, query, key, value, need_weights: bool) -> Optional[str]:
        """Why this call goes to torch's forward, or None when the fused path takes it."""
        if need_weights:
            return "need_weights=True asks for the attention matrix, which the fused kernel never forms"
        if self.bias_k is not None or self.bias_v is not None:
            return "add_bias_kv"
        if self.add_zero_attn:
            return "add_zero_attn"
        if not all(isinstance(t, Tensor) for t in (query, key, value)):
            return "query, key and value are not all Tensors (torch's forward reports it)"
        if any(t.is_nested for t in (query, key, value)):
            return "nested tensors"
        if torch.overrides.has_torch_function((query, key, value)):
            return "tensor subclasses with __torch_function__"
        if query.dtype not in attention_ops.SUPPORTED_DTYPES:
            return f"dtype {query.dtype}"
        if self.head_dim > attention_ops.MAX_HEAD_DIM:
            return f"head_dim {self.head_dim} > {attention_ops.MAX_HEAD_DIM}"
        return None

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        fn = "MultiheadAttention"
        if query.dim() not in (2, 3):
            raise ValueError(f"{fn}: query must be 2-D (L, E) unbatched or 3-D batched, got shape {list(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{fn}: key and value must have query's {query.dim()} dims, got {key.dim()} and "
                             f"{value.dim()}")
        for name, t, features, attr in (("query", query, self.embed_dim, "embed_dim"), ("key", key, self.kdim, "kdim"),
                                        ("value", value, self.vdim, "vdim")):
            if t.shape[-1] != features:
                raise ValueError(f"{fn}: {name} has {t.shape[-1]} features but {attr} is {features}")
            if t.device != query.device:
                raise ValueError(f"{fn}: {name} is on {t.device} but query is on {query.device}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{fn}: key {list(key.shape)} and value {list(value.shape)} must agree on sequence "
                             "length and batch size")
        batch_dim = 0 if self.batch_first else 1
        if query.dim() == 3 and key.shape[batch_dim] != query.shape[batch_dim]:
            raise ValueError(f"{fn}: query has batch size {query.shape[batch_dim]} but key has {key.shape[batch_dim]}")
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        if not torch.is_autocast_enabled(query.device.type):  # autocast casts inputs and weights itself
            for name, t in (("query", query), ("key", key), ("value", value)):
                if t.dtype != weight.dtype:
                    raise TypeError(f"{fn}: {name} has dtype {t.dtype} but the module's parameters are "
                                    f"{weight.dtype}")

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v))
        w = self.in_proj_weight
        if query is key and key is value:  # self-attention: one GEMM for q, k and v
            return F.linear(query, w, self.in_proj_bias).chunk(3, dim=-1)
        if key is value:  # encoder-decoder attention: one GEMM for k and v
            b_kv = None if self.in_proj_bias is None else self.in_proj_bias[e:]
            return (F.linear(query, w[:e], b_q), *F.linear(key, w[e:], b_kv).chunk(2, dim=-1))
        w_q, w_k, w_v = w.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                       attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        self._check_inputs(query, key, value)
        batched = query.dim() == 3
        # Project first (so `query is key` still selects the packed GEMM), then work batch-first, (B, L, E), on views.
        projected = self._in_projection(query, key, value)
        if not batched:
            q, k, v = (t.unsqueeze(0) for t in projected)
        elif self.batch_first:
            q, k, v = projected
        else:
            q, k, v = (t.transpose(0, 1) for t in projected)
        bsz, tgt_len, _ = q.shape
        src_len = k.shape[1]
        h, d = self.num_heads, self.head_dim
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)

        kpm_shape = (bsz, src_len) if batched else (src_len,)
        kpm = _additive_mask(key_padding_mask, "key_padding_mask", query, (kpm_shape,))
        am = _additive_mask(attn_mask, "attn_mask", query, ((tgt_len, src_len), (bsz * h, tgt_len, src_len)))
        if kpm is not None and am is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=3)  # torch's warning, same text
        if is_causal and am is None:
            raise RuntimeError("MultiheadAttention: is_causal=True is a hint that attn_mask is causal and needs "
                               "attn_mask (torch.nn.Transformer.generate_square_subsequent_mask makes one)")
        if is_causal and kpm is None:
            # torch's rule: the hint replaces the mask, and the kernel masks causally without reading it.
            mask = None
        else:
            is_causal = False
            mask = None if am is None else am.view(1, 1, tgt_len, src_len) if am.dim() == 2 else am.view(
                bsz, h, tgt_len, src_len)
            if kpm is not None:
                kpm = kpm.view(bsz, 1, 1, src_len)
                mask = kpm if mask is None else mask + kpm
        # Under autocast the op casts q, k, v and runs with autocast off, as autocast runs torch's SDPA.
        out = attention_ops.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                         dropout_p=self.dropout if self.training else 0.0,
                                                         is_causal=is_causal)
        # Out-project in (L, B, E) as torch does, so the result has torch's memory layout too.
        out = F.linear(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim), self.out_proj.weight,
                       self.out_proj.bias)
        if not batched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> MultiheadAttention:
        """A MultiheadAttention sharing `module`'s parameters and submodules (no copy), so optimizers keep working."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new
