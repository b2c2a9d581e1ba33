/*
 * RoIAlign forward/backward on the CPU (libmrcnn_cpu.so). Semantics: docs in
 * /work/shared/specs/kernels.md; bit-identical to torchvision's CPU kernel when compiled
 * with -ffp-contract=off (same expressions, same order of operations).
 *
 * Speed comes from:
 *   - the bilinear taps are separable: per RoI we precompute one table of y taps
 *     (PH * gh entries) and one of x taps (PW * gw entries); each sample's four offsets
 *     and weights (w1 = hy * hx, ... as torchvision computes them) are formed once and
 *     reused for every channel;
 *   - C >= 32 with enough samples per map pixel: for each (level, image, 32-channel
 *     block) the threads pack the pixels the RoIs read into one [H][W][32] scratch plane
 *     (kept per calling thread in huge pages), then pool every RoI of that image from it
 *     while it sits in the last-level cache (RoIs in a spatial order); one tap reads 32
 *     contiguous channels (AVX2 intrinsics chosen at run time) and each RoI's result is
 *     written with streaming stores;
 *   - otherwise NCHW: work items are (channel block, RoI), channel-block major, so all
 *     threads stream the same few feature planes; NHWC: one tap reads a run of C values;
 *   - backward: items are (image, channel block): the gradient planes of different items
 *     are disjoint and RoIs are visited in order inside each, so the result does not
 *     depend on the number of threads and equals torchvision's summation order; NHWC
 *     gradients are accumulated in place, NCHW ones in a packed plane then unpacked; the
 *     gradient is overwritten, never accumulated into;
 *   - multi-level (FPN): one call takes every level and each RoI's level and pools each
 *     RoI straight into its output row (no gather / concatenation / scatter); a single
 *     map is one level, so both entry points share the same code; on the blocked path
 *     all levels share one parallel region;
 *   - calls with little work (K*C*PH*PW < 2^18) run on the calling thread.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <stdio.h>

#include <algorithm>
#include <memory>
#include <new>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "kernel_math.h"
#include "mrcnn_kernels.h"

namespace {

using mrc::AxisTap;
using mrc::RoiGeom;

template <typename T>
struct AxisEntry {
  int64_t lo, hi;  /* index along the axis */
  T l, h;          /* weights of hi and lo */
  int valid;
};

/* Taps of one axis for every (bin, sub-sample): out[p * g + i]. */
template <typename T>
void build_axis(T start, T bin, int64_t P, int64_t g, int64_t size, AxisEntry<T>* out) {
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t i = 0; i < g; ++i) {
      const T v = mrc::sample_coord(start, p, bin, i, g);
      AxisTap<T> t;
      AxisEntry<T>& e = out[p * g + i];
      e.valid = mrc::axis_tap(v, size, &t) ? 1 : 0;
      if (e.valid) {
        e.lo = t.lo;
        e.hi = t.hi;
        e.l = t.l;
        e.h = t.h;
      } else {
        e.lo = e.hi = 0;
        e.l = e.h = static_cast<T>(0);
      }
    }
  }
}

/* The output (and gradient) buffers are fresh allocations of tens of MB: faulting them in
 * 4 KiB pages on first write cost about as much as the pooling itself. Asking for huge
 * pages on the untouched 2 MiB-aligned middle makes that 512x fewer faults. A hint only:
 * errors (no THP, not an mmap'ed block) change nothing. */
void hint_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  if (!p || bytes < 2 * huge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(huge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

using mrc::cpu_has_avx2;
using mrc::resolve_threads;

template <typename T>
void zero_roi_block(T* out, int64_t k, int64_t c0, int64_t cn, int64_t C, int64_t PHW) {
  memset(out + (k * C + c0) * PHW, 0, sizeof(T) * cn * PHW);
}

/* Compact list of the valid samples of one RoI: bin b owns taps [bin_start[b],
 * bin_start[b+1]); offsets are within one H x W plane. */
template <typename T, typename I>
struct TapRec {
  I p1, p2, p3, p4;
  T w1, w2, w3, w4;
};

/* Fills taps (capacity PH*PW*gh*gw) and bin_start (PH*PW+1); returns the tap count. */
template <typename T, typename I>
int64_t build_taps(const RoiGeom<T>& g, int64_t H, int64_t W, int64_t PH, int64_t PW,
                   std::vector<AxisEntry<T>>& ys, std::vector<AxisEntry<T>>& xs,
                   TapRec<T, I>* taps, int64_t* bin_start) {
  ys.resize(PH * g.gh);
  xs.resize(PW * g.gw);
  build_axis(g.y0, g.bin_h, PH, g.gh, H, ys.data());
  build_axis(g.x0, g.bin_w, PW, g.gw, W, xs.data());
  int64_t n = 0;
  for (int64_t ph = 0; ph < PH; ++ph) {
    for (int64_t pw = 0; pw < PW; ++pw) {
      bin_start[ph * PW + pw] = n;
      for (int64_t iy = 0; iy < g.gh; ++iy) {
        const AxisEntry<T>& ey = ys[ph * g.gh + iy];
        if (!ey.valid) continue;
        for (int64_t ix = 0; ix < g.gw; ++ix) {
          const AxisEntry<T>& ex = xs[pw * g.gw + ix];
          if (!ex.valid) continue;
          TapRec<T, I>& t = taps[n++];
          t.w1 = ey.h * ex.h;
          t.w2 = ey.h * ex.l;
          t.w3 = ey.l * ex.h;
          t.w4 = ey.l * ex.l;
          t.p1 = static_cast<I>(ey.lo * W + ex.lo);
          t.p2 = static_cast<I>(ey.lo * W + ex.hi);
          t.p3 = static_cast<I>(ey.hi * W + ex.lo);
          t.p4 = static_cast<I>(ey.hi * W + ex.hi);
        }
      }
    }
  }
  bin_start[PH * PW] = n;
  return n;
}

/* Exact number of valid samples of one RoI (what build_taps will write). */
template <typename T>
int64_t count_taps(const RoiGeom<T>& g, int64_t H, int64_t W, int64_t PH, int64_t PW,
                   std::vector<AxisEntry<T>>& ys, std::vector<AxisEntry<T>>& xs) {
  if (g.batch < 0 || H == 0 || W == 0) return 0;
  ys.resize(PH * g.gh);
  xs.resize(PW * g.gw);
  build_axis(g.y0, g.bin_h, PH, g.gh, H, ys.data());
  build_axis(g.x0, g.bin_w, PW, g.gw, W, xs.data());
  int64_t total = 0;
  for (int64_t ph = 0; ph < PH; ++ph) {
    int64_t vy = 0;
    for (int64_t iy = 0; iy < g.gh; ++iy) vy += ys[ph * g.gh + iy].valid;
    for (int64_t pw = 0; pw < PW; ++pw) {
      int64_t vx = 0;
      for (int64_t ix = 0; ix < g.gw; ++ix) vx += xs[pw * g.gw + ix].valid;
      total += vy * vx;
    }
  }
  return total;
}

/* Inclusive pixel rectangle [y0, y1] x [x0, x1] that the valid taps of a RoI read
 * (empty: y0 > y1). */
struct Rect {
  int32_t y0 = 1, y1 = 0, x0 = 1, x1 = 0;
  Rect() = default;
  template <typename T>
  Rect(const std::vector<AxisEntry<T>>& ys, const std::vector<AxisEntry<T>>& xs) {
    extent(ys, &y0, &y1);
    extent(xs, &x0, &x1);
  }
  template <typename T>
  static void extent(const std::vector<AxisEntry<T>>& e, int32_t* lo, int32_t* hi) {
    *lo = INT32_MAX;
    *hi = -1;
    for (const AxisEntry<T>& a : e) {
      if (!a.valid) continue;
      *lo = std::min(*lo, static_cast<int32_t>(a.lo));
      *hi = std::max(*hi, static_cast<int32_t>(a.hi));
    }
  }
};

/* Tap lists of all RoIs, built once (in parallel) and shared by every channel block,
 * when they fit in max_bytes; otherwise each work item builds its RoI's list itself. */
template <typename T, typename I>
struct AllTaps {
  bool ok = false;
  std::vector<RoiGeom<T>> geom;
  std::vector<int64_t> roi_off;     /* K+1: first tap of each RoI */
  std::vector<int64_t> bin_start;   /* K * (PHW+1), relative to roi_off[k] */
  std::vector<TapRec<T, I>> taps;
  std::vector<Rect> rect;           /* pixels RoI k reads (empty when it has no taps) */
  int64_t H = 0, W = 0, PH = 0, PW = 0;

  /* Serial part: geometry and exact tap counts, storage sized. Leaves ok false when the
   * taps would need more than max_bytes. */
  void prepare(const T* rois, int64_t N, int64_t H_, int64_t W_, int64_t K, int64_t PH_,
               int64_t PW_, double scale, int64_t sr, bool aligned, size_t max_bytes) {
    H = H_, W = W_, PH = PH_, PW = PW_;
    geom.resize(K);
    roi_off.assign(K + 1, 0);
    std::vector<AxisEntry<T>> ys0, xs0;
    for (int64_t k = 0; k < K; ++k) {
      geom[k] = mrc::roi_geometry<T>(rois + k * 5, N, PH, PW, scale, sr, aligned);
      const int64_t cap = count_taps(geom[k], H, W, PH, PW, ys0, xs0);
      roi_off[k + 1] = roi_off[k] + cap;
      if (static_cast<double>(roi_off[k + 1]) * sizeof(TapRec<T, I>) > max_bytes) return;
    }
    taps.resize(roi_off[K]);
    bin_start.resize(K * (PH * PW + 1));
    rect.assign(K, Rect());
    ok = true;
  }

  /* Parallel part: the taps of RoI k (any thread, any order). */
  void fill(int64_t k, std::vector<AxisEntry<T>>& ys, std::vector<AxisEntry<T>>& xs) {
    const int64_t PHW = PH * PW;
    if (geom[k].batch < 0) {
      for (int64_t b = 0; b <= PHW; ++b) bin_start[k * (PHW + 1) + b] = 0;
      return;
    }
    build_taps<T, I>(geom[k], H, W, PH, PW, ys, xs, taps.data() + roi_off[k],
                     bin_start.data() + k * (PHW + 1));
    if (roi_off[k + 1] > roi_off[k]) rect[k] = Rect(ys, xs);
  }

  void build(const T* rois, int64_t N, int64_t H_, int64_t W_, int64_t K, int64_t PH_,
             int64_t PW_, double scale, int64_t sr, bool aligned, int nt, size_t max_bytes) {
    prepare(rois, N, H_, W_, K, PH_, PW_, scale, sr, aligned, max_bytes);
    if (!ok) return;
#pragma omp parallel num_threads(nt)
    {
      std::vector<AxisEntry<T>> ys, xs;
#pragma omp for schedule(dynamic, 16)
      for (int64_t k = 0; k < K; ++k) fill(k, ys, xs);
    }
  }
};

/* Channels per NCHW work item: one sample's taps are loaded once and applied to this
 * many planes (the accumulators stay in registers). */
static const int64_t kFwdBlock = 16;

template <typename T, typename I, int CBK>
inline void nchw_block(const T* __restrict pl, int64_t HW, const TapRec<T, I>* __restrict taps,
                       const int64_t* bins, int64_t PHW, T count, T* __restrict o) {
  for (int64_t b = 0; b < PHW; ++b) {
    T acc[CBK];
    for (int c = 0; c < CBK; ++c) acc[c] = static_cast<T>(0);
    for (int64_t s = bins[b]; s < bins[b + 1]; ++s) {
      const TapRec<T, I> t = taps[s];
      for (int c = 0; c < CBK; ++c) {
        const T* p = pl + c * HW;
        acc[c] += t.w1 * p[t.p1] + t.w2 * p[t.p2] + t.w3 * p[t.p3] + t.w4 * p[t.p4];
      }
    }
    for (int c = 0; c < CBK; ++c) o[c * PHW + b] = acc[c] / count;
  }
}

template <typename T, typename I>
inline void nchw_block_dyn(const T* pl, int64_t HW, int64_t cn, const TapRec<T, I>* taps,
                           const int64_t* bins, int64_t PHW, T count, T* o) {
  for (int64_t c = 0; c < cn; ++c, pl += HW, o += PHW) {
    for (int64_t b = 0; b < PHW; ++b) {
      T acc = static_cast<T>(0);
      for (int64_t s = bins[b]; s < bins[b + 1]; ++s) {
        const TapRec<T, I>& t = taps[s];
        acc += t.w1 * pl[t.p1] + t.w2 * pl[t.p2] + t.w3 * pl[t.p3] + t.w4 * pl[t.p4];
      }
      o[b] = acc / count;
    }
  }
}

/* RoI visiting order for cache reuse: image, band of 16 feature rows, column. Items are
 * independent in the forward, so the order changes no result. */
template <typename T>
std::vector<int64_t> spatial_order(const T* rois, int64_t K, double scale) {
  std::vector<std::pair<double, int64_t>> key(K);
  for (int64_t k = 0; k < K; ++k) {
    const T* r = rois + k * 5;
    const double cy = (static_cast<double>(r[2]) + static_cast<double>(r[4])) * 0.5 * scale;
    const double cx = (static_cast<double>(r[1]) + static_cast<double>(r[3])) * 0.5 * scale;
    double band = cy / 16.0;
    band = (band == band) ? std::min(std::max(band, -1e6), 1e6) : 1e6;
    const double col = (cx == cx) ? std::min(std::max(cx, -1e6), 1e6) : 1e6;
    const double b = static_cast<double>(r[0]);
    key[k].first = ((b == b ? std::min(std::max(b, -1.0), 1e6) : 1e6) * 4e6 +
                    static_cast<double>(static_cast<int64_t>(band))) * 4e6 + col;
    key[k].second = k;
  }
  std::stable_sort(key.begin(), key.end(),
                   [](const std::pair<double, int64_t>& a,
                      const std::pair<double, int64_t>& b) { return a.first < b.first; });
  std::vector<int64_t> visit(K);
  for (int64_t k = 0; k < K; ++k) visit[k] = key[k].second;
  return visit;
}

template <typename T, typename I>
void forward_nchw(const T* input, const T* rois, T* output, const int64_t* rows, int64_t N, int64_t C, int64_t H,
                  int64_t W, int64_t K, int64_t PH, int64_t PW, double scale, int64_t sr,
                  bool aligned, int nt) {
  const int64_t HW = H * W, PHW = PH * PW;
  const int64_t CB = std::min<int64_t>(kFwdBlock, C);
  const int64_t ncb = (C + CB - 1) / CB;
  AllTaps<T, I> all;
  if (ncb > 1) all.build(rois, N, H, W, K, PH, PW, scale, sr, aligned, nt, 256u << 20);
  const std::vector<int64_t> visit = spatial_order(rois, K, scale);
#pragma omp parallel num_threads(nt)
  {
    std::vector<AxisEntry<T>> ys, xs;
    std::vector<TapRec<T, I>> local;
    std::vector<int64_t> local_bins(PHW + 1);
#pragma omp for collapse(2) schedule(dynamic, 8)
    for (int64_t cb = 0; cb < ncb; ++cb) {
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t k = visit[kk];
        const int64_t c0 = cb * CB;
        const int64_t cn = std::min(CB, C - c0);
        const RoiGeom<T> g = all.ok ? all.geom[k]
                                    : mrc::roi_geometry<T>(rois + k * 5, N, PH, PW, scale, sr,
                                                           aligned);
        if (g.batch < 0 || H == 0 || W == 0) {
          zero_roi_block(output, rows ? rows[k] : k, c0, cn, C, PHW);
          continue;
        }
        const TapRec<T, I>* taps;
        const int64_t* bins;
        if (all.ok) {
          taps = all.taps.data() + all.roi_off[k];
          bins = all.bin_start.data() + k * (PHW + 1);
        } else {
          local.resize(count_taps(g, H, W, PH, PW, ys, xs));
          build_taps<T, I>(g, H, W, PH, PW, ys, xs, local.data(), local_bins.data());
          taps = local.data();
          bins = local_bins.data();
        }
        const T* pl = input + (g.batch * C + c0) * HW;
        T* o = output + ((rows ? rows[k] : k) * C + c0) * PHW;
        if (cn == CB && CB == kFwdBlock)
          nchw_block<T, I, kFwdBlock>(pl, HW, taps, bins, PHW, g.count, o);
        else
          nchw_block_dyn<T, I>(pl, HW, cn, taps, bins, PHW, g.count, o);
      }
    }
  }
}

template <typename T>
void forward_nhwc(const T* input, const T* rois, T* output, const int64_t* rows, int64_t N, int64_t C, int64_t H,
                  int64_t W, int64_t K, int64_t PH, int64_t PW, double scale, int64_t sr,
                  bool aligned, int nt) {
  const int64_t PHW = PH * PW;
#pragma omp parallel num_threads(nt)
  {
    std::vector<AxisEntry<T>> ys, xs;
    std::vector<T> acc(C);
#pragma omp for schedule(dynamic, 4)
    for (int64_t k = 0; k < K; ++k) {
      const RoiGeom<T> g = mrc::roi_geometry<T>(rois + k * 5, N, PH, PW, scale, sr, aligned);
      if (g.batch < 0 || H == 0 || W == 0) {
        zero_roi_block(output, rows ? rows[k] : k, 0, C, C, PHW);
        continue;
      }
      ys.resize(PH * g.gh);
      xs.resize(PW * g.gw);
      build_axis(g.y0, g.bin_h, PH, g.gh, H, ys.data());
      build_axis(g.x0, g.bin_w, PW, g.gw, W, xs.data());
      const T* img = input + g.batch * H * W * C;
      T* __restrict a = acc.data();
      for (int64_t ph = 0; ph < PH; ++ph) {
        for (int64_t pw = 0; pw < PW; ++pw) {
          for (int64_t c = 0; c < C; ++c) a[c] = static_cast<T>(0);
          for (int64_t iy = 0; iy < g.gh; ++iy) {
            const AxisEntry<T>& ey = ys[ph * g.gh + iy];
            if (!ey.valid) continue;
            for (int64_t ix = 0; ix < g.gw; ++ix) {
              const AxisEntry<T>& ex = xs[pw * g.gw + ix];
              if (!ex.valid) continue;
              const T w1 = ey.h * ex.h, w2 = ey.h * ex.l, w3 = ey.l * ex.h, w4 = ey.l * ex.l;
              const T* __restrict v1 = img + (ey.lo * W + ex.lo) * C;
              const T* __restrict v2 = img + (ey.lo * W + ex.hi) * C;
              const T* __restrict v3 = img + (ey.hi * W + ex.lo) * C;
              const T* __restrict v4 = img + (ey.hi * W + ex.hi) * C;
              for (int64_t c = 0; c < C; ++c)
                a[c] += w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c];
            }
          }
          T* o = output + (rows ? rows[k] : k) * C * PHW + ph * PW + pw;
          for (int64_t c = 0; c < C; ++c) o[c * PHW] = a[c] / g.count;
        }
      }
    }
  }
}

static const int64_t kBwdBlock = 8;

template <typename T, typename I>
void backward_cpu(const T* grad_out, const T* rois, const int64_t* rows, T* grad_in, int64_t N, int64_t C,
                  int64_t H, int64_t W, int64_t K, int64_t PH, int64_t PW, double scale,
                  int64_t sr, bool aligned, int nt) {
  const int64_t HW = H * W, PHW = PH * PW;
  /* RoIs of each image, in order (counting sort, stable). */
  std::vector<int64_t> start(N + 1, 0), order;
  std::vector<int64_t> batch(K);
  for (int64_t k = 0; k < K; ++k) {
    batch[k] = mrc::roi_geometry<T>(rois + k * 5, N, PH, PW, scale, sr, aligned).batch;
    if (batch[k] >= 0) start[batch[k] + 1]++;
  }
  for (int64_t n = 0; n < N; ++n) start[n + 1] += start[n];
  order.resize(start[N]);
  {
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t k = 0; k < K; ++k)
      if (batch[k] >= 0) order[pos[batch[k]]++] = k;
  }
  int64_t CB = std::min<int64_t>(kBwdBlock, C);
  /* enough items for the threads */
  while (CB > 1 && N * ((C + CB - 1) / CB) < 2 * nt) CB = (CB + 1) / 2;
  const int64_t ncb = (C + CB - 1) / CB;
  const int64_t items = N * ncb;
  AllTaps<T, I> all;
  if (items > 1) all.build(rois, N, H, W, K, PH, PW, scale, sr, aligned, nt, 256u << 20);
#pragma omp parallel num_threads(nt)
  {
    std::vector<AxisEntry<T>> ys, xs;
    std::vector<TapRec<T, I>> local;
    std::vector<int64_t> local_bins(PHW + 1);
    std::vector<T> gv(CB), t1(CB), t2(CB), t3(CB), t4(CB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / ncb, c0 = (it % ncb) * CB;
      const int64_t cn = std::min(CB, C - c0);
      T* planes = grad_in + (n * C + c0) * HW;
      for (int64_t oi = start[n]; oi < start[n + 1]; ++oi) {
        const int64_t k = order[oi];
        const TapRec<T, I>* taps;
        const int64_t* bins;
        T cnt;
        if (all.ok) {
          taps = all.taps.data() + all.roi_off[k];
          bins = all.bin_start.data() + k * (PHW + 1);
          cnt = all.geom[k].count;
        } else {
          const RoiGeom<T> g =
              mrc::roi_geometry<T>(rois + k * 5, N, PH, PW, scale, sr, aligned);
          local.resize(count_taps(g, H, W, PH, PW, ys, xs));
          build_taps<T, I>(g, H, W, PH, PW, ys, xs, local.data(), local_bins.data());
          taps = local.data();
          bins = local_bins.data();
          cnt = g.count;
        }
        const T* go = grad_out + ((rows ? rows[k] : k) * C + c0) * PHW;
        for (int64_t b = 0; b < PHW; ++b) {
          if (bins[b] == bins[b + 1]) continue;
          for (int64_t c = 0; c < cn; ++c) gv[c] = go[c * PHW + b];
          for (int64_t s = bins[b]; s < bins[b + 1]; ++s) {
            const TapRec<T, I> t = taps[s];
            /* torchvision: g_i = grad * w_i / count, added in the order 1, 2, 3, 4 */
            for (int64_t c = 0; c < cn; ++c) {
              t1[c] = gv[c] * t.w1 / cnt;
              t2[c] = gv[c] * t.w2 / cnt;
              t3[c] = gv[c] * t.w3 / cnt;
              t4[c] = gv[c] * t.w4 / cnt;
            }
            T* pl = planes;
            for (int64_t c = 0; c < cn; ++c, pl += HW) {
              pl[t.p1] += t1[c];
              pl[t.p2] += t2[c];
              pl[t.p3] += t3[c];
              pl[t.p4] += t4[c];
            }
          }
        }
      }
    }
  }
}

/* ------------------------------------------------------------------------------------
 * Channel-blocked path (C >= kLanes): the input is packed once into [N][C/L][H][W][L]
 * (L = kLanes channels per pixel, the last block zero-padded). One tap then reads L
 * contiguous channels, the inner loops over L vectorise (AVX2 when the CPU has it, chosen
 * at run time), and a block of the map (H*W*L values) stays in the last-level cache
 * while every RoI reads it. Per channel the arithmetic and its order are unchanged
 * (vector lanes are independent), so results stay bit-identical to the scalar paths.
 * ------------------------------------------------------------------------------------ */
static const int64_t kLanes = 32;



static const int64_t kTile = 32;

/* One row of cn <= L channel planes (src: channel c at src + c * plane) -> o[x * L + c],
 * in tiles of kTile pixels so the written tile stays in L1. */
template <typename T>
void pack_row_nchw_scalar(const T* src, int64_t plane, int64_t W, int64_t cn, T* o,
                          int64_t x_begin = 0) {
  for (int64_t x0 = x_begin; x0 < W; x0 += kTile) {
    const int64_t xn = std::min(kTile, W - x0);
    for (int64_t c = 0; c < cn; ++c) {
      const T* row = src + c * plane + x0;
      T* dst = o + x0 * kLanes + c;
      for (int64_t x = 0; x < xn; ++x) dst[x * kLanes] = row[x];
    }
  }
}

#if MRC_X86_DISPATCH
/* float: 8 channels x 8 pixels per step, transposed in registers (pure data movement). */
MRC_AVX2 void pack_row_nchw_avx2(const float* src, int64_t plane, int64_t W, int64_t cn,
                                 float* o) {
  const int64_t W8 = W - W % 8, C8 = cn - cn % 8;
  /* channel groups outer: 8 source rows stream at a time (the prefetchers track that
   * many; 32 at once they do not) */
  for (int64_t c0 = 0; c0 < C8; c0 += 8) {
    for (int64_t x0 = 0; x0 < W8; x0 += 8) {
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (c0 + i) * plane + x0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(o + (x0 + j) * kLanes + c0,
                         _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
        _mm256_storeu_ps(o + (x0 + j + 4) * kLanes + c0,
                         _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
      }
    }
  }
  for (int64_t c = C8; c < cn; ++c)
    for (int64_t x = 0; x < W8; ++x) o[x * kLanes + c] = src[c * plane + x];
  pack_row_nchw_scalar(src, plane, W, cn, o, W8);
}
#endif

template <typename T>
void pack_row_nchw(const T* src, int64_t plane, int64_t W, int64_t cn, T* o) {
  pack_row_nchw_scalar(src, plane, W, cn, o);
}

void pack_row_nchw(const float* src, int64_t plane, int64_t W, int64_t cn, float* o) {
#if MRC_X86_DISPATCH
  if (cpu_has_avx2()) return pack_row_nchw_avx2(src, plane, W, cn, o);
#endif
  pack_row_nchw_scalar(src, plane, W, cn, o);
}

/* Pixels [x0, x1) of row y of block b (channels b*L .. b*L+L-1) of image n, packed as
 * [W][L] at o, lanes past C zero-filled. From an NCHW (or NHWC) map. */
template <typename T>
void pack_one_row(const T* in, bool channels_last, T* o, int64_t n, int64_t b, int64_t y,
                  int64_t x0, int64_t x1, int64_t C, int64_t H, int64_t W) {
  const int64_t c0 = b * kLanes, cn = std::min(kLanes, C - c0), xn = x1 - x0;
  o += x0 * kLanes;
  if (cn < kLanes) memset(o, 0, sizeof(T) * xn * kLanes);
  if (channels_last) {
    const T* src = in + ((n * H + y) * W + x0) * C + c0;
    for (int64_t x = 0; x < xn; ++x) memcpy(o + x * kLanes, src + x * C, sizeof(T) * cn);
    return;
  }
  pack_row_nchw(in + ((n * C + c0) * H + y) * W + x0, H * W, xn, cn, o);
}

/* Which chunks of kChunk pixels of each row the RoIs of one image read (the union of
 * their rectangles): the pack skips the rest, e.g. most of the map for the mask head's
 * hundred RoIs. Built with a difference array: O(sum of RoI heights + H * W / kChunk). */
static const int64_t kChunk = 8;
struct Coverage {
  int64_t H = 0, W = 0, nch = 0;
  std::vector<int32_t> count;  /* [H][nch + 1]: RoIs covering chunk (y, c) */

  void reset(int64_t H_, int64_t W_) {
    H = H_, W = W_, nch = (W + kChunk - 1) / kChunk;
    count.assign(H * (nch + 1), 0);
  }
  void add(const Rect& r) {
    if (r.y0 > r.y1 || r.x0 > r.x1) return;
    const int64_t c0 = r.x0 / kChunk, c1 = r.x1 / kChunk + 1;
    for (int64_t y = r.y0; y <= r.y1; ++y) {
      count[y * (nch + 1) + c0] += 1;
      count[y * (nch + 1) + c1] -= 1;
    }
  }
  void finish() {
    for (int64_t y = 0; y < H; ++y)
      for (int64_t c = 1; c <= nch; ++c) count[y * (nch + 1) + c] += count[y * (nch + 1) + c - 1];
  }
  /* Calls f(x0, x1) for each maximal run of covered pixels of row y. */
  template <typename F>
  void runs(int64_t y, F f) const {
    const int32_t* row = count.data() + y * (nch + 1);
    for (int64_t c = 0; c < nch;) {
      if (!row[c]) {
        ++c;
        continue;
      }
      int64_t e = c + 1;
      while (e < nch && row[e]) ++e;
      f(c * kChunk, std::min(e * kChunk, W));
      c = e;
    }
  }
};

/* Scratch for one packed block per thread (or one shared): a fresh allocation of several
 * MB is mmap'ed and page-faulted on every call, which costs as much as the packing
 * itself, so each calling thread keeps its buffer (it only grows). */
struct FreeDeleter {
  void operator()(void* p) const { free(p); }
};

template <typename T>
T* scratch(size_t count) {
  static thread_local std::unique_ptr<char, FreeDeleter> buf;
  static thread_local size_t cap = 0;
  const size_t bytes = count * sizeof(T);
  if (bytes > cap) {
    buf.reset();
    cap = 0;
    /* 2 MiB-aligned and huge pages: the pooling reads taps all over a 7-9 MB block,
     * which in 4 KiB pages misses the TLB on most reads */
    void* p = nullptr;
    if (posix_memalign(&p, size_t(1) << 21, bytes) != 0) throw std::bad_alloc();
    hint_huge_pages(p, bytes);
    buf.reset(static_cast<char*>(p));
    cap = bytes;
  }
  return reinterpret_cast<T*>(buf.get());
}

/* nullptr when the scratch does not fit in memory (the caller takes the unblocked path,
 * which needs none). */
template <typename T>
T* try_scratch(size_t count) {
  try {
    return scratch<T>(count);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}

/* One RoI, one channel block: out[c * PHW + b] for the cn real lanes. */
template <typename T, typename I>
MRC_INLINE void fwd_block_body(const T* __restrict plane, const TapRec<T, I>* __restrict taps,
                               const int64_t* bins, int64_t PHW, T count, int64_t cn,
                               T* __restrict o) {
  for (int64_t b = 0; b < PHW; ++b) {
    T acc[kLanes];
    for (int64_t c = 0; c < kLanes; ++c) acc[c] = static_cast<T>(0);
    for (int64_t s = bins[b]; s < bins[b + 1]; ++s) {
      const TapRec<T, I> t = taps[s];
      const T* __restrict v1 = plane + static_cast<int64_t>(t.p1) * kLanes;
      const T* __restrict v2 = plane + static_cast<int64_t>(t.p2) * kLanes;
      const T* __restrict v3 = plane + static_cast<int64_t>(t.p3) * kLanes;
      const T* __restrict v4 = plane + static_cast<int64_t>(t.p4) * kLanes;
      for (int64_t c = 0; c < kLanes; ++c)
        acc[c] += t.w1 * v1[c] + t.w2 * v2[c] + t.w3 * v3[c] + t.w4 * v4[c];
    }
    for (int64_t c = 0; c < cn; ++c) o[c * PHW + b] = acc[c] / count;
  }
}

template <typename T, typename I>
MRC_AVX2 void fwd_block_avx2(const T* plane, const TapRec<T, I>* taps, const int64_t* bins,
                             int64_t PHW, T count, int64_t cn, T* o) {
  fwd_block_body<T, I>(plane, taps, bins, PHW, count, cn, o);
}

template <typename T, typename I>
void fwd_block_generic(const T* plane, const TapRec<T, I>* taps, const int64_t* bins,
                       int64_t PHW, T count, int64_t cn, T* o) {
  fwd_block_body<T, I>(plane, taps, bins, PHW, count, cn, o);
}

#if MRC_X86_DISPATCH
/* Copies n floats to dst with streaming stores: the output of a call is tens of MB that
 * the cache cannot keep, and ordinary stores would first read every line of it. */
MRC_AVX2 void stream_copy(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31); ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
  _mm_sfence();
}

/* float: written with intrinsics because GCC keeps the lane loop of fwd_block_body
 * scalar (it versions the loop for aliasing and takes the scalar copy). Same operations
 * in the same order per lane (mul, then adds left to right, then the divide: no FMA), so
 * the bits are those of the scalar code. 32 lanes = 4 accumulators. The RoI's [cn][PHW]
 * result is gathered in L1 and written out in one streaming copy. */
template <>
MRC_AVX2 void fwd_block_avx2<float, int32_t>(const float* plane,
                                             const TapRec<float, int32_t>* taps,
                                             const int64_t* bins, int64_t PHW, float count,
                                             int64_t cn, float* o) {
  static_assert(kLanes == 32, "fwd_block_avx2<float> assumes 4 x 8 lanes");
  static const int64_t kMaxBins = 256;
  alignas(32) float staged[kLanes * kMaxBins];
  const bool stage = PHW <= kMaxBins;
  float* dst = stage ? staged : o;
  const __m256 vc = _mm256_set1_ps(count);
  alignas(32) float res[kLanes];
  for (int64_t b = 0; b < PHW; ++b) {
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t s = bins[b]; s < bins[b + 1]; ++s) {
      const TapRec<float, int32_t> t = taps[s];
      const float* v1 = plane + static_cast<int64_t>(t.p1) * kLanes;
      const float* v2 = plane + static_cast<int64_t>(t.p2) * kLanes;
      const float* v3 = plane + static_cast<int64_t>(t.p3) * kLanes;
      const float* v4 = plane + static_cast<int64_t>(t.p4) * kLanes;
      const __m256 w1 = _mm256_set1_ps(t.w1), w2 = _mm256_set1_ps(t.w2);
      const __m256 w3 = _mm256_set1_ps(t.w3), w4 = _mm256_set1_ps(t.w4);
      for (int j = 0; j < 4; ++j) {
        __m256 m = _mm256_mul_ps(w1, _mm256_loadu_ps(v1 + 8 * j));
        m = _mm256_add_ps(m, _mm256_mul_ps(w2, _mm256_loadu_ps(v2 + 8 * j)));
        m = _mm256_add_ps(m, _mm256_mul_ps(w3, _mm256_loadu_ps(v3 + 8 * j)));
        m = _mm256_add_ps(m, _mm256_mul_ps(w4, _mm256_loadu_ps(v4 + 8 * j)));
        acc[j] = _mm256_add_ps(acc[j], m);
      }
    }
    for (int j = 0; j < 4; ++j) _mm256_store_ps(res + 8 * j, _mm256_div_ps(acc[j], vc));
    for (int64_t c = 0; c < cn; ++c) dst[c * PHW + b] = res[c];
  }
  if (stage) stream_copy(staged, cn * PHW, o);
}
#endif

/* One RoI's samples scattered into a block of gradient pixels, taps 1..4 in
 * torchvision's order: g_i = grad * w_i / count. Pixel q's lanes are at
 * plane + q * stride: the packed scratch (stride kLanes, padded lanes: all kLanes are
 * written) or an NHWC gradient itself (stride C: only the cn real lanes, the next ones
 * belong to another thread's block). */
template <typename T, typename I, bool kAllLanes>
MRC_INLINE void bwd_block_body(T* __restrict plane, int64_t stride,
                               const TapRec<T, I>* __restrict taps, const int64_t* bins,
                               int64_t PHW, T count, const T* __restrict go, int64_t cn) {
  const int64_t lanes = kAllLanes ? kLanes : cn;
  for (int64_t b = 0; b < PHW; ++b) {
    if (bins[b] == bins[b + 1]) continue;
    T gv[kLanes];
    for (int64_t c = 0; c < kLanes; ++c) gv[c] = c < cn ? go[c * PHW + b] : static_cast<T>(0);
    for (int64_t s = bins[b]; s < bins[b + 1]; ++s) {
      const TapRec<T, I> t = taps[s];
      T* __restrict v1 = plane + static_cast<int64_t>(t.p1) * stride;
      for (int64_t c = 0; c < lanes; ++c) v1[c] += gv[c] * t.w1 / count;
      T* __restrict v2 = plane + static_cast<int64_t>(t.p2) * stride;
      for (int64_t c = 0; c < lanes; ++c) v2[c] += gv[c] * t.w2 / count;
      T* __restrict v3 = plane + static_cast<int64_t>(t.p3) * stride;
      for (int64_t c = 0; c < lanes; ++c) v3[c] += gv[c] * t.w3 / count;
      T* __restrict v4 = plane + static_cast<int64_t>(t.p4) * stride;
      for (int64_t c = 0; c < lanes; ++c) v4[c] += gv[c] * t.w4 / count;
    }
  }
}

template <typename T, typename I, bool kAllLanes>
MRC_AVX2 void bwd_block_avx2(T* plane, int64_t stride, const TapRec<T, I>* taps,
                             const int64_t* bins, int64_t PHW, T count, const T* go,
                             int64_t cn) {
  bwd_block_body<T, I, kAllLanes>(plane, stride, taps, bins, PHW, count, go, cn);
}

template <typename T, typename I, bool kAllLanes>
void bwd_block_generic(T* plane, int64_t stride, const TapRec<T, I>* taps,
                       const int64_t* bins, int64_t PHW, T count, const T* go, int64_t cn) {
  bwd_block_body<T, I, kAllLanes>(plane, stride, taps, bins, PHW, count, go, cn);
}

/* The block of one RoI: all lanes when they exist (scratch, or cn == kLanes). */
template <typename T, typename I>
void bwd_block(bool avx2, T* plane, int64_t stride, const TapRec<T, I>* taps,
               const int64_t* bins, int64_t PHW, T count, const T* go, int64_t cn) {
  const bool all = stride == kLanes || cn == kLanes;
  if (avx2 && all)
    bwd_block_avx2<T, I, true>(plane, stride, taps, bins, PHW, count, go, cn);
  else if (avx2)
    bwd_block_avx2<T, I, false>(plane, stride, taps, bins, PHW, count, go, cn);
  else if (all)
    bwd_block_generic<T, I, true>(plane, stride, taps, bins, PHW, count, go, cn);
  else
    bwd_block_generic<T, I, false>(plane, stride, taps, bins, PHW, count, go, cn);
}

/* One map (FPN level) of the blocked path: tap tables of its RoIs and, per image, the
 * RoIs to visit. The forward visits them in a spatial order (cache reuse; items are
 * independent, so the order changes no result); the backward in input order (the
 * summation order of torchvision). */
template <typename T, typename I>
struct LevelPlan {
  void* data = nullptr;              /* the map (forward) or its gradient (backward) */
  int64_t H = 0, W = 0;
  const int64_t* rows = nullptr;     /* output row of RoI k (nullptr: k) */
  AllTaps<T, I> all;
  std::vector<int64_t> start, order; /* RoIs of image n: order[start[n] .. start[n+1]) */

  /* Serial part; false when the taps do not fit or, with dense_only, packing does not
   * pay off (it reads every pixel once: not worth it for a few samples on a large
   * map). */
  bool prepare(void* data_, const T* rois, const int64_t* rows_, int64_t N, int64_t H_,
               int64_t W_, int64_t K, int64_t PH, int64_t PW, double scale, int64_t sr,
               bool aligned, bool spatial, bool dense_only = true) {
    if (N <= 0 || H_ <= 0 || W_ <= 0 || H_ * W_ >= (int64_t(1) << 31)) return false;
    all.prepare(rois, N, H_, W_, K, PH, PW, scale, sr, aligned, 256u << 20);
    if (!all.ok || (dense_only && 4 * all.roi_off[K] < N * H_ * W_)) return false;
    data = data_, H = H_, W = W_, rows = rows_;
    start.assign(N + 1, 0);
    for (int64_t k = 0; k < K; ++k)
      if (all.geom[k].batch >= 0) start[all.geom[k].batch + 1]++;
    for (int64_t n = 0; n < N; ++n) start[n + 1] += start[n];
    order.resize(start[N]);
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    std::vector<int64_t> visit;
    if (spatial) visit = spatial_order(rois, K, scale);
    for (int64_t i = 0; i < K; ++i) {
      const int64_t k = spatial ? visit[i] : i, b = all.geom[k].batch;
      if (b >= 0) order[pos[b]++] = k;
    }
    return true;
  }
  int64_t row(int64_t k) const { return rows ? rows[k] : k; }
  int64_t num_rois() const { return static_cast<int64_t>(all.geom.size()); }
};

/* Fills the tap tables of every plan (inside a parallel region; ends with a barrier). */
template <typename T, typename I>
void fill_all_taps(const std::vector<LevelPlan<T, I>*>& plans) {
  std::vector<AxisEntry<T>> ys, xs;
  for (LevelPlan<T, I>* p : plans) {
#pragma omp for schedule(dynamic, 16) nowait
    for (int64_t k = 0; k < p->num_rois(); ++k) p->all.fill(k, ys, xs);
  }
#pragma omp barrier
}

int64_t largest_plane(const std::vector<int64_t>& hw) {
  int64_t m = 0;
  for (int64_t v : hw) m = std::max(m, v);
  return m;
}

/* Blocked forward over several maps. For each (map, image, channel block) in turn the
 * threads pack the block into ONE shared scratch plane ([H][W][L]; it stays in the
 * last-level cache; only the pixels the image's RoIs read) and then pool all its RoIs
 * from it. The scratch is one block of the largest map, not a packed copy of every map.
 * Returns false (nothing written) when the scratch cannot be allocated. */
template <typename T, typename I>
bool forward_blocked(const std::vector<LevelPlan<T, I>*>& plans, bool channels_last, T* out,
                     int64_t N, int64_t C, int64_t PH, int64_t PW, int nt) {
  const int64_t PHW = PH * PW, nb = (C + kLanes - 1) / kLanes;
  std::vector<int64_t> hw;
  for (const LevelPlan<T, I>* p : plans) hw.push_back(p->H * p->W);
  T* packed = try_scratch<T>(static_cast<size_t>(largest_plane(hw) * kLanes));
  if (!packed) return false;
  for (const LevelPlan<T, I>* p : plans)  /* RoIs of no image (bad batch index) */
    for (int64_t k = 0; k < p->num_rois(); ++k)
      if (p->all.geom[k].batch < 0) zero_roi_block(out, p->row(k), 0, C, C, PHW);
  const bool avx2 = cpu_has_avx2();
  Coverage cover;
#pragma omp parallel num_threads(nt)
  {
    fill_all_taps(plans);
    for (const LevelPlan<T, I>* p : plans) {
      const T* map = static_cast<const T*>(p->data);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o0 = p->start[n], o1 = p->start[n + 1];
        if (o0 == o1) continue;
#pragma omp single
        {
          cover.reset(p->H, p->W);
          for (int64_t oi = o0; oi < o1; ++oi) cover.add(p->all.rect[p->order[oi]]);
          cover.finish();
        }
        for (int64_t cb = 0; cb < nb; ++cb) {
          const int64_t c0 = cb * kLanes, cn = std::min(kLanes, C - c0);
#pragma omp for schedule(dynamic, 8)
          for (int64_t y = 0; y < p->H; ++y)
            cover.runs(y, [&](int64_t x0, int64_t x1) {
              pack_one_row(map, channels_last, packed + y * p->W * kLanes, n, cb, y, x0, x1,
                           C, p->H, p->W);
            });
#pragma omp for schedule(dynamic, 8)
          for (int64_t oi = o0; oi < o1; ++oi) {
            const int64_t k = p->order[oi];
            const TapRec<T, I>* taps = p->all.taps.data() + p->all.roi_off[k];
            const int64_t* bins = p->all.bin_start.data() + k * (PHW + 1);
            T* o = out + (p->row(k) * C + c0) * PHW;
            if (avx2)
              fwd_block_avx2<T, I>(packed, taps, bins, PHW, p->all.geom[k].count, cn, o);
            else
              fwd_block_generic<T, I>(packed, taps, bins, PHW, p->all.geom[k].count, cn, o);
          }
        }
      }
    }
  }
  return true;
}

/* Backward work item (image n, channel block cb) of one map: its gradient elements are
 * disjoint from every other item's and its RoIs are visited in input order, so the sums
 * do not depend on the thread count and follow torchvision's order (RoI, bin, sample,
 * tap). The item overwrites its channels of the gradient. NHWC: it accumulates in place
 * (pixel stride C). NCHW: in plane, the calling thread's packed scratch (H*W*L values),
 * then unpacks. */
template <typename T, typename I>
void backward_item(const LevelPlan<T, I>& p, int64_t n, int64_t cb, T* plane,
                   const T* grad_out, int64_t C, int64_t PHW, bool channels_last, bool avx2) {
  const int64_t HW = p.H * p.W;
  const int64_t c0 = cb * kLanes, cn = std::min(kLanes, C - c0);
  T* grad_in = static_cast<T*>(p.data);
  int64_t stride = kLanes;
  if (channels_last) {
    plane = grad_in + n * HW * C + c0;
    stride = C;
    for (int64_t q = 0; q < HW; ++q) memset(plane + q * C, 0, sizeof(T) * cn);
  } else {
    memset(plane, 0, sizeof(T) * HW * kLanes);
  }
  for (int64_t oi = p.start[n]; oi < p.start[n + 1]; ++oi) {
    const int64_t k = p.order[oi];
    const TapRec<T, I>* taps = p.all.taps.data() + p.all.roi_off[k];
    const int64_t* bins = p.all.bin_start.data() + k * (PHW + 1);
    const T* go = grad_out + (p.row(k) * C + c0) * PHW;
    bwd_block<T, I>(avx2, plane, stride, taps, bins, PHW, p.all.geom[k].count, go, cn);
  }
  if (channels_last) return;
  /* unpack, in tiles of kTile pixels so a tile of the blocked plane stays in L1 while its
   * cn channels are read out */
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
    const int64_t pn = std::min(kTile, HW - p0);
    for (int64_t c = 0; c < cn; ++c) {
      T* dst = grad_in + (n * C + c0 + c) * HW + p0;
      const T* src = plane + p0 * kLanes + c;
      for (int64_t q = 0; q < pn; ++q) dst[q] = src[q * kLanes];
    }
  }
}

/* Blocked backward over several maps: items (map, image, channel block) run
 * independently, each (NCHW) in its thread's own scratch plane (one block of the largest
 * map per thread). Returns false (nothing written) when the scratch cannot be
 * allocated. */
template <typename T, typename I>
bool backward_blocked(const std::vector<LevelPlan<T, I>*>& plans, const T* grad_out,
                      int64_t N, int64_t C, int64_t PH, int64_t PW, bool channels_last,
                      int nt) {
  const int64_t PHW = PH * PW, nb = (C + kLanes - 1) / kLanes;
  std::vector<int64_t> hw, item0(1, 0);
  for (const LevelPlan<T, I>* p : plans) {
    hw.push_back(p->H * p->W);
    item0.push_back(item0.back() + N * nb);
  }
  const int64_t plane = largest_plane(hw) * kLanes;
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, item0.back())));
  T* planes = channels_last ? nullptr : try_scratch<T>(static_cast<size_t>(plane * nt));
  if (!channels_last && !planes) return false;
  const bool avx2 = cpu_has_avx2();
#pragma omp parallel num_threads(nt)
  {
    fill_all_taps(plans);
    T* mine = planes ? planes + omp_get_thread_num() * plane : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < item0.back(); ++it) {
      const int64_t u = std::upper_bound(item0.begin(), item0.end(), it) - item0.begin() - 1;
      const int64_t local = it - item0[u];
      backward_item(*plans[u], local / nb, local % nb, mine, grad_out, C, PHW,
                    channels_last, avx2);
    }
  }
  return true;
}

/* Small calls run on the calling thread: waking the team costs more than the work (and
 * far more on a busy machine, where a join waits for a descheduled thread). The estimate
 * counts one sample per bin. */
int threads_for(int64_t K, int64_t C, int64_t PH, int64_t PW, int nt) {
  return K * C * PH * PW < (int64_t(1) << 18) ? 1 : nt;
}

/* One map without the blocked path. rows (nullable) maps RoI k to its output row. */
template <typename T>
void forward_unblocked(const T* in, bool channels_last, const T* r, T* out,
                       const int64_t* rows, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t K, int64_t PH, int64_t PW, double scale, int64_t sr, bool aln,
                       int nt) {
  if (channels_last)
    forward_nhwc<T>(in, r, out, rows, N, C, H, W, K, PH, PW, scale, sr, aln, nt);
  else if (H * W < (int64_t(1) << 31))
    forward_nchw<T, int32_t>(in, r, out, rows, N, C, H, W, K, PH, PW, scale, sr, aln, nt);
  else
    forward_nchw<T, int64_t>(in, r, out, rows, N, C, H, W, K, PH, PW, scale, sr, aln, nt);
}

template <typename T>
void backward_unblocked(const T* go, const T* r, const int64_t* rows, T* gi, int64_t N,
                        int64_t C, int64_t H, int64_t W, int64_t K, int64_t PH, int64_t PW,
                        double scale, int64_t sr, bool aln, int nt) {
  if (H * W < (int64_t(1) << 31))
    backward_cpu<T, int32_t>(go, r, rows, gi, N, C, H, W, K, PH, PW, scale, sr, aln, nt);
  else
    backward_cpu<T, int64_t>(go, r, rows, gi, N, C, H, W, K, PH, PW, scale, sr, aln, nt);
}

/* RoIs of each level, in input order: compact RoI rows and their output rows. RoIs with
 * a level outside [0, L) belong to no level (their output rows are zeroed). A single map
 * is one level holding every RoI. */
template <typename T>
struct LevelSplit {
  std::vector<std::vector<T>> rois;
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> orphans;
  LevelSplit(const T* r, const int64_t* levels, int64_t K, int64_t L) : rois(L), rows(L) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t l = levels ? levels[k] : 0;
      if (l < 0 || l >= L) {
        orphans.push_back(k);
        continue;
      }
      rois[l].insert(rois[l].end(), r + k * 5, r + k * 5 + 5);
      rows[l].push_back(k);
    }
  }
  int64_t count(int64_t l) const { return static_cast<int64_t>(rows[l].size()); }
};

/* Every level in one parallel region when packing pays off (the blocked path), the other
 * levels one by one on the unblocked path. maps[l] is NCHW (or NHWC when channels_last)
 * [N, C, Hs[l], Ws[l]]. */
template <typename T>
void multilevel_forward(int64_t L, void** maps, const int64_t* Hs, const int64_t* Ws,
                        const double* scales, const T* r, const int64_t* levels, T* out,
                        int64_t N, int64_t C, int64_t K, int64_t PH, int64_t PW, int64_t sr,
                        bool aln, bool channels_last, int nt) {
  const LevelSplit<T> split(r, levels, K, L);
  for (int64_t k : split.orphans) zero_roi_block(out, k, 0, C, C, PH * PW);
  nt = threads_for(K, C, PH, PW, nt);
  std::vector<LevelPlan<T, int32_t>> plans(L);
  std::vector<LevelPlan<T, int32_t>*> blocked;
  std::vector<int64_t> pending;
  for (int64_t l = 0; l < L; ++l) {
    if (split.count(l) == 0) continue;
    if (C >= kLanes && plans[l].prepare(maps[l], split.rois[l].data(), split.rows[l].data(),
                                        N, Hs[l], Ws[l], split.count(l), PH, PW, scales[l],
                                        sr, aln, true))
      blocked.push_back(&plans[l]);
    else
      pending.push_back(l);
  }
  if (!blocked.empty() && !forward_blocked(blocked, channels_last, out, N, C, PH, PW, nt))
    for (LevelPlan<T, int32_t>* p : blocked) pending.push_back(p - plans.data());
  for (int64_t l : pending)
    forward_unblocked<T>(static_cast<const T*>(maps[l]), channels_last, split.rois[l].data(),
                         out, split.rows[l].data(), N, C, Hs[l], Ws[l], split.count(l), PH,
                         PW, scales[l], sr, aln, nt);
}

/* One level's gradient on the unblocked path, overwriting grad (NCHW, or NHWC through
 * an NCHW temporary: a rare path, small C or few samples). */
template <typename T>
void level_backward_unblocked(const T* go, const LevelSplit<T>& split, int64_t l, T* grad,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t PH,
                              int64_t PW, double scale, int64_t sr, bool aln, bool cl,
                              int nt) {
  const int64_t HW = H * W;
  std::vector<T> tmp(cl ? N * C * HW : 0);
  T* dst = cl ? tmp.data() : grad;
  if (!cl) memset(grad, 0, sizeof(T) * N * C * HW);
  backward_unblocked<T>(go, split.rois[l].data(), split.rows[l].data(), dst, N, C, H, W,
                        split.count(l), PH, PW, scale, sr, aln, nt);
  if (cl)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t q = 0; q < HW; ++q) grad[(n * HW + q) * C + c] = dst[(n * C + c) * HW + q];
}

/* Overwrites every grads[l] (NCHW, or NHWC when channels_last): levels whose RoIs sample
 * enough pixels take the blocked path (all in one parallel region), the others the
 * unblocked one; a level without RoIs is zero. */
template <typename T>
void multilevel_backward(int64_t L, void** grads, const int64_t* Hs, const int64_t* Ws,
                         const double* scales, const T* go, const T* r, const int64_t* levels,
                         int64_t N, int64_t C, int64_t K, int64_t PH, int64_t PW, int64_t sr,
                         bool aln, bool channels_last, int nt) {
  const LevelSplit<T> split(r, levels, K, L);
  nt = threads_for(K, C, PH, PW, nt);
  std::vector<LevelPlan<T, int32_t>> plans(L);
  std::vector<LevelPlan<T, int32_t>*> blocked;
  std::vector<int64_t> pending;
  for (int64_t l = 0; l < L; ++l) {
    const size_t bytes = sizeof(T) * static_cast<size_t>(N * C * Hs[l] * Ws[l]);
    hint_huge_pages(grads[l], bytes);
    if (split.count(l) == 0 || bytes == 0) {
      if (bytes) memset(grads[l], 0, bytes);
      continue;
    }
    /* NHWC: any C, any density (the items accumulate in place: no pack, no unpack) */
    const bool direct = channels_last;
    if ((C >= kLanes || direct) &&
        plans[l].prepare(grads[l], split.rois[l].data(), split.rows[l].data(), N, Hs[l],
                         Ws[l], split.count(l), PH, PW, scales[l], sr, aln, false, !direct))
      blocked.push_back(&plans[l]);
    else
      pending.push_back(l);
  }
  if (!blocked.empty() && !backward_blocked(blocked, go, N, C, PH, PW, channels_last, nt))
    for (LevelPlan<T, int32_t>* p : blocked) pending.push_back(p - plans.data());
  for (int64_t l : pending)
    level_backward_unblocked<T>(go, split, l, static_cast<T*>(grads[l]), N, C, Hs[l], Ws[l],
                                PH, PW, scales[l], sr, aln, channels_last, nt);
}

int check_levels(const char* fn, int dtype, int64_t L, void** maps, const int64_t* heights,
                 const int64_t* widths, const double* scales, const void* rois,
                 const int64_t* levels, const void* out, int64_t N, int64_t C, int64_t K,
                 int64_t PH, int64_t PW) {
  if (L <= 0 || !maps || !heights || !widths || !scales)
    return mrc::set_error(MRC_ERR_INVALID, "%s: need L >= 1 levels with maps, heights, "
                          "widths and scales (got L=%lld)", fn, (long long)L);
  if (K > 0 && !levels) return mrc::set_error(MRC_ERR_INVALID, "%s: null levels", fn);
  for (int64_t l = 0; l < L; ++l) {
    int rc = mrc::check_roi_align_args(fn, dtype, false, maps[l], rois, out, N, C, heights[l],
                                       widths[l], K, PH, PW, scales[l]);
    if (rc) return rc;
  }
  return MRC_OK;
}

}  // namespace

#define MRC_GUARD(fn, body)                                              \
  try {                                                                  \
    body;                                                                \
  } catch (const std::bad_alloc&) {                                      \
    return mrc::set_error(MRC_ERR_ALLOC, "%s: out of memory", fn);       \
  } catch (...) {                                                        \
    return mrc::set_error(MRC_ERR_INTERNAL, "%s: internal error", fn);   \
  }

extern "C" {

int mrc_abi_version(void) { return MRC_ABI_VERSION; }
const char* mrc_last_error(void) { return mrc::last_error(); }

int mrc_roi_align_forward_cpu(int dtype, const void* input, const void* rois, void* output,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                              int64_t PH, int64_t PW, double spatial_scale,
                              int64_t sampling_ratio, int aligned, int channels_last,
                              int num_threads) {
  static const char* fn = "mrc_roi_align_forward_cpu";
  int rc = mrc::check_roi_align_args(fn, dtype, false, input, rois, output, N, C, H, W, K,
                                     PH, PW, spatial_scale);
  if (rc) return rc;
  if (K == 0 || C == 0) return MRC_OK;
  const int nt = resolve_threads(num_threads);
  const bool cl = channels_last != 0, aln = aligned != 0;
  hint_huge_pages(output, static_cast<size_t>(K * C * PH * PW) * (dtype == MRC_F32 ? 4 : 8));
  MRC_GUARD(fn, {
    void* maps[1] = {const_cast<void*>(input)};
    if (dtype == MRC_F32)
      multilevel_forward<float>(1, maps, &H, &W, &spatial_scale, (const float*)rois, nullptr,
                                (float*)output, N, C, K, PH, PW, sampling_ratio, aln, cl, nt);
    else
      multilevel_forward<double>(1, maps, &H, &W, &spatial_scale, (const double*)rois,
                                 nullptr, (double*)output, N, C, K, PH, PW, sampling_ratio,
                                 aln, cl, nt);
  });
  return MRC_OK;
}

int mrc_roi_align_backward_cpu(int dtype, const void* grad_output, const void* rois,
                               void* grad_input, int64_t N, int64_t C, int64_t H, int64_t W,
                               int64_t K, int64_t PH, int64_t PW, double spatial_scale,
                               int64_t sampling_ratio, int aligned, int num_threads) {
  static const char* fn = "mrc_roi_align_backward_cpu";
  int rc = mrc::check_roi_align_args(fn, dtype, false, grad_input, rois, grad_output, N, C, H,
                                     W, K, PH, PW, spatial_scale);
  if (rc) return rc;
  if (C == 0 || N == 0 || H == 0 || W == 0) return MRC_OK;  /* nothing to write */
  const int nt = resolve_threads(num_threads);
  const bool aln = aligned != 0;
  MRC_GUARD(fn, {
    void* grads[1] = {grad_input};
    if (dtype == MRC_F32)
      multilevel_backward<float>(1, grads, &H, &W, &spatial_scale, (const float*)grad_output,
                                 (const float*)rois, nullptr, N, C, K, PH, PW,
                                 sampling_ratio, aln, false, nt);
    else
      multilevel_backward<double>(1, grads, &H, &W, &spatial_scale,
                                  (const double*)grad_output, (const double*)rois, nullptr,
                                  N, C, K, PH, PW, sampling_ratio, aln, false, nt);
  });
  return MRC_OK;
}

int mrc_roi_align_multilevel_forward_cpu(int dtype, int64_t L, void** inputs,
                                         const int64_t* heights, const int64_t* widths,
                                         const double* scales, const void* rois,
                                         const int64_t* levels, void* output, int64_t N,
                                         int64_t C, int64_t K, int64_t PH, int64_t PW,
                                         int64_t sampling_ratio, int aligned,
                                         int channels_last, int num_threads) {
  static const char* fn = "mrc_roi_align_multilevel_forward_cpu";
  int rc = check_levels(fn, dtype, L, inputs, heights, widths, scales, rois, levels, output,
                        N, C, K, PH, PW);
  if (rc) return rc;
  if (K == 0 || C == 0) return MRC_OK;
  const int nt = resolve_threads(num_threads);
  hint_huge_pages(output, static_cast<size_t>(K * C * PH * PW) * (dtype == MRC_F32 ? 4 : 8));
  MRC_GUARD(fn, {
    if (dtype == MRC_F32)
      multilevel_forward<float>(L, inputs, heights, widths, scales, (const float*)rois, levels,
                                (float*)output, N, C, K, PH, PW, sampling_ratio, aligned != 0,
                                channels_last != 0, nt);
    else
      multilevel_forward<double>(L, inputs, heights, widths, scales, (const double*)rois,
                                 levels, (double*)output, N, C, K, PH, PW, sampling_ratio,
                                 aligned != 0, channels_last != 0, nt);
  });
  return MRC_OK;
}

int mrc_roi_align_multilevel_backward_cpu(int dtype, int64_t L, void** grad_inputs,
                                          const int64_t* heights, const int64_t* widths,
                                          const double* scales, const void* grad_output,
                                          const void* rois, const int64_t* levels, int64_t N,
                                          int64_t C, int64_t K, int64_t PH, int64_t PW,
                                          int64_t sampling_ratio, int aligned,
                                          int channels_last, int num_threads) {
  static const char* fn = "mrc_roi_align_multilevel_backward_cpu";
  int rc = check_levels(fn, dtype, L, grad_inputs, heights, widths, scales, rois, levels,
                        grad_output, N, C, K, PH, PW);
  if (rc) return rc;
  if (C == 0 || N == 0) return MRC_OK;  /* nothing to write */
  const int nt = resolve_threads(num_threads);
  MRC_GUARD(fn, {
    if (dtype == MRC_F32)
      multilevel_backward<float>(L, grad_inputs, heights, widths, scales,
                                 (const float*)grad_output, (const float*)rois, levels, N, C,
                                 K, PH, PW, sampling_ratio, aligned != 0, channels_last != 0,
                                 nt);
    else
      multilevel_backward<double>(L, grad_inputs, heights, widths, scales,
                                  (const double*)grad_output, (const double*)rois, levels, N,
                                  C, K, PH, PW, sampling_ratio, aligned != 0,
                                  channels_last != 0, nt);
  });
  return MRC_OK;
}

}  // extern "C"
