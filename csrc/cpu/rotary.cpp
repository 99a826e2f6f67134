// CPU kernel of the rotary embedding; the contract is the "Rotary embedding" part of csrc/attention.h.
//
// Dtypes. x and out: float32, float16, bfloat16 (math in float32) or float64 (math in float64, as the reference does,
// so that fp64 gradcheck is exact). cos and sin: x's dtype or float32 each; when they differ, the one in x's dtype is
// widened to float32 (lossless), and for float64 x both are widened to float64, so the kernel reads one table dtype.
//
// Work layout. at::parallel_for splits the B*L positions across threads; the H rows of a position share one cos/sin
// row, converted once to acc_t (with the sign of sin) and kept in L1 while they are rotated. Each row is one pass of
// at::vec::Vectorized<acc_t> (fp16/bf16 widened in registers): half-split rows load the two halves side by side,
// interleaved rows load pairs and deinterleave them in registers. Every element of x is read once and every element
// of out written once, as in a copy. Measured on the 2-core dev VM, one thread, (2, 1024, 16, 128): fp32 runs at the
// speed of a copy; bf16 at about a quarter of one (L3-resident data), limited by AVX2's bf16 <-> fp32 conversions.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"
#include "rotary_args.h"
#include "vec_chunk.h"

namespace mltoolkit {
namespace {

// A task covers at least this many elements (ATen's grain size): below it, waking threads costs more than the work.
constexpr int64_t kMinElementsPerTask = 32768;

using cpu::Chunk;
using cpu::kChunk;
using cpu::load_chunk;
using cpu::store_chunk;
using cpu::Vec;

// (x1*c - x2*s, x1*s + x2*c) lane by lane.
template <typename acc_t>
inline std::pair<Vec<acc_t>, Vec<acc_t>> rotate(const Vec<acc_t>& x1, const Vec<acc_t>& x2, const Vec<acc_t>& c,
                                                const Vec<acc_t>& s) {
  return {at::vec::fmsub(x1, c, x2 * s), at::vec::fmadd(x1, s, x2 * c)};
}

// Half-split pairs (x[r], x[r + half]) for r < half. y may be x: every chunk is loaded before the two stores that
// overwrite it.
template <typename acc_t, typename scalar_t>
inline void rotate_half_split(const scalar_t* x, scalar_t* y, const acc_t* cos, const acc_t* sin, int64_t half) {
  for (int64_t r = 0; r < half; r += kChunk<acc_t>) {
    const int64_t n = std::min(kChunk<acc_t>, half - r);
    const Chunk<acc_t> x1 = load_chunk<acc_t>(x + r, n), x2 = load_chunk<acc_t>(x + half + r, n);
    const Chunk<acc_t> c = load_chunk<acc_t>(cos + r, n), s = load_chunk<acc_t>(sin + r, n);
    const auto [y1_lo, y2_lo] = rotate(x1.lo, x2.lo, c.lo, s.lo);
    const auto [y1_hi, y2_hi] = rotate(x1.hi, x2.hi, c.hi, s.hi);
    store_chunk(Chunk<acc_t>{y1_lo, y1_hi}, y + r, n);
    store_chunk(Chunk<acc_t>{y2_lo, y2_hi}, y + half + r, n);
  }
}

// Interleaved pairs (x[2r], x[2r+1]): the 2n elements of n pairs are split into even and odd lanes, rotated, and
// interleaved back.
template <typename acc_t, typename scalar_t>
inline void rotate_interleaved(const scalar_t* x, scalar_t* y, const acc_t* cos, const acc_t* sin, int64_t half) {
  constexpr int64_t chunk = kChunk<acc_t>;
  for (int64_t r = 0; r < half; r += chunk) {
    const int64_t n = std::min(chunk, half - r);
    const int64_t first = std::min(2 * n, chunk), second = 2 * n - first;
    const Chunk<acc_t> a = load_chunk<acc_t>(x + 2 * r, first);
    const Chunk<acc_t> b = second > 0 ? load_chunk<acc_t>(x + 2 * r + chunk, second) : Chunk<acc_t>{};
    const auto [x1_lo, x2_lo] = at::vec::deinterleave2(a.lo, a.hi);  // pairs r .. r + width - 1
    const auto [x1_hi, x2_hi] = at::vec::deinterleave2(b.lo, b.hi);  // the next width pairs
    const Chunk<acc_t> c = load_chunk<acc_t>(cos + r, n), s = load_chunk<acc_t>(sin + r, n);
    const auto [y1_lo, y2_lo] = rotate(x1_lo, x2_lo, c.lo, s.lo);
    const auto [y1_hi, y2_hi] = rotate(x1_hi, x2_hi, c.hi, s.hi);
    const auto [ya_lo, ya_hi] = at::vec::interleave2(y1_lo, y2_lo);
    store_chunk(Chunk<acc_t>{ya_lo, ya_hi}, y + 2 * r, first);
    if (second > 0) {
      const auto [yb_lo, yb_hi] = at::vec::interleave2(y1_hi, y2_hi);
      store_chunk(Chunk<acc_t>{yb_lo, yb_hi}, y + 2 * r + chunk, second);
    }
  }
}

// The position's cos row and sign * sin row as acc_t, so that the H rows of the position read them without
// conversion (for bf16 tables the conversion cost as much as the rotation).
template <typename acc_t, typename table_t>
void table_rows(const table_t* cos, const table_t* sin, int64_t half, acc_t sign, acc_t* cos_acc, acc_t* sin_acc) {
  const Vec<acc_t> sign_v(sign);
  for (int64_t r = 0; r < half; r += kChunk<acc_t>) {
    const int64_t n = std::min(kChunk<acc_t>, half - r);
    store_chunk(load_chunk<acc_t>(cos + r, n), cos_acc + r, n);
    const Chunk<acc_t> s = load_chunk<acc_t>(sin + r, n);
    store_chunk(Chunk<acc_t>{s.lo * sign_v, s.hi * sign_v}, sin_acc + r, n);
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
  const acc_t sign = conjugate ? acc_t(-1) : acc_t(1);

  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, H * D));
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tables(2 * half);
    acc_t* c = tables.data();
    acc_t* s = c + half;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / L, l = p % L;
      table_rows(cos_data + l * half, sin_data + l * half, half, sign, c, s);
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* xr = x_data + b * xb + l * xl + h * xh;
        scalar_t* yr = out_data + b * ob + l * ol + h * oh;
        if (interleaved) {
          rotate_interleaved<acc_t>(xr, yr, c, s, half);
        } else {
          rotate_half_split<acc_t>(xr, yr, c, s, half);
        }
        if (copy_tail) std::memcpy(yr + R, xr + R, (D - R) * sizeof(scalar_t));
      }
    }
  });
}

constexpr const char* kFn = "rotary_cpu";

}  // namespace

void rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                bool interleaved, bool conjugate) {
  if (!rotary_args::check(kFn, x, cos, sin, out, at::kCPU)) return;
  const at::ScalarType table_dtype = rotary_args::table_dtype(x, cos, sin);
  const at::Tensor c = cos.to(table_dtype), s = sin.to(table_dtype);
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
