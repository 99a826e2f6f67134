"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv:1904.00962 v3+, Algorithm 2) on the fused multi-tensor op torch.ops.mltoolkit.fused_lamb_.

Per parameter tensor p with gradient g, at step t (1-based):
    m = beta1*m + (1-beta1)*g          (grad_averaging=False: m = beta1*m + g, as apex FusedLAMB)
    v = beta2*v + (1-beta2)*g^2
    u = m_hat / (sqrt(v_hat) + eps) + weight_decay*p,   m_hat = m/(1-beta1^t), v_hat = v/(1-beta2^t)
                                                         (bias_correction=False: m_hat = m, v_hat = v)
    trust = ||p|| / ||u||   (1 where either is 0; 1 for groups with exclude_from_layer_adaptation;
                             clamped to max_trust_ratio when given)
    p = p - lr * trust * u
This is the paper's update with phi = identity and apex FusedLAMB's options, except: no global gradient clipping
inside the step (apex clips to max_grad_norm=1.0 by default; call mltoolkit.optim.clip.clip_grad_norm_ before
step() for that), and the trust ratio is used for every group unless exclude_from_layer_adaptation is set (apex,
with use_nvlamb=False, skips it for groups whose weight_decay is 0: to get that, give the bias/norm group
weight_decay=0 and exclude_from_layer_adaptation=True).

state_bits=8 keeps m and v block-wise quantized to 8 bits (the 8-bit AdamW's format: uint8 codes of the dynamic
maps, one float32 absmax per 256 values, about a quarter of the 32-bit state's memory) for tensors of at least
min_8bit_size elements; smaller ones (biases, norms) keep float32 moments. The step is then
torch.ops.mltoolkit.fused_lamb8bit_ (mltoolkit/ops/fused_lamb8bit.py, contract csrc/fused_lamb8bit.h): the moments
are dequantized, updated in float32, used for u and the trust ratio as above, and requantized.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch.optim import Optimizer

from mltoolkit.ops import fused_adam8bit as _adam8bit  # the 8-bit state's load_state_dict hooks
from mltoolkit.ops import fused_lamb8bit as _lamb8bit
from mltoolkit.ops.fused_lamb import fused_lamb_


class LAMB(Optimizer):
    """LAMB with the step fused across all parameters of a group (one op per group, device and dtype).

    Args: params (iterable of tensors or param-group dicts), lr, betas, eps, weight_decay; keyword-only
    bias_correction (default True), grad_averaging (default True), exclude_from_layer_adaptation (default False,
    per group: trust ratio fixed to 1), max_trust_ratio (default None: no clamp), state_bits (32, or 8: block-wise
    quantized 8-bit moments for tensors of at least min_8bit_size (default 4096) elements, about a quarter of the
    state memory). State per parameter: step (float32 scalar tensor, as torch.optim.Adam keeps it), exp_avg,
    exp_avg_sq; with 8-bit state exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax instead of the
    moments (mltoolkit.optim.AdamW(state_bits=8)'s entries). As with AdamW: an 8-bit state_dict loads into an 8-bit
    LAMB; a 32-bit LAMB refuses it with a clear error at its first step (convert it with
    mltoolkit.ops.fused_lamb8bit.state_to_32bit); 32-bit state loaded into an 8-bit LAMB is quantized on its first
    step. 8-bit state is not supported for DTensor (FSDP2 / tensor-parallel) parameters.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, bias_correction: bool = True, grad_averaging: bool = True,
                 exclude_from_layer_adaptation: bool = False, max_trust_ratio: Optional[float] = None,
                 state_bits: int = 32, min_8bit_size: int = 4096):
        if isinstance(lr, torch.Tensor):
            raise TypeError("LAMB: lr must be a float, got a tensor")
        if not 0.0 <= lr:
            raise ValueError(f"LAMB: lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"LAMB: eps must be >= 0, got {eps}")
        if len(betas) != 2 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: betas must be two numbers in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"LAMB: weight_decay must be >= 0, got {weight_decay}")
        if max_trust_ratio is not None and not max_trust_ratio > 0:
            raise ValueError(f"LAMB: max_trust_ratio must be > 0 or None, got {max_trust_ratio}")
        if state_bits not in (8, 32) or isinstance(state_bits, bool):
            raise ValueError(f"LAMB: state_bits must be 32 or 8, got {state_bits!r}")
        if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
            raise ValueError(f"LAMB: min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        eight_bit = dict(state_bits=8, min_8bit_size=min_8bit_size) if state_bits == 8 else {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, grad_averaging=grad_averaging,
                        exclude_from_layer_adaptation=exclude_from_layer_adaptation, max_trust_ratio=max_trust_ratio,
                        **eight_bit)
        super().__init__(params, defaults)
        # 8-bit state must not go through load_state_dict's cast to the parameter's dtype (uint8 codes would become
        # floats); the groups keep this optimizer's state_bits / min_8bit_size, as AdamW's do
        self.register_load_state_dict_pre_hook(_adam8bit.load_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(_adam8bit.load_state_dict_post_hook)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from mltoolkit.distributed._dtensor import is_dtensor, lamb_step_sharded
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # One fused call per (device, dtype, step count): tensors of a group normally share all three.
            buckets: dict[tuple, tuple[list, list, list, list]] = defaultdict(lambda: ([], [], [], []))
            buckets8: dict[tuple, tuple[list, ...]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                eight = _lamb8bit.uses_8bit_state(p, group)
                if eight:
                    if is_dtensor(p):
                        raise RuntimeError("LAMB(state_bits=8) does not support DTensor (FSDP2 / tensor-parallel) "
                                           "parameters; use state_bits=32")
                    _lamb8bit.state8_of(state, p)
                elif "exp_avg_codes" in state:
                    raise RuntimeError("mltoolkit.optim.LAMB: this parameter has 8-bit state (a state_dict of "
                                       "LAMB(state_bits=8)) but this optimizer keeps 32-bit state for it (state_bits="
                                       "32, or fewer than min_8bit_size elements); build this optimizer with the "
                                       "same state_bits / min_8bit_size or convert the state_dict with "
                                       "mltoolkit.ops.fused_lamb8bit.state_to_32bit")
                elif len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                key = (p.device, p.dtype, int(state["step"].item()), is_dtensor(p), eight)
                if eight:
                    lists = buckets8.setdefault(key, tuple([] for _ in range(6)))
                    for lst, t in zip(lists, (p, p.grad, *(state[k] for k in _lamb8bit.STATE_KEYS))):
                        lst.append(t)
                    continue
                lists = buckets[key]
                lists[0].append(p)
                lists[1].append(p.grad)
                lists[2].append(state["exp_avg"])
                lists[3].append(state["exp_avg_sq"])
            for (_device, _dtype, step, _, _), lists in buckets8.items():
                _lamb8bit.fused_lamb8bit_(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                          weight_decay=group["weight_decay"], step=step,
                                          bias_correction=group["bias_correction"],
                                          grad_averaging=group["grad_averaging"],
                                          use_trust_ratio=not group["exclude_from_layer_adaptation"],
                                          max_trust_ratio=group["max_trust_ratio"])
            for (_device, _dtype, step, sharded, _), (ps, gs, ms, vs) in buckets.items():
                # DTensor parameters (FSDP2 / TP): trust-ratio norms over the whole tensor, across ranks
                step_fn = lamb_step_sharded if sharded else fused_lamb_
                step_fn(ps, gs, ms, vs, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], step=step,
                        bias_correction=group["bias_correction"], grad_averaging=group["grad_averaging"],
                        use_trust_ratio=not group["exclude_from_layer_adaptation"],
                        max_trust_ratio=group["max_trust_ratio"])
        return loss
