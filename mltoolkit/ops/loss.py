"""Softmax cross-entropy over class indices, fused: `F.cross_entropy`'s semantics without materializing the float32
log-softmax (the loss of a language model's 50k-wide logits costs a float32 copy, log_softmax and its backward in
eager torch: ~9 ms of a 47 ms GPT-2 small train step on an H100, measured 2026-11-27).

Two registered ops, one kernel per backend (C++ CPU, Triton, CUDA C++, reference; contract: csrc/cross_entropy.h):

    torch.ops.mltoolkit.cross_entropy_rows(logits, target, ignore_index, label_smoothing) -> (loss, lse)
    torch.ops.mltoolkit.cross_entropy_rows_backward(dloss, logits, target, lse, ignore_index, label_smoothing)
        -> dlogits

logits (N, C) with stride 1 along classes (rows may be a slice of wider rows); loss and lse per row in float32
(float64 for float64 logits). The reduction (mean over the rows not ignored, sum) is plain torch on the N losses.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import cross_entropy as reference

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")

CROSS_ENTROPY = table("cross_entropy")


def _triton_forward(*args):
    from mltoolkit.triton_kernels import cross_entropy as kernels

    return kernels.cross_entropy_forward(*args)


def _triton_backward(*args):
    from mltoolkit.triton_kernels import cross_entropy as kernels

    return kernels.cross_entropy_backward(*args)


# Triton first on the GPU: both GPU kernels are untested for speed (2026-11-27); Triton's is the one the CPU test run
# exercises through the interpreter.
CROSS_ENTROPY.register("triton", _ext.triton_device, _ext.triton_unavailable, forward=_triton_forward,
                       backward=_triton_backward)
CROSS_ENTROPY.register("cuda", _ext.on_cuda, _ext.cuda_unavailable,
                       forward=lambda *a: tuple(_ext._C.cross_entropy_forward_cuda(*a)),
                       backward=lambda *a: _ext._C.cross_entropy_backward_cuda(*a))
CROSS_ENTROPY.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
                       forward=lambda *a: tuple(_ext._C.cross_entropy_forward_cpu(*a)),
                       backward=lambda *a: _ext._C.cross_entropy_backward_cpu(*a))
CROSS_ENTROPY.register("reference", lambda *_: None, forward=reference.forward, backward=reference.backward)


def _check_rows(fn: str, logits: Tensor, target: Tensor, label_smoothing: float) -> None:
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{fn}: logits must be (N, C) with C >= 1, got shape {list(logits.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"{fn}: target must be int64 class indices, got {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"{fn}: target must have shape [{logits.shape[0]}], got {list(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{fn}: target is on {target.device} but logits are on {logits.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")


def _kernel_layout(logits: Tensor) -> Tensor:
    """logits as the kernels read them: stride 1 along classes, rows that do not overlap (else a copy)."""
    n, c = logits.shape
    if (c <= 1 or logits.stride(1) == 1) and (n <= 1 or logits.stride(0) >= c):
        return logits
    return logits.contiguous()


def _rows(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float) -> tuple[Tensor, Tensor]:
    logits = _kernel_layout(logits)
    return CROSS_ENTROPY.select(logits).kernels["forward"](logits, target.contiguous(), ignore_index,
                                                           label_smoothing)


def _rows_backward(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                   label_smoothing: float) -> Tensor:
    logits = _kernel_layout(logits)
    return CROSS_ENTROPY.select(logits).kernels["backward"](dloss.to(lse.dtype).contiguous(), logits,
                                                            target.contiguous(), lse, ignore_index, label_smoothing)


# ---- registered ops -------------------------------------------------------------------------------------------

@torch.library.custom_op("mltoolkit::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: Tensor, target: Tensor, ignore_index: int,
                       label_smoothing: float) -> tuple[Tensor, Tensor]:
    _check_rows("mltoolkit::cross_entropy_rows", logits, target, label_smoothing)
    return _rows(logits, target, ignore_index, label_smoothing)


@cross_entropy_rows.register_fake
def _(logits, target, ignore_index, label_smoothing):
    torch._check(logits.dim() == 2, lambda: "mltoolkit::cross_entropy_rows: logits must be 2-D")
    stat = reference.stat_dtype(logits.dtype)
    return logits.new_empty(logits.shape[:1], dtype=stat), logits.new_empty(logits.shape[:1], dtype=stat)


@torch.library.custom_op("mltoolkit::cross_entropy_rows_backward", mutates_args=())
def cross_entropy_rows_backward(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                                label_smoothing: float) -> Tensor:
    _check_rows("mltoolkit::cross_entropy_rows_backward", logits, target, label_smoothing)
    return _rows_backward(dloss, logits, target, lse, ignore_index, label_smoothing)


@cross_entropy_rows_backward.register_fake
def _(dloss, logits, target, lse, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape)  # (new_empty is contiguous)


def _save(ctx, logits, target, ignore_index, label_smoothing, lse):
    ctx.save_for_backward(logits, target, lse)
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _grad(ctx, dloss, dlse, backward_fn):
    logits, target, lse = ctx.saved_tensors
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        dlogits = backward_fn(dloss, logits, target, lse, ctx.ignore_index, ctx.label_smoothing)
    if dlse is not None:  # d lse / d logits = softmax (lse is an output of the registered op, so allow it)
        dlogits = dlogits + (dlse.to(lse.dtype)[:, None] * torch.exp(logits.to(lse.dtype) - lse[:, None])).to(
            dlogits.dtype)
    return dlogits, None, None, None


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output[1])
    # An unused lse (the usual case) then arrives as None, not as zeros that would cost a pass over the logits.
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, dlse):
    return _grad(ctx, dloss, dlse, torch.ops.mltoolkit.cross_entropy_rows_backward)


cross_entropy_rows.register_autograd(_backward, setup_context=_setup_context)


class _EagerRows(torch.autograd.Function):
    """The registered op's forward and backward without the custom-op dispatch, for plain eager calls only (see
    mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing):
        loss, lse = _rows(logits, target, ignore_index, label_smoothing)
        _save(ctx, logits, target, ignore_index, label_smoothing, lse)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, dloss, dlse):
        return _grad(ctx, dloss, None, _rows_backward)


def _rows_eager_or_op(logits, target, ignore_index, label_smoothing):
    """The registered op, or in plain eager mode its twin; the caller has checked the arguments."""
    return _ext.call_op(torch.ops.mltoolkit.cross_entropy_rows, _EagerRows, _rows,
                        (logits, target, ignore_index, label_smoothing), (logits, target), (logits,))


# ---- public API -----------------------------------------------------------------------------------------------

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _default_dtype(input: Tensor) -> torch.dtype:
    """torch's result dtype: the input's, but float32 under autocast, which runs cross_entropy in float32 (here the
    logits stay in their dtype: the math is float32 anyway)."""
    device = input.device.type
    # Not torch.amp.is_autocast_available: torch 2.11's Dynamo cannot trace it (a fullgraph compile of this loss
    # failed on the GPU machine, 2026-11-28); is_autocast_enabled raises on device types without autocast (meta).
    if input.dtype in (torch.float16, torch.bfloat16) and device in _AUTOCAST_DEVICES \
            and torch.is_autocast_enabled(device):
        return torch.float32
    return input.dtype


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """torch.nn.functional.cross_entropy for class-index targets, fused (see the module docstring).

    input: (N, C), (C,) or (N, C, d1, ...) logits (float32, float64, float16, bfloat16); target: int64 class
    indices of shape (N,), () or (N, d1, ...); ignore_index, reduction ("mean" over the targets not ignored, "sum",
    "none") and label_smoothing as torch's. The math is in float32 (float64 for float64 input) whatever the input
    dtype; the result is in out_dtype, by default the dtype torch returns (input's; float32 under autocast), and
    out_dtype=torch.float32 keeps a bf16 model's loss in float32 without a float32 copy of its logits. Logits of
    shape (N, C) are read in place when their classes are contiguous, so a slice of wider rows costs no copy. Class
    weights and class-probability targets are not supported and raise.
    """
    fn = "cross_entropy"
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a Tensor, got {type(target).__name__}")
    if weight is not None:
        raise NotImplementedError(f"{fn}: class weights (weight=) are not supported; use "
                                  "torch.nn.functional.cross_entropy")
    if target.is_floating_point():
        raise NotImplementedError(f"{fn}: class-probability targets (a floating target) are not supported; pass "
                                  "int64 class indices")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    label_smoothing = float(label_smoothing)
    if input.dim() == 0:
        raise ValueError(f"{fn}: input must have a class dimension, got a 0-D tensor")
    batch_shape = target.shape
    if input.dim() == 1:
        expected = torch.Size([])
        rows, tgt = input[None], target.reshape(1)
    else:
        expected = input.shape[:1] + input.shape[2:]
        rows = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, input.shape[1])
        tgt = target.reshape(-1)
    if target.shape != expected:
        raise ValueError(f"{fn}: target must have shape {list(expected)} for input of shape {list(input.shape)}, "
                         f"got {list(target.shape)}")
    if target.dtype != torch.int64:
        tgt = tgt.long()
    _check_rows(fn, rows, tgt, label_smoothing)
    loss, _ = _rows_eager_or_op(rows, tgt, ignore_index, label_smoothing)
    dtype = out_dtype or _default_dtype(input)
    if reduction == "none":
        return loss.reshape(batch_shape).to(dtype)
    if reduction == "sum":
        return loss.sum().to(dtype)
    return (loss.sum() / (tgt != ignore_index).sum()).to(dtype)
