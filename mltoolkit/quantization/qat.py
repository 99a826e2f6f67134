"""Quantization-aware training: prepare_qat(model, config) swaps a model's nn.Linear layers (and, under the static
int8 config, its nn.Conv2d layers) for QATLinear / QATConv2d, which train in float while their forward sees exactly
what the quantized layer will compute (fake quantization with the config's own format); convert(model) then turns
them into the same quantized modules as post-training quantization (quantize_), recorded the same way, so
save_quantized / load_quantized / quantization_report work on the result.

    Int4WeightOnlyConfig(group_size):   weights int4, asymmetric, group-wise, exactly as quantize_int4: min-max
                                        scale and offset per group (recomputed from the weight at every step, or
                                        learned with LSQ+ when learn_scales=True); activations stay float.
    Int8DynamicActivationInt8WeightConfig: weights int8 symmetric per output channel (absmax / 127, or a learned
                                        LSQ scale); activations int8 symmetric per token, computed on the fly.
    Int8WeightOnlyConfig:               weights int8 symmetric per output channel as above; activations stay float
                                        (-> Int8WeightOnlyLinear).
    Int8StaticActivationInt8WeightConfig: weights int8 per output channel as above; activations int8 with one
                                        symmetric per-tensor scale (-> Int8StaticLinear, Int8Conv2d). The scale is
                                        tracked by the config's observer on the layer's input during training
                                        (training-mode forwards only), until the observer is frozen
                                        (freeze_observers(model), or freeze_observers_after= steps); with
                                        learn_scales=True it is then learned (LSQ), starting from the observer's.

Right after prepare_qat (and, for the static config, a calibration pass), and with learned scales whatever they have
become, the QAT model's forward equals the converted model's up to float summation order: the fake-quantized weight
and input are bit-identical to what the quantized module computes with.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mltoolkit import ops
from mltoolkit.ops.reference.int4 import group_params, pack_int4
from mltoolkit.ops.reference.int8 import div_exact
from mltoolkit.quantization.api import _ATTR, _plan, _set_submodule, model_bytes
from mltoolkit.quantization.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    _padding_pair,
)
from mltoolkit.quantization.modules import MODULE_FOR_CONFIG, module_for

_TINY = torch.finfo(torch.float32).tiny  # FLT_MIN: the int8 quantizers' smallest scale; learned scales stay above it
QAT_CONFIGS = (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
               Int8StaticActivationInt8WeightConfig)


def _absmax_scale(t: Tensor) -> Tensor:
    """quantize_per_token / quantize_per_channel's scale of each row of t (R, K): absmax / 127, 1 below FLT_MIN."""
    s = div_exact(t.detach().float().abs().amax(dim=-1), 127)
    return torch.where(s >= _TINY, s, torch.ones_like(s))


class _QATLayer(nn.Module):
    """What QATLinear and QATConv2d share: the weight quantizer (int4 groups, or int8 per output channel: row o of
    the weight seen as (out, -1)), the static config's input quantizer (observer, then a frozen or learned scale),
    and the conversion to the quantized module. Subclasses set `weight`, `bias` and implement to_float / forward."""

    weight: Tensor
    bias: Optional[Tensor]

    def _init_quantizers(self, config: QuantConfig, learn_scales: bool, lsq_grad_scale: bool,
                         freeze_observer_after: Optional[int]) -> None:
        self.config, self.learn_scales, self.lsq_grad_scale = config, learn_scales, lsq_grad_scale
        if learn_scales:
            scale, offset = self._minmax_params()
            self.weight_scale = nn.Parameter(scale)
            if offset is not None:
                self.weight_offset = nn.Parameter(offset)
        self.observer: Optional[nn.Module] = None
        self._frozen = False  # mirrors the `frozen` buffer (saved in state_dict), read without a device sync
        self.freeze_observer_after = freeze_observer_after
        if config.STATIC:
            self.observer = config.make_observer().to(self.weight.device)
            self.register_buffer("frozen", torch.zeros((), dtype=torch.bool, device=self.weight.device))
            scale = torch.ones((), dtype=torch.float32, device=self.weight.device)
            if learn_scales:
                self.input_scale = nn.Parameter(scale)
            else:
                self.register_buffer("input_scale", scale)

    # ---- weights ----------------------------------------------------------------------------------------------

    @property
    def is_int4(self) -> bool:
        return isinstance(self.config, Int4WeightOnlyConfig)

    def _weight_rows(self) -> Tensor:
        return self.weight.detach().reshape(self.weight.shape[0], -1)

    @torch.no_grad()
    def _minmax_params(self) -> tuple[Tensor, Optional[Tensor]]:
        """The PTQ quantizer of the current weight: (scale, offset) per group (int4) or (scale, None) per channel."""
        if self.is_int4:
            mn, scale, _ = group_params(self.weight.detach(), self.config.group_size)
            return scale, mn
        return _absmax_scale(self._weight_rows()), None

    def _weight_params(self) -> tuple[Tensor, Optional[Tensor], float]:
        """(scale, offset, grad_scale) the forward quantizes the weight with."""
        if self.learn_scales:
            scale = self.weight_scale.clamp_min(_TINY)
            offset = self.weight_offset if self.is_int4 else None
            if not self.lsq_grad_scale:
                return scale, offset, 1.0
            per_quantizer = self.config.group_size if self.is_int4 else self.weight[0].numel()
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

    # ---- inputs -----------------------------------------------------------------------------------------------

    def _fake_quantize_input(self, x: Tensor) -> Tensor:
        """x as the quantized module will see it: per-token int8 (dynamic config), per-tensor int8 with the static
        scale (static config; observed first in training mode until frozen), unchanged (weight-only configs)."""
        if isinstance(self.config, Int8DynamicActivationInt8WeightConfig):
            # per-token dynamic int8 activations; their scale is data, not learned (no gradient)
            x2 = x.reshape(-1, x.shape[-1])
            return ops.fake_quantize(x2, _absmax_scale(x2), None, -127, 127, axis=0).reshape(x.shape)
        if self.observer is None:
            return x
        if self.observer_frozen:
            if self.learn_scales:
                return ops.fake_quantize(x, self.input_scale.clamp_min(_TINY), None, -127, 127,
                                         grad_scale="lsq" if self.lsq_grad_scale else 1.0)
            return ops.fake_quantize(x, self.input_scale, None, -127, 127)
        if self.training:
            self.observer(x)
            scale = self.observer.scale().to(self.input_scale.device)
            with torch.no_grad():
                self.input_scale.copy_(scale)
            if self.freeze_observer_after is not None and int(self.observer.batches) >= self.freeze_observer_after:
                self.freeze_observer()
        elif int(self.observer.batches) == 0:
            raise RuntimeError(f"{type(self).__name__}: the input observer has seen no data; run forward passes in "
                               "training mode (a calibration pass: model.train(), then model(batch) under "
                               "torch.no_grad()) before evaluating")
        else:
            scale = self.input_scale.detach().clone()
        return ops.fake_quantize(x, scale, None, -127, 127)  # the observed scale: no gradient

    @torch.no_grad()
    def freeze_observer(self) -> None:
        """Stops tracking the input scale: from now on the forward uses input_scale as it stands (the observer's
        last scale), learned from here on when learn_scales. No-op for configs without activation observers."""
        if self.observer is None or self.observer_frozen:
            return
        if int(self.observer.batches) == 0:
            raise RuntimeError(f"{type(self).__name__}.freeze_observer: the input observer has seen no data; run a "
                               "calibration pass (training-mode forwards) first")
        self.input_scale.copy_(self.observer.scale().to(self.input_scale.device))
        self.frozen.fill_(True)
        self._frozen = True

    @property
    def observer_frozen(self) -> bool:
        """Whether the input observer is frozen (static config; False otherwise)."""
        return self._frozen

    def activation_scale(self) -> Tensor:
        """The static input scale the converted module gets (a float32 0-d tensor), as the forward uses it."""
        if self.observer is None:
            raise ValueError(f"{type(self).__name__}: {type(self.config).__name__} has no static input scale")
        if not self.observer_frozen and int(self.observer.batches) == 0:
            raise RuntimeError("the input observer has seen no data (run a calibration pass: training-mode forwards)")
        return self.input_scale.detach().float().clamp_min(_TINY).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.observer is not None:
            self._frozen = bool(self.frozen)

    # ---- conversion -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def write_learned_params(self, module: nn.Module) -> None:
        """Puts the learned quantizer into the quantized module that from_float made of this layer: the integer
        weight re-quantized with the learned scale (and offset), exactly as this layer's forward rounds it."""
        w = self.weight.detach().float()
        scale = self.weight_scale.detach().clamp_min(_TINY).float()
        if self.is_int4:
            n, k = w.shape
            g = self.config.group_size
            offset = self.weight_offset.detach().float()
            q = torch.round((w.reshape(n, k // g, g) - offset[..., None]) / scale[..., None]).clamp_(0, 15)
            module.weight_packed.copy_(pack_int4(q.reshape(n, k)))
            module.weight_scales.copy_(scale)
            module.weight_zeros.copy_(offset + 8 * scale)
        else:
            q = torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))).clamp_(-127, 127)
            module.weight_int8.copy_(q.to(torch.int8))
            module.weight_scale.copy_(scale)  # (copy_ moves the version counters: cached layouts are remade)

    @torch.no_grad()
    def to_quantized(self) -> nn.Module:
        """The quantized module of this layer's config (the one quantize_ makes), with the learned weight quantizer
        and the observed or learned input scale."""
        flt = self.to_float()
        cls = module_for(flt, self.config)
        if self.observer is not None:
            q = cls.from_float(flt, self.config, input_scale=self.activation_scale())
        else:
            q = cls.from_float(flt, self.config)
        if self.learn_scales:
            self.write_learned_params(q)
        return q

    def to_float(self) -> nn.Module:
        raise NotImplementedError

    def _extra(self) -> str:
        s = f"config={self.config}, learn_scales={self.learn_scales}"
        if self.observer is not None:
            s += f", observer_frozen={self.observer_frozen}"
        return s


def _check_layer_config(cls: str, module: nn.Module, config) -> None:
    if type(config) not in QAT_CONFIGS:
        raise TypeError(f"{cls}: no QAT recipe for {type(config).__name__}; supported: "
                        f"{', '.join(c.__name__ for c in QAT_CONFIGS)}")
    why = config.unsupported(module)
    if why is not None:
        raise ValueError(f"{cls}: cannot fake-quantize this {type(module).__name__} under {type(config).__name__}: "
                         f"{why}")


class QATLinear(_QATLayer):
    """nn.Linear whose forward fake-quantizes what `config` quantizes. Keeps nn.Linear's `weight` and `bias` (the
    very Parameters of the layer it replaced, so an optimizer built before prepare_qat keeps training them), plus,
    with learn_scales, the learned quantizer parameters: `weight_scale` (and `weight_offset` for int4, the value
    q = 0 stands for; the int4 zero point is weight_offset + 8 * weight_scale) and, for the static config,
    `input_scale`. Under the static config, `observer` watches the input and `input_scale` holds the scale in use."""

    def __init__(self, linear: nn.Linear, config: QuantConfig, learn_scales: bool = False,
                 lsq_grad_scale: bool = True, freeze_observer_after: Optional[int] = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QATLinear: expected an nn.Linear, got {type(linear).__name__}")
        _check_layer_config("QATLinear", linear, config)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_quantizers(config, learn_scales, lsq_grad_scale, freeze_observer_after)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fake_quantized_weight()
        x = self._fake_quantize_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def to_float(self) -> nn.Linear:
        """An nn.Linear holding this layer's weight and bias (the same tensors)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._extra())


class QATConv2d(_QATLayer):
    """nn.Conv2d under Int8StaticActivationInt8WeightConfig: the input fake-quantized with the static per-tensor
    scale (observed, then frozen or learned, as QATLinear), the weight per output channel (symmetric int8 of each
    (C, KH, KW) filter), then F.conv2d. Takes what Int8Conv2d takes (groups 1, zero padding, symmetric padding)
    and refuses the rest with the reason. Keeps the conv's own `weight` and `bias` Parameters."""

    def __init__(self, conv: nn.Conv2d, config: QuantConfig, learn_scales: bool = False,
                 lsq_grad_scale: bool = True, freeze_observer_after: Optional[int] = None):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QATConv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        _check_layer_config("QATConv2d", conv, config)
        if not isinstance(config, Int8StaticActivationInt8WeightConfig):
            raise TypeError(f"QATConv2d: only Int8StaticActivationInt8WeightConfig quantizes nn.Conv2d, got "
                            f"{type(config).__name__}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding = _padding_pair(conv)  # symmetric (checked): what Int8Conv2d pads with
        self._conv_padding = conv.padding  # as given ('same' and 'valid' kept), for to_float
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_quantizers(config, learn_scales, lsq_grad_scale, freeze_observer_after)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fake_quantized_weight()
        x = self._fake_quantize_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w.to(x.dtype), bias, self.stride, self.padding, self.dilation)

    def to_float(self) -> nn.Conv2d:
        """An nn.Conv2d holding this layer's weight and bias (the same tensors)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self._conv_padding,
                         self.dilation, bias=self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        conv.weight = self.weight
        conv.bias = self.bias
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, " + self._extra())


QAT_MODULES = (QATLinear, QATConv2d)


def _check_config(fn: str, what: str, cfg) -> None:
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"{fn}: {what} must be a QuantConfig, got {type(cfg).__name__}")
    if type(cfg) not in QAT_CONFIGS:
        known = type(cfg) in MODULE_FOR_CONFIG
        raise TypeError(f"{fn}: {what} {type(cfg).__name__} has no QAT recipe"
                        f"{' (it can be used with quantize_ for post-training quantization)' if known else ''}; "
                        f"QAT supports {', '.join(c.__name__ for c in QAT_CONFIGS)}")


def prepare_qat(model: nn.Module, config: QuantConfig, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                overrides: Optional[Mapping[str, Optional[QuantConfig]]] = None, *, learn_scales: bool = False,
                lsq_grad_scale: bool = True, freeze_observers_after: Optional[int] = None,
                verbose: bool = False) -> nn.Module:
    """Replaces, in place, every nn.Linear of `model` (and every nn.Conv2d under
    Int8StaticActivationInt8WeightConfig) for which filter_fn(module, name) is True (or no filter_fn) by a QATLinear
    (QATConv2d) that fake-quantizes as `config` will quantize; overrides: module name -> another config, or None to
    keep that layer float. Layers the config cannot take (in_features not a multiple of the int4 group size, a
    grouped or reflect-padded convolution) stay float (listed when verbose); a layer named in overrides that its
    config cannot take raises ValueError naming it.

    learn_scales: the weight quantizers become Parameters initialised from min-max (LSQ, LSQ+ offsets for int4),
    and, under the static config, so does each layer's input scale, initialised from its observer when the observer
    is frozen; gradients scaled by 1 / sqrt(elements per quantizer * qmax) unless lsq_grad_scale=False.

    Static config: each layer's input scale is tracked by the config's observer in training-mode forwards (a
    calibration pass: model.train() and a few batches under torch.no_grad()), until freeze_observers(model), or
    until the layer has observed freeze_observers_after batches. Train as usual, then convert(model). Returns the
    model."""
    fn = "prepare_qat"
    todo, skipped, kinds = _plan(fn, model, config, filter_fn, overrides,
                                 check_config=lambda what, cfg: _check_config(fn, what, cfg),
                                 skip=lambda _name, module: isinstance(module, QAT_MODULES), strict_overrides=True)
    if freeze_observers_after is not None and (isinstance(freeze_observers_after, bool)
                                               or not isinstance(freeze_observers_after, int)
                                               or freeze_observers_after < 1):
        raise ValueError(f"{fn}: freeze_observers_after must be a positive int or None, got "
                         f"{freeze_observers_after!r}")
    for name, cfg in todo.items():
        module = model.get_submodule(name)
        cls = QATConv2d if isinstance(module, nn.Conv2d) else QATLinear
        _set_submodule(model, name, cls(module, cfg, learn_scales, lsq_grad_scale, freeze_observers_after))
    if verbose:
        print(f"prepare_qat: {len(todo)} of {len(todo) + len(skipped)} {kinds} layers prepared")
        for name, why in skipped.items():
            print(f"  skipped {name}: {why}")
    return model


def freeze_observers(model: nn.Module) -> int:
    """Freezes the input observer of every static-config QAT layer of `model` (QATLinear / QATConv2d): their input
    scales stop following the data and, with learn_scales, start being learned from the observed value. Returns the
    number of layers frozen (already frozen ones included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_observers: model must be an nn.Module, got {type(model).__name__}")
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QAT_MODULES) and m.observer is not None:
            try:
                m.freeze_observer()
            except RuntimeError as e:
                raise RuntimeError(f"freeze_observers: layer {name!r}: {e}") from None
            n += 1
    return n


@torch.no_grad()
def convert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replaces, in place, every QATLinear / QATConv2d of `model` by the quantized module of its config, the same
    one quantize_ makes (module_for(layer, config).from_float; Int8StaticLinear / Int8Conv2d with the observed or
    learned input scale), recorded for save_quantized and quantization_report, with the learned weight scales and
    offsets written into it when the layer learned them. Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    qat = {name: m for name, m in model.named_modules() if isinstance(m, QAT_MODULES)}
    if not qat:
        raise ValueError("convert: the model has no QATLinear or QATConv2d layers (call prepare_qat first)")
    quantized = {}
    for name, m in qat.items():  # everything first: a layer that cannot convert leaves the model unchanged
        try:
            quantized[name] = m.to_quantized()
        except RuntimeError as e:
            raise RuntimeError(f"convert: layer {name!r} ({type(m).__name__}): {e}") from None
    before = model_bytes(model)
    record = getattr(model, _ATTR, {})
    done = {}
    for name, q in quantized.items():
        _set_submodule(model, name, q)
        record[name] = qat[name].config.to_dict()
        done[name] = type(qat[name].config).__name__
    object.__setattr__(model, _ATTR, record)  # a plain attribute, not a submodule or buffer
    if verbose:
        after = model_bytes(model)
        print(f"convert: {len(done)} QAT layers converted; parameters and buffers {before / 2**20:.2f} MiB -> "
              f"{after / 2**20:.2f} MiB")
    return model
