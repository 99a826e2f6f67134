"""Fused LAMB step (torch.ops.mltoolkit.fused_lamb_) against the per-tensor loop in torch ops (the reference
backend, mltoolkit/ops/reference/fused_lamb.py: one tensor at a time, ~10 torch ops each), and the fused
global-norm clip against torch.nn.utils.clip_grad_norm_ (foreach=True). Parameters are cut into `tensors` tensors
of equal size (`params` elements in all). The step mutates its inputs, so the correctness gate is off here
(tests/test_optim_lamb.py checks the results); repeated steps keep the values in range (max_norm is large for the
clip, so it scales by 1 every time, as torch still multiplies)."""
import torch

from mltoolkit.benchmark import Benchmark
from mltoolkit.ops import fused_lamb as ops
from mltoolkit.ops.reference import fused_lamb as ref

STEP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, step=10)


def _lamb_inputs(config, dtype, device):
    n, k = config["params"], config["tensors"]
    size = n // k
    ps = [torch.randn(size, dtype=dtype, device=device) for _ in range(k)]
    gs = [torch.randn(size, dtype=dtype, device=device) * 0.01 for _ in range(k)]
    ms = [torch.randn(size, dtype=dtype, device=device) * 0.001 for _ in range(k)]
    vs = [torch.rand(size, dtype=dtype, device=device) * 1e-4 for _ in range(k)]
    return ps, gs, ms, vs


def _fused_lamb(ps, gs, ms, vs):
    ops.fused_lamb_(ps, gs, ms, vs, **STEP)


def _loop_lamb(ps, gs, ms, vs):
    s = STEP
    ref.lamb_step(ps, gs, ms, vs, s["lr"], s["beta1"], s["beta2"], s["eps"], s["weight_decay"], s["step"],
                  True, True, True, 0.0)


def _clip_inputs(config, dtype, device):
    n, k = config["params"], config["tensors"]
    ps = [torch.nn.Parameter(torch.randn(n // k, dtype=dtype, device=device)) for _ in range(k)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return (ps,)


def _fused_clip(ps):
    from mltoolkit.optim.clip import clip_grad_norm_

    return clip_grad_norm_(ps, 1e9)


def _torch_clip(ps):
    return torch.nn.utils.clip_grad_norm_(ps, 1e9, foreach=True)


def _lamb_bytes(config, dtype, mode):
    # pass 1 reads p, g, m, v and writes m, v; pass 2 reads p, m, v and writes p
    return 10 * config["params"] * torch.finfo(dtype).bits // 8


def _clip_bytes(config, dtype, mode):
    return 3 * config["params"] * torch.finfo(dtype).bits // 8  # read for the norm, read + write to scale


def benchmarks(device: str, quick: bool):
    if device != "cpu":
        configs = [{"params": 100_000_000, "tensors": 200}]
    else:
        configs = [{"params": 10_000_000, "tensors": 200}] if quick else [{"params": 10_000_000, "tensors": 200},
                                                                           {"params": 100_000_000, "tensors": 200}]
    common = dict(configs=configs, dtypes=[torch.float32], modes=("fwd",), check=False, compile_baseline=False)
    return [
        Benchmark("fused_lamb", "fused_lamb", _fused_lamb, _loop_lamb, _loop_lamb, _lamb_inputs,
                  bytes=_lamb_bytes, **common),
        Benchmark("fused_clip_grad_norm", "fused_clip_grad_norm", _fused_clip, _torch_clip, _torch_clip,
                  _clip_inputs, bytes=_clip_bytes, **common),
    ]
