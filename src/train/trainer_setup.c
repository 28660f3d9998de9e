/* trainer_setup.c - the training run's start-up (trainer_impl.h): the
 * model and its options, PiSSA's initialisation and residual base, the
 * tokenizer, the training and validation data, and the matmul rate the
 * efficiency figures are measured against. The loop is trainer.c. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>

#include "data/textdata.h"
#include "eval/perplexity.h"
#include "linalg/svd.h"
#include "model/run_json.h"
#include "train/export.h"
#include "train/trainer.h"
#include "train/trainer_impl.h"
#include "util/platform.h"

/* Feed a regular file's bytes into xs, reading through buf (bufsz bytes). */
static int hash_file_into(XXH3_state_t *xs, const char *path, unsigned char *buf, size_t bufsz, tp_err *err) {
    int fd = tp_open_regular(path, NULL, err);
    if (fd < 0) return fd;
    int rc = TP_OK;
    for (;;) {
        ssize_t got = read(fd, buf, bufsz);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) rc = tp_fail(err, TP_EIO, "%s: read failed: %s", path, strerror(errno));
        if (got <= 0) break;
        XXH3_64bits_update(xs, buf, (size_t)got);
    }
    close(fd);
    return rc;
}

/* "xxh3:<16 hex>" of one file (dir = 0) or of the regular files of a
 * directory in name order, each as its name (with the NUL) then its bytes. */
static int digest(const char *path, int dir, char *out, size_t n, tp_err *err) {
    struct dirent **ents = NULL;
    int ne = 0;
    if (dir && (ne = scandir(path, &ents, NULL, alphasort)) < 0)
        return tp_fail(err, TP_EIO, "%s: cannot list: %s", path, strerror(errno));
    XXH3_state_t *xs = XXH3_createState();
    size_t bufsz = (size_t)4 << 20;
    unsigned char *buf = malloc(bufsz);
    int rc = xs && buf ? TP_OK : tp_fail(err, TP_ENOMEM, "out of memory");
    if (rc == TP_OK) XXH3_64bits_reset(xs);
    if (rc == TP_OK && !dir) rc = hash_file_into(xs, path, buf, bufsz, err);
    for (int i = 0; i < ne; i++) {
        char fp[TP_PATH_MAX + 300];
        snprintf(fp, sizeof fp, "%s/%s", path, ents[i]->d_name);
        struct stat st;
        if (rc == TP_OK && ents[i]->d_name[0] != '.' && stat(fp, &st) == 0 && S_ISREG(st.st_mode)) {
            XXH3_64bits_update(xs, ents[i]->d_name, strlen(ents[i]->d_name) + 1);
            rc = hash_file_into(xs, fp, buf, bufsz, err);
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
int tp_tr_setup_pissa(run *R, int need_ab, tp_err *err) {
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
        double t0 = tp_tr_now();
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
                    count, c->pissa_niter < 0 ? "exact SVD" : "randomized SVD", tp_tr_now() - t0);
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
            if (rc && tp_err_is_disk_full(err))
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
    if (R->d->rank == 0) rc = digest(R->pissa_dir, 1, R->pissa_digest, sizeof R->pissa_digest, err);
    return rc;
}

int tp_tr_setup(run *R, tp_err *err) {
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
int tp_tr_setup_tokenizer(run *R, tp_tokenizer **tok, tp_err *err) {
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
int tp_tr_setup_data(run *R, const char *shard, tp_err *err) {
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
    /* the token shard's digest (rank 0): a checkpoint records it, and a resume
     * over a data file with other contents is refused */
    if (R->d->rank == 0) return digest(shard, 0, R->data_digest, sizeof R->data_digest, err);
    return TP_OK;
}

/* Rank 0, start-up: what the run will train on. */
void tp_tr_data_summary(run *R, const char *shard) {
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
int tp_tr_setup_eval(run *R, const char *train_shard, tp_tokenizer *tok, tp_err *err) {
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
int tp_tr_run_eval(run *R, double *loss, int64_t *tokens, tp_err *err) {
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

/* The model's weight matrices as the step uses them: per matrix, dense FLOP
 * per token of its forward-direction products (x·Wᵀ: the forward, the
 * recomputed forward of a layer with compute.recompute, and dW of a trained
 * full weight, timed as a forward product) and of its dX product (dY·W).
 * Only the products with the model's weights count (not attention scores,
 * LiZA, LoRA, norms). Returns 0 for a matrix the step does not multiply. */
static int weight_flops(const run *R, const tp_weight_desc *w, double *fwd, double *dx) {
    const tp_decoder_opts *o = &R->cfg->dec;
    int mod = w->kind == TP_W_Q ? TP_MOD_Q : w->kind == TP_W_K ? TP_MOD_K : w->kind == TP_W_V ? TP_MOD_V
              : w->kind == TP_W_O ? TP_MOD_O : w->kind == TP_W_GATE ? TP_MOD_GATE : w->kind == TP_W_UP ? TP_MOD_UP
              : w->kind == TP_W_DOWN ? TP_MOD_DOWN : -1;
    int head = w->kind == TP_W_LM_HEAD || (w->kind == TP_W_EMBED && R->hf->cfg.tie_embeddings);
    if (w->ndim != 2 || (mod < 0 && !head)) return 0;
    int trained = o->trainable == TP_TRAIN_ALL ||
                  (o->trainable == TP_TRAIN_PROJECTIONS && mod >= 0 && ((o->lora.targets >> mod) & 1));
    double rc = (double)w->shape[0] * (double)w->shape[1];
    *fwd = (2.0 + (trained ? 2 : 0) + (o->recompute && mod >= 0 ? 2 : 0)) * rc;
    *dx = 2.0 * rc;
    return mod >= 0 ? 1 : 2; /* 2: the LM head (runs on blocks of tokens) */
}

/* Dense FLOP per token of one optimizer step: 4 per frozen weight (forward
 * and dX), 6 per trained full weight (dW too), +2 per layer weight with
 * recompute. */
static double flop_per_token(const run *R) {
    double f = 0, fw, dx;
    for (size_t i = 0; i < R->hf->nweights; i++)
        if (weight_flops(R, &R->hf->desc[i], &fw, &dx)) f += fw + dx;
    return f;
}

/* Best time of a product over at least 3 timed runs and ~0.05 s (exactly 3
 * when one takes over 0.25 s), after a warm-up (primitive creation, first
 * touch); < 0 on failure. */
static double best_product_s(tp_matmul *mm, int dyw, const float *x, int64_t n, const tp_weight *w, float *y) {
    tp_err e = {0};
    if ((dyw ? tp_mm_dyw(mm, x, n, w, y, 0, &e) : tp_mm_xwt(mm, x, n, w, y, 0, &e)) != TP_OK) return -1;
    double best = 0, t0 = tp_tr_now();
    for (int k = 0; k < 30; k++) {
        double a = tp_tr_now();
        if ((dyw ? tp_mm_dyw(mm, x, n, w, y, 0, &e) : tp_mm_xwt(mm, x, n, w, y, 0, &e)) != TP_OK) return -1;
        double dt = tp_tr_now() - a, t = tp_tr_now() - t0;
        if (best == 0 || dt < best) best = dt;
        if (k >= 2 && (t >= 0.05 || best > 0.25)) break;
    }
    return best > 0 ? best : -1;
}

/* Collective: the raw rate of the matmul backend in use on the step's own
 * frozen-weight products. Every distinct weight shape (stored dtype) is
 * timed forward (x·Wᵀ) and backward (dY·W) with the step's rows: the
 * micro-batch's tokens (at most 1024: the GEMMs are saturated by then) and,
 * for the LM head, its block of tokens. Each product's best time is kept (a
 * mean over a short window swung 2.5x with the machine's load; the best is
 * what the hardware gives, so the share errs low). The rate is the step's
 * dense FLOP over the time those products take at those rates, so a step at
 * 100% spends its whole time in raw GEMM. Every rank measures at the same
 * time (as they will run); the mean over ranks is kept. */
void tp_tr_measure_rate(run *R) {
    const tp_train_cfg *c = R->cfg;
    int64_t n = c->micro_batch * c->data.seq_len;
    if (n > 1024) n = 1024;
    int64_t nh = tp_decoder_head_block(R->hf->cfg.vocab, c->micro_batch * c->data.seq_len);
    if (nh > 1024) nh = 1024;
    enum { MAXC = 16 };
    struct shape_cls { int64_t rows, cols, n; tp_dtype dt; const void *data; double t_fwd, t_dx; } cls[MAXC];
    int ncls = 0, ok = 1;
    size_t widest = 0;
    for (size_t i = 0; i < R->hf->nweights && ok; i++) {
        double fw, dx;
        const tp_weight_desc *w = &R->hf->desc[i];
        int kind = weight_flops(R, w, &fw, &dx);
        if (!kind) continue;
        const tp_tensor_view *v = R->hf->views[i];
        int64_t rows = v->shape[0], cols = v->shape[1], nn = kind == 2 ? nh : n;
        int j = 0;
        while (j < ncls && !(cls[j].rows == rows && cls[j].cols == cols && cls[j].n == nn && cls[j].dt == v->dtype))
            j++;
        if (j == ncls) {
            if (ncls == MAXC) { ok = 0; break; }
            cls[ncls++] = (struct shape_cls){rows, cols, nn, v->dtype, v->data, 0, 0};
        }
        size_t need = (size_t)nn * (size_t)(rows > cols ? rows : cols);
        if (need > widest) widest = need;
    }
    double rate = 0, peak = 0;
    tp_matmul *mm = NULL;
    tp_err e2 = {0};
    float *x = NULL, *y = NULL;
    if (ok && ncls > 0 && tp_matmul_create(R->used, &mm, &e2) == TP_OK) {
        x = malloc(widest * sizeof(float));
        y = malloc(widest * sizeof(float));
        if (x && y) {
            for (size_t i = 0; i < widest; i++) x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
            for (int j = 0; j < ncls && ok; j++) {
                tp_weight w = {cls[j].data, cls[j].dt, cls[j].rows, cls[j].cols};
                cls[j].t_fwd = best_product_s(mm, 0, x, cls[j].n, &w, y);
                cls[j].t_dx = best_product_s(mm, 1, x, cls[j].n, &w, y);
                ok = cls[j].t_fwd > 0 && cls[j].t_dx > 0;
                double f = 2.0 * (double)cls[j].n * (double)cls[j].rows * (double)cls[j].cols * 1e-9;
                if (ok && f / cls[j].t_fwd > peak) peak = f / cls[j].t_fwd;
                if (ok && f / cls[j].t_dx > peak) peak = f / cls[j].t_dx;
            }
            /* seconds per token of the step's products at the measured rates */
            double sec = 0, fw, dx;
            for (size_t i = 0; i < R->hf->nweights && ok; i++) {
                const tp_weight_desc *w = &R->hf->desc[i];
                int kind = weight_flops(R, w, &fw, &dx);
                if (!kind) continue;
                const tp_tensor_view *v = R->hf->views[i];
                int64_t nn = kind == 2 ? nh : n;
                int j = 0;
                while (cls[j].rows != v->shape[0] || cls[j].cols != v->shape[1] || cls[j].n != nn ||
                       cls[j].dt != v->dtype)
                    j++;
                double per = 2.0 * (double)cls[j].n * (double)cls[j].rows * (double)cls[j].cols; /* FLOP a product */
                sec += fw / per * cls[j].t_fwd + dx / per * cls[j].t_dx;
            }
            if (ok && sec > 0) rate = flop_per_token(R) / sec * 1e-9;
            snprintf(R->mm_what, sizeof R->mm_what,
                     "%s on the step's %d weight shapes x 2 directions, %lld tokens (head %lld); fastest product "
                     "%.1f GFLOP/s", tp_matmul_backend(mm) == TP_MM_BF16 ? "oneDNN bf16" : "sgemm", ncls,
                     (long long)n, (long long)nh, peak);
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

