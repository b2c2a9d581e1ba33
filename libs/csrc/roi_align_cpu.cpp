/*
 * RoIAlign forward/backward on the CPU (libmrcnn_cpu.so): the extern "C" layer, the split
 * of the RoIs by level and the choice of path. Semantics: docs/kernels.md, section
 * "Semantics"; bit-identical to torchvision's CPU kernel when compiled with
 * -ffp-contract=off (same expressions, same order of operations, on every path).
 *
 * Multi-level (FPN): one call takes every level and each RoI's level and pools each RoI
 * straight into its output row (no gather / concatenation / scatter); a single map is
 * one level, so both entry points share the same code. Per level the path is
 *   - blocked (roi_align_cpu_blocked.cpp) when C >= kLanes and the RoIs sample the map
 *     densely (kPackDensity); in the backward also any NHWC gradient (accumulated in
 *     place); all blocked levels share one parallel region;
 *   - unblocked (roi_align_cpu_unblocked.cpp) otherwise, or when the blocked path cannot
 *     run (tap tables over kMaxTapTableBytes, a plane of 2^31 pixels or more, no memory
 *     for the scratch plane).
 * Calls with little work (kSerialWork) run on the calling thread. The test hook
 * mrc_roi_align_cpu_force overrides the choice; mrc_roi_align_cpu_paths_taken reports it.
 */
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <new>
#include <vector>

#include "common.h"
#include "cpu_common.h"
#include "mrcnn_kernels.h"
#include "roi_align_cpu.h"
#include "roi_align_cpu_taps.h"

namespace mrc {
namespace roi_cpu {

namespace {

std::atomic<int> g_forced_path{MRC_ROI_FORCE_AUTO};
std::atomic<bool> g_avx2_allowed{true};
thread_local PathBits t_paths_taken = 0;

}  // namespace

Forced forced_path() {
  switch (g_forced_path.load(std::memory_order_relaxed)) {
    case MRC_ROI_FORCE_BLOCKED: return Forced::kBlocked;
    case MRC_ROI_FORCE_UNBLOCKED: return Forced::kUnblocked;
    default: return Forced::kAuto;
  }
}

bool use_avx2() { return cpu_has_avx2() && g_avx2_allowed.load(std::memory_order_relaxed); }

namespace {

/* The RoIs of each level, in input order: compact RoI rows and their output rows. RoIs
 * with a level outside [0, L) belong to no level (orphans: their output rows are zero).
 * A single map is one level holding every RoI. */
template <typename T>
struct LevelSplit {
  std::vector<std::vector<T>> rois;
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> orphans;
  std::vector<Level<T>> levels;

  LevelSplit(int64_t L, const int64_t* heights, const int64_t* widths, const double* scales,
             const T* r, const int64_t* level_of, int64_t K)
      : rois(L), rows(L), levels(L) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t l = level_of ? level_of[k] : 0;
      if (l < 0 || l >= L) {
        orphans.push_back(k);
        continue;
      }
      rois[l].insert(rois[l].end(), r + k * 5, r + k * 5 + 5);
      rows[l].push_back(k);
    }
    for (int64_t l = 0; l < L; ++l) {
      Level<T>& lv = levels[l];
      lv.height = heights[l];
      lv.width = widths[l];
      lv.scale = scales[l];
      lv.rois = rois[l].data();
      lv.rows = rows[l].data();
      lv.count = static_cast<int64_t>(rows[l].size());
    }
  }
};

/* Levels the blocked path may take: all (forced), none (forced off), or those with
 * eligible(l); the others go to *unblocked. */
template <typename T, typename F>
std::vector<int64_t> blocked_candidates(const LevelSplit<T>& split, F eligible,
                                        std::vector<int64_t>* unblocked) {
  std::vector<int64_t> out;
  const Forced forced = forced_path();
  for (int64_t l = 0; l < static_cast<int64_t>(split.levels.size()); ++l) {
    if (split.levels[l].count == 0) continue;
    const bool blocked = forced == Forced::kBlocked ||
                         (forced == Forced::kAuto && eligible(l));
    (blocked ? out : *unblocked).push_back(l);
  }
  return out;
}

template <typename T>
PathBits multilevel_forward(void* const* maps, const LevelSplit<T>& split, const Params& p,
                            T* out) {
  for (int64_t k : split.orphans) zero_rows(out, k, 0, p.channels, p);
  std::vector<int64_t> unblocked;
  const std::vector<int64_t> candidates =
      blocked_candidates(split, [&](int64_t) { return p.channels >= kLanes; }, &unblocked);
  PathBits paths = 0;
  if (!candidates.empty()) {
    const bool any_density = forced_path() == Forced::kBlocked;
    for (int64_t l : forward_blocked(split.levels, maps, candidates, any_density, p, out,
                                     &paths))
      unblocked.push_back(l);
  }
  for (int64_t l : unblocked)
    paths |= forward_unblocked(static_cast<const T*>(maps[l]), split.levels[l], p, out);
  return paths;
}

/* Overwrites every grads[l]; a level without RoIs is zero. NHWC gradients take the
 * blocked path at any C and density (they accumulate in place: no pack, no unpack). */
template <typename T>
PathBits multilevel_backward(void* const* grads, const LevelSplit<T>& split, const Params& p,
                             const T* grad_out) {
  for (size_t l = 0; l < split.levels.size(); ++l) {
    const size_t bytes = sizeof(T) * static_cast<size_t>(p.images * p.channels *
                                                         split.levels[l].pixels());
    hint_huge_pages(grads[l], bytes);
    if (split.levels[l].count == 0 && bytes) memset(grads[l], 0, bytes);
  }
  std::vector<int64_t> unblocked;
  std::vector<int64_t> candidates = blocked_candidates(
      split, [&](int64_t) { return p.channels >= kLanes || p.channels_last; }, &unblocked);
  PathBits paths = 0;
  if (!candidates.empty()) {
    const bool any_density = p.channels_last || forced_path() == Forced::kBlocked;
    for (int64_t l : backward_blocked(split.levels, grads, candidates, any_density, p,
                                      grad_out, &paths))
      unblocked.push_back(l);
  }
  for (int64_t l : unblocked)
    if (split.levels[l].pixels() > 0)
      paths |= backward_unblocked(grad_out, split.levels[l], p, static_cast<T*>(grads[l]));
  return paths;
}

/* num_threads (<= 0: the OpenMP default), or 1 for calls with little work. */
int threads_for(int64_t K, int64_t C, int64_t PH, int64_t PW, int num_threads) {
  return K * C * PH * PW < kSerialWork ? 1 : resolve_threads(num_threads);
}

int check_levels(const char* fn, int dtype, int64_t L, void* const* maps,
                 const int64_t* heights, const int64_t* widths, const double* scales,
                 const void* rois, const int64_t* levels, const void* out, int64_t N,
                 int64_t C, int64_t K, int64_t PH, int64_t PW) {
  if (L <= 0 || !maps || !heights || !widths || !scales)
    return set_error(MRC_ERR_INVALID, "%s: need L >= 1 levels with maps, heights, "
                     "widths and scales (got L=%lld)", fn, (long long)L);
  if (K > 0 && !levels) return set_error(MRC_ERR_INVALID, "%s: null levels", fn);
  for (int64_t l = 0; l < L; ++l) {
    int rc = check_roi_align_args(fn, dtype, false, maps[l], rois, out, N, C, heights[l],
                                  widths[l], K, PH, PW, scales[l]);
    if (rc) return rc;
  }
  return MRC_OK;
}

/* One call of either direction: f(T{}) on the dtype, errors turned into codes, the paths
 * taken recorded for mrc_roi_align_cpu_paths_taken. */
template <typename F>
int run(const char* fn, int dtype, F f) {
  try {
    t_paths_taken = dtype == MRC_F32 ? f(float{}) : f(double{});
  } catch (const std::bad_alloc&) {
    return set_error(MRC_ERR_ALLOC, "%s: out of memory", fn);
  } catch (...) {
    return set_error(MRC_ERR_INTERNAL, "%s: internal error", fn);
  }
  return MRC_OK;
}

/* The ABI's arguments common to every entry point. */
struct CallArgs {
  int dtype;
  int64_t L;
  void* const* maps;  /* maps (forward) or gradients (backward) */
  const int64_t* heights;
  const int64_t* widths;
  const double* scales;
  const void* rois;
  const int64_t* levels; /* nullptr: one map */
  int64_t K;
  Params p;
};

int forward(const char* fn, const CallArgs& a, void* output) {
  hint_huge_pages(output, static_cast<size_t>(a.K * a.p.channels * a.p.bins()) *
                              (a.dtype == MRC_F32 ? sizeof(float) : sizeof(double)));
  return run(fn, a.dtype, [&](auto zero) {
    using T = decltype(zero);
    const LevelSplit<T> split(a.L, a.heights, a.widths, a.scales,
                              static_cast<const T*>(a.rois), a.levels, a.K);
    return multilevel_forward<T>(a.maps, split, a.p, static_cast<T*>(output));
  });
}

int backward(const char* fn, const CallArgs& a, const void* grad_output) {
  return run(fn, a.dtype, [&](auto zero) {
    using T = decltype(zero);
    const LevelSplit<T> split(a.L, a.heights, a.widths, a.scales,
                              static_cast<const T*>(a.rois), a.levels, a.K);
    return multilevel_backward<T>(a.maps, split, a.p, static_cast<const T*>(grad_output));
  });
}

Params make_params(int64_t N, int64_t C, int64_t K, int64_t PH, int64_t PW,
                   int64_t sampling_ratio, int aligned, int channels_last, int num_threads) {
  Params p;
  p.images = N;
  p.channels = C;
  p.pooled_h = PH;
  p.pooled_w = PW;
  p.sampling_ratio = sampling_ratio;
  p.aligned = aligned != 0;
  p.channels_last = channels_last != 0;
  p.threads = threads_for(K, C, PH, PW, num_threads);
  return p;
}

}  // namespace
}  // namespace roi_cpu
}  // namespace mrc

using mrc::roi_cpu::CallArgs;
using mrc::roi_cpu::make_params;

extern "C" {

int mrc_abi_version(void) { return MRC_ABI_VERSION; }
const char* mrc_last_error(void) { return mrc::last_error(); }

int mrc_roi_align_forward_cpu(int dtype, const void* input, const void* rois, void* output,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                              int64_t PH, int64_t PW, double spatial_scale,
                              int64_t sampling_ratio, int aligned, int channels_last,
                              int num_threads) {
  static const char* fn = "mrc_roi_align_forward_cpu";
  mrc::roi_cpu::t_paths_taken = 0;
  int rc = mrc::check_roi_align_args(fn, dtype, false, input, rois, output, N, C, H, W, K,
                                     PH, PW, spatial_scale);
  if (rc) return rc;
  if (K == 0 || C == 0) return MRC_OK;
  void* maps[1] = {const_cast<void*>(input)};
  const CallArgs a{dtype, 1, maps, &H, &W, &spatial_scale, rois, nullptr, K,
                   make_params(N, C, K, PH, PW, sampling_ratio, aligned, channels_last,
                               num_threads)};
  return mrc::roi_cpu::forward(fn, a, output);
}

int mrc_roi_align_backward_cpu(int dtype, const void* grad_output, const void* rois,
                               void* grad_input, int64_t N, int64_t C, int64_t H, int64_t W,
                               int64_t K, int64_t PH, int64_t PW, double spatial_scale,
                               int64_t sampling_ratio, int aligned, int num_threads) {
  static const char* fn = "mrc_roi_align_backward_cpu";
  mrc::roi_cpu::t_paths_taken = 0;
  int rc = mrc::check_roi_align_args(fn, dtype, false, grad_input, rois, grad_output, N, C, H,
                                     W, K, PH, PW, spatial_scale);
  if (rc) return rc;
  if (C == 0 || N == 0 || H == 0 || W == 0) return MRC_OK;  /* nothing to write */
  void* grads[1] = {grad_input};
  const CallArgs a{dtype, 1, grads, &H, &W, &spatial_scale, rois, nullptr, K,
                   make_params(N, C, K, PH, PW, sampling_ratio, aligned, 0, num_threads)};
  return mrc::roi_cpu::backward(fn, a, grad_output);
}

int mrc_roi_align_multilevel_forward_cpu(int dtype, int64_t L, void** inputs,
                                         const int64_t* heights, const int64_t* widths,
                                         const double* scales, const void* rois,
                                         const int64_t* levels, void* output, int64_t N,
                                         int64_t C, int64_t K, int64_t PH, int64_t PW,
                                         int64_t sampling_ratio, int aligned,
                                         int channels_last, int num_threads) {
  static const char* fn = "mrc_roi_align_multilevel_forward_cpu";
  mrc::roi_cpu::t_paths_taken = 0;
  int rc = mrc::roi_cpu::check_levels(fn, dtype, L, inputs, heights, widths, scales, rois,
                                      levels, output, N, C, K, PH, PW);
  if (rc) return rc;
  if (K == 0 || C == 0) return MRC_OK;
  const CallArgs a{dtype, L, inputs, heights, widths, scales, rois, levels, K,
                   make_params(N, C, K, PH, PW, sampling_ratio, aligned, channels_last,
                               num_threads)};
  return mrc::roi_cpu::forward(fn, a, output);
}

int mrc_roi_align_multilevel_backward_cpu(int dtype, int64_t L, void** grad_inputs,
                                          const int64_t* heights, const int64_t* widths,
                                          const double* scales, const void* grad_output,
                                          const void* rois, const int64_t* levels, int64_t N,
                                          int64_t C, int64_t K, int64_t PH, int64_t PW,
                                          int64_t sampling_ratio, int aligned,
                                          int channels_last, int num_threads) {
  static const char* fn = "mrc_roi_align_multilevel_backward_cpu";
  mrc::roi_cpu::t_paths_taken = 0;
  int rc = mrc::roi_cpu::check_levels(fn, dtype, L, grad_inputs, heights, widths, scales,
                                      rois, levels, grad_output, N, C, K, PH, PW);
  if (rc) return rc;
  if (C == 0 || N == 0) return MRC_OK;  /* nothing to write */
  const CallArgs a{dtype, L, grad_inputs, heights, widths, scales, rois, levels, K,
                   make_params(N, C, K, PH, PW, sampling_ratio, aligned, channels_last,
                               num_threads)};
  return mrc::roi_cpu::backward(fn, a, grad_output);
}

int mrc_roi_align_cpu_force(int path, int avx2) {
  if (path != MRC_ROI_FORCE_AUTO && path != MRC_ROI_FORCE_BLOCKED &&
      path != MRC_ROI_FORCE_UNBLOCKED)
    return mrc::set_error(MRC_ERR_INVALID, "mrc_roi_align_cpu_force: invalid path %d "
                          "(expected 0 auto, 1 blocked, 2 unblocked)", path);
  mrc::roi_cpu::g_forced_path.store(path, std::memory_order_relaxed);
  mrc::roi_cpu::g_avx2_allowed.store(avx2 != 0, std::memory_order_relaxed);
  return MRC_OK;
}

int mrc_roi_align_cpu_paths_taken(void) {
  return static_cast<int>(mrc::roi_cpu::t_paths_taken);
}

}  // extern "C"
