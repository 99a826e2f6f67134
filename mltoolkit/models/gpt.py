"""Decoder-only language models with transformers' module trees and state_dict keys, so Hugging Face checkpoints
load unchanged (mltoolkit.models.hf.from_pretrained):

- GPT-2 (Radford et al. 2019): GPT2Model / GPT2LMHeadModel. Learned positions, pre-LayerNorm blocks, GELU (tanh)
  MLP, Conv1D projections whose weight is (in, out), LM head tied to the token embeddings.
- The modern variant, Llama-style: LlamaModel / LlamaForCausalLM. RMSNorm, rotary position embedding (mltoolkit's
  rotary op, half-split as in transformers' rotate_half), SwiGLU MLP, grouped-query attention.

Both run mltoolkit's flash-style attention op (causal, bottom-right aligned so that a KV cache needs no mask, a
key-padding mask read in place for left padding), mltoolkit's fused residual-add + norm kernels, and generate()
from mltoolkit.models.generation (greedy, temperature, top-k, top-p, KV cache).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mltoolkit import nn as mnn
from mltoolkit.models.bert import activation, linear_act
from mltoolkit.models.generation import GenerationMixin, KVCache
from mltoolkit.models.hf import Config, PreTrainedModel, architecture
from mltoolkit.models.outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from mltoolkit.models.registry import register_model
from mltoolkit.ops import attention as attention_ops
from mltoolkit.ops import norm as norm_ops
from mltoolkit.ops.loss import cross_entropy
from mltoolkit.ops.rotary import apply_rotary_emb

# ---- shared pieces --------------------------------------------------------------------------------------------

def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                     dropout_p: float = 0.0) -> Tensor:
    """Causal attention of q (B, Hq, Lq, D) over k, v (B, Hkv, Lk, D), Lk >= Lq, the queries being the last Lq
    positions (bottom-right aligned, as with a KV cache). mask: additive (B, 1, 1, Lk) key-padding mask or None.
    Hq may be a multiple of Hkv (GQA). Returns (B, Hq, Lq, D)."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    if mask is not None:
        mask = mask.to(q.dtype).expand(b, hq, lq, lk)
    seed = attention_ops.draw_seed() if dropout_p > 0 else None
    out, _ = attention_ops._attn_fwd(q, k, v, mask, None, None, lq, lk, scale, -1, 0, True, dropout_p, seed)
    return out


def decoder_padding_mask(attention_mask: Optional[Tensor], dtype: torch.dtype, key_length: int) -> Optional[Tensor]:
    """(B, Lk) 1 = token, 0 = padding over every key (cached and new) -> additive (B, 1, 1, Lk), or None when
    nothing is padded (checked in eager mode only)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] != key_length:
        raise ValueError(f"attention_mask must be (batch, past + new tokens) = (batch, {key_length}), got "
                         f"{list(attention_mask.shape)}")
    if not torch.compiler.is_compiling() and bool(attention_mask.bool().all()):
        return None
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def _check_ids(fn: str, input_ids, max_positions: Optional[int], past: int) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"{fn}: input_ids must be an integer tensor (batch, seq), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if max_positions is not None and past + input_ids.shape[1] > max_positions:
        raise ValueError(f"{fn}: {past} cached + {input_ids.shape[1]} new tokens exceed the model's "
                         f"{max_positions} positions")


def _lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy in float32: logits[:, i] predicts labels[:, i + 1]; -100 is ignored. The labels are
    shifted (padded with -100) rather than the logits sliced, and the fused loss reads the logits where they are
    (_lm_head's padded ones included), so the (tokens, vocab) logits are neither copied nor upcast."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    return cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, out_dtype=torch.float32)


# cuBLAS runs GEMMs over a dimension that is not a multiple of 8 with its slow align1 kernels: GPT-2's 50257-word
# LM head (logits, and both gradients) took 15.5 ms of a 47 ms train step on an H100 (2026-11-27). As Inductor's
# pad_mm does, a CUDA head with many rows runs on the vocabulary padded to a multiple of 64. The padding's logits are
# -inf (a bias), so the loss reads the padded logits whole: the same softmax cross-entropy, a zero gradient in the
# padding, and no slice between the GEMM and the loss (whose backward would zero-fill and copy the logits' gradient).
# The logits returned are the first vocab columns. Few rows (decoding) keep the plain GEMM: there the padded weight
# copy would cost more than the alignment saves.
_VOCAB_ALIGN = 64
_PAD_HEAD_MIN_ROWS = 256


def _lm_head(h: Tensor, head: nn.Linear) -> tuple[Tensor, Tensor]:
    """(logits, the logits the loss reads): the same tensor, or a slice of the padded logits and the padded ones."""
    vocab = head.weight.shape[0]
    pad = -vocab % _VOCAB_ALIGN
    if pad == 0 or not h.is_cuda or h.numel() < _PAD_HEAD_MIN_ROWS * h.shape[-1]:
        logits = _linear(h, head)
        return logits, logits
    return _padded_head(h, head.weight, head.bias, pad)


def _padded_head(h: Tensor, weight: Tensor, bias: Optional[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    """F.linear(h, weight, bias) over `pad` more rows of zero weight and -inf bias: (its first weight.shape[0]
    columns, the padded logits)."""
    vocab = weight.shape[0]
    padded_bias = F.pad(weight.new_zeros(vocab) if bias is None else bias, (0, pad), value=float("-inf"))
    full = F.linear(h, F.pad(weight, (0, 0, 0, pad)), padded_bias)
    return full[..., :vocab], full


def _linear(x: Tensor, module: nn.Linear, act: str = "none") -> Tensor:
    return linear_act(x, module.weight, module.bias, act)


def _positions(position_ids: Optional[Tensor], past: int, seq: int, device) -> Tensor:
    if position_ids is None:
        return torch.arange(past, past + seq, device=device).unsqueeze(0)
    return position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)


# ---- GPT-2 ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GPT2Config(Config):
    """transformers.GPT2Config's fields and defaults (gpt2 small)."""

    model_type = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.add_cross_attention:
            raise NotImplementedError("GPT2Config: cross-attention is not supported")
        activation(self.activation_function)


class Conv1D(nn.Module):
    """transformers' Conv1D: a linear layer whose weight is stored (in_features, out_features)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def _init_extra(self):
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, act: str = "none") -> Tensor:
        return linear_act(x, self.weight.t(), self.bias, act)


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        e = config.n_embd
        self.num_heads, self.head_dim, self.layer_idx = config.n_head, e // config.n_head, layer_idx
        self.c_attn = Conv1D(3 * e, e)
        self.c_proj = Conv1D(e, e)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x: Tensor, mask: Optional[Tensor], cache: Optional[KVCache]) -> Tensor:
        b, seq, e = x.shape
        qkv = self.c_attn(x).view(b, seq, 3, self.num_heads, self.head_dim)
        # (B, H, L, D) views. unbind, not indexing: its backward stacks dq, dk, dv into one tensor, where three
        # SelectBackwards each zero-fill a whole qkv-sized gradient and two adds sum them (~1.3 ms a GPT-2 small
        # train step on an H100, from the 2026-11-27 profile)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        p = self.attn_dropout.p if self.training else 0.0
        out = causal_attention(q, k, v, mask, self.scale, p)
        return self.resid_dropout(self.c_proj(out.transpose(1, 2).reshape(b, seq, e)))


class GPT2MLP(nn.Module):
    def __init__(self, inner: int, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.act_name = config.activation_function
        self.act = activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.c_fc(x, self.act_name)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.ln_1 = mnn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = mnn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner, config)

    def forward(self, x: Tensor, mask: Optional[Tensor], cache: Optional[KVCache]) -> Tensor:
        a = self.attn(self.ln_1(x), mask, cache)
        # under autocast the attention output is bf16/fp16 while the residual stream stays float32
        h, x = norm_ops.add_layer_norm(a.to(x.dtype), x, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        return x + self.mlp(h)


@architecture
class GPT2Model(PreTrainedModel):
    """transformers.GPT2Model. forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None,
    use_cache=False) -> BaseModelOutputWithPast."""

    config_class = GPT2Config
    base_model_prefix = "transformer"

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = mnn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.init_weights()
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, output_hidden_states: bool = False) -> BaseModelOutputWithPast:
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = cache.length if cache is not None else 0
        _check_ids(type(self).__name__, input_ids, self.config.n_positions, past)
        seq = input_ids.shape[1]
        pos = _positions(position_ids, past, seq, input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        mask = decoder_padding_mask(attention_mask, x.dtype, past + seq)
        states = [x] if output_hidden_states else None
        for block in self.h:
            x = block(x, mask, cache)
            if states is not None:
                states.append(x)
        x = self.ln_f(x)
        if states is not None:
            states[-1] = x
        if cache is not None:
            cache.advance(seq)
        return BaseModelOutputWithPast(x, cache, tuple(states) if states is not None else None)


class _CausalLM(GenerationMixin, PreTrainedModel):
    """Trunk + lm_head; forward returns CausalLMOutputWithPast."""

    trunk_name = ""

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, labels: Optional[Tensor] = None, output_hidden_states: bool = False,
                logits_to_keep: int = 0, cache: Optional[KVCache] = None) -> CausalLMOutputWithPast:
        """input_ids (B, L); attention_mask (B, past + L), 1 = token, 0 = padding (left padding for generation);
        position_ids (B, L) (default past..past+L-1); past_key_values (or cache, transformers 5's name): a KVCache
        (updated in place and returned); labels (B, L): next-token loss (shifted inside, -100 ignored);
        logits_to_keep > 0: logits of the last positions only."""
        if past_key_values is None:
            past_key_values = cache
        out = getattr(self, self.trunk_name)(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                             output_hidden_states)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits, loss_logits = _lm_head(h, self.lm_head)
        loss = _lm_loss(loss_logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states)


@architecture
class GPT2LMHeadModel(_CausalLM):
    """transformers.GPT2LMHeadModel: GPT2Model + lm_head tied to wte; generate() for decoding."""

    config_class = GPT2Config
    base_model_prefix = "transformer"
    trunk_name = "transformer"
    tied_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight


# ---- Llama-style ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LlamaConfig(Config):
    """transformers.LlamaConfig's fields and defaults (RMSNorm, RoPE, SwiGLU, GQA). rope_parameters (transformers
    5) or rope_theta (older configs); only the default rope type is supported."""

    model_type = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_parameters: Optional[dict] = None
    rope_theta: Optional[float] = None
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    pretraining_tp: int = 1

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig: hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.rope_parameters is None:
            self.rope_parameters = dict(self.rope_scaling or {})
            self.rope_parameters.setdefault("rope_type", self.rope_parameters.pop("type", "default"))
            self.rope_parameters.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else 1e4)
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise NotImplementedError(f"LlamaConfig: rope_type {rope_type!r} is not supported (only 'default')")
        if self.pretraining_tp != 1:
            raise NotImplementedError("LlamaConfig: pretraining_tp != 1 is not supported")
        activation(self.hidden_act)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for k in ("rope_theta", "rope_scaling"):  # folded into rope_parameters
            if d[k] is None:
                d.pop(k)
        return d


class LlamaRotaryEmbedding(nn.Module):
    """cos / sin tables (float32) of the default RoPE at given positions: angle = position * theta^(-2i / dim)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        dim, theta = config.head_dim, float(config.rope_parameters["rope_theta"])
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _init_extra(self):
        pass

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids (B, L) -> cos, sin of shape (B * L, dim / 2)."""
        freqs = position_ids.reshape(-1, 1).float() * self.inv_freq.float()
        return freqs.cos(), freqs.sin()


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        e, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(e, self.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(e, self.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(e, self.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, e, bias=config.attention_bias)
        self.dropout = config.attention_dropout
        self.scale = d ** -0.5

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Optional[Tensor],
                cache: Optional[KVCache]) -> Tensor:
        b, seq, _ = x.shape
        cos, sin = rope
        d = self.head_dim
        # Rotate with batch and sequence flattened, so each row can have its own positions (left padding).
        q = apply_rotary_emb(_linear(x, self.q_proj).view(1, b * seq, self.num_heads, d), cos, sin)
        k = apply_rotary_emb(_linear(x, self.k_proj).view(1, b * seq, self.num_kv_heads, d), cos, sin)
        q = q.view(b, seq, self.num_heads, d).transpose(1, 2)
        k = k.view(b, seq, self.num_kv_heads, d).transpose(1, 2)
        v = _linear(x, self.v_proj).view(b, seq, self.num_kv_heads, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = causal_attention(q, k, v, mask, self.scale, self.dropout if self.training else 0.0)
        return _linear(out.transpose(1, 2).reshape(b, seq, self.num_heads * d), self.o_proj)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        e, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(e, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(e, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, e, bias=config.mlp_bias)
        self.act_name = config.hidden_act
        self.act_fn = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        gate = _linear(x, self.gate_proj, self.act_name)
        return _linear(gate * _linear(x, self.up_proj), self.down_proj)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = mnn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = mnn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: Tensor, rope, mask: Optional[Tensor], cache: Optional[KVCache]) -> Tensor:
        a = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        n = self.post_attention_layernorm
        h, x = norm_ops.add_rms_norm(a.to(x.dtype), x, n.weight, n.eps)
        return x + self.mlp(h)


@architecture
class LlamaModel(PreTrainedModel):
    """transformers.LlamaModel. forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None,
    use_cache=False) -> BaseModelOutputWithPast."""

    config_class = LlamaConfig
    base_model_prefix = "model"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = mnn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, output_hidden_states: bool = False) -> BaseModelOutputWithPast:
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = cache.length if cache is not None else 0
        _check_ids(type(self).__name__, input_ids, None, past)
        b, seq = input_ids.shape
        pos = _positions(position_ids, past, seq, input_ids.device).expand(b, seq)
        rope = self.rotary_emb(pos)
        x = self.embed_tokens(input_ids)
        mask = decoder_padding_mask(attention_mask, x.dtype, past + seq)
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
            if states is not None:
                states.append(x)
        x = self.norm(x)
        if states is not None:
            states[-1] = x
        if cache is not None:
            cache.advance(seq)
        return BaseModelOutputWithPast(x, cache, tuple(states) if states is not None else None)


@architecture
class LlamaForCausalLM(_CausalLM):
    """transformers.LlamaForCausalLM: LlamaModel + lm_head (tied when tie_word_embeddings); generate()."""

    config_class = LlamaConfig
    base_model_prefix = "model"
    trunk_name = "model"
    tied_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


# ---- builders (kwargs override config fields; the lead registers MODELS with mltoolkit.models.registry) --------

def _builder(cls, config_cls, **defaults):
    def build(config: Optional[Config] = None, **kwargs) -> PreTrainedModel:
        cfg = config if config is not None else config_cls(**defaults)
        return cls(cfg.replace(**kwargs) if kwargs else cfg)
    build.__name__ = f"{cls.__name__}_builder"
    build.model_class = cls  # what a Hugging Face folder loads as (create_model(name, pretrained_path=folder))
    build.__doc__ = f"{cls.__name__} with config {defaults}; keyword arguments override config fields."
    return build


# Sizes stop at ~350M parameters so that building every registered model (registry-wide tests) stays affordable;
# larger checkpoints load through from_pretrained, which takes the sizes from config.json.
_GPT2 = {"gpt2": {}, "gpt2_medium": dict(n_embd=1024, n_layer=24, n_head=16),
         "gpt2_tiny": dict(vocab_size=1024, n_positions=256, n_embd=128, n_layer=2, n_head=2)}
_LLAMA = {
    "llama_tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "llama_small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
}

MODELS = {name: _builder(GPT2LMHeadModel, GPT2Config, **cfg) for name, cfg in _GPT2.items()}
MODELS.update({name: _builder(LlamaForCausalLM, LlamaConfig, **cfg) for name, cfg in _LLAMA.items()})

for _name, _build in MODELS.items():
    register_model(_build, name=_name, family="llama" if _name.startswith("llama") else "gpt2", input_kind="tokens",
                   hf_class=_build.model_class)
