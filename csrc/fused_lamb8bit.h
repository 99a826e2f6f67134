// Host entry point of the fused multi-tensor 8-bit LAMB step: LAMB (You et al. 2019, arXiv:1904.00962, with apex
// FusedLAMB's options, as csrc/fused_lamb.h) whose moments are kept block-wise quantized exactly as the 8-bit AdamW
// keeps them (csrc/fused_adam8bit.h: uint8 codes of the dynamic maps, one float32 absmax per block of
// kAdam8bitBlock = 256 values, the same maps, the same nearest-code rule). mltoolkit/ops/fused_lamb8bit.py is the
// only caller and mltoolkit/ops/reference/fused_lamb8bit.py writes it in plain PyTorch (the oracle).
//
// fused_lamb8bit_cpu(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
//                    qmap_signed, qmap_unsigned, lr, beta1, beta2, eps, weight_decay, step, bias_correction,
//                    grad_averaging, use_trust_ratio, max_trust_ratio)
//   State of tensor i as in csrc/fused_adam8bit.h (codes: n uint8; absmax: ceil(n / 256) float32). step is the
//   1-based step count of this update (one for the whole list, as fused_lamb_cpu). Host constants, computed in
//   double and rounded once to float32: b1 = beta1, b3 = grad_averaging ? 1 - beta1 : 1, b2 = beta2,
//   c2 = 1 - beta2, ibc1 = bias_correction ? 1 / (1 - beta1^step) : 1, ibc2 likewise with beta2, eps, wd.
//   Per element, float32, every product and sum rounded on its own (no fma contraction), in this order:
//     m = dequant(exp_avg), v = dequant(exp_avg_sq)
//     m = (m * b1) + (g * b3);  v = (v * b2) + ((g * g) * c2)
//     u = (m * ibc1) / (sqrt(v * ibc2) + eps);  u = u + (p * wd) only when weight_decay != 0
//   Per tensor: trust = use_trust_ratio && ||p|| > 0 && ||u|| > 0 ? ||p|| / ||u|| : 1 (norms of the float32 p before
//   the update and of u, accumulated to float64 per block of 256 in a fixed order: thread-count independent);
//   trust = min(trust, max_trust_ratio) when max_trust_ratio > 0; scale = float32(lr * trust);
//     p = p - (u * scale)
//   and the new m, v are requantized block by block as in csrc/fused_adam8bit.h (absmax = max |x| of the block;
//   code = #{k : mid_k < x / (absmax > 0 ? absmax : 1)}).
//   The norms need the whole tensor's u before any p changes: pass 1 computes u and the norms, pass 2 applies it.
//   Tensors are taken in waves of about 1M elements: pass 1 of a wave requantizes m, v at once and stores u in a
//   wave-sized float32 scratch, which pass 2 reads back from the cache; a tensor over the wave size leaves its codes
//   alone in pass 1 and pass 2 recomputes m, v and u from the old codes with the same code (same bits), then
//   requantizes: no scratch of the parameters' size, so the 8-bit state's memory saving holds.
// Tensors: params, grads float32, contiguous, CPU, same shape; maps float32 CPU of 256 values.
// Errors (TORCH_CHECK naming the function and the argument): list lengths differ, a tensor of the wrong device /
// dtype / shape / size / layout, a map without 256 values, step < 1.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace mltoolkit {

void fused_lamb8bit_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avg_codes, const std::vector<at::Tensor>& exp_avg_absmax,
                        const std::vector<at::Tensor>& exp_avg_sq_codes,
                        const std::vector<at::Tensor>& exp_avg_sq_absmax, const at::Tensor& qmap_signed,
                        const at::Tensor& qmap_unsigned, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t step, bool bias_correction, bool grad_averaging,
                        bool use_trust_ratio, double max_trust_ratio);

}  // namespace mltoolkit
