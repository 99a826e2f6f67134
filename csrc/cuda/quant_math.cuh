// Device helpers shared by int8_linear.cu and int4_linear.cu: conversions, warp reductions, the output store, small
// host helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ieee_f32.cuh"
#include "quant_launch.h"

namespace mltoolkit::cuda_quant {

// The bit-exact contracts (quantize_rows, the int8 epilogue, dequantize_int4) need IEEE round-to-nearest operations
// on float32, subnormals included, and no contraction into an FMA: ieee_f32.cuh.

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

// One rounding to nearest-even from float32.
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// Two consecutive outputs: one 4-byte (16-bit types) or 8-byte (float) store when `pair_ok` (the glue's y is
// contiguous and 256-byte aligned, so an even element offset is aligned), else one store each.
template <typename T>
__device__ __forceinline__ void store2(T* y, int64_t off, float a, float b, bool has_b, bool pair_ok) {
  if (has_b && pair_ok) {
    if constexpr (std::is_same_v<T, float>) {
      *reinterpret_cast<float2*>(y + off) = make_float2(a, b);
    } else if constexpr (std::is_same_v<T, __half>) {
      *reinterpret_cast<__half2*>(y + off) = __floats2half2_rn(a, b);
    } else {
      *reinterpret_cast<__nv_bfloat162*>(y + off) = __floats2bfloat162_rn(a, b);
    }
  } else {
    y[off] = from_float<T>(a);
    if (has_b) y[off + 1] = from_float<T>(b);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = ieee::max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- host ------------------------------------------------------------------------------------------------------

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline LaunchStatus refuse(const char* what) {
  LaunchStatus st;
  st.what = what;
  return st;
}

inline LaunchStatus last_error() {
  LaunchStatus st;
  st.cuda = cudaGetLastError();
  return st;
}

inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    return 132;
  }
  return n;
}

inline int smem_optin() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    return 48 * 1024;
  }
  return n;
}

// Calls fn(T{}) with the storage type of t.
template <typename Fn>
LaunchStatus by_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return refuse("unknown dtype");
}

}  // namespace mltoolkit::cuda_quant
