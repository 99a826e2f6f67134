// Vector pieces shared by CPU kernels: a loop step over rows of any float dtype (two acc_t vectors, Chunk, loaded from
// and stored to scalar_t memory with fp16 / bf16 widened to float32 and rounded back, to nearest even, in registers)
// and the exponential of softmax-style loops (vexp).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace mltoolkit::cpu {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// The loops step by a chunk of two acc_t vectors: for fp16/bf16 that is one full Vectorized<scalar_t>, so loads and
// stores take the whole-register path (a partial fp16/bf16 access goes through a stack buffer and memcpy, which made
// the bf16 kernel 5x slower than a copy).
template <typename acc_t>
constexpr int64_t kChunk = 2 * Vec<acc_t>::size();

template <typename acc_t>
struct Chunk {
  Vec<acc_t> lo, hi;
};

// count (<= kChunk) elements stored as scalar_t, as acc_t lanes; lanes past count are zero.
template <typename acc_t, typename scalar_t>
inline Chunk<acc_t> load_chunk(const scalar_t* p, int64_t count = kChunk<acc_t>) {
  using V = Vec<acc_t>;
  constexpr int64_t width = V::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count == kChunk<acc_t>) return {V::loadu(p), V::loadu(p + width)};
    if (count <= width) return {V::loadu(p, count), V(acc_t(0))};
    return {V::loadu(p), V::loadu(p + width, count - width)};
  } else {
    static_assert(at::vec::Vectorized<scalar_t>::size() == kChunk<acc_t>);
    const auto wide = count == kChunk<acc_t> ? at::vec::Vectorized<scalar_t>::loadu(p)
                                             : at::vec::Vectorized<scalar_t>::loadu(p, count);
    const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(wide);
    return {lo, hi};
  }
}

// Stores the first count (<= kChunk) lanes, rounded to nearest even when scalar_t is fp16/bf16.
template <typename acc_t, typename scalar_t>
inline void store_chunk(const Chunk<acc_t>& c, scalar_t* p, int64_t count = kChunk<acc_t>) {
  constexpr int64_t width = Vec<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count <= width) {
      c.lo.store(p, count);
    } else {
      c.lo.store(p);
      c.hi.store(p + width, count - width);
    }
  } else {
    at::vec::convert_from_float<scalar_t>(c.lo, c.hi).store(p, count);
  }
}

// exp lane by lane: ATen's exp_u20 for float (within 20 ulp, no Sleef call: what torch's own CPU flash attention
// uses), the exact exp for double.
template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

}  // namespace mltoolkit::cpu
