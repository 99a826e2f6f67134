// Host entry points of the fused LAMB optimizer step and the fused global-norm gradient clip (CPU).
// One contract for every backend; mltoolkit/ops/fused_lamb.py documents it and is the only caller.
//
// fused_lamb_cpu(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
//                bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio)
//   Lists of equal length; tensor i of each list has one shape; all tensors are contiguous, on the CPU, one dtype
//   (float32 or float64). Updated in place: params, exp_avgs, exp_avg_sqs. grads are read only. Per tensor
//   (LAMB, You et al. 2019, arXiv:1904.00962 v3+ Algorithm 2, with apex FusedLAMB's options):
//     beta3 = grad_averaging ? 1 - beta1 : 1
//     m = beta1*m + beta3*g;  v = beta2*v + (1-beta2)*g*g
//     bc1 = bias_correction ? 1 - beta1^step : 1;  bc2 = bias_correction ? 1 - beta2^step : 1
//       (in double; 1/bc1, 1/bc2 and the other scalars rounded to the dtype: lamb_coeffs in csrc/optim_common.h)
//     u = (m/bc1) / (sqrt(v/bc2) + eps) + weight_decay*p
//     trust = use_trust_ratio && ||p|| > 0 && ||u|| > 0 ? ||p|| / ||u|| : 1;  trust = min(trust, max_trust_ratio)
//       when max_trust_ratio > 0
//     p -= lr * trust * u
//   ||.|| are L2 norms over the whole tensor, accumulated in float64 over fixed-size chunks in a fixed order, so
//   the result does not depend on the thread count. ||p|| is taken before the update. No gradient clipping here
//   (apex clips by the global grad norm inside its step; use fused_clip_grad_norm_cpu before the step instead).
//   Two passes per wave of tensors (~1M elements): pass 1 updates m, v, sums ||p||^2, ||u||^2 per chunk and keeps
//   u in a wave-sized scratch buffer; pass 2 applies the update while the wave is still in the cache. A tensor over
//   the wave size recomputes u in pass 2 from the new m, v (same code, same result): no parameter-sized scratch.
//
// fused_clip_grad_norm_cpu(grads, max_norm, norm_type, error_if_nonfinite) -> total_norm (0-dim, grads' dtype)
//   norm_type 2 or inf. total = (sum_i ||g_i||^2)^(1/2) (inf: max |g|), accumulated in float64; then, as
//   torch.nn.utils.clip_grad_norm_ does (in the grads' dtype): coef = min(1, max_norm / (total + 1e-6)) and every
//   grad is multiplied by coef in place. error_if_nonfinite: raises when total is nan or inf (grads untouched).
//   Non-empty list; all grads contiguous, CPU, one dtype (float32 or float64).
#pragma once
#include <ATen/core/Tensor.h>
#include <vector>

namespace mltoolkit {

void fused_lamb_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int64_t step, bool bias_correction,
                    bool grad_averaging, bool use_trust_ratio, double max_trust_ratio);

at::Tensor fused_clip_grad_norm_cpu(const std::vector<at::Tensor>& grads, double max_norm, double norm_type,
                                    bool error_if_nonfinite);

}  // namespace mltoolkit
