"""quantize_(model, config): swap a model's nn.Linear layers for quantized ones in place; save_quantized /
load_quantized: a quantized model's tensors and configs in one safetensors file, restored exactly;
quantization_report: what quantization did to each layer's output and to the model's size."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mltoolkit.quantization.config import QuantConfig, config_from_dict
from mltoolkit.quantization.modules import MODULE_FOR_CONFIG, empty_module
from mltoolkit.testing import sqnr

_ATTR = "_mltk_quantization"  # {module name: config dict} on the root module
_METADATA_KEY = "mltoolkit.quantization"


@dataclasses.dataclass
class QuantizeSummary:
    quantized: dict[str, str]  # module name -> config type
    skipped: dict[str, str]  # module name -> why
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        lines = [f"quantize_: {len(self.quantized)} of {len(self.quantized) + len(self.skipped)} Linear layers "
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


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
              overrides: Optional[Mapping[str, Optional[QuantConfig]]] = None, verbose: bool = True
              ) -> QuantizeSummary:
    """Replaces, in place, every nn.Linear of `model` (filter_fn(module, name) True, or no filter_fn) by the
    quantized module of `config`: Int8Linear for Int8DynamicActivationInt8WeightConfig, Int4Linear for
    Int4WeightOnlyConfig. overrides: module name -> another config, or None to leave that layer in float.
    Layers the config cannot take (e.g. in_features not a multiple of the int4 group size) stay float and are
    listed. Prints (verbose) and returns a summary; model_bytes gives the sizes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig) or type(config) not in MODULE_FOR_CONFIG:
        raise TypeError(f"quantize_: config must be one of {', '.join(c.__name__ for c in MODULE_FOR_CONFIG)}, got "
                        f"{type(config).__name__}")
    overrides = dict(overrides or {})
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"quantize_: overrides name modules that are not nn.Linear layers of the model: "
                         f"{sorted(unknown)}")
    before = model_bytes(model)
    done: dict[str, str] = {}
    skipped: dict[str, str] = {}
    record = getattr(model, _ATTR, {})
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
        _set_submodule(model, name, MODULE_FOR_CONFIG[type(cfg)].from_float(module, cfg))
        done[name] = type(cfg).__name__
        record[name] = cfg.to_dict()
    object.__setattr__(model, _ATTR, record)  # a plain attribute, not a submodule or buffer
    summary = QuantizeSummary(done, skipped, before, model_bytes(model))
    if verbose:
        print(summary)
    return summary


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
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"load_quantized: {name!r} is a {type(linear).__name__}, expected nn.Linear")
        _set_submodule(model, name, empty_module(linear, config_from_dict(cfg_dict)))
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
