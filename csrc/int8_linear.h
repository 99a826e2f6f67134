// Host entry points of the int8 dynamic-quantized linear: symmetric per-row quantization and an int8 x int8 GEMM with
// exact int32 accumulation and a fused dequantize epilogue. One contract for every backend (C++ CPU here; Triton and
// CUDA later); mltoolkit/ops/int8.py is the only caller and mltoolkit/ops/reference/int8.py writes it in plain
// PyTorch (the oracle, bit-exact with these kernels).
//
// quantize_rows(x (R, K) float32 / float16 / bfloat16, rows with a contiguous last dim) -> {q int8 (R, K), scale
//   float32 (R,)}. Serves both quantize_per_token (activations, one row per token) and quantize_per_channel (weights
//   (N, K), one row per output channel); the rule is the same, per row r, all arithmetic in float32:
//     absmax = max_k |float(x[r, k])|,   s = absmax / 127   (one IEEE division, round to nearest)
//     scale[r] = s if s >= FLT_MIN else 1    (a zero row, or one so small that absmax / 127 is subnormal, gets
//                                              scale 1 and quantizes to zeros: never a division by zero or a
//                                              scale that is not a normal float)
//     q[r, k] = clamp(round_half_to_even(float(x[r, k]) / scale[r]), -127, 127)   (a true division, not a multiply
//                                              by the reciprocal: ties land exactly where the reference puts them)
//   q never holds -128 (symmetric range). Non-finite inputs give unspecified (but memory-safe) q and scale. K = 0
//   gives scale 1.
//
// int8_linear(xq int8 (M, K), x_scale float32 (M,), wq int8 (N, K), w_scale float32 (N,), bias float32 (N,) or
//   None, out_dtype float32 / float16 / bfloat16) -> y (M, N) in out_dtype:
//     acc[m, n] = sum_k int32(xq[m, k]) * int32(wq[n, k])          exact (any int8 values, -128 included),
//                                                                   K <= 131071 so that no sum can leave int32
//     y[m, n]   = out_dtype(((float(acc) * x_scale[m]) * w_scale[n]) + bias[n])
//   the epilogue in float32, each operation rounded to nearest in that order (no FMA contraction), then one
//   rounding to out_dtype. xq rows must have a contiguous last dim (any row stride; else they are copied). x_scale is
//   read with its stride: an expanded scalar (stride 0, a static per-tensor scale) costs no copy.
//
// wq comes in one of two layouts (same results):
//   plain  (N, K) int8, rows with a contiguous last dim;
//   packed (ceil(N / 64), ceil(K / 4), 64, 4) int8, contiguous, from int8_pack_weight (mltoolkit.ops):
//          packed[p, q, j, t] = wq[64 p + j, 4 q + t] ^ 0x80 (the sign bit flipped: the byte read as unsigned is
//          wq + 128), and 0x80 (a zero weight) where 64 p + j >= N or 4 q + t >= K. Panels of 64 output channels,
//          4 consecutive k per 256-byte step: the CPU VNNI kernel streams a panel sequentially and feeds each
//          64-byte row straight to vpdpbusd, whose first operand is unsigned. N is then w_scale's length.
//   The packed format is CPU-kernel data (derived on use, never saved; a GPU backend may refuse it).
// CPU paths (chosen per call; all give identical results): "vnni" (AVX-512 VNNI vpdpbusd, when the CPU has it),
// "avx2" (vpmovsxbw + vpmaddwd), "scalar" (portable C++). MLTK_INT8_ISA=vnni|avx2|scalar|auto forces one (an
// unavailable one is an error); int8_isa_cpu() names the path a call would take now.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <string>
#include <vector>

namespace mltoolkit {

std::vector<at::Tensor> quantize_rows_cpu(const at::Tensor& x);

at::Tensor int8_linear_cpu(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& wq,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);

std::string int8_isa_cpu();

#ifdef MLTK_WITH_CUDA
// CUDA (csrc/cuda/int8_linear.cu, glue in csrc/cuda/quant_cuda.cpp): same arguments and results, except that wq must
// be plain (N, K) rows: the packed layout is refused (mltoolkit/ops/int8.py unpacks it first). Paths: "mma" (sm_80+
// int8 tensor cores; K % 16 == 0 and 16-byte aligned rows) and "dp4a" (sm_61+, anything else);
// MLTK_INT8_CUDA_PATH=auto|mma|dp4a forces one.
std::vector<at::Tensor> quantize_rows_cuda(const at::Tensor& x);

at::Tensor int8_linear_cuda(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& wq,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);
#endif

}  // namespace mltoolkit
