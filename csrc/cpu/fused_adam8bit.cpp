// CPU fused multi-tensor 8-bit AdamW step; the contract is in csrc/fused_adam8bit.h.
//
// Work unit: one block of 256 elements of one tensor (its two absmax values are its own, so a block never needs
// another block's data and the result cannot depend on the thread count). All blocks of all tensors of a call are
// listed in tasks of up to kBlocksPerTask blocks and shared by one at::parallel_for. A block is processed in one pass
// over memory: the codes are dequantized into two 256-float stack buffers (a gather from the 256-entry map), the
// AdamW update runs on the buffers with fused_adam.cpp's float32 arithmetic (the same fma / rounding barriers, so
// the new moments equal torch's lerp_ / mul_ + addcmul_ bit for bit), p is written, and the new moments are
// requantized: absmax, an IEEE division, and the nearest code found by a branchless binary search over the 255
// sorted midpoints. AVX-512: 16 elements at once, every table lookup (map, search levels) a register permute
// (vpermps / vpermt2ps + blends), no memory gathers; AVX2: 8 at once with vector gathers; scalar elsewhere.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../fused_adam8bit.h"
#include "../optim_common.h"
#include "blockwise_quant8.h"
#include "rounding_barrier.h"

namespace mltoolkit {
namespace {

constexpr int64_t kBlock = kAdam8bitBlock;
constexpr int64_t kBlocksPerTask = 64;

using Vec = at::vec::Vectorized<float>;
using namespace blockwise_quant8;  // lut / Tables / dequant / quant / nan_max / map_of / Ptrs / Task

struct Consts {
  float coeff, beta2, c2, eps;
  bool small_w;
  const float* qs;     // signed map (256)
  const float* qu;     // unsigned map (256)
  const float* mid_s;  // 255 midpoints (+ 1 pad)
  const float* mid_u;
};


template <bool kDecay, bool kMaximize>
void update_block(const Ptrs& t, const AdamWCoeffs& c, const Consts& k, const Tables& tb, int64_t block) {
  const int64_t begin = block * kBlock;
  const int64_t len = std::min(kBlock, t.numel - begin);
  alignas(64) float m[kBlock];
  alignas(64) float v[kBlock];
  dequant(t.mc + begin, k.qs, tb, true, t.ma[block], m, len);
  dequant(t.vc + begin, k.qu, tb, false, t.va[block], v, len);
  float* p = t.p + begin;
  const float* g = t.g + begin;
  const Vec vdecay(c.decay), vcoeff(k.coeff), vbeta2(k.beta2), vc2(k.c2), vbc2(c.bc2_sqrt), veps(k.eps),
      vstep(c.neg_step_size);
  Vec amax_m(0.0f), amax_v(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) {
    Vec gv = Vec::loadu(g + j);
    if (kMaximize) gv = gv.neg();
    Vec pv = Vec::loadu(p + j);
    Vec mv = Vec::loadu(m + j);
    Vec vv = Vec::loadu(v + j);
    if (kDecay) pv = opaque(pv * vdecay);
    mv = at::vec::fmadd(vcoeff, gv - mv, k.small_w ? mv : gv);
    vv = at::vec::fmadd(opaque(vc2 * gv), gv, opaque(vv * vbeta2));
    Vec d = vv.sqrt() / vbc2 + veps;
    pv = pv + vstep * mv / d;
    pv.store(p + j);
    mv.store(m + j);
    vv.store(v + j);
    amax_m = at::vec::maximum(amax_m, mv.abs());
    amax_v = at::vec::maximum(amax_v, vv.abs());
  }
  float am = 0.0f, av = 0.0f;
  {
    alignas(64) float bm[Vec::size()];
    alignas(64) float bv[Vec::size()];
    amax_m.store(bm);
    amax_v.store(bv);
    for (int q = 0; q < Vec::size(); ++q) {
      am = nan_max(am, bm[q]);
      av = nan_max(av, bv[q]);
    }
  }
  for (; j < len; ++j) {
    float gs = kMaximize ? -g[j] : g[j];
    float ps = p[j], ms = m[j], vs = v[j];
    if (kDecay) ps = opaque(ps * c.decay);
    ms = std::fma(k.coeff, gs - ms, k.small_w ? ms : gs);
    vs = std::fma(opaque(k.c2 * gs), gs, opaque(vs * k.beta2));
    float d = std::sqrt(vs) / c.bc2_sqrt + k.eps;
    ps = ps + c.neg_step_size * ms / d;
    p[j] = ps;
    m[j] = ms;
    v[j] = vs;
    am = nan_max(am, std::abs(ms));
    av = nan_max(av, std::abs(vs));
  }
  quant(m, am, k.mid_s, tb, true, t.mc + begin, len);
  quant(v, av, k.mid_u, tb, false, t.vc + begin, len);
  t.ma[block] = am;
  t.va[block] = av;
}

using UpdateFn = void (*)(const Ptrs&, const AdamWCoeffs&, const Consts&, const Tables&, int64_t);

UpdateFn pick(bool decay, bool maximize) {
  if (decay) return maximize ? &update_block<true, true> : &update_block<true, false>;
  return maximize ? &update_block<false, true> : &update_block<false, false>;
}


}  // namespace

void fused_adamw8bit_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avg_codes, const std::vector<at::Tensor>& exp_avg_absmax,
                         const std::vector<at::Tensor>& exp_avg_sq_codes,
                         const std::vector<at::Tensor>& exp_avg_sq_absmax, const std::vector<at::Tensor>& state_steps,
                         const at::Tensor& qmap_signed, const at::Tensor& qmap_unsigned, double lr, double beta1,
                         double beta2, double weight_decay, double eps, bool maximize) {
  const char* fn = "fused_adamw8bit_cpu";
  const size_t n = params.size();
  check_adamw8bit_lengths(fn, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                          state_steps);
  TORCH_CHECK(n < (size_t(1) << 31), fn, ": too many tensors (", n, ")");
  const std::vector<float> qs = map_of(fn, "qmap_signed", qmap_signed);
  const std::vector<float> qu = map_of(fn, "qmap_unsigned", qmap_unsigned);
  std::vector<float> mid_s(256), mid_u(256);
  for (int k = 0; k < 255; ++k) {
    mid_s[k] = (qs[k] + qs[k + 1]) * 0.5f;
    mid_u[k] = (qu[k] + qu[k + 1]) * 0.5f;
  }
  mid_s[255] = mid_u[255] = INFINITY;  // never read: the search probes indices 0..254

  std::vector<Ptrs> ptrs(n);
  std::vector<Task> tasks;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = check_adamw8bit_tensor(fn, i, params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                                 exp_avg_sq_absmax, state_steps, kBlock, nullptr);
    const at::Tensor& p = params[i];
    ptrs[i] = {p.data_ptr<float>(),
               grads[i].data_ptr<float>(),
               exp_avg_codes[i].data_ptr<uint8_t>(),
               exp_avg_sq_codes[i].data_ptr<uint8_t>(),
               exp_avg_absmax[i].data_ptr<float>(),
               exp_avg_sq_absmax[i].data_ptr<float>(),
               numel};
  }
  const std::vector<AdamWCoeffs> coeffs = adamw_step_coeffs(state_steps, lr, beta1, beta2, weight_decay);
  for (size_t i = 0; i < n; ++i) {
    const int64_t nb = (ptrs[i].numel + kBlock - 1) / kBlock;
    for (int64_t b = 0; b < nb; b += kBlocksPerTask)
      tasks.push_back({static_cast<int32_t>(i), b, std::min(nb, b + kBlocksPerTask)});
  }
  const AdamWScalars sc = adamw_scalars(beta1, beta2, eps);
  const Consts k{sc.lerp_coeff,
                 sc.beta2,
                 sc.c2,
                 sc.eps,
                 sc.small_w,
                 qs.data(),
                 qu.data(),
                 mid_s.data(),
                 mid_u.data()};
  const UpdateFn run = pick(weight_decay != 0, maximize);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
    Tables tb;
    load_tables(tb, k.qs, k.qu, k.mid_s, k.mid_u);
    for (int64_t q = lo; q < hi; ++q) {
      const Task& task = tasks[q];
      for (int64_t b = task.block_begin; b < task.block_end; ++b)
        run(ptrs[task.tensor], coeffs[task.tensor], k, tb, b);
    }
  });
}

}  // namespace mltoolkit
