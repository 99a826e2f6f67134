"""LSTM / GRU gate math as Triton kernels: the pointwise part of a recurrent step, forward and backward.

The contract is csrc/lstm.h's (mltoolkit/ops/lstm.py is the only caller; it runs the step loop with torch GEMMs
and these kernels). Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n). Every tensor is contiguous,
rows x (k * H); arithmetic in float32 (float64 for float64 tensors). One program takes a (BLOCK_R, BLOCK_H) tile
of (rows, H) and reads each gate's columns of it, so a row's four (three) gate blocks meet in registers.

    lstm_pointwise_forward(pre (R, 4H), c (R, H), bias (4H) | None) -> (h', c', activated gates (R, 4H))
    lstm_pointwise_backward(dh, dc | None, gates, c, c_new) -> (d pre-activations (R, 4H), dc_prev (R, H))
    gru_pointwise_forward(x_proj (R, 3H), gh (R, 3H), h (R, H)) -> (h', saved = (r, z, n, gh_n) (R, 4H))
    gru_pointwise_backward(dh, saved, h) -> (dx_proj (R, 3H), dgh (R, 3H), dh_direct = dh * z)
"""
import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1 (no tanh in triton.language that runs under the interpreter too)
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _tile(R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < R) & (cols[None, :] < H)
    return rows[:, None].to(tl.int64), cols[None, :], mask


@triton.jit
def _lstm_fwd_kernel(PRE, C, BIAS, H_OUT, C_OUT, GATES, R, H, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r, j, mask = _tile(R, H, BLOCK_R, BLOCK_H)
    g_off = r * 4 * H + j
    pi = tl.load(PRE + g_off, mask=mask, other=0.0).to(ACC)
    pf = tl.load(PRE + g_off + H, mask=mask, other=0.0).to(ACC)
    pg = tl.load(PRE + g_off + 2 * H, mask=mask, other=0.0).to(ACC)
    po = tl.load(PRE + g_off + 3 * H, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        bmask = j < H
        pi += tl.load(BIAS + j, mask=bmask, other=0.0).to(ACC)
        pf += tl.load(BIAS + H + j, mask=bmask, other=0.0).to(ACC)
        pg += tl.load(BIAS + 2 * H + j, mask=bmask, other=0.0).to(ACC)
        po += tl.load(BIAS + 3 * H + j, mask=bmask, other=0.0).to(ACC)
    i, f, g, o = _sigmoid(pi), _sigmoid(pf), _tanh(pg), _sigmoid(po)
    s_off = r * H + j
    c = f * tl.load(C + s_off, mask=mask, other=0.0).to(ACC) + i * g
    h = o * _tanh(c)
    tl.store(C_OUT + s_off, c, mask=mask)
    tl.store(H_OUT + s_off, h, mask=mask)
    tl.store(GATES + g_off, i, mask=mask)
    tl.store(GATES + g_off + H, f, mask=mask)
    tl.store(GATES + g_off + 2 * H, g, mask=mask)
    tl.store(GATES + g_off + 3 * H, o, mask=mask)


@triton.jit
def _lstm_bwd_kernel(DH, DC, GATES, C, C_NEW, DPRE, DC_PREV, R, H, HAS_DC: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r, j, mask = _tile(R, H, BLOCK_R, BLOCK_H)
    s_off = r * H + j
    g_off = r * 4 * H + j
    dh = tl.load(DH + s_off, mask=mask, other=0.0).to(ACC)
    i = tl.load(GATES + g_off, mask=mask, other=0.0).to(ACC)
    f = tl.load(GATES + g_off + H, mask=mask, other=0.0).to(ACC)
    g = tl.load(GATES + g_off + 2 * H, mask=mask, other=0.0).to(ACC)
    o = tl.load(GATES + g_off + 3 * H, mask=mask, other=0.0).to(ACC)
    tc = _tanh(tl.load(C_NEW + s_off, mask=mask, other=0.0).to(ACC))
    dc = dh * o * (1.0 - tc * tc)
    if HAS_DC:
        dc += tl.load(DC + s_off, mask=mask, other=0.0).to(ACC)
    c = tl.load(C + s_off, mask=mask, other=0.0).to(ACC)
    tl.store(DPRE + g_off, dc * g * i * (1.0 - i), mask=mask)
    tl.store(DPRE + g_off + H, dc * c * f * (1.0 - f), mask=mask)
    tl.store(DPRE + g_off + 2 * H, dc * i * (1.0 - g * g), mask=mask)
    tl.store(DPRE + g_off + 3 * H, dh * tc * o * (1.0 - o), mask=mask)
    tl.store(DC_PREV + s_off, dc * f, mask=mask)


@triton.jit
def _gru_fwd_kernel(X, GH, HP, H_OUT, SAVED, R, H, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    r, j, mask = _tile(R, H, BLOCK_R, BLOCK_H)
    x_off = r * 3 * H + j
    rr = _sigmoid(tl.load(X + x_off, mask=mask, other=0.0).to(ACC) + tl.load(GH + x_off, mask=mask, other=0.0).to(ACC))
    z = _sigmoid(tl.load(X + x_off + H, mask=mask, other=0.0).to(ACC)
                 + tl.load(GH + x_off + H, mask=mask, other=0.0).to(ACC))
    ghn = tl.load(GH + x_off + 2 * H, mask=mask, other=0.0).to(ACC)
    n = _tanh(tl.load(X + x_off + 2 * H, mask=mask, other=0.0).to(ACC) + rr * ghn)
    s_off = r * H + j
    h = (1.0 - z) * n + z * tl.load(HP + s_off, mask=mask, other=0.0).to(ACC)
    tl.store(H_OUT + s_off, h, mask=mask)
    v_off = r * 4 * H + j
    tl.store(SAVED + v_off, rr, mask=mask)
    tl.store(SAVED + v_off + H, z, mask=mask)
    tl.store(SAVED + v_off + 2 * H, n, mask=mask)
    tl.store(SAVED + v_off + 3 * H, ghn, mask=mask)


@triton.jit
def _gru_bwd_kernel(DH, SAVED, HP, DX, DGH, DH_DIRECT, R, H, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    r, j, mask = _tile(R, H, BLOCK_R, BLOCK_H)
    s_off = r * H + j
    v_off = r * 4 * H + j
    dh = tl.load(DH + s_off, mask=mask, other=0.0).to(ACC)
    rr = tl.load(SAVED + v_off, mask=mask, other=0.0).to(ACC)
    z = tl.load(SAVED + v_off + H, mask=mask, other=0.0).to(ACC)
    n = tl.load(SAVED + v_off + 2 * H, mask=mask, other=0.0).to(ACC)
    ghn = tl.load(SAVED + v_off + 3 * H, mask=mask, other=0.0).to(ACC)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (tl.load(HP + s_off, mask=mask, other=0.0).to(ACC) - n) * z * (1.0 - z)
    dr = dn * ghn * rr * (1.0 - rr)
    x_off = r * 3 * H + j
    tl.store(DX + x_off, dr, mask=mask)
    tl.store(DX + x_off + H, dz, mask=mask)
    tl.store(DX + x_off + 2 * H, dn, mask=mask)
    tl.store(DGH + x_off, dr, mask=mask)
    tl.store(DGH + x_off + H, dz, mask=mask)
    tl.store(DGH + x_off + 2 * H, dn * rr, mask=mask)
    tl.store(DH_DIRECT + s_off, dh * z, mask=mask)


# ---- launchers ----------------------------------------------------------------------------------------------

def _acc(dtype: torch.dtype):
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton lstm kernels take float32 or float64, got {dtype}")
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(rows: int, hidden: int):
    block_h = min(128, next_power_of_2(max(hidden, 1)))
    block_r = max(1, min(next_power_of_2(max(rows, 1)), 2048 // block_h))
    return (cdiv(rows, block_r), cdiv(hidden, block_h)), dict(BLOCK_R=block_r, BLOCK_H=block_h)


def _check(name: str, t: torch.Tensor, shape, like: torch.Tensor) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must be {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    return t.contiguous()


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else _NoDevice()


class _NoDevice:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def lstm_pointwise_forward(pre, c, bias=None):
    acc = _acc(pre.dtype)
    rows, hidden = c.shape
    pre = _check("pre", pre, (rows, 4 * hidden), pre)
    c = _check("c", c, (rows, hidden), pre)
    if bias is not None:
        bias = _check("bias", bias, (4 * hidden,), pre)
    h_out, c_out, gates = torch.empty_like(c), torch.empty_like(c), torch.empty_like(pre)
    if rows and hidden:
        grid, blocks = _grid(rows, hidden)
        with _on(pre.device):
            _lstm_fwd_kernel[grid](pre, c, bias if bias is not None else pre, h_out, c_out, gates, rows, hidden,
                                   HAS_BIAS=bias is not None, ACC=acc, **blocks)
    return h_out, c_out, gates


def lstm_pointwise_backward(dh, dc, gates, c, c_new):
    acc = _acc(dh.dtype)
    rows, hidden = dh.shape
    dh = dh.contiguous()
    gates = _check("gates", gates, (rows, 4 * hidden), dh)
    c, c_new = _check("c", c, (rows, hidden), dh), _check("c_new", c_new, (rows, hidden), dh)
    if dc is not None:
        dc = _check("dc", dc, (rows, hidden), dh)
    dpre, dc_prev = torch.empty_like(gates), torch.empty_like(c)
    if rows and hidden:
        grid, blocks = _grid(rows, hidden)
        with _on(dh.device):
            _lstm_bwd_kernel[grid](dh, dc if dc is not None else dh, gates, c, c_new, dpre, dc_prev, rows, hidden,
                                   HAS_DC=dc is not None, ACC=acc, **blocks)
    return dpre, dc_prev


def gru_pointwise_forward(x_proj, gh, h):
    acc = _acc(h.dtype)
    rows, hidden = h.shape
    h = h.contiguous()
    x_proj, gh = _check("x_proj", x_proj, (rows, 3 * hidden), h), _check("gh", gh, (rows, 3 * hidden), h)
    h_out, saved = torch.empty_like(h), h.new_empty(rows, 4 * hidden)
    if rows and hidden:
        grid, blocks = _grid(rows, hidden)
        with _on(h.device):
            _gru_fwd_kernel[grid](x_proj, gh, h, h_out, saved, rows, hidden, ACC=acc, **blocks)
    return h_out, saved


def gru_pointwise_backward(dh, saved, h):
    acc = _acc(dh.dtype)
    rows, hidden = dh.shape
    dh = dh.contiguous()
    saved, h = _check("saved", saved, (rows, 4 * hidden), dh), _check("h", h, (rows, hidden), dh)
    dx, dgh, dh_direct = dh.new_empty(rows, 3 * hidden), dh.new_empty(rows, 3 * hidden), torch.empty_like(dh)
    if rows and hidden:
        grid, blocks = _grid(rows, hidden)
        with _on(dh.device):
            _gru_bwd_kernel[grid](dh, saved, h, dx, dgh, dh_direct, rows, hidden, ACC=acc, **blocks)
    return dx, dgh, dh_direct
