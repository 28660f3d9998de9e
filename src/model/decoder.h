/* decoder.h - the frozen-base decoder with LoRA (LIZA.md sections 1, 4, 5):
 * forward and backward of Llama/Mistral/Qwen2 stacks over packed batches.
 *
 * Memory design: frozen weights are used in place from the read-only mmap of
 * the base model (tp_hf_model) in their stored dtype; only small frozen
 * tensors (norm weights, biases) get fp32 copies. Every trainable parameter
 * lives in ONE contiguous fp32 buffer (theta) with a gradient buffer of the
 * same layout (grad), described by a parameter table, so the optimiser,
 * allreduce and checkpoints see flat arrays. Trainable sets:
 *   lora         A [r, in] and B [out, r] of the target modules
 *   projections  fp32 copies of the target modules' full weights
 *   all          fp32 copies of every weight (for pretraining tiny models)
 * Activations of a micro-batch are kept for backward, or with
 * recompute only each layer's input (the layer is re-run in backward).
 *
 * The attention block computes o_attn from q, k, v (pre-RoPE copies are kept
 * for the linear branch of the next issue) and adds it to the residual. */
#ifndef TPTT_MODEL_DECODER_H
#define TPTT_MODEL_DECODER_H

#include <stddef.h>
#include <stdint.h>

#include "io/hf_model.h"
#include "kernels/matmul.h"

typedef enum tp_trainable { TP_TRAIN_LORA = 0, TP_TRAIN_PROJECTIONS = 1, TP_TRAIN_ALL = 2 } tp_trainable;

/* The seven projections of a layer, in HF order. */
enum { TP_MOD_Q, TP_MOD_K, TP_MOD_V, TP_MOD_O, TP_MOD_GATE, TP_MOD_UP, TP_MOD_DOWN, TP_NMOD };
extern const char *const tp_module_names[TP_NMOD]; /* "q_proj", ... */
extern const char *const tp_module_paths[TP_NMOD]; /* "self_attn.q_proj", "mlp.gate_proj", ... */

typedef struct tp_lora_opts {
    int r;
    double alpha;
    double dropout;
    unsigned targets; /* bit m set: module m carries LoRA / is trainable (projections) */
    int rslora;       /* scale alpha/sqrt(r) instead of alpha/r */
    int init_random;  /* B ~ U(-1/sqrt(r), 1/sqrt(r)) instead of 0 (tests) */
} tp_lora_opts;

/* LiZA linear-attention branch (LIZA.md section 2). */
typedef struct tp_liza_opts {
    int enabled;
    int order;      /* n_h */
    int trick;      /* TP_TRICK_* (kernels/liza.h) */
    int linear;     /* 0: φ on the state between chunks */
    int chunk;      /* C, real tokens */
    int beta_gate;  /* TP_GATE_* (kernels/liza_gates.h) */
    int alpha_gate;
    int base_scale_attn;
    char preset[32]; /* operator_mode name, "" when fields differ from every preset */
} tp_liza_opts;

/* MaG mixing (LIZA.md section 3). */
enum { TP_MAG_CONSTANT = 0, TP_MAG_GRADUAL = 1, TP_MAG_CYCLIC = 2, TP_MAG_LEARNABLE = 3 };
#define TP_MAG_MAX_VALUES 32
typedef struct tp_mag_opts {
    int mode;
    double mu0, mu1;  /* constant value / schedule start; gradual end */
    int64_t steps;    /* gradual: steps from mu0 to mu1 */
    double values[TP_MAG_MAX_VALUES];
    int nvalues;      /* cyclic */
    int64_t period;   /* cyclic: steps per value */
    int vector;       /* learnable: one logit per channel instead of per layer */
    int cross_gate;
} tp_mag_opts;

/* Fill the five recurrent fields from an operator_mode name; -1 if unknown. */
int tp_liza_preset(const char *name, tp_liza_opts *o);
/* Name of the preset matching o's fields, or NULL. */
const char *tp_liza_preset_name(const tp_liza_opts *o);
/* μ of a schedule at a training step (learnable: σ(logit) at init). */
double tp_mag_mu(const tp_mag_opts *o, int64_t step);

typedef struct tp_decoder_opts {
    tp_trainable trainable;
    tp_lora_opts lora;
    tp_liza_opts liza;
    tp_mag_opts mag;
    tp_mm_backend matmul;
    int recompute;
    int inference;    /* forward only (tp_decoder_forward_cached, or tp_decoder_step without
                         backward): no gradient or activation buffers for backward, LoRA dropout off */
    uint64_t seed;
} tp_decoder_opts;

void tp_decoder_opts_default(tp_decoder_opts *o);
/* Parse a comma list of module names into a targets mask. */
int tp_lora_parse_targets(const char *list, unsigned *mask, tp_err *err);
const char *tp_trainable_name(tp_trainable t);

#define TP_PARAM_NAME_MAX 160

typedef struct tp_param {
    char name[TP_PARAM_NAME_MAX]; /* key in adapter/dump files (PEFT style) */
    int ndim;
    int64_t shape[2];
    size_t offset, numel; /* into theta / grad */
    int decay;            /* AdamW weight decay applies (matrices, not norms/biases) */
    int is_lora;
    int layer;            /* decoder layer, -1 for the embedding, L for final norm / lm_head */
} tp_param;

/* A packed micro-batch: B rows of T tokens. */
typedef struct tp_batch {
    int64_t B, T;
    const int32_t *ids;       /* [B*T] */
    const int32_t *labels;    /* [B*T], -100 = ignored */
    const int32_t *doc_start; /* [B*T] position (within the row) where the token's document starts */
    const int32_t *pos;       /* [B*T] RoPE position (restarts at 0 per document) */
    const int64_t *slot;      /* [B] the rows' slots in the global batch, or NULL (0..B-1): LoRA dropout
                                 masks depend on (step, slot, position), not on how rows are split */
} tp_batch;

typedef struct tp_decoder tp_decoder;

/* Build on an opened base model (which must outlive the decoder). */
int tp_decoder_create(const tp_hf_model *base, const tp_decoder_opts *o, tp_decoder **out, tp_err *err);

/* Floats of the activation arena a decoder allocates for N tokens in rows of
 * T (lora_r 0: no LoRA): every saved activation and gradient buffer, one
 * block of head logits, RoPE tables. *saved (when not NULL) gets the part
 * kept for backward: the per-layer sets (one with recompute) and, with
 * recompute, every layer's input; the rest is one layer's working memory.
 * `tptt inspect` (model/memory.c) predicts memory from it. */
uint64_t tp_decoder_arena_floats(const tp_model_config *c, int64_t N, int64_t T, int64_t lora_r, int liza,
                                 int recompute, int inference, uint64_t *saved);

/* Tokens per block of the LM head + cross-entropy for a vocabulary of V and
 * N tokens (the head's products run on blocks of this many rows). */
int64_t tp_decoder_head_block(int64_t V, int64_t N);

void tp_decoder_destroy(tp_decoder *m);

size_t tp_decoder_nparams(const tp_decoder *m);
const tp_param *tp_decoder_param(const tp_decoder *m, size_t i);
float *tp_decoder_theta(tp_decoder *m); /* all trainables, contiguous */
float *tp_decoder_grad(tp_decoder *m);  /* same layout */
size_t tp_decoder_numel(const tp_decoder *m);
void tp_decoder_zero_grad(tp_decoder *m);
/* The step counter seeds dropout masks (so recomputation reproduces them)
 * and drives MaG schedules. */
void tp_decoder_set_step(tp_decoder *m, int64_t step);
/* Called during backward when the gradients of a layer's parameters are
 * complete for this micro-batch: layer = L after the LM head and final norm,
 * then L-1 ... 0 after each layer, then -1 after the embedding. NULL clears. */
typedef void (*tp_grad_hook)(void *ctx, int layer);
void tp_decoder_set_grad_hook(tp_decoder *m, tp_grad_hook hook, void *ctx);
/* μ of layer l at the current step (schedule value or σ(logit[0])). */
double tp_decoder_mu(const tp_decoder *m, int l);
const tp_decoder_opts *tp_decoder_options(const tp_decoder *m);

/* Forward and backward on one micro-batch. Gradients of the loss
 * sum(token losses) / normalizer are ADDED to grad (so micro-batches
 * accumulate; normalizer is the global count of labelled tokens). Returns
 * the summed token loss and the local labelled count. logits_out, if not
 * NULL, receives [B*T, V] logits. With backward = 0 only the loss (and
 * logits) are computed. */
int tp_decoder_step(tp_decoder *m, const tp_batch *b, double normalizer, int backward, float *logits_out,
                    double *loss_sum, int64_t *count, tp_err *err);

/* ---- inference: forward through an attention provider ------------------
 * The layer math (norms, projections with LoRA, RoPE, o_proj, MaG, MLP, head)
 * is the training code's; only the two attention branches come from `ops`,
 * which keeps per-layer state across calls (infer/cache.h). Shapes, for a
 * block of n new tokens at document positions pos0 .. pos0+n-1:
 *   softmax: q [n, H*d], k [n, Hkv*d] (both after RoPE), v [n, Hkv*d] -> o [n, H*d]
 *            (the provider attends over its cached keys plus this block, causally,
 *            and appends this block's k, v)
 *   liza:    q [n, H*d], k, v [n, Hkv*d] raw projections (before RoPE) -> y [n, H*d]
 *            (the un-normalised recurrent output; the provider advances its state) */
typedef struct tp_attn_ops {
    int (*softmax)(void *ctx, int layer, const float *q, const float *k, const float *v, int64_t n, float *o,
                   tp_err *err);
    int (*liza)(void *ctx, int layer, const float *q, const float *k, const float *v, int64_t n, float *y,
                tp_err *err);
} tp_attn_ops;

/* Whether layer l computes the softmax branch (not the pure-linear μ = 1
 * case), i.e. whether an inference cache needs its KV cache. */
int tp_decoder_layer_softmax(const tp_decoder *m, int l);
const tp_model_config *tp_decoder_config(const tp_decoder *m);

/* Forward n tokens (ids [n], one document, positions pos0..) through ops;
 * logits [n - logits_from, V] of rows logits_from .. n-1 (logits may be NULL
 * with logits_from = n). The decoder must be created with o.inference. */
int tp_decoder_forward_cached(tp_decoder *m, const int32_t *ids, int64_t n, int64_t pos0, const tp_attn_ops *ops,
                              void *ctx, int64_t logits_from, float *logits, tp_err *err);

/* Evaluation mode on a training decoder: forward passes (tp_decoder_step
 * without backward) use no LoRA dropout; nothing else changes, so a training
 * step after it is as if no evaluation had run. */
void tp_decoder_set_eval(tp_decoder *m, int eval);

/* Fill doc_start/pos for a row of T tokens from its sorted document starts
 * (first must be 0). Returns TP_EINVAL with a message on bad starts. */
int tp_batch_row_positions(const int64_t *starts, size_t nstarts, int64_t T, int32_t *doc_start, int32_t *pos,
                           tp_err *err);

#endif
