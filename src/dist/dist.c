#include "dist/dist.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int tp_dist_init(int *argc, char ***argv, tp_dist *d, tp_err *err) {
    int provided = 0;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return tp_fail(err, TP_EIO, "MPI_Init_thread failed");
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->world);
    if (gethostname(d->host, sizeof d->host) != 0) snprintf(d->host, sizeof d->host, "?");
    d->host[sizeof d->host - 1] = 0;
    return TP_OK;
}

void tp_dist_finalize(void) {
    int up = 0, down = 0;
    MPI_Initialized(&up);
    MPI_Finalized(&down);
    if (up && !down) MPI_Finalize();
}

void tp_dist_abort(const tp_dist *d, const char *msg, int code) {
    fprintf(stderr, "tptt: rank %d: %s\n", d ? d->rank : -1, msg);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    exit(code); /* not reached */
}

double tp_dist_sum_f64(double x) {
    double y = 0;
    MPI_Allreduce(&x, &y, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return y;
}

int64_t tp_dist_sum_i64(int64_t x) {
    long long a = (long long)x, y = 0;
    MPI_Allreduce(&a, &y, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
    return (int64_t)y;
}

int tp_dist_max_int(int x) {
    int y = 0;
    MPI_Allreduce(&x, &y, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return y;
}

void tp_dist_barrier(void) { MPI_Barrier(MPI_COMM_WORLD); }

int tp_dist_agree(const tp_dist *d, int rc, tp_err *err) {
    int any = d->world > 1 ? tp_dist_max_int(rc != TP_OK) : rc != TP_OK;
    if (!any || rc != TP_OK) return rc;
    err->code = TP_EIO;
    err->msg[0] = 0;
    return TP_EIO;
}

int tp_dist_report_failure(const tp_dist *d, int rc, const tp_err *err) {
    int has_msg = rc != TP_OK && err->msg[0];
    if (d->world == 1) {
        if (has_msg) fprintf(stderr, "tptt: %s\n", err->msg);
        return rc != TP_OK;
    }
    int first = d->world - tp_dist_max_int(has_msg ? d->world - d->rank : 0);
    if (!tp_dist_max_int(rc != TP_OK)) return 0;
    if (has_msg && d->rank == first) fprintf(stderr, "tptt: %s\n", err->msg);
    return 1;
}

void tp_dist_allgather(const void *send, size_t bytes, void *recv) {
    MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, MPI_COMM_WORLD);
}

int tp_dist_bcast_string(char **s, tp_err *err) {
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    long long n = rank == 0 && *s ? (long long)strlen(*s) + 1 : 0;
    MPI_Bcast(&n, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    if (rank != 0) {
        free(*s);
        *s = n ? malloc((size_t)n) : NULL;
        if (n && !*s) return tp_fail(err, TP_ENOMEM, "out of memory");
    }
    if (n) MPI_Bcast(*s, (int)n, MPI_CHAR, 0, MPI_COMM_WORLD);
    return TP_OK;
}

int tp_dist_gather_text(const tp_dist *d, const char *s, size_t n, char **all, size_t *lens, tp_err *err) {
    *all = NULL;
    if (n > (size_t)INT32_MAX) return tp_fail(err, TP_EINVAL, "gather: %zu bytes is too much for one rank", n);
    int mine = (int)n, *counts = NULL, *displs = NULL;
    if (d->rank == 0) {
        counts = calloc((size_t)d->world, sizeof *counts);
        displs = calloc((size_t)d->world, sizeof *displs);
    }
    int ok = d->rank != 0 || (counts && displs);
    MPI_Gather(&mine, 1, MPI_INT, counts, 1, MPI_INT, 0, MPI_COMM_WORLD);
    long long total = 0;
    if (d->rank == 0 && ok)
        for (int r = 0; r < d->world; r++) {
            displs[r] = (int)total;
            total += counts[r];
            lens[r] = (size_t)counts[r];
        }
    if (total > INT32_MAX) ok = 0;
    char *buf = d->rank == 0 && ok ? malloc((size_t)total + 1) : NULL;
    if (d->rank == 0 && !buf) ok = 0;
    /* every rank takes part in the Gatherv even when the root could not allocate */
    if (d->rank == 0 && !ok)
        for (int r = 0; counts && displs && r < d->world; r++) counts[r] = displs[r] = 0;
    MPI_Gatherv(s, mine, MPI_CHAR, buf, counts, displs, MPI_CHAR, 0, MPI_COMM_WORLD);
    free(counts);
    free(displs);
    if (d->rank == 0 && !ok) {
        free(buf);
        return tp_fail(err, TP_ENOMEM, "out of memory gathering %lld bytes of results", total);
    }
    if (buf) buf[total] = 0;
    *all = buf;
    return TP_OK;
}

/* ---- gradient buckets ---------------------------------------------------- */

typedef struct bucket {
    size_t off, n;  /* float range in grad */
    int ready_at;   /* lowest layer among its parameters: ready once that layer is done */
    int launched;
    MPI_Request req;
} bucket;

struct tp_grad_sync {
    tp_decoder *m;
    int world;
    bucket *b;
    size_t nb;
    int armed;
};

int tp_grad_sync_create(tp_decoder *m, double bucket_mb, int world, tp_grad_sync **out, tp_err *err) {
    *out = NULL;
    tp_grad_sync *g = tp_calloc(1, sizeof *g, err);
    if (!g) return TP_ENOMEM;
    g->m = m;
    g->world = world;
    size_t np = tp_decoder_nparams(m), cap = np ? np : 1;
    g->b = tp_calloc(cap, sizeof *g->b, err);
    if (!g->b) { free(g); return TP_ENOMEM; }
    size_t limit = (size_t)(bucket_mb * 1048576.0 / sizeof(float));
    if (limit < 1) limit = 1;
    for (size_t i = 0; i < np; i++) {
        const tp_param *p = tp_decoder_param(m, i);
        bucket *cur = g->nb ? &g->b[g->nb - 1] : NULL;
        /* parameters are 64-byte aligned in the buffer: a bucket spans the gaps too */
        size_t end = p->offset + p->numel;
        if (!cur || cur->n >= limit) {
            cur = &g->b[g->nb++];
            cur->off = p->offset;
            cur->ready_at = p->layer;
        }
        cur->n = end - cur->off;
        if (p->layer < cur->ready_at) cur->ready_at = p->layer;
    }
    *out = g;
    return TP_OK;
}

void tp_grad_sync_destroy(tp_grad_sync *g) {
    if (!g) return;
    free(g->b);
    free(g);
}

size_t tp_grad_sync_buckets(const tp_grad_sync *g) { return g->nb; }

static void launch(tp_grad_sync *g, bucket *b) {
    float *grad = tp_decoder_grad(g->m);
    MPI_Iallreduce(MPI_IN_PLACE, grad + b->off, (int)b->n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &b->req);
    b->launched = 1;
}

static void poll(tp_grad_sync *g) {
    for (size_t i = 0; i < g->nb; i++)
        if (g->b[i].launched && g->b[i].req != MPI_REQUEST_NULL) {
            int done = 0;
            MPI_Test(&g->b[i].req, &done, MPI_STATUS_IGNORE);
        }
}

static void on_layer(void *ctx, int layer) {
    tp_grad_sync *g = ctx;
    for (size_t i = 0; i < g->nb; i++)
        if (!g->b[i].launched && g->b[i].ready_at >= layer) launch(g, &g->b[i]);
    poll(g);
}

void tp_grad_sync_arm(tp_grad_sync *g) {
    for (size_t i = 0; i < g->nb; i++) {
        g->b[i].launched = 0;
        g->b[i].req = MPI_REQUEST_NULL;
    }
    g->armed = g->world > 1;
    if (g->armed) tp_decoder_set_grad_hook(g->m, on_layer, g);
}

int tp_grad_sync_finish(tp_grad_sync *g, tp_err *err) {
    if (!g->armed) return TP_OK;
    tp_decoder_set_grad_hook(g->m, NULL, NULL);
    int rc = TP_OK;
    for (size_t i = 0; i < g->nb; i++) {
        if (!g->b[i].launched) launch(g, &g->b[i]);
        if (MPI_Wait(&g->b[i].req, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            rc = tp_fail(err, TP_EIO, "gradient allreduce failed (bucket %zu)", i);
    }
    g->armed = 0;
    return rc;
}
