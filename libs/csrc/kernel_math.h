/*
 * Per-element math shared by the CPU (g++) and CUDA (nvcc) kernels.
 *
 * Everything here is an inline function marked MRC_HD, which is __host__ __device__
 * under nvcc and plain inline under a host compiler, so the CPU library (tested on
 * every machine) runs exactly the math the GPU runs. The operation order mirrors
 * torchvision's CPU kernels so that, compiled with -ffp-contract=off, results are
 * bit-identical to torchvision.ops.roi_align / nms on the CPU.
 *
 * Internal header: not part of the cffi ABI (see mrcnn_kernels.h).
 */
#ifndef MRCNN_KERNEL_MATH_H
#define MRCNN_KERNEL_MATH_H

#include <stdint.h>

#if defined(__CUDACC__)
#define MRC_HD __host__ __device__
#else
#define MRC_HD
#endif

namespace mrc {

/* Upper bound for the adaptive sampling grid along one axis (ceil(rh / PH)). Only an
 * absurdly large RoI (more than 4096 feature pixels per output bin) reaches it; it keeps
 * gh * gw * PH * PW small enough that nothing overflows or allocates a huge size. */
static const int64_t kMaxGrid = 4096;

/* std::max / std::min semantics ((a < b) ? b : a), including what happens with NaN. */
template <typename T> MRC_HD inline T tv_max(T a, T b) { return (a < b) ? b : a; }
template <typename T> MRC_HD inline T tv_min(T a, T b) { return (b < a) ? b : a; }

/* Geometry of one RoI, everything the per-sample math needs. */
template <typename T>
struct RoiGeom {
  int64_t batch;   /* batch index, or -1 when outside [0, N) or not finite (output 0) */
  T y0, x0;        /* roi start (already scaled and shifted) */
  T bin_h, bin_w;  /* bin size */
  int64_t gh, gw;  /* sampling grid per bin, >= 0 */
  T count;         /* max(gh * gw, 1), the divisor */
};

/* Sampling grid along one axis: sampling_ratio > 0 ? sampling_ratio : ceil(extent / pooled),
 * clamped to [0, kMaxGrid]; NaN and non-positive extents give 0 (no samples, output 0, as
 * torchvision's CPU kernel ends up with in those cases). */
template <typename T>
MRC_HD inline int64_t grid_size(T extent, int64_t pooled, int64_t sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio < kMaxGrid ? sampling_ratio : kMaxGrid;
  T q = extent / static_cast<T>(pooled);
  if (!(q > static_cast<T>(0))) return 0;                          /* NaN, 0, negative */
  if (q >= static_cast<T>(kMaxGrid)) return kMaxGrid;              /* huge, +inf */
  int64_t g = static_cast<int64_t>(q);                             /* ceil for q > 0 */
  if (static_cast<T>(g) < q) g += 1;
  return g;
}

/* roi: pointer to one row (batch_index, x1, y1, x2, y2). Same expression order as
 * torchvision: roi * spatial_scale - offset evaluated in double, then rounded to T. */
template <typename T>
MRC_HD inline RoiGeom<T> roi_geometry(const T* roi, int64_t N, int64_t PH, int64_t PW,
                                      double spatial_scale, int64_t sampling_ratio,
                                      bool aligned) {
  RoiGeom<T> g;
  const double bi = static_cast<double>(roi[0]);
  /* int64 truncation of a value in (-1, N) lands in [0, N). */
  g.batch = (bi > -1.0 && bi < static_cast<double>(N)) ? static_cast<int64_t>(bi) : -1;
  const double off = aligned ? 0.5 : 0.0;
  const T x0 = static_cast<T>(static_cast<double>(roi[1]) * spatial_scale - off);
  const T y0 = static_cast<T>(static_cast<double>(roi[2]) * spatial_scale - off);
  const T x1 = static_cast<T>(static_cast<double>(roi[3]) * spatial_scale - off);
  const T y1 = static_cast<T>(static_cast<double>(roi[4]) * spatial_scale - off);
  T rw = x1 - x0;
  T rh = y1 - y0;
  if (!aligned) {
    rw = tv_max(rw, static_cast<T>(1));
    rh = tv_max(rh, static_cast<T>(1));
  }
  g.x0 = x0;
  g.y0 = y0;
  g.bin_h = rh / static_cast<T>(PH);
  g.bin_w = rw / static_cast<T>(PW);
  g.gh = grid_size(rh, PH, sampling_ratio);
  g.gw = grid_size(rw, PW, sampling_ratio);
  const int64_t c = g.gh * g.gw;
  g.count = static_cast<T>(c > 1 ? c : 1);
  return g;
}

/* Sample coordinate: start + p * bin + (i + .5f) * bin / grid (torchvision's order). */
template <typename T>
MRC_HD inline T sample_coord(T start, int64_t p, T bin, int64_t i, int64_t grid) {
  return start + static_cast<T>(p) * bin +
         static_cast<T>(static_cast<float>(i) + 0.5f) * bin / static_cast<T>(grid);
}

/* One axis of a bilinear tap: low/high index and the two weights (l = frac, h = 1 - l). */
template <typename T>
struct AxisTap {
  int64_t lo, hi;
  T l, h;
};

/* Returns false when the coordinate is outside [-1, size] (or NaN): the sample
 * contributes nothing (it still counts in `count`). */
template <typename T>
MRC_HD inline bool axis_tap(T v, int64_t size, AxisTap<T>* t) {
  if (!(v >= static_cast<T>(-1) && v <= static_cast<T>(size))) return false;
  if (v <= static_cast<T>(0)) v = static_cast<T>(0);
  int64_t lo = static_cast<int64_t>(v);
  int64_t hi;
  if (lo >= size - 1) {
    lo = hi = size - 1;
    v = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  t->lo = lo;
  t->hi = hi;
  t->l = v - static_cast<T>(lo);
  t->h = static_cast<T>(1) - t->l;
  return true;
}

/* Weighted sum of the four taps, torchvision's order. */
template <typename T, typename V>
MRC_HD inline T tap_sum(T w1, T w2, T w3, T w4, V v1, V v2, V v3, V v4) {
  return w1 * static_cast<T>(v1) + w2 * static_cast<T>(v2) + w3 * static_cast<T>(v3) +
         w4 * static_cast<T>(v4);
}

/* NMS: area without +1, and IoU as torchvision computes it. */
template <typename T>
MRC_HD inline T box_area(T x1, T y1, T x2, T y2) {
  return (x2 - x1) * (y2 - y1);
}

template <typename T>
MRC_HD inline T box_iou(T ax1, T ay1, T ax2, T ay2, T aarea, T bx1, T by1, T bx2, T by2,
                        T barea) {
  const T xx1 = tv_max(ax1, bx1);
  const T yy1 = tv_max(ay1, by1);
  const T xx2 = tv_min(ax2, bx2);
  const T yy2 = tv_min(ay2, by2);
  const T w = tv_max(static_cast<T>(0), xx2 - xx1);
  const T h = tv_max(static_cast<T>(0), yy2 - yy1);
  const T inter = w * h;
  return inter / (aarea + barea - inter);
}

/* Float threshold equivalent to comparing against a double: for a float iou,
 * (double)iou > thr  <=>  iou > float_threshold(thr). */
MRC_HD inline float float_threshold(double thr) {
  float f = static_cast<float>(thr);
  if (static_cast<double>(f) > thr) {
    /* step one float toward -inf */
    union { float f; uint32_t u; } b;
    b.f = f;
    if (f == 0.0f) { b.u = 0x80000001u; }       /* just below zero */
    else if (f > 0.0f) { b.u -= 1; }
    else { b.u += 1; }
    f = b.f;
  }
  return f;
}

}  // namespace mrc

#endif
