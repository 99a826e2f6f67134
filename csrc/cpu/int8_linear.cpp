// CPU kernels of the int8 dynamic-quantized linear (contract: csrc/int8_linear.h).
//
// GEMM: y = (xq . wq^T) * x_scale * w_scale + bias with xq (M, K) row-major and the weight in one of two layouts.
//
// Packed weight (int8_pack_weight, the layout Int8Linear uses where the VNNI path runs): panels of 64 output
// channels; within a panel, for every 4 consecutive k, 64 x 4 bytes (channel-major), stored with the sign bit
// flipped (w ^ 0x80, an unsigned byte w + 128). The panel kernel keeps MR x 4 vector accumulators of 16 channels
// each; every 4-k step loads the panel's 4 weight vectors once and issues, per activation row, 4 vpdpbusd with the
// row's 4 activation bytes broadcast from memory ({1to16} operand). No horizontal sums: each accumulator lane is
// one output. vpdpbusd takes its first source unsigned, so the weights carry the +128 and each row's sum is
// corrected by 128 * sum_k xq[m, k] (one number per row, computed with the activation copy).
//
// Plain (N, K) weight: the register tile is MR rows of x by NR rows of w; every 64-k step loads NR weight vectors and
// MR activation vectors and issues MR * NR dot-product instructions into MR * NR vector accumulators, reduced
// horizontally once, at the end of K. A packed weight on the avx2 and scalar paths is unpacked first (one N x K
// copy per call; Int8Linear packs only where the vnni path runs).
//
// Measured and rejected (2026-11-26, 1 thread, row-dot kernel): blocking K (512-2048 bytes, vector accumulators
// saved between blocks, with 64-row or L1-sized 16-row M blocks) was no faster or slower at M = 1, 16 and 256;
// software prefetch of the next weight tile did not help either. The row-dot kernel on a 4-row-interleaved layout
// was 1.2-1.4x slower than fbgemm at M = 16: the panel kernel replaced that layout.
//
// Paths (run-time choice, identical results):
//  - vnni: vpdpbusd multiplies unsigned by signed bytes. Panel kernel: see above. Row-dot kernel (plain weights):
//    activations are shifted to unsigned, xu = xq + 128 (xor 0x80), so sum_k xu * w = sum_k xq * w + 128 * sum_k w;
//    the weight row sums come from one more vpdpbusd against a vector of ones (computed with the first activation
//    tile of each block, then reused). vpdpbusd does not saturate (it wraps modulo 2^32), so the subtraction gives
//    the exact sum whenever the true sum fits in int32.
//  - avx2: vpmovsxbw widens bytes to int16 (activations once per call, weights per load), vpmaddwd multiplies int16
//    pairs into int32 sums. Each product is at most 128 * 128 = 2^14 in magnitude and a pair at most 2^15, far
//    inside int32: exact for every int8 value, -128 included. (vpmaddubsw would be twice as dense but adds pairs
//    with int16 saturation: 255 * 127 * 2 > 32767 with the +128 shift, and the sign trick that avoids that is wrong
//    for a weight of -128.)
//  - scalar: plain int32 loops (auto-vectorized by the compiler where it can); also the path off x86.
#include "int8_linear.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "check_util.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MLTK_INT8_X86 1
#endif

namespace mltoolkit {
namespace {

constexpr int64_t kMaxK = 131071;  // K * 128 * 128 < 2^31: no exact sum leaves int32
constexpr int64_t kMBlock = 64;    // activation rows per block (64 x K bytes stay in L2 while N streams)

// ---- quantize rows --------------------------------------------------------------------------------------------

template <typename scalar_t>
inline void load_float(const scalar_t* p, at::vec::Vectorized<float>& out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    out = at::vec::Vectorized<float>::loadu(p);
  } else {
    at::vec::load_to_float<scalar_t>(p, out);
  }
}

template <typename scalar_t>
void quantize_rows_kernel(const scalar_t* x, int64_t rows, int64_t K, int64_t ldx, int8_t* q, float* scale) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * ldx;
      Vec vmax(0.f);
      int64_t k = 0;
      for (; k + V <= K; k += V) {
        Vec v;
        load_float(xr + k, v);
        v.store(buf.data() + k);
        vmax = at::vec::maximum(vmax, v.abs());
      }
      float lanes[V];
      vmax.store(lanes);
      float amax = 0.f;
      for (int64_t i = 0; i < V; ++i) amax = std::max(amax, lanes[i]);
      for (; k < K; ++k) {
        const float f = static_cast<float>(xr[k]);
        buf[k] = f;
        amax = std::max(amax, std::abs(f));
      }
      float s = amax / 127.f;
      if (!(s >= FLT_MIN)) s = 1.f;
      scale[r] = s;
      const Vec vs(s), lo(-127.f), hi(127.f);
      int8_t* qr = q + r * K;
      k = 0;
      for (; k + V <= K; k += V) {
        // round(): round half to even (roundscale / nearbyint); clamp in float, so NaN never reaches the cast.
        Vec v = at::vec::clamp(Vec::loadu(buf.data() + k) / vs, lo, hi).round();
        v.store(buf.data() + k);
      }
      for (; k < K; ++k) buf[k] = std::nearbyint(std::min(127.f, std::max(-127.f, buf[k] / s)));
      for (k = 0; k < K; ++k) qr[k] = static_cast<int8_t>(static_cast<int32_t>(buf[k]));
    }
  });
}

// ---- epilogue -------------------------------------------------------------------------------------------------

template <typename out_t>
struct Epilogue {
  const float* xs;
  int64_t xs_stride;  // 0: one scale for every row (a static per-tensor scale expanded, read without a copy)
  const float* ws;
  const float* bias;
  out_t* y;
  int64_t ldy;

  inline void operator()(int64_t m, int64_t n, int32_t acc) const {
    // volatile: no FMA contraction with what follows
    volatile float t = static_cast<float>(acc) * xs[m * xs_stride];
    float v = t * ws[n];
    if (bias != nullptr) {
      volatile float u = v;
      v = u + bias[n];
    }
    y[m * ldy + n] = static_cast<out_t>(v);
  }
};

// Problem description shared by the row-dot paths (plain weights). xa: the activations in the path's own form
// (vnni: uint8 xq ^ 0x80; avx2: int16; scalar: int8), rows of lda elements; w: (N, K) rows of ldw bytes.
template <typename out_t>
struct Problem {
  const void* xa;
  int64_t lda;
  const int8_t* w;
  int64_t ldw;
  int64_t M, N, K;
  Epilogue<out_t> epi;

  inline const int8_t* row(int64_t n) const { return w + n * ldw; }
};

// Runs tile(m0, mr, n0, nr, first, scratch) over the whole problem: threads over (64-row M block, chunk of N tiles); within
// a task each NR-row weight tile is read once per M block and serves every MR-row activation tile of it.
template <int MR, int NR, typename Tile>
void drive(int64_t M, int64_t N, const Tile& tile) {
  const int64_t ntiles = (N + NR - 1) / NR;
  const int64_t mblocks = (M + kMBlock - 1) / kMBlock;
  const int64_t chunk = 16;  // NR-row tiles per task
  const int64_t nchunks = (ntiles + chunk - 1) / chunk;
  at::parallel_for(0, mblocks * nchunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / nchunks, nc = t % nchunks;
      const int64_t m_begin = mb * kMBlock, m_end = std::min(M, m_begin + kMBlock);
      for (int64_t nt = nc * chunk; nt < std::min(ntiles, (nc + 1) * chunk); ++nt) {
        const int64_t n0 = nt * NR, nr = std::min<int64_t>(NR, N - n0);
        int32_t scratch[NR];  // per weight tile: what its first activation tile leaves for the others (row sums)
        for (int64_t m0 = m_begin; m0 < m_end; m0 += MR) {
          tile(m0, std::min<int64_t>(MR, m_end - m0), n0, nr, m0 == m_begin, scratch);
        }
      }
    }
  });
}

// ---- scalar path ----------------------------------------------------------------------------------------------

template <typename out_t>
void gemm_scalar(const Problem<out_t>& p) {
  const int8_t* x = static_cast<const int8_t*>(p.xa);
  auto tile = [&](int64_t m0, int64_t mr, int64_t n0, int64_t nr, bool, int32_t*) {
    for (int64_t i = 0; i < mr; ++i) {
      const int8_t* xr = x + (m0 + i) * p.lda;
      for (int64_t j = 0; j < nr; ++j) {
        const int8_t* wr = p.row(n0 + j);
        int32_t acc = 0;
        for (int64_t k = 0; k < p.K; ++k) acc += static_cast<int32_t>(xr[k]) * static_cast<int32_t>(wr[k]);
        p.epi(m0 + i, n0 + j, acc);
      }
    }
  };
  drive<4, 4>(p.M, p.N, tile);
}

#ifdef MLTK_INT8_X86

// ---- AVX-512 VNNI path ----------------------------------------------------------------------------------------

#define MLTK_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// acc += dot4(a as unsigned bytes, b as signed bytes) per int32 lane. Inline asm ties acc to its register: with the
// intrinsic, GCC 12 copied every accumulator once per iteration (30 register moves per 16 vpdpbusd).
MLTK_VNNI_TARGET inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// The four horizontal sums of a, b, c, d at once (13 instructions instead of 4 x 9).
MLTK_VNNI_TARGET inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));  // a b a b
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));  // c d c d
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// One MR x NR tile over all of K. FIRST: also sum the weight rows (into wsum) for the activation shift.
template <int MR, int NR, bool FIRST, typename out_t>
MLTK_VNNI_TARGET void vnni_tile(const Problem<out_t>& p, int64_t m0, int64_t n0, int32_t* wsum) {
  const uint8_t* x = static_cast<const uint8_t*>(p.xa) + m0 * p.lda;
  const int8_t* wr[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) wr[j] = p.row(n0 + j);
  const int64_t K = p.K, lda = p.lda;
  __m512i acc[MR * NR];
  __m512i sacc[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) sacc[j] = _mm512_setzero_si512();
#pragma GCC unroll 16
  for (int i = 0; i < MR * NR; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t kmain = K & ~int64_t(63);
  for (int64_t k = 0; k < kmain; k += 64) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(x + i * lda + k);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const __m512i wv = _mm512_loadu_si512(wr[j] + k);
        if (FIRST && i == 0) sacc[j] = dpbusd(sacc[j], ones, wv);
        acc[i * NR + j] = dpbusd(acc[i * NR + j], xv, wv);
      }
    }
  }
  if (kmain < K) {  // masked tail: zero weights contribute nothing, whatever the activation bytes are
    const __mmask64 mask = _cvtu64_mask64(~0ULL >> (64 - (K - kmain)));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + i * lda + kmain);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const __m512i wv = _mm512_maskz_loadu_epi8(mask, wr[j] + kmain);
        if (FIRST && i == 0) sacc[j] = dpbusd(sacc[j], ones, wv);
        acc[i * NR + j] = dpbusd(acc[i * NR + j], xv, wv);
      }
    }
  }
  if (FIRST) {
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) wsum[j] = _mm512_reduce_add_epi32(sacc[j]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    int32_t sums[4];
    if constexpr (NR == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(sums), reduce4(acc[i * 4], acc[i * 4 + 1], acc[i * 4 + 2],
                                                                 acc[i * 4 + 3]));
    } else {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) sums[j] = _mm512_reduce_add_epi32(acc[i * NR + j]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      // Wrapping arithmetic, as vpdpbusd's: exact once the true sum is back in range.
      const uint32_t a = static_cast<uint32_t>(sums[j]) - (static_cast<uint32_t>(wsum[j]) << 7);
      p.epi(m0 + i, n0 + j, static_cast<int32_t>(a));
    }
  }
}

template <int MR, int NR, typename out_t>
void vnni_tile_dispatch_m(const Problem<out_t>& p, int64_t m0, int64_t mr, int64_t n0, bool first, int32_t* wsum) {
  if constexpr (MR == 0) {
    (void)p, (void)m0, (void)mr, (void)n0, (void)first, (void)wsum;
  } else if (mr == MR) {
    if (first) {
      vnni_tile<MR, NR, true>(p, m0, n0, wsum);
    } else {
      vnni_tile<MR, NR, false>(p, m0, n0, wsum);
    }
  } else {
    vnni_tile_dispatch_m<MR - 1, NR>(p, m0, mr, n0, first, wsum);
  }
}

template <typename out_t>
void gemm_vnni(const Problem<out_t>& p) {
  constexpr int MR = 4, NR = 4;
  // The weight row sums come with the first activation tile of each M block and serve the others from scratch.
  auto tile = [&](int64_t m0, int64_t mr, int64_t n0, int64_t nr, bool first, int32_t* wsum) {
    switch (nr) {
      case 4: vnni_tile_dispatch_m<MR, 4>(p, m0, mr, n0, first, wsum); break;
      case 3: vnni_tile_dispatch_m<MR, 3>(p, m0, mr, n0, first, wsum); break;
      case 2: vnni_tile_dispatch_m<MR, 2>(p, m0, mr, n0, first, wsum); break;
      default: vnni_tile_dispatch_m<MR, 1>(p, m0, mr, n0, first, wsum); break;
    }
  };
  drive<MR, NR>(p.M, p.N, tile);
}

// ---- AVX-512 VNNI panel path (packed weights) ---------------------------------------------------------------

// The packed weight of int8_pack_weight: panel p, k-quad q: 64 channels x 4 bytes at packed + (p * KQ + q) * 256.
struct Panels {
  const int8_t* x;        // activations, int8 rows of lda bytes, zero-padded to 4 * KQ
  int64_t lda;
  const int32_t* xsum;    // per row: sum_k xq[m, k] (the +128 weight shift's correction)
  const uint8_t* w;       // packed weight
  int64_t KQ;             // k-quads per panel: ceil(K / 4)
};

// acc += dot4(w as unsigned bytes, the 4 signed bytes at x4 broadcast to every lane).
MLTK_VNNI_TARGET inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t* x4) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x4)));
  return acc;
}

// Rows m0 .. m0 + MR - 1 against one 64-channel panel, over all of K.
template <int MR, typename out_t>
MLTK_VNNI_TARGET void panel_tile(const Panels& pp, const Epilogue<out_t>& epi, int64_t N, int64_t m0,
                                 int64_t panel) {
  const int8_t* x = pp.x + m0 * pp.lda;
  const uint8_t* w = pp.w + panel * pp.KQ * 256;
  __m512i acc[MR][4];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_si512();
  }
  for (int64_t q = 0; q < pp.KQ; ++q, w += 256) {
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
    const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const int8_t* x4 = x + i * pp.lda + 4 * q;
      acc[i][0] = dpbusd_bcast(acc[i][0], w0, x4);
      acc[i][1] = dpbusd_bcast(acc[i][1], w1, x4);
      acc[i][2] = dpbusd_bcast(acc[i][2], w2, x4);
      acc[i][3] = dpbusd_bcast(acc[i][3], w3, x4);
    }
  }
  const int64_t n0 = panel * 64, nr = std::min<int64_t>(64, N - n0);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    alignas(64) int32_t sums[64];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_store_si512(sums + 16 * v, acc[i][v]);
    // Wrapping arithmetic, as vpdpbusd's: exact once the true sum is back in range.
    const uint32_t shift = static_cast<uint32_t>(pp.xsum[m0 + i]) << 7;
    for (int64_t j = 0; j < nr; ++j) {
      epi(m0 + i, n0 + j, static_cast<int32_t>(static_cast<uint32_t>(sums[j]) - shift));
    }
  }
}

template <int MR, typename out_t>
void panel_tile_dispatch(const Panels& pp, const Epilogue<out_t>& epi, int64_t N, int64_t m0, int64_t mr,
                         int64_t panel) {
  if constexpr (MR == 0) {
    (void)pp, (void)epi, (void)N, (void)m0, (void)mr, (void)panel;
  } else if (mr == MR) {
    panel_tile<MR>(pp, epi, N, m0, panel);
  } else {
    panel_tile_dispatch<MR - 1>(pp, epi, N, m0, mr, panel);
  }
}

// Threads over (64-row M block, panel); consecutive tasks are consecutive panels of one M block, so a thread's
// activation block stays in cache while its panels stream through.
template <typename out_t>
void gemm_vnni_panels(const Panels& pp, const Epilogue<out_t>& epi, int64_t M, int64_t N) {
  constexpr int MR = 6;  // 24 accumulators + 4 weight vectors of the 32 zmm registers
  const int64_t panels = (N + 63) / 64, mblocks = (M + kMBlock - 1) / kMBlock;
  at::parallel_for(0, mblocks * panels, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / panels, panel = t % panels;
      const int64_t m_end = std::min(M, (mb + 1) * kMBlock);
      for (int64_t m0 = mb * kMBlock; m0 < m_end; m0 += MR) {
        panel_tile_dispatch<MR>(pp, epi, N, m0, std::min<int64_t>(MR, m_end - m0), panel);
      }
    }
  });
}

// ---- AVX2 path ------------------------------------------------------------------------------------------------

#define MLTK_AVX2_TARGET __attribute__((target("avx2")))

MLTK_AVX2_TARGET inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int MR, int NR, typename out_t>
MLTK_AVX2_TARGET void avx2_tile(const Problem<out_t>& p, int64_t m0, int64_t n0) {
  const int16_t* x = static_cast<const int16_t*>(p.xa) + m0 * p.lda;
  const int8_t* wr[NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) wr[j] = p.row(n0 + j);
  const int64_t K = p.K, lda = p.lda;
  __m256i acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  }
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[j] + k)));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * lda + k));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      int32_t a = hsum256(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) a += static_cast<int32_t>(x[i * lda + kk]) * wr[j][kk];
      p.epi(m0 + i, n0 + j, a);
    }
  }
}

template <int MR, int NR, typename out_t>
void avx2_tile_dispatch_m(const Problem<out_t>& p, int64_t m0, int64_t mr, int64_t n0) {
  if constexpr (MR == 0) {
    (void)p, (void)m0, (void)mr, (void)n0;
  } else if (mr == MR) {
    avx2_tile<MR, NR>(p, m0, n0);
  } else {
    avx2_tile_dispatch_m<MR - 1, NR>(p, m0, mr, n0);
  }
}

template <typename out_t>
void gemm_avx2(const Problem<out_t>& p) {
  constexpr int MR = 4, NR = 2;  // 8 accumulators + 2 weight vectors + 1 activation vector of 16 ymm registers
  auto tile = [&](int64_t m0, int64_t mr, int64_t n0, int64_t nr, bool, int32_t*) {
    if (nr == 2) {
      avx2_tile_dispatch_m<MR, 2>(p, m0, mr, n0);
    } else {
      avx2_tile_dispatch_m<MR, 1>(p, m0, mr, n0);
    }
  };
  drive<MR, NR>(p.M, p.N, tile);
}

bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

#else

bool cpu_has_vnni() { return false; }
bool cpu_has_avx2() { return false; }

#endif  // MLTK_INT8_X86

enum class Isa { kVnni, kAvx2, kScalar };

const char* isa_name(Isa isa) { return isa == Isa::kVnni ? "vnni" : isa == Isa::kAvx2 ? "avx2" : "scalar"; }

Isa choose_isa(const char* fn) {
  const char* env = std::getenv("MLTK_INT8_ISA");
  const std::string want = env == nullptr ? "" : env;
  if (want.empty() || want == "auto") return cpu_has_vnni() ? Isa::kVnni : cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
  if (want == "scalar") return Isa::kScalar;
  if (want == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), fn, ": MLTK_INT8_ISA=avx2 but this CPU (or build) has no AVX2");
    return Isa::kAvx2;
  }
  if (want == "vnni") {
    TORCH_CHECK(cpu_has_vnni(), fn, ": MLTK_INT8_ISA=vnni but this CPU (or build) has no AVX-512 VNNI");
    return Isa::kVnni;
  }
  TORCH_CHECK(false, fn, ": MLTK_INT8_ISA must be auto, vnni, avx2 or scalar, got '", want, "'");
}

// Row stride (elements) of the activation copy: rows a multiple of 4 KB apart (K = 4096) all map to the same L1
// sets (8 ways), so 16 activation rows could evict each other; one extra cache line breaks the pattern. (No change
// was measurable on the shared 2-core VM; it costs nothing.)
int64_t padded_stride(int64_t K, int64_t elem_bytes) {
  const int64_t line = 64 / elem_bytes;
  return (K + line - 1) / line * line + line;
}

// The plain (N, K) weight a packed one stands for (avx2 and scalar paths).
at::Tensor unpack_weight(const at::Tensor& packed, int64_t N, int64_t K) {
  at::Tensor w = at::empty({N, K}, packed.options());
  const uint8_t* src = reinterpret_cast<const uint8_t*>(packed.data_ptr<int8_t>());
  int8_t* dst = w.data_ptr<int8_t>();
  const int64_t KQ = (K + 3) / 4;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* panel = src + (n / 64) * KQ * 256 + (n % 64) * 4;
      for (int64_t k = 0; k < K; ++k) dst[n * K + k] = static_cast<int8_t>(panel[(k / 4) * 256 + k % 4] ^ 0x80u);
    }
  });
  return w;
}

template <typename out_t>
void run_gemm(Isa isa, const at::Tensor& xq, const at::Tensor& wq_in, int64_t N, Epilogue<out_t> epi) {
  const int64_t M = xq.size(0), K = xq.size(1);
  const int8_t* src = xq.data_ptr<int8_t>();
  const int64_t lds = xq.stride(0);
#ifdef MLTK_INT8_X86
  if (isa == Isa::kVnni && wq_in.dim() == 4) {
    const int64_t KQ = (K + 3) / 4, lda = padded_stride(4 * KQ, 1);
    at::Tensor xa = at::zeros({M, lda}, xq.options());
    at::Tensor xsum = at::empty({M}, xq.options().dtype(at::kInt));
    int8_t* dst = xa.data_ptr<int8_t>();
    int32_t* sums = xsum.data_ptr<int32_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += (dst[m * lda + k] = src[m * lds + k]);
        sums[m] = s;
      }
    });
    const Panels pp{dst, lda, sums, reinterpret_cast<const uint8_t*>(wq_in.data_ptr<int8_t>()), KQ};
    return gemm_vnni_panels(pp, epi, M, N);
  }
#endif
  const at::Tensor wq = wq_in.dim() == 4 ? unpack_weight(wq_in, N, K) : wq_in;
  Problem<out_t> p{nullptr, 0, wq.data_ptr<int8_t>(), wq.stride(0), M, N, K, epi};
  at::Tensor xa;
  if (isa == Isa::kVnni) {
    const int64_t lda = padded_stride(K, 1);
    xa = at::empty({M, lda}, xq.options().dtype(at::kByte));
    uint8_t* dst = xa.data_ptr<uint8_t>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) dst[m * lda + k] = static_cast<uint8_t>(src[m * lds + k]) ^ 0x80u;
    }
    p.xa = dst;
    p.lda = lda;
  } else if (isa == Isa::kAvx2) {
    const int64_t lda = padded_stride(K, 2);
    xa = at::empty({M, lda}, xq.options().dtype(at::kShort));
    xa.narrow(1, 0, K).copy_(xq);
    p.xa = xa.data_ptr<int16_t>();
    p.lda = lda;
  } else {
    p.xa = src;
    p.lda = lds;
  }
#ifdef MLTK_INT8_X86
  if (isa == Isa::kVnni) return gemm_vnni(p);
  if (isa == Isa::kAvx2) return gemm_avx2(p);
#endif
  gemm_scalar(p);
}

void check_cpu(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

// Rows with a contiguous last dim (any row stride); anything else is copied.
at::Tensor rows(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= 0 ? t : t.contiguous();
}

}  // namespace

std::vector<at::Tensor> quantize_rows_cpu(const at::Tensor& x_in) {
  const char* fn = "quantize_rows_cpu";
  check_cpu(fn, "x", x_in);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kHalf ||
                  x_in.scalar_type() == at::kBFloat16,
              fn, ": x must be float32, float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2, fn, ": x must be 2-D (rows, K), got shape ", shape_str(x_in.sizes()));
  const at::Tensor x = (x_in.size(1) <= 1 || x_in.stride(1) == 1) ? x_in : x_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({R, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({R}, x.options().dtype(at::kFloat));
  if (R == 0) return {q, scale};
  const int64_t ldx = x.stride(0);
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kHalf: quantize_rows_kernel(x.data_ptr<at::Half>(), R, K, ldx, qp, sp); break;
    case at::kBFloat16: quantize_rows_kernel(x.data_ptr<at::BFloat16>(), R, K, ldx, qp, sp); break;
    default: quantize_rows_kernel(x.data_ptr<float>(), R, K, ldx, qp, sp); break;
  }
  return {q, scale};
}

at::Tensor int8_linear_cpu(const at::Tensor& xq_in, const at::Tensor& x_scale_in, const at::Tensor& wq_in,
                           const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in,
                           at::ScalarType out_dtype) {
  const char* fn = "int8_linear_cpu";
  check_cpu(fn, "xq", xq_in);
  check_cpu(fn, "x_scale", x_scale_in);
  check_cpu(fn, "wq", wq_in);
  check_cpu(fn, "w_scale", w_scale_in);
  TORCH_CHECK(xq_in.scalar_type() == at::kChar, fn, ": xq must be int8, got ", xq_in.scalar_type());
  TORCH_CHECK(wq_in.scalar_type() == at::kChar, fn, ": wq must be int8, got ", wq_in.scalar_type());
  TORCH_CHECK(xq_in.dim() == 2, fn, ": xq must be 2-D (M, K), got shape ", shape_str(xq_in.sizes()));
  TORCH_CHECK(wq_in.dim() == 2 || wq_in.dim() == 4, fn, ": wq must be 2-D (N, K) or packed 4-D (ceil(N / 64), "
              "ceil(K / 4), 64, 4), got shape ", shape_str(wq_in.sizes()));
  TORCH_CHECK(w_scale_in.dim() == 1, fn, ": w_scale must be 1-D (N,), got shape ", shape_str(w_scale_in.sizes()));
  const bool packed = wq_in.dim() == 4;
  const int64_t M = xq_in.size(0), K = xq_in.size(1), N = packed ? w_scale_in.size(0) : wq_in.size(0);
  if (packed) {
    const std::vector<int64_t> want{(N + 63) / 64, (K + 3) / 4, 64, 4};
    TORCH_CHECK(wq_in.sizes() == at::IntArrayRef(want), fn, ": packed wq must have shape (ceil(N / 64), ceil(K / 4), "
                "64, 4) = ", shape_str(want), " for N = ", N, " (w_scale's length) and K = ", K, " (xq's last dim), "
                "got ", shape_str(wq_in.sizes()));
  } else {
    TORCH_CHECK(wq_in.size(1) == K, fn, ": wq must be (N, K) with K = ", K, " (xq's last dim), got shape ",
                shape_str(wq_in.sizes()));
  }
  TORCH_CHECK(K <= kMaxK, fn, ": K must be at most ", kMaxK, " (int32 accumulation), got ", K);
  TORCH_CHECK(x_scale_in.scalar_type() == at::kFloat, fn, ": x_scale must be float32, got ",
              x_scale_in.scalar_type());
  TORCH_CHECK(w_scale_in.scalar_type() == at::kFloat, fn, ": w_scale must be float32, got ",
              w_scale_in.scalar_type());
  TORCH_CHECK(x_scale_in.dim() == 1 && x_scale_in.size(0) == M, fn, ": x_scale must have shape (M,) = (", M,
              ",), got ", shape_str(x_scale_in.sizes()));
  TORCH_CHECK(w_scale_in.dim() == 1 && w_scale_in.size(0) == N, fn, ": w_scale must have shape (N,) = (", N,
              ",), got ", shape_str(w_scale_in.sizes()));
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, fn,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  at::Tensor bias;
  if (present(bias_in)) {
    check_cpu(fn, "bias", *bias_in);
    TORCH_CHECK(bias_in->scalar_type() == at::kFloat, fn, ": bias must be float32, got ", bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, fn, ": bias must have shape (N,) = (", N, ",), got ",
                shape_str(bias_in->sizes()));
    bias = bias_in->contiguous();
  }
  const Isa isa = choose_isa(fn);
  const at::Tensor xq = rows(xq_in), wq = packed ? wq_in.contiguous() : rows(wq_in);
  const at::Tensor w_scale = w_scale_in.contiguous();  // x_scale is read with its stride (0 when expanded)
  at::Tensor y = at::empty({M, N}, xq.options().dtype(out_dtype));
  if (M == 0 || N == 0) return y;
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* xs = x_scale_in.data_ptr<float>();
  const int64_t xss = x_scale_in.stride(0);
  const float* ws = w_scale.data_ptr<float>();
  switch (out_dtype) {
    case at::kHalf: run_gemm(isa, xq, wq, N, Epilogue<at::Half>{xs, xss, ws, b, y.data_ptr<at::Half>(), N}); break;
    case at::kBFloat16:
      run_gemm(isa, xq, wq, N, Epilogue<at::BFloat16>{xs, xss, ws, b, y.data_ptr<at::BFloat16>(), N});
      break;
    default: run_gemm(isa, xq, wq, N, Epilogue<float>{xs, xss, ws, b, y.data_ptr<float>(), N}); break;
  }
  return y;
}

std::string int8_isa_cpu() { return isa_name(choose_isa("int8_isa_cpu")); }

}  // namespace mltoolkit
