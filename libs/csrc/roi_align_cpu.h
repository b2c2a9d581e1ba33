/*
 * CPU RoIAlign (libmrcnn_cpu.so): what its translation units share. Not part of the ABI.
 *
 *   roi_align_cpu.cpp            level split, path choice, the extern "C" layer, test hooks
 *   roi_align_cpu_unblocked.cpp  per-plane (NCHW) and per-pixel-run (NHWC) paths
 *   roi_align_cpu_blocked.cpp    channel-blocked paths: packed 32-channel planes, AVX2
 *   roi_align_cpu_taps.h         tap tables of the RoIs and the orders RoIs are visited in
 *   roi_align_cpu_accumulate.h   the bilinear average of a bin and its adjoint (one body
 *                                each, plus the AVX2 float copy of the average)
 *   cpu_scratch.cpp              huge-page hint and per-thread scratch (cpu_common.h)
 *
 * docs/kernels.md describes the paths, the layouts and when each one runs. Semantics:
 * bit-identical to torchvision's CPU kernel when compiled with -ffp-contract=off (same
 * expressions, same order of operations, for every path).
 */
#ifndef MRCNN_ROI_ALIGN_CPU_H
#define MRCNN_ROI_ALIGN_CPU_H

#include <stdint.h>

#include <vector>

#include "mrcnn_kernels.h"

namespace mrc {
namespace roi_cpu {

/* ------------------------------------------------------------------------- constants */

/* Channels per pixel in the channel-blocked layout [H][W][kLanes]: one tap reads this
 * many contiguous values, 128 bytes of float (two cache lines, four AVX2 registers). The
 * blocked paths take maps of C >= kLanes automatically (fewer channels would mostly be
 * padding). */
static const int64_t kLanes = 32;

/* Channels per work item of the unblocked NCHW forward: one sample's taps are loaded
 * once and applied to this many planes, whose accumulators stay in registers (16 floats:
 * two AVX2 or four SSE registers). */
static const int64_t kForwardPlanes = 16;

/* Channels per work item of the unblocked NCHW backward (at most; halved until the
 * threads have two items each). Its per-tap gradients are kept in arrays of this size. */
static const int64_t kBackwardPlanes = 8;

/* Shared tap tables larger than this are not built: each work item then builds its own
 * RoI's taps. 256 MiB is 100x what a detector needs (1000 RoIs x 7x7 bins x 2x2 samples x
 * 32 bytes = 6 MB) and only absurd inputs (huge adaptive grids) reach it. */
static const size_t kMaxTapTableBytes = size_t(256) << 20;

/* Calls with fewer outputs than this (K * C * PH * PW, i.e. one sample per bin) run on
 * the calling thread: waking the team costs more than the work, and far more on a busy
 * machine where a join waits for a descheduled thread. 2^18 keeps test-sized calls and a
 * mask head with a few detections (5 RoIs x 256 channels x 14 x 14 = 250,880) serial. */
static const int64_t kSerialWork = int64_t(1) << 18;

/* The blocked paths read every covered pixel of a map once to pack it; that pays off only
 * when the RoIs take at least one sample per kPackDensity map pixels (N * H * W). Below,
 * e.g. one small RoI on a large map, the unblocked path reads just the pixels it needs. */
static const int64_t kPackDensity = 4;

/* Tap offsets are int32 when a plane has fewer pixels than this (half the tap tables'
 * size), int64 otherwise (the unblocked paths only). */
static const int64_t kInt32Pixels = int64_t(1) << 31;

/* ----------------------------------------------------------------------- parameters */

/* What every RoI of one call shares. */
struct Params {
  int64_t images;          /* N */
  int64_t channels;        /* C */
  int64_t pooled_h;        /* PH */
  int64_t pooled_w;        /* PW */
  int64_t sampling_ratio;  /* samples per bin and axis; <= 0: ceil(roi size / pooled size) */
  bool aligned;            /* shift boxes by -0.5 pixel */
  bool channels_last;      /* maps (and the backward's gradients) are NHWC, else NCHW */
  int threads;             /* OpenMP team size (already resolved, >= 1) */

  int64_t bins() const { return pooled_h * pooled_w; }
};

/* One map (FPN level) and the RoIs pooled from it. */
template <typename T>
struct Level {
  int64_t height = 0, width = 0;
  double scale = 1.0;            /* spatial_scale of this map */
  const T* rois = nullptr;       /* [count, 5]: (batch index, x1, y1, x2, y2) */
  const int64_t* rows = nullptr; /* output row of RoI k; nullptr: row k */
  int64_t count = 0;             /* K of this level */

  int64_t row(int64_t k) const { return rows ? rows[k] : k; }
  int64_t pixels() const { return height * width; }
};

/* Path bits (MRC_ROI_PATH_* of mrcnn_kernels.h) that a call ORs together: one per level. */
typedef unsigned PathBits;

/* The test hook's choice (mrc_roi_align_cpu_force). */
enum class Forced { kAuto, kBlocked, kUnblocked };
Forced forced_path();
/* The AVX2 kernels run: the CPU has AVX2 and the test hook has not turned them off. */
bool use_avx2();

/* ------------------------------------------------- entry points of the path families */

/* Unblocked paths (roi_align_cpu_unblocked.cpp), one level. The forward writes the
 * level's output rows; the backward overwrites `grad` (NCHW, or NHWC through an NCHW
 * temporary). Each returns the path bit it took. */
template <typename T>
PathBits forward_unblocked(const T* map, const Level<T>& level, const Params& p, T* out);
template <typename T>
PathBits backward_unblocked(const T* grad_out, const Level<T>& level, const Params& p,
                            T* grad);

/* Blocked paths (roi_align_cpu_blocked.cpp), several levels in one parallel region.
 * `candidates` are indices into levels/maps; a level is taken when its tap tables fit
 * and (unless `any_density`) its RoIs sample it densely enough (kPackDensity). Returns
 * the candidates NOT taken (for the unblocked path; all of them when the scratch cannot
 * be allocated); ORs the path bits taken into *paths. The backward overwrites the
 * gradient of every level it takes. */
template <typename T>
std::vector<int64_t> forward_blocked(const std::vector<Level<T>>& levels, void* const* maps,
                                     const std::vector<int64_t>& candidates, bool any_density,
                                     const Params& p, T* out, PathBits* paths);
template <typename T>
std::vector<int64_t> backward_blocked(const std::vector<Level<T>>& levels, void* const* grads,
                                      const std::vector<int64_t>& candidates,
                                      bool any_density, const Params& p, const T* grad_out,
                                      PathBits* paths);

}  // namespace roi_cpu
}  // namespace mrc

#endif
