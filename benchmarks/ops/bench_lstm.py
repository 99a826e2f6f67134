"""Stacked LSTM / GRU over a sequence (mltoolkit.ops.lstm_sequence / gru_sequence, what mltoolkit.nn.LSTM / GRU
run) against torch's own (_VF.lstm / _VF.gru, what torch.nn.LSTM / GRU run: oneDNN on CPU, cuDNN on GPU) in eager
and torch.compile."""
import torch
from torch import _VF

from mltoolkit import backend, ops
from mltoolkit.benchmark import Benchmark


def _gates(mode: str) -> int:
    return 4 if mode == "lstm" else 3


def _inputs(mode: str):
    def make(config, dtype, device):
        steps, batch, inp, hidden, layers = config["T"], config["B"], config["I"], config["H"], config["layers"]
        g = _gates(mode) * hidden
        scale = hidden ** -0.5
        x = torch.randn(steps, batch, inp, dtype=dtype, device=device)
        states = [torch.randn(layers, batch, hidden, dtype=dtype, device=device) * 0.1
                  for _ in range(2 if mode == "lstm" else 1)]
        params = []
        for layer in range(layers):
            fan_in = inp if layer == 0 else hidden
            params += [torch.empty(g, fan_in, dtype=dtype, device=device).uniform_(-scale, scale),
                       torch.empty(g, hidden, dtype=dtype, device=device).uniform_(-scale, scale),
                       torch.empty(g, dtype=dtype, device=device).uniform_(-scale, scale),
                       torch.empty(g, dtype=dtype, device=device).uniform_(-scale, scale)]
        return (x, *states, *params)
    return make


def _call(mode: str, impl, layers: int):
    n_states = 2 if mode == "lstm" else 1

    def call(x, *rest):
        states, params = rest[:n_states], list(rest[n_states:])
        hx = tuple(states) if mode == "lstm" else states[0]
        # train=True when gradients are wanted (cuDNN's RNN backward needs its training-mode forward); dropout 0
        train = any(t.requires_grad for t in (x, *rest))
        return impl(x, hx, params, True, layers, 0.0, train, False, False)
    return call


def _reference(mode: str, layers: int):
    ours = _call(mode, getattr(ops, f"{mode}_sequence"), layers)

    def call(*args):
        with backend("reference"):
            return ours(*args)
    return call


def _flops(mode: str):
    def count(config, dtype, run_mode):
        steps, batch, inp, hidden, layers = config["T"], config["B"], config["I"], config["H"], config["layers"]
        g = _gates(mode) * hidden
        fwd = sum(2 * steps * batch * g * ((inp if layer == 0 else hidden) + hidden) for layer in range(layers))
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[run_mode]
    return count


def benchmarks(device: str, quick: bool):
    # The target: 2 layers, hidden 512, seq 128, batch 32 (CPU fp32 forward >= 1.0x nn.LSTM).
    configs = [{"T": 128, "B": 32, "I": 512, "H": 512, "layers": 2}]
    if not quick:
        configs.append({"T": 64, "B": 8, "I": 256, "H": 256, "layers": 1})
    dtypes = [torch.float32]
    benches = []
    # --quick on the CPU: the LSTM of the target only (GRU's cold torch.compile build of 2 x 128 steps took 41 s)
    for mode in ("lstm",) if quick and device == "cpu" else ("lstm", "gru"):
        layers_of = lambda c: c["layers"]
        for config in configs:
            layers = layers_of(config)
            n_states = 2 if mode == "lstm" else 1
            grad_args = (0, *range(n_states + 1, n_states + 1 + 4 * layers))
            benches.append(Benchmark(
                mode, "lstm", _call(mode, getattr(ops, f"{mode}_sequence"), layers),
                _call(mode, getattr(_VF, mode), layers),
                _reference(mode, layers), _inputs(mode), [config], dtypes, grad_args=grad_args,
                # --quick: forward only (the target's mode). torch.compile of the fwd+bwd graph, unrolled over 2 x
                # 128 steps, took 11 min to build on the 2-core VM (2026-11-28); its forward builds in seconds.
                flops=_flops(mode), modes=("fwd",) if quick else ("fwd", "bwd", "fwd+bwd"),
                max_reps=(3 if quick else 10) if device == "cpu" else None))
    return benches
