"""The model registry: `@register_model`, `create_model(name, pretrained_path=None, **kwargs)`, `list_models(pattern)`,
and loading a local checkpoint file into a model (`load_pretrained`).

A checkpoint is a state_dict saved with torch.save (or a .safetensors file), possibly wrapped in a dict under
"state_dict", "model", "model_state_dict" or "module", possibly with DDP's "module." prefix. Its key format is
detected: our own keys (which are torchvision's for the models torchvision has) load as they are; other formats
(timm) go through the converters registered for the model's family (mltoolkit.models._timm). Nothing is downloaded.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

# A converter takes a state_dict in some foreign format and returns it in our keys (or None if it is not its format).
Converter = Callable[[Mapping[str, torch.Tensor]], "dict[str, torch.Tensor] | None"]


@dataclass
class ModelEntry:
    name: str
    fn: Callable[..., torch.nn.Module]
    family: str
    aliases: tuple[str, ...] = ()
    converters: dict[str, Converter] = field(default_factory=dict)
    # what forward takes: "image" (N, 3, H, W) float tensors or "tokens" (N, L) int64 token ids; see example_input
    input_kind: str = "image"
    # the text models' class (BertModel, GPT2LMHeadModel, ...): a Hugging Face folder as pretrained_path loads as it
    hf_class: type | None = None


_MODELS: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}
# family -> {format name: converter}; filled by the family modules and _timm.
_CONVERTERS: dict[str, dict[str, Converter]] = {}


INPUT_KINDS = ("image", "tokens")


def register_model(fn: Callable[..., torch.nn.Module] | None = None, *, name: str | None = None,
                   family: str | None = None, aliases: Iterable[str] = (), input_kind: str = "image",
                   hf_class: type | None = None):
    """Register a model builder under `name` (default: the function's name). Usable as `@register_model` or
    `@register_model(name=..., family=..., aliases=(...))`. `family` selects the checkpoint converters (default:
    the builder's module name, e.g. "resnet"); aliases (e.g. timm's names) resolve in create_model but are not
    listed by list_models. `input_kind`: "image" (N, 3, H, W) or "tokens" (N, L) token ids (example_input).
    `hf_class`: the transformers-style class a Hugging Face folder loads as (text models)."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"register_model: input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")

    def wrap(f):
        key = name or f.__name__
        if key in _MODELS or key in _ALIASES:
            raise ValueError(f"register_model: a model named {key!r} is already registered")
        fam = family or f.__module__.rsplit(".", 1)[-1]
        _MODELS[key] = ModelEntry(key, f, fam, tuple(aliases), input_kind=input_kind, hf_class=hf_class)
        for alias in aliases:
            if alias in _MODELS or alias in _ALIASES:
                raise ValueError(f"register_model: alias {alias!r} of {key!r} is already taken")
            _ALIASES[alias] = key
        return f

    return wrap(fn) if fn is not None else wrap


def register_converter(family: str, format_name: str, converter: Converter) -> None:
    """Add a checkpoint key converter for every model of `family` (e.g. "timm" for "resnet")."""
    _CONVERTERS.setdefault(family, {})[format_name] = converter


def register_alias(alias: str, name: str) -> None:
    if alias in _MODELS or alias in _ALIASES:
        raise ValueError(f"register_alias: {alias!r} is already taken")
    _ALIASES[alias] = name


def list_models(pattern: str | Iterable[str] = "*") -> list[str]:
    """The registered model names matching an fnmatch pattern ("resnet*", "vit_?_16") or any of several, sorted."""
    if isinstance(pattern, str):
        patterns = [pattern]
    elif isinstance(pattern, (list, tuple, set)):
        patterns = list(pattern)
    else:
        raise TypeError(f"list_models: pattern must be a str or a list of str, got {type(pattern).__name__}")
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"list_models: pattern must be a str or a list of str, got {type(p).__name__}")
    return sorted(n for n in _MODELS if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def resolve_name(name: str) -> ModelEntry:
    """The registry entry of `name` or of an alias; an unknown name raises ValueError with close matches."""
    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a str, got {type(name).__name__}")
    if name in _MODELS:
        return _MODELS[name]
    if name in _ALIASES:
        return _MODELS[_ALIASES[name]]
    candidates = list(_MODELS) + list(_ALIASES)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"create_model: unknown model name {name!r}{hint} (list_models() gives the {len(_MODELS)} "
                     "registered names)")


# Convolutional families whose models come back channels_last unless asked otherwise (see create_model).
CHANNELS_LAST_FAMILIES = ("resnet", "resnet_keras", "efficientnet")


def create_model(name: str, pretrained_path: str | os.PathLike | None = None, *, strict: bool = True,
                 channels_last: bool | None = None, **kwargs) -> torch.nn.Module:
    """Build the registered model `name` (or a timm alias such as "vit_base_patch16_224") with `kwargs` (e.g.
    num_classes=10 for vision models, config fields such as num_hidden_layers=4 for text models), then, with
    `pretrained_path`, load that local checkpoint.

    channels_last (default: True for the convolutional families, ResNet and EfficientNet): the model's 4-D parameters
    and buffers in channels_last, as optimize() does, so that its convolutions run, and hand each other, channels_last
    activations whatever the input's layout (the layout mltoolkit's CPU kernels run fastest in: ResNet-50 batch 8 on
    the 2-core dev VM, 2026-11-27, inference 198 -> 154 ms, training step 403 -> 362 ms). Values and state_dict keys
    are unchanged; False keeps torch's default layout.

    pretrained_path: a checkpoint file (torch.save'd state_dict, .safetensors, or a Keras ResNet .h5 for the
    *_keras models; see load_pretrained), or, for the text models (bert_*, gpt2*, llama_*), a Hugging Face model
    folder (config.json + weights), loaded by mltoolkit.models.hf.from_pretrained as this name's class with the
    sizes of config.json (kwargs then override config fields; the model comes back in eval mode)."""
    entry = resolve_name(name)
    if pretrained_path is not None and os.path.isdir(os.fspath(pretrained_path)):
        if entry.hf_class is None:
            raise ValueError(f"create_model: pretrained_path {os.fspath(pretrained_path)!r} is a folder; "
                             f"{entry.name!r} loads a checkpoint file (.pth/.pt/.bin/.safetensors"
                             f"{', .h5' if entry.family.endswith('keras') else ''}): pass the file. Hugging Face "
                             "folders load into the text models (list_models('bert*'), 'gpt2*', 'llama*')")
        from mltoolkit.models import hf

        return hf.from_pretrained(pretrained_path, model_class=entry.hf_class, strict=strict, **kwargs)
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"create_model: channels_last must be a bool or None, got {channels_last!r}")
    if channels_last is None:
        channels_last = entry.family in CHANNELS_LAST_FAMILIES
    model = entry.fn(**kwargs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if pretrained_path is not None:
        if entry.hf_class is not None:  # a text model from a weights file: transformers' keys, tied weights
            from mltoolkit.models import hf

            hf.load_weights(model, read_state_dict(pretrained_path), strict=strict)
        else:
            load_pretrained(model, pretrained_path, family=entry.family, strict=strict)
    return model


def example_input(name: str, model: torch.nn.Module | None = None, *, batch_size: int = 2, image_size: int = 32,
                  seq_len: int = 8, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random input the registered model `name` takes: (batch_size, 3, image_size, image_size) floats for image
    models, (batch_size, seq_len) int64 token ids below the model's vocab_size for text models."""
    entry = resolve_name(name)
    if entry.input_kind == "tokens":
        config = getattr(model, "config", None)
        vocab = getattr(config, "vocab_size", None) or 1000
        return torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    size = getattr(model, "image_size", None) or image_size
    return torch.randn(batch_size, 3, size, size, generator=generator)


# ---- checkpoints ------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether `path` is an HDF5 file (a Keras weights file): by its signature, whatever the extension."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a local file: torch.save'd (weights_only) or .safetensors; unwraps {"state_dict": ...}."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"pretrained_path: {path!r} is a folder; a checkpoint file is expected here "
                                "(Hugging Face folders load with mltoolkit.models.from_pretrained(folder) or "
                                "create_model('<text model>', pretrained_path=folder))")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_path: no such file {path!r} (only local files are read)")
    if is_hdf5(path):
        raise ValueError(f"pretrained_path: {path!r} is an HDF5 (Keras) weights file; Keras ResNet weights load "
                         "into the Keras-architecture models: create_model('resnet50_keras', pretrained_path=...)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"pretrained_path: {where} does not hold a state_dict (a mapping of names to tensors)")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:  # DDP / torch.compile / Lightning wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _match_score(keys: Iterable[str], expected: set[str]) -> float:
    keys = set(keys)
    return len(keys & expected) / max(1, len(keys | expected))


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module,
                       family: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """`state_dict` in `model`'s keys and the name of the format it was in ("mltoolkit" — our keys, which are
    torchvision's where torchvision has the model — or a converter's name such as "timm"): the format whose
    converted keys match the model's best."""
    expected = set(model.state_dict().keys())
    best = (dict(state_dict), "mltoolkit", _match_score(state_dict.keys(), expected))
    if best[2] == 1.0:
        return best[0], best[1]
    for fmt, conv in _CONVERTERS.get(family or "", {}).items():
        try:
            converted = conv(state_dict)
        except Exception:  # noqa: BLE001 - a converter that chokes is simply not this format
            converted = None
        if converted is not None:
            score = _match_score(converted.keys(), expected)
            if score > best[2]:
                best = (converted, fmt, score)
    return best[0], best[1]


def _list(keys: list[str], limit: int = 8) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(model: torch.nn.Module, path_or_state_dict, *, family: str | None = None,
                    strict: bool = True) -> torch.nn.modules.module._IncompatibleKeys:
    """Load a local checkpoint file (or a state_dict) into `model`, converting foreign key formats.

    A tensor whose shape differs from the model's raises ValueError naming the key and both shapes (always, also
    with strict=False). Missing or unexpected keys raise KeyError listing them when strict, else warn. Returns
    load_state_dict's (missing_keys, unexpected_keys)."""
    if isinstance(path_or_state_dict, (str, os.PathLike)) and is_hdf5(path_or_state_dict):
        from mltoolkit.models import keras

        sd, where, fmt = keras.read_keras_resnet(path_or_state_dict, model, strict), os.fspath(path_or_state_dict), \
            "keras"
    else:
        if isinstance(path_or_state_dict, (str, os.PathLike)):
            sd, where = read_state_dict(path_or_state_dict), os.fspath(path_or_state_dict)
        else:
            sd, where = unwrap_state_dict(path_or_state_dict), "state_dict"
        if family is None:
            family = getattr(model, "_mltk_family", None)
        sd, fmt = convert_state_dict(sd, model, family)
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"load_pretrained: {where} ({fmt} format): {key!r} has shape {list(value.shape)} but "
                             f"the model's {key!r} has shape {list(own[key].shape)} (different num_classes, "
                             "image_size or model size?)")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        msg = (f"load_pretrained: {where} ({fmt} format) does not match {type(model).__name__}: "
               f"{len(missing)} missing key(s) [{_list(missing)}], {len(unexpected)} unexpected key(s) "
               f"[{_list(unexpected)}]")
        if strict:
            raise KeyError(msg + "; pass strict=False to load the rest")
        warnings.warn(msg, stacklevel=2)
    return model.load_state_dict(sd, strict=False)


# ---- from_pretrained / save_pretrained ------------------------------------------------------------------------------

def from_pretrained(path: str | os.PathLike, model_name: str | None = None, *, strict: bool | None = None,
                    **kwargs) -> torch.nn.Module:
    """A model with the weights at a local `path` (nothing is downloaded).

    - a Hugging Face folder (config.json + model.safetensors / pytorch_model.bin): the text model config.json names
      (BertModel, GPT2LMHeadModel, LlamaForCausalLM, ...; or `model_name`'s class, e.g. "bert_base_classifier"),
      in eval mode; kwargs override config fields; strict defaults to False (missing keys warn, as transformers).
    - a Keras ResNet weights file (.h5): resnet50/101/152_keras with num_classes from the file.
    - a checkpoint file (torchvision, timm or mltoolkit state_dict, .pth / .safetensors): a state_dict does not
      name its architecture, so pass `model_name` (and kwargs such as num_classes=10): this is
      create_model(model_name, pretrained_path=path, **kwargs); strict defaults to True."""
    p = os.fspath(path)
    if os.path.isdir(p):
        from mltoolkit.models import hf

        cls = None
        if model_name is not None:
            entry = resolve_name(model_name)
            if entry.hf_class is None:
                raise ValueError(f"from_pretrained: {p!r} is a folder (Hugging Face format), which only the text "
                                 f"models load; {entry.name!r} takes a checkpoint file")
            cls = entry.hf_class
        return hf.from_pretrained(p, model_class=cls, strict=bool(strict), **kwargs)
    if not os.path.exists(p):
        raise FileNotFoundError(f"from_pretrained: no such file or folder {p!r} (only local paths are read; nothing "
                                "is downloaded)")
    if model_name is None:
        if not is_hdf5(p):
            raise ValueError(f"from_pretrained: {p!r} is a checkpoint file, and a state_dict does not say which "
                             "architecture it is: pass the model name, e.g. from_pretrained(path, 'resnet50', "
                             "num_classes=10) (list_models() gives the names; torchvision, timm and mltoolkit keys "
                             "load), or a Hugging Face folder (config.json + weights) for the text models")
        from mltoolkit.models import keras

        model_name, inferred = keras.infer_model(p)
        kwargs = {**inferred, **kwargs}
    return create_model(model_name, pretrained_path=p, strict=True if strict is None else strict, **kwargs)


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Write a text model as a Hugging Face folder (config.json + model.safetensors) that transformers and
    from_pretrained load (see mltoolkit.models.hf.save_pretrained); vision models save with torch.save(
    model.state_dict(), path) and load with create_model(name, pretrained_path=path)."""
    from mltoolkit.models import hf

    if not isinstance(model, hf.PreTrainedModel):
        raise TypeError(f"save_pretrained: writes Hugging Face folders of the text models (BertModel, "
                        f"GPT2LMHeadModel, LlamaForCausalLM, ...), got {type(model).__name__}; save a vision model "
                        "with torch.save(model.state_dict(), path) and load it with create_model(name, "
                        "pretrained_path=path)")
    hf.save_pretrained(model, folder)
