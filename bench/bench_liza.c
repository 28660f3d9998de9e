/* bench_liza.c - one layer's LiZA linear attention (gates excluded: the
 * recurrence kernel) forward+backward versus softmax attention forward+
 * backward on the same shapes, for growing T. Prints time, GFLOP/s (the
 * kernels' own FLOP counts), peak RSS growth, the linear-scaling ratio
 * time(32k)/time(4k) and the crossover length where LiZA-only is faster.
 *
 *   bench_liza [--heads 32] [--dim 128] [--order 1] [--chunk 64]
 *              [--tmin 256] [--tmax 32768] [--softmax-tmax 8192] [--reps 1]
 *              [--ref] [--kernel] [--chunks 32,64,128] [--orders 1,2]
 *              [--decay] [--avx2-tile]
 *
 * --avx2-tile runs LiZA's fp32 products on sgemm_small's AVX2 6x16 tile
 * (the ISA forced to AVX2) instead of OpenBLAS: the measurement behind
 * keeping OpenBLAS on AVX2 CPUs.
 * --kernel measures the kernel alone at T = 4096 (--tmax), H = --heads,
 * d = --dim for each n_h of --orders and each C of --chunks: forward,
 * backward and fwd+bwd, best of --reps (default 3), each repetition
 * interleaved with a 2048³ sgemm on the same threads, and prints GFLOP/s and
 * the share of the best sgemm rate of the run; the last two columns give the
 * same from CPU time (process CPU seconds per thread for fwd+bwd, share of
 * the sgemm rate per CPU second), which other processes on shared cores
 * barely move. The softmax comparison prints CPU seconds per thread too. FLOPs are those of
 * LIZA.md section 6 as the kernel performs them, triangular products counted
 * at half (only the needed triangle): see liza_flops(). Backward includes
 * the recompute of each chunk's forward (W, U, Vn) since only the entry
 * states are saved.
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
#include "kernels/matmul.h"
#include "kernels/sgemm_small.h"
#include <cblas.h>
#include <omp.h>
#include "util/platform.h"
#include "util/rng.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* CPU seconds of the whole process (all threads), divided by the thread
 * count: what the wall time would be on cores nobody else uses (OpenMP waits
 * passively, so idle threads cost nothing here) */
static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return ((double)t.tv_sec + 1e-9 * (double)t.tv_nsec) / omp_get_max_threads();
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

/* float buffers on transparent huge pages where the kernel gives them, as
 * the decoder's activation arena is (tp_advise_huge) */
static float *big(size_t n) {
    float *x = malloc(n * sizeof *x);
    tp_advise_huge(x, n * sizeof *x);
    return x;
}

static float *rnd(size_t n, tp_rng *r, double scale, double offset) {
    float *x = big(n);
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

/* FLOPs of one layer's forward (bwd = 0) or backward (bwd = 1): section 6
 * per chunk of cr real / cv = cr·n virtual rows per kv head, g query heads
 * per kv head; tri = strict lower triangle, causal = the entries a real row
 * sees (its own virtual slots included). */
static double liza_flops(int64_t T, int64_t H, int64_t Hkv, int64_t d, int n, int64_t C, int decay, int linear,
                         int bwd) {
    double tot = 0, g = (double)(H / Hkv), dd = (double)d;
    for (int64_t t0 = 0; t0 < T; t0 += C) {
        double cr = (double)(t0 + C < T ? C : T - t0), cv = cr * n;
        double tri = cv * (cv - 1) / 2, causal = n * cr * (cr + 1) / 2;
        double f = 2 * tri * dd + 4 * tri * dd + 2 * cv * dd * dd; /* L, A·[ΓK̃|Ṽ], Vn = U - W S */
        if (!bwd) {
            f += 2 * cv * dd * dd + g * (2 * cr * dd * dd + 4 * causal * dd); /* S', Q S, Q Kᵀ, P Vn */
        } else {
            if (!linear) f += 2 * cv * dd * dd;                            /* S' for φ' */
            f += 4 * cv * dd * dd;                                          /* K dS', Vn dS'ᵀ */
            f += g * (4 * cr * dd * dd + 10 * causal * dd);                 /* dQ, dS; P, dP, Pᵀ dO, dP K, dPᵀ Q */
            if (decay) f += g * 2 * cr * dd * dd;                           /* Q S for dγ */
            f += 4 * cv * dd * dd + 4 * tri * dd + 4 * tri * dd + 4 * tri * dd; /* dW, Wᵀ dVn, Aᵀ[dW|dU], dL, dL K, dLᵀ K̃ */
        }
        tot += f;
    }
    return tot * (double)Hkv;
}

typedef struct liza_buf {
    int64_t T, H, d;
    float *q, *k, *v, *b, *la, *y, *dy, *dq, *dk, *dv, *db, *dla, *st;
    int32_t *ds;
} liza_buf;

static void liza_buf_init(liza_buf *L, int64_t T, int64_t H, int64_t d, int64_t cmin, int order) {
    tp_rng r;
    tp_rng_seed(&r, 1, 1);
    size_t n = (size_t)(T * H * d);
    L->T = T; L->H = H; L->d = d;
    L->q = rnd(n, &r, 1, 0); L->k = rnd(n, &r, 1, 0); L->v = rnd(n, &r, 0.2, 0); L->b = rnd(n, &r, 0.5, 0.5);
    L->la = rnd((size_t)(T * H), &r, 0.1, -0.05);
    unitize(L->q, (size_t)(T * H), d);
    unitize(L->k, (size_t)(T * H), d);
    L->ds = calloc((size_t)T, sizeof *L->ds);
    tp_liza_dims s = {1, T, H, H, d};
    tp_liza_cfg c = {order, TP_TRICK_DT, 1, (int)cmin};
    size_t ns = tp_liza_state_count(&s, &c, L->ds) * (size_t)(d * d);
    L->st = big(ns);
    L->y = big(n); L->dy = rnd(n, &r, 1, 0);
    L->dq = big(n); L->dk = big(n); L->dv = big(n);
    L->db = big(n); L->dla = big((size_t)(T * H));
}

static void liza_buf_free(liza_buf *L) {
    free(L->q); free(L->k); free(L->v); free(L->b); free(L->la); free(L->y); free(L->dy); free(L->dq); free(L->dk);
    free(L->dv); free(L->db); free(L->dla); free(L->st); free(L->ds);
}

/* one forward and one backward; seconds of each, and CPU seconds (per
 * thread, see cpu_now) of both */
static void liza_once(liza_buf *L, int order, int chunk, int decay, double *tf, double *tb, double *cpu) {
    tp_liza_dims s = {1, L->T, L->H, L->H, L->d};
    tp_liza_cfg c = {order, TP_TRICK_DT, 1, chunk};
    tp_err err;
    double c0 = cpu_now(), t0 = now();
    if (tp_liza_fwd(&s, &c, L->q, L->k, L->v, L->b, decay ? L->la : NULL, L->ds, L->y, L->st, &err))
        fprintf(stderr, "liza fwd: %s\n", err.msg);
    double t1 = now();
    if (tp_liza_bwd(&s, &c, L->q, L->k, L->v, L->b, decay ? L->la : NULL, L->ds, L->st, L->dy, L->dq, L->dk, L->dv,
                    L->db, L->dla, &err))
        fprintf(stderr, "liza bwd: %s\n", err.msg);
    double t2 = now();
    *cpu = cpu_now() - c0;
    *tf = t1 - t0;
    *tb = t2 - t1;
}

/* fwd+bwd of LiZA for one layer, best of reps; returns seconds, sets *mem to
 * the RSS growth and *cpu to the best CPU seconds per thread */
static double run_liza(int64_t T, int64_t H, int64_t d, int order, int chunk, int reps, double *mem, double *gflop,
                       double *cpu) {
    double before = rss_mib();
    liza_buf L;
    liza_buf_init(&L, T, H, d, chunk, order);
    double best = 1e30;
    *cpu = 1e30;
    for (int i = 0; i < reps; i++) {
        double tf, tb, tc;
        liza_once(&L, order, chunk, 0, &tf, &tb, &tc);
        if (tf + tb < best) best = tf + tb;
        if (tc < *cpu) *cpu = tc;
    }
    *mem = peak_mib() - before;
    *gflop = (liza_flops(T, H, H, d, order, chunk, 0, 1, 0) + liza_flops(T, H, H, d, order, chunk, 0, 1, 1)) / 1e9;
    liza_buf_free(&L);
    return best;
}

/* GFLOP/s of one n³ sgemm on the current threads (buffers kept between
 * calls); *cpu_rate: the same per CPU second per thread */
static double sgemm_rate(int64_t n, double *cpu_rate) {
    static float *a, *b, *c;
    static int64_t have;
    if (have != n) {
        free(a); free(b); free(c);
        tp_rng r;
        tp_rng_seed(&r, 3, 1);
        a = rnd((size_t)(n * n), &r, 1, 0); b = rnd((size_t)(n * n), &r, 1, 0); c = calloc((size_t)(n * n), sizeof *c);
        have = n;
    }
    double c0 = cpu_now(), t0 = now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)n, (int)n, 1.0f, a, (int)n, b, (int)n, 0.0f, c,
                (int)n);
    double t = now() - t0, fl = 2.0 * (double)n * (double)n * (double)n / 1e9;
    *cpu_rate = fl / (cpu_now() - c0);
    return fl / t;
}

static double loadavg(void) {
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1) l = -1;
        fclose(f);
    }
    return l;
}

/* The kernel alone at one length: forward, backward, fwd+bwd per (n_h, C) */
static void kernel_table(int64_t T, int64_t H, int64_t d, const int *orders, int norders, const int *chunks,
                         int nchunks, int reps, int decay) {
    printf("kernel alone: T=%lld, H=Hkv=%lld, d=%lld, %s, best of %d (each rep interleaved with a 2048^3 sgemm), "
           "%d threads, load average %.2f\n",
           (long long)T, (long long)H, (long long)d, decay ? "with decay" : "no decay", reps, omp_get_max_threads(),
           loadavg());
    printf("%4s %5s | %8s %8s %6s | %8s %8s %6s | %8s %8s %6s | %8s | %8s %6s\n", "n_h", "C", "fwd s", "GFLOP/s",
           "%gemm", "bwd s", "GFLOP/s", "%gemm", "f+b s", "GFLOP/s", "%gemm", "sgemm GF", "f+b cpu", "%gemm");
    int cmin = chunks[0];
    for (int i = 1; i < nchunks; i++)
        if (chunks[i] < cmin) cmin = chunks[i];
    /* fwd, bwd, f+b seconds; sgemm of that row; f+b CPU seconds per thread */
    double res[8][8][5], gemm = 0, gemm_cpu = 0;
    for (int oi = 0; oi < norders; oi++) {
        int order = orders[oi];
        liza_buf L;
        liza_buf_init(&L, T, H, d, cmin, order);
        for (int ci = 0; ci < nchunks; ci++) {
            double *r4 = res[oi][ci];
            r4[0] = r4[1] = r4[2] = r4[4] = 1e30;
            r4[3] = 0;
            for (int r = 0; r < reps; r++) {
                double gc, g = sgemm_rate(2048, &gc);
                if (g > r4[3]) r4[3] = g;
                if (gc > gemm_cpu) gemm_cpu = gc;
                double tf, tb, tc;
                liza_once(&L, order, chunks[ci], decay, &tf, &tb, &tc);
                if (tf < r4[0]) r4[0] = tf;
                if (tb < r4[1]) r4[1] = tb;
                if (tf + tb < r4[2]) r4[2] = tf + tb;
                if (tc < r4[4]) r4[4] = tc;
            }
            if (r4[3] > gemm) gemm = r4[3];
        }
        liza_buf_free(&L);
    }
    /* shares of the best sgemm rate of the whole run (the conservative
     * reference on a shared machine) */
    for (int oi = 0; oi < norders; oi++)
        for (int ci = 0; ci < nchunks; ci++) {
            int order = orders[oi], C = chunks[ci];
            double *r4 = res[oi][ci], bf = r4[0], bb = r4[1], bt = r4[2];
            double ff = liza_flops(T, H, H, d, order, C, decay, 1, 0) / 1e9;
            double fb = liza_flops(T, H, H, d, order, C, decay, 1, 1) / 1e9;
            printf("%4d %5d | %8.3f %8.1f %5.0f%% | %8.3f %8.1f %5.0f%% | %8.3f %8.1f %5.0f%% | %8.1f | %8.3f %5.0f%%\n",
                   order, C, bf, ff / bf, 100 * ff / bf / gemm, bb, fb / bb, 100 * fb / bb / gemm, bt, (ff + fb) / bt,
                   100 * (ff + fb) / bt / gemm, r4[3], r4[4], 100 * (ff + fb) / r4[4] / gemm_cpu);
        }
    printf("%%gemm: share of the best sgemm rate of the whole run, %.1f GFLOP/s (sgemm GF: best sgemm "
           "interleaved with that row)\n",
           gemm);
    printf("f+b cpu: best CPU seconds of fwd+bwd per thread, and its rate as a share of the best sgemm rate per CPU "
           "second, %.1f GFLOP/s: the wall figures on cores that nobody else uses\n",
           gemm_cpu);
    printf("load average after: %.2f\n", loadavg());
}

static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    while (*s && n < max) {
        out[n++] = atoi(s);
        const char *c = strchr(s, ',');
        if (!c) break;
        s = c + 1;
    }
    return n;
}

static double run_softmax(int64_t T, int64_t H, int64_t d, int reps, double *mem, double *gflop, double *cpu) {
    tp_rng r;
    tp_rng_seed(&r, 2, 1);
    double before = rss_mib();
    size_t n = (size_t)(T * H * d);
    float *q = rnd(n, &r, 1, 0), *k = rnd(n, &r, 1, 0), *v = rnd(n, &r, 1, 0), *dout = rnd(n, &r, 1, 0);
    float *o = big(n), *lse = big((size_t)(T * H));
    float *dq = big(n), *dk = big(n), *dv = big(n);
    int32_t *ds = calloc((size_t)T, sizeof *ds);
    tp_attn_dims s = {1, T, H, H, d, 0};
    tp_err err;
    double t = 1e30;
    *cpu = 1e30;
    for (int i = 0; i < reps; i++) {
        double c0 = cpu_now(), t0 = now();
        tp_attn_fwd(&s, q, k, v, ds, o, lse, &err);
        tp_attn_bwd(&s, q, k, v, ds, o, lse, dout, dq, dk, dv, &err);
        if (now() - t0 < t) t = now() - t0;
        if (cpu_now() - c0 < *cpu) *cpu = cpu_now() - c0;
    }
    *mem = peak_mib() - before;
    /* causal: fwd 2 products of T²/2·d per head, bwd 5 (incl. recompute) */
    *gflop = 7.0 * 2.0 * (double)T * (double)T / 2.0 * (double)d * (double)H / 1e9;
    free(q); free(k); free(v); free(dout); free(o); free(lse); free(dq); free(dk); free(dv); free(ds);
    return t;
}

int main(int argc, char **argv) {
    tp_maybe_reexec_for_blas(argc, argv);
    int64_t H = 32, d = 128, tmin = 256, tmax = 32768, smax = 8192;
    int order = 1, chunk = 64, ref = 0, kernel = 0, reps = 0, decay = 0, orders[8] = {1, 2}, norders = 2, avx2_tile = 0;
    int chunks[8] = {32, 64, 128}, nchunks = 3, have_tmax = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ref")) ref = 1;
        else if (i + 1 < argc && !strcmp(argv[i], "--heads")) H = atoll(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--dim")) d = atoll(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--order")) order = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--chunk")) chunk = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--tmax")) tmax = atoll(argv[++i]), have_tmax = 1;
        else if (i + 1 < argc && !strcmp(argv[i], "--tmin")) tmin = atoll(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--reps")) reps = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--chunks")) nchunks = parse_list(argv[++i], chunks, 8);
        else if (i + 1 < argc && !strcmp(argv[i], "--orders")) norders = parse_list(argv[++i], orders, 8);
        else if (!strcmp(argv[i], "--kernel")) kernel = 1;
        else if (!strcmp(argv[i], "--decay")) decay = 1;
        else if (!strcmp(argv[i], "--avx2-tile")) {
            avx2_tile = 1;
            tp_mm_force_isa(TP_ISA_AVX2);
            tp_sgemm_small_avx2_tile(1);
        }
        else if (i + 1 < argc && !strcmp(argv[i], "--softmax-tmax")) smax = atoll(argv[++i]);
    }
    char plat[512];
    tp_platform_describe(plat, sizeof plat);
    printf("platform: %s\n", plat);
    tp_mm_isa isa = tp_mm_isa_current();
    printf("LiZA fp32 products: %s\n",
           isa == TP_ISA_AVX512 ? "own AVX-512 tile and register solves (sgemm_small.h)"
           : isa == TP_ISA_AVX2 && avx2_tile ? "own AVX2 6x16 tile (sgemm_small.h), OpenBLAS strsm"
                                             : "OpenBLAS sgemm and strsm");
    if (kernel) {
        kernel_table(have_tmax ? tmax : 4096, H, d, orders, norders, chunks, nchunks, reps > 0 ? reps : 3, decay);
        return 0;
    }
    if (reps < 1) reps = 1;
    if (ref) {
        printf("reference shape: one layer, T=4096, H=8, d=128, chunk %d\n", chunk);
        printf("%-6s %10s %10s %14s\n", "n_h", "seconds", "GFLOP/s", "peak MiB (+)");
        for (int o = 1; o <= 2; o++) {
            double mem, gf, cpu, t = run_liza(4096, 8, d, o, chunk, reps, &mem, &gf, &cpu);
            printf("%-6d %10.3f %10.1f %14.0f\n", o, t, gf / t, mem);
            fflush(stdout);
        }
        printf("targets: n_h=1 <= 0.15 s and <= 200 MB; n_h=2 <= 0.4 s (Python TPTT: 7.2 s/3.2 GB, 23.9 s/7.2 GB)\n");
        return 0;
    }
    printf("one layer fwd+bwd, H=%lld, d=%lld, n_h=%d, chunk %d (softmax up to T=%lld), best of %d, load average "
           "%.2f\n",
           (long long)H, (long long)d, order, chunk, (long long)smax, reps, loadavg());
    printf("%8s | %10s %9s %10s %9s | %10s %9s %10s %9s | %-7s %s\n", "T", "LiZA s", "GFLOP/s", "+MiB", "cpu s",
           "softmax s", "GFLOP/s", "+MiB", "cpu s", "faster", "(cpu)");
    double t4k = 0, t32k = 0;
    int64_t crossover = 0, crossover_cpu = 0;
    for (int64_t T = tmin; T <= tmax; T *= 2) {
        double ml, gl, cl, tl = run_liza(T, H, d, order, chunk, reps, &ml, &gl, &cl);
        if (T == 4096) t4k = tl;
        if (T == 32768) t32k = tl;
        printf("%8lld | %10.3f %9.1f %10.0f %9.3f |", (long long)T, tl, gl / tl, ml, cl);
        if (T <= smax) {
            double ms, gs, cs, ts = run_softmax(T, H, d, reps, &ms, &gs, &cs);
            printf(" %10.3f %9.1f %10.0f %9.3f | %-7s %s\n", ts, gs / ts, ms, cs, tl < ts ? "LiZA" : "softmax",
                   cl < cs ? "LiZA" : "softmax");
            if (tl < ts && !crossover) crossover = T;
            if (cl < cs && !crossover_cpu) crossover_cpu = T;
        } else {
            printf(" %10s %9s %10s %9s |\n", "-", "-", "-", "-");
        }
        fflush(stdout);
    }
    if (t4k > 0 && t32k > 0) printf("linear scaling: time(32k)/time(4k) = %.2f (8 would be exactly linear; <= 9 required)\n", t32k / t4k);
    if (crossover) printf("crossover: LiZA-only is faster from T = %lld on (first power of two measured)\n", (long long)crossover);
    if (crossover_cpu)
        printf("crossover by CPU time (cpu s: CPU seconds per thread, the wall time on cores nobody else uses): "
               "T = %lld\n", (long long)crossover_cpu);
    return 0;
}
