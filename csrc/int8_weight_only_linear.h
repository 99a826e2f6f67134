// Host entry point of the int8 weight-only linear: int8 weights (one float32 scale per output channel, from
// quantize_per_channel), activations kept in their float dtype, the weights converted to float inside the kernel.
// mltoolkit/ops/int8_weight_only.py is the only caller; mltoolkit/ops/reference/int8.py (int8_weight_only_linear)
// writes the same contract in plain PyTorch.
//
// int8_weight_only_linear_cpu(x (M, K) float32 / float16 / bfloat16, wq int8 (N, K), w_scale float32 (N,),
//   bias (N,) of x's dtype or None) -> y (M, N) in x's dtype:
//     y[m, n] = dtype( float32 sum over k of float(x[m, k]) * (float(wq[n, k]) * w_scale[n])  + bias[n] )
//   accumulated in float32 in an unspecified order (the small-M path sums x * wq and multiplies by w_scale once at
//   the end; the large-M path multiplies dequantized weight tiles): results agree with the reference to float32
//   rounding, not bit for bit. Any int8 weight value is allowed (-128 included). x and wq rows need a contiguous last
//   dim (else they are copied).
//
// Paths: M <= 16 (decode): a register-blocked GEMV that streams the int8 weight once (4 or 8 rows side by side,
// AVX-512 / AVX2 / scalar by the build's ISA macros), widening bytes to float in registers. M > 16: the weight is
// dequantized a tile of rows at a time (about 1 MB of float32) and each tile goes through at::addmm into its columns of
// y; the whole float weight never exists.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace mltoolkit {

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias);

}  // namespace mltoolkit
