// CPU kernels of LayerNorm and RMSNorm with an optional fused residual add; the contract and the math are in norm.h.
//
// Dtypes. x (and residual, dy, dresidual_out): float32, float64, float16 or bfloat16. weight and bias: x's dtype or
// float32. Arithmetic is in float32, or in float64 when x is float64. mean and rstd are float32, EXCEPT for float64 x,
// where they are float64 so that gradcheck in fp64 is exact; norm_backward_cpu expects the same dtype back.
// dweight is returned in weight's dtype; dbias in weight's dtype too, or in x's dtype without weight (backward never
// sees bias, so a caller whose bias dtype differs from that casts dbias).
// RMS norm with a bias is accepted: y = s*rstd*weight + bias, and dbias = sum_rows(dy) as for layer norm.
//
// Work layout. Rows are independent, so at::parallel_for splits them across threads. Each row is processed with
// at::vec::Vectorized<acc_t> (fp16/bf16 widened in registers as they are loaded) in passes over data that is still in
// L1/L2, so DRAM sees each input read once and each output written once:
//   forward:  [s = x + residual, rounded to x's dtype, stored as residual_out] -> mean -> mean of squared deviations
//             from that mean (two-pass: exact when |mean| >> std, unlike sum(s^2) - N*mean^2) -> y
//   backward: one pass for sum(g) and sum(g*xhat) that also adds this row to its chunk's dweight/dbias rows,
//             then one pass writing dx
// dweight/dbias: rows are cut into one chunk per thread, each chunk owns one accumulator row of N, and the chunks are
// summed in chunk order at the end: no atomics, and the result is deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "check_util.h"
#include "norm.h"
#include "reused_memory.h"
#include "vec_chunk.h"

namespace mltoolkit {
namespace {

// Rows per parallel task are chosen so that a task touches at least this many elements (ATen's own grain size):
// below it, waking the other threads costs more than the work.
constexpr int64_t kMinElementsPerTask = 32768;

// ---------------------------------------------------------------------------------------------------------------
// Input checks: every message names the function and the argument.

void check_cpu_dense(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ", shape_str(t.strides()),
              " for shape ", shape_str(t.sizes()));
}

void check_shape(const char* fn, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                 const char* expected_name) {
  TORCH_CHECK(t.sizes() == expected, fn, ": ", name, " must have shape ", expected_name, " = ", shape_str(expected),
              ", got ", shape_str(t.sizes()));
}

void check_dtype(const char* fn, const char* name, const at::Tensor& t, at::ScalarType expected,
                 const char* expected_name) {
  TORCH_CHECK(t.scalar_type() == expected, fn, ": ", name, " must have ", expected_name, " dtype ", expected,
              ", got ", t.scalar_type());
}

// x-like: 2-D (M, N) with a supported dtype and N >= 1. Returns (M, N).
std::pair<int64_t, int64_t> check_rows(const char* fn, const char* name, const at::Tensor& t) {
  check_cpu_dense(fn, name, t);
  TORCH_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D (rows M, width N), got shape ", shape_str(t.sizes()));
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, fn, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.size(1) >= 1, fn, ": ", name, " must have a width N >= 1, got shape ", shape_str(t.sizes()));
  return {t.size(0), t.size(1)};
}

void check_like_rows(const char* fn, const char* name, const at::Tensor& t, const char* like_name,
                     const at::Tensor& like) {
  check_cpu_dense(fn, name, t);
  const std::string expected = std::string("(M, N) like ") + like_name;
  check_shape(fn, name, t, like.sizes(), expected.c_str());
  check_dtype(fn, name, t, like.scalar_type(), (std::string(like_name) + "'s").c_str());
}

// weight or bias: (N,), x's dtype or float32.
void check_param(const char* fn, const char* name, const at::Tensor& t, int64_t width, at::ScalarType x_dtype) {
  check_cpu_dense(fn, name, t);
  check_shape(fn, name, t, {width}, "(N,)");
  TORCH_CHECK(t.scalar_type() == x_dtype || t.scalar_type() == at::kFloat, fn, ": ", name,
              " must have x's dtype (", x_dtype, ") or float32, got ", t.scalar_type());
}

// mean or rstd: (M,), float32 (float64 when x is float64).
void check_stat(const char* fn, const char* name, const at::Tensor& t, int64_t rows, at::ScalarType stat_dtype) {
  check_cpu_dense(fn, name, t);
  check_shape(fn, name, t, {rows}, "(M,)");
  TORCH_CHECK(t.scalar_type() == stat_dtype, fn, ": ", name, " must be ", stat_dtype,
              " (float32, or float64 when x is float64), got ", t.scalar_type());
}

at::ScalarType stat_dtype_for(at::ScalarType x_dtype) { return x_dtype == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------------------------
// Row conversion between storage dtypes and the accumulation type.

template <typename T>
constexpr bool is_reduced_float = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

template <typename src_t, typename dst_t>
void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::copy(src, src + n, dst);
  } else if constexpr (is_reduced_float<src_t> && std::is_same_v<dst_t, float>) {
    // at::vec::convert has no vectorized fp16/bf16 -> float path; load_to_float is one.
    using FVec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + FVec::size() <= n; i += FVec::size()) {
      FVec wide;
      at::vec::load_to_float(src + i, wide);
      wide.store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    at::vec::convert(src, dst, n);  // vectorized for float -> fp16/bf16; a plain (auto-vectorized) loop otherwise
  }
}

// weight or bias as acc_t for the whole call: the tensor's own data when it is acc_t, else a widened copy.
// data() is nullptr when the parameter is absent.
template <typename acc_t>
class ParamAsAcc {
 public:
  explicit ParamAsAcc(const std::optional<at::Tensor>& param) {
    if (!present(param)) return;
    const at::Tensor& p = *param;
    if (p.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
      data_ = p.const_data_ptr<acc_t>();
      return;
    }
    copy_.resize(p.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "norm_param_to_acc", [&] {
      convert_row(p.const_data_ptr<scalar_t>(), copy_.data(), p.numel());
    });
    data_ = copy_.data();
  }
  const acc_t* data() const { return data_; }

 private:
  std::vector<acc_t> copy_;
  const acc_t* data_ = nullptr;
};

// ---------------------------------------------------------------------------------------------------------------
// Vector helpers. Every row loop visits full vectors, then one partial vector for the tail, whose lanes past the
// end of the row load as zero and are never stored.

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// count (<= Vec::size()) elements of a row stored as scalar_t, as acc_t lanes; lanes past count are zero.
// fp16/bf16 are widened in registers, so no pass over the row is spent on conversion.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load(const scalar_t* p, int64_t count) {
  using V = Vec<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return count == V::size() ? V::loadu(p) : V::loadu(p, count);
  } else {
    if (count == V::size()) {
      V wide;
      at::vec::load_to_float(p, wide);
      return wide;
    }
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, count)));
  }
}

// Stores the first count lanes, rounded to nearest even when scalar_t is fp16/bf16.
template <typename acc_t, typename scalar_t>
inline void store(const Vec<acc_t>& v, scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
  }
}

// Calls body(i, count) on [i, i + count) for every vector of a row of n.
template <typename acc_t, typename Body>
inline void for_each_vec(int64_t n, const Body& body) {
  constexpr int64_t width = Vec<acc_t>::size();
  int64_t i = 0;
  for (; i + width <= n; i += width) body(i, width);
  if (i < n) body(i, n - i);
}

// dst[i .. i + count) = value(i, count) over a row of n, rounded to scalar_t. fp16 / bf16: two float vectors are
// rounded into one full 16-bit vector per store (one conversion per pair, where storing each alone converts a wasted
// second half too: bf16 RMSNorm forward 1.9 -> 1.4 ms for 4096 x 4096 on the dev VM).
template <typename acc_t, typename scalar_t, typename Value>
inline void store_row(scalar_t* dst, int64_t n, const Value& value) {
  constexpr int64_t width = Vec<acc_t>::size();
  int64_t i = 0;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (; i + 2 * width <= n; i += 2 * width) {
      cpu::store_chunk<acc_t>(cpu::Chunk<acc_t>{value(i, width), value(i + width, width)}, dst + i);
    }
  }
  for (; i + width <= n; i += width) store(value(i, width), dst + i, width);
  if (i < n) store(value(i, n - i), dst + i, n - i);
}

template <typename acc_t>
inline acc_t reduce_lanes(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const Vec<acc_t>& a, const Vec<acc_t>& b) { return a + b; }, v);
}

// sum over the row of term(i, count); tail lanes are masked out, so term need not be zero there. Four independent
// accumulators keep the adds from waiting on each other (the row is in cache: latency, not memory, is the limit).
template <typename acc_t, typename Term>
inline acc_t row_sum(int64_t n, const Term& term) {
  using V = Vec<acc_t>;
  constexpr int64_t width = V::size();
  V acc0(0), acc1(0), acc2(0), acc3(0);
  int64_t i = 0;
  for (; i + 4 * width <= n; i += 4 * width) {
    acc0 += term(i, width);
    acc1 += term(i + width, width);
    acc2 += term(i + 2 * width, width);
    acc3 += term(i + 3 * width, width);
  }
  for (; i + width <= n; i += width) acc0 += term(i, width);
  if (i < n) acc0 += V::set(V(0), term(i, n - i), n - i);
  return reduce_lanes<acc_t>((acc0 + acc1) + (acc2 + acc3));
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

template <typename acc_t>
struct RowStats {
  acc_t mean;  // 0 for rms norm
  acc_t rstd;
};

template <typename acc_t, typename scalar_t>
RowStats<acc_t> row_stats(const scalar_t* s, int64_t n, acc_t eps, bool is_rms) {
  using V = Vec<acc_t>;
  if (is_rms) {
    const acc_t sum_sq = row_sum<acc_t>(n, [&](int64_t i, int64_t c) {
      const V v = load<acc_t>(s + i, c);
      return v * v;
    });
    return {acc_t(0), acc_t(1) / std::sqrt(sum_sq / n + eps)};
  }
  const acc_t mean = row_sum<acc_t>(n, [&](int64_t i, int64_t c) { return load<acc_t>(s + i, c); }) / n;
  const V mean_v(mean);
  const acc_t sum_sq_dev = row_sum<acc_t>(n, [&](int64_t i, int64_t c) {
    const V d = load<acc_t>(s + i, c) - mean_v;
    return d * d;
  });
  return {mean, acc_t(1) / std::sqrt(sum_sq_dev / n + eps)};
}

// y = (s - mean) * rstd [* weight] [+ bias]
template <typename acc_t, typename scalar_t>
void normalize_row(const scalar_t* s, scalar_t* y, int64_t n, RowStats<acc_t> stats, const acc_t* weight,
                   const acc_t* bias) {
  using V = Vec<acc_t>;
  const V mean_v(stats.mean), rstd_v(stats.rstd);
  const auto xhat = [&](int64_t i, int64_t c) { return (load<acc_t>(s + i, c) - mean_v) * rstd_v; };
  // Four calls rather than a branch on weight/bias per vector.
  if (weight && bias) {
    store_row<acc_t>(y, n, [&](int64_t i, int64_t c) {
      return xhat(i, c) * load<acc_t>(weight + i, c) + load<acc_t>(bias + i, c);
    });
  } else if (weight) {
    store_row<acc_t>(y, n, [&](int64_t i, int64_t c) { return xhat(i, c) * load<acc_t>(weight + i, c); });
  } else if (bias) {
    store_row<acc_t>(y, n, [&](int64_t i, int64_t c) { return xhat(i, c) + load<acc_t>(bias + i, c); });
  } else {
    store_row<acc_t>(y, n, xhat);
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                    bool is_rms, at::Tensor& y, at::Tensor& residual_out, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), width = x.size(1);
  const ParamAsAcc<acc_t> weight_acc(weight), bias_acc(bias);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* residual_data = present(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* residual_out_data = residual_out.defined() ? residual_out.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  acc_t* mean_data = is_rms ? nullptr : mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_data = rstd.mutable_data_ptr<acc_t>();
  const acc_t eps_acc = static_cast<acc_t>(eps);

  at::parallel_for(0, rows, std::max<int64_t>(1, kMinElementsPerTask / width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * width;
      const scalar_t* s = x_data + offset;
      if (residual_data) {
        // The sum is rounded to x's dtype by the store, and the statistics read it back from residual_out, so y is
        // the norm of exactly the residual stream that the next layer receives.
        const scalar_t* residual_row = residual_data + offset;
        scalar_t* sum = residual_out_data + offset;
        store_row<acc_t>(sum, width, [&](int64_t i, int64_t c) {
          return load<acc_t>(s + i, c) + load<acc_t>(residual_row + i, c);
        });
        s = sum;
      }
      const RowStats<acc_t> stats = row_stats(s, width, eps_acc, is_rms);
      if (mean_data) mean_data[r] = stats.mean;
      rstd_data[r] = stats.rstd;
      normalize_row(s, y_data + offset, width, stats, weight_acc.data(), bias_acc.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// Adds row r's terms to the chunk's dweight/dbias rows and writes dx for it.
//   xhat = (s - mean) * rstd, g = dy * weight; dx = rstd * (g - mean(g)) - rstd * mean(g * xhat) * xhat [+ dres]
// Both differences are taken before scaling, as written: folding xhat into a*s + b would cancel when |mean| >> std.
template <typename acc_t, typename scalar_t>
void backward_row(const scalar_t* s, const scalar_t* dy, const scalar_t* dresidual, scalar_t* dx, int64_t n,
                  RowStats<acc_t> stats, bool is_rms, const acc_t* weight, acc_t* dweight_acc, acc_t* dbias_acc) {
  using V = Vec<acc_t>;
  const V mean_v(stats.mean), rstd_v(stats.rstd);
  const auto xhat = [&](int64_t i, int64_t c) { return (load<acc_t>(s + i, c) - mean_v) * rstd_v; };
  const auto g = [&](const V& dy_v, int64_t i, int64_t c) { return weight ? dy_v * load<acc_t>(weight + i, c) : dy_v; };
  V sum_g(0), sum_g_xhat(0);
  // Tail lanes load dy = 0, so g = 0 there and they add nothing to either sum.
  for_each_vec<acc_t>(n, [&](int64_t i, int64_t c) {
    const V dy_v = load<acc_t>(dy + i, c);
    const V xhat_v = xhat(i, c);
    const V g_v = g(dy_v, i, c);
    sum_g += g_v;
    sum_g_xhat += g_v * xhat_v;
    if (dweight_acc) store(load<acc_t>(dweight_acc + i, c) + dy_v * xhat_v, dweight_acc + i, c);
    if (dbias_acc) store(load<acc_t>(dbias_acc + i, c) + dy_v, dbias_acc + i, c);
  });
  const V mean_g(is_rms ? acc_t(0) : reduce_lanes<acc_t>(sum_g) / n);
  const V xhat_coef(stats.rstd * reduce_lanes<acc_t>(sum_g_xhat) / n);
  for_each_vec<acc_t>(n, [&](int64_t i, int64_t c) {
    V dx_v = rstd_v * (g(load<acc_t>(dy + i, c), i, c) - mean_g) - xhat_coef * xhat(i, c);
    if (dresidual) dx_v += load<acc_t>(dresidual + i, c);
    store(dx_v, dx + i, c);
  });
}

template <typename acc_t>
void write_row(const std::vector<acc_t>& row, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "norm_write_row", [&] {
    convert_row(row.data(), out.mutable_data_ptr<scalar_t>(), out.numel());
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                     const std::optional<at::Tensor>& dresidual_out, bool is_rms, at::Tensor& dx,
                     at::Tensor& dweight, at::Tensor& dbias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), width = x.size(1);
  const ParamAsAcc<acc_t> weight_acc(weight);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const scalar_t* dresidual_data = present(dresidual_out) ? dresidual_out->const_data_ptr<scalar_t>() : nullptr;
  const acc_t* mean_data = is_rms ? nullptr : mean->const_data_ptr<acc_t>();
  const acc_t* rstd_data = rstd.const_data_ptr<acc_t>();
  scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();

  // One chunk of rows per thread, fixed before the threads start, so that the chunk sums do not depend on scheduling.
  const int64_t min_rows = std::max<int64_t>(1, kMinElementsPerTask / width);
  const int64_t rows_per_chunk = std::max(min_rows, at::divup(rows, int64_t(at::get_num_threads())));
  const int64_t num_chunks = at::divup(rows, rows_per_chunk);
  std::vector<acc_t> dweight_chunks(dweight.defined() ? num_chunks * width : 0, acc_t(0));
  std::vector<acc_t> dbias_chunks(dbias.defined() ? num_chunks * width : 0, acc_t(0));

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dweight_acc = dweight.defined() ? dweight_chunks.data() + chunk * width : nullptr;
      acc_t* dbias_acc = dbias.defined() ? dbias_chunks.data() + chunk * width : nullptr;
      const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t r = chunk * rows_per_chunk; r < row_end; ++r) {
        const int64_t offset = r * width;
        const RowStats<acc_t> stats{mean_data ? mean_data[r] : acc_t(0), rstd_data[r]};
        backward_row(x_data + offset, dy_data + offset, dresidual_data ? dresidual_data + offset : nullptr,
                     dx_data + offset, width, stats, is_rms, weight_acc.data(), dweight_acc, dbias_acc);
      }
    }
  });

  // Sum the chunks in chunk order; with no rows this leaves zeros.
  const auto sum_chunks = [&](const std::vector<acc_t>& chunks, at::Tensor& out) {
    std::vector<acc_t> total(width, acc_t(0));
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const acc_t* chunk_row = chunks.data() + chunk * width;
      for_each_vec<acc_t>(width, [&](int64_t i, int64_t c) {
        store(load<acc_t>(total.data() + i, c) + load<acc_t>(chunk_row + i, c), total.data() + i, c);
      });
    }
    write_row(total, out);
  };
  if (dweight.defined()) sum_chunks(dweight_chunks, dweight);
  if (dbias.defined()) sum_chunks(dbias_chunks, dbias);
}

}  // namespace

std::vector<at::Tensor> norm_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps, bool is_rms) {
  constexpr const char* fn = "norm_forward_cpu";
  const auto [rows, width] = check_rows(fn, "x", x);
  if (present(residual)) check_like_rows(fn, "residual", *residual, "x", x);
  if (present(weight)) check_param(fn, "weight", *weight, width, x.scalar_type());
  if (present(bias)) check_param(fn, "bias", *bias, width, x.scalar_type());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, fn, ": eps must be finite and >= 0, got ", eps);

  at::Tensor y = empty_reusing_memory({rows, width}, x.options());
  at::Tensor residual_out = present(residual) ? empty_reusing_memory({rows, width}, x.options()) : at::Tensor();
  const auto stat_options = x.options().dtype(stat_dtype_for(x.scalar_type()));
  at::Tensor mean = is_rms ? at::Tensor() : at::empty({rows}, stat_options);
  at::Tensor rstd = at::empty({rows}, stat_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    forward_kernel<scalar_t>(x, residual, weight, bias, eps, is_rms, y, residual_out, mean, rstd);
  });
  return {y, residual_out, mean, rstd};
}

std::vector<at::Tensor> norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                          const std::optional<at::Tensor>& dresidual_out, bool has_bias,
                                          bool is_rms) {
  constexpr const char* fn = "norm_backward_cpu";
  const auto [rows, width] = check_rows(fn, "dy", dy);
  check_like_rows(fn, "x", x, "dy", dy);
  if (present(weight)) check_param(fn, "weight", *weight, width, x.scalar_type());
  const at::ScalarType stat_dtype = stat_dtype_for(x.scalar_type());
  if (is_rms) {
    TORCH_CHECK(!present(mean), fn, ": mean must be absent for rms norm, which has none");
  } else {
    TORCH_CHECK(present(mean), fn, ": mean is required for layer norm (is_rms=false)");
    check_stat(fn, "mean", *mean, rows, stat_dtype);
  }
  check_stat(fn, "rstd", rstd, rows, stat_dtype);
  if (present(dresidual_out)) check_like_rows(fn, "dresidual_out", *dresidual_out, "dy", dy);

  at::Tensor dx = empty_reusing_memory({rows, width}, dy.options());
  at::Tensor dweight = present(weight) ? at::empty({width}, weight->options()) : at::Tensor();
  at::Tensor dbias = has_bias ? at::empty({width}, present(weight) ? weight->options() : dy.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    backward_kernel<scalar_t>(dy, x, weight, mean, rstd, dresidual_out, is_rms, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace mltoolkit
