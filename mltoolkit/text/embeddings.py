"""Pretrained word vectors (word2vec binary and text, GloVe text) into an `nn.Embedding` with a vocabulary.

    emb, vocab = load_word2vec("GoogleNews-vectors-negative300.bin", limit=100_000, add_pad=True, add_unk=True)
    emb, vocab = load_glove("glove.6B.100d.txt", lowercase=True)
    ids = vocab.lookup(["the", "cat"])                               # unknown words -> vocab.unk_index
    emb = build_embedding(my_vocab, "glove.6B.100d.txt", seed=0)     # align a file to your own vocabulary

Formats (as written by the original tools):
- word2vec text: a header line "<count> <dim>", then one line per word: the word and `dim` numbers, space separated.
- word2vec binary: the same header line, then per word: the word's bytes, one space, `dim` little-endian float32
  (4 * dim bytes), and usually a newline (readers skip newlines before a word, as word2vec.c does).
- GloVe: no header; lines of a word and its numbers. Some GloVe files have words with spaces in them: the last
  `dim` fields are the numbers, what comes before is the word.
A malformed line raises ValueError naming the file and the line (or entry) number; bytes that are not UTF-8 raise
unless `errors="replace"` or `"ignore"` (decoding as `bytes.decode(errors=...)`).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["Vocab", "read_vectors", "load_word2vec", "load_glove", "build_embedding"]

_FORMATS = ("auto", "word2vec", "word2vec_text", "word2vec_binary", "glove")
_ERRORS = ("strict", "replace", "ignore")


class Vocab:
    """A word <-> index mapping. `vocab["word"]` gives the index (the unknown word's index for a missing word when the
    vocabulary has one, else KeyError); `vocab.lookup(words)` a list of indices, `vocab.encode(words)` an int64
    tensor."""

    def __init__(self, words: Iterable[str], pad_token: str | None = None, unk_token: str | None = None):
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f"Vocab: words must be strings, got {type(word).__name__}")
            if word in self.stoi:
                raise ValueError(f"Vocab: duplicate word {word!r}")
            self.stoi[word] = len(self.itos)
            self.itos.append(word)
        for name, token in (("pad_token", pad_token), ("unk_token", unk_token)):
            if token is not None and token not in self.stoi:
                raise ValueError(f"Vocab: {name} {token!r} is not among the words")
        self.pad_token, self.unk_token = pad_token, unk_token

    @property
    def pad_index(self) -> int | None:
        return None if self.pad_token is None else self.stoi[self.pad_token]

    @property
    def unk_index(self) -> int | None:
        return None if self.unk_token is None else self.stoi[self.unk_token]

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word) -> bool:
        return word in self.stoi

    def __iter__(self):
        return iter(self.itos)

    def __getitem__(self, word: str) -> int:
        index = self.stoi.get(word)
        if index is None:
            if self.unk_token is None:
                raise KeyError(f"Vocab: {word!r} is not in the vocabulary (which has no unknown token)")
            return self.stoi[self.unk_token]
        return index

    def lookup(self, words: Iterable[str]) -> list[int]:
        return [self[w] for w in words]

    def encode(self, words: Iterable[str]) -> torch.Tensor:
        return torch.tensor(self.lookup(words), dtype=torch.long)

    def __repr__(self):
        return f"Vocab({len(self)} words, pad={self.pad_token!r}, unk={self.unk_token!r})"


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
def _check_args(fn, path, limit, errors):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a file path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: {os.fspath(path)} is not a file")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"{fn}: limit must be a non-negative int or None, got {limit!r}")
    if errors not in _ERRORS:
        raise ValueError(f"{fn}: errors must be one of {_ERRORS}, got {errors!r}")


def _decode(raw: bytes, errors: str, where: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); pass errors='replace' or "
                         "'ignore' to read it anyway") from None


def _parse_header(line: bytes, where: str) -> tuple[int, int] | None:
    fields = line.split()
    if len(fields) != 2:
        return None
    try:
        count, dim = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if count < 0 or dim <= 0:
        raise ValueError(f"{where}: bad header {line.strip()!r}: expected '<word count> <dimension>'")
    return count, dim


def _looks_binary(f, dim: int) -> bool:
    """After a word2vec header: is the first entry '<word> <dim floats as text>\\n' (text) or raw float32 (binary)?"""
    start = f.tell()
    chunk = f.read(64 * (dim + 2) + 1024)
    f.seek(start)
    line = chunk.split(b"\n", 1)[0]
    fields = line.split()
    if len(fields) < dim + 1:
        return True
    try:
        [float(x) for x in fields[-dim:]]
    except ValueError:
        return True
    return False


class _Collector:
    """Words and rows, skipping (with one warning) repeated words, as gensim does."""

    def __init__(self, dim, lowercase, limit):
        self.dim, self.lowercase, self.limit = dim, lowercase, limit
        self.words: list[str] = []
        self.rows: list[np.ndarray] = []
        self.seen: set[str] = set()
        self.duplicates = 0

    def full(self) -> bool:
        return self.limit is not None and len(self.words) >= self.limit

    def add(self, word: str, row: np.ndarray):
        if self.lowercase:
            word = word.lower()
        if word in self.seen:
            self.duplicates += 1
            return
        self.seen.add(word)
        self.words.append(word)
        self.rows.append(row)

    def result(self, path, dtype):
        if self.duplicates:
            warnings.warn(f"read_vectors: {path}: skipped {self.duplicates} repeated word(s) (kept the first)",
                          stacklevel=3)
        if self.rows:
            matrix = torch.from_numpy(np.stack(self.rows)).to(dtype)
        else:
            matrix = torch.empty(0, self.dim or 0, dtype=dtype)
        return self.words, matrix


def _parse_row(fields: Sequence[bytes], where: str) -> np.ndarray:
    try:
        row = np.array(fields, dtype=np.float32)  # numpy parses the decimal text straight to float32
    except ValueError:
        bad = next(x for x in fields if not _is_float(x))
        raise ValueError(f"{where}: {bad[:40]!r} is not a number") from None
    if not np.isfinite(row).all():
        raise ValueError(f"{where}: the vector has a non-finite value")
    return row


def _is_float(x: bytes) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def _read_text(f, path, *, dim, count, header_lines, glove, lowercase, limit, errors, first_line=None):
    out = _Collector(dim, lowercase, limit)
    number = header_lines
    lines = f if first_line is None else _chain_first(first_line, f)
    read = 0
    for raw in lines:
        number += 1
        if out.full() or (count is not None and read >= count):
            break
        stripped = raw.rstrip(b"\r\n")
        if not stripped.strip():
            if glove or count is None:
                continue  # a blank line (e.g. at the end of the file)
            raise ValueError(f"{path}: line {number}: empty line where a word and its vector were expected")
        where = f"{path}: line {number}"
        if glove:
            stripped = stripped.rstrip()
            if dim is None:  # the trailing fields that are numbers (a GloVe word may contain spaces)
                fields = stripped.split(b" ")
                numbers = 0
                while numbers < len(fields) - 1 and _is_float(fields[-1 - numbers]):
                    numbers += 1
                dim = numbers
                out.dim = dim
                if dim < 1:
                    raise ValueError(f"{where}: expected a word and its vector, got {stripped[:60]!r}")
            fields = stripped.rsplit(b" ", dim)
            if len(fields) < dim + 1 or not fields[0]:
                raise ValueError(f"{where}: expected a word and {dim} numbers, got {len(fields) - 1} field(s) after "
                                 "the first")
            word_raw, values = fields[0], fields[1:]
        else:
            fields = stripped.split()
            if len(fields) != dim + 1:
                raise ValueError(f"{where}: expected a word and {dim} numbers (the header says dimension {dim}), got "
                                 f"{len(fields)} field(s)")
            word_raw, values = fields[0], fields[1:]
        row = _parse_row(values, where)
        out.add(_decode(word_raw, errors, where), row)
        read += 1
    if count is not None and read < min(count, limit if limit is not None else count):
        raise ValueError(f"{path}: the header announces {count} words but the file has {read}")
    return out.result(path, torch.float32)


def _chain_first(first, rest):
    yield first
    yield from rest


class _Buffer:
    """Chunked reads over a binary file: word2vec binary files are gigabytes; one read() per byte is too slow."""

    def __init__(self, f, chunk=1 << 20):
        self.f, self.chunk, self.buf, self.pos, self.eof = f, chunk, b"", 0, False

    def fill(self, n: int) -> bool:
        """At least n bytes available after pos (False at the end of the file)."""
        while len(self.buf) - self.pos < n and not self.eof:
            more = self.f.read(max(self.chunk, n))
            if not more:
                self.eof = True
                break
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
        return len(self.buf) - self.pos >= n


def _read_binary(f, path, *, dim, count, lowercase, limit, errors):
    out = _Collector(dim, lowercase, limit)
    size = 4 * dim
    total = count if limit is None else min(count, limit)
    buf = _Buffer(f)
    for entry in range(1, total + 1):
        where = f"{path}: entry {entry} (of {count})"
        while buf.fill(1) and buf.buf[buf.pos] == 0x0A:
            buf.pos += 1  # the newline that ends the previous entry (optional, as in word2vec.c's reader)
        while True:
            space = buf.buf.find(b" ", buf.pos)
            if space >= 0:
                break
            if len(buf.buf) - buf.pos > 100_000:
                raise ValueError(f"{where}: no space after the word within 100000 bytes; not word2vec binary?")
            if not buf.fill(len(buf.buf) - buf.pos + 1):
                raise ValueError(f"{where}: the file ends inside a word; it is truncated or not word2vec binary")
        word = buf.buf[buf.pos:space]
        if b"\n" in word:
            raise ValueError(f"{where}: a newline inside the word {word[:40]!r}; not word2vec binary?")
        buf.pos = space + 1
        if not buf.fill(size):
            raise ValueError(f"{where}: the file ends inside the vector ({len(buf.buf) - buf.pos} of {size} bytes); "
                             "truncated?")
        row = np.frombuffer(buf.buf, dtype="<f4", count=dim, offset=buf.pos).astype(np.float32)
        buf.pos += size
        if not np.isfinite(row).all():
            raise ValueError(f"{where}: the vector has a non-finite value; not word2vec binary or wrong dimension?")
        out.add(_decode(word, errors, where), row)
    return out.result(path, torch.float32)


def read_vectors(path: str | os.PathLike, format: str = "auto", *, limit: int | None = None, lowercase: bool = False,
                 errors: str = "strict") -> tuple[list[str], torch.Tensor]:
    """Read a word-vector file: returns (words, float32 tensor of shape (len(words), dim)).

    format: "word2vec_binary", "word2vec_text", "word2vec" (either: told apart by the first entry), "glove" (text
        without a header), or "auto" (a header line "<count> <dim>" means word2vec, else GloVe).
    limit: read only the first `limit` words (the files are sorted by frequency).
    lowercase: lowercase the words; when two words fall together, the first (most frequent) one's vector is kept.
    errors: how to decode words that are not valid UTF-8: "strict" (raise, naming the line), "replace", "ignore".
    """
    _check_args("read_vectors", path, limit, errors)
    if format not in _FORMATS:
        raise ValueError(f"read_vectors: format must be one of {_FORMATS}, got {format!r}")
    path = os.fspath(path)
    with open(path, "rb") as f:
        first = f.readline()
        header = _parse_header(first, f"{path}: line 1")
        if format in ("word2vec", "word2vec_text", "word2vec_binary") and header is None:
            raise ValueError(f"{path}: line 1: expected the word2vec header '<word count> <dimension>', got "
                             f"{first[:60]!r}")
        if format == "glove" or (format == "auto" and header is None):
            return _read_text(f, path, dim=None, count=None, header_lines=0, glove=True, lowercase=lowercase,
                              limit=limit, errors=errors, first_line=first)
        count, dim = header
        binary = format == "word2vec_binary" or (format != "word2vec_text" and _looks_binary(f, dim))
        if binary:
            return _read_binary(f, path, dim=dim, count=count, lowercase=lowercase, limit=limit, errors=errors)
        return _read_text(f, path, dim=dim, count=count, header_lines=1, glove=False, lowercase=lowercase,
                          limit=limit, errors=errors)


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------
def _embedding(matrix: torch.Tensor, freeze: bool, padding_idx: int | None) -> nn.Embedding:
    emb = nn.Embedding(matrix.shape[0], matrix.shape[1], padding_idx=padding_idx, _weight=matrix.clone(),
                       _freeze=freeze)
    return emb


def _load(fn, path, format, *, limit, lowercase, add_pad, add_unk, pad_token, unk_token, freeze, errors):
    words, matrix = read_vectors(path, format, limit=limit, lowercase=lowercase, errors=errors)
    extra = [t for t, on in ((pad_token, add_pad), (unk_token, add_unk)) if on]
    clash = [t for t in extra if t in set(words)]
    if clash:
        raise ValueError(f"{fn}: the file already has the word(s) {clash}; choose other pad_token / unk_token")
    rows = []
    if add_pad:
        rows.append(torch.zeros(1, matrix.shape[1]))
    if add_unk:  # the unknown word: the mean vector, a common choice that keeps it inside the cloud of words
        rows.append(matrix.mean(0, keepdim=True) if len(words) else torch.zeros(1, matrix.shape[1]))
    vocab = Vocab(extra + words, pad_token=pad_token if add_pad else None, unk_token=unk_token if add_unk else None)
    weight = torch.cat(rows + [matrix]) if rows else matrix
    return _embedding(weight, freeze, vocab.pad_index), vocab


def load_word2vec(path: str | os.PathLike, binary: bool | None = None, *, limit: int | None = None,
                  lowercase: bool = False, add_pad: bool = False, add_unk: bool = False, pad_token: str = "<pad>",
                  unk_token: str = "<unk>", freeze: bool = True, errors: str = "strict") -> tuple[nn.Embedding, Vocab]:
    """Load a word2vec file (binary or text; `binary=None` tells them apart) into (nn.Embedding, Vocab).

    add_pad / add_unk put a pad row (zeros, the embedding's padding_idx) and an unknown-word row (the mean vector)
    first, at indices 0 and 1 (or 0 alone). freeze=True makes the weight not require grad. See `read_vectors` for
    limit, lowercase and errors."""
    fmt = "word2vec" if binary is None else ("word2vec_binary" if binary else "word2vec_text")
    return _load("load_word2vec", path, fmt, limit=limit, lowercase=lowercase, add_pad=add_pad, add_unk=add_unk,
                 pad_token=pad_token, unk_token=unk_token, freeze=freeze, errors=errors)


def load_glove(path: str | os.PathLike, *, limit: int | None = None, lowercase: bool = False, add_pad: bool = False,
               add_unk: bool = False, pad_token: str = "<pad>", unk_token: str = "<unk>", freeze: bool = True,
               errors: str = "strict") -> tuple[nn.Embedding, Vocab]:
    """Load a GloVe text file into (nn.Embedding, Vocab); options as in `load_word2vec`."""
    return _load("load_glove", path, "glove", limit=limit, lowercase=lowercase, add_pad=add_pad, add_unk=add_unk,
                 pad_token=pad_token, unk_token=unk_token, freeze=freeze, errors=errors)


def build_embedding(vocab, vectors, *, format: str = "auto", seed: int = 0, init_std: float | None = None,
                    case_insensitive: bool = True, freeze: bool = False, errors: str = "strict",
                    return_missing: bool = False):
    """An nn.Embedding whose row i is the pretrained vector of the vocabulary's i-th word.

    vocab: a `Vocab`, a list of words (index = position) or a dict word -> index (indices 0..n-1).
    vectors: a file path (read with `read_vectors(path, format)`), a (words, matrix) pair, or an (nn.Embedding,
        Vocab) pair as returned by `load_word2vec` / `load_glove`.
    Words the vectors lack (after trying the lowercased word when `case_insensitive`) get random normal rows with
    standard deviation `init_std` (default: that of the pretrained vectors), drawn from a generator seeded with
    `seed`, so the result is reproducible. The vocabulary's pad word (a `Vocab` with `pad_token`) gets a zero row
    and is the embedding's padding_idx. With return_missing=True, returns (embedding, list of missing words).
    """
    words, pad_token = _vocab_words(vocab)
    if isinstance(vectors, (str, os.PathLike)):
        src_words, matrix = read_vectors(vectors, format, errors=errors)
    elif isinstance(vectors, tuple) and len(vectors) == 2 and isinstance(vectors[0], nn.Embedding):
        src_words, matrix = list(vectors[1]), vectors[0].weight.detach()
    elif isinstance(vectors, tuple) and len(vectors) == 2:
        src_words, matrix = list(vectors[0]), torch.as_tensor(vectors[1])
    else:
        raise TypeError("build_embedding: vectors must be a path, a (words, matrix) pair or an (nn.Embedding, Vocab) "
                        f"pair, got {type(vectors).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != len(src_words):
        raise ValueError(f"build_embedding: the vectors matrix must be (len(words), dim) = ({len(src_words)}, dim), "
                         f"got {tuple(matrix.shape)}")
    if not words:
        raise ValueError("build_embedding: vocab is empty")
    matrix = matrix.float()
    index = {}
    for i, w in enumerate(src_words):
        index.setdefault(w, i)
    if case_insensitive:
        for i, w in enumerate(src_words):
            index.setdefault(w.lower(), i)
    if init_std is None:
        std = float(matrix.std()) if matrix.numel() > 1 else 1.0
        std = std if std > 0 else 1.0
    elif isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std >= 0:
        raise ValueError(f"build_embedding: init_std must be a non-negative number or None, got {init_std!r}")
    else:
        std = float(init_std)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(words), matrix.shape[1], generator=gen) * std
    missing = []
    for i, w in enumerate(words):
        j = index.get(w)
        if j is None and case_insensitive:
            j = index.get(w.lower())
        if j is not None:
            weight[i] = matrix[j]
        elif w != pad_token:
            missing.append(w)
    padding_idx = None
    if pad_token is not None:
        padding_idx = words.index(pad_token)
        weight[padding_idx] = 0
    emb = _embedding(weight, freeze, padding_idx)
    return (emb, missing) if return_missing else emb


def _vocab_words(vocab) -> tuple[list[str], str | None]:
    if isinstance(vocab, Vocab):
        return list(vocab.itos), vocab.pad_token
    if isinstance(vocab, Mapping):
        n = len(vocab)
        words = [None] * n
        for w, i in vocab.items():
            if not isinstance(i, int) or not 0 <= i < n or words[i] is not None:
                raise ValueError(f"build_embedding: vocab indices must be 0..{n - 1}, each once; {w!r} has {i!r}")
            words[i] = w
        return words, None
    if isinstance(vocab, (list, tuple)):
        if len(set(vocab)) != len(vocab):
            raise ValueError("build_embedding: vocab has repeated words")
        return list(vocab), None
    raise TypeError(f"build_embedding: vocab must be a Vocab, a list of words or a dict, got {type(vocab).__name__}")
