// CPU kernels of static int8 activation quantization and of the int8 im2col behind Int8Conv2d (contract:
// csrc/int8_static.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "../check_util.h"
#include "../int8_static.h"

namespace mltoolkit {
namespace {

template <typename scalar_t>
inline void load_float(const scalar_t* p, at::vec::Vectorized<float>& out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    out = at::vec::Vectorized<float>::loadu(p);
  } else {
    at::vec::load_to_float<scalar_t>(p, out);
  }
}

// q[i] = clamp(round_half_even(x[i] / s), -127, 127) over a flat run of n elements, in chunks that stay in L1.
template <typename scalar_t>
void quantize_static_kernel(const scalar_t* x, int64_t n, float s, int8_t* q) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kChunk = 2048;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t c0, int64_t c1) {
    float buf[kChunk];
    const Vec vs(s), lo(-127.f), hi(127.f);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, len = std::min(kChunk, n - i0);
      int64_t i = 0;
      for (; i + V <= len; i += V) {
        Vec v;
        load_float(x + i0 + i, v);
        // clamp in float (NaN never reaches the integer cast), then round half to even
        at::vec::clamp(v / vs, lo, hi).round().store(buf + i);
      }
      for (; i < len; ++i) {
        buf[i] = std::nearbyint(std::min(127.f, std::max(-127.f, static_cast<float>(x[i0 + i]) / s)));
      }
      int8_t* qo = q + i0;
      for (i = 0; i < len; ++i) qo[i] = static_cast<int8_t>(static_cast<int32_t>(buf[i]));
    }
  });
}

void check_pair(const char* fn, const char* name, const std::vector<int64_t>& v, int64_t lo) {
  TORCH_CHECK(v.size() == 2, fn, ": ", name, " must have 2 values (height, width), got ", v.size());
  TORCH_CHECK(v[0] >= lo && v[1] >= lo, fn, ": ", name, " must be at least ", lo, ", got (", v[0], ", ", v[1], ")");
}

}  // namespace

at::Tensor quantize_static_cpu(const at::Tensor& x_in, const at::Tensor& scale) {
  constexpr const char* fn = "quantize_static_cpu";
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"x", &x_in}, {"scale", &scale}}) {
    TORCH_CHECK(t->defined(), fn, ": ", name, " must be a tensor, got an undefined one");
    TORCH_CHECK(t->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t->device());
    TORCH_CHECK(t->layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor");
  }
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(scale.scalar_type() == at::kFloat, fn, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK(scale.numel() == 1, fn, ": scale must have one element (a per-tensor scale), got shape ",
              shape_str(scale.sizes()));
  const float s = scale.item<float>();
  TORCH_CHECK(std::isfinite(s) && s >= FLT_MIN, fn, ": scale must be finite and at least FLT_MIN, got ", s);
  // channels_last stays channels_last; everything else becomes row-major (the fake kernel applies the same rule).
  const auto fmt = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast)
                       ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar).memory_format(fmt));
  const int64_t n = x.numel();
  if (n == 0) return q;
  int8_t* qp = q.data_ptr<int8_t>();
  switch (dt) {
    case at::kHalf: quantize_static_kernel(x.data_ptr<at::Half>(), n, s, qp); break;
    case at::kBFloat16: quantize_static_kernel(x.data_ptr<at::BFloat16>(), n, s, qp); break;
    default: quantize_static_kernel(x.data_ptr<float>(), n, s, qp); break;
  }
  return q;
}

at::Tensor im2col_int8_cpu(const at::Tensor& xq_in, const std::vector<int64_t>& kernel,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation) {
  constexpr const char* fn = "im2col_int8_cpu";
  TORCH_CHECK(xq_in.defined(), fn, ": xq must be a tensor, got an undefined one");
  TORCH_CHECK(xq_in.device().is_cpu(), fn, ": xq must be a CPU tensor, got device ", xq_in.device());
  TORCH_CHECK(xq_in.layout() == at::kStrided, fn, ": xq must be a dense (strided) tensor");
  TORCH_CHECK(xq_in.scalar_type() == at::kChar, fn, ": xq must be int8, got ", xq_in.scalar_type());
  TORCH_CHECK(xq_in.dim() == 4, fn, ": xq must be 4-D (B, C, H, W), got shape ", shape_str(xq_in.sizes()));
  check_pair(fn, "kernel", kernel, 1);
  check_pair(fn, "stride", stride, 1);
  check_pair(fn, "padding", padding, 0);
  check_pair(fn, "dilation", dilation, 1);
  const int64_t B = xq_in.size(0), C = xq_in.size(1), H = xq_in.size(2), W = xq_in.size(3);
  const int64_t KH = kernel[0], KW = kernel[1], SH = stride[0], SW = stride[1], PH = padding[0], PW = padding[1],
                DH = dilation[0], DW = dilation[1];
  const int64_t eh = DH * (KH - 1) + 1, ew = DW * (KW - 1) + 1;
  TORCH_CHECK(H + 2 * PH >= eh && W + 2 * PW >= ew, fn, ": the padded input (", H + 2 * PH, ", ", W + 2 * PW,
              ") is smaller than the dilated kernel (", eh, ", ", ew, ")");
  const int64_t OH = (H + 2 * PH - eh) / SH + 1, OW = (W + 2 * PW - ew) / SW + 1;
  // NHWC bytes: each (b, h, w) pixel's C channels contiguous, so a kernel tap is one memcpy.
  const at::Tensor xq = xq_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t cols_k = KH * KW * C, M = B * OH * OW;
  at::Tensor cols = at::empty({M, cols_k}, xq.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || cols_k == 0) return cols;
  const int8_t* src = xq.data_ptr<int8_t>();
  int8_t* dst = cols.data_ptr<int8_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols_k, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (OH * OW), oh = (r / OW) % OH, ow = r % OW;
      int8_t* out = dst + r * cols_k;
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int64_t ih = oh * SH - PH + kh * DH;
        for (int64_t kw = 0; kw < KW; ++kw, out += C) {
          const int64_t iw = ow * SW - PW + kw * DW;
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
            std::memset(out, 0, static_cast<size_t>(C));
          } else {
            std::memcpy(out, src + ((b * H + ih) * W + iw) * C, static_cast<size_t>(C));
          }
        }
      }
    }
  });
  return cols;
}

}  // namespace mltoolkit
