// Tensor glue of the CUDA cross-entropy (csrc/cuda/cross_entropy.cu): argument checks (shared with the CPU kernel,
// csrc/cross_entropy_args.h), outputs, device guard, current stream, launch-error checks. Contract:
// csrc/cross_entropy.h. Targets are not range-checked here (that would synchronize): one out of range gives a NaN
// loss.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cross_entropy.h"
#include "cross_entropy_args.h"
#include "cross_entropy_launch.h"

namespace mltoolkit {
namespace {

namespace cce = cuda_cross_entropy;

cce::Params params(const char* fn, const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                   double label_smoothing) {
  cce::Params p;
  p.logits = logits.data_ptr();
  p.target = target.const_data_ptr<int64_t>();
  p.rows = logits.size(0);
  p.classes = logits.size(1);
  p.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  switch (logits.scalar_type()) {
    case at::kFloat: p.dtype = cce::DType::kFloat32; break;
    case at::kDouble: p.dtype = cce::DType::kFloat64; break;
    case at::kHalf: p.dtype = cce::DType::kFloat16; break;
    case at::kBFloat16: p.dtype = cce::DType::kBFloat16; break;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", logits.scalar_type());
  }
  return p;
}

void check_launch(const char* fn, const cce::LaunchStatus& st) {
  TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

}  // namespace

std::vector<at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                   int64_t ignore_index, double label_smoothing) {
  constexpr const char* fn = "cross_entropy_forward_cuda";
  cross_entropy_args::check_inputs(fn, logits, target, at::kCUDA, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stat = logits.options().dtype(cross_entropy_args::stat_dtype(logits));
  at::Tensor loss = at::empty({logits.size(0)}, stat), lse = at::empty({logits.size(0)}, stat);
  check_launch(fn, cce::cross_entropy_forward(params(fn, logits, target, ignore_index, label_smoothing),
                                              loss.data_ptr(), lse.data_ptr(),
                                              c10::cuda::getCurrentCUDAStream(logits.get_device()).stream()));
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target,
                                       const at::Tensor& lse, int64_t ignore_index, double label_smoothing) {
  constexpr const char* fn = "cross_entropy_backward_cuda";
  cross_entropy_args::check_inputs(fn, logits, target, at::kCUDA, label_smoothing);
  cross_entropy_args::check_stats(fn, "dloss", dloss, logits);
  cross_entropy_args::check_stats(fn, "lse", lse, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(fn, cce::cross_entropy_backward(params(fn, logits, target, ignore_index, label_smoothing),
                                               dloss.data_ptr(), lse.data_ptr(), dlogits.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream(logits.get_device()).stream()));
  return dlogits;
}

}  // namespace mltoolkit
