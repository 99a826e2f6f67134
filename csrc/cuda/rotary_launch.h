// Raw launcher of the CUDA rotary-embedding kernel (csrc/cuda/rotary.cu). Plain C++ types only, so that rotary.cu
// compiles without torch headers; csrc/cuda/rotary_cuda.cpp is the tensor glue (validation, table dtypes, stream).
// The math is the "Rotary embedding" contract in csrc/attention.h. Accumulation type: double for float64 x, float
// otherwise.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "launch_status.h"

namespace mltoolkit::cuda_rotary {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

using LaunchStatus = cuda_launch::LaunchStatus;

// x, out: (B, L, H, D) in x_dtype, stride 1 in the last dim, strides of dims 0..2 in elements (out may be x: then
// the copied tail is skipped). cos, sin: (L, half) contiguous in table_dtype, which is x_dtype or float32 (float64
// for float64 x). half = rotary_dim / 2, 2 * half <= D.
struct Params {
  const void* x = nullptr;
  void* out = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t B = 0, L = 0, H = 0, D = 0, half = 0;
  int64_t x_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};
  bool interleaved = false;
  bool conjugate = false;
  DType x_dtype = DType::kFloat32;
  DType table_dtype = DType::kFloat32;
};

LaunchStatus rotary_forward(const Params& p, cudaStream_t stream);

}  // namespace mltoolkit::cuda_rotary
