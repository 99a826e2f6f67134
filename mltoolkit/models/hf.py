"""Hugging Face model folders: `from_pretrained(folder)` and `save_pretrained(model, folder)`.

A folder holds config.json and the weights as model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin (read with torch.load(weights_only=True)). The class comes from config.json's `architectures`
(BertModel, BertForMaskedLM, BertForSequenceClassification, GPT2Model, GPT2LMHeadModel, LlamaModel,
LlamaForCausalLM) or, failing that, its `model_type` (bert, gpt2, llama). Nothing is downloaded.

Loading mirrors transformers: state_dict keys are transformers' own; a checkpoint of the bare trunk loads into a
model with a head (and the reverse) through the base-model prefix (`bert.`, `transformer.`, `model.`); tied weights
(the LM head and the word embeddings) count as present when either key is. Missing and unexpected keys are reported
in a warning and kept in `model.loading_info` (strict=True raises instead); a shape mismatch always raises, naming the
key. save_pretrained writes config.json and model.safetensors (tied copies left out, as transformers does) through
temporary files renamed into place, so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

# class name -> class; filled by @architecture in bert.py and gpt.py
ARCHITECTURES: dict[str, type] = {}
# model_type -> class name used when config.json names no architecture we have
DEFAULT_ARCHITECTURE = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}

# Keys old checkpoints carry that are buffers, not weights (transformers ignores them too).
_IGNORED_KEYS = re.compile(r"(\.position_ids|\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def architecture(cls: type) -> type:
    """Class decorator: make `cls` loadable by from_pretrained under its class name."""
    ARCHITECTURES[cls.__name__] = cls
    return cls


# ---- configs --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    """Base of the model configs: fields carry transformers' names and defaults, so config.json maps one to one.
    Keys of config.json that no field takes are kept in `extra` and written back by to_dict()."""

    model_type: ClassVar[str] = ""
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        d = dict(d)
        names = set(cls.field_names())
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        d.pop("model_type", None)
        return cls(**kwargs, extra=d)

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({k: getattr(self, k) for k in self.field_names()})
        d["model_type"] = self.model_type
        return d

    def replace(self, **overrides) -> Config:
        """A copy with some fields changed; an unknown name raises TypeError listing the fields."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown field(s) {unknown}; fields are {self.field_names()}")
        return dataclasses.replace(self, **overrides)


# ---- the model mixin ------------------------------------------------------------------------------------------

class PreTrainedModel(nn.Module):
    """Common base: config, weight init, tied weights, from_pretrained / save_pretrained."""

    config_class: ClassVar[type] = Config
    base_model_prefix: ClassVar[str] = ""
    # key -> key of the parameter it shares when the weights are tied (the first one is left out when saving)
    tied_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__}: config must be a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        self.config = config
        self.loading_info: dict[str, list[str]] = {"missing_keys": [], "unexpected_keys": []}

    def active_tied_keys(self) -> dict[str, str]:
        return dict(self.tied_keys) if getattr(self.config, "tie_word_embeddings", True) else {}

    def init_weights(self) -> None:
        """transformers' initialization: normal(0, initializer_range) for linear and embedding weights, zero biases,
        LayerNorm weight 1 / bias 0 (a padding_idx row stays zero)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "_init_extra"):
                m._init_extra()

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], *, strict: bool = False,
                        dtype: Optional[torch.dtype] = None, **config_overrides) -> PreTrainedModel:
        """This class loaded from a Hugging Face folder (see mltoolkit.models.hf.from_pretrained)."""
        return from_pretrained(folder, model_class=cls, strict=strict, dtype=dtype, **config_overrides)

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        save_pretrained(self, folder)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


# ---- reading a folder -----------------------------------------------------------------------------------------

def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise FileNotFoundError(f"from_pretrained: {folder} does not exist (only local folders are read; nothing "
                                "is downloaded)")
    if not folder.is_dir():
        raise NotADirectoryError(f"from_pretrained: {folder} is not a folder; pass the folder holding config.json "
                                 "and the weights")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: {folder} has no {CONFIG_NAME}; a Hugging Face model folder holds "
                                f"{CONFIG_NAME} and {SAFE_WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"from_pretrained: {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"from_pretrained: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(folder: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder as one state_dict (safetensors preferred, shards merged)."""
    folder = Path(folder)
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME), (BIN_WEIGHTS_NAME, BIN_INDEX_NAME)):
        if (folder / single).is_file():
            return _load_file(folder / single)
        if (folder / index).is_file():
            with open(folder / index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(folder / shard))
            return state
    raise FileNotFoundError(f"from_pretrained: {folder} has no weights: expected {SAFE_WEIGHTS_NAME}, "
                            f"{SAFE_INDEX_NAME}, {BIN_WEIGHTS_NAME} or {BIN_INDEX_NAME}")


def _pick_class(config: dict, folder: Path) -> type:
    from mltoolkit.models import bert, gpt  # noqa: F401  (fill ARCHITECTURES)

    for name in config.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"from_pretrained: {folder / CONFIG_NAME} has neither a supported 'architectures' entry "
                         f"nor a 'model_type'; supported model_type values: {sorted(DEFAULT_ARCHITECTURE)}")
    if model_type not in DEFAULT_ARCHITECTURE:
        raise ValueError(f"from_pretrained: model_type {model_type!r} (in {folder / CONFIG_NAME}) is not supported; "
                         f"supported: {sorted(DEFAULT_ARCHITECTURE)}")
    return ARCHITECTURES[DEFAULT_ARCHITECTURE[model_type]]


def _align_prefix(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add or strip the base-model prefix when the checkpoint is of the trunk and the model has a head, or the
    reverse (as transformers does)."""
    prefix = model.base_model_prefix
    if not prefix:
        return state
    p = prefix + "."
    model_has = any(k.startswith(p) for k in model.state_dict())
    ckpt_has = any(k.startswith(p) for k in state)
    if model_has and not ckpt_has:
        return {p + k: v for k, v in state.items()}
    if ckpt_has and not model_has:
        return {(k[len(p):] if k.startswith(p) else k): v for k, v in state.items()}
    return state


def _rename_legacy(state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """LayerNorm.gamma / .beta of checkpoints converted from TensorFlow -> .weight / .bias (as transformers does)."""
    renamed = {}
    for k, v in state.items():
        for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
            if k.endswith(old) and k not in own and k[: -len(old)] + new in own:
                k = k[: -len(old)] + new
        renamed[k] = v
    return renamed


def load_weights(model: PreTrainedModel, state: dict[str, torch.Tensor], strict: bool = False) -> dict:
    """Copy `state` (transformers' keys) into `model`; returns {"missing_keys", "unexpected_keys"}.

    Shape mismatches raise ValueError naming every mismatching key. Missing and unexpected keys raise with
    strict=True, else warn (missing weights keep their random init, as in transformers)."""
    own = model.state_dict()
    state = _rename_legacy(_align_prefix(model, state), own)
    tied = model.active_tied_keys()
    mismatched = [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        hint = ""
        if any("embed" in m or "wte" in m or "lm_head" in m or "decoder" in m for m in mismatched):
            hint = " (a different vocab_size in config.json than the weights were trained with?)"
        raise ValueError(f"{type(model).__name__}: the checkpoint's shapes do not match the model{hint}:\n  "
                         + "\n  ".join(mismatched))
    present = set(state)
    missing = [k for k in own if k not in present and not (k in tied and tied[k] in present)
               and not any(k == v and t in present for t, v in tied.items())]
    unexpected = [k for k in state if k not in own and not _IGNORED_KEYS.search(k)]
    if (missing or unexpected) and strict:
        raise RuntimeError(f"{type(model).__name__}: checkpoint does not match the model: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v)
        for alias, target in tied.items():  # a checkpoint holding only the tied copy (e.g. lm_head.weight)
            if target not in present and alias in present:
                own[target].copy_(state[alias])
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing keys (left randomly initialized): {missing}")
        if unexpected:
            lines.append(f"unexpected keys (ignored): {unexpected}")
        warnings.warn(f"{type(model).__name__}: " + "; ".join(lines), stacklevel=3)
    info = {"missing_keys": missing, "unexpected_keys": unexpected}
    model.loading_info = info
    return info


def from_pretrained(folder: Union[str, os.PathLike], *, model_class: Optional[type] = None, strict: bool = False,
                    dtype: Optional[torch.dtype] = None, **config_overrides) -> PreTrainedModel:
    """The model saved in a Hugging Face folder, in eval mode, on the CPU.

    folder: config.json + model.safetensors (or shards, or pytorch_model.bin). model_class: load as this class
    (e.g. BertForSequenceClassification from a BertModel checkpoint) instead of the one config.json names.
    dtype: cast the parameters (default float32). config_overrides: config fields to change before building
    (e.g. num_labels=3). strict: raise on missing or unexpected keys instead of warning."""
    folder = Path(folder)
    raw = _read_config(folder)
    if model_class is None:
        model_class = _pick_class(raw, folder)
    config_class = model_class.config_class
    if raw.get("model_type") not in (None, config_class.model_type):
        raise ValueError(f"from_pretrained: {folder} holds a {raw.get('model_type')!r} model, which "
                         f"{model_class.__name__} ({config_class.model_type!r}) cannot load")
    config = config_class.from_dict(raw)
    if config_overrides:
        config = config.replace(**config_overrides)
    state = load_state_dict(folder)
    model = model_class(config)
    load_weights(model, state, strict=strict)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(model: PreTrainedModel, folder: Union[str, os.PathLike]) -> None:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) that transformers' from_pretrained
    and ours load. Tied copies are left out, shared or non-contiguous tensors are copied; each file is written to a
    temporary name and renamed into place (weights first, config last)."""
    from safetensors.torch import save_file

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_pretrained: model must be a mltoolkit.models text model (BertModel, GPT2LMHeadModel, "
                        f"...), got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = model.active_tied_keys()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items() if k not in tied}
    _atomic_write(folder / SAFE_WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def config_from_pretrained(folder: Union[str, os.PathLike]) -> Any:
    """The parsed config of a folder (BertConfig, GPT2Config or LlamaConfig)."""
    folder = Path(folder)
    raw = _read_config(folder)
    return _pick_class(raw, folder).config_class.from_dict(raw)
