// Host entry points of the convolution kernels. One contract for every backend; mltoolkit/ops/conv.py is the only
// caller and mltoolkit/ops/reference/conv.py writes it in plain PyTorch.
//
// 2-D convolution (conv1d is the H = 1 case), cross-correlation as in torch:
//   x (N, C, H, W), weight (K, C / groups, R, S), bias (K) or none; stride, padding (zero, symmetric per dim: the
//   caller pads asymmetric "same" padding and the reflect / replicate / circular modes itself), dilation: 2 ints each.
//   y[n, k, p, q] = bias[k] + sum_{c in group(k), r, s} x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] * w[k, c', r, s]
//   P = (H + 2ph - dh(R-1) - 1) / sh + 1, Q likewise. Outputs with P or Q < 1 are an error.
// Layout: x is contiguous in NCHW or in channels_last (NHWC); weight is contiguous (either format); y and dx come
// back in x's memory format, dweight in weight's, dbias contiguous. One dtype for x, weight, bias, dy: float32,
// float64 (CPU), float16, bfloat16 (half types accumulate in float32).
// Fused epilogue (forward): y = act(conv + bias + residual), in the accumulation type, rounded once at the store.
//   residual: (N, K, P, Q) of x's dtype, contiguous in x's memory format, or none (the ResNet shortcut add).
//   activation: "none", "relu", "relu6", "silu", "gelu" (erf form), "gelu_tanh", "hardswish", each with torch's
//   formula (F.relu, F.relu6, F.silu, F.gelu(approximate="none" / "tanh"), F.hardswish). Anything else is an error.
// Backward: returns {dx, dweight, dbias}, each undefined unless asked for (output_mask = {x, weight, bias}); dy is
// the gradient of the convolution's own output (the caller has already taken the epilogue's derivative).
#pragma once
#include <ATen/core/Tensor.h>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                                           std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                           int64_t groups, const std::optional<at::Tensor>& residual,
                                           const std::string& activation);

// The CPU forward with weight layouts made once by conv2d_prepare_weight_cpu(weight, groups) (for inference, where
// the weight does not change): prepared_panels replaces the per-call packing of the weight into panels and
// prepared_winograd (for 3x3, stride-1, single-group convolutions with C and K >= 32, else None) the per-call
// Winograd transform, which also lets Winograd run on smaller images (7x7). Either may be None; a tensor that
// does not fit this weight's layout is an error, but one made from another weight of the same shape is the
// caller's responsibility (mltoolkit.nn caches them per weight version).
std::vector<at::Tensor> conv2d_forward_prepared_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                    std::vector<int64_t> dilation, int64_t groups,
                                                    const std::optional<at::Tensor>& residual,
                                                    const std::string& activation,
                                                    const std::optional<at::Tensor>& prepared_panels,
                                                    const std::optional<at::Tensor>& prepared_winograd);

// {panels, winograd} of weight (K, C / groups, R, S) for a convolution with these groups, stride and dilation, in
// the accumulation dtype (float32, float64 for float64); undefined tensors where the forward does not use them
// (winograd where Winograd does not run, both for depthwise).
std::vector<at::Tensor> conv2d_prepare_weight_cpu(const at::Tensor& weight, int64_t groups,
                                                  std::vector<int64_t> stride, std::vector<int64_t> dilation);

std::vector<at::Tensor> conv2d_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                                            std::vector<int64_t> dilation, int64_t groups,
                                            std::vector<bool> output_mask);

#ifdef MLTK_WITH_CUDA
std::vector<at::Tensor> conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                                            std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                            int64_t groups, const std::optional<at::Tensor>& residual,
                                            const std::string& activation);

std::vector<at::Tensor> conv2d_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                             std::vector<int64_t> stride, std::vector<int64_t> padding,
                                             std::vector<int64_t> dilation, int64_t groups,
                                             std::vector<bool> output_mask);
#endif

}  // namespace mltoolkit
