// Tensor glue of the CUDA attention kernels (csrc/cuda/attention.cu): argument checks, the kernels' view of the inputs
// (a zero-padded copy when the head dim is not a multiple of 8 or a tensor is not 16-byte addressable), output
// allocation, device guard, current stream, launch-error checks. Contract: csrc/attention.h.
//
// Covered: float16 / bfloat16, 1 <= D <= 256, GQA, Lq != Lk, strides, additive mask (expanded views), varlen,
// window / causal (top-left or bottom-right), dropout, fully masked rows; the backward is always deterministic.
// float32 / float64 are refused (the Triton and CPU backends take them).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "attention.h"
#include "attention_launch.h"

namespace mltoolkit {
namespace {

namespace ca = cuda_attention;

constexpr int64_t kMaxRows = int64_t{1} << 28;  // keeps the kernels' row arithmetic in int32
constexpr int64_t kMaxGridYZ = 65535;           // heads and sequences are grid dimensions y and z

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

void check_device(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), fn, ": ", name, " must be on q's device (", q.device(), "), got ",
              t.device());
}

// (B, H, L, D) in q's dtype on q's device.
void check_bhld(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  check_device(t, fn, name, q);
  TORCH_CHECK(t.dim() == 4, fn, ": ", name, " must be 4-D (B, H, L, D), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), fn, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
}

// The kernels read 16-byte chunks: head dim a multiple of 8, unit last stride, other strides multiples of 8 elements
// (size-1 dimensions are never stepped), 16-byte aligned base.
bool kernel_ready(const at::Tensor& t) {
  if (t.size(-1) % 8 != 0 || (t.size(-1) > 1 && t.stride(-1) != 1)) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The kernels' view of a (B, H, L, D) input: the tensor itself, or a contiguous copy zero-padded to head dim d8.
at::Tensor kernel_input(const at::Tensor& t, int64_t d8) {
  if (t.size(-1) == d8 && kernel_ready(t)) return t;
  at::Tensor r = at::zeros({t.size(0), t.size(1), t.size(2), d8}, t.options());
  r.narrow(-1, 0, t.size(-1)).copy_(t);
  return r;
}

// Where the kernel writes an output: the output itself, or a padded buffer copied into it afterwards (finish()).
// zero: start from zeros (varlen leaves packed rows outside every sequence unwritten).
struct KernelOutput {
  at::Tensor dst, buf;
  KernelOutput(const at::Tensor& out, int64_t d8, bool zero) : dst(out) {
    if (out.size(-1) == d8 && kernel_ready(out)) {
      buf = out;
      if (zero) buf.zero_();
    } else {
      const std::vector<int64_t> shape{out.size(0), out.size(1), out.size(2), d8};
      buf = zero ? at::zeros(shape, out.options()) : at::empty(shape, out.options());
    }
  }
  void finish() {
    if (!buf.is_same(dst)) dst.copy_(buf.narrow(-1, 0, dst.size(-1)));
  }
};

ca::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void check_status(const ca::LaunchStatus& st, const char* fn) {
  TORCH_CHECK(st.what == nullptr, fn, ": ", st.what);
  TORCH_CHECK(st.cuda == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(st.cuda), ": ",
              cudaGetErrorString(st.cuda));
}

// -1 (unbounded) for negative windows and for windows wider than any sequence (rows are < 2^28).
int window_arg(int64_t w) { return w < 0 || w > (int64_t{1} << 29) ? -1 : static_cast<int>(w); }

// Checks everything forward and backward share and fills the kernel parameters that do not point at data.
// Returns the padded head dim d8.
int64_t check_common(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& mask, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_seqlen_q,
                     int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
                     bool bottom_right, double dropout_p, int64_t seed, ca::Params& p) {
  TORCH_CHECK(q.defined(), fn, ": q is undefined");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, fn,
              ": q must be float16 or bfloat16, got ", q.scalar_type(),
              " (the CUDA kernel covers 16-bit inputs only; other backends take float32/float64)");
  TORCH_CHECK(q.is_cuda(), fn, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, fn, ": q must be 4-D (B, Hq, Lq, D), got shape ", q.sizes());
  check_bhld(k, fn, "k", q);
  check_bhld(v, fn, "v", q);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(D >= 1 && D <= ca::kMaxHeadDim, fn, ": head dim D = q.size(-1) must be in [1, ", ca::kMaxHeadDim,
              "] for the CUDA kernel, got ", D);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, fn, ": k must have shape (B, Hkv, Lk, D) with q's B = ", B,
              " and D = ", D, ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), fn, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, fn, ": q's head count ", Hq, " must be a multiple of k's ", Hkv, " (GQA)");
  TORCH_CHECK(Hq <= kMaxGridYZ, fn, ": q has too many heads for the CUDA kernel (", Hq, " > ", kMaxGridYZ, ")");
  TORCH_CHECK(Lq < kMaxRows && Lk < kMaxRows, fn,
              ": more than 2^28 rows are not supported by the CUDA kernel (Lq = ", Lq, ", Lk = ", Lk, ")");
  TORCH_CHECK(!(scale != scale), fn, ": scale is NaN");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ", dropout_p);

  TORCH_CHECK(cu_q.defined() == cu_k.defined(), fn, ": cu_seqlens_q and cu_seqlens_k must be given together");
  const bool varlen = cu_q.defined();
  int64_t nseq = B;
  if (varlen) {
    for (const auto& [t, name] : {std::pair{cu_q, "cu_seqlens_q"}, std::pair{cu_k, "cu_seqlens_k"}}) {
      check_device(t, fn, name, q);
      TORCH_CHECK(t.scalar_type() == at::kInt, fn, ": ", name, " must be int32, got ", t.scalar_type());
      TORCH_CHECK(t.dim() == 1 && t.size(0) >= 2, fn, ": ", name, " must be 1-D with nseq + 1 >= 2 entries, got shape ",
                  t.sizes());
      TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
    }
    TORCH_CHECK(cu_q.size(0) == cu_k.size(0), fn, ": cu_seqlens_q and cu_seqlens_k must have the same length, got ",
                cu_q.size(0), " and ", cu_k.size(0));
    TORCH_CHECK(B == 1, fn, ": varlen (cu_seqlens) needs packed tensors with B == 1, got B = ", B);
    TORCH_CHECK(!mask.defined(), fn, ": mask cannot be combined with varlen (cu_seqlens)");
    nseq = cu_q.size(0) - 1;
  }
  TORCH_CHECK(nseq <= kMaxGridYZ, fn, ": too many sequences for the CUDA kernel (", nseq, " > ", kMaxGridYZ, ")");
  if (mask.defined()) {
    check_device(mask, fn, "mask", q);
    TORCH_CHECK(mask.scalar_type() == q.scalar_type(), fn, ": mask must be additive with q's dtype ", q.scalar_type(),
                ", got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == B && mask.size(1) == Hq && mask.size(2) == Lq && mask.size(3) == Lk,
                fn, ": mask must have shape (B, Hq, Lq, Lk) = (", B, ", ", Hq, ", ", Lq, ", ", Lk,
                ") (an expanded view for broadcasting), got ", mask.sizes());
    p.mask = mask.data_ptr();
    p.mask_b = mask.stride(0);
    p.mask_h = mask.stride(1);
    p.mask_i = mask.stride(2);
    p.mask_j = mask.stride(3);
  }

  p.cu_q = varlen ? cu_q.data_ptr<int32_t>() : nullptr;
  p.cu_k = varlen ? cu_k.data_ptr<int32_t>() : nullptr;
  p.nseq = static_cast<int>(nseq);
  p.batch = static_cast<int>(B);
  p.hq = static_cast<int>(Hq);
  p.hkv = static_cast<int>(Hkv);
  p.lq = static_cast<int>(Lq);
  p.lk = static_cast<int>(Lk);
  // Grid sizing only (the kernels loop over rows past it), so a wrong max_seqlen costs time, not correctness.
  p.max_lq = static_cast<int>(varlen ? std::max<int64_t>(1, std::min(max_seqlen_q, Lq)) : Lq);
  p.max_lk = static_cast<int>(varlen ? std::max<int64_t>(1, std::min(max_seqlen_k, Lk)) : Lk);
  p.d8 = static_cast<int>((D + 7) / 8 * 8);
  p.scale = static_cast<float>(scale);
  p.window_left = window_arg(window_left);
  p.window_right = window_arg(window_right);
  p.bottom_right = bottom_right;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.dropout_threshold = static_cast<uint32_t>(std::min<double>(std::floor(dropout_p * 4294967296.0),
                                                                 std::numeric_limits<uint32_t>::max()));
  p.seed = static_cast<uint64_t>(seed);
  p.dtype = q.scalar_type() == at::kHalf ? ca::DType::kFloat16 : ca::DType::kBFloat16;
  return p.d8;
}

}  // namespace

std::vector<at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& cu_seqlens_q,
                                               const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                               int64_t max_seqlen_k, double scale, int64_t window_left,
                                               int64_t window_right, bool bottom_right, double dropout_p,
                                               int64_t seed) {
  constexpr const char* fn = "attention_forward_cuda";
  ca::Params p;
  const at::Tensor m = value_or_undefined(mask);
  const at::Tensor cq = value_or_undefined(cu_seqlens_q);
  const at::Tensor ck = value_or_undefined(cu_seqlens_k);
  const int64_t d8 = check_common(fn, q, k, v, m, cq, ck, max_seqlen_q, max_seqlen_k, scale, window_left,
                                  window_right, bottom_right, dropout_p, seed, p);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // no keys at all: every row is fully masked
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  // Packed rows outside every sequence are not written by the kernel: out 0, lse +inf there.
  if (cq.defined()) lse.fill_(std::numeric_limits<float>::infinity());
  const at::Tensor qk = kernel_input(q, d8), kk = kernel_input(k, d8), vk = kernel_input(v, d8);
  KernelOutput o(out, d8, cq.defined());
  p.q = qk.data_ptr();
  p.k = kk.data_ptr();
  p.v = vk.data_ptr();
  p.q_st = strides_of(qk);
  p.k_st = strides_of(kk);
  p.v_st = strides_of(vk);
  p.out = o.buf.data_ptr();
  p.out_st = strides_of(o.buf);
  p.lse = lse.data_ptr<float>();
  check_status(ca::attention_forward(p, c10::cuda::getCurrentCUDAStream(q.get_device()).stream()), fn);
  o.finish();
  return {out, lse};
}

std::vector<at::Tensor> attention_backward_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                const std::optional<at::Tensor>& mask,
                                                const std::optional<at::Tensor>& cu_seqlens_q,
                                                const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                int64_t max_seqlen_k, double scale, int64_t window_left,
                                                int64_t window_right, bool bottom_right, double dropout_p,
                                                int64_t seed, bool /*deterministic: always, no atomics*/) {
  constexpr const char* fn = "attention_backward_cuda";
  ca::Params p;
  const at::Tensor m = value_or_undefined(mask);
  const at::Tensor cq = value_or_undefined(cu_seqlens_q);
  const at::Tensor ck = value_or_undefined(cu_seqlens_k);
  const int64_t d8 = check_common(fn, q, k, v, m, cq, ck, max_seqlen_q, max_seqlen_k, scale, window_left,
                                  window_right, bottom_right, dropout_p, seed, p);
  check_bhld(dout, fn, "dout", q);
  TORCH_CHECK(dout.sizes() == q.sizes(), fn, ": dout must have q's shape ", q.sizes(), ", got ", dout.sizes());
  check_bhld(out, fn, "out", q);
  TORCH_CHECK(out.sizes() == q.sizes(), fn, ": out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.defined(), fn, ": lse is undefined");
  check_device(lse, fn, "lse", q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, fn, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2), fn,
              ": lse must have shape (B, Hq, Lq) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              lse.sizes());

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) {  // no query or no key: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor qk = kernel_input(q, d8), kk = kernel_input(k, d8), vk = kernel_input(v, d8);
  const at::Tensor dok = kernel_input(dout, d8), ok = kernel_input(out, d8);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  // Packed rows outside every sequence get zero gradients (the kernels do not visit them).
  KernelOutput gq(dq, d8, cq.defined()), gk(dk, d8, cq.defined()), gv(dv, d8, cq.defined());
  p.q = qk.data_ptr();
  p.k = kk.data_ptr();
  p.v = vk.data_ptr();
  p.q_st = strides_of(qk);
  p.k_st = strides_of(kk);
  p.v_st = strides_of(vk);
  p.out = ok.data_ptr();
  p.out_st = strides_of(ok);
  p.lse = lse_c.data_ptr<float>();
  p.dout = dok.data_ptr();
  p.dout_st = strides_of(dok);
  p.delta = delta.data_ptr<float>();
  p.dq = gq.buf.data_ptr();
  p.dk = gk.buf.data_ptr();
  p.dv = gv.buf.data_ptr();
  p.dq_st = strides_of(gq.buf);
  p.dk_st = strides_of(gk.buf);
  p.dv_st = strides_of(gv.buf);
  check_status(ca::attention_backward(p, c10::cuda::getCurrentCUDAStream(q.get_device()).stream()), fn);
  gq.finish();
  gk.finish();
  gv.finish();
  return {dq, dk, dv};
}

}  // namespace mltoolkit
