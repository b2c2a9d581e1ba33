/*
 * Channel-blocked CPU RoIAlign paths.
 *
 * Forward (MRC_ROI_PATH_BLOCKED): for each (level, image, block of kLanes channels) in
 * turn, the threads pack the pixels the image's RoIs read into ONE shared scratch plane
 * [H][W][kLanes] (the last block zero-padded; it stays in the last-level cache), then
 * pool every RoI of that image from it, RoIs in spatial order. One tap reads kLanes
 * contiguous channels, the lane loops vectorise (AVX2 copies chosen at run time), and
 * each RoI's result is written with streaming stores (float, AVX2). All levels share one
 * parallel region.
 *
 * Backward: items are (level, image, channel block); the gradient elements of different
 * items are disjoint and RoIs are visited in input order inside each, so the sums do not
 * depend on the thread count and follow torchvision's order (RoI, bin, sample, tap).
 * NCHW gradients (MRC_ROI_PATH_BLOCKED) accumulate in the thread's packed scratch plane,
 * then are unpacked; NHWC gradients (MRC_ROI_PATH_BLOCKED_NHWC) accumulate in place
 * (pixel stride C: no pack, no unpack). Either way the gradient is overwritten.
 *
 * Per channel the arithmetic and its order are those of the unblocked paths (vector
 * lanes are independent), so results are bit-identical to them and to torchvision.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"
#include "roi_align_cpu.h"
#include "roi_align_cpu_accumulate.h"
#include "roi_align_cpu_taps.h"

namespace mrc {
namespace roi_cpu {

namespace {

/* Pixels per tile of the NCHW <-> blocked transposes: a tile of kTile pixels x kLanes
 * channels (4 KiB of float) stays in L1 while it is written or read out. */
const int64_t kTile = 32;

/* The coverage of a row is tracked in chunks of this many pixels. */
const int64_t kChunk = 8;

/* ------------------------------------------------------------------------- packing */

/* One row of cn <= kLanes channel planes (channel c at src + c * plane_stride) ->
 * dst[x * kLanes + c] for x in [x_begin, width), tile by tile. */
template <typename T>
void pack_row_nchw_scalar(const T* src, int64_t plane_stride, int64_t width, int64_t cn,
                          T* dst, int64_t x_begin = 0) {
  for (int64_t x0 = x_begin; x0 < width; x0 += kTile) {
    const int64_t xn = std::min(kTile, width - x0);
    for (int64_t c = 0; c < cn; ++c) {
      const T* row = src + c * plane_stride + x0;
      T* o = dst + x0 * kLanes + c;
      for (int64_t x = 0; x < xn; ++x) o[x * kLanes] = row[x];
    }
  }
}

#if MRC_X86_DISPATCH
/* float: 8 channels x 8 pixels per step, transposed in registers (pure data movement). */
MRC_AVX2 void pack_row_nchw_avx2(const float* src, int64_t plane_stride, int64_t width,
                                 int64_t cn, float* dst) {
  const int64_t W8 = width - width % 8, C8 = cn - cn % 8;
  /* channel groups outer: 8 source rows stream at a time (the hardware prefetchers track
   * that many streams; 32 at once they do not) */
  for (int64_t c0 = 0; c0 < C8; c0 += 8) {
    for (int64_t x0 = 0; x0 < W8; x0 += 8) {
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (c0 + i) * plane_stride + x0);
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
        _mm256_storeu_ps(dst + (x0 + j) * kLanes + c0,
                         _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
        _mm256_storeu_ps(dst + (x0 + j + 4) * kLanes + c0,
                         _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
      }
    }
  }
  for (int64_t c = C8; c < cn; ++c)
    for (int64_t x = 0; x < W8; ++x) dst[x * kLanes + c] = src[c * plane_stride + x];
  pack_row_nchw_scalar(src, plane_stride, width, cn, dst, W8);
}
#endif

template <typename T>
void pack_row_nchw(const T* src, int64_t plane_stride, int64_t width, int64_t cn, T* dst) {
  pack_row_nchw_scalar(src, plane_stride, width, cn, dst);
}

void pack_row_nchw(const float* src, int64_t plane_stride, int64_t width, int64_t cn,
                   float* dst) {
#if MRC_X86_DISPATCH
  if (use_avx2()) return pack_row_nchw_avx2(src, plane_stride, width, cn, dst);
#endif
  pack_row_nchw_scalar(src, plane_stride, width, cn, dst);
}

/* One map (NCHW, or NHWC when channels_last) as the source of packed blocks. */
template <typename T>
struct PackSource {
  const T* map;
  bool channels_last;
  int64_t channels, height, width;

  /* Pixels [x0, x1) of row y of channel block `block` of image n -> plane row
   * dst[x * kLanes + c] (dst: the row's start), lanes past C zero-filled. */
  void pack_row(int64_t n, int64_t block, int64_t y, int64_t x0, int64_t x1, T* dst) const {
    const int64_t c0 = block * kLanes, cn = std::min(kLanes, channels - c0), xn = x1 - x0;
    dst += x0 * kLanes;
    if (cn < kLanes) memset(dst, 0, sizeof(T) * xn * kLanes);
    if (channels_last) {
      const T* src = map + ((n * height + y) * width + x0) * channels + c0;
      for (int64_t x = 0; x < xn; ++x)
        memcpy(dst + x * kLanes, src + x * channels, sizeof(T) * cn);
      return;
    }
    pack_row_nchw(map + ((n * channels + c0) * height + y) * width + x0, height * width, xn,
                  cn, dst);
  }
};

/* Which chunks of kChunk pixels of each row the RoIs of one image read (the union of
 * their rectangles): the pack skips the rest, e.g. most of the map for the mask head's
 * hundred RoIs. Built with a difference array: O(sum of RoI heights + H * W / kChunk). */
struct Coverage {
  int64_t height = 0, width = 0, chunks = 0;
  std::vector<int32_t> count; /* [H][chunks + 1]: RoIs covering chunk (y, c) */

  void reset(int64_t h, int64_t w) {
    height = h, width = w, chunks = (w + kChunk - 1) / kChunk;
    count.assign(h * (chunks + 1), 0);
  }
  void add(const Rect& r) {
    if (r.empty()) return;
    const int64_t c0 = r.x0 / kChunk, c1 = r.x1 / kChunk + 1;
    for (int64_t y = r.y0; y <= r.y1; ++y) {
      count[y * (chunks + 1) + c0] += 1;
      count[y * (chunks + 1) + c1] -= 1;
    }
  }
  void finish() {
    for (int64_t y = 0; y < height; ++y)
      for (int64_t c = 1; c <= chunks; ++c)
        count[y * (chunks + 1) + c] += count[y * (chunks + 1) + c - 1];
  }
  /* Calls f(x0, x1) for each maximal run of covered pixels of row y. */
  template <typename F>
  void runs(int64_t y, F f) const {
    const int32_t* row = count.data() + y * (chunks + 1);
    for (int64_t c = 0; c < chunks;) {
      if (!row[c]) {
        ++c;
        continue;
      }
      int64_t e = c + 1;
      while (e < chunks && row[e]) ++e;
      f(c * kChunk, std::min(e * kChunk, width));
      c = e;
    }
  }
};

/* ------------------------------------------------------------------ per-RoI kernels */

template <typename T>
void pool_block_generic(const T* plane, const RoiTaps<T, int32_t>& r, int64_t PHW,
                        int64_t cn, T* out) {
  T acc[kLanes];
  pool_roi(plane, kLanes, 1, kLanes, cn, r, PHW, acc, out);
}

template <typename T>
MRC_AVX2 void pool_block_avx2(const T* plane, const RoiTaps<T, int32_t>& r, int64_t PHW,
                              int64_t cn, T* out) {
  T acc[kLanes];
  pool_roi(plane, kLanes, 1, kLanes, cn, r, PHW, acc, out);
}

#if MRC_X86_DISPATCH
template <>
MRC_AVX2 void pool_block_avx2<float>(const float* plane, const RoiTaps<float, int32_t>& r,
                                     int64_t PHW, int64_t cn, float* out) {
  pool_roi_lanes32_avx2(plane, r, PHW, cn, out);
}
#endif

/* kAllLanes: every lane of a pixel is ours (a packed plane, or an NHWC block of kLanes
 * real channels), so the lane loop has a constant count. Otherwise only the cn real
 * lanes: the next ones of an NHWC pixel belong to another thread's block. */
template <typename T, bool kAllLanes>
void scatter_block_generic(T* plane, int64_t stride, const RoiTaps<T, int32_t>& r,
                           int64_t PHW, const T* grad_out, int64_t cn) {
  scatter_roi(plane, stride, 1, kAllLanes ? kLanes : cn, cn, r, PHW, grad_out);
}

template <typename T, bool kAllLanes>
MRC_AVX2 void scatter_block_avx2(T* plane, int64_t stride, const RoiTaps<T, int32_t>& r,
                                 int64_t PHW, const T* grad_out, int64_t cn) {
  scatter_roi(plane, stride, 1, kAllLanes ? kLanes : cn, cn, r, PHW, grad_out);
}

template <typename T>
void scatter_block(bool avx2, T* plane, int64_t stride, const RoiTaps<T, int32_t>& r,
                   int64_t PHW, const T* grad_out, int64_t cn) {
  const bool all = stride == kLanes || cn == kLanes;
  if (avx2 && all)
    scatter_block_avx2<T, true>(plane, stride, r, PHW, grad_out, cn);
  else if (avx2)
    scatter_block_avx2<T, false>(plane, stride, r, PHW, grad_out, cn);
  else if (all)
    scatter_block_generic<T, true>(plane, stride, r, PHW, grad_out, cn);
  else
    scatter_block_generic<T, false>(plane, stride, r, PHW, grad_out, cn);
}

/* -------------------------------------------------------------------------- plans */

/* One level on the blocked path: its tap tables and, per image, the RoIs to visit. */
template <typename T>
struct LevelPlan {
  const Level<T>* level = nullptr;
  void* data = nullptr; /* the map (forward) or its gradient (backward) */
  TapTables<T, int32_t> tables;
  ImageGroups groups;

  /* Serial part; false when the level cannot take this path (int32 offsets, tap tables
   * too large) or, unless any_density, packing does not pay off. spatial: visit each
   * image's RoIs in spatial order (forward), else in input order (backward). */
  bool prepare(const Level<T>& lv, void* data_, const Params& p, bool spatial,
               bool any_density) {
    const int64_t N = p.images;
    if (N <= 0 || lv.height <= 0 || lv.width <= 0 || lv.pixels() >= kInt32Pixels)
      return false;
    tables.prepare(lv, p);
    if (!tables.ok) return false;
    if (!any_density && kPackDensity * tables.roi_start[lv.count] < N * lv.pixels())
      return false;
    level = &lv;
    data = data_;
    std::vector<int64_t> batch(lv.count);
    for (int64_t k = 0; k < lv.count; ++k) batch[k] = tables.geom[k].batch;
    const std::vector<int64_t> visit =
        spatial ? spatial_order(lv.rois, lv.count, lv.scale) : std::vector<int64_t>();
    groups.build(batch, N, spatial ? visit.data() : nullptr);
    return true;
  }
};

/* Prepares a plan per candidate level; the ones that cannot take the path go to *rest. */
template <typename T>
std::vector<LevelPlan<T>*> prepare_plans(const std::vector<Level<T>>& levels,
                                         void* const* data,
                                         const std::vector<int64_t>& candidates,
                                         bool spatial, bool any_density, const Params& p,
                                         std::vector<LevelPlan<T>>* storage,
                                         std::vector<int64_t>* rest) {
  storage->resize(candidates.size());
  std::vector<LevelPlan<T>*> taken;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const int64_t l = candidates[i];
    if ((*storage)[i].prepare(levels[l], data[l], p, spatial, any_density))
      taken.push_back(&(*storage)[i]);
    else
      rest->push_back(l);
  }
  return taken;
}

/* Fills the tap tables of every plan (inside a parallel region; ends with a barrier). */
template <typename T>
void fill_all_taps(const std::vector<LevelPlan<T>*>& plans, const Params& p) {
  AxisTables<T> axes;
  for (LevelPlan<T>* plan : plans) {
#pragma omp for schedule(dynamic, 16) nowait
    for (int64_t k = 0; k < plan->level->count; ++k) plan->tables.fill(k, axes, p);
  }
#pragma omp barrier
}

/* Values of one packed block of the largest level. */
template <typename T>
int64_t block_values(const std::vector<LevelPlan<T>*>& plans) {
  int64_t most = 0;
  for (const LevelPlan<T>* plan : plans) most = std::max(most, plan->level->pixels());
  return most * kLanes;
}

/* The candidates of the plans (when the scratch cannot be allocated after all). */
template <typename T>
void give_back(const std::vector<LevelPlan<T>*>& plans, const std::vector<LevelPlan<T>>& storage,
               const std::vector<int64_t>& candidates, std::vector<int64_t>* rest) {
  for (const LevelPlan<T>* plan : plans) rest->push_back(candidates[plan - storage.data()]);
}

/* ------------------------------------------------------------------------- forward */

template <typename T>
void forward_plans(const std::vector<LevelPlan<T>*>& plans, T* packed, bool avx2,
                   const Params& p, T* out) {
  const int64_t C = p.channels, PHW = p.bins(), blocks = (C + kLanes - 1) / kLanes;
  for (const LevelPlan<T>* plan : plans)  /* RoIs of no image (bad batch index) */
    for (int64_t k = 0; k < plan->level->count; ++k)
      if (plan->tables.geom[k].batch < 0) zero_rows(out, plan->level->row(k), 0, C, p);
  Coverage cover;
#pragma omp parallel num_threads(p.threads)
  {
    fill_all_taps(plans, p);
    for (const LevelPlan<T>* plan : plans) {
      const Level<T>& lv = *plan->level;
      const PackSource<T> src{static_cast<const T*>(plan->data), p.channels_last, C,
                              lv.height, lv.width};
      for (int64_t n = 0; n < p.images; ++n) {
        const int64_t o0 = plan->groups.begin(n), o1 = plan->groups.end(n);
        if (o0 == o1) continue;
#pragma omp single
        {
          cover.reset(lv.height, lv.width);
          for (int64_t oi = o0; oi < o1; ++oi)
            cover.add(plan->tables.rect[plan->groups.order[oi]]);
          cover.finish();
        }
        for (int64_t cb = 0; cb < blocks; ++cb) {
          const int64_t c0 = cb * kLanes, cn = std::min(kLanes, C - c0);
#pragma omp for schedule(dynamic, 8)
          for (int64_t y = 0; y < lv.height; ++y)
            cover.runs(y, [&](int64_t x0, int64_t x1) {
              src.pack_row(n, cb, y, x0, x1, packed + y * lv.width * kLanes);
            });
#pragma omp for schedule(dynamic, 8)
          for (int64_t oi = o0; oi < o1; ++oi) {
            const int64_t k = plan->groups.order[oi];
            T* o = out + (lv.row(k) * C + c0) * PHW;
            if (avx2)
              pool_block_avx2<T>(packed, plan->tables.roi(k), PHW, cn, o);
            else
              pool_block_generic<T>(packed, plan->tables.roi(k), PHW, cn, o);
          }
        }
      }
    }
  }
}

/* ------------------------------------------------------------------------ backward */

/* Item (image n, channel block cb) of one level: overwrites its channels of the
 * gradient. NHWC: accumulates in place (pixel stride C). NCHW: in `plane`, the calling
 * thread's packed scratch (H * W * kLanes values), then unpacks. */
template <typename T>
void backward_item(const LevelPlan<T>& plan, int64_t n, int64_t cb, T* plane,
                   const T* grad_out, bool avx2, const Params& p) {
  const Level<T>& lv = *plan.level;
  const int64_t C = p.channels, HW = lv.pixels(), PHW = p.bins();
  const int64_t c0 = cb * kLanes, cn = std::min(kLanes, C - c0);
  T* grad = static_cast<T*>(plan.data);
  int64_t stride = kLanes;
  if (p.channels_last) {
    plane = grad + n * HW * C + c0;
    stride = C;
    for (int64_t q = 0; q < HW; ++q) memset(plane + q * C, 0, sizeof(T) * cn);
  } else {
    memset(plane, 0, sizeof(T) * HW * kLanes);
  }
  for (int64_t oi = plan.groups.begin(n); oi < plan.groups.end(n); ++oi) {
    const int64_t k = plan.groups.order[oi];
    scatter_block<T>(avx2, plane, stride, plan.tables.roi(k), PHW,
                     grad_out + (lv.row(k) * C + c0) * PHW, cn);
  }
  if (p.channels_last) return;
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {  /* unpack, a tile at a time */
    const int64_t pn = std::min(kTile, HW - p0);
    for (int64_t c = 0; c < cn; ++c) {
      T* dst = grad + (n * C + c0 + c) * HW + p0;
      const T* src = plane + p0 * kLanes + c;
      for (int64_t q = 0; q < pn; ++q) dst[q] = src[q * kLanes];
    }
  }
}

/* Items (level, image, channel block) run independently, each (NCHW) in its thread's
 * own scratch plane (planes: one block of the largest level per thread). */
template <typename T>
void backward_plans(const std::vector<LevelPlan<T>*>& plans, T* planes, int64_t plane_values,
                    const T* grad_out, bool avx2, const Params& p) {
  const int64_t blocks = (p.channels + kLanes - 1) / kLanes;
  std::vector<int64_t> first_item(1, 0);  /* items of plan u: [first_item[u], [u + 1]) */
  for (size_t u = 0; u < plans.size(); ++u)
    first_item.push_back(first_item.back() + p.images * blocks);
#pragma omp parallel num_threads(p.threads)
  {
    fill_all_taps(plans, p);
    T* mine = planes ? planes + omp_get_thread_num() * plane_values : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < first_item.back(); ++it) {
      const int64_t u =
          std::upper_bound(first_item.begin(), first_item.end(), it) - first_item.begin() - 1;
      const int64_t local = it - first_item[u];
      backward_item(*plans[u], local / blocks, local % blocks, mine, grad_out, avx2, p);
    }
  }
}

}  // namespace

template <typename T>
std::vector<int64_t> forward_blocked(const std::vector<Level<T>>& levels, void* const* maps,
                                     const std::vector<int64_t>& candidates, bool any_density,
                                     const Params& p, T* out, PathBits* paths) {
  std::vector<LevelPlan<T>> storage;
  std::vector<int64_t> rest;
  const std::vector<LevelPlan<T>*> plans =
      prepare_plans(levels, maps, candidates, true, any_density, p, &storage, &rest);
  if (plans.empty()) return rest;
  /* ONE shared plane: one block of the largest level, not a packed copy of every map */
  T* packed = static_cast<T*>(thread_scratch(sizeof(T) * block_values(plans)));
  if (!packed) {
    give_back(plans, storage, candidates, &rest);
    return rest;
  }
  const bool avx2 = use_avx2();
  forward_plans(plans, packed, avx2, p, out);
  *paths |= MRC_ROI_PATH_BLOCKED | (avx2 ? MRC_ROI_PATH_AVX2 : 0);
  return rest;
}

template <typename T>
std::vector<int64_t> backward_blocked(const std::vector<Level<T>>& levels, void* const* grads,
                                      const std::vector<int64_t>& candidates,
                                      bool any_density, const Params& p, const T* grad_out,
                                      PathBits* paths) {
  std::vector<LevelPlan<T>> storage;
  std::vector<int64_t> rest;
  const std::vector<LevelPlan<T>*> plans =
      prepare_plans(levels, grads, candidates, false, any_density, p, &storage, &rest);
  if (plans.empty()) return rest;
  const int64_t blocks = (p.channels + kLanes - 1) / kLanes;
  Params q = p;
  q.threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(p.threads, plans.size() * p.images * blocks)));
  const int64_t plane_values = block_values(plans);
  T* planes = nullptr;
  if (!p.channels_last) {
    planes = static_cast<T*>(thread_scratch(sizeof(T) * plane_values * q.threads));
    if (!planes) {
      give_back(plans, storage, candidates, &rest);
      return rest;
    }
  }
  const bool avx2 = use_avx2();
  backward_plans(plans, planes, plane_values, grad_out, avx2, q);
  *paths |= (p.channels_last ? MRC_ROI_PATH_BLOCKED_NHWC : MRC_ROI_PATH_BLOCKED) |
            (avx2 ? MRC_ROI_PATH_AVX2 : 0);
  return rest;
}

template std::vector<int64_t> forward_blocked<float>(const std::vector<Level<float>>&,
                                                     void* const*, const std::vector<int64_t>&,
                                                     bool, const Params&, float*, PathBits*);
template std::vector<int64_t> forward_blocked<double>(const std::vector<Level<double>>&,
                                                      void* const*,
                                                      const std::vector<int64_t>&, bool,
                                                      const Params&, double*, PathBits*);
template std::vector<int64_t> backward_blocked<float>(const std::vector<Level<float>>&,
                                                      void* const*,
                                                      const std::vector<int64_t>&, bool,
                                                      const Params&, const float*, PathBits*);
template std::vector<int64_t> backward_blocked<double>(const std::vector<Level<double>>&,
                                                       void* const*,
                                                       const std::vector<int64_t>&, bool,
                                                       const Params&, const double*,
                                                       PathBits*);

}  // namespace roi_cpu
}  // namespace mrc
