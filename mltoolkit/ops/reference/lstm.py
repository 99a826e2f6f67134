"""Plain-PyTorch LSTM / GRU cells and layers.

Two layers, as for the other families: the cell formulas (`lstm_pointwise_*`, `gru_pointwise_*`) and the step
loops (`*_layer_forward` / `*_layer_backward`) implement the kernel contract of csrc/lstm.h with explicit formulas and
serve as the `reference` backend (the Triton backend runs the same loops with its own pointwise kernels, passed as
`pointwise`); `lstm_cell` / `gru_cell` are autograd oracles for tests.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# ---- pointwise gate math (the part the fused kernels replace) -------------------------------------------------

def lstm_pointwise_forward(pre: Tensor, c: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """pre (rows, 4H) = x_proj + h @ W_hh^T, c (rows, H) -> (h', c', activated gates (i, f, g, o))."""
    if bias is not None:
        pre = pre + bias
    i, f, g, o = pre.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new, torch.cat([i, f, g, o], 1)


def lstm_pointwise_backward(dh: Tensor, dc: Optional[Tensor], gates: Tensor, c: Tensor,
                            c_new: Tensor) -> tuple[Tensor, Tensor]:
    """-> (d pre-activations (rows, 4H), dc (rows, H))."""
    i, f, g, o = gates.chunk(4, 1)
    tc = torch.tanh(c_new)
    dct = dh * o * (1 - tc * tc)
    if dc is not None:
        dct = dct + dc
    dpre = torch.cat([dct * g * i * (1 - i), dct * c * f * (1 - f), dct * i * (1 - g * g), dh * tc * o * (1 - o)], 1)
    return dpre, dct * f


def gru_pointwise_forward(x_proj: Tensor, gh: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """x_proj, gh (rows, 3H) (gh = h @ W_hh^T + b_hh), h (rows, H) -> (h', saved (r, z, n, gh_n))."""
    xr, xz, xn = x_proj.chunk(3, 1)
    hr, hz, hn = gh.chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h, torch.cat([r, z, n, hn], 1)


def gru_pointwise_backward(dh: Tensor, saved: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx_proj (rows, 3H), dgh (rows, 3H), dh_direct = dh * z)."""
    r, z, n, hn = saved.chunk(4, 1)
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    return torch.cat([dr, dz, dn], 1), torch.cat([dr, dz, dn * r], 1), dh * z


class Pointwise(NamedTuple):
    lstm_forward: object = lstm_pointwise_forward
    lstm_backward: object = lstm_pointwise_backward
    gru_forward: object = gru_pointwise_forward
    gru_backward: object = gru_pointwise_backward


TORCH_POINTWISE = Pointwise()


# ---- cells (kernel contract) ----------------------------------------------------------------------------------

def lstm_cell_forward(x_proj, h, c, w_hh, b_hh, pointwise: Pointwise = TORCH_POINTWISE):
    return list(pointwise.lstm_forward(torch.addmm(x_proj, h, w_hh.t()), c, b_hh))


def lstm_cell_backward(dh, dc, gates, c, c_new, pointwise: Pointwise = TORCH_POINTWISE):
    return list(pointwise.lstm_backward(dh, dc, gates, c, c_new))


def gru_cell_forward(x_proj, h, w_hh, b_hh, pointwise: Pointwise = TORCH_POINTWISE):
    gh = torch.addmm(b_hh, h, w_hh.t()) if b_hh is not None else h @ w_hh.t()
    return list(pointwise.gru_forward(x_proj, gh, h))


def gru_cell_backward(dh, saved, h, pointwise: Pointwise = TORCH_POINTWISE):
    return list(pointwise.gru_backward(dh, saved, h))


# ---- layers (kernel contract) ---------------------------------------------------------------------------------

def steps(batch_sizes: Optional[Tensor], rows: int, batch: int) -> list[tuple[int, int]]:
    """(row offset, row count) of each time step (see csrc/lstm.h)."""
    if batch_sizes is None:
        if batch == 0:
            return []
        if rows % batch:
            raise ValueError(f"x_proj rows ({rows}) must be a multiple of the batch B ({batch}) without batch_sizes")
        return [(t * batch, batch) for t in range(rows // batch)]
    out, off = [], 0
    for b in batch_sizes.tolist():
        out.append((off, b))
        off += b
    if off != rows:
        raise ValueError(f"batch_sizes sum to {off} but x_proj has {rows} rows")
    return out


def _order(n: int, reverse: bool) -> range:
    return range(n - 1, -1, -1) if reverse else range(n)


def gather_prev(st: list[tuple[int, int]], src: Tensor, init: Tensor, reverse: bool) -> Tensor:
    """Each row's state before its step: src's row of the previous step, or init's row where a sequence starts."""
    prev = init.new_empty(src.shape[0], init.shape[1])
    for t, (off, bs) in enumerate(st):
        p = t + 1 if reverse else t - 1
        carried = 0 if p < 0 or p >= len(st) else min(bs, st[p][1])
        if carried:
            prev[off:off + carried] = src[st[p][0]:st[p][0] + carried]
        if carried < bs:
            prev[off + carried:off + bs] = init[carried:bs]
    return prev


def lstm_layer_forward(x, h0, c0, w_ih, w_hh, bias, batch_sizes, reverse, save,
                       pointwise: Pointwise = TORCH_POINTWISE):
    if w_ih is not None:
        x_proj = F.linear(x, w_ih, bias)
    else:
        x_proj = x if bias is None else x + bias
    st = steps(batch_sizes, x_proj.shape[0], h0.shape[0])
    hidden = h0.shape[1]
    h, c = h0.clone(), c0.clone()
    out = x_proj.new_empty(x_proj.shape[0], hidden)
    gates = x_proj.new_empty(x_proj.shape if save else (0,))
    cells = x_proj.new_empty((x_proj.shape[0], hidden) if save else (0,))
    w_t = w_hh.t()
    for t in _order(len(st), reverse):
        off, bs = st[t]
        h_new, c_new, act = pointwise.lstm_forward(torch.addmm(x_proj[off:off + bs], h[:bs], w_t), c[:bs], None)
        h[:bs], c[:bs], out[off:off + bs] = h_new, c_new, h_new
        if save:
            gates[off:off + bs], cells[off:off + bs] = act, c_new
    return [out, h, c, gates, cells]


def lstm_layer_backward(dout, dh_n, dc_n, gates, cells, out, h0, c0, w_hh, batch_sizes, reverse,
                        pointwise: Pointwise = TORCH_POINTWISE):
    st = steps(batch_sizes, dout.shape[0], h0.shape[0])
    c_prev = gather_prev(st, cells, c0, reverse)
    dh, dc = dh_n.clone(), dc_n.clone()
    dx = dout.new_empty(dout.shape[0], gates.shape[1])
    for t in reversed(_order(len(st), reverse)):
        off, bs = st[t]
        rows = slice(off, off + bs)
        dpre, dc_rows = pointwise.lstm_backward(dout[rows] + dh[:bs], dc[:bs], gates[rows], c_prev[rows],
                                                cells[rows])
        dx[rows], dc[:bs] = dpre, dc_rows
        dh[:bs] = dpre @ w_hh
    dw = dx.t() @ gather_prev(st, out, h0, reverse)
    return [dx, dh, dc, dw]


def gru_layer_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, save, pointwise: Pointwise = TORCH_POINTWISE):
    st = steps(batch_sizes, x_proj.shape[0], h0.shape[0])
    hidden = h0.shape[1]
    h = h0.clone()
    out = x_proj.new_empty(x_proj.shape[0], hidden)
    saved = x_proj.new_empty((x_proj.shape[0], 4 * hidden) if save else (0,))
    w_t = w_hh.t()
    for t in _order(len(st), reverse):
        off, bs = st[t]
        gh = torch.addmm(b_hh, h[:bs], w_t) if b_hh is not None else h[:bs] @ w_t
        h_new, s = pointwise.gru_forward(x_proj[off:off + bs], gh, h[:bs])
        h[:bs], out[off:off + bs] = h_new, h_new
        if save:
            saved[off:off + bs] = s
    return [out, h, saved]


def gru_layer_backward(dout, dh_n, saved, out, h0, w_hh, batch_sizes, reverse, has_bias,
                       pointwise: Pointwise = TORCH_POINTWISE):
    st = steps(batch_sizes, dout.shape[0], h0.shape[0])
    h_prev = gather_prev(st, out, h0, reverse)
    dh = dh_n.clone()
    dx = dout.new_empty(dout.shape[0], w_hh.shape[0])
    dgh = torch.empty_like(dx)
    for t in reversed(_order(len(st), reverse)):
        off, bs = st[t]
        rows = slice(off, off + bs)
        dx_rows, dgh_rows, dh_direct = pointwise.gru_backward(dout[rows] + dh[:bs], saved[rows], h_prev[rows])
        dx[rows], dgh[rows] = dx_rows, dgh_rows
        dh[:bs] = torch.addmm(dh_direct, dgh_rows, w_hh)
    db = dgh.sum(0) if has_bias else None
    return [dx, dh, dgh.t() @ h_prev, db]


# ---- autograd oracles -----------------------------------------------------------------------------------------

def lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """torch.nn.LSTMCell's math, written out: (h', c')."""
    h, c = hx
    pre = input @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        pre = pre + b_ih
    if b_hh is not None:
        pre = pre + b_hh
    h_new, c_new, _ = lstm_pointwise_forward(pre, c)
    return h_new, c_new


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    """torch.nn.GRUCell's math, written out: h'."""
    x_proj = input @ w_ih.t() + (b_ih if b_ih is not None else 0)
    gh = hx @ w_hh.t() + (b_hh if b_hh is not None else 0)
    return gru_pointwise_forward(x_proj, gh, hx)[0]
