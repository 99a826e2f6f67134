// Argument checks of the cross-entropy kernels (contract: csrc/cross_entropy.h), shared by the CPU kernel and the
// CUDA glue so that both accept and reject the same inputs with the same messages.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mltoolkit::cross_entropy_args {

// logits (N, C >= 1), stride 1 along classes, rows that do not overlap; target int64 (N) contiguous, same device.
inline void check_inputs(const char* fn, const at::Tensor& logits, const at::Tensor& target, at::DeviceType device,
                         double label_smoothing) {
  TORCH_CHECK(logits.defined() && logits.device().type() == device && logits.layout() == at::kStrided, fn,
              ": logits must be a dense ", c10::DeviceTypeName(device), " tensor");
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be 2-D (N, C), got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": logits must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(logits.size(1) >= 1, fn, ": logits must have at least one class, got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1, fn,
              ": logits must have stride 1 along classes, got strides ", logits.strides());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), fn,
              ": logits rows must not overlap, got strides ", logits.strides(), " for shape ", logits.sizes());
  TORCH_CHECK(target.defined() && target.device() == logits.device() && target.scalar_type() == at::kLong, fn,
              ": target must be an int64 tensor on logits' device (", logits.device(), ")");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.is_contiguous(), fn,
              ": target must be contiguous of shape (", logits.size(0), "), got shape ", target.sizes());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, fn, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

// The dtype of loss, lse and dloss: float64 for float64 logits, else float32.
inline at::ScalarType stat_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// lse or dloss: stat_dtype (N), contiguous, on logits' device.
inline void check_stats(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  const auto want = stat_dtype(logits);
  TORCH_CHECK(t.defined() && t.device() == logits.device() && t.scalar_type() == want, fn, ": ", name, " must be a ",
              c10::toString(want), " tensor on logits' device (", logits.device(), ")");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(), fn, ": ", name,
              " must be contiguous of shape (", logits.size(0), "), got shape ", t.sizes());
}

}  // namespace mltoolkit::cross_entropy_args
