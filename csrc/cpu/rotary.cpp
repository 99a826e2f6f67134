// CPU kernel of the rotary embedding; the contract is the "Rotary embedding" part of csrc/attention.h.
//
// Dtypes. x and out: float32, float16, bfloat16 (math in float32) or float64 (math in float64, as the reference does,
// so that fp64 gradcheck is exact). cos and sin: x's dtype or float32 each; when they differ, the one in x's dtype is
// widened to float32 (lossless), and for float64 x both are widened to float64, so the kernel reads one table dtype.
//
// Work layout. at::parallel_for splits the B*L positions across threads; the H rows of a position share one cos/sin
// row, which stays in L1 while they are rotated. Each row is one pass of at::vec::Vectorized<acc_t> (fp16/bf16 widened
// in registers): half-split rows load the two halves side by side, interleaved rows load pairs and deinterleave them
// in registers. Every element of x is read once and every element of out written once, as in a copy.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "attention.h"

namespace mltoolkit {
namespace {

// A task covers at least this many elements (ATen's grain size): below it, waking threads costs more than the work.
constexpr int64_t kMinElementsPerTask = 32768;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// count (<= Vec::size()) elements stored as scalar_t, as acc_t lanes; lanes past count are zero.
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

// y1 = x1*c - x2*s, y2 = x1*s + x2*c on `half` pairs, x1 at x[r] and x2 at x[r + half]. y may be x: every vector is
// loaded before the two stores that overwrite it.
template <typename acc_t, typename scalar_t, typename table_t>
inline void rotate_half_split(const scalar_t* x, scalar_t* y, const table_t* cos, const table_t* sin, int64_t half,
                              const Vec<acc_t>& sign) {
  using V = Vec<acc_t>;
  constexpr int64_t width = V::size();
  for (int64_t r = 0; r < half; r += width) {
    const int64_t n = std::min(width, half - r);
    const V x1 = load<acc_t>(x + r, n), x2 = load<acc_t>(x + half + r, n);
    const V c = load<acc_t>(cos + r, n), s = load<acc_t>(sin + r, n) * sign;
    store(at::vec::fmsub(x1, c, x2 * s), y + r, n);
    store(at::vec::fmadd(x1, s, x2 * c), y + half + r, n);
  }
}

// The same on interleaved pairs (x[2r], x[2r+1]): two vectors of pairs are split into even and odd lanes, rotated,
// and interleaved back.
template <typename acc_t, typename scalar_t, typename table_t>
inline void rotate_interleaved(const scalar_t* x, scalar_t* y, const table_t* cos, const table_t* sin, int64_t half,
                               const Vec<acc_t>& sign) {
  using V = Vec<acc_t>;
  constexpr int64_t width = V::size();
  for (int64_t r = 0; r < half; r += width) {
    const int64_t n = std::min(width, half - r);  // pairs in this step: 2n elements from x + 2r
    const int64_t lo = std::min(2 * n, width), hi = 2 * n - lo;
    const V a = load<acc_t>(x + 2 * r, lo);
    const V b = hi > 0 ? load<acc_t>(x + 2 * r + width, hi) : V(acc_t(0));
    const auto [x1, x2] = at::vec::deinterleave2(a, b);
    const V c = load<acc_t>(cos + r, n), s = load<acc_t>(sin + r, n) * sign;
    const auto [ya, yb] = at::vec::interleave2(at::vec::fmsub(x1, c, x2 * s), at::vec::fmadd(x1, s, x2 * c));
    store(ya, y + 2 * r, lo);
    if (hi > 0) store(yb, y + 2 * r + width, hi);
  }
}

template <typename scalar_t, typename table_t>
void rotary_kernel(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                   bool interleaved, bool conjugate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t half = cos.size(1), R = 2 * half;
  const int64_t xb = x.stride(0), xl = x.stride(1), xh = x.stride(2);
  const int64_t ob = out.stride(0), ol = out.stride(1), oh = out.stride(2);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const table_t* cos_data = cos.const_data_ptr<table_t>();
  const table_t* sin_data = sin.const_data_ptr<table_t>();
  // In place (out is x), the copied dimensions are already where they belong.
  const bool copy_tail = R < D && static_cast<const void*>(out_data) != static_cast<const void*>(x_data);
  const Vec<acc_t> sign(conjugate ? acc_t(-1) : acc_t(1));

  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, H * D));
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / L, l = p % L;
      const table_t* c = cos_data + l * half;
      const table_t* s = sin_data + l * half;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* xr = x_data + b * xb + l * xl + h * xh;
        scalar_t* yr = out_data + b * ob + l * ol + h * oh;
        if (interleaved) {
          rotate_interleaved<acc_t>(xr, yr, c, s, half, sign);
        } else {
          rotate_half_split<acc_t>(xr, yr, c, s, half, sign);
        }
        if (copy_tail) std::memcpy(yr + R, xr + R, (D - R) * sizeof(scalar_t));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Input checks: every message names the function and the argument.

constexpr const char* kFn = "rotary_cpu";

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), kFn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), kFn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, kFn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

// x or out: (B, L, H, D) with unit stride in the last dim (a dim of size 1 has no meaningful stride).
void check_rows(const char* name, const at::Tensor& t) {
  check_cpu(name, t);
  TORCH_CHECK(t.dim() == 4, kFn, ": ", name, " must be 4-D (batch, seqlen, nheads, headdim), got shape ", t.sizes());
  TORCH_CHECK(supported(t.scalar_type()), kFn, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kFn, ": ", name, " must have stride 1 in its last dim, got strides ",
              t.strides());
}

void check_table(const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_cpu(name, t);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(1), kFn, ": ", name, " must have shape (seqlen, rotary_dim / 2) "
              "with seqlen = x.size(1) = ", x.size(1), ", got ", t.sizes());
  TORCH_CHECK(2 * t.size(1) <= x.size(3), kFn, ": ", name, " has ", t.size(1), " columns, so rotary_dim = ",
              2 * t.size(1), " exceeds headdim = ", x.size(3));
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, kFn, ": ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), kFn, ": ", name, " must be contiguous, got strides ", t.strides());
}

}  // namespace

void rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                bool interleaved, bool conjugate) {
  check_rows("x", x);
  check_rows("out", out);
  TORCH_CHECK(out.sizes() == x.sizes(), kFn, ": out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), kFn, ": out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  check_table("cos", cos, x);
  check_table("sin", sin, x);
  TORCH_CHECK(sin.sizes() == cos.sizes(), kFn, ": sin must have cos's shape ", cos.sizes(), ", got ", sin.sizes());
  if (x.numel() == 0) return;
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);
  TORCH_CHECK(out.data_ptr() != x.data_ptr() || out.strides() == x.strides(), kFn,
              ": out starts where x does but has other strides (", out.strides(), " vs ", x.strides(),
              "); in place, pass x itself as out");

  // One table dtype for the kernel: float32 when cos and sin differ, float64 for float64 x. The tables are small,
  // so the widening copy costs little.
  at::Tensor c = cos, s = sin;
  const at::ScalarType table_dtype = x.scalar_type() == at::kDouble ? at::kDouble
                                     : c.scalar_type() != s.scalar_type() ? at::kFloat
                                                                          : c.scalar_type();
  c = c.to(table_dtype);
  s = s.to(table_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFn, [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      rotary_kernel<scalar_t, scalar_t>(x, c, s, out, interleaved, conjugate);
    } else if (table_dtype == at::kFloat) {
      rotary_kernel<scalar_t, float>(x, c, s, out, interleaved, conjugate);
    } else {
      rotary_kernel<scalar_t, scalar_t>(x, c, s, out, interleaved, conjugate);
    }
  });
}

}  // namespace mltoolkit
