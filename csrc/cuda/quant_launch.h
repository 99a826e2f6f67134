// Raw launchers of the CUDA quantization kernels: int8 (csrc/cuda/int8_linear.cu) and int4 weight-only
// (csrc/cuda/int4_linear.cu). Plain C++ types only, so that the .cu files compile without torch headers;
// csrc/cuda/quant_cuda.cpp is the tensor glue (validation, allocation, device guard, stream). The math is the
// contract in csrc/int8_linear.h and csrc/int4_linear.h.
//
// What the launchers assume (the glue guarantees it, and the launchers re-check what is cheap to check):
//   every pointer is a device pointer of the current device; outputs are contiguous and freshly allocated;
//   sizes fit in int32 where noted; the alignment each path needs is checked here (`what` says why a path refused).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "launch_status.h"

namespace mltoolkit::cuda_quant {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

using LaunchStatus = cuda_launch::LaunchStatus;

// ---- int8 ----------------------------------------------------------------------------------------------------

// quantize_rows: x (R, K) in dtype with element row stride ldx (>= K; last dim contiguous), q (R, K) int8
// contiguous, scale (R,) float32. One warp per row; any alignment.
struct QuantizeParams {
  const void* x = nullptr;
  int8_t* q = nullptr;
  float* scale = nullptr;
  int64_t rows = 0;
  int64_t K = 0;
  int64_t ldx = 0;
  DType dtype = DType::kFloat32;
};
LaunchStatus quantize_rows(const QuantizeParams& p, cudaStream_t stream);

// int8_linear: y (M, N) out_dtype contiguous = epilogue(xq (M, K) . wq^T). xq, wq (N, K) rows: element strides ldx,
// ldw, last dim contiguous (the CPU kernel's packed weight layout is not taken here). bias float32 (N,) or nullptr.
// 1 <= K <= 131071, M, N >= 1, M and N < 2^31.
enum class Int8Path : int { kAuto = 0, kMma = 1, kDp4a = 2, kGemv = 3 };
struct Int8LinearParams {
  const int8_t* xq = nullptr;
  const float* x_scale = nullptr;
  const int8_t* wq = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  void* y = nullptr;
  int64_t M = 0, N = 0, K = 0;
  int64_t ldx = 0, ldw = 0;
  DType out_dtype = DType::kFloat32;
  Int8Path path = Int8Path::kAuto;  // kMma on a device or shape it cannot take is refused (what != nullptr)
  int cc_major = 0, cc_minor = 0;   // the current device's compute capability (the glue reads it)
};
// The path int8_linear would take for p (kGemv, kMma or kDp4a), or kAuto with *why set when it refuses p.path.
Int8Path int8_linear_path(const Int8LinearParams& p, const char** why);
LaunchStatus int8_linear(const Int8LinearParams& p, cudaStream_t stream);

// ---- int4 ----------------------------------------------------------------------------------------------------

// dequantize_int4: packed (N, K/2) uint8, scales / zeros (N, K/G) float32, out (N, K) float32, all contiguous.
// K a multiple of G, G in {32, 64, 128, 256}. N * K / 8 < 2^62.
struct DequantParams {
  const uint8_t* packed = nullptr;
  const float* scales = nullptr;
  const float* zeros = nullptr;
  float* out = nullptr;
  int64_t N = 0, K = 0;
  int G = 128;
};
LaunchStatus dequantize_int4(const DequantParams& p, cudaStream_t stream);

// int4_weight_only_linear: y (M, N) in dtype contiguous = x (M, K) @ w'^T + bias. x: element row stride ldx, last
// dim contiguous, any alignment for the small-M path; packed (N, K/2) contiguous with a 16-byte aligned base (K is a
// multiple of 32, so every row starts 16-byte aligned); scales / zeros (N, K/G) contiguous; bias (N,) in dtype or
// nullptr. M, N, K >= 1 and < 2^31.
enum class Int4Path : int { kAuto = 0, kGemv = 1, kMma = 2, kTcGemv = 3 };
struct Int4LinearParams {
  const void* x = nullptr;
  const uint8_t* packed = nullptr;
  const float* scales = nullptr;
  const float* zeros = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  int64_t M = 0, N = 0, K = 0;
  int64_t ldx = 0;
  int G = 128;
  DType dtype = DType::kFloat32;
  Int4Path path = Int4Path::kAuto;
  int cc_major = 0, cc_minor = 0;
};
Int4Path int4_linear_path(const Int4LinearParams& p, const char** why);
LaunchStatus int4_linear(const Int4LinearParams& p, cudaStream_t stream);

}  // namespace mltoolkit::cuda_quant
