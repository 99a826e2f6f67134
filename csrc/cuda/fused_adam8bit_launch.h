// Raw launcher of the CUDA multi-tensor 8-bit AdamW kernel (csrc/cuda/fused_adam8bit.cu). Plain C++ types only, so
// that the .cu file compiles without torch headers; csrc/cuda/fused_adam8bit_cuda.cpp is the tensor glue
// (validation, step counters, host scalars, stream). Contract: csrc/fused_adam8bit.h.
//
// Layout: one CTA of kA8Threads (= 256 = kAdam8bitBlock) threads per quantization block, thread t taking element t
// of the block. A launch takes a table of up to kA8MaxTensors tensors (addresses, sizes, per-tensor coefficients)
// and the prefix sums of their block counts (block_off[s] = first global block of slot s, block_off[n] = total),
// passed by value as the kernel's argument struct (under the 4 KB kernel-parameter limit; no host-to-device copy).
// CTA c takes the global blocks c, c + gridDim.x, ...; the slot of global block b is the s with
// block_off[s] <= b < block_off[s + 1] (a binary search: a8_find_slot). Longer lists take several launches
// (a8_plan: consecutive groups of at most kA8MaxTensors non-empty tensors, list order). a8_plan and a8_find_slot are
// plain C++ so that a CPU test (tests/ops/test_fused_adam8bit_cuda.py) checks them with the system compiler (define
// MLTK_A8_PLAN_ONLY there).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#ifndef MLTK_A8_PLAN_ONLY
#include <cuda_runtime_api.h>

#include "launch_status.h"
#endif

namespace mltoolkit::cuda_adam8bit {

constexpr int kA8Block = 256;        // values per quantization block (kAdam8bitBlock of the contract)
constexpr int kA8Threads = 256;      // threads per CTA: one per value of the block
constexpr int kA8MaxTensors = 40;    // tensors per launch (bounded by the 4 KB parameter space; static_assert in .cu)

#if defined(__CUDACC__)
#define MLTK_A8_HD __host__ __device__ __forceinline__
#else
#define MLTK_A8_HD inline
#endif

inline int64_t a8_num_blocks(int64_t numel) { return numel > 0 ? (numel + kA8Block - 1) / kA8Block : 0; }

// Launches of a list: each is the list indices of its tensors (non-empty ones only, in list order, at most
// max_tensors of them).
inline std::vector<std::vector<int32_t>> a8_plan(const std::vector<int64_t>& numel, int max_tensors = kA8MaxTensors) {
  std::vector<std::vector<int32_t>> out;
  std::vector<int32_t> cur;
  for (size_t t = 0; t < numel.size(); ++t) {
    if (numel[t] <= 0) continue;
    if (static_cast<int>(cur.size()) == max_tensors) {
      out.push_back(cur);
      cur.clear();
    }
    cur.push_back(static_cast<int32_t>(t));
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

// The slot s of global block b: block_off[s] <= b < block_off[s + 1], for 0 <= b < block_off[n] and block_off
// non-decreasing with block_off[0] = 0 (empty slots, if any, are skipped: the largest such s is returned).
MLTK_A8_HD int a8_find_slot(const int64_t* block_off, int n, int64_t b) {
  int lo = 0, hi = n - 1;  // invariant: block_off[lo] <= b < block_off[hi + 1]
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (block_off[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

#ifndef MLTK_A8_PLAN_ONLY

enum class A8DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tensor i: p, g of `dtype` (contiguous, numel elements); codes uint8 (numel); absmax float32 (ceil(numel / 256)).
struct A8Tensor {
  void* p = nullptr;
  const void* g = nullptr;
  uint8_t* mc = nullptr;   // exp_avg codes
  uint8_t* vc = nullptr;   // exp_avg_sq codes
  float* ma = nullptr;     // exp_avg absmax
  float* va = nullptr;     // exp_avg_sq absmax
  int64_t numel = 0;
  float decay = 1.0f, neg_step_size = 0.0f, bc2_sqrt = 1.0f;  // host scalars, as fused_adamw8bit_cpu rounds them
};

struct A8Params {
  A8DType dtype = A8DType::kFloat32;
  float w1 = 0.1f;        // 1 - beta1 (float32)
  float beta2 = 0.999f;
  float c2 = 0.001f;      // 1 - beta2 (float32)
  float eps = 1e-8f;
  bool decay = false;     // weight_decay != 0
  bool maximize = false;
  const float* qmap_signed = nullptr;    // 256 float32 on the device
  const float* qmap_unsigned = nullptr;  // 256 float32 on the device
  int max_ctas = 1024;                   // grid cap (the CTAs then loop over blocks)
};

using LaunchStatus = cuda_launch::LaunchStatus;

LaunchStatus adamw8bit_step(const std::vector<A8Tensor>& tensors, const A8Params& a, cudaStream_t stream);

#endif  // MLTK_A8_PLAN_ONLY

}  // namespace mltoolkit::cuda_adam8bit
