/* vexp.c - see vexp.h. The three paths must stay operation-for-operation the
 * same (tests/test_vexp.c compares them bit for bit). */
#include "kernels/vexp.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "kernels/matmul.h"

#define LOG2E 1.4426950408889634
#define SHIFTER 6755399441055744.0 /* 1.5·2^52: t = x·log2e + SHIFTER holds round(x·log2e) in its low bits */
#define LN2_HI 6.93147180369123816490e-01 /* 32 significant bits: n·LN2_HI is exact */
#define LN2_LO 1.90821492927058770002e-10
#define X_MIN (-708.0) /* below: 0 (2^n would leave the normal range) */

/* 1/k!, k = 13 .. 0 (Horner order) */
static const double C[14] = {
    1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
    1.0 / 40320.0,      1.0 / 5040.0,      1.0 / 720.0,      1.0 / 120.0,     1.0 / 24.0,
    1.0 / 6.0,          0.5,               1.0,              1.0,
};

/* not inlined: a caller's add must not fuse with its last product */
__attribute__((noinline)) double tp_vexp1(double x) {
    if (!(x >= X_MIN)) return x != x ? x : 0.0;
    double t = fma(x, LOG2E, SHIFTER), n = t - SHIFTER;
    double r = fma(-n, LN2_HI, x);
    r = fma(-n, LN2_LO, r);
    double p = C[0];
    for (int k = 1; k < 14; k++) p = fma(p, r, C[k]);
    union { double d; int64_t i; } tb = {t}, s;
    s.i = (int64_t)((uint64_t)(tb.i + 1023) << 52);
    return p * s.d;
}

#define TGT512 __attribute__((target("avx512f,avx2,fma")))
#define TGT256 __attribute__((target("avx2,fma")))

TGT512 static inline __m512d exp512(__m512d x) {
    __m512d t = _mm512_fmadd_pd(x, _mm512_set1_pd(LOG2E), _mm512_set1_pd(SHIFTER));
    __m512d n = _mm512_sub_pd(t, _mm512_set1_pd(SHIFTER));
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
    __m512d p = _mm512_set1_pd(C[0]);
    for (int k = 1; k < 14; k++) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(C[k]));
    __m512i e = _mm512_slli_epi64(_mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(1023)), 52);
    __m512d y = _mm512_mul_pd(p, _mm512_castsi512_pd(e));
    /* x < X_MIN (and -inf) -> 0; NaN fails the compare too but must stay NaN */
    __mmask8 small = _mm512_cmp_pd_mask(x, _mm512_set1_pd(X_MIN), _CMP_LT_OQ);
    return _mm512_mask_mov_pd(y, small, _mm512_setzero_pd());
}

TGT256 static inline __m256d exp256(__m256d x) {
    __m256d t = _mm256_fmadd_pd(x, _mm256_set1_pd(LOG2E), _mm256_set1_pd(SHIFTER));
    __m256d n = _mm256_sub_pd(t, _mm256_set1_pd(SHIFTER));
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
    __m256d p = _mm256_set1_pd(C[0]);
    for (int k = 1; k < 14; k++) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(C[k]));
    __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(1023)), 52);
    __m256d y = _mm256_mul_pd(p, _mm256_castsi256_pd(e));
    __m256d small = _mm256_cmp_pd(x, _mm256_set1_pd(X_MIN), _CMP_LT_OQ);
    return _mm256_andnot_pd(small, y);
}

/* max is exact in any order; NaN skipped like `x > m ? x : m` (MAXPS
 * returns its second operand when one is NaN) */
static float vmax_scalar(const float *x, int64_t n) {
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

TGT512 static float vmax512(const float *x, int64_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) m = _mm512_max_ps(_mm512_loadu_ps(x + j), m);
    float r = _mm512_reduce_max_ps(m);
    for (; j < n; j++) r = x[j] > r ? x[j] : r;
    return r;
}

static double reduce8(const double a[8]) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

/* the argument of term j: (double)x - shift, or with fdiff the float
 * difference x - (float)shift widened (as `exp((double)(x - m))` computes) */
static inline double arg1(float x, double shift, int fdiff) {
    return fdiff ? (double)(x - (float)shift) : (double)x - shift;
}

static double sum_scalar(const float *x, int64_t n, double shift, int fdiff, int64_t j, double acc[8]) {
    for (; j < n; j++) acc[j & 7] += tp_vexp1(arg1(x[j], shift, fdiff));
    return reduce8(acc);
}

TGT512 static double sum512(const float *x, int64_t n, double shift, int fdiff) {
    __m512d acc = _mm512_setzero_pd(), s = _mm512_set1_pd(shift);
    __m256 sf = _mm256_set1_ps((float)shift);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        __m512d a = fdiff ? _mm512_cvtps_pd(_mm256_sub_ps(v, sf)) : _mm512_sub_pd(_mm512_cvtps_pd(v), s);
        acc = _mm512_add_pd(acc, exp512(a));
    }
    double a[8];
    _mm512_storeu_pd(a, acc);
    return sum_scalar(x, n, shift, fdiff, j, a);
}

TGT256 static double sum256(const float *x, int64_t n, double shift, int fdiff) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), s = _mm256_set1_pd(shift);
    __m128 sf = _mm_set1_ps((float)shift);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m128 v0 = _mm_loadu_ps(x + j), v1 = _mm_loadu_ps(x + j + 4);
        __m256d e0 = fdiff ? _mm256_cvtps_pd(_mm_sub_ps(v0, sf)) : _mm256_sub_pd(_mm256_cvtps_pd(v0), s);
        __m256d e1 = fdiff ? _mm256_cvtps_pd(_mm_sub_ps(v1, sf)) : _mm256_sub_pd(_mm256_cvtps_pd(v1), s);
        a0 = _mm256_add_pd(a0, exp256(e0));
        a1 = _mm256_add_pd(a1, exp256(e1));
    }
    double a[8];
    _mm256_storeu_pd(a, a0);
    _mm256_storeu_pd(a + 4, a1);
    return sum_scalar(x, n, shift, fdiff, j, a);
}

static void scale_scalar(float *out, const float *x, int64_t j, int64_t n, double shift, float scale) {
    for (; j < n; j++) out[j] = (float)tp_vexp1((double)x[j] - shift) * scale;
}

TGT512 static void scale512(float *out, const float *x, int64_t n, double shift, float scale) {
    __m512d s = _mm512_set1_pd(shift);
    __m256 sc = _mm256_set1_ps(scale);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m512d e = exp512(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)), s));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm512_cvtpd_ps(e), sc));
    }
    scale_scalar(out, x, j, n, shift, scale);
}

TGT256 static void scale256(float *out, const float *x, int64_t n, double shift, float scale) {
    __m256d s = _mm256_set1_pd(shift);
    __m128 sc = _mm_set1_ps(scale);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        __m256d e = exp256(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j)), s));
        _mm_storeu_ps(out + j, _mm_mul_ps(_mm256_cvtpd_ps(e), sc));
    }
    scale_scalar(out, x, j, n, shift, scale);
}

/* ---- expf, glibc's algorithm (sysdeps/ieee754/flt-32/e_expf.c) ---------- */

/* 2^(i/32) as double bits, minus i << 47 (the caller adds k << 47) */
static const uint64_t EXPF_TAB[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
    0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
    0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540};
#define EXPF_INVLN2N 0x1.71547652b82fep+5 /* 32/ln 2 */
#define EXPF_SHIFT 0x1.8p+52
#define EXPF_C0 0x1.c6af84b912394p-20 /* the cubic in r of 2^(r/32) - 1 */
#define EXPF_C1 0x1.ebfce50fac4f3p-13
#define EXPF_C2 0x1.62e42ff0c52d6p-6
#define EXPF_TOP_FAST 0x42a /* top 12 bits of |x| up to here: no special case */

TGT512 static __m256 expf8_512(__m256 xf) {
    __m512d xd = _mm512_cvtps_pd(xf);
    __m512d kds = _mm512_fmadd_pd(_mm512_set1_pd(EXPF_INVLN2N), xd, _mm512_set1_pd(EXPF_SHIFT));
    __m512d kd = _mm512_sub_pd(kds, _mm512_set1_pd(EXPF_SHIFT));
    __m512d r = _mm512_fmsub_pd(_mm512_set1_pd(EXPF_INVLN2N), xd, kd);
    __m512i ki = _mm512_castpd_si512(kds);
    __m512i t = _mm512_i64gather_epi64(_mm512_and_si512(ki, _mm512_set1_epi64(31)), (const void *)EXPF_TAB, 8);
    __m512d s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64(ki, 47)));
    __m512d z = _mm512_fmadd_pd(_mm512_set1_pd(EXPF_C0), r, _mm512_set1_pd(EXPF_C1));
    __m512d r2 = _mm512_mul_pd(r, r);
    __m512d y = _mm512_fmadd_pd(r, _mm512_set1_pd(EXPF_C2), _mm512_set1_pd(1.0));
    y = _mm512_fmadd_pd(z, r2, y);
    return _mm512_cvtpd_ps(_mm512_mul_pd(y, s));
}

TGT256 static __m128 expf4_256(__m128 xf) {
    __m256d xd = _mm256_cvtps_pd(xf);
    __m256d kds = _mm256_fmadd_pd(_mm256_set1_pd(EXPF_INVLN2N), xd, _mm256_set1_pd(EXPF_SHIFT));
    __m256d kd = _mm256_sub_pd(kds, _mm256_set1_pd(EXPF_SHIFT));
    __m256d r = _mm256_fmsub_pd(_mm256_set1_pd(EXPF_INVLN2N), xd, kd);
    __m256i ki = _mm256_castpd_si256(kds);
    __m256i t = _mm256_i64gather_epi64((const long long *)EXPF_TAB, _mm256_and_si256(ki, _mm256_set1_epi64x(31)), 8);
    __m256d s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64(ki, 47)));
    __m256d z = _mm256_fmadd_pd(_mm256_set1_pd(EXPF_C0), r, _mm256_set1_pd(EXPF_C1));
    __m256d r2 = _mm256_mul_pd(r, r);
    __m256d y = _mm256_fmadd_pd(r, _mm256_set1_pd(EXPF_C2), _mm256_set1_pd(1.0));
    y = _mm256_fmadd_pd(z, r2, y);
    return _mm256_cvtpd_ps(_mm256_mul_pd(y, s));
}

/* Both paths: the vector result for every lane, then expf itself for the
 * lanes whose |x| has its top 12 bits past EXPF_TOP_FAST (|x| >= 88, inf,
 * NaN); their arguments are kept first, since out may be x. */
TGT512 static void vexpf512(float *out, const float *x, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 xf = _mm256_loadu_ps(x + j);
        __m256i top = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(xf), 20), _mm256_set1_epi32(0x7ff));
        unsigned bad = (unsigned)_mm256_movemask_ps(
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(top, _mm256_set1_epi32(EXPF_TOP_FAST))));
        float xs[8];
        if (bad) _mm256_storeu_ps(xs, xf);
        _mm256_storeu_ps(out + j, expf8_512(xf));
        for (int l = 0; bad && l < 8; l++)
            if (bad >> l & 1) out[j + l] = expf(xs[l]);
    }
    for (; j < n; j++) out[j] = expf(x[j]);
}

TGT256 static void vexpf256(float *out, const float *x, int64_t n) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        __m128 xf = _mm_loadu_ps(x + j);
        __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_castps_si128(xf), 20), _mm_set1_epi32(0x7ff));
        unsigned bad = (unsigned)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(top, _mm_set1_epi32(EXPF_TOP_FAST))));
        float xs[4];
        if (bad) _mm_storeu_ps(xs, xf);
        _mm_storeu_ps(out + j, expf4_256(xf));
        for (int l = 0; bad && l < 4; l++)
            if (bad >> l & 1) out[j + l] = expf(xs[l]);
    }
    for (; j < n; j++) out[j] = expf(x[j]);
}

void tp_vexpf(float *out, const float *x, int64_t n) {
    tp_mm_isa isa = tp_mm_isa_current();
    if (isa == TP_ISA_AVX512) vexpf512(out, x, n);
    else if (isa == TP_ISA_AVX2) vexpf256(out, x, n);
    else
        for (int64_t j = 0; j < n; j++) out[j] = expf(x[j]);
}

static double vsum(const float *x, int64_t n, double shift, int fdiff) {
    tp_mm_isa isa = tp_mm_isa_current();
    if (isa == TP_ISA_AVX512) return sum512(x, n, shift, fdiff);
    if (isa == TP_ISA_AVX2) return sum256(x, n, shift, fdiff);
    double a[8] = {0};
    return sum_scalar(x, n, shift, fdiff, 0, a);
}

double tp_vexp_sum(const float *x, int64_t n, double shift) { return vsum(x, n, shift, 0); }

double tp_vexp_sum_fdiff(const float *x, int64_t n, float shift) { return vsum(x, n, (double)shift, 1); }

void tp_vexp_scale(float *out, const float *x, int64_t n, double shift, float scale) {
    tp_mm_isa isa = tp_mm_isa_current();
    if (isa == TP_ISA_AVX512) scale512(out, x, n, shift, scale);
    else if (isa == TP_ISA_AVX2) scale256(out, x, n, shift, scale);
    else scale_scalar(out, x, 0, n, shift, scale);
}

float tp_vmax_f32(const float *x, int64_t n) {
    return tp_mm_isa_current() == TP_ISA_AVX512 ? vmax512(x, n) : vmax_scalar(x, n);
}
