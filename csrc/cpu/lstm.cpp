// CPU kernels of the fused LSTM / GRU cells and layers; the contract and the math are in lstm.h.
//
// Work layout. A step's GEMM (the recurrent product, plus the input projection added in by the GEMM's beta = 1) goes
// to MKL through at::addmm_out, straight into the buffer the gate math then reads while it is still in cache; the
// gate math is ours: one pass over the step's (rows x H) block, at::vec::Vectorized lanes along H, the block cut into
// pieces of at least kMinElementsPerTask elements for at::parallel_for. W_hh is read transposed in place by the GEMM
// (no copy per call); the state buffers are allocated once per layer, so a step allocates nothing.
// Dtypes: float32 and float64 (fp64 for gradcheck); the Python layer sends other dtypes to the reference backend.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>

#include "check_util.h"
#include "lstm.h"

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

// dh = dout + dh_state (either may be null); dc_in may be null (zero); dgates: d(pre-activations); dc_out: dc.
template <typename T>
void lstm_bwd_rows(int64_t rows, int64_t H, const T* dout, const T* dh_state, const T* dc_in, const T* gates,
                   const T* cells, const T* c_prev, T* dgates, T* dc_out) {
  const Vec<T> one(T(1)), zero(T(0));
  for_block<T>(rows, H, [&](int64_t r, int64_t j, int64_t n) {
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

// dh = dout + dh_state; writes dx_proj (d pre-activations on the input side), dgh (on the hidden side) and
// dh_state = dh * z (the direct path to h; the caller adds dgh @ W_hh).
template <typename T>
void gru_bwd_rows(int64_t rows, int64_t H, const T* dout, T* dh_state, const T* saved, const T* h_prev, T* dx_proj,
                  T* dgh) {
  const Vec<T> one(T(1));
  for_block<T>(rows, H, [&](int64_t r, int64_t j, int64_t n) {
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
// The recurrent GEMM of a float32 forward step through oneDNN's matmul with W_hh reordered once per layer call into
// its blocked layout (mkldnn::_reorder_linear_weight / _linear_pointwise, the ops Inductor's CPU freezing path uses):
// measured on the dev VM, 1 thread, (32 x 512) @ (512 x 2048): 3.2 ms against MKL sgemm's 5.8 ms, which repacks the
// 4 MB of W_hh on every call. float64, a torch without oneDNN, or any failure of those ops: ATen's GEMM (MKL).

// The ops are called boxed: their C++ signatures are internal to torch.
class RecurrentGemm {
 public:
  // x @ w^T (+ addend) for x of up to `batch` rows: w is W_hh (forward) or W_hh^T made contiguous (backward).
  // bias: the GRU forward's b_hh (n,) or undefined; the LSTM forward adds x_proj's rows instead, the GRU backward dh's
  // (passed to operator()).
  RecurrentGemm(const at::Tensor& w_hh, int64_t batch, const at::Tensor& bias = at::Tensor()) : aten_{w_hh.t()} {
    if (w_hh.scalar_type() != at::kFloat || !at::hasMKLDNN() || batch == 0) return;
    static const auto reorder = c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
    static const auto linear_add = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
    if (!reorder || !linear_add) return;
    try {
      std::vector<c10::IValue> stack{w_hh, c10::IValue(batch)};
      reorder->callBoxed(stack);
      packed_ = stack.at(0).toTensor();
      linear_add_ = &*linear_add;
      // The GRU step's addend: b_hh on every row (or zeros), since the fused post-op adds a (rows, G) tensor.
      addend_ = bias.defined() ? bias.expand({batch, w_hh.size(0)}).contiguous()
                               : at::zeros({batch, w_hh.size(0)}, w_hh.options());
    } catch (const std::exception&) {
      packed_ = at::Tensor();
    }
  }

  at::Tensor operator()(const at::Tensor& add, const at::Tensor& h_rows, at::Tensor into) const {
    if (!packed_.defined()) return aten_(add, h_rows, into);
    const at::Tensor addend = add.defined() && add.dim() == 2 ? add : addend_.narrow(0, 0, h_rows.size(0));
    std::vector<c10::IValue> stack{h_rows, addend, packed_, c10::IValue(), c10::IValue(std::string("add"))};
    linear_add_->callBoxed(stack);
    return stack.at(0).toTensor();
  }

 private:
  lstm_loop::AtenGemm aten_;
  at::Tensor packed_, addend_;
  const c10::OperatorHandle* linear_add_ = nullptr;
};

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

std::vector<at::Tensor> lstm_layer_forward_impl(const char* fn, const at::Tensor& x_proj, const at::Tensor& h0,
                                                const at::Tensor& c0, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                                bool save) {
  const auto dtype = check_first(fn, "x_proj", x_proj);
  const int64_t H = check_w_hh(fn, w_hh, 4, dtype);
  check_shape(fn, "x_proj", x_proj, {x_proj.size(0), 4 * H});
  check_cpu(fn, "h0", h0, dtype);
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == H, fn, ": h0 must have shape (B, H=", H, "), got ",
              shape_str(h0.sizes()));
  check_cpu(fn, "c0", c0, dtype);
  check_shape(fn, "c0", c0, h0.sizes());
  const lstm_loop::Steps steps = lstm_loop::make_steps(fn, batch_sizes, x_proj.size(0), h0.size(0));
  const int64_t N = x_proj.size(0);
  at::Tensor out = at::empty({N, H}, x_proj.options());
  at::Tensor h_n = h0.clone(), c_n = c0.clone();
  at::Tensor gates = save ? at::empty({N, 4 * H}, x_proj.options()) : at::empty({0}, x_proj.options());
  at::Tensor cells = save ? at::empty({N, H}, x_proj.options()) : at::empty({0}, x_proj.options());
  lstm_loop::lstm_forward(CpuPointwise{}, RecurrentGemm(w_hh, h0.size(0)), steps, x_proj, 4 * H, reverse, save, out,
                          h_n, c_n, gates, cells);
  return {out, h_n, c_n, gates, cells};
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
  if (present(b_hh)) {
    check_cpu(fn, "b_hh", *b_hh, dtype);
    check_shape(fn, "b_hh", *b_hh, {4 * H});
  }
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
  if (present(b_hh)) {
    check_cpu(fn, "b_hh", *b_hh, dtype);
    check_shape(fn, "b_hh", *b_hh, {3 * H});
  }
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

std::vector<at::Tensor> lstm_layer_forward_cpu(const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0,
                                               const at::Tensor& w_hh, const std::optional<at::Tensor>& batch_sizes,
                                               bool reverse, bool save) {
  return lstm_layer_forward_impl("lstm_layer_forward_cpu", x_proj, h0, c0, w_hh, batch_sizes, reverse, save);
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
  at::Tensor dx_proj = at::empty({N, 4 * H}, dout.options());
  at::Tensor dw = lstm_loop::lstm_backward(CpuPointwise{}, RecurrentGemm(w_hh.t().contiguous(), B), steps, dout, gates,
                                           cells, out, h0, c0, reverse, dh, dc, dx_proj);
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
  if (present(b_hh)) {
    check_cpu(fn, "b_hh", *b_hh, dtype);
    check_shape(fn, "b_hh", *b_hh, {3 * H});
  }
  const lstm_loop::Steps steps = lstm_loop::make_steps(fn, batch_sizes, N, h0.size(0));
  at::Tensor out = at::empty({N, H}, x_proj.options());
  at::Tensor h_n = h0.clone();
  at::Tensor saved = save ? at::empty({N, 4 * H}, x_proj.options()) : at::empty({0}, x_proj.options());
  const RecurrentGemm gemm(w_hh, h0.size(0), present(b_hh) ? *b_hh : at::Tensor());
  lstm_loop::gru_forward(CpuPointwise{}, gemm, steps, x_proj, 3 * H, b_hh, reverse, save, out, h_n, saved);
  return {out, h_n, saved};
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
  at::Tensor dx_proj = at::empty({N, 3 * H}, dout.options());
  auto grads = lstm_loop::gru_backward(CpuPointwise{}, RecurrentGemm(w_hh.t().contiguous(), B), steps, dout, saved,
                                       out, h0, reverse, has_bias, dh, dx_proj);
  return {dx_proj, dh, grads[0], grads[1]};
}

}  // namespace mltoolkit
