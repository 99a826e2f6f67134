// CPU attention kernel, forward and backward; the contract (layouts, masks, window, varlen, GQA, dropout, lse) is in
// csrc/attention.h and mltoolkit/ops/reference/attention.py. Blocked online softmax after FlashAttention-2
// (Dao, 2023): no Lq x Lk matrix is ever formed.
//
// Math in acc_t: float, or double for float64 inputs; fp16/bf16 are widened as tiles are packed. Every tile product
// (Q K^T, P V, dO V^T, P^T dO, dS^T Q, dS K) runs through the register-blocked kernel of attention_gemm.h, whose B
// operand is packed in contiguous panels.
//
// Forward: one task = (sequence, query head, block of kFwdBlockM query rows); at::parallel_for hands each thread a
// contiguous range of tasks, so a thread works through the query blocks of one head at a time and keeps that head's
// packed K^T and V panels in a per-thread cache (2 * Lk * D acc_t per thread, at most kFwdCacheBytes), packing each
// key block once. Within a
// head the query blocks are visited from both ends alternately, so that under a causal band both halves of a head's
// range cost the same. Key blocks outside the window are skipped; only blocks that the band cuts are masked element
// by element.
//
// Backward: delta = rowsum(dO * O) first, then one task = (sequence, kv head, chunk of key blocks). A task owns the
// dK/dV rows of its key blocks (each block accumulated over every query head of its GQA group and every query block
// in the band) and adds dS K into dQ: straight into dq when one chunk covers the whole key range (the task then owns
// those dq rows), else into a private acc_t slice per chunk that a last pass sums in chunk order. No two tasks write
// the same memory and every sum runs in a fixed order, so the result is bitwise the same for any thread count and
// schedule (deterministic is always honoured). Chunks are used only when there are fewer than kBwdTargetTasks
// (sequence, kv head) units; they cost nchunks * B * Hq * Lq * D acc_t of workspace, as does dq for fp16/bf16.
// float64: the contract's lse is float32, which would cap the gradients at float32 accuracy, so the float64 backward
// recomputes lse in double (one extra Q K^T pass) instead of reading it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../attention.h"
#include "../check_util.h"
#include "attention_gemm.h"
#include "reused_memory.h"
#include "vec_chunk.h"

namespace mltoolkit {
namespace {

using attn::gemm;
using attn::kPanel;
using attn::pack_rows;
using attn::pack_transposed;
using attn::round_up_panel;
using attn::Vec;

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kFwdBlockM = 64;    // query rows per forward task
constexpr int64_t kBwdBlockM = 64;    // query rows per backward tile
constexpr int64_t kBlockN = 128;      // key rows per tile (forward and backward)
constexpr int64_t kFwdCacheBytes = int64_t(64) << 20;  // per thread: K^T and V panels of a head
constexpr int64_t kBwdTargetTasks = 16;  // split key ranges until there are about this many backward tasks
constexpr int64_t kBwdMaxChunks = 8;
constexpr int64_t kFar = int64_t(1) << 60;  // "no bound" for the window
// A parallel task should carry at least this many multiply-adds: waking a second thread costs microseconds (and a
// scheduler slice on an oversubscribed machine), far more than a tiny problem's whole run.
constexpr int64_t kMinTaskWork = int64_t(1) << 16;

// Grain size for at::parallel_for over tasks of about `work_per_task` multiply-adds each.
int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_task));
}

// ---------------------------------------------------------------------------------------------------------------
// Input checks: every message names the function and the argument.

void check_common(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor, got layout ", t.layout());
}

void check_qkv_like(const char* fn, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  check_common(fn, name, t);
  TORCH_CHECK(t.dim() == 4, fn, ": ", name, " must be 4-D (batch, heads, seq, head_dim), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have q's dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, fn, ": ", name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
}

struct Seq {
  int64_t batch;   // index into dim 0 of the tensors
  int64_t q_off;   // first query / key row in dim 2
  int64_t k_off;
  int64_t lq, lk;
};

// Sequences: one per batch entry, or one per cu_seqlens segment (varlen, B == 1).
std::vector<Seq> make_sequences(const char* fn, const at::Tensor& q, const at::Tensor& k,
                                const std::optional<at::Tensor>& cu_seqlens_q,
                                const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, bool has_mask) {
  std::vector<Seq> seqs;
  const bool vq = present(cu_seqlens_q), vk = present(cu_seqlens_k);
  TORCH_CHECK(vq == vk, fn, ": cu_seqlens_q and cu_seqlens_k must be given together (varlen) or both omitted");
  if (!vq) {
    for (int64_t b = 0; b < q.size(0); ++b) seqs.push_back({b, 0, 0, q.size(2), k.size(2)});
    return seqs;
  }
  TORCH_CHECK(!has_mask, fn, ": mask is not supported together with cu_seqlens (varlen)");
  TORCH_CHECK(q.size(0) == 1, fn, ": varlen (cu_seqlens) needs packed tensors with batch 1, got q of shape ",
              q.sizes());
  const at::Tensor* cus[2] = {&*cu_seqlens_q, &*cu_seqlens_k};
  const char* names[2] = {"cu_seqlens_q", "cu_seqlens_k"};
  const int64_t totals[2] = {q.size(2), k.size(2)};
  const int64_t maxes[2] = {max_seqlen_q, max_seqlen_k};
  const char* max_names[2] = {"max_seqlen_q", "max_seqlen_k"};
  std::vector<int64_t> offs[2];
  for (int w = 0; w < 2; ++w) {
    const at::Tensor& c = *cus[w];
    TORCH_CHECK(c.device() == q.device(), fn, ": ", names[w], " must be on q's device (", q.device(), "), got ",
                c.device());
    TORCH_CHECK(c.scalar_type() == at::kInt, fn, ": ", names[w], " must be int32, got ", c.scalar_type());
    TORCH_CHECK(c.dim() == 1 && c.size(0) >= 2, fn, ": ", names[w],
                " must be 1-D with nseq + 1 >= 2 entries, got shape ", c.sizes());
    const int32_t* p = c.const_data_ptr<int32_t>();
    const int64_t st = c.stride(0);
    TORCH_CHECK(p[0] == 0, fn, ": ", names[w], "[0] must be 0, got ", p[0]);
    for (int64_t i = 0; i < c.size(0); ++i) {
      const int64_t x = p[i * st];
      if (i > 0) {
        TORCH_CHECK(x >= offs[w].back(), fn, ": ", names[w], " must be non-decreasing, got ", offs[w].back(),
                    " then ", x, " at index ", i);
        TORCH_CHECK(x - offs[w].back() <= maxes[w], fn, ": sequence ", i - 1, " has length ", x - offs[w].back(),
                    " > ", max_names[w], " = ", maxes[w]);
      }
      offs[w].push_back(x);
    }
    TORCH_CHECK(offs[w].back() == totals[w], fn, ": ", names[w], "[-1] must equal the packed length ", totals[w],
                ", got ", offs[w].back());
  }
  TORCH_CHECK(offs[0].size() == offs[1].size(), fn, ": cu_seqlens_q and cu_seqlens_k must have the same length, got ",
              offs[0].size(), " and ", offs[1].size());
  for (size_t b = 0; b + 1 < offs[0].size(); ++b)
    seqs.push_back({0, offs[0][b], offs[1][b], offs[0][b + 1] - offs[0][b], offs[1][b + 1] - offs[1][b]});
  return seqs;
}

// Everything the kernels read, as raw pointers and strides (in elements).
struct Problem {
  int64_t Hq = 0, Hkv = 0, group = 0, D = 0, Lq = 0, Lk = 0;  // Lq, Lk: dim 2 of the tensors
  std::vector<Seq> seqs;
  const void *q = nullptr, *k = nullptr, *v = nullptr, *mask = nullptr;
  int64_t qs[3], ks[3], vs[3], ms[4] = {0, 0, 0, 0};  // strides of dims 0..2 (mask: 0..3)
  double scale = 1.0;
  int64_t wl = -1, wr = -1;
  bool bottom_right = false;
  double dropout_p = 0.0;
  uint32_t threshold = 0;  // keep iff philox word >= threshold
  uint32_t key0 = 0, key1 = 0;

  // The band of keys query row i of sequence s may see: [lo, hi].
  int64_t diag(const Seq& s) const { return bottom_right ? s.lk - s.lq : 0; }
  int64_t lo(const Seq& s, int64_t i) const { return wl < 0 ? -kFar : i + diag(s) - wl; }
  int64_t hi(const Seq& s, int64_t i) const { return wr < 0 ? kFar : i + diag(s) + wr; }
  // lse / delta index of row i of head h in sequence s ((B, Hq, Lq) contiguous).
  int64_t row_index(const Seq& s, int64_t h, int64_t i) const { return (s.batch * Hq + h) * Lq + s.q_off + i; }
};

Problem make_problem(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens_q,
                     const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                     double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                     int64_t seed) {
  check_common(fn, "q", q);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, fn,
              ": q must be float32, float64, float16 or bfloat16, got ", dtype);
  check_qkv_like(fn, "q", q, dtype);
  check_qkv_like(fn, "k", k, dtype);
  check_qkv_like(fn, "v", v, dtype);
  const int64_t D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, fn, ": head_dim (q.size(-1)) must be in 1..", kMaxHeadDim, ", got ", D);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == D, fn,
              ": k must have shape (B, Hkv, Lk, D) with q's B and D, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), fn, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, fn,
              ": the query heads (q.size(1) = ", q.size(1), ") must be a multiple of the key/value heads (k.size(1) = ",
              k.size(1), ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);

  Problem pb;
  pb.Hq = q.size(1);
  pb.Hkv = k.size(1);
  pb.group = pb.Hq / pb.Hkv;
  pb.D = D;
  pb.Lq = q.size(2);
  pb.Lk = k.size(2);
  pb.seqs = make_sequences(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, present(mask));
  pb.q = q.const_data_ptr();
  pb.k = k.const_data_ptr();
  pb.v = v.const_data_ptr();
  for (int d = 0; d < 3; ++d) {
    pb.qs[d] = q.stride(d);
    pb.ks[d] = k.stride(d);
    pb.vs[d] = v.stride(d);
  }
  if (present(mask)) {
    const at::Tensor& m = *mask;
    check_common(fn, "mask", m);
    TORCH_CHECK(m.scalar_type() == dtype, fn, ": mask must be additive with q's dtype ", dtype, ", got ",
                m.scalar_type());
    const std::vector<int64_t> want = {q.size(0), pb.Hq, pb.Lq, pb.Lk};
    TORCH_CHECK(m.sizes() == at::IntArrayRef(want), fn, ": mask must have shape (B, Hq, Lq, Lk) = ",
                at::IntArrayRef(want), " (an expanded view is fine), got ", m.sizes());
    pb.mask = m.const_data_ptr();
    for (int d = 0; d < 4; ++d) pb.ms[d] = m.stride(d);
  }
  pb.scale = scale;
  pb.wl = window_left;
  pb.wr = window_right;
  pb.bottom_right = bottom_right;
  pb.dropout_p = dropout_p;
  pb.threshold = static_cast<uint32_t>(std::min(std::floor(dropout_p * 4294967296.0), 4294967295.0));
  pb.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu);
  pb.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  return pb;
}

// ---------------------------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10 as in the contract (bit-identical to reference.dropout_keep).

inline void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                          uint32_t out[4]) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
// Eight Philox4x32-10 streams at once, on counters (g0 + l, c1, c2, 0) for lanes l = 0..7, then the keep factors of
// the 32 keys 4 * g0 .. 4 * g0 + 31 in key order (key 4 * (g0 + l) + w takes word w of lane l). Same arithmetic as
// philox4x32_10: _mm256_mul_epu32 forms the 64-bit products of the even lanes, and of the odd lanes shifted down.
inline void dropout_factors_x32(uint32_t g0, uint32_t c1v, uint32_t c2v, uint32_t k0, uint32_t k1, uint32_t threshold,
                                float kept, float* out) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(c1v)), c2 = _mm256_set1_epi32(static_cast<int>(c2v));
  __m256i c3 = _mm256_setzero_si256();
  for (int r = 0; r < 10; ++r) {
    const __m256i pe0 = _mm256_mul_epu32(c0, m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
    const __m256i pe1 = _mm256_mul_epu32(c2, m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
    const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
    const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
    const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // keep iff word >= threshold (unsigned): max_epu32(word, threshold) == word.
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256 vkept = _mm256_set1_ps(kept);
  __m256 f[4];
  const __m256i words[4] = {c0, c1, c2, c3};
  for (int w = 0; w < 4; ++w)
    f[w] = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(words[w], thr), words[w])), vkept);
  // Transpose (word, lane) -> key order: 4 x 4 within each 128-bit half, then regroup the halves.
  const __m256 t0 = _mm256_unpacklo_ps(f[0], f[1]), t1 = _mm256_unpacklo_ps(f[2], f[3]);
  const __m256 t2 = _mm256_unpackhi_ps(f[0], f[1]), t3 = _mm256_unpackhi_ps(f[2], f[3]);
  const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1)));
  const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1)));
  const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t2), _mm256_castps_pd(t3)));
  const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t2), _mm256_castps_pd(t3)));
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}
#endif

// factor[jj] = keep ? 1 / (1 - p) : 0 for keys j0 .. j0 + n - 1 of row i of sequence b, head h.
template <typename acc_t>
void dropout_factors(const Problem& pb, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, acc_t* factor) {
  const acc_t kept = acc_t(1.0 / (1.0 - pb.dropout_p));
  const uint32_t c2 = uint32_t(b * pb.Hq + h);
  int64_t jj = 0;
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if ((j0 & 3) == 0) {
      for (; jj + 32 <= n; jj += 32)
        dropout_factors_x32(uint32_t((j0 + jj) >> 2), uint32_t(i), c2, pb.key0, pb.key1, pb.threshold, kept,
                            factor + jj);
    }
  }
#endif
  uint32_t words[4];
  while (jj < n) {
    const int64_t j = j0 + jj;
    philox4x32_10(uint32_t(j >> 2), uint32_t(i), c2, 0u, pb.key0, pb.key1, words);
    for (int w = int(j & 3); w < 4 && jj < n; ++w, ++jj) factor[jj] = words[w] >= pb.threshold ? kept : acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row helpers.

template <typename T>
constexpr bool is_reduced_float = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

template <typename src_t, typename dst_t>
void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, sizeof(dst_t) * n);
  } else if constexpr (is_reduced_float<src_t> && std::is_same_v<dst_t, float>) {
    // at::vec::convert has no vectorized fp16/bf16 -> float path; load_to_float is one.
    using FVec = Vec<float>;
    int64_t i = 0;
    for (; i + FVec::size() <= n; i += FVec::size()) {
      FVec wide;
      at::vec::load_to_float(src + i, wide);
      wide.store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    at::vec::convert(src, dst, n);
  }
}

using cpu::vexp;

// Rows i0 .. i0 + m - 1 of a (batch, head) slice of a (B, H, L, D) tensor as acc_t with row stride ld: the tensor
// itself when it is acc_t (ld = its row stride), else widened into buf (ld = D).
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* base, int64_t row_stride, int64_t m, int64_t D, acc_t* buf, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld = row_stride;
    return base;
  } else {
    for (int64_t r = 0; r < m; ++r) convert_row(base + r * row_stride, buf + r * D, D);
    ld = D;
    return buf;
  }
}

// Turns a row of dot products q.k (keys j0 .. j0 + n - 1 of query row i) into scores up to a positive factor,
// which it returns: the row becomes scale * s + mask, factor 1, when there is a mask (or scale <= 0); else the
// scaling is left to exp_row, which folds it into one FMA. Keys outside the band [lo, hi] become -inf.
template <typename scalar_t, typename acc_t>
acc_t score_row(const Problem& pb, const Seq& sq, int64_t h, int64_t i, int64_t j0, int64_t n, bool band,
                acc_t* s, acc_t* tmp) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const acc_t scale = static_cast<acc_t>(pb.scale);
  acc_t factor = scale;
  if (pb.mask || !(scale > acc_t(0))) {
    const acc_t* madd = nullptr;
    if (pb.mask) {
      const scalar_t* mrow = static_cast<const scalar_t*>(pb.mask) + sq.batch * pb.ms[0] + h * pb.ms[1] +
                             (sq.q_off + i) * pb.ms[2] + (sq.k_off + j0) * pb.ms[3];
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (pb.ms[3] == 1) madd = mrow;
      }
      if (!madd) {
        const int64_t sj = pb.ms[3];
        for (int64_t jj = 0; jj < n; ++jj) tmp[jj] = static_cast<acc_t>(mrow[jj * sj]);
        madd = tmp;
      }
    }
    const V vscale(scale);
    int64_t jj = 0;
    if (madd) {
      for (; jj + W <= n; jj += W) at::vec::fmadd(V::loadu(s + jj), vscale, V::loadu(madd + jj)).store(s + jj);
      for (; jj < n; ++jj) s[jj] = s[jj] * scale + madd[jj];
    } else {
      for (; jj + W <= n; jj += W) (V::loadu(s + jj) * vscale).store(s + jj);
      for (; jj < n; ++jj) s[jj] *= scale;
    }
    factor = acc_t(1);
  }
  if (band) {
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const int64_t first = std::clamp(pb.lo(sq, i) - j0, int64_t(0), n);
    const int64_t last = std::clamp(pb.hi(sq, i) - j0 + 1, first, n);
    std::fill(s, s + first, ninf);
    std::fill(s + last, s + n, ninf);
  }
  return factor;
}

template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t n) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  V vmax(-std::numeric_limits<acc_t>::infinity());
  int64_t jj = 0;
  for (; jj + W <= n; jj += W) vmax = at::vec::maximum(vmax, V::loadu(s + jj));
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (; jj < n; ++jj) mx = std::max(mx, s[jj]);
  acc_t lanes[W];
  vmax.store(lanes);
  for (int64_t w = 0; w < W; ++w) mx = std::max(mx, lanes[w]);
  return mx;
}

// s[jj] = exp(s[jj] * mul - shift); returns the sum.
template <typename acc_t>
acc_t exp_row(acc_t* s, int64_t n, acc_t mul, acc_t shift) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const V vmul(mul), vshift(-shift);
  V vsum(acc_t(0));
  int64_t jj = 0;
  for (; jj + W <= n; jj += W) {
    const V e = vexp(at::vec::fmadd(V::loadu(s + jj), vmul, vshift));
    e.store(s + jj);
    vsum = vsum + e;
  }
  acc_t lanes[W];
  vsum.store(lanes);
  acc_t total = 0;
  for (int64_t w = 0; w < W; ++w) total += lanes[w];
  if (jj < n) {  // lanes past the row hold exp(-shift): store and sum only the row's
    vexp(at::vec::fmadd(V::loadu(s + jj, n - jj), vmul, vshift)).store(lanes);
    for (int64_t w = 0; w < n - jj; ++w) {
      s[jj + w] = lanes[w];
      total += lanes[w];
    }
  }
  return total;
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n, acc_t alpha) {
  using V = Vec<acc_t>;
  const V va(alpha);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= alpha;
}

template <typename acc_t>
inline void add_row(acc_t* x, const acc_t* y, int64_t n) {
  using V = Vec<acc_t>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) + V::loadu(y + j)).store(x + j);
  for (; j < n; ++j) x[j] += y[j];
}

template <typename acc_t>
inline void mul_rows(acc_t* x, const acc_t* y, int64_t n) {
  using V = Vec<acc_t>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * V::loadu(y + j)).store(x + j);
  for (; j < n; ++j) x[j] *= y[j];
}

// dst (scalar_t) = alpha * src, through tmp when scalar_t is not acc_t.
template <typename scalar_t, typename acc_t>
void store_scaled(const acc_t* src, acc_t alpha, scalar_t* dst, int64_t n, acc_t* tmp) {
  using V = Vec<acc_t>;
  acc_t* out = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(dst) : tmp;
  const V va(alpha);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(src + j) * va).store(out + j);
  for (; j < n; ++j) out[j] = src[j] * alpha;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) convert_row(tmp, dst, n);
}

// ---------------------------------------------------------------------------------------------------------------
// Forward. Writes out (unless stats_only) and lse[row_index] (acc_t, +inf for rows with no allowed key).

template <typename scalar_t, typename acc_t>
void forward_kernel(const Problem& pb, scalar_t* out, const int64_t* os, acc_t* lse, bool stats_only) {
  const int64_t D = pb.D, Dp = round_up_panel<acc_t>(D), P = kPanel<acc_t>, BM = kFwdBlockM, BN = kBlockN;
  const int64_t nseq = static_cast<int64_t>(pb.seqs.size());
  std::vector<int64_t> task_begin(nseq + 1, 0);
  int64_t max_lk = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t nqb = (pb.seqs[s].lq + BM - 1) / BM;
    task_begin[s + 1] = task_begin[s] + pb.Hq * nqb;
    max_lk = std::max(max_lk, pb.seqs[s].lk);
  }
  const int64_t max_kb = (max_lk + BN - 1) / BN;
  // The per-thread cache holds every key block of a head up to kFwdCacheBytes; past that (very long keys), one slot
  // is repacked for every (query block, key block) pair, which costs about 1 / kFwdBlockM of the tile products.
  const bool cache_all = max_kb * (D + Dp) * BN * int64_t(sizeof(acc_t)) <= kFwdCacheBytes;
  const int64_t slots = cache_all ? max_kb : 1;
  const bool dropout = pb.dropout_p > 0 && !stats_only;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, task_begin[nseq], grain_for(2 * BM * max_lk * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(BM * BN), O(BM * Dp), mrow(BM), lrow(BM), tmp(std::max(BN, D)), factor(BN);
    std::vector<acc_t> qbuf(is_reduced_float<scalar_t> ? BM * D : 0);
    // Per-head cache of packed panels, per key block: K^T (D x BN) and V (BN x Dp).
    std::vector<acc_t> kt(slots * D * BN), vp(slots * BN * Dp);
    std::vector<char> packed(max_kb, 0);
    int64_t cached_seq = -1, cached_head = -1;

    for (int64_t t = begin; t < end; ++t) {
      const int64_t si = std::upper_bound(task_begin.begin(), task_begin.end(), t) - task_begin.begin() - 1;
      const Seq& sq = pb.seqs[si];
      const int64_t nqb = (sq.lq + BM - 1) / BM;
      const int64_t r = t - task_begin[si];
      const int64_t h = r / nqb, qi = r % nqb;
      const int64_t qb = (qi % 2 == 0) ? qi / 2 : nqb - 1 - qi / 2;
      const int64_t hk = h / pb.group;
      if (si != cached_seq || hk != cached_head) {
        std::fill(packed.begin(), packed.end(), 0);
        cached_seq = si;
        cached_head = hk;
      }
      const int64_t i0 = qb * BM, m = std::min(BM, sq.lq - i0);
      const scalar_t* kbase = static_cast<const scalar_t*>(pb.k) + sq.batch * pb.ks[0] + hk * pb.ks[1] +
                              sq.k_off * pb.ks[2];
      const scalar_t* vbase = static_cast<const scalar_t*>(pb.v) + sq.batch * pb.vs[0] + hk * pb.vs[1] +
                              sq.k_off * pb.vs[2];
      int64_t ldq;
      const acc_t* qa = rows_as_acc<scalar_t, acc_t>(static_cast<const scalar_t*>(pb.q) + sq.batch * pb.qs[0] +
                                                         h * pb.qs[1] + (sq.q_off + i0) * pb.qs[2],
                                                     pb.qs[2], m, D, qbuf.data(), ldq);
      std::fill(O.begin(), O.begin() + m * Dp, acc_t(0));
      std::fill(mrow.begin(), mrow.begin() + m, ninf);
      std::fill(lrow.begin(), lrow.begin() + m, acc_t(0));

      const int64_t kstart = std::max<int64_t>(0, pb.lo(sq, i0));
      const int64_t kend = std::min<int64_t>(sq.lk, pb.hi(sq, i0 + m - 1) + 1);
      for (int64_t kb = kstart < kend ? kstart / BN : 0; kstart < kend && kb * BN < kend; ++kb) {
        const int64_t j0 = kb * BN, n = std::min(BN, sq.lk - j0);
        const int64_t slot = cache_all ? kb : 0;
        acc_t* ktp = kt.data() + slot * D * BN;
        acc_t* vpp = vp.data() + slot * BN * Dp;
        if (!packed[kb]) {
          pack_transposed(kbase + j0 * pb.ks[2], pb.ks[2], D, n, ktp, D * P);
          if (!stats_only) pack_rows(vbase + j0 * pb.vs[2], pb.vs[2], n, D, vpp, BN * P);
          packed[kb] = cache_all;
        }
        const bool band = pb.lo(sq, i0 + m - 1) > j0 || pb.hi(sq, i0) < j0 + n - 1;
        gemm<acc_t>(m, n, D, qa, ldq, 1, ktp, D * P, S.data(), BN, false);
        for (int64_t rr = 0; rr < m; ++rr) {
          acc_t* s = S.data() + rr * BN;
          const acc_t mul = score_row<scalar_t, acc_t>(pb, sq, h, i0 + rr, j0, n, band, s, tmp.data());
          const acc_t mnew = std::max(mrow[rr], row_max(s, n) * mul);
          if (mnew == ninf) {  // nothing allowed so far in this row: contributes nothing
            std::fill(s, s + n, acc_t(0));
            continue;
          }
          const acc_t alpha = mrow[rr] == ninf ? acc_t(0) : std::exp(mrow[rr] - mnew);
          const acc_t sum = exp_row(s, n, mul, mnew);
          lrow[rr] = lrow[rr] * alpha + sum;
          mrow[rr] = mnew;
          if (alpha != acc_t(1)) scale_row(O.data() + rr * Dp, D, alpha);
          if (dropout) {
            dropout_factors(pb, si, h, i0 + rr, j0, n, factor.data());
            mul_rows(s, factor.data(), n);
          }
        }
        if (!stats_only) gemm<acc_t>(m, D, n, S.data(), BN, 1, vpp, BN * P, O.data(), Dp, true);
      }
      for (int64_t rr = 0; rr < m; ++rr) {
        const bool any = lrow[rr] > acc_t(0);
        lse[pb.row_index(sq, h, i0 + rr)] =
            any ? mrow[rr] + std::log(lrow[rr]) : std::numeric_limits<acc_t>::infinity();
        if (!stats_only) {
          scalar_t* orow = out + sq.batch * os[0] + h * os[1] + (sq.q_off + i0 + rr) * os[2];
          store_scaled(O.data() + rr * Dp, any ? acc_t(1) / lrow[rr] : acc_t(0), orow, D, tmp.data());
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t, typename acc_t>
void backward_kernel(const Problem& pb, const scalar_t* dout, const int64_t* dos, const scalar_t* out,
                     const int64_t* outs, const acc_t* lse, scalar_t* dq, const int64_t* dqs, scalar_t* dk,
                     const int64_t* dks, scalar_t* dv, const int64_t* dvs) {
  const int64_t D = pb.D, Dp = round_up_panel<acc_t>(D), P = kPanel<acc_t>, BM = kBwdBlockM, BN = kBlockN;
  const int64_t Hq = pb.Hq, group = pb.group;
  const int64_t nseq = static_cast<int64_t>(pb.seqs.size());
  const int64_t B = nseq == 0 ? 0 : pb.seqs.back().batch + 1;
  const acc_t scale = static_cast<acc_t>(pb.scale);
  const bool dropout = pb.dropout_p > 0;

  // delta[row] = rowsum(dO * O)
  std::vector<acc_t> delta(B * Hq * pb.Lq, acc_t(0));
  {
    std::vector<std::pair<int64_t, int64_t>> heads;  // (sequence, head)
    for (int64_t s = 0; s < nseq; ++s)
      for (int64_t h = 0; h < Hq; ++h) heads.emplace_back(s, h);
    at::parallel_for(0, static_cast<int64_t>(heads.size()), grain_for(pb.Lq * D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> a(D), b(D);
      for (int64_t t = begin; t < end; ++t) {
        const Seq& sq = pb.seqs[heads[t].first];
        const int64_t h = heads[t].second;
        for (int64_t i = 0; i < sq.lq; ++i) {
          convert_row(dout + sq.batch * dos[0] + h * dos[1] + (sq.q_off + i) * dos[2], a.data(), D);
          convert_row(out + sq.batch * outs[0] + h * outs[1] + (sq.q_off + i) * outs[2], b.data(), D);
          acc_t acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
          delta[pb.row_index(sq, h, i)] = acc;
        }
      }
    });
  }

  // Tasks: (sequence, kv head, chunk of key blocks).
  int64_t max_kb = 0;
  for (const Seq& s : pb.seqs) max_kb = std::max(max_kb, (s.lk + BN - 1) / BN);
  const int64_t units = nseq * pb.Hkv;
  int64_t nchunks = units == 0 ? 1 : std::clamp((kBwdTargetTasks + units - 1) / units, int64_t(1), kBwdMaxChunks);
  nchunks = std::max<int64_t>(1, std::min(nchunks, max_kb));
  // dq is accumulated in place when it is acc_t and one task owns each head; otherwise in acc_t slices per chunk.
  const bool direct_dq = std::is_same_v<scalar_t, acc_t> && nchunks == 1;
  std::vector<acc_t> ws(direct_dq ? 0 : nchunks * B * Hq * pb.Lq * D);
  auto dq_row = [&](int64_t c, const Seq& sq, int64_t h, int64_t i) -> acc_t* {
    if (direct_dq) return reinterpret_cast<acc_t*>(dq + sq.batch * dqs[0] + h * dqs[1] + (sq.q_off + i) * dqs[2]);
    return ws.data() + (c * B * Hq * pb.Lq + pb.row_index(sq, h, i)) * D;
  };

  const int64_t bwd_work = 5 * pb.group * pb.Lq * std::max<int64_t>(1, max_kb * BN / nchunks) * D;
  at::parallel_for(0, units * nchunks, grain_for(bwd_work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(BM * BN), dP(BM * BN), PD(dropout ? BM * BN : 0), factor(BN), tmp(std::max(BN, D));
    // Packed panels: K^T, V^T (D x BN) and K (BN x Dp) per key block; Q and dO (BM x Dp) per query block.
    std::vector<acc_t> kt(D * BN), vt(D * BN), kp(BN * Dp), qp(BM * Dp), dop(BM * Dp);
    std::vector<acc_t> dK(BN * Dp), dV(BN * Dp), dQ(BM * Dp);
    const bool widen = is_reduced_float<scalar_t>;
    std::vector<acc_t> qbuf(widen ? BM * D : 0), dobuf(widen ? BM * D : 0);

    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % nchunks, unit = t / nchunks;
      const int64_t si = unit / pb.Hkv, hk = unit % pb.Hkv;
      const Seq& sq = pb.seqs[si];
      const int64_t nkb = (sq.lk + BN - 1) / BN;
      const int64_t kb_begin = nkb * c / nchunks, kb_end = nkb * (c + 1) / nchunks;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t i = 0; i < sq.lq; ++i) std::fill(dq_row(c, sq, h, i), dq_row(c, sq, h, i) + D, acc_t(0));
      const scalar_t* kbase = static_cast<const scalar_t*>(pb.k) + sq.batch * pb.ks[0] + hk * pb.ks[1] +
                              sq.k_off * pb.ks[2];
      const scalar_t* vbase = static_cast<const scalar_t*>(pb.v) + sq.batch * pb.vs[0] + hk * pb.vs[1] +
                              sq.k_off * pb.vs[2];

      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * BN, n = std::min(BN, sq.lk - j0);
        pack_transposed(kbase + j0 * pb.ks[2], pb.ks[2], D, n, kt.data(), D * P);
        pack_transposed(vbase + j0 * pb.vs[2], pb.vs[2], D, n, vt.data(), D * P);
        pack_rows(kbase + j0 * pb.ks[2], pb.ks[2], n, D, kp.data(), BN * P);
        std::fill(dK.begin(), dK.end(), acc_t(0));
        std::fill(dV.begin(), dV.end(), acc_t(0));
        // Query rows that see at least one key of this block.
        const int64_t istart = pb.wr < 0 ? 0 : std::max<int64_t>(0, j0 - pb.diag(sq) - pb.wr);
        const int64_t iend = pb.wl < 0 ? sq.lq : std::min<int64_t>(sq.lq, j0 + n - 1 - pb.diag(sq) + pb.wl + 1);

        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const scalar_t* qh = static_cast<const scalar_t*>(pb.q) + sq.batch * pb.qs[0] + h * pb.qs[1] +
                               sq.q_off * pb.qs[2];
          const scalar_t* doh = dout + sq.batch * dos[0] + h * dos[1] + sq.q_off * dos[2];
          for (int64_t i0 = istart; i0 < iend; i0 += BM) {
            const int64_t m = std::min(BM, iend - i0);
            int64_t ldq, lddo;
            const acc_t* qa = rows_as_acc<scalar_t, acc_t>(qh + i0 * pb.qs[2], pb.qs[2], m, D, qbuf.data(), ldq);
            const acc_t* doa = rows_as_acc<scalar_t, acc_t>(doh + i0 * dos[2], dos[2], m, D, dobuf.data(), lddo);
            pack_rows(qh + i0 * pb.qs[2], pb.qs[2], m, D, qp.data(), BM * P);
            pack_rows(doh + i0 * dos[2], dos[2], m, D, dop.data(), BM * P);
            const bool band = pb.lo(sq, i0 + m - 1) > j0 || pb.hi(sq, i0) < j0 + n - 1;
            gemm<acc_t>(m, n, D, qa, ldq, 1, kt.data(), D * P, S.data(), BN, false);
            gemm<acc_t>(m, n, D, doa, lddo, 1, vt.data(), D * P, dP.data(), BN, false);
            for (int64_t rr = 0; rr < m; ++rr) {
              const int64_t i = i0 + rr;
              acc_t* s = S.data() + rr * BN;
              acc_t* dp = dP.data() + rr * BN;
              const int64_t row = pb.row_index(sq, h, i);
              const acc_t L = lse[row];
              if (L == std::numeric_limits<acc_t>::infinity()) {  // no allowed key: zero gradients
                std::fill(s, s + n, acc_t(0));
                std::fill(dp, dp + n, acc_t(0));
                if (dropout) std::fill(PD.data() + rr * BN, PD.data() + rr * BN + n, acc_t(0));
                continue;
              }
              const acc_t mul = score_row<scalar_t, acc_t>(pb, sq, h, i, j0, n, band, s, tmp.data());
              exp_row(s, n, mul, L);  // P
              if (dropout) {
                dropout_factors(pb, si, h, i, j0, n, factor.data());
                acc_t* pd = PD.data() + rr * BN;
                std::copy(s, s + n, pd);
                mul_rows(pd, factor.data(), n);
                mul_rows(dp, factor.data(), n);
              }
              // dS = P * (dP - delta)
              using V = Vec<acc_t>;
              const V vdelta(delta[row]);
              int64_t jj = 0;
              for (; jj + V::size() <= n; jj += V::size())
                (V::loadu(s + jj) * (V::loadu(dp + jj) - vdelta)).store(dp + jj);
              for (; jj < n; ++jj) dp[jj] = s[jj] * (dp[jj] - delta[row]);
            }
            const acc_t* pv = dropout ? PD.data() : S.data();
            gemm<acc_t>(n, D, m, pv, 1, BN, dop.data(), BM * P, dV.data(), Dp, true);       // dV += P^T dO
            gemm<acc_t>(n, D, m, dP.data(), 1, BN, qp.data(), BM * P, dK.data(), Dp, true);  // dK += dS^T Q
            gemm<acc_t>(m, D, n, dP.data(), BN, 1, kp.data(), BN * P, dQ.data(), Dp, false);  // dS K
            for (int64_t rr = 0; rr < m; ++rr) add_row(dq_row(c, sq, h, i0 + rr), dQ.data() + rr * Dp, D);
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          store_scaled(dK.data() + j * Dp, scale, dk + sq.batch * dks[0] + hk * dks[1] + (sq.k_off + j0 + j) * dks[2],
                       D, tmp.data());
          store_scaled(dV.data() + j * Dp, acc_t(1), dv + sq.batch * dvs[0] + hk * dvs[1] + (sq.k_off + j0 + j) * dvs[2],
                       D, tmp.data());
        }
      }
      if (direct_dq) {
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
          for (int64_t i = 0; i < sq.lq; ++i) scale_row(dq_row(0, sq, h, i), D, scale);
      }
    }
  });

  if (!direct_dq) {
    // dq = scale * sum over chunks, in chunk order.
    const int64_t rows = B * Hq * pb.Lq;
    const int64_t chunk_stride = rows * D;
    at::parallel_for(0, nseq * Hq, grain_for(nchunks * pb.Lq * D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(D), tmp(D);
      for (int64_t t = begin; t < end; ++t) {
        const Seq& sq = pb.seqs[t / Hq];
        const int64_t h = t % Hq;
        for (int64_t i = 0; i < sq.lq; ++i) {
          const acc_t* src = ws.data() + pb.row_index(sq, h, i) * D;
          std::copy(src, src + D, acc.begin());
          for (int64_t c = 1; c < nchunks; ++c)
            for (int64_t d = 0; d < D; ++d) acc[d] += src[c * chunk_stride + d];
          store_scaled(acc.data(), scale, dq + sq.batch * dqs[0] + h * dqs[1] + (sq.q_off + i) * dqs[2], D,
                       tmp.data());
        }
      }
    });
  }
}

void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_qkv_like(fn, name, t, like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), fn, ": ", name, " must have q's shape ", like.sizes(), ", got ", t.sizes());
}

const int64_t* strides3(const at::Tensor& t) { return t.strides().data(); }

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
void run_forward(const Problem& pb, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    forward_kernel<scalar_t, float>(pb, out.mutable_data_ptr<scalar_t>(), strides3(out),
                                    lse.mutable_data_ptr<float>(), false);
  } else {
    std::vector<double> lse64(lse.numel());
    forward_kernel<scalar_t, double>(pb, out.mutable_data_ptr<scalar_t>(), strides3(out), lse64.data(), false);
    std::copy(lse64.begin(), lse64.end(), lse.mutable_data_ptr<float>());
  }
}

template <typename scalar_t>
void run_backward(const Problem& pb, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                  at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = acc_type<scalar_t>;
  std::vector<double> lse64;
  const acc_t* lse_acc;
  if constexpr (std::is_same_v<acc_t, float>) {
    lse_acc = lse.const_data_ptr<float>();
  } else {
    lse64.resize(lse.numel());
    forward_kernel<scalar_t, double>(pb, nullptr, nullptr, lse64.data(), true);
    lse_acc = lse64.data();
  }
  backward_kernel<scalar_t, acc_t>(pb, dout.const_data_ptr<scalar_t>(), strides3(dout),
                                   out.const_data_ptr<scalar_t>(), strides3(out), lse_acc,
                                   dq.mutable_data_ptr<scalar_t>(), strides3(dq), dk.mutable_data_ptr<scalar_t>(),
                                   strides3(dk), dv.mutable_data_ptr<scalar_t>(), strides3(dv));
}

}  // namespace

std::vector<at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask,
                                              const std::optional<at::Tensor>& cu_seqlens_q,
                                              const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                              int64_t max_seqlen_k, double scale, int64_t window_left,
                                              int64_t window_right, bool bottom_right, double dropout_p,
                                              int64_t seed) {
  constexpr const char* fn = "attention_forward_cpu";
  const Problem pb = make_problem(fn, q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                  window_left, window_right, bottom_right, dropout_p, seed);
  at::Tensor out = empty_like_reusing_memory(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cpu",
                                  [&] { run_forward<scalar_t>(pb, out, lse); });
  return {out, lse};
}

std::vector<at::Tensor> attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                               const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& cu_seqlens_q,
                                               const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                               int64_t max_seqlen_k, double scale, int64_t window_left,
                                               int64_t window_right, bool bottom_right, double dropout_p,
                                               int64_t seed, bool deterministic) {
  constexpr const char* fn = "attention_backward_cpu";
  // deterministic needs no switch: this kernel's result never depends on scheduling (see the top of the file).
  (void)deterministic;
  const Problem pb = make_problem(fn, q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                  window_left, window_right, bottom_right, dropout_p, seed);
  check_like(fn, "dout", dout, q);
  check_like(fn, "out", out, q);
  check_common(fn, "lse", lse);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, fn, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2), fn,
              ": lse must have shape (B, Hq, Lq) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), fn, ": lse must be contiguous, got strides ", lse.strides());
  at::Tensor dq = empty_like_reusing_memory(q), dk = empty_like_reusing_memory(k), dv = empty_like_reusing_memory(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu",
                                  [&] { run_backward<scalar_t>(pb, dout, out, lse, dq, dk, dv); });
  return {dq, dk, dv};
}

}  // namespace mltoolkit
