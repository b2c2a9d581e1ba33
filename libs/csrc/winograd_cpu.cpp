/*
 * Winograd F(4x4, 3x3) transforms for 3x3 / stride 1 / padding 1 convolutions on CPU.
 *
 * Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016). A 4x4 block
 * of outputs is Y = A^T [ U (.) V ] A with V = B^T d B (d: the 6x6 input tile around it,
 * zero outside the image), U = G g G^T (g: the 3x3 filter). Summed over input channels,
 * the product becomes 36 independent GEMMs M[xi] = V[xi] @ U[xi], which the caller runs
 * (torch.bmm): 36 multiplies per 16 outputs instead of 144, so 4x fewer FLOPs than the
 * direct convolution. These kernels do only the memory-bound parts, each one pass:
 *
 *   input:          x (NHWC, one image)  -> V[36, P, C]      V = B^T d B per tile
 *   output:         M[36, P, K]          -> y (NHWC)         y = A^T M A (+ bias, ReLU)
 *   output_adjoint: dy (NHWC)            -> dM[36, P, K]     dM = A dy A^T
 *   input_adjoint:  dV[36, P, C]         -> dx (NHWC, +=)    dx += B dV B^T
 *
 * The two adjoints are the transposes of the forward maps: with dU = V^T @ dM and
 * dV = dM @ U^T they give the exact gradients of the forward (training runs on them).
 *
 * All work on a band of tile rows [tile_row0, tile_row0 + tile_rows), numbered through
 * the batch (row g is tile row g % tiles_h of image g / tiles_h), so the caller keeps V
 * and M small (a few MB) whatever the image size, and batches many small maps (mask
 * head RoIs) into one GEMM. P = tile_rows * tiles_w; tile p covers output rows
 * 4 tr .. 4 tr + 3 and columns 4 tc .. 4 tc + 3 of its image (clipped); its input tile
 * starts one pixel up and left (the padding). Channels are processed 8 at a time: C and
 * K must be multiples of 8. float32 (the fast path) and float64 (for gradcheck).
 */
#include <omp.h>
#include <stdint.h>

/* Vector values cross only always-inline functions, so the baseline build's note that
 * AVX vectors change the calling convention does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#include "common.h"
#include "cpu_common.h"
#include "mrcnn_kernels.h"

namespace {

using mrc::resolve_threads;

/* Eight channels: one AVX2 register of floats (two of doubles), or SSE ones in the
 * generic build. `u` is the unaligned variant for loads and stores. */
template <typename T> struct Lanes;
template <> struct Lanes<float> {
  typedef float v __attribute__((vector_size(32)));
  typedef float u __attribute__((vector_size(32), aligned(4)));
};
template <> struct Lanes<double> {
  typedef double v __attribute__((vector_size(64)));
  typedef double u __attribute__((vector_size(64), aligned(8)));
};
template <typename T> using Vec = typename Lanes<T>::v;

template <typename T> MRC_INLINE Vec<T> load(const T* p) {
  return *reinterpret_cast<const typename Lanes<T>::u*>(p);
}
template <typename T> MRC_INLINE void store(T* p, Vec<T> v) {
  *reinterpret_cast<typename Lanes<T>::u*>(p) = v;
}
template <typename T> MRC_INLINE Vec<T> zero() { return Vec<T>{} ; }

/* The 1-D transforms on six (or four) values spaced `s` apart. */
template <typename V>
MRC_INLINE void bt6(const V* d, int s, V* o, int os) {  // o = B^T d
  const V d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
  o[0] = 4.0f * d0 - 5.0f * d2 + d4;
  o[os] = d3 + d4 - 4.0f * (d1 + d2);
  o[2 * os] = 4.0f * (d1 - d2) + d4 - d3;
  o[3 * os] = 2.0f * (d3 - d1) + d4 - d2;
  o[4 * os] = 2.0f * (d1 - d3) + d4 - d2;
  o[5 * os] = 4.0f * d1 - 5.0f * d3 + d5;
}

template <typename V>
MRC_INLINE void b6(const V* g, int s, V* o, int os) {  // o = B g (transpose of bt6)
  const V g0 = g[0], g1 = g[s], g2 = g[2 * s], g3 = g[3 * s], g4 = g[4 * s], g5 = g[5 * s];
  o[0] = 4.0f * g0;
  o[os] = 4.0f * (g2 - g1) + 2.0f * (g4 - g3) + 4.0f * g5;
  o[2 * os] = g0 * -5.0f - 4.0f * (g1 + g2) - g3 - g4;
  o[3 * os] = g1 - g2 + 2.0f * (g3 - g4) - 5.0f * g5;
  o[4 * os] = g0 + g1 + g2 + g3 + g4;
  o[5 * os] = g5;
}

template <typename V>
MRC_INLINE void at6(const V* m, int s, V* o, int os) {  // o = A^T m: 6 -> 4
  const V m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s], m4 = m[4 * s], m5 = m[5 * s];
  const V p12 = m1 + m2, n12 = m1 - m2, p34 = m3 + m4, n34 = m3 - m4;
  o[0] = m0 + p12 + p34;
  o[os] = n12 + 2.0f * n34;
  o[2 * os] = p12 + 4.0f * p34;
  o[3 * os] = n12 + 8.0f * n34 + m5;
}

template <typename V>
MRC_INLINE void a6(const V* y, int s, V* o, int os) {  // o = A y: 4 -> 6 (transpose of at6)
  const V y0 = y[0], y1 = y[s], y2 = y[2 * s], y3 = y[3 * s];
  const V p02 = y0 + y2, n13 = y1 + y3, q02 = y0 + 4.0f * y2, q13 = 2.0f * y1 + 8.0f * y3;
  o[0] = y0;
  o[os] = p02 + n13;
  o[2 * os] = p02 - n13;
  o[3 * os] = q02 + q13;
  o[4 * os] = q02 - q13;
  o[5 * os] = y3;
}

/* Tile rows are numbered through the batch: global row g is row g % tiles_h of image
 * g / tiles_h, so one band (and one GEMM) can span many small images. */
struct Band {
  int64_t N, H, W, C, row0, rows, tiles_w;
  int64_t P() const { return rows * tiles_w; }
  int64_t tiles_h() const { return (H + 3) / 4; }
  /* Tile p of the band: its image, tile row in that image, tile column. */
  void locate(int64_t p, int64_t* n, int64_t* tr, int64_t* tc) const {
    const int64_t g = row0 + p / tiles_w;
    *n = g / tiles_h();
    *tr = g % tiles_h();
    *tc = p % tiles_w;
  }
  int64_t image_size() const { return H * W * C; }
};

/* ------------------------------------------------------------------------ the kernels */

template <typename T>
MRC_INLINE void input_tile(const T* x, T* V, const Band& b, int64_t p) {
  int64_t n, tr, tc;
  b.locate(p, &n, &tr, &tc);
  x += n * b.image_size();
  const int64_t y0 = 4 * tr - 1, x0 = 4 * tc - 1, P = b.P(), C = b.C;
  const bool inside = y0 >= 0 && x0 >= 0 && y0 + 6 <= b.H && x0 + 6 <= b.W;
  for (int64_t c = 0; c < C; c += 8) {
    Vec<T> d[36], t[36], v[36];
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 6; ++j) {
        const int64_t yy = y0 + i, xx = x0 + j;
        d[i * 6 + j] = (inside || (yy >= 0 && yy < b.H && xx >= 0 && xx < b.W))
                           ? load(x + (yy * b.W + xx) * C + c) : zero<T>();
      }
    for (int j = 0; j < 6; ++j) bt6(d + j, 6, t + j, 6);
    for (int i = 0; i < 6; ++i) bt6(t + 6 * i, 1, v + 6 * i, 1);
    for (int e = 0; e < 36; ++e) store(V + (e * P + p) * C + c, v[e]);
  }
}

template <typename T>
MRC_INLINE void output_tile(const T* M, const T* bias, T* y, const Band& b,
                            int64_t p, bool relu) {
  int64_t n, tr, tc;
  b.locate(p, &n, &tr, &tc);
  y += n * b.image_size();
  const int64_t P = b.P(), K = b.C;
  const int64_t rows = b.H - 4 * tr < 4 ? b.H - 4 * tr : 4;
  const int64_t cols = b.W - 4 * tc < 4 ? b.W - 4 * tc : 4;
  for (int64_t k = 0; k < K; k += 8) {
    Vec<T> m[36], s[24], o[16];
    for (int e = 0; e < 36; ++e) m[e] = load(M + (e * P + p) * K + k);
    for (int j = 0; j < 6; ++j) at6(m + j, 6, s + j, 6);
    for (int i = 0; i < 4; ++i) at6(s + 6 * i, 1, o + 4 * i, 1);
    const Vec<T> bk = bias ? load(bias + k) : zero<T>();
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j) {
        Vec<T> r = o[i * 4 + j] + bk;
        if (relu) r = r < 0 ? zero<T>() : r;  // keeps NaN, as torch's ReLU
        store(y + ((4 * tr + i) * b.W + 4 * tc + j) * K + k, r);
      }
  }
}

template <typename T>
MRC_INLINE void output_adjoint_tile(const T* dy, T* dM, const Band& b, int64_t p) {
  int64_t n, tr, tc;
  b.locate(p, &n, &tr, &tc);
  dy += n * b.image_size();
  const int64_t P = b.P(), K = b.C;
  for (int64_t k = 0; k < K; k += 8) {
    Vec<T> g[16], s[24], m[36];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = 4 * tr + i, xx = 4 * tc + j;
        g[i * 4 + j] = (yy < b.H && xx < b.W) ? load(dy + (yy * b.W + xx) * K + k) : zero<T>();
      }
    for (int j = 0; j < 4; ++j) a6(g + j, 4, s + j, 4);      // s[6][4]
    for (int i = 0; i < 6; ++i) a6(s + 4 * i, 1, m + 6 * i, 1);
    for (int e = 0; e < 36; ++e) store(dM + (e * P + p) * K + k, m[e]);
  }
}

template <typename T>
MRC_INLINE void input_adjoint_tile(const T* dV, T* dx, const Band& b, int64_t p) {
  int64_t n, tr, tc;
  b.locate(p, &n, &tr, &tc);
  dx += n * b.image_size();
  const int64_t y0 = 4 * tr - 1, x0 = 4 * tc - 1, P = b.P(), C = b.C;
  for (int64_t c = 0; c < C; c += 8) {
    Vec<T> g[36], t[36], d[36];
    for (int e = 0; e < 36; ++e) g[e] = load(dV + (e * P + p) * C + c);
    for (int j = 0; j < 6; ++j) b6(g + j, 6, t + j, 6);
    for (int i = 0; i < 6; ++i) b6(t + 6 * i, 1, d + 6 * i, 1);
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 6; ++j) {
        const int64_t yy = y0 + i, xx = x0 + j;
        if (yy < 0 || yy >= b.H || xx < 0 || xx >= b.W) continue;
        T* q = dx + (yy * b.W + xx) * C + c;
        store(q, load(q) + d[i * 6 + j]);
      }
  }
}

/* U[e][c][k..k+8] for e = 6a + b: (G g G^T)[a][b] of the filters g = weight[k..k+8][c],
 * read from the filters laid out [C, 3, 3, K] (wt), eight output channels at a time. */
template <typename T>
MRC_INLINE void weight_transform(const T* wt, T* U, int64_t K, int64_t C, int64_t c,
                                 int64_t k) {
  const T quarter = T(1) / 4, sixth = T(-1) / 6, k24 = T(1) / 24, k12 = T(1) / 12,
          k6 = T(1) / 6;
  Vec<T> g[9], t[18], u[36];
  for (int i = 0; i < 9; ++i) g[i] = load(wt + (c * 9 + i) * K + k);
  for (int j = 0; j < 3; ++j) {  // t = G g: 3 -> 6 rows
    const Vec<T> g0 = g[j], g1 = g[3 + j], g2 = g[6 + j];
    t[j] = g0 * quarter;
    t[3 + j] = (g0 + g1 + g2) * sixth;
    t[6 + j] = (g0 - g1 + g2) * sixth;
    t[9 + j] = g0 * k24 + g1 * k12 + g2 * k6;
    t[12 + j] = g0 * k24 - g1 * k12 + g2 * k6;
    t[15 + j] = g2;
  }
  for (int a = 0; a < 6; ++a) {  // u = t G^T: 3 -> 6 columns
    const Vec<T> t0 = t[3 * a], t1 = t[3 * a + 1], t2 = t[3 * a + 2];
    u[6 * a] = t0 * quarter;
    u[6 * a + 1] = (t0 + t1 + t2) * sixth;
    u[6 * a + 2] = (t0 - t1 + t2) * sixth;
    u[6 * a + 3] = t0 * k24 + t1 * k12 + t2 * k6;
    u[6 * a + 4] = t0 * k24 - t1 * k12 + t2 * k6;
    u[6 * a + 5] = t2;
  }
  for (int e = 0; e < 36; ++e) store(U + (e * C + c) * K + k, u[e]);
}

/* Every kernel is compiled twice, for AVX2 and for the baseline, and picked at run time
 * (Kernels<T>::get); the parallel loops stay outside the target-specific code. */
template <typename T>
struct Kernels {
  void (*weight)(const T*, T*, int64_t, int64_t, int64_t);
  void (*input)(const T*, T*, const Band&, int64_t);
  void (*output)(const T*, const T*, T*, const Band&, int64_t, bool);
  void (*output_adjoint)(const T*, T*, const Band&, int64_t);
  void (*input_adjoint)(const T*, T*, const Band&, int64_t);
  static Kernels get();
};

#define MRC_KERNEL_SET(ATTR, SUFFIX)                                                      \
  template <typename T>                                                                   \
  ATTR void weight_##SUFFIX(const T* wt, T* U, int64_t K, int64_t C, int64_t c) {         \
    for (int64_t k = 0; k < K; k += 8) weight_transform(wt, U, K, C, c, k);               \
  }                                                                                       \
  template <typename T>                                                                   \
  ATTR void input_##SUFFIX(const T* x, T* V, const Band& b, int64_t p) {                  \
    input_tile(x, V, b, p);                                                               \
  }                                                                                       \
  template <typename T>                                                                   \
  ATTR void output_##SUFFIX(const T* M, const T* bias, T* y, const Band& b, int64_t p,    \
                            bool relu) {                                                  \
    output_tile(M, bias, y, b, p, relu);                                                  \
  }                                                                                       \
  template <typename T>                                                                   \
  ATTR void output_adjoint_##SUFFIX(const T* dy, T* dM, const Band& b, int64_t p) {       \
    output_adjoint_tile(dy, dM, b, p);                                                    \
  }                                                                                       \
  template <typename T>                                                                   \
  ATTR void input_adjoint_##SUFFIX(const T* dV, T* dx, const Band& b, int64_t p) {        \
    input_adjoint_tile(dV, dx, b, p);                                                     \
  }

MRC_KERNEL_SET(MRC_AVX2, avx2)
MRC_KERNEL_SET(, base)
#undef MRC_KERNEL_SET

template <typename T>
Kernels<T> Kernels<T>::get() {
  if (mrc::cpu_has_avx2())
    return {weight_avx2<T>, input_avx2<T>, output_avx2<T>, output_adjoint_avx2<T>,
            input_adjoint_avx2<T>};
  return {weight_base<T>, input_base<T>, output_base<T>, output_adjoint_base<T>,
          input_adjoint_base<T>};
}

int check(const char* fn, int dtype, const void* a, const void* out, const Band& b) {
  mrc::clear_error();
  if (dtype != MRC_F32 && dtype != MRC_F64)
    return mrc::set_error(MRC_ERR_INVALID, "%s: dtype %s is not supported (float32, float64)",
                          fn, mrc::dtype_name(dtype));
  if (!a || !out)
    return mrc::set_error(MRC_ERR_INVALID, "%s: null pointer", fn);
  if (b.N <= 0 || b.H <= 0 || b.W <= 0 || b.C <= 0 || b.C % 8 != 0)
    return mrc::set_error(MRC_ERR_INVALID,
                          "%s: need N, H, W > 0 and channels a positive multiple of 8, "
                          "got N=%lld H=%lld W=%lld C=%lld", fn, (long long)b.N,
                          (long long)b.H, (long long)b.W, (long long)b.C);
  const int64_t tiles_h = b.N * b.tiles_h();
  if (b.tiles_w != (b.W + 3) / 4 || b.row0 < 0 || b.rows <= 0 || b.row0 + b.rows > tiles_h)
    return mrc::set_error(MRC_ERR_INVALID,
                          "%s: band rows [%lld, %lld) / tiles_w %lld do not fit %lld %lldx%lld "
                          "maps (%lld x %lld tiles)", fn, (long long)b.row0,
                          (long long)(b.row0 + b.rows), (long long)b.tiles_w, (long long)b.N,
                          (long long)b.H, (long long)b.W, (long long)tiles_h,
                          (long long)((b.W + 3) / 4));
  return MRC_OK;
}

template <typename T>
void run_tiles(const Band& b, int num_threads, void (*tile)(const T*, T*, const Band&, int64_t),
               const void* in, void* out) {
#pragma omp parallel for num_threads(resolve_threads(num_threads)) schedule(static)
  for (int64_t p = 0; p < b.P(); ++p)
    tile(static_cast<const T*>(in), static_cast<T*>(out), b, p);
}

template <typename T>
void run_output(const Band& b, int num_threads, const void* M, const void* bias, void* y,
                bool relu) {
  const auto tile = Kernels<T>::get().output;
#pragma omp parallel for num_threads(resolve_threads(num_threads)) schedule(static)
  for (int64_t p = 0; p < b.P(); ++p)
    tile(static_cast<const T*>(M), static_cast<const T*>(bias), static_cast<T*>(y), b, p,
         relu);
}

/* Input tiles overlap their neighbours by two pixels: a thread owns whole tile rows, and
 * rows of one parity at a time (tiles two rows apart do not overlap, nor do tiles of two
 * images), so no two threads add to the same pixel. */
template <typename T>
void run_input_adjoint(const Band& b, int num_threads, const void* dV, void* dx) {
  const auto tile = Kernels<T>::get().input_adjoint;
  const int nt = resolve_threads(num_threads);
  for (int64_t parity = 0; parity < 2; ++parity) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = parity; r < b.rows; r += 2)
      for (int64_t tc = 0; tc < b.tiles_w; ++tc)
        tile(static_cast<const T*>(dV), static_cast<T*>(dx), b, r * b.tiles_w + tc);
  }
}

template <typename T>
void run_weight(const void* weight_ckk, void* U, int64_t K, int64_t C, int num_threads) {
  const auto rows = Kernels<T>::get().weight;
#pragma omp parallel for num_threads(resolve_threads(num_threads)) schedule(static)
  for (int64_t c = 0; c < C; ++c)
    rows(static_cast<const T*>(weight_ckk), static_cast<T*>(U), K, C, c);
}

/* f(float{}) or f(double{}): the extern functions' one switch on the dtype code. */
template <typename F>
void by_dtype(int dtype, F f) {
  if (dtype == MRC_F32)
    f(float{});
  else
    f(double{});
}

}  // namespace

extern "C" {

int mrc_winograd_input_cpu(int dtype, const void* x, void* V, int64_t N, int64_t H, int64_t W,
                           int64_t C, int64_t tile_row0, int64_t tile_rows, int64_t tiles_w,
                           int num_threads) {
  const Band b{N, H, W, C, tile_row0, tile_rows, tiles_w};
  if (int rc = check("winograd input", dtype, x, V, b)) return rc;
  by_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    run_tiles<T>(b, num_threads, Kernels<T>::get().input, x, V);
  });
  return MRC_OK;
}

int mrc_winograd_output_cpu(int dtype, const void* M, const void* bias, void* y, int64_t N,
                            int64_t H, int64_t W, int64_t K, int64_t tile_row0,
                            int64_t tile_rows, int64_t tiles_w, int relu, int num_threads) {
  const Band b{N, H, W, K, tile_row0, tile_rows, tiles_w};
  if (int rc = check("winograd output", dtype, M, y, b)) return rc;
  by_dtype(dtype, [&](auto t) {
    run_output<decltype(t)>(b, num_threads, M, bias, y, relu != 0);
  });
  return MRC_OK;
}

int mrc_winograd_output_adjoint_cpu(int dtype, const void* dy, void* dM, int64_t N, int64_t H,
                                    int64_t W, int64_t K, int64_t tile_row0,
                                    int64_t tile_rows, int64_t tiles_w, int num_threads) {
  const Band b{N, H, W, K, tile_row0, tile_rows, tiles_w};
  if (int rc = check("winograd output adjoint", dtype, dy, dM, b)) return rc;
  by_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    run_tiles<T>(b, num_threads, Kernels<T>::get().output_adjoint, dy, dM);
  });
  return MRC_OK;
}

int mrc_winograd_input_adjoint_cpu(int dtype, const void* dV, void* dx, int64_t N, int64_t H,
                                   int64_t W, int64_t C, int64_t tile_row0, int64_t tile_rows,
                                   int64_t tiles_w, int num_threads) {
  const Band b{N, H, W, C, tile_row0, tile_rows, tiles_w};
  if (int rc = check("winograd input adjoint", dtype, dV, dx, b)) return rc;
  by_dtype(dtype, [&](auto t) { run_input_adjoint<decltype(t)>(b, num_threads, dV, dx); });
  return MRC_OK;
}

int mrc_winograd_weight_cpu(int dtype, const void* weight_ckk, void* U, int64_t K, int64_t C,
                            int num_threads) {
  mrc::clear_error();
  if (dtype != MRC_F32 && dtype != MRC_F64)
    return mrc::set_error(MRC_ERR_INVALID,
                          "winograd weight: dtype %s is not supported (float32, float64)",
                          mrc::dtype_name(dtype));
  if (!weight_ckk || !U)
    return mrc::set_error(MRC_ERR_INVALID, "winograd weight: null pointer");
  if (K <= 0 || C <= 0 || K % 8 != 0)
    return mrc::set_error(MRC_ERR_INVALID,
                          "winograd weight: need C > 0 and K a positive multiple of 8, got "
                          "K=%lld C=%lld", (long long)K, (long long)C);
  by_dtype(dtype, [&](auto t) { run_weight<decltype(t)>(weight_ckk, U, K, C, num_threads); });
  return MRC_OK;
}

}  // extern "C"
