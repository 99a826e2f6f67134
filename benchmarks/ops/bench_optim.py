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
from mltoolkit.benchmark.optim import ADAMW_HYPER, optimizer_for, params_with_grads, torch_adamw_step
from mltoolkit.ops.reference.fused_adam import fused_adamw_ as reference_step
from mltoolkit.optim import AdamW

HYPER = ADAMW_HYPER


def _inputs(config, dtype, device):
    return params_with_grads(config["params"], dtype, device)


def _mltoolkit_step(params, grads):
    optimizer_for(f"mltoolkit[{forced_backend()}]", params, lambda ps: AdamW(ps, **HYPER)).step()


def _reference(params, grads):  # not called (check=False); the oracle the tests use
    state = [torch.zeros_like(p) for p in params]
    reference_step(params, grads, state, [torch.zeros_like(p) for p in params], [], [torch.tensor(0.0)] * len(params),
                   HYPER["lr"], *HYPER["betas"], HYPER["weight_decay"], HYPER["eps"], False, False)


def _bytes(config, dtype, mode):
    # read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq
    return 7 * config["params"] * torch.finfo(dtype).bits // 8


def benchmarks(device: str, quick: bool):
    # 100M parameters take 0.13 s a step on 2 CPU cores, a millisecond on a GPU: there quick runs both sizes
    both = [{"params": 10_000_000}, {"params": 100_000_000}]
    configs = both[:1] if quick and device == "cpu" else both
    dtypes = [torch.float32] if device == "cpu" or quick else [torch.float32, torch.bfloat16]
    return [Benchmark("adamw_step", "fused_adamw", _mltoolkit_step, torch_adamw_step("torch for-loop", foreach=False),
                      _reference, _inputs, configs, dtypes, bytes=_bytes, modes=("fwd",), check=False,
                      compile_baseline=False,
                      baselines=lambda dev: {"torch foreach": torch_adamw_step("torch foreach", foreach=True),
                                             "torch fused": torch_adamw_step("torch fused", fused=True)})]
