/* liza_impl.h - the chunked LiZA kernel, written once for REAL = float and
 * REAL = double. Included by liza.c with REAL, SFX(x), GEMM and TRSM defined.
 * Notation follows LIZA.md section 6; "virtual" rows are the n_h slots of
 * each real token (n_h = 1: virtual = real). */

typedef struct SFX(ws) {
    int64_t cv, cr, d;
    REAL *Kv, *Ktv, *Vh, *Vtv, *W, *U, *Vn, *dVn, *dK, *dKt, *X, *Y, *tmp;
    REAL *Lm, *M2, *P, *dP, *QS, *dO;
    REAL *S, *Sn, *dS, *dSp, *dSin;
    REAL *g, *gam, *Gam, *dgam, *wexp;
} SFX(ws);

static void SFX(ws_free)(SFX(ws) *w) {
    free(w->Kv); /* one block */
    memset(w, 0, sizeof *w);
}

static int SFX(ws_alloc)(SFX(ws) *w, int64_t cr, int64_t cv, int64_t d) {
    size_t n = (size_t)(13 * cv * d + 2 * cv * cv + 2 * cr * cv + 2 * cr * d + 5 * d * d + 5 * cv);
    REAL *p = malloc(n * sizeof(REAL));
    if (!p) return -1;
    w->cv = cv; w->cr = cr; w->d = d;
#define TAKE(x, k) (w->x = p, p += (k))
    TAKE(Kv, cv * d); TAKE(Ktv, cv * d); TAKE(Vh, cv * d); TAKE(Vtv, cv * d); TAKE(W, cv * d); TAKE(U, cv * d);
    TAKE(Vn, cv * d); TAKE(dVn, cv * d); TAKE(dK, cv * d); TAKE(dKt, cv * d); TAKE(X, cv * d); TAKE(Y, cv * d);
    TAKE(tmp, cv * d); TAKE(Lm, cv * cv); TAKE(M2, cv * cv); TAKE(P, cr * cv); TAKE(dP, cr * cv);
    TAKE(QS, cr * d); TAKE(dO, cr * d); TAKE(S, d * d); TAKE(Sn, d * d); TAKE(dS, d * d); TAKE(dSp, d * d);
    TAKE(dSin, d * d); TAKE(g, cv); TAKE(gam, cv); TAKE(Gam, cv); TAKE(dgam, cv); TAKE(wexp, cv);
#undef TAKE
    return 0;
}

/* x^(m)_t for the trick (LIZA.md 2.4); rows x + t*ld, document start s. */
static void SFX(expand)(REAL *out, const REAL *x, int64_t ld, int64_t t, int64_t s, int m, int n, int trick,
                        int64_t d) {
    REAL dt[512], *o = trick == TP_TRICK_DT ? out : dt;
    if (trick != TP_TRICK_ROT) {
        for (int64_t c = 0; c < d; c++) o[c] = 0;
        for (int i = 0; i <= m; i++) {
            if (t - i < s) break;
            REAL cf = (REAL)tp_liza_dt_coef(m, i);
            const REAL *xi = x + (t - i) * ld;
            for (int64_t c = 0; c < d; c++) o[c] += cf * xi[c];
        }
    }
    if (trick == TP_TRICK_DT) return;
    const REAL *xt = x + t * ld;
    double th = 2.0 * M_PI * m / n;
    REAL cs = (REAL)cos(th), sn = (REAL)sin(th);
    for (int64_t c = 0; c + 1 < d; c += 2) {
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
            for (int64_t c = 0; c < d; c++) di[c] += cf * g[c];
        }
    }
    if (trick == TP_TRICK_DT) return;
    REAL *dt = dx + t * ld;
    double th = 2.0 * M_PI * m / n;
    REAL cs = (REAL)cos(th), sn = (REAL)sin(th);
    for (int64_t c = 0; c + 1 < d; c += 2) { /* R(-θ) */
        dt[c] += w * (g[c] * cs + g[c + 1] * sn);
        dt[c + 1] += w * (-g[c] * sn + g[c + 1] * cs);
    }
    if (d % 2) dt[d - 1] += w * g[d - 1];
}

/* Fill the chunk's virtual rows for real tokens [t0, t1) of the document
 * starting at s, in row b and kv head kvh; then γ, Γ. */
static void SFX(build)(SFX(ws) *w, const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *k, const REAL *v,
                       const REAL *beta, const REAL *log_alpha, int64_t b, int64_t kvh, int64_t s, int64_t t0,
                       int64_t t1) {
    int64_t d = sd->d, ld = sd->Hkv * d, n = c->order;
    const REAL *kb = k + b * sd->T * ld + kvh * d, *vb = v + b * sd->T * ld + kvh * d;
    const REAL *bb = beta + b * sd->T * ld + kvh * d;
    int64_t cv = (t1 - t0) * n;
    w->cv = cv;
    w->cr = t1 - t0;
    for (int64_t r = 0; r < t1 - t0; r++) {
        int64_t t = t0 + r;
        const REAL *bt = bb + t * ld;
        for (int m = 0; m < n; m++) {
            int64_t i = r * n + m;
            REAL *kr = w->Kv + i * d, *vr = w->Vh + i * d;
            SFX(expand)(kr, kb, ld, t, s, m, (int)n, c->trick, d);
            SFX(expand)(vr, vb, ld, t, s, m, (int)n, c->trick, d);
            for (int64_t e = 0; e < d; e++) {
                w->Ktv[i * d + e] = bt[e] * kr[e];
                w->Vtv[i * d + e] = bt[e] * vr[e];
            }
            w->g[i] = (m == 0 && log_alpha) ? log_alpha[(b * sd->T + t) * sd->Hkv + kvh] : 0;
        }
    }
    REAL acc = 0;
    for (int64_t i = 0; i < cv; i++) {
        acc += w->g[i];
        w->gam[i] = acc;
        w->Gam[i] = EXPR(acc);
    }
}

/* Forward of one chunk from entry state w->S: W, U, Vn, outputs of every
 * query head of the group (when y != NULL), and exit state w->Sn. */
static void SFX(chunk_fwd)(SFX(ws) *w, const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *q, REAL *y,
                           int64_t b, int64_t kvh, int64_t t0) {
    int64_t d = sd->d, cv = w->cv, cr = w->cr, n = c->order, g = sd->H / sd->Hkv, ldq = sd->H * d;
    const REAL *gam = w->gam;
    /* L = strictly lower (K̃ Kᵀ) ⊙ e^{γi-γj} */
    GEMM(0, 1, cv, cv, d, 1, w->Ktv, d, w->Kv, d, 0, w->Lm, cv);
    for (int64_t i = 0; i < cv; i++)
        for (int64_t j = 0; j < cv; j++)
            w->Lm[i * cv + j] = j < i ? w->Lm[i * cv + j] * EXPR(gam[i] - gam[j]) : 0;
    /* W = (I+L)^-1 diag(Γ) K̃, U = (I+L)^-1 Ṽ by forward substitution */
    for (int64_t i = 0; i < cv; i++)
        for (int64_t e = 0; e < d; e++) {
            w->W[i * d + e] = w->Gam[i] * w->Ktv[i * d + e];
            w->U[i * d + e] = w->Vtv[i * d + e];
        }
    TRSM(0, cv, d, w->Lm, cv, w->W, d);
    TRSM(0, cv, d, w->Lm, cv, w->U, d);
    /* Vn = U - W S */
    memcpy(w->Vn, w->U, (size_t)(cv * d) * sizeof(REAL));
    GEMM(0, 0, cv, d, d, -1, w->W, d, w->S, d, 1, w->Vn, d);
    if (y) {
        for (int64_t h = kvh * g; h < (kvh + 1) * g; h++) {
            const REAL *qh = q + (b * sd->T + t0) * ldq + h * d;
            REAL *yh = y + (b * sd->T + t0) * ldq + h * d;
            GEMM(0, 0, cr, d, d, 1, qh, ldq, w->S, d, 0, w->QS, d);
            GEMM(0, 1, cr, cv, d, 1, qh, ldq, w->Kv, d, 0, w->P, cv);
            for (int64_t r = 0; r < cr; r++) {
                int64_t i = r * n + n - 1;
                for (int64_t j = 0; j < cv; j++)
                    w->P[r * cv + j] = j <= i ? w->P[r * cv + j] * EXPR(gam[i] - gam[j]) : 0;
            }
            GEMM(0, 0, cr, d, cv, 1, w->P, cv, w->Vn, d, 0, yh, ldq);
            for (int64_t r = 0; r < cr; r++) {
                REAL G = w->Gam[r * n + n - 1];
                for (int64_t e = 0; e < d; e++) yh[r * ldq + e] += G * w->QS[r * d + e];
            }
        }
    }
    /* S' = e^G S + Kᵀ diag(e^{G-γ}) Vn */
    REAL Gl = gam[cv - 1], eG = EXPR(Gl);
    for (int64_t i = 0; i < cv; i++) {
        w->wexp[i] = EXPR(Gl - gam[i]);
        for (int64_t e = 0; e < d; e++) w->tmp[i * d + e] = w->wexp[i] * w->Vn[i * d + e];
    }
    for (int64_t e = 0; e < d * d; e++) w->Sn[e] = eG * w->S[e];
    GEMM(1, 0, d, d, cv, 1, w->Kv, d, w->tmp, d, 1, w->Sn, d);
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
        if (SFX(ws_alloc)(&w, C, C * n, d)) fail = 1;
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
                memset(w.S, 0, (size_t)(d * d) * sizeof(REAL));
                for (int64_t t0 = s; t0 < e; t0 += C, ci++) {
                    int64_t t1 = t0 + C < e ? t0 + C : e;
                    memcpy(st + ci * d * d, w.S, (size_t)(d * d) * sizeof(REAL));
                    SFX(build)(&w, sd, c, k, v, beta, log_alpha, b, kvh, s, t0, t1);
                    SFX(chunk_fwd)(&w, sd, c, q, y, b, kvh, t0);
                    memcpy(w.S, w.Sn, (size_t)(d * d) * sizeof(REAL));
                    if (!c->linear && t1 - t0 == C && t1 < e) SFX(phi)(w.S, d);
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
        if (SFX(ws_alloc)(&w, cr, cr * n, d)) fail = 1;
#pragma omp for schedule(static)
        for (int64_t kvh = 0; kvh < Hkv; kvh++) {
            if (fail) continue;
            REAL *st = S + kvh * d * d;
            memcpy(w.S, st, (size_t)(d * d) * sizeof(REAL));
            int64_t p = pos0;
            if (!c->linear && p > 0 && p % C == 0) SFX(phi)(w.S, d);
            for (int64_t t0 = first; t0 < T;) {
                int64_t len = C - p % C, t1 = t0 + len < T ? t0 + len : T;
                SFX(build)(&w, sd, c, k, v, beta, log_alpha, 0, kvh, 0, t0, t1);
                SFX(chunk_fwd)(&w, sd, c, q, y, 0, kvh, t0);
                memcpy(w.S, w.Sn, (size_t)(d * d) * sizeof(REAL));
                p += t1 - t0;
                if (!c->linear && p % C == 0 && t1 < T) SFX(phi)(w.S, d);
                t0 = t1;
            }
            memcpy(st, w.S, (size_t)(d * d) * sizeof(REAL));
        }
        SFX(ws_free)(&w);
    }
    if (fail) return tp_fail(err, TP_ENOMEM, "liza: out of memory for chunk scratch");
    return TP_OK;
}

/* Backward of one chunk (w holds the recomputed forward, w->dSp the
 * gradient of its exit state); fills w->dSin and accumulates the real-token
 * gradients. */
static void SFX(chunk_bwd)(SFX(ws) *w, const tp_liza_dims *sd, const tp_liza_cfg *c, const REAL *q, const REAL *dy,
                           const REAL *beta, REAL *dq, REAL *dk, REAL *dv, REAL *dbeta, REAL *dla, int64_t b,
                           int64_t kvh, int64_t s, int64_t t0) {
    int64_t d = sd->d, cv = w->cv, cr = w->cr, n = c->order, g = sd->H / sd->Hkv, ldq = sd->H * d;
    int64_t ld = sd->Hkv * d;
    REAL *gam = w->gam, *dgam = w->dgam, Gl = gam[cv - 1], eG = EXPR(Gl);
    /* S' = e^G S + Kᵀ diag(e^{G-γ}) Vn */
    GEMM(0, 0, cv, d, d, 1, w->Kv, d, w->dSp, d, 0, w->dVn, d); /* K dS' */
    GEMM(0, 1, cv, d, d, 1, w->Vn, d, w->dSp, d, 0, w->dK, d);  /* Vn dS'ᵀ */
    double dG = 0;
    for (int64_t e = 0; e < d * d; e++) dG += (double)w->S[e] * w->dSp[e];
    dG *= eG;
    for (int64_t i = 0; i < cv; i++) {
        double t = 0;
        for (int64_t e = 0; e < d; e++) {
            w->dVn[i * d + e] *= w->wexp[i];
            w->dK[i * d + e] *= w->wexp[i];
            t += (double)w->dVn[i * d + e] * w->Vn[i * d + e];
        }
        dG += t;
        dgam[i] = (REAL)-t;
    }
    for (int64_t e = 0; e < d * d; e++) w->dSin[e] = eG * w->dSp[e];
    /* outputs of every query head of the group */
    for (int64_t h = kvh * g; h < (kvh + 1) * g; h++) {
        const REAL *qh = q + (b * sd->T + t0) * ldq + h * d;
        const REAL *dyh = dy + (b * sd->T + t0) * ldq + h * d;
        REAL *dqh = dq + (b * sd->T + t0) * ldq + h * d;
        GEMM(0, 0, cr, d, d, 1, qh, ldq, w->S, d, 0, w->QS, d);
        GEMM(0, 1, cr, cv, d, 1, qh, ldq, w->Kv, d, 0, w->P, cv);
        GEMM(0, 1, cr, cv, d, 1, dyh, ldq, w->Vn, d, 0, w->dP, cv);
        for (int64_t r = 0; r < cr; r++) {
            int64_t i = r * n + n - 1;
            double rs = 0;
            for (int64_t j = 0; j < cv; j++) {
                if (j > i) { w->P[r * cv + j] = 0; w->dP[r * cv + j] = 0; continue; }
                REAL D = EXPR(gam[i] - gam[j]);
                w->P[r * cv + j] *= D;
                REAL cc = w->dP[r * cv + j] * w->P[r * cv + j];
                rs += cc;
                dgam[j] -= cc;
                w->dP[r * cv + j] *= D;
            }
            dgam[i] += (REAL)rs;
            REAL G = w->Gam[i];
            double qsd = 0;
            for (int64_t e = 0; e < d; e++) {
                qsd += (double)w->QS[r * d + e] * dyh[r * ldq + e];
                w->dO[r * d + e] = G * dyh[r * ldq + e];
            }
            dgam[i] += G * (REAL)qsd;
        }
        GEMM(1, 0, cv, d, cr, 1, w->P, cv, dyh, ldq, 1, w->dVn, d);          /* dVn += Pᵀ dO */
        GEMM(0, 1, cr, d, d, 1, w->dO, d, w->S, d, 0, dqh, ldq);              /* dQ = diag(Γ) dO Sᵀ */
        GEMM(0, 0, cr, d, cv, 1, w->dP, cv, w->Kv, d, 1, dqh, ldq);           /*   + (dP⊙D) K */
        GEMM(1, 0, cv, d, cr, 1, w->dP, cv, qh, ldq, 1, w->dK, d);            /* dK += (dP⊙D)ᵀ Q */
        GEMM(1, 0, d, d, cr, 1, qh, ldq, w->dO, d, 1, w->dSin, d);            /* dS += Qᵀ diag(Γ) dO */
    }
    /* Vn = U - W S */
    GEMM(0, 1, cv, d, d, -1, w->dVn, d, w->S, d, 0, w->X, d);                 /* dW = -dVn Sᵀ */
    GEMM(1, 0, d, d, cv, -1, w->W, d, w->dVn, d, 1, w->dSin, d);              /* dS -= Wᵀ dVn */
    memcpy(w->Y, w->dVn, (size_t)(cv * d) * sizeof(REAL));                    /* dU = dVn */
    /* through the inverse: X = Aᵀ dW, Y = Aᵀ dU */
    TRSM(1, cv, d, w->Lm, cv, w->X, d);
    TRSM(1, cv, d, w->Lm, cv, w->Y, d);
    for (int64_t i = 0; i < cv; i++) {
        double t = 0;
        for (int64_t e = 0; e < d; e++) {
            t += (double)w->Ktv[i * d + e] * w->X[i * d + e];
            w->dKt[i * d + e] = w->Gam[i] * w->X[i * d + e];
        }
        dgam[i] += w->Gam[i] * (REAL)t;
    }
    /* dL = -(X Wᵀ + Y Uᵀ), strictly lower, then through L = (K̃ Kᵀ) ⊙ E */
    GEMM(0, 1, cv, cv, d, -1, w->X, d, w->W, d, 0, w->M2, cv);
    GEMM(0, 1, cv, cv, d, -1, w->Y, d, w->U, d, 1, w->M2, cv);
    for (int64_t i = 0; i < cv; i++) {
        double rs = 0;
        for (int64_t j = 0; j < cv; j++) {
            if (j >= i) { w->M2[i * cv + j] = 0; continue; }
            REAL dl = w->M2[i * cv + j], cc = dl * w->Lm[i * cv + j];
            rs += cc;
            dgam[j] -= cc;
            w->M2[i * cv + j] = dl * EXPR(gam[i] - gam[j]);
        }
        dgam[i] += (REAL)rs;
    }
    GEMM(0, 0, cv, d, cv, 1, w->M2, cv, w->Kv, d, 1, w->dKt, d);
    GEMM(1, 0, cv, d, cv, 1, w->M2, cv, w->Ktv, d, 1, w->dK, d);
    /* γ = cumsum(g): dg_i = Σ_{j>=i} dγ_j, with G = γ_last */
    dgam[cv - 1] += (REAL)dG;
    REAL acc = 0;
    for (int64_t i = cv - 1; i >= 0; i--) {
        acc += dgam[i];
        dgam[i] = acc;
    }
    /* back to real tokens: through β ⊙ (.), the trick, and log α */
    REAL *dkb = dk + b * sd->T * ld + kvh * d, *dvb = dv + b * sd->T * ld + kvh * d;
    REAL *dbb = dbeta + b * sd->T * ld + kvh * d;
    const REAL *bb = beta + b * sd->T * ld + kvh * d;
    for (int64_t r = 0; r < cr; r++) {
        int64_t t = t0 + r;
        const REAL *bt = bb + t * ld;
        REAL *dbt = dbb + t * ld;
        for (int m = 0; m < n; m++) {
            int64_t i = r * n + m;
            REAL *gk = w->tmp, *gv = w->tmp + d;
            for (int64_t e = 0; e < d; e++) {
                REAL dkt = w->dKt[i * d + e], dvt = w->Y[i * d + e];
                dbt[e] += dkt * w->Kv[i * d + e] + dvt * w->Vh[i * d + e];
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
        if (SFX(ws_alloc)(&w, C, C * n, d)) fail = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (fail) continue;
            int64_t b = task / Hkv, kvh = task % Hkv;
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
                memset(w.dS, 0, (size_t)(d * d) * sizeof(REAL)); /* the final state is not used */
                for (int64_t k0 = nch - 1; k0 >= 0; k0--) {
                    int64_t t0 = s + k0 * C, t1 = t0 + C < e ? t0 + C : e;
                    ci--;
                    memcpy(w.S, st + ci * d * d, (size_t)(d * d) * sizeof(REAL));
                    SFX(build)(&w, sd, c, k, v, beta, log_alpha, b, kvh, s, t0, t1);
                    SFX(chunk_fwd)(&w, sd, c, q, NULL, b, kvh, t0);
                    if (!c->linear && t1 - t0 == C && t1 < e) SFX(phi_bwd)(w.dSp, w.Sn, w.dS, d);
                    else memcpy(w.dSp, w.dS, (size_t)(d * d) * sizeof(REAL));
                    SFX(chunk_bwd)(&w, sd, c, q, dy, beta, dq, dk, dv, dbeta, dla, b, kvh, s, t0);
                    memcpy(w.dS, w.dSin, (size_t)(d * d) * sizeof(REAL));
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
