/* config.h - a training run's configuration, from YAML (libyaml) plus
 * `--set key=value` overrides. Every key, type and default is documented in
 * docs/config.md. Errors name the file, the key and its line:
 *   "run.yaml:12: batch.micro: expected a positive integer, got 'two'"
 * Unknown keys, wrong types and impossible combinations are errors; nothing
 * is silently ignored. */
#ifndef TPTT_TRAIN_CONFIG_H
#define TPTT_TRAIN_CONFIG_H

#include <stdint.h>

#include "model/decoder.h"
#include "train/optim.h"
#include "util/err.h"

#define TP_PATH_MAX 1024

#define TP_TEMPLATE_MAX 2048

/* Default templates (docs/data.md): Stanford Alpaca's prompts, ChatML. */
#define TP_ALPACA_PROMPT                                                                                           \
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a " \
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### "               \
    "Input:\n{input}\n\n### Response:\n"
#define TP_ALPACA_PROMPT_NO_INPUT                                                                          \
    "Below is an instruction that describes a task. Write a response that appropriately completes the " \
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
#define TP_CHAT_SYSTEM "<|im_start|>system\n{content}<|im_end|>\n"
#define TP_CHAT_USER "<|im_start|>user\n{content}<|im_end|>\n"
#define TP_CHAT_ASSISTANT "<|im_start|>assistant\n{content}<|im_end|>\n"

typedef struct tp_data_cfg {
    char format[16];         /* "tokens" (default), "text", "alpaca", "chat" */
    char path[TP_PATH_MAX];  /* shard file (tokens) or source file */
    int64_t seq_len;         /* tokens per row, default 512 */
    char long_docs[8];       /* "split" (default) or "drop": documents longer than seq_len */
    char packing[8];         /* "pack" (default) or "pad": one document per row */
    char tokenizer[TP_PATH_MAX]; /* tokenizer dir or tokenizer.json ("" = model.path) */
    char cache_dir[TP_PATH_MAX]; /* tokenized shards ("" = <run.dir>/data-cache) */
    char bad_records[8];     /* "skip" (default) or "abort" */
    char text_field[128];    /* text: the JSONL field, default "text" */
    char txt_unit[16];       /* text, .txt files: "line" (default), "paragraph", "document" */
    char add_bos[8];         /* "auto" (default: as the tokenizer does), "true", "false" */
    int add_eos;             /* default 1 */
    char alpaca_prompt[TP_TEMPLATE_MAX];          /* {instruction}, {input} */
    char alpaca_prompt_no_input[TP_TEMPLATE_MAX]; /* {instruction} */
    char chat_system[TP_TEMPLATE_MAX], chat_user[TP_TEMPLATE_MAX], chat_assistant[TP_TEMPLATE_MAX]; /* {content} */
} tp_data_cfg;

/* eval.*: validation during training (docs/config.md "eval"). At most one
 * of path / split; every and max_rows need one of them. */
typedef struct tp_eval_cfg {
    char path[TP_PATH_MAX]; /* eval.path: a data file of data.format, tokenized like the training data ("" = none) */
    double split;           /* eval.split: share in (0, 1) of the training documents held out (0 = none) */
    int64_t every;          /* eval.every: steps between evaluations (0: only after the last step) */
    int64_t max_rows;       /* eval.max_rows: rows evaluated (0: all) */
} tp_eval_cfg;

typedef struct tp_train_cfg {
    char source[TP_PATH_MAX];     /* the YAML file (for messages) */
    char model_path[TP_PATH_MAX]; /* model.path: base HF model dir (required) */
    char hub_id[TP_PATH_MAX];     /* model.hub_id: PEFT base_model_name_or_path ("" = the absolute model.path) */
    tp_decoder_opts dec;          /* trainable, lora.*, liza.*, mag.*, compute.*, seed */
    int matmul_auto;              /* compute.matmul: auto */
    tp_data_cfg data;
    int64_t global_batch;         /* batch.global: sequences per optimizer step (required) */
    int64_t micro_batch;          /* batch.micro: sequences per forward/backward per rank, default 1 */
    tp_adamw_cfg adamw;           /* optimizer.beta1/beta2/eps */
    double weight_decay;          /* optimizer.weight_decay, default 0 */
    double max_grad_norm;         /* optimizer.max_grad_norm, default 1.0 (<= 0: no clipping) */
    tp_lr_schedule sched;         /* optimizer.lr (peak), optimizer.min_lr, schedule.kind/warmup_steps/total_steps */
    double epochs;                /* schedule.epochs: > 0 instead of total_steps (the trainer sets
                                     total_steps = ceil(epochs * rows / batch.global) once rows are known) */
    tp_eval_cfg eval;             /* eval.* */
    int pissa;                    /* lora.init: pissa / pissa_niter_K (PiSSA: adapter = principal components,
                                     the base becomes the residual, run.dir/pissa-base) */
    int pissa_niter;              /* -1: exact SVD ("pissa"); K >= 0: "pissa_niter_K" */
    char run_dir[TP_PATH_MAX];    /* run.dir (required): checkpoints/, metrics.jsonl */
    int64_t ckpt_every;           /* checkpoint.every, default 100 (0: only at the end/signal) */
    int ckpt_keep;                /* checkpoint.keep, default 3 */
    int64_t log_every;            /* logging.every, default 1 */
    int max_bad_steps;            /* faults.max_bad_steps: consecutive NaN/Inf steps before abort, default 5 */
    double bucket_mb;             /* dist.bucket_mb: allreduce bucket size, default 25 */
    char export_dir[TP_PATH_MAX]; /* export.model_dir: write the trained model as a HF model dir at the end ("" = no) */
} tp_train_cfg;

void tp_train_cfg_default(tp_train_cfg *c);

/* Parse a YAML file into c (defaults first). */
int tp_train_cfg_load(const char *path, tp_train_cfg *c, tp_err *err);
/* Apply one "dotted.key=value" override (value parsed as YAML scalar). */
int tp_train_cfg_set(tp_train_cfg *c, const char *kv, tp_err *err);
/* total_steps for schedule.epochs over `rows` training rows:
 * ceil(epochs * rows / global_batch), at least 1; sched.total_steps itself
 * when epochs is 0. */
int64_t tp_train_cfg_total_steps(const tp_train_cfg *c, int64_t rows);

/* Cross-field checks that need the world size (global batch divisible by
 * ranks x micro, ...). Called by the trainer after MPI_Init. */
int tp_train_cfg_check(const tp_train_cfg *c, int world_size, tp_err *err);
/* The data.* part of tp_train_cfg_check (what `tptt prepare-data` needs). */
int tp_train_cfg_check_data(const tp_train_cfg *c, tp_err *err);

/* Canonical JSON of every field that makes a resume meaningless when it
 * changes (base model, LiZA variant, LoRA rank/targets, trainable set,
 * seq_len, data path, seed, global batch); caller frees. Its digest goes in
 * trainer_state.json. */
char *tp_train_cfg_resume_json(const tp_train_cfg *c);

#endif
