"""Triton multi-tensor 8-bit AdamW step: one launch updates every block of every tensor of a list (the contract is
csrc/fused_adam8bit.h).

The host builds a small device table: per tensor the addresses of p, g, the two code tensors and the two absmax
tensors, its size and its three step coefficients (computed in double as torch does, rounded to float32); one
program per 256-value block. A program gathers the moments from the 256-entry maps, updates in float32 (fp16 / bf16
params are widened on load and rounded on store), reduces the block's new absmax, and requantizes with a branchless
binary search over the 255 float32 midpoints (8 gathers from a 1 KiB table that stays in L1/L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mltoolkit.ops.reference.fused_adam import step_coefficients
from mltoolkit.ops.reference.fused_adam8bit import BLOCK, midpoints, num_blocks

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _search(x, mid_ptr):
    """#(mid < x) over the 255 sorted midpoints: the nearest map code, ties to the smaller one."""
    code = tl.zeros(x.shape, dtype=tl.int32)
    for k in tl.static_range(8):
        step = 128 >> k
        mid = tl.load(mid_ptr + code + (step - 1))
        code = tl.where(x > mid, code + step, code)
    return code


@triton.jit
def _fused_adamw8bit_kernel(addr_ptr, numel_ptr, coef_ptr, blk_tensor_ptr, blk_index_ptr, n_tensors, qs_ptr, qu_ptr,
                            mid_s_ptr, mid_u_ptr, w1, beta2, c2, eps, DTYPE: tl.constexpr, SMALL_W: tl.constexpr,
                            DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor_ptr + pid)
    b = tl.load(blk_index_ptr + pid)
    numel = tl.load(numel_ptr + t)
    p_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(addr_ptr + n_tensors + t).to(tl.pointer_type(DTYPE))
    mc_ptr = tl.load(addr_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.uint8))
    ma_ptr = tl.load(addr_ptr + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
    vc_ptr = tl.load(addr_ptr + 4 * n_tensors + t).to(tl.pointer_type(tl.uint8))
    va_ptr = tl.load(addr_ptr + 5 * n_tensors + t).to(tl.pointer_type(tl.float32))
    decay = tl.load(coef_ptr + t)
    neg_step_size = tl.load(coef_ptr + n_tensors + t)
    bc2_sqrt = tl.load(coef_ptr + 2 * n_tensors + t)
    idx = b * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    mcode = tl.load(mc_ptr + idx, mask=mask, other=0).to(tl.int32)
    vcode = tl.load(vc_ptr + idx, mask=mask, other=0).to(tl.int32)
    m = tl.load(qs_ptr + mcode) * tl.load(ma_ptr + b)
    v = tl.load(qu_ptr + vcode) * tl.load(va_ptr + b)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if DECAY:
        p = p * decay
    if SMALL_W:
        m = tl.fma(g - m, w1, m)
    else:
        m = tl.fma(g - m, w1 - 1.0, g)
    v = tl.fma(c2 * g, g, v * beta2)
    d = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, d)
    tl.store(p_ptr + idx, p.to(DTYPE), mask=mask)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    am = tl.max(tl.abs(m), axis=0)
    av = tl.max(tl.abs(v), axis=0)
    sm = tl.where(am > 0, am, 1.0)
    sv = tl.where(av > 0, av, 1.0)
    mcode = _search(tl.div_rn(m, sm), mid_s_ptr)
    vcode = _search(tl.div_rn(v, sv), mid_u_ptr)
    tl.store(mc_ptr + idx, mcode.to(tl.uint8), mask=mask)
    tl.store(vc_ptr + idx, vcode.to(tl.uint8), mask=mask)
    tl.store(ma_ptr + b, am)
    tl.store(va_ptr + b, av)


def f32(x: float) -> float:
    """x rounded to float32 (the kernels' scalar arguments, as the CPU kernels round them)."""
    return float(torch.tensor(x, dtype=torch.float32))


def device_maps(qmap_signed, qmap_unsigned, device):
    """(signed map, unsigned map, their midpoints) as contiguous float32 tensors on `device`."""
    qs = qmap_signed.to(device=device, dtype=torch.float32).contiguous()
    qu = qmap_unsigned.to(device=device, dtype=torch.float32).contiguous()
    return qs, qu, midpoints(qs).contiguous(), midpoints(qu).contiguous()


def params_by_dtype(params) -> dict:
    """Indices of the non-empty params, grouped by dtype (one launch series per dtype)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            by_dtype.setdefault(p.dtype, []).append(i)
    return by_dtype


def block_tables(lists, idx):
    """For params lists[0][i], i in idx: the data addresses of every list (list-major), the element counts, and per
    256-value block its tensor (position in idx) and block index, plus each tensor's first block (len(idx) + 1)."""
    addrs = [lst[i].data_ptr() for lst in lists for i in idx]
    numel = [lists[0][i].numel() for i in idx]
    blk_tensor, blk_index, blk_start = [], [], [0]
    for k, n in enumerate(numel):
        nb = num_blocks(n)
        blk_tensor += [k] * nb
        blk_index += range(nb)
        blk_start.append(blk_start[-1] + nb)
    return addrs, numel, blk_tensor, blk_index, blk_start


def fused_adamw8bit_step(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                         state_steps, qmap_signed, qmap_unsigned, lr, beta1, beta2, weight_decay, eps,
                         maximize) -> None:
    """Host launcher: increments state_steps, then one kernel launch per dtype present in params."""
    coefs = []
    for s in state_steps:
        s += 1
        coefs.append(step_coefficients(s.item(), lr, beta1, beta2, weight_decay))
    device = params[0].device
    qs, qu, mid_s, mid_u = device_maps(qmap_signed, qmap_unsigned, device)
    w1 = 1.0 - beta1
    lists = [params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    for dtype, idx in params_by_dtype(params).items():
        addrs, numel, blk_tensor, blk_index, _ = block_tables(lists, idx)
        coef = [coefs[i][0] for i in idx] + [-coefs[i][1] for i in idx] + [coefs[i][2] for i in idx]
        host = (torch.tensor(addrs, dtype=torch.int64), torch.tensor(numel, dtype=torch.int64),
                torch.tensor(coef, dtype=torch.float32), torch.tensor(blk_tensor, dtype=torch.int32),
                torch.tensor(blk_index, dtype=torch.int64))
        dev = [h.to(device, non_blocking=True) if device.type != "cpu" else h for h in host]
        _fused_adamw8bit_kernel[(len(blk_tensor),)](
            *dev, len(idx), qs, qu, mid_s, mid_u, f32(w1), f32(beta2), f32(1.0 - beta2), f32(eps),
            DTYPE=_TL_DTYPES[dtype], SMALL_W=abs(w1) < 0.5, DECAY=weight_decay != 0, MAXIMIZE=maximize,
            BLOCK=BLOCK)
