"""Calibration of static int8 activation scales: the observer wrapper that `prepare` puts around each layer, and
`calibrate`, which runs a user's batches through the prepared model."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mltoolkit.quantization.config import QuantConfig


class ObservedModule(nn.Module):
    """A float layer (`module`, an nn.Linear or nn.Conv2d) with an observer on its input, inserted by `prepare`:
    forward is module(observer(x)), the float layer's output unchanged. `convert` replaces it by the quantized module
    of `config` with the observer's scale (`_mltk_convert`, the protocol convert looks for)."""

    def __init__(self, module: nn.Module, config: QuantConfig):
        super().__init__()
        self.module = module
        self.observer = config.make_observer()
        self.config = config

    def forward(self, x: Tensor, *args, **kwargs) -> Any:
        return self.module(self.observer(x), *args, **kwargs)

    def _mltk_convert(self) -> tuple[nn.Module, QuantConfig]:
        from mltoolkit.quantization.modules import module_for

        cls = module_for(self.module, self.config)
        return cls.from_float(self.module, self.config, input_scale=self.observer.scale()), self.config


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])  # (inputs, targets) from a DataLoader over a TensorDataset
    raise TypeError(f"calibrate: cannot feed a batch of type {type(batch).__name__} to the model; pass forward_fn")


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable, num_batches: Optional[int] = None,
              forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None) -> int:
    """Runs batches of `data` (a DataLoader or any iterable) through `model`, prepared by `prepare`, in eval mode and
    without gradients, so that its observers see the activations; returns the number of batches run.

    Each batch goes to forward_fn(model, batch) if given, else: a Tensor -> model(batch); a dict -> model(**batch); a
    tuple or list -> model(batch[0]) (the (inputs, targets) pairs of a DataLoader). num_batches: stop after that many
    (None: the whole iterable)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: model must be an nn.Module, got {type(model).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"calibrate: num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(data, Tensor):
        raise TypeError("calibrate: data must be an iterable of batches (e.g. a DataLoader, or [x] for one batch), "
                        "got a Tensor")
    if not any(isinstance(m, ObservedModule) for m in model.modules()):
        raise ValueError("calibrate: the model has no observers; call mltoolkit.quantization.prepare(model, config) "
                         "first")
    forward = forward_fn or _default_forward
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in data:
            if num_batches is not None and n >= num_batches:
                break
            forward(model, batch)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calibrate: data yielded no batches")
    return n
