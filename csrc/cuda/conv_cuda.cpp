// Tensor glue of the CUDA convolution kernels (csrc/cuda/conv.cu): argument checks naming the argument, the layouts
// each kernel family takes (conv_launch.h), dtype, device guard, current stream, allocation, launch-error checks.
// Contract: csrc/conv.h.
//
// Covered: float32, float64, float16, bfloat16; NCHW and channels_last; any stride / padding / dilation / groups; the
// fused epilogue (bias, residual, the 7 activations). float16 / bfloat16 with channels per group multiples of 8 run
// on tensor cores in NHWC: NCHW tensors are converted to channels_last and the result back (one copy each way).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string>

#include "../check_util.h"
#include "../conv.h"
#include "../conv_args.h"
#include "../conv_epilogue.h"
#include "conv_launch.h"

namespace mltoolkit {
namespace {

namespace cc = cuda_conv;

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;  // groups and taps are grid dimensions

cc::DType to_dtype(const char* fn, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cc::DType::kFloat32;
    case at::kDouble: return cc::DType::kFloat64;
    case at::kHalf: return cc::DType::kFloat16;
    case at::kBFloat16: return cc::DType::kBFloat16;
    default: TORCH_CHECK(false, fn, ": x must be float32, float64, float16 or bfloat16, got ", t);
  }
}

at::MemoryFormat layout_of(const char* fn, const char* name, const at::Tensor& t) {
  const at::MemoryFormat fmt = t.suggest_memory_format();
  if (t.is_contiguous(fmt)) return fmt;
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(false, fn, ": ", name, " must be contiguous in NCHW or channels_last memory format, got strides ",
              shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " must be on x's device (", x.device(), "), got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

cc::Shape check_args(const char* fn, const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& stride,
                     const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups) {
  TORCH_CHECK(x.defined(), fn, ": x must be a tensor, got an undefined one");
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, fn, ": x must be a dense (strided) tensor, got layout ", x.layout());
  to_dtype(fn, x.scalar_type());
  check_tensor(fn, "weight", weight, x);
  const conv_args::Geometry g = conv_args::check(fn, x, weight, stride, padding, dilation, groups);
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, K = g.K, R = g.R, S = g.S, P = g.P, Q = g.Q;
  // The kernels index within an image and count pixels in int32 (offsets across images are 64-bit).
  TORCH_CHECK(C * H * W <= kIntMax && K * P * Q <= kIntMax && N * H * W <= kIntMax && N * P * Q <= kIntMax &&
                  K * (C / groups) * R * S <= kIntMax,
              fn, ": sizes too large for the CUDA kernel (per-image sizes and N*H*W, N*P*Q must stay below 2^31), got "
              "x of shape ", shape_str(x.sizes()), " and weight of shape ", shape_str(weight.sizes()));
  TORCH_CHECK(stride[0] <= kIntMax && stride[1] <= kIntMax && padding[0] < (1 << 28) && padding[1] < (1 << 28) &&
                  dilation[0] * R < (1 << 28) && dilation[1] * S < (1 << 28),
              fn, ": stride, padding or dilation too large for the CUDA kernel");
  TORCH_CHECK(C / groups <= kMaxGridYZ * 64 && K / groups <= kMaxGridYZ * 64, fn,
              ": channels per group must be <= ", kMaxGridYZ * 64, " for the CUDA kernel, got C / groups = ",
              C / groups, ", K / groups = ", K / groups);
  TORCH_CHECK(groups <= kMaxGridYZ, fn, ": groups must be <= ", kMaxGridYZ, " for the CUDA kernel, got ", groups);
  TORCH_CHECK(R * S <= kMaxGridYZ, fn, ": kernel size R*S must be <= ", kMaxGridYZ, " for the CUDA kernel, got ",
              R * S);
  layout_of(fn, "weight", weight);
  cc::Shape s;
  s.n = static_cast<int>(N), s.c = static_cast<int>(C), s.h = static_cast<int>(H), s.w = static_cast<int>(W);
  s.k = static_cast<int>(K), s.r = static_cast<int>(R), s.s = static_cast<int>(S);
  s.groups = static_cast<int>(groups);
  s.p = static_cast<int>(P), s.q = static_cast<int>(Q);
  s.sh = static_cast<int>(stride[0]), s.sw = static_cast<int>(stride[1]);
  s.ph = static_cast<int>(padding[0]), s.pw = static_cast<int>(padding[1]);
  s.dh = static_cast<int>(dilation[0]), s.dw = static_cast<int>(dilation[1]);
  s.nhwc = layout_of(fn, "x", x) == at::MemoryFormat::ChannelsLast;
  return s;
}

at::MemoryFormat fmt_of(bool nhwc) { return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }

// t contiguous in `fmt` with a 16-byte aligned base (a view with an odd storage offset is copied).
at::Tensor kernel_layout(const at::Tensor& t, at::MemoryFormat fmt) {
  at::Tensor r = t.contiguous(fmt);
  if (reinterpret_cast<uintptr_t>(r.data_ptr()) % 16 != 0) r = r.clone(fmt);
  return r;
}

void check_status(const cc::LaunchStatus& st, const char* fn) {
  TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.get_device()).stream(); }

at::Tensor workspace(size_t bytes, const at::Tensor& x) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

// The weight as a path's kernels read it in the forward (and the depthwise dgrad): see conv_launch.h.
at::Tensor forward_weight(const at::Tensor& weight, const cc::Shape& s, cc::Path path) {
  if (path == cc::Path::kDepthwise) {
    const at::Tensor w = weight.reshape({s.k, s.r * s.s});
    return kernel_layout(s.nhwc ? w.t() : w, at::MemoryFormat::Contiguous);
  }
  // (K, C/g, R, S) in channels_last is (K, R, S, C/g) in memory.
  return kernel_layout(weight, path == cc::Path::kTensorCore ? at::MemoryFormat::ChannelsLast : fmt_of(s.nhwc));
}

// The dgrad's weight: (g, C/g, K/g, R, S) for the NCHW SIMT kernel, (g, C/g, R, S, K/g) otherwise.
at::Tensor dgrad_weight(const at::Tensor& weight, const cc::Shape& s, cc::Path path) {
  if (path == cc::Path::kDepthwise) return forward_weight(weight, s, path);
  const at::Tensor w = weight.view({s.groups, s.kg(), s.cg(), s.r, s.s});
  const bool nchw_simt = path == cc::Path::kSimt && !s.nhwc;
  return kernel_layout(nchw_simt ? w.permute({0, 2, 1, 3, 4}) : w.permute({0, 2, 3, 4, 1}),
                       at::MemoryFormat::Contiguous);
}

}  // namespace

std::vector<at::Tensor> conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                                            std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                            int64_t groups, const std::optional<at::Tensor>& residual,
                                            const std::string& activation) {
  constexpr const char* fn = "conv2d_forward_cuda";
  cc::Shape s = check_args(fn, x, weight, stride, padding, dilation, groups);
  const Act act = parse_activation(fn, activation);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_tensor(fn, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.k, fn, ": bias must have shape (K,) = (", s.k, ",), got ",
                shape_str(bias->sizes()));
  }
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    const at::Tensor& r = *residual;
    check_tensor(fn, "residual", r, x);
    TORCH_CHECK(r.dim() == 4 && r.size(0) == s.n && r.size(1) == s.k && r.size(2) == s.p && r.size(3) == s.q, fn,
                ": residual must have the output's shape (N, K, P, Q) = (", s.n, ", ", s.k, ", ", s.p, ", ", s.q,
                "), got ", shape_str(r.sizes()));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat out_fmt = fmt_of(s.nhwc);
  if (s.n == 0) return {at::empty({s.n, s.k, s.p, s.q}, x.options(), out_fmt)};

  const cc::DType dtype = to_dtype(fn, x.scalar_type());
  const cc::Path path = cc::forward_path(s, dtype);
  // The tensor-core kernels take NHWC only: NCHW goes through channels_last copies.
  const bool nhwc = s.nhwc || path == cc::Path::kTensorCore;
  const at::MemoryFormat fmt = fmt_of(nhwc);
  s.nhwc = nhwc;
  const at::Tensor xk = kernel_layout(x, fmt);
  const at::Tensor wk = forward_weight(weight, s, path);
  const at::Tensor bk = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor rk = has_residual ? kernel_layout(*residual, fmt) : at::Tensor();
  at::Tensor y = at::empty({s.n, s.k, s.p, s.q}, x.options(), fmt);
  cc::Forward a;
  a.s = s;
  a.dtype = dtype;
  a.x = xk.data_ptr();
  a.w = wk.data_ptr();
  a.bias = has_bias ? bk.data_ptr() : nullptr;
  a.residual = has_residual ? rk.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.act = static_cast<int>(act);
  check_status(cc::conv2d_forward(a, path, stream_of(x)), fn);
  return {y.contiguous(out_fmt)};
}

std::vector<at::Tensor> conv2d_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                             std::vector<int64_t> stride, std::vector<int64_t> padding,
                                             std::vector<int64_t> dilation, int64_t groups,
                                             std::vector<bool> output_mask) {
  constexpr const char* fn = "conv2d_backward_cuda";
  cc::Shape s = check_args(fn, x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(output_mask.size() == 3, fn, ": output_mask must have 3 elements (x, weight, bias), got ",
              output_mask.size());
  check_tensor(fn, "dy", dy, x);
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == s.n && dy.size(1) == s.k && dy.size(2) == s.p && dy.size(3) == s.q, fn,
              ": dy must have shape (N, K, P, Q) = (", s.n, ", ", s.k, ", ", s.p, ", ", s.q, "), got ",
              shape_str(dy.sizes()));
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat x_fmt = fmt_of(s.nhwc);
  const at::MemoryFormat w_fmt = layout_of(fn, "weight", weight);
  at::Tensor dx, dw, db;
  if (s.n == 0) {  // empty batch: the sums are empty
    if (output_mask[0]) dx = at::empty(x.sizes(), x.options(), x_fmt);
    if (output_mask[1]) dw = at::zeros(weight.sizes(), weight.options().memory_format(w_fmt));
    if (output_mask[2]) db = at::zeros({s.k}, x.options());
    return {dx, dw, db};
  }
  const cc::DType dtype = to_dtype(fn, x.scalar_type());
  const cudaStream_t stream = stream_of(x);

  if (output_mask[0]) {
    const cc::Path path = cc::dgrad_path(s, dtype);
    cc::Shape sd = s;
    sd.nhwc = s.nhwc || path == cc::Path::kTensorCore;
    const at::MemoryFormat fmt = fmt_of(sd.nhwc);
    const at::Tensor dyk = kernel_layout(dy, fmt);
    const at::Tensor wk = dgrad_weight(weight, sd, path);
    dx = at::empty(x.sizes(), x.options(), fmt);
    cc::DataGrad a;
    a.s = sd;
    a.dtype = dtype;
    a.dy = dyk.data_ptr();
    a.w = wk.data_ptr();
    a.dx = dx.data_ptr();
    check_status(cc::conv2d_dgrad(a, path, stream), fn);
    dx = dx.contiguous(x_fmt);
  }
  if (output_mask[1]) {
    const cc::Path path = cc::wgrad_path(s, dtype);
    cc::Shape sw = s;
    sw.nhwc = s.nhwc || path == cc::Path::kTensorCore;
    const at::MemoryFormat fmt = fmt_of(sw.nhwc);
    const at::Tensor dyk = kernel_layout(dy, fmt);
    const at::Tensor xk = kernel_layout(x, fmt);
    const at::Tensor ws = workspace(cc::wgrad_workspace_bytes(sw, dtype, path), x);
    // The kernels write (K, C/g * R * S) with the columns in the layout's order (depthwise: (C, R*S), either).
    at::Tensor dwk = at::empty({s.k, s.cg() * s.r * s.s}, x.options());
    cc::WeightGrad a;
    a.s = sw;
    a.dtype = dtype;
    a.dy = dyk.data_ptr();
    a.x = xk.data_ptr();
    a.dw = dwk.data_ptr();
    a.workspace = ws.data_ptr();
    check_status(cc::conv2d_wgrad(a, path, stream), fn);
    const at::Tensor view = sw.nhwc ? dwk.view({s.k, s.r, s.s, s.cg()}).permute({0, 3, 1, 2})
                                    : dwk.view({s.k, s.cg(), s.r, s.s});
    dw = at::empty(weight.sizes(), weight.options(), w_fmt);
    dw.copy_(view);
  }
  if (output_mask[2]) {
    const at::Tensor dyk = kernel_layout(dy, x_fmt);
    const at::Tensor ws = workspace(cc::bgrad_workspace_bytes(s, dtype), x);
    db = at::empty({s.k}, x.options());
    cc::BiasGrad a;
    a.s = s;
    a.dtype = dtype;
    a.dy = dyk.data_ptr();
    a.db = db.data_ptr();
    a.workspace = ws.data_ptr();
    check_status(cc::conv2d_bgrad(a, stream), fn);
  }
  return {dx, dw, db};
}

}  // namespace mltoolkit
