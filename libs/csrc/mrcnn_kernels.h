/*
 * mask-rcnn-pytorch kernels: the plain C ABI loaded from Python with cffi.
 *
 * This header is the contract between libs/csrc (C++/CUDA) and libs/ (Python).
 * cffi parses it (libs/_loader.py strips the preprocessor lines), so keep every
 * declaration on plain C types: no macros inside declarations, no C++.
 *
 * Conventions
 *   - Every function returns 0 on success, a non-zero code on failure; then
 *     mrc_last_error() returns a human-readable message (thread-local).
 *   - dtype codes: 0 float32, 1 float64, 2 float16 (CUDA only), 3 bfloat16 (CUDA only).
 *   - Tensors are raw pointers to contiguous memory; shapes are passed as sizes.
 *     input:  [N, C, H, W] NCHW-contiguous, or NHWC-contiguous when channels_last != 0.
 *     rois:   [K, 5] rows (batch_index, x1, y1, x2, y2), same dtype as input.
 *     output: [K, C, PH, PW] contiguous (always NCHW).
 *     grad_input (backward) is [N, C, H, W] NCHW-contiguous. The CPU backward
 *     overwrites it (no zero-fill needed); the CUDA backward accumulates into it, so the
 *     caller zero-fills it there.
 *   - CPU functions that run threads take num_threads (<= 0 means the OpenMP default).
 *   - CUDA functions take the cudaStream_t as void* (the current torch stream) and
 *     never synchronise the device unless documented; all pointers are device pointers
 *     on the current device, and scratch memory is passed in by the caller.
 *   - CUDA NMS works on boxes already sorted by descending score (the caller does a
 *     stable sort, so ties keep their original order). It writes the positions (into the
 *     sorted list) of the kept boxes, ascending, and their count. CPU NMS sorts itself.
 */
#ifndef MRCNN_KERNELS_H
#define MRCNN_KERNELS_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

int mrc_abi_version(void);
const char* mrc_last_error(void);

/* ---------------- CPU (libmrcnn_cpu.so) ---------------- */
int mrc_roi_align_forward_cpu(int dtype, const void* input, const void* rois, void* output,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                              int64_t PH, int64_t PW, double spatial_scale,
                              int64_t sampling_ratio, int aligned, int channels_last,
                              int num_threads);

int mrc_roi_align_backward_cpu(int dtype, const void* grad_output, const void* rois,
                               void* grad_input, int64_t N, int64_t C, int64_t H, int64_t W,
                               int64_t K, int64_t PH, int64_t PW, double spatial_scale,
                               int64_t sampling_ratio, int aligned, int num_threads);

/* Multi-level (FPN) RoIAlign in one call. inputs[l]: level l, [N, C, heights[l],
 * widths[l]] NCHW-contiguous (every level NHWC when channels_last != 0), sampled at
 * scales[l]; RoI k is pooled from level levels[k] (int64[K]; a level outside [0, L)
 * gives a zero row). output: [K, C, PH, PW], rows in RoI order. The backward overwrites
 * every grad_inputs[l] (same layouts as the inputs; zero where no RoI samples). */
int mrc_roi_align_multilevel_forward_cpu(int dtype, int64_t L, void** inputs,
                                         const int64_t* heights, const int64_t* widths,
                                         const double* scales, const void* rois,
                                         const int64_t* levels, void* output, int64_t N,
                                         int64_t C, int64_t K, int64_t PH, int64_t PW,
                                         int64_t sampling_ratio, int aligned,
                                         int channels_last, int num_threads);

int mrc_roi_align_multilevel_backward_cpu(int dtype, int64_t L, void** grad_inputs,
                                          const int64_t* heights, const int64_t* widths,
                                          const double* scales, const void* grad_output,
                                          const void* rois, const int64_t* levels, int64_t N,
                                          int64_t C, int64_t K, int64_t PH, int64_t PW,
                                          int64_t sampling_ratio, int aligned,
                                          int channels_last, int num_threads);

/* Test hooks of the CPU RoIAlign (docs/kernels.md). Each call takes one path per level:
 *   MRC_ROI_PATH_BLOCKED         channel blocks of 32 packed in a scratch plane (the
 *                                forward; the backward of NCHW gradients)
 *   MRC_ROI_PATH_BLOCKED_NHWC    backward of NHWC gradients in blocks of 32 channels,
 *                                accumulated in place
 *   MRC_ROI_PATH_UNBLOCKED_NCHW  per-plane NCHW kernel
 *   MRC_ROI_PATH_UNBLOCKED_NHWC  per-pixel-run NHWC kernel (backward: NCHW temporary)
 * and MRC_ROI_PATH_AVX2 when a blocked path ran its AVX2 copy.
 * mrc_roi_align_cpu_paths_taken: the OR of the bits taken by the calling thread's latest
 * CPU RoIAlign call (0 when it pooled nothing or failed).
 * mrc_roi_align_cpu_force: process-wide, for the calls that follow (set it while no call
 * runs). path: MRC_ROI_FORCE_AUTO (the default: by size and density), _BLOCKED (every
 * level with RoIs takes a blocked path wherever it can run: any C, any density),
 * _UNBLOCKED (never a blocked path). avx2 = 0 keeps the AVX2 copies off (the default 1
 * uses them when the CPU has AVX2). Results are the same bits on every path. */
enum {
  MRC_ROI_PATH_BLOCKED = 1,
  MRC_ROI_PATH_BLOCKED_NHWC = 2,
  MRC_ROI_PATH_UNBLOCKED_NCHW = 4,
  MRC_ROI_PATH_UNBLOCKED_NHWC = 8,
  MRC_ROI_PATH_AVX2 = 16
};
enum { MRC_ROI_FORCE_AUTO = 0, MRC_ROI_FORCE_BLOCKED = 1, MRC_ROI_FORCE_UNBLOCKED = 2 };

int mrc_roi_align_cpu_force(int path, int avx2);
int mrc_roi_align_cpu_paths_taken(void);

/* boxes: [n, 4] (x1, y1, x2, y2) in input order; scores: float64[n]. The CPU kernel sorts
 * itself (stable, descending, NaN first) and writes the INPUT indices of the kept boxes,
 * by descending score, to keep: int64[n]; num_kept: int64[1]. It runs on the calling
 * thread (nms_cpu.cpp says why). */
int mrc_nms_cpu(int dtype, const void* boxes, const double* scores, int64_t n,
                double iou_threshold, int64_t* keep, int64_t* num_kept);

/* Winograd F(4x4, 3x3) transforms for 3x3, stride 1, padding 1 convolutions (dtype
 * float32 or float64; the caller runs the 36 GEMMs in between). x / y / dy / dx are
 * NHWC-contiguous [N, H, W, C] (or K) maps. The transforms work on a band of tile rows
 * [tile_row0, tile_row0 + tile_rows) numbered through the batch (N * ceil(H / 4) rows;
 * row g is row g % ceil(H / 4) of image g / ceil(H / 4)), tiles_w = ceil(W / 4),
 * P = tile_rows * tiles_w, and V / M / dM / dV are [36, P, C] (or K) contiguous. C and K
 * must be multiples of 8.
 *   weight:         U[36, C, K] = G g G^T of each filter g = weight[k, c], read from
 *                   weight_ckk: the weight permuted to [C, 3, 3, K] (contiguous)
 *   input:          V = B^T d B of each 6x6 input tile (zero padding outside the map)
 *   output:         y = A^T M A (+ bias[K] unless NULL, then max(., 0) if relu) of each
 *                   4x4 output tile, clipped to the map
 *   output_adjoint: dM = A dy A^T (the transpose of output, without bias and ReLU)
 *   input_adjoint:  dx += B dV B^T (the transpose of input; ADDS into dx)
 */
int mrc_winograd_weight_cpu(int dtype, const void* weight_ckk, void* U, int64_t K, int64_t C,
                            int num_threads);

int mrc_winograd_input_cpu(int dtype, const void* x, void* V, int64_t N, int64_t H, int64_t W,
                           int64_t C, int64_t tile_row0, int64_t tile_rows, int64_t tiles_w,
                           int num_threads);

int mrc_winograd_output_cpu(int dtype, const void* M, const void* bias, void* y, int64_t N,
                            int64_t H, int64_t W, int64_t K, int64_t tile_row0,
                            int64_t tile_rows, int64_t tiles_w, int relu, int num_threads);

int mrc_winograd_output_adjoint_cpu(int dtype, const void* dy, void* dM, int64_t N, int64_t H,
                                    int64_t W, int64_t K, int64_t tile_row0,
                                    int64_t tile_rows, int64_t tiles_w, int num_threads);

int mrc_winograd_input_adjoint_cpu(int dtype, const void* dV, void* dx, int64_t N, int64_t H,
                                   int64_t W, int64_t C, int64_t tile_row0, int64_t tile_rows,
                                   int64_t tiles_w, int num_threads);

/* Grouped 3x3, stride 1, padding 1 convolution for inference (float32 only): x and y
 * NHWC-contiguous [N, H, W, C], weight [C, C / groups, 3, 3] contiguous (torch's grouped
 * layout), bias[C]; y = conv(x) + bias, then max(., 0) if relu. Input and output have
 * the same C channels, and C / groups must be 8 or 16.
 * mrc_grouped_conv3x3_cpu_force_scalar: test hook, process-wide (set it while no call
 * runs): on != 0 runs the portable scalar copy even where AVX2 + FMA are available. */
int mrc_grouped_conv3x3_cpu(int dtype, const void* x, const void* weight, const void* bias,
                            void* y, int64_t N, int64_t H, int64_t W, int64_t C,
                            int64_t groups, int relu, int num_threads);

int mrc_grouped_conv3x3_cpu_force_scalar(int on);

/* ---------------- CUDA (libmrcnn_cuda.so) ---------------- */
int mrc_cuda_abi_version(void);
const char* mrc_cuda_last_error(void);

int mrc_roi_align_forward_cuda(int dtype, const void* input, const void* rois, void* output,
                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                               int64_t PH, int64_t PW, double spatial_scale,
                               int64_t sampling_ratio, int aligned, int channels_last,
                               void* stream);

/* deterministic != 0: no float atomics, bit-identical run to run. */
int mrc_roi_align_backward_cuda(int dtype, const void* grad_output, const void* rois,
                                void* grad_input, int64_t N, int64_t C, int64_t H, int64_t W,
                                int64_t K, int64_t PH, int64_t PW, double spatial_scale,
                                int64_t sampling_ratio, int aligned, int deterministic,
                                void* stream);

/* Scratch: mask is uint64[n * ceil(n / 64)] on the device. keep: int64[n] device,
 * num_kept: int64[1] device (the reduction runs on the device; no host copy inside). */
int mrc_nms_cuda(int dtype, const void* sorted_boxes, int64_t n, double iou_threshold,
                 uint64_t* mask, int64_t* keep, int64_t* num_kept, void* stream);

#ifdef __cplusplus
}
#endif
#endif
