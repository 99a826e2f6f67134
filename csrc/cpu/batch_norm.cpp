// CPU kernels of batch norm + residual + activation; the contract and the math are in csrc/batch_norm.h.
//
// Layouts, read in place (no copies): NCL ([N][C][L], contiguous) and NLC ([N*L][C], channels-last). With L == 1
// both are the same memory and the NLC path runs.
//
// Work is cut into blocks whose size depends only on the shape, never on the thread count, and every sum runs in a
// fixed order inside its block; the blocks' partial results are combined in block order. So the results are the
// same bits for any number of threads.
//   NCL: a block is (channel c, a run of images n); each (n, c) row of L values is contiguous.
//   NLC: a block is a run of rows of C channels. The statistics keep a chunk of channels' accumulators in registers
//   while the block's rows stream past; the backward's sums are arrays of C, updated a row at a time.
// Forward (training), two passes over x:
//   1. statistics of x - (the channel's first value): per block, the mean and then the sums of deviations and
//      squared deviations from it, both over data that is still in L1/L2 (the corrected two-pass variance, so no
//      cancellation when |mean| >> std); blocks are merged with Chan's formula (see batch_moments). Then mean,
//      invstd and the running-stat update per channel.
//   2. y = act((x - mean) * (invstd * weight) + bias + residual).
// Backward, two passes (one in eval mode, where dx needs no reduction):
//   1. z recomputed, dz = dy * act'(z); per-channel sum(dz) and sum(dz * (x - mean)); dresidual = dz stored.
//   2. dx = weight * invstd * (dz - sum(dz) / M - (x - mean) * invstd^2 * sum(dz * (x - mean)) / M), with dz read
//      back from dresidual when that holds it exactly (float32 / float64), else recomputed.
// Elementwise work runs on tiles of kTile values widened to the accumulation type in a stack buffer (fp16/bf16 are
// widened with vector loads); the activation is a template parameter, so its switch folds away and the simple ones
// (relu, relu6, hardswish) vectorize; silu, gelu and gelu_tanh and their derivatives run at::vec's exp / erf / tanh
// in a pass over the tile (vec_activation.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../batch_norm.h"
#include "../check_util.h"
#include "../conv_epilogue.h"
#include "reused_memory.h"
#include "vec_activation.h"

namespace mltoolkit {
namespace {

// Rows of a channels-last block summed apart before their sums join the block's (the backward's dweight / dbias).
constexpr int64_t kSumRows = 32;

// A block (and a parallel task) touches at least this many values (ATen's grain size): below it, waking another
// thread costs more than the work.
constexpr int64_t kMinElementsPerBlock = 32768;
// Values per elementwise tile (a stack buffer per operand).
constexpr int64_t kTile = 256;

// ---------------------------------------------------------------------------------------------------------------
// Input checks: every message names the function and the argument.

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Dense with channels innermost: strides (C * L, 1, ..., C) over (N, C, spatial...), ignoring dims of size 1.
bool dense_channels_last(const at::Tensor& t) {
  int64_t expected = 1;
  const auto step = [&](int64_t dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
    return true;
  };
  if (!step(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!step(d)) return false;
  }
  return step(0);
}

struct Geometry {
  int64_t N, C, L;
  bool nlc;  // rows of C channels; else rows of L values per (n, c)
  int64_t M() const { return N * L; }
};

void check_cpu(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

Geometry check_input(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), fn, ": x must be a tensor, got an undefined one");
  check_cpu(fn, "x", x);
  TORCH_CHECK(supported_dtype(x.scalar_type()), fn, ": x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, fn, ": x must be (N, C, *) with at least 2 dims, got shape ", shape_str(x.sizes()));
  Geometry g{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) g.L *= x.size(d);
  const bool ncl = x.is_contiguous();
  TORCH_CHECK(ncl || dense_channels_last(x), fn, ": x must be contiguous in NCHW order or dense channels-last, got "
              "strides ", shape_str(x.strides()), " for shape ", shape_str(x.sizes()));
  g.nlc = g.L == 1 || !ncl;
  return g;
}

// residual / dy / x in backward: like `like` in shape and dtype, and laid out as the kernel reads x.
void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& like,
                const char* like_name, const Geometry& g) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  check_cpu(fn, name, t);
  TORCH_CHECK(t.sizes() == like.sizes(), fn, ": ", name, " must have ", like_name, "'s shape ",
              shape_str(like.sizes()), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), fn, ": ", name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(g.nlc ? dense_channels_last(t) : t.is_contiguous(), fn, ": ", name, " must have ", like_name,
              "'s memory layout (", g.nlc ? "channels-last" : "contiguous NCHW", "), got strides ",
              shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
}

// weight, bias, running_mean, running_var: (C,), contiguous, x's dtype or float32.
void check_channel_param(const char* fn, const char* name, const at::Tensor& t, int64_t C, at::ScalarType x_dtype) {
  check_cpu(fn, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, fn, ": ", name, " must have shape (C,) = (", C, ",), got ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == x_dtype || t.scalar_type() == at::kFloat, fn, ": ", name, " must have x's dtype (",
              x_dtype, ") or float32, got ", t.scalar_type());
}

at::ScalarType stat_dtype_for(at::ScalarType x_dtype) { return x_dtype == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------------------------
// Conversions and vector sums.

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// n values of src as acc_t: src itself when it already is, else widened into buf (n <= kTile).
template <typename acc_t, typename scalar_t>
inline const acc_t* widen(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    // at::vec::convert has no vectorized fp16/bf16 -> float path; load_to_float is one.
    using FVec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + FVec::size() <= n; i += FVec::size()) {
      FVec wide;
      at::vec::load_to_float(src + i, wide);
      wide.store(buf + i);
    }
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Where a tile's results go before they are stored: dst itself when no rounding is needed, else buf.
template <typename acc_t, typename scalar_t>
inline acc_t* staging(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return dst;
  } else {
    return buf;
  }
}

// Stores a staged tile, rounded to nearest even (a no-op when it was computed in place).
template <typename acc_t, typename scalar_t>
inline void store_staged(const acc_t* staged, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) at::vec::convert(staged, dst, n);
}

template <typename acc_t>
inline acc_t reduce_lanes(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const Vec<acc_t>& a, const Vec<acc_t>& b) { return a + b; }, v);
}

// sum over i < n of term(i, count) (a Vec of count lanes; lanes past count are masked out). Two accumulators keep
// the adds from waiting on each other.
template <typename acc_t, typename Term>
inline acc_t vec_sum(int64_t n, const Term& term) {
  using V = Vec<acc_t>;
  constexpr int64_t w = V::size();
  V acc0(0), acc1(0);
  int64_t i = 0;
  for (; i + 2 * w <= n; i += 2 * w) {
    acc0 += term(i, w);
    acc1 += term(i + w, w);
  }
  for (; i + w <= n; i += w) acc0 += term(i, w);
  if (i < n) acc0 += V::set(V(0), term(i, n - i), n - i);
  return reduce_lanes<acc_t>(acc0 + acc1);
}

template <typename acc_t>
inline Vec<acc_t> load(const acc_t* p, int64_t count) {
  return count == Vec<acc_t>::size() ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, count);
}

// A (C,) parameter widened to acc_t once per call; empty when absent.
template <typename acc_t>
std::vector<acc_t> widened_param(const std::optional<at::Tensor>& p) {
  if (!present(p)) return {};
  std::vector<acc_t> out(p->numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p->scalar_type(), "batch_norm_param", [&] {
    const scalar_t* src = p->const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < p->numel(); ++i) out[i] = static_cast<acc_t>(src[i]);
  });
  return out;
}

template <typename acc_t>
void write_channels(const std::vector<acc_t>& values, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "batch_norm_write", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) dst[i] = static_cast<scalar_t>(values[i]);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks: the fixed cut of the reduction (see the top of the file).

struct Blocks {
  int64_t rows_per_block;  // NCL: images per block; NLC: rows of C per block
  int64_t count;           // blocks per channel (NCL) / in all (NLC)
  int64_t units;           // parallel units: C * count (NCL) or count (NLC)
  int64_t grain;           // units per parallel task

  // Values per channel in block j.
  int64_t values(const Geometry& g, int64_t j) const {
    const int64_t rows = g.nlc ? g.M() : g.N;
    return std::min(rows_per_block, rows - j * rows_per_block) * (g.nlc ? 1 : g.L);
  }
};

Blocks make_blocks(const Geometry& g) {
  Blocks b{};
  const int64_t row_len = g.nlc ? g.C : g.L;
  const int64_t rows = g.nlc ? g.M() : g.N;
  b.rows_per_block = std::max<int64_t>(1, std::min(rows, kMinElementsPerBlock / std::max<int64_t>(1, row_len)));
  b.count = rows == 0 ? 0 : at::divup(rows, b.rows_per_block);
  b.units = g.nlc ? b.count : g.C * b.count;
  const int64_t unit_values = b.rows_per_block * row_len;
  b.grain = std::max<int64_t>(1, kMinElementsPerBlock / std::max<int64_t>(1, unit_values));
  return b;
}

// Runs body(unit, c_or_-1, block) over the units in parallel; for NCL c is the unit's channel.
template <typename Body>
void for_each_unit(const Geometry& g, const Blocks& b, const Body& body) {
  at::parallel_for(0, b.units, b.grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (g.nlc) {
        body(int64_t(-1), u);
      } else {
        body(u / b.count, u % b.count);
      }
    }
  });
}

// Runs body(params_offset, data_offset, length) over every contiguous segment of the elementwise passes in
// parallel: NCL segments are (n, c) rows of L sharing channel c; NLC segments are rows of C channels.
template <typename Body>
void for_each_segment(const Geometry& g, const Body& body) {
  const int64_t rows = g.nlc ? g.M() : g.N * g.C;
  const int64_t len = g.nlc ? g.C : g.L;
  if (rows == 0 || len == 0) return;
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinElementsPerBlock / len), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(g.nlc ? int64_t(0) : r % g.C, r * len, len);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

// Chan et al.'s merge of (count_b, mean_b, m2_b) into (count, mean, m2), elementwise over n channels.
template <typename acc_t>
void merge_moments(int64_t& count, acc_t* mean, acc_t* m2, int64_t count_b, const acc_t* mean_b, const acc_t* m2_b,
                   int64_t n) {
  if (count_b == 0) return;
  const int64_t total = count + count_b;
  const acc_t w = acc_t(count_b) / acc_t(total);
  const acc_t cross = acc_t(count) * w;
  for (int64_t c = 0; c < n; ++c) {
    const acc_t delta = mean_b[c] - mean[c];
    mean[c] += delta * w;
    m2[c] += m2_b[c] + delta * delta * cross;
  }
  count = total;
}

// count (<= Vec::size()) values stored as scalar_t, as acc_t lanes (fp16/bf16 widened in registers); lanes past count
// are zero.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_widened(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return load(p, count);
  } else {
    if (count == Vec<acc_t>::size()) {
      Vec<acc_t> v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, count)));
  }
}

// (mean - shift, M2) per channel of the NLC rows [r_begin, r_end), by the corrected two-pass formula (see
// batch_moments). The channels go in chunks of kChunk vectors (one cache line of float32) whose accumulators stay in
// registers while the block's rows stream past; the block is in L2 for the second pass.
template <typename scalar_t, typename acc_t>
void nlc_block_moments(const scalar_t* x, int64_t C, int64_t r_begin, int64_t r_end, const acc_t* shift,
                       acc_t* mean, acc_t* m2) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  constexpr int64_t kChunk = 2;
  const V rows(acc_t(r_end - r_begin));
  for (int64_t c0 = 0; c0 < C; c0 += kChunk * W) {
    int64_t count[kChunk];
    V sh[kChunk], sum[kChunk], mv[kChunk], dev[kChunk], sq[kChunk];
    for (int64_t k = 0; k < kChunk; ++k) {
      count[k] = std::clamp<int64_t>(C - c0 - k * W, 0, W);
      sh[k] = count[k] ? load(shift + c0 + k * W, count[k]) : V(0);
      sum[k] = dev[k] = sq[k] = V(0);
    }
    const bool full = count[kChunk - 1] == W;
    // Deviations of the chunk's values in row r from center[k] (the shift, then shift + the first-pass mean).
    const auto rows_of = [&](const auto& each) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const scalar_t* row = x + r * C + c0;
        if (full) {
          for (int64_t k = 0; k < kChunk; ++k) each(k, load_widened<acc_t>(row + k * W, W) - sh[k]);
        } else {
          for (int64_t k = 0; k < kChunk; ++k) {
            if (count[k]) each(k, load_widened<acc_t>(row + k * W, count[k]) - sh[k]);
          }
        }
      }
    };
    rows_of([&](int64_t k, const V& v) { sum[k] += v; });
    for (int64_t k = 0; k < kChunk; ++k) mv[k] = sum[k] / rows;
    rows_of([&](int64_t k, const V& v) {
      const V d = v - mv[k];
      dev[k] += d;
      sq[k] += d * d;
    });
    for (int64_t k = 0; k < kChunk; ++k) {
      if (!count[k]) continue;
      (mv[k] + dev[k] / rows).store(mean + c0 + k * W, count[k]);
      at::vec::maximum(sq[k] - dev[k] * dev[k] / rows, V(0)).store(m2 + c0 + k * W, count[k]);
    }
  }
}

// Per-channel (mean, biased var) of x in training mode.
//
// Everything is computed on x - shift, shift = the channel's first value: the block means then hold only the spread
// of the data, not its offset (with |mean| >> std, block means near the offset would each be rounded by up to half
// an ulp of the offset, and Chan's merge would add those roundings squared to the variance). Within a block the
// corrected two-pass formula takes the first-pass mean's rounding out of both the mean and M2:
//   m1 = sum(v) / n, dev = sum(v - m1), mean = m1 + dev / n, M2 = sum((v - m1)^2) - dev^2 / n.
template <typename scalar_t, typename acc_t>
void batch_moments(const scalar_t* x, const Geometry& g, std::vector<acc_t>& mean, std::vector<acc_t>& var) {
  const Blocks b = make_blocks(g);
  std::vector<acc_t> shift(g.C);
  for (int64_t c = 0; c < g.C; ++c) shift[c] = static_cast<acc_t>(x[g.nlc ? c : c * g.L]);
  // Block j's moments of channel c (mean relative to the shift) at [j * C + c].
  std::vector<acc_t> part_mean(b.count * g.C), part_m2(b.count * g.C);
  for_each_unit(g, b, [&](int64_t c, int64_t j) {
    acc_t buf[kTile];
    if (!g.nlc) {
      // (n, c) rows of L, each reduced while in cache, then merged.
      const Vec<acc_t> shift_v(shift[c]);
      int64_t count = 0;
      acc_t m = 0, m2 = 0;
      const int64_t n_end = std::min(g.N, (j + 1) * b.rows_per_block);
      for (int64_t n = j * b.rows_per_block; n < n_end; ++n) {
        const scalar_t* row = x + (n * g.C + c) * g.L;
        acc_t sum = 0;
        for (int64_t t = 0; t < g.L; t += kTile) {
          const int64_t len = std::min(kTile, g.L - t);
          const acc_t* v = widen(row + t, len, buf);
          sum += vec_sum<acc_t>(len, [&](int64_t i, int64_t k) { return load(v + i, k) - shift_v; });
        }
        acc_t row_mean = sum / acc_t(g.L);
        const Vec<acc_t> mean_v(row_mean);
        acc_t dev = 0, dev2 = 0;
        for (int64_t t = 0; t < g.L; t += kTile) {
          const int64_t len = std::min(kTile, g.L - t);
          const acc_t* v = widen(row + t, len, buf);
          dev += vec_sum<acc_t>(len, [&](int64_t i, int64_t k) { return (load(v + i, k) - shift_v) - mean_v; });
          dev2 += vec_sum<acc_t>(len, [&](int64_t i, int64_t k) {
            const Vec<acc_t> d = (load(v + i, k) - shift_v) - mean_v;
            return d * d;
          });
        }
        row_mean += dev / acc_t(g.L);
        const acc_t row_m2 = std::max(acc_t(0), dev2 - dev * dev / acc_t(g.L));
        merge_moments(count, &m, &m2, g.L, &row_mean, &row_m2, 1);
      }
      part_mean[j * g.C + c] = m;
      part_m2[j * g.C + c] = m2;
      return;
    }
    const int64_t r_begin = j * b.rows_per_block, r_end = std::min(g.M(), r_begin + b.rows_per_block);
    nlc_block_moments(x, g.C, r_begin, r_end, shift.data(), part_mean.data() + j * g.C, part_m2.data() + j * g.C);
  });
  // Merge the blocks in block order, channels in parallel.
  mean.assign(g.C, acc_t(0));
  std::vector<acc_t> m2(g.C, acc_t(0));
  at::parallel_for(0, g.C, std::max<int64_t>(1, kMinElementsPerBlock / std::max<int64_t>(1, b.count)),
                   [&](int64_t c0, int64_t c1) {
                     int64_t count = 0;
                     for (int64_t j = 0; j < b.count; ++j) {
                       merge_moments(count, mean.data() + c0, m2.data() + c0, b.values(g, j),
                                     part_mean.data() + j * g.C + c0, part_m2.data() + j * g.C + c0, c1 - c0);
                     }
                   });
  var.resize(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    mean[c] += shift[c];
    var[c] = m2[c] / acc_t(g.M());
  }
}

// A per-channel parameter as the elementwise loops see it: one value per position of a NLC row (kPerValue), or one
// value for a whole NCL row, held in a local so that the compiler knows no store changes it.
template <bool kPerValue, typename acc_t>
struct ChannelValue {
  const acc_t* p;
  acc_t v;
  explicit ChannelValue(const acc_t* ptr) : p(ptr), v(kPerValue ? acc_t(0) : *ptr) {}
  acc_t operator[](int64_t i) const {
    if constexpr (kPerValue) {
      return p[i];
    } else {
      return v;
    }
  }
};

// y = act((x - mean) * scale + shift [+ residual]) over a segment of n values; mean, scale and shift point at the
// segment's first channel.
template <Act kAct, bool kPerValue, typename scalar_t, typename acc_t>
void normalize_segment(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t n, const acc_t* mean,
                       const acc_t* scale, const acc_t* shift) {
  // The select activations inline (the loops vectorize); exp / erf / tanh ones (silu, gelu, ...) in a vector pass
  // over the staged tile: a libm call per element would keep the loop scalar.
  constexpr bool kSelect = cpu::vector_act(kAct);
  constexpr Act kInline = kSelect ? kAct : Act::kNone;
  acc_t xbuf[kTile], rbuf[kTile], ybuf[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const int64_t pt = kPerValue ? t : 0;
    const ChannelValue<kPerValue, acc_t> m(mean + pt), s(scale + pt), h(shift + pt);
    const acc_t* __restrict__ xv = widen(x + t, len, xbuf);
    acc_t* __restrict__ out = staging<acc_t>(y + t, ybuf);
    if (residual) {
      const acc_t* __restrict__ rv = widen(residual + t, len, rbuf);
      for (int64_t i = 0; i < len; ++i) out[i] = apply_activation(kInline, (xv[i] - m[i]) * s[i] + h[i] + rv[i]);
    } else {
      for (int64_t i = 0; i < len; ++i) out[i] = apply_activation(kInline, (xv[i] - m[i]) * s[i] + h[i]);
    }
    if constexpr (!kSelect)
      cpu::map_vectors(out, len, [](Vec<acc_t> v) { return cpu::apply_vector_act<acc_t>(kAct, v); });
    store_staged(out, y + t, len);
  }
}

// Per-channel mean, scale = invstd * weight and shift = bias, the affine form both passes use.
template <typename acc_t>
struct ChannelAffine {
  std::vector<acc_t> mean, invstd, scale, shift;
};

template <typename acc_t>
ChannelAffine<acc_t> channel_affine(std::vector<acc_t> mean, std::vector<acc_t> invstd,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  ChannelAffine<acc_t> a{std::move(mean), std::move(invstd), {}, {}};
  const std::vector<acc_t> w = widened_param<acc_t>(weight);
  a.shift = widened_param<acc_t>(bias);
  const size_t C = a.invstd.size();
  if (a.shift.empty()) a.shift.assign(C, acc_t(0));
  a.scale.resize(C);
  for (size_t c = 0; c < C; ++c) a.scale[c] = w.empty() ? a.invstd[c] : a.invstd[c] * w[c];
  return a;
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                    Act act, const std::optional<at::Tensor>& residual, const Geometry& g, at::Tensor& y,
                    at::Tensor& mean_out, at::Tensor& invstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  std::vector<acc_t> mean, var;
  if (training && g.M() > 0) {
    batch_moments(x_data, g, mean, var);
    if (present(running_mean)) {
      std::vector<acc_t> rm = widened_param<acc_t>(running_mean), rv = widened_param<acc_t>(running_var);
      const acc_t mom = static_cast<acc_t>(momentum);
      const acc_t unbias = acc_t(g.M()) / acc_t(g.M() - 1);
      for (int64_t c = 0; c < g.C; ++c) {
        rm[c] = (acc_t(1) - mom) * rm[c] + mom * mean[c];
        rv[c] = (acc_t(1) - mom) * rv[c] + mom * var[c] * unbias;
      }
      at::Tensor rm_t = *running_mean, rv_t = *running_var;
      write_channels(rm, rm_t);
      write_channels(rv, rv_t);
    }
  } else if (training) {
    mean.assign(g.C, acc_t(0));
    var.assign(g.C, acc_t(0));
  } else {
    mean = widened_param<acc_t>(running_mean);
    var = widened_param<acc_t>(running_var);
  }
  std::vector<acc_t> invstd(g.C);
  for (int64_t c = 0; c < g.C; ++c) invstd[c] = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
  const ChannelAffine<acc_t> a = channel_affine(std::move(mean), std::move(invstd), weight, bias);
  std::copy(a.mean.begin(), a.mean.end(), mean_out.mutable_data_ptr<acc_t>());
  std::copy(a.invstd.begin(), a.invstd.end(), invstd_out.mutable_data_ptr<acc_t>());

  const scalar_t* r_data = present(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  cpu::with_act(act, [&](auto tag) {
    constexpr Act kAct = decltype(tag)::value;
    for_each_segment(g, [&](int64_t p, int64_t off, int64_t len) {
      const acc_t *m = a.mean.data() + p, *s = a.scale.data() + p, *h = a.shift.data() + p;
      const scalar_t* r = r_data ? r_data + off : nullptr;
      if (g.nlc) {
        normalize_segment<kAct, true>(x_data + off, r, y_data + off, len, m, s, h);
      } else {
        normalize_segment<kAct, false>(x_data + off, r, y_data + off, len, m, s, h);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// Over a tile of len values: xc = x - mean and dz = dy * act'(z), z = xc * scale + shift [+ residual].
// act'(z) and the product are separate loops: fused, the compiler turns dy * (z > 0 ? 1 : 0) into a branch around
// the multiply (it may not speculate a floating-point multiply) and the loop stays scalar.
template <Act kAct, bool kPerValue, typename acc_t>
inline void tile_dz(const acc_t* __restrict__ xv, const acc_t* __restrict__ dyv, const acc_t* __restrict__ rv,
                    int64_t len, const ChannelValue<kPerValue, acc_t> m, const ChannelValue<kPerValue, acc_t> s,
                    const ChannelValue<kPerValue, acc_t> h, acc_t* __restrict__ xc, acc_t* __restrict__ dz) {
  if constexpr (kAct == Act::kNone) {
    for (int64_t i = 0; i < len; ++i) xc[i] = xv[i] - m[i];
    std::copy(dyv, dyv + len, dz);
  } else {
    for (int64_t i = 0; i < len; ++i) {
      xc[i] = xv[i] - m[i];
      dz[i] = xc[i] * s[i] + h[i] + (rv ? rv[i] : acc_t(0));
    }
    if constexpr (kAct == Act::kSilu || kAct == Act::kGelu || kAct == Act::kGeluTanh) {
      cpu::map_vectors(dz, len, [](Vec<acc_t> v) { return cpu::smooth_activation_grad<acc_t>(kAct, v); });
    } else {
      for (int64_t i = 0; i < len; ++i) dz[i] = activation_grad(kAct, dz[i]);
    }
    for (int64_t i = 0; i < len; ++i) dz[i] *= dyv[i];
  }
}

template <typename scalar_t>
struct GradPointers {
  const scalar_t *x, *dy, *residual;
  scalar_t *dx, *dresidual;
};

// Pass 1 over a segment: dz, its per-channel sums (sum_dz, sum_dz_xc: arrays of the segment's length for NLC rows,
// one value for NCL rows; null when not needed), dresidual = dz, and in eval mode dx = dz * scale.
template <Act kAct, bool kPerValue, typename scalar_t, typename acc_t>
void grad_segment_pass1(const GradPointers<scalar_t>& ptr, int64_t off, int64_t n, const acc_t* m, const acc_t* s,
                        const acc_t* h, bool eval_dx, acc_t* sum_dz, acc_t* sum_dz_xc) {
  acc_t xbuf[kTile], dybuf[kTile], rbuf[kTile], xc[kTile], dz[kTile], out[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const acc_t* xv = widen(ptr.x + off + t, len, xbuf);
    const acc_t* dyv = widen(ptr.dy + off + t, len, dybuf);
    const acc_t* rv = ptr.residual ? widen(ptr.residual + off + t, len, rbuf) : nullptr;
    const int64_t pt = kPerValue ? t : 0;
    const ChannelValue<kPerValue, acc_t> mv(m + pt), sv(s + pt), hv(h + pt);
    tile_dz<kAct, kPerValue>(xv, dyv, rv, len, mv, sv, hv, xc, dz);
    if (sum_dz) {
      if constexpr (kPerValue) {
        for (int64_t i = 0; i < len; ++i) {
          sum_dz[t + i] += dz[i];
          sum_dz_xc[t + i] += dz[i] * xc[i];
        }
      } else {
        *sum_dz += vec_sum<acc_t>(len, [&](int64_t i, int64_t k) { return load(dz + i, k); });
        *sum_dz_xc += vec_sum<acc_t>(len, [&](int64_t i, int64_t k) { return load(dz + i, k) * load(xc + i, k); });
      }
    }
    if (ptr.dresidual) {
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        std::copy(dz, dz + len, ptr.dresidual + off + t);
      } else {
        at::vec::convert(dz, ptr.dresidual + off + t, len);
      }
    }
    if (eval_dx) {
      acc_t* __restrict__ o = staging<acc_t>(ptr.dx + off + t, out);
      for (int64_t i = 0; i < len; ++i) o[i] = dz[i] * sv[i];
      store_staged(o, ptr.dx + off + t, len);
    }
  }
}

// Pass 2 over a segment (training): dx = k * (dz - c1 - xc * c2), per-channel k = scale, c1, c2.
template <Act kAct, bool kPerValue, typename scalar_t, typename acc_t>
void grad_segment_pass2(const GradPointers<scalar_t>& ptr, int64_t off, int64_t n, const acc_t* m, const acc_t* s,
                        const acc_t* h, const acc_t* c1, const acc_t* c2, bool dz_stored) {
  acc_t xbuf[kTile], dybuf[kTile], rbuf[kTile], xc[kTile], dzbuf[kTile], out[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const int64_t pt = kPerValue ? t : 0;
    const ChannelValue<kPerValue, acc_t> mv(m + pt), sv(s + pt), hv(h + pt), c1v(c1 + pt), c2v(c2 + pt);
    const acc_t* xv = widen(ptr.x + off + t, len, xbuf);
    const acc_t* dz;
    if (dz_stored) {  // dresidual holds dz exactly (acc_t storage)
      dz = widen(ptr.dresidual + off + t, len, dzbuf);
      for (int64_t i = 0; i < len; ++i) xc[i] = xv[i] - mv[i];
    } else {
      const acc_t* dyv = widen(ptr.dy + off + t, len, dybuf);
      const acc_t* rv = ptr.residual ? widen(ptr.residual + off + t, len, rbuf) : nullptr;
      tile_dz<kAct, kPerValue>(xv, dyv, rv, len, mv, sv, hv, xc, dzbuf);
      dz = dzbuf;
    }
    acc_t* __restrict__ o = staging<acc_t>(ptr.dx + off + t, out);
    for (int64_t i = 0; i < len; ++i) o[i] = sv[i] * (dz[i] - c1v[i] - xc[i] * c2v[i]);
    store_staged(o, ptr.dx + off + t, len);
  }
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& mean_t, const at::Tensor& invstd_t,
                     const std::optional<at::Tensor>& residual, bool training, Act act, const Geometry& g,
                     at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dresidual) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* mean_p = mean_t.const_data_ptr<acc_t>();
  const acc_t* invstd_p = invstd_t.const_data_ptr<acc_t>();
  const ChannelAffine<acc_t> a = channel_affine(std::vector<acc_t>(mean_p, mean_p + g.C),
                                                std::vector<acc_t>(invstd_p, invstd_p + g.C), weight, bias);
  const GradPointers<scalar_t> ptr{x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                   present(residual) ? residual->const_data_ptr<scalar_t>() : nullptr,
                                   dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                   dresidual.defined() ? dresidual.mutable_data_ptr<scalar_t>() : nullptr};
  const bool need_sums = dweight.defined() || dbias.defined() || (training && dx.defined());
  const bool eval_dx = !training && dx.defined();
  const Blocks b = make_blocks(g);
  // Block j's sums of channel c at [j * C + c]; the blocks are added in block order below.
  std::vector<acc_t> part_dz(need_sums ? b.count * g.C : 0, acc_t(0));
  std::vector<acc_t> part_dz_xc(need_sums ? b.count * g.C : 0, acc_t(0));
  std::vector<acc_t> sum_dz(g.C, acc_t(0)), sum_dz_xc(g.C, acc_t(0));

  cpu::with_act(act, [&](auto tag) {
    constexpr Act kAct = decltype(tag)::value;
    if (need_sums || eval_dx || ptr.dresidual) {
      for_each_unit(g, b, [&](int64_t c, int64_t j) {
        acc_t* s1 = need_sums ? part_dz.data() + j * g.C : nullptr;
        acc_t* s2 = need_sums ? part_dz_xc.data() + j * g.C : nullptr;
        if (g.nlc) {
          // The sums of a run of kSumRows rows are added into the block's: a block holds thousands of rows when
          // the channels are few, and one float32 sum over them lost ~10x torch's accuracy in dweight.
          const int64_t r_begin = j * b.rows_per_block, r_end = std::min(g.M(), r_begin + b.rows_per_block);
          std::vector<acc_t> run(s1 ? 2 * g.C : 0);
          for (int64_t r0 = r_begin; r0 < r_end; r0 += kSumRows) {
            std::fill(run.begin(), run.end(), acc_t(0));
            for (int64_t r = r0; r < std::min(r_end, r0 + kSumRows); ++r) {
              grad_segment_pass1<kAct, true>(ptr, r * g.C, g.C, a.mean.data(), a.scale.data(), a.shift.data(),
                                             eval_dx, s1 ? run.data() : nullptr, s1 ? run.data() + g.C : nullptr);
            }
            for (int64_t c = 0; s1 && c < g.C; ++c) {
              s1[c] += run[c];
              s2[c] += run[g.C + c];
            }
          }
        } else {
          const int64_t n_end = std::min(g.N, (j + 1) * b.rows_per_block);
          for (int64_t n = j * b.rows_per_block; n < n_end; ++n) {
            grad_segment_pass1<kAct, false>(ptr, (n * g.C + c) * g.L, g.L, a.mean.data() + c, a.scale.data() + c,
                                            a.shift.data() + c, eval_dx, s1 ? s1 + c : nullptr,
                                            s2 ? s2 + c : nullptr);
          }
        }
      });
      if (need_sums) {
        at::parallel_for(0, g.C, std::max<int64_t>(1, kMinElementsPerBlock / std::max<int64_t>(1, b.count)),
                         [&](int64_t c0, int64_t c1) {
                           for (int64_t j = 0; j < b.count; ++j) {
                             for (int64_t c = c0; c < c1; ++c) {
                               sum_dz[c] += part_dz[j * g.C + c];
                               sum_dz_xc[c] += part_dz_xc[j * g.C + c];
                             }
                           }
                         });
      }
    }
    if (training && dx.defined() && g.M() > 0) {
      // c1 = mean(dz), c2 = invstd^2 * mean(dz * xc): dx = scale * (dz - c1 - xc * c2).
      std::vector<acc_t> c1(g.C), c2(g.C);
      for (int64_t c = 0; c < g.C; ++c) {
        c1[c] = sum_dz[c] / acc_t(g.M());
        c2[c] = a.invstd[c] * a.invstd[c] * sum_dz_xc[c] / acc_t(g.M());
      }
      const bool dz_stored = std::is_same_v<acc_t, scalar_t> && ptr.dresidual != nullptr;
      for_each_segment(g, [&](int64_t p, int64_t off, int64_t len) {
        if (g.nlc) {
          grad_segment_pass2<kAct, true>(ptr, off, len, a.mean.data(), a.scale.data(), a.shift.data(), c1.data(),
                                         c2.data(), dz_stored);
        } else {
          grad_segment_pass2<kAct, false>(ptr, off, len, a.mean.data() + p, a.scale.data() + p, a.shift.data() + p,
                                          c1.data() + p, c2.data() + p, dz_stored);
        }
      });
    }
  });
  if (dbias.defined()) write_channels(sum_dz, dbias);
  if (dweight.defined()) {
    std::vector<acc_t> dw(g.C);
    for (int64_t c = 0; c < g.C; ++c) dw[c] = sum_dz_xc[c] * a.invstd[c];
    write_channels(dw, dweight);
  }
}

}  // namespace

std::vector<at::Tensor> batch_norm_act_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& running_mean,
                                                   const std::optional<at::Tensor>& running_var, bool training,
                                                   double momentum, double eps, const std::string& activation,
                                                   const std::optional<at::Tensor>& residual) {
  constexpr const char* fn = "batch_norm_act_forward_cpu";
  const Geometry g = check_input(fn, x);
  const Act act = parse_activation(fn, activation);
  const auto dtype = x.scalar_type();
  if (present(weight)) check_channel_param(fn, "weight", *weight, g.C, dtype);
  if (present(bias)) check_channel_param(fn, "bias", *bias, g.C, dtype);
  TORCH_CHECK(present(running_mean) == present(running_var), fn,
              ": running_mean and running_var must be given together (or both be None)");
  if (present(running_mean)) {
    check_channel_param(fn, "running_mean", *running_mean, g.C, dtype);
    check_channel_param(fn, "running_var", *running_var, g.C, dtype);
  }
  TORCH_CHECK(training || present(running_mean), fn,
              ": running_mean and running_var must be given in evaluation mode (training=false)");
  TORCH_CHECK(!training || g.M() != 1, fn, ": expected more than 1 value per channel when training, got x of shape ",
              shape_str(x.sizes()));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, fn, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(momentum), fn, ": momentum must be finite, got ", momentum);
  if (present(residual)) check_like(fn, "residual", *residual, x, "x", g);

  at::Tensor y = empty_like_reusing_memory(x);
  const auto stat_options = x.options().dtype(stat_dtype_for(dtype));
  at::Tensor mean = at::empty({g.C}, stat_options);
  at::Tensor invstd = at::empty({g.C}, stat_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, fn, [&] {
    forward_kernel<scalar_t>(x, weight, bias, running_mean, running_var, training, momentum, eps, act, residual, g, y,
                             mean, invstd);
  });
  return {y, mean, invstd};
}

std::vector<at::Tensor> batch_norm_act_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                    const at::Tensor& invstd,
                                                    const std::optional<at::Tensor>& residual, bool training,
                                                    const std::string& activation, std::vector<bool> output_mask) {
  constexpr const char* fn = "batch_norm_act_backward_cpu";
  const Geometry g = check_input(fn, x);
  check_like(fn, "dy", dy, x, "x", g);
  const Act act = parse_activation(fn, activation);
  TORCH_CHECK(output_mask.size() == 4, fn, ": output_mask must have 4 entries (x, weight, bias, residual), got ",
              output_mask.size());
  const auto dtype = x.scalar_type();
  if (present(weight)) check_channel_param(fn, "weight", *weight, g.C, dtype);
  if (present(bias)) check_channel_param(fn, "bias", *bias, g.C, dtype);
  const at::ScalarType stat = stat_dtype_for(dtype);
  const auto check_stat = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
    check_cpu(fn, name, t);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == g.C && t.is_contiguous(), fn, ": ", name,
                " must be contiguous with shape (C,) = (", g.C, ",), got ", shape_str(t.sizes()));
    TORCH_CHECK(t.scalar_type() == stat, fn, ": ", name, " must be ", stat,
                " (float32, or float64 when x is float64), got ", t.scalar_type());
  };
  check_stat("mean", mean);
  check_stat("invstd", invstd);
  if (present(residual)) check_like(fn, "residual", *residual, x, "x", g);

  at::Tensor dx = output_mask[0] ? empty_like_reusing_memory(x) : at::Tensor();
  const auto param_options = [&](const std::optional<at::Tensor>& p) {
    return present(p) ? p->options() : x.options();
  };
  at::Tensor dweight = output_mask[1] ? at::empty({g.C}, param_options(weight)) : at::Tensor();
  at::Tensor dbias = output_mask[2] ? at::empty({g.C}, param_options(bias)) : at::Tensor();
  at::Tensor dresidual = output_mask[3] ? empty_like_reusing_memory(x) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, fn, [&] {
    backward_kernel<scalar_t>(dy, x, weight, bias, mean, invstd, residual, training, act, g, dx, dweight, dbias,
                              dresidual);
  });
  return {dx, dweight, dbias, dresidual};
}

}  // namespace mltoolkit
