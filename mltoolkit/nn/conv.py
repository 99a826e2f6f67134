"""Conv1d and Conv2d as subclasses of torch's modules: same constructor, parameters and state_dict keys."""
from __future__ import annotations

import torch
from torch import Tensor

from mltoolkit.ops import conv as ops


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
