/* bench_pissa.c - wall time of PiSSA initialisation (tp_pissa_init, the
 * trainer's lora.init: pissa / pissa_niter_K path: ScaLAPACK over every rank
 * of the job) on a Llama-3.2-1B-shaped model, and the same run's serial
 * LAPACK reference.
 *
 *   [mpirun -np N] bench_pissa [--layers 16] [--full-layers 16] [--hidden 2048] [--heads 32] [--kv-heads 8]
 *                              [--head-dim 64] [--ffn 8192] [--mlp] [--r 8] [--alpha 16]
 *                              [--niter -1,4|none] [--block 64] [--ref] [--seed 1]
 *
 * Weights: BF16 (as the real model is stored), Gaussian with std 0.02, a
 * function of (seed, layer, module) only, so every rank holds the same
 * matrix, as the mmapped base gives every rank the same weights. Targets
 * q_proj [H·d, D], k_proj and v_proj [Hkv·d, D], o_proj [D, H·d] (and with
 * --mlp gate_proj/up_proj [F, D], down_proj [D, F]), in the trainer's order
 * (layer by layer). Each --niter value (-1 = exact pdgesvd, K >= 0 =
 * randomized with K power iterations) is timed over all layers: the
 * MPI_Barrier'ed wall time of each tp_pissa_init, summed per module kind,
 * plus the total. Generating the weights is not timed. With --layers below
 * --full-layers (the model's depth) the total is also extrapolated to it.
 *
 * --ref: rank 0 then times serial LAPACK in double on one matrix of each
 * distinct shape, on the OpenMP threads it has: dgesvd (JOBU = JOBVT = 'S',
 * the QR-iteration SVD that pdgesvd parallelises) and dgesdd (divide and
 * conquer, what numpy.linalg.svd and torch.linalg.svd call), times the
 * number of matrices of that shape in --layers layers.
 *
 * bench/bench_pissa.sh runs the variants of bench/README.md (1 rank x 2
 * threads, 2 ranks x 1 thread). */
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "linalg/svd.h"
#include "util/dtype.h"
#include "util/platform.h"
#include "util/rng.h"

void dgesvd_(const char *jobu, const char *jobvt, const int *m, const int *n, double *a, const int *lda, double *s,
             double *u, const int *ldu, double *vt, const int *ldvt, double *work, const int *lwork, int *info,
             size_t, size_t);
void dgesdd_(const char *jobz, const int *m, const int *n, double *a, const int *lda, double *s, double *u,
             const int *ldu, double *vt, const int *ldvt, double *work, const int *lwork, int *iwork, int *info,
             size_t);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double cpu_now(void) { /* this process's CPU time, all threads */
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct mod {
    const char *name;
    int64_t out, in;
} mod;

/* BF16 Gaussian weights of one (layer, module): the same on every rank */
static void fill(uint16_t *w, int64_t n, uint64_t seed, int layer, int m) {
    tp_rng g;
    tp_rng_seed(&g, seed, (uint64_t)layer * 16 + (uint64_t)m);
    for (int64_t i = 0; i < n; i++) w[i] = tp_f32_to_bf16((float)(0.02 * tp_rng_normal(&g)));
}

/* seconds of one serial LAPACK SVD (thin U, Vᵀ) of the m x n matrix w */
static double lapack_svd(const uint16_t *w, int m, int n, int dd) {
    /* column-major a = w (row-major [m, n]) read as its transpose's data: the
     * SVD of wᵀ [n, m]; the same cost and singular values */
    int M = n, N = m, k = M < N ? M : N, lwork = -1, info = 0;
    double *a = malloc(sizeof(double) * (size_t)M * N), *s = malloc(sizeof(double) * k);
    double *u = malloc(sizeof(double) * (size_t)M * k), *vt = malloc(sizeof(double) * (size_t)k * N), wq = 0;
    int *iw = malloc(sizeof(int) * 8 * (size_t)k);
    for (int64_t i = 0; i < (int64_t)M * N; i++) a[i] = tp_bf16_to_f32(w[i]);
    if (dd) dgesdd_("S", &M, &N, a, &M, s, u, &M, vt, &k, &wq, &lwork, iw, &info, 1);
    else dgesvd_("S", "S", &M, &N, a, &M, s, u, &M, vt, &k, &wq, &lwork, &info, 1, 1);
    lwork = (int)wq + 1;
    double *work = malloc(sizeof(double) * (size_t)lwork);
    double t0 = now();
    if (dd) dgesdd_("S", &M, &N, a, &M, s, u, &M, vt, &k, work, &lwork, iw, &info, 1);
    else dgesvd_("S", "S", &M, &N, a, &M, s, u, &M, vt, &k, work, &lwork, &info, 1, 1);
    double t = now() - t0;
    if (info) fprintf(stderr, "bench_pissa: %s info %d\n", dd ? "dgesdd" : "dgesvd", info);
    free(a);
    free(s);
    free(u);
    free(vt);
    free(iw);
    free(work);
    return t;
}

int main(int argc, char **argv) {
    tp_maybe_reexec_for_blas(argc, argv);
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    int layers = 16, full = 16, D = 2048, H = 32, Hkv = 8, d = 64, F = 8192, mlp = 0, r = 8, block = 64, ref = 0;
    double alpha = 16;
    uint64_t seed = 1;
    char niters[64] = "-1,4";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--mlp")) mlp = 1;
        else if (!strcmp(a, "--ref")) ref = 1;
        else if (v && !strcmp(a, "--layers")) layers = atoi(argv[++i]);
        else if (v && !strcmp(a, "--full-layers")) full = atoi(argv[++i]);
        else if (v && !strcmp(a, "--hidden")) D = atoi(argv[++i]);
        else if (v && !strcmp(a, "--heads")) H = atoi(argv[++i]);
        else if (v && !strcmp(a, "--kv-heads")) Hkv = atoi(argv[++i]);
        else if (v && !strcmp(a, "--head-dim")) d = atoi(argv[++i]);
        else if (v && !strcmp(a, "--ffn")) F = atoi(argv[++i]);
        else if (v && !strcmp(a, "--r")) r = atoi(argv[++i]);
        else if (v && !strcmp(a, "--alpha")) alpha = atof(argv[++i]);
        else if (v && !strcmp(a, "--block")) block = atoi(argv[++i]);
        else if (v && !strcmp(a, "--seed")) seed = strtoull(argv[++i], NULL, 10);
        else if (v && !strcmp(a, "--niter")) snprintf(niters, sizeof niters, "%s", argv[++i]);
        else {
            if (rank == 0) fprintf(stderr, "bench_pissa: unknown or incomplete argument '%s' (see the file's comment)\n", a);
            MPI_Finalize();
            return 2;
        }
    }
    if (layers < 1 || D < 1 || H < 1 || Hkv < 1 || d < 1 || r < 1) {
        if (rank == 0) fprintf(stderr, "bench_pissa: sizes must be positive\n");
        MPI_Finalize();
        return 2;
    }
    mod mods[7] = {{"q_proj", (int64_t)H * d, D}, {"k_proj", (int64_t)Hkv * d, D}, {"v_proj", (int64_t)Hkv * d, D},
                   {"o_proj", D, (int64_t)H * d}, {"gate_proj", F, D}, {"up_proj", F, D}, {"down_proj", D, F}};
    int nm = mlp ? 7 : 4;
    int64_t maxn = 0;
    for (int m = 0; m < nm; m++) maxn = mods[m].out * mods[m].in > maxn ? mods[m].out * mods[m].in : maxn;
    uint16_t *w = malloc(sizeof(uint16_t) * (size_t)maxn);
    float *A = malloc(sizeof(float) * (size_t)r * (size_t)(D > F ? D : F) * 2);
    float *B = malloc(sizeof(float) * (size_t)r * (size_t)(D > F ? D : F) * 2);
    tp_err err = {0};
    tp_la *la = NULL;
    if (!w || !A || !B || tp_la_create(block, &la, &err)) {
        fprintf(stderr, "bench_pissa: %s\n", err.msg[0] ? err.msg : "out of memory");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int nprocs, nprow, npcol, blk;
    tp_la_info(la, &nprocs, &nprow, &npcol, &blk);
    if (rank == 0) {
        char plat[512];
        tp_platform_describe(plat, sizeof plat);
        printf("platform: %s\n", plat);
        printf("model: %d layers, D %d, H %d, Hkv %d, d %d", layers, D, H, Hkv, d);
        if (mlp) printf(", F %d", F);
        printf("; targets");
        for (int m = 0; m < nm; m++) printf(" %s [%lld x %lld]", mods[m].name, (long long)mods[m].out, (long long)mods[m].in);
        printf("; r %d, BF16 weights\nranks %d (grid %d x %d, block %d) x %d OpenMP threads\n", r, world, nprow, npcol,
               blk, omp_get_max_threads());
    }
    for (char *tok = strtok(niters, ","); tok && strcmp(tok, "none"); tok = strtok(NULL, ",")) {
        int niter = atoi(tok);
        double per[7] = {0}, total = 0, c0 = cpu_now();
        for (int l = 0; l < layers; l++)
            for (int m = 0; m < nm; m++) {
                fill(w, mods[m].out * mods[m].in, seed, l, m);
                tp_la_src src = {w, 0, TP_BF16, mods[m].out, mods[m].in, mods[m].in, mods[m].name};
                tp_pissa_opts po = {.r = r, .scale = alpha / r, .niter = niter, .oversample = 0, .seed = seed};
                MPI_Barrier(MPI_COMM_WORLD);
                double t0 = now();
                int rc = tp_pissa_init(la, &src, &po, A, B, NULL, NULL, &err);
                MPI_Barrier(MPI_COMM_WORLD);
                double t = now() - t0;
                if (rc) {
                    if (rank == 0) fprintf(stderr, "bench_pissa: %s\n", err.msg);
                    MPI_Abort(MPI_COMM_WORLD, 1);
                }
                per[m] += t;
                total += t;
            }
        if (rank == 0) {
            char lab[48];
            if (niter < 0) snprintf(lab, sizeof lab, "pissa (exact)");
            else snprintf(lab, sizeof lab, "pissa_niter_%d", niter);
            printf("%-16s %9.3f s for %d layers (%.3f s per layer):", lab, total, layers, total / layers);
            for (int m = 0; m < nm; m++) printf(" %s %.3f", mods[m].name, per[m]);
            /* CPU time over wall time: how many cores rank 0 really had (a shared machine) */
            printf("; rank 0 CPU/wall %.2f\n", (cpu_now() - c0) / total);
            if (layers < full)
                printf("%-16s %9.1f s extrapolated to %d layers (the per-layer time x %d: every layer has the same "
                       "shapes)\n", "", total / layers * full, full, full);
            fflush(stdout);
        }
    }
    if (ref && rank == 0) {
        /* one matrix per distinct shape, times how many of that shape */
        for (int dd = 0; dd < 2; dd++) {
            double est = 0;
            printf("LAPACK %s (serial, double, thin U and Vt, %d threads):", dd ? "dgesdd" : "dgesvd",
                   omp_get_max_threads());
            for (int m = 0; m < nm; m++) {
                int seen = 0, count = 0;
                for (int k = 0; k < m; k++)
                    if (mods[k].out == mods[m].out && mods[k].in == mods[m].in) seen = 1;
                if (seen) continue;
                for (int k = 0; k < nm; k++)
                    if (mods[k].out == mods[m].out && mods[k].in == mods[m].in) count++;
                fill(w, mods[m].out * mods[m].in, seed, 0, m);
                double c0 = cpu_now(), t = lapack_svd(w, (int)mods[m].out, (int)mods[m].in, dd);
                printf(" [%lld x %lld] %.2f s (CPU/wall %.2f)", (long long)mods[m].out, (long long)mods[m].in, t,
                       (cpu_now() - c0) / t);
                est += t * count * layers;
            }
            printf("; x matrices in %d layers = %.1f s\n", layers, est);
            fflush(stdout);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    tp_la_destroy(la);
    free(w);
    free(A);
    free(B);
    MPI_Finalize();
    return 0;
}
