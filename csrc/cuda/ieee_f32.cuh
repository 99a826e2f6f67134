// IEEE float32 arithmetic on the device, round to nearest even, subnormals kept, no contraction into an FMA, whatever
// the build's flags say. The build compiles with --use_fast_math (-ftz=true -prec-div=false -fmad=true): plain `a / b`
// would be an approximate division and `a * b + c` may fuse, and even __fdiv_rn / __fmul_rn become the .ftz forms.
// PTX instructions written without .ftz keep subnormals, so these are exact whatever the flags. Used where a kernel
// must match a bit-exact contract (the quantizers, the 8-bit optimizers' reference arithmetic).
#pragma once
#include <cuda_runtime.h>

namespace mltoolkit::ieee {

__device__ __forceinline__ float add(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fma(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}
__device__ __forceinline__ float div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sqrt(float a) {
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float abs(float a) {
  float r;
  asm("abs.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float max(float a, float b) {
  float r;
  asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// x > y as IEEE compares it (setp without .ftz: a subnormal is not taken for 0).
__device__ __forceinline__ int gt(float x, float y) {
  int r;
  asm("{\n\t.reg .pred q;\n\tsetp.gt.f32 q, %1, %2;\n\tselp.s32 %0, 1, 0, q;\n\t}" : "=r"(r) : "f"(x), "f"(y));
  return r;
}
__device__ __forceinline__ float neg(float a) { return __uint_as_float(__float_as_uint(a) ^ 0x80000000u); }

}  // namespace mltoolkit::ieee
