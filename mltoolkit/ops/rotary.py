"""Rotary position embedding (RoPE) with flash-attn's `apply_rotary_emb` signature.

Two registered ops, one kernel per backend (contract: the "Rotary embedding" part of csrc/attention.h):

    torch.ops.mltoolkit.rotary(x, cos, sin, interleaved, conjugate) -> Tensor      out of place, differentiable
    torch.ops.mltoolkit.rotary_(x!, cos, sin, interleaved, conjugate) -> ()        in place, no autograd

x is (batch, seqlen, nheads, headdim); cos and sin are (seqlen, rotary_dim / 2). With r < rotary_dim / 2 and
(x1, x2) = (x[r], x[r + rotary_dim/2]) (half-split) or (x[2r], x[2r+1]) (interleaved):
    y1 = x1 * cos - x2 * sin,  y2 = x1 * sin + x2 * cos       (conjugate: sin -> -sin)
and dims rotary_dim .. headdim-1 are copied. The rotation is orthogonal, so the gradient of x is the same op with
conjugate flipped; cos and sin get their gradients from plain torch reductions in the backward (saving x only then).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import attention as reference
from mltoolkit.ops.reference.norm import stat_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

ROTARY = table("rotary")


# ---- backends -------------------------------------------------------------------------------------------------

def _triton_rotary(*args):
    from mltoolkit.triton_kernels import rotary as triton_rotary

    return triton_rotary.rotary(*args)


def _reference_into(x, cos, sin, out, interleaved, conjugate):
    out.copy_(reference.rotary(x, cos, sin, interleaved, conjugate))


# Every kernel is (x, cos, sin, out, interleaved, conjugate) -> None and writes out (which may be x).
ROTARY.register("cuda", _ext.on_cuda, _ext.cuda_unavailable, forward=lambda *a: _ext._C.rotary_cuda(*a))
ROTARY.register("triton", _ext.triton_device, _ext.triton_unavailable, forward=_triton_rotary)
ROTARY.register("cpp", _ext.on_cpu, _ext.cpp_unavailable, forward=lambda *a: _ext._C.rotary_cpu(*a))
ROTARY.register("reference", lambda *_: None, forward=_reference_into)


# ---- argument checks ------------------------------------------------------------------------------------------

def _check(fn: str, x: Tensor, cos: Tensor, sin: Tensor, exact_seqlen: bool) -> None:
    """Errors name the argument. exact_seqlen: the registered ops take exactly seqlen table rows, the public
    function at least seqlen (and uses the first seqlen)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be 4-D (batch, seqlen, nheads, headdim), got shape {list(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D (seqlen_ro, rotary_dim / 2), got shape {list(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{fn}: sin must have cos's shape {list(cos.shape)}, got {list(sin.shape)}")
    seqlen, headdim = x.shape[1], x.shape[3]
    if exact_seqlen and cos.shape[0] != seqlen:
        raise ValueError(f"{fn}: cos has {cos.shape[0]} rows, expected x's seqlen {seqlen}")
    if cos.shape[0] < seqlen:
        raise ValueError(f"{fn}: cos and sin have seqlen_ro = {cos.shape[0]} rows, fewer than x's seqlen {seqlen}")
    if 2 * cos.shape[1] > headdim:
        raise ValueError(f"{fn}: cos and sin have {cos.shape[1]} columns, so rotary_dim = {2 * cos.shape[1]} "
                         f"exceeds x's headdim {headdim}")


def _table_dtype(t: Tensor, x_dtype: torch.dtype) -> Tensor:
    # Kernels read tables in x's dtype or float32; any other float dtype is converted to float32, where the math is.
    return t if t.dtype in (x_dtype, torch.float32) else t.to(torch.float32)


def _run_kernel(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, interleaved: bool, conjugate: bool) -> None:
    """The chosen backend writes rotary(x) into out (out may be x); both need stride 1 in the last dim."""
    cos, sin = _table_dtype(cos, x.dtype).contiguous(), _table_dtype(sin, x.dtype).contiguous()
    ROTARY.select(x).kernels["forward"](x, cos, sin, out, interleaved, conjugate)


def _unit_last_stride(t: Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _rotated(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, conjugate: bool) -> Tensor:
    """A new contiguous tensor holding rotary(x)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _run_kernel(x if _unit_last_stride(x) else x.contiguous(), cos, sin, out, interleaved, conjugate)
    return out


def _rotate_in_place(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, conjugate: bool) -> None:
    if _unit_last_stride(x):
        _run_kernel(x, cos, sin, x, interleaved, conjugate)
    else:
        x.copy_(_rotated(x, cos, sin, interleaved, conjugate))


# ---- registered ops -------------------------------------------------------------------------------------------

@torch.library.custom_op("mltoolkit::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, conjugate: bool) -> Tensor:
    _check("mltoolkit::rotary", x, cos, sin, exact_seqlen=True)
    return _rotated(x, cos, sin, interleaved, conjugate)


def _fake_check(x, cos, sin):
    torch._check(x.dim() == 4, lambda: f"mltoolkit::rotary: x must be 4-D, got {x.dim()}-D")
    torch._check(cos.dim() == 2 and cos.shape == sin.shape,
                 lambda: "mltoolkit::rotary: cos and sin must be 2-D of one shape")
    torch._check(cos.shape[0] == x.shape[1], lambda: "mltoolkit::rotary: cos must have x's seqlen rows")
    torch._check(2 * cos.shape[1] <= x.shape[3], lambda: "mltoolkit::rotary: rotary_dim exceeds headdim")


@rotary.register_fake
def _(x, cos, sin, interleaved, conjugate):
    _fake_check(x, cos, sin)
    return x.new_empty(x.shape)


@torch.library.custom_op("mltoolkit::rotary_", mutates_args=("x",))
def rotary_(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, conjugate: bool) -> None:
    _check("mltoolkit::rotary_", x, cos, sin, exact_seqlen=True)
    _rotate_in_place(x, cos, sin, interleaved, conjugate)


@rotary_.register_fake
def _(x, cos, sin, interleaved, conjugate):
    _fake_check(x, cos, sin)


def _table_grads(dy: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool,
                 conjugate: bool) -> tuple[Tensor, Tensor]:
    """d cos = sum over batch and heads of dy1*x1 + dy2*x2, d sin = +-(dy2*x1 - dy1*x2), in the compute dtype."""
    ct = stat_dtype(x.dtype)
    r = 2 * cos.shape[1]
    g, xr = dy[..., :r].to(ct), x[..., :r].to(ct)
    if interleaved:
        g1, g2, x1, x2 = g[..., 0::2], g[..., 1::2], xr[..., 0::2], xr[..., 1::2]
    else:
        g1, g2, x1, x2 = g[..., : r // 2], g[..., r // 2:], xr[..., : r // 2], xr[..., r // 2:]
    dcos = (g1 * x1 + g2 * x2).sum(dim=(0, 2))
    dsin = (g2 * x1 - g1 * x2).sum(dim=(0, 2))
    return dcos.to(cos.dtype), (-dsin if conjugate else dsin).to(sin.dtype)


def _save(ctx, x, cos, sin, interleaved, conjugate):
    tables_need_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    # x is kept only for the cos/sin gradients; the x gradient needs just the tables.
    ctx.save_for_backward(cos, sin, x if tables_need_grad else None)
    ctx.interleaved, ctx.conjugate = interleaved, conjugate
    # Autograd may run backward on another thread, which does not see the forward's forced backend.
    ctx.forced_backend = forced_backend()


def _grads(ctx, dy, rotate):
    """(dx, dcos, dsin); rotate is the registered op or the eager Function, both differentiable again."""
    cos, sin, x = ctx.saved_tensors
    dx = dcos = dsin = None
    with backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext():
        if ctx.needs_input_grad[0]:
            dx = rotate(dy, cos, sin, ctx.interleaved, not ctx.conjugate)
    if x is not None:
        dcos, dsin = _table_grads(dy, x, cos, sin, ctx.interleaved, ctx.conjugate)
        dcos = dcos if ctx.needs_input_grad[1] else None
        dsin = dsin if ctx.needs_input_grad[2] else None
    return dx, dcos, dsin


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs)


def _backward(ctx, dy):
    return (*_grads(ctx, dy, torch.ops.mltoolkit.rotary), None, None)


rotary.register_autograd(_backward, setup_context=_setup_context)


class _EagerRotary(torch.autograd.Function):
    """The registered op's forward and backward without the custom-op dispatch, for plain eager calls only (see
    mltoolkit._ext.plain_eager)."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, conjugate):
        _save(ctx, x, cos, sin, interleaved, conjugate)
        return _rotated(x, cos, sin, interleaved, conjugate)

    @staticmethod
    def backward(ctx, dy):
        return (*_grads(ctx, dy, _EagerRotary.apply), None, None)


# ---- public API -----------------------------------------------------------------------------------------------

def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False) -> Tensor:
    """Rotary embedding of x, as flash_attn.layers.rotary.apply_rotary_emb.

    x: (batch, seqlen, nheads, headdim), any strides (e.g. q = qkv[:, :, 0] of a packed (B, L, 3, H, D) tensor).
    cos, sin: (seqlen_ro, rotary_dim / 2) with seqlen_ro >= seqlen; the first seqlen rows are used. rotary_dim <=
    headdim; dims rotary_dim .. headdim-1 pass through unchanged. Tables of x's dtype or float32 are read as they
    are, other float dtypes are converted to float32; the math is in float32 (float64 for float64 x).
    interleaved: rotate pairs (x[2r], x[2r+1]) (GPT-J) instead of (x[r], x[r + rotary_dim/2]) (GPT-NeoX).
    Returns y = (x1*cos - x2*sin, x1*sin + x2*cos) on the rotary dims, differentiable in x, cos and sin.

    inplace=True writes y into x and returns x. When autograd is recording and x, cos or sin requires grad, y is
    computed out of place and copied into x (x.copy_(y)), so gradients stay correct; as for any in-place op, x
    then must not be a leaf that requires grad.
    """
    fn = "apply_rotary_emb"
    _check(fn, x, cos, sin, exact_seqlen=False)
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__}")
    seqlen = x.shape[1]
    if cos.shape[0] != seqlen:
        cos, sin = cos[:seqlen], sin[:seqlen]
    cos, sin = _table_dtype(cos, x.dtype), _table_dtype(sin, x.dtype)
    needs_grad = _ext.needs_grad(x, cos, sin)
    eager = _ext.plain_eager(x, cos, sin)
    if inplace and not needs_grad:
        if eager:
            _rotate_in_place(x, cos, sin, interleaved, False)
        else:
            torch.ops.mltoolkit.rotary_(x, cos, sin, interleaved, False)
        return x
    # In place with cos/sin gradients, the backward needs x as it was: rotate a copy so that x.copy_ below does
    # not invalidate the saved tensor.
    src = x.clone() if inplace and (cos.requires_grad or sin.requires_grad) else x
    if not eager:
        out = torch.ops.mltoolkit.rotary(src, cos, sin, interleaved, False)
    elif needs_grad:
        out = _EagerRotary.apply(src, cos, sin, interleaved, False)
    else:  # nothing to record: the kernel alone (autograd.Function.apply costs ~4 us a call)
        out = _rotated(src, cos, sin, interleaved, False)
    return x.copy_(out) if inplace else out
