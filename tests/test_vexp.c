/* test_vexp.c - the vectorised exp of the cross-entropy (kernels/vexp.h):
 * against libm's exp (ulps) and a long-double sum, its special values, and
 * the AVX-512 / AVX2 / scalar paths bit for bit (every path the CPU has),
 * and tp_cross_entropy against a plain long-double recomputation. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "kernels/vexp.h"
#include "test.h"
#include "util/rng.h"

static double ulps(double a, double b) {
    if (a == b) return 0;
    return fabs(a - b) / (nextafter(fabs(b), INFINITY) - fabs(b));
}

static uint64_t lcg(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 11;
}

int main(void) {
    /* 1. the scalar exp against libm over the range used (x <= 0) */
    uint64_t s = 7;
    double worst = 0, worst_x = 0;
    for (int i = 0; i < 2000000; i++) {
        double u = (double)lcg(&s) / 9007199254740992.0; /* [0, 1) */
        double x = i % 4 == 0 ? -u * 745.0 : i % 4 == 1 ? -u * 20.0 : i % 4 == 2 ? -u * 1e-3 : -u * 708.0;
        double e = ulps(tp_vexp1(x), exp(x));
        if (x >= -708.0 && e > worst) { worst = e; worst_x = x; }
        if (x < -708.0) CHECK_MSG(tp_vexp1(x) == 0.0, "x %.17g", x);
    }
    CHECK_MSG(worst <= 1.0, "worst error %.3g ulp at x = %.17g", worst, worst_x);
    printf("exp(x), x in [-708, 0]: worst %.3g ulp of libm's (at %.6g)\n", worst, worst_x);
    CHECK(tp_vexp1(0.0) == 1.0);
    CHECK(tp_vexp1(-INFINITY) == 0.0);
    CHECK(isnan(tp_vexp1(NAN)));
    CHECK(tp_vexp1(-708.0) > 0 && ulps(tp_vexp1(-708.0), exp(-708.0)) <= 1.0);

    /* 2. every ISA path the CPU has gives the same bits; sums and scaled
     * rows against long double */
    int have = (int)tp_mm_force_isa(TP_ISA_AVX512);
    int64_t lens[] = {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 37, 1000, 128256};
    int nl = (int)(sizeof lens / sizeof lens[0]);
    float *x = malloc(128256 * sizeof(float));
    float *o[3], *ref = malloc(128256 * sizeof(float));
    for (int k = 0; k < 3; k++) o[k] = malloc(128256 * sizeof(float));
    tp_rng r;
    tp_rng_seed(&r, 11, 0);
    for (int li = 0; li < nl; li++) {
        int64_t n = lens[li];
        for (int64_t j = 0; j < n; j++) x[j] = 8.0f * tp_rng_normal(&r);
        if (n > 5) { x[2] = -INFINITY; x[4] = -1e30f; }
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) mx = x[j] > mx ? x[j] : mx;
        double sums[3] = {0, 0, 0}, sumf[3] = {0, 0, 0};
        float mxs[3] = {0, 0, 0};
        for (int isa = 0; isa <= have; isa++) {
            tp_mm_force_isa(isa);
            mxs[isa] = tp_vmax_f32(x, n);
            sums[isa] = tp_vexp_sum(x, n, (double)mx);
            sumf[isa] = tp_vexp_sum_fdiff(x, n, mx - 0.375f);
            tp_vexp_scale(o[isa], x, n, (double)mx + 0.25, 0.5f);
        }
        long double ls = 0, lf = 0;
        for (int64_t j = 0; j < n; j++) ls += expl((long double)x[j] - (long double)mx);
        for (int64_t j = 0; j < n; j++) lf += expl((long double)(x[j] - (mx - 0.375f))); /* float difference */
        for (int isa = 0; isa <= have; isa++) {
            CHECK_MSG(mxs[isa] == mx || (n == 0 && isinf(mxs[isa])), "n %lld isa %d max", (long long)n, isa);
            CHECK_MSG(memcmp(&sums[isa], &sums[0], sizeof(double)) == 0, "n %lld isa %d sum %.17g vs %.17g",
                      (long long)n, isa, sums[isa], sums[0]);
            CHECK_MSG(memcmp(&sumf[isa], &sumf[0], sizeof(double)) == 0, "n %lld isa %d fdiff sum %.17g vs %.17g",
                      (long long)n, isa, sumf[isa], sumf[0]);
            CHECK_MSG(memcmp(o[isa], o[0], (size_t)n * sizeof(float)) == 0, "n %lld isa %d scaled row differs",
                      (long long)n, isa);
        }
        /* positive terms, each within 1 ulp, summed in 8 chains of n/8: relative
         * error at most (n/8 + 4)·2^-53 */
        long double tol = ((long double)n / 8 + 4) * 0x1p-53L * ls;
        CHECK_MSG(n == 0 ? sums[0] == 0 : fabsl((long double)sums[0] - ls) <= tol, "n %lld sum %.17g vs %.17Lg",
                  (long long)n, sums[0], ls);
        tol = ((long double)n / 8 + 4) * 0x1p-53L * lf;
        CHECK_MSG(n == 0 ? sumf[0] == 0 : fabsl((long double)sumf[0] - lf) <= tol, "n %lld fdiff sum %.17g vs %.17Lg",
                  (long long)n, sumf[0], lf);
        int bad = 0;
        for (int64_t j = 0; j < n; j++) {
            float want = (float)exp((double)x[j] - ((double)mx + 0.25)) * 0.5f;
            bad += o[0][j] != want; /* ~1 ulp of double: the float rounding agrees but for ties */
        }
        CHECK_MSG(bad <= (int)(n / 100000), "n %lld: %d scaled values differ from libm's", (long long)n, bad);
    }
    /* NaN: ignored by the max, poisons the sum */
    for (int isa = 0; isa <= have; isa++) {
        tp_mm_force_isa(isa);
        float v[20];
        for (int j = 0; j < 20; j++) v[j] = (float)-j;
        v[11] = NAN;
        CHECK(tp_vmax_f32(v, 20) == 0.0f);
        CHECK(isnan(tp_vexp_sum(v, 20, 0.0)));
    }
    tp_mm_force_isa(-1);

    /* 3. cross-entropy (the caller): loss and dlogits in place against long double */
    {
        int64_t n = 3, V = 1003;
        float *lg = malloc((size_t)(n * V) * sizeof(float)), *d = malloc((size_t)(n * V) * sizeof(float));
        int32_t lab[3] = {5, -100, 1002};
        for (int64_t j = 0; j < n * V; j++) lg[j] = 3.0f * tp_rng_normal(&r);
        memcpy(d, lg, (size_t)(n * V) * sizeof(float));
        int64_t cnt = 0;
        double loss = tp_cross_entropy(d, d, lab, n, V, 0.5f, &cnt);
        long double want = 0, maxd = 0;
        for (int64_t i = 0; i < n; i++) {
            const float *row = lg + i * V;
            long double m = row[0], se = 0;
            for (int64_t j = 0; j < V; j++) m = row[j] > m ? row[j] : m;
            for (int64_t j = 0; j < V; j++) se += expl((long double)row[j] - m);
            long double lse = m + logl(se);
            if (lab[i] == -100) {
                for (int64_t j = 0; j < V; j++) maxd = fmaxl(maxd, fabsl((long double)d[i * V + j]));
                continue;
            }
            want += lse - row[lab[i]];
            for (int64_t j = 0; j < V; j++) {
                long double g = 0.5L * expl((long double)row[j] - lse) - (j == lab[i] ? 0.5L : 0);
                maxd = fmaxl(maxd, fabsl((long double)d[i * V + j] - g));
            }
        }
        CHECK(cnt == 2);
        CHECK_MSG(fabsl((long double)loss - want) <= 1e-12L * fabsl(want), "loss %.17g vs %.17Lg", loss, want);
        CHECK_MSG(maxd <= 1e-7L, "dlogits off by %.3Lg", maxd);
        free(lg);
        free(d);
    }
    /* 4. tp_vexpf == expf bit for bit on every path the CPU has: every
     * argument of the vector path (|x| < 88: 2.2e9 floats; a sample would
     * not do: an r = x·32/ln2 - k without its fused multiply-add differs on
     * 2 of them) and every 17th of the others (|x| >= 88, inf, NaN: expf
     * itself), misaligned by one so that in-place blocks straddle vectors. */
    {
        enum { BLK = 1 << 16 };
        int isas[3], nisa = 0;
        for (int isa = TP_ISA_AVX512; isa > TP_ISA_SCALAR; isa--)
            if ((int)tp_mm_force_isa(isa) == isa) isas[nisa++] = isa;
        float *in = malloc(BLK * sizeof(float)), *want = malloc(BLK * sizeof(float)), *got = malloc((BLK + 1) * sizeof(float));
        uint64_t diff[3] = {0}, first[3] = {0}, tried = 0;
        for (uint64_t u = 0; u < (UINT64_C(1) << 32);) {
            uint32_t m = 0;
            for (; m < BLK && u < (UINT64_C(1) << 32); m++) {
                union { uint32_t u; float f; } v = {(uint32_t)u};
                in[m] = v.f;
                want[m] = expf(v.f);
                u += (v.u & 0x7fffffffu) < 0x42b00000u ? 1 : 17;
            }
            tried += m;
            for (int k = 0; k < nisa; k++) {
                tp_mm_force_isa(isas[k]);
                memcpy(got + 1, in, m * sizeof(float));
                tp_vexpf(got + 1, got + 1, m);
                for (uint32_t j = 0; j < m; j++)
                    if (memcmp(&got[j + 1], &want[j], sizeof(float)) && diff[k]++ == 0) memcpy(&first[k], &in[j], 4);
            }
        }
        for (int k = 0; k < nisa; k++) {
            union { uint32_t u; float f; } fx = {(uint32_t)first[k]};
            CHECK_MSG(diff[k] == 0, "%s: tp_vexpf differs from expf on %llu of %llu arguments, first %a",
                      tp_mm_isa_name((tp_mm_isa)isas[k]), (unsigned long long)diff[k], (unsigned long long)tried,
                      (double)fx.f);
        }
        tp_mm_force_isa(TP_ISA_SCALAR);
        float xs[5] = {-1.5f, 0.0f, NAN, -INFINITY, 100.0f};
        tp_vexpf(xs, xs, 5);
        CHECK(xs[0] == expf(-1.5f) && xs[1] == 1.0f && isnan(xs[2]) && xs[3] == 0.0f && isinf(xs[4]));
        free(in);
        free(want);
        free(got);
    }
    tp_mm_force_isa(-1);
    free(x);
    free(ref);
    for (int k = 0; k < 3; k++) free(o[k]);
    return tp_test_report("test_vexp");
}
