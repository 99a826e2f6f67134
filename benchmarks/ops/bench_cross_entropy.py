"""Fused softmax cross-entropy (ops.cross_entropy with a float32 loss) against a language model's usual loss,
F.cross_entropy(logits.float(), target) (transformers' ForCausalLMLoss), eager and compiled, and against
F.cross_entropy on the 16-bit logits directly."""
import torch
import torch.nn.functional as F

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark


def _inputs(config, dtype, device):
    n, c = config["N"], config["C"]
    x = (2 * torch.randn(n, c, device=device)).to(dtype)
    t = torch.randint(0, c, (n,), device=device)
    t[:: config.get("ignore_every", 1024)] = -100  # the shifted labels' padding
    return x, t


def _bytes(config, dtype, mode):
    logits = config["N"] * config["C"] * (torch.finfo(dtype).bits // 8)
    # forward: read the logits; backward: read them again and write their gradient
    return {"fwd": logits, "bwd": 2 * logits, "fwd+bwd": 3 * logits}[mode]


def _ours(x, t):
    return ops.cross_entropy(x, t, out_dtype=torch.float32)


def _upcast_loss(x, t):
    return F.cross_entropy(x.float(), t)


def benchmarks(device: str, quick: bool):
    if device == "cuda":
        gpt2 = {"N": 8192, "C": 50257}  # GPT-2 small, batch 8 x 1024 tokens
        configs = [gpt2] if quick else [gpt2, {"N": 4096, "C": 128256}]  # Llama 3's vocabulary
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    else:
        small = {"N": 512, "C": 50257}
        configs = [small]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    full = not quick
    return [
        Benchmark("cross_entropy", "cross_entropy", _ours, _upcast_loss, _upcast_loss, _inputs, configs, dtypes,
                  grad_args=(0,), bytes=_bytes, include_reference_backend=full,
                  baselines=lambda _device: {"torch 16-bit logits": lambda x, t: F.cross_entropy(x, t).float()}),
    ]
