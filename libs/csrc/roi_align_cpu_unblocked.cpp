/*
 * Unblocked CPU RoIAlign paths: they read the map in its own layout, no packing.
 *
 *   forward NCHW (MRC_ROI_PATH_UNBLOCKED_NCHW): work items are (block of kForwardPlanes
 *     channels, RoI), channel-block major, so all threads stream the same few feature
 *     planes; RoIs in spatial order.
 *   forward NHWC (MRC_ROI_PATH_UNBLOCKED_NHWC): one item per RoI; one tap reads a run of
 *     C contiguous values. Each RoI is read once, so its taps are formed as they are read
 *     (AxisTaps), not stored first.
 *   backward NCHW: items are (image, block of <= kBackwardPlanes channels); their
 *     gradient planes are disjoint and RoIs are visited in input order inside each, so
 *     the result does not depend on the thread count and equals torchvision's summation
 *     order. NHWC gradients go through an NCHW temporary (a rare path: the blocked one
 *     takes NHWC gradients whenever its tap tables fit).
 *
 * Used where packing does not pay off (few samples on a large map, C < kLanes), when the
 * blocked path cannot run, or when forced (mrc_roi_align_cpu_force).
 */
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "roi_align_cpu.h"
#include "roi_align_cpu_accumulate.h"
#include "roi_align_cpu_taps.h"

namespace mrc {
namespace roi_cpu {

namespace {

/* The backward halves its channel blocks until every thread has this many items. */
const int64_t kItemsPerThread = 2;

template <typename T, typename I>
void forward_nchw(const T* map, const Level<T>& lv, const Params& p, T* out) {
  const int64_t C = p.channels, HW = lv.pixels(), PHW = p.bins();
  const int64_t planes = std::min(kForwardPlanes, C);
  const int64_t blocks = (C + planes - 1) / planes;
  TapTables<T, I> tables;
  if (blocks > 1) tables.build(lv, p);  /* one block: every RoI is visited once */
  const std::vector<int64_t> visit = spatial_order(lv.rois, lv.count, lv.scale);
#pragma omp parallel num_threads(p.threads)
  {
    LocalTaps<T, I> local;
#pragma omp for collapse(2) schedule(dynamic, 8)
    for (int64_t cb = 0; cb < blocks; ++cb) {
      for (int64_t i = 0; i < lv.count; ++i) {
        const int64_t k = visit[i];
        const int64_t c0 = cb * planes, cn = std::min(planes, C - c0);
        const RoiGeom<T> g = tables.ok ? tables.geom[k] : roi_geom(lv, k, p);
        if (g.batch < 0 || HW == 0) {
          zero_rows(out, lv.row(k), c0, cn, p);
          continue;
        }
        const RoiTaps<T, I> r = tables.ok ? tables.roi(k) : local.build(g, lv, p);
        const T* in = map + (g.batch * C + c0) * HW;
        T* o = out + (lv.row(k) * C + c0) * PHW;
        T acc[kForwardPlanes];
        if (cn == kForwardPlanes)  /* constant lane count: accumulators in registers */
          pool_roi(in, 1, HW, kForwardPlanes, kForwardPlanes, r, PHW, acc, o);
        else
          pool_roi(in, 1, HW, cn, cn, r, PHW, acc, o);
      }
    }
  }
}

/* no unroll-and-jam: GCC would jam two taps into one lane loop of add_tap and leave that
 * loop scalar (the lane count, C, is not a constant here) */
template <typename T, typename I>
__attribute__((optimize("no-loop-unroll-and-jam"))) void forward_nhwc(const T* map,
                                                                      const Level<T>& lv,
                                                                      const Params& p, T* out) {
  const int64_t C = p.channels, HW = lv.pixels(), PHW = p.bins();
#pragma omp parallel num_threads(p.threads)
  {
    AxisTables<T> axes;
    std::vector<T> acc(C);
#pragma omp for schedule(dynamic, 4)
    for (int64_t k = 0; k < lv.count; ++k) {
      const RoiGeom<T> g = roi_geom(lv, k, p);
      if (g.batch < 0 || HW == 0) {
        zero_rows(out, lv.row(k), 0, C, p);
        continue;
      }
      axes.build(g, lv.height, lv.width, p);
      const AxisTaps<T, I> r(axes, g, lv.width, p);
      pool_roi(map + g.batch * HW * C, C, 1, C, C, r, PHW, acc.data(),
               out + lv.row(k) * C * PHW);
    }
  }
}

/* Adds the level's gradient into grad (NCHW, zeroed by the caller). */
template <typename T, typename I>
void backward_nchw(const T* grad_out, const Level<T>& lv, const Params& p, T* grad) {
  const int64_t N = p.images, C = p.channels, HW = lv.pixels(), PHW = p.bins();
  std::vector<int64_t> batch(lv.count);
  for (int64_t k = 0; k < lv.count; ++k) batch[k] = roi_geom(lv, k, p).batch;
  ImageGroups groups;
  groups.build(batch, N, nullptr);
  int64_t planes = std::min(kBackwardPlanes, C);
  while (planes > 1 && N * ((C + planes - 1) / planes) < kItemsPerThread * p.threads)
    planes = (planes + 1) / 2;
  const int64_t blocks = (C + planes - 1) / planes;
  const int64_t items = N * blocks;
  TapTables<T, I> tables;
  if (items > 1) tables.build(lv, p);  /* one item: every RoI is visited once */
#pragma omp parallel num_threads(p.threads)
  {
    LocalTaps<T, I> local;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / blocks, c0 = (it % blocks) * planes;
      const int64_t cn = std::min(planes, C - c0);
      T* base = grad + (n * C + c0) * HW;
      for (int64_t oi = groups.begin(n); oi < groups.end(n); ++oi) {
        const int64_t k = groups.order[oi];
        const RoiTaps<T, I> r =
            tables.ok ? tables.roi(k) : local.build(roi_geom(lv, k, p), lv, p);
        scatter_roi(base, 1, HW, cn, cn, r, PHW, grad_out + (lv.row(k) * C + c0) * PHW);
      }
    }
  }
}

}  // namespace

template <typename T>
PathBits forward_unblocked(const T* map, const Level<T>& level, const Params& p, T* out) {
  const bool small = level.pixels() < kInt32Pixels;
  if (p.channels_last) {
    if (small)
      forward_nhwc<T, int32_t>(map, level, p, out);
    else
      forward_nhwc<T, int64_t>(map, level, p, out);
    return MRC_ROI_PATH_UNBLOCKED_NHWC;
  }
  if (small)
    forward_nchw<T, int32_t>(map, level, p, out);
  else
    forward_nchw<T, int64_t>(map, level, p, out);
  return MRC_ROI_PATH_UNBLOCKED_NCHW;
}

template <typename T>
PathBits backward_unblocked(const T* grad_out, const Level<T>& level, const Params& p,
                            T* grad) {
  const int64_t HW = level.pixels(), C = p.channels, N = p.images;
  std::vector<T> nchw(p.channels_last ? N * C * HW : 0);  /* zero-filled */
  T* dst = p.channels_last ? nchw.data() : grad;
  if (!p.channels_last) memset(grad, 0, sizeof(T) * N * C * HW);
  if (HW < kInt32Pixels)
    backward_nchw<T, int32_t>(grad_out, level, p, dst);
  else
    backward_nchw<T, int64_t>(grad_out, level, p, dst);
  if (!p.channels_last) return MRC_ROI_PATH_UNBLOCKED_NCHW;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t q = 0; q < HW; ++q) grad[(n * HW + q) * C + c] = dst[(n * C + c) * HW + q];
  return MRC_ROI_PATH_UNBLOCKED_NHWC;
}

template PathBits forward_unblocked<float>(const float*, const Level<float>&, const Params&,
                                           float*);
template PathBits forward_unblocked<double>(const double*, const Level<double>&,
                                            const Params&, double*);
template PathBits backward_unblocked<float>(const float*, const Level<float>&, const Params&,
                                            float*);
template PathBits backward_unblocked<double>(const double*, const Level<double>&,
                                             const Params&, double*);

}  // namespace roi_cpu
}  // namespace mrc
