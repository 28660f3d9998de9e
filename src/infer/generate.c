/* generate.c - sampling and the decode loop (generate.h). */
#include "infer/generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void tp_sampler_opts_default(tp_sampler_opts *o) {
    o->temperature = 0;
    o->top_k = 0;
    o->top_p = 1;
    o->repetition_penalty = 1;
}

size_t tp_sampler_scratch_bytes(int64_t V) { return (size_t)V * (2 * sizeof(float) + sizeof(int32_t)); }

static int by_logit_desc(const void *a, const void *b, void *keys) {
    const float *k = keys;
    float x = k[*(const int32_t *)a], y = k[*(const int32_t *)b];
    if (x != y) return x > y ? -1 : 1;
    return *(const int32_t *)a < *(const int32_t *)b ? -1 : 1; /* ties: lower id first, a total order */
}

int32_t tp_sample(const tp_sampler_opts *o, float *lg, int64_t V, const int32_t *seen, int64_t nseen, tp_rng *rng,
                  void *scratch) {
    if (o->repetition_penalty != 1.0) {
        /* each distinct id once: mark with a scratch flag */
        unsigned char *mark = scratch;
        memset(mark, 0, (size_t)V);
        float p = (float)o->repetition_penalty;
        for (int64_t i = 0; i < nseen; i++) {
            int32_t id = seen[i];
            if (id < 0 || id >= V || mark[id]) continue;
            mark[id] = 1;
            lg[id] = lg[id] < 0 ? lg[id] * p : lg[id] / p;
        }
    }
    if (o->temperature <= 0) {
        int64_t best = 0;
        for (int64_t i = 1; i < V; i++)
            if (lg[i] > lg[best]) best = i;
        return (int32_t)best;
    }
    float inv_t = (float)(1.0 / o->temperature);
    for (int64_t i = 0; i < V; i++) lg[i] *= inv_t;
    int32_t *order = (int32_t *)((float *)scratch + 2 * V);
    int64_t keep = V;
    if ((o->top_k > 0 && o->top_k < V) || o->top_p < 1) {
        for (int64_t i = 0; i < V; i++) order[i] = (int32_t)i;
        qsort_r(order, (size_t)V, sizeof *order, by_logit_desc, lg);
        if (o->top_k > 0 && o->top_k < V) { /* every logit >= the k-th largest */
            float kth = lg[order[o->top_k - 1]];
            keep = o->top_k;
            while (keep < V && lg[order[keep]] >= kth) keep++;
        }
        if (o->top_p < 1) {
            double mx = lg[order[0]], z = 0, acc = 0;
            for (int64_t i = 0; i < keep; i++) z += exp((double)lg[order[i]] - mx);
            int64_t k = 0;
            while (k < keep) {
                acc += exp((double)lg[order[k]] - mx) / z;
                k++;
                if (acc >= o->top_p) break;
            }
            keep = k;
        }
    } else {
        for (int64_t i = 0; i < V; i++) order[i] = (int32_t)i;
    }
    double mx = -INFINITY, z = 0;
    for (int64_t i = 0; i < keep; i++) mx = lg[order[i]] > mx ? lg[order[i]] : mx;
    for (int64_t i = 0; i < keep; i++) z += exp((double)lg[order[i]] - mx);
    double u = tp_rng_uniform(rng) * z, acc = 0;
    for (int64_t i = 0; i < keep; i++) {
        acc += exp((double)lg[order[i]] - mx);
        if (u < acc) return order[i];
    }
    return order[keep - 1];
}

int tp_generate(tp_infer_cache *c, const int32_t *prompt, int64_t np, const tp_gen_opts *o, tp_rng *rng,
                tp_gen_result *res, tp_err *err) {
    memset(res, 0, sizeof *res);
    if (np < 1) return tp_fail(err, TP_EINVAL, "the prompt is empty (no token to start from)");
    if (o->max_new < 1) return tp_fail(err, TP_EINVAL, "max new tokens must be at least 1");
    int64_t V = tp_cache_vocab(c);
    float *logits = tp_malloc((size_t)V * 2 * sizeof(float), err);
    void *scratch = tp_malloc(tp_sampler_scratch_bytes(V) + (size_t)V, err);
    int32_t *seen = tp_malloc((size_t)(np + o->max_new) * sizeof(int32_t), err);
    int rc = logits && scratch && seen ? TP_OK : TP_ENOMEM;
    float *work = logits ? logits + V : NULL;
    tp_cache_reset(c);
    if (rc == TP_OK) rc = tp_cache_reserve(c, np + o->max_new, err);
    if (rc == TP_OK) rc = tp_cache_feed(c, prompt, np, NULL, logits, err);
    if (rc == TP_OK) memcpy(seen, prompt, (size_t)np * sizeof(int32_t));
    int64_t nseen = np;
    res->stop = TP_STOP_LENGTH;
    while (rc == TP_OK && res->n < o->max_new) {
        memcpy(work, logits, (size_t)V * sizeof(float));
        int32_t id = tp_sample(&o->sampler, work, V, seen, nseen, rng, scratch);
        seen[nseen++] = id;
        res->n++;
        int stop = 0;
        if (o->on_token) {
            stop = o->on_token(o->ctx, id, logits, err);
            if (stop < 0) {
                rc = stop;
                break;
            }
        }
        int is_eos = 0;
        for (int i = 0; i < o->neos; i++) is_eos |= id == o->eos[i];
        if (is_eos) { res->stop = TP_STOP_EOS; break; }
        if (stop) { res->stop = TP_STOP_STRING; break; }
        if (res->n == o->max_new) break;
        rc = tp_cache_feed(c, &id, 1, NULL, logits, err);
    }
    if (rc == TP_OK) {
        res->ids = tp_malloc((size_t)(res->n ? res->n : 1) * sizeof(int32_t), err);
        if (!res->ids) rc = TP_ENOMEM;
        else memcpy(res->ids, seen + np, (size_t)res->n * sizeof(int32_t));
    }
    free(logits);
    free(scratch);
    free(seen);
    if (rc) res->n = 0;
    return rc;
}
