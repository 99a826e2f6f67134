"""LSTM and GRU as subclasses of torch's modules: same constructor, parameters, state_dict keys, inputs and outputs
(PackedSequence, batch_first, unbatched input, initial states, LSTM projections); the sequence runs through
mltoolkit.ops.lstm_sequence / gru_sequence (one input-projection GEMM per layer and direction, then per step the
recurrent GEMM and the fused gate kernel; an LSTM with proj_size > 0 runs the fused cell op per step, then the
projection h = W_hr h')."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from mltoolkit.ops.lstm import RNNArgumentError, gru_sequence, lstm_sequence


def _share(cls, module: torch.nn.Module):
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


class _FusedRNNMixin:
    """The part of torch.nn.RNNBase.forward around the _VF call, with argument checks that name the argument."""

    _kind = ""  # "LSTM" or "GRU"

    def _check_input(self, input: Tensor) -> None:
        name = self._kind
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        params = self._flat_weights
        if params and input.dtype != params[0].dtype:
            raise TypeError(f"{name}: input must have the parameters' dtype {params[0].dtype}, got {input.dtype}")
        if input.shape[-1] != self.input_size:
            raise RNNArgumentError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                                   f"got {input.shape[-1]} (input shape {list(input.shape)})")

    def _state_size(self, name: str) -> tuple[int, str]:
        """Width of state `name` ("h0" / "c0") and its name: proj_size for an LSTM's h with projections."""
        proj = getattr(self, "proj_size", 0)
        return (proj, "proj_size") if proj > 0 and name == "h0" else (self.hidden_size, "hidden_size")

    def _check_state(self, name: str, h: Tensor, batch: int, input: Tensor, batched: bool) -> None:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        size, size_name = self._state_size(name)
        want = (layers, batch, size) if batched else (layers, size)
        if not isinstance(h, Tensor):
            raise TypeError(f"{self._kind}: {name} must be a Tensor, got {type(h).__name__}")
        if tuple(h.shape) != want:
            raise RNNArgumentError(f"{self._kind}: {name} must have shape (num_layers * num_directions, "
                                   f"{'batch, ' if batched else ''}{size_name}) = {list(want)}, got {list(h.shape)}")
        if h.dtype != input.dtype:
            raise TypeError(f"{self._kind}: {name} must have input's dtype {input.dtype}, got {h.dtype}")

    def _run(self, input, hx):
        """Returns (output, hidden tuple) like torch's forward; hidden is (h_n,) or (h_n, c_n)."""
        self._update_flat_weights()
        states = ("h0", "c0") if self._kind == "LSTM" else ("h0",)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_input(data)
            if data.dim() != 2:
                raise RNNArgumentError(f"{self._kind}: a PackedSequence's data must be 2-D, got {list(data.shape)}")
            batch, batched, x = int(batch_sizes[0]), True, data
        else:
            self._check_input(input)
            if input.dim() not in (2, 3):
                raise RNNArgumentError(f"{self._kind}: input must be 2-D (unbatched) or 3-D, got {input.dim()}-D")
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            x = input if batched else input.unsqueeze(batch_dim)
            batch, batch_sizes, sorted_indices, unsorted_indices = x.shape[batch_dim], None, None, None
        if hx is None:
            hx = tuple(torch.zeros(layers, batch, self._state_size(name)[0], dtype=x.dtype, device=x.device)
                       for name in states)
        else:
            hx = (hx,) if isinstance(hx, Tensor) else tuple(hx)
            if len(hx) != len(states):
                want = "h0" if len(states) == 1 else "(h0, c0)"
                raise RNNArgumentError(f"{self._kind}: hx must be {want}, got {len(hx)} tensors")
            for name, h in zip(states, hx):
                self._check_state(name, h, batch, x, batched)
            if not batched:
                hx = tuple(h.unsqueeze(1) for h in hx)
            if sorted_indices is not None:
                hx = tuple(h.index_select(1, sorted_indices) for h in hx)
        fn = lstm_sequence if self._kind == "LSTM" else gru_sequence
        state = hx if self._kind == "LSTM" else hx[0]
        result = fn(x, state, self._flat_weights, self.bias, self.num_layers, float(self.dropout), self.training,
                    self.bidirectional, self.batch_first, batch_sizes)
        output, hidden = result[0], tuple(result[1:])
        if packed:
            if unsorted_indices is not None:
                hidden = tuple(h.index_select(1, unsorted_indices) for h in hidden)
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), hidden
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = tuple(h.squeeze(1) for h in hidden)
        return output, hidden


class LSTM(_FusedRNNMixin, torch.nn.LSTM):
    """torch.nn.LSTM computed by mltoolkit's fused LSTM kernels, with projections too (proj_size = P > 0, Sak et al.
    2014: h_t = W_hr (o_t * tanh(c_t)); weight_hr_l{k}[_reverse] (P, H), h0 / h_n (layers * dirs, B, P), output
    (.., dirs * P)). A proj_size torch refuses (negative, or >= hidden_size) raises torch's ValueError naming it."""

    _kind = "LSTM"

    def forward(self, input, hx: Optional[tuple[Tensor, Tensor]] = None):
        output, (h_n, c_n) = self._run(input, hx)
        return output, (h_n, c_n)

    @classmethod
    def from_torch(cls, module: torch.nn.LSTM) -> LSTM:
        """An LSTM sharing `module`'s parameters (no copy), with or without projections."""
        return _share(cls, module)


class GRU(_FusedRNNMixin, torch.nn.GRU):
    """torch.nn.GRU computed by mltoolkit's fused GRU kernels."""

    _kind = "GRU"

    def forward(self, input, hx: Optional[Tensor] = None):
        output, (h_n,) = self._run(input, hx)
        return output, h_n

    @classmethod
    def from_torch(cls, module: torch.nn.GRU) -> GRU:
        """A GRU sharing `module`'s parameters (no copy)."""
        return _share(cls, module)
