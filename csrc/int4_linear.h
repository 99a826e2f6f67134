// Host entry points of the int4 weight-only linear family. One contract for every backend (C++ CPU here; Triton and
// CUDA C++ follow it); mltoolkit/ops/int4.py is the only caller and mltoolkit/ops/reference/int4.py writes it in
// plain PyTorch.
//
// Format (asymmetric, group-wise, torchao's "float zero point" domain):
//   w (N, K) float: out_features x in_features, as nn.Linear stores it. Groups are group_size consecutive elements
//   of one row (k in [g*G, (g+1)*G)); G = group_size in {32, 64, 128, 256}; K must be a multiple of G; N is any.
//   Per group, in float32 (fp16 / bf16 weights are widened exactly first):
//     mn = min(w_group), mx = max(w_group)            (weights must be finite; non-finite weights are an error)
//     scale = (mx - mn) / 15                           (float32 division)
//     if scale == 0 (a constant group, or a range that underflows): scale = |mn| / 8, and 1 if that is 0 too;
//       this keeps the group exact: every q is 0 and (0 - 8) * scale + zero == mn for normal mn.
//     zero  = mn + 8 * scale                           (the float value that q = 8 stands for)
//     q     = clamp(round_half_to_even((w - mn) / scale), 0, 15)   (float32 subtraction, then float32 division)
//   Dequantized: w' = (q - 8) * scale + zero, in float32 with the product rounded before the add (no FMA), so every
//   backend's dequantize_int4 is bit-identical.
//   packed (N, K/2) uint8: byte j of a row holds q[2j] in its low nibble and q[2j+1] in its high nibble.
//   scales, zeros (N, K/G) float32 (whatever the weight's dtype), row-major, contiguous.
//
// quantize_int4(w, G) -> {packed, scales, zeros}: w float32 / float16 / bfloat16, 2-D; any strides.
// dequantize_int4(packed, scales, zeros, G) -> w' (N, K) float32.
// int4_weight_only_linear(x, packed, scales, zeros, G, bias) -> y (M, N) in x's dtype:
//   y = x @ w'^T + bias, accumulated in float32 and rounded once to x's dtype. x (M, K) float32 / float16 /
//   bfloat16 (any strides); bias (N,) of x's dtype or none. The kernels never materialize the whole float weight:
//   the CPU kernel dequantizes in registers (M <= 16) or one block of rows at a time into a cache-sized buffer.
// Errors (TORCH_CHECK, naming the function and the argument): G not in the set, K not a multiple of G, packed not
// uint8 / not (N, K/2), scales or zeros not float32 / not (N, K/G), x not 2-D float, bias not (N,) of x's dtype.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <optional>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> quantize_int4_cpu(const at::Tensor& w, int64_t group_size);

at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                               int64_t group_size);

at::Tensor int4_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t group_size,
                                       const std::optional<at::Tensor>& bias);

#ifdef MLTK_WITH_CUDA
// CUDA (csrc/cuda/int4_linear.cu, glue in csrc/cuda/quant_cuda.cpp): same arguments and results. dequantize is
// bit-identical; the linear's "gemv" path (M <= 16, and float32 x) accumulates in float32 with the scale and zero
// folded per 32-value chunk, the "mma" path (M > 16, float16 / bfloat16 x, sm_80+) rounds w' to x's dtype for the
// tensor cores (float32 accumulation). MLTK_INT4_CUDA_PATH=auto|gemv|mma forces one.
at::Tensor dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                int64_t group_size);

at::Tensor int4_weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                        const at::Tensor& zeros, int64_t group_size,
                                        const std::optional<at::Tensor>& bias);
#endif

}  // namespace mltoolkit
