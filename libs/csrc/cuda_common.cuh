/* Helpers for the CUDA translation units (libmrcnn_cuda.so). */
#ifndef MRCNN_CUDA_COMMON_CUH
#define MRCNN_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

namespace mrc {

/* Storage type <-> accumulation type. */
template <typename S> struct AccOf { typedef S type; };
template <> struct AccOf<__half> { typedef float type; };
template <> struct AccOf<__nv_bfloat16> { typedef float type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename S> __device__ __forceinline__ S from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename S> __device__ __forceinline__ S from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

/* atomicAdd with the accumulation value converted to storage. */
__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(double* p, double v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 600
  atomicAdd(p, v);
#endif
}

/* 16-bit add through a 32-bit CAS on the containing word (any arch). */
template <typename S>
__device__ __forceinline__ void atomic_add_16_cas(S* p, float v) {
  unsigned int* word = reinterpret_cast<unsigned int*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(3));
  const bool high = (reinterpret_cast<uintptr_t>(p) & 2) != 0;
  unsigned int old = *word, assumed;
  do {
    assumed = old;
    unsigned short bits = high ? (unsigned short)(assumed >> 16) : (unsigned short)(assumed & 0xffffu);
    S cur;
    memcpy(&cur, &bits, 2);
    S nxt = from_acc<S>(to_acc(cur) + v);
    unsigned short nb;
    memcpy(&nb, &nxt, 2);
    unsigned int nw = high ? ((assumed & 0x0000ffffu) | ((unsigned int)nb << 16))
                           : ((assumed & 0xffff0000u) | nb);
    old = atomicCAS(word, assumed, nw);
  } while (assumed != old);
}

__device__ __forceinline__ void atomic_add(__half* p, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  atomicAdd(p, __float2half_rn(v));
#else
  atomic_add_16_cas(p, v);
#endif
}
__device__ __forceinline__ void atomic_add(__nv_bfloat16* p, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  atomicAdd(p, __float2bfloat16_rn(v));
#else
  atomic_add_16_cas(p, v);
#endif
}

/* Grid size for a grid-stride loop over `total` elements. */
inline unsigned int grid_for(int64_t total, int threads) {
  int64_t blocks = (total + threads - 1) / threads;
  const int64_t cap = 65535LL * 16;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks);
}

/* After a launch: map cudaGetLastError into the thread-local error string. */
inline int check_launch(const char* fn) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return set_error(MRC_ERR_CUDA, "%s: CUDA error %d (%s): %s", fn, (int)e,
                     cudaGetErrorName(e), cudaGetErrorString(e));
  return MRC_OK;
}

}  // namespace mrc

#endif
