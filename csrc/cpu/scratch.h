// Scratch memory kept per calling thread between calls of a CPU kernel: a fresh allocation of a few MB is mmapped
// and page-faulted on every call (~3 ms per 8 MB on the dev VM) and a std::vector also zero-fills it. Requests over
// kKeptScratchBytes get memory of their own, freed after the call. The memory is not initialized. One live KeptScratch
// per thread in a translation unit (each includes its own copy of the kept buffer): a kernel must not nest them.
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>

namespace mltoolkit {
namespace {

constexpr int64_t kKeptScratchBytes = int64_t{64} << 20;

class KeptScratch {
 public:
  KeptScratch(const char* fn, int64_t bytes) {
    static thread_local Buffer kept;
    Buffer& buf = bytes > kKeptScratchBytes ? own_ : kept;
    if (buf.bytes < bytes) buf.reset(fn, bytes);
    data_ = buf.data;
  }
  KeptScratch(const KeptScratch&) = delete;
  KeptScratch& operator=(const KeptScratch&) = delete;
  char* data() const { return data_; }
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }

 private:
  struct Buffer {
    char* data = nullptr;
    int64_t bytes = 0;
    void reset(const char* fn, int64_t n) {
      std::free(data);
      data = nullptr;
      bytes = 0;
      n = (n + 63) / 64 * 64;
      data = static_cast<char*>(std::aligned_alloc(64, n));
      TORCH_CHECK(data != nullptr, fn, ": out of memory allocating ", n, " bytes of scratch");
      bytes = n;
    }
    ~Buffer() { std::free(data); }
  };
  Buffer own_;
  char* data_;
};

}  // namespace
}  // namespace mltoolkit
