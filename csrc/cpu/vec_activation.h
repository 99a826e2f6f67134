// act(v) on at::vec vectors for the CPU kernels' fused epilogues (convolution, batch norm): the formulas of
// conv_epilogue.h's apply_activation, with at::vec's exp / erf / tanh for the smooth ones.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../conv_epilogue.h"

namespace mltoolkit::cpu {

// The activations that are vector selects (no exp / erf / tanh): kernels that hold accumulators in registers apply
// the others in a second pass over the stored block, where the calls cannot push the accumulators out.
constexpr bool vector_act(Act act) {
  return act == Act::kNone || act == Act::kRelu || act == Act::kRelu6;
}

// silu(v) = v / (1 + exp(-v)). For float: at::vec's exp_u20 (a degree-5 polynomial, ~2e-6 relative error) and a
// Newton-refined reciprocal instead of Sleef's exp and a division, ~2.5x faster: EfficientNet-B0 computes SiLU on
// ~60 M elements a batch of 8 (its 16 -> 96 expansion's SiLU alone cost 1.2 ms of 3.1, 2026-11-27, 2-core VM).
template <typename T>
inline at::vec::Vectorized<T> silu_vector(at::vec::Vectorized<T> v) {
  using V = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    // exp_u20 overflows to inf from ~88.7 on, and rcp(inf) = 0 would give 0 * inf = NaN in the Newton step: the
    // exponent stops at 88, and below -88 the result is 0 (|silu| < 6e-37 there).
    const __m512 lo = _mm512_set1_ps(-88.f);
    const V e = V(_mm512_min_ps(v.neg(), _mm512_set1_ps(88.f))).exp_u20();
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
    __m512 r = _mm512_rcp14_ps(d);  // 14 bits, one Newton step to ~2^-28
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
    return V(_mm512_mask_mov_ps(_mm512_mul_ps(v, r), _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ), _mm512_setzero_ps()));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const V e = V(_mm256_min_ps(v.neg(), _mm256_set1_ps(88.f))).exp_u20();  // see the AVX-512 branch
    const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), e);
    __m256 r = _mm256_rcp_ps(d);  // 12 bits, two Newton steps
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
    const __m256 below = _mm256_cmp_ps(v, _mm256_set1_ps(-88.f), _CMP_LT_OQ);
    return V(_mm256_andnot_ps(below, _mm256_mul_ps(v, r)));
  }
#endif
  return v / (V(T(1)) + v.neg().exp());
}

// act(v) on a vector, every activation: the formulas of apply_activation, with at::vec's exp / erf / tanh (silu:
// silu_vector). A scalar libm call per element in the epilogues cost ~1.2 ns an element: 11.7 of the 14.5 ms of
// EfficientNet-B0's first 16 -> 96 expansion conv + BN + SiLU (batch 8).
template <typename T>
inline at::vec::Vectorized<T> apply_vector_act(Act act, at::vec::Vectorized<T> v) {
  using V = at::vec::Vectorized<T>;
  const V zero(T(0));
  switch (act) {
    case Act::kRelu:  // v < 0 ? 0 : v, as the scalar form (NaN stays)
      return V::blendv(v, zero, v < zero);
    case Act::kRelu6: {
      const V six(T(6));
      return V::blendv(V::blendv(v, six, v > six), zero, v < zero);
    }
    case Act::kSilu:
      return silu_vector<T>(v);
    case Act::kGelu:
      return V(T(0.5)) * v * (V(T(1)) + (v * V(T(0.70710678118654752440))).erf());
    case Act::kGeluTanh: {
      const V inner = V(T(0.79788456080286535588)) * (v + V(T(0.044715)) * v * v * v);
      return V(T(0.5)) * v * (V(T(1)) + inner.tanh());
    }
    case Act::kHardswish: {
      const V t = at::vec::clamp(v + V(T(3)), zero, V(T(6)));
      return v * t / V(T(6));
    }
    default:
      return v;
  }
}

// f(std::integral_constant<Act, A>{}) for the run-time act, so that the activation is a compile-time constant in f:
// a loop that applies it to each vector is compiled once per activation, with it inlined (the depthwise kernels'
// SiLU pass, switching on a run-time act at each vector, cost ~3x more per element than the convolution epilogue's,
// 2026-11-27).
template <typename F>
inline void with_act(Act act, F&& f) {
  switch (act) {
    case Act::kNone: return f(std::integral_constant<Act, Act::kNone>{});
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kRelu6: return f(std::integral_constant<Act, Act::kRelu6>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kHardswish: return f(std::integral_constant<Act, Act::kHardswish>{});
  }
}

// p[i] = f(p[i]) for i < n, a vector at a time (the last one masked): the activation passes over a stored tile.
template <typename T, typename F>
inline void map_vectors(T* p, int64_t n, F f) {
  using V = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) f(V::loadu(p + i)).store(p + i);
  if (i < n) f(V::loadu(p + i, n - i)).store(p + i, n - i);
}

// act'(v) on a vector for the smooth activations (silu, gelu, gelu_tanh): activation_grad's formulas with at::vec's
// exp / erf / tanh. The select ones (relu, relu6, hardswish) vectorize from the scalar form; they pass through here.
template <typename T>
inline at::vec::Vectorized<T> smooth_activation_grad(Act act, at::vec::Vectorized<T> v) {
  using V = at::vec::Vectorized<T>;
  const V one(T(1)), half(T(0.5));
  switch (act) {
    case Act::kSilu: {
      const V s = one / (one + v.neg().exp());
      return s * (one + v * (one - s));
    }
    case Act::kGelu:  // cdf + v * pdf
      return half * (one + (v * V(T(0.70710678118654752440))).erf()) +
             v * (V(T(-0.5)) * v * v).exp() * V(T(0.39894228040143267794));
    case Act::kGeluTanh: {
      const V k(T(0.79788456080286535588));
      const V t = (k * (v + V(T(0.044715)) * v * v * v)).tanh();
      return half * (one + t) + half * v * (one - t * t) * k * (one + V(T(3 * 0.044715)) * v * v);
    }
    default:
      return v;
  }
}

}  // namespace mltoolkit::cpu
