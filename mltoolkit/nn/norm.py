"""LayerNorm and RMSNorm as subclasses of torch's modules: same constructor, parameters and state_dict keys."""
from __future__ import annotations

import torch
from torch import Tensor

from mltoolkit.ops import norm as ops


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by mltoolkit.ops.layer_norm."""

    def forward(self, input: Tensor) -> Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> LayerNorm:
        """A LayerNorm sharing `module`'s parameters (no copy), so optimizers keep working on them."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by mltoolkit.ops.rms_norm."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm) -> RMSNorm:
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new
