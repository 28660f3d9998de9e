/* bench_allreduce.c - the gradient allreduce of data-parallel training,
 * measured the way the trainer issues it (src/dist/dist.c: fp32 MPI_SUM,
 * in place, buckets of dist.bucket_mb), for the scaling model in
 * docs/scaling.md.
 *
 *   mpirun -n 2 bench_allreduce [--max-mb 64] [--iters 20] [--grad-mb 27]
 *
 * Prints, per message size, the median and best time of a blocking
 * MPI_Allreduce and the bus bandwidth 2(p-1)/p * bytes / time (what a ring moves per
 * rank), then a least-squares fit t = a + b * bytes over the sizes >= 64 KiB
 * (a: latency, 1/b: bandwidth). Last, the overlap the trainer gets: a
 * gradient of --grad-mb split into buckets, each MPI_Iallreduce launched
 * and then polled with MPI_Test between slices of compute (sgemm-free
 * floating-point work, one slice per layer as the backward hook does), versus
 * the same compute alone and the same allreduces alone. The hidden share
 * is (compute + allreduce - overlapped) / allreduce. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Busy floating-point work of about `sec` seconds (calibrated), standing in
 * for one layer's backward between two polls of the pending allreduces. */
static volatile double sink;
static double work(long n) {
    double a = 1.0, b = 1.0000001;
    for (long i = 0; i < n; i++) a = a * b + 1e-12;
    sink = a;
    return a;
}

/* median and best of `iters` blocking allreduces (slowest rank each time):
 * on a shared machine the best is the transport, the median adds the load */
static double median_allreduce(float *buf, int n, int iters, double *best) {
    double *t = malloc(sizeof(double) * (size_t)iters);
    for (int it = 0; it < iters; it++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double dt = MPI_Wtime() - t0, mx;
        MPI_Allreduce(&dt, &mx, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        t[it] = mx;
    }
    qsort(t, (size_t)iters, sizeof(double), cmp_double);
    double m = t[iters / 2];
    *best = t[0];
    free(t);
    return m;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, p;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &p);
    double max_mb = 64, grad_mb = 27, bucket_mb = 25;
    int iters = 20, layers = 32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--max-mb") && i + 1 < argc) max_mb = atof(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--grad-mb") && i + 1 < argc) grad_mb = atof(argv[++i]);
        else if (!strcmp(argv[i], "--bucket-mb") && i + 1 < argc) bucket_mb = atof(argv[++i]);
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else {
            if (!rank)
                fprintf(stderr, "usage: bench_allreduce [--max-mb 64] [--iters 20] [--grad-mb 27] "
                                "[--bucket-mb 25] [--layers 32]\n");
            MPI_Finalize();
            return 2;
        }
    }
    if (iters < 3) iters = 3;
    if (layers < 1) layers = 1;
    size_t maxn = (size_t)(max_mb * 1048576.0 / 4), gn = (size_t)(grad_mb * 1048576.0 / 4);
    if (gn > maxn) maxn = gn;
    float *buf = calloc(maxn ? maxn : 1, sizeof(float));
    if (!buf) MPI_Abort(MPI_COMM_WORLD, 1);
    if (!rank) {
        printf("ranks %d (MPI_Allreduce, fp32 MPI_SUM in place, median of %d)\n", p, iters);
        printf("%12s %12s %12s %12s %12s\n", "bytes", "median us", "busbw GB/s", "best us", "busbw GB/s");
    }
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    int nfit = 0;
    for (size_t n = 256; n <= maxn; n *= 4) {
        double best, t = median_allreduce(buf, (int)n, iters, &best);
        double bytes = (double)n * 4, f = p > 1 ? 2.0 * (p - 1) / p * bytes / 1e9 : 0;
        if (!rank) printf("%12.0f %12.1f %12.2f %12.1f %12.2f\n", bytes, t * 1e6, f / t, best * 1e6, f / best);
        t = best;
        if (bytes >= 65536) {
            sx += bytes; sy += t; sxx += bytes * bytes; sxy += bytes * t; nfit++;
        }
    }
    if (!rank && nfit >= 2) {
        double b = (nfit * sxy - sx * sy) / (nfit * sxx - sx * sx), a = (sy - b * sx) / nfit;
        printf("fit t = a + bytes/B over sizes >= 64 KiB: a = %.1f us, B = %.2f GB/s (per rank, algorithmic)\n",
               a * 1e6, 1.0 / b / 1e9);
    }

    /* overlap as the trainer does it: buckets launched as layers finish,
     * polled between layers, waited for at the end */
    size_t bn = (size_t)(bucket_mb * 1048576.0 / 4);
    if (bn < 1) bn = 1;
    int nb = (int)((gn + bn - 1) / bn);
    if (nb < 1) nb = 1;
    MPI_Request *req = malloc(sizeof(MPI_Request) * (size_t)nb);
    /* calibrate the compute: one layer's slice ~ allreduce-alone / layers * 2,
     * so compute alone is about twice the allreduce time */
    double t_ar = 1e30;
    for (int it = 0; it < 5; it++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int b = 0; b < nb; b++) {
            size_t off = (size_t)b * bn, n = off + bn > gn ? gn - off : bn;
            MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        }
        double dt = MPI_Wtime() - t0;
        if (dt < t_ar) t_ar = dt;
    }
    long per_layer = 1000;
    for (;;) {
        double t0 = MPI_Wtime();
        work(per_layer);
        double dt = MPI_Wtime() - t0;
        if (dt * layers > 2.0 * t_ar || per_layer > (1L << 34)) break;
        per_layer *= 2;
    }
    MPI_Bcast(&per_layer, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    double t_cmp = 1e30, t_ov = 1e30;
    for (int it = 0; it < 5; it++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int l = 0; l < layers; l++) work(per_layer);
        MPI_Barrier(MPI_COMM_WORLD);
        double dt = MPI_Wtime() - t0;
        if (dt < t_cmp) t_cmp = dt;
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = MPI_Wtime();
        int launched = 0;
        for (int l = 0; l < layers; l++) {
            work(per_layer);
            /* buckets become ready evenly over the backward */
            int ready = (int)((long)nb * (l + 1) / layers);
            for (; launched < ready; launched++) {
                size_t off = (size_t)launched * bn, n = off + bn > gn ? gn - off : bn;
                MPI_Iallreduce(MPI_IN_PLACE, buf + off, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &req[launched]);
            }
            for (int b = 0; b < launched; b++) {
                int done;
                if (req[b] != MPI_REQUEST_NULL) MPI_Test(&req[b], &done, MPI_STATUS_IGNORE);
            }
        }
        for (int b = 0; b < launched; b++) MPI_Wait(&req[b], MPI_STATUS_IGNORE);
        MPI_Barrier(MPI_COMM_WORLD);
        dt = MPI_Wtime() - t0;
        if (dt < t_ov) t_ov = dt;
    }
    if (!rank) {
        double hidden = t_ar > 0 ? (t_cmp + t_ar - t_ov) / t_ar : 0;
        printf("gradient %.1f MB in %d bucket(s) of %.1f MB, %d layers: allreduce alone %.2f ms, compute alone "
               "%.2f ms, both (Iallreduce + MPI_Test per layer) %.2f ms: %.0f%% of the allreduce hidden\n",
               grad_mb, nb, bucket_mb, layers, t_ar * 1e3, t_cmp * 1e3, t_ov * 1e3, 100.0 * hidden);
    }
    free(req);
    free(buf);
    MPI_Finalize();
    return 0;
}
