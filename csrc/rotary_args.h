// Argument checks of the rotary kernels (contract: the "Rotary embedding" part of csrc/attention.h), shared by the
// CPU kernel and the CUDA glue so that both accept and reject exactly the same inputs with the same messages.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mltoolkit::rotary_args {

inline bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Defined, dense and on the kernel's device type; `x` (when given) is the tensor whose device the others must share.
inline void check_device(const char* fn, const char* name, const at::Tensor& t, at::DeviceType device,
                         const at::Tensor* x = nullptr) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().type() == device, fn, ": ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  if (x != nullptr) {
    TORCH_CHECK(t.device() == x->device(), fn, ": ", name, " must be on x's device (", x->device(), "), got ",
                t.device());
  }
}

// x or out: (B, L, H, D) with unit stride in the last dim (a dim of size 1 has no meaningful stride).
inline void check_rows(const char* fn, const char* name, const at::Tensor& t, at::DeviceType device,
                       const at::Tensor* x = nullptr) {
  check_device(fn, name, t, device, x);
  TORCH_CHECK(t.dim() == 4, fn, ": ", name, " must be 4-D (batch, seqlen, nheads, headdim), got shape ", t.sizes());
  TORCH_CHECK(supported(t.scalar_type()), fn, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, fn, ": ", name, " must have stride 1 in its last dim, got strides ",
              t.strides());
}

inline void check_table(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
                        at::DeviceType device) {
  check_device(fn, name, t, device, &x);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(1), fn, ": ", name, " must have shape (seqlen, rotary_dim / 2) "
              "with seqlen = x.size(1) = ", x.size(1), ", got ", t.sizes());
  TORCH_CHECK(2 * t.size(1) <= x.size(3), fn, ": ", name, " has ", t.size(1), " columns, so rotary_dim = ",
              2 * t.size(1), " exceeds headdim = ", x.size(3));
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, fn, ": ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ", t.strides());
}

// Every check of the contract; returns false when there is nothing to do (x is empty).
inline bool check(const char* fn, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& out, at::DeviceType device) {
  check_rows(fn, "x", x, device);
  check_rows(fn, "out", out, device, &x);
  TORCH_CHECK(out.sizes() == x.sizes(), fn, ": out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), fn, ": out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  check_table(fn, "cos", cos, x, device);
  check_table(fn, "sin", sin, x, device);
  TORCH_CHECK(sin.sizes() == cos.sizes(), fn, ": sin must have cos's shape ", cos.sizes(), ", got ", sin.sizes());
  if (x.numel() == 0) return false;
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);
  TORCH_CHECK(out.data_ptr() != x.data_ptr() || out.strides() == x.strides(), fn,
              ": out starts where x does but has other strides (", out.strides(), " vs ", x.strides(),
              "); in place, pass x itself as out");
  return true;
}

// One table dtype for the kernel: float64 for float64 x, float32 when cos and sin differ, else theirs. The tables
// are small, so the widening copy costs little.
inline at::ScalarType table_dtype(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (x.scalar_type() == at::kDouble) return at::kDouble;
  return cos.scalar_type() != sin.scalar_type() ? at::kFloat : cos.scalar_type();
}

}  // namespace mltoolkit::rotary_args
