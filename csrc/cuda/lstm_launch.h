// Raw launchers of the CUDA LSTM / GRU gate kernels (csrc/cuda/lstm.cu). Plain C++ types only, so that lstm.cu
// compiles without torch headers; csrc/cuda/lstm_cuda.cpp is the tensor glue (checks, allocation, the step loop with
// cuBLAS GEMMs through ATen). The math is the contract in csrc/lstm.h; pointer-level semantics are those of the CPU
// kernels (csrc/cpu/lstm.cpp): rows are contiguous, strides 4H (gates, saved), 3H (GRU x_proj, gh), H (states).
// A null optional pointer means "absent" (bias, cells, dout, dh_state, dc_in, saved).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace mltoolkit::cuda_lstm {

enum class DType : int { kFloat32 = 0, kFloat64 = 1 };

// pre: pre-activations (+ bias); act (may alias pre): activated (i, f, g, o); c_state: c in, c' out; h_state, out: h'.
struct LstmFwd {
  const void* pre = nullptr;
  const void* bias = nullptr;
  void* h_state = nullptr;
  void* c_state = nullptr;
  void* out = nullptr;
  void* cells = nullptr;
  void* act = nullptr;
};

// dh = dout + dh_state; dc = dh*o*(1-tanh(c)^2) + dc_in; dgates: d(pre-activations); dc_out = dc*f (may be dc_in).
struct LstmBwd {
  const void* dout = nullptr;
  const void* dh_state = nullptr;
  const void* dc_in = nullptr;
  const void* gates = nullptr;
  const void* cells = nullptr;
  const void* c_prev = nullptr;
  void* dgates = nullptr;
  void* dc_out = nullptr;
};

// h' = (1-z)*n + z*h from x_proj + gh; h_state in/out, out = h', saved = (r, z, n, gh_n).
struct GruFwd {
  const void* x_proj = nullptr;
  const void* gh = nullptr;
  void* h_state = nullptr;
  void* out = nullptr;
  void* saved = nullptr;
};

// dh = dout + dh_state; writes dx_proj, dgh and dh_state = dh*z.
struct GruBwd {
  const void* dout = nullptr;
  void* dh_state = nullptr;
  const void* saved = nullptr;
  const void* h_prev = nullptr;
  void* dx_proj = nullptr;
  void* dgh = nullptr;
};

// Each returns the launch error (cudaSuccess when rows or H is 0: nothing is launched).
cudaError_t lstm_forward(const LstmFwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream);
cudaError_t lstm_backward(const LstmBwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream);
cudaError_t gru_forward(const GruFwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream);
cudaError_t gru_backward(const GruBwd& p, int64_t rows, int64_t H, DType dtype, cudaStream_t stream);

}  // namespace mltoolkit::cuda_lstm
