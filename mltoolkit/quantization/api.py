"""quantize_(model, config): swap a model's nn.Linear layers (and nn.Conv2d for the static int8 config) for
quantized ones in place; prepare / calibrate / convert: the static int8 flow step by step; save_quantized /
load_quantized: a quantized model's tensors and configs in one safetensors file, restored exactly;
quantization_report: what quantization did to each layer's output and to the model's size."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mltoolkit.quantization.config import QuantConfig, config_from_dict
from mltoolkit.quantization.modules import CONV_MODULE_FOR_CONFIG, MODULE_FOR_CONFIG, empty_module, module_for
from mltoolkit.quantization.static import ObservedModule, calibrate
from mltoolkit.testing import sqnr

_ATTR = "_mltk_quantization"  # {module name: config dict} on the root module
_METADATA_KEY = "mltoolkit.quantization"


@dataclasses.dataclass
class QuantizeSummary:
    quantized: dict[str, str]  # module name -> config type
    skipped: dict[str, str]  # module name -> why
    bytes_before: int
    bytes_after: int
    kinds: str = "Linear"  # the layer types considered

    def __str__(self) -> str:
        lines = [f"quantize_: {len(self.quantized)} of {len(self.quantized) + len(self.skipped)} {self.kinds} layers "
                 f"quantized; parameters and buffers {self.bytes_before / 2**20:.2f} MiB -> "
                 f"{self.bytes_after / 2**20:.2f} MiB"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _layer_types(configs) -> tuple[type, ...]:
    types: list[type] = []
    for cfg in configs:
        for t in getattr(cfg, "MODULE_TYPES", (nn.Linear,)):
            if t not in types:
                types.append(t)
    return tuple(types)


def _check_config(fn: str, config) -> None:
    if not isinstance(config, QuantConfig) or type(config) not in MODULE_FOR_CONFIG:
        raise TypeError(f"{fn}: config must be one of {', '.join(c.__name__ for c in MODULE_FOR_CONFIG)}, got "
                        f"{type(config).__name__}")


def _in_observed(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """Whether a layer sits inside a layer that prepare already wrapped in an observer."""
    observed = [n + "." for n, m in model.named_modules() if isinstance(m, ObservedModule)]
    return lambda name, _module: any(name.startswith(o) for o in observed)


def _plan(fn: str, model: nn.Module, config: QuantConfig, filter_fn, overrides, *,
          check_config: Optional[Callable[[str, QuantConfig], None]] = None,
          skip: Optional[Callable[[str, nn.Module], bool]] = None,
          strict_overrides: bool = False) -> tuple[dict, dict, str]:
    """{name: config} of the layers to quantize, {name: why} of those left in float, and the layer kinds considered.
    check_config(what, cfg) refuses a config ("config" or "overrides[name]"; default: any quantize_ config); skip:
    layers not to consider (default: those inside observed layers); strict_overrides: a layer named in overrides
    that its config cannot take raises instead of being skipped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if check_config is None:
        def check_config(what, cfg):
            _check_config(fn if what == "config" else f"{fn}: {what}", cfg)
    if skip is None:
        skip = _in_observed(model)
    check_config("config", config)
    overrides = dict(overrides or {})
    for name, cfg in overrides.items():
        if cfg is not None:
            check_config(f"overrides[{name!r}]", cfg)
    types = _layer_types([config, *[c for c in overrides.values() if c is not None]])
    names = {name for name, m in model.named_modules() if isinstance(m, types)}
    unknown = set(overrides) - names
    if unknown:
        kinds = " or ".join("nn." + t.__name__ for t in types)
        raise ValueError(f"{fn}: overrides name modules that are not {kinds} layers of the model: {sorted(unknown)}")
    todo: dict[str, QuantConfig] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, types) or skip(name, module):
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
            if strict_overrides and name in overrides:
                raise ValueError(f"{fn}: overrides[{name!r}] = {type(cfg).__name__} cannot take layer {name!r} "
                                 f"({type(module).__name__}): {why}")
            skipped[name] = why
            continue
        todo[name] = cfg
    return todo, skipped, "/".join(t.__name__ for t in types)


def _record(model: nn.Module) -> dict:
    return getattr(model, _ATTR, {})


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
              overrides: Optional[Mapping[str, Optional[QuantConfig]]] = None, verbose: bool = True,
              calibration_data: Optional[Iterable] = None, num_batches: Optional[int] = None,
              forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None) -> QuantizeSummary:
    """Replaces, in place, every nn.Linear of `model` (filter_fn(module, name) True, or no filter_fn) by the
    quantized module of `config`: Int8Linear for Int8DynamicActivationInt8WeightConfig, Int4Linear for
    Int4WeightOnlyConfig, Int8WeightOnlyLinear for Int8WeightOnlyConfig, Int8StaticLinear (and Int8Conv2d for every
    nn.Conv2d) for Int8StaticActivationInt8WeightConfig. overrides: module name -> another config, or None to leave
    that layer in float. Layers the config cannot take (e.g. in_features not a multiple of the int4 group size, a
    grouped convolution) stay float and are listed. Prints (verbose) and returns a summary; model_bytes gives the sizes.

    The static config needs calibration_data: an iterable of batches (a DataLoader) that quantize_ runs through the
    model with observers on the static layers' inputs (prepare, calibrate(model, calibration_data, num_batches,
    forward_fn), convert; see calibrate for how a batch is fed). The other layers are quantized first, so the
    observers see the activations the quantized model will produce."""
    fn = "quantize_"
    todo, skipped, kinds = _plan(fn, model, config, filter_fn, overrides)
    static = {n: c for n, c in todo.items() if c.STATIC}
    if static and calibration_data is None:
        raise ValueError(f"{fn}: {type(next(iter(static.values()))).__name__} calibrates activation scales: pass "
                         "calibration_data= (an iterable of batches, e.g. a DataLoader), or use prepare(model, "
                         "config), calibrate(model, data) and convert(model)")
    before = model_bytes(model)
    record = _record(model)
    done: dict[str, str] = {}
    for name, cfg in todo.items():
        if cfg.STATIC:
            continue
        _set_submodule(model, name, module_for(model.get_submodule(name), cfg).from_float(
            model.get_submodule(name), cfg))
        done[name] = type(cfg).__name__
        record[name] = cfg.to_dict()
    object.__setattr__(model, _ATTR, record)  # a plain attribute, not a submodule or buffer
    if static:
        _insert_observers(model, static)
        try:
            calibrate(model, calibration_data, num_batches, forward_fn)
        except BaseException:
            _remove_observers(model, static)
            raise
        done.update(_convert(model, static))
    summary = QuantizeSummary(done, skipped, before, model_bytes(model), kinds)
    if verbose:
        print(summary)
    return summary


def _insert_observers(model: nn.Module, plan: Mapping[str, QuantConfig]) -> None:
    for name, cfg in plan.items():
        _set_submodule(model, name, ObservedModule(model.get_submodule(name), cfg))


def _remove_observers(model: nn.Module, names) -> None:
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, ObservedModule):
            _set_submodule(model, name, m.module)


def _convert(model: nn.Module, names) -> dict[str, str]:
    record = _record(model)
    done = {}
    for name in names:
        quantized, cfg = model.get_submodule(name)._mltk_convert()
        _set_submodule(model, name, quantized)
        done[name] = type(cfg).__name__
        record[name] = cfg.to_dict()
    object.__setattr__(model, _ATTR, record)
    return done


def prepare(model: nn.Module, config: QuantConfig, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
            overrides: Optional[Mapping[str, Optional[QuantConfig]]] = None, verbose: bool = False) -> nn.Module:
    """First step of static quantization: wraps every layer that `config` (or its override) quantizes with static
    activation scales (Int8StaticActivationInt8WeightConfig: nn.Linear and nn.Conv2d) in an ObservedModule, an
    observer on its input; the model still computes in float. Then run calibration batches (calibrate(model, loader,
    num_batches=...) or plain forward calls) and convert(model). Layers under a non-static config are left for
    quantize_. Returns the model (changed in place)."""
    todo, skipped, _ = _plan("prepare", model, config, filter_fn, overrides)
    static = {n: c for n, c in todo.items() if c.STATIC}
    if not static:
        raise ValueError("prepare: no layer would be observed; prepare is for configs with calibrated activation "
                         "scales (Int8StaticActivationInt8WeightConfig); use quantize_ for the others")
    _insert_observers(model, static)
    if verbose:
        print(f"prepare: observers on {len(static)} layers" + "".join(f"\n  skipped {n}: {w}"
                                                                       for n, w in skipped.items()))
    return model


def convert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Last step of both flows that prepare layers before quantizing them, in place:

    - static PTQ: every prepared layer (a submodule with a `_mltk_convert()` method returning (quantized module,
      config), as prepare's ObservedModule has) becomes its quantized module with the scale its observer calibrated
      (an observer that saw no data raises);
    - QAT: every QATLinear / QATConv2d (prepare_qat) becomes the quantized module of its config, with its observed
      or learned input scale under the static config (mltoolkit.quantization.qat).

    The configs are recorded for save_quantized and quantization_report. Returns the model."""
    from mltoolkit.quantization import qat  # qat imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    names = [name for name, m in model.named_modules() if name and hasattr(m, "_mltk_convert")]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]  # outermost only
    has_qat = any(isinstance(m, qat.QAT_MODULES) for m in model.modules())
    if not names and not has_qat:
        raise ValueError("convert: the model has no QATLinear / QATConv2d layers and no prepared (observed) layers; "
                         "call prepare_qat(model, config) and train, or prepare(model, config) and calibrate, first")
    if has_qat:
        qat.convert(model, verbose=verbose)
    if names:
        before = model_bytes(model)
        summary = QuantizeSummary(_convert(model, names), {}, before, model_bytes(model), "prepared")
        if verbose:
            print(summary)
    return model


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the model's state_dict and the config of every quantized layer to a safetensors file, atomically
    (a temporary file in the same folder, renamed over `path` once complete)."""
    from safetensors.torch import save_file

    record = getattr(model, _ATTR, None)
    if not record:
        raise ValueError("save_quantized: the model has no layers quantized by mltoolkit.quantization.quantize_")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={_METADATA_KEY: json.dumps(record)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Restores a model written by save_quantized into `model`, a float instance of the same architecture: the
    layers recorded in the file become their quantized modules, then every tensor is loaded (strict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _METADATA_KEY not in meta:
        raise ValueError(f"load_quantized: {path} was not written by save_quantized (no '{_METADATA_KEY}' metadata)")
    record = json.loads(meta[_METADATA_KEY])
    for name, cfg_dict in record.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_quantized: the file quantizes {name!r}, which the model does not have") from None
        cfg = config_from_dict(cfg_dict)
        kinds = (nn.Linear, nn.Conv2d) if type(cfg) in CONV_MODULE_FOR_CONFIG else (nn.Linear,)
        if not isinstance(linear, kinds):
            raise ValueError(f"load_quantized: {name!r} is a {type(linear).__name__}, expected "
                             f"{' or '.join('nn.' + k.__name__ for k in kinds)}")
        _set_submodule(model, name, empty_module(linear, cfg))
    state = load_file(str(path), device=str(next(iter(model.state_dict().values())).device))
    model.load_state_dict(state, strict=True)
    object.__setattr__(model, _ATTR, record)
    return model


@dataclasses.dataclass
class QuantizationReport:
    layers: dict[str, float]  # quantized module name -> SQNR (dB) of its output against the float model's layer
    output_sqnr: float  # of the model's (first) output
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        lines = [f"model size {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
                 f"({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller); output SQNR "
                 f"{self.output_sqnr:.1f} dB", "layer SQNR (dB):"]
        lines += [f"  {name}: {v:.1f}" for name, v in self.layers.items()]
        return "\n".join(lines)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, Sequence):
        for o in out:
            if isinstance(o, Tensor):
                return o
    raise TypeError(f"quantization_report: the model returned no tensor ({type(out).__name__})")


@torch.no_grad()
def quantization_report(float_model: nn.Module, quantized_model: nn.Module, sample_inputs: Sequence[Any]
                        ) -> QuantizationReport:
    """Runs both models on sample_inputs (the positional arguments of one call) and measures, for every layer
    quantize_ replaced, the SQNR of its output against the same layer of the float model (each layer fed by its
    own model: the error accumulated up to it counts), the SQNR of the model's output, and both models' sizes."""
    record = getattr(quantized_model, _ATTR, None)
    if not record:
        raise ValueError("quantization_report: quantized_model has no layers quantized by quantize_")
    outs: dict[str, dict[str, Tensor]] = {"float": {}, "quant": {}}
    hooks = []
    for side, model in (("float", float_model), ("quant", quantized_model)):
        for name in record:
            module = model.get_submodule(name)
            hooks.append(module.register_forward_hook(
                lambda _m, _i, o, side=side, name=name: outs[side].__setitem__(name, o.detach())))
    try:
        y_float = _first_tensor(float_model(*sample_inputs))
        y_quant = _first_tensor(quantized_model(*sample_inputs))
    finally:
        for h in hooks:
            h.remove()
    layers = {name: sqnr(outs["float"][name], outs["quant"][name]) for name in record
              if name in outs["float"] and name in outs["quant"]}
    return QuantizationReport(layers, sqnr(y_float, y_quant), model_bytes(float_model), model_bytes(quantized_model))
