// CPU fused multi-tensor 8-bit AdamW step; the contract is in csrc/fused_adam8bit.h.
//
// Work unit: one block of 256 elements of one tensor (its two absmax values are its own, so a block never needs
// another block's data and the result cannot depend on the thread count). All blocks of all tensors of a call are
// listed in tasks of up to kBlocksPerTask blocks and shared by one at::parallel_for. A block is processed in one pass
// over memory: the codes are dequantized into two 256-float stack buffers (a gather from the 256-entry map), the
// AdamW update runs on the buffers with fused_adam.cpp's float32 arithmetic (the same fma / rounding barriers, so
// the new moments equal torch's lerp_ / mul_ + addcmul_ bit for bit), p is written, and the new moments are
// requantized: absmax, an IEEE division, and the nearest code found by a branchless binary search over the 255
// sorted midpoints. AVX-512: 16 elements at once, every table lookup (map, search levels) a register permute
// (vpermps / vpermt2ps + blends), no memory gathers; AVX2: 8 at once with vector gathers; scalar elsewhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../fused_adam8bit.h"
#include "../optim_common.h"
#include "rounding_barrier.h"

namespace mltoolkit {
namespace {

constexpr int64_t kBlock = kAdam8bitBlock;
constexpr int64_t kBlocksPerTask = 64;

using Vec = at::vec::Vectorized<float>;

struct Consts {
  float coeff, beta2, c2, eps;
  bool small_w;
  const float* qs;     // signed map (256)
  const float* qu;     // unsigned map (256)
  const float* mid_s;  // 255 midpoints (+ 1 pad)
  const float* mid_u;
};

struct Ptrs {
  float* p;
  const float* g;
  uint8_t *mc, *vc;
  float *ma, *va;
  int64_t numel;
};

struct Task {
  int32_t tensor;
  int64_t block_begin, block_end;
};

#if defined(CPU_CAPABILITY_AVX512)
// Register-resident tables: an AVX-512 gather is slow (~1 element a cycle at best, far slower under the Gather Data
// Sampling microcode mitigation), so 16-lane lookups into tables of up to 256 floats are permutes: vpermps for 16
// entries, vpermt2ps for 32, and blends on the index's higher bits above that.
template <int N>  // N registers of 16 floats
inline __m512 lut(const __m512* t, __m512i j) {
  if constexpr (N == 1) {
    return _mm512_permutexvar_ps(j, t[0]);
  } else if constexpr (N == 2) {
    return _mm512_permutex2var_ps(t[0], j, t[1]);
  } else {
    const __mmask16 hi = _mm512_test_epi32_mask(j, _mm512_set1_epi32(16 * N / 2));
    return _mm512_mask_blend_ps(hi, lut<N / 2>(t, j), lut<N / 2>(t + N / 2, j));
  }
}

// The maps and the per-level probe tables of the binary search: at level L (step 128 >> L) the probe is
// mid[idx + step - 1] with idx a multiple of 2 step, so it is level_L[idx >> (8 - L)] over 2^L entries.
struct Tables {
  __m512 qs[16], qu[16];
  __m512 ls[8][8], lu[8][8];  // level L holds max(2^L, 16) floats in ceil(2^L / 16) registers (level 0..7)
};

inline void load_tables(Tables& tb, const float* qs, const float* qu, const float* mid_s, const float* mid_u) {
  for (int r = 0; r < 16; ++r) {
    tb.qs[r] = _mm512_loadu_ps(qs + 16 * r);
    tb.qu[r] = _mm512_loadu_ps(qu + 16 * r);
  }
  for (int L = 0; L < 8; ++L) {
    const int step = 128 >> L, count = 1 << L;
    alignas(64) float bs[128], bu[128];
    for (int j = 0; j < 128; ++j) {
      bs[j] = j < count ? mid_s[j * 2 * step + step - 1] : 0.0f;
      bu[j] = j < count ? mid_u[j * 2 * step + step - 1] : 0.0f;
    }
    for (int r = 0; r < 8; ++r) {
      tb.ls[L][r] = _mm512_load_ps(bs + 16 * r);
      tb.lu[L][r] = _mm512_load_ps(bu + 16 * r);
    }
  }
}

inline __m512i search16(__m512 xn, const __m512 (*lv)[8]) {
  __m512i idx = _mm512_setzero_si512();
  const auto level = [&](auto L_const) {
    constexpr int L = decltype(L_const)::value;
    constexpr int step = 128 >> L;
    constexpr int regs = (1 << L) <= 16 ? 1 : (1 << L) / 16;
    const __m512i j = _mm512_srli_epi32(idx, 8 - L);
    const __m512 mid = lut<regs>(lv[L], j);
    const __mmask16 gt = _mm512_cmp_ps_mask(xn, mid, _CMP_GT_OQ);
    idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(step));
  };
  level(std::integral_constant<int, 0>{});
  level(std::integral_constant<int, 1>{});
  level(std::integral_constant<int, 2>{});
  level(std::integral_constant<int, 3>{});
  level(std::integral_constant<int, 4>{});
  level(std::integral_constant<int, 5>{});
  level(std::integral_constant<int, 6>{});
  level(std::integral_constant<int, 7>{});
  return idx;
}
#else
struct Tables {};
inline void load_tables(Tables&, const float*, const float*, const float*, const float*) {}
#endif

// out[j] = map[codes[j]] * scale
inline void dequant(const uint8_t* codes, const float* map, const Tables& tb, bool is_signed, float scale, float* out,
                    int64_t n) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512* t = is_signed ? tb.qs : tb.qu;
  for (; j + 16 <= n; j += 16) {
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j)));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(lut<16>(t, idx), vs));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  (void)tb;
  (void)is_signed;
  const __m256 vs = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) {
    __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), vs));
  }
#else
  (void)tb;
  (void)is_signed;
#endif
  for (; j < n; ++j) out[j] = map[codes[j]] * scale;
}

// codes[j] = #{k < 255 : mid[k] < x[j] / scale}, scale = absmax > 0 ? absmax : 1
inline void quant(const float* x, float absmax, const float* mid, const Tables& tb, bool is_signed, uint8_t* codes,
                  int64_t n) {
  const float scale = absmax > 0.0f ? absmax : 1.0f;
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vs = _mm512_set1_ps(scale);
  const auto* lv = is_signed ? tb.ls : tb.lu;
  for (; j + 16 <= n; j += 16) {
    const __m512i idx = search16(_mm512_div_ps(_mm512_loadu_ps(x + j), vs), lv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j), _mm512_cvtepi32_epi8(idx));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  (void)tb;
  (void)is_signed;
  const __m256 vs = _mm256_set1_ps(scale);
  alignas(32) int32_t tmp[8];
  for (; j + 8 <= n; j += 8) {
    const __m256 xn = _mm256_div_ps(_mm256_loadu_ps(x + j), vs);
    __m256i idx = _mm256_setzero_si256();
    for (int step = 128; step >= 1; step >>= 1) {
      const __m256i probe = _mm256_add_epi32(idx, _mm256_set1_epi32(step - 1));
      const __m256 gt = _mm256_cmp_ps(xn, _mm256_i32gather_ps(mid, probe, 4), _CMP_GT_OQ);
      idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(step)));
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), idx);
    for (int k = 0; k < 8; ++k) codes[j + k] = static_cast<uint8_t>(tmp[k]);
  }
#else
  (void)tb;
  (void)is_signed;
#endif
  for (; j < n; ++j) {
    const float xn = x[j] / scale;
    int idx = 0;
    for (int step = 128; step >= 1; step >>= 1) idx += (xn > mid[idx + step - 1]) ? step : 0;
    codes[j] = static_cast<uint8_t>(idx);
  }
}

inline float nan_max(float r, float x) { return (x > r || std::isnan(x)) ? x : r; }

template <bool kDecay, bool kMaximize>
void update_block(const Ptrs& t, const AdamWCoeffs& c, const Consts& k, const Tables& tb, int64_t block) {
  const int64_t begin = block * kBlock;
  const int64_t len = std::min(kBlock, t.numel - begin);
  alignas(64) float m[kBlock];
  alignas(64) float v[kBlock];
  dequant(t.mc + begin, k.qs, tb, true, t.ma[block], m, len);
  dequant(t.vc + begin, k.qu, tb, false, t.va[block], v, len);
  float* p = t.p + begin;
  const float* g = t.g + begin;
  const Vec vdecay(c.decay), vcoeff(k.coeff), vbeta2(k.beta2), vc2(k.c2), vbc2(c.bc2_sqrt), veps(k.eps),
      vstep(c.neg_step_size);
  Vec amax_m(0.0f), amax_v(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) {
    Vec gv = Vec::loadu(g + j);
    if (kMaximize) gv = gv.neg();
    Vec pv = Vec::loadu(p + j);
    Vec mv = Vec::loadu(m + j);
    Vec vv = Vec::loadu(v + j);
    if (kDecay) pv = opaque(pv * vdecay);
    mv = at::vec::fmadd(vcoeff, gv - mv, k.small_w ? mv : gv);
    vv = at::vec::fmadd(opaque(vc2 * gv), gv, opaque(vv * vbeta2));
    Vec d = vv.sqrt() / vbc2 + veps;
    pv = pv + vstep * mv / d;
    pv.store(p + j);
    mv.store(m + j);
    vv.store(v + j);
    amax_m = at::vec::maximum(amax_m, mv.abs());
    amax_v = at::vec::maximum(amax_v, vv.abs());
  }
  float am = 0.0f, av = 0.0f;
  {
    alignas(64) float bm[Vec::size()];
    alignas(64) float bv[Vec::size()];
    amax_m.store(bm);
    amax_v.store(bv);
    for (int q = 0; q < Vec::size(); ++q) {
      am = nan_max(am, bm[q]);
      av = nan_max(av, bv[q]);
    }
  }
  for (; j < len; ++j) {
    float gs = kMaximize ? -g[j] : g[j];
    float ps = p[j], ms = m[j], vs = v[j];
    if (kDecay) ps = opaque(ps * c.decay);
    ms = std::fma(k.coeff, gs - ms, k.small_w ? ms : gs);
    vs = std::fma(opaque(k.c2 * gs), gs, opaque(vs * k.beta2));
    float d = std::sqrt(vs) / c.bc2_sqrt + k.eps;
    ps = ps + c.neg_step_size * ms / d;
    p[j] = ps;
    m[j] = ms;
    v[j] = vs;
    am = nan_max(am, std::abs(ms));
    av = nan_max(av, std::abs(vs));
  }
  quant(m, am, k.mid_s, tb, true, t.mc + begin, len);
  quant(v, av, k.mid_u, tb, false, t.vc + begin, len);
  t.ma[block] = am;
  t.va[block] = av;
}

using UpdateFn = void (*)(const Ptrs&, const AdamWCoeffs&, const Consts&, const Tables&, int64_t);

UpdateFn pick(bool decay, bool maximize) {
  if (decay) return maximize ? &update_block<true, true> : &update_block<true, false>;
  return maximize ? &update_block<false, true> : &update_block<false, false>;
}

std::vector<float> map_of(const char* fn, const char* name, const at::Tensor& q) {
  TORCH_CHECK(q.defined() && q.device().is_cpu() && q.scalar_type() == at::kFloat && q.numel() == 256, fn, ": ",
              name, " must be a float32 CPU tensor of 256 values");
  at::Tensor c = q.contiguous();
  const float* d = c.data_ptr<float>();
  return std::vector<float>(d, d + 256);
}

}  // namespace

void fused_adamw8bit_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avg_codes, const std::vector<at::Tensor>& exp_avg_absmax,
                         const std::vector<at::Tensor>& exp_avg_sq_codes,
                         const std::vector<at::Tensor>& exp_avg_sq_absmax, const std::vector<at::Tensor>& state_steps,
                         const at::Tensor& qmap_signed, const at::Tensor& qmap_unsigned, double lr, double beta1,
                         double beta2, double weight_decay, double eps, bool maximize) {
  const char* fn = "fused_adamw8bit_cpu";
  const size_t n = params.size();
  check_adamw8bit_lengths(fn, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                          state_steps);
  TORCH_CHECK(n < (size_t(1) << 31), fn, ": too many tensors (", n, ")");
  const std::vector<float> qs = map_of(fn, "qmap_signed", qmap_signed);
  const std::vector<float> qu = map_of(fn, "qmap_unsigned", qmap_unsigned);
  std::vector<float> mid_s(256), mid_u(256);
  for (int k = 0; k < 255; ++k) {
    mid_s[k] = (qs[k] + qs[k + 1]) * 0.5f;
    mid_u[k] = (qu[k] + qu[k + 1]) * 0.5f;
  }
  mid_s[255] = mid_u[255] = INFINITY;  // never read: the search probes indices 0..254

  std::vector<Ptrs> ptrs(n);
  std::vector<Task> tasks;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = check_adamw8bit_tensor(fn, i, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                                 exp_avg_sq_absmax, state_steps, kBlock, nullptr);
    const at::Tensor& p = params[i];
    ptrs[i] = {p.data_ptr<float>(),
               grads[i].data_ptr<float>(),
               exp_avg_codes[i].data_ptr<uint8_t>(),
               exp_avg_sq_codes[i].data_ptr<uint8_t>(),
               exp_avg_absmax[i].data_ptr<float>(),
               exp_avg_sq_absmax[i].data_ptr<float>(),
               numel};
  }
  const std::vector<AdamWCoeffs> coeffs = adamw_step_coeffs(state_steps, lr, beta1, beta2, weight_decay);
  for (size_t i = 0; i < n; ++i) {
    const int64_t nb = (ptrs[i].numel + kBlock - 1) / kBlock;
    for (int64_t b = 0; b < nb; b += kBlocksPerTask)
      tasks.push_back({static_cast<int32_t>(i), b, std::min(nb, b + kBlocksPerTask)});
  }
  const AdamWScalars sc = adamw_scalars(beta1, beta2, eps);
  const Consts k{sc.lerp_coeff,
                 sc.beta2,
                 sc.c2,
                 sc.eps,
                 sc.small_w,
                 qs.data(),
                 qu.data(),
                 mid_s.data(),
                 mid_u.data()};
  const UpdateFn run = pick(weight_decay != 0, maximize);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
    Tables tb;
    load_tables(tb, k.qs, k.qu, k.mid_s, k.mid_u);
    for (int64_t q = lo; q < hi; ++q) {
      const Task& task = tasks[q];
      for (int64_t b = task.block_begin; b < task.block_end; ++b)
        run(ptrs[task.tensor], coeffs[task.tensor], k, tb, b);
    }
  });
}

}  // namespace mltoolkit
