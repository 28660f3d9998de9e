/* ops.h - elementwise and row-wise kernels of the decoder, each forward next
 * to its backward. All tensors fp32 row-major; n = tokens, D = features.
 * OpenMP-parallel over rows; parameter-gradient reductions run over columns
 * with a fixed order, so results do not depend on the thread count. */
#ifndef TPTT_KERNELS_OPS_H
#define TPTT_KERNELS_OPS_H

#include <stdint.h>

/* y[n,D] = x / sqrt(mean(x^2) + eps) * w; rstd[n] saved for backward. */
void tp_rmsnorm_fwd(float *y, float *rstd, const float *x, const float *w, int64_t n, int64_t D, float eps);
/* dx[n,D] (+)= d/dx; dw[D] += d/dw when dw != NULL. */
void tp_rmsnorm_bwd(float *dx, float *dw, const float *dy, const float *x, const float *w, const float *rstd,
                    int64_t n, int64_t D, int accumulate);

/* RoPE inverse frequencies inv_freq[d/2] (double), with llama3 scaling when
 * factor > 0 (transformers' _compute_llama3_parameters). */
void tp_rope_inv_freq(double *inv_freq, int64_t d, double theta, double factor, double low_freq_factor,
                      double high_freq_factor, double original_max_pos);
/* cos/sin tables [P, d/2] for positions 0..P-1 (angles computed in double). */
void tp_rope_tables(float *cos_t, float *sin_t, const double *inv_freq, int64_t d, int64_t P);
/* The same for positions p0 .. p0+P-1 (row i holds position p0 + i). */
void tp_rope_tables_from(float *cos_t, float *sin_t, const double *inv_freq, int64_t d, int64_t p0, int64_t P);
/* Rotate x[n, nh*d] in place by the angle of pos[n] (rotate_half pairing:
 * feature i with i + d/2). inverse = 1 rotates back (the backward pass). */
void tp_rope_apply(float *x, int64_t n, int64_t nh, int64_t d, const int32_t *pos, const float *cos_t,
                   const float *sin_t, int inverse);

/* h = silu(g) * u over n elements, and its backward (dg, du overwrite). */
void tp_swiglu_fwd(float *h, const float *g, const float *u, int64_t n);
void tp_swiglu_bwd(float *dg, float *du, const float *dh, const float *g, const float *u, int64_t n);

/* y (+)= x, n elements */
void tp_add(float *y, const float *x, int64_t n);
/* dst[D] += sum over rows of x[n, D] (fixed order) */
void tp_colsum_add(float *dst, const float *x, int64_t n, int64_t D);

/* Cross-entropy over rows of logits[n, V] with labels (-100 = ignored).
 * Returns the summed loss (double) and the count of labelled rows; when
 * dlogits != NULL writes (softmax - onehot) * scale into it (0 for ignored
 * rows). dlogits may alias logits. */
double tp_cross_entropy(float *dlogits, const float *logits, const int32_t *labels, int64_t n, int64_t V, float scale,
                        int64_t *count);

#endif
