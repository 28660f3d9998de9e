/* svd.c - ScaLAPACK SVD, randomized SVD, PiSSA and LoRA products (svd.h). */
#include "linalg/svd.h"

#include <cblas.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- ScaLAPACK / BLACS prototypes (Fortran symbols; hidden string lengths last) */
void Cblacs_pinfo(int *mypnum, int *nprocs);
void Cblacs_get(int icontxt, int what, int *val);
void Cblacs_gridinit(int *icontxt, const char *order, int nprow, int npcol);
void Cblacs_gridinfo(int icontxt, int *nprow, int *npcol, int *myrow, int *mycol);
void Cblacs_gridexit(int icontxt);
int numroc_(const int *n, const int *nb, const int *iproc, const int *isrcproc, const int *nprocs);
void descinit_(int *desc, const int *m, const int *n, const int *mb, const int *nb, const int *irsrc,
               const int *icsrc, const int *ictxt, const int *lld, int *info);
void pdgesvd_(const char *jobu, const char *jobvt, const int *m, const int *n, double *a, const int *ia,
              const int *ja, const int *desca, double *s, double *u, const int *iu, const int *ju, const int *descu,
              double *vt, const int *ivt, const int *jvt, const int *descvt, double *work, const int *lwork,
              int *info, size_t ljobu, size_t ljobvt);
void pdgeqrf_(const int *m, const int *n, double *a, const int *ia, const int *ja, const int *desca, double *tau,
              double *work, const int *lwork, int *info);
void pdorgqr_(const int *m, const int *n, const int *k, double *a, const int *ia, const int *ja, const int *desca,
              const double *tau, double *work, const int *lwork, int *info);
void pdgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k, const double *alpha,
             const double *a, const int *ia, const int *ja, const int *desca, const double *b, const int *ib,
             const int *jb, const int *descb, const double *beta, double *c, const int *ic, const int *jc,
             const int *descc, size_t lta, size_t ltb);
void pdsyevr_(const char *jobz, const char *range, const char *uplo, const int *n, double *a, const int *ia,
              const int *ja, const int *desca, const double *vl, const double *vu, const int *il, const int *iu,
              int *m, int *nz, double *w, double *z, const int *iz, const int *jz, const int *descz, double *work,
              const int *lwork, int *iwork, const int *liwork, int *info, size_t ljobz, size_t lrange,
              size_t luplo);

struct tp_la {
    int ctxt;
    int nprocs, nprow, npcol, myrow, mycol, block;
};

void tp_la_grid_shape(int nprocs, int *nprow, int *npcol) {
    int c = 1;
    for (int d = 1; (long)d * d <= nprocs; d++)
        if (nprocs % d == 0) c = d;
    *npcol = c;
    *nprow = nprocs / c;
}

int tp_la_create(int block, tp_la **out, tp_err *err) {
    *out = NULL;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) return tp_fail(err, TP_EINVAL, "linalg: MPI is not initialised (call tp_dist_init first)");
    if (block < 0 || block > 4096) return tp_fail(err, TP_EINVAL, "linalg: block size %d not in 1..4096", block);
    tp_la *la = tp_calloc(1, sizeof *la, err);
    int ok = la != NULL, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_ok) {
        free(la);
        return ok ? tp_fail(err, TP_ENOMEM, "linalg: out of memory on another rank") : TP_ENOMEM;
    }
    la->block = block ? block : 64;
    int me;
    Cblacs_pinfo(&me, &la->nprocs);
    tp_la_grid_shape(la->nprocs, &la->nprow, &la->npcol);
    Cblacs_get(-1, 0, &la->ctxt);
    Cblacs_gridinit(&la->ctxt, "Row", la->nprow, la->npcol);
    int pr, pc;
    Cblacs_gridinfo(la->ctxt, &pr, &pc, &la->myrow, &la->mycol);
    if (pr != la->nprow || pc != la->npcol || la->myrow < 0) {
        int r = la->nprow, c = la->npcol;
        free(la);
        return tp_fail(err, TP_EIO, "linalg: BLACS did not create the %dx%d process grid", r, c);
    }
    *out = la;
    return TP_OK;
}

void tp_la_destroy(tp_la *la) {
    if (!la) return;
    Cblacs_gridexit(la->ctxt);
    free(la);
}

void tp_la_info(const tp_la *la, int *nprocs, int *nprow, int *npcol, int *block) {
    if (nprocs) *nprocs = la->nprocs;
    if (nprow) *nprow = la->nprow;
    if (npcol) *npcol = la->npcol;
    if (block) *block = la->block;
}

/* ---- collective agreement ------------------------------------------------ */

/* Every rank learns whether any rank failed; a rank that did not fail gets
 * TP_ENOMEM/EIO with a message saying another rank failed. */
static int agree(int rc, tp_err *err) {
    int bad = rc != TP_OK, any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (!any) return TP_OK;
    if (rc != TP_OK) return rc;
    return tp_fail(err, TP_ENOMEM, "linalg: another rank failed (out of memory)");
}

/* ---- distributed matrices ------------------------------------------------ */

typedef struct dmat {
    int m, n, mloc, nloc, lld;
    int desc[9];
    double *a; /* column-major local part [lld x nloc] */
} dmat;

static void dmat_free(dmat *d) {
    free(d->a);
    d->a = NULL;
}

/* Allocate (zeroed); never collective itself: callers agree() afterwards. */
static int dmat_alloc(const tp_la *la, int m, int n, dmat *d, tp_err *err) {
    memset(d, 0, sizeof *d);
    int zero = 0, info = 0, nb = la->block;
    d->m = m;
    d->n = n;
    d->mloc = numroc_(&m, &nb, &la->myrow, &zero, &la->nprow);
    d->nloc = numroc_(&n, &nb, &la->mycol, &zero, &la->npcol);
    d->lld = d->mloc > 1 ? d->mloc : 1;
    descinit_(d->desc, &m, &n, &nb, &nb, &zero, &zero, &la->ctxt, &d->lld, &info);
    if (info != 0) return tp_fail(err, TP_EINVAL, "linalg: descinit of a %dx%d matrix failed (info %d)", m, n, info);
    size_t cnt = (size_t)d->lld * (size_t)(d->nloc > 0 ? d->nloc : 1);
    d->a = tp_calloc(cnt, sizeof(double), err);
    return d->a ? TP_OK : TP_ENOMEM;
}

static inline int64_t l2g(int64_t l, int nb, int p, int np) { return (l / nb) * (int64_t)np * nb + (int64_t)p * nb + l % nb; }

static inline double src_at(const tp_la_src *s, int64_t i, int64_t j) {
    size_t k = (size_t)(i * s->ld + j);
    if (s->f64) return ((const double *)s->data)[k];
    switch (s->dtype) {
    case TP_F32: return ((const float *)s->data)[k];
    case TP_BF16: return tp_bf16_to_f32(((const uint16_t *)s->data)[k]);
    case TP_F16: return tp_f16_to_f32(((const uint16_t *)s->data)[k]);
    }
    return NAN;
}

/* Fill d with the source (transposed: d(i, j) = src(j, i)) times alpha; returns
 * the smallest global linear index (row-major in the source) of a non-finite
 * element, or INT64_MAX. */
static int64_t dmat_fill(const tp_la *la, dmat *d, const tp_la_src *s, int trans, double alpha) {
    int64_t bad = INT64_MAX;
    for (int lj = 0; lj < d->nloc; lj++) {
        int64_t j = l2g(lj, la->block, la->mycol, la->npcol);
        double *col = d->a + (size_t)lj * d->lld;
        for (int li = 0; li < d->mloc; li++) {
            int64_t i = l2g(li, la->block, la->myrow, la->nprow);
            double v = trans ? src_at(s, j, i) : src_at(s, i, j);
            if (!isfinite(v)) {
                int64_t lin = trans ? j * s->ld + i : i * s->ld + j;
                if (lin < bad) bad = lin;
            }
            col[li] = alpha * v;
        }
    }
    return bad;
}

/* Elements (i, j) with i < rlim, j < clim of d into out: out[i*ld + j], or
 * out[j*ld + i] when trans; every rank gets the whole result. out must hold
 * the index range; it is zeroed here. */
static void dmat_gather(const tp_la *la, const dmat *d, int64_t rlim, int64_t clim, double *out, int64_t ld,
                        int trans) {
    size_t cnt = trans ? (size_t)((clim - 1) * ld + rlim) : (size_t)((rlim - 1) * ld + clim);
    if (rlim <= 0 || clim <= 0) return;
    memset(out, 0, cnt * sizeof *out);
    for (int lj = 0; lj < d->nloc; lj++) {
        int64_t j = l2g(lj, la->block, la->mycol, la->npcol);
        if (j >= clim) continue;
        for (int li = 0; li < d->mloc; li++) {
            int64_t i = l2g(li, la->block, la->myrow, la->nprow);
            if (i >= rlim) continue;
            out[trans ? j * ld + i : i * ld + j] = d->a[(size_t)lj * d->lld + li];
        }
    }
    if (la->nprocs > 1) {
        /* chunks below INT_MAX elements */
        for (size_t off = 0; off < cnt; off += (size_t)1 << 28) {
            size_t c = cnt - off < ((size_t)1 << 28) ? cnt - off : (size_t)1 << 28;
            MPI_Allreduce(MPI_IN_PLACE, out + off, (int)c, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        }
    }
}

static int gemm(const char *ta, const char *tb, int m, int n, int k, double alpha, const dmat *A, const dmat *B,
                double beta, dmat *C) {
    int one = 1;
    pdgemm_(ta, tb, &m, &n, &k, &alpha, A->a, &one, &one, A->desc, B->a, &one, &one, B->desc, &beta, C->a, &one,
            &one, C->desc, 1, 1);
    return TP_OK;
}

/* Replace d (m x n, m >= n) by the Q of its QR factorisation; r_out (may be
 * NULL) receives R [n x n] row-major on every rank. */
static int orth(const tp_la *la, dmat *d, double *r_out, const char *what, tp_err *err) {
    int one = 1, info = 0, lwork = -1, m = d->m, n = d->n;
    double wq = 0, *tau = tp_malloc(sizeof(double) * (size_t)(d->nloc + 1), err);
    int rc = agree(tau ? TP_OK : TP_ENOMEM, err);
    if (rc) { free(tau); return rc; }
    pdgeqrf_(&m, &n, d->a, &one, &one, d->desc, tau, &wq, &lwork, &info);
    lwork = (int)wq + 1;
    double w2 = 0;
    int lw2 = -1;
    pdorgqr_(&m, &n, &n, d->a, &one, &one, d->desc, tau, &w2, &lw2, &info);
    if ((int)w2 + 1 > lwork) lwork = (int)w2 + 1;
    double *work = tp_malloc(sizeof(double) * (size_t)lwork, err);
    rc = agree(work ? TP_OK : TP_ENOMEM, err);
    if (rc) { free(tau); free(work); return rc; }
    pdgeqrf_(&m, &n, d->a, &one, &one, d->desc, tau, work, &lwork, &info);
    if (info != 0) rc = tp_fail(err, TP_EUNSUP, "linalg: %s: pdgeqrf failed (info %d)", what, info);
    if (rc == TP_OK && r_out) {
        dmat_gather(la, d, n, n, r_out, n, 0);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < i; j++) r_out[(size_t)i * n + j] = 0;
    }
    if (rc == TP_OK) {
        pdorgqr_(&m, &n, &n, d->a, &one, &one, d->desc, tau, work, &lwork, &info);
        if (info != 0) rc = tp_fail(err, TP_EUNSUP, "linalg: %s: pdorgqr failed (info %d)", what, info);
    }
    free(work);
    free(tau);
    return rc;
}

/* Exact SVD of the tall d (m >= n; destroyed): s [n]; U (m x n) and VT (n x n)
 * allocated into u, vt. */
static int gesvd(const tp_la *la, dmat *d, double *s, dmat *u, dmat *vt, const char *what, tp_err *err) {
    int one = 1, info = 0, lwork = -1, m = d->m, n = d->n;
    int rc = dmat_alloc(la, m, n, u, err);
    if (rc == TP_OK) rc = dmat_alloc(la, n, n, vt, err);
    rc = agree(rc, err);
    if (rc) return rc;
    double wq = 0;
    pdgesvd_("V", "V", &m, &n, d->a, &one, &one, d->desc, s, u->a, &one, &one, u->desc, vt->a, &one, &one,
             vt->desc, &wq, &lwork, &info, 1, 1);
    lwork = (int)(wq * 1.01) + 64;
    double *work = tp_malloc(sizeof(double) * (size_t)lwork, err);
    rc = agree(work ? TP_OK : TP_ENOMEM, err);
    if (rc) { free(work); return rc; }
    pdgesvd_("V", "V", &m, &n, d->a, &one, &one, d->desc, s, u->a, &one, &one, u->desc, vt->a, &one, &one,
             vt->desc, work, &lwork, &info, 1, 1);
    free(work);
    if (info < 0) return tp_fail(err, TP_EINVAL, "linalg: %s: pdgesvd rejected argument %d", what, -info);
    if (info == n + 1)
        return tp_fail(err, TP_EUNSUP, "linalg: %s: pdgesvd: the ranks computed different singular values "
                       "(heterogeneous arithmetic across the %d ranks)", what, la->nprocs);
    if (info > 0)
        return tp_fail(err, TP_EUNSUP, "linalg: %s: pdgesvd did not converge (%d superdiagonals of the "
                       "bidiagonal form did not reach zero)", what, info);
    /* the same answer on every rank, whatever the grid did */
    if (la->nprocs > 1) MPI_Bcast(s, n, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    return TP_OK;
}

/* Exact top-k SVD of the tall d (m >= n; kept) through its Gram matrix, for
 * few components (PiSSA's r): G = dᵀd (n x n), its k largest eigenpairs by
 * pdsyevr (RANGE 'I': only those eigenvectors are computed), then the
 * Rayleigh-Ritz step Y = d Z_k (m x k) = U_y S_y W_yᵀ (pdgesvd of a k-column
 * matrix), u = U_y, v = Z_k W_y (n x k, components as columns).
 * Why it is exact enough: the singular values come from d Z_k, not from
 * the squared eigenvalues, so their absolute error is O(eps·σ_1) as with
 * pdgesvd (only the subspace comes from G: its angle to the true top-k
 * subspace is O(eps·σ_1²/(σ_k² − σ_{k+1}²)), and enters the values only
 * squared). Cost: 2mn² + O(n³) for the tridiagonal form, against pdgesvd's
 * full bidiagonalisation and n x n vector accumulation (13x slower at
 * 2048 x 2048 on one rank: bench/README.md, bench_pissa). */
static int topk_gram(const tp_la *la, const dmat *d, int k, double *s, dmat *u, dmat *v, const char *what,
                     tp_err *err) {
    /* at least one block of eigenpairs: with fewer, PDSYEVR (ScaLAPACK 2.2)
     * hands PDORMTR less work space than it needs ("parameter 16 had an
     * illegal value"): its share is max(18n, np·mz + 2nb²) and PDORMTR asks
     * (np + mz)·nb + nb², which that covers once mz >= nb */
    int one = 1, n = d->n, m = d->m, info = 0, mz = k > la->block ? k : la->block;
    if (mz > n) mz = n;
    int il = n - mz + 1, iu = n, found = 0, nz = 0, jtop = mz - k + 1; /* Z(:, jtop..mz): the top k, ascending */
    double vl = 0, vu = 0, wq = 0, *w = NULL, *work = NULL, alpha = 1, beta = 0;
    int iwq = 0, lwork = -1, liwork = -1, *iwork = NULL;
    dmat G = {0}, Z = {0}, Y = {0}, Uy = {0}, Wyt = {0};
    int rc = dmat_alloc(la, n, n, &G, err);
    if (rc == TP_OK) rc = dmat_alloc(la, n, n, &Z, err);
    if (rc == TP_OK) rc = dmat_alloc(la, m, k, &Y, err);
    if (rc == TP_OK && !(w = tp_malloc(sizeof(double) * (size_t)n, err))) rc = TP_ENOMEM;
    if ((rc = agree(rc, err))) goto out;
    gemm("T", "N", n, n, m, 1.0, d, d, 0.0, &G);
    pdsyevr_("V", "I", "L", &n, G.a, &one, &one, G.desc, &vl, &vu, &il, &iu, &found, &nz, w, Z.a, &one, &one,
             Z.desc, &wq, &lwork, &iwq, &liwork, &info, 1, 1, 1);
    lwork = (int)(wq * 1.01) + 64;
    liwork = iwq + 64;
    work = tp_malloc(sizeof(double) * (size_t)lwork, err);
    iwork = work ? tp_malloc(sizeof(int) * (size_t)liwork, err) : NULL;
    if ((rc = agree(work && iwork ? TP_OK : TP_ENOMEM, err))) goto out;
    pdsyevr_("V", "I", "L", &n, G.a, &one, &one, G.desc, &vl, &vu, &il, &iu, &found, &nz, w, Z.a, &one, &one,
             Z.desc, work, &lwork, iwork, &liwork, &info, 1, 1, 1);
    if (info < 0) { rc = tp_fail(err, TP_EINVAL, "linalg: %s: pdsyevr rejected argument %d", what, -info); goto out; }
    if (info > 0 || found != mz || nz != mz) {
        rc = tp_fail(err, TP_EUNSUP, "linalg: %s: pdsyevr found %d of the %d largest eigenpairs of the Gram "
                     "matrix (info %d)", what, nz, mz, info);
        goto out;
    }
    /* Y = d Z(:, jtop..mz) */
    pdgemm_("N", "N", &m, &k, &n, &alpha, d->a, &one, &one, d->desc, Z.a, &one, &jtop, Z.desc, &beta, Y.a, &one,
            &one, Y.desc, 1, 1);
    if ((rc = gesvd(la, &Y, s, &Uy, &Wyt, what, err))) goto out;
    if ((rc = agree(dmat_alloc(la, n, k, v, err), err))) goto out;
    /* v = Z(:, jtop..mz) Wytᵀ */
    pdgemm_("N", "T", &n, &k, &k, &alpha, Z.a, &one, &jtop, Z.desc, Wyt.a, &one, &one, Wyt.desc, &beta, v->a, &one,
            &one, v->desc, 1, 1);
    *u = Uy;
    Uy = (dmat){0};
out:
    dmat_free(&G);
    dmat_free(&Z);
    dmat_free(&Y);
    dmat_free(&Uy);
    dmat_free(&Wyt);
    free(w);
    free(work);
    free(iwork);
    return rc;
}

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* N(0, 1) for element (i, j) of the test matrix: a function of (seed, i, j) only. */
static double gauss_at(uint64_t seed, int64_t i, int64_t j) {
    uint64_t x = seed ^ ((uint64_t)i * 0xd1342543de82ef95ull) ^ ((uint64_t)j * 0x2545f4914f6cdd1dull);
    double u1 = ((double)(splitmix(&x) >> 11) + 0.5) * 0x1.0p-53, u2 = (double)(splitmix(&x) >> 11) * 0x1.0p-53;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Make the largest-|.| entry of each u column positive (u [m x k] ld ku_ld
 * row-major, vt [k x n] row-major). */
static void fix_signs(double *u, int64_t m, int64_t k, double *vt, int64_t n) {
    for (int64_t j = 0; j < k; j++) {
        int64_t best = 0;
        double bv = -1;
        for (int64_t i = 0; i < m; i++)
            if (fabs(u[i * k + j]) > bv) { bv = fabs(u[i * k + j]); best = i; }
        if (u[best * k + j] < 0) {
            for (int64_t i = 0; i < m; i++) u[i * k + j] = -u[i * k + j];
            if (vt)
                for (int64_t c = 0; c < n; c++) vt[j * n + c] = -vt[j * n + c];
        }
    }
}

static const char *nm(const tp_la_src *a) { return a->name ? a->name : "matrix"; }

int tp_la_svd(tp_la *la, const tp_la_src *a, const tp_la_svd_opts *o, double *s, double *u, double *vt,
              tp_err *err) {
    int64_t m = a->m, n = a->n, kmin = m < n ? m : n;
    if (m < 1 || n < 1 || a->ld < n || !a->data)
        return tp_fail(err, TP_EINVAL, "linalg: %s: shape [%lld, %lld] with row stride %lld is not a matrix",
                       nm(a), (long long)m, (long long)n, (long long)a->ld);
    if (m > INT32_MAX / 2 || n > INT32_MAX / 2)
        return tp_fail(err, TP_EINVAL, "linalg: %s: [%lld, %lld] is too large for ScaLAPACK's 32-bit indices",
                       nm(a), (long long)m, (long long)n);
    int64_t k = o->ncomp ? o->ncomp : kmin;
    if (k < 1 || k > kmin)
        return tp_fail(err, TP_EINVAL, "linalg: %s: %lld components asked of a [%lld, %lld] matrix (at most "
                       "min(rows, columns) = %lld)", nm(a), (long long)k, (long long)m, (long long)n,
                       (long long)kmin);
    if (o->oversample < 0) return tp_fail(err, TP_EINVAL, "linalg: %s: oversample %d < 0", nm(a), o->oversample);
    int trans = m < n;
    int M = (int)(trans ? n : m), N = (int)(trans ? m : n); /* the tall working matrix X */
    dmat X, U = {0}, VT = {0}, Q = {0}, Z = {0}, Bt = {0};
    double *sx = NULL;
    int right_is_vt = 1, nc = (int)k;
    int rc = dmat_alloc(la, M, N, &X, err);
    if (rc == TP_OK && !(sx = tp_malloc(sizeof(double) * (size_t)N, err))) rc = TP_ENOMEM;
    rc = agree(rc, err);
    if (rc) goto out;
    int64_t bad = dmat_fill(la, &X, a, trans, 1.0);
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
    if (bad != INT64_MAX) {
        rc = tp_fail(err, TP_EINVAL, "linalg: %s: element [%lld, %lld] is not finite", nm(a),
                     (long long)(bad / a->ld), (long long)(bad % a->ld));
        goto out;
    }
    dmat *left = NULL, *right = NULL;
    if (o->niter < 0 && 4 * k <= N) { /* a few components: exact through the Gram matrix */
        rc = topk_gram(la, &X, nc, sx, &U, &VT, nm(a), err);
        if (rc) goto out;
        right_is_vt = 0; /* VT holds V (N x k): components are columns */
        left = &U;
        right = &VT;
    } else if (o->niter < 0) {
        rc = gesvd(la, &X, sx, &U, &VT, nm(a), err);
        if (rc) goto out;
        left = &U;
        right = &VT;
    } else {
        int q = (int)(k + o->oversample < N ? k + o->oversample : N);
        /* Y = X Ω (Ω: N x q Gaussian); orth; K times: Z = orth(Xᵀ Q), Q = orth(X Z) */
        dmat Om;
        rc = dmat_alloc(la, N, q, &Om, err);
        if (rc == TP_OK) rc = dmat_alloc(la, M, q, &Q, err);
        if (rc == TP_OK) rc = dmat_alloc(la, N, q, &Z, err);
        rc = agree(rc, err);
        if (rc) { dmat_free(&Om); goto out; }
        for (int lj = 0; lj < Om.nloc; lj++)
            for (int li = 0; li < Om.mloc; li++)
                Om.a[(size_t)lj * Om.lld + li] = gauss_at(o->seed, l2g(li, la->block, la->myrow, la->nprow),
                                                          l2g(lj, la->block, la->mycol, la->npcol));
        gemm("N", "N", M, q, N, 1.0, &X, &Om, 0.0, &Q);
        dmat_free(&Om);
        rc = orth(la, &Q, NULL, nm(a), err);
        for (int it = 0; rc == TP_OK && it < o->niter; it++) {
            gemm("T", "N", N, q, M, 1.0, &X, &Q, 0.0, &Z);
            rc = orth(la, &Z, NULL, nm(a), err);
            if (rc == TP_OK) gemm("N", "N", M, q, N, 1.0, &X, &Z, 0.0, &Q);
            if (rc == TP_OK) rc = orth(la, &Q, NULL, nm(a), err);
        }
        if (rc) goto out;
        /* Bᵀ = Xᵀ Q (N x q, tall) = Ub Sb Vbᵀ, so X ≈ Q Bᵀᵀ = (Q Vb) Sb Ubᵀ */
        rc = agree(dmat_alloc(la, N, q, &Bt, err), err);
        if (rc) goto out;
        gemm("T", "N", N, q, M, 1.0, &X, &Q, 0.0, &Bt);
        dmat Ub, Vbt;
        rc = gesvd(la, &Bt, sx, &Ub, &Vbt, nm(a), err);
        if (rc) { dmat_free(&Ub); dmat_free(&Vbt); goto out; }
        rc = agree(dmat_alloc(la, M, q, &U, err), err);
        if (rc == TP_OK) gemm("N", "T", M, q, q, 1.0, &Q, &Vbt, 0.0, &U);
        dmat_free(&Vbt);
        VT = Ub; /* holds V (N x q): components are columns */
        right_is_vt = 0;
        if (rc) goto out;
        left = &U;
        right = &VT;
    }
    if (s) memcpy(s, sx, sizeof(double) * (size_t)nc);
    /* outputs for a (m x n): not transposed a = X: u = Ux, vt = Vxᵀ; transposed a = Xᵀ: u = Vx, vt = Uxᵀ */
    double *uu = u, *vv = vt;
    int own_u = 0, own_v = 0;
    if (!uu) {
        uu = tp_malloc(sizeof(double) * (size_t)(m * k), err);
        own_u = 1;
    }
    if (!vv) {
        vv = tp_malloc(sizeof(double) * (size_t)(k * n), err);
        own_v = 1;
    }
    rc = agree(uu && vv ? TP_OK : TP_ENOMEM, err);
    if (rc == TP_OK) {
        if (!trans) {
            dmat_gather(la, left, M, nc, uu, nc, 0);
            if (right_is_vt) dmat_gather(la, right, nc, N, vv, n, 0);
            else dmat_gather(la, right, N, nc, vv, n, 1);
        } else {
            if (right_is_vt) dmat_gather(la, right, nc, N, uu, nc, 1);
            else dmat_gather(la, right, N, nc, uu, nc, 0);
            dmat_gather(la, left, M, nc, vv, n, 1);
        }
        fix_signs(uu, m, k, vv, n);
    }
    if (own_u) free(uu);
    if (own_v) free(vv);
out:
    dmat_free(&X);
    dmat_free(&U);
    dmat_free(&VT);
    dmat_free(&Q);
    dmat_free(&Z);
    dmat_free(&Bt);
    free(sx);
    return rc;
}

/* ---- PiSSA ------------------------------------------------------------------ */

int tp_pissa_init(tp_la *la, const tp_la_src *w, const tp_pissa_opts *o, float *A, float *B, float *w_res,
                  double *sv, tp_err *err) {
    int64_t out = w->m, in = w->n, kmin = out < in ? out : in;
    if (o->r < 1 || o->r > kmin)
        return tp_fail(err, TP_EINVAL, "pissa: %s: rank r = %d must be in 1..min(out, in) = %lld for a "
                       "[%lld, %lld] weight", nm(w), o->r, (long long)kmin, (long long)out, (long long)in);
    if (!(o->scale > 0) || !isfinite(o->scale))
        return tp_fail(err, TP_EINVAL, "pissa: %s: LoRA scale %g must be a positive number", nm(w), o->scale);
    int r = o->r;
    double *s = tp_malloc(sizeof(double) * (size_t)r, err);
    double *u = tp_malloc(sizeof(double) * (size_t)(out * r), err);
    double *vt = tp_malloc(sizeof(double) * (size_t)(r * in), err);
    int rc = agree(s && u && vt ? TP_OK : TP_ENOMEM, err);
    if (rc == TP_OK) {
        tp_la_svd_opts so = {.ncomp = r, .niter = o->niter, .oversample = o->oversample, .seed = o->seed};
        rc = tp_la_svd(la, w, &so, s, u, vt, err);
    }
    if (rc == TP_OK) {
        for (int j = 0; j < r; j++) {
            double f = sqrt((s[j] > 0 ? s[j] : 0) / o->scale);
            for (int64_t c = 0; c < in; c++) A[(size_t)j * in + c] = (float)(f * vt[(size_t)j * in + c]);
            for (int64_t i = 0; i < out; i++) B[(size_t)i * r + j] = (float)(u[(size_t)i * r + j] * f);
        }
        if (sv) memcpy(sv, s, sizeof(double) * (size_t)r);
    }
    free(u);
    free(vt);
    free(s);
    if (rc != TP_OK || !w_res) return rc;
    /* W_res = W - s·B·A from the fp32 factors, in double, rows in blocks */
    double *Ad = tp_malloc(sizeof(double) * (size_t)(r * in), err);
    int64_t rows = 256;
    double *Bd = tp_malloc(sizeof(double) * (size_t)(rows * r), err);
    double *P = tp_malloc(sizeof(double) * (size_t)(rows * in), err);
    if (!Ad || !Bd || !P) rc = TP_ENOMEM;
    for (int64_t i = 0; rc == TP_OK && i < (int64_t)r * in; i++) Ad[i] = A[i];
    for (int64_t i0 = 0; rc == TP_OK && i0 < out; i0 += rows) {
        int64_t nr = out - i0 < rows ? out - i0 : rows;
        for (int64_t i = 0; i < nr * r; i++) Bd[i] = B[(size_t)(i0 * r + i)];
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nr, (int)in, r, o->scale, Bd, r, Ad, (int)in,
                    0.0, P, (int)in);
        for (int64_t i = 0; i < nr; i++)
            for (int64_t j = 0; j < in; j++)
                w_res[(size_t)((i0 + i) * in + j)] = (float)(src_at(w, i0 + i, j) - P[(size_t)(i * in + j)]);
    }
    free(Ad);
    free(Bd);
    free(P);
    return rc;
}

/* ---- LoRA products ------------------------------------------------------------- */

int tp_lora_svd(tp_la *la, const float *A, const float *B, int64_t r, int64_t in, int64_t out, double scale,
                double *s_out, double *u, double *vt, const char *name, tp_err *err) {
    const char *what = name ? name : "adapter";
    if (r < 1 || in < 1 || out < 1)
        return tp_fail(err, TP_EINVAL, "linalg: %s: LoRA shapes A [%lld, %lld], B [%lld, %lld] are empty", what,
                       (long long)r, (long long)in, (long long)out, (long long)r);
    if (!isfinite(scale)) return tp_fail(err, TP_EINVAL, "linalg: %s: LoRA scale is not finite", what);
    int64_t k = r < in ? r : in;
    if (out < k) k = out;
    int rc;
    if (r > in || r > out) {
        /* form ΔW (only for ranks above min(in, out), where QR of the factors is not thin) */
        double *dw = tp_malloc(sizeof(double) * (size_t)(out * in), err);
        double *ad = tp_malloc(sizeof(double) * (size_t)(r * in), err), *bd = tp_malloc(sizeof(double) * (size_t)(out * r), err);
        rc = agree(dw && ad && bd ? TP_OK : TP_ENOMEM, err);
        if (rc == TP_OK) {
            for (int64_t i = 0; i < r * in; i++) ad[i] = A[i];
            for (int64_t i = 0; i < out * r; i++) bd[i] = B[i];
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)out, (int)in, (int)r, scale, bd, (int)r, ad,
                        (int)in, 0.0, dw, (int)in);
            tp_la_src src = {.data = dw, .f64 = 1, .m = out, .n = in, .ld = in, .name = what};
            tp_la_svd_opts so = {.ncomp = k, .niter = -1};
            rc = tp_la_svd(la, &src, &so, s_out, u, vt, err);
        }
        free(dw);
        free(ad);
        free(bd);
        return rc;
    }
    int R = (int)r;
    dmat Qb = {0}, Qa = {0};
    double *rb = tp_malloc(sizeof(double) * (size_t)(r * r), err), *ra = tp_malloc(sizeof(double) * (size_t)(r * r), err);
    double *core = tp_malloc(sizeof(double) * (size_t)(r * r), err);
    double *uc = tp_malloc(sizeof(double) * (size_t)(r * r), err), *vct = tp_malloc(sizeof(double) * (size_t)(r * r), err);
    double *qb = tp_malloc(sizeof(double) * (size_t)(out * r), err), *qa = tp_malloc(sizeof(double) * (size_t)(in * r), err);
    rc = rb && ra && core && uc && vct && qb && qa ? TP_OK : TP_ENOMEM;
    if (rc == TP_OK) rc = dmat_alloc(la, (int)out, R, &Qb, err);
    if (rc == TP_OK) rc = dmat_alloc(la, (int)in, R, &Qa, err);
    rc = agree(rc, err);
    int64_t bad = INT64_MAX;
    if (rc == TP_OK) {
        tp_la_src bs = {.data = B, .dtype = TP_F32, .m = out, .n = r, .ld = r};
        tp_la_src as = {.data = A, .dtype = TP_F32, .m = r, .n = in, .ld = in};
        int64_t b1 = dmat_fill(la, &Qb, &bs, 0, 1.0), b2 = dmat_fill(la, &Qa, &as, 1, 1.0);
        int64_t both[2] = {b1, b2};
        MPI_Allreduce(MPI_IN_PLACE, both, 2, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
        if (both[0] != INT64_MAX) {
            bad = both[0];
            rc = tp_fail(err, TP_EINVAL, "linalg: %s: lora_B element [%lld, %lld] is not finite", what,
                         (long long)(bad / r), (long long)(bad % r));
        } else if (both[1] != INT64_MAX) {
            bad = both[1];
            rc = tp_fail(err, TP_EINVAL, "linalg: %s: lora_A element [%lld, %lld] is not finite", what,
                         (long long)(bad / in), (long long)(bad % in));
        }
    }
    if (rc == TP_OK) rc = orth(la, &Qb, rb, what, err);
    if (rc == TP_OK) rc = orth(la, &Qa, ra, what, err);
    if (rc == TP_OK) {
        /* core = s · R_b R_aᵀ */
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, R, R, scale, rb, R, ra, R, 0.0, core, R);
        tp_la_src cs = {.data = core, .f64 = 1, .m = r, .n = r, .ld = r, .name = what};
        tp_la_svd_opts so = {.ncomp = r, .niter = -1};
        double *sc = tp_malloc(sizeof(double) * (size_t)r, err);
        rc = agree(sc ? TP_OK : TP_ENOMEM, err);
        if (rc == TP_OK) rc = tp_la_svd(la, &cs, &so, sc, uc, vct, err);
        if (rc == TP_OK && s_out) memcpy(s_out, sc, sizeof(double) * (size_t)k);
        free(sc);
    }
    if (rc == TP_OK) {
        dmat_gather(la, &Qb, out, R, qb, R, 0);
        dmat_gather(la, &Qa, in, R, qa, R, 0);
        /* U = Q_b U_c [out x r]; Vᵀ = V_cᵀ Q_aᵀ [r x in] */
        if (u) cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)out, R, R, 1.0, qb, R, uc, R, 0.0, u, R);
        if (vt) cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, (int)in, R, 1.0, vct, R, qa, R, 0.0, vt, (int)in);
        if (u && vt) fix_signs(u, out, r, vt, in);
    }
    dmat_free(&Qb);
    dmat_free(&Qa);
    free(rb);
    free(ra);
    free(core);
    free(uc);
    free(vct);
    free(qb);
    free(qa);
    return rc;
}

int tp_lora_truncate(tp_la *la, const float *A, const float *B, int64_t r, int64_t in, int64_t out, double scale,
                     int64_t R, double scale_new, float *A2, float *B2, double *energy, double *sv,
                     const char *name, tp_err *err) {
    const char *what = name ? name : "adapter";
    int64_t kmin = in < out ? in : out;
    if (R < 1 || R > kmin)
        return tp_fail(err, TP_EINVAL, "resize: %s: rank %lld must be in 1..min(in, out) = %lld for a [%lld, %lld] "
                       "weight", what, (long long)R, (long long)kmin, (long long)out, (long long)in);
    if (!(scale_new > 0) || !isfinite(scale_new))
        return tp_fail(err, TP_EINVAL, "resize: %s: new LoRA scale %g must be a positive number", what, scale_new);
    int64_t k = r < kmin ? r : kmin;
    /* when r > min(in, out) tp_lora_svd returns k = min(in, out) components (u [out, k], vt [k, in]) */
    double *s = tp_malloc(sizeof(double) * (size_t)k, err);
    double *u = tp_malloc(sizeof(double) * (size_t)(out * (r > k ? r : k)), err);
    double *vt = tp_malloc(sizeof(double) * (size_t)((r > k ? r : k) * in), err);
    int rc = agree(s && u && vt ? TP_OK : TP_ENOMEM, err);
    if (rc == TP_OK) rc = tp_lora_svd(la, A, B, r, in, out, scale, s, u, vt, name, err);
    if (rc == TP_OK) {
        int64_t keep = R < k ? R : k;
        double tot = 0, kept = 0;
        for (int64_t j = 0; j < k; j++) {
            tot += s[j] * s[j];
            if (j < keep) kept += s[j] * s[j];
        }
        if (energy) *energy = tot > 0 ? kept / tot : 1.0;
        if (sv) memcpy(sv, s, sizeof(double) * (size_t)k);
        int64_t ku = (r > in || r > out) ? k : r; /* row stride of u as tp_lora_svd wrote it */
        memset(A2, 0, sizeof(float) * (size_t)(R * in));
        memset(B2, 0, sizeof(float) * (size_t)(out * R));
        for (int64_t j = 0; j < keep; j++) {
            double f = sqrt(s[j] / scale_new);
            for (int64_t c = 0; c < in; c++) A2[j * in + c] = (float)(f * vt[j * in + c]);
            for (int64_t i = 0; i < out; i++) B2[i * R + j] = (float)(u[i * ku + j] * f);
        }
    }
    free(s);
    free(u);
    free(vt);
    return rc;
}
