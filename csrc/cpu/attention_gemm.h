// Register-blocked GEMM for the attention tiles of csrc/cpu/attention.cpp (float and double, at::vec + FMA).
//
//   C[m x n] (+)= A[m x k] * B[k x n]
//   A(i, p) = a[i * rsa + p * csa]   (any layout: Q rows, P, or P^T read in place)
//   B is packed in panels of kPanel<T> columns: B(p, j) = b[(j / kPanel) * panel_stride + p * kPanel + j % kPanel],
//     zero past column n, so every panel is a full one (panel_stride >= k * kPanel)
//   C(i, :) = c + i * ldc, writable up to column round_up(n, kPanel) (those extra columns receive zeros)
//
// BLIS-style outer products: a 6 x 2-vector block of C lives in 12 registers; each step loads 2 vectors of B,
// broadcasts 6 elements of A and issues 12 FMAs. Packing B makes each panel a contiguous stream: B rows 256-512
// bytes apart (unpacked K^T / V tiles) fall into a few L1 sets and ran clearly slower here. Measured on the 2-core
// AVX2 dev VM, one thread, tiles in cache: ~110 GFLOP/s in float for the attention tile shapes. We keep our own
// kernel rather than calling MKL: libtorch does not export the float/double cpublas::gemm overloads, and the
// gemm_stub fallback is generic code.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace mltoolkit::attn {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t kPanel = 2 * Vec<T>::size();

template <typename T>
constexpr int64_t round_up_panel(int64_t n) {
  return (n + kPanel<T> - 1) / kPanel<T> * kPanel<T>;
}

template <typename T, int MR>
inline void gemm_block(int64_t k, const T* __restrict__ a, int64_t rsa, int64_t csa, const T* __restrict__ b,
                       T* __restrict__ c, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::size();
  Vec<T> acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = accumulate ? Vec<T>::loadu(c + r * ldc) : Vec<T>(T(0));
    acc[r][1] = accumulate ? Vec<T>::loadu(c + r * ldc + W) : Vec<T>(T(0));
  }
  for (int64_t p = 0; p < k; ++p) {
    const Vec<T> b0 = Vec<T>::loadu(b + p * 2 * W), b1 = Vec<T>::loadu(b + p * 2 * W + W);
    const T* ap = a + p * csa;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec<T> av(ap[r * rsa]);
      acc[r][0] = at::vec::fmadd(av, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0].store(c + r * ldc);
    acc[r][1].store(c + r * ldc + W);
  }
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t rsa, int64_t csa, const T* b, int64_t panel_stride,
          T* c, int64_t ldc, bool accumulate) {
  constexpr int MR = 6;
  for (int64_t j = 0; j < n; j += kPanel<T>) {
    const T* bp = b + (j / kPanel<T>) * panel_stride;
    int64_t i = 0;
    for (; i + MR <= m; i += MR) gemm_block<T, MR>(k, a + i * rsa, rsa, csa, bp, c + i * ldc + j, ldc, accumulate);
    const T* ai = a + i * rsa;
    T* ci = c + i * ldc + j;
    switch (m - i) {
      case 5: gemm_block<T, 5>(k, ai, rsa, csa, bp, ci, ldc, accumulate); break;
      case 4: gemm_block<T, 4>(k, ai, rsa, csa, bp, ci, ldc, accumulate); break;
      case 3: gemm_block<T, 3>(k, ai, rsa, csa, bp, ci, ldc, accumulate); break;
      case 2: gemm_block<T, 2>(k, ai, rsa, csa, bp, ci, ldc, accumulate); break;
      case 1: gemm_block<T, 1>(k, ai, rsa, csa, bp, ci, ldc, accumulate); break;
      default: break;
    }
  }
}

// Packs B(p, j) = src[p * row_stride + j] (k rows of n elements: V, dO, Q, K used as they are stored) into panels.
template <typename T, typename src_t>
void pack_rows(const src_t* src, int64_t row_stride, int64_t k, int64_t n, T* dst, int64_t panel_stride) {
  constexpr int64_t P = kPanel<T>;
  for (int64_t j0 = 0; j0 < n; j0 += P) {
    T* panel = dst + (j0 / P) * panel_stride;
    const int64_t w = n - j0 < P ? n - j0 : P;
    for (int64_t p = 0; p < k; ++p) {
      const src_t* row = src + p * row_stride + j0;
      T* out = panel + p * P;
      for (int64_t jj = 0; jj < w; ++jj) out[jj] = static_cast<T>(row[jj]);
      for (int64_t jj = w; jj < P; ++jj) out[jj] = T(0);
    }
  }
}

// Packs B(p, j) = src[j * row_stride + p] (B = M^T for the n rows of M, each of k elements: K^T, V^T) into panels.
template <typename T, typename src_t>
void pack_transposed(const src_t* src, int64_t row_stride, int64_t k, int64_t n, T* dst, int64_t panel_stride) {
  constexpr int64_t P = kPanel<T>;
  for (int64_t j0 = 0; j0 < n; j0 += P) {
    T* panel = dst + (j0 / P) * panel_stride;
    const int64_t w = n - j0 < P ? n - j0 : P;
    for (int64_t jj = 0; jj < w; ++jj) {
      const src_t* row = src + (j0 + jj) * row_stride;
      for (int64_t p = 0; p < k; ++p) panel[p * P + jj] = static_cast<T>(row[p]);
    }
    for (int64_t jj = w; jj < P; ++jj)
      for (int64_t p = 0; p < k; ++p) panel[p * P + jj] = T(0);
  }
}

}  // namespace mltoolkit::attn
