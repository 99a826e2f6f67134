"""EfficientNet-B0 to B7 with torchvision's module names and state_dict keys (features.<stage>.<block>.block.<i>...),
built from mltoolkit ops: every conv + batch norm + SiLU is one fused op (folded batch norm and the activation in the
convolution's epilogue at eval; batch statistics in training), the MBConv residual add runs in the projection's
epilogue when stochastic depth is off, and the squeeze-excitation's first 1x1 conv has its SiLU fused.

Training mode behaves as torchvision's model: batch statistics, stochastic depth ("row" mode, the same random draws
as torchvision.ops.stochastic_depth) and dropout before the classifier."""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mltoolkit import nn as mnn
from mltoolkit.models.registry import register_model
from mltoolkit.nn.conv import conv_bn_act_forward


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation (Sequential(conv, bn[, act]), keys "0.weight", "1.running_var") as one
    fused op."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: str = "silu", eps: float = 1e-5, momentum: float = 0.1):
        layers = [mnn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                             bias=False), nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)]
        if activation == "silu":
            layers.append(nn.SiLU(inplace=True))
        elif activation != "none":
            raise ValueError(f"ConvBNAct: activation must be 'silu' or 'none', got {activation!r}")
        super().__init__(*layers)
        self.activation = activation
        self.out_channels = out_channels

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return conv_bn_act_forward(self[0], self[1], self.activation, x, residual)


class SqueezeExcitation(mnn.SqueezeExcitation):
    """torchvision.ops.SqueezeExcitation with SiLU (keys fc1.*, fc2.*): x * sigmoid(fc2(silu(fc1(mean(x))))), the
    two 1x1 convolutions as F.linear on the pooled rows (mltoolkit.nn.SqueezeExcitation); in place without autograd
    (its input is MBConv's depthwise output, read by nothing else)."""

    def __init__(self, input_channels: int, squeeze_channels: int):
        super().__init__(input_channels, squeeze_channels, activation=functools.partial(nn.SiLU, inplace=True),
                         scale_activation=nn.Sigmoid, conv=mnn.Conv2d, inplace=True)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth: in training, zero whole samples ("row") or the whole batch with probability
    p and scale the survivors by 1 / (1 - p); the identity otherwise. Same random draws as torchvision's."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"StochasticDepth: p must be in [0, 1], got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"StochasticDepth: mode must be 'row' or 'batch', got {mode!r}")
        self.p, self.mode = p, mode

    def active(self) -> bool:
        return self.training and self.p > 0.0

    def forward(self, x: Tensor) -> Tensor:
        if not self.active():
            return x
        survival = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.dim() - 1) if self.mode == "row" else [1] * x.dim()
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


@dataclass
class MBConvConfig:
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int

    @staticmethod
    def scaled(expand_ratio, kernel, stride, input_channels, out_channels, num_layers, width_mult, depth_mult):
        return MBConvConfig(expand_ratio, kernel, stride, _make_divisible(input_channels * width_mult),
                            _make_divisible(out_channels * width_mult), int(math.ceil(num_layers * depth_mult)))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand conv-bn-SiLU] -> depthwise conv-bn-SiLU -> squeeze-excitation -> 1x1 project
    conv-bn (-> stochastic depth -> + input when the shapes allow)."""

    def __init__(self, cnf: MBConvConfig, stochastic_depth_prob: float, eps: float, momentum: float):
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError(f"MBConv: stride must be 1 or 2, got {cnf.stride}")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        expanded = _make_divisible(cnf.input_channels * cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(ConvBNAct(cnf.input_channels, expanded, 1, eps=eps, momentum=momentum))
        layers.append(ConvBNAct(expanded, expanded, cnf.kernel, cnf.stride, groups=expanded, eps=eps,
                                momentum=momentum))
        layers.append(SqueezeExcitation(expanded, max(1, cnf.input_channels // 4)))
        layers.append(ConvBNAct(expanded, cnf.out_channels, 1, activation="none", eps=eps, momentum=momentum))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.block[:-1]:
            out = layer(out)
        project = self.block[-1]
        if not self.use_res_connect:
            return project(out)
        if not self.stochastic_depth.active():
            return project(out, x)  # the residual add in the convolution's epilogue
        return self.stochastic_depth(project(out)) + x


class EfficientNet(nn.Module):
    """torchvision.models.EfficientNet (V1): features, avgpool, classifier (Dropout, Linear); same initialization."""

    def __init__(self, width_mult: float, depth_mult: float, dropout: float, stochastic_depth_prob: float = 0.2,
                 num_classes: int = 1000, norm_eps: float = 1e-5, norm_momentum: float = 0.1):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"EfficientNet: num_classes must be a positive int, got {num_classes!r}")
        setting = [MBConvConfig.scaled(*row, width_mult, depth_mult) for row in (
            (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
            (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))]
        bn = dict(eps=norm_eps, momentum=norm_momentum)
        layers: list[nn.Module] = [ConvBNAct(3, setting[0].input_channels, 3, 2, **bn)]
        total = sum(c.num_layers for c in setting)
        block_id = 0
        for cnf in setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:
                    block_cnf.input_channels, block_cnf.stride = block_cnf.out_channels, 1
                stage.append(MBConv(block_cnf, stochastic_depth_prob * float(block_id) / total, norm_eps,
                                    norm_momentum))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = setting[-1].out_channels
        last_out = 4 * last_in
        layers.append(ConvBNAct(last_in, last_out, 1, **bn))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNet: input must be (N, 3, H, W), got shape {list(x.shape)}")
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.classifier(torch.flatten(x, 1))


# name: (width_mult, depth_mult, dropout, torchvision's batch-norm eps and momentum)
_CONFIGS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, 1e-5, 0.1),
    "efficientnet_b1": (1.0, 1.1, 0.2, 1e-5, 0.1),
    "efficientnet_b2": (1.1, 1.2, 0.3, 1e-5, 0.1),
    "efficientnet_b3": (1.2, 1.4, 0.3, 1e-5, 0.1),
    "efficientnet_b4": (1.4, 1.8, 0.4, 1e-5, 0.1),
    "efficientnet_b5": (1.6, 2.2, 0.4, 1e-3, 0.01),
    "efficientnet_b6": (1.8, 2.6, 0.5, 1e-3, 0.01),
    "efficientnet_b7": (2.0, 3.1, 0.5, 1e-3, 0.01),
}


def _efficientnet(name: str, **kwargs) -> EfficientNet:
    width, depth, dropout, eps, momentum = _CONFIGS[name]
    kwargs.setdefault("dropout", dropout)
    kwargs.setdefault("norm_eps", eps)
    kwargs.setdefault("norm_momentum", momentum)
    return EfficientNet(width, depth, **kwargs)


def _register(name: str):
    def build(**kwargs) -> EfficientNet:
        return _efficientnet(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name} (torchvision.models.{name}); kwargs: num_classes, dropout, stochastic_depth_prob, "
                     "norm_eps, norm_momentum.")
    register_model(build, name=name, family="efficientnet")
    return build


efficientnet_b0 = _register("efficientnet_b0")
efficientnet_b1 = _register("efficientnet_b1")
efficientnet_b2 = _register("efficientnet_b2")
efficientnet_b3 = _register("efficientnet_b3")
efficientnet_b4 = _register("efficientnet_b4")
efficientnet_b5 = _register("efficientnet_b5")
efficientnet_b6 = _register("efficientnet_b6")
efficientnet_b7 = _register("efficientnet_b7")
