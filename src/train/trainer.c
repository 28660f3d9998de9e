/* trainer.c - the training loop (trainer.h): the run lock, resume, steps
 * (micro-batches, gradient allreduce, clipping, AdamW, rollback of a
 * non-finite update), validation, logging and metrics, checkpoints and
 * signals. Start-up (model, PiSSA, data, efficiency) is trainer_setup.c;
 * what both share is trainer_impl.h. */
#include "train/trainer.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "data/dataset.h"
#include "data/textdata.h"
#include "eval/perplexity.h"
#include "io/hf_model.h"
#include "linalg/svd.h"
#include "model/run_json.h"
#include "train/checkpoint.h"
#include "train/export.h"
#include "train/optim.h"
#include "train/state.h"
#include "train/trainer_impl.h"
#include "util/fsutil.h"
#include "util/jsonint.h"
#include "util/platform.h"

static volatile sig_atomic_t g_stop_signal = 0;

static void on_signal(int sig) { g_stop_signal = sig; }

void tp_train_install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}


static uint64_t fnv1a(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
    return h;
}

static void hms(char *buf, size_t n, double s) {
    if (!(s >= 0) || s > 3.5e6) { snprintf(buf, n, "--:--:--"); return; }
    int t = (int)(s + 0.5);
    snprintf(buf, n, "%02d:%02d:%02d", (t / 3600) % 1000, (t / 60) % 60, t % 60);
}

static const char *env_or(const char *name, const char *dflt) {
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}


static char *state_json(const run *R, double lr) {
    cJSON *s = cJSON_CreateObject();
    cJSON_AddNumberToObject(s, "step", (double)R->step);
    cJSON_AddNumberToObject(s, "tokens_seen", (double)R->tokens_seen);
    if (R->tokens_trained >= 0) /* unknown after resuming a checkpoint from before the count */
        cJSON_AddNumberToObject(s, "tokens_trained", (double)R->tokens_trained);
    cJSON_AddNumberToObject(s, "epoch", (double)tp_sampler_epoch(R->sampler, R->step));
    cJSON *cur = cJSON_AddObjectToObject(s, "data_cursor");
    cJSON_AddNumberToObject(cur, "next_step", (double)R->step);
    cJSON_AddNumberToObject(cur, "global_batch", (double)R->cfg->global_batch);
    cJSON_AddNumberToObject(cur, "rows", (double)tp_dataset_rows(R->data));
    cJSON_AddNumberToObject(cur, "seed", (double)R->cfg->dec.seed);
    if (R->data_digest[0]) cJSON_AddStringToObject(cur, "digest", R->data_digest);
    if (R->pissa_digest[0]) cJSON_AddStringToObject(s, "pissa_base_digest", R->pissa_digest);
    cJSON *sch = cJSON_AddObjectToObject(s, "schedule");
    cJSON_AddNumberToObject(sch, "lr_last", lr);
    cJSON_AddNumberToObject(sch, "lr_next", tp_lr_at(&R->cfg->sched, R->step));
    cJSON_AddNumberToObject(sch, "mu_layer0", tp_decoder_mu(R->m, 0));
    cJSON_AddStringToObject(sch, "kind", tp_lr_kind_name(R->cfg->sched.kind));
    /* All randomness is a pure function of (seed, step, layer, module,
     * element) or (seed, epoch): the per-rank state is the seed and the step. */
    cJSON *rng = cJSON_AddArrayToObject(s, "rng");
    for (int r = 0; r < R->d->world; r++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "rank", r);
        cJSON_AddNumberToObject(e, "seed", (double)R->cfg->dec.seed);
        cJSON_AddNumberToObject(e, "step", (double)R->step);
        cJSON_AddItemToArray(rng, e);
    }
    cJSON_AddNumberToObject(s, "world_size", R->d->world);
    cJSON_AddNumberToObject(s, "consecutive_bad_steps", R->bad_run);
    char dig[32];
    snprintf(dig, sizeof dig, "%016llx", (unsigned long long)fnv1a(R->resume_json));
    cJSON_AddStringToObject(s, "config_digest", dig);
    cJSON *rc = cJSON_Parse(R->resume_json);
    if (rc) cJSON_AddItemToObject(s, "resume_config", rc);
    cJSON *sl = cJSON_AddObjectToObject(s, "slurm");
    cJSON_AddStringToObject(sl, "job_id", env_or("SLURM_JOB_ID", ""));
    cJSON_AddStringToObject(sl, "restart_count", env_or("SLURM_RESTART_COUNT", "0"));
    cJSON_AddStringToObject(sl, "nodelist", env_or("SLURM_JOB_NODELIST", ""));
    char *out = cJSON_Print(s);
    cJSON_Delete(s);
    return out;
}

/* First non-finite value of theta / m / v, or a negative v: 1 and *where
 * describes it; 0 when the state is sound. */
static int bad_state(const run *R, const float *theta, const float *m, const float *v, char *where, size_t n) {
    for (size_t i = 0; i < tp_decoder_nparams(R->m); i++) {
        const tp_param *p = tp_decoder_param(R->m, i);
        for (int k = 0; k < 3; k++) {
            const float *x = (k == 0 ? theta : k == 1 ? m : v) + p->offset;
            for (size_t e = 0; e < p->numel; e++) {
                if (isfinite(x[e]) && !(k == 2 && x[e] < 0)) continue;
                snprintf(where, n, "%s%s element %zu is %g", p->name, k == 0 ? "" : k == 1 ? ".exp_avg" : ".exp_avg_sq",
                         e, (double)x[e]);
                return 1;
            }
        }
    }
    return 0;
}

static int save(run *R, double lr, tp_err *err) {
    int rc = TP_OK;
    char where[TP_PARAM_NAME_MAX + 96];
    if (R->d->rank == 0 && bad_state(R, tp_decoder_theta(R->m), R->adam_m, R->adam_v, where, sizeof where))
        rc = tp_fail(err, TP_EINVAL, "step %lld: refusing to checkpoint non-finite state (%s); the last checkpoint in "
                     "%s/checkpoints is kept", (long long)R->step, where, R->cfg->run_dir);
    else if (R->d->rank == 0) {
        /* the base the adapter applies to: PiSSA's residual base, else model.path */
        const char *bpath = R->pissa_dir[0] ? R->pissa_dir : R->cfg->model_path;
        char *cfg = tp_run_config_json_hub(bpath, R->pissa_dir[0] ? "" : R->cfg->hub_id, &R->hf->cfg, &R->cfg->dec,
                                           R->used, R->step);
        /* the PEFT adapter only when there is one (trainable: lora); its base
         * is model.hub_id, else the absolute base path */
        char base[TP_PATH_MAX + 40];
        if (tp_abs_path(bpath, base, sizeof base) != 0) snprintf(base, sizeof base, "%s", bpath);
        int lora = R->cfg->dec.trainable == TP_TRAIN_LORA;
        char *ad = lora ? tp_adapter_config_json(&R->cfg->dec, R->cfg->hub_id[0] && !R->pissa_dir[0] ? R->cfg->hub_id
                                                                                                      : base)
                        : NULL;
        char *st = state_json(R, lr);
        if (!cfg || (lora && !ad) || !st) rc = tp_fail(err, TP_ENOMEM, "out of memory");
        else {
            tp_ckpt_info info = {R->step, cfg, ad, st};
            rc = tp_ckpt_write(R->cfg->run_dir, R->m, R->adam_m, R->adam_v, &info, R->cfg->ckpt_keep, err);
        }
        free(cfg);
        free(ad);
        free(st);
        if (rc == TP_OK)
            fprintf(stderr, "%scheckpoint: %s/checkpoints/step-%08lld\n", R->tty ? "\n" : "", R->cfg->run_dir,
                    (long long)R->step);
    }
    /* every rank learns whether rank 0 succeeded */
    int bad = tp_dist_max_int(rc != TP_OK);
    if (bad && rc == TP_OK) rc = tp_fail(err, TP_EIO, "rank 0 failed to write checkpoint step %lld", (long long)R->step);
    return rc;
}

/* ---- the run lock and the start-up probe (rank 0) ------------------------- */

/* j: a lock whose "pid" the caller read */
static void lock_describe(const cJSON *j, int64_t pid, char *buf, size_t n) {
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "host"), *job = cJSON_GetObjectItemCaseSensitive(j, "slurm_job_id"),
                *t = cJSON_GetObjectItemCaseSensitive(j, "started");
    snprintf(buf, n, "pid %lld on host %s%s%s, started %s", (long long)pid,
             cJSON_IsString(h) ? h->valuestring : "?",
             cJSON_IsString(job) && job->valuestring[0] ? ", SLURM job " : "",
             cJSON_IsString(job) ? job->valuestring : "", cJSON_IsString(t) ? t->valuestring : "?");
}

/* Temporary name of a lock being written: run.dir/.LOCK.<pid>.<host>. */
static void lock_temp_name(char *buf, size_t n, const char *rd, long pid, const char *host) {
    snprintf(buf, n, "%s/.LOCK.%ld.%s", rd, pid, host);
}

/* Write text into a new file at path (excl: O_EXCL, else O_TRUNC) and sync
 * it. 0, or -1 (not created) / -2 (not written: the file is removed) with
 * errno set. */
static int write_synced(const char *path, int excl, const char *text, size_t tl) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (excl ? O_EXCL : O_TRUNC), 0644);
    if (fd < 0) return -1;
    int ok = write(fd, text, tl) == (ssize_t)tl && fsync(fd) == 0;
    int e = errno;
    close(fd);
    if (ok) return 0;
    unlink(path);
    errno = e;
    return -2;
}

/* how: write_synced's -1 (not created) or -2 (not written) */
static int lock_fail(const char *lock_path, int how, int e, tp_err *err) {
    tp_fail(err, TP_EIO, "%s: cannot %s the run lock: %s (run.dir must be writable)", lock_path,
            how == -1 ? "create" : "write", strerror(e));
    return -1;
}

/* Create lock_path (in run.dir rd) holding text, or find it taken. The text
 * is written and synced under a private name first and then hard-linked to
 * LOCK, which fails if LOCK exists: a process killed at any moment leaves
 * either no LOCK or a complete one (an empty LOCK from a kill between open
 * and write would block every resume). Filesystems without hard links fall
 * back to an exclusive create. Returns 1 (created), 0 (LOCK exists), -1
 * (error in err). */
static int make_lock(const char *rd, const char *host, const char *lock_path, const char *text, size_t tl,
                     tp_err *err) {
    char tmp[TP_PATH_MAX + 320];
    lock_temp_name(tmp, sizeof tmp, rd, (long)getpid(), host);
    int w = write_synced(tmp, 0, text, tl);
    if (w) return lock_fail(lock_path, w, errno, err);
    int linked = link(tmp, lock_path), e = errno;
    unlink(tmp);
    if (linked == 0) return 1;
    if (e == EEXIST) return 0;
    if (e != EPERM && e != ENOTSUP && e != EOPNOTSUPP && e != EXDEV && e != EMLINK)
        return lock_fail(lock_path, -1, e, err);
    w = write_synced(lock_path, 1, text, tl);
    if (w == -1 && errno == EEXIST) return 0;
    return w ? lock_fail(lock_path, w, errno, err) : 1;
}

/* Remove lock temporaries left by processes of this host killed while
 * writing one (held: we hold LOCK, so no live run of ours is creating one). */
static void sweep_lock_temps(const char *rd, const char *host) {
    DIR *d = opendir(rd);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        char *end = NULL;
        if (strncmp(de->d_name, ".LOCK.", 6)) continue;
        long pid = strtol(de->d_name + 6, &end, 10);
        if (end == de->d_name + 6 || *end != '.' || strcmp(end + 1, host) || pid < 1 || pid > 4194304) continue;
        if (pid != (long)getpid() && !(kill((pid_t)pid, 0) != 0 && errno == ESRCH)) continue;
        char path[TP_PATH_MAX + 320];
        lock_temp_name(path, sizeof path, rd, pid, host);
        unlink(path);
    }
    closedir(d);
}

/* run.dir/LOCK: created exclusively; holds {"host","pid","slurm_job_id",
 * "started"}. A lock whose process is gone (same host, no such pid) or that
 * belongs to this very SLURM job (a requeue) is taken over. */
static int take_lock(run *R, tp_err *err) {
    const char *rd = R->cfg->run_dir;
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    const char *job = env_or("SLURM_JOB_ID", "");
    char started[40];
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(started, sizeof started, "%Y-%m-%dT%H:%M:%SZ", &tm);
    cJSON *me = cJSON_CreateObject();
    cJSON_AddStringToObject(me, "host", host);
    cJSON_AddNumberToObject(me, "pid", (double)getpid());
    cJSON_AddStringToObject(me, "slurm_job_id", job);
    cJSON_AddStringToObject(me, "started", started);
    char *text = cJSON_PrintUnformatted(me);
    cJSON_Delete(me);
    if (!text) return tp_fail(err, TP_ENOMEM, "out of memory");
    size_t tl = strlen(text);
    text[tl] = 0;
    snprintf(R->lock_path, sizeof R->lock_path, "%s/LOCK", rd);
    int rc = TP_EIO;
    for (int attempt = 0; attempt < 5; attempt++) {
        int made = make_lock(rd, host, R->lock_path, text, tl, err);
        if (made < 0) {
            rc = err->code;
            break;
        }
        if (made) {
            R->lock_text = text;
            sweep_lock_temps(rd, host);
            return TP_OK;
        }
        char *held = NULL;
        tp_err e2 = {0};
        if (tp_read_file(R->lock_path, 4096, &held, NULL, &e2) != TP_OK) {
            if (!tp_exists(R->lock_path)) continue; /* released meanwhile */
            rc = tp_fail(err, TP_EIO, "%s: run lock unreadable (%s); delete it if no run uses %s", R->lock_path, e2.msg, rd);
            break;
        }
        cJSON *j = cJSON_Parse(held);
        free(held);
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "host"), *p = cJSON_GetObjectItemCaseSensitive(j, "pid"),
                    *jb = cJSON_GetObjectItemCaseSensitive(j, "slurm_job_id");
        int64_t lock_pid = 0;
        if (!cJSON_IsString(h) || !tp_json_int(p, 1, 4194304, &lock_pid) || (jb && !cJSON_IsString(jb))) {
            cJSON_Delete(j);
            rc = tp_fail(err, TP_EFORMAT,
                         "%s: run lock unreadable: expected a JSON object with string \"host\" and integer \"pid\"; "
                         "delete it if no run uses %s",
                         R->lock_path, rd);
            break;
        }
        pid_t pid = (pid_t)lock_pid;
        int same_host = !strcmp(h->valuestring, host);
        int stale = same_host && (pid == getpid() || (kill(pid, 0) != 0 && errno == ESRCH));
        int requeue = jb && jb->valuestring[0] && job[0] && !strcmp(jb->valuestring, job);
        char who[512];
        lock_describe(j, lock_pid, who, sizeof who);
        cJSON_Delete(j);
        if (!stale && !requeue) {
            rc = tp_fail(err, TP_EINVAL,
                         "%s: run.dir is in use by %s; wait for that run to end or use another run.dir (delete LOCK "
                         "only if that process is gone)",
                         R->lock_path, who);
            break;
        }
        /* take over: replace atomically, then check that we won a race */
        if ((rc = tp_write_file_atomic(R->lock_path, text, tl, err)) != TP_OK) break;
        char *now = NULL;
        if (tp_read_file(R->lock_path, 4096, &now, NULL, &e2) == TP_OK && !strcmp(now, text)) {
            free(now);
            fprintf(stderr, "tptt: note: took over the stale run lock %s of %s (%s)\n", R->lock_path, who,
                    requeue ? "same SLURM job, requeued" : "that process is gone");
            R->lock_text = text;
            return TP_OK;
        }
        free(now);
        rc = TP_EIO;
    }
    if (rc == TP_EIO && !err->msg[0]) tp_fail(err, TP_EIO, "%s: could not take the run lock", R->lock_path);
    free(text);
    return rc;
}

static void release_lock(run *R) {
    if (!R->lock_text) return;
    char *now = NULL;
    tp_err e2 = {0};
    if (tp_read_file(R->lock_path, 4096, &now, NULL, &e2) == TP_OK && !strcmp(now, R->lock_text)) unlink(R->lock_path);
    free(now);
    free(R->lock_text);
    R->lock_text = NULL;
}

/* run.dir and run.dir/checkpoints must be writable before any work. */
static int probe_run_dir(run *R, tp_err *err) {
    const char *rd = R->cfg->run_dir;
    tp_err e2 = {0};
    if (tp_mkdir_p(rd, &e2) != TP_OK) return tp_fail(err, TP_EIO, "run.dir: %s", e2.msg);
    char ck[TP_PATH_MAX + 32], probe[TP_PATH_MAX + 64];
    snprintf(ck, sizeof ck, "%s/checkpoints", rd);
    struct stat st;
    if (lstat(ck, &st) == 0 && !S_ISDIR(st.st_mode) && !(S_ISLNK(st.st_mode) && stat(ck, &st) == 0 && S_ISDIR(st.st_mode)))
        return tp_fail(err, TP_EIO, "%s: exists and is not a directory (run.dir/checkpoints must be a directory)", ck);
    if (tp_mkdir_p(ck, &e2) != TP_OK) return tp_fail(err, TP_EIO, "run.dir checkpoints: %s", e2.msg);
    snprintf(probe, sizeof probe, "%s/.probe-%ld", ck, (long)getpid());
    int fd = open(probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int ok = fd >= 0 && write(fd, "x", 1) == 1 && fsync(fd) == 0;
    int e = errno;
    if (fd >= 0) close(fd);
    unlink(probe);
    if (!ok)
        return tp_fail(err, TP_EIO, "%s: cannot write a checkpoint there: %s (run.dir must be writable)", ck, strerror(e));
    return TP_OK;
}

/* ---- resume: rank 0 decides, every rank loads the same checkpoint ---------- */

static int64_t epoch_of(const void *ctx, int64_t step) { return tp_sampler_epoch((const tp_sampler *)ctx, step); }

/* Validate trainer_state.json of dir against the directory name, the run
 * config and the data set (train/state.h). */
static int check_state(run *R, const char *dir, const char *text, tp_state_info *out, tp_err *err) {
    tp_state_expect ex = {.dir = dir,
                          .global_batch = R->cfg->global_batch,
                          .seq_len = R->cfg->data.seq_len,
                          .total_steps = R->cfg->sched.total_steps,
                          .rows = tp_dataset_rows(R->data),
                          .seed = R->cfg->dec.seed,
                          .epoch_of = epoch_of,
                          .epoch_ctx = R->sampler,
                          .data_digest = R->data_digest,
                          .pissa_digest = R->pissa_digest,
                          .resume_json = R->resume_json};
    return tp_train_state_check(text, &ex, out, err);
}

/* Rank 0: which checkpoint to load ("" = start fresh) and its counters, as
 * "<step> <tokens> <bad steps> <dir>" in *plan. */
static int decide_resume(run *R, const char *mode, char **plan, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    char dir[TP_PATH_MAX + 64] = "";
    *plan = NULL;
    if (!strcmp(mode, "none")) {
        if (tp_ckpt_has_candidates(c->run_dir)) {
            char moved[TP_PATH_MAX + 96];
            int rc = tp_ckpt_set_aside(c->run_dir, moved, sizeof moved, err);
            if (rc) return rc;
            fprintf(stderr, "tptt: --resume none: the earlier checkpoints were moved to %s (nothing deleted)\n", moved);
            char m1[TP_PATH_MAX + 32], m2[TP_PATH_MAX + 160];
            snprintf(m1, sizeof m1, "%s/metrics.jsonl", c->run_dir);
            const char *tail = strrchr(moved, '.');
            snprintf(m2, sizeof m2, "%s/metrics.jsonl%s", c->run_dir, tail ? tail : ".before");
            if (tp_exists(m1) && rename(m1, m2) == 0)
                fprintf(stderr, "tptt: --resume none: the earlier metrics.jsonl was moved to %s\n", m2);
        }
        *plan = tp_strdup("0 0 0 0 0 ", err);
        return *plan ? TP_OK : TP_ENOMEM;
    }
    if (!strcmp(mode, "auto")) {
        if (!tp_ckpt_has_candidates(c->run_dir)) {
            *plan = tp_strdup("0 0 0 0 0 ", err);
            return *plan ? TP_OK : TP_ENOMEM;
        }
        tp_err e2 = {0};
        if (tp_ckpt_find_latest(c->run_dir, dir, sizeof dir, &e2) != TP_OK)
            return tp_fail(err, TP_EINVAL,
                           "%s/checkpoints: refusing to start over checkpoints that cannot be resumed (pass --resume "
                           "none to start fresh; they are kept) - %s",
                           c->run_dir, e2.msg);
        if (e2.msg[0]) fprintf(stderr, "tptt: warning: %s\n", e2.msg);
    } else {
        snprintf(dir, sizeof dir, "%s", mode);
        int rc = tp_ckpt_verify(dir, err);
        if (rc) return rc;
    }
    char *st = NULL, *path = tp_path_join(dir, "trainer_state.json", err);
    int rc = path ? tp_read_file(path, 64u << 20, &st, NULL, err) : TP_ENOMEM;
    free(path);
    if (rc) return rc;
    tp_state_info si;
    rc = check_state(R, dir, st, &si, err);
    free(st);
    if (rc) return rc;
    int64_t step = si.step, tokens = si.tokens_seen, bad = si.consecutive_bad_steps, ws = si.world_size;
    size_t n = strlen(dir) + 128;
    *plan = tp_malloc(n, err);
    if (!*plan) return TP_ENOMEM;
    snprintf(*plan, n, "%lld %lld %lld %lld %lld %s", (long long)step, (long long)tokens, (long long)bad, (long long)ws,
             (long long)si.tokens_trained, dir);
    return TP_OK;
}

/* Collective: rank 0 decides, every rank loads what it decided. */
static int resume(run *R, const char *mode, tp_err *err) {
    char *plan = NULL;
    int rc = R->d->rank == 0 ? decide_resume(R, mode, &plan, err) : TP_OK;
    if ((rc = tp_dist_agree(R->d, rc, err)) != TP_OK) {
        free(plan);
        return rc;
    }
    if (R->d->world > 1 && (rc = tp_dist_bcast_string(&plan, err)) != TP_OK) {
        free(plan);
        return rc;
    }
    long long step = 0, tokens = 0, bad = 0, ws = 0, trained = 0;
    int off = 0;
    if (!plan || sscanf(plan, "%lld %lld %lld %lld %lld %n", &step, &tokens, &bad, &ws, &trained, &off) < 5) {
        free(plan);
        return tp_fail(err, TP_EIO, "resume: no decision from rank 0");
    }
    const char *dir = plan + off;
    if (*dir) {
        rc = tp_ckpt_load(dir, R->m, R->adam_m, R->adam_v, NULL, err);
        if (rc == TP_OK) {
            R->step = step;
            R->tokens_seen = tokens;
            R->tokens_trained = trained; /* -1: a checkpoint from before the count (reported as unknown) */
            R->bad_run = (int)bad;
            if (R->d->rank == 0)
                fprintf(stderr, "tptt: resuming from %s (step %lld%s)\n", dir, step,
                        ws && ws != R->d->world ? ", different world size: results continue within fp32 tolerance" : "");
        }
    }
    free(plan);
    return rc;
}

/* JSON has no NaN/Inf: non-finite values are written as null */
static const char *jnum(char *buf, size_t n, double x) {
    if (isfinite(x)) snprintf(buf, n, "%.9g", x);
    else snprintf(buf, n, "null");
    return buf;
}

enum { STEP_APPLIED = 0, STEP_NONFINITE = 1, STEP_NONFINITE_UPDATE = 2, STEP_NO_LABELS = 3 };

static const char *skip_reason(int skipped) {
    return skipped == STEP_NONFINITE ? "non-finite loss or gradients"
           : skipped == STEP_NONFINITE_UPDATE ? "non-finite update"
           : skipped == STEP_NO_LABELS ? "no labelled tokens" : "";
}

/* metrics.jsonl: opened once (rank 0); a failed open or write is reported
 * once on stderr, and a partly written line is cut off again so the file
 * stays one JSON object per line. */
static void metrics_open(run *R) {
    snprintf(R->metrics_path, sizeof R->metrics_path, "%s/metrics.jsonl", R->cfg->run_dir);
    R->metrics_fd = open(R->metrics_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0644);
    struct stat st;
    if (R->metrics_fd >= 0 && (fstat(R->metrics_fd, &st) != 0 || !(S_ISREG(st.st_mode) || S_ISCHR(st.st_mode)))) {
        close(R->metrics_fd);
        R->metrics_fd = -1;
        errno = EISDIR;
    }
    if (R->metrics_fd < 0) {
        fprintf(stderr, "tptt: warning: %s: cannot open (%s); metrics are not logged in this run\n", R->metrics_path,
                strerror(errno));
        R->metrics_warned = 1;
    }
}

static void metrics_write(run *R, const char *line, size_t n) {
    if (R->metrics_fd < 0) return;
    struct stat st;
    off_t before = fstat(R->metrics_fd, &st) == 0 ? st.st_size : -1;
    size_t off = 0;
    int e = 0;
    while (off < n) {
        ssize_t w = write(R->metrics_fd, line + off, n - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            e = w < 0 ? errno : ENOSPC;
            break;
        }
        off += (size_t)w;
    }
    if (off == n) return;
    if (off > 0 && before >= 0 && S_ISREG(st.st_mode)) {
        if (ftruncate(R->metrics_fd, before) != 0) { /* reader skips a truncated last line */ }
    }
    if (!R->metrics_warned)
        fprintf(stderr, "tptt: warning: %s: write failed at step %lld (%s); this and later failed lines are lost, the "
                        "file stays parseable\n",
                R->metrics_path, (long long)R->step, strerror(e));
    R->metrics_warned = 1;
}

/* What one step reports. */
typedef struct step_report {
    double loss, lr, gnorm, step_time;
    int skipped;
    int64_t step_tokens;
    int has_val;          /* evaluated after this step */
    double val_loss;      /* mean loss over the validation tokens */
    int64_t val_tokens;
    double gflops;        /* dense GFLOP/s of this rank's step */
} step_report;

static void log_step(run *R, const step_report *sr) {
    const tp_train_cfg *c = R->cfg;
    if (R->d->rank != 0) return;
    double el = tp_tr_now() - R->t_start;
    int64_t done = R->step - R->step_start;
    double per = done > 0 ? el / (double)done : 0, eta = per * (double)(c->sched.total_steps - R->step);
    double tps = sr->step_time > 0 ? (double)sr->step_tokens / sr->step_time : 0;
    double mu = tp_decoder_mu(R->m, 0);
    int skipped = sr->skipped;
    char e1[16], e2[16], val[96] = "";
    hms(e1, sizeof e1, el);
    hms(e2, sizeof e2, eta);
    int last = R->step == c->sched.total_steps;
    double vppl = sr->has_val ? exp(sr->val_loss) : 0;
    if (sr->has_val) snprintf(val, sizeof val, " | val_loss %.4f | val_ppl %.4g", sr->val_loss, vppl);
    char fl[64] = "";
    double share = R->mm_rate > 0 ? sr->gflops / R->mm_rate : 0;
    if (sr->gflops > 0 && R->mm_rate > 0) snprintf(fl, sizeof fl, " | %.1f GFLOP/s (%.0f%%)", sr->gflops, 100 * share);
    if (R->step % c->log_every == 0 || last || skipped || sr->has_val) {
        fprintf(stdout, "%sstep %lld/%lld | loss %.4f%s | lr %.3e | mu %.3f | gnorm %.3f | %.0f tok/s%s | %s elapsed | ETA %s%s%s%s%s",
                R->tty ? "\r\033[K" : "", (long long)R->step, (long long)c->sched.total_steps, sr->loss, val, sr->lr, mu,
                sr->gnorm, tps, fl, e1, e2, skipped ? " | SKIPPED (" : "", skip_reason(skipped), skipped ? ")" : "",
                R->tty && !last && !sr->has_val ? "" : "\n");
        fflush(stdout);
        if (R->metrics_fd >= 0) {
            char j1[40], j2[40], j3[40], j4[40], j5[40];
            tp_strbuf b;
            tp_strbuf_init(&b);
            tp_strbuf_printf(&b,
                             "{\"step\":%lld,\"loss\":%s,\"lr\":%s,\"mu\":%.9g,\"grad_norm\":%s,\"tokens\":%lld,",
                             (long long)R->step, jnum(j1, sizeof j1, sr->loss), jnum(j3, sizeof j3, sr->lr), mu,
                             jnum(j2, sizeof j2, sr->gnorm), (long long)R->tokens_seen);
            if (R->tokens_trained >= 0) tp_strbuf_printf(&b, "\"tokens_trained\":%lld,", (long long)R->tokens_trained);
            else tp_strbuf_puts(&b, "\"tokens_trained\":null,");
            if (sr->has_val)
                tp_strbuf_printf(&b, "\"val_loss\":%s,\"val_ppl\":%s,\"val_tokens\":%lld,",
                                 jnum(j4, sizeof j4, sr->val_loss), jnum(j5, sizeof j5, vppl), (long long)sr->val_tokens);
            tp_strbuf_printf(&b, "\"tokens_per_s\":%.6g,", tps);
            if (sr->gflops > 0) tp_strbuf_printf(&b, "\"gflops\":%.6g,", sr->gflops);
            if (sr->gflops > 0 && R->mm_rate > 0)
                tp_strbuf_printf(&b, "\"gflops_share\":%.4g,\"matmul_gflops\":%.6g,", share, R->mm_rate);
            tp_strbuf_printf(&b, "\"elapsed_s\":%.6g,\"skipped\":%s,", el, skipped ? "true" : "false");
            if (skipped) tp_strbuf_printf(&b, "\"skip_reason\":\"%s\",", skip_reason(skipped));
            tp_strbuf_printf(&b, "\"world_size\":%d,\"slurm_job_id\":", R->d->world);
            tp_strbuf_json_string(&b, env_or("SLURM_JOB_ID", ""));
            tp_strbuf_puts(&b, ",\"slurm_restart_count\":");
            tp_strbuf_json_string(&b, env_or("SLURM_RESTART_COUNT", "0"));
            tp_strbuf_puts(&b, ",\"slurm_nodelist\":");
            tp_strbuf_json_string(&b, env_or("SLURM_JOB_NODELIST", ""));
            tp_strbuf_puts(&b, "}\n");
            if (!b.oom) metrics_write(R, b.buf, b.len);
            tp_strbuf_free(&b);
        }
    }
}

static void teardown(run *R) {
    if (R->metrics_fd >= 0) close(R->metrics_fd);
    release_lock(R);
    free(R->eval_shard);
    free(R->resume_json);
    free(R->bk_theta);
    free(R->bk_m);
    free(R->bk_v);
    free(R->adam_m);
    free(R->adam_v);
    tp_grad_sync_destroy(R->sync);
    tp_sampler_destroy(R->sampler);
    tp_dataset_close(R->data);
    tp_decoder_destroy(R->m);
    tp_hf_close(R->hf);
}

/* One optimizer step. Returns TP_OK; *skipped when the step was not applied. */
static int train_step(run *R, int32_t *ids, int32_t *lab, int32_t *ds, int32_t *pos, double *loss_out,
                      double *gnorm_out, int *skipped, int64_t *tokens_out, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    int64_t W = R->d->world, G = c->global_batch, per = G / W, mb = c->micro_batch, T = c->data.seq_len;
    int64_t first = (int64_t)R->d->rank * per;
    int64_t local_cnt = 0;
    for (int64_t i = 0; i < per; i++) {
        int64_t row = tp_sampler_row(R->sampler, R->step, first + i);
        tp_dataset_row(R->data, row, ids + i * T, lab + i * T, ds + i * T, pos + i * T);
    }
    for (int64_t i = 0; i < per * T; i++) local_cnt += lab[i] != -100;
    /* test hook: every rank appends the rows it trains on ("step slot id id ...", labelled ids only) */
    const char *rows_log = getenv("TPTT_TEST_ROWS_LOG");
    if (rows_log && *rows_log) {
        char path[TP_PATH_MAX + 32];
        snprintf(path, sizeof path, "%s.%d", rows_log, R->d->rank);
        FILE *f = fopen(path, "a");
        for (int64_t i = 0; f && i < per; i++) {
            fprintf(f, "%lld %lld", (long long)R->step, (long long)(first + i));
            for (int64_t k = 0; k < T; k++)
                if (lab[i * T + k] != -100) fprintf(f, " %d", ids[i * T + k]);
            fputc('\n', f);
        }
        if (f) fclose(f);
    }
    int64_t global_cnt = tp_dist_sum_i64(local_cnt);
    tp_decoder_set_step(R->m, R->step);
    tp_decoder_zero_grad(R->m);
    double local_loss = 0;
    int rc = TP_OK;
    int64_t *slots = malloc((size_t)mb * sizeof *slots);
    if (!slots) rc = tp_fail(err, TP_ENOMEM, "out of memory");
    for (int64_t k = 0; k < per / mb && rc == TP_OK; k++) {
        for (int64_t i = 0; i < mb; i++) slots[i] = first + k * mb + i;
        tp_batch b = {mb, T, ids + k * mb * T, lab + k * mb * T, ds + k * mb * T, pos + k * mb * T, slots};
        if (k == per / mb - 1) tp_grad_sync_arm(R->sync);
        double sum;
        int64_t cnt;
        rc = tp_decoder_step(R->m, &b, global_cnt > 0 ? (double)global_cnt : 1.0, 1, NULL, &sum, &cnt, err);
        local_loss += sum;
    }
    free(slots);
    if (rc == TP_OK) rc = tp_grad_sync_finish(R->sync, err);
    /* the other ranks may be inside a collective by now: a local failure
     * must end the whole job, never leave it waiting */
    if (rc && R->d->world > 1) tp_dist_abort(R->d, err->msg, 1);
    if (rc) return rc;
    double loss = tp_dist_sum_f64(local_loss) / (double)(global_cnt > 0 ? global_cnt : 1);
    size_t n = tp_decoder_numel(R->m);
    float *grad = tp_decoder_grad(R->m), *theta = tp_decoder_theta(R->m);
    double gnorm = sqrt(tp_sum_squares(grad, n));
    *loss_out = loss;
    *gnorm_out = gnorm;
    *tokens_out = G * T;
    double lr = tp_lr_at(&c->sched, R->step);
    if (global_cnt == 0) {
        /* nothing to learn from (every label masked): not a fault */
        *skipped = STEP_NO_LABELS;
        R->empty_steps++;
    } else if (!isfinite(loss) || !isfinite(gnorm)) {
        *skipped = STEP_NONFINITE;
    } else {
        /* the update is applied to the live state; what it was is kept so that
         * an update that makes any value non-finite is never committed */
        memcpy(R->bk_theta, theta, n * sizeof(float));
        memcpy(R->bk_m, R->adam_m, n * sizeof(float));
        memcpy(R->bk_v, R->adam_v, n * sizeof(float));
        float coef = tp_clip_coef(gnorm, c->max_grad_norm);
        if (coef != 1.0f) tp_scale(grad, n, coef);
        for (size_t i = 0; i < tp_decoder_nparams(R->m); i++) {
            const tp_param *p = tp_decoder_param(R->m, i);
            tp_adamw_update(&c->adamw, R->step + 1, lr, p->decay ? c->weight_decay : 0.0, theta + p->offset,
                            grad + p->offset, R->adam_m + p->offset, R->adam_v + p->offset, p->numel);
        }
        char where[TP_PARAM_NAME_MAX + 96];
        if (bad_state(R, theta, R->adam_m, R->adam_v, where, sizeof where)) {
            memcpy(theta, R->bk_theta, n * sizeof(float));
            memcpy(R->adam_m, R->bk_m, n * sizeof(float));
            memcpy(R->adam_v, R->bk_v, n * sizeof(float));
            *skipped = STEP_NONFINITE_UPDATE;
            if (R->d->rank == 0)
                fprintf(stderr, "%stptt: step %lld: the update made %s (lr %g); step not applied\n", R->tty ? "\n" : "",
                        (long long)R->step + 1, where, lr);
        } else {
            *skipped = STEP_APPLIED;
        }
    }
    if (*skipped == STEP_NONFINITE || *skipped == STEP_NONFINITE_UPDATE) {
        R->bad_run++;
        R->nonfinite_steps++;
        if (R->bad_run > c->max_bad_steps)
            return tp_fail(err, TP_EINVAL,
                           "step %lld: %d consecutive steps with a non-finite loss, gradient or update (last: %s; loss "
                           "%g, grad norm %g, lr %g); aborting (faults.max_bad_steps = %d), the last checkpoint holds "
                           "finite state. Lower optimizer.lr or check the data.",
                           (long long)R->step + 1, R->bad_run, skip_reason(*skipped), loss, gnorm, lr, c->max_bad_steps);
    } else if (*skipped == STEP_APPLIED) {
        R->bad_run = 0;
    }
    R->step++;
    R->tokens_seen += G * T;
    if (R->tokens_trained >= 0) R->tokens_trained += global_cnt;
    return TP_OK;
}

static int train_run(run *R0, const char *resume_mode);

int tp_train_run(const tp_train_cfg *cfg0, const char *resume_mode, const tp_dist *d) {
    run R;
    memset(&R, 0, sizeof R);
    R.d = d;
    /* the run's own copy of the config: schedule.epochs becomes total_steps */
    R.own = malloc(sizeof *R.own);
    if (!R.own) {
        fprintf(stderr, "tptt: out of memory\n");
        return TP_EXIT_ERROR;
    }
    *R.own = *cfg0;
    R.cfg = R.own;
    int code = train_run(&R, resume_mode);
    free(R.own);
    return code;
}

static int train_run(run *R0, const char *resume_mode) {
    tp_err err = {0};
    run R = *R0;
    const tp_train_cfg *cfg = R.cfg;
    const tp_dist *d = R.d;
    /* mpirun gives rank 0 a pty even when the job log is a file: the updating
     * line is only for a plain interactive process */
    R.tty = d->rank == 0 && d->world == 1 && isatty(STDOUT_FILENO) && !getenv("OMPI_COMM_WORLD_SIZE") &&
            !getenv("PMI_RANK") && !getenv("SLURM_PROCID");
    R.metrics_fd = -1;
    int rc = tp_train_cfg_check(cfg, d->world, &err);
    if (rc) {
        if (d->rank == 0) fprintf(stderr, "tptt: %s\n", err.msg);
        return TP_EXIT_USAGE;
    }
    /* before any work: run.dir writable, and ours alone (rank 0 decides) */
    if (d->rank == 0) {
        rc = probe_run_dir(&R, &err);
        if (rc == TP_OK) rc = take_lock(&R, &err);
    }
    if (tp_dist_report_failure(d, rc, &err)) {
        release_lock(&R);
        return TP_EXIT_ERROR;
    }
    /* data preparation is collective: every rank enters it or none does */
    tp_tokenizer *tok = NULL;
    char *shard = NULL;
    rc = tp_tr_setup(&R, &err);
    if (rc == TP_OK) rc = tp_tr_setup_tokenizer(&R, &tok, &err);
    if ((rc = tp_dist_agree(d, rc, &err)) == TP_OK && cfg->pissa) {
        /* A and B from the SVDs unless a checkpoint will replace them */
        int need_ab = !strcmp(resume_mode, "none") || !tp_ckpt_has_candidates(cfg->run_dir);
        rc = tp_dist_agree(d, tp_tr_setup_pissa(&R, need_ab, &err), &err);
    }
    if (rc == TP_OK) {
        rc = tp_textdata_prepare(cfg, tok, d, &shard, &err);
        if (rc == TP_OK) rc = tp_tr_setup_data(&R, shard, &err);
        /* eval.path is tokenized like the training data: collective again */
        if ((rc = tp_dist_agree(d, rc, &err)) == TP_OK) rc = tp_tr_setup_eval(&R, shard, tok, &err);
    }
    if (tok) tp_tokenizer_free(tok);
    if (rc == TP_OK && d->rank == 0) tp_tr_data_summary(&R, shard);
    free(shard);
    if (rc == TP_OK) rc = resume(&R, resume_mode, &err);
    /* a failure on any rank stops every rank */
    if (tp_dist_report_failure(d, rc, &err)) {
        teardown(&R);
        return TP_EXIT_ERROR;
    }
    tp_train_install_signals(); /* normally done by cmd_train before MPI_Init already */
    tp_tr_measure_rate(&R); /* collective */
    if (d->rank == 0) {
        metrics_open(&R);
        char plat[512];
        tp_platform_describe(plat, sizeof plat);
        fprintf(stderr,
                "tptt train: %s | %d rank%s | %zu trainable tensors, %zu values | %s matmul | %zu gradient buckets\n"
                "platform: %s\nslurm: job %s, restart %s, nodes %s\n",
                cfg->model_path, d->world, d->world > 1 ? "s" : "", tp_decoder_nparams(R.m), tp_decoder_numel(R.m),
                tp_mm_backend_name(R.used), tp_grad_sync_buckets(R.sync), plat, env_or("SLURM_JOB_ID", "-"),
                env_or("SLURM_RESTART_COUNT", "0"), env_or("SLURM_JOB_NODELIST", "-"));
        if (R.mm_rate > 0)
            fprintf(stderr,
                    "efficiency: %.4g dense GFLOP per token per step (weight products: forward, dX%s%s); raw matmul rate "
                    "%.1f GFLOP/s per rank on them (%s, measured now); each step reports its GFLOP/s and share of it\n",
                    R.flop_token * 1e-9, cfg->dec.trainable != TP_TRAIN_LORA ? ", dW of trained weights" : "",
                    cfg->dec.recompute ? ", recompute" : "", R.mm_rate, R.mm_what);
    }
    int64_t per = cfg->global_batch / d->world, T = cfg->data.seq_len;
    int32_t *ids = malloc((size_t)(per * T) * sizeof(int32_t)), *lab = malloc((size_t)(per * T) * sizeof(int32_t));
    int32_t *ds = malloc((size_t)(per * T) * sizeof(int32_t)), *pos = malloc((size_t)(per * T) * sizeof(int32_t));
    int exit_code = TP_EXIT_FINISHED;
    if (!ids || !lab || !ds || !pos) {
        rc = tp_fail(&err, TP_ENOMEM, "out of memory for the batch");
    }
    R.t_start = tp_tr_now();
    R.step_start = R.step;
    /* a warning signal during start-up (model mapping, resume): checkpoint
     * the state we have and leave at once rather than start a step */
    if (rc == TP_OK && tp_dist_max_int(g_stop_signal != 0)) {
        rc = save(&R, tp_lr_at(&cfg->sched, R.step), &err);
        if (rc == TP_OK) {
            if (d->rank == 0)
                fprintf(stderr, "tptt: signal received during start-up: checkpointed at step %lld, exiting with code 3\n",
                        (long long)R.step);
            exit_code = TP_EXIT_CHECKPOINTED;
        }
    }
    /* test hook: behave as if SIGUSR1 arrived during step N (tests need a
     * deterministic stop point; real signals are tested too) */
    long long stop_at = getenv("TPTT_TEST_STOP_AT_STEP") ? atoll(getenv("TPTT_TEST_STOP_AT_STEP")) : -1;
    double lr = 0;
    while (rc == TP_OK && exit_code == TP_EXIT_FINISHED && R.step < cfg->sched.total_steps) {
        step_report sr = {0};
        double t0 = tp_tr_now();
        lr = tp_lr_at(&cfg->sched, R.step);
        sr.lr = lr;
        rc = train_step(&R, ids, lab, ds, pos, &sr.loss, &sr.gnorm, &sr.skipped, &sr.step_tokens, &err);
        if (rc) break; /* only the non-finite abort gets here, on every rank alike */
        sr.step_time = tp_tr_now() - t0;
        if (sr.step_time > 0)
            sr.gflops = R.flop_token * (double)(cfg->global_batch / d->world * T) / sr.step_time * 1e-9;
        /* validation: every eval.every steps and after the last one */
        if (R.eval_shard && ((cfg->eval.every > 0 && R.step % cfg->eval.every == 0) || R.step == cfg->sched.total_steps)) {
            if ((rc = tp_tr_run_eval(&R, &sr.val_loss, &sr.val_tokens, &err))) break;
            sr.has_val = 1;
        }
        log_step(&R, &sr);
        if (stop_at >= 0 && R.step == stop_at) g_stop_signal = SIGUSR1;
        int stop = tp_dist_max_int(g_stop_signal != 0);
        int done = R.step == cfg->sched.total_steps;
        if ((cfg->ckpt_every > 0 && R.step % cfg->ckpt_every == 0) || stop || done) {
            rc = save(&R, lr, &err);
            if (rc) break;
        }
        if (stop && !done) {
            if (d->rank == 0)
                fprintf(stderr, "tptt: signal received: checkpointed at step %lld, exiting with code 3 (resume with --resume auto)\n",
                        (long long)R.step);
            exit_code = TP_EXIT_CHECKPOINTED;
            break;
        }
    }
    if (rc == TP_OK && exit_code == TP_EXIT_FINISHED && cfg->export_dir[0] && d->rank == 0) {
        rc = tp_export_model(R.hf, R.m, cfg->export_dir, &err);
        if (rc == TP_OK) fprintf(stderr, "tptt: exported the trained model to %s\n", cfg->export_dir);
    }
    if (tp_dist_max_int(rc != TP_OK)) {
        if (rc != TP_OK && (d->rank == 0 || d->world == 1)) fprintf(stderr, "tptt: %s\n", err.msg);
        exit_code = TP_EXIT_ERROR;
    } else if (exit_code == TP_EXIT_FINISHED && d->rank == 0) {
        fprintf(stderr, "tptt: training finished at step %lld; checkpoint: %s/checkpoints/step-%08lld\n",
                (long long)R.step, cfg->run_dir, (long long)R.step);
    }
    if (d->rank == 0 && R.empty_steps)
        fprintf(stderr, "tptt: %lld step%s had no labelled tokens (every label of the batch masked) and changed "
                        "nothing; they are not counted as faults\n",
                (long long)R.empty_steps, R.empty_steps == 1 ? "" : "s");
    if (d->rank == 0 && R.nonfinite_steps && exit_code != TP_EXIT_ERROR)
        fprintf(stderr, "tptt: warning: %lld step%s skipped for a non-finite loss, gradient or update\n",
                (long long)R.nonfinite_steps, R.nonfinite_steps == 1 ? "" : "s");
    free(ids);
    free(lab);
    free(ds);
    free(pos);
    teardown(&R);
    *R0 = R;
    return exit_code;
}
