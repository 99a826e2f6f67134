// Host-side pieces shared by the fused optimizers' CPU kernels (csrc/cpu/fused_adam.cpp, fused_adam8bit.cpp,
// fused_lamb.cpp) and their CUDA tensor glue (csrc/cuda/fused_optim_cuda.cpp, fused_adam8bit_cuda.cpp): the state-step
// counters, the per-tensor AdamW and LAMB coefficients computed on the host (the contracts csrc/fused_adam.h,
// csrc/fused_adam8bit.h and csrc/fused_lamb.h say in which precision; every kernel takes them from here, so the CPU and
// CUDA kernels cannot drift apart), and the tensor-list argument checks (TORCH_CHECK naming the function and the
// argument).
//
// Plain host C++ over ATen. A check takes `const at::Tensor* cuda_ref`: nullptr for a CPU kernel (every tensor must be
// on the CPU), else the tensor whose CUDA device every tensor must share (the CUDA glue). The section at the end is
// compiled only where the CUDA runtime header came first (the CUDA glue).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "check_util.h"

namespace mltoolkit {

// ---- state steps and coefficients ------------------------------------------------------------------------------

// state_step += 1; returns the new value. A float32 contiguous CPU tensor is incremented in place without a dispatch;
// any other one through add_ and item() (a host synchronization for a CUDA tensor).
inline double advance_step(const at::Tensor& s) {
  if (s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous()) {
    float* sp = s.data_ptr<float>();
    *sp += 1.0f;
    return *sp;
  }
  at::Tensor st = s;
  st.add_(1);
  return st.item<double>();
}

// AdamW's per-tensor scalars (csrc/fused_adam.h): in double, as Python computes them, each then rounded to float32
// (as torch rounds its scalar arguments).
struct AdamWCoeffs {
  float decay;          // 1 - lr * weight_decay
  float neg_step_size;  // -(lr / (1 - beta1^step))
  float bc2_sqrt;       // pow(1 - beta2^step, 0.5)
};

inline AdamWCoeffs adamw_coeffs(double lr, double beta1, double beta2, double weight_decay, double step) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(-(lr / bc1)),
          static_cast<float>(std::pow(bc2, 0.5))};
}

// Advances every state step by one, in list order, and returns each tensor's coefficients at its new step.
inline std::vector<AdamWCoeffs> adamw_step_coeffs(const std::vector<at::Tensor>& state_steps, double lr, double beta1,
                                                  double beta2, double weight_decay) {
  std::vector<AdamWCoeffs> out(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i)
    out[i] = adamw_coeffs(lr, beta1, beta2, weight_decay, advance_step(state_steps[i]));
  return out;
}

// AdamW's scalars common to all tensors, float32. m = lerp(m, g, w1) is torch's lerp:
// fma(lerp_coeff, g - m, small_w ? m : g) with small_w = |w1| < 0.5 and lerp_coeff = small_w ? w1 : w1 - 1.
struct AdamWScalars {
  float w1;     // 1 - beta1, rounded from double
  float beta2;
  float c2;     // 1 - beta2, rounded from double
  float eps;
  bool small_w;
  float lerp_coeff;
};

inline AdamWScalars adamw_scalars(double beta1, double beta2, double eps) {
  AdamWScalars s;
  s.w1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.c2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.small_w = std::abs(s.w1) < 0.5f;
  s.lerp_coeff = s.small_w ? s.w1 : s.w1 - 1.0f;
  return s;
}

// LAMB's scalars (csrc/fused_lamb.h) in the tensors' dtype T: bias corrections in double, every scalar rounded to T,
// one_minus_beta2 computed in T from the rounded beta2.
template <typename T>
struct LambCoeffs {
  T beta1, beta2, beta3, one_minus_beta2, inv_bc1, inv_bc2, eps, weight_decay;
};

template <typename T>
LambCoeffs<T> lamb_coeffs(double beta1, double beta2, double eps, double weight_decay, int64_t step,
                          bool bias_correction, bool grad_averaging) {
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, static_cast<double>(step)) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, static_cast<double>(step)) : 1.0;
  LambCoeffs<T> c;
  c.beta1 = static_cast<T>(beta1);
  c.beta2 = static_cast<T>(beta2);
  c.beta3 = static_cast<T>(grad_averaging ? 1.0 - beta1 : 1.0);
  c.one_minus_beta2 = T(1) - c.beta2;
  c.inv_bc1 = static_cast<T>(1.0 / bc1);
  c.inv_bc2 = static_cast<T>(1.0 / bc2);
  c.eps = static_cast<T>(eps);
  c.weight_decay = static_cast<T>(weight_decay);
  return c;
}

// ---- argument checks -------------------------------------------------------------------------------------------

// A CUDA kernel's first tensor (its device is every other tensor's): defined and on a CUDA device.
inline void check_cuda_ref(const char* fn, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(ref.defined() && ref.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got ",
              ref.defined() ? ref.device().str() : std::string("an undefined tensor"));
}

// name[i] is a defined strided tensor on the CPU (cuda_ref == nullptr) or on cuda_ref's CUDA device (ref_name names
// cuda_ref in the message).
inline void check_placed(const char* fn, const char* name, size_t i, const at::Tensor& t, const at::Tensor* cuda_ref,
                         const char* ref_name) {
  TORCH_CHECK(t.defined(), fn, ": ", name, "[", i, "] must be a tensor, got an undefined one");
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, "[", i, "] must be a dense (strided) tensor, got layout ",
              t.layout());
  if (cuda_ref == nullptr) {
    TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, "[", i, "] must be a CPU tensor, got device ", t.device());
  } else {
    TORCH_CHECK(t.is_cuda(), fn, ": ", name, "[", i, "] must be a CUDA tensor, got device ", t.device());
    TORCH_CHECK(t.device() == cuda_ref->device(), fn, ": ", name, "[", i, "] is on ", t.device(), " but ", ref_name,
                " is on ", cuda_ref->device());
  }
}

// The param dtypes of the CUDA AdamW kernels (32-bit and 8-bit state); the index of the dtype's launch series.
inline int check_adam_cuda_dtype(const char* fn, size_t i, const at::Tensor& p) {
  const auto st = p.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn, ": params[", i,
              "] must be float32, float16 or bfloat16, got ", st);
  return st == at::kFloat ? 0 : st == at::kHalf ? 1 : 2;
}

inline void check_state_step(const char* fn, size_t i, const at::Tensor& s, bool cuda) {
  if (cuda) {
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()), fn, ": state_steps[", i,
                "] must be a one-element float tensor (a CPU float32 one avoids a device synchronization)");
  } else {
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()) && s.device().is_cpu(), fn,
                ": state_steps[", i, "] must be a one-element float CPU tensor");
  }
}

// fused_adamw_{cpu,cuda}: the lists' lengths.
inline void check_adamw_lengths(const char* fn, const std::vector<at::Tensor>& params,
                                const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                                const std::vector<at::Tensor>& exp_avg_sqs,
                                const std::vector<at::Tensor>& max_exp_avg_sqs,
                                const std::vector<at::Tensor>& state_steps, bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n, fn,
              ": params, grads, exp_avgs, exp_avg_sqs and state_steps must have one length, got ", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", state_steps.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, fn, ": amsgrad needs max_exp_avg_sqs of params' length ", n,
              ", got ", max_exp_avg_sqs.size());
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), fn, ": max_exp_avg_sqs must be empty without amsgrad, got ",
              max_exp_avg_sqs.size(), " tensors");
}

// fused_adamw_{cpu,cuda}: tensor i of every list. CPU: all float32; CUDA: params[i] float32, float16 or bfloat16 and
// grads / state in its dtype. Grads and state have params[i]'s shape and strides; params[i] is non-overlapping and
// dense.
inline void check_adamw_tensor(const char* fn, size_t i, const std::vector<at::Tensor>& params,
                               const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                               const std::vector<at::Tensor>& exp_avg_sqs,
                               const std::vector<at::Tensor>& max_exp_avg_sqs,
                               const std::vector<at::Tensor>& state_steps, bool amsgrad, const at::Tensor* cuda_ref) {
  const at::Tensor& p = params[i];
  const auto like_p = [&](const char* name, const at::Tensor& t) {
    check_placed(fn, name, i, t, cuda_ref, "params[0] / grads[0]");
    if (cuda_ref == nullptr) {
      TORCH_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, "[", i, "] must be float32, got ", t.scalar_type());
    } else {
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), fn, ": ", name, "[", i, "] must have params[", i, "]'s dtype ",
                  p.scalar_type(), ", got ", t.scalar_type());
    }
    TORCH_CHECK(t.sizes() == p.sizes(), fn, ": ", name, "[", i, "] must have params[", i, "]'s shape ",
                shape_str(p.sizes()), ", got ", shape_str(t.sizes()));
    TORCH_CHECK(t.numel() <= 1 || t.strides() == p.strides(), fn, ": ", name, "[", i, "] must have params[", i,
                "]'s strides ", shape_str(p.strides()), ", got ", shape_str(t.strides()));
  };
  if (cuda_ref == nullptr) {
    like_p("params", p);
  } else {
    check_placed(fn, "params", i, p, cuda_ref, "params[0] / grads[0]");
    check_adam_cuda_dtype(fn, i, p);
  }
  TORCH_CHECK(p.is_non_overlapping_and_dense(), fn, ": params[", i,
              "] must be non-overlapping and dense (contiguous or a permutation of it), got strides ",
              shape_str(p.strides()), " for shape ", shape_str(p.sizes()));
  like_p("grads", grads[i]);
  like_p("exp_avgs", exp_avgs[i]);
  like_p("exp_avg_sqs", exp_avg_sqs[i]);
  if (amsgrad) like_p("max_exp_avg_sqs", max_exp_avg_sqs[i]);
  check_state_step(fn, i, state_steps[i], cuda_ref != nullptr);
}

// fused_adamw8bit_{cpu,cuda}: the lists' lengths.
inline void check_adamw8bit_lengths(const char* fn, const std::vector<at::Tensor>& params,
                                    const std::vector<at::Tensor>& grads,
                                    const std::vector<at::Tensor>& exp_avg_codes,
                                    const std::vector<at::Tensor>& exp_avg_absmax,
                                    const std::vector<at::Tensor>& exp_avg_sq_codes,
                                    const std::vector<at::Tensor>& exp_avg_sq_absmax,
                                    const std::vector<at::Tensor>& state_steps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avg_codes.size() == n && exp_avg_absmax.size() == n &&
                  exp_avg_sq_codes.size() == n && exp_avg_sq_absmax.size() == n && state_steps.size() == n,
              fn, ": params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax and ",
              "state_steps must have one length");
}

// The 8-bit optimizers (fused_adamw8bit_{cpu,cuda}, fused_lamb8bit_cpu): tensor i of the parameter, gradient and
// state lists (csrc/fused_adam8bit.h). CPU: params, grads float32; CUDA: params float32, float16 or bfloat16 and
// grads of its dtype; all contiguous; codes uint8 of numel elements, absmax float32 of ceil(numel / block) elements.
// Returns params[i].numel().
inline int64_t check_8bit_state_tensor(const char* fn, size_t i, const std::vector<at::Tensor>& params,
                                       const std::vector<at::Tensor>& grads,
                                       const std::vector<at::Tensor>& exp_avg_codes,
                                       const std::vector<at::Tensor>& exp_avg_absmax,
                                       const std::vector<at::Tensor>& exp_avg_sq_codes,
                                       const std::vector<at::Tensor>& exp_avg_sq_absmax, int64_t block,
                                       const at::Tensor* cuda_ref) {
  const at::Tensor& p = params[i];
  at::ScalarType dtype = at::kFloat;
  if (cuda_ref != nullptr) {
    TORCH_CHECK(p.defined(), fn, ": params[", i, "] must be a tensor, got an undefined one");
    check_adam_cuda_dtype(fn, i, p);
    dtype = p.scalar_type();
  }
  const int64_t numel = p.defined() ? p.numel() : 0;
  const int64_t nb = (numel + block - 1) / block;
  const auto check = [&](const char* name, const at::Tensor& t, at::ScalarType dt, int64_t count) {
    check_placed(fn, name, i, t, cuda_ref, "params[0]");
    TORCH_CHECK(t.scalar_type() == dt, fn, ": ", name, "[", i, "] must be ", dt, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), fn, ": ", name, "[", i, "] must be contiguous, got strides ",
                shape_str(t.strides()));
    TORCH_CHECK(t.numel() == count, fn, ": ", name, "[", i, "] must have ", count, " elements, got ", t.numel());
  };
  check("params", p, dtype, numel);
  check("grads", grads[i], dtype, numel);
  TORCH_CHECK(grads[i].sizes() == p.sizes(), fn, ": grads[", i, "] must have params[", i, "]'s shape ",
              shape_str(p.sizes()), ", got ", shape_str(grads[i].sizes()));
  check("exp_avg_codes", exp_avg_codes[i], at::kByte, numel);
  check("exp_avg_sq_codes", exp_avg_sq_codes[i], at::kByte, numel);
  check("exp_avg_absmax", exp_avg_absmax[i], at::kFloat, nb);
  check("exp_avg_sq_absmax", exp_avg_sq_absmax[i], at::kFloat, nb);
  return numel;
}

// fused_adamw8bit_{cpu,cuda}: tensor i of every list, the state step included.
inline int64_t check_adamw8bit_tensor(const char* fn, size_t i, const std::vector<at::Tensor>& params,
                                      const std::vector<at::Tensor>& grads,
                                      const std::vector<at::Tensor>& exp_avg_codes,
                                      const std::vector<at::Tensor>& exp_avg_absmax,
                                      const std::vector<at::Tensor>& exp_avg_sq_codes,
                                      const std::vector<at::Tensor>& exp_avg_sq_absmax,
                                      const std::vector<at::Tensor>& state_steps, int64_t block,
                                      const at::Tensor* cuda_ref) {
  const int64_t numel = check_8bit_state_tensor(fn, i, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                                exp_avg_sq_absmax, block, cuda_ref);
  check_state_step(fn, i, state_steps[i], cuda_ref != nullptr);
  return numel;
}

// LAMB / clip lists: one float32 or float64 dtype (ref's), contiguous, on the CPU or on cuda_ref's device.
inline void check_float_list(const char* fn, const char* name, const std::vector<at::Tensor>& ts,
                             const at::Tensor& ref, const at::Tensor* cuda_ref) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    check_placed(fn, name, i, t, cuda_ref, "params[0] / grads[0]");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, fn, ": ", name, "[", i,
                "] must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                " but the first tensor has ", ref.scalar_type());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), fn, ": ", name, "[", i,
                "] must be non-overlapping and dense (contiguous or a permutation of it, e.g. channels_last), got "
                "strides ", shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
  }
}

// fused_lamb_{cpu,cuda}: lengths, step, then (for a non-empty list) every tensor and the shapes.
inline void check_lamb_args(const char* fn, const std::vector<at::Tensor>& params,
                            const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                            const std::vector<at::Tensor>& exp_avg_sqs, int64_t step, bool cuda) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n, fn,
              ": params, grads, exp_avgs and exp_avg_sqs must have the same length, got ", n, ", ", grads.size(),
              ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(step >= 1, fn, ": step must be >= 1, got ", step);
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  if (cuda) check_cuda_ref(fn, "params[0]", ref);
  const at::Tensor* cuda_ref = cuda ? &ref : nullptr;
  check_float_list(fn, "params", params, ref, cuda_ref);
  check_float_list(fn, "grads", grads, ref, cuda_ref);
  check_float_list(fn, "exp_avgs", exp_avgs, ref, cuda_ref);
  check_float_list(fn, "exp_avg_sqs", exp_avg_sqs, ref, cuda_ref);
  for (size_t i = 0; i < n; ++i) {
    const char* names[3] = {"grads", "exp_avgs", "exp_avg_sqs"};
    const at::Tensor* others[3] = {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]};
    for (int k = 0; k < 3; ++k) {
      if (others[k]->sizes() == params[i].sizes()) {
        // The kernels walk each tensor's memory in order: grads and state in the parameter's strides.
        TORCH_CHECK(params[i].numel() <= 1 || others[k]->strides() == params[i].strides(), fn, ": ", names[k], "[",
                    i, "] must have params[", i, "]'s strides ", shape_str(params[i].strides()), ", got ",
                    shape_str(others[k]->strides()));
        continue;
      }
      // The two backends' messages as they were (tests match both).
      if (cuda) {
        TORCH_CHECK(false, fn, ": ", names[k], "[", i, "] has shape ", shape_str(others[k]->sizes()), " but params[",
                    i, "] has ", shape_str(params[i].sizes()));
      }
      TORCH_CHECK(false, fn, ": tensor ", i, " of grads/exp_avgs/exp_avg_sqs has shape ",
                  shape_str(others[k]->sizes()), " but params[", i, "] has ", shape_str(params[i].sizes()));
    }
  }
}

// ---- CUDA glue only --------------------------------------------------------------------------------------------
#if defined(CUDART_VERSION)
// A raw launcher's answer (cuda_launch::LaunchStatus): `what` non-null when it refused the arguments, `cuda` the
// first launch error.
template <typename Status>
void check_launch(const char* fn, const Status& st) {
  TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

// The CUDA AdamW glue (32-bit and 8-bit state; the launchers' tensor entries carry decay, neg_step_size and bc2_sqrt):
// the entries of the non-empty tensors, each with its coefficients, bucketed by param dtype in check_adam_cuda_dtype's
// order (float32, float16, bfloat16). fill(entry, i) sets tensor i's addresses and size.
template <typename Entry, typename Fill>
void adamw_cuda_entries(const char* fn, const std::vector<at::Tensor>& params, const std::vector<AdamWCoeffs>& coeffs,
                        std::vector<Entry> (&by_dtype)[3], Fill&& fill) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    Entry t;
    fill(t, i);
    t.decay = coeffs[i].decay;
    t.neg_step_size = coeffs[i].neg_step_size;
    t.bc2_sqrt = coeffs[i].bc2_sqrt;
    by_dtype[check_adam_cuda_dtype(fn, i, p)].push_back(t);
  }
}

// Sets the launch parameters' float32 scalars (w1, beta2, c2, eps) and launches each non-empty bucket with its dtype
// (dtypes: the launcher's names of float32, float16, bfloat16): launch(entries, a) returns the launcher's status.
template <typename Entry, typename Params, typename DType, typename Launch>
void adamw_cuda_launch(const char* fn, const std::vector<Entry> (&by_dtype)[3], const AdamWScalars& sc, Params& a,
                       const DType (&dtypes)[3], Launch&& launch) {
  a.w1 = sc.w1;
  a.beta2 = sc.beta2;
  a.c2 = sc.c2;
  a.eps = sc.eps;
  for (int k = 0; k < 3; ++k) {
    if (by_dtype[k].empty()) continue;
    a.dtype = dtypes[k];
    check_launch(fn, launch(by_dtype[k], a));
  }
}
#endif

}  // namespace mltoolkit
