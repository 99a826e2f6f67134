// Block-wise 8-bit state quantization of the CPU 8-bit optimizers (csrc/cpu/fused_adam8bit.cpp,
// csrc/cpu/fused_lamb8bit.cpp): the code format is csrc/fused_adam8bit.h's (a 256-entry map, one absmax per block of
// kAdam8bitBlock values). dequant: codes -> floats through the map; quant: the nearest code by a branchless binary
// search over the 255 sorted midpoints. Header-only, internal linkage: each kernel file compiles it with its own ISA.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace mltoolkit {
namespace blockwise_quant8 {
namespace {

// The binary search's probes at level L (step 128 >> L): mid[j * 2 step + step - 1] for j < 2^L, zero-padded to 128.
inline void level_probes(const float* mid, int L, float* out) {
  const int step = 128 >> L, count = 1 << L;
  for (int j = 0; j < 128; ++j) out[j] = j < count ? mid[j * 2 * step + step - 1] : 0.0f;
}

// Calls level(std::integral_constant<int, L>{}) for the binary search's levels L = 0..7, in order.
template <typename F>
inline void for_each_level(const F& level) {
  [&]<int... L>(std::integer_sequence<int, L...>) {
    (level(std::integral_constant<int, L>{}), ...);
  }(std::make_integer_sequence<int, 8>{});
}

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
    alignas(64) float bs[128], bu[128];
    level_probes(mid_s, L, bs);
    level_probes(mid_u, L, bu);
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
  for_each_level(level);
  return idx;
}
#elif defined(CPU_CAPABILITY_AVX2)
// The binary search's probes at level L are mid[j * 2 step + step - 1], j < 2^L: level by level they are read from
// registers with vpermps (8 entries; blends on j's higher bits above that) rather than gathered (vpgatherdps, ~1
// element a cycle, was most of the quantization's time: eight gathers for every 8 values). Levels 0-6 permute (level 6:
// 8 registers, 7 blends), level 7 (16 registers) gathers: the 8-bit AdamW step's CPU time, 1 thread, 4M parameters,
// 96 ms with eight gathers, ~42 with one, ~48 with three (levels 0-4 permuted) and no better with none (2-core AVX2
// VM, 2026-11-28, best of noisy runs).
constexpr int kPermuteLevels = 7;

template <int N>  // N registers of 8 floats
inline __m256 lut8(const __m256* t, __m256i j) {
  if constexpr (N == 1) {
    return _mm256_permutevar8x32_ps(t[0], j);
  } else {
    constexpr int bit = std::bit_width(unsigned{N}) + 1;  // j's bit that picks the upper half of t: log2(4 N)
    const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(j, 31 - bit));
    return _mm256_blendv_ps(lut8<N / 2>(t, j), lut8<N / 2>(t + N / 2, j), hi);
  }
}

struct Tables {
  __m256 ls[kPermuteLevels][16], lu[kPermuteLevels][16];  // level L: 2^L probes in max(1, 2^L / 8) registers
};

inline void load_tables(Tables& tb, const float*, const float*, const float* mid_s, const float* mid_u) {
  for (int L = 0; L < kPermuteLevels; ++L) {
    alignas(32) float bs[128], bu[128];
    level_probes(mid_s, L, bs);
    level_probes(mid_u, L, bu);
    for (int r = 0; r < 16; ++r) {
      tb.ls[L][r] = _mm256_load_ps(bs + 8 * r);
      tb.lu[L][r] = _mm256_load_ps(bu + 8 * r);
    }
  }
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
  const auto* lv = is_signed ? tb.ls : tb.lu;
  const __m256 vs = _mm256_set1_ps(scale);
  alignas(32) int32_t tmp[8];
  for (; j + 8 <= n; j += 8) {
    const __m256 xn = _mm256_div_ps(_mm256_loadu_ps(x + j), vs);
    __m256i idx = _mm256_setzero_si256();
    const auto level = [&](auto L_const) {
      constexpr int L = decltype(L_const)::value;
      constexpr int step = 128 >> L;
      __m256 probe;
      if constexpr (L < kPermuteLevels) {
        probe = lut8<(1 << L) <= 8 ? 1 : (1 << L) / 8>(lv[L], _mm256_srli_epi32(idx, 8 - L));
      } else {
        probe = _mm256_i32gather_ps(mid, _mm256_add_epi32(idx, _mm256_set1_epi32(step - 1)), 4);
      }
      const __m256 gt = _mm256_cmp_ps(xn, probe, _CMP_GT_OQ);
      idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(step)));
    };
    for_each_level(level);
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

// One tensor's parameters, gradient and 8-bit state (codes, absmax per block), float32.
struct Ptrs {
  float* p;
  const float* g;
  uint8_t *mc, *vc;
  float *ma, *va;
  int64_t numel;
};

// A run of blocks [block_begin, block_end) of one tensor: the unit of work the kernels share out.
struct Task {
  int32_t tensor;
  int64_t block_begin, block_end;
};

std::vector<float> map_of(const char* fn, const char* name, const at::Tensor& q) {
  TORCH_CHECK(q.defined() && q.device().is_cpu() && q.scalar_type() == at::kFloat && q.numel() == 256, fn, ": ",
              name, " must be a float32 CPU tensor of 256 values");
  at::Tensor c = q.contiguous();
  const float* d = c.data_ptr<float>();
  return std::vector<float>(d, d + 256);
}

}  // namespace
}  // namespace blockwise_quant8
}  // namespace mltoolkit
