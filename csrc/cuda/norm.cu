// CUDA LayerNorm / RMSNorm with an optional fused residual add: forward, backward and the dweight/dbias reduction.
// Contract and math: csrc/norm.h. No torch headers here (compile time); the tensor glue is norm_cuda.cpp.
//
// Layout: a row of N elements is cut into vectors of 16 bytes (VEC = 16 / sizeof(x); scalar when N % VEC != 0 or a
// pointer is not 16-byte aligned). A row is handled by one warp (tpr = 32, 4 rows per CTA) or by one CTA of tpr <= 512
// threads; thread t owns vectors t, t + tpr, ... (NV of them). Both kernels are persistent "row walkers": a grid of
// SMs x occupancy CTAs, each walking a strided set of rows and staging the next rows' inputs in shared memory with
// cp.async while it computes the current one.
// Forward (<= 2048 vectors per row): statistics in two exact passes (mean, then sum((s - mean)^2); one pass of
// sum(s^2) for rms) with warp-shuffle + shared-memory reductions, then the write pass. Larger rows: one CTA of 512
// threads per row re-reads the row (from L2) in each pass.
// Backward: dx per row; dweight/dbias partial sums stay in registers (float32; float64 for float64 x) for all the
// walker's rows and are written as one partial row per walker to a workspace; a second kernel sums the partials
// column-wise in a fixed order (deterministic). Rows over 512 * NV vectors: the two row sums are computed first by a
// row kernel, and the walkers split the columns into chunks.
// In the spirit of the Apex / flash-attention / TransformerEngine layer norm kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "norm_launch.h"

namespace mltoolkit::cuda_norm {
namespace {

constexpr int kMaxRowThreads = 512;     // threads per row, staged (row walker) kernels
constexpr int kLargeThreads = 512;      // threads per row, re-reading paths
constexpr int kMinRowsPerWalker = 8;    // backward: below this, partial rows cost more than they save
constexpr int64_t kMaxGrid = 1 << 30;   // grid.x cap; kernels loop over the rest

// Vectors per thread in flight in the re-reading paths: 4, or 2 when a weight vector is 32 bytes (float32 weight
// with a 16-bit x), which keeps those kernels under their register cap.
template <typename W, int VEC>
constexpr int large_unroll() {
  return VEC * int(sizeof(W)) > 16 ? 2 : 4;
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// ------------------------------------------------------------------------------------------------------------------
// Element conversions and vector access.

template <typename D, typename A>
__device__ __forceinline__ D store_cvt(A v) {
  if constexpr (std::is_same_v<D, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<D, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<D>(v);
  }
}

template <typename A>
__device__ __forceinline__ A acc_rsqrt(A v) {
  if constexpr (std::is_same_v<A, double>) {
    return 1.0 / sqrt(v);
  } else {
    return rsqrtf(v);
  }
}

// VEC consecutive elements of T held as raw 32-bit words (16-bit pairs packed two to a word), moved with
// accesses of at most 16 bytes; conversions are bit operations. Keeping the storage integral lets the compiler
// keep everything in registers (arrays of __half/__nv_bfloat16 structs ended in local memory). The address must be
// aligned to min(16, VEC * sizeof(T)) bytes; the launchers check that before choosing VEC > 1.
template <typename T>
constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16>;

template <typename T, int VEC>
struct Raw {
  static constexpr int kBytes = VEC * int(sizeof(T));
  static_assert(kBytes == 2 || kBytes == 4 || kBytes == 8 || kBytes % 16 == 0, "unsupported vector size");
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  uint32_t w[kWords];  // kBytes == 2: the low 16 bits of w[0]

  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kBytes == 2) {
      w[0] = *reinterpret_cast<const uint16_t*>(p);
    } else if constexpr (kBytes == 4) {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    } else if constexpr (kBytes == 8) {
      const uint2 t = *reinterpret_cast<const uint2*>(p);
      w[0] = t.x;
      w[1] = t.y;
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        const uint4 t = reinterpret_cast<const uint4*>(p)[i];
        w[4 * i] = t.x;
        w[4 * i + 1] = t.y;
        w[4 * i + 2] = t.z;
        w[4 * i + 3] = t.w;
      }
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kBytes == 2) {
      *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(w[0]);
    } else if constexpr (kBytes == 4) {
      *reinterpret_cast<uint32_t*>(p) = w[0];
    } else if constexpr (kBytes == 8) {
      *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        reinterpret_cast<uint4*>(p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
      }
    }
  }
  // Hides the words' values from the optimizer, so that later conversions are recomputed from these registers
  // rather than kept alive as float copies (twice the registers for 16-bit data).
  __device__ __forceinline__ void opaque() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) asm volatile("" : "+r"(w[i]));
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
  }
  // Element e (a compile-time constant after unrolling) as A.
  template <typename A>
  __device__ __forceinline__ A get(int e) const {
    if constexpr (std::is_same_v<T, float>) {
      return static_cast<A>(__uint_as_float(w[e]));
    } else if constexpr (std::is_same_v<T, double>) {
      return static_cast<A>(__hiloint2double(static_cast<int>(w[2 * e + 1]), static_cast<int>(w[2 * e])));
    } else {
      const uint32_t word = w[e >> 1];
      if constexpr (kIsBf16<T>) {
        return static_cast<A>(__uint_as_float((e & 1) ? (word & 0xffff0000u) : (word << 16)));
      } else {
        return static_cast<A>(
            __half2float(__ushort_as_half(static_cast<unsigned short>((e & 1) ? (word >> 16) : (word & 0xffffu)))));
      }
    }
  }
  // All VEC elements from A values, rounded to nearest.
  template <typename A>
  __device__ __forceinline__ void pack(const A (&v)[VEC]) {
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) w[e] = __float_as_uint(static_cast<float>(v[e]));
    } else if constexpr (std::is_same_v<T, double>) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const double d = static_cast<double>(v[e]);
        w[2 * e] = static_cast<uint32_t>(__double2loint(d));
        w[2 * e + 1] = static_cast<uint32_t>(__double2hiint(d));
      }
    } else if constexpr (VEC == 1) {
      const float f = static_cast<float>(v[0]);
      w[0] = kIsBf16<T> ? __bfloat16_as_ushort(__float2bfloat16_rn(f)) : __half_as_ushort(__float2half_rn(f));
    } else {
#pragma unroll
      for (int i = 0; i < VEC / 2; ++i) {
        const float lo = static_cast<float>(v[2 * i]);
        const float hi = static_cast<float>(v[2 * i + 1]);
        if constexpr (kIsBf16<T>) {
          const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo: the lower address
          w[i] = *reinterpret_cast<const uint32_t*>(&h);
        } else {
          const __half2 h = __floats2half2_rn(lo, hi);
          w[i] = *reinterpret_cast<const uint32_t*>(&h);
        }
      }
    }
  }
  // Every element = v.
  template <typename A>
  __device__ __forceinline__ void fill(A v) {
    A t[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) t[e] = v;
    pack(t);
  }
};

// Global -> shared copies of BYTES (2, 4, 8 or 16) that complete asynchronously (cp.async, sm_80+); 2-byte copies
// and older targets copy synchronously. Completion is per thread: cp_async_wait<N>() returns once at most N of this
// thread's committed groups are still in flight.
template <int BYTES>
__device__ __forceinline__ void copy_async(void* smem, const void* gmem) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (BYTES >= 4) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    if constexpr (BYTES == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(gmem), "n"(BYTES) : "memory");
    }
    return;
  }
#endif
  if constexpr (BYTES == 16) {
    *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
  } else if constexpr (BYTES == 8) {
    *static_cast<uint2*>(smem) = *static_cast<const uint2*>(gmem);
  } else if constexpr (BYTES == 4) {
    *static_cast<uint32_t*>(smem) = *static_cast<const uint32_t*>(gmem);
  } else {
    *static_cast<uint16_t*>(smem) = *static_cast<const uint16_t*>(gmem);
  }
}
__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// Waits until at most stages - 1 committed groups are in flight, i.e. the oldest slot of a ring of `stages` buffers
// (2 .. kMaxRingStages, one group per slot) has landed.
constexpr int kMaxRingStages = 5;
__device__ __forceinline__ void cp_async_wait_ring(int stages) {
  switch (stages) {
    case 5: cp_async_wait<4>(); break;
    case 4: cp_async_wait<3>(); break;
    case 3: cp_async_wait<2>(); break;
    default: cp_async_wait<1>(); break;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Reductions. All lanes of a warp end with the same bits (xor butterfly), and every warp of a row reads the same
// partials in the same order, so the whole row agrees on the result.

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums K values over the row. One row per CTA when blockDim.x > 32 (then every thread of the CTA must call this).
// smem[parity] alternates between calls: a thread that writes smem[p] in call k+2 has passed the barrier of call
// k+1, which every thread reaches only after reading smem[p] in call k. So one barrier per call is enough.
template <typename A, int K>
__device__ __forceinline__ void row_allreduce(A (&v)[K], A (*smem)[K][32], int& parity) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (blockDim.x == 32) return;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[parity][k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < nwarps ? smem[parity][k][lane] : A(0));
  parity ^= 1;
}

// ------------------------------------------------------------------------------------------------------------------
// Forward.

struct FwdArgs {
  const void* x;
  const void* res;
  const void* w;
  const void* b;
  void* y;
  void* res_out;
  void* mean;
  void* rstd;
  int64_t M;
  int N;
  int nvec;    // N / VEC
  int stages;  // shared-memory ring depth of _norm_fwd_kernel: 2 or 3
  double eps;
  bool is_rms, has_res, has_w, has_b;
};

// Row walkers, like the backward: blockDim = (tpr, walkers per CTA), walkers per CTA > 1 only when tpr == 32;
// a persistent grid (SMs x occupancy CTAs). Thread t owns the vectors t, t + tpr, ..., t + (NV-1) * tpr of each row
// of its walker. Rows go through a ring of a.stages shared-memory buffers filled by cp.async, so the next row's
// x (and residual) is in flight while this one is computed; each pass (sum, sum of squared deviations, write)
// re-reads the thread's own slots (no barrier; a buffer is refilled only in the iteration after the one that read
// it) and recomputes s = round(x + residual), which keeps the registers few and the CTAs per SM many.
// Dynamic shared memory: stages * (1 or 2) * NV * threads * sizeof(vector) bytes.
template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(kMaxRowThreads) _norm_fwd_kernel(const FwdArgs a) {
  using A = typename AccOf<T>::type;
  using R = Raw<T, VEC>;
  constexpr int kB = R::kBytes;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ res = static_cast<const T*>(a.res);
  const W* __restrict__ w = static_cast<const W*>(a.w);
  const W* __restrict__ b = static_cast<const W*>(a.b);
  T* __restrict__ y = static_cast<T*>(a.y);
  T* __restrict__ res_out = static_cast<T*>(a.res_out);
  A* __restrict__ mean_out = static_cast<A*>(a.mean);
  A* __restrict__ rstd_out = static_cast<A*>(a.rstd);

  __shared__ A red[2][1][32];
  extern __shared__ __align__(16) unsigned char stage[];  // [stages][x(, residual)][NV][threads per CTA][kB]
  int parity = 0;
  const int tpr = blockDim.x;
  const int tid = threadIdx.x;
  const int lt = threadIdx.y * blockDim.x + threadIdx.x;
  const int cta_threads = blockDim.x * blockDim.y;
  const int ntensors = a.has_res ? 2 : 1;
  const int64_t walker = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t nwalkers = int64_t(gridDim.x) * blockDim.y;
  const A inv_n = A(1) / A(a.N);
  const A eps = static_cast<A>(a.eps);

  auto slot = [&](int buf, int t, int j) -> unsigned char* {
    return stage + ((int64_t(buf * ntensors + t) * NV + j) * cta_threads + lt) * kB;
  };
  auto issue_row = [&](int64_t r, int buf) {
    const int64_t off = r * a.N;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int vi = j * tpr + tid;
      if (vi < a.nvec) {
        copy_async<kB>(slot(buf, 0, j), x + off + int64_t(vi) * VEC);
        if (a.has_res) copy_async<kB>(slot(buf, 1, j), res + off + int64_t(vi) * VEC);
      }
    }
  };
  // s for vector j of the row in `buf`: x, or x + residual added in A and rounded to T.
  auto load_s = [&](int buf, int j, R& sv) {
    sv.load(reinterpret_cast<const T*>(slot(buf, 0, j)));
    if (a.has_res) {
      R rv;
      rv.load(reinterpret_cast<const T*>(slot(buf, 1, j)));
      A t[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) t[e] = sv.template get<A>(e) + rv.template get<A>(e);
      sv.pack(t);
    }
  };

  const int stages = a.stages;
#pragma unroll 1
  for (int i = 0; i < stages - 1; ++i) {
    const int64_t r = walker + i * nwalkers;
    if (r < a.M) issue_row(r, i);
    cp_async_commit();
  }
  int buf = 0;
#pragma unroll 1
  for (int64_t row = walker; row < a.M; row += nwalkers) {
    const int64_t off = row * a.N;
    const int64_t ahead = row + (stages - 1) * nwalkers;
    const int abuf = buf == 0 ? stages - 1 : buf - 1;  // == (buf + stages - 1) % stages: read in the last iteration
    if (ahead < a.M) issue_row(ahead, abuf);
    cp_async_commit();
    cp_async_wait_ring(stages);

    // Pass 1: residual_out, and sum(s) (layer) or sum(s^2) (rms).
    A acc[1] = {A(0)};
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int vi = j * tpr + tid;
      if (vi < a.nvec) {
        R sv;
        load_s(buf, j, sv);
        if (a.has_res) sv.store(res_out + off + int64_t(vi) * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A v = sv.template get<A>(e);
          acc[0] += a.is_rms ? v * v : v;
        }
      }
    }
    row_allreduce(acc, red, parity);
    A mean = A(0);
    A sq = acc[0];
    if (!a.is_rms) {
      mean = acc[0] * inv_n;
      // Pass 2: sum((s - mean)^2), exact two-pass variance.
      A q[1] = {A(0)};
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        if (j * tpr + tid < a.nvec) {
          R sv;
          load_s(buf, j, sv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A d = sv.template get<A>(e) - mean;
            q[0] += d * d;
          }
        }
      }
      row_allreduce(q, red, parity);
      sq = q[0];
    }
    const A rstd = acc_rsqrt(sq * inv_n + eps);

    // Pass 3: y.
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int vi = j * tpr + tid;
      if (vi < a.nvec) {
        Raw<W, VEC> wv, bv;
        if (a.has_w) wv.load(w + int64_t(vi) * VEC);
        if (a.has_b) bv.load(b + int64_t(vi) * VEC);
        R sv;
        load_s(buf, j, sv);
        A o[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          A v = (sv.template get<A>(e) - mean) * rstd;
          if (a.has_w) v *= wv.template get<A>(e);
          if (a.has_b) v += bv.template get<A>(e);
          o[e] = v;
        }
        R out;
        out.pack(o);
        out.store(y + off + int64_t(vi) * VEC);
      }
    }
    if (tid == 0) {
      if (!a.is_rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    buf = buf + 1 == stages ? 0 : buf + 1;
  }
  cp_async_wait<0>();  // nothing may still be writing this CTA's shared memory when it exits
}

// Large N: one CTA per row, three passes over the row (two for rms); the later passes read s back (from
// residual_out when there is a residual: written by this same thread in pass 1, so no barrier is needed), which
// stays in L2. res_out is deliberately not __restrict__: it is written and read back.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kLargeThreads) _norm_fwd_large_kernel(const FwdArgs a) {
  using A = typename AccOf<T>::type;
  constexpr int U = large_unroll<W, VEC>();
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ res = static_cast<const T*>(a.res);
  const W* __restrict__ w = static_cast<const W*>(a.w);
  const W* __restrict__ b = static_cast<const W*>(a.b);
  T* __restrict__ y = static_cast<T*>(a.y);
  T* res_out = static_cast<T*>(a.res_out);
  A* __restrict__ mean_out = static_cast<A*>(a.mean);
  A* __restrict__ rstd_out = static_cast<A*>(a.rstd);
  const T* src = a.has_res ? static_cast<const T*>(res_out) : static_cast<const T*>(a.x);

  __shared__ A red[2][1][32];
  int parity = 0;
  const int tpr = blockDim.x;
  const int tid = threadIdx.x;
  const A inv_n = A(1) / A(a.N);
  const A eps = static_cast<A>(a.eps);

  for (int64_t row = blockIdx.x; row < a.M; row += gridDim.x) {
    const int64_t off = row * a.N;
    // Pass 1: s (and residual_out), sum (layer) or sum of squares (rms).
    A acc[1] = {A(0)};
#pragma unroll 1
    for (int base = 0; base < a.nvec; base += U * tpr) {
      Raw<T, VEC> s[U], r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = base + u * tpr + tid;
        if (vi < a.nvec) {
          s[u].load(x + off + int64_t(vi) * VEC);
          if (a.has_res) r[u].load(res + off + int64_t(vi) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = base + u * tpr + tid;
        if (vi < a.nvec) {
          if (a.has_res) {
            A t[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) t[e] = s[u].template get<A>(e) + r[u].template get<A>(e);
            s[u].pack(t);
            s[u].store(res_out + off + int64_t(vi) * VEC);
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A v = s[u].template get<A>(e);
            acc[0] += a.is_rms ? v * v : v;
          }
        }
      }
    }
    row_allreduce(acc, red, parity);
    A mean = A(0);
    A sq = acc[0];
    if (!a.is_rms) {
      mean = acc[0] * inv_n;
      // Pass 2: sum((s - mean)^2).
      A q[1] = {A(0)};
#pragma unroll 1
      for (int base = 0; base < a.nvec; base += U * tpr) {
        Raw<T, VEC> s[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int vi = base + u * tpr + tid;
          if (vi < a.nvec) s[u].load(src + off + int64_t(vi) * VEC);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int vi = base + u * tpr + tid;
          if (vi < a.nvec) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const A d = s[u].template get<A>(e) - mean;
              q[0] += d * d;
            }
          }
        }
      }
      row_allreduce(q, red, parity);
      sq = q[0];
    }
    const A rstd = acc_rsqrt(sq * inv_n + eps);
    // Pass 3: y.
#pragma unroll 1
    for (int base = 0; base < a.nvec; base += U * tpr) {
      Raw<T, VEC> s[U];
      Raw<W, VEC> wv[U], bv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = base + u * tpr + tid;
        if (vi < a.nvec) {
          s[u].load(src + off + int64_t(vi) * VEC);
          if (a.has_w) wv[u].load(w + int64_t(vi) * VEC);
          if (a.has_b) bv[u].load(b + int64_t(vi) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = base + u * tpr + tid;
        if (vi < a.nvec) {
          A o[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            A v = (s[u].template get<A>(e) - mean) * rstd;
            if (a.has_w) v *= wv[u].template get<A>(e);
            if (a.has_b) v += bv[u].template get<A>(e);
            o[e] = v;
          }
          Raw<T, VEC> out;
          out.pack(o);
          out.store(y + off + int64_t(vi) * VEC);
        }
      }
    }
    if (tid == 0) {
      if (!a.is_rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Backward.

struct BwdArgs {
  const void* dy;
  const void* x;
  const void* w;
  const void* mean;
  const void* rstd;
  const void* dres;
  void* dx;
  void* ws_dw;           // A [nwalkers][N] or nullptr
  void* ws_db;           // A [nwalkers][N] or nullptr
  void* rowstats;        // A [M][2]: mean_row(g), mean_row(g * xhat); precomputed when chunked, else nullptr
  int64_t M;
  int N;
  int nvec;
  int stages;  // shared-memory ring depth of _norm_bwd_kernel: 2 .. kMaxRingStages
  bool is_rms, has_w, has_dres;
};

// Row walkers. blockDim = (tpr, walkers per CTA); walkers per CTA > 1 only when tpr == 32. grid = (walker CTAs,
// column chunks); chunk c covers vectors [c * tpr * NV, (c + 1) * tpr * NV), and then rowstats is given.
// A walker's rows go through a ring of a.stages (2 .. kMaxRingStages) shared-memory buffers: the copies (cp.async)
// of rows k+1 .. k+stages-1 (x, dy, dresidual_out) are in flight while row k is computed from its buffer, which is
// read twice (the row sums, then dx), so registers hold only the weight and the dweight/dbias accumulators. Every
// thread reads back only the slots it filled itself, so no barrier is needed; it refills a buffer only in the
// iteration after the one that read it, whose results were consumed in registers by then (in-order issue). Dynamic
// shared memory: stages * (2 or 3) * NV * threads * sizeof(vector) bytes.
template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(kMaxRowThreads) _norm_bwd_kernel(const BwdArgs a) {
  using A = typename AccOf<T>::type;
  using R = Raw<T, VEC>;
  constexpr int kB = R::kBytes;
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const W* __restrict__ w = static_cast<const W*>(a.w);
  const A* __restrict__ mean_in = static_cast<const A*>(a.mean);
  const A* __restrict__ rstd_in = static_cast<const A*>(a.rstd);
  const T* __restrict__ dres = static_cast<const T*>(a.dres);
  const A* __restrict__ rowstats = static_cast<const A*>(a.rowstats);
  T* __restrict__ dx = static_cast<T*>(a.dx);

  __shared__ A red[2][2][32];
  extern __shared__ __align__(16) unsigned char stage[];  // [stages][x, dy(, dres)][NV][threads per CTA][kB]
  int parity = 0;
  const int tpr = blockDim.x;
  const int tid = threadIdx.x;
  const int lt = threadIdx.y * blockDim.x + threadIdx.x;
  const int cta_threads = blockDim.x * blockDim.y;
  const int ntensors = a.has_dres ? 3 : 2;
  const int64_t walker = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t nwalkers = int64_t(gridDim.x) * blockDim.y;
  const int vbase = blockIdx.y * tpr * NV;
  const bool stats_given = rowstats != nullptr;
  const A inv_n = A(1) / A(a.N);

  auto slot = [&](int buf, int t, int j) -> unsigned char* {
    return stage + ((int64_t(buf * ntensors + t) * NV + j) * cta_threads + lt) * kB;
  };
  auto issue_row = [&](int64_t r, int buf) {
    const int64_t off = r * a.N;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int vi = vbase + j * tpr + tid;
      if (vi < a.nvec) {
        const int64_t o = off + int64_t(vi) * VEC;
        copy_async<kB>(slot(buf, 0, j), x + o);
        copy_async<kB>(slot(buf, 1, j), dy + o);
        if (a.has_dres) copy_async<kB>(slot(buf, 2, j), dres + o);
      }
    }
  };
  auto load_scalars = [&](int64_t r, A& m, A& rs, A& c1, A& c2) {
    m = a.is_rms ? A(0) : mean_in[r];
    rs = rstd_in[r];
    if (stats_given) {
      c1 = rowstats[2 * r];
      c2 = rowstats[2 * r + 1];
    }
  };

  // Weight (1 where there is none) stays in registers for all rows.
  Raw<W, VEC> wv[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int vi = vbase + j * tpr + tid;
    if (a.has_w && vi < a.nvec) {
      wv[j].load(w + int64_t(vi) * VEC);
    } else {
      wv[j].fill(A(1));
    }
  }
  A dw_acc[NV][VEC], db_acc[NV][VEC];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw_acc[j][e] = db_acc[j][e] = A(0);
  }

  // One commit group per row slot, empty past the last row, so that "at most stages-1 groups pending" always
  // means "this row has landed".
  const int stages = a.stages;
#pragma unroll 1
  for (int i = 0; i < stages - 1; ++i) {
    const int64_t r = walker + i * nwalkers;
    if (r < a.M) issue_row(r, i);
    cp_async_commit();
  }
  A mean = A(0), rstd = A(0), c1 = A(0), c2 = A(0);
  if (walker < a.M) load_scalars(walker, mean, rstd, c1, c2);
  int buf = 0;
#pragma unroll 1
  for (int64_t row = walker; row < a.M; row += nwalkers) {
    const int64_t off = row * a.N;
    const int64_t ahead = row + (stages - 1) * nwalkers;
    const int abuf = buf == 0 ? stages - 1 : buf - 1;  // == (buf + stages - 1) % stages: read in the last iteration
    if (ahead < a.M) issue_row(ahead, abuf);
    cp_async_commit();
    const int64_t next = row + nwalkers;
    A nmean = A(0), nrstd = A(0), nc1 = A(0), nc2 = A(0);
    if (next < a.M) load_scalars(next, nmean, nrstd, nc1, nc2);  // a row ahead, in registers
    cp_async_wait_ring(stages);

    A sums[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      wv[j].opaque();  // keep the weight as raw words across rows, not as hoisted float copies
      if (vbase + j * tpr + tid < a.nvec) {
        R rx, rdy;
        rx.load(reinterpret_cast<const T*>(slot(buf, 0, j)));
        rdy.load(reinterpret_cast<const T*>(slot(buf, 1, j)));
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A xhat = (rx.template get<A>(e) - mean) * rstd;
          const A d = rdy.template get<A>(e);
          const A g = d * wv[j].template get<A>(e);
          dw_acc[j][e] += d * xhat;
          db_acc[j][e] += d;
          sums[0] += g;
          sums[1] += g * xhat;
        }
      }
    }
    A m1, m2;
    if (stats_given) {
      m1 = c1;
      m2 = c2;
    } else {
      row_allreduce(sums, red, parity);
      m1 = sums[0] * inv_n;
      m2 = sums[1] * inv_n;
    }
    if (a.is_rms) m1 = A(0);

#pragma unroll
    for (int j = 0; j < NV; ++j) {
      wv[j].opaque();
      const int vi = vbase + j * tpr + tid;
      if (vi < a.nvec) {
        R rx, rdy, rdr;
        rx.load(reinterpret_cast<const T*>(slot(buf, 0, j)));
        rdy.load(reinterpret_cast<const T*>(slot(buf, 1, j)));
        if (a.has_dres) rdr.load(reinterpret_cast<const T*>(slot(buf, 2, j)));
        A o[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A xhat = (rx.template get<A>(e) - mean) * rstd;
          const A g = rdy.template get<A>(e) * wv[j].template get<A>(e);
          A v = rstd * (g - m1 - xhat * m2);
          if (a.has_dres) v += rdr.template get<A>(e);
          o[e] = v;
        }
        R out;
        out.pack(o);
        out.store(dx + off + int64_t(vi) * VEC);
      }
    }
    mean = nmean;
    rstd = nrstd;
    c1 = nc1;
    c2 = nc2;
    buf = buf + 1 == stages ? 0 : buf + 1;
  }
  cp_async_wait<0>();  // nothing may still be writing this CTA's shared memory when it exits

  // One partial row per walker (zeros for a walker without rows).
  A* ws_dw = static_cast<A*>(a.ws_dw);
  A* ws_db = static_cast<A*>(a.ws_db);
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int vi = vbase + j * tpr + tid;
    if (vi < a.nvec) {
      const int64_t o = walker * a.N + int64_t(vi) * VEC;
      if (ws_dw != nullptr) {
        Raw<A, VEC> t;
        t.pack(dw_acc[j]);
        t.store(ws_dw + o);
      }
      if (ws_db != nullptr) {
        Raw<A, VEC> t;
        t.pack(db_acc[j]);
        t.store(ws_db + o);
      }
    }
  }
}

// Large N, before the chunked walkers: rowstats[r] = {mean_row(g), mean_row(g * xhat)}. One CTA per row.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kLargeThreads) _norm_bwd_rowstats_kernel(const BwdArgs a) {
  using A = typename AccOf<T>::type;
  constexpr int U = large_unroll<W, VEC>();
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const W* __restrict__ w = static_cast<const W*>(a.w);
  const A* __restrict__ mean_in = static_cast<const A*>(a.mean);
  const A* __restrict__ rstd_in = static_cast<const A*>(a.rstd);
  A* __restrict__ rowstats = static_cast<A*>(a.rowstats);

  __shared__ A red[2][2][32];
  int parity = 0;
  const int tpr = blockDim.x;
  const int tid = threadIdx.x;
  const A inv_n = A(1) / A(a.N);

  for (int64_t row = blockIdx.x; row < a.M; row += gridDim.x) {
    const int64_t off = row * a.N;
    const A mean = a.is_rms ? A(0) : mean_in[row];
    const A rstd = rstd_in[row];
    A sums[2] = {A(0), A(0)};
#pragma unroll 1
    for (int base = 0; base < a.nvec; base += U * tpr) {
      Raw<T, VEC> rx[U], rdy[U];
      Raw<W, VEC> rw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = base + u * tpr + tid;
        if (vi < a.nvec) {
          rx[u].load(x + off + int64_t(vi) * VEC);
          rdy[u].load(dy + off + int64_t(vi) * VEC);
          if (a.has_w) rw[u].load(w + int64_t(vi) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = base + u * tpr + tid;
        if (vi < a.nvec) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A xhat = (rx[u].template get<A>(e) - mean) * rstd;
            A g = rdy[u].template get<A>(e);
            if (a.has_w) g *= rw[u].template get<A>(e);
            sums[0] += g;
            sums[1] += g * xhat;
          }
        }
      }
    }
    row_allreduce(sums, red, parity);
    if (tid == 0) {
      rowstats[2 * row] = sums[0] * inv_n;
      rowstats[2 * row + 1] = sums[1] * inv_n;
    }
  }
}

struct ColReduceArgs {
  const void* ws[2];  // A [nwalkers][N]: dweight, dbias partials
  void* out[2];       // (N) in out_dtype[i]; nullptr: skip
  DType out_dtype[2];
  int64_t nwalkers;
  int64_t N;
};

template <typename A, typename D>
__device__ __forceinline__ void store_as(void* out, int64_t i, A v) {
  static_cast<D*>(out)[i] = store_cvt<D>(v);
}

// out[i][col] = sum over walkers of ws[i][walker][col], in a fixed order. blockDim = (32, 8), grid = (cols/32, 2).
template <typename A>
__global__ void __launch_bounds__(256) _norm_bwd_colreduce_kernel(const ColReduceArgs a) {
  const bool is_db = blockIdx.y != 0;  // selects with branches: indexing the parameter arrays would copy them
  void* out = is_db ? a.out[1] : a.out[0];
  if (out == nullptr) return;  // uniform over the CTA
  const A* __restrict__ ws = static_cast<const A*>(is_db ? a.ws[1] : a.ws[0]);
  const DType out_dtype = is_db ? a.out_dtype[1] : a.out_dtype[0];
  __shared__ A part[8][33];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  A acc = A(0);
  if (col < a.N) {
    int64_t wk = threadIdx.y;
#pragma unroll 4
    for (; wk < a.nwalkers; wk += 8) acc += ws[wk * a.N + col];
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < a.N) {
    A t = A(0);
#pragma unroll
    for (int k = 0; k < 8; ++k) t += part[k][threadIdx.x];
    switch (out_dtype) {
      case DType::kFloat32: store_as<A, float>(out, col, t); break;
      case DType::kFloat64: store_as<A, double>(out, col, t); break;
      case DType::kFloat16: store_as<A, __half>(out, col, t); break;
      case DType::kBFloat16: store_as<A, __nv_bfloat16>(out, col, t); break;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Host side.

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>, Tag<W>) for the (x dtype, weight dtype) pair; false for a pair that is not supported.
template <typename F>
bool dispatch_types(DType xt, DType wt, F&& f) {
  switch (xt) {
    case DType::kFloat32:
      if (wt != DType::kFloat32) return false;
      f(Tag<float>{}, Tag<float>{});
      return true;
    case DType::kFloat64:
      if (wt == DType::kFloat64) f(Tag<double>{}, Tag<double>{});
      else if (wt == DType::kFloat32) f(Tag<double>{}, Tag<float>{});
      else return false;
      return true;
    case DType::kFloat16:
      if (wt == DType::kFloat16) f(Tag<__half>{}, Tag<__half>{});
      else if (wt == DType::kFloat32) f(Tag<__half>{}, Tag<float>{});
      else return false;
      return true;
    case DType::kBFloat16:
      if (wt == DType::kBFloat16) f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      else if (wt == DType::kFloat32) f(Tag<__nv_bfloat16>{}, Tag<float>{});
      else return false;
      return true;
  }
  return false;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int round_up32(int64_t v) { return int(ceil_div(v, 32) * 32); }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int64_t align256(int64_t v) { return ceil_div(v, 256) * 256; }

constexpr int kMaxDevices = 64;

int sm_count(int device) {
  static std::mutex mu;
  static int cache[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) {
      cudaGetLastError();  // not sticky; do not leave it for the launch check
      v = 108;
    }
    cache[device] = v;
  }
  return cache[device];
}

int smem_optin(int device) {
  static std::mutex mu;
  static int cache[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || v <= 0) {
      cudaGetLastError();
      v = 48 * 1024;
    }
    cache[device] = v;
  }
  return cache[device];
}

// Raises a kernel's dynamic shared memory limit once per (kernel, device, size). Done for every size: the 48 KB
// default covers static + dynamic bytes together, so a kernel with a static buffer fails at exactly 48 KB dynamic.
cudaError_t allow_smem(const void* kernel, int bytes, int device) {
  if (bytes <= 0) return cudaSuccess;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> done;
  std::lock_guard<std::mutex> lock(mu);
  int& have = done[std::make_pair(kernel, device)];
  if (have >= bytes) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) have = bytes;
  return e;
}

int blocks_per_sm(const void* kernel, int threads, int smem_bytes, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int>, int> cache;
  const auto key = std::make_tuple(kernel, threads, smem_bytes, device);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int v = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, size_t(smem_bytes)) != cudaSuccess || v <= 0) {
    cudaGetLastError();
    v = 1;
  }
  cache.emplace(key, v);
  return v;
}

template <typename T, typename W, int VEC, int NV>
const void* fwd_kernel_ptr() {
  return reinterpret_cast<const void*>(&_norm_fwd_kernel<T, W, VEC, NV>);
}

template <typename T, typename W, int VEC, int NV>
cudaError_t launch_fwd_rows(FwdArgs a, dim3 block, int device, cudaStream_t stream, bool* fits) {
  const void* kernel = fwd_kernel_ptr<T, W, VEC, NV>();
  const int threads = int(block.x * block.y);
  const int per_stage = (a.has_res ? 2 : 1) * NV * threads * VEC * int(sizeof(T));
  const int budget = smem_optin(device) - 2048;  // leave room for the static reduction buffer
  // Two stages (one row in flight per walker while one is computed) with several CTAs per SM, or one CTA with three.
  a.stages = 2;
  int smem = 2 * per_stage;
  if (smem > budget && smem > 48 * 1024) {
    *fits = false;
    return cudaSuccess;
  }
  *fits = true;
  if (cudaError_t e = allow_smem(kernel, smem, device); e != cudaSuccess) return e;
  int occ = blocks_per_sm(kernel, threads, smem, device);
  if (occ == 1 && 3 * per_stage <= budget) {
    a.stages = 3;
    smem = 3 * per_stage;
    if (cudaError_t e = allow_smem(kernel, smem, device); e != cudaSuccess) return e;
  }
  const int64_t walker_ctas = ceil_div(a.M, block.y);
  const int64_t resident = int64_t(sm_count(device)) * occ;
  // Spread the rows evenly: every CTA gets ceil(M / CTAs) or one fewer walker rows.
  int64_t ctas = walker_ctas < resident ? walker_ctas : resident;
  ctas = ceil_div(walker_ctas, ceil_div(walker_ctas, ctas));
  _norm_fwd_kernel<T, W, VEC, NV><<<unsigned(ctas), block, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename W, int VEC>
cudaError_t launch_fwd(const FwdArgs& a, int device, cudaStream_t stream) {
  const int nvec = a.nvec;
  if (nvec <= 4 * kMaxRowThreads) {
    dim3 block(32, 4);
    bool fits = false;
    cudaError_t e;
    if (nvec <= 32) {
      e = launch_fwd_rows<T, W, VEC, 1>(a, block, device, stream, &fits);
    } else if (nvec <= 64) {
      e = launch_fwd_rows<T, W, VEC, 2>(a, block, device, stream, &fits);
    } else {
      if (nvec > 128) block = dim3(round_up32(ceil_div(nvec, 4)), 1);
      e = launch_fwd_rows<T, W, VEC, 4>(a, block, device, stream, &fits);
    }
    if (e != cudaSuccess || fits) return e;
  }
  // Large rows (or too little shared memory for the staged kernel): one CTA per row, re-reading the row from L2.
  const unsigned grid = unsigned(a.M < kMaxGrid ? a.M : kMaxGrid);
  _norm_fwd_large_kernel<T, W, VEC><<<grid, kLargeThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// Backward register budget: the weight and the two accumulators hold NV * VEC elements each; 16-byte vectors get
// NV <= 2 (16 float accumulators each for 16-bit x), scalars NV <= 4.
template <int VEC>
constexpr int bwd_nv_max() {
  return VEC == 1 ? 4 : 2;
}

template <typename T, typename W, int VEC, int NV>
const void* bwd_kernel_ptr() {
  return reinterpret_cast<const void*>(&_norm_bwd_kernel<T, W, VEC, NV>);
}

template <typename T, typename W, int VEC>
const void* bwd_kernel_for(int nv) {
  if constexpr (bwd_nv_max<VEC>() >= 4) {
    if (nv == 4) return bwd_kernel_ptr<T, W, VEC, 4>();
  }
  if (nv == 2) return bwd_kernel_ptr<T, W, VEC, 2>();
  return bwd_kernel_ptr<T, W, VEC, 1>();
}

template <typename T, typename W, int VEC>
void plan_bwd(const BwdParams& p, BwdPlan& plan) {
  using A = typename AccOf<T>::type;
  const int64_t nvec = p.N / VEC;
  constexpr int nv_max = bwd_nv_max<VEC>();
  plan.vec = VEC;
  if (nvec <= 32 * nv_max) {
    plan.tpr = 32;
    plan.rows_per_cta = 4;
    plan.nv = nvec <= 32 ? 1 : nvec <= 64 ? 2 : 4;
    plan.chunks = 1;
  } else if (nvec <= int64_t(kMaxRowThreads) * nv_max) {
    plan.nv = nv_max;
    plan.tpr = round_up32(ceil_div(nvec, nv_max));
    plan.rows_per_cta = 1;
    plan.chunks = 1;
  } else {
    plan.nv = nv_max;
    plan.tpr = kMaxRowThreads;
    plan.rows_per_cta = 1;
    plan.chunks = ceil_div(nvec, int64_t(kMaxRowThreads) * nv_max);
    if (plan.chunks > 65535) {
      plan.what = "N is too large for the CUDA norm backward (more than 65535 column chunks)";
      return;
    }
  }
  const int threads = plan.tpr * plan.rows_per_cta;
  const int ntensors = p.dresidual_out != nullptr ? 3 : 2;
  const int per_stage = ntensors * plan.nv * threads * VEC * int(sizeof(T));  // <= 48 KB
  const int budget = smem_optin(p.device) - 2048;  // leave room for the static reduction buffer
  // A CTA per row (wide rows, 1 CTA per SM at bf16 N = 8192) takes the deepest ring shared memory allows: two rows in
  // flight per SM (3 stages) left the backward at ~58% of the H200's bandwidth, limited by bytes in flight
  // (benchmarks/NOTES-norm-gpu.md). Narrow rows (4 walkers a CTA, several CTAs per SM) keep 3 stages and occupancy.
  const int max_stages = plan.rows_per_cta == 1 ? kMaxRingStages : 3;
  plan.stages = 2;
  while (plan.stages < max_stages && (plan.stages + 1) * per_stage <= budget) ++plan.stages;
  plan.smem_bytes = plan.stages * per_stage;
  if (plan.smem_bytes > budget && plan.smem_bytes > 48 * 1024) {
    plan.what = "norm_backward: the device has too little shared memory per block";
    return;
  }
  const void* kernel = bwd_kernel_for<T, W, VEC>(plan.nv);
  if (allow_smem(kernel, plan.smem_bytes, p.device) != cudaSuccess) {
    cudaGetLastError();
    plan.what = "norm_backward: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed";
    return;
  }
  const int occ = blocks_per_sm(kernel, threads, plan.smem_bytes, p.device);
  const int64_t target = int64_t(sm_count(p.device)) * occ;
  int64_t ctas = ceil_div(target, plan.chunks);
  const int64_t by_rows = ceil_div(p.M, int64_t(plan.rows_per_cta) * kMinRowsPerWalker);
  if (ctas > by_rows) ctas = by_rows;
  if (ctas < 1) ctas = 1;
  plan.walker_ctas = ctas;
  plan.nwalkers = ctas * plan.rows_per_cta;

  int64_t bytes = 0;
  const int64_t part = plan.nwalkers * p.N * int64_t(sizeof(A));
  plan.dw_offset = plan.db_offset = plan.rowstats_offset = -1;
  if (p.weight != nullptr) {
    plan.dw_offset = bytes;
    bytes = align256(bytes + part);
  }
  if (p.has_bias) {
    plan.db_offset = bytes;
    bytes = align256(bytes + part);
  }
  if (plan.chunks > 1) {
    plan.rowstats_offset = bytes;
    bytes = align256(bytes + 2 * p.M * int64_t(sizeof(A)));
  }
  plan.workspace_bytes = bytes;
}

template <typename T, typename W, int VEC>
cudaError_t launch_bwd(const BwdParams& p, const BwdPlan& plan, char* ws, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  BwdArgs a;
  a.dy = p.dy;
  a.x = p.x;
  a.w = p.weight;
  a.mean = p.mean;
  a.rstd = p.rstd;
  a.dres = p.dresidual_out;
  a.dx = p.dx;
  a.ws_dw = plan.dw_offset >= 0 ? ws + plan.dw_offset : nullptr;
  a.ws_db = plan.db_offset >= 0 ? ws + plan.db_offset : nullptr;
  a.rowstats = plan.rowstats_offset >= 0 ? ws + plan.rowstats_offset : nullptr;
  a.M = p.M;
  a.N = int(p.N);
  a.nvec = int(p.N / VEC);
  a.stages = plan.stages;
  a.is_rms = p.is_rms;
  a.has_w = p.weight != nullptr;
  a.has_dres = p.dresidual_out != nullptr;

  if (a.rowstats != nullptr) {
    const unsigned grid = unsigned(p.M < kMaxGrid ? p.M : kMaxGrid);
    _norm_bwd_rowstats_kernel<T, W, VEC><<<grid, kLargeThreads, 0, stream>>>(a);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned(plan.walker_ctas), unsigned(plan.chunks));
  const dim3 block(plan.tpr, plan.rows_per_cta);
  switch (plan.nv) {
    case 1: _norm_bwd_kernel<T, W, VEC, 1><<<grid, block, plan.smem_bytes, stream>>>(a); break;
    case 2: _norm_bwd_kernel<T, W, VEC, 2><<<grid, block, plan.smem_bytes, stream>>>(a); break;
    default:
      if constexpr (bwd_nv_max<VEC>() >= 4) {
        _norm_bwd_kernel<T, W, VEC, 4><<<grid, block, plan.smem_bytes, stream>>>(a);
      } else {
        return cudaErrorInvalidConfiguration;  // plan_bwd never picks it
      }
      break;
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

  if (a.ws_dw != nullptr || a.ws_db != nullptr) {
    ColReduceArgs c;
    c.ws[0] = a.ws_dw;
    c.ws[1] = a.ws_db;
    c.out[0] = a.ws_dw != nullptr ? p.dweight : nullptr;
    c.out[1] = a.ws_db != nullptr ? p.dbias : nullptr;
    c.out_dtype[0] = p.dw_dtype;
    c.out_dtype[1] = p.db_dtype;
    c.nwalkers = plan.nwalkers;
    c.N = p.N;
    const dim3 rgrid(unsigned(ceil_div(p.N, 32)), 2);
    _norm_bwd_colreduce_kernel<A><<<rgrid, dim3(32, 8), 0, stream>>>(c);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
constexpr int vec_of() {
  return 16 / int(sizeof(T));
}

}  // namespace

LaunchStatus norm_forward(const FwdParams& p, cudaStream_t stream) {
  LaunchStatus st;
  if (p.N < 1 || p.N > INT32_MAX || p.M < 0) {
    st.what = "norm_forward: N must be in [1, 2^31) and M >= 0";
    return st;
  }
  if (p.x == nullptr || p.y == nullptr || p.rstd == nullptr || (!p.is_rms && p.mean == nullptr) ||
      (p.residual != nullptr && p.residual_out == nullptr)) {
    st.what = "norm_forward: missing pointer";
    return st;
  }
  if (p.M == 0) return st;
  FwdArgs a;
  a.x = p.x;
  a.res = p.residual;
  a.w = p.weight;
  a.b = p.bias;
  a.y = p.y;
  a.res_out = p.residual_out;
  a.mean = p.mean;
  a.rstd = p.rstd;
  a.M = p.M;
  a.N = int(p.N);
  a.eps = p.eps;
  a.is_rms = p.is_rms;
  a.has_res = p.residual != nullptr;
  a.has_w = p.weight != nullptr;
  a.has_b = p.bias != nullptr;
  // Without weight and bias the weight type is irrelevant: use x's, so no extra instantiation is needed.
  const DType wt = (a.has_w || a.has_b) ? p.w_dtype : p.x_dtype;
  const bool ptrs16 = aligned16(p.x) && aligned16(p.residual) && aligned16(p.weight) && aligned16(p.bias) &&
                      aligned16(p.y) && aligned16(p.residual_out);
  const bool ok = dispatch_types(p.x_dtype, wt, [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    if (ptrs16 && p.N % V == 0) {
      a.nvec = int(p.N / V);
      st.cuda = launch_fwd<T, W, V>(a, p.device, stream);
    } else {
      a.nvec = int(p.N);
      st.cuda = launch_fwd<T, W, 1>(a, p.device, stream);
    }
  });
  if (!ok) st.what = "norm_forward: unsupported (x dtype, weight dtype) pair";
  return st;
}

BwdPlan norm_backward_plan(const BwdParams& p) {
  BwdPlan plan;
  if (p.N < 1 || p.N > INT32_MAX || p.M < 0) {
    plan.what = "norm_backward: N must be in [1, 2^31) and M >= 0";
    return plan;
  }
  const DType wt = p.weight != nullptr ? p.w_dtype : p.x_dtype;
  const bool ptrs16 = aligned16(p.dy) && aligned16(p.x) && aligned16(p.weight) && aligned16(p.dresidual_out) &&
                      aligned16(p.dx);
  const bool ok = dispatch_types(p.x_dtype, wt, [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    if (ptrs16 && p.N % V == 0) {
      plan_bwd<T, W, V>(p, plan);
    } else {
      plan_bwd<T, W, 1>(p, plan);
    }
  });
  if (!ok) plan.what = "norm_backward: unsupported (x dtype, weight dtype) pair";
  return plan;
}

LaunchStatus norm_backward(const BwdParams& p, const BwdPlan& plan, void* workspace, cudaStream_t stream) {
  LaunchStatus st;
  if (plan.what != nullptr) {
    st.what = plan.what;
    return st;
  }
  if (p.dy == nullptr || p.x == nullptr || p.dx == nullptr || p.rstd == nullptr ||
      (!p.is_rms && p.mean == nullptr) || (p.weight != nullptr && p.dweight == nullptr) ||
      (p.has_bias && p.dbias == nullptr) || (plan.workspace_bytes > 0 && workspace == nullptr)) {
    st.what = "norm_backward: missing pointer";
    return st;
  }
  if (p.M == 0) return st;
  const DType wt = p.weight != nullptr ? p.w_dtype : p.x_dtype;
  char* ws = static_cast<char*>(workspace);
  const bool ok = dispatch_types(p.x_dtype, wt, [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(tw)::type;
    constexpr int V = vec_of<T>();
    if (plan.vec == V) {
      st.cuda = launch_bwd<T, W, V>(p, plan, ws, stream);
    } else {
      st.cuda = launch_bwd<T, W, 1>(p, plan, ws, stream);
    }
  });
  if (!ok) st.what = "norm_backward: unsupported (x dtype, weight dtype) pair";
  return st;
}

}  // namespace mltoolkit::cuda_norm
