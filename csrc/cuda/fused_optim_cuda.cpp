// Tensor glue of the CUDA multi-tensor optimizer kernels (csrc/cuda/fused_optim.cu): argument checks, step counters
// and host scalars (csrc/optim_common.h, shared with the CPU kernels), scratch allocation, device guard, current
// stream, launch-error checks. Contracts:
// csrc/fused_adam.h (fused_adamw_cuda) and csrc/fused_lamb.h (fused_lamb_cuda, fused_clip_grad_norm_cuda). Every
// check runs before the first CUDA call.
//
// fused_adamw_cuda: params float32, float16 or bfloat16 (several dtypes in one call: one launch series per dtype),
//   grads and state in the param's dtype, shape and strides, dense; math in float32 (the contract's order and
//   roundings). state_steps: one-element float tensors, read and incremented on the host (a CPU float32 tensor costs
//   no synchronization; another one is read with .item()).
// fused_lamb_cuda: float32 or float64, one dtype, contiguous, the CPU kernel's arithmetic; norms in float64,
//   deterministic (no atomics). No host synchronization.
// fused_clip_grad_norm_cuda: float32 or float64, one dtype, contiguous; norm_type 2, inf or any finite p > 0 (the
//   public mltoolkit function only passes 2 and inf). Synchronizes with the host only when error_if_nonfinite.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "fused_optim_launch.h"
#include "optim_common.h"

namespace mltoolkit {
namespace {

namespace co = cuda_optim;

co::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return co::DType::kFloat32;
    case at::kDouble: return co::DType::kFloat64;
    case at::kHalf: return co::DType::kFloat16;
    case at::kBFloat16: return co::DType::kBFloat16;
    default: TORCH_CHECK(false, "mltoolkit optimizers (CUDA): unsupported dtype ", t);
  }
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

template <typename T>
co::LambParams lamb_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                            bool bias_correction, bool grad_averaging, bool use_trust_ratio, double max_trust_ratio) {
  // As fused_lamb_cpu computes them (optim_common.h), carried as double.
  const LambCoeffs<T> c = lamb_coeffs<T>(beta1, beta2, eps, weight_decay, step, bias_correction, grad_averaging);
  co::LambParams a;
  a.dtype = std::is_same_v<T, float> ? co::DType::kFloat32 : co::DType::kFloat64;
  a.beta1 = c.beta1;
  a.beta2 = c.beta2;
  a.beta3 = c.beta3;
  a.one_minus_beta2 = c.one_minus_beta2;
  a.inv_bc1 = c.inv_bc1;
  a.inv_bc2 = c.inv_bc2;
  a.eps = c.eps;
  a.weight_decay = c.weight_decay;
  a.lr = lr;
  a.use_trust_ratio = use_trust_ratio;
  a.max_trust_ratio = max_trust_ratio;
  return a;
}

}  // namespace

void fused_adamw_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                      const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& state_steps,
                      double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                      bool maximize) {
  const char* fn = "fused_adamw_cuda";
  const size_t n = params.size();
  check_adamw_lengths(fn, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  check_cuda_ref(fn, "params[0]", ref);
  for (size_t i = 0; i < n; ++i)
    check_adamw_tensor(fn, i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, &ref);

  // Steps and host scalars exactly as fused_adamw_cpu computes them.
  const std::vector<AdamWCoeffs> coeffs = adamw_step_coeffs(state_steps, lr, beta1, beta2, weight_decay);
  std::vector<co::AdamTensor> by_dtype[3];
  adamw_cuda_entries(fn, params, coeffs, by_dtype, [&](co::AdamTensor& t, size_t i) {
    t.p = params[i].data_ptr();
    t.g = grads[i].data_ptr();
    t.m = exp_avgs[i].data_ptr();
    t.v = exp_avg_sqs[i].data_ptr();
    t.vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.numel = params[i].numel();
  });
  const c10::cuda::CUDAGuard guard(ref.device());
  co::AdamParams a;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  const co::DType dtypes[3] = {co::DType::kFloat32, co::DType::kFloat16, co::DType::kBFloat16};
  const cudaStream_t stream = stream_of(ref);
  adamw_cuda_launch(fn, by_dtype, adamw_scalars(beta1, beta2, eps), a, dtypes,
                    [&](const std::vector<co::AdamTensor>& ts, const co::AdamParams& ap) {
                      return co::adamw_step(ts, ap, stream);
                    });
}

void fused_lamb_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step, bool bias_correction,
                     bool grad_averaging, bool use_trust_ratio, double max_trust_ratio) {
  const char* fn = "fused_lamb_cuda";
  const size_t n = params.size();
  check_lamb_args(fn, params, grads, exp_avgs, exp_avg_sqs, step, /*cuda=*/true);
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  std::vector<co::LambTensor> ts(n);
  std::vector<int64_t> numel(n);
  for (size_t i = 0; i < n; ++i) {
    ts[i] = {params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
             params[i].numel()};
    numel[i] = params[i].numel();
  }
  const int64_t chunks = co::chunk_offsets(numel, co::pick_chunk(numel)).back();  // as lamb_step cuts them
  const c10::cuda::CUDAGuard guard(ref.device());
  const bool f32 = ref.scalar_type() == at::kFloat;
  const co::LambParams a =
      f32 ? lamb_scalars<float>(lr, beta1, beta2, eps, weight_decay, step, bias_correction, grad_averaging,
                                use_trust_ratio, max_trust_ratio)
          : lamb_scalars<double>(lr, beta1, beta2, eps, weight_decay, step, bias_correction, grad_averaging,
                                 use_trust_ratio, max_trust_ratio);
  // Scratch from the caching allocator (no synchronization): 2 doubles per chunk, then one scale per tensor.
  at::Tensor scratch = at::empty({2 * chunks + static_cast<int64_t>(n)}, ref.options().dtype(at::kDouble));
  double* base = scratch.data_ptr<double>();
  check_launch(fn, co::lamb_step(ts, a, base, base + 2 * chunks, stream_of(ref)));
}

at::Tensor fused_clip_grad_norm_cuda(const std::vector<at::Tensor>& grads, double max_norm, double norm_type,
                                     bool error_if_nonfinite) {
  const char* fn = "fused_clip_grad_norm_cuda";
  TORCH_CHECK(!grads.empty(), fn, ": grads must not be empty");
  co::ClipParams a;
  if (std::isinf(norm_type) && norm_type > 0) {
    a.kind = co::NormKind::kInf;
  } else if (norm_type == 2.0) {
    a.kind = co::NormKind::kL2;
  } else {
    TORCH_CHECK(std::isfinite(norm_type) && norm_type > 0, fn,
                ": norm_type must be a finite p > 0 or inf, got ", norm_type);
    a.kind = co::NormKind::kLp;
  }
  a.p = norm_type;
  a.max_norm = max_norm;
  const at::Tensor& ref = grads[0];
  check_cuda_ref(fn, "grads[0]", ref);
  check_float_list(fn, "grads", grads, ref, &ref);
  a.dtype = to_dtype(ref.scalar_type());
  std::vector<co::ClipTensor> ts(grads.size());
  std::vector<int64_t> numel(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    ts[i] = {grads[i].data_ptr(), grads[i].numel()};
    numel[i] = grads[i].numel();
  }
  const int64_t chunks = co::chunk_offsets(numel, co::pick_chunk(numel)).back();  // as clip_norm cuts them
  const c10::cuda::CUDAGuard guard(ref.device());
  at::Tensor total = at::empty({}, ref.options());
  at::Tensor coef = at::empty({1}, ref.options());
  at::Tensor partials = at::empty({std::max<int64_t>(chunks, 1)}, ref.options().dtype(at::kDouble));
  const cudaStream_t stream = stream_of(ref);
  check_launch(fn, co::clip_norm(ts, a, partials.data_ptr<double>(), total.data_ptr(), coef.data_ptr(), stream));
  if (error_if_nonfinite) {
    const double t = total.item<double>();  // the one host synchronization, only here
    TORCH_CHECK(std::isfinite(t), "fused_clip_grad_norm_: the total norm of order ", norm_type,
                " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable this error and "
                "scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
  }
  check_launch(fn, co::clip_scale(ts, a, coef.data_ptr(), stream));
  return total;
}

}  // namespace mltoolkit
