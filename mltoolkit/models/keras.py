"""Keras ResNet weights: `create_model("resnet50_keras", pretrained_path="resnet50.weights.h5")`.

Keras' ResNet50/101/152 (keras.applications.ResNet50 and friends) are "ResNet v1": the stride of each stage's first
block sits on its first 1x1 convolution (torchvision's "v1.5" puts it on the 3x3), every convolution has a bias, and
batch norm uses eps=1.001e-5 (momentum 0.99, i.e. torch's 0.01). `resnet50_keras` (and resnet101_keras,
resnet152_keras) is our ResNet with those three differences — torchvision's module names and keys plus the conv
biases, run by the same fused conv + batch norm + ReLU (+ residual) ops — so a Keras weights file maps onto it and the
model reproduces Keras' logits. Keras' ZeroPadding2D + valid convolution / max pooling equal torch's padded ones here
(the max pool follows a ReLU, so zero padding never wins).

Differences that stay with the user: the input is NCHW (Keras: NHWC; `x.permute(0, 3, 1, 2)`); Keras' preprocessing
(keras.applications.resnet.preprocess_input: RGB -> BGR, ImageNet mean subtracted, no scaling) is not part of
either model; Keras' top applies softmax by default (classifier_activation="softmax"), ours returns the logits.

Files read (with h5py; no TensorFlow or Keras needed): Keras 3's `model.save_weights("x.weights.h5")` (groups
layers/<auto name>/vars with the layer's name in an attribute, variables "0", "1", ...) and the legacy Keras 2 HDF5
format (`layer_names` / `weight_names` attributes; the ImageNet files keras.applications downloads, and full-model
.h5 files holding a "model_weights" group). Layers are matched by their Keras names: conv1_conv, conv1_bn,
conv{2..5}_block{b}_{0..3}_conv / _bn, predictions. Kernels are HWIO (-> OIHW), the dense kernel (in, out) (-> out,
in); batch norm holds gamma, beta, moving_mean, moving_variance.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np
import torch
from torch import nn

from mltoolkit.models.registry import register_model
from mltoolkit.models.resnet import Bottleneck, ResNet

KERAS_BN_EPS = 1.001e-5
KERAS_BN_MOMENTUM = 0.01  # Keras' momentum=0.99 in torch's convention
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
KERAS_RESNETS = {(3, 4, 6, 3): "ResNet50", (3, 4, 23, 3): "ResNet101", (3, 8, 36, 3): "ResNet152"}


# ---- the Keras-architecture ResNet ------------------------------------------------------------------------------

def to_keras_v1(model: ResNet) -> ResNet:
    """Turn our (torchvision v1.5) bottleneck ResNet into Keras' v1 architecture in place: the stride moves from
    conv2 (3x3) to conv1 (1x1) of each strided block, every convolution gets a (zero) bias, batch norms get Keras'
    eps and momentum. Module names and the other keys stay torchvision's."""
    for m in model.modules():
        if isinstance(m, Bottleneck) and m.conv2.stride != (1, 1):
            m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
        if isinstance(m, nn.Conv2d) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_channels, device=m.weight.device, dtype=m.weight.dtype))
        elif isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = KERAS_BN_EPS, KERAS_BN_MOMENTUM
    model._mltk_keras = True
    model._mltk_family = "resnet_keras"
    return model


def _keras_resnet(layers, **kwargs) -> ResNet:
    for bad in ("groups", "width_per_group", "replace_stride_with_dilation"):
        if bad in kwargs:
            raise TypeError(f"resnet*_keras: {bad} is not an option of Keras' ResNet")
    return to_keras_v1(ResNet(Bottleneck, list(layers), **kwargs))


@register_model(family="resnet_keras")
def resnet50_keras(**kwargs) -> ResNet:
    """Keras' ResNet50 (keras.applications.ResNet50: v1, conv biases, BN eps 1.001e-5) built from our fused ops;
    loads its .h5 weights (pretrained_path="...weights.h5"). Same keyword arguments as resnet50."""
    return _keras_resnet((3, 4, 6, 3), **kwargs)


@register_model(family="resnet_keras")
def resnet101_keras(**kwargs) -> ResNet:
    """Keras' ResNet101 (v1); loads its .h5 weights."""
    return _keras_resnet((3, 4, 23, 3), **kwargs)


@register_model(family="resnet_keras")
def resnet152_keras(**kwargs) -> ResNet:
    """Keras' ResNet152 (v1); loads its .h5 weights."""
    return _keras_resnet((3, 8, 36, 3), **kwargs)


# ---- reading the file ---------------------------------------------------------------------------------------------

def _decode(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_keras_weights(path: str | os.PathLike) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{layer name: [(variable name, array), ...]} of a Keras weights file (Keras 3 .weights.h5 or legacy .h5),
    layers without variables left out. Variable names are Keras' ("kernel", "gamma", ...) in the legacy format and
    the positions ("0", "1", ...) in Keras 3's."""
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_path: no such file {path!r} (only local files are read)")
    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:  # legacy Keras 2 / tf.keras HDF5
            for lname in map(_decode, root.attrs["layer_names"]):
                g = root[lname]
                names = [_decode(n) for n in g.attrs.get("weight_names", [])]
                if names:
                    layers[lname] = [(n.rsplit("/", 1)[-1].split(":")[0], np.asarray(g[n])) for n in names]
        elif "layers" in root:  # Keras 3 .weights.h5: <path>/vars/{0,1,...}, layer name in vars' "name" attribute

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and name.endswith("vars") and len(obj):
                    lname = _decode(obj.attrs.get("name", name.rsplit("/", 2)[-2]))
                    keys = sorted(obj.keys(), key=lambda k: int(k) if k.isdigit() else 1 << 30)
                    if lname in layers:
                        raise ValueError(f"keras: {path!r} holds two layers named {lname!r}")
                    layers[lname] = [(k, np.asarray(obj[k])) for k in keys]

            root.visititems(visit)
        else:
            raise ValueError(f"keras: {path!r} is an HDF5 file but not a Keras weights file (no 'layer_names' "
                             "attribute, no 'layers' group)")
    if not layers:
        raise ValueError(f"keras: {path!r} holds no layer weights")
    return layers


def keras_resnet_layers(blocks: tuple[int, ...]) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (our module prefix, "conv" | "bn" | "dense") for a Keras ResNet v1 with these blocks."""
    names = {"conv1_conv": ("conv1", "conv"), "conv1_bn": ("bn1", "bn")}
    for s, n in enumerate(blocks):
        for b in range(n):
            k, ours = f"conv{s + 2}_block{b + 1}", f"layer{s + 1}.{b}"
            for i in (1, 2, 3):
                names[f"{k}_{i}_conv"] = (f"{ours}.conv{i}", "conv")
                names[f"{k}_{i}_bn"] = (f"{ours}.bn{i}", "bn")
            if b == 0:
                names[f"{k}_0_conv"] = (f"{ours}.downsample.0", "conv")
                names[f"{k}_0_bn"] = (f"{ours}.downsample.1", "bn")
    names["predictions"] = ("fc", "dense")
    return names


def _blocks_of(model: nn.Module) -> tuple[int, ...]:
    return tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))


def _convert_layer(lname: str, kind: str, ours: str, variables: list[tuple[str, np.ndarray]],
                   where: str) -> dict[str, torch.Tensor]:
    if kind == "bn":
        if len(variables) != 4:
            raise ValueError(f"keras: {where}: batch norm layer {lname!r} has {len(variables)} variables, expected 4 "
                             f"({', '.join(_BN_VARS)})")
        by_name = dict(variables)
        order = [by_name[v] for v in _BN_VARS] if set(_BN_VARS) <= set(by_name) else [a for _, a in variables]
        out = {f"{ours}.{k}": torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
               for k, a in zip(_BN_KEYS, order)}
        out[f"{ours}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        return out
    if len(variables) != 2:
        raise ValueError(f"keras: {where}: layer {lname!r} has {len(variables)} variables, expected 2 (kernel, bias)")
    by_name = dict(variables)
    kernel, bias = (by_name["kernel"], by_name["bias"]) if {"kernel", "bias"} <= set(by_name) else \
        (variables[0][1], variables[1][1])
    want = 4 if kind == "conv" else 2
    if kernel.ndim != want:
        raise ValueError(f"keras: {where}: layer {lname!r} has a kernel of shape {list(kernel.shape)}, expected a "
                         f"{want}-d {'HWIO convolution' if kind == 'conv' else '(in, out) dense'} kernel")
    w = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32))
    w = w.permute(3, 2, 0, 1) if kind == "conv" else w.t()
    return {f"{ours}.weight": w.contiguous(), f"{ours}.bias": torch.from_numpy(np.ascontiguousarray(bias,
                                                                                                     dtype=np.float32))}


def read_keras_resnet(path: str | os.PathLike, model: nn.Module, strict: bool = True) -> dict[str, torch.Tensor]:
    """The state_dict (our keys) of a Keras ResNet weights file for `model` (a resnet*_keras model).

    Raises ValueError when the model is not a Keras-architecture ResNet, when a layer's variables do not fit
    (naming the Keras layer and our key) and, with strict, KeyError naming the Keras layers the file lacks or has in
    excess (a ResNet101 file for a ResNet50, a model that is not a ResNet)."""
    where = os.fspath(path)
    if not getattr(model, "_mltk_keras", False):
        raise ValueError(f"keras: {where!r} holds Keras weights; Keras' ResNet differs from torchvision's (stride on "
                         "the 1x1 conv, conv biases, BN eps 1.001e-5): load it into the Keras architecture, "
                         "create_model('resnet50_keras', pretrained_path=...) (or resnet101_keras / resnet152_keras)")
    layers = read_keras_weights(path)
    blocks = _blocks_of(model)
    arch = KERAS_RESNETS.get(blocks, f"ResNet{blocks}")
    expected = keras_resnet_layers(blocks)
    if "conv1_conv" not in layers:
        raise KeyError(f"keras: {where!r} is not a Keras ResNet weights file: it has no layer 'conv1_conv' (its "
                       f"layers: {', '.join(list(layers)[:8])}{', ...' if len(layers) > 8 else ''})")
    missing = [n for n in expected if n not in layers and n != "predictions"]
    unexpected = [n for n in layers if n not in expected]
    if "predictions" not in layers:  # include_top=False: our fc stays as it is
        warnings.warn(f"keras: {where!r} has no 'predictions' layer (saved with include_top=False?): the model's fc "
                      "is left unloaded", stacklevel=3)
    if missing or unexpected:
        msg = (f"keras: {where!r} does not match a Keras {arch}: {len(missing)} missing layer(s) "
               f"[{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}], {len(unexpected)} unexpected "
               f"layer(s) [{', '.join(unexpected[:8])}{', ...' if len(unexpected) > 8 else ''}]")
        found = keras_blocks(layers)
        if found in KERAS_RESNETS and found != blocks:
            msg += f"; the file holds a Keras {KERAS_RESNETS[found]}"
        if strict:
            raise KeyError(msg + "; pass strict=False to load the rest")
        warnings.warn(msg, stacklevel=3)
    own = model.state_dict()
    sd: dict[str, torch.Tensor] = {}
    for lname, variables in layers.items():
        if lname not in expected:
            continue
        ours, kind = expected[lname]
        for key, value in _convert_layer(lname, kind, ours, variables, where).items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                hint = " (a different num_classes / classes?)" if lname == "predictions" else ""
                raise ValueError(f"keras: {where}: layer {lname!r} gives {key!r} the shape {list(value.shape)} but "
                                 f"the model's {key!r} has shape {list(own[key].shape)}{hint}")
            sd[key] = value
    return sd


def keras_blocks(layers) -> tuple[int, ...]:
    """The number of blocks per stage (conv2..conv5) in a Keras ResNet's layer names."""
    counts = [0, 0, 0, 0]
    for name in layers:
        m = re.fullmatch(r"conv([2-5])_block(\d+)_1_conv", name)
        if m:
            s = int(m.group(1)) - 2
            counts[s] = max(counts[s], int(m.group(2)))
    return tuple(counts)


def infer_model(path: str | os.PathLike) -> tuple[str, dict]:
    """(model name, kwargs) that a Keras ResNet weights file loads into: resnet50/101/152_keras by its blocks,
    num_classes from its predictions layer."""
    layers = read_keras_weights(path)
    blocks = keras_blocks(layers)
    if "conv1_conv" not in layers or blocks not in KERAS_RESNETS:
        raise ValueError(f"from_pretrained: {os.fspath(path)!r} is a Keras weights file but not of a Keras "
                         f"ResNet50/101/152 (blocks per stage found: {blocks}); only those load")
    kwargs = {}
    if "predictions" in layers:
        kernel = dict(layers["predictions"]).get("kernel", layers["predictions"][0][1])
        kwargs["num_classes"] = int(kernel.shape[-1])
    return f"{KERAS_RESNETS[blocks].lower()}_keras", kwargs
