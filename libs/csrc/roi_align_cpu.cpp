/*
 * RoIAlign forward/backward on the CPU (libmrcnn_cpu.so). Semantics: docs in
 * /work/shared/specs/kernels.md; bit-identical to torchvision's CPU kernel when compiled
 * with -ffp-contract=off (same expressions, same order of operations).
 *
 * Speed comes from:
 *   - the bilinear taps are separable: per RoI we precompute one table of y taps
 *     (PH * gh entries) and one of x taps (PW * gw entries); each sample's four offsets
 *     and weights (w1 = hy * hx, ... as torchvision computes them) are formed once and
 *     reused for a whole block of channels;
 *   - NCHW: work items are (channel block, RoI), channel-block major, so all threads
 *     stream the same few feature planes (they stay in cache across RoIs);
 *   - NHWC: one tap reads a contiguous run of C values; the inner loop over C vectorises;
 *   - backward: items are (image, channel block): the gradient planes of different items
 *     are disjoint and RoIs are visited in order inside each, so the result does not
 *     depend on the number of threads and equals torchvision's summation order.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <new>
#include <vector>

#include "common.h"
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

int resolve_threads(int num_threads) {
  if (num_threads > 0) return num_threads;
  return omp_get_max_threads();
}

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

/* Tap lists of all RoIs, built once (in parallel) and shared by every channel block,
 * when they fit in max_bytes; otherwise each work item builds its RoI's list itself. */
template <typename T, typename I>
struct AllTaps {
  bool ok = false;
  std::vector<RoiGeom<T>> geom;
  std::vector<int64_t> roi_off;     /* K+1: first tap of each RoI */
  std::vector<int64_t> bin_start;   /* K * (PHW+1), relative to roi_off[k] */
  std::vector<TapRec<T, I>> taps;

  void build(const T* rois, int64_t N, int64_t H, int64_t W, int64_t K, int64_t PH,
             int64_t PW, double scale, int64_t sr, bool aligned, int nt, size_t max_bytes) {
    const int64_t PHW = PH * PW;
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
    bin_start.resize(K * (PHW + 1));
#pragma omp parallel num_threads(nt)
    {
      std::vector<AxisEntry<T>> ys, xs;
#pragma omp for schedule(dynamic, 16)
      for (int64_t k = 0; k < K; ++k) {
        if (geom[k].batch < 0) {
          for (int64_t b = 0; b <= PHW; ++b) bin_start[k * (PHW + 1) + b] = 0;
          continue;
        }
        build_taps<T, I>(geom[k], H, W, PH, PW, ys, xs, taps.data() + roi_off[k],
                         bin_start.data() + k * (PHW + 1));
      }
    }
    ok = true;
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

template <typename T, typename I>
void forward_nchw(const T* input, const T* rois, T* output, int64_t N, int64_t C, int64_t H,
                  int64_t W, int64_t K, int64_t PH, int64_t PW, double scale, int64_t sr,
                  bool aligned, int nt) {
  const int64_t HW = H * W, PHW = PH * PW;
  const int64_t CB = std::min<int64_t>(kFwdBlock, C);
  const int64_t ncb = (C + CB - 1) / CB;
  AllTaps<T, I> all;
  if (ncb > 1) all.build(rois, N, H, W, K, PH, PW, scale, sr, aligned, nt, 256u << 20);
  /* Visit RoIs in a spatial order (image, band of rows, column) so that consecutive
   * items read overlapping parts of the planes (cache reuse). Items are independent,
   * so the order does not change any result. */
  std::vector<int64_t> visit(K);
  {
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
    for (int64_t k = 0; k < K; ++k) visit[k] = key[k].second;
  }
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
          zero_roi_block(output, k, c0, cn, C, PHW);
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
        T* o = output + (k * C + c0) * PHW;
        if (cn == CB && CB == kFwdBlock)
          nchw_block<T, I, kFwdBlock>(pl, HW, taps, bins, PHW, g.count, o);
        else
          nchw_block_dyn<T, I>(pl, HW, cn, taps, bins, PHW, g.count, o);
      }
    }
  }
}

template <typename T>
void forward_nhwc(const T* input, const T* rois, T* output, int64_t N, int64_t C, int64_t H,
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
        zero_roi_block(output, k, 0, C, C, PHW);
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
          T* o = output + k * C * PHW + ph * PW + pw;
          for (int64_t c = 0; c < C; ++c) o[c * PHW] = a[c] / g.count;
        }
      }
    }
  }
}

static const int64_t kBwdBlock = 8;

template <typename T, typename I>
void backward_cpu(const T* grad_out, const T* rois, T* grad_in, int64_t N, int64_t C,
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
        const T* go = grad_out + (k * C + c0) * PHW;
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

}  // namespace

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
  try {
    const bool small = H * W < (int64_t(1) << 31);
    const bool aln = aligned != 0;
    if (dtype == MRC_F32) {
      const float* in = (const float*)input;
      const float* r = (const float*)rois;
      float* out = (float*)output;
      if (channels_last)
        forward_nhwc<float>(in, r, out, N, C, H, W, K, PH, PW, spatial_scale, sampling_ratio,
                            aln, nt);
      else if (small)
        forward_nchw<float, int32_t>(in, r, out, N, C, H, W, K, PH, PW, spatial_scale,
                                     sampling_ratio, aln, nt);
      else
        forward_nchw<float, int64_t>(in, r, out, N, C, H, W, K, PH, PW, spatial_scale,
                                     sampling_ratio, aln, nt);
    } else {
      const double* in = (const double*)input;
      const double* r = (const double*)rois;
      double* out = (double*)output;
      if (channels_last)
        forward_nhwc<double>(in, r, out, N, C, H, W, K, PH, PW, spatial_scale, sampling_ratio,
                             aln, nt);
      else if (small)
        forward_nchw<double, int32_t>(in, r, out, N, C, H, W, K, PH, PW, spatial_scale,
                                      sampling_ratio, aln, nt);
      else
        forward_nchw<double, int64_t>(in, r, out, N, C, H, W, K, PH, PW, spatial_scale,
                                      sampling_ratio, aln, nt);
    }
  } catch (const std::bad_alloc&) {
    return mrc::set_error(MRC_ERR_ALLOC, "%s: out of memory", fn);
  } catch (...) {
    return mrc::set_error(MRC_ERR_INTERNAL, "%s: internal error", fn);
  }
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
  if (K == 0 || C == 0 || N == 0 || H == 0 || W == 0) return MRC_OK;
  const int nt = resolve_threads(num_threads);
  try {
    const bool small = H * W < (int64_t(1) << 31);
    const bool aln = aligned != 0;
    if (dtype == MRC_F32) {
      const float* go = (const float*)grad_output;
      const float* r = (const float*)rois;
      float* gi = (float*)grad_input;
      if (small)
        backward_cpu<float, int32_t>(go, r, gi, N, C, H, W, K, PH, PW, spatial_scale,
                                     sampling_ratio, aln, nt);
      else
        backward_cpu<float, int64_t>(go, r, gi, N, C, H, W, K, PH, PW, spatial_scale,
                                     sampling_ratio, aln, nt);
    } else {
      const double* go = (const double*)grad_output;
      const double* r = (const double*)rois;
      double* gi = (double*)grad_input;
      if (small)
        backward_cpu<double, int32_t>(go, r, gi, N, C, H, W, K, PH, PW, spatial_scale,
                                      sampling_ratio, aln, nt);
      else
        backward_cpu<double, int64_t>(go, r, gi, N, C, H, W, K, PH, PW, spatial_scale,
                                      sampling_ratio, aln, nt);
    }
  } catch (const std::bad_alloc&) {
    return mrc::set_error(MRC_ERR_ALLOC, "%s: out of memory", fn);
  } catch (...) {
    return mrc::set_error(MRC_ERR_INTERNAL, "%s: internal error", fn);
  }
  return MRC_OK;
}

}  // extern "C"
