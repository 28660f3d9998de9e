/* mmlu_score.h - scoring one multiple-choice item with a model: both
 * scorings of `tptt eval mmlu` from one prefill of the prompt.
 *
 *   log-likelihood (lm-evaluation-harness): the continuation of choice k is
 *     tokens(prompt + " X")[len(tokens(prompt)):] (its own tokens when the
 *     prompt's tokens are not a prefix); ll_k = the sum of its tokens' log
 *     probabilities after the prompt; the prediction is the argmax (lowest
 *     index on ties);
 *   generative (HELM, the paper's EM/PEM/QEM/PQEM): greedy continuation of
 *     at most gen_tokens tokens, cut at the first newline, scored against the
 *     gold letter (eval/mmlu.h).
 * Single-token continuations (the usual case) are read from the prompt's
 * last logits; longer ones re-run the prompt per choice. */
#ifndef TPTT_EVAL_MMLU_SCORE_H
#define TPTT_EVAL_MMLU_SCORE_H

#include <stddef.h>
#include <stdint.h>

#include "eval/mmlu.h"
#include "infer/cache.h"
#include "tok/tokenizer.h"
#include "util/err.h"

typedef struct tp_mmlu_result {
    tp_ids prompt;          /* prompt token ids (with BOS as the tokenizer adds) */
    tp_ids choice[4];       /* continuation ids of " A" .. " D" */
    double ll[4];           /* log-likelihood of each continuation */
    int pred;               /* argmax of ll */
    tp_ids cont;            /* greedy continuation ids (before the cut) */
    char *text;             /* its text up to the first newline (malloc'ed) */
    size_t text_len;
    tp_mmlu_gen gen;        /* EM, PEM, QEM, PQEM */
} tp_mmlu_result;

void tp_mmlu_result_free(tp_mmlu_result *r);

int tp_mmlu_score(tp_infer_cache *c, tp_tokenizer *tok, const char *prompt, int gold, int gen_tokens,
                  tp_mmlu_result *r, tp_err *err);

#endif
