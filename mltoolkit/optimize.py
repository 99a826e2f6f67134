"""`optimize(model)`: swap torch modules for their mltoolkit twins in place, then fuse Conv2d -> BatchNorm2d
[-> + residual] [-> activation] patterns (mltoolkit.fuse_conv_bn_act).

The swap table maps a torch class to a function building the replacement from the original module; later op
families add their rows with `register_swap`. Only exact classes are swapped (a user's subclass of nn.LayerNorm may
override forward, so it is left alone). Parameters are shared, not copied: optimizers and hooks on them keep working.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from mltoolkit import fusion
from mltoolkit import nn as mnn

SWAPS: dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {}


def register_swap(torch_cls: type, build: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    SWAPS[torch_cls] = build


register_swap(torch.nn.LayerNorm, mnn.LayerNorm.from_torch)
register_swap(torch.nn.RMSNorm, mnn.RMSNorm.from_torch)
register_swap(torch.nn.MultiheadAttention, mnn.MultiheadAttention.from_torch)
register_swap(torch.nn.LSTM, mnn.LSTM.from_torch)
register_swap(torch.nn.GRU, mnn.GRU.from_torch)


def _register_optional_swaps() -> None:
    """Rows for classes of optional libraries, once the user has imported them (importing them here would cost every
    user their import time)."""
    tv_misc = sys.modules.get("torchvision.ops.misc")
    if tv_misc is not None and hasattr(tv_misc, "SqueezeExcitation"):
        SWAPS.setdefault(tv_misc.SqueezeExcitation, mnn.SqueezeExcitation.from_torchvision)


def _excite_in_place(model: torch.nn.Module, swapped: set[int]) -> None:
    """The squeeze-excitation blocks optimize() swapped in that follow a convolution block in an nn.Sequential (as in
    torchvision's MBConv and InvertedResidual blocks) scale their input in place when autograd does not record: that
    input is the convolution's fresh output, which only the block reads (like the in-place SiLU / ReLU those
    convolution blocks already apply to their own outputs)."""
    tv_misc = sys.modules.get("torchvision.ops.misc")
    fresh = (*fusion.CONV_TYPES, mnn.Conv2dBNAct)
    if tv_misc is not None and hasattr(tv_misc, "ConvNormActivation"):
        fresh += (tv_misc.ConvNormActivation,)
    for seq in model.modules():
        if isinstance(seq, torch.nn.Sequential):
            children = list(seq.children())
            for before, block in zip(children, children[1:]):
                if id(block) in swapped and type(block) is mnn.SqueezeExcitation and isinstance(before, fresh):
                    block.inplace = True


def optimize(model: torch.nn.Module, *, channels_last: bool = True) -> torch.nn.Module:
    """Replace every module whose exact class is in the swap table, in place, and fuse convolution + batch norm +
    activation; returns the optimized model: use the returned object.

    A model with Conv2d and BatchNorm2d modules comes back as a torch.fx.GraphModule when it traces (same
    parameters and state_dict keys; see fuse_conv_bn_act), otherwise as `model` itself. A model that is itself a
    swappable module is converted and returned (it cannot be replaced in a parent).

    channels_last (default True): a model with 2-D convolutions gets its 4-D parameters and buffers in
    channels_last (model.to(memory_format=torch.channels_last): the same Parameter objects, in place), so that its
    convolutions compute, and return, channels_last activations whatever the input's layout (F.conv2d's rule for a
    channels_last weight), the layout mltoolkit's convolution kernels run fastest in (ResNet-50 on the CPU: NCHW
    activations cost ~25% more, each convolution transposing its input and output). Values are unchanged; 4-D
    outputs come back channels_last (torch.flatten / reshape work on them, .view of all dims may not). False keeps
    the model's layout.

    torchvision's squeeze-excitation blocks that follow a convolution block in an nn.Sequential (MBConv,
    InvertedResidual) become mltoolkit's with inplace=True: without autograd they scale the convolution's fresh
    output in place, as those blocks' in-place activations already do to theirs.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"optimize: channels_last must be a bool, got {channels_last!r}")
    _register_optional_swaps()
    if type(model) in SWAPS:
        return SWAPS[type(model)](model)
    swapped = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            build = SWAPS.get(type(child))
            if build is not None:
                new = build(child)
                setattr(parent, name, new)
                swapped.add(id(new))
    _excite_in_place(model, swapped)
    kinds = {type(m) for m in model.modules()}
    if kinds & set(fusion.CONV_TYPES) and kinds & set(fusion.BN_TYPES):
        model = fusion.fuse_conv_bn_act(model)
    # (fusion keeps the conv modules: the kinds seen before it still hold)
    if channels_last and any(issubclass(k, fusion.CONV_TYPES) for k in kinds):
        model.to(memory_format=torch.channels_last)
    return model
