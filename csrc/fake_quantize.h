// Host entry points of fake quantization (quantize then dequantize, in float), the building block of
// quantization-aware training. One contract for every backend; mltoolkit/ops/fake_quantize.py is the only caller and
// mltoolkit/ops/reference/fake_quantize.py writes it in plain PyTorch.
//
// Granularity: x (any shape, float32 / float16 / bfloat16, any strides) is seen as (outer, C, inner) contiguous, and
// element (o, c, i) uses the quantizer parameters scale[c], zero_point[c]:
//   per tensor  (axis = -1, group_size = 0): outer = 1, C = 1, inner = numel; scale has one element.
//   per channel (axis = a >= 0):             outer = prod(shape[:a]), C = shape[a], inner = prod(shape[a+1:]);
//                                            scale (C,).
//   per group   (group_size = G > 0):        G consecutive elements of the last dim share a quantizer (K % G == 0):
//                                            outer = 1, C = numel / G, inner = G; scale (*shape[:-1], K / G).
// scale: float32, every value positive and finite (checked). zero_point: float32 of scale's shape, or none (0).
// qmin < qmax, both integers with |q| <= 2^16 (int8 symmetric -127..127, int4 0..15, ...).
// All arithmetic in float32 (fp16 / bf16 x widened exactly), y rounded once to x's dtype.
//
// Two zero-point domains (float_zero_point):
//   integer (torch's fake_quantize_per_*_affine, int8): zp = round_half_even(zero_point)
//     r = round_half_even(x / s), v = r + zp, q = clamp(v, qmin, qmax), y = (q - zp) * s
//   float (LSQ+'s offset beta = zero_point; int4 weights): with cm = floor((qmin + qmax + 1) / 2),
//     r = round_half_even((x - beta) / s), v = r, q = clamp(r, qmin, qmax),
//     y = (q - cm) * s + z, z = beta + cm * s (each product rounded to float32 before its add: no FMA).
//     With qmin = 0, qmax = 15 and beta = the group minimum this is exactly csrc/int4_linear.h's arithmetic: its
//     stored zero is z and w' = (q - 8) * scale + zero, so fake_quantize == dequantize_int4(quantize_int4(w)).
//   (The division is a true float32 division, not a multiplication by 1 / s, so that results match the int8 and int4
//   quantizers bit for bit.)
//
// Backward (straight-through estimator; LSQ, Esser et al. 2019, and LSQ+ for the learnable scale and offset), with
// u = x / s (integer) or (x - beta) / s (float), mask = qmin <= v <= qmax ("not clamped"):
//   dx = mask ? dy : 0
//   dscale[c]      = grad_scale * sum over c's elements of dy * (mask ? r - u : q - zp)     (float domain: q)
//   dzero_point[c] = grad_scale * sum over c's elements of (mask ? 0 : dy) * (-s)           (float domain: * 1)
//   grad_scale is LSQ's gradient scale (1 / sqrt(elements per scale * qmax) in the paper; 1 = plain gradient).
//   output_mask = {dx, dscale, dzero_point}: the gradients not asked for are returned undefined and not computed.
//   One fused pass over x and dy produces dx and per-chunk partial sums (chunks of at most 4096 elements of one
//   quantizer), added in a fixed order that depends only on the shape: results are the same for any thread count.
// Errors (TORCH_CHECK naming the function and the argument): x / dy not float32 / float16 / bfloat16 or of different
// dtypes or shapes, scale / zero_point not float32 or of the wrong shape, a non-positive or non-finite scale, a
// non-finite zero point, qmin >= qmax, axis out of range, group_size not dividing the last dim.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <optional>
#include <vector>

namespace mltoolkit {

at::Tensor fake_quantize_cpu(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                             int64_t qmin, int64_t qmax, int64_t axis, int64_t group_size, bool float_zero_point);

std::vector<at::Tensor> fake_quantize_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                                                   const std::optional<at::Tensor>& zero_point, int64_t qmin,
                                                   int64_t qmax, int64_t axis, int64_t group_size,
                                                   bool float_zero_point, double grad_scale,
                                                   std::vector<bool> output_mask);

}  // namespace mltoolkit
