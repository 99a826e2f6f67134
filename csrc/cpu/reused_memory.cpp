// The pool behind empty_reusing_memory (csrc/cpu/reused_memory.h).
#include "reused_memory.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mltoolkit {
namespace {

constexpr int64_t kReusedMinBytes = int64_t{1} << 20;  // smaller blocks stay inside glibc's heap

// Free blocks kept at most: MLTK_REUSED_MEMORY_MB (read once; 0 keeps none), 512 MiB by default.
int64_t kept_limit() {
  static const int64_t limit = [] {
    const char* v = std::getenv("MLTK_REUSED_MEMORY_MB");
    const long long mb = v && *v ? std::atoll(v) : 512;
    return std::max<int64_t>(0, mb) << 20;
  }();
  return limit;
}

class Pool {
 public:
  // The most recently freed block of the size: the likeliest to be still in cache.
  void* take(int64_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->first == bytes) {
        void* p = it->second;
        free_.erase(std::next(it).base());
        kept_ -= bytes;
        return p;
      }
    }
    return nullptr;
  }

  void give(void* p, int64_t bytes) {
    if (bytes >= kReusedMinBytes) {
      std::lock_guard<std::mutex> guard(mutex_);
      if (kept_ + bytes <= kept_limit()) {
        free_.emplace_back(bytes, p);
        kept_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  // Frees every kept block; returns their bytes.
  int64_t release() {
    std::vector<std::pair<int64_t, void*>> blocks;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      blocks.swap(free_);
      kept_ = 0;
    }
    int64_t bytes = 0;
    for (const auto& [n, p] : blocks) {
      std::free(p);
      bytes += n;
    }
    return bytes;
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

// A fresh block of tens of MB comes straight from mmap, and faulting it in 4 KiB page by page can cost more than the
// kernel writing it (measured on the 2-core dev VM, fp32 4096 x 4096 norm forward: 22 ms with 4 KiB pages, 8 ms with
// 2 MiB pages; the TLB misses of the writes drop too). So before its first write, ask for transparent huge pages on
// the block's 2 MiB-aligned interior, as torch's allocator does under THP_MEM_ALLOC_ENABLE=1. Only a hint: where
// THP is off or the call fails, nothing changes but the speed. Reused blocks are faulted in already.
void ask_for_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// A block and its rounded size, the context of its DataPtr: the deleter gives the block back to the pool.
struct Block {
  void* data;
  int64_t bytes;
};

void give_back(void* ctx) {
  const Block* b = static_cast<const Block*>(ctx);
  pool().give(b->data, b->bytes);
  delete b;
}

// A CPU allocator over the pool, so that these tensors are ordinary ones (a storage that resize_ can grow, say).
class ReusingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const int64_t bytes = (static_cast<int64_t>(n) + 63) / 64 * 64;
    void* p = bytes >= kReusedMinBytes ? pool().take(bytes) : nullptr;
    if (p == nullptr) {
      p = std::aligned_alloc(64, static_cast<size_t>(bytes > 0 ? bytes : 64));
      TORCH_CHECK(p != nullptr, "empty_reusing_memory: out of memory allocating ", bytes, " bytes");
      ask_for_huge_pages(p, bytes);
    }
    return {p, new Block{p, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

ReusingAllocator& allocator() {
  static ReusingAllocator* a = new ReusingAllocator();
  return *a;
}

}  // namespace

at::Tensor empty_reusing_memory(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_CHECK(options.device().is_cpu(), "empty_reusing_memory: CPU tensors only, got ", options.device());
  TORCH_CHECK(format == at::MemoryFormat::Contiguous || (format == at::MemoryFormat::ChannelsLast && sizes.size() == 4),
              "empty_reusing_memory: Contiguous, or ChannelsLast for 4-D sizes, got ", format);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  if (numel * static_cast<int64_t>(options.dtype().itemsize()) < kReusedMinBytes) {
    return at::empty(sizes, options.memory_format(format));
  }
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), format);
}

int64_t release_reused_memory() { return pool().release(); }

at::Tensor empty_like_reusing_memory(const at::Tensor& t) {
  if (t.is_contiguous()) return empty_reusing_memory(t.sizes(), t.options());
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return empty_reusing_memory(t.sizes(), t.options(), at::MemoryFormat::ChannelsLast);
  }
  return at::empty_like(t);
}

}  // namespace mltoolkit
