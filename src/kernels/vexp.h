/* vexp.h - vectorised double-precision exp for softmax rows (the LM head's
 * cross-entropy, the attention's log-sum-exp), where glibc's scalar exp was
 * ~5% of a training step at seq 512 and more at long context.
 *
 * exp(x) for x <= 0 (arguments are logit - max or logit - logsumexp): Cody-Waite
 * reduction x = n·ln2 + r with ln2 split in two, exp(r) by a degree-13 Taylor
 * polynomial in FMA Horner form (truncation < 5e-18 on |r| <= ln2/2), scaled by
 * 2^n through the exponent bits. Error about 1 ulp of double; x < -708 gives
 * 0 (true value below 1e-307: it neither moves a sum of terms >= 1 nor
 * survives the rounding to float), -inf gives 0, NaN gives NaN.
 *
 * AVX-512, AVX2+FMA and plain C (with fma()) run the same operations in the
 * same order, and a sum is always kept in 8 partial sums reduced in a fixed
 * order, so results are bit-identical on every ISA and thread count. The
 * ISA is the one tp_mm_isa_current() reports (TPTT_ISA=avx2|scalar forces a
 * lower one). */
#ifndef TPTT_KERNELS_VEXP_H
#define TPTT_KERNELS_VEXP_H

#include <stdint.h>

/* max over x[0..n) ignoring NaN (-inf for n = 0 or all NaN) */
float tp_vmax_f32(const float *x, int64_t n);
/* Σ exp((double)x[j] - shift), j < n */
double tp_vexp_sum(const float *x, int64_t n, double shift);
/* Σ exp((double)(x[j] - shift)), the difference taken in float (softmax
 * rows whose max is a float: the attention's log-sum-exp) */
double tp_vexp_sum_fdiff(const float *x, int64_t n, float shift);
/* out[j] = (float)exp((double)x[j] - shift) * scale (float product); out may be x */
void tp_vexp_scale(float *out, const float *x, int64_t n, double shift, float scale);
/* the scalar exp above, for tests: exp(x) for x <= 0 */
double tp_vexp1(double x);

/* out[j] = expf(x[j]) bit for bit, out may be x. glibc's expf (2.28 on, FMA
 * build: what it runs on every CPU with AVX2+FMA) evaluates in double: k =
 * round(x·32/ln2), 2^(k/32) from a 32-entry table and the exponent bits, a
 * cubic in the remainder, one rounding to float at the end. tp_vexpf runs
 * those operations, in that order and with the same fused multiply-adds, 8
 * (AVX-512) or 4 (AVX2) at a time; arguments glibc treats specially (|x| >=
 * 88, inf, NaN) go to expf itself. So SwiGLU, the gates and the attention
 * probabilities get a vector exp without a single rounding changing
 * (tests/test_vexp.c compares it with expf over all float arguments). */
void tp_vexpf(float *out, const float *x, int64_t n);

#endif
