#include "model/decoder_impl.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "kernels/ops.h"
#include "util/platform.h"

/* ---- linear modules with LoRA ------------------------------------------ */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The LoRA input: x, or its dropout, with a mask that is a pure function of
 * (seed, step, layer, module, element) so backward and recomputation see the
 * same mask. */
/* Rows of x are tokens of the current batch (o_proj stacks the batch twice:
 * row r is part r / N of token r % N). The mask of element e of token t of a
 * row in global slot s is a hash of (seed, step, layer, module, part, s, t,
 * e): the same whatever the micro-batch or rank layout. */
static void dropout_mask(const tp_decoder *m, int l, int j, const float *x, float *out, int64_t n, int64_t in) {
    double p = m->o.lora.dropout;
    uint64_t key = mix64(m->o.seed ^ mix64((uint64_t)m->step * 0x9e3779b97f4a7c15ULL + (uint64_t)l * 131 + (uint64_t)j));
    uint64_t thresh = (uint64_t)(p * 18446744073709551616.0);
    float keep_scale = (float)(1.0 / (1.0 - p));
    const tp_batch *b = m->cur;
    int64_t N = b->B * b->T;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        int64_t part = r / N, t = r % N, row = t / b->T, pos = t % b->T;
        int64_t slot = b->slot ? b->slot[row] : row;
        uint64_t base = mix64(key + (uint64_t)(((slot * b->T + pos) * 2 + part)));
        for (int64_t e = 0; e < in; e++)
            out[r * in + e] = mix64(base + (uint64_t)e) >= thresh ? x[r * in + e] * keep_scale : 0.0f;
    }
}

static const float *lora_input(tp_decoder *m, int l, int j, const float *x, int64_t n, int64_t in) {
    if (m->o.lora.dropout <= 0 || m->eval_mode) return x;
    dropout_mask(m, l, j, x, m->xdrop, n, in);
    return m->xdrop;
}

static int lin_fwd(tp_decoder *m, int l, int j, const float *x, int64_t n, float *y, float *xa, tp_err *err) {
    lin *L = &m->layers[l].m[j];
    int rc = tp_mm_xwt(m->mm, x, n, &L->w, y, 0, err);
    if (rc) return rc;
    if (L->bias) {
        int64_t out = L->out;
        const float *bias = L->bias;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < n; t++)
            for (int64_t o = 0; o < out; o++) y[t * out + o] += bias[o];
    }
    if (L->A) {
        int64_t r = m->o.lora.r;
        const float *xin = lora_input(m, l, j, x, n, L->in);
        tp_sgemm(0, 1, n, r, L->in, 1.0f, xin, L->in, L->A, L->in, 0.0f, xa, r);
        tp_sgemm(0, 1, n, L->out, r, m->lora_scale, xa, r, L->B, r, 1.0f, y, L->out);
    }
    return TP_OK;
}

/* dx (+)= d/dx; parameter gradients accumulate. */
static int lin_bwd(tp_decoder *m, int l, int j, const float *x, const float *xa, int64_t n, const float *dy, float *dx,
                   int accumulate, tp_err *err) {
    lin *L = &m->layers[l].m[j];
    if (L->dw) tp_sgemm(1, 0, L->out, L->in, n, 1.0f, dy, L->out, x, L->in, 1.0f, L->dw, L->in);
    if (L->dbias) tp_colsum_add(L->dbias, dy, n, L->out);
    int rc = tp_mm_dyw(m->mm, dy, n, &L->w, dx, accumulate, err);
    if (rc) return rc;
    if (L->A) {
        int64_t r = m->o.lora.r;
        float s = m->lora_scale, *t = m->t_r;
        const float *xin = lora_input(m, l, j, x, n, L->in);
        tp_sgemm(0, 0, n, r, L->out, 1.0f, dy, L->out, L->B, r, 0.0f, t, r);
        tp_sgemm(1, 0, L->out, r, n, s, dy, L->out, xa, r, 1.0f, L->dB, r);
        tp_sgemm(1, 0, r, L->in, n, s, t, r, xin, L->in, 1.0f, L->dA, L->in);
        if (m->o.lora.dropout > 0) { /* through the same mask: d drop(x) / dx */
            tp_sgemm(0, 0, n, L->in, r, s, t, r, L->A, L->in, 0.0f, m->xdrop, L->in);
            dropout_mask(m, l, j, m->xdrop, m->xdrop, n, L->in);
            tp_add(dx, m->xdrop, n * L->in);
        } else {
            tp_sgemm(0, 0, n, L->in, r, s, t, r, L->A, L->in, 1.0f, dx, L->in);
        }
    }
    return TP_OK;
}

/* ---- one layer --------------------------------------------------------- */

/* μ of layer l for this step: a schedule value, or σ(logit) (scalar or per
 * channel: mu_vec != NULL then). */
static int need_softmax(const tp_decoder *m, int l);

static double layer_mu(const tp_decoder *m, int l, const float **mu_logit) {
    *mu_logit = NULL;
    if (m->o.mag.mode == TP_MAG_LEARNABLE && m->layers[l].mag_logit) { /* no logits without LiZA */
        *mu_logit = m->layers[l].mag_logit;
        return 1.0 / (1.0 + exp(-(double)m->layers[l].mag_logit[0]));
    }
    return tp_mag_mu(&m->o.mag, m->step);
}

double tp_decoder_mu(const tp_decoder *m, int l) {
    const float *lg;
    return layer_mu(m, l, &lg);
}

/* The softmax branch is skipped when μ = 1 exactly, with no cross gate and
 * no base_scale_attn (the pure-linear model). */
int tp_decoder_layer_softmax(const tp_decoder *m, int l) { return need_softmax(m, l); }

void tp_decoder_set_eval(tp_decoder *m, int eval) { m->eval_mode = eval != 0; }

static int need_softmax(const tp_decoder *m, int l) {
    if (!m->o.liza.enabled) return 1;
    const float *lg;
    double mu = layer_mu(m, l, &lg);
    return lg || mu != 1.0 || m->o.mag.cross_gate || m->o.liza.base_scale_attn;
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

static int layer_fwd(tp_decoder *m, int l, acts *A, float *x, const tp_batch *b, tp_err *err) {
    const tp_model_config *c = &m->cfg;
    layer *Ly = &m->layers[l];
    int64_t N = b->B * b->T, D = c->hidden, F = c->ffn, d = c->head_dim;
    int64_t qd = c->heads * d, kvd = c->kv_heads * d;
    int lz = m->o.liza.enabled, soft = need_softmax(m, l);
    int rc;
    memcpy(A->x_in, x, (size_t)(N * D) * sizeof(float));
    tp_rmsnorm_fwd(A->a, A->rstd1, x, Ly->norm_in, N, D, (float)c->rms_eps);
    if ((rc = lin_fwd(m, l, TP_MOD_Q, A->a, N, A->q, A->xa[TP_MOD_Q], err)) ||
        (rc = lin_fwd(m, l, TP_MOD_K, A->a, N, A->k, A->xa[TP_MOD_K], err)) ||
        (rc = lin_fwd(m, l, TP_MOD_V, A->a, N, A->v, A->xa[TP_MOD_V], err)))
        return rc;
    if (soft) { /* softmax branch: RoPE on copies; q, k stay pre-RoPE for LiZA */
        memcpy(A->qr, A->q, (size_t)(N * qd) * sizeof(float));
        memcpy(A->kr, A->k, (size_t)(N * kvd) * sizeof(float));
        tp_rope_apply(A->qr, N, c->heads, d, b->pos, m->rope_cos, m->rope_sin, 0);
        tp_rope_apply(A->kr, N, c->kv_heads, d, b->pos, m->rope_cos, m->rope_sin, 0);
        if (m->ops) {
            rc = m->ops->softmax(m->ops_ctx, l, A->qr, A->kr, A->v, N, A->att, err);
        } else {
            tp_attn_dims ad = {b->B, b->T, c->heads, c->kv_heads, d, c->sliding_window};
            rc = tp_attn_fwd(&ad, A->qr, A->kr, A->v, b->doc_start, A->att, A->lse, err);
        }
        if (rc) return rc;
    }
    /* o_proj input: [softmax output; normalised LiZA output] stacked, so one
     * product (and one LoRA) serves both branches */
    float *oin = A->att + (soft ? 0 : N * qd);
    int64_t orows = (soft ? N : 0) + (lz ? N : 0);
    if (lz && m->ops) {
        if ((rc = m->ops->liza(m->ops_ctx, l, A->q, A->k, A->v, N, A->y, err))) return rc;
    } else if (lz) {
        const tp_liza_opts *lo = &m->o.liza;
        tp_gate_dims gd = {b->B, b->T, c->heads, c->kv_heads, d, lo->beta_gate, lo->alpha_gate};
        tp_liza_gates_fwd(&gd, A->q, A->k, A->v, b->doc_start, A->qh, A->kh, A->vh, A->beta, A->la);
        tp_liza_dims ld = {b->B, b->T, c->heads, c->kv_heads, d};
        tp_liza_cfg lc = {lo->order, lo->trick, lo->linear, lo->chunk};
        size_t ns = tp_liza_state_count(&ld, &lc, b->doc_start) * (size_t)(d * d);
        if (ns > A->states_cap) {
            float *np = realloc(A->states, ns * sizeof(float));
            if (!np) return tp_fail(err, TP_ENOMEM, "liza: out of memory for %zu chunk states", ns / (size_t)(d * d));
            if (!A->states) tp_advise_huge(np, ns * sizeof(float));
            A->states = np;
            A->states_cap = ns;
        }
        if ((rc = tp_liza_fwd(&ld, &lc, A->qh, A->kh, A->vh, A->beta, lo->alpha_gate == TP_GATE_C ? NULL : A->la,
                              b->doc_start, A->y, A->states, err)))
            return rc;
    }
    if (lz) { /* RMS normalisation without weight over the H·d features */
        float *yn = A->att + N * qd;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) {
            double ss = 0;
            for (int64_t e = 0; e < qd; e++) ss += (double)A->y[t * qd + e] * A->y[t * qd + e];
            float r = (float)(1.0 / sqrt(ss / (double)qd + 1e-6));
            A->rstd_y[t] = r;
            for (int64_t e = 0; e < qd; e++) yn[t * qd + e] = A->y[t * qd + e] * r;
        }
    }
    float *o2 = lz ? A->o2 : m->tmp_o;
    if ((rc = lin_fwd(m, l, TP_MOD_O, oin, orows, o2, A->xa[TP_MOD_O], err))) return rc;
    if (!lz) {
        tp_add(x, o2, N * D);
    } else {
        const float *ob = soft ? o2 : NULL, *ol = o2 + (soft ? N * D : 0), *lg;
        double mus = layer_mu(m, l, &lg);
        int vec = lg && m->o.mag.vector, cross = m->o.mag.cross_gate, bs = m->o.liza.base_scale_attn;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) {
            float sc = 1.0f;
            if (bs) {
                double ss = 0;
                for (int64_t e = 0; e < D; e++) ss += (double)ob[t * D + e] * ob[t * D + e];
                sc = (float)sqrt(ss / (double)D + 1e-5);
                A->sc[t] = sc;
            }
            for (int64_t e = 0; e < D; e++) {
                float mu = vec ? sigmoidf(lg[e]) : (float)mus;
                float lo = sc * ol[t * D + e];
                if (!ob) { x[t * D + e] += lo; continue; }
                float a = (1 - mu) * ob[t * D + e], bl = mu * lo;
                x[t * D + e] += a + bl + (cross ? a * bl : 0.0f);
            }
        }
    }
    memcpy(A->x_mid, x, (size_t)(N * D) * sizeof(float));
    tp_rmsnorm_fwd(A->bn, A->rstd2, x, Ly->norm_post, N, D, (float)c->rms_eps);
    if ((rc = lin_fwd(m, l, TP_MOD_GATE, A->bn, N, A->g, A->xa[TP_MOD_GATE], err)) ||
        (rc = lin_fwd(m, l, TP_MOD_UP, A->bn, N, A->u, A->xa[TP_MOD_UP], err)))
        return rc;
    tp_swiglu_fwd(A->h, A->g, A->u, N * F);
    if ((rc = lin_fwd(m, l, TP_MOD_DOWN, A->h, N, m->tmp_o, A->xa[TP_MOD_DOWN], err))) return rc;
    tp_add(x, m->tmp_o, N * D);
    return TP_OK;
}

/* Backward of the MaG mix: from dx (= d o_attn) fill d_o2 (stacked d o_base,
 * d o_lin0) and the MaG logit gradient. */
static void mag_bwd(tp_decoder *m, int l, acts *A, const float *dx, int64_t N, int soft) {
    int64_t D = m->cfg.hidden;
    const float *ob = soft ? A->o2 : NULL, *ol = A->o2 + (soft ? N * D : 0), *lg;
    float *dob = soft ? m->d_o2 : NULL, *dol = m->d_o2 + (soft ? N * D : 0);
    double mus = layer_mu(m, l, &lg);
    int vec = lg && m->o.mag.vector, cross = m->o.mag.cross_gate, bs = m->o.liza.base_scale_attn;
    float *dmu_tok = m->mu_tok; /* per-token dμ (scalar μ), summed in order below */
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        float sc = bs ? A->sc[t] : 1.0f;
        double dmu = 0, dsc = 0;
        for (int64_t e = 0; e < D; e++) {
            float g = dx[t * D + e], lo0 = ol[t * D + e];
            if (!ob) { dol[t * D + e] = g; continue; }
            float mu = vec ? sigmoidf(lg[e]) : (float)mus, lo = sc * lo0, o = ob[t * D + e];
            float a = (1 - mu) * o, bl = mu * lo;
            float da = g * (1 + (cross ? bl : 0.0f)), db = g * (1 + (cross ? a : 0.0f));
            dob[t * D + e] = (1 - mu) * da;
            float dlo = mu * db;
            dol[t * D + e] = sc * dlo;
            dsc += (double)dlo * lo0;
            if (!vec) dmu += -(double)o * da + (double)lo * db;
        }
        if (ob && bs) { /* sc = sqrt(mean(o_base²) + 1e-5) */
            float f = (float)(dsc / ((double)D * sc));
            for (int64_t e = 0; e < D; e++) dob[t * D + e] += f * ob[t * D + e];
        }
        dmu_tok[t] = (float)dmu;
    }
    if (!lg || !ob) return;
    float *dm = m->layers[l].dmag;
    if (!vec) {
        double s = 0;
        for (int64_t t = 0; t < N; t++) s += dmu_tok[t];
        dm[0] += (float)(s * mus * (1 - mus));
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < D; e++) { /* per channel, tokens in order */
        float mu = sigmoidf(lg[e]);
        double s = 0;
        for (int64_t t = 0; t < N; t++) {
            float sc = bs ? A->sc[t] : 1.0f, g = dx[t * D + e], o = ob[t * D + e], lo = sc * ol[t * D + e];
            float a = (1 - mu) * o, bl = mu * lo;
            float da = g * (1 + (cross ? bl : 0.0f)), db = g * (1 + (cross ? a : 0.0f));
            s += -(double)o * da + (double)lo * db;
        }
        dm[e] += (float)(s * mu * (1 - mu));
    }
}

/* dx: gradient w.r.t. the layer output on entry, w.r.t. its input on exit. */
static int layer_bwd(tp_decoder *m, int l, acts *A, float *dx, const tp_batch *b, tp_err *err) {
    const tp_model_config *c = &m->cfg;
    layer *Ly = &m->layers[l];
    int64_t N = b->B * b->T, D = c->hidden, F = c->ffn, d = c->head_dim;
    int64_t qd = c->heads * d, kvd = c->kv_heads * d;
    int lz = m->o.liza.enabled, soft = need_softmax(m, l);
    int rc;
    /* MLP */
    if ((rc = lin_bwd(m, l, TP_MOD_DOWN, A->h, A->xa[TP_MOD_DOWN], N, dx, m->d_h, 0, err))) return rc;
    tp_swiglu_bwd(m->d_g, m->d_u, m->d_h, A->g, A->u, N * F);
    if ((rc = lin_bwd(m, l, TP_MOD_GATE, A->bn, A->xa[TP_MOD_GATE], N, m->d_g, m->d_tmp, 0, err)) ||
        (rc = lin_bwd(m, l, TP_MOD_UP, A->bn, A->xa[TP_MOD_UP], N, m->d_u, m->d_tmp, 1, err)))
        return rc;
    tp_rmsnorm_bwd(dx, Ly->dnorm_post, m->d_tmp, A->x_mid, Ly->norm_post, A->rstd2, N, D, 1);
    /* attention block: MaG, then the shared o_proj over the stacked inputs */
    const float *oin = A->att + (soft ? 0 : N * qd), *dy_o = dx;
    int64_t orows = (soft ? N : 0) + (lz ? N : 0);
    if (lz) {
        mag_bwd(m, l, A, dx, N, soft);
        dy_o = m->d_o2;
    }
    float *d_oin = m->d_att + (soft ? 0 : N * qd);
    if ((rc = lin_bwd(m, l, TP_MOD_O, oin, A->xa[TP_MOD_O], orows, dy_o, d_oin, 0, err))) return rc;
    if (soft) {
        tp_attn_dims ad = {b->B, b->T, c->heads, c->kv_heads, d, c->sliding_window};
        if ((rc = tp_attn_bwd(&ad, A->qr, A->kr, A->v, b->doc_start, A->att, A->lse, m->d_att, m->d_q, m->d_k,
                              m->d_v, err)))
            return rc;
        tp_rope_apply(m->d_q, N, c->heads, d, b->pos, m->rope_cos, m->rope_sin, 1);
        tp_rope_apply(m->d_k, N, c->kv_heads, d, b->pos, m->rope_cos, m->rope_sin, 1);
    } else {
        memset(m->d_q, 0, (size_t)(N * qd) * sizeof(float));
        memset(m->d_k, 0, (size_t)(N * kvd) * sizeof(float));
        memset(m->d_v, 0, (size_t)(N * kvd) * sizeof(float));
    }
    if (lz) {
        const tp_liza_opts *lo = &m->o.liza;
        const float *yn = A->att + N * qd, *dyn = m->d_att + N * qd;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) { /* through y / sqrt(mean(y²) + 1e-6) */
            double dot = 0;
            for (int64_t e = 0; e < qd; e++) dot += (double)dyn[t * qd + e] * yn[t * qd + e];
            float mean = (float)(dot / (double)qd), r = A->rstd_y[t];
            for (int64_t e = 0; e < qd; e++) m->d_y[t * qd + e] = r * (dyn[t * qd + e] - yn[t * qd + e] * mean);
        }
        tp_liza_dims ld = {b->B, b->T, c->heads, c->kv_heads, d};
        tp_liza_cfg lc = {lo->order, lo->trick, lo->linear, lo->chunk};
        int decay = lo->alpha_gate != TP_GATE_C;
        if ((rc = tp_liza_bwd(&ld, &lc, A->qh, A->kh, A->vh, A->beta, decay ? A->la : NULL, b->doc_start, A->states,
                              m->d_y, m->d_qh, m->d_kh, m->d_vh, m->d_beta, m->d_la, err)))
            return rc;
        tp_gate_dims gd = {b->B, b->T, c->heads, c->kv_heads, d, lo->beta_gate, lo->alpha_gate};
        tp_liza_gates_bwd(&gd, A->q, A->k, A->v, b->doc_start, m->d_qh, m->d_kh, m->d_vh, m->d_beta, m->d_la, m->d_q,
                          m->d_k, m->d_v);
    }
    if ((rc = lin_bwd(m, l, TP_MOD_Q, A->a, A->xa[TP_MOD_Q], N, m->d_q, m->d_tmp, 0, err)) ||
        (rc = lin_bwd(m, l, TP_MOD_K, A->a, A->xa[TP_MOD_K], N, m->d_k, m->d_tmp, 1, err)) ||
        (rc = lin_bwd(m, l, TP_MOD_V, A->a, A->xa[TP_MOD_V], N, m->d_v, m->d_tmp, 1, err)))
        return rc;
    tp_rmsnorm_bwd(dx, Ly->dnorm_in, m->d_tmp, A->x_in, Ly->norm_in, A->rstd1, N, D, 1);
    return TP_OK;
}

/* ---- whole model ------------------------------------------------------- */

static void embed_rows(const tp_weight *E, const int32_t *ids, int64_t N, float *x) {
    int64_t D = E->cols;
    size_t es = tp_dtype_size(E->dtype);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++)
        tp_to_f32(x + t * D, (const char *)E->data + (size_t)ids[t] * (size_t)D * es, E->dtype, (size_t)D);
}

int tp_decoder_step(tp_decoder *m, const tp_batch *b, double normalizer, int backward, float *logits_out,
                    double *loss_sum, int64_t *count, tp_err *err) {
    const tp_model_config *c = &m->cfg;
    int64_t N = b->B * b->T, D = c->hidden, V = c->vocab, L = c->layers;
    /* every input id first: a bad id also makes the label before it bad, and
     * the id is the one to name */
    for (int64_t t = 0; t < N; t++)
        if (b->ids[t] < 0 || b->ids[t] >= V)
            return tp_fail(err, TP_EINVAL, "batch: token id %d at row %lld, position %lld is outside [0, %lld)",
                           b->ids[t], (long long)(t / b->T), (long long)(t % b->T), (long long)V);
    for (int64_t t = 0; t < N; t++) {
        if (b->labels[t] != -100 && (b->labels[t] < 0 || b->labels[t] >= V))
            return tp_fail(err, TP_EINVAL, "batch: label %d at row %lld, position %lld is outside [0, %lld) and not -100",
                           b->labels[t], (long long)(t / b->T), (long long)(t % b->T), (long long)V);
    }
    if (backward && (m->o.inference || m->eval_mode))
        return tp_fail(err, TP_EINVAL, "internal: backward on an inference decoder or in evaluation mode");
    int rc = tp_decoder_ensure_acts(m, N, b->T, err);
    if (rc) return rc;
    m->cur = b;
    tp_rope_tables(m->rope_cos, m->rope_sin, m->inv_freq, c->head_dim, b->T);
    embed_rows(&m->embed, b->ids, N, m->x_res);
    for (int64_t l = 0; l < L; l++) {
        if (m->x_saved) memcpy(m->x_saved + l * N * D, m->x_res, (size_t)(N * D) * sizeof(float));
        if ((rc = layer_fwd(m, (int)l, &m->A[m->nsets == 1 ? 0 : l], m->x_res, b, err))) return rc;
    }
    memcpy(m->xL, m->x_res, (size_t)(N * D) * sizeof(float));
    tp_rmsnorm_fwd(m->xf, m->rstdf, m->xL, m->norm_final, N, D, (float)c->rms_eps);
    /* LM head + cross-entropy, a block of tokens at a time so [N, V] logits
     * never exist at once; the head's backward is fused in */
    int64_t blk = tp_head_block(V, N);
    double total = 0;
    int64_t cnt_all = 0;
    float scale = backward && normalizer > 0 ? (float)(1.0 / normalizer) : 0.0f;
    tp_mm_hold(m->mm, &m->head);
    for (int64_t t0 = 0; t0 < N; t0 += blk) {
        int64_t nb = t0 + blk <= N ? blk : N - t0;
        float *lg = m->logit_blk;
        if ((rc = tp_mm_xwt(m->mm, m->xf + t0 * D, nb, &m->head, lg, 0, err))) break;
        if (logits_out) memcpy(logits_out + t0 * V, lg, (size_t)(nb * V) * sizeof(float));
        int64_t cnt;
        total += tp_cross_entropy(backward ? lg : NULL, lg, b->labels + t0, nb, V, scale, &cnt);
        cnt_all += cnt;
        if (!backward) continue;
        if (m->dhead) tp_sgemm(1, 0, V, D, nb, 1.0f, lg, V, m->xf + t0 * D, D, 1.0f, m->dhead, D);
        if ((rc = tp_mm_dyw(m->mm, lg, nb, &m->head, m->d_tmp + t0 * D, 0, err))) break;
    }
    tp_mm_hold(m->mm, NULL);
    if (rc) return rc;
    *loss_sum = total;
    *count = cnt_all;
    if (!backward) return TP_OK;
    tp_rmsnorm_bwd(m->d_res, m->dnorm_final, m->d_tmp, m->xL, m->norm_final, m->rstdf, N, D, 0);
    if (m->hook) m->hook(m->hook_ctx, (int)L);
    for (int64_t l = L - 1; l >= 0; l--) {
        acts *A = &m->A[m->o.recompute ? 0 : l];
        if (m->o.recompute) { /* re-run the layer from its saved input */
            memcpy(m->x_res, m->x_saved + l * N * D, (size_t)(N * D) * sizeof(float));
            if ((rc = layer_fwd(m, (int)l, A, m->x_res, b, err))) return rc;
        }
        if ((rc = layer_bwd(m, (int)l, A, m->d_res, b, err))) return rc;
        if (m->hook) m->hook(m->hook_ctx, (int)l);
    }
    if (m->dembed) { /* scatter-add rows; columns in parallel keeps a fixed order */
        float *dE = m->dembed;
        const float *g = m->d_res;
#pragma omp parallel for schedule(static)
        for (int64_t j0 = 0; j0 < D; j0 += 64) {
            int64_t j1 = j0 + 64 < D ? j0 + 64 : D;
            for (int64_t t = 0; t < N; t++)
                for (int64_t j = j0; j < j1; j++) dE[(int64_t)b->ids[t] * D + j] += g[t * D + j];
        }
    }
    if (m->hook) m->hook(m->hook_ctx, -1);
    return TP_OK;
}

int tp_decoder_forward_cached(tp_decoder *m, const int32_t *ids, int64_t n, int64_t pos0, const tp_attn_ops *ops,
                              void *ctx, int64_t logits_from, float *logits, tp_err *err) {
    const tp_model_config *c = &m->cfg;
    int64_t D = c->hidden, V = c->vocab, L = c->layers;
    if (!m->o.inference) return tp_fail(err, TP_EINVAL, "internal: forward_cached needs a decoder built for inference");
    if (n < 1 || logits_from < 0 || logits_from > n || pos0 < 0 || pos0 > INT32_MAX - n)
        return tp_fail(err, TP_EINVAL, "internal: forward_cached: bad block (n %lld, from %lld, pos %lld)",
                       (long long)n, (long long)logits_from, (long long)pos0);
    for (int64_t t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= V)
            return tp_fail(err, TP_EINVAL, "token id %d at position %lld is outside the vocabulary [0, %lld)", ids[t],
                           (long long)(pos0 + t), (long long)V);
    int rc = tp_decoder_ensure_acts(m, n, n, err);
    if (rc) return rc;
    int32_t *meta = tp_malloc((size_t)(2 * n) * sizeof(int32_t), err);
    if (!meta) return TP_ENOMEM;
    int32_t *rel = meta, *zero = meta + n;
    for (int64_t t = 0; t < n; t++) { /* RoPE tables start at pos0; the block is one document */
        rel[t] = (int32_t)t;
        zero[t] = 0;
    }
    tp_batch b = {1, n, ids, NULL, zero, rel, NULL};
    m->cur = &b;
    m->ops = ops;
    m->ops_ctx = ctx;
    tp_rope_tables_from(m->rope_cos, m->rope_sin, m->inv_freq, c->head_dim, pos0, n);
    embed_rows(&m->embed, ids, n, m->x_res);
    for (int64_t l = 0; l < L && rc == TP_OK; l++) rc = layer_fwd(m, (int)l, &m->A[0], m->x_res, &b, err);
    m->ops = NULL;
    m->ops_ctx = NULL;
    m->cur = NULL;
    free(meta);
    if (rc) return rc;
    int64_t nl = n - logits_from;
    if (nl == 0) return TP_OK;
    tp_rmsnorm_fwd(m->xf, m->rstdf, m->x_res + logits_from * D, m->norm_final, nl, D, (float)c->rms_eps);
    return tp_mm_xwt(m->mm, m->xf, nl, &m->head, logits, 0, err);
}

int tp_batch_row_positions(const int64_t *starts, size_t nstarts, int64_t T, int32_t *doc_start, int32_t *pos,
                           tp_err *err) {
    if (nstarts == 0 || starts[0] != 0)
        return tp_fail(err, TP_EINVAL, "doc_starts must begin with 0");
    for (size_t i = 1; i < nstarts; i++)
        if (starts[i] <= starts[i - 1] || starts[i] >= T)
            return tp_fail(err, TP_EINVAL, "doc_starts must be strictly increasing positions below %lld, got %lld after %lld",
                           (long long)T, (long long)starts[i], (long long)starts[i - 1]);
    size_t k = 0;
    for (int64_t t = 0; t < T; t++) {
        while (k + 1 < nstarts && starts[k + 1] <= t) k++;
        doc_start[t] = (int32_t)starts[k];
        pos[t] = (int32_t)(t - starts[k]);
    }
    return TP_OK;
}
