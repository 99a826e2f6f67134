// CPU fake quantization, forward and fused backward; the contract is in csrc/fake_quantize.h.
//
// x is walked as rows of `inner` elements that share one quantizer (row (o, c) uses parameters c), each row cut into
// chunks of at most kChunk elements; a task is one chunk, so the backward's per-chunk partial sums (of the scale and
// zero-point gradients) have a fixed place and are added in a fixed order afterwards: results do not depend on the
// thread count. The arithmetic runs in at::vec::Vectorized<float> registers on AVX-512 / AVX2 builds (fp16 / bf16
// widened as they are loaded), in scalar code elsewhere; both divide (x / s, as the int8 and int4 quantizers do:
// multiplying by 1 / s would round differently) and round half to even (roundscale / nearbyint).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../check_util.h"
#include "../fake_quantize.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define MLTK_FQ_VEC 1
#include <immintrin.h>
#endif

namespace mltoolkit {
namespace {

constexpr int64_t kChunk = 4096;   // elements per task (and per backward partial sum)
constexpr int64_t kGrain = 16384;  // elements per parallel_for grain
constexpr int64_t kQLimit = 65536;

struct Layout {
  int64_t outer, C, inner;
};

// Per-quantizer parameters, computed once per call: s; b = zp (integer domain, rounded) or beta (float domain);
// z = beta + cm * s (float domain).
struct Params {
  std::vector<float> s, b, z;
};

Layout layout_of(const char* fn, const at::Tensor& x, const at::Tensor& scale, int64_t axis, int64_t group_size) {
  const int64_t numel = x.numel();
  if (group_size > 0) {
    TORCH_CHECK(axis < 0, fn, ": axis and group_size cannot both be given");
    TORCH_CHECK(x.dim() >= 1, fn, ": x must have at least 1 dim for group_size, got shape ", shape_str(x.sizes()));
    const int64_t K = x.size(-1);
    TORCH_CHECK(K % group_size == 0, fn, ": x's last dim ", K, " must be a multiple of group_size ", group_size);
    std::vector<int64_t> want(x.sizes().begin(), x.sizes().end());
    want.back() = K / group_size;
    TORCH_CHECK(scale.sizes().vec() == want, fn, ": scale must have shape (*x.shape[:-1], K / group_size) = ",
                shape_str(want), ", got ", shape_str(scale.sizes()));
    return {1, numel / group_size, group_size};
  }
  TORCH_CHECK(group_size == 0, fn, ": group_size must be positive (or 0: none), got ", group_size);
  if (axis >= 0) {
    TORCH_CHECK(axis < x.dim(), fn, ": axis ", axis, " is out of range for x of shape ", shape_str(x.sizes()));
    const int64_t C = x.size(axis);
    TORCH_CHECK(scale.dim() == 1 && scale.size(0) == C, fn, ": scale must have shape (x.shape[axis],) = (", C,
                ",), got ", shape_str(scale.sizes()));
    int64_t outer = 1, inner = 1;
    for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
    for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
    return {outer, C, inner};
  }
  TORCH_CHECK(axis == -1, fn, ": axis must be >= 0 (or -1: none), got ", axis);
  TORCH_CHECK(scale.numel() == 1, fn, ": scale must have one element for per-tensor quantization, got shape ",
              shape_str(scale.sizes()));
  return {1, 1, numel};
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor");
}

Layout check_args(const char* fn, const at::Tensor& x, const at::Tensor& scale,
                  const std::optional<at::Tensor>& zero_point, int64_t qmin, int64_t qmax, int64_t axis,
                  int64_t group_size) {
  check_tensor(fn, "x", x);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", dt);
  check_tensor(fn, "scale", scale);
  TORCH_CHECK(scale.scalar_type() == at::kFloat, fn, ": scale must be float32, got ", scale.scalar_type());
  if (present(zero_point)) {
    check_tensor(fn, "zero_point", *zero_point);
    TORCH_CHECK(zero_point->scalar_type() == at::kFloat, fn, ": zero_point must be float32, got ",
                zero_point->scalar_type());
    TORCH_CHECK(zero_point->sizes() == scale.sizes(), fn, ": zero_point must have scale's shape ",
                shape_str(scale.sizes()), ", got ", shape_str(zero_point->sizes()));
  }
  TORCH_CHECK(qmin < qmax, fn, ": qmin must be below qmax, got qmin = ", qmin, ", qmax = ", qmax);
  TORCH_CHECK(-kQLimit <= qmin && qmax <= kQLimit, fn, ": qmin and qmax must lie in [-65536, 65536], got ", qmin,
              ", ", qmax);
  return layout_of(fn, x, scale, axis, group_size);
}

int64_t centre(int64_t qmin, int64_t qmax) {
  const int64_t t = qmin + qmax + 1;  // floor division
  return t >= 0 ? t / 2 : -((-t + 1) / 2);
}

Params params_of(const char* fn, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point, int64_t qmin,
                 int64_t qmax, bool float_zp) {
  const at::Tensor sc = scale.contiguous();
  const int64_t C = sc.numel();
  Params p{std::vector<float>(C), std::vector<float>(C, 0.f), std::vector<float>(C, 0.f)};
  const float* s = sc.data_ptr<float>();
  at::Tensor zpc;
  const float* zp = nullptr;
  if (present(zero_point)) {
    zpc = zero_point->contiguous();
    zp = zpc.data_ptr<float>();
  }
  const double cm = static_cast<double>(centre(qmin, qmax));
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK(s[c] > 0.f && std::isfinite(s[c]), fn, ": scale must be positive and finite, got ", s[c],
                " at flat index ", c);
    p.s[c] = s[c];
    if (zp != nullptr) {
      TORCH_CHECK(std::isfinite(zp[c]), fn, ": zero_point must be finite, got ", zp[c], " at flat index ", c);
      p.b[c] = float_zp ? zp[c] : std::nearbyint(zp[c]);
    }
    // cm * s rounded to float once (exact in double), then the add: never fused.
    if (float_zp) p.z[c] = p.b[c] + static_cast<float>(cm * static_cast<double>(s[c]));
  }
  return p;
}

// ---- element arithmetic ---------------------------------------------------------------------------------------

#ifdef MLTK_FQ_VEC
using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();

// An optimization barrier: the compiler may not fuse the product before it with the add after it into an FMA.
inline Vec opaque(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  __asm__("" : "+v"(r));
#else
  __m256 r = v;
  __asm__("" : "+x"(r));
#endif
  return Vec(r);
}

template <typename scalar_t>
inline Vec load(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec::loadu(p, n);
  } else {
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, n)));
  }
}

template <typename scalar_t>
inline void store(scalar_t* p, Vec v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
  }
}

inline float hsum(Vec v) {
  float lanes[V];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += lanes[i];
  return static_cast<float>(s);
}
#endif

template <bool kFloatZp, typename scalar_t>
void forward_row(const scalar_t* x, scalar_t* y, int64_t n, float s, float b, float z, float lo, float hi,
                 float cm) {
#ifdef MLTK_FQ_VEC
  const Vec vs(s), vb(b), vz(z), vlo(lo), vhi(hi), vcm(cm);
  for (int64_t i = 0; i < n; i += V) {
    const int64_t m = std::min<int64_t>(V, n - i);
    const Vec xv = load(x + i, m);
    Vec out;
    if constexpr (kFloatZp) {
      const Vec q = at::vec::clamp(((xv - vb) / vs).round(), vlo, vhi);
      out = opaque((q - vcm) * vs) + vz;
    } else {
      const Vec q = at::vec::clamp((xv / vs).round() + vb, vlo, vhi);
      out = (q - vb) * vs;
    }
    store(y + i, out, m);
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    const float xv = static_cast<float>(x[i]);
    float out;
    if constexpr (kFloatZp) {
      const float q = std::min(std::max(std::nearbyint((xv - b) / s), lo), hi);
      out = static_cast<float>(static_cast<double>(q - cm) * s) + z;  // the product rounded, then the add
    } else {
      const float q = std::min(std::max(std::nearbyint(xv / s) + b, lo), hi);
      out = (q - b) * s;
    }
    y[i] = static_cast<scalar_t>(out);
  }
#endif
}

// dx for n elements, and the sums over them of dy * dL/ds-term and of dy where clamped.
template <bool kFloatZp, typename scalar_t>
void backward_row(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, float s, float b, float lo,
                  float hi, bool want_param, float& sum_s, float& sum_clamped) {
#ifdef MLTK_FQ_VEC
  const Vec vs(s), vb(b), vlo(lo), vhi(hi), zero(0.f);
  Vec acc_s(0.f), acc_c(0.f);
  for (int64_t i = 0; i < n; i += V) {
    const int64_t m = std::min<int64_t>(V, n - i);
    const Vec xv = load(x + i, m), g = load(dy + i, m);  // partial loads zero the lanes past m
    const Vec u = kFloatZp ? (xv - vb) / vs : xv / vs;
    const Vec r = u.round();
    const Vec v = kFloatZp ? r : r + vb;
    const Vec inside = (v >= vlo) & (v <= vhi);
    if (dx != nullptr) store(dx + i, g & inside, m);
    if (want_param) {
      const Vec q = at::vec::clamp(v, vlo, vhi);
      const Vec term = Vec::blendv(kFloatZp ? q : q - vb, r - u, inside);
      acc_s = at::vec::fmadd(g, term, acc_s);
      acc_c = acc_c + Vec::blendv(g, zero, inside);
    }
  }
  if (want_param) {
    sum_s = hsum(acc_s);
    sum_clamped = hsum(acc_c);
  }
#else
  double acc_s = 0, acc_c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float xv = static_cast<float>(x[i]), g = static_cast<float>(dy[i]);
    const float u = kFloatZp ? (xv - b) / s : xv / s;
    const float r = std::nearbyint(u);
    const float v = kFloatZp ? r : r + b;
    const bool inside = v >= lo && v <= hi;
    if (dx != nullptr) dx[i] = static_cast<scalar_t>(inside ? g : 0.f);
    if (want_param) {
      const float q = std::min(std::max(v, lo), hi);
      acc_s += g * (inside ? r - u : (kFloatZp ? q : q - b));
      acc_c += inside ? 0.f : g;
    }
  }
  sum_s = static_cast<float>(acc_s);
  sum_clamped = static_cast<float>(acc_c);
#endif
}

// f(scalar_t{}) for x's dtype (float32, float16, bfloat16: checked before).
template <typename F>
void dispatch(at::ScalarType dt, const F& f) {
  if (dt == at::kHalf)
    f(c10::Half{});
  else if (dt == at::kBFloat16)
    f(c10::BFloat16{});
  else
    f(float{});
}

template <typename F>
void for_chunks(const Layout& L, const F& f) {
  const int64_t nch = std::max<int64_t>(1, (L.inner + kChunk - 1) / kChunk);
  const int64_t tasks = L.outer * L.C * nch;
  const int64_t per_task = std::max<int64_t>(1, std::min(L.inner, kChunk));
  at::parallel_for(0, tasks, std::max<int64_t>(1, kGrain / per_task), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / nch, j = t % nch;
      const int64_t begin = j * kChunk, n = std::min(kChunk, L.inner - begin);
      f(t, row % L.C, row * L.inner + begin, n);
    }
  });
}

}  // namespace

at::Tensor fake_quantize_cpu(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                             int64_t qmin, int64_t qmax, int64_t axis, int64_t group_size, bool float_zero_point) {
  constexpr const char* fn = "fake_quantize_cpu";
  const Layout L = check_args(fn, x, scale, zero_point, qmin, qmax, axis, group_size);
  const Params p = params_of(fn, scale, zero_point, qmin, qmax, float_zero_point);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const float cm = static_cast<float>(centre(qmin, qmax));
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_chunks(L, [&](int64_t, int64_t c, int64_t off, int64_t n) {
      if (float_zero_point)
        forward_row<true>(xp + off, yp + off, n, p.s[c], p.b[c], p.z[c], lo, hi, cm);
      else
        forward_row<false>(xp + off, yp + off, n, p.s[c], p.b[c], p.z[c], lo, hi, cm);
    });
  });
  return y;
}

std::vector<at::Tensor> fake_quantize_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                                                   const std::optional<at::Tensor>& zero_point, int64_t qmin,
                                                   int64_t qmax, int64_t axis, int64_t group_size,
                                                   bool float_zero_point, double grad_scale,
                                                   std::vector<bool> output_mask) {
  constexpr const char* fn = "fake_quantize_backward_cpu";
  const Layout L = check_args(fn, x, scale, zero_point, qmin, qmax, axis, group_size);
  check_tensor(fn, "dy", dy);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), fn, ": dy must have x's dtype ", x.scalar_type(), ", got ",
              dy.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), fn, ": dy must have x's shape ", shape_str(x.sizes()), ", got ",
              shape_str(dy.sizes()));
  TORCH_CHECK(output_mask.size() == 3, fn, ": output_mask must have 3 entries (dx, dscale, dzero_point), got ",
              output_mask.size());
  const Params p = params_of(fn, scale, zero_point, qmin, qmax, float_zero_point);
  const bool want_dx = output_mask[0], want_ds = output_mask[1], want_dz = output_mask[2] && present(zero_point);
  const bool want_param = want_ds || want_dz;
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous();  // .sum().backward() hands in a stride-0 dy
  at::Tensor dx = want_dx ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                          : at::Tensor();
  const int64_t nch = std::max<int64_t>(1, (L.inner + kChunk - 1) / kChunk);
  const int64_t tasks = L.outer * L.C * nch;
  std::vector<float> part_s(want_param ? tasks : 0), part_c(want_param ? tasks : 0);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  if (x.numel() > 0 && (want_dx || want_param)) {
    dispatch(x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      const scalar_t* gp = dyc.data_ptr<scalar_t>();
      scalar_t* dxp = want_dx ? dx.data_ptr<scalar_t>() : nullptr;
      for_chunks(L, [&](int64_t t, int64_t c, int64_t off, int64_t n) {
        float ss = 0.f, sc = 0.f;
        if (float_zero_point)
          backward_row<true>(gp + off, xp + off, dxp ? dxp + off : nullptr, n, p.s[c], p.b[c], lo, hi, want_param,
                             ss, sc);
        else
          backward_row<false>(gp + off, xp + off, dxp ? dxp + off : nullptr, n, p.s[c], p.b[c], lo, hi, want_param,
                              ss, sc);
        if (want_param) {
          part_s[t] = ss;
          part_c[t] = sc;
        }
      });
    });
  }
  at::Tensor dscale, dzero;
  if (want_param) {
    at::Tensor ds = at::empty({L.C}, scale.options());
    at::Tensor dz = at::empty({L.C}, scale.options());
    float* dsp = ds.data_ptr<float>();
    float* dzp = dz.data_ptr<float>();
    const double g = grad_scale;
    at::parallel_for(0, L.C, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, L.outer * nch)),
                     [&](int64_t c0, int64_t c1) {
                       for (int64_t c = c0; c < c1; ++c) {
                         double ss = 0, sc = 0;
                         for (int64_t o = 0; o < L.outer; ++o)
                           for (int64_t j = 0; j < nch; ++j) {
                             const int64_t t = (o * L.C + c) * nch + j;
                             ss += part_s[t];
                             sc += part_c[t];
                           }
                         dsp[c] = static_cast<float>(g * ss);
                         dzp[c] = static_cast<float>(g * (float_zero_point ? sc : -static_cast<double>(p.s[c]) * sc));
                       }
                     });
    if (want_ds) dscale = ds.view(scale.sizes());
    if (want_dz) dzero = dz.view(scale.sizes());
  }
  return {dx, dscale, dzero};
}

}  // namespace mltoolkit
