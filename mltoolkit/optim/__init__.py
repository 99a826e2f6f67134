"""mltoolkit optimizers: fused multi-tensor steps with torch.optim's interfaces and state_dicts."""
from mltoolkit.optim.adamw import AdamW

__all__ = ["AdamW"]
