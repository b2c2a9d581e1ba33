/* Memory helpers of the CPU kernels: the huge-page hint and the per-thread scratch
 * buffer (declared in cpu_common.h). */
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <memory>

#include "cpu_common.h"

namespace mrc {

namespace {

/* x86-64 transparent huge page size. */
const uintptr_t kHugePage = uintptr_t(1) << 21;

struct FreeDeleter {
  void operator()(void* p) const { free(p); }
};

}  // namespace

/* The outputs and gradients the kernels write are fresh allocations of tens of MB:
 * faulting them in 4 KiB pages on first write costs about as much as the pooling itself,
 * and huge pages make that 512x fewer faults. */
void hint_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!p || bytes < 2 * kHugePage) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHugePage - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

/* Kept per thread because a fresh allocation of several MB is mmap'ed and page-faulted
 * on every call, which costs as much as the packing that fills it. 2 MiB-aligned with
 * huge pages: the pooling reads taps all over a block of several MB, which in 4 KiB
 * pages misses the TLB on most reads. */
void* thread_scratch(size_t bytes) {
  static thread_local std::unique_ptr<char, FreeDeleter> buf;
  static thread_local size_t capacity = 0;
  if (bytes > capacity) {
    buf.reset();
    capacity = 0;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
    hint_huge_pages(p, bytes);
    buf.reset(static_cast<char*>(p));
    capacity = bytes;
  }
  return buf.get();
}

}  // namespace mrc
