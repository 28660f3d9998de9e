/* decoder_impl.h - internals of the decoder shared by its two source files:
 * decoder_build.c (options, parameter table, binding weights, activation
 * memory) and decoder.c (the layer math: forward, backward, cached forward).
 * Not for other modules: they use decoder.h. */
#ifndef TPTT_MODEL_DECODER_IMPL_H
#define TPTT_MODEL_DECODER_IMPL_H

#include "model/decoder.h"

/* ---- model structure --------------------------------------------------- */

typedef struct lin {
    tp_weight w;               /* effective weight: frozen view or trainable fp32 */
    float *dw;                 /* gradient of a trainable full weight */
    const float *bias;         /* q/k/v bias (fp32), or NULL */
    float *dbias;
    float *A, *B, *dA, *dB;    /* LoRA, or NULL */
    int64_t in, out;
} lin;

typedef struct layer {
    lin m[TP_NMOD];
    const float *norm_in, *norm_post;
    float *dnorm_in, *dnorm_post;
    float *mag_logit, *dmag; /* learnable MaG: [1] or [D] */
} layer;

/* Saved activations of one layer for one micro-batch. */
typedef struct acts {
    float *x_in, *a, *rstd1, *q, *k, *v, *qr, *kr, *lse, *x_mid, *bn, *rstd2, *g, *u, *h;
    float *att;  /* [2N, H*d]: softmax output, then the normalised linear output */
    float *xa[TP_NMOD]; /* x·Aᵀ of each LoRA module [N, r] ([2N, r] for o_proj) */
    /* LiZA */
    float *qh, *kh, *vh, *beta, *la, *y, *rstd_y, *o2, *sc;
    float *states;  /* chunk-entry states (own allocation, grows) */
    size_t states_cap;
} acts;

struct tp_decoder {
    const tp_hf_model *base;
    tp_model_config cfg;
    tp_decoder_opts o;
    float lora_scale;
    int64_t step;
    tp_matmul *mm;
    layer *layers;
    tp_weight embed, head; /* head == embed when tied */
    float *dembed, *dhead;
    const float *norm_final;
    float *dnorm_final;
    float *small;          /* fp32 copies of frozen norms/biases */
    tp_param *params;
    size_t nparams;
    float *theta, *grad;
    size_t numel;
    /* activations, sized for cap_n tokens */
    int64_t cap_n, cap_T;
    float *arena;
    acts *A;               /* L sets, or 1 with recompute or inference */
    int64_t nsets;
    float *x_saved;        /* [L, N, D] layer inputs with recompute */
    float *x_res, *xf, *rstdf, *xL;
    float *d_res, *d_tmp, *d_q, *d_k, *d_v, *d_att, *d_g, *d_u, *d_h, *t_r, *xdrop, *tmp_o;
    float *d_qh, *d_kh, *d_vh, *d_beta, *d_la, *d_y, *d_o2, *mu_tok;
    float *logit_blk, *rope_cos, *rope_sin;
    double *inv_freq;
    tp_grad_hook hook;
    void *hook_ctx;
    const tp_batch *cur; /* the batch of the running step (dropout masks) */
    int eval_mode;          /* forward for evaluation: no LoRA dropout */
    const tp_attn_ops *ops; /* cached forward: attention provider, else NULL */
    void *ops_ctx;
};

/* Tokens per block of the LM head + cross-entropy, so [N, V] logits never
 * exist at once: ~128 MB of fp32 logits, but at least 512 rows. Below that
 * the head's products lose speed (bench_matmul, V = 128256, 2 threads:
 * 261 rows ran x·Wᵀ at 486-551 and dY·W at 308-340 GFLOP/s, 512 rows at
 * 593-640 and 458-481; 384, 640, 768 and 1024 rows were slower than 512),
 * and 256 MB for a 128k vocabulary is small beside the step's memory. */
static inline int64_t tp_head_block(int64_t V, int64_t N) {
    int64_t blk = ((int64_t)32 << 20) / V;
    if (blk < 512) blk = 512;
    return blk > N ? N : blk;
}

/* Size the activation arena for N tokens in rows of T (grows only). In
 * inference mode (m->infer) one set without gradient buffers. */
int tp_decoder_ensure_acts(tp_decoder *m, int64_t N, int64_t T, tp_err *err);

#endif
