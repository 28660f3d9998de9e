/* test_svd.c - the ScaLAPACK layer (src/linalg/svd.h).
 *
 *   test_svd                 self-checks on this process's MPI world (ctest runs
 *                            it as a singleton), then again under
 *                            mpirun -np 2 and -np 4 (--selfcheck)
 *   test_svd --selfcheck     the self-checks only (run under mpirun)
 *   test_svd --batch FILE    one --tool command (without "--tool") per line
 *   test_svd --tool ...      helper for tests/test_linalg.py (numpy oracle):
 *     svd   IN OUT ncomp niter oversample seed block   -> s, u, vt
 *     pissa IN OUT r scale niter oversample seed block -> s, A, B, W_res
 *     lora  IN OUT r in out scale R scale_new block    -> energy, s, A2, B2
 *   IN: int64 m, int64 n, then m*n doubles (row-major); OUT: doubles
 *   (rank 0 writes). Self-checks compare with serial LAPACK dgesvd. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "linalg/svd.h"

void dgesvd_(const char *jobu, const char *jobvt, const int *m, const int *n, double *a, const int *lda, double *s,
             double *u, const int *ldu, double *vt, const int *ldvt, double *work, const int *lwork, int *info,
             size_t l1, size_t l2);

static int fails = 0, rank = 0, world = 1;

/* Fault injection: CMake links this test with -Wl,--wrap for pdgesvd_ and
 * pdsyevr_, so the calls svd.c makes land here first. With fake_*_info set,
 * the real routine runs and then reports that status, as ScaLAPACK does when
 * the QR iteration or the eigensolver fails (no finite input provokes it). */
static int fake_gesvd_info = 0, fake_syevr_info = 0;
#define PDGESVD_PARAMS                                                                                          \
    const char *jobu, const char *jobvt, const int *m, const int *n, double *a, const int *ia, const int *ja,  \
        const int *desca, double *s, double *u, const int *iu, const int *ju, const int *descu, double *vt,    \
        const int *ivt, const int *jvt, const int *descvt, double *work, const int *lwork, int *info, size_t l1, \
        size_t l2
#define PDSYEVR_PARAMS                                                                                          \
    const char *jobz, const char *range, const char *uplo, const int *n, double *a, const int *ia,            \
        const int *ja, const int *desca, const double *vl, const double *vu, const int *il, const int *iu,     \
        int *m, int *nz, double *w, double *z, const int *iz, const int *jz, const int *descz, double *work,   \
        const int *lwork, int *iwork, const int *liwork, int *info, size_t ljobz, size_t lrange, size_t luplo
void __real_pdgesvd_(PDGESVD_PARAMS);
void __real_pdsyevr_(PDSYEVR_PARAMS);
void __wrap_pdgesvd_(PDGESVD_PARAMS) {
    __real_pdgesvd_(jobu, jobvt, m, n, a, ia, ja, desca, s, u, iu, ju, descu, vt, ivt, jvt, descvt, work, lwork, info,
                    l1, l2);
    if (*lwork != -1 && fake_gesvd_info) *info = fake_gesvd_info;
}
void __wrap_pdsyevr_(PDSYEVR_PARAMS) {
    __real_pdsyevr_(jobz, range, uplo, n, a, ia, ja, desca, vl, vu, il, iu, m, nz, w, z, iz, jz, descz, work, lwork,
                    iwork, liwork, info, ljobz, lrange, luplo);
    if (*lwork != -1 && fake_syevr_info) *info = fake_syevr_info;
}

#define CHECK(c, ...)                                                                                          \
    do {                                                                                                       \
        if (!(c)) {                                                                                            \
            fprintf(stderr, "rank %d: FAIL %s:%d: ", rank, __FILE__, __LINE__);                                \
            fprintf(stderr, __VA_ARGS__);                                                                      \
            fprintf(stderr, "\n");                                                                             \
            fails++;                                                                                           \
        }                                                                                                      \
    } while (0)

static uint64_t rs = 88172645463325252ull;
static double urand(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (double)(rs >> 11) * 0x1.0p-53;
}
static double nrand(void) { return sqrt(-2 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand()); }

/* m x n with singular values sv[0..k) (k = min): Q1 diag Q2ᵀ, Q from Gram-Schmidt of Gaussians */
static void orthonormal_cols(double *q, int m, int k) { /* row-major m x k */
    for (int i = 0; i < m * k; i++) q[i] = nrand();
    for (int j = 0; j < k; j++) {
        for (int p = 0; p < j; p++) {
            double d = 0;
            for (int i = 0; i < m; i++) d += q[i * k + j] * q[i * k + p];
            for (int i = 0; i < m; i++) q[i * k + j] -= d * q[i * k + p];
        }
        double nn = 0;
        for (int i = 0; i < m; i++) nn += q[i * k + j] * q[i * k + j];
        nn = sqrt(nn);
        for (int i = 0; i < m; i++) q[i * k + j] /= nn;
    }
}
static void make_spectrum(double *a, int m, int n, const double *sv) {
    int k = m < n ? m : n;
    double *q1 = malloc(sizeof(double) * m * k), *q2 = malloc(sizeof(double) * n * k);
    orthonormal_cols(q1, m, k);
    orthonormal_cols(q2, n, k);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double v = 0;
            for (int p = 0; p < k; p++) v += q1[i * k + p] * sv[p] * q2[j * k + p];
            a[i * n + j] = v;
        }
    free(q1);
    free(q2);
}

static void lapack_sv(const double *a, int m, int n, double *s) {
    double *ac = malloc(sizeof(double) * m * n); /* column-major of a = row-major of aᵀ: sv equal */
    memcpy(ac, a, sizeof(double) * m * n);
    int M = n, N = m, lwork = -1, info = 0, one = 1;
    double wq;
    dgesvd_("N", "N", &M, &N, ac, &M, s, NULL, &one, NULL, &one, &wq, &lwork, &info, 1, 1);
    lwork = (int)wq + 1;
    double *w = malloc(sizeof(double) * lwork);
    dgesvd_("N", "N", &M, &N, ac, &M, s, NULL, &one, NULL, &one, w, &lwork, &info, 1, 1);
    free(w);
    free(ac);
}

/* ||a - u diag(s) vt||_F / ||a||_F, max |uᵀu - I|, |vt vtᵀ - I| */
static void check_factors(const char *what, const double *a, int m, int n, int k, const double *s, const double *u,
                          const double *vt, int full, double tol) {
    double num = 0, den = 0;
    if (full) {
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) {
                double v = 0;
                for (int p = 0; p < k; p++) v += u[i * k + p] * s[p] * vt[p * n + j];
                num += (a[i * n + j] - v) * (a[i * n + j] - v);
                den += a[i * n + j] * a[i * n + j];
            }
        CHECK(sqrt(num) <= tol * sqrt(den) + 1e-300, "%s: reconstruction error %g", what, sqrt(num / den));
    }
    double eo = 0;
    for (int p = 0; p < k; p++)
        for (int q = 0; q < k; q++) {
            double du = 0, dv = 0;
            for (int i = 0; i < m; i++) du += u[i * k + p] * u[i * k + q];
            for (int j = 0; j < n; j++) dv += vt[p * n + j] * vt[q * n + j];
            if (s[p] > 1e-12 * s[0] && s[q] > 1e-12 * s[0]) {
                eo = fmax(eo, fabs(du - (p == q)));
                eo = fmax(eo, fabs(dv - (p == q)));
            }
        }
    CHECK(eo < 1e-10, "%s: orthogonality error %g", what, eo);
    if (!full) { /* the k pairs are singular pairs of a: |a v_p - s_p u_p| and |aᵀ u_p - s_p v_p| small */
        double er = 0;
        for (int p = 0; p < k; p++) {
            double r1 = 0, r2 = 0;
            for (int i = 0; i < m; i++) {
                double v = -s[p] * u[i * k + p];
                for (int j = 0; j < n; j++) v += a[i * n + j] * vt[p * n + j];
                r1 += v * v;
            }
            for (int j = 0; j < n; j++) {
                double v = -s[p] * vt[p * n + j];
                for (int i = 0; i < m; i++) v += a[i * n + j] * u[i * k + p];
                r2 += v * v;
            }
            er = fmax(er, sqrt(fmax(r1, r2)) / s[0]);
        }
        CHECK(er < 1e-10, "%s: a top pair is not a singular pair: residual %g (relative to s0)", what, er);
    }
}

static void svd_case(tp_la *la, const char *what, int m, int n, const double *a, int ncomp) {
    int k = m < n ? m : n, nc = ncomp ? ncomp : k;
    double *s = calloc(nc, sizeof(double)), *u = calloc((size_t)m * nc, sizeof(double)),
           *vt = calloc((size_t)nc * n, sizeof(double)), *ref = calloc(k, sizeof(double));
    tp_err err = {0};
    tp_la_src src = {.data = a, .f64 = 1, .m = m, .n = n, .ld = n, .name = what};
    tp_la_svd_opts o = {.ncomp = ncomp, .niter = -1};
    int rc = tp_la_svd(la, &src, &o, s, u, vt, &err);
    CHECK(rc == TP_OK, "%s: %s", what, err.msg);
    if (rc == TP_OK) {
        lapack_sv(a, m, n, ref);
        double e = 0;
        for (int i = 0; i < nc; i++) e = fmax(e, fabs(s[i] - ref[i]) / ref[0]);
        CHECK(e < 1e-10, "%s: singular values differ from LAPACK by %g (relative to s0)", what, e);
        check_factors(what, a, m, n, nc, s, u, vt, nc == k, 1e-12);
    }
    free(s);
    free(u);
    free(vt);
    free(ref);
}

static int selfcheck(void) {
    int blocks[2] = {4, 64};
    for (int bi = 0; bi < 2; bi++) {
        tp_la *la;
        tp_err err = {0};
        if (tp_la_create(blocks[bi], &la, &err)) {
            fprintf(stderr, "create: %s\n", err.msg);
            return 1;
        }
        int shapes[][2] = {{40, 40}, {70, 23}, {23, 70}, {1, 9}, {9, 1}, {130, 65}};
        for (size_t t = 0; t < sizeof shapes / sizeof *shapes; t++) {
            int m = shapes[t][0], n = shapes[t][1];
            double *a = malloc(sizeof(double) * m * n);
            for (int i = 0; i < m * n; i++) a[i] = nrand();
            char name[64];
            snprintf(name, sizeof name, "random %dx%d block %d", m, n, blocks[bi]);
            svd_case(la, name, m, n, a, 0);
            int k = m < n ? m : n;
            if (k > 3) {
                snprintf(name, sizeof name, "random %dx%d top 3", m, n);
                svd_case(la, name, m, n, a, 3);
            }
            /* decaying spectrum and rank-deficient */
            double *sv = malloc(sizeof(double) * k);
            for (int i = 0; i < k; i++) sv[i] = exp(-0.2 * i);
            make_spectrum(a, m, n, sv);
            snprintf(name, sizeof name, "decaying %dx%d", m, n);
            svd_case(la, name, m, n, a, 0);
            /* a few components of a tall enough matrix take the Gram path (svd.c topk_gram) */
            if (k > 3) {
                snprintf(name, sizeof name, "decaying %dx%d top 3", m, n);
                svd_case(la, name, m, n, a, 3);
            }
            for (int i = 0; i < k; i++) sv[i] = i < k / 2 ? 1.0 + i : 0.0;
            if (k > 1) {
                make_spectrum(a, m, n, sv);
                snprintf(name, sizeof name, "rank-deficient %dx%d", m, n);
                svd_case(la, name, m, n, a, 0);
            }
            if (k >= 16) { /* rank 2, 4 components asked: two zero singular values */
                for (int i = 0; i < k; i++) sv[i] = i == 0 ? 3.0 : i == 1 ? 1.0 : 0.0;
                make_spectrum(a, m, n, sv);
                snprintf(name, sizeof name, "rank-2 %dx%d top 4", m, n);
                svd_case(la, name, m, n, a, 4);
            }
            free(sv);
            free(a);
        }
        /* PiSSA identity s·B·A + W_res = W (fp32) for an F32 and a BF16 source, exact and randomized */
        int m = 48, n = 36, r = 5;
        float *w = malloc(sizeof(float) * m * n), *A = malloc(sizeof(float) * r * n), *B = malloc(sizeof(float) * m * r),
              *res = malloc(sizeof(float) * m * n);
        for (int i = 0; i < m * n; i++) w[i] = (float)(nrand() * 0.02);
        for (int niter = -1; niter <= 2; niter += 3) {
            tp_la_src src = {.data = w, .dtype = TP_F32, .m = m, .n = n, .ld = n, .name = "w"};
            tp_pissa_opts po = {.r = r, .scale = 2.0, .niter = niter, .seed = 7};
            int rc = tp_pissa_init(la, &src, &po, A, B, res, NULL, &err);
            CHECK(rc == TP_OK, "pissa: %s", err.msg);
            double e = 0, wn = 0;
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) {
                    double v = res[i * n + j];
                    for (int p = 0; p < r; p++) v += 2.0 * (double)B[i * r + p] * A[p * n + j];
                    e = fmax(e, fabs(v - w[i * n + j]));
                    wn = fmax(wn, fabs(w[i * n + j]));
                }
            CHECK(e < 1e-6 * wn, "pissa niter %d: |s·B·A + W_res - W| = %g", niter, e);
        }
        /* bad input: rank too large, non-finite element, zero scale */
        tp_la_src src = {.data = w, .dtype = TP_F32, .m = m, .n = n, .ld = n, .name = "model.layers.0.q_proj.weight"};
        tp_pissa_opts po = {.r = 37, .scale = 1.0, .niter = -1};
        int rc = tp_pissa_init(la, &src, &po, A, B, NULL, NULL, &err);
        CHECK(rc == TP_EINVAL && strstr(err.msg, "min(out, in) = 36") && strstr(err.msg, "q_proj"), "rank 37: %s",
              err.msg);
        po.r = 3;
        po.scale = 0;
        rc = tp_pissa_init(la, &src, &po, A, B, NULL, NULL, &err);
        CHECK(rc == TP_EINVAL && strstr(err.msg, "scale"), "scale 0: %s", err.msg);
        po.scale = 1;
        w[5 * n + 7] = NAN;
        rc = tp_pissa_init(la, &src, &po, A, B, NULL, NULL, &err);
        CHECK(rc == TP_EINVAL && strstr(err.msg, "[5, 7] is not finite"), "nan: %s", err.msg);
        free(w);
        free(A);
        free(B);
        free(res);
        tp_la_destroy(la);
    }
    { /* ScaLAPACK's failure statuses become one clear, collective error naming the matrix */
        tp_la *la;
        tp_err err = {0};
        if (tp_la_create(4, &la, &err)) {
            fprintf(stderr, "create: %s\n", err.msg);
            return 1;
        }
        int m = 40, n = 36;
        double *a = malloc(sizeof(double) * m * n), *s = malloc(sizeof(double) * n);
        float *A = malloc(sizeof(float) * 3 * n), *B = malloc(sizeof(float) * m * 3);
        for (int i = 0; i < m * n; i++) a[i] = nrand();
        tp_la_src src = {.data = a, .f64 = 1, .m = m, .n = n, .ld = n, .name = "model.layers.3.o_proj.weight"};
        tp_la_svd_opts o = {.ncomp = 0, .niter = -1};
        fake_gesvd_info = 5;
        int rc = tp_la_svd(la, &src, &o, s, NULL, NULL, &err);
        CHECK(rc == TP_EUNSUP && strstr(err.msg, "o_proj") && strstr(err.msg, "pdgesvd did not converge (5 "),
              "non-converging pdgesvd: rc %d: %s", rc, err.msg);
        fake_gesvd_info = n + 1;
        rc = tp_la_svd(la, &src, &o, s, NULL, NULL, &err);
        CHECK(rc == TP_EUNSUP && strstr(err.msg, "computed different singular values"), "info n+1: rc %d: %s", rc,
              err.msg);
        fake_gesvd_info = 0;
        fake_syevr_info = 2; /* the Gram path (3 of 36 components) */
        tp_pissa_opts po = {.r = 3, .scale = 1.0, .niter = -1};
        rc = tp_pissa_init(la, &src, &po, A, B, NULL, NULL, &err);
        CHECK(rc == TP_EUNSUP && strstr(err.msg, "o_proj") && strstr(err.msg, "pdsyevr found"),
              "failing pdsyevr: rc %d: %s", rc, err.msg);
        fake_syevr_info = 0;
        rc = tp_pissa_init(la, &src, &po, A, B, NULL, NULL, &err);
        CHECK(rc == TP_OK, "after the injected failures: %s", err.msg);
        free(a);
        free(s);
        free(A);
        free(B);
        tp_la_destroy(la);
    }
    return fails != 0;
}

/* ---- tool mode ------------------------------------------------------------ */

static double *read_mat(const char *path, int64_t *m, int64_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    double *a = NULL;
    if (fread(m, 8, 1, f) == 1 && fread(n, 8, 1, f) == 1) {
        a = malloc(sizeof(double) * (size_t)(*m * *n + 1));
        if (fread(a, sizeof(double), (size_t)(*m * *n), f) != (size_t)(*m * *n)) {
            free(a);
            a = NULL;
        }
    }
    fclose(f);
    return a;
}

static void wr(FILE *f, const double *x, size_t n) { fwrite(x, sizeof(double), n, f); }
static void wrf(FILE *f, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double d = x[i];
        fwrite(&d, sizeof d, 1, f);
    }
}

static int tool(int argc, char **argv) {
    if (argc < 4) return 2;
    const char *mode = argv[1];
    int64_t m, n;
    double *a = read_mat(argv[2], &m, &n);
    if (!a) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 1;
    }
    tp_err err = {0};
    tp_la *la = NULL;
    int block = atoi(argv[argc - 1]), rc = tp_la_create(block, &la, &err);
    FILE *f = NULL;
    if (rc == TP_OK && !strcmp(mode, "svd") && argc == 9) {
        tp_la_svd_opts o = {.ncomp = atoll(argv[4]), .niter = atoi(argv[5]), .oversample = atoi(argv[6]),
                            .seed = strtoull(argv[7], NULL, 10)};
        int64_t k = o.ncomp ? o.ncomp : (m < n ? m : n);
        double *s = malloc(sizeof(double) * k), *u = malloc(sizeof(double) * m * k), *vt = malloc(sizeof(double) * k * n);
        tp_la_src src = {.data = a, .f64 = 1, .m = m, .n = n, .ld = n, .name = "input"};
        rc = tp_la_svd(la, &src, &o, s, u, vt, &err);
        if (rc == TP_OK && rank == 0 && (f = fopen(argv[3], "wb"))) {
            wr(f, s, k);
            wr(f, u, m * k);
            wr(f, vt, k * n);
        }
        free(s);
        free(u);
        free(vt);
    } else if (rc == TP_OK && !strcmp(mode, "pissa") && argc == 10) {
        int r = atoi(argv[4]);
        tp_pissa_opts o = {.r = r, .scale = atof(argv[5]), .niter = atoi(argv[6]), .oversample = atoi(argv[7]),
                           .seed = strtoull(argv[8], NULL, 10)};
        float *wf = malloc(sizeof(float) * m * n), *A = malloc(sizeof(float) * (r > 0 ? r : 1) * n),
              *B = malloc(sizeof(float) * m * (r > 0 ? r : 1)), *res = malloc(sizeof(float) * m * n);
        double *s = malloc(sizeof(double) * (r > 0 ? r : 1));
        for (int64_t i = 0; i < m * n; i++) wf[i] = (float)a[i];
        tp_la_src src = {.data = wf, .dtype = TP_F32, .m = m, .n = n, .ld = n, .name = "input"};
        rc = tp_pissa_init(la, &src, &o, A, B, res, s, &err);
        if (rc == TP_OK && rank == 0 && (f = fopen(argv[3], "wb"))) {
            wr(f, s, r);
            wrf(f, A, (size_t)r * n);
            wrf(f, B, (size_t)m * r);
            wrf(f, res, (size_t)m * n);
        }
        free(wf);
        free(A);
        free(B);
        free(res);
        free(s);
    } else if (rc == TP_OK && !strcmp(mode, "lora") && argc == 11) {
        /* IN holds A [r, in] then B [out, r] as one (r*in + out*r) x 1 matrix */
        int64_t r = atoll(argv[4]), in = atoll(argv[5]), out = atoll(argv[6]), R = atoll(argv[8]);
        double scale = atof(argv[7]), s2 = atof(argv[9]);
        float *A = malloc(sizeof(float) * r * in), *B = malloc(sizeof(float) * out * r);
        for (int64_t i = 0; i < r * in; i++) A[i] = (float)a[i];
        for (int64_t i = 0; i < out * r; i++) B[i] = (float)a[r * in + i];
        float *A2 = malloc(sizeof(float) * R * in), *B2 = malloc(sizeof(float) * out * R);
        int64_t k = r < in ? r : in;
        if (out < k) k = out;
        double energy = 0, *sv = malloc(sizeof(double) * k);
        rc = tp_lora_truncate(la, A, B, r, in, out, scale, R, s2, A2, B2, &energy, sv, "input", &err);
        if (rc == TP_OK && rank == 0 && (f = fopen(argv[3], "wb"))) {
            wr(f, &energy, 1);
            wr(f, sv, k);
            wrf(f, A2, R * in);
            wrf(f, B2, out * R);
        }
        free(A);
        free(B);
        free(A2);
        free(B2);
        free(sv);
    } else if (rc == TP_OK) {
        fprintf(stderr, "bad tool arguments\n");
        rc = 2;
    }
    if (f) fclose(f);
    if (rc != TP_OK && rank == 0) fprintf(stderr, "tool: %s\n", err.msg);
    tp_la_destroy(la);
    free(a);
    return rc == TP_OK ? 0 : (rc == 2 ? 2 : 1);
}

/* --batch FILE: one tool command per line (words separated by spaces), in
 * one MPI launch; exit status: the worst line's. */
static int batch(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return 1;
    char line[8192];
    int worst = 0;
    while (fgets(line, sizeof line, f)) {
        char *words[32];
        int n = 1;
        words[0] = "tool";
        for (char *t = strtok(line, " \n"); t && n < 32; t = strtok(NULL, " \n")) words[n++] = t;
        if (n < 2) continue;
        int rc = tool(n, words);
        if (rc > worst) worst = rc;
    }
    fclose(f);
    return worst;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    int rc;
    if (argc > 1 && !strcmp(argv[1], "--tool")) {
        rc = tool(argc - 1, argv + 1);
    } else if (argc > 2 && !strcmp(argv[1], "--batch")) {
        rc = batch(argv[2]);
    } else {
        rs += (uint64_t)0; /* same matrices on every rank: the seed does not depend on the rank */
        rc = selfcheck();
        int all = 0;
        MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        rc = all;
        if (rank == 0) printf("test_svd: %d ranks: %s\n", world, rc ? "FAILED" : "ok");
        fflush(stdout);
    }
    MPI_Finalize();
    if (rc == 0 && argc == 1 && world == 1) {
        /* the same checks on 2 and 4 ranks under a real mpirun */
        for (int np = 2; np <= 4 && rc == 0; np *= 2) {
            char cmd[4096];
            snprintf(cmd, sizeof cmd,
                     "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 mpirun "
                     "--oversubscribe --bind-to none -np %d '%s' --selfcheck",
                     np, argv[0]);
            int st = system(cmd);
            if (st != 0) {
                fprintf(stderr, "FAIL: %s exited with %d\n", cmd, st);
                rc = 1;
            }
        }
        if (rc == 0) printf("test_svd: all passed\n");
    }
    return rc;
}
