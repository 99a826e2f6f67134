// PLACEHOLDER until the CPU rotary kernel lands (replaced by its own branch).
#include <c10/util/Exception.h>

#include "../attention.h"

namespace mltoolkit {

void rotary_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool) {
  TORCH_CHECK(false, "rotary_cpu: not built yet");
}

}  // namespace mltoolkit
