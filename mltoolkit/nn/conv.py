"""Conv1d and Conv2d as subclasses of torch's modules: same constructor, parameters and state_dict keys."""
from __future__ import annotations

import torch
from torch import Tensor

from mltoolkit import ops
from mltoolkit.ops.reference import conv as ops_reference


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d computed by mltoolkit.ops.conv2d (every padding and padding_mode of nn.Conv2d)."""

    def forward(self, input: Tensor) -> Tensor:
        return ops.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                          self.padding_mode)

    @classmethod
    def from_torch(cls, module: torch.nn.Conv2d) -> Conv2d:
        """A Conv2d sharing `module`'s parameters (no copy), so optimizers keep working on them."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new


class Conv1d(torch.nn.Conv1d):
    """torch.nn.Conv1d computed by mltoolkit.ops.conv1d."""

    def forward(self, input: Tensor) -> Tensor:
        return ops.conv1d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                          self.padding_mode)

    @classmethod
    def from_torch(cls, module: torch.nn.Conv1d) -> Conv1d:
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new


# ---- convolution + batch norm + activation --------------------------------------------------------------------

ACTIVATION_MODULES = {
    torch.nn.Identity: "none", torch.nn.ReLU: "relu", torch.nn.ReLU6: "relu6", torch.nn.SiLU: "silu",
    torch.nn.Hardswish: "hardswish",
}


def activation_name(module: torch.nn.Module) -> str | None:
    """The epilogue name of an activation module (None if the kernels have no such activation)."""
    if type(module) is torch.nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return ACTIVATION_MODULES.get(type(module))


def batch_norm_call_args(bn: torch.nn.BatchNorm2d) -> dict:
    """What nn.BatchNorm2d.forward passes to F.batch_norm, as conv2d_bn_act keywords: whether batch statistics are
    used, the running-average factor (cumulative when momentum is None) and the running stats to update or use.
    Like nn.BatchNorm2d, counts the batch in num_batches_tracked when training."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean if keep else None,
                running_var=bn.running_var if keep else None, training=use_batch_stats, momentum=factor, eps=bn.eps)


def conv_bn_act_forward(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, activation: str, input: Tensor,
                        residual: Tensor | None = None) -> Tensor:
    """activation(bn(conv(input)) + residual) with the modules' own parameters, buffers and train/eval state. In
    inference the fold and the CPU kernel's weight layouts are made once and reused while the weights stay the same
    (ops.conv2d_bn_act)."""
    return ops.conv2d_bn_act(input, conv.weight, conv.bias, **batch_norm_call_args(bn), activation=activation,
                             residual=residual, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                             groups=conv.groups, padding_mode=conv.padding_mode)


class Conv2dBNAct(torch.nn.Module):
    """Conv2d -> BatchNorm2d -> activation (-> + residual before the activation) as one fused op.

    Submodules `conv` (torch.nn.Conv2d) and `bn` (torch.nn.BatchNorm2d) keep torch's parameters, buffers and
    state_dict keys (conv.weight, bn.running_mean, ...). forward(input, residual=None) returns
    activation(bn(conv(input)) + residual). In eval mode the batch norm is folded into the convolution and the
    residual add and activation run in the convolution kernel's epilogue; in training mode batch statistics are
    used and the running stats updated as nn.BatchNorm2d does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", activation: str = "relu",
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        if activation not in ops_reference.ACTIVATIONS:
            raise ValueError(f"Conv2dBNAct: activation must be one of {', '.join(ops_reference.ACTIVATIONS)}, "
                             f"got {activation!r}")
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                                    padding_mode, device=device, dtype=dtype)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device,
                                       dtype=dtype)
        self.activation = activation

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return conv_bn_act_forward(self.conv, self.bn, self.activation, input, residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    @classmethod
    def from_modules(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, activation: str = "none") -> Conv2dBNAct:
        """A Conv2dBNAct owning `conv` and `bn` themselves (shared parameters and buffers, no copy)."""
        if not isinstance(conv, torch.nn.Conv2d) or not isinstance(bn, torch.nn.BatchNorm2d):
            raise TypeError(f"Conv2dBNAct.from_modules: needs an nn.Conv2d and an nn.BatchNorm2d, got "
                            f"{type(conv).__name__} and {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"Conv2dBNAct.from_modules: bn.num_features {bn.num_features} != conv.out_channels "
                             f"{conv.out_channels}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.conv, new.bn, new.activation = conv, bn, activation
        return new
