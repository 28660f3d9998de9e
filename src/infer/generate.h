/* generate.h - the decode loop and token sampling over an inference cache.
 *
 * One prompt is prefilled (tp_cache_feed in blocks, only the last row's
 * logits computed), then tokens are chosen one at a time and fed back.
 * Sampling follows Hugging Face's logits processors, in their order:
 * repetition penalty over every id seen (prompt and generated; a positive
 * logit divided by the penalty, a negative one multiplied), then greedy
 * argmax when temperature is 0 (lowest id on ties), else logits / T, top-k
 * (keeps every logit >= the k-th largest), top-p (keeps the smallest set of
 * most likely tokens whose probability reaches p, at least one), and a draw
 * from the remaining softmax with the caller's RNG stream. */
#ifndef TPTT_INFER_GENERATE_H
#define TPTT_INFER_GENERATE_H

#include <stdint.h>

#include "infer/cache.h"
#include "util/err.h"
#include "util/rng.h"

typedef struct tp_sampler_opts {
    double temperature;        /* 0: greedy */
    int64_t top_k;             /* 0: off */
    double top_p;              /* 1: off */
    double repetition_penalty; /* 1: off */
} tp_sampler_opts;

void tp_sampler_opts_default(tp_sampler_opts *o);

/* Choose the next id from logits [V] (modified in place). seen [nseen] are
 * the ids the repetition penalty applies to. scratch: 2*V floats + V ints
 * (see tp_sampler_scratch_bytes). */
int32_t tp_sample(const tp_sampler_opts *o, float *logits, int64_t V, const int32_t *seen, int64_t nseen,
                  tp_rng *rng, void *scratch);
size_t tp_sampler_scratch_bytes(int64_t V);

enum { TP_STOP_EOS = 0, TP_STOP_LENGTH = 1, TP_STOP_STRING = 2 };

/* Called after each generated token with the raw logits it was drawn from
 * ([V], before any sampling processor); returns 1 to stop (a stop string
 * matched), 0 to go on, or a negative TP_E* code to fail (err filled). */
typedef int (*tp_token_cb)(void *ctx, int32_t id, const float *logits, tp_err *err);

typedef struct tp_gen_opts {
    tp_sampler_opts sampler;
    int64_t max_new;          /* >= 1 */
    const int32_t *eos;       /* stop ids (the EOS token is kept in the output) */
    int neos;
    tp_token_cb on_token;     /* may be NULL */
    void *ctx;
} tp_gen_opts;

typedef struct tp_gen_result {
    int32_t *ids;             /* new ids (malloc'ed; caller frees) */
    int64_t n;
    int stop;                 /* TP_STOP_* */
} tp_gen_result;

/* Reset the cache, prefill prompt [np] (np >= 1), generate. */
int tp_generate(tp_infer_cache *c, const int32_t *prompt, int64_t np, const tp_gen_opts *o, tp_rng *rng,
                tp_gen_result *res, tp_err *err);

#endif
