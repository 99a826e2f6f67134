// CPU kernel of the softmax cross-entropy; the contract is csrc/cross_entropy.h.
//
// Work layout. at::parallel_for splits the rows. The forward reads a row twice (its max, and the sum for label
// smoothing; then the sum of exp(x - max)); the backward reads each logit once and writes each gradient once, as a
// copy does (exp(x - lse) is the softmax, with lse saved by the forward). A row of a 50k-class vocabulary
// (200 KB in float32) stays in L2 between the forward's two passes. fp16/bf16 are widened to float32 in registers;
// exp is ATen's exp_u20 (<= 20 ulp, the exp torch's own CPU flash attention uses) for float, exact for double.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cross_entropy.h"
#include "cross_entropy_args.h"
#include "reused_memory.h"
#include "vec_chunk.h"

namespace mltoolkit {
namespace {

// A task covers at least this many logits: below it, waking threads costs more than the work.
constexpr int64_t kMinElementsPerTask = 32768;

// The vector loops step by a whole chunk (two acc_t vectors); the tails run scalar.
using cpu::Chunk;
using cpu::kChunk;
using cpu::load_chunk;
using cpu::store_chunk;
using cpu::Vec;
using cpu::vexp;

template <typename scalar_t>
void forward_kernel(const at::Tensor& logits, const int64_t* target, int64_t ignore_index, double smoothing,
                    at::Tensor& loss, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = logits.size(0), c = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  acc_t* loss_p = loss.data_ptr<acc_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t keep = acc_t(1) - acc_t(smoothing), spread = acc_t(smoothing) / acc_t(c);
  const bool smoothed = smoothing != 0.0;
  const int64_t full = c - c % kChunk<acc_t>;
  at::parallel_for(0, n, std::max<int64_t>(1, kMinElementsPerTask / c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = x + i * row_stride;
      const int64_t t = target[i];
      // Pass 1: max (and the sum, for label smoothing).
      Vec<acc_t> vmax(-std::numeric_limits<acc_t>::infinity()), vsum(acc_t(0));
      for (int64_t j = 0; j < full; j += kChunk<acc_t>) {
        const Chunk<acc_t> v = load_chunk<acc_t>(row + j);
        vmax = at::vec::maximum(vmax, at::vec::maximum(v.lo, v.hi));
        if (smoothed) vsum = vsum + v.lo + v.hi;
      }
      acc_t mx = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); },
                                                vmax);
      acc_t sum_x = smoothed ? at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), vsum) : acc_t(0);
      for (int64_t j = full; j < c; ++j) {
        const acc_t v = acc_t(row[j]);
        mx = std::max(mx, v);  // (a NaN logit: std::max keeps mx, the sum below turns NaN, as torch's result does)
        sum_x += v;
      }
      // Pass 2: sum of exp(x - max). An all -inf row keeps the shift finite (0) and gives lse = -inf, loss NaN.
      const acc_t shift = std::isinf(mx) && mx < 0 ? acc_t(0) : mx;
      const Vec<acc_t> vshift(shift);
      Vec<acc_t> vexp_sum(acc_t(0));
      for (int64_t j = 0; j < full; j += kChunk<acc_t>) {
        const Chunk<acc_t> v = load_chunk<acc_t>(row + j);
        vexp_sum = vexp_sum + vexp<acc_t>(v.lo - vshift) + vexp<acc_t>(v.hi - vshift);
      }
      acc_t exp_sum = at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), vexp_sum);
      for (int64_t j = full; j < c; ++j) exp_sum += std::exp(acc_t(row[j]) - shift);
      const acc_t row_lse = shift + std::log(exp_sum);
      lse_p[i] = row_lse;
      if (t == ignore_index) {
        loss_p[i] = acc_t(0);
      } else {
        loss_p[i] = row_lse - keep * acc_t(row[t]) - (smoothed ? spread * sum_x : acc_t(0));
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& dloss, const at::Tensor& logits, const int64_t* target, const at::Tensor& lse,
                     int64_t ignore_index, double smoothing, at::Tensor& dlogits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = logits.size(0), c = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const acc_t* g_p = dloss.const_data_ptr<acc_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  scalar_t* dx = dlogits.data_ptr<scalar_t>();
  const acc_t keep = acc_t(1) - acc_t(smoothing), spread = acc_t(smoothing) / acc_t(c);
  const int64_t full = c - c % kChunk<acc_t>;
  at::parallel_for(0, n, std::max<int64_t>(1, kMinElementsPerTask / c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = x + i * row_stride;
      scalar_t* out = dx + i * c;
      const int64_t t = target[i];
      if (t == ignore_index) {
        std::fill(out, out + c, scalar_t(0));
        continue;
      }
      const acc_t g = g_p[i], row_lse = lse_p[i];
      // dlogits = g * exp(x - lse) - g * spread, then the target's extra - g * keep (in acc_t, rounded once).
      const Vec<acc_t> vg(g), vlse(row_lse), voff(g * spread);
      for (int64_t j = 0; j < full; j += kChunk<acc_t>) {
        const Chunk<acc_t> v = load_chunk<acc_t>(row + j);
        store_chunk(Chunk<acc_t>{vg * vexp<acc_t>(v.lo - vlse) - voff, vg * vexp<acc_t>(v.hi - vlse) - voff}, out + j);
      }
      for (int64_t j = full; j < c; ++j) out[j] = scalar_t(g * std::exp(acc_t(row[j]) - row_lse) - g * spread);
      out[t] = scalar_t(g * std::exp(acc_t(row[t]) - row_lse) - g * spread - g * keep);
    }
  });
}

void check_targets(const char* fn, const at::Tensor& target, int64_t c, int64_t ignore_index) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < target.size(0); ++i) {
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < c), fn, ": target[", i, "] = ", t[i],
                " is out of bounds for ", c, " classes (and is not ignore_index = ", ignore_index, ")");
  }
}

}  // namespace

std::vector<at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                  int64_t ignore_index, double label_smoothing) {
  constexpr const char* fn = "cross_entropy_forward_cpu";
  cross_entropy_args::check_inputs(fn, logits, target, at::kCPU, label_smoothing);
  check_targets(fn, target, logits.size(1), ignore_index);
  const auto stat = cross_entropy_args::stat_dtype(logits);
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(stat));
  at::Tensor lse = at::empty({logits.size(0)}, logits.options().dtype(stat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cpu", [&] {
    forward_kernel<scalar_t>(logits, target.const_data_ptr<int64_t>(), ignore_index, label_smoothing, loss, lse);
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& lse, int64_t ignore_index, double label_smoothing) {
  constexpr const char* fn = "cross_entropy_backward_cpu";
  cross_entropy_args::check_inputs(fn, logits, target, at::kCPU, label_smoothing);
  cross_entropy_args::check_stats(fn, "dloss", dloss, logits);
  cross_entropy_args::check_stats(fn, "lse", lse, logits);
  check_targets(fn, target, logits.size(1), ignore_index);
  at::Tensor dlogits = empty_reusing_memory(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_backward_cpu", [&] {
    backward_kernel<scalar_t>(dloss, logits, target.const_data_ptr<int64_t>(), lse, ignore_index, label_smoothing,
                              dlogits);
  });
  return dlogits;
}

}  // namespace mltoolkit
