// CPU fused multi-tensor AdamW step; the contract is in csrc/fused_adam.h.
//
// All tensors of the call are cut into chunks of kChunk elements (a tensor's last chunk may be shorter) and one
// at::parallel_for shares the chunks of all tensors: a step over 200 tensors is one parallel region, not 200, and
// small tensors do not leave threads idle. Each element is read once and written once per state tensor (p, g, m, v
// read; p, m, v written), the memory-bound minimum. The arithmetic copies torch's own kernels op for op (mul_, lerp_
// with its fma, mul_ then addcmul_, sqrt, div, add, addcdiv_): float32 results equal torch.optim.AdamW's except where
// torch's CPU sqrt is 1 ulp off the correctly rounded one this kernel uses (measured: ~20% of elements, torch 2.14.1).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../check_util.h"
#include "../fused_adam.h"
#include "../optim_common.h"
#include "rounding_barrier.h"

namespace mltoolkit {
namespace {

constexpr int64_t kChunk = 16384;  // elements per task (a multiple of 2 vectors: tails fall where torch's do)

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

struct Ptrs {
  float *p, *m, *v, *vmax;
  const float* g;
};

// Where torch's kernels round a product on its own (mul_ is one kernel, addcmul_ the next), these barriers keep the
// compiler from fusing it into an fma here; where torch's build fuses (addcmul_'s value * t1 * t2 + self, lerp's
// fma), the fma is written out (opaque: rounding_barrier.h). Checked bit for bit against torch.optim.AdamW in
// tests/test_optim_adamw.py.
using Vec = at::vec::Vectorized<float>;

// Elements are taken two vectors at a time and the rest one by one, as torch's cpu_kernel_vec loops do.
template <bool kDecay, bool kAmsgrad, bool kMaximize>
void update(const Ptrs& t, const AdamWCoeffs& c, const AdamWScalars& k, int64_t begin, int64_t end) {
  const bool small_w = k.small_w;
  const float coeff = k.lerp_coeff;  // torch's lerp: fma(coeff, end - start, small ? start : end)
  const float beta2 = k.beta2, c2 = k.c2, eps = k.eps;
  const Vec vdecay(c.decay), vcoeff(coeff), vbeta2(beta2), vc2(c2), vbc2(c.bc2_sqrt), veps(eps),
      vstep(c.neg_step_size);
  int64_t i = begin;
  const auto one = [&](int64_t i) {
    Vec g = Vec::loadu(t.g + i);
    if (kMaximize) g = g.neg();
    Vec p = Vec::loadu(t.p + i);
    Vec m = Vec::loadu(t.m + i);
    Vec v = Vec::loadu(t.v + i);
    if (kDecay) p = opaque(p * vdecay);
    m = at::vec::fmadd(vcoeff, g - m, small_w ? m : g);
    v = at::vec::fmadd(opaque(vc2 * g), g, opaque(v * vbeta2));  // mul_, then addcmul_ (an fma in torch's build)
    Vec denom_src = v;
    if (kAmsgrad) {
      Vec vmax = at::vec::maximum(Vec::loadu(t.vmax + i), v);
      vmax.store(t.vmax + i);
      denom_src = vmax;
    }
    Vec d = denom_src.sqrt() / vbc2 + veps;
    p = p + vstep * m / d;
    p.store(t.p + i);
    m.store(t.m + i);
    v.store(t.v + i);
  };
  for (; i + 2 * Vec::size() <= end; i += 2 * Vec::size()) {
    one(i);
    one(i + Vec::size());
  }
  for (; i < end; ++i) {
    float g = kMaximize ? -t.g[i] : t.g[i];
    float p = t.p[i], m = t.m[i], v = t.v[i];
    if (kDecay) p = opaque(p * c.decay);
    m = std::fma(coeff, g - m, small_w ? m : g);
    v = std::fma(opaque(c2 * g), g, opaque(v * beta2));
    float denom_src = v;
    if (kAmsgrad) {
      float mx = t.vmax[i];
      mx = (std::isnan(mx) || std::isnan(v)) ? NAN : std::max(mx, v);
      t.vmax[i] = mx;
      denom_src = mx;
    }
    float d = std::sqrt(denom_src) / c.bc2_sqrt + eps;
    p = p + c.neg_step_size * m / d;
    t.p[i] = p;
    t.m[i] = m;
    t.v[i] = v;
  }
}

using UpdateFn = void (*)(const Ptrs&, const AdamWCoeffs&, const AdamWScalars&, int64_t, int64_t);

template <bool kDecay, bool kAmsgrad>
UpdateFn pick2(bool maximize) {
  return maximize ? &update<kDecay, kAmsgrad, true> : &update<kDecay, kAmsgrad, false>;
}

UpdateFn pick(bool decay, bool amsgrad, bool maximize) {
  if (decay) return amsgrad ? pick2<true, true>(maximize) : pick2<true, false>(maximize);
  return amsgrad ? pick2<false, true>(maximize) : pick2<false, false>(maximize);
}

}  // namespace

std::string fused_adamw_unsupported(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                                    const std::vector<at::Tensor>& max_exp_avg_sqs, bool cuda) {
  const size_t n = params.size();
  if (grads.size() != n || (!exp_avgs.empty() && (exp_avgs.size() != n || exp_avg_sqs.size() != n)) ||
      (!max_exp_avg_sqs.empty() && max_exp_avg_sqs.size() != n))
    return "the tensor lists differ in length";
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string at_i = "params[" + std::to_string(i) + "]";
    if (!p.defined()) return at_i + " is undefined";
    if (cuda) {
      if (!p.is_cuda()) return "needs CUDA tensors, got " + at_i + " on " + c10::DeviceTypeName(p.device().type(), true);
      if (p.device() != params[0].device()) return "params on several devices (" + params[0].device().str() + ", " +
                                                   p.device().str() + ")";
      const auto t = p.scalar_type();
      if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16)
        return "float32 / float16 / bfloat16 only, got " + at_i + " of " + c10::toString(t);
    } else {
      if (!p.device().is_cpu()) return "needs CPU tensors, got " + at_i + " elsewhere";
      if (p.scalar_type() != at::kFloat) return "float32 only, got " + at_i + " of another dtype";
    }
    if (p.layout() != at::kStrided || !p.is_non_overlapping_and_dense()) return at_i + " is not dense";
    const auto unlike_p = [&](const at::Tensor& t) {
      return !t.defined() || t.scalar_type() != p.scalar_type() || t.layout() != at::kStrided ||
             t.device() != p.device() || t.sizes() != p.sizes() || (t.numel() > 1 && t.strides() != p.strides());
    };
    if (unlike_p(grads[i]) || (!exp_avgs.empty() && (unlike_p(exp_avgs[i]) || unlike_p(exp_avg_sqs[i]))) ||
        (!max_exp_avg_sqs.empty() && unlike_p(max_exp_avg_sqs[i])))
      return "grads / state of " + at_i + " are not in its dtype, device and strides";
  }
  return "";
}

void fused_adamw_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& state_steps,
                     double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                     bool maximize) {
  const char* fn = "fused_adamw_cpu";
  const size_t n = params.size();
  check_adamw_lengths(fn, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  TORCH_CHECK(n < (size_t(1) << 31), fn, ": too many tensors (", n, ")");
  std::vector<Ptrs> ptrs(n);
  for (size_t i = 0; i < n; ++i) {
    check_adamw_tensor(fn, i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, nullptr);
    const at::Tensor& p = params[i];
    ptrs[i] = {p.data_ptr<float>(), exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(),
               amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr, grads[i].data_ptr<float>()};
  }

  // Host scalars, each computed in double and rounded to float where torch rounds its Python scalars.
  const std::vector<AdamWCoeffs> coeffs = adamw_step_coeffs(state_steps, lr, beta1, beta2, weight_decay);
  const AdamWScalars k = adamw_scalars(beta1, beta2, eps);
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({static_cast<int32_t>(i), b, std::min(numel, b + kChunk)});
  }
  const UpdateFn run = pick(weight_decay != 0, amsgrad, maximize);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const Chunk& c = chunks[q];
      run(ptrs[c.tensor], coeffs[c.tensor], k, c.begin, c.end);
    }
  });
}

}  // namespace mltoolkit
