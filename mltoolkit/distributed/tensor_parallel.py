"""TensorParallelStrategy ("tp"): Megatron-style tensor parallelism for transformer blocks on DTensor.

Within a block, the q/k/v projections and the MLP's up projection (fc1) are column-parallel (each rank holds a slice
of their output features: a subset of the attention heads, a slice of the hidden MLP units); the attention output
projection and the MLP's down projection (fc2) are row-parallel (each rank holds the matching slice of the input
features, and the partial outputs are summed with one all-reduce). So a block costs two all-reduces in forward and
two in backward, and attention runs on num_heads / world_size local heads: the strategy divides the attention
module's head count (``num_heads`` / ``n_heads`` / ``num_attention_heads`` / ``num_kv_heads`` ...) by the
tensor-parallel size. Everything else (embeddings, norms, the head) stays replicated. Every rank sees the same data.

    strategy = TensorParallelStrategy()                  # DEFAULT_PLAN: attn.{q,k,v}_proj, attn.out_proj, mlp.fc1/fc2
    strategy = TensorParallelStrategy(plan={"*.self_attn.q_proj": "colwise", ..., "*.mlp.down": "rowwise"})

A plan maps module-name patterns (fnmatch; a pattern without a wildcard also matches as a dotted suffix, so
"attn.q_proj" matches "layers.3.attn.q_proj") to "colwise", "rowwise" or a torch ParallelStyle. TransformerBlock and
TinyTransformer below are the reference model the default plan fits.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mltoolkit.distributed._env import DistributedBase
from mltoolkit.distributed.fsdp import ShardedCheckpointMixin
from mltoolkit.distributed.sampler import shard_loader
from mltoolkit.distributed.strategy import OptimizerLike, Strategy, rebuild_optimizer

__all__ = ["TensorParallelStrategy", "DEFAULT_PLAN", "HEAD_ATTRS", "TransformerBlock", "TinyTransformer",
           "resolve_plan"]

DEFAULT_PLAN: dict[str, str] = {
    "attn.q_proj": "colwise", "attn.k_proj": "colwise", "attn.v_proj": "colwise", "attn.out_proj": "rowwise",
    "mlp.fc1": "colwise", "mlp.fc2": "rowwise",
}
HEAD_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads", "num_kv_heads", "num_key_value_heads",
              "n_kv_heads")


# --------------------------------------------------------------------------------------------------------------------
# Reference model
# --------------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal multi-head self-attention. The view to heads uses self.num_heads, which the strategy sets to the local
    head count."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x)); module names fit DEFAULT_PLAN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token embedding + learned positions + `depth` TransformerBlocks (in an nn.ModuleList: FSDP's default units)
    + a final norm and a linear head; forward(tokens (B, T)) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int = 64, dim: int = 32, num_heads: int = 4, depth: int = 2, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.layers = nn.ModuleList(TransformerBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return not any(c in pattern for c in "*?[") and (name == pattern or name.endswith("." + pattern))


def _style(kind: Any, pattern: str) -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
    if isinstance(kind, ParallelStyle):
        return kind
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    raise ValueError(f"tensor-parallel plan: {pattern!r} maps to {kind!r}; use 'colwise', 'rowwise' or a "
                     "torch.distributed.tensor.parallel ParallelStyle")


def resolve_plan(model: nn.Module, plan: dict[str, Any], tp_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """(module name -> ParallelStyle, attention module name -> local head count). Checks, before anything is changed:
    every pattern names at least one module; matched modules are nn.Linear / nn.Embedding whose split dimension
    divides by tp_size; the head counts of the attention modules (parents of column-parallel modules) divide by
    tp_size."""
    if not isinstance(plan, dict) or not plan:
        raise TypeError(f"tensor-parallel plan must be a non-empty dict pattern -> 'colwise' / 'rowwise', got {plan!r}")
    modules = dict(model.named_modules())
    resolved: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    for pattern, kind in plan.items():
        style = _style(kind, pattern)
        hits = [n for n in modules if n and _matches(n, pattern)]
        if not hits:
            sample = [n for n in modules if n][:12]
            raise ValueError(f"tensor-parallel plan: pattern {pattern!r} matches no module of "
                             f"{type(model).__name__}; its modules include {sample}")
        for n in hits:
            resolved[n] = style
            kinds[n] = kind if isinstance(kind, str) else type(kind).__name__
    for n, kind in kinds.items():
        m = modules[n]
        if not isinstance(m, (nn.Linear, nn.Embedding)) and kind in ("colwise", "rowwise"):
            raise ValueError(f"tensor-parallel plan: {n!r} is a {type(m).__name__}; colwise / rowwise apply to "
                             "nn.Linear and nn.Embedding")
        if isinstance(m, nn.Linear):
            size, what = (m.out_features, "out_features") if kind == "colwise" else (m.in_features, "in_features")
        elif isinstance(m, nn.Embedding):
            size, what = (m.embedding_dim, "embedding_dim") if kind == "colwise" else (m.num_embeddings,
                                                                                      "num_embeddings")
        else:
            continue
        if kind in ("colwise", "rowwise") and size % tp_size:
            raise ValueError(f"tensor-parallel plan: {n!r} ({kind}) has {what}={size}, not divisible by the "
                             f"tensor-parallel size {tp_size}")
    heads: dict[str, int] = {}
    for n, kind in kinds.items():
        if kind != "colwise" or "." not in n:
            continue
        parent_name = n.rsplit(".", 1)[0]
        parent = modules[parent_name]
        for attr in HEAD_ATTRS:
            h = getattr(parent, attr, None)
            if isinstance(h, int) and not isinstance(h, bool):
                if h % tp_size:
                    raise ValueError(f"tensor parallel: {parent_name!r}.{attr} = {h} attention heads is not "
                                     f"divisible by the tensor-parallel size {tp_size}")
                heads[f"{parent_name}.{attr}"] = h // tp_size
    return resolved, heads


class TensorParallelStrategy(ShardedCheckpointMixin, DistributedBase, Strategy):
    """Tensor parallelism over all ranks (a 1-D mesh of world_size); data replicated: every rank reads the same batch
    (global batch = batch_size). Args: plan (default DEFAULT_PLAN), backend, device."""

    name = "tp"

    def __init__(self, device: Union[str, torch.device, None] = None, *, plan: Optional[dict[str, Any]] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(device)
        self.plan = dict(DEFAULT_PLAN if plan is None else plan)
        self.backend = backend
        self.mesh = None
        self.local_heads: dict[str, int] = {}

    def prepare(self, model: nn.Module, optimizer: OptimizerLike) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        self._require()
        tp = dist.get_world_size()
        resolved, heads = resolve_plan(model, self.plan, tp)   # raises before the model is touched
        names = {id(p): n for n, p in model.named_parameters()}
        model = model.to(self.device)
        if self.mesh is None:
            self.mesh = init_device_mesh(self.device.type, (tp,))
        parallelize_module(model, self.mesh, resolved)
        for key, h in heads.items():
            mod_name, attr = key.rsplit(".", 1)
            setattr(model.get_submodule(mod_name), attr, h)
        self.local_heads = heads
        return model, rebuild_optimizer(optimizer, names, model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def prepare_loader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        """The same batches on every rank: a shuffling loader gets a seeded sampler (the order does not depend on
        each rank's RNG)."""
        return shard_loader(loader, 0, 1)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()   # no data-parallel gradient reduction to skip
