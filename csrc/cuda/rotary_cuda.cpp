// Tensor glue of the CUDA rotary embedding (csrc/cuda/rotary.cu): argument checks, table dtypes, device guard, current
// stream, launch-error checks. Contract: the "Rotary embedding" part of csrc/attention.h.
//
// Dtypes: x and out float32, float16, bfloat16 (math in float32) or float64 (math in float64, as the reference).
// cos and sin: x's dtype or float32 each; when they differ both are widened to float32 (lossless), and for float64
// x both are read as float64, so the kernel reads one table dtype.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "attention.h"
#include "rotary_launch.h"

namespace mltoolkit {
namespace {

namespace cr = cuda_rotary;
constexpr const char* kFn = "rotary_cuda";

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

cr::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cr::DType::kFloat32;
    case at::kDouble: return cr::DType::kFloat64;
    case at::kHalf: return cr::DType::kFloat16;
    case at::kBFloat16: return cr::DType::kBFloat16;
    default: TORCH_CHECK(false, kFn, ": unsupported dtype ", t);
  }
}

void check_cuda(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), kFn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.is_cuda(), kFn, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, kFn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), kFn, ": ", name, " must be on x's device (", x.device(), "), got ",
              t.device());
}

// x or out: (B, L, H, D) with unit stride in the last dim (a dim of size 1 has no meaningful stride).
void check_rows(const char* name, const at::Tensor& t) {
  check_cuda(name, t);
  TORCH_CHECK(t.dim() == 4, kFn, ": ", name, " must be 4-D (batch, seqlen, nheads, headdim), got shape ", t.sizes());
  TORCH_CHECK(supported(t.scalar_type()), kFn, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kFn, ": ", name, " must have stride 1 in its last dim, got strides ",
              t.strides());
}

void check_table(const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_cuda(name, t);
  check_same_device(name, t, x);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(1), kFn, ": ", name, " must have shape (seqlen, rotary_dim / 2) "
              "with seqlen = x.size(1) = ", x.size(1), ", got ", t.sizes());
  TORCH_CHECK(2 * t.size(1) <= x.size(3), kFn, ": ", name, " has ", t.size(1), " columns, so rotary_dim = ",
              2 * t.size(1), " exceeds headdim = ", x.size(3));
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, kFn, ": ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), kFn, ": ", name, " must be contiguous, got strides ", t.strides());
}

}  // namespace

void rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                 bool interleaved, bool conjugate) {
  check_rows("x", x);
  check_rows("out", out);
  check_same_device("out", out, x);
  TORCH_CHECK(out.sizes() == x.sizes(), kFn, ": out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), kFn, ": out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  check_table("cos", cos, x);
  check_table("sin", sin, x);
  TORCH_CHECK(sin.sizes() == cos.sizes(), kFn, ": sin must have cos's shape ", cos.sizes(), ", got ", sin.sizes());
  if (x.numel() == 0) return;
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);
  TORCH_CHECK(out.data_ptr() != x.data_ptr() || out.strides() == x.strides(), kFn,
              ": out starts where x does but has other strides (", out.strides(), " vs ", x.strides(),
              "); in place, pass x itself as out");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType table_dtype = x.scalar_type() == at::kDouble ? at::kDouble
                                     : cos.scalar_type() != sin.scalar_type() ? at::kFloat
                                                                              : cos.scalar_type();
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
