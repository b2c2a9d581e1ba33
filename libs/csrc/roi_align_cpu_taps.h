/*
 * Tap tables of the CPU RoIAlign, and the orders its RoIs are visited in.
 *
 * The bilinear taps are separable: per RoI one table of y samples (PH * gh entries) and
 * one of x samples (PW * gw entries) give every sample's four offsets and weights
 * (w1 = hy * hx, ... as torchvision computes them, make_tap). A RoI's taps are formed
 * once and reused for every channel: stored (RoiTaps: LocalTaps, TapTables) where they
 * are read more than once, formed as they are read (AxisTaps) where they are read once.
 */
#ifndef MRCNN_ROI_ALIGN_CPU_TAPS_H
#define MRCNN_ROI_ALIGN_CPU_TAPS_H

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "kernel_math.h"
#include "roi_align_cpu.h"

namespace mrc {
namespace roi_cpu {

/* Geometry of RoI k of a level. */
template <typename T>
RoiGeom<T> roi_geom(const Level<T>& lv, int64_t k, const Params& p) {
  return roi_geometry<T>(lv.rois + k * 5, p.images, p.pooled_h, p.pooled_w, lv.scale,
                         p.sampling_ratio, p.aligned);
}

/* Zeroes channels [c0, c0 + cn) of output row `row` ([K, C, PH, PW] output). */
template <typename T>
void zero_rows(T* out, int64_t row, int64_t c0, int64_t cn, const Params& p) {
  memset(out + (row * p.channels + c0) * p.bins(), 0, sizeof(T) * cn * p.bins());
}

/* One sample coordinate along one axis. */
template <typename T>
struct AxisSample {
  int64_t lo, hi; /* pixel indices along the axis */
  T l, h;         /* weights of hi and lo */
  bool valid;     /* false: outside [-1, size], the sample contributes nothing */
};

/* The y and x samples of one RoI: ys[ph * gh + iy], xs[pw * gw + ix]. */
template <typename T>
struct AxisTables {
  std::vector<AxisSample<T>> ys, xs;

  void build(const RoiGeom<T>& g, int64_t height, int64_t width, const Params& p) {
    ys.resize(p.pooled_h * g.gh);
    xs.resize(p.pooled_w * g.gw);
    fill(g.y0, g.bin_h, p.pooled_h, g.gh, height, ys.data());
    fill(g.x0, g.bin_w, p.pooled_w, g.gw, width, xs.data());
  }

 private:
  static void fill(T start, T bin, int64_t pooled, int64_t grid, int64_t size,
                   AxisSample<T>* out) {
    for (int64_t b = 0; b < pooled; ++b) {
      for (int64_t i = 0; i < grid; ++i) {
        AxisTap<T> t;
        AxisSample<T>& e = out[b * grid + i];
        e.valid = axis_tap(sample_coord(start, b, bin, i, grid), size, &t);
        e.lo = e.valid ? t.lo : 0;
        e.hi = e.valid ? t.hi : 0;
        e.l = e.valid ? t.l : static_cast<T>(0);
        e.h = e.valid ? t.h : static_cast<T>(0);
      }
    }
  }
};

/* One valid sample: the pixel indices (within one H x W plane) and weights of
 * v[ylo, xlo], v[ylo, xhi], v[yhi, xlo], v[yhi, xhi], in torchvision's order. I is int32
 * for planes of fewer than kInt32Pixels pixels. */
template <typename T, typename I>
struct Tap {
  I p1, p2, p3, p4;
  T w1, w2, w3, w4;
};

/* The tap of the valid samples ey (y) and ex (x) of a map `width` pixels wide: the one
 * place where a tap is formed (torchvision's expressions). */
template <typename T, typename I>
MRC_INLINE Tap<T, I> make_tap(const AxisSample<T>& ey, const AxisSample<T>& ex,
                              int64_t width) {
  Tap<T, I> t;
  t.w1 = ey.h * ex.h;
  t.w2 = ey.h * ex.l;
  t.w3 = ey.l * ex.h;
  t.w4 = ey.l * ex.l;
  t.p1 = static_cast<I>(ey.lo * width + ex.lo);
  t.p2 = static_cast<I>(ey.lo * width + ex.hi);
  t.p3 = static_cast<I>(ey.hi * width + ex.lo);
  t.p4 = static_cast<I>(ey.hi * width + ex.hi);
  return t;
}

/* Tap sources: what the accumulate bodies (roi_align_cpu_accumulate.h) read a RoI's taps
 * from. Each has `count` (the divisor: max(gh * gw, 1), invalid samples included) and
 * for_each_tap(b, f), which calls f(tap) for the taps of bin b in order (samples y-major,
 * as torchvision visits them). */

/* A stored tap list: bin b owns taps[bins[b] .. bins[b + 1]). */
template <typename T, typename I>
struct RoiTaps {
  const Tap<T, I>* taps;
  const int64_t* bins;
  T count;

  template <typename F>
  MRC_INLINE void for_each_tap(int64_t b, F&& f) const {
    for (int64_t s = bins[b]; s < bins[b + 1]; ++s) f(taps[s]);
  }
};

/* The taps formed from a RoI's axis tables as they are read, nothing stored: for a path
 * that reads each RoI's taps once (the unblocked NHWC forward), where writing the list
 * and reading it back costs more than forming it. Same taps, same order as the list
 * write_taps stores (which is built from this). */
template <typename T, typename I>
struct AxisTaps {
  const AxisSample<T>* ys;
  const AxisSample<T>* xs;
  int64_t gh, gw, pooled_w, width;
  T count;

  AxisTaps(const AxisTables<T>& a, const RoiGeom<T>& g, int64_t width_, const Params& p)
      : ys(a.ys.data()), xs(a.xs.data()), gh(g.gh), gw(g.gw), pooled_w(p.pooled_w),
        width(width_), count(g.count) {}

  /* f(tap) for the valid samples of bin (ph, pw) */
  template <typename F>
  MRC_INLINE void for_each_tap(int64_t ph, int64_t pw, F&& f) const {
    for (int64_t iy = 0; iy < gh; ++iy) {
      const AxisSample<T>& ey = ys[ph * gh + iy];
      if (!ey.valid) continue;
      for (int64_t ix = 0; ix < gw; ++ix) {
        const AxisSample<T>& ex = xs[pw * gw + ix];
        if (!ex.valid) continue;
        f(make_tap<T, I>(ey, ex, width));
      }
    }
  }
  template <typename F>
  MRC_INLINE void for_each_tap(int64_t b, F&& f) const {
    const int64_t ph = b / pooled_w;
    for_each_tap(ph, b - ph * pooled_w, f);
  }
};

/* Exact number of valid samples of one RoI (what write_taps will write). */
template <typename T>
int64_t count_taps(const AxisTables<T>& a, const RoiGeom<T>& g, const Params& p) {
  int64_t total = 0;
  for (int64_t ph = 0; ph < p.pooled_h; ++ph) {
    int64_t valid_y = 0;
    for (int64_t iy = 0; iy < g.gh; ++iy) valid_y += a.ys[ph * g.gh + iy].valid;
    for (int64_t pw = 0; pw < p.pooled_w; ++pw) {
      int64_t valid_x = 0;
      for (int64_t ix = 0; ix < g.gw; ++ix) valid_x += a.xs[pw * g.gw + ix].valid;
      total += valid_y * valid_x;
    }
  }
  return total;
}

/* Writes the valid taps of one RoI, bin by bin, and bin_start[0 .. PH * PW]; returns the
 * tap count. */
template <typename T, typename I>
int64_t write_taps(const AxisTables<T>& a, const RoiGeom<T>& g, int64_t width,
                   const Params& p, Tap<T, I>* taps, int64_t* bin_start) {
  const AxisTaps<T, I> src(a, g, width, p);
  int64_t n = 0;
  for (int64_t ph = 0; ph < p.pooled_h; ++ph) {
    for (int64_t pw = 0; pw < p.pooled_w; ++pw) {
      bin_start[ph * p.pooled_w + pw] = n;
      src.for_each_tap(ph, pw, [&](const Tap<T, I>& t) { taps[n++] = t; });
    }
  }
  bin_start[p.bins()] = n;
  return n;
}

/* A work item's own taps of one RoI (when the shared tables were not built). */
template <typename T, typename I>
struct LocalTaps {
  AxisTables<T> axes;
  std::vector<Tap<T, I>> taps;
  std::vector<int64_t> bins;

  RoiTaps<T, I> build(const RoiGeom<T>& g, const Level<T>& level, const Params& p) {
    axes.build(g, level.height, level.width, p);
    taps.resize(count_taps(axes, g, p));
    bins.resize(p.bins() + 1);
    write_taps(axes, g, level.width, p, taps.data(), bins.data());
    return RoiTaps<T, I>{taps.data(), bins.data(), g.count};
  }
};

/* Inclusive pixel rectangle [y0, y1] x [x0, x1] that the valid taps of a RoI read
 * (empty: y0 > y1). */
struct Rect {
  int32_t y0 = 1, y1 = 0, x0 = 1, x1 = 0;
  Rect() = default;
  template <typename T>
  explicit Rect(const AxisTables<T>& a) {
    extent(a.ys, &y0, &y1);
    extent(a.xs, &x0, &x1);
  }
  bool empty() const { return y0 > y1 || x0 > x1; }

 private:
  template <typename T>
  static void extent(const std::vector<AxisSample<T>>& e, int32_t* lo, int32_t* hi) {
    *lo = INT32_MAX;
    *hi = -1;
    for (const AxisSample<T>& a : e) {
      if (!a.valid) continue;
      *lo = std::min(*lo, static_cast<int32_t>(a.lo));
      *hi = std::max(*hi, static_cast<int32_t>(a.hi));
    }
  }
};

/* Tap tables of all RoIs of one level, built once (in parallel) and shared by every
 * channel block, when they fit in kMaxTapTableBytes. */
template <typename T, typename I>
struct TapTables {
  bool ok = false;
  std::vector<RoiGeom<T>> geom;
  std::vector<int64_t> roi_start; /* K + 1: first tap of each RoI */
  std::vector<int64_t> bin_start; /* K * (PH * PW + 1), relative to roi_start[k] */
  std::vector<Tap<T, I>> taps;
  std::vector<Rect> rect;         /* pixels RoI k reads (empty when it has no taps) */
  const Level<T>* level = nullptr;
  int64_t bins_per_roi = 0;       /* PH * PW + 1 */

  /* Serial part: geometry and exact tap counts, storage sized. Leaves ok false when the
   * taps would need more than kMaxTapTableBytes. */
  void prepare(const Level<T>& lv, const Params& p) {
    level = &lv;
    bins_per_roi = p.bins() + 1;
    const int64_t K = lv.count;
    geom.resize(K);
    roi_start.assign(K + 1, 0);
    AxisTables<T> axes;
    for (int64_t k = 0; k < K; ++k) {
      geom[k] = roi_geom(lv, k, p);
      int64_t n = 0;
      if (geom[k].batch >= 0 && lv.height > 0 && lv.width > 0) {
        axes.build(geom[k], lv.height, lv.width, p);
        n = count_taps(axes, geom[k], p);
      }
      roi_start[k + 1] = roi_start[k] + n;
      if (static_cast<double>(roi_start[k + 1]) * sizeof(Tap<T, I>) > kMaxTapTableBytes)
        return;
    }
    taps.resize(roi_start[K]);
    bin_start.resize(K * bins_per_roi);
    rect.assign(K, Rect());
    ok = true;
  }

  /* Parallel part: the taps of RoI k (any thread, any order). */
  void fill(int64_t k, AxisTables<T>& axes, const Params& p) {
    int64_t* bins = bin_start.data() + k * bins_per_roi;
    if (geom[k].batch < 0) {
      std::fill(bins, bins + bins_per_roi, 0);
      return;
    }
    axes.build(geom[k], level->height, level->width, p);
    write_taps(axes, geom[k], level->width, p, taps.data() + roi_start[k], bins);
    if (roi_start[k + 1] > roi_start[k]) rect[k] = Rect(axes);
  }

  /* prepare, then fill every RoI with the team. */
  void build(const Level<T>& lv, const Params& p) {
    prepare(lv, p);
    if (!ok) return;
#pragma omp parallel num_threads(p.threads)
    {
      AxisTables<T> axes;
#pragma omp for schedule(dynamic, 16)
      for (int64_t k = 0; k < lv.count; ++k) fill(k, axes, p);
    }
  }

  RoiTaps<T, I> roi(int64_t k) const {
    return RoiTaps<T, I>{taps.data() + roi_start[k], bin_start.data() + k * bins_per_roi,
                         geom[k].count};
  }
};

/* Visiting order of the forward, for cache reuse: image, band of kSpatialBandRows
 * feature rows, column of the RoI centre (RoIs close in that order read nearby pixels of
 * the packed plane while they are still cached). Forward items are independent, so the
 * order changes no result. */
static const double kSpatialBandRows = 16;
/* Each key field is clamped into [-kSpatialClamp, kSpatialClamp] (NaN and inf
 * included), so it spans less than kSpatialRadix and
 * (image * radix + band) * radix + column sorts by image, then band, then column. */
static const double kSpatialClamp = 1e6;
static const double kSpatialRadix = 4e6;

template <typename T>
std::vector<int64_t> spatial_order(const T* rois, int64_t K, double scale) {
  auto clamp = [](double v, double lo) {
    return v == v ? std::min(std::max(v, lo), kSpatialClamp) : kSpatialClamp;
  };
  std::vector<std::pair<double, int64_t>> key(K);
  for (int64_t k = 0; k < K; ++k) {
    const T* r = rois + k * 5;
    const double cy = (static_cast<double>(r[2]) + static_cast<double>(r[4])) * 0.5 * scale;
    const double cx = (static_cast<double>(r[1]) + static_cast<double>(r[3])) * 0.5 * scale;
    const double band = clamp(cy / kSpatialBandRows, -kSpatialClamp);
    const double column = clamp(cx, -kSpatialClamp);
    const double image = clamp(static_cast<double>(r[0]), -1.0);
    key[k].first = (image * kSpatialRadix + static_cast<double>(static_cast<int64_t>(band))) *
                       kSpatialRadix + column;
    key[k].second = k;
  }
  std::stable_sort(key.begin(), key.end(),
                   [](const std::pair<double, int64_t>& a,
                      const std::pair<double, int64_t>& b) { return a.first < b.first; });
  std::vector<int64_t> visit(K);
  for (int64_t k = 0; k < K; ++k) visit[k] = key[k].second;
  return visit;
}

/* The RoIs of each image: order[start[n] .. start[n + 1]) in visiting order (a stable
 * counting sort). RoIs of no image (batch index -1) are left out. */
struct ImageGroups {
  std::vector<int64_t> start, order;

  /* batch[k]: image of RoI k or -1; visit: the order to keep (nullptr: input order). */
  void build(const std::vector<int64_t>& batch, int64_t images, const int64_t* visit) {
    const int64_t K = static_cast<int64_t>(batch.size());
    start.assign(images + 1, 0);
    for (int64_t k = 0; k < K; ++k)
      if (batch[k] >= 0) start[batch[k] + 1]++;
    for (int64_t n = 0; n < images; ++n) start[n + 1] += start[n];
    order.resize(start[images]);
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < K; ++i) {
      const int64_t k = visit ? visit[i] : i;
      if (batch[k] >= 0) order[pos[batch[k]]++] = k;
    }
  }
  int64_t begin(int64_t n) const { return start[n]; }
  int64_t end(int64_t n) const { return start[n + 1]; }
};

}  // namespace roi_cpu
}  // namespace mrc

#endif
