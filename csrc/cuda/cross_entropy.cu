// CUDA softmax cross-entropy; contract in csrc/cross_entropy.h, launcher API in cross_entropy_launch.h.
//
// Layout: one 256-thread block per row, for the forward and for the backward (grid x has room for 2^31 - 1 rows).
// Forward: each thread keeps an online softmax of the elements it reads (running max m and sum of exp(x - m), and the
// sum of x for label smoothing), merged across the warp with shuffles and across warps through shared memory; thread
// 0 writes lse and the loss. Backward: each element's gradient from its logit and the row's lse, read once and
// written once. Rows whose start and stride allow it are read with 16-byte vectors (the backward's stores too).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "cross_entropy_launch.h"
#include "num_cast.cuh"

namespace mltoolkit::cuda_cross_entropy {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using cuda_num::Num;

template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  struct alignas(16) Pack {
    T v[kN];
  };
};

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

// Running (max, sum of exp(x - max)). The max starts at the lowest finite value, so that -inf logits add exp(-inf) =
// 0 rather than exp(-inf - -inf) = NaN; a NaN logit makes the sum NaN.
template <typename A>
struct Online {
  A m, s, sx;
  __device__ void add(A x) {
    if (x > m) {
      s = s * exp_acc(m - x) + A(1);
      m = x;
    } else {
      s += exp_acc(x - m);
    }
  }
  __device__ void merge(A m2, A s2, A sx2) {
    const A mx = m > m2 ? m : m2;
    s = s * exp_acc(m - mx) + s2 * exp_acc(m2 - mx);
    m = mx;
    sx += sx2;
  }
};

template <typename A>
__device__ __forceinline__ A shfl(A v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

template <typename A>
__device__ A lowest_of() {
  if constexpr (sizeof(A) == 8) {
    return -DBL_MAX;
  } else {
    return -FLT_MAX;
  }
}

template <typename T, bool VECTOR, bool SMOOTHED>
__global__ void __launch_bounds__(kThreads) _ce_fwd_kernel(const T* __restrict__ logits,
                                                           const int64_t* __restrict__ target, int64_t classes,
                                                           int64_t row_stride, int64_t ignore_index,
                                                           typename Num<T>::acc keep, typename Num<T>::acc spread,
                                                           typename Num<T>::acc* __restrict__ loss,
                                                           typename Num<T>::acc* __restrict__ lse) {
  using A = typename Num<T>::acc;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  Online<A> o{lowest_of<A>(), A(0), A(0)};
  int64_t scalar_from = 0;
  if constexpr (VECTOR) {
    constexpr int kN = Vec16<T>::kN;
    using Pack = typename Vec16<T>::Pack;
    const int64_t packs = classes / kN;
    const Pack* xp = reinterpret_cast<const Pack*>(x);
    for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
      const Pack p = xp[i];
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const A v = Num<T>::to_acc(p.v[k]);
        o.add(v);
        if (SMOOTHED) o.sx += v;
      }
    }
    scalar_from = packs * kN;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < classes; j += kThreads) {
    const A v = Num<T>::to_acc(x[j]);
    o.add(v);
    if (SMOOTHED) o.sx += v;
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) o.merge(shfl(o.m, mask), shfl(o.s, mask), shfl(o.sx, mask));
  __shared__ A sm[kWarps], ss[kWarps], ssx[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = o.m;
    ss[warp] = o.s;
    ssx[warp] = o.sx;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kWarps; ++w) o.merge(sm[w], ss[w], ssx[w]);
  const A row_lse = o.m + log_acc(o.s);
  lse[row] = row_lse;
  const int64_t t = target[row];
  A l = A(0);
  if (t != ignore_index) {
    if (t >= 0 && t < classes) {
      l = row_lse - keep * Num<T>::to_acc(x[t]);
      if (SMOOTHED) l -= spread * o.sx;
    } else {
      l = A(NAN);
    }
  }
  loss[row] = l;
}

template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kThreads) _ce_bwd_kernel(const T* __restrict__ logits,
                                                           const int64_t* __restrict__ target, int64_t classes,
                                                           int64_t row_stride, int64_t ignore_index,
                                                           typename Num<T>::acc keep, typename Num<T>::acc spread,
                                                           const typename Num<T>::acc* __restrict__ dloss,
                                                           const typename Num<T>::acc* __restrict__ lse,
                                                           T* __restrict__ dlogits) {
  using A = typename Num<T>::acc;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* dx = dlogits + row * classes;
  const int64_t t = target[row];
  const bool ignored = t == ignore_index;
  const A g = ignored ? A(0) : dloss[row];
  const A row_lse = lse[row], off = g * spread, hit = g * keep;
  auto grad = [&](A v, int64_t j) -> A {
    if (ignored) return A(0);
    return g * exp_acc(v - row_lse) - off - (j == t ? hit : A(0));
  };
  int64_t scalar_from = 0;
  if constexpr (VECTOR) {
    constexpr int kN = Vec16<T>::kN;
    using Pack = typename Vec16<T>::Pack;
    const int64_t packs = classes / kN;
    const Pack* xp = reinterpret_cast<const Pack*>(x);
    Pack* dp = reinterpret_cast<Pack*>(dx);
    for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
      const Pack p = xp[i];
      Pack out;
#pragma unroll
      for (int k = 0; k < kN; ++k) out.v[k] = Num<T>::from_acc(grad(Num<T>::to_acc(p.v[k]), i * kN + k));
      dp[i] = out;
    }
    scalar_from = packs * kN;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < classes; j += kThreads) {
    dx[j] = Num<T>::from_acc(grad(Num<T>::to_acc(x[j]), j));
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t forward(const Params& p, void* loss, void* lse, cudaStream_t stream) {
  using A = typename Num<T>::acc;
  const T* x = static_cast<const T*>(p.logits);
  const bool vector = aligned16(x) && (p.row_stride * int64_t(sizeof(T))) % 16 == 0;
  const bool smoothed = p.label_smoothing != 0.0;
  const A keep = A(1.0 - p.label_smoothing), spread = A(p.label_smoothing / double(p.classes));
  const dim3 grid(unsigned(p.rows)), block(kThreads);
  auto go = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(x, p.target, p.classes, p.row_stride, p.ignore_index, keep, spread,
                                       static_cast<A*>(loss), static_cast<A*>(lse));
  };
  if (vector) {
    smoothed ? go(_ce_fwd_kernel<T, true, true>) : go(_ce_fwd_kernel<T, true, false>);
  } else {
    smoothed ? go(_ce_fwd_kernel<T, false, true>) : go(_ce_fwd_kernel<T, false, false>);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const Params& p, const void* dloss, const void* lse, void* dlogits, cudaStream_t stream) {
  using A = typename Num<T>::acc;
  const T* x = static_cast<const T*>(p.logits);
  const bool vector = aligned16(x) && aligned16(dlogits) && (p.row_stride * int64_t(sizeof(T))) % 16 == 0 &&
                      (p.classes * int64_t(sizeof(T))) % 16 == 0;
  const A keep = A(1.0 - p.label_smoothing), spread = A(p.label_smoothing / double(p.classes));
  const dim3 grid(unsigned(p.rows)), block(kThreads);
  auto go = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(x, p.target, p.classes, p.row_stride, p.ignore_index, keep, spread,
                                       static_cast<const A*>(dloss), static_cast<const A*>(lse),
                                       static_cast<T*>(dlogits));
  };
  vector ? go(_ce_bwd_kernel<T, true>) : go(_ce_bwd_kernel<T, false>);
  return cudaGetLastError();
}

LaunchStatus refuse(const Params& p) {
  LaunchStatus st;
  if (p.rows > 2147483647) st.what = "more than 2^31 - 1 rows";
  if (p.classes < 1) st.what = "no classes";
  return st;
}

}  // namespace

LaunchStatus cross_entropy_forward(const Params& p, void* loss, void* lse, cudaStream_t stream) {
  LaunchStatus st = refuse(p);
  if (!st.ok() || p.rows == 0) return st;
  switch (p.dtype) {
    case DType::kFloat32: st.cuda = forward<float>(p, loss, lse, stream); break;
    case DType::kFloat64: st.cuda = forward<double>(p, loss, lse, stream); break;
    case DType::kFloat16: st.cuda = forward<__half>(p, loss, lse, stream); break;
    case DType::kBFloat16: st.cuda = forward<__nv_bfloat16>(p, loss, lse, stream); break;
  }
  return st;
}

LaunchStatus cross_entropy_backward(const Params& p, const void* dloss, const void* lse, void* dlogits,
                                    cudaStream_t stream) {
  LaunchStatus st = refuse(p);
  if (!st.ok() || p.rows == 0) return st;
  switch (p.dtype) {
    case DType::kFloat32: st.cuda = backward<float>(p, dloss, lse, dlogits, stream); break;
    case DType::kFloat64: st.cuda = backward<double>(p, dloss, lse, dlogits, stream); break;
    case DType::kFloat16: st.cuda = backward<__half>(p, dloss, lse, dlogits, stream); break;
    case DType::kBFloat16: st.cuda = backward<__nv_bfloat16>(p, dloss, lse, dlogits, stream); break;
  }
  return st;
}

}  // namespace mltoolkit::cuda_cross_entropy
