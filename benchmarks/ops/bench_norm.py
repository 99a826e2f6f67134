"""LayerNorm / RMSNorm (plain and fused residual add) against torch eager and torch.compile."""
import torch
import torch.nn.functional as F

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark
from mltoolkit.ops.reference import norm as ref


def _inputs(with_bias: bool, with_residual: bool):
    def make(config, dtype, device):
        m, n = config["M"], config["N"]
        x = torch.randn(m, n, dtype=dtype, device=device)
        w = torch.randn(n, dtype=dtype, device=device)
        args = [x]
        if with_residual:
            args.append(torch.randn(m, n, dtype=dtype, device=device))
        args.append(w)
        if with_bias:
            args.append(torch.randn(n, dtype=dtype, device=device))
        return tuple(args)
    return make


def _bytes(with_bias: bool, with_residual: bool):
    def count(config, dtype, mode):
        m, n, e = config["M"], config["N"], torch.finfo(dtype).bits // 8
        params = (2 if with_bias else 1) * n * e
        tensor = m * n * e
        # forward: read x (+ residual), write y (+ the sum); backward: read dy, the saved input (+ the grad of
        # the sum), write dx; both read the parameters, backward writes their grads.
        fwd = tensor * (4 if with_residual else 2) + params
        bwd = tensor * (4 if with_residual else 3) + 2 * params
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return count


def _layer_norm_eager(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def _rms_norm_eager(x, w):
    return F.rms_norm(x, (x.shape[-1],), w)


def _add_layer_norm_eager(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b), s


def _add_rms_norm_eager(x, r, w):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w), s


def benchmarks(device: str, quick: bool):
    if device == "cuda":
        configs = [{"M": 16384, "N": 8192}] if quick else [{"M": 16384, "N": 8192}, {"M": 32768, "N": 1024},
                                                           {"M": 4096, "N": 4096}, {"M": 512, "N": 65536}]
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    else:
        configs = [{"M": 4096, "N": 4096}] if quick else [{"M": 4096, "N": 4096}, {"M": 16384, "N": 1024},
                                                          {"M": 128, "N": 65536}]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    full = not quick
    benches = [
        Benchmark("layer_norm", "norm", lambda x, w, b: ops.layer_norm(x, (x.shape[-1],), w, b), _layer_norm_eager,
                  lambda x, w, b: ref.layer_norm(x, (x.shape[-1],), w, b), _inputs(True, False), configs, dtypes,
                  grad_args=(0, 1, 2), bytes=_bytes(True, False), include_reference_backend=full),
        Benchmark("rms_norm", "norm", lambda x, w: ops.rms_norm(x, (x.shape[-1],), w), _rms_norm_eager,
                  lambda x, w: ref.rms_norm(x, (x.shape[-1],), w), _inputs(False, False), configs, dtypes,
                  grad_args=(0, 1), bytes=_bytes(False, False), include_reference_backend=full),
        Benchmark("add_layer_norm", "norm", ops.add_layer_norm, _add_layer_norm_eager, ref.add_layer_norm,
                  _inputs(True, True), configs, dtypes, grad_args=(0, 1, 2, 3), bytes=_bytes(True, True),
                  include_reference_backend=full),
        Benchmark("add_rms_norm", "norm", ops.add_rms_norm, _add_rms_norm_eager, ref.add_rms_norm,
                  _inputs(False, True), configs, dtypes, grad_args=(0, 1, 2), bytes=_bytes(False, True),
                  include_reference_backend=full),
    ]
    # --quick on the CPU: the three ops of the targets; add_layer_norm (LayerNorm's fused residual form, the
    # same kernel as layer_norm's) only in the full run, where it took 30 of the quick run's ~460 s.
    return [b for b in benches if not (quick and device == "cpu" and b.op == "add_layer_norm")]
