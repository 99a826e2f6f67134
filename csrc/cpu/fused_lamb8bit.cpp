// CPU fused multi-tensor 8-bit LAMB step; the contract is in csrc/fused_lamb8bit.h.
//
// Work unit: one block of 256 elements of one tensor (its two absmax values are its own). Blocks are listed in
// tasks of up to kBlocksPerTask blocks of one tensor, shared by at::parallel_for; each task writes its partial sums
// of p^2 and u^2 to its own slot and a tensor's slots are added in task order: the norms, hence the trust ratios,
// do not depend on the thread count.
// Two passes (the trust ratio needs ||u|| of the whole tensor before any p changes), over waves of whole tensors of
// about kWave elements: pass 1 dequantizes a block into two 256-float stack buffers, updates m and v, computes u,
// accumulates the norms, requantizes m and v right away and stores u in a wave-sized scratch; pass 2 reads u back
// (still in the cache) and updates p. A tensor larger than kWave is a wave of its own that is not stored: pass 1
// only sums the norms (codes untouched), pass 2 dequantizes again, recomputes m, v, u with the same code (same
// bits), updates p and requantizes. So no scratch of the parameters' size is ever allocated: the point of 8-bit
// state is memory. Recomputing costs a second dequantize + update per element; storing would cost 4 bytes per
// element of a tensor-sized buffer (an embedding of 30M parameters: 120 MB, more than its 8-bit state).
//
// The block-wise quantization (dequant, quant, the register lookup tables) is fused_adam8bit.cpp's: blockwise_quant8.h.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../check_util.h"
#include "../fused_adam8bit.h"
#include "../fused_lamb8bit.h"
#include "../optim_common.h"
#include "blockwise_quant8.h"
#include "rounding_barrier.h"

namespace mltoolkit {
namespace {

constexpr int64_t kBlock = kAdam8bitBlock;
constexpr int64_t kBlocksPerTask = 64;
// Elements per wave: p, g, codes and the stored u of a wave (~14 MiB) stay in the cache between the passes.
// (MLTK_LAMB8BIT_WAVE overrides it for measurements: 1 makes every tensor take the recompute path.)
#ifdef MLTK_LAMB8BIT_WAVE
constexpr int64_t kWave = MLTK_LAMB8BIT_WAVE;
#else
constexpr int64_t kWave = 1 << 20;
#endif

using Vec = at::vec::Vectorized<float>;
using namespace blockwise_quant8;  // lut / Tables / dequant / quant / nan_max / map_of / Ptrs / Task

// ---- the 8-bit LAMB step ------------------------------------------------------------------------------------------

struct Consts {
  float b1, b3, b2, c2, ibc1, ibc2, eps, wd;
  const float* qs;     // signed map (256)
  const float* qu;     // unsigned map (256)
  const float* mid_s;  // 255 midpoints (+ 1 pad)
  const float* mid_u;
};

enum class Mode {
  kStore,     // pass 1 of a stored wave: u -> scratch, m, v requantized
  kNorms,     // pass 1 of a large tensor: norms only, state untouched
  kRecompute  // pass 2 of a large tensor: m, v, u again, p updated, m, v requantized
};

// p = p - (u * scale), the product rounded on its own
inline void apply(float* p, const float* u, int64_t n, float scale) {
  const Vec vs(scale);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(p + j) - opaque(Vec::loadu(u + j) * vs)).store(p + j);
  for (; j < n; ++j) p[j] = p[j] - opaque(u[j] * scale);
}

template <Mode kMode, bool kDecay>
void lamb_block(const Ptrs& t, const Consts& k, const Tables& tb, int64_t block, float* u_store, float scale,
                double& pp, double& uu) {
  const int64_t begin = block * kBlock;
  const int64_t len = std::min(kBlock, t.numel - begin);
  alignas(64) float m[kBlock];
  alignas(64) float v[kBlock];
  alignas(64) float ubuf[kBlock];
  float* u = kMode == Mode::kStore ? u_store : ubuf;
  dequant(t.mc + begin, k.qs, tb, true, t.ma[block], m, len);
  dequant(t.vc + begin, k.qu, tb, false, t.va[block], v, len);
  const float* p = t.p + begin;
  const float* g = t.g + begin;
  const Vec vb1(k.b1), vb3(k.b3), vb2(k.b2), vc2(k.c2), vibc1(k.ibc1), vibc2(k.ibc2), veps(k.eps), vwd(k.wd);
  Vec acc_p(0.0f), acc_u(0.0f), amax_m(0.0f), amax_v(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) {
    const Vec gv = Vec::loadu(g + j), pv = Vec::loadu(p + j);
    const Vec mv = opaque(Vec::loadu(m + j) * vb1) + opaque(gv * vb3);
    const Vec vv = opaque(Vec::loadu(v + j) * vb2) + opaque(opaque(gv * gv) * vc2);
    Vec uv = opaque(mv * vibc1) / (opaque(vv * vibc2).sqrt() + veps);
    if (kDecay) uv = uv + opaque(pv * vwd);
    uv.store(u + j);
    acc_p = at::vec::fmadd(pv, pv, acc_p);
    acc_u = at::vec::fmadd(uv, uv, acc_u);
    if (kMode != Mode::kNorms) {
      mv.store(m + j);
      vv.store(v + j);
      amax_m = at::vec::maximum(amax_m, mv.abs());
      amax_v = at::vec::maximum(amax_v, vv.abs());
    }
  }
  float sp = 0.0f, su = 0.0f, am = 0.0f, av = 0.0f;
  {
    alignas(64) float b[4][Vec::size()];
    acc_p.store(b[0]);
    acc_u.store(b[1]);
    amax_m.store(b[2]);
    amax_v.store(b[3]);
    for (int q = 0; q < Vec::size(); ++q) {
      sp += b[0][q];
      su += b[1][q];
      am = nan_max(am, b[2][q]);
      av = nan_max(av, b[3][q]);
    }
  }
  for (; j < len; ++j) {
    const float gs = g[j], ps = p[j];
    const float ms = opaque(m[j] * k.b1) + opaque(gs * k.b3);
    const float vs = opaque(v[j] * k.b2) + opaque(opaque(gs * gs) * k.c2);
    float us = opaque(ms * k.ibc1) / (std::sqrt(opaque(vs * k.ibc2)) + k.eps);
    if (kDecay) us = us + opaque(ps * k.wd);
    u[j] = us;
    sp += ps * ps;
    su += us * us;
    m[j] = ms;
    v[j] = vs;
    am = nan_max(am, std::abs(ms));
    av = nan_max(av, std::abs(vs));
  }
  pp += sp;
  uu += su;
  if (kMode == Mode::kNorms) return;
  if (kMode == Mode::kRecompute) apply(t.p + begin, u, len, scale);
  quant(m, am, k.mid_s, tb, true, t.mc + begin, len);
  quant(v, av, k.mid_u, tb, false, t.vc + begin, len);
  t.ma[block] = am;
  t.va[block] = av;
}

using BlockFn = void (*)(const Ptrs&, const Consts&, const Tables&, int64_t, float*, float, double&, double&);

template <Mode kMode>
BlockFn pick(bool decay) {
  return decay ? &lamb_block<kMode, true> : &lamb_block<kMode, false>;
}

}  // namespace

void fused_lamb8bit_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avg_codes, const std::vector<at::Tensor>& exp_avg_absmax,
                        const std::vector<at::Tensor>& exp_avg_sq_codes,
                        const std::vector<at::Tensor>& exp_avg_sq_absmax, const at::Tensor& qmap_signed,
                        const at::Tensor& qmap_unsigned, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t step, bool bias_correction, bool grad_averaging,
                        bool use_trust_ratio, double max_trust_ratio) {
  const char* fn = "fused_lamb8bit_cpu";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avg_codes.size() == n && exp_avg_absmax.size() == n &&
                  exp_avg_sq_codes.size() == n && exp_avg_sq_absmax.size() == n,
              fn, ": params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes and exp_avg_sq_absmax must ",
              "have one length");
  TORCH_CHECK(n < (size_t(1) << 31), fn, ": too many tensors (", n, ")");
  TORCH_CHECK(step >= 1, fn, ": step must be >= 1, got ", step);
  const std::vector<float> qs = map_of(fn, "qmap_signed", qmap_signed);
  const std::vector<float> qu = map_of(fn, "qmap_unsigned", qmap_unsigned);
  std::vector<float> mid_s(256), mid_u(256);
  for (int q = 0; q < 255; ++q) {
    mid_s[q] = (qs[q] + qs[q + 1]) * 0.5f;
    mid_u[q] = (qu[q] + qu[q + 1]) * 0.5f;
  }
  mid_s[255] = mid_u[255] = INFINITY;  // never read: the search probes indices 0..254

  std::vector<Ptrs> ptrs(n);
  std::vector<Task> tasks;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t numel = check_8bit_state_tensor(fn, i, params, grads, exp_avg_codes, exp_avg_absmax,
                                                  exp_avg_sq_codes, exp_avg_sq_absmax, kBlock, nullptr);
    const int64_t nb = (numel + kBlock - 1) / kBlock;
    ptrs[i] = {p.data_ptr<float>(),
               grads[i].data_ptr<float>(),
               exp_avg_codes[i].data_ptr<uint8_t>(),
               exp_avg_sq_codes[i].data_ptr<uint8_t>(),
               exp_avg_absmax[i].data_ptr<float>(),
               exp_avg_sq_absmax[i].data_ptr<float>(),
               numel};
    for (int64_t b = 0; b < nb; b += kBlocksPerTask)
      tasks.push_back({static_cast<int32_t>(i), b, std::min(nb, b + kBlocksPerTask)});
  }
  const double s = static_cast<double>(step);
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, s) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, s) : 1.0;
  const Consts k{static_cast<float>(beta1),
                 static_cast<float>(grad_averaging ? 1.0 - beta1 : 1.0),
                 static_cast<float>(beta2),
                 static_cast<float>(1.0 - beta2),
                 static_cast<float>(1.0 / bc1),
                 static_cast<float>(1.0 / bc2),
                 static_cast<float>(eps),
                 static_cast<float>(weight_decay),
                 qs.data(),
                 qu.data(),
                 mid_s.data(),
                 mid_u.data()};
  const bool decay = weight_decay != 0.0;
  const BlockFn store_fn = pick<Mode::kStore>(decay), norms_fn = pick<Mode::kNorms>(decay),
                recompute_fn = pick<Mode::kRecompute>(decay);

  const int64_t nt = static_cast<int64_t>(tasks.size());
  std::vector<double> sums(2 * nt, 0.0);
  std::vector<int64_t> offset(nt, 0);  // a stored task's first element in the wave's scratch
  std::vector<float> scale(n, 0.0f);
  int64_t total = 0;
  for (const Ptrs& t : ptrs) total += t.numel;
  // Kept between calls (per calling thread, at most kWave floats): a fresh 4 MiB buffer each step costs page
  // faults where malloc maps large blocks anew each time (as csrc/cpu/fused_lamb.cpp).
  static thread_local std::vector<float> scratch_buf;
  if (scratch_buf.size() < static_cast<size_t>(std::min(total, kWave)))
    scratch_buf.resize(static_cast<size_t>(std::min(total, kWave)));

  int64_t t_begin = 0;
  while (t_begin < nt) {
    int64_t t_end = t_begin, elems = 0;
    while (t_end < nt) {
      const int32_t ti = tasks[t_end].tensor;
      const int64_t tn = ptrs[ti].numel;
      if (elems > 0 && elems + tn > kWave) break;
      elems += tn;
      while (t_end < nt && tasks[t_end].tensor == ti) ++t_end;
    }
    const bool stored = elems <= kWave;
    float* scratch = scratch_buf.data();
    for (int64_t q = t_begin, off = 0; q < t_end; ++q) {
      offset[q] = off;
      off += std::min(tasks[q].block_end * kBlock, ptrs[tasks[q].tensor].numel) - tasks[q].block_begin * kBlock;
    }
    at::parallel_for(t_begin, t_end, 1, [&](int64_t lo, int64_t hi) {
      Tables tb;
      load_tables(tb, k.qs, k.qu, k.mid_s, k.mid_u);
      for (int64_t q = lo; q < hi; ++q) {
        const Task& task = tasks[q];
        const Ptrs& t = ptrs[task.tensor];
        double pp = 0.0, uu = 0.0;
        for (int64_t b = task.block_begin; b < task.block_end; ++b) {
          if (stored) {
            store_fn(t, k, tb, b, scratch + offset[q] + (b - task.block_begin) * kBlock, 0.0f, pp, uu);
          } else {
            norms_fn(t, k, tb, b, nullptr, 0.0f, pp, uu);
          }
        }
        sums[2 * q] = pp;
        sums[2 * q + 1] = uu;
      }
    });
    // per-tensor norms (tasks added in order), then the step scale float32(lr * trust)
    for (int64_t q = t_begin; q < t_end;) {
      const int32_t ti = tasks[q].tensor;
      double pn = 0.0, un = 0.0;
      for (; q < t_end && tasks[q].tensor == ti; ++q) {
        pn += sums[2 * q];
        un += sums[2 * q + 1];
      }
      const double w = std::sqrt(pn), u = std::sqrt(un);
      double trust = (use_trust_ratio && w > 0.0 && u > 0.0) ? w / u : 1.0;
      if (max_trust_ratio > 0.0) trust = std::min(trust, max_trust_ratio);
      scale[ti] = static_cast<float>(lr * trust);
    }
    at::parallel_for(t_begin, t_end, 1, [&](int64_t lo, int64_t hi) {
      Tables tb;
      if (!stored) load_tables(tb, k.qs, k.qu, k.mid_s, k.mid_u);
      for (int64_t q = lo; q < hi; ++q) {
        const Task& task = tasks[q];
        const Ptrs& t = ptrs[task.tensor];
        const float sc = scale[task.tensor];
        if (stored) {
          const int64_t b0 = task.block_begin * kBlock;
          apply(t.p + b0, scratch + offset[q], std::min(task.block_end * kBlock, t.numel) - b0, sc);
        } else {
          double pp = 0.0, uu = 0.0;
          for (int64_t b = task.block_begin; b < task.block_end; ++b) recompute_fn(t, k, tb, b, nullptr, sc, pp, uu);
        }
      }
    });
    t_begin = t_end;
  }
}

}  // namespace mltoolkit
