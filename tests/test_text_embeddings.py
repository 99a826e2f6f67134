"""mltoolkit.text embeddings: word2vec (binary and text) and GloVe files into nn.Embedding + Vocab.

The files are written here by small writers that follow each format's definition (word2vec.c's binary layout: a
"<count> <dim>" header line, then per word its UTF-8 bytes, a space, dim little-endian float32 and a newline).
"""
import struct

import numpy as np
import pytest
import torch
from torch import nn

from mltoolkit.text import Vocab, build_embedding, load_glove, load_word2vec, read_vectors


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = ["the", ",", "The", "naïve", "日本", "🙂", "straße", "a-b", "x" * 30]
DIM = 7


def _vectors(n=None, dim=DIM, seed=0):
    n = len(WORDS) if n is None else n
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def write_word2vec_binary(path, words, vectors, newline=True, header=None):
    with open(path, "wb") as f:
        f.write((header or f"{len(words)} {vectors.shape[1]}\n").encode())
        for word, row in zip(words, vectors):
            f.write(word.encode("utf-8") if isinstance(word, str) else word)
            f.write(b" ")
            f.write(struct.pack(f"<{len(row)}f", *row))
            if newline:
                f.write(b"\n")


def _fmt(row):
    return " ".join(f"{v:.9g}" for v in row)  # 9 significant digits: float32 round-trips exactly


def write_word2vec_text(path, words, vectors, eol="\n"):
    lines = [f"{len(words)} {vectors.shape[1]}"] + [f"{w} {_fmt(r)}" for w, r in zip(words, vectors)]
    path.write_bytes(eol.join(lines).encode("utf-8") + eol.encode())


def write_glove(path, words, vectors):
    path.write_text("".join(f"{w} {_fmt(r)}\n" for w, r in zip(words, vectors)), encoding="utf-8")


@pytest.mark.parametrize("fmt", ["binary", "binary_no_newline", "text", "text_crlf", "glove"])
def test_read_each_format(tmp_path, fmt):
    vec = _vectors()
    path = tmp_path / "vectors"
    if fmt.startswith("binary"):
        write_word2vec_binary(path, WORDS, vec, newline=fmt == "binary")
    elif fmt.startswith("text"):
        write_word2vec_text(path, WORDS, vec, eol="\r\n" if fmt == "text_crlf" else "\n")
    else:
        write_glove(path, WORDS, vec)
    words, matrix = read_vectors(path)  # format told apart from the content
    assert words == WORDS and matrix.dtype == torch.float32
    assert torch.equal(matrix, torch.from_numpy(vec))
    loader = load_glove if fmt == "glove" else load_word2vec
    emb, vocab = loader(path)
    assert isinstance(emb, nn.Embedding) and isinstance(vocab, Vocab) and len(vocab) == len(WORDS)
    assert not emb.weight.requires_grad and emb.padding_idx is None
    assert torch.equal(emb(vocab.encode(["naïve", "🙂"])), torch.from_numpy(vec[[3, 5]]))


def test_explicit_binary_flag_and_limit(tmp_path):
    vec = _vectors()
    write_word2vec_binary(tmp_path / "b.bin", WORDS, vec)
    write_word2vec_text(tmp_path / "t.txt", WORDS, vec)
    emb_b, vocab_b = load_word2vec(tmp_path / "b.bin", binary=True, limit=4)
    emb_t, vocab_t = load_word2vec(tmp_path / "t.txt", binary=False, limit=4)
    assert vocab_b.itos == vocab_t.itos == WORDS[:4]
    assert torch.equal(emb_b.weight, emb_t.weight) and torch.equal(emb_b.weight, torch.from_numpy(vec[:4]))
    words, _ = read_vectors(tmp_path / "t.txt", "word2vec", limit=0)
    assert words == []
    with pytest.raises(ValueError, match="line 2"):
        load_word2vec(tmp_path / "b.bin", binary=False)  # binary bytes read as text: the first entry is bad


def test_options_lowercase_pad_unk_freeze(tmp_path):
    vec = _vectors()
    write_glove(tmp_path / "g.txt", WORDS, vec)
    with pytest.warns(UserWarning, match="repeated"):
        emb, vocab = load_glove(tmp_path / "g.txt", lowercase=True, add_pad=True, add_unk=True, freeze=False)
    # "The" lowercases onto "the": the first (more frequent) one's vector stays
    assert vocab.itos[:4] == ["<pad>", "<unk>", "the", ","] and "The" not in vocab and len(vocab) == len(WORDS) + 1
    assert vocab.pad_index == 0 and vocab.unk_index == 1 and emb.padding_idx == 0
    assert emb.weight.requires_grad
    expected = np.delete(vec, 2, axis=0)
    assert torch.equal(emb.weight[0], torch.zeros(DIM))
    torch.testing.assert_close(emb.weight[1], torch.from_numpy(expected).mean(0))
    assert torch.equal(emb.weight[2:].detach(), torch.from_numpy(expected))
    assert vocab["never-seen"] == 1 and vocab.lookup(["the", "zzz"]) == [2, 1]
    emb(vocab.encode(["the", "<pad>"])).sum().backward()
    assert torch.equal(emb.weight.grad[0], torch.zeros(DIM))  # the pad row gets no gradient
    _, plain = load_glove(tmp_path / "g.txt")
    with pytest.raises(KeyError, match="no unknown token"):
        plain["never-seen"]
    with pytest.raises(ValueError, match="already has"):
        load_glove(tmp_path / "g.txt", add_unk=True, unk_token="the")


def test_glove_words_with_spaces(tmp_path):
    vec = _vectors(3)
    write_glove(tmp_path / "g.txt", [". . .", "a b", "c"], vec)
    words, matrix = read_vectors(tmp_path / "g.txt", "glove")
    assert words == [". . .", "a b", "c"] and torch.equal(matrix, torch.from_numpy(vec))


def test_malformed_files_name_the_line(tmp_path):
    vec = _vectors(4)
    path = tmp_path / "w.txt"
    write_word2vec_text(path, WORDS[:4], vec)
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = lines[:]
    bad[2] = bad[2].rsplit(" ", 1)[0]  # a value missing on line 3
    path.write_text("\n".join(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: expected a word and 7 numbers"):
        load_word2vec(path)
    bad = lines[:]
    bad[3] = bad[3].replace(bad[3].split()[2], "1.2.3", 1)
    path.write_text("\n".join(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 4: b?'1\.2\.3' is not a number"):
        load_word2vec(path)
    path.write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")  # the header says 4 words
    with pytest.raises(ValueError, match="announces 4 words but the file has 2"):
        load_word2vec(path)
    path.write_text("4 seven\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: expected the word2vec header"):
        load_word2vec(path, binary=True)
    glove = tmp_path / "g.txt"
    glove.write_text(f"a {_fmt(vec[0])}\nb {_fmt(vec[1][:5])}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="g.txt: line 2"):
        load_glove(glove)
    glove.write_text(f"a {_fmt(vec[0])}\nb nan {_fmt(vec[1][1:])}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: the vector has a non-finite value"):
        load_glove(glove)
    binary = tmp_path / "b.bin"
    write_word2vec_binary(binary, WORDS[:3], _vectors(3))
    data = binary.read_bytes()
    binary.write_bytes(data[:-10])  # cut inside the third vector
    with pytest.raises(ValueError, match=r"entry 3 \(of 3\): the file ends inside the vector"):
        load_word2vec(binary)
    write_word2vec_binary(binary, WORDS[:3], _vectors(3), header="5 7\n")
    with pytest.raises(ValueError, match=r"entry 4 \(of 5\): the file ends inside a word"):
        load_word2vec(binary)
    with pytest.raises(FileNotFoundError):
        load_word2vec(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="limit"):
        load_glove(glove, limit=-1)
    with pytest.raises(ValueError, match="errors must be"):
        load_glove(glove, errors="loose")
    with pytest.raises(ValueError, match="format must be"):
        read_vectors(glove, "fasttext")


def test_invalid_utf8(tmp_path):
    vec = _vectors(3)
    glove = tmp_path / "g.txt"
    glove.write_bytes(b"ok " + _fmt(vec[0]).encode() + b"\nbad\xff\xfe " + _fmt(vec[1]).encode() + b"\n")
    with pytest.raises(ValueError, match=r"line 2: not valid UTF-8.*errors='replace'"):
        load_glove(glove)
    _, vocab = load_glove(glove, errors="replace")
    assert vocab.itos == ["ok", "bad\ufffd\ufffd"]
    _, vocab = load_glove(glove, errors="ignore")
    assert vocab.itos == ["ok", "bad"]
    binary = tmp_path / "b.bin"
    write_word2vec_binary(binary, ["ok", b"caf\xc3", "x"], vec)  # a word cut inside a multi-byte character
    with pytest.raises(ValueError, match=r"entry 2 \(of 3\): not valid UTF-8"):
        load_word2vec(binary)
    emb, vocab = load_word2vec(binary, errors="ignore")
    assert vocab.itos == ["ok", "caf", "x"] and torch.equal(emb.weight, torch.from_numpy(vec))


def test_build_embedding_aligns_to_vocab(tmp_path):
    vec = _vectors()
    write_word2vec_binary(tmp_path / "v.bin", WORDS, vec)
    my_vocab = Vocab(["<pad>", "<unk>", "the", "NAÏVE", "missing", "🙂", "another"], pad_token="<pad>",
                     unk_token="<unk>")
    emb, missing = build_embedding(my_vocab, tmp_path / "v.bin", seed=3, return_missing=True)
    assert emb.num_embeddings == len(my_vocab) and emb.embedding_dim == DIM and emb.padding_idx == 0
    assert missing == ["<unk>", "missing", "another"]
    assert torch.equal(emb.weight[0], torch.zeros(DIM))
    assert torch.equal(emb.weight[2], torch.from_numpy(vec[0]))
    assert torch.equal(emb.weight[3], torch.from_numpy(vec[3]))  # found through the lowercased word
    assert torch.equal(emb.weight[5], torch.from_numpy(vec[5]))
    assert emb.weight.requires_grad  # freeze=False by default: fine-tuned with the model
    again = build_embedding(my_vocab, tmp_path / "v.bin", seed=3)
    other = build_embedding(my_vocab, tmp_path / "v.bin", seed=4)
    assert torch.equal(again.weight, emb.weight)
    assert not torch.equal(other.weight[4], emb.weight[4]) and torch.equal(other.weight[2], emb.weight[2])
    std = float(torch.from_numpy(vec).std())
    random_rows = torch.stack([emb.weight[i] for i in (1, 4, 6)]).detach()
    assert 0.2 * std < float(random_rows.std()) < 5 * std
    strict = build_embedding(["NAÏVE", "the"], (WORDS, torch.from_numpy(vec)), case_insensitive=False, init_std=0.0,
                             freeze=True)
    assert torch.equal(strict.weight[0], torch.zeros(DIM))  # not found case-sensitively; init_std=0: zeros
    assert not strict.weight.requires_grad and torch.equal(strict.weight[1], torch.from_numpy(vec[0]))
    loaded = load_word2vec(tmp_path / "v.bin")
    from_pair = build_embedding({"the": 1, "🙂": 0}, loaded)
    assert torch.equal(from_pair.weight, torch.from_numpy(vec[[5, 0]]))
    with pytest.raises(ValueError, match="indices"):
        build_embedding({"a": 0, "b": 5}, loaded)
    with pytest.raises(ValueError, match="repeated"):
        build_embedding(["a", "a"], loaded)
    with pytest.raises(TypeError, match="vectors must be"):
        build_embedding(["a"], 3)
    with pytest.raises(ValueError, match=r"\(len\(words\), dim\)"):
        build_embedding(["a"], (["a", "b"], torch.zeros(3, 2)))


def test_matches_gensim(tmp_path):
    gensim = pytest.importorskip("gensim")
    vec = _vectors()
    write_word2vec_binary(tmp_path / "v.bin", WORDS, vec)
    write_word2vec_text(tmp_path / "v.txt", WORDS, vec)
    for path, binary in ((tmp_path / "v.bin", True), (tmp_path / "v.txt", False)):
        kv = gensim.models.KeyedVectors.load_word2vec_format(str(path), binary=binary)
        emb, vocab = load_word2vec(path)
        assert vocab.itos == list(kv.index_to_key)
        assert torch.equal(emb.weight, torch.from_numpy(np.asarray(kv.vectors, dtype=np.float32)))
    kv.save_word2vec_format(str(tmp_path / "g.bin"), binary=True)  # and a file gensim wrote
    emb, vocab = load_word2vec(tmp_path / "g.bin")
    assert vocab.itos == WORDS and torch.equal(emb.weight, torch.from_numpy(vec))
