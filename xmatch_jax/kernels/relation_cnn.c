// RDAN's relation CNN (eq 6) over a block of pair maps, forward only: an XLA FFI handler for the CPU.
//
// Compiled on first use by xmatch_jax/kernels/__init__.py with -DCHANNELS=<c> (a power of two): a
// position's channels are CHANNELS / VW native vectors, so each multiply-add of a 3x1, 1x3 or 3x3 tap is
// one broadcast FMA per vector, and JB output positions of RB rows accumulate in registers. Each thread keeps one
// pair's zero-haloed activation maps in its own scratch (~250 KB at the paper's sizes: in L2) and runs all
// four layers on it before the next pair; XLA:CPU instead writes every layer's maps of the whole block to
// memory (docs/architecture.md, "Compiled CPU kernels"). Pairs are split over XLA's own thread pool.
//
// Arguments (all float32): sim [b, C, k, n] (S), column_mask [C, n] (1 for a real word, 0 for padding),
// w1 [3, 1, 1, c], b1 [c], w2 [1, 3, c, c], b2 [c], w3 [3, 3, c, c], b3 [c], wo [1, 1, c, o], bo [o].
// Result: [o, b, C, k, n], the output layer's maps before the residual of eq 7.
// Padded columns are zeroed in S and after every ReLU layer, as rdan.relation_maps does.
#include "ffi_pool.h"

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
// Rows of output positions accumulated at once: two when a position's channels are one vector (each weight load
// then feeds twice as many FMAs), else one.
#define RB (NV == 1 ? 2 : 1)
// The most output positions of a row accumulated at once: RB * JBMAX * NV accumulators, NV weight vectors and a
// broadcast input stay in the registers. A row of n positions is cut into the fewest blocks of at most JBMAX, of
// sizes as equal as possible (n = 20: two of 10), so no block computes padding.
#define JB_FIT ((REGS - NV - 2) / (NV * RB))
#define JBMAX (JB_FIT > 16 ? 16 : (JB_FIT < 1 ? 1 : JB_FIT))
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
static inline vf relu(vf v) {
  vf zero = {0};
  return (vf)((vmask)v & (v > zero));
}

// One call's inputs and output.
typedef struct {
  int64_t b, c, k, n, o;
  const float *sim, *column_mask, *w1, *b1, *w2, *b2, *w3, *b3, *wo, *bo;
  float* wo_t;  // wo transposed, [o, c]
  float* out;
} Job;

#define CHUNK 8

// acc[r][jj] += sum over taps t and input channels ci of rows[r][t][jj * c + ci] * w[t][ci, :], for RB rows of jb
// output positions each (`rows[r][t]` is row r's input row for tap t, already shifted to the tap's column). jb is a
// constant at every call (see `row_block`), so the accumulators are registers.
static ALWAYS_INLINE void accumulate(vf acc[RB][JBMAX][NV], const float* rows[RB][9], int taps, int jb, const float* w) {
  for (int t = 0; t < taps; t++)
    for (int ci = 0; ci < CHANNELS; ci++) {
      vf wv[NV];
      for (int v = 0; v < NV; v++) wv[v] = vload(w + (t * CHANNELS + ci) * CHANNELS + v * VW);
      for (int r = 0; r < RB; r++)
        for (int jj = 0; jj < jb; jj++) {
          const float x = rows[r][t][jj * CHANNELS + ci];
          for (int v = 0; v < NV; v++) acc[r][jj][v] += x * wv[v];
        }
    }
}

// Maps of one pair: xs (S, masked, one channel), h1 and h2 (the first two layers' outputs, c channels), each with a
// zero halo of one position on every side and RB - 1 spare zero rows read by the last block of rows.
typedef struct {
  const Job* job;
  int64_t p, width;
  const float* m;  // the pair's column mask [n]
  float *xs, *h1, *h2;
} Pair;

// One block of RB rows from row i x jb positions from column j0: the 1x3 layer (h1 -> h2, ReLU, mask) when `taps`
// is 3, else the 3x3 layer and the 1x1 output layer (h2 -> out).
static ALWAYS_INLINE void block(const Pair* pr, int taps, int64_t i, int64_t j0, int jb) {
  const Job* job = pr->job;
  const int64_t k = job->k, n = job->n, width = pr->width;
  const float* bias = taps == 3 ? job->b2 : job->b3;
  vf acc[RB][JBMAX][NV];
  for (int r = 0; r < RB; r++)
    for (int jj = 0; jj < jb; jj++)
      for (int v = 0; v < NV; v++) acc[r][jj][v] = vload(bias + v * VW);
  const float* rows[RB][9];
  for (int r = 0; r < RB; r++)
    for (int a = 0; a < taps / 3; a++)
      for (int t = 0; t < 3; t++) {
        const int64_t row = taps == 3 ? i + r + 1 : i + r + a;  // the 1x3 layer reads only its own row
        rows[r][a * 3 + t] = (taps == 3 ? pr->h1 : pr->h2) + (row * width + j0 + t) * CHANNELS;
      }
  accumulate(acc, rows, taps, jb, taps == 3 ? job->w2 : job->w3);
  for (int r = 0; r < RB && i + r < k; r++)
    for (int jj = 0; jj < jb; jj++) {
      const float mask = pr->m[j0 + jj];
      if (taps == 3) {
        for (int v = 0; v < NV; v++)
          vstore(pr->h2 + ((i + r + 1) * width + j0 + jj + 1) * CHANNELS + v * VW, relu(acc[r][jj][v]) * mask);
        continue;
      }
      const int64_t pairs = job->b * job->c;
      for (int64_t q = 0; q < job->o; q++) {
        vf sum = {0};
        for (int v = 0; v < NV; v++) sum += relu(acc[r][jj][v]) * vload(job->wo_t + q * CHANNELS + v * VW);
        job->out[((q * pairs + pr->p) * k + i + r) * n + j0 + jj] = job->bo[q] + hsum(sum) * mask;
      }
    }
}

// `block` with jb as a constant: one specialisation per block width.
#define BLOCK_CASE(w) \
  case w:             \
    block(pr, taps, i, j0, w <= JBMAX ? w : JBMAX); \
    break;
static void row_block(const Pair* pr, int taps, int64_t i, int64_t j0, int64_t jb) {
  switch (jb) {
    BLOCK_CASE(1) BLOCK_CASE(2) BLOCK_CASE(3) BLOCK_CASE(4) BLOCK_CASE(5) BLOCK_CASE(6) BLOCK_CASE(7) BLOCK_CASE(8)
    BLOCK_CASE(9) BLOCK_CASE(10) BLOCK_CASE(11) BLOCK_CASE(12) BLOCK_CASE(13) BLOCK_CASE(14) BLOCK_CASE(15)
    BLOCK_CASE(16)
    default:
      abort();  // jb <= JBMAX <= 16
  }
}

// A 1x3 or 3x3 layer over the whole map: blocks of RB rows x the row's column blocks.
static void layer(const Pair* pr, int taps) {
  const int64_t k = pr->job->k, n = pr->job->n;
  const int64_t blocks = (n + JBMAX - 1) / JBMAX, base = n / blocks, wider = n % blocks;
  for (int64_t i = 0; i < k; i += RB)
    for (int64_t blk = 0, j0 = 0; blk < blocks; blk++) {
      const int64_t jb = base + (blk < wider);
      row_block(pr, taps, i, j0, jb);
      j0 += jb;
    }
}

static void pair_maps(const Pair* pr) {
  const Job* job = pr->job;
  const int64_t k = job->k, n = job->n, width = pr->width;
  const float* s = job->sim + pr->p * k * n;
  const float* m = pr->m;
  for (int64_t i = 0; i < k; i++)
    for (int64_t j = 0; j < n; j++) pr->xs[(i + 1) * width + j + 1] = s[i * n + j] * m[j];
  // 3x1 layer, 1 -> c channels.
  for (int64_t i = 0; i < k; i++)
    for (int64_t j = 0; j < n; j++)
      for (int v = 0; v < NV; v++) {
        vf acc = vload(job->b1 + v * VW);
        for (int a = 0; a < 3; a++) acc += pr->xs[(i + a) * width + j + 1] * vload(job->w1 + a * CHANNELS + v * VW);
        vstore(pr->h1 + ((i + 1) * width + j + 1) * CHANNELS + v * VW, relu(acc) * m[j]);
      }
  layer(pr, 3);  // 1x3, c -> c
  layer(pr, 9);  // 3x3, c -> c, and the 1x1 output layer
}

// Pairs [start, end) of the block; `scratch` holds a pair's three zero-haloed maps (see `Pair`).
static void pairs_chunk(const void* ctx, int64_t start, int64_t end, void* scratch) {
  const Job* job = ctx;
  const int64_t width = job->n + 2, height = job->k + 2 + RB - 1;
  const size_t map = (size_t)height * width;
  float* maps = scratch;
  Pair pr = {.job = job, .width = width, .h1 = maps, .h2 = maps + CHANNELS * map, .xs = maps + 2 * CHANNELS * map};
  for (int64_t p = start; p < end; p++) {
    pr.p = p;
    pr.m = job->column_mask + (p % job->c) * job->n;
    pair_maps(&pr);
  }
}

static void free_job(const void* ctx) {
  Job* job = (Job*)ctx;
  free(job->wo_t);
  free(job);
}

// The handler XLA calls (jax.ffi.register_ffi_target, platform 'cpu').
XLA_FFI_Error* RelationCnn(XLA_FFI_CallFrame* frame) {
  if (ffi_not_executing(frame)) return NULL;
  if (!ffi_counts(frame, 10, 1)) return ffi_error(frame->api, "relation_cnn: expected 10 buffer arguments, 1 result");
  const XLA_FFI_Buffer* sim = ffi_arg(frame, 0);
  const XLA_FFI_Buffer* wo = ffi_arg(frame, 8);
  if (sim->rank != 4 || wo->rank != 4)
    return ffi_error(frame->api, "relation_cnn: sim must be [b, C, k, n], wo [1, 1, c, o]");
  const int64_t b = sim->dims[0], c = sim->dims[1], k = sim->dims[2], n = sim->dims[3], o = wo->dims[3];
  const int64_t ch = CHANNELS;
  const int64_t dims[][4] = {{b, c, k, n}, {c, n}, {3, 1, 1, ch}, {ch}, {1, 3, ch, ch},
                             {ch},         {3, 3, ch, ch},      {ch},  {1, 1, ch, o}, {o}};
  const int64_t ranks[] = {4, 2, 4, 1, 4, 1, 4, 1, 4, 1};
  for (int i = 0; i < 10; i++)
    if (!ffi_shape_is(ffi_arg(frame, i), ranks[i], dims[i]))
      return ffi_error(frame->api, "relation_cnn: an argument has the wrong dtype or shape (see relation_cnn.c)");
  const int64_t out_dims[] = {o, b, c, k, n};
  XLA_FFI_Buffer* out = ffi_ret(frame, 0);
  if (!ffi_shape_is(out, 5, out_dims))
    return ffi_error(frame->api, "relation_cnn: the result must be float32 [o, b, C, k, n]");
  if (b * c * k * n == 0) return NULL;
  Job* job = calloc(1, sizeof(Job));
  if (job == NULL) return ffi_error(frame->api, "relation_cnn: out of memory");
  *job = (Job){.b = b, .c = c, .k = k, .n = n, .o = o};
  const float** inputs[] = {&job->sim, &job->column_mask, &job->w1, &job->b1, &job->w2,
                            &job->b2,  &job->w3,          &job->b3, &job->wo, &job->bo};
  for (int i = 0; i < 10; i++) *inputs[i] = (const float*)ffi_arg(frame, i)->data;
  job->out = (float*)out->data;
  job->wo_t = malloc((size_t)o * ch * sizeof(float));
  if (job->wo_t == NULL) {
    free(job);
    return ffi_error(frame->api, "relation_cnn: out of memory");
  }
  for (int64_t q = 0; q < o; q++)
    for (int64_t ci = 0; ci < ch; ci++) job->wo_t[q * ch + ci] = job->wo[ci * o + q];
  const size_t map = (size_t)(k + 2 + RB - 1) * (n + 2);
  if (parallel_for(frame, b * c, CHUNK, (2 * CHANNELS + 1) * map * sizeof(float), pairs_chunk, job, free_job) != 0)
    return ffi_error(frame->api, "relation_cnn: out of memory");
  return NULL;
}
