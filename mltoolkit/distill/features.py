"""Intermediate-feature distillation (FitNets, Romero et al. 2015, and its many descendants): forward hooks capture
the outputs of chosen student and teacher layers, a learned projection maps the student's width to the teacher's
where they differ, and a distance between the pairs is added to the training loss."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureLoss = Union[str, Callable[[Tensor, Tensor], Tensor]]
_LOSSES = ("mse", "l1", "smooth_l1", "cosine")
# module types whose output has its channels in dimension 1 (N, C, ...) rather than last
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.GroupNorm, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def _module_width(module: nn.Module) -> Optional[tuple[int, int]]:
    """(width, channel_dim) of a module's output read from its type, or None when the type does not say."""
    if isinstance(module, nn.Sequential):  # the last layer that sets a width, past activations and dropout
        for child in reversed(module):
            width = _module_width(child)
            if width is not None:
                return width
            if not _shape_preserving(child):
                return None
        return None
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return module.out_features, -1
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, 1
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.normalized_shape:
        return module.normalized_shape[-1], -1
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, -1
    return None


def _layer_width(root: nn.Module, name: str) -> Optional[tuple[int, int]]:
    """_module_width of a named layer; for an activation or dropout inside a Sequential, that of the layer before."""
    module = root.get_submodule(name)
    width = _module_width(module)
    if width is None and _shape_preserving(module) and name:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            return _module_width(nn.Sequential(*[parent._modules[n] for n in names[:names.index(child) + 1]]))
    return width


def _shape_preserving(module: nn.Module) -> bool:
    """Modules after which a Sequential's width is still that of the layer before them (activations, dropout)."""
    return isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU,
                               nn.Mish, nn.Hardswish, nn.Identity, nn.modules.dropout._DropoutNd))


def _default_channel_dim(module: nn.Module, feature: Tensor) -> int:
    """Channels are dimension 1 for feature maps (4 or 5 dims) and for the outputs of convolution / batch-norm
    layers, the last dimension otherwise ((N, D), (N, T, D))."""
    if feature.dim() >= 4:
        return 1
    if isinstance(module, nn.Sequential):
        width = _module_width(module)
        return width[1] if width is not None else -1
    return 1 if isinstance(module, _CHANNELS_FIRST) and feature.dim() >= 2 else -1


def _as_tensor(output, name: str, role: str) -> Tensor:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]  # (hidden, state) of RNNs, (out, weights) of attention, tuple outputs of HF layers
    if not isinstance(output, Tensor):
        raise TypeError(f"FeatureDistiller: the output of {role} layer {name!r} is {type(output).__name__}, not a "
                        f"Tensor (or a tuple whose first element is one); pick another layer")
    return output


class ChannelProjection(nn.Module):
    """A learned linear map of the channel dimension from `in_channels` to `out_channels`: nn.Linear for features
    with channels last, (N, ..., C), and the same weights used as a 1x1 convolution for feature maps with channels
    in dimension 1, (N, C, L), (N, C, H, W), (N, C, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, channel_dim: int = -1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.channel_dim = in_channels, out_channels, channel_dim
        self.linear = nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        dim = self.channel_dim % x.dim()
        if dim == x.dim() - 1:
            return self.linear(x)
        if dim == 1 and 3 <= x.dim() <= 5:
            conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
            weight = self.linear.weight.view(*self.linear.weight.shape, *([1] * (x.dim() - 2)))
            return conv(x, weight, self.linear.bias)
        return self.linear(x.movedim(dim, -1)).movedim(-1, dim)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, channel_dim={self.channel_dim}"


def _find(root: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; it has {names[:8]}..."
        raise ValueError(f"FeatureDistiller: pairs names {role} layer {name!r}, which the {role} model does not "
                         f"have{hint}") from None


def _key(name: str) -> str:
    return name.replace(".", "-") if name else "<root>"


class FeatureDistiller(nn.Module):
    """Matches intermediate features of a student to a teacher's through forward hooks.

        fd = FeatureDistiller(student, teacher, pairs={"blocks.2": "blocks.8"}, loss="mse")
        optimizer = torch.optim.AdamW([*student.parameters(), *fd.parameters()])  # the projections learn too
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = criterion(s_logits, t_logits, y) + beta * fd()  # fd(): the summed feature loss
        fd.remove()  # or: with FeatureDistiller(...) as fd:

    pairs: student layer name -> teacher layer name (names as in named_modules(); "" is the whole model). Each
    forward of a hooked layer stores its output (the first element of a tuple output; a layer called several
    times per forward keeps its last output); the teacher's is detached. Calling the distiller computes
    sum over pairs of weight * loss(projection(student_feature), teacher_feature) and, by default, clears the
    captured features.

    loss: "mse", "l1", "smooth_l1" (mean over all elements), "cosine" (1 - cosine similarity along the channel
    dimension, averaged over the other positions) or a callable(student_feature, teacher_feature) -> scalar.
    projections: "auto" (default) adds a ChannelProjection (nn.Linear over channels-last features, a 1x1
    convolution over (N, C, ...) feature maps) for each pair whose widths differ; "always" adds one to every pair
    (FitNets' regressor); None adds none (pairs must then have equal shapes); a dict student name -> nn.Module
    supplies your own for those pairs (e.g. a projection followed by pooling when spatial sizes differ), the rest
    following "auto". Widths are read from the layer types (Linear, Conv, norms, Embedding, and Sequential blocks
    ending in one); for other layers pass example_inputs (a tensor or tuple of positional inputs) and both models
    are run once on it, in eval mode and without gradients, to measure the features. The projections are this
    module's parameters, created on the student's device and dtype: give them to the optimizer.
    channel_dim: "auto" (1 for feature maps with 4 or 5 dimensions and for conv / batch-norm outputs, else the last
    dimension) or an int for every pair.
    weights: a float for every pair or a dict student name -> float (missing names weigh 1)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Mapping[str, str], *,
                 loss: FeatureLoss = "mse", projections: Union[str, None, Mapping[str, nn.Module]] = "auto",
                 weights: Union[float, Mapping[str, float]] = 1.0, channel_dim: Union[str, int] = "auto",
                 example_inputs=None):
        super().__init__()
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError(f"FeatureDistiller: student and teacher must be nn.Module, got "
                            f"{type(student).__name__} and {type(teacher).__name__}")
        if not isinstance(pairs, Mapping) or not pairs:
            raise ValueError("FeatureDistiller: pairs must be a non-empty dict {student layer name: teacher layer "
                             "name}")
        for s_name, t_name in pairs.items():
            if not isinstance(s_name, str) or not isinstance(t_name, str):
                raise TypeError(f"FeatureDistiller: pairs must map layer names (str) to layer names, got "
                                f"{s_name!r}: {t_name!r}")
        if not (callable(loss) or loss in _LOSSES):
            raise ValueError(f"FeatureDistiller: loss must be one of {_LOSSES} or a callable, got {loss!r}")
        if not (channel_dim == "auto" or (isinstance(channel_dim, int) and not isinstance(channel_dim, bool))):
            raise ValueError(f"FeatureDistiller: channel_dim must be 'auto' or an int, got {channel_dim!r}")
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(pairs)
            if unknown:
                raise ValueError(f"FeatureDistiller: weights names {sorted(unknown)}, which are not student layers "
                                 f"in pairs")
            self.weights = {name: float(weights.get(name, 1.0)) for name in pairs}
        elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
            self.weights = {name: float(weights) for name in pairs}
        else:
            raise TypeError(f"FeatureDistiller: weights must be a float or a dict, got {type(weights).__name__}")
        custom = {}
        if isinstance(projections, Mapping):
            custom = dict(projections)
            unknown = set(custom) - set(pairs)
            if unknown:
                raise ValueError(f"FeatureDistiller: projections names {sorted(unknown)}, which are not student "
                                 f"layers in pairs")
            for name, module in custom.items():
                if not isinstance(module, nn.Module):
                    raise TypeError(f"FeatureDistiller: projections[{name!r}] must be an nn.Module, got "
                                    f"{type(module).__name__}")
            mode = "auto"
        elif projections in ("auto", "always", None):
            mode = projections
        else:
            raise ValueError(f"FeatureDistiller: projections must be 'auto', 'always', None or a dict of modules, "
                             f"got {projections!r}")

        # student and teacher are kept out of this module's parameters and state_dict
        self._models = (student, teacher)
        self.pairs = dict(pairs)
        self.loss_fn = loss
        self.channel_dim = channel_dim
        self._student_layers = {name: _find(student, name, "student") for name in self.pairs}
        self._teacher_layers = {name: _find(teacher, name, "teacher") for name in set(self.pairs.values())}
        self._student_features: dict[str, Tensor] = {}
        self._teacher_features: dict[str, Tensor] = {}
        self._handles: list = []
        self.attach()

        try:  # no hooks left behind when the projections cannot be built
            widths = self._widths(example_inputs) if mode is not None else {}
            self.projections = nn.ModuleDict()
            param = next(student.parameters(), None)
            factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
            for s_name, t_name in self.pairs.items():
                if s_name in custom:
                    self.projections[_key(s_name)] = custom[s_name]
                    continue
                if mode is None:
                    continue
                s_width, t_width = widths.get(("student", s_name)), widths.get(("teacher", t_name))
                if s_width is None or t_width is None:
                    if mode == "always" or example_inputs is not None:
                        raise ValueError(f"FeatureDistiller: cannot tell the width of student layer {s_name!r} or "
                                         f"teacher layer {t_name!r} for a projection; pass example_inputs= or a "
                                         f"projection module in projections={{{s_name!r}: ...}}")
                    continue  # checked when the features arrive: equal shapes need no projection
                if mode == "always" or s_width[0] != t_width[0]:
                    projection = ChannelProjection(s_width[0], t_width[0], s_width[1])
                    self.projections[_key(s_name)] = projection.to(**factory)
        except BaseException:
            self.remove()
            raise

    @property
    def student(self) -> nn.Module:
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        return self._models[1]

    def _resolve_channel_dim(self, module: nn.Module, feature: Tensor) -> int:
        return _default_channel_dim(module, feature) if self.channel_dim == "auto" else self.channel_dim

    def _widths(self, example_inputs) -> dict[tuple[str, str], tuple[int, int]]:
        """(role, layer name) -> (width, channel_dim), from the layer types or from one run on example_inputs."""
        widths = {}
        if example_inputs is not None:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            for model in self._models:
                was_training = model.training
                model.eval()
                try:
                    with torch.no_grad():
                        model(*args)
                finally:
                    model.train(was_training)
            for role, layers, feats in (("student", self._student_layers, self._student_features),
                                        ("teacher", self._teacher_layers, self._teacher_features)):
                for name, module in layers.items():
                    if name not in feats:
                        raise ValueError(f"FeatureDistiller: {role} layer {name!r} did not run on example_inputs")
                    feature = feats[name]
                    dim = self._resolve_channel_dim(module, feature)
                    widths[(role, name)] = (feature.shape[dim], dim)
            self.clear()
            return widths
        for role, layers in (("student", self._student_layers), ("teacher", self._teacher_layers)):
            for name in layers:
                width = _layer_width(self._models[role == "teacher"], name)
                if width is not None:
                    if isinstance(self.channel_dim, int):
                        width = (width[0], self.channel_dim)
                    widths[(role, name)] = width
        return widths

    def attach(self) -> FeatureDistiller:
        """Registers the forward hooks (done by the constructor; again after remove())."""
        if self._handles:
            return self

        def hook(store: dict, name: str, role: str, detach: bool):
            def capture(module, args, output):
                feature = _as_tensor(output, name, role)
                store[name] = feature.detach() if detach else feature
            return capture

        for name, module in self._student_layers.items():
            self._handles.append(module.register_forward_hook(hook(self._student_features, name, "student", False)))
        for name, module in self._teacher_layers.items():
            self._handles.append(module.register_forward_hook(hook(self._teacher_features, name, "teacher", True)))
        return self

    def remove(self) -> None:
        """Removes the hooks and drops captured features; the models are left as they were. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def clear(self) -> None:
        """Drops the captured features (and the graph they hold)."""
        self._student_features.clear()
        self._teacher_features.clear()

    @property
    def student_features(self) -> dict[str, Tensor]:
        """The captured student features, by layer name (before projection)."""
        return dict(self._student_features)

    @property
    def teacher_features(self) -> dict[str, Tensor]:
        """The captured teacher features (detached), by layer name."""
        return dict(self._teacher_features)

    def __enter__(self) -> FeatureDistiller:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _pair_loss(self, s_name: str, s: Tensor, t: Tensor) -> Tensor:
        if callable(self.loss_fn):
            return self.loss_fn(s, t)
        dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)  # float32 for half inputs
        s, t = s.to(dtype), t.to(dtype)
        if self.loss_fn == "mse":
            return F.mse_loss(s, t)
        if self.loss_fn == "l1":
            return F.l1_loss(s, t)
        if self.loss_fn == "smooth_l1":
            return F.smooth_l1_loss(s, t)
        dim = self._resolve_channel_dim(self._student_layers[s_name], s)
        return (1.0 - F.cosine_similarity(s, t, dim=dim, eps=1e-8)).mean()

    def forward(self, *, return_parts: bool = False, clear: bool = True):
        """The summed, weighted feature loss over all pairs for the last student and teacher forwards.
        return_parts=True returns (total, {student layer name: unweighted loss tensor})."""
        total, parts = None, {}
        for s_name, t_name in self.pairs.items():
            if s_name not in self._student_features or t_name not in self._teacher_features:
                missing = [f"student layer {s_name!r}"] if s_name not in self._student_features else []
                missing += [f"teacher layer {t_name!r}"] if t_name not in self._teacher_features else []
                state = "the hooks were removed (call attach())" if not self._handles else \
                    "run the student and the teacher forward first"
                raise RuntimeError(f"FeatureDistiller: no captured feature for {' and '.join(missing)}: {state}")
            s, t = self._student_features[s_name], self._teacher_features[t_name]
            key = _key(s_name)
            if key in self.projections:
                s = self.projections[key](s)
            if s.shape != t.shape:
                hint = ("widths differ and projections=None" if key not in self.projections else
                        "the projection does not give the teacher's shape")
                raise ValueError(f"FeatureDistiller: student layer {s_name!r} gives {tuple(s.shape)} and teacher "
                                 f"layer {t_name!r} gives {tuple(t.shape)} ({hint}); pass a module in "
                                 f"projections={{{s_name!r}: ...}} that maps one to the other (e.g. a projection "
                                 f"and pooling when spatial sizes differ), or example_inputs= when the widths "
                                 f"could not be read from the layer types")
            value = self._pair_loss(s_name, s, t)
            parts[s_name] = value
            weighted = value * self.weights[s_name] if self.weights[s_name] != 1.0 else value
            total = weighted if total is None else total + weighted
        if clear:
            self.clear()
        if return_parts:
            return total, parts
        return total

    def extra_repr(self) -> str:
        loss = self.loss_fn if isinstance(self.loss_fn, str) else getattr(self.loss_fn, "__name__", "callable")
        return f"pairs={self.pairs}, loss={loss!r}, attached={self.attached}"
