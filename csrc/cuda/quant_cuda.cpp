// Tensor glue of the CUDA quantization kernels (csrc/cuda/int8_linear.cu, int4_linear.cu): argument checks, layout
// fixes (copies of what the kernels do not take), output allocation, device guard, current stream, launch-error
// checks. Contracts: csrc/int8_linear.h and csrc/int4_linear.h. Every check runs before the first CUDA call, so that
// tests/ops/test_cuda_glue_checks.py can drive them with fake CUDA tensors and no GPU.
//
// Debug switches (read per call): MLTK_INT8_CUDA_PATH=auto|gemv|mma|dp4a and MLTK_INT4_CUDA_PATH=auto|gemv|tcgemv|mma
// force a kernel path; a forced path that cannot take the arguments (device, shape, alignment) raises an error
// saying why.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "check_util.h"
#include "int4_linear.h"
#include "int8_linear.h"
#include "quant_launch.h"

namespace mltoolkit {
namespace {

namespace cq = cuda_quant;

constexpr int64_t kMaxK = 131071;  // int32 accumulation of int8 products stays exact
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 512;

void check_cuda(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

void check_same_device(const char* fn, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

bool float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

cq::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cq::DType::kFloat32;
    case at::kHalf: return cq::DType::kFloat16;
    case at::kBFloat16: return cq::DType::kBFloat16;
    default: TORCH_CHECK(false, "mltoolkit quantization (CUDA): unsupported dtype ", t);
  }
}

// Rows with a contiguous last dim (any non-negative row stride); anything else is copied.
at::Tensor rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= 0 ? t : t.contiguous();
}

// The element stride between rows the kernels see: a single row's stride is meaningless (and may be anything), so
// it is replaced by the row length.
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

void check_status(const cq::LaunchStatus& st, const char* fn) {
  TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

void compute_capability(const at::Tensor& t, int* major, int* minor) {
  const int dev = t.get_device();
  cudaError_t e = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, dev);
  TORCH_CHECK(e == cudaSuccess, "mltoolkit quantization (CUDA): cannot read the compute capability of device ", dev,
              ": ", cudaGetErrorString(e));
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

cq::Int8Path int8_path_from_env(const char* fn) {
  const std::string v = env("MLTK_INT8_CUDA_PATH");
  if (v.empty() || v == "auto") return cq::Int8Path::kAuto;
  if (v == "mma") return cq::Int8Path::kMma;
  if (v == "dp4a") return cq::Int8Path::kDp4a;
  if (v == "gemv") return cq::Int8Path::kGemv;
  TORCH_CHECK(false, fn, ": MLTK_INT8_CUDA_PATH must be auto, gemv, mma or dp4a, got '", v, "'");
}

cq::Int4Path int4_path_from_env(const char* fn) {
  const std::string v = env("MLTK_INT4_CUDA_PATH");
  if (v.empty() || v == "auto") return cq::Int4Path::kAuto;
  if (v == "gemv") return cq::Int4Path::kGemv;
  if (v == "mma") return cq::Int4Path::kMma;
  if (v == "tcgemv") return cq::Int4Path::kTcGemv;
  TORCH_CHECK(false, fn, ": MLTK_INT4_CUDA_PATH must be auto, gemv, tcgemv or mma, got '", v, "'");
}

// ---- int4 weight checks (shared) -----------------------------------------------------------------------------------

struct Int4Dims {
  int64_t N, K, groups;
};

Int4Dims check_int4_weight(const char* fn, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size) {
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, fn,
              ": group_size must be one of 32, 64, 128, 256, got ", group_size);
  check_cuda(fn, "packed", packed);
  check_cuda(fn, "scales", scales);
  check_cuda(fn, "zeros", zeros);
  check_same_device(fn, "scales", scales, "packed", packed);
  check_same_device(fn, "zeros", zeros, "packed", packed);
  TORCH_CHECK(packed.dim() == 2, fn, ": packed must be 2-D (N, K / 2), got shape ", shape_str(packed.sizes()));
  TORCH_CHECK(packed.scalar_type() == at::kByte, fn, ": packed must be uint8 (two 4-bit values per byte), got ",
              packed.scalar_type());
  const int64_t N = packed.size(0), K = 2 * packed.size(1);
  TORCH_CHECK(K % group_size == 0, fn, ": in_features K = 2 * packed.shape[1] = ", K,
              " must be a multiple of group_size ", group_size);
  TORCH_CHECK(N <= kMaxDim && K <= kMaxDim, fn, ": packed is too large (N and K must be below 2^31), got shape ",
              shape_str(packed.sizes()));
  const int64_t groups = K / group_size;
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"scales", &scales}, {"zeros", &zeros}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == groups, fn, ": ", name,
                " must have shape (N, K / group_size) = ", shape_str({N, groups}), ", got ", shape_str(t->sizes()));
  }
  return {N, K, groups};
}

// A contiguous packed weight with a 16-byte aligned base (a view at an odd offset is copied).
at::Tensor aligned_packed(const at::Tensor& packed) {
  at::Tensor pk = packed.contiguous();
  if (reinterpret_cast<uintptr_t>(pk.data_ptr()) % 16 != 0) pk = pk.clone(at::MemoryFormat::Contiguous);
  return pk;
}

}  // namespace

// ---- int8 ----------------------------------------------------------------------------------------------------------

std::vector<at::Tensor> quantize_rows_cuda(const at::Tensor& x_in) {
  constexpr const char* fn = "quantize_rows_cuda";
  check_cuda(fn, "x", x_in);
  TORCH_CHECK(float_dtype(x_in.scalar_type()), fn, ": x must be float32, float16 or bfloat16, got ",
              x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2, fn, ": x must be 2-D (rows, K), got shape ", shape_str(x_in.sizes()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows(x_in);
  const int64_t R = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({R, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {q, scale};
  cq::QuantizeParams p;
  p.x = x.data_ptr();
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  p.rows = R;
  p.K = K;
  p.ldx = row_stride(x);
  p.dtype = to_dtype(x.scalar_type());
  check_status(cq::quantize_rows(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()), fn);
  return {q, scale};
}

at::Tensor int8_linear_cuda(const at::Tensor& xq_in, const at::Tensor& x_scale_in, const at::Tensor& wq_in,
                            const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in,
                            at::ScalarType out_dtype) {
  constexpr const char* fn = "int8_linear_cuda";
  check_cuda(fn, "xq", xq_in);
  check_cuda(fn, "x_scale", x_scale_in);
  check_cuda(fn, "wq", wq_in);
  check_cuda(fn, "w_scale", w_scale_in);
  check_same_device(fn, "x_scale", x_scale_in, "xq", xq_in);
  check_same_device(fn, "wq", wq_in, "xq", xq_in);
  check_same_device(fn, "w_scale", w_scale_in, "xq", xq_in);
  TORCH_CHECK(xq_in.scalar_type() == at::kChar, fn, ": xq must be int8, got ", xq_in.scalar_type());
  TORCH_CHECK(wq_in.scalar_type() == at::kChar, fn, ": wq must be int8, got ", wq_in.scalar_type());
  TORCH_CHECK(xq_in.dim() == 2, fn, ": xq must be 2-D (M, K), got shape ", shape_str(xq_in.sizes()));
  TORCH_CHECK(wq_in.dim() != 4, fn, ": wq must be 2-D (N, K); the packed layout of int8_pack_weight is the CPU "
              "kernel's (unpack it first: mltoolkit.ops.reference.int8.unpack_weight), got shape ",
              shape_str(wq_in.sizes()));
  TORCH_CHECK(wq_in.dim() == 2, fn, ": wq must be 2-D (N, K), got shape ", shape_str(wq_in.sizes()));
  TORCH_CHECK(w_scale_in.dim() == 1, fn, ": w_scale must be 1-D (N,), got shape ", shape_str(w_scale_in.sizes()));
  const int64_t M = xq_in.size(0), K = xq_in.size(1), N = wq_in.size(0);
  TORCH_CHECK(wq_in.size(1) == K, fn, ": wq must be (N, K) with K = ", K, " (xq's last dim), got shape ",
              shape_str(wq_in.sizes()));
  TORCH_CHECK(K <= kMaxK, fn, ": K must be at most ", kMaxK, " (int32 accumulation), got ", K);
  TORCH_CHECK(M <= kMaxDim && N <= kMaxDim, fn, ": M and N must be below 2^31, got M = ", M, ", N = ", N);
  TORCH_CHECK(x_scale_in.scalar_type() == at::kFloat, fn, ": x_scale must be float32, got ",
              x_scale_in.scalar_type());
  TORCH_CHECK(w_scale_in.scalar_type() == at::kFloat, fn, ": w_scale must be float32, got ",
              w_scale_in.scalar_type());
  TORCH_CHECK(x_scale_in.dim() == 1 && x_scale_in.size(0) == M, fn, ": x_scale must have shape (M,) = (", M,
              ",), got ", shape_str(x_scale_in.sizes()));
  TORCH_CHECK(w_scale_in.size(0) == N, fn, ": w_scale must have shape (N,) = (", N, ",), got ",
              shape_str(w_scale_in.sizes()));
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, fn,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  if (present(bias_in)) {
    check_cuda(fn, "bias", *bias_in);
    check_same_device(fn, "bias", *bias_in, "xq", xq_in);
    TORCH_CHECK(bias_in->scalar_type() == at::kFloat, fn, ": bias must be float32, got ", bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, fn, ": bias must have shape (N,) = (", N, ",), got ",
                shape_str(bias_in->sizes()));
  }
  const cq::Int8Path forced = int8_path_from_env(fn);

  const c10::cuda::CUDAGuard guard(xq_in.device());
  if (M == 0 || N == 0) return at::empty({M, N}, xq_in.options().dtype(out_dtype));
  const at::Tensor x_scale = x_scale_in.contiguous(), w_scale = w_scale_in.contiguous();
  const at::Tensor bias = present(bias_in) ? bias_in->contiguous() : at::Tensor();
  if (K == 0) {  // every sum is 0: the epilogue alone, in the same order
    at::Tensor y = at::zeros({M, N}, x_scale.options()).mul_(x_scale.unsqueeze(1)).mul_(w_scale.unsqueeze(0));
    if (bias.defined()) y.add_(bias);
    return y.to(out_dtype);
  }
  const at::Tensor xq = rows(xq_in), wq = rows(wq_in);
  at::Tensor y = at::empty({M, N}, xq.options().dtype(out_dtype));
  cq::Int8LinearParams p;
  p.xq = xq.data_ptr<int8_t>();
  p.x_scale = x_scale.data_ptr<float>();
  p.wq = wq.data_ptr<int8_t>();
  p.w_scale = w_scale.data_ptr<float>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.M = M;
  p.N = N;
  p.K = K;
  p.ldx = row_stride(xq);
  p.ldw = row_stride(wq);
  p.out_dtype = to_dtype(out_dtype);
  p.path = forced;
  compute_capability(xq, &p.cc_major, &p.cc_minor);
  check_status(cq::int8_linear(p, c10::cuda::getCurrentCUDAStream(xq.get_device()).stream()), fn);
  return y;
}

// ---- int4 ----------------------------------------------------------------------------------------------------------

at::Tensor dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                int64_t group_size) {
  constexpr const char* fn = "dequantize_int4_cuda";
  const Int4Dims d = check_int4_weight(fn, packed, scales, zeros, group_size);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor w = at::empty({d.N, d.K}, scales.options());
  if (d.N == 0 || d.K == 0) return w;
  const at::Tensor pk = aligned_packed(packed), sc = scales.contiguous(), ze = zeros.contiguous();
  cq::DequantParams p;
  p.packed = pk.data_ptr<uint8_t>();
  p.scales = sc.data_ptr<float>();
  p.zeros = ze.data_ptr<float>();
  p.out = w.data_ptr<float>();
  p.N = d.N;
  p.K = d.K;
  p.G = static_cast<int>(group_size);
  check_status(cq::dequantize_int4(p, c10::cuda::getCurrentCUDAStream(packed.get_device()).stream()), fn);
  return w;
}

at::Tensor int4_weight_only_linear_cuda(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                                        const at::Tensor& zeros, int64_t group_size,
                                        const std::optional<at::Tensor>& bias_in) {
  constexpr const char* fn = "int4_weight_only_linear_cuda";
  const Int4Dims d = check_int4_weight(fn, packed, scales, zeros, group_size);
  check_cuda(fn, "x", x_in);
  check_same_device(fn, "x", x_in, "packed", packed);
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(float_dtype(dt), fn, ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == d.K, fn, ": x must be (M, K) with K = 2 * packed.shape[1] = ", d.K,
              ", got shape ", shape_str(x_in.sizes()));
  TORCH_CHECK(x_in.size(0) <= kMaxDim, fn, ": x has too many rows (M must be below 2^31), got ", x_in.size(0));
  if (present(bias_in)) {
    check_cuda(fn, "bias", *bias_in);
    check_same_device(fn, "bias", *bias_in, "x", x_in);
    TORCH_CHECK(bias_in->scalar_type() == dt, fn, ": bias must have x's dtype ", dt, ", got ",
                bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == d.N, fn, ": bias must have shape (N,) = ",
                shape_str({d.N}), ", got ", shape_str(bias_in->sizes()));
  }
  const cq::Int4Path forced = int4_path_from_env(fn);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0);
  const at::Tensor bias = present(bias_in) ? bias_in->contiguous() : at::Tensor();
  if (M == 0 || d.N == 0) return at::empty({M, d.N}, x_in.options());
  if (d.K == 0) {  // an empty sum: the bias alone (rounded from float32, as the kernels do)
    at::Tensor y = at::zeros({M, d.N}, x_in.options().dtype(at::kFloat));
    if (bias.defined()) y.add_(bias.to(at::kFloat));
    return y.to(dt);
  }
  const at::Tensor x = rows(x_in);
  const at::Tensor pk = aligned_packed(packed), sc = scales.contiguous(), ze = zeros.contiguous();
  at::Tensor y = at::empty({M, d.N}, x.options());
  cq::Int4LinearParams p;
  p.x = x.data_ptr();
  p.packed = pk.data_ptr<uint8_t>();
  p.scales = sc.data_ptr<float>();
  p.zeros = ze.data_ptr<float>();
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.M = M;
  p.N = d.N;
  p.K = d.K;
  p.ldx = row_stride(x);
  p.G = static_cast<int>(group_size);
  p.dtype = to_dtype(dt);
  p.path = forced;
  compute_capability(x, &p.cc_major, &p.cc_minor);
  check_status(cq::int4_linear(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()), fn);
  return y;
}

}  // namespace mltoolkit
