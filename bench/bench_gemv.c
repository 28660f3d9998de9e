/* bench_gemv.c - one activation row times a frozen bf16 weight (decoding):
 * the small-n kernel reading the weight in place versus converting the matrix
 * to fp32 and calling sgemm (what the f32 backend did before), next to the
 * memory read bandwidth measured in the same run. Weights are rotated over
 * copies totalling >= 1 GB (every copy used each round) so they come from
 * memory, not from a large L3.
 *
 *   bench_gemv [--iters 10] [--nmax K]   (--nmax: also n = 1..K on 2048x8192,
 *                                          through tp_mm_xwt of both backends) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <omp.h>

#include "kernels/matmul.h"
#include "util/dtype.h"
#include "util/rng.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* read bandwidth: glibc memchr (AVX2/EVEX code) for a byte the buffer does
 * not hold, over 1 GB split among the threads; best of 5 (GB/s) */
static double mem_bw(void) {
    size_t n = (size_t)1 << 30;
    unsigned char *a = malloc(n);
    if (!a) return 0;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i & 63);
    double best = 1e30;
    size_t found = 0;
    for (int it = 0; it < 5; it++) {
        double t0 = now();
#pragma omp parallel reduction(+ : found)
        {
            size_t nt = (size_t)omp_get_num_threads(), k = (size_t)omp_get_thread_num();
            size_t lo = n / nt * k, hi = k + 1 == nt ? n : n / nt * (k + 1);
            found += memchr(a + lo, 0xff, hi - lo) != NULL;
        }
        double t = now() - t0;
        if (t < best) best = t;
    }
    free(a);
    if (found) puts("bench_gemv: memchr found the byte it should not");
    return (double)n / best / 1e9;
}

typedef struct bench_w {
    int ncopy;
    uint16_t **w;
    int64_t rows, cols;
} bench_w;

static int make_w(bench_w *b, int64_t rows, int64_t cols) {
    size_t elems = (size_t)(rows * cols), bytes = elems * 2;
    b->rows = rows;
    b->cols = cols;
    b->ncopy = (int)(((size_t)1 << 30) / bytes) + 1;
    b->w = calloc((size_t)b->ncopy, sizeof *b->w);
    tp_rng r;
    tp_rng_seed(&r, 1, 1);
    for (int k = 0; k < b->ncopy; k++) {
        b->w[k] = malloc(bytes);
        if (!b->w[k]) return 1;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < elems; i++) b->w[k][i] = tp_f32_to_bf16((float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f);
    }
    return 0;
}

static void free_w(bench_w *b) {
    for (int k = 0; k < b->ncopy; k++) free(b->w[k]);
    free(b->w);
}

/* what the f32 backend did for a bf16 weight before the small-n kernel */
static void convert_sgemm(const float *x, int64_t n, const uint16_t *w, int64_t rows, int64_t cols, float *wf,
                          float *y) {
    size_t elems = (size_t)(rows * cols);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < elems; i++) wf[i] = tp_bf16_to_f32(w[i]);
    tp_sgemm(0, 1, n, rows, cols, 1.0f, x, cols, wf, cols, 0.0f, y, rows);
}

enum { K_SMALL, K_CONVERT, K_XWT_F32, K_XWT_BF16 };

/* best seconds per call over iters rounds of one call per copy */
static double time_it(int kind, bench_w *b, const float *x, int64_t n, float *wf, float *y, tp_matmul *mm,
                      int iters) {
    double best = 1e30;
    tp_err err;
    for (int it = 0; it < (iters + 1) * b->ncopy; it++) {
        const uint16_t *w = b->w[it % b->ncopy];
        tp_weight wt = {w, TP_BF16, b->rows, b->cols};
        double t0 = now();
        if (kind == K_SMALL) tp_mm_xwt_small(x, n, &wt, y, 0, &err);
        else if (kind == K_CONVERT) convert_sgemm(x, n, w, b->rows, b->cols, wf, y);
        else tp_mm_xwt(mm, x, n, &wt, y, 0, &err);
        double t = now() - t0;
        if (it >= b->ncopy && t < best) best = t;
    }
    return best;
}

int main(int argc, char **argv) {
    int iters = 10, nmax = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--nmax") && i + 1 < argc) nmax = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_gemv [--iters N] [--nmax K]\n");
            return 2;
        }
    }
    if (iters < 1) iters = 1;
    double bw = mem_bw();
    printf("bench_gemv: %d OpenMP threads, kernel ISA %s, memory read bandwidth %.1f GB/s (memchr over 1 GB)\n",
           omp_get_max_threads(), tp_mm_isa_name(tp_mm_isa_current()), bw);
    printf("%-18s %4s %12s %9s %8s %14s %9s %10s\n", "bf16 W [rows x cols]", "n", "kernel ms", "GB/s", "of mem",
           "convert+sgemm", "GB/s", "speed-up");
    int64_t shapes[3][2] = {{2048, 8192}, {8192, 2048}, {128256, 2048}};
    int64_t maxn = nmax > 1 ? nmax : 1;
    float *x = malloc((size_t)(maxn * 8192) * sizeof(float)), *y = malloc((size_t)(maxn * 128256) * sizeof(float));
    for (int64_t i = 0; i < maxn * 8192; i++) x[i] = (float)((i % 17) - 8) * 0.01f;
    tp_matmul *mf = NULL, *mb = NULL;
    tp_err err;
    if (tp_matmul_create(TP_MM_F32, &mf, &err) || tp_matmul_create(TP_MM_BF16, &mb, &err)) {
        fprintf(stderr, "bench_gemv: %s\n", err.msg);
        return 1;
    }
    for (int s = 0; s < 3; s++) {
        bench_w b;
        if (make_w(&b, shapes[s][0], shapes[s][1])) {
            fprintf(stderr, "bench_gemv: out of memory\n");
            return 1;
        }
        float *wf = malloc((size_t)(b.rows * b.cols) * sizeof(float));
        double bytes = 2.0 * (double)(b.rows * b.cols);
        double tk = time_it(K_SMALL, &b, x, 1, wf, y, NULL, iters);
        double tc = time_it(K_CONVERT, &b, x, 1, wf, y, NULL, iters);
        char name[32];
        snprintf(name, sizeof name, "%lld x %lld", (long long)b.rows, (long long)b.cols);
        printf("%-18s %4d %12.3f %9.1f %7.0f%% %12.3f ms %9.1f %9.1fx\n", name, 1, tk * 1e3, bytes / tk / 1e9,
               100.0 * bytes / tk / 1e9 / bw, tc * 1e3, bytes / tc / 1e9, tc / tk);
        if (s == 0 && nmax > 1) {
            printf("  n sweep (ms per call): n, kernel, convert+sgemm, tp_mm_xwt f32 backend, tp_mm_xwt %s backend\n",
                   tp_mm_backend_name(tp_matmul_backend(mb)));
            for (int64_t n = 1; n <= nmax; n++)
                printf("  %3lld %9.3f %9.3f %9.3f %9.3f\n", (long long)n,
                       1e3 * time_it(K_SMALL, &b, x, n, wf, y, NULL, iters),
                       1e3 * time_it(K_CONVERT, &b, x, n, wf, y, NULL, iters),
                       1e3 * time_it(K_XWT_F32, &b, x, n, wf, y, mf, iters),
                       1e3 * time_it(K_XWT_BF16, &b, x, n, wf, y, mb, iters));
        }
        free(wf);
        free_w(&b);
    }
    tp_matmul_destroy(mf);
    tp_matmul_destroy(mb);
    free(x);
    free(y);
    return 0;
}
