// The fused epilogue of the convolution kernels (contract in csrc/conv.h): y = act(conv + bias + residual).
// One definition of the activations for the CPU kernel and the CUDA kernels, with torch's formulas.
#pragma once
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#if defined(__CUDACC__)
#define MLTK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLTK_HOST_DEVICE inline
#endif

namespace mltoolkit {

enum class Act : int { kNone = 0, kRelu, kRelu6, kSilu, kGelu, kGeluTanh, kHardswish };

inline Act parse_activation(const char* fn, const std::string& name) {
  if (name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "relu6") return Act::kRelu6;
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "hardswish") return Act::kHardswish;
  TORCH_CHECK(false, fn, ": activation must be one of none, relu, relu6, silu, gelu, gelu_tanh, hardswish, got '",
              name, "'");
}

// act(v) in float or double; v is the accumulated conv + bias + residual.
template <typename T>
MLTK_HOST_DEVICE T apply_activation(Act act, T v) {
  using std::erf;  // the float overloads on the host; CUDA provides them on the device
  using std::exp;
  using std::tanh;
  switch (act) {
    case Act::kRelu:  // NaN passes through, as in F.relu
      return v < T(0) ? T(0) : v;
    case Act::kRelu6:
      return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
    case Act::kSilu:
      return v / (T(1) + exp(-v));
    case Act::kGelu:
      return T(0.5) * v * (T(1) + erf(v * T(0.70710678118654752440)));
    case Act::kGeluTanh: {
      const T inner = T(0.79788456080286535588) * (v + T(0.044715) * v * v * v);
      return T(0.5) * v * (T(1) + tanh(inner));
    }
    case Act::kHardswish: {
      const T t = v + T(3);
      return v * (t < T(0) ? T(0) : (t > T(6) ? T(6) : t)) / T(6);
    }
    default:
      return v;
  }
}

// act'(v), as torch's backward kernels compute it, including their values at the kinks: relu' = 1 only for v > 0
// (threshold_backward), relu6' = 1 only strictly inside (0, 6) (hardtanh_backward), hardswish' = v / 3 + 1/2 on
// [-3, 3] (hardswish_backward).
template <typename T>
MLTK_HOST_DEVICE T activation_grad(Act act, T v) {
  using std::erf;
  using std::exp;
  using std::tanh;
  switch (act) {
    case Act::kRelu:
      return v > T(0) ? T(1) : T(0);
    case Act::kRelu6:
      return (v > T(0) && v < T(6)) ? T(1) : T(0);
    case Act::kSilu: {
      const T s = T(1) / (T(1) + exp(-v));
      return s * (T(1) + v * (T(1) - s));
    }
    case Act::kGelu:  // cdf + v * pdf
      return T(0.5) * (T(1) + erf(v * T(0.70710678118654752440))) +
             v * exp(T(-0.5) * v * v) * T(0.39894228040143267794);
    case Act::kGeluTanh: {
      const T k = T(0.79788456080286535588);
      const T t = tanh(k * (v + T(0.044715) * v * v * v));
      return T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * v * v);
    }
    case Act::kHardswish:
      return v < T(-3) ? T(0) : (v <= T(3) ? v / T(3) + T(0.5) : T(1));
    default:
      return T(1);
  }
}

}  // namespace mltoolkit
