"""Fused multi-tensor 8-bit AdamW step: the moments are kept as uint8 codes of the dynamic (tree) quantization maps
with one float32 absmax per block of 256 values (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"), 2 * (1 + 4/256) bytes of state per parameter instead of 8.

    torch.ops.mltoolkit.fused_adamw8bit_(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                         exp_avg_sq_absmax, state_steps, qmap_signed, qmap_unsigned,
                                         lr, beta1, beta2, weight_decay, eps, maximize) -> ()

One call dequantizes, updates (torch.optim.AdamW's float32 arithmetic) and requantizes every block of every tensor
of the lists, in place; the contract is csrc/fused_adam8bit.h. Backends: C++ CPU (float32, contiguous), CUDA C++
(csrc/cuda/fused_adam8bit.cu: float32 / bf16 / fp16 params, codes and absmax equal to the C++ kernel's), Triton
(CUDA; CPU only when forced under TRITON_INTERPRET=1; float32 / bf16 / fp16 params, float32 math), and the
plain-PyTorch reference (anything else; the oracle). mltoolkit.optim.AdamW(..., state_bits=8) is the user-facing
optimizer; `new_state`, `quantize_state` and `dequantize_state` convert between 32-bit and 8-bit state.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops.reference import fused_adam8bit as reference
from mltoolkit.ops.reference.fused_adam8bit import (
    BLOCK,
    dequantize_blockwise,
    num_blocks,
    quantization_maps,
    quantize_blockwise,
)

__all__ = ["fused_adamw8bit_", "BLOCK", "quantization_maps", "quantize_blockwise", "dequantize_blockwise",
           "new_state", "quantize_state", "dequantize_state", "STATE_KEYS", "adamw8bit_step",
           "uses_8bit_state", "state_to_32bit"]

FUSED_ADAMW8BIT = table("fused_adamw8bit")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATE_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


def _state_ok(p, i, lists) -> Optional[str]:
    mc, ma, vc, va = (lst[i] for lst in lists)
    nb = num_blocks(p.numel())
    for name, t, dtype, n in (("exp_avg_codes", mc, torch.uint8, p.numel()), ("exp_avg_sq_codes", vc, torch.uint8,
                              p.numel()), ("exp_avg_absmax", ma, torch.float32, nb),
                              ("exp_avg_sq_absmax", va, torch.float32, nb)):
        if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != p.device:
            return f"{name}[{i}] is not a contiguous {dtype} tensor of {n} elements on {p.device}"
    return None


def _cpp_supports(params, grads, mc=None, ma=None, vc=None, va=None, *_) -> Optional[str]:
    for i, p in enumerate(params):
        if p.device.type != "cpu":
            return f"needs CPU tensors, got params[{i}] on {p.device.type}"
        if p.dtype != torch.float32 or grads[i].dtype != torch.float32:
            return f"float32 only, got params[{i}] / grads[{i}] of {p.dtype} / {grads[i].dtype}"
        if not p.is_contiguous() or not grads[i].is_contiguous():
            return f"params[{i}] or grads[{i}] is not contiguous"
        if mc is not None and _state_ok(p, i, (mc, ma, vc, va)):
            return _state_ok(p, i, (mc, ma, vc, va))
    return None


def _triton_supports(params, grads, mc=None, ma=None, vc=None, va=None, *_) -> Optional[str]:
    why = _ext.triton_device(params[0]) if params else None
    if why is not None:
        return why
    for i, p in enumerate(params):
        if p.device != params[0].device:
            return f"params on several devices ({params[0].device}, {p.device})"
        if p.dtype not in TRITON_DTYPES or grads[i].dtype != p.dtype:
            return f"float32 / float16 / bfloat16 params with grads of their dtype only, got params[{i}] of {p.dtype}"
        if not p.is_contiguous() or not grads[i].is_contiguous():
            return f"params[{i}] or grads[{i}] is not contiguous"
        if mc is not None and _state_ok(p, i, (mc, ma, vc, va)):
            return _state_ok(p, i, (mc, ma, vc, va))
    return None


def _cuda_supports(params, grads, mc=None, ma=None, vc=None, va=None, *_) -> Optional[str]:
    """csrc/cuda/fused_adam8bit.cu: CUDA tensors of one device, float32 / float16 / bfloat16 params with grads of
    their dtype, contiguous (state lists may be left out, as for _cpp_supports)."""
    for i, p in enumerate(params):
        if not p.is_cuda:
            return f"needs CUDA tensors, got params[{i}] on {p.device.type}"
        if p.device != params[0].device:
            return f"params on several devices ({params[0].device}, {p.device})"
        if p.dtype not in TRITON_DTYPES or grads[i].dtype != p.dtype:
            return f"float32 / float16 / bfloat16 params with grads of their dtype only, got params[{i}] of {p.dtype}"
        if not p.is_contiguous() or not grads[i].is_contiguous():
            return f"params[{i}] or grads[{i}] is not contiguous"
        if mc is not None and _state_ok(p, i, (mc, ma, vc, va)):
            return _state_ok(p, i, (mc, ma, vc, va))
    return None


def _cuda_unavailable() -> Optional[str]:
    if _ext.cuda_unavailable():
        return _ext.cuda_unavailable()
    if hasattr(_ext._C, "fused_adamw8bit_cuda"):
        return None
    return "mltoolkit._C predates fused_adamw8bit_cuda; rebuild it"


def _triton_kernels():
    from mltoolkit.triton_kernels import fused_adam8bit as triton_fused_adam8bit

    return triton_fused_adam8bit


def _cpp_unavailable() -> Optional[str]:
    if _ext.cpp_unavailable():
        return _ext.cpp_unavailable()
    return None if hasattr(_ext._C, "fused_adamw8bit_cpu") else "mltoolkit._C predates fused_adamw8bit_cpu; rebuild it"


FUSED_ADAMW8BIT.register("cpp", _cpp_supports, _cpp_unavailable, step=lambda *a: _ext._C.fused_adamw8bit_cpu(*a))
# CUDA C++ ahead of Triton for CUDA tensors (the order is the default; to be settled by an H100 measurement).
FUSED_ADAMW8BIT.register("cuda", _cuda_supports, _cuda_unavailable,
                         step=lambda *a: _ext._C.fused_adamw8bit_cuda(*a))
FUSED_ADAMW8BIT.register("triton", _triton_supports, _ext.triton_unavailable,
                         step=lambda *a: _triton_kernels().fused_adamw8bit_step(*a))
FUSED_ADAMW8BIT.register("reference", lambda *_: None, step=reference.fused_adamw8bit_)


def check_8bit_lists(fn: str, params, grads, mc, ma, vc, va, qs, qu, extra: tuple = ()) -> None:
    """The argument checks shared by the 8-bit optimizer ops (fused_adamw8bit_, fused_lamb8bit_): list lengths (and
    those of `extra`, (name, list) pairs), the quantization maps, and each tensor's dtype, shape, device, layout."""
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avg_codes", mc), ("exp_avg_absmax", ma), ("exp_avg_sq_codes", vc),
                      ("exp_avg_sq_absmax", va), *extra):
        if len(lst) != n:
            raise ValueError(f"{fn}: {name} has {len(lst)} tensors, params has {n}")
    for name, q in (("qmap_signed", qs), ("qmap_unsigned", qu)):
        if q.dtype != torch.float32 or q.numel() != 256:
            raise ValueError(f"{fn}: {name} must be a float32 tensor of 256 values, got {q.dtype} of {q.numel()}")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"{fn}: params[{i}] must be a floating-point tensor, got {p.dtype}")
        g = grads[i]
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(f"{fn}: grads[{i}] is sparse ({g.layout}); dense gradients only")
        if g.shape != p.shape or g.device != p.device:
            raise ValueError(f"{fn}: grads[{i}] has shape {tuple(g.shape)} on {g.device}, params[{i}] has "
                             f"{tuple(p.shape)} on {p.device}")
        for name, lst, dtype, numel in (("exp_avg_codes", mc, torch.uint8, p.numel()),
                                        ("exp_avg_sq_codes", vc, torch.uint8, p.numel()),
                                        ("exp_avg_absmax", ma, torch.float32, num_blocks(p.numel())),
                                        ("exp_avg_sq_absmax", va, torch.float32, num_blocks(p.numel()))):
            t = lst[i]
            if t.dtype != dtype:
                raise TypeError(f"{fn}: {name}[{i}] must be {dtype}, got {t.dtype}")
            if t.numel() != numel or not t.is_contiguous() or t.device != p.device:
                raise ValueError(f"{fn}: {name}[{i}] must be a contiguous tensor of {numel} elements on "
                                 f"{p.device}, got {t.numel()} on {t.device}")


def _check_args(params, grads, mc, ma, vc, va, steps, qs, qu) -> None:
    check_8bit_lists("fused_adamw8bit_", params, grads, mc, ma, vc, va, qs, qu, extra=(("state_steps", steps),))
    for i in range(len(params)):
        if steps[i].numel() != 1 or not steps[i].is_floating_point():
            raise ValueError(f"fused_adamw8bit_: state_steps[{i}] must be a one-element float tensor")


@torch.library.custom_op("mltoolkit::fused_adamw8bit_",
                         mutates_args=("params", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                       "exp_avg_sq_absmax", "state_steps"))
def fused_adamw8bit_(params: list[Tensor], grads: list[Tensor], exp_avg_codes: list[Tensor],
                     exp_avg_absmax: list[Tensor], exp_avg_sq_codes: list[Tensor], exp_avg_sq_absmax: list[Tensor],
                     state_steps: list[Tensor], qmap_signed: Tensor, qmap_unsigned: Tensor, lr: float, beta1: float,
                     beta2: float, weight_decay: float, eps: float, maximize: bool) -> None:
    """One 8-bit AdamW step over lists of tensors, in place (see the module docstring and csrc/fused_adam8bit.h)."""
    args = (params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, state_steps)
    _check_args(*args, qmap_signed, qmap_unsigned)
    if not params:
        return
    FUSED_ADAMW8BIT.select(*args).kernels["step"](*args, qmap_signed, qmap_unsigned, lr, beta1, beta2,
                                                   weight_decay, eps, maximize)


@fused_adamw8bit_.register_fake
def _(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, state_steps, qmap_signed,
      qmap_unsigned, lr, beta1, beta2, weight_decay, eps, maximize):
    n = len(params)
    torch._check(all(len(x) == n for x in (grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                           exp_avg_sq_absmax, state_steps)),
                 lambda: "fused_adamw8bit_: all tensor lists must have params' length")
    return None


def new_state(p: Tensor) -> dict[str, Tensor]:
    """Zero 8-bit moments for parameter p (codes of 0.0, absmax 0), keyed as in mltoolkit.optim.AdamW's state."""
    qs, qu = quantization_maps()
    n, nb = p.numel(), num_blocks(p.numel())
    zero_s = int(torch.searchsorted(qs, torch.tensor(0.0)))
    return {"exp_avg_codes": torch.full((n,), zero_s, dtype=torch.uint8, device=p.device),
            "exp_avg_absmax": torch.zeros(nb, dtype=torch.float32, device=p.device),
            "exp_avg_sq_codes": torch.zeros(n, dtype=torch.uint8, device=p.device),
            "exp_avg_sq_absmax": torch.zeros(nb, dtype=torch.float32, device=p.device)}


def quantize_state(exp_avg: Tensor, exp_avg_sq: Tensor) -> dict[str, Tensor]:
    """32-bit moments (torch.optim.AdamW's exp_avg, exp_avg_sq) -> the 8-bit state entries."""
    qs, qu = quantization_maps(exp_avg.device)
    mc, ma = quantize_blockwise(exp_avg, qs)
    vc, va = quantize_blockwise(exp_avg_sq, qu)
    return {"exp_avg_codes": mc, "exp_avg_absmax": ma, "exp_avg_sq_codes": vc, "exp_avg_sq_absmax": va}


def dequantize_state(state: dict[str, Tensor], like: Tensor) -> dict[str, Tensor]:
    """8-bit state entries -> {"exp_avg", "exp_avg_sq"} in `like`'s dtype and shape (the moments a 32-bit
    AdamW or torch.optim.AdamW keeps; exact up to the 8-bit quantization already applied)."""
    qs, qu = quantization_maps(state["exp_avg_codes"].device)
    m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], qs)
    v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], qu)
    return {"exp_avg": m.view(like.shape).to(like.dtype), "exp_avg_sq": v.view(like.shape).to(like.dtype)}


# ---- mltoolkit.optim.AdamW(state_bits=8): the optimizer side, called from AdamW.step ----

_MAPS: dict[torch.device, tuple[Tensor, Tensor]] = {}


def maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """The (signed, unsigned) quantization maps on `device`, made once per device (shared with 8-bit LAMB)."""
    if device not in _MAPS:
        _MAPS[device] = quantization_maps(device)
    return _MAPS[device]


def uses_8bit_state(p: Tensor, group: dict) -> bool:
    """Whether AdamW keeps 8-bit moments for p: the group asks for state_bits=8, p is real floating point and has
    at least min_8bit_size elements (smaller tensors, e.g. biases and norms, keep float32 moments as
    bitsandbytes does: their state is small and they are the most sensitive to quantization)."""
    return (group.get("state_bits", 32) == 8 and p.is_floating_point() and not torch.is_complex(p)
            and p.numel() >= group.get("min_8bit_size", 4096))


def _state8_of(state: dict, p: Tensor) -> dict:
    if "exp_avg" in state:  # 32-bit moments (a state_dict of a 32-bit AdamW / torch.optim.AdamW): convert once
        if "max_exp_avg_sq" in state:
            raise RuntimeError("AdamW(state_bits=8): the loaded state has max_exp_avg_sq (amsgrad), which 8-bit "
                               "state does not support")
        converted = quantize_state(state.pop("exp_avg"), state.pop("exp_avg_sq"))
        state.update(converted)
    if "exp_avg_codes" not in state:
        state.update(new_state(p))
        state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
    step = state["step"]
    if step.device.type != "cpu" or step.dtype != torch.float32 or step.dim() != 0:
        state["step"] = step.detach().reshape(()).to("cpu", torch.float32)
    for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        if state[k].dtype != torch.float32:
            raise RuntimeError(f"AdamW(state_bits=8): state {k} must be float32, got {state[k].dtype}")
    return state


@torch.no_grad()
def adamw8bit_step(optimizer_state: dict, group: dict, params: list[Tensor], lr: float) -> None:
    """One 8-bit AdamW step for `params` (all with gradients, all uses_8bit_state) of one param group: one
    fused_adamw8bit_ call per (device, dtype)."""
    beta1, beta2 = group["betas"]
    buckets: dict[tuple, list[list[Tensor]]] = {}
    for p in params:
        state = _state8_of(optimizer_state[p], p)
        grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
        lists = buckets.setdefault((p.device, p.dtype), [[] for _ in range(7)])
        for lst, t in zip(lists, (p, grad, state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"],
                                  state["exp_avg_sq_absmax"], state["step"])):
            lst.append(t)
    for (device, _), lists in buckets.items():
        qs, qu = maps(device)
        torch.ops.mltoolkit.fused_adamw8bit_(*lists, qs, qu, float(lr), float(beta1), float(beta2),
                                             float(group["weight_decay"]), float(group["eps"]),
                                             bool(group["maximize"]))


def state_to_32bit(state_dict: dict, params: Optional[list[Tensor]] = None) -> dict:
    """A copy of an 8-bit AdamW state_dict whose 8-bit moments are dequantized to float32 exp_avg / exp_avg_sq,
    loadable by AdamW(state_bits=32) and torch.optim.AdamW. `params` (in the optimizer's order) give the shapes and
    dtypes; without them the moments are flat float32 tensors (torch.optim.AdamW then needs the shapes)."""
    out = dict(state_dict)
    out["state"] = {}
    for k, st in state_dict["state"].items():
        st = dict(st)
        if "exp_avg_codes" in st:
            like = params[k] if params is not None else torch.empty(st["exp_avg_codes"].shape)
            eight = {key: st.pop(key) for key in STATE_KEYS}
            eight["exp_avg_absmax"] = _as_float32(eight["exp_avg_absmax"])
            eight["exp_avg_sq_absmax"] = _as_float32(eight["exp_avg_sq_absmax"])
            st.update(dequantize_state(eight, like))
        out["state"][k] = st
    out["param_groups"] = [{k: v for k, v in g.items() if k not in ("state_bits", "min_8bit_size")}
                           for g in state_dict["param_groups"]]
    return out


def _as_float32(t: Tensor) -> Tensor:
    return t.view(torch.float32) if t.dtype == torch.int32 else t.float()


def load_state_dict_pre_hook(optimizer, state_dict: dict) -> dict:
    """torch.optim.Optimizer.load_state_dict casts every non-step state tensor to its parameter's dtype, which
    would turn the uint8 codes into floats and the float32 absmax into bf16 for a bf16 model: the 8-bit entries are
    taken out of the state_dict here and put back unchanged (moved to the parameter's device) by the post hook.
    The groups keep the loading optimizer's state_bits / min_8bit_size: 32-bit state loaded into an 8-bit AdamW is
    quantized on its first step; 8-bit state loaded into a 32-bit AdamW raises a clear error at its first step
    (convert it with state_to_32bit)."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_map = dict(zip(saved_ids, params))
    out = dict(state_dict)
    # state_bits / min_8bit_size are the loading optimizer's choice, not the checkpoint's
    out["param_groups"] = []
    for saved, cur in zip(state_dict["param_groups"], optimizer.param_groups):
        g = {k: v for k, v in saved.items() if k not in ("state_bits", "min_8bit_size")}
        g.update({k: cur[k] for k in ("state_bits", "min_8bit_size") if k in cur})
        out["param_groups"].append(g)
    out["state"] = {}
    pending = []
    for k, st in state_dict["state"].items():
        if any(key in st for key in STATE_KEYS) and k in id_map:
            st = dict(st)
            pending.append((id_map[k], {key: st.pop(key) for key in STATE_KEYS if key in st}))
        out["state"][k] = st
    optimizer._adam8bit_pending = pending
    return out


def load_state_dict_post_hook(optimizer) -> None:
    for p, eight in getattr(optimizer, "_adam8bit_pending", ()):
        optimizer.state[p].update({k: v.to(p.device) for k, v in eight.items()})
    optimizer._adam8bit_pending = []
