/* hf_config.h - the base model's config.json (LIZA.md section 1).
 *
 * Parses Llama, Mistral and Qwen2 configs with the defaults `transformers`
 * applies to absent fields, except that the fields fixing the shapes
 * (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
 * vocab_size) are required: a model directory without them is broken, and
 * guessing 4096 would only move the error to a confusing shape mismatch.
 * Also lists the tensors such a model must hold, with their shapes. */
#ifndef TPTT_MODEL_HF_CONFIG_H
#define TPTT_MODEL_HF_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"
#include "util/fsutil.h"

typedef enum tp_arch { TP_ARCH_LLAMA = 0, TP_ARCH_MISTRAL = 1, TP_ARCH_QWEN2 = 2 } tp_arch;

typedef struct tp_model_config {
    tp_arch arch;
    int64_t hidden;     /* D  hidden_size */
    int64_t ffn;        /* F  intermediate_size */
    int64_t layers;     /* L  num_hidden_layers */
    int64_t heads;      /* H  num_attention_heads */
    int64_t kv_heads;   /* Hkv num_key_value_heads (default H) */
    int64_t head_dim;   /* d  head_dim (default D/H) */
    int64_t vocab;      /* V  vocab_size */
    int64_t max_pos;    /* max_position_embeddings (informative) */
    double rms_eps;     /* rms_norm_eps */
    double rope_theta;
    int rope_llama3;    /* rope_scaling type llama3 */
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int64_t rope_original_max_pos;
    int64_t sliding_window; /* W; 0 = none */
    int tie_embeddings;
    int qkv_bias;       /* q/k/v carry a bias (Qwen2) */
    int64_t bos_id, eos_id; /* -1 when absent (first id when a list) */
    char torch_dtype[16];   /* as written, informative ("" when absent) */
} tp_model_config;

const char *tp_arch_class(tp_arch a);      /* "LlamaForCausalLM", ... */
const char *tp_arch_model_type(tp_arch a); /* "llama", "mistral", "qwen2" */
int tp_arch_parse(const char *short_name, tp_arch *out); /* "llama"|"mistral"|"qwen2" */

/* Parse config JSON text. label (the file path) prefixes every error. */
int tp_model_config_parse(const char *label, const char *json, size_t len, tp_model_config *out, tp_err *err);
/* Read and parse <dir>/config.json. */
int tp_model_config_load(const char *dir, tp_model_config *out, tp_err *err);
/* Check the numbers are consistent (positive sizes, H divisible by Hkv, even
 * head_dim, ...). Parse calls it; init-model calls it on its arguments. */
int tp_model_config_check(const char *label, const tp_model_config *c, tp_err *err);
/* Append config.json text for c, as transformers would write it. */
void tp_model_config_to_json(const tp_model_config *c, tp_strbuf *out);

/* The tensors of a base model. */
typedef enum tp_weight_kind {
    TP_W_EMBED, TP_W_NORM_IN, TP_W_Q, TP_W_K, TP_W_V, TP_W_O, TP_W_Q_BIAS, TP_W_K_BIAS, TP_W_V_BIAS,
    TP_W_NORM_POST, TP_W_GATE, TP_W_UP, TP_W_DOWN, TP_W_NORM_FINAL, TP_W_LM_HEAD, TP_W_NKINDS
} tp_weight_kind;

#define TP_WEIGHT_NAME_MAX 96

typedef struct tp_weight_desc {
    char name[TP_WEIGHT_NAME_MAX]; /* HF tensor name */
    tp_weight_kind kind;
    int layer;                     /* -1 for non-layer tensors */
    int ndim;                      /* 1 or 2 */
    int64_t shape[2];              /* [out, in] for matrices, as HF stores them */
} tp_weight_desc;

/* Number of tensors the model holds. */
size_t tp_model_weight_count(const tp_model_config *c);
/* Fill out[0..count) in a fixed order: embedding, then per layer input norm,
 * q, k, v, o (+ biases), post norm, gate, up, down, then final norm and
 * lm_head (absent when tied). */
void tp_model_weights(const tp_model_config *c, tp_weight_desc *out);
/* Element count of all weights (the model's parameter count). */
uint64_t tp_model_param_count(const tp_model_config *c);

#endif
