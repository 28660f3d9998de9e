#include "kernels/liza_gates.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

/* q̂ = u / max(|u|, 1e-6), u = silu(x), over one head's d features */
static void feature_fwd(float *out, const float *x, int64_t d) {
    double nn = 0;
    for (int64_t e = 0; e < d; e++) {
        float u = x[e] * sigm(x[e]);
        out[e] = u;
        nn += (double)u * u;
    }
    float inv = (float)(1.0 / fmax(sqrt(nn), 1e-6));
    for (int64_t e = 0; e < d; e++) out[e] *= inv;
}

/* dx += d feature / dx · g */
static void feature_bwd(float *dx, const float *x, const float *g, int64_t d) {
    float u[512];
    double nn = 0, dot = 0;
    for (int64_t e = 0; e < d; e++) {
        u[e] = x[e] * sigm(x[e]);
        nn += (double)u[e] * u[e];
    }
    double norm = sqrt(nn);
    if (norm > 1e-6) {
        for (int64_t e = 0; e < d; e++) dot += (double)u[e] * g[e];
        dot /= nn;
    }
    double inv = 1.0 / fmax(norm, 1e-6);
    for (int64_t e = 0; e < d; e++) {
        float s = sigm(x[e]);
        float du = (float)((g[e] - (norm > 1e-6 ? dot * u[e] : 0)) * inv);
        dx[e] += du * s * (1.0f + x[e] * (1.0f - s));
    }
}

/* the window of token t: indices max(t-2, s), max(t-1, s), t */
static inline void window(int64_t t, int64_t s, int64_t w[3]) {
    w[0] = t - 2 > s ? t - 2 : s;
    w[1] = t - 1 > s ? t - 1 : s;
    w[2] = t;
}

/* σ(pool(x)) for kv head j of token t (row base xb, leading dim ld) */
static void gate_vec(float *out, const float *xb, int64_t ld, int64_t t, int64_t s, int64_t off, int64_t d) {
    int64_t w[3];
    window(t, s, w);
    for (int64_t e = 0; e < d; e++)
        out[e] = sigm((xb[w[0] * ld + off + e] + xb[w[1] * ld + off + e] + xb[w[2] * ld + off + e]) / 3.0f);
}

void tp_liza_gates_fwd(const tp_gate_dims *g, const float *q, const float *k, const float *v, const int32_t *doc_start,
                       float *qh, float *kh, float *vh, float *beta, float *log_alpha) {
    int64_t N = g->B * g->T, d = g->d, H = g->H, Hkv = g->Hkv, ld = Hkv * d;
    float vs = (float)(1.0 / sqrt((double)d));
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++) feature_fwd(qh + (n * H + h) * d, q + (n * H + h) * d, d);
        int64_t b = n / g->T, t = n % g->T, s = doc_start[n];
        const float *kb = k + b * g->T * ld, *vb = v + b * g->T * ld;
        for (int64_t j = 0; j < Hkv; j++) {
            int64_t o = n * ld + j * d;
            feature_fwd(kh + o, k + o, d);
            for (int64_t e = 0; e < d; e++) vh[o + e] = v[o + e] * vs;
            float bk[512], bv[512];
            if (g->beta_gate == TP_GATE_K || g->beta_gate == TP_GATE_KV || g->alpha_gate == TP_GATE_K ||
                g->alpha_gate == TP_GATE_KV)
                gate_vec(bk, kb, ld, t, s, j * d, d);
            if (g->beta_gate == TP_GATE_V || g->beta_gate == TP_GATE_KV || g->alpha_gate == TP_GATE_V ||
                g->alpha_gate == TP_GATE_KV)
                gate_vec(bv, vb, ld, t, s, j * d, d);
            for (int64_t e = 0; e < d; e++)
                beta[o + e] = g->beta_gate == TP_GATE_K ? bk[e] : g->beta_gate == TP_GATE_V ? bv[e]
                            : g->beta_gate == TP_GATE_KV ? bk[e] * bv[e] : 0.5f;
            if (g->alpha_gate != TP_GATE_C) {
                double a = 0;
                for (int64_t e = 0; e < d; e++)
                    a += g->alpha_gate == TP_GATE_K ? bk[e] : g->alpha_gate == TP_GATE_V ? bv[e] : bk[e] * bv[e];
                log_alpha[n * Hkv + j] = (float)log(a / (double)d);
            }
        }
    }
}

void tp_liza_gates_bwd(const tp_gate_dims *g, const float *q, const float *k, const float *v, const int32_t *doc_start,
                       const float *dqh, const float *dkh, const float *dvh, const float *dbeta,
                       const float *dlog_alpha, float *dq, float *dk, float *dv) {
    int64_t N = g->B * g->T, T = g->T, d = g->d, H = g->H, Hkv = g->Hkv, ld = Hkv * d;
    float vs = (float)(1.0 / sqrt((double)d));
    int need_k = g->beta_gate == TP_GATE_K || g->beta_gate == TP_GATE_KV || g->alpha_gate == TP_GATE_K ||
                 g->alpha_gate == TP_GATE_KV;
    int need_v = g->beta_gate == TP_GATE_V || g->beta_gate == TP_GATE_KV || g->alpha_gate == TP_GATE_V ||
                 g->alpha_gate == TP_GATE_KV;
    /* feature maps: per token, independent */
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++) feature_bwd(dq + (n * H + h) * d, q + (n * H + h) * d, dqh + (n * H + h) * d, d);
        for (int64_t j = 0; j < Hkv; j++) {
            int64_t o = n * ld + j * d;
            feature_bwd(dk + o, k + o, dkh + o, d);
            for (int64_t e = 0; e < d; e++) dv[o + e] += dvh[o + e] * vs;
        }
    }
    if (!need_k && !need_v) return;
    /* gates: the pool spreads each token's gradient over up to three earlier
     * tokens of its row, so one thread per (row, kv head) keeps the sums ordered */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < g->B * Hkv; task++) {
        int64_t b = task / Hkv, j = task % Hkv;
        const float *kb = k + b * T * ld, *vb = v + b * T * ld;
        float *dkb = dk + b * T * ld, *dvb = dv + b * T * ld;
        for (int64_t t = 0; t < T; t++) {
            int64_t n = b * T + t, s = doc_start[n], o = n * ld + j * d, w[3];
            float bk[512], bv[512], gk[512], gvv[512];
            if (need_k) gate_vec(bk, kb, ld, t, s, j * d, d);
            if (need_v) gate_vec(bv, vb, ld, t, s, j * d, d);
            for (int64_t e = 0; e < d; e++) { gk[e] = 0; gvv[e] = 0; }
            const float *db = dbeta + o;
            for (int64_t e = 0; e < d; e++) {
                if (g->beta_gate == TP_GATE_K) gk[e] += db[e];
                else if (g->beta_gate == TP_GATE_V) gvv[e] += db[e];
                else if (g->beta_gate == TP_GATE_KV) { gk[e] += db[e] * bv[e]; gvv[e] += db[e] * bk[e]; }
            }
            if (g->alpha_gate != TP_GATE_C) {
                double a = 0;
                for (int64_t e = 0; e < d; e++)
                    a += g->alpha_gate == TP_GATE_K ? bk[e] : g->alpha_gate == TP_GATE_V ? bv[e] : bk[e] * bv[e];
                /* log α = log(mean) : d/dvec_e = 1 / (d · mean) = 1 / a */
                float c = (float)(dlog_alpha[n * Hkv + j] / a);
                for (int64_t e = 0; e < d; e++) {
                    if (g->alpha_gate == TP_GATE_K) gk[e] += c;
                    else if (g->alpha_gate == TP_GATE_V) gvv[e] += c;
                    else { gk[e] += c * bv[e]; gvv[e] += c * bk[e]; }
                }
            }
            window(t, s, w);
            for (int64_t e = 0; e < d; e++) {
                if (need_k) {
                    float dp = gk[e] * bk[e] * (1 - bk[e]) / 3.0f;
                    for (int i = 0; i < 3; i++) dkb[w[i] * ld + j * d + e] += dp;
                }
                if (need_v) {
                    float dp = gvv[e] * bv[e] * (1 - bv[e]) / 3.0f;
                    for (int i = 0; i < 3; i++) dvb[w[i] * ld + j * d + e] += dp;
                }
            }
        }
    }
}
