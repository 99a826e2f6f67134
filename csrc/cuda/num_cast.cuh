// Num<T>: a CUDA kernel's element type T (float, double, __half, __nv_bfloat16), its accumulation type (double for
// double, float otherwise) and explicit conversions both ways (torch builds with __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so the implicit ones are off). Stores round to nearest even.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mltoolkit::cuda_num {

template <typename T>
struct Num;
template <>
struct Num<float> {
  using acc = float;
  __device__ static float to_acc(float v) { return v; }
  __device__ static float from_acc(float v) { return v; }
};
template <>
struct Num<double> {
  using acc = double;
  __device__ static double to_acc(double v) { return v; }
  __device__ static double from_acc(double v) { return v; }
};
template <>
struct Num<__half> {
  using acc = float;
  __device__ static float to_acc(__half v) { return __half2float(v); }
  __device__ static __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  __device__ static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace mltoolkit::cuda_num
