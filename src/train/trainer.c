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
#include "util/fsutil.h"
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

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
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

/* The run: everything the loop needs, so helpers stay small. */
typedef struct run {
    const tp_train_cfg *cfg; /* the run's own copy (schedule.epochs: total_steps set once the rows are known) */
    tp_train_cfg *own;
    const tp_dist *d;
    tp_hf_model *hf;
    tp_decoder *m;
    tp_dataset *data;
    tp_sampler *sampler;
    tp_grad_sync *sync;
    tp_mm_backend used;
    float *adam_m, *adam_v;
    float *bk_theta, *bk_m, *bk_v; /* state before the update, to roll back a non-finite one */
    int64_t step, tokens_seen, tokens_trained; /* tokens_trained: labelled tokens of the steps done */
    int bad_run;
    double flop_token;  /* dense FLOP per token of a step (frozen weights 4, trained full weights 6, +2 recompute) */
    double mm_rate;     /* GFLOP/s of the matmul backend on the model's shapes, measured at start-up (best product; mean over
                           ranks running at once); 0: not measured */
    char mm_what[160];  /* how it was measured */
    char pissa_dir[TP_PATH_MAX + 32]; /* lora.init pissa: run.dir/pissa-base, the base trained on ("" = none) */
    char pissa_digest[48];            /* "xxh3:<16 hex>" of its files (rank 0) */
    char *eval_shard;  /* validation: eval.path's shard, or the training shard (eval.split); NULL: none */
    int64_t eval_rows; /* validation rows evaluated each time */
    int64_t empty_steps, nonfinite_steps; /* this process: steps skipped for either reason */
    char *resume_json;
    char data_digest[48]; /* "xxh3:<16 hex>" of the token shard (rank 0) */
    int metrics_fd, metrics_warned;
    char metrics_path[TP_PATH_MAX + 32];
    char lock_path[TP_PATH_MAX + 32];
    char *lock_text; /* what we wrote into LOCK (rank 0, while held) */
    int tty;
    double t_start;
    int64_t step_start;
} run;

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

static void lock_describe(const cJSON *j, char *buf, size_t n) {
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "host"), *p = cJSON_GetObjectItemCaseSensitive(j, "pid"),
                *job = cJSON_GetObjectItemCaseSensitive(j, "slurm_job_id"),
                *t = cJSON_GetObjectItemCaseSensitive(j, "started");
    snprintf(buf, n, "pid %lld on host %s%s%s, started %s", cJSON_IsNumber(p) ? (long long)p->valuedouble : -1LL,
             cJSON_IsString(h) ? h->valuestring : "?",
             cJSON_IsString(job) && job->valuestring[0] ? ", SLURM job " : "",
             cJSON_IsString(job) ? job->valuestring : "", cJSON_IsString(t) ? t->valuestring : "?");
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
        int fd = open(R->lock_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd >= 0) {
            int ok = write(fd, text, tl) == (ssize_t)tl && fsync(fd) == 0;
            int e = errno;
            close(fd);
            if (!ok) {
                unlink(R->lock_path);
                rc = tp_fail(err, TP_EIO, "%s: cannot write the run lock: %s (run.dir must be writable)", R->lock_path,
                             strerror(e));
                break;
            }
            R->lock_text = text;
            return TP_OK;
        }
        if (errno != EEXIST) {
            rc = tp_fail(err, TP_EIO, "%s: cannot create the run lock: %s (run.dir must be writable)", R->lock_path,
                         strerror(errno));
            break;
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
        if (!cJSON_IsString(h) || !cJSON_IsNumber(p) || p->valuedouble < 1 || p->valuedouble > 4194304.0 ||
            p->valuedouble != floor(p->valuedouble) || (jb && !cJSON_IsString(jb))) {
            cJSON_Delete(j);
            rc = tp_fail(err, TP_EFORMAT,
                         "%s: run lock unreadable: expected a JSON object with string \"host\" and integer \"pid\"; "
                         "delete it if no run uses %s",
                         R->lock_path, rd);
            break;
        }
        pid_t pid = (pid_t)p->valuedouble;
        int same_host = !strcmp(h->valuestring, host);
        int stale = same_host && (pid == getpid() || (kill(pid, 0) != 0 && errno == ESRCH));
        int requeue = jb && jb->valuestring[0] && job[0] && !strcmp(jb->valuestring, job);
        char who[512];
        lock_describe(j, who, sizeof who);
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
    double el = now_s() - R->t_start;
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

/* XXH3-64 over the regular files of dir in name order (name and bytes). */
static int dir_digest(const char *dir, char *out, size_t n, tp_err *err) {
    struct dirent **ents = NULL;
    int ne = scandir(dir, &ents, NULL, alphasort);
    if (ne < 0) return tp_fail(err, TP_EIO, "%s: cannot list: %s", dir, strerror(errno));
    XXH3_state_t *xs = XXH3_createState();
    size_t bufsz = (size_t)4 << 20;
    unsigned char *buf = malloc(bufsz);
    int rc = xs && buf ? TP_OK : tp_fail(err, TP_ENOMEM, "out of memory");
    if (rc == TP_OK) XXH3_64bits_reset(xs);
    for (int i = 0; i < ne; i++) {
        char path[TP_PATH_MAX + 300];
        snprintf(path, sizeof path, "%s/%s", dir, ents[i]->d_name);
        struct stat st;
        if (rc == TP_OK && ents[i]->d_name[0] != '.' && stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            XXH3_64bits_update(xs, ents[i]->d_name, strlen(ents[i]->d_name) + 1);
            int fd = tp_open_regular(path, NULL, err);
            if (fd < 0) rc = fd;
            for (; rc == TP_OK;) {
                ssize_t got = read(fd, buf, bufsz);
                if (got < 0 && errno == EINTR) continue;
                if (got < 0) rc = tp_fail(err, TP_EIO, "%s: read failed: %s", path, strerror(errno));
                if (got <= 0) break;
                XXH3_64bits_update(xs, buf, (size_t)got);
            }
            if (fd >= 0) close(fd);
        }
        free(ents[i]);
    }
    free(ents);
    if (rc == TP_OK) snprintf(out, n, "xxh3:%016llx", (unsigned long long)XXH3_64bits_digest(xs));
    if (xs) XXH3_freeState(xs);
    free(buf);
    return rc;
}

/* "12.3 MB": bytes in kB, MB or GB (the unit that gives a number >= 1) */
static const char *fmt_size(char *buf, size_t n, double bytes) {
    if (bytes < 1e6) snprintf(buf, n, "%.1f kB", bytes / 1e3);
    else if (bytes < 1e9) snprintf(buf, n, "%.1f MB", bytes / 1e6);
    else snprintf(buf, n, "%.2f GB", bytes / 1e9);
    return buf;
}

/* lora.init: pissa (collective). Every LoRA pair starts at the principal
 * components of its frozen weight (tp_pissa_init: every rank, the same
 * order); the residual base W - s·B·A is written once by rank 0 as
 * run.dir/pissa-base (a merged export of the base with -B: safetensors in
 * the base's dtype, config.json, tokenizer files; into a temporary directory
 * renamed into place) and reused when it exists; then the decoder is rebuilt on it.
 * need_ab = 0 (a checkpoint will supply A and B): no SVD when the residual
 * base is there. */
static int setup_pissa(run *R, int need_ab, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    snprintf(R->pissa_dir, sizeof R->pissa_dir, "%s/pissa-base", c->run_dir);
    char probe[TP_PATH_MAX + 64];
    snprintf(probe, sizeof probe, "%s/config.json", R->pissa_dir);
    int have = tp_exists(probe);
    int rc = TP_OK;
    size_t n = tp_decoder_numel(R->m);
    float *theta = tp_decoder_theta(R->m);
    if (need_ab || !have) {
        tp_la *la = NULL;
        if ((rc = tp_la_create(0, &la, err))) return tp_err_prefix(err, "lora.init: pissa");
        double scale = c->dec.lora.rslora ? c->dec.lora.alpha / sqrt((double)c->dec.lora.r)
                                          : c->dec.lora.alpha / (double)c->dec.lora.r;
        tp_pissa_opts po = {.r = c->dec.lora.r, .scale = scale, .niter = c->pissa_niter, .oversample = 0,
                            .seed = c->dec.seed};
        double t0 = now_s();
        int count = 0;
        for (size_t i = 0; i < tp_decoder_nparams(R->m) && rc == TP_OK; i++) {
            const tp_param *pa = tp_decoder_param(R->m, i);
            const char *suf = strstr(pa->name, ".lora_A.weight");
            if (!pa->is_lora || !suf || strncmp(pa->name, "base_model.model.", 17)) continue;
            /* its lora_B and the frozen weight "<module>.weight" */
            char bname[TP_PARAM_NAME_MAX], wname[TP_PARAM_NAME_MAX];
            snprintf(bname, sizeof bname, "%.*s.lora_B.weight", (int)(suf - pa->name), pa->name);
            snprintf(wname, sizeof wname, "%.*s.weight", (int)(suf - pa->name - 17), pa->name + 17);
            const tp_param *pb = NULL;
            for (size_t j = 0; j < tp_decoder_nparams(R->m); j++)
                if (!strcmp(tp_decoder_param(R->m, j)->name, bname)) pb = tp_decoder_param(R->m, j);
            const tp_tensor_view *wv = NULL;
            for (size_t j = 0; j < R->hf->nweights; j++)
                if (!strcmp(R->hf->desc[j].name, wname)) wv = R->hf->views[j];
            if (!pb || !wv || wv->ndim != 2) {
                rc = tp_fail(err, TP_EINVAL, "lora.init: pissa: no lora_B or base weight %s for %s", wname, pa->name);
                break;
            }
            tp_la_src src = {wv->data, 0, wv->dtype, wv->shape[0], wv->shape[1], wv->shape[1], wname};
            rc = tp_pissa_init(la, &src, &po, theta + pa->offset, theta + pb->offset, NULL, NULL, err);
            count++;
        }
        tp_la_destroy(la);
        if (rc) return tp_err_prefix(err, "lora.init: pissa");
        if (R->d->rank == 0)
            fprintf(stderr, "tptt: PiSSA: %d LoRA modules initialised from the principal components (%s) in %.1f s\n",
                    count, c->pissa_niter < 0 ? "exact SVD" : "randomized SVD", now_s() - t0);
    }
    /* rank 0 keeps the initial adapter (A0, B0) as run.dir/pissa-init, a PEFT
     * adapter directory: `tptt adapter convert-pissa` needs it to turn the
     * trained adapter into one for the original base. Kept if there (the
     * same deterministic init); written before the residual base, so a run
     * that has pissa-base has it too. */
    if (R->d->rank == 0 && !have && rc == TP_OK) {
        char init_dir[TP_PATH_MAX + 32], probe_init[TP_PATH_MAX + 64];
        snprintf(init_dir, sizeof init_dir, "%s/pissa-init", c->run_dir);
        snprintf(probe_init, sizeof probe_init, "%s/adapter_model.safetensors", init_dir);
        if (!tp_exists(probe_init)) {
            tp_export_remove_stale(init_dir);
            tp_export_opts io = {.format = TP_EXPORT_PEFT, .dtype = -1, .drop_liza = 1, .step = 0};
            tp_strbuf rep;
            tp_strbuf_init(&rep);
            rc = tp_export(R->hf, R->m, &io, init_dir, &rep, err);
            tp_strbuf_free(&rep);
            if (rc) tp_err_prefix(err, "lora.init: pissa: writing the initial adapter %s", init_dir);
        }
    }
    /* rank 0 writes the residual base once */
    if (R->d->rank == 0 && !have && rc == TP_OK) {
        /* temporary directories of an earlier run killed while writing it (we
         * hold the run lock: nobody else writes pissa-base), then the space */
        int stale = tp_export_remove_stale(R->pissa_dir);
        if (stale > 0) fprintf(stderr, "tptt: PiSSA: removed %d unfinished residual base%s of an earlier run\n",
                               stale, stale == 1 ? "" : "s");
        /* in the base's dtype (that of its matrices), as PEFT keeps the residual
         * in the model's dtype: a BF16 7B base stays 14.5 GB, not 29 */
        tp_dtype dt = TP_F32;
        for (size_t i = 0; i < R->hf->nweights; i++)
            if (R->hf->desc[i].ndim == 2) { dt = R->hf->views[i]->dtype; break; }
        const char *dn = tp_dtype_name(dt);
        uint64_t need = 0;
        for (size_t i = 0; i < R->hf->nweights; i++)
            need += (uint64_t)R->hf->desc[i].shape[0] * (uint64_t)(R->hf->desc[i].ndim == 2 ? R->hf->desc[i].shape[1] : 1)
                    * tp_dtype_size(dt);
        char s1[32], s2[32];
        struct statvfs fs;
        if (statvfs(c->run_dir, &fs) == 0 && fs.f_blocks > 0 && (uint64_t)fs.f_bavail * fs.f_frsize < need)
            rc = tp_fail(err, TP_EIO, "lora.init: pissa: not enough disk space for the residual base %s: it needs "
                         "%s (%s), %s free", R->pissa_dir, fmt_size(s1, sizeof s1, (double)need), dn,
                         fmt_size(s2, sizeof s2, (double)fs.f_bavail * fs.f_frsize));
        float *sv = rc ? NULL : malloc(n * sizeof(float));
        if (!sv && rc == TP_OK) rc = tp_fail(err, TP_ENOMEM, "out of memory");
        if (sv) {
            memcpy(sv, theta, n * sizeof(float));
            for (size_t i = 0; i < tp_decoder_nparams(R->m); i++) { /* W + s·(-B)·A = W - s·B·A */
                const tp_param *p = tp_decoder_param(R->m, i);
                if (p->is_lora && strstr(p->name, ".lora_B.weight"))
                    for (size_t e = 0; e < p->numel; e++) theta[p->offset + e] = -theta[p->offset + e];
            }
            tp_export_opts eo = {.format = TP_EXPORT_MERGED, .dtype = (int)dt, .drop_liza = 1, .step = 0};
            tp_strbuf rep;
            tp_strbuf_init(&rep);
            rc = tp_export(R->hf, R->m, &eo, R->pissa_dir, &rep, err);
            tp_strbuf_free(&rep);
            memcpy(theta, sv, n * sizeof(float));
            free(sv);
            /* a full disk (or a file size limit) says so, with the size needed */
            if (rc && (strstr(err->msg, strerror(ENOSPC)) || strstr(err->msg, strerror(EFBIG)) ||
                       strstr(err->msg, strerror(EDQUOT))))
                tp_err_prefix(err, "lora.init: pissa: not enough disk space for the residual base %s (it needs "
                              "%s, %s)", R->pissa_dir, fmt_size(s1, sizeof s1, (double)need), dn);
            else if (rc) tp_err_prefix(err, "lora.init: pissa: writing the residual base %s", R->pissa_dir);
            else fprintf(stderr, "tptt: PiSSA: wrote the residual base %s (%s)\n", R->pissa_dir, dn);
        }
    } else if (R->d->rank == 0) {
        fprintf(stderr, "tptt: PiSSA: reusing the residual base %s\n", R->pissa_dir);
    }
    if ((rc = tp_dist_agree(R->d, rc, err))) return rc;
    /* rebuild on the residual base, keeping the trainables (the PiSSA A, B) */
    float *keep = malloc(n * sizeof(float));
    if (!keep) return tp_fail(err, TP_ENOMEM, "out of memory");
    memcpy(keep, theta, n * sizeof(float));
    tp_decoder_opts o = *tp_decoder_options(R->m);
    tp_decoder_destroy(R->m);
    R->m = NULL;
    tp_hf_close(R->hf);
    R->hf = NULL;
    if ((rc = tp_hf_open(R->pissa_dir, &R->hf, err)) == TP_OK && (rc = tp_decoder_create(R->hf, &o, &R->m, err)) == TP_OK) {
        if (tp_decoder_numel(R->m) != n) rc = tp_fail(err, TP_EINVAL, "%s: a different model", R->pissa_dir);
        else memcpy(tp_decoder_theta(R->m), keep, n * sizeof(float));
    }
    free(keep);
    if (rc) return tp_err_prefix(err, "lora.init: pissa: %s", R->pissa_dir);
    if (R->d->rank == 0) rc = dir_digest(R->pissa_dir, R->pissa_digest, sizeof R->pissa_digest, err);
    return rc;
}

static int setup(run *R, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    int rc = tp_hf_open(c->model_path, &R->hf, err);
    if (rc) return rc;
    tp_decoder_opts o = c->dec;
    if (c->matmul_auto) {
        tp_cpu_features cpu;
        tp_cpu_detect(&cpu);
        int all_bf16 = 1;
        for (size_t i = 0; i < R->hf->nweights; i++) all_bf16 &= R->hf->views[i]->dtype == TP_BF16;
        o.matmul = all_bf16 && cpu.avx512_bf16 ? TP_MM_BF16 : TP_MM_F32;
    }
    R->used = tp_mm_backend_effective(o.matmul);
    if ((rc = tp_decoder_create(R->hf, &o, &R->m, err))) return rc;
    return TP_OK;
}

/* Text formats: the tokenizer, checked against the model's vocabulary. */
static int setup_tokenizer(run *R, tp_tokenizer **tok, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    *tok = NULL;
    if (!strcmp(c->data.format, "tokens")) return TP_OK;
    int rc = tp_textdata_tokenizer(c, tok, err);
    if (rc) return rc;
    if ((int64_t)tp_tokenizer_vocab_size(*tok) > (int64_t)R->hf->cfg.vocab)
        return tp_fail(err, TP_EINVAL,
                       "data.tokenizer: %s has token ids up to %d, outside the model's vocabulary (vocab_size %lld in "
                       "%s/config.json)",
                       c->data.tokenizer[0] ? c->data.tokenizer : c->model_path, tp_tokenizer_vocab_size(*tok) - 1,
                       (long long)R->hf->cfg.vocab, c->model_path);
    return TP_OK;
}

/* XXH3-64 of the token shard (rank 0): a checkpoint records it, and a
 * resume over a data file with other contents is refused. */
static int data_digest(run *R, const char *shard, tp_err *err) {
    int fd = tp_open_regular(shard, NULL, err);
    if (fd < 0) return fd;
    XXH3_state_t *xs = XXH3_createState();
    size_t bufsz = (size_t)4 << 20;
    unsigned char *buf = malloc(bufsz);
    int rc = TP_OK;
    if (!xs || !buf) rc = tp_fail(err, TP_ENOMEM, "out of memory");
    else XXH3_64bits_reset(xs);
    for (; rc == TP_OK;) {
        ssize_t got = read(fd, buf, bufsz);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) rc = tp_fail(err, TP_EIO, "%s: read failed: %s", shard, strerror(errno));
        if (got <= 0) break;
        XXH3_64bits_update(xs, buf, (size_t)got);
    }
    if (rc == TP_OK)
        snprintf(R->data_digest, sizeof R->data_digest, "xxh3:%016llx", (unsigned long long)XXH3_64bits_digest(xs));
    if (xs) XXH3_freeState(xs);
    free(buf);
    close(fd);
    return rc;
}

/* After the (collective) data preparation: rows, sampler, buffers. */
static int setup_data(run *R, const char *shard, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    int flags = (!strcmp(c->data.long_docs, "drop") ? TP_DATA_DROP_LONG : 0) |
                (!strcmp(c->data.packing, "pad") ? TP_DATA_PAD : 0);
    int rc;
    if (c->eval.split > 0)
        rc = tp_dataset_open_split(shard, c->data.seq_len, flags, c->eval.split, c->dec.seed, TP_SPLIT_TRAIN, &R->data,
                                   err);
    else
        rc = tp_dataset_open(shard, c->data.seq_len, flags, &R->data, err);
    if (rc) return rc;
    if (tp_dataset_max_token(R->data) >= (uint64_t)R->hf->cfg.vocab)
        return tp_fail(err, TP_EINVAL, "%s: token id %llu is outside the model's vocabulary (vocab_size %lld in %s/config.json)",
                       shard, (unsigned long long)tp_dataset_max_token(R->data), (long long)R->hf->cfg.vocab,
                       c->model_path);
    if (tp_dataset_rows(R->data) < 1)
        return tp_fail(err, TP_EINVAL, "%s: no training rows%s", shard,
                       c->eval.split > 0 ? " left after eval.split held out its documents" : "");
    if (c->epochs > 0) {
        /* schedule.epochs: total_steps from the rows, validated as if it had been written */
        R->own->sched.total_steps = tp_train_cfg_total_steps(c, tp_dataset_rows(R->data));
        if (c->sched.warmup_steps > c->sched.total_steps)
            return tp_fail(err, TP_EINVAL,
                           "schedule.warmup_steps (%lld) > the %lld steps of schedule.epochs %g (%lld rows, batch.global "
                           "%lld)",
                           (long long)c->sched.warmup_steps, (long long)c->sched.total_steps, c->epochs,
                           (long long)tp_dataset_rows(R->data), (long long)c->global_batch);
        if ((rc = tp_lr_schedule_validate(&c->sched, err))) return tp_err_prefix(err, "schedule.epochs");
    }
    if ((rc = tp_sampler_create(tp_dataset_rows(R->data), c->global_batch, c->dec.seed, &R->sampler, err))) return rc;
    if ((rc = tp_grad_sync_create(R->m, c->bucket_mb, R->d->world, &R->sync, err))) return rc;
    size_t n = tp_decoder_numel(R->m);
    R->adam_m = tp_calloc(n ? n : 1, sizeof(float), err);
    R->adam_v = tp_calloc(n ? n : 1, sizeof(float), err);
    R->bk_theta = tp_calloc(n ? n : 1, sizeof(float), err);
    R->bk_m = tp_calloc(n ? n : 1, sizeof(float), err);
    R->bk_v = tp_calloc(n ? n : 1, sizeof(float), err);
    R->resume_json = tp_train_cfg_resume_json(c);
    if (!R->adam_m || !R->adam_v || !R->bk_theta || !R->bk_m || !R->bk_v || !R->resume_json) return TP_ENOMEM;
    if (R->d->rank == 0) return data_digest(R, shard, err);
    return TP_OK;
}

/* Rank 0, start-up: what the run will train on. */
static void data_summary(run *R, const char *shard) {
    const tp_train_cfg *c = R->cfg;
    int64_t T = c->data.seq_len, rows = tp_dataset_rows(R->data), G = c->global_batch;
    tp_shard sh;
    tp_err e2 = {0};
    int64_t docs = -1, held = 0;
    if (tp_shard_map(shard, &sh, &e2) == TP_OK) {
        docs = (int64_t)sh.n_docs;
        if (c->eval.split > 0)
            for (uint64_t i = 0; i < sh.n_docs; i++) held += tp_dataset_doc_heldout(c->dec.seed, c->eval.split, i);
        tp_shard_unmap(&sh);
    }
    /* labelled tokens of one pass over the rows (what an epoch trains on) */
    int64_t labelled = 0;
    int32_t *buf = malloc((size_t)T * 4 * sizeof(int32_t));
    if (buf) {
        for (int64_t r = 0; r < rows; r++) {
            tp_dataset_row(R->data, r, buf, buf + T, buf + 2 * T, buf + 3 * T);
            for (int64_t k = 0; k < T; k++) labelled += buf[T + k] != -100;
        }
        free(buf);
    } else {
        labelled = -1;
    }
    double spe = (double)rows / (double)G, epochs = (double)c->sched.total_steps * (double)G / (double)rows;
    char hd[96] = "";
    if (c->eval.split > 0)
        snprintf(hd, sizeof hd, " (%lld more held out for validation, eval.split %g)", (long long)held, c->eval.split);
    fprintf(stderr,
            "data: %lld documents%s, %lld rows of %lld tokens, %lld trained (labelled) tokens per epoch; %.4g steps "
            "per epoch at batch.global %lld; this run: %lld steps = %.4g epochs%s\n",
            (long long)(docs - held), hd, (long long)rows, (long long)T, (long long)labelled, spe, (long long)G,
            (long long)c->sched.total_steps, epochs, c->epochs > 0 ? " (schedule.epochs)" : "");
    if (R->eval_shard)
        fprintf(stderr, "validation: %lld rows of %lld tokens from %s%s, every %lld steps and after the last step\n",
                (long long)R->eval_rows, (long long)T, c->eval.split > 0 ? "the held-out documents of " : "",
                c->eval.split > 0 ? c->data.path : c->eval.path,
                (long long)(c->eval.every > 0 ? c->eval.every : c->sched.total_steps));
    if (epochs > 3.0)
        fprintf(stderr,
                "tptt: warning: the run repeats the training data %.3g times (more than ~3 epochs tends to overfit; "
                "lower schedule.total_steps, set schedule.epochs, or add data%s)\n",
                epochs, R->eval_shard ? "" : ", and set eval.path or eval.split to watch the validation loss");
}

/* After the training data: the validation shard (collective when eval.path
 * has to be tokenized), and its row count, checked to be non-empty. */
static int setup_eval(run *R, const char *train_shard, tp_tokenizer *tok, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    int rc = TP_OK;
    if (c->eval.path[0]) {
        if ((rc = tp_textdata_prepare_eval(c, tok, R->d, &R->eval_shard, err))) return rc; /* collective */
    } else if (c->eval.split > 0) {
        if (!(R->eval_shard = tp_strdup(train_shard, err))) return TP_ENOMEM;
    } else {
        return TP_OK;
    }
    tp_dataset *ds = NULL;
    rc = c->eval.split > 0 ? tp_dataset_open_split(R->eval_shard, c->data.seq_len, 0, c->eval.split, c->dec.seed,
                                                   TP_SPLIT_HELDOUT, &ds, err)
                           : tp_dataset_open(R->eval_shard, c->data.seq_len, 0, &ds, err);
    if (rc) return tp_err_prefix(err, c->eval.split > 0 ? "eval.split" : "eval.path");
    R->eval_rows = tp_dataset_rows(ds);
    if (c->eval.max_rows && R->eval_rows > c->eval.max_rows) R->eval_rows = c->eval.max_rows;
    if (R->eval_rows < 1)
        rc = c->eval.split > 0
                 ? tp_fail(err, TP_EINVAL, "eval.split: %g of the documents of %s held out none (too few documents; "
                           "raise eval.split or use eval.path)", c->eval.split, c->data.path)
                 : tp_fail(err, TP_EINVAL, "eval.path: %s: no rows to evaluate", c->eval.path);
    else if (tp_dataset_max_token(ds) >= (uint64_t)R->hf->cfg.vocab)
        rc = tp_fail(err, TP_EINVAL, "eval.path: %s: token id %llu is outside the model's vocabulary (vocab_size %lld)",
                     R->eval_shard, (unsigned long long)tp_dataset_max_token(ds), (long long)R->hf->cfg.vocab);
    tp_dataset_close(ds);
    return rc;
}

/* Collective: the validation loss of the model as it is after R->step steps
 * (MaG schedules at that step), without dropout; changes no training state. */
static int run_eval(run *R, double *loss, int64_t *tokens, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    tp_ppl_opts o = {.seq_len = c->data.seq_len,
                     .stride = 0,
                     .micro = c->micro_batch,
                     .max_rows = c->eval.max_rows,
                     .split = c->eval.split,
                     .split_seed = c->dec.seed};
    tp_ppl_result r;
    tp_decoder_set_step(R->m, R->step);
    tp_decoder_set_eval(R->m, 1);
    int rc = tp_eval_perplexity(R->m, R->eval_shard, &o, R->d, &r, err);
    tp_decoder_set_eval(R->m, 0);
    if (rc) return tp_err_prefix(err, "validation");
    *tokens = r.tokens;
    *loss = r.tokens > 0 ? r.loss_sum / (double)r.tokens : NAN;
    return TP_OK;
}

/* Dense FLOP per token of one optimizer step, counting the products with
 * the model's weight matrices only (not attention scores, LiZA, LoRA, norms):
 * 2 for the forward and 2 for dX of every frozen matrix, 2 more for dW of a
 * trained full matrix (trainable: projections / all), 2 more for the
 * recomputed forward of the layers (compute.recompute). */
static double flop_per_token(const run *R) {
    const tp_decoder_opts *o = &R->cfg->dec;
    double f = 0;
    for (size_t i = 0; i < R->hf->nweights; i++) {
        const tp_weight_desc *w = &R->hf->desc[i];
        int mod = w->kind == TP_W_Q ? TP_MOD_Q : w->kind == TP_W_K ? TP_MOD_K : w->kind == TP_W_V ? TP_MOD_V
                  : w->kind == TP_W_O ? TP_MOD_O : w->kind == TP_W_GATE ? TP_MOD_GATE : w->kind == TP_W_UP ? TP_MOD_UP
                  : w->kind == TP_W_DOWN ? TP_MOD_DOWN : -1;
        int head = w->kind == TP_W_LM_HEAD || (w->kind == TP_W_EMBED && R->hf->cfg.tie_embeddings);
        if (w->ndim != 2 || (mod < 0 && !head)) continue;
        int trained = o->trainable == TP_TRAIN_ALL ||
                      (o->trainable == TP_TRAIN_PROJECTIONS && mod >= 0 && ((o->lora.targets >> mod) & 1));
        double coef = 4 + (trained ? 2 : 0) + (o->recompute && mod >= 0 ? 2 : 0);
        f += coef * (double)w->shape[0] * (double)w->shape[1];
    }
    return f;
}

/* Collective: the rate of the matmul backend in use on the model's largest
 * layer matrix (its stored dtype), n = the micro-batch's tokens (at most
 * 1024, and at most ~15 GFLOP a product): forward and dX products
 * alternately for about 0.5 s (< 1 s), the fastest one's rate. Every rank
 * measures at the same time (as they will run); the mean over ranks is
 * kept. */
static void measure_rate(run *R) {
    const tp_train_cfg *c = R->cfg;
    const tp_tensor_view *best = NULL;
    for (size_t i = 0; i < R->hf->nweights; i++) {
        const tp_weight_desc *w = &R->hf->desc[i];
        if (w->ndim != 2 || w->layer < 0 || w->kind == TP_W_EMBED) continue;
        if (!best || R->hf->views[i]->numel > best->numel) best = R->hf->views[i];
    }
    double rate = 0;
    int64_t n = c->micro_batch * c->data.seq_len;
    if (n > 1024) n = 1024;
    tp_matmul *mm = NULL;
    tp_err e2 = {0};
    float *x = NULL, *y = NULL;
    if (best && best->ndim == 2 && tp_matmul_create(R->used, &mm, &e2) == TP_OK) {
        int64_t rows = best->shape[0], cols = best->shape[1], big = rows > cols ? rows : cols;
        /* at most ~15 GFLOP a product, so warm-up + 2 timed products stay under a second */
        int64_t cap = (int64_t)(15e9 / (2.0 * (double)rows * (double)cols));
        if (n > cap) n = cap < 32 ? 32 : cap;
        x = malloc((size_t)(n * big) * sizeof(float));
        y = malloc((size_t)(n * big) * sizeof(float));
        if (x && y) {
            for (int64_t i = 0; i < n * big; i++) x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
            tp_weight w = {best->data, best->dtype, rows, cols};
            int ok = tp_mm_xwt(mm, x, n, &w, y, 0, &e2) == TP_OK; /* warm-up (buffers, packing) */
            /* the best single product, not the mean: on a loaded node a mean over
             * 0.3 s swung 2.5x between runs (shares above 100% followed); the
             * best is what the hardware gives, so the share is conservative */
            double t0 = now_s(), t = 0, best_dt = 0;
            for (int64_t k = 0; ok && (t < 0.5 || k < 3) && k < 200; k++) {
                double a = now_s();
                ok = (k & 1) ? tp_mm_dyw(mm, x, n, &w, y, 0, &e2) == TP_OK : tp_mm_xwt(mm, x, n, &w, y, 0, &e2) == TP_OK;
                double dt = now_s() - a;
                if (ok && dt > 0 && (best_dt == 0 || dt < best_dt)) best_dt = dt;
                t = now_s() - t0;
            }
            if (ok && best_dt > 0) rate = 2.0 * (double)n * (double)rows * (double)cols / best_dt * 1e-9;
            snprintf(R->mm_what, sizeof R->mm_what, "%s on [%lld x %lld] %s, %lld tokens",
                     tp_matmul_backend(mm) == TP_MM_BF16 ? "oneDNN bf16" : "sgemm", (long long)rows, (long long)cols,
                     tp_dtype_name(best->dtype), (long long)n);
        }
    }
    free(x);
    free(y);
    tp_matmul_destroy(mm);
    /* every rank takes part, measured or not */
    double ok_ranks = tp_dist_sum_f64(rate > 0 ? 1.0 : 0.0), sum = tp_dist_sum_f64(rate);
    R->mm_rate = ok_ranks == (double)R->d->world ? sum / ok_ranks : 0;
    R->flop_token = flop_per_token(R);
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
    rc = setup(&R, &err);
    if (rc == TP_OK) rc = setup_tokenizer(&R, &tok, &err);
    if ((rc = tp_dist_agree(d, rc, &err)) == TP_OK && cfg->pissa) {
        /* A and B from the SVDs unless a checkpoint will replace them */
        int need_ab = !strcmp(resume_mode, "none") || !tp_ckpt_has_candidates(cfg->run_dir);
        rc = tp_dist_agree(d, setup_pissa(&R, need_ab, &err), &err);
    }
    if (rc == TP_OK) {
        rc = tp_textdata_prepare(cfg, tok, d, &shard, &err);
        if (rc == TP_OK) rc = setup_data(&R, shard, &err);
        /* eval.path is tokenized like the training data: collective again */
        if ((rc = tp_dist_agree(d, rc, &err)) == TP_OK) rc = setup_eval(&R, shard, tok, &err);
    }
    if (tok) tp_tokenizer_free(tok);
    if (rc == TP_OK && d->rank == 0) data_summary(&R, shard);
    free(shard);
    if (rc == TP_OK) rc = resume(&R, resume_mode, &err);
    /* a failure on any rank stops every rank */
    if (tp_dist_report_failure(d, rc, &err)) {
        teardown(&R);
        return TP_EXIT_ERROR;
    }
    tp_train_install_signals(); /* normally done by cmd_train before MPI_Init already */
    measure_rate(&R); /* collective */
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
                    "efficiency: %.4g dense GFLOP per token per step (weight products: forward, dX%s%s); matmul rate "
                    "%.1f GFLOP/s per rank (%s, measured now); each step reports its GFLOP/s and share of it\n",
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
    R.t_start = now_s();
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
        double t0 = now_s();
        lr = tp_lr_at(&cfg->sched, R.step);
        sr.lr = lr;
        rc = train_step(&R, ids, lab, ds, pos, &sr.loss, &sr.gnorm, &sr.skipped, &sr.step_tokens, &err);
        if (rc) break; /* only the non-finite abort gets here, on every rank alike */
        sr.step_time = now_s() - t0;
        if (sr.step_time > 0)
            sr.gflops = R.flop_token * (double)(cfg->global_batch / d->world * T) / sr.step_time * 1e-9;
        /* validation: every eval.every steps and after the last one */
        if (R.eval_shard && ((cfg->eval.every > 0 && R.step % cfg->eval.every == 0) || R.step == cfg->sched.total_steps)) {
            if ((rc = run_eval(&R, &sr.val_loss, &sr.val_tokens, &err))) break;
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
