// Tensor glue of the CUDA LSTM / GRU kernels (csrc/cuda/lstm.cu): argument checks, allocation, device guard, current
// stream, and the step loops of csrc/lstm.h (lstm_loop) with cuBLAS GEMMs through ATen and our gate kernels.
// Contract: csrc/lstm.h. Dtypes: float32, float64.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <string>

#include "check_util.h"
#include "lstm.h"
#include "lstm_launch.h"

namespace mltoolkit {
namespace {

namespace cl = cuda_lstm;

cl::DType to_dtype(at::ScalarType t) { return t == at::kDouble ? cl::DType::kFloat64 : cl::DType::kFloat32; }

void* mut(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
const void* cst(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void check_status(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

struct CudaPointwise {
  cudaStream_t stream;
  void lstm_fwd(int64_t rows, const at::Tensor& pre, const at::Tensor& bias, const at::Tensor& h_state,
                const at::Tensor& c_state, const at::Tensor& out, const at::Tensor& cells,
                const at::Tensor& act) const {
    cl::LstmFwd p{cst(pre), cst(bias), mut(h_state), mut(c_state), mut(out), mut(cells), mut(act)};
    check_status(cl::lstm_forward(p, rows, h_state.size(1), to_dtype(pre.scalar_type()), stream), "lstm forward");
  }
  void lstm_bwd(int64_t rows, const at::Tensor& dout, const at::Tensor& dh_state, const at::Tensor& dc_in,
                const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& c_prev, const at::Tensor& dgates,
                const at::Tensor& dc_out) const {
    cl::LstmBwd p{cst(dout), cst(dh_state), cst(dc_in), cst(gates), cst(cells), cst(c_prev), mut(dgates),
                  mut(dc_out)};
    check_status(cl::lstm_backward(p, rows, cells.size(1), to_dtype(gates.scalar_type()), stream), "lstm backward");
  }
  void gru_fwd(int64_t rows, const at::Tensor& x_proj, const at::Tensor& gh, const at::Tensor& h_state,
               const at::Tensor& out, const at::Tensor& saved) const {
    cl::GruFwd p{cst(x_proj), cst(gh), mut(h_state), mut(out), mut(saved)};
    check_status(cl::gru_forward(p, rows, h_state.size(1), to_dtype(gh.scalar_type()), stream), "gru forward");
  }
  void gru_bwd(int64_t rows, const at::Tensor& dout, const at::Tensor& dh_state, const at::Tensor& saved,
               const at::Tensor& h_prev, const at::Tensor& dx_proj, const at::Tensor& dgh) const {
    cl::GruBwd p{cst(dout), mut(dh_state), cst(saved), cst(h_prev), mut(dx_proj), mut(dgh)};
    check_status(cl::gru_backward(p, rows, h_prev.size(1), to_dtype(saved.scalar_type()), stream), "gru backward");
  }
};

// Checks one argument: a contiguous CUDA tensor on `like`'s device with `like`'s dtype and the expected shape
// (an entry of -1 accepts any size).
void check(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& like,
           std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), fn, ": ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), fn, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ", shape_str(t.strides()));
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  int64_t d = 0;
  for (int64_t s : shape) {
    if (!ok) break;
    ok = s < 0 || t.size(d) == s;
    ++d;
  }
  std::string want = "(";
  d = 0;
  for (int64_t s : shape) want += (d++ ? ", " : "") + (s < 0 ? std::string("*") : std::to_string(s));
  want += shape.size() == 1 ? ",)" : ")";
  TORCH_CHECK(ok, fn, ": ", name, " must have shape ", want, ", got ", shape_str(t.sizes()));
}

// The first input: a 2-D float32/float64 CUDA tensor.
void check_first(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.is_cuda(), fn, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, fn, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D, got ", shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

int64_t hidden_of(const char* fn, const at::Tensor& w_hh, const at::Tensor& like, int64_t gates) {
  check(fn, "w_hh", w_hh, like, {-1, -1});
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(H >= 1 && w_hh.size(0) == gates * H, fn, ": w_hh must have shape (", gates, "*H, H), got ",
              shape_str(w_hh.sizes()));
  return H;
}

CudaPointwise pointwise(const at::Tensor& t) { return CudaPointwise{c10::cuda::getCurrentCUDAStream(t.get_device())}; }

}  // namespace

std::vector<at::Tensor> lstm_cell_forward_cuda(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& c,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh) {
  constexpr const char* fn = "lstm_cell_forward_cuda";
  check_first(fn, "x_proj", x_proj);
  // w_hh (4H, K): K = H, or the projection size P of an LSTM with projections (h is then (B, P), c (B, H)).
  check(fn, "w_hh", w_hh, x_proj, {-1, -1});
  TORCH_CHECK(w_hh.size(0) >= 4 && w_hh.size(0) % 4 == 0 && w_hh.size(1) >= 1, fn,
              ": w_hh must have shape (4*H, K) with H, K >= 1 (K = H, or the projection size), got ",
              shape_str(w_hh.sizes()));
  const int64_t H = w_hh.size(0) / 4, K = w_hh.size(1), B = x_proj.size(0);
  check(fn, "x_proj", x_proj, x_proj, {B, 4 * H});
  check(fn, "h", h, x_proj, {B, K});
  check(fn, "c", c, x_proj, {B, H});
  if (present(b_hh)) check(fn, "b_hh", *b_hh, x_proj, {4 * H});
  const c10::cuda::CUDAGuard guard(x_proj.device());
  at::Tensor gates = at::addmm(x_proj, h, w_hh.t());
  at::Tensor h_new = at::empty({B, H}, x_proj.options()), h_state = at::empty({B, H}, x_proj.options());
  at::Tensor c_new = c.clone();
  pointwise(x_proj).lstm_fwd(B, gates, present(b_hh) ? *b_hh : at::Tensor(), h_state, c_new, h_new, at::Tensor(),
                             gates);
  return {h_new, c_new, gates};
}

std::vector<at::Tensor> lstm_cell_backward_cuda(const at::Tensor& dh, const std::optional<at::Tensor>& dc,
                                                const at::Tensor& gates, const at::Tensor& c,
                                                const at::Tensor& c_new) {
  constexpr const char* fn = "lstm_cell_backward_cuda";
  check_first(fn, "dh", dh);
  const int64_t B = dh.size(0), H = dh.size(1);
  check(fn, "gates", gates, dh, {B, 4 * H});
  check(fn, "c", c, dh, {B, H});
  check(fn, "c_new", c_new, dh, {B, H});
  if (present(dc)) check(fn, "dc", *dc, dh, {B, H});
  const c10::cuda::CUDAGuard guard(dh.device());
  at::Tensor dgates = at::empty({B, 4 * H}, dh.options()), dc_prev = at::empty({B, H}, dh.options());
  pointwise(dh).lstm_bwd(B, dh, at::Tensor(), present(dc) ? *dc : at::Tensor(), gates, c_new, c, dgates, dc_prev);
  return {dgates, dc_prev};
}

std::vector<at::Tensor> gru_cell_forward_cuda(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& w_hh,
                                              const std::optional<at::Tensor>& b_hh) {
  constexpr const char* fn = "gru_cell_forward_cuda";
  check_first(fn, "x_proj", x_proj);
  const int64_t H = hidden_of(fn, w_hh, x_proj, 3), B = x_proj.size(0);
  check(fn, "x_proj", x_proj, x_proj, {B, 3 * H});
  check(fn, "h", h, x_proj, {B, H});
  if (present(b_hh)) check(fn, "b_hh", *b_hh, x_proj, {3 * H});
  const c10::cuda::CUDAGuard guard(x_proj.device());
  at::Tensor gh = present(b_hh) ? at::addmm(*b_hh, h, w_hh.t()) : at::mm(h, w_hh.t());
  at::Tensor h_new = at::empty({B, H}, x_proj.options()), h_state = h.clone();
  at::Tensor saved = at::empty({B, 4 * H}, x_proj.options());
  pointwise(x_proj).gru_fwd(B, x_proj, gh, h_state, h_new, saved);
  return {h_new, saved};
}

std::vector<at::Tensor> gru_cell_backward_cuda(const at::Tensor& dh, const at::Tensor& saved, const at::Tensor& h) {
  constexpr const char* fn = "gru_cell_backward_cuda";
  check_first(fn, "dh", dh);
  const int64_t B = dh.size(0), H = dh.size(1);
  check(fn, "saved", saved, dh, {B, 4 * H});
  check(fn, "h", h, dh, {B, H});
  const c10::cuda::CUDAGuard guard(dh.device());
  at::Tensor dh_direct = dh.clone();
  at::Tensor dx = at::empty({B, 3 * H}, dh.options()), dgh = at::empty({B, 3 * H}, dh.options());
  pointwise(dh).gru_bwd(B, at::Tensor(), dh_direct, saved, h, dx, dgh);
  return {dx, dgh, dh_direct};
}

std::vector<at::Tensor> lstm_layer_forward_cuda(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                                const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                                bool save) {
  constexpr const char* fn = "lstm_layer_forward_cuda";
  const bool project = present(w_ih);
  check_first(fn, project ? "x" : "x_proj", x);
  const int64_t H = hidden_of(fn, w_hh, x, 4), N = x.size(0);
  if (project) {
    check(fn, "w_ih", *w_ih, x, {4 * H, -1});
    check(fn, "x", x, x, {N, w_ih->size(1)});
  } else {
    check(fn, "x_proj", x, x, {N, 4 * H});
  }
  if (present(bias)) check(fn, "bias", *bias, x, {4 * H});
  check(fn, "h0", h0, x, {-1, H});
  check(fn, "c0", c0, x, {h0.size(0), H});
  const auto steps = lstm_loop::make_steps(fn, batch_sizes, N, h0.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  // The input projection of every step at once (cuBLAS), then the step loop.
  at::Tensor x_proj = x;
  if (project) {
    x_proj = present(bias) ? at::addmm(*bias, x, w_ih->t()) : at::mm(x, w_ih->t());
  } else if (present(bias)) {
    x_proj = at::add(x, *bias);
  }
  at::Tensor out = at::empty({N, H}, x.options()), h_n = h0.clone(), c_n = c0.clone();
  at::Tensor gates = at::empty(save ? at::IntArrayRef{N, 4 * H} : at::IntArrayRef{0}, x.options());
  at::Tensor cells = at::empty(save ? at::IntArrayRef{N, H} : at::IntArrayRef{0}, x.options());
  lstm_loop::lstm_forward(pointwise(x), lstm_loop::AtenGemm{w_hh.t()}, steps, x_proj, 4 * H, reverse, save, out,
                          h_n, c_n, gates, cells);
  return {out, h_n, c_n, gates, cells};
}

std::vector<at::Tensor> lstm_layer_backward_cuda(const at::Tensor& dout, const at::Tensor& dh_n,
                                                 const at::Tensor& dc_n, const at::Tensor& gates,
                                                 const at::Tensor& cells, const at::Tensor& out,
                                                 const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                                                 const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  constexpr const char* fn = "lstm_layer_backward_cuda";
  check_first(fn, "dout", dout);
  const int64_t H = hidden_of(fn, w_hh, dout, 4), N = dout.size(0);
  check(fn, "dout", dout, dout, {N, H});
  check(fn, "h0", h0, dout, {-1, H});
  const int64_t B = h0.size(0);
  check(fn, "dh_n", dh_n, dout, {B, H});
  check(fn, "dc_n", dc_n, dout, {B, H});
  check(fn, "c0", c0, dout, {B, H});
  check(fn, "gates", gates, dout, {N, 4 * H});
  check(fn, "cells", cells, dout, {N, H});
  check(fn, "out", out, dout, {N, H});
  const auto steps = lstm_loop::make_steps(fn, batch_sizes, N, B);
  const c10::cuda::CUDAGuard guard(dout.device());
  at::Tensor dh = dh_n.clone(), dc = dc_n.clone(), dx = at::empty({N, 4 * H}, dout.options());
  at::Tensor dw = lstm_loop::lstm_backward(pointwise(dout), lstm_loop::AtenGemm{w_hh}, steps, dout, gates, cells, out,
                                           h0, c0, reverse, dh, dc, dx);
  return {dx, dh, dc, dw};
}

std::vector<at::Tensor> gru_layer_forward_cuda(const at::Tensor& x_proj, const at::Tensor& h0,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                               const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                               bool save) {
  constexpr const char* fn = "gru_layer_forward_cuda";
  check_first(fn, "x_proj", x_proj);
  const int64_t H = hidden_of(fn, w_hh, x_proj, 3), N = x_proj.size(0);
  check(fn, "x_proj", x_proj, x_proj, {N, 3 * H});
  check(fn, "h0", h0, x_proj, {-1, H});
  if (present(b_hh)) check(fn, "b_hh", *b_hh, x_proj, {3 * H});
  const auto steps = lstm_loop::make_steps(fn, batch_sizes, N, h0.size(0));
  const c10::cuda::CUDAGuard guard(x_proj.device());
  at::Tensor out = at::empty({N, H}, x_proj.options()), h_n = h0.clone();
  at::Tensor saved = at::empty(save ? at::IntArrayRef{N, 4 * H} : at::IntArrayRef{0}, x_proj.options());
  lstm_loop::gru_forward(pointwise(x_proj), lstm_loop::AtenGemm{w_hh.t()}, steps, x_proj, 3 * H, b_hh, reverse, save,
                         out, h_n, saved);
  return {out, h_n, saved};
}

std::vector<at::Tensor> gru_layer_backward_cuda(const at::Tensor& dout, const at::Tensor& dh_n,
                                                const at::Tensor& saved, const at::Tensor& out, const at::Tensor& h0,
                                                const at::Tensor& w_hh, const std::optional<at::Tensor>& batch_sizes,
                                                bool reverse, bool has_bias) {
  constexpr const char* fn = "gru_layer_backward_cuda";
  check_first(fn, "dout", dout);
  const int64_t H = hidden_of(fn, w_hh, dout, 3), N = dout.size(0);
  check(fn, "dout", dout, dout, {N, H});
  check(fn, "h0", h0, dout, {-1, H});
  const int64_t B = h0.size(0);
  check(fn, "dh_n", dh_n, dout, {B, H});
  check(fn, "saved", saved, dout, {N, 4 * H});
  check(fn, "out", out, dout, {N, H});
  const auto steps = lstm_loop::make_steps(fn, batch_sizes, N, B);
  const c10::cuda::CUDAGuard guard(dout.device());
  at::Tensor dh = dh_n.clone(), dx = at::empty({N, 3 * H}, dout.options());
  auto grads = lstm_loop::gru_backward(pointwise(dout), lstm_loop::AtenGemm{w_hh}, steps, dout, saved, out, h0, reverse,
                                       has_bias, dh, dx);
  return {dx, dh, grads[0], grads[1]};
}

}  // namespace mltoolkit
