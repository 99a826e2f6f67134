// Helpers of the kernels' input checks, shared by the CPU kernels and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <sstream>
#include <string>

namespace mltoolkit {

// An optional tensor argument that was given (Python None arrives as nullopt or an undefined tensor).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A shape or strides in Python's tuple notation, as the Python layer prints them: (2, 3), (4,), ().
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

}  // namespace mltoolkit
