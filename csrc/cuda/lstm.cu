// CUDA LSTM / GRU gate kernels: the pointwise part of one recurrent step (the GEMMs are cuBLAS calls made by the glue,
// csrc/cuda/lstm_cuda.cpp). Launchers and pointer semantics: lstm_launch.h; math: csrc/lstm.h.
//
// One thread per (row, hidden unit): it reads that unit's 4 (LSTM) or 3 (GRU) gate values, H apart in the row, so a
// warp's loads of each gate are coalesced along H. A step is small (B x H, e.g. 32 x 512): the grid is a flat
// ceil(rows*H / 256) blocks of 256 threads.
#include <cuda_runtime.h>

#include <cstdint>

#include "lstm_launch.h"

namespace mltoolkit::cuda_lstm {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
__global__ void lstm_fwd_kernel(LstmFwd p, int64_t rows, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * H) return;
  const int64_t r = idx / H, j = idx - r * H;
  const T* g = static_cast<const T*>(p.pre) + r * 4 * H + j;
  const T* b = static_cast<const T*>(p.bias);
  T pi = g[0], pf = g[H], pg = g[2 * H], po = g[3 * H];
  if (b) {
    pi += b[j];
    pf += b[H + j];
    pg += b[2 * H + j];
    po += b[3 * H + j];
  }
  const T i = sigmoid(pi), f = sigmoid(pf), gg = tanh(pg), o = sigmoid(po);
  T* cs = static_cast<T*>(p.c_state) + idx;
  const T c = f * *cs + i * gg;
  const T h = o * tanh(c);
  *cs = c;
  static_cast<T*>(p.h_state)[idx] = h;
  static_cast<T*>(p.out)[idx] = h;
  if (p.cells) static_cast<T*>(p.cells)[idx] = c;
  if (p.act) {
    T* a = static_cast<T*>(p.act) + r * 4 * H + j;
    a[0] = i;
    a[H] = f;
    a[2 * H] = gg;
    a[3 * H] = o;
  }
}

template <typename T>
__global__ void lstm_bwd_kernel(LstmBwd p, int64_t rows, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * H) return;
  const int64_t r = idx / H, j = idx - r * H;
  T dh = p.dout ? static_cast<const T*>(p.dout)[idx] : T(0);
  if (p.dh_state) dh += static_cast<const T*>(p.dh_state)[idx];
  const T* g = static_cast<const T*>(p.gates) + r * 4 * H + j;
  const T i = g[0], f = g[H], gg = g[2 * H], o = g[3 * H];
  const T tc = tanh(static_cast<const T*>(p.cells)[idx]);
  T dc = dh * o * (T(1) - tc * tc);
  if (p.dc_in) dc += static_cast<const T*>(p.dc_in)[idx];
  T* d = static_cast<T*>(p.dgates) + r * 4 * H + j;
  d[0] = dc * gg * i * (T(1) - i);
  d[H] = dc * static_cast<const T*>(p.c_prev)[idx] * f * (T(1) - f);
  d[2 * H] = dc * i * (T(1) - gg * gg);
  d[3 * H] = dh * tc * o * (T(1) - o);
  static_cast<T*>(p.dc_out)[idx] = dc * f;
}

template <typename T>
__global__ void gru_fwd_kernel(GruFwd p, int64_t rows, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * H) return;
  const int64_t r = idx / H, j = idx - r * H;
  const T* x = static_cast<const T*>(p.x_proj) + r * 3 * H + j;
  const T* gh = static_cast<const T*>(p.gh) + r * 3 * H + j;
  const T rr = sigmoid(x[0] + gh[0]);
  const T z = sigmoid(x[H] + gh[H]);
  const T ghn = gh[2 * H];
  const T n = tanh(x[2 * H] + rr * ghn);
  T* hs = static_cast<T*>(p.h_state) + idx;
  const T h = (T(1) - z) * n + z * *hs;
  *hs = h;
  static_cast<T*>(p.out)[idx] = h;
  if (p.saved) {
    T* s = static_cast<T*>(p.saved) + r * 4 * H + j;
    s[0] = rr;
    s[H] = z;
    s[2 * H] = n;
    s[3 * H] = ghn;
  }
}

template <typename T>
__global__ void gru_bwd_kernel(GruBwd p, int64_t rows, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * H) return;
  const int64_t r = idx / H, j = idx - r * H;
  T* dhs = static_cast<T*>(p.dh_state) + idx;
  T dh = *dhs;
  if (p.dout) dh += static_cast<const T*>(p.dout)[idx];
  const T* s = static_cast<const T*>(p.saved) + r * 4 * H + j;
  const T rr = s[0], z = s[H], n = s[2 * H], ghn = s[3 * H];
  const T dn = dh * (T(1) - z) * (T(1) - n * n);
  const T dz = dh * (static_cast<const T*>(p.h_prev)[idx] - n) * z * (T(1) - z);
  const T dr = dn * ghn * rr * (T(1) - rr);
  T* dx = static_cast<T*>(p.dx_proj) + r * 3 * H + j;
  T* dg = static_cast<T*>(p.dgh) + r * 3 * H + j;
  dx[0] = dr;
  dx[H] = dz;
  dx[2 * H] = dn;
  dg[0] = dr;
  dg[H] = dz;
  dg[2 * H] = dn * rr;
  *dhs = dh * z;
}

// Flat grid of kThreads-thread blocks over rows * H threads, float or double instantiation.
template <typename Params>
cudaError_t launch(void (*f32)(Params, int64_t, int64_t), void (*f64)(Params, int64_t, int64_t), const Params& p,
                   int64_t rows, int64_t H, DType dtype, cudaStream_t stream) {
  const int64_t n = rows * H;
  if (n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  if (dtype == DType::kFloat64) {
    f64<<<blocks, kThreads, 0, stream>>>(p, rows, H);
  } else {
    f32<<<blocks, kThreads, 0, stream>>>(p, rows, H);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t lstm_forward(const LstmFwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream) {
  return launch<LstmFwd>(lstm_fwd_kernel<float>, lstm_fwd_kernel<double>, p, rows, H, dtype, stream);
}

cudaError_t lstm_backward(const LstmBwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream) {
  return launch<LstmBwd>(lstm_bwd_kernel<float>, lstm_bwd_kernel<double>, p, rows, H, dtype, stream);
}

cudaError_t gru_forward(const GruFwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream) {
  return launch<GruFwd>(gru_fwd_kernel<float>, gru_fwd_kernel<double>, p, rows, H, dtype, stream);
}

cudaError_t gru_backward(const GruBwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream) {
  return launch<GruBwd>(gru_bwd_kernel<float>, gru_bwd_kernel<double>, p, rows, H, dtype, stream);
}

}  // namespace mltoolkit::cuda_lstm
