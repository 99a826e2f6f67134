"""Static int8 activation quantization (one per-tensor scale calibrated ahead of time) and the int8 im2col behind
Int8Conv2d; with int8_linear (mltoolkit/ops/int8.py) they make the static-int8 linear and convolution. Contract in
csrc/int8_static.h, reference in mltoolkit/ops/reference/int8.py (bit-exact).

    torch.ops.mltoolkit.quantize_static(x float, scale f32 (one element)) -> q int8 (x's shape)
    torch.ops.mltoolkit.im2col_int8(xq int8 (B, C, H, W), kernel, stride, padding, dilation)
        -> cols int8 (B * OH * OW, KH * KW * C), column order (kh, kw, c)

q = clamp(round_half_to_even(x / scale), -127, 127): symmetric, so the code 0 is exactly 0.0 and the zero padding of a
quantized image is exact. int8_linear_static and int8_conv2d_static compose them with int8_linear, whose per-token
x_scale is the static scale expanded (stride 0: no copy). Backends: Triton (GPU; triton_kernels/int8_extra.py), C++
(CPU), reference; all bit-exact.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops import int8 as int8_ops
from mltoolkit.ops.reference import int8 as reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INT8_STATIC = table("int8_static")


def _out_format(x: Tensor) -> torch.memory_format:
    """The layout of quantize_static's output (the kernels' rule, csrc/int8_static.h)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _reference_quantize(x: Tensor, scale: Tensor) -> Tensor:
    return reference.quantize_static(x, scale).contiguous(memory_format=_out_format(x))


def _triton_kernels():
    from mltoolkit.triton_kernels import int8_extra

    return int8_extra


# Triton (triton_kernels/int8_extra.py): both bit-exact with the reference.
INT8_STATIC.register("triton", _ext.triton_device, _ext.triton_unavailable,
                     quantize=lambda x, s: _triton_kernels().quantize_static(x, s),
                     im2col=lambda *a: _triton_kernels().im2col_int8(*a))
INT8_STATIC.register("cpp", _ext.on_cpu, _ext.cpp_unavailable,
                     quantize=lambda x, s: _ext._C.quantize_static_cpu(x, s),
                     im2col=lambda *a: _ext._C.im2col_int8_cpu(*a))
INT8_STATIC.register("reference", lambda *_: None, quantize=_reference_quantize,
                     im2col=lambda xq, *a: reference.im2col_int8(xq, *a).contiguous())


# ---- registered ops -------------------------------------------------------------------------------------------

def _quantize_impl(x: Tensor, scale: Tensor) -> Tensor:
    return INT8_STATIC.select(x).kernels["quantize"](x, scale)


quantize_static_op = torch.library.custom_op("mltoolkit::quantize_static", mutates_args=())(_quantize_impl)


@quantize_static_op.register_fake
def _(x, scale):
    torch._check(scale.numel() == 1, lambda: "quantize_static: scale must have one element")
    return torch.empty(x.shape, dtype=torch.int8, device=x.device, memory_format=_out_format(x))


def _im2col_impl(xq: Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    return INT8_STATIC.select(xq).kernels["im2col"](xq, kernel, stride, padding, dilation)


im2col_int8_op = torch.library.custom_op("mltoolkit::im2col_int8", mutates_args=())(_im2col_impl)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@im2col_int8_op.register_fake
def _(xq, kernel, stride, padding, dilation):
    torch._check(xq.dim() == 4, lambda: "im2col_int8: xq must be 4-D")
    B, C, H, W = xq.shape
    oh = _out_size(H, kernel[0], stride[0], padding[0], dilation[0])
    ow = _out_size(W, kernel[1], stride[1], padding[1], dilation[1])
    return xq.new_empty((B * oh * ow, kernel[0] * kernel[1] * C))


# ---- public API -----------------------------------------------------------------------------------------------

def _check_scale(fn: str, name: str, scale, ref: Tensor) -> None:
    if not isinstance(scale, Tensor):
        raise TypeError(f"{fn}: {name} must be a float32 Tensor with one element, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{fn}: {name} must be float32, got {scale.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"{fn}: {name} must have one element (a per-tensor scale), got shape {tuple(scale.shape)}")
    if scale.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {scale.device} but x is on {ref.device}")


def _float_x(fn: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")


def _quantize(x: Tensor, scale: Tensor) -> Tensor:
    return _quantize_impl(x, scale) if _ext.plain_eager(x, scale) else quantize_static_op(x, scale)


def quantize_static(x: Tensor, scale: Tensor) -> Tensor:
    """int8 codes of x (any shape, float32 / float16 / bfloat16) with a fixed per-tensor scale (a float32 tensor of
    one element, e.g. from a calibration observer): clamp(round_half_to_even(x / scale), -127, 127); x ~= q * scale.
    A channels_last x gives a channels_last q."""
    fn = "quantize_static"
    _float_x(fn, x)
    _check_scale(fn, "scale", scale, x)
    return _quantize(x, scale)


def _pair(fn: str, name: str, v, lo: int) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in v)):
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")
    if min(v) < lo:
        raise ValueError(f"{fn}: {name} must be at least {lo}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def im2col_int8(xq: Tensor, kernel_size, stride=1, padding=0, dilation=1) -> Tensor:
    """xq int8 (B, C, H, W) (NCHW or channels_last) -> cols int8 (B * OH * OW, KH * KW * C): row (b, oh, ow) holds the
    input patch of that output pixel in (kh, kw, c) order, zeros outside the image (zero padding). A 1x1, stride 1,
    unpadded kernel on a channels_last xq is a view (no copy)."""
    fn = "im2col_int8"
    if not isinstance(xq, Tensor):
        raise TypeError(f"{fn}: xq must be a Tensor, got {type(xq).__name__}")
    if xq.dtype != torch.int8:
        raise TypeError(f"{fn}: xq must be int8, got {xq.dtype}")
    if xq.dim() != 4:
        raise ValueError(f"{fn}: xq must be 4-D (B, C, H, W), got shape {tuple(xq.shape)}")
    k, s = _pair(fn, "kernel_size", kernel_size, 1), _pair(fn, "stride", stride, 1)
    p, d = _pair(fn, "padding", padding, 0), _pair(fn, "dilation", dilation, 1)
    H, W = xq.shape[2:]
    if H + 2 * p[0] < d[0] * (k[0] - 1) + 1 or W + 2 * p[1] < d[1] * (k[1] - 1) + 1:
        raise ValueError(f"{fn}: the padded input ({H + 2 * p[0]}, {W + 2 * p[1]}) is smaller than the dilated "
                         f"kernel ({d[0] * (k[0] - 1) + 1}, {d[1] * (k[1] - 1) + 1})")
    if k == (1, 1) and s == (1, 1) and p == (0, 0):
        B, C = xq.shape[:2]
        return xq.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(B * H * W, C)
    args = (xq, list(k), list(s), list(p), list(d))
    return _im2col_impl(*args) if _ext.plain_eager(xq) else im2col_int8_op(*args)


def _per_token(x_scale: Tensor, m: int) -> Tensor:
    """The static scale as int8_linear's per-token x_scale: expanded (stride 0, no copy) for the CPU kernel, which
    reads it with its stride; materialized for the GPU backends, which index a contiguous (M,) vector."""
    s = x_scale.reshape(1).expand(m)
    return s if x_scale.device.type == "cpu" else s.contiguous()


def int8_linear_static(x: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                       bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, wq * w_scale[:, None], bias) with x quantized to int8 by the fixed per-tensor scale x_scale (static
    quantization): int8_linear(quantize_static(x, x_scale), x_scale expanded per token, wq, w_scale, bias,
    out_dtype=x.dtype).

    x (..., K) float32 / float16 / bfloat16; x_scale float32, one element; wq int8 (N, K) or int8_pack_weight(wq);
    w_scale float32 (N,); bias (N,) or None. Returns (..., N) in x's dtype."""
    fn = "int8_linear_static"
    _float_x(fn, x)
    _check_scale(fn, "x_scale", x_scale, x)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dim, got shape {list(x.shape)}")
    lead, K = tuple(x.shape[:-1]), x.shape[-1]
    int8_ops._check_linear(fn, K, lead, None, wq, w_scale, bias, x, "x")
    x2 = _ext.as_rows(x)  # (rows, K), K = 0 included
    xq = _quantize(x2, x_scale)
    xs = _per_token(x_scale, x2.shape[0])
    return _ext.from_rows(int8_ops._linear(xq, xs, wq, w_scale, bias, x.dtype), x)


def int8_conv2d_static(x: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                       kernel_size: Union[int, tuple[int, int]], stride=1, padding=0, dilation=1) -> Tensor:
    """F.conv2d(x, w, bias, stride, padding, dilation) (groups 1, zero padding) with x quantized to int8 by the fixed
    per-tensor scale x_scale and w in int8 per output channel: im2col_int8 of the quantized x, then int8_linear (exact
    int32 sums, dequantized epilogue with bias) on the im2col rows.

    x (B, C, H, W) float32 / float16 / bfloat16, NCHW or channels_last; x_scale float32, one element; wq int8
    (OC, KH * KW * C) (the conv weight permuted to (OC, KH, KW, C): reference.conv_weight_2d) or int8_pack_weight of
    it; w_scale float32 (OC,); bias (OC,) or None. Returns (B, OC, OH, OW) in x's dtype and memory format."""
    fn = "int8_conv2d_static"
    _float_x(fn, x)
    _check_scale(fn, "x_scale", x_scale, x)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    k = _pair(fn, "kernel_size", kernel_size, 1)
    B, C = x.shape[:2]
    K = k[0] * k[1] * C
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    for name, t in (("wq", wq), ("w_scale", w_scale)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if wq.dim() == 2 and wq.shape[1] != K:
        raise ValueError(f"{fn}: wq must be (OC, KH * KW * C) with KH * KW * C = {K}, got shape {tuple(wq.shape)}")
    xq = _quantize(x, x_scale)
    cols = im2col_int8(xq, k, stride, padding, dilation)
    M = cols.shape[0]
    n = int8_ops._check_linear(fn, K, (M,), None, wq, w_scale, bias, x, "x")
    y = int8_ops._linear(cols, _per_token(x_scale, M), wq, w_scale, bias, x.dtype)
    s, p, d = _pair(fn, "stride", stride, 1), _pair(fn, "padding", padding, 0), _pair(fn, "dilation", dilation, 1)
    oh = _out_size(x.shape[2], k[0], s[0], p[0], d[0])
    ow = _out_size(x.shape[3], k[1], s[1], p[1], d[1])
    y = y.reshape(B, oh, ow, n).permute(0, 3, 1, 2)  # NHWC rows seen as NCHW: a channels_last tensor
    return y if channels_last else y.contiguous()
