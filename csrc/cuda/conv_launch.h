// Raw launchers of the CUDA convolution kernels (csrc/cuda/conv.cu). Plain C++ types only, so that conv.cu compiles
// without torch headers; csrc/cuda/conv_cuda.cpp is the tensor glue (checks, layouts, allocation, stream). The math
// is the contract in csrc/conv.h. Accumulation in float (double for float64).
//
// Kernel families, chosen per problem by the *_path functions below; the glue lays out the weight as the path needs:
//   kDepthwise   C/groups == K/groups == 1: direct kernels, both layouts (NHWC vectorized over channels).
//   kTensorCore  float16/bfloat16, channels per group (reduction and output side) multiples of 8: implicit GEMM on
//                mma.sync tensor cores; activations NHWC (the glue converts NCHW), 16-byte aligned.
//   kSimt        everything else: shared-memory tiled implicit GEMM in the accumulation type, either layout.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "launch_status.h"

namespace mltoolkit::cuda_conv {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class Path : int { kDepthwise = 0, kTensorCore = 1, kSimt = 2 };

using LaunchStatus = cuda_launch::LaunchStatus;

// x (N, C, H, W), weight (K, C / groups, R, S), y (N, K, P, Q). Every per-image size (C*H*W, K*P*Q) and the pixel
// counts N*H*W, N*P*Q are below 2^31 (the glue checks); offsets across images are 64-bit.
struct Shape {
  int n = 0, c = 0, h = 0, w = 0;
  int k = 0, r = 1, s = 1;
  int groups = 1;
  int p = 0, q = 0;
  int sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  bool nhwc = false;  // layout of x, y, residual, dy, dx (the glue makes them agree)
  int cg() const { return c / groups; }
  int kg() const { return k / groups; }
  bool depthwise() const { return cg() == 1 && kg() == 1; }
};

inline bool half_type(DType t) { return t == DType::kFloat16 || t == DType::kBFloat16; }

inline Path forward_path(const Shape& s, DType t) {
  if (s.depthwise()) return Path::kDepthwise;
  return half_type(t) && s.cg() % 8 == 0 && s.kg() % 8 == 0 ? Path::kTensorCore : Path::kSimt;
}
inline Path dgrad_path(const Shape& s, DType t) { return forward_path(s, t); }
inline Path wgrad_path(const Shape& s, DType t) { return forward_path(s, t); }

// y = act(conv(x, w) + bias + residual). act: mltoolkit::Act (csrc/conv_epilogue.h) as an int.
// w by path: kDepthwise (C, R*S) for NCHW, (R*S, C) for NHWC; kTensorCore (K, R, S, C/g) with NHWC x;
// kSimt (K, C/g, R, S) for NCHW x, (K, R, S, C/g) for NHWC x. bias (K) and residual (y's shape and layout) optional.
struct Forward {
  Shape s;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;
  const void* residual = nullptr;
  void* y = nullptr;
  int act = 0;
};
LaunchStatus conv2d_forward(const Forward& a, Path path, cudaStream_t stream);

// dx = conv^T(dy, w). w by path: kDepthwise as the forward; kTensorCore (g, C/g, R, S, K/g) with NHWC dy;
// kSimt (g, C/g, K/g, R, S) for NCHW dy, (g, C/g, R, S, K/g) for NHWC dy.
struct DataGrad {
  Shape s;
  DType dtype = DType::kFloat32;
  const void* dy = nullptr;
  const void* w = nullptr;
  void* dx = nullptr;
};
LaunchStatus conv2d_dgrad(const DataGrad& a, Path path, cudaStream_t stream);

// dw = sum over pixels of dy x gathered x, written in dw's dtype as (K, C/g * R * S) with the columns in x's layout
// order: (c, r, s) for NCHW, (r, s, c) for NHWC and kTensorCore (NHWC); kDepthwise: (C, R*S). Deterministic: split-K
// partials in `workspace` (wgrad_workspace_bytes, 256-byte aligned), summed in a fixed order.
struct WeightGrad {
  Shape s;
  DType dtype = DType::kFloat32;
  const void* dy = nullptr;
  const void* x = nullptr;
  void* dw = nullptr;
  void* workspace = nullptr;
};
size_t wgrad_workspace_bytes(const Shape& s, DType dtype, Path path);
LaunchStatus conv2d_wgrad(const WeightGrad& a, Path path, cudaStream_t stream);

// db = sum of dy over (N, P, Q), deterministic like the wgrad.
struct BiasGrad {
  Shape s;
  DType dtype = DType::kFloat32;
  const void* dy = nullptr;
  void* db = nullptr;
  void* workspace = nullptr;
};
size_t bgrad_workspace_bytes(const Shape& s, DType dtype);
LaunchStatus conv2d_bgrad(const BiasGrad& a, cudaStream_t stream);

}  // namespace mltoolkit::cuda_conv
