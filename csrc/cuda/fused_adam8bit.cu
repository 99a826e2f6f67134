// CUDA multi-tensor 8-bit AdamW step (block-wise quantized moments). Contract: csrc/fused_adam8bit.h; launch layout
// (block tables passed as kernel arguments, a8_plan, a8_find_slot) in fused_adam8bit_launch.h. No torch headers
// here; the tensor glue is fused_adam8bit_cuda.cpp.
//
// One CTA of 256 threads per quantization block, thread t owning element t of the block: it dequantizes its two
// moments (map value from shared memory times the block's absmax), runs the AdamW update in float32 in the C++ CPU
// kernel's order (csrc/cpu/fused_adam8bit.cpp), writes p, and then the CTA reduces the block's absmax of |m| and |v|
// and every thread writes its two codes: x = m / scale (IEEE division) and code = #{k < 255 : mid_k < x}, found by a
// branchless binary search over the 255 midpoints (mid_k = (q_k + q_{k+1}) * 0.5f, built in shared memory from the
// maps once per CTA). So the codes and absmax equal the CPU kernel's bit for bit.
//
// Rounding: the setup compiles with --use_fast_math, which implies -ftz=true: even the __f*_rn intrinsics would
// then flush subnormal inputs and results to zero, unlike the CPU kernel. Every float operation that the contract
// fixes is therefore written as inline PTX without .ftz (ieee_f32.cuh: .rn.f32 operations, subnormals kept);
// |x| and the absmax are computed on the bit patterns (for non-negative floats the unsigned order of the bits is the
// float order, and a NaN's bits are above +inf's, so a NaN in a block gives a NaN absmax as the CPU's nan_max does);
// bfloat16 stores round to nearest even on the bits (torch's c10::BFloat16 rounding, NaN -> 0x7fc0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "fused_adam8bit_launch.h"
#include "ieee_f32.cuh"

namespace mltoolkit::cuda_adam8bit {
namespace {

constexpr int kWarps = kA8Threads / 32;
constexpr size_t kParamLimit = 4096;

struct A8Args {
  void* p[kA8MaxTensors];
  const void* g[kA8MaxTensors];
  uint8_t* mc[kA8MaxTensors];
  uint8_t* vc[kA8MaxTensors];
  float* ma[kA8MaxTensors];
  float* va[kA8MaxTensors];
  int64_t numel[kA8MaxTensors];
  int64_t block_off[kA8MaxTensors + 1];  // prefix sums of the slots' block counts; block_off[n] = total
  float coef[3][kA8MaxTensors];          // decay, -step_size, bc2_sqrt
  const float* qs;
  const float* qu;
  float coeff;  // lerp coefficient: w1 when |w1| < 0.5, else w1 - 1
  float beta2, c2, eps;
  int32_t small_w, n;
};

static_assert(sizeof(A8Args) <= kParamLimit - 64, "8-bit AdamW table over the kernel-parameter limit");
static_assert(kA8Threads == kA8Block && kA8Block == 256, "one thread per value of a 256-value block");

__device__ __forceinline__ uint32_t abs_bits(float a) { return __float_as_uint(a) & 0x7fffffffu; }

// ---- element access ------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float load1(const T* p) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(*p);  // exact
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(*p)) << 16);  // exact
  } else {
    return *p;
  }
}

template <typename T>
__device__ __forceinline__ void store1(T* p, float x) {
  if constexpr (std::is_same_v<T, __half>) {
    *p = __float2half_rn(x);  // a float32 subnormal rounds to 0 in float16 with or without ftz
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t u = __float_as_uint(x);
    uint16_t h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      h = 0x7fc0;  // torch's bfloat16 NaN
    } else {
      h = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    *p = __ushort_as_bfloat16(h);
  } else {
    *p = x;
  }
}

// #{k < 255 : mid[k] < x}: the probes are mid[idx + step - 1] (at most mid[254]); a NaN x gets 0.
__device__ __forceinline__ int search(const float* mid, float x) {
  int idx = 0;
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1) idx += ieee::gt(x, mid[idx + step - 1]) * step;
  return idx;
}

template <typename T, bool DECAY, bool MAXIMIZE>
__global__ void __launch_bounds__(kA8Threads) adamw8bit_kernel(const __grid_constant__ A8Args a) {
  __shared__ float qs[256], qu[256], mid_s[256], mid_u[256];
  __shared__ uint32_t red[2][kWarps];
  const int t = threadIdx.x;
  const int lane = t & 31, warp = t >> 5;
  qs[t] = a.qs[t];
  qu[t] = a.qu[t];
  __syncthreads();
  // mid[255] is never read
  mid_s[t] = t < 255 ? ieee::mul(ieee::add(qs[t], qs[t + 1]), 0.5f) : __uint_as_float(0x7f800000u);
  mid_u[t] = t < 255 ? ieee::mul(ieee::add(qu[t], qu[t + 1]), 0.5f) : __uint_as_float(0x7f800000u);
  __syncthreads();
  const int64_t total = a.block_off[a.n];
  for (int64_t b = blockIdx.x; b < total; b += gridDim.x) {
    const int s = a8_find_slot(a.block_off, a.n, b);  // block-uniform
    const int64_t blk = b - a.block_off[s];           // block within tensor s
    const int64_t i = blk * kA8Block + t;             // element of tensor s
    const bool live = i < a.numel[s];
    uint8_t* mc = a.mc[s];
    uint8_t* vc = a.vc[s];
    float* ma = a.ma[s];
    float* va = a.va[s];
    float m = 0.0f, v = 0.0f;
    if (live) {
      T* p = static_cast<T*>(a.p[s]);
      const T* g = static_cast<const T*>(a.g[s]);
      float pv = load1(p + i);
      float gv = load1(g + i);
      if constexpr (MAXIMIZE) gv = ieee::neg(gv);
      m = ieee::mul(qs[mc[i]], ma[blk]);
      v = ieee::mul(qu[vc[i]], va[blk]);
      if constexpr (DECAY) pv = ieee::mul(pv, a.coef[0][s]);
      m = ieee::fma(a.coeff, ieee::sub(gv, m), a.small_w ? m : gv);
      v = ieee::fma(ieee::mul(a.c2, gv), gv, ieee::mul(v, a.beta2));
      const float d = ieee::add(ieee::div(ieee::sqrt(v), a.coef[2][s]), a.eps);
      pv = ieee::add(pv, ieee::div(ieee::mul(a.coef[1][s], m), d));
      store1(p + i, pv);
    }
    // absmax of the block: unsigned max of |x|'s bits (dead threads add 0 = +0.0f)
    uint32_t am = __reduce_max_sync(0xffffffffu, abs_bits(m));
    uint32_t av = __reduce_max_sync(0xffffffffu, abs_bits(v));
    __syncthreads();  // every thread has read ma[blk] / va[blk] and the previous block's red
    if (lane == 0) {
      red[0][warp] = am;
      red[1][warp] = av;
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      am = max(am, red[0][w]);
      av = max(av, red[1][w]);
    }
    if (live) {
      // scale = absmax > 0 ? absmax : 1 (a NaN absmax: 1)
      const float sm = (am != 0u && am <= 0x7f800000u) ? __uint_as_float(am) : 1.0f;
      const float sv = (av != 0u && av <= 0x7f800000u) ? __uint_as_float(av) : 1.0f;
      mc[i] = static_cast<uint8_t>(search(mid_s, ieee::div(m, sm)));
      vc[i] = static_cast<uint8_t>(search(mid_u, ieee::div(v, sv)));
    }
    if (t == 0) {
      ma[blk] = __uint_as_float(am);
      va[blk] = __uint_as_float(av);
    }
  }
}

template <typename T, bool DECAY, bool MAXIMIZE>
LaunchStatus launch(const std::vector<A8Tensor>& ts, const A8Params& a, cudaStream_t stream) {
  std::vector<int64_t> numel(ts.size());
  for (size_t k = 0; k < ts.size(); ++k) numel[k] = ts[k].numel;
  A8Args args{};
  const bool small_w = (a.w1 < 0.0f ? -a.w1 : a.w1) < 0.5f;
  args.coeff = small_w ? a.w1 : a.w1 - 1.0f;
  args.small_w = small_w ? 1 : 0;
  args.beta2 = a.beta2;
  args.c2 = a.c2;
  args.eps = a.eps;
  args.qs = a.qmap_signed;
  args.qu = a.qmap_unsigned;
  for (const std::vector<int32_t>& L : a8_plan(numel)) {
    if (L.empty() || static_cast<int>(L.size()) > kA8MaxTensors) {
      return {cudaSuccess, "internal error: a launch of the block plan is empty or over its table size"};
    }
    int64_t off = 0;
    for (size_t k = 0; k < L.size(); ++k) {
      const A8Tensor& t = ts[L[k]];
      args.p[k] = t.p;
      args.g[k] = t.g;
      args.mc[k] = t.mc;
      args.vc[k] = t.vc;
      args.ma[k] = t.ma;
      args.va[k] = t.va;
      args.numel[k] = t.numel;
      args.coef[0][k] = t.decay;
      args.coef[1][k] = t.neg_step_size;
      args.coef[2][k] = t.bc2_sqrt;
      args.block_off[k] = off;
      off += a8_num_blocks(t.numel);
    }
    args.block_off[L.size()] = off;
    args.n = static_cast<int32_t>(L.size());
    const int64_t cap = a.max_ctas > 0 ? a.max_ctas : 1;
    const unsigned grid = static_cast<unsigned>(off < cap ? off : cap);
    adamw8bit_kernel<T, DECAY, MAXIMIZE><<<grid, kA8Threads, 0, stream>>>(args);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {err, nullptr};
  }
  return {};
}

template <typename T>
LaunchStatus dispatch(const std::vector<A8Tensor>& ts, const A8Params& a, cudaStream_t stream) {
  if (a.decay) return a.maximize ? launch<T, true, true>(ts, a, stream) : launch<T, true, false>(ts, a, stream);
  return a.maximize ? launch<T, false, true>(ts, a, stream) : launch<T, false, false>(ts, a, stream);
}

}  // namespace

LaunchStatus adamw8bit_step(const std::vector<A8Tensor>& tensors, const A8Params& a, cudaStream_t stream) {
  if (a.qmap_signed == nullptr || a.qmap_unsigned == nullptr) return {cudaSuccess, "internal error: no maps"};
  switch (a.dtype) {
    case A8DType::kFloat32: return dispatch<float>(tensors, a, stream);
    case A8DType::kFloat16: return dispatch<__half>(tensors, a, stream);
    case A8DType::kBFloat16: return dispatch<__nv_bfloat16>(tensors, a, stream);
  }
  return {cudaSuccess, "internal error: unsupported dtype"};
}

}  // namespace mltoolkit::cuda_adam8bit
