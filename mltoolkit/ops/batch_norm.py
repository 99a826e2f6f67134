"""Batch norm + residual + activation: y = act(batch_norm(x) + residual), the training-mode half of conv + BN + act.

Two registered ops carry the family (one kernel pair per backend, contract in csrc/batch_norm.h):

    torch.ops.mltoolkit.batch_norm_act_fwd(input, weight?, bias?, running_mean(a!)?, running_var(b!)?, training,
                                           momentum, eps, activation, residual?) -> (y, mean, invstd)
    torch.ops.mltoolkit.batch_norm_act_bwd(dy, input, weight?, bias?, mean, invstd, residual?, training,
                                           activation, output_mask) -> (dinput, dweight, dbias, dresidual)

The forward updates the running stats in place in training mode; mean and invstd are the statistics it normalized
with (batch statistics in training, running ones in eval), float32 (float64 for float64 input). The backward
recomputes the pre-activation from the input, so autograd keeps only the input (and the residual), like torch's
batch_norm + relu keeps the input and the output. Gradients that were not asked for (output_mask = input, weight,
bias, residual) are empty tensors.

Why the forward op is defined with torch.library.define and not custom_op: custom_op's register_autograd refuses an
op that mutates its inputs ("create a functional operator"), and this one must update the running stats where they
are. So its kernels are registered by hand at the dispatch keys custom_op would use (CompositeExplicitAutograd, Meta
through register_fake, ADInplaceOrView to bump the running stats' versions, and Autograd), and torch.compile
functionalizes the mutation (auto_functionalized) as for any mutable custom op.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import batch_norm as reference
from mltoolkit.ops.reference.batch_norm import memory_format
from mltoolkit.ops.reference.conv import ACTIVATIONS

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

BATCH_NORM = table("batch_norm")


# ---- backends -------------------------------------------------------------------------------------------------

def _triton_kernels():
    from mltoolkit.triton_kernels import batch_norm as triton_batch_norm

    return triton_batch_norm


# No CUDA C++ kernel: Triton is the GPU path (not yet timed on a GPU).
BATCH_NORM.register("triton", _ext.triton_device, _ext.triton_unavailable,
                    forward=lambda *a: _triton_kernels().batch_norm_act_forward(*a),
                    backward=lambda *a: _triton_kernels().batch_norm_act_backward(*a))
BATCH_NORM.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
                    forward=lambda *a: _ext._C.batch_norm_act_forward_cpu(*a),
                    backward=lambda *a: _ext._C.batch_norm_act_backward_cpu(*a))
BATCH_NORM.register("reference", lambda *_: None, forward=reference.batch_norm_act_forward,
                    backward=reference.batch_norm_act_backward)


# ---- registered ops -------------------------------------------------------------------------------------------

_lib = torch.library.Library("mltoolkit", "FRAGMENT")
_lib.define("batch_norm_act_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
            "Tensor(b!)? running_var, bool training, float momentum, float eps, str activation, Tensor? residual) "
            "-> (Tensor, Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,))
_FWD = torch.ops.mltoolkit.batch_norm_act_fwd.default


def _layout(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


def _fwd_impl(input, weight, bias, running_mean, running_var, training, momentum, eps, activation, residual):
    fmt = memory_format(input)
    x = _layout(input, fmt)
    residual = None if residual is None else _layout(residual, fmt)
    y, mean, invstd = BATCH_NORM.select(x).kernels["forward"](x, weight, bias, running_mean, running_var, training,
                                                              momentum, eps, activation, residual)
    return y.contiguous(memory_format=fmt), mean, invstd


_lib.impl("batch_norm_act_fwd", _fwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("mltoolkit::batch_norm_act_fwd", lib=_lib)
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, activation, residual):
    torch._check(input.dim() >= 2, lambda: "batch_norm_act_fwd: input must be (N, C, *)")
    torch._check(activation in ACTIVATIONS, lambda: f"batch_norm_act_fwd: unknown activation {activation!r}")
    c = input.shape[1]
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if p is not None:
            torch._check(p.dim() == 1 and p.shape[0] == c, lambda name=name: f"batch_norm_act_fwd: {name} must be (C,)")
    torch._check(residual is None or residual.shape == input.shape,
                 lambda: "batch_norm_act_fwd: residual must have input's shape")
    stat = reference.stat_dtype(input.dtype)
    return (torch.empty_like(input, memory_format=memory_format(input)), input.new_empty(c, dtype=stat),
            input.new_empty(c, dtype=stat))


def _bump_versions(running_mean, running_var):
    # In-place updates must bump the version counters (as torch's native batch_norm does), so that autograd notices
    # a running stat that was saved for backward elsewhere and then changed.
    for stat in (running_mean, running_var):
        if stat is not None:
            torch.autograd.graph.increment_version(stat)


def _bump_running_stat_versions(keyset, *args):
    _bump_versions(args[3], args[4])
    return _FWD.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)


_lib.impl("batch_norm_act_fwd", _bump_running_stat_versions, "ADInplaceOrView", with_keyset=True)


def _bwd_impl(dy: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                       invstd: Tensor, residual: Optional[Tensor], training: bool, activation: str,
                       output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fmt = memory_format(input)
    x = _layout(input, fmt)
    dy = _layout(dy, fmt)  # .sum().backward() hands in an expanded, all-stride-0 gradient
    residual = None if residual is None else _layout(residual, fmt)
    dx, dw, db, dres = BATCH_NORM.select(x).kernels["backward"](dy, x, weight, bias, mean, invstd, residual, training,
                                                                activation, list(output_mask))
    return (x.new_empty(0) if dx is None else dx.contiguous(memory_format=fmt), x.new_empty(0) if dw is None else dw,
            x.new_empty(0) if db is None else db,
            x.new_empty(0) if dres is None else dres.contiguous(memory_format=fmt))


batch_norm_act_bwd = torch.library.custom_op("mltoolkit::batch_norm_act_bwd", mutates_args=())(_bwd_impl)


@batch_norm_act_bwd.register_fake
def _(dy, input, weight, bias, mean, invstd, residual, training, activation, output_mask):
    torch._check(dy.shape == input.shape, lambda: "batch_norm_act_bwd: dy must have input's shape")
    c = input.shape[1]
    like = lambda: torch.empty_like(input, memory_format=memory_format(input))
    param = lambda p: input.new_empty(c, dtype=p.dtype if p is not None else input.dtype)
    return (like() if output_mask[0] else input.new_empty(0), param(weight) if output_mask[1] else input.new_empty(0),
            param(bias) if output_mask[2] else input.new_empty(0), like() if output_mask[3] else input.new_empty(0))


def _save(ctx, input, weight, bias, mean, invstd, residual, training, activation):
    ctx.save_for_backward(input, weight, bias, mean, invstd, residual)
    ctx.training, ctx.activation = training, activation
    ctx.mark_non_differentiable(mean, invstd)
    ctx.set_materialize_grads(False)
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _grads(ctx, dy, bwd):
    """(dx, dw, db, dresidual) as asked for by ctx.needs_input_grad[-10:] (the op's ten inputs)."""
    _, needs_x, needs_w, needs_b, _, _, _, _, _, _, needs_r = (False, *ctx.needs_input_grad)[-11:]
    mask = [needs_x, needs_w, needs_b, needs_r]
    if dy is None or not any(mask):
        return None, None, None, None
    input, weight, bias, mean, invstd, residual = ctx.saved_tensors
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        dx, dw, db, dres = bwd(dy, input, weight, bias, mean, invstd, residual, ctx.training, ctx.activation, mask)
    return dx if needs_x else None, dw if needs_w else None, db if needs_b else None, dres if needs_r else None


class _BatchNormAct(torch.autograd.Function):
    """The Autograd kernel of batch_norm_act_fwd: the forward redispatches below autograd, the backward calls
    batch_norm_act_bwd (a registered op, so compiled graphs see it)."""

    @staticmethod
    def forward(ctx, keyset, input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                residual):
        with torch._C._AutoDispatchBelowAutograd():
            y, mean, invstd = _FWD.redispatch(keyset & torch._C._after_autograd_keyset, input, weight, bias,
                                              running_mean, running_var, training, momentum, eps, activation,
                                              residual)
        _save(ctx, input, weight, bias, mean, invstd, residual, training, activation)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        dx, dw, db, dres = _grads(ctx, dy, torch.ops.mltoolkit.batch_norm_act_bwd)
        return None, dx, dw, db, None, None, None, None, None, None, dres


class _EagerBatchNormAct(torch.autograd.Function):
    """batch_norm_act_fwd's forward and backward without the op dispatch (its host time is a GPU batch norm's at
    ResNet sizes), for plain eager calls only (see mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, activation, residual):
        y, mean, invstd = _eager_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                         activation, residual)
        _save(ctx, input, weight, bias, mean, invstd, residual, training, activation)
        return y, mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dinvstd):
        dx, dw, db, dres = _grads(ctx, dy, _bwd_impl)
        return dx, dw, db, None, None, None, None, None, None, dres


def _eager_forward(*args):
    # What the registered op's ADInplaceOrView kernel does: running stats updated in place bump their versions.
    _bump_versions(args[3], args[4])
    return _fwd_impl(*args)


def _autograd_kernel(keyset, input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                     residual):
    args = (input, weight, bias, running_mean, running_var, training, momentum, eps, activation, residual)
    if _ext.needs_grad(input, weight, bias, residual):
        return _BatchNormAct.apply(keyset, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return _FWD.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_lib.impl("batch_norm_act_fwd", _autograd_kernel, "Autograd", with_keyset=True)


# ---- public API -----------------------------------------------------------------------------------------------

def _check_channel_tensor(fn: str, name: str, t, input: Tensor, dtypes: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must be {' or '.join(str(d) for d in dtypes)} (input is {input.dtype}), got "
                        f"{t.dtype}")
    if tuple(t.shape) != (input.shape[1],):
        raise ValueError(f"{fn}: {name} must have shape (C,) = ({input.shape[1]},), got {list(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but input is on {input.device}")


def _finite_float(fn: str, name: str, v):
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(v).__name__}")
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) v may be a symbolic float.
    if not -math.inf < v < math.inf:
        raise ValueError(f"{fn}: {name} must be a finite float, got {v!r}")
    return v


def _param(p: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Kernels take parameters in the input's dtype or float32; others are cast (the output keeps the input's dtype).
    if p is None or p.dtype in (dtype, torch.float32):
        return p
    return p.to(dtype)


def batch_norm_act(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5, activation: str = "none",
                   residual: Optional[Tensor] = None) -> Tensor:
    """y = act(batch_norm(input) + residual): F.batch_norm's semantics for the normalization, then the residual add
    and the activation, in one pass over the data (two in training, where the batch statistics come first).

    input (N, C, *) (NCHW, channels_last and channels_last_3d inputs give outputs in the same format); weight,
    bias, running_mean, running_var (C,) or None. training: normalize with the batch mean and biased variance and,
    when the running stats are given, update them in place: running = (1 - momentum) * running + momentum * batch
    (the unbiased variance for running_var). Eval: normalize with the running stats (required then).
    residual: input's shape, or None. activation: none, relu, relu6, silu, gelu, gelu_tanh or hardswish.
    """
    fn = "batch_norm_act"
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"{fn}: input must be (N, C, *) with at least 2 dims, got shape {list(input.shape)}")
    floating = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_channel_tensor(fn, name, p, input, floating)
    # The running stats are updated where they are: they cannot be cast.
    for name, p in (("running_mean", running_mean), ("running_var", running_var)):
        if p is not None:
            _check_channel_tensor(fn, name, p, input, tuple(dict.fromkeys((input.dtype, torch.float32))))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must both be given or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var must be given in evaluation mode (training=False)")
    momentum, eps = _finite_float(fn, "momentum", momentum), _finite_float(fn, "eps", eps)
    if eps < 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{fn}: residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"{fn}: residual must have input's shape {list(input.shape)}, got "
                             f"{list(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"{fn}: residual must have input's dtype {input.dtype}, got {residual.dtype}")
        if residual.device != input.device:
            raise ValueError(f"{fn}: residual is on {residual.device} but input is on {input.device}")
    if training and math.prod([input.shape[0], *input.shape[2:]]) == 1:  # F.batch_norm's check and message
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    args = (input, _param(weight, input.dtype), _param(bias, input.dtype), running_mean, running_var, training,
            momentum, eps, activation, residual)
    return _ext.call_op(torch.ops.mltoolkit.batch_norm_act_fwd, _EagerBatchNormAct, _eager_forward, args,
                        (input, weight, bias, running_mean, running_var, residual),
                        grad_tensors=(input, weight, bias, residual))[0]
