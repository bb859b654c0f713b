// MMCA's cross attention (eqs 13-14) over a block of pairs, forward only: XLA FFI handlers for the CPU.
//
// Each query of an item (a region of an image, or a word of a caption) attends over its pair's joint sequence of
// keys: its own item's keys, whose exp-sum and weighted values do not depend on the other item and arrive
// precomputed (own_max, own_sum, own_out: mmca._own_attention), and the other item's keys, done here per pair. With
// XLA the per-pair logits of 16-dimensional heads ([b, C, h, q, m]) go to memory, through the exp and back into
// small batched matmuls, at a few percent of the matmul rate (docs/architecture.md, "Compiled CPU kernels"). Here
// 16 queries of one head are the lanes of a vector: a key's logits are HD broadcast FMAs, the softmax's max and sum
// are lane-wise (no horizontal reductions), padded keys are skipped, and only the result is written. Compiled with
// -DHEAD_DIM=<d / h> (a power of two) by xmatch_jax/kernels/__init__.py.
//
// Arguments (all float32), A items of queries against B items of keys, QP = Q rounded up to 16 (zero past Q):
//   qt [A, H, HD, QP] queries, transposed; k, v [B, M, H, HD] keys and values; key_mask [B, M] (1: a real key);
//   own_max, own_sum [A, H, QP] and own_out [A, H, HD, QP]: the own block's max logit, its exp-sum and weighted
//   values; scale [] (the logits' factor).
// Result: each query's attended values, heads concatenated: MmcaCrossImageMajor [A, B, Q, H * HD] (A = images:
// region queries, output [b, C, k, d]); MmcaCrossTextMajor [B, A, Q, H * HD] (A = captions: word queries, output
// [b, C, n, d]).
// Per query: joint = max(own_max, the real cross logits); e_j = exp(logit_j - joint);
// out = (exp(own_max - joint) own_out + sum_j e_j v_j) / (exp(own_max - joint) own_sum + sum_j e_j), as
// mmca._joint_attention computes it.
#include <math.h>

#include "ffi_pool.h"
#include "vector_exp.h"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<a power of two, 4 to 64>"
#endif

#define LW 16      // queries per vector
#define MAXM 256  // keys per item (mmca.uses_kernel checks it)
typedef float vl __attribute__((vector_size(LW * 4)));
typedef int32_t vli __attribute__((vector_size(LW * 4)));

static inline vl lbroadcast(float x) { return x - (vl){0}; }
// mask ? a : b per lane (C has no vector ?:); mask lanes are all ones or zero, as comparisons give.
static inline vl lselect(vli mask, vl a, vl b) { return (vl)(((vli)a & mask) | ((vli)b & ~mask)); }
static inline vl lload(const float* p) {
  vl v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline vl lmax(vl a, vl b) { return lselect(a > b, a, b); }

// exp on every lane (vector_exp.h); the logits here are <= 0 after the max is taken out.
DEFINE_VEXP(vexp, vl, vli)

typedef struct {
  int64_t a, b, q, qp, h, m;
  int text_major;
  const float *qt, *keys, *values, *key_mask, *own_max, *own_sum, *own_out;
  float scale;
  float* out;
} Job;

// Queries [g * LW, g * LW + LW) of item `a`, head hh, against item `b`'s real keys (`real`, `count` of them).
static void query_group(const Job* job, int64_t a, int64_t b, int64_t hh, int64_t g, const int32_t* real, int64_t count,
                        vl* logits) {
  const int64_t h = job->h, qp = job->qp, q = job->q, d = h * HEAD_DIM;
  const int64_t pair = job->text_major ? b * job->a + a : a * job->b + b;
  vl query[HEAD_DIM];
  for (int dd = 0; dd < HEAD_DIM; dd++) query[dd] = lload(job->qt + ((a * h + hh) * HEAD_DIM + dd) * qp + g * LW);
  const int64_t stat = (a * h + hh) * qp + g * LW;
  const vl own_max = lload(job->own_max + stat);
  vl joint = own_max;
  for (int64_t r = 0; r < count; r++) {
    const float* key = job->keys + (((b * job->m) + real[r]) * h + hh) * HEAD_DIM;
    vl logit = (vl){0};
    for (int dd = 0; dd < HEAD_DIM; dd++) logit += query[dd] * key[dd];
    logits[r] = logit * job->scale;
    joint = lmax(joint, logits[r]);
  }
  const vl rescale = vexp(own_max - joint);
  vl denominator = rescale * lload(job->own_sum + stat);
  vl numerator[HEAD_DIM];
  for (int dd = 0; dd < HEAD_DIM; dd++)
    numerator[dd] = rescale * lload(job->own_out + ((a * h + hh) * HEAD_DIM + dd) * qp + g * LW);
  for (int64_t r = 0; r < count; r++) {
    const vl e = vexp(logits[r] - joint);
    denominator += e;
    const float* value = job->values + (((b * job->m) + real[r]) * h + hh) * HEAD_DIM;
    for (int dd = 0; dd < HEAD_DIM; dd++) numerator[dd] += e * value[dd];
  }
  const int64_t lanes = q - g * LW < LW ? q - g * LW : LW;
  for (int dd = 0; dd < HEAD_DIM; dd++) {
    const vl result = numerator[dd] / denominator;
    for (int64_t l = 0; l < lanes; l++) job->out[(pair * q + g * LW + l) * d + hh * HEAD_DIM + dd] = result[l];
  }
}

static void pair_attention(const Job* job, int64_t a, int64_t b) {
  int32_t real[MAXM];  // the other item's real keys
  int64_t count = 0;
  for (int64_t j = 0; j < job->m; j++)
    if (job->key_mask[b * job->m + j] > 0) real[count++] = (int32_t)j;
  vl logits[MAXM];
  for (int64_t hh = 0; hh < job->h; hh++)
    for (int64_t g = 0; g < job->qp / LW; g++) query_group(job, a, b, hh, g, real, count, logits);
}

#define CHUNK 4

static void pairs_chunk(const void* ctx, int64_t start, int64_t end, void* scratch) {
  (void)scratch;
  const Job* job = ctx;
  for (int64_t p = start; p < end; p++) pair_attention(job, p / job->b, p % job->b);
}

static void free_job(const void* ctx) { free((void*)ctx); }

static XLA_FFI_Error* cross(XLA_FFI_CallFrame* frame, int text_major) {
  if (ffi_not_executing(frame)) return NULL;
  if (!ffi_counts(frame, 8, 1)) return ffi_error(frame->api, "mmca_attention: expected 8 buffer arguments, 1 result");
  const XLA_FFI_Buffer* qt = ffi_arg(frame, 0);
  const XLA_FFI_Buffer* keys = ffi_arg(frame, 1);
  if (qt->rank != 4 || keys->rank != 4)
    return ffi_error(frame->api, "mmca_attention: qt must be [A, H, HD, QP], k [B, M, H, HD]");
  const int64_t a = qt->dims[0], h = qt->dims[1], hd = HEAD_DIM, qp = qt->dims[3];
  const int64_t b = keys->dims[0], m = keys->dims[1];
  if (m > MAXM) return ffi_error(frame->api, "mmca_attention: more than 256 keys per item");
  if (qp % LW) return ffi_error(frame->api, "mmca_attention: qt's last dimension must be a multiple of 16");
  XLA_FFI_Buffer* out = ffi_ret(frame, 0);
  if (out->rank != 4) return ffi_error(frame->api, "mmca_attention: the result must be [pairs..., Q, H * HD]");
  const int64_t q = out->dims[2];
  const int64_t dims[][4] = {{a, h, hd, qp}, {b, m, h, hd}, {b, m, h, hd}, {b, m},
                             {a, h, qp},     {a, h, qp},    {a, h, hd, qp}, {0}};
  const int64_t ranks[] = {4, 4, 4, 2, 3, 3, 4, 0};
  for (int i = 0; i < 8; i++)
    if (!ffi_shape_is(ffi_arg(frame, i), ranks[i], dims[i]))
      return ffi_error(frame->api, "mmca_attention: an argument has the wrong dtype or shape (see mmca_attention.c)");
  const int64_t out_dims[] = {text_major ? b : a, text_major ? a : b, q, h * hd};
  if (!ffi_shape_is(out, 4, out_dims) || q > qp || qp - q >= LW)
    return ffi_error(frame->api, "mmca_attention: the result must be float32 [pairs..., Q, H * HD]");
  if (a * b * q == 0) return NULL;
  Job* job = calloc(1, sizeof(Job));
  if (job == NULL) return ffi_error(frame->api, "mmca_attention: out of memory");
  *job = (Job){.a = a, .b = b, .q = q, .qp = qp, .h = h, .m = m, .text_major = text_major};
  const float** inputs[] = {&job->qt,      &job->keys,    &job->values, &job->key_mask,
                            &job->own_max, &job->own_sum, &job->own_out};
  for (int i = 0; i < 7; i++) *inputs[i] = (const float*)ffi_arg(frame, i)->data;
  job->scale = *(const float*)ffi_arg(frame, 7)->data;
  job->out = (float*)out->data;
  if (parallel_for(frame, a * b, CHUNK, 0, pairs_chunk, job, free_job) != 0)
    return ffi_error(frame->api, "mmca_attention: out of memory");
  return NULL;
}

// The handlers XLA calls (jax.ffi.register_ffi_target, platform 'cpu').
XLA_FFI_Error* MmcaCrossImageMajor(XLA_FFI_CallFrame* frame) { return cross(frame, 0); }
XLA_FFI_Error* MmcaCrossTextMajor(XLA_FFI_CallFrame* frame) { return cross(frame, 1); }
