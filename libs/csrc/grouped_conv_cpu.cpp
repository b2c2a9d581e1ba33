/*
 * Grouped 3x3 / stride 1 / padding 1 convolutions on CPU, float32, NHWC, for inference:
 * the ResNeXt trunk's 32-group convs with 8 or 16 channels per group (in == out), where
 * oneDNN's grouped kernel runs at a fraction of the machine's speed (docs/benchmarks.md,
 * "X-101 grouped convs").
 *
 * Direct convolution, no im2col: a block of P output pixels of one row keeps a group's
 * CPG output channels in P * CPG / 8 AVX registers; every (tap, input channel) loads
 * CPG / 8 weight vectors once and multiplies them into the P pixels (broadcast input
 * values), so the loop does one load per FMA or less and stays FMA-bound (~80 % of one
 * core's FMA peak when the data is in cache). The groups are the inner loop over a
 * block (consecutive groups share the input's cache lines); the packed weights of all
 * groups (C * CPG * 9 floats: 72 KiB at res2, 288 KiB at res3) stream from L2. Work items
 * are tiles of rows x columns (see run). Border pixels (first and last column) run one
 * at a time without the taps that fall off the map; rows above / below the map skip
 * their three taps.
 */
#include <omp.h>
#include <stdint.h>

#include <new>
#include <vector>

/* Vector values cross only always-inline functions, so the baseline build's note that
 * AVX vectors change the calling convention does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#include "common.h"
#include "cpu_common.h"
#include "mrcnn_kernels.h"

/* The vector copy needs FMA on top of AVX2 (cpu_common.h's MRC_AVX2 does not ask for it). */
#if MRC_X86_DISPATCH
#define MRC_AVX2_FMA __attribute__((target("avx2,fma")))
#endif

namespace {

/* One image's geometry; C is the channel count of input and output (in == out). */
struct Geo {
  int64_t H, W, C;
};

/* Process-wide test hook (mrc_grouped_conv3x3_cpu_force_scalar). */
bool g_force_scalar = false;

bool use_avx2_fma() {
#if MRC_X86_DISPATCH
  static const bool has = mrc::cpu_has_avx2() && __builtin_cpu_supports("fma");
  return has && !g_force_scalar;
#else
  return false;
#endif
}

/* weight [C, CPG, 3, 3] (torch's grouped layout) -> packed [G][9][CPG in][CPG out]: one
 * (tap, input channel) of a group is a contiguous run of its CPG output channels. */
void pack_weight(const float* w, float* packed, int64_t C, int cpg) {
  for (int64_t co = 0; co < C; ++co) {
    const int64_t g = co / cpg, o = co % cpg;
    for (int ci = 0; ci < cpg; ++ci)
      for (int t = 0; t < 9; ++t)
        packed[((g * 9 + t) * cpg + ci) * cpg + o] = w[(co * cpg + ci) * 9 + t];
  }
}

/* ------------------------------------------------------------------ portable fallback */

/* Columns [x0, x1) of output row oy, every group, taps in the AVX2 copy's order. */
void segment_scalar(const float* x, const float* packed, const float* bias, float* y,
                    const Geo& s, int64_t oy, int64_t x0, int64_t x1, int cpg, bool relu) {
  float acc[16];
  for (int64_t ox = x0; ox < x1; ++ox)
    for (int64_t c0 = 0; c0 < s.C; c0 += cpg) {
      const float* wg = packed + (c0 / cpg) * 9 * cpg * cpg;
      for (int o = 0; o < cpg; ++o) acc[o] = bias[c0 + o];
      for (int ky = 0; ky < 3; ++ky) {
        const int64_t iy = oy + ky - 1;
        if (iy < 0 || iy >= s.H) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ix = ox + kx - 1;
          if (ix < 0 || ix >= s.W) continue;
          const float* px = x + (iy * s.W + ix) * s.C + c0;
          const float* wt = wg + (ky * 3 + kx) * cpg * cpg;
          for (int ci = 0; ci < cpg; ++ci)
            for (int o = 0; o < cpg; ++o) acc[o] += px[ci] * wt[ci * cpg + o];
        }
      }
      float* out = y + (oy * s.W + ox) * s.C + c0;
      for (int o = 0; o < cpg; ++o)
        out[o] = relu && acc[o] < 0.0f ? 0.0f : acc[o];  // keeps NaN, as torch's ReLU
    }
}

/* ----------------------------------------------------------------------- AVX2 + FMA */

#if MRC_X86_DISPATCH

/* P output pixels (oy, ox0 .. ox0 + P - 1) of the group at channel c0, over the taps
 * kx in [kx0, kx1) (the border pixels drop the column off the map). */
template <int CPG, int P>
MRC_AVX2_FMA MRC_INLINE void pixels_avx2(const float* x, const float* wg, const float* bias,
                                         float* y, const Geo& s, int64_t oy, int64_t ox0,
                                         int64_t c0, int kx0, int kx1, bool relu) {
  constexpr int V = CPG / 8;
  __m256 acc[P][V];
  for (int v = 0; v < V; ++v) {
    const __m256 b = _mm256_loadu_ps(bias + c0 + 8 * v);
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t iy = oy + ky - 1;
    if (iy < 0 || iy >= s.H) continue;
    for (int kx = kx0; kx < kx1; ++kx) {
      const float* px = x + (iy * s.W + ox0 + kx - 1) * s.C + c0;
      const float* wt = wg + (ky * 3 + kx) * CPG * CPG;
      /* Pixel p is read at q[p / 3] + (p % 3) * C + ci: a base, C scaled by 4 or 8 and a
       * constant, so the broadcasts need no address arithmetic (and 4 + 1 registers
       * instead of P pointers, which would spill). */
      const float* q[(P + 2) / 3];
      for (int i = 0; i < (P + 2) / 3; ++i) q[i] = px + 3 * i * s.C;
#pragma GCC unroll 16
      for (int ci = 0; ci < CPG; ++ci) {
        __m256 w[V];
        for (int v = 0; v < V; ++v) w[v] = _mm256_loadu_ps(wt + ci * CPG + 8 * v);
        for (int p = 0; p < P; ++p) {
          const __m256 b = _mm256_broadcast_ss(q[p / 3] + (p % 3) * s.C + ci);
          for (int v = 0; v < V; ++v) acc[p][v] = _mm256_fmadd_ps(b, w[v], acc[p][v]);
        }
      }
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  float* out = y + (oy * s.W + ox0) * s.C + c0;
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v)  // max(0, NaN) is NaN: keeps NaN, as torch's ReLU
      _mm256_storeu_ps(out + p * s.C + 8 * v, relu ? _mm256_max_ps(zero, acc[p][v])
                                                    : acc[p][v]);
}

/* Register blocks: CPG 8 -> 12 pixels x 1 vector, 16 -> 6 x 2 (12 accumulators, plus the
 * weight vectors and one broadcast, within the 16 ymm registers). */
template <int CPG> struct Block { static constexpr int P = 96 / CPG; };

/* Every group of the pixels ox0 .. ox0 + P - 1 (all taps when kx0 = 0, kx1 = 3). The
 * groups are the inner loop: a pixel's C channels are contiguous, so consecutive groups
 * read the same cache lines while they are in L1. Measured against a group-outer sweep
 * of whole rows: 1.25x (8 per group, res2 map) and 2.5x (16 per group, res3 map). */
template <int CPG, int P>
MRC_AVX2_FMA MRC_INLINE void all_groups(const float* x, const float* packed, const float* bias,
                                        float* y, const Geo& s, int64_t oy, int64_t ox0,
                                        int kx0, int kx1, bool relu) {
  for (int64_t c0 = 0; c0 < s.C; c0 += CPG)
    pixels_avx2<CPG, P>(x, packed + (c0 / CPG) * 9 * CPG * CPG, bias, y, s, oy, ox0, c0, kx0,
                        kx1, relu);
}

/* Columns [x0, x1) of output row oy: the border columns 0 and W - 1 one pixel at a time
 * without the taps off the map, the interior in blocks of P (then 4, then 1). */
template <int CPG>
MRC_AVX2_FMA void segment_avx2(const float* x, const float* packed, const float* bias,
                               float* y, const Geo& s, int64_t oy, int64_t x0, int64_t x1,
                               bool relu) {
  constexpr int P = Block<CPG>::P;
  int64_t ox = x0, end = x1 < s.W - 1 ? x1 : s.W - 1;  // interior: columns 1 .. W - 2
  if (ox == 0) all_groups<CPG, 1>(x, packed, bias, y, s, oy, ox++, 1, s.W > 1 ? 3 : 2, relu);
  for (; ox + P <= end; ox += P) all_groups<CPG, P>(x, packed, bias, y, s, oy, ox, 0, 3, relu);
  for (; ox + 4 <= end; ox += 4) all_groups<CPG, 4>(x, packed, bias, y, s, oy, ox, 0, 3, relu);
  for (; ox < end; ++ox) all_groups<CPG, 1>(x, packed, bias, y, s, oy, ox, 0, 3, relu);
  if (ox == s.W - 1 && ox < x1) all_groups<CPG, 1>(x, packed, bias, y, s, oy, ox, 0, 2, relu);
}

#endif

typedef void (*SegmentFn)(const float*, const float*, const float*, float*, const Geo&,
                          int64_t, int64_t, int64_t, bool);

/* The kernel for this CPU and channels per group; nullptr: the scalar one. */
SegmentFn vector_segment(int cpg) {
#if MRC_X86_DISPATCH
  if (use_avx2_fma()) return cpg == 8 ? segment_avx2<8> : segment_avx2<16>;
#endif
  (void)cpg;
  return nullptr;
}

/* Work items are tiles of up to kTileRows output rows x kTileCols columns, swept row by
 * row: the three input rows of a tile's row (3 x 50 pixels x C floats: 150 KiB at
 * C = 256) stay in L2 for the next two rows, where whole map rows (300 KiB each on the
 * res2 map) would not. Small maps get shorter tiles, so every thread has at least
 * kItemsPerThread of them. Dynamic scheduling: with two threads, a core shared with
 * another process would otherwise hold the other thread at the barrier. */
constexpr int64_t kTileRows = 16, kTileCols = 48, kItemsPerThread = 4;

void run(const float* x, const float* packed, const float* bias, float* y, int64_t N,
         const Geo& s, int cpg, bool relu, int num_threads) {
  const SegmentFn segment = vector_segment(cpg);
  const int threads = mrc::resolve_threads(num_threads);
  const int64_t image = s.H * s.W * s.C;
  const int64_t stripes = (s.W + kTileCols - 1) / kTileCols;
  const int64_t wanted = (N * s.H * stripes + kItemsPerThread * threads - 1) /
                         (kItemsPerThread * threads);
  const int64_t tile_rows = wanted < 1 ? 1 : wanted > kTileRows ? kTileRows : wanted;
  const int64_t bands = (s.H + tile_rows - 1) / tile_rows;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t item = 0; item < N * bands * stripes; ++item) {
    const int64_t n = item / (bands * stripes), band = item / stripes % bands;
    const int64_t x0 = item % stripes * kTileCols;
    const int64_t x1 = x0 + kTileCols < s.W ? x0 + kTileCols : s.W;
    const int64_t y1 = (band + 1) * tile_rows < s.H ? (band + 1) * tile_rows : s.H;
    const float* xn = x + n * image;
    float* yn = y + n * image;
    for (int64_t oy = band * tile_rows; oy < y1; ++oy) {
      if (segment)
        segment(xn, packed, bias, yn, s, oy, x0, x1, relu);
      else
        segment_scalar(xn, packed, bias, yn, s, oy, x0, x1, cpg, relu);
    }
  }
}

}  // namespace

extern "C" {

int mrc_grouped_conv3x3_cpu(int dtype, const void* x, const void* weight, const void* bias,
                            void* y, int64_t N, int64_t H, int64_t W, int64_t C,
                            int64_t groups, int relu, int num_threads) {
  mrc::clear_error();
  if (dtype != MRC_F32)
    return mrc::set_error(MRC_ERR_INVALID, "grouped conv3x3: dtype %s is not supported "
                          "(float32)", mrc::dtype_name(dtype));
  if (!x || !weight || !bias || !y)
    return mrc::set_error(MRC_ERR_INVALID, "grouped conv3x3: null pointer");
  if (N < 0 || H < 0 || W < 0 || groups <= 0 || C <= 0 || C % groups != 0 ||
      (C / groups != 8 && C / groups != 16))
    return mrc::set_error(MRC_ERR_INVALID,
                          "grouped conv3x3: need N, H, W >= 0 and C / groups 8 or 16, got "
                          "N=%lld H=%lld W=%lld C=%lld groups=%lld", (long long)N,
                          (long long)H, (long long)W, (long long)C, (long long)groups);
  if (N == 0 || H == 0 || W == 0) return MRC_OK;
  const int cpg = static_cast<int>(C / groups);
  std::vector<float> packed;
  try {
    packed.resize(static_cast<size_t>(C) * cpg * 9);
  } catch (const std::bad_alloc&) {
    return mrc::set_error(MRC_ERR_ALLOC, "grouped conv3x3: no memory for the weights");
  }
  pack_weight(static_cast<const float*>(weight), packed.data(), C, cpg);
  run(static_cast<const float*>(x), packed.data(), static_cast<const float*>(bias),
      static_cast<float*>(y), N, Geo{H, W, C}, cpg, relu != 0, num_threads);
  return MRC_OK;
}

int mrc_grouped_conv3x3_cpu_force_scalar(int on) {
  mrc::clear_error();
  g_force_scalar = on != 0;
  return MRC_OK;
}

}  // extern "C"
