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
 * Reading, finding and loading: checkpoint_read.c. */
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
#include "train/checkpoint_impl.h"
#include "util/fsutil.h"

const char *const tp_ck_required_files[] = {
    "adapter_config.json",    "adapter_model.safetensors", "config.json",
    "liza_model.safetensors", "optimizer.safetensors",     "trainer_state.json",
};
_Static_assert(sizeof tp_ck_required_files / sizeof *tp_ck_required_files == NREQUIRED, "NREQUIRED");

static int has_lora(const tp_decoder *m) {
    for (size_t i = 0; i < tp_decoder_nparams(m); i++)
        if (tp_decoder_param(m, i)->is_lora) return 1;
    return 0;
}

/* ---- small helpers ------------------------------------------------------ */

void tp_ck_clear_err(tp_err *err) {
    if (err) {
        err->code = TP_OK;
        err->msg[0] = 0;
    }
}

/* Set err to text (one line; "..." marks a truncation). */
int tp_ck_set_msg(tp_err *err, int code, const char *text) {
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
int tp_ck_parse_digits(const char *s, size_t len, long long *out) {
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
int tp_ck_parse_step_name(const char *name, long long *step) {
    if (strncmp(name, "step-", 5)) return -1;
    return tp_ck_parse_digits(name + 5, strlen(name + 5), step);
}

/* "<prefix><digits>-<digits>" (prefix ".tmp-step-" or ".old-step-") -> step. */
static int parse_leftover_name(const char *name, const char *prefix, long long *step) {
    size_t lp = strlen(prefix);
    if (strncmp(name, prefix, lp)) return -1;
    const char *s = name + lp, *dash = strchr(s, '-');
    long long pid;
    if (!dash || tp_ck_parse_digits(s, (size_t)(dash - s), step) || tp_ck_parse_digits(dash + 1, strlen(dash + 1), &pid))
        return -1;
    return 0;
}

/* Remove a file or a directory tree (symlinks are removed, not followed). */
static int rm_tree(const char *path, tp_err *err) {
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT) return TP_OK;
        return tp_fail_sys(err, TP_EIO, errno, "%s: cannot stat", path);
    }
    if (!S_ISDIR(st.st_mode)) {
        if (unlink(path) != 0 && errno != ENOENT)
            return tp_fail_sys(err, TP_EIO, errno, "%s: cannot remove", path);
        return TP_OK;
    }
    DIR *d = opendir(path);
    if (!d) return tp_fail_sys(err, TP_EIO, errno, "%s: cannot open directory", path);
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
        rc = tp_fail_sys(err, TP_EIO, errno, "%s: cannot remove directory", path);
    return rc;
}

/* XXH64 (seed 0) and size of a regular file, read in 1 MiB blocks. */
int tp_ck_hash_file(const char *path, uint64_t *size, uint64_t *hash, tp_err *err) {
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
            rc = tp_fail_sys(err, TP_EIO, errno, "read failed");
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
        int rc = tp_fail_sys(err, TP_EIO, errno, "%s: cannot create", path);
        free(path);
        return rc;
    }
    size_t n = strlen(text);
    int rc = TP_OK;
    if (n && fwrite(text, 1, n, fp) != n) {
        rc = tp_fail_sys(err, TP_EIO, errno, "%s: write failed", path);
        fclose(fp);
    } else {
        rc = tp_fclose_synced(fp, path, err);
    }
    free(path);
    return rc;
}

/* ---- directory listing ---------------------------------------------------- */


static int cmp_entry_desc(const void *a, const void *b) {
    const tp_ck_entry *x = a, *y = b;
    if (x->step != y->step) return x->step < y->step ? 1 : -1;
    return strcmp(x->name, y->name);
}

int tp_ck_list_steps(const char *ckdir, tp_ck_entry **out, size_t *n, tp_err *err) {
    *out = NULL;
    *n = 0;
    DIR *d = opendir(ckdir);
    if (!d) return tp_fail_sys(err, TP_EIO, errno, "%s: cannot open directory", ckdir);
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long long step;
        if (tp_ck_parse_step_name(e->d_name, &step) || strlen(e->d_name) >= sizeof((tp_ck_entry *)0)->name) continue;
        if (*n == cap) {
            size_t nc = cap ? 2 * cap : 16;
            tp_ck_entry *p = realloc(*out, nc * sizeof *p);
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
    for (size_t i = adapter ? 0 : NADAPTER; i < NREQUIRED && rc == TP_OK; i++) { /* tp_ck_required_files is sorted */
        char *path = tp_path_join(tmp, tp_ck_required_files[i], err);
        if (!path) { rc = TP_ENOMEM; break; }
        uint64_t size, hash;
        rc = tp_ck_hash_file(path, &size, &hash, err);
        if (rc) tp_err_prefix(err, "%s", path);
        free(path);
        tp_strbuf_printf(&s, "%" PRIu64 " %016" PRIx64 " %s\n", size, hash, tp_ck_required_files[i]);
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
            return tp_fail_sys(err, TP_EIO, errno, "cannot rename %s to %s", tmp, final);
        return tp_fsync_dir(ckdir, err);
    }
    /* an existing directory that does not verify is not ours to delete (a
     * damaged checkpoint someone may want to inspect or repair): it is kept
     * under rejected-step-XXXXXXXX-<time> (never scanned, never cleaned) */
    tp_err ev = {0};
    if (tp_ck_verify(final, &ev) != TP_OK) {
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
            rc = tp_fail_sys(err, TP_EIO, errno, "cannot move the damaged %s aside to %s", final, kp);
        else
            fprintf(stderr, "tptt: warning: %s did not verify (%s); kept as %s\n", final, ev.msg, kp);
        free(kp);
        if (rc == TP_OK && rename(tmp, final) != 0)
            rc = tp_fail_sys(err, TP_EIO, errno, "cannot rename %s to %s", tmp, final);
        return rc == TP_OK ? tp_fsync_dir(ckdir, err) : rc;
    }
    /* replace: swap atomically where possible; tmp then holds the old one */
    if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final, RENAME_EXCHANGE) == 0) {
        int rc = tp_fsync_dir(ckdir, err);
        if (rc == TP_OK) rm_tree(tmp, NULL);
        return rc;
    }
    if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
        return tp_fail_sys(err, TP_EIO, errno, "cannot exchange %s and %s", tmp, final);
    char name[64];
    snprintf(name, sizeof name, ".old-step-%08lld-%ld", step, (long)getpid());
    char *old = tp_path_join(ckdir, name, err);
    if (!old) return TP_ENOMEM;
    int rc = rm_tree(old, err);
    if (rc == TP_OK && rename(final, old) != 0)
        rc = tp_fail_sys(err, TP_EIO, errno, "cannot rename %s to %s", final, old);
    if (rc == TP_OK && rename(tmp, final) != 0) {
        rc = tp_fail_sys(err, TP_EIO, errno, "cannot rename %s to %s", tmp, final);
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
    tp_ck_entry *steps = NULL;
    size_t n = 0, kept = 0;
    tp_err e2 = {0};
    if (keep >= 1 && tp_ck_list_steps(ckdir, &steps, &n, &e2) == TP_OK) {
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
            if (sp && tp_ck_verify(sp, &ev) == TP_OK) tp_strbuf_putn(&doomed, steps[i].name, strlen(steps[i].name) + 1);
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
        if (path && tp_ck_parse_step_name(nm, &s) == 0) {
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
        rc = tp_fail_sys(err, TP_EIO, errno, "%s: cannot create directory", tmp);
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
        tp_ck_clear_err(err);
        if (warn.len && !warn.oom && err) {
            tp_strbuf msg;
            tp_strbuf_init(&msg);
            tp_strbuf_printf(&msg, "checkpoint %s/%s written; cleanup incomplete%s", ckdir, name, warn.buf);
            tp_ck_set_msg(err, TP_OK, msg.oom ? "checkpoint written; cleanup incomplete" : msg.buf);
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
            rc = tp_fail_sys(err, TP_EIO, errno, "cannot move %s aside to %s", ckdir, dst);
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

