/* Helpers shared by the CPU translation units (not part of the ABI). */
#ifndef MRCNN_CPU_COMMON_H
#define MRCNN_CPU_COMMON_H

#include <omp.h>
#include <stddef.h>

/* Hot loops get an AVX2 copy through a function attribute, chosen at run time, so the
 * library itself is built for baseline x86-64 and runs on any such machine. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define MRC_X86_DISPATCH 1
#define MRC_AVX2 __attribute__((target("avx2")))
#else
#define MRC_X86_DISPATCH 0
#define MRC_AVX2
#endif
#define MRC_INLINE inline __attribute__((always_inline))

namespace mrc {

inline bool cpu_has_avx2() {
#if MRC_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

/* num_threads <= 0 means the OpenMP default. */
inline int resolve_threads(int num_threads) {
  return num_threads > 0 ? num_threads : omp_get_max_threads();
}

/* Asks for transparent huge pages on the 2 MiB-aligned middle of [p, p + bytes): a hint
 * only (no THP, or memory that is not mmap'ed, changes nothing). cpu_scratch.cpp. */
void hint_huge_pages(void* p, size_t bytes);

/* A buffer of at least `bytes` owned by the calling thread (2 MiB-aligned, huge pages
 * hinted), reused by its next calls and grown when needed: contents are not kept across
 * a growth. nullptr when it cannot be allocated. cpu_scratch.cpp. */
void* thread_scratch(size_t bytes);

}  // namespace mrc

#endif
