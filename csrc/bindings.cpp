// The Python module mltoolkit._C: kernel entry points only. Ops, schemas and autograd live in mltoolkit/ops/, which
// picks a backend per call; this module is one of those backends.
#include <torch/extension.h>

#include "norm.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mltoolkit C++/CUDA kernels";
  auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("norm_forward_cpu", &mltoolkit::norm_forward_cpu, no_gil);
  m.def("norm_backward_cpu", &mltoolkit::norm_backward_cpu, no_gil);
#ifdef MLTK_WITH_CUDA
  m.def("norm_forward_cuda", &mltoolkit::norm_forward_cuda, no_gil);
  m.def("norm_backward_cuda", &mltoolkit::norm_backward_cuda, no_gil);
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
