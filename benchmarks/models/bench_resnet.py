"""ResNet-50 inference, whole model: `mltoolkit.optimize(model)` against the torchvision model in torch eager and
under torch.compile, and the optimized model under torch.compile. CPU: float32, batch 8, 224x224; CUDA: float16
channels_last, batch 256 (quick: 32). images/s = N / time. Skipped where torchvision is not installed.

Correctness of the optimized model is the tests' job (tests/test_fusion.py checks ResNet-50 against a float64 run):
a float64 ResNet-50 per benchmark row would cost more than the timing.
"""
import copy

import torch

import mltoolkit
from mltoolkit.benchmark import Benchmark

GFLOP_PER_IMAGE = 2 * 4.09  # multiply-adds of ResNet-50 at 224x224, counted twice


# The models of the config being run: built by _inputs (the harness makes the inputs before the providers), so
# that the providers below, torch.compile's included, only look them up.
_CURRENT: dict[str, torch.nn.Module] = {}


def _build(device: str, dtype: torch.dtype, channels_last: bool) -> None:
    """_CURRENT = original and optimized ResNet-50, eval mode, with non-trivial batch-norm statistics."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    _CURRENT.clear()
    _CURRENT.update(original=model, optimized=mltoolkit.optimize(copy.deepcopy(model)))


def _inputs(config, dtype, device):
    channels_last = config["layout"] == "channels_last"
    _build(device, dtype, channels_last)
    x = torch.randn(config["N"], 3, config["HW"], config["HW"], dtype=dtype, device=device)
    return (x.to(memory_format=torch.channels_last) if channels_last else x,)


def _original(x):
    return _CURRENT["original"](x)


def _optimized(x):
    return _CURRENT["optimized"](x)


def _compiled_optimized(device):
    return {"torch.compile(optimize())": torch.compile(_optimized, dynamic=False)}


def _flops(config, dtype, mode):
    return int(GFLOP_PER_IMAGE * 1e9 * config["N"])


def benchmarks(device: str, quick: bool):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return []
    if device == "cuda":
        configs = [{"model": "resnet50", "N": 32 if quick else 256, "HW": 224, "layout": "channels_last"}]
        dtypes = [torch.float16]
    else:
        if quick:  # a whole ResNet-50 with two torch.compile builds takes minutes on 2 cores
            return []
        configs = [{"model": "resnet50", "N": 8, "HW": 224, "layout": layout} for layout in ("nchw", "channels_last")]
        dtypes = [torch.float32]
    return [Benchmark("resnet50", "conv", _optimized, _original, _original, _inputs, configs, dtypes,
                      flops=_flops, modes=("fwd",), baselines=_compiled_optimized, check=False)]
