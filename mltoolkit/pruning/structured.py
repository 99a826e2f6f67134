"""Structured channel pruning that physically shrinks a model.

channel_prune(model, amount, example_inputs) removes the output channels of lowest L1 norm from each nn.Linear /
nn.ConvNd (the "producers") together with everything indexed by those channels downstream: the input channels of
the next convolution or linear layer, the per-channel parameters and statistics of BatchNorm / InstanceNorm /
LayerNorm / RMSNorm / PReLU in between (also F.layer_norm with a module's weight and bias, as in ConvNeXt's
LayerNorm2d), parameters combined elementwise with the channels (a layer scale gamma of shape (C, 1, 1)), the
channels of depthwise convolutions (whose channels are tied to their input), and the matching input features of a
Linear after a flatten (channel c of an (N, C, H, W) tensor is the H*W features c*H*W ... (c+1)*H*W - 1). The
result is the same model (same classes, same forward code) with smaller weights: it runs, has fewer parameters and,
for amount=0, computes exactly what it did.

How channels are followed (the dependency graph, after Torch-Pruning's idea): torch.fx traces the model and
torch.fx's ShapeProp runs it once on example_inputs, recording every intermediate shape. Each producer's output
channels form a "channel space"; each traced value records which positions of its channel dimension come from
which space (a list of segments, so a concatenation along channels or a flatten is described exactly), and where
that dimension sits (permute, transpose, flatten and view are followed). Elementwise operations between two values
carrying channels (a residual add, a gating multiply) tie their spaces: the layers feeding such an add form one
group, pruned with the same channel indices, ranked by the sum of their (mean-normalized) channel norms. A group is
left whole ("blocked") when its channels reach the model's output, meet a tensor whose channels cannot be pruned
(the model input, a parameter, an ignored layer), or flow into an operation the pruner does not understand (a
grouped convolution, GroupNorm, a reshape that splits channels, indexing, chunk, ...): with strict=True (the
default) the last case raises PruningError naming the layers and the operation; with strict=False those groups are
left unpruned and listed by channel_groups().
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from mltoolkit.pruning.unstructured import _check_layer_types, _check_model, check_amount

PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruningError(ValueError):
    """The model's channels flow somewhere channel pruning cannot follow, or the model cannot be traced."""


# ------------------------------------------------------------------------------------------------ operation tables

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                        nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign,
                        nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                        nn.AlphaDropout)
_POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                 nn.modules.pooling._AdaptiveMaxPoolNd)
_PAD_MODULES = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                nn.modules.padding._ReplicationPadNd, nn.ZeroPad2d)

_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.elu, F.selu, F.celu, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.abs, torch.neg, torch.exp, torch.clamp, torch.clip,
    torch.square, torch.sqrt, torch.rsqrt, torch.erf, torch.pow,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.neg, operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, torch.where,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "clamp", "clamp_", "clamp_min",
    "clamp_max", "clip", "square", "sqrt", "rsqrt", "pow", "add", "add_", "sub", "sub_", "mul", "mul_", "div",
    "div_", "maximum", "minimum",
}
# torchvision.ops.stochastic_depth (EfficientNet, ConvNeXt): x times per-sample noise of shape (N, 1, ...) in training
_ELEMENTWISE_BY_NAME = {"stochastic_depth"}
_SELF_METHODS = {"contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to", "type_as",
                 "requires_grad_", "cpu", "cuda"}
_POOL_FUNCTIONS = {  # function -> number of trailing spatial dims it works on
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
}
_REDUCE = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "element_size", "get_device", "is_contiguous"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}


# --------------------------------------------------------------------------------------------------- the data model

@dataclasses.dataclass(frozen=True)
class _Seg:
    space: Optional[int]  # channel space id, None for channels that are never pruned
    n: int  # channels of the space (or fixed entries)
    expand: int = 1  # consecutive entries per channel (a flatten of trailing dims multiplies it)

    @property
    def size(self) -> int:
        return self.n * self.expand


@dataclasses.dataclass(frozen=True)
class _Layout:
    cdim: int  # where the channel dimension is (non-negative)
    segs: tuple[_Seg, ...]

    def scaled(self, factor: int, cdim: Optional[int] = None) -> _Layout:
        return _Layout(self.cdim if cdim is None else cdim,
                       tuple(_Seg(s.space, s.n, s.expand * factor) for s in self.segs))

    def moved(self, cdim: int) -> _Layout:
        return _Layout(cdim, self.segs)

    @property
    def spaces(self) -> list[int]:
        return [s.space for s in self.segs if s.space is not None]


@dataclasses.dataclass
class ChannelGroup:
    """Layers whose output channels are pruned together (with the same indices), and what follows them."""

    layers: list[str]  # the producers: their output channels (weight dim 0) are pruned
    channels: int
    consumers: list[str]  # modules whose input channels / per-channel tensors follow
    blocked: list[str]  # why the group is left whole (empty: prunable)

    @property
    def prunable(self) -> bool:
        return not self.blocked

    def __str__(self) -> str:
        state = "prunable" if self.prunable else "kept whole: " + "; ".join(self.blocked)
        return f"[{', '.join(self.layers)}] {self.channels} channels -> {', '.join(self.consumers) or '-'} ({state})"


@dataclasses.dataclass
class _Action:
    kind: str  # "out": weight dim out_dim by a space; "in": weight dim in_dim by a layout; "chan": per-channel
    #           tensors by a layout; "dw": depthwise conv, in layout -> out layout; "param": the parameter or buffer
    #           named `module` along dimension `dim` by a layout; "shape": set `module`.normalized_shape
    module: str
    layout: Optional[_Layout] = None
    space: Optional[int] = None
    out_layout: Optional[_Layout] = None
    dim: int = 0


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op == "call_method":
        return f"Tensor.{node.target}() (fx node {node.name!r})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}() (fx node {node.name!r})"
    return f"{node.op} {node.name!r}"


# ------------------------------------------------------------------------------------------------------ the tracer

class _Builder:
    def __init__(self, root: nn.Module, gm: fx.GraphModule, layer_types, ignore: set[str], strict: bool):
        self.root, self.gm, self.layer_types, self.ignore, self.strict = root, gm, layer_types, ignore, strict
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.n: list[int] = []
        self.producers: list[list[str]] = []
        self.blocked: list[list[str]] = []
        self.actions: list[_Action] = []
        self.env: dict[fx.Node, _Layout] = {}
        self.calls: dict[str, int] = {}  # call_module / get_attr target -> number of nodes using it
        for node in gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    # union-find over channel spaces
    def new_space(self, n: int, producer: str) -> int:
        self.parent.append(len(self.parent))
        self.n.append(n)
        self.producers.append([producer])
        self.blocked.append([])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.producers[a] += self.producers[b]
            self.blocked[a] += self.blocked[b]

    def block(self, spaces, reason: str) -> None:
        for s in spaces:
            r = self.find(s)
            if reason not in self.blocked[r]:
                self.blocked[r].append(reason)

    def names(self, spaces) -> str:
        names = []
        for s in spaces:
            names += [p for p in self.producers[self.find(s)] if p not in names]
        return ", ".join(repr(n) for n in names)

    def unsupported(self, node: fx.Node, layout: _Layout, why: str) -> None:
        what = _describe(node, self.modules)
        if self.strict:
            raise PruningError(
                f"channel_prune: the output channels of {self.names(layout.spaces)} flow into {what}, which channel "
                f"pruning cannot follow ({why}); pass ignore=[...] naming those layers to leave them unpruned, or "
                f"strict=False to leave every such group whole")
        self.block(layout.spaces, f"flows into {what}: {why}")

    def unify(self, a: _Layout, b: _Layout, node: fx.Node) -> bool:
        """Ties the spaces of two layouts that must index the same channels; False when their structures differ."""
        if len(a.segs) != len(b.segs) or any(x.n != y.n or x.expand != y.expand or (x.space is None) !=
                                             (y.space is None) for x, y in zip(a.segs, b.segs)):
            return False
        for x, y in zip(a.segs, b.segs):
            if x.space is not None:
                self.union(x.space, y.space)
        return True

    # ------------------------------------------------------------------------------------------------ propagation
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            layouts = [self.env[a] for a in node.all_input_nodes if a in self.env]
            if node.op == "output":
                for lay in layouts:
                    self.block(lay.spaces, "reaches the model output")
                continue
            if node.op == "call_module":
                out = self.module(node, self.modules[node.target])
            elif not layouts:
                out = None
            elif node.op == "call_function":
                out = self.function(node)
            elif node.op == "call_method":
                out = self.method(node)
            else:
                out = None
            if out is not None and out.spaces:
                self.env[node] = out

    def first(self, node: fx.Node) -> tuple[Optional[fx.Node], Optional[_Layout]]:
        x = node.args[0] if node.args else None
        return x, self.env.get(x) if isinstance(x, fx.Node) else None

    def module(self, node: fx.Node, mod: nn.Module) -> Optional[_Layout]:
        name = node.target
        x, lay = self.first(node)
        in_shape, out_shape = _shape(x), _shape(node)
        if lay is not None and len(node.all_input_nodes) > 1 and any(
                a in self.env for a in node.all_input_nodes[1:]):
            self.unsupported(node, lay, "a module taking several channel-carrying inputs")
            return None
        once = self.calls.get(name, 0) == 1
        has_state = any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False))
        if lay is not None and has_state and not once:
            self.unsupported(node, lay, "the module is called more than once")
            return None

        if isinstance(mod, (nn.Linear, _ConvNd)):
            is_linear = isinstance(mod, nn.Linear)
            transposed = isinstance(mod, _ConvTransposeNd)
            groups = 1 if is_linear else mod.groups
            if in_shape is not None and out_shape is not None:
                cin = len(in_shape) - 1 if is_linear else len(in_shape) - len(mod.kernel_size) - 1
                cout = len(out_shape) - 1 if is_linear else len(out_shape) - len(mod.kernel_size) - 1
            else:
                cin = cout = None
            depthwise = (not is_linear and not transposed and groups > 1 and groups == mod.in_channels
                         and mod.out_channels % mod.in_channels == 0)
            if lay is not None:
                if lay.cdim != cin:
                    self.unsupported(node, lay, f"its input channels are not on dimension {cin} (they are on "
                                                f"{lay.cdim})")
                    return None
                if depthwise:
                    out = lay.scaled(mod.out_channels // mod.in_channels, cout)
                    self.actions.append(_Action("dw", name, layout=lay, out_layout=out))
                    return out
                if groups != 1:
                    self.unsupported(node, lay, f"grouped convolution (groups={groups}) ties channels in groups")
                    return None
                self.actions.append(_Action("in", name, layout=lay))
            if (isinstance(mod, self.layer_types) and groups == 1 and name not in self.ignore and once
                    and cout is not None):
                n = mod.out_features if is_linear else mod.out_channels
                space = self.new_space(n, name)
                self.actions.append(_Action("out", name, space=space))
                return _Layout(cout, (_Seg(space, n),))
            return None
        if lay is None:
            return None
        ndim = len(in_shape) if in_shape is not None else None
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return lay
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters == 1:
                return lay
            if lay.cdim != (1 if ndim >= 2 else 0):
                self.unsupported(node, lay, "PReLU's parameters are not along the pruned dimension")
                return None
            self.actions.append(_Action("chan", name, layout=lay))
            return lay
        if isinstance(mod, _NormBase):  # BatchNorm*, InstanceNorm*
            expected = (0 if ndim == mod._get_no_batch_dim() else 1) if isinstance(mod, _InstanceNorm) else 1
            if lay.cdim != expected:
                self.unsupported(node, lay, f"it normalizes dimension {expected}, the channels are on {lay.cdim}")
                return None
            if not (isinstance(mod, _BatchNorm) or mod.affine or mod.track_running_stats):
                return lay
            self.actions.append(_Action("chan", name, layout=lay))
            return lay
        rms = getattr(nn, "RMSNorm", ())
        if isinstance(mod, (nn.LayerNorm, rms) if rms else nn.LayerNorm):
            k = len(mod.normalized_shape)
            if lay.cdim < ndim - k:
                return lay
            if k != 1:
                self.unsupported(node, lay, "it normalizes over the channels together with other dimensions")
                return None
            self.actions.append(_Action("chan", name, layout=lay))
            return lay
        if isinstance(mod, _POOL_MODULES):
            spatial = int(type(mod).__name__[-2])
            return lay if lay.cdim < ndim - spatial else self.unsupported(node, lay, "it pools over the channels")
        if isinstance(mod, nn.Upsample):
            return lay if lay.cdim == 1 else self.unsupported(node, lay, "it resizes the channel dimension")
        if isinstance(mod, _PAD_MODULES):
            padded = len(mod.padding) // 2
            return lay if lay.cdim < ndim - padded else self.unsupported(node, lay, "it pads the channel dimension")
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, lay, in_shape, mod.start_dim, mod.end_dim)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            dim = mod.dim if mod.dim is not None else -1
            return lay if _norm_dim(dim, ndim) != lay.cdim else self.unsupported(
                node, lay, "a softmax over the channels")
        self.unsupported(node, lay, f"{type(mod).__name__} is not a module channel pruning knows")
        return None

    def elementwise(self, node: fx.Node) -> Optional[_Layout]:
        out_shape = _shape(node)
        if out_shape is None:
            return None
        ref = None
        for a in node.all_input_nodes:
            if a in self.env:
                ref = (a, self.env[a])
                break
        a0, lay0 = ref
        ndim = len(out_shape)
        cdim = lay0.cdim + ndim - len(_shape(a0))
        for a in node.all_input_nodes:
            shape = _shape(a)
            if shape is None:
                continue
            aligned = cdim - (ndim - len(shape))
            if aligned < 0 or shape[aligned] == 1 != out_shape[cdim]:
                continue  # broadcast along the channels: no constraint
            lay = self.env.get(a)
            if lay is None and self.own_param(a):  # e.g. a layer scale or a learned bias: pruned along
                self.actions.append(_Action("param", a.target, layout=lay0, dim=aligned))
            elif lay is None:
                self.block(lay0.spaces, f"combined by {_describe(node, self.modules)} with a tensor whose channels "
                                        f"cannot be pruned ({a.name!r})")
            elif lay.cdim != aligned or not self.unify(lay0, lay, node):
                self.unsupported(node, lay0, "an elementwise operation between tensors whose channels are laid out "
                                             "differently")
                return None
        return lay0.moved(cdim)

    def own_param(self, a: fx.Node) -> bool:
        """A parameter / buffer read once in the graph, by one node: it can be pruned along with the channels."""
        return a.op == "get_attr" and self.calls.get(a.target) == 1 and len(a.users) == 1

    def layer_norm(self, node: fx.Node, lay: _Layout, ndim: int) -> Optional[_Layout]:
        """F.layer_norm(x, normalized_shape, weight, bias): as LayerNorm, its weight and bias read from the graph."""
        shape = _arg(node, 1, "normalized_shape")
        k = len(shape)
        if lay.cdim < ndim - k:
            return lay
        if k != 1:
            return self.unsupported(node, lay, "it normalizes over the channels together with other dimensions")
        params = [p for p in (_arg(node, 2, "weight"), _arg(node, 3, "bias")) if p is not None]
        if not all(isinstance(p, fx.Node) and self.own_param(p) for p in params):
            return self.unsupported(node, lay, "its weight or bias is not a parameter read only there")
        owners = {p.target.rpartition(".")[0] for p in params}
        for p in params:
            self.actions.append(_Action("param", p.target, layout=lay, dim=0))
        for owner in owners:  # e.g. a LayerNorm subclass calling F.layer_norm(x, self.normalized_shape, ...)
            if isinstance(getattr(self.root.get_submodule(owner), "normalized_shape", None), (tuple, list)):
                self.actions.append(_Action("shape", owner, layout=lay))
        return lay

    def flatten(self, node, lay: _Layout, in_shape, start: int, end: int) -> Optional[_Layout]:
        ndim = len(in_shape)
        start, end = _norm_dim(start, ndim), _norm_dim(end, ndim)
        if lay.cdim < start:
            return lay
        if lay.cdim > end:
            return lay.moved(lay.cdim - (end - start))
        if any(d != 1 for d in in_shape[start:lay.cdim]):
            self.unsupported(node, lay, "a flatten that interleaves the channels with a dimension before them")
            return None
        return lay.scaled(math.prod(in_shape[lay.cdim + 1:end + 1]), start)

    def reshape(self, node, lay: _Layout, in_shape, out_shape) -> Optional[_Layout]:
        if in_shape is None or out_shape is None:
            self.unsupported(node, lay, "a reshape of unknown shape")
            return None
        p = 0
        while p < min(len(in_shape), len(out_shape)) and in_shape[p] == out_shape[p]:
            p += 1
        q = 0
        while (q < min(len(in_shape), len(out_shape)) - p and in_shape[len(in_shape) - 1 - q] ==
               out_shape[len(out_shape) - 1 - q]):
            q += 1
        if lay.cdim < p:
            return lay
        if lay.cdim >= len(in_shape) - q:
            return lay.moved(lay.cdim + len(out_shape) - len(in_shape))
        if len(out_shape) - q - p == 1 and all(d == 1 for d in in_shape[p:lay.cdim]):
            return lay.scaled(math.prod(in_shape[lay.cdim + 1:len(in_shape) - q]), p)
        self.unsupported(node, lay, f"a reshape {tuple(in_shape)} -> {tuple(out_shape)} that splits or interleaves "
                                    f"the channels")
        return None

    def reduce(self, node, lay: _Layout, ndim: int, dim, keepdim) -> Optional[_Layout]:
        if dim is None:
            self.unsupported(node, lay, "a reduction over all dimensions, channels included")
            return None
        dims = [_norm_dim(d, ndim) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if lay.cdim in dims:
            self.unsupported(node, lay, "a reduction over the channels")
            return None
        return lay if keepdim else lay.moved(lay.cdim - sum(d < lay.cdim for d in dims))

    def cat(self, node, tensors, dim) -> Optional[_Layout]:
        ref = next(self.env[t] for t in tensors if t in self.env)
        shapes = [_shape(t) for t in tensors]
        if any(s is None for s in shapes):
            self.unsupported(node, ref, "a concatenation of tensors of unknown shape")
            return None
        ndim = len(shapes[0])
        dim = _norm_dim(dim, ndim)
        if any(t in self.env and self.env[t].cdim != ref.cdim for t in tensors):
            self.unsupported(node, ref, "a concatenation of tensors whose channels are on different dimensions")
            return None
        if dim == ref.cdim:
            segs = []
            for t, s in zip(tensors, shapes):
                segs += list(self.env[t].segs) if t in self.env else [_Seg(None, s[dim])]
            return _Layout(ref.cdim, tuple(segs))
        for t in tensors:
            if t not in self.env:
                self.block(ref.spaces, f"concatenated by {_describe(node, self.modules)} with a tensor whose "
                                       f"channels cannot be pruned ({t.name!r})")
            elif not self.unify(ref, self.env[t], node):
                self.unsupported(node, ref, "a concatenation of tensors whose channels are laid out differently")
                return None
        return ref

    def permute(self, node, lay: _Layout, dims) -> Optional[_Layout]:
        ndim = len(dims)
        dims = [_norm_dim(d, ndim) for d in dims]
        return lay.moved(dims.index(lay.cdim))

    def transpose(self, node, lay: _Layout, d0, d1, ndim) -> _Layout:
        d0, d1 = _norm_dim(d0, ndim), _norm_dim(d1, ndim)
        return lay.moved(d1 if lay.cdim == d0 else d0 if lay.cdim == d1 else lay.cdim)

    def softmax(self, node, lay: _Layout, dim, ndim) -> Optional[_Layout]:
        if dim is None or _norm_dim(dim, ndim) == lay.cdim:
            return self.unsupported(node, lay, "a softmax over the channels")
        return lay

    def function(self, node: fx.Node) -> Optional[_Layout]:
        f = node.target
        x, lay = self.first(node)
        in_shape = _shape(x)
        if f is getattr and node.args[1] in _META_ATTRS:
            return None
        if f in _ELEMENTWISE_FUNCTIONS or getattr(f, "__name__", None) in _ELEMENTWISE_BY_NAME:
            return self.elementwise(node)
        if f in (torch.cat, torch.concat):
            tensors = list(_arg(node, 0, "tensors"))
            return self.cat(node, tensors, _arg(node, 1, "dim", 0))
        lay0 = lay if lay is not None else next(self.env[a] for a in node.all_input_nodes if a in self.env)
        if lay is None or in_shape is None:
            self.unsupported(node, lay0, "the channels are not in its first argument")
            return None
        ndim = len(in_shape)
        if f in _POOL_FUNCTIONS:
            spatial = _POOL_FUNCTIONS[f]
            return lay if lay.cdim < ndim - spatial else self.unsupported(node, lay, "it pools over the channels")
        if f is F.interpolate:
            return lay if lay.cdim == 1 else self.unsupported(node, lay, "it resizes the channel dimension")
        if f is F.pad:
            padded = len(_arg(node, 1, "pad")) // 2
            return lay if lay.cdim < ndim - padded else self.unsupported(node, lay, "it pads the channel dimension")
        if f is torch.flatten:
            return self.flatten(node, lay, in_shape, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if f is torch.reshape:
            return self.reshape(node, lay, in_shape, _shape(node))
        if f is torch.permute:
            return self.permute(node, lay, _arg(node, 1, "dims"))
        if f is torch.transpose:
            return self.transpose(node, lay, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"), ndim)
        if f in _REDUCE_FUNCTIONS:
            return self.reduce(node, lay, ndim, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if f is F.layer_norm:
            return self.layer_norm(node, lay, ndim)
        if f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            return self.softmax(node, lay, _arg(node, 1, "dim"), ndim)
        self.unsupported(node, lay, "an operation channel pruning does not know")
        return None

    def method(self, node: fx.Node) -> Optional[_Layout]:
        m = node.target
        x, lay = self.first(node)
        in_shape = _shape(x)
        if m in _META_METHODS:
            return None
        if m in _ELEMENTWISE_METHODS:
            return self.elementwise(node)
        if lay is None or in_shape is None:
            lay0 = next(self.env[a] for a in node.all_input_nodes if a in self.env)
            self.unsupported(node, lay0, "the channels are in an argument, not in the tensor the method is called on")
            return None
        ndim = len(in_shape)
        rest = node.args[1:]
        if m in _SELF_METHODS:
            return lay
        if m == "flatten":
            return self.flatten(node, lay, in_shape, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if m in ("view", "reshape"):
            return self.reshape(node, lay, in_shape, _shape(node))
        if m == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest or node.kwargs["dims"]
            return self.permute(node, lay, dims)
        if m == "transpose":
            return self.transpose(node, lay, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"), ndim)
        if m == "t":
            return self.transpose(node, lay, 0, 1, ndim) if ndim == 2 else lay
        if m in _REDUCE:
            return self.reduce(node, lay, ndim, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if m in ("softmax", "log_softmax"):
            return self.softmax(node, lay, _arg(node, 1, "dim"), ndim)
        self.unsupported(node, lay, "a tensor method channel pruning does not know")
        return None


# ----------------------------------------------------------------------------------------------------- entry points

def _inputs(fn: str, example_inputs) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError(f"{fn}: example_inputs must be a tensor or a non-empty tuple of the model's positional inputs, "
                    f"got {type(example_inputs).__name__}")


def _trace(fn: str, model: nn.Module, example_inputs: tuple, layer_types, ignore, strict: bool) -> _Builder:
    _check_model(fn, model)
    layer_types = _check_layer_types(fn, layer_types)
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            raise PruningError(f"{fn}: layer {name!r} carries parametrizations (pruning masks?); call "
                               f"mltoolkit.pruning.make_permanent(model) before channel pruning")
    if isinstance(ignore, str):
        ignore = [ignore]
    ignore = set(ignore or ())
    known = {n for n, _ in model.named_modules()}
    unknown = sorted(ignore - known)
    if unknown:
        raise ValueError(f"{fn}: ignore names modules the model does not have: {unknown}")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the same thing here
        raise PruningError(f"{fn}: torch.fx could not trace the model ({type(e).__name__}: {e}); channel pruning "
                           f"needs a forward without data-dependent control flow") from e
    modes = {m: m.training for m in model.modules()}
    model.eval()  # ShapeProp runs the model: keep BatchNorm statistics untouched
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001
        raise PruningError(f"{fn}: the model failed on example_inputs ({type(e).__name__}: {e})") from e
    finally:
        for m, t in modes.items():
            m.training = t
    builder = _Builder(model, gm, layer_types, ignore, strict)
    builder.run()
    return builder


def channel_groups(model: nn.Module, example_inputs, *, layer_types: Sequence[type[nn.Module]] = PRODUCER_TYPES,
                   ignore: Sequence[str] = (), strict: bool = False) -> list[ChannelGroup]:
    """The dependency groups channel_prune would work on: which layers' output channels are pruned together, what
    follows them, and why a group is left whole. Nothing is changed."""
    b = _trace("channel_groups", model, _inputs("channel_groups", example_inputs), layer_types, ignore, strict)
    return _groups(b)


def _groups(b: _Builder) -> list[ChannelGroup]:
    consumers: dict[int, list[str]] = {}
    for a in b.actions:
        lays = [a.layout] if a.layout is not None else []
        for s in {b.find(x) for lay in lays for x in lay.spaces}:
            consumers.setdefault(s, [])
            if a.module not in consumers[s]:
                consumers[s].append(a.module)
    roots = sorted({b.find(s) for s in range(len(b.parent))})
    return [ChannelGroup(list(b.producers[r]), b.n[r], consumers.get(r, []), list(b.blocked[r])) for r in roots]


def _importance(model: nn.Module, producers: list[str], p: float) -> Tensor:
    total = None
    for name in producers:
        w = model.get_submodule(name).weight.detach().float()
        if isinstance(model.get_submodule(name), _ConvTransposeNd):
            w = w.transpose(0, 1)
        norms = w.reshape(w.shape[0], -1).norm(p=p, dim=1).cpu()
        norms = norms / norms.mean().clamp_min(1e-12)  # each layer of a coupled group counts the same
        total = norms if total is None else total + norms
    return total


def _layout_index(lay: _Layout, keep: dict[int, Tensor], find) -> Tensor:
    parts, offset = [], 0
    for s in lay.segs:
        if s.space is None:
            parts.append(torch.arange(offset, offset + s.size))
        else:
            k = keep[find(s.space)]
            parts.append(offset + (k[:, None] * s.expand + torch.arange(s.expand)).reshape(-1))
        offset += s.size
    return torch.cat(parts)


def _select(t: Optional[Tensor], dim: int, idx: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().index_select(dim, idx.to(t.device)).clone()


def _set_param(mod: nn.Module, attr: str, value: Tensor) -> None:
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        mod._buffers[attr] = value


def _apply(model: nn.Module, b: _Builder, keep: dict[int, Tensor]) -> None:
    find = b.find
    for a in b.actions:
        if a.kind == "param":
            owner_name, _, attr = a.module.rpartition(".")
            owner = model.get_submodule(owner_name)
            _set_param(owner, attr, _select(getattr(owner, attr), a.dim, _layout_index(a.layout, keep, find)))
            continue
        mod = model.get_submodule(a.module)
        if a.kind == "out":
            idx = keep[find(a.space)]
            out_dim = 1 if isinstance(mod, _ConvTransposeNd) else 0
            _set_param(mod, "weight", _select(mod.weight, out_dim, idx))
            if mod.bias is not None:
                _set_param(mod, "bias", _select(mod.bias, 0, idx))
            if isinstance(mod, nn.Linear):
                mod.out_features = len(idx)
            else:
                mod.out_channels = len(idx)
        elif a.kind == "in":
            idx = _layout_index(a.layout, keep, find)
            in_dim = 0 if isinstance(mod, _ConvTransposeNd) else 1
            _set_param(mod, "weight", _select(mod.weight, in_dim, idx))
            if isinstance(mod, nn.Linear):
                mod.in_features = len(idx)
            else:
                mod.in_channels = len(idx)
        elif a.kind == "dw":
            idx_in = _layout_index(a.layout, keep, find)
            idx_out = _layout_index(a.out_layout, keep, find)
            _set_param(mod, "weight", _select(mod.weight, 0, idx_out))
            if mod.bias is not None:
                _set_param(mod, "bias", _select(mod.bias, 0, idx_out))
            mod.in_channels = mod.groups = len(idx_in)
            mod.out_channels = len(idx_out)
        elif a.kind == "shape":
            mod.normalized_shape = (len(_layout_index(a.layout, keep, find)),)
            continue
        elif a.kind == "chan":
            idx = _layout_index(a.layout, keep, find)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, attr, None) is not None:
                    _set_param(mod, attr, _select(getattr(mod, attr), 0, idx))
            if isinstance(mod, _NormBase):
                mod.num_features = len(idx)
            elif isinstance(mod, nn.PReLU):
                mod.num_parameters = len(idx)
            else:  # LayerNorm / RMSNorm over the channels only
                mod.normalized_shape = (len(idx),)
        for t in mod.parameters(recurse=False):
            t.grad = None


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def channel_prune(model: nn.Module, amount: float, example_inputs, *,
                  layer_types: Sequence[type[nn.Module]] = PRODUCER_TYPES, ignore: Sequence[str] = (),
                  strict: bool = True, round_to: int = 1, p: float = 1.0, inplace: bool = False,
                  verbose: bool = False) -> nn.Module:
    """Removes round(amount * C) of the C output channels of every prunable group of layers (see channel_groups),
    the channels of lowest L_p norm (p=1: L1), and everything that follows them; the kept count is rounded up to a
    multiple of round_to (e.g. 8 for tensor cores) and is at least 1. Works on a deep copy unless inplace=True;
    returns the pruned model, which is checked to run on example_inputs. Build the optimizer after pruning (the
    pruned layers have new Parameter objects). The layers whose output is the model's output keep their channels.

    layer_types: which layers' output channels may be pruned; ignore: qualified names of layers to leave their
    output channels alone (their inputs still follow the layers before them); strict: raise PruningError when
    channels flow into an operation the pruner cannot follow (False: leave those groups whole)."""
    fn = "channel_prune"
    _check_model(fn, model)
    amount = check_amount(fn, amount)
    inputs = _inputs(fn, example_inputs)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"{fn}: round_to must be an int >= 1, got {round_to!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"{fn}: p (the norm ranking channels) must be a number > 0, got {p!r}")
    if not inplace:
        model = copy.deepcopy(model)
    b = _trace(fn, model, inputs, layer_types, ignore, strict)
    groups = _groups(b)
    keep: dict[int, Tensor] = {}
    before = count_parameters(model)
    lines = []
    for r in sorted({b.find(s) for s in range(len(b.parent))}):
        n = b.n[r]
        n_keep = n - round(amount * n)
        n_keep = min(n, max(1, -(-n_keep // round_to) * round_to))
        if b.blocked[r] or n_keep == n:
            keep[r] = torch.arange(n)
            continue
        scores = _importance(model, b.producers[r], p)
        keep[r] = torch.sort(torch.topk(scores, n_keep, sorted=False).indices).values
        lines.append(f"  [{', '.join(b.producers[r])}]: {n} -> {n_keep} channels")
    _apply(model, b, keep)
    try:
        with torch.no_grad():
            modes = {m: m.training for m in model.modules()}
            model.eval()
            try:
                model(*inputs)
            finally:
                for m, t in modes.items():
                    m.training = t
    except Exception as e:  # noqa: BLE001
        raise PruningError(f"{fn}: the pruned model no longer runs on example_inputs ({type(e).__name__}: {e}); "
                           f"a channel count hard-coded in forward()? (ignore= the layers before it)") from e
    if verbose:
        kept = [g for g in groups if not g.prunable]
        print(f"channel_prune: {len(lines)} groups pruned, parameters {before} -> {count_parameters(model)}")
        print("\n".join(lines + [f"  kept whole: {g}" for g in kept]))
    return model
