// What a raw launcher (a plain C++ function over pointers, in a .cu file) answers its tensor glue: `what` is non-null
// when it refused the arguments (a bug in the glue, or a size it cannot take), `cuda` is the first launch error
// (cudaGetLastError after each launch). The glue turns either into an exception that names the function.
#pragma once
#include <cuda_runtime_api.h>

namespace mltoolkit::cuda_launch {

struct LaunchStatus {
  cudaError_t cuda = cudaSuccess;
  const char* what = nullptr;
  bool ok() const { return cuda == cudaSuccess && what == nullptr; }
};

}  // namespace mltoolkit::cuda_launch
