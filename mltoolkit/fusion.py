"""`fuse_conv_bn_act(model)`: Conv2d -> BatchNorm2d [-> + residual] [-> activation] as one fused op.

With torch.fx (the model traces): every conv module whose only user is a batch-norm module (and whose batch-norm
output feeds only an activation, or an add whose result feeds only an activation) becomes one call of a
`FusedConvBNAct` module, which computes act(bn(conv(x)) + residual) with `mltoolkit.ops.conv2d_bn_act`. The
original conv and batch-norm modules stay where they were (same state_dict keys, same parameter objects, so a
checkpoint of the original model loads, and optimizers and .train()/.eval() keep working); the fused module only
refers to them. Returns the rewritten torch.fx.GraphModule.

When the model does not trace (data-dependent control flow), a module walk fuses what it can see without the graph:
consecutive Conv2d, BatchNorm2d[, activation] children of an nn.Sequential, in place (no residual adds). The conv
child then computes all three, the batch norm becomes a pass-through that keeps its parameters and buffers, and the
activation (when no other parent uses it) an nn.Identity.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from mltoolkit.nn.conv import Conv2d, activation_name, conv_bn_act_forward
from mltoolkit.ops.reference.conv import activation, output_size

log = logging.getLogger(__name__)

CONV_TYPES = (torch.nn.Conv2d, Conv2d)
BN_TYPES = (torch.nn.BatchNorm2d,)
# Functional forms of the activations the epilogue has; F.gelu's approximate keyword is read from the node.
ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu",
                        F.hardswish: "hardswish", F.gelu: "gelu"}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _exact(module: torch.nn.Module, types: tuple) -> bool:
    # A user's subclass may override forward: only torch's own classes (and mltoolkit's Conv2d) are fused.
    return type(module) in types


class FusedConvBNAct(torch.nn.Module):
    """act(bn(conv(x)) + residual) for a conv and a batch norm that live elsewhere in the model.

    The two modules are referenced, not registered: they stay registered at their original place, so the
    model's state_dict, .to() and .train() see them once.
    """

    def __init__(self, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, activation: str, conv_name: str = "",
                 bn_name: str = ""):
        super().__init__()
        object.__setattr__(self, "parts", (conv, bn))
        self.activation = activation
        self.names = (conv_name, bn_name)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        conv, bn = self.parts
        if residual is None or (residual.dtype == x.dtype and residual.device == x.device
                                and tuple(residual.shape) == _output_shape(conv, x)):
            return conv_bn_act_forward(conv, bn, self.activation, x, residual)
        # A residual that only broadcasts, or of another dtype: added outside the kernel, as the original did.
        return activation(conv_bn_act_forward(conv, bn, "none", x) + residual, self.activation)

    def extra_repr(self) -> str:
        return f"conv={self.names[0]!r}, bn={self.names[1]!r}, activation={self.activation!r}"


def _output_shape(conv: torch.nn.Conv2d, x: Tensor) -> tuple:
    """conv(x).shape; padding modes do not change it, "same" keeps the size, "valid" pads nothing."""
    h, w = x.shape[-2:]
    if conv.padding == "same":
        p, q = h, w
    else:
        pad = (0, 0) if conv.padding == "valid" else conv.padding
        p, q = output_size(h, w, *conv.kernel_size, conv.stride, pad, conv.dilation)
    return (*x.shape[:-3], conv.out_channels, p, q)


def _activation_of(node: torch.fx.Node, modules: dict) -> str | None:
    if node.op == "call_module":
        return activation_name(modules[node.target])
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        if len(node.args) != 1 or any(k not in ("inplace", "approximate") for k in node.kwargs):
            return None
        name = ACTIVATION_FUNCTIONS[node.target]
        if name == "gelu":
            approx = node.kwargs.get("approximate", "none")
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx) if isinstance(approx, str) else None
        return name
    if node.op == "call_method" and node.target in ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
        return ACTIVATION_METHODS[node.target]
    return None


def _other_add_operand(add: torch.fx.Node, node: torch.fx.Node) -> torch.fx.Node | None:
    """The residual of `add` = node + residual (either order), or None if `add` is not such a plain add."""
    if add.op != "call_function" or add.target not in ADD_FUNCTIONS or len(add.args) != 2 or add.kwargs:
        return None
    a, b = add.args
    other = b if a is node else a if b is node else None
    return other if isinstance(other, torch.fx.Node) and other is not node else None


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fuse_graph(gm: torch.fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    graph = gm.graph
    fused = 0
    for conv_node in list(graph.nodes):
        if conv_node.op != "call_module" or not _exact(modules[conv_node.target], CONV_TYPES):
            continue
        bn_node = _only_user(conv_node)
        if (bn_node is None or bn_node.op != "call_module" or not _exact(modules[bn_node.target], BN_TYPES)
                or len(bn_node.args) != 1 or bn_node.kwargs):
            continue
        conv, bn = modules[conv_node.target], modules[bn_node.target]
        if bn.num_features != conv.out_channels:
            continue
        last, residual, act = bn_node, None, "none"
        user = _only_user(bn_node)
        if user is not None and _activation_of(user, modules) is not None:
            last, act = user, _activation_of(user, modules)
        elif user is not None and _other_add_operand(user, bn_node) is not None:
            residual, last = _other_add_operand(user, bn_node), user
            after = _only_user(user)
            if after is not None and _activation_of(after, modules) is not None:
                last, act = after, _activation_of(after, modules)
        name = _free_name(gm, conv_node.target + "_bn_act")
        modules[name] = FusedConvBNAct(conv, bn, act, conv_node.target, bn_node.target)
        gm.add_submodule(name, modules[name])
        # The fused call goes where the pattern ends: by then the residual (often computed after the batch norm,
        # as in torchvision's BasicBlock) exists.
        with graph.inserting_before(last):
            args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
            new = graph.call_module(name, args)
        last.replace_all_uses_with(new)
        pattern = [conv_node, bn_node]
        while pattern[-1] is not last:
            pattern.append(_only_user(pattern[-1]))
        for node in reversed(pattern):  # each node's users are erased before it
            graph.erase_node(node)
        fused += 1
    graph.lint()
    gm.recompile()
    return fused


def _free_name(gm: torch.nn.Module, base: str) -> str:
    name, i = base, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}{i}"


# ---- module walk (models that do not trace) ------------------------------------------------------------------

class _ConvBNAct(torch.nn.Conv2d):
    """The conv of a walked Sequential computing conv -> bn -> act; shares the original conv's __dict__ (same
    parameters, same state_dict keys) and refers to the batch norm, which stays registered where it was."""

    def forward(self, input: Tensor) -> Tensor:
        return conv_bn_act_forward(self, self._fused_bn[0], self._fused_activation, input)


class _FoldedBatchNorm2d(torch.nn.BatchNorm2d):
    """A BatchNorm2d whose work the preceding _ConvBNAct does: a pass-through keeping its parameters and buffers."""

    def forward(self, input: Tensor) -> Tensor:
        return input


def _fuse_walk(model: torch.nn.Module) -> int:
    uses: dict[int, int] = {}
    for parent in model.modules():
        for child in parent._modules.values():
            if child is not None:
                uses[id(child)] = uses.get(id(child), 0) + 1
    fused = 0
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        i = 0
        while i + 1 < len(names):
            conv, bn = seq._modules[names[i]], seq._modules[names[i + 1]]
            if not (_exact(conv, CONV_TYPES) and _exact(bn, BN_TYPES) and bn.num_features == conv.out_channels
                    and uses[id(conv)] == 1 and uses[id(bn)] == 1):
                i += 1
                continue
            nxt = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            act = activation_name(nxt) if nxt is not None and uses.get(id(nxt)) == 1 else None
            new_conv = _ConvBNAct.__new__(_ConvBNAct)
            new_conv.__dict__.update(conv.__dict__)
            object.__setattr__(new_conv, "_fused_bn", (bn,))
            object.__setattr__(new_conv, "_fused_activation", act or "none")
            new_bn = _FoldedBatchNorm2d.__new__(_FoldedBatchNorm2d)
            new_bn.__dict__.update(bn.__dict__)
            object.__setattr__(new_conv, "_fused_bn", (new_bn,))
            seq._modules[names[i]], seq._modules[names[i + 1]] = new_conv, new_bn
            if act is not None:
                seq._modules[names[i + 2]] = torch.nn.Identity()
            fused += 1
            i += 3 if act is not None else 2
    return fused


def fuse_conv_bn_act(model: torch.nn.Module) -> torch.nn.Module:
    """Fuse Conv2d -> BatchNorm2d [-> + residual] [-> activation] (relu, relu6, silu, gelu, hardswish) patterns.

    Returns the fused model: a torch.fx.GraphModule when `model` traces (use the returned object), else `model`
    itself, fused in place by the module walk. Outputs equal the original's in eval and in train mode (where batch
    statistics and running-stat updates follow nn.BatchNorm2d); the state_dict keys are unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuse_conv_bn_act: model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the module walk
        log.info("fuse_conv_bn_act: %s does not trace with torch.fx (%s); fusing Sequential children only",
                 type(model).__name__, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _fuse_walk(model)
        return model
    gm.train(model.training)
    _fuse_graph(gm)
    return gm
