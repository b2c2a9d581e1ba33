/* Thread-local error string and argument checks, compiled into both libraries. */
#include "common.h"

#include <stdarg.h>
#include <stdio.h>

namespace mrc {

static thread_local char g_error[1024] = "";

int set_error(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

void clear_error() { g_error[0] = '\0'; }
const char* last_error() { return g_error; }

const char* dtype_name(int dtype) {
  switch (dtype) {
    case MRC_F32: return "float32";
    case MRC_F64: return "float64";
    case MRC_F16: return "float16";
    case MRC_BF16: return "bfloat16";
    default: return "unknown";
  }
}

static int check_dtype(const char* fn, int dtype, bool allow_half) {
  if (dtype == MRC_F32 || dtype == MRC_F64) return MRC_OK;
  if (allow_half && (dtype == MRC_F16 || dtype == MRC_BF16)) return MRC_OK;
  if (dtype == MRC_F16 || dtype == MRC_BF16)
    return set_error(MRC_ERR_INVALID,
                     "%s: dtype %d (%s) is not supported on the CPU (float32 or float64 only)",
                     fn, dtype, dtype_name(dtype));
  return set_error(MRC_ERR_INVALID,
                   "%s: invalid dtype code %d (expected 0 float32, 1 float64%s)", fn, dtype,
                   allow_half ? ", 2 float16, 3 bfloat16" : "");
}

int check_roi_align_args(const char* fn, int dtype, bool allow_half, const void* input,
                         const void* rois, const void* output, int64_t N, int64_t C,
                         int64_t H, int64_t W, int64_t K, int64_t PH, int64_t PW,
                         double spatial_scale) {
  int rc = check_dtype(fn, dtype, allow_half);
  if (rc) return rc;
  if (N < 0 || C < 0 || H < 0 || W < 0 || K < 0)
    return set_error(MRC_ERR_INVALID,
                     "%s: negative size (N=%lld, C=%lld, H=%lld, W=%lld, K=%lld)", fn,
                     (long long)N, (long long)C, (long long)H, (long long)W, (long long)K);
  if (PH <= 0 || PW <= 0)
    return set_error(MRC_ERR_INVALID, "%s: pooled size must be positive (got %lld x %lld)",
                     fn, (long long)PH, (long long)PW);
  if (!(spatial_scale == spatial_scale))
    return set_error(MRC_ERR_INVALID, "%s: spatial_scale is NaN", fn);
  if (K > 0 && C > 0) {
    if (!rois || !output)
      return set_error(MRC_ERR_INVALID, "%s: null rois/output pointer with K=%lld, C=%lld",
                       fn, (long long)K, (long long)C);
    if (!input && N > 0 && H > 0 && W > 0)
      return set_error(MRC_ERR_INVALID, "%s: null input pointer", fn);
  }
  return MRC_OK;
}

int check_nms_args(const char* fn, int dtype, bool allow_half, const void* boxes, int64_t n,
                   const void* keep, const void* num_kept) {
  int rc = check_dtype(fn, dtype, allow_half);
  if (rc) return rc;
  if (n < 0) return set_error(MRC_ERR_INVALID, "%s: negative box count %lld", fn, (long long)n);
  if (!num_kept) return set_error(MRC_ERR_INVALID, "%s: null num_kept pointer", fn);
  if (n > 0 && (!boxes || !keep))
    return set_error(MRC_ERR_INVALID, "%s: null boxes/keep pointer with n=%lld", fn,
                     (long long)n);
  return MRC_OK;
}

}  // namespace mrc
