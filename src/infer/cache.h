/* cache.h - the inference state of one sequence (one document) and the
 * forward that feeds it: prefill a prompt in blocks through the chunked
 * kernels, then decode token by token, both through the training code's
 * layer math (tp_decoder_forward_cached).
 *
 * What a cache owns, per layer (H query heads, Hkv kv heads, head dim d):
 *   softmax branch, only for layers that compute it (tp_decoder_layer_softmax;
 *   a pure-linear layer, μ = 1 without cross gate or base_scale_attn, has none):
 *     K, V   [Hkv][cap][d] fp32 (head-major, so decode streams each head's keys):
 *            keys after RoPE, values; kpos [cap] their positions.
 *            Without a sliding window cap grows with the context (or is reserved);
 *            with window W it is a ring of W entries (position p in slot p % W)
 *            that never grows past the window.
 *   LiZA branch (o.liza.enabled):
 *     S      [Hkv, d, d] the recurrent state per kv head (a GQA group shares it);
 *     hk, hv [hmax, Hkv*d] the last hmax = max(2, n_h - 1) raw k, v projections:
 *            the pooled gates read the last two, the dt/rdt tricks the last
 *            n_h - 1 (feature-mapped again when read, the same function of the
 *            same values). α decay and the chunk counter (φ every C real
 *            tokens, linear: false) follow from the document position `pos`.
 * plus scratch for one block of up to `block` tokens. So a pure-linear model's
 * memory does not depend on the context length.
 *
 * A cache is bound to one decoder (built with o.inference), which must
 * outlive it; not thread-safe; one per sequence. After a failed feed the
 * state is undefined until tp_cache_reset. */
#ifndef TPTT_INFER_CACHE_H
#define TPTT_INFER_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "model/decoder.h"
#include "util/err.h"

typedef struct tp_infer_cache tp_infer_cache;

/* block: the most tokens one forward call takes (prefill block), >= 1. */
int tp_cache_create(tp_decoder *m, int64_t block, tp_infer_cache **out, tp_err *err);
void tp_cache_destroy(tp_infer_cache *c);
/* Start a new document (state zero, no cached keys; memory kept). */
void tp_cache_reset(tp_infer_cache *c);
/* Pre-size the KV caches for a context of n tokens (no-op for rings and
 * pure-linear layers), so decode never reallocates. */
int tp_cache_reserve(tp_infer_cache *c, int64_t n, tp_err *err);
/* Tokens fed since the last reset: the next token's position. */
int64_t tp_cache_pos(const tp_infer_cache *c);
/* Bytes the cache holds (states, KV caches, scratch). */
size_t tp_cache_bytes(const tp_infer_cache *c);
/* The vocabulary size V (logits per position). */
int64_t tp_cache_vocab(const tp_infer_cache *c);
/* Whether any layer keeps a KV cache. */
int tp_cache_has_kv(const tp_infer_cache *c);

/* Feed ids [n] (n >= 1) as the next tokens of the document. all_logits
 * [n, V] receives every position's logits when not NULL; last_logits [V]
 * the last position's when not NULL (only that row of the head is computed
 * when all_logits is NULL). */
int tp_cache_feed(tp_infer_cache *c, const int32_t *ids, int64_t n, float *all_logits, float *last_logits,
                  tp_err *err);

#endif
