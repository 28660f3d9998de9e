#include "kernels/matmul.h"

#include <cblas.h>
#include <cpuid.h>
#include <immintrin.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/platform.h"

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
    const void *wkey; /* the held weight wbuf holds converted (tp_mm_hold), or NULL */
    const void *held; /* the weight whose fp32 copy is kept between calls, or NULL */
    uint16_t *abuf; /* bf16 activations (bf16 path) */
    size_t acap;
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    mm_prim cache[MM_CACHE];
    int ncache;
};

const char *tp_mm_backend_name(tp_mm_backend b) { return b == TP_MM_BF16 ? "bf16" : "f32"; }
tp_mm_backend tp_matmul_backend(const tp_matmul *mm) { return mm->backend; }

/* Can oneDNN build a bf16 matmul here? oneDNN 2.6 has bf16 matmul kernels from
 * avx512_core up (emulated without AVX512_BF16, native with it) and none for
 * AVX2, where primitive creation fails; so ask oneDNN itself (once per
 * process, a 1x32x32 primitive) rather than guess from CPUID. A forced ISA
 * below AVX-512 (TPTT_ISA, tp_mm_force_isa) answers "no", as an AVX2 CPU would. */
static int bf16_supported(void) {
    static _Atomic int probed = -1;
    if (tp_mm_isa_current() < TP_ISA_AVX512) return 0;
    int ok = probed;
    if (ok >= 0) return ok;
    dnnl_engine_t eng = NULL;
    dnnl_memory_desc_t src, wei, dst;
    dnnl_dims_t ds = {1, 32}, dw = {32, 32}, dd = {1, 32};
    dnnl_matmul_desc_t desc;
    dnnl_primitive_desc_t pd = NULL;
    ok = dnnl_engine_create(&eng, dnnl_cpu, 0) == dnnl_success &&
         dnnl_memory_desc_init_by_tag(&src, 2, ds, dnnl_bf16, dnnl_ab) == dnnl_success &&
         dnnl_memory_desc_init_by_tag(&wei, 2, dw, dnnl_bf16, dnnl_ba) == dnnl_success &&
         dnnl_memory_desc_init_by_tag(&dst, 2, dd, dnnl_f32, dnnl_ab) == dnnl_success &&
         dnnl_matmul_desc_init(&desc, &src, &wei, NULL, &dst) == dnnl_success &&
         dnnl_primitive_desc_create(&pd, &desc, NULL, eng, NULL) == dnnl_success;
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (eng) dnnl_engine_destroy(eng);
    probed = ok;
    return ok;
}

static void bf16_notice(void) {
    static _Atomic int said = 0;
    if (!said++)
        fprintf(stderr, "tptt: notice: compute.matmul=bf16: oneDNN has no bf16 matmul on this CPU (no AVX512_BF16); "
                        "using f32 sgemm\n");
}

tp_mm_backend tp_mm_backend_effective(tp_mm_backend requested) {
    return requested == TP_MM_BF16 && !bf16_supported() ? TP_MM_F32 : requested;
}

int tp_matmul_create(tp_mm_backend backend, tp_matmul **out, tp_err *err) {
    *out = NULL;
    tp_matmul *mm = tp_calloc(1, sizeof *mm, err);
    if (!mm) return TP_ENOMEM;
    if (backend == TP_MM_BF16 && tp_mm_backend_effective(backend) != backend) {
        bf16_notice();
        backend = TP_MM_F32;
    }
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
    if (!*buf) tp_advise_huge(p, bytes);
    *buf = p;
    *cap = bytes;
    return TP_OK;
}

/* o[i] = tp_bf16_to_f32(h[i]) (the same bits: a 16-bit shift) with
 * non-temporal stores; o need not be aligned */
__attribute__((target("avx2"))) static void widen_bf16_stream(float *o, const uint16_t *h, size_t n) {
    size_t i = 0;
    for (; i < n && ((uintptr_t)(o + i) & 31); i++) o[i] = tp_bf16_to_f32(h[i]);
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(h + i)));
        _mm256_stream_si256((__m256i *)(void *)(o + i), _mm256_slli_epi32(v, 16));
    }
    for (; i < n; i++) o[i] = tp_bf16_to_f32(h[i]);
    _mm_sfence(); /* the streamed stores are visible before the barrier that ends the loop */
}

/* fp32 view of w: the data itself, or a converted copy in mm->wbuf */
static const float *weight_f32(tp_matmul *mm, const tp_weight *w, tp_err *err) {
    if (w->dtype == TP_F32) return w->data;
    if (mm->held == w->data && mm->wkey == w->data) return mm->wbuf;
    size_t n = (size_t)(w->rows * w->cols);
    mm->wkey = NULL;
    if (grow((void **)&mm->wbuf, &mm->wcap, n * sizeof(float), err) != TP_OK) return NULL;
    if (mm->held == w->data) mm->wkey = w->data;
    const uint16_t *h = w->data;
    float *o = mm->wbuf;
    if (w->dtype == TP_BF16) {
        /* Larger than a cache the copy cannot stay in anyway: store past it
         * (no read-for-ownership of o), 6 bytes of traffic per weight, not 10 */
        int stream = n * sizeof(float) >= ((size_t)16 << 20) && tp_mm_isa_current() >= TP_ISA_AVX2;
        size_t blk = 1 << 16, nb = (n + blk - 1) / blk;
#pragma omp parallel for schedule(static)
        for (size_t b = 0; b < nb; b++) {
            size_t i0 = b * blk, m = n - i0 < blk ? n - i0 : blk;
            if (stream) widen_bf16_stream(o + i0, h + i0, m);
            else for (size_t i = i0; i < i0 + m; i++) o[i] = tp_bf16_to_f32(h[i]);
        }
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

/* tp_f32_to_bf16 on 16 lanes: round to nearest even, NaN kept quiet; the
 * same bits as the scalar function (tests/test_matmul.c) */
__attribute__((target("avx512f,avx512bw"))) static void to_bf16_512(uint16_t *d, const float *s, size_t n) {
    const __m512i inf = _mm512_set1_epi32(0x7f800000), abs = _mm512_set1_epi32(0x7fffffff);
    const __m512i r7 = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), q = _mm512_set1_epi32(0x40);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512((const void *)(s + i));
        __m512i hi = _mm512_srli_epi32(u, 16);
        __m512i rnd = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(r7, _mm512_and_si512(hi, one))), 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
        __m512i o = _mm512_mask_mov_epi32(rnd, nan, _mm512_or_si512(hi, q));
        _mm256_storeu_si256((__m256i *)(void *)(d + i), _mm512_cvtepi32_epi16(o));
    }
    for (; i < n; i++) d[i] = tp_f32_to_bf16(s[i]);
}

/* activations to bf16 for oneDNN, in parallel (this was ~4% of a step as a
 * scalar loop) */
void tp_mm_to_bf16(uint16_t *d, const float *s, size_t n) {
    int wide = tp_mm_isa_current() == TP_ISA_AVX512;
    size_t blk = 1 << 14, nb = (n + blk - 1) / blk;
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < nb; b++) {
        size_t i0 = b * blk, m = n - i0 < blk ? n - i0 : blk;
        if (wide) to_bf16_512(d + i0, s + i0, m);
        else for (size_t i = i0; i < i0 + m; i++) d[i] = tp_f32_to_bf16(s[i]);
    }
}

static int bf16_matmul(tp_matmul *mm, int kind, const float *a, int64_t m, int64_t k, int64_t n, const tp_weight *w,
                       float *c, int accumulate, tp_err *err) {
    size_t na = (size_t)(m * k);
    if (grow((void **)&mm->abuf, &mm->acap, na * sizeof(uint16_t), err) != TP_OK) return TP_ENOMEM;
    tp_mm_to_bf16(mm->abuf, a, na);
    mm_prim *p = get_prim(mm, kind, m, k, n, accumulate, err);
    if (!p) return TP_EUNSUP;
    dnnl_memory_set_data_handle(p->src, mm->abuf);
    dnnl_memory_set_data_handle(p->wei, (void *)w->data); /* read only: oneDNN never writes weights */
    dnnl_memory_set_data_handle(p->dst, c);
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_WEIGHTS, p->wei}, {DNNL_ARG_DST, p->dst}};
    if (dnnl_primitive_execute(p->prim, mm->stream, 3, args) != dnnl_success || dnnl_stream_wait(mm->stream) != dnnl_success)
        return tp_fail(err, TP_EIO, "oneDNN: bf16 matmul execution failed");
    return TP_OK;
}

/* ---- small-n x·Wᵀ on 16-bit weights in place ------------------------------
 * Per block of output rows, RB weight rows are streamed once against NX x-rows
 * with RB*NX*U fp32 accumulators (U: column unroll), enough independent FMAs
 * to hide their latency without spilling. Every output (r, i) is summed in the
 * same order whatever RB or the block split: lanes of vector accumulators,
 * then a fixed reduction, then a scalar tail. Activations stay fp32. */

/* x rows per kernel pass; larger n loops over groups of 4 inside a row block.
 * Groups of 8 (RB 2) were 2-4x slower for n >= 6: each weight row pass then
 * re-reads 8 x rows from L2 (x of 8 x 8192 floats does not fit L1), while the
 * block's weights are re-read from L1/L2 cheaply by the next group. */
#define SMALL_NX 4
#define ROW_BLOCK 16  /* output rows per OpenMP work item (fixed: results do not depend on threads) */

static _Atomic int g_isa = -1;    /* tp_mm_isa in effect, -1: not resolved */
static _Atomic int g_forced = -1; /* tp_mm_force_isa, -1: none */

static tp_mm_isa cpu_isa(void) {
    tp_cpu_features f;
    tp_cpu_detect(&f);
    /* FMA and F16C from CPUID leaf 1 (ECX bits 12 and 29): clang's
     * __builtin_cpu_supports does not know "f16c" */
    unsigned a = 0, b = 0, c = 0, d = 0;
    int fma_f16c = __get_cpuid(1, &a, &b, &c, &d) && (c >> 12 & 1) && (c >> 29 & 1);
    if (f.avx512f && f.avx512bw) return TP_ISA_AVX512;
    if (f.avx2 && fma_f16c) return TP_ISA_AVX2;
    return TP_ISA_SCALAR;
}

static tp_mm_isa env_isa(void) {
    static _Atomic int cached = -1;
    int v = cached;
    if (v >= 0) return (tp_mm_isa)v;
    tp_mm_isa hw = cpu_isa();
    v = (int)hw;
    const char *e = getenv("TPTT_ISA");
    if (e && *e) {
        int want = !strcmp(e, "scalar") ? TP_ISA_SCALAR
                   : !strcmp(e, "avx2") ? TP_ISA_AVX2
                   : !strcmp(e, "avx512") ? TP_ISA_AVX512 : -1;
        if (want < 0) fprintf(stderr, "tptt: notice: TPTT_ISA=%s ignored (expected avx512, avx2 or scalar)\n", e);
        else if (want < v) v = want;
    }
    cached = v;
    return (tp_mm_isa)v;
}

const char *tp_mm_isa_name(tp_mm_isa isa) {
    return isa == TP_ISA_AVX512 ? "avx512" : isa == TP_ISA_AVX2 ? "avx2" : "scalar";
}

tp_mm_isa tp_mm_isa_current(void) {
    int v = g_isa;
    if (v < 0) {
        v = g_forced >= 0 ? g_forced : (int)env_isa();
        g_isa = v;
    }
    return (tp_mm_isa)v;
}

tp_mm_isa tp_mm_force_isa(int isa) {
    tp_mm_isa hw = cpu_isa();
    g_forced = isa < 0 ? -1 : isa > (int)hw ? (int)hw : isa;
    g_isa = -1;
    return tp_mm_isa_current();
}

/* Instantiations: RB (weight rows at once) and U (column unroll) per NX, so
 * RB*NX*U accumulators fit the register file (32 zmm / 16 ymm). */
#define RB512(nx) 4
#define U512(nx) ((nx) <= 2 ? 2 : 1)
#define RB256(nx) ((nx) <= 3 ? 4 : 2)
#define U256(nx) ((nx) == 1 ? 2 : 1)

#define TGT512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define TGT256 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

INLINE TGT512 __m512 ld512(const uint16_t *p, int isbf) {
    __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)p);
    if (isbf) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

INLINE TGT512 void rows512(const float *x, int64_t ldx, const uint16_t *w, int64_t cols, float *y, int64_t ldy,
                           int accumulate, const int NX, const int RB, const int U, const int isbf) {
    __m512 acc[4][SMALL_NX][2];
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int i = 0; i < NX; i++)
#pragma GCC unroll 2
            for (int u = 0; u < U; u++) acc[r][i][u] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 * U <= cols; c += 16 * U) {
        __m512 wv[4][2];
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++)
#pragma GCC unroll 2
            for (int u = 0; u < U; u++) wv[r][u] = ld512(w + r * cols + c + 16 * u, isbf);
#pragma GCC unroll 4
        for (int i = 0; i < NX; i++)
#pragma GCC unroll 2
            for (int u = 0; u < U; u++) {
                __m512 xv = _mm512_loadu_ps(x + i * ldx + c + 16 * u);
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) acc[r][i][u] = _mm512_fmadd_ps(wv[r][u], xv, acc[r][i][u]);
            }
    }
    if (U > 1)
        for (; c + 16 <= cols; c += 16) {
            __m512 wv[4];
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++) wv[r] = ld512(w + r * cols + c, isbf);
#pragma GCC unroll 4
            for (int i = 0; i < NX; i++) {
                __m512 xv = _mm512_loadu_ps(x + i * ldx + c);
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) acc[r][i][0] = _mm512_fmadd_ps(wv[r], xv, acc[r][i][0]);
            }
        }
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int i = 0; i < NX; i++) {
            __m512 a = U > 1 ? _mm512_add_ps(acc[r][i][0], acc[r][i][1]) : acc[r][i][0];
            float s = _mm512_reduce_add_ps(a);
            const uint16_t *wr = w + r * cols;
            const float *xr = x + i * ldx;
            for (int64_t k = c; k < cols; k++)
                s += xr[k] * (isbf ? tp_bf16_to_f32(wr[k]) : tp_f16_to_f32(wr[k]));
            float *o = y + i * ldy + r;
            *o = accumulate ? *o + s : s;
        }
}

INLINE TGT256 __m256 ld256(const uint16_t *p, int isbf) {
    __m128i h = _mm_loadu_si128((const __m128i *)(const void *)p);
    if (isbf) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

INLINE TGT256 float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE TGT256 void rows256(const float *x, int64_t ldx, const uint16_t *w, int64_t cols, float *y, int64_t ldy,
                           int accumulate, const int NX, const int RB, const int U, const int isbf) {
    __m256 acc[4][SMALL_NX][2];
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int i = 0; i < NX; i++)
#pragma GCC unroll 2
            for (int u = 0; u < U; u++) acc[r][i][u] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 * U <= cols; c += 8 * U) {
        __m256 wv[4][2];
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++)
#pragma GCC unroll 2
            for (int u = 0; u < U; u++) wv[r][u] = ld256(w + r * cols + c + 8 * u, isbf);
#pragma GCC unroll 4
        for (int i = 0; i < NX; i++)
#pragma GCC unroll 2
            for (int u = 0; u < U; u++) {
                __m256 xv = _mm256_loadu_ps(x + i * ldx + c + 8 * u);
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) acc[r][i][u] = _mm256_fmadd_ps(wv[r][u], xv, acc[r][i][u]);
            }
    }
    if (U > 1)
        for (; c + 8 <= cols; c += 8) {
            __m256 wv[4];
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++) wv[r] = ld256(w + r * cols + c, isbf);
#pragma GCC unroll 4
            for (int i = 0; i < NX; i++) {
                __m256 xv = _mm256_loadu_ps(x + i * ldx + c);
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) acc[r][i][0] = _mm256_fmadd_ps(wv[r], xv, acc[r][i][0]);
            }
        }
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int i = 0; i < NX; i++) {
            __m256 a = U > 1 ? _mm256_add_ps(acc[r][i][0], acc[r][i][1]) : acc[r][i][0];
            float s = hsum256(a);
            const uint16_t *wr = w + r * cols;
            const float *xr = x + i * ldx;
            for (int64_t k = c; k < cols; k++)
                s += xr[k] * (isbf ? tp_bf16_to_f32(wr[k]) : tp_f16_to_f32(wr[k]));
            float *o = y + i * ldy + r;
            *o = accumulate ? *o + s : s;
        }
}

/* Rows [r0, r1) of W against NX x-rows: RB rows at a time, then one by one
 * (same summation order per output either way). */
#define BLOCK_FN(name, rowsfn, tgt, RBF, UF)                                                                    \
    INLINE tgt void name##_n(const float *x, int64_t ldx, const uint16_t *w, int64_t cols, int64_t r0, int64_t r1, \
                             float *y, int64_t ldy, int accumulate, const int NX, const int isbf) {               \
        int64_t r = r0;                                                                                          \
        for (; r + RBF(NX) <= r1; r += RBF(NX))                                                                  \
            rowsfn(x, ldx, w + r * cols, cols, y + r, ldy, accumulate, NX, RBF(NX), UF(NX), isbf);               \
        for (; r < r1; r++) rowsfn(x, ldx, w + r * cols, cols, y + r, ldy, accumulate, NX, 1, UF(NX), isbf);     \
    }                                                                                                            \
    static tgt void name(const float *x, int64_t ldx, const uint16_t *w, int64_t cols, int64_t r0, int64_t r1,     \
                         float *y, int64_t ldy, int accumulate, int nx, int isbf) {                              \
        switch (nx * 2 + !!isbf) {                                                                               \
        case 2: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 1, 0); break;                              \
        case 3: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 1, 1); break;                              \
        case 4: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 2, 0); break;                              \
        case 5: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 2, 1); break;                              \
        case 6: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 3, 0); break;                              \
        case 7: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 3, 1); break;                              \
        case 8: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 4, 0); break;                              \
        case 9: name##_n(x, ldx, w, cols, r0, r1, y, ldy, accumulate, 4, 1); break;                              \
        default: break;                                                                                          \
        }                                                                                                        \
    }

BLOCK_FN(block512, rows512, TGT512, RB512, U512)
BLOCK_FN(block256, rows256, TGT256, RB256, U256)

/* Plain C: 8 partial sums per output (the AVX2 lane layout), so the compiler
 * may vectorise and the error stays that of a short sum. */
static void block_scalar(const float *x, int64_t ldx, const uint16_t *w, int64_t cols, int64_t r0, int64_t r1,
                         float *y, int64_t ldy, int accumulate, int nx, int isbf) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * cols;
        for (int i = 0; i < nx; i++) {
            const float *xr = x + i * ldx;
            float p[8] = {0};
            int64_t c = 0;
            for (; c + 8 <= cols; c += 8)
                for (int l = 0; l < 8; l++)
                    p[l] += xr[c + l] * (isbf ? tp_bf16_to_f32(wr[c + l]) : tp_f16_to_f32(wr[c + l]));
            float s = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
            for (; c < cols; c++) s += xr[c] * (isbf ? tp_bf16_to_f32(wr[c]) : tp_f16_to_f32(wr[c]));
            float *o = y + i * ldy + r;
            *o = accumulate ? *o + s : s;
        }
    }
}

int tp_mm_xwt_small(const float *x, int64_t n, const tp_weight *w, float *y, int accumulate, tp_err *err) {
    if (w->dtype != TP_BF16 && w->dtype != TP_F16)
        return tp_fail(err, TP_EINVAL, "small-n matmul: weight dtype must be bf16 or f16");
    if (n <= 0 || w->rows <= 0) return TP_OK;
    const int64_t rows = w->rows, cols = w->cols, nb = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    const uint16_t *wd = w->data;
    const int isbf = w->dtype == TP_BF16;
    const tp_mm_isa isa = tp_mm_isa_current();
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        int64_t r0 = b * ROW_BLOCK, r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        /* x groups inside the row block: the block's weights are re-read from cache */
        for (int64_t i0 = 0; i0 < n; i0 += SMALL_NX) {
            int nx = (int)(n - i0 < SMALL_NX ? n - i0 : SMALL_NX);
            const float *xg = x + i0 * cols;
            float *yg = y + i0 * rows;
            if (isa == TP_ISA_AVX512) block512(xg, cols, wd, cols, r0, r1, yg, rows, accumulate, nx, isbf);
            else if (isa == TP_ISA_AVX2) block256(xg, cols, wd, cols, r0, r1, yg, rows, accumulate, nx, isbf);
            else block_scalar(xg, cols, wd, cols, r0, r1, yg, rows, accumulate, nx, isbf);
        }
    }
    return TP_OK;
}

void tp_mm_hold(tp_matmul *mm, const tp_weight *w) {
    mm->held = w ? w->data : NULL;
    mm->wkey = NULL;
}

int tp_mm_xwt(tp_matmul *mm, const float *x, int64_t n, const tp_weight *w, float *y, int accumulate, tp_err *err) {
    if (n <= 0) return TP_OK;
    if ((w->dtype == TP_BF16 || w->dtype == TP_F16) &&
        n <= (mm->backend == TP_MM_BF16 ? TP_MM_SMALL_N_BF16 : TP_MM_SMALL_N_F32))
        return tp_mm_xwt_small(x, n, w, y, accumulate, err);
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
