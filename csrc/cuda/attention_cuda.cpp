// PLACEHOLDER until the CUDA attention kernel lands (replaced by its own branch).
#include <c10/util/Exception.h>

#include "../attention.h"

namespace mltoolkit {

std::vector<at::Tensor> attention_forward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, int64_t, int64_t, double, int64_t,
                                               int64_t, bool, double, int64_t) {
  TORCH_CHECK(false, "attention_forward_cuda: not built yet");
}

std::vector<at::Tensor> attention_backward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                const std::optional<at::Tensor>&, int64_t, int64_t, double, int64_t,
                                                int64_t, bool, double, int64_t, bool) {
  TORCH_CHECK(false, "attention_backward_cuda: not built yet");
}

}  // namespace mltoolkit
