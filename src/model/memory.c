#include "model/memory.h"

#include "model/decoder.h"

#include <string.h>

void tp_mem_opts_default(tp_mem_opts *o) {
    memset(o, 0, sizeof *o);
    o->seq_len = 2048;
    o->micro_batch = 1;
    o->lora_rank = 8;
    o->bf16_matmul = 1;
    o->liza_chunk = 64;
    o->liza = 1;
    o->lora_dropout = 0;
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
    /* fp32 values, gradients, AdamW m and v, and the trainer's copies of
     * values, m and v from before each update (to roll back a non-finite
     * one): 7 floats per parameter */
    e->trainable_bytes = e->trainable_params * 7 * 4;
    /* The decoder's activation arena, as it allocates it: the saved part
     * (per-layer sets, or one set + every layer's input with recompute) is
     * "activations", the rest (one layer's gradients and working buffers, a
     * block of head logits) "scratch". Plus, saved per set, the linear
     * branch's chunk-entry states: Hkv·d·d floats per chunk and row. */
    uint64_t saved = 0;
    uint64_t arena = tp_decoder_arena_floats(c, (int64_t)T, o->seq_len, r, o->liza, o->recompute, 0, &saved);
    uint64_t chunks = o->liza ? (uint64_t)((o->seq_len + o->liza_chunk - 1) / o->liza_chunk) * (uint64_t)o->micro_batch : 0;
    uint64_t states = chunks * (uint64_t)c->kv_heads * d * d * (o->recompute ? 1 : L);
    e->activation_bytes = 4 * (saved + states);
    /* matmul scratch, beside the arena: bf16 path, the activations rounded
     * to bf16 for the largest product (a layer's input of max(F, D, H·d)
     * features, or the head's dX over a block of tokens x V, the block as in
     * tp_decoder_head_block); f32 path, the fp32 copy of the largest
     * frozen matrix (the LM head when V > F). */
    uint64_t blk = (uint64_t)tp_decoder_head_block((int64_t)(V ? V : 1), (int64_t)T);
    uint64_t maxin = F > D ? F : D;
    if (maxin < qd) maxin = qd;
    uint64_t big = F * D > V * D ? F * D : V * D;
    if (big < qd * D) big = qd * D;
    uint64_t mm = o->bf16_matmul ? 2 * (T * maxin > blk * V ? T * maxin : blk * V) : 4 * big;
    /* the arena's buffer for LoRA dropout masks (2·N·max(F, D, H·d) floats)
     * is touched only with dropout on, and then only as far as the widest
     * LoRA input: D or H·d (o_proj's stacked 2N rows), F with LoRA on the MLP */
    uint64_t xdrop = 2 * T * maxin, xdrop_used = 2 * T * (qd > D ? qd : D);
    if (o->lora_mlp && xdrop_used < T * F) xdrop_used = T * F;
    e->scratch_bytes = 4 * (arena - saved - xdrop + (o->lora_dropout ? xdrop_used : 0)) + mm;
    e->private_bytes = e->trainable_bytes + e->activation_bytes + e->scratch_bytes;
}
