// New CPU tensors whose memory is reused across calls when large. glibc returns a freed block of 32 MiB or more to
// the kernel (munmap), so the next allocation of it page-faults again: on the dev VM a fresh 32 MiB tensor costs
// ~9.5 ms before the first write completes, against ~0.25 ms to write it once its pages exist. A kernel's large
// outputs that come back every call with the same size (an LSTM layer's (N, 4H) gradient and saved gates, the
// cross-entropy's (N, C) gradient) take their memory from a process-wide pool of freed blocks instead.
#pragma once
#include <ATen/core/Tensor.h>

namespace mltoolkit {

// An uninitialized contiguous CPU tensor. From kReusedMinBytes on, its memory is a block freed by an earlier such
// tensor of the same byte size when one is free, and goes back to the pool when the tensor is freed (at most
// kReusedKeptBytes of free blocks are kept; beyond, they are released). Smaller tensors are at::empty's.
at::Tensor empty_reusing_memory(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace mltoolkit
