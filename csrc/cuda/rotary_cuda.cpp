// Tensor glue of the CUDA rotary embedding (csrc/cuda/rotary.cu): argument checks, table dtypes, device guard, current
// stream, launch-error checks. Contract: the "Rotary embedding" part of csrc/attention.h.
//
// Dtypes: x and out float32, float16, bfloat16 (math in float32) or float64 (math in float64, as the reference).
// cos and sin: x's dtype or float32 each; when they differ both are widened to float32 (lossless), and for float64
// x both are read as float64, so the kernel reads one table dtype.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "attention.h"
#include "rotary_args.h"
#include "rotary_launch.h"

namespace mltoolkit {
namespace {

namespace cr = cuda_rotary;
constexpr const char* kFn = "rotary_cuda";

cr::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cr::DType::kFloat32;
    case at::kDouble: return cr::DType::kFloat64;
    case at::kHalf: return cr::DType::kFloat16;
    case at::kBFloat16: return cr::DType::kBFloat16;
    default: TORCH_CHECK(false, kFn, ": unsupported dtype ", t);
  }
}

}  // namespace

void rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                 bool interleaved, bool conjugate) {
  if (!rotary_args::check(kFn, x, cos, sin, out, at::kCUDA)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType table_dtype = rotary_args::table_dtype(x, cos, sin);
  const at::Tensor c = cos.to(table_dtype), s = sin.to(table_dtype);

  cr::Params p;
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.cos = c.data_ptr();
  p.sin = s.data_ptr();
  p.B = x.size(0);
  p.L = x.size(1);
  p.H = x.size(2);
  p.D = x.size(3);
  p.half = c.size(1);
  for (int i = 0; i < 3; ++i) {
    p.x_stride[i] = x.stride(i);
    p.out_stride[i] = out.stride(i);
  }
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  p.x_dtype = to_dtype(x.scalar_type());
  p.table_dtype = to_dtype(table_dtype);
  const cr::LaunchStatus st = cr::rotary_forward(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(st.what == nullptr, kFn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, kFn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

}  // namespace mltoolkit
