"""Distributed training on torch.distributed: the Strategy interface the Trainer uses and its implementations.

    Trainer(model, optimizer, loader, strategy="ddp")     # or "fsdp", "tp", "single", "auto"
    torchrun --nproc-per-node=4 train.py

"ddp": DDPStrategy (DistributedDataParallel, comm hooks fp16 / bf16 / powersgd, no_sync accumulation); "fsdp":
FSDPStrategy (FSDP2 fully_shard, sharded DCP checkpoints); "tp": TensorParallelStrategy (column / row-parallel
transformer blocks on DTensor). Data-parallel strategies give each rank batch_size samples of its shard: the global
batch is world_size x batch_size.
"""
from mltoolkit.distributed.strategy import (
    STRATEGIES,
    SingleProcess,
    Strategy,
    get_strategy,
    rebuild_optimizer,
    register_strategy,
)

__all__ = ["Strategy", "SingleProcess", "get_strategy", "register_strategy", "rebuild_optimizer", "STRATEGIES",
           "DDPStrategy", "FSDPStrategy", "TensorParallelStrategy", "DistributedResumableSampler",
           "ShardedCheckpointer", "init_process_group", "TinyTransformer", "TransformerBlock", "DEFAULT_PLAN"]

try:
    import torch.distributed as _dist
    _AVAILABLE = _dist.is_available()
except ImportError:  # pragma: no cover
    _AVAILABLE = False

if _AVAILABLE:
    from mltoolkit.distributed._env import init_process_group
    from mltoolkit.distributed.checkpoint import ShardedCheckpointer
    from mltoolkit.distributed.ddp import DDPStrategy
    from mltoolkit.distributed.fsdp import FSDPStrategy
    from mltoolkit.distributed.sampler import DistributedResumableSampler
    from mltoolkit.distributed.tensor_parallel import (
        DEFAULT_PLAN,
        TensorParallelStrategy,
        TinyTransformer,
        TransformerBlock,
    )

    register_strategy("ddp", DDPStrategy)
    register_strategy("fsdp", FSDPStrategy)
    register_strategy("tp", TensorParallelStrategy)
