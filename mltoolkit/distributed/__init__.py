"""Distributed training on torch.distributed: the Strategy interface the Trainer uses and its implementations."""
from mltoolkit.distributed.strategy import (
    STRATEGIES,
    SingleProcess,
    Strategy,
    get_strategy,
    rebuild_optimizer,
    register_strategy,
)

__all__ = ["Strategy", "SingleProcess", "get_strategy", "register_strategy", "rebuild_optimizer", "STRATEGIES"]
