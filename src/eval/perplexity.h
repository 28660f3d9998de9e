/* perplexity.h - loss and perplexity of a model on a token shard.
 *
 * Two ways to cut the data (docs/eval.md):
 *   packed (stride 0): the training rows (tp_dataset, pack mode): documents
 *     end to end in rows of seq_len tokens, no attention across documents,
 *     labels as in training (next token of the same document, the shard's
 *     label mask applied);
 *   sliding windows (stride S): each document alone, windows of seq_len
 *     tokens starting every S tokens; each token is predicted once, in the
 *     first window that covers it with context, as in Hugging Face's
 *     perplexity guide.
 * Rows are shared over the ranks (row i on rank i % world) and the sums
 * reduced, so every rank returns the same result. Collective. */
#ifndef TPTT_EVAL_PERPLEXITY_H
#define TPTT_EVAL_PERPLEXITY_H

#include <stdint.h>

#include "dist/dist.h"
#include "model/decoder.h"
#include "util/err.h"

typedef struct tp_ppl_opts {
    int64_t seq_len;  /* tokens per row, >= 2 */
    int64_t stride;   /* 0: packed rows; else sliding windows, 1 <= stride <= seq_len */
    int64_t micro;    /* rows per forward, >= 1 */
    int64_t max_rows; /* 0: all */
    double split;     /* packed rows only: > 0 evaluates the held-out side of this split */
    uint64_t split_seed;
} tp_ppl_opts;

typedef struct tp_ppl_result {
    double loss_sum;   /* summed token losses (nats) */
    int64_t tokens;    /* labelled tokens */
    int64_t rows;      /* rows (windows) evaluated */
    int64_t documents; /* documents in the shard */
} tp_ppl_result;

int tp_eval_perplexity(tp_decoder *m, const char *shard, const tp_ppl_opts *o, const tp_dist *d, tp_ppl_result *r,
                       tp_err *err);

#endif
