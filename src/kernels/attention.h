/* attention.h - causal softmax attention with GQA, sliding window and
 * document boundaries (LIZA.md section 1), forward and backward.
 *
 * Layouts (row-major, tokens of row b at b*T .. b*T+T-1):
 *   q, dq      [B*T, H*d]    (after RoPE)
 *   k, v, dk, dv [B*T, Hkv*d]
 *   o, do      [B*T, H*d]
 *   lse        [B, H, T]     log-sum-exp of each query's scores (saved by
 *                            forward; backward recomputes probabilities)
 *   doc_start  [B*T]         position (within its row) where token t's
 *                            document starts
 * Query i sees key j iff doc_start[i] <= j <= i and (window == 0 or
 * i - window < j). Query head h uses kv head h / (H/Hkv). Scale d^-1/2.
 * Work is split over (row, head) in forward and over (row, kv
 * head) in backward, so every output is written by one thread in a fixed
 * order: results do not depend on the thread count. */
#ifndef TPTT_KERNELS_ATTENTION_H
#define TPTT_KERNELS_ATTENTION_H

#include <stdint.h>

#include "util/err.h"

typedef struct tp_attn_dims {
    int64_t B, T, H, Hkv, d;
    int64_t window; /* 0 = none */
} tp_attn_dims;

int tp_attn_fwd(const tp_attn_dims *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                float *o, float *lse, tp_err *err);
/* dq overwritten; dk, dv overwritten. */
int tp_attn_bwd(const tp_attn_dims *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                const float *o, const float *lse, const float *dout, float *dq, float *dk, float *dv, tp_err *err);

/* Inference: n new queries at consecutive positions qpos0 .. qpos0+n-1 of
 * one document attend over cached keys and over this block's own keys
 * (causally). Cached keys need not be in order (a sliding-window ring):
 *   q  [n, H*d] (after RoPE)          kn, vn [n, Hkv*d]  this block's keys/values
 *   kc, vc: kv head h's cached keys/values at kc + h*hstride, [mc, d] row-major
 *           (head-major, so decode streams each head's keys contiguously);
 *   kpos [mc] their positions (< qpos0)
 *   o  [n, H*d]
 * Key at position p is visible to a query at position i iff p <= i and
 * (window == 0 or i - window < p); stale ring entries are simply masked.
 * Work is split over (kv head, query block); each output is written by one
 * thread in a fixed order. */
typedef struct tp_attn_kv {
    const float *kc, *vc;
    const int32_t *kpos;
    int64_t mc;      /* cached keys */
    int64_t hstride; /* floats from one kv head's keys to the next's */
} tp_attn_kv;
int tp_attn_fwd_cached(int64_t H, int64_t Hkv, int64_t d, int64_t window, const float *q, int64_t n, int64_t qpos0,
                       const tp_attn_kv *cache, const float *kn, const float *vn, float *o, tp_err *err);

#endif
