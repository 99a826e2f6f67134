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
    # Module types the config can quantize (quantize_ looks at these; Conv2d only for the static config).
    MODULE_TYPES: ClassVar[tuple[type, ...]] = (nn.Linear,)
    # Whether the config's modules need calibrated activation scales (prepare / calibrate / convert).
    STATIC: ClassVar[bool] = False

    def unsupported(self, linear: nn.Module) -> Optional[str]:
        """Why `linear` cannot take this config (None: it can)."""
        if not isinstance(linear, self.MODULE_TYPES):
            return (f"{type(self).__name__} quantizes {' and '.join(t.__name__ for t in self.MODULE_TYPES)} layers, "
                    f"not {type(linear).__name__}")
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

    def unsupported(self, linear: nn.Module) -> Optional[str]:
        why = super().unsupported(linear)
        if why is not None:
            return why
        if linear.in_features % self.group_size:
            return f"in_features {linear.in_features} is not a multiple of group_size {self.group_size}"
        return None


@dataclasses.dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """int8 weights (symmetric, one scale per output channel); activations stay in their float dtype and the weights
    are converted to float inside the kernel (`Int8WeightOnlyLinear`): half the bytes of bf16 weights, a quarter of
    fp32's, and nearly float accuracy (weight error only)."""


OBSERVER_NAMES = ("minmax", "moving_average", "percentile", "mse")


def _padding_pair(conv: nn.Conv2d) -> Optional[tuple[int, int]]:
    """conv's zero padding as (PH, PW), None when it is asymmetric ('same' with an even dilated kernel)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return tuple(int(p) for p in conv.padding)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Int8StaticActivationInt8WeightConfig(QuantConfig):
    """int8 weights (symmetric, per output channel) and int8 activations with a static, symmetric per-tensor scale
    calibrated ahead of time over a user's data (`Int8StaticLinear`, and `Int8Conv2d` for nn.Conv2d layers): no
    run-time absmax pass over the activations, integer sums exact in int32, dequantized in the kernel's epilogue.

    observer: how each layer's input scale is calibrated: "minmax" (largest |x| seen), "moving_average" (moving
    averages of the batches' min and max, weight `averaging_constant`), "percentile" (the `percentile` of |x|, from a
    histogram of `bins` bins) or "mse" (the clipping threshold that minimises the expected quantization error of that
    histogram). Symmetric (zero point 0): 0.0 is exact, so the zero padding of a convolution is exact too; an input
    that is never negative (after a ReLU) uses half the codes."""

    MODULE_TYPES: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)
    STATIC: ClassVar[bool] = True

    observer: str = "minmax"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    bins: int = 2048

    def __post_init__(self):
        name = type(self).__name__
        if self.observer not in OBSERVER_NAMES:
            raise ValueError(f"{name}: observer must be one of {', '.join(OBSERVER_NAMES)}, got {self.observer!r}")
        if not 0 < self.averaging_constant <= 1:
            raise ValueError(f"{name}: averaging_constant must be in (0, 1], got {self.averaging_constant!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"{name}: percentile must be in (0, 100], got {self.percentile!r}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 16:
            raise ValueError(f"{name}: bins must be an int >= 16, got {self.bins!r}")

    def unsupported(self, module: nn.Module) -> Optional[str]:
        why = super().unsupported(module)
        if why is not None or not isinstance(module, nn.Conv2d):
            return why
        if module.groups != 1:
            return f"Int8Conv2d supports groups=1 only, got groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"Int8Conv2d supports padding_mode='zeros' only, got padding_mode={module.padding_mode!r}"
        if _padding_pair(module) is None:
            return (f"Int8Conv2d needs symmetric zero padding; padding='same' with kernel_size {module.kernel_size} "
                    f"and dilation {module.dilation} pads unevenly")
        return None

    def make_observer(self):
        """A fresh observer of this config's kind."""
        from mltoolkit.quantization import observers

        if self.observer == "minmax":
            return observers.MinMaxObserver()
        if self.observer == "moving_average":
            return observers.MovingAverageMinMaxObserver(self.averaging_constant)
        if self.observer == "percentile":
            return observers.PercentileObserver(self.percentile, self.bins)
        return observers.MSEObserver(self.bins)


CONFIGS = {cls.__name__: cls for cls in (Int8DynamicActivationInt8WeightConfig, Int4WeightOnlyConfig,
                                         Int8WeightOnlyConfig, Int8StaticActivationInt8WeightConfig)}


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
