#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <utf8proc.h>

#include "util/fsutil.h"

struct tp_st_file {
    char *path;
    const uint8_t *base; /* whole file image */
    uint64_t size;
    int mapped;          /* base came from mmap and is unmapped on close */
    tp_tensor_view *views;
    size_t n;
    tp_tensor_view **by_name; /* sorted by name for bsearch */
    tp_kv *meta;
    size_t nmeta;
    char *strings; /* one block holding every name/key/value */
};

/* ---- reader ------------------------------------------------------------ */

static int valid_utf8(const uint8_t *s, size_t n, size_t *bad_at) {
    size_t i = 0;
    while (i < n) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0) { *bad_at = i; return 0; }
        i += (size_t)k;
    }
    return 1;
}

/* JSON strings may not hold raw control characters, and names become C
 * strings, so an escaped NUL would silently truncate them: reject both
 * before parsing. Returns the offending offset or -1. */
static long bad_string_byte(const uint8_t *s, size_t n) {
    int in = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        if (!in) {
            if (c == '"') in = 1;
            continue;
        }
        if (c < 0x20) return (long)i;
        if (c == '"') in = 0;
        else if (c == '\\' && i + 1 < n) {
            if (s[i + 1] == 'u' && i + 5 < n && !memcmp(s + i + 2, "0000", 4)) return (long)i;
            i++;
        }
    }
    return -1;
}

/* An exact non-negative integer below 2^53 (what JSON doubles hold exactly):
 * returns 1, or 0 for not a non-negative integer, -1 for one too large. */
static int json_uint(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return 0;
    double d = j->valuedouble;
    if (!(d >= 0.0) || d != floor(d)) return 0;
    if (d >= 9007199254740992.0) return -1;
    *out = (uint64_t)d;
    return 1;
}

static int cmp_offset(const void *a, const void *b) {
    const tp_tensor_view *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_name_ptr(const void *a, const void *b) {
    const tp_tensor_view *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

static int cmp_kv(const void *a, const void *b) {
    return strcmp(((const tp_kv *)a)->key, ((const tp_kv *)b)->key);
}

/* Parse one tensor entry into v (name set by the caller). */
static int parse_entry(const char *label, const cJSON *e, tp_tensor_view *v, tp_err *err) {
    const char *nm = e->string;
    if (!cJSON_IsObject(e))
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': header entry is not a JSON object", label, nm);
    /* readers disagree on repeated fields (first vs last wins): reject them */
    for (const cJSON *a = e->child; a; a = a->next)
        for (const cJSON *b = a->next; b; b = b->next)
            if (!strcmp(a->string, b->string))
                return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': duplicate field \"%s\" in its header entry", label, nm, a->string);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt))
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': missing or non-string \"dtype\"", label, nm);
    int r = tp_dtype_parse(dt->valuestring, &v->dtype);
    if (r > 0)
        return tp_fail(err, TP_EUNSUP, "%s: tensor '%s': dtype %s is not supported (expected BF16, F16 or F32)",
                       label, nm, dt->valuestring);
    if (r < 0)
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': unknown dtype '%.40s' (expected BF16, F16 or F32)",
                       label, nm, dt->valuestring);
    if (!cJSON_IsArray(sh))
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': missing or non-array \"shape\"", label, nm);
    int nd = cJSON_GetArraySize(sh);
    if (nd > TP_ST_MAX_DIMS)
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': %d dimensions, at most %d supported", label, nm, nd,
                       TP_ST_MAX_DIMS);
    v->ndim = nd;
    uint64_t numel = 1;
    int i = 0;
    const cJSON *d;
    cJSON_ArrayForEach(d, sh) {
        uint64_t x;
        int ok = json_uint(d, &x);
        if (ok < 0)
            return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': shape[%d] is too large (at most 2^53)", label, nm, i);
        if (!ok)
            return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer", label, nm, i);
        if (__builtin_mul_overflow(numel, x, &numel))
            return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': shape overflows 64 bits", label, nm);
        v->shape[i++] = (int64_t)x;
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, (uint64_t)tp_dtype_size(v->dtype), &nbytes))
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': byte size overflows 64 bits", label, nm);
    uint64_t b = 0, en = 0;
    int okb = 0, oke = 0;
    if (cJSON_IsArray(of) && cJSON_GetArraySize(of) == 2) {
        okb = json_uint(cJSON_GetArrayItem(of, 0), &b);
        oke = json_uint(cJSON_GetArrayItem(of, 1), &en);
    }
    if (okb < 0 || oke < 0)
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': data_offsets too large (at most 2^53)", label, nm);
    if (okb != 1 || oke != 1)
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': \"data_offsets\" must be [begin, end] non-negative integers",
                       label, nm);
    if (en < b)
        return tp_fail(err, TP_EFORMAT, "%s: tensor '%s': data_offsets end %llu is before begin %llu", label, nm,
                       (unsigned long long)en, (unsigned long long)b);
    if (en - b != nbytes)
        return tp_fail(err, TP_EFORMAT,
                       "%s: tensor '%s': data_offsets span %llu bytes but shape and dtype %s need %llu", label, nm,
                       (unsigned long long)(en - b), tp_dtype_name(v->dtype), (unsigned long long)nbytes);
    v->numel = numel;
    v->nbytes = nbytes;
    v->offset = b; /* relative for now */
    return TP_OK;
}

int tp_st_parse(const char *label, const uint8_t *buf, size_t size, tp_st_file **out, tp_err *err) {
    *out = NULL;
    if (size < 8)
        return tp_fail(err, TP_EFORMAT, "%s: file is %zu bytes, shorter than the 8-byte header length", label, size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    if (hlen > TP_ST_MAX_HEADER)
        return tp_fail(err, TP_EFORMAT, "%s: header length %llu exceeds the 100 MB limit", label,
                       (unsigned long long)hlen);
    if (hlen > size - 8)
        return tp_fail(err, TP_EFORMAT, "%s: header length %llu runs past the end of the file (%zu bytes)", label,
                       (unsigned long long)hlen, size);
    const uint8_t *hdr = buf + 8;
    size_t bad;
    if (!valid_utf8(hdr, (size_t)hlen, &bad))
        return tp_fail(err, TP_EFORMAT, "%s: header is not valid UTF-8 (byte %zu)", label, bad);
    long badc = bad_string_byte(hdr, (size_t)hlen);
    if (badc >= 0)
        return tp_fail(err, TP_EFORMAT, "%s: header has a control character or NUL inside a JSON string (byte %ld)",
                       label, badc);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)hdr, (size_t)hlen, &end, 0);
    if (!root) {
        size_t at = end ? (size_t)(end - (const char *)hdr) : 0;
        return tp_fail(err, TP_EFORMAT, "%s: header is not valid JSON (near byte %zu)", label, at);
    }
    for (const char *p = end; p < (const char *)hdr + hlen; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return tp_fail(err, TP_EFORMAT, "%s: header has trailing bytes after the JSON object (byte %zu)", label,
                           (size_t)(p - (const char *)hdr));
        }
    }
    int rc = TP_OK;
    tp_st_file *f = NULL;
    if (!cJSON_IsObject(root)) {
        rc = tp_fail(err, TP_EFORMAT, "%s: header is not a JSON object", label);
        goto done;
    }
    /* Count entries and string bytes so everything lives in two blocks. */
    size_t n = 0, nmeta = 0, strbytes = 0;
    const cJSON *meta_obj = NULL, *e;
    cJSON_ArrayForEach(e, root) {
        if (!strcmp(e->string, "__metadata__")) {
            if (meta_obj) {
                rc = tp_fail(err, TP_EFORMAT, "%s: duplicate \"__metadata__\" entry", label);
                goto done;
            }
            meta_obj = e;
            if (!cJSON_IsObject(e)) {
                rc = tp_fail(err, TP_EFORMAT, "%s: \"__metadata__\" is not a JSON object", label);
                goto done;
            }
            const cJSON *m;
            cJSON_ArrayForEach(m, e) {
                if (!cJSON_IsString(m)) {
                    rc = tp_fail(err, TP_EFORMAT, "%s: metadata '%s' is not a string", label, m->string);
                    goto done;
                }
                nmeta++;
                strbytes += strlen(m->string) + strlen(m->valuestring) + 2;
            }
            continue;
        }
        n++;
        strbytes += strlen(e->string) + 1;
    }
    f = tp_calloc(1, sizeof *f, err);
    if (!f) { rc = TP_ENOMEM; goto done; }
    f->path = tp_strdup(label, err);
    f->views = tp_calloc(n, sizeof *f->views, err);
    f->by_name = tp_calloc(n, sizeof *f->by_name, err);
    f->meta = tp_calloc(nmeta, sizeof *f->meta, err);
    f->strings = tp_malloc(strbytes, err);
    if (!f->path || !f->views || !f->by_name || !f->meta || !f->strings) { rc = TP_ENOMEM; goto done; }
    f->base = buf;
    f->size = size;
    char *sp = f->strings;
    cJSON_ArrayForEach(e, root) {
        if (e == meta_obj) continue;
        tp_tensor_view *v = &f->views[f->n];
        size_t len = strlen(e->string) + 1;
        memcpy(sp, e->string, len);
        v->name = sp;
        sp += len;
        if ((rc = parse_entry(label, e, v, err)) != TP_OK) goto done;
        f->by_name[f->n] = v;
        f->n++;
    }
    if (meta_obj) {
        const cJSON *m;
        cJSON_ArrayForEach(m, meta_obj) {
            tp_kv *kv = &f->meta[f->nmeta++];
            size_t lk = strlen(m->string) + 1, lv = strlen(m->valuestring) + 1;
            memcpy(sp, m->string, lk);
            kv->key = sp;
            sp += lk;
            memcpy(sp, m->valuestring, lv);
            kv->value = sp;
            sp += lv;
        }
        qsort(f->meta, f->nmeta, sizeof *f->meta, cmp_kv);
        for (size_t i = 1; i < f->nmeta; i++)
            if (!strcmp(f->meta[i].key, f->meta[i - 1].key)) {
                rc = tp_fail(err, TP_EFORMAT, "%s: duplicate metadata key '%s'", label, f->meta[i].key);
                goto done;
            }
    }
    qsort(f->by_name, f->n, sizeof *f->by_name, cmp_name_ptr);
    for (size_t i = 1; i < f->n; i++)
        if (!strcmp(f->by_name[i]->name, f->by_name[i - 1]->name)) {
            rc = tp_fail(err, TP_EFORMAT, "%s: tensor '%s': duplicate tensor name in header", label,
                         f->by_name[i]->name);
            goto done;
        }
    /* Sorting views moves them; by_name is rebuilt afterwards. */
    qsort(f->views, f->n, sizeof *f->views, cmp_offset);
    uint64_t cur = 0;
    for (size_t i = 0; i < f->n; i++) {
        tp_tensor_view *v = &f->views[i];
        if (v->offset != cur) {
            rc = v->offset > cur
                     ? tp_fail(err, TP_EFORMAT, "%s: tensor '%s': data starts at %llu, leaving a gap after byte %llu%s",
                               label, v->name, (unsigned long long)v->offset, (unsigned long long)cur,
                               i == 0 ? " (the first tensor must start at offset 0)" : "")
                     : tp_fail(err, TP_EFORMAT, "%s: tensor '%s': data at %llu overlaps the previous tensor (ends at %llu)",
                               label, v->name, (unsigned long long)v->offset, (unsigned long long)cur);
            goto done;
        }
        cur = v->offset + v->nbytes;
    }
    uint64_t data_len = size - 8 - hlen;
    if (cur != data_len) {
        rc = tp_fail(err, TP_EFORMAT,
                     "%s: tensors cover %llu data bytes but the file holds %llu after the header (expected file size %llu, got %zu)",
                     label, (unsigned long long)cur, (unsigned long long)data_len,
                     (unsigned long long)(8 + hlen + cur), size);
        goto done;
    }
    for (size_t i = 0; i < f->n; i++) {
        tp_tensor_view *v = &f->views[i];
        v->offset += 8 + hlen;
        v->data = v->nbytes ? buf + v->offset : NULL;
        f->by_name[i] = v;
    }
    qsort(f->by_name, f->n, sizeof *f->by_name, cmp_name_ptr);
done:
    cJSON_Delete(root);
    if (rc != TP_OK) {
        if (f) f->base = NULL; /* caller owns buf on failure */
        tp_st_close(f);
        return rc;
    }
    *out = f;
    return TP_OK;
}

int tp_st_open(const char *path, tp_st_file **out, tp_err *err) {
    *out = NULL;
    const void *map;
    size_t size;
    int rc = tp_map_readonly(path, &map, &size, err);
    if (rc != TP_OK) return rc;
    static const uint8_t empty[1];
    rc = tp_st_parse(path, map ? map : empty, size, out, err);
    if (rc != TP_OK) {
        tp_unmap(map, size);
        return rc;
    }
    (*out)->mapped = map != NULL;
    return TP_OK;
}

void tp_st_close(tp_st_file *f) {
    if (!f) return;
    if (f->mapped) tp_unmap(f->base, f->size);
    free(f->path);
    free(f->views);
    free(f->by_name);
    free(f->meta);
    free(f->strings);
    free(f);
}

const char *tp_st_path(const tp_st_file *f) { return f->path; }
uint64_t tp_st_file_size(const tp_st_file *f) { return f->size; }
size_t tp_st_count(const tp_st_file *f) { return f->n; }
const tp_tensor_view *tp_st_at(const tp_st_file *f, size_t i) { return i < f->n ? &f->views[i] : NULL; }
size_t tp_st_meta_count(const tp_st_file *f) { return f->nmeta; }
const tp_kv *tp_st_meta_at(const tp_st_file *f, size_t i) { return i < f->nmeta ? &f->meta[i] : NULL; }

const tp_tensor_view *tp_st_find(const tp_st_file *f, const char *name) {
    size_t lo = 0, hi = f->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->by_name[mid]->name, name);
        if (c == 0) return f->by_name[mid];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

const char *tp_st_meta_get(const tp_st_file *f, const char *key) {
    tp_kv probe = {.key = key};
    const tp_kv *kv = bsearch(&probe, f->meta, f->nmeta, sizeof *f->meta, cmp_kv);
    return kv ? kv->value : NULL;
}

/* ---- writer ------------------------------------------------------------ */

struct tp_st_writer {
    char *path, *tmp;
    FILE *fp;
    uint64_t expected, written;
};

int tp_st_spec_nbytes(const tp_st_spec *s, uint64_t *out) {
    uint64_t n = tp_dtype_size(s->dtype);
    for (int i = 0; i < s->ndim; i++) {
        if (s->shape[i] < 0 || __builtin_mul_overflow(n, (uint64_t)s->shape[i], &n)) return -1;
    }
    *out = n;
    return 0;
}

int tp_st_writer_open(const char *path, const tp_st_spec *specs, size_t n, const tp_kv *meta, size_t nmeta,
                      tp_st_writer **out, tp_err *err) {
    *out = NULL;
    tp_strbuf h;
    tp_strbuf_init(&h);
    tp_strbuf_puts(&h, "{");
    int first = 1;
    if (nmeta) {
        tp_strbuf_puts(&h, "\"__metadata__\":{");
        for (size_t i = 0; i < nmeta; i++) {
            if (i) tp_strbuf_puts(&h, ",");
            tp_strbuf_json_string(&h, meta[i].key);
            tp_strbuf_puts(&h, ":");
            tp_strbuf_json_string(&h, meta[i].value);
        }
        tp_strbuf_puts(&h, "}");
        first = 0;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const tp_st_spec *s = &specs[i];
        uint64_t nb;
        if (s->ndim < 0 || s->ndim > TP_ST_MAX_DIMS || tp_st_spec_nbytes(s, &nb) != 0) {
            tp_strbuf_free(&h);
            return tp_fail(err, TP_EINVAL, "%s: tensor '%s': invalid shape", path, s->name);
        }
        if (!first) tp_strbuf_puts(&h, ",");
        first = 0;
        tp_strbuf_json_string(&h, s->name);
        tp_strbuf_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", tp_dtype_name(s->dtype));
        for (int d = 0; d < s->ndim; d++) tp_strbuf_printf(&h, "%s%lld", d ? "," : "", (long long)s->shape[d]);
        tp_strbuf_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                         (unsigned long long)(off + nb));
        off += nb;
    }
    tp_strbuf_puts(&h, "}");
    while (h.len % 8) tp_strbuf_puts(&h, " ");
    if (h.oom) {
        tp_strbuf_free(&h);
        return tp_fail(err, TP_ENOMEM, "%s: out of memory building the header", path);
    }
    tp_st_writer *w = tp_calloc(1, sizeof *w, err);
    if (!w) { tp_strbuf_free(&h); return TP_ENOMEM; }
    w->path = tp_strdup(path, err);
    w->tmp = tp_tmp_name(path, err);
    if (!w->path || !w->tmp) { tp_strbuf_free(&h); tp_st_writer_abort(w); return TP_ENOMEM; }
    w->fp = fopen(w->tmp, "wb");
    if (!w->fp) {
        int rc = tp_fail_sys(err, TP_EIO, errno, "%s: cannot create", w->tmp);
        tp_strbuf_free(&h);
        tp_st_writer_abort(w);
        return rc;
    }
    setvbuf(w->fp, NULL, _IOFBF, 1 << 20);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)h.len >> (8 * i));
    w->expected = off;
    int ok = fwrite(len8, 1, 8, w->fp) == 8 && fwrite(h.buf, 1, h.len, w->fp) == h.len;
    tp_strbuf_free(&h);
    if (!ok) {
        int rc = tp_fail_sys(err, TP_EIO, errno, "%s: write failed", w->tmp);
        tp_st_writer_abort(w);
        return rc;
    }
    *out = w;
    return TP_OK;
}

int tp_st_writer_write(tp_st_writer *w, const void *bytes, size_t nbytes, tp_err *err) {
    if (w->written + nbytes > w->expected)
        return tp_fail(err, TP_EINVAL, "%s: %llu bytes written, more than the %llu the header declares", w->path,
                       (unsigned long long)(w->written + nbytes), (unsigned long long)w->expected);
    if (nbytes && fwrite(bytes, 1, nbytes, w->fp) != nbytes)
        return tp_fail_sys(err, TP_EIO, errno, "%s: write failed", w->tmp);
    w->written += nbytes;
    return TP_OK;
}

int tp_st_writer_close(tp_st_writer *w, tp_err *err) {
    int rc = TP_OK;
    if (w->written != w->expected) {
        rc = tp_fail(err, TP_EINVAL, "%s: only %llu of %llu data bytes were written", w->path,
                     (unsigned long long)w->written, (unsigned long long)w->expected);
        tp_st_writer_abort(w);
        return rc;
    }
    FILE *fp = w->fp;
    w->fp = NULL;
    if ((rc = tp_fclose_synced(fp, w->tmp, err)) != TP_OK || (rc = tp_rename_synced(w->tmp, w->path, err)) != TP_OK) {
        unlink(w->tmp);
        free(w->tmp);
        free(w->path);
        free(w);
        return rc;
    }
    free(w->tmp);
    free(w->path);
    free(w);
    return TP_OK;
}

void tp_st_writer_abort(tp_st_writer *w) {
    if (!w) return;
    if (w->fp) fclose(w->fp);
    if (w->tmp) unlink(w->tmp);
    free(w->tmp);
    free(w->path);
    free(w);
}

int tp_st_write(const char *path, const tp_st_spec *specs, const void *const *data, size_t n, const tp_kv *meta,
                size_t nmeta, tp_err *err) {
    tp_st_writer *w;
    int rc = tp_st_writer_open(path, specs, n, meta, nmeta, &w, err);
    if (rc != TP_OK) return rc;
    for (size_t i = 0; i < n; i++) {
        uint64_t nb = 0;
        tp_st_spec_nbytes(&specs[i], &nb); /* validated by writer_open */
        if ((rc = tp_st_writer_write(w, data[i], (size_t)nb, err)) != TP_OK) {
            tp_st_writer_abort(w);
            return rc;
        }
    }
    return tp_st_writer_close(w, err);
}
