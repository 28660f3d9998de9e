/* liza_gates.h - LiZA's inputs from the raw projections (LIZA.md 2.1, 2.2):
 * feature maps q̂ = silu(q)/max(|silu(q)|, 1e-6) and k̂ likewise per head,
 * v̂ = v / sqrt(d); gates from a causal window-3 mean of the raw k and v
 * (replicate padding at document starts), βk = σ(pool(k)), βv = σ(pool(v)):
 *   beta_gate  k: β = βk   v: β = βv   kv: β = βk ⊙ βv   c: β = 0.5
 *   alpha_gate c: no decay; k/v/kv: α = mean over channels of that vector
 *              (one scalar per token and kv head), passed on as log α.
 * Layouts: q, qh [N, H*d]; k, v, kh, vh, beta [N, Hkv*d]; log_alpha [N, Hkv];
 * doc_start [N] (row-local start positions, rows of T tokens). */
#ifndef TPTT_KERNELS_LIZA_GATES_H
#define TPTT_KERNELS_LIZA_GATES_H

#include <stdint.h>

enum { TP_GATE_C = 0, TP_GATE_K = 1, TP_GATE_V = 2, TP_GATE_KV = 3 };

typedef struct tp_gate_dims {
    int64_t B, T, H, Hkv, d;
    int beta_gate, alpha_gate; /* TP_GATE_* */
} tp_gate_dims;

/* log_alpha is written only when alpha_gate != C. */
void tp_liza_gates_fwd(const tp_gate_dims *g, const float *q, const float *k, const float *v, const int32_t *doc_start,
                       float *qh, float *kh, float *vh, float *beta, float *log_alpha);

/* Adds the gradients w.r.t. the raw q, k, v into dq, dk, dv. dlog_alpha is
 * read only when alpha_gate != C. */
void tp_liza_gates_bwd(const tp_gate_dims *g, const float *q, const float *k, const float *v, const int32_t *doc_start,
                       const float *dqh, const float *dkh, const float *dvh, const float *dbeta,
                       const float *dlog_alpha, float *dq, float *dk, float *dv);

#endif
