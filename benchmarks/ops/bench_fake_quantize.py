"""Per-channel int8 fake quantization (quantization-aware training's weight quantizer, one quantizer per output
channel of a 4096 x 4096 weight, qmin, qmax = -128, 127, integer zero points) against torch's own fused ops and
torch eager / torch.compile of the plain-PyTorch formula:

  fake_quantize      fixed scale and zero point; fwd, and fwd+bwd with the straight-through dx only.
                     Baseline: torch.fake_quantize_per_channel_affine (int32 zero points).
  fake_quantize_lsq  learnable scale and zero point (LSQ, grad_scale = 1 / sqrt(n * qmax)); fwd+bwd with dx, dscale
                     and dzero_point. Baseline: torch._fake_quantize_learnable_per_channel_affine (grad_factor the
                     same gradient scale).

The oracle is mltoolkit/ops/reference/fake_quantize.py's differentiable formula (fake_quantize_autograd: round with a
straight-through detach, LSQ's gradient scaling); "torch eager" / "torch.compile" run the same formula written here
without its argument checks (their data-dependent branch would break torch.compile's graph). Its forward rounds a
little differently (u + (r - u) for r), well inside the tolerance table. torch's own ops multiply by 1 / scale
instead of dividing, so a few values in a million land one step away (reported as "outside tolerance", timed).
The scales are 0.75 x absmax / 127 per channel, so that the tails clamp (both gradient branches are exercised).
On the GPU the providers are the table's GPU backends (the Triton kernels of triton_kernels/fake_quantize.py)."""
import torch

from mltoolkit import ops
from mltoolkit.benchmark import Benchmark
from mltoolkit.ops.reference import fake_quantize as ref

QMIN, QMAX = -128, 127


def _inputs(config, dtype, device):
    n, k = config["N"], config["K"]
    x = torch.randn(n, k, dtype=dtype, device=device)
    scale = (x.float().abs().amax(1) / QMAX * 0.75).contiguous()
    zp = torch.randint(-3, 4, (n,), device=device).float()
    return x, scale, zp, zp.to(torch.int32)


def _lsq_scale(config):
    return 1.0 / (config["K"] * QMAX) ** 0.5


def _formula(x, scale, zp, grad_scale=1.0):
    """fake_quantize_autograd, per channel along axis 0, integer zero points, no checks."""
    s0 = scale.detach().float()[:, None]
    b0 = torch.round(zp.detach().float())[:, None]
    xf = x.float()
    with torch.no_grad():
        v = torch.round(xf / s0) + b0
        q = v.clamp(QMIN, QMAX)
        inside = (v >= QMIN) & (v <= QMAX)
    s = scale.float() * grad_scale
    s = (s + (scale.float() - s).detach())[:, None]
    b = zp.float() * grad_scale
    b = b + (zp.float() - b).detach()
    b = (b + (torch.round(b) - b).detach())[:, None]
    u = xf / s
    r_ste = u + (torch.round(u) - u).detach()
    return ((torch.where(inside, r_ste + b, q) - b) * s).to(x.dtype)


# ---- fixed scale -------------------------------------------------------------------------------------------------

def _ours(x, scale, zp, zp_int):
    return ops.fake_quantize(x, scale, zp, QMIN, QMAX, axis=0)


def _eager(x, scale, zp, zp_int):
    return _formula(x, scale, zp)


def _reference(x, scale, zp, zp_int):
    return ref.fake_quantize_autograd(x, scale, zp, QMIN, QMAX, axis=0)


def _torch_fq(x, scale, zp, zp_int):
    return torch.fake_quantize_per_channel_affine(x, scale, zp_int, 0, QMIN, QMAX)


def _baselines(device):
    return {"torch fake_quantize_per_channel_affine": _torch_fq}


# ---- learnable scale (LSQ) ---------------------------------------------------------------------------------------

def _lsq_benchmarks(config_list, dtypes):
    out = []
    for config in config_list:
        gs = _lsq_scale(config)

        def ours(x, scale, zp, zp_int, _gs=gs):
            return ops.fake_quantize(x, scale, zp, QMIN, QMAX, axis=0, grad_scale=_gs)

        def eager(x, scale, zp, zp_int, _gs=gs):
            return _formula(x, scale, zp, _gs)

        def oracle(x, scale, zp, zp_int, _gs=gs):
            return ref.fake_quantize_autograd(x, scale, zp, QMIN, QMAX, axis=0, grad_scale=_gs)

        def torch_lsq(x, scale, zp, zp_int, _gs=gs):
            return torch._fake_quantize_learnable_per_channel_affine(x, scale, zp, 0, QMIN, QMAX, _gs)

        out.append(Benchmark("fake_quantize_lsq", "fake_quantize", ours, eager, oracle, _inputs, [config], dtypes,
                             grad_args=(0, 1, 2), bytes=_bytes, modes=("fwd+bwd",),
                             baselines=lambda device, _f=torch_lsq: {
                                 "torch _fake_quantize_learnable_per_channel_affine": _f}))
    return out


def _bytes(config, dtype, mode):
    # forward: read x, write y; backward: read dy and x, write dx; the per-channel parameters are negligible
    t = config["N"] * config["K"] * torch.finfo(dtype).bits // 8
    p = 3 * 4 * config["N"]
    return {"fwd": 2 * t + p, "bwd": 3 * t + 2 * p, "fwd+bwd": 5 * t + 3 * p}[mode]


def benchmarks(device: str, quick: bool):
    configs = [{"N": 1024, "K": 4096}] if quick else [{"N": 4096, "K": 4096}]
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]
    return [Benchmark("fake_quantize", "fake_quantize", _ours, _eager, _reference, _inputs, configs, dtypes,
                      grad_args=(0,), bytes=_bytes, modes=("fwd", "fwd+bwd"), baselines=_baselines)
            ] + _lsq_benchmarks(configs, dtypes)
