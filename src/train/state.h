/* state.h - validation of a checkpoint's trainer_state.json before a resume
 * uses it: every field checked for type and range, and for consistency with
 * the checkpoint directory's name, the run config and the data set. Errors
 * are one line: "<dir>/trainer_state.json: field \"<name>\" is <value>,
 * expected <what>". */
#ifndef TPTT_TRAIN_STATE_H
#define TPTT_TRAIN_STATE_H

#include <stdint.h>

#include "util/err.h"

typedef struct tp_state_expect {
    const char *dir;            /* checkpoint directory (a step-N name must match "step") */
    int64_t global_batch, seq_len, total_steps, rows;
    uint64_t seed;
    int64_t (*epoch_of)(const void *ctx, int64_t step); /* NULL: epoch not checked */
    const void *epoch_ctx;
    const char *data_digest;    /* "" or NULL: not checked */
    const char *pissa_digest;   /* lora.init pissa: digest of run.dir/pissa-base ("" or NULL: not checked) */
    const char *resume_json;    /* this run's resume_config; NULL: not compared */
} tp_state_expect;

typedef struct tp_state_info {
    int64_t step, tokens_seen, consecutive_bad_steps, world_size; /* world_size 0 when absent */
    int64_t tokens_trained; /* labelled tokens trained on; -1 when absent (checkpoints before the field) */
} tp_state_info;

/* TP_OK and *out filled, or TP_EFORMAT/TP_EINVAL with the message. */
int tp_train_state_check(const char *text, const tp_state_expect *x, tp_state_info *out, tp_err *err);

#endif
