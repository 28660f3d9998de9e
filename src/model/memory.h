/* memory.h - how much memory one rank needs to train a model.
 *
 * Two kinds: frozen weights, mapped read-only from the safetensors files and
 * shared by every rank on a node through the page cache; and private memory
 * (trainable parameters with gradients and AdamW moments, saved activations,
 * scratch). This is the planning model `tptt inspect` prints; it follows the
 * trainer's design (LIZA.md, issue "Frozen-base decoder"): fp32 trainables,
 * activations of one micro-batch, optional per-layer recomputation. The
 * activation and scratch terms are the decoder's own arena size
 * (tp_decoder_arena_floats), so they cannot drift from what it allocates;
 * counted as resident only where the decoder writes (the LoRA dropout
 * buffer only with dropout); not counted: libraries and runtime (~10 MB
 * measured with a 7B model). */
#ifndef TPTT_MODEL_MEMORY_H
#define TPTT_MODEL_MEMORY_H

#include <stdint.h>

#include "model/hf_config.h"

typedef struct tp_mem_opts {
    int64_t seq_len;     /* tokens per row */
    int64_t micro_batch; /* rows per micro-batch */
    int lora_rank;
    int lora_mlp;        /* LoRA also on gate/up/down */
    int lora_dropout;    /* lora.dropout > 0 (a masked copy of the LoRA input) */
    int recompute;       /* keep only layer inputs, recompute in backward */
    int bf16_matmul;     /* oneDNN bf16 backend (no fp32 weight panels) */
    int liza_chunk;      /* chunk size of the linear branch (chunk-entry states) */
    int liza;            /* the LiZA branch is on (default 1) */
} tp_mem_opts;

typedef struct tp_mem_estimate {
    uint64_t frozen_bytes;      /* mapped weights (shared per node) */
    uint64_t trainable_params;  /* LoRA + MaG parameter count */
    uint64_t trainable_bytes;   /* params, grads, 2 AdamW moments, rollback copies of 3: fp32 */
    uint64_t activation_bytes;  /* saved for backward, one micro-batch */
    uint64_t scratch_bytes;     /* per-layer working buffers, logits, panels */
    uint64_t private_bytes;     /* sum of the three above */
} tp_mem_estimate;

void tp_mem_opts_default(tp_mem_opts *o);
void tp_mem_estimate_compute(const tp_model_config *c, uint64_t frozen_bytes, const tp_mem_opts *o,
                             tp_mem_estimate *out);

#endif
