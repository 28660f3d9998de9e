/* checkpoint_impl.h - private to src/train/checkpoint*.c: names and helpers
 * shared by the writer (checkpoint.c) and the reader (checkpoint_read.c). */
#ifndef TPTT_CHECKPOINT_IMPL_H
#define TPTT_CHECKPOINT_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "model/decoder.h"
#include "util/err.h"

#define CKPT_DIR "checkpoints"
#define LATEST_NAME "LATEST"
#define MANIFEST_NAME "MANIFEST"
#define MANIFEST_LIMIT (1u << 20)
#define MOMENT_NAME_MAX (TP_PARAM_NAME_MAX + 16) /* "<param>.exp_avg_sq" in optimizer.safetensors */
#define STATE_LIMIT ((size_t)256 << 20)

/* Every file a checkpoint can hold, sorted; the first NADAPTER (the PEFT
 * adapter) only when the model has LoRA parameters (trainable: lora), and
 * then both. */
extern const char *const tp_ck_required_files[];
#define NREQUIRED 6
#define NADAPTER 2

/* A step-XXXXXXXX directory entry of checkpoints/. */
typedef struct tp_ck_entry {
    long long step;
    char name[64];
} tp_ck_entry;

/* Clear err's message (a success that carries no warning). */
void tp_ck_clear_err(tp_err *err);
/* Set err to code and the text, verbatim (already formatted); returns code. */
int tp_ck_set_msg(tp_err *err, int code, const char *text);
/* s[0..len), 1..18 decimal digits and nothing else, into *out: 0, else -1. */
int tp_ck_parse_digits(const char *s, size_t len, long long *out);
/* "step-<digits>" into *step: 0, else -1. */
int tp_ck_parse_step_name(const char *name, long long *step);
/* Size and xxh64 (seed 0) of a file, read in full. */
int tp_ck_hash_file(const char *path, uint64_t *size, uint64_t *hash, tp_err *err);
/* step-* directory entries of ckdir, newest first (*out: caller frees; NULL when none). */
int tp_ck_list_steps(const char *ckdir, tp_ck_entry **out, size_t *n, tp_err *err);
/* Verify a checkpoint directory's MANIFEST and every file it lists. */
int tp_ck_verify(const char *ckpt_dir, tp_err *err);

#endif
