/* mmlu_score.c - one MMLU item through a model (mmlu_score.h). */
#include "eval/mmlu_score.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "util/fsutil.h"

void tp_mmlu_result_free(tp_mmlu_result *r) {
    tp_ids_free(&r->prompt);
    for (int k = 0; k < 4; k++) tp_ids_free(&r->choice[k]);
    tp_ids_free(&r->cont);
    free(r->text);
    memset(r, 0, sizeof *r);
}

/* log-softmax of logits[id] in double */
static double logprob(const float *lg, int64_t V, int32_t id) {
    double mx = lg[0], z = 0;
    for (int64_t i = 1; i < V; i++) mx = lg[i] > mx ? lg[i] : mx;
    for (int64_t i = 0; i < V; i++) z += exp((double)lg[i] - mx);
    return (double)lg[id] - mx - log(z);
}

static int argmax(const float *lg, int64_t V) {
    int64_t b = 0;
    for (int64_t i = 1; i < V; i++)
        if (lg[i] > lg[b]) b = i;
    return (int)b;
}

static int continuation(tp_tokenizer *tok, const char *prompt, const tp_ids *ctx, const char *target, tp_ids *out,
                        tp_err *err) {
    size_t pl = strlen(prompt), tl = strlen(target);
    char *whole = tp_malloc(pl + tl + 1, err);
    if (!whole) return TP_ENOMEM;
    memcpy(whole, prompt, pl);
    memcpy(whole + pl, target, tl + 1);
    tp_ids w = {0};
    int rc = tp_tokenizer_encode(tok, whole, pl + tl, TP_TOK_ADD_SPECIAL, &w, err);
    free(whole);
    if (rc) return tp_ids_free(&w), rc;
    int prefix = w.n > ctx->n && !memcmp(w.ids, ctx->ids, ctx->n * sizeof(int32_t));
    if (prefix) {
        for (size_t i = ctx->n; rc == TP_OK && i < w.n; i++) rc = tp_ids_push(out, w.ids[i], err);
    } else { /* the target merged into the prompt's last token: its own tokens */
        rc = tp_tokenizer_encode(tok, target, tl, 0, out, err);
    }
    tp_ids_free(&w);
    if (rc == TP_OK && out->n == 0) rc = tp_fail(err, TP_EINVAL, "mmlu: the choice '%s' encodes to no tokens", target);
    return rc;
}

int tp_mmlu_score(tp_infer_cache *c, tp_tokenizer *tok, const char *prompt, int gold, int gen_tokens,
                  tp_mmlu_result *r, tp_err *err) {
    memset(r, 0, sizeof *r);
    int64_t V = tp_cache_vocab(c);
    int rc = tp_tokenizer_encode(tok, prompt, strlen(prompt), TP_TOK_ADD_SPECIAL, &r->prompt, err);
    if (rc == TP_OK && r->prompt.n == 0) rc = tp_fail(err, TP_EINVAL, "mmlu: a prompt encodes to no tokens");
    int single = 1;
    for (int k = 0; rc == TP_OK && k < 4; k++) {
        rc = continuation(tok, prompt, &r->prompt, tp_mmlu_target(k), &r->choice[k], err);
        if (rc == TP_OK && r->choice[k].n != 1) single = 0;
    }
    float *lg = rc ? NULL : tp_malloc((size_t)V * sizeof(float), err);
    if (rc == TP_OK && !lg) rc = TP_ENOMEM;
    if (rc == TP_OK) {
        tp_cache_reset(c);
        rc = tp_cache_feed(c, r->prompt.ids, (int64_t)r->prompt.n, NULL, lg, err);
    }
    if (rc == TP_OK && single)
        for (int k = 0; k < 4; k++) r->ll[k] = logprob(lg, V, r->choice[k].ids[0]);
    /* greedy continuation from the prompt, cut at a newline */
    tp_strbuf t;
    tp_strbuf_init(&t);
    for (int i = 0; rc == TP_OK && i < gen_tokens; i++) {
        int32_t id = argmax(lg, V);
        if ((rc = tp_ids_push(&r->cont, id, err))) break;
        tp_strbuf_free(&t);
        tp_strbuf_init(&t);
        if ((rc = tp_tokenizer_decode(tok, r->cont.ids, r->cont.n, 1, &t, err))) break;
        if (t.len && memchr(t.buf, '\n', t.len)) break;
        if (i + 1 < gen_tokens) rc = tp_cache_feed(c, &id, 1, NULL, lg, err);
    }
    if (rc == TP_OK) {
        const char *nl = t.len ? memchr(t.buf, '\n', t.len) : NULL;
        r->text_len = nl ? (size_t)(nl - t.buf) : t.len;
        r->text = tp_malloc(r->text_len + 1, err);
        if (!r->text) rc = TP_ENOMEM;
        else {
            if (r->text_len) memcpy(r->text, t.buf, r->text_len);
            r->text[r->text_len] = 0;
            tp_mmlu_gen_scores(r->text, r->text_len, gold, &r->gen);
        }
    }
    tp_strbuf_free(&t);
    /* multi-token continuations: the prompt again for each choice */
    for (int k = 0; rc == TP_OK && !single && k < 4; k++) {
        tp_cache_reset(c);
        rc = tp_cache_feed(c, r->prompt.ids, (int64_t)r->prompt.n, NULL, lg, err);
        r->ll[k] = 0;
        for (size_t i = 0; rc == TP_OK && i < r->choice[k].n; i++) {
            r->ll[k] += logprob(lg, V, r->choice[k].ids[i]);
            if (i + 1 < r->choice[k].n) rc = tp_cache_feed(c, &r->choice[k].ids[i], 1, NULL, lg, err);
        }
    }
    if (rc == TP_OK) {
        r->pred = 0;
        for (int k = 1; k < 4; k++)
            if (r->ll[k] > r->ll[r->pred]) r->pred = k;
    }
    free(lg);
    if (rc) tp_mmlu_result_free(r);
    return rc;
}
