"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune, or not to prune"): the target sparsity
rises from s_i to s_f along the cubic

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3,    t = t0, t0 + dt, ..., t0 + n * dt

pruning every dt = `frequency` steps from t0 = `start_step` to t0 + n * dt = `end_step` (fast early, when many
weights are redundant, slow near the end, leaving the network time to recover)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

from torch import nn

from mltoolkit.pruning.unstructured import (
    DEFAULT_LAYER_TYPES,
    FilterFn,
    _check_model,
    check_amount,
    ensure_mask,
    prune_global,
    prune_layerwise,
    select_layers,
)


def cubic_sparsity(step: int, initial_sparsity: float, final_sparsity: float, start_step: int, end_step: int) -> float:
    """Zhu & Gupta's s_t at `step` (0 before start_step, s_f from end_step on)."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return final_sparsity
    frac = (step - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


class GradualPruner:
    """Prunes `model` gradually while it trains. Call .step() once per training step, after optimizer.step():

        pruner = GradualPruner(model, final_sparsity=0.8, start_step=1000, end_step=9000, frequency=200)
        for batch in data:
            loss(model(batch)).backward(); opt.step(); opt.zero_grad()
            pruner.step()
        make_permanent(model)

    On the step() calls numbered start_step, start_step + frequency, ... (counting from 0) up to and including
    end_step, the layers are magnitude-pruned to cubic_sparsity(step): across all selected layers together
    (scope="global", the default) or each layer to the same sparsity (scope="layer"). Masks only grow, and hold
    between pruning steps (see mltoolkit.pruning.unstructured). All-True masks are registered on the selected
    layers at construction, so the model's state_dict layout is fixed from the start: to resume, build the model and
    a GradualPruner with the same arguments, then model.load_state_dict(...) and pruner.load_state_dict(...).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, frequency: int = 100,
                 initial_sparsity: float = 0.0, *, scope: str = "global",
                 layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES, filter_fn: Optional[FilterFn] = None,
                 name: str = "weight"):
        fn = "GradualPruner"
        _check_model(fn, model)
        self.final_sparsity = check_amount(fn, final_sparsity, "final_sparsity")
        self.initial_sparsity = check_amount(fn, initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"{fn}: initial_sparsity ({initial_sparsity}) must be <= final_sparsity "
                             f"({final_sparsity})")
        for arg, v, low in (("start_step", start_step, 0), ("end_step", end_step, 0), ("frequency", frequency, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{fn}: {arg} must be an int >= {low}, got {v!r}")
        if end_step < start_step:
            raise ValueError(f"{fn}: end_step ({end_step}) must be >= start_step ({start_step})")
        if scope not in ("global", "layer"):
            raise ValueError(f"{fn}: scope must be 'global' or 'layer', got {scope!r}")
        self.start_step, self.end_step, self.frequency, self.scope, self.name = (start_step, end_step, frequency,
                                                                                 scope, name)
        self.layers = select_layers(fn, model, layer_types, filter_fn, name)
        if not self.layers:
            raise ValueError(f"{fn}: model has no layer to prune (layer_types, filter_fn)")
        for _, m in self.layers:
            ensure_mask(m, name)
        self.model = model
        self.step_count = 0  # calls of step() so far
        self.current_sparsity = 0.0  # target of the last pruning step

    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity at `step`."""
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step)

    def is_pruning_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.frequency == 0 or step == self.end_step)

    def step(self) -> Optional[float]:
        """Advances one training step; prunes when this is a pruning step. Returns the sparsity it pruned to, or
        None when it did not prune."""
        t = self.step_count
        self.step_count += 1
        if not self.is_pruning_step(t):
            return None
        target = self.sparsity_at(t)
        (prune_global if self.scope == "global" else prune_layerwise)(self.layers, self.name, target)
        self.current_sparsity = target
        return target

    def _config(self) -> dict[str, Any]:
        return {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                "start_step": self.start_step, "end_step": self.end_step, "frequency": self.frequency,
                "scope": self.scope, "layers": [n for n, _ in self.layers]}

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position (the masks themselves are in the model's state_dict)."""
        return {"step_count": self.step_count, "current_sparsity": self.current_sparsity, "config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "step_count" not in state:
            raise ValueError("GradualPruner.load_state_dict: state must be a dict from GradualPruner.state_dict()")
        saved = state.get("config", {})
        differ = sorted(k for k, v in self._config().items() if k in saved and saved[k] != v)
        if differ:
            warnings.warn(f"GradualPruner.load_state_dict: the saved schedule differs in {differ}; going on with "
                          f"this pruner's settings from step {state['step_count']}", stacklevel=2)
        self.step_count = int(state["step_count"])
        self.current_sparsity = float(state["current_sparsity"])

    def __repr__(self) -> str:
        return (f"GradualPruner(step={self.step_count}, sparsity={self.current_sparsity:.3f} -> "
                f"{self.final_sparsity:.3f} over steps {self.start_step}..{self.end_step} every {self.frequency}, "
                f"{self.scope}, {len(self.layers)} layers)")
