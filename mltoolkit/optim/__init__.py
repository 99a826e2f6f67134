"""mltoolkit optimizers: fused multi-tensor steps with torch.optim's interfaces and state_dicts, fused gradient
clipping, and learning-rate schedules."""
from mltoolkit.optim.adamw import AdamW
from mltoolkit.optim.clip import clip_grad_norm_
from mltoolkit.optim.lamb import LAMB
from mltoolkit.optim.lr_scheduler import (
    SCHEDULERS,
    WarmupConstantLR,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupInverseSqrtLR,
    WarmupLinearLR,
    WarmupLR,
    WarmupPolynomialLR,
    get_scheduler,
)

__all__ = ["AdamW", "LAMB", "clip_grad_norm_", "get_scheduler", "SCHEDULERS", "WarmupDecayLR", "WarmupCosineLR",
           "WarmupLinearLR", "WarmupPolynomialLR", "WarmupInverseSqrtLR", "WarmupConstantLR", "WarmupLR"]
