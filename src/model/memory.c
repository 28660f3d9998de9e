#include "model/memory.h"

#include <string.h>

void tp_mem_opts_default(tp_mem_opts *o) {
    memset(o, 0, sizeof *o);
    o->seq_len = 2048;
    o->micro_batch = 1;
    o->lora_rank = 8;
    o->bf16_matmul = 1;
    o->liza_chunk = 64;
}

void tp_mem_estimate_compute(const tp_model_config *c, uint64_t frozen_bytes, const tp_mem_opts *o,
                             tp_mem_estimate *e) {
    memset(e, 0, sizeof *e);
    uint64_t D = (uint64_t)c->hidden, F = (uint64_t)c->ffn, L = (uint64_t)c->layers, V = (uint64_t)c->vocab;
    uint64_t H = (uint64_t)c->heads, d = (uint64_t)c->head_dim;
    uint64_t qd = H * d, kvd = (uint64_t)c->kv_heads * d, r = (uint64_t)o->lora_rank;
    uint64_t T = (uint64_t)(o->seq_len * o->micro_batch);
    e->frozen_bytes = frozen_bytes;
    /* LoRA on q,k,v,o (+ gate, up, down): r*(in+out) each, plus a MaG logit */
    uint64_t per_layer = r * ((D + qd) + (D + kvd) * 2 + (qd + D));
    if (o->lora_mlp) per_layer += r * 3 * (D + F);
    e->trainable_params = L * (per_layer + 1);
    e->trainable_bytes = e->trainable_params * 4 * 4;
    /* Saved per layer (fp32): layer input, both norm outputs, q/k/v, attention
     * output, the linear branch's normalised q/k/v and gates, its output, and
     * the MLP's gate/up/product; plus softmax row statistics and the
     * chunk-entry states of the linear branch (H*d*d per chunk). */
    uint64_t chunks = (uint64_t)((o->seq_len + o->liza_chunk - 1) / o->liza_chunk) * (uint64_t)o->micro_batch;
    uint64_t layer_act = 4 * (T * (3 * D + 2 * (qd + 2 * kvd) + 2 * qd + D + 3 * F) + T * H + chunks * H * d * d);
    uint64_t layer_in = 4 * T * D;
    e->activation_bytes = o->recompute ? L * layer_in + layer_act : L * layer_act;
    /* one block of logits (the head runs over blocks of ~128 MB, decoder_impl.h);
     * one layer's gradients of activations; for the f32 backend the fp32 copy
     * of the largest frozen matrix, which is the LM head when V > F (kept for
     * the whole head pass), for bf16 the activations rounded to bf16 */
    uint64_t blk = ((uint64_t)32 << 20) / (V ? V : 1);
    if (blk < 1) blk = 1;
    if (blk > T) blk = T;
    uint64_t big = F * D > V * D ? F * D : V * D;
    e->scratch_bytes = 4 * blk * V + layer_act + (o->bf16_matmul ? 2 * T * (F > D ? F : D) : 4 * big);
    e->private_bytes = e->trainable_bytes + e->activation_bytes + e->scratch_bytes;
}
