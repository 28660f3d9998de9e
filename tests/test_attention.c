/* test_attention.c - the training softmax attention (kernels/attention.h)
 * against a direct double-precision evaluation of its definition, at lengths
 * that span several 128-row query blocks and 32-key panels: causal, packed
 * documents whose starts are not multiples of 32, a sliding window, GQA
 * (Hkv < H), head sizes that are not multiples of 32, and B = 2 rows.
 * Forward (o and lse) and backward (dq, dk, dv of Σ o·dout) on every ISA
 * path this CPU has (own AVX-512 tiles on packed keys and values, OpenBLAS
 * otherwise), and the same bits on 1 and 2 threads. The decoder-level tests
 * (test_decoder's finite differences, the PyTorch oracle) use T <= 40, one
 * query block: this is where the blocking is checked. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/matmul.h"
#include "test.h"
#include "util/rng.h"

typedef struct acase {
    const char *name;
    int64_t B, T, H, Hkv, d, window;
    int docs; /* 0: one document per row; else packed documents starting at odd positions */
} acase;

static int visible(const acase *c, const int32_t *ds, int64_t i, int64_t j) {
    return j >= ds[i] && j <= i && (c->window <= 0 || i - c->window < j);
}

/* o, lse and the gradients of Σ o·dout by the definition, in double */
static void reference(const acase *c, const int32_t *doc, const float *q, const float *k, const float *v,
                      const float *dout, double *o, double *lse, double *dq, double *dk, double *dv) {
    int64_t T = c->T, H = c->H, d = c->d, g = H / c->Hkv, ldq = H * d, ldk = c->Hkv * d;
    double scale = 1.0 / sqrt((double)d);
    double *p = malloc((size_t)T * sizeof(double)), *dp = malloc((size_t)T * sizeof(double));
    memset(dq, 0, (size_t)(c->B * T * ldq) * sizeof(double));
    memset(dk, 0, (size_t)(c->B * T * ldk) * sizeof(double));
    memset(dv, 0, (size_t)(c->B * T * ldk) * sizeof(double));
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t h = 0; h < H; h++) {
            int64_t kh = h / g;
            const int32_t *ds = doc + b * T;
            for (int64_t i = 0; i < T; i++) {
                const float *qi = q + (b * T + i) * ldq + h * d, *gi = dout + (b * T + i) * ldq + h * d;
                double mx = -INFINITY;
                for (int64_t j = 0; j < T; j++) {
                    p[j] = -INFINITY;
                    if (!visible(c, ds, i, j)) continue;
                    double s = 0;
                    for (int64_t e = 0; e < d; e++) s += (double)qi[e] * k[(b * T + j) * ldk + kh * d + e];
                    p[j] = s * scale;
                    if (p[j] > mx) mx = p[j];
                }
                double sum = 0;
                for (int64_t j = 0; j < T; j++) sum += p[j] == -INFINITY ? 0 : exp(p[j] - mx);
                lse[(b * H + h) * T + i] = mx + log(sum);
                double *oi = o + (b * T + i) * ldq + h * d;
                for (int64_t e = 0; e < d; e++) oi[e] = 0;
                for (int64_t j = 0; j < T; j++) {
                    p[j] = p[j] == -INFINITY ? 0 : exp(p[j] - mx) / sum;
                    for (int64_t e = 0; e < d; e++) oi[e] += p[j] * v[(b * T + j) * ldk + kh * d + e];
                }
                double D = 0;
                for (int64_t e = 0; e < d; e++) D += oi[e] * gi[e];
                for (int64_t j = 0; j < T; j++) {
                    double s = 0;
                    for (int64_t e = 0; e < d; e++) s += (double)gi[e] * v[(b * T + j) * ldk + kh * d + e];
                    dp[j] = p[j] * (s - D) * scale; /* d score, scaled back to q and k */
                    for (int64_t e = 0; e < d; e++) {
                        dq[(b * T + i) * ldq + h * d + e] += dp[j] * k[(b * T + j) * ldk + kh * d + e];
                        dk[(b * T + j) * ldk + kh * d + e] += dp[j] * qi[e];
                        dv[(b * T + j) * ldk + kh * d + e] += p[j] * gi[e];
                    }
                }
            }
        }
    free(p);
    free(dp);
}

/* worst |x - ref| / (max |ref| over the array) */
static double rel_err(const float *x, const double *ref, int64_t n) {
    double mx = 0, worst = 0;
    for (int64_t i = 0; i < n; i++) mx = fabs(ref[i]) > mx ? fabs(ref[i]) : mx;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)x[i] - ref[i]) / (mx > 0 ? mx : 1);
        if (!(e <= worst)) worst = isnan(e) ? INFINITY : e;
    }
    return worst;
}

typedef struct outs {
    float *o, *lse, *dq, *dk, *dv;
} outs;

static void run_kernel(const acase *c, const int32_t *doc, const float *q, const float *k, const float *v,
                       const float *dout, outs *r) {
    tp_attn_dims s = {c->B, c->T, c->H, c->Hkv, c->d, c->window};
    tp_err err = {0};
    CHECK_MSG(tp_attn_fwd(&s, q, k, v, doc, r->o, r->lse, &err) == TP_OK, "%s forward: %s", c->name, err.msg);
    CHECK_MSG(tp_attn_bwd(&s, q, k, v, doc, r->o, r->lse, dout, r->dq, r->dk, r->dv, &err) == TP_OK,
              "%s backward: %s", c->name, err.msg);
}

static int outs_alloc(outs *r, int64_t nq, int64_t nk, int64_t nl) {
    r->o = malloc((size_t)nq * sizeof(float));
    r->dq = malloc((size_t)nq * sizeof(float));
    r->lse = malloc((size_t)nl * sizeof(float));
    r->dk = malloc((size_t)nk * sizeof(float));
    r->dv = malloc((size_t)nk * sizeof(float));
    return r->o && r->dq && r->lse && r->dk && r->dv;
}

static void outs_free(outs *r) {
    free(r->o);
    free(r->dq);
    free(r->lse);
    free(r->dk);
    free(r->dv);
}

static int outs_same(const outs *a, const outs *b, int64_t nq, int64_t nk, int64_t nl) {
    return !memcmp(a->o, b->o, (size_t)nq * 4) && !memcmp(a->dq, b->dq, (size_t)nq * 4) &&
           !memcmp(a->lse, b->lse, (size_t)nl * 4) && !memcmp(a->dk, b->dk, (size_t)nk * 4) &&
           !memcmp(a->dv, b->dv, (size_t)nk * 4);
}

int main(void) {
    acase cases[] = {
        {"causal T 300 H 4 Hkv 2 d 40", 2, 300, 4, 2, 40, 0, 0},
        {"documents T 333 H 2 Hkv 1 d 64", 2, 333, 2, 1, 64, 0, 1},
        {"window 70 T 290 H 4 Hkv 4 d 24", 1, 290, 4, 4, 24, 70, 0},
        {"window 45 + documents T 260 H 6 Hkv 2 d 33", 2, 260, 6, 2, 33, 45, 1},
        {"short T 20 H 2 Hkv 1 d 8", 1, 20, 2, 1, 8, 0, 1},
    };
    int hw = (int)tp_mm_force_isa(TP_ISA_AVX512);
    tp_mm_force_isa(-1);
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const acase *c = &cases[ci];
        int64_t N = c->B * c->T, nq = N * c->H * c->d, nk = N * c->Hkv * c->d, nl = c->B * c->H * c->T;
        tp_rng r;
        tp_rng_seed(&r, 11 + ci, 0);
        float *q = malloc((size_t)nq * 4), *k = malloc((size_t)nk * 4), *v = malloc((size_t)nk * 4);
        float *dout = malloc((size_t)nq * 4);
        int32_t *doc = malloc((size_t)N * sizeof(int32_t));
        double *o = malloc((size_t)nq * 8), *lse = malloc((size_t)nl * 8), *dq = malloc((size_t)nq * 8);
        double *dk = malloc((size_t)nk * 8), *dv = malloc((size_t)nk * 8);
        for (int64_t i = 0; i < nq; i++) q[i] = 1.5f * tp_rng_normal(&r);
        for (int64_t i = 0; i < nk; i++) k[i] = tp_rng_normal(&r);
        for (int64_t i = 0; i < nk; i++) v[i] = tp_rng_normal(&r);
        for (int64_t i = 0; i < nq; i++) dout[i] = tp_rng_normal(&r);
        for (int64_t b = 0; b < c->B; b++) { /* documents from 0, 37 + 11b, 150 + 5b, 201 (not multiples of 32) */
            int32_t st[4] = {0, (int32_t)(37 + 11 * b), (int32_t)(150 + 5 * b), 201};
            for (int64_t t = 0; t < c->T; t++) {
                int32_t s0 = 0;
                for (int i = 0; i < 4 && c->docs; i++)
                    if (t >= st[i]) s0 = st[i];
                doc[b * c->T + t] = s0;
            }
        }
        reference(c, doc, q, k, v, dout, o, lse, dq, dk, dv);
        outs first = {0};
        int have_first = 0;
        for (int isa = hw; isa >= TP_ISA_SCALAR; isa--) {
            tp_mm_force_isa(isa);
            const char *path = tp_mm_isa_name((tp_mm_isa)isa);
            for (int threads = 2; threads >= 1; threads--) {
                omp_set_num_threads(threads);
                outs got;
                if (!outs_alloc(&got, nq, nk, nl)) {
                    CHECK_MSG(0, "out of memory");
                    outs_free(&got);
                    continue;
                }
                run_kernel(c, doc, q, k, v, dout, &got);
                double eo = rel_err(got.o, o, nq), el = rel_err(got.lse, lse, nl);
                double eq = rel_err(got.dq, dq, nq), ek = rel_err(got.dk, dk, nk), ev = rel_err(got.dv, dv, nk);
                /* fp32 sums over at most a few hundred terms: well under 1e-5 of the largest value */
                CHECK_MSG(eo < 2e-6 && el < 2e-6 && eq < 1e-5 && ek < 1e-5 && ev < 1e-5,
                          "%s, %s, %d thread(s): o %.2g lse %.2g dq %.2g dk %.2g dv %.2g of the largest", c->name,
                          path, threads, eo, el, eq, ek, ev);
                if (threads == 1 && isa == hw) {
                    /* results do not depend on the thread count */
                    CHECK_MSG(have_first && outs_same(&first, &got, nq, nk, nl), "%s, %s: 1 and 2 threads differ",
                              c->name, path);
                }
                if (threads == 2 && isa == hw) {
                    first = got;
                    have_first = 1;
                } else {
                    outs_free(&got);
                }
                if (ci == 0 && threads == 2)
                    printf("%s, %s: worst o %.2g lse %.2g dq %.2g dk %.2g dv %.2g\n", c->name, path, eo, el, eq, ek,
                           ev);
            }
        }
        if (have_first) outs_free(&first);
        tp_mm_force_isa(-1);
        omp_set_num_threads(2);
        free(q);
        free(k);
        free(v);
        free(dout);
        free(doc);
        free(o);
        free(lse);
        free(dq);
        free(dk);
        free(dv);
    }
    return tp_test_report("test_attention");
}
