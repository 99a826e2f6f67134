// CPU int4 weight-only linear, quantize and dequantize; the contract is in csrc/int4_linear.h.
//
// One register-blocked kernel for every M, tiled for the caches: the packed weight is read a few rows (kNB) at a
// time; VL packed bytes widen to VL int32 lanes, whose low nibbles are the VL even-k weights and whose high nibbles
// (>> 4) are the VL odd-k ones. x is copied once per call to float32 in the matching order (per block of 2 VL values
// of k: the VL even k, then the VL odd k; the dot products do not care about the order), so no shuffle runs in the
// inner loop. Dequantization happens in registers, per group: AVX-512 looks the nibble up in a 16-entry table of the
// group's dequantized values (one lane permute, which reads only the index's low 4 bits); AVX2 and scalar convert to
// float and apply one FMA (q * scale + (zero - 8 scale)). Each dequantized vector feeds the FMAs of up to 4 rows of x
// (register tile 4 x kNB vectors). M = 1..16 (decode) streams the weight once, spread over the threads; larger M
// walks x in blocks of kXBlockBytes, each task pairing one block of x with one chunk of the weight (both in L2), so
// the float weight never exists in memory, not even per tile.
// Measured (2026-11-26, 2-core Zen 4 dev VM shared with other jobs, one thread, K = N = 4096, group 128, bench_int4):
// M = 1 0.84 ms vs fp32 F.linear 4.3 ms (5x; 11 GB/s of packed weight + scales, about half the core's copy rate:
// compute-bound at ~20 G weights/s, not memory-bound); M = 16 2.9x; M = 256 1.3x; M = 2048 1.03x. The alternative
// for large M (dequantize 128 rows into a float buffer, at::mm on it) ran M = 256 / 2048 at 1.02x / 0.89x where this
// path ran 1.19x / 1.01x, so it was dropped.
// ISA by the build's macros: AVX-512 (16 lanes), AVX2 (8 lanes) or scalar (1 lane, which is plain k order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../check_util.h"
#include "../int4_linear.h"

namespace mltoolkit {
namespace {

// ---- vector primitives ------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
constexpr int VL = 16;
constexpr int kNB = 4;  // weight rows per decode step (32 zmm: 4 x 4 accumulators + temporaries)
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
// One group's dequantizer: its 16 possible weights q * scale + (zero - 8 scale) in one register, looked up with a
// lane permute (which reads only the low 4 bits of each index): no and-mask, no int->float conversion, no FMA per
// weight. On Zen 4 this took M = 1 from ~14 to ~20 G weights/s on one core (weight in L2).
struct GroupDQ {
  vf table;
  GroupDQ() = default;
  GroupDQ(float s, float b)
      : table(_mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(s),
                              _mm512_set1_ps(b))) {}
  // VL packed bytes -> dequantized (even-k weights, odd-k weights).
  void operator()(const uint8_t* p, vf& lo, vf& hi) const {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(b, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int VL = 8;
constexpr int kNB = 2;  // 16 ymm: 4 x 2 accumulators + temporaries
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
struct GroupDQ {
  vf s, b;
  GroupDQ() = default;
  GroupDQ(float sv, float bv) : s(_mm256_set1_ps(sv)), b(_mm256_set1_ps(bv)) {}
  // VL packed bytes -> dequantized (even-k weights, odd-k weights).
  void operator()(const uint8_t* p, vf& lo, vf& hi) const {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), s, b);
    hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s, b);
  }
};
#else
constexpr int VL = 1;
constexpr int kNB = 4;
using vf = float;
inline vf vzero() { return 0.f; }
inline vf vload(const float* p) { return *p; }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline float vsum(vf v) { return v; }
struct GroupDQ {
  float s, b;
  GroupDQ() = default;
  GroupDQ(float sv, float bv) : s(sv), b(bv) {}
  void operator()(const uint8_t* p, vf& lo, vf& hi) const {
    lo = std::fma(static_cast<float>(*p & 15), s, b);
    hi = std::fma(static_cast<float>(*p >> 4), s, b);
  }
};
#endif

// Software prefetch of the next unit's rows (one unit ahead): from DRAM at M = 1 the kernel otherwise alternates
// between computing and waiting. Past the last row it touches addresses it never reads; prefetches do not fault.
inline void prefetch(const uint8_t* p) { __builtin_prefetch(p, 0, 3); }

constexpr int kBlock = 2 * VL;                 // k per unpack step; every group size is a multiple of it
constexpr int64_t kXBlockBytes = 256 * 1024;  // rows of x per task: this many bytes of them (stays in L2)
constexpr int64_t kChunkBytes = 512 * 1024;   // at most this much packed weight per task (stays in L2)

bool valid_group(int64_t g) { return g == 32 || g == 64 || g == 128 || g == 256; }

void check_group(const char* fn, int64_t group_size) {
  TORCH_CHECK(valid_group(group_size), fn, ": group_size must be one of 32, 64, 128, 256, got ", group_size);
}

struct Dims {
  int64_t N, K, G, groups;
};

Dims check_weight(const char* fn, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                  int64_t group_size) {
  check_group(fn, group_size);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"packed", &packed}, {"scales", &scales},
                         {"zeros", &zeros}}) {
    TORCH_CHECK(t->defined(), fn, ": ", name, " must be a tensor, got an undefined one");
    TORCH_CHECK(t->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t->device());
    TORCH_CHECK(t->layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor");
    TORCH_CHECK(t->dim() == 2, fn, ": ", name, " must be 2-D, got shape ", shape_str(t->sizes()));
  }
  TORCH_CHECK(packed.scalar_type() == at::kByte, fn, ": packed must be uint8 (two 4-bit values per byte), got ",
              packed.scalar_type());
  const int64_t N = packed.size(0), K = 2 * packed.size(1);
  TORCH_CHECK(K % group_size == 0, fn, ": in_features K = 2 * packed.shape[1] = ", K,
              " must be a multiple of group_size ", group_size);
  const int64_t groups = K / group_size;
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"scales", &scales}, {"zeros", &zeros}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->size(0) == N && t->size(1) == groups, fn, ": ", name, " must have shape (N, K / group_size) = ",
                shape_str({N, groups}), ", got ", shape_str(t->sizes()));
  }
  return {N, K, group_size, groups};
}

// ---- decode path ------------------------------------------------------------------------------------------------

// out[m * ldo + j] = sum_k xd[m][k] * w'[j][k] for MB rows of x and NB weight rows.
template <int MB, int NB>
inline void decode_tile(const float* __restrict__ xd, int64_t K, const uint8_t* __restrict__ pk, int64_t ldp,
                        const float* __restrict__ sc, const float* __restrict__ ze, int64_t ldg, int64_t G,
                        float* __restrict__ out, int64_t ldo) {
  vf acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = vzero();
  const int64_t groups = K / G;
  for (int64_t g = 0; g < groups; ++g) {
    GroupDQ dq[NB];
    for (int j = 0; j < NB; ++j) {
      dq[j] = GroupDQ(sc[j * ldg + g], ze[j * ldg + g] - 8.f * sc[j * ldg + g]);
      prefetch(pk + (NB + j) * ldp + g * G / 2);  // the same group of the next unit's rows
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += kBlock) {
      for (int j = 0; j < NB; ++j) {
        vf lo, hi;
        dq[j](pk + j * ldp + k / 2, lo, hi);
        for (int m = 0; m < MB; ++m) {
          acc[m][j] = vfma(vload(xd + m * K + k), lo, acc[m][j]);
          acc[m][j] = vfma(vload(xd + m * K + k + VL), hi, acc[m][j]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) out[m * ldo + j] = vsum(acc[m][j]);
}

template <int NB>
inline void decode_rows(const float* xd, int64_t M, int64_t K, const uint8_t* pk, int64_t ldp, const float* sc,
                        const float* ze, int64_t ldg, int64_t G, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) decode_tile<4, NB>(xd + m * K, K, pk, ldp, sc, ze, ldg, G, y + m * ldy, ldy);
  switch (M - m) {
    case 3: decode_tile<3, NB>(xd + m * K, K, pk, ldp, sc, ze, ldg, G, y + m * ldy, ldy); break;
    case 2: decode_tile<2, NB>(xd + m * K, K, pk, ldp, sc, ze, ldg, G, y + m * ldy, ldy); break;
    case 1: decode_tile<1, NB>(xd + m * K, K, pk, ldp, sc, ze, ldg, G, y + m * ldy, ldy); break;
    default: break;
  }
}

// Runs task(t) for t in [0, ntasks) on the intra-op threads, each taking the next task from a shared counter (as
// conv.cpp does): on a machine shared with other processes a thread that loses its core no longer holds the others
// up at the end of the pass. Each task owns its outputs, so results do not depend on the thread count.
template <typename Task>
void parallel_tasks(int64_t ntasks, const Task& task) {
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  if (nth == 1) {
    for (int64_t t = 0; t < ntasks; ++t) task(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) task(t);
  });
}

// y (M, N) float = xd (M, K, block order) @ w'^T, in one parallel region (a region per block of x would put a
// barrier behind each, a long wait whenever another process holds one of the cores). Tasks are (block of mc rows of
// x, chunk of kNB-row units of the weight) pairs, handed out block-major so that the threads share one block of x
// in L3 while each keeps its block (kXBlockBytes) and its weight chunk (kChunkBytes packed) in L2.
void decode(const float* xd, int64_t M, const Dims& d, const uint8_t* pk, const float* sc, const float* ze,
            float* y) {
  const int64_t units = (d.N + kNB - 1) / kNB;
  const int64_t mc = std::max<int64_t>(4, kXBlockBytes / (4 * std::max<int64_t>(d.K, 1)) / 4 * 4);
  const int64_t mblocks = (M + mc - 1) / mc;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  // Chunks: at least ~256K multiply-adds, at most kChunkBytes of packed weight, and about 8 per thread when M is
  // small (a single block of x).
  const int64_t min_units = (int64_t{1} << 18) / std::max<int64_t>(1, kNB * d.K * std::min(M, mc));
  const int64_t max_units = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, kNB * d.K / 2));
  const int64_t per_task = std::max<int64_t>({1, min_units, std::min(max_units, units / (8 * nth))});
  const int64_t chunks = (units + per_task - 1) / per_task;
  parallel_tasks(mblocks * chunks, [&](int64_t t) {
    const int64_t m0 = (t / chunks) * mc, mb = std::min(mc, M - m0);
    const int64_t u0 = (t % chunks) * per_task, u1 = std::min(units, u0 + per_task);
    const float* xb = xd + m0 * d.K;
    float* yb = y + m0 * d.N;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u * kNB;
      if (n + kNB <= d.N) {
        decode_rows<kNB>(xb, mb, d.K, pk + n * (d.K / 2), d.K / 2, sc + n * d.groups, ze + n * d.groups,
                         d.groups, d.G, yb + n, d.N);
      } else {
        for (int64_t r = n; r < d.N; ++r)
          decode_rows<1>(xb, mb, d.K, pk + r * (d.K / 2), d.K / 2, sc + r * d.groups, ze + r * d.groups,
                         d.groups, d.G, yb + r, d.N);
      }
    }
  });
}

// ---- x in the kernel's k order -----------------------------------------------------------------------------

// x (M, K) float -> xd (M, K) float32 in block order.
at::Tensor blocked_x(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xf = x.to(at::kFloat).contiguous();
  if (VL == 1) return xf;
  at::Tensor xd = at::empty({M, K}, xf.options());
  const float* src = xf.data_ptr<float>();
  float* dst = xd.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* s = src + m * K;
      float* o = dst + m * K;
      for (int64_t k0 = 0; k0 < K; k0 += kBlock)
        for (int i = 0; i < VL; ++i) {
          o[k0 + i] = s[k0 + 2 * i];
          o[k0 + VL + i] = s[k0 + 2 * i + 1];
        }
    }
  });
  return xd;
}

}  // namespace

at::Tensor int4_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t group_size,
                                       const std::optional<at::Tensor>& bias) {
  constexpr const char* fn = "int4_weight_only_linear_cpu";
  const Dims d = check_weight(fn, packed, scales, zeros, group_size);
  TORCH_CHECK(x.defined(), fn, ": x must be a tensor, got an undefined one");
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, fn, ": x must be a dense (strided) tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d.K, fn, ": x must be (M, K) with K = 2 * packed.shape[1] = ", d.K,
              ", got shape ", shape_str(x.sizes()));
  if (present(bias)) {
    TORCH_CHECK(bias->device().is_cpu(), fn, ": bias must be a CPU tensor, got device ", bias->device());
    TORCH_CHECK(bias->scalar_type() == dt, fn, ": bias must have x's dtype ", dt, ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d.N, fn, ": bias must have shape (N,) = ", shape_str({d.N}),
                ", got ", shape_str(bias->sizes()));
  }
  const int64_t M = x.size(0);
  const at::Tensor pk = packed.contiguous(), sc = scales.contiguous(), ze = zeros.contiguous();
  at::Tensor y;
  if (M == 0 || d.N == 0 || d.K == 0) {
    y = at::zeros({M, d.N}, x.options().dtype(at::kFloat));
  } else {
    const at::Tensor xd = blocked_x(x);
    y = at::empty({M, d.N}, x.options().dtype(at::kFloat));
    decode(xd.data_ptr<float>(), M, d, pk.data_ptr<uint8_t>(), sc.data_ptr<float>(), ze.data_ptr<float>(),
           y.data_ptr<float>());
  }
  if (present(bias)) y.add_(bias->to(at::kFloat));
  return dt == at::kFloat ? y : y.to(dt);
}

at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                               int64_t group_size) {
  const Dims d = check_weight("dequantize_int4_cpu", packed, scales, zeros, group_size);
  const at::Tensor pk = packed.contiguous(), sc = scales.contiguous(), ze = zeros.contiguous();
  at::Tensor w = at::empty({d.N, d.K}, scales.options());
  const uint8_t* p = pk.data_ptr<uint8_t>();
  const float* s = sc.data_ptr<float>();
  const float* z = ze.data_ptr<float>();
  float* o = w.data_ptr<float>();
  at::parallel_for(0, d.N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d.K)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < d.groups; ++g) {
        const double sg = s[r * d.groups + g];
        const float zg = z[r * d.groups + g];
        const uint8_t* pg = p + r * (d.K / 2) + g * (d.G / 2);
        float* og = o + r * d.K + g * d.G;
        for (int64_t i = 0; i < d.G / 2; ++i) {
          // The product rounded to float before the add, as the contract says: the exact product in double, then
          // one rounding to float, which the compiler cannot fuse into an FMA with the add.
          og[2 * i] = static_cast<float>(static_cast<double>((pg[i] & 15) - 8) * sg) + zg;
          og[2 * i + 1] = static_cast<float>(static_cast<double>((pg[i] >> 4) - 8) * sg) + zg;
        }
      }
  });
  return w;
}

std::vector<at::Tensor> quantize_int4_cpu(const at::Tensor& w, int64_t group_size) {
  constexpr const char* fn = "quantize_int4_cpu";
  check_group(fn, group_size);
  TORCH_CHECK(w.defined(), fn, ": w must be a tensor, got an undefined one");
  TORCH_CHECK(w.device().is_cpu(), fn, ": w must be a CPU tensor, got device ", w.device());
  TORCH_CHECK(w.layout() == at::kStrided, fn, ": w must be a dense (strided) tensor");
  const auto dt = w.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": w must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(w.dim() == 2, fn, ": w must be 2-D (out_features, in_features), got shape ", shape_str(w.sizes()));
  const int64_t N = w.size(0), K = w.size(1), G = group_size;
  TORCH_CHECK(K % G == 0, fn, ": in_features K = w.shape[1] = ", K, " must be a multiple of group_size ", G);
  const int64_t groups = K / G;
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  at::Tensor packed = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, groups}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({N, groups}, w.options().dtype(at::kFloat));
  const float* src = wf.data_ptr<float>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  float* sc = scales.data_ptr<float>();
  float* ze = zeros.data_ptr<float>();
  std::atomic<bool> non_finite{false};
  at::parallel_for(0, N * groups, std::max<int64_t>(1, 16384 / G), [&](int64_t t0, int64_t t1) {
    float q[256];
    for (int64_t t = t0; t < t1; ++t) {
      const float* v = src + t * G;  // group t = row t / groups, group t % groups: contiguous in w
      float mn = v[0], mx = v[0];
      bool finite = true;
      for (int64_t i = 0; i < G; ++i) {
        finite &= std::isfinite(v[i]);
        mn = std::min(mn, v[i]);
        mx = std::max(mx, v[i]);
      }
      if (!finite) non_finite.store(true, std::memory_order_relaxed);
      float scale = (mx - mn) / 15.f;
      if (scale == 0.f) {
        scale = std::fabs(mn) / 8.f;
        if (scale == 0.f) scale = 1.f;
      }
      sc[t] = scale;
      ze[t] = mn + 8.f * scale;  // 8 * scale is exact: one rounding, FMA or not
      for (int64_t i = 0; i < G; ++i) {
        const float r = std::nearbyint((v[i] - mn) / scale);  // round half to even (default rounding mode)
        q[i] = std::min(std::max(r, 0.f), 15.f);
      }
      uint8_t* o = pk + t * (G / 2);
      for (int64_t i = 0; i < G / 2; ++i)
        o[i] = static_cast<uint8_t>(static_cast<int>(q[2 * i]) | (static_cast<int>(q[2 * i + 1]) << 4));
    }
  });
  TORCH_CHECK(!non_finite.load(), fn, ": w must be finite (it has inf or nan)");
  return {packed, scales, zeros};
}

}  // namespace mltoolkit
