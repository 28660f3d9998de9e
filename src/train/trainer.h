/* trainer.h - `tptt train`: the data-parallel training loop.
 *
 * Every rank maps the base model read-only, builds the same decoder, reads its
 * own slice of each global batch (dataset.h sampler), runs forward/backward
 * over its micro-batches (gradients of the GLOBAL mean loss: the labelled
 * token count of the whole global batch is summed across ranks first), sums
 * gradients with bucketed allreduces overlapping the last backward (dist.h),
 * clips by the global norm and applies the same AdamW update everywhere.
 *
 * Exit codes (tp_train_run's return value):
 *   0  training finished (total_steps reached)
 *   3  checkpointed on SIGUSR1/SIGTERM, not finished (resume with --resume auto)
 *   1  error (message printed; other ranks are aborted, no hang)
 *   2  usage/config error */
#ifndef TPTT_TRAIN_TRAINER_H
#define TPTT_TRAIN_TRAINER_H

#include "dist/dist.h"
#include "train/config.h"

enum { TP_EXIT_FINISHED = 0, TP_EXIT_ERROR = 1, TP_EXIT_USAGE = 2, TP_EXIT_CHECKPOINTED = 3 };

/* resume: "auto" (the newest valid checkpoint in run.dir, or a fresh start
 * when there is none), "none" (fresh start; its checkpoints replace any of
 * the same step), or the path of a checkpoint directory. */
int tp_train_run(const tp_train_cfg *cfg, const char *resume, const tp_dist *d);

/* SIGUSR1/SIGTERM only set a flag (checked at step boundaries). Called first
 * thing by `tptt train`, before MPI_Init, so a warning signal during start-up
 * cannot kill a rank. */
void tp_train_install_signals(void);

#endif
