#include "train/trainer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "data/dataset.h"
#include "data/textdata.h"
#include "io/hf_model.h"
#include "model/run_json.h"
#include "train/checkpoint.h"
#include "train/export.h"
#include "train/optim.h"
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
    const tp_train_cfg *cfg;
    const tp_dist *d;
    tp_hf_model *hf;
    tp_decoder *m;
    tp_dataset *data;
    tp_sampler *sampler;
    tp_grad_sync *sync;
    tp_mm_backend used;
    float *adam_m, *adam_v;
    int64_t step, tokens_seen;
    int bad_run;
    char *resume_json;
    FILE *metrics;
    int tty;
    double t_start;
    int64_t step_start;
} run;

static char *state_json(const run *R, double lr) {
    cJSON *s = cJSON_CreateObject();
    cJSON_AddNumberToObject(s, "step", (double)R->step);
    cJSON_AddNumberToObject(s, "tokens_seen", (double)R->tokens_seen);
    cJSON_AddNumberToObject(s, "epoch", (double)tp_sampler_epoch(R->sampler, R->step));
    cJSON *cur = cJSON_AddObjectToObject(s, "data_cursor");
    cJSON_AddNumberToObject(cur, "next_step", (double)R->step);
    cJSON_AddNumberToObject(cur, "global_batch", (double)R->cfg->global_batch);
    cJSON_AddNumberToObject(cur, "rows", (double)tp_dataset_rows(R->data));
    cJSON_AddNumberToObject(cur, "seed", (double)R->cfg->dec.seed);
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

static int save(run *R, double lr, tp_err *err) {
    int rc = TP_OK;
    if (R->d->rank == 0) {
        char *cfg = tp_run_config_json(R->cfg->model_path, &R->hf->cfg, &R->cfg->dec, R->used, R->step);
        char *ad = tp_adapter_config_json(&R->cfg->dec, R->cfg->model_path);
        char *st = state_json(R, lr);
        if (!cfg || !ad || !st) rc = tp_fail(err, TP_ENOMEM, "out of memory");
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

/* Keys of resume_config that differ between a checkpoint and this run. */
static int resume_mismatch(const char *ckpt_state, const char *now_json, char *msg, size_t n) {
    cJSON *st = cJSON_Parse(ckpt_state), *cur = cJSON_Parse(now_json);
    const cJSON *old = st ? cJSON_GetObjectItemCaseSensitive(st, "resume_config") : NULL;
    int bad = 0;
    size_t k = 0;
    msg[0] = 0;
    if (!old || !cur) {
        bad = 1;
        snprintf(msg, n, "trainer_state.json has no readable resume_config");
    } else {
        for (const cJSON *e = cur->child; e; e = e->next) {
            const cJSON *o = cJSON_GetObjectItemCaseSensitive(old, e->string);
            if (o && cJSON_Compare(o, e, 1)) continue;
            char *a = o ? cJSON_PrintUnformatted(o) : NULL, *b = cJSON_PrintUnformatted(e);
            k += (size_t)snprintf(msg + k, k < n ? n - k : 0, "%s%s: checkpoint %s, now %s", bad ? "; " : "", e->string,
                                  a ? a : "(absent)", b ? b : "?");
            free(a);
            free(b);
            bad = 1;
            if (k >= n) break;
        }
    }
    cJSON_Delete(st);
    cJSON_Delete(cur);
    return bad;
}

static int resume(run *R, const char *mode, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    char dir[TP_PATH_MAX + 64];
    if (!strcmp(mode, "none")) return TP_OK;
    if (!strcmp(mode, "auto")) {
        char ck[TP_PATH_MAX + 32];
        snprintf(ck, sizeof ck, "%s/checkpoints", c->run_dir);
        if (!tp_exists(ck)) return TP_OK; /* fresh run */
        tp_err e2 = {0};
        if (tp_ckpt_find_latest(c->run_dir, dir, sizeof dir, &e2) != TP_OK) {
            if (R->d->rank == 0) fprintf(stderr, "tptt: no usable checkpoint, starting fresh (%s)\n", e2.msg);
            return TP_OK;
        }
    } else {
        snprintf(dir, sizeof dir, "%s", mode);
    }
    /* compare the configurations before touching tensors: a changed LoRA
     * rank should read as such, not as a shape mismatch */
    char *st = NULL, *path = tp_path_join(dir, "trainer_state.json", err);
    int rc = path ? tp_read_file(path, 64u << 20, &st, NULL, err) : TP_ENOMEM;
    free(path);
    if (rc) return rc;
    char why[900];
    if (resume_mismatch(st, R->resume_json, why, sizeof why)) {
        rc = tp_fail(err, TP_EINVAL, "%s: cannot resume, the run changed: %s (start a new run.dir or pass --resume none)",
                     dir, why);
        free(st);
        return rc;
    }
    free(st);
    st = NULL;
    rc = tp_ckpt_load(dir, R->m, R->adam_m, R->adam_v, &st, err);
    if (rc) return rc;
    cJSON *j = cJSON_Parse(st);
    free(st);
    const cJSON *step = j ? cJSON_GetObjectItemCaseSensitive(j, "step") : NULL;
    const cJSON *tok = j ? cJSON_GetObjectItemCaseSensitive(j, "tokens_seen") : NULL;
    const cJSON *bad = j ? cJSON_GetObjectItemCaseSensitive(j, "consecutive_bad_steps") : NULL;
    const cJSON *ws = j ? cJSON_GetObjectItemCaseSensitive(j, "world_size") : NULL;
    if (!cJSON_IsNumber(step)) {
        cJSON_Delete(j);
        return tp_fail(err, TP_EFORMAT, "%s/trainer_state.json: missing \"step\"", dir);
    }
    R->step = (int64_t)step->valuedouble;
    R->tokens_seen = cJSON_IsNumber(tok) ? (int64_t)tok->valuedouble : 0;
    R->bad_run = cJSON_IsNumber(bad) ? (int)bad->valuedouble : 0;
    if (R->d->rank == 0)
        fprintf(stderr, "tptt: resuming from %s (step %lld%s)\n", dir, (long long)R->step,
                cJSON_IsNumber(ws) && (int)ws->valuedouble != R->d->world ? ", different world size: results continue "
                                                                              "within fp32 tolerance" : "");
    cJSON_Delete(j);
    return TP_OK;
}

/* JSON has no NaN/Inf: non-finite values are written as null */
static const char *jnum(char *buf, size_t n, double x) {
    if (isfinite(x)) snprintf(buf, n, "%.9g", x);
    else snprintf(buf, n, "null");
    return buf;
}

static void log_step(run *R, double loss, double lr, double gnorm, int skipped, double step_time, int64_t step_tokens) {
    const tp_train_cfg *c = R->cfg;
    if (R->d->rank != 0) return;
    double el = now_s() - R->t_start;
    int64_t done = R->step - R->step_start;
    double per = done > 0 ? el / (double)done : 0, eta = per * (double)(c->sched.total_steps - R->step);
    double tps = step_time > 0 ? (double)step_tokens / step_time : 0;
    double mu = tp_decoder_mu(R->m, 0);
    char e1[16], e2[16];
    hms(e1, sizeof e1, el);
    hms(e2, sizeof e2, eta);
    int last = R->step == c->sched.total_steps;
    if (R->step % c->log_every == 0 || last || skipped) {
        fprintf(stdout, "%sstep %lld/%lld | loss %.4f | lr %.3e | mu %.3f | gnorm %.3f | %.0f tok/s | %s elapsed | ETA %s%s%s",
                R->tty ? "\r\033[K" : "", (long long)R->step, (long long)c->sched.total_steps, loss, lr, mu, gnorm, tps,
                e1, e2, skipped ? " | SKIPPED (non-finite)" : "", R->tty && !last ? "" : "\n");
        fflush(stdout);
        if (R->metrics) {
            char j1[40], j2[40];
            fprintf(R->metrics,
                    "{\"step\":%lld,\"loss\":%s,\"lr\":%.9g,\"mu\":%.9g,\"grad_norm\":%s,\"tokens\":%lld,"
                    "\"tokens_per_s\":%.6g,\"elapsed_s\":%.6g,\"skipped\":%s,\"world_size\":%d,"
                    "\"slurm_job_id\":\"%s\",\"slurm_restart_count\":\"%s\",\"slurm_nodelist\":\"%s\"}\n",
                    (long long)R->step, jnum(j1, sizeof j1, loss), lr, mu, jnum(j2, sizeof j2, gnorm),
                    (long long)R->tokens_seen, tps, el,
                    skipped ? "true" : "false", R->d->world, env_or("SLURM_JOB_ID", ""),
                    env_or("SLURM_RESTART_COUNT", "0"), env_or("SLURM_JOB_NODELIST", ""));
            fflush(R->metrics);
        }
    }
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
    R->used = o.matmul;
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

/* After the (collective) data preparation: rows, sampler, buffers. */
static int setup_data(run *R, const char *shard, tp_err *err) {
    const tp_train_cfg *c = R->cfg;
    int flags = (!strcmp(c->data.long_docs, "drop") ? TP_DATA_DROP_LONG : 0) |
                (!strcmp(c->data.packing, "pad") ? TP_DATA_PAD : 0);
    int rc;
    if ((rc = tp_dataset_open(shard, c->data.seq_len, flags, &R->data, err))) return rc;
    if (tp_dataset_max_token(R->data) >= (uint64_t)R->hf->cfg.vocab)
        return tp_fail(err, TP_EINVAL, "%s: token id %llu is outside the model's vocabulary (vocab_size %lld in %s/config.json)",
                       shard, (unsigned long long)tp_dataset_max_token(R->data), (long long)R->hf->cfg.vocab,
                       c->model_path);
    if (tp_dataset_rows(R->data) < 1) return tp_fail(err, TP_EINVAL, "%s: no training rows", shard);
    if ((rc = tp_sampler_create(tp_dataset_rows(R->data), c->global_batch, c->dec.seed, &R->sampler, err))) return rc;
    if ((rc = tp_grad_sync_create(R->m, c->bucket_mb, R->d->world, &R->sync, err))) return rc;
    size_t n = tp_decoder_numel(R->m);
    R->adam_m = tp_calloc(n ? n : 1, sizeof(float), err);
    R->adam_v = tp_calloc(n ? n : 1, sizeof(float), err);
    R->resume_json = tp_train_cfg_resume_json(c);
    if (!R->adam_m || !R->adam_v || !R->resume_json) return TP_ENOMEM;
    return TP_OK;
}

static void teardown(run *R) {
    if (R->metrics) fclose(R->metrics);
    free(R->resume_json);
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
    if (!isfinite(loss) || !isfinite(gnorm) || global_cnt == 0) {
        *skipped = 1;
        R->bad_run++;
        if (R->bad_run > c->max_bad_steps)
            return tp_fail(err, TP_EINVAL,
                           "step %lld: %d consecutive steps with non-finite loss or gradients (loss %g, grad norm %g); "
                           "aborting (faults.max_bad_steps = %d). Lower optimizer.lr or check the data.",
                           (long long)R->step, R->bad_run, loss, gnorm, c->max_bad_steps);
    } else {
        *skipped = 0;
        R->bad_run = 0;
        float coef = tp_clip_coef(gnorm, c->max_grad_norm);
        if (coef != 1.0f) tp_scale(grad, n, coef);
        for (size_t i = 0; i < tp_decoder_nparams(R->m); i++) {
            const tp_param *p = tp_decoder_param(R->m, i);
            tp_adamw_update(&c->adamw, R->step + 1, lr, p->decay ? c->weight_decay : 0.0, theta + p->offset,
                            grad + p->offset, R->adam_m + p->offset, R->adam_v + p->offset, p->numel);
        }
    }
    R->step++;
    R->tokens_seen += G * T;
    return TP_OK;
}

int tp_train_run(const tp_train_cfg *cfg, const char *resume_mode, const tp_dist *d) {
    tp_err err = {0};
    run R;
    memset(&R, 0, sizeof R);
    R.cfg = cfg;
    R.d = d;
    /* mpirun gives rank 0 a pty even when the job log is a file: the updating
     * line is only for a plain interactive process */
    R.tty = d->rank == 0 && d->world == 1 && isatty(STDOUT_FILENO) && !getenv("OMPI_COMM_WORLD_SIZE") &&
            !getenv("PMI_RANK") && !getenv("SLURM_PROCID");
    int rc = tp_train_cfg_check(cfg, d->world, &err);
    if (rc) {
        if (d->rank == 0) fprintf(stderr, "tptt: %s\n", err.msg);
        return TP_EXIT_USAGE;
    }
    /* data preparation is collective: every rank enters it or none does */
    tp_tokenizer *tok = NULL;
    char *shard = NULL;
    rc = setup(&R, &err);
    if (rc == TP_OK) rc = setup_tokenizer(&R, &tok, &err);
    if ((rc = tp_dist_agree(d, rc, &err)) == TP_OK) {
        rc = tp_textdata_prepare(cfg, tok, d, &shard, &err);
        if (rc == TP_OK) rc = setup_data(&R, shard, &err);
    }
    if (tok) tp_tokenizer_free(tok);
    free(shard);
    if (rc == TP_OK) rc = resume(&R, resume_mode, &err);
    /* a failure on any rank stops every rank */
    if (tp_dist_report_failure(d, rc, &err)) {
        teardown(&R);
        return TP_EXIT_ERROR;
    }
    tp_train_install_signals(); /* normally done by cmd_train before MPI_Init already */
    if (d->rank == 0) {
        tp_err e2;
        char path[TP_PATH_MAX + 32];
        if (tp_mkdir_p(cfg->run_dir, &e2) == TP_OK) {
            snprintf(path, sizeof path, "%s/metrics.jsonl", cfg->run_dir);
            R.metrics = fopen(path, "a");
        }
        char plat[512];
        tp_platform_describe(plat, sizeof plat);
        fprintf(stderr,
                "tptt train: %s | %d rank%s | %zu trainable tensors, %zu values | %s matmul | %zu gradient buckets\n"
                "platform: %s\nslurm: job %s, restart %s, nodes %s\n",
                cfg->model_path, d->world, d->world > 1 ? "s" : "", tp_decoder_nparams(R.m), tp_decoder_numel(R.m),
                tp_mm_backend_name(R.used), tp_grad_sync_buckets(R.sync), plat, env_or("SLURM_JOB_ID", "-"),
                env_or("SLURM_RESTART_COUNT", "0"), env_or("SLURM_JOB_NODELIST", "-"));
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
        double loss, gnorm, t0 = now_s();
        int skipped;
        int64_t toks;
        lr = tp_lr_at(&cfg->sched, R.step);
        rc = train_step(&R, ids, lab, ds, pos, &loss, &gnorm, &skipped, &toks, &err);
        if (rc) break; /* only the non-finite abort gets here, on every rank alike */
        log_step(&R, loss, lr, gnorm, skipped, now_s() - t0, toks);
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
    free(ids);
    free(lab);
    free(ds);
    free(pos);
    teardown(&R);
    return exit_code;
}
