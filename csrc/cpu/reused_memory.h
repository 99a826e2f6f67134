// New CPU tensors whose memory is reused across calls when large. glibc gives large freed memory back to the kernel:
// a block above its mmap threshold (up to 32 MiB) is unmapped, and the heap's top is trimmed once more than its trim
// threshold (up to 64 MiB) is free there, so the next allocation page-faults again: on the dev VM a fresh 32 MiB
// tensor costs ~9.5 ms before the first write completes, against ~0.25 ms to write it once its pages exist, and a
// ResNet-50 forward (batch 8) spent ~30 ms of ~180 faulting its activations in. A kernel's large outputs, which come
// back every call with the same sizes (an LSTM layer's (N, 4H) gradient and saved gates, the cross-entropy's (N, C)
// gradient, a convolution's output), take their memory from a process-wide pool of freed blocks instead.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

namespace mltoolkit {

// An uninitialized CPU tensor, dense in `format` (Contiguous, or ChannelsLast for 4-D sizes). From 1 MiB on, its
// memory is a block freed by an earlier such tensor of the same byte size when one is free, and goes back to the
// pool when the tensor is freed (at most MLTK_REUSED_MEMORY_MB of free blocks are kept, 512 by default, 0 for none;
// beyond, they are released). Smaller tensors are at::empty's.
at::Tensor empty_reusing_memory(at::IntArrayRef sizes, const at::TensorOptions& options,
                                at::MemoryFormat format = at::MemoryFormat::Contiguous);

// at::empty_like(t) for a contiguous or (4-D) channels_last t, through empty_reusing_memory; other layouts (a dense
// permutation, say) are at::empty_like's, which keeps them.
at::Tensor empty_like_reusing_memory(const at::Tensor& t);

// Frees the pool's kept blocks (mltoolkit.clear_caches() calls it); returns their bytes.
int64_t release_reused_memory();

}  // namespace mltoolkit
