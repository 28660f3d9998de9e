/* config_check.c - the training configuration's cross-field checks (what
 * no single key can say: shapes against the world size, data against its
 * format, placeholders in paths) and the resume digest's canonical JSON.
 * Parsing and defaults are config.c; keys and rules: docs/config.md. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "train/config.h"
#include "train/config_impl.h"
#include "util/fsutil.h"

/* ---- cross-field checks ------------------------------------------------- */

static const char *name_of(const char *const *ch, int i) {
    int n = 0;
    while (ch[n]) n++;
    return i >= 0 && i < n ? ch[i] : "?";
}

/* Occurrences of pat in s. */
static int count_of(const char *s, const char *pat) {
    int n = 0;
    for (const char *p = strstr(s, pat); p; p = strstr(p + strlen(pat), pat)) n++;
    return n;
}

/* Template t must hold placeholder ph exactly `want` times (0 or 1). */
static int check_placeholder(const char *key, const char *t, const char *ph, int want, tp_err *err) {
    int n = count_of(t, ph);
    if (n == want) return TP_OK;
    if (want) return tp_fail(err, TP_EINVAL, "%s: the template must contain %s exactly once, found %d", key, ph, n);
    return tp_fail(err, TP_EINVAL, "%s: the template must not contain %s", key, ph);
}

static int one_of(const char *v, const char *const *ch) {
    for (; *ch; ch++)
        if (!strcmp(v, *ch)) return 1;
    return 0;
}

int tp_train_cfg_check_data(const tp_train_cfg *c, tp_err *err) {
    struct stat st;
    const tp_data_cfg *d = &c->data;
    int tokens = !strcmp(d->format, "tokens");
    if (!one_of(d->format, tp_cfg_ch_format))
        return tp_fail(err, TP_EINVAL, "data.format must be tokens, text, alpaca or chat, got '%s'", d->format);
    if (!d->path[0]) return tp_fail(err, TP_EINVAL, "data.path: not set (the %s)", tokens ? "token file" : "data file");
    if (stat(d->path, &st) != 0) return tp_fail(err, TP_EINVAL, "data.path: %s: no such file", d->path);
    if (S_ISDIR(st.st_mode))
        return tp_fail(err, TP_EINVAL, "data.path: %s: is a directory (expected a %s)", d->path,
                       tokens ? "token file" : "JSONL or .txt file");
    if (d->seq_len < 2) return tp_fail(err, TP_EINVAL, "data.seq_len must be >= 2, got %lld", (long long)d->seq_len);
    if (!one_of(d->long_docs, tp_cfg_ch_long_docs))
        return tp_fail(err, TP_EINVAL, "data.long_docs must be split or drop, got '%s'", d->long_docs);
    if (!one_of(d->packing, tp_cfg_ch_packing))
        return tp_fail(err, TP_EINVAL, "data.packing must be pack or pad, got '%s'", d->packing);
    if (!one_of(d->bad_records, tp_cfg_ch_bad))
        return tp_fail(err, TP_EINVAL, "data.bad_records must be skip or abort, got '%s'", d->bad_records);
    if (!one_of(d->txt_unit, tp_cfg_ch_txt_unit))
        return tp_fail(err, TP_EINVAL, "data.txt_unit must be line, paragraph or document, got '%s'", d->txt_unit);
    if (!one_of(d->add_bos, tp_cfg_ch_add_bos))
        return tp_fail(err, TP_EINVAL, "data.add_bos must be auto, true or false, got '%s'", d->add_bos);
    if (!d->text_field[0]) return tp_fail(err, TP_EINVAL, "data.text_field: empty (the JSONL field holding the text)");
    if (tokens) return TP_OK;
    if (!d->tokenizer[0] && !c->model_path[0])
        return tp_fail(err, TP_EINVAL, "data.tokenizer: not set and no model.path to take the tokenizer from");
    int rc;
    if ((rc = check_placeholder("data.alpaca.prompt", d->alpaca_prompt, "{instruction}", 1, err)) ||
        (rc = check_placeholder("data.alpaca.prompt", d->alpaca_prompt, "{input}", 1, err)) ||
        (rc = check_placeholder("data.alpaca.prompt_no_input", d->alpaca_prompt_no_input, "{instruction}", 1, err)) ||
        (rc = check_placeholder("data.alpaca.prompt_no_input", d->alpaca_prompt_no_input, "{input}", 0, err)) ||
        (rc = check_placeholder("data.chat.system", d->chat_system, "{content}", 1, err)) ||
        (rc = check_placeholder("data.chat.user", d->chat_user, "{content}", 1, err)) ||
        (rc = check_placeholder("data.chat.assistant", d->chat_assistant, "{content}", 1, err)))
        return rc;
    return TP_OK;
}

int tp_train_cfg_check(const tp_train_cfg *c, int world_size, tp_err *err) {
    struct stat st;
    int rc;
    const tp_decoder_opts *o = &c->dec;
    /* paths */
    if (!c->model_path[0])
        return tp_fail(err, TP_EINVAL, "model.path: not set (the base Hugging Face model directory)");
    if (stat(c->model_path, &st) != 0)
        return tp_fail(err, TP_EINVAL, "model.path: %s: no such directory", c->model_path);
    if (!S_ISDIR(st.st_mode)) return tp_fail(err, TP_EINVAL, "model.path: %s: not a directory", c->model_path);
    if (!c->run_dir[0]) return tp_fail(err, TP_EINVAL, "run.dir: not set (where checkpoints and metrics go)");
    if (stat(c->run_dir, &st) == 0 && !S_ISDIR(st.st_mode))
        return tp_fail(err, TP_EINVAL, "run.dir: %s: exists and is not a directory", c->run_dir);
    if ((rc = tp_train_cfg_check_data(c, err))) return rc;
    /* batch */
    if (world_size < 1) return tp_fail(err, TP_EINVAL, "world size must be >= 1, got %d", world_size);
    if (c->global_batch < 1) {
        if (c->global_batch == 0)
            return tp_fail(err, TP_EINVAL, "batch.global: not set (sequences per optimizer step)");
        return tp_fail(err, TP_EINVAL, "batch.global must be positive, got %lld", (long long)c->global_batch);
    }
    if (c->micro_batch < 1)
        return tp_fail(err, TP_EINVAL, "batch.micro must be positive, got %lld", (long long)c->micro_batch);
    if (c->global_batch % world_size != 0 || (c->global_batch / world_size) % c->micro_batch != 0)
        return tp_fail(err, TP_EINVAL, "batch.global (%lld) must be a multiple of ranks (%d) x batch.micro (%lld)",
                       (long long)c->global_batch, world_size, (long long)c->micro_batch);
    /* model options */
    if (o->trainable < TP_TRAIN_LORA || o->trainable > TP_TRAIN_ALL)
        return tp_fail(err, TP_EINVAL, "trainable: unknown value %d", (int)o->trainable);
    if (o->lora.r < 1 || o->lora.r > 65536)
        return tp_fail(err, TP_EINVAL, "lora.r must be between 1 and 65536, got %d", o->lora.r);
    if (!(isfinite(o->lora.alpha) && o->lora.alpha > 0))
        return tp_fail(err, TP_EINVAL, "lora.alpha must be a positive number, got %g", o->lora.alpha);
    if (!(o->lora.dropout >= 0 && o->lora.dropout < 1))
        return tp_fail(err, TP_EINVAL, "lora.dropout must be in [0, 1), got %g", o->lora.dropout);
    if (!o->lora.targets || (o->lora.targets >> TP_NMOD))
        return tp_fail(err, TP_EINVAL, "lora.target_modules: empty or invalid module set (mask 0x%x)", o->lora.targets);
    if (o->liza.order < 1 || o->liza.order > 8)
        return tp_fail(err, TP_EINVAL, "liza.order must be between 1 and 8, got %d", o->liza.order);
    if (o->liza.alpha_gate < TP_GATE_C || o->liza.alpha_gate > TP_GATE_KV)
        return tp_fail(err, TP_EINVAL, "liza.alpha_gate: unknown gate %d", o->liza.alpha_gate);
    if (o->liza.beta_gate < TP_GATE_C || o->liza.beta_gate > TP_GATE_KV)
        return tp_fail(err, TP_EINVAL, "liza.beta_gate: unknown gate %d", o->liza.beta_gate);
    if (o->liza.trick < TP_TRICK_DT || o->liza.trick > TP_TRICK_RDT)
        return tp_fail(err, TP_EINVAL, "liza.trick: unknown trick %d", o->liza.trick);
    if (o->liza.chunk < 1 || o->liza.chunk > 4096)
        return tp_fail(err, TP_EINVAL, "liza.chunk_size must be between 1 and 4096, got %d", o->liza.chunk);
    if (o->mag.mode < TP_MAG_CONSTANT || o->mag.mode > TP_MAG_LEARNABLE)
        return tp_fail(err, TP_EINVAL, "mag.mode: unknown mode %d", o->mag.mode);
    if (!(o->mag.mu0 >= 0 && o->mag.mu0 <= 1))
        return tp_fail(err, TP_EINVAL, "mag.mu0 must be in [0, 1], got %g", o->mag.mu0);
    if (!(o->mag.mu1 >= 0 && o->mag.mu1 <= 1))
        return tp_fail(err, TP_EINVAL, "mag.mu1 must be in [0, 1], got %g", o->mag.mu1);
    if (o->mag.mode == TP_MAG_LEARNABLE && !(o->mag.mu0 > 0 && o->mag.mu0 < 1))
        return tp_fail(err, TP_EINVAL,
                       "mag.mu0 must be strictly between 0 and 1 with mag.mode: learnable (the logit starts at "
                       "log(mu0/(1-mu0))), got %g", o->mag.mu0);
    if (o->mag.steps < 1)
        return tp_fail(err, TP_EINVAL, "mag.steps must be positive, got %lld", (long long)o->mag.steps);
    if (o->mag.period < 1)
        return tp_fail(err, TP_EINVAL, "mag.period must be positive, got %lld", (long long)o->mag.period);
    if (o->mag.nvalues < 1 || o->mag.nvalues > TP_MAG_MAX_VALUES)
        return tp_fail(err, TP_EINVAL, "mag.values must hold 1 to %d numbers, got %d", TP_MAG_MAX_VALUES,
                       o->mag.nvalues);
    for (int i = 0; i < o->mag.nvalues; i++)
        if (!(o->mag.values[i] >= 0 && o->mag.values[i] <= 1))
            return tp_fail(err, TP_EINVAL, "mag.values[%d] must be in [0, 1], got %g", i, o->mag.values[i]);
    if (o->matmul != TP_MM_F32 && o->matmul != TP_MM_BF16)
        return tp_fail(err, TP_EINVAL, "compute.matmul: unknown backend %d", (int)o->matmul);
    /* optimizer and schedule */
    if (!(isfinite(c->sched.peak_lr) && c->sched.peak_lr >= 0))
        return tp_fail(err, TP_EINVAL, "optimizer.lr must be a finite number >= 0, got %g", c->sched.peak_lr);
    if (!(isfinite(c->sched.min_lr) && c->sched.min_lr >= 0))
        return tp_fail(err, TP_EINVAL, "optimizer.min_lr must be a finite number >= 0, got %g", c->sched.min_lr);
    if (c->sched.min_lr > c->sched.peak_lr)
        return tp_fail(err, TP_EINVAL, "optimizer.min_lr (%g) must not exceed optimizer.lr (%g)", c->sched.min_lr,
                       c->sched.peak_lr);
    if (!(isfinite(c->weight_decay) && c->weight_decay >= 0))
        return tp_fail(err, TP_EINVAL, "optimizer.weight_decay must be a finite number >= 0, got %g", c->weight_decay);
    if (!isfinite(c->max_grad_norm))
        return tp_fail(err, TP_EINVAL, "optimizer.max_grad_norm must be finite (<= 0: no clipping), got %g",
                       c->max_grad_norm);
    int by_epochs = c->epochs != 0;
    if (by_epochs && !(isfinite(c->epochs) && c->epochs > 0 && c->epochs <= 1e9))
        return tp_fail(err, TP_EINVAL, "schedule.epochs must be a positive number (at most 1e9), got %g", c->epochs);
    if (by_epochs && c->sched.total_steps)
        return tp_fail(err, TP_EINVAL, "schedule.epochs (%g) and schedule.total_steps (%lld): set one of them, not both",
                       c->epochs, (long long)c->sched.total_steps);
    if (!by_epochs && c->sched.total_steps < 1) {
        if (c->sched.total_steps == 0)
            return tp_fail(err, TP_EINVAL, "schedule.total_steps: not set (or set schedule.epochs)");
        return tp_fail(err, TP_EINVAL, "schedule.total_steps must be positive, got %lld",
                       (long long)c->sched.total_steps);
    }
    if (c->sched.warmup_steps < 0)
        return tp_fail(err, TP_EINVAL, "schedule.warmup_steps must be >= 0, got %lld",
                       (long long)c->sched.warmup_steps);
    if (!by_epochs && c->sched.warmup_steps > c->sched.total_steps)
        return tp_fail(err, TP_EINVAL, "schedule.warmup_steps (%lld) > schedule.total_steps (%lld)",
                       (long long)c->sched.warmup_steps, (long long)c->sched.total_steps);
    if (!(c->adamw.beta1 >= 0 && c->adamw.beta1 < 1))
        return tp_fail(err, TP_EINVAL, "optimizer.beta1 must be in [0, 1), got %g", c->adamw.beta1);
    if (!(c->adamw.beta2 >= 0 && c->adamw.beta2 < 1))
        return tp_fail(err, TP_EINVAL, "optimizer.beta2 must be in [0, 1), got %g", c->adamw.beta2);
    if (!(isfinite(c->adamw.eps) && c->adamw.eps >= 0))
        return tp_fail(err, TP_EINVAL, "optimizer.eps must be a finite number >= 0, got %g", c->adamw.eps);
    /* the optimizer's own validators, as a backstop for what it requires
     * (with schedule.epochs the trainer validates again once total_steps is known) */
    tp_lr_schedule sv = c->sched;
    if (by_epochs) sv.total_steps = sv.warmup_steps > 0 ? sv.warmup_steps : 1;
    rc = tp_lr_schedule_validate(&sv, err);
    if (rc) return tp_err_prefix(err, "optimizer/schedule");
    if ((rc = tp_adamw_cfg_validate(&c->adamw, err))) return tp_err_prefix(err, "optimizer");
    /* run housekeeping */
    if (c->ckpt_every < 0)
        return tp_fail(err, TP_EINVAL, "checkpoint.every must be >= 0 (0: only at the end), got %lld",
                       (long long)c->ckpt_every);
    if (c->ckpt_keep < 1) return tp_fail(err, TP_EINVAL, "checkpoint.keep must be >= 1, got %d", c->ckpt_keep);
    if (c->log_every < 1)
        return tp_fail(err, TP_EINVAL, "logging.every must be >= 1, got %lld", (long long)c->log_every);
    if (c->max_bad_steps < 1)
        return tp_fail(err, TP_EINVAL, "faults.max_bad_steps must be >= 1, got %d", c->max_bad_steps);
    if (!(isfinite(c->bucket_mb) && c->bucket_mb > 0 && c->bucket_mb <= 65536))
        return tp_fail(err, TP_EINVAL, "dist.bucket_mb must be in (0, 65536], got %g", c->bucket_mb);
    if (c->pissa && o->trainable != TP_TRAIN_LORA)
        return tp_fail(err, TP_EINVAL, "lora.init: pissa needs trainable: lora, got trainable: %s",
                       tp_trainable_name(o->trainable));
    /* validation */
    const tp_eval_cfg *ev = &c->eval;
    if (!(ev->split == 0 || (ev->split > 0 && ev->split < 1)))
        return tp_fail(err, TP_EINVAL, "eval.split must be a share in (0, 1) of the training documents, got %g",
                       ev->split);
    if (ev->path[0] && ev->split > 0)
        return tp_fail(err, TP_EINVAL, "eval.path (%s) and eval.split (%g): set one of them, not both", ev->path,
                       ev->split);
    if (ev->every < 0 || ev->max_rows < 0)
        return tp_fail(err, TP_EINVAL, "eval.every and eval.max_rows must be >= 0, got %lld and %lld",
                       (long long)ev->every, (long long)ev->max_rows);
    if (!ev->path[0] && ev->split == 0 && (ev->every || ev->max_rows))
        return tp_fail(err, TP_EINVAL, "eval.%s: set, but there is nothing to evaluate (set eval.path or eval.split)",
                       ev->every ? "every" : "max_rows");
    if (ev->path[0]) {
        if (stat(ev->path, &st) != 0) return tp_fail(err, TP_EINVAL, "eval.path: %s: no such file", ev->path);
        if (S_ISDIR(st.st_mode))
            return tp_fail(err, TP_EINVAL, "eval.path: %s: is a directory (expected a %s file, like data.path)",
                           ev->path, c->data.format);
    }
    return TP_OK;
}

int64_t tp_train_cfg_total_steps(const tp_train_cfg *c, int64_t rows) {
    if (c->epochs <= 0 || c->global_batch < 1) return c->sched.total_steps;
    double t = ceil(c->epochs * (double)rows / (double)c->global_batch);
    if (!(t >= 1)) return 1;
    return t > (double)BIG ? BIG : (int64_t)t;
}

/* ---- resume digest ------------------------------------------------------ */

/* Integers as raw JSON text: exact for all int64 (cJSON numbers are doubles). */
static int add_int(cJSON *o, const char *name, long long v) {
    char b[32];
    snprintf(b, sizeof b, "%lld", v);
    return cJSON_AddRawToObject(o, name, b) != NULL;
}

char *tp_train_cfg_resume_json(const tp_train_cfg *c) {
    const tp_decoder_opts *o = &c->dec;
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    int ok = 1;
    /* keys in sorted order at every level */
    cJSON *batch = cJSON_AddObjectToObject(root, "batch");
    ok &= batch && add_int(batch, "global", (long long)c->global_batch);
    /* data: what decides the rows; for text formats also every option that
     * changes the tokens (the tokenizer as its path string, like model.path) */
    const tp_data_cfg *dc = &c->data;
    const char *f = dc->format;
    int text = !strcmp(f, "text"), alpaca = !strcmp(f, "alpaca"), chat = !strcmp(f, "chat");
    cJSON *data = cJSON_AddObjectToObject(root, "data");
    ok &= data != NULL;
    if (ok && (text || alpaca || chat))
        ok &= cJSON_AddStringToObject(data, "add_bos", dc->add_bos) &&
              cJSON_AddBoolToObject(data, "add_eos", dc->add_eos != 0);
    if (ok && alpaca) {
        cJSON *a = cJSON_AddObjectToObject(data, "alpaca");
        ok &= a && cJSON_AddStringToObject(a, "prompt", dc->alpaca_prompt) &&
              cJSON_AddStringToObject(a, "prompt_no_input", dc->alpaca_prompt_no_input);
    }
    if (ok && chat) {
        cJSON *ch = cJSON_AddObjectToObject(data, "chat");
        ok &= ch && cJSON_AddStringToObject(ch, "assistant", dc->chat_assistant) &&
              cJSON_AddStringToObject(ch, "system", dc->chat_system) &&
              cJSON_AddStringToObject(ch, "user", dc->chat_user);
    }
    ok &= ok && cJSON_AddStringToObject(data, "format", f) && cJSON_AddStringToObject(data, "long_docs", dc->long_docs);
    /* packing only when not the default, so checkpoints from before the key
     * existed (always "pack") keep resuming */
    if (ok && strcmp(dc->packing, "pack"))
        ok &= cJSON_AddStringToObject(data, "packing", dc->packing) != NULL;
    ok &= ok && cJSON_AddStringToObject(data, "path", dc->path) && add_int(data, "seq_len", (long long)dc->seq_len);
    /* a held-out share changes the training rows; only when set, so older
     * checkpoints keep resuming */
    if (ok && c->eval.split > 0) {
        cJSON *ev = cJSON_AddObjectToObject(root, "eval");
        ok &= ev && cJSON_AddNumberToObject(ev, "split", c->eval.split);
    }
    if (ok && text)
        ok &= cJSON_AddStringToObject(data, "text_field", dc->text_field) != NULL;
    if (ok && (text || alpaca || chat))
        ok &= cJSON_AddStringToObject(data, "tokenizer", dc->tokenizer) != NULL;
    if (ok && text)
        ok &= cJSON_AddStringToObject(data, "txt_unit", dc->txt_unit) != NULL;
    cJSON *liza = ok ? cJSON_AddObjectToObject(root, "liza") : NULL;
    ok &= liza && cJSON_AddStringToObject(liza, "alpha_gate", name_of(tp_cfg_ch_gate, o->liza.alpha_gate)) &&
          cJSON_AddBoolToObject(liza, "base_scale_attn", o->liza.base_scale_attn != 0) &&
          cJSON_AddStringToObject(liza, "beta_gate", name_of(tp_cfg_ch_gate, o->liza.beta_gate)) &&
          add_int(liza, "chunk_size", o->liza.chunk) && cJSON_AddBoolToObject(liza, "enabled", o->liza.enabled != 0) &&
          cJSON_AddBoolToObject(liza, "linear", o->liza.linear != 0) && add_int(liza, "order", o->liza.order) &&
          cJSON_AddStringToObject(liza, "trick", name_of(tp_cfg_ch_trick, o->liza.trick));
    cJSON *lora = ok ? cJSON_AddObjectToObject(root, "lora") : NULL;
    ok &= lora && cJSON_AddNumberToObject(lora, "alpha", o->lora.alpha);
    /* PiSSA trains on another base (the residual): in the JSON only then, so
     * older checkpoints keep resuming */
    if (ok && c->pissa) {
        char init[32];
        if (c->pissa_niter < 0) snprintf(init, sizeof init, "pissa");
        else snprintf(init, sizeof init, "pissa_niter_%d", c->pissa_niter);
        ok &= cJSON_AddStringToObject(lora, "init", init) != NULL;
    }
    ok &= ok && add_int(lora, "r", o->lora.r) && cJSON_AddBoolToObject(lora, "rslora", o->lora.rslora != 0);
    cJSON *tm = ok ? cJSON_AddArrayToObject(lora, "target_modules") : NULL;
    ok &= tm != NULL;
    for (int m = 0; ok && m < TP_NMOD; m++)
        if ((o->lora.targets >> m) & 1) {
            cJSON *s = cJSON_CreateString(tp_module_names[m]);
            if (!s || !cJSON_AddItemToArray(tm, s)) { cJSON_Delete(s); ok = 0; }
        }
    cJSON *mag = ok ? cJSON_AddObjectToObject(root, "mag") : NULL;
    ok &= mag && cJSON_AddBoolToObject(mag, "cross_gate", o->mag.cross_gate != 0) &&
          cJSON_AddStringToObject(mag, "learnable_shape", name_of(tp_cfg_ch_shape, o->mag.vector)) &&
          cJSON_AddStringToObject(mag, "mode", name_of(tp_cfg_ch_mag_mode, o->mag.mode));
    cJSON *model = ok ? cJSON_AddObjectToObject(root, "model") : NULL;
    ok &= model && cJSON_AddStringToObject(model, "path", c->model_path);
    /* schedule.epochs decides total_steps (with the rows, checked on their
     * own); only when set, so older checkpoints keep resuming */
    if (ok && c->epochs > 0) {
        cJSON *sch = cJSON_AddObjectToObject(root, "schedule");
        ok &= sch && cJSON_AddNumberToObject(sch, "epochs", c->epochs);
    }
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)o->seed);
    ok &= ok && cJSON_AddRawToObject(root, "seed", seed) != NULL;
    ok &= ok && cJSON_AddStringToObject(root, "trainable", tp_trainable_name(o->trainable)) != NULL;
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}
