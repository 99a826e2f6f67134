// The Python module mltoolkit._C: kernel entry points only. Ops, schemas and autograd live in mltoolkit/ops/, which
// picks a backend per call; this module is one of those backends.
#include <torch/python.h>

#include "attention.h"
#include "batch_norm.h"
#include "conv.h"
#include "cross_entropy.h"
#include "fake_quantize.h"
#include "fused_adam.h"
#include "fused_adam8bit.h"
#include "fused_lamb.h"
#include "fused_lamb8bit.h"
#include "int4_linear.h"
#include "int8_linear.h"
#include "int8_static.h"
#include "int8_weight_only_linear.h"
#include "lstm.h"
#include "norm.h"
#include "cpu/reused_memory.h"

#ifdef MLTK_WITH_CUDA
namespace mltoolkit {  // csrc/cuda/fused_optim_cuda.cpp (contracts: fused_adam.h, fused_lamb.h)
void fused_adamw_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                      const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& state_steps,
                      double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                      bool maximize);
void fused_lamb_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step, bool bias_correction,
                     bool grad_averaging, bool use_trust_ratio, double max_trust_ratio);
at::Tensor fused_clip_grad_norm_cuda(const std::vector<at::Tensor>& grads, double max_norm, double norm_type,
                                     bool error_if_nonfinite);
// csrc/cuda/fused_adam8bit_cuda.cpp (contract: fused_adam8bit.h)
void fused_adamw8bit_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avg_codes, const std::vector<at::Tensor>& exp_avg_absmax,
                          const std::vector<at::Tensor>& exp_avg_sq_codes,
                          const std::vector<at::Tensor>& exp_avg_sq_absmax, const std::vector<at::Tensor>& state_steps,
                          const at::Tensor& qmap_signed, const at::Tensor& qmap_unsigned, double lr, double beta1,
                          double beta2, double weight_decay, double eps, bool maximize);
}  // namespace mltoolkit
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mltoolkit C++/CUDA kernels";
  // The GIL stays held: the calls are short (GPU launches are asynchronous, CPU kernels use their own threads).
  // With it released, an argument error raised by norm_forward_cuda crashed the process on the H200 image
  // (2026-11-26); whether holding it cures that is not yet verified on a GPU.
  m.def("release_reused_memory", &mltoolkit::release_reused_memory);
  m.def("norm_forward_cpu", &mltoolkit::norm_forward_cpu);
  m.def("norm_backward_cpu", &mltoolkit::norm_backward_cpu);
  m.def("attention_forward_cpu", &mltoolkit::attention_forward_cpu);
  m.def("attention_backward_cpu", &mltoolkit::attention_backward_cpu);
  m.def("rotary_cpu", &mltoolkit::rotary_cpu);
  m.def("cross_entropy_forward_cpu", &mltoolkit::cross_entropy_forward_cpu);
  m.def("cross_entropy_backward_cpu", &mltoolkit::cross_entropy_backward_cpu);
  m.def("conv2d_forward_cpu", &mltoolkit::conv2d_forward_cpu);
  m.def("conv2d_forward_prepared_cpu", &mltoolkit::conv2d_forward_prepared_cpu);
  m.def("conv2d_prepare_weight_cpu", &mltoolkit::conv2d_prepare_weight_cpu);
  m.def("conv2d_backward_cpu", &mltoolkit::conv2d_backward_cpu);
  m.def("batch_norm_act_forward_cpu", &mltoolkit::batch_norm_act_forward_cpu);
  m.def("batch_norm_act_backward_cpu", &mltoolkit::batch_norm_act_backward_cpu);
  m.def("int4_weight_only_linear_cpu", &mltoolkit::int4_weight_only_linear_cpu);
  m.def("quantize_int4_cpu", &mltoolkit::quantize_int4_cpu);
  m.def("dequantize_int4_cpu", &mltoolkit::dequantize_int4_cpu);
  m.def("quantize_rows_cpu", &mltoolkit::quantize_rows_cpu);
  m.def("int8_linear_cpu", &mltoolkit::int8_linear_cpu);
  m.def("int8_isa_cpu", &mltoolkit::int8_isa_cpu);
  m.def("fake_quantize_cpu", &mltoolkit::fake_quantize_cpu);
  m.def("fake_quantize_backward_cpu", &mltoolkit::fake_quantize_backward_cpu);
  m.def("int8_weight_only_linear_cpu", &mltoolkit::int8_weight_only_linear_cpu);
  m.def("quantize_static_cpu", &mltoolkit::quantize_static_cpu);
  m.def("im2col_int8_cpu", &mltoolkit::im2col_int8_cpu);
  m.def("fused_adamw_cpu", &mltoolkit::fused_adamw_cpu);
  m.def("fused_adamw_unsupported", &mltoolkit::fused_adamw_unsupported);
  m.def("fused_adamw8bit_cpu", &mltoolkit::fused_adamw8bit_cpu);
  m.def("fused_lamb_cpu", &mltoolkit::fused_lamb_cpu);
  m.def("fused_lamb8bit_cpu", &mltoolkit::fused_lamb8bit_cpu);
  m.def("fused_clip_grad_norm_cpu", &mltoolkit::fused_clip_grad_norm_cpu);
  m.def("lstm_cell_forward_cpu", &mltoolkit::lstm_cell_forward_cpu);
  m.def("lstm_cell_backward_cpu", &mltoolkit::lstm_cell_backward_cpu);
  m.def("gru_cell_forward_cpu", &mltoolkit::gru_cell_forward_cpu);
  m.def("gru_cell_backward_cpu", &mltoolkit::gru_cell_backward_cpu);
  m.def("lstm_layer_forward_cpu", &mltoolkit::lstm_layer_forward_cpu);
  m.def("lstm_layer_backward_cpu", &mltoolkit::lstm_layer_backward_cpu);
  m.def("gemm_tn_cpu", &mltoolkit::gemm_tn_cpu);
  m.def("gru_layer_forward_cpu", &mltoolkit::gru_layer_forward_cpu);
  m.def("gru_layer_backward_cpu", &mltoolkit::gru_layer_backward_cpu);
#ifdef MLTK_WITH_CUDA
  m.def("norm_forward_cuda", &mltoolkit::norm_forward_cuda);
  m.def("norm_backward_cuda", &mltoolkit::norm_backward_cuda);
  m.def("attention_forward_cuda", &mltoolkit::attention_forward_cuda);
  m.def("attention_backward_cuda", &mltoolkit::attention_backward_cuda);
  m.def("rotary_cuda", &mltoolkit::rotary_cuda);
  m.def("cross_entropy_forward_cuda", &mltoolkit::cross_entropy_forward_cuda);
  m.def("cross_entropy_backward_cuda", &mltoolkit::cross_entropy_backward_cuda);
  m.def("conv2d_forward_cuda", &mltoolkit::conv2d_forward_cuda);
  m.def("conv2d_backward_cuda", &mltoolkit::conv2d_backward_cuda);
  m.def("quantize_rows_cuda", &mltoolkit::quantize_rows_cuda);
  m.def("int8_linear_cuda", &mltoolkit::int8_linear_cuda);
  m.def("dequantize_int4_cuda", &mltoolkit::dequantize_int4_cuda);
  m.def("int4_weight_only_linear_cuda", &mltoolkit::int4_weight_only_linear_cuda);
  m.def("fused_adamw_cuda", &mltoolkit::fused_adamw_cuda);
  m.def("fused_lamb_cuda", &mltoolkit::fused_lamb_cuda);
  m.def("fused_clip_grad_norm_cuda", &mltoolkit::fused_clip_grad_norm_cuda);
  m.def("fused_adamw8bit_cuda", &mltoolkit::fused_adamw8bit_cuda);
  m.def("lstm_cell_forward_cuda", &mltoolkit::lstm_cell_forward_cuda);
  m.def("lstm_cell_backward_cuda", &mltoolkit::lstm_cell_backward_cuda);
  m.def("gru_cell_forward_cuda", &mltoolkit::gru_cell_forward_cuda);
  m.def("gru_cell_backward_cuda", &mltoolkit::gru_cell_backward_cuda);
  m.def("lstm_layer_forward_cuda", &mltoolkit::lstm_layer_forward_cuda);
  m.def("lstm_layer_backward_cuda", &mltoolkit::lstm_layer_backward_cuda);
  m.def("gru_layer_forward_cuda", &mltoolkit::gru_layer_forward_cuda);
  m.def("gru_layer_backward_cuda", &mltoolkit::gru_layer_backward_cuda);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef MLTK_CUDA_ARCH_LIST
  m.attr("cuda_arch_list") = MLTK_CUDA_ARCH_LIST;
#else
  m.attr("cuda_arch_list") = "";
#endif
#ifdef MLTK_CPU_FLAGS
  m.attr("cpu_flags") = MLTK_CPU_FLAGS;
#else
  m.attr("cpu_flags") = "";
#endif
#if defined(__clang__)
  m.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.attr("compiler") = "gcc " __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
}
