/* checkpoint.c - run checkpoints (checkpoint.h, FORMATS.md "Run directory").
 *
 * Write protocol (tp_ckpt_write):
 *   1. checkpoints/.tmp-step-XXXXXXXX-<pid>/ (a stale one of that name is
 *      removed first) receives every file; each is fsync'ed (the safetensors
 *      writer goes through its own temp name inside that directory).
 *   2. MANIFEST ("<size> <xxh64, 16 lowercase hex> <name>\n" per file, sorted
 *      by name, seed 0) is computed by reading the files back, written last,
 *      fsync'ed; then the temp directory is fsync'ed.
 *   3. The directory is renamed to step-XXXXXXXX and checkpoints/ fsync'ed. If
 *      that name already exists (a rerun after resuming from an older step),
 *      the two are swapped atomically with renameat2(RENAME_EXCHANGE) and the
 *      old one deleted; where the file system cannot exchange, the old one is
 *      renamed to .old-step-XXXXXXXX-<pid> first (a crash in that window leaves
 *      LATEST naming a missing directory, which find_latest handles by falling
 *      back to the scan).
 *   4. LATEST is replaced by tp_write_file_atomic ("step-XXXXXXXX\n").
 *   5. Cleanup, best effort (a failure there does not fail the call; the
 *      checkpoint is already durable; err->msg then holds a warning while the
 *      call returns TP_OK):
 *      - retention: among step-* directories with a step <= the one just
 *        written, the newest `keep` are kept and the others deleted, oldest
 *        first. keep < 1 keeps everything. Directories with a larger step (an
 *        abandoned timeline after resuming from an older checkpoint) are left
 *        alone: they are replaced as training reaches those steps again.
 *      - leftovers of crashed writers: .tmp-step-*-<pid> and .old-step-*-<pid>
 *        directories whose step is <= the one just written (whatever the pid:
 *        pids repeat across containers and nodes, and one trainer writes a run
 *        directory at a time), and LATEST.tmp.* files. A leftover with a larger
 *        step is removed once training passes that step.
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
#include "train/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "io/safetensors.h"
#include "util/fsutil.h"

#define CKPT_DIR "checkpoints"
#define LATEST_NAME "LATEST"
#define MANIFEST_NAME "MANIFEST"
#define MANIFEST_LIMIT (1u << 20)
#define STATE_LIMIT ((size_t)256 << 20)

/* Every file a checkpoint can hold, sorted; the first two (the PEFT adapter)
 * only when the model has LoRA parameters (trainable: lora), and then both. */
static const char *const required_files[] = {
    "adapter_config.json",    "adapter_model.safetensors", "config.json",
    "liza_model.safetensors", "optimizer.safetensors",     "trainer_state.json",
};
#define NREQUIRED (sizeof required_files / sizeof *required_files)
#define NADAPTER 2 /* required_files[0..NADAPTER) */

static int has_lora(const tp_decoder *m) {
    for (size_t i = 0; i < tp_decoder_nparams(m); i++)
        if (tp_decoder_param(m, i)->is_lora) return 1;
    return 0;
}

static const tp_tensor_view *st_find(const tp_st_file *f, const char *name) { return f ? tp_st_find(f, name) : NULL; }
static size_t st_count(const tp_st_file *f) { return f ? tp_st_count(f) : 0; }

/* ---- small helpers ------------------------------------------------------ */

static void clear_err(tp_err *err) {
    if (err) {
        err->code = TP_OK;
        err->msg[0] = 0;
    }
}

/* Set err to text (one line; "..." marks a truncation). */
static int set_msg(tp_err *err, int code, const char *text) {
    if (!err) return code;
    size_t n = strlen(text);
    if (n < sizeof err->msg) {
        memcpy(err->msg, text, n + 1);
    } else {
        memcpy(err->msg, text, sizeof err->msg - 4);
        memcpy(err->msg + sizeof err->msg - 4, "...", 4);
    }
    err->code = code;
    return code;
}

/* "<digits>" -> value; the whole string must be 1..18 digits. */
static int parse_digits(const char *s, size_t len, long long *out) {
    if (len == 0 || len > 18) return -1;
    long long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

/* "step-<digits>" -> step. */
static int parse_step_name(const char *name, long long *step) {
    if (strncmp(name, "step-", 5)) return -1;
    return parse_digits(name + 5, strlen(name + 5), step);
}

/* "<prefix><digits>-<digits>" (prefix ".tmp-step-" or ".old-step-") -> step. */
static int parse_leftover_name(const char *name, const char *prefix, long long *step) {
    size_t lp = strlen(prefix);
    if (strncmp(name, prefix, lp)) return -1;
    const char *s = name + lp, *dash = strchr(s, '-');
    long long pid;
    if (!dash || parse_digits(s, (size_t)(dash - s), step) || parse_digits(dash + 1, strlen(dash + 1), &pid))
        return -1;
    return 0;
}

/* Remove a file or a directory tree (symlinks are removed, not followed). */
static int rm_tree(const char *path, tp_err *err) {
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT) return TP_OK;
        return tp_fail(err, TP_EIO, "%s: cannot stat: %s", path, strerror(errno));
    }
    if (!S_ISDIR(st.st_mode)) {
        if (unlink(path) != 0 && errno != ENOENT)
            return tp_fail(err, TP_EIO, "%s: cannot remove: %s", path, strerror(errno));
        return TP_OK;
    }
    DIR *d = opendir(path);
    if (!d) return tp_fail(err, TP_EIO, "%s: cannot open directory: %s", path, strerror(errno));
    int rc = TP_OK;
    struct dirent *e;
    while (rc == TP_OK && (e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *sub = tp_path_join(path, e->d_name, err);
        if (!sub) { rc = TP_ENOMEM; break; }
        rc = rm_tree(sub, err);
        free(sub);
    }
    closedir(d);
    if (rc == TP_OK && rmdir(path) != 0 && errno != ENOENT)
        rc = tp_fail(err, TP_EIO, "%s: cannot remove directory: %s", path, strerror(errno));
    return rc;
}

/* XXH64 (seed 0) and size of a regular file, read in 1 MiB blocks. */
static int hash_file(const char *path, uint64_t *size, uint64_t *hash, tp_err *err) {
    tp_err e2 = {0};
    int fd = tp_open_regular(path, NULL, &e2);
    if (fd < 0) { /* e2 names the path; the caller prefixes the file name */
        const char *colon = strstr(e2.msg, ": ");
        return tp_fail(err, fd, "%s", colon ? colon + 2 : e2.msg);
    }
    size_t bufsz = 1u << 20;
    unsigned char *buf = malloc(bufsz);
    XXH64_state_t *xs = XXH64_createState();
    if (!buf || !xs) {
        free(buf);
        if (xs) XXH64_freeState(xs);
        close(fd);
        return tp_fail(err, TP_ENOMEM, "out of memory");
    }
    XXH64_reset(xs, 0);
    uint64_t total = 0;
    int rc = TP_OK;
    for (;;) {
        ssize_t got = read(fd, buf, bufsz);
        if (got < 0) {
            if (errno == EINTR) continue;
            rc = tp_fail(err, TP_EIO, "read failed: %s", strerror(errno));
            break;
        }
        if (got == 0) break;
        XXH64_update(xs, buf, (size_t)got);
        total += (uint64_t)got;
    }
    if (rc == TP_OK) {
        *size = total;
        *hash = (uint64_t)XXH64_digest(xs);
    }
    XXH64_freeState(xs);
    free(buf);
    close(fd);
    return rc;
}

/* Create <dir>/<name> holding text, fsync'ed (dir is a private temp dir). */
static int write_text(const char *dir, const char *name, const char *text, tp_err *err) {
    char *path = tp_path_join(dir, name, err);
    if (!path) return TP_ENOMEM;
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        int rc = tp_fail(err, TP_EIO, "%s: cannot create: %s", path, strerror(errno));
        free(path);
        return rc;
    }
    size_t n = strlen(text);
    int rc = TP_OK;
    if (n && fwrite(text, 1, n, fp) != n) {
        rc = tp_fail(err, TP_EIO, "%s: write failed: %s", path, strerror(errno));
        fclose(fp);
    } else {
        rc = tp_fclose_synced(fp, path, err);
    }
    free(path);
    return rc;
}

/* ---- directory listing ---------------------------------------------------- */

typedef struct entry {
    long long step;
    char name[64];
} entry;

static int cmp_entry_desc(const void *a, const void *b) {
    const entry *x = a, *y = b;
    if (x->step != y->step) return x->step < y->step ? 1 : -1;
    return strcmp(x->name, y->name);
}

/* step-* directory entries of ckdir, newest first. *out NULL when none. */
static int list_steps(const char *ckdir, entry **out, size_t *n, tp_err *err) {
    *out = NULL;
    *n = 0;
    DIR *d = opendir(ckdir);
    if (!d) return tp_fail(err, TP_EIO, "%s: cannot open directory: %s", ckdir, strerror(errno));
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long long step;
        if (parse_step_name(e->d_name, &step) || strlen(e->d_name) >= sizeof((entry *)0)->name) continue;
        if (*n == cap) {
            size_t nc = cap ? 2 * cap : 16;
            entry *p = realloc(*out, nc * sizeof *p);
            if (!p) {
                closedir(d);
                free(*out);
                *out = NULL;
                return tp_fail(err, TP_ENOMEM, "out of memory listing %s", ckdir);
            }
            *out = p;
            cap = nc;
        }
        (*out)[*n].step = step;
        snprintf((*out)[*n].name, sizeof(*out)[*n].name, "%s", e->d_name);
        (*n)++;
    }
    closedir(d);
    if (*n) qsort(*out, *n, sizeof **out, cmp_entry_desc);
    return TP_OK;
}

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
        int ok = sp1 && parse_digits(p, (size_t)(sp1 - p), &size) == 0 && nl - hx > 17 && hx[16] == ' ';
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
static int verify_impl(const char *ckpt_dir, tp_err *err) {
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
                           : tp_fail(err, TP_EIO, "MANIFEST: %s", strerror(e));
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
        while (i < n && strcmp(lines[i].name, required_files[r])) i++;
        listed[r] = i < n;
        if (i == n && r >= NADAPTER) rc = tp_fail(err, TP_EFORMAT, "MANIFEST does not list %s", required_files[r]);
    }
    /* the PEFT adapter: both files (trainable: lora) or neither */
    if (rc == TP_OK && listed[0] != listed[1])
        rc = tp_fail(err, TP_EFORMAT, "MANIFEST lists %s but not %s (the adapter is both files or neither)",
                     required_files[listed[0] ? 0 : 1], required_files[listed[0] ? 1 : 0]);
    for (size_t i = 0; i < n && rc == TP_OK; i++) {
        char *path = tp_path_join(ckpt_dir, lines[i].name, err);
        if (!path) { rc = TP_ENOMEM; break; }
        uint64_t size, hash;
        rc = hash_file(path, &size, &hash, err);
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
    int rc = verify_impl(ckpt_dir, err);
    if (rc) tp_err_prefix(err, "checkpoint %s", ckpt_dir);
    else clear_err(err);
    return rc;
}

/* ---- write ---------------------------------------------------------------- */

static int write_tensors(const char *dir, const char *file, const tp_st_spec *specs, const void *const *data, size_t n,
                         tp_err *err) {
    char *path = tp_path_join(dir, file, err);
    if (!path) return TP_ENOMEM;
    tp_kv meta = {"format", "pt"};
    int rc = tp_st_write(path, specs, data, n, &meta, 1, err);
    free(path);
    return rc;
}

static tp_st_spec param_spec(const tp_param *p, const char *name) {
    tp_st_spec s;
    memset(&s, 0, sizeof s);
    s.name = name;
    s.dtype = TP_F32;
    s.ndim = p->ndim;
    for (int d = 0; d < p->ndim && d < 2; d++) s.shape[d] = p->shape[d];
    return s;
}

#define MOMENT_NAME_MAX (TP_PARAM_NAME_MAX + 16)

/* Every file but MANIFEST into tmp. */
static int write_files(const char *tmp, const tp_decoder *m, const float *adam_m, const float *adam_v,
                       const tp_ckpt_info *info, tp_err *err) {
    size_t np = tp_decoder_nparams(m);
    const float *theta = tp_decoder_theta((tp_decoder *)m);
    tp_st_spec *specs = tp_calloc(2 * np + 1, sizeof *specs, err);
    const void **data = tp_calloc(2 * np + 1, sizeof *data, err);
    char(*names)[MOMENT_NAME_MAX] = tp_calloc(2 * np + 1, sizeof *names, err);
    int rc = TP_OK;
    if (!specs || !data || !names) rc = TP_ENOMEM;
    int adapter = has_lora(m);
    for (int lora = adapter; lora >= 0 && rc == TP_OK; lora--) {
        size_t k = 0;
        for (size_t i = 0; i < np; i++) {
            const tp_param *p = tp_decoder_param(m, i);
            if (!p->is_lora != !lora) continue;
            specs[k] = param_spec(p, p->name);
            data[k++] = theta + p->offset;
        }
        rc = write_tensors(tmp, lora ? "adapter_model.safetensors" : "liza_model.safetensors", specs, data, k, err);
    }
    if (rc == TP_OK) {
        for (size_t i = 0; i < np; i++) {
            const tp_param *p = tp_decoder_param(m, i);
            snprintf(names[2 * i], MOMENT_NAME_MAX, "%s.exp_avg", p->name);
            snprintf(names[2 * i + 1], MOMENT_NAME_MAX, "%s.exp_avg_sq", p->name);
            specs[2 * i] = param_spec(p, names[2 * i]);
            specs[2 * i + 1] = param_spec(p, names[2 * i + 1]);
            data[2 * i] = adam_m + p->offset;
            data[2 * i + 1] = adam_v + p->offset;
        }
        rc = write_tensors(tmp, "optimizer.safetensors", specs, data, 2 * np, err);
    }
    free(specs);
    free(data);
    free(names);
    if (rc == TP_OK && adapter) rc = write_text(tmp, "adapter_config.json", info->adapter_config_json, err);
    if (rc == TP_OK) rc = write_text(tmp, "config.json", info->config_json, err);
    if (rc == TP_OK) rc = write_text(tmp, "trainer_state.json", info->state_json, err);
    return rc;
}

static int write_manifest(const char *tmp, int adapter, tp_err *err) {
    tp_strbuf s;
    tp_strbuf_init(&s);
    int rc = TP_OK;
    for (size_t i = adapter ? 0 : NADAPTER; i < NREQUIRED && rc == TP_OK; i++) { /* required_files is sorted */
        char *path = tp_path_join(tmp, required_files[i], err);
        if (!path) { rc = TP_ENOMEM; break; }
        uint64_t size, hash;
        rc = hash_file(path, &size, &hash, err);
        if (rc) tp_err_prefix(err, "%s", path);
        free(path);
        tp_strbuf_printf(&s, "%" PRIu64 " %016" PRIx64 " %s\n", size, hash, required_files[i]);
    }
    if (rc == TP_OK && s.oom) rc = tp_fail(err, TP_ENOMEM, "out of memory building MANIFEST");
    if (rc == TP_OK) rc = write_text(tmp, MANIFEST_NAME, s.buf, err);
    tp_strbuf_free(&s);
    return rc;
}

/* Move the finished temp dir to final (replacing an existing one). */
static int install(const char *ckdir, const char *tmp, const char *final, long long step, tp_err *err) {
    struct stat st;
    if (lstat(final, &st) != 0) {
        if (rename(tmp, final) != 0)
            return tp_fail(err, TP_EIO, "cannot rename %s to %s: %s", tmp, final, strerror(errno));
        return tp_fsync_dir(ckdir, err);
    }
    /* an existing directory that does not verify is not ours to delete (a
     * damaged checkpoint someone may want to inspect or repair): it is kept
     * under rejected-step-XXXXXXXX-<time> (never scanned, never cleaned) */
    tp_err ev = {0};
    if (verify_impl(final, &ev) != TP_OK) {
        char keep[128];
        char *kp = NULL;
        for (int k = 0; k < 1000; k++) {
            snprintf(keep, sizeof keep, "rejected-step-%08lld-%lld-%d", step, (long long)time(NULL), k);
            free(kp);
            if (!(kp = tp_path_join(ckdir, keep, err))) return TP_ENOMEM;
            struct stat ks;
            if (lstat(kp, &ks) != 0) break;
        }
        int rc = TP_OK;
        if (rename(final, kp) != 0)
            rc = tp_fail(err, TP_EIO, "cannot move the damaged %s aside to %s: %s", final, kp, strerror(errno));
        else
            fprintf(stderr, "tptt: warning: %s did not verify (%s); kept as %s\n", final, ev.msg, kp);
        free(kp);
        if (rc == TP_OK && rename(tmp, final) != 0)
            rc = tp_fail(err, TP_EIO, "cannot rename %s to %s: %s", tmp, final, strerror(errno));
        return rc == TP_OK ? tp_fsync_dir(ckdir, err) : rc;
    }
    /* replace: swap atomically where possible; tmp then holds the old one */
    if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final, RENAME_EXCHANGE) == 0) {
        int rc = tp_fsync_dir(ckdir, err);
        if (rc == TP_OK) rm_tree(tmp, NULL);
        return rc;
    }
    if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
        return tp_fail(err, TP_EIO, "cannot exchange %s and %s: %s", tmp, final, strerror(errno));
    char name[64];
    snprintf(name, sizeof name, ".old-step-%08lld-%ld", step, (long)getpid());
    char *old = tp_path_join(ckdir, name, err);
    if (!old) return TP_ENOMEM;
    int rc = rm_tree(old, err);
    if (rc == TP_OK && rename(final, old) != 0)
        rc = tp_fail(err, TP_EIO, "cannot rename %s to %s: %s", final, old, strerror(errno));
    if (rc == TP_OK && rename(tmp, final) != 0) {
        rc = tp_fail(err, TP_EIO, "cannot rename %s to %s: %s", tmp, final, strerror(errno));
        if (rename(old, final) != 0) { /* leave it as .old-: the scan falls back */ }
    }
    if (rc == TP_OK) rc = tp_fsync_dir(ckdir, err);
    if (rc == TP_OK) rm_tree(old, NULL);
    free(old);
    return rc;
}

/* Retention and leftovers (best effort; warnings into *warn). */
static void cleanup(const char *ckdir, long long step, int keep, tp_strbuf *warn) {
    DIR *d = opendir(ckdir);
    if (!d) {
        tp_strbuf_printf(warn, "; cannot list %s: %s", ckdir, strerror(errno));
        return;
    }
    tp_strbuf doomed; /* NUL-separated names */
    tp_strbuf_init(&doomed);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long long s;
        if ((parse_leftover_name(e->d_name, ".tmp-step-", &s) == 0 ||
             parse_leftover_name(e->d_name, ".old-step-", &s) == 0) && s <= step)
            tp_strbuf_putn(&doomed, e->d_name, strlen(e->d_name) + 1);
        else if (!strncmp(e->d_name, LATEST_NAME ".tmp.", strlen(LATEST_NAME ".tmp.")))
            tp_strbuf_putn(&doomed, e->d_name, strlen(e->d_name) + 1);
    }
    closedir(d);
    entry *steps = NULL;
    size_t n = 0, kept = 0;
    tp_err e2 = {0};
    if (keep >= 1 && list_steps(ckdir, &steps, &n, &e2) == TP_OK) {
        for (size_t i = 0; i < n; i++) { /* newest first */
            if (steps[i].step > step) continue;
            if (kept < (size_t)keep) {
                kept++;
                continue;
            }
            /* only a checkpoint that verifies is retired: a damaged one (not
             * written by this run's lineage as it stands) is left alone */
            char *sp = tp_path_join(ckdir, steps[i].name, &e2);
            tp_err ev = {0};
            if (sp && verify_impl(sp, &ev) == TP_OK) tp_strbuf_putn(&doomed, steps[i].name, strlen(steps[i].name) + 1);
            free(sp);
        }
    } else if (keep >= 1) {
        tp_strbuf_printf(warn, "; %s", e2.msg);
    }
    free(steps);
    if (doomed.oom) tp_strbuf_puts(warn, "; out of memory during cleanup");
    /* steps are listed newest first: delete from the end (oldest first) */
    size_t cnt = 0;
    for (size_t off = 0; !doomed.oom && off < doomed.len; off += strlen(doomed.buf + off) + 1) cnt++;
    for (size_t k = cnt; k-- > 0;) {
        size_t off = 0;
        for (size_t j = 0; j < k; j++) off += strlen(doomed.buf + off) + 1;
        const char *nm = doomed.buf + off;
        char *path = tp_path_join(ckdir, nm, &e2);
        /* a complete checkpoint leaves atomically: renamed to .old-step-N-pid
         * first, so a kill during the deletion never leaves a step-* directory
         * with some files missing */
        long long s;
        if (path && parse_step_name(nm, &s) == 0) {
            char gone[96];
            snprintf(gone, sizeof gone, ".old-step-%08lld-%ld", s, (long)getpid());
            char *gpath = tp_path_join(ckdir, gone, &e2);
            if (gpath && rename(path, gpath) == 0) {
                free(path);
                path = gpath;
                tp_fsync_dir(ckdir, &e2);
            } else {
                free(gpath);
            }
        }
        if (!path || rm_tree(path, &e2) != TP_OK) tp_strbuf_printf(warn, "; %s", e2.msg);
        free(path);
    }
    tp_strbuf_free(&doomed);
}

int tp_ckpt_write(const char *run_dir, const tp_decoder *m, const float *adam_m, const float *adam_v,
                  const tp_ckpt_info *info, int keep, tp_err *err) {
    if (!run_dir || !m || !info || !adam_m || !adam_v)
        return tp_fail(err, TP_EINVAL, "checkpoint write: run directory, model, optimizer moments and info are required");
    if (info->step < 0)
        return tp_fail(err, TP_EINVAL, "checkpoint write: step must be >= 0, got %lld", (long long)info->step);
    if (!info->config_json || (!info->adapter_config_json && has_lora(m)) || !info->state_json)
        return tp_fail(err, TP_EINVAL, "checkpoint write: config.json, adapter_config.json (with LoRA parameters) and "
                                       "trainer_state.json contents are required");
    long long step = (long long)info->step;
    char *ckdir = tp_path_join(run_dir, CKPT_DIR, err);
    if (!ckdir) return TP_ENOMEM;
    int existed = tp_exists(ckdir);
    int rc = tp_mkdir_p(ckdir, err);
    if (rc == TP_OK && !existed) rc = tp_fsync_dir(run_dir, err);
    char name[64], tmpname[96];
    snprintf(name, sizeof name, "step-%08lld", step);
    snprintf(tmpname, sizeof tmpname, ".tmp-step-%08lld-%ld", step, (long)getpid());
    char *tmp = rc == TP_OK ? tp_path_join(ckdir, tmpname, err) : NULL;
    char *final = rc == TP_OK ? tp_path_join(ckdir, name, err) : NULL;
    char *latest = rc == TP_OK ? tp_path_join(ckdir, LATEST_NAME, err) : NULL;
    if (rc == TP_OK && (!tmp || !final || !latest)) rc = TP_ENOMEM;
    if (rc == TP_OK) rc = rm_tree(tmp, err);
    if (rc == TP_OK && mkdir(tmp, 0777) != 0)
        rc = tp_fail(err, TP_EIO, "%s: cannot create directory: %s", tmp, strerror(errno));
    int made = rc == TP_OK;
    if (rc == TP_OK) rc = write_files(tmp, m, adam_m, adam_v, info, err);
    if (rc == TP_OK) rc = write_manifest(tmp, has_lora(m), err);
    if (rc == TP_OK) rc = tp_fsync_dir(tmp, err);
    if (rc == TP_OK) rc = install(ckdir, tmp, final, step, err);
    if (rc != TP_OK && made) rm_tree(tmp, NULL);
    if (rc == TP_OK) {
        char text[80];
        int len = snprintf(text, sizeof text, "%s\n", name);
        rc = tp_write_file_atomic(latest, text, (size_t)len, err);
    }
    if (rc == TP_OK) {
        tp_strbuf warn;
        tp_strbuf_init(&warn);
        cleanup(ckdir, step, keep, &warn);
        clear_err(err);
        if (warn.len && !warn.oom && err) {
            tp_strbuf msg;
            tp_strbuf_init(&msg);
            tp_strbuf_printf(&msg, "checkpoint %s/%s written; cleanup incomplete%s", ckdir, name, warn.buf);
            set_msg(err, TP_OK, msg.oom ? "checkpoint written; cleanup incomplete" : msg.buf);
            tp_strbuf_free(&msg);
        }
        tp_strbuf_free(&warn);
    } else {
        tp_err_prefix(err, "checkpoint step %lld", step);
    }
    free(tmp);
    free(final);
    free(latest);
    free(ckdir);
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
        if (strlen(text) != len || len >= sizeof tried || parse_step_name(text, &s) != 0) {
            tp_strbuf_puts(&why, "; LATEST does not name a step-* directory");
        } else {
            snprintf(tried, sizeof tried, "%s", text);
            char *dir = tp_path_join(ckdir, tried, &e2);
            if (dir && verify_impl(dir, &e2) == TP_OK) snprintf(found, sizeof found, "%s", tried);
            else tp_strbuf_printf(&why, "; LATEST -> %s: %s", tried, dir ? e2.msg : "out of memory");
            free(dir);
        }
    }
    free(text);
    free(lpath);
    /* 2. scan, newest first */
    int rc = TP_OK;
    if (!found[0]) {
        entry *steps;
        size_t ns;
        rc = list_steps(ckdir, &steps, &ns, err);
        for (size_t i = 0; rc == TP_OK && i < ns && !found[0]; i++) {
            if (!strcmp(steps[i].name, tried)) continue;
            char *dir = tp_path_join(ckdir, steps[i].name, &e2);
            if (dir && verify_impl(dir, &e2) == TP_OK) snprintf(found, sizeof found, "%s", steps[i].name);
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
            rc = set_msg(err, TP_EIO, msg.oom ? "no valid checkpoint" : msg.buf);
        } else {
            size_t need = strlen(ckdir) + 1 + strlen(found) + 1;
            if (need > n) {
                rc = tp_fail(err, TP_EINVAL, "checkpoint path %s/%s does not fit in %zu bytes", ckdir, found, n);
            } else {
                snprintf(out, n, "%s/%s", ckdir, found);
                clear_err(err);
                if (why.len) {
                    tp_strbuf_printf(&msg, "%s: using %s; rejected: %s", ckdir, found, w);
                    set_msg(err, TP_OK, msg.oom ? "some newer checkpoints were rejected" : msg.buf);
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
    clear_err(err);
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
    entry *steps = NULL;
    size_t n = 0;
    if (!any && tp_exists(ckdir)) {
        tp_err e2 = {0};
        if (list_steps(ckdir, &steps, &n, &e2) != TP_OK) any = 1;
        else any = n > 0;
        free(steps);
    }
    free(ckdir);
    return any;
}

int tp_ckpt_set_aside(const char *run_dir, char *moved_to, size_t n, tp_err *err) {
    if (n) moved_to[0] = 0;
    char *ckdir = tp_path_join(run_dir, CKPT_DIR, err);
    if (!ckdir) return TP_ENOMEM;
    char stamp[32];
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
    int rc = TP_EIO;
    for (int k = 0; k < 1000; k++) {
        char name[96];
        if (k) snprintf(name, sizeof name, CKPT_DIR ".before-%s-%d", stamp, k);
        else snprintf(name, sizeof name, CKPT_DIR ".before-%s", stamp);
        char *dst = tp_path_join(run_dir, name, err);
        if (!dst) { rc = TP_ENOMEM; break; }
        if (tp_exists(dst)) { free(dst); continue; }
        if (rename(ckdir, dst) != 0) {
            rc = tp_fail(err, TP_EIO, "cannot move %s aside to %s: %s", ckdir, dst, strerror(errno));
        } else {
            rc = tp_fsync_dir(run_dir, err);
            snprintf(moved_to, n, "%s", dst);
        }
        free(dst);
        break;
    }
    free(ckdir);
    return rc;
}
