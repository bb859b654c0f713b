// Shared by the kernels in this folder: a parallel loop over XLA:CPU's own intra-op thread pool, and the FFI
// plumbing every handler repeats (metadata answer, errors, argument checks).
//
// parallel_for(frame, items, chunk, scratch_bytes, body, ctx) runs body(ctx, start, end, scratch) over [0, items)
// in chunks of `chunk`. The calling thread works too; up to one task per pool thread is scheduled, each taking
// chunks until none is left, with its own zeroed scratch of `scratch_bytes`. A task that starts after the work is
// done (or never) does nothing, so the call never waits on a task that has not started, and the shared state is
// freed by whichever holder drops the last reference. (An OpenMP version oversubscribed the cores next to XLA's
// own threads: docs/architecture.md, "Compiled CPU kernels".)
#ifndef XMATCH_FFI_POOL_H_
#define XMATCH_FFI_POOL_H_

#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "xla/ffi/api/c_api.h"

typedef void (*chunk_fn)(const void* ctx, int64_t start, int64_t end, void* scratch);

typedef struct {
  chunk_fn body;
  const void* ctx;
  int64_t items, chunk;
  size_t scratch_bytes;
  atomic_llong next;  // first item of the next chunk
  atomic_llong done;  // items finished
  atomic_int refs;
} PoolJob;

static void pool_work(PoolJob* job) {
  void* scratch = job->scratch_bytes ? calloc(1, job->scratch_bytes) : NULL;
  if (job->scratch_bytes && scratch == NULL) abort();
  for (;;) {
    const int64_t start = atomic_fetch_add(&job->next, job->chunk);
    if (start >= job->items) break;
    const int64_t end = start + job->chunk < job->items ? start + job->chunk : job->items;
    job->body(job->ctx, start, end, scratch);
    atomic_fetch_add(&job->done, end - start);
  }
  free(scratch);
}

static void pool_release(PoolJob* job, void (*free_ctx)(const void*)) {
  if (atomic_fetch_sub(&job->refs, 1) == 1) {
    if (free_ctx) free_ctx(job->ctx);
    free(job);
  }
}

typedef struct {
  PoolJob* job;
  void (*free_ctx)(const void*);
} PoolTask;

static void pool_task(void* data) {
  PoolTask* task = data;
  pool_work(task->job);
  pool_release(task->job, task->free_ctx);
  free(task);
}

// An error of a pool call the kernels can do without (they then work alone).
static void ffi_discard(const XLA_FFI_Api* api, XLA_FFI_Error* err) {
  XLA_FFI_Error_Destroy_Args destroy = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, NULL, err};
  api->XLA_FFI_Error_Destroy(&destroy);
}

// Runs the loop; `ctx` (heap memory, freed with free_ctx once no task holds it) is what `body` reads. Returns 0, or
// -1 when out of memory (nothing ran; ctx freed).
static int parallel_for(XLA_FFI_CallFrame* frame, int64_t items, int64_t chunk, size_t scratch_bytes, chunk_fn body,
                        const void* ctx, void (*free_ctx)(const void*)) {
  PoolJob* job = calloc(1, sizeof(PoolJob));
  if (job == NULL) {
    if (free_ctx) free_ctx(ctx);
    return -1;
  }
  job->body = body;
  job->ctx = ctx;
  job->items = items;
  job->chunk = chunk;
  job->scratch_bytes = scratch_bytes;
  int64_t threads = 1;
  XLA_FFI_ThreadPool_NumThreads_Args count;
  memset(&count, 0, sizeof count);
  count.struct_size = XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE;
  count.ctx = frame->ctx;
  count.num_threads = &threads;
  XLA_FFI_Error* err = frame->api->XLA_FFI_ThreadPool_NumThreads(&count);
  if (err != NULL) {  // no pool: this thread does all the work
    ffi_discard(frame->api, err);
    threads = 1;
  }
  int64_t tasks = (items + chunk - 1) / chunk - 1;
  if (tasks > threads) tasks = threads;
  atomic_store(&job->refs, 1);
  for (int64_t t = 0; t < tasks; t++) {
    PoolTask* task = malloc(sizeof(PoolTask));
    if (task == NULL) break;
    *task = (PoolTask){job, free_ctx};
    atomic_fetch_add(&job->refs, 1);
    XLA_FFI_ThreadPool_Schedule_Args schedule;
    memset(&schedule, 0, sizeof schedule);
    schedule.struct_size = XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE;
    schedule.ctx = frame->ctx;
    schedule.task = pool_task;
    schedule.data = task;
    err = frame->api->XLA_FFI_ThreadPool_Schedule(&schedule);
    if (err != NULL) {
      ffi_discard(frame->api, err);
      atomic_fetch_sub(&job->refs, 1);
      free(task);
      break;
    }
  }
  pool_work(job);
  while (atomic_load(&job->done) < items) sched_yield();  // at most one chunk still running elsewhere
  pool_release(job, free_ctx);
  return 0;
}

static XLA_FFI_Error* ffi_error(const XLA_FFI_Api* api, const char* message) {
  XLA_FFI_Error_Create_Args args;
  memset(&args, 0, sizeof args);
  args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  args.message = message;
  args.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
  return api->XLA_FFI_Error_Create(&args);
}

// Answers XLA's metadata query (returns 1: the handler returns NULL at once) and skips the stages before execution.
static int ffi_not_executing(XLA_FFI_CallFrame* frame) {
  if (frame->extension_start != NULL && frame->extension_start->type == XLA_FFI_Extension_Metadata) {
    XLA_FFI_Metadata_Extension* extension = (XLA_FFI_Metadata_Extension*)frame->extension_start;
    extension->metadata->api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
    extension->metadata->api_version.extension_start = NULL;
    extension->metadata->api_version.major_version = XLA_FFI_API_MAJOR;
    extension->metadata->api_version.minor_version = XLA_FFI_API_MINOR;
    extension->metadata->traits = 0;
    return 1;
  }
  return frame->stage != XLA_FFI_ExecutionStage_EXECUTE;
}

static XLA_FFI_Buffer* ffi_arg(XLA_FFI_CallFrame* frame, int i) { return (XLA_FFI_Buffer*)frame->args.args[i]; }
static XLA_FFI_Buffer* ffi_ret(XLA_FFI_CallFrame* frame, int i) { return (XLA_FFI_Buffer*)frame->rets.rets[i]; }

// 1 when every argument is a buffer and the counts are as expected.
static int ffi_counts(XLA_FFI_CallFrame* frame, int64_t args, int64_t rets) {
  if (frame->args.size != args || frame->rets.size != rets) return 0;
  for (int64_t i = 0; i < args; i++)
    if (frame->args.types[i] != XLA_FFI_ArgType_BUFFER) return 0;
  return 1;
}

static int ffi_shape_is(const XLA_FFI_Buffer* buffer, int64_t rank, const int64_t* dims) {
  if (buffer->dtype != XLA_FFI_DataType_F32 || buffer->rank != rank) return 0;
  for (int64_t i = 0; i < rank; i++)
    if (buffer->dims[i] != dims[i]) return 0;
  return 1;
}

#endif  // XMATCH_FFI_POOL_H_
