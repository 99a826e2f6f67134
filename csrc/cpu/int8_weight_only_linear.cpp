// CPU int8 weight-only linear (contract: csrc/int8_weight_only_linear.h).
//
// Main path, every M: a register-blocked kernel that widens int8 weights to float in registers. Decode shapes (small
// M) are memory bound: the int8 weight is read once, a quarter of the bytes of a float32 weight. Tasks pair a block of
// kMBlock rows of x (kept in L2) with a chunk of NB-row weight units; for each unit the kernel walks the block's rows
// 4 at a time, loading one vector of bytes per weight row per k step, widening it to float (AVX-512: vpmovsxbd +
// vcvtdq2ps, 16 lanes; AVX2: 8 lanes) and feeding the MB x NB FMA accumulators. The NB rows of the unit (NB x K
// bytes, 16-32 KB at K = 4096) stay in L1 while the rows of x reuse them. w_scale is applied once per output.
// Second path (MLTK_INT8_WO_PATH=tiled): the weight dequantized (q * scale) a tile of rows at a time into a float
// buffer, each tile through at::addmm (BLAS) into its columns of y. Measured slower than the main path at every M on
// the 2-core Zen 4 VM (2026-11-26, K = N = 4096, loaded machine, 1 thread: M = 16 10 vs 24 ms, M = 256 87 vs 102 ms,
// M = 1024 334 vs 389 ms; 2 threads M = 1024 340 vs 754 ms; fp32 F.linear 109 / 418 ms at M = 256 / 1024), so it is
// not the default; it stays as the cross-check of the main path and for BLAS libraries that do better.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../check_util.h"
#include "../int8_weight_only_linear.h"

namespace mltoolkit {
namespace {

constexpr int64_t kTileBytes = 4096 * 1024;   // float32 bytes of one dequantized weight tile (large-M path)
constexpr int64_t kMBlock = 32;                // rows of x per GEMV task (32 x K float32 stay in L2)
constexpr int64_t kChunkBytes = 256 * 1024;    // at most this much int8 weight per GEMV task

#if defined(CPU_CAPABILITY_AVX512)
constexpr int VL = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vload_w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int VL = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vload_w(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
constexpr int VL = 1;
using vf = float;
inline vf vzero() { return 0.f; }
inline vf vload(const float* p) { return *p; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline float vsum(vf v) { return v; }
inline vf vload_w(const int8_t* p) { return static_cast<float>(*p); }
#endif

// acc[m][j] = sum_k x[m][k] * w[j][k] for MB rows of x and NB weight rows; out[m * ldo + j] = acc * s[j] + b[j].
template <int MB, int NB>
inline void gemv_tile(const float* __restrict__ x, int64_t ldx, int64_t K, const int8_t* __restrict__ w,
                      int64_t ldw, const float* __restrict__ s, const float* __restrict__ b, float* __restrict__ out,
                      int64_t ldo) {
  vf acc[MB][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[m][j] = vzero();
  int64_t k = 0;
  for (; k + VL <= K; k += VL) {
    vf xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = vload(x + m * ldx + k);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const vf wv = vload_w(w + j * ldw + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][j] = vfma(xv[m], wv, acc[m][j]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      float a = vsum(acc[m][j]);
      for (int64_t kk = k; kk < K; ++kk) a += x[m * ldx + kk] * static_cast<float>(w[j * ldw + kk]);
      out[m * ldo + j] = a * s[j] + (b != nullptr ? b[j] : 0.f);
    }
}

template <int NB>
inline void gemv_unit(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw,
                      const float* s, const float* b, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) gemv_tile<4, NB>(x + m * ldx, ldx, K, w, ldw, s, b, y + m * ldy, ldy);
  switch (M - m) {
    case 3: gemv_tile<3, NB>(x + m * ldx, ldx, K, w, ldw, s, b, y + m * ldy, ldy); break;
    case 2: gemv_tile<2, NB>(x + m * ldx, ldx, K, w, ldw, s, b, y + m * ldy, ldy); break;
    case 1: gemv_tile<1, NB>(x + m * ldx, ldx, K, w, ldw, s, b, y + m * ldy, ldy); break;
    default: break;
  }
}

// NB weight rows per unit: 8 when x has at most 2 rows (more independent accumulators to hide the FMA latency),
// else as many as the registers allow with 4 rows of x (AVX-512: 4 x 4 accumulators of 32 zmm; AVX2: 4 x 2 of 16).
// Tasks pair a block of kMBlock rows of x (kept in L2) with a chunk of weight units, block-major, so that the
// threads share one block of x while each streams its own part of the weight.
template <int NB>
void gemv(const float* x, int64_t ldx, int64_t M, int64_t N, int64_t K, const int8_t* w, int64_t ldw,
          const float* s, const float* b, float* y) {
  const int64_t units = (N + NB - 1) / NB;
  const int64_t mblocks = (M + kMBlock - 1) / kMBlock;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t max_units = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, NB * K));
  const int64_t per_task = std::clamp<int64_t>(units / (8 * nth), 1, max_units);
  const int64_t chunks = (units + per_task - 1) / per_task;
  at::parallel_for(0, mblocks * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / chunks) * kMBlock, mb = std::min(kMBlock, M - m0);
      const int64_t u0 = (t % chunks) * per_task, u1 = std::min(units, u0 + per_task);
      const float* xb = x + m0 * ldx;
      float* yb = y + m0 * N;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u * NB;
        if (n + NB <= N) {
          gemv_unit<NB>(xb, ldx, mb, K, w + n * ldw, ldw, s + n, b != nullptr ? b + n : nullptr, yb + n, N);
        } else {
          for (int64_t r = n; r < N; ++r)
            gemv_unit<1>(xb, ldx, mb, K, w + r * ldw, ldw, s + r, b != nullptr ? b + r : nullptr, yb + r, N);
        }
      }
    }
  });
}

// y (M, N) float32 = x (M, K) float32 @ (wq * s)^T + b, by dequantized tiles of rows through at::addmm.
void tiled(const at::Tensor& xf, const at::Tensor& wq, const at::Tensor& s, const at::Tensor& bias, at::Tensor& y) {
  const int64_t N = wq.size(0), K = wq.size(1);
  const int64_t rows = std::clamp<int64_t>(kTileBytes / (4 * std::max<int64_t>(K, 1)) / 16 * 16, 16, 1024);
  at::Tensor tile = at::empty({std::min(rows, N), K}, xf.options());
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  const int64_t ldw = wq.stride(0);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nt = std::min(rows, N - n0);
    at::Tensor t = tile.narrow(0, 0, nt);
    float* tp = t.data_ptr<float>();
    at::parallel_for(0, nt, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int8_t* src = wp + (n0 + r) * ldw;
        const float sc = sp[n0 + r];
        float* dst = tp + r * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]) * sc;
      }
    });
    at::Tensor out = y.narrow(1, n0, nt);  // strides (N, 1): BLAS writes it in place (ldc = N)
    if (bias.defined()) {
      at::addmm_out(out, bias.narrow(0, n0, nt), xf, t.t());
    } else {
      at::mm_out(out, xf, t.t());
    }
  }
}

at::Tensor rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

}  // namespace

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& wq_in, const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias) {
  constexpr const char* fn = "int8_weight_only_linear_cpu";
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"x", &x}, {"wq", &wq_in}, {"w_scale", &w_scale}}) {
    TORCH_CHECK(t->defined(), fn, ": ", name, " must be a tensor, got an undefined one");
    TORCH_CHECK(t->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t->device());
    TORCH_CHECK(t->layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor");
  }
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(wq_in.scalar_type() == at::kChar, fn, ": wq must be int8, got ", wq_in.scalar_type());
  TORCH_CHECK(wq_in.dim() == 2, fn, ": wq must be 2-D (N, K), got shape ", shape_str(wq_in.sizes()));
  const int64_t N = wq_in.size(0), K = wq_in.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, fn, ": x must be (M, K) with K = ", K, " (wq's last dim), got shape ",
              shape_str(x.sizes()));
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, fn, ": w_scale must be float32, got ", w_scale.scalar_type());
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, fn, ": w_scale must have shape (N,) = (", N, ",), got ",
              shape_str(w_scale.sizes()));
  at::Tensor b;
  if (present(bias)) {
    TORCH_CHECK(bias->device().is_cpu(), fn, ": bias must be a CPU tensor, got device ", bias->device());
    TORCH_CHECK(bias->scalar_type() == dt, fn, ": bias must have x's dtype ", dt, ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, fn, ": bias must have shape (N,) = (", N, ",), got ",
                shape_str(bias->sizes()));
    b = bias->to(at::kFloat).contiguous();
  }
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(dt);
  if (K == 0) {
    if (b.defined()) {
      y.copy_(b.expand({M, N}));
    } else {
      y.zero_();
    }
    return y.to(dt);
  }
  const at::Tensor xf = rows(x.to(at::kFloat)), wq = rows(wq_in), s = w_scale.contiguous();
  // MLTK_INT8_WO_PATH=gemv|tiled forces a path (tests and benchmarks); default (auto): gemv.
  const char* env = std::getenv("MLTK_INT8_WO_PATH");
  const std::string want = env == nullptr ? "" : env;
  TORCH_CHECK(want.empty() || want == "auto" || want == "gemv" || want == "tiled", fn,
              ": MLTK_INT8_WO_PATH must be auto, gemv or tiled, got '", want, "'");
  const bool use_gemv = want != "tiled";
  if (use_gemv) {
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    if (M <= 2 && VL > 1) {
      gemv<8>(xf.data_ptr<float>(), xf.stride(0), M, N, K, wq.data_ptr<int8_t>(), wq.stride(0), s.data_ptr<float>(),
              bp, y.data_ptr<float>());
    } else {
      gemv<(VL == 16 || VL == 1) ? 4 : 2>(xf.data_ptr<float>(), xf.stride(0), M, N, K, wq.data_ptr<int8_t>(),
                                          wq.stride(0), s.data_ptr<float>(), bp, y.data_ptr<float>());
    }
  } else {
    tiled(xf, wq, s, b, y);
  }
  return dt == at::kFloat ? y : y.to(dt);
}

}  // namespace mltoolkit
