// Host entry points of the softmax cross-entropy kernels (class-index targets, ignore_index, label smoothing). One
// contract for every backend (C++ CPU, CUDA C++, Triton, plain-PyTorch reference); mltoolkit/ops/loss.py is the only
// caller.
//
// logits: (N, C), C >= 1, stride 1 along classes and any row stride (a slice of wider rows, e.g. a language-model
// head computed over a vocabulary padded to a multiple of 64, is read in place); float32, float64, float16, bfloat16.
// target: int64 (N), contiguous. lse, loss, dloss: float32 (N) (float64 for float64 logits), contiguous.
//
// Forward, for row i with t = target[i] and e = label_smoothing:
//   lse_i  = log(sum_j exp(x_ij))
//   loss_i = lse_i - (1 - e) * x_it - (e / C) * sum_j x_ij           (torch's formula for e > 0, no class weights)
//   loss_i = 0 when t == ignore_index; a t outside [0, C) that is not ignore_index is an error
//   returns {loss, lse}
// Backward: dlogits_ij = dloss_i * (exp(x_ij - lse_i) - e / C - (1 - e) * [j == t]), 0 on ignored rows;
//   returns dlogits, contiguous (N, C), in logits' dtype.
#pragma once
#include <ATen/core/Tensor.h>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                  int64_t ignore_index, double label_smoothing);

at::Tensor cross_entropy_backward_cpu(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& lse, int64_t ignore_index, double label_smoothing);

#ifdef MLTK_WITH_CUDA
// csrc/cuda/cross_entropy_cuda.cpp: a target out of range gives a NaN loss (checking would synchronize).
std::vector<at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                   int64_t ignore_index, double label_smoothing);

at::Tensor cross_entropy_backward_cuda(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target,
                                       const at::Tensor& lse, int64_t ignore_index, double label_smoothing);
#endif

}  // namespace mltoolkit
