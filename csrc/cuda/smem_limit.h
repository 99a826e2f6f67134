// Host helper of the CUDA kernels' launches: a kernel that needs more dynamic shared memory than the default 48 KB
// must raise its own limit first (cudaFuncSetAttribute), and cannot exceed the device's opt-in maximum.
#pragma once
#include <cuda_runtime.h>

namespace mltoolkit::cuda_util {

// Status has `cudaError_t cuda` and `const char* what` (each kernel family's LaunchStatus); `too_large` is the
// message when smem exceeds what this GPU offers per block.
template <typename Status, typename K>
Status raise_smem_limit(K kernel, int smem, const char* too_large) {
  Status st;
  int dev = 0, optin = 0;
  if ((st.cuda = cudaGetDevice(&dev)) != cudaSuccess) return st;
  if ((st.cuda = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess) {
    return st;
  }
  if (smem > optin) {
    st.what = too_large;
    return st;
  }
  if (smem > 48 * 1024) {
    st.cuda = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  }
  return st;
}

}  // namespace mltoolkit::cuda_util
