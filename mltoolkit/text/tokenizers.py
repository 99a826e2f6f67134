"""Tokenizers for text models, built on the Hugging Face `tokenizers` library (and `sentencepiece` for `.model` files).

    tok = mltoolkit.text.load_tokenizer("path/to/checkpoint")      # tokenizer.json, vocab.txt, vocab.json + merges.txt
    batch = tok(["a text", "another one"], padding=True, truncation=True, max_length=128)
    batch["input_ids"], batch["attention_mask"]                      # (2, L) int64 tensors; + token_type_ids for BERT
    tok = mltoolkit.text.train_tokenizer(texts, kind="wordpiece", vocab_size=8000)

Every format is turned into one `tokenizers.Tokenizer` pipeline (normalizer, pre-tokenizer, model, post-processor,
decoder) and `Tokenizer` wraps it with the calling convention of `transformers`' tokenizers: the same padding,
truncation and `max_length` semantics, the same special-token handling, so the ids equal those of `transformers`.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # the library is optional for the rest of mltoolkit: import errors surface when a tokenizer is made
    import tokenizers as _tk
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import models as _models
    from tokenizers import trainers as _trainers
except ImportError:  # pragma: no cover - exercised only without the library
    _tk = None

__all__ = ["Tokenizer", "BatchEncoding", "load_tokenizer", "train_tokenizer", "TOKENIZER_FILES"]

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model (or spiece.model, sentencepiece.bpe.model)",
                   "vocab.json + merges.txt", "vocab.txt")
_SPM_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model")
_LARGE = int(1e12)  # transformers writes model_max_length = 1e30 for "no limit"
_PADDING = {"longest", "max_length", "do_not_pad"}
_TRUNCATION = {"longest_first", "only_first", "only_second", "do_not_truncate"}
_SPIECE = "\u2581"  # "▁", SentencePiece's whitespace symbol


def _require_tokenizers():
    if _tk is None:
        raise ImportError("mltoolkit.text needs the `tokenizers` library: pip install tokenizers")


class BatchEncoding(dict):
    """The result of calling a Tokenizer: a dict (`input_ids`, `attention_mask`, maybe `token_type_ids`) whose values
    can also be read as attributes; `.to(device)` moves the tensors."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _token_str(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict or None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return str(value["content"])
    return str(value)


class Tokenizer:
    """A tokenizer: a `tokenizers.Tokenizer` pipeline plus the special tokens and calling convention of
    `transformers`' tokenizers.

    Call it on a string or a list of strings (and optionally `text_pair`) to get `input_ids`, `attention_mask` and,
    for tokenizers whose `model_input_names` include it (BERT-style), `token_type_ids` as int64 tensors.
    """

    def __init__(self, backend, *, model_max_length: int | None = None, padding_side: str = "right",
                 truncation_side: str = "right", model_input_names: Sequence[str] | None = None,
                 extra_special_tokens: Sequence[str] = (), spm_model: bytes | None = None,
                 config: Mapping[str, Any] | None = None, **special_tokens):
        _require_tokenizers()
        if not isinstance(backend, _tk.Tokenizer):
            raise TypeError(f"Tokenizer: backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise TypeError(f"Tokenizer: unexpected keyword argument(s) {sorted(unknown)}")
        self._backend = backend
        self.model_max_length = None if model_max_length is None or model_max_length >= _LARGE else model_max_length
        self.padding_side = _check_side("padding_side", padding_side)
        self.truncation_side = _check_side("truncation_side", truncation_side)
        self.model_input_names = list(model_input_names or ["input_ids", "attention_mask"])
        self.spm_model = spm_model
        self.config = dict(config or {})
        self._special: dict[str, str | None] = {name: None for name in SPECIAL_TOKEN_NAMES}
        for name, value in special_tokens.items():
            self._special[name] = _token_str(value)
        extra = [_token_str(t) for t in extra_special_tokens]
        self._register_special([t for t in self._special.values() if t is not None] + extra)
        self.extra_special_tokens = extra
        self._backend.no_padding()
        self._backend.no_truncation()

    # -- special tokens -------------------------------------------------------------------------------------------
    def _register_special(self, tokens: Iterable[str]):
        """Make the special tokens atomic in the pipeline (as transformers does): a special token written in the text
        maps to its id, is never split, and is dropped by `decode(skip_special_tokens=True)`."""
        present = {str(t.content) for t in self._backend.get_added_tokens_decoder().values() if t.special}
        missing = [t for t in dict.fromkeys(tokens) if t not in present]
        if missing:
            self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    def _get(self, name):
        return self._special[name]

    def _set(self, name, value):
        value = _token_str(value)
        if value is not None:
            self._register_special([value])
        self._special[name] = value

    def _get_id(self, name):
        token = self._special[name]
        return None if token is None else self._backend.token_to_id(token)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([t for t in self._special.values() if t is not None] + self.extra_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._backend.token_to_id(t) for t in self.all_special_tokens]

    def add_special_tokens(self, tokens: Mapping[str, str] | Sequence[str]) -> int:
        """Add special tokens: a mapping such as {"pad_token": "[PAD]"} or a list of extra ones. Returns how many
        tokens are new to the vocabulary."""
        before = len(self)
        if isinstance(tokens, Mapping):
            for name, value in tokens.items():
                if name not in SPECIAL_TOKEN_NAMES:
                    raise ValueError(f"add_special_tokens: unknown key {name!r}; expected one of {SPECIAL_TOKEN_NAMES}")
                self._set(name, value)
        else:
            tokens = [_token_str(t) for t in tokens]
            self._register_special(tokens)
            self.extra_special_tokens += [t for t in tokens if t not in self.extra_special_tokens]
        return len(self) - before

    def add_tokens(self, tokens: Sequence[str]) -> int:
        """Add ordinary (non-special) tokens to the vocabulary; returns how many are new."""
        return self._backend.add_tokens([str(t) for t in tokens])

    # -- vocabulary -----------------------------------------------------------------------------------------------
    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as in transformers; `len(tokenizer)` counts them."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self._backend.id_to_token(int(index))

    def convert_tokens_to_ids(self, tokens):
        unk = self.unk_token_id
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            return unk if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in _as_id_list(ids, "ids")]

    # -- encoding ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str, text_pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        _check_text("text", text)
        return self._encode_batch([text], None if text_pair is None else [text_pair], add_special_tokens)[0].tokens

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True,
               truncation: bool | str | None = None, max_length: int | None = None) -> list[int]:
        """The ids of one text (or pair), as a list."""
        _check_text("text", text)
        if text_pair is not None:
            _check_text("text_pair", text_pair)
        out = self(text, text_pair=text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                   max_length=max_length, return_tensors=None, return_attention_mask=False)
        return out["input_ids"]

    def __call__(self, texts: str | Sequence[str], text_pair: str | Sequence[str] | None = None, *,
                 padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
                 return_tensors: str | None = "pt", add_special_tokens: bool = True,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_token_type_ids: bool | None = None, return_attention_mask: bool | None = None,
                 return_special_tokens_mask: bool = False, return_offsets_mapping: bool = False) -> BatchEncoding:
        """Encode a text or a batch of texts (and optionally a second text per item, `text_pair`).

        padding: False / "do_not_pad", True / "longest" (to the batch's longest), "max_length" (to `max_length`, or
            the model's `model_max_length` when not given). Needs a pad token.
        truncation: False / "do_not_truncate", True / "longest_first", "only_first", "only_second". None (default)
            means "longest_first" when `max_length` is given and padding is off, as in transformers. Truncates to
            `max_length` (or `model_max_length`), special tokens included.
        return_tensors: "pt" gives (batch, length) int64 tensors (batch 1 for a single string; sequences must have
            equal lengths, i.e. pad or all be the same length); None gives python lists (a flat list for a single
            string).
        """
        single = isinstance(texts, str)
        batch = _check_texts("texts", texts)
        if not batch:
            raise ValueError("Tokenizer: texts is an empty list")
        pairs = None
        if text_pair is not None:
            if isinstance(text_pair, str) != single:
                raise TypeError("Tokenizer: text_pair must be a string when texts is a string, a list of the same "
                                "length when texts is a list")
            pairs = _check_texts("text_pair", text_pair)
            if len(pairs) != len(batch):
                raise ValueError(f"Tokenizer: text_pair has {len(pairs)} items, texts has {len(batch)}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"Tokenizer: return_tensors must be 'pt' or None, got {return_tensors!r}")
        if padding_side is not None:
            _check_side("padding_side", padding_side)
        pad_strategy, trunc_strategy, max_length = self._strategies(padding, truncation, max_length,
                                                                    pad_to_multiple_of)
        encodings = self._encode_batch(batch, pairs, add_special_tokens, pad_strategy, trunc_strategy, max_length,
                                       pad_to_multiple_of, padding_side or self.padding_side)
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        fields = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids:
            fields["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask:
            fields["attention_mask"] = [e.attention_mask for e in encodings]
        if return_special_tokens_mask:
            fields["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if return_offsets_mapping:
            fields["offset_mapping"] = [e.offsets for e in encodings]
        if return_tensors is None:
            return BatchEncoding({k: v[0] if single else v for k, v in fields.items()})
        lengths = {len(ids) for ids in fields["input_ids"]}
        if len(lengths) > 1:
            raise ValueError(f"Tokenizer: the sequences have different lengths ({min(lengths)} to {max(lengths)}), so "
                             "they do not make one tensor: pass padding=True (or padding='max_length'), or "
                             "return_tensors=None for lists")
        shape = {"offset_mapping": (len(batch), -1, 2)}
        return BatchEncoding({k: torch.from_numpy(np.asarray(v, dtype=np.int64).reshape(shape.get(k, (len(batch), -1))))
                              for k, v in fields.items()})

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """transformers' `_get_padding_truncation_strategies`: returns (padding, truncation, max_length)."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 0):
            raise ValueError(f"Tokenizer: max_length must be a non-negative int or None, got {max_length!r}")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError("Tokenizer: pad_to_multiple_of must be a positive int or None, got "
                             f"{pad_to_multiple_of!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        if padding is True:
            pad = "longest"
        elif padding is False:
            pad = "do_not_pad"
        elif isinstance(padding, str) and padding in _PADDING:
            pad = padding
        else:
            raise ValueError(f"Tokenizer: padding must be False, True, 'longest', 'max_length' or 'do_not_pad', "
                             f"got {padding!r}")
        if truncation is True:
            trunc = "longest_first"
        elif truncation is False or truncation is None:
            trunc = "do_not_truncate"
        elif isinstance(truncation, str) and truncation in _TRUNCATION:
            trunc = truncation
        else:
            raise ValueError(f"Tokenizer: truncation must be False, True, 'longest_first', 'only_first', "
                             f"'only_second' or 'do_not_truncate', got {truncation!r}")
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length is None:  # as transformers: warn, and do not pad
                    warnings.warn("Tokenizer: padding='max_length' without max_length, and this tokenizer has no "
                                  "model_max_length: not padding", stacklevel=3)
                    pad = "do_not_pad"
                else:
                    max_length = self.model_max_length
            if trunc != "do_not_truncate":
                if self.model_max_length is None:
                    trunc = "do_not_truncate"  # transformers: no limit known, nothing to truncate to
                else:
                    max_length = self.model_max_length
        if pad != "do_not_pad" and self.pad_token_id is None:
            raise ValueError("Tokenizer: padding was requested but the tokenizer has no pad token; set one, e.g. "
                             "tokenizer.pad_token = tokenizer.eos_token, or tokenizer.add_special_tokens("
                             "{'pad_token': '[PAD]'})")
        if (trunc != "do_not_truncate" and pad != "do_not_pad" and pad_to_multiple_of is not None
                and max_length is not None and max_length % pad_to_multiple_of):
            raise ValueError(f"Tokenizer: truncation length ({max_length}) is not a multiple of pad_to_multiple_of "
                             f"({pad_to_multiple_of})")
        return pad, trunc, max_length

    def _encode_batch(self, texts, pairs, add_special_tokens, pad="do_not_pad", trunc="do_not_truncate",
                      max_length=None, pad_to_multiple_of=None, padding_side="right"):
        backend = self._backend
        try:
            if trunc != "do_not_truncate":
                backend.enable_truncation(max_length, stride=0, strategy=trunc, direction=self.truncation_side)
            if pad != "do_not_pad":
                backend.enable_padding(direction=padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                                       pad_token=self.pad_token, length=max_length if pad == "max_length" else None,
                                       pad_to_multiple_of=pad_to_multiple_of)
            inputs = texts if pairs is None else list(zip(texts, pairs))
            try:
                return backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except Exception as e:  # the Rust side's truncation errors, e.g. max_length below the special tokens
                raise ValueError(f"Tokenizer: {e}") from e
        finally:
            backend.no_padding()
            backend.no_truncation()

    # -- decoding ---------------------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (a list or a 1-D tensor)."""
        return self._backend.decode(_as_id_list(ids, "ids"), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences (a list of lists or a 2-D tensor)."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"batch_decode: sequences must be 2-D, got shape {tuple(sequences.shape)}")
            sequences = sequences.tolist()
        return self._backend.decode_batch([_as_id_list(s, "sequences") for s in sequences],
                                          skip_special_tokens=skip_special_tokens)

    # -- saving -----------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> list[str]:
        """Write tokenizer.json and tokenizer_config.json (the files transformers reads), plus the model's native
        files: vocab.txt (WordPiece), vocab.json + merges.txt (BPE), tokenizer.model (SentencePiece). Returns the
        paths written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [str(folder / "tokenizer.json")]
        self._backend.save(written[0])
        model = self._backend.model
        if isinstance(model, _models.WordPiece):
            vocab = self._backend.get_vocab(with_added_tokens=False)
            by_id = sorted(vocab.items(), key=lambda kv: kv[1])
            if [i for _, i in by_id] == list(range(len(by_id))):
                (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")
                written.append(str(folder / "vocab.txt"))
        elif isinstance(model, _models.BPE) and self.spm_model is None:
            written += model.save(str(folder))
        if self.spm_model is not None:
            (folder / "tokenizer.model").write_bytes(self.spm_model)
            written.append(str(folder / "tokenizer.model"))
        config = dict(self.config)
        config.update({name: value for name, value in self._special.items()})
        config.update(model_max_length=self.model_max_length if self.model_max_length is not None else _LARGE * 10**18,
                      padding_side=self.padding_side, truncation_side=self.truncation_side,
                      model_input_names=self.model_input_names, extra_special_tokens=self.extra_special_tokens,
                      tokenizer_class=config.get("tokenizer_class") or "TokenizersBackend")
        config.pop("added_tokens_decoder", None)
        config.pop("additional_special_tokens", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
        written.append(str(folder / "tokenizer_config.json"))
        return written

    save_pretrained = save

    def __repr__(self):
        kind = type(self._backend.model).__name__
        return (f"Tokenizer({kind}, vocab_size={self.vocab_size}, added={len(self) - self.vocab_size}, "
                f"special={self.all_special_tokens}, model_max_length={self.model_max_length})")


def _special_property(name):
    return property(lambda self: self._get(name), lambda self, value: self._set(name, value),
                    doc=f"The {name.replace('_', ' ')} (a string) or None; settable.")


def _special_id_property(name):
    return property(lambda self: self._get_id(name), doc=f"The id of the {name.replace('_', ' ')}, or None.")


for _name in SPECIAL_TOKEN_NAMES:
    setattr(Tokenizer, _name, _special_property(_name))
    setattr(Tokenizer, _name + "_id", _special_id_property(_name))
del _name


def _check_side(name, value):
    if value not in ("left", "right"):
        raise ValueError(f"Tokenizer: {name} must be 'left' or 'right', got {value!r}")
    return value


def _check_text(name, value):
    if not isinstance(value, str):
        raise TypeError(f"Tokenizer: {name} must be a string, got {type(value).__name__}")


def _check_texts(name, texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"Tokenizer: {name} must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"Tokenizer: {name}[{i}] must be a string, got {type(t).__name__}")
    return list(texts)


def _as_id_list(ids, name) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode: {name} must be 1-D, got shape {tuple(ids.shape)}")
        return ids.tolist()
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        raise TypeError(f"decode: {name} must be a sequence of ints or a 1-D tensor") from None


# ---------------------------------------------------------------------------------------------------------------------
# Loading what ships with a checkpoint folder
# ---------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"load_tokenizer: {path} is not valid JSON: {e}") from e


def _read_config(folder: Path) -> dict:
    """tokenizer_config.json merged with special_tokens_map.json (the older place of the special tokens)."""
    config = {}
    if (folder / "special_tokens_map.json").is_file():
        config.update(_read_json(folder / "special_tokens_map.json"))
    if (folder / "tokenizer_config.json").is_file():
        config.update({k: v for k, v in _read_json(folder / "tokenizer_config.json").items() if v is not None
                       or k not in config})
    return config


def _extra_tokens(config) -> list[str]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, Mapping):  # transformers v5 may write {name: token}
        extra = list(extra.values())
    return [_token_str(t) for t in extra]


def _add_config_tokens(backend, config):
    """Tokens listed in added_tokens_decoder ({id: {"content", "special", ...}}) that the pipeline lacks."""
    decoder = config.get("added_tokens_decoder") or {}
    have = backend.get_vocab(with_added_tokens=True)
    for index, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        content = _token_str(spec)
        if content in have:
            continue
        kwargs = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if isinstance(spec, Mapping)
                  and k in spec}
        token = AddedToken(content, special=bool(spec.get("special", False)) if isinstance(spec, Mapping) else False,
                           **kwargs)
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if backend.token_to_id(content) != int(index):
            raise ValueError(f"load_tokenizer: added token {content!r} should have id {index} but got "
                             f"{backend.token_to_id(content)}: the vocabulary does not match tokenizer_config.json")


def _common_kwargs(config, backend, defaults: Mapping[str, Any]) -> dict:
    kwargs: dict[str, Any] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config[name] if name in config else defaults.get(name)
        token = _token_str(value)
        if token is not None and backend.token_to_id(token) is None and name not in config:
            token = None  # a default special token the vocabulary does not have
        kwargs[name] = token
    kwargs["extra_special_tokens"] = _extra_tokens(config)
    kwargs["model_max_length"] = config.get("model_max_length")
    kwargs["padding_side"] = config.get("padding_side") or defaults.get("padding_side", "right")
    kwargs["truncation_side"] = config.get("truncation_side") or "right"
    kwargs["model_input_names"] = config.get("model_input_names") or defaults.get("model_input_names")
    kwargs["config"] = config
    return kwargs


def _bool(config, key, default):
    value = config.get(key)
    return default if value is None else bool(value)


def _guess_special(backend) -> dict[str, str]:
    """Special tokens of a bare tokenizer.json (no tokenizer_config.json), by the usual names of its added tokens."""
    names = {"[PAD]": "pad_token", "<pad>": "pad_token", "[UNK]": "unk_token", "<unk>": "unk_token",
             "[CLS]": "cls_token", "[SEP]": "sep_token", "[MASK]": "mask_token", "<mask>": "mask_token",
             "<s>": "bos_token", "</s>": "eos_token", "<|endoftext|>": "eos_token"}
    found = {}
    for token in backend.get_added_tokens_decoder().values():
        name = names.get(str(token.content))
        if name and name not in found:
            found[name] = str(token.content)
    model = backend.model
    unk = getattr(model, "unk_token", None)
    if isinstance(unk, str) and backend.token_to_id(unk) is not None:
        found.setdefault("unk_token", unk)
    if backend.padding:
        found.setdefault("pad_token", backend.padding["pad_token"])
    if found.get("eos_token") == "<|endoftext|>":
        found.setdefault("bos_token", "<|endoftext|>")
        found.setdefault("unk_token", "<|endoftext|>")
    return found


def _load_tokenizer_json(path: Path, config: dict) -> Tokenizer:
    try:
        backend = _tk.Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"load_tokenizer: cannot read {path}: {e}") from e
    _add_config_tokens(backend, config)
    defaults: dict[str, Any] = dict(_guess_special(backend)) if not any(n in config for n in SPECIAL_TOKEN_NAMES) \
        else {}
    if "model_input_names" not in config and _uses_token_type_ids(backend, config):
        defaults["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    if backend.padding:
        defaults.setdefault("pad_token", backend.padding["pad_token"])
        defaults["padding_side"] = backend.padding["direction"]
    tok = Tokenizer(backend, **_common_kwargs(config, backend, defaults))
    _apply_bos_eos(tok, config, default_template=None)
    return tok


# transformers' tokenizer classes whose model_input_names include token_type_ids
_TYPE_ID_CLASSES = ("Bert", "Electra", "MobileBert", "ConvBert", "Funnel", "Splinter", "SqueezeBert",
                    "RoFormer", "XLNet", "LayoutLM", "MegatronBert", "Ernie", "Nezha", "Tapas", "Canine")


def _uses_token_type_ids(backend, config) -> bool:
    """Whether the model takes token_type_ids: by the config's tokenizer class when it names one, else whether the
    post-processor marks the second text of a pair with type id 1 around special tokens ([CLS] A [SEP] B [SEP])."""
    cls = str(config.get("tokenizer_class") or "")
    if cls:
        return cls.startswith(_TYPE_ID_CLASSES)
    if backend.post_processor is None:
        return False
    spec = json.loads(backend.to_str()).get("post_processor") or {}
    kind = spec.get("type")
    if kind == "BertProcessing":
        return True
    if kind == "TemplateProcessing":
        pieces = [next(iter(piece.items())) for piece in spec.get("pair", [])]
        return (any(v.get("type_id", 0) for _, v in pieces) and any(k == "SpecialToken" for k, _ in pieces))
    return False


def _apply_bos_eos(tok: Tokenizer, config: dict, default_template: tuple[bool, bool] | None):
    """Llama/T5-style configs: add_bos_token / add_eos_token decide the post-processor, as in transformers'
    `update_post_processor`. Without them the pipeline keeps its own post-processor (default_template None) or gets
    the default (add_bos, add_eos)."""
    explicit = "add_bos_token" in config or "add_eos_token" in config
    if not explicit and (default_template is None or tok.backend.post_processor is not None):
        return
    add_bos, add_eos = default_template or (False, False)
    add_bos = _bool(config, "add_bos_token", add_bos) and tok.bos_token is not None
    add_eos = _bool(config, "add_eos_token", add_eos) and tok.eos_token is not None
    bos, eos = tok.bos_token, tok.eos_token
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    special = ([(bos, tok.bos_token_id)] if add_bos else []) + ([(eos, tok.eos_token_id)] if add_eos else [])
    tok.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _wordpiece_backend(vocab: dict[str, int], *, unk_token, lowercase, strip_accents, chinese_chars,
                       max_input_chars_per_word=100):
    backend = _tk.Tokenizer(_models.WordPiece(vocab, unk_token=unk_token,
                                              max_input_chars_per_word=max_input_chars_per_word))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _bert_post_processor(tok: Tokenizer):
    cls, sep = tok.cls_token, tok.sep_token
    if cls is None or sep is None:
        return
    tok.backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.cls_token_id), (sep, tok.sep_token_id)])


def _load_vocab_txt(path: Path, config: dict) -> Tokenizer:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab.setdefault(line.rstrip("\n"), index)  # BERT's load_vocab: a repeated token keeps its first id
    if not vocab:
        raise ValueError(f"load_tokenizer: {path} is empty")
    defaults = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]", "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    unk = _token_str(config.get("unk_token", "[UNK]"))
    backend = _wordpiece_backend(vocab, unk_token=unk, lowercase=_bool(config, "do_lower_case", True),
                                 strip_accents=config.get("strip_accents"),
                                 chinese_chars=_bool(config, "tokenize_chinese_chars", True))
    _add_config_tokens(backend, config)
    tok = Tokenizer(backend, **_common_kwargs(config, backend, defaults))
    _bert_post_processor(tok)
    return tok


def _load_bpe_files(vocab_path: Path, merges_path: Path, config: dict) -> Tokenizer:
    vocab = _read_json(vocab_path)
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"load_tokenizer: {merges_path} line {number}: a merge is two tokens separated by "
                                 f"one space, got {line!r}")
            merges.append((parts[0], parts[1]))
    try:
        model = _models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                            fuse_unk=False)
    except Exception as e:
        raise ValueError(f"load_tokenizer: {vocab_path} and {merges_path} do not make a BPE model: {e}") from e
    backend = _tk.Tokenizer(model)
    add_prefix_space = _bool(config, "add_prefix_space", False)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    _add_config_tokens(backend, config)
    defaults = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    tok = Tokenizer(backend, **_common_kwargs(config, backend, defaults))
    _apply_bos_eos(tok, config, default_template=(False, False))
    return tok


# -- SentencePiece -------------------------------------------------------------------------------------------------
def _spm_proto(data: bytes, where: str):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise ImportError(f"load_tokenizer: reading {where} needs the `sentencepiece` and `protobuf` libraries: "
                          f"pip install sentencepiece protobuf ({e})") from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:
        raise ValueError(f"load_tokenizer: {where} is not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise ValueError(f"load_tokenizer: {where} is not a SentencePiece model (no pieces)")
    return proto


_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _spm_backend(proto, *, add_prefix_space: bool | None = None, metaspace: str | None = None,
                 extra_pieces: Sequence[str] = (), pre_normalizers: Sequence = ()):
    """A tokenizers pipeline that encodes like `SentencePieceProcessor.encode` for the model `proto`: its normalizer
    spec (precompiled NFKC rules, extra-whitespace removal, whitespace escaping, dummy prefix), its Unigram scores or
    BPE merges (ranked by the merged piece's score) and byte fallback. Control pieces become special added tokens and
    user-defined pieces added tokens (atomic), as transformers does."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type not in (1, 2):
        raise ValueError(f"load_tokenizer: SentencePiece model type {trainer.model_type} is not supported "
                         "(Unigram and BPE are)")
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("load_tokenizer: SentencePiece models with treat_whitespace_as_suffix are not supported")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces] + [(p, 0.0, _CONTROL) for p in extra_pieces]
    byte_fallback = bool(trainer.byte_fallback)
    if trainer.model_type == 1:
        model = _models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=trainer.unk_id,
                                byte_fallback=byte_fallback)
    else:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == _NORMAL}
        ranked = []
        for piece, (score, index) in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-score, index, left, right))
        merges = [(left, right) for _, _, left, right in sorted(ranked)]
        model = _models.BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=byte_fallback,
                            dropout=None)
    backend = _tk.Tokenizer(model)
    steps = list(pre_normalizers)
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    dummy_prefix = norm.add_dummy_prefix if add_prefix_space is None else add_prefix_space
    if metaspace is not None:
        # transformers' Llama tokenizer: the dummy prefix by a Metaspace pre-tokenizer, which adds none when the text
        # already starts with a space (SentencePiece would) and, with legacy=False ("first"), none after a special
        # token either
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE, split=False,
                                                         prepend_scheme=metaspace if dummy_prefix else "never")
    else:
        if norm.escape_whitespaces:
            steps.append(normalizers.Replace(" ", _SPIECE))
        if dummy_prefix:
            steps.append(normalizers.Prepend(_SPIECE))  # Prepend skips empty strings, as SentencePiece does
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace(_SPIECE, " ")]
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    control = [AddedToken(piece, special=True, normalized=False) for piece, _, kind in pieces if kind == _CONTROL]
    user = [AddedToken(piece, special=False, normalized=False) for piece, _, kind in pieces if kind == _USER]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    return backend


def _spm_tokenizer(data: bytes, config: dict, where: str) -> Tokenizer:
    proto = _spm_proto(data, where)
    trainer = proto.trainer_spec
    cls = str(config.get("tokenizer_class") or "")
    llama = cls.startswith("Llama")
    metaspace = ("always" if config.get("legacy", False) else "first") if llama else None
    sentinels = []
    if cls.startswith(("T5", "MT5", "UMT5")) and not any("<extra_id_" in t for t in _extra_tokens(config)):
        # T5's sentinels, appended to the vocabulary from <extra_id_{n-1}> down to <extra_id_0>, as transformers does
        sentinels = [f"<extra_id_{i}>" for i in range(int(config.get("extra_ids", 100)) - 1, -1, -1)]
        config = {**config, "extra_special_tokens": _extra_tokens(config) + sentinels}
    albert = cls.startswith("Albert")
    pre = []
    if albert:  # transformers' ALBERT: quotes, accents and case normalised before SentencePiece's own rules
        pre = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
        if not _bool(config, "keep_accents", False):
            pre += [normalizers.NFKD(), normalizers.StripAccents()]
        if _bool(config, "do_lower_case", True):
            pre.append(normalizers.Lowercase())
    backend = _spm_backend(proto, add_prefix_space=config.get("add_prefix_space"), metaspace=metaspace,
                           extra_pieces=sentinels, pre_normalizers=pre)
    _add_config_tokens(backend, config)
    defaults: dict[str, Any] = {}
    for name, index, piece in (("unk_token", trainer.unk_id, trainer.unk_piece),
                               ("bos_token", trainer.bos_id, trainer.bos_piece),
                               ("eos_token", trainer.eos_id, trainer.eos_piece),
                               ("pad_token", trainer.pad_id, trainer.pad_piece)):
        if 0 <= index < len(proto.pieces):
            defaults[name] = proto.pieces[index].piece or piece
    if llama:
        template = (False, False)  # as transformers 5: <s> only when the config says add_bos_token (Llama's do)
        defaults["padding_side"] = "left"
    elif cls.startswith(("T5", "MT5", "UMT5")):
        template = (False, True)  # T5: text </s>
    else:
        template = (_bool(config, "add_bos_token", False), _bool(config, "add_eos_token", False))
    if albert:
        defaults.update(bos_token="[CLS]", eos_token="[SEP]", cls_token="[CLS]", sep_token="[SEP]",
                        mask_token="[MASK]")
    tok = Tokenizer(backend, spm_model=data, **_common_kwargs(config, backend, defaults))
    if albert:
        _bert_post_processor(tok)
    else:
        _apply_bos_eos(tok, config, default_template=template)
    return tok


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer that ships with a checkpoint folder.

    Reads, in this order of preference: tokenizer.json (any `tokenizers` pipeline), tokenizer.model / spiece.model /
    sentencepiece.bpe.model (SentencePiece Unigram or BPE), vocab.json + merges.txt (GPT-2 byte-level BPE),
    vocab.txt (BERT WordPiece); with
    tokenizer_config.json / special_tokens_map.json for the special tokens, do_lower_case, add_prefix_space,
    add_bos_token / add_eos_token, model_max_length and padding_side.
    """
    _require_tokenizers()
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer: folder must be a path, got {type(folder).__name__}")
    path = Path(folder)
    if not path.is_dir():
        if path.is_file() and path.name in ("tokenizer.json", "vocab.txt") + _SPM_NAMES:
            path = path.parent
        else:
            raise FileNotFoundError(f"load_tokenizer: {folder} is not a folder")
    config = _read_config(path)
    if (path / "tokenizer.json").is_file():
        return _load_tokenizer_json(path / "tokenizer.json", config)
    for name in _SPM_NAMES:
        if (path / name).is_file():
            return _spm_tokenizer((path / name).read_bytes(), config, str(path / name))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _load_bpe_files(path / "vocab.json", path / "merges.txt", config)
    if (path / "vocab.txt").is_file():
        return _load_vocab_txt(path / "vocab.txt", config)
    if (path / "vocab.json").is_file():
        raise FileNotFoundError(f"load_tokenizer: {path} has vocab.json but no merges.txt (a byte-level BPE "
                                "tokenizer needs both)")
    raise FileNotFoundError(f"load_tokenizer: no tokenizer file in {path}; expected one of: "
                            f"{', '.join(TOKENIZER_FILES)}")


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
_KINDS = ("wordpiece", "bpe", "unigram", "sentencepiece")
_DEFAULT_SPECIAL = {
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "bpe": ["<|endoftext|>"],
    "unigram": ["<pad>", "<unk>", "<s>", "</s>"],
    "sentencepiece": ["<pad>", "<unk>", "<s>", "</s>"],
}


def _text_source(texts_or_files) -> tuple[list[str] | None, Iterable[str] | None]:
    """(files, texts): Path objects, or strings naming existing files, are files; other strings are texts."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    if not isinstance(texts_or_files, Iterable):
        raise TypeError("train_tokenizer: texts_or_files must be a list of texts or of file paths")
    items = list(texts_or_files)
    if not items:
        raise ValueError("train_tokenizer: texts_or_files is empty")
    is_file = [isinstance(x, os.PathLike) or (isinstance(x, str) and "\n" not in x and len(x) < 4096
                                              and os.path.isfile(x)) for x in items]
    if all(is_file):
        files = [os.fspath(x) for x in items]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"train_tokenizer: {f} does not exist")
        return files, None
    for i, x in enumerate(items):
        if isinstance(x, os.PathLike):
            raise FileNotFoundError(f"train_tokenizer: texts_or_files[{i}] = {x} does not exist")
        if not isinstance(x, str):
            raise TypeError(f"train_tokenizer: texts_or_files[{i}] must be a string, got {type(x).__name__}")
    return None, items


def _iter_lines(files):
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                yield line.rstrip("\n")


def train_tokenizer(texts_or_files, kind: str = "wordpiece", vocab_size: int = 8000,
                    special_tokens: Sequence[str] | None = None, *, min_frequency: int = 2, lowercase: bool = True,
                    model_type: str = "unigram", model_max_length: int | None = None,
                    character_coverage: float = 1.0, seed: int = 0) -> Tokenizer:
    """Train a new tokenizer on a list of texts or of text files (one sentence/document per line).

    kind: "wordpiece" (BERT-style: lowercase + accent stripping when `lowercase`, [CLS] A [SEP] B [SEP]),
        "bpe" (GPT-2-style byte-level BPE: never an unknown token), "unigram" (`tokenizers`' Unigram with
        SentencePiece-style whitespace, NFKC) or "sentencepiece" (trained by the `sentencepiece` library,
        `model_type` "unigram" or "bpe"; saved with its tokenizer.model).
    special_tokens: the special tokens, first in the vocabulary (default per kind: [PAD] [UNK] [CLS] [SEP] [MASK];
        <|endoftext|>; <pad> <unk> <s> </s>). Their roles are taken from their usual names.
    """
    _require_tokenizers()
    if kind not in _KINDS:
        raise ValueError(f"train_tokenizer: kind must be one of {_KINDS}, got {kind!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"train_tokenizer: vocab_size must be a positive int, got {vocab_size!r}")
    if special_tokens is None:
        special_tokens = _DEFAULT_SPECIAL[kind]
    special_tokens = [str(t) for t in special_tokens]
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"train_tokenizer: special_tokens has duplicates: {special_tokens}")
    if vocab_size <= len(special_tokens):
        raise ValueError(f"train_tokenizer: vocab_size ({vocab_size}) must exceed the number of special tokens "
                         f"({len(special_tokens)})")
    files, texts = _text_source(texts_or_files)
    if kind == "sentencepiece":
        return _train_sentencepiece(files, texts, vocab_size, special_tokens, model_type=model_type,
                                    character_coverage=character_coverage, seed=seed,
                                    model_max_length=model_max_length)
    roles = _guess_roles(special_tokens)
    unk = roles.get("unk_token")
    if kind == "wordpiece":
        backend = _wordpiece_backend({}, unk_token=unk or "[UNK]", lowercase=lowercase, strip_accents=None,
                                     chinese_chars=True)
        trainer = _trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                             special_tokens=special_tokens, continuing_subword_prefix="##")
    elif kind == "bpe":
        backend = _tk.Tokenizer(_models.BPE(dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                            fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = _trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                       special_tokens=special_tokens,
                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        for name in ("bos_token", "eos_token", "unk_token"):
            roles.setdefault(name, "<|endoftext|>" if "<|endoftext|>" in special_tokens else None)
    else:
        backend = _tk.Tokenizer(_models.Unigram())
        backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE, prepend_scheme="always")
        backend.decoder = decoders.Metaspace(replacement=_SPIECE, prepend_scheme="always")
        trainer = _trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special_tokens, unk_token=unk,
                                           shrinking_factor=0.75, n_sub_iterations=2)
    if files is not None:
        backend.train(files, trainer=trainer)
    else:
        backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # through its serialised form, so the tokenizer encodes exactly as it will once saved and loaded (a Unigram
    # model's scores otherwise keep more precision than tokenizer.json holds, which can flip a tie)
    backend = _tk.Tokenizer.from_str(backend.to_str())
    model_input_names = None
    if kind == "wordpiece":
        model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    tok = Tokenizer(backend, model_max_length=model_max_length, model_input_names=model_input_names,
                    extra_special_tokens=[t for t in special_tokens if t not in roles.values()],
                    config={"tokenizer_class": "BertTokenizer" if kind == "wordpiece" else "TokenizersBackend",
                            "do_lower_case": lowercase if kind == "wordpiece" else None},
                    **{k: v for k, v in roles.items() if v is not None})
    if kind == "wordpiece":
        _bert_post_processor(tok)
    return tok


def _guess_roles(special_tokens) -> dict[str, str]:
    pattern = {"pad_token": r"pad", "unk_token": r"unk", "cls_token": r"cls", "sep_token": r"sep",
               "mask_token": r"mask", "bos_token": r"^<s>$|bos|start", "eos_token": r"^</s>$|eos|end"}
    roles: dict[str, str] = {}
    for token in special_tokens:
        for name, regex in pattern.items():
            if name not in roles and re.search(regex, token.lower()):
                roles[name] = token
                break
    return roles


def _train_sentencepiece(files, texts, vocab_size, special_tokens, *, model_type, character_coverage, seed,
                         model_max_length):
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise ImportError("train_tokenizer(kind='sentencepiece') needs the `sentencepiece` library") from e
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"train_tokenizer: model_type must be 'unigram' or 'bpe', got {model_type!r}")
    roles = _guess_roles(special_tokens)
    ids = {name: (special_tokens.index(roles[name]) if name in roles else -1)
           for name in ("pad_token", "unk_token", "bos_token", "eos_token")}
    if ids["unk_token"] < 0:
        raise ValueError("train_tokenizer: SentencePiece needs an unknown token among special_tokens (e.g. '<unk>')")
    roled = {roles[n] for n in ("pad_token", "unk_token", "bos_token", "eos_token") if n in roles}
    others = [t for t in special_tokens if t not in roled]
    if others and max(ids.values()) >= len(roled):
        raise ValueError("train_tokenizer: with SentencePiece, put <pad>/<unk>/<s>/</s> first in special_tokens")
    model = io.BytesIO()
    kwargs = dict(model_writer=model, vocab_size=vocab_size, model_type=model_type,
                  character_coverage=character_coverage, pad_id=ids["pad_token"], unk_id=ids["unk_token"],
                  bos_id=ids["bos_token"], eos_id=ids["eos_token"], hard_vocab_limit=False,
                  minloglevel=2, num_threads=1)
    for name in ("pad_token", "unk_token", "bos_token", "eos_token"):
        if name in roles:
            kwargs[name.replace("_token", "_piece")] = roles[name]
    if others:
        kwargs["control_symbols"] = others
    if files is not None:
        kwargs["input"] = files
    else:
        kwargs["sentence_iterator"] = iter(texts)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise ValueError(f"train_tokenizer: sentencepiece training failed: {e}") from e
    config = {"model_max_length": model_max_length, "extra_special_tokens": others}
    return _spm_tokenizer(model.getvalue(), config, "the trained SentencePiece model")
