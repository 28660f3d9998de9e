#include "kernels/liza.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/sgemm_small.h"

double tp_liza_dt_coef(int m, int i) {
    double binom = 1;
    for (int j = 0; j < i; j++) binom = binom * (m - j) / (j + 1);
    return ldexp(i % 2 ? -binom : binom, -m);
}

/* Chunks of C real tokens in one row, counted per document. */
static int64_t row_chunks(const int32_t *ds, int64_t T, int64_t C) {
    int64_t n = 0;
    for (int64_t s = 0; s < T;) {
        int64_t e = s + 1;
        while (e < T && ds[e] == ds[s]) e++;
        n += (e - s + C - 1) / C;
        s = e;
    }
    return n;
}

/* Prefix sums of row_chunks over the rows (B + 1 entries, caller frees):
 * row b's states start at base[b] * Hkv. NULL when out of memory. */
static int64_t *row_bases(const tp_liza_dims *s, int64_t C, const int32_t *doc_start) {
    int64_t *base = malloc((size_t)(s->B + 1) * sizeof *base);
    if (!base) return NULL;
    base[0] = 0;
    for (int64_t b = 0; b < s->B; b++) base[b + 1] = base[b] + row_chunks(doc_start + b * s->T, s->T, C);
    return base;
}

size_t tp_liza_state_count(const tp_liza_dims *s, const tp_liza_cfg *c, const int32_t *doc_start) {
    size_t n = 0;
    for (int64_t b = 0; b < s->B; b++) n += (size_t)row_chunks(doc_start + b * s->T, s->T, c->chunk);
    return n * (size_t)s->Hkv;
}

/* row-major double products over cblas; trans flags 0/1 (fp32: sgemm_small.h) */
static void gemm_d(int ta, int tb, int64_t m, int64_t n, int64_t k, double al, const double *a, int64_t lda,
                   const double *b, int64_t ldb, double be, double *c, int64_t ldc) {
    if (m <= 0 || n <= 0) return;
    cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)m, (int)n,
                (int)k, al, a, (int)lda, b, (int)ldb, be, c, (int)ldc);
}
/* Solve (I + L) X = B (trans = 0) or (I + L)ᵀ X = B (trans = 1) in place;
 * L strictly lower, unit diagonal implied. */
static void trsm_d(int trans, int64_t m, int64_t n, const double *L, int64_t ldl, double *b, int64_t ldb) {
    cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, trans ? CblasTrans : CblasNoTrans, CblasUnit, (int)m, (int)n,
                1.0, L, (int)ldl, b, (int)ldb);
}

/* e^x of a non-positive log-decay difference; exp(0) = 1 exactly, so chunks
 * without decay cost no exponentials beyond a compare */
static inline float expr_f(float x) { return x == 0.0f ? 1.0f : expf(x); }
static inline double expr_d(double x) { return x == 0.0 ? 1.0 : exp(x); }

#define REAL float
#define EXPR expr_f
#define SFX(x) x##_f32
/* the per-chunk products are small: sgemm_small.h, w->pack the thread's scratch */
#define GEMM(...) tp_sgemm_small(__VA_ARGS__, w->pack)
#define TRSM(...) tp_strsm_small(__VA_ARGS__, w->pack)
#define tp_liza_fwd_f32 tp_liza_fwd
#define tp_liza_bwd_f32 tp_liza_bwd
#include "kernels/liza_impl.h"
#undef REAL
#undef SFX
#undef GEMM
#undef TRSM

#undef EXPR
#define REAL double
#define EXPR expr_d
#define SFX(x) x##_f64
#define GEMM gemm_d
#define TRSM trsm_d
#include "kernels/liza_impl.h"
