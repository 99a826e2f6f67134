"""AdamW whose step is one fused multi-tensor kernel call (torch.ops.mltoolkit.fused_adamw_) per group of
parameters sharing a device, dtype and layout, instead of a loop of elementwise ops per parameter.

Same hyperparameters, defaults, param-group keys and state (step: a 0-dim float32 CPU tensor, exp_avg, exp_avg_sq,
max_exp_avg_sq with amsgrad) as torch.optim.AdamW, so the two load each other's state_dicts; on float32 CPU
parameters the updates equal torch.optim.AdamW(foreach=False)'s bit for bit (see tests/test_optim_adamw.py).
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor

from mltoolkit.backends import NoBackendError
from mltoolkit.ops import fused_adam8bit as _adam8bit  # registers torch.ops.mltoolkit.fused_adamw8bit_

# registers torch.ops.mltoolkit.fused_adamw_
from mltoolkit.ops.fused_adam import FUSED_ADAMW, dense, fused_adamw_eager_

__all__ = ["AdamW"]


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"AdamW: lr as a Tensor must have one element, got shape {tuple(lr.shape)}")
    elif not isinstance(lr, (int, float)) or not 0.0 <= lr:
        raise ValueError(f"AdamW: invalid lr {lr!r}: must be a non-negative number or a one-element tensor")
    if not isinstance(eps, (int, float)) or not 0.0 <= eps:
        raise ValueError(f"AdamW: invalid eps {eps!r}: must be a non-negative number")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
    for k, b in enumerate(betas):
        if isinstance(b, Tensor) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"AdamW: invalid beta at index {k}: {b!r} (a float in [0, 1))")
    if not isinstance(weight_decay, (int, float)) or not 0.0 <= weight_decay:
        raise ValueError(f"AdamW: invalid weight_decay {weight_decay!r}: must be a non-negative number")


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's arithmetic, one fused kernel per step.

    Args: params (iterable of tensors or param-group dicts), lr (float or one-element tensor, default 1e-3),
    betas (default (0.9, 0.999)), eps (default 1e-8), weight_decay (decoupled, default 1e-2), amsgrad (default
    False), maximize (default False), state_bits (32, or 8: block-wise quantized 8-bit moments, about a quarter of
    the state memory; tensors smaller than min_8bit_size (default 4096) keep float32 moments; no amsgrad; see
    mltoolkit/ops/fused_adam8bit.py. An 8-bit state_dict loads into an 8-bit AdamW; a 32-bit AdamW refuses it
    with a clear error at its first step: convert it with mltoolkit.ops.fused_adam8bit.state_to_32bit for a 32-bit
    AdamW or torch.optim.AdamW; 32-bit state loaded into an 8-bit AdamW is quantized on its first step).
    No foreach / fused / capturable / differentiable switches: the step is always the fused op. Parameters without
    a gradient are skipped; sparse gradients are refused.
    """

    def __init__(self, params: Iterable[Union[Tensor, dict[str, Any]]], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, state_bits: int = 32, min_8bit_size: int = 4096):
        _check_hyper(lr, betas, eps, weight_decay)
        if state_bits not in (8, 32) or isinstance(state_bits, bool):
            raise ValueError(f"AdamW: state_bits must be 32 or 8, got {state_bits!r}")
        if state_bits == 8 and amsgrad:
            raise ValueError("AdamW: amsgrad is not supported with state_bits=8")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"AdamW: min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        eight_bit = dict(state_bits=8, min_8bit_size=min_8bit_size) if state_bits == 8 else {}
        # torch.optim.AdamW's group keys, so that each optimizer loads the other's state_dict unchanged.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=None, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=True, **eight_bit)
        super().__init__(params, defaults)
        # 8-bit state must not go through load_state_dict's cast to the parameter's dtype
        self.register_load_state_dict_pre_hook(_adam8bit.load_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(_adam8bit.load_state_dict_post_hook)
        self._plans: dict[int, _Plan] = {}  # per group (by id): see _Plan; not part of the state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", True)

    def _state_of(self, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[p]
        if "exp_avg_codes" in state:
            raise RuntimeError("mltoolkit.optim.AdamW: this parameter has 8-bit state (a state_dict of "
                               "AdamW(state_bits=8)); build this optimizer with state_bits=8 or convert the "
                               "state_dict with mltoolkit.ops.fused_adam8bit.state_to_32bit")
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = state["step"]
        if not (step.is_cpu and step.dtype == torch.float32 and step.dim() == 0):
            # a state_dict from a fused / capturable torch run keeps step on the parameter's device
            state["step"] = step.detach().reshape(()).to("cpu", torch.float32)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.numel() > 1:
            # State in other strides than the parameter (a checkpoint made before optimize() put the weights in
            # channels_last): rewritten once in the parameter's layout, or every step would take the slow reference.
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = state.get(key)
                if t is not None and t.shape == p.shape and t.stride() != p.stride() and dense(p):
                    state[key] = torch.empty_like(p, dtype=t.dtype).copy_(t)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One AdamW step over every parameter that has a gradient; returns closure()'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from mltoolkit.distributed._dtensor import _dtensor_cls
        dtensor = _dtensor_cls()  # None unless torch.distributed.tensor was imported
        plans = None if torch.compiler.is_compiling() else self._plans
        for group in self.param_groups:
            amsgrad = bool(group["amsgrad"])
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            if isinstance(lr, Tensor):
                lr = lr.item()
            hyper = (float(lr), float(beta1), float(beta2), float(group["weight_decay"]), float(group["eps"]),
                     amsgrad, bool(group["maximize"]))
            if plans is None:
                self._step_group(group, hyper, dtensor)
                continue
            plan = plans.pop(id(group), None)
            if plan is not None and plan.step(self.state, group, hyper):
                plans[id(group)] = plan
                continue
            self._step_group(group, hyper, dtensor)
            if len(plans) >= len(self.param_groups):  # drop the plans of groups that are gone
                live = set(map(id, self.param_groups))
                for key in [k for k in plans if k not in live]:
                    del plans[key]
            plan = _Plan.build(self.state, group, amsgrad, dtensor)
            if plan is not None:
                plans[id(group)] = plan
        return loss

    def _step_group(self, group: dict[str, Any], hyper: tuple, dtensor) -> None:
        """The general step of one group: every parameter looked at (about 1.7 us each in Python)."""
        amsgrad = hyper[5]
        maybe_8bit = group.get("state_bits", 32) == 8
        buckets: dict[tuple, list[list[Tensor]]] = {}
        eight_bit: list[Tensor] = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise RuntimeError(f"mltoolkit.optim.AdamW does not support sparse gradients (got a {grad.layout}"
                                   " gradient); use torch.optim.SparseAdam for those parameters")
            if maybe_8bit and _adam8bit.uses_8bit_state(p, group):
                eight_bit.append(p)
                continue
            state = self._state_of(p, amsgrad)
            tensors = [p, grad, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] if amsgrad else None]
            if dtensor is not None:  # DTensor (FSDP2 / TP): elementwise, runs on the local shard
                tensors = [t._local_tensor if isinstance(t, dtensor) else t for t in tensors]
            if p.is_complex():
                tensors = [None if t is None else torch.view_as_real(t) for t in tensors]
            pr, g = tensors[0], tensors[1]
            is_dense = dense(pr)
            if is_dense and g.stride() != pr.stride() and pr.numel() > 1:
                tensors[1] = torch.empty_like(pr).copy_(g)  # the kernels walk one memory order
            lists = buckets.get((pr.device, pr.dtype, is_dense))
            if lists is None:
                lists = buckets[(pr.device, pr.dtype, is_dense)] = [[] for _ in range(6)]
            lists[0].append(pr)
            lists[1].append(tensors[1])
            lists[2].append(tensors[2])
            lists[3].append(tensors[3])
            if amsgrad:
                lists[4].append(tensors[4])
            lists[5].append(state["step"])
        for params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps in buckets.values():
            fused_adamw_eager_(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *hyper)
        if eight_bit:
            _adam8bit.adamw8bit_step(self.state, group, eight_bit, hyper[0])


def _picker(idx: list[int], n: int) -> Callable[[list], list]:
    """xs -> [xs[i] for i in idx] at C speed (all of xs when idx is all of range(n))."""
    if len(idx) == n:
        return lambda xs: xs
    get = operator.itemgetter(*idx)
    return (lambda xs: [get(xs)]) if len(idx) == 1 else (lambda xs: list(get(xs)))


class _Plan:
    """A group's step with the per-parameter work done once. After a general step in which every parameter that had
    a gradient went to the C++ / CUDA kernel as it is (real, dense, 32-bit state, the gradient in the parameter's
    strides), the lists of parameters and state tensors are kept, and later steps only gather the gradients. Each
    step first checks, at C speed, that nothing the lists were made from changed: the group's parameters, which of
    them have a gradient, the optimizer's state dicts and the tensors in them (load_state_dict, a cleared or
    replaced state all fall back to the general step, which makes a new plan). The kernel's own checks cover the
    gradients, and a gradient it would refuse (sparse, other strides) falls back too, before anything is written.
    A 10M-parameter step in 200 tensors on an H100 was bound by the general step's host work (~1 ms against ~0.1 ms
    of kernel); the kept lists cut it ~3x on the CPU side."""

    __slots__ = ("params", "active", "state_obj", "state_values", "dicts", "keys", "tensors", "buckets")

    @classmethod
    def build(cls, state: dict, group: dict[str, Any], amsgrad: bool, dtensor) -> Optional[_Plan]:
        params = group["params"]
        if not params or group.get("state_bits", 32) == 8:
            return None
        if dtensor is not None and any(isinstance(p, dtensor) for p in params):
            return None
        grads = [p.grad for p in params]
        buckets: dict[tuple, list[int]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            if (p.is_complex() or "exp_avg_codes" in state[p] or not dense(p) or g.layout != torch.strided
                    or (g.stride() != p.stride() and p.numel() > 1)):
                return None
            buckets.setdefault((p.device, p.dtype), []).append(i)
        if not buckets:
            return None
        plan = cls()
        plan.params = list(params)
        plan.active = [g is not None for g in grads]
        plan.state_obj = state
        plan.state_values = list(state.values())
        plan.dicts = [state.get(p, _NO_STATE) for p in params]  # .get: the defaultdict must not grow
        plan.keys = ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if amsgrad else ())
        plan.tensors = [[d.get(k) for d in plan.dicts] for k in plan.keys]
        plan.buckets = []
        for idx in buckets.values():
            pick = _picker(idx, len(params))
            lists = [pick(plan.params)] + [pick(t) for t in plan.tensors]  # params, exp_avg, exp_avg_sq, step, max
            chosen = FUSED_ADAMW.select(lists[0], pick(grads), lists[1], lists[2], lists[4] if amsgrad else [])
            if chosen.name not in ("cpp", "cuda"):
                return None
            mutated = [t for ts in lists[:3] + lists[4:] + lists[3:4] for t in ts]  # params, state, then steps
            plan.buckets.append((pick, lists, mutated, chosen.name))
        return plan

    def step(self, state: dict, group: dict[str, Any], hyper: tuple) -> bool:
        """One step through the kept lists; False (nothing written) when the plan no longer holds."""
        params, now = self.params, group["params"]
        if (state is not self.state_obj or len(state) != len(self.state_values) or len(now) != len(params)
                or len(self.keys) != 3 + hyper[5] or group.get("state_bits", 32) == 8
                or not all(map(operator.is_, now, params))
                or not all(map(operator.is_, self.state_values, state.values()))):
            return False
        for key, kept in zip(self.keys, self.tensors):
            if not all(map(operator.is_, kept, map(operator.methodcaller("get", key), self.dicts))):
                return False
        grads = [p.grad for p in params]
        if list(map(operator.is_not, grads, itertools.repeat(None))) != self.active:
            return False
        work = []
        for pick, lists, mutated, backend in self.buckets:
            bucket_grads = pick(grads)
            try:
                chosen = FUSED_ADAMW.select(lists[0], bucket_grads, lists[1], lists[2], lists[4] if hyper[5] else [])
            except NoBackendError:
                return False
            if chosen.name != backend:
                return False  # e.g. a gradient in other strides: the general step copies it
            work.append((lists, bucket_grads, mutated, chosen.kernels["step"]))
        for lists, bucket_grads, mutated, kernel in work:
            kernel(lists[0], bucket_grads, lists[1], lists[2], lists[4] if hyper[5] else [], lists[3], *hyper)
            torch.autograd.graph.increment_version(mutated)  # as the registered op does for what it mutates
        return True


_NO_STATE: dict = {}
