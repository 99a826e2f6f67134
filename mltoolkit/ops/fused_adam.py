"""Fused multi-tensor AdamW step: one call updates a whole list of parameters and their optimizer state.

    torch.ops.mltoolkit.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                     lr, beta1, beta2, weight_decay, eps, amsgrad, maximize) -> ()

Mutates params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (used only when amsgrad; else pass []) and state_steps
(each += 1 first), with torch.optim.AdamW(foreach=False)'s arithmetic; the contract is csrc/fused_adam.h. Backends:
C++ CPU (float32, dense tensors), CUDA C++ (csrc/cuda/fused_optim.cu: float32 / bf16 / fp16 with float32
math, dense tensors; ahead of Triton), Triton (CUDA; CPU only when forced under TRITON_INTERPRET=1; float32 / bf16 /
fp16 with float32 math), and the plain-PyTorch reference (anything else). mltoolkit.optim.AdamW is the user-facing
optimizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops.reference import fused_adam as reference

FUSED_ADAMW = table("fused_adamw")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dense(t: Tensor) -> bool:
    """Non-overlapping and dense: contiguous up to a permutation of dims (zeros_like keeps such strides)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    return t.permute(order).is_contiguous()


def _unsupported(cuda: bool):
    def supports(params, grads, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=None, *_) -> Optional[str]:
        """Asked of the C++ side (csrc/cpu/fused_adam.cpp): a Python loop over hundreds of tensors cost more than a
        10M-parameter step. (State lists may be left out: the benchmark asks before the optimizer state exists.)"""
        if params and params[0].is_cuda != cuda:  # before converting five lists (the C++ words it alike)
            return f"needs CUDA tensors, got params[0] on {params[0].device.type}" if cuda else \
                "needs CPU tensors, got params[0] elsewhere"
        why = _ext._C.fused_adamw_unsupported(list(params), list(grads), list(exp_avgs or ()),
                                              list(exp_avg_sqs or ()), list(max_exp_avg_sqs or ()), cuda)
        return why or None
    return supports


def _triton_supports(params, grads, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=None, *_) -> Optional[str]:
    why = _ext.triton_device(params[0]) if params else None
    if why is not None:
        return why
    for i, p in enumerate(params):
        if p.device != params[0].device:
            return f"params on several devices ({params[0].device}, {p.device})"
        if p.dtype not in TRITON_DTYPES:
            return f"float32 / float16 / bfloat16 only, got params[{i}] of {p.dtype}"
        if not p.is_contiguous():
            return f"params[{i}] is not contiguous"
        states = ([exp_avgs[i], exp_avg_sqs[i]] if exp_avgs is not None else [])
        states += [max_exp_avg_sqs[i]] if max_exp_avg_sqs else []
        g = grads[i]
        if g.layout != torch.strided or not g.is_contiguous() or g.shape != p.shape or g.dtype != p.dtype:
            return f"grads[{i}] is not a contiguous dense tensor of params[{i}]'s shape and dtype"
        if any(t.dtype != p.dtype or not t.is_contiguous() or t.shape != p.shape for t in states):
            return f"state of params[{i}] is not contiguous in its dtype"
    return None


def _triton_kernels():
    from mltoolkit.triton_kernels import fused_adam as triton_fused_adam

    return triton_fused_adam


def _cpp_unavailable() -> Optional[str]:
    if _ext.cpp_unavailable():
        return _ext.cpp_unavailable()
    return None if hasattr(_ext._C, "fused_adamw_unsupported") else \
        "mltoolkit._C predates fused_adamw_unsupported; rebuild it"


def _cuda_unavailable() -> Optional[str]:
    if _ext.cuda_unavailable():
        return _ext.cuda_unavailable()
    return None if hasattr(_ext._C, "fused_adamw_cuda") else "mltoolkit._C predates fused_adamw_cuda; rebuild it"


FUSED_ADAMW.register("cpp", _unsupported(cuda=False), _cpp_unavailable, step=lambda *a: _ext._C.fused_adamw_cpu(*a))
# CUDA C++ ahead of Triton for CUDA tensors: 2.8 / 3.4 ms against 4.2 / 10.5 ms a step for 10M / 100M float32
# parameters in 200 tensors on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3.md, 2026-11-27).
FUSED_ADAMW.register("cuda", _unsupported(cuda=True), _cuda_unavailable, step=lambda *a: _ext._C.fused_adamw_cuda(*a))
FUSED_ADAMW.register("triton", _triton_supports, _ext.triton_unavailable,
                     step=lambda *a: _triton_kernels().fused_adamw_step(*a))
FUSED_ADAMW.register("reference", lambda *_: None, step=reference.fused_adamw_)


def _check_lengths(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad) -> None:
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps)):
        if len(lst) != n:
            raise ValueError(f"fused_adamw_: {name} has {len(lst)} tensors, params has {n}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(f"fused_adamw_: amsgrad needs max_exp_avg_sqs of {n} tensors, got {len(max_exp_avg_sqs)}")
    if not amsgrad and len(max_exp_avg_sqs):
        raise ValueError("fused_adamw_: max_exp_avg_sqs must be empty without amsgrad")


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad) -> None:
    for i, p in enumerate(params):
        if grads[i].is_sparse or grads[i].layout != torch.strided:
            raise ValueError(f"fused_adamw_: grads[{i}] is sparse ({grads[i].layout}); AdamW needs dense "
                             "gradients (torch.optim.SparseAdam handles sparse ones)")
        for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)) + (
                (("max_exp_avg_sqs", max_exp_avg_sqs),) if amsgrad else ()):
            if lst[i].shape != p.shape:
                raise ValueError(f"fused_adamw_: {name}[{i}] has shape {tuple(lst[i].shape)}, params[{i}] has "
                                 f"{tuple(p.shape)}")
            if lst[i].device != p.device:
                raise ValueError(f"fused_adamw_: {name}[{i}] is on {lst[i].device}, params[{i}] on {p.device}")
        if state_steps[i].numel() != 1 or not state_steps[i].is_floating_point():
            raise ValueError(f"fused_adamw_: state_steps[{i}] must be a one-element float tensor")


@torch.library.custom_op("mltoolkit::fused_adamw_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
def fused_adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], lr: float, beta1: float, beta2: float,
                 weight_decay: float, eps: float, amsgrad: bool, maximize: bool) -> None:
    """One AdamW step over lists of tensors, in place (see the module docstring and csrc/fused_adam.h)."""
    _run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
         amsgrad, maximize)


def _run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
         amsgrad, maximize, trust_cpp_checks=False) -> None:
    """trust_cpp_checks: leave the per-tensor checks to the C++ kernels when one runs (they check every tensor and
    name it, in C++: the Python loop cost ~0.3 ms a step for 200 tensors); the optimizers' eager steps do."""
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    _check_lengths(*args, amsgrad)
    if not params:
        return
    chosen = FUSED_ADAMW.select(*args)
    if not (trust_cpp_checks and chosen.name in ("cpp", "cuda")):
        _check_tensors(*args, amsgrad)
    chosen.kernels["step"](*args, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize)


def fused_adamw_eager_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], lr: float, beta1: float,
                       beta2: float, weight_decay: float, eps: float, amsgrad: bool, maximize: bool) -> None:
    """torch.ops.mltoolkit.fused_adamw_ with the same checks, backend and kernels, minus the Python dispatch of a
    custom op (its autograd wrapper flattens every argument list: ~2 ms a step for 200 tensors, a third of a
    10M-parameter step). For optimizers stepping in eager mode; under torch.compile the registered op runs."""
    if torch.compiler.is_compiling():
        torch.ops.mltoolkit.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                                         beta1, beta2, weight_decay, eps, amsgrad, maximize)
        return
    _run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
         amsgrad, maximize, trust_cpp_checks=True)
    # what the custom op does for its mutated arguments: autograd sees the in-place change
    torch.autograd.graph.increment_version(params + exp_avgs + exp_avg_sqs + max_exp_avg_sqs + state_steps)


@fused_adamw_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
      amsgrad, maximize):
    torch._check(len(grads) == len(params) and len(exp_avgs) == len(params) and len(exp_avg_sqs) == len(params)
                 and len(state_steps) == len(params),
                 lambda: "fused_adamw_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have one length")
    return None


def fused_adamw(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *, lr: float = 1e-3,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                amsgrad: bool = False, max_exp_avg_sqs: Sequence[Tensor] = (), maximize: bool = False) -> None:
    """Functional AdamW step (torch.optim.AdamW's hyperparameters and defaults), in place, through the registered
    op. Tensors: params[i], grads[i], exp_avgs[i], exp_avg_sqs[i] of one shape; state_steps[i] a 0-dim float."""
    if isinstance(lr, Tensor):
        lr = lr.item()
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"fused_adamw: {name} must be a non-negative number, got {value!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"fused_adamw: betas must be two numbers in [0, 1), got {betas!r}")
    torch.ops.mltoolkit.fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                     list(max_exp_avg_sqs), list(state_steps), float(lr), float(betas[0]),
                                     float(betas[1]), float(weight_decay), float(eps), bool(amsgrad), bool(maximize))
