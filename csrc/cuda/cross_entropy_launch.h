// Raw launchers of the CUDA cross-entropy kernels (csrc/cuda/cross_entropy.cu). Plain C++ types only, so that the .cu
// compiles without torch headers; csrc/cuda/cross_entropy_cuda.cpp is the tensor glue (checks, outputs, stream).
// The math is csrc/cross_entropy.h's; accumulation in double for float64 logits, float otherwise.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "launch_status.h"

namespace mltoolkit::cuda_cross_entropy {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

using LaunchStatus = cuda_launch::LaunchStatus;

// logits (rows, classes) in dtype, stride 1 along classes, row_stride elements between rows; target int64 (rows).
struct Params {
  const void* logits = nullptr;
  const int64_t* target = nullptr;
  int64_t rows = 0, classes = 0, row_stride = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  DType dtype = DType::kFloat32;
};

// loss, lse: (rows) in the accumulation type. A target out of range (and not ignore_index) gives a NaN loss.
LaunchStatus cross_entropy_forward(const Params& p, void* loss, void* lse, cudaStream_t stream);
// dloss, lse: (rows) in the accumulation type; dlogits: (rows, classes) contiguous in dtype.
LaunchStatus cross_entropy_backward(const Params& p, const void* dloss, const void* lse, void* dlogits,
                                    cudaStream_t stream);

}  // namespace mltoolkit::cuda_cross_entropy
