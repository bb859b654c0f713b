// RDAN's relation CNN (eq 6) over a block of pair maps, forward and backward: XLA FFI handlers for the CPU.
//
// Compiled on first use by xmatch_jax/kernels/__init__.py with -DCHANNELS=<c> (a power of two): a
// position's channels are CHANNELS / VW native vectors. The 1x3 and 3x3 layers run as Winograd's F(2, 3) and
// F(2x2, 3x3) (`winograd_layer`), whose channel sums are small matrix products with one broadcast FMA per vector and
// up to 16 tiles accumulating in registers. Each thread keeps one pair's zero-haloed activation maps in its own
// scratch (~250 KB at the paper's sizes: in L2) and runs all four layers on it before the next pair; XLA:CPU instead
// writes every layer's maps of the whole block to memory (docs/architecture.md, "Compiled CPU kernels"). Pairs are
// split over XLA's own thread pool.
//
// RelationCnn: the maps. Arguments (all float32): sim [b, C, k, n] (S), column_mask [C, n] (1 for a real word, 0
// for padding), w1 [3, 1, 1, c], b1 [c], w2 [1, 3, c, c], b2 [c], w3 [3, 3, c, c], b3 [c], wo [1, 1, c, o], bo [o].
// Result: [o, b, C, k, n], the output layer's maps before the residual of eq 7.
// Padded columns are zeroed in S and after every ReLU layer, as rdan.relation_maps does.
//
// RdanScores: the pair scores of eqs 7-11 from the same maps, which then never leave the thread's cache. Arguments:
// the ten above, then region_norms [b, k], word_norms [C, n], image_gram [b, k, k], text_gram [C, n, n] and
// params [6] = (lambda, 1 - mu, mu, use_residual, row pathway on, column pathway on). Result: scores [b, C], as
// rdan._dual_scores computes them.
//
// RelationCnnGrad: the backward pass of RelationCnn. Arguments: the ten above, then g [o, b, C, k, n] (the cotangent
// of its result). Results: dsim [b, C, k, n] and dw [ceil(b C / CHUNK), grad_size(o)], one row of weight-gradient
// sums per chunk of CHUNK pairs (a fixed split, so the sum over the rows does not depend on the threads). Each
// thread recomputes a pair's maps in its scratch and backpropagates them there.
#include <math.h>

#include "ffi_pool.h"
#include "vector_exp.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef CHANNELS
#error "compile with -DCHANNELS=<a power of two, 4 to 128>"
#endif

// The machine's vector width in floats and register count; CHANNELS / VW vectors hold one position's channels.
#if defined(__AVX512F__)
#define VW 16
#define REGS 32
#elif defined(__AVX__)
#define VW 8
#define REGS 16
#else
#define VW 4
#define REGS 16
#endif
#if CHANNELS < VW
#undef VW
#define VW CHANNELS
#endif
#define NV (CHANNELS / VW)
// Output channels are accumulated in groups of NVG vectors (all of them up to two vectors): with eight-float
// vectors at 32 channels, four vectors a tile would leave registers for two tiles a block; two-vector groups hold
// six, and each group re-reads the (cached) inputs.
#define NVG (NV > 2 ? 2 : NV)
#define NG (NV / NVG)
#define ALWAYS_INLINE inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vmask __attribute__((vector_size(VW * 4)));

static inline vf vload(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof v); }
// The sum of a vector's lanes (the 1x1 output layer's dot product, once per position and output), with the x86
// reductions where there are (16 channels, k 12, n 24: 4.8-5.2 ms per 1,024 pairs against 5.2-6.6 through memory).
#if defined(__AVX512F__) && VW == 16
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif defined(__AVX__) && VW == 8
static inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#elif defined(__SSE3__) && VW == 4
static inline float hsum(vf v) {
  const __m128 s = _mm_hadd_ps((__m128)v, (__m128)v);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#else
static inline float hsum(vf v) {
  float t[VW];
  memcpy(t, &v, sizeof t);
  for (int width = VW / 2; width > 0; width /= 2)
    for (int i = 0; i < width; i++) t[i] += t[i + width];
  return t[0];
}
#endif
// The lane sums of two vectors (the output layer's two maps at a position): with AVX-512 their halves are added side
// by side, 5 shuffles and adds for both instead of 4 each.
#if defined(__AVX512F__) && VW == 16
static inline void hsum2(vf a, vf b, float sums[2]) {
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)a, (__m512)b, 0x44),   // a's and b's 128-bit blocks 0, 1
                           _mm512_shuffle_f32x4((__m512)a, (__m512)b, 0xEE));  // + blocks 2, 3
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0xB1));  // blocks 0 and 1 hold a's 4-lane sums, 2 and 3 b's
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
  sums[0] = _mm512_cvtss_f32(s);
  sums[1] = _mm_cvtss_f32(_mm512_extractf32x4_ps(s, 2));
}
#else
static inline void hsum2(vf a, vf b, float sums[2]) { sums[0] = hsum(a), sums[1] = hsum(b); }
#endif
static inline vf relu(vf v) {
  vf zero = {0};
  return (vf)((vmask)v & (v > zero));
}
// mask ? a : b per lane; mask lanes are all ones or zero, as comparisons give.
static inline vf vselect(vmask mask, vf a, vf b) { return (vf)(((vmask)a & mask) | ((vmask)b & ~mask)); }
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
DEFINE_VEXP(vexp, vf, vmask)

// One call's inputs and output.
typedef struct {
  int64_t b, c, k, n, o;
  int64_t np, kp;  // n and k rounded up to whole vectors: the row strides of the score pathways' maps
  const float *sim, *column_mask, *w1, *b1, *w2, *b2, *w3, *b3, *wo, *bo;
  const float *region_norms, *word_norms, *image_gram, *text_gram, *params;  // RdanScores only (else NULL)
  float* wo_t;  // wo transposed, [o, c]
  // The kernels' Winograd transforms (`winograd_kernel`): w2's [4, c, c] and w3's [16, c, c]; u2b and u3b those of the
  // transposed convolutions (RelationCnnGrad only).
  float *u2, *u3, *u2b, *u3b;
  float* out;   // RelationCnn: the maps [o, b, C, k, n]; RdanScores: the scores [b, C]
  // RelationCnnGrad only (else NULL): the maps' cotangent g [o, b, C, k, n]; the results dsim [b, C, k, n] and dw, a
  // row of weight-gradient sums per chunk of pairs [chunks, GRAD_SIZE]; w2 and w3 flipped, in and out swapped (the
  // transposed convolutions' kernels).
  const float* g;
  float *dsim, *dw, *w2b, *w3b;
} Job;

#define CHUNK 8
#define EPS 1e-8f  // rdan._EPS, the cosine clamp

// Maps of one pair: xs (S, masked, one channel), h1 and h2 (the first two layers' outputs, c channels), each with a
// zero halo of one position on every side and one more row and column (`map_width`).
typedef struct {
  const Job* job;
  int64_t p, width;
  const float* m;  // the pair's column mask [n]
  int64_t ne;      // columns up to the last real word: the maps are computed there, the rest is padding
  float *xs, *h1, *h2;
  float *wv, *wm;  // `winograd_layer`'s transformed inputs and products of two output rows' tiles
  float *h3, *ga3, *ga2, *ga1;  // RelationCnnGrad: the 3x3 layer's output and the cotangents of the layers' inputs
  // to their ReLUs, zero-haloed as h1 and h2 (h3 NULL otherwise: the 3x3 layer then feeds the output layer)
  // Where the output layer writes: map out_q[t]'s value at (i, j) goes to out[t][i * out_rs[t] + j * out_cs[t]] for
  // each of the `outs` targets (RelationCnn: the result's maps; RdanScores: s1 and s2t below).
  int outs;
  int64_t out_q[2], out_rs[2], out_cs[2];
  float* out[2];
  // RdanScores' per-pair scratch (zero past the real sizes): s1 [k, np] (the first output map: S^1 before the
  // residual) with ss [k, np] (S), wt [k, np] (the column softmax) and wn [np] (word norms), for the
  // column-wise pathway, whose lanes are words; s2t [n, kp] (the last output map, S^2, transposed) with sst [n, kp]
  // (S transposed), at [n, kp] (the row softmax) and rnv [kp] (region norms), for the row-wise one, whose lanes are
  // regions. Both softmaxes then run along the vectors, without horizontal reductions.
  float *s1, *ss, *wt, *wn, *s2t, *sst, *at, *rnv;
} Pair;

// The 1x3 and 3x3 layers and their transposed convolutions as Winograd's minimal filtering (Lavin and Gray 2016,
// "Fast Algorithms for Convolutional Neural Networks"): F(2, 3) along a row, the 2 outputs A^T [U . (B^T d)] of the 4
// inputs d around them, and F(2x2, 3x3), the 2x2 outputs A^T [U . (B^T d B)] A of 4x4 inputs, where U = G w (1x3) or
// G w G^T (3x3) is the kernel's transform, per input and output channel, once per call (Job.u2, Job.u3). Summed over
// input channels, the 4 or 16 elementwise products are as many [tiles, c] x [c, c] matrix products: 2 multiply-adds
// an output and channel pair instead of 3 (1x3), 4 instead of 9 (3x3) (docs/architecture.md, "Compiled CPU kernels").
static const float WINO_G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};

// u [16, c, c] = G w G^T (taps 9, w [3, 3, c, c] HWIO; u[4 x + y][ci][co]) or u [4, c, c] = G w (taps 3,
// w [1, 3, c, c]).
static void winograd_kernel(const float* w, int taps, float* u) {
  const int64_t c = CHANNELS;
  for (int64_t ci = 0; ci < c; ci++)
    for (int64_t co = 0; co < c; co++) {
      float gw[4][3] = {{0}};  // G applied along the kernel's rows (taps 9) or its only row (taps 3)
      for (int x = 0; x < 4; x++)
        for (int b = 0; b < 3; b++)
          if (taps == 3)
            gw[x][b] = WINO_G[x][b] * w[(b * c + ci) * c + co];
          else
            for (int a = 0; a < 3; a++) gw[x][b] += WINO_G[x][a] * w[((a * 3 + b) * c + ci) * c + co];
      for (int x = 0; x < 4; x++) {
        if (taps == 3) {
          u[(x * c + ci) * c + co] = gw[x][0] + gw[x][1] + gw[x][2];
          continue;
        }
        for (int y = 0; y < 4; y++) {
          float sum = 0;
          for (int b = 0; b < 3; b++) sum += gw[x][b] * WINO_G[y][b];
          u[((x * 4 + y) * c + ci) * c + co] = sum;
        }
      }
    }
}

// Tiles whose products accumulate in registers at once (NVG vectors each).
#define TB_FIT ((REGS - NVG - 1) / NVG)
#define TBMAX (TB_FIT > 16 ? 16 : TB_FIT)

// m[t] = v[t] u for tb tiles (v and m rows of c floats, u [c, c]); tb is a constant at every call.
static ALWAYS_INLINE void tile_products(const float* v, const float* u, float* m, int tb) {
  for (int g = 0; g < NG; g++) {
    const int64_t first = g * NVG * VW;
    vf acc[TBMAX][NVG];
    for (int t = 0; t < tb; t++)
      for (int x = 0; x < NVG; x++) acc[t][x] = (vf){0};
    for (int ci = 0; ci < CHANNELS; ci++) {
      vf wv[NVG];
      for (int x = 0; x < NVG; x++) wv[x] = vload(u + ci * CHANNELS + first + x * VW);
      for (int t = 0; t < tb; t++) {
        const float d = v[t * CHANNELS + ci];
        for (int x = 0; x < NVG; x++) acc[t][x] += d * wv[x];
      }
    }
    for (int t = 0; t < tb; t++)
      for (int x = 0; x < NVG; x++) vstore(m + t * CHANNELS + first + x * VW, acc[t][x]);
  }
}

#define PRODUCTS_CASE(w) \
  case w:                \
    tile_products(v, u, m, w <= TBMAX ? w : TBMAX); \
    break;
static void tile_products_block(const float* v, const float* u, float* m, int64_t tb) {
  switch (tb) {
    PRODUCTS_CASE(1) PRODUCTS_CASE(2) PRODUCTS_CASE(3) PRODUCTS_CASE(4) PRODUCTS_CASE(5) PRODUCTS_CASE(6)
    PRODUCTS_CASE(7) PRODUCTS_CASE(8) PRODUCTS_CASE(9) PRODUCTS_CASE(10) PRODUCTS_CASE(11) PRODUCTS_CASE(12)
    PRODUCTS_CASE(13) PRODUCTS_CASE(14) PRODUCTS_CASE(15) PRODUCTS_CASE(16)
    default:
      abort(); /* tb <= TBMAX <= 16 */
  }
}

// A layer's output at (i, j) from y, its convolution there (no bias): the forward 1x3 layer's h2 = ReLU(y + b2) * mask;
// the 3x3 layer's h3 (RelationCnnGrad), or the 1x1 output layer's values at the call's targets; with `back`, the
// transposed convolution's cotangent through the ReLU below, ga1 = y * (h1 > 0) (1x3) or ga2 = y * (h2 > 0) (3x3).
static ALWAYS_INLINE void finish(const Pair* pr, int taps, int back, int64_t i, int64_t j, const vf y[NV]) {
  const Job* job = pr->job;
  const int64_t at = ((i + 1) * pr->width + j + 1) * CHANNELS;
  const float mask = pr->m[j];
  const vf zero = {0};
  if (back) {
    const float* h = taps == 3 ? pr->h1 : pr->h2;
    float* ga = taps == 3 ? pr->ga1 : pr->ga2;
    for (int v = 0; v < NV; v++) vstore(ga + at + v * VW, vselect(vload(h + at + v * VW) > zero, y[v], zero));
    return;
  }
  const float* bias = taps == 3 ? job->b2 : job->b3;
  if (taps == 3 || pr->h3) {
    float* h = (taps == 3 ? pr->h2 : pr->h3) + at;
    for (int v = 0; v < NV; v++) vstore(h + v * VW, relu(y[v] + vload(bias + v * VW)) * mask);
    return;
  }
  vf sums[2] = {zero, zero};
  for (int v = 0; v < NV; v++) {
    const vf h = relu(y[v] + vload(bias + v * VW));
    for (int64_t q = 0; q < job->o; q++) sums[q] += h * vload(job->wo_t + q * CHANNELS + v * VW);
  }
  float values[2];
  if (job->o == 2)
    hsum2(sums[0], sums[1], values);
  else
    values[0] = hsum(sums[0]);
  for (int64_t q = 0; q < job->o; q++) values[q] = job->bo[q] + values[q] * mask;
  for (int t = 0; t < pr->outs; t++) pr->out[t][i * pr->out_rs[t] + j * pr->out_cs[t]] = values[pr->out_q[t]];
}

// The 1x3 (`taps` 3: h1 -> h2) or 3x3 layer (`taps` 9: h2 -> h3 or the output layer) over the pair's first ne columns,
// or with `back` its transposed convolution (ga2 -> ga1, ga3 -> ga2; the kernels flipped, in and out swapped), each
// output through `finish`. Two output rows at a time: their tiles' transformed inputs (pr->wv) and products (pr->wm),
// [4 or 16, tiles, c], stay in L1. The inputs' zero halo covers the tiles past the last row or column (`zero_past`).
static ALWAYS_INLINE void winograd_layer(const Pair* pr, int taps, int back) {
  const Job* job = pr->job;
  const int64_t k = job->k, ne = pr->ne, width = pr->width, c = CHANNELS;
  const int64_t row_tiles = (ne + 1) / 2, tiles = taps == 3 ? 2 * row_tiles : row_tiles;
  const int64_t blocks = (tiles + TBMAX - 1) / TBMAX, terms = taps == 3 ? 4 : 16;
  const float* in = taps == 3 ? (back ? pr->ga2 : pr->h1) : (back ? pr->ga3 : pr->h2);
  const float* u = taps == 3 ? (back ? job->u2b : job->u2) : (back ? job->u3b : job->u3);
  float *wv = pr->wv, *wm = pr->wm;
  for (int64_t i0 = 0; i0 < k; i0 += 2) {
    // B^T d (B): d the inputs from the outputs' first tap, (i0 + a + 1, 2 t) (1x3: rows a = 0, 1) or (i0, 2 t) (3x3) of
    // the haloed map.
    for (int64_t t = 0; t < tiles; t++)
      for (int v = 0; v < NV; v++) {
        if (taps == 3) {
          const float* d = in + ((i0 + t / row_tiles + 1) * width + 2 * (t % row_tiles)) * c + v * VW;
          const vf d0 = vload(d), d1 = vload(d + c), d2 = vload(d + 2 * c), d3 = vload(d + 3 * c);
          const vf e[4] = {d0 - d2, d1 + d2, d2 - d1, d1 - d3};
          for (int x = 0; x < 4; x++) vstore(wv + (x * tiles + t) * c + v * VW, e[x]);
          continue;
        }
        const float* d = in + (i0 * width + 2 * t) * c + v * VW;
        vf r[4][4];
        for (int y = 0; y < 4; y++) {
          const vf d0 = vload(d + y * c), d1 = vload(d + (width + y) * c), d2 = vload(d + (2 * width + y) * c),
                   d3 = vload(d + (3 * width + y) * c);
          r[0][y] = d0 - d2, r[1][y] = d1 + d2, r[2][y] = d2 - d1, r[3][y] = d1 - d3;
        }
        for (int x = 0; x < 4; x++) {
          const vf e[4] = {r[x][0] - r[x][2], r[x][1] + r[x][2], r[x][2] - r[x][1], r[x][1] - r[x][3]};
          for (int y = 0; y < 4; y++) vstore(wv + ((x * 4 + y) * tiles + t) * c + v * VW, e[y]);
        }
      }
    for (int e = 0; e < terms; e++)
      for (int64_t blk = 0, t0 = 0; blk < blocks; blk++) {
        const int64_t tb = tiles / blocks + (blk < tiles % blocks);
        tile_products_block(wv + (e * tiles + t0) * c, u + e * c * c, wm + (e * tiles + t0) * c, tb);
        t0 += tb;
      }
    // A^T M (A), then each output's epilogue.
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t i = taps == 3 ? i0 + t / row_tiles : i0, j = 2 * (taps == 3 ? t % row_tiles : t);
      vf y[2][2][NV];  // [row][column]: the 1x3 layer's tile is row 0
      for (int v = 0; v < NV; v++) {
        vf r[2][4];
        for (int col = 0; col < (taps == 3 ? 1 : 4); col++) {
          vf m[4];
          for (int x = 0; x < 4; x++) m[x] = vload(wm + ((taps == 3 ? x : x * 4 + col) * tiles + t) * c + v * VW);
          r[0][col] = m[0] + m[1] + m[2], r[1][col] = m[1] - m[2] - m[3];
        }
        if (taps == 3) {
          y[0][0][v] = r[0][0], y[0][1][v] = r[1][0];
          continue;
        }
        for (int a = 0; a < 2; a++)
          y[a][0][v] = r[a][0] + r[a][1] + r[a][2], y[a][1][v] = r[a][1] - r[a][2] - r[a][3];
      }
      for (int a = 0; a < (taps == 3 ? 1 : 2) && i + a < k; a++)
        for (int b = 0; b < 2 && j + b < ne; b++) finish(pr, taps, back, i + a, j + b, y[a][b]);
    }
  }
}

// Zeroes columns ne and ne + 1 of a zero-haloed map (those left by a pair with more words): the last computed column
// reads column ne, and the last Winograd tile (odd ne) column ne + 1.
static void zero_past(const Pair* pr, float* map) {
  const int64_t last = pr->ne + 2 < pr->job->n ? pr->ne + 2 : pr->job->n;  // in haloed columns, + 1
  for (int64_t i = 1; i <= pr->job->k; i++)
    for (int64_t j = pr->ne + 1; j <= last; j++)
      memset(map + (i * pr->width + j) * CHANNELS, 0, CHANNELS * sizeof(float));
}

// The maps of one pair. Past the last real word (columns ne..n-1) every layer's maps are zero, as the masks make
// them, so only the first ne columns are computed (captions padded to a block's longest one skip the padding's
// work); the columns the last ones read are zeroed (`zero_past`), and the output there is the bias.
static void pair_maps(const Pair* pr) {
  const Job* job = pr->job;
  const int64_t k = job->k, n = job->n, ne = pr->ne, width = pr->width;
  const float* s = job->sim + pr->p * k * n;
  const float* m = pr->m;
  for (int64_t i = 0; i < k; i++)
    for (int64_t j = 0; j < n; j++) pr->xs[(i + 1) * width + j + 1] = s[i * n + j] * m[j];
  zero_past(pr, pr->h1);
  zero_past(pr, pr->h2);
  // 3x1 layer, 1 -> c channels.
  for (int64_t i = 0; i < k; i++)
    for (int64_t j = 0; j < ne; j++)
      for (int v = 0; v < NV; v++) {
        vf acc = vload(job->b1 + v * VW);
        for (int a = 0; a < 3; a++) acc += pr->xs[(i + a) * width + j + 1] * vload(job->w1 + a * CHANNELS + v * VW);
        vstore(pr->h1 + ((i + 1) * width + j + 1) * CHANNELS + v * VW, relu(acc) * m[j]);
      }
  winograd_layer(pr, 3, 0);  // 1x3, c -> c
  winograd_layer(pr, 9, 0);  // 3x3, c -> c, and the 1x1 output layer (or h3)
  for (int t = 0; t < pr->outs; t++)
    for (int64_t i = 0; i < k; i++)
      for (int64_t j = ne; j < n; j++) pr->out[t][i * pr->out_rs[t] + j * pr->out_cs[t]] = job->bo[pr->out_q[t]];
}

// sum over r < count of weights[r] * the vector at rows + r * stride, in four partial sums (a single sum would wait on
// each FMA's latency).
static inline vf weighted_rows(const float* weights, const float* rows, int64_t stride, int64_t count) {
  vf part[4] = {{0}, {0}, {0}, {0}};
  int64_t r = 0;
  for (; r + 4 <= count; r += 4)
    for (int u = 0; u < 4; u++) part[u] += weights[r + u] * vload(rows + (r + u) * stride);
  for (; r < count; r++) part[0] += weights[r] * vload(rows + r * stride);
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// cos = dot / max(norm_a sqrt(max(sq_norm_b, 0)), EPS), as rdan._cosine.
static inline float cosine(float dot, float norm_a, float sq_norm_b) {
  const float norm = norm_a * (sq_norm_b > 0 ? sqrtf(sq_norm_b) : 0.0f);
  return dot / (norm > EPS ? norm : EPS);
}

// The attention terms of one block of VW lanes, shared by both pathways: over `count` rows r (rows of a map at
// stride `stride`, row r skipped, weight 0, where `real` is given and real[r] is not > 0), w_r = softmax over the
// rows of lambda (map_r + residual * S_r) (written to `weights`); dot = sum_r w_r S_r scale[r] and quad = sum_r w_r
// sum_r' gram[r, r'] w_r' (gram rows at stride gram_stride), each lane on its own.
static void attention_terms(const float* map, const float* sim, float* weights, int64_t stride, int64_t count,
                            const float* real, const float* scale, const float* gram, int64_t gram_stride,
                            float lambda, int residual, vf* dot, vf* quad) {
  const vf zero = {0};
  vf top = zero - INFINITY;
  for (int64_t r = 0; r < count; r++) {
    if (real && !(real[r] > 0)) {
      vstore(weights + r * stride, zero);
      continue;
    }
    const vf x = (vload(map + r * stride) + (residual ? vload(sim + r * stride) : zero)) * lambda;
    vstore(weights + r * stride, x);
    top = vmax(top, x);
  }
  vf sum = zero;
  for (int64_t r = 0; r < count; r++)
    if (!real || real[r] > 0) {
      const vf e = vexp(vload(weights + r * stride) - top);
      vstore(weights + r * stride, e);
      sum += e;
    }
  *dot = zero;
  for (int64_t r = 0; r < count; r++) {
    const vf w = vload(weights + r * stride) / sum;
    vstore(weights + r * stride, w);
    *dot += w * vload(sim + r * stride) * scale[r];
  }
  *quad = zero;
  for (int64_t r = 0; r < count; r++)
    *quad += vload(weights + r * stride) * weighted_rows(gram + r * gram_stride, weights, stride, count);
}

// Row-wise pathway, eq 8, lanes = regions i: alpha_i = softmax over the real words j of lambda S^2_ij; R_r(i) =
// cos(v_i, a_i) with v_i . a_i = |v_i| sum_j alpha_ij S_ij |e_j| and |a_i|^2 = alpha_i^T G_txt alpha_i. Returns the
// mean of R_r over the regions.
static float row_pathway(const Pair* pr, float lambda, int residual) {
  const Job* job = pr->job;
  const int64_t k = job->k, n = job->n, kp = job->kp;
  const float* gram = job->text_gram + (pr->p % job->c) * n * n;
  const float* wn = job->word_norms + (pr->p % job->c) * n;
  float total = 0;
  for (int64_t u = 0; u < kp; u += VW) {
    vf dot, quad;
    attention_terms(pr->s2t + u, pr->sst + u, pr->at + u, kp, pr->ne, pr->m, wn, gram, n, lambda, residual, &dot,
                    &quad);
    const vf rn = vload(pr->rnv + u);
    float dots[VW], quads[VW], norms[VW];
    vstore(dots, rn * dot);
    vstore(quads, quad);
    vstore(norms, rn);
    for (int64_t l = 0; l < VW && u + l < k; l++) total += cosine(dots[l], norms[l], quads[l]);
  }
  return total / k;
}

// Column-wise pathway, eq 9, lanes = words j: beta_j = softmax over the regions i of lambda S^1_ij; R_w(j) =
// cos(e_j, b_j) with e_j . b_j = |e_j| sum_i beta_ij S_ij |v_i| and |b_j|^2 = beta_j^T G_img beta_j. Returns the mean
// of R_w over the real words.
static float column_pathway(const Pair* pr, float lambda, int residual) {
  const Job* job = pr->job;
  const int64_t k = job->k, np = job->np, ne = pr->ne;
  const float* gram = job->image_gram + (pr->p / job->c) * k * k;
  const float* rn = job->region_norms + (pr->p / job->c) * k;
  float total = 0;
  int64_t words = 0;
  for (int64_t v = 0; v < ne; v += VW) {
    vf dot, quad;
    attention_terms(pr->s1 + v, pr->ss + v, pr->wt + v, np, k, NULL, rn, gram, k, lambda, residual, &dot, &quad);
    float dots[VW], quads[VW];
    vstore(dots, dot * vload(pr->wn + v));
    vstore(quads, quad);
    for (int64_t l = 0; l < VW && v + l < ne; l++)
      if (pr->m[v + l] > 0) {
        total += cosine(dots[l], pr->wn[v + l], quads[l]);
        words++;
      }
  }
  return total / words;
}

// Eqs 7-11 for one pair from its output maps (pr->s1, pr->s2t): the pair's score.
static float pair_score(const Pair* pr) {
  const Job* job = pr->job;
  const int64_t k = job->k, n = job->n, np = job->np, kp = job->kp, ne = pr->ne;
  const float lambda = job->params[0];
  const int residual = job->params[3] != 0;
  const float* s = job->sim + pr->p * k * n;
  float score = 0;
  if (job->params[4] != 0) {
    for (int64_t i = 0; i < k; i++)
      for (int64_t j = 0; j < ne; j++) pr->sst[j * kp + i] = s[i * n + j];
    memcpy(pr->rnv, job->region_norms + (pr->p / job->c) * k, k * sizeof(float));
    score += job->params[1] * row_pathway(pr, lambda, residual);
  }
  if (job->params[5] != 0) {
    for (int64_t i = 0; i < k; i++) memcpy(pr->ss + i * np, s + i * n, ne * sizeof(float));
    memcpy(pr->wn, job->word_norms + (pr->p % job->c) * n, ne * sizeof(float));
    score += job->params[2] * column_pathway(pr, lambda, residual);
  }
  return score;
}

// Floats in a row of RelationCnnGrad's dw: the gradients of w1, b1, w2, b2, w3, b3, wo and bo, in that order, each in
// its argument's layout.
static int64_t grad_size(int64_t o) {
  const int64_t c = CHANNELS;
  return 3 * c + c + 3 * c * c + c + 9 * c * c + c + c * o + o;
}

// Input channels whose weight-gradient accumulators (NV vectors each) stay in registers in `weight_grad`.
#define CB_FIT ((REGS - NV - 2) / NV)
#define CB (CB_FIT >= CHANNELS ? CHANNELS : CB_FIT >= 16 ? 16 : CB_FIT >= 8 ? 8 : CB_FIT >= 4 ? 4 : CB_FIT >= 2 ? 2 : 1)

// A kh x kw layer's kernel gradient: dw[t][ci][co] += the sum over the pair's positions (i, j), j < ne, of
// in[(i, j) moved by tap t][ci] * ga[(i, j)][co] (in and ga zero-haloed maps of c channels).
static void weight_grad(const Pair* pr, const float* in, const float* ga, int kh, int kw, float* dw) {
  const int64_t k = pr->job->k, ne = pr->ne, width = pr->width;
  for (int a = 0; a < kh; a++)
    for (int b = 0; b < kw; b++)
      for (int ci0 = 0; ci0 < CHANNELS; ci0 += CB) {
        float* d = dw + ((a * kw + b) * CHANNELS + ci0) * CHANNELS;
        vf acc[CB][NV];
        for (int cb = 0; cb < CB; cb++)
          for (int v = 0; v < NV; v++) acc[cb][v] = vload(d + cb * CHANNELS + v * VW);
        for (int64_t i = 0; i < k; i++)
          for (int64_t j = 0; j < ne; j++) {
            const float* x = in + ((i + a + 1 - kh / 2) * width + j + b + 1 - kw / 2) * CHANNELS + ci0;
            const float* gp = ga + ((i + 1) * width + j + 1) * CHANNELS;
            vf gv[NV];
            for (int v = 0; v < NV; v++) gv[v] = vload(gp + v * VW);
            for (int cb = 0; cb < CB; cb++)
              for (int v = 0; v < NV; v++) acc[cb][v] += x[cb] * gv[v];
          }
        for (int cb = 0; cb < CB; cb++)
          for (int v = 0; v < NV; v++) vstore(d + cb * CHANNELS + v * VW, acc[cb][v]);
      }
}

// db += the sum of the map's channel vectors over the pair's first ne columns.
static void bias_grad(const Pair* pr, const float* ga, float* db) {
  const int64_t k = pr->job->k, ne = pr->ne, width = pr->width;
  for (int v = 0; v < NV; v++) {
    vf sum = vload(db + v * VW);
    for (int64_t i = 0; i < k; i++)
      for (int64_t j = 0; j < ne; j++) sum += vload(ga + ((i + 1) * width + j + 1) * CHANNELS + v * VW);
    vstore(db + v * VW, sum);
  }
}

// The backward pass of one pair's maps (RelationCnnGrad): adds its weight gradients to dw (a row of grad_size(o))
// and writes its dsim. The forward maps are recomputed into the thread's scratch (h3 kept), then each layer's
// cotangent is the transposed convolution of the one above through the ReLU and mask (both in `h > 0`: masked
// positions are zero). Padded columns past ne get no gradient but the output bias's.
static void pair_grad(const Pair* pr, float* dw) {
  const Job* job = pr->job;
  const int64_t k = job->k, n = job->n, ne = pr->ne, width = pr->width, o = job->o, c = CHANNELS;
  float *dw1 = dw, *db1 = dw1 + 3 * c, *dw2 = db1 + c, *db2 = dw2 + 3 * c * c, *dw3 = db2 + c, *db3 = dw3 + 9 * c * c;
  float *dwo = db3 + c, *dbo = dwo + c * o;
  pair_maps(pr);
  const float* g[2];
  for (int64_t q = 0; q < o; q++) {
    g[q] = job->g + (q * job->b * job->c + pr->p) * k * n;
    for (int64_t x = 0; x < k * n; x++) dbo[q] += g[q][x];
  }
  zero_past(pr, pr->ga3);
  zero_past(pr, pr->ga2);
  // The 1x1 output layer, then the 3x3 layer's ReLU: ga3 = (wo g) * (h3 > 0), dwo += h3 g.
  const vf zero = {0};
  vf gwo[2][NV];
  for (int64_t q = 0; q < o; q++)
    for (int v = 0; v < NV; v++) gwo[q][v] = zero;
  for (int64_t i = 0; i < k; i++)
    for (int64_t j = 0; j < ne; j++) {
      const int64_t at = ((i + 1) * width + j + 1) * c;
      for (int v = 0; v < NV; v++) {
        const vf h = vload(pr->h3 + at + v * VW);
        vf gh = zero;
        for (int64_t q = 0; q < o; q++) {
          const float gq = g[q][i * n + j];
          gh += gq * vload(job->wo_t + q * c + v * VW);
          gwo[q][v] += gq * h;
        }
        vstore(pr->ga3 + at + v * VW, vselect(h > zero, gh, zero));
      }
    }
  for (int64_t q = 0; q < o; q++) {
    float sums[CHANNELS];
    for (int v = 0; v < NV; v++) vstore(sums + v * VW, gwo[q][v]);
    for (int64_t ci = 0; ci < c; ci++) dwo[ci * o + q] += sums[ci];
  }
  bias_grad(pr, pr->ga3, db3);
  weight_grad(pr, pr->h2, pr->ga3, 3, 3, dw3);
  winograd_layer(pr, 9, 1);  // ga2
  bias_grad(pr, pr->ga2, db2);
  weight_grad(pr, pr->h1, pr->ga2, 1, 3, dw2);
  winograd_layer(pr, 3, 1);  // ga1
  bias_grad(pr, pr->ga1, db1);
  // The 3x1 layer over S (one input channel): dw1[a] += S moved by a - 1 times ga1, and dsim = m * (the sum over a
  // of w1[2 - a] . ga1 moved by a - 1).
  float* ds = job->dsim + pr->p * k * n;
  vf gw1[3][NV];
  for (int a = 0; a < 3; a++)
    for (int v = 0; v < NV; v++) gw1[a][v] = zero;
  for (int64_t i = 0; i < k; i++)
    for (int64_t j = 0; j < n; j++) {
      if (j >= ne || !(pr->m[j] > 0)) {
        ds[i * n + j] = 0;
        continue;
      }
      vf sum = zero;
      for (int a = 0; a < 3; a++)
        for (int v = 0; v < NV; v++) {
          sum += vload(job->w1 + (2 - a) * c + v * VW) * vload(pr->ga1 + ((i + a) * width + j + 1) * c + v * VW);
          gw1[a][v] += pr->xs[(i + a) * width + j + 1] * vload(pr->ga1 + ((i + 1) * width + j + 1) * c + v * VW);
        }
      ds[i * n + j] = hsum(sum) * pr->m[j];
    }
  for (int a = 0; a < 3; a++)
    for (int v = 0; v < NV; v++) vstore(dw1 + a * c + v * VW, vload(dw1 + a * c + v * VW) + gw1[a][v]);
}

// A pair's zero-haloed maps (see `Pair`) are k + 3 rows of n + 3 positions: a halo of one on every side and one more
// row and column, read by the last Winograd tiles when k or ne is odd.
static int64_t map_width(const Job* job) { return job->n + 3; }
static size_t map_floats(const Job* job) { return (size_t)(job->k + 3) * map_width(job); }
// Floats of `winograd_layer`'s scratch, wv and wm.
static size_t winograd_floats(const Job* job) { return 2 * 16 * (size_t)((job->n + 1) / 2) * CHANNELS; }

// Pairs [start, end) of RelationCnnGrad's block: their sums go to the chunk's row of dw.
static void grad_chunk(const void* ctx, int64_t start, int64_t end, void* scratch) {
  const Job* job = ctx;
  const int64_t n = job->n;
  const size_t map = map_floats(job);
  float* maps = scratch;
  Pair pr = {.job = job, .width = map_width(job), .xs = maps};
  float** fields[] = {&pr.h1, &pr.h2, &pr.h3, &pr.ga3, &pr.ga2, &pr.ga1};
  for (int a = 0; a < 6; a++) *fields[a] = maps + map + a * CHANNELS * map;
  pr.wv = maps + (6 * CHANNELS + 1) * map;
  pr.wm = pr.wv + winograd_floats(job) / 2;
  float* dw = job->dw + start / CHUNK * grad_size(job->o);
  memset(dw, 0, grad_size(job->o) * sizeof(float));
  for (int64_t p = start; p < end; p++) {
    pr.p = p;
    pr.m = job->column_mask + (p % job->c) * n;
    for (pr.ne = n; pr.ne > 0 && !(pr.m[pr.ne - 1] > 0);) pr.ne--;
    pair_grad(&pr, dw);
  }
}

// Floats of a thread's scratch: a pair's three zero-haloed maps, `winograd_layer`'s and, for RdanScores, its rows of
// np (see `Pair`).
static size_t scratch_floats(const Job* job) {
  const size_t scores = job->params ? (3 * job->k + 1) * job->np + (3 * job->n + 1) * job->kp : 0;
  return (2 * CHANNELS + 1) * map_floats(job) + winograd_floats(job) + scores;
}

// Pairs [start, end) of the block.
static void pairs_chunk(const void* ctx, int64_t start, int64_t end, void* scratch) {
  const Job* job = ctx;
  const int64_t k = job->k, n = job->n, np = job->np;
  const size_t map = map_floats(job);
  float* maps = scratch;
  Pair pr = {.job = job, .width = map_width(job), .h1 = maps, .h2 = maps + CHANNELS * map};
  pr.xs = maps + 2 * CHANNELS * map;
  pr.wv = pr.xs + map;
  pr.wm = pr.wv + winograd_floats(job) / 2;
  if (job->params) {
    const int64_t kp = job->kp;
    float** fields[] = {&pr.s1, &pr.ss, &pr.wt, &pr.wn, &pr.s2t, &pr.sst, &pr.at, &pr.rnv};
    const int64_t sizes[] = {k * np, k * np, k * np, np, n * kp, n * kp, n * kp, kp};
    float* next = pr.wv + winograd_floats(job);
    for (int a = 0; a < 8; a++) {
      *fields[a] = next;
      next += sizes[a];
    }
    pr.outs = 2;
    pr.out[0] = pr.s1, pr.out_q[0] = 0, pr.out_rs[0] = np, pr.out_cs[0] = 1;
    pr.out[1] = pr.s2t, pr.out_q[1] = job->o - 1, pr.out_rs[1] = 1, pr.out_cs[1] = kp;
  } else {
    pr.outs = job->o;
    for (int t = 0; t < job->o; t++) pr.out_q[t] = t, pr.out_rs[t] = n, pr.out_cs[t] = 1;
  }
  for (int64_t p = start; p < end; p++) {
    pr.p = p;
    pr.m = job->column_mask + (p % job->c) * n;
    for (pr.ne = n; pr.ne > 0 && !(pr.m[pr.ne - 1] > 0);) pr.ne--;
    if (!job->params)
      for (int t = 0; t < job->o; t++) pr.out[t] = job->out + (t * job->b * job->c + p) * k * n;
    pair_maps(&pr);
    if (job->params) job->out[p] = pair_score(&pr);
  }
}

static void free_job(const void* ctx) {
  Job* job = (Job*)ctx;
  free(job->wo_t);
  free(job->w2b);
  free(job->w3b);
  free(job->u2);
  free(job->u3);
  free(job->u2b);
  free(job->u3b);
  free(job);
}

// Checks the ten arguments both handlers share and fills a Job with them (NULL and *error set when they are wrong).
static Job* shared_job(XLA_FFI_CallFrame* frame, XLA_FFI_Error** error) {
  const XLA_FFI_Buffer* sim = ffi_arg(frame, 0);
  const XLA_FFI_Buffer* wo = ffi_arg(frame, 8);
  if (sim->rank != 4 || wo->rank != 4) {
    *error = ffi_error(frame->api, "relation_cnn: sim must be [b, C, k, n], wo [1, 1, c, o]");
    return NULL;
  }
  const int64_t b = sim->dims[0], c = sim->dims[1], k = sim->dims[2], n = sim->dims[3], o = wo->dims[3];
  const int64_t ch = CHANNELS;
  const int64_t dims[][4] = {{b, c, k, n}, {c, n}, {3, 1, 1, ch}, {ch}, {1, 3, ch, ch},
                             {ch},         {3, 3, ch, ch},      {ch},  {1, 1, ch, o}, {o}};
  const int64_t ranks[] = {4, 2, 4, 1, 4, 1, 4, 1, 4, 1};
  for (int i = 0; i < 10; i++)
    if (!ffi_shape_is(ffi_arg(frame, i), ranks[i], dims[i])) {
      *error = ffi_error(frame->api, "relation_cnn: an argument has the wrong dtype or shape (see relation_cnn.c)");
      return NULL;
    }
  Job* job = calloc(1, sizeof(Job));
  float* wo_t = malloc((size_t)o * ch * sizeof(float));
  float* u2 = malloc(4 * ch * ch * sizeof(float));
  float* u3 = malloc(16 * ch * ch * sizeof(float));
  if (job == NULL || wo_t == NULL || u2 == NULL || u3 == NULL) {
    free(job);
    free(wo_t);
    free(u2);
    free(u3);
    *error = ffi_error(frame->api, "relation_cnn: out of memory");
    return NULL;
  }
  *job = (Job){.b = b, .c = c, .k = k, .n = n, .o = o, .np = (n + VW - 1) / VW * VW, .kp = (k + VW - 1) / VW * VW,
                   .wo_t = wo_t, .u2 = u2, .u3 = u3};
  const float** inputs[] = {&job->sim, &job->column_mask, &job->w1, &job->b1, &job->w2,
                            &job->b2,  &job->w3,          &job->b3, &job->wo, &job->bo};
  for (int i = 0; i < 10; i++) *inputs[i] = (const float*)ffi_arg(frame, i)->data;
  for (int64_t q = 0; q < o; q++)
    for (int64_t ci = 0; ci < ch; ci++) job->wo_t[q * ch + ci] = job->wo[ci * o + q];
  winograd_kernel(job->w2, 3, job->u2);
  winograd_kernel(job->w3, 9, job->u3);
  *error = NULL;
  return job;
}

static XLA_FFI_Error* run(XLA_FFI_CallFrame* frame, Job* job) {
  const int64_t pairs = job->b * job->c;
  if (pairs * job->k * job->n == 0) {  // no region or word: scores are means over nothing, as on XLA
    if (job->params)
      for (int64_t p = 0; p < pairs; p++) job->out[p] = NAN;
    free_job(job);
    return NULL;
  }
  if (parallel_for(frame, pairs, CHUNK, scratch_floats(job) * sizeof(float), pairs_chunk, job, free_job) != 0)
    return ffi_error(frame->api, "relation_cnn: out of memory");
  return NULL;
}

// The handlers XLA calls (jax.ffi.register_ffi_target, platform 'cpu').
XLA_FFI_Error* RelationCnn(XLA_FFI_CallFrame* frame) {
  if (ffi_not_executing(frame)) return NULL;
  if (!ffi_counts(frame, 10, 1)) return ffi_error(frame->api, "RelationCnn: expected 10 buffer arguments, 1 result");
  XLA_FFI_Error* error;
  Job* job = shared_job(frame, &error);
  if (job == NULL) return error;
  const int64_t out_dims[] = {job->o, job->b, job->c, job->k, job->n};
  XLA_FFI_Buffer* out = ffi_ret(frame, 0);
  if (!ffi_shape_is(out, 5, out_dims) || job->o > 2) {
    free_job(job);
    return ffi_error(frame->api, "RelationCnn: the result must be float32 [o, b, C, k, n], o 1 or 2");
  }
  job->out = (float*)out->data;
  return run(frame, job);
}

XLA_FFI_Error* RdanScores(XLA_FFI_CallFrame* frame) {
  if (ffi_not_executing(frame)) return NULL;
  if (!ffi_counts(frame, 15, 1)) return ffi_error(frame->api, "RdanScores: expected 15 buffer arguments, 1 result");
  XLA_FFI_Error* error;
  Job* job = shared_job(frame, &error);
  if (job == NULL) return error;
  const int64_t b = job->b, c = job->c, k = job->k, n = job->n;
  const int64_t dims[][3] = {{b, k}, {c, n}, {b, k, k}, {c, n, n}, {6}};
  const int64_t ranks[] = {2, 2, 3, 3, 1};
  for (int i = 0; i < 5; i++)
    if (!ffi_shape_is(ffi_arg(frame, 10 + i), ranks[i], dims[i])) {
      free_job(job);
      return ffi_error(frame->api, "RdanScores: a norm, Gram or params argument has the wrong dtype or shape");
    }
  const int64_t out_dims[] = {b, c};
  XLA_FFI_Buffer* out = ffi_ret(frame, 0);
  if (!ffi_shape_is(out, 2, out_dims) || job->o > 2) {
    free_job(job);
    return ffi_error(frame->api, "RdanScores: the result must be float32 [b, C], from 1 or 2 output maps");
  }
  const float** inputs[] = {&job->region_norms, &job->word_norms, &job->image_gram, &job->text_gram, &job->params};
  for (int i = 0; i < 5; i++) *inputs[i] = (const float*)ffi_arg(frame, 10 + i)->data;
  job->out = (float*)out->data;
  return run(frame, job);
}

XLA_FFI_Error* RelationCnnGrad(XLA_FFI_CallFrame* frame) {
  if (ffi_not_executing(frame)) return NULL;
  if (!ffi_counts(frame, 11, 2)) return ffi_error(frame->api, "RelationCnnGrad: expected 11 buffer arguments, 2 results");
  XLA_FFI_Error* error;
  Job* job = shared_job(frame, &error);
  if (job == NULL) return error;
  const int64_t b = job->b, c = job->c, k = job->k, n = job->n, o = job->o, ch = CHANNELS;
  const int64_t pairs = b * c, chunks = (pairs + CHUNK - 1) / CHUNK;
  const int64_t g_dims[] = {o, b, c, k, n}, dsim_dims[] = {b, c, k, n}, dw_dims[] = {chunks, grad_size(o)};
  XLA_FFI_Buffer *dsim = ffi_ret(frame, 0), *dw = ffi_ret(frame, 1);
  if (o > 2 || !ffi_shape_is(ffi_arg(frame, 10), 5, g_dims) || !ffi_shape_is(dsim, 4, dsim_dims) ||
      !ffi_shape_is(dw, 2, dw_dims)) {
    free_job(job);
    return ffi_error(frame->api,
                     "RelationCnnGrad: g must be float32 [o, b, C, k, n] (o 1 or 2), the results [b, C, k, n] and "
                     "[ceil(b C / 8), weights]");
  }
  job->g = (const float*)ffi_arg(frame, 10)->data;
  job->dsim = (float*)dsim->data;
  job->dw = (float*)dw->data;
  job->w2b = malloc(3 * ch * ch * sizeof(float));
  job->w3b = malloc(9 * ch * ch * sizeof(float));
  job->u2b = malloc(4 * ch * ch * sizeof(float));
  job->u3b = malloc(16 * ch * ch * sizeof(float));
  if (job->w2b == NULL || job->w3b == NULL || job->u2b == NULL || job->u3b == NULL) {
    free_job(job);
    return ffi_error(frame->api, "RelationCnnGrad: out of memory");
  }
  // The transposed convolutions' kernels: taps flipped, in and out channels swapped.
  for (int64_t t = 0; t < 9; t++)
    for (int64_t ci = 0; ci < ch; ci++)
      for (int64_t co = 0; co < ch; co++) {
        job->w3b[(t * ch + co) * ch + ci] = job->w3[((8 - t) * ch + ci) * ch + co];
        if (t < 3) job->w2b[(t * ch + co) * ch + ci] = job->w2[((2 - t) * ch + ci) * ch + co];
      }
  winograd_kernel(job->w2b, 3, job->u2b);
  winograd_kernel(job->w3b, 9, job->u3b);
  if (pairs * k * n == 0) {  // nothing to differentiate: zero sums
    memset(job->dw, 0, chunks * grad_size(o) * sizeof(float));
    free_job(job);
    return NULL;
  }
  const size_t scratch = (6 * CHANNELS + 1) * map_floats(job) + winograd_floats(job);
  if (parallel_for(frame, pairs, CHUNK, scratch * sizeof(float), grad_chunk, job, free_job) != 0)
    return ffi_error(frame->api, "RelationCnnGrad: out of memory");
  return NULL;
}
