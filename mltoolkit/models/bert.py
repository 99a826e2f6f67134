"""BERT (Devlin et al. 2018) as transformers' BertModel, BertForMaskedLM and BertForSequenceClassification: same
constructor config fields, module tree, state_dict keys and outputs, so Hugging Face checkpoints load unchanged
(mltoolkit.models.hf.from_pretrained). Inside: mltoolkit's flash-style attention with the padding mask read in place
as a (B, 1, 1, L) mask, and fused residual-add + LayerNorm after each sub-layer.

    model = from_pretrained("bert-folder")            # BertModel, BertForMaskedLM, ... from config.json
    out = model(input_ids, attention_mask=mask, token_type_ids=types)
    out.last_hidden_state, out.pooler_output          # or out["last_hidden_state"], out[0]
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mltoolkit import _ext
from mltoolkit import nn as mnn
from mltoolkit.models.hf import Config, PreTrainedModel, architecture
from mltoolkit.models.outputs import BaseModelOutputWithPooling, MaskedLMOutput, SequenceClassifierOutput
from mltoolkit.models.registry import register_model
from mltoolkit.ops import attention as attention_ops
from mltoolkit.ops import norm as norm_ops
from mltoolkit.ops.loss import cross_entropy


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
               "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


def activation(name) -> callable:
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# oneDNN's post-op names for the activations above (inference GEMM with the activation in its epilogue)
_ONEDNN_ACT = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
               "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_fast": ("gelu", "tanh"), "relu": ("relu", ""),
               "silu": ("swish", ""), "swish": ("swish", ""), "tanh": ("tanh", "")}
# Set to False to time or debug the plain F.linear path.
USE_ONEDNN_LINEAR = _ext.onednn_linear_available()


def _onednn_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return (USE_ONEDNN_LINEAR and torch.backends.mkldnn.enabled and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and not _ext.needs_grad(x, weight, bias)
            and _ext.onednn_linear_traceable(x, weight, bias))


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act="none") -> Tensor:
    """act(x @ weight.T + bias). In fp32 CPU inference, eager or compiled, this is one oneDNN GEMM with the
    activation (and bias) in its epilogue, which measured ~1.2x faster than F.linear's MKL GEMM at BERT-base sizes
    and saves the activation's pass over memory; training, other dtypes and devices use F.linear followed by the
    activation."""
    if isinstance(act, str) and act in _ONEDNN_ACT and _onednn_ok(x, weight, bias):
        name, algorithm = _ONEDNN_ACT[act]
        return _ext.onednn_linear(x, weight, bias, name, algorithm)
    y = F.linear(x, weight, bias)
    return y if act == "none" else activation(act)(y)


@dataclasses.dataclass
class BertConfig(Config):
    """transformers.BertConfig's fields and defaults (bert-base-uncased)."""

    model_type = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: Optional[float] = None
    num_labels: int = 2
    problem_type: Optional[str] = None
    tie_word_embeddings: bool = True
    is_decoder: bool = False
    add_cross_attention: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.position_embedding_type != "absolute":
            raise NotImplementedError(f"BertConfig: position_embedding_type {self.position_embedding_type!r} is not "
                                      "supported (only 'absolute')")
        if self.is_decoder or self.add_cross_attention:
            raise NotImplementedError("BertConfig: decoder / cross-attention BERT is not supported")
        activation(self.hidden_act)

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        d = dict(d)
        if "num_labels" not in d and isinstance(d.get("id2label"), dict):
            d["num_labels"] = len(d["id2label"])
        return super().from_dict(d)

    def to_dict(self) -> dict:
        d = super().to_dict()
        if not isinstance(d.get("id2label"), dict) or len(d["id2label"]) != self.num_labels:
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        d.pop("num_labels")
        return d


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = mnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)
        x = self.word_embeddings(input_ids)
        # word + position + token type, then LayerNorm: the last add is fused into the norm
        extra = self.position_embeddings(position_ids)
        if token_type_ids is None:
            extra = extra + self.token_type_embeddings.weight[0]
        else:
            extra = extra + self.token_type_embeddings(token_type_ids)
        x, _ = norm_ops.add_layer_norm(x, extra.expand_as(x), self.LayerNorm.weight, self.LayerNorm.bias,
                                       self.LayerNorm.eps)
        return self.dropout(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        b, seq, width = x.shape
        heads = (b, seq, self.num_attention_heads, self.attention_head_size)
        q, k, v = (linear_act(x, lin.weight, lin.bias).view(heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        p = self.dropout.p if self.training else 0.0
        out = attention_ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).reshape(b, seq, width)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = mnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        # under autocast the GEMM gives bf16/fp16 while the residual stream stays float32, as in transformers
        h = self.dropout(linear_act(hidden, self.dense.weight, self.dense.bias)).to(residual.dtype)
        return norm_ops.add_layer_norm(h, residual, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)[0]


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return linear_act(x, self.dense.weight, self.dense.bias, self.hidden_act)


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: Tensor) -> Tensor:
        return linear_act(hidden[:, 0], self.dense.weight, self.dense.bias, "tanh")


def _check_inputs(fn: str, config: BertConfig, input_ids, attention_mask, token_type_ids) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"{fn}: input_ids must be an integer tensor (batch, seq), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{fn}: sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != tuple(input_ids.shape)):
            raise ValueError(f"{fn}: {name} must have input_ids' shape {list(input_ids.shape)}, got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def padding_mask(attention_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """(B, L) 1 = token, 0 = padding -> additive (B, 1, 1, L) mask (0 / -inf), or None when nothing is padded
    (checked only in eager mode; a compiled graph keeps the mask)."""
    if attention_mask is None:
        return None
    if not torch.compiler.is_compiling() and bool(attention_mask.bool().all()):
        return None
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


@architecture
class BertModel(PreTrainedModel):
    """transformers.BertModel: embeddings, encoder, optional pooler. forward returns BaseModelOutputWithPooling."""

    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                output_hidden_states: bool = False, return_dict: bool = True) -> BaseModelOutputWithPooling:
        """input_ids (B, L) int; attention_mask (B, L), 1 = token, 0 = padding; token_type_ids (B, L) segment
        ids (default 0); position_ids (B, L) or (L,) (default 0..L-1)."""
        _check_inputs(type(self).__name__, self.config, input_ids, attention_mask, token_type_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        mask = padding_mask(attention_mask, x.dtype)
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x, mask)
            if states is not None:
                states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(x, pooled, tuple(states) if states is not None else None)
        return out if return_dict else out.to_tuple()


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.hidden_act = config.hidden_act
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = mnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(linear_act(x, self.dense.weight, self.dense.bias, self.hidden_act))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: Tensor) -> Tensor:
        return linear_act(self.transform(x), self.decoder.weight, self.decoder.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


@architecture
class BertForMaskedLM(PreTrainedModel):
    """transformers.BertForMaskedLM: BertModel without pooler + the MLM head (decoder tied to the word embeddings).
    forward returns MaskedLMOutput (loss with labels, -100 ignored)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    tied_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()
        nn.init.zeros_(self.cls.predictions.bias)
        if config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def active_tied_keys(self) -> dict[str, str]:
        return {**super().active_tied_keys(), "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, output_hidden_states: bool = False,
                return_dict: bool = True) -> MaskedLMOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.cls.predictions(out.last_hidden_state)
        loss = None
        if labels is not None:
            # fused, in float32, without a float32 copy of the (tokens, vocab) logits
            loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, out_dtype=torch.float32)
        result = MaskedLMOutput(loss, logits, out.hidden_states)
        return result if return_dict else result.to_tuple()


@architecture
class BertForSequenceClassification(PreTrainedModel):
    """transformers.BertForSequenceClassification: pooled output -> dropout -> classifier (num_labels).
    forward returns SequenceClassifierOutput; with labels the loss follows config.problem_type as transformers
    does (regression for num_labels == 1, cross-entropy for integer labels, BCE with logits otherwise)."""

    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, output_hidden_states: bool = False,
                return_dict: bool = True) -> SequenceClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float()) if self.num_labels == 1 \
                    else F.mse_loss(logits.float(), labels.float())
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        result = SequenceClassifierOutput(loss, logits, out.hidden_states)
        return result if return_dict else result.to_tuple()


# ---- builders (kwargs override config fields; the lead registers MODELS with mltoolkit.models.registry) --------

def _builder(cls, **defaults):
    def build(config: Optional[BertConfig] = None, **kwargs) -> PreTrainedModel:
        cfg = config if config is not None else BertConfig(**defaults)
        return cls(cfg.replace(**kwargs) if kwargs else cfg)
    build.__name__ = f"{cls.__name__}_builder"
    build.model_class = cls  # what a Hugging Face folder loads as (create_model(name, pretrained_path=folder))
    build.__doc__ = f"{cls.__name__} with config {defaults or 'bert-base'}; keyword arguments override config fields."
    return build


_BASE = {}
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
_TINY = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
             max_position_embeddings=128)

MODELS = {
    "bert_base": _builder(BertModel, **_BASE),
    "bert_large": _builder(BertModel, **_LARGE),
    "bert_tiny": _builder(BertModel, **_TINY),
    "bert_base_mlm": _builder(BertForMaskedLM, **_BASE),
    "bert_base_classifier": _builder(BertForSequenceClassification, **_BASE),
    "bert_tiny_mlm": _builder(BertForMaskedLM, **_TINY),
    "bert_tiny_classifier": _builder(BertForSequenceClassification, **_TINY),
}

for _name, _build in MODELS.items():
    register_model(_build, name=_name, family="bert", input_kind="tokens", hf_class=_build.model_class)
