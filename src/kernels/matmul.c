#include "kernels/matmul.h"

#include <cblas.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdlib.h>
#include <string.h>

#define MM_CACHE 48

typedef struct mm_prim {
    int64_t m, k, n;
    int kind; /* 0: x·Wᵀ, 1: dy·W */
    int accumulate;
    dnnl_primitive_t prim;
    dnnl_memory_t src, wei, dst;
} mm_prim;

struct tp_matmul {
    tp_mm_backend backend;
    float *wbuf; /* fp32 copy of one weight matrix (f32 path) */
    size_t wcap;
    uint16_t *abuf; /* bf16 activations (bf16 path) */
    size_t acap;
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    mm_prim cache[MM_CACHE];
    int ncache;
};

const char *tp_mm_backend_name(tp_mm_backend b) { return b == TP_MM_BF16 ? "bf16" : "f32"; }
tp_mm_backend tp_matmul_backend(const tp_matmul *mm) { return mm->backend; }

int tp_matmul_create(tp_mm_backend backend, tp_matmul **out, tp_err *err) {
    *out = NULL;
    tp_matmul *mm = tp_calloc(1, sizeof *mm, err);
    if (!mm) return TP_ENOMEM;
    mm->backend = backend;
    if (backend == TP_MM_BF16) {
        if (dnnl_engine_create(&mm->engine, dnnl_cpu, 0) != dnnl_success ||
            dnnl_stream_create(&mm->stream, mm->engine, dnnl_stream_default_flags) != dnnl_success) {
            tp_matmul_destroy(mm);
            return tp_fail(err, TP_EUNSUP, "compute.matmul=bf16: cannot create a oneDNN CPU engine");
        }
    }
    *out = mm;
    return TP_OK;
}

void tp_matmul_destroy(tp_matmul *mm) {
    if (!mm) return;
    for (int i = 0; i < mm->ncache; i++) {
        dnnl_primitive_destroy(mm->cache[i].prim);
        dnnl_memory_destroy(mm->cache[i].src);
        dnnl_memory_destroy(mm->cache[i].wei);
        dnnl_memory_destroy(mm->cache[i].dst);
    }
    if (mm->stream) dnnl_stream_destroy(mm->stream);
    if (mm->engine) dnnl_engine_destroy(mm->engine);
    free(mm->wbuf);
    free(mm->abuf);
    free(mm);
}

void tp_sgemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
              const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { /* BLAS would leave C untouched for beta=1 only; be explicit */
        if (beta == 0.0f) for (int64_t i = 0; i < m; i++) memset(c + i * ldc, 0, (size_t)n * sizeof(float));
        else if (beta != 1.0f) for (int64_t i = 0; i < m; i++) for (int64_t j = 0; j < n; j++) c[i * ldc + j] *= beta;
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, (int)m,
                (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
}

static int grow(void **buf, size_t *cap, size_t bytes, tp_err *err) {
    if (*cap >= bytes) return TP_OK;
    void *p = realloc(*buf, bytes);
    if (!p) return tp_fail(err, TP_ENOMEM, "out of memory allocating %zu bytes of matmul scratch", bytes);
    *buf = p;
    *cap = bytes;
    return TP_OK;
}

/* fp32 view of w: the data itself, or a converted copy in mm->wbuf */
static const float *weight_f32(tp_matmul *mm, const tp_weight *w, tp_err *err) {
    if (w->dtype == TP_F32) return w->data;
    size_t n = (size_t)(w->rows * w->cols);
    if (grow((void **)&mm->wbuf, &mm->wcap, n * sizeof(float), err) != TP_OK) return NULL;
    const uint16_t *h = w->data;
    float *o = mm->wbuf;
    if (w->dtype == TP_BF16) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) o[i] = tp_bf16_to_f32(h[i]);
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) o[i] = tp_f16_to_f32(h[i]);
    }
    return o;
}

static int mk_md(dnnl_memory_desc_t *md, int64_t d0, int64_t d1, dnnl_data_type_t t, int64_t s0, int64_t s1) {
    dnnl_dims_t dims = {d0, d1}, strides = {s0, s1};
    return dnnl_memory_desc_init_by_strides(md, 2, dims, t, strides) == dnnl_success;
}

static mm_prim *get_prim(tp_matmul *mm, int kind, int64_t m, int64_t k, int64_t n, int accumulate, tp_err *err) {
    for (int i = 0; i < mm->ncache; i++) {
        mm_prim *p = &mm->cache[i];
        if (p->kind == kind && p->m == m && p->k == k && p->n == n && p->accumulate == accumulate) return p;
    }
    if (mm->ncache == MM_CACHE) { /* evict the oldest */
        dnnl_primitive_destroy(mm->cache[0].prim);
        dnnl_memory_destroy(mm->cache[0].src);
        dnnl_memory_destroy(mm->cache[0].wei);
        dnnl_memory_destroy(mm->cache[0].dst);
        memmove(mm->cache, mm->cache + 1, (MM_CACHE - 1) * sizeof *mm->cache);
        mm->ncache--;
    }
    mm_prim *p = &mm->cache[mm->ncache];
    memset(p, 0, sizeof *p);
    dnnl_memory_desc_t src, wei, dst;
    /* kind 0: weights logical [k=in, n=out] stored as W[out, in]: strides {1, k}
     * kind 1: weights logical [k=out, n=in] stored as W[out, in]: strides {n, 1} */
    int ok = mk_md(&src, m, k, dnnl_bf16, k, 1) && mk_md(&dst, m, n, dnnl_f32, n, 1) &&
             (kind == 0 ? mk_md(&wei, k, n, dnnl_bf16, 1, k) : mk_md(&wei, k, n, dnnl_bf16, n, 1));
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    ok = ok && dnnl_matmul_desc_init(&desc, &src, &wei, NULL, &dst) == dnnl_success;
    ok = ok && dnnl_primitive_attr_create(&attr) == dnnl_success;
    if (ok && accumulate) {
        ok = dnnl_post_ops_create(&po) == dnnl_success && dnnl_post_ops_append_sum(po, 1.0f) == dnnl_success &&
             dnnl_primitive_attr_set_post_ops(attr, po) == dnnl_success;
    }
    ok = ok && dnnl_primitive_desc_create(&pd, &desc, attr, mm->engine, NULL) == dnnl_success;
    ok = ok && dnnl_primitive_create(&p->prim, pd) == dnnl_success;
    ok = ok && dnnl_memory_create(&p->src, &src, mm->engine, DNNL_MEMORY_NONE) == dnnl_success;
    ok = ok && dnnl_memory_create(&p->wei, &wei, mm->engine, DNNL_MEMORY_NONE) == dnnl_success;
    ok = ok && dnnl_memory_create(&p->dst, &dst, mm->engine, DNNL_MEMORY_NONE) == dnnl_success;
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (!ok) {
        if (p->prim) dnnl_primitive_destroy(p->prim);
        if (p->src) dnnl_memory_destroy(p->src);
        if (p->wei) dnnl_memory_destroy(p->wei);
        if (p->dst) dnnl_memory_destroy(p->dst);
        tp_fail(err, TP_EUNSUP, "oneDNN: cannot create a bf16 matmul [%lld x %lld] x [%lld x %lld]", (long long)m,
                (long long)k, (long long)k, (long long)n);
        return NULL;
    }
    p->kind = kind;
    p->m = m;
    p->k = k;
    p->n = n;
    p->accumulate = accumulate;
    mm->ncache++;
    return p;
}

static int bf16_matmul(tp_matmul *mm, int kind, const float *a, int64_t m, int64_t k, int64_t n, const tp_weight *w,
                       float *c, int accumulate, tp_err *err) {
    size_t na = (size_t)(m * k);
    if (grow((void **)&mm->abuf, &mm->acap, na * sizeof(uint16_t), err) != TP_OK) return TP_ENOMEM;
    uint16_t *ab = mm->abuf;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < na; i++) ab[i] = tp_f32_to_bf16(a[i]);
    mm_prim *p = get_prim(mm, kind, m, k, n, accumulate, err);
    if (!p) return TP_EUNSUP;
    dnnl_memory_set_data_handle(p->src, ab);
    dnnl_memory_set_data_handle(p->wei, (void *)w->data); /* read only: oneDNN never writes weights */
    dnnl_memory_set_data_handle(p->dst, c);
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_WEIGHTS, p->wei}, {DNNL_ARG_DST, p->dst}};
    if (dnnl_primitive_execute(p->prim, mm->stream, 3, args) != dnnl_success || dnnl_stream_wait(mm->stream) != dnnl_success)
        return tp_fail(err, TP_EIO, "oneDNN: bf16 matmul execution failed");
    return TP_OK;
}

int tp_mm_xwt(tp_matmul *mm, const float *x, int64_t n, const tp_weight *w, float *y, int accumulate, tp_err *err) {
    if (n <= 0) return TP_OK;
    if (mm->backend == TP_MM_BF16 && w->dtype == TP_BF16)
        return bf16_matmul(mm, 0, x, n, w->cols, w->rows, w, y, accumulate, err);
    const float *wf = weight_f32(mm, w, err);
    if (!wf) return TP_ENOMEM;
    tp_sgemm(0, 1, n, w->rows, w->cols, 1.0f, x, w->cols, wf, w->cols, accumulate ? 1.0f : 0.0f, y, w->rows);
    return TP_OK;
}

int tp_mm_dyw(tp_matmul *mm, const float *dy, int64_t n, const tp_weight *w, float *dx, int accumulate,
              tp_err *err) {
    if (n <= 0) return TP_OK;
    if (mm->backend == TP_MM_BF16 && w->dtype == TP_BF16)
        return bf16_matmul(mm, 1, dy, n, w->rows, w->cols, w, dx, accumulate, err);
    const float *wf = weight_f32(mm, w, err);
    if (!wf) return TP_ENOMEM;
    tp_sgemm(0, 0, n, w->cols, w->rows, 1.0f, dy, w->rows, wf, w->cols, accumulate ? 1.0f : 0.0f, dx, w->cols);
    return TP_OK;
}
