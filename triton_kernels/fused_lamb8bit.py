"""Triton multi-tensor 8-bit LAMB step (contract: csrc/fused_lamb8bit.h; the only caller is
mltoolkit/ops/fused_lamb8bit.py). Three launches per dtype present in the list, none waiting on the host:

    _lamb8bit_pass1_kernel  one program per 256-value block of any tensor (a device table of addresses as the 8-bit
                            AdamW kernel has): dequantize m, v, update them, compute u; write the block's sums of
                            p^2 and u^2 to its own slot. Nothing else is written.
    _lamb8bit_trust_kernel  one program per tensor: adds its blocks' slots in order (float64), trust ratio and
                            scale = float32(lr * trust) into a device tensor (deterministic: no atomics)
    _lamb8bit_pass2_kernel  one program per block: recomputes m, v, u from the same old codes (same bits), p -= u *
                            scale, requantizes m, v (absmax, IEEE division, binary search over the 255 midpoints)

Pass 2 recomputes u instead of storing it: on a GPU a stored float32 u costs 8 bytes of traffic per element (write
+ read) and a parameter-sized buffer, recomputing it costs re-reading 2 code bytes and p, g (which pass 2 reads
anyway for p) and some arithmetic. The kernels run with enable_fp_fusion=False and div_rn / sqrt_rn so that every
product and sum is rounded on its own, as the contract says.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mltoolkit.ops.reference.fused_adam8bit import BLOCK
from mltoolkit.ops.reference.fused_lamb8bit import coefficients

from .fused_adam8bit import _TL_DTYPES, _search, block_tables, device_maps, f32, params_by_dtype

TRUST_CHUNK = 1024


@triton.jit
def _block_update(addr_ptr, numel_ptr, blk_tensor_ptr, blk_index_ptr, n_tensors, qs_ptr, qu_ptr, b1, b3, b2, c2,
                  ibc1, ibc2, eps, wd, DTYPE: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr):
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
    idx = b * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    mcode = tl.load(mc_ptr + idx, mask=mask, other=0).to(tl.int32)
    vcode = tl.load(vc_ptr + idx, mask=mask, other=0).to(tl.int32)
    m = tl.load(qs_ptr + mcode) * tl.load(ma_ptr + b)
    v = tl.load(qu_ptr + vcode) * tl.load(va_ptr + b)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = m * b1 + g * b3
    v = v * b2 + (g * g) * c2
    u = tl.div_rn(m * ibc1, tl.sqrt_rn(v * ibc2) + eps)
    if DECAY:
        u = u + p * wd
    u = tl.where(mask, u, 0.0)
    return t, b, idx, mask, p, m, v, u, p_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr


@triton.jit
def _lamb8bit_pass1_kernel(addr_ptr, numel_ptr, blk_tensor_ptr, blk_index_ptr, n_tensors, qs_ptr, qu_ptr, part_ptr,
                           b1, b3, b2, c2, ibc1, ibc2, eps, wd, DTYPE: tl.constexpr, DECAY: tl.constexpr,
                           BLOCK: tl.constexpr):
    t, b, idx, mask, p, m, v, u, p_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr = _block_update(
        addr_ptr, numel_ptr, blk_tensor_ptr, blk_index_ptr, n_tensors, qs_ptr, qu_ptr, b1, b3, b2, c2, ibc1, ibc2,
        eps, wd, DTYPE, DECAY, BLOCK)
    pid = tl.program_id(0)
    tl.store(part_ptr + 2 * pid, tl.sum(p * p, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(u * u, axis=0))


@triton.jit
def _lamb8bit_trust_kernel(part_ptr, blk_start_ptr, scale_ptr, hyper_ptr, USE_TRUST: tl.constexpr,
                           CHUNK: tl.constexpr):
    lr = tl.load(hyper_ptr)  # float64, as the contract's lr * trust
    max_trust_ratio = tl.load(hyper_ptr + 1)
    t = tl.program_id(0)
    start = tl.load(blk_start_ptr + t)
    end = tl.load(blk_start_ptr + t + 1)
    pp = tl.zeros((), dtype=tl.float64)
    uu = tl.zeros((), dtype=tl.float64)
    for s in range(start, end, CHUNK):
        k = s + tl.arange(0, CHUNK)
        mk = k < end
        pp += tl.sum(tl.load(part_ptr + 2 * k, mask=mk, other=0.0).to(tl.float64), axis=0)
        uu += tl.sum(tl.load(part_ptr + 2 * k + 1, mask=mk, other=0.0).to(tl.float64), axis=0)
    w = tl.sqrt(pp)
    n = tl.sqrt(uu)
    trust = tl.full((), 1.0, tl.float64)
    if USE_TRUST:
        trust = tl.where((w > 0) & (n > 0), w / tl.where(n > 0, n, 1.0), trust)
    if max_trust_ratio > 0:
        trust = tl.minimum(trust, max_trust_ratio)
    tl.store(scale_ptr + t, (trust * lr).to(tl.float32))


@triton.jit
def _lamb8bit_pass2_kernel(addr_ptr, numel_ptr, blk_tensor_ptr, blk_index_ptr, n_tensors, qs_ptr, qu_ptr, mid_s_ptr,
                           mid_u_ptr, scale_ptr, b1, b3, b2, c2, ibc1, ibc2, eps, wd, DTYPE: tl.constexpr,
                           DECAY: tl.constexpr, BLOCK: tl.constexpr):
    t, b, idx, mask, p, m, v, u, p_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr = _block_update(
        addr_ptr, numel_ptr, blk_tensor_ptr, blk_index_ptr, n_tensors, qs_ptr, qu_ptr, b1, b3, b2, c2, ibc1, ibc2,
        eps, wd, DTYPE, DECAY, BLOCK)
    scale = tl.load(scale_ptr + t)
    p = p - u * scale
    tl.store(p_ptr + idx, p.to(DTYPE), mask=mask)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    am = tl.max(tl.abs(m), axis=0)
    av = tl.max(tl.abs(v), axis=0)
    sm = tl.where(am > 0, am, 1.0)
    sv = tl.where(av > 0, av, 1.0)
    tl.store(mc_ptr + idx, _search(tl.div_rn(m, sm), mid_s_ptr).to(tl.uint8), mask=mask)
    tl.store(vc_ptr + idx, _search(tl.div_rn(v, sv), mid_u_ptr).to(tl.uint8), mask=mask)
    tl.store(ma_ptr + b, am)
    tl.store(va_ptr + b, av)


def fused_lamb8bit_step(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                        qmap_signed, qmap_unsigned, lr, beta1, beta2, eps, weight_decay, step, bias_correction,
                        grad_averaging, use_trust_ratio, max_trust_ratio) -> None:
    """Host launcher: three launches per dtype present in params (empty tensors are skipped)."""
    device = params[0].device
    qs, qu, mid_s, mid_u = device_maps(qmap_signed, qmap_unsigned, device)
    c = coefficients(lr, beta1, beta2, weight_decay, step, bias_correction, grad_averaging)
    consts = [f32(c[k]) for k in ("b1", "b3", "b2", "c2", "ibc1", "ibc2")] + [f32(eps), f32(weight_decay)]
    opts = {"enable_fp_fusion": False}  # every product and sum rounded on its own (no fma contraction)
    hyper = torch.tensor([lr, max_trust_ratio], dtype=torch.float64).to(device)
    lists = [params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    for dtype, idx in params_by_dtype(params).items():
        addrs, numel, blk_tensor, blk_index, blk_start = block_tables(lists, idx)
        host = (torch.tensor(addrs, dtype=torch.int64), torch.tensor(numel, dtype=torch.int64),
                torch.tensor(blk_tensor, dtype=torch.int32), torch.tensor(blk_index, dtype=torch.int64),
                torch.tensor(blk_start, dtype=torch.int64))
        addr, numels, btensor, bindex, bstart = (h.to(device, non_blocking=True) if device.type != "cpu" else h
                                                 for h in host)
        nblk = len(blk_tensor)
        part = torch.empty(2 * nblk, dtype=torch.float32, device=device)
        scale = torch.empty(len(idx), dtype=torch.float32, device=device)
        common = dict(DTYPE=_TL_DTYPES[dtype], DECAY=weight_decay != 0, BLOCK=BLOCK, **opts)
        _lamb8bit_pass1_kernel[(nblk,)](addr, numels, btensor, bindex, len(idx), qs, qu, part, *consts, **common)
        _lamb8bit_trust_kernel[(len(idx),)](part, bstart, scale, hyper,
                                            USE_TRUST=bool(use_trust_ratio), CHUNK=TRUST_CHUNK, **opts)
        _lamb8bit_pass2_kernel[(nblk,)](addr, numels, btensor, bindex, len(idx), qs, qu, mid_s, mid_u, scale,
                                        *consts, **common)
