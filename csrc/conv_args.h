// Shape and option checks of a convolution call (contract: csrc/conv.h), shared by the CPU kernel and the CUDA glue
// so that both reject the same inputs with the same messages; each backend checks devices, dtypes and layouts first.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "check_util.h"

namespace mltoolkit::conv_args {

// N images of C x H x W, K filters of C/G x R x S in G groups, output P x Q; stride, padding and dilation per dim.
struct Geometry {
  int64_t N, C, H, W, K, G, Cg, Kg, R, S, P, Q, sh, sw, ph, pw, dh, dw;
};

inline Geometry check(const char* fn, const at::Tensor& x, const at::Tensor& weight,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                      const std::vector<int64_t>& dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, fn, ": x must be 4-D (N, C, H, W), got shape ", shape_str(x.sizes()));
  TORCH_CHECK(weight.dim() == 4, fn, ": weight must be 4-D (K, C / groups, R, S), got shape ",
              shape_str(weight.sizes()));
  TORCH_CHECK(stride.size() == 2, fn, ": stride must have 2 elements, got ", stride.size());
  TORCH_CHECK(padding.size() == 2, fn, ": padding must have 2 elements, got ", padding.size());
  TORCH_CHECK(dilation.size() == 2, fn, ": dilation must have 2 elements, got ", dilation.size());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, fn, ": stride must be >= 1, got (", stride[0], ", ", stride[1], ")");
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, fn, ": dilation must be >= 1, got (", dilation[0], ", ",
              dilation[1], ")");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, fn, ": padding must be >= 0, got (", padding[0], ", ", padding[1],
              ")");
  TORCH_CHECK(groups >= 1, fn, ": groups must be >= 1, got ", groups);
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.K = weight.size(0), g.R = weight.size(2), g.S = weight.size(3), g.G = groups;
  TORCH_CHECK(g.C >= 1, fn, ": x must have at least one channel, got shape ", shape_str(x.sizes()));
  TORCH_CHECK(g.C % groups == 0, fn, ": x's channels (", g.C, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(g.K % groups == 0, fn, ": weight's output channels (", g.K, ") must be divisible by groups (", groups,
              ")");
  g.Cg = g.C / groups, g.Kg = g.K / groups;
  TORCH_CHECK(weight.size(1) == g.Cg, fn, ": weight.size(1) must be C / groups = ", g.Cg, ", got weight of shape ",
              shape_str(weight.sizes()));
  TORCH_CHECK(g.K >= 1 && g.R >= 1 && g.S >= 1, fn, ": weight must not be empty, got shape ",
              shape_str(weight.sizes()));
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  const int64_t hp = g.H + 2 * g.ph - g.dh * (g.R - 1) - 1, wp = g.W + 2 * g.pw - g.dw * (g.S - 1) - 1;
  g.P = hp < 0 ? 0 : hp / g.sh + 1;
  g.Q = wp < 0 ? 0 : wp / g.sw + 1;
  TORCH_CHECK(g.P >= 1 && g.Q >= 1, fn, ": output size must be >= 1, got (", hp < 0 ? hp / g.sh : g.P, ", ",
              wp < 0 ? wp / g.sw : g.Q, ") for x of shape ", shape_str(x.sizes()), ", weight of shape ",
              shape_str(weight.sizes()), ", padding (", g.ph, ", ", g.pw, "), dilation (", g.dh, ", ", g.dw, ")");
  return g;
}

}  // namespace mltoolkit::conv_args
