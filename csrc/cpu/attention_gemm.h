// Register-blocked GEMM for the attention tiles of csrc/cpu/attention.cpp (float and double, at::vec + FMA).
//
//   C[m x n] (+)= A[m x k] * B[k x n]
//   A(i, p) = a[i * rsa + p * csa]   (any layout: Q rows, P, or P^T read in place)
//   B(p, :) = b + p * ldb            (rows contiguous in n: K^T and V^T are packed so; V, dO, Q, K already are)
//   C(i, :) = c + i * ldc
//
// Every tile the attention kernel multiplies is small (at most 128 x 256 x 256) and already sits in L1/L2, so no
// packing is needed: a 6 x 2-vector block of C lives in 12 registers, each step loads 2 vectors of B, broadcasts 6
// elements of A and issues 12 FMAs (BLIS-style outer products). We keep our own kernel rather than calling MKL: the
// float/double cpublas::gemm overloads are not exported by libtorch, and the fallback behind gemm_stub is generic.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace mltoolkit::attn {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T, int MR, int NV>
inline void gemm_block(int64_t k, const T* __restrict__ a, int64_t rsa, int64_t csa, const T* __restrict__ b,
                       int64_t ldb, T* __restrict__ c, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::size();
  Vec<T> acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec<T>::loadu(c + r * ldc + v * W) : Vec<T>(T(0));
  }
  for (int64_t p = 0; p < k; ++p) {
    Vec<T> bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec<T>::loadu(b + p * ldb + v * W);
    const T* ap = a + p * csa;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec<T> av(ap[r * rsa]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * W);
  }
}

template <typename T, int NV>
inline void gemm_rows(int64_t m, int64_t k, const T* a, int64_t rsa, int64_t csa, const T* b, int64_t ldb, T* c,
                      int64_t ldc, bool accumulate) {
  constexpr int MR = 6;
  int64_t i = 0;
  for (; i + MR <= m; i += MR) gemm_block<T, MR, NV>(k, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc, accumulate);
  const T* ai = a + i * rsa;
  T* ci = c + i * ldc;
  switch (m - i) {
    case 5: gemm_block<T, 5, NV>(k, ai, rsa, csa, b, ldb, ci, ldc, accumulate); break;
    case 4: gemm_block<T, 4, NV>(k, ai, rsa, csa, b, ldb, ci, ldc, accumulate); break;
    case 3: gemm_block<T, 3, NV>(k, ai, rsa, csa, b, ldb, ci, ldc, accumulate); break;
    case 2: gemm_block<T, 2, NV>(k, ai, rsa, csa, b, ldb, ci, ldc, accumulate); break;
    case 1: gemm_block<T, 1, NV>(k, ai, rsa, csa, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t rsa, int64_t csa, const T* b, int64_t ldb, T* c,
          int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::size();
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) gemm_rows<T, 2>(m, k, a, rsa, csa, b + j, ldb, c + j, ldc, accumulate);
  for (; j + W <= n; j += W) gemm_rows<T, 1>(m, k, a, rsa, csa, b + j, ldb, c + j, ldc, accumulate);
  // Fewer than W columns left (odd head dims or the last key block): plain loops.
  for (; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T s = accumulate ? c[i * ldc + j] : T(0);
      for (int64_t p = 0; p < k; ++p) s += a[i * rsa + p * csa] * b[p * ldb + j];
      c[i * ldc + j] = s;
    }
  }
}

}  // namespace mltoolkit::attn
