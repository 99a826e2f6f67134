// Host entry points of the batch-norm kernels: y = act(batch_norm(x) + residual), the training-mode half of
// conv + BN + act. One contract for every backend; mltoolkit/ops/batch_norm.py is the only caller and
// mltoolkit/ops/reference/batch_norm.py writes it in plain PyTorch.
//
// Shapes: x (N, C, *) with any number of spatial dims (L = their product, M = N * L values per channel), contiguous in
// NCHW order or dense channels-last (NHWC / NDHWC: channels innermost). residual and dy have x's shape and dtype and
// x's memory layout; y, dx and dresidual come back in it. weight, bias, running_mean, running_var: (C,), contiguous,
// each of x's dtype or float32, each optional. x dtypes: float32, float64, float16, bfloat16 (half types accumulate
// in float32). mean and invstd: (C,), float32, or float64 when x is float64.
//
// Forward, per channel c (every reduction over the N * L values of the channel):
//   training: mean = sum(x) / M, var = sum((x - mean)^2) / M (biased; computed stably: the corrected two-pass
//             formula within blocks that stay in cache, blocks merged with Chan's formula), invstd = 1/sqrt(var + eps);
//             when running_mean / running_var are given they are updated in place:
//               running_mean = (1 - momentum) * running_mean + momentum * mean
//               running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased)
//             M == 1 is an error (no variance); M == 0 gives an empty y, mean = 0, invstd = 1 / sqrt(eps) and
//             leaves the running stats alone.
//   eval:     mean = running_mean, invstd = 1 / sqrt(running_var + eps) (both required; nothing is updated).
//   z = (x - mean) * invstd * weight + bias + residual, y = act(z), in the accumulation type, rounded once.
//   activation: "none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish" (csrc/conv_epilogue.h).
//   returns {y, mean, invstd}.
// Backward, given the forward's mean and invstd: z is recomputed from x, mean, invstd, weight, bias and residual
// (nothing but the inputs is saved), dz = dy * act'(z), xhat = (x - mean) * invstd, and
//   dbias = sum(dz), dweight = sum(dz * xhat), dresidual = dz, and
//   training: dx = weight * invstd * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)   (through the batch stats)
//   eval:     dx = weight * invstd * dz
//   returns {dx, dweight, dbias, dresidual}, each undefined unless asked for (output_mask = {x, weight, bias,
//   residual}); dweight in weight's dtype, dbias in bias's (x's when that parameter is absent).
// Sums run in a fixed order that depends only on the shape: results are the same for any thread count.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <string>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> batch_norm_act_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& running_mean,
                                                   const std::optional<at::Tensor>& running_var, bool training,
                                                   double momentum, double eps, const std::string& activation,
                                                   const std::optional<at::Tensor>& residual);

std::vector<at::Tensor> batch_norm_act_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                    const at::Tensor& invstd,
                                                    const std::optional<at::Tensor>& residual, bool training,
                                                    const std::string& activation, std::vector<bool> output_mask);

}  // namespace mltoolkit
