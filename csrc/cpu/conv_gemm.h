// Register-blocked micro-kernel of the CPU convolution forward (csrc/cpu/conv.cpp), with its fused epilogue.
//
// Indirect GEMM (as in XNNPACK's igemm): one call computes an MR x (NR vectors) tile of
//   C[i][j] = sum over taps t, channels p < kc of A_t[i][p] * B_t[p][j]
// where row i of A_t is a pointer a[t * MR + i] (+ aoff) to kc contiguous elements (an input pixel's channel vector
// for tap t, or a zero vector where the tap falls in the padding), and row p of B_t = b + boff[t] is the
// NR * Vec::size() contiguous elements at B_t + p * ldb (one packed panel of output channels: ldb = panel width).
// So a channels-last convolution reads x in place, without an im2col copy, for any stride, dilation and padding.
// The same kernel serves the NCHW 1x1 convolution the other way round: rows of A = rows of the weight, B = rows of
// x read in place (ldb = H * W), C = rows of y.
//
// Register blocks: with AVX-512 (32 vector registers) 6 rows x 4 vectors = 24 accumulators, 4 loads of B and 6
// broadcasts of A per 24 FMAs, 29 registers in the k loop. (7 x 4 needed 33: GCC kept one accumulator on the stack,
// a load, an FMA and a store per k step on a loop-carried chain; 6 x 4 ran ResNet-50's channels-last 1x1 layers
// ~5% faster and its 3x3 layers alike, 2026-11-27.) With AVX2 (16 registers) 6 x 2 = 12 accumulators. Narrower
// panels take 8 rows in the forward (igemm_rows: 8 x 1 .. 8 x 3 with AVX-512, 8 x 1 with AVX2). Measured on
// the 2-core Zen 4 dev VM, one thread, ResNet-50's 3x3 layers channels_last as direct convolutions: 99-108 GFLOP/s
// with AVX-512 (7 x 4), 87-105 with AVX2 (FMA peak measured ~116 either way; oneDNN 105-118).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <new>

#include "../conv_epilogue.h"
#include "vec_activation.h"

namespace mltoolkit::convk {

template <typename T>
using Vec = at::vec::Vectorized<T>;
using cpu::apply_vector_act;
using cpu::vector_act;

constexpr int kMR = 6;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxNR = 4;
#else
constexpr int kMaxNR = 2;
#endif

// Rows of fwd_igemm's register block for panels of NR vectors: 8 rows when the panel is narrow, so that at least 8
// independent accumulators keep both FMA pipes busy through their 4-cycle latency (6 x 1, a 1x1 layer with 16 output
// channels, waited on the latency), kMR where 8 rows would not fit the registers.
template <int NR>
constexpr int igemm_rows() {
#if defined(CPU_CAPABILITY_AVX512)
  return NR <= 3 ? 8 : kMR;
#else
  return NR == 1 ? 8 : kMR;
#endif
}

// The epilogue of the tile's last pass: v = act(acc + bias + res[i * ldr + j]); bias and res may be null.
template <typename T>
struct Epilogue {
  const T* bias;      // bias[j] (readable for the whole panel, zero-padded past the valid columns), or bias[i]
  bool bias_per_row;  // the tile's rows are output channels (NCHW 1x1), not pixels
  const T* res;
  int64_t ldr;
  Act act;
};

// Where row r of a tile lies: r * ld elements from its base, or off[r] when the rows are given one by one (a tile
// of pixels that are not consecutive). The residual's rows sit at the same offsets.
struct Rows {
  int64_t ld;
  const int64_t* off = nullptr;
  int64_t operator()(int64_t r) const { return off ? off[r] : r * ld; }
};

// y[i] = act(src[i] + bias (+ res[i])) for i < n: the row epilogue of the NCHW store and of the depthwise kernels.
template <typename T>
inline void epilogue_row(T* y, const T* src, int64_t n, T bias, const T* res, Act act) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vb(bias);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec<T> v = Vec<T>::loadu(src + i) + vb;
    if (res) v = v + Vec<T>::loadu(res + i);
    apply_vector_act<T>(act, v).store(y + i);
  }
  if (i < n) {
    Vec<T> v = Vec<T>::loadu(src + i, n - i) + vb;
    if (res) v = v + Vec<T>::loadu(res + i, n - i);
    apply_vector_act<T>(act, v).store(y + i, n - i);
  }
}

// tile[i][j] = c[rows(i) + j] for i < mvalid, j < ncols, zero elsewhere (tile: MR x Pn).
template <typename T, int Pn, int MR>
void load_tile(T* tile, const T* c, Rows rows, int64_t mvalid, int64_t ncols) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t j = 0; j < Pn; j += W) {
      const int64_t n = r < mvalid ? std::min<int64_t>(std::max<int64_t>(ncols - j, 0), W) : 0;
      const T* src = c + (r < mvalid ? rows(r) : 0) + j;
      const Vec<T> v = n == W ? Vec<T>::loadu(src) : n > 0 ? Vec<T>::loadu(src, n) : Vec<T>(T(0));
      v.store(tile + r * Pn + j);
    }
}

// c[rows(i) + j] = act(tile[i][j] + bias + res) for a whole MR x Pn tile, the activation A known at compile time.
template <typename T, int Pn, int MR, Act A>
void store_whole_tile(const T* tile, T* c, Rows rows, const Epilogue<T>& ep) {
  constexpr int W = Vec<T>::size(), NV = Pn / W;
  const bool row_bias = ep.bias && ep.bias_per_row;
  const Rows res_rows{ep.ldr, rows.off};
  Vec<T> bias[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bias[v] = ep.bias && !row_bias ? Vec<T>::loadu(ep.bias + v * W) : Vec<T>(T(0));
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const Vec<T> rb = row_bias ? Vec<T>(ep.bias[r]) : Vec<T>(T(0));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      Vec<T> val = Vec<T>::loadu(tile + r * Pn + v * W) + bias[v] + rb;
      if (ep.res) val = val + Vec<T>::loadu(ep.res + res_rows(r) + v * W);
      if constexpr (A != Act::kNone) val = apply_vector_act<T>(A, val);
      val.store(c + rows(r) + v * W);
    }
  }
}

// c[rows(i) + j] = tile[i][j], through the epilogue if ep, for i < mvalid, j < ncols. A whole tile with an epilogue
// runs fixed loops with the activation chosen once (the general loop, testing the row, column and epilogue at each
// vector, took ~13% of a 1x1 layer with 24 input channels).
template <typename T, int Pn, int MR = kMR>
void store_tile(const T* tile, T* c, Rows rows, int64_t mvalid, int64_t ncols, const Epilogue<T>* ep) {
  constexpr int64_t W = Vec<T>::size();
  if (ep && mvalid == MR && ncols == Pn) {
    cpu::with_act(ep->act, [&](auto a) { store_whole_tile<T, Pn, MR, decltype(a)::value>(tile, c, rows, *ep); });
    return;
  }
  for (int64_t r = 0; r < mvalid; ++r) {
    for (int64_t j = 0; j < ncols; j += W) {
      const int64_t n = ncols - j < W ? ncols - j : W;
      Vec<T> val = Vec<T>::loadu(tile + r * Pn + j);
      if (ep) {
        if (ep->bias) val = val + (ep->bias_per_row ? Vec<T>(ep->bias[r]) : Vec<T>::loadu(ep->bias + j));
        if (ep->res) {
          const T* rr = ep->res + Rows{ep->ldr, rows.off}(r) + j;
          val = val + (n == W ? Vec<T>::loadu(rr) : Vec<T>::loadu(rr, n));
        }
        val = apply_vector_act<T>(ep->act, val);
      }
      if (n == W) val.store(c + rows(r) + j);
      else val.store(c + rows(r) + j, n);
    }
  }
}

// The tile C[i][j] for i < mvalid, j < ncols at c + i * ldc + j, or c + crow[i] + j when crow is given (the rest is
// neither read nor written).
// accumulate: add to C's current values. ep: the last pass, apply the epilogue on the way out.
// The accumulators go through a local tile on the way in and out, which keeps the loads, stores and epilogue
// (partial rows and columns) out of the register allocation of the k loop: with them inline, the compiler spilled
// every accumulator at each tap.
template <typename T, int NR, int MR = kMR>
__attribute__((noinline)) void igemm_tile(int64_t ntaps, const T* const* a, int64_t aoff, const int64_t* boff,
                                          int64_t kc, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t mvalid,
                                          int64_t ncols, bool accumulate, const Epilogue<T>* ep,
                                          const int64_t* crow = nullptr) {
  constexpr int W = Vec<T>::size();
  constexpr int Pn = NR * W;
  const Rows rows{ldc, crow};  // C's row r at c + rows(r) (crow: offsets of rows given one by one)
  // Whole tiles without an epilogue (the Winograd products) go straight between C and the registers.
  const bool raw = !ep && !crow && mvalid == MR && ncols == Pn;
  if (ep) {
    // The tile's output rows, and its residual rows (a block's input, written long before), are touched only after
    // the k loop, cold from memory: asked for now, they arrive while the tile is computed (the residual convs of
    // ResNet-50's bottlenecks ran ~25% faster).
    constexpr int64_t line = 64 / int64_t(sizeof(T));
    for (int64_t r = 0; r < mvalid; ++r)
      for (int64_t j = 0; j < ncols; j += line) {
        if (ep->res) __builtin_prefetch(ep->res + Rows{ep->ldr, crow}(r) + j, 0, 0);
        __builtin_prefetch(c + rows(r) + j, 1, 0);
      }
  }
  alignas(64) T tile[MR * Pn];
  if (accumulate && !raw) load_tile<T, Pn, MR>(tile, c, rows, mvalid, ncols);
  const T* src = raw ? c : tile;
  const int64_t lds = raw ? ldc : Pn;
  // Slots that do not run Vec's zeroing default constructor: with `Vec<T> acc[MR][NR]`, GCC zeroed a stack block of
  // the accumulators' size with `rep stos` on every call (~10% of the samples of a 1x1 layer with 16 output channels).
  union Slot {
    Vec<T> v;
    Slot() {}
  };
  Slot slot[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v)
      new (&slot[r][v].v) Vec<T>(accumulate ? Vec<T>::loadu(src + r * lds + v * W) : Vec<T>(T(0)));
  auto& acc = reinterpret_cast<Vec<T>(&)[MR][NR]>(slot);
  for (int64_t t = 0; t < ntaps; ++t) {
    const T* ap[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) ap[r] = a[t * MR + r] + aoff;
    const T* __restrict__ bt = b + boff[t];
    for (int64_t p = 0; p < kc; ++p) {
      Vec<T> bv[NR];
#pragma GCC unroll 4
      for (int v = 0; v < NR; ++v) bv[v] = Vec<T>::loadu(bt + p * ldb + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Vec<T> av(ap[r][p]);
#pragma GCC unroll 4
        for (int v = 0; v < NR; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
      }
    }
  }
  T* dst = raw ? c : tile;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) acc[r][v].store(dst + r * lds + v * W);
  if (!raw) store_tile<T, Pn, MR>(tile, c, rows, mvalid, ncols, ep);
}

}  // namespace mltoolkit::convk
