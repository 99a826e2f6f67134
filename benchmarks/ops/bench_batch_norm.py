"""Training-mode batch norm + relu (+ the residual add) on ResNet-50's activation shapes against the eager sequence
(F.batch_norm, the add, F.relu) and torch.compile of it: forward and forward + backward (input, weight, bias and
residual gradients), running stats updated on every call. CPU: float32 in NCHW and channels_last; CUDA: float16
channels_last."""
import torch
import torch.nn.functional as F

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark

# name: (C, H = W). The BN outputs of ResNet-50's stem and of its four stages.
SHAPES = {"64@112x112": (64, 112), "256@56x56": (256, 56), "512@28x28": (512, 28), "1024@14x14": (1024, 14)}
BATCH = {"cpu": 8, "cuda": 32}  # the GPU needs a larger batch to be memory-bound rather than launch-bound


def _config(name, layout, device="cpu"):
    c, hw = SHAPES[name]
    return {"shape": name, "N": BATCH[device], "C": c, "H": hw, "W": hw, "layout": layout}


def _off_the_kink(x, w, b, residual, fmt):
    """x with the few values whose pre-activation z lies within 1e-3 of relu's kink moved 0.01 std away from it.
    A tensor of millions of values has about one z within float32 rounding of 0, where the float64 correctness gate
    would be decided by that rounding (dy passes or not); torch's own result fails it there too."""
    per_channel = lambda t: t.double().view(1, -1, 1, 1)
    xd = x.double()
    var, mean = torch.var_mean(xd, [0, 2, 3], correction=0, keepdim=True)
    std = (var + 1e-5).sqrt()
    z = (xd - mean) / std * per_channel(w) + per_channel(b)
    if residual is not None:
        z = z + residual.double()
    step = 1e-2 * std / per_channel(w)
    moved = torch.where(z.abs() < 1e-3, xd + torch.where(z >= 0, step, -step), xd)
    return moved.to(x.dtype).contiguous(memory_format=fmt)


def _inputs(with_residual):
    def make(config, dtype, device):
        shape = (config["N"], config["C"], config["H"], config["W"])
        fmt = torch.channels_last if config["layout"] == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        # Parameters and running stats in float32, as nn.BatchNorm2d keeps them under autocast.
        w = torch.rand(config["C"], device=device) + 0.5
        b = torch.randn(config["C"], device=device) * 0.1
        rm, rv = torch.zeros(config["C"], device=device), torch.ones(config["C"], device=device)
        r = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt) if with_residual else None
        args = (_off_the_kink(x, w, b, r, fmt), w, b, rm, rv)
        return args + (r,) if with_residual else args
    return make


def _bytes(with_residual):
    def count(config, dtype, mode):
        # Each full-size tensor once: forward reads x (+ residual) and writes y; backward reads dy and x (+ residual)
        # and writes dx (+ dresidual). Reading x a second time for the statistics is not counted.
        tensor = config["N"] * config["C"] * config["H"] * config["W"] * torch.finfo(dtype).bits // 8
        fwd = tensor * (3 if with_residual else 2)
        bwd = tensor * (5 if with_residual else 3)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return count


def _ours(x, w, b, rm, rv, residual=None):
    return ops.batch_norm_act(x, w, b, rm, rv, True, 0.1, 1e-5, "relu", residual)


def _eager(x, w, b, rm, rv, residual=None):
    z = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    return F.relu(z if residual is None else z + residual)


_reference = _eager  # in the oracle dtype (float64 for float32)


def _configs(device, quick):
    if device == "cuda":
        names = ["256@56x56"] if quick else list(SHAPES)
        return [_config(n, "channels_last", device) for n in names]
    if quick:
        return [_config("256@56x56", "channels_last")]
    return [_config(n, layout) for layout in ("nchw", "channels_last") for n in SHAPES]


def benchmarks(device: str, quick: bool):
    dtypes = [torch.float16] if device == "cuda" else [torch.float32]
    configs = _configs(device, quick)
    return [
        Benchmark("bn_relu", "batch_norm", _ours, _eager, _reference, _inputs(False), configs, dtypes,
                  grad_args=(0, 1, 2), bytes=_bytes(False), modes=("fwd", "fwd+bwd")),
        Benchmark("bn_add_relu", "batch_norm", _ours, _eager, _reference, _inputs(True), configs, dtypes,
                  grad_args=(0, 1, 2, 5), bytes=_bytes(True), modes=("fwd", "fwd+bwd")),
    ]
