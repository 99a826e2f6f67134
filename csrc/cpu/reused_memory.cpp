// The pool behind empty_reusing_memory (csrc/cpu/reused_memory.h).
#include "reused_memory.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

namespace mltoolkit {
namespace {

constexpr int64_t kReusedMinBytes = int64_t{32} << 20;   // glibc's largest mmap threshold: smaller frees stay mapped
constexpr int64_t kReusedKeptBytes = int64_t{512} << 20;  // free blocks kept at most

class Pool {
 public:
  void* take(int64_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first == bytes) {
        void* p = it->second;
        free_.erase(it);
        kept_ -= bytes;
        return p;
      }
    }
    return nullptr;
  }

  void give(void* p, int64_t bytes) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (kept_ + bytes <= kReusedKeptBytes) {
        free_.emplace_back(bytes, p);
        kept_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<int64_t, void*>> free_;  // (bytes, block)
  int64_t kept_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still return their blocks to it.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

at::Tensor empty_reusing_memory(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_reusing_memory: CPU tensors only, got ", options.device());
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = (numel * static_cast<int64_t>(options.dtype().itemsize()) + 63) / 64 * 64;
  if (bytes < kReusedMinBytes) return at::empty(sizes, options);
  void* p = pool().take(bytes);
  if (p == nullptr) {
    p = std::aligned_alloc(64, static_cast<size_t>(bytes));
    TORCH_CHECK(p != nullptr, "empty_reusing_memory: out of memory allocating ", bytes, " bytes");
  }
  return at::from_blob(p, sizes, [bytes](void* q) { pool().give(q, bytes); }, options);
}

}  // namespace mltoolkit
