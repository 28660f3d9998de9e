/* bench_matmul.c - the rate of every frozen-weight product of a training step,
 * per shape and direction, on the matmul backends this CPU has: forward
 * y = x·Wᵀ (tp_mm_xwt) and dX = dY·W (tp_mm_dyw), n tokens, BF16 weights.
 * The trainer's efficiency share divides by one start-up rate; this shows
 * how far each of the step's products is from it. Not a test.
 *   bench_matmul [--n 512] [--hidden 2048] [--kv 512] [--ffn 8192] [--vocab 128256]
 *                [--head-block N (the trainer's head block: 0 = n)] [--time 0.4]
 * Threads: OMP_NUM_THREADS. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/matmul.h"
#include "util/dtype.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* best of repeated products over about `secs` seconds, GFLOP/s */
static double rate(tp_matmul *mm, int dyw, const float *x, int64_t n, const tp_weight *w, float *y, double secs) {
    tp_err e = {0};
    int rc = dyw ? tp_mm_dyw(mm, x, n, w, y, 0, &e) : tp_mm_xwt(mm, x, n, w, y, 0, &e); /* warm-up */
    if (rc != TP_OK) { fprintf(stderr, "bench_matmul: %s\n", e.msg); return 0; }
    double best = 0, t0 = now();
    for (int k = 0; k < 3 || now() - t0 < secs; k++) {
        double a = now();
        rc = dyw ? tp_mm_dyw(mm, x, n, w, y, 0, &e) : tp_mm_xwt(mm, x, n, w, y, 0, &e);
        double dt = now() - a;
        if (rc != TP_OK) { fprintf(stderr, "bench_matmul: %s\n", e.msg); return 0; }
        if (best == 0 || dt < best) best = dt;
    }
    return 2.0 * (double)n * (double)w->rows * (double)w->cols / best * 1e-9;
}

int main(int argc, char **argv) {
    int64_t n = 512, hid = 2048, kv = 512, ffn = 8192, vocab = 128256, hb = 0;
    double secs = 0.4;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--n")) n = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--hidden")) hid = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--kv")) kv = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--ffn")) ffn = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--vocab")) vocab = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--head-block")) hb = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--time")) secs = atof(argv[i + 1]);
        else { fprintf(stderr, "bench_matmul: unknown option %s\n", argv[i]); return 2; }
    }
    if (hb <= 0) hb = n;
    struct { const char *name; int64_t rows, cols, n; } sh[] = {
        {"q/o [H x H]", hid, hid, n}, {"k/v [kv x H]", kv, hid, n}, {"gate/up [F x H]", ffn, hid, n},
        {"down [H x F]", hid, ffn, n}, {"head [V x H]", vocab, hid, hb},
    };
    int64_t big = vocab > ffn ? vocab : ffn;
    if (hid > big) big = hid;
    size_t maxn = (size_t)(n > hb ? n : hb);
    float *x = malloc(maxn * (size_t)big * sizeof(float)), *y = malloc(maxn * (size_t)big * sizeof(float));
    uint16_t *wb = malloc((size_t)vocab * (size_t)hid * sizeof(uint16_t));
    if (!x || !y || !wb) { fprintf(stderr, "bench_matmul: out of memory\n"); return 1; }
    for (size_t i = 0; i < maxn * (size_t)big; i++) x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    for (size_t i = 0; i < (size_t)vocab * (size_t)hid; i++)
        wb[i] = tp_f32_to_bf16((float)((i * 40503u) % 997) * 1e-4f - 0.05f);
    const char *thr = getenv("OMP_NUM_THREADS");
    printf("bench_matmul: n = %lld tokens (head block %lld), BF16 weights, OMP_NUM_THREADS=%s\n", (long long)n,
           (long long)hb, thr ? thr : "(unset)");
    printf("%-18s %-8s %12s %12s\n", "weight", "backend", "x·Wᵀ GF/s", "dY·W GF/s");
    for (int b = 1; b >= 0; b--) {
        tp_mm_backend want = b ? TP_MM_BF16 : TP_MM_F32;
        if (tp_mm_backend_effective(want) != want) { printf("(no oneDNN bf16 matmul on this CPU)\n"); continue; }
        tp_matmul *mm = NULL;
        tp_err e = {0};
        if (tp_matmul_create(want, &mm, &e) != TP_OK) { fprintf(stderr, "bench_matmul: %s\n", e.msg); return 1; }
        for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
            tp_weight w = {wb, TP_BF16, sh[s].rows, sh[s].cols};
            double f = rate(mm, 0, x, sh[s].n, &w, y, secs), d = rate(mm, 1, x, sh[s].n, &w, y, secs);
            printf("%-18s %-8s %12.1f %12.1f\n", sh[s].name, b ? "bf16" : "f32", f, d);
            fflush(stdout);
        }
        tp_matmul_destroy(mm);
    }
    free(x);
    free(y);
    free(wb);
    return 0;
}
