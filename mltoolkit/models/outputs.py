"""Model outputs shaped like transformers' ModelOutput: dataclasses whose fields read as attributes (`out.logits`),
as dict entries (`out["logits"]`, `out.keys()`) or by position over the fields that are set (`out[0]`,
`out.to_tuple()`), so code written against transformers runs unchanged."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from torch import Tensor


@dataclass
class ModelOutput:
    """Base of the output dataclasses. Fields left None are absent from keys(), items() and integer indexing,
    as in transformers."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no field {key!r} set; set fields: {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    """Encoder output: last_hidden_state (B, L, H); pooler_output (B, H) (tanh(dense(first token))) when the model
    has a pooler; hidden_states: the embeddings and each layer's output, with output_hidden_states=True."""

    last_hidden_state: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    """Decoder trunk output: last_hidden_state (B, L, H); past_key_values: the KVCache when use_cache=True."""

    last_hidden_state: Optional[Tensor] = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    """loss (with labels; -100 = ignored), logits (B, L, vocab)."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    """loss (with labels: cross-entropy, or MSE when num_labels == 1), logits (B, num_labels)."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    """loss (with labels: next-token cross-entropy, labels shifted inside, -100 ignored), logits (B, L, vocab),
    past_key_values: the KVCache when use_cache=True."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple[Tensor, ...]] = None
