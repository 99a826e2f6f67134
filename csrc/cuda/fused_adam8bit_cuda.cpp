// Tensor glue of the CUDA 8-bit AdamW kernel (csrc/cuda/fused_adam8bit.cu): argument checks, step counters and host
// scalars (exactly as fused_adamw8bit_cpu computes them), device guard, current stream, launch-error checks.
// Contract: csrc/fused_adam8bit.h. Every check runs before the first CUDA call.
//
// params float32, float16 or bfloat16 (several dtypes in one call: one launch series per dtype), contiguous, grads of
// the param's dtype and shape, contiguous; codes uint8 and absmax float32, contiguous, on the params' device; math
// in float32. The maps: float32 tensors of 256 values (moved to the params' device when they are elsewhere).
// state_steps: one-element float tensors, read and incremented on the host (a CPU float32 tensor costs no
// synchronization; another one is read with .item()).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check_util.h"
#include "fused_adam8bit.h"
#include "fused_adam8bit_launch.h"

namespace mltoolkit {

void fused_adamw8bit_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avg_codes,
                          const std::vector<at::Tensor>& exp_avg_absmax,
                          const std::vector<at::Tensor>& exp_avg_sq_codes,
                          const std::vector<at::Tensor>& exp_avg_sq_absmax,
                          const std::vector<at::Tensor>& state_steps, const at::Tensor& qmap_signed,
                          const at::Tensor& qmap_unsigned, double lr, double beta1, double beta2,
                          double weight_decay, double eps, bool maximize);

namespace {

namespace ca = cuda_adam8bit;

void check_on(const char* fn, const char* name, size_t i, const at::Tensor& t, const at::Tensor& ref,
              at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.defined(), fn, ": ", name, "[", i, "] must be a tensor, got an undefined one");
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, "[", i, "] must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, "[", i, "] must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, "[", i, "] is on ", t.device(), " but params[0] is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, "[", i, "] must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, "[", i, "] must be contiguous, got strides ", shape_str(t.strides()));
  TORCH_CHECK(t.numel() == numel, fn, ": ", name, "[", i, "] must have ", numel, " elements, got ", t.numel());
}

at::Tensor map_on(const char* fn, const char* name, const at::Tensor& q, const at::Tensor& ref) {
  TORCH_CHECK(q.defined() && q.scalar_type() == at::kFloat && q.numel() == 256, fn, ": ", name,
              " must be a float32 tensor of 256 values");
  return q.to(ref.device()).contiguous();
}

}  // namespace

void fused_adamw8bit_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avg_codes,
                          const std::vector<at::Tensor>& exp_avg_absmax,
                          const std::vector<at::Tensor>& exp_avg_sq_codes,
                          const std::vector<at::Tensor>& exp_avg_sq_absmax,
                          const std::vector<at::Tensor>& state_steps, const at::Tensor& qmap_signed,
                          const at::Tensor& qmap_unsigned, double lr, double beta1, double beta2,
                          double weight_decay, double eps, bool maximize) {
  const char* fn = "fused_adamw8bit_cuda";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avg_codes.size() == n && exp_avg_absmax.size() == n &&
                  exp_avg_sq_codes.size() == n && exp_avg_sq_absmax.size() == n && state_steps.size() == n,
              fn, ": params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax and ",
              "state_steps must have one length");
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  TORCH_CHECK(ref.defined() && ref.is_cuda(), fn, ": params[0] must be a CUDA tensor, got ",
              ref.defined() ? ref.device().str() : std::string("an undefined tensor"));
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), fn, ": params[", i, "] must be a tensor, got an undefined one");
    const auto st = p.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn, ": params[", i,
                "] must be float32, float16 or bfloat16, got ", st);
    const int64_t numel = p.numel();
    const int64_t nb = (numel + kAdam8bitBlock - 1) / kAdam8bitBlock;
    check_on(fn, "params", i, p, ref, st, numel);
    check_on(fn, "grads", i, grads[i], ref, st, numel);
    TORCH_CHECK(grads[i].sizes() == p.sizes(), fn, ": grads[", i, "] must have params[", i, "]'s shape ",
                shape_str(p.sizes()), ", got ", shape_str(grads[i].sizes()));
    check_on(fn, "exp_avg_codes", i, exp_avg_codes[i], ref, at::kByte, numel);
    check_on(fn, "exp_avg_sq_codes", i, exp_avg_sq_codes[i], ref, at::kByte, numel);
    check_on(fn, "exp_avg_absmax", i, exp_avg_absmax[i], ref, at::kFloat, nb);
    check_on(fn, "exp_avg_sq_absmax", i, exp_avg_sq_absmax[i], ref, at::kFloat, nb);
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()), fn, ": state_steps[", i,
                "] must be a one-element float tensor (a CPU float32 one avoids a device synchronization)");
  }
  const at::Tensor qs = map_on(fn, "qmap_signed", qmap_signed, ref);
  const at::Tensor qu = map_on(fn, "qmap_unsigned", qmap_unsigned, ref);

  // Steps and host scalars exactly as fused_adamw8bit_cpu computes them.
  std::vector<ca::A8Tensor> by_dtype[3];  // float32, float16, bfloat16
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
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2 = 1.0 - std::pow(beta2, step);
    ca::A8Tensor t;
    t.p = p.data_ptr();
    t.g = grads[i].data_ptr();
    t.mc = exp_avg_codes[i].data_ptr<uint8_t>();
    t.vc = exp_avg_sq_codes[i].data_ptr<uint8_t>();
    t.ma = exp_avg_absmax[i].data_ptr<float>();
    t.va = exp_avg_sq_absmax[i].data_ptr<float>();
    t.numel = p.numel();
    t.decay = static_cast<float>(1.0 - lr * weight_decay);
    t.neg_step_size = static_cast<float>(-(lr / bc1));
    t.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
    const int k = p.scalar_type() == at::kFloat ? 0 : p.scalar_type() == at::kHalf ? 1 : 2;
    by_dtype[k].push_back(t);
  }
  const c10::cuda::CUDAGuard guard(ref.device());
  ca::A8Params a;
  a.w1 = static_cast<float>(1.0 - beta1);
  a.beta2 = static_cast<float>(beta2);
  a.c2 = static_cast<float>(1.0 - beta2);
  a.eps = static_cast<float>(eps);
  a.decay = weight_decay != 0;
  a.maximize = maximize;
  a.qmap_signed = qs.data_ptr<float>();
  a.qmap_unsigned = qu.data_ptr<float>();
  a.max_ctas = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;  // 8 CTAs of 256 threads per SM
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.get_device()).stream();
  const ca::A8DType dtypes[3] = {ca::A8DType::kFloat32, ca::A8DType::kFloat16, ca::A8DType::kBFloat16};
  for (int k = 0; k < 3; ++k) {
    if (by_dtype[k].empty()) continue;
    a.dtype = dtypes[k];
    const ca::A8Status st = ca::adamw8bit_step(by_dtype[k], a, stream);
    TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
    TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
                cudaGetErrorString(st.cuda));
  }
}

}  // namespace mltoolkit
