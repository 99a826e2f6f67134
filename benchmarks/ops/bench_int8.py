"""int8 dynamic-quantized linear (activations quantized per token inside the timed call, weights quantized per
channel beforehand and packed where Int8Linear packs them, on CPUs whose kernel path is VNNI; there "mltoolkit
unpacked wq" is the same call on the plain (N, K) weight) against float32 F.linear (eager and torch.compile) and
torch's own dynamic-quantized linear (torch.ao.quantization.quantize_dynamic of an nn.Linear: fbgemm / oneDNN,
per-tensor activation scale), on the CPU, K = N = 4096 as in a 7B-class model's
projections. Outputs are judged by SQNR against the float64 F.linear.

On a GPU (bfloat16 activations, against bfloat16 F.linear) the providers are the table's GPU backends (the Triton
kernels of triton_kernels/quant.py: per-token quantize + int8 tl.dot GEMM) with the plain (N, K) int8 weight, as
Int8Linear keeps it off the CPU; M up to 4096 (the issue's int8 x int8 target: >= 1.5x bf16 at M = 4096).

On a GPU also the int8 x int8 product alone ("int8_linear": activations quantized beforehand, as a static scheme or
the previous layer's epilogue would hand them over; the issue's H100 target, >= 1.5x bf16 F.linear at M = 4096),
with torch's own int8 GEMM (torch._int_mm, cuBLASLt) and the same dequantize epilogue in torch ops as a baseline.

Also: the int8 weight-only linear (float activations, int8 weight streamed and converted in the kernel) and the
static int8 linear (activations quantized with a fixed, calibrated per-tensor scale), against the same yardsticks; on a
GPU both in bfloat16 (the Triton kernels of triton_kernels/int8_extra.py, M up to 4096), the CPU rows in float32."""
import torch
import torch.nn.functional as F
from torch import nn

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark
from mltoolkit.ops import int8 as int8_ops


def _inputs(config, dtype, device):
    M, K, N = config["M"], config["K"], config["N"]
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5
    b = torch.randn(N, dtype=dtype, device=device) * 0.1
    wq, ws = ops.quantize_per_channel(w)  # once, at conversion time, as the quantized module does
    return x, w, b, wq, _as_module_keeps_it(wq), ws


def _as_module_keeps_it(wq):
    """The int8 weight as the quantized modules hand it to the kernel (mltoolkit.quantization.modules._cpu_packed):
    packed on CPUs where packing pays, plain on GPUs and other CPUs."""
    return ops.int8_pack_weight(wq) if wq.device.type == "cpu" and int8_ops.cpu_packing_pays() else wq


def _ours(x, w, b, wq, wp, ws):
    return ops.int8_linear_dynamic(x, wp, ws, b)


def _ours_unpacked(x, w, b, wq, wp, ws):
    return ops.int8_linear_dynamic(x, wq, ws, b)


def _eager(x, w, b, wq, wp, ws):
    return F.linear(x, w, b)


_reference = _eager  # F.linear in float64 on the float weight: the quantization error counts against every provider

_QUANTIZED: dict = {}  # (weight pointer, shape) -> (weight, quantized module); the weight is kept alive


def _torch_dynamic(x, w, b, wq, wp, ws):
    key = (w.data_ptr(), tuple(w.shape), b.data_ptr())
    if key not in _QUANTIZED:
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        q = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
        _QUANTIZED[key] = (w, b, q)
    return _QUANTIZED[key][2](x)


def _baselines(device):
    if device != "cpu":
        return {}
    unpacked = {"mltoolkit unpacked wq": _ours_unpacked} if int8_ops.cpu_packing_pays() else {}
    return {"torch quantize_dynamic": _torch_dynamic, **unpacked}


def _flops(config, dtype, mode):
    return 2 * config["M"] * config["K"] * config["N"]


def _bytes(config, dtype, mode):
    # int8 weight read once, activations in and out in their dtype
    M, K, N = config["M"], config["K"], config["N"]
    return N * K + 4 * N + (M * K + M * N) * torch.finfo(dtype).bits // 8


# ---- int8 x int8, activations quantized beforehand (GPU) ----------------------------------------------------------

def _gemm_inputs(config, dtype, device):
    x, w, b, wq, _, ws = _inputs(config, dtype, device)
    xq, xs = ops.quantize_per_token(x)
    return x, w, b, xq, xs, wq, ws


def _gemm_ours(x, w, b, xq, xs, wq, ws):
    return ops.int8_linear(xq, xs, wq, ws, b, out_dtype=x.dtype)


def _gemm_eager(x, w, b, xq, xs, wq, ws):
    return F.linear(x, w, b)


def _gemm_torch_int_mm(x, w, b, xq, xs, wq, ws):
    return (torch._int_mm(xq, wq.t()) * xs[:, None] * ws + b).to(x.dtype)


def _gemm_bytes(config, dtype, mode):
    M, K, N = config["M"], config["K"], config["N"]
    return N * K + M * K + 4 * (M + N) + M * N * torch.finfo(dtype).bits // 8


# ---- int8 weight-only linear (float activations, the int8 weight converted inside the kernel) ----------------------
# and the static int8 linear (activations quantized with a calibrated per-tensor scale, no absmax pass)

def _wo_inputs(config, dtype, device):
    M, K, N = config["M"], config["K"], config["N"]
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5
    b = torch.randn(N, dtype=dtype, device=device) * 0.1
    wq, ws = ops.quantize_per_channel(w)
    xs = (x.abs().amax().float() / 127).reshape(())  # what a calibration observer gives on this data (min-max)
    return x, w, b, wq, _as_module_keeps_it(wq), ws, xs


def _wo_ours(x, w, b, wq, wp, ws, xs):
    return ops.int8_weight_only_linear(x, wq, ws, b)


def _static_ours(x, w, b, wq, wp, ws, xs):
    return ops.int8_linear_static(x, xs, wp, ws, b)


def _wo_eager(x, w, b, wq, wp, ws, xs):
    return F.linear(x, w, b)


def _wo_baselines(device):
    if device != "cpu":
        return {}
    return {"torch quantize_dynamic": lambda x, w, b, wq, wp, ws, xs: _torch_dynamic(x, w, b, wq, wp, ws)}


def _wo_bytes(config, dtype, mode):
    return _bytes(config, dtype, mode)


def benchmarks(device: str, quick: bool):
    gpu_target = () if device == "cpu" else (4096,)  # the GPU target's M (int8 x int8 >= 1.5x bf16 at M = 4096)
    ms = ((1, 16) if quick else (1, 16, 256, 2048)) + gpu_target
    configs = [{"M": m, "K": 4096, "N": 4096} for m in ms]
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16]
    rows = [Benchmark("int8_linear_dynamic", "int8", _ours, _eager, _reference, _inputs, configs, dtypes,
                      flops=_flops, bytes=_bytes, modes=("fwd",), baselines=_baselines, sqnr_floor=35.0)]
    if device != "cpu":
        # GPU: the Triton kernels of triton_kernels/int8_extra.py (weight-only GEMV / split-K / tiled dot, static
        # quantize) with bfloat16 activations, against bfloat16 F.linear on the float weight.
        gpu_configs = [{"M": m, "K": 4096, "N": 4096} for m in ((1, 16, 256) if quick else (1, 16, 256, 2048, 4096))]
        gemm_configs = [{"M": m, "K": 4096, "N": 4096} for m in ((4096,) if quick else (256, 2048, 4096))]
        return rows + [
            Benchmark("int8_linear", "int8", _gemm_ours, _gemm_eager, _gemm_eager, _gemm_inputs, gemm_configs,
                      [torch.bfloat16], flops=_flops, bytes=_gemm_bytes, modes=("fwd",),
                      baselines=lambda dev: {"torch._int_mm": _gemm_torch_int_mm}, sqnr_floor=35.0),
            Benchmark("int8_weight_only_linear", "int8_weight_only", _wo_ours, _wo_eager, _wo_eager, _wo_inputs,
                      gpu_configs, [torch.bfloat16], flops=_flops, bytes=_wo_bytes, modes=("fwd",),
                      baselines=_wo_baselines, sqnr_floor=35.0),
            Benchmark("int8_linear_static", "int8", _static_ours, _wo_eager, _wo_eager, _wo_inputs, gpu_configs,
                      [torch.bfloat16], flops=_flops, bytes=_wo_bytes, modes=("fwd",), baselines=_wo_baselines,
                      sqnr_floor=30.0)]
    wo_configs = [{"M": m, "K": 4096, "N": 4096} for m in ((1, 16) if quick else (1, 16, 256, 2048))]
    return rows + [
        Benchmark("int8_weight_only_linear", "int8_weight_only", _wo_ours, _wo_eager, _wo_eager, _wo_inputs,
                  wo_configs, [torch.float32], flops=_flops, bytes=_wo_bytes, modes=("fwd",),
                  baselines=_wo_baselines, sqnr_floor=38.0),
        Benchmark("int8_linear_static", "int8", _static_ours, _wo_eager, _wo_eager, _wo_inputs, wo_configs,
                  [torch.float32], flops=_flops, bytes=_wo_bytes, modes=("fwd",), baselines=_wo_baselines,
                  sqnr_floor=30.0)]
