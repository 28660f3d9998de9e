#include "kernels/attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/matmul.h"
#include "kernels/sgemm_small.h"
#include "kernels/vexp.h"

#define BQ 64 /* query rows per block */

static inline int64_t lower_bound(const tp_attn_dims *s, const int32_t *ds, int64_t t) {
    int64_t lo = ds[t];
    if (s->window > 0 && t - s->window + 1 > lo) lo = t - s->window + 1;
    return lo;
}

/* Probabilities of the query block [i0, i1) against keys [kmin, i1) into P
 * (bq x kn); scores by one product (sgemm_small.h: each thread runs its own
 * blocks, pack is its scratch). When lse_out, computes and stores lse;
 * otherwise uses lse_in. */
static void block_probs(const tp_attn_dims *s, const int32_t *ds, const float *qb, int64_t ldq, const float *kb,
                        int64_t ldk, int64_t i0, int64_t i1, int64_t kmin, float *P, float *lse_out,
                        const float *lse_in, float *pack) {
    int64_t bq = i1 - i0, kn = i1 - kmin, d = s->d;
    float scale = (float)(1.0 / sqrt((double)d));
    tp_sgemm_small(0, 1, bq, kn, d, scale, qb, ldq, kb, ldk, 0.0f, P, kn, pack);
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
    int64_t tasks = B * H * nblk;
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        float *P = malloc((size_t)BQ * (size_t)T * sizeof(float));
        float *pack = malloc(tp_sgemm_small_scratch() * sizeof(float));
        if (!P || !pack) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!P || !pack) continue;
            int64_t b = task / (H * nblk), h = (task / nblk) % H, blk = task % nblk;
            int64_t i0 = blk * BQ, i1 = i0 + BQ < T ? i0 + BQ : T;
            const int32_t *ds = doc_start + b * T;
            int64_t kmin = lower_bound(s, ds, i0), kn = i1 - kmin;
            const float *qb = q + (b * T + i0) * ldq + h * d;
            const float *kb = k + (b * T + kmin) * ldk + (h / g) * d;
            const float *vb = v + (b * T + kmin) * ldk + (h / g) * d;
            block_probs(s, ds, qb, ldq, kb, ldk, i0, i1, kmin, P, lse + (b * H + h) * T + i0, NULL, pack);
            tp_sgemm_small(0, 0, i1 - i0, d, kn, 1.0f, P, kn, vb, ldk, 0.0f, o + (b * T + i0) * ldq + h * d, ldq,
                           pack);
        }
        free(P);
        free(pack);
    }
    if (fail) return tp_fail(err, TP_ENOMEM, "attention: out of memory for %lld x %lld scores", (long long)BQ, (long long)T);
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
        float *P = malloc((size_t)BQ * (size_t)T * sizeof(float));
        float *dP = malloc((size_t)BQ * (size_t)T * sizeof(float));
        float *pack = malloc(tp_sgemm_small_scratch() * sizeof(float));
        float Dv[BQ];
        if (!P || !dP || !pack) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (fail) continue;
            int64_t b = task / Hkv, kvh = task % Hkv;
            const int32_t *ds = doc_start + b * T;
            for (int64_t h = kvh * g; h < (kvh + 1) * g; h++) {
                for (int64_t blk = 0; blk < nblk; blk++) {
                    int64_t i0 = blk * BQ, i1 = i0 + BQ < T ? i0 + BQ : T, bq = i1 - i0;
                    int64_t kmin = lower_bound(s, ds, i0), kn = i1 - kmin;
                    const float *qb = q + (b * T + i0) * ldq + h * d;
                    const float *ob = o + (b * T + i0) * ldq + h * d;
                    const float *dob = dout + (b * T + i0) * ldq + h * d;
                    const float *kb = k + (b * T + kmin) * ldk + kvh * d;
                    const float *vb = v + (b * T + kmin) * ldk + kvh * d;
                    block_probs(s, ds, qb, ldq, kb, ldk, i0, i1, kmin, P, NULL, lse + (b * H + h) * T + i0, pack);
                    tp_sgemm_small(0, 1, bq, kn, d, 1.0f, dob, ldq, vb, ldk, 0.0f, dP, kn, pack);
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
                    tp_sgemm_small(0, 0, bq, d, kn, scale, dP, kn, kb, ldk, 0.0f, dqb, ldq, pack);
                    tp_sgemm_small(1, 0, kn, d, bq, scale, dP, kn, qb, ldq, 1.0f, dkb, ldk, pack);
                    tp_sgemm_small(1, 0, kn, d, bq, 1.0f, P, kn, dob, ldq, 1.0f, dvb, ldk, pack);
                }
            }
        }
        free(P);
        free(dP);
        free(pack);
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
    int64_t g = H / Hkv, ldq = H * d, ldk = Hkv * d, mc = cache->mc, nblk = (n + BQ - 1) / BQ;
    float scale = (float)(1.0 / sqrt((double)d));
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        /* scores of one query block (all heads of the group): cached keys, then the block's keys */
        int64_t bq = n < BQ ? n : BQ;
        float *P = malloc((size_t)(g * bq) * (size_t)(mc + n) * sizeof(float));
        unsigned char *vis = malloc((size_t)(mc + n));
        if (!P || !vis) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < Hkv * nblk; task++) {
            if (!P || !vis) continue;
            int64_t kvh = task / nblk, blk = task % nblk;
            int64_t i0 = blk * BQ, i1 = i0 + BQ < n ? i0 + BQ : n, nq = i1 - i0, kw = mc + i1;
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
