/* matmul.h - products with weight matrices, the one place that knows backends.
 *
 * Weights are [out, in] row-major as Hugging Face stores them: frozen ones
 * used in place from the read-only mmap in their stored dtype, trainable ones
 * as private fp32. Activations are fp32 row-major [n, features].
 *
 * Backends (config compute.matmul):
 *   TP_MM_F32  OpenBLAS sgemm. A bf16/f16 weight is first converted into an
 *              fp32 scratch matrix (one matrix at a time, never the model).
 *   TP_MM_BF16 oneDNN matmul for BF16 weights: the weight bytes are used in
 *              place, activations are rounded to bf16, accumulation and output
 *              are fp32. Weights of other dtypes fall back to the f32 path.
 * fp32 weights always use sgemm (trainable state stays fp32).
 *
 * A tp_matmul owns its scratch buffers and oneDNN objects; one per thread of
 * control (not shared between concurrent callers). BLAS/oneDNN use the OpenMP
 * threads, so call these outside OpenMP parallel regions. */
#ifndef TPTT_KERNELS_MATMUL_H
#define TPTT_KERNELS_MATMUL_H

#include <stdint.h>

#include "util/dtype.h"
#include "util/err.h"

typedef enum tp_mm_backend { TP_MM_F32 = 0, TP_MM_BF16 = 1 } tp_mm_backend;

/* A weight operand: rows x cols ([out, in]), row-major, any storage dtype. */
typedef struct tp_weight {
    const void *data;
    tp_dtype dtype;
    int64_t rows, cols;
} tp_weight;

typedef struct tp_matmul tp_matmul;

int tp_matmul_create(tp_mm_backend backend, tp_matmul **out, tp_err *err);
void tp_matmul_destroy(tp_matmul *mm);
tp_mm_backend tp_matmul_backend(const tp_matmul *mm);
const char *tp_mm_backend_name(tp_mm_backend b); /* "f32" / "bf16" */

/* y[n, rows] (+)= x[n, cols] · Wᵀ   (accumulate: add into y instead of overwrite) */
int tp_mm_xwt(tp_matmul *mm, const float *x, int64_t n, const tp_weight *w, float *y, int accumulate, tp_err *err);
/* dx[n, cols] (+)= dy[n, rows] · W */
int tp_mm_dyw(tp_matmul *mm, const float *dy, int64_t n, const tp_weight *w, float *dx, int accumulate,
              tp_err *err);

/* Plain fp32 helpers on private buffers (sgemm, row-major):
 * C[m, n] (+)= A[m, k] · B[k, n] with optional transposes, leading dims. */
void tp_sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
              const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

#endif
