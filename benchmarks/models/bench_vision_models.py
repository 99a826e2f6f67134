"""Model zoo, whole models: `mltoolkit.models.create_model(name)` against the torchvision original (same weights) for
ResNet-50, EfficientNet-B0 and ViT-B/16: inference (eval, no grad) and a training step (train mode, forward +
backward of a mean-square loss over the logits; gradients of all parameters). The torchvision model runs in eager
and (baseline row) under torch.compile. CPU: float32, batch 8 (training: 4), 224x224; CUDA: bfloat16 under the same
shapes x 8, channels_last for ResNet. images/s = N / time. Skipped where torchvision is not installed; on CPU only
in full runs (a ViT-B/16 torch.compile build takes minutes on 2 cores).

Ours is built as create_model builds it (the CNNs with channels_last weights, so they run channels_last inside
whatever the input's layout); `layout` is the input's and torchvision's model's.

Correctness is the tests' job (tests/test_models_vision.py checks logits and gradients against torchvision).
"""
import torch

from mltoolkit.benchmark import Benchmark

# multiply-adds at 224x224, counted twice
GFLOP_PER_IMAGE = {"resnet50": 2 * 4.09, "efficientnet_b0": 2 * 0.39, "vit_b_16": 2 * 17.56}
_CURRENT: dict[str, torch.nn.Module] = {}


def _build(name: str, device: str, dtype: torch.dtype, train: bool, channels_last: bool) -> None:
    import torchvision

    from mltoolkit.models import create_model

    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    ours = create_model(name)
    ours.load_state_dict(tv.state_dict())
    for key, model in (("original", tv), ("mltoolkit", ours)):
        model = model.to(device=device, dtype=dtype).train(train)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        _CURRENT[key] = model


def _inputs(config, dtype, device):
    channels_last = config["layout"] == "channels_last"
    _build(config["model"], device, dtype, config["step"] == "train", channels_last)
    x = torch.randn(config["N"], 3, 224, 224, dtype=dtype, device=device)
    return (x.to(memory_format=torch.channels_last) if channels_last else x,)


def _run(key: str, x):
    model = _CURRENT[key]
    if not model.training:
        with torch.no_grad():
            return model(x)
    with torch.enable_grad():  # the harness times "fwd" under no_grad
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.float().square().mean().backward()
    return out.detach()


def _ours(x):
    return _run("mltoolkit", x)


def _original(x):
    return _run("original", x)


def _flops(config, dtype, mode):
    per_image = GFLOP_PER_IMAGE[config["model"]] * (3 if config["step"] == "train" else 1)
    return int(per_image * 1e9 * config["N"])


def benchmarks(device: str, quick: bool):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return []
    if device == "cpu" and quick:
        return []
    scale = 8 if device == "cuda" else 1
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32]
    out = []
    for name in ("resnet50", "efficientnet_b0", "vit_b_16"):
        layout = "channels_last" if device == "cuda" and name == "resnet50" else "nchw"
        configs = [{"model": name, "step": "infer", "N": 8 * scale, "layout": layout},
                   {"model": name, "step": "train", "N": 4 * scale, "layout": layout}]
        out.append(Benchmark(f"zoo_{name}", "conv", _ours, _original, _original, _inputs, configs, dtypes,
                             flops=_flops, modes=("fwd",), check=False))
    return out
