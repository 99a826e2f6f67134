"""int4 weight-only linear (group 128) against the float F.linear it replaces (fp32 on the CPU, bf16 on a GPU), its
torch.compile, and on the CPU torch's dynamic-quantized int8 linear (torch.ao.quantization.quantize_dynamic).
K = N = 4096 on the CPU (8192 on a GPU), M in {1, 16, 256, 2048} (quick: {1, 16}). Outputs are judged by SQNR
against the float linear (floor 18 dB); bytes = the packed weight + scales and zeros + x + y. The providers are the
int4 table's backends that accept the input: on a GPU the Triton kernels (triton_kernels/quant.py: GEMV at M <= 2,
split-K dot to M = 16, autotuned tiles beyond), on the CPU the C++ kernel (Triton runs there only when forced, under
TRITON_INTERPRET=1)."""
import warnings

import torch
import torch.nn.functional as F

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark

GROUP = 128


def _inputs(config, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    k, n = config["K"], config["N"]
    w = torch.randn(n, k, generator=g) * k ** -0.5
    x = torch.randn(config["M"], k, generator=g)
    packed, scales, zeros = ops.quantize_int4(w, config["group"])
    return (x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), packed.to(device),
            scales.to(device), zeros.to(device), config["group"])


def _ours(x, w, packed, scales, zeros, group):
    return ops.int4_weight_only_linear(x, packed, scales, zeros, group)


def _eager(x, w, packed, scales, zeros, group):
    return F.linear(x, w)


_reference = _eager  # the float linear (float64 for float32 x): the SQNR is against the unquantized weight


def _bytes(config, dtype, mode):
    m, k, n = config["M"], config["K"], config["N"]
    act = torch.empty(0, dtype=dtype).element_size()
    return n * k // 2 + 2 * 4 * n * (k // config["group"]) + act * (m * k + m * n)


def _flops(config, dtype, mode):
    return 2 * config["M"] * config["K"] * config["N"]


def _dynamic_int8():
    """torch's dynamic-quantized linear (int8 weight per tensor, int8 activations quantized per call; fbgemm),
    built once per weight."""
    cache = {}

    def call(x, w, packed, scales, zeros, group):
        key = (w.data_ptr(), tuple(w.shape))
        if key not in cache:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w.float())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.ao.quantization import quantize_dynamic

                cache[key] = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        with torch.no_grad():
            return cache[key](x)

    return call


def _baselines(device):
    return {"torch quantize_dynamic int8": _dynamic_int8()} if device == "cpu" else {}


def benchmarks(device: str, quick: bool):
    size = 4096 if device == "cpu" else 8192
    ms = (1, 16) if quick else (1, 16, 256, 2048)
    configs = [{"M": m, "K": size, "N": size, "group": GROUP} for m in ms]
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16]
    return [Benchmark("int4_weight_only_linear", "int4", _ours, _eager, _reference, _inputs, configs, dtypes,
                      bytes=_bytes, flops=_flops, modes=("fwd",), baselines=_baselines, sqnr_floor=18.0)]
