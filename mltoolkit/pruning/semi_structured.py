"""N:M semi-structured sparsity (2:4 by default): in every run of M consecutive weights along a layer's input
dimension (in_features for nn.Linear; the flattened in_channels x kernel dimension for a convolution) keep the N of
largest magnitude. The masks are the same parametrization as unstructured pruning (they hold through training and
fine-tuning) and are computed on any device. to_semi_structured then hands 2:4 nn.Linear weights to
torch.sparse.to_sparse_semi_structured (cuSPARSELt, or CUTLASS where cuSPARSELt is missing) on NVIDIA GPUs of
compute capability >= 8.0 with float16/bfloat16 weights, for real 2:4 sparse matrix multiplies."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from mltoolkit.pruning.unstructured import FilterFn, _check_model, get_mask, make_permanent, select_layers, update_mask

_CONVERTIBLE_DTYPES = (torch.float16, torch.bfloat16)


def _check_nm(fn: str, n: int, m: int) -> None:
    for arg, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {arg} must be a positive int, got {v!r}")
    if n > m:
        raise ValueError(f"{fn}: n must be <= m, got n={n}, m={m}")


def nm_mask(weight: Tensor, n: int = 2, m: int = 4, mask: Optional[Tensor] = None) -> Tensor:
    """Bool mask of weight's shape keeping the n largest-|w| of every m consecutive entries along the input dimension
    (weight viewed as (out, -1)); entries already False in `mask` count as smallest. Ties go to the earlier entry.
    The flattened input dimension must be a multiple of m."""
    _check_nm("nm_mask", n, m)
    if weight.dim() < 2:
        raise ValueError(f"nm_mask: weight must have at least 2 dimensions (out, in, ...), got shape "
                         f"{tuple(weight.shape)}")
    rows = weight.shape[0]
    cols = weight.numel() // rows if rows else 0
    if cols % m:
        raise ValueError(f"nm_mask: the input dimension ({cols}) of weight {tuple(weight.shape)} is not a multiple "
                         f"of m={m}")
    with torch.no_grad():
        scores = weight.detach().float().abs()
        if mask is not None:
            scores = scores.masked_fill(~mask, -1.0)
        groups = scores.reshape(rows, cols // m, m)
        # stable descending sort: among equal magnitudes the earlier entry is kept, so the result is deterministic
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(weight.shape)


def nm_prune(model: nn.Module, n: int = 2, m: int = 4, *,
             layer_types: Sequence[type[nn.Module]] = (nn.Linear,), filter_fn: Optional[FilterFn] = None,
             name: str = "weight") -> dict[str, str]:
    """Applies an n:m mask (semi_structured_prune for 2:4) to every `layer_types` layer of `model` passing
    filter_fn(module, qualified_name); `model` may also be a single layer. Combined with any existing mask (pruned
    weights stay pruned, so a group may end up with fewer than n survivors). Returns {layer: why} for the layers
    skipped because their input dimension is not a multiple of m."""
    fn = "nm_prune"
    _check_model(fn, model)
    _check_nm(fn, n, m)
    layer_types = tuple(layer_types) if not isinstance(layer_types, type) else (layer_types,)
    if isinstance(model, layer_types):
        layers = [("", model)]
    else:
        layers = select_layers(fn, model, layer_types, filter_fn, name)
    if not layers:
        raise ValueError(f"{fn}: model has no {'/'.join(t.__name__ for t in layer_types)} layer to prune")
    skipped = {}
    for lname, layer in layers:
        w = getattr(layer, name)
        cols = w[0].numel() if w.shape[0] else 0
        if w.dim() < 2 or cols % m:
            skipped[lname] = f"input dimension {cols} is not a multiple of {m}"
            continue
        update_mask(layer, name, nm_mask(w, n, m, get_mask(layer, name)))
    return skipped


def semi_structured_prune(model: nn.Module, *, layer_types: Sequence[type[nn.Module]] = (nn.Linear,),
                          filter_fn: Optional[FilterFn] = None) -> dict[str, str]:
    """2:4 masks on every nn.Linear (by default) of `model`: see nm_prune."""
    return nm_prune(model, 2, 4, layer_types=layer_types, filter_fn=filter_fn)


def is_nm_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every m consecutive entries along the input dimension hold at most n nonzeros."""
    rows = weight.shape[0]
    cols = weight.numel() // rows if rows else 0
    if weight.dim() < 2 or cols % m:
        return False
    return bool(((weight.detach().reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


# ------------------------------------------------------------------------------------------------------- conversion

def semi_structured_unsupported(device: Optional[torch.device] = None) -> Optional[str]:
    """Why this machine cannot run torch's semi-structured sparse kernels, or None when it can."""
    if not torch.cuda.is_available():
        return "to_sparse_semi_structured needs an NVIDIA GPU (CUDA is not available)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"2:4 sparse tensor cores need compute capability >= 8.0 (Ampere or newer); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    return None


def _sparse_class():
    """The subclass to_sparse_semi_structured would use, or CUTLASS's where this build lacks cuSPARSELt."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if _default_class() is torch.sparse.SparseSemiStructuredTensorCUSPARSELT and not (
            cusparselt is not None and cusparselt.is_available()):
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return _default_class()


def _default_class():
    return (torch.sparse.SparseSemiStructuredTensorCUTLASS if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
            else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)


@dataclasses.dataclass
class SemiStructuredSummary:
    converted: list[str]
    skipped: dict[str, str]  # layer -> why

    def __str__(self) -> str:
        lines = [f"to_semi_structured: {len(self.converted)} of {len(self.converted) + len(self.skipped)} Linear "
                 f"layers converted to 2:4 sparse"]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def to_semi_structured(model: nn.Module, *, filter_fn: Optional[FilterFn] = None, prune: bool = False,
                       strict: bool = False) -> SemiStructuredSummary:
    """Replaces, in place, the weight of every nn.Linear of `model` (passing filter_fn) by
    torch.sparse.to_sparse_semi_structured(weight), so its matmuls run on 2:4 sparse tensor cores.

    The weights must already follow the 2:4 pattern (semi_structured_prune, then fine-tune) unless prune=True, which
    applies the 2:4 masks first. Masks are baked in (make_permanent) for the converted layers. Needs CUDA, compute
    capability >= 8.0, float16/bfloat16 weights on the GPU: otherwise raises RuntimeError saying why. A layer that
    cannot be converted (dtype, device, shape not a multiple of the kernel tile, weight not 2:4) is skipped with its
    reason in the returned summary, or raises ValueError when strict=True. The converted model is for inference
    (the sparse weight has no gradient path through the mask)."""
    fn = "to_semi_structured"
    _check_model(fn, model)
    why = semi_structured_unsupported()
    if why is not None:
        raise RuntimeError(f"{fn}: {why}")
    layers = select_layers(fn, model, (nn.Linear,), filter_fn)
    if not layers:
        raise ValueError(f"{fn}: model has no nn.Linear layer to convert (filter_fn)")
    cls = _sparse_class()
    converted, skipped = [], {}
    for lname, layer in layers:
        w = layer.weight
        if not w.is_cuda:
            reason = f"weight is on {w.device}, not on a CUDA device"
        elif w.dtype not in _CONVERTIBLE_DTYPES:
            reason = f"weight dtype is {w.dtype}; 2:4 sparse kernels take float16 or bfloat16 (convert the model first)"
        elif w.shape[1] % 4:
            reason = f"in_features {w.shape[1]} is not a multiple of 4"
        else:
            c = cls._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
            rows, cols = w.shape
            if rows < c.sparse_min_rows or rows % c.sparse_min_rows or cols < c.sparse_min_cols \
                    or cols % c.sparse_min_cols:
                reason = (f"weight shape {tuple(w.shape)}: {cls.BACKEND} needs both dimensions multiples of "
                          f"({c.sparse_min_rows}, {c.sparse_min_cols})")
            else:
                reason = None
                if prune:
                    nm_prune(layer, 2, 4)
                if not is_nm_sparse(layer.weight):
                    reason = "weight is not 2:4 sparse (run semi_structured_prune first, or pass prune=True)"
        if reason is not None:
            if strict:
                raise ValueError(f"{fn}: layer {lname!r}: {reason}")
            skipped[lname] = reason
            continue
        dense = layer.weight.detach().contiguous()
        try:
            sparse = torch.sparse.to_sparse_semi_structured(dense) if cls is _default_class() else cls.from_dense(dense)
        except RuntimeError as e:  # a kernel/library this build or GPU lacks
            if strict:
                raise ValueError(f"{fn}: layer {lname!r}: to_sparse_semi_structured failed: {e}") from e
            skipped[lname] = f"to_sparse_semi_structured failed: {e}"
            continue
        if get_mask(layer, "weight") is not None:
            make_permanent(layer)
        layer.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(lname)
    return SemiStructuredSummary(converted, skipped)
