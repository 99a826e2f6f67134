"""Attention (flash-style SDPA) against torch SDPA (default dispatch, each of its backends that runs here),
torch.compile and plain math attention: time, TFLOP/s and peak memory, forward and forward + backward."""
import math

import torch
import torch.nn.functional as F

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark
from mltoolkit.ops.reference import attention as ref


def _inputs(config, dtype, device):
    b, h, n, d = config["B"], config["H"], config["L"], config["D"]
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=device) for _ in range(3))
    return q, k, v, bool(config["causal"])


def _flops(config, dtype, mode):
    # 4 B H Lq Lk D for QK^T and PV, half of it under a causal mask; the backward does 2.5x the forward's work.
    fwd = 4 * config["B"] * config["H"] * config["L"] ** 2 * config["D"] / (2 if config["causal"] else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _ours(q, k, v, causal):
    return ops.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _torch_sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _math_attention(q, k, v, causal):
    """What a model without SDPA does: materialize the scores, softmax, multiply."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _reference(q, k, v, causal):
    return ref.attention(q, k, v, window_right=0 if causal else -1)[0]


def _sdpa_backends(device, with_math=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if with_math:
        names["math"] = SDPBackend.MATH
    if device == "cuda":
        names["cudnn"] = SDPBackend.CUDNN_ATTENTION

    def pinned(backend):
        def call(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return call

    baselines = {f"torch sdpa[{name}]": pinned(b) for name, b in names.items()}
    if with_math:
        baselines["torch math attention"] = _math_attention
    return baselines


def _configs(device, quick):
    if device == "cuda":
        # FlashAttention's benchmark shape family: B * L = 16k tokens, H * D = 2048.
        lengths = [8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        dims = [128] if quick else [64, 128]
        return [{"B": 16384 // n, "H": 2048 // d, "L": n, "D": d, "causal": c}
                for d in dims for n in lengths for c in (False, True)]
    if quick:  # the target's shape at half its length: at L = 2048 its reference and reps took 72 of ~460 s
        return [{"B": 4, "H": 8, "L": 1024, "D": 64, "causal": True}]
    return [{"B": 4, "H": 8, "L": n, "D": 64, "causal": c} for n in (512, 2048) for c in (True, False)] + [
        {"B": 2, "H": 8, "L": 1024, "D": 128, "causal": True}]


def benchmarks(device: str, quick: bool):
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32]
    benches = [Benchmark("attention", "attention", _ours, _torch_sdpa, _reference, _inputs, _configs(device, quick),
                         dtypes, grad_args=(0, 1, 2), flops=_flops, modes=("fwd", "fwd+bwd"),
                         # --quick on the CPU leaves out the two yardsticks that materialize the attention matrix:
                         # 5-10x slower than the rest, they took two thirds of the quick run's attention time.
                         baselines=lambda dev: _sdpa_backends(dev, with_math=not (quick and dev == "cpu")))]
    if device == "cpu" and not quick:
        # Memory proof: the 16 x 16384 x 16384 fp32 attention matrix alone would be 17 GB.
        benches.append(Benchmark("attention_memory", "attention", _ours, _torch_sdpa, _reference, _inputs,
                                 [{"B": 1, "H": 16, "L": 16384, "D": 64, "causal": False}], [torch.float32],
                                 grad_args=(0, 1, 2), flops=_flops, modes=("fwd+bwd",), compile_baseline=False,
                                 check=False, max_reps=1))
    return benches
