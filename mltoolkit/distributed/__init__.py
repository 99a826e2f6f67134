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

# The strategies load on first use (get_strategy("ddp") or an attribute below), so that importing the light parts of
# this package (mltoolkit.optim uses mltoolkit.distributed._dtensor) does not import torch.distributed.fsdp & co.
_EXPORTS = {
    "DDPStrategy": "ddp", "FSDPStrategy": "fsdp", "TensorParallelStrategy": "tensor_parallel",
    "DistributedResumableSampler": "sampler", "ShardedCheckpointer": "checkpoint", "init_process_group": "_env",
    "TinyTransformer": "tensor_parallel", "TransformerBlock": "tensor_parallel", "DEFAULT_PLAN": "tensor_parallel",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mltoolkit.distributed' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"mltoolkit.distributed.{module}"), name)
    globals()[name] = value
    return value


def _lazy(name: str):
    def factory(*args, **kwargs):
        return __getattr__(name)(*args, **kwargs)
    factory.__name__ = name
    return factory


register_strategy("ddp", _lazy("DDPStrategy"))
register_strategy("fsdp", _lazy("FSDPStrategy"))
register_strategy("tp", _lazy("TensorParallelStrategy"))
