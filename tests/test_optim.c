/* test_optim.c - AdamW, clipping and LR schedule against closed forms:
 * the first AdamW step moves each parameter by lr·sign(g) (bias correction),
 * decoupled weight decay only shrinks, two steps match the formula evaluated
 * in double, tp_sum_squares follows its documented blocking bit for bit for
 * any thread count, clip coefficients, and schedule values worked out by hand.
 * The comparison with PyTorch itself is tests/test_optim_torch.py. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "train/optim.h"

static const tp_adamw_cfg CFG = {.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};

/* deterministic pseudo-random floats in [-scale, scale) */
static void fill(float *x, size_t n, uint64_t seed, float scale) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = scale * (float)((double)(s >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
    }
}

static void test_first_step_sign(void) {
    const float g[] = {1e-3f, -0.5f, 2.0f, -7.0f, 1e3f, 1e-2f, -3e-3f, 0.25f, 0.0f};
    enum { N = sizeof g / sizeof g[0] };
    float p[N] = {0}, m[N] = {0}, v[N] = {0};
    const double lr = 1e-3;
    tp_adamw_update(&CFG, 1, lr, 0.0f, p, g, m, v, N);
    for (int i = 0; i < N; i++) {
        /* m̂ = g, v̂ = g²: the update is −lr·g/(|g| + eps) ≈ −lr·sign(g) */
        const double sign = g[i] > 0 ? 1.0 : g[i] < 0 ? -1.0 : 0.0;
        const double want = -lr * g[i] / (fabs(g[i]) + 1e-8);
        CHECK_MSG(fabs(p[i] - want) <= 1e-6 * lr, "i=%d p=%.9g want %.9g", i, p[i], want);
        CHECK_MSG(fabs(p[i] + lr * sign) <= 2e-5 * lr, "i=%d p=%.9g", i, p[i]);
    }
    CHECK(p[N - 1] == 0.0f && m[N - 1] == 0.0f && v[N - 1] == 0.0f);
    CHECK(m[1] == -0.5f * (float)(1.0 - 0.9)); /* 0·β1 + (1-β1)·g */

    /* a constant gradient keeps m̂ = g and v̂ = g² at every step (that is what
     * bias correction is for), so ten steps move by ten lr */
    float q[2] = {0.0f, 1.0f}, gq[2] = {0.3f, -40.0f}, mq[2] = {0}, vq[2] = {0};
    for (int t = 1; t <= 10; t++) tp_adamw_update(&CFG, t, lr, 0.0f, q, gq, mq, vq, 2);
    CHECK_MSG(fabs(q[0] - (-10 * lr)) <= 1e-4 * 10 * lr, "q0=%.9g", q[0]);
    CHECK_MSG(fabs(q[1] - (1.0f + 10 * lr)) <= 1e-4 * 10 * lr + 1e-6, "q1=%.9g", q[1]);
}

static void test_weight_decay(void) {
    /* zero gradient: only p ← p·(1 − lr·wd) acts (update is 0/eps = 0) */
    const float p0[] = {1.0f, -2.0f, 0.5f, 3.0f, -1e-20f, 0.0f};
    enum { N = sizeof p0 / sizeof p0[0] };
    float p[N], g[N] = {0}, m[N] = {0}, v[N] = {0};
    memcpy(p, p0, sizeof p);
    const double lr = 1e-2, wd = 0.1;
    const float decay = (float)(1.0 - lr * wd);
    tp_adamw_update(&CFG, 1, lr, wd, p, g, m, v, N);
    for (int i = 0; i < N; i++) {
        CHECK_MSG(p[i] == p0[i] * decay, "i=%d p=%.9g", i, p[i]);
        CHECK(fabsf(p[i]) <= fabsf(p0[i]) && (p0[i] == 0 || fabsf(p[i]) < fabsf(p0[i])));
        CHECK(signbit(p[i]) == signbit(p0[i]));
    }
    /* with a gradient, wd adds −lr·wd·p to the plain Adam step */
    float a[1] = {2.0f}, b[1] = {2.0f}, gg[1] = {0.7f}, ma[1] = {0}, va[1] = {0}, mb[1] = {0}, vb[1] = {0};
    tp_adamw_update(&CFG, 1, lr, wd, a, gg, ma, va, 1);
    tp_adamw_update(&CFG, 1, lr, 0.0f, b, gg, mb, vb, 1);
    CHECK_MSG(fabs((a[0] - b[0]) - (-(double)lr * wd * 2.0)) <= 1e-6, "a=%.9g b=%.9g", a[0], b[0]);
    CHECK(ma[0] == mb[0] && va[0] == vb[0]);
}

/* AdamW evaluated in double from the formula in optim.h */
static void test_two_steps_closed_form(void) {
    const float g1[] = {0.5f, -1.5f, 3e-4f, 10.0f}, g2[] = {-0.25f, -1.0f, 2e-4f, 0.1f};
    const float p0[] = {0.3f, -0.7f, 1.0f, 0.0f};
    enum { N = 4 };
    float p[N], m[N] = {0}, v[N] = {0};
    memcpy(p, p0, sizeof p);
    const double lr1 = 2e-3, lr2 = 1e-3, wd = 0.05;
    tp_adamw_update(&CFG, 1, lr1, wd, p, g1, m, v, N);
    tp_adamw_update(&CFG, 2, lr2, wd, p, g2, m, v, N);
    for (int i = 0; i < N; i++) {
        const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
        double P = p0[i], M = 0, V = 0;
        const double gs[2] = {g1[i], g2[i]}, lrs[2] = {lr1, lr2};
        for (int t = 1; t <= 2; t++) {
            const double gt = gs[t - 1], lt = lrs[t - 1];
            P *= 1 - lt * wd;
            M = b1 * M + (1 - b1) * gt;
            V = b2 * V + (1 - b2) * gt * gt;
            P -= lt * (M / (1 - pow(b1, t))) / (sqrt(V / (1 - pow(b2, t))) + eps);
        }
        CHECK_MSG(fabs(p[i] - P) <= 1e-6 * fabs(P) + 1e-9, "i=%d p=%.9g want %.9g", i, p[i], P);
        CHECK_MSG(fabs(m[i] - M) <= 1e-6 * fabs(M), "i=%d m=%.9g want %.9g", i, m[i], M);
        CHECK_MSG(fabs(v[i] - V) <= 1e-6 * fabs(V), "i=%d v=%.9g want %.9g", i, v[i], V);
    }
}

static void test_adamw_threads(void) {
    const size_t n = 100003;
    float *g = malloc(n * sizeof *g), *p[2], *m[2], *v[2];
    for (int k = 0; k < 2; k++) {
        p[k] = malloc(n * sizeof(float));
        m[k] = calloc(n, sizeof(float));
        v[k] = calloc(n, sizeof(float));
        fill(p[k], n, 1, 1.0f);
    }
    for (int k = 0; k < 2; k++) {
        omp_set_num_threads(k ? 3 : 1);
        for (int t = 1; t <= 4; t++) {
            fill(g, n, 100 + t, 0.1f);
            tp_adamw_update(&CFG, t, 1e-3f, 0.01f, p[k], g, m[k], v[k], n);
        }
    }
    CHECK(!memcmp(p[0], p[1], n * sizeof(float)));
    CHECK(!memcmp(m[0], m[1], n * sizeof(float)));
    CHECK(!memcmp(v[0], v[1], n * sizeof(float)));
    for (int k = 0; k < 2; k++) free(p[k]), free(m[k]), free(v[k]);
    free(g);
    omp_set_num_threads(2);
}

/* the definition in optim.h, written out serially */
static double sumsq_ref(const float *x, size_t n) {
    double total = 0.0;
    for (size_t lo = 0; lo < n; lo += TP_SUMSQ_BLOCK) {
        double s = 0.0;
        for (size_t i = lo; i < n && i < lo + TP_SUMSQ_BLOCK; i++) s += (double)x[i] * x[i];
        total += s;
    }
    return total;
}

static void test_sum_squares(void) {
    CHECK(tp_sum_squares(NULL, 0) == 0.0);
    float small[1000];
    for (int i = 0; i < 1000; i++) small[i] = (float)(i + 1);
    CHECK(tp_sum_squares(small, 1000) == 333833500.0); /* n(n+1)(2n+1)/6, exact */
    CHECK(tp_sum_squares(small, 3) == 14.0);

    /* > 5 groups of 256 blocks, a short last block */
    const size_t n = (size_t)5 * 1024 * 1024 + 123;
    float *x = malloc(n * sizeof *x);
    fill(x, n, 7, 3.0f);
    const double want = sumsq_ref(x, n);
    double naive = 0.0;
    for (size_t i = 0; i < n; i++) naive += (double)x[i] * x[i];
    const int threads[] = {1, 2, 3, 4};
    for (int k = 0; k < 4; k++) {
        omp_set_num_threads(threads[k]);
        const double got = tp_sum_squares(x, n);
        CHECK_MSG(!memcmp(&got, &want, sizeof got), "threads=%d got %.17g want %.17g", threads[k], got, want);
    }
    CHECK(fabs(want - naive) <= 1e-12 * naive);
    /* lengths around block boundaries */
    const size_t ns[] = {1, 4095, 4096, 4097, 8192, 256 * 4096, 256 * 4096 + 1};
    for (int k = 0; k < 7; k++) {
        omp_set_num_threads(3);
        const double a = tp_sum_squares(x, ns[k]), b = sumsq_ref(x, ns[k]);
        CHECK_MSG(!memcmp(&a, &b, sizeof a), "n=%zu", ns[k]);
    }
    omp_set_num_threads(2);

    /* tp_scale */
    float *y = malloc(n * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    tp_scale(y, n, 0.375f);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += y[i] != x[i] * 0.375f;
    CHECK_MSG(bad == 0, "%zu elements differ", bad);
    tp_scale(y, 0, 2.0f);
    free(y);
    free(x);
}

static void test_clip_coef(void) {
    CHECK(tp_clip_coef(10.0, 1.0) == (float)(1.0 / (10.0 + 1e-6)));
    CHECK(tp_clip_coef(4.0, 2.0) == (float)(2.0 / 4.000001));
    CHECK(tp_clip_coef(0.5, 1.0) == 1.0f);
    CHECK(tp_clip_coef(1.0, 1.0) == (float)(1.0 / (1.0 + 1e-6)) && tp_clip_coef(1.0, 1.0) < 1.0f); /* the 1e-6 */
    CHECK(tp_clip_coef(0.0, 1.0) == 1.0f);
    CHECK(tp_clip_coef(10.0, 0.0) == 1.0f);  /* no clipping */
    CHECK(tp_clip_coef(10.0, -1.0) == 1.0f);
    CHECK(tp_clip_coef(INFINITY, 1.0) == 0.0f);
    CHECK(isnan(tp_clip_coef(NAN, 1.0)));
    CHECK(tp_clip_coef(1e30, 1.0) > 0.0f && tp_clip_coef(1e30, 1.0) < 1.1e-30f);
}

#define REL(a, b) (fabs((a) - (b)) <= 1e-15 * fabs(b))

static void test_schedule(void) {
    tp_lr_schedule s = {.peak_lr = 1e-3, .min_lr = 0, .warmup_steps = 10, .total_steps = 110, .kind = TP_LR_COSINE};
    tp_err err = {0};
    CHECK(tp_lr_schedule_validate(&s, &err) == TP_OK);
    CHECK(tp_lr_at(&s, 0) == 0.0);
    CHECK(REL(tp_lr_at(&s, 5), 5e-4));
    CHECK(REL(tp_lr_at(&s, 9), 9e-4));
    CHECK(tp_lr_at(&s, 10) == 1e-3);
    CHECK(REL(tp_lr_at(&s, 35), 8.5355339059327376e-4)); /* 0.5(1 + cos(π/4)) */
    CHECK(REL(tp_lr_at(&s, 60), 5e-4));
    CHECK(REL(tp_lr_at(&s, 85), 1.4644660940672624e-4)); /* 0.5(1 − cos(π/4)) */
    CHECK(tp_lr_at(&s, 110) == 0.0);
    CHECK(REL(tp_lr_at(&s, 135), 1.4644660940672624e-4)); /* transformers' formula past T */

    s.kind = TP_LR_LINEAR;
    CHECK(REL(tp_lr_at(&s, 5), 5e-4) && tp_lr_at(&s, 10) == 1e-3);
    CHECK(REL(tp_lr_at(&s, 35), 7.5e-4) && REL(tp_lr_at(&s, 60), 5e-4) && REL(tp_lr_at(&s, 109), 1e-5));
    CHECK(tp_lr_at(&s, 110) == 0.0 && tp_lr_at(&s, 200) == 0.0);

    s.kind = TP_LR_CONSTANT;
    CHECK(REL(tp_lr_at(&s, 3), 3e-4) && tp_lr_at(&s, 10) == 1e-3 && tp_lr_at(&s, 1000) == 1e-3);

    /* floor: applies after warmup only */
    s.min_lr = 1e-4;
    s.kind = TP_LR_COSINE;
    CHECK(REL(tp_lr_at(&s, 5), 5e-4) && REL(tp_lr_at(&s, 10), 1e-3));
    CHECK(REL(tp_lr_at(&s, 60), 5.5e-4) && REL(tp_lr_at(&s, 110), 1e-4));
    s.kind = TP_LR_LINEAR;
    CHECK(REL(tp_lr_at(&s, 35), 7.75e-4) && REL(tp_lr_at(&s, 200), 1e-4));
    s.kind = TP_LR_CONSTANT;
    CHECK(tp_lr_at(&s, 50) == 1e-3);

    /* no warmup; warmup == total */
    tp_lr_schedule z = {.peak_lr = 3e-4, .min_lr = 0, .warmup_steps = 0, .total_steps = 4, .kind = TP_LR_COSINE};
    CHECK(tp_lr_at(&z, 0) == 3e-4 && REL(tp_lr_at(&z, 2), 1.5e-4) && tp_lr_at(&z, 4) == 0.0);
    z.kind = TP_LR_LINEAR;
    CHECK(tp_lr_at(&z, 0) == 3e-4 && REL(tp_lr_at(&z, 1), 2.25e-4));
    z.kind = TP_LR_CONSTANT;
    CHECK(tp_lr_at(&z, 0) == 3e-4);
    z.warmup_steps = 4;
    z.kind = TP_LR_COSINE;
    CHECK(tp_lr_schedule_validate(&z, &err) == TP_OK);
    CHECK(REL(tp_lr_at(&z, 1), 7.5e-5) && tp_lr_at(&z, 4) == 3e-4); /* progress 0/max(1,0) */
}

static int invalid(tp_lr_schedule s, const char *field) {
    tp_err err = {0};
    int rc = tp_lr_schedule_validate(&s, &err);
    CHECK_MSG(rc == TP_EINVAL && strstr(err.msg, field), "rc=%d msg=%s", rc, err.msg);
    return rc;
}

static void test_validate(void) {
    const tp_lr_schedule ok = {.peak_lr = 1e-3, .min_lr = 1e-5, .warmup_steps = 10, .total_steps = 100};
    tp_lr_schedule s;
    s = ok, s.peak_lr = -1e-3, invalid(s, "peak_lr");
    s = ok, s.peak_lr = NAN, invalid(s, "peak_lr");
    s = ok, s.min_lr = -1, invalid(s, "min_lr");
    s = ok, s.min_lr = 2e-3, invalid(s, "min_lr (0.002) > peak_lr (0.001)");
    s = ok, s.warmup_steps = -1, invalid(s, "warmup_steps");
    s = ok, s.total_steps = 0, s.warmup_steps = 0, invalid(s, "total_steps");
    s = ok, s.warmup_steps = 200, invalid(s, "warmup_steps (200) > total_steps (100)");
    s = ok, s.kind = 7, invalid(s, "kind");

    int k = -1;
    CHECK(tp_lr_schedule_parse_kind("cosine", &k) == TP_OK && k == TP_LR_COSINE);
    CHECK(tp_lr_schedule_parse_kind("linear", &k) == TP_OK && k == TP_LR_LINEAR);
    CHECK(tp_lr_schedule_parse_kind("constant", &k) == TP_OK && k == TP_LR_CONSTANT);
    CHECK(tp_lr_schedule_parse_kind("Cosine", &k) == TP_EINVAL && k == TP_LR_CONSTANT);
    CHECK(tp_lr_schedule_parse_kind("", &k) == TP_EINVAL);
    CHECK(tp_lr_schedule_parse_kind(NULL, &k) == TP_EINVAL);
    CHECK(!strcmp(tp_lr_kind_name(TP_LR_LINEAR), "linear") && !strcmp(tp_lr_kind_name(9), "?"));

    tp_err err = {0};
    tp_adamw_cfg c = TP_ADAMW_CFG_DEFAULT;
    CHECK(tp_adamw_cfg_validate(&c, &err) == TP_OK);
    c.beta1 = 1.0;
    CHECK(tp_adamw_cfg_validate(&c, &err) == TP_EINVAL && strstr(err.msg, "beta1"));
    c = TP_ADAMW_CFG_DEFAULT, c.beta2 = -0.1;
    CHECK(tp_adamw_cfg_validate(&c, &err) == TP_EINVAL && strstr(err.msg, "beta2"));
    c = TP_ADAMW_CFG_DEFAULT, c.eps = -1e-8;
    CHECK(tp_adamw_cfg_validate(&c, &err) == TP_EINVAL && strstr(err.msg, "eps"));
}

int main(void) {
    test_first_step_sign();
    test_weight_decay();
    test_two_steps_closed_form();
    test_adamw_threads();
    test_sum_squares();
    test_clip_coef();
    test_schedule();
    test_validate();
    return tp_test_report("test_optim");
}
