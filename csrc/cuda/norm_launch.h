// Raw launchers of the CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norm.cu). Plain C++ types only, so that norm.cu
// compiles without torch headers; csrc/cuda/norm_cuda.cpp is the tensor glue (validation, allocation, stream).
// The math is the contract in csrc/norm.h. Accumulation type A: double for float64 x, float otherwise; mean/rstd
// (and the backward workspace) are in A.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "launch_status.h"

namespace mltoolkit::cuda_norm {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline int dtype_size(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}

using LaunchStatus = cuda_launch::LaunchStatus;

// Forward. x, residual, y, residual_out: (M, N) in x_dtype. weight, bias: (N) in w_dtype (x_dtype or float32; both
// the same). mean, rstd: (M) in A. Absent optionals are nullptr (mean is nullptr for rms).
struct FwdParams {
  const void* x = nullptr;
  const void* residual = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  void* residual_out = nullptr;  // required iff residual
  void* mean = nullptr;          // required iff !is_rms
  void* rstd = nullptr;
  int64_t M = 0;
  int64_t N = 0;  // 1 <= N <= INT32_MAX
  double eps = 0.0;
  bool is_rms = false;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
  int device = 0;
};

// Backward. dy, x (= s), dresidual_out, dx: (M, N) in x_dtype. weight: (N) in w_dtype. mean (layer norm only), rstd:
// (M) in A. dweight (N, dw_dtype) is written iff weight; dbias (N, db_dtype) iff has_bias.
struct BwdParams {
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* dresidual_out = nullptr;
  void* dx = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  int64_t M = 0;
  int64_t N = 0;
  bool is_rms = false;
  bool has_bias = false;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
  DType dw_dtype = DType::kFloat32;
  DType db_dtype = DType::kFloat32;
  int device = 0;
};

// What norm_backward will launch, and the scratch it needs (workspace_bytes, 256-byte aligned base).
struct BwdPlan {
  const char* what = nullptr;  // non-null: cannot run these arguments
  int vec = 1;                 // elements per vector access
  int nv = 1;                  // vectors per thread
  int tpr = 32;                // threads per row
  int rows_per_cta = 1;        // walkers per CTA (>1 only when tpr == 32)
  int stages = 2;              // shared-memory ring depth (rows in flight per walker + 1)
  int smem_bytes = 0;          // dynamic shared memory per CTA
  int64_t walker_ctas = 1;     // grid.x
  int64_t chunks = 1;          // grid.y: column chunks (large N; then row statistics are precomputed)
  int64_t nwalkers = 1;        // walker_ctas * rows_per_cta: rows of the dweight/dbias partials
  int64_t dw_offset = 0, db_offset = 0, rowstats_offset = 0;  // bytes into the workspace, -1 when absent
  int64_t workspace_bytes = 0;
};

// Call with p.device current (the glue holds a device guard): the plan and the launches read that device's
// multiprocessor count, shared-memory limit and occupancy (cached), and raise kernels' shared-memory limits on it.
LaunchStatus norm_forward(const FwdParams& p, cudaStream_t stream);
BwdPlan norm_backward_plan(const BwdParams& p);
LaunchStatus norm_backward(const BwdParams& p, const BwdPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace mltoolkit::cuda_norm
