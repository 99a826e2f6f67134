// Host entry points of the fused LSTM / GRU kernels: one recurrent step (cell) and a whole layer-direction (layer).
// One contract for every backend; mltoolkit/ops/lstm.py documents it and is the only caller.
//
// Dtypes: float32 or float64 throughout (the CPU and CUDA kernels); every tensor contiguous, one dtype.
// Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n). H = hidden size, B = batch, N = rows of a layer.
//
// LSTM cell.   x_proj (B, 4H) = x @ W_ih^T + b_ih [+ b_hh]; h (B, K); c (B, H); w_hh (4H, K); b_hh (4H) optional.
//   K = H for a plain LSTM; K = P (proj_size) for an LSTM with projections, whose caller then computes the next
//   state h = h' @ W_hr^T (P, from the cell's (B, H) h') itself (mltoolkit/ops/lstm.py).
//   pre = x_proj + h @ w_hh^T [+ b_hh]; i, f, o = sigmoid(pre_i, pre_f, pre_o), g = tanh(pre_g)
//   c' = f*c + i*g; h' = o*tanh(c')  (h', c' are (B, H))
//   lstm_cell_forward -> {h', c', gates = (i, f, g, o) activated, (B, 4H)}
//   lstm_cell_backward(dh' (B, H), dc' (optional), gates, c, c') -> {dpre (B, 4H), dc}: the pointwise part only;
//     the caller does dx_proj = dpre, dh = dpre @ w_hh (B, K), dw_hh = dpre^T @ h, db_hh = sum_rows(dpre).
// GRU cell.    x_proj (B, 3H) = x @ W_ih^T + b_ih; h (B, H); w_hh (3H, H); b_hh (3H) optional.
//   gh = h @ w_hh^T + b_hh; r = sigmoid(x_r + gh_r), z = sigmoid(x_z + gh_z), n = tanh(x_n + r*gh_n)
//   h' = (1-z)*n + z*h
//   gru_cell_forward -> {h', saved = (r, z, n, gh_n), (B, 4H)}
//   gru_cell_backward(dh', saved, h) -> {dx_proj (B, 3H), dgh (B, 3H), dh_direct = dh'*z (B, H)};
//     the caller does dh = dh_direct + dgh @ w_hh, dw_hh = dgh^T @ h, db_hh = sum_rows(dgh).
//
// Layers (no projection: w_hh is (4H, H) / (3H, H); an LSTM with projections runs the cell op step by step instead).
// A layer-direction runs T steps over rows laid out as a PackedSequence's data: step t owns the rows
// [off_t, off_t + bs_t) of x_proj (N, G*H) and of every per-row output, where bs = batch_sizes (T,), int64, on the
// CPU, non-increasing, bs_0 <= B, off_t = bs_0 + ... + bs_{t-1}, N = sum(bs). Without batch_sizes every step has B
// rows (T = N / B): a padded (T, B, *) sequence flattened. Row i of step t is sequence i of the batch; the rows of
// sequence i >= bs_t are idle at step t and keep their state. Forward direction runs t = 0..T-1, reverse runs
// t = T-1..0 (a sequence of length L then starts at t = L-1 from its initial state: what torch does for packed input).
//   lstm_layer_forward(x, h0, c0 (B, H), w_ih?, w_hh, bias?, batch_sizes?, reverse, save)
//     pre-activations of row n: x[n] @ w_ih^T + bias + h @ w_hh^T with w_ih (4H, I), x (N, I), bias (4H) optional
//     (b_ih + b_hh); without w_ih, x is x_proj (N, 4H), the input projection done by the caller (bias still added).
//     -> {out (N, H) (h of each row), h_n, c_n (B, H) (state after each sequence's last step), gates (N, 4H)
//         activated, cells (N, H) (c of each row)}; gates and cells are empty (0,) when save is false.
//   lstm_layer_backward(dout (N, H), dh_n, dc_n (B, H), gates, cells, out, h0, c0, w_hh, batch_sizes?, reverse)
//     -> {dx_proj (N, 4H), dh0, dc0 (B, H), dw_hh (4H, H)}   (the bias grads are sum_rows(dx_proj))
//   gru_layer_forward(x_proj (N, 3H), h0, w_hh, b_hh?, batch_sizes?, reverse, save)
//     -> {out (N, H), h_n (B, H), saved (N, 4H) = (r, z, n, gh_n) (empty without save)}
//   gru_layer_backward(dout, dh_n, saved, out, h0, w_hh, batch_sizes?, reverse, has_bias)
//     -> {dx_proj (N, 3H), dh0 (B, H), dw_hh (3H, H), db_hh (3H) (empty unless has_bias)}
//
// The step loops below are shared by the CPU kernels (the GRU layer forward) and the CUDA glue (LSTM and GRU layers):
// the GEMMs go through the backend's GEMM policy (the CPU's packed-panel kernel, cuBLAS), the pointwise gate math
// through its Pointwise policy (csrc/cpu/lstm.cpp, csrc/cuda/lstm_cuda.cpp). The CPU LSTM layer and the CPU GRU
// layer backward run their own loops, each in one parallel region (csrc/cpu/lstm.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> lstm_cell_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& c,
                                              const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh);
std::vector<at::Tensor> lstm_cell_backward_cpu(const at::Tensor& dh, const std::optional<at::Tensor>& dc,
                                               const at::Tensor& gates, const at::Tensor& c,
                                               const at::Tensor& c_new);
std::vector<at::Tensor> gru_cell_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& w_hh,
                                             const std::optional<at::Tensor>& b_hh);
std::vector<at::Tensor> gru_cell_backward_cpu(const at::Tensor& dh, const at::Tensor& saved, const at::Tensor& h);

std::vector<at::Tensor> lstm_layer_forward_cpu(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                               const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save);
std::vector<at::Tensor> lstm_layer_backward_cpu(const at::Tensor& dout, const at::Tensor& dh_n,
                                                const at::Tensor& dc_n, const at::Tensor& gates,
                                                const at::Tensor& cells, const at::Tensor& out, const at::Tensor& h0,
                                                const at::Tensor& c0, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& batch_sizes, bool reverse);
// a^T b for a (K, M), b (K, N) on the CPU (float32 through oneDNN's matmul; see csrc/cpu/lstm.cpp).
at::Tensor gemm_tn_cpu(const at::Tensor& a, const at::Tensor& b);
std::vector<at::Tensor> gru_layer_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
                                              const std::optional<at::Tensor>& b_hh,
                                              const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save);
std::vector<at::Tensor> gru_layer_backward_cpu(const at::Tensor& dout, const at::Tensor& dh_n,
                                               const at::Tensor& saved, const at::Tensor& out, const at::Tensor& h0,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& batch_sizes,
                                               bool reverse, bool has_bias);

#ifdef MLTK_WITH_CUDA
std::vector<at::Tensor> lstm_cell_forward_cuda(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& c,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh);
std::vector<at::Tensor> lstm_cell_backward_cuda(const at::Tensor& dh, const std::optional<at::Tensor>& dc,
                                                const at::Tensor& gates, const at::Tensor& c,
                                                const at::Tensor& c_new);
std::vector<at::Tensor> gru_cell_forward_cuda(const at::Tensor& x_proj, const at::Tensor& h, const at::Tensor& w_hh,
                                              const std::optional<at::Tensor>& b_hh);
std::vector<at::Tensor> gru_cell_backward_cuda(const at::Tensor& dh, const at::Tensor& saved, const at::Tensor& h);
std::vector<at::Tensor> lstm_layer_forward_cuda(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                                const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                                bool save);
std::vector<at::Tensor> lstm_layer_backward_cuda(const at::Tensor& dout, const at::Tensor& dh_n,
                                                 const at::Tensor& dc_n, const at::Tensor& gates,
                                                 const at::Tensor& cells, const at::Tensor& out,
                                                 const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                                                 const std::optional<at::Tensor>& batch_sizes, bool reverse);
std::vector<at::Tensor> gru_layer_forward_cuda(const at::Tensor& x_proj, const at::Tensor& h0,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                               const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                               bool save);
std::vector<at::Tensor> gru_layer_backward_cuda(const at::Tensor& dout, const at::Tensor& dh_n,
                                                const at::Tensor& saved, const at::Tensor& out, const at::Tensor& h0,
                                                const at::Tensor& w_hh, const std::optional<at::Tensor>& batch_sizes,
                                                bool reverse, bool has_bias);
#endif

// ---------------------------------------------------------------------------------------------------------------
// Step loops shared by the backends. A Pointwise policy P provides, on row blocks given as tensors (contiguous rows;
// `rows` leading rows of each):
//   lstm_fwd(rows, pre, bias?, h_state, c_state, out, cells?, act?)   (act: activated gates out; may alias pre)
//   lstm_bwd(rows, dout?, dh_state?, dc_in?, gates, cells, c_prev, dgates, dc_out)
//   gru_fwd(rows, x_proj, gh, h_state, out, saved?)
//   gru_bwd(rows, dout?, dh_state (in: dh from later steps; out: dh'*z), saved, h_prev, dx_proj, dgh)
// where an absent optional is an undefined tensor. Pointer-level semantics: see csrc/cpu/lstm.cpp.
// A Gemm G computes a step's recurrent product: G(add, x_rows, into) -> add + x_rows @ W^T, where add is a (rows, n)
// tensor, a bias (n,) or undefined, written into `into` (a (rows, n) buffer, which may be add itself) and returned.
// The forward's W is W_hh (x = h), the backward's W_hh^T (x = the gate gradients, giving dh).
namespace lstm_loop {

struct AtenGemm {
  at::Tensor w_t;  // W_hh^T, a transposed view (the BLAS reads it in place)
  at::Tensor operator()(const at::Tensor& add, const at::Tensor& h_rows, at::Tensor into) const {
    if (add.defined()) {
      at::addmm_out(into, add, h_rows, w_t);
    } else {
      at::mm_out(into, h_rows, w_t);
    }
    return into;
  }
  // a^T b: the backward's weight gradient over every row.
  at::Tensor tn(const at::Tensor& a, const at::Tensor& b) const { return at::mm(a.t(), b); }
};

// Row offset and row count of each time step.
struct Steps {
  std::vector<int64_t> offset, size;
  int64_t count() const { return static_cast<int64_t>(size.size()); }
};

// batch_sizes: see the contract above. Checks it against x_rows (N) and batch (B); fn names the caller.
inline Steps make_steps(const char* fn, const std::optional<at::Tensor>& batch_sizes, int64_t x_rows, int64_t batch) {
  Steps s;
  if (!(batch_sizes.has_value() && batch_sizes->defined())) {
    TORCH_CHECK(batch > 0 || x_rows == 0, fn, ": h0 must have a batch B >= 1");
    TORCH_CHECK(batch == 0 || x_rows % batch == 0, fn, ": x_proj rows (", x_rows,
                ") must be a multiple of the batch B (", batch, ") without batch_sizes");
    const int64_t steps = batch == 0 ? 0 : x_rows / batch;
    for (int64_t t = 0; t < steps; ++t) {
      s.offset.push_back(t * batch);
      s.size.push_back(batch);
    }
    return s;
  }
  const at::Tensor& bs = *batch_sizes;
  TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1, fn,
              ": batch_sizes must be a 1-D int64 CPU tensor, got ", bs.scalar_type(), " on ", bs.device(), " with ",
              bs.dim(), " dims");
  const at::Tensor bsc = bs.contiguous();
  const int64_t* p = bsc.const_data_ptr<int64_t>();
  int64_t off = 0;
  for (int64_t t = 0; t < bsc.numel(); ++t) {
    TORCH_CHECK(p[t] >= 1 && p[t] <= batch && (t == 0 || p[t] <= p[t - 1]), fn,
                ": batch_sizes must be non-increasing values in [1, B=", batch, "], got ", p[t], " at step ", t);
    s.offset.push_back(off);
    s.size.push_back(p[t]);
    off += p[t];
  }
  TORCH_CHECK(off == x_rows, fn, ": batch_sizes sum to ", off, " but x_proj has ", x_rows, " rows");
  return s;
}

// The step processed before time t (t-1 forward, t+1 reverse), or -1.
inline int64_t prev_step(const Steps& s, int64_t t, bool reverse) {
  const int64_t p = reverse ? t + 1 : t - 1;
  return (p < 0 || p >= s.count()) ? -1 : p;
}

// For every row, the state it started its step from: src's row of the previous step, or init's row when the
// sequence starts at this step. (N, H).
inline at::Tensor gather_prev(const Steps& s, const at::Tensor& src, const at::Tensor& init, bool reverse) {
  at::Tensor prev = at::empty({src.size(0), init.size(1)}, init.options());
  // Every step of one batch (no packing): src shifted by one step, and init: two copies instead of one a step.
  const int64_t b = s.count() > 0 ? s.size[0] : 0;
  if (b > 0 && std::all_of(s.size.begin(), s.size.end(), [b](int64_t n) { return n == b; })) {
    const int64_t rest = src.size(0) - b;
    prev.narrow(0, reverse ? rest : 0, b).copy_(init.narrow(0, 0, b));
    if (rest > 0) prev.narrow(0, reverse ? 0 : b, rest).copy_(src.narrow(0, reverse ? b : 0, rest));
    return prev;
  }
  for (int64_t t = 0; t < s.count(); ++t) {
    const int64_t p = prev_step(s, t, reverse);
    const int64_t carried = p < 0 ? 0 : std::min(s.size[t], s.size[p]);
    if (carried > 0) prev.narrow(0, s.offset[t], carried).copy_(src.narrow(0, s.offset[p], carried));
    if (carried < s.size[t]) {
      prev.narrow(0, s.offset[t] + carried, s.size[t] - carried).copy_(init.narrow(0, carried, s.size[t] - carried));
    }
  }
  return prev;
}

inline int64_t step_at(const Steps& s, int64_t k, bool reverse) { return reverse ? s.count() - 1 - k : k; }

// out, h_n, c_n, gates, cells are preallocated; h_n / c_n hold h0 / c0 on entry (they are the running state).
template <class P, class G>
void lstm_forward(const P& pw, const G& gemm, const Steps& s, const at::Tensor& x_proj, int64_t gate_width,
                  bool reverse, bool save, at::Tensor& out, at::Tensor& h_n, at::Tensor& c_n, at::Tensor& gates,
                  at::Tensor& cells) {
  at::Tensor scratch = save ? gates : at::empty({h_n.size(0), gate_width}, x_proj.options());
  for (int64_t k = 0; k < s.count(); ++k) {
    const int64_t t = step_at(s, k, reverse), off = s.offset[t], rows = s.size[t];
    at::Tensor g = scratch.narrow(0, save ? off : 0, rows);
    const at::Tensor pre = gemm(x_proj.narrow(0, off, rows), h_n.narrow(0, 0, rows), g);
    pw.lstm_fwd(rows, pre, at::Tensor(), h_n, c_n, out.narrow(0, off, rows),
                save ? cells.narrow(0, off, rows) : at::Tensor(), save ? g : at::Tensor());
  }
}

// dh_n / dc_n are the running gradients on entry (consumed: they end as dh0 / dc0). dx_proj is preallocated.
template <class P, class G>
at::Tensor lstm_backward(const P& pw, const G& gemm, const Steps& s, const at::Tensor& dout, const at::Tensor& gates,
                         const at::Tensor& cells, const at::Tensor& out, const at::Tensor& h0, const at::Tensor& c0,
                         bool reverse, at::Tensor& dh, at::Tensor& dc, at::Tensor& dx_proj) {
  const at::Tensor c_prev = gather_prev(s, cells, c0, reverse);
  for (int64_t k = s.count() - 1; k >= 0; --k) {
    const int64_t t = step_at(s, k, reverse), off = s.offset[t], rows = s.size[t];
    at::Tensor dg = dx_proj.narrow(0, off, rows);
    pw.lstm_bwd(rows, dout.narrow(0, off, rows), dh, dc, gates.narrow(0, off, rows), cells.narrow(0, off, rows),
                c_prev.narrow(0, off, rows), dg, dc);
    at::Tensor dh_rows = dh.narrow(0, 0, rows);
    gemm(at::Tensor(), dg, dh_rows);
  }
  const at::Tensor h_prev = gather_prev(s, out, h0, reverse);
  return gemm.tn(dx_proj, h_prev);  // dw_hh: one GEMM over every row
}

template <class P, class G>
void gru_forward(const P& pw, const G& gemm, const Steps& s, const at::Tensor& x_proj, int64_t gate_width,
                 const std::optional<at::Tensor>& b_hh, bool reverse, bool save, at::Tensor& out, at::Tensor& h_n,
                 at::Tensor& saved) {
  const at::Tensor bias = b_hh.has_value() && b_hh->defined() ? *b_hh : at::Tensor();
  at::Tensor gh = at::empty({h_n.size(0), gate_width}, x_proj.options());
  for (int64_t k = 0; k < s.count(); ++k) {
    const int64_t t = step_at(s, k, reverse), off = s.offset[t], rows = s.size[t];
    const at::Tensor g = gemm(bias, h_n.narrow(0, 0, rows), gh.narrow(0, 0, rows));
    pw.gru_fwd(rows, x_proj.narrow(0, off, rows), g, h_n, out.narrow(0, off, rows),
               save ? saved.narrow(0, off, rows) : at::Tensor());
  }
}

// Returns {dw_hh, db_hh (undefined without bias)}; dh is the running gradient (ends as dh0).
template <class P, class G>
std::vector<at::Tensor> gru_backward(const P& pw, const G& gemm, const Steps& s, const at::Tensor& dout,
                                     const at::Tensor& saved, const at::Tensor& out, const at::Tensor& h0, bool reverse,
                                     bool has_bias, at::Tensor& dh, at::Tensor& dx_proj) {
  const at::Tensor h_prev = gather_prev(s, out, h0, reverse);
  at::Tensor dgh = at::empty_like(dx_proj);
  for (int64_t k = s.count() - 1; k >= 0; --k) {
    const int64_t t = step_at(s, k, reverse), off = s.offset[t], rows = s.size[t];
    at::Tensor dg = dgh.narrow(0, off, rows);
    pw.gru_bwd(rows, dout.narrow(0, off, rows), dh, saved.narrow(0, off, rows), h_prev.narrow(0, off, rows),
               dx_proj.narrow(0, off, rows), dg);
    at::Tensor dh_rows = dh.narrow(0, 0, rows);
    gemm(dh_rows, dg, dh_rows);
  }
  at::Tensor dw = gemm.tn(dgh, h_prev);
  at::Tensor db = has_bias ? at::sum(dgh, {0}) : at::Tensor();
  return {dw, db};
}

}  // namespace lstm_loop
}  // namespace mltoolkit
