"""Text models, whole model, mltoolkit.models against the transformers originals (same weights):

- bert_inference: BertModel forward (CPU float32, batch 8, seq 128, attention_mask given, no padding). Providers:
  "mltoolkit" (mltoolkit.models.bert.BertModel: mltoolkit attention, fused add + LayerNorm, oneDNN GEMMs with the
  activation in the epilogue), "torch eager" (transformers.BertModel, its default SDPA attention), "torch.compile"
  (transformers' model compiled), "torch.compile(mltoolkit)"; sequences/s = batch / time. Not in --quick (as the other
  whole models on the CPU).
- gpt2_train_step: GPT2LMHeadModel training step on CUDA under bf16 autocast (GPT-2 small, batch 8 (quick) / 16,
  seq 1024): zero_grad, forward with labels (next-token loss), backward, AdamW step (torch's fused AdamW for every
  provider, so only the model differs). Providers: mltoolkit's model, transformers' model eager and compiled, and
  mltoolkit's model compiled. CUDA only (nothing to run on CPU).

Correctness is the tests' job (tests/test_models_text.py checks the same models against transformers); the
inference rows also pass the harness's check against transformers' output.
"""
import copy
import warnings

import torch

from mltoolkit.benchmark import Benchmark

_CURRENT: dict = {}


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


# ---- BERT inference -------------------------------------------------------------------------------------------

def _bert_inputs(config, dtype, device):
    transformers = _transformers()
    from mltoolkit.models import bert

    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=config["layers"])
    ref = transformers.BertModel(cfg).eval().to(device=device, dtype=dtype)
    ours = bert.BertModel(bert.BertConfig(num_hidden_layers=config["layers"])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mltoolkit.models.hf import load_weights

        load_weights(ours, ref.state_dict(), strict=True)
    ours = ours.to(device=device, dtype=dtype)
    _CURRENT.clear()
    _CURRENT.update(ref=ref, ours=ours)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (config["batch"], config["seq"]), generator=g).to(device)
    mask = torch.ones_like(ids)
    return ids, mask


def _bert_ref(ids, mask):
    return _CURRENT["ref"](ids, attention_mask=mask).last_hidden_state


def _bert_ours(ids, mask):
    return _CURRENT["ours"](ids, attention_mask=mask).last_hidden_state


def _bert_baselines(device):
    return {"mltoolkit": _bert_ours, "torch.compile(mltoolkit)": torch.compile(_bert_ours, dynamic=False)}


def _bert_flops(config, dtype, mode):
    d, layers, seq, tokens = 768, config["layers"], config["seq"], config["batch"] * config["seq"]
    return int(2 * tokens * layers * 12 * d * d + layers * 4 * seq * d * tokens)


# ---- GPT-2 training step --------------------------------------------------------------------------------------

def _gpt2_inputs(config, dtype, device):
    transformers = _transformers()
    from mltoolkit.models import gpt
    from mltoolkit.models.hf import load_weights

    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(device).train()
    _CURRENT.clear()

    def run(model):
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def ours_model():
        m = gpt.GPT2LMHeadModel(gpt.GPT2Config())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_weights(m, ref.state_dict())
        return m.to(device).train()

    _CURRENT["torch eager"] = run(copy.deepcopy(ref))
    m = copy.deepcopy(ref)
    _CURRENT["torch.compile"] = (torch.compile(m, dynamic=False), run(m)[1])
    _CURRENT["mltoolkit"] = run(ours_model())
    m = ours_model()
    _CURRENT["torch.compile(mltoolkit)"] = (torch.compile(m, dynamic=False), run(m)[1])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (config["batch"], config["seq"]), generator=g).to(device)
    return (ids,)


def _gpt2_step(name):
    def step(ids):
        model, opt = _CURRENT[name]
        with torch.enable_grad():  # the harness times "fwd" under no_grad
            opt.zero_grad(set_to_none=True)
            with torch.autocast(ids.device.type, torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
        return loss.detach()
    return step


def _gpt2_flops(config, dtype, mode):
    d, layers, seq, tokens = 768, 12, config["seq"], config["batch"] * config["seq"]
    params = layers * 12 * d * d + 50257 * d
    return int(6 * params * tokens + layers * 6 * 2 * seq * d * tokens)


def benchmarks(device: str, quick: bool):
    if _transformers() is None:
        return []
    if device == "cuda":
        configs = [{"model": "gpt2-small", "batch": 8 if quick else 16, "seq": 1024}]
        steps = {name: _gpt2_step(name) for name in ("mltoolkit", "torch.compile", "torch.compile(mltoolkit)")}
        return [Benchmark("gpt2_train_step", "gpt2_train_step", _gpt2_step("mltoolkit"), _gpt2_step("torch eager"),
                          _gpt2_step("torch eager"), _gpt2_inputs, configs, [torch.float32], flops=_gpt2_flops,
                          modes=("fwd",), baselines=lambda dev: steps, compile_baseline=False, check=False,
                          max_reps=30)]
    if quick:  # as the other whole models on the CPU: with transformers' import and its build, 21-31 s of a ~3 min run
        return []
    configs = [{"model": "bert-base", "layers": 12, "batch": 8, "seq": 128}]
    return [Benchmark("bert_inference", "bert_inference", _bert_ours, _bert_ref, _bert_ref, _bert_inputs, configs,
                      [torch.float32], flops=_bert_flops, modes=("fwd",), baselines=_bert_baselines,
                      max_reps=20)]
