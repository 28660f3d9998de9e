/* matmul.h - products with weight matrices, the one place that knows backends.
 *
 * Weights are [out, in] row-major as Hugging Face stores them: frozen ones
 * used in place from the read-only mmap in their stored dtype, trainable ones
 * as private fp32. Activations are fp32 row-major [n, features].
 *
 * Backends (config compute.matmul):
 *   TP_MM_F32  OpenBLAS sgemm. A bf16/f16 weight is first converted into an
 *              fp32 scratch matrix (one matrix at a time, never the model;
 *              bf16 past 16 MB of fp32 with non-temporal stores, in parallel).
 *   TP_MM_BF16 oneDNN matmul for BF16 weights: the weight bytes are used in
 *              place, activations are rounded to bf16, accumulation and output
 *              are fp32. Weights of other dtypes fall back to the f32 path.
 * fp32 weights always use sgemm (trainable state stays fp32).
 *
 * On CPUs where oneDNN 2.6 cannot build a bf16 matmul (AVX2 only: it has no
 * bf16 kernels below avx512_core) TP_MM_BF16 becomes TP_MM_F32, with one notice
 * on stderr per process; tp_matmul_backend() then reports TP_MM_F32.
 *
 * Small n (token-by-token decoding) with BF16/F16 weights, on both backends:
 * x·Wᵀ is memory bound, so a vectorised kernel reads the weight bytes in place
 * (no fp32 copy, activations kept fp32, fp32 accumulation), parallel over
 * blocks of output rows; each output is summed by one thread in a fixed order,
 * so results do not depend on the thread count. AVX-512, AVX2+FMA+F16C or
 * plain C, picked from CPUID; TPTT_ISA=avx2|scalar (read once) forces a lower
 * path.
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
/* The backend tp_matmul_create(requested) really uses on this CPU (TP_MM_BF16
 * becomes TP_MM_F32 where oneDNN has no bf16 matmul); no notice printed.
 * Callers that record the backend used should record this. */
tp_mm_backend tp_mm_backend_effective(tp_mm_backend requested);

/* y[n, rows] (+)= x[n, cols] · Wᵀ   (accumulate: add into y instead of overwrite) */
int tp_mm_xwt(tp_matmul *mm, const float *x, int64_t n, const tp_weight *w, float *y, int accumulate, tp_err *err);
/* dx[n, cols] (+)= dy[n, rows] · W */
int tp_mm_dyw(tp_matmul *mm, const float *dy, int64_t n, const tp_weight *w, float *dx, int accumulate,
              tp_err *err);

/* Largest n for which tp_mm_xwt uses the small-n kernel (BF16/F16 weights).
 * Measured (bench_gemv --nmax, 2 threads, Xeon with AVX512_BF16, 2048x8192,
 * 8192x2048, 128256x2048): faster than convert+sgemm by >= 3x up to n = 64 and
 * than oneDNN bf16 up to n ~ 48, so the bf16 limit keeps a margin. */
#define TP_MM_SMALL_N_F32 64
#define TP_MM_SMALL_N_BF16 32

/* dst[i] = tp_f32_to_bf16(src[i]) (the same bits), vectorised where the ISA
 * in effect is AVX-512, OpenMP threads: the bf16 path's activation rounding. */
void tp_mm_to_bf16(uint16_t *dst, const float *src, size_t n);

/* Kernel ISA of the small-n path. */
typedef enum tp_mm_isa { TP_ISA_SCALAR = 0, TP_ISA_AVX2 = 1, TP_ISA_AVX512 = 2 } tp_mm_isa;
const char *tp_mm_isa_name(tp_mm_isa isa); /* "scalar" / "avx2" / "avx512" */
tp_mm_isa tp_mm_isa_current(void);
/* For tests and benchmarks: force the small-n kernel ISA (clamped to what the
 * CPU has; a negative value restores CPUID/TPTT_ISA). Below TP_ISA_AVX512 it
 * also makes later TP_MM_BF16 matmuls behave as on an AVX2 CPU (fallback to
 * f32). Returns the ISA in effect. Not thread safe: call between products. */
tp_mm_isa tp_mm_force_isa(int isa);
/* For tests and benchmarks: y[n, rows] (+)= x·Wᵀ with the small-n kernel for
 * any n >= 1 (BF16/F16 weights only; TP_EINVAL otherwise). */
int tp_mm_xwt_small(const float *x, int64_t n, const tp_weight *w, float *y, int accumulate, tp_err *err);

/* Keep the fp32 conversion of w (a frozen bf16/f16 weight that does not
 * change meanwhile) between calls until tp_mm_hold(mm, NULL): the LM head,
 * used by every block of tokens in both directions, is then converted once
 * per micro-batch instead of once per block and direction. */
void tp_mm_hold(tp_matmul *mm, const tp_weight *w);

/* Plain fp32 helpers on private buffers (sgemm, row-major):
 * C[m, n] (+)= A[m, k] · B[k, n] with optional transposes, leading dims. */
void tp_sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
              const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

#endif
