"""Fused multi-tensor 8-bit LAMB step: LAMB (csrc/fused_lamb.h's update, per-tensor trust ratio) whose moments are
kept as the 8-bit AdamW keeps them (mltoolkit/ops/fused_adam8bit.py: uint8 codes of the dynamic maps, one float32
absmax per block of 256 values), 2 * (1 + 4/256) bytes of state per parameter instead of 8.

    torch.ops.mltoolkit.fused_lamb8bit_(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                        exp_avg_sq_absmax, qmap_signed, qmap_unsigned, lr, beta1, beta2, eps,
                                        weight_decay, step, bias_correction, grad_averaging, use_trust_ratio,
                                        max_trust_ratio) -> ()

One call: per tensor, dequantize m and v, update them, compute the LAMB direction u, reduce ||p|| and ||u|| (pass 1),
then p -= lr * trust * u and requantize m, v (pass 2); exact semantics in csrc/fused_lamb8bit.h. Backends: C++ CPU
(csrc/cpu/fused_lamb8bit.cpp; float32, contiguous; codes and absmax equal to the reference's), Triton
(triton_kernels/fused_lamb8bit.py; CUDA tensors, CPU only when forced under TRITON_INTERPRET=1; float32 / bf16 /
fp16 params, float32 math), and the plain-PyTorch reference (anything else). There is no CUDA C++ kernel yet: CUDA
tensors go to Triton (or the reference where Triton is missing).

mltoolkit.optim.LAMB(..., state_bits=8) is the user-facing optimizer. The state entries are AdamW's
(STATE_KEYS), so the conversions of mltoolkit.ops.fused_adam8bit (new_state, quantize_state, dequantize_state,
state_to_32bit: an 8-bit LAMB state_dict -> 32-bit exp_avg / exp_avg_sq) serve LAMB too and are re-exported here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops.fused_adam8bit import (
    STATE_KEYS,
    check_8bit_lists,
    dequantize_state,
    maps,
    new_state,
    quantize_state,
    state_to_32bit,
    uses_8bit_state,
)
from mltoolkit.ops.reference import fused_lamb8bit as reference
from mltoolkit.ops.reference.fused_adam8bit import num_blocks

__all__ = ["fused_lamb8bit_", "STATE_KEYS", "new_state", "quantize_state", "dequantize_state", "state_to_32bit",
           "uses_8bit_state", "state8_of", "maps"]

FUSED_LAMB8BIT = table("fused_lamb8bit")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FN = "fused_lamb8bit_"


def _state_ok(p, i, lists) -> Optional[str]:
    nb = num_blocks(p.numel())
    for name, lst, dtype, n in (("exp_avg_codes", lists[0], torch.uint8, p.numel()),
                                ("exp_avg_absmax", lists[1], torch.float32, nb),
                                ("exp_avg_sq_codes", lists[2], torch.uint8, p.numel()),
                                ("exp_avg_sq_absmax", lists[3], torch.float32, nb)):
        t = lst[i]
        if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != p.device:
            return f"{name}[{i}] is not a contiguous {dtype} tensor of {n} elements on {p.device}"
    return None


def _cpp_supports(params, grads, *state) -> Optional[str]:
    for i, p in enumerate(params):
        if p.device.type != "cpu":
            return f"needs CPU tensors, got params[{i}] on {p.device.type}"
        if p.dtype != torch.float32 or grads[i].dtype != torch.float32:
            return f"float32 only, got params[{i}] / grads[{i}] of {p.dtype} / {grads[i].dtype}"
        if not p.is_contiguous() or not grads[i].is_contiguous():
            return f"params[{i}] or grads[{i}] is not contiguous"
        if state and _state_ok(p, i, state):
            return _state_ok(p, i, state)
    return None


def _triton_supports(params, grads, *state) -> Optional[str]:
    why = _ext.triton_device(params[0]) if params else "nothing to do"
    if why is not None:
        return why
    for i, p in enumerate(params):
        if p.device != params[0].device:
            return f"params on several devices ({params[0].device}, {p.device})"
        if p.dtype not in TRITON_DTYPES or grads[i].dtype != p.dtype:
            return f"float32 / float16 / bfloat16 params with grads of their dtype only, got params[{i}] of {p.dtype}"
        if not p.is_contiguous() or not grads[i].is_contiguous():
            return f"params[{i}] or grads[{i}] is not contiguous"
        if state and _state_ok(p, i, state):
            return _state_ok(p, i, state)
    return None


def _cpp_unavailable() -> Optional[str]:
    if _ext.cpp_unavailable():
        return _ext.cpp_unavailable()
    return None if hasattr(_ext._C, "fused_lamb8bit_cpu") else "mltoolkit._C predates fused_lamb8bit_cpu; rebuild it"


def _triton_kernels():
    from mltoolkit.triton_kernels import fused_lamb8bit as triton_fused_lamb8bit

    return triton_fused_lamb8bit


FUSED_LAMB8BIT.register("cpp", _cpp_supports, _cpp_unavailable, step=lambda *a: _ext._C.fused_lamb8bit_cpu(*a))
# no CUDA C++ kernel yet: CUDA tensors take Triton
FUSED_LAMB8BIT.register("triton", _triton_supports, _ext.triton_unavailable,
                        step=lambda *a: _triton_kernels().fused_lamb8bit_step(*a))
FUSED_LAMB8BIT.register("reference", lambda *_: None, step=reference.fused_lamb8bit_)


def _check_args(params, grads, mc, ma, vc, va, qs, qu, step) -> None:
    if step < 1:
        raise ValueError(f"{_FN}: step must be >= 1, got {step}")
    check_8bit_lists(_FN, params, grads, mc, ma, vc, va, qs, qu)


@torch.library.custom_op("mltoolkit::fused_lamb8bit_",
                         mutates_args=("params", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                       "exp_avg_sq_absmax"))
def fused_lamb8bit_op(params: list[Tensor], grads: list[Tensor], exp_avg_codes: list[Tensor],
                      exp_avg_absmax: list[Tensor], exp_avg_sq_codes: list[Tensor], exp_avg_sq_absmax: list[Tensor],
                      qmap_signed: Tensor, qmap_unsigned: Tensor, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, step: int, bias_correction: bool, grad_averaging: bool,
                      use_trust_ratio: bool, max_trust_ratio: float) -> None:
    """One 8-bit LAMB step over lists of tensors, in place (see the module docstring and csrc/fused_lamb8bit.h)."""
    state = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    _check_args(params, grads, *state, qmap_signed, qmap_unsigned, step)
    if not params:
        return
    # gradients are only read: a strided, expanded or other-dtype one is copied
    grads = [g if g.is_contiguous() and g.dtype == p.dtype else g.to(p.dtype).contiguous()
             for g, p in zip(grads, params)]
    FUSED_LAMB8BIT.select(params, grads, *state).kernels["step"](
        params, grads, *state, qmap_signed, qmap_unsigned, lr, beta1, beta2, eps, weight_decay, step,
        bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio)


@fused_lamb8bit_op.register_fake
def _(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, qmap_signed, qmap_unsigned,
      lr, beta1, beta2, eps, weight_decay, step, bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio):
    n = len(params)
    torch._check(all(len(x) == n for x in (grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                           exp_avg_sq_absmax)),
                 lambda: f"{_FN}: all tensor lists must have params' length")
    return None


# ---- the optimizer side (mltoolkit.optim.LAMB(state_bits=8)) ----

def state8_of(state: dict, p: Tensor) -> dict:
    """The 8-bit state of p: made on the first step, or converted once from 32-bit exp_avg / exp_avg_sq (a state_dict
    of a 32-bit LAMB loaded into LAMB(state_bits=8)); step stays a float32 CPU scalar (LAMB increments it)."""
    if "exp_avg" in state:
        state.update(quantize_state(state.pop("exp_avg"), state.pop("exp_avg_sq")))
    if "exp_avg_codes" not in state:
        state.update(new_state(p))
        state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
    for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        if state[k].dtype != torch.float32:
            raise RuntimeError(f"LAMB(state_bits=8): state {k} must be float32, got {state[k].dtype}")
    return state


def fused_lamb8bit_(params: list[Tensor], grads: list[Tensor], exp_avg_codes: list[Tensor],
                    exp_avg_absmax: list[Tensor], exp_avg_sq_codes: list[Tensor], exp_avg_sq_absmax: list[Tensor], *,
                    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
                    step: int, bias_correction: bool = True, grad_averaging: bool = True,
                    use_trust_ratio: bool = True, max_trust_ratio: Optional[float] = None) -> None:
    """One 8-bit LAMB step over lists of tensors, in place (params and the four state lists; make the state with
    new_state(p) / quantize_state(exp_avg, exp_avg_sq)); step is the 1-based step count after this update."""
    lists = (params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    for name, ts in zip(("params", "grads", *STATE_KEYS), lists):
        if isinstance(ts, Tensor) or not isinstance(ts, (list, tuple)):
            raise TypeError(f"{_FN}: {name} must be a list of tensors, got {type(ts).__name__}")
        for i, t in enumerate(ts):
            if not isinstance(t, Tensor):
                raise TypeError(f"{_FN}: {name}[{i}] must be a tensor, got {type(t).__name__}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"{_FN}: beta1 must be in [0, 1), got {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"{_FN}: beta2 must be in [0, 1), got {beta2}")
    if not eps >= 0.0:
        raise ValueError(f"{_FN}: eps must be >= 0, got {eps}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"{_FN}: step must be an int >= 1, got {step!r}")
    if max_trust_ratio is not None and not max_trust_ratio > 0:
        raise ValueError(f"{_FN}: max_trust_ratio must be > 0 or None, got {max_trust_ratio}")
    qs, qu = maps(params[0].device) if params else maps(torch.device("cpu"))
    torch.ops.mltoolkit.fused_lamb8bit_(*[list(x) for x in lists], qs, qu, float(lr), float(beta1), float(beta2),
                                        float(eps), float(weight_decay), step, bool(bias_correction),
                                        bool(grad_averaging), bool(use_trust_ratio), float(max_trust_ratio or 0.0))
