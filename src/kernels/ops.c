#include "kernels/ops.h"

#include "kernels/vexp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void tp_rmsnorm_fwd(float *y, float *rstd, const float *x, const float *w, int64_t n, int64_t D, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * D;
        double ss = 0;
        for (int64_t j = 0; j < D; j++) ss += (double)xi[j] * xi[j];
        float r = (float)(1.0 / sqrt(ss / (double)D + eps));
        rstd[i] = r;
        float *yi = y + i * D;
        for (int64_t j = 0; j < D; j++) yi[j] = xi[j] * r * w[j];
    }
}

void tp_rmsnorm_bwd(float *dx, float *dw, const float *dy, const float *x, const float *w, const float *rstd,
                    int64_t n, int64_t D, int accumulate) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * D, *dyi = dy + i * D;
        float r = rstd[i];
        double dot = 0;
        for (int64_t j = 0; j < D; j++) dot += (double)dyi[j] * w[j] * xi[j];
        float c = (float)(dot * (double)r * r * r / (double)D);
        float *dxi = dx + i * D;
        if (accumulate)
            for (int64_t j = 0; j < D; j++) dxi[j] += dyi[j] * w[j] * r - xi[j] * c;
        else
            for (int64_t j = 0; j < D; j++) dxi[j] = dyi[j] * w[j] * r - xi[j] * c;
    }
    if (dw) {
#pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < D; j++) {
            double s = 0;
            for (int64_t i = 0; i < n; i++) s += (double)dy[i * D + j] * x[i * D + j] * rstd[i];
            dw[j] += (float)s;
        }
    }
}

void tp_rope_inv_freq(double *inv, int64_t d, double theta, double factor, double low, double high, double orig) {
    for (int64_t i = 0; i < d / 2; i++) inv[i] = pow(theta, -(double)(2 * i) / (double)d);
    if (!(factor > 0)) return;
    double low_wavelen = orig / low, high_wavelen = orig / high;
    for (int64_t i = 0; i < d / 2; i++) {
        double wavelen = 2 * M_PI / inv[i];
        if (wavelen < high_wavelen) continue; /* high frequencies: unchanged */
        if (wavelen > low_wavelen) {
            inv[i] /= factor; /* low frequencies: scaled */
        } else {
            double s = (orig / wavelen - low) / (high - low);
            inv[i] = (1 - s) * inv[i] / factor + s * inv[i];
        }
    }
}

void tp_rope_tables(float *cos_t, float *sin_t, const double *inv, int64_t d, int64_t P) {
    tp_rope_tables_from(cos_t, sin_t, inv, d, 0, P);
}

void tp_rope_tables_from(float *cos_t, float *sin_t, const double *inv, int64_t d, int64_t p0, int64_t P) {
    int64_t h = d / 2;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < P; p++)
        for (int64_t i = 0; i < h; i++) {
            double a = (double)(p0 + p) * inv[i];
            cos_t[p * h + i] = (float)cos(a);
            sin_t[p * h + i] = (float)sin(a);
        }
}

void tp_rope_apply(float *x, int64_t n, int64_t nh, int64_t d, const int32_t *pos, const float *cos_t,
                   const float *sin_t, int inverse) {
    int64_t h = d / 2;
    float sgn = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const float *c = cos_t + (int64_t)pos[t] * h, *s = sin_t + (int64_t)pos[t] * h;
        for (int64_t k = 0; k < nh; k++) {
            float *v = x + (t * nh + k) * d;
            for (int64_t i = 0; i < h; i++) {
                float a = v[i], b = v[i + h], si = sgn * s[i];
                v[i] = a * c[i] - b * si;
                v[i + h] = b * c[i] + a * si;
            }
        }
    }
}

#define EXP_BLK 512 /* elements per block of sigmoids (on the stack) */

/* s[j] = 1 / (1 + expf(-g[j])), j < m (the exponentials vectorised, bit for
 * bit expf) */
static void sigmoid_blk(float *s, const float *g, int64_t m) {
    for (int64_t j = 0; j < m; j++) s[j] = -g[j];
    tp_vexpf(s, s, m);
    for (int64_t j = 0; j < m; j++) s[j] = 1.0f / (1.0f + s[j]);
}

void tp_swiglu_fwd(float *h, const float *g, const float *u, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += EXP_BLK) {
        float s[EXP_BLK];
        int64_t m = n - i0 < EXP_BLK ? n - i0 : EXP_BLK;
        sigmoid_blk(s, g + i0, m);
        for (int64_t j = 0, i = i0; j < m; j++, i++) h[i] = g[i] * s[j] * u[i];
    }
}

void tp_swiglu_bwd(float *dg, float *du, const float *dh, const float *g, const float *u, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += EXP_BLK) {
        float s[EXP_BLK];
        int64_t m = n - i0 < EXP_BLK ? n - i0 : EXP_BLK;
        sigmoid_blk(s, g + i0, m);
        for (int64_t j = 0, i = i0; j < m; j++, i++) {
            float silu = g[i] * s[j];
            float d = dh[i];
            du[i] = d * silu;
            dg[i] = d * u[i] * (s[j] * (1.0f + g[i] * (1.0f - s[j])));
        }
    }
}

void tp_add(float *y, const float *x, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

void tp_colsum_add(float *dst, const float *x, int64_t n, int64_t D) {
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < D; j++) {
        double s = 0;
        for (int64_t i = 0; i < n; i++) s += x[i * D + j];
        dst[j] += (float)s;
    }
}

static double ce_row(float *dlogits, const float *li, int32_t y, int64_t V, float scale) {
    if (y == -100) {
        if (dlogits) memset(dlogits, 0, (size_t)V * sizeof(float));
        return 0;
    }
    float mx = tp_vmax_f32(li, V);
    /* double exp, twice per logit, vectorised (kernels/vexp.h, ~1 ulp of
     * double): a cheaper single-expf version (1-5% of a step at 2-16 layers)
     * redrew the rounding of every gradient, and test_train_mpi's 1-vs-2-rank
     * adapter agreement (a heavy-tailed statistic, worst of 24 seeds at its
     * seed) went from 5.9e-5 to 9.5e-5 of its 1e-4 */
    double se = tp_vexp_sum(li, V, (double)mx);
    double lse = mx + log(se), loss = lse - li[y];
    if (dlogits) {
        tp_vexp_scale(dlogits, li, V, lse, scale);
        dlogits[y] -= scale;
    }
    return loss;
}

double tp_cross_entropy(float *dlogits, const float *logits, const int32_t *labels, int64_t n, int64_t V, float scale,
                        int64_t *count) {
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; i++) cnt += labels[i] != -100;
    if (count) *count = cnt;
    /* rows in parallel, losses summed in row order: deterministic */
    double *row = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    double total = 0;
    if (!row) { /* no scratch: same result, one thread */
        for (int64_t i = 0; i < n; i++)
            total += ce_row(dlogits ? dlogits + i * V : NULL, logits + i * V, labels[i], V, scale);
        return total;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        row[i] = ce_row(dlogits ? dlogits + i * V : NULL, logits + i * V, labels[i], V, scale);
    for (int64_t i = 0; i < n; i++) total += row[i];
    free(row);
    return total;
}
