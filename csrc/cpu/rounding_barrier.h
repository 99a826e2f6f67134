// opaque(x): a rounding barrier. Where torch rounds a product on its own (mul_ is one kernel, addcmul_ the next),
// passing it through opaque() keeps the compiler from contracting it into an fma with the next add, so that our
// fused kernels reproduce torch's float32 results bit for bit (fused_adam.cpp, fused_adam8bit.cpp).
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace mltoolkit {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
inline float opaque(float x) {
  asm("" : "+x"(x));
  return x;
}
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline at::vec::Vectorized<float> opaque(at::vec::Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = x;
#else
  __m256 r = x;
#endif
  asm("" : "+v"(r));
  return at::vec::Vectorized<float>(r);
}
#else
inline at::vec::Vectorized<float> opaque(at::vec::Vectorized<float> x) { return x; }
#endif
#else
inline float opaque(float x) {
  volatile float r = x;
  return r;
}
inline at::vec::Vectorized<float> opaque(at::vec::Vectorized<float> x) { return x; }
#endif

}  // namespace mltoolkit
