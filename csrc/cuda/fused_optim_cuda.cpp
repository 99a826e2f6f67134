// Tensor glue of the CUDA multi-tensor optimizer kernels (csrc/cuda/fused_optim.cu): argument checks, step counters
// and host scalars, scratch allocation, device guard, current stream, launch-error checks. Contracts:
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

#include "check_util.h"
#include "fused_optim_launch.h"

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

void check_status(const co::LaunchStatus& st, const char* fn) {
  TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

// A CUDA strided tensor on ref's device.
void check_cuda(const char* fn, const char* name, size_t i, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), fn, ": ", name, "[", i, "] must be a tensor, got an undefined one");
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, "[", i, "] must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, "[", i, "] must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, "[", i, "] is on ", t.device(), " but params[0] / grads[0] is on ",
              ref.device());
}

// AdamW: grads / state i in params[i]'s dtype, shape and strides.
void check_adam_state(const char* fn, const char* name, size_t i, const at::Tensor& t, const at::Tensor& p,
                      const at::Tensor& ref) {
  check_cuda(fn, name, i, t, ref);
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), fn, ": ", name, "[", i, "] must have params[", i, "]'s dtype ",
              p.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == p.sizes(), fn, ": ", name, "[", i, "] must have params[", i, "]'s shape ",
              shape_str(p.sizes()), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(t.numel() <= 1 || t.strides() == p.strides(), fn, ": ", name, "[", i, "] must have params[", i,
              "]'s strides ", shape_str(p.strides()), ", got ", shape_str(t.strides()));
}

// LAMB / clip: one float32 or float64 dtype, contiguous, on ref's device.
void check_list(const char* fn, const char* name, const std::vector<at::Tensor>& ts, const at::Tensor& ref) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    check_cuda(fn, name, i, t, ref);
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, fn, ": ", name, "[", i,
                "] must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                " but the first tensor has ", ref.scalar_type());
    TORCH_CHECK(t.is_contiguous(), fn, ": ", name, "[", i, "] must be contiguous");
  }
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

template <typename T>
co::LambParams lamb_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                            bool bias_correction, bool grad_averaging, bool use_trust_ratio, double max_trust_ratio) {
  // As fused_lamb_cpu: bias corrections in double, every scalar rounded to T, (1 - beta2) computed in T.
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, static_cast<double>(step)) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, static_cast<double>(step)) : 1.0;
  co::LambParams a;
  a.dtype = std::is_same_v<T, float> ? co::DType::kFloat32 : co::DType::kFloat64;
  a.beta1 = static_cast<T>(beta1);
  a.beta2 = static_cast<T>(beta2);
  a.beta3 = static_cast<T>(grad_averaging ? 1.0 - beta1 : 1.0);
  a.one_minus_beta2 = static_cast<T>(T(1) - static_cast<T>(beta2));
  a.inv_bc1 = static_cast<T>(1.0 / bc1);
  a.inv_bc2 = static_cast<T>(1.0 / bc2);
  a.eps = static_cast<T>(eps);
  a.weight_decay = static_cast<T>(weight_decay);
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
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n, fn,
              ": params, grads, exp_avgs, exp_avg_sqs and state_steps must have one length, got ", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", state_steps.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, fn, ": amsgrad needs max_exp_avg_sqs of params' length ", n,
              ", got ", max_exp_avg_sqs.size());
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), fn, ": max_exp_avg_sqs must be empty without amsgrad, got ",
              max_exp_avg_sqs.size(), " tensors");
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  TORCH_CHECK(ref.defined() && ref.is_cuda(), fn, ": params[0] must be a CUDA tensor, got ",
              ref.defined() ? ref.device().str() : std::string("an undefined tensor"));
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_cuda(fn, "params", i, p, ref);
    const auto st = p.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn, ": params[", i,
                "] must be float32, float16 or bfloat16, got ", st);
    TORCH_CHECK(p.is_non_overlapping_and_dense(), fn, ": params[", i,
                "] must be non-overlapping and dense (contiguous or a permutation of it), got strides ",
                shape_str(p.strides()), " for shape ", shape_str(p.sizes()));
    check_adam_state(fn, "grads", i, grads[i], p, ref);
    check_adam_state(fn, "exp_avgs", i, exp_avgs[i], p, ref);
    check_adam_state(fn, "exp_avg_sqs", i, exp_avg_sqs[i], p, ref);
    if (amsgrad) check_adam_state(fn, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], p, ref);
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()), fn, ": state_steps[", i,
                "] must be a one-element float tensor (a CPU float32 one avoids a device synchronization)");
  }

  // Steps and host scalars exactly as fused_adamw_cpu computes them.
  std::vector<co::AdamTensor> by_dtype[3];  // float32, float16, bfloat16
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = state_steps[i];
    double step;
    if (s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous()) {
      float* sp = s.data_ptr<float>();
      *sp += 1.0f;
      step = *sp;
    } else {
      at::Tensor st = s;
      st.add_(1);
      step = st.item<double>();
    }
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2 = 1.0 - std::pow(beta2, step);
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    co::AdamTensor t;
    t.p = p.data_ptr();
    t.g = grads[i].data_ptr();
    t.m = exp_avgs[i].data_ptr();
    t.v = exp_avg_sqs[i].data_ptr();
    t.vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.numel = p.numel();
    t.decay = static_cast<float>(1.0 - lr * weight_decay);
    t.neg_step_size = static_cast<float>(-(lr / bc1));
    t.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
    const int k = p.scalar_type() == at::kFloat ? 0 : p.scalar_type() == at::kHalf ? 1 : 2;
    by_dtype[k].push_back(t);
  }
  const c10::cuda::CUDAGuard guard(ref.device());
  co::AdamParams a;
  a.w1 = static_cast<float>(1.0 - beta1);
  a.beta2 = static_cast<float>(beta2);
  a.c2 = static_cast<float>(1.0 - beta2);
  a.eps = static_cast<float>(eps);
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  const co::DType dtypes[3] = {co::DType::kFloat32, co::DType::kFloat16, co::DType::kBFloat16};
  for (int k = 0; k < 3; ++k) {
    if (by_dtype[k].empty()) continue;
    a.dtype = dtypes[k];
    check_status(co::adamw_step(by_dtype[k], a, stream_of(ref)), fn);
  }
}

void fused_lamb_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step, bool bias_correction,
                     bool grad_averaging, bool use_trust_ratio, double max_trust_ratio) {
  const char* fn = "fused_lamb_cuda";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, fn,
              ": params, grads, exp_avgs and exp_avg_sqs must have the same length, got ", n, ", ", grads.size(),
              ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(step >= 1, fn, ": step must be >= 1, got ", step);
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  TORCH_CHECK(ref.defined() && ref.is_cuda(), fn, ": params[0] must be a CUDA tensor, got ",
              ref.defined() ? ref.device().str() : std::string("an undefined tensor"));
  check_list(fn, "params", params, ref);
  check_list(fn, "grads", grads, ref);
  check_list(fn, "exp_avgs", exp_avgs, ref);
  check_list(fn, "exp_avg_sqs", exp_avg_sqs, ref);
  for (size_t i = 0; i < n; ++i) {
    const char* names[3] = {"grads", "exp_avgs", "exp_avg_sqs"};
    const at::Tensor* others[3] = {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]};
    for (int k = 0; k < 3; ++k) {
      TORCH_CHECK(others[k]->sizes() == params[i].sizes(), fn, ": ", names[k], "[", i, "] has shape ",
                  shape_str(others[k]->sizes()), " but params[", i, "] has ", shape_str(params[i].sizes()));
    }
  }
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
  check_status(co::lamb_step(ts, a, base, base + 2 * chunks, stream_of(ref)), fn);
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
  TORCH_CHECK(ref.defined() && ref.is_cuda(), fn, ": grads[0] must be a CUDA tensor, got ",
              ref.defined() ? ref.device().str() : std::string("an undefined tensor"));
  check_list(fn, "grads", grads, ref);
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
  check_status(co::clip_norm(ts, a, partials.data_ptr<double>(), total.data_ptr(), coef.data_ptr(), stream), fn);
  if (error_if_nonfinite) {
    const double t = total.item<double>();  // the one host synchronization, only here
    TORCH_CHECK(std::isfinite(t), "fused_clip_grad_norm_: the total norm of order ", norm_type,
                " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable this error and "
                "scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
  }
  check_status(co::clip_scale(ts, a, coef.data_ptr(), stream), fn);
  return total;
}

}  // namespace mltoolkit
