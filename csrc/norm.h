// Host entry points of the normalization kernels (LayerNorm and RMSNorm, with an optional fused residual add).
// One contract for every backend; mltoolkit/ops/norm.py documents it and is the only caller.
//
// Shapes: x, residual, dy, dresidual_out are 2-D (rows M, width N), contiguous, one dtype (float32, float64, float16,
// bfloat16). weight and bias are 1-D (N), contiguous, either x's dtype or float32. mean and rstd are float32 (M),
// float64 when x is float64 (so that fp64 gradcheck is exact). dbias comes back in weight's dtype (x's without
// weight): the backward never sees bias, so the caller casts it when bias has another dtype.
//
// Forward, for each row r (s = x + residual, rounded to x's dtype, when residual is given; else s = x):
//   layer norm: mean = sum(s)/N, rstd = 1/sqrt(sum((s-mean)^2)/N + eps), y = (s-mean)*rstd*weight + bias
//   rms norm:   rstd = 1/sqrt(sum(s^2)/N + eps),                       y = s*rstd*weight
//   returns {y, residual_out (= s, undefined without residual), mean (undefined for rms), rstd}
// Backward, with xhat = (s-mean)*rstd (rms: s*rstd) and g = dy*weight (dy without weight):
//   dx = rstd*(g - mean_row(g) - xhat*mean_row(g*xhat))   (rms: no mean_row(g) term)  [+ dresidual_out]
//   dweight = sum_rows(dy*xhat), dbias = sum_rows(dy), accumulated in float32, returned in weight's/bias's dtype
//   returns {dx, dweight (undefined without weight), dbias (undefined unless has_bias)}
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> norm_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps, bool is_rms);

std::vector<at::Tensor> norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                          const std::optional<at::Tensor>& dresidual_out, bool has_bias,
                                          bool is_rms);

#ifdef MLTK_WITH_CUDA
std::vector<at::Tensor> norm_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, double eps, bool is_rms);

std::vector<at::Tensor> norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                           const std::optional<at::Tensor>& dresidual_out, bool has_bias,
                                           bool is_rms);
#endif

}  // namespace mltoolkit
