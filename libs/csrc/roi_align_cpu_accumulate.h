/*
 * The arithmetic of the CPU RoIAlign, written once for every path:
 *   sum_bin       the weighted sum of one bin's taps (the bilinear average before the
 *                 divide), for a group of channels ("lanes") at once, tap by tap
 *                 (add_tap), from any tap source: a stored list (RoiTaps) or taps formed
 *                 as they are read (AxisTaps);
 *   pool_roi      one RoI's bins for a group of channels: sum_bin, then / count;
 *   scatter_roi   the adjoint: g_i = grad * w_i / count added to the four pixels.
 * Lane c of pixel q is at base[q * pixel_stride + c * lane_stride], which covers every
 * layout: NCHW planes (1, H * W), NHWC maps (C, 1) and packed blocks (kLanes, 1). Per
 * channel the operations and their order are torchvision's (mul, adds left to right,
 * then the divide; no FMA with -ffp-contract=off), so each path is bit-identical to it.
 * The strides and lane counts are compile-time constants where the callers make them so
 * (the bodies are always inlined), which is what vectorises the lane loops.
 * pool_roi_lanes32_avx2 is the float AVX2 copy of pool_roi for packed blocks.
 */
#ifndef MRCNN_ROI_ALIGN_CPU_ACCUMULATE_H
#define MRCNN_ROI_ALIGN_CPU_ACCUMULATE_H

#include <stdint.h>

#include "cpu_common.h"
#include "roi_align_cpu.h"
#include "roi_align_cpu_taps.h"

namespace mrc {
namespace roi_cpu {

/* acc[c] += w1 v[p1] + w2 v[p2] + w3 v[p3] + w4 v[p4] for one tap, c < lanes. */
template <typename T, typename I>
MRC_INLINE void add_tap(const T* __restrict base, int64_t pixel_stride, int64_t lane_stride,
                        int64_t lanes, const Tap<T, I>& t, T* __restrict acc) {
  const T* __restrict v1 = base + static_cast<int64_t>(t.p1) * pixel_stride;
  const T* __restrict v2 = base + static_cast<int64_t>(t.p2) * pixel_stride;
  const T* __restrict v3 = base + static_cast<int64_t>(t.p3) * pixel_stride;
  const T* __restrict v4 = base + static_cast<int64_t>(t.p4) * pixel_stride;
  for (int64_t c = 0; c < lanes; ++c) {
    const int64_t q = c * lane_stride;
    acc[c] += t.w1 * v1[q] + t.w2 * v2[q] + t.w3 * v3[q] + t.w4 * v4[q];
  }
}

/* acc[c] = the weighted sum of bin b's taps, c < lanes. Taps: a tap source
 * (roi_align_cpu_taps.h). */
template <typename T, typename Taps>
MRC_INLINE void sum_bin(const T* __restrict base, int64_t pixel_stride, int64_t lane_stride,
                        int64_t lanes, const Taps& r, int64_t b, T* __restrict acc) {
  for (int64_t c = 0; c < lanes; ++c) acc[c] = static_cast<T>(0);
  r.for_each_tap(b, [&](const auto& t) __attribute__((always_inline)) {
    add_tap(base, pixel_stride, lane_stride, lanes, t, acc);
  });
}

/* out[c * PHW + b] = (bin b's sum) / count for the cn <= lanes real channels; acc holds
 * `lanes` values (the caller's array, so its size is the caller's constant). */
template <typename T, typename Taps>
MRC_INLINE void pool_roi(const T* __restrict base, int64_t pixel_stride, int64_t lane_stride,
                         int64_t lanes, int64_t cn, const Taps& r, int64_t PHW,
                         T* __restrict acc, T* __restrict out) {
  const T count = r.count;
  for (int64_t b = 0; b < PHW; ++b) {
    sum_bin(base, pixel_stride, lane_stride, lanes, r, b, acc);
    for (int64_t c = 0; c < cn; ++c) out[c * PHW + b] = acc[c] / count;
  }
}

/* The adjoint of one RoI: for each bin, each tap in order and taps 1..4 in order,
 * v[p_i] += grad * w_i / count (torchvision's summation order). grad_out is the RoI's
 * [cn][PHW] gradient; lanes cn .. lanes - 1 (padding of a packed block) get zero. The
 * pixel pointers are not restrict: the four taps of a clamped sample may coincide. */
template <typename T, typename I>
MRC_INLINE void scatter_roi(T* base, int64_t pixel_stride, int64_t lane_stride,
                            int64_t lanes, int64_t cn, const RoiTaps<T, I>& r, int64_t PHW,
                            const T* __restrict grad_out) {
  /* locals: stores through the pixel pointers could otherwise alias r's fields */
  const Tap<T, I>* __restrict taps = r.taps;
  const int64_t* __restrict bins = r.bins;
  const T count = r.count;
  for (int64_t b = 0; b < PHW; ++b) {
    if (bins[b] == bins[b + 1]) continue;
    T gv[kLanes];
    for (int64_t c = 0; c < lanes; ++c)
      gv[c] = c < cn ? grad_out[c * PHW + b] : static_cast<T>(0);
    for (int64_t s = bins[b]; s < bins[b + 1]; ++s) {
      const Tap<T, I> t = taps[s];
      const I pixel[4] = {t.p1, t.p2, t.p3, t.p4};
      const T weight[4] = {t.w1, t.w2, t.w3, t.w4};
      for (int i = 0; i < 4; ++i) {
        T* v = base + static_cast<int64_t>(pixel[i]) * pixel_stride;
        for (int64_t c = 0; c < lanes; ++c) v[c * lane_stride] += gv[c] * weight[i] / count;
      }
    }
  }
}

#if MRC_X86_DISPATCH
/* Copies n floats to dst with streaming stores: the output of a call is tens of MB that
 * the cache cannot keep, and ordinary stores would first read every line of it. */
MRC_AVX2 inline void stream_copy(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31); ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
  _mm_sfence();
}

/* Bins whose [cn][PHW] result is staged before the streaming copy: 32 lanes x 256 bins x
 * 4 bytes = 32 KiB, the size of an L1 data cache (a 16x16 pooled size at most). */
static const int64_t kStagedBins = 256;

/* pool_roi on a packed float block (pixel stride kLanes, all kLanes lanes), with
 * intrinsics: GCC keeps the lane loop of sum_bin scalar there (it versions the loop for
 * aliasing and takes the scalar copy). Same operations in the same order per lane as
 * sum_bin (mul, then adds left to right, then the divide), so the bits are the same.
 * 32 lanes = 4 accumulators. */
MRC_AVX2 inline void pool_roi_lanes32_avx2(const float* plane,
                                           const RoiTaps<float, int32_t>& r, int64_t PHW,
                                           int64_t cn, float* out) {
  static_assert(kLanes == 32, "pool_roi_lanes32_avx2 assumes 4 x 8 lanes");
  alignas(32) float staged[kLanes * kStagedBins];
  const bool stage = PHW <= kStagedBins;
  float* dst = stage ? staged : out;
  const __m256 count = _mm256_set1_ps(r.count);
  alignas(32) float res[kLanes];
  for (int64_t b = 0; b < PHW; ++b) {
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t s = r.bins[b]; s < r.bins[b + 1]; ++s) {
      const Tap<float, int32_t> t = r.taps[s];
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
    for (int j = 0; j < 4; ++j) _mm256_store_ps(res + 8 * j, _mm256_div_ps(acc[j], count));
    for (int64_t c = 0; c < cn; ++c) dst[c * PHW + b] = res[c];
  }
  if (stage) stream_copy(staged, cn * PHW, out);
}
#endif

}  // namespace roi_cpu
}  // namespace mrc

#endif
