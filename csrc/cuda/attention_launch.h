// Raw launchers of the CUDA attention kernels (csrc/cuda/attention.cu). Plain C++ types only, so that attention.cu
// compiles without torch headers; csrc/cuda/attention_cuda.cpp is the tensor glue (validation, padding, allocation,
// stream). The math is the contract in csrc/attention.h.
//
// What the kernels take (the glue arranges it): float16 or bfloat16; every (B, H, L, D) tensor is seen through a
// view of head dim d8 = D rounded up to 8 whose base pointer is 16-byte aligned, whose batch/head/row strides are
// multiples of 8 elements, whose last stride is 1, and whose columns D .. d8-1 (if any) read as zero. d8 <= 256.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "launch_status.h"

namespace mltoolkit::cuda_attention {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

using LaunchStatus = cuda_launch::LaunchStatus;

// Element strides of a (B, H, L, d8) view; stride(-1) is 1.
struct Strides {
  int64_t b = 0, h = 0, l = 0;
};

struct Params {
  const void* q = nullptr;  // (B, Hq, Lq, d8)
  const void* k = nullptr;  // (B, Hkv, Lk, d8)
  const void* v = nullptr;  // (B, Hkv, Lk, d8)
  Strides q_st, k_st, v_st;
  const void* mask = nullptr;  // optional additive (B, Hq, Lq, Lk) in q's dtype, any element strides (0 = broadcast)
  int64_t mask_b = 0, mask_h = 0, mask_i = 0, mask_j = 0;
  const int32_t* cu_q = nullptr;  // varlen (B == 1): nseq + 1 row offsets each, on the device; both or neither
  const int32_t* cu_k = nullptr;
  int nseq = 0;       // B, or the number of sequences with varlen
  int batch = 0;      // B (1 with varlen)
  int hq = 0, hkv = 0;
  int lq = 0, lk = 0;          // rows of q / k per batch entry (the packed totals with varlen)
  int max_lq = 0, max_lk = 0;  // grid sizing only: the kernels loop over any rows beyond them
  int d8 = 0;
  float scale = 1.f;
  int window_left = -1, window_right = -1;  // -1: unbounded; otherwise 0 .. 2^29
  bool bottom_right = false;
  float dropout_p = 0.f;
  float dropout_scale = 1.f;       // 1 / (1 - dropout_p), computed in double (1.f - dropout_p loses it near 1)
  uint32_t dropout_threshold = 0;  // keep iff the Philox word >= this
  uint64_t seed = 0;
  DType dtype = DType::kFloat16;

  // Forward outputs; backward inputs (out, lse).
  void* out = nullptr;  // (B, Hq, Lq, d8)
  Strides out_st;
  float* lse = nullptr;  // (B, Hq, Lq) contiguous

  // Backward.
  const void* dout = nullptr;  // (B, Hq, Lq, d8)
  Strides dout_st;
  float* delta = nullptr;  // (B, Hq, Lq) contiguous scratch: rowsum(dout * out)
  void* dq = nullptr;      // (B, Hq, Lq, d8)
  void* dk = nullptr;      // (B, Hkv, Lk, d8)
  void* dv = nullptr;
  Strides dq_st, dk_st, dv_st;
};

// The largest head dim. The kernels are compiled for padded head dims 32, 64, 96, 128, 192, 256; d8 runs on the
// smallest that holds it (its extra columns are zero-filled in shared memory and never stored).
constexpr int kMaxHeadDim = 256;

// Call with the tensors' device current. Shared-memory limits above 48 KB are raised on that device first.
LaunchStatus attention_forward(const Params& p, cudaStream_t stream);
// dk/dv: every key row of every sequence is written (zero where no query sees it); dq likewise. No atomics: the
// result does not depend on scheduling.
LaunchStatus attention_backward(const Params& p, cudaStream_t stream);

}  // namespace mltoolkit::cuda_attention
