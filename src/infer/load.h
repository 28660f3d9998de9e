/* load.h - one loader for every inference command: a plain base model, an
 * exported merged model, or a training checkpoint (base + LoRA + MaG + LiZA
 * settings and μ at the checkpoint's step).
 *
 * Sources (tp_load_opts):
 *   model only        a Hugging Face model directory (a base, or a `merged`
 *                     export): no LiZA, no LoRA.
 *   checkpoint        a step-* directory (config.json with model_type "tptt"),
 *                     or a run directory (its checkpoints/LATEST, falling back
 *                     to the newest complete one), or a Hugging Face model
 *                     directory (then as `model`). The base path comes from the
 *                     checkpoint's config.json `base_model_name` (absolute, or
 *                     relative to the current directory or to a directory above
 *                     the checkpoint); `model` overrides it when the base moved.
 * The checkpoint's MANIFEST is verified; LoRA tensors and MaG logits are
 * loaded into the decoder's fp32 trainables, applied unmerged (x·Wᵀ +
 * s·(x·Aᵀ)·Bᵀ: at rank r the extra reads are r·(in+out) floats per module
 * against in·out weights, under 1% for r = 8); frozen weights stay in the
 * read-only mmap in their stored dtype.
 *
 * Ownership: the tp_titan owns the opened base and the decoder (built with
 * o.inference); free with tp_titan_free. */
#ifndef TPTT_INFER_LOAD_H
#define TPTT_INFER_LOAD_H

#include <stdint.h>

#include "io/hf_model.h"
#include "model/decoder.h"
#include "util/err.h"

#define TP_TITAN_PATH_MAX 4096

enum { TP_LOAD_MATMUL_AUTO = 0, TP_LOAD_MATMUL_F32 = 1, TP_LOAD_MATMUL_BF16 = 2 };

typedef struct tp_load_opts {
    const char *model;      /* base / merged model directory, or NULL */
    const char *checkpoint; /* checkpoint or run directory, or NULL */
    int matmul;             /* TP_LOAD_MATMUL_*: auto = bf16 for all-bf16 weights on AVX512_BF16 CPUs */
} tp_load_opts;

typedef struct tp_titan {
    tp_hf_model *hf;
    tp_decoder *dec;
    char base_dir[TP_TITAN_PATH_MAX]; /* the model directory opened */
    char ckpt_dir[TP_TITAN_PATH_MAX]; /* the checkpoint loaded, "" for a plain model */
    int64_t step;                     /* the checkpoint's step (MaG schedules), 0 for a plain model */
    char desc[2 * TP_TITAN_PATH_MAX + 512];               /* one line: what was loaded (logs, reports) */
} tp_titan;

int tp_titan_load(const tp_load_opts *o, tp_titan **out, tp_err *err);
/* The matmul backend for a model: want = TP_LOAD_MATMUL_*; auto is bf16
 * (oneDNN) when every matrix is BF16 and the CPU has AVX512_BF16. */
tp_mm_backend tp_titan_pick_matmul(const tp_hf_model *hf, int want);
void tp_titan_free(tp_titan *t);

/* The decoder options a checkpoint's config.json describes (FORMATS.md
 * "Run directory"); path names the file in messages. base_name receives
 * base_model_name (size n). */
int tp_titan_parse_config(const char *path, const char *json, size_t len, tp_decoder_opts *o, int64_t *step,
                          char *base_name, size_t n, tp_err *err);

#endif
