"""BERT, GPT-2 and Llama-style models against transformers: checkpoints written by transformers' save_pretrained load
with our from_pretrained and give the same outputs (fp32, tight tolerance); our save_pretrained loads back in
transformers; bad folders and mismatching checkpoints raise clear errors."""
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from mltoolkit.models import bert, gpt, hf  # noqa: E402

ATOL = 2e-5


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bert_config(**kw):
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=64, type_vocab_size=3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, num_labels=3)
    cfg.update(kw)
    return transformers.BertConfig(**cfg)


def gpt2_config(**kw):
    cfg = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    cfg.update(kw)
    return transformers.GPT2Config(**cfg)


def llama_config(**kw):
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=37, max_position_embeddings=128, initializer_range=0.2)
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


def hf_model(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


def saved(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def inputs(batch=3, seq=11, vocab=97, types=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 4:] = 0
    mask[2, 3:] = 0
    token_types = torch.randint(0, types, (batch, seq), generator=g)
    return ids, mask, token_types


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ---- BERT -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
def test_bert_matches_transformers(tmp_path, name):
    ref = hf_model(getattr(transformers, name), bert_config())
    ours = hf.from_pretrained(saved(ref, tmp_path))
    assert type(ours).__name__ == name and ours.loading_info == {"missing_keys": [], "unexpected_keys": []}
    ids, mask, types = inputs()
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    keep = mask.bool()
    if name == "BertModel":
        close(b.last_hidden_state[keep], a.last_hidden_state[keep])
        close(b.pooler_output, a.pooler_output)
        close(b["pooler_output"], a["pooler_output"])
        assert b[0] is b.last_hidden_state and "pooler_output" in b.keys()
    elif name == "BertForMaskedLM":
        close(b.logits[keep], a.logits[keep])
    else:
        close(b.logits, a.logits)
    assert len(b.hidden_states) == len(a.hidden_states) == 3
    close(b.hidden_states[1][keep], a.hidden_states[1][keep])
    # without mask and token types
    with torch.no_grad():
        close(ours(ids)[0], ref(ids)[0])


def test_bert_losses_and_gradients_match(tmp_path):
    ref = hf_model(transformers.BertForMaskedLM, bert_config())
    ours = hf.from_pretrained(saved(ref, tmp_path)).train()
    ref.train()
    ids, mask, types = inputs()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    a = ref(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        close(p.grad, ref_params[key].grad, atol=1e-4)


def test_sequence_classification_loss(tmp_path):
    ref = hf_model(transformers.BertForSequenceClassification, bert_config())
    ours = hf.from_pretrained(saved(ref, tmp_path))
    ids, mask, _ = inputs()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        close(ours(ids, attention_mask=mask, labels=labels).loss, ref(ids, attention_mask=mask, labels=labels).loss)


def test_trunk_checkpoint_into_head_model(tmp_path):
    """A BertModel folder loads into BertForSequenceClassification: the trunk's weights arrive under `bert.`, the
    classifier is reported missing (and left randomly initialized), as transformers does."""
    ref = hf_model(transformers.BertModel, bert_config())
    folder = saved(ref, tmp_path)
    with pytest.warns(UserWarning, match="missing keys.*classifier.weight"):
        ours = bert.BertForSequenceClassification.from_pretrained(folder)
    assert sorted(ours.loading_info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    ids, mask, types = inputs()
    with torch.no_grad():
        close(ours.bert(ids, mask, types).pooler_output, ref(ids, attention_mask=mask, token_type_ids=types)[1])
    with pytest.raises(RuntimeError, match="missing keys"):
        bert.BertForSequenceClassification.from_pretrained(folder, strict=True)


# ---- GPT-2 and Llama ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_tied", "llama_mha_bias"])
def test_decoder_matches_transformers(tmp_path, kind):
    if kind == "gpt2":
        ref = hf_model(transformers.GPT2LMHeadModel, gpt2_config())
    else:
        extra = {"llama_tied": dict(tie_word_embeddings=True),
                 "llama_mha_bias": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)}.get(kind, {})
        ref = hf_model(transformers.LlamaForCausalLM, llama_config(**extra))
    ours = hf.from_pretrained(saved(ref, tmp_path))
    assert ours.loading_info == {"missing_keys": [], "unexpected_keys": []}
    ids, _, _ = inputs(seq=13)
    with torch.no_grad():
        close(ours(ids).logits, ref(ids).logits)
        # left padding: positions from the mask, pad keys masked (compare the real tokens only)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        mask[2, :7] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        a = ref(ids, attention_mask=mask, position_ids=pos).logits
        b = ours(ids, attention_mask=mask, position_ids=pos).logits
        close(b[mask.bool()], a[mask.bool()])
    labels = ids.clone()
    labels[0, :4] = -100
    a = ref(ids, labels=labels)
    b = ours(ids, labels=labels)
    close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        close(p.grad, ref_params[key].grad, atol=1e-4)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_padded_lm_head_and_fused_loss(with_bias):
    """The LM head over a vocabulary padded to a multiple of 64 with -inf logits (CUDA, many rows): F.linear's logits
    in the first columns and, with the fused loss reading the padded logits whole, F.cross_entropy's loss and
    gradients (none reaching the padding); also under torch.compile."""
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(97, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 97, (2, 9))
    labels[0, 3] = -100

    def head_and_loss(h, w, b):
        logits, padded = gpt._padded_head(h, w, b, -97 % 64)
        return logits, padded, gpt._lm_loss(padded, labels)

    logits, padded, loss = head_and_loss(h, w, b)
    assert logits.shape == (2, 9, 97) and padded.shape == (2, 9, 128)
    assert torch.isneginf(padded[..., 97:]).all()
    leaves = [t for t in (h, w, b) if t is not None]
    copies = [t.detach().clone().requires_grad_(True) for t in leaves]
    h2, w2, b2 = copies[0], copies[1], copies[2] if with_bias else None
    expected = torch.nn.functional.linear(h2, w2, b2)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    loss2 = torch.nn.functional.cross_entropy(expected.flatten(0, 1), shifted.flatten())
    close(logits, expected, atol=1e-12)
    assert loss.dtype == torch.float32
    close(loss.double(), loss2, atol=1e-6)
    grads = torch.autograd.grad(loss, leaves)
    grads2 = torch.autograd.grad(loss2, copies)
    for a, e in zip(grads, grads2):
        assert a.shape == e.shape and torch.isfinite(a).all()
        close(a, e, atol=1e-6)
    compiled = torch.compile(head_and_loss, fullgraph=True)
    close(compiled(h, w, b)[2], loss, atol=1e-6)


@pytest.mark.cuda
def test_padded_lm_head_in_the_model_on_gpu():
    torch.manual_seed(0)
    model = gpt.GPT2LMHeadModel(gpt.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).cuda()
    ids = torch.randint(0, 97, (5, 64), device="cuda")  # 320 rows: the padded head
    out = model(ids, labels=ids)
    assert out.logits.shape == (5, 64, 97) and out.logits.stride(-2) == 128
    with torch.no_grad():
        expected = torch.nn.functional.linear(model.transformer(ids).last_hidden_state, model.lm_head.weight)
    close(out.logits, expected, atol=1e-4)
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    close(out.loss, torch.nn.functional.cross_entropy(expected.flatten(0, 1), shifted.flatten()), atol=1e-4)
    out.loss.backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()


def test_trunk_only_decoders(tmp_path):
    for cls, config, ours_cls in ((transformers.GPT2Model, gpt2_config(), gpt.GPT2Model),
                                  (transformers.LlamaModel, llama_config(), gpt.LlamaModel)):
        ref = hf_model(cls, config)
        ours = hf.from_pretrained(saved(ref, tmp_path / cls.__name__))
        assert type(ours) is ours_cls
        ids, _, _ = inputs()
        with torch.no_grad():
            close(ours(ids).last_hidden_state, ref(ids).last_hidden_state)


# ---- save_pretrained / formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert_tiny_mlm", "bert_tiny_classifier", "gpt2_tiny", "llama_tiny"])
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    builders = {**bert.MODELS, **gpt.MODELS}
    small = {"bert": dict(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=40),
             "gpt2": dict(vocab_size=97, n_embd=32, n_head=4, n_positions=32),
             "llama": dict(vocab_size=97, hidden_size=32, intermediate_size=40)}[name.split("_")[0]]
    torch.manual_seed(0)
    ours = builders[name](**small).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary files left
    ref = getattr(transformers, type(ours).__name__).from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        a, b = ref(ids), ours(ids)
    close(b[0], a[0])
    again = hf.from_pretrained(tmp_path)
    assert again.loading_info["missing_keys"] == [] and again.loading_info["unexpected_keys"] == []
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_pytorch_model_bin_and_old_keys(tmp_path):
    """pytorch_model.bin (weights_only load), keys with buffers of old checkpoints (position_ids, attn.bias) and an
    explicit lm_head.weight copy are accepted silently."""
    ref = hf_model(transformers.GPT2LMHeadModel, gpt2_config())
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = hf.from_pretrained(tmp_path)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        close(ours(ids).logits, ref(ids).logits)


def test_sharded_safetensors_and_legacy_layer_norm_names(tmp_path):
    ref = hf_model(transformers.BertModel, bert_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids, mask, types = inputs()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, token_type_ids=types).pooler_output
        close(hf.from_pretrained(tmp_path / "sharded")(ids, mask, types).pooler_output, expected)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in ref.state_dict().items()}
    ours = bert.BertModel(bert.BertConfig.from_dict(ref.config.to_dict())).eval()
    assert hf.load_weights(ours, state, strict=True) == {"missing_keys": [], "unexpected_keys": []}
    with torch.no_grad():
        close(ours(ids, mask, types).pooler_output, expected)


def test_config_round_trip_and_overrides(tmp_path):
    cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, num_labels=4)
    again = bert.BertConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.num_labels == 4 and len(cfg.to_dict()["id2label"]) == 4
    model = bert.MODELS["bert_tiny_classifier"](num_labels=5, num_hidden_layers=1)
    assert model.classifier.out_features == 5 and len(model.bert.encoder.layer) == 1
    with pytest.raises(TypeError, match="unknown field"):
        bert.MODELS["bert_tiny"](hidden_sizes=3)
    with pytest.raises(NotImplementedError, match="rope_type"):
        gpt.LlamaConfig(hidden_size=32, num_attention_heads=4, rope_parameters={"rope_type": "yarn"})
    old = gpt.LlamaConfig.from_dict({"hidden_size": 32, "num_attention_heads": 4, "rope_theta": 500000.0})
    assert old.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}


# ---- torch.compile --------------------------------------------------------------------------------------------

def test_compile_fullgraph(tmp_path):
    ref = hf_model(transformers.BertModel, bert_config())
    ours = hf.from_pretrained(saved(ref, tmp_path / "bert"))
    ids, mask, types = inputs()
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        keep = mask.bool()
        close(compiled(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep],
              ref(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[keep])
    dec = hf.from_pretrained(saved(hf_model(transformers.LlamaForCausalLM, llama_config()), tmp_path / "llama"))
    compiled = torch.compile(dec, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        close(compiled(ids).logits, dec(ids).logits)


@pytest.mark.skipif(not bert.USE_ONEDNN_LINEAR, reason="torch has no oneDNN linear op")
def test_compiled_inference_keeps_the_onednn_linears():
    """fp32 CPU inference under torch.compile runs the same oneDNN GEMMs as eager (mltoolkit::onednn_linear, which
    Inductor calls as it is), so the compiled model gives eager's outputs; training graphs keep F.linear."""
    model = bert.BertModel(bert.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=37, max_position_embeddings=64)).eval()
    ids, mask, types = inputs()
    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    with torch.no_grad():
        eager = model(ids, attention_mask=mask).last_hidden_state
        torch.compile(model, fullgraph=True, backend=record)(ids, attention_mask=mask)
        compiled = torch.compile(model, fullgraph=True)(ids, attention_mask=mask).last_hidden_state
    assert any("mltoolkit.onednn_linear" in t for t in graphs[0])
    assert not any("linear" in t and "onednn" not in t for t in graphs[0])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    graphs.clear()
    torch.compile(model.train(), fullgraph=True, backend=record)(ids, attention_mask=mask).last_hidden_state.sum()
    assert not any("onednn" in t for t in graphs[0]) and any("linear" in t for t in graphs[0])
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    torch.library.opcheck(torch.ops.mltoolkit.onednn_linear, (x, w, torch.randn(3), "gelu", "tanh"))


# ---- bad input ------------------------------------------------------------------------------------------------

def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(ValueError, match="model_type 't5'.*not supported.*bert"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model"):
        ref = hf_model(transformers.BertModel, bert_config())
        gpt.GPT2LMHeadModel.from_pretrained(saved(ref, tmp_path / "b"))


def test_shape_mismatch_names_the_key(tmp_path):
    ref = hf_model(transformers.BertModel, bert_config())
    folder = saved(ref, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 120
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)vocab_size.*embeddings\.word_embeddings\.weight: checkpoint "
                                         r"\[97, 32\] vs model \[120, 32\]"):
        hf.from_pretrained(folder)
    with pytest.raises(ValueError, match="vocab_size"):
        hf.from_pretrained(folder, vocab_size=200)


def test_bad_forward_input(tmp_path):
    model = bert.MODELS["bert_tiny"](num_hidden_layers=1)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.ones(1, 200, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a mltoolkit.models text model"):
        hf.save_pretrained(torch.nn.Linear(2, 2), tmp_path)
