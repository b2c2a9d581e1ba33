/*
 * RoIAlign forward/backward on CUDA (libmrcnn_cuda.so). The per-element math is
 * kernel_math.h, the same code the CPU library runs (and that the CPU tests check).
 *
 * Forward: one thread per output element (grid-stride), NCHW or NHWC input, storage
 * float/double/half/bfloat16, accumulation in float (double for double).
 * Backward: atomicAdd per tap, or (deterministic != 0) an owner-computes variant: each
 * thread owns a strip of rows of one (image, channel) gradient plane and replays the
 * RoIs/bins/samples in the CPU order, adding only taps that land in its strip, so the
 * result is bit-identical run to run (and to the CPU library for float32/float64).
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_common.cuh"
#include "kernel_math.h"
#include "mrcnn_kernels.h"

namespace {

using mrc::AxisTap;
using mrc::RoiGeom;

/* What every thread of a launch needs besides the pointers (passed by value). */
struct Args {
  int64_t N, C, H, W;     /* images, channels, map size */
  int64_t K, PH, PW;      /* RoIs, pooled size */
  double scale;           /* spatial_scale */
  int64_t sampling_ratio; /* <= 0: adaptive */
  bool aligned;
};

template <typename S, typename A>
__device__ __forceinline__ RoiGeom<A> load_geom(const S* rois, int64_t k, const Args& a) {
  A r[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) r[i] = static_cast<A>(mrc::to_acc(rois[k * 5 + i]));
  return mrc::roi_geometry<A>(r, a.N, a.PH, a.PW, a.scale, a.sampling_ratio, a.aligned);
}

/* Calls f(ty, tx, w1, w2, w3, w4) for each valid sample of bin (ph, pw), in torchvision's
 * order (y-major); the weights are those of v[ylo, xlo], v[ylo, xhi], v[yhi, xlo],
 * v[yhi, xhi]. */
template <typename A, typename F>
__device__ __forceinline__ void for_each_sample(const RoiGeom<A>& g, int64_t ph, int64_t pw,
                                                const Args& a, F f) {
  for (int64_t iy = 0; iy < g.gh; ++iy) {
    AxisTap<A> ty;
    const A y = mrc::sample_coord(g.y0, ph, g.bin_h, iy, g.gh);
    if (!mrc::axis_tap(y, a.H, &ty)) continue;
    for (int64_t ix = 0; ix < g.gw; ++ix) {
      AxisTap<A> tx;
      const A x = mrc::sample_coord(g.x0, pw, g.bin_w, ix, g.gw);
      if (!mrc::axis_tap(x, a.W, &tx)) continue;
      f(ty, tx, ty.h * tx.h, ty.h * tx.l, ty.l * tx.h, ty.l * tx.l);
    }
  }
}

/* Output element idx of [K, C, PH, PW]: its RoI k, channel c and bin (ph, pw). */
struct OutIndex {
  int64_t k, c, ph, pw;
  __device__ OutIndex(int64_t idx, const Args& a)
      : k(idx / (a.PW * a.PH * a.C)), c((idx / (a.PW * a.PH)) % a.C),
        ph((idx / a.PW) % a.PH), pw(idx % a.PW) {}
};

template <typename S, bool NHWC>
__global__ void roi_align_fwd_kernel(int64_t total, const S* __restrict__ input,
                                     const S* __restrict__ rois, S* __restrict__ output,
                                     Args a) {
  typedef typename mrc::AccOf<S>::type A;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const OutIndex o(idx, a);
    const RoiGeom<A> g = load_geom<S, A>(rois, o.k, a);
    if (g.batch < 0) {
      output[idx] = mrc::from_acc<S>(static_cast<A>(0));
      continue;
    }
    const S* base = NHWC ? input + g.batch * a.H * a.W * a.C + o.c
                         : input + (g.batch * a.C + o.c) * a.H * a.W;
    const int64_t step = NHWC ? a.C : 1;
    A sum = static_cast<A>(0);
    for_each_sample(g, o.ph, o.pw, a,
                    [&](const AxisTap<A>& ty, const AxisTap<A>& tx, A w1, A w2, A w3, A w4) {
      const A v1 = mrc::to_acc(base[(ty.lo * a.W + tx.lo) * step]);
      const A v2 = mrc::to_acc(base[(ty.lo * a.W + tx.hi) * step]);
      const A v3 = mrc::to_acc(base[(ty.hi * a.W + tx.lo) * step]);
      const A v4 = mrc::to_acc(base[(ty.hi * a.W + tx.hi) * step]);
      sum += mrc::tap_sum(w1, w2, w3, w4, v1, v2, v3, v4);
    });
    output[idx] = mrc::from_acc<S>(sum / g.count);
  }
}

template <typename S>
__global__ void roi_align_bwd_atomic_kernel(int64_t total, const S* __restrict__ grad_out,
                                            const S* __restrict__ rois, S* __restrict__ grad_in,
                                            Args a) {
  typedef typename mrc::AccOf<S>::type A;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const OutIndex o(idx, a);
    const RoiGeom<A> g = load_geom<S, A>(rois, o.k, a);
    if (g.batch < 0) continue;
    const A grad = mrc::to_acc(grad_out[idx]);
    S* plane = grad_in + (g.batch * a.C + o.c) * a.H * a.W;
    for_each_sample(g, o.ph, o.pw, a,
                    [&](const AxisTap<A>& ty, const AxisTap<A>& tx, A w1, A w2, A w3, A w4) {
      mrc::atomic_add(plane + ty.lo * a.W + tx.lo, grad * w1 / g.count);
      mrc::atomic_add(plane + ty.lo * a.W + tx.hi, grad * w2 / g.count);
      mrc::atomic_add(plane + ty.hi * a.W + tx.lo, grad * w3 / g.count);
      mrc::atomic_add(plane + ty.hi * a.W + tx.hi, grad * w4 / g.count);
    });
  }
}

/* Deterministic backward: thread owns rows [r0, r0 + rows) of plane (n, c). */
static const int64_t kDetRows = 4;

template <typename S>
__device__ __forceinline__ void add_owned(S* plane, int64_t row, int64_t col, int64_t W,
                                          int64_t r0, int64_t r1,
                                          typename mrc::AccOf<S>::type v) {
  if (row >= r0 && row < r1) {
    S* p = plane + row * W + col;
    *p = mrc::from_acc<S>(mrc::to_acc(*p) + v);
  }
}

template <typename S>
__global__ void roi_align_bwd_det_kernel(int64_t total, const S* __restrict__ grad_out,
                                         const S* __restrict__ rois, S* __restrict__ grad_in,
                                         Args a) {
  const int64_t C = a.C, H = a.H, W = a.W, K = a.K, PH = a.PH, PW = a.PW;
  typedef typename mrc::AccOf<S>::type A;
  const int64_t strips = (H + kDetRows - 1) / kDetRows;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)blockDim.x * gridDim.x) {
    /* strip fastest: neighbouring threads share (n, c) and walk the same RoIs */
    const int64_t strip = idx % strips;
    const int64_t c = (idx / strips) % C;
    const int64_t n = idx / (strips * C);
    const int64_t r0 = strip * kDetRows;
    const int64_t r1 = r0 + kDetRows < H ? r0 + kDetRows : H;
    S* plane = grad_in + (n * C + c) * H * W;
    for (int64_t k = 0; k < K; ++k) {
      const RoiGeom<A> g = load_geom<S, A>(rois, k, a);
      if (g.batch != n) continue;
      {
        /* Rows this RoI can touch (conservative, one row of margin): its samples lie
         * between y0 and y0 + PH * bin_h, clamped into [0, H - 1]. Skip when it misses
         * the strip. NaN geometry is not skipped here (it contributes nothing anyway). */
        A ya = g.y0, yb = g.y0 + static_cast<A>(PH) * g.bin_h;
        if (yb < ya) { const A tmp = ya; ya = yb; yb = tmp; }
        if (ya == ya && yb == yb) {
          const A hm1 = static_cast<A>(H - 1);
          const int64_t ra = ya <= static_cast<A>(0) ? 0 : (ya >= hm1 ? H - 1 : (int64_t)ya);
          const int64_t rb = yb <= static_cast<A>(0) ? 0 : (yb >= hm1 ? H - 1 : (int64_t)yb + 1);
          if (rb < r0 - 1 || ra > r1) continue;
        }
      }
      const S* go = grad_out + (k * C + c) * PH * PW;
      for (int64_t ph = 0; ph < PH; ++ph) {
        bool ph_hits = false;
        for (int64_t iy = 0; iy < g.gh && !ph_hits; ++iy) {
          AxisTap<A> ty;
          const A y = mrc::sample_coord(g.y0, ph, g.bin_h, iy, g.gh);
          if (!mrc::axis_tap(y, H, &ty)) continue;
          ph_hits = (ty.lo >= r0 && ty.lo < r1) || (ty.hi >= r0 && ty.hi < r1);
        }
        if (!ph_hits) continue;
        for (int64_t pw = 0; pw < PW; ++pw) {
          A grad = static_cast<A>(0);
          bool have_grad = false;
          for (int64_t iy = 0; iy < g.gh; ++iy) {
            AxisTap<A> ty;
            const A y = mrc::sample_coord(g.y0, ph, g.bin_h, iy, g.gh);
            if (!mrc::axis_tap(y, H, &ty)) continue;
            const bool lo_in = ty.lo >= r0 && ty.lo < r1;
            const bool hi_in = ty.hi >= r0 && ty.hi < r1;
            if (!lo_in && !hi_in) continue;
            if (!have_grad) {
              grad = mrc::to_acc(go[ph * PW + pw]);
              have_grad = true;
            }
            for (int64_t ix = 0; ix < g.gw; ++ix) {
              AxisTap<A> tx;
              const A x = mrc::sample_coord(g.x0, pw, g.bin_w, ix, g.gw);
              if (!mrc::axis_tap(x, W, &tx)) continue;
              const A w1 = ty.h * tx.h, w2 = ty.h * tx.l, w3 = ty.l * tx.h, w4 = ty.l * tx.l;
              add_owned<S>(plane, ty.lo, tx.lo, W, r0, r1, grad * w1 / g.count);
              add_owned<S>(plane, ty.lo, tx.hi, W, r0, r1, grad * w2 / g.count);
              add_owned<S>(plane, ty.hi, tx.lo, W, r0, r1, grad * w3 / g.count);
              add_owned<S>(plane, ty.hi, tx.hi, W, r0, r1, grad * w4 / g.count);
            }
          }
        }
      }
    }
  }
}

const int kThreads = 256;        /* threads per block: forward and atomic backward */
const int kDetThreads = 128;     /* deterministic backward (more registers per thread) */

template <typename S>
int launch_fwd(const void* input, const void* rois, void* output, const Args& a, bool nhwc,
               cudaStream_t stream) {
  const int64_t total = a.K * a.C * a.PH * a.PW;
  const unsigned int grid = mrc::grid_for(total, kThreads);
  if (nhwc)
    roi_align_fwd_kernel<S, true><<<grid, kThreads, 0, stream>>>(
        total, (const S*)input, (const S*)rois, (S*)output, a);
  else
    roi_align_fwd_kernel<S, false><<<grid, kThreads, 0, stream>>>(
        total, (const S*)input, (const S*)rois, (S*)output, a);
  return mrc::check_launch("mrc_roi_align_forward_cuda");
}

template <typename S>
int launch_bwd(const void* grad_out, const void* rois, void* grad_in, const Args& a,
               bool deterministic, cudaStream_t stream) {
  if (deterministic) {
    const int64_t total = a.N * a.C * ((a.H + kDetRows - 1) / kDetRows);
    roi_align_bwd_det_kernel<S><<<mrc::grid_for(total, kDetThreads), kDetThreads, 0, stream>>>(
        total, (const S*)grad_out, (const S*)rois, (S*)grad_in, a);
  } else {
    const int64_t total = a.K * a.C * a.PH * a.PW;
    roi_align_bwd_atomic_kernel<S><<<mrc::grid_for(total, kThreads), kThreads, 0, stream>>>(
        total, (const S*)grad_out, (const S*)rois, (S*)grad_in, a);
  }
  return mrc::check_launch("mrc_roi_align_backward_cuda");
}

/* f(S{}) for the storage type of dtype (validated before: one of the four codes). */
template <typename F>
int by_dtype(int dtype, F f) {
  switch (dtype) {
    case MRC_F32: return f(float{});
    case MRC_F64: return f(double{});
    case MRC_F16: return f(__half{});
    default: return f(__nv_bfloat16{});
  }
}

}  // namespace

extern "C" {

int mrc_cuda_abi_version(void) { return MRC_ABI_VERSION; }
const char* mrc_cuda_last_error(void) { return mrc::last_error(); }

int mrc_roi_align_forward_cuda(int dtype, const void* input, const void* rois, void* output,
                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                               int64_t PH, int64_t PW, double spatial_scale,
                               int64_t sampling_ratio, int aligned, int channels_last,
                               void* stream) {
  static const char* fn = "mrc_roi_align_forward_cuda";
  int rc = mrc::check_roi_align_args(fn, dtype, true, input, rois, output, N, C, H, W, K, PH,
                                     PW, spatial_scale);
  if (rc) return rc;
  if (K == 0 || C == 0) return MRC_OK;
  if (N == 0 || H == 0 || W == 0) {
    /* no pixels: every output is 0 (async on the stream) */
    size_t es = dtype == MRC_F64 ? 8 : dtype == MRC_F32 ? 4 : 2;
    cudaError_t e = cudaMemsetAsync(output, 0, es * K * C * PH * PW, (cudaStream_t)stream);
    if (e != cudaSuccess)
      return mrc::set_error(MRC_ERR_CUDA, "%s: cudaMemsetAsync: %s", fn, cudaGetErrorString(e));
    return MRC_OK;
  }
  const Args a{N, C, H, W, K, PH, PW, spatial_scale, sampling_ratio, aligned != 0};
  return by_dtype(dtype, [&](auto s) {
    return launch_fwd<decltype(s)>(input, rois, output, a, channels_last != 0,
                                   (cudaStream_t)stream);
  });
}

int mrc_roi_align_backward_cuda(int dtype, const void* grad_output, const void* rois,
                                void* grad_input, int64_t N, int64_t C, int64_t H, int64_t W,
                                int64_t K, int64_t PH, int64_t PW, double spatial_scale,
                                int64_t sampling_ratio, int aligned, int deterministic,
                                void* stream) {
  static const char* fn = "mrc_roi_align_backward_cuda";
  int rc = mrc::check_roi_align_args(fn, dtype, true, grad_input, rois, grad_output, N, C, H,
                                     W, K, PH, PW, spatial_scale);
  if (rc) return rc;
  if (K == 0 || C == 0 || N == 0 || H == 0 || W == 0) return MRC_OK;
  const Args a{N, C, H, W, K, PH, PW, spatial_scale, sampling_ratio, aligned != 0};
  return by_dtype(dtype, [&](auto s) {
    return launch_bwd<decltype(s)>(grad_output, rois, grad_input, a, deterministic != 0,
                                   (cudaStream_t)stream);
  });
}

}  // extern "C"
