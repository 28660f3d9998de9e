/* dist.h - MPI data parallelism: ranks, reductions, and gradient buckets
 * whose allreduces overlap the backward pass.
 *
 * Gradients live in the decoder's flat buffer; buckets are contiguous ranges
 * of whole parameters (about bucket_mb each, in buffer order). A bucket is
 * ready once backward has finished every layer its parameters belong to (the
 * decoder's grad hook reports layers as they complete: L, L-1, ..., 0, -1);
 * it is then summed in place with MPI_Iallreduce, and pending requests are
 * polled with MPI_Testall at each later hook so Open MPI makes progress
 * while backward continues. Only the main thread calls MPI
 * (MPI_THREAD_FUNNELED). With one rank nothing is communicated. */
#ifndef TPTT_DIST_DIST_H
#define TPTT_DIST_DIST_H

#include <stddef.h>
#include <stdint.h>

#include "model/decoder.h"
#include "util/err.h"

typedef struct tp_dist {
    int rank, world;
    char host[256];
} tp_dist;

int tp_dist_init(int *argc, char ***argv, tp_dist *d, tp_err *err);
void tp_dist_finalize(void);
/* Print "tptt: rank R: msg" and abort every rank with exit status code. */
void tp_dist_abort(const tp_dist *d, const char *msg, int code) __attribute__((noreturn));

double tp_dist_sum_f64(double x);
int64_t tp_dist_sum_i64(int64_t x);
int tp_dist_max_int(int x);
void tp_dist_barrier(void);
/* Every rank's `bytes` bytes of send, in rank order, into recv (world x bytes). */
void tp_dist_allgather(const void *send, size_t bytes, void *recv);
/* Collective agreement on a step every rank ran (no MPI call with one
 * rank): returns rc on a rank that failed; on a rank that succeeded while
 * another failed, TP_EIO with an empty message (the failing rank's message
 * is the one to print); TP_OK when all succeeded. */
int tp_dist_agree(const tp_dist *d, int rc, tp_err *err);
/* Collective: 1 if rc failed on any rank, and then the lowest rank whose err
 * has a message prints "tptt: <msg>" on stderr (one line, not one per rank). */
int tp_dist_report_failure(const tp_dist *d, int rc, const tp_err *err);
/* Broadcast a NUL-terminated string from rank 0 (caller frees *s on every rank). */
int tp_dist_bcast_string(char **s, tp_err *err);

/* Collective: every rank's n bytes of s, concatenated in rank order into
 * *all on rank 0 (malloc'ed, NUL-terminated; lens [world] receives each
 * rank's length); *all is NULL on the other ranks. */
int tp_dist_gather_text(const tp_dist *d, const char *s, size_t n, char **all, size_t *lens, tp_err *err);

typedef struct tp_grad_sync tp_grad_sync;

int tp_grad_sync_create(tp_decoder *m, double bucket_mb, int world, tp_grad_sync **out, tp_err *err);
void tp_grad_sync_destroy(tp_grad_sync *g);
size_t tp_grad_sync_buckets(const tp_grad_sync *g);
/* Start a step: hook the decoder so buckets launch as layers complete. Call
 * before the LAST micro-batch's backward only (earlier micro-batches still
 * accumulate). */
void tp_grad_sync_arm(tp_grad_sync *g);
/* After backward: launch what is left, wait for everything, unhook. */
int tp_grad_sync_finish(tp_grad_sync *g, tp_err *err);

#endif
