"""Fused LSTM and GRU: cells (one step) and whole layers, as registered ops, and torch-shaped functions.

The kernel contract is csrc/lstm.h. Registered ops (each *_fwd has autograd; its *_bwd is the gradient op):

    torch.ops.mltoolkit.lstm_cell_fwd(x_proj, h, c, w_hh, b_hh?) -> (h', c', gates)     [h (B, K), w_hh (4H, K)]
    torch.ops.mltoolkit.lstm_cell_bwd(dh, dc?, gates, c, c_new) -> (dpre, dc_prev)           [pointwise part]
    torch.ops.mltoolkit.gru_cell_fwd(x_proj, h, w_hh, b_hh?) -> (h', saved)
    torch.ops.mltoolkit.gru_cell_bwd(dh, saved, h) -> (dx_proj, dgh, dh_direct)                [pointwise part]
    torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih?, w_hh, bias?, batch_sizes?, reverse, save)
        -> (out, h_n, c_n, gates, cells)
    torch.ops.mltoolkit.lstm_layer_bwd(dout, dh_n, dc_n, gates, cells, out, h0, c0, w_hh, batch_sizes?, reverse)
        -> (dx_proj, dh0, dc0, dw_hh)
    torch.ops.mltoolkit.gru_layer_fwd(x_proj, h0, w_hh, b_hh?, batch_sizes?, reverse, save) -> (out, h_n, saved)
    torch.ops.mltoolkit.gru_layer_bwd(dout, dh_n, saved, out, h0, w_hh, batch_sizes?, reverse, has_bias)
        -> (dx_proj, dh0, dw_hh, db_hh)

The LSTM layer op takes the layer input x (N, I) with w_ih and bias = b_ih + b_hh, and computes the input
projection itself (the C++ CPU kernel chunk by chunk of time steps inside the kernel, the GPU backends as one GEMM
before the step loop); without w_ih its x is x_proj (N, 4H), the projection done by the caller. Its backward op
returns the pre-activation gradients, from which the autograd formula gives the input, w_ih and bias gradients. The
GRU layer op and the cells take x_proj = x @ W_ih^T + b_ih, one GEMM over every time step done outside the ops by
torch (its autograd gives the W_ih / b_ih / input gradients). A layer op runs, per step, the recurrent GEMM straight
into the fused gate math. The rows of a layer are laid out like a PackedSequence's data (batch_sizes), so
packed input runs without padding; a padded sequence is the case of equal batch sizes (batch_sizes None).
An LSTM with projections (torch's proj_size P > 0: the state h = W_hr (o * tanh(c)) has width P, W_hh is (4H, P))
runs each step through the cell op, whose w_hh may be (4H, K) with h (B, K), then h = h' @ W_hr^T (F.linear), so
autograd runs through the cell op's backward; the layer ops take the plain LSTM (K = H) only.
The public functions `lstm_sequence`, `gru_sequence` take torch's _VF.lstm / _VF.gru arguments, `lstm_cell` /
`gru_cell` those of torch.nn.LSTMCell / GRUCell's functional form. (mltoolkit.ops exports these names; this module
stays reachable as mltoolkit.ops.lstm.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import backend, forced_backend, table
from mltoolkit.ops.reference import lstm as reference

LSTM = table("lstm")

KERNELS = ("lstm_cell_forward", "lstm_cell_backward", "gru_cell_forward", "gru_cell_backward", "lstm_layer_forward",
           "lstm_layer_backward", "gru_layer_forward", "gru_layer_backward")
_NATIVE_DTYPES = (torch.float32, torch.float64)


def _native_dtype(x, *_) -> Optional[str]:
    return None if x.dtype in _NATIVE_DTYPES else f"takes float32 or float64, got {x.dtype}"


def _both(*checks):
    def supports(*args):
        return next((why for why in (c(*args) for c in checks) if why is not None), None)
    return supports


def _triton_pointwise() -> reference.Pointwise:
    from mltoolkit.triton_kernels import lstm as triton_lstm

    return reference.Pointwise(triton_lstm.lstm_pointwise_forward, triton_lstm.lstm_pointwise_backward,
                               triton_lstm.gru_pointwise_forward, triton_lstm.gru_pointwise_backward)


def _c_kernel(name: str, suffix: str):
    return lambda *a: getattr(_ext._C, f"{name}_{suffix}")(*a)


def _with_pointwise(name: str, pointwise):
    fn = getattr(reference, name)
    return lambda *a: fn(*a, pointwise=pointwise())


# The CUDA backend runs its step loop in C++ (csrc/cuda/lstm_cuda.cpp: cuBLAS GEMMs + our gate kernels); the Triton
# backend runs the reference's step loop with Triton gate kernels.
LSTM.register("cuda", _both(_ext.on_cuda, _native_dtype), _ext.cuda_unavailable,
              **{k: _c_kernel(k, "cuda") for k in KERNELS})
LSTM.register("triton", _both(_ext.triton_device, _native_dtype), _ext.triton_unavailable,
              **{k: _with_pointwise(k, _triton_pointwise) for k in KERNELS})
LSTM.register("cpp", _both(_ext.on_cpu, _native_dtype), _ext.cpp_unavailable,
              **{k: _c_kernel(k, "cpu") for k in KERNELS})
LSTM.register("reference", lambda *_: None, **{k: getattr(reference, k) for k in KERNELS})


def _run(kernel: str, first: Tensor, *args):
    return LSTM.select(first).kernels[kernel](first, *args)


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _forced(ctx):
    return backend(ctx.forced_backend) if ctx.forced_backend else contextlib.nullcontext()


# ---- cells ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("mltoolkit::lstm_cell_fwd", mutates_args=())
def lstm_cell_fwd(x_proj: Tensor, h: Tensor, c: Tensor, w_hh: Tensor,
                  b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    h_new, c_new, gates = _run("lstm_cell_forward", x_proj.contiguous(), h.contiguous(), c.contiguous(),
                               w_hh.contiguous(), _c(b_hh))
    return h_new, c_new, gates


@lstm_cell_fwd.register_fake
def _(x_proj, h, c, w_hh, b_hh):
    torch._check(x_proj.dim() == 2 and h.dim() == 2 and c.dim() == 2,
                 lambda: "lstm_cell_fwd: x_proj, h and c must be 2-D")
    torch._check(x_proj.shape[1] == 4 * c.shape[1], lambda: "lstm_cell_fwd: x_proj must have shape (B, 4H)")
    torch._check(w_hh.shape[1] == h.shape[1], lambda: "lstm_cell_fwd: w_hh must have shape (4H, K) for h (B, K)")
    return c.new_empty(c.shape), c.new_empty(c.shape), x_proj.new_empty(x_proj.shape)


@torch.library.custom_op("mltoolkit::lstm_cell_bwd", mutates_args=())
def lstm_cell_bwd(dh: Tensor, dc: Optional[Tensor], gates: Tensor, c: Tensor,
                  c_new: Tensor) -> tuple[Tensor, Tensor]:
    dpre, dc_prev = _run("lstm_cell_backward", dh.contiguous(), _c(dc), gates.contiguous(), c.contiguous(),
                         c_new.contiguous())
    return dpre, dc_prev


@lstm_cell_bwd.register_fake
def _(dh, dc, gates, c, c_new):
    return gates.new_empty(gates.shape), c.new_empty(c.shape)


def _unused_grads_as_none(ctx):
    """Gradients of unused outputs (the saved gates, often h_n / c_n) arrive in the backward as None instead of
    materialized zeros (a (N, 4H) fill cost ~6 ms a layer on the dev VM); the backwards make the few zeros they need."""
    ctx.set_materialize_grads(False)


def _lstm_cell_setup(ctx, inputs, output):
    _x_proj, h, c, w_hh, b_hh = inputs
    _h_new, c_new, gates = output
    ctx.save_for_backward(h, c, w_hh, gates, c_new)
    ctx.has_b_hh = b_hh is not None
    ctx.forced_backend = forced_backend()
    _unused_grads_as_none(ctx)


def _lstm_cell_backward(ctx, dh, dc, _dgates):
    h, c, w_hh, gates, c_new = ctx.saved_tensors
    if dh is None:  # h_new unused: its gradient is zero (h_new has c's shape; h is (B, K) with projections)
        dh = torch.zeros_like(c_new)
    with _forced(ctx):
        dpre, dc_prev = torch.ops.mltoolkit.lstm_cell_bwd(dh, dc, gates, c, c_new)
    db = dpre.sum(0) if ctx.has_b_hh else None
    return dpre, dpre @ w_hh, dc_prev, dpre.t() @ h, db


lstm_cell_fwd.register_autograd(_lstm_cell_backward, setup_context=_lstm_cell_setup)


@torch.library.custom_op("mltoolkit::gru_cell_fwd", mutates_args=())
def gru_cell_fwd(x_proj: Tensor, h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    h_new, saved = _run("gru_cell_forward", x_proj.contiguous(), h.contiguous(), w_hh.contiguous(), _c(b_hh))
    return h_new, saved


@gru_cell_fwd.register_fake
def _(x_proj, h, w_hh, b_hh):
    torch._check(x_proj.dim() == 2 and h.dim() == 2, lambda: "gru_cell_fwd: x_proj and h must be 2-D")
    torch._check(x_proj.shape[1] == 3 * h.shape[1], lambda: "gru_cell_fwd: x_proj must have shape (B, 3H)")
    return h.new_empty(h.shape), h.new_empty(h.shape[0], 4 * h.shape[1])


@torch.library.custom_op("mltoolkit::gru_cell_bwd", mutates_args=())
def gru_cell_bwd(dh: Tensor, saved: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dgh, dh_direct = _run("gru_cell_backward", dh.contiguous(), saved.contiguous(), h.contiguous())
    return dx, dgh, dh_direct


@gru_cell_bwd.register_fake
def _(dh, saved, h):
    rows, hidden = h.shape
    return h.new_empty(rows, 3 * hidden), h.new_empty(rows, 3 * hidden), h.new_empty(h.shape)


def _gru_cell_setup(ctx, inputs, output):
    _x_proj, h, w_hh, b_hh = inputs
    ctx.save_for_backward(h, w_hh, output[1])
    ctx.has_b_hh = b_hh is not None
    ctx.forced_backend = forced_backend()
    _unused_grads_as_none(ctx)


def _gru_cell_backward(ctx, dh, _dsaved):
    h, w_hh, saved = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(h)
    with _forced(ctx):
        dx, dgh, dh_direct = torch.ops.mltoolkit.gru_cell_bwd(dh, saved, h)
    db = dgh.sum(0) if ctx.has_b_hh else None
    return dx, torch.addmm(dh_direct, dgh, w_hh), dgh.t() @ h, db


gru_cell_fwd.register_autograd(_gru_cell_backward, setup_context=_gru_cell_setup)


# ---- layers ---------------------------------------------------------------------------------------------------

def _layer_fake_checks(name, x_proj, h0, gates):
    torch._check(x_proj.dim() == 2 and h0.dim() == 2, lambda: f"{name}: x_proj and h0 must be 2-D")
    torch._check(x_proj.shape[1] == gates * h0.shape[1], lambda: f"{name}: x_proj must have shape (N, {gates}H)")


@torch.library.custom_op("mltoolkit::lstm_layer_fwd", mutates_args=())
def lstm_layer_fwd(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Optional[Tensor], w_hh: Tensor, bias: Optional[Tensor],
                   batch_sizes: Optional[Tensor], reverse: bool,
                   save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, h_n, c_n, gates, cells = _run("lstm_layer_forward", x.contiguous(), h0.contiguous(), c0.contiguous(),
                                       _c(w_ih), w_hh.contiguous(), _c(bias), batch_sizes, reverse, save)
    return out, h_n, c_n, gates, cells


@lstm_layer_fwd.register_fake
def _(x, h0, c0, w_ih, w_hh, bias, batch_sizes, reverse, save):
    torch._check(x.dim() == 2 and h0.dim() == 2, lambda: "lstm_layer_fwd: x and h0 must be 2-D")
    width = 4 * h0.shape[1] if w_ih is None else w_ih.shape[1]
    torch._check(x.shape[1] == width, lambda: f"lstm_layer_fwd: x must have shape (N, {width})")
    rows, hidden = x.shape[0], h0.shape[1]
    return (x.new_empty(rows, hidden), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            x.new_empty((rows, 4 * hidden) if save else (0,)), x.new_empty((rows, hidden) if save else (0,)))


@torch.library.custom_op("mltoolkit::lstm_layer_bwd", mutates_args=())
def lstm_layer_bwd(dout: Tensor, dh_n: Tensor, dc_n: Tensor, gates: Tensor, cells: Tensor, out: Tensor, h0: Tensor,
                   c0: Tensor, w_hh: Tensor, batch_sizes: Optional[Tensor],
                   reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dh0, dc0, dw = _run("lstm_layer_backward", dout.contiguous(), dh_n.contiguous(), dc_n.contiguous(),
                            gates.contiguous(), cells.contiguous(), out.contiguous(), h0.contiguous(),
                            c0.contiguous(), w_hh.contiguous(), batch_sizes, reverse)
    return dx, dh0, dc0, dw


@lstm_layer_bwd.register_fake
def _(dout, dh_n, dc_n, gates, cells, out, h0, c0, w_hh, batch_sizes, reverse):
    return (dout.new_empty(dout.shape[0], 4 * h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            w_hh.new_empty(w_hh.shape))


def _no_saved(name: str):
    return RuntimeError(f"{name}: backward needs the forward's saved gates; it ran with save=False (the Python layer "
                        "sets save=True whenever an input requires grad)")


def _lstm_layer_setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, batch_sizes, reverse, save = inputs
    out, _h_n, _c_n, gates, cells = output
    ctx.save_for_backward(gates, cells, out, h0, c0, w_hh, batch_sizes, x, w_ih)
    ctx.reverse, ctx.save, ctx.has_bias = reverse, save, bias is not None
    ctx.forced_backend = forced_backend()
    _unused_grads_as_none(ctx)


def _lstm_layer_backward(ctx, dout, dh_n, dc_n, _dgates, _dcells):
    gates, cells, out, h0, c0, w_hh, batch_sizes, x, w_ih = ctx.saved_tensors
    if not ctx.save:
        raise _no_saved("lstm_layer_fwd")
    dout = torch.zeros_like(out) if dout is None else dout
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
    with _forced(ctx):
        dpre, dh0, dc0, dw_hh = torch.ops.mltoolkit.lstm_layer_bwd(dout, dh_n, dc_n, gates, cells, out, h0, c0, w_hh,
                                                                   batch_sizes, ctx.reverse)
    # The input projection's gradients (the op ran x @ w_ih^T + bias itself when given w_ih).
    needs = ctx.needs_input_grad
    dx = dw_ih = dbias = None
    if w_ih is None:
        dx = dpre
    else:
        dx = _ext.onednn_mm(dpre, w_ih) if needs[0] else None
        dw_ih = _ext.gemm_tn(dpre, x) if needs[3] else None
    if ctx.has_bias and needs[5]:
        dbias = dpre.sum(0)
    return dx, dh0, dc0, dw_ih, dw_hh, dbias, None, None, None


lstm_layer_fwd.register_autograd(_lstm_layer_backward, setup_context=_lstm_layer_setup)


@torch.library.custom_op("mltoolkit::gru_layer_fwd", mutates_args=())
def gru_layer_fwd(x_proj: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Optional[Tensor],
                  reverse: bool, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, h_n, saved = _run("gru_layer_forward", x_proj.contiguous(), h0.contiguous(), w_hh.contiguous(), _c(b_hh),
                           batch_sizes, reverse, save)
    return out, h_n, saved


@gru_layer_fwd.register_fake
def _(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, save):
    _layer_fake_checks("gru_layer_fwd", x_proj, h0, 3)
    rows, hidden = x_proj.shape[0], h0.shape[1]
    return (x_proj.new_empty(rows, hidden), h0.new_empty(h0.shape),
            x_proj.new_empty((rows, 4 * hidden) if save else (0,)))


@torch.library.custom_op("mltoolkit::gru_layer_bwd", mutates_args=())
def gru_layer_bwd(dout: Tensor, dh_n: Tensor, saved: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor,
                  batch_sizes: Optional[Tensor], reverse: bool,
                  has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dh0, dw, db = _run("gru_layer_backward", dout.contiguous(), dh_n.contiguous(), saved.contiguous(),
                           out.contiguous(), h0.contiguous(), w_hh.contiguous(), batch_sizes, reverse, has_bias)
    return dx, dh0, dw, (db if db is not None else _empty(dout))


@gru_layer_bwd.register_fake
def _(dout, dh_n, saved, out, h0, w_hh, batch_sizes, reverse, has_bias):
    return (dout.new_empty(dout.shape[0], 3 * h0.shape[1]), h0.new_empty(h0.shape), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0] if has_bias else 0))


def _gru_layer_setup(ctx, inputs, output):
    _x_proj, h0, w_hh, b_hh, batch_sizes, reverse, save = inputs
    out, _h_n, saved = output
    ctx.save_for_backward(saved, out, h0, w_hh, batch_sizes)
    ctx.reverse, ctx.save, ctx.has_bias = reverse, save, b_hh is not None
    ctx.forced_backend = forced_backend()
    _unused_grads_as_none(ctx)


def _gru_layer_backward(ctx, dout, dh_n, _dsaved):
    saved, out, h0, w_hh, batch_sizes = ctx.saved_tensors
    if not ctx.save:
        raise _no_saved("gru_layer_fwd")
    dout = torch.zeros_like(out) if dout is None else dout
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    with _forced(ctx):
        dx, dh0, dw, db = torch.ops.mltoolkit.gru_layer_bwd(dout, dh_n, saved, out, h0, w_hh, batch_sizes,
                                                            ctx.reverse, ctx.has_bias)
    return dx, dh0, dw, (db if ctx.has_bias else None), None, None, None


gru_layer_fwd.register_autograd(_gru_layer_backward, setup_context=_gru_layer_setup)


# ---- public API -----------------------------------------------------------------------------------------------

class RNNArgumentError(ValueError, RuntimeError):
    """A bad argument to an LSTM / GRU (a ValueError; also a RuntimeError, which is what torch raises there)."""


def _check_cell(fn: str, input: Tensor, hx: Sequence[Tensor], w_ih: Tensor, w_hh: Tensor, gates: int) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{fn}: input must be a floating tensor, got {input.dtype}")
    hidden = w_hh.shape[1]
    if w_ih.shape != (gates * hidden, input.shape[-1]):
        raise RNNArgumentError(f"{fn}: input.size(-1) must be w_ih.size(1) = {w_ih.shape[1]}, got {input.shape[-1]}"
                               if w_ih.shape[0] == gates * hidden else
                               f"{fn}: w_ih must have shape ({gates}*hidden_size, input_size), got {list(w_ih.shape)}")
    for name, h in zip(("h", "c"), hx):
        if not isinstance(h, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(h).__name__}")
        if h.shape != (input.shape[0], hidden):
            raise RNNArgumentError(f"{fn}: {name} must have shape (batch, hidden_size) = "
                                   f"{[input.shape[0], hidden]}, got {list(h.shape)}")
        if h.dtype != input.dtype:
            raise TypeError(f"{fn}: {name} must have input's dtype {input.dtype}, got {h.dtype}")


def lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, torch.nn.LSTMCell's math: input (B, I), hx = (h, c) each (B, H), w_ih (4H, I), w_hh (4H, H).

    gates = input @ w_ih^T + b_ih + h @ w_hh^T + b_hh (i, f, g, o); c' = sigmoid(f)*c + sigmoid(i)*tanh(g);
    h' = sigmoid(o)*tanh(c'). Returns (h', c').
    """
    _check_cell("lstm_cell", input, hx, w_ih, w_hh, 4)
    h_new, c_new, _ = torch.ops.mltoolkit.lstm_cell_fwd(F.linear(input, w_ih, b_ih), hx[0], hx[1], w_hh, b_hh)
    return h_new, c_new


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    """One GRU step, torch.nn.GRUCell's math: input (B, I), hx (B, H), w_ih (3H, I), w_hh (3H, H). Returns h'."""
    _check_cell("gru_cell", input, (hx,), w_ih, w_hh, 3)
    return torch.ops.mltoolkit.gru_cell_fwd(F.linear(input, w_ih, b_ih), hx, w_hh, b_hh)[0]


def _project(x: Tensor, w_ih: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ w_ih^T + bias over every time step at once. Forward-only float32 CPU calls that the C++ backend serves go
    through oneDNN's matmul with w_ih reordered to its blocked layout (the same path the C++ kernel takes for the
    recurrent GEMM; ~15% faster than F.linear's MKL sgemm at (4096 x 512) @ (512 x 2048) on the dev VM); everything
    else (autograd, compile, other devices and dtypes) takes F.linear."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and not _ext.needs_grad(x, w_ih, bias) and x.shape[0] > 0
            and torch.backends.mkldnn.is_available() and _ext.plain_eager(x, w_ih, bias)
            and LSTM.select(x).name == "cpp"):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w_ih, x.shape[0])
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
        except (RuntimeError, AttributeError):
            pass
    return F.linear(x, w_ih, bias)


def _lstm_proj_direction(x_proj: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Tensor,
                         batch_sizes: Optional[Tensor], reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One layer-direction of an LSTM with projections, step by step: the fused cell op (recurrent GEMM with
    w_hh (4H, P) + gate math) gives h' (rows, H) and c, then h = h' @ w_hr^T (rows, P). Rows are laid out as in the
    layer ops (csrc/lstm.h): x_proj (N, 4H) with batch_sizes, or T steps of B rows. h0 (B, P), c0 (B, H).
    Returns (out (N, P), h_n (B, P), c_n (B, H)); autograd runs through the cell op and F.linear."""
    batch = h0.shape[0]
    if batch_sizes is None:
        sizes = [batch] * (x_proj.shape[0] // batch) if batch else []
    else:
        sizes = [int(b) for b in batch_sizes.tolist()]
        if sum(sizes) != x_proj.shape[0]:
            raise RNNArgumentError(f"lstm: batch_sizes sum to {sum(sizes)} but the input has {x_proj.shape[0]} rows")
    # One split, not a slice per step: a slice's backward writes a zero-filled (N, 4H) gradient per step (T^2 work).
    x_steps = x_proj.split(sizes) if sizes else ()
    outs: list[Optional[Tensor]] = [None] * len(sizes)
    finished_h, finished_c = [], []  # forward: final states of the sequences that ended, from the last row up
    if reverse:
        h, c, running = h0[:0], c0[:0], 0
    else:
        h, c, running = h0, c0, batch
    for t in (range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))):
        rows = sizes[t]
        if rows > running:  # reverse: sequences of length t + 1 start here from their initial state
            h = h0[:rows] if running == 0 else torch.cat([h, h0[running:rows]])
            c = c0[:rows] if running == 0 else torch.cat([c, c0[running:rows]])
        elif rows < running:  # forward: the sequences of rows [rows, running) ended at step t - 1
            finished_h.append(h[rows:])
            finished_c.append(c[rows:])
            h, c = h[:rows], c[:rows]
        running = rows
        h_cell, c, _ = torch.ops.mltoolkit.lstm_cell_fwd(x_steps[t], h, c, w_hh, None)
        h = F.linear(h_cell, w_hr)
        outs[t] = h
    if running < batch and reverse:
        finished_h.append(h0[running:])
        finished_c.append(c0[running:])
    h_n = torch.cat([h, *reversed(finished_h)]) if finished_h else h
    c_n = torch.cat([c, *reversed(finished_c)]) if finished_c else c
    out = torch.cat(outs) if outs else x_proj.new_empty(0, w_hr.shape[0])
    return out, h_n, c_n


def _layers(mode: str, x: Tensor, batch_sizes: Optional[Tensor], hx: Sequence[Tensor], params: Sequence[Tensor],
            has_biases: bool, num_layers: int, dropout: float, train: bool, bidirectional: bool, proj: bool = False):
    """Runs the stacked layers on rows x (N, I) laid out as a PackedSequence's data (or a flattened (T, B, I));
    hx: h0 (and c0 for the LSTM), each (layers * directions, B, H) (h0 (.., B, P) with projections: then every
    layer-direction's params end with w_hr (P, H)). Returns (out (N, D*H) or (N, D*P), [h_n], [c_n])."""
    dirs = 2 if bidirectional else 1
    per = (4 if has_biases else 2) + (1 if proj else 0)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, *rest = params[k * per:(k + 1) * per]
            b_ih, b_hh = rest[:2] if has_biases else (None, None)
            reverse = d == 1
            bias = b_ih + b_hh if mode == "lstm" and has_biases else None  # both LSTM biases, added once
            if mode == "lstm" and proj:
                out, h, c = _lstm_proj_direction(_project(x, w_ih, bias), hx[0][k], hx[1][k], w_hh, rest[-1],
                                                 batch_sizes, reverse)
                c_n.append(c)
            elif mode == "lstm":
                save = _ext.needs_grad(x, w_ih, bias, hx[0], hx[1], w_hh)
                out, h, c, _, _ = torch.ops.mltoolkit.lstm_layer_fwd(x, hx[0][k], hx[1][k], w_ih, w_hh, bias,
                                                                     batch_sizes, reverse, save)
                c_n.append(c)
            else:
                x_proj = _project(x, w_ih, b_ih)
                save = _ext.needs_grad(x_proj, hx[0], w_hh, b_hh)
                out, h, _ = torch.ops.mltoolkit.gru_layer_fwd(x_proj, hx[0][k], w_hh, b_hh, batch_sizes, reverse,
                                                              save)
            outs.append(out)
            h_n.append(h)
        x = outs[0] if dirs == 1 else torch.cat(outs, 1)
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    return x, h_n, c_n


def _check_seq(fn: str, input: Tensor, batch_sizes: Optional[Tensor], hx: Sequence[Tensor], params: Sequence[Tensor],
               has_biases: bool, num_layers: int, bidirectional: bool, batch_first: bool) -> bool:
    """Checks the arguments; returns whether the params are those of an LSTM with projections (a w_hr after each
    layer-direction's w_ih, w_hh[, b_ih, b_hh], as in torch.nn.LSTM(proj_size > 0)._flat_weights)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    want_dim = 2 if batch_sizes is not None else 3
    if input.dim() != want_dim:
        raise RNNArgumentError(f"{fn}: input must be {want_dim}-D, got shape {list(input.shape)}")
    per = 4 if has_biases else 2
    dirs = 2 if bidirectional else 1
    groups = num_layers * dirs
    proj = fn == "lstm" and len(params) == (per + 1) * groups
    if len(params) != per * groups and not proj:
        also = f" ({(per + 1) * groups} with projections)" if fn == "lstm" else ""
        raise RNNArgumentError(f"{fn}: params must hold {per * groups} tensors{also}, got {len(params)}")
    w_ih0, w_hh0 = params[0], params[1]
    gates = 4 if fn == "lstm" else 3
    hidden = w_hh0.shape[0] // gates
    width = w_hh0.shape[1]  # of h: hidden, or proj_size
    if proj:
        for k in range(groups):
            w_hh, w_hr = params[k * (per + 1) + 1], params[k * (per + 1) + per]
            if w_hr.dim() != 2 or w_hr.shape[1] != w_hh.shape[0] // 4 or w_hh.shape[1] != w_hr.shape[0]:
                raise RNNArgumentError(f"{fn}: with projections, w_hr must have shape (proj_size, hidden_size) and "
                                       f"w_hh (4*hidden_size, proj_size); got w_hr {list(w_hr.shape)} and w_hh "
                                       f"{list(w_hh.shape)} for layer-direction {k}")
    elif w_hh0.shape[1] != hidden:
        raise RNNArgumentError(f"{fn}: w_hh must have shape ({gates}*hidden_size, hidden_size), got "
                               f"{list(w_hh0.shape)}")
    if input.shape[-1] != w_ih0.shape[1]:
        raise RNNArgumentError(f"{fn}: input.size(-1) must be equal to input_size. Expected {w_ih0.shape[1]}, "
                               f"got {input.shape[-1]}")
    if input.dtype != w_ih0.dtype:
        raise TypeError(f"{fn}: input must have the parameters' dtype {w_ih0.dtype}, got {input.dtype}")
    if input.device != w_ih0.device:
        raise RNNArgumentError(f"{fn}: input is on {input.device} but the parameters are on {w_ih0.device}")
    batch = int(batch_sizes[0]) if batch_sizes is not None else input.shape[0 if batch_first else 1]
    for name, h in zip(("h0", "c0"), hx):
        size, size_name = (width, "proj_size") if proj and name == "h0" else (hidden, "hidden_size")
        if h.shape != (groups, batch, size):
            raise RNNArgumentError(f"{fn}: {name} must have shape (num_layers * num_directions, batch, {size_name}) "
                                   f"= {[groups, batch, size]}, got {list(h.shape)}")
        if h.dtype != input.dtype:
            raise TypeError(f"{fn}: {name} must have input's dtype {input.dtype}, got {h.dtype}")
        if h.device != input.device:
            raise RNNArgumentError(f"{fn}: {name} is on {h.device} but input is on {input.device}")
    return proj


def _sequence(mode, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
              batch_sizes):
    fn = mode
    proj = _check_seq(fn, input, batch_sizes, hx, params, has_biases, num_layers, bidirectional, batch_first)
    if batch_sizes is not None:
        if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64:
            batch_sizes = batch_sizes.to("cpu", torch.int64)
        out, h_n, c_n = _layers(mode, input, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
                                bidirectional, proj)
    else:
        seq = input.transpose(0, 1) if batch_first else input
        steps, batch = seq.shape[0], seq.shape[1]
        out, h_n, c_n = _layers(mode, seq.reshape(steps * batch, seq.shape[2]), None, hx, params, has_biases,
                                num_layers, dropout, train, bidirectional, proj)
        out = out.view(steps, batch, out.shape[1])
        out = out.transpose(0, 1) if batch_first else out
    return (out, torch.stack(h_n), *((torch.stack(c_n),) if mode == "lstm" else ()))


def lstm_sequence(input: Tensor, hx: Sequence[Tensor], params: Sequence[Tensor], has_biases: bool, num_layers: int,
         dropout: float, train: bool, bidirectional: bool, batch_first: bool = False,
         batch_sizes: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """A stacked LSTM over a sequence, torch's _VF.lstm arguments: input (T, B, I) ((B, T, I) with batch_first), or
    the (N, I) data of a PackedSequence with its batch_sizes; hx = (h0, c0), each (layers * directions, B, H);
    params: per layer and direction w_ih, w_hh[, b_ih, b_hh] (torch.nn.LSTM's _flat_weights order).
    With projections (torch.nn.LSTM(proj_size=P)): each layer-direction's params end with w_hr (P, H), w_hh is
    (4H, P), h0 is (layers * directions, B, P), and the output (.., D*P).
    Returns (output (T, B, D*H) or (N, D*H), h_n, c_n)."""
    return _sequence("lstm", input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                     batch_sizes)


def gru_sequence(input: Tensor, hx: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int, dropout: float,
        train: bool, bidirectional: bool, batch_first: bool = False,
        batch_sizes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """A stacked GRU over a sequence, torch's _VF.gru arguments (see `lstm`); hx = h0. Returns (output, h_n)."""
    return _sequence("gru", input, (hx,), params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                     batch_sizes)
