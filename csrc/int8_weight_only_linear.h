// Host entry point of the int8 weight-only linear: int8 weights (one float32 scale per output channel, from
// quantize_per_channel), activations kept in their float dtype, the weights converted to float inside the kernel.
// mltoolkit/ops/int8_weight_only.py is the only caller; mltoolkit/ops/reference/int8.py (int8_weight_only_linear)
// writes the same contract in plain PyTorch.
//
// int8_weight_only_linear_cpu(x (M, K) float32 / float16 / bfloat16, wq int8 (N, K), w_scale float32 (N,),
//   bias (N,) of x's dtype or None) -> y (M, N) in x's dtype:
//     y[m, n] = dtype( float32 sum over k of float(x[m, k]) * (float(wq[n, k]) * w_scale[n])  + bias[n] )
//   accumulated in float32 in an unspecified order (the main path sums x * wq and multiplies by w_scale once at the
//   end; the tiled path multiplies dequantized weight tiles): results agree with the reference to float32
//   rounding, not bit for bit. Any int8 weight value is allowed (-128 included). x and wq rows need a contiguous last
//   dim (else they are copied).
//
// Paths: a register-blocked kernel that widens the int8 weight to float in registers (every M by default: for decode
// shapes it streams the int8 weight once, 4 or 8 rows side by side; AVX-512 / AVX2 / scalar by the build's ISA
// macros), or, with MLTK_INT8_WO_PATH=tiled, the weight dequantized a tile of rows at a time (about 4 MB of float32)
// and each tile multiplied through at::addmm into its columns of y (the whole float weight never exists). The second
// was measured slower here at every M (numbers in csrc/cpu/int8_weight_only_linear.cpp). MLTK_INT8_WO_PATH=gemv|tiled|
// auto (default auto = gemv); another value is an error.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace mltoolkit {

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias);

}  // namespace mltoolkit
