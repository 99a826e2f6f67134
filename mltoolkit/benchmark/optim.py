"""Shared pieces of the optimizer-step benchmarks (benchmarks/ops/bench_optim*.py): parameters with gradients cut
into 200 tensors of uneven sizes, and one live optimizer per provider."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

TENSORS = 200
ADAMW_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
_OPTIMIZERS: dict = {}  # provider -> (id of its params list, optimizer)


def optimizer_for(name: str, params: Sequence[torch.Tensor],
                  make: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """The optimizer of provider `name` over `params`, built on first use: each provider keeps its own state (made by
    the harness's warm-up call, so peak memory includes it); a new config's params replace the previous state."""
    cached = _OPTIMIZERS.get(name)
    if cached is None or cached[0] != id(params):
        _OPTIMIZERS[name] = None  # free the previous config's state first
        _OPTIMIZERS[name] = (id(params), make(params))
    return _OPTIMIZERS[name][1]


def params_with_grads(n: int, dtype: torch.dtype, device: str) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """`n` parameters in TENSORS tensors of uneven sizes (as a model's layers are), each with a fixed gradient."""
    weights = [1 + (i % 5) for i in range(TENSORS)]
    sizes = [n * w // sum(weights) for w in weights]
    sizes[0] += n - sum(sizes)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device) * 0.02) for s in sizes]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads


def torch_adamw_step(name: str, **kw) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]:
    """A provider stepping torch.optim.AdamW(**ADAMW_HYPER, **kw) (foreach=False: the for-loop; fused=True)."""
    def step(params, grads):
        optimizer_for(name, params, lambda ps: torch.optim.AdamW(ps, **ADAMW_HYPER, **kw)).step()
    return step
