"""Triton multi-tensor AdamW step: one launch updates every tensor of a list (the contract is csrc/fused_adam.h).

The host builds a small device table: per tensor the addresses of p, g, m, v (and vmax), its size and its three
step coefficients (computed in double as torch does, rounded to float32); per program a (tensor, start) chunk. A
program updates CHUNK elements of one tensor in BLOCK-wide steps. Math is float32 (fp16 / bf16 tensors are widened
on load, rounded on store); sqrt and division are IEEE-rounded (sqrt_rn, div_rn) so float32 results follow torch's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mltoolkit.ops.reference.fused_adam import step_coefficients

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _fused_adamw_kernel(addr_ptr, numel_ptr, coef_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
                        w1, beta2, c2, eps, DTYPE: tl.constexpr, SMALL_W: tl.constexpr, DECAY: tl.constexpr,
                        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    numel = tl.load(numel_ptr + t)
    p_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(addr_ptr + n_tensors + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(addr_ptr + 2 * n_tensors + t).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(addr_ptr + 3 * n_tensors + t).to(tl.pointer_type(DTYPE))
    decay = tl.load(coef_ptr + t)
    neg_step_size = tl.load(coef_ptr + n_tensors + t)
    bc2_sqrt = tl.load(coef_ptr + 2 * n_tensors + t)
    if SMALL_W:
        coeff = w1
    else:
        coeff = w1 - 1.0
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if DECAY:
            p = p * decay
        if SMALL_W:
            m = tl.fma(g - m, coeff, m)
        else:
            m = tl.fma(g - m, coeff, g)
        v = v * beta2
        v = v + c2 * g * g
        if AMSGRAD:
            vmax_ptr = tl.load(addr_ptr + 4 * n_tensors + t).to(tl.pointer_type(DTYPE))
            vmax = tl.maximum(tl.load(vmax_ptr + idx, mask=mask, other=0.0).to(tl.float32), v,
                              propagate_nan=tl.PropagateNan.ALL)
            tl.store(vmax_ptr + idx, vmax.to(DTYPE), mask=mask)
            d = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
        else:
            d = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, d)
        tl.store(p_ptr + idx, p.to(DTYPE), mask=mask)
        tl.store(m_ptr + idx, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + idx, v.to(DTYPE), mask=mask)


def fused_adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, chunk: int = 4096, block: int = 1024) -> None:
    """Host launcher: increments state_steps, then one kernel launch per dtype present in params."""
    coefs = []
    for s in state_steps:
        s += 1
        coefs.append(step_coefficients(s.item(), lr, beta1, beta2, weight_decay))
    device = params[0].device
    if device.type == "cpu":  # the interpreter: tiny chunks keep it quick
        chunk, block = 64, 32
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            by_dtype.setdefault(p.dtype, []).append(i)
    w1 = 1.0 - beta1
    for dtype, idx in by_dtype.items():
        n = len(idx)
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
        addrs = [lst[i].data_ptr() for lst in lists for i in idx]
        numel = [params[i].numel() for i in idx]
        coef = ([coefs[i][0] for i in idx] + [-coefs[i][1] for i in idx] + [coefs[i][2] for i in idx])
        chunk_tensor, chunk_start = [], []
        for k in range(n):
            for s in range(0, numel[k], chunk):
                chunk_tensor.append(k)
                chunk_start.append(s)
        host = (torch.tensor(addrs, dtype=torch.int64), torch.tensor(numel, dtype=torch.int64),
                torch.tensor(coef, dtype=torch.float32), torch.tensor(chunk_tensor, dtype=torch.int32),
                torch.tensor(chunk_start, dtype=torch.int64))
        dev = [h.to(device, non_blocking=True) if device.type != "cpu" else h for h in host]
        _fused_adamw_kernel[(len(chunk_tensor),)](
            *dev, n, float(torch.tensor(w1, dtype=torch.float32)), float(torch.tensor(beta2, dtype=torch.float32)),
            float(torch.tensor(1.0 - beta2, dtype=torch.float32)), float(torch.tensor(eps, dtype=torch.float32)),
            DTYPE=_TL_DTYPES[dtype], SMALL_W=abs(w1) < 0.5, DECAY=weight_decay != 0, AMSGRAD=amsgrad,
            MAXIMIZE=maximize, CHUNK=chunk, BLOCK=block)
