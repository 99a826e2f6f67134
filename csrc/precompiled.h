// The headers nearly every C++ file of mltoolkit._C includes, parsed once per build: setup.py compiles this file into
// a GCC precompiled header and puts `-include precompiled.h` first on every C++ file's command line (not nvcc's).
// Parsing them took ~8 s a file on 2 cores, most of a small kernel's compile. Files still include what they use.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>
