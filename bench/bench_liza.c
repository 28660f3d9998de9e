/* bench_liza.c - one layer's LiZA linear attention (gates excluded: the
 * recurrence kernel) forward+backward versus softmax attention forward+
 * backward on the same shapes, for growing T. Prints time, GFLOP/s (the
 * kernels' own FLOP counts), peak RSS growth, the linear-scaling ratio
 * time(32k)/time(4k) and the crossover length where LiZA-only is faster.
 *
 *   bench_liza [--heads 32] [--dim 128] [--order 1] [--chunk 64]
 *              [--tmax 32768] [--softmax-tmax 8192] [--ref]
 *
 * --ref runs the reference shape instead: T = 4096, H = 8, d = 128,
 * n_h = 1 and 2 (targets: <= 0.15 s and <= 200 MB for n_h = 1, <= 0.4 s for
 * n_h = 2; the Python TPTT operator: 7.2 s / 3.2 GB and 23.9 s / 7.2 GB). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "kernels/attention.h"
#include "kernels/liza.h"
#include "util/platform.h"
#include "util/rng.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double rss_mib(void) { /* current RSS */
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, res = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &res) != 2) res = 0;
        fclose(f);
    }
    return (double)res * 4096.0 / 1048576.0;
}

static double peak_mib(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_maxrss / 1024.0;
}

static float *rnd(size_t n, tp_rng *r, double scale, double offset) {
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = (float)(offset + scale * (tp_rng_uniform(r) - 0.5));
    return x;
}

static void unitize(float *x, size_t rows, int64_t d) {
    for (size_t i = 0; i < rows; i++) {
        double nn = 0;
        for (int64_t e = 0; e < d; e++) nn += (double)x[i * d + e] * x[i * d + e];
        for (int64_t e = 0; e < d; e++) x[i * d + e] = (float)(x[i * d + e] / sqrt(nn));
    }
}

/* fwd+bwd of LiZA for one layer; returns seconds, sets *mem to the RSS growth */
static double run_liza(int64_t T, int64_t H, int64_t d, int order, int chunk, double *mem, double *gflop) {
    tp_rng r;
    tp_rng_seed(&r, 1, 1);
    double before = rss_mib();
    size_t n = (size_t)(T * H * d);
    float *q = rnd(n, &r, 1, 0), *k = rnd(n, &r, 1, 0), *v = rnd(n, &r, 0.2, 0), *b = rnd(n, &r, 0.5, 0.5);
    unitize(q, (size_t)(T * H), d);
    unitize(k, (size_t)(T * H), d);
    int32_t *ds = calloc((size_t)T, sizeof *ds);
    tp_liza_dims s = {1, T, H, H, d};
    tp_liza_cfg c = {order, TP_TRICK_DT, 1, chunk};
    size_t ns = tp_liza_state_count(&s, &c, ds) * (size_t)(d * d);
    float *st = malloc(ns * sizeof *st), *y = malloc(n * sizeof *y), *dy = rnd(n, &r, 1, 0);
    float *dq = malloc(n * sizeof *dq), *dk = malloc(n * sizeof *dk), *dv = malloc(n * sizeof *dv),
          *db = malloc(n * sizeof *db);
    tp_err err;
    double t0 = now();
    tp_liza_fwd(&s, &c, q, k, v, b, NULL, ds, y, st, &err);
    tp_liza_bwd(&s, &c, q, k, v, b, NULL, ds, st, dy, dq, dk, dv, db, NULL, &err);
    double t = now() - t0;
    *mem = peak_mib() - before;
    /* per virtual chunk of cv rows: fwd ~ 6 cv d² + 6 cv² d (+ O), bwd ~ 2.5x */
    double cv = (double)chunk * order, rows = (double)T * order;
    *gflop = 3.5 * rows * H * (6.0 * d * d + 6.0 * cv * d) / 1e9;
    free(q); free(k); free(v); free(b); free(ds); free(st); free(y); free(dy); free(dq); free(dk); free(dv); free(db);
    return t;
}

static double run_softmax(int64_t T, int64_t H, int64_t d, double *mem, double *gflop) {
    tp_rng r;
    tp_rng_seed(&r, 2, 1);
    double before = rss_mib();
    size_t n = (size_t)(T * H * d);
    float *q = rnd(n, &r, 1, 0), *k = rnd(n, &r, 1, 0), *v = rnd(n, &r, 1, 0), *dout = rnd(n, &r, 1, 0);
    float *o = malloc(n * sizeof *o), *lse = malloc((size_t)(T * H) * sizeof *lse);
    float *dq = malloc(n * sizeof *dq), *dk = malloc(n * sizeof *dk), *dv = malloc(n * sizeof *dv);
    int32_t *ds = calloc((size_t)T, sizeof *ds);
    tp_attn_dims s = {1, T, H, H, d, 0};
    tp_err err;
    double t0 = now();
    tp_attn_fwd(&s, q, k, v, ds, o, lse, &err);
    tp_attn_bwd(&s, q, k, v, ds, o, lse, dout, dq, dk, dv, &err);
    double t = now() - t0;
    *mem = peak_mib() - before;
    /* causal: fwd 2 products of T²/2·d per head, bwd 5 (incl. recompute) */
    *gflop = 7.0 * 2.0 * (double)T * (double)T / 2.0 * (double)d * (double)H / 1e9;
    free(q); free(k); free(v); free(dout); free(o); free(lse); free(dq); free(dk); free(dv); free(ds);
    return t;
}

int main(int argc, char **argv) {
    tp_maybe_reexec_for_blas(argc, argv);
    int64_t H = 32, d = 128, tmax = 32768, smax = 8192;
    int order = 1, chunk = 64, ref = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ref")) ref = 1;
        else if (i + 1 < argc && !strcmp(argv[i], "--heads")) H = atoll(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--dim")) d = atoll(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--order")) order = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--chunk")) chunk = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--tmax")) tmax = atoll(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--softmax-tmax")) smax = atoll(argv[++i]);
    }
    char plat[512];
    tp_platform_describe(plat, sizeof plat);
    printf("platform: %s\n", plat);
    if (ref) {
        printf("reference shape: one layer, T=4096, H=8, d=128, chunk %d\n", chunk);
        printf("%-6s %10s %10s %14s\n", "n_h", "seconds", "GFLOP/s", "peak MiB (+)");
        for (int o = 1; o <= 2; o++) {
            double mem, gf, t = run_liza(4096, 8, d, o, chunk, &mem, &gf);
            printf("%-6d %10.3f %10.1f %14.0f\n", o, t, gf / t, mem);
            fflush(stdout);
        }
        printf("targets: n_h=1 <= 0.15 s and <= 200 MB; n_h=2 <= 0.4 s (Python TPTT: 7.2 s/3.2 GB, 23.9 s/7.2 GB)\n");
        return 0;
    }
    printf("one layer fwd+bwd, H=%lld, d=%lld, n_h=%d, chunk %d (softmax up to T=%lld)\n", (long long)H, (long long)d,
           order, chunk, (long long)smax);
    printf("%8s | %10s %9s %10s | %10s %9s %10s | %s\n", "T", "LiZA s", "GFLOP/s", "+MiB", "softmax s", "GFLOP/s",
           "+MiB", "faster");
    double t4k = 0, t32k = 0;
    int64_t crossover = 0;
    for (int64_t T = 256; T <= tmax; T *= 2) {
        double ml, gl, tl = run_liza(T, H, d, order, chunk, &ml, &gl);
        if (T == 4096) t4k = tl;
        if (T == 32768) t32k = tl;
        printf("%8lld | %10.3f %9.1f %10.0f |", (long long)T, tl, gl / tl, ml);
        if (T <= smax) {
            double ms, gs, ts = run_softmax(T, H, d, &ms, &gs);
            printf(" %10.3f %9.1f %10.0f | %s\n", ts, gs / ts, ms, tl < ts ? "LiZA" : "softmax");
            if (tl < ts && !crossover) crossover = T;
        } else {
            printf(" %10s %9s %10s |\n", "-", "-", "-");
        }
        fflush(stdout);
    }
    if (t4k > 0 && t32k > 0) printf("linear scaling: time(32k)/time(4k) = %.2f (8 would be exactly linear; <= 9 required)\n", t32k / t4k);
    if (crossover) printf("crossover: LiZA-only is faster from T = %lld on (first power of two measured)\n", (long long)crossover);
    return 0;
}
