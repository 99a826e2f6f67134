"""8-bit AdamW and LAMB steps, on N parameters in 200 tensors (10M / 100M).

AdamW: mltoolkit.optim.AdamW(state_bits=8) (one fused_adamw8bit_ call: dequantize, update, requantize) against
mltoolkit's 32-bit AdamW (fused_adamw_) and torch.optim.AdamW's for-loop and fused=True; "torch eager" is
torch.optim.AdamW's for-loop. LAMB (row "lamb8bit_step"): mltoolkit.optim.LAMB(state_bits=8) (one fused_lamb8bit_
call) against mltoolkit's 32-bit fused LAMB and, as "torch eager", LAMB as a per-tensor loop of torch ops (the
32-bit op's reference backend, as in bench_lamb.py). The peak-memory column holds each provider's optimizer state
(created by the warm-up call): 8-bit state is 2 * (1 + 4/256) bytes a parameter, 32-bit state 8 bytes (25.4%).

Mode "fwd" is one optimizer step; gradients are fixed, parameters and state change from step to step as in
training. Correctness is not checked here (a step mutates its inputs and 8-bit state is not torch's):
tests/ops/test_fused_adam8bit.py / test_fused_lamb8bit.py check every backend against the reference and
tests/test_optim_8bit.py / test_optim_lamb8bit.py the training behaviour.
"""
import torch

from mltoolkit.backends import backend, forced_backend
from mltoolkit.benchmark import Benchmark
from mltoolkit.benchmark.optim import ADAMW_HYPER, optimizer_for, params_with_grads, torch_adamw_step
from mltoolkit.optim import LAMB, AdamW

HYPER = ADAMW_HYPER
LAMB_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)


def _inputs(config, dtype, device):
    return params_with_grads(config["params"], dtype, device)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")


def _adamw8bit_step(params, grads):
    optimizer_for(f"mltoolkit 8-bit[{forced_backend()}]", params, lambda ps: AdamW(ps, **HYPER, state_bits=8)).step()


def _adamw32_step(params, grads):
    optimizer_for("mltoolkit 32-bit", params, lambda ps: AdamW(ps, **HYPER)).step()


def _reference(params, grads):  # not called (check=False)
    AdamW(params, **HYPER, state_bits=8).step()


def _lamb8bit_step(params, grads):
    optimizer_for(f"mltoolkit 8-bit LAMB[{forced_backend()}]", params,
                  lambda ps: LAMB(ps, **LAMB_HYPER, state_bits=8)).step()


def _lamb32_step(params, grads):
    optimizer_for("mltoolkit 32-bit LAMB", params, lambda ps: LAMB(ps, **LAMB_HYPER)).step()


def _lamb_loop_step(params, grads):
    opt = optimizer_for("LAMB per-tensor loop", params, lambda ps: LAMB(ps, **LAMB_HYPER))
    with backend("reference"):
        opt.step()


def _lamb_reference(params, grads):  # not called (check=False)
    LAMB(params, **LAMB_HYPER, state_bits=8).step()


def _lamb_bytes(config, dtype, mode):
    # pass 1 reads p, g, 2 code bytes; pass 2 reads p, writes p, 2 code bytes (u is kept in a cache-sized scratch)
    return config["params"] * (3 * torch.finfo(dtype).bits // 8 + 4)


def _bytes(config, dtype, mode):
    # read p, g, 2 code bytes; write p, 2 code bytes (absmax: 8 bytes per 256 values, negligible)
    return config["params"] * (2 * torch.finfo(dtype).bits // 8 + torch.finfo(dtype).bits // 8 + 4)


def benchmarks(device: str, quick: bool):
    configs = [{"params": 10_000_000}] if quick else [{"params": 10_000_000}, {"params": 100_000_000}]
    dtypes = [torch.float32] if device == "cpu" or quick else [torch.float32, torch.bfloat16]
    # the "torch eager" row is torch.optim.AdamW's for-loop, as in bench_optim.py
    return [Benchmark("adamw8bit_step", "fused_adamw8bit", _adamw8bit_step,
                      torch_adamw_step("torch for-loop", foreach=False),
                      _reference, _inputs, configs, dtypes, bytes=_bytes, modes=("fwd",), check=False,
                      compile_baseline=False,
                      baselines=lambda dev: {"mltoolkit 32-bit": _adamw32_step,
                                             "torch fused": torch_adamw_step("torch fused", fused=True)}),
            Benchmark("lamb8bit_step", "fused_lamb8bit", _lamb8bit_step, _lamb_loop_step, _lamb_reference, _inputs,
                      configs, dtypes, bytes=_lamb_bytes, modes=("fwd",), check=False, compile_baseline=False,
                      baselines=lambda dev: {"mltoolkit 32-bit LAMB": _lamb32_step})]
