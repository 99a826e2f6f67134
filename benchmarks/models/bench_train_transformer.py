"""Train-step throughput of a small GPT-style transformer (pre-norm blocks of causal nn.MultiheadAttention and a GELU
MLP, tied-free LM head), with and without mltoolkit: one step is zero_grad, forward, cross-entropy, backward,
global-norm clipping to 1.0 and an AdamW step.

Providers: "mltoolkit" = `mltoolkit.optimize(model)` (LayerNorm and MultiheadAttention swapped for mltoolkit's
kernels) + `mltoolkit.optim.AdamW` + `mltoolkit.optim.clip_grad_norm_`; "torch eager" = the same model with
`torch.optim.AdamW(fused=True)` and `torch.nn.utils.clip_grad_norm_`; "torch.compile" = the torch model compiled
(optimizer as in eager); "torch.compile(optimize())" = mltoolkit's model compiled with mltoolkit's optimizer.
CUDA runs under bf16 autocast, CPU in float32. tokens/s = batch x seq / time.

Each provider owns a copy of the model and its optimizer, built by the inputs hook, so timing includes no set-up;
the parameters change from step to step as in training. The tests check the pieces (tests/nn, tests/test_optim_*);
this file only times.
"""
import copy

import torch
from torch import nn

import mltoolkit
import mltoolkit.optim
from mltoolkit.benchmark import Benchmark

HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1), persistent=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = self.mask[:t, :t].to(x.dtype)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln_f(x))


_RUNS: dict = {}  # provider -> (model, optimizer, clip) of the config being run


def _inputs(config, dtype, device):
    torch.manual_seed(0)
    base = TinyGPT(config["vocab"], config["d"], config["layers"], config["heads"], config["seq"]).to(device)
    fused = device == "cuda" or hasattr(torch._C, "_fused_adamw_")
    _RUNS.clear()

    def torch_run(model):
        opt = torch.optim.AdamW(model.parameters(), **HYPER, fused=fused) if fused else \
            torch.optim.AdamW(model.parameters(), **HYPER, foreach=True)
        return model, opt, torch.nn.utils.clip_grad_norm_

    def ours(model):
        return model, mltoolkit.optim.AdamW(model.parameters(), **HYPER), mltoolkit.optim.clip_grad_norm_

    _RUNS["torch eager"] = torch_run(copy.deepcopy(base))
    m = copy.deepcopy(base)
    _RUNS["torch.compile"] = (torch.compile(m, dynamic=False),) + torch_run(m)[1:]
    _RUNS["mltoolkit"] = ours(mltoolkit.optimize(copy.deepcopy(base)))
    m = mltoolkit.optimize(copy.deepcopy(base))
    _RUNS["torch.compile(optimize())"] = (torch.compile(m, dynamic=False),) + ours(m)[1:]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config["vocab"], (config["batch"], config["seq"] + 1), generator=g).to(device)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _step(name):
    def step(x, y):
        model, opt, clip = _RUNS[name]
        with torch.enable_grad():  # the harness times "fwd" under no_grad
            opt.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=x.device.type == "cuda"):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            clip(_RUNS[name][0].parameters(), 1.0)
            opt.step()
        return loss.detach()
    return step


def _flops(config, dtype, mode):
    d, layers, seq, tokens = config["d"], config["layers"], config["seq"], config["batch"] * config["seq"]
    params = layers * 12 * d * d + config["vocab"] * d
    return int(6 * params * tokens + layers * 6 * 2 * seq * d * tokens)  # weights fwd+bwd, plus QK^T and PV


def benchmarks(device: str, quick: bool):
    if device == "cuda":
        configs = [{"model": "gpt-mini", "vocab": 8192, "d": 512, "layers": 6, "heads": 8, "seq": 512,
                    "batch": 8 if quick else 32}]
    else:
        if quick:  # four torch.compile builds of a training step take minutes on 2 cores
            return []
        configs = [{"model": "gpt-tiny", "vocab": 2048, "d": 256, "layers": 4, "heads": 4, "seq": 128, "batch": 8}]
    # A whole model has no backend table of its own (an empty one): "mltoolkit" is a named yardstick beside torch's.
    baselines = {name: _step(name) for name in ("mltoolkit", "torch.compile", "torch.compile(optimize())")}
    return [Benchmark(
        "train_step_transformer", "train_step_transformer", _step("mltoolkit"), _step("torch eager"),
        _step("torch eager"),
        _inputs, configs, [torch.float32], flops=_flops, modes=("fwd",), baselines=lambda dev: baselines,
        compile_baseline=False, check=False, max_reps=30)]
