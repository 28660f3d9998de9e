/* sgemm_small.c - see sgemm_small.h. */
#include "kernels/sgemm_small.h"

#include <cblas.h>
#include <immintrin.h>
#include <string.h>

#include "kernels/matmul.h"

/* B is packed KB x NB at a time (NB a multiple of both NR, 32 and 16); a B
 * panel (KB x NR floats, 32 KB at most) stays in L1 while every MR rows of A
 * pass over it. A is read in place. */
enum { KB = 256, NB = 128 };

size_t tp_sgemm_small_scratch(void) { return (size_t)KB * NB; }

static _Atomic int g_avx2_tile;
void tp_sgemm_small_avx2_tile(int on) { g_avx2_tile = on; }

#define TGT512 __attribute__((target("avx512f,avx2,fma")))
#define TGT256 __attribute__((target("avx2,fma")))

/* dst[r·ldd + c] = src[c·lds + r] for an 8 x 8 block */
TGT256 static void transpose8(float *dst, int64_t ldd, const float *src, int64_t lds) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds);
    __m256 r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds);
    __m256 r5 = _mm256_loadu_ps(src + 5 * lds), r6 = _mm256_loadu_ps(src + 6 * lds);
    __m256 r7 = _mm256_loadu_ps(src + 7 * lds);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3);
    __m256 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* bp[(pan·kb + p)·nr + j] = B(p, pan·nr + j), zero past column nb; b points
 * at B(0, 0) of the block, B(p, j) = tb ? b[j·ldb + p] : b[p·ldb + j]. */
TGT256 static void pack_b(float *bp, int nr, int tb, const float *b, int64_t ldb, int64_t kb, int64_t nb) {
    for (int64_t c0 = 0; c0 < nb; c0 += nr) {
        float *dst = bp + c0 * kb;
        int64_t cn = nb - c0 < nr ? nb - c0 : nr;
        if (!tb && cn == nr) { /* inline copies: a memcpy call per 64-128 bytes cost a third of the product */
            for (int64_t p = 0; p < kb; p++)
                for (int64_t j = 0; j < nr; j += 8)
                    _mm256_storeu_ps(dst + p * nr + j, _mm256_loadu_ps(b + p * ldb + c0 + j));
        } else if (!tb) {
            for (int64_t p = 0; p < kb; p++) {
                int64_t j = 0;
                for (; j < cn; j++) dst[p * nr + j] = b[p * ldb + c0 + j];
                for (; j < nr; j++) dst[p * nr + j] = 0;
            }
        } else {
            int64_t j = 0, k8 = kb / 8 * 8;
            for (; j + 8 <= cn; j += 8) { /* 8 x 8 blocks transposed in registers */
                for (int64_t p = 0; p < k8; p += 8) transpose8(dst + p * nr + j, nr, b + (c0 + j) * ldb + p, ldb);
                for (int64_t jj = j; jj < j + 8; jj++)
                    for (int64_t p = k8; p < kb; p++) dst[p * nr + jj] = b[(c0 + jj) * ldb + p];
            }
            for (; j < nr; j++) {
                if (j < cn) {
                    const float *src = b + (c0 + j) * ldb;
                    for (int64_t p = 0; p < kb; p++) dst[p * nr + j] = src[p];
                } else {
                    for (int64_t p = 0; p < kb; p++) dst[p * nr + j] = 0;
                }
            }
        }
    }
}

/* C tile [rows <= 8, cols <= 32] = alpha · Ap Bp + beta · C */
TGT512 static void ker_8x32(int64_t kb, const float *a, int64_t rs, int64_t cs, const float *bp, float *c,
                            int64_t ldc, int rows, int cols, const float *ab) {
    __m512 acc[8][2];
    int64_t off[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        off[i] = (i < rows ? i : rows - 1) * rs; /* rows past the tile repeat its last (not stored) */
    }
    const float *ap = a;
    for (int64_t p = 0; p < kb; p++, ap += cs) {
        __m512 b0 = _mm512_loadu_ps(bp + p * 32), b1 = _mm512_loadu_ps(bp + p * 32 + 16);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            __m512 av = _mm512_set1_ps(ap[off[i]]);
            acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
        }
    }
    __mmask16 m0 = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
    __mmask16 m1 = cols >= 32 ? (__mmask16)0xFFFF : cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1) : 0;
    float alpha = ab[0], beta = ab[1]; /* read after the loop: kept in registers they would spill an accumulator */
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        if (i >= rows) break;
        float *r = c + i * ldc;
        __m512 x0 = _mm512_mul_ps(va, acc[i][0]), x1 = _mm512_mul_ps(va, acc[i][1]);
        if (beta != 0) {
            x0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, r), x0);
            x1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, r + 16), x1);
        }
        _mm512_mask_storeu_ps(r, m0, x0);
        _mm512_mask_storeu_ps(r + 16, m1, x1);
    }
}

/* C tile [rows <= 6, cols <= 16] = alpha · Ap Bp + beta · C */
TGT256 static void ker_6x16(int64_t kb, const float *a, int64_t rs, int64_t cs, const float *bp, float *c,
                            int64_t ldc, int rows, int cols, const float *ab) {
    __m256 acc[6][2];
    int64_t off[6];
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        off[i] = (i < rows ? i : rows - 1) * rs;
    }
    const float *ap = a;
    for (int64_t p = 0; p < kb; p++, ap += cs) {
        __m256 b0 = _mm256_loadu_ps(bp + p * 16), b1 = _mm256_loadu_ps(bp + p * 16 + 8);
#pragma GCC unroll 6
        for (int i = 0; i < 6; i++) {
            __m256 av = _mm256_broadcast_ss(ap + off[i]);
            acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
        }
    }
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), idx);
    __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), idx);
    float alpha = ab[0], beta = ab[1];
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++) {
        if (i >= rows) break;
        float *r = c + i * ldc;
        __m256 x0 = _mm256_mul_ps(va, acc[i][0]), x1 = _mm256_mul_ps(va, acc[i][1]);
        if (cols == 16) {
            if (beta != 0) {
                x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r), x0);
                x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r + 8), x1);
            }
            _mm256_storeu_ps(r, x0);
            _mm256_storeu_ps(r + 8, x1);
        } else {
            if (beta != 0) {
                x0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(r, m0), x0);
                x1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(r + 8, m1), x1);
            }
            _mm256_maskstore_ps(r, m0, x0);
            _mm256_maskstore_ps(r + 8, m1, x1);
        }
    }
}

void tp_sgemm_small(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                    const float *b, int64_t ldb, float beta, float *c, int64_t ldc, float *scratch) {
    if (m <= 0 || n <= 0) return;
    /* AVX2: the 6x16 tile is on par with OpenBLAS's Haswell kernels on these
     * shapes (Zen 5, 1 thread: 71-88 GFLOP/s against 68-87, except Aᵀ with
     * rows 16 KB apart: 58 against 82; the LiZA kernel within 0-8%), not
     * enough for a second rounding path on AVX2 CPUs, so it runs only where
     * tests and benchmarks turn it on. */
    tp_mm_isa isa = tp_mm_isa_current();
    if (isa == TP_ISA_AVX2 && !g_avx2_tile) isa = TP_ISA_SCALAR;
    if (isa == TP_ISA_SCALAR || k <= 0) {
        tp_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    int wide = isa == TP_ISA_AVX512, mr = wide ? 8 : 6, nr = wide ? 32 : 16;
    int64_t rs = ta ? 1 : lda, cs = ta ? lda : 1; /* A(i, p) = a[i·rs + p·cs] */
    for (int64_t j0 = 0; j0 < n; j0 += NB) {
        int64_t nb = n - j0 < NB ? n - j0 : NB;
        for (int64_t p0 = 0; p0 < k; p0 += KB) {
            int64_t kb = k - p0 < KB ? k - p0 : KB;
            float ab[2] = {alpha, p0 ? 1.0f : beta}; /* later blocks of p add to the first's result */
            pack_b(scratch, nr, tb, tb ? b + j0 * ldb + p0 : b + p0 * ldb + j0, ldb, kb, nb);
            for (int64_t jc = 0; jc < nb; jc += nr) {
                int cols = (int)(nb - jc < nr ? nb - jc : nr);
                const float *bp = scratch + jc * kb;
                for (int64_t i0 = 0; i0 < m; i0 += mr) {
                    int rows = (int)(m - i0 < mr ? m - i0 : mr);
                    const float *at = a + i0 * rs + p0 * cs;
                    float *ct = c + i0 * ldc + j0 + jc;
                    if (wide) ker_8x32(kb, at, rs, cs, bp, ct, ldc, rows, cols, ab);
                    else ker_6x16(kb, at, rs, cs, bp, ct, ldc, rows, cols, ab);
                }
            }
        }
    }
}

size_t tp_sgemm_small_pack_floats(int64_t k, int64_t n) { return (size_t)((n + 31) / 32 * 32) * (size_t)k; }

int tp_sgemm_small_packs(void) { return tp_mm_isa_current() == TP_ISA_AVX512; }

void tp_sgemm_small_pack(tp_sgemm_small_b *pb, int tb, int64_t k, int64_t n, const float *b, int64_t ldb,
                         float *buf) {
    *pb = (tp_sgemm_small_b){b, ldb, k, n, tb, NULL};
    if (!tp_sgemm_small_packs() || k <= 0 || n <= 0) return;
    pack_b(buf, 32, tb, b, ldb, k, n); /* kb = k: panel pan at buf + pan·32·k, row p at + p·32 */
    pb->packed = buf;
}

void tp_sgemm_small_packed(int ta, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                           const tp_sgemm_small_b *pb, int64_t p0, int64_t j0, float beta, float *c, int64_t ldc,
                           float *scratch) {
    if (m <= 0 || n <= 0) return;
    if (!pb->packed || k <= 0) {
        const float *b = pb->tb ? pb->b + j0 * pb->ldb + p0 : pb->b + p0 * pb->ldb + j0;
        tp_sgemm_small(ta, pb->tb, m, n, k, alpha, a, lda, b, pb->ldb, beta, c, ldc, scratch);
        return;
    }
    int64_t rs = ta ? 1 : lda, cs = ta ? lda : 1;
    /* per panel the same blocks of KB rows as tp_sgemm_small, in the same order */
    for (int64_t jc = 0; jc < n; jc += 32) {
        int cols = (int)(n - jc < 32 ? n - jc : 32);
        const float *panel = pb->packed + (j0 + jc) / 32 * 32 * pb->k;
        for (int64_t pp = 0; pp < k; pp += KB) {
            int64_t kb = k - pp < KB ? k - pp : KB;
            float ab[2] = {alpha, pp ? 1.0f : beta};
            const float *bp = panel + (p0 + pp) * 32;
            for (int64_t i0 = 0; i0 < m; i0 += 8)
                ker_8x32(kb, a + i0 * rs + pp * cs, rs, cs, bp, c + i0 * ldc + jc, ldc,
                         (int)(m - i0 < 8 ? m - i0 : 8), cols, ab);
        }
    }
}

/* Unit lower solve within rows [r0, r1) of B (already updated for the rows
 * above): forward (trans = 0: row r -= Σ_{r0<=j<r} L[r, j] row j) or, trans
 * = 1 (Lᵀ, upper), backward (row r -= Σ_{r<j<r1} L[j, r] row j); 64 columns
 * at a time held in registers. */
TGT512 static void inblock512(int trans, const float *L, int64_t ldl, float *B, int64_t ldb, int64_t r0, int64_t r1,
                              int64_t n) {
    for (int64_t c0 = 0; c0 < n; c0 += 64) {
        int64_t w = n - c0 < 64 ? n - c0 : 64;
        __mmask16 mk[4];
        for (int q = 0; q < 4; q++) {
            int64_t rem = w - 16 * q;
            mk[q] = rem >= 16 ? (__mmask16)0xFFFF : rem > 0 ? (__mmask16)((1u << rem) - 1) : 0;
        }
        for (int64_t t = 1; t < r1 - r0; t++) {
            int64_t r = trans ? r1 - 1 - t : r0 + t;
            float *xr = B + r * ldb + c0;
            __m512 acc[4];
            for (int q = 0; q < 4; q++) acc[q] = _mm512_maskz_loadu_ps(mk[q], xr + 16 * q);
            int64_t ja = trans ? r + 1 : r0, jb = trans ? r1 : r;
            for (int64_t j = ja; j < jb; j++) {
                __m512 l = _mm512_set1_ps(trans ? L[j * ldl + r] : L[r * ldl + j]);
                const float *xj = B + j * ldb + c0;
                for (int q = 0; q < 4; q++)
                    acc[q] = _mm512_fnmadd_ps(l, _mm512_maskz_loadu_ps(mk[q], xj + 16 * q), acc[q]);
            }
            for (int q = 0; q < 4; q++) _mm512_mask_storeu_ps(xr + 16 * q, mk[q], acc[q]);
        }
    }
}

void tp_strsm_small(int trans, int64_t m, int64_t n, const float *L, int64_t ldl, float *b, int64_t ldb,
                    float *scratch) {
    if (m <= 0 || n <= 0) return;
    if (tp_mm_isa_current() != TP_ISA_AVX512) {
        cblas_strsm(CblasRowMajor, CblasLeft, CblasLower, trans ? CblasTrans : CblasNoTrans, CblasUnit, (int)m,
                    (int)n, 1.0f, L, (int)ldl, b, (int)ldb);
        return;
    }
    enum { RB = 16 }; /* rows solved in registers; the rest of each step is a product */
    if (!trans) {
        for (int64_t r0 = 0; r0 < m; r0 += RB) {
            int64_t r1 = r0 + RB < m ? r0 + RB : m;
            inblock512(0, L, ldl, b, ldb, r0, r1, n);
            if (r1 < m) /* rows below -= L[r1:, r0:r1] X[r0:r1] */
                tp_sgemm_small(0, 0, m - r1, n, r1 - r0, -1.0f, L + r1 * ldl + r0, ldl, b + r0 * ldb, ldb, 1.0f,
                               b + r1 * ldb, ldb, scratch);
        }
    } else {
        for (int64_t r1 = m; r1 > 0; r1 -= RB) {
            int64_t r0 = r1 - RB > 0 ? r1 - RB : 0;
            inblock512(1, L, ldl, b, ldb, r0, r1, n);
            if (r0 > 0) /* rows above -= L[r0:r1, :r0]ᵀ X[r0:r1] */
                tp_sgemm_small(1, 0, r0, n, r1 - r0, -1.0f, L + r0 * ldl, ldl, b + r0 * ldb, ldb, 1.0f, b, ldb,
                               scratch);
        }
    }
}
