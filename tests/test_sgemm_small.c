/* test_sgemm_small.c - the small-matrix fp32 product of the LiZA kernel
 * (kernels/sgemm_small.h) against a long-double product: every transpose
 * combination, alpha and beta, leading dimensions past the width, sizes that
 * leave partial register tiles and cross the 256-deep and 128-wide packing
 * blocks, beta = 0 over a C full of NaN (C must not be read), the bytes
 * around C untouched; on every tile path this CPU has (AVX-512, AVX2), and
 * the AVX-512 and AVX2 tiles bit for bit equal (same summation order).
 * tp_strsm_small, both directions, against long-double substitution (on
 * the AVX-512 path with the upper triangle and the diagonal of L filled
 * with NaN: never read). Products on a packed operand (tp_sgemm_small_pack
 * once, tp_sgemm_small_packed on blocks of it) equal tp_sgemm_small on the
 * same block bit for bit, on every path, the bytes around C untouched. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/matmul.h"
#include "kernels/sgemm_small.h"
#include "test.h"
#include "util/rng.h"

typedef struct shape {
    int64_t m, n, k;
} shape;

/* C = alpha op(A) op(B) + beta C0 in long double; bound[i] = Σ|a||b| */
static void ref_gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                     const float *b, int64_t ldb, float beta, const float *c0, int64_t ldc, long double *out,
                     long double *bound) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            long double s = 0, sb = 0;
            for (int64_t p = 0; p < k; p++) {
                long double x = ta ? a[p * lda + i] : a[i * lda + p];
                long double y = tb ? b[j * ldb + p] : b[p * ldb + j];
                s += x * y;
                sb += fabsl(x * y);
            }
            out[i * n + j] = alpha * s + (beta != 0 ? (long double)beta * c0[i * ldc + j] : 0);
            bound[i * n + j] = fabsl(alpha) * sb + (beta != 0 ? fabsl((long double)beta * c0[i * ldc + j]) : 0);
        }
}

/* one case on the path in effect: returns the C it computed (caller frees) */
static float *run_case(int ta, int tb, shape s, float alpha, float beta, int64_t pad, tp_rng *r, float *scratch,
                       const char *path, uint64_t seed) {
    int64_t m = s.m, n = s.n, k = s.k;
    int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    int64_t lda = ac + pad, ldb = bc + pad, ldc = n + pad;
    tp_rng_seed(r, seed, 0);
    float *a = malloc((size_t)(ar * lda) * sizeof(float)), *b = malloc((size_t)(br * ldb) * sizeof(float));
    size_t cn = (size_t)(m * ldc + 64);
    float *c = malloc(cn * sizeof(float)), *c0 = malloc(cn * sizeof(float));
    for (int64_t i = 0; i < ar * lda; i++) a[i] = tp_rng_normal(r);
    for (int64_t i = 0; i < br * ldb; i++) b[i] = tp_rng_normal(r);
    for (size_t i = 0; i < cn; i++) c0[i] = beta == 0 ? NAN : tp_rng_normal(r);
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = n; j < ldc; j++) c0[i * ldc + j] = 12345.0f; /* the padding must stay */
    for (size_t i = (size_t)(m * ldc); i < cn; i++) c0[i] = 54321.0f;
    memcpy(c, c0, cn * sizeof(float));
    tp_sgemm_small(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, scratch);
    long double *ref = malloc((size_t)(m * n) * sizeof(long double)), *bnd = malloc((size_t)(m * n) * sizeof *bnd);
    ref_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c0, ldc, ref, bnd);
    double worst = 0;
    int bad_pad = 0, nan = 0;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < n; j++) {
            float v = c[i * ldc + j];
            if (!isfinite(v)) nan++;
            /* k + 2 roundings of at most 2^-24 each, relative to Σ|a||b| */
            long double allowed = bnd[i * n + j] * (k + 2) * 0x1p-24L + 1e-30L;
            double e = (double)(fabsl((long double)v - ref[i * n + j]) / allowed);
            if (e > worst) worst = e;
        }
        for (int64_t j = n; j < ldc; j++) bad_pad += c[i * ldc + j] != 12345.0f;
    }
    for (size_t i = (size_t)(m * ldc); i < cn; i++) bad_pad += c[i] != 54321.0f;
    CHECK_MSG(nan == 0 && worst <= 1.0 && bad_pad == 0,
              "%s ta %d tb %d m %lld n %lld k %lld alpha %g beta %g pad %lld: %d non-finite, error %.3g of the "
              "bound, %d bytes outside C changed",
              path, ta, tb, (long long)m, (long long)n, (long long)k, alpha, beta, (long long)pad, nan, worst, bad_pad);
    free(a);
    free(b);
    free(c0);
    free(ref);
    free(bnd);
    return c;
}

/* (I + L) X = B or (I + L)ᵀ X = B against long-double substitution */
static void trsm_case(int trans, int64_t m, int64_t n, int64_t pad, tp_rng *r, float *scratch, const char *path) {
    int own = tp_mm_isa_current() == TP_ISA_AVX512; /* cblas_strsm's reads are OpenBLAS's business */
    int64_t ldl = m + pad, ldb = n + pad;
    float *L = malloc((size_t)(m * ldl) * sizeof(float)), *b = malloc((size_t)(m * ldb) * sizeof(float));
    long double *x = malloc((size_t)(m * n) * sizeof(long double));
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < ldl; j++) /* as in LiZA: products of short vectors, |L| < 1 */
            L[i * ldl + j] = j < i ? 0.6f * (tp_rng_uniform(r) - 0.5f) : own ? NAN : 0.0f;
    for (int64_t i = 0; i < m * ldb; i++) b[i] = tp_rng_normal(r);
    for (int64_t i = 0; i < m; i++)
        for (int64_t c = 0; c < n; c++) x[i * n + c] = b[i * ldb + c];
    for (int64_t t = 0; t < m; t++) {
        int64_t i = trans ? m - 1 - t : t;
        for (int64_t c = 0; c < n; c++) {
            long double s = x[i * n + c];
            if (trans)
                for (int64_t j = i + 1; j < m; j++) s -= (long double)L[j * ldl + i] * x[j * n + c];
            else
                for (int64_t j = 0; j < i; j++) s -= (long double)L[i * ldl + j] * x[j * n + c];
            x[i * n + c] = s;
        }
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t c = n; c < ldb; c++) b[i * ldb + c] = 777.0f;
    tp_strsm_small(trans, m, n, L, ldl, b, ldb, scratch);
    double worst = 0, scale = 0;
    int bad_pad = 0;
    for (int64_t i = 0; i < m * n; i++) scale = fabsl(x[i]) > scale ? (double)fabsl(x[i]) : scale;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t c = 0; c < n; c++) {
            double e = (double)fabsl((long double)b[i * ldb + c] - x[i * n + c]) / scale;
            if (!(e <= worst)) worst = isnan(e) ? INFINITY : e > worst ? e : worst;
        }
        for (int64_t c = n; c < ldb; c++) bad_pad += b[i * ldb + c] != 777.0f;
    }
    /* forward error of a well-conditioned triangular solve: a few m·u */
    CHECK_MSG(worst <= 4.0 * (double)m * 0x1p-24 && bad_pad == 0,
              "%s trsm trans %d m %lld n %lld pad %lld: error %.3g of max|x| (allowed %.3g), %d padding changed", path,
              trans, (long long)m, (long long)n, (long long)pad, worst, 4.0 * (double)m * 0x1p-24, bad_pad);
    free(L);
    free(b);
    free(x);
}

/* op(B) [K, N] packed once; blocks [p0, p0 + k) x [j0, j0 + n) of it in
 * products against tp_sgemm_small on the same block: the same bits, and C
 * (NaN with beta 0) with its padding as tp_sgemm_small leaves it */
static void packed_cases(tp_rng *r, float *scratch, const char *path) {
    enum { K = 300, N = 200, PAD = 3 };
    struct { int64_t m, n, k, p0, j0; } blk[] = {{1, 1, 1, 0, 0},      {9, 33, 17, 5, 32},   {128, 200, 64, 0, 0},
                                                {64, 45, 300, 0, 128}, {13, 64, 257, 43, 96}, {8, 7, 2, 298, 192},
                                                {100, 168, 130, 170, 32}};
    int64_t nb = K * (N + PAD) > N * (K + PAD) ? K * (N + PAD) : N * (K + PAD); /* B [K, N] or [N, K], padded */
    float *b = malloc((size_t)nb * sizeof(float));
    float *buf = malloc(tp_sgemm_small_pack_floats(K, N) * sizeof(float));
    float *a = malloc((size_t)(300 * 310) * sizeof(float));
    float *c = malloc((size_t)(128 * 210 + 64) * sizeof(float)), *c2 = malloc((size_t)(128 * 210 + 64) * sizeof(float));
    for (int64_t i = 0; i < nb; i++) b[i] = tp_rng_normal(r);
    for (int64_t i = 0; i < 300 * 310; i++) a[i] = tp_rng_normal(r);
    int bad = 0, cases = 0;
    for (int tb = 0; tb < 2; tb++) {
        int64_t ldb = tb ? K + PAD : N + PAD;
        tp_sgemm_small_b pb;
        tp_sgemm_small_pack(&pb, tb, K, N, b, ldb, buf);
        for (size_t bi = 0; bi < sizeof blk / sizeof blk[0]; bi++)
            for (int ta = 0; ta < 2; ta++)
                for (int beta0 = 0; beta0 < 2; beta0++) {
                    int64_t m = blk[bi].m, n = blk[bi].n, k = blk[bi].k, p0 = blk[bi].p0, j0 = blk[bi].j0;
                    int64_t lda = (ta ? m : k) + 2, ldc = n + 5;
                    float beta = beta0 ? 0.0f : 0.75f;
                    for (int64_t i = 0; i < 128 * 210 + 64; i++) c[i] = beta0 ? NAN : (float)(i % 17) - 8.0f;
                    memcpy(c2, c, (size_t)(128 * 210 + 64) * sizeof(float));
                    tp_sgemm_small_packed(ta, m, n, k, -0.5f, a, lda, &pb, p0, j0, beta, c, ldc, scratch);
                    const float *bb = tb ? b + j0 * ldb + p0 : b + p0 * ldb + j0;
                    tp_sgemm_small(ta, tb, m, n, k, -0.5f, a, lda, bb, ldb, beta, c2, ldc, scratch);
                    int same = 1;
                    for (int64_t i = 0; i < 128 * 210 + 64; i++) /* NaN padding compares by bits */
                        same &= memcmp(&c[i], &c2[i], sizeof(float)) == 0;
                    CHECK_MSG(same, "%s packed: tb %d ta %d m %lld n %lld k %lld p0 %lld j0 %lld beta %g differs from "
                              "tp_sgemm_small", path, tb, ta, (long long)m, (long long)n, (long long)k,
                              (long long)p0, (long long)j0, beta);
                    bad += !same;
                    cases++;
                }
    }
    printf("%s: %d products on a packed operand, %d differ\n", path, cases, bad);
    free(b);
    free(buf);
    free(a);
    free(c);
    free(c2);
}

int main(void) {
    shape shapes[] = {{1, 1, 1},    {7, 5, 3},     {8, 32, 16},   {9, 33, 17},    {64, 128, 128}, {64, 64, 128},
                      {128, 128, 64}, {6, 16, 256}, {13, 129, 257}, {100, 200, 300}, {33, 47, 520}, {3, 300, 2}};
    int nshapes = (int)(sizeof shapes / sizeof shapes[0]);
    float alphas[] = {1.0f, -1.0f, 0.5f}, betas[] = {0.0f, 1.0f, 0.25f};
    float *scratch = malloc(tp_sgemm_small_scratch() * sizeof(float));
    tp_rng r;
    int hw = (int)tp_mm_force_isa(TP_ISA_AVX512);
    tp_sgemm_small_avx2_tile(1);
    int paths = 0, compared = 0;
    for (int isa = hw; isa >= TP_ISA_AVX2; isa--) {
        tp_mm_force_isa(isa);
        paths++;
        const char *path = tp_mm_isa_name((tp_mm_isa)isa);
        uint64_t seed = 1;
        for (int si = 0; si < nshapes; si++)
            for (int ta = 0; ta < 2; ta++)
                for (int tb = 0; tb < 2; tb++)
                    for (int ai = 0; ai < 3; ai++)
                        for (int bi = 0; bi < 3; bi++) {
                            int64_t pad = (si + ta + 2 * tb + ai + bi) % 3 == 0 ? 0 : 5 + si;
                            seed++;
                            float *c = run_case(ta, tb, shapes[si], alphas[ai], betas[bi], pad, &r, scratch, path,
                                                seed);
                            if (isa == TP_ISA_AVX512 && hw == TP_ISA_AVX512 && si % 3 == 1) {
                                /* the AVX2 tile sums in the same order: the same bits */
                                tp_mm_force_isa(TP_ISA_AVX2);
                                float *c2 = run_case(ta, tb, shapes[si], alphas[ai], betas[bi], pad, &r, scratch,
                                                     "avx2", seed);
                                int64_t cn = shapes[si].m * (shapes[si].n + pad);
                                CHECK_MSG(memcmp(c, c2, (size_t)cn * sizeof(float)) == 0,
                                          "avx512 and avx2 tiles differ: ta %d tb %d m %lld n %lld k %lld", ta, tb,
                                          (long long)shapes[si].m, (long long)shapes[si].n, (long long)shapes[si].k);
                                compared++;
                                free(c2);
                                tp_mm_force_isa(TP_ISA_AVX512);
                            }
                            free(c);
                        }
    }
    tp_sgemm_small_avx2_tile(0);
    /* the solves: the AVX-512 blocks where the CPU has them, cblas_strsm */
    int64_t tm[] = {1, 2, 15, 16, 17, 33, 64, 100, 256}, tn[] = {1, 7, 16, 64, 65, 128, 256};
    int trsm_paths = 0;
    for (int isa = hw; isa >= TP_ISA_AVX2; isa--) {
        tp_mm_force_isa(isa);
        trsm_paths++;
        tp_rng_seed(&r, 99, (uint64_t)isa);
        for (int mi = 0; mi < 9; mi++)
            for (int ni = 0; ni < 7; ni++)
                for (int trans = 0; trans < 2; trans++)
                    trsm_case(trans, tm[mi], tn[ni], (mi + ni) % 2 ? 3 : 0, &r, scratch,
                              tp_mm_isa_name((tp_mm_isa)isa));
    }
    printf("triangular solves tested on %d path(s)\n", trsm_paths);
    /* packed operands: own tiles (AVX-512; AVX2 with its tile on) and the OpenBLAS fallback */
    tp_rng_seed(&r, 7, 0);
    for (int isa = hw; isa >= TP_ISA_AVX2; isa--)
        for (int tile = 1; tile >= (isa == TP_ISA_AVX2 ? 0 : 1); tile--) {
            tp_mm_force_isa(isa);
            tp_sgemm_small_avx2_tile(tile);
            packed_cases(&r, scratch, tile ? tp_mm_isa_name((tp_mm_isa)isa) : "cblas");
        }
    tp_sgemm_small_avx2_tile(0);
    tp_mm_force_isa(-1);
    if (paths == 0) printf("SKIP: no AVX2 on this CPU: only the cblas fallback, tested through test_liza\n");
    printf("tile paths tested: %d (%s), %d cases compared avx512 vs avx2 bit for bit\n", paths,
           tp_mm_isa_name((tp_mm_isa)hw), compared);
    free(scratch);
    return tp_test_report("test_sgemm_small");
}
