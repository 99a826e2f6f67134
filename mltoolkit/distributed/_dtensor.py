"""mltoolkit's fused optimizers and clipping on DTensor parameters (FSDP2, tensor parallel).

Elementwise updates (AdamW) run the fused op on each rank's local shard. What needs a norm over a whole tensor (LAMB's
per-tensor trust ratio ||p|| / ||u||, the global gradient norm of clipping) sums the squared norms of the local
shards and all-reduces them over the mesh dimensions on which the tensor is sharded (Shard placements); replicated
dimensions and plain tensors (replicated across ranks: DDP, the unsharded parameters of a tensor-parallel model) are
counted once. These functions import nothing heavy: DTensors exist only once torch.distributed.tensor is imported.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["is_dtensor", "local_shards", "any_dtensor", "lamb_step_sharded", "clip_grad_norm_sharded"]


def _dtensor_cls() -> Optional[type]:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def any_dtensor(ts: Sequence[Any]) -> bool:
    cls = _dtensor_cls()
    return cls is not None and any(isinstance(t, cls) for t in ts)


def local_shards(ts: Sequence[Any]) -> list[Any]:
    """Each DTensor replaced by its local tensor (same storage: in-place updates reach the DTensor); others kept."""
    cls = _dtensor_cls()
    if cls is None:
        return list(ts)
    return [t._local_tensor if isinstance(t, cls) else t for t in ts]


def _shard_key(t: Any) -> tuple:
    """The process groups over which `t`'s local squared norm must be summed: one per mesh dimension on which it is
    sharded (empty for plain tensors and replicated DTensors)."""
    if not is_dtensor(t):
        return ()
    for pl in t.placements:
        if pl.is_partial():
            raise ValueError("a DTensor with a Partial placement (pending reduction) cannot be normed shard by shard; "
                             "redistribute it to Shard / Replicate first")
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, pl in enumerate(t.placements) if pl.is_shard())


def _reduce_by_key(values: Tensor, keys: list[tuple], op: Any) -> Tensor:
    """values[i] (float64, one per tensor) reduced with `op` over the groups of keys[i]; one collective per distinct
    group (a few per step, whatever the number of tensors)."""
    import torch.distributed as dist
    out = values.clone()
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        for g in key:
            groups.setdefault(g, []).append(i)
    for g, idx in groups.items():
        sel = torch.tensor(idx, device=out.device)
        part = out.index_select(0, sel).contiguous()
        if dist.get_backend(g) == "nccl" and part.device.type != "cuda":
            part = part.cuda()
        dist.all_reduce(part, op=op, group=g)
        out.index_copy_(0, sel, part.to(out.device))
    return out


def lamb_step_sharded(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                      bias_correction: bool, grad_averaging: bool, use_trust_ratio: bool,
                      max_trust_ratio: Optional[float]) -> None:
    """One LAMB step (csrc/fused_lamb.h's arithmetic) over DTensor parameters: the moments are updated by the fused
    op on the local shards (run with lr=0, so it leaves the parameters alone), then u, the squared norms of the local
    shards of p and u, one all-reduce of all of them per shard group, the trust ratios and the update."""
    import torch.distributed as dist

    from mltoolkit.ops.fused_lamb import fused_lamb_
    lp, lg, lm, lv = (local_shards(x) for x in (params, grads, exp_avgs, exp_avg_sqs))
    nonempty = [i for i, p in enumerate(lp) if p.numel() > 0]
    if nonempty:
        fused_lamb_([lp[i] for i in nonempty], [lg[i] for i in nonempty], [lm[i] for i in nonempty],
                    [lv[i] for i in nonempty], lr=0.0, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    step=step, bias_correction=bias_correction, grad_averaging=grad_averaging,
                    use_trust_ratio=False, max_trust_ratio=None)
    bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** step if bias_correction else 1.0
    updates = []
    for p, m, v in zip(lp, lm, lv):
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        if weight_decay != 0.0:
            u.add_(p, alpha=weight_decay)
        updates.append(u)
    if use_trust_ratio and lp:
        dev = lp[0].device
        sq = torch.stack([torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64).square().to(dev),
                                       torch.linalg.vector_norm(u, dtype=torch.float64).square().to(dev)])
                          for p, u in zip(lp, updates)])                       # (n, 2)
        keys = [_shard_key(p) for p in params]
        sq = _reduce_by_key(sq, keys, dist.ReduceOp.SUM)
        w, n = sq[:, 0].sqrt(), sq[:, 1].sqrt()
        trust = torch.where((w > 0) & (n > 0), w / n, torch.ones_like(w))
        if max_trust_ratio:
            trust = trust.clamp(max=max_trust_ratio)
        trusts = trust.tolist()
    else:
        trusts = [min(1.0, max_trust_ratio) if max_trust_ratio else 1.0] * len(lp)
    for p, u, t in zip(lp, updates, trusts):
        p.sub_(u * (t * lr))


def clip_grad_norm_sharded(parameters: list[Tensor], max_norm: float, norm_type: float = 2.0,
                           error_if_nonfinite: bool = False) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ for parameters some of which are DTensors: the norm over the full tensors
    (all-reduced squared norms of the local shards, or their max for norm_type inf), then every local gradient
    scaled in place by min(1, max_norm / (total + 1e-6)). Returns the total norm as a plain tensor, the same on every
    rank."""
    import torch.distributed as dist
    norm_type = float(norm_type)
    inf = math.isinf(norm_type)
    if norm_type != 2.0 and not (inf and norm_type > 0):
        raise ValueError(f"clip_grad_norm_: norm_type must be 2 or inf for sharded (DTensor) gradients, got "
                         f"{norm_type}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    keys = [_shard_key(g) for g in grads]
    local = local_shards(grads)
    dev = local[0].device
    vals = []
    for g in local:
        if g.numel() == 0:
            vals.append(torch.zeros((), dtype=torch.float64, device=dev))
        elif inf:
            vals.append(g.detach().abs().max().to(dev, torch.float64))
        else:
            vals.append(torch.linalg.vector_norm(g.detach(), dtype=torch.float64).square().to(dev))
    per = _reduce_by_key(torch.stack(vals), keys, dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
    total = per.max() if inf else per.sum().sqrt()
    total = total.to(grads[0].dtype)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} for gradients from `parameters` is "
                           "non-finite, so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = (max_norm / (total.double() + 1e-6)).clamp(max=1.0)
    for g in local:
        if g.numel():
            g.mul_(coef.to(g.device, g.dtype))
    return total
