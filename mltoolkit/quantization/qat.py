"""Quantization-aware training: prepare_qat(model, config) swaps a model's nn.Linear layers for QATLinear, which
trains in float while its forward sees exactly what the quantized layer will compute (fake quantization with the
config's own format); convert(model) then turns them into the same quantized modules as post-training quantization
(quantize_), recorded the same way, so save_quantized / load_quantized / quantization_report work on the result.

    Int4WeightOnlyConfig(group_size):   weights int4, asymmetric, group-wise, exactly as quantize_int4: min-max
                                        scale and offset per group (recomputed from the weight at every step, or
                                        learned with LSQ+ when learn_scales=True); activations stay float.
    Int8DynamicActivationInt8WeightConfig: weights int8 symmetric per output channel (absmax / 127, or a learned
                                        LSQ scale); activations int8 symmetric per token, computed on the fly.

Right after prepare_qat (and with learned scales, whatever they have become), the QAT model's forward equals the
converted model's up to float summation order: the fake-quantized weight is bit-identical to the weight the
quantized module dequantizes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mltoolkit import ops
from mltoolkit.ops.reference.int4 import group_params, pack_int4
from mltoolkit.quantization.api import quantize_
from mltoolkit.quantization.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    QuantConfig,
)
from mltoolkit.quantization.modules import MODULE_FOR_CONFIG

_TINY = torch.finfo(torch.float32).tiny  # FLT_MIN: the int8 quantizers' smallest scale; learned scales stay above it
QAT_CONFIGS = (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig)


def _absmax_scale(t: Tensor) -> Tensor:
    """quantize_per_token / quantize_per_channel's scale of each row of t (R, K): absmax / 127, 1 below FLT_MIN."""
    s = t.detach().float().abs().amax(dim=-1) / 127
    return torch.where(s >= _TINY, s, torch.ones_like(s))


class QATLinear(nn.Module):
    """nn.Linear whose forward fake-quantizes what `config` quantizes. Keeps nn.Linear's `weight` and `bias` (the
    very Parameters of the layer it replaced, so an optimizer built before prepare_qat keeps training them), plus,
    with learn_scales, the learned quantizer parameters: `weight_scale` (and `weight_offset` for int4, the value
    q = 0 stands for; the int4 zero point is weight_offset + 8 * weight_scale)."""

    def __init__(self, linear: nn.Linear, config: QuantConfig, learn_scales: bool = False,
                 lsq_grad_scale: bool = True):
        super().__init__()
        if type(config) not in QAT_CONFIGS:
            raise TypeError(f"QATLinear: no QAT recipe for {type(config).__name__}; supported: "
                            f"{', '.join(c.__name__ for c in QAT_CONFIGS)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.config, self.learn_scales, self.lsq_grad_scale = config, learn_scales, lsq_grad_scale
        self.weight = linear.weight
        self.bias = linear.bias
        if learn_scales:
            scale, offset = self._minmax_params()
            self.weight_scale = nn.Parameter(scale)
            if offset is not None:
                self.weight_offset = nn.Parameter(offset)

    @property
    def is_int4(self) -> bool:
        return isinstance(self.config, Int4WeightOnlyConfig)

    @torch.no_grad()
    def _minmax_params(self) -> tuple[Tensor, Optional[Tensor]]:
        """The PTQ quantizer of the current weight: (scale, offset) per group (int4) or (scale, None) per channel."""
        if self.is_int4:
            mn, scale, _ = group_params(self.weight.detach(), self.config.group_size)
            return scale, mn
        return _absmax_scale(self.weight), None

    def _weight_params(self) -> tuple[Tensor, Optional[Tensor], float]:
        """(scale, offset, grad_scale) the forward quantizes the weight with."""
        if self.learn_scales:
            scale = self.weight_scale.clamp_min(_TINY)
            offset = self.weight_offset if self.is_int4 else None
            if not self.lsq_grad_scale:
                return scale, offset, 1.0
            per_quantizer = self.config.group_size if self.is_int4 else self.in_features
            return scale, offset, (per_quantizer * (15 if self.is_int4 else 127)) ** -0.5
        scale, offset = self._minmax_params()
        return scale, offset, 1.0

    def fake_quantized_weight(self) -> Tensor:
        """The weight as the quantized module will hold it (differentiable: STE, and LSQ for learned scales)."""
        scale, offset, g = self._weight_params()
        if self.is_int4:
            return ops.fake_quantize(self.weight, scale, offset, 0, 15, group_size=self.config.group_size,
                                     zero_point_domain="float", grad_scale=g)
        return ops.fake_quantize(self.weight, scale, None, -127, 127, axis=0, grad_scale=g)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fake_quantized_weight()
        if not self.is_int4:  # per-token dynamic int8 activations; their scale is data, not learned (no gradient)
            x2 = x.reshape(-1, x.shape[-1])
            x = ops.fake_quantize(x2, _absmax_scale(x2), None, -127, 127, axis=0).reshape(x.shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def to_float(self) -> nn.Linear:
        """An nn.Linear holding this layer's weight and bias (the same tensors)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    @torch.no_grad()
    def write_learned_params(self, module: nn.Module) -> None:
        """Puts the learned quantizer into the quantized module that from_float made of this layer: the integer
        weight re-quantized with the learned scale (and offset), exactly as this layer's forward rounds it."""
        w = self.weight.detach().float()
        scale = self.weight_scale.detach().clamp_min(_TINY).float()
        if self.is_int4:
            n, k, g = self.out_features, self.in_features, self.config.group_size
            offset = self.weight_offset.detach().float()
            q = torch.round((w.reshape(n, k // g, g) - offset[..., None]) / scale[..., None]).clamp_(0, 15)
            module.weight_packed.copy_(pack_int4(q.reshape(n, k)))
            module.weight_scales.copy_(scale)
            module.weight_zeros.copy_(offset + 8 * scale)
        else:
            q = torch.round(w / scale[:, None]).clamp_(-127, 127)
            module.weight_int8.copy_(q.to(torch.int8))
            module.weight_scale.copy_(scale)
            module._packed = None  # the CPU kernel's cached packed weight is stale

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"config={self.config}, learn_scales={self.learn_scales}")


def _check_config(fn: str, what: str, cfg) -> None:
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"{fn}: {what} must be a QuantConfig, got {type(cfg).__name__}")
    if type(cfg) not in QAT_CONFIGS:
        known = type(cfg) in MODULE_FOR_CONFIG
        raise TypeError(f"{fn}: {what} {type(cfg).__name__} has no QAT recipe"
                        f"{' (it can be used with quantize_ for post-training quantization)' if known else ''}; "
                        f"QAT supports {', '.join(c.__name__ for c in QAT_CONFIGS)}")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def prepare_qat(model: nn.Module, config: QuantConfig, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                overrides: Optional[Mapping[str, Optional[QuantConfig]]] = None, *, learn_scales: bool = False,
                lsq_grad_scale: bool = True, verbose: bool = False) -> nn.Module:
    """Replaces, in place, every nn.Linear of `model` (filter_fn(module, name) True, or no filter_fn) by a QATLinear
    that fake-quantizes as `config` will quantize; overrides: module name -> another config, or None to keep that
    layer float. Layers the config cannot take (in_features not a multiple of the int4 group size) stay float.
    learn_scales: the weight quantizers become Parameters initialised from min-max (LSQ, LSQ+ offsets for int4),
    their gradients scaled by 1 / sqrt(elements per quantizer * qmax) unless lsq_grad_scale=False. Train as usual,
    then convert(model). Returns the model."""
    fn = "prepare_qat"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    _check_config(fn, "config", config)
    overrides = dict(overrides or {})
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"{fn}: overrides name modules that are not nn.Linear layers of the model: {sorted(unknown)}")
    for name, cfg in overrides.items():
        if cfg is not None:
            _check_config(fn, f"overrides[{name!r}]", cfg)
    skipped: dict[str, str] = {}
    done = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        cfg = overrides.get(name, config)
        if cfg is None:
            skipped[name] = "override: kept in float"
            continue
        if filter_fn is not None and not filter_fn(module, name):
            skipped[name] = "filter_fn"
            continue
        why = cfg.unsupported(module)
        if why is not None:
            skipped[name] = why
            continue
        _set_submodule(model, name, QATLinear(module, cfg, learn_scales, lsq_grad_scale))
        done += 1
    if verbose:
        print(f"prepare_qat: {done} of {done + len(skipped)} Linear layers prepared")
        for name, why in skipped.items():
            print(f"  skipped {name}: {why}")
    return model


@torch.no_grad()
def convert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replaces, in place, every QATLinear of `model` by the quantized module of its config, the same one quantize_
    makes (MODULE_FOR_CONFIG[type(config)].from_float, recorded for save_quantized and quantization_report), with
    the learned scales and offsets written into it when the layer learned them. Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    qat = {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}
    if not qat:
        raise ValueError("convert: the model has no QATLinear layers (call prepare_qat first)")
    by_config: dict[QuantConfig, list[str]] = {}
    for name, m in qat.items():
        _set_submodule(model, name, m.to_float())
        by_config.setdefault(m.config, []).append(name)
    for cfg, group in by_config.items():
        chosen = set(group)
        quantize_(model, cfg, filter_fn=lambda _m, name, chosen=chosen: name in chosen, verbose=verbose)
    for name, m in qat.items():
        if m.learn_scales:
            m.write_learned_params(model.get_submodule(name))
    return model
