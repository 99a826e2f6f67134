"""2-D convolution on ResNet-50's shapes against torch eager (F.conv2d: oneDNN on CPU, cuDNN on GPU) and
torch.compile: time and TFLOP/s, forward and forward + backward (input and weight gradients; ResNet convs have no
bias, batch norm follows them), and EfficientNet-B0's depthwise layers (3x3 / 5x5, stride 1 / 2).
CPU: float32 in NCHW and channels_last; CUDA: float16 channels_last.

conv2d_bn_relu: the same layers followed by batch norm and ReLU, as ResNet runs them, against the eager three-op
sequence (F.conv2d, F.batch_norm, F.relu) and its torch.compile: inference (batch norm folded, epilogue fused; the
fold and, on the CPU, the kernel's weight layouts made on the first calls and reused, as for a model's fixed
weights) in fwd mode; training (batch statistics, running-stat update) in fwd+bwd mode."""
import torch
import torch.nn.functional as F

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark

# name: (C, K, H = W, kernel, stride, padding, groups). The 3x3 convs of each ResNet-50 stage, the 1x1
# reduction of stage 1, and a MobileNetV2/EfficientNet-style depthwise 3x3.
SHAPES = {
    "3x3 64 56x56": (64, 64, 56, 3, 1, 1, 1),
    "3x3 128 28x28": (128, 128, 28, 3, 1, 1, 1),
    "3x3 256 14x14": (256, 256, 14, 3, 1, 1, 1),
    "3x3 512 7x7": (512, 512, 7, 3, 1, 1, 1),
    "1x1 256->64 56x56": (256, 64, 56, 1, 1, 0, 1),
    "dw3x3 144 56x56": (144, 144, 56, 3, 1, 1, 144),
    # EfficientNet-B0's depthwise layers (kernel, stride, channels, size as torchvision's efficientnet_b0 runs them).
    "dw3x3 96 112x112 s2": (96, 96, 112, 3, 2, 1, 96),
    "dw3x3 144 56x56 s2": (144, 144, 56, 3, 2, 1, 144),
    "dw5x5 240 28x28": (240, 240, 28, 5, 1, 2, 240),
    "dw5x5 672 14x14": (672, 672, 14, 5, 1, 2, 672),
    "dw5x5 672 14x14 s2": (672, 672, 14, 5, 2, 2, 672),
    "dw3x3 1152 7x7": (1152, 1152, 7, 3, 1, 1, 1152),
    "dw5x5 1152 7x7": (1152, 1152, 7, 5, 1, 2, 1152),
}
# Batch: 8 on the CPU; on the GPU 32 (quick) or 128, enough pixels to fill 132 SMs as ResNet training does.
BATCH = {"cpu": (8, 8), "cuda": (32, 128)}


def _config(name, layout, device="cpu", quick=True):
    c, k, hw, r, stride, pad, groups = SHAPES[name]
    return {"shape": name, "N": BATCH[device][0 if quick else 1], "C": c, "K": k, "H": hw, "W": hw, "R": r,
            "stride": stride, "pad": pad, "groups": groups, "layout": layout}


def _inputs(config, dtype, device):
    x = torch.randn(config["N"], config["C"], config["H"], config["W"], dtype=dtype, device=device)
    w = torch.randn(config["K"], config["C"] // config["groups"], config["R"], config["R"], dtype=dtype,
                    device=device) * (config["C"] // config["groups"] * config["R"] ** 2) ** -0.5
    if config["layout"] == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    return x, w, config["stride"], config["pad"], config["groups"]


def _flops(config, dtype, mode):
    # 2 N K P Q (C/groups) R S for the forward; the backward computes dx and dw, each as much again.
    p = (config["H"] + 2 * config["pad"] - config["R"]) // config["stride"] + 1
    q = (config["W"] + 2 * config["pad"] - config["R"]) // config["stride"] + 1
    fwd = 2 * config["N"] * config["K"] * p * q * config["C"] // config["groups"] * config["R"] ** 2
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def _ours(x, w, stride, pad, groups):
    return ops.conv2d(x, w, None, stride, pad, 1, groups)


def _eager(x, w, stride, pad, groups):
    return F.conv2d(x, w, None, stride, pad, 1, groups)


_reference = _eager  # F.conv2d in the oracle dtype (float64 for float32) is the oracle


def _configs(device, quick):
    if device == "cuda":
        names = ["3x3 64 56x56", "1x1 256->64 56x56"] if quick else list(SHAPES)
        return [_config(n, "channels_last", device, quick) for n in names]
    if quick:
        return [_config("3x3 128 28x28", "nchw"), _config("dw5x5 672 14x14", "channels_last")]
    return [_config(n, layout) for layout in ("nchw", "channels_last") for n in SHAPES]


def benchmarks(device: str, quick: bool):
    dtypes = [torch.float16] if device == "cuda" else [torch.float32]
    return [Benchmark("conv2d", "conv", _ours, _eager, _reference, _inputs, _configs(device, quick), dtypes,
                      grad_args=(0, 1), flops=_flops, modes=("fwd", "fwd+bwd"),
                      include_reference_backend=not quick)] + bn_benchmarks(device, quick)


# ---- conv + batch norm + ReLU --------------------------------------------------------------------------------------

def _bn_inputs(config, dtype, device):
    x, w, stride, pad, groups = _inputs(config, dtype, device)
    k = config["K"]
    g = torch.Generator(device="cpu").manual_seed(1)
    gamma, beta = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g) * 0.1
    mean, var = torch.randn(k, generator=g) * 0.1, torch.rand(k, generator=g) + 0.5
    gamma, beta, mean, var = (t.to(device=device, dtype=dtype) for t in (gamma, beta, mean, var))
    return x, w, gamma, beta, mean, var, stride, pad, groups, config["train"]


def _bn_ours(x, w, gamma, beta, mean, var, stride, pad, groups, train):
    # Training updates the running stats in place: work on copies so every provider sees the same inputs.
    mean, var = (mean.clone(), var.clone()) if train else (mean, var)
    return ops.conv2d_bn_act(x, w, None, gamma, beta, mean, var, training=train, activation="relu", stride=stride,
                             padding=pad, groups=groups)


def _bn_eager(x, w, gamma, beta, mean, var, stride, pad, groups, train):
    mean, var = (mean.clone(), var.clone()) if train else (mean, var)
    z = F.conv2d(x, w, None, stride, pad, 1, groups)
    return F.relu(F.batch_norm(z, mean, var, gamma, beta, train, 0.1, 1e-5))


def _bn_configs(device, quick):
    names = ["3x3 64 56x56"] if quick else ["3x3 64 56x56", "3x3 128 28x28", "3x3 256 14x14", "3x3 512 7x7",
                                              "1x1 256->64 56x56"]
    layouts = ["channels_last"] if device == "cuda" or quick else ["channels_last", "nchw"]
    return [{**_config(n, layout, device, quick), "train": train}
            for train in (False, True) for layout in layouts for n in names]


def _bn_flops(config, dtype, mode):
    return _flops(config, dtype, "fwd") if not config["train"] else _flops(config, dtype, mode)


def bn_benchmarks(device: str, quick: bool):
    dtypes = [torch.float16] if device == "cuda" else [torch.float32]
    configs = _bn_configs(device, quick)
    return [Benchmark("conv2d_bn_relu", "conv", _bn_ours, _bn_eager, _bn_eager, _bn_inputs,
                      [c for c in configs if not c["train"]], dtypes, flops=_bn_flops, modes=("fwd",)),
            # Training is judged by SQNR (>= 40 dB; a wrong kernel is near 0): one of the ~400k ReLU inputs landing
            # on the other side of 0 than in the float64 reference flips one dz, which moves the input gradient of a
            # whole 3x3 x C neighbourhood by |w dz| (~0.02), far outside the tolerance table, for either provider.
            Benchmark("conv2d_bn_relu", "conv", _bn_ours, _bn_eager, _bn_eager, _bn_inputs,
                      [c for c in configs if c["train"]], dtypes, grad_args=(0, 1, 2, 3), flops=_bn_flops,
                      modes=("fwd+bwd",), sqnr_floor=40.0)]
