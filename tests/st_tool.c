/* st_tool.c - test helper exposing the C safetensors reader/writer to the
 * Python tests (tests/test_py_roundtrip.py, tests/test_bad_input.py).
 *
 *   st_tool ls FILE          one line per tensor in name order:
 *                            name<TAB>dtype<TAB>d0,d1,..<TAB>fnv1a64 of its bytes (hex)
 *                            then meta<TAB>key<TAB>"value" (JSON string) per metadata entry
 *   st_tool copy IN OUT      read IN with the C reader, write OUT with the C writer
 *                            (tensors in data-offset order, same metadata)
 *   st_tool gen OUT          write the fixed pattern file described in gen() below
 *   st_tool f32 FILE NAME    print the tensor's values converted to fp32, "%.9g" per line
 *
 * Errors: "st_tool: <message>" on stderr, exit 1. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "util/fsutil.h"

static uint64_t fnv1a64(const void *p, uint64_t n) {
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (uint64_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ULL;
    return h;
}

static int fail(const tp_err *e) {
    fprintf(stderr, "st_tool: %s\n", e->msg);
    return 1;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(const tp_tensor_view *const *)a)->name, (*(const tp_tensor_view *const *)b)->name);
}

static int ls(const char *path) {
    tp_err err = {0};
    tp_st_file *f;
    if (tp_st_open(path, &f, &err)) return fail(&err);
    size_t n = tp_st_count(f);
    const tp_tensor_view **v = calloc(n ? n : 1, sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = tp_st_at(f, i);
    qsort(v, n, sizeof *v, cmp_name);
    for (size_t i = 0; i < n; i++) {
        printf("%s\t%s\t", v[i]->name, tp_dtype_name(v[i]->dtype));
        for (int d = 0; d < v[i]->ndim; d++) printf("%s%" PRId64, d ? "," : "", v[i]->shape[d]);
        printf("\t%016" PRIx64 "\n", fnv1a64(v[i]->data, v[i]->nbytes));
    }
    for (size_t i = 0; i < tp_st_meta_count(f); i++) {
        tp_strbuf sb;
        tp_strbuf_init(&sb);
        tp_strbuf_json_string(&sb, tp_st_meta_at(f, i)->value);
        printf("meta\t%s\t%s\n", tp_st_meta_at(f, i)->key, sb.buf);
        tp_strbuf_free(&sb);
    }
    free(v);
    tp_st_close(f);
    return 0;
}

static int copy(const char *in, const char *out) {
    tp_err err = {0};
    tp_st_file *f;
    if (tp_st_open(in, &f, &err)) return fail(&err);
    size_t n = tp_st_count(f), nm = tp_st_meta_count(f);
    tp_st_spec *s = calloc(n ? n : 1, sizeof *s);
    const void **data = calloc(n ? n : 1, sizeof *data);
    tp_kv *meta = calloc(nm ? nm : 1, sizeof *meta);
    for (size_t i = 0; i < n; i++) {
        const tp_tensor_view *v = tp_st_at(f, i);
        s[i].name = v->name;
        s[i].dtype = v->dtype;
        s[i].ndim = v->ndim;
        memcpy(s[i].shape, v->shape, sizeof s[i].shape);
        data[i] = v->data;
    }
    for (size_t i = 0; i < nm; i++) meta[i] = *tp_st_meta_at(f, i);
    int rc = tp_st_write(out, s, data, n, meta, nm, &err);
    free(s);
    free(data);
    free(meta);
    tp_st_close(f);
    return rc ? fail(&err) : 0;
}

/* Pattern: element i of tensor t is ((i * 7 + t * 3) % 29 - 14) / 8, exact in
 * every dtype. Tensors (in this order): "a.f32" F32 [3,5]; "b.bf16" BF16
 * [2,3,4]; "c.f16" F16 [7]; "d.empty" F32 [0,4]; "e.scalar" BF16 []. Metadata
 * format=pt, note="héllo \"q\"\n\ttab". */
static int gen(const char *out) {
    tp_st_spec s[5] = {{"a.f32", TP_F32, 2, {3, 5}},
                       {"b.bf16", TP_BF16, 3, {2, 3, 4}},
                       {"c.f16", TP_F16, 1, {7}},
                       {"d.empty", TP_F32, 2, {0, 4}},
                       {"e.scalar", TP_BF16, 0, {0}}};
    void *data[5];
    for (int t = 0; t < 5; t++) {
        uint64_t nb;
        tp_st_spec_nbytes(&s[t], &nb);
        size_t n = (size_t)(nb / tp_dtype_size(s[t].dtype));
        float *f = malloc((n ? n : 1) * sizeof *f);
        for (size_t i = 0; i < n; i++) f[i] = (float)((long)((i * 7 + (size_t)t * 3) % 29) - 14) / 8.0f;
        data[t] = malloc(nb ? nb : 1);
        tp_from_f32(data[t], f, s[t].dtype, n);
        free(f);
    }
    tp_kv meta[2] = {{"format", "pt"}, {"note", "h\xc3\xa9llo \"q\"\n\ttab"}};
    tp_err err = {0};
    int rc = tp_st_write(out, s, (const void *const *)data, 5, meta, 2, &err);
    for (int t = 0; t < 5; t++) free(data[t]);
    return rc ? fail(&err) : 0;
}

static int f32(const char *path, const char *name) {
    tp_err err = {0};
    tp_st_file *f;
    if (tp_st_open(path, &f, &err)) return fail(&err);
    const tp_tensor_view *v = tp_st_find(f, name);
    if (!v) {
        fprintf(stderr, "st_tool: %s: no tensor '%s'\n", path, name);
        tp_st_close(f);
        return 1;
    }
    float *x = malloc((v->numel ? v->numel : 1) * sizeof *x);
    tp_to_f32(x, v->data, v->dtype, v->numel);
    for (uint64_t i = 0; i < v->numel; i++) printf("%.9g\n", x[i]);
    free(x);
    tp_st_close(f);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "ls")) return ls(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "copy")) return copy(argv[2], argv[3]);
    if (argc == 3 && !strcmp(argv[1], "gen")) return gen(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "f32")) return f32(argv[2], argv[3]);
    fprintf(stderr, "usage: st_tool ls FILE | copy IN OUT | gen OUT | f32 FILE NAME\n");
    return 2;
}
