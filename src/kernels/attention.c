#include "kernels/attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/matmul.h"
#include "kernels/sgemm_small.h"
#include "kernels/vexp.h"

/* Query rows per block in training. The keys and values of a head are
 * packed once per task (sgemm_small.h), so a block's products run on packed
 * panels; 128 rows halve the per-block work around the products against
 * 64 (bench_liza softmax, T = 4096, d = 64: 1.93 -> 1.71 s). */
#define BQ 128
#define BQ_CACHED 64 /* inference prefill blocks (OpenBLAS products) */

static inline int64_t lower_bound(const tp_attn_dims *s, const int32_t *ds, int64_t t) {
    int64_t lo = ds[t];
    if (s->window > 0 && t - s->window + 1 > lo) lo = t - s->window + 1;
    return lo;
}

/* First key column a query block's products cover: its lowest visible key,
 * down to a multiple of 32 (packed panels start there; the columns before
 * the visible ones get probability 0). */
static inline int64_t block_kmin(const tp_attn_dims *s, const int32_t *ds, int64_t i0) {
    return lower_bound(s, ds, i0) / 32 * 32;
}

/* Per-thread buffers of the training kernels: probabilities (and their
 * gradient) of one query block against up to T keys, product scratch, and
 * up to three packed key/value operands of one kv head of one row. */
typedef struct attn_ws {
    float *P, *dP, *pack, *kv[3];
} attn_ws;

static void attn_ws_free(attn_ws *w) {
    free(w->P);
    free(w->dP);
    free(w->pack);
    for (int i = 0; i < 3; i++) free(w->kv[i]);
}

static int attn_ws_init(attn_ws *w, int64_t T, int64_t d, int grads, int nkv) {
    memset(w, 0, sizeof *w);
    size_t kt = tp_sgemm_small_pack_floats(d, T), kv = tp_sgemm_small_pack_floats(T, d), pk = kt > kv ? kt : kv;
    if (!tp_sgemm_small_packs()) nkv = 0;
    w->P = malloc((size_t)BQ * (size_t)T * sizeof(float));
    w->dP = grads ? malloc((size_t)BQ * (size_t)T * sizeof(float)) : NULL;
    w->pack = malloc(tp_sgemm_small_scratch() * sizeof(float));
    int ok = w->P && (!grads || w->dP) && w->pack;
    for (int i = 0; i < nkv; i++) ok &= (w->kv[i] = malloc(pk * sizeof(float))) != NULL;
    if (!ok) attn_ws_free(w);
    return ok;
}

/* Probabilities of the query block [i0, i1) against keys [kmin, i1) into P
 * (bq x kn); scores by one product on the packed keys Kᵀ (kt: op(B) = Kᵀ
 * [d, T] of this row and kv head). When lse_out, computes and stores lse;
 * otherwise uses lse_in. */
static void block_probs(const tp_attn_dims *s, const int32_t *ds, const float *qb, int64_t ldq,
                        const tp_sgemm_small_b *kt, int64_t i0, int64_t i1, int64_t kmin, float *P, float *lse_out,
                        const float *lse_in, float *pack) {
    int64_t bq = i1 - i0, kn = i1 - kmin, d = s->d;
    float scale = (float)(1.0 / sqrt((double)d));
    tp_sgemm_small_packed(0, bq, kn, d, scale, qb, ldq, kt, 0, kmin, 0.0f, P, kn, pack);
    for (int64_t r = 0; r < bq; r++) {
        int64_t i = i0 + r, lo = lower_bound(s, ds, i) - kmin, hi = i - kmin; /* valid columns [lo, hi] */
        float *p = P + r * kn;
        for (int64_t c = 0; c < lo; c++) p[c] = 0;
        for (int64_t c = hi + 1; c < kn; c++) p[c] = 0;
        float l;
        if (lse_out) {
            float mx = tp_vmax_f32(p + lo, hi - lo + 1);
            double sum = tp_vexp_sum_fdiff(p + lo, hi - lo + 1, mx);
            l = (float)(mx + log(sum));
            lse_out[r] = l;
        } else {
            l = lse_in[r];
        }
        for (int64_t c = lo; c <= hi; c++) p[c] -= l;
        tp_vexpf(p + lo, p + lo, hi - lo + 1); /* expf, bit for bit */
    }
}

int tp_attn_fwd(const tp_attn_dims *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                float *o, float *lse, tp_err *err) {
    int64_t B = s->B, T = s->T, H = s->H, d = s->d, g = H / s->Hkv;
    int64_t ldq = H * d, ldk = s->Hkv * d, nblk = (T + BQ - 1) / BQ;
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        attn_ws w;
        int ok = attn_ws_init(&w, T, d, 0, 2);
        int64_t have = -1;
        if (!ok) fail = 1;
        tp_sgemm_small_b kt, vp;
        /* a task is one head of one row; consecutive heads share a kv head,
         * whose packed keys and values are then reused */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * H; task++) {
            if (!ok) continue;
            int64_t b = task / H, h = task % H, kvs = b * s->Hkv + h / g;
            const int32_t *ds = doc_start + b * T;
            if (have != kvs) {
                tp_sgemm_small_pack(&kt, 1, d, T, k + b * T * ldk + (h / g) * d, ldk, w.kv[0]);
                tp_sgemm_small_pack(&vp, 0, T, d, v + b * T * ldk + (h / g) * d, ldk, w.kv[1]);
                have = kvs;
            }
            for (int64_t blk = 0; blk < nblk; blk++) {
                int64_t i0 = blk * BQ, i1 = i0 + BQ < T ? i0 + BQ : T;
                int64_t kmin = block_kmin(s, ds, i0), kn = i1 - kmin;
                const float *qb = q + (b * T + i0) * ldq + h * d;
                block_probs(s, ds, qb, ldq, &kt, i0, i1, kmin, w.P, lse + (b * H + h) * T + i0, NULL, w.pack);
                tp_sgemm_small_packed(0, i1 - i0, d, kn, 1.0f, w.P, kn, &vp, kmin, 0, 0.0f,
                                      o + (b * T + i0) * ldq + h * d, ldq, w.pack);
            }
        }
        if (ok) attn_ws_free(&w);
    }
    if (fail)
        return tp_fail(err, TP_ENOMEM, "attention: out of memory for %lld x %lld scores", (long long)BQ, (long long)T);
    return TP_OK;
}

int tp_attn_bwd(const tp_attn_dims *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                const float *o, const float *lse, const float *dout, float *dq, float *dk, float *dv, tp_err *err) {
    int64_t B = s->B, T = s->T, H = s->H, Hkv = s->Hkv, d = s->d, g = H / Hkv;
    int64_t ldq = H * d, ldk = Hkv * d, nblk = (T + BQ - 1) / BQ;
    float scale = (float)(1.0 / sqrt((double)d));
    memset(dk, 0, (size_t)(B * T * ldk) * sizeof(float));
    memset(dv, 0, (size_t)(B * T * ldk) * sizeof(float));
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        attn_ws w;
        int ok = attn_ws_init(&w, T, d, 1, 3);
        float Dv[BQ];
        if (!ok) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (!ok) continue;
            int64_t b = task / Hkv, kvh = task % Hkv;
            const int32_t *ds = doc_start + b * T;
            const float *kr = k + b * T * ldk + kvh * d, *vr = v + b * T * ldk + kvh * d;
            tp_sgemm_small_b kt, vt, kp; /* Kᵀ and Vᵀ [d, T] for scores and dP, K [T, d] for dQ */
            tp_sgemm_small_pack(&kt, 1, d, T, kr, ldk, w.kv[0]);
            tp_sgemm_small_pack(&vt, 1, d, T, vr, ldk, w.kv[1]);
            tp_sgemm_small_pack(&kp, 0, T, d, kr, ldk, w.kv[2]);
            for (int64_t h = kvh * g; h < (kvh + 1) * g; h++) {
                for (int64_t blk = 0; blk < nblk; blk++) {
                    int64_t i0 = blk * BQ, i1 = i0 + BQ < T ? i0 + BQ : T, bq = i1 - i0;
                    int64_t kmin = block_kmin(s, ds, i0), kn = i1 - kmin;
                    const float *qb = q + (b * T + i0) * ldq + h * d;
                    const float *ob = o + (b * T + i0) * ldq + h * d;
                    const float *dob = dout + (b * T + i0) * ldq + h * d;
                    float *P = w.P, *dP = w.dP;
                    block_probs(s, ds, qb, ldq, &kt, i0, i1, kmin, P, NULL, lse + (b * H + h) * T + i0, w.pack);
                    tp_sgemm_small_packed(0, bq, kn, d, 1.0f, dob, ldq, &vt, 0, kmin, 0.0f, dP, kn, w.pack);
                    for (int64_t r = 0; r < bq; r++) {
                        double acc = 0;
                        for (int64_t c = 0; c < d; c++) acc += (double)dob[r * ldq + c] * ob[r * ldq + c];
                        Dv[r] = (float)acc;
                    }
                    for (int64_t r = 0; r < bq; r++) {
                        float *dp = dP + r * kn;
                        const float *p = P + r * kn;
                        for (int64_t c = 0; c < kn; c++) dp[c] = p[c] * (dp[c] - Dv[r]); /* P = 0 where masked */
                    }
                    float *dqb = dq + (b * T + i0) * ldq + h * d, *dkb = dk + (b * T + kmin) * ldk + kvh * d;
                    float *dvb = dv + (b * T + kmin) * ldk + kvh * d;
                    tp_sgemm_small_packed(0, bq, d, kn, scale, dP, kn, &kp, kmin, 0, 0.0f, dqb, ldq, w.pack);
                    tp_sgemm_small(1, 0, kn, d, bq, scale, dP, kn, qb, ldq, 1.0f, dkb, ldk, w.pack);
                    tp_sgemm_small(1, 0, kn, d, bq, 1.0f, P, kn, dob, ldq, 1.0f, dvb, ldk, w.pack);
                }
            }
        }
        if (ok) attn_ws_free(&w);
    }
    if (fail) return tp_fail(err, TP_ENOMEM, "attention backward: out of memory");
    return TP_OK;
}

/* ---- inference over a KV cache ------------------------------------------- */

/* Softmax of one row of scores in place over the visible columns (the
 * others set to 0): exp once per score, the sum in double. */
static void softmax_row(float *p, int64_t kw, const unsigned char *vis) {
    float mx = -INFINITY;
    for (int64_t c = 0; c < kw; c++)
        if ((!vis || vis[c]) && p[c] > mx) mx = p[c];
    double sum = 0;
    for (int64_t c = 0; c < kw; c++) {
        float e = !vis || vis[c] ? expf(p[c] - mx) : 0.0f;
        p[c] = e;
        sum += e;
    }
    float inv = (float)(1.0 / sum);
    for (int64_t c = 0; c < kw; c++) p[c] *= inv;
}

int tp_attn_fwd_cached(int64_t H, int64_t Hkv, int64_t d, int64_t window, const float *q, int64_t n, int64_t qpos0,
                       const tp_attn_kv *cache, const float *kn, const float *vn, float *o, tp_err *err) {
    int64_t g = H / Hkv, ldq = H * d, ldk = Hkv * d, mc = cache->mc, nblk = (n + BQ_CACHED - 1) / BQ_CACHED;
    float scale = (float)(1.0 / sqrt((double)d));
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        /* scores of one query block (all heads of the group): cached keys, then the block's keys */
        int64_t bq = n < BQ_CACHED ? n : BQ_CACHED;
        float *P = malloc((size_t)(g * bq) * (size_t)(mc + n) * sizeof(float));
        unsigned char *vis = malloc((size_t)(mc + n));
        if (!P || !vis) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < Hkv * nblk; task++) {
            if (!P || !vis) continue;
            int64_t kvh = task / nblk, blk = task % nblk;
            int64_t i0 = blk * BQ_CACHED, i1 = i0 + BQ_CACHED < n ? i0 + BQ_CACHED : n, nq = i1 - i0, kw = mc + i1;
            const float *Kc = cache->kc + kvh * cache->hstride, *Vc = cache->vc + kvh * cache->hstride;
            const float *Kn = kn + kvh * d, *Vn = vn + kvh * d;
            if (nq == 1) {
                /* decode: stream the cached keys and values once for the whole group
                 * (plain loops: sgemm with one row per head re-packs K and V per call) */
                const float *qg = q + i0 * ldq + kvh * g * d;
                int64_t qp = qpos0 + i0;
                tp_sgemm(0, 1, g, mc, d, scale, qg, d, Kc, d, 0.0f, P, kw);
                tp_sgemm(0, 1, g, i1, d, scale, qg, d, Kn, ldk, 0.0f, P + mc, kw);
                for (int64_t c = 0; c < kw; c++) {
                    int64_t kp = c < mc ? cache->kpos[c] : qpos0 + (c - mc);
                    vis[c] = kp <= qp && (window <= 0 || qp - window < kp);
                }
                for (int64_t r = 0; r < g; r++) softmax_row(P + r * kw, kw, vis);
                float *og = o + i0 * ldq + kvh * g * d;
                tp_sgemm(0, 0, g, d, mc, 1.0f, P, kw, Vc, d, 0.0f, og, d);
                tp_sgemm(0, 0, g, d, i1, 1.0f, P + mc, kw, Vn, ldk, mc > 0 ? 1.0f : 0.0f, og, d);
                continue;
            }
            for (int64_t h = kvh * g; h < (kvh + 1) * g; h++) {
                const float *qb = q + i0 * ldq + h * d;
                tp_sgemm(0, 1, nq, mc, d, scale, qb, ldq, Kc, d, 0.0f, P, kw);
                tp_sgemm(0, 1, nq, i1, d, scale, qb, ldq, Kn, ldk, 0.0f, P + mc, kw);
                for (int64_t r = 0; r < nq; r++) {
                    int64_t qp = qpos0 + i0 + r;
                    for (int64_t c = 0; c < kw; c++) {
                        int64_t kp = c < mc ? cache->kpos[c] : qpos0 + (c - mc);
                        vis[c] = kp <= qp && (window <= 0 || qp - window < kp);
                    }
                    softmax_row(P + r * kw, kw, vis);
                }
                float *ob = o + i0 * ldq + h * d;
                tp_sgemm(0, 0, nq, d, mc, 1.0f, P, kw, Vc, d, 0.0f, ob, ldq);
                tp_sgemm(0, 0, nq, d, i1, 1.0f, P + mc, kw, Vn, ldk, mc > 0 ? 1.0f : 0.0f, ob, ldq);
            }
        }
        free(P);
        free(vis);
    }
    if (fail) return tp_fail(err, TP_ENOMEM, "attention: out of memory for %lld cached keys", (long long)mc);
    return TP_OK;
}
