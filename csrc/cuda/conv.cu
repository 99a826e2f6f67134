// CUDA 2-D convolution, forward and backward, as implicit GEMMs (no im2col buffer). Contract: csrc/conv.h; launchers
// and the kernel families: conv_launch.h; index math (shared with the host emulator of the tests): conv_index.h. No
// torch headers here (compile time); the tensor glue is conv_cuda.cpp.
//
// Tensor-core path (fp16/bf16, NHWC, channels per group multiples of 8), after CUTLASS's implicit-GEMM convolutions:
// a CTA computes a 128 x BN tile (BN = 128 or 64) of output pixels x output channels with 8 warps, each warp a 64x32
// or 32x32 block of mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix from XOR-swizzled shared memory; a 4-stage
// cp.async ring keeps three k-steps (one tap, 32 channels) in flight. Padding taps and ragged edges are zero-filled
// by cp.async's src-size operand. The epilogue stages the fp32 tile in shared memory and writes 16 bytes per thread:
// act(acc + bias + residual), rounded once. dgrad is the same kernel gathering dy through the transposed taps; wgrad
// is a sibling kernel whose GEMM rows are the weight's (r, s, c), columns k, reduced over pixels in split-K slices.
// SIMT path: 64x64x16 shared-memory tiles, 4x4 outputs per thread, in float (double for float64).
// Reductions over pixels (wgrad, bias grad, depthwise wgrad) are split into a shape-determined number of slices whose
// partial sums go to a workspace and are summed in a fixed order: no floating-point atomics, bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../conv_epilogue.h"
#include "conv_index.h"
#include "conv_launch.h"
#include "mma_ptx.h"
#include "smem_limit.h"

namespace mltoolkit::cuda_conv {
namespace {

using idx::kBK;
using idx::kBM;
using idx::kStages;
using idx::kThreads;

// ------------------------------------------------------------------------------------------------------------------
// Types.

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> widen(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

template <typename T, typename A>
__device__ __forceinline__ T narrow(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

template <typename A>
__device__ __forceinline__ A activate(int act, A v) {
  return apply_activation<A>(static_cast<Act>(act), v);
}

using namespace mltoolkit::ptx;  // smem_u32, cp_async*, ldsm_x4*, mma16816, pack2

// ------------------------------------------------------------------------------------------------------------------
// Tensor-core implicit GEMM: forward and dgrad.

struct TcParams {
  const void* a = nullptr;         // gathered tensor (x, or dy for dgrad), NHWC
  const void* b = nullptr;         // (groups * ng, R, S, cr): rows = GEMM columns, taps-major, channels fastest
  const void* bias = nullptr;      // (groups * ng) or null
  const void* residual = nullptr;  // the output's shape, or null
  void* out = nullptr;             // (rows, groups * ng): NHWC
  idx::Gather geo;
  int rows = 0;     // N * out_h * out_w
  int cr = 0;       // reduction channels per group (multiple of 8)
  int ng = 0;       // GEMM columns per group (multiple of 8)
  int out_c = 0;    // groups * ng
  int n_tiles = 0;  // column tiles per group
  int act = 0;
};

template <typename T, int BN>
__global__ void __launch_bounds__(kThreads, 2) _conv2d_tc_kernel(const TcParams p) {
  using C = idx::TcCfg<BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);     // [kStages][kBM][kBK]
  T* sb = sa + kStages * kBM * kBK;       // [kStages][BN][kBK]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  const int grp = blockIdx.y;
  // Column tiles vary fastest across the grid: the CTAs sharing a row tile of activations run together.
  const int m0 = static_cast<int>(blockIdx.x / p.n_tiles) * kBM;
  const int n0 = static_cast<int>(blockIdx.x % p.n_tiles) * BN;
  const idx::Gather& geo = p.geo;
  const T* a = static_cast<const T*>(p.a) + grp * p.cr;
  const T* b = static_cast<const T*>(p.b);
  const int chunk = idx::copy_chunk(tid);

  idx::Row arow[C::kASlots];
#pragma unroll
  for (int j = 0; j < C::kASlots; ++j) arow[j] = idx::make_row(geo, m0 + idx::copy_row(tid, j), p.rows);
  const T* brow[C::kBSlots];
  bool bok[C::kBSlots];
  const int64_t b_row_len = static_cast<int64_t>(geo.r) * geo.s * p.cr;
#pragma unroll
  for (int j = 0; j < C::kBSlots; ++j) {
    const int n = n0 + idx::copy_row(tid, j);
    bok[j] = n < p.ng;
    brow[j] = b + (grp * p.ng + (bok[j] ? n : 0)) * b_row_len + chunk * 8;
  }

  const int iters = idx::tap_iters(geo.r, geo.s, p.cr);
  idx::TapIter ld;  // the k-step the next load_stage fetches
  auto load_stage = [&](int stage) {
    const int c = ld.c0 + chunk * 8;
    const bool cok = c < p.cr;
    T* sa_st = sa + stage * kBM * kBK;
#pragma unroll
    for (int j = 0; j < C::kASlots; ++j) {
      const int64_t off = cok ? idx::nhwc_tap_offset(geo, arow[j], ld.r, ld.s, c) : -1;
      cp_async16(smem_u32(sa_st + idx::swz32(idx::copy_row(tid, j), chunk)), off >= 0 ? a + off : a, off >= 0);
    }
    T* sb_st = sb + stage * BN * kBK;
    const int koff = (ld.r * geo.s + ld.s) * p.cr + ld.c0;
#pragma unroll
    for (int j = 0; j < C::kBSlots; ++j) {
      const bool ok = cok && bok[j];
      cp_async16(smem_u32(sb_st + idx::swz32(idx::copy_row(tid, j), chunk)), ok ? brow[j] + koff : b, ok);
    }
  };

  float acc[C::kMI][C::kNI][4];
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
  }

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < iters) load_stage(st);
    ld.next(geo.s, p.cr);
    cp_async_commit();  // one group per k-step, empty ones included, so the wait counts below stay exact
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();  // k-step `it` has landed (for this thread) ...
    __syncthreads();               // ... for every thread, and every warp is done with the stage refilled next
    if (it + kStages - 1 < iters) load_stage((it + kStages - 1) % kStages);
    ld.next(geo.s, p.cr);
    cp_async_commit();
    const T* sa_st = sa + (it % kStages) * kBM * kBK;
    const T* sb_st = sb + (it % kStages) * BN * kBK;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[C::kMI][4], bf[C::kNI / 2][4];
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi) {
        const int r = idx::ldsm_a_row(lane, wm * C::kWM + mi * 16);
        ldsm_x4(af[mi], smem_u32(sa_st + idx::swz32(r, idx::ldsm_a_chunk(lane, kk))));
      }
#pragma unroll
      for (int nj = 0; nj < C::kNI / 2; ++nj) {
        const int r = idx::ldsm_b_row(lane, wn * C::kWN + nj * 16);
        ldsm_x4(bf[nj], smem_u32(sb_st + idx::swz32(r, idx::ldsm_b_chunk(lane, kk))));
      }
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < C::kNI; ++ni) {
          mma16816<T>(acc[mi][ni], af[mi], bf[ni / 2][(ni & 1) * 2], bf[ni / 2][(ni & 1) * 2 + 1]);
        }
      }
    }
  }

  // Epilogue: the fp32 tile through shared memory (reusing the ring), then 8 columns = 16 bytes per store.
  cp_async_wait<0>();
  __syncthreads();
  float* stg = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * C::kWM + mi * 16 + idx::acc_row(lane, 2 * h);
        const int col = wn * C::kWN + ni * 8 + idx::acc_col(lane, 2 * h);
        *reinterpret_cast<float2*>(stg + row * C::kEpiLd + col) =
            make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
    }
  }
  __syncthreads();
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int j = 0; j < C::kEpiSlots; ++j) {
    const int row = idx::epi_row<BN>(tid, j), ch = idx::epi_chunk<BN>(tid, j);
    const int m = m0 + row, n = n0 + ch * 8;
    if (m >= p.rows || n >= p.ng) continue;
    const int col = grp * p.ng + n;
    const int64_t off = static_cast<int64_t>(m) * p.out_c + col;
    const float4 lo = *reinterpret_cast<const float4*>(stg + row * C::kEpiLd + ch * 8);
    const float4 hi = *reinterpret_cast<const float4*>(stg + row * C::kEpiLd + ch * 8 + 4);
    float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    if (bias != nullptr) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += widen(bias[col + i]);
    }
    if (res != nullptr) {
      const uint4 rv = *reinterpret_cast<const uint4*>(res + off);
      const T* rt = reinterpret_cast<const T*>(&rv);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += widen(rt[i]);
    }
    if (p.act != 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = activate(p.act, v[i]);
    }
    uint4 o;
    o.x = pack2<T>(v[0], v[1]);
    o.y = pack2<T>(v[2], v[3]);
    o.z = pack2<T>(v[4], v[5]);
    o.w = pack2<T>(v[6], v[7]);
    *reinterpret_cast<uint4*>(out + off) = o;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Tensor-core wgrad: ws[split][g][i][k] = sum over the split's pixels t of x[gather(t, r, s), g*cg + c] *
// dy[t, g*kg + k] with i = (r*S + s)*cg + c. GEMM rows i (tiles of kBM), columns k (tiles of BN), reduction over t
// in steps of kBK.

struct TcWgradParams {
  const void* x = nullptr;   // (N, H, W, C)
  const void* dy = nullptr;  // (N, P, Q, K)
  float* ws = nullptr;       // [splits][groups][kc][kg]
  idx::Gather geo;           // x seen from the output pixels (not transposed)
  idx::FastDiv div_pq, div_q;
  int pixels = 0;     // N * P * Q
  int split_len = 0;  // pixels per split, a multiple of kBK
  int cg = 0, kg = 0, kc = 0;  // kc = R * S * cg
  int k_out = 0;               // K, dy's channel count
  int n_tiles = 0;
};

template <typename T, int BN>
__global__ void __launch_bounds__(kThreads, 2) _conv2d_bwd_weight_tc_kernel(const TcWgradParams p) {
  using C = idx::TcCfg<BN>;
  constexpr int kAChunks = kBM / 8, kBChunks = BN / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);  // [kStages][kBK][kBM]
  T* sb = sa + kStages * kBK * kBM;    // [kStages][kBK][BN]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  const int grp = blockIdx.y, split = blockIdx.z;
  const int m0 = static_cast<int>(blockIdx.x / p.n_tiles) * kBM;
  const int n0 = static_cast<int>(blockIdx.x % p.n_tiles) * BN;
  const idx::Gather& geo = p.geo;
  const int t_begin = split * p.split_len;
  const int t_end = min(p.pixels, t_begin + p.split_len);
  const int iters = t_end > t_begin ? (t_end - t_begin + kBK - 1) / kBK : 0;

  // Each thread copies one fixed column chunk of each tile (kThreads is a multiple of the chunk counts).
  const int a_chunk = idx::wide_chunk(tid, 0, kAChunks);
  const int ia = m0 + a_chunk * 8;
  const bool a_ok = ia < p.kc;
  const idx::Rsc rsc = idx::split_rsc(a_ok ? ia : 0, geo.s, p.cg);
  const T* xg = static_cast<const T*>(p.x);
  const T* xa = xg + grp * p.cg + rsc.c;
  const int b_chunk = idx::wide_chunk(tid, 0, kBChunks);
  const bool b_ok = n0 + b_chunk * 8 < p.kg;
  const T* dyg = static_cast<const T*>(p.dy);
  const T* dyb = dyg + grp * p.kg + n0 + b_chunk * 8;

  auto load_stage = [&](int stage, int t0) {
    T* sa_st = sa + stage * kBK * kBM;
#pragma unroll
    for (int j = 0; j < C::kASlots; ++j) {
      const int row = idx::wide_row(tid, j, kAChunks), t = t0 + row;
      int64_t off = -1;
      if (a_ok && t < t_end) {
        const idx::Pix px = idx::split_pix(t, p.div_pq, p.div_q);
        off = idx::x_tap_offset(geo, true, px.img, px.p, px.q, rsc.r, rsc.s, 0);
      }
      cp_async16(smem_u32(sa_st + idx::swz_wide(row, a_chunk, kAChunks)), off >= 0 ? xa + off : xg, off >= 0);
    }
    T* sb_st = sb + stage * kBK * BN;
#pragma unroll
    for (int j = 0; j < C::kBSlots; ++j) {
      const int row = idx::wide_row(tid, j, kBChunks), t = t0 + row;
      const bool ok = b_ok && t < t_end;
      const T* src = ok ? dyb + static_cast<int64_t>(t) * p.k_out : dyg;
      cp_async16(smem_u32(sb_st + idx::swz_wide(row, b_chunk, kBChunks)), src, ok);
    }
  };

  float acc[C::kMI][C::kNI][4];
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
  }
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < iters) load_stage(st, t_begin + st * kBK);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int pf = it + kStages - 1;
    if (pf < iters) load_stage(pf % kStages, t_begin + pf * kBK);
    cp_async_commit();
    const T* sa_st = sa + (it % kStages) * kBK * kBM;
    const T* sb_st = sb + (it % kStages) * kBK * BN;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[C::kMI][4], bf[C::kNI / 2][4];
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi) {
        const int c = idx::ldsm_at_chunk(lane, wm * C::kWM + mi * 16);
        ldsm_x4_t(af[mi], smem_u32(sa_st + idx::swz_wide(idx::ldsm_at_row(lane, kk), c, kAChunks)));
      }
#pragma unroll
      for (int nj = 0; nj < C::kNI / 2; ++nj) {
        const int c = idx::ldsm_bt_chunk(lane, wn * C::kWN + nj * 16);
        ldsm_x4_t(bf[nj], smem_u32(sb_st + idx::swz_wide(idx::ldsm_bt_row(lane, kk), c, kBChunks)));
      }
#pragma unroll
      for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < C::kNI; ++ni) {
          mma16816<T>(acc[mi][ni], af[mi], bf[ni / 2][(ni & 1) * 2], bf[ni / 2][(ni & 1) * 2 + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Partial sums, columns (k) fastest: two adjacent k per store.
  float* ws = p.ws + (static_cast<int64_t>(split) * gridDim.y + grp) * p.kc * p.kg;
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = m0 + wm * C::kWM + mi * 16 + idx::acc_row(lane, 2 * h);
        const int k = n0 + wn * C::kWN + ni * 8 + idx::acc_col(lane, 2 * h);
        if (i < p.kc && k < p.kg) {
          *reinterpret_cast<float2*>(ws + static_cast<int64_t>(i) * p.kg + k) =
              make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// SIMT implicit GEMM: forward and dgrad in any dtype and layout. 64x64 output tile per CTA, k-steps of 16, each thread
// 4x4 outputs (rows tx + 16 i, columns ty + 16 j). Global loads for step k+1 are issued before step k's math.

constexpr int kSM = 64, kSN = 64, kSK = 16;

struct SimtParams {
  const void* a = nullptr;  // gathered tensor (x, or dy for dgrad)
  const void* b = nullptr;  // (groups * ng, kr): kr in (c, r, s) order for NCHW, (r, s, c) for NHWC
  const void* bias = nullptr;
  const void* residual = nullptr;
  void* out = nullptr;
  idx::Gather geo;
  int rows = 0;  // N * out_h * out_w
  int cr = 0;    // reduction channels per group
  int ng = 0;    // output channels per group
  int out_c = 0;
  int act = 0;
};

template <typename T, bool kNHWC>
__global__ void __launch_bounds__(256) _conv2d_simt_kernel(const SimtParams p) {
  using A = acc_t<T>;
  __shared__ A sa[kSK][kSM];
  __shared__ A sb[kSK][kSN];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int grp = blockIdx.z, m0 = blockIdx.x * kSM, n0 = blockIdx.y * kSN;
  const idx::Gather& geo = p.geo;
  const int kr_total = p.cr * geo.r * geo.s;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);

  // Element e = tid + 256 j of the A tile: NHWC runs along kr (channels are contiguous), NCHW along m (pixels are).
  int am[4], ak[4], bn[4], bk[4];
  idx::RowPix rp[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int e = tid + 256 * j;
    am[j] = kNHWC ? e / kSK : e % kSM;
    ak[j] = kNHWC ? e % kSK : e / kSM;
    rp[j] = idx::make_rowpix(geo, m0 + am[j], p.rows);
    bk[j] = e % kSK;  // the weight matrix is kr-contiguous
    bn[j] = e / kSK;
  }
  A ra[4], rb[4];
  auto load = [&](int k0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kr = k0 + ak[j];
      const int64_t off = kr < kr_total ? idx::simt_a_offset(geo, kNHWC, rp[j], kr, p.cr, grp * p.cr) : -1;
      ra[j] = off >= 0 ? widen(a[off]) : A(0);
      const int kb = k0 + bk[j], n = n0 + bn[j];
      rb[j] = kb < kr_total && n < p.ng ? widen(b[static_cast<int64_t>(grp * p.ng + n) * kr_total + kb]) : A(0);
    }
  };

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  }
  load(0);
  for (int k0 = 0; k0 < kr_total; k0 += kSK) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sa[ak[j]][am[j]] = ra[j];
      sb[bk[j]][bn[j]] = rb[j];
    }
    __syncthreads();
    if (k0 + kSK < kr_total) load(k0 + kSK);
#pragma unroll
    for (int kk = 0; kk < kSK; ++kk) {
      A av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sa[kk][tx + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = sb[kk][ty + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }

  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + tx + 16 * i;
    if (m >= p.rows) continue;
    const idx::RowPix o = idx::make_rowpix(geo, m, p.rows);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + ty + 16 * j;
      if (n >= p.ng) continue;
      const int col = grp * p.ng + n;
      const int64_t off = idx::act_offset(kNHWC, o.img, col, o.oh, o.ow, p.out_c, geo.out_h, geo.out_w);
      A v = acc[i][j];
      if (bias != nullptr) v += widen(bias[col]);
      if (res != nullptr) v += widen(res[off]);
      if (p.act != 0) v = activate(p.act, v);
      out[off] = narrow<T>(v);
    }
  }
}

// SIMT wgrad: ws[split][g][k][i] = sum over the split's pixels t of dy[t, g*kg + k] * x[gather(t, i)], i in the
// weight's column order of x's layout. Rows k (tiles of 64), columns i (tiles of 64), reduction over t in steps of 16.
struct SimtWgradParams {
  const void* x = nullptr;
  const void* dy = nullptr;
  void* ws = nullptr;  // acc type
  idx::Gather geo;     // x seen from the output pixels (not transposed)
  int n = 0;           // images
  int pixels = 0;      // N * P * Q
  int split_len = 0;
  int cg = 0, kg = 0, kc = 0;
  int k_out = 0;  // K
  int n_tiles = 0;
};

template <typename T, bool kNHWC>
__global__ void __launch_bounds__(256) _conv2d_bwd_weight_simt_kernel(const SimtWgradParams p) {
  using A = acc_t<T>;
  __shared__ A sa[kSK][kSM];  // [t][k]
  __shared__ A sb[kSK][kSN];  // [t][i]
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int grp = blockIdx.y, split = blockIdx.z;
  const int m0 = static_cast<int>(blockIdx.x / p.n_tiles) * kSM;
  const int n0 = static_cast<int>(blockIdx.x % p.n_tiles) * kSN;
  const idx::Gather& geo = p.geo;
  const int pq = geo.out_h * geo.out_w;
  const int t_begin = split * p.split_len;
  const int t_end = min(p.pixels, t_begin + p.split_len);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);

  // A (dy) elements: t fastest; B (x) elements: i fastest, so each thread's column i (and its c, r, s) is fixed.
  int at[4], ak[4], bt[4];
  const int bi = n0 + (tid & (kSN - 1));
  const bool bi_ok = bi < p.kc;
  const idx::Crs crs = idx::split_col(bi_ok ? bi : 0, kNHWC, geo.r, geo.s, p.cg);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int e = tid + 256 * j;
    at[j] = e % kSK;
    ak[j] = e / kSK;
    bt[j] = e / kSN;
  }
  A ra[4], rb[4];
  auto load = [&](int t0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int ta = t0 + at[j], k = m0 + ak[j];
      A va = A(0);
      if (ta < t_end && k < p.kg) {
        const int img = ta / pq, pix = ta - img * pq, pp = pix / geo.out_w, qq = pix - pp * geo.out_w;
        va = widen(dy[idx::act_offset(kNHWC, img, grp * p.kg + k, pp, qq, p.k_out, geo.out_h, geo.out_w)]);
      }
      ra[j] = va;
      const int tb = t0 + bt[j];
      A vb = A(0);
      if (tb < t_end && bi_ok) {
        const int img = tb / pq, pix = tb - img * pq, pp = pix / geo.out_w, qq = pix - pp * geo.out_w;
        const int64_t off = idx::x_tap_offset(geo, kNHWC, img, pp, qq, crs.r, crs.s, grp * p.cg + crs.c);
        if (off >= 0) vb = widen(x[off]);
      }
      rb[j] = vb;
    }
  };

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  }
  if (t_begin < t_end) load(t_begin);
  for (int t0 = t_begin; t0 < t_end; t0 += kSK) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sa[at[j]][ak[j]] = ra[j];
      sb[bt[j]][tid & (kSN - 1)] = rb[j];
    }
    __syncthreads();
    if (t0 + kSK < t_end) load(t0 + kSK);
#pragma unroll
    for (int kk = 0; kk < kSK; ++kk) {
      A av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sa[kk][tx + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = sb[kk][ty + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }

  A* ws = static_cast<A*>(p.ws) + (static_cast<int64_t>(split) * gridDim.y + grp) * p.kg * p.kc;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = m0 + tx + 16 * i;
    if (k >= p.kg) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = n0 + ty + 16 * j;
      if (c < p.kc) ws[static_cast<int64_t>(k) * p.kc + c] = acc[i][j];
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Depthwise (C/groups == K/groups == 1): out[n, c, o] = sum over taps of in[n, c, tap(o)] * w[c, tap], forward (with
// the epilogue) or dgrad (transposed taps). NCHW: one thread per output element; NHWC: one per V channels of a pixel.

struct DwParams {
  const void* in = nullptr;   // x, or dy for dgrad
  const void* w = nullptr;    // (C, R*S) for NCHW, (R*S, C) for NHWC
  const void* bias = nullptr;
  const void* residual = nullptr;
  void* out = nullptr;
  idx::Gather geo;  // in_c = C
  int n = 0;
  int act = 0;
};

// I: the element index type, int when the output has fewer than 2^31 elements (64-bit divisions are subroutine calls).
template <typename T, typename I>
__global__ void __launch_bounds__(256) _conv2d_dw_nchw_kernel(const DwParams p) {
  using A = acc_t<T>;
  const idx::Gather& g = p.geo;
  const int C = g.in_c, RS = g.r * g.s;
  const I total = static_cast<I>(p.n) * C * g.out_h * g.out_w;
  const T* in = static_cast<const T*>(p.in);
  const T* w = static_cast<const T*>(p.w);
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  for (I e = blockIdx.x * I(blockDim.x) + threadIdx.x; e < total; e += I(gridDim.x) * blockDim.x) {
    const int ow = static_cast<int>(e % g.out_w);
    I t = e / g.out_w;
    const int oh = static_cast<int>(t % g.out_h);
    t /= g.out_h;  // img * C + c
    const int c = static_cast<int>(t % C);
    const T* src = in + static_cast<int64_t>(t) * g.in_h * g.in_w;
    const T* wc = w + static_cast<int64_t>(c) * RS;
    const int bh = idx::tap_base(oh, g.sh, g.ph, g.transposed), bw = idx::tap_base(ow, g.sw, g.pw, g.transposed);
    A acc = A(0);
    for (int r = 0; r < g.r; ++r) {
      const int ih = idx::tap(bh, r, g.sh, g.dh, g.in_h, g.transposed);
      if (ih < 0) continue;
      for (int s = 0; s < g.s; ++s) {
        const int iw = idx::tap(bw, s, g.sw, g.dw, g.in_w, g.transposed);
        if (iw >= 0) acc += widen(src[ih * g.in_w + iw]) * widen(wc[r * g.s + s]);
      }
    }
    if (bias != nullptr) acc += widen(bias[c]);
    if (res != nullptr) acc += widen(res[e]);
    if (p.act != 0) acc = activate(p.act, acc);
    out[e] = narrow<T>(acc);
  }
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V, typename I>
__global__ void __launch_bounds__(256) _conv2d_dw_nhwc_kernel(const DwParams p) {
  using A = acc_t<T>;
  using VT = Vec<T, V>;
  const idx::Gather& g = p.geo;
  const int C = g.in_c, CV = C / V;
  const I total = static_cast<I>(p.n) * g.out_h * g.out_w * CV;
  const T* in = static_cast<const T*>(p.in);
  const T* w = static_cast<const T*>(p.w);
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  for (I e = blockIdx.x * I(blockDim.x) + threadIdx.x; e < total; e += I(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(e % CV) * V;
    const I pix = e / CV;  // img * out_h * out_w + oh * out_w + ow
    const int ow = static_cast<int>(pix % g.out_w);
    const I t = pix / g.out_w;
    const int oh = static_cast<int>(t % g.out_h);
    const int64_t img = t / g.out_h;
    const T* src = in + img * g.in_h * g.in_w * C + c;
    const int bh = idx::tap_base(oh, g.sh, g.ph, g.transposed), bw = idx::tap_base(ow, g.sw, g.pw, g.transposed);
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = A(0);
    for (int r = 0; r < g.r; ++r) {
      const int ih = idx::tap(bh, r, g.sh, g.dh, g.in_h, g.transposed);
      if (ih < 0) continue;
      for (int s = 0; s < g.s; ++s) {
        const int iw = idx::tap(bw, s, g.sw, g.dw, g.in_w, g.transposed);
        if (iw < 0) continue;
        const VT xv = *reinterpret_cast<const VT*>(src + static_cast<int64_t>(ih * g.in_w + iw) * C);
        const VT wv = *reinterpret_cast<const VT*>(w + static_cast<int64_t>(r * g.s + s) * C + c);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += widen(xv.v[v]) * widen(wv.v[v]);
      }
    }
    const int64_t off = static_cast<int64_t>(pix) * C + c;
    if (bias != nullptr) {
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += widen(bias[c + v]);
    }
    if (res != nullptr) {
      const VT rv = *reinterpret_cast<const VT*>(res + off);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += widen(rv.v[v]);
    }
    VT ov;
#pragma unroll
    for (int v = 0; v < V; ++v) ov.v[v] = narrow<T>(p.act != 0 ? activate(p.act, acc[v]) : acc[v]);
    *reinterpret_cast<VT*>(out + off) = ov;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Per-channel reductions over pixels (bias grad; depthwise wgrad): ws[split][c][tap] = sum over the split's pixels t
// of dy[t, c] * (x ? x[gather(t, tap), c] : 1).

struct ChanParams {
  const void* dy = nullptr;  // (N, C, P, Q)
  const void* x = nullptr;   // (N, C, H, W) or null
  void* ws = nullptr;        // acc type, [splits][C][taps]
  idx::Gather geo;           // in = x, out = (P, Q); in_c = C; taps r * s (1 x 1 for the bias)
  int pixels = 0;            // N * P * Q
  int split_len = 0;
};

// NHWC: a CTA is 32 channels x 8 pixel lanes; grid (ceil(C / 32), taps, splits).
template <typename T>
__global__ void __launch_bounds__(256) _chan_reduce_nhwc_kernel(const ChanParams p) {
  using A = acc_t<T>;
  __shared__ A red[8][33];
  const idx::Gather& g = p.geo;
  const int C = g.in_c, tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + tx, tp = blockIdx.y, split = blockIdx.z;
  const int r = tp / g.s, s = tp - (tp / g.s) * g.s;
  const int pq = g.out_h * g.out_w;
  const int t_begin = split * p.split_len, t_end = min(p.pixels, t_begin + p.split_len);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  A acc = A(0);
  if (c < C) {
    for (int t = t_begin + ty; t < t_end; t += 8) {
      A v = widen(dy[static_cast<int64_t>(t) * C + c]);
      if (x != nullptr) {
        const int img = t / pq, pix = t - img * pq, pp = pix / g.out_w, qq = pix - pp * g.out_w;
        const int64_t off = idx::x_tap_offset(g, true, img, pp, qq, r, s, c);
        v = off >= 0 ? v * widen(x[off]) : A(0);
      }
      acc += v;
    }
  }
  red[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < C) {
    A sum = red[0][tx];
#pragma unroll
    for (int y = 1; y < 8; ++y) sum += red[y][tx];
    const int taps = g.r * g.s;
    static_cast<A*>(p.ws)[(static_cast<int64_t>(split) * C + c) * taps + tp] = sum;
  }
}

// NCHW: a CTA per (channel, tap, split) sums contiguous runs of pixels; fixed-shape tree reduction.
template <typename T>
__global__ void __launch_bounds__(256) _chan_reduce_nchw_kernel(const ChanParams p) {
  using A = acc_t<T>;
  __shared__ A red[256];
  const idx::Gather& g = p.geo;
  const int C = g.in_c, c = blockIdx.x, tp = blockIdx.y, split = blockIdx.z;
  const int r = tp / g.s, s = tp - (tp / g.s) * g.s;
  const int pq = g.out_h * g.out_w;
  const int t_begin = split * p.split_len, t_end = min(p.pixels, t_begin + p.split_len);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  A acc = A(0);
  for (int t = t_begin + threadIdx.x; t < t_end; t += 256) {
    const int img = t / pq, pix = t - img * pq;
    A v = widen(dy[(static_cast<int64_t>(img) * C + c) * pq + pix]);
    if (x != nullptr) {
      const int pp = pix / g.out_w, qq = pix - pp * g.out_w;
      const int64_t off = idx::x_tap_offset(g, false, img, pp, qq, r, s, c);
      v = off >= 0 ? v * widen(x[off]) : A(0);
    }
    acc += v;
  }
  red[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int h = 128; h > 0; h >>= 1) {
    if (static_cast<int>(threadIdx.x) < h) red[threadIdx.x] += red[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int taps = g.r * g.s;
    static_cast<A*>(p.ws)[(static_cast<int64_t>(split) * C + c) * taps + tp] = red[0];
  }
}

// dst[e] = sum over splits (in order) of the partials of element e; `ik`: the partials are [g][i][k] (tensor-core
// wgrad) while dst is [(g, k)][i].
template <typename T, typename A>
__global__ void __launch_bounds__(256) _split_sum_kernel(const A* ws, int splits, int64_t count, T* dst, bool ik,
                                                           int kg, int kc) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count; e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t src = ik ? idx::ik_source(e, kg, kc) : e;
    A sum = A(0);
    for (int sp = 0; sp < splits; ++sp) sum += ws[sp * count + src];
    dst[e] = narrow<T>(sum);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Launch helpers.

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a grid-stride launch over `total` elements.
unsigned stride_blocks(int64_t total, int per_block = 256) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(cdiv(total, per_block), 1 << 20)));
}

// Raises the kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename K>
LaunchStatus prepare(K kernel, int smem) {
  return cuda_util::raise_smem_limit<LaunchStatus>(
      kernel, smem, "the tensor-core convolution kernel needs more shared memory per block than this GPU offers");
}

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    return 132;
  }
  return n;
}

LaunchStatus last_error() {
  LaunchStatus st;
  st.cuda = cudaGetLastError();
  return st;
}

// Calls fn(T{}) with the storage type of dtype.
template <typename Fn>
LaunchStatus by_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat64:
      return fn(double{});
    case DType::kFloat16:
      return fn(__half{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  LaunchStatus st;
  st.what = "unknown dtype";
  return st;
}

template <typename Fn>
LaunchStatus by_half_dtype(DType t, Fn&& fn) {
  if (t == DType::kFloat16) return fn(__half{});
  if (t == DType::kBFloat16) return fn(__nv_bfloat16{});
  LaunchStatus st;
  st.what = "the tensor-core path takes float16 or bfloat16 only";
  return st;
}

int acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

idx::Gather forward_gather(const Shape& s) {
  idx::Gather g;
  g.in_h = s.h, g.in_w = s.w, g.in_c = s.c;
  g.out_h = s.p, g.out_w = s.q;
  g.r = s.r, g.s = s.s;
  g.sh = s.sh, g.sw = s.sw, g.ph = s.ph, g.pw = s.pw, g.dh = s.dh, g.dw = s.dw;
  g.transposed = false;
  return g;
}

// dy (N, K, P, Q) gathered for the output pixels of dx (N, C, H, W).
idx::Gather dgrad_gather(const Shape& s) {
  idx::Gather g = forward_gather(s);
  g.in_h = s.p, g.in_w = s.q, g.in_c = s.k;
  g.out_h = s.h, g.out_w = s.w;
  g.transposed = true;
  return g;
}

template <typename T>
LaunchStatus launch_tc(const TcParams& p, int groups, cudaStream_t stream) {
  const int64_t m_tiles = cdiv(p.rows, kBM);
  // Column tile: the one with fewer waves of CTAs (two per SM), a 64-wide tile costing ~0.6 of a 128-wide one (a
  // guess, to be measured): 512 channels at 7x7 fill the GPU better with 64, 128-256 channels at 14x14+ run 128.
  const int64_t slots = 2 * static_cast<int64_t>(sm_count());
  const int64_t waves128 = cdiv(m_tiles * cdiv(p.ng, 128) * groups, slots);
  const int64_t waves64 = cdiv(m_tiles * cdiv(p.ng, 64) * groups, slots);
  const bool wide = p.ng > 64 && 10 * waves128 <= 6 * waves64;
  TcParams q = p;
  q.n_tiles = static_cast<int>(cdiv(p.ng, wide ? 128 : 64));
  const dim3 grid(static_cast<unsigned>(m_tiles * q.n_tiles), static_cast<unsigned>(groups));
  if (wide) {
    auto kernel = _conv2d_tc_kernel<T, 128>;
    constexpr int smem = idx::TcCfg<128>::kSmemBytes;
    LaunchStatus st = prepare(kernel, smem);
    if (!st.ok()) return st;
    kernel<<<grid, kThreads, smem, stream>>>(q);
  } else {
    auto kernel = _conv2d_tc_kernel<T, 64>;
    constexpr int smem = idx::TcCfg<64>::kSmemBytes;
    LaunchStatus st = prepare(kernel, smem);
    if (!st.ok()) return st;
    kernel<<<grid, kThreads, smem, stream>>>(q);
  }
  return last_error();
}

template <typename T, bool kNHWC>
LaunchStatus launch_simt(const SimtParams& p, int groups, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(p.rows, kSM)), static_cast<unsigned>(cdiv(p.ng, kSN)),
                  static_cast<unsigned>(groups));
  _conv2d_simt_kernel<T, kNHWC><<<grid, 256, 0, stream>>>(p);
  return last_error();
}

template <typename T, typename I>
LaunchStatus launch_depthwise_as(const DwParams& p, bool nhwc, cudaStream_t stream) {
  if (!nhwc) {
    const int64_t total = static_cast<int64_t>(p.n) * p.geo.in_c * p.geo.out_h * p.geo.out_w;
    _conv2d_dw_nchw_kernel<T, I><<<stride_blocks(total), 256, 0, stream>>>(p);
    return last_error();
  }
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.geo.in_c % V == 0 && aligned16(p.in) && aligned16(p.w) && aligned16(p.out) &&
                   (p.residual == nullptr || aligned16(p.residual));
  const int64_t pixels = static_cast<int64_t>(p.n) * p.geo.out_h * p.geo.out_w;
  if (vec) {
    _conv2d_dw_nhwc_kernel<T, V, I><<<stride_blocks(pixels * (p.geo.in_c / V)), 256, 0, stream>>>(p);
  } else {
    _conv2d_dw_nhwc_kernel<T, 1, I><<<stride_blocks(pixels * p.geo.in_c), 256, 0, stream>>>(p);
  }
  return last_error();
}

template <typename T>
LaunchStatus launch_depthwise(const DwParams& p, bool nhwc, cudaStream_t stream) {
  // Output elements (grid-stride index plus one stride stays below 2^31 for int).
  const int64_t total = static_cast<int64_t>(p.n) * p.geo.in_c * p.geo.out_h * p.geo.out_w;
  return total + (int64_t{1} << 28) < (int64_t{1} << 31) ? launch_depthwise_as<T, int>(p, nhwc, stream)
                                                          : launch_depthwise_as<T, int64_t>(p, nhwc, stream);
}

// ---- split-K plans (shape only; the workspace size and the launch must agree) ---------------------------------------

struct Plan {
  int splits = 1, split_len = 0;
  int64_t ws_elems = 0;  // partials, in the accumulation type (float for the tensor-core wgrad)
};

constexpr int kMinSplitPixels = 256;

Plan wgrad_tc_plan(const Shape& s, int bn) {
  const int64_t pixels = static_cast<int64_t>(s.n) * s.p * s.q;
  const int kc = s.r * s.s * s.cg();
  const int64_t blocks = cdiv(kc, kBM) * cdiv(s.kg(), bn) * s.groups;
  Plan pl;
  pl.splits = idx::reduction_splits(blocks, pixels, kMinSplitPixels);
  pl.split_len = idx::split_len(pixels, pl.splits, kBK);
  pl.ws_elems = static_cast<int64_t>(pl.splits) * s.groups * kc * s.kg();
  return pl;
}
int wgrad_tc_bn(const Shape& s) { return s.kg() > 64 ? 128 : 64; }

Plan wgrad_simt_plan(const Shape& s) {
  const int64_t pixels = static_cast<int64_t>(s.n) * s.p * s.q;
  const int kc = s.r * s.s * s.cg();
  const int64_t blocks = cdiv(s.kg(), kSM) * cdiv(kc, kSN) * s.groups;
  Plan pl;
  pl.splits = idx::reduction_splits(blocks, pixels, kMinSplitPixels);
  pl.split_len = idx::split_len(pixels, pl.splits, kSK);
  pl.ws_elems = static_cast<int64_t>(pl.splits) * s.groups * s.kg() * kc;
  return pl;
}

// Per-channel reductions: `channels` x `taps` outputs.
Plan chan_plan(const Shape& s, int channels, int taps) {
  const int64_t pixels = static_cast<int64_t>(s.n) * s.p * s.q;
  const int64_t blocks = (s.nhwc ? cdiv(channels, 32) : channels) * taps;
  Plan pl;
  pl.splits = idx::reduction_splits(blocks, pixels, 4 * kMinSplitPixels);
  pl.split_len = idx::split_len(pixels, pl.splits, 1);
  pl.ws_elems = static_cast<int64_t>(pl.splits) * channels * taps;
  return pl;
}

size_t ws_bytes(int64_t elems, int elem_size) {
  return static_cast<size_t>((elems * elem_size + 255) / 256 * 256);
}

template <typename T>
LaunchStatus launch_chan_reduce(const ChanParams& p, const Plan& pl, bool nhwc, int taps, T* dst,
                                cudaStream_t stream) {
  using A = acc_t<T>;
  const int C = p.geo.in_c;
  if (nhwc) {
    const dim3 grid(static_cast<unsigned>(cdiv(C, 32)), static_cast<unsigned>(taps), static_cast<unsigned>(pl.splits));
    _chan_reduce_nhwc_kernel<T><<<grid, 256, 0, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(taps), static_cast<unsigned>(pl.splits));
    _chan_reduce_nchw_kernel<T><<<grid, 256, 0, stream>>>(p);
  }
  LaunchStatus st = last_error();
  if (!st.ok()) return st;
  const int64_t count = static_cast<int64_t>(C) * taps;
  _split_sum_kernel<T, A><<<stride_blocks(count), 256, 0, stream>>>(static_cast<const A*>(p.ws), pl.splits, count,
                                                                      dst, false, 1, 1);
  return last_error();
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------------
// Entry points.

LaunchStatus conv2d_forward(const Forward& a, Path path, cudaStream_t stream) {
  const Shape& s = a.s;
  if (path == Path::kDepthwise) {
    DwParams p;
    p.in = a.x, p.w = a.w, p.bias = a.bias, p.residual = a.residual, p.out = a.y;
    p.geo = forward_gather(s);
    p.n = s.n;
    p.act = a.act;
    return by_dtype(a.dtype, [&](auto tag) { return launch_depthwise<decltype(tag)>(p, s.nhwc, stream); });
  }
  if (path == Path::kTensorCore) {
    if (!s.nhwc || s.cg() % 8 != 0 || s.kg() % 8 != 0 || !aligned16(a.x) || !aligned16(a.w) || !aligned16(a.y) ||
        (a.residual != nullptr && !aligned16(a.residual))) {
      LaunchStatus st;
      st.what = "the tensor-core path needs NHWC, channels per group multiples of 8 and 16-byte aligned tensors";
      return st;
    }
    TcParams p;
    p.a = a.x, p.b = a.w, p.bias = a.bias, p.residual = a.residual, p.out = a.y;
    p.geo = forward_gather(s);
    p.rows = s.n * s.p * s.q;
    p.cr = s.cg(), p.ng = s.kg(), p.out_c = s.k;
    p.act = a.act;
    return by_half_dtype(a.dtype, [&](auto tag) { return launch_tc<decltype(tag)>(p, s.groups, stream); });
  }
  SimtParams p;
  p.a = a.x, p.b = a.w, p.bias = a.bias, p.residual = a.residual, p.out = a.y;
  p.geo = forward_gather(s);
  p.rows = s.n * s.p * s.q;
  p.cr = s.cg(), p.ng = s.kg(), p.out_c = s.k;
  p.act = a.act;
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return s.nhwc ? launch_simt<T, true>(p, s.groups, stream) : launch_simt<T, false>(p, s.groups, stream);
  });
}

LaunchStatus conv2d_dgrad(const DataGrad& a, Path path, cudaStream_t stream) {
  const Shape& s = a.s;
  if (path == Path::kDepthwise) {
    DwParams p;
    p.in = a.dy, p.w = a.w, p.out = a.dx;
    p.geo = dgrad_gather(s);
    p.n = s.n;
    return by_dtype(a.dtype, [&](auto tag) { return launch_depthwise<decltype(tag)>(p, s.nhwc, stream); });
  }
  if (path == Path::kTensorCore) {
    if (!s.nhwc || s.cg() % 8 != 0 || s.kg() % 8 != 0 || !aligned16(a.dy) || !aligned16(a.w) || !aligned16(a.dx)) {
      LaunchStatus st;
      st.what = "the tensor-core path needs NHWC, channels per group multiples of 8 and 16-byte aligned tensors";
      return st;
    }
    TcParams p;
    p.a = a.dy, p.b = a.w, p.out = a.dx;
    p.geo = dgrad_gather(s);
    p.rows = s.n * s.h * s.w;
    p.cr = s.kg(), p.ng = s.cg(), p.out_c = s.c;
    return by_half_dtype(a.dtype, [&](auto tag) { return launch_tc<decltype(tag)>(p, s.groups, stream); });
  }
  SimtParams p;
  p.a = a.dy, p.b = a.w, p.out = a.dx;
  p.geo = dgrad_gather(s);
  p.rows = s.n * s.h * s.w;
  p.cr = s.kg(), p.ng = s.cg(), p.out_c = s.c;
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return s.nhwc ? launch_simt<T, true>(p, s.groups, stream) : launch_simt<T, false>(p, s.groups, stream);
  });
}

size_t wgrad_workspace_bytes(const Shape& s, DType dtype, Path path) {
  if (path == Path::kDepthwise) return ws_bytes(chan_plan(s, s.c, s.r * s.s).ws_elems, acc_size(dtype));
  if (path == Path::kTensorCore) return ws_bytes(wgrad_tc_plan(s, wgrad_tc_bn(s)).ws_elems, 4);
  return ws_bytes(wgrad_simt_plan(s).ws_elems, acc_size(dtype));
}

LaunchStatus conv2d_wgrad(const WeightGrad& a, Path path, cudaStream_t stream) {
  const Shape& s = a.s;
  const int64_t pixels = static_cast<int64_t>(s.n) * s.p * s.q;
  const int kc = s.r * s.s * s.cg();
  if (path == Path::kDepthwise) {
    const Plan pl = chan_plan(s, s.c, s.r * s.s);
    ChanParams p;
    p.dy = a.dy, p.x = a.x, p.ws = a.workspace;
    p.geo = forward_gather(s);
    p.pixels = static_cast<int>(pixels);
    p.split_len = pl.split_len;
    return by_dtype(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      return launch_chan_reduce<T>(p, pl, s.nhwc, s.r * s.s, static_cast<T*>(a.dw), stream);
    });
  }
  if (path == Path::kTensorCore) {
    if (!s.nhwc || s.cg() % 8 != 0 || s.kg() % 8 != 0 || !aligned16(a.dy) || !aligned16(a.x)) {
      LaunchStatus st;
      st.what = "the tensor-core path needs NHWC, channels per group multiples of 8 and 16-byte aligned tensors";
      return st;
    }
    const int bn = wgrad_tc_bn(s);
    const Plan pl = wgrad_tc_plan(s, bn);
    TcWgradParams p;
    p.x = a.x, p.dy = a.dy, p.ws = static_cast<float*>(a.workspace);
    p.geo = forward_gather(s);
    p.div_pq = idx::FastDiv(s.p * s.q);
    p.div_q = idx::FastDiv(s.q);
    p.pixels = static_cast<int>(pixels);
    p.split_len = pl.split_len;
    p.cg = s.cg(), p.kg = s.kg(), p.kc = kc, p.k_out = s.k;
    p.n_tiles = static_cast<int>(cdiv(s.kg(), bn));
    const dim3 grid(static_cast<unsigned>(cdiv(kc, kBM) * p.n_tiles), static_cast<unsigned>(s.groups),
                    static_cast<unsigned>(pl.splits));
    return by_half_dtype(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      LaunchStatus st;
      if (bn == 128) {
        auto kernel = _conv2d_bwd_weight_tc_kernel<T, 128>;
        constexpr int smem = idx::TcCfg<128>::kPipeBytes;
        st = prepare(kernel, smem);
        if (!st.ok()) return st;
        kernel<<<grid, kThreads, smem, stream>>>(p);
      } else {
        auto kernel = _conv2d_bwd_weight_tc_kernel<T, 64>;
        constexpr int smem = idx::TcCfg<64>::kPipeBytes;
        st = prepare(kernel, smem);
        if (!st.ok()) return st;
        kernel<<<grid, kThreads, smem, stream>>>(p);
      }
      st = last_error();
      if (!st.ok()) return st;
      const int64_t count = static_cast<int64_t>(s.k) * kc;
      _split_sum_kernel<T, float><<<stride_blocks(count), 256, 0, stream>>>(p.ws, pl.splits, count,
                                                                           static_cast<T*>(a.dw), true, s.kg(), kc);
      return last_error();
    });
  }
  const Plan pl = wgrad_simt_plan(s);
  SimtWgradParams p;
  p.x = a.x, p.dy = a.dy, p.ws = a.workspace;
  p.geo = forward_gather(s);
  p.n = s.n;
  p.pixels = static_cast<int>(pixels);
  p.split_len = pl.split_len;
  p.cg = s.cg(), p.kg = s.kg(), p.kc = kc, p.k_out = s.k;
  p.n_tiles = static_cast<int>(cdiv(kc, kSN));
  const dim3 grid(static_cast<unsigned>(cdiv(s.kg(), kSM) * p.n_tiles), static_cast<unsigned>(s.groups),
                  static_cast<unsigned>(pl.splits));
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    if (s.nhwc) {
      _conv2d_bwd_weight_simt_kernel<T, true><<<grid, 256, 0, stream>>>(p);
    } else {
      _conv2d_bwd_weight_simt_kernel<T, false><<<grid, 256, 0, stream>>>(p);
    }
    LaunchStatus st = last_error();
    if (!st.ok()) return st;
    const int64_t count = static_cast<int64_t>(s.k) * kc;
    _split_sum_kernel<T, A><<<stride_blocks(count), 256, 0, stream>>>(static_cast<const A*>(p.ws), pl.splits, count,
                                                                        static_cast<T*>(a.dw), false, 1, 1);
    return last_error();
  });
}

size_t bgrad_workspace_bytes(const Shape& s, DType dtype) {
  return ws_bytes(chan_plan(s, s.k, 1).ws_elems, acc_size(dtype));
}

LaunchStatus conv2d_bgrad(const BiasGrad& a, cudaStream_t stream) {
  const Shape& s = a.s;
  const Plan pl = chan_plan(s, s.k, 1);
  ChanParams p;
  p.dy = a.dy, p.ws = a.workspace;
  p.geo = forward_gather(s);
  p.geo.in_c = s.k;
  p.geo.r = p.geo.s = 1;
  p.pixels = s.n * s.p * s.q;
  p.split_len = pl.split_len;
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_chan_reduce<T>(p, pl, s.nhwc, 1, static_cast<T*>(a.db), stream);
  });
}

}  // namespace mltoolkit::cuda_conv
