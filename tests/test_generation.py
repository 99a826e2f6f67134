"""generate() and the KV cache of GPT2LMHeadModel and LlamaForCausalLM against transformers: greedy decoding gives
the same tokens (left padding and eos included), with and without the cache; sampling is reproducible with a seed and
stays inside the top-k / top-p sets; the filters match transformers' logits warpers."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from mltoolkit.models import generation, gpt, hf  # noqa: E402

VOCAB = 97


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=None, initializer_range=0.2)
        ref = transformers.GPT2LMHeadModel(config).eval()
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                                          eos_token_id=None, bos_token_id=0, initializer_range=0.2)
        ref = transformers.LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path)
    return ref, hf.from_pretrained(tmp_path)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory.mktemp(request.param))


def _left_padded(batch=3, seq=7):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _hf_generate(ref, ids, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.generate(ids, do_sample=False, pad_token_id=0, **kw)


def test_greedy_matches_transformers(models):
    ref, ours = models
    ids, mask = _left_padded()
    expected = _hf_generate(ref, ids, attention_mask=mask, max_new_tokens=12)
    assert len(set(expected[0, 7:].tolist())) > 2  # a decoding that does not repeat one token
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(got, expected)
    no_cache = ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, use_cache=False)
    assert torch.equal(no_cache, expected)
    # unpadded single prompt
    assert torch.equal(ours.generate(ids[:1], max_new_tokens=10), _hf_generate(ref, ids[:1], max_new_tokens=10))


def test_eos_stops_and_pads_like_transformers(models):
    ref, ours = models
    ids, mask = _left_padded()
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=8)
    eos = int(free[0, 7 + 2])  # row 0 emits it at its third step
    expected = _hf_generate(ref, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert (got[0, 10:] == 0).all()


def test_kv_cache_chunks_equal_full_forward(models):
    """Feeding the sequence in chunks through the cache (queries bottom-right aligned over cached keys) gives the
    logits of one full forward; the cache grows past its first allocation."""
    _, ours = models
    ids = torch.randint(1, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids).logits
        cache = generation.KVCache(max_length=4)
        parts = []
        for start, end in ((0, 5), (5, 6), (6, 11), (11, 14)):
            out = ours(ids[:, start:end], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
            assert out.past_key_values is cache and cache.length == end
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-5)


def test_sampling_reproducible_and_filtered(models):
    _, ours = models
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    a = ours.generate(ids, seed=123, **kw)
    b = ours.generate(ids, generator=torch.Generator().manual_seed(123), **kw)
    assert torch.equal(a, b)
    runs = {tuple(ours.generate(ids, seed=s, **kw).flatten().tolist()) for s in range(4)}
    assert len(runs) > 1
    # every sampled token lies in the top-k and top-p sets of its step's (tempered) logits
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([mask, torch.ones(3, 10, dtype=torch.long)], dim=1)
    full_pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, 11)], dim=1)
    with torch.no_grad():
        logits = ours(a, attention_mask=full_mask, position_ids=full_pos).logits.float() / 0.7
    for step in range(10):
        scores = logits[:, 6 + step]
        token = a[:, 7 + step]
        kept = generation.top_p_filter(generation.top_k_filter(scores, 5), 0.9)
        assert torch.isfinite(kept.gather(1, token[:, None])).all()
        assert (scores.topk(5).values[:, -1] <= scores.gather(1, token[:, None]).squeeze(1)).all()
    # top_k=1 and a tiny top_p are greedy
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1,
                                     seed=5), greedy)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=1e-6,
                                     seed=5), greedy)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 50):
        assert torch.equal(generation.top_k_filter(scores, k), TopKLogitsWarper(k)(None, scores.clone()))
    for p in (0.05, 0.5, 0.9, 0.999):
        assert torch.equal(generation.top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores.clone()))


def test_bad_generate_arguments(models):
    _, ours = models
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(torch.ones(3))
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(ids, attention_mask=torch.ones(1, 4))
    assert torch.equal(ours.generate(ids, max_new_tokens=0), ids)


def test_position_limit_is_reported(tmp_path):
    model = gpt.MODELS["gpt2_tiny"](n_positions=8, n_layer=1)
    with pytest.raises(ValueError, match="exceed the model's 8 positions"):
        model.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=6)
