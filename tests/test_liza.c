/* test_liza.c - the chunked LiZA kernel against the sequential recurrence of
 * LIZA.md 2.3-2.5 (written here token by token, in double), for T = 1, 63,
 * 64, 65, 200, 1000, C = 16, 32, 64, n_h = 1, 2, 3 with every trick, decay on
 * and off, vector and constant β, linear and non-linear, GQA and three
 * documents per row; chunked double must agree to ~1e-12 and chunked fp32
 * to 1e-5 (max-relative). Gradients of the chunked double kernel against
 * central finite differences in double. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/liza.h"
#include "test.h"
#include "util/rng.h"

/* ---- reference: the definition, one token and one virtual step at a time */

static double gelu_tanh(double x) { return 0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }

static void ref_expand(double *out, const double *x, int64_t ld, int64_t t, int64_t s, int m, int n, int trick,
                       int64_t d) {
    double dt[512], rot[512];
    for (int64_t c = 0; c < d; c++) {
        dt[c] = 0;
        for (int i = 0; i <= m; i++) {
            double binom = 1;
            for (int j = 0; j < i; j++) binom = binom * (m - j) / (j + 1);
            double xv = t - i >= s ? x[(t - i) * ld + c] : 0;
            dt[c] += pow(2.0, -m) * (i % 2 ? -1 : 1) * binom * xv;
        }
    }
    double th = 2 * M_PI * m / n;
    for (int64_t c = 0; c < d; c++) rot[c] = x[t * ld + c];
    for (int64_t c = 0; c + 1 < d; c += 2) {
        double a = x[t * ld + c], b = x[t * ld + c + 1];
        rot[c] = a * cos(th) - b * sin(th);
        rot[c + 1] = a * sin(th) + b * cos(th);
    }
    for (int64_t c = 0; c < d; c++)
        out[c] = trick == TP_TRICK_DT ? dt[c] : trick == TP_TRICK_ROT ? rot[c] : 0.5 * (dt[c] + rot[c]);
}

static void reference(const tp_liza_dims *sd, const tp_liza_cfg *c, const double *q, const double *k,
                      const double *v, const double *beta, const double *la, const int32_t *ds, double *y) {
    int64_t T = sd->T, d = sd->d, H = sd->H, Hkv = sd->Hkv, g = H / Hkv, ld = Hkv * d, n = c->order;
    double *S = malloc((size_t)(d * d) * sizeof *S), kx[512], vx[512], kt[512], vt[512], sk[512];
    for (int64_t b = 0; b < sd->B; b++)
        for (int64_t h = 0; h < H; h++) {
            int64_t kvh = h / g;
            const double *kb = k + b * T * ld + kvh * d, *vb = v + b * T * ld + kvh * d;
            for (int64_t t = 0; t < T; t++) {
                int64_t s = ds[b * T + t];
                if (t == s) memset(S, 0, (size_t)(d * d) * sizeof *S);
                const double *bt = beta + (b * T + t) * ld + kvh * d;
                double alpha = la ? exp(la[(b * T + t) * Hkv + kvh]) : 1;
                for (int64_t e = 0; e < d * d; e++) S[e] *= alpha;
                for (int m = 0; m < n; m++) {
                    ref_expand(kx, kb, ld, t, s, m, (int)n, c->trick, d);
                    ref_expand(vx, vb, ld, t, s, m, (int)n, c->trick, d);
                    for (int64_t e = 0; e < d; e++) { kt[e] = bt[e] * kx[e]; vt[e] = bt[e] * vx[e]; }
                    for (int64_t cc = 0; cc < d; cc++) { /* Sᵀ k̃ */
                        sk[cc] = 0;
                        for (int64_t r = 0; r < d; r++) sk[cc] += S[r * d + cc] * kt[r];
                    }
                    for (int64_t r = 0; r < d; r++)
                        for (int64_t cc = 0; cc < d; cc++) S[r * d + cc] += kx[r] * (vt[cc] - sk[cc]);
                }
                const double *qt = q + (b * T + t) * H * d + h * d;
                double *yt = y + (b * T + t) * H * d + h * d;
                for (int64_t cc = 0; cc < d; cc++) {
                    yt[cc] = 0;
                    for (int64_t r = 0; r < d; r++) yt[cc] += S[r * d + cc] * qt[r];
                }
                /* non-linearity after every C real tokens of the document, not after its last */
                int64_t e = t + 1;
                int last_in_doc = e == T || ds[b * T + e] != s;
                if (!c->linear && (t - s + 1) % c->chunk == 0 && !last_in_doc)
                    for (int64_t r = 0; r < d; r++) {
                        double nn = 0;
                        for (int64_t cc = 0; cc < d; cc++) nn += S[r * d + cc] * S[r * d + cc];
                        double nr = sqrt(nn) + 1e-6;
                        for (int64_t cc = 0; cc < d; cc++) {
                            double x = S[r * d + cc];
                            S[r * d + cc] = x / 2 * gelu_tanh(2 * x / nr);
                        }
                    }
            }
        }
    free(S);
}

/* ---- inputs as the model makes them: unit-norm q̂, k̂, small v̂, β in (0,1) */

typedef struct inputs {
    tp_liza_dims s;
    double *q, *k, *v, *beta, *la;
    int32_t *ds;
} inputs;

static void unit_rows(double *x, int64_t rows, int64_t d, tp_rng *r) {
    for (int64_t i = 0; i < rows; i++) {
        double nn = 0;
        for (int64_t e = 0; e < d; e++) { x[i * d + e] = tp_rng_normal(r); nn += x[i * d + e] * x[i * d + e]; }
        for (int64_t e = 0; e < d; e++) x[i * d + e] /= sqrt(nn);
    }
}

static void make_inputs(inputs *in, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t d, int decay,
                        int const_beta, int docs, uint64_t seed) {
    in->s = (tp_liza_dims){B, T, H, Hkv, d};
    size_t N = (size_t)(B * T);
    in->q = malloc(N * (size_t)(H * d) * sizeof(double));
    in->k = malloc(N * (size_t)(Hkv * d) * sizeof(double));
    in->v = malloc(N * (size_t)(Hkv * d) * sizeof(double));
    in->beta = malloc(N * (size_t)(Hkv * d) * sizeof(double));
    in->la = decay ? malloc(N * (size_t)Hkv * sizeof(double)) : NULL;
    in->ds = malloc(N * sizeof(int32_t));
    tp_rng r;
    tp_rng_seed(&r, seed, 5);
    unit_rows(in->q, (int64_t)N * H, d, &r);
    unit_rows(in->k, (int64_t)N * Hkv, d, &r);
    for (size_t i = 0; i < N * (size_t)(Hkv * d); i++) {
        in->v[i] = tp_rng_normal(&r) / sqrt((double)d);
        in->beta[i] = const_beta ? 0.5 : 1 / (1 + exp(-tp_rng_normal(&r)));
    }
    if (decay)
        for (size_t i = 0; i < N * (size_t)Hkv; i++) in->la[i] = log(0.6 + 0.4 * tp_rng_uniform(&r));
    for (int64_t b = 0; b < B; b++) { /* `docs` documents per row at varied places */
        int64_t cut1 = docs > 1 ? T / 3 + b : T, cut2 = docs > 2 ? (2 * T) / 3 - b : T;
        for (int64_t t = 0; t < T; t++)
            in->ds[b * T + t] = (int32_t)(t >= cut2 && cut2 > cut1 ? cut2 : t >= cut1 && cut1 > 0 ? cut1 : 0);
    }
}

static void free_inputs(inputs *in) {
    free(in->q); free(in->k); free(in->v); free(in->beta); free(in->la); free(in->ds);
}

static float *to_f32(const double *x, size_t n) {
    float *f = malloc((n ? n : 1) * sizeof *f);
    for (size_t i = 0; i < n; i++) f[i] = (float)x[i];
    return f;
}

static double max_rel(const double *ref, const double *x, size_t n) {
    double mx = 0, md = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs(ref[i]));
        md = fmax(md, fabs(ref[i] - x[i]));
    }
    return mx > 0 ? md / mx : md;
}

static double worst64 = 0, worst32 = 0;

static void check_forward(const char *label, inputs *in, const tp_liza_cfg *c) {
    tp_liza_dims *s = &in->s;
    size_t ny = (size_t)(s->B * s->T * s->H * s->d), nkv = (size_t)(s->B * s->T * s->Hkv * s->d);
    double *yr = malloc(ny * sizeof *yr), *y64 = malloc(ny * sizeof *y64);
    reference(s, c, in->q, in->k, in->v, in->beta, in->la, in->ds, yr);
    size_t ns = tp_liza_state_count(s, c, in->ds) * (size_t)(s->d * s->d);
    double *st64 = malloc((ns ? ns : 1) * sizeof *st64);
    tp_err err = {0};
    CHECK(tp_liza_fwd_f64(s, c, in->q, in->k, in->v, in->beta, in->la, in->ds, y64, st64, &err) == TP_OK);
    double e64 = max_rel(yr, y64, ny);
    /* fp32 */
    float *q = to_f32(in->q, ny), *k = to_f32(in->k, nkv), *v = to_f32(in->v, nkv), *bt = to_f32(in->beta, nkv);
    float *la = in->la ? to_f32(in->la, (size_t)(s->B * s->T * s->Hkv)) : NULL;
    float *y32 = malloc(ny * sizeof *y32), *st32 = malloc((ns ? ns : 1) * sizeof *st32);
    CHECK(tp_liza_fwd(s, c, q, k, v, bt, la, in->ds, y32, st32, &err) == TP_OK);
    double *y32d = malloc(ny * sizeof *y32d);
    for (size_t i = 0; i < ny; i++) y32d[i] = y32[i];
    double e32 = max_rel(yr, y32d, ny);
    CHECK_MSG(e64 <= 1e-11, "%s: chunked double vs recurrence max-rel %.3e", label, e64);
    CHECK_MSG(e32 <= 1e-5, "%s: chunked fp32 vs recurrence max-rel %.3e", label, e32);
    worst64 = fmax(worst64, e64);
    worst32 = fmax(worst32, e32);
    free(yr); free(y64); free(st64); free(q); free(k); free(v); free(bt); free(la); free(y32); free(st32); free(y32d);
}

/* loss = Σ y ⊙ w for a fixed random w; gradients vs central differences */
static void check_grad(const char *label, inputs *in, const tp_liza_cfg *c) {
    tp_liza_dims *s = &in->s;
    size_t ny = (size_t)(s->B * s->T * s->H * s->d), nkv = (size_t)(s->B * s->T * s->Hkv * s->d);
    size_t nla = (size_t)(s->B * s->T * s->Hkv);
    double *y = malloc(ny * sizeof *y), *wy = malloc(ny * sizeof *wy);
    tp_rng r;
    tp_rng_seed(&r, 99, 1);
    for (size_t i = 0; i < ny; i++) wy[i] = tp_rng_normal(&r);
    size_t ns = tp_liza_state_count(s, c, in->ds) * (size_t)(s->d * s->d);
    double *st = malloc((ns ? ns : 1) * sizeof *st);
    tp_err err = {0};
    tp_liza_fwd_f64(s, c, in->q, in->k, in->v, in->beta, in->la, in->ds, y, st, &err);
    double *dq = malloc(ny * sizeof *dq), *dk = malloc(nkv * sizeof *dk), *dv = malloc(nkv * sizeof *dv);
    double *db = malloc(nkv * sizeof *db), *dla = malloc((nla ? nla : 1) * sizeof *dla);
    CHECK(tp_liza_bwd_f64(s, c, in->q, in->k, in->v, in->beta, in->la, in->ds, st, wy, dq, dk, dv, db, dla, &err) ==
          TP_OK);
    struct { const char *name; double *x, *g; size_t n; } vars[5] = {
        {"q", in->q, dq, ny}, {"k", in->k, dk, nkv}, {"v", in->v, dv, nkv}, {"beta", in->beta, db, nkv},
        {"log_alpha", in->la, dla, nla}};
    double worst = 0;
    for (int vi = 0; vi < 5; vi++) {
        if (!vars[vi].x) continue;
        for (int trial = 0; trial < 12; trial++) {
            size_t e = (size_t)(tp_rng_next(&r) % vars[vi].n);
            double keep = vars[vi].x[e], h = 1e-6, lp = 0, lm = 0;
            vars[vi].x[e] = keep + h;
            tp_liza_fwd_f64(s, c, in->q, in->k, in->v, in->beta, in->la, in->ds, y, st, &err);
            for (size_t i = 0; i < ny; i++) lp += y[i] * wy[i];
            vars[vi].x[e] = keep - h;
            tp_liza_fwd_f64(s, c, in->q, in->k, in->v, in->beta, in->la, in->ds, y, st, &err);
            for (size_t i = 0; i < ny; i++) lm += y[i] * wy[i];
            vars[vi].x[e] = keep;
            double fd = (lp - lm) / (2 * h), an = vars[vi].g[e];
            double dev = fabs(fd - an) / (1e-6 + fabs(fd));
            worst = fmax(worst, dev);
            CHECK_MSG(fabs(fd - an) <= 1e-6 + 1e-5 * fabs(fd), "%s: d/d%s[%zu] analytic %.10g, finite difference %.10g",
                      label, vars[vi].name, e, an, fd);
        }
    }
    printf("  %-40s gradient vs finite differences: worst relative %.2e\n", label, worst);
    free(y); free(wy); free(st); free(dq); free(dk); free(dv); free(db); free(dla);
}

int main(void) {
    static const struct { const char *name; int order, trick, linear, decay, const_beta; } presets[] = {
        {"delta_rule", 1, TP_TRICK_DT, 1, 0, 0},       {"gated_delta_rule", 1, TP_TRICK_DT, 1, 1, 0},
        {"delta_rule_gelu", 1, TP_TRICK_DT, 0, 0, 0},  {"delta_product", 2, TP_TRICK_DT, 1, 0, 0},
        {"gated_delta_product", 2, TP_TRICK_DT, 1, 1, 0}, {"delta_product_r", 2, TP_TRICK_ROT, 1, 0, 0},
        {"delta_product_c", 2, TP_TRICK_RDT, 1, 0, 0}, {"order3_dt_decay", 3, TP_TRICK_DT, 1, 1, 0},
        {"order3_rot_gelu", 3, TP_TRICK_ROT, 0, 1, 0}, {"order3_rdt", 3, TP_TRICK_RDT, 1, 0, 1},
        {"beta_c", 1, TP_TRICK_DT, 1, 1, 1},
    };
    int64_t Ts[] = {1, 63, 64, 65, 200, 1000};
    int Cs[] = {16, 32, 64};
    int np = (int)(sizeof presets / sizeof *presets);
    double all64 = 0, all32 = 0;
    for (int p = 0; p < np; p++) {
        worst64 = worst32 = 0;
        for (int ti = 0; ti < 6; ti++)
            for (int ci = 0; ci < 3; ci++) {
                int64_t T = Ts[ti];
                if (T == 1000 && ci != 1 && p % 3) continue; /* keep the long case affordable */
                inputs in;
                make_inputs(&in, 2, T, 4, 2, 16, presets[p].decay, presets[p].const_beta, T >= 3 ? 3 : 1,
                            (uint64_t)(p * 100 + ti * 10 + ci));
                tp_liza_cfg c = {presets[p].order, presets[p].trick, presets[p].linear, Cs[ci]};
                char label[96];
                snprintf(label, sizeof label, "%s T=%lld C=%d", presets[p].name, (long long)T, Cs[ci]);
                check_forward(label, &in, &c);
                free_inputs(&in);
            }
        printf("  %-22s forward vs recurrence (max-relative): chunked double %.2e, chunked fp32 %.2e\n",
               presets[p].name, worst64, worst32);
        all64 = fmax(all64, worst64);
        all32 = fmax(all32, worst32);
    }
    printf("forward: worst chunked-double %.2e, chunked-fp32 %.2e (max-relative vs recurrence)\n", all64, all32);
    /* odd head dim with rot leaves the last feature unrotated */
    {
        inputs in;
        make_inputs(&in, 1, 50, 2, 1, 7, 1, 0, 2, 77);
        tp_liza_cfg c = {2, TP_TRICK_ROT, 1, 8};
        check_forward("rot d=7", &in, &c);
        free_inputs(&in);
    }
    for (int p = 0; p < np; p++) {
        inputs in;
        make_inputs(&in, 2, 23, 4, 2, 8, presets[p].decay, presets[p].const_beta, 3, (uint64_t)(1000 + p));
        tp_liza_cfg c = {presets[p].order, presets[p].trick, presets[p].linear, 4};
        check_grad(presets[p].name, &in, &c);
        free_inputs(&in);
    }
    return tp_test_report("test_liza");
}
