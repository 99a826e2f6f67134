"""Plain-PyTorch 8-bit AdamW step (block-wise quantized moments, Dettmers et al. 2022): the oracle of
mltoolkit.ops.fused_adam8bit and its fallback backend (any float dtype, any device). The contract is
csrc/fused_adam8bit.h; the quantization maps and the block-wise (de)quantizers live here and are shared by every
backend (the kernels receive the maps as tensors, so all backends use the same 256 float32 values)."""
from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor

from mltoolkit.ops.reference.fused_adam import step_coefficients

BLOCK = 256  # values per absmax block


def _dynamic_map(signed: bool) -> list[float]:
    """Dynamic tree map of 256 sorted values in [-1, 1] (signed) or [0, 1] (unsigned): the leading zeros of the
    code pick a decimal exponent 10^-6 .. 10^0, the bits after the first one a linear fraction of that decade
    (more fraction bits for larger exponents); plus 0 and 1. The signed map has no -1 (255 non-zero values)."""
    values: list[float] = [0.0, 1.0]
    for e in range(7):  # decades 10^-6 .. 10^0
        count = 2**e if signed else 2 ** (e + 1)  # fraction values in this decade
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        values += mids + ([-x for x in mids] if signed else [])
    assert len(values) == 256, len(values)
    return sorted(values)


@cache
def _maps_cpu() -> tuple[Tensor, Tensor]:
    return (torch.tensor(_dynamic_map(True), dtype=torch.float32),
            torch.tensor(_dynamic_map(False), dtype=torch.float32))


def quantization_maps(device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(signed map for exp_avg, unsigned map for exp_avg_sq): two sorted float32 tensors of 256 values."""
    s, u = _maps_cpu()
    return s.to(device), u.to(device)


def midpoints(qmap: Tensor) -> Tensor:
    """The 255 decision boundaries (qmap[k] + qmap[k+1]) * 0.5 in float32: a value x gets the code
    #(boundaries < x), i.e. the nearest map value, a tie going to the smaller one."""
    return (qmap[:-1] + qmap[1:]) * 0.5


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def quantize_blockwise(x: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    """Float tensor -> (uint8 codes, flat, in x's row-major order; float32 absmax per block of BLOCK values).
    A block's values are divided by its absmax (1 for an all-zero block) and each is given its nearest map code."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = num_blocks(n) * BLOCK - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    xn = blocks / scale[:, None]
    codes = torch.searchsorted(midpoints(qmap.to(flat.device)), xn.contiguous(), side="left")
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """(codes, absmax) -> float32 values qmap[code] * absmax[block], flat."""
    n = codes.numel()
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return qmap.to(codes.device)[codes.reshape(-1).long()] * scale


@torch.no_grad()
def fused_adamw8bit_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg_codes: Sequence[Tensor],
                     exp_avg_absmax: Sequence[Tensor], exp_avg_sq_codes: Sequence[Tensor],
                     exp_avg_sq_absmax: Sequence[Tensor], state_steps: Sequence[Tensor], qmap_signed: Tensor,
                     qmap_unsigned: Tensor, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                     maximize: bool) -> None:
    """One 8-bit AdamW step for every i, in place (csrc/fused_adam8bit.h): dequantize the moments, update them and
    the parameter in float32 with torch.optim.AdamW's operations, requantize the new moments block by block."""
    for i, param in enumerate(params):
        step_t = state_steps[i]
        step_t += 1
        if param.numel() == 0:
            continue
        decay, step_size, bc2_sqrt = step_coefficients(step_t.item(), lr, beta1, beta2, weight_decay)
        p = param.detach().reshape(-1).float()
        g = grads[i].reshape(-1).float()
        if maximize:
            g = -g
        m = dequantize_blockwise(exp_avg_codes[i], exp_avg_absmax[i], qmap_signed)
        v = dequantize_blockwise(exp_avg_sq_codes[i], exp_avg_sq_absmax[i], qmap_unsigned)
        if weight_decay != 0:
            p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        param.copy_(p.view(param.shape))
        for codes, absmax, x, qmap in ((exp_avg_codes[i], exp_avg_absmax[i], m, qmap_signed),
                                       (exp_avg_sq_codes[i], exp_avg_sq_absmax[i], v, qmap_unsigned)):
            c, a = quantize_blockwise(x, qmap)
            codes.copy_(c.view(codes.shape))
            absmax.copy_(a)
