"""Rotary embedding (apply_rotary_emb) against the usual torch formula (rotate_half), eager and compiled."""
import torch

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark
from mltoolkit.ops.reference import attention as ref


def _inputs(config, dtype, device):
    b, seqlen, h, d, r = config["B"], config["L"], config["H"], config["D"], config["R"]
    x = torch.randn(b, seqlen, h, d, dtype=dtype, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float32, device=device) / r))
    angles = torch.arange(seqlen, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    # Tables in x's dtype, as models usually cache them.
    return x, angles.cos().to(dtype), angles.sin().to(dtype)


def _bytes(config, dtype, mode):
    e = torch.finfo(dtype).bits // 8
    tensor = config["B"] * config["L"] * config["H"] * config["D"] * e
    tables = config["L"] * config["R"] * e  # cos and sin, R/2 columns each
    # forward: read x, write y; backward: read dy, write dx; each reads the tables once.
    one = 2 * tensor + tables
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _eager(x, cos, sin):
    """The formula of HF transformers / GPT-NeoX: x * cos + rotate_half(x) * sin, on the first R dims."""
    r = 2 * cos.shape[-1]
    c = torch.cat((cos, cos), dim=-1)[:, None, :]
    s = torch.cat((sin, sin), dim=-1)[:, None, :]
    xr = x[..., :r]
    y = xr * c + _rotate_half(xr) * s
    return torch.cat((y, x[..., r:]), dim=-1) if r < x.shape[-1] else y


def _eager_interleaved(x, cos, sin):
    """GPT-J's layout: pairs (x[2i], x[2i+1]) rotated by cos/sin repeated twice."""
    r = 2 * cos.shape[-1]
    c = cos.repeat_interleave(2, dim=-1)[:, None, :]
    s = sin.repeat_interleave(2, dim=-1)[:, None, :]
    xr = x[..., :r]
    rotated = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    y = xr * c + rotated * s
    return torch.cat((y, x[..., r:]), dim=-1) if r < x.shape[-1] else y


def benchmarks(device: str, quick: bool):
    if device == "cuda":
        llama = {"B": 4, "L": 4096, "H": 32, "D": 128, "R": 128}
        configs = [llama] if quick else [llama, {"B": 16, "L": 2048, "H": 8, "D": 64, "R": 64}]
        gptj = [{"B": 4, "L": 2048, "H": 16, "D": 256, "R": 64}]
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    else:
        small = {"B": 2, "L": 1024, "H": 16, "D": 128, "R": 128}
        configs = [small] if quick else [small, {"B": 1, "L": 2048, "H": 8, "D": 256, "R": 64}]
        gptj = [{"B": 1, "L": 2048, "H": 8, "D": 256, "R": 64}]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    full = not quick
    benches = [
        Benchmark("rotary", "rotary", lambda x, c, s: ops.apply_rotary_emb(x, c, s), _eager,
                  lambda x, c, s: ref.rotary(x, c, s), _inputs, configs, dtypes, grad_args=(0,), bytes=_bytes,
                  include_reference_backend=full),
    ]
    if full:
        benches.append(Benchmark("rotary_interleaved", "rotary",
                                 lambda x, c, s: ops.apply_rotary_emb(x, c, s, interleaved=True), _eager_interleaved,
                                 lambda x, c, s: ref.rotary(x, c, s, interleaved=True), _inputs, gptj, dtypes,
                                 grad_args=(0,), bytes=_bytes, include_reference_backend=full))
    return benches
