// Raw launchers of the CUDA multi-tensor optimizer kernels (csrc/cuda/fused_optim.cu): fused AdamW, fused LAMB and
// the fused global-norm gradient clip. Plain C++ types only, so that fused_optim.cu compiles without torch headers;
// csrc/cuda/fused_optim_cuda.cpp is the tensor glue (validation, step counters, scratch, stream). Contracts:
// csrc/fused_adam.h and csrc/fused_lamb.h.
//
// Multi-tensor layout (in the style of apex's multi_tensor_apply): every tensor of a list is cut into chunks of
// pick_chunk(sizes) elements (kMinChunk..kChunk; a tensor's last chunk may be shorter); a launch takes a table of up to MaxTensors tensors (addresses,
// sizes, per-tensor values) and up to MaxEntries (tensor slot, chunk index) entries, passed by value as the kernel's
// argument struct (under the 4 KB kernel-parameter limit; no host-to-device copy). A CTA of kThreads threads takes
// entries blockIdx.x, blockIdx.x + gridDim.x, ... Longer lists take several launches; a tensor may continue in the
// next launch. plan_chunks() below cuts a list into launches; it is plain C++ so that a CPU test
// (tests/ops/test_fused_optim_cuda.py) checks it with the system compiler (define MLTK_OPTIM_PLAN_ONLY there).
//
// Per-chunk partial results (LAMB's sums of p^2 and u^2, the clip's sum of |g|^p or max |g|) go to slot
// chunk_offsets(numel, chunk)[t] + chunk of a scratch buffer; a second kernel adds a tensor's slots in chunk order with a
// fixed reduction tree, so the norms are deterministic (no atomics) and do not depend on the launch split.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#ifndef MLTK_OPTIM_PLAN_ONLY
#include <cuda_runtime_api.h>

#include "launch_status.h"
#endif

namespace mltoolkit::cuda_optim {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline int dtype_size(DType t) { return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2; }

constexpr int64_t kChunk = 65536;    // elements per chunk (the largest; see pick_chunk)
constexpr int64_t kMinChunk = 4096;  // the smallest; every chunk size is a multiple of it (16-byte aligned starts)
constexpr int kThreads = 512;      // threads per CTA of the chunk kernels
constexpr int kMaxEntries = 320;   // chunks per launch (apex's 320)
// Tensors per launch, by kernel (bounded by the 4 KB parameter space; static_asserts in fused_optim.cu).
constexpr int kAdamMaxTensors = 32;
constexpr int kLambMaxTensors = 36;
constexpr int kClipMaxTensors = 64;
constexpr int kReduceMaxTensors = 256;  // tensors per LAMB norm-reduction launch

// ---- host planning (plain C++) -------------------------------------------------------------------------------

struct PlanEntry {
  int32_t slot;   // index into the launch's tensor table
  int32_t chunk;  // chunk index within that tensor: elements [chunk * kChunk, min(numel, (chunk + 1) * kChunk))
};

struct PlanLaunch {
  std::vector<int32_t> tensors;  // list index of each slot's tensor
  std::vector<PlanEntry> entries;
};

inline int64_t num_chunks(int64_t numel, int64_t chunk = kChunk) { return numel > 0 ? (numel + chunk - 1) / chunk : 0; }

// First partial slot of each tensor (size n + 1; the last value is the total number of chunks).
inline std::vector<int64_t> chunk_offsets(const std::vector<int64_t>& numel, int64_t chunk = kChunk) {
  std::vector<int64_t> off(numel.size() + 1, 0);
  for (size_t t = 0; t < numel.size(); ++t) off[t + 1] = off[t] + num_chunks(numel[t], chunk);
  return off;
}

// The chunk size of a call: kChunk for large tensors, smaller (a multiple of kMinChunk) when the mean tensor is
// small, so that a launch (at most max_tensors tensors: the parameter space bounds it) still holds about 8 chunks
// per tensor, i.e. enough CTAs to fill the GPU (200 tensors of 50K elements: 8192-element chunks, 224 CTAs a launch
// instead of 32). Depends only on the sizes: the same list always gets the same chunks (deterministic norms).
inline int64_t pick_chunk(const std::vector<int64_t>& numel) {
  int64_t total = 0, count = 0;
  for (int64_t n : numel) {
    if (n > 0) {
      total += n;
      ++count;
    }
  }
  if (count == 0) return kChunk;
  const int64_t c = (total / count / 8 + kMinChunk - 1) / kMinChunk * kMinChunk;
  return c < kMinChunk ? kMinChunk : c > kChunk ? kChunk : c;
}

// Cuts the chunks of all tensors (in list order, empty tensors skipped) into launches of at most max_tensors tensors
// and max_entries entries. A tensor whose chunks do not all fit continues in the next launch (a new slot there).
inline std::vector<PlanLaunch> plan_chunks(const std::vector<int64_t>& numel, int max_tensors, int max_entries,
                                           int64_t chunk = kChunk) {
  std::vector<PlanLaunch> out;
  PlanLaunch cur;
  for (size_t t = 0; t < numel.size(); ++t) {
    const int64_t nc = num_chunks(numel[t], chunk);
    int32_t slot = -1;  // t's slot in cur, once it has one
    for (int64_t c = 0; c < nc; ++c) {
      if (static_cast<int>(cur.entries.size()) == max_entries) {
        out.push_back(std::move(cur));
        cur = PlanLaunch();
        slot = -1;
      }
      if (slot < 0) {
        if (static_cast<int>(cur.tensors.size()) == max_tensors) {
          out.push_back(std::move(cur));
          cur = PlanLaunch();
        }
        slot = static_cast<int32_t>(cur.tensors.size());
        cur.tensors.push_back(static_cast<int32_t>(t));
      }
      cur.entries.push_back({slot, static_cast<int32_t>(c)});
    }
  }
  if (!cur.entries.empty()) out.push_back(std::move(cur));
  return out;
}

// ---- the element walk of one chunk (host and device: the kernels call it, the CPU test replays it) -------------

#if defined(__CUDACC__)
#define MLTK_OPTIM_HD __host__ __device__ __forceinline__
#else
#define MLTK_OPTIM_HD inline
#endif

// Elements of the chunk that starts at element begin (< numel): chunk, or what is left of the tensor.
MLTK_OPTIM_HD int64_t chunk_len(int64_t numel, int64_t begin, int64_t chunk) {
  return numel - begin < chunk ? numel - begin : chunk;
}

// Thread tid (of kThreads) of the CTA that walks a chunk of n elements: with vec_ok (every pointer 16-byte aligned at
// the chunk start), vec_fn(first element) for the whole vectors tid, tid + kThreads, ... of the n / V of them, then
// one_fn(element) for the n % V elements left (element nvec * V + tid, ...); without, one_fn for every element tid,
// tid + kThreads, ... Every element of [0, n) is visited once by exactly one thread.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <int V, typename VecFn, typename OneFn>
MLTK_OPTIM_HD void walk_chunk(int64_t n, bool vec_ok, int tid, VecFn&& vec_fn, OneFn&& one_fn) {
  int64_t done = 0;
  if (vec_ok) {
    const int64_t nvec = n / V;
    for (int64_t k = tid; k < nvec; k += kThreads) vec_fn(k * V);
    done = nvec * V;
  }
  for (int64_t i = done + tid; i < n; i += kThreads) one_fn(i);
}

#ifndef MLTK_OPTIM_PLAN_ONLY

using LaunchStatus = cuda_launch::LaunchStatus;

// ---- AdamW ---------------------------------------------------------------------------------------------------
// Tensor i: p, g, m, v (and vmax when amsgrad), all `dtype` (float32, float16 or bfloat16), numel[i] elements each,
// dense in one memory order (the update is elementwise). Math in float32; coefficients per tensor as the contract
// computes them on the host (decay, -step_size, bc2_sqrt, each rounded to float32).
struct AdamTensor {
  void* p = nullptr;
  const void* g = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  void* vmax = nullptr;  // amsgrad only
  int64_t numel = 0;
  float decay = 1.0f, neg_step_size = 0.0f, bc2_sqrt = 1.0f;
};

struct AdamParams {
  DType dtype = DType::kFloat32;
  float w1 = 0.1f;     // 1 - beta1 (float32)
  float beta2 = 0.999f;
  float c2 = 0.001f;   // 1 - beta2 (float32)
  float eps = 1e-8f;
  bool amsgrad = false;
  bool maximize = false;
};

LaunchStatus adamw_step(const std::vector<AdamTensor>& tensors, const AdamParams& a, cudaStream_t stream);

// ---- LAMB ----------------------------------------------------------------------------------------------------
// Tensor i: p, g, m, v in `dtype` (float32 or float64; arithmetic in that dtype, norms in float64).
struct LambTensor {
  void* p = nullptr;
  const void* g = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  int64_t numel = 0;
};

// Scalars already rounded to dtype on the host (as the CPU kernel rounds them), carried as double.
struct LambParams {
  DType dtype = DType::kFloat32;
  double beta1 = 0.9, beta2 = 0.999, beta3 = 0.1, one_minus_beta2 = 0.001;
  double inv_bc1 = 1.0, inv_bc2 = 1.0, eps = 1e-6, weight_decay = 0.0;
  double lr = 1e-3;               // double, as the CPU kernel's scale = (T)(lr * trust)
  bool use_trust_ratio = true;
  double max_trust_ratio = 0.0;   // > 0: clamp
};

// Scratch: partials of 2 * chunk_offsets(numel, pick_chunk(numel)).back() doubles, scales of tensors.size() doubles (device memory).
LaunchStatus lamb_step(const std::vector<LambTensor>& tensors, const LambParams& a, double* partials,
                       double* scales, cudaStream_t stream);

// ---- global-norm clip ----------------------------------------------------------------------------------------
enum class NormKind : int { kL2 = 0, kInf = 1, kLp = 2 };

struct ClipTensor {
  void* g = nullptr;
  int64_t numel = 0;
};

struct ClipParams {
  DType dtype = DType::kFloat32;  // float32 or float64
  NormKind kind = NormKind::kL2;
  double p = 2.0;                 // kLp: the order (> 0, finite)
  double max_norm = 1.0;
};

// Phase 1: per-chunk partials (chunk_offsets(numel, pick_chunk(numel)).back() doubles) and then, in one CTA, total (a 0-dim tensor of
// dtype) and coef (one element of dtype) = min(1, max_norm / (total + 1e-6)) computed in dtype (nan when total is).
LaunchStatus clip_norm(const std::vector<ClipTensor>& tensors, const ClipParams& a, double* partials, void* total,
                       void* coef, cudaStream_t stream);
// Phase 2: every g *= coef (read on the device).
LaunchStatus clip_scale(const std::vector<ClipTensor>& tensors, const ClipParams& a, const void* coef,
                        cudaStream_t stream);

#endif  // MLTK_OPTIM_PLAN_ONLY

}  // namespace mltoolkit::cuda_optim
