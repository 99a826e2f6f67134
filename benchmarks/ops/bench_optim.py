"""Optimizer step: mltoolkit.optim.AdamW (one fused multi-tensor kernel call) against torch.optim.AdamW's for-loop
(torch eager), foreach=True and fused=True, on N parameters in 200 tensors of a few sizes.

Mode "fwd" is one optimizer step (no autograd involved); the gradients are fixed, the parameters and state change
from step to step as in training. Each provider keeps its own optimizer state (created by the warm-up call, so peak
memory includes it). Correctness is not checked here (a step mutates its inputs): tests/test_optim_adamw.py checks
every backend against torch.optim.AdamW over 100 steps.
"""
import torch

from mltoolkit.backends import forced_backend
from mltoolkit.benchmark import Benchmark
from mltoolkit.ops.reference.fused_adam import fused_adamw_ as reference_step
from mltoolkit.optim import AdamW

TENSORS = 200
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
_OPTIMIZERS: dict = {}  # provider -> (id of its params list, optimizer): one live state per provider


def _optimizer(name, params, make):
    cached = _OPTIMIZERS.get(name)
    if cached is None or cached[0] != id(params):
        _OPTIMIZERS[name] = None  # free the previous config's state first
        _OPTIMIZERS[name] = (id(params), make(params))
    return _OPTIMIZERS[name][1]


def _inputs(config, dtype, device):
    n = config["params"]
    # 200 tensors of uneven sizes (as a model's layers are) summing to n
    weights = [1 + (i % 5) for i in range(TENSORS)]
    sizes = [n * w // sum(weights) for w in weights]
    sizes[0] += n - sum(sizes)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device) * 0.02) for s in sizes]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads


def _mltoolkit_step(params, grads):
    _optimizer(f"mltoolkit[{forced_backend()}]", params, lambda ps: AdamW(ps, **HYPER)).step()


def _torch(name, **kw):
    def step(params, grads):
        _optimizer(name, params, lambda ps: torch.optim.AdamW(ps, **HYPER, **kw)).step()
    return step


def _reference(params, grads):  # not called (check=False); the oracle the tests use
    state = [torch.zeros_like(p) for p in params]
    reference_step(params, grads, state, [torch.zeros_like(p) for p in params], [], [torch.tensor(0.0)] * len(params),
                   HYPER["lr"], *HYPER["betas"], HYPER["weight_decay"], HYPER["eps"], False, False)


def _bytes(config, dtype, mode):
    # read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq
    return 7 * config["params"] * torch.finfo(dtype).bits // 8


def benchmarks(device: str, quick: bool):
    configs = [{"params": 10_000_000}] if quick else [{"params": 10_000_000}, {"params": 100_000_000}]
    dtypes = [torch.float32] if device == "cpu" or quick else [torch.float32, torch.bfloat16]
    return [Benchmark("adamw_step", "fused_adamw", _mltoolkit_step, _torch("torch for-loop", foreach=False),
                      _reference, _inputs, configs, dtypes, bytes=_bytes, modes=("fwd",), check=False,
                      compile_baseline=False,
                      baselines=lambda dev: {"torch foreach": _torch("torch foreach", foreach=True),
                                             "torch fused": _torch("torch fused", fused=True)})]
