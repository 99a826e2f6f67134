"""Quantization configs: versioned dataclasses that say how a layer is quantized and serialize to plain dicts (saved
beside a quantized model's weights, so that loading rebuilds the same modules)."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

from torch import nn


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base of the configs. `VERSION` changes when a config's meaning or its modules' state_dict layout changes."""

    VERSION: ClassVar[int] = 1

    def unsupported(self, linear: nn.Linear) -> Optional[str]:
        """Why `linear` cannot take this config (None: it can)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "version": self.VERSION, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig(QuantConfig):
    """int8 weights (symmetric, one scale per output channel) and int8 activations quantized per token at run time;
    int8 x int8 products accumulated exactly in int32, dequantized in the kernel's epilogue (`Int8Linear`)."""


@dataclasses.dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """4-bit weights in groups of `group_size` consecutive input features, each group with its own scale and zero
    point; activations stay in their float dtype and the weights are dequantized inside the kernel (`Int4Linear`)."""

    group_size: int = 128

    def __post_init__(self):
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"Int4WeightOnlyConfig: group_size must be 32, 64, 128 or 256, got {self.group_size!r}")

    def unsupported(self, linear: nn.Linear) -> Optional[str]:
        if linear.in_features % self.group_size:
            return f"in_features {linear.in_features} is not a multiple of group_size {self.group_size}"
        return None


CONFIGS = {cls.__name__: cls for cls in (Int8DynamicActivationInt8WeightConfig, Int4WeightOnlyConfig)}


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """The config that `to_dict` wrote; refuses unknown types and versions newer than this mltoolkit knows."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"config_from_dict: expected a dict with a 'type' key, got {d!r}")
    cls = CONFIGS.get(d["type"])
    if cls is None:
        raise ValueError(f"config_from_dict: unknown config type {d['type']!r}; known: {', '.join(CONFIGS)}")
    version = d.get("version", 1)
    if version > cls.VERSION:
        raise ValueError(f"config_from_dict: {d['type']} version {version} is newer than this mltoolkit's "
                         f"({cls.VERSION}); upgrade mltoolkit to load it")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})
