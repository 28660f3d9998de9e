/* checkpoint.h - run checkpoints (FORMATS.md "Run directory"): write
 * crash-safely, find the newest valid one, load it.
 *
 * <run>/checkpoints/step-00000100/
 *   adapter_model.safetensors  LoRA A/B (PEFT keys), {"format":"pt"}  } only when the model has
 *   adapter_config.json        PEFT LoRA config                       } LoRA parameters (trainable: lora)
 *   liza_model.safetensors     every other trainable (MaG logits, full weights)
 *   config.json                LiZA/MaG/LoRA settings + base model reference
 *   trainer_state.json         step, tokens, data cursor, schedule, per-rank RNG,
 *                              world size, config digest, SLURM info
 *   optimizer.safetensors      AdamW moments: "<param>.exp_avg", "<param>.exp_avg_sq"
 *   MANIFEST                   "<size> <xxh64 hex> <name>" per file; written last
 * <run>/checkpoints/LATEST     name of the newest complete checkpoint
 *
 * Writing: everything goes into checkpoints/.tmp-step-XXXXXXXX-<pid>/, each
 * file fsync'ed, MANIFEST last, the directory renamed into place, the parent
 * fsync'ed, then LATEST replaced by rename; finally checkpoints beyond `keep`
 * are deleted (oldest first) when they verify: a damaged one is never
 * deleted, and one in the way of a new directory of the same step is kept as
 * checkpoints/rejected-step-XXXXXXXX-<time>. Loading verifies MANIFEST (sizes, checksums);
 * a checkpoint that fails is skipped and the next older complete one used. */
#ifndef TPTT_TRAIN_CHECKPOINT_H
#define TPTT_TRAIN_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "model/decoder.h"
#include "util/err.h"

/* What a checkpoint holds besides tensors. JSON fragments are owned by the
 * caller (written verbatim / returned malloc'ed). */
typedef struct tp_ckpt_info {
    int64_t step;             /* optimizer steps done */
    const char *config_json;  /* config.json contents (FORMATS.md names) */
    const char *adapter_config_json; /* adapter_config.json contents (required, and written, only when
                                        the decoder has LoRA parameters) */
    const char *state_json;   /* trainer_state.json contents */
} tp_ckpt_info;

/* Write checkpoint `step` of the decoder's trainables (theta) and AdamW
 * moments m, v (same layout as theta) under run_dir; keep the newest `keep`. */
int tp_ckpt_write(const char *run_dir, const tp_decoder *m, const float *adam_m, const float *adam_v,
                  const tp_ckpt_info *info, int keep, tp_err *err);

/* Find the newest checkpoint that verifies: via LATEST, else by scanning
 * step-* directories. Writes its directory path into out (size n); returns
 * TP_OK, or TP_EIO with a message when none exists (message says why each
 * candidate was rejected). */
int tp_ckpt_find_latest(const char *run_dir, char *out, size_t n, tp_err *err);
/* Verify one checkpoint directory against its MANIFEST. */
int tp_ckpt_verify(const char *ckpt_dir, tp_err *err);

/* Load trainables into theta and moments into m, v (all sized like the
 * decoder's theta); every parameter of the decoder must be present with the
 * same shape. state_json receives trainer_state.json (caller frees). */
int tp_ckpt_load(const char *ckpt_dir, tp_decoder *m, float *adam_m, float *adam_v, char **state_json,
                 tp_err *err);

/* 1 if run_dir/checkpoints holds a LATEST file or any step-* directory (a
 * checkpoint that may be damaged, but is there). */
int tp_ckpt_has_candidates(const char *run_dir);
/* Rename run_dir/checkpoints to run_dir/checkpoints.before-<UTC time> (a
 * fresh run over old checkpoints deletes none of them); moved_to receives the
 * new path. */
int tp_ckpt_set_aside(const char *run_dir, char *moved_to, size_t n, tp_err *err);

#endif
