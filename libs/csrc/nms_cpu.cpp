/*
 * Greedy NMS on the CPU. The kernel sorts the scores itself (stable, descending, NaN
 * first: torch.sort's order) so that the caller needs no sort or gather of its own
 * (small torch ops cost more than the whole NMS of 1000 boxes). Same arithmetic as torchvision's CPU kernel (areas without +1, IoU
 * strictly greater than the threshold suppresses), so kept indices are identical.
 *
 * The candidates still alive are kept as a compact structure of arrays; each kept box
 * computes one vectorisable IoU row against them and the survivors are compacted in
 * place, so the work per kept box is proportional to the boxes still alive.
 *
 * Single-threaded on purpose (so the ABI takes no thread count): splitting each IoU row
 * over threads means one fork/join per kept box (thousands), and on a busy machine every
 * join waits for a descheduled thread, which costs far more than the row itself
 * (docs/benchmarks.md, "NMS single-threaded").
 */
#include <stdint.h>

#include <algorithm>
#include <new>
#include <vector>

#include "common.h"
#include "kernel_math.h"
#include "mrcnn_kernels.h"

namespace {

/* Comparison value type: a float IoU is compared against the largest float <= thr
 * (equivalent to torchvision's (double)iou > thr); a double IoU against thr itself. */
template <typename T> struct Thr;
template <> struct Thr<float> {
  static float get(double t) { return mrc::float_threshold(t); }
};
template <> struct Thr<double> {
  static double get(double t) { return t; }
};

/* Flags the candidates that the kept box suppresses; returns how many were newly
 * flagged. Already-flagged ones stay flagged (their IoU is computed anyway: branch-free). */
template <typename T, typename F>
int64_t suppress_row(const T* __restrict x1, const T* __restrict y1, const T* __restrict x2,
                     const T* __restrict y2, const T* __restrict ar, int64_t m, T ix1, T iy1,
                     T ix2, T iy2, T iar, T thr, F* __restrict flag) {
  F killed = 0;
  for (int64_t j = 0; j < m; ++j) {
    const T iou = mrc::box_iou(ix1, iy1, ix2, iy2, iar, x1[j], y1[j], x2[j], y2[j], ar[j]);
    const F old = flag[j];
    const F now = old | ((iou > thr) ? F(1) : F(0));
    flag[j] = now;
    killed += now - old;
  }
  return static_cast<int64_t>(killed);
}

/* Stable sort by descending score, NaN first (torch.sort(descending=True, stable=True)). */
std::vector<int64_t> score_order(const double* scores, int64_t n) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [scores](int64_t a, int64_t b) {
    const double sa = scores[a], sb = scores[b];
    return (sa != sa && sb == sb) || sa > sb;
  });
  return order;
}

/* boxes: [n, 4] in input order; order: the visiting order (descending score). keep gets
 * input indices. */
template <typename T, typename F>
void nms_impl(const T* boxes, const int64_t* order, int64_t n, double iou_threshold,
              int64_t* keep, int64_t* num_kept) {
  std::vector<T> x1(n), y1(n), x2(n), y2(n), ar(n);
  std::vector<int64_t> idx(n);
  std::vector<F> flag(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = order[i];
    x1[i] = boxes[4 * o + 0];
    y1[i] = boxes[4 * o + 1];
    x2[i] = boxes[4 * o + 2];
    y2[i] = boxes[4 * o + 3];
    ar[i] = mrc::box_area(x1[i], y1[i], x2[i], y2[i]);
    idx[i] = o;
  }
  const T thr = Thr<T>::get(iou_threshold);
  /* Alive candidates live in [base, m); dead ones are only flagged and are squeezed out
   * when they make up a quarter of the range, so most kept boxes cost one IoU row. */
  T *px1 = x1.data(), *py1 = y1.data(), *px2 = x2.data(), *py2 = y2.data(), *par = ar.data();
  int64_t* pidx = idx.data();
  F* pf = flag.data();
  for (int64_t j = 0; j < n; ++j) pf[j] = F(0);
  int64_t m = n, base = 0, nk = 0, ndead = 0;
  while (true) {
    while (base < m && pf[base]) { ++base; --ndead; }
    if (base >= m) break;
    keep[nk++] = pidx[base];
    const T ix1 = px1[base], iy1 = py1[base], ix2 = px2[base], iy2 = py2[base],
            iar = par[base];
    ++base;
    const int64_t rest = m - base;
    const int64_t killed =
        rest > 0 ? suppress_row(px1 + base, py1 + base, px2 + base, py2 + base, par + base,
                                rest, ix1, iy1, ix2, iy2, iar, thr, pf + base)
                 : 0;
    ndead += killed;
    if (ndead > 64 && 4 * ndead > m - base) {
      int64_t w = 0;
      for (int64_t j = base; j < m; ++j) {
        if (!pf[j]) {
          px1[w] = px1[j];
          py1[w] = py1[j];
          px2[w] = px2[j];
          py2[w] = py2[j];
          par[w] = par[j];
          pidx[w] = pidx[j];
          pf[w] = F(0);
          ++w;
        }
      }
      m = w;
      base = 0;
      ndead = 0;
    }
  }
  *num_kept = nk;
}

}  // namespace

extern "C" int mrc_nms_cpu(int dtype, const void* boxes, const double* scores, int64_t n,
                           double iou_threshold, int64_t* keep, int64_t* num_kept) {
  static const char* fn = "mrc_nms_cpu";
  int rc = mrc::check_nms_args(fn, dtype, false, boxes, n, keep, num_kept);
  if (rc) return rc;
  *num_kept = 0;
  if (n == 0) return MRC_OK;
  if (!scores) return mrc::set_error(MRC_ERR_INVALID, "%s: null scores pointer", fn);
  try {
    const std::vector<int64_t> order = score_order(scores, n);
    if (dtype == MRC_F32)
      nms_impl<float, int32_t>((const float*)boxes, order.data(), n, iou_threshold, keep,
                               num_kept);
    else
      nms_impl<double, int64_t>((const double*)boxes, order.data(), n, iou_threshold, keep,
                                num_kept);
  } catch (const std::bad_alloc&) {
    return mrc::set_error(MRC_ERR_ALLOC, "%s: out of memory", fn);
  } catch (...) {
    return mrc::set_error(MRC_ERR_INTERNAL, "%s: internal error", fn);
  }
  return MRC_OK;
}
