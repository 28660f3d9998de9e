/* svd.h - distributed dense linear algebra on ScaLAPACK (docs/linalg.md):
 * the SVDs behind PiSSA initialisation (lora.init: pissa / pissa_niter_K)
 * and adapter rank surgery (`tptt adapter resize | convert-pissa`).
 *
 * Every call here is COLLECTIVE over MPI_COMM_WORLD: all ranks call it with
 * the same arguments (the same full input matrix, which every rank can read:
 * the base model is mmapped on every node) and all ranks receive the same
 * full results. Internally the matrix is distributed block-cyclically
 * (square blocks of `block`) on one BLACS process grid nprow x npcol chosen
 * from the rank count (most square, nprow >= npcol: 1 -> 1x1, 2 -> 2x1,
 * 4 -> 2x2, 6 -> 3x2), each rank filling its own blocks straight from the
 * input (no scatter); wide matrices are factorised as their transpose, so
 * the grid always sees a tall matrix. Results are gathered with one
 * MPI_Allreduce (every element has exactly one non-zero contributor, so
 * the sum is exact and the same on every rank).
 *
 * Precision: everything is computed in double (p?gesvd in double meets
 * 1e-10 relative singular values; see docs/linalg.md for why single is not
 * offered). Inputs may be F32 / F16 / BF16 (a safetensors view) or double.
 *
 * Signs: singular vectors are normalised so that the entry of largest
 * magnitude of each left vector u_j is positive (first such entry on ties),
 * so results do not depend on the grid beyond rounding.
 *
 * Errors: TP_EINVAL for bad shapes / ranks / non-finite input, TP_EUNSUP for
 * ScaLAPACK convergence failure, TP_ENOMEM; the status and message are the
 * same on every rank (checked collectively before any ScaLAPACK call). */
#ifndef TPTT_LINALG_SVD_H
#define TPTT_LINALG_SVD_H

#include <stdint.h>

#include "util/dtype.h"
#include "util/err.h"

typedef struct tp_la tp_la;

/* Collective: a BLACS grid over every rank of MPI_COMM_WORLD (MPI must be
 * initialised). block: the square block size of the block-cyclic
 * distribution, 0 = 64. */
int tp_la_create(int block, tp_la **out, tp_err *err);
/* Collective. */
void tp_la_destroy(tp_la *la);
/* The grid tp_la_create picks for nprocs ranks. */
void tp_la_grid_shape(int nprocs, int *nprow, int *npcol);
void tp_la_info(const tp_la *la, int *nprocs, int *nprow, int *npcol, int *block);

/* A full input matrix, identical on every rank: element (i, j) of the
 * m x n matrix is at data[i * ld + j] (row-major; ld >= n). */
typedef struct tp_la_src {
    const void *data;
    int f64;          /* 1: data is double; 0: data is of type dtype */
    tp_dtype dtype;
    int64_t m, n, ld;
    const char *name; /* names the matrix in messages (a tensor name), may be NULL */
} tp_la_src;

typedef struct tp_la_svd_opts {
    int64_t ncomp;    /* components wanted, 1 <= ncomp <= min(m, n); 0 = min(m, n) */
    int niter;        /* < 0: exact SVD (4·ncomp <= min(m, n): top eigenpairs of the Gram matrix by
                         p?syevr + a Rayleigh-Ritz p?gesvd, docs/linalg.md; else p?gesvd);
                         K >= 0: randomized subspace iteration
                         with K power iterations (Halko et al. alg. 4.4 as torch.svd_lowrank:
                         p?gemm + p?geqrf/p?orgqr, then p?gesvd of the small projection) */
    int oversample;   /* randomized: extra directions, q = min(ncomp + oversample, min(m, n));
                         0 as PEFT's pissa_niter_K (svd_lowrank(W, r)) */
    uint64_t seed;    /* randomized: the Gaussian test matrix (same on every rank and grid) */
} tp_la_svd_opts;

/* Truncated SVD a ~= u diag(s) vt with k = ncomp components: s [k]
 * descending, u [m, k] row-major, vt [k, n] row-major (u or vt may be
 * NULL). Collective; same results on every rank. */
int tp_la_svd(tp_la *la, const tp_la_src *a, const tp_la_svd_opts *o, double *s, double *u, double *vt,
              tp_err *err);

/* ---- PiSSA (PEFT's LoraLayer.pissa_init) --------------------------------
 * W [out, in] = U S Vᵀ; with S_r the r largest singular values and s the
 * LoRA scale (alpha/r, or alpha/sqrt(r) with rslora):
 *   A = sqrt(S_r / s) V_rᵀ          [r, in]
 *   B = U_r sqrt(S_r / s)           [out, r]     so s·B·A = U_r S_r V_rᵀ
 *   W_res = W - s·B·A               [out, in]    (from the fp32 A and B, in double,
 *                                                 rounded once to fp32: s·B·A + W_res
 *                                                 equals W to fp32 rounding) */
typedef struct tp_pissa_opts {
    int r;
    double scale;   /* s > 0 */
    int niter;      /* < 0: "pissa" (exact SVD); K >= 0: "pissa_niter_K" */
    int oversample; /* randomized only; 0 = PEFT */
    uint64_t seed;  /* randomized only */
} tp_pissa_opts;

/* Collective. A, B: fp32 results on every rank; w_res (may be NULL, e.g. on
 * ranks that do not write the residual base): fp32 [out, in] row-major;
 * sv (may be NULL): the r singular values found. */
int tp_pissa_init(tp_la *la, const tp_la_src *w, const tp_pissa_opts *o, float *A, float *B, float *w_res,
                  double *sv, tp_err *err);

/* ---- LoRA products (adapter rank surgery) --------------------------------
 * SVD of ΔW = s·B·A for A [r, in], B [out, r] fp32 row-major, without
 * forming ΔW when r <= min(in, out): B = Q_b R_b and Aᵀ = Q_a R_a
 * (p?geqrf/p?orgqr), SVD of the r x r core s·R_b R_aᵀ (p?gesvd), then
 * U = Q_b U_c, Vᵀ = V_cᵀ Q_aᵀ (otherwise ΔW is formed and factorised).
 * k = min(r, in, out) components: s_out [k], u [out, k], vt [k, in]. */
int tp_lora_svd(tp_la *la, const float *A, const float *B, int64_t r, int64_t in, int64_t out, double scale,
                double *s_out, double *u, double *vt, const char *name, tp_err *err);

/* Keep the top R components of s·B·A as a rank-R LoRA with scale s_new:
 * A2 [R, in], B2 [out, R] with the square roots split as in PiSSA
 * (A2 = sqrt(S_R / s_new) V_Rᵀ, B2 = U_R sqrt(S_R / s_new)); when R > k the
 * extra rows/columns are zero (the product is s·B·A exactly). energy
 * (may be NULL) receives sum_{i<R} S_i² / sum_i S_i² (1 for a zero ΔW);
 * sv (may be NULL) receives the k singular values. Collective. */
int tp_lora_truncate(tp_la *la, const float *A, const float *B, int64_t r, int64_t in, int64_t out, double scale,
                     int64_t R, double scale_new, float *A2, float *B2, double *energy, double *sv,
                     const char *name, tp_err *err);

#endif
