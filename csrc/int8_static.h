// Host entry points of static int8 activation quantization (a scale calibrated ahead of time, one for the whole
// tensor) and of the int8 im2col behind Int8Conv2d. mltoolkit/ops/int8_static.py is the only caller;
// mltoolkit/ops/reference/int8.py (quantize_static, im2col_int8) writes the same contract in plain PyTorch, bit-exact.
//
// quantize_static_cpu(x float32 / float16 / bfloat16, any shape and strides, scale float32 with one element) -> q int8
//   of x's shape, channels_last when x is a 4-D channels_last (and not also row-major) tensor, else row-major:
//     q = clamp(round_half_to_even(float(x) / scale), -127, 127)      (a true float32 division, as quantize_rows)
//   Symmetric: the code 0 is exactly 0.0 (so zero padding of a quantized input is exact) and -128 never appears.
//   scale must be finite and at least FLT_MIN. Non-finite x gives unspecified (memory-safe) q.
//
// im2col_int8_cpu(xq int8 (B, C, H, W), any strides (channels_last is read without a copy), kernel (KH, KW),
//   stride (SH, SW), padding (PH, PW), dilation (DH, DW)) -> cols int8 (B * OH * OW, KH * KW * C):
//     OH = (H + 2 PH - DH (KH - 1) - 1) / SH + 1 (likewise OW), row r = (b * OH + oh) * OW + ow,
//     cols[r, (kh * KW + kw) * C + c] = xq[b, c, oh SH - PH + kh DH, ow SW - PW + kw DW], 0 outside the image.
//   The column order (kh, kw, c) matches a conv weight permuted to (OC, KH, KW, C): cols @ w2d^T is the convolution
//   in NHWC order. Always a new tensor (a registered op's output may not alias its input): the Python layer
//   (mltoolkit.ops.im2col_int8) takes the 1x1 / stride 1 / unpadded case as a view of the channels_last input.
#pragma once
#include <ATen/core/Tensor.h>
#include <vector>

namespace mltoolkit {

at::Tensor quantize_static_cpu(const at::Tensor& x, const at::Tensor& scale);

at::Tensor im2col_int8_cpu(const at::Tensor& xq, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
                           const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation);

}  // namespace mltoolkit
