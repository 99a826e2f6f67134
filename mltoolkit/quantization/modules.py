"""Quantized drop-in replacements of nn.Linear (and of nn.Conv2d for the static int8 config). Their state_dicts hold
the quantized tensors in a device-neutral form (what `save_quantized` writes); kernel-specific layouts (the CPU int8
kernel's packed weight) are derived on use and cached, never saved."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mltoolkit import _ext, ops
from mltoolkit.ops import int8 as int8_ops
from mltoolkit.ops.reference.int8 import conv_weight_2d
from mltoolkit.quantization.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    _padding_pair,
)


def _bias_like(bias: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """The bias in x's dtype (Tensor.to costs ~0.8 us even when it returns the tensor itself)."""
    return bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)


def _bias_buffer(linear: Optional[nn.Linear], out_features: int, device, dtype) -> Optional[Tensor]:
    if linear is not None:
        return None if linear.bias is None else linear.bias.detach().clone()
    return torch.zeros(out_features, device=device, dtype=dtype)


def _cpu_packed(module: nn.Module, plain) -> Tensor:
    """module.weight_int8 as the int8 kernel takes it: plain(weight_int8) (an (N, K) int8 matrix), packed for the CPU
    VNNI kernel and kept while the weight is unchanged (_ext.derived); plain elsewhere (traced or compiled calls,
    GPUs, and CPU paths that would unpack the packed layout on every call)."""
    w = module.weight_int8
    if w.device.type != "cpu" or not _ext.plain_eager(w) or not int8_ops.cpu_packing_pays():
        return plain(w)
    return _ext.derived(f"int8 packed {type(module).__name__}", (w,), (), lambda w: ops.int8_pack_weight(plain(w)))


class _Int8WeightLinear(nn.Module):
    """What the int8-weight linears share: buffers weight_int8 (N, K), weight_scale (N,) float32 (symmetric, per
    output channel, from ops.quantize_per_channel) and bias, and from_float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", _bias_buffer(None, out_features, device, dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, config=None):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                linear.weight.dtype)
        wq, scale = ops.quantize_per_channel(linear.weight.detach())
        q.weight_int8.copy_(wq)
        q.weight_scale.copy_(scale)
        if linear.bias is not None:
            q.bias = linear.bias.detach().clone()
        return q

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_Int8WeightLinear):
    """y = x W^T + b with W in int8 (one float32 scale per output channel) and x quantized to int8 per token at run
    time; the int8 x int8 products are summed exactly in int32 and dequantized in the kernel's epilogue
    (ops.int8_linear_dynamic). Output in x's dtype."""

    def _weight(self) -> Tensor:
        return _cpu_packed(self, lambda w: w)

    def forward(self, x: Tensor) -> Tensor:
        bias = _bias_like(self.bias, x)
        return ops.int8_linear_dynamic(x, self._weight(), self.weight_scale, bias)


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
        bias = _bias_like(self.bias, x)
        return ops.int4_weight_only_linear(x, self.weight_packed, self.weight_scales, self.weight_zeros,
                                           self.group_size, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


class Int8WeightOnlyLinear(_Int8WeightLinear):
    """y = x W'^T + b with W' = weight_int8 * weight_scale[:, None] (int8, one float32 scale per output channel)
    converted to float inside the kernel (ops.int8_weight_only_linear, contract in csrc/int8_weight_only_linear.h);
    x stays in its float dtype. Differentiable in x; the quantized weight is frozen."""

    def forward(self, x: Tensor) -> Tensor:
        bias = _bias_like(self.bias, x)
        return ops.int8_weight_only_linear(x, self.weight_int8, self.weight_scale, bias)


def _static_scale(fn: str, input_scale) -> Tensor:
    if input_scale is None:
        raise ValueError(f"{fn}: the static config needs a calibrated input_scale; calibrate with "
                         "mltoolkit.quantization.prepare / calibrate / convert, or quantize_(model, config, "
                         "calibration_data=...)")
    s = torch.as_tensor(input_scale, dtype=torch.float32).detach().reshape(())
    if not (bool(torch.isfinite(s)) and float(s) >= torch.finfo(torch.float32).tiny):
        raise ValueError(f"{fn}: input_scale must be finite and at least FLT_MIN, got {float(s)}")
    return s


class Int8StaticLinear(_Int8WeightLinear):
    """y = x W^T + b with W in int8 (one float32 scale per output channel) and x quantized to int8 with a fixed
    per-tensor scale `input_scale` calibrated ahead of time (ops.int8_linear_static: quantize_static, then the int8 x
    int8 GEMM with exact int32 sums and the dequantize epilogue). Output in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Optional[Int8StaticActivationInt8WeightConfig] = None,
                   input_scale=None):
        scale = _static_scale("Int8StaticLinear.from_float", input_scale)
        q = super().from_float(linear, config)
        q.input_scale.copy_(scale)
        return q

    def _weight(self) -> Tensor:
        return _cpu_packed(self, lambda w: w)

    def forward(self, x: Tensor) -> Tensor:
        bias = _bias_like(self.bias, x)
        return ops.int8_linear_static(x, self.input_scale, self._weight(), self.weight_scale, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={float(self.input_scale):.4g}")


class Int8Conv2d(nn.Module):
    """nn.Conv2d (groups 1, zero padding) with int8 weights (one float32 scale per output channel) and int8 inputs
    quantized with a fixed per-tensor scale `input_scale`: im2col of the int8 input (ops.im2col_int8), the int8 x int8
    GEMM with exact int32 sums, dequantized epilogue with bias (ops.int8_conv2d_static). NCHW or channels_last input;
    the output keeps the input's memory format. state_dict: weight_int8 (OC, C, KH, KW) as nn.Conv2d's weight,
    weight_scale (OC,), input_scale (), bias (OC,)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        if not all(isinstance(p, int) for p in self.padding):
            raise ValueError(f"Int8Conv2d: padding must be ints (symmetric zero padding), got {padding!r}")
        kh, kw = self.kernel_size
        self.register_buffer("weight_int8", torch.zeros(out_channels, in_channels, kh, kw, dtype=torch.int8,
                                                        device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", _bias_buffer(None, out_channels, device, dtype) if bias else None)

    @staticmethod
    def _check(conv: nn.Conv2d) -> tuple[int, int]:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"Int8Conv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        why = Int8StaticActivationInt8WeightConfig().unsupported(conv)
        if why is not None:
            raise ValueError(f"Int8Conv2d: cannot quantize this nn.Conv2d: {why}")
        return _padding_pair(conv)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d) -> Int8Conv2d:
        """An Int8Conv2d of conv's shape, its tensors to be filled by load_state_dict."""
        padding = cls._check(conv)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                   conv.bias is not None, conv.weight.device, conv.weight.dtype)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: Optional[Int8StaticActivationInt8WeightConfig] = None,
                   input_scale=None):
        scale = _static_scale("Int8Conv2d.from_float", input_scale)
        q = cls.empty_like(conv)
        w = conv.weight.detach()
        wq, ws = ops.quantize_per_channel(w.reshape(w.shape[0], -1))  # per-row absmax: any column order
        q.weight_int8.copy_(wq.reshape(w.shape))
        q.weight_scale.copy_(ws)
        q.input_scale.copy_(scale)
        if conv.bias is not None:
            q.bias = conv.bias.detach().clone()
        return q

    def _weight(self) -> Tensor:
        """(OC, KH * KW * C) in im2col's column order (packed for the CPU VNNI kernel, cached per weight version)."""
        return _cpu_packed(self, lambda w: conv_weight_2d(w).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        bias = _bias_like(self.bias, x)
        return ops.int8_conv2d_static(x, self.input_scale, self._weight(), self.weight_scale, bias, self.kernel_size,
                                      self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"input_scale={float(self.input_scale):.4g}")


# The replacement of an nn.Linear for each config (what from_float(linear, config) builds), and of an nn.Conv2d.
MODULE_FOR_CONFIG = {Int8DynamicActivationInt8WeightConfig: Int8Linear, Int4WeightOnlyConfig: Int4Linear,
                     Int8WeightOnlyConfig: Int8WeightOnlyLinear,
                     Int8StaticActivationInt8WeightConfig: Int8StaticLinear}
CONV_MODULE_FOR_CONFIG = {Int8StaticActivationInt8WeightConfig: Int8Conv2d}


def module_for(module: nn.Module, config) -> type:
    """The quantized module class that replaces `module` (an nn.Linear or nn.Conv2d) under `config`."""
    table = CONV_MODULE_FOR_CONFIG if isinstance(module, nn.Conv2d) else MODULE_FOR_CONFIG
    if type(config) not in table:
        raise TypeError(f"no quantized module for a {type(module).__name__} under {type(config).__name__}")
    return table[type(config)]


def empty_module(linear: nn.Module, config) -> nn.Module:
    """A quantized module of linear's (or a Conv2d's) shape for `config`, its tensors to be filled by
    load_state_dict."""
    cls = module_for(linear, config)
    if cls is Int8Conv2d:
        return Int8Conv2d.empty_like(linear)
    kw = {"group_size": config.group_size} if isinstance(config, Int4WeightOnlyConfig) else {}
    return cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
               dtype=linear.weight.dtype, **kw)
