// Host entry points of the attention and rotary-embedding kernels. One contract for every backend (C++ CPU, CUDA C++,
// Triton); mltoolkit/ops/attention.py and mltoolkit/ops/rotary.py are the only callers, and
// mltoolkit/ops/reference/attention.py is the contract written in plain PyTorch.
//
// ---- Attention ----------------------------------------------------------------------------------------------------
// Layout. q is (B, Hq, Lq, D), k and v are (B, Hkv, Lk, D): any strides, but stride(-1) == 1. Hq % Hkv == 0 and query
// head h reads key/value head h / (Hq / Hkv) (GQA; MQA when Hkv == 1). One dtype: float16, bfloat16, float32 (the CPU
// kernel also takes float64). 1 <= D <= 256. A backend may decline a case it does not cover (the caller then tries the
// next backend), never compute it wrongly.
// Varlen. With cu_seqlens_q / cu_seqlens_k (int32, nseq + 1 entries, increasing, on q's device), B == 1 and the
// tensors are packed: logical sequence b owns query rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] and key rows
// cu_seqlens_k[b] .. cu_seqlens_k[b+1]; max_seqlen_q / max_seqlen_k bound their lengths. Without them, sequence b is
// batch b, with Lq query and Lk key rows. Below, i and j are row indices local to the sequence, Lq_b and Lk_b its
// lengths, b the sequence index.
// Scores. s[i,j] = scale * dot(q[i], k[j]) + mask[b,h,i,j], over keys j that the window allows:
//   diag = bottom_right ? Lk_b - Lq_b : 0
//   allowed(i,j) = (window_left < 0 || j >= i + diag - window_left) && (window_right < 0 || j <= i + diag + window_right)
//   torch SDPA is_causal = window (-1, 0), top-left (bottom_right false); flash-attn causal = window (-1, 0) with
//   bottom_right true; sliding window (w, 0) bottom_right.
// mask (optional, never with varlen) is additive, of q's dtype, shape (B, Hq, Lq, Lk) as an expanded view: broadcast
// dimensions have stride 0, any strides otherwise. -inf entries remove keys.
// Softmax. p = softmax over allowed keys in float32; lse[b,h,i] = log(sum_j exp(s[i,j])) in float32. A row with no
// allowed key (or only -inf scores) has out = 0, lse = +inf, and gets zero gradients.
// Dropout (dropout_p > 0): keep[b,h,i,j] = philox_word(j & 3) >= T with T = floor(dropout_p * 2^32) (computed in double,
// compared as uint32), where philox_word is output word (j & 3) of Philox4x32-10 (Random123 / curand constants:
// multipliers 0xD2511F53, 0xCD9E8D57; key bumps 0x9E3779B9, 0xBB67AE85) on counter (j >> 2, i, b * Hq + h, 0) with
// key (seed & 0xffffffff, seed >> 32). out = sum_j p[i,j] * keep[i,j] / (1 - dropout_p) * v[j]. lse is not affected.
// The backward replays the same keep mask from seed, so every backend draws bit-identical masks.
// Forward returns {out, lse}: out = torch::empty_like(q) (same strides), lse float32 contiguous (B, Hq, Lq).
// Backward takes dout (q's shape, any strides with stride(-1) == 1), q, k, v, out, lse and returns {dq, dk, dv} laid out
// as empty_like(q / k / v); dk and dv sum over the query heads of a group. With deterministic set, the result must not
// depend on thread or block scheduling (no floating-point atomics whose order varies).
//
// ---- Rotary embedding --------------------------------------------------------------------------------------------
// x is (B, L, H, D) with stride(-1) == 1, any other strides; cos and sin are (L, R/2) contiguous, of x's dtype or
// float32, with R = rotary dim, R even, R <= D. Positions r < R/2 (pairs): half-split layout rotates
// (x[r], x[r + R/2]), interleaved rotates (x[2r], x[2r+1]):  y1 = x1*cos - x2*sin, y2 = x1*sin + x2*cos (conjugate:
// sin -> -sin, which is the backward). Dimensions R .. D-1 are copied. Math in float32. out may alias x (in place);
// otherwise out has x's shape and dtype, any strides with stride(-1) == 1.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <optional>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask,
                                              const std::optional<at::Tensor>& cu_seqlens_q,
                                              const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                              int64_t max_seqlen_k, double scale, int64_t window_left,
                                              int64_t window_right, bool bottom_right, double dropout_p, int64_t seed);

std::vector<at::Tensor> attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                               const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& cu_seqlens_q,
                                               const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                               int64_t max_seqlen_k, double scale, int64_t window_left,
                                               int64_t window_right, bool bottom_right, double dropout_p,
                                               int64_t seed, bool deterministic);

void rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                bool interleaved, bool conjugate);

#ifdef MLTK_WITH_CUDA
std::vector<at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& cu_seqlens_q,
                                               const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                               int64_t max_seqlen_k, double scale, int64_t window_left,
                                               int64_t window_right, bool bottom_right, double dropout_p,
                                               int64_t seed);

std::vector<at::Tensor> attention_backward_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                const std::optional<at::Tensor>& mask,
                                                const std::optional<at::Tensor>& cu_seqlens_q,
                                                const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                int64_t max_seqlen_k, double scale, int64_t window_left,
                                                int64_t window_right, bool bottom_right, double dropout_p,
                                                int64_t seed, bool deterministic);

void rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                 bool interleaved, bool conjugate);
#endif

}  // namespace mltoolkit
