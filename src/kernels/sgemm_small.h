/* sgemm_small.h - fp32 products and unit-triangular solves of small
 * matrices on one thread: the chunked LiZA kernel's (32-256 rows by 32-256
 * columns) and the softmax attention's block products in training (64
 * query rows against up to T keys), each OpenMP thread on its own heads.
 *
 * Why not OpenBLAS: at these sizes its sgemm and strsm spend much of their
 * time around the compute kernel (generic packing and blocking; strsm was a
 * quarter of the LiZA kernel's time), and its speed depends on the core it
 * picked (OPENBLAS_CORETYPE=Haswell, as some sites and this project's
 * sandbox set, runs AVX2 kernels on AVX-512 CPUs). Here B is packed per call
 * into panels of NR columns, p-major (inline copies, or 8x8 register
 * transposes for Bᵀ), one panel held in L1 while every MR rows of A, read in
 * place, pass over it; packing also removes the cache-set conflicts of rows
 * strided by a power of two (q, k, v rows of one head are H·d floats apart).
 * Solves: 16 rows at a time substituted in registers, the rest of each step
 * one product. Figures: bench/README.md "Fifth round".
 *
 * Rounding: each C element is alpha · (Σ_p A_ip B_pj by fused multiply-adds
 * in the order p = 0, 1, ..., per block of 256 p) plus beta · C: the AVX-512
 * and AVX2 tiles sum in the same order and agree bit for bit.
 *
 * ISA: tp_mm_isa_current() (TPTT_ISA, tp_mm_force_isa choose a lower path).
 * AVX-512: the 8x32 register tile and the register solves; otherwise
 * cblas_sgemm / cblas_strsm (an AVX2+FMA 6x16 tile exists, but it is only
 * on par with OpenBLAS's Haswell kernels on these shapes, so only tests and
 * benchmarks turn it on: bench_liza --avx2-tile). */
#ifndef TPTT_KERNELS_SGEMM_SMALL_H
#define TPTT_KERNELS_SGEMM_SMALL_H

#include <stddef.h>
#include <stdint.h>

/* Floats of scratch tp_sgemm_small and tp_strsm_small need, whatever the
 * shape (128 KB). */
size_t tp_sgemm_small_scratch(void);

/* C[m, n] = alpha · op(A) · op(B) + beta · C, row-major: op(A) is A [m, k]
 * (lda >= k) or, ta = 1, Aᵀ of A [k, m] (lda >= m); op(B) likewise [k, n]
 * or Bᵀ of B [n, k]. beta = 0: C is not read (it may hold NaN). scratch: at
 * least tp_sgemm_small_scratch() floats, owned by the caller, one per
 * thread. No OpenMP inside; call it from any thread. */
void tp_sgemm_small(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                    const float *b, int64_t ldb, float beta, float *c, int64_t ldc, float *scratch);

/* op(B) [k, n] prepared once for many products that each use a block of
 * it (the softmax attention's keys and values, reused by every query block
 * of a head). AVX-512: packed into panels of 32 columns, p-major, each
 * holding all k rows, so any rows [p0, p0 + kb) of a panel are contiguous;
 * otherwise only b, ldb and tb are recorded and each product is a
 * tp_sgemm_small call on the block. Pack and products must run under the
 * same ISA (tp_mm_isa_current). */
typedef struct tp_sgemm_small_b {
    const float *b; /* the source (products read it when not packed) */
    int64_t ldb, k, n;
    int tb;
    const float *packed; /* NULL when not packed */
} tp_sgemm_small_b;

/* Floats of buf that tp_sgemm_small_pack may fill for op(B) [k, n]:
 * ceil(n / 32) · 32 · k. */
size_t tp_sgemm_small_pack_floats(int64_t k, int64_t n);

/* 1 when tp_sgemm_small_pack fills buf under the ISA in effect (else buf
 * is not touched and may be NULL). */
int tp_sgemm_small_packs(void);

/* Describe op(B) (B [k, n] (ldb >= n) or, tb = 1, Bᵀ of B [n, k] (ldb >= k))
 * in *pb, packing it into buf (caller-owned, tp_sgemm_small_pack_floats
 * floats) where the ISA packs. pb and buf must outlive the products; b too
 * where nothing is packed. */
void tp_sgemm_small_pack(tp_sgemm_small_b *pb, int tb, int64_t k, int64_t n, const float *b, int64_t ldb,
                         float *buf);

/* C[m, n] = alpha · op(A) · op(B)[p0 : p0 + k, j0 : j0 + n] + beta · C, op(B)
 * as described by pb (j0 a multiple of 32; the block inside op(B)). A, C,
 * beta and scratch as for tp_sgemm_small; the sums are those tp_sgemm_small
 * forms on the same block, bit for bit. */
void tp_sgemm_small_packed(int ta, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                           const tp_sgemm_small_b *pb, int64_t p0, int64_t j0, float beta, float *c, int64_t ldc,
                           float *scratch);

/* Solve (I + L) X = B (trans = 0) or (I + L)ᵀ X = B (trans = 1) in place:
 * L [m, m] strictly lower (ldl; its diagonal and upper part are not read, a
 * unit diagonal is implied), B [m, n] (ldb) becomes X. AVX-512: blocks of 16
 * rows substituted in registers, the rest of each step one tp_sgemm_small
 * update (scratch as there); otherwise cblas_strsm. */
void tp_strsm_small(int trans, int64_t m, int64_t n, const float *L, int64_t ldl, float *b, int64_t ldb,
                    float *scratch);

/* For tests and benchmarks: use the AVX2 6x16 tile where AVX2 is the ISA in
 * effect (on = 1) instead of cblas_sgemm. Not thread safe. */
void tp_sgemm_small_avx2_tile(int on);

#endif
