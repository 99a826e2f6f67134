// Host entry point of the fused multi-tensor AdamW step. One contract for every backend; mltoolkit/ops/fused_adam.py
// is the only caller and mltoolkit/ops/reference/fused_adam.py writes it in plain PyTorch.
//
// One call updates every tensor i of the lists (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs when amsgrad,
// state_steps), in place, with torch.optim.AdamW(foreach=False)'s float32 operations and roundings, in this order:
//   step_i = state_steps[i] += 1                                                  (0-dim float tensor)
//   host, in double, as Python does: decay = 1 - lr * wd, step_size = lr / (1 - beta1^step_i),
//     bc2_sqrt = pow(1 - beta2^step_i, 0.5); each then rounded to float32 (as torch's scalar arguments are)
//     (every backend's host code: advance_step, adamw_coeffs and adamw_scalars in csrc/optim_common.h)
//   per element, float32:
//     g = maximize ? -grad : grad
//     p = p * decay                                                            (only when wd != 0)
//     m = lerp(m, g, 1 - beta1)         torch's lerp: |w| < 0.5 ? fma(w, g - m, m) : fma(w - 1, g - m, g)
//     v = v * beta2;  v = v + ((1 - beta2) * g) * g
//     vmax = max(vmax, v) (amsgrad; the denominator then uses vmax)
//     d = sqrt(v) / bc2_sqrt + eps     (sqrt correctly rounded; torch 2.14's CPU torch.sqrt is not always: 1 ulp)
//     p = p + (-step_size * m) / d
// Tensors: params, grads, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs) float32 CPU, for each i of one shape and the
// same strides, non-overlapping and dense (contiguous or a permutation of it: the update is elementwise, so the
// storage is walked in memory order); grads dense (not sparse). max_exp_avg_sqs is empty unless amsgrad. Work is cut
// into chunks of a fixed number of elements over all tensors and shared by at::parallel_for; each element's result
// does not depend on the chunking or the thread count.
// Errors (TORCH_CHECK naming the function and the argument): list lengths differ, a tensor of the wrong device /
// dtype / shape / strides / layout, a state step that is not a one-element float tensor, amsgrad without
// max_exp_avg_sqs.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace mltoolkit {

// Why fused_adamw_cpu (cuda false) or fused_adamw_cuda (cuda true) cannot take these tensors, "" when it can (the
// backend table's question: asked in C++ because a Python loop over hundreds of tensors took longer than a
// 10M-parameter step). The state lists may be empty. Needs no CUDA: it reads devices, dtypes and strides.
std::string fused_adamw_unsupported(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                                    const std::vector<at::Tensor>& max_exp_avg_sqs, bool cuda);
void fused_adamw_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& state_steps,
                     double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                     bool maximize);

}  // namespace mltoolkit
