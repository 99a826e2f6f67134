// CUDA rotary embedding: one grid over the B*L*H rows; contract in csrc/attention.h, launcher API in rotary_launch.h.
//
// Layout. A row is split into work items: rotation items of NP pairs each (half-split: NP elements from each half;
// interleaved: 2*NP consecutive elements), then, out of place, tail items copying dims R .. D-1. A few threads own a
// row (a power of two covering its items, at most kMaxThreadsPerRow) and a 256-thread block owns several consecutive
// rows, which share their cos/sin row when they are heads of one position. Rows are independent and every element is
// read once and written once by one thread, so in place (out == x) needs no synchronization.
// Vector path (all accesses 16-byte vectors of x, and NP-entry vectors of the tables) when pointers, strides and sizes
// allow it; otherwise the same kernel with element accesses, one pair per item.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "num_cast.cuh"
#include "rotary_launch.h"

namespace mltoolkit::cuda_rotary {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kMaxThreadsPerRow = 128;

using cuda_num::Num;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ unsigned int bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned long long bits(double v) { return static_cast<unsigned long long>(__double_as_longlong(v)); }
__device__ __forceinline__ unsigned short bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned short bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// 16 bytes of values as one 16-byte store. A plain store of a struct (or of a uint4) built from computed values was
// split into 4-byte stores by nvcc 13 (seen in the PTX); the intrinsic emits st.global.cg.v4 (cached in L2, where the
// attention kernel that reads q and k next finds them).
template <typename T, int N>
__device__ __forceinline__ void store16(T* p, const T (&v)[N]) {
  static_assert(sizeof(T) * N == 16, "a vector store is 16 bytes");
  unsigned int w[4];
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = unsigned(bits(v[2 * i])) | (unsigned(bits(v[2 * i + 1])) << 16);
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bits(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const unsigned long long b = bits(v[i]);
      w[2 * i] = unsigned(b);
      w[2 * i + 1] = unsigned(b >> 32);
    }
  }
  __stcg(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
}

// N elements at p into acc lanes; one aligned vector access when VECTOR (the host checked the alignment).
template <bool VECTOR, int N, typename T, typename A>
__device__ __forceinline__ void load(const T* p, A (&out)[N]) {
  if constexpr (VECTOR) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = Num<T>::to_acc(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = Num<T>::to_acc(p[i]);
  }
}

template <bool VECTOR, int N, typename T, typename A>
__device__ __forceinline__ void store(T* p, const A (&in)[N]) {
  if constexpr (VECTOR) {
    T values[N];
#pragma unroll
    for (int i = 0; i < N; ++i) values[i] = Num<T>::from_acc(in[i]);
    store16(p, values);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = Num<T>::from_acc(in[i]);
  }
}

template <bool VECTOR, int N, typename T>
__device__ __forceinline__ void copy(T* dst, const T* src) {
  if constexpr (VECTOR) {
    *reinterpret_cast<Pack<T, N>*>(dst) = *reinterpret_cast<const Pack<T, N>*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

struct Args {
  const void* x;
  void* out;
  const void* cos;
  const void* sin;
  int64_t rows, L, H, D, half;
  int64_t xs0, xs1, xs2, os0, os1, os2;
  int rot_items;   // rotation items per row
  int row_items;   // rotation + tail items per row
  bool conjugate;
};

// T: x's type, C: the tables', NP: pairs per rotation item, NT: elements per tail item.
template <typename T, typename C, int NP, int NT, bool INTERLEAVED, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) _rotary_fwd_kernel(const Args a) {
  using A = typename Num<T>::acc;
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= a.rows) return;
  const int64_t h = row % a.H;
  const int64_t l = (row / a.H) % a.L;
  const int64_t b = row / (a.H * a.L);
  const T* x = static_cast<const T*>(a.x) + b * a.xs0 + l * a.xs1 + h * a.xs2;
  T* out = static_cast<T*>(a.out) + b * a.os0 + l * a.os1 + h * a.os2;
  const C* cos_row = static_cast<const C*>(a.cos) + l * a.half;
  const C* sin_row = static_cast<const C*>(a.sin) + l * a.half;
  for (int item = threadIdx.x; item < a.row_items; item += blockDim.x) {
    if (item < a.rot_items) {
      const int64_t r = int64_t(item) * NP;
      A c[NP], s[NP], x1[NP], x2[NP];
      load<VECTOR, NP>(cos_row + r, c);
      load<VECTOR, NP>(sin_row + r, s);
      if (a.conjugate) {
#pragma unroll
        for (int i = 0; i < NP; ++i) s[i] = -s[i];
      }
      if constexpr (INTERLEAVED) {
        A xx[2 * NP];
        load<VECTOR, 2 * NP>(x + 2 * r, xx);
#pragma unroll
        for (int i = 0; i < NP; ++i) {
          const A e = xx[2 * i], o = xx[2 * i + 1];
          xx[2 * i] = e * c[i] - o * s[i];
          xx[2 * i + 1] = e * s[i] + o * c[i];
        }
        store<VECTOR, 2 * NP>(out + 2 * r, xx);
      } else {
        load<VECTOR, NP>(x + r, x1);
        load<VECTOR, NP>(x + a.half + r, x2);
        A y1[NP], y2[NP];
#pragma unroll
        for (int i = 0; i < NP; ++i) {
          y1[i] = x1[i] * c[i] - x2[i] * s[i];
          y2[i] = x1[i] * s[i] + x2[i] * c[i];
        }
        store<VECTOR, NP>(out + r, y1);
        store<VECTOR, NP>(out + a.half + r, y2);
      }
    } else {
      const int64_t j = 2 * a.half + int64_t(item - a.rot_items) * NT;
      copy<VECTOR, NT>(out + j, x + j);
    }
  }
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

template <typename T, typename C, int NP, int NT, bool INTERLEAVED, bool VECTOR>
cudaError_t launch(const Params& p, bool copy_tail, cudaStream_t stream) {
  Args a;
  a.x = p.x;
  a.out = p.out;
  a.cos = p.cos;
  a.sin = p.sin;
  a.rows = p.B * p.L * p.H;
  a.L = p.L;
  a.H = p.H;
  a.D = p.D;
  a.half = p.half;
  a.xs0 = p.x_stride[0];
  a.xs1 = p.x_stride[1];
  a.xs2 = p.x_stride[2];
  a.os0 = p.out_stride[0];
  a.os1 = p.out_stride[1];
  a.os2 = p.out_stride[2];
  a.rot_items = int(p.half / NP);
  a.row_items = a.rot_items + (copy_tail ? int((p.D - 2 * p.half) / NT) : 0);
  a.conjugate = p.conjugate;
  if (a.row_items == 0) return cudaSuccess;  // in place with no rotary dims: nothing to write
  int tpr = 1;
  while (tpr < a.row_items && tpr < kMaxThreadsPerRow) tpr *= 2;
  const dim3 block(tpr, kBlockThreads / tpr);
  const int64_t grid = (a.rows + block.y - 1) / block.y;
  _rotary_fwd_kernel<T, C, NP, NT, INTERLEAVED, VECTOR><<<unsigned(grid), block, 0, stream>>>(a);
  return cudaGetLastError();
}

// Picks the vector or the element path for one (x type, table type) pair.
template <typename T, typename C>
cudaError_t dispatch(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / int(sizeof(T));  // x elements per 16-byte access
  const bool copy_tail = 2 * p.half < p.D && p.out != p.x;
  bool vector = aligned(p.x, 16) && aligned(p.out, 16) && (!copy_tail || (p.D - 2 * p.half) % kVec == 0);
  for (int i = 0; i < 3; ++i) {
    vector = vector && (p.x_stride[i] * int64_t(sizeof(T))) % 16 == 0 && (p.out_stride[i] * int64_t(sizeof(T))) % 16 == 0;
  }
  // A rotation item covers 16 bytes of each half (half-split) or 16 bytes of pairs (interleaved); its table entries
  // are one vector too, so every table row must start aligned (half a multiple of the pairs per item).
  const auto tables_fit = [&](int pairs) {
    return p.half % pairs == 0 && aligned(p.cos, pairs * int64_t(sizeof(C))) &&
           aligned(p.sin, pairs * int64_t(sizeof(C)));
  };
  if (p.interleaved) {
    constexpr int kPairs = kVec / 2;
    if (vector && tables_fit(kPairs)) {
      return launch<T, C, kPairs, kVec, true, true>(p, copy_tail, stream);
    }
    return launch<T, C, 1, 1, true, false>(p, copy_tail, stream);
  }
  if (vector && tables_fit(kVec)) return launch<T, C, kVec, kVec, false, true>(p, copy_tail, stream);
  return launch<T, C, 1, 1, false, false>(p, copy_tail, stream);
}

}  // namespace

LaunchStatus rotary_forward(const Params& p, cudaStream_t stream) {
  LaunchStatus st;
  if (p.B < 0 || p.L < 0 || p.H < 0 || p.D < 0 || p.half < 0 || 2 * p.half > p.D || p.D > INT32_MAX) {
    st.what = "rotary_forward: sizes must be >= 0 with 2 * half <= D < 2^31";
    return st;
  }
  const int64_t rows = p.B * p.L * p.H;
  if (rows == 0 || p.D == 0) return st;
  if (p.x == nullptr || p.out == nullptr || (p.half > 0 && (p.cos == nullptr || p.sin == nullptr))) {
    st.what = "rotary_forward: missing pointer";
    return st;
  }
  if (rows > int64_t(INT32_MAX)) {  // the grid has at most rows blocks
    st.what = "rotary_forward: more than 2^31 - 1 rows (B * L * H)";
    return st;
  }
  const DType x = p.x_dtype, t = p.table_dtype;
  if (x == DType::kFloat32 && t == DType::kFloat32) {
    st.cuda = dispatch<float, float>(p, stream);
  } else if (x == DType::kFloat64 && t == DType::kFloat64) {
    st.cuda = dispatch<double, double>(p, stream);
  } else if (x == DType::kFloat16 && t == DType::kFloat16) {
    st.cuda = dispatch<__half, __half>(p, stream);
  } else if (x == DType::kFloat16 && t == DType::kFloat32) {
    st.cuda = dispatch<__half, float>(p, stream);
  } else if (x == DType::kBFloat16 && t == DType::kBFloat16) {
    st.cuda = dispatch<__nv_bfloat16, __nv_bfloat16>(p, stream);
  } else if (x == DType::kBFloat16 && t == DType::kFloat32) {
    st.cuda = dispatch<__nv_bfloat16, float>(p, stream);
  } else {
    st.what = "rotary_forward: unsupported (x dtype, table dtype) pair";
  }
  return st;
}

}  // namespace mltoolkit::cuda_rotary
