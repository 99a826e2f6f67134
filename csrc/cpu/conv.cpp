// PLACEHOLDER until the CPU convolution kernel lands (replaced by its own branch).
#include <c10/util/Exception.h>

#include "../conv.h"

namespace mltoolkit {

std::vector<at::Tensor> conv2d_forward_cpu(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                                           int64_t) {
  TORCH_CHECK(false, "conv2d_forward_cpu: not built yet");
}

std::vector<at::Tensor> conv2d_backward_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                                            int64_t, std::vector<bool>) {
  TORCH_CHECK(false, "conv2d_backward_cpu: not built yet");
}

}  // namespace mltoolkit
