/* optim.h - AdamW, global gradient-norm clipping and the learning-rate
 * schedule (LIZA.md section 5), numerically matching the PyTorch /
 * Hugging Face training loop that the trainer replaces:
 *
 *   lr = tp_lr_at(&sched, step)                       step 0-based
 *   sq = sum over trainable tensors of tp_sum_squares(grad)   (then allreduce)
 *   coef = tp_clip_coef(sqrt(sq), max_norm); tp_scale(grad, n, coef) per tensor
 *   tp_adamw_update(&cfg, step + 1, lr, wd_of_group, ...) per parameter group
 *
 * equals torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW.step() +
 * transformers' get_{cosine,linear,constant}_schedule_with_warmup.
 *
 * Buffers are flat fp32 arrays owned by the caller; nothing here allocates or
 * keeps pointers. All loops are OpenMP-parallel and give bit-identical results
 * for any number of threads (elementwise work is independent; the one
 * reduction has a fixed blocking, see tp_sum_squares). */
#ifndef TPTT_TRAIN_OPTIM_H
#define TPTT_TRAIN_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

/* ---- AdamW ------------------------------------------------------------- */

/* Hyperparameters shared by all parameter groups (torch.optim.AdamW's betas
 * and eps; weight decay and lr are per call). */
typedef struct tp_adamw_cfg {
    double beta1, beta2; /* 0 <= beta < 1; torch default 0.9, 0.999 */
    double eps;          /* >= 0; torch default 1e-8 */
} tp_adamw_cfg;

/* torch.optim.AdamW's defaults. */
#define TP_ADAMW_CFG_DEFAULT ((tp_adamw_cfg){.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8})

/* TP_OK, or TP_EINVAL with a message naming the bad field ("adamw: beta1 ...")
 * for values torch.optim.AdamW rejects (beta outside [0,1), eps < 0) or that
 * are not finite. */
int tp_adamw_cfg_validate(const tp_adamw_cfg *c, tp_err *err);

/* One AdamW step over param[0..n), in place, with torch.optim.AdamW's
 * single-tensor algorithm (amsgrad=False, maximize=False):
 *
 *   p ← p·(1 − lr·wd)                            decoupled weight decay
 *   m ← β1·m + (1−β1)·g
 *   v ← β2·v + (1−β2)·g²
 *   p ← p − (lr / (1−β1^step)) · m / (sqrt(v) / sqrt(1−β2^step) + eps)
 *
 * step is the 1-based number of this update (torch's state['step'] after its
 * increment); it must be >= 1 and the same for every group of one update.
 * m and v are the moments (start at 0, keep between calls; optimizer state).
 * grad is read only. lr and weight_decay are those of this parameter group
 * (weight_decay 0 for norms/biases).
 *
 * lr and weight_decay are doubles because torch keeps them as Python floats
 * (a float argument converts without loss). Rounding follows torch 1.13's CPU
 * kernels operation by operation: scalars are formed in double and rounded to
 * float once, m and v use a fused multiply-add as torch's AVX2 kernels do
 * (fmaf: exact everywhere, inline where the CPU has FMA), the rest is float
 * arithmetic in torch's order. The trajectories agree with torch bit for bit
 * (tests/test_optim_torch.py, torch 1.13 with AVX2 kernels). */
void tp_adamw_update(const tp_adamw_cfg *c, int64_t step, double lr, double weight_decay, float *param,
                     const float *grad, float *m, float *v, size_t n);

/* ---- gradient clipping ------------------------------------------------- */

/* Elements per block of tp_sum_squares (part of its definition). */
#define TP_SUMSQ_BLOCK 4096

/* Σ x[i]² in double, deterministic: x is cut into blocks of TP_SUMSQ_BLOCK
 * elements (the last may be short); each block's squares are summed in double
 * in index order starting from 0.0, and the block sums are added in block
 * order starting from 0.0. Squares of floats are exact in double, so only the
 * additions round. Same bits for any thread count. n = 0 gives 0. */
double tp_sum_squares(const float *x, size_t n);

/* The factor torch.nn.utils.clip_grad_norm_ multiplies every gradient by:
 * min(1, max_norm / (total_norm + 1e-6)), where total_norm is the global L2
 * norm (sqrt of the allreduced sum of tp_sum_squares over all trainable
 * tensors). max_norm <= 0 means no clipping and gives 1. Like torch, a NaN
 * total_norm gives NaN and an infinite one 0: the caller checks
 * isfinite(total_norm) first if it wants to skip such steps. Computed in double
 * (torch: float32; differs by ~1e-7 relative). */
float tp_clip_coef(double total_norm, double max_norm);

/* x[i] *= s for i < n. */
void tp_scale(float *x, size_t n, float s);

/* ---- learning-rate schedule -------------------------------------------- */

enum { TP_LR_COSINE = 0, TP_LR_LINEAR = 1, TP_LR_CONSTANT = 2 };

/* Warmup then decay, as transformers' get_cosine_schedule_with_warmup
 * (num_cycles 0.5), get_linear_schedule_with_warmup and
 * get_constant_schedule_with_warmup, with a floor min_lr. With w =
 * warmup_steps, T = total_steps:
 *
 *   step < w:   lr = peak_lr · step / max(1, w)            (all kinds; from 0)
 *   otherwise:  lr = min_lr + (peak_lr − min_lr) · f
 *     cosine:   f = max(0, 0.5·(1 + cos(π·p))), p = (step − w) / max(1, T − w)
 *     linear:   f = max(0, (T − step) / max(1, T − w))
 *     constant: f = 1
 *
 * min_lr = 0 gives transformers' values exactly (same double operations). For
 * step >= T the formulas are applied as transformers does (linear stays at
 * min_lr; cosine rises again past T, as in transformers); the trainer stops
 * at T. */
typedef struct tp_lr_schedule {
    double peak_lr, min_lr;
    int64_t warmup_steps, total_steps;
    int kind; /* TP_LR_COSINE, TP_LR_LINEAR, TP_LR_CONSTANT */
} tp_lr_schedule;

/* Learning rate of the update that turns step into step + 1 (step >= 0:
 * the first update uses tp_lr_at(s, 0), which is 0 when warmup_steps > 0, as
 * with transformers' LambdaLR). */
double tp_lr_at(const tp_lr_schedule *s, int64_t step);

/* "cosine", "linear", "constant" (exact, lowercase) → TP_LR_*. TP_OK, or
 * TP_EINVAL (kind untouched) for anything else, NULL included. */
int tp_lr_schedule_parse_kind(const char *s, int *kind);

/* "cosine"/"linear"/"constant", or "?" for an unknown kind. */
const char *tp_lr_kind_name(int kind);

/* TP_OK, or TP_EINVAL with a message naming the field ("lr schedule:
 * warmup_steps (200) > total_steps (100)") for: non-finite or negative
 * peak_lr/min_lr, min_lr > peak_lr, warmup_steps < 0, total_steps < 1,
 * warmup_steps > total_steps, unknown kind. */
int tp_lr_schedule_validate(const tp_lr_schedule *s, tp_err *err);

#endif
