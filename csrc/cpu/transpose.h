// Blocked matrix transpose for the CPU kernels (convolution layouts, LSTM weight panels).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace mltoolkit::cpu {

// One 16 x 16 block of floats transposed in registers: dst[j * ld_dst + i] = src[i * ld_src + j].
inline void transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  // at::vec's AVX-512 transpose takes the block size at run time (masked loads, loops over it) and is not inlined:
  // this is its algorithm (from FBGEMM) with the sizes fixed, all in registers.
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_ps(dst + i * ld_dst, _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88));
    _mm512_storeu_ps(dst + (i + 8) * ld_dst, _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd));
  }
#else
  at::vec::transpose_mxn<float, 16, 16>(src, ld_src, dst, ld_dst);
#endif
}

inline void transpose16(const double* src, int64_t ld_src, double* dst, int64_t ld_dst) {
  at::vec::transpose_mxn<double, 16, 16>(src, ld_src, dst, ld_dst);
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n, by 16 x 16 blocks in registers; at::vec's generic
// loop for the edges.
template <typename T>
void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t m, int64_t n) {
  constexpr int64_t B = 16;
  for (int64_t i = 0; i < m; i += B)
    for (int64_t j = 0; j < n; j += B) {
      const T* s = src + i * ld_src + j;
      T* d = dst + j * ld_dst + i;
      if (i + B <= m && j + B <= n)
        transpose16(s, ld_src, d, ld_dst);
      else
        at::vec::transpose_mxn<T>(s, ld_src, d, ld_dst, int(std::min(B, m - i)), int(std::min(B, n - j)));
    }
}

}  // namespace mltoolkit::cpu
