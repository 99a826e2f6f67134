"""Quantized drop-in replacements of nn.Linear. Their state_dicts hold the quantized tensors in a device-neutral form
(what `save_quantized` writes); kernel-specific layouts (the CPU int8 kernel's packed weight) are derived on use and
cached, never saved."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mltoolkit import _ext, ops
from mltoolkit.ops import int8 as int8_ops
from mltoolkit.quantization.config import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig


def _bias_buffer(linear: Optional[nn.Linear], out_features: int, device, dtype) -> Optional[Tensor]:
    if linear is not None:
        return None if linear.bias is None else linear.bias.detach().clone()
    return torch.zeros(out_features, device=device, dtype=dtype)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (one float32 scale per output channel) and x quantized to int8 per token at run
    time; the int8 x int8 products are summed exactly in int32 and dequantized in the kernel's epilogue
    (ops.int8_linear_dynamic). Output in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", _bias_buffer(None, out_features, device, dtype) if bias else None)
        self._packed: Optional[tuple[tuple, Tensor]] = None

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Optional[Int8DynamicActivationInt8WeightConfig] = None):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                linear.weight.dtype)
        wq, scale = ops.quantize_per_channel(linear.weight.detach())
        q.weight_int8.copy_(wq)
        q.weight_scale.copy_(scale)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        return q

    def _weight(self) -> Tensor:
        """The CPU VNNI kernel's packed layout (packed once per weight version), the plain int8 weight elsewhere
        (other CPU paths would unpack it on every call)."""
        w = self.weight_int8
        if w.device.type != "cpu" or not _ext.plain_eager(w) or int8_ops.isa() != "vnni":
            return w  # traced or compiled: no cache, the plain weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, ops.int8_pack_weight(w))
        return self._packed[1]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ops.int8_linear_dynamic(x, self._weight(), self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """y = x W'^T + b with W' the 4-bit weight dequantized inside the kernel: groups of `group_size` input features,
    each with a float32 scale and zero point (ops.int4_weight_only_linear, contract in csrc/int4_linear.h).
    Differentiable in x (and so usable under a trainable adapter); the quantized weight is frozen."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"Int4Linear: in_features {in_features} must be a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight_packed",
                             torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("bias", _bias_buffer(None, out_features, device, dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Optional[Int4WeightOnlyConfig] = None):
        group = (config or Int4WeightOnlyConfig()).group_size
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group, linear.weight.device,
                linear.weight.dtype)
        packed, scales, zeros = ops.quantize_int4(linear.weight.detach(), group)
        q.weight_packed.copy_(packed)
        q.weight_scales.copy_(scales)
        q.weight_zeros.copy_(zeros)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        return q

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ops.int4_weight_only_linear(x, self.weight_packed, self.weight_scales, self.weight_zeros,
                                           self.group_size, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


MODULE_FOR_CONFIG = {Int8DynamicActivationInt8WeightConfig: Int8Linear, Int4WeightOnlyConfig: Int4Linear}


def empty_module(linear: nn.Linear, config) -> nn.Module:
    """A quantized module of linear's shape for `config`, its tensors to be filled by load_state_dict."""
    cls = MODULE_FOR_CONFIG[type(config)]
    kw = {"group_size": config.group_size} if isinstance(config, Int4WeightOnlyConfig) else {}
    return cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
               dtype=linear.weight.dtype, **kw)
