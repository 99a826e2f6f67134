"""8-bit AdamW step: mltoolkit.optim.AdamW(state_bits=8) (one fused_adamw8bit_ call: dequantize, update,
requantize) against mltoolkit's 32-bit AdamW (fused_adamw_) and torch.optim.AdamW's for-loop and fused=True, on N
parameters in 200 tensors (10M / 100M); "torch eager" is torch.optim.AdamW's for-loop. The peak-memory column
holds each provider's optimizer state (created by the warm-up call): 8-bit state is 2 * (1 + 4/256) bytes a
parameter, 32-bit state 8 bytes (25.4%).

Mode "fwd" is one optimizer step; gradients are fixed, parameters and state change from step to step as in
training. Correctness is not checked here (a step mutates its inputs and 8-bit state is not torch's):
tests/ops/test_fused_adam8bit.py checks every backend against the reference and tests/test_optim_8bit.py the
training behaviour.
"""
import torch

from mltoolkit.backends import forced_backend
from mltoolkit.benchmark import Benchmark
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
    weights = [1 + (i % 5) for i in range(TENSORS)]  # uneven sizes, as a model's layers are, summing to n
    sizes = [n * w // sum(weights) for w in weights]
    sizes[0] += n - sum(sizes)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device) * 0.02) for s in sizes]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")


def _adamw8bit_step(params, grads):
    _optimizer(f"mltoolkit 8-bit[{forced_backend()}]", params, lambda ps: AdamW(ps, **HYPER, state_bits=8)).step()


def _adamw32_step(params, grads):
    _optimizer("mltoolkit 32-bit", params, lambda ps: AdamW(ps, **HYPER)).step()


def _torch(name, **kw):
    def step(params, grads):
        _optimizer(name, params, lambda ps: torch.optim.AdamW(ps, **HYPER, **kw)).step()
    return step


def _reference(params, grads):  # not called (check=False)
    AdamW(params, **HYPER, state_bits=8).step()


def _bytes(config, dtype, mode):
    # read p, g, 2 code bytes; write p, 2 code bytes (absmax: 8 bytes per 256 values, negligible)
    return config["params"] * (2 * torch.finfo(dtype).bits // 8 + torch.finfo(dtype).bits // 8 + 4)


def benchmarks(device: str, quick: bool):
    configs = [{"params": 10_000_000}] if quick else [{"params": 10_000_000}, {"params": 100_000_000}]
    dtypes = [torch.float32] if device == "cpu" or quick else [torch.float32, torch.bfloat16]
    # the "torch eager" row is torch.optim.AdamW's for-loop, as in bench_optim.py
    return [Benchmark("adamw8bit_step", "fused_adamw8bit", _adamw8bit_step, _torch("torch for-loop", foreach=False),
                      _reference, _inputs, configs, dtypes, bytes=_bytes, modes=("fwd",), check=False,
                      compile_baseline=False,
                      baselines=lambda dev: {"mltoolkit 32-bit": _adamw32_step,
                                             "torch fused": _torch("torch fused", fused=True)})]
