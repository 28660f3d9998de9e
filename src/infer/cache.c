/* cache.c - the per-sequence inference state (cache.h): the two attention
 * providers handed to tp_decoder_forward_cached. */
#include "infer/cache.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/liza.h"
#include "kernels/liza_gates.h"

typedef struct layer_cache {
    int soft;             /* keeps a KV cache */
    float *K, *V;         /* [Hkv][cap][d], head-major */
    int32_t *kpos;        /* [cap] */
    int64_t cap, count;   /* allocated entries, valid entries */
    float *S;             /* [Hkv, d, d] LiZA states, or NULL */
    float *hk, *hv;       /* [hmax, kvd] last raw k, v (oldest first) */
    int64_t nh;           /* valid history rows */
} layer_cache;

struct tp_infer_cache {
    tp_decoder *m;
    int64_t L, H, Hkv, d, qd, kvd, window, block, hmax, pos, blk_pos0;
    int liza;
    tp_liza_cfg lcfg;
    int beta_gate, alpha_gate;
    layer_cache *layers;
    /* LiZA window scratch: rows [hist; block] */
    float *wq, *wk, *wv, *qh, *kh, *vh, *beta, *la, *wy;
    int32_t *zeros;
    size_t scratch_bytes;
};

/* K, V are head-major [Hkv][cap][d]: a new capacity moves each head's
 * block. exact: reserve exactly `need` entries; else grow by doubling. */
static int grow_kv(tp_infer_cache *c, layer_cache *lc, int64_t need, int exact, tp_err *err) {
    if (need <= lc->cap) return TP_OK;
    int64_t cap = lc->cap ? lc->cap : 256;
    while (cap < need) cap *= 2;
    if (exact) cap = need;
    if (c->window > 0 && cap > c->window) cap = c->window;
    size_t per = (size_t)(cap * c->d);
    float *K = malloc(per * (size_t)c->Hkv * sizeof(float)), *V = malloc(per * (size_t)c->Hkv * sizeof(float));
    int32_t *P = realloc(lc->kpos, (size_t)cap * sizeof(int32_t));
    if (P) lc->kpos = P;
    if (!K || !V || !P) {
        free(K);
        free(V);
        return tp_fail(err, TP_ENOMEM, "out of memory for the KV cache (%lld tokens, %.1f MiB per layer)",
                       (long long)cap, (double)cap * (double)c->kvd * 8 / 1048576.0);
    }
    for (int64_t h = 0; lc->K && h < c->Hkv; h++) { /* the valid entries of each head */
        memcpy(K + h * cap * c->d, lc->K + h * lc->cap * c->d, (size_t)(lc->count * c->d) * sizeof(float));
        memcpy(V + h * cap * c->d, lc->V + h * lc->cap * c->d, (size_t)(lc->count * c->d) * sizeof(float));
    }
    free(lc->K);
    free(lc->V);
    lc->K = K;
    lc->V = V;
    lc->cap = cap;
    return TP_OK;
}

static int op_softmax(void *ctx, int l, const float *q, const float *k, const float *v, int64_t n, float *o,
                      tp_err *err) {
    tp_infer_cache *c = ctx;
    layer_cache *lc = &c->layers[l];
    int64_t p0 = c->blk_pos0, d = c->d;
    tp_attn_kv kv = {lc->K, lc->V, lc->kpos, lc->count, lc->cap * d};
    int rc = tp_attn_fwd_cached(c->H, c->Hkv, d, c->window, q, n, p0, &kv, k, v, o, err);
    if (rc) return rc;
    /* append; a ring keeps the last W positions */
    int64_t keep0 = c->window > 0 && n > c->window ? n - c->window : 0;
    if ((rc = grow_kv(c, lc, c->window > 0 ? (p0 + n < c->window ? p0 + n : c->window) : p0 + n, 0, err))) return rc;
    for (int64_t t = keep0; t < n; t++) {
        int64_t slot = c->window > 0 ? (p0 + t) % c->window : p0 + t;
        for (int64_t h = 0; h < c->Hkv; h++) {
            memcpy(lc->K + (h * lc->cap + slot) * d, k + t * c->kvd + h * d, (size_t)d * sizeof(float));
            memcpy(lc->V + (h * lc->cap + slot) * d, v + t * c->kvd + h * d, (size_t)d * sizeof(float));
        }
        lc->kpos[slot] = (int32_t)(p0 + t);
    }
    lc->count = c->window > 0 && p0 + n > c->window ? c->window : p0 + n;
    return TP_OK;
}

static int op_liza(void *ctx, int l, const float *q, const float *k, const float *v, int64_t n, float *y,
                   tp_err *err) {
    tp_infer_cache *c = ctx;
    layer_cache *lc = &c->layers[l];
    int64_t h = lc->nh, T = h + n, qd = c->qd, kvd = c->kvd;
    /* the window [history; block] in the layouts of the training kernels */
    memset(c->wq, 0, (size_t)(h * qd) * sizeof(float));
    memcpy(c->wq + h * qd, q, (size_t)(n * qd) * sizeof(float));
    memcpy(c->wk, lc->hk, (size_t)(h * kvd) * sizeof(float));
    memcpy(c->wk + h * kvd, k, (size_t)(n * kvd) * sizeof(float));
    memcpy(c->wv, lc->hv, (size_t)(h * kvd) * sizeof(float));
    memcpy(c->wv + h * kvd, v, (size_t)(n * kvd) * sizeof(float));
    tp_gate_dims gd = {1, T, c->H, c->Hkv, c->d, c->beta_gate, c->alpha_gate};
    tp_liza_gates_fwd(&gd, c->wq, c->wk, c->wv, c->zeros, c->qh, c->kh, c->vh, c->beta, c->la);
    tp_liza_dims ld = {1, T, c->H, c->Hkv, c->d};
    int rc = tp_liza_fwd_seg_f32(&ld, &c->lcfg, c->qh, c->kh, c->vh, c->beta,
                                 c->alpha_gate == TP_GATE_C ? NULL : c->la, h, c->blk_pos0, lc->S, c->wy, err);
    if (rc) return rc;
    memcpy(y, c->wy + h * qd, (size_t)(n * qd) * sizeof(float));
    /* keep the last hmax raw rows of the window */
    int64_t nh = T < c->hmax ? T : c->hmax;
    memmove(lc->hk, c->wk + (T - nh) * kvd, (size_t)(nh * kvd) * sizeof(float));
    memmove(lc->hv, c->wv + (T - nh) * kvd, (size_t)(nh * kvd) * sizeof(float));
    lc->nh = nh;
    return TP_OK;
}

static const tp_attn_ops cache_ops = {op_softmax, op_liza};

void tp_cache_destroy(tp_infer_cache *c) {
    if (!c) return;
    for (int64_t l = 0; c->layers && l < c->L; l++) {
        layer_cache *lc = &c->layers[l];
        free(lc->K);
        free(lc->V);
        free(lc->kpos);
        free(lc->S);
        free(lc->hk);
        free(lc->hv);
    }
    free(c->layers);
    free(c->wq); /* one block for all window scratch */
    free(c);
}

int tp_cache_create(tp_decoder *m, int64_t block, tp_infer_cache **out, tp_err *err) {
    *out = NULL;
    const tp_decoder_opts *o = tp_decoder_options(m);
    const tp_model_config *mc = tp_decoder_config(m);
    if (!o->inference) return tp_fail(err, TP_EINVAL, "internal: inference cache on a training decoder");
    if (block < 1) return tp_fail(err, TP_EINVAL, "internal: inference block must be >= 1");
    tp_infer_cache *c = tp_calloc(1, sizeof *c, err);
    if (!c) return TP_ENOMEM;
    c->m = m;
    c->L = mc->layers;
    c->H = mc->heads;
    c->Hkv = mc->kv_heads;
    c->d = mc->head_dim;
    c->qd = c->H * c->d;
    c->kvd = c->Hkv * c->d;
    c->window = mc->sliding_window;
    c->block = block;
    c->liza = o->liza.enabled;
    c->lcfg = (tp_liza_cfg){o->liza.order, o->liza.trick, o->liza.linear, o->liza.chunk};
    c->beta_gate = o->liza.beta_gate;
    c->alpha_gate = o->liza.alpha_gate;
    c->hmax = o->liza.order - 1 > 2 ? o->liza.order - 1 : 2;
    c->layers = tp_calloc((size_t)c->L, sizeof *c->layers, err);
    int rc = c->layers ? TP_OK : TP_ENOMEM;
    for (int64_t l = 0; l < c->L && rc == TP_OK; l++) {
        layer_cache *lc = &c->layers[l];
        lc->soft = tp_decoder_layer_softmax(m, (int)l);
        if (!c->liza) continue;
        lc->S = tp_calloc((size_t)(c->Hkv * c->d * c->d), sizeof(float), err);
        lc->hk = tp_calloc((size_t)(c->hmax * c->kvd), sizeof(float), err);
        lc->hv = tp_calloc((size_t)(c->hmax * c->kvd), sizeof(float), err);
        if (!lc->S || !lc->hk || !lc->hv) rc = TP_ENOMEM;
    }
    if (rc == TP_OK && c->liza) {
        int64_t T = c->hmax + block;
        size_t nf = (size_t)(T * (3 * c->qd + 5 * c->kvd + c->Hkv));
        c->wq = tp_malloc(nf * sizeof(float) + (size_t)T * sizeof(int32_t), err);
        if (!c->wq) rc = TP_ENOMEM;
        else {
            float *p = c->wq;
#define TAKE(x, k) (c->x = p, p += (size_t)(k))
            TAKE(wq, T * c->qd); TAKE(qh, T * c->qd); TAKE(wy, T * c->qd); TAKE(wk, T * c->kvd);
            TAKE(wv, T * c->kvd); TAKE(kh, T * c->kvd); TAKE(vh, T * c->kvd); TAKE(beta, T * c->kvd);
            TAKE(la, T * c->Hkv);
#undef TAKE
            c->zeros = (int32_t *)p;
            memset(c->zeros, 0, (size_t)T * sizeof(int32_t));
            c->scratch_bytes = nf * sizeof(float) + (size_t)T * sizeof(int32_t);
        }
    }
    if (rc) {
        tp_cache_destroy(c);
        return rc;
    }
    *out = c;
    return TP_OK;
}

void tp_cache_reset(tp_infer_cache *c) {
    c->pos = 0;
    for (int64_t l = 0; l < c->L; l++) {
        layer_cache *lc = &c->layers[l];
        lc->count = 0;
        lc->nh = 0;
        if (lc->S) memset(lc->S, 0, (size_t)(c->Hkv * c->d * c->d) * sizeof(float));
    }
}

int tp_cache_reserve(tp_infer_cache *c, int64_t n, tp_err *err) {
    for (int64_t l = 0; l < c->L; l++) {
        layer_cache *lc = &c->layers[l];
        if (!lc->soft) continue;
        int rc = grow_kv(c, lc, c->window > 0 && n > c->window ? c->window : n, 1, err);
        if (rc) return rc;
    }
    return TP_OK;
}

int64_t tp_cache_pos(const tp_infer_cache *c) { return c->pos; }
int64_t tp_cache_vocab(const tp_infer_cache *c) { return tp_decoder_config(c->m)->vocab; }

int tp_cache_has_kv(const tp_infer_cache *c) {
    for (int64_t l = 0; l < c->L; l++)
        if (c->layers[l].soft) return 1;
    return 0;
}

size_t tp_cache_bytes(const tp_infer_cache *c) {
    size_t b = c->scratch_bytes;
    for (int64_t l = 0; l < c->L; l++) {
        const layer_cache *lc = &c->layers[l];
        b += (size_t)lc->cap * ((size_t)c->kvd * 2 * sizeof(float) + sizeof(int32_t));
        if (lc->S) b += (size_t)(c->Hkv * c->d * c->d + 2 * c->hmax * c->kvd) * sizeof(float);
    }
    return b;
}

int tp_cache_feed(tp_infer_cache *c, const int32_t *ids, int64_t n, float *all_logits, float *last_logits,
                  tp_err *err) {
    int64_t V = tp_decoder_config(c->m)->vocab;
    if (n < 1) return tp_fail(err, TP_EINVAL, "internal: feeding no tokens");
    for (int64_t off = 0; off < n;) {
        int64_t nb = n - off < c->block ? n - off : c->block, last = off + nb == n;
        int64_t from = all_logits ? 0 : (last && last_logits ? nb - 1 : nb);
        float *out = all_logits ? all_logits + off * V : last_logits;
        c->blk_pos0 = c->pos;
        for (int64_t l = 0; l < c->L; l++)
            if (c->layers[l].soft && c->window <= 0) {
                int rc = grow_kv(c, &c->layers[l], c->pos + nb, 0, err);
                if (rc) return rc;
            }
        int rc = tp_decoder_forward_cached(c->m, ids + off, nb, c->pos, &cache_ops, c, from, out, err);
        if (rc) return rc;
        c->pos += nb;
        off += nb;
    }
    if (all_logits && last_logits) memcpy(last_logits, all_logits + (n - 1) * V, (size_t)V * sizeof(float));
    return TP_OK;
}
