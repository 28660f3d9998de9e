/* liza.h - the LiZA linear-attention recurrence (LIZA.md sections 2.3-2.5),
 * chunkwise-parallel in WY form (section 6), forward and backward.
 *
 * Inputs are already feature-mapped and gated (see liza_gates.h):
 *   q    [B*T, H*d]    q̂ per query head
 *   k, v [B*T, Hkv*d]  k̂, v̂ per kv head
 *   beta [B*T, Hkv*d]  β (a d-vector per token and kv head; 0.5 for gate c)
 *   log_alpha [B*T, Hkv] log α per token and kv head, or NULL (no decay)
 *   doc_start [B*T]    start position (within its row) of each token's document
 * Output y [B*T, H*d]: y_t = S_tᵀ q̂_t per query head; query head h reads the
 * state of kv head h / (H/Hkv) (the state depends only on k, v, β, α, so a
 * GQA group shares it).
 *
 * The state restarts at 0 at every document start. Chunks hold C real tokens
 * (C·n_h virtual tokens for DeltaProduct), counted from each document start;
 * with linear = 0 the state is replaced by φ(S) after every full chunk that
 * is not the document's last. Work is split over (row, kv head); each output
 * is written by one thread in a fixed order (deterministic for any thread
 * count).
 *
 * Saved for backward: the chunk-entry states (tp_liza_state_count() d×d
 * matrices); everything else is recomputed per chunk. Memory is O(T·d) per
 * head plus the entry states; never a state per token.
 *
 * _f64 variants run the same algorithm in double (tests). */
#ifndef TPTT_KERNELS_LIZA_H
#define TPTT_KERNELS_LIZA_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

enum { TP_TRICK_DT = 0, TP_TRICK_ROT = 1, TP_TRICK_RDT = 2 };

typedef struct tp_liza_cfg {
    int order;  /* n_h >= 1 */
    int trick;  /* TP_TRICK_* */
    int linear; /* 0: φ between chunks */
    int chunk;  /* C, real tokens per chunk, >= 1 */
} tp_liza_cfg;

typedef struct tp_liza_dims {
    int64_t B, T, H, Hkv, d;
} tp_liza_dims;

/* Number of d×d entry states saved by forward for this batch. */
size_t tp_liza_state_count(const tp_liza_dims *s, const tp_liza_cfg *c, const int32_t *doc_start);

int tp_liza_fwd(const tp_liza_dims *s, const tp_liza_cfg *c, const float *q, const float *k, const float *v,
                const float *beta, const float *log_alpha, const int32_t *doc_start, float *y, float *states,
                tp_err *err);
/* Gradients are overwritten: dq [B*T, H*d], dk, dv, dbeta [B*T, Hkv*d],
 * dlog_alpha [B*T, Hkv] (ignored when log_alpha is NULL). */
int tp_liza_bwd(const tp_liza_dims *s, const tp_liza_cfg *c, const float *q, const float *k, const float *v,
                const float *beta, const float *log_alpha, const int32_t *doc_start, const float *states,
                const float *dy, float *dq, float *dk, float *dv, float *dbeta, float *dlog_alpha, tp_err *err);

int tp_liza_fwd_f64(const tp_liza_dims *s, const tp_liza_cfg *c, const double *q, const double *k, const double *v,
                    const double *beta, const double *log_alpha, const int32_t *doc_start, double *y,
                    double *states, tp_err *err);
int tp_liza_bwd_f64(const tp_liza_dims *s, const tp_liza_cfg *c, const double *q, const double *k, const double *v,
                    const double *beta, const double *log_alpha, const int32_t *doc_start, const double *states,
                    const double *dy, double *dq, double *dk, double *dv, double *dbeta, double *dlog_alpha,
                    tp_err *err);

/* Inference over one document (B = 1), continuing from carried states:
 * rows [first, T) of q, k, v, beta, log_alpha (layouts as above) are new
 * tokens, at document positions pos0 .. pos0 + T - first - 1; rows
 * [0, first) are the document's preceding tokens (first <= pos0; the dt and
 * rdt tricks read the last order-1 of them, so pass min(pos0, order-1) or
 * more). S [Hkv, d, d] holds each kv head's state entering row `first` (zero
 * at the document start) and receives the state after row T-1. y rows
 * [first, T) are written. Chunk boundaries and φ (linear = 0) fall at the
 * same document positions as in tp_liza_fwd, so a document fed in any
 * split gives the same outputs (up to rounding). */
int tp_liza_fwd_seg_f32(const tp_liza_dims *s, const tp_liza_cfg *c, const float *q, const float *k, const float *v,
                        const float *beta, const float *log_alpha, int64_t first, int64_t pos0, float *S, float *y,
                        tp_err *err);
int tp_liza_fwd_seg_f64(const tp_liza_dims *s, const tp_liza_cfg *c, const double *q, const double *k,
                        const double *v, const double *beta, const double *log_alpha, int64_t first, int64_t pos0,
                        double *S, double *y, tp_err *err);

/* The expansion coefficient of x_{t-i} in virtual slot m for trick dt:
 * 2^-m (-1)^i C(m, i). */
double tp_liza_dt_coef(int m, int i);

#endif
