"""Fused LAMB optimizer step and fused global-norm gradient clipping, as registered multi-tensor ops.

    torch.ops.mltoolkit.fused_lamb_(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                                    step, bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio) -> ()
        mutates params, exp_avgs, exp_avg_sqs
    torch.ops.mltoolkit.fused_clip_grad_norm_(grads, max_norm, norm_type, error_if_nonfinite) -> total_norm
        mutates grads

Exact semantics in csrc/fused_lamb.h: LAMB as in You et al. 2019 (arXiv:1904.00962 v3+, Algorithm 2) with apex
FusedLAMB's bias_correction and grad_averaging flags, trust ratio ||p|| / ||u|| per tensor (1 where either norm is
0), an optional clamp (max_trust_ratio > 0) and a switch to skip it (use_trust_ratio=False, for the tensors of a
param group with exclude_from_layer_adaptation). The clip computes what torch.nn.utils.clip_grad_norm_ computes for
norm_type 2 and inf. The LAMB optimizer (mltoolkit.optim.LAMB) and clip_grad_norm_ (mltoolkit.optim.clip) are the
user-facing layer.

Backends: "cuda" (csrc/cuda/fused_optim.cu; CUDA tensors, float32 or float64, one dtype, dense; ahead of
Triton), "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 when forced), "cpp" (CPU; float32 or
float64, one dtype, dense: contiguous or a permutation such as channels_last, grads and state in the params'
strides), "reference" (plain PyTorch, anything).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops.fused_adam import dense
from mltoolkit.ops.reference import fused_lamb as reference

LAMB = table("fused_lamb")
CLIP = table("fused_clip_grad_norm")

_CPP_DTYPES = (torch.float32, torch.float64)


def _triton_kernels():
    from mltoolkit.triton_kernels import fused_lamb as triton_lamb

    return triton_lamb


def _cpp_supports(*lists) -> Optional[str]:
    tensors = [t for ts in lists for t in ts]
    if not tensors:
        return None
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu":
            return f"needs CPU tensors, got {t.device.type}"
        if t.dtype not in _CPP_DTYPES:
            return f"needs float32 or float64 tensors, got {t.dtype}"
        if t.dtype != dtype:
            return f"needs one dtype, got {dtype} and {t.dtype}"
    return _layout_problem(lists)


def _layout_problem(lists) -> Optional[str]:
    """The C++ / CUDA kernels walk each tensor's memory in order: dense tensors (contiguous or a permutation, as
    channels_last weights), and the other lists (grads, state) in the first list's (params') strides."""
    first = lists[0]
    for i, p in enumerate(first):
        if not dense(p):
            return f"needs dense tensors (contiguous or a permutation), got strides {p.stride()} for {tuple(p.shape)}"
        if p.numel() > 1 and any(ts[i].stride() != p.stride() for ts in lists[1:]):
            return "needs grads and state in the parameters' strides"
    return None


def _triton_supports(*lists) -> Optional[str]:
    tensors = [t for ts in lists for t in ts]
    if not tensors:
        return "nothing to do"
    why = _ext.triton_device(tensors[0])
    if why is not None:
        return why
    if any(t.device != tensors[0].device or not t.is_contiguous() for t in tensors):
        return "needs contiguous tensors on one device"
    if any(t.dtype not in (torch.float32, torch.float64) or t.dtype != tensors[0].dtype for t in tensors):
        return "needs float32 or float64 tensors of one dtype"
    return None


def _cpp_lamb(*args):
    _ext._C.fused_lamb_cpu(*args)


def _cuda_supports(*lists) -> Optional[str]:
    """csrc/cuda/fused_optim.cu: dense float32 or float64 CUDA tensors of one dtype and device."""
    tensors = [t for ts in lists for t in ts]
    if not tensors:
        return "nothing to do"
    if not tensors[0].is_cuda:
        return f"needs CUDA tensors, got {tensors[0].device.type}"
    if any(t.device != tensors[0].device for t in tensors):
        return "needs tensors on one device"
    if any(t.dtype not in _CPP_DTYPES or t.dtype != tensors[0].dtype for t in tensors):
        return "needs float32 or float64 tensors of one dtype"
    return _layout_problem(lists)


def _cuda_unavailable() -> Optional[str]:
    if _ext.cuda_unavailable():
        return _ext.cuda_unavailable()
    return None if hasattr(_ext._C, "fused_lamb_cuda") else "mltoolkit._C predates fused_lamb_cuda; rebuild it"


# CUDA C++ ahead of Triton for CUDA tensors (the order is the default; to be settled by an H100 measurement).
LAMB.register("cuda", _cuda_supports, _cuda_unavailable, step=lambda *a: _ext._C.fused_lamb_cuda(*a))
LAMB.register("triton", _triton_supports, _ext.triton_unavailable,
              step=lambda *a: _triton_kernels().fused_lamb_step(*a))
LAMB.register("cpp", _cpp_supports, _ext.cpp_unavailable, step=_cpp_lamb)
LAMB.register("reference", lambda *_: None, step=reference.lamb_step)

CLIP.register("cuda", _cuda_supports, _cuda_unavailable, clip=lambda *a: _ext._C.fused_clip_grad_norm_cuda(*a))
CLIP.register("triton", _triton_supports, _ext.triton_unavailable,
              clip=lambda *a: _triton_kernels().fused_clip_grad_norm(*a))
CLIP.register("cpp", _cpp_supports, _ext.cpp_unavailable, clip=lambda *a: _ext._C.fused_clip_grad_norm_cpu(*a))
CLIP.register("reference", lambda *_: None, clip=reference.clip_grad_norm)


# ---- registered ops -------------------------------------------------------------------------------------------

def _check_lists(fn: str, params, grads, exp_avgs, exp_avg_sqs) -> None:
    n = len(params)
    torch._check(len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n,
                 lambda: f"{fn}: params, grads, exp_avgs and exp_avg_sqs must have the same length, got "
                         f"{n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}")
    for i, p in enumerate(params):
        for name, t in (("grads", grads[i]), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])):
            torch._check(t.shape == p.shape,
                         lambda name=name, t=t, i=i, p=p: f"{fn}: {name}[{i}] has shape {tuple(t.shape)} but "
                                                          f"params[{i}] has {tuple(p.shape)}")


@torch.library.custom_op("mltoolkit::fused_lamb_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def fused_lamb_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                  bias_correction: bool, grad_averaging: bool, use_trust_ratio: bool,
                  max_trust_ratio: float) -> None:
    _check_lists("fused_lamb_", params, grads, exp_avgs, exp_avg_sqs)
    if not params:
        return
    # Gradients are only read: one in other strides than its parameter (or expanded) is copied into the
    # parameter's layout; the state must be updated where it lives.
    grads = [g if g.dtype == p.dtype and (g.stride() == p.stride() or p.numel() <= 1) and dense(g)
             else torch.empty_like(p).copy_(g) for g, p in zip(grads, params)]
    LAMB.select(params, grads, exp_avgs, exp_avg_sqs).kernels["step"](
        params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step, bias_correction,
        grad_averaging, use_trust_ratio, max_trust_ratio)


@fused_lamb_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step, bias_correction,
      grad_averaging, use_trust_ratio, max_trust_ratio):
    _check_lists("fused_lamb_", params, grads, exp_avgs, exp_avg_sqs)
    return None


@torch.library.custom_op("mltoolkit::fused_clip_grad_norm_", mutates_args=("grads",))
def fused_clip_grad_norm_op(grads: list[Tensor], max_norm: float, norm_type: float,
                            error_if_nonfinite: bool) -> Tensor:
    torch._check(len(grads) > 0, lambda: "fused_clip_grad_norm_: grads must not be empty")
    return CLIP.select(grads).kernels["clip"](grads, max_norm, norm_type, error_if_nonfinite)


@fused_clip_grad_norm_op.register_fake
def _(grads, max_norm, norm_type, error_if_nonfinite):
    torch._check(len(grads) > 0, lambda: "fused_clip_grad_norm_: grads must not be empty")
    return grads[0].new_empty(())


# ---- public functions -----------------------------------------------------------------------------------------

def _tensor_list(fn: str, name: str, ts) -> list[Tensor]:
    if isinstance(ts, Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{fn}: {name} must be a list of tensors, got {type(ts).__name__}")
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name}[{i}] must be a tensor, got {type(t).__name__}")
    return list(ts)


def fused_lamb_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
                lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
                step: int, bias_correction: bool = True, grad_averaging: bool = True, use_trust_ratio: bool = True,
                max_trust_ratio: Optional[float] = None) -> None:
    """One LAMB step over lists of tensors, in place (params, exp_avgs, exp_avg_sqs); see csrc/fused_lamb.h.

    step is the 1-based step count after this update (used by the bias correction)."""
    fn = "fused_lamb_"
    lists = [_tensor_list(fn, name, ts) for name, ts in (("params", params), ("grads", grads),
                                                          ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs))]
    n = len(lists[0])
    for name, ts in zip(("grads", "exp_avgs", "exp_avg_sqs"), lists[1:]):
        if len(ts) != n:
            raise ValueError(f"{fn}: {name} has {len(ts)} tensors but params has {n}")
    for i in range(n):
        p = lists[0][i]
        if not p.is_floating_point():
            raise TypeError(f"{fn}: params[{i}] must be a floating-point tensor, got {p.dtype}")
        for name, ts in zip(("grads", "exp_avgs", "exp_avg_sqs"), lists[1:]):
            if ts[i].shape != p.shape:
                raise ValueError(f"{fn}: {name}[{i}] has shape {tuple(ts[i].shape)} but params[{i}] has "
                                 f"{tuple(p.shape)}")
            if ts[i].device != p.device:
                raise ValueError(f"{fn}: {name}[{i}] is on {ts[i].device} but params[{i}] is on {p.device}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"{fn}: beta1 must be in [0, 1), got {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"{fn}: beta2 must be in [0, 1), got {beta2}")
    if not eps >= 0.0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"{fn}: step must be an int >= 1, got {step!r}")
    if max_trust_ratio is not None and not max_trust_ratio > 0:
        raise ValueError(f"{fn}: max_trust_ratio must be > 0 or None, got {max_trust_ratio}")
    torch.ops.mltoolkit.fused_lamb_(*lists, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                                    step, bool(bias_correction), bool(grad_averaging), bool(use_trust_ratio),
                                    float(max_trust_ratio or 0.0))


def fused_clip_grad_norm_(grads: list[Tensor], max_norm: float, norm_type: float = 2.0,
                          error_if_nonfinite: bool = False) -> Tensor:
    """Scales every gradient in place by min(1, max_norm / (total_norm + 1e-6)) and returns total_norm, the L2
    (norm_type=2) or max (norm_type=inf) norm over all of them, like torch.nn.utils.clip_grad_norm_."""
    fn = "fused_clip_grad_norm_"
    grads = _tensor_list(fn, "grads", grads)
    norm_type = float(norm_type)
    if norm_type != 2.0 and not (math.isinf(norm_type) and norm_type > 0):
        raise ValueError(f"{fn}: norm_type must be 2 or inf, got {norm_type} (use torch.nn.utils.clip_grad_norm_)")
    if not grads:
        raise ValueError(f"{fn}: grads must not be empty")
    for i, g in enumerate(grads):
        if not g.is_floating_point():
            raise TypeError(f"{fn}: grads[{i}] must be a floating-point tensor, got {g.dtype}")
        if g.device != grads[0].device:
            raise ValueError(f"{fn}: grads[{i}] is on {g.device} but grads[0] is on {grads[0].device}")
    return torch.ops.mltoolkit.fused_clip_grad_norm_(grads, float(max_norm), norm_type, bool(error_if_nonfinite))
