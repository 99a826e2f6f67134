// Tensor glue of the CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norm.cu): argument checks, output allocation,
// device guard, current stream, launch-error checks. Contract: csrc/norm.h.
//
// Dtypes: x (and residual, dy, dresidual_out) float32, float64, float16 or bfloat16; weight and bias x's dtype or
// float32 (when they differ from each other the one in x's dtype is upcast to float32 for the kernel; lossless);
// mean and rstd float32, float64 for float64 x. dweight has weight's dtype; dbias has weight's dtype when there is a
// weight, else x's (the backward does not see bias).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "norm.h"
#include "norm_launch.h"

namespace mltoolkit {
namespace {

namespace cn = cuda_norm;

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

cn::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cn::DType::kFloat32;
    case at::kDouble: return cn::DType::kFloat64;
    case at::kHalf: return cn::DType::kFloat16;
    case at::kBFloat16: return cn::DType::kBFloat16;
    default: TORCH_CHECK(false, "mltoolkit norm (CUDA): unsupported dtype ", t);
  }
}

at::ScalarType stats_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

// The primary (M, N) input: its device, dtype and shape are what every other argument is checked against.
void check_primary(const at::Tensor& x, const char* fn, const char* name) {
  TORCH_CHECK(x.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(x.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, fn, ": ", name, " must be 2-D (M, N), got shape ", x.sizes());
  TORCH_CHECK(supported(x.scalar_type()), fn, ": ", name,
              " dtype must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), fn, ": ", name, " must be contiguous (strides ", x.strides(), ")");
  TORCH_CHECK(x.size(1) >= 1, fn, ": ", name, " must have at least one column (N >= 1), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max(), fn, ": ", name, " has too many columns (N = ",
              x.size(1), ")");
}

void check_device(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " must be on the same device as x (", x.device(), "), got ",
              t.device());
}

// An (M, N) tensor beside x: same shape, dtype, device; contiguous.
void check_like_x(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& x) {
  check_device(t, fn, name, x);
  TORCH_CHECK(t.sizes() == x.sizes(), fn, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous (strides ", t.strides(), ")");
}

// weight / bias: (N), x's dtype or float32, contiguous.
void check_param(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& x) {
  check_device(t, fn, name, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), fn, ": ", name, " must have shape (N,) = (", x.size(1),
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, fn, ": ", name,
              " dtype must be x's (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous (strides ", t.strides(), ")");
}

// mean / rstd: (M), float32 (float64 for float64 x), contiguous.
void check_stats(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& x) {
  check_device(t, fn, name, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), fn, ": ", name, " must have shape (M,) = (", x.size(0),
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == stats_dtype(x), fn, ": ", name, " dtype must be ", stats_dtype(x), " for x of dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous (strides ", t.strides(), ")");
}

void check_status(const cn::LaunchStatus& st, const char* fn) {
  TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

}  // namespace

std::vector<at::Tensor> norm_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, double eps, bool is_rms) {
  constexpr const char* fn = "norm_forward_cuda";
  check_primary(x, fn, "x");
  at::Tensor res = value_or_undefined(residual);
  at::Tensor w = value_or_undefined(weight);
  at::Tensor b = value_or_undefined(bias);
  if (res.defined()) check_like_x(res, fn, "residual", x);
  if (w.defined()) check_param(w, fn, "weight", x);
  if (b.defined()) check_param(b, fn, "bias", x);

  const c10::cuda::CUDAGuard guard(x.device());
  // The kernels read weight and bias in one dtype; when they differ, one of them is float32: upcast the other.
  if (w.defined() && b.defined() && w.scalar_type() != b.scalar_type()) {
    if (w.scalar_type() != at::kFloat) {
      w = w.to(at::kFloat);
    } else {
      b = b.to(at::kFloat);
    }
  }
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  const auto stats_opts = x.options().dtype(stats_dtype(x));
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor residual_out = res.defined() ? at::empty({M, N}, x.options()) : at::Tensor();
  at::Tensor mean = is_rms ? at::Tensor() : at::empty({M}, stats_opts);
  at::Tensor rstd = at::empty({M}, stats_opts);
  if (M == 0) return {y, residual_out, mean, rstd};

  cn::FwdParams p;
  p.x = x.data_ptr();
  p.residual = res.defined() ? res.data_ptr() : nullptr;
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.residual_out = residual_out.defined() ? residual_out.data_ptr() : nullptr;
  p.mean = mean.defined() ? mean.data_ptr() : nullptr;
  p.rstd = rstd.data_ptr();
  p.M = M;
  p.N = N;
  p.eps = eps;
  p.is_rms = is_rms;
  p.x_dtype = to_dtype(x.scalar_type());
  p.w_dtype = w.defined() ? to_dtype(w.scalar_type()) : b.defined() ? to_dtype(b.scalar_type()) : p.x_dtype;
  p.device = x.get_device();
  check_status(cn::norm_forward(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()), fn);
  return {y, residual_out, mean, rstd};
}

std::vector<at::Tensor> norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                           const std::optional<at::Tensor>& dresidual_out, bool has_bias,
                                           bool is_rms) {
  constexpr const char* fn = "norm_backward_cuda";
  check_primary(x, fn, "x");
  TORCH_CHECK(dy.defined(), fn, ": dy is undefined");
  check_like_x(dy, fn, "dy", x);
  at::Tensor w = value_or_undefined(weight);
  at::Tensor mu = is_rms ? at::Tensor() : value_or_undefined(mean);  // rms has no mean; one passed is ignored
  at::Tensor dres = value_or_undefined(dresidual_out);
  if (w.defined()) check_param(w, fn, "weight", x);
  if (!is_rms) {
    TORCH_CHECK(mu.defined(), fn, ": mean is required for layer norm (is_rms=false)");
    check_stats(mu, fn, "mean", x);
  }
  TORCH_CHECK(rstd.defined(), fn, ": rstd is undefined");
  check_stats(rstd, fn, "rstd", x);
  if (dres.defined()) check_like_x(dres, fn, "dresidual_out", x);

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  const at::ScalarType db_type = w.defined() ? w.scalar_type() : x.scalar_type();
  at::Tensor dx = at::empty({M, N}, x.options());
  if (M == 0) {
    at::Tensor dw = w.defined() ? at::zeros({N}, w.options()) : at::Tensor();
    at::Tensor db = has_bias ? at::zeros({N}, x.options().dtype(db_type)) : at::Tensor();
    return {dx, dw, db};
  }
  at::Tensor dw = w.defined() ? at::empty({N}, w.options()) : at::Tensor();
  at::Tensor db = has_bias ? at::empty({N}, x.options().dtype(db_type)) : at::Tensor();

  cn::BwdParams p;
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.mean = mu.defined() ? mu.data_ptr() : nullptr;
  p.rstd = rstd.data_ptr();
  p.dresidual_out = dres.defined() ? dres.data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dweight = dw.defined() ? dw.data_ptr() : nullptr;
  p.dbias = db.defined() ? db.data_ptr() : nullptr;
  p.M = M;
  p.N = N;
  p.is_rms = is_rms;
  p.has_bias = has_bias;
  p.x_dtype = to_dtype(x.scalar_type());
  p.w_dtype = w.defined() ? to_dtype(w.scalar_type()) : p.x_dtype;
  p.dw_dtype = p.w_dtype;
  p.db_dtype = to_dtype(db_type);
  p.device = x.get_device();

  const cn::BwdPlan plan = cn::norm_backward_plan(p);
  TORCH_CHECK(plan.what == nullptr, fn, ": ", plan.what);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) workspace = at::empty({plan.workspace_bytes}, x.options().dtype(at::kByte));
  check_status(cn::norm_backward(p, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                 c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               fn);
  return {dx, dw, db};
}

}  // namespace mltoolkit
