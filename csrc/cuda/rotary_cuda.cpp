// PLACEHOLDER until the CUDA rotary kernel lands (replaced by its own branch).
#include <c10/util/Exception.h>

#include "../attention.h"

namespace mltoolkit {

void rotary_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool) {
  TORCH_CHECK(false, "rotary_cuda: not built yet");
}

}  // namespace mltoolkit
