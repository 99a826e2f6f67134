"""Unstructured magnitude pruning with masks that hold through training.

How a mask is applied: each pruned tensor (a layer's ``weight`` by default) gets a weight parametrization
(torch.nn.utils.parametrize) whose only state is a boolean ``mask`` buffer; the layer's ``weight`` is then
``original * mask``, recomputed at every access. We chose this over the forward-pre-hook scheme of
torch.nn.utils.prune and over gradient masking because

- the pruned weights are exactly zero whatever the optimizer does (momentum, Adam's running moments and weight
  decay keep moving the hidden ``original`` entries, but never the weight the layer computes with); gradient masking
  alone lets Adam's first moment, or weight decay, move pruned weights off zero;
- ``module.weight`` is always current (a pre-hook's copy is stale between an optimizer step and the next forward);
- the original Parameter object is kept (as ``parametrizations.weight.original``), so an optimizer built before
  pruning goes on updating the right tensor, and torch.compile traces the parametrization like any other code
  (masks are updated in place, so a compiled model sees new masks without recompiling);
- masks are buffers: ``state_dict()`` holds ``<layer>.parametrizations.weight.original`` and
  ``<layer>.parametrizations.weight.0.mask``; load_pruned_state_dict restores such a state dict into a model that
  was never pruned.

Limits: parametrized modules cannot be pickled whole (torch.save(model)); save the state_dict, or call
make_permanent first, which bakes the masks into plain weights (zeros stay zeros, nothing reverts).

Masks only grow: pruning a layer to `amount` prunes the smallest-magnitude weights among those still alive until the
layer's total fraction of pruned weights is round(amount * numel) / numel; weights pruned earlier stay pruned.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
REPORT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

FilterFn = Callable[[nn.Module, str], bool]


class WeightMask(nn.Module):
    """The parametrization: weight = original * mask. mask is a bool buffer of the weight's shape."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: Tensor) -> Tensor:
        # w * mask, not torch.where(mask, w, 0): as exact for finite weights (pruned entries of the original are
        # zeroed when pruned, and only finite updates reach them), and ~10x faster on the CPU
        return w * self.mask

    def extra_repr(self) -> str:
        n = self.mask.numel()
        return f"shape={tuple(self.mask.shape)}, sparsity={(n - int(self.mask.sum())) / max(n, 1):.3f}"


# ----------------------------------------------------------------------------------------------------------- checks

def check_amount(fn: str, amount, arg: str = "amount") -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{fn}: {arg} must be a float in [0, 1], got {type(amount).__name__}")
    amount = float(amount)
    if not 0.0 <= amount <= 1.0:  # also rejects NaN
        raise ValueError(f"{fn}: {arg} must be in [0, 1], got {amount}")
    return amount


def _check_model(fn: str, model, arg: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: {arg} must be an nn.Module, got {type(model).__name__}")


def _check_layer_types(fn: str, layer_types) -> tuple[type[nn.Module], ...]:
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    layer_types = tuple(layer_types)
    if not layer_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
        raise TypeError(f"{fn}: layer_types must be a tuple of nn.Module subclasses, got {layer_types!r}")
    return layer_types


def _has_tensor(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), Tensor)


# ------------------------------------------------------------------------------------------------ mask bookkeeping

def get_mask(module: nn.Module, name: str = "weight") -> Optional[Tensor]:
    """The bool mask buffer of `module.<name>` (True = kept), or None when that tensor is not masked."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p.mask
    return None


def ensure_mask(module: nn.Module, name: str = "weight") -> Tensor:
    """Registers an all-True mask on `module.<name>` if it has none yet; returns the mask buffer (updated in place
    from then on)."""
    mask = get_mask(module, name)
    if mask is None:
        weight = getattr(module, name)
        parametrize.register_parametrization(module, name, WeightMask(torch.ones_like(weight, dtype=torch.bool)))
        mask = get_mask(module, name)
    return mask


def _original(module: nn.Module, name: str) -> Tensor:
    return module.parametrizations[name].original


def update_mask(module: nn.Module, name: str, keep: Tensor) -> None:
    """mask &= keep, in place, and zero the pruned entries of the hidden original tensor too (so weight decay and
    make_permanent see zeros)."""
    mask = ensure_mask(module, name)
    with torch.no_grad():
        mask.logical_and_(keep.to(mask.device))
        plist = module.parametrizations[name]
        if len(plist) == 1:  # the mask is the only parametrization: original is what gets masked
            _original(module, name).masked_fill_(~mask, 0)


def _scores(module: nn.Module, name: str) -> Tensor:
    """|weight| in float32, with already-pruned entries at -1 so they are always among the smallest."""
    with torch.no_grad():
        w = getattr(module, name).detach().float().abs()
        mask = get_mask(module, name)
        if mask is not None:
            w = w.masked_fill(~mask, -1.0)
    return w


def _smallest(scores: Tensor, k: int) -> Tensor:
    """A bool tensor of scores' shape, True at exactly k smallest entries (ties broken by position)."""
    flat = scores.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        out[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    return out.view_as(scores)


def select_layers(fn: str, model: nn.Module, layer_types, filter_fn: Optional[FilterFn], name: str = "weight",
                  names: Optional[Iterable[str]] = None) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer of `model` of `layer_types` that has tensor `name` and passes
    filter_fn(module, qualified name); `names` restricts to those names (an unknown one raises)."""
    _check_model(fn, model)
    layer_types = _check_layer_types(fn, layer_types)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: filter_fn must be callable(module, name) -> bool, got {type(filter_fn).__name__}")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_types) and _has_tensor(m, name)]
    if names is not None:
        if isinstance(names, str):
            names = [names]
        wanted = list(names)
        known = dict(found)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"{fn}: names lists layers that are not {'/'.join(t.__name__ for t in layer_types)} "
                             f"layers of the model: {unknown}")
        found = [(n, known[n]) for n in dict.fromkeys(wanted)]
    if filter_fn is not None:
        found = [(n, m) for n, m in found if filter_fn(m, n)]
    return found


# ------------------------------------------------------------------------------------------------- magnitude pruning

def magnitude_prune(module: nn.Module, amount: float, *, name: str = "weight",
                    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
                    filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Per-layer unstructured L1 (magnitude) pruning: each layer loses its round(amount * numel) smallest-|w| weights
    (counting weights it had already lost). `module` is a layer (anything with a tensor `name`), or a model, whose
    every `layer_types` layer passing filter_fn(module, qualified_name) is pruned by the same amount. Returns
    `module`; the masks hold through training (see the module docstring)."""
    fn = "magnitude_prune"
    _check_model(fn, module, "module")
    amount = check_amount(fn, amount)
    layer_types = _check_layer_types(fn, layer_types)
    if isinstance(module, layer_types) or (_has_tensor(module, name) and not any(
            isinstance(m, layer_types) for m in module.modules())):
        if not _has_tensor(module, name):
            raise TypeError(f"{fn}: module {type(module).__name__} has no tensor named {name!r}")
        layers = [("", module)] if filter_fn is None or filter_fn(module, "") else []
    else:
        layers = select_layers(fn, module, layer_types, filter_fn, name)
        if not layers:
            raise ValueError(f"{fn}: module has no {'/'.join(t.__name__ for t in layer_types)} layer with a tensor "
                             f"{name!r} to prune (layer_types, filter_fn)")
    for _, layer in layers:
        scores = _scores(layer, name)
        update_mask(layer, name, ~_smallest(scores, round(amount * scores.numel())))
    return module


def global_magnitude_prune(model: nn.Module, amount: float,
                           layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
                           filter_fn: Optional[FilterFn] = None, *, name: str = "weight",
                           names: Optional[Iterable[str]] = None) -> nn.Module:
    """Global unstructured magnitude pruning: the round(amount * N) smallest-|w| weights among all N weights of the
    selected layers (layer_types, filter_fn(module, qualified_name), or an explicit list of qualified `names`) are
    pruned, wherever they are, so layers end up with different sparsities. Returns `model`."""
    fn = "global_magnitude_prune"
    _check_model(fn, model)
    amount = check_amount(fn, amount)
    layers = select_layers(fn, model, layer_types, filter_fn, name, names)
    if not layers:
        raise ValueError(f"{fn}: model has no layer to prune (layer_types, filter_fn, names select none)")
    prune_global(layers, name, amount)
    return model


def prune_global(layers: list[tuple[str, nn.Module]], name: str, amount: float) -> None:
    scores = [_scores(m, name) for _, m in layers]
    device = scores[0].device
    flat = torch.cat([s.reshape(-1).to(device) for s in scores])
    pruned = _smallest(flat, round(amount * flat.numel()))
    offset = 0
    for (_, m), s in zip(layers, scores):
        n = s.numel()
        update_mask(m, name, ~pruned[offset:offset + n].view_as(s))
        offset += n


def prune_layerwise(layers: list[tuple[str, nn.Module]], name: str, amount: float) -> None:
    for _, m in layers:
        scores = _scores(m, name)
        update_mask(m, name, ~_smallest(scores, round(amount * scores.numel())))


# ------------------------------------------------------------------------------------------- permanence, state dicts

def make_permanent(model: nn.Module) -> nn.Module:
    """Bakes every mask into a plain weight (the same Parameter object, pruned entries zero) and removes the
    parametrizations, so the model is an ordinary one again (picklable, no per-forward masking). Returns model."""
    _check_model("make_permanent", model)
    for _, m in list(model.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        for tname in list(m.parametrizations.keys()):
            plist = m.parametrizations[tname]
            if not any(isinstance(p, WeightMask) for p in plist):
                continue
            if len(plist) != 1:
                raise NotImplementedError(
                    f"make_permanent: {type(m).__name__}.{tname} has other parametrizations besides the pruning "
                    f"mask ({[type(p).__name__ for p in plist]}); remove them first")
            parametrize.remove_parametrizations(m, tname, leave_parametrized=True)
    return model


remove = make_permanent

_MASK_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.0\.mask$")


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """Loads a state dict saved from a pruned (masked) model into `model`, which may never have been pruned:
    registers an all-True mask wherever the state dict holds one, then model.load_state_dict(state_dict, strict).
    Returns what load_state_dict returns."""
    _check_model("load_pruned_state_dict", model)
    for key, value in state_dict.items():
        match = _MASK_KEY.match(key)
        if not match:
            continue
        prefix, tname = match.group(1) or "", match.group(2)
        try:
            module = model.get_submodule(prefix)
        except AttributeError as e:
            raise ValueError(f"load_pruned_state_dict: state_dict key {key!r} names a module the model lacks") from e
        if not _has_tensor(module, tname):
            raise ValueError(f"load_pruned_state_dict: state_dict key {key!r}: module {prefix!r} has no tensor "
                             f"{tname!r}")
        if get_mask(module, tname) is None:
            if parametrize.is_parametrized(module, tname):
                raise ValueError(f"load_pruned_state_dict: {prefix}.{tname} already has other parametrizations")
            if tuple(getattr(module, tname).shape) != tuple(value.shape):
                raise ValueError(f"load_pruned_state_dict: mask {key!r} has shape {tuple(value.shape)}, the tensor "
                                 f"has {tuple(getattr(module, tname).shape)}")
            ensure_mask(module, tname)
    return model.load_state_dict(state_dict, strict=strict)


# ----------------------------------------------------------------------------------------------------------- report

@dataclasses.dataclass
class LayerSparsity:
    zeros: int
    numel: int
    masked: bool  # the layer carries a pruning mask

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclasses.dataclass
class SparsityReport:
    layers: dict[str, LayerSparsity]

    @property
    def zeros(self) -> int:
        return sum(v.zeros for v in self.layers.values())

    @property
    def numel(self) -> int:
        return sum(v.numel for v in self.layers.values())

    @property
    def global_sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __getitem__(self, name: str) -> float:
        return self.layers[name].sparsity

    def __str__(self) -> str:
        width = max([len("layer")] + [len(n) for n in self.layers])
        lines = [f"{'layer':<{width}}  {'weights':>10}  {'zeros':>10}  sparsity  masked"]
        for n, v in self.layers.items():
            masked = "yes" if v.masked else "no"
            lines.append(f"{n:<{width}}  {v.numel:>10}  {v.zeros:>10}  {v.sparsity:>7.2%}  {masked}")
        lines.append(f"{'global':<{width}}  {self.numel:>10}  {self.zeros:>10}  {self.global_sparsity:>7.2%}")
        return "\n".join(lines)


def sparsity_report(model: nn.Module, layer_types: Sequence[type[nn.Module]] = REPORT_LAYER_TYPES,
                    name: str = "weight") -> SparsityReport:
    """Exact zeros of the weight each layer computes with (masked or not), per layer and over all of them. Covers
    every `layer_types` layer plus any other layer carrying a pruning mask."""
    _check_model("sparsity_report", model)
    layer_types = _check_layer_types("sparsity_report", layer_types)
    layers: dict[str, LayerSparsity] = {}
    with torch.no_grad():
        for n, m in model.named_modules():
            masked = get_mask(m, name) is not None
            if not (masked or isinstance(m, layer_types)) or not _has_tensor(m, name):
                continue
            w = getattr(m, name)
            if isinstance(w, torch.sparse.SparseSemiStructuredTensor) or w.layout != torch.strided:
                w = w.to_dense()  # a 2:4 weight from to_semi_structured, or a torch.sparse one
            layers[n or type(m).__name__] = LayerSparsity(int((w == 0).sum()), w.numel(), masked)
    return SparsityReport(layers)
