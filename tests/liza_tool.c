/* liza_tool.c - test helper exposing the fp32 chunked LiZA kernel
 * (src/kernels/liza.h) to tests/test_liza_autograd.py.
 *
 *   liza_tool IN OUT
 *
 * IN is a safetensors file with tensors (F32, F16 or BF16; converted to fp32)
 *   q [B*T, H*d], k, v, beta [B*T, Hkv*d], log_alpha [B*T, Hkv] (optional:
 *   absent means no decay), doc_start [B*T] (the start position of each
 *   token's document within its row, as exact float values), dy [B*T, H*d]
 * and __metadata__ B, T, H, Hkv, d, order, chunk (decimal integers), trick
 * ("dt", "rot", "rdt" or 0, 1, 2), linear ("1"/"true" or "0"/"false").
 * It runs tp_liza_fwd and tp_liza_bwd in fp32 and writes OUT with F32 tensors
 * y [B*T, H*d], dq [B*T, H*d], dk, dv, dbeta [B*T, Hkv*d] and, when IN has
 * log_alpha, dlog_alpha [B*T, Hkv].
 *
 * Errors: "liza_tool: <message>" on stderr (one line), exit 1. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "kernels/liza.h"

static int fail_msg(const char *msg) {
    fprintf(stderr, "liza_tool: %s\n", msg);
    return 1;
}

static int parse_int(const tp_st_file *f, const char *key, int64_t lo, int64_t hi, int64_t *out, tp_err *err) {
    const char *s = tp_st_meta_get(f, key);
    if (!s) return tp_fail(err, TP_EINVAL, "%s: no metadata key '%s'", tp_st_path(f), key);
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return tp_fail(err, TP_EINVAL, "%s: metadata %s = \"%s\", want an integer in [%" PRId64 ", %" PRId64 "]",
                       tp_st_path(f), key, s, lo, hi);
    *out = v;
    return 0;
}

/* A tensor of shape [rows, cols] (cols == 0: [rows]) converted to a fresh
 * fp32 buffer; *out stays NULL when the tensor is absent and optional. */
static int load(const tp_st_file *f, const char *name, int64_t rows, int64_t cols, int optional, float **out,
                tp_err *err) {
    *out = NULL;
    const tp_tensor_view *v = tp_st_find(f, name);
    if (!v) {
        if (optional) return 0;
        return tp_fail(err, TP_EINVAL, "%s: no tensor '%s'", tp_st_path(f), name);
    }
    if (v->dtype != TP_F32 && v->dtype != TP_F16 && v->dtype != TP_BF16)
        return tp_fail(err, TP_EINVAL, "%s: tensor '%s' has dtype %s, want F32, F16 or BF16", tp_st_path(f), name,
                       tp_dtype_name(v->dtype));
    int want_ndim = cols ? 2 : 1;
    if (v->ndim != want_ndim || v->shape[0] != rows || (cols && v->shape[1] != cols)) {
        if (cols)
            return tp_fail(err, TP_EINVAL, "%s: tensor '%s' must have shape [%" PRId64 ", %" PRId64 "]",
                           tp_st_path(f), name, rows, cols);
        return tp_fail(err, TP_EINVAL, "%s: tensor '%s' must have shape [%" PRId64 "]", tp_st_path(f), name, rows);
    }
    float *x = tp_malloc((v->numel ? v->numel : 1) * sizeof *x, err);
    if (!x) return err->code;
    tp_to_f32(x, v->data, v->dtype, v->numel);
    for (uint64_t i = 0; i < v->numel; i++)
        if (!isfinite(x[i])) {
            free(x);
            return tp_fail(err, TP_EINVAL, "%s: tensor '%s' element %" PRIu64 " is not finite", tp_st_path(f),
                           name, i);
        }
    *out = x;
    return 0;
}

enum { IN_Q, IN_K, IN_V, IN_BETA, IN_LA, IN_DOC, IN_DY, N_IN };
enum { OUT_Y, OUT_DQ, OUT_DK, OUT_DV, OUT_DBETA, OUT_DLA, N_OUT };

static int run(const char *in, const char *out, tp_err *err) {
    tp_st_file *f = NULL;
    float *x[N_IN] = {0}, *o[N_OUT] = {0}, *states = NULL;
    int32_t *ds = NULL;
    int rc = tp_st_open(in, &f, err);
    if (rc) return rc;

    int64_t B, T, H, Hkv, d, order, chunk, trick = -1, linear = -1;
    const int64_t big = (int64_t)1 << 24;
    if ((rc = parse_int(f, "B", 1, big, &B, err)) || (rc = parse_int(f, "T", 1, big, &T, err)) ||
        (rc = parse_int(f, "H", 1, 4096, &H, err)) || (rc = parse_int(f, "Hkv", 1, 4096, &Hkv, err)) ||
        (rc = parse_int(f, "d", 1, 512, &d, err)) || (rc = parse_int(f, "order", 1, 16, &order, err)) ||
        (rc = parse_int(f, "chunk", 1, big, &chunk, err)))
        goto done;
    const char *ts = tp_st_meta_get(f, "trick"), *ls = tp_st_meta_get(f, "linear");
    if (ts) {
        if (!strcmp(ts, "dt") || !strcmp(ts, "0")) trick = TP_TRICK_DT;
        if (!strcmp(ts, "rot") || !strcmp(ts, "1")) trick = TP_TRICK_ROT;
        if (!strcmp(ts, "rdt") || !strcmp(ts, "2")) trick = TP_TRICK_RDT;
    }
    if (trick < 0) {
        rc = tp_fail(err, TP_EINVAL, "%s: metadata trick = \"%s\", want dt, rot, rdt (or 0, 1, 2)", in,
                     ts ? ts : "(absent)");
        goto done;
    }
    if (ls) {
        if (!strcmp(ls, "1") || !strcmp(ls, "true")) linear = 1;
        if (!strcmp(ls, "0") || !strcmp(ls, "false")) linear = 0;
    }
    if (linear < 0) {
        rc = tp_fail(err, TP_EINVAL, "%s: metadata linear = \"%s\", want 1/true or 0/false", in,
                     ls ? ls : "(absent)");
        goto done;
    }
    if (H % Hkv) {
        rc = tp_fail(err, TP_EINVAL, "%s: H = %" PRId64 " is not a multiple of Hkv = %" PRId64, in, H, Hkv);
        goto done;
    }
    if (B * T > big) {
        rc = tp_fail(err, TP_EINVAL, "%s: B*T = %" PRId64 " is too large", in, B * T);
        goto done;
    }

    int64_t N = B * T;
    if ((rc = load(f, "q", N, H * d, 0, &x[IN_Q], err)) || (rc = load(f, "k", N, Hkv * d, 0, &x[IN_K], err)) ||
        (rc = load(f, "v", N, Hkv * d, 0, &x[IN_V], err)) ||
        (rc = load(f, "beta", N, Hkv * d, 0, &x[IN_BETA], err)) ||
        (rc = load(f, "log_alpha", N, Hkv, 1, &x[IN_LA], err)) ||
        (rc = load(f, "doc_start", N, 0, 0, &x[IN_DOC], err)) || (rc = load(f, "dy", N, H * d, 0, &x[IN_DY], err)))
        goto done;

    /* doc_start: integer, 0 at each row's start, and per token either its own
     * position (a new document) or its predecessor's start */
    ds = tp_malloc((size_t)N * sizeof *ds, err);
    if (!ds) {
        rc = err->code;
        goto done;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            float s = x[IN_DOC][b * T + t];
            if (s != floorf(s) || s < 0 || s > (float)t || (s != (float)t && (t == 0 || s != (float)ds[b * T + t - 1]))) {
                rc = tp_fail(err, TP_EINVAL,
                             "%s: doc_start[%" PRId64 "] = %g (row %" PRId64 ", position %" PRId64
                             ") is neither the position nor the previous token's document start",
                             in, b * T + t, (double)s, b, t);
                goto done;
            }
            ds[b * T + t] = (int32_t)s;
        }

    tp_liza_dims dims = {B, T, H, Hkv, d};
    tp_liza_cfg cfg = {(int)order, (int)trick, (int)linear, (int)chunk};
    size_t ns = tp_liza_state_count(&dims, &cfg, ds);
    states = tp_malloc((ns ? ns : 1) * (size_t)(d * d) * sizeof *states, err);
    int64_t cols[N_OUT] = {H * d, H * d, Hkv * d, Hkv * d, Hkv * d, Hkv};
    for (int i = 0; i < N_OUT && states; i++)
        if (!(o[i] = tp_calloc((size_t)(N * cols[i]), sizeof *o[i], err))) break;
    if (!states || !o[N_OUT - 1]) {
        rc = err->code;
        goto done;
    }
    if ((rc = tp_liza_fwd(&dims, &cfg, x[IN_Q], x[IN_K], x[IN_V], x[IN_BETA], x[IN_LA], ds, o[OUT_Y], states,
                          err)) ||
        (rc = tp_liza_bwd(&dims, &cfg, x[IN_Q], x[IN_K], x[IN_V], x[IN_BETA], x[IN_LA], ds, states, x[IN_DY],
                          o[OUT_DQ], o[OUT_DK], o[OUT_DV], o[OUT_DBETA], x[IN_LA] ? o[OUT_DLA] : NULL, err)))
        goto done;

    tp_st_spec spec[N_OUT] = {{"y", TP_F32, 2, {N, H * d}},        {"dq", TP_F32, 2, {N, H * d}},
                              {"dk", TP_F32, 2, {N, Hkv * d}},     {"dv", TP_F32, 2, {N, Hkv * d}},
                              {"dbeta", TP_F32, 2, {N, Hkv * d}},  {"dlog_alpha", TP_F32, 2, {N, Hkv}}};
    const void *data[N_OUT];
    for (int i = 0; i < N_OUT; i++) data[i] = o[i];
    rc = tp_st_write(out, spec, data, x[IN_LA] ? N_OUT : N_OUT - 1, NULL, 0, err);

done:
    for (int i = 0; i < N_IN; i++) free(x[i]);
    for (int i = 0; i < N_OUT; i++) free(o[i]);
    free(states);
    free(ds);
    tp_st_close(f);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: liza_tool IN OUT\n");
        return 2;
    }
    tp_err err = {0};
    if (run(argv[1], argv[2], &err)) return fail_msg(err.msg);
    return 0;
}
