"""mltoolkit.text tokenizers against transformers' own tokenizers.

Small vocabularies are trained on a generated text sample (with the `tokenizers` and `sentencepiece` libraries),
saved in the formats checkpoints ship (vocab.txt, vocab.json + merges.txt, tokenizer.model, tokenizer.json), then
loaded both by `mltoolkit.text.load_tokenizer` and by transformers; ids, attention masks and token_type_ids must be
equal on a varied text sample, with the same padding / truncation / max_length semantics. Nothing is downloaded.
"""
import io
import json
import random
import warnings

import pytest
import torch

from mltoolkit.text import BatchEncoding, Tokenizer, load_tokenizer, train_tokenizer

pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "on", "er", "an", "the", "ing", "qu", "zz", "é", "ü", "ñ", "ø",
              "straße", "naïve", "café"]
_OTHER = [",", ".", "!", "?", "...", "(", ")", "-", "'s", '"', "日本語", "Ωμέγα", "🙂", "😀👍"]


def _corpus(n=2500, seed=0):
    rng = random.Random(seed)

    def sentence():
        parts = []
        for _ in range(rng.randint(3, 15)):
            r = rng.random()
            if r < 0.7:
                parts.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
            elif r < 0.8:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.85:
                parts.append(rng.choice(["Hello", "World", "GPT", "BERT", "Über", "ÉCOLE"]))
            else:
                parts.append(rng.choice(_OTHER))
        return " ".join(parts)

    return [sentence() for _ in range(n)]


CORPUS = _corpus()
SAMPLE = [
    "Hello, world!", "", "naïve café Straße", "Ωμέγα 日本語 🙂😀 👍", "  leading and   inner   spaces  ",
    "tabs\tand\nnewlines\r\n", "numbers 3.14159 1,000,000 42", "UPPER lower MiXeD ÉCOLE über",
    "punctuation!?... (parens) [brackets] {braces} \"quotes\" 'single'", " ".join(CORPUS[:30]), "a", "z" * 120,
    "e\u0301 combining accent", "ﬁ ligature ＦＵＬＬ width", "control\x00\x07 chars", " ",
    "specials <s> x</s> [CLS] y [SEP]<|endoftext|> z",
]
PLAIN = [t for t in SAMPLE if "<s>" not in t]  # SentencePiece itself has no atomic special tokens in text
PAIRS = ["second part", "", "Ωμέγα!", " ".join(CORPUS[30:40])]


def _hf():
    return pytest.importorskip("transformers")


def _quiet_hf(factory, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory(*args, **kwargs)


def _write_config(folder, **config):
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


# -- checkpoint folders ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """vocab.txt (uncased and cased) + tokenizer_config.json, as BERT checkpoints ship."""
    out = {}
    for lower in (True, False):
        folder = tmp_path_factory.mktemp(f"bert_lower{lower}")
        tok = train_tokenizer(CORPUS, kind="wordpiece", vocab_size=600, lowercase=lower)
        tok.save(folder)
        (folder / "tokenizer.json").unlink()
        _write_config(folder, do_lower_case=lower, tokenizer_class="BertTokenizer", model_max_length=48)
        out[lower] = folder
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """vocab.json + merges.txt only, as GPT-2 checkpoints ship."""
    folder = tmp_path_factory.mktemp("gpt2")
    train_tokenizer(CORPUS, kind="bpe", vocab_size=600).save(folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    return folder


def _spm_model(**kwargs):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, minloglevel=2, num_threads=1,
                                   **kwargs)
    return model.getvalue()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A T5-style SentencePiece Unigram model (pad 0, eos 1, unk 2, no bos; nmt_nfkc) + T5 config."""
    folder = tmp_path_factory.mktemp("t5")
    (folder / "tokenizer.model").write_bytes(_spm_model(vocab_size=500, model_type="unigram", pad_id=0, eos_id=1,
                                                        unk_id=2, bos_id=-1, character_coverage=1.0))
    _write_config(folder, tokenizer_class="T5Tokenizer", model_max_length=48)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A Llama-style SentencePiece BPE model (byte fallback, identity normalisation, digits split) + Llama config."""
    folder = tmp_path_factory.mktemp("llama")
    (folder / "tokenizer.model").write_bytes(_spm_model(
        vocab_size=500, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=0.9995))
    _write_config(folder, tokenizer_class="LlamaTokenizer", model_max_length=48, add_bos_token=True,
                  add_eos_token=False)
    return folder


@pytest.fixture(scope="module")
def albert_dir(tmp_path_factory):
    """An ALBERT-style SentencePiece Unigram model (lowercased text, [CLS] [SEP] [MASK] control pieces), as
    spiece.model + ALBERT config."""
    folder = tmp_path_factory.mktemp("albert")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([c.lower() for c in CORPUS]), model_writer=model,
                                   minloglevel=2, num_threads=1, vocab_size=500, model_type="unigram", pad_id=0,
                                   unk_id=1, bos_id=-1, eos_id=-1, control_symbols=["[CLS]", "[SEP]", "[MASK]"])
    (folder / "spiece.model").write_bytes(model.getvalue())
    _write_config(folder, tokenizer_class="AlbertTokenizer", model_max_length=48)
    return folder


@pytest.fixture(scope="module")
def dirs(bert_dirs, gpt2_dir, t5_dir, llama_dir, albert_dir):
    return {"bert": bert_dirs[True], "gpt2": gpt2_dir, "t5": t5_dir, "llama": llama_dir, "albert": albert_dir}


def _hf_tokenizers(name, folder):
    hf = _hf()
    cls = {"bert": hf.BertTokenizer, "gpt2": hf.GPT2Tokenizer, "t5": hf.T5Tokenizer, "llama": hf.LlamaTokenizer,
           "albert": hf.AlbertTokenizer}[name]
    return _quiet_hf(cls.from_pretrained, str(folder))


def _assert_same(ours: BatchEncoding, theirs, what):
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in theirs]
    assert sorted(ours) == sorted(keys), what
    for key in keys:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == torch.long and a.shape == b.shape, (what, key, a.shape, b.shape)
            assert torch.equal(a, b.long()), (what, key, a, b)
        else:
            assert a == b, (what, key, a, b)


def _compare_sample(ours, theirs, name):
    for text in SAMPLE:
        _assert_same(ours(text, return_tensors=None), _quiet_hf(theirs, text), f"{name} {text[:40]!r}")
        ids = theirs.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
        for pair in PAIRS[:2]:  # as a batch of one: transformers drops an empty text_pair given as a single string
            _assert_same(ours([text], text_pair=[pair], return_tensors=None),
                         _quiet_hf(theirs, [text], text_pair=[pair]), f"{name} pair {text[:40]!r}")


# -- same ids as transformers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lower", [True, False])
def test_bert_vocab_txt_matches_transformers(bert_dirs, lower):
    ours = load_tokenizer(bert_dirs[lower])
    assert ours.model_input_names == ["input_ids", "token_type_ids", "attention_mask"]
    _compare_sample(ours, _hf_tokenizers("bert", bert_dirs[lower]), f"bert lower={lower}")
    # and the pure-python (legacy) BERT tokenizer of transformers
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    slow = _quiet_hf(legacy.BertTokenizerLegacy.from_pretrained, str(bert_dirs[lower]))
    for text in SAMPLE:
        if not lower and "\u0301" in text:
            continue  # transformers' own fast and slow cased BERT differ on a lone combining accent
        assert ours.encode(text) == _quiet_hf(slow.encode, text), text


def test_gpt2_vocab_merges_matches_transformers(gpt2_dir):
    ours = load_tokenizer(gpt2_dir)
    theirs = _hf_tokenizers("gpt2", gpt2_dir)
    assert ours.bos_token == ours.eos_token == ours.unk_token == "<|endoftext|>" and ours.pad_token is None
    _compare_sample(ours, theirs, "gpt2")
    for text in SAMPLE:  # byte-level BPE decodes back to the exact text
        assert ours.decode(ours.encode(text)) == text == theirs.decode(theirs.encode(text))


def test_t5_sentencepiece_matches_transformers_and_sentencepiece(t5_dir, tmp_path):
    ours = load_tokenizer(t5_dir)
    _compare_sample(ours, _hf_tokenizers("t5", t5_dir), "t5")
    assert ours.eos_token == "</s>" and ours.pad_token_id == 0 and ours.unk_token_id == 2 and ours.bos_token is None
    theirs = _hf_tokenizers("t5", t5_dir)
    assert len(ours) == len(theirs) == 600 and ours.vocab_size == theirs.vocab_size
    sentinels = [f"<extra_id_{i}>" for i in (0, 1, 99)]
    assert ours.convert_tokens_to_ids(sentinels) == theirs.convert_tokens_to_ids(sentinels) == [599, 598, 500]
    text = "a <extra_id_0> b<extra_id_7>c"
    assert ours.encode(text) == theirs.encode(text)
    (tmp_path / "spiece.model").write_bytes((t5_dir / "tokenizer.model").read_bytes())  # T5's own file name
    (tmp_path / "tokenizer_config.json").write_bytes((t5_dir / "tokenizer_config.json").read_bytes())
    assert load_tokenizer(tmp_path).encode(text) == ours.encode(text)
    sp = spm.SentencePieceProcessor(model_proto=(t5_dir / "tokenizer.model").read_bytes())
    for text in PLAIN:  # the pipeline follows the model's own normaliser: same pieces as sentencepiece itself
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.encode(text)[-1] == 1


def test_llama_sentencepiece_matches_transformers(llama_dir):
    ours = load_tokenizer(llama_dir)
    theirs = _hf_tokenizers("llama", llama_dir)
    _compare_sample(ours, theirs, "llama")
    assert ours.padding_side == "left" and ours.encode("x")[0] == ours.bos_token_id == 1
    sp = spm.SentencePieceProcessor(model_proto=(llama_dir / "tokenizer.model").read_bytes())
    for text in PLAIN:
        if text.startswith(" "):
            continue  # transformers' Llama (legacy=False) drops SentencePiece's extra "▁" before a leading space
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text)), text


def test_albert_sentencepiece_matches_transformers(albert_dir):
    ours = load_tokenizer(albert_dir)
    assert ours.cls_token == "[CLS]" and ours.sep_token == "[SEP]" and ours.pad_token_id == 0
    _compare_sample(ours, _hf_tokenizers("albert", albert_dir), "albert")


def test_sentencepiece_without_config_follows_sentencepiece(llama_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((llama_dir / "tokenizer.model").read_bytes())
    ours = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in PLAIN:  # no config: the model's own rules, leading spaces included; no bos/eos added
        assert ours.encode(text) == sp.encode(text), text


@pytest.mark.parametrize("name,config", [
    ("gpt2", {"add_prefix_space": True}),
    ("llama", {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False, "add_bos_token": True}),
    ("llama", {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": True}),
    ("t5", {"tokenizer_class": "T5Tokenizer", "extra_ids": 3}),
    ("t5", {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "additional_special_tokens": ["<sep>", "<cls>"]}),
    ("bert", {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "strip_accents": True}),
    ("albert", {"tokenizer_class": "AlbertTokenizer", "do_lower_case": False, "keep_accents": True}),
])
def test_config_options_match_transformers(name, config, dirs, tmp_path):
    folder = dirs[name]
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _write_config(tmp_path, **config)
    ours, theirs = load_tokenizer(tmp_path), _hf_tokenizers(name, tmp_path)
    assert len(ours) == len(theirs)
    _compare_sample(ours, theirs, f"{name} {config}")


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "llama", "albert"])
def test_tokenizer_json_round_trip_with_transformers(name, dirs, tmp_path):
    """Ours saved -> transformers loads tokenizer.json; transformers saved -> ours loads tokenizer.json."""
    hf = _hf()
    folder = dirs[name]
    ours = load_tokenizer(folder)
    ours.save(tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    theirs = _quiet_hf(hf.PreTrainedTokenizerFast, tokenizer_file=str(tmp_path / "ours" / "tokenizer.json"))
    auto = _quiet_hf(hf.AutoTokenizer.from_pretrained, str(tmp_path / "ours"))  # with our tokenizer_config.json
    assert auto.model_input_names == ours.model_input_names
    for text in SAMPLE:
        assert ours.encode(text) == theirs.encode(text) == auto.encode(text), text
    reloaded = load_tokenizer(tmp_path / "ours")
    assert reloaded.all_special_tokens == ours.all_special_tokens
    for text in SAMPLE:
        assert reloaded.encode(text) == ours.encode(text)
    original = _hf_tokenizers(name, folder)
    _quiet_hf(original.save_pretrained, str(tmp_path / "hf"))
    from_hf = load_tokenizer(tmp_path / "hf")
    assert from_hf.pad_token == original.pad_token and from_hf.eos_token == original.eos_token
    _compare_sample(from_hf, original, f"{name} tokenizer.json")


# -- padding / truncation / max_length semantics -----------------------------------------------------------------------
_OPTIONS = [
    dict(padding=True),
    dict(padding="longest", truncation=True, max_length=12),
    dict(padding="max_length", max_length=20),
    dict(padding="max_length", truncation=True, max_length=9),
    dict(padding="max_length", truncation=True),  # max_length from model_max_length (48)
    dict(truncation=True, max_length=7, padding=True),
    dict(max_length=6, padding=False),  # truncation defaults to longest_first when only max_length is given
    dict(padding=True, pad_to_multiple_of=8),
    dict(padding=True, truncation="only_first", max_length=10),
    dict(padding=True, truncation=True, max_length=10, add_special_tokens=False),
]


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "llama", "albert"])
def test_padding_truncation_match_transformers(name, dirs):
    folder = dirs[name]
    ours, theirs = load_tokenizer(folder), _hf_tokenizers(name, folder)
    if ours.pad_token is None:  # GPT-2 / Llama have none: the usual fix, on both
        ours.pad_token = ours.eos_token
        theirs.pad_token = theirs.eos_token
    batch = SAMPLE[:6] + [SAMPLE[9]]
    pairs = (PAIRS * 2)[: len(batch)]
    for options in _OPTIONS:
        for pair in (None, pairs):
            try:
                ref = _quiet_hf(theirs, batch, text_pair=pair, **options)
            except Exception:  # e.g. only_first cannot make room when the second text alone is too long
                with pytest.raises(ValueError, match="Truncation error"):
                    _quiet_hf(ours, batch, text_pair=pair, return_tensors=None, **options)
                continue
            mine = _quiet_hf(ours, batch, text_pair=pair, return_tensors=None, **options)
            _assert_same(mine, ref, f"{name} {options} pair={pair is not None}")
    mine = ours(batch, text_pair=pairs, padding=True, truncation=True, max_length=16)
    ref = _quiet_hf(theirs, batch, text_pair=pairs, padding=True, truncation=True, max_length=16, return_tensors="pt")
    _assert_same(mine, ref, f"{name} tensors")
    # left padding, per call, as transformers' padding_side argument
    mine = ours(batch, padding=True, padding_side="left")
    ref = _quiet_hf(theirs, batch, padding=True, padding_side="left", return_tensors="pt")
    _assert_same(mine, ref, f"{name} left padding")


def test_single_string_and_tensors(bert_dirs):
    tok = load_tokenizer(bert_dirs[True])
    out = tok("hello world")
    assert isinstance(out, BatchEncoding) and set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    assert out.input_ids.shape == (1, len(tok.encode("hello world"))) and out["input_ids"].dtype == torch.long
    assert tok("hello", return_tensors=None)["input_ids"] == tok.encode("hello")
    batch = tok(["a b c", "a"], padding=True)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [tok.pad_token_id] * 2
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["a b c", "a"]
    assert tok.decode(batch["input_ids"][0]) == "[CLS] a b c [SEP]"
    assert tok.convert_ids_to_tokens(tok.encode("hello")) == ["[CLS]"] + tok.tokenize("hello") + ["[SEP]"]
    assert batch.to("cpu")["input_ids"].equal(batch["input_ids"])
    empty = load_tokenizer(bert_dirs[True])([""], add_special_tokens=False)
    assert empty["input_ids"].shape == (1, 0) and empty["input_ids"].dtype == torch.long


# -- training ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram", "sentencepiece"])
def test_train_tokenizer_kinds(kind, tmp_path):
    tok = train_tokenizer(CORPUS[:800], kind=kind, vocab_size=300)
    assert isinstance(tok, Tokenizer) and 200 <= tok.vocab_size <= 300
    assert tok.unk_token is not None or kind == "bpe" or tok.unk_token_id is not None
    text = "Hello naïve café 123 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and all(isinstance(i, int) for i in ids)
    decoded = tok.decode(ids)
    if kind == "bpe":
        assert decoded == text
    elif kind == "wordpiece":
        assert decoded == "hello naive cafe 123 [UNK]" or decoded.startswith("hello naive cafe 123")
    else:
        assert decoded.replace(" ", "").startswith("Hellonaïvecafé123")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    try:  # transformers reads the saved folder too (when installed)
        import transformers
        auto = _quiet_hf(transformers.AutoTokenizer.from_pretrained, str(tmp_path)).encode
    except ImportError:
        auto = tok.encode
    for t in SAMPLE:
        assert again.encode(t) == tok.encode(t) == auto(t), t
    if kind == "sentencepiece":
        assert (tmp_path / "tokenizer.model").is_file()
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
        for t in PLAIN:
            assert tok.encode(t, add_special_tokens=False) == sp.encode(t), t


def test_train_tokenizer_from_files_and_special_tokens(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS[:500]), encoding="utf-8")
    tok = train_tokenizer([path], kind="wordpiece", vocab_size=250, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                      "[SEP]", "[MASK]", "[X]"])
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[X]")] == list(range(6))
    assert tok.extra_special_tokens == ["[X]"] and tok.encode("[X]", add_special_tokens=False) == [5]
    same = train_tokenizer([str(path)], kind="wordpiece", vocab_size=250)  # a str path is a file too
    assert same.vocab_size == 250 and same.decode(same.encode("kalo mi"), skip_special_tokens=True) == "kalo mi"
    enc = tok(["kalo mi", "ne"], text_pair=["ru", "ta shi"], padding=True)
    assert enc["token_type_ids"][0].tolist()[:3] == [0, 0, 0] and 1 in enc["token_type_ids"][0].tolist()


# -- errors ------------------------------------------------------------------------------------------------------------
def test_errors(tmp_path, bert_dirs, gpt2_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad_merges"
    bad.mkdir()
    (bad / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (bad / "merges.txt").write_text("#version: 0.2\na b\na b c\n")
    with pytest.raises(ValueError, match="line 3"):
        load_tokenizer(bad)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(broken)
    gpt2 = load_tokenizer(gpt2_dir)
    with pytest.raises(ValueError, match="no pad token"):
        gpt2(["a", "bb"], padding=True)
    with pytest.raises(ValueError, match="different lengths"):
        gpt2(["a", "bb cc dd"])
    bert = load_tokenizer(bert_dirs[True])
    with pytest.raises(ValueError, match="padding must be"):
        bert("a", padding="yes")
    with pytest.raises(ValueError, match="truncation must be"):
        bert("a", truncation="sometimes")
    with pytest.raises(ValueError, match="max_length"):
        bert("a", max_length=-1)
    with pytest.raises(ValueError, match="return_tensors"):
        bert("a", return_tensors="np")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        bert(["a", 3])
    with pytest.raises(ValueError, match="text_pair has 1 items"):
        bert(["a", "b"], text_pair=["c"])
    with pytest.raises(ValueError, match="padding_side"):
        bert("a", padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="multiple of pad_to_multiple_of"):
        bert(["a"], padding=True, truncation=True, max_length=10, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="kind must be"):
        train_tokenizer(CORPUS[:10], kind="bytes")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS[:10], kind="bpe", vocab_size=0)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], kind="bpe")


def test_add_special_tokens_and_pad_token(gpt2_dir):
    tok = load_tokenizer(gpt2_dir)
    n = len(tok)
    assert tok.add_special_tokens({"pad_token": "<pad>"}) == 1 and len(tok) == n + 1 and tok.pad_token_id == n
    batch = tok(["kalo", "kalo mi ne ru"], padding=True)
    assert batch["input_ids"][0, -1].item() == n and batch["attention_mask"][0, -1].item() == 0
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "kalo"
    assert tok.add_special_tokens(["<sep>"]) == 1 and tok.encode("a<sep>b") == [
        *tok.encode("a"), tok.token_to_id("<sep>"), *tok.encode("b")]
    with pytest.raises(ValueError, match="unknown key"):
        tok.add_special_tokens({"padding": "<pad>"})
    with pytest.raises(ValueError, match="empty list"):
        tok([])
