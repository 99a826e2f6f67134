// Fused LAMB step and fused global-norm gradient clip on the CPU (contract: csrc/fused_lamb.h).
//
// Multi-tensor layout: every tensor of the list is cut into chunks of kChunk elements (the last one of a tensor may
// be shorter); at::parallel_for runs over the chunks of all tensors at once, so 200 small tensors keep every thread
// busy and one large tensor is split. Each chunk writes its partial sums of squares to its own slot, and the slots
// of a tensor are added in chunk order afterwards: the norms do not depend on the number of threads.
// Tensors are taken in waves of about kWave elements: pass 1 over a wave stores u in a scratch buffer (kWave
// elements, reused), pass 2 reads it back from the cache; a tensor larger than kWave recomputes u in pass 2 from
// the new m and v with the same code (no scratch of the parameters' size).
// Within a chunk, squares are accumulated in float32 vector lanes over blocks of kBlock elements and each block's
// sum is added to a float64 total (float64 throughout for float64 tensors).
#include "fused_lamb.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "optim_common.h"

namespace mltoolkit {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int64_t kBlock = 512;
// Elements per wave of the LAMB step: p, g, m, v and the stored u of a wave (20 MiB in float32) stay in a 32 MiB L3
// between the passes (1 << 16, an L2-sized wave, measured no faster here).
constexpr int64_t kWave = 1 << 20;

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& ts) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({i, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// Horizontal sum / max of a vector's lanes, in lane order.
template <typename T>
inline T lanes_sum(const at::vec::Vectorized<T>& v) {
  T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t k = 0; k < at::vec::Vectorized<T>::size(); ++k) s += buf[k];
  return s;
}

template <typename T>
inline T lanes_max(const at::vec::Vectorized<T>& v) {
  T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T s = buf[0];
  for (int64_t k = 1; k < at::vec::Vectorized<T>::size(); ++k) s = (std::isnan(buf[k]) || buf[k] > s) ? buf[k] : s;
  return s;
}

// The LAMB update direction for one element; pass 1 and pass 2 both call it so that they agree bit for bit.
template <typename T>
struct Direction {
  T inv_bc1, inv_bc2, eps, wd;
  using Vec = at::vec::Vectorized<T>;
  inline Vec operator()(Vec m, Vec v, Vec p) const {
    Vec denom = (v * Vec(inv_bc2)).sqrt() + Vec(eps);
    return (m * Vec(inv_bc1)) / denom + Vec(wd) * p;
  }
  inline T operator()(T m, T v, T p) const {
    T denom = std::sqrt(v * inv_bc2) + eps;
    return (m * inv_bc1) / denom + wd * p;
  }
};

// Pass 1 on one chunk: update m and v, return (sum p^2, sum u^2) in float64.
template <typename T>
std::pair<double, double> lamb_pass1(T* p, const T* g, T* m, T* v, T* u_out, int64_t n, T beta1, T beta2,
                                     T beta3, const Direction<T>& dir) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T one_minus_beta2 = T(1) - beta2;
  double pp = 0.0, uu = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec acc_p(T(0)), acc_u(T(0));
    int64_t i = b0;
    for (; i + W <= b1; i += W) {
      Vec gv = Vec::loadu(g + i), pv = Vec::loadu(p + i);
      Vec mv = Vec(beta1) * Vec::loadu(m + i) + Vec(beta3) * gv;
      Vec vv = Vec(beta2) * Vec::loadu(v + i) + Vec(one_minus_beta2) * gv * gv;
      mv.store(m + i);
      vv.store(v + i);
      Vec u = dir(mv, vv, pv);
      if (u_out) u.store(u_out + i);
      acc_p = at::vec::fmadd(pv, pv, acc_p);
      acc_u = at::vec::fmadd(u, u, acc_u);
    }
    T tail_p = 0, tail_u = 0;
    for (; i < b1; ++i) {
      T mi = beta1 * m[i] + beta3 * g[i];
      T vi = beta2 * v[i] + one_minus_beta2 * g[i] * g[i];
      m[i] = mi;
      v[i] = vi;
      T u = dir(mi, vi, p[i]);
      if (u_out) u_out[i] = u;
      tail_p += p[i] * p[i];
      tail_u += u * u;
    }
    pp += static_cast<double>(lanes_sum(acc_p)) + tail_p;
    uu += static_cast<double>(lanes_sum(acc_u)) + tail_u;
  }
  return {pp, uu};
}

template <typename T>
void lamb_pass2(T* p, const T* m, const T* v, int64_t n, T scale, const Direction<T>& dir) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  // Same block structure as pass 1 so that the vector/scalar split of every element matches.
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    int64_t i = b0;
    for (; i + W <= b1; i += W) {
      Vec pv = Vec::loadu(p + i);
      Vec u = dir(Vec::loadu(m + i), Vec::loadu(v + i), pv);
      (pv - Vec(scale) * u).store(p + i);
    }
    for (; i < b1; ++i) p[i] = p[i] - scale * dir(m[i], v[i], p[i]);
  }
}

// Pass 2 from the directions pass 1 stored (the wave's scratch, still in the cache).
template <typename T>
void lamb_pass2_stored(T* p, const T* u, int64_t n, T scale) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) (Vec::loadu(p + i) - Vec(scale) * Vec::loadu(u + i)).store(p + i);
  for (; i < n; ++i) p[i] = p[i] - scale * u[i];
}

template <typename T>
void fused_lamb_impl(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step, bool bias_correction,
                     bool grad_averaging, bool use_trust_ratio, double max_trust_ratio) {
  const LambCoeffs<T> co = lamb_coeffs<T>(beta1, beta2, eps, weight_decay, step, bias_correction, grad_averaging);
  const Direction<T> dir{co.inv_bc1, co.inv_bc2, co.eps, co.weight_decay};
  const T b1 = co.beta1, b2 = co.beta2, b3 = co.beta3;
  const auto chunks = make_chunks(params);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> sums(2 * nc, 0.0);
  std::vector<T> scale(params.size(), T(0));
  std::vector<int64_t> offset(nc, 0);
  int64_t largest_wave = 0;  // scratch only as large as needed: the sum of all tensors when below kWave
  for (const auto& t : params) largest_wave += t.numel();
  // Kept between calls (per calling thread, at most kWave elements): a fresh 4 MiB buffer each step costs page faults
  // where malloc maps large blocks anew each time.
  static thread_local std::vector<T> scratch_buf;
  if (scratch_buf.size() < static_cast<size_t>(std::min(largest_wave, kWave))) {
    scratch_buf.resize(static_cast<size_t>(std::min(largest_wave, kWave)));
  }
  // Waves of whole tensors, about kWave elements each (a larger tensor is a wave of its own): pass 2 of a wave runs
  // right after its pass 1, while p, m and v are still in the cache.
  int64_t c_begin = 0;
  while (c_begin < nc) {
    int64_t c_end = c_begin, elems = 0;
    while (c_end < nc) {
      const int64_t t = chunks[c_end].tensor;
      const int64_t tn = params[t].numel();
      if (elems > 0 && elems + tn > kWave) break;
      elems += tn;
      while (c_end < nc && chunks[c_end].tensor == t) ++c_end;
    }
    // A wave that fits the scratch buffer keeps u there for pass 2; a larger tensor recomputes u in pass 2.
    T* scratch = elems <= kWave ? scratch_buf.data() : nullptr;
    for (int64_t c = c_begin, off = 0; c < c_end; ++c) {
      offset[c] = off;
      off += chunks[c].end - chunks[c].begin;
    }
    at::parallel_for(c_begin, c_end, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t t = ch.tensor;
        auto r = lamb_pass1<T>(params[t].data_ptr<T>() + ch.begin, grads[t].const_data_ptr<T>() + ch.begin,
                               exp_avgs[t].data_ptr<T>() + ch.begin, exp_avg_sqs[t].data_ptr<T>() + ch.begin,
                               scratch ? scratch + offset[c] : nullptr, ch.end - ch.begin, b1, b2, b3, dir);
        sums[2 * c] = r.first;
        sums[2 * c + 1] = r.second;
      }
    });
    // Per-tensor norms, chunks added in order; then the per-tensor step scale lr * trust.
    for (int64_t c = c_begin; c < c_end;) {
      const int64_t t = chunks[c].tensor;
      double pn = 0.0, un = 0.0;
      for (; c < c_end && chunks[c].tensor == t; ++c) {
        pn += sums[2 * c];
        un += sums[2 * c + 1];
      }
      const double w = std::sqrt(pn), u = std::sqrt(un);
      double trust = (use_trust_ratio && w > 0.0 && u > 0.0) ? w / u : 1.0;
      if (max_trust_ratio > 0.0) trust = std::min(trust, max_trust_ratio);
      scale[t] = static_cast<T>(lr * trust);
    }
    at::parallel_for(c_begin, c_end, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t t = ch.tensor;
        if (scratch) {
          lamb_pass2_stored<T>(params[t].data_ptr<T>() + ch.begin, scratch + offset[c], ch.end - ch.begin, scale[t]);
        } else {
          lamb_pass2<T>(params[t].data_ptr<T>() + ch.begin, exp_avgs[t].const_data_ptr<T>() + ch.begin,
                        exp_avg_sqs[t].const_data_ptr<T>() + ch.begin, ch.end - ch.begin, scale[t], dir);
        }
      }
    });
    c_begin = c_end;
  }
}

// Sum of squares (or max |x|) of one chunk, as float64.
template <typename T>
double chunk_norm_part(const T* x, int64_t n, bool inf_norm) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Vec acc(T(0));
    int64_t i = b0;
    T tail = 0;
    if (inf_norm) {
      for (; i + W <= b1; i += W) acc = at::vec::maximum(acc, Vec::loadu(x + i).abs());
      for (; i < b1; ++i) {
        T a = std::abs(x[i]);
        tail = (a > tail || std::isnan(a)) ? a : tail;
      }
      T blk = lanes_max(acc);
      double mx = std::isnan(blk) || std::isnan(tail) ? std::numeric_limits<double>::quiet_NaN()
                                                     : std::max<double>(blk, tail);
      total = (std::isnan(mx) || mx > total) ? mx : total;
      if (std::isnan(total)) return total;
    } else {
      for (; i + W <= b1; i += W) {
        Vec xv = Vec::loadu(x + i);
        acc = at::vec::fmadd(xv, xv, acc);
      }
      for (; i < b1; ++i) tail += x[i] * x[i];
      total += static_cast<double>(lanes_sum(acc)) + tail;
    }
  }
  return total;
}

template <typename T>
at::Tensor clip_impl(const std::vector<at::Tensor>& grads, double max_norm, bool inf_norm, bool error_if_nonfinite,
                     double norm_type) {
  const auto chunks = make_chunks(grads);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> parts(nc, 0.0);
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      parts[c] = chunk_norm_part<T>(grads[ch.tensor].const_data_ptr<T>() + ch.begin, ch.end - ch.begin, inf_norm);
    }
  });
  double acc = 0.0;
  for (int64_t c = 0; c < nc; ++c) {
    if (inf_norm) {
      acc = (std::isnan(parts[c]) || parts[c] > acc || std::isnan(acc)) && !std::isnan(acc) ? parts[c] : acc;
    } else {
      acc += parts[c];
    }
  }
  const T total = static_cast<T>(inf_norm ? acc : std::sqrt(acc));
  TORCH_CHECK(!error_if_nonfinite || std::isfinite(total), "fused_clip_grad_norm_: the total norm of order ",
              norm_type, " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable this "
              "error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, in the grads' dtype; grads *= clip_coef.
  T coef = static_cast<T>(max_norm) / (total + static_cast<T>(1e-6));
  coef = coef < T(1) ? coef : T(1);  // torch.clamp(max=1) keeps nan
  if (std::isnan(static_cast<double>(total))) coef = std::numeric_limits<T>::quiet_NaN();
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t W = Vec::size();
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      T* x = grads[ch.tensor].data_ptr<T>() + ch.begin;
      const int64_t n = ch.end - ch.begin;
      int64_t i = 0;
      for (; i + W <= n; i += W) (Vec::loadu(x + i) * Vec(coef)).store(x + i);
      for (; i < n; ++i) x[i] = x[i] * coef;
    }
  });
  return at::scalar_tensor(total, grads[0].options());
}

}  // namespace

void fused_lamb_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int64_t step, bool bias_correction,
                    bool grad_averaging, bool use_trust_ratio, double max_trust_ratio) {
  const char* fn = "fused_lamb_cpu";
  check_lamb_args(fn, params, grads, exp_avgs, exp_avg_sqs, step, /*cuda=*/false);
  if (params.empty()) return;
  if (params[0].scalar_type() == at::kFloat) {
    fused_lamb_impl<float>(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                           bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio);
  } else {
    fused_lamb_impl<double>(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                            bias_correction, grad_averaging, use_trust_ratio, max_trust_ratio);
  }
}

at::Tensor fused_clip_grad_norm_cpu(const std::vector<at::Tensor>& grads, double max_norm, double norm_type,
                                    bool error_if_nonfinite) {
  const char* fn = "fused_clip_grad_norm_cpu";
  TORCH_CHECK(!grads.empty(), fn, ": grads must not be empty");
  const bool inf_norm = std::isinf(norm_type) && norm_type > 0;
  TORCH_CHECK(inf_norm || norm_type == 2.0, fn, ": norm_type must be 2 or inf, got ", norm_type);
  check_float_list(fn, "grads", grads, grads[0], nullptr);
  if (grads[0].scalar_type() == at::kFloat) return clip_impl<float>(grads, max_norm, inf_norm, error_if_nonfinite,
                                                                    norm_type);
  return clip_impl<double>(grads, max_norm, inf_norm, error_if_nonfinite, norm_type);
}

}  // namespace mltoolkit
