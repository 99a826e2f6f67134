// CPU kernels of the fused LSTM / GRU cells and layers; the contract and the math are in lstm.h.
//
// Work layout. The LSTM layer forward is one kernel of ours (namespace fused below): register-blocked GEMMs over
// packed W_ih / W_hh panels, the gate math as the recurrent GEMM's epilogue. The LSTM / GRU backward steps and the
// GRU forward steps run the same register-blocked kernel over W_hh packed into column panels (PanelGemm), straight
// into the buffer the gate math then reads while it is still in cache (the cells: ATen's GEMM). The LSTM and GRU
// layer backwards run their steps in one parallel region, like the LSTM forward (lstm_backward_steps,
// gru_backward_steps); elsewhere the gate math is one pass over the step's (rows x H) block, at::vec::Vectorized
// lanes along H, the block cut into pieces of at least kMinElementsPerTask elements for at::parallel_for. The state
// buffers are allocated once per layer, so a step allocates nothing.
// Dtypes: float32 and float64 (fp64 for gradcheck); the Python layer sends other dtypes to the reference backend.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "check_util.h"
#include "lstm.h"
#include "reused_memory.h"
#include "scratch.h"
#include "transpose.h"

namespace mltoolkit {
namespace {

constexpr int64_t kMinElementsPerTask = 8192;

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> load(const T* p, int64_t count) {
  return count == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, count);
}

template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t count) {
  if (count == Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// sigmoid and tanh from one exponential and one division each: exp_u20 (ATen's polynomial exp, <= 20 ulp, float;
// exact exp for double) is several times cheaper than Sleef's tanh, and the gate math is ~10% of a step.
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp_u20());
}

template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) {
  const Vec<T> one(T(1)), two(T(2));
  return two / (one + (x * Vec<T>(T(-2))).exp_u20()) - one;
}

// Calls body(row, j, count) over the (rows x width) block in vector pieces, threads splitting the rows (and the
// columns when there are fewer rows than threads would take).
template <typename T, typename Body>
void for_block(int64_t rows, int64_t width, const Body& body) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t col_chunk = std::max<int64_t>(W, std::min<int64_t>(width, 256) / W * W);
  const int64_t chunks_per_row = (width + col_chunk - 1) / col_chunk;
  const int64_t units = rows * chunks_per_row;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / col_chunk);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / chunks_per_row;
      const int64_t j0 = (u % chunks_per_row) * col_chunk;
      const int64_t j1 = std::min(width, j0 + col_chunk);
      for (int64_t j = j0; j < j1; j += W) body(r, j, std::min<int64_t>(W, j1 - j));
    }
  });
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
// Pointwise gate math on raw rows (row strides: 4H for gates / saved, 3H for GRU x_proj / gh, H otherwise).

// pre: pre-activations (+ bias when given); act (may alias pre, or be null): activated (i, f, g, o) out;
// c_state: c in, c' out; h_state, out: h'; cells (or null): c'.
template <typename T>
void lstm_fwd_rows(int64_t rows, int64_t H, const T* pre, const T* bias, T* h_state, T* c_state, T* out, T* cells,
                   T* act) {
  for_block<T>(rows, H, [&](int64_t r, int64_t j, int64_t n) {
    const T* g = pre + r * 4 * H + j;
    Vec<T> pi = load(g, n), pf = load(g + H, n), pg = load(g + 2 * H, n), po = load(g + 3 * H, n);
    if (bias) {
      pi = pi + load(bias + j, n);
      pf = pf + load(bias + H + j, n);
      pg = pg + load(bias + 2 * H + j, n);
      po = po + load(bias + 3 * H + j, n);
    }
    const Vec<T> i = sigmoid(pi), f = sigmoid(pf), gg = tanh_(pg), o = sigmoid(po);
    const Vec<T> c = f * load(c_state + r * H + j, n) + i * gg;
    const Vec<T> h = o * tanh_(c);
    store(c, c_state + r * H + j, n);
    store(h, h_state + r * H + j, n);
    store(h, out + r * H + j, n);
    if (cells) store(c, cells + r * H + j, n);
    if (act) {
      T* a = act + r * 4 * H + j;
      store(i, a, n);
      store(f, a + H, n);
      store(gg, a + 2 * H, n);
      store(o, a + 3 * H, n);
    }
  });
}

// One vector piece (row r, units [j, j + n)) of the LSTM backward's gate math: dh = dout + dh_state (either may be
// null); dc_in may be null (zero); dgates: d(pre-activations); dc_out: dc.
template <typename T>
inline void lstm_bwd_vector(int64_t r, int64_t j, int64_t n, int64_t H, const T* dout, const T* dh_state,
                            const T* dc_in, const T* gates, const T* cells, const T* c_prev, T* dgates, T* dc_out) {
  const Vec<T> one(T(1)), zero(T(0));
  const int64_t k = r * H + j;
  Vec<T> dh = dout ? load(dout + k, n) : zero;
  if (dh_state) dh = dh + load(dh_state + k, n);
  const T* g = gates + r * 4 * H + j;
  const Vec<T> i = load(g, n), f = load(g + H, n), gg = load(g + 2 * H, n), o = load(g + 3 * H, n);
  const Vec<T> tc = tanh_(load(cells + k, n));
  Vec<T> dc = o * dh * (one - tc * tc);
  if (dc_in) dc = dc + load(dc_in + k, n);
  T* d = dgates + r * 4 * H + j;
  store(dc * gg * i * (one - i), d, n);
  store(dc * load(c_prev + k, n) * f * (one - f), d + H, n);
  store(dc * i * (one - gg * gg), d + 2 * H, n);
  store(dh * tc * o * (one - o), d + 3 * H, n);
  store(dc * f, dc_out + k, n);
}

template <typename T>
void lstm_bwd_rows(int64_t rows, int64_t H, const T* dout, const T* dh_state, const T* dc_in, const T* gates,
                   const T* cells, const T* c_prev, T* dgates, T* dc_out) {
  for_block<T>(rows, H, [&](int64_t r, int64_t j, int64_t n) {
    lstm_bwd_vector<T>(r, j, n, H, dout, dh_state, dc_in, gates, cells, c_prev, dgates, dc_out);
  });
}

// x_proj (3H stride) + gh (3H stride, = h @ W_hh^T + b_hh) -> h' into h_state and out; saved (r, z, n, gh_n).
template <typename T>
void gru_fwd_rows(int64_t rows, int64_t H, const T* x_proj, const T* gh, T* h_state, T* out, T* saved) {
  const Vec<T> one(T(1));
  for_block<T>(rows, H, [&](int64_t r, int64_t j, int64_t n) {
    const T* x = x_proj + r * 3 * H + j;
    const T* g = gh + r * 3 * H + j;
    const Vec<T> rr = sigmoid(load(x, n) + load(g, n));
    const Vec<T> z = sigmoid(load(x + H, n) + load(g + H, n));
    const Vec<T> ghn = load(g + 2 * H, n);
    const Vec<T> nn = tanh_(load(x + 2 * H, n) + rr * ghn);
    const int64_t k = r * H + j;
    const Vec<T> h = (one - z) * nn + z * load(h_state + k, n);
    store(h, h_state + k, n);
    store(h, out + k, n);
    if (saved) {
      T* s = saved + r * 4 * H + j;
      store(rr, s, n);
      store(z, s + H, n);
      store(nn, s + 2 * H, n);
      store(ghn, s + 3 * H, n);
    }
  });
}

// One vector piece (row r, units [j, j + n)) of the GRU backward's gate math: dh = dout + dh_state; writes dx_proj
// (d pre-activations on the input side), dgh (on the hidden side) and dh_state = dh * z (the direct path to h; the
// caller adds dgh @ W_hh).
template <typename T>
inline void gru_bwd_vector(int64_t r, int64_t j, int64_t n, int64_t H, const T* dout, T* dh_state, const T* saved,
                           const T* h_prev, T* dx_proj, T* dgh) {
  const Vec<T> one(T(1));
  const int64_t k = r * H + j;
  Vec<T> dh = load(dh_state + k, n);
  if (dout) dh = dh + load(dout + k, n);
  const T* s = saved + r * 4 * H + j;
  const Vec<T> rr = load(s, n), z = load(s + H, n), nn = load(s + 2 * H, n), ghn = load(s + 3 * H, n);
  const Vec<T> dn = dh * (one - z) * (one - nn * nn);
  const Vec<T> dz = dh * (load(h_prev + k, n) - nn) * z * (one - z);
  const Vec<T> dr = dn * ghn * rr * (one - rr);
  T* dx = dx_proj + r * 3 * H + j;
  T* dg = dgh + r * 3 * H + j;
  store(dr, dx, n);
  store(dz, dx + H, n);
  store(dn, dx + 2 * H, n);
  store(dr, dg, n);
  store(dz, dg + H, n);
  store(dn * rr, dg + 2 * H, n);
  store(dh * z, dh_state + k, n);
}

template <typename T>
void gru_bwd_rows(int64_t rows, int64_t H, const T* dout, T* dh_state, const T* saved, const T* h_prev, T* dx_proj,
                  T* dgh) {
  for_block<T>(rows, H, [&](int64_t r, int64_t j, int64_t n) {
    gru_bwd_vector<T>(r, j, n, H, dout, dh_state, saved, h_prev, dx_proj, dgh);
  });
}

// The Pointwise policy of lstm_loop (lstm.h) on CPU tensors.
struct CpuPointwise {
  void lstm_fwd(int64_t rows, const at::Tensor& pre, const at::Tensor& bias, const at::Tensor& h_state,
                const at::Tensor& c_state, const at::Tensor& out, const at::Tensor& cells,
                const at::Tensor& act) const {
    AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "lstm_fwd", [&] {
      lstm_fwd_rows<scalar_t>(rows, h_state.size(1), pre.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias),
                              h_state.mutable_data_ptr<scalar_t>(), c_state.mutable_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), mut_or_null<scalar_t>(cells),
                              mut_or_null<scalar_t>(act));
    });
  }
  void lstm_bwd(int64_t rows, const at::Tensor& dout, const at::Tensor& dh_state, const at::Tensor& dc_in,
                const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& c_prev, const at::Tensor& dgates,
                const at::Tensor& dc_out) const {
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_bwd", [&] {
      lstm_bwd_rows<scalar_t>(rows, cells.size(1), ptr_or_null<scalar_t>(dout), ptr_or_null<scalar_t>(dh_state),
                              ptr_or_null<scalar_t>(dc_in), gates.const_data_ptr<scalar_t>(),
                              cells.const_data_ptr<scalar_t>(), c_prev.const_data_ptr<scalar_t>(),
                              dgates.mutable_data_ptr<scalar_t>(), dc_out.mutable_data_ptr<scalar_t>());
    });
  }
  void gru_fwd(int64_t rows, const at::Tensor& x_proj, const at::Tensor& gh, const at::Tensor& h_state,
               const at::Tensor& out, const at::Tensor& saved) const {
    AT_DISPATCH_FLOATING_TYPES(gh.scalar_type(), "gru_fwd", [&] {
      gru_fwd_rows<scalar_t>(rows, h_state.size(1), x_proj.const_data_ptr<scalar_t>(), gh.const_data_ptr<scalar_t>(),
                             h_state.mutable_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             mut_or_null<scalar_t>(saved));
    });
  }
  void gru_bwd(int64_t rows, const at::Tensor& dout, const at::Tensor& dh_state, const at::Tensor& saved,
               const at::Tensor& h_prev, const at::Tensor& dx_proj, const at::Tensor& dgh) const {
    AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "gru_bwd", [&] {
      gru_bwd_rows<scalar_t>(rows, h_prev.size(1), ptr_or_null<scalar_t>(dout), dh_state.mutable_data_ptr<scalar_t>(),
                             saved.const_data_ptr<scalar_t>(), h_prev.const_data_ptr<scalar_t>(),
                             dx_proj.mutable_data_ptr<scalar_t>(), dgh.mutable_data_ptr<scalar_t>());
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------
// a^T b for a (K, M), b (K, N), float32: both transposed into kept scratch (blocked, in parallel; .t().contiguous()
// into fresh tensors took ~20 ms for 32 MB here, mostly page faults), then oneDNN's matmul, ~2.2x at::mm's MKL sgemm
// on this AMD VM (450 against 200 GFLOP/s). The LSTM / GRU backward's weight gradients (dpre^T x, dpre^T h_prev).
// Other dtypes, empty sizes, or a torch without oneDNN's op: at::mm on the transposed view.
at::Tensor gemm_tn_impl(const at::Tensor& a_in, const at::Tensor& b_in) {
  static const auto linear = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  const int64_t K = a_in.size(0), M = a_in.size(1), N = b_in.size(1);
  if (a_in.scalar_type() != at::kFloat || b_in.scalar_type() != at::kFloat || !at::hasMKLDNN() || !linear ||
      K == 0 || M == 0 || N == 0) {
    return at::mm(a_in.t(), b_in);
  }
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const KeptScratch scratch("gemm_tn_cpu", (M + N) * K * static_cast<int64_t>(sizeof(float)));
  float* const at_ = scratch.as<float>();  // a^T (M, K), then b^T (N, K)
  float* const bt_ = at_ + M * K;
  constexpr int64_t kRows = 64;  // rows of a / b per task
  at::parallel_for(0, (K + kRows - 1) / kRows, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kRows, rows = std::min(kRows, K - k0);
      cpu::transpose(a.const_data_ptr<float>() + k0 * M, M, at_ + k0, K, rows, M);
      cpu::transpose(b.const_data_ptr<float>() + k0 * N, N, bt_ + k0, K, rows, N);
    }
  });
  const auto opts = a.options();
  std::vector<c10::IValue> stack{at::from_blob(at_, {M, K}, opts), at::from_blob(bt_, {N, K}, opts), c10::IValue(),
                                 c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue(std::string(""))};
  try {
    linear->callBoxed(stack);
  } catch (const std::exception&) {
    return at::mm(a.t(), b);
  }
  return stack.at(0).toTensor();  // a new tensor: nothing refers to the scratch
}

// ---------------------------------------------------------------------------------------------------------------
// Input checks: every message names the function and the argument.

void check_cpu(const char* fn, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense tensor, got layout ", t.layout());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, " (like the first input), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ", shape_str(t.strides()),
              " for shape ", shape_str(t.sizes()));
}

void check_shape(const char* fn, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, fn, ": ", name, " must have shape ", shape_str(expected), ", got ",
              shape_str(t.sizes()));
}

// The first input: 2-D, float32/float64, width a multiple `gates` of H. Returns (rows, H) with H from w_hh.
at::ScalarType check_first(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.dim() == 2, fn, ": ", name, " must be a 2-D tensor, got ",
              t.defined() ? shape_str(t.sizes()) : std::string("an undefined one"));
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, fn, ": ", name, " must be float32 or float64, got ", dtype);
  check_cpu(fn, name, t, dtype);
  return dtype;
}

// w_hh (gates*H, H); returns H.
int64_t check_w_hh(const char* fn, const at::Tensor& w, int64_t gates, at::ScalarType dtype) {
  check_cpu(fn, "w_hh", w, dtype);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == gates * w.size(1) && w.size(1) >= 1, fn, ": w_hh must have shape (",
              gates, "*H, H) with H >= 1, got ", shape_str(w.sizes()));
  return w.size(1);
}

// The LSTM cell's w_hh (4H, K): K = H for a plain LSTM, the projection size P for an LSTM with projections (the
// state h then has width K, c width H). Returns H.
int64_t check_lstm_cell_w_hh(const char* fn, const at::Tensor& w, at::ScalarType dtype) {
  check_cpu(fn, "w_hh", w, dtype);
  TORCH_CHECK(w.dim() == 2 && w.size(0) >= 4 && w.size(0) % 4 == 0 && w.size(1) >= 1, fn,
              ": w_hh must have shape (4*H, K) with H, K >= 1 (K = H, or the projection size), got ",
              shape_str(w.sizes()));
  return w.size(0) / 4;
}

// ---------------------------------------------------------------------------------------------------------------
// The LSTM layer forward, our kernel end to end. The weights are packed once per call into panels that hold, for U =
// one vector of hidden units, the 4U columns of their four gates (i, f, g, o), so a register tile's four accumulator
// vectors are the four gates of the same U units of its rows and the gate math runs as the GEMM's epilogue, on the
// pre-activations still in registers. Threads split the panels (hidden units): each owns its units' c.
// Steps go in chunks: first the input projection of the chunk's rows (x @ W_ih^T, a GEMM of many rows that reads each
// W_ih panel once per chunk) into a buffer in panel order, then per step the recurrent GEMM h_{t-1} @ W_hh^T over W_hh
// panels alone (with small batches they stay in L2 between steps; W_ih + W_hh would not), its epilogue adding the
// buffered projection. Measured on the dev VM (Zen 4, AVX-512), the tile loop runs at ~86% of the FMA peak in place.
namespace fused {

// Rows of a register tile: 4 rows x 4 vectors = 16 accumulators with AVX-512 (32 registers), 2 x 4 otherwise (16).
template <typename T>
constexpr int kTileRows = Vec<T>::size() * sizeof(T) >= 64 ? 4 : 2;

// Bytes of projected pre-activations buffered per chunk of steps (stays in L3).
constexpr int64_t kChunkBytes = int64_t{2} << 20;

// Keeps a loaded vector in a register: without it GCC folds the B loads into every FMA's memory operand, one load per
// FMA, and the loop runs load-bound at half the FMA rate (measured).
template <typename T>
inline void in_register(Vec<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  std::conditional_t<std::is_same_v<T, float>, __m512, __m512d> r = v;
  asm volatile("" : "+v"(r));
  v = r;
#elif defined(CPU_CAPABILITY_AVX2)
  std::conditional_t<std::is_same_v<T, float>, __m256, __m256d> r = v;
  asm volatile("" : "+x"(r));
  v = r;
#else
  (void)v;
#endif
}

// Elements of (P, K, 4U) panels, rounded up to whole 64-byte lines.
template <typename T>
int64_t panel_elements(int64_t K, int64_t H) {
  constexpr int64_t U = Vec<T>::size();
  return ((H + U - 1) / U * K * 4 * U * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64 / sizeof(T);
}

// W (4H, K) -> panels (P, K, 4U) at dst: panel p, row k holds, for each gate g, W[g*H + p*U + u][k] for u < U (zero
// past H).
template <typename T>
void pack_panels(const T* w, int64_t K, int64_t H, T* dst) {
  constexpr int64_t U = Vec<T>::size();
  const int64_t P = (H + U - 1) / U;
  if (H % U) std::fill_n(dst + (P - 1) * K * 4 * U, K * 4 * U, T(0));
  at::parallel_for(0, P * 4, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pg = begin; pg < end; ++pg) {
      const int64_t p = pg / 4, g = pg % 4, units = std::min(U, H - p * U);
      cpu::transpose(w + (g * H + p * U) * K, K, dst + p * K * 4 * U + g * U, 4 * U, units, K);
    }
  });
}

// acc[r][g] = sum_k a[r][k] * panel[k][g*U .. g*U + U) over the tile's R rows. [pf, pf_end): lines of the next panel
// to pull into L2 meanwhile, one 64-byte line per k (pf advances).
template <typename T, int R>
inline void panel_tile(const T* const* a, int64_t K, const T* panel, Vec<T> (&acc)[R][4], const char*& pf,
                       const char* pf_end) {
  constexpr int64_t U = Vec<T>::size();
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) acc[r][g] = Vec<T>(T(0));
  const T* b = panel;
  for (int64_t k = 0; k < K; ++k, b += 4 * U) {
    if (pf < pf_end) {
      __builtin_prefetch(pf, 0, 2);
      pf += 64;
    }
    Vec<T> bv[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      bv[g] = Vec<T>::loadu(b + g * U);
      in_register(bv[g]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const Vec<T> av(a[r][k]);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) acc[r][g] = at::vec::fmadd(av, bv[g], acc[r][g]);
    }
  }
}

// Runs tile(p, r0, rows_in_tile, acc) for the row tiles of `rows` rows (row r of a[] at base + r * ld) over the
// panels [p0, p1) of K rows each, prefetching each next panel. A partial tile repeats its last row.
template <typename T, typename Tile>
void for_tiles(const T* base, int64_t ld, int64_t rows, const T* panels, int64_t K, int64_t p0, int64_t p1,
               const Tile& tile) {
  constexpr int R = kTileRows<T>;
  constexpr int64_t U = Vec<T>::size();
  for (int64_t p = p0; p < p1; ++p) {
    const T* panel = panels + p * K * 4 * U;
    const char* pf = reinterpret_cast<const char*>(panel + K * 4 * U);
    const char* pf_end = p + 1 < p1 ? pf + K * 4 * U * sizeof(T) : pf;
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
      const T* a[R];
      for (int r = 0; r < R; ++r) a[r] = base + std::min(r0 + r, rows - 1) * ld;
      Vec<T> acc[R][4];
      panel_tile<T, R>(a, K, panel, acc, pf, pf_end);
      tile(p, r0, std::min<int64_t>(R, rows - r0), acc);
    }
  }
}

template <typename T>
struct LayerArgs {
  const T* x;          // the layer input (N, I) with w_ih (packed), or null
  const T* x_proj;     // without w_ih: the projection (N, 4H) in torch's gate layout
  const T* bias;       // (4H) or null
  const T *w_ih, *w_hh;  // packed panels (P, I, 4U), (P, H, 4U)
  int64_t I, H, B, P;
  T* xp;               // the chunk's projection (rows, P * 4U), panel order
  T *out, *c, *gates, *cells;  // c: the running cell state (B, H); gates / cells null unless saving
};

// The input projection of rows [row0, row0 + rows) for the panels [p0, p1) into a.xp (panel order).
template <typename T>
void project_panels(const LayerArgs<T>& a, int64_t row0, int64_t rows, int64_t p0, int64_t p1) {
  constexpr int64_t U = Vec<T>::size();
  const int64_t ld = a.P * 4 * U;
  for_tiles<T>(a.x + row0 * a.I, a.I, rows, a.w_ih, a.I, p0, p1, [&](int64_t p, int64_t r0, int64_t n, auto& acc) {
    for (int64_t r = 0; r < n; ++r)
      for (int g = 0; g < 4; ++g) acc[r][g].store(a.xp + (r0 + r) * ld + p * 4 * U + g * U);
  });
}

// One step over the panels [p0, p1): rows [off, off + rows), h_prev / h_next (B, H) the state buffers; the projected
// rows are a.xp's from row xp_row (with w_ih) or a.x_proj's.
template <typename T>
void step_panels(const LayerArgs<T>& a, int64_t off, int64_t rows, int64_t xp_row, const T* h_prev, T* h_next,
                 int64_t p0, int64_t p1) {
  constexpr int64_t U = Vec<T>::size();
  const int64_t H = a.H;
  // Projected pre-activation of (row i, gate g, panel p): panel order in xp, torch's gate layout in x_proj.
  const T* proj = a.x ? a.xp + xp_row * a.P * 4 * U : a.x_proj + off * 4 * H;
  const int64_t ld = a.x ? a.P * 4 * U : 4 * H, gate_step = a.x ? U : H, panel_step = a.x ? 4 * U : U;
  for_tiles<T>(h_prev, H, rows, a.w_hh, H, p0, p1, [&](int64_t p, int64_t r0, int64_t n, auto& acc) {
    const int64_t j = p * U, units = std::min(U, H - j);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = r0 + r, row = off + i;
      const T* pr = proj + i * ld + p * panel_step;
      Vec<T> pre[4];
      for (int g = 0; g < 4; ++g) {
        pre[g] = acc[r][g] + Vec<T>::loadu(pr + g * gate_step, a.x ? U : units);
        if (a.bias) pre[g] = pre[g] + load(a.bias + g * H + j, units);
      }
      const Vec<T> ig = sigmoid(pre[0]), fg = sigmoid(pre[1]), gg = tanh_(pre[2]), og = sigmoid(pre[3]);
      T* c = a.c + i * H + j;
      const Vec<T> cv = fg * load(c, units) + ig * gg;
      const Vec<T> hv = og * tanh_(cv);
      store(cv, c, units);
      store(hv, h_next + i * H + j, units);
      store(hv, a.out + row * H + j, units);
      if (a.gates) {
        T* gs = a.gates + row * 4 * H + j;
        store(ig, gs, units);
        store(fg, gs + H, units);
        store(gg, gs + 2 * H, units);
        store(og, gs + 3 * H, units);
        store(cv, a.cells + row * H + j, units);
      }
    }
  });
  for (int64_t p = p0; p < p1; ++p) {  // idle rows keep their state
    const int64_t j = p * U, units = std::min(U, H - j);
    for (int64_t i = rows; i < a.B; ++i) std::copy_n(h_prev + i * H + j, units, h_next + i * H + j);
  }
}

// Steps per chunk: the chunk's projection (B rows a step, in panel order) takes about kChunkBytes.
template <typename T>
int64_t chunk_steps(int64_t B, int64_t P) {
  return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, B * P * 4 * Vec<T>::size() * sizeof(T)));
}

// Threads for a layer's steps: at most one per panel and one per ~0.5 MFLOP of a step's GEMM; one inside another
// parallel region.
inline int64_t team_size(int64_t panels, int64_t step_flops) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), panels,
                                                 step_flops >> 19}));
}

// Runs body(tid, team) on a team of `threads` OpenMP threads (one parallel region for a whole layer).
template <typename Body>
void run_team(int64_t threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  body(0, 1);
}

// Every thread of the team waits for the others (between two steps that share data).
inline void team_barrier(int64_t team) {
#ifdef _OPENMP
  if (team > 1) {
#pragma omp barrier
  }
#endif
}

// Runs the steps; h (2, B, H) holds h0 in h[0] on entry. Returns the index of the buffer that holds h_n.
// One parallel region for the whole layer: each thread keeps the same panels (hidden units) throughout, so a chunk's
// projection and its steps' epilogues touch only the thread's own columns of xp and c, and the only barrier needed
// is the one between steps (every thread reads all of h_{t-1}).
template <typename T>
int64_t run_layer(const LayerArgs<T>& a, const lstm_loop::Steps& s, bool reverse, T* h) {
  const int64_t chunk = chunk_steps<T>(a.B, a.P);
  const int64_t threads = team_size(a.P, 8 * a.B * a.H * a.H);
  auto body = [&](int64_t tid, int64_t team) {
    const int64_t p0 = a.P * tid / team, p1 = a.P * (tid + 1) / team;
    int64_t cur = 0;
    for (int64_t k0 = 0; k0 < s.count(); k0 += chunk) {
      const int64_t k1 = std::min(s.count(), k0 + chunk);
      // The chunk's rows are contiguous: steps t0..t1 forward, t1..t0 reverse.
      const int64_t ta = lstm_loop::step_at(s, k0, reverse), tb = lstm_loop::step_at(s, k1 - 1, reverse);
      const int64_t first = std::min(ta, tb), last = std::max(ta, tb);
      const int64_t row0 = s.offset[first], rows = s.offset[last] + s.size[last] - row0;
      if (a.x) project_panels(a, row0, rows, p0, p1);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = lstm_loop::step_at(s, k, reverse);
        step_panels(a, s.offset[t], s.size[t], s.offset[t] - row0, h + cur * a.B * a.H, h + (1 - cur) * a.B * a.H,
                    p0, p1);
        cur = 1 - cur;
        team_barrier(team);
      }
    }
  };
  run_team(threads, body);
  return s.count() % 2;
}

// B (K, N) row-major -> column panels (P, K, 4U) at dst, P = ceil(N / 4U): panel p, row k holds B[k][p*4U ..
// p*4U + 4U) (zero past N), the layout panel_tile reads for a plain product a @ B.
template <typename T>
int64_t column_panel_elements(int64_t K, int64_t N) {
  constexpr int64_t U4 = 4 * Vec<T>::size();
  return (N + U4 - 1) / U4 * K * U4;
}

template <typename T>
void pack_columns(const T* b, int64_t K, int64_t N, T* dst) {
  constexpr int64_t U4 = 4 * Vec<T>::size();
  const int64_t P = (N + U4 - 1) / U4;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j = p * U4, cols = std::min(U4, N - j);
      T* panel = dst + p * K * U4;
      for (int64_t k = 0; k < K; ++k) {
        std::copy_n(b + k * N + j, cols, panel + k * U4);
        std::fill(panel + k * U4 + cols, panel + (k + 1) * U4, T(0));
      }
    }
  });
}

}  // namespace fused

// The recurrent GEMM of the LSTM / GRU backward steps, dh = dgates @ W_hh (+ addend), and of the GRU forward steps
// (over W_hh^T, + b_hh), with our register-blocked kernel over the weight packed once per layer call into column
// panels (fused::pack_columns; in the backward no transpose: W_hh (G*H, H) is already the (K, N) operand), written
// straight into the running state: no per-call primitive lookup, no fresh output tensor, no copy. Measured on the
// dev VM (2 threads) against oneDNN's matmul with a reordered weight: about 15 against 50 us a step for
// 8 x 1024 @ 1024 x 256, and no slower at 32 x 2048 @ 2048 x 512.
template <typename T>
class PanelGemm {
 public:
  explicit PanelGemm(const at::Tensor& w) : K_(w.size(0)), N_(w.size(1)) {
    packed_ = at::empty({fused::column_panel_elements<T>(K_, N_)}, w.options());
    fused::pack_columns<T>(w.const_data_ptr<T>(), K_, N_, packed_.mutable_data_ptr<T>());
  }

  // a^T b (the weight gradient over every row): gemm_tn_impl.
  at::Tensor tn(const at::Tensor& a, const at::Tensor& b) const { return gemm_tn_impl(a, b); }

  // into = a_rows @ W (+ add, which may be into itself), a_rows (rows, K) and into / add (rows, N) with unit column
  // stride, or add an (N,) bias. Returns into.
  at::Tensor operator()(const at::Tensor& add, const at::Tensor& a_rows, at::Tensor into) const {
    const int64_t rows = a_rows.size(0);
    if (rows == 0) return into;
    const T* a = a_rows.const_data_ptr<T>();
    const int64_t lda = a_rows.stride(0), ldo = into.stride(0);
    const T* addp = add.defined() ? add.const_data_ptr<T>() : nullptr;
    const int64_t ldadd = add.defined() && add.dim() == 2 ? add.stride(0) : 0;  // a 1-D add: a bias on every row
    T* out = into.mutable_data_ptr<T>();
    // One task per ~0.5 MFLOP of the product, at most one per panel.
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(panels(), flops(rows) >> 19));
    at::parallel_for(0, panels(), (panels() + tasks - 1) / tasks, [&](int64_t p0, int64_t p1) {
      run_panels(a, lda, rows, addp, ldadd, out, ldo, p0, p1);
    });
    return into;
  }

  int64_t panels() const { return (N_ + 4 * Vec<T>::size() - 1) / (4 * Vec<T>::size()); }
  int64_t flops(int64_t rows) const { return 2 * rows * K_ * N_; }

  // out[:rows, columns of panels [p0, p1)] = a[:rows] @ W (+ add): the caller's share of operator()'s work.
  void run_panels(const T* a, int64_t lda, int64_t rows, const T* addp, int64_t ldadd, T* out, int64_t ldo,
                  int64_t p0, int64_t p1) const {
    constexpr int64_t U = Vec<T>::size();
    fused::for_tiles<T>(a, lda, rows, packed_.const_data_ptr<T>(), K_, p0, p1,
                        [&](int64_t p, int64_t r0, int64_t n, auto& acc) {
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = r0 + r;
        for (int g = 0; g < 4; ++g) {
          const int64_t j = p * 4 * U + g * U;
          if (j >= N_) break;
          const int64_t cols = std::min(U, N_ - j);
          Vec<T> v = acc[r][g];
          if (addp) v = v + load(addp + i * ldadd + j, cols);
          store(v, out + i * ldo + j, cols);
        }
      }
    });
  }

 private:
  int64_t K_, N_;
  at::Tensor packed_;
};

// A recurrent layer's backward steps in one parallel region, as run_layer does the LSTM forward's: each thread owns
// the hidden units [j0, j1) of its column panels of W_hh. Per step (last to first) it runs gate_math(off, rows, j0,
// j1), the step's gate gradients for its units (their columns of dgates, of the running dh and of any other state),
// then, after one barrier (the GEMM reads every column of dgates), its share of dh = dgates @ W_hh (+ dh when add_dh:
// the GRU's direct path dh * z, which its gate math leaves in dh). The generic loops (lstm_loop, the CUDA backend's)
// forked and joined a team for every step's GEMM here and ran the gate math on one thread at small batches.
// dh (B, H): the running gradient (dh_n on entry, dh0 on return); dgates (N, G*H): the hidden-side gate gradients.
template <typename T, typename GateMath>
void recurrent_backward_steps(const PanelGemm<T>& gemm, const lstm_loop::Steps& s, bool reverse, int64_t H,
                              int64_t gate_width, T* dgates, T* dh, bool add_dh, const GateMath& gate_math) {
  constexpr int64_t U = Vec<T>::size();
  const int64_t P = gemm.panels(), B = s.count() > 0 ? s.size[0] : 0;
  auto body = [&](int64_t tid, int64_t team) {
    const int64_t p0 = P * tid / team, p1 = P * (tid + 1) / team;
    const int64_t j0 = std::min(H, p0 * 4 * U), j1 = std::min(H, p1 * 4 * U);
    for (int64_t k = s.count() - 1; k >= 0; --k) {
      const int64_t t = lstm_loop::step_at(s, k, reverse), off = s.offset[t], rows = s.size[t];
      gate_math(off, rows, j0, j1);
      fused::team_barrier(team);
      gemm.run_panels(dgates + off * gate_width, gate_width, rows, add_dh ? dh : nullptr, H, dh, H, p0, p1);
    }
  };
  fused::run_team(fused::team_size(P, gemm.flops(B)), body);
}

// The LSTM layer's: dh, dc (B, H) running (dh_n / dc_n on entry, dh0 / dc0 on return); dgates = dx_proj (N, 4H).
template <typename T>
void lstm_backward_steps(const PanelGemm<T>& gemm, const lstm_loop::Steps& s, bool reverse, int64_t H, const T* dout,
                         const T* gates, const T* cells, const T* c_prev, T* dh, T* dc, T* dgates) {
  constexpr int64_t U = Vec<T>::size();
  recurrent_backward_steps<T>(gemm, s, reverse, H, 4 * H, dgates, dh, false,
                              [&](int64_t off, int64_t rows, int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = j0; j < j1; j += U)
        lstm_bwd_vector<T>(r, j, std::min(U, j1 - j), H, dout + off * H, dh, dc, gates + off * 4 * H,
                           cells + off * H, c_prev + off * H, dgates + off * 4 * H, dc);
  });
}

// The GRU layer's: dh (B, H) running (dh_n on entry, dh0 on return); dx_proj, dgh (N, 3H): the input- and
// hidden-side gate gradients.
template <typename T>
void gru_backward_steps(const PanelGemm<T>& gemm, const lstm_loop::Steps& s, bool reverse, int64_t H, const T* dout,
                        const T* saved, const T* h_prev, T* dh, T* dx_proj, T* dgh) {
  constexpr int64_t U = Vec<T>::size();
  recurrent_backward_steps<T>(gemm, s, reverse, H, 3 * H, dgh, dh, true,
                              [&](int64_t off, int64_t rows, int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = j0; j < j1; j += U)
        gru_bwd_vector<T>(r, j, std::min(U, j1 - j), H, dout + off * H, dh, saved + off * 4 * H, h_prev + off * H,
                          dx_proj + off * 3 * H, dgh + off * 3 * H);
  });
}

// An optional bias (width,): absent, or a contiguous CPU vector of the first input's dtype.
void check_optional_bias(const char* fn, const char* name, const std::optional<at::Tensor>& bias, int64_t width,
                         at::ScalarType dtype) {
  if (!present(bias)) return;
  check_cpu(fn, name, *bias, dtype);
  check_shape(fn, name, *bias, {width});
}

}  // namespace

// ---- cells ------------------------------------------------------------------------------------------------------

std::vector<at::Tensor> lstm_cell_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& c,
                                              const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh) {
  constexpr const char* fn = "lstm_cell_forward_cpu";
  const auto dtype = check_first(fn, "x_proj", x_proj);
  const int64_t H = check_lstm_cell_w_hh(fn, w_hh, dtype), K = w_hh.size(1);
  const int64_t B = x_proj.size(0);
  check_shape(fn, "x_proj", x_proj, {B, 4 * H});
  check_cpu(fn, "h", h, dtype);
  check_shape(fn, "h", h, {B, K});
  check_cpu(fn, "c", c, dtype);
  check_shape(fn, "c", c, {B, H});
  check_optional_bias(fn, "b_hh", b_hh, 4 * H, dtype);
  at::Tensor gates = at::addmm(x_proj, h, w_hh.t());
  at::Tensor h_new = at::empty({B, H}, x_proj.options());
  at::Tensor c_new = c.clone();
  at::Tensor h_state = at::empty({B, H}, x_proj.options());
  CpuPointwise{}.lstm_fwd(B, gates, present(b_hh) ? *b_hh : at::Tensor(), h_state, c_new, h_new, at::Tensor(), gates);
  return {h_new, c_new, gates};
}

std::vector<at::Tensor> lstm_cell_backward_cpu(const at::Tensor& dh, const std::optional<at::Tensor>& dc,
                                               const at::Tensor& gates, const at::Tensor& c,
                                               const at::Tensor& c_new) {
  constexpr const char* fn = "lstm_cell_backward_cpu";
  const auto dtype = check_first(fn, "dh", dh);
  const int64_t B = dh.size(0), H = dh.size(1);
  check_cpu(fn, "gates", gates, dtype);
  check_shape(fn, "gates", gates, {B, 4 * H});
  check_cpu(fn, "c", c, dtype);
  check_shape(fn, "c", c, {B, H});
  check_cpu(fn, "c_new", c_new, dtype);
  check_shape(fn, "c_new", c_new, {B, H});
  if (present(dc)) {
    check_cpu(fn, "dc", *dc, dtype);
    check_shape(fn, "dc", *dc, {B, H});
  }
  at::Tensor dgates = at::empty({B, 4 * H}, dh.options());
  at::Tensor dc_prev = at::empty({B, H}, dh.options());
  CpuPointwise{}.lstm_bwd(B, dh, at::Tensor(), present(dc) ? *dc : at::Tensor(), gates, c_new, c, dgates, dc_prev);
  return {dgates, dc_prev};
}

std::vector<at::Tensor> gru_cell_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& w_hh,
                                             const std::optional<at::Tensor>& b_hh) {
  constexpr const char* fn = "gru_cell_forward_cpu";
  const auto dtype = check_first(fn, "x_proj", x_proj);
  const int64_t H = check_w_hh(fn, w_hh, 3, dtype);
  const int64_t B = x_proj.size(0);
  check_shape(fn, "x_proj", x_proj, {B, 3 * H});
  check_cpu(fn, "h", h, dtype);
  check_shape(fn, "h", h, {B, H});
  check_optional_bias(fn, "b_hh", b_hh, 3 * H, dtype);
  at::Tensor gh = present(b_hh) ? at::addmm(*b_hh, h, w_hh.t()) : at::mm(h, w_hh.t());
  at::Tensor h_new = at::empty({B, H}, x_proj.options());
  at::Tensor h_state = h.clone();
  at::Tensor saved = at::empty({B, 4 * H}, x_proj.options());
  CpuPointwise{}.gru_fwd(B, x_proj, gh, h_state, h_new, saved);
  return {h_new, saved};
}

std::vector<at::Tensor> gru_cell_backward_cpu(const at::Tensor& dh, const at::Tensor& saved, const at::Tensor& h) {
  constexpr const char* fn = "gru_cell_backward_cpu";
  const auto dtype = check_first(fn, "dh", dh);
  const int64_t B = dh.size(0), H = dh.size(1);
  check_cpu(fn, "saved", saved, dtype);
  check_shape(fn, "saved", saved, {B, 4 * H});
  check_cpu(fn, "h", h, dtype);
  check_shape(fn, "h", h, {B, H});
  at::Tensor dh_direct = dh.clone();
  at::Tensor dx_proj = at::empty({B, 3 * H}, dh.options());
  at::Tensor dgh = at::empty({B, 3 * H}, dh.options());
  CpuPointwise{}.gru_bwd(B, at::Tensor(), dh_direct, saved, h, dx_proj, dgh);
  return {dx_proj, dgh, dh_direct};
}

// ---- layers -----------------------------------------------------------------------------------------------------

std::vector<at::Tensor> lstm_layer_forward_cpu(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                               const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save) {
  constexpr const char* fn = "lstm_layer_forward_cpu";
  const bool project = present(w_ih);
  const auto dtype = check_first(fn, project ? "x" : "x_proj", x);
  const int64_t H = check_w_hh(fn, w_hh, 4, dtype), N = x.size(0);
  int64_t I = 0;
  if (project) {
    check_cpu(fn, "w_ih", *w_ih, dtype);
    TORCH_CHECK(w_ih->dim() == 2 && w_ih->size(0) == 4 * H, fn, ": w_ih must have shape (4*H=", 4 * H, ", I), got ",
                shape_str(w_ih->sizes()));
    I = w_ih->size(1);
    check_shape(fn, "x", x, {N, I});
  } else {
    check_shape(fn, "x_proj", x, {N, 4 * H});
  }
  check_optional_bias(fn, "bias", bias, 4 * H, dtype);
  check_cpu(fn, "h0", h0, dtype);
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == H, fn, ": h0 must have shape (B, H=", H, "), got ",
              shape_str(h0.sizes()));
  check_cpu(fn, "c0", c0, dtype);
  check_shape(fn, "c0", c0, h0.sizes());
  const int64_t B = h0.size(0);
  const lstm_loop::Steps steps = lstm_loop::make_steps(fn, batch_sizes, N, B);
  at::Tensor out = empty_reusing_memory({N, H}, x.options());
  at::Tensor c_n = c0.clone();
  at::Tensor h = at::empty({2, B, H}, x.options());
  h[0].copy_(h0);
  at::Tensor gates = save ? empty_reusing_memory({N, 4 * H}, x.options()) : at::empty({0}, x.options());
  at::Tensor cells = save ? empty_reusing_memory({N, H}, x.options()) : at::empty({0}, x.options());
  int64_t last = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstm_layer_forward", [&] {
    using T = scalar_t;
    constexpr int64_t U = Vec<T>::size();
    const int64_t P = (H + U - 1) / U;
    const int64_t hh = fused::panel_elements<T>(H, H), ih = project ? fused::panel_elements<T>(I, H) : 0;
    const int64_t xp = project ? std::min(fused::chunk_steps<T>(B, P), steps.count()) * B * P * 4 * U : 0;
    const KeptScratch scratch("lstm_layer_forward_cpu", (hh + ih + xp) * static_cast<int64_t>(sizeof(T)));
    T* const packed = reinterpret_cast<T*>(scratch.data());
    fused::pack_panels<T>(w_hh.const_data_ptr<T>(), H, H, packed);
    if (project) fused::pack_panels<T>(w_ih->const_data_ptr<T>(), I, H, packed + hh);
    const fused::LayerArgs<T> args{project ? x.const_data_ptr<T>() : nullptr,
                                   project ? nullptr : x.const_data_ptr<T>(),
                                   present(bias) ? bias->const_data_ptr<T>() : nullptr,
                                   project ? packed + hh : nullptr,
                                   packed,
                                   I, H, B, P, project ? packed + hh + ih : nullptr,
                                   out.mutable_data_ptr<T>(), c_n.mutable_data_ptr<T>(),
                                   save ? gates.mutable_data_ptr<T>() : nullptr,
                                   save ? cells.mutable_data_ptr<T>() : nullptr};
    last = fused::run_layer<T>(args, steps, reverse, h.mutable_data_ptr<T>());
  });
  return {out, h[last].clone(), c_n, gates, cells};
}

std::vector<at::Tensor> lstm_layer_backward_cpu(const at::Tensor& dout, const at::Tensor& dh_n,
                                                const at::Tensor& dc_n, const at::Tensor& gates,
                                                const at::Tensor& cells, const at::Tensor& out, const at::Tensor& h0,
                                                const at::Tensor& c0, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  constexpr const char* fn = "lstm_layer_backward_cpu";
  const auto dtype = check_first(fn, "dout", dout);
  const int64_t H = check_w_hh(fn, w_hh, 4, dtype);
  const int64_t N = dout.size(0);
  check_shape(fn, "dout", dout, {N, H});
  check_cpu(fn, "h0", h0, dtype);
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == H, fn, ": h0 must have shape (B, H=", H, "), got ",
              shape_str(h0.sizes()));
  const int64_t B = h0.size(0);
  const std::pair<const char*, const at::Tensor*> states[] = {{"dh_n", &dh_n}, {"dc_n", &dc_n}, {"c0", &c0}};
  for (const auto& [name, t] : states) {
    check_cpu(fn, name, *t, dtype);
    check_shape(fn, name, *t, {B, H});
  }
  check_cpu(fn, "gates", gates, dtype);
  check_shape(fn, "gates", gates, {N, 4 * H});
  check_cpu(fn, "cells", cells, dtype);
  check_shape(fn, "cells", cells, {N, H});
  check_cpu(fn, "out", out, dtype);
  check_shape(fn, "out", out, {N, H});
  const lstm_loop::Steps steps = lstm_loop::make_steps(fn, batch_sizes, N, B);
  at::Tensor dh = dh_n.clone(), dc = dc_n.clone();
  at::Tensor dx_proj = empty_reusing_memory({N, 4 * H}, dout.options());
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstm_layer_backward", [&] {
    using T = scalar_t;
    const PanelGemm<T> gemm(w_hh);
    const at::Tensor c_prev = lstm_loop::gather_prev(steps, cells, c0, reverse);
    lstm_backward_steps<T>(gemm, steps, reverse, H, dout.const_data_ptr<T>(), gates.const_data_ptr<T>(),
                           cells.const_data_ptr<T>(), c_prev.const_data_ptr<T>(), dh.mutable_data_ptr<T>(),
                           dc.mutable_data_ptr<T>(), dx_proj.mutable_data_ptr<T>());
    dw = gemm.tn(dx_proj, lstm_loop::gather_prev(steps, out, h0, reverse));  // dw_hh: one GEMM over every row
  });
  return {dx_proj, dh, dc, dw};
}

std::vector<at::Tensor> gru_layer_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
                                              const std::optional<at::Tensor>& b_hh,
                                              const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save) {
  constexpr const char* fn = "gru_layer_forward_cpu";
  const auto dtype = check_first(fn, "x_proj", x_proj);
  const int64_t H = check_w_hh(fn, w_hh, 3, dtype);
  const int64_t N = x_proj.size(0);
  check_shape(fn, "x_proj", x_proj, {N, 3 * H});
  check_cpu(fn, "h0", h0, dtype);
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == H, fn, ": h0 must have shape (B, H=", H, "), got ",
              shape_str(h0.sizes()));
  check_optional_bias(fn, "b_hh", b_hh, 3 * H, dtype);
  const lstm_loop::Steps steps = lstm_loop::make_steps(fn, batch_sizes, N, h0.size(0));
  at::Tensor out = empty_reusing_memory({N, H}, x_proj.options());
  at::Tensor h_n = h0.clone();
  at::Tensor saved = save ? empty_reusing_memory({N, 4 * H}, x_proj.options()) : at::empty({0}, x_proj.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gru_layer_forward", [&] {
    lstm_loop::gru_forward(CpuPointwise{}, PanelGemm<scalar_t>(w_hh.t().contiguous()), steps, x_proj, 3 * H, b_hh,
                           reverse, save, out, h_n, saved);
  });
  return {out, h_n, saved};
}

at::Tensor gemm_tn_cpu(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* fn = "gemm_tn_cpu";
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), fn,
              ": a (K, M) and b (K, N) must be 2-D with one K, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), fn, ": a and b must be CPU tensors");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), fn, ": a and b must have one dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  return gemm_tn_impl(a, b);
}

std::vector<at::Tensor> gru_layer_backward_cpu(const at::Tensor& dout, const at::Tensor& dh_n,
                                               const at::Tensor& saved, const at::Tensor& out, const at::Tensor& h0,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& batch_sizes,
                                               bool reverse, bool has_bias) {
  constexpr const char* fn = "gru_layer_backward_cpu";
  const auto dtype = check_first(fn, "dout", dout);
  const int64_t H = check_w_hh(fn, w_hh, 3, dtype);
  const int64_t N = dout.size(0);
  check_shape(fn, "dout", dout, {N, H});
  check_cpu(fn, "h0", h0, dtype);
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == H, fn, ": h0 must have shape (B, H=", H, "), got ",
              shape_str(h0.sizes()));
  const int64_t B = h0.size(0);
  check_cpu(fn, "dh_n", dh_n, dtype);
  check_shape(fn, "dh_n", dh_n, {B, H});
  check_cpu(fn, "saved", saved, dtype);
  check_shape(fn, "saved", saved, {N, 4 * H});
  check_cpu(fn, "out", out, dtype);
  check_shape(fn, "out", out, {N, H});
  const lstm_loop::Steps steps = lstm_loop::make_steps(fn, batch_sizes, N, B);
  at::Tensor dh = dh_n.clone();
  at::Tensor dx_proj = empty_reusing_memory({N, 3 * H}, dout.options());
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(dtype, "gru_layer_backward", [&] {
    using T = scalar_t;
    const PanelGemm<T> gemm(w_hh);
    const at::Tensor h_prev = lstm_loop::gather_prev(steps, out, h0, reverse);
    at::Tensor dgh = empty_reusing_memory({N, 3 * H}, dout.options());
    gru_backward_steps<T>(gemm, steps, reverse, H, dout.const_data_ptr<T>(), saved.const_data_ptr<T>(),
                          h_prev.const_data_ptr<T>(), dh.mutable_data_ptr<T>(), dx_proj.mutable_data_ptr<T>(),
                          dgh.mutable_data_ptr<T>());
    grads = {gemm.tn(dgh, h_prev), has_bias ? at::sum(dgh, {0}) : at::Tensor()};
  });
  return {dx_proj, dh, grads[0], grads[1]};
}

}  // namespace mltoolkit
