// CUDA int8 dynamic quantization: the per-row quantizer and the int8 x int8 linear with exact int32 accumulation and
// a fused dequantize epilogue. Contract: csrc/int8_linear.h; launchers: quant_launch.h; tensor glue: quant_cuda.cpp.
// No torch headers here (compile time).
//
// quantize_rows: one warp per row, two passes (absmax, then quantize; the second pass re-reads the row from L1/L2),
// 16-byte loads when the rows allow them. IEEE division and rounding half to even, as the contract says.
//
// int8_linear, tensor-core path (sm_80+), after CUTLASS's sm80 int8 GEMMs: a CTA computes a BM x BN tile of y with
// mma.sync.m16n8k32.s8 (int32 accumulation) fed by ldmatrix from XOR-swizzled shared memory (128-byte rows of k,
// chunk ^ (row & 7): conflict-free ldmatrix and cp.async); a STAGES-deep cp.async ring keeps the next k-tiles in
// flight. Ragged M / N edges are zero-filled by cp.async's src-size operand (zero contributes nothing to any sum) and
// never stored. Two configurations: 128 x 256 (8 warps of 64 x 64, 3 stages, 144 KB) when it fills the GPU, else
// 64 x 128 (4 warps of 32 x 64, 4 stages, 96 KB, also the one for 99 KB parts such as sm_86 / sm_89).
// Assumptions (checked by int8_linear_path, which falls back to dp4a otherwise): K % 16 == 0; xq and wq bases
// 16-byte aligned; row strides ldx, ldw multiples of 16 bytes. The weight is plain (N, K) rows (the CPU kernel's
// packed layout is unpacked by the Python layer before it gets here).
// Tensor-core GEMV (sm_80+, M <= 8, the tensor-core path's K and alignment rules; the default there): decode-sized
// batches stream the weight once instead of padding M to a 64-row tile (at M = 1 the tile path ran 32 CTAs for
// N = 4096, on a quarter of an H100). A warp owns 16 rows of y and one 64-k block at a time; the 8 warps of a CTA
// split K (blocks w, w + 8, ...) and add their int32 partial sums through shared memory (exact, so the result stays
// bit-identical). Lane (g, t) loads 16 bytes of weight rows g and g + 8 and, for column g < M, of x, all at
// k = 64 b + 16 t: its four words feed two mma.m16n8k32 tiles unchanged (words 0, 1 as the fragment's k groups 4t and
// 16 + 4t of the first tile, words 2, 3 of the second): k is permuted within the block, the same for A and B, which
// leaves each tile's dot products unchanged. No ALU work per weight at all.
//
// dp4a path (sm_61+; any K, stride, alignment): 64 x 64 tiles, 4 x 4 outputs per thread, k in steps of 32 bytes
// through padded shared memory, word loads when everything is 4-byte aligned, byte loads otherwise.
// Epilogue (both): y = ((float(acc) * x_scale[m]) * w_scale[n]) + bias[n] with IEEE operations (no FMA, no flush to
// zero), one rounding to out_dtype: bit-identical with the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "mma_ptx.h"
#include "quant_launch.h"
#include "quant_math.cuh"
#include "smem_limit.h"

namespace mltoolkit::cuda_quant {
namespace {

using namespace mltoolkit::ptx;  // smem_u32, cp_async*, ldsm_x4, mma16832_s8

// ------------------------------------------------------------------------------------------------------------------
// quantize_rows

__device__ __forceinline__ int8_t quantize_one(float v, float s) {
  float q = rintf(ieee::div(v, s));  // rintf: round half to even
  q = fminf(fmaxf(q, -127.f), 127.f);  // NaN -> -127 (unspecified by the contract, but an in-range value)
  return static_cast<int8_t>(static_cast<int>(q));
}

// VEC: rows read as 16-byte vectors (base and ldx aligned, K a multiple of the vector width; the glue's q is
// contiguous and 256-byte aligned, so q's rows take VW-byte stores).
template <typename T, bool VEC>
__global__ void __launch_bounds__(256) _quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                                             float* __restrict__ scale, int64_t rows, int64_t K,
                                                             int64_t ldx) {
  constexpr int VW = 16 / sizeof(T);  // elements per 16-byte vector
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (r >= rows) return;
  const T* xr = x + r * ldx;
  int8_t* qr = q + r * K;
  float amax = 0.f;
  if constexpr (VEC) {
    for (int64_t k = static_cast<int64_t>(lane) * VW; k < K; k += 32 * VW) {
      const uint4 v = *reinterpret_cast<const uint4*>(xr + k);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < VW; ++i) amax = ieee::max(amax, ieee::abs(to_float(e[i])));
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) amax = ieee::max(amax, ieee::abs(to_float(xr[k])));
  }
  amax = warp_max(amax);
  float s = ieee::div(amax, 127.f);
  if (!(s >= FLT_MIN)) s = 1.f;  // zero rows, subnormal scales (and NaN): scale 1
  if (lane == 0) scale[r] = s;
  if constexpr (VEC) {
    for (int64_t k = static_cast<int64_t>(lane) * VW; k < K; k += 32 * VW) {
      const uint4 v = *reinterpret_cast<const uint4*>(xr + k);
      const T* e = reinterpret_cast<const T*>(&v);
      int8_t o[VW];
#pragma unroll
      for (int i = 0; i < VW; ++i) o[i] = quantize_one(to_float(e[i]), s);
      if constexpr (VW == 8) {
        *reinterpret_cast<uint2*>(qr + k) = *reinterpret_cast<const uint2*>(o);
      } else {
        *reinterpret_cast<uint32_t*>(qr + k) = *reinterpret_cast<const uint32_t*>(o);
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) qr[k] = quantize_one(to_float(xr[k]), s);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Epilogue shared by both GEMM paths.

struct Epi {
  const float* x_scale;
  const float* w_scale;
  const float* bias;  // or nullptr
  void* y;
  int M, N;
};

// No bias: no add (x + 0.0f would turn -0.0 into +0.0, which the reference keeps).
__device__ __forceinline__ float epilogue(int acc, float xs, float ws, const float* bias, int n) {
  const float v = ieee::mul(ieee::mul(__int2float_rn(acc), xs), ws);
  return bias ? ieee::add(v, bias[n]) : v;
}

// Writes y[m, n], y[m, n + 1] (those inside) from two accumulators.
template <typename T>
__device__ __forceinline__ void store_pair(const Epi& e, int m, int n, int a0, int a1) {
  if (m >= e.M || n >= e.N) return;
  const float xs = e.x_scale[m];
  const bool two = n + 1 < e.N;
  const float v0 = epilogue(a0, xs, e.w_scale[n], e.bias, n);
  const float v1 = two ? epilogue(a1, xs, e.w_scale[n + 1], e.bias, n + 1) : 0.f;
  // y is contiguous with row length N: an even n is an aligned pair only when N is even.
  store2<T>(static_cast<T*>(e.y), static_cast<int64_t>(m) * e.N + n, v0, v1, two, (e.N & 1) == 0);
}

// The operands of the two tensor-core kernels (the GEMV ignores n_tiles).
struct MmaArgs {
  const int8_t* xq;
  const int8_t* wq;
  int64_t ldx, ldw;  // bytes
  int K;
  int n_tiles;
  Epi epi;
};

// ------------------------------------------------------------------------------------------------------------------
// Tensor-core GEMV path.

constexpr int kGemvWarps = 8;  // K-slices of a CTA's 16 rows
constexpr int kGemvRound = 4;  // 64-k blocks a warp loads at once (their loads in flight together)
constexpr int kGemvMaxM = 8;

template <typename T>
__global__ void __launch_bounds__(kGemvWarps * 32, 2) _int8_gemv_kernel(const MmaArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ int red[kGemvWarps][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int N = a.epi.N, K = a.K;
  const int blocks = (K + 63) / 64;
  const bool row_ok[2] = {n0 + g < N, n0 + g + 8 < N};
  const int8_t* wrow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) wrow[h] = a.wq + (row_ok[h] ? n0 + g + 8 * h : 0) * a.ldw + 16 * t;
  const bool col_ok = g < a.epi.M;
  const int8_t* xrow = a.xq + (col_ok ? g : 0) * a.ldx + 16 * t;

  int acc[4] = {0, 0, 0, 0};  // C fragment: rows g, g, g + 8, g + 8; columns 2t, 2t + 1, 2t, 2t + 1
  for (int b0 = warp; b0 < blocks; b0 += kGemvWarps * kGemvRound) {
    uint4 w[kGemvRound][2], xv[kGemvRound];
#pragma unroll
    for (int u = 0; u < kGemvRound; ++u) {
      const int b = b0 + u * kGemvWarps;
      const bool ok = b < blocks && 64 * b + 16 * t < K;  // K % 16 == 0: a 16-byte chunk is all in or all out
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        w[u][h] = ok && row_ok[h] ? __ldcs(reinterpret_cast<const uint4*>(wrow[h] + 64 * static_cast<int64_t>(b)))
                                  : make_uint4(0, 0, 0, 0);
      }
      xv[u] = ok && col_ok ? __ldg(reinterpret_cast<const uint4*>(xrow + 64 * static_cast<int64_t>(b)))
                           : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kGemvRound; ++u) {
      if (b0 + u * kGemvWarps >= blocks) break;  // uniform across the warp
      const uint32_t first[4] = {w[u][0].x, w[u][1].x, w[u][0].y, w[u][1].y};
      mma16832_s8(acc, first, xv[u].x, xv[u].y);
      const uint32_t second[4] = {w[u][0].z, w[u][1].z, w[u][0].w, w[u][1].w};
      mma16832_s8(acc, second, xv[u].z, xv[u].w);
    }
  }

#pragma unroll
  for (int c = 0; c < 4; ++c) red[warp][c][lane] = acc[c];
  __syncthreads();
  if (warp == 0) {
    int sum[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      sum[c] = 0;
#pragma unroll
      for (int w = 0; w < kGemvWarps; ++w) sum[c] += red[w][c][lane];
    }
    // y is (M, N): the pair (c, c + 1) of a row is one column apart in m, so each output is stored alone.
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int n = n0 + g + 8 * (c >> 1), m = 2 * t + (c & 1);
      if (n < N && m < a.epi.M) {
        const float v = epilogue(sum[c], a.epi.x_scale[m], a.epi.w_scale[n], a.epi.bias, n);
        static_cast<T*>(a.epi.y)[static_cast<int64_t>(m) * N + n] = from_float<T>(v);
      }
    }
  }
#else
  __trap();  // never launched: int8_linear_path refuses the tensor-core GEMV below compute capability 8.0
#endif
}

template <typename T>
LaunchStatus launch_gemv(const Int8LinearParams& p, const Epi& epi, cudaStream_t stream) {
  const MmaArgs a{p.xq, p.wq, p.ldx, p.ldw, static_cast<int>(p.K), 0, epi};
  _int8_gemv_kernel<T><<<static_cast<unsigned>(cdiv(p.N, 16)), kGemvWarps * 32, 0, stream>>>(a);
  return last_error();
}

// ------------------------------------------------------------------------------------------------------------------
// Tensor-core path.

template <int BM_, int BN_, int WARPS_M, int WARPS_N, int STAGES_>
struct MmaCfg {
  static constexpr int BM = BM_, BN = BN_, STAGES = STAGES_;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kBK = 128;  // bytes (= k values) per stage: 8 chunks of 16 bytes per row
  static constexpr int kWarpsN = WARPS_N;
  static constexpr int kWM = BM / WARPS_M, kWN = BN / WARPS_N;
  static constexpr int kMI = kWM / 16, kNI = kWN / 8;
  static constexpr int kStageBytes = (BM + BN) * kBK;
  static constexpr int kSmem = STAGES * kStageBytes;
  static constexpr int kAChunks = BM * 8 / kThreads;  // 16-byte copies per thread per stage
  static constexpr int kBChunks = BN * 8 / kThreads;
  static_assert(BM * 8 % kThreads == 0 && BN * 8 % kThreads == 0, "whole copies per thread");
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tile of whole ldmatrix.x4 fragments");
};
using CfgLarge = MmaCfg<128, 256, 2, 4, 3>;
using CfgSmall = MmaCfg<64, 128, 2, 2, 4>;

// Byte offset of a (row, 16-byte chunk) in a stage tile of 128-byte rows.
__device__ __forceinline__ int swz(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

template <typename T, typename C>
__global__ void __launch_bounds__(C::kThreads, 1) _int8_mma_kernel(const MmaArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  // Column tiles vary fastest: CTAs that run together share a row tile of xq and sweep the weight (L2 reuse).
  const int m0 = static_cast<int>(blockIdx.x / a.n_tiles) * C::BM;
  const int n0 = static_cast<int>(blockIdx.x % a.n_tiles) * C::BN;
  const int M = a.epi.M, N = a.epi.N, K = a.K;

  // Per copy slot: the row's base pointer (k-independent part of the address) and whether the row exists.
  const int8_t* arow[C::kAChunks];
  bool aok[C::kAChunks];
#pragma unroll
  for (int j = 0; j < C::kAChunks; ++j) {
    const int m = m0 + (tid + j * C::kThreads) / 8;
    aok[j] = m < M;
    arow[j] = a.xq + (aok[j] ? static_cast<int64_t>(m) * a.ldx : 0);
  }
  const int8_t* brow[C::kBChunks];
  bool bok[C::kBChunks];
#pragma unroll
  for (int j = 0; j < C::kBChunks; ++j) {
    const int n = n0 + (tid + j * C::kThreads) / 8;
    bok[j] = n < N;
    brow[j] = a.wq + (bok[j] ? static_cast<int64_t>(n) * a.ldw : 0);
  }
  const int chunk = tid & 7;  // the same for every slot: kThreads is a multiple of 8

  const int iters = (K + C::kBK - 1) / C::kBK;
  auto load_stage = [&](int stage, int kt) {
    const int k = kt * C::kBK + chunk * 16;
    const bool kok = k < K;  // K % 16 == 0: a chunk is all inside or all outside
    unsigned char* sa = smem + stage * C::kStageBytes;
    unsigned char* sb = sa + C::BM * C::kBK;
#pragma unroll
    for (int j = 0; j < C::kAChunks; ++j) {
      const int row = (tid + j * C::kThreads) / 8;
      const bool ok = kok && aok[j];
      cp_async16(smem_u32(sa + swz(row, chunk)), ok ? arow[j] + k : a.xq, ok);
    }
#pragma unroll
    for (int j = 0; j < C::kBChunks; ++j) {
      const int row = (tid + j * C::kThreads) / 8;
      const bool ok = kok && bok[j];
      cp_async16(smem_u32(sb + swz(row, chunk)), ok ? brow[j] + k : a.wq, ok);
    }
  };

  int acc[C::kMI][C::kNI][4];
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0;
  }

#pragma unroll
  for (int st = 0; st < C::STAGES - 1; ++st) {
    if (st < iters) load_stage(st, st);
    cp_async_commit();  // one group per k-tile, empty ones included, so the wait counts stay exact
  }
  // ldmatrix lane roles (see the fragment layouts of mma.m16n8k32 .s8): A matrices j = lane / 8 are (rows 0-7 | 8-15)
  // x (bytes 0-15 | 16-31) in the order a0 a1 a2 a3; B matrices are (n 0-7: bytes 0-15, 16-31 | n 8-15: same).
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_half = lane >> 4;
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_half = (lane >> 3) & 1;
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<C::STAGES - 2>();  // k-tile `it` has landed (for this thread) ...
    __syncthreads();                 // ... for every thread, and every warp is done with the stage refilled next
    if (it + C::STAGES - 1 < iters) load_stage((it + C::STAGES - 1) % C::STAGES, it + C::STAGES - 1);
    cp_async_commit();
    const unsigned char* sa = smem + (it % C::STAGES) * C::kStageBytes;
    const unsigned char* sb = sa + C::BM * C::kBK;
#pragma unroll
    for (int kk = 0; kk < C::kBK / 32; ++kk) {
      uint32_t af[C::kMI][4], bf[C::kNI / 2][4];
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi) {
        const int r = wm * C::kWM + mi * 16 + a_row;
        ldsm_x4(af[mi], smem_u32(sa + swz(r, 2 * kk + a_half)));
      }
#pragma unroll
      for (int nj = 0; nj < C::kNI / 2; ++nj) {
        const int r = wn * C::kWN + nj * 16 + b_row;
        ldsm_x4(bf[nj], smem_u32(sb + swz(r, 2 * kk + b_half)));
      }
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < C::kNI; ++ni) {
          mma16832_s8(acc[mi][ni], af[mi], bf[ni / 2][(ni & 1) * 2], bf[ni / 2][(ni & 1) * 2 + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing is left in flight when the CTA exits (the trailing groups are empty)

  // Epilogue straight from the fragments: c0 c1 at (row g, columns 2t, 2t + 1), c2 c3 at row g + 8. Each quad writes
  // 8 consecutive outputs of a row (16 or 32 bytes): whole sectors.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) {
      const int row = m0 + wm * C::kWM + mi * 16 + g;
      const int col = n0 + wn * C::kWN + ni * 8 + 2 * t;
      store_pair<T>(a.epi, row, col, acc[mi][ni][0], acc[mi][ni][1]);
      store_pair<T>(a.epi, row + 8, col, acc[mi][ni][2], acc[mi][ni][3]);
    }
  }
#else
  __trap();  // never launched: int8_linear_path refuses the tensor-core path below compute capability 8.0
#endif
}

// ------------------------------------------------------------------------------------------------------------------
// dp4a path.

struct Dp4aArgs {
  const int8_t* xq;
  const int8_t* wq;
  int64_t ldx, ldw;
  int K;
  int n_tiles;
  Epi epi;
};

constexpr int kDpTile = 64;
constexpr int kDpWords = 8;  // 32 bytes of k per step

// Four int8 at k .. k + 3 of a row as one word (zeros past K). WORDS: 4-byte loads are aligned and whole (K % 4 == 0,
// 4-byte aligned bases and strides); else byte loads.
template <bool WORDS>
__device__ __forceinline__ int load_word(const int8_t* base, int64_t off, int k, int K) {
  if (WORDS) return k < K ? *reinterpret_cast<const int*>(base + off) : 0;
  uint32_t v = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (k + i < K) v |= static_cast<uint32_t>(static_cast<uint8_t>(base[off + i])) << (8 * i);
  }
  return static_cast<int>(v);
}

template <typename T, bool WORDS>
__global__ void __launch_bounds__(256) _int8_dp4a_kernel(const Dp4aArgs a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 610
  __shared__ int sa[kDpTile][kDpWords + 1];
  __shared__ int sb[kDpTile][kDpWords + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int m0 = static_cast<int>(blockIdx.x / a.n_tiles) * kDpTile;
  const int n0 = static_cast<int>(blockIdx.x % a.n_tiles) * kDpTile;
  const int M = a.epi.M, N = a.epi.N, K = a.K;
  int acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += 4 * kDpWords) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int id = tid + j * 256, row = id / kDpWords, w = id % kDpWords, k = k0 + 4 * w;
      const int m = m0 + row, n = n0 + row;
      sa[row][w] = m < M ? load_word<WORDS>(a.xq, static_cast<int64_t>(m) * a.ldx + k, k, K) : 0;
      sb[row][w] = n < N ? load_word<WORDS>(a.wq, static_cast<int64_t>(n) * a.ldw + k, k, K) : 0;
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kDpWords; ++w) {
      int av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sa[ty + 16 * i][w];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = sb[tx + 16 * i][w];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = __dp4a(av[i], bv[jj], acc[i][jj]);
      }
    }
    __syncthreads();
  }
  T* y = static_cast<T*>(a.epi.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty + 16 * i;
    if (m >= M) continue;
    const float xs = a.epi.x_scale[m];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int n = n0 + tx + 16 * jj;
      if (n >= N) continue;
      y[static_cast<int64_t>(m) * N + n] = from_float<T>(epilogue(acc[i][jj], xs, a.epi.w_scale[n], a.epi.bias, n));
    }
  }
#else
  __trap();  // never launched: int8_linear_path refuses compute capability below 6.1
#endif
}

// ------------------------------------------------------------------------------------------------------------------
// Launchers.

template <typename T, typename C>
LaunchStatus launch_mma(const Int8LinearParams& p, const Epi& epi, cudaStream_t stream) {
  auto kernel = _int8_mma_kernel<T, C>;
  LaunchStatus st = cuda_util::raise_smem_limit<LaunchStatus>(
      kernel, C::kSmem, "int8_linear: the tensor-core kernel needs more shared memory per block than this GPU offers");
  if (!st.ok()) return st;
  MmaArgs a;
  a.xq = p.xq;
  a.wq = p.wq;
  a.ldx = p.ldx;
  a.ldw = p.ldw;
  a.K = static_cast<int>(p.K);
  a.n_tiles = static_cast<int>(cdiv(p.N, C::BN));
  a.epi = epi;
  const int64_t blocks = cdiv(p.M, C::BM) * a.n_tiles;
  if (blocks > 0x7fffffff) return refuse("int8_linear: too many output tiles for one grid");
  kernel<<<static_cast<unsigned>(blocks), C::kThreads, C::kSmem, stream>>>(a);
  return last_error();
}

template <typename T>
LaunchStatus launch_dp4a(const Int8LinearParams& p, const Epi& epi, cudaStream_t stream) {
  Dp4aArgs a;
  a.xq = p.xq;
  a.wq = p.wq;
  a.ldx = p.ldx;
  a.ldw = p.ldw;
  a.K = static_cast<int>(p.K);
  a.n_tiles = static_cast<int>(cdiv(p.N, kDpTile));
  a.epi = epi;
  const int64_t blocks = cdiv(p.M, kDpTile) * a.n_tiles;
  if (blocks > 0x7fffffff) return refuse("int8_linear: too many output tiles for one grid");
  const bool words = p.K % 4 == 0 && aligned(p.xq, 4) && aligned(p.wq, 4) && p.ldx % 4 == 0 && p.ldw % 4 == 0;
  if (words) {
    _int8_dp4a_kernel<T, true><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
  } else {
    _int8_dp4a_kernel<T, false><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
  }
  return last_error();
}

// The rules both tensor-core kernels (the tiles and the GEMV) share.
const char* tensor_core_refusal(const Int8LinearParams& p) {
  if (p.cc_major < 8) return "int8_linear: the tensor-core kernels need compute capability 8.0 or newer";
  if (p.K % 16 != 0) return "int8_linear: the tensor-core kernels need K to be a multiple of 16";
  if (!aligned(p.xq, 16) || p.ldx % 16 != 0) {
    return "int8_linear: the tensor-core kernels need xq's base and row stride 16-byte aligned";
  }
  if (!aligned(p.wq, 16) || p.ldw % 16 != 0) {
    return "int8_linear: the tensor-core kernels need wq's base and row stride 16-byte aligned";
  }
  return nullptr;
}

bool mma_shape_ok(const Int8LinearParams& p, const char** why) {
  const char* w = tensor_core_refusal(p);
  if (w == nullptr && smem_optin() < CfgSmall::kSmem) {
    w = "int8_linear: the tensor-core path needs 96 KB of shared memory per block";
  }
  if (why) *why = w;
  return w == nullptr;
}

bool gemv_shape_ok(const Int8LinearParams& p, const char** why) {
  const char* w = tensor_core_refusal(p);
  if (w == nullptr && p.M > kGemvMaxM) w = "int8_linear: the tensor-core GEMV takes at most 8 rows of xq";
  if (why) *why = w;
  return w == nullptr;
}

}  // namespace

LaunchStatus quantize_rows(const QuantizeParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return LaunchStatus{};
  if (p.rows > (static_cast<int64_t>(0x7fffffff) * 8)) return refuse("quantize_rows: too many rows");
  const unsigned blocks = static_cast<unsigned>(cdiv(p.rows, 8));
  return by_dtype(p.dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    constexpr int vw = 16 / sizeof(T);
    const bool vec = aligned(p.x, 16) && p.ldx % vw == 0 && p.K % vw == 0 && aligned(p.q, 16);
    const T* x = static_cast<const T*>(p.x);
    if (vec) {
      _quantize_rows_kernel<T, true><<<blocks, 256, 0, stream>>>(x, p.q, p.scale, p.rows, p.K, p.ldx);
    } else {
      _quantize_rows_kernel<T, false><<<blocks, 256, 0, stream>>>(x, p.q, p.scale, p.rows, p.K, p.ldx);
    }
    return last_error();
  });
}

Int8Path int8_linear_path(const Int8LinearParams& p, const char** why) {
  const char* w = nullptr;
  if (why) *why = nullptr;
  const bool dp4a_ok = p.cc_major > 6 || (p.cc_major == 6 && p.cc_minor >= 1);
  if (p.path == Int8Path::kMma) {
    if (mma_shape_ok(p, &w)) return Int8Path::kMma;
    if (why) *why = w;
    return Int8Path::kAuto;
  }
  if (p.path == Int8Path::kGemv) {
    if (gemv_shape_ok(p, &w)) return Int8Path::kGemv;
    if (why) *why = w;
    return Int8Path::kAuto;
  }
  if (!dp4a_ok) {
    if (why) *why = "int8_linear: the CUDA kernels need compute capability 6.1 or newer (dp4a)";
    return Int8Path::kAuto;
  }
  if (p.path == Int8Path::kDp4a) return Int8Path::kDp4a;
  if (p.M <= kGemvMaxM && gemv_shape_ok(p, nullptr)) return Int8Path::kGemv;
  return mma_shape_ok(p, nullptr) ? Int8Path::kMma : Int8Path::kDp4a;
}

LaunchStatus int8_linear(const Int8LinearParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return LaunchStatus{};
  if (p.K < 1 || p.K > 131071) return refuse("int8_linear: K must be in [1, 131071]");
  if (p.M > 0x7fffffff - 256 || p.N > 0x7fffffff - 256) return refuse("int8_linear: M and N must be below 2^31");
  const char* why = nullptr;
  const Int8Path path = int8_linear_path(p, &why);
  if (path == Int8Path::kAuto) return refuse(why);
  Epi epi{p.x_scale, p.w_scale, p.bias, p.y, static_cast<int>(p.M), static_cast<int>(p.N)};
  return by_dtype(p.out_dtype, [&](auto tag) -> LaunchStatus {
    using T = decltype(tag);
    if (path == Int8Path::kDp4a) return launch_dp4a<T>(p, epi, stream);
    if (path == Int8Path::kGemv) return launch_gemv<T>(p, epi, stream);
    // The large tile when it alone gives every SM a CTA and fits the device's shared memory.
    const int64_t large_tiles = cdiv(p.M, CfgLarge::BM) * cdiv(p.N, CfgLarge::BN);
    if (large_tiles >= sm_count() && smem_optin() >= CfgLarge::kSmem) return launch_mma<T, CfgLarge>(p, epi, stream);
    return launch_mma<T, CfgSmall>(p, epi, stream);
  });
}

}  // namespace mltoolkit::cuda_quant
