/*
 * NMS on CUDA over boxes sorted by descending score (libmrcnn_cuda.so).
 *   1. nms_mask_kernel: a ceil(n/64) x ceil(n/64) grid of 64-thread blocks; thread i of
 *      block (row, col) writes the 64-bit mask of the boxes of column block `col` that
 *      box row*64+i suppresses (IoU strictly greater than the threshold; same math as
 *      the CPU library: kernel_math.h). Only col >= row blocks are computed.
 *   2. nms_reduce_kernel: one block walks the boxes in order on the device, keeping the
 *      "removed" bitmap in shared memory, and writes keep positions and num_kept.
 * No host synchronisation, everything on the caller's stream.
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_common.cuh"
#include "kernel_math.h"
#include "mrcnn_kernels.h"

namespace {

const int kBlock = 64;

template <typename S>
__global__ void nms_mask_kernel(int64_t n, const S* __restrict__ boxes,
                                typename mrc::AccOf<S>::type thr, int64_t col_blocks,
                                uint64_t* __restrict__ mask) {
  typedef typename mrc::AccOf<S>::type A;
  const int64_t row_start = blockIdx.y, col_start = blockIdx.x;
  if (row_start > col_start) return;
  const int64_t row_size = min((int64_t)kBlock, n - row_start * kBlock);
  const int64_t col_size = min((int64_t)kBlock, n - col_start * kBlock);
  __shared__ A sb[kBlock * 5];
  if (threadIdx.x < col_size) {
    const int64_t j = col_start * kBlock + threadIdx.x;
    const A x1 = mrc::to_acc(boxes[j * 4 + 0]), y1 = mrc::to_acc(boxes[j * 4 + 1]);
    const A x2 = mrc::to_acc(boxes[j * 4 + 2]), y2 = mrc::to_acc(boxes[j * 4 + 3]);
    sb[threadIdx.x * 5 + 0] = x1;
    sb[threadIdx.x * 5 + 1] = y1;
    sb[threadIdx.x * 5 + 2] = x2;
    sb[threadIdx.x * 5 + 3] = y2;
    sb[threadIdx.x * 5 + 4] = mrc::box_area(x1, y1, x2, y2);
  }
  __syncthreads();
  if (threadIdx.x < row_size) {
    const int64_t i = row_start * kBlock + threadIdx.x;
    const A x1 = mrc::to_acc(boxes[i * 4 + 0]), y1 = mrc::to_acc(boxes[i * 4 + 1]);
    const A x2 = mrc::to_acc(boxes[i * 4 + 2]), y2 = mrc::to_acc(boxes[i * 4 + 3]);
    const A ar = mrc::box_area(x1, y1, x2, y2);
    uint64_t bits = 0;
    const int start = (row_start == col_start) ? threadIdx.x + 1 : 0;
    for (int j = start; j < col_size; ++j) {
      const A* b = sb + j * 5;
      if (mrc::box_iou(x1, y1, x2, y2, ar, b[0], b[1], b[2], b[3], b[4]) > thr)
        bits |= 1ULL << j;
    }
    mask[i * col_blocks + col_start] = bits;
  }
}

/* One block. removed: col_blocks words in dynamic shared memory. */
__global__ void nms_reduce_kernel(int64_t n, int64_t col_blocks, const uint64_t* __restrict__ mask,
                                  int64_t* __restrict__ keep, int64_t* __restrict__ num_kept) {
  extern __shared__ uint64_t removed[];
  __shared__ int64_t kept_in_block[kBlock];
  __shared__ int nkb;
  __shared__ int64_t nk;
  for (int64_t j = threadIdx.x; j < col_blocks; j += blockDim.x) removed[j] = 0;
  if (threadIdx.x == 0) nk = 0;
  __syncthreads();
  for (int64_t b = 0; b < col_blocks; ++b) {
    if (threadIdx.x == 0) {
      /* boxes of this block, in order; suppression inside the block is sequential */
      uint64_t rem = removed[b];
      const int size = (int)min((int64_t)kBlock, n - b * kBlock);
      int cnt = 0;
      for (int t = 0; t < size; ++t) {
        if (rem & (1ULL << t)) continue;
        const int64_t i = b * kBlock + t;
        keep[nk + cnt] = i;
        kept_in_block[cnt++] = i;
        rem |= mask[i * col_blocks + b];
      }
      removed[b] = rem;
      nkb = cnt;
      nk += cnt;
    }
    __syncthreads();
    const int cnt = nkb;
    for (int64_t j = b + 1 + threadIdx.x; j < col_blocks; j += blockDim.x) {
      uint64_t r = removed[j];
      for (int q = 0; q < cnt; ++q) r |= mask[kept_in_block[q] * col_blocks + j];
      removed[j] = r;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *num_kept = nk;
}

template <typename S>
int launch_nms(const void* boxes, int64_t n, double thr, uint64_t* mask, int64_t* keep,
               int64_t* num_kept, cudaStream_t stream) {
  typedef typename mrc::AccOf<S>::type A;
  const int64_t col_blocks = (n + kBlock - 1) / kBlock;
  if (col_blocks > 65535)
    return mrc::set_error(MRC_ERR_INVALID, "mrc_nms_cuda: too many boxes (%lld; at most %lld)",
                          (long long)n, 65535LL * kBlock);
  A t;
  if (sizeof(A) == 4) t = (A)mrc::float_threshold(thr);
  else t = (A)thr;
  dim3 grid((unsigned)col_blocks, (unsigned)col_blocks);
  nms_mask_kernel<S><<<grid, kBlock, 0, stream>>>(n, (const S*)boxes, t, col_blocks, mask);
  int rc = mrc::check_launch("mrc_nms_cuda (mask kernel)");
  if (rc) return rc;
  const size_t shmem = sizeof(uint64_t) * col_blocks;
  if (shmem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(nms_reduce_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
    if (e != cudaSuccess)
      return mrc::set_error(MRC_ERR_CUDA,
                            "mrc_nms_cuda: %lld boxes need %zu bytes of shared memory for the "
                            "device reduction: %s", (long long)n, shmem, cudaGetErrorString(e));
  }
  nms_reduce_kernel<<<1, 256, shmem, stream>>>(n, col_blocks, mask, keep, num_kept);
  return mrc::check_launch("mrc_nms_cuda (reduce kernel)");
}

}  // namespace

extern "C" int mrc_nms_cuda(int dtype, const void* sorted_boxes, int64_t n, double iou_threshold,
                            uint64_t* mask, int64_t* keep, int64_t* num_kept, void* stream) {
  static const char* fn = "mrc_nms_cuda";
  int rc = mrc::check_nms_args(fn, dtype, true, sorted_boxes, n, keep, num_kept);
  if (rc) return rc;
  cudaStream_t s = (cudaStream_t)stream;
  if (n == 0) {
    /* num_kept is a device pointer: set it to 0 without a launch */
    cudaError_t e = cudaMemsetAsync(num_kept, 0, sizeof(int64_t), s);
    if (e != cudaSuccess)
      return mrc::set_error(MRC_ERR_CUDA, "%s: cudaMemsetAsync: %s", fn, cudaGetErrorString(e));
    return MRC_OK;
  }
  if (!mask) return mrc::set_error(MRC_ERR_INVALID, "%s: null mask pointer with n=%lld", fn,
                                   (long long)n);
  switch (dtype) {
    case MRC_F32: return launch_nms<float>(sorted_boxes, n, iou_threshold, mask, keep, num_kept, s);
    case MRC_F64: return launch_nms<double>(sorted_boxes, n, iou_threshold, mask, keep, num_kept, s);
    case MRC_F16: return launch_nms<__half>(sorted_boxes, n, iou_threshold, mask, keep, num_kept, s);
    default: return launch_nms<__nv_bfloat16>(sorted_boxes, n, iou_threshold, mask, keep, num_kept, s);
  }
}
