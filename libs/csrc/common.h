/* Internal helpers shared by the CPU and CUDA translation units (not part of the ABI). */
#ifndef MRCNN_COMMON_H
#define MRCNN_COMMON_H

#include <stdint.h>

#define MRC_ABI_VERSION 6

/* Error codes returned by every mrc_* function. */
enum {
  MRC_OK = 0,
  MRC_ERR_INVALID = 1,  /* bad argument: dtype, size, null pointer */
  MRC_ERR_ALLOC = 2,    /* out of host memory */
  MRC_ERR_CUDA = 3,     /* CUDA launch/runtime error */
  MRC_ERR_INTERNAL = 4
};

enum { MRC_F32 = 0, MRC_F64 = 1, MRC_F16 = 2, MRC_BF16 = 3 };

namespace mrc {
/* printf-style; stores the message in a thread-local buffer and returns `code`. */
int set_error(int code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void clear_error();
const char* last_error();
const char* dtype_name(int dtype);

/* Common argument checks for RoIAlign; returns MRC_OK or an error code (message set). */
int check_roi_align_args(const char* fn, int dtype, bool allow_half, const void* input,
                         const void* rois, const void* output, int64_t N, int64_t C,
                         int64_t H, int64_t W, int64_t K, int64_t PH, int64_t PW,
                         double spatial_scale);
int check_nms_args(const char* fn, int dtype, bool allow_half, const void* boxes, int64_t n,
                   const void* keep, const void* num_kept);
}  // namespace mrc

#endif
