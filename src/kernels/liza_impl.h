/* liza_impl.h - the chunked LiZA kernel, written once for REAL = float and
 * REAL = double. Included by liza.c with REAL, EXPR, SFX(x), GEMM and TRSM
 * defined. Notation follows LIZA.md section 6; "virtual" rows are the n_h
 * slots of each real token (n_h = 1: virtual = real).
 *
 * Per chunk of one kv head (cv virtual rows, cr real rows):
 *   L = strict_lower(K̃ Kᵀ ⊙ E), E_ij = e^{γi-γj} entry by entry;
 *   [W | U] = (I + L)⁻¹ [ΓK̃ | Ṽ] by triangular solves, stored side by side;
 *   each query head of the GQA group in turn, reading q, dy and writing
 *   y, dq in place.
 * Chunks without decay skip the exponentials and the scalings by e^0 = 1; a
 * document's first chunk skips the products with its zero entry state (and
 * its last the ones with the zero gradient of its exit state); with n_h = 1
 * the virtual rows are the input rows themselves (every trick is the
 * identity at slot 0), read and written in place; the entry states are
 * written straight into the saved-state array; the next chunk's strided
 * rows are prefetched; the elementwise loops are vectorised. None of this
 * changes a rounding: the results are bit for bit those of the plain
 * formulation (every product computed, every copy made). Merging products
 * would not be: OpenBLAS picks its small-matrix or its blocked kernel by
 * shape, and the two round differently: merging the GQA heads' rows into
 * one product raised the fp32 error of y and dq by up to 40% (RMS, vs the
 * double kernel), merging their sums over rows that of dv by 14%, and an
 * explicit inverse of I + L (instead of the solves) that of dv by 9%.
 * GEMM and TRSM are the caller's: fp32 products and solves go through
 * sgemm_small.h (its own AVX-512 path; one summation order whatever the
 * shape), double ones through dgemm and dtrsm. */

typedef struct SFX(ws) {
    int64_t cv, cr, d, g;
    int decay;
    const REAL *Kv, *Vh; /* virtual rows (in place for n_h = 1) */
    int64_t ldk, ldv;
    REAL *Kb, *Vb, *Kt, *WU, *dWU, *Vn, *Lm, *M2, *E, *P, *dP, *QS, *dOG, *tmp, *dK, *dKt;
    REAL *Sn, *dS, *dSp, *dSin;
    REAL *gv, *gam, *Gam, *wexp, *dgam;
    float *pack; /* the fp32 products' scratch (sgemm_small.h) */
} SFX(ws);

static void SFX(ws_free)(SFX(ws) *w) {
    free(w->Kb); /* one block */
    free(w->pack);
    memset(w, 0, sizeof *w);
}

static int SFX(ws_alloc)(SFX(ws) *w, int64_t cr, int64_t cv, int64_t d, int64_t g) {
    int64_t nt = cv > 2 ? cv : 2;
    size_t n = (size_t)(3 * cv * d + 2 * cv * 2 * d + cv * d + 3 * cv * cv + 2 * cr * cv + 2 * cr * d + nt * d +
                        2 * cv * d + 4 * d * d + 5 * cv);
    REAL *p = malloc(n * sizeof(REAL));
    float *pack = malloc(tp_sgemm_small_scratch() * sizeof(float));
    memset(w, 0, sizeof *w);
    if (!p || !pack) {
        free(p);
        free(pack);
        return -1;
    }
    w->pack = pack;
    w->cv = cv; w->cr = cr; w->d = d; w->g = g;
#define TAKE(x, k) (w->x = p, p += (k))
    TAKE(Kb, cv * d); TAKE(Vb, cv * d); TAKE(Kt, cv * d); TAKE(WU, cv * 2 * d); TAKE(dWU, cv * 2 * d);
    TAKE(Vn, cv * d); TAKE(Lm, cv * cv); TAKE(M2, cv * cv); TAKE(E, cv * cv); TAKE(P, cr * cv); TAKE(dP, cr * cv); TAKE(QS, cr * d);
    TAKE(dOG, cr * d); TAKE(tmp, nt * d); TAKE(dK, cv * d); TAKE(dKt, cv * d); TAKE(Sn, d * d);
    TAKE(dS, d * d); TAKE(dSp, d * d); TAKE(dSin, d * d); TAKE(gv, cv); TAKE(gam, cv); TAKE(Gam, cv);
    TAKE(wexp, cv); TAKE(dgam, cv);
#undef TAKE
    return 0;
}
/* x^(m)_t for the trick (LIZA.md 2.4); rows x + t*ld, document start s. */
static void SFX(expand)(REAL *out, const REAL *x, int64_t ld, int64_t t, int64_t s, int m, int n, int trick,
                        int64_t d) {
    REAL dt[512], *o = trick == TP_TRICK_DT ? out : dt;
    if (trick != TP_TRICK_ROT) {
#pragma omp simd
        for (int64_t c = 0; c < d; c++) o[c] = 0;
        for (int i = 0; i <= m; i++) {
            if (t - i < s) break;
            REAL cf = (REAL)tp_liza_dt_coef(m, i);
            const REAL *xi = x + (t - i) * ld;
#pragma omp simd
            for (int64_t c = 0; c < d; c++) o[c] += cf * xi[c];
        }
    }
    if (trick == TP_TRICK_DT) return;
    const REAL *xt = x + t * ld;
    double th = 2.0 * M_PI * m / n;
    REAL cs = (REAL)cos(th), sn = (REAL)sin(th);
#pragma omp simd
    for (int64_t c = 0; c < d - 1; c += 2) {
        REAL a = xt[c], b = xt[c + 1];
        REAL ra = a * cs - b * sn, rb = a * sn + b * cs;
        if (trick == TP_TRICK_ROT) { out[c] = ra; out[c + 1] = rb; }
        else { out[c] = (REAL)0.5 * (o[c] + ra); out[c + 1] = (REAL)0.5 * (o[c + 1] + rb); }
    }
    if (d % 2) out[d - 1] = trick == TP_TRICK_ROT ? xt[d - 1] : (REAL)0.5 * (o[d - 1] + xt[d - 1]);
}

/* Transpose of expand: accumulate dx from the gradient of x^(m)_t. */
static void SFX(expand_bwd)(REAL *dx, int64_t ld, const REAL *g, int64_t t, int64_t s, int m, int n, int trick,
                            int64_t d) {
    REAL w = trick == TP_TRICK_RDT ? (REAL)0.5 : (REAL)1.0;
    if (trick != TP_TRICK_ROT) {
        for (int i = 0; i <= m; i++) {
            if (t - i < s) break;
            REAL cf = w * (REAL)tp_liza_dt_coef(m, i);
            REAL *di = dx + (t - i) * ld;
#pragma omp simd
            for (int64_t c = 0; c < d; c++) di[c] += cf * g[c];
        }
    }
    if (trick == TP_TRICK_DT) return;
    REAL *dt = dx + t * ld;
    double th = 2.0 * M_PI * m / n;
    REAL cs = (REAL)cos(th), sn = (REAL)sin(th);
#pragma omp simd
    for (int64_t c = 0; c < d - 1; c += 2) { /* R(-θ) */
        dt[c] += w * (g[c] * cs + g[c + 1] * sn);
        dt[c + 1] += w * (-g[c] * sn + g[c + 1] * cs);
    }
    if (d % 2) dt[d - 1] += w * g[d - 1];
}

/* Fill the chunk's virtual rows for real tokens [t0, t1) of the document
 * starting at s, in row b and kv head kvh: K, V (pointers into k, v for
 * n_h = 1), K̃ = β ⊙ K, [ΓK̃ | Ṽ] (the right-hand sides of W and U), g, γ,
 * Γ = e^γ, e^{G-γ}. */
static void SFX(build)(SFX(ws) *w, const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *k, const REAL *v,
                       const REAL *beta, const REAL *log_alpha, int64_t b, int64_t kvh, int64_t s, int64_t t0,
                       int64_t t1) {
    int64_t d = sd->d, ld = sd->Hkv * d, n = c->order, d2 = 2 * d;
    const REAL *kb = k + b * sd->T * ld + kvh * d, *vb = v + b * sd->T * ld + kvh * d;
    const REAL *bb = beta + b * sd->T * ld + kvh * d;
    int64_t cv = (t1 - t0) * n;
    w->cv = cv;
    w->cr = t1 - t0;
    if (n == 1) {
        w->Kv = kb + t0 * ld; w->ldk = ld;
        w->Vh = vb + t0 * ld; w->ldv = ld;
    } else {
        for (int64_t r = 0; r < t1 - t0; r++)
            for (int m = 0; m < n; m++) {
                int64_t i = r * n + m;
                SFX(expand)(w->Kb + i * d, kb, ld, t0 + r, s, m, (int)n, c->trick, d);
                SFX(expand)(w->Vb + i * d, vb, ld, t0 + r, s, m, (int)n, c->trick, d);
            }
        w->Kv = w->Kb; w->ldk = d;
        w->Vh = w->Vb; w->ldv = d;
    }
    int decay = 0;
    for (int64_t r = 0; r < t1 - t0; r++)
        for (int m = 0; m < n; m++) {
            REAL gi = (m == 0 && log_alpha) ? log_alpha[(b * sd->T + t0 + r) * sd->Hkv + kvh] : 0;
            w->gv[r * n + m] = gi;
            decay |= gi != 0;
        }
    w->decay = decay;
    REAL acc = 0;
    for (int64_t i = 0; i < cv; i++) {
        acc += w->gv[i];
        w->gam[i] = acc;
        w->Gam[i] = decay ? EXPR(acc) : 1;
    }
    REAL Gl = w->gam[cv - 1];
    for (int64_t i = 0; i < cv; i++) w->wexp[i] = decay ? EXPR(Gl - w->gam[i]) : 1;
    if (decay) /* E_ij = e^{γi-γj}, j <= i, once per chunk for every masked product */
        for (int64_t i = 0; i < cv; i++) {
            REAL gm = w->gam[i], *er = w->E + i * cv;
            for (int64_t j = 0; j <= i; j++) er[j] = EXPR(gm - w->gam[j]);
        }
    for (int64_t r = 0; r < t1 - t0; r++) {
        const REAL *bt = bb + (t0 + r) * ld;
        for (int m = 0; m < n; m++) {
            int64_t i = r * n + m;
            const REAL *kr = w->Kv + i * w->ldk, *vr = w->Vh + i * w->ldv;
            REAL *kt = w->Kt + i * d, *xk = w->WU + i * d2, *xv = xk + d, G = w->Gam[i];
#pragma omp simd
            for (int64_t e = 0; e < d; e++) {
                REAL t = bt[e] * kr[e];
                kt[e] = t;
                xk[e] = G * t;
                xv[e] = bt[e] * vr[e];
            }
        }
    }
}

/* Prefetch rows [ta, tb) of row b's inputs (and outputs, for writing) of kv
 * head kvh: the next chunk's rows are strided (one line set per token) and
 * would otherwise be fetched on demand, one miss at a time. */
static void SFX(prefetch_rows)(const REAL *x, int64_t ld, int64_t ta, int64_t tb, int64_t cnt, int rw) {
    if (!x) return;
    for (int64_t t = ta; t < tb; t++) {
        const char *p = (const char *)(x + t * ld);
        for (int64_t o = 0; o < cnt * (int64_t)sizeof(REAL); o += 64) {
            if (rw) __builtin_prefetch(p + o, 1, 3);
            else __builtin_prefetch(p + o, 0, 3);
        }
    }
}

static void SFX(prefetch)(const tp_liza_dims *sd, const REAL *k, const REAL *v, const REAL *beta, const REAL *q,
                          const REAL *dy, REAL *y, REAL *dq, REAL *dk, REAL *dv, REAL *dbeta, int64_t b, int64_t kvh,
                          int64_t ta, int64_t tb) {
    int64_t d = sd->d, ld = sd->Hkv * d, g = sd->H / sd->Hkv, ldq = sd->H * d;
    if (ta < 0) ta = 0;
    if (tb > sd->T) tb = sd->T;
    if (ta >= tb) return;
    int64_t okv = b * sd->T * ld + kvh * d, oq = b * sd->T * ldq + kvh * g * d;
    SFX(prefetch_rows)(k + okv, ld, ta, tb, d, 0);
    SFX(prefetch_rows)(v + okv, ld, ta, tb, d, 0);
    SFX(prefetch_rows)(beta + okv, ld, ta, tb, d, 0);
    SFX(prefetch_rows)(q + oq, ldq, ta, tb, g * d, 0);
    if (dy) SFX(prefetch_rows)(dy + oq, ldq, ta, tb, g * d, 0);
    if (y) SFX(prefetch_rows)(y + oq, ldq, ta, tb, g * d, 1);
    if (dq) SFX(prefetch_rows)(dq + oq, ldq, ta, tb, g * d, 1);
    if (dk) SFX(prefetch_rows)(dk + okv, ld, ta, tb, d, 1);
    if (dv) SFX(prefetch_rows)(dv + okv, ld, ta, tb, d, 1);
    if (dbeta) SFX(prefetch_rows)(dbeta + okv, ld, ta, tb, d, 1);
}

/* row i of a masked product: x_j *= E_ij for j < lim (lim <= i + 1), 0 for lim <= j < ncols */
static inline void SFX(mask_row)(const SFX(ws) *w, REAL *x, int64_t i, int64_t lim, int64_t ncols) {
    if (w->decay) {
        const REAL *er = w->E + i * w->cv;
#pragma omp simd
        for (int64_t j = 0; j < lim; j++) x[j] *= er[j];
    }
    for (int64_t j = lim; j < ncols; j++) x[j] = 0;
}

static inline REAL SFX(dval)(const SFX(ws) *w, int64_t i, int64_t j) {
    return w->decay ? w->E[i * w->cv + j] : 1;
}

/* The chunk's state-independent part: L, then [W | U] = (I + L)⁻¹ [ΓK̃ | Ṽ]
 * in place (one solve per half: the same operations as two separate
 * matrices). */
static void SFX(prep)(SFX(ws) *w) {
    int64_t d = w->d, cv = w->cv, d2 = 2 * d;
    GEMM(0, 1, cv, cv, d, 1, w->Kt, d, w->Kv, w->ldk, 0, w->Lm, cv);
    for (int64_t i = 0; i < cv; i++) SFX(mask_row)(w, w->Lm + i * cv, i, i, cv);
    TRSM(0, cv, d, w->Lm, cv, w->WU, d2);
    TRSM(0, cv, d, w->Lm, cv, w->WU + d, d2);
}

/* Vn = U - W S (S = NULL: zero state) */
static void SFX(vnew)(SFX(ws) *w, const REAL *S) {
    int64_t d = w->d, cv = w->cv;
    for (int64_t i = 0; i < cv; i++) memcpy(w->Vn + i * d, w->WU + i * 2 * d + d, (size_t)d * sizeof(REAL));
    if (S) GEMM(0, 0, cv, d, d, -1, w->WU, 2 * d, S, d, 1, w->Vn, d);
}

/* Sout = e^G S + Kᵀ diag(e^{G-γ}) Vn (S = NULL: zero state; Sout may be S) */
static void SFX(next_state)(SFX(ws) *w, const REAL *S, REAL *Sout) {
    int64_t d = w->d, cv = w->cv;
    const REAL *vn = w->Vn;
    if (w->decay) {
        for (int64_t i = 0; i < cv; i++) {
            REAL x = w->wexp[i];
            const REAL *a = w->Vn + i * d;
            REAL *o = w->tmp + i * d;
#pragma omp simd
            for (int64_t e = 0; e < d; e++) o[e] = x * a[e];
        }
        vn = w->tmp;
    }
    if (!S) {
        GEMM(1, 0, d, d, cv, 1, w->Kv, w->ldk, vn, d, 0, Sout, d);
        return;
    }
    if (w->decay) {
        REAL eG = EXPR(w->gam[cv - 1]);
#pragma omp simd
        for (int64_t e = 0; e < d * d; e++) Sout[e] = eG * S[e];
    } else if (Sout != S) {
        memcpy(Sout, S, (size_t)(d * d) * sizeof(REAL));
    }
    GEMM(1, 0, d, d, cv, 1, w->Kv, w->ldk, vn, d, 1, Sout, d);
}

/* Outputs of the group's query heads, head by head:
 * y = (Q Kᵀ ⊙ D) Vn + diag(Γ) Q S */
static void SFX(outputs)(SFX(ws) *w, const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *q, REAL *y,
                         const REAL *S, int64_t b, int64_t kvh, int64_t t0) {
    int64_t d = w->d, cv = w->cv, cr = w->cr, n = c->order, g = w->g, ldq = sd->H * d;
    for (int64_t h = kvh * g; h < (kvh + 1) * g; h++) {
        const REAL *qh = q + (b * sd->T + t0) * ldq + h * d;
        REAL *yh = y + (b * sd->T + t0) * ldq + h * d;
        GEMM(0, 1, cr, cv, d, 1, qh, ldq, w->Kv, w->ldk, 0, w->P, cv);
        for (int64_t r = 0; r < cr; r++) {
            int64_t i = r * n + n - 1;
            SFX(mask_row)(w, w->P + r * cv, i, i + 1, cv);
        }
        GEMM(0, 0, cr, d, cv, 1, w->P, cv, w->Vn, d, 0, yh, ldq);
        if (S) {
            GEMM(0, 0, cr, d, d, 1, qh, ldq, S, d, 0, w->QS, d);
            for (int64_t r = 0; r < cr; r++) {
                REAL G = w->Gam[r * n + n - 1], *yr = yh + r * ldq;
                const REAL *qs = w->QS + r * d;
#pragma omp simd
                for (int64_t e = 0; e < d; e++) yr[e] += G * qs[e];
            }
        }
    }
}
static REAL SFX(gelu_tanh)(REAL x, REAL *deriv) {
    const double k0 = 0.7978845608028654, k1 = 0.044715;
    double xd = (double)x, u = k0 * (xd + k1 * xd * xd * xd), th = tanh(u);
    if (deriv) *deriv = (REAL)(0.5 * (1 + th) + 0.5 * xd * (1 - th * th) * k0 * (1 + 3 * k1 * xd * xd));
    return (REAL)(0.5 * xd * (1 + th));
}

/* φ(S)_{r,c} = (S_rc / 2) gelu_tanh(2 S_rc / (|S_r| + 1e-6)) in place (rows = key index) */
static void SFX(phi)(REAL *S, int64_t d) {
    for (int64_t r = 0; r < d; r++) {
        REAL *row = S + r * d;
        double nn = 0;
        for (int64_t c = 0; c < d; c++) nn += (double)row[c] * row[c];
        REAL nr = (REAL)(sqrt(nn) + 1e-6);
        for (int64_t c = 0; c < d; c++) row[c] = row[c] / 2 * SFX(gelu_tanh)(2 * row[c] / nr, NULL);
    }
}

/* dS (in) -> gradient w.r.t. the pre-φ state S, written to out */
static void SFX(phi_bwd)(REAL *out, const REAL *S, const REAL *dphi, int64_t d) {
    for (int64_t r = 0; r < d; r++) {
        const REAL *row = S + r * d, *dr = dphi + r * d;
        double nn = 0;
        for (int64_t c = 0; c < d; c++) nn += (double)row[c] * row[c];
        double norm = sqrt(nn), nr = norm + 1e-6, acc = 0;
        for (int64_t c = 0; c < d; c++) {
            REAL gd, G = SFX(gelu_tanh)((REAL)(2 * row[c] / nr), &gd);
            out[r * d + c] = dr[c] * (G / 2 + (REAL)(row[c] * gd / nr));
            acc += (double)dr[c] * row[c] * row[c] * gd;
        }
        if (norm > 0)
            for (int64_t c = 0; c < d; c++) out[r * d + c] -= (REAL)(acc * row[c] / (nr * nr * norm));
    }
}

int SFX(tp_liza_fwd)(const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *q, const REAL *k, const REAL *v,
                     const REAL *beta, const REAL *log_alpha, const int32_t *doc_start, REAL *y, REAL *states,
                     tp_err *err) {
    int64_t B = sd->B, T = sd->T, Hkv = sd->Hkv, d = sd->d, C = c->chunk, n = c->order;
    if (d > 512) return tp_fail(err, TP_EUNSUP, "liza: head_dim %lld is larger than 512", (long long)d);
    int64_t *base = row_bases(sd, C, doc_start);
    if (!base) return tp_fail(err, TP_ENOMEM, "liza: out of memory");
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        SFX(ws) w;
        if (SFX(ws_alloc)(&w, C, C * n, d, sd->H / Hkv)) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (fail) continue;
            int64_t b = task / Hkv, kvh = task % Hkv;
            const int32_t *ds = doc_start + b * T;
            int64_t nc = base[b + 1] - base[b], ci = 0;
            REAL *st = states + (base[b] * Hkv + kvh * nc) * d * d;
            for (int64_t s = 0; s < T;) {
                int64_t e = s + 1;
                while (e < T && ds[e] == ds[s]) e++;
                memset(st + ci * d * d, 0, (size_t)(d * d) * sizeof(REAL));
                for (int64_t t0 = s; t0 < e; t0 += C, ci++) {
                    int64_t t1 = t0 + C < e ? t0 + C : e;
                    const REAL *S = t0 == s ? NULL : st + ci * d * d; /* the document's first state is 0 */
                    SFX(build)(&w, sd, c, k, v, beta, log_alpha, b, kvh, s, t0, t1);
                    SFX(prefetch)(sd, k, v, beta, q, NULL, y, NULL, NULL, NULL, NULL, b, kvh, t1, t1 + C);
                    SFX(prep)(&w);
                    SFX(vnew)(&w, S);
                    SFX(outputs)(&w, sd, c, q, y, S, b, kvh, t0);
                    if (t1 < e) { /* the next chunk's entry state */
                        REAL *Sx = st + (ci + 1) * d * d;
                        SFX(next_state)(&w, S, Sx);
                        if (!c->linear && t1 - t0 == C) SFX(phi)(Sx, d);
                    }
                }
                s = e;
            }
        }
        SFX(ws_free)(&w);
    }
    free(base);
    if (fail) return tp_fail(err, TP_ENOMEM, "liza: out of memory for chunk scratch");
    return TP_OK;
}

/* Inference: rows [first, T) of one document (B = 1) from the carried
 * states S [Hkv, d, d] (updated in place); rows [0, first) are the
 * document's preceding tokens, read only by the dt expansion. pos0 is the
 * document position of row `first`: chunks stay aligned to multiples of C
 * from the document start, and φ (linear = 0) is applied before a token at a
 * positive multiple of C, exactly where the full-sequence forward applies it. */
int SFX(tp_liza_fwd_seg)(const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *q, const REAL *k,
                         const REAL *v, const REAL *beta, const REAL *log_alpha, int64_t first, int64_t pos0,
                         REAL *S, REAL *y, tp_err *err) {
    int64_t T = sd->T, Hkv = sd->Hkv, d = sd->d, C = c->chunk, n = c->order;
    if (d > 512) return tp_fail(err, TP_EUNSUP, "liza: head_dim %lld is larger than 512", (long long)d);
    if (sd->B != 1 || first < 0 || first >= T || first > pos0)
        return tp_fail(err, TP_EINVAL, "internal: liza segment: bad rows (first %lld of %lld, position %lld)",
                       (long long)first, (long long)T, (long long)pos0);
    int64_t cr = T - first < C ? T - first : C;
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        SFX(ws) w;
        if (SFX(ws_alloc)(&w, cr, cr * n, d, sd->H / Hkv)) fail = 1;
#pragma omp for schedule(static)
        for (int64_t kvh = 0; kvh < Hkv; kvh++) {
            if (fail) continue;
            REAL *st = S + kvh * d * d;
            int64_t p = pos0;
            if (!c->linear && p > 0 && p % C == 0) SFX(phi)(st, d);
            for (int64_t t0 = first; t0 < T;) {
                int64_t len = C - p % C, t1 = t0 + len < T ? t0 + len : T;
                SFX(build)(&w, sd, c, k, v, beta, log_alpha, 0, kvh, 0, t0, t1);
                SFX(prep)(&w);
                SFX(vnew)(&w, st);
                SFX(outputs)(&w, sd, c, q, y, st, 0, kvh, t0);
                SFX(next_state)(&w, st, st);
                p += t1 - t0;
                if (!c->linear && p % C == 0 && t1 < T) SFX(phi)(st, d);
                t0 = t1;
            }
        }
        SFX(ws_free)(&w);
    }
    if (fail) return tp_fail(err, TP_ENOMEM, "liza: out of memory for chunk scratch");
    return TP_OK;
}
/* Backward of one chunk: w holds the recomputed forward (prep, vnew) for
 * entry state S (NULL: zero); dSp is the gradient of its exit state (NULL:
 * zero, the document's last chunk). Writes the gradient of the entry state
 * to dSin and the real tokens' gradients (overwritten for n_h = 1,
 * accumulated otherwise). */
static void SFX(chunk_bwd)(SFX(ws) *w, const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *q, const REAL *dy,
                           const REAL *beta, const REAL *S, const REAL *dSp, REAL *dSin, REAL *dq, REAL *dk,
                           REAL *dv, REAL *dbeta, REAL *dla, int64_t b, int64_t kvh, int64_t s, int64_t t0) {
    int64_t d = sd->d, cv = w->cv, cr = w->cr, n = c->order, g = w->g, ldq = sd->H * d, d2 = 2 * d;
    int64_t ld = sd->Hkv * d;
    int ndg = dla != NULL;
    REAL *gam = w->gam, *dgam = w->dgam, eG = w->decay ? EXPR(gam[cv - 1]) : 1;
    REAL *dVn = w->dWU + d; /* right half of [dW | dU], ld 2d */
    double dG = 0;
    /* S' = e^G S + Kᵀ diag(e^{G-γ}) Vn */
    if (dSp) {
        GEMM(0, 0, cv, d, d, 1, w->Kv, w->ldk, dSp, d, 0, dVn, d2); /* K dS' */
        GEMM(0, 1, cv, d, d, 1, w->Vn, d, dSp, d, 0, w->dK, d);     /* Vn dS'ᵀ */
        if (ndg && S)
            for (int64_t e = 0; e < d * d; e++) dG += (double)S[e] * dSp[e];
        dG *= eG;
        for (int64_t i = 0; i < cv; i++) {
            REAL x = w->wexp[i], *a = dVn + i * d2, *o = w->dK + i * d;
            if (w->decay) {
#pragma omp simd
                for (int64_t e = 0; e < d; e++) {
                    a[e] *= x;
                    o[e] *= x;
                }
            }
            if (ndg) {
                double t = 0;
                for (int64_t e = 0; e < d; e++) t += (double)a[e] * w->Vn[i * d + e];
                dG += t;
                dgam[i] = (REAL)-t;
            }
        }
        if (w->decay) {
#pragma omp simd
            for (int64_t e = 0; e < d * d; e++) dSin[e] = eG * dSp[e];
        } else {
            memcpy(dSin, dSp, (size_t)(d * d) * sizeof(REAL));
        }
    } else {
        for (int64_t i = 0; i < cv; i++) memset(dVn + i * d2, 0, (size_t)d * sizeof(REAL));
        memset(w->dK, 0, (size_t)(cv * d) * sizeof(REAL));
        memset(dSin, 0, (size_t)(d * d) * sizeof(REAL));
        if (ndg)
            for (int64_t i = 0; i < cv; i++) dgam[i] = -(REAL)0; /* -t of a zero t */
    }
    /* outputs of the group's query heads, head by head */
    for (int64_t h = kvh * g; h < (kvh + 1) * g; h++) {
        const REAL *qh = q + (b * sd->T + t0) * ldq + h * d, *dyh = dy + (b * sd->T + t0) * ldq + h * d;
        REAL *dqh = dq + (b * sd->T + t0) * ldq + h * d;
        const REAL *dog = dyh; /* diag(Γ) dO */
        int64_t ldg = ldq;
        if (w->decay) {
            for (int64_t r = 0; r < cr; r++) {
                REAL G = w->Gam[r * n + n - 1], *o = w->dOG + r * d;
                const REAL *a = dyh + r * ldq;
#pragma omp simd
                for (int64_t e = 0; e < d; e++) o[e] = G * a[e];
            }
            dog = w->dOG;
            ldg = d;
        }
        GEMM(0, 1, cr, cv, d, 1, qh, ldq, w->Kv, w->ldk, 0, w->P, cv);
        GEMM(0, 1, cr, cv, d, 1, dyh, ldq, w->Vn, d, 0, w->dP, cv);
        if (ndg && S) GEMM(0, 0, cr, d, d, 1, qh, ldq, S, d, 0, w->QS, d); /* Q S, for dγ */
        for (int64_t r = 0; r < cr; r++) {
            int64_t i = r * n + n - 1;
            REAL *pr = w->P + r * cv, *dpr = w->dP + r * cv;
            if (ndg) {
                double rs = 0;
                for (int64_t j = 0; j <= i; j++) {
                    REAL D = SFX(dval)(w, i, j);
                    pr[j] *= D;
                    REAL cc = dpr[j] * pr[j];
                    rs += cc;
                    dgam[j] -= cc;
                    dpr[j] *= D;
                }
                dgam[i] += (REAL)rs;
                for (int64_t j = i + 1; j < cv; j++) pr[j] = dpr[j] = 0;
                if (S) { /* dγ_i += Γ_i <Q S, dO> */
                    double qsd = 0;
                    for (int64_t e = 0; e < d; e++) qsd += (double)w->QS[r * d + e] * dyh[r * ldq + e];
                    dgam[i] += w->Gam[i] * (REAL)qsd;
                }
            } else {
                SFX(mask_row)(w, pr, i, i + 1, cv);
                SFX(mask_row)(w, dpr, i, i + 1, cv);
            }
        }
        GEMM(1, 0, cv, d, cr, 1, w->P, cv, dyh, ldq, 1, dVn, d2);                /* dVn += Pᵀ dO */
        if (S) GEMM(0, 1, cr, d, d, 1, dog, ldg, S, d, 0, dqh, ldq);             /* dQ = diag(Γ) dO Sᵀ */
        GEMM(0, 0, cr, d, cv, 1, w->dP, cv, w->Kv, w->ldk, S ? 1 : 0, dqh, ldq); /*   + (dP⊙D) K */
        GEMM(1, 0, cv, d, cr, 1, w->dP, cv, qh, ldq, 1, w->dK, d);               /* dK += (dP⊙D)ᵀ Q */
        GEMM(1, 0, d, d, cr, 1, qh, ldq, dog, ldg, 1, dSin, d);                  /* dS += Qᵀ diag(Γ) dO */
    }
    /* Vn = U - W S: dW = -dVn Sᵀ, dU = dVn, dS -= Wᵀ dVn */
    if (S) GEMM(0, 1, cv, d, d, -1, dVn, d2, S, d, 0, w->dWU, d2);
    else
        for (int64_t i = 0; i < cv; i++) memset(w->dWU + i * d2, 0, (size_t)d * sizeof(REAL));
    GEMM(1, 0, d, d, cv, -1, w->WU, d2, dVn, d2, 1, dSin, d);
    /* [X | Y] = (I + L)⁻ᵀ [dW | dU] in place, one solve per half */
    REAL *X = w->dWU, *Y = w->dWU + d;
    if (S) TRSM(1, cv, d, w->Lm, cv, X, d2);
    TRSM(1, cv, d, w->Lm, cv, Y, d2);
    /* W = A diag(Γ) K̃: dK̃ = Γ X, dγ_i += Γ_i <K̃_i, X_i> */
    for (int64_t i = 0; i < cv; i++) {
        const REAL *x = X + i * d2, *kt = w->Kt + i * d;
        REAL G = w->Gam[i], *o = w->dKt + i * d;
#pragma omp simd
        for (int64_t e = 0; e < d; e++) o[e] = G * x[e];
        if (ndg) {
            double t = 0;
            for (int64_t e = 0; e < d; e++) t += (double)kt[e] * x[e];
            dgam[i] += G * (REAL)t;
        }
    }
    /* dL = -(X Wᵀ + Y Uᵀ), strictly lower, then through L = (K̃ Kᵀ) ⊙ E */
    if (S) GEMM(0, 1, cv, cv, d, -1, X, d2, w->WU, d2, 0, w->M2, cv);
    GEMM(0, 1, cv, cv, d, -1, Y, d2, w->WU + d, d2, S ? 1 : 0, w->M2, cv);
    for (int64_t i = 0; i < cv; i++) {
        REAL *mr = w->M2 + i * cv;
        if (ndg) {
            const REAL *lr = w->Lm + i * cv;
            double rs = 0;
            for (int64_t j = 0; j < i; j++) {
                REAL dl = mr[j], cc = dl * lr[j];
                rs += cc;
                dgam[j] -= cc;
                mr[j] = dl * SFX(dval)(w, i, j);
            }
            dgam[i] += (REAL)rs;
            for (int64_t j = i; j < cv; j++) mr[j] = 0;
        } else {
            SFX(mask_row)(w, mr, i, i, cv);
        }
    }
    GEMM(0, 0, cv, d, cv, 1, w->M2, cv, w->Kv, w->ldk, 1, w->dKt, d);
    GEMM(1, 0, cv, d, cv, 1, w->M2, cv, w->Kt, d, 1, w->dK, d);
    if (ndg) { /* γ = cumsum(g): dg_i = Σ_{j>=i} dγ_j, with G = γ_last */
        dgam[cv - 1] += (REAL)dG;
        REAL acc = 0;
        for (int64_t i = cv - 1; i >= 0; i--) {
            acc += dgam[i];
            dgam[i] = acc;
        }
    }
    /* back to real tokens: through β ⊙ (.), the trick, and log α */
    REAL *dkb = dk + b * sd->T * ld + kvh * d, *dvb = dv + b * sd->T * ld + kvh * d;
    REAL *dbb = dbeta + b * sd->T * ld + kvh * d;
    const REAL *bb = beta + b * sd->T * ld + kvh * d;
    for (int64_t r = 0; r < cr; r++) {
        int64_t t = t0 + r;
        const REAL *bt = bb + t * ld;
        REAL *dbt = dbb + t * ld;
        if (n == 1) { /* slot 0 is the identity for every trick: write in place */
            const REAL *dkt = w->dKt + r * d, *dvt = Y + r * d2, *dkr = w->dK + r * d;
            const REAL *kr = w->Kv + r * w->ldk, *vr = w->Vh + r * w->ldv;
            REAL *dkd = dkb + t * ld, *dvd = dvb + t * ld;
#pragma omp simd
            for (int64_t e = 0; e < d; e++) {
                dbt[e] = dkt[e] * kr[e] + dvt[e] * vr[e];
                dkd[e] = dkr[e] + dkt[e] * bt[e];
                dvd[e] = dvt[e] * bt[e];
            }
            if (dla) dla[(b * sd->T + t) * sd->Hkv + kvh] = dgam[r];
            continue;
        }
        for (int m = 0; m < n; m++) {
            int64_t i = r * n + m;
            REAL *gk = w->tmp, *gv = w->tmp + d;
            for (int64_t e = 0; e < d; e++) {
                REAL dkt = w->dKt[i * d + e], dvt = Y[i * d2 + e];
                dbt[e] += dkt * w->Kv[i * w->ldk + e] + dvt * w->Vh[i * w->ldv + e];
                gk[e] = w->dK[i * d + e] + dkt * bt[e];
                gv[e] = dvt * bt[e];
            }
            SFX(expand_bwd)(dkb, ld, gk, t, s, m, (int)n, c->trick, d);
            SFX(expand_bwd)(dvb, ld, gv, t, s, m, (int)n, c->trick, d);
            if (m == 0 && dla) dla[(b * sd->T + t) * sd->Hkv + kvh] += dgam[i];
        }
    }
}

int SFX(tp_liza_bwd)(const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *q, const REAL *k, const REAL *v,
                     const REAL *beta, const REAL *log_alpha, const int32_t *doc_start, const REAL *states,
                     const REAL *dy, REAL *dq, REAL *dk, REAL *dv, REAL *dbeta, REAL *dlog_alpha, tp_err *err) {
    int64_t B = sd->B, T = sd->T, Hkv = sd->Hkv, d = sd->d, C = c->chunk, n = c->order, ld = Hkv * d;
    if (d > 512) return tp_fail(err, TP_EUNSUP, "liza: head_dim %lld is larger than 512", (long long)d);
    int64_t *base = row_bases(sd, C, doc_start);
    if (!base) return tp_fail(err, TP_ENOMEM, "liza: out of memory");
    REAL *dla = log_alpha ? dlog_alpha : NULL;
    int fail = 0;
#pragma omp parallel reduction(| : fail)
    {
        SFX(ws) w;
        if (SFX(ws_alloc)(&w, C, C * n, d, sd->H / Hkv)) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (fail) continue;
            int64_t b = task / Hkv, kvh = task % Hkv;
            if (n > 1)
                for (int64_t t = 0; t < T; t++) { /* this task owns these gradient slices */
                    size_t o = (size_t)((b * T + t) * ld + kvh * d);
                    memset(dk + o, 0, (size_t)d * sizeof(REAL));
                    memset(dv + o, 0, (size_t)d * sizeof(REAL));
                    memset(dbeta + o, 0, (size_t)d * sizeof(REAL));
                    if (dla) dla[(b * T + t) * Hkv + kvh] = 0;
                }
            const int32_t *ds = doc_start + b * T;
            int64_t nc = base[b + 1] - base[b];
            const REAL *st = states + (base[b] * Hkv + kvh * nc) * d * d;
            /* documents from the last, chunks from the last */
            int64_t ci = nc;
            for (int64_t e = T; e > 0;) {
                int64_t s = ds[e - 1];
                int64_t nch = (e - s + C - 1) / C;
                REAL *dS = NULL; /* the final state is not used */
                for (int64_t k0 = nch - 1; k0 >= 0; k0--) {
                    int64_t t0 = s + k0 * C, t1 = t0 + C < e ? t0 + C : e;
                    ci--;
                    const REAL *S = k0 == 0 ? NULL : st + ci * d * d;
                    SFX(build)(&w, sd, c, k, v, beta, log_alpha, b, kvh, s, t0, t1);
                    { /* the previous chunk of this document, or the previous document's last */
                        int64_t pa = k0 > 0 ? t0 - C : s > 0 ? ds[s - 1] + (s - ds[s - 1] - 1) / C * C : 0;
                        SFX(prefetch)(sd, k, v, beta, q, dy, NULL, dq, n == 1 ? dk : NULL, n == 1 ? dv : NULL,
                                      n == 1 ? dbeta : NULL, b, kvh, pa, k0 > 0 ? t0 : s);
                    }
                    SFX(prep)(&w);
                    SFX(vnew)(&w, S);
                    const REAL *dSp = dS;
                    if (dS && !c->linear && t1 - t0 == C) {
                        SFX(next_state)(&w, S, w.Sn);
                        SFX(phi_bwd)(w.dSp, w.Sn, dS, d);
                        dSp = w.dSp;
                    }
                    REAL *dSin = dS == w.dS ? w.dSin : w.dS;
                    SFX(chunk_bwd)(&w, sd, c, q, dy, beta, S, dSp, dSin, dq, dk, dv, dbeta, dla, b, kvh, s, t0);
                    dS = dSin;
                }
                e = s;
            }
        }
        SFX(ws_free)(&w);
    }
    free(base);
    if (fail) return tp_fail(err, TP_ENOMEM, "liza: out of memory for chunk scratch");
    return TP_OK;
}
