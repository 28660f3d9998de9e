/* trainer_impl.h - private to src/train/trainer*.c: the run (everything
 * the training loop holds) shared by the loop (trainer.c: resume, steps,
 * logging, checkpoints) and the start-up (trainer_setup.c: model, PiSSA,
 * tokenizer, data, validation set, the efficiency measurement). */
#ifndef TPTT_TRAINER_IMPL_H
#define TPTT_TRAINER_IMPL_H

#include <stdint.h>
#include <time.h>

#include "data/dataset.h"
#include "dist/dist.h"
#include "io/hf_model.h"
#include "kernels/matmul.h"
#include "model/decoder.h"
#include "tok/tokenizer.h"
#include "train/config.h"
#include "util/err.h"
#include "util/fsutil.h"

static inline double tp_tr_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
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
    double mm_rate;     /* GFLOP/s of the matmul backend on the step's own weight products, measured at start-up (each
                           shape's best time; mean over ranks running at once); 0: not measured */
    char mm_what[200];  /* how it was measured */
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

/* Start-up, in the order tp_train_run calls them; each returns a status and
 * fills err (collective where it says so in trainer_setup.c). */
int tp_tr_setup_pissa(run *R, int need_ab, tp_err *err);
int tp_tr_setup(run *R, tp_err *err);
int tp_tr_setup_tokenizer(run *R, tp_tokenizer **tok, tp_err *err);
int tp_tr_setup_data(run *R, const char *shard, tp_err *err);
void tp_tr_data_summary(run *R, const char *shard);
int tp_tr_setup_eval(run *R, const char *train_shard, tp_tokenizer *tok, tp_err *err);
int tp_tr_run_eval(run *R, double *loss, int64_t *tokens, tp_err *err);
void tp_tr_measure_rate(run *R);

#endif
