"""2-D (and 1-D) convolution with torch's semantics.

Two registered ops carry the family (one kernel pair per backend, contract in csrc/conv.h):

    torch.ops.mltoolkit.conv2d_fwd(x, weight, bias?, stride, padding, dilation, groups, residual?, activation)
        -> y = activation(conv + bias + residual)
    torch.ops.mltoolkit.conv2d_bwd(dy, x, weight, stride, padding, dilation, groups, output_mask) -> (dx, dw, db)

x (N, C, H, W) in NCHW or channels_last, weight (K, C/groups, R, S), symmetric zero padding. y and dx come back
in x's memory format, dw in weight's. The epilogue (residual add, activation) runs inside the forward kernel;
conv2d_bwd takes the gradient of the convolution itself, the autograd formula below applies the epilogue's
derivative first. Gradients that were not asked for (output_mask = x, weight, bias) are empty
tensors. The public functions below add what the kernels leave to Python: int / tuple / "same" / "valid" padding
(asymmetric "same" pads the extra row/column on the bottom/right, as torch does), the reflect / replicate /
circular padding modes of nn.Conv2d (explicit padding, then the op with zero padding 0), unbatched input and
conv1d (the H = 1 case).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import conv as reference
from mltoolkit.ops.reference.conv import memory_format

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

CONV = table("conv")


# ---- backends -------------------------------------------------------------------------------------------------

def _triton_accepts(x: Tensor, *_) -> Optional[str]:
    return "no float64 kernel" if x.dtype == torch.float64 else _ext.triton_device(x)


def _triton_kernels():
    from mltoolkit.triton_kernels import conv as triton_conv

    return triton_conv


# CUDA C++ before Triton: on an H100 (2026-11-26, fp16 channels_last, ResNet-50 layers at batch 32) the CUDA kernels
# ran 2.4-3x faster than the Triton ones, forward and backward (benchmarks/results/nvidia-h100-80gb-hbm3.md).
CONV.register("cuda", _ext.on_cuda, _ext.cuda_unavailable,
              forward=lambda *a: _ext._C.conv2d_forward_cuda(*a),
              backward=lambda *a: _ext._C.conv2d_backward_cuda(*a))
CONV.register("triton", _triton_accepts, _ext.triton_unavailable,
              forward=lambda *a: _triton_kernels().conv2d_forward(*a),
              backward=lambda *a: _triton_kernels().conv2d_backward(*a))
CONV.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
              forward=lambda *a: _ext._C.conv2d_forward_cpu(*a),
              forward_prepared=lambda *a: _ext._C.conv2d_forward_prepared_cpu(*a),
              backward=lambda *a: _ext._C.conv2d_backward_cpu(*a))
CONV.register("reference", lambda *_: None, forward=reference.conv2d_forward, backward=reference.conv2d_backward)


# ---- registered ops -------------------------------------------------------------------------------------------

def _layout(t: Tensor) -> Tensor:
    """t contiguous in its own memory format (NCHW or channels_last), as the kernels require. A tensor that already
    is returns at once: telling the formats apart is slow for one that is both (a 1x1 weight: ~2 us)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=memory_format(t))


def _forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
               dilation: list[int], groups: int, residual: Optional[Tensor] = None,
               activation: str = "none") -> Tensor:
    return _forward_kernel(x, weight, bias, stride, padding, dilation, groups, residual, activation)


def _forward_kernel(x, weight, bias, stride, padding, dilation, groups, residual, activation, prepared=None):
    """The chosen backend's forward; `prepared` (prepare_weight's layouts of this very weight) goes to a backend
    that takes it (the C++ CPU kernel) and spares it the per-call weight packing."""
    x, weight = _layout(x), _layout(weight)
    fmt = memory_format(x)
    bias = None if bias is None else bias.contiguous()
    residual = None if residual is None else residual.contiguous(memory_format=fmt)
    kernels = CONV.select(x).kernels
    args = (x, weight, bias, list(stride), list(padding), list(dilation), groups, residual, activation)
    if prepared is not None and "forward_prepared" in kernels:
        (y,) = kernels["forward_prepared"](*args, *prepared)
    else:
        (y,) = kernels["forward"](*args)
    return y.contiguous(memory_format=fmt)


def prepare_weight(weight: Tensor, groups: int, stride: Sequence[int],
                   dilation: Sequence[int]) -> Optional[tuple[Optional[Tensor], Optional[Tensor]]]:
    """For inference with a fixed weight of a 2-D convolution with these groups, stride and dilation: the layouts
    that the C++ CPU kernel otherwise derives from the weight on every call (panels of output channels, and the
    Winograd transform of 3x3 stride-1 weights, which also lets Winograd run on 7x7 images), for
    _forward_kernel(prepared=...). None where that kernel would not run (another device, the extension not built)
    or reads the weight as it is (depthwise). About the weight's size again (3x3 stride 1: nearly three times)."""
    if not weight.is_cpu or CONV.get("cpp").available() is not None:
        return None
    panels, winograd = _ext._C.conv2d_prepare_weight_cpu(_layout(weight), groups, list(stride), list(dilation))
    return None if panels is None else (panels, winograd)


conv2d_fwd = torch.library.custom_op("mltoolkit::conv2d_fwd", mutates_args=())(_forward_impl)


def _fake_output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple:
    h, w = x.shape[2], x.shape[3]
    r, s = weight.shape[2], weight.shape[3]
    p, q = reference.output_size(h, w, r, s, stride, padding, dilation)
    torch._check(p >= 1 and q >= 1, lambda: f"conv2d_fwd: output size ({p}, {q}) is empty")
    return p, q


@conv2d_fwd.register_fake
def _conv2d_fwd_fake(x, weight, bias, stride, padding, dilation, groups, residual=None, activation="none"):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "conv2d_fwd: x and weight must be 4-D")
    torch._check(weight.shape[1] * groups == x.shape[1], lambda: "conv2d_fwd: weight.shape[1] * groups != C")
    torch._check(activation in reference.ACTIVATIONS, lambda: f"conv2d_fwd: unknown activation {activation!r}")
    p, q = _fake_output_size(x, weight, stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], p, q)
    torch._check(residual is None or tuple(residual.shape) == shape,
                 lambda: f"conv2d_fwd: residual must have the output's shape {shape}")
    return x.new_empty(shape).contiguous(memory_format=memory_format(x))


def _inference_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
                    stride: list[int], padding: list[int], dilation: list[int], groups: int,
                    residual: Optional[Tensor] = None, activation: str = "none") -> Tensor:
    w, b, prepared = _inference_weights(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride,
                                        dilation, groups)
    return _forward_kernel(x, w, b, stride, padding, dilation, groups, residual, activation, prepared)


# Inference-mode conv + batch norm (no autograd): the fold, and the CPU kernel's weight layouts, are made once per
# set of weights and statistics and reused while they stay the same tensors, unchanged (_inference_weights), in
# eager mode and in compiled graphs alike (they hand the op the module's own parameters).
conv2d_bn_infer = torch.library.custom_op("mltoolkit::conv2d_bn_infer", mutates_args=())(_inference_impl)


@conv2d_bn_infer.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation, groups,
      residual=None, activation="none"):
    return _conv2d_fwd_fake(x, weight, bias, stride, padding, dilation, groups, residual, activation)


def _inference_weights(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, dilation, groups):
    """(folded weight, folded bias, prepared layouts or None). The layouts (prepare_weight) are made when the same
    unchanged tensors come a second time: a weight used once (made on the fly) costs no more than the fold."""
    state = _ext.derived("conv + batch norm inference", (weight, bias, bn_weight, bn_bias, running_mean, running_var),
                         (eps, tuple(stride), tuple(dilation), groups), lambda *t: _fold(t, eps))
    if state["calls"] == 1:
        state["prepared"] = prepare_weight(state["weight"], groups, stride, dilation)
    state["calls"] += 1
    return state["weight"], state["bias"], state["prepared"]


@torch.no_grad()
def _fold(tensors: tuple, eps: float) -> dict:
    weight, bias = fold_batch_norm(*tensors, eps)
    return {"weight": weight, "bias": bias, "prepared": None, "calls": 0}


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
               groups: int, output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    fmt = memory_format(x)
    x, weight = _layout(x), _layout(weight)
    dy = dy.contiguous(memory_format=fmt)  # .sum().backward() hands in an expanded, all-stride-0 gradient
    dx, dw, db = CONV.select(x).kernels["backward"](dy, x, weight, list(stride), list(padding), list(dilation),
                                                     groups, list(output_mask))
    return (x.new_empty(0) if dx is None else dx.contiguous(memory_format=fmt),
            x.new_empty(0) if dw is None else dw.contiguous(memory_format=memory_format(weight)),
            x.new_empty(0) if db is None else db.contiguous())


conv2d_bwd = torch.library.custom_op("mltoolkit::conv2d_bwd", mutates_args=())(_backward_impl)


@conv2d_bwd.register_fake
def _(dy, x, weight, stride, padding, dilation, groups, output_mask):
    torch._check(dy.dim() == 4 and dy.shape[1] == weight.shape[0], lambda: "conv2d_bwd: dy must be (N, K, P, Q)")
    dx = x.new_empty(x.shape).contiguous(memory_format=memory_format(x)) if output_mask[0] else x.new_empty(0)
    dw = (weight.new_empty(weight.shape).contiguous(memory_format=memory_format(weight)) if output_mask[1]
          else x.new_empty(0))
    db = x.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, residual, activation = inputs
    # relu / relu6 (and none) take their derivative from the output; the smooth activations recompute their input
    # z = conv + bias + residual in backward (one more forward convolution) rather than keep a second output alive.
    if activation in reference.OUTPUT_DERIVABLE:
        ctx.save_for_backward(x, weight, output if activation != "none" else None)
    else:
        ctx.save_for_backward(x, weight, bias, residual)
    ctx.options = (stride, padding, dilation, groups)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _backward(ctx, dy, eager=False):
    """The gradients; eager=True (from _EagerConv) calls the kernels' Python bodies instead of the registered ops."""
    stride, padding, dilation, groups = ctx.options
    # Autograd sees only the arguments the caller passed: residual and activation may be left at their defaults.
    needs = tuple(ctx.needs_input_grad) + (False,) * (9 - len(ctx.needs_input_grad))
    mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
    if dy is None or not (any(mask) or needs[7]):
        return (None,) * len(ctx.needs_input_grad)
    fwd, bwd = (_forward_impl, _backward_impl) if eager else (torch.ops.mltoolkit.conv2d_fwd,
                                                                torch.ops.mltoolkit.conv2d_bwd)
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        if ctx.activation in reference.OUTPUT_DERIVABLE:
            x, weight, y = ctx.saved_tensors
            dz = reference.activation_backward(dy, None, y, ctx.activation)
        else:
            x, weight, bias, residual = ctx.saved_tensors
            z = fwd(x, weight, bias, stride, padding, dilation, groups, residual, "none")
            dz = reference.activation_backward(dy, z, None, ctx.activation)
        dx = dw = db = None
        if any(mask):
            dx, dw, db = bwd(dz, x, weight, stride, padding, dilation, groups, mask)
    grads = (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
             None, None, None, None, dz if needs[7] else None, None)
    return grads[:len(ctx.needs_input_grad)]


conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerConv(torch.autograd.Function):
    """conv2d_fwd's forward and backward without the custom-op dispatch, whose host time (tens of microseconds)
    exceeds a GPU convolution's at ResNet sizes. Used only in plain eager mode (see mltoolkit._ext.plain_eager):
    anything compiled, exported or faked takes the registered op."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, residual, activation):
        y = _forward_impl(x, weight, bias, stride, padding, dilation, groups, residual, activation)
        _setup_context(ctx, (x, weight, bias, stride, padding, dilation, groups, residual, activation), y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return _backward(ctx, dy, eager=True)


# ---- padding ----------------------------------------------------------------------------------------------------

def _pad_index(size: int, before: int, after: int, mode: str, device) -> Tensor:
    """Source index along one dim for positions -before .. size+after-1 under the padding mode."""
    i = torch.arange(-before, size + after, device=device)
    if mode == "reflect":  # mirror without repeating the edge: -1 -> 1, size -> size-2
        i = i.abs()
        return torch.where(i > size - 1, 2 * (size - 1) - i, i)
    if mode == "replicate":
        return i.clamp(0, size - 1)
    return i.remainder(size)  # circular


def pad2d(x: Tensor, pads: Sequence[int], mode: str) -> Tensor:
    """Pads the last two dims of x (N, C, H, W) by pads = (top, bottom, left, right) with nn.Conv2d's padding
    modes: "zeros", "reflect" (mirror, edge not repeated), "replicate" (edge repeated), "circular" (wrap around).
    Keeps x's memory format. Checks the sizes the modes allow, naming the argument."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    if mode != "zeros":
        h, w = x.shape[-2], x.shape[-1]
        for dim, size, (a, b) in (("height", h, (top, bottom)), ("width", w, (left, right))):
            if mode == "reflect" and max(a, b) >= size:
                raise ValueError(f"padding: reflect padding ({a}, {b}) must be smaller than the input {dim} {size}")
            if mode == "circular" and max(a, b) > size:
                raise ValueError(f"padding: circular padding ({a}, {b}) must not exceed the input {dim} {size}")
    # Pad in the storage order (NHWC for channels_last) so the result keeps x's strides exactly, also where the
    # format is ambiguous (C = 1).
    cl = memory_format(x) == torch.channels_last
    v = x.permute(0, 2, 3, 1) if cl else x
    hd, wd = (1, 2) if cl else (2, 3)
    if mode == "zeros":
        v = F.pad(v, (0, 0, left, right, top, bottom) if cl else (left, right, top, bottom))
    else:
        if top or bottom:
            v = v.index_select(hd, _pad_index(x.shape[-2], top, bottom, mode, x.device))
        if left or right:
            v = v.index_select(wd, _pad_index(x.shape[-1], left, right, mode, x.device))
    return v.permute(0, 3, 1, 2) if cl else v


# ---- public API -----------------------------------------------------------------------------------------------

def _pair(fn: str, name: str, v, n: int, minimum: int) -> list[int]:
    vals = [v] * n if type(v) is int else list(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != n:
        raise TypeError(f"{fn}: {name} must be an int or a tuple of {n} ints, got {v!r}")
    for i in vals:  # a loop, not all() over a generator: this runs three times a call
        if type(i) is not int:  # (bool excluded)
            raise TypeError(f"{fn}: {name} must be an int or a tuple of {n} ints, got {v!r}")
        if i < minimum:
            raise ValueError(f"{fn}: {name} must be >= {minimum}, got {v!r}")
    return vals


def _check_tensors(fn: str, input: Tensor, weight: Tensor, bias: Optional[Tensor], spatial: int) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a Tensor, got {type(weight).__name__}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{fn}: weight dtype {weight.dtype} must match input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but input is on {input.device}")
    if input.dim() not in (spatial + 1, spatial + 2):
        raise ValueError(f"{fn}: input must be {spatial + 2}-D (batched) or {spatial + 1}-D (unbatched), got "
                         f"{input.dim()}-D shape {list(input.shape)}")
    if weight.dim() != spatial + 2:
        raise ValueError(f"{fn}: weight must be {spatial + 2}-D (out_channels, in_channels/groups, kernel...), got "
                         f"{weight.dim()}-D shape {list(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{fn}: bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.dtype != input.dtype:
            raise TypeError(f"{fn}: bias dtype {bias.dtype} must match input dtype {input.dtype}")
        if bias.device != input.device:
            raise ValueError(f"{fn}: bias is on {bias.device} but input is on {input.device}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape (out_channels,) = ({weight.shape[0]},), got "
                             f"{list(bias.shape)}")


def _conv(fn: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups,
          padding_mode: str, spatial: int, residual: Optional[Tensor] = None, activation: str = "none",
          inference_bn: Optional[tuple] = None) -> Tensor:
    """Shared body of conv2d / conv1d / conv2d_bn_act; x is batched (N, C, H, W), weight (K, C/groups, R, S);
    conv1d passes spatial = 1 and H = R = 1 (the stride / padding / dilation of H are then 1 / 0 / 1).
    inference_bn: (bn_weight, bn_bias, running_mean, running_var, eps) of an inference-mode batch norm after the
    convolution, for calls that record no autograd graph (conv2d_bn_infer)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{fn}: padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{fn}: groups must be a positive int, got {groups!r}")
    c, k = x.shape[1], weight.shape[0]
    if c % groups:
        raise ValueError(f"{fn}: input channels {c} are not divisible by groups {groups}")
    if k % groups:
        raise ValueError(f"{fn}: weight out_channels {k} are not divisible by groups {groups}")
    if weight.shape[1] * groups != c:
        raise ValueError(f"{fn}: weight {list(weight.shape)} expects {weight.shape[1] * groups} input channels "
                         f"(weight.shape[1] * groups), but input has {c}")
    stride = _pair(fn, "stride", stride, spatial, 1)
    dilation = _pair(fn, "dilation", dilation, spatial, 1)
    kernel = list(weight.shape[-spatial:])
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * spatial
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride {stride}")
            # torch puts the odd extra on the right / bottom.
            pads = [(d * (r - 1) // 2, d * (r - 1) - d * (r - 1) // 2) for d, r in zip(dilation, kernel)]
        else:
            raise ValueError(f"{fn}: padding must be an int, a tuple of ints, 'same' or 'valid', got {padding!r}")
    else:
        pads = [(p, p) for p in _pair(fn, "padding", padding, spatial, 0)]
    if spatial == 1:
        stride, dilation, pads = [1, *stride], [1, *dilation], [(0, 0), *pads]

    (top, bottom), (left, right) = pads
    if padding_mode == "zeros":  # the symmetric part goes to the kernel, the odd extra is padded here
        sym = [min(top, bottom), min(left, right)]
        x = pad2d(x, (0, bottom - top, 0, right - left), "zeros")
    else:
        sym = [0, 0]
        x = pad2d(x, (top, bottom, left, right), padding_mode)

    h, w = x.shape[2] + 2 * sym[0], x.shape[3] + 2 * sym[1]
    eff = [d * (r - 1) + 1 for d, r in zip(dilation, weight.shape[2:])]
    if h < eff[0] or w < eff[1]:
        size = [w] if spatial == 1 else [h, w]
        raise ValueError(f"{fn}: padded input size {size} is smaller than the dilated kernel size "
                         f"{eff[-spatial:]}")
    if residual is not None:
        out = (x.shape[0], weight.shape[0], *reference.output_size(h - 2 * sym[0], w - 2 * sym[1], *weight.shape[2:],
                                                                   stride, sym, dilation))
        if tuple(residual.shape) != out:
            raise ValueError(f"{fn}: residual must have the output's shape {list(out)}, got {list(residual.shape)}")
    if inference_bn is not None:
        args = (x, weight, bias, *inference_bn, stride, sym, dilation, groups, residual, activation)
        if _ext.plain_eager(x, weight, bias, residual, *inference_bn[:4]):
            return _inference_impl(*args)
        return torch.ops.mltoolkit.conv2d_bn_infer(*args)
    args = (x, weight, bias, stride, sym, dilation, groups, residual, activation)
    return _ext.call_op(torch.ops.mltoolkit.conv2d_fwd, _EagerConv, _forward_impl, args, (x, weight, bias, residual))


def _layout_input(x: Tensor, weight: Tensor) -> Tensor:
    """x in the layout the convolution computes and returns: channels_last when x or the weight is channels_last
    (F.conv2d's rule: a model whose weights were converted with .to(memory_format=torch.channels_last) runs
    channels_last from its first convolution on), else contiguous NCHW."""
    if memory_format(x) == torch.channels_last:
        return x
    # A weight dense in both layouts (1x1) is told apart by its strides, as torch does (slower: asked last).
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and (
            not weight.is_contiguous() or memory_format(weight) == torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
           dilation: Union[int, Sequence[int]] = 1, groups: int = 1, padding_mode: str = "zeros") -> Tensor:
    """2-D cross-correlation; F.conv2d's signature plus nn.Conv2d's padding_mode.

    input (N, C, H, W) or unbatched (C, H, W), weight (K, C/groups, R, S), bias (K,) -> (N, K, P, Q) with
    P = (H + pad_top + pad_bottom - dilation*(R-1) - 1) // stride + 1. padding: int, (ph, pw), "valid" or "same"
    (stride 1; the odd extra goes bottom/right). padding_mode: zeros, reflect, replicate or circular.
    channels_last input gives channels_last output.
    """
    _check_tensors("conv2d", input, weight, bias, 2)
    unbatched = input.dim() == 3
    x = _layout_input(input.unsqueeze(0) if unbatched else input, weight)
    w = _layout(weight)
    y = _conv("conv2d", x, w, bias, stride, padding, dilation, groups, padding_mode, 2)
    return y.squeeze(0) if unbatched else y


def conv1d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
           dilation: Union[int, Sequence[int]] = 1, groups: int = 1, padding_mode: str = "zeros") -> Tensor:
    """1-D cross-correlation; F.conv1d's signature plus nn.Conv1d's padding_mode.

    input (N, C, L) or unbatched (C, L), weight (K, C/groups, S), bias (K,) -> (N, K, L_out); runs as conv2d with
    H = 1.
    """
    _check_tensors("conv1d", input, weight, bias, 1)
    unbatched = input.dim() == 2
    x = (input.unsqueeze(0) if unbatched else input).contiguous().unsqueeze(2)
    y = _conv("conv1d", x, weight.contiguous().unsqueeze(2), bias, stride, padding, dilation, groups, padding_mode,
              1).squeeze(2)
    return y.squeeze(0) if unbatched else y


# ---- convolution + batch norm + activation --------------------------------------------------------------------

def fold_batch_norm(weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    running_mean: Tensor, running_var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The weight and bias of one convolution equal to conv followed by inference-mode batch norm:
    w' = w * g, b' = (b - mean) * g + beta with g = gamma / sqrt(var + eps) per output channel. Computed in float32
    (float64 for float64) and rounded once to weight's dtype; differentiable, so frozen-BN fine-tuning trains
    weight, bias, gamma and beta through it."""
    ct = reference.compute_dtype(weight.dtype)
    g = torch.rsqrt(running_var.to(ct) + eps)
    if bn_weight is not None:
        g = g * bn_weight.to(ct)
    b = -running_mean.to(ct) if bias is None else bias.to(ct) - running_mean.to(ct)
    b = b * g
    if bn_bias is not None:
        b = b + bn_bias.to(ct)
    w = weight.to(ct) * g.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), b.to(weight.dtype)


def conv2d_bn_act(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                  bn_bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                  running_var: Optional[Tensor] = None, *, training: bool = False, momentum: float = 0.1,
                  eps: float = 1e-5, activation: str = "relu", residual: Optional[Tensor] = None,
                  stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
                  dilation: Union[int, Sequence[int]] = 1, groups: int = 1, padding_mode: str = "zeros") -> Tensor:
    """activation(batch_norm(conv2d(input, weight, bias)) + residual), one fused kernel where the math allows.

    The convolution arguments are conv2d's; the batch-norm ones F.batch_norm's (bn_weight = gamma, bn_bias = beta).
    training=False: batch norm is folded into the convolution's weight and bias (`fold_batch_norm`) and the kernel's
    epilogue adds the bias and the residual and applies the activation: one pass over the output. training=True:
    the convolution, then `batch_norm_act` (batch statistics, running_mean / running_var updated in place with
    `momentum`, normalization, residual and activation in one kernel, with its own backward). activation: none,
    relu, relu6, silu, gelu, gelu_tanh or hardswish.
    """
    _check_tensors("conv2d_bn_act", input, weight, bias, 2)
    _check_epilogue("conv2d_bn_act", input, residual, activation)
    k = weight.shape[0]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"conv2d_bn_act: {name} must be a Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (k,):
            raise ValueError(f"conv2d_bn_act: {name} must have shape (out_channels,) = ({k},), got {list(t.shape)}")
        if t.device != input.device:
            raise ValueError(f"conv2d_bn_act: {name} is on {t.device} but input is on {input.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("conv2d_bn_act: running_mean and running_var must be given together")
    if not training:
        if running_mean is None:
            raise ValueError("conv2d_bn_act: running_mean and running_var are required when training=False")
        if not _ext.needs_grad(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual):
            return _conv_epilogue("conv2d_bn_act", input, _layout(weight), bias, stride, padding, dilation, groups,
                                  padding_mode, residual, activation,
                                  inference_bn=(bn_weight, bn_bias, running_mean, running_var, float(eps)))
        # Differentiable (frozen-BN fine-tuning): the fold is part of the graph.
        w, b = fold_batch_norm(_layout(weight), bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return _conv_epilogue("conv2d_bn_act", input, w, b, stride, padding, dilation, groups, padding_mode,
                              residual, activation)
    from mltoolkit.ops.batch_norm import batch_norm_act

    unbatched = input.dim() == 3
    x = _layout_input(input.unsqueeze(0) if unbatched else input, weight)
    res = None if residual is None else (residual.unsqueeze(0) if unbatched else residual)
    z = _conv("conv2d_bn_act", x, _layout(weight), bias, stride, padding, dilation, groups, padding_mode, 2)
    if res is not None and res.shape != z.shape:
        raise ValueError(f"conv2d_bn_act: residual must have the output's shape {list(z.shape)}, got "
                         f"{list(res.shape)}")
    y = batch_norm_act(z, bn_weight, bn_bias, running_mean, running_var, training=True, momentum=momentum,
                       eps=eps, activation=activation, residual=res)
    return y.squeeze(0) if unbatched else y


def _check_epilogue(fn: str, input: Tensor, residual: Optional[Tensor], activation: str) -> None:
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {', '.join(reference.ACTIVATIONS)}, got {activation!r}")
    if residual is not None and not isinstance(residual, Tensor):
        raise TypeError(f"{fn}: residual must be a Tensor or None, got {type(residual).__name__}")
    if residual is not None and (residual.dtype != input.dtype or residual.device != input.device):
        raise TypeError(f"{fn}: residual must have input's dtype and device ({input.dtype}, {input.device}), got "
                        f"({residual.dtype}, {residual.device})")


def _conv_epilogue(fn, input, weight, bias, stride, padding, dilation, groups, padding_mode, residual, activation,
                   inference_bn=None):
    unbatched = input.dim() == 3
    x = _layout_input(input.unsqueeze(0) if unbatched else input, weight)
    if residual is not None:
        residual = (residual.unsqueeze(0) if unbatched else residual).contiguous(memory_format=memory_format(x))
    y = _conv(fn, x, _layout(weight), bias, stride, padding, dilation, groups, padding_mode, 2, residual=residual,
              activation=activation, inference_bn=inference_bn)
    return y.squeeze(0) if unbatched else y


def conv2d_act(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
               dilation: Union[int, Sequence[int]] = 1, groups: int = 1, padding_mode: str = "zeros", *,
               activation: str = "relu", residual: Optional[Tensor] = None) -> Tensor:
    """activation(conv2d(input, weight, bias) + residual) in one kernel: the bias, the residual add and the
    activation (none, relu, relu6, silu, gelu, gelu_tanh, hardswish) run in the convolution's epilogue. The
    convolution arguments are conv2d's; residual has the output's shape."""
    _check_tensors("conv2d_act", input, weight, bias, 2)
    _check_epilogue("conv2d_act", input, residual, activation)
    return _conv_epilogue("conv2d_act", input, weight, bias, stride, padding, dilation, groups, padding_mode,
                          residual, activation)
