// Tensor glue of the CUDA 8-bit AdamW kernel (csrc/cuda/fused_adam8bit.cu): argument checks, step counters and host
// scalars (the functions of csrc/optim_common.h that fused_adamw8bit_cpu calls too), device guard, current stream,
// launch-error checks. Contract: csrc/fused_adam8bit.h. Every check runs before the first CUDA call.
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

#include "fused_adam8bit.h"
#include "fused_adam8bit_launch.h"
#include "optim_common.h"

namespace mltoolkit {
namespace {

namespace ca = cuda_adam8bit;

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
  check_adamw8bit_lengths(fn, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                          state_steps);
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  check_cuda_ref(fn, "params[0]", ref);
  for (size_t i = 0; i < n; ++i)
    check_adamw8bit_tensor(fn, i, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                           state_steps, kAdam8bitBlock, &ref);
  const at::Tensor qs = map_on(fn, "qmap_signed", qmap_signed, ref);
  const at::Tensor qu = map_on(fn, "qmap_unsigned", qmap_unsigned, ref);

  // Steps and host scalars exactly as fused_adamw8bit_cpu computes them.
  const std::vector<AdamWCoeffs> coeffs = adamw_step_coeffs(state_steps, lr, beta1, beta2, weight_decay);
  std::vector<ca::A8Tensor> by_dtype[3];
  adamw_cuda_entries(fn, params, coeffs, by_dtype, [&](ca::A8Tensor& t, size_t i) {
    t.p = params[i].data_ptr();
    t.g = grads[i].data_ptr();
    t.mc = exp_avg_codes[i].data_ptr<uint8_t>();
    t.vc = exp_avg_sq_codes[i].data_ptr<uint8_t>();
    t.ma = exp_avg_absmax[i].data_ptr<float>();
    t.va = exp_avg_sq_absmax[i].data_ptr<float>();
    t.numel = params[i].numel();
  });
  const c10::cuda::CUDAGuard guard(ref.device());
  ca::A8Params a;
  a.decay = weight_decay != 0;
  a.maximize = maximize;
  a.qmap_signed = qs.data_ptr<float>();
  a.qmap_unsigned = qu.data_ptr<float>();
  a.max_ctas = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;  // 8 CTAs of 256 threads per SM
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ref.get_device()).stream();
  const ca::A8DType dtypes[3] = {ca::A8DType::kFloat32, ca::A8DType::kFloat16, ca::A8DType::kBFloat16};
  adamw_cuda_launch(fn, by_dtype, adamw_scalars(beta1, beta2, eps), a, dtypes,
                    [&](const std::vector<ca::A8Tensor>& ts, const ca::A8Params& ap) {
                      return ca::adamw8bit_step(ts, ap, stream);
                    });
}

}  // namespace mltoolkit
