// Host entry point of the fused multi-tensor 8-bit AdamW step (block-wise quantized moments, Dettmers et al. 2022,
// "8-bit Optimizers via Block-wise Quantization"). One contract for every backend; mltoolkit/ops/fused_adam8bit.py
// is the only caller and mltoolkit/ops/reference/fused_adam8bit.py writes it in plain PyTorch (the oracle).
//
// State of tensor i (n = params[i].numel(), nb = ceil(n / 256)):
//   exp_avg_codes[i], exp_avg_sq_codes[i]: uint8, n elements, contiguous, in params[i]'s row-major order
//   exp_avg_absmax[i], exp_avg_sq_absmax[i]: float32, nb elements, contiguous; block b covers elements
//     [256 b, min(256 (b + 1), n))
//   the moment's value of element j is qmap[code_j] * absmax[j / 256], with qmap_signed (256 sorted float32, the
//   dynamic signed map) for exp_avg and qmap_unsigned (the dynamic unsigned map) for exp_avg_sq.
// One call, for every i, in place:
//   step_i = state_steps[i] += 1; host scalars decay, step_size, bc2_sqrt exactly as csrc/fused_adam.h (the same
//     functions of csrc/optim_common.h)
//   per element, float32: m = dequant(exp_avg), v = dequant(exp_avg_sq), g = maximize ? -grad : grad
//     p = p * decay (only when wd != 0); m = lerp(m, g, 1 - beta1) (torch's lerp fma);
//     v = fma((1 - beta2) * g, g, v * beta2); d = sqrt(v) / bc2_sqrt + eps; p = p + (-step_size * m) / d
//   then per block of 256 of the new m (resp. v): absmax = max |m| over the block (stored as is, 0 for a zero
//     block); scale = absmax > 0 ? absmax : 1; x = m / scale (IEEE division); code = #{k : mid_k < x} where
//     mid_k = (qmap[k] + qmap[k+1]) * 0.5f, k = 0..254 (float32): the nearest map value, a tie going to the
//     smaller code.
// Every block is independent: the results do not depend on how blocks are shared among threads.
// Tensors: CPU kernel: params, grads float32, contiguous, same shape; maps float32 CPU of 256 values.
// Errors (TORCH_CHECK naming the function and the argument): list lengths differ, a tensor of the wrong device /
// dtype / shape / size / layout, a state step that is not a one-element float tensor, a map without 256 values.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace mltoolkit {

constexpr int64_t kAdam8bitBlock = 256;

void fused_adamw8bit_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avg_codes, const std::vector<at::Tensor>& exp_avg_absmax,
                         const std::vector<at::Tensor>& exp_avg_sq_codes,
                         const std::vector<at::Tensor>& exp_avg_sq_absmax, const std::vector<at::Tensor>& state_steps,
                         const at::Tensor& qmap_signed, const at::Tensor& qmap_unsigned, double lr, double beta1,
                         double beta2, double weight_decay, double eps, bool maximize);

}  // namespace mltoolkit
