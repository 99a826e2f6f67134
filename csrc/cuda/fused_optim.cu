// CUDA multi-tensor optimizer kernels: fused AdamW, fused LAMB (update + deterministic per-tensor norms, then the
// trust-ratio step) and the fused global-norm gradient clip. Contracts: csrc/fused_adam.h, csrc/fused_lamb.h; the
// launch layout (chunk tables passed as kernel arguments, plan_chunks) is described in fused_optim_launch.h. No torch
// headers here; the tensor glue is fused_optim_cuda.cpp.
//
// Element walk of one chunk [begin, begin + n) by the kThreads threads of a CTA (walk_chunk in the launch header):
// when every pointer of the tensor is 16-byte aligned at the chunk start, thread t takes the 16-byte vectors t,
// t + kThreads, ... of the chunk's n / VEC whole vectors (VEC = 16 / sizeof(T)), then the n % VEC remaining elements
// one by one (element nvec * VEC + t, ...); otherwise every element one by one (element t, t + kThreads, ...). Both paths apply the same per-element function,
// so the alignment changes no result except the order in which a thread adds its squares (fixed per tensor).
// The setup compiles with --use_fast_math: every rounding that the contract fixes is written with an explicit
// round-to-nearest intrinsic (__fmul_rn, __fdiv_rn, __fsqrt_rn, ...), which fast math does not replace.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "fused_optim_launch.h"

namespace mltoolkit::cuda_optim {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kReduceThreads = 256;  // LAMB trust-ratio kernel: one warp per tensor
constexpr size_t kParamLimit = 4096;  // bytes of kernel parameters every driver takes

// ---- argument structs (by value, one per launch) ---------------------------------------------------------------

struct Entries {
  int64_t chunk_size;  // elements per chunk of this call (pick_chunk)
  int32_t chunk[kMaxEntries];
  uint8_t slot[kMaxEntries];
  int32_t n_entries;
};

template <int DEPTH>
struct AdamArgs {
  void* ptr[DEPTH][kAdamMaxTensors];  // p, g, m, v (, vmax)
  int64_t numel[kAdamMaxTensors];
  float coef[3][kAdamMaxTensors];     // decay, -step_size, bc2_sqrt
  Entries e;
  float coeff;                        // lerp coefficient: w1 when |w1| < 0.5, else w1 - 1
  float beta2, c2, eps;
  int small_w, maximize;
};

struct LambArgs {
  void* ptr[4][kLambMaxTensors];      // p, g, m, v
  int64_t numel[kLambMaxTensors];
  int32_t part_base[kLambMaxTensors]; // first partial slot of the tensor
  int32_t id[kLambMaxTensors];        // list index (scales)
  Entries e;
  double beta1, beta2, beta3, one_minus_beta2, inv_bc1, inv_bc2, eps, wd;
};

struct ReduceArgs {
  int32_t base[kReduceMaxTensors];
  int32_t count[kReduceMaxTensors];
  int32_t first, n;
  double lr, max_trust;
  int use_trust;
};

struct ClipArgs {
  void* ptr[kClipMaxTensors];
  int64_t numel[kClipMaxTensors];
  int32_t part_base[kClipMaxTensors];
  Entries e;
  double p;
};

static_assert(kMaxEntries <= 65535 && kAdamMaxTensors <= 256 && kLambMaxTensors <= 256 && kClipMaxTensors <= 256,
              "slot is a uint8_t");
static_assert(sizeof(AdamArgs<5>) <= kParamLimit - 64, "AdamW table over the kernel-parameter limit");
static_assert(sizeof(LambArgs) + 2 * sizeof(void*) <= kParamLimit - 64, "LAMB table over the kernel-parameter limit");
static_assert(sizeof(ReduceArgs) + 2 * sizeof(void*) <= kParamLimit - 64, "reduce table over the limit");
static_assert(sizeof(ClipArgs) + 2 * sizeof(void*) <= kParamLimit - 64, "clip table over the kernel-parameter limit");
static_assert(kMinChunk % 8 == 0 && kChunk % kMinChunk == 0, "chunk starts keep 16-byte alignment");
static_assert(kThreads % 32 == 0 && kWarps <= 32, "block reduction takes at most 32 warps");

// ---- element access ------------------------------------------------------------------------------------------

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename A, typename T>
__device__ __forceinline__ A load1(const T* p) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<A>(__half2float(*p));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<A>(__bfloat162float(*p));
  } else {
    return static_cast<A>(*p);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store1(T* p, A x) {
  if constexpr (std::is_same_v<T, __half>) {
    *p = __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *p = __float2bfloat16_rn(static_cast<float>(x));
  } else {
    *p = static_cast<T>(x);
  }
}

// 16 bytes (kVec<T> elements) at an aligned p, as A. 16-bit elements: element 2k is the low half of word k.
template <typename T, typename A>
__device__ __forceinline__ void load16(const T* p, A (&out)[kVec<T>]) {
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = static_cast<A>(__uint_as_float(w[k]));
  } else if constexpr (std::is_same_v<T, double>) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      out[k] = static_cast<A>(__hiloint2double(static_cast<int>(w[2 * k + 1]), static_cast<int>(w[2 * k])));
    }
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = static_cast<A>(__uint_as_float(w[k] << 16));
      out[2 * k + 1] = static_cast<A>(__uint_as_float(w[k] & 0xffff0000u));
    }
  } else {
    static_assert(std::is_same_v<T, __half>, "unsupported element type");
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = static_cast<A>(__half2float(__ushort_as_half(static_cast<unsigned short>(w[k] & 0xffffu))));
      out[2 * k + 1] = static_cast<A>(__half2float(__ushort_as_half(static_cast<unsigned short>(w[k] >> 16))));
    }
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store16(T* p, const A (&in)[kVec<T>]) {
  uint32_t w[4];
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = __float_as_uint(static_cast<float>(in[k]));
  } else if constexpr (std::is_same_v<T, double>) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const double d = static_cast<double>(in[k]);
      w[2 * k] = static_cast<uint32_t>(__double2loint(d));
      w[2 * k + 1] = static_cast<uint32_t>(__double2hiint(d));
    }
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(in[2 * k])));
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(in[2 * k + 1])));
      w[k] = lo | (hi << 16);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = __half_as_ushort(__float2half_rn(static_cast<float>(in[2 * k])));
      const uint32_t hi = __half_as_ushort(__float2half_rn(static_cast<float>(in[2 * k + 1])));
      w[k] = lo | (hi << 16);
    }
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- correctly rounded arithmetic in A (float or double) ----------------------------------------------------

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// max that keeps a nan from either side (torch.maximum, and the inf-norm's max |g|)
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a > b || a != a) ? a : b;
}

// ---- block reductions (fixed trees: deterministic) ---------------------------------------------------------

struct SumOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return nan_max(a, b); }
};

template <typename Op>
__device__ __forceinline__ double warp_reduce(double x, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = op(x, __shfl_down_sync(0xffffffffu, x, off));
  return x;  // lane 0
}

// All kThreads threads call it (block-uniform); the result is valid in thread 0. red: kWarps doubles of shared memory.
template <typename Op>
__device__ __forceinline__ double block_reduce(double x, double* red, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_reduce(x, op);
  __syncthreads();  // red may still be read from the previous call
  if (lane == 0) red[warp] = x;
  __syncthreads();
  double r = 0.0;
  if (warp == 0) r = warp_reduce(lane < kWarps ? red[lane] : 0.0, op);
  return r;
}

// ---- AdamW -------------------------------------------------------------------------------------------------

// One element, float32 math in the contract's order (csrc/fused_adam.h).
template <bool AMS, int DEPTH>
__device__ __forceinline__ void adam_elem(float& p, float g, float& m, float& v, float& vmax, float decay,
                                          float neg_step, float bc2_sqrt, const AdamArgs<DEPTH>& a) {
  if (a.maximize) g = -g;
  p = __fmul_rn(p, decay);  // decay == 1 exactly when weight_decay == 0: p unchanged
  m = __fmaf_rn(a.coeff, __fsub_rn(g, m), a.small_w ? m : g);
  v = __fmaf_rn(__fmul_rn(a.c2, g), g, __fmul_rn(v, a.beta2));
  float src = v;
  if constexpr (AMS) {
    vmax = nan_max(vmax, v);
    src = vmax;
  }
  const float d = __fadd_rn(__fdiv_rn(__fsqrt_rn(src), bc2_sqrt), a.eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(neg_step, m), d));
}

template <typename T, bool AMS>
__global__ void __launch_bounds__(kThreads, 2) adamw_kernel(const __grid_constant__ AdamArgs<AMS ? 5 : 4> a) {
  constexpr int V = kVec<T>;
  for (int e = blockIdx.x; e < a.e.n_entries; e += gridDim.x) {
    const int s = a.e.slot[e];
    const int64_t begin = static_cast<int64_t>(a.e.chunk[e]) * a.e.chunk_size;
    const int64_t n = chunk_len(a.numel[s], begin, a.e.chunk_size);
    T* p = static_cast<T*>(a.ptr[0][s]) + begin;
    const T* g = static_cast<const T*>(a.ptr[1][s]) + begin;
    T* m = static_cast<T*>(a.ptr[2][s]) + begin;
    T* v = static_cast<T*>(a.ptr[3][s]) + begin;
    T* vm = nullptr;
    if constexpr (AMS) vm = static_cast<T*>(a.ptr[4][s]) + begin;
    const float decay = a.coef[0][s], neg_step = a.coef[1][s], bc2_sqrt = a.coef[2][s];
    const bool vec_ok = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) && (!AMS || aligned16(vm));
    walk_chunk<V>(
        n, vec_ok, threadIdx.x,
        [&](int64_t i) {
          float pv[V], gv[V], mv[V], vv[V], xv[V];
          load16(p + i, pv);
          load16(g + i, gv);
          load16(m + i, mv);
          load16(v + i, vv);
          if constexpr (AMS) load16(vm + i, xv);
#pragma unroll
          for (int j = 0; j < V; ++j) adam_elem<AMS>(pv[j], gv[j], mv[j], vv[j], xv[j], decay, neg_step, bc2_sqrt, a);
          store16(p + i, pv);
          store16(m + i, mv);
          store16(v + i, vv);
          if constexpr (AMS) store16(vm + i, xv);
        },
        [&](int64_t i) {
          float pi = load1<float>(p + i), mi = load1<float>(m + i), vi = load1<float>(v + i), xi = 0.0f;
          if constexpr (AMS) xi = load1<float>(vm + i);
          adam_elem<AMS>(pi, load1<float>(g + i), mi, vi, xi, decay, neg_step, bc2_sqrt, a);
          store1(p + i, pi);
          store1(m + i, mi);
          store1(v + i, vi);
          if constexpr (AMS) store1(vm + i, xi);
        });
  }
}

void fill_entries(Entries& e, const PlanLaunch& L, int64_t chunk) {
  e.chunk_size = chunk;
  for (size_t k = 0; k < L.entries.size(); ++k) {
    e.chunk[k] = L.entries[k].chunk;
    e.slot[k] = static_cast<uint8_t>(L.entries[k].slot);
  }
  e.n_entries = static_cast<int32_t>(L.entries.size());
}

const char* check_plan(const std::vector<PlanLaunch>& plan, int max_tensors) {
  for (const auto& L : plan) {
    if (L.entries.empty() || static_cast<int>(L.entries.size()) > kMaxEntries ||
        static_cast<int>(L.tensors.size()) > max_tensors) {
      return "internal error: a launch of the chunk plan is empty or over its table size";
    }
  }
  return nullptr;
}

template <typename T, bool AMS>
LaunchStatus launch_adam(const std::vector<AdamTensor>& ts, const std::vector<PlanLaunch>& plan, int64_t chunk,
                         const AdamParams& a, cudaStream_t stream) {
  constexpr int D = AMS ? 5 : 4;
  AdamArgs<D> args{};
  const bool small_w = std::fabs(a.w1) < 0.5f;
  args.coeff = small_w ? a.w1 : a.w1 - 1.0f;
  args.small_w = small_w ? 1 : 0;
  args.beta2 = a.beta2;
  args.c2 = a.c2;
  args.eps = a.eps;
  args.maximize = a.maximize ? 1 : 0;
  for (const PlanLaunch& L : plan) {
    for (size_t k = 0; k < L.tensors.size(); ++k) {
      const AdamTensor& t = ts[L.tensors[k]];
      args.ptr[0][k] = t.p;
      args.ptr[1][k] = const_cast<void*>(t.g);
      args.ptr[2][k] = t.m;
      args.ptr[3][k] = t.v;
      if constexpr (AMS) args.ptr[4][k] = t.vmax;
      args.numel[k] = t.numel;
      args.coef[0][k] = t.decay;
      args.coef[1][k] = t.neg_step_size;
      args.coef[2][k] = t.bc2_sqrt;
    }
    fill_entries(args.e, L, chunk);
    adamw_kernel<T, AMS><<<args.e.n_entries, kThreads, 0, stream>>>(args);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {err, nullptr};
  }
  return {};
}

template <typename T>
LaunchStatus adam_dispatch(const std::vector<AdamTensor>& ts, const std::vector<PlanLaunch>& plan, int64_t chunk,
                           const AdamParams& a, cudaStream_t stream) {
  return a.amsgrad ? launch_adam<T, true>(ts, plan, chunk, a, stream)
                   : launch_adam<T, false>(ts, plan, chunk, a, stream);
}

// ---- LAMB --------------------------------------------------------------------------------------------------

template <typename A>
struct LambScalars {
  A beta1, beta2, beta3, omb2, inv_bc1, inv_bc2, eps, wd;
  __device__ __forceinline__ explicit LambScalars(const LambArgs& a)
      : beta1(static_cast<A>(a.beta1)), beta2(static_cast<A>(a.beta2)), beta3(static_cast<A>(a.beta3)),
        omb2(static_cast<A>(a.one_minus_beta2)), inv_bc1(static_cast<A>(a.inv_bc1)),
        inv_bc2(static_cast<A>(a.inv_bc2)), eps(static_cast<A>(a.eps)), wd(static_cast<A>(a.wd)) {}
  // u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * p, as the CPU kernel's Direction
  __device__ __forceinline__ A direction(A m, A v, A p) const {
    const A denom = add_rn(sqrt_rn(mul_rn(v, inv_bc2)), eps);
    return add_rn(div_rn(mul_rn(m, inv_bc1), denom), mul_rn(wd, p));
  }
  // m = beta1 * m + beta3 * g;  v = beta2 * v + ((1 - beta2) * g) * g
  __device__ __forceinline__ void moments(A g, A& m, A& v) const {
    m = add_rn(mul_rn(beta1, m), mul_rn(beta3, g));
    v = add_rn(mul_rn(beta2, v), mul_rn(mul_rn(omb2, g), g));
  }
};

// APPLY = false (phase 1): m, v updated; per-chunk sums of p^2 and u^2 to partials[part_base + chunk].
// APPLY = true (phase 2): p -= scale * u, u recomputed from the new m, v and p by the same code (bit-equal to phase 1's).
template <typename T, bool APPLY>
__global__ void __launch_bounds__(kThreads, 2) lamb_kernel(const __grid_constant__ LambArgs a, double2* partials,
                                                        const double* scales) {
  using A = T;  // float32 or float64 arithmetic, as the CPU kernel
  constexpr int V = kVec<T>;
  __shared__ double red[kWarps];
  const LambScalars<A> c(a);
  for (int e = blockIdx.x; e < a.e.n_entries; e += gridDim.x) {
    const int s = a.e.slot[e];
    const int64_t begin = static_cast<int64_t>(a.e.chunk[e]) * a.e.chunk_size;
    const int64_t n = chunk_len(a.numel[s], begin, a.e.chunk_size);
    T* p = static_cast<T*>(a.ptr[0][s]) + begin;
    const T* g = static_cast<const T*>(a.ptr[1][s]) + begin;
    T* m = static_cast<T*>(a.ptr[2][s]) + begin;
    T* v = static_cast<T*>(a.ptr[3][s]) + begin;
    A scale = A(0);
    if constexpr (APPLY) scale = static_cast<A>(scales[a.id[s]]);
    A acc_p = A(0), acc_u = A(0);
    walk_chunk<V>(
        n, aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v), threadIdx.x,
        [&](int64_t i) {
          A pv[V], gv[V], mv[V], vv[V];
          load16(p + i, pv);
          load16(m + i, mv);
          load16(v + i, vv);
          if constexpr (!APPLY) load16(g + i, gv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if constexpr (!APPLY) c.moments(gv[j], mv[j], vv[j]);
            const A u = c.direction(mv[j], vv[j], pv[j]);
            if constexpr (APPLY) {
              pv[j] = sub_rn(pv[j], mul_rn(scale, u));
            } else {
              acc_p = fma_rn(pv[j], pv[j], acc_p);
              acc_u = fma_rn(u, u, acc_u);
            }
          }
          if constexpr (APPLY) {
            store16(p + i, pv);
          } else {
            store16(m + i, mv);
            store16(v + i, vv);
          }
        },
        [&](int64_t i) {
          A pi = load1<A>(p + i), mi = load1<A>(m + i), vi = load1<A>(v + i);
          if constexpr (!APPLY) c.moments(load1<A>(g + i), mi, vi);
          const A u = c.direction(mi, vi, pi);
          if constexpr (APPLY) {
            store1(p + i, sub_rn(pi, mul_rn(scale, u)));
          } else {
            store1(m + i, mi);
            store1(v + i, vi);
            acc_p = fma_rn(pi, pi, acc_p);
            acc_u = fma_rn(u, u, acc_u);
          }
        });
    if constexpr (!APPLY) {
      const double sp = block_reduce(static_cast<double>(acc_p), red, SumOp());
      const double su = block_reduce(static_cast<double>(acc_u), red, SumOp());
      if (threadIdx.x == 0) partials[a.part_base[s] + a.e.chunk[e]] = make_double2(sp, su);
    }
  }
}

// One warp per tensor: its chunks' partials added in a fixed order (lane l takes chunks l, l + 32, ..., then a fixed
// shuffle tree), then scale = lr * trust with the CPU kernel's edge cases.
__global__ void __launch_bounds__(kReduceThreads) lamb_trust_kernel(const __grid_constant__ ReduceArgs r,
                                                                    const double2* partials, double* scales) {
  const int w = blockIdx.x * (kReduceThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= r.n) return;  // warp-uniform
  double pp = 0.0, uu = 0.0;
  const int32_t base = r.base[w], count = r.count[w];
  for (int32_t k = lane; k < count; k += 32) {
    const double2 q = partials[base + k];
    pp += q.x;
    uu += q.y;
  }
  pp = warp_reduce(pp, SumOp());
  uu = warp_reduce(uu, SumOp());
  if (lane == 0) {
    const double wn = __dsqrt_rn(pp), un = __dsqrt_rn(uu);
    double trust = (r.use_trust && wn > 0.0 && un > 0.0) ? __ddiv_rn(wn, un) : 1.0;
    if (r.max_trust > 0.0) trust = r.max_trust < trust ? r.max_trust : trust;
    scales[r.first + w] = __dmul_rn(r.lr, trust);
  }
}

void fill_lamb(LambArgs& args, const std::vector<LambTensor>& ts, const std::vector<int64_t>& offsets,
               const PlanLaunch& L, int64_t chunk) {
  for (size_t k = 0; k < L.tensors.size(); ++k) {
    const int32_t t = L.tensors[k];
    args.ptr[0][k] = ts[t].p;
    args.ptr[1][k] = const_cast<void*>(ts[t].g);
    args.ptr[2][k] = ts[t].m;
    args.ptr[3][k] = ts[t].v;
    args.numel[k] = ts[t].numel;
    args.part_base[k] = static_cast<int32_t>(offsets[t]);
    args.id[k] = t;
  }
  fill_entries(args.e, L, chunk);
}

template <typename T>
LaunchStatus launch_lamb(const std::vector<LambTensor>& ts, const LambParams& a, double* partials, double* scales,
                         cudaStream_t stream) {
  std::vector<int64_t> numel(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) numel[i] = ts[i].numel;
  const int64_t chunk = pick_chunk(numel);
  const std::vector<int64_t> offsets = chunk_offsets(numel, chunk);
  if (offsets.back() >= std::numeric_limits<int32_t>::max()) return {cudaSuccess, "too many chunks for one call"};
  const std::vector<PlanLaunch> plan = plan_chunks(numel, kLambMaxTensors, kMaxEntries, chunk);
  if (const char* why = check_plan(plan, kLambMaxTensors)) return {cudaSuccess, why};
  double2* parts = reinterpret_cast<double2*>(partials);
  LambArgs args{};
  args.beta1 = a.beta1;
  args.beta2 = a.beta2;
  args.beta3 = a.beta3;
  args.one_minus_beta2 = a.one_minus_beta2;
  args.inv_bc1 = a.inv_bc1;
  args.inv_bc2 = a.inv_bc2;
  args.eps = a.eps;
  args.wd = a.weight_decay;
  for (const PlanLaunch& L : plan) {
    fill_lamb(args, ts, offsets, L, chunk);
    lamb_kernel<T, false><<<args.e.n_entries, kThreads, 0, stream>>>(args, parts, scales);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {err, nullptr};
  }
  const int n = static_cast<int>(ts.size());
  for (int first = 0; first < n; first += kReduceMaxTensors) {
    ReduceArgs r{};
    r.first = first;
    r.n = std::min(kReduceMaxTensors, n - first);
    for (int k = 0; k < r.n; ++k) {
      r.base[k] = static_cast<int32_t>(offsets[first + k]);
      r.count[k] = static_cast<int32_t>(offsets[first + k + 1] - offsets[first + k]);
    }
    r.lr = a.lr;
    r.max_trust = a.max_trust_ratio;
    r.use_trust = a.use_trust_ratio ? 1 : 0;
    constexpr int kPerBlock = kReduceThreads / 32;
    lamb_trust_kernel<<<(r.n + kPerBlock - 1) / kPerBlock, kReduceThreads, 0, stream>>>(r, parts, scales);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {err, nullptr};
  }
  for (const PlanLaunch& L : plan) {
    fill_lamb(args, ts, offsets, L, chunk);
    lamb_kernel<T, true><<<args.e.n_entries, kThreads, 0, stream>>>(args, parts, scales);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {err, nullptr};
  }
  return {};
}

// ---- global-norm clip --------------------------------------------------------------------------------------

template <NormKind K, typename A>
__device__ __forceinline__ A norm_acc(A acc, A x, double p) {
  if constexpr (K == NormKind::kL2) {
    return fma_rn(x, x, acc);
  } else if constexpr (K == NormKind::kInf) {
    return nan_max(acc, static_cast<A>(fabs(x)));  // |x| (+0 for -0; keeps nan)
  } else {
    const double ax = fabs(static_cast<double>(x));
    return acc + static_cast<A>(p == 1.0 ? ax : pow(ax, p));
  }
}

// Per chunk: sum g^2 (kL2; float32 per thread for float32 grads), max |g| (kInf) or sum |g|^p (kLp; float64).
template <typename T, NormKind K>
__global__ void __launch_bounds__(kThreads) clip_norm_kernel(const __grid_constant__ ClipArgs a, double* partials) {
  using A = std::conditional_t<K == NormKind::kLp, double, T>;
  constexpr int V = kVec<T>;
  __shared__ double red[kWarps];
  for (int e = blockIdx.x; e < a.e.n_entries; e += gridDim.x) {
    const int s = a.e.slot[e];
    const int64_t begin = static_cast<int64_t>(a.e.chunk[e]) * a.e.chunk_size;
    const int64_t n = chunk_len(a.numel[s], begin, a.e.chunk_size);
    const T* g = static_cast<const T*>(a.ptr[s]) + begin;
    A acc = A(0);
    walk_chunk<V>(
        n, aligned16(g), threadIdx.x,
        [&](int64_t i) {
          A gv[V];
          load16(g + i, gv);
#pragma unroll
          for (int j = 0; j < V; ++j) acc = norm_acc<K>(acc, gv[j], a.p);
        },
        [&](int64_t i) { acc = norm_acc<K>(acc, load1<A>(g + i), a.p); });
    double r;
    if constexpr (K == NormKind::kInf) {
      r = block_reduce(static_cast<double>(acc), red, MaxOp());
    } else {
      r = block_reduce(static_cast<double>(acc), red, SumOp());
    }
    if (threadIdx.x == 0) partials[a.part_base[s] + a.e.chunk[e]] = r;
  }
}

// One CTA: the total over all partials (fixed order), then total and coef in T as torch / the CPU kernel compute them.
template <typename T, NormKind K>
__global__ void __launch_bounds__(kThreads) clip_total_kernel(const double* partials, int64_t n, double p,
                                                              double max_norm, T* total, T* coef) {
  __shared__ double red[kWarps];
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    acc = K == NormKind::kInf ? nan_max(acc, partials[k]) : acc + partials[k];
  }
  double r;
  if constexpr (K == NormKind::kInf) {
    r = block_reduce(acc, red, MaxOp());
  } else {
    r = block_reduce(acc, red, SumOp());
  }
  if (threadIdx.x == 0) {
    const double t = K == NormKind::kInf ? r : K == NormKind::kL2 ? __dsqrt_rn(r) : (p == 1.0 ? r : pow(r, 1.0 / p));
    const T tt = static_cast<T>(t);
    T c = div_rn(static_cast<T>(max_norm), add_rn(tt, static_cast<T>(1e-6)));
    c = c < T(1) ? c : T(1);                                  // torch.clamp(max=1)
    if (tt != tt) c = std::numeric_limits<T>::quiet_NaN();    // ... which keeps nan
    *total = tt;
    *coef = c;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) clip_scale_kernel(const __grid_constant__ ClipArgs a, const T* coef) {
  constexpr int V = kVec<T>;
  const T c = *coef;
  for (int e = blockIdx.x; e < a.e.n_entries; e += gridDim.x) {
    const int s = a.e.slot[e];
    const int64_t begin = static_cast<int64_t>(a.e.chunk[e]) * a.e.chunk_size;
    const int64_t n = chunk_len(a.numel[s], begin, a.e.chunk_size);
    T* g = static_cast<T*>(a.ptr[s]) + begin;
    walk_chunk<V>(
        n, aligned16(g), threadIdx.x,
        [&](int64_t i) {
          T gv[V];
          load16(g + i, gv);
#pragma unroll
          for (int j = 0; j < V; ++j) gv[j] = mul_rn(gv[j], c);
          store16(g + i, gv);
        },
        [&](int64_t i) { g[i] = mul_rn(g[i], c); });
  }
}

void fill_clip(ClipArgs& args, const std::vector<ClipTensor>& ts, const std::vector<int64_t>& offsets,
               const PlanLaunch& L, int64_t chunk) {
  for (size_t k = 0; k < L.tensors.size(); ++k) {
    const int32_t t = L.tensors[k];
    args.ptr[k] = ts[t].g;
    args.numel[k] = ts[t].numel;
    args.part_base[k] = static_cast<int32_t>(offsets[t]);
  }
  fill_entries(args.e, L, chunk);
}

template <typename T, NormKind K>
LaunchStatus launch_clip_norm(const std::vector<ClipTensor>& ts, const ClipParams& a, double* partials, void* total,
                              void* coef, cudaStream_t stream) {
  std::vector<int64_t> numel(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) numel[i] = ts[i].numel;
  const int64_t chunk = pick_chunk(numel);
  const std::vector<int64_t> offsets = chunk_offsets(numel, chunk);
  if (offsets.back() >= std::numeric_limits<int32_t>::max()) return {cudaSuccess, "too many chunks for one call"};
  const std::vector<PlanLaunch> plan = plan_chunks(numel, kClipMaxTensors, kMaxEntries, chunk);
  if (const char* why = check_plan(plan, kClipMaxTensors)) return {cudaSuccess, why};
  ClipArgs args{};
  args.p = a.p;
  for (const PlanLaunch& L : plan) {
    fill_clip(args, ts, offsets, L, chunk);
    clip_norm_kernel<T, K><<<args.e.n_entries, kThreads, 0, stream>>>(args, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {err, nullptr};
  }
  clip_total_kernel<T, K><<<1, kThreads, 0, stream>>>(partials, offsets.back(), a.p, a.max_norm,
                                                      static_cast<T*>(total), static_cast<T*>(coef));
  return {cudaGetLastError(), nullptr};
}

template <typename T>
LaunchStatus clip_norm_kind(const std::vector<ClipTensor>& ts, const ClipParams& a, double* partials, void* total,
                            void* coef, cudaStream_t stream) {
  switch (a.kind) {
    case NormKind::kL2: return launch_clip_norm<T, NormKind::kL2>(ts, a, partials, total, coef, stream);
    case NormKind::kInf: return launch_clip_norm<T, NormKind::kInf>(ts, a, partials, total, coef, stream);
    case NormKind::kLp: return launch_clip_norm<T, NormKind::kLp>(ts, a, partials, total, coef, stream);
  }
  return {cudaSuccess, "unknown norm kind"};
}

template <typename T>
LaunchStatus launch_clip_scale(const std::vector<ClipTensor>& ts, const void* coef, cudaStream_t stream) {
  std::vector<int64_t> numel(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) numel[i] = ts[i].numel;
  const int64_t chunk = pick_chunk(numel);
  const std::vector<int64_t> offsets = chunk_offsets(numel, chunk);
  const std::vector<PlanLaunch> plan = plan_chunks(numel, kClipMaxTensors, kMaxEntries, chunk);
  if (const char* why = check_plan(plan, kClipMaxTensors)) return {cudaSuccess, why};
  ClipArgs args{};
  for (const PlanLaunch& L : plan) {
    fill_clip(args, ts, offsets, L, chunk);
    clip_scale_kernel<T><<<args.e.n_entries, kThreads, 0, stream>>>(args, static_cast<const T*>(coef));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {err, nullptr};
  }
  return {};
}

}  // namespace

LaunchStatus adamw_step(const std::vector<AdamTensor>& tensors, const AdamParams& a, cudaStream_t stream) {
  std::vector<int64_t> numel(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) numel[i] = tensors[i].numel;
  const int64_t chunk = pick_chunk(numel);
  if (chunk_offsets(numel, chunk).back() >= std::numeric_limits<int32_t>::max()) {
    return {cudaSuccess, "too many chunks for one call"};
  }
  const std::vector<PlanLaunch> plan = plan_chunks(numel, kAdamMaxTensors, kMaxEntries, chunk);
  if (const char* why = check_plan(plan, kAdamMaxTensors)) return {cudaSuccess, why};
  switch (a.dtype) {
    case DType::kFloat32: return adam_dispatch<float>(tensors, plan, chunk, a, stream);
    case DType::kFloat16: return adam_dispatch<__half>(tensors, plan, chunk, a, stream);
    case DType::kBFloat16: return adam_dispatch<__nv_bfloat16>(tensors, plan, chunk, a, stream);
    default: return {cudaSuccess, "AdamW takes float32, float16 or bfloat16 tensors"};
  }
}

LaunchStatus lamb_step(const std::vector<LambTensor>& tensors, const LambParams& a, double* partials,
                       double* scales, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch_lamb<float>(tensors, a, partials, scales, stream);
    case DType::kFloat64: return launch_lamb<double>(tensors, a, partials, scales, stream);
    default: return {cudaSuccess, "LAMB takes float32 or float64 tensors"};
  }
}

LaunchStatus clip_norm(const std::vector<ClipTensor>& tensors, const ClipParams& a, double* partials, void* total,
                       void* coef, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return clip_norm_kind<float>(tensors, a, partials, total, coef, stream);
    case DType::kFloat64: return clip_norm_kind<double>(tensors, a, partials, total, coef, stream);
    default: return {cudaSuccess, "the clip takes float32 or float64 gradients"};
  }
}

LaunchStatus clip_scale(const std::vector<ClipTensor>& tensors, const ClipParams& a, const void* coef,
                        cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch_clip_scale<float>(tensors, coef, stream);
    case DType::kFloat64: return launch_clip_scale<double>(tensors, coef, stream);
    default: return {cudaSuccess, "the clip takes float32 or float64 gradients"};
  }
}

}  // namespace mltoolkit::cuda_optim
