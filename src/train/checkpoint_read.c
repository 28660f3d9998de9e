/* checkpoint_read.c - verifying, finding and loading run checkpoints
 * (checkpoint.h; writing: checkpoint.c).
 *
 * Reading: tp_ckpt_verify checks MANIFEST (present, well formed, lists every
 * required file) and every listed file's size and checksum. find_latest tries
 * LATEST, then the step-* directories newest first (.tmp-* and .old-* are
 * never considered). On TP_OK from find_latest err->msg is empty unless a
 * newer candidate was rejected, in which case it says which and why (the
 * caller should log it as a warning). tp_ckpt_load verifies, checks every
 * tensor against the decoder's parameter table before touching theta, m or v
 * (a failed load leaves them unchanged); m and v may be NULL (moments not
 * wanted, e.g. for export), and so may state_json. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "train/checkpoint_impl.h"
#include "util/fsutil.h"

static const tp_tensor_view *st_find(const tp_st_file *f, const char *name) { return f ? tp_st_find(f, name) : NULL; }
static size_t st_count(const tp_st_file *f) { return f ? tp_st_count(f) : 0; }

/* ---- MANIFEST ------------------------------------------------------------- */

typedef struct mline {
    uint64_t size, hash;
    char name[128];
} mline;

static int valid_file_name(const char *s, size_t len) {
    if (len == 0 || len >= sizeof((mline *)0)->name) return 0;
    if ((len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.')) return 0;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == '/' || s[i] == 0x7f) return 0;
    return 1;
}

/* Parse MANIFEST text. err names the line; no directory prefix. */
static int parse_manifest(const char *text, size_t len, mline **out, size_t *n, tp_err *err) {
    *out = NULL;
    *n = 0;
    size_t cap = 0, lineno = 0;
    const char *p = text, *end = text + len;
    while (p < end) {
        lineno++;
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) { free(*out); *out = NULL; return tp_fail(err, TP_EFORMAT, "MANIFEST line %zu: not terminated (truncated file?)", lineno); }
        const char *sp1 = memchr(p, ' ', (size_t)(nl - p));
        long long size;
        const char *hx = sp1 ? sp1 + 1 : NULL;
        int ok = sp1 && tp_ck_parse_digits(p, (size_t)(sp1 - p), &size) == 0 && nl - hx > 17 && hx[16] == ' ';
        uint64_t h = 0;
        for (int i = 0; ok && i < 16; i++) {
            char c = hx[i];
            int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
            if (v < 0) ok = 0;
            else h = (h << 4) | (uint64_t)v;
        }
        const char *nm = ok ? hx + 17 : NULL;
        if (ok && !valid_file_name(nm, (size_t)(nl - nm))) ok = 0;
        if (!ok) {
            free(*out);
            *out = NULL;
            return tp_fail(err, TP_EFORMAT, "MANIFEST line %zu: expected '<size> <16 hex digits> <file name>'", lineno);
        }
        for (size_t i = 0; i < *n; i++)
            if (strlen((*out)[i].name) == (size_t)(nl - nm) && !memcmp((*out)[i].name, nm, (size_t)(nl - nm))) {
                int rc = tp_fail(err, TP_EFORMAT, "MANIFEST line %zu: %s listed twice", lineno, (*out)[i].name);
                free(*out);
                *out = NULL;
                return rc;
            }
        if (*n == cap) {
            size_t nc = cap ? 2 * cap : 8;
            mline *q = realloc(*out, nc * sizeof *q);
            if (!q) { free(*out); *out = NULL; return tp_fail(err, TP_ENOMEM, "out of memory"); }
            *out = q;
            cap = nc;
        }
        mline *m = &(*out)[(*n)++];
        m->size = (uint64_t)size;
        m->hash = h;
        memcpy(m->name, nm, (size_t)(nl - nm));
        m->name[nl - nm] = 0;
        p = nl + 1;
    }
    if (*n == 0) return tp_fail(err, TP_EFORMAT, "MANIFEST lists no files");
    return TP_OK;
}

/* Verify without naming the directory (callers prefix it). */
int tp_ck_verify(const char *ckpt_dir, tp_err *err) {
    char *mpath = tp_path_join(ckpt_dir, MANIFEST_NAME, err);
    if (!mpath) return TP_ENOMEM;
    struct stat st;
    if (stat(ckpt_dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        free(mpath);
        return tp_fail(err, TP_EIO, "not a directory");
    }
    if (stat(mpath, &st) != 0) {
        int e = errno;
        free(mpath);
        return e == ENOENT ? tp_fail(err, TP_EFORMAT, "MANIFEST missing (incomplete checkpoint)")
                           : tp_fail_sys(err, TP_EIO, e, "MANIFEST");
    }
    char *text;
    size_t len;
    tp_err e2 = {0};
    int rc = tp_read_file(mpath, MANIFEST_LIMIT, &text, &len, &e2);
    free(mpath);
    if (rc) return tp_fail(err, rc, "MANIFEST unreadable: %s", e2.msg);
    mline *lines;
    size_t n;
    rc = parse_manifest(text, len, &lines, &n, err);
    free(text);
    if (rc) return rc;
    int listed[NREQUIRED];
    for (size_t r = 0; r < NREQUIRED && rc == TP_OK; r++) {
        size_t i = 0;
        while (i < n && strcmp(lines[i].name, tp_ck_required_files[r])) i++;
        listed[r] = i < n;
        if (i == n && r >= NADAPTER) rc = tp_fail(err, TP_EFORMAT, "MANIFEST does not list %s", tp_ck_required_files[r]);
    }
    /* the PEFT adapter: both files (trainable: lora) or neither */
    if (rc == TP_OK && listed[0] != listed[1])
        rc = tp_fail(err, TP_EFORMAT, "MANIFEST lists %s but not %s (the adapter is both files or neither)",
                     tp_ck_required_files[listed[0] ? 0 : 1], tp_ck_required_files[listed[0] ? 1 : 0]);
    for (size_t i = 0; i < n && rc == TP_OK; i++) {
        char *path = tp_path_join(ckpt_dir, lines[i].name, err);
        if (!path) { rc = TP_ENOMEM; break; }
        uint64_t size, hash;
        rc = tp_ck_hash_file(path, &size, &hash, err);
        free(path);
        if (rc) {
            tp_err_prefix(err, "%s", lines[i].name);
            break;
        }
        if (size != lines[i].size)
            rc = tp_fail(err, TP_EFORMAT, "%s: %" PRIu64 " bytes, MANIFEST says %" PRIu64, lines[i].name, size,
                         lines[i].size);
        else if (hash != lines[i].hash)
            rc = tp_fail(err, TP_EFORMAT, "%s: checksum %016" PRIx64 ", MANIFEST says %016" PRIx64, lines[i].name,
                         hash, lines[i].hash);
    }
    free(lines);
    return rc;
}

int tp_ckpt_verify(const char *ckpt_dir, tp_err *err) {
    int rc = tp_ck_verify(ckpt_dir, err);
    if (rc) tp_err_prefix(err, "checkpoint %s", ckpt_dir);
    else tp_ck_clear_err(err);
    return rc;
}

/* ---- find ----------------------------------------------------------------- */

int tp_ckpt_find_latest(const char *run_dir, char *out, size_t n, tp_err *err) {
    if (n) out[0] = 0;
    char *ckdir = tp_path_join(run_dir, CKPT_DIR, err);
    if (!ckdir) return TP_ENOMEM;
    struct stat st;
    if (stat(ckdir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        int rc = tp_fail(err, TP_EIO, "no checkpoint in %s: directory does not exist", ckdir);
        free(ckdir);
        return rc;
    }
    tp_strbuf why; /* "; name: reason" per rejected candidate */
    tp_strbuf_init(&why);
    char found[64] = "", tried[64] = "";
    tp_err e2 = {0};
    /* 1. LATEST */
    char *lpath = tp_path_join(ckdir, LATEST_NAME, err);
    char *text = NULL;
    size_t len = 0;
    if (!lpath) { free(ckdir); return TP_ENOMEM; }
    if (!tp_exists(lpath)) {
        tp_strbuf_puts(&why, "; LATEST missing");
    } else if (tp_read_file(lpath, 4096, &text, &len, &e2) != TP_OK) {
        tp_strbuf_printf(&why, "; LATEST unreadable: %s", e2.msg);
    } else {
        while (len && (text[len - 1] == '\n' || text[len - 1] == '\r' || text[len - 1] == ' ')) text[--len] = 0;
        long long s;
        if (strlen(text) != len || len >= sizeof tried || tp_ck_parse_step_name(text, &s) != 0) {
            tp_strbuf_puts(&why, "; LATEST does not name a step-* directory");
        } else {
            snprintf(tried, sizeof tried, "%s", text);
            char *dir = tp_path_join(ckdir, tried, &e2);
            if (dir && tp_ck_verify(dir, &e2) == TP_OK) snprintf(found, sizeof found, "%s", tried);
            else tp_strbuf_printf(&why, "; LATEST -> %s: %s", tried, dir ? e2.msg : "out of memory");
            free(dir);
        }
    }
    free(text);
    free(lpath);
    /* 2. scan, newest first */
    int rc = TP_OK;
    if (!found[0]) {
        tp_ck_entry *steps;
        size_t ns;
        rc = tp_ck_list_steps(ckdir, &steps, &ns, err);
        for (size_t i = 0; rc == TP_OK && i < ns && !found[0]; i++) {
            if (!strcmp(steps[i].name, tried)) continue;
            char *dir = tp_path_join(ckdir, steps[i].name, &e2);
            if (dir && tp_ck_verify(dir, &e2) == TP_OK) snprintf(found, sizeof found, "%s", steps[i].name);
            else tp_strbuf_printf(&why, "; %s: %s", steps[i].name, dir ? e2.msg : "out of memory");
            free(dir);
        }
        if (rc == TP_OK && ns == 0 && !tried[0]) tp_strbuf_puts(&why, "; no step-* directories");
        free(steps);
    }
    if (rc == TP_OK) {
        tp_strbuf msg;
        tp_strbuf_init(&msg);
        const char *w = why.len && !why.oom ? why.buf + 2 : "";
        if (!found[0]) {
            tp_strbuf_printf(&msg, "no valid checkpoint in %s: %s", ckdir, w);
            rc = tp_ck_set_msg(err, TP_EIO, msg.oom ? "no valid checkpoint" : msg.buf);
        } else {
            size_t need = strlen(ckdir) + 1 + strlen(found) + 1;
            if (need > n) {
                rc = tp_fail(err, TP_EINVAL, "checkpoint path %s/%s does not fit in %zu bytes", ckdir, found, n);
            } else {
                snprintf(out, n, "%s/%s", ckdir, found);
                tp_ck_clear_err(err);
                if (why.len) {
                    tp_strbuf_printf(&msg, "%s: using %s; rejected: %s", ckdir, found, w);
                    tp_ck_set_msg(err, TP_OK, msg.oom ? "some newer checkpoints were rejected" : msg.buf);
                }
            }
        }
        tp_strbuf_free(&msg);
    }
    tp_strbuf_free(&why);
    free(ckdir);
    return rc;
}

/* ---- load ----------------------------------------------------------------- */

static void fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int d = 0; d < ndim && k < n; d++) k += (size_t)snprintf(buf + k, n - k, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

/* Tensor matches the parameter (F32, same shape)? */
static int check_tensor(const char *dir, const char *file, const tp_tensor_view *v, const tp_param *p, const char *name,
                        tp_err *err) {
    if (v->dtype != TP_F32)
        return tp_fail(err, TP_EFORMAT, "checkpoint %s: %s: tensor %s is %s, expected F32", dir, file, name,
                       tp_dtype_name(v->dtype));
    int same = v->ndim == p->ndim;
    for (int d = 0; same && d < p->ndim; d++) same = v->shape[d] == p->shape[d];
    if (!same) {
        char a[128], b[128];
        fmt_shape(a, sizeof a, v->ndim, v->shape);
        fmt_shape(b, sizeof b, p->ndim, p->shape);
        return tp_fail(err, TP_EFORMAT, "checkpoint %s: %s: parameter %s has shape %s, the model expects %s", dir, file,
                       name, a, b);
    }
    return TP_OK;
}

static int open_st(const char *dir, const char *file, tp_st_file **f, tp_err *err) {
    char *path = tp_path_join(dir, file, err);
    if (!path) return TP_ENOMEM;
    int rc = tp_st_open(path, f, err);
    free(path);
    return rc;
}

/* Is nm "<param name><suffix>" for a parameter of m and one of the suffixes? */
static int claimed(const char *nm, const tp_decoder *m, const char *const *suffixes, int nsuf) {
    size_t np = tp_decoder_nparams(m), ln = strlen(nm);
    for (size_t j = 0; j < np; j++) {
        const char *pn = tp_decoder_param(m, j)->name;
        size_t lp = strlen(pn);
        if (ln < lp || strncmp(nm, pn, lp)) continue;
        for (int k = 0; k < nsuf; k++)
            if (!strcmp(nm + lp, suffixes[k])) return 1;
    }
    return 0;
}

/* Name of a tensor in f that no parameter claims (for the error). */
static const char *extra_tensor(const tp_st_file *f, const tp_decoder *m, const char *const *suffixes, int nsuf) {
    for (size_t i = 0; i < tp_st_count(f); i++)
        if (!claimed(tp_st_at(f, i)->name, m, suffixes, nsuf)) return tp_st_at(f, i)->name;
    return NULL;
}

int tp_ckpt_load(const char *ckpt_dir, tp_decoder *m, float *adam_m, float *adam_v, char **state_json,
                 tp_err *err) {
    if (state_json) *state_json = NULL;
    int rc = tp_ckpt_verify(ckpt_dir, err);
    if (rc) return rc;
    tp_st_file *ad = NULL, *lz = NULL, *op = NULL;
    const tp_tensor_view **src = NULL;
    char *state = NULL;
    size_t np = tp_decoder_nparams(m);
    char *adp = tp_path_join(ckpt_dir, "adapter_model.safetensors", err);
    if (!adp) return TP_ENOMEM;
    int with_adapter = tp_exists(adp); /* verified: listed in MANIFEST exactly when present */
    free(adp);
    if ((with_adapter && (rc = open_st(ckpt_dir, "adapter_model.safetensors", &ad, err))) ||
        (rc = open_st(ckpt_dir, "liza_model.safetensors", &lz, err)) ||
        (rc = open_st(ckpt_dir, "optimizer.safetensors", &op, err)))
        goto done;
    src = tp_calloc(3 * np + 1, sizeof *src, err);
    if (!src) { rc = TP_ENOMEM; goto done; }
    /* pass 1: check everything */
    for (size_t i = 0; i < np && rc == TP_OK; i++) {
        const tp_param *p = tp_decoder_param(m, i);
        const tp_tensor_view *va = st_find(ad, p->name), *vl = st_find(lz, p->name);
        if (va && vl) {
            rc = tp_fail(err, TP_EFORMAT,
                         "checkpoint %s: parameter %s is in both adapter_model.safetensors and liza_model.safetensors",
                         ckpt_dir, p->name);
        } else if (!va && !vl) {
            rc = tp_fail(err, TP_EFORMAT,
                         "checkpoint %s: parameter %s of the model is in neither adapter_model.safetensors nor "
                         "liza_model.safetensors (different LoRA targets / MaG settings?)",
                         ckpt_dir, p->name);
        } else {
            rc = check_tensor(ckpt_dir, va ? "adapter_model.safetensors" : "liza_model.safetensors", va ? va : vl, p,
                              p->name, err);
        }
        src[3 * i] = va ? va : vl;
        char nm[MOMENT_NAME_MAX];
        for (int k = 0; k < 2 && rc == TP_OK; k++) {
            snprintf(nm, sizeof nm, "%s%s", p->name, k ? ".exp_avg_sq" : ".exp_avg");
            const tp_tensor_view *vo = tp_st_find(op, nm);
            if (!vo)
                rc = tp_fail(err, TP_EFORMAT, "checkpoint %s: optimizer.safetensors: %s missing", ckpt_dir, nm);
            else
                rc = check_tensor(ckpt_dir, "optimizer.safetensors", vo, p, nm, err);
            src[3 * i + 1 + k] = vo;
        }
    }
    /* values: a NaN/Inf weight or moment, or a negative second moment, would
     * turn the resumed run into NaN at its first step */
    for (size_t i = 0; i < np && rc == TP_OK; i++) {
        const tp_param *p = tp_decoder_param(m, i);
        for (int k = 0; k < 3 && rc == TP_OK; k++) {
            const float *x = (const float *)src[3 * i + k]->data;
            for (size_t e = 0; e < p->numel; e++) {
                float v;
                memcpy(&v, x + e, sizeof v);
                if (isfinite(v) && !(k == 2 && v < 0)) continue;
                char nm[MOMENT_NAME_MAX];
                snprintf(nm, sizeof nm, "%s%s", p->name, k == 0 ? "" : k == 1 ? ".exp_avg" : ".exp_avg_sq");
                const char *f = k ? "optimizer.safetensors"
                                  : st_find(ad, p->name) ? "adapter_model.safetensors" : "liza_model.safetensors";
                rc = tp_fail(err, TP_EFORMAT, "checkpoint %s: %s: tensor %s element %zu is %s, expected %s", ckpt_dir,
                             f, nm, e, isnan(v) ? "NaN" : isinf(v) ? (v > 0 ? "+Inf" : "-Inf") : "negative",
                             k == 2 ? "a finite value >= 0 (second moment)" : "a finite value");
                break;
            }
        }
    }
    static const char *const plain[] = {""}, *const moments[] = {".exp_avg", ".exp_avg_sq"};
    if (rc == TP_OK && st_count(ad) + tp_st_count(lz) != np) {
        const char *x = ad ? extra_tensor(ad, m, plain, 1) : NULL;
        const char *f = "adapter_model.safetensors";
        if (!x) { x = extra_tensor(lz, m, plain, 1); f = "liza_model.safetensors"; }
        rc = tp_fail(err, TP_EFORMAT, "checkpoint %s: %s: tensor %s is not a parameter of the model", ckpt_dir, f,
                     x ? x : "?");
    }
    if (rc == TP_OK && tp_st_count(op) != 2 * np) {
        const char *x = extra_tensor(op, m, moments, 2);
        rc = tp_fail(err, TP_EFORMAT, "checkpoint %s: optimizer.safetensors: tensor %s is not a moment of a model parameter",
                     ckpt_dir, x ? x : "?");
    }
    if (rc == TP_OK && state_json) {
        char *path = tp_path_join(ckpt_dir, "trainer_state.json", err);
        if (!path) rc = TP_ENOMEM;
        else rc = tp_read_file(path, STATE_LIMIT, &state, NULL, err);
        free(path);
    }
    if (rc) goto done;
    /* pass 2: copy */
    float *theta = tp_decoder_theta(m);
    for (size_t i = 0; i < np; i++) {
        const tp_param *p = tp_decoder_param(m, i);
        size_t nb = p->numel * sizeof(float);
        if (!nb) continue;
        memcpy(theta + p->offset, src[3 * i]->data, nb);
        if (adam_m) memcpy(adam_m + p->offset, src[3 * i + 1]->data, nb);
        if (adam_v) memcpy(adam_v + p->offset, src[3 * i + 2]->data, nb);
    }
    if (state_json) {
        *state_json = state;
        state = NULL;
    }
    tp_ck_clear_err(err);
done:
    free(state);
    free(src);
    tp_st_close(ad);
    tp_st_close(lz);
    tp_st_close(op);
    return rc;
}

/* ---- for the trainer's resume decision --------------------------------- */

int tp_ckpt_has_candidates(const char *run_dir) {
    char *ckdir = tp_path_join(run_dir, CKPT_DIR, NULL);
    if (!ckdir) return 1; /* be careful: treat as "something is there" */
    char *lpath = tp_path_join(ckdir, LATEST_NAME, NULL);
    int any = lpath && tp_exists(lpath);
    free(lpath);
    tp_ck_entry *steps = NULL;
    size_t n = 0;
    if (!any && tp_exists(ckdir)) {
        tp_err e2 = {0};
        if (tp_ck_list_steps(ckdir, &steps, &n, &e2) != TP_OK) any = 1;
        else any = n > 0;
        free(steps);
    }
    free(ckdir);
    return any;
}

