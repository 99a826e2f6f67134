// CUDA int4 weight-only linear and dequantize. Contract: csrc/int4_linear.h; launchers: quant_launch.h; tensor glue:
// quant_cuda.cpp. No torch headers here (compile time).
//
// Format: packed (N, K/2) uint8, q[2j] in the low nibble of byte j; scales / zeros (N, K/G) float32; the weight is
// w' = (q - 8) * scale + zero. K is a multiple of G >= 32, so a 16-byte run of a packed row (32 values) is 16-byte
// aligned (given a 16-byte aligned base: the glue's packed is contiguous and aligned) and lies inside one group.
//
// Small M (decode, M <= 16; also any M for float32 x or when the tiled path refuses): memory bound, the packed weight
// streamed once. A warp owns R output rows; each lane loads 16 bytes (32 values) of each row per step, the warp 512
// contiguous bytes per row. x (up to 16 rows) sits in shared memory in float32, in slabs of k. The per-weight work is
// cut to the bone: instead of dequantizing, y = sum over 32-value chunks of s * (sum_k q_k x_k) + (z - 8 s) * (sum_k
// x_k). The integers q reach the FMA without a conversion: a nibble at bit position p of a word, OR-ed into the
// bits of 1.0f, gives 1 + q * 2^(p - 23) exactly, and subtracting 1 leaves q * 2^(p - 23) exactly; x is stored in
// shared memory pre-scaled by 2^(23 - p) (exact), so each product is q * x rounded once. Positions p in {0, 4, 8, 12,
// 16} (the word, then the word >> 12) keep every nibble inside the mantissa: one LOP3 + one FADD per weight, shared
// by the M rows of x, then one FFMA per row of x. The chunk sums of x come from shared memory too. Lanes end with
// a partial y; a warp-shuffle reduction finishes each output. Accumulation is float32 throughout.
// Limits of the pre-scaling: |x| below 2^104 (float32 and float16 x always; bfloat16 x near float32's range
// overflows) and products above float32's subnormal range (|x| > ~1e-31) keep every digit.
//
// Tensor-core GEMV (fp16 / bf16 x, M <= 8, G >= 128, sm_80+, x rows 16-byte aligned; the default there): the
// same stream of the packed weight, but the multiply-adds run on the tensor cores (mma.sync m16n8k16, x as the
// 16 x 8 B operand, its columns beyond M zero), which leaves ~2 instructions per weight on the ALUs instead of ~4.
// A warp owns 16 rows and one 128-k block at a time; the 8 warps of a CTA split K (blocks w, w + 8, ...) and add
// their partial sums through shared memory at the end. In a block, lane (g, t) (g = lane / 4, t = lane % 4) loads
// 16 bytes of rows g and g + 8 (32 values each, k = 32t .. 32t + 31 of the block) and, for column g < M, the same
// 32 values of x. Within a block the tensor cores see k permuted: every word j (8 values) of a lane feeds two
// m16n8k16 tiles, pairing nibbles (i, i + 4) into one register (one shift + one LOP3: (w >> 4i) & 0x000F000F OR
// the bits of 128.0 bf16 / 1024.0 fp16 give base + q in each half, exactly, and one HSUB2 of base + 8 leaves q - 8),
// and x's pairs are permuted to match (PRMT). Any permutation of k, the same for A and B, leaves each tile's dot
// products unchanged. Per block a second mma with A = 1 gives each column's sum of x over the block, so
// y += scale * sum((q - 8) x) + zero * sum(x), in float32.
//
// Large M (fp16 / bf16 x, sm_80+): tiles of 128 x 128 outputs, k-tiles of 64, 8 warps of 64 x 32 with mma.sync
// m16n8k16 (fp32 accumulation). A 3-stage cp.async ring brings x tiles, raw packed tiles and their scales / zeros
// into shared memory; each k-tile is dequantized once per CTA into a swizzled fp16 / bf16 weight tile (w' rounded
// to x's dtype: the tensor cores' operand type), then ldmatrix + mma as in conv.cu. Ragged M / N / K edges are
// zero-filled (x rows of zero, and weights of zero: scale = zero = 0).
//
// dequantize_int4: one thread per 4 packed bytes (8 values, two 16-byte stores), IEEE product then add (no FMA, no
// flush to zero): bit-identical with the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mma_ptx.h"
#include "quant_launch.h"
#include "quant_math.cuh"
#include "smem_limit.h"

namespace mltoolkit::cuda_quant {
namespace {

using namespace mltoolkit::ptx;  // smem_u32, cp_async*, ldsm_x4, mma16816, pack2

// ------------------------------------------------------------------------------------------------------------------
// dequantize_int4

__global__ void __launch_bounds__(256) _dequantize_int4_kernel(const uint32_t* __restrict__ packed,
                                                               const float* __restrict__ scales,
                                                               const float* __restrict__ zeros,
                                                               float* __restrict__ out, int64_t words, int64_t K,
                                                               int G) {
  const int64_t words_per_row = K / 8;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / words_per_row;
    const int64_t k = (i - n * words_per_row) * 8;
    const int64_t gi = n * (K / G) + k / G;
    const float s = scales[gi], z = zeros[gi];
    const uint32_t w = packed[i];
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const float q = static_cast<float>(static_cast<int>((w >> (4 * u)) & 15u) - 8);
      v[u] = ieee::add(ieee::mul(q, s), z);
    }
    float4* o = reinterpret_cast<float4*>(out + n * K + k);  // K % 32 == 0 and a 16-byte aligned base
    o[0] = make_float4(v[0], v[1], v[2], v[3]);
    o[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Small-M path.

struct GemvArgs {
  const void* x;
  int64_t ldx;
  int M;  // rows of x in this launch (the launcher offsets x and y for launches beyond 65535 row blocks)
  const uint8_t* packed;
  const float* scales;
  const float* zeros;
  const void* bias;
  void* y;
  int N, K, G;
  int slab;  // k values of x per shared-memory slab (a multiple of 32)
};

constexpr int kGemvWarps = 8;

// Bit position of value u (0..7) of a packed word when read from the word (u < 5) or from the word >> 12 (u >= 5).
__host__ __device__ constexpr int nib_pos(int u) { return u < 5 ? 4 * u : 4 * u - 12; }

// Shared memory of a slab: xs[MT][8][nc] float4 (value i of chunk c at [m][i / 4][c].(i % 4), scaled by
// 2^(23 - nib_pos(i % 8))), then xsum[MT][nc] float (unscaled chunk sums). The [i / 4][c] order makes the lanes of
// a warp, which read consecutive chunks, read consecutive 16-byte words: conflict-free.
template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32) _int4_gemv_kernel(const GemvArgs a) {
  constexpr int R = MT >= 16 ? 2 : 4;  // output rows per warp: x loaded from shared memory serves R rows
  extern __shared__ __align__(128) unsigned char smem[];
  float4* xs = reinterpret_cast<float4*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m_base = blockIdx.y * MT;
  const int mrows = min(MT, a.M - m_base);
  const int n_base = (blockIdx.x * kGemvWarps + warp) * R;
  const int K = a.K, N = a.N;
  const int64_t row_bytes = K / 2;
  const int groups = K / a.G;
  const int max_nc = a.slab / 32;
  float* xsum = reinterpret_cast<float*>(xs + MT * 8 * max_nc);
  const T* x = static_cast<const T*>(a.x);

  const uint4* prow[R];
  bool rok[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n_base + r;
    rok[r] = n < N;
    prow[r] = reinterpret_cast<const uint4*>(a.packed + (rok[r] ? static_cast<int64_t>(n) * row_bytes : 0));
  }
  float yacc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) yacc[r][m] = 0.f;
  }

  // The weight chunk a lane works on next, fetched one step ahead (the first one of a slab before the slab's x is
  // staged): two 16-byte loads per row in flight per lane.
  uint4 wv[R];
  float sc[R], zc[R];
  auto fetch = [&](int64_t cg, bool live) {  // cg: chunk index in the row
    const int g = static_cast<int>(cg * 32 / a.G);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (live && rok[r]) {
        wv[r] = __ldcs(prow[r] + cg);  // streamed once: do not keep it in L1
        const int64_t gi = static_cast<int64_t>(n_base + r) * groups + g;
        sc[r] = __ldg(a.scales + gi);
        zc[r] = __ldg(a.zeros + gi);
      } else {
        wv[r] = make_uint4(0, 0, 0, 0);
        sc[r] = zc[r] = 0.f;
      }
    }
  };

  for (int s0 = 0; s0 < K; s0 += a.slab) {
    const int nc = min(a.slab, K - s0) / 32;  // chunks of 32 values in this slab (K % 32 == 0)
    fetch(s0 / 32 + lane, lane < nc);
    __syncthreads();  // every warp is done reading the previous slab
    // Stage x: warp w takes chunks w, w + 8, ...; a lane one value; kU chunks' loads in flight before their sums.
    constexpr int kU = 8;
    for (int idx0 = warp; idx0 < MT * nc; idx0 += kGemvWarps * kU) {
      float v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int idx = idx0 + u * kGemvWarps;
        v[u] = 0.f;
        if (idx < MT * nc) {
          const int m = idx / nc, c = idx - m * nc;
          if (m < mrows) v[u] = to_float(x[static_cast<int64_t>(m_base + m) * a.ldx + s0 + c * 32 + lane]);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int idx = idx0 + u * kGemvWarps;
        if (idx >= MT * nc) break;  // uniform across the warp
        const int m = idx / nc, c = idx - m * nc;
        const float total = warp_sum(v[u]);
        if (lane == 0) xsum[m * nc + c] = total;
        // 2^(23 - p) as a float: exponent field 127 + 23 - p.
        const float scaled = v[u] * __int_as_float((150 - nib_pos(lane & 7)) << 23);
        reinterpret_cast<float*>(xs + (m * 8 + (lane >> 2)) * nc + c)[lane & 3] = scaled;
      }
    }
    __syncthreads();
    for (int c = lane; c < nc; c += 32) {
      uint4 w_now[R];
      float s_now[R], z_now[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w_now[r] = wv[r];
        s_now[r] = sc[r];
        z_now[r] = zc[r];
      }
      fetch(s0 / 32 + c + 32, c + 32 < nc);
      float part[R][MT];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < MT; ++m) part[r][m] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // float4 j of the chunk: values 4j .. 4j + 3 = nibbles of word j / 2
        float f[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t word = (j >> 1) == 0   ? w_now[r].x
                                : (j >> 1) == 1 ? w_now[r].y
                                : (j >> 1) == 2 ? w_now[r].z
                                                : w_now[r].w;
          const uint32_t hi = word >> 12;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int u = (j & 1) * 4 + e;
            const uint32_t src = u < 5 ? word : hi;
            f[r][e] = __uint_as_float((src & (15u << nib_pos(u))) | 0x3f800000u) - 1.f;
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float4 xv = xs[(m * 8 + j) * nc + c];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            part[r][m] = fmaf(f[r][0], xv.x, part[r][m]);
            part[r][m] = fmaf(f[r][1], xv.y, part[r][m]);
            part[r][m] = fmaf(f[r][2], xv.z, part[r][m]);
            part[r][m] = fmaf(f[r][3], xv.w, part[r][m]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float xsm = xsum[m * nc + c];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          yacc[r][m] = fmaf(s_now[r], part[r][m], fmaf(z_now[r] - 8.f * s_now[r], xsm, yacc[r][m]));
        }
      }
    }
  }

  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n_base + r;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = warp_sum(yacc[r][m]);
      if (lane == 0 && rok[r] && m < mrows) {
        const float b = bias ? to_float(bias[n]) : 0.f;
        y[static_cast<int64_t>(m_base + m) * N + n] = from_float<T>(v + b);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Tensor-core GEMV path.

// The operands of the two tensor-core kernels (the GEMV ignores n_tiles).
struct MmaArgs {
  const void* x;
  int64_t ldx;
  const uint8_t* packed;
  const float* scales;
  const float* zeros;
  const void* bias;
  void* y;
  int M, N, K, G;
  int n_tiles;
};

MmaArgs mma_args(const Int4LinearParams& p, int n_tiles) {
  return MmaArgs{p.x, p.ldx, p.packed, p.scales, p.zeros, p.bias, p.y,
                 static_cast<int>(p.M), static_cast<int>(p.N), static_cast<int>(p.K), p.G, n_tiles};
}

constexpr int kTcWarps = 8;   // K-slices of a CTA's rows
constexpr int kTcMaxM = 16;   // rows of x: one n8 tile of the mma up to 8, two up to 16

// base + q in both halves of a 16-bit pair: 128 in bfloat16 (spacing 1 in [128, 256)), 1024 in float16.
template <typename T>
__device__ __forceinline__ uint32_t nib_base_bits() {
  return std::is_same_v<T, __half> ? 0x64006400u : 0x43004300u;
}

// Values i and i + 4 (i < 4) of a packed word as a pair of T holding q - 8 exactly (low half: value i).
template <typename T>
__device__ __forceinline__ uint32_t nib_pair(uint32_t w, int i) {
  const uint32_t bits = ((w >> (4 * i)) & 0x000F000Fu) | nib_base_bits<T>();
  uint32_t out;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&bits), __float2half2_rn(1032.f));
    out = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&bits), __float2bfloat162_rn(136.f));
    out = *reinterpret_cast<const uint32_t*>(&v);
  }
  return out;
}

// Word j (0..3) of a 16-byte weight load (j is a compile-time constant once the loops unroll).
__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// One pipeline stage of the tensor-core GEMV: a 128-k block of RT 16-row tiles (rows g and g + 8 of each), 16 bytes
// of packed weight per row, and the groups' scales and zeros.
template <int RT>
struct TcStage {
  uint4 w[RT][2];
  float sc[RT][2], zc[RT][2];
};

// The end of both tensor-core GEMVs: red[warp][(r * MT + mt) * 4 + c][lane] holds each warp's C fragments (row tile
// r, x tile mt, register c); the CTA's threads add them over the warps in warp order, add the bias and store y.
template <typename T, int RT, int MT>
__device__ __forceinline__ void tc_gemv_store(const float (&red)[kTcWarps][RT * MT * 4][32], const MmaArgs& a,
                                              int n0) {
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.y);
  for (int i = threadIdx.x; i < RT * MT * 4 * 32; i += kTcWarps * 32) {
    const int f = i >> 5, l = i & 31;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kTcWarps; ++w) v += red[w][f][l];
    const int r = f / (MT * 4), mt = (f / 4) % MT, c = f & 3;
    const int n = n0 + 16 * r + (l >> 2) + 8 * (c >> 1), m = 8 * mt + 2 * (l & 3) + (c & 1);
    if (n < a.N && m < a.M) {
      if (bias) v += to_float(bias[n]);
      out[static_cast<int64_t>(m) * a.N + n] = from_float<T>(v);
    }
  }
}

// y (M <= 16, N) = x (M, K) @ dequant(packed)^T (+ bias) on the tensor cores, for decoding. A CTA owns 16 * RT rows of
// the weight; its 8 warps split K in 128-k blocks (warp w takes blocks w, w + 8, ...) and meet in shared memory at
// the end. Per block a lane loads 16 bytes of each of its two rows (g, g + 8) of each row tile: 32 k values, which
// the mma reads in a permuted k order (x is permuted alike, so the dot products are unchanged). The weight is the
// mma's A operand (16 rows x 16 k), x its B operand (16 k x 8 columns = rows of x; MT = 2 tiles up to 16 rows), so
// the nibbles go straight from registers into the tensor cores. scale * sum(q x) + zero * sum(x): sum(x) per block
// comes from an mma with an all-ones A, shared by the row tiles. The loads run one stage ahead of the math (two
// register stages), so a warp's weight stream never waits for its own arithmetic; the first kernel loaded four
// blocks, then computed them, and left the memory idle meanwhile (ncu, 2026-11-27: 49% of DRAM bandwidth at M = 1).
template <typename T, int RT, int MT>
__global__ void __launch_bounds__(kTcWarps * 32, 2) _int4_tc_gemv_kernel(const MmaArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kFrags = RT * MT * 4;  // accumulator registers per lane
  __shared__ float red[kTcWarps][kFrags][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16 * RT;
  const int N = a.N;
  const int blocks = a.K / 128;
  const int groups = a.K / a.G;
  const int group_shift = a.G == 256 ? 1 : 0;  // G is 128 or 256
  const int64_t row_bytes = a.K / 2;
  bool row_ok[RT][2];
  const uint8_t* prow[RT][2];
  int64_t grow[RT][2];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + 16 * r + g + 8 * h;
      row_ok[r][h] = n < N;
      const int64_t safe = row_ok[r][h] ? n : 0;
      prow[r][h] = a.packed + safe * row_bytes + 16 * t;
      grow[r][h] = safe * groups;
    }
  }
  bool col_ok[MT];
  const T* xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = 8 * mt + g;
    col_ok[mt] = m < a.M;
    xrow[mt] = static_cast<const T*>(a.x) + (col_ok[mt] ? static_cast<int64_t>(m) * a.ldx : 0) + 32 * t;
  }
  uint32_t ones[4];
  const uint32_t one2 = std::is_same_v<T, __half> ? 0x3c003c00u : 0x3f803f80u;
#pragma unroll
  for (int i = 0; i < 4; ++i) ones[i] = one2;

  // Block b into a stage (past the last block: zeros, and no loads).
  auto load = [&](TcStage<RT>& s, int b) {
    const bool live = b < blocks;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool ok = live && row_ok[r][h];
        s.w[r][h] = ok ? __ldcs(reinterpret_cast<const uint4*>(prow[r][h] + static_cast<int64_t>(b) * 64))
                       : make_uint4(0, 0, 0, 0);
        const int64_t gi = grow[r][h] + (live ? (b >> group_shift) : 0);
        s.sc[r][h] = ok ? __ldg(a.scales + gi) : 0.f;
        s.zc[r][h] = ok ? __ldg(a.zeros + gi) : 0.f;
      }
    }
  };
  // C fragments: rows g, g, g + 8, g + 8 of each row tile; columns (rows of x) 2t, 2t + 1, 2t, 2t + 1 of each x tile.
  float y[RT][MT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) y[r][mt][c] = 0.f;
  auto compute = [&](const TcStage<RT>& s, int b) {
    float acc[RT][MT][4], xsum[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        xsum[mt][c] = 0.f;
#pragma unroll
        for (int r = 0; r < RT; ++r) acc[r][mt][c] = 0.f;
      }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // x values 0..7 of word j: .x = (0, 1), .y = (2, 3), .z = (4, 5), .w = (6, 7); zero in rows of x >= M.
      // x is small and read by every CTA: an L1 / L2 hit, loaded here rather than staged (registers).
      uint4 xj[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        xj[mt] = col_ok[mt] ? __ldg(reinterpret_cast<const uint4*>(xrow[mt] + static_cast<int64_t>(b) * 128) + j)
                            : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Tile h of word j: logical k (2t, 2t + 1) = values (2h, 2h + 4), (2t + 8, 2t + 9) = (2h + 1, 2h + 5).
        uint32_t b0r[MT], b1r[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t lo = h == 0 ? xj[mt].x : xj[mt].y, hi = h == 0 ? xj[mt].z : xj[mt].w;
          b0r[mt] = __byte_perm(lo, hi, 0x5410);
          b1r[mt] = __byte_perm(lo, hi, 0x7632);
          mma16816<T>(xsum[mt], ones, b0r[mt], b1r[mt]);
        }
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const uint32_t w0 = word_of(s.w[r][0], j), w8 = word_of(s.w[r][1], j);
          const uint32_t frag[4] = {nib_pair<T>(w0, 2 * h), nib_pair<T>(w8, 2 * h), nib_pair<T>(w0, 2 * h + 1),
                                    nib_pair<T>(w8, 2 * h + 1)};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma16816<T>(acc[r][mt], frag, b0r[mt], b1r[mt]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          y[r][mt][c] = fmaf(s.sc[r][c >> 1], acc[r][mt][c], fmaf(s.zc[r][c >> 1], xsum[mt][c], y[r][mt][c]));
  };

  // Two register stages, the loads one block ahead of the math.
  constexpr int kStep = kTcWarps;
  TcStage<RT> s0, s1;
  int b = warp;
  load(s0, b);
  while (b < blocks) {
    load(s1, b + kStep);
    compute(s0, b);
    b += kStep;
    if (b >= blocks) break;
    load(s0, b + kStep);
    compute(s1, b);
    b += kStep;
  }

#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[warp][(r * MT + mt) * 4 + c][lane] = y[r][mt][c];
  __syncthreads();
  tc_gemv_store<T, RT, MT>(red, a, n0);
#else
  __trap();  // never launched: tc_gemv_ok refuses compute capability below 8.0
#endif
}

// ------------------------------------------------------------------------------------------------------------------
// Large-M tensor-core path.

constexpr int kTBM = 128, kTBN = 128, kTBK = 64, kTStages = 3, kTThreads = 256;
constexpr int kTWarpsN = 4, kTWM = 64, kTWN = 32, kTMI = kTWM / 16, kTNI = kTWN / 8;
constexpr int kXStageBytes = kTBM * kTBK * 2;  // 16 KB: 128 rows of 128 bytes
constexpr int kRawStageBytes = kTBN * kTBK / 2;  // 4 KB: 128 rows of 32 bytes
constexpr int kSzStageBytes = kTBN * 2 * 2 * 4;  // 2 KB: per row, per 32-value half of the k-tile, (scale, zero)
constexpr int kWTileBytes = kTBN * kTBK * 2;     // 16 KB
constexpr int kTSmem = kTStages * (kXStageBytes + kRawStageBytes + kSzStageBytes) + kWTileBytes;  // 82 KB

__device__ __forceinline__ int tswz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

template <typename T>
__global__ void __launch_bounds__(kTThreads, 2) _int4_mma_kernel(const MmaArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* s_x = smem;
  unsigned char* s_raw = s_x + kTStages * kXStageBytes;
  float* s_sz = reinterpret_cast<float*>(s_raw + kTStages * kRawStageBytes);
  unsigned char* s_w = reinterpret_cast<unsigned char*>(s_sz) + kTStages * kSzStageBytes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kTWarpsN, wn = warp % kTWarpsN;
  const int m0 = static_cast<int>(blockIdx.x / a.n_tiles) * kTBM;
  const int n0 = static_cast<int>(blockIdx.x % a.n_tiles) * kTBN;
  const int M = a.M, N = a.N, K = a.K;
  const T* x = static_cast<const T*>(a.x);
  const int groups = K / a.G;

  // x copies: 4 chunks of 8 values per thread per stage; rows (tid + 256 j) / 8, chunk tid % 8.
  const int xchunk = tid & 7;
  const T* xrow[4];
  bool xok[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int m = m0 + (tid + j * kTThreads) / 8;
    xok[j] = m < M;
    xrow[j] = x + (xok[j] ? static_cast<int64_t>(m) * a.ldx : 0);
  }
  // Raw weight copy and dequantization: one 16-byte half-row (32 values) per thread, row tid / 2, half tid % 2.
  const int wr = tid >> 1, wh = tid & 1;
  const int wn_row = n0 + wr;
  const bool wok = wn_row < N;
  const uint8_t* wsrc = a.packed + (wok ? static_cast<int64_t>(wn_row) * (K / 2) : 0);
  const int64_t gbase = (wok ? static_cast<int64_t>(wn_row) : 0) * groups;

  const int iters = (K + kTBK - 1) / kTBK;
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kTBK;
    const int kx = k0 + xchunk * 8;
    unsigned char* sx = s_x + stage * kXStageBytes;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool ok = xok[j] && kx < K;  // K % 32 == 0: a chunk of 8 is all inside or all outside
      cp_async16(smem_u32(sx + tswz((tid + j * kTThreads) / 8, xchunk)), ok ? xrow[j] + kx : x, ok);
    }
    const int kw = k0 + wh * 32;
    const bool ok = wok && kw < K;
    cp_async16(smem_u32(s_raw + stage * kRawStageBytes + wr * 32 + wh * 16), ok ? wsrc + kw / 2 : a.packed, ok);
    const int64_t gi = gbase + (ok ? kw / a.G : 0);
    float* sz = s_sz + stage * (kSzStageBytes / 4) + (wr * 2 + wh) * 2;
    cp_async4(smem_u32(sz), a.scales + gi, ok);  // zero-filled (scale = zero = 0: w' = 0) outside
    cp_async4(smem_u32(sz + 1), a.zeros + gi, ok);
  };

  float acc[kTMI][kTNI][4];
#pragma unroll
  for (int mi = 0; mi < kTMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kTNI; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
  }
#pragma unroll
  for (int st = 0; st < kTStages - 1; ++st) {
    if (st < iters) load_stage(st, st);
    cp_async_commit();
  }
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_half = lane >> 4;
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_half = (lane >> 3) & 1;
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kTStages - 2>();
    __syncthreads();  // stage `it` landed for all; every warp is done with s_w and with the stage refilled next
    if (it + kTStages - 1 < iters) load_stage((it + kTStages - 1) % kTStages, it + kTStages - 1);
    cp_async_commit();
    const int stage = it % kTStages;
    {  // dequantize this thread's 32 values into s_w (row wr, values 32 wh .. 32 wh + 31 = chunks 4 wh .. 4 wh + 3)
      const uint4 raw = *reinterpret_cast<const uint4*>(s_raw + stage * kRawStageBytes + wr * 32 + wh * 16);
      const float* sz = s_sz + stage * (kSzStageBytes / 4) + (wr * 2 + wh) * 2;
      const float s = sz[0], z = sz[1];
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {  // one word = 8 values = one 16-byte chunk of s_w
        uint32_t o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // q - 8 exactly: the nibble in the low mantissa bits of 2^23, minus 2^23 + 8.
          const float q0 = __uint_as_float(((words[cc] >> (8 * e)) & 15u) | 0x4b000000u) - 8388616.f;
          const float q1 = __uint_as_float(((words[cc] >> (8 * e + 4)) & 15u) | 0x4b000000u) - 8388616.f;
          o[e] = pack2<T>(fmaf(q0, s, z), fmaf(q1, s, z));
        }
        *reinterpret_cast<uint4*>(s_w + tswz(wr, wh * 4 + cc)) = make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
    __syncthreads();  // s_w complete
    const unsigned char* sx = s_x + stage * kXStageBytes;
#pragma unroll
    for (int kk = 0; kk < kTBK / 16; ++kk) {
      uint32_t af[kTMI][4], bf[kTNI / 2][4];
#pragma unroll
      for (int mi = 0; mi < kTMI; ++mi) {
        ldsm_x4(af[mi], smem_u32(sx + tswz(wm * kTWM + mi * 16 + a_row, 2 * kk + a_half)));
      }
#pragma unroll
      for (int nj = 0; nj < kTNI / 2; ++nj) {
        ldsm_x4(bf[nj], smem_u32(s_w + tswz(wn * kTWN + nj * 16 + b_row, 2 * kk + b_half)));
      }
#pragma unroll
      for (int mi = 0; mi < kTMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kTNI; ++ni) {
          mma16816<T>(acc[mi][ni], af[mi], bf[ni / 2][(ni & 1) * 2], bf[ni / 2][(ni & 1) * 2 + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const int g = lane >> 2, t = lane & 3;
  const bool pair_ok = (N & 1) == 0;
#pragma unroll
  for (int ni = 0; ni < kTNI; ++ni) {
    const int col = n0 + wn * kTWN + ni * 8 + 2 * t;
    if (col >= N) continue;
    const bool two = col + 1 < N;
    const float b0 = bias ? to_float(bias[col]) : 0.f;
    const float b1 = bias && two ? to_float(bias[col + 1]) : 0.f;
#pragma unroll
    for (int mi = 0; mi < kTMI; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * kTWM + mi * 16 + g + 8 * h;
        if (row >= M) continue;
        store2<T>(y, static_cast<int64_t>(row) * N + col, acc[mi][ni][2 * h] + b0, acc[mi][ni][2 * h + 1] + b1, two,
                  pair_ok);
      }
    }
  }
#else
  __trap();  // never launched: int4_linear_path refuses the tensor-core path below compute capability 8.0
#endif
}

// ------------------------------------------------------------------------------------------------------------------
// Launchers.

constexpr int kGemvXBytes = 64 * 1024;  // float32 x per slab (plus 1/32 of it for the chunk sums)

template <typename T, int MT>
LaunchStatus launch_gemv(const Int4LinearParams& p, cudaStream_t stream) {
  constexpr int R = MT >= 16 ? 2 : 4;
  auto kernel = _int4_gemv_kernel<T, MT>;
  const int cap = kGemvXBytes / (4 * MT);  // a multiple of 1024
  const int slab = static_cast<int>(std::min<int64_t>(cap, p.K));
  const int smem = MT * slab * 4 + MT * (slab / 32) * 4;
  LaunchStatus st = cuda_util::raise_smem_limit<LaunchStatus>(
      kernel, smem, "int4_weight_only_linear: the small-M kernel needs more shared memory than this GPU offers");
  if (!st.ok()) return st;
  const int64_t col_blocks = cdiv(p.N, kGemvWarps * R);
  if (col_blocks > 0x7fffffff) return refuse("int4_weight_only_linear: N too large for one grid");
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t max_rows = static_cast<int64_t>(65535) * MT;  // grid.y limit: later rows in further launches
  for (int64_t r0 = 0; r0 < p.M; r0 += max_rows) {
    const int64_t rows = std::min<int64_t>(max_rows, p.M - r0);
    GemvArgs a;
    a.x = static_cast<const unsigned char*>(p.x) + r0 * p.ldx * elem;
    a.ldx = p.ldx;
    a.M = static_cast<int>(rows);
    a.packed = p.packed;
    a.scales = p.scales;
    a.zeros = p.zeros;
    a.bias = p.bias;
    a.y = static_cast<unsigned char*>(p.y) + r0 * p.N * elem;
    a.N = static_cast<int>(p.N);
    a.K = static_cast<int>(p.K);
    a.G = p.G;
    a.slab = slab;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(cdiv(rows, MT)));
    kernel<<<grid, kGemvWarps * 32, smem, stream>>>(a);
    st = last_error();
    if (!st.ok()) return st;
  }
  return st;
}

template <typename T>
LaunchStatus launch_gemv_for_m(const Int4LinearParams& p, cudaStream_t stream) {
  if (p.M <= 1) return launch_gemv<T, 1>(p, stream);
  if (p.M <= 2) return launch_gemv<T, 2>(p, stream);
  if (p.M <= 4) return launch_gemv<T, 4>(p, stream);
  if (p.M <= 8) return launch_gemv<T, 8>(p, stream);
  return launch_gemv<T, 16>(p, stream);
}

template <typename T>
LaunchStatus launch_mma(const Int4LinearParams& p, cudaStream_t stream) {
  auto kernel = _int4_mma_kernel<T>;
  LaunchStatus st = cuda_util::raise_smem_limit<LaunchStatus>(
      kernel, kTSmem, "int4_weight_only_linear: the tensor-core kernel needs more shared memory than this GPU offers");
  if (!st.ok()) return st;
  const MmaArgs a = mma_args(p, static_cast<int>(cdiv(p.N, kTBN)));
  const int64_t blocks = cdiv(p.M, kTBM) * a.n_tiles;
  if (blocks > 0x7fffffff) return refuse("int4_weight_only_linear: too many output tiles for one grid");
  kernel<<<static_cast<unsigned>(blocks), kTThreads, kTSmem, stream>>>(a);
  return last_error();
}

bool tc_gemv_ok(const Int4LinearParams& p, const char** why) {
  const char* w = nullptr;
  if (p.dtype == DType::kFloat32) {
    w = "int4_weight_only_linear: the tensor-core GEMV takes float16 or bfloat16 x";
  } else if (p.cc_major < 8) {
    w = "int4_weight_only_linear: the tensor-core GEMV needs compute capability 8.0 or newer";
  } else if (p.M > kTcMaxM) {
    w = "int4_weight_only_linear: the tensor-core GEMV takes at most 16 rows of x";
  } else if (p.G < 128) {
    w = "int4_weight_only_linear: the tensor-core GEMV needs group_size 128 or 256";
  } else if (!aligned(p.x, 16) || (p.ldx * 2) % 16 != 0) {
    w = "int4_weight_only_linear: the tensor-core GEMV needs x's base and row stride 16-byte aligned";
  }
  if (why) *why = w;
  return w == nullptr;
}

// Up to 8 rows of x: two 16-row tiles per CTA (x and the sum(x) mma shared by both, half the CTAs: one wave on an
// H100 for N = 8192); up to 16: two x tiles and one row tile (registers: 116 against 128 with two row tiles, where two
// blocks per stage spilled).
template <typename T>
LaunchStatus launch_tc_gemv(const Int4LinearParams& p, cudaStream_t stream) {
  const MmaArgs a = mma_args(p, 0);
  if (p.M <= 8) {
    _int4_tc_gemv_kernel<T, 2, 1><<<static_cast<unsigned>(cdiv(p.N, 32)), kTcWarps * 32, 0, stream>>>(a);
  } else {
    _int4_tc_gemv_kernel<T, 1, 2><<<static_cast<unsigned>(cdiv(p.N, 16)), kTcWarps * 32, 0, stream>>>(a);
  }
  return last_error();
}

bool mma_ok(const Int4LinearParams& p, const char** why) {
  const char* w = nullptr;
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  if (p.dtype == DType::kFloat32) {
    w = "int4_weight_only_linear: the tensor-core path takes float16 or bfloat16 x";
  } else if (p.cc_major < 8) {
    w = "int4_weight_only_linear: the tensor-core path needs compute capability 8.0 or newer";
  } else if (!aligned(p.x, 16) || (p.ldx * elem) % 16 != 0) {
    w = "int4_weight_only_linear: the tensor-core path needs x's base and row stride 16-byte aligned";
  } else if (smem_optin() < kTSmem) {
    w = "int4_weight_only_linear: the tensor-core path needs 82 KB of shared memory per block";
  }
  if (why) *why = w;
  return w == nullptr;
}

}  // namespace

LaunchStatus dequantize_int4(const DequantParams& p, cudaStream_t stream) {
  if (p.N <= 0 || p.K <= 0) return LaunchStatus{};
  if (p.K % 32 != 0 || (p.G != 32 && p.G != 64 && p.G != 128 && p.G != 256) || p.K % p.G != 0) {
    return refuse("dequantize_int4: K must be a multiple of group_size (32, 64, 128 or 256)");
  }
  if (!aligned(p.packed, 4) || !aligned(p.out, 16)) return refuse("dequantize_int4: misaligned packed or out");
  const int64_t words = p.N * (p.K / 8);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(cdiv(words, 256), 1 << 20));
  _dequantize_int4_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<const uint32_t*>(p.packed), p.scales, p.zeros,
                                                      p.out, words, p.K, p.G);
  return last_error();
}

Int4Path int4_linear_path(const Int4LinearParams& p, const char** why) {
  if (why) *why = nullptr;
  if (p.path == Int4Path::kMma) return mma_ok(p, why) ? Int4Path::kMma : Int4Path::kAuto;
  if (p.path == Int4Path::kTcGemv) return tc_gemv_ok(p, why) ? Int4Path::kTcGemv : Int4Path::kAuto;
  if (p.path == Int4Path::kGemv) return Int4Path::kGemv;
  if (p.M <= kTcMaxM && tc_gemv_ok(p, nullptr)) return Int4Path::kTcGemv;
  if (p.M <= 16) return Int4Path::kGemv;
  return mma_ok(p, nullptr) ? Int4Path::kMma : Int4Path::kGemv;
}

LaunchStatus int4_linear(const Int4LinearParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return LaunchStatus{};
  if (p.K <= 0 || p.K % 32 != 0 || (p.G != 32 && p.G != 64 && p.G != 128 && p.G != 256) || p.K % p.G != 0) {
    return refuse("int4_weight_only_linear: K must be a positive multiple of group_size (32, 64, 128 or 256)");
  }
  if (p.M > 0x7fffffff - 256 || p.N > 0x7fffffff - 256 || p.K > 0x7fffffff - 256) {
    return refuse("int4_weight_only_linear: M, N and K must be below 2^31");
  }
  if (!aligned(p.packed, 16)) return refuse("int4_weight_only_linear: packed must be 16-byte aligned");
  const char* why = nullptr;
  const Int4Path path = int4_linear_path(p, &why);
  if (path == Int4Path::kAuto) return refuse(why);
  return by_dtype(p.dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return launch_gemv_for_m<T>(p, stream);
    } else {
      if (path == Int4Path::kMma) return launch_mma<T>(p, stream);
      if (path == Int4Path::kTcGemv) return launch_tc_gemv<T>(p, stream);
      return launch_gemv_for_m<T>(p, stream);
    }
  });
}

}  // namespace mltoolkit::cuda_quant
