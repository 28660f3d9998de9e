#include "model/decoder.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "kernels/ops.h"
#include "util/rng.h"

const char *const tp_module_names[TP_NMOD] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"};
const char *const tp_module_paths[TP_NMOD] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                               "mlp.down_proj"};
static const tp_weight_kind module_kind[TP_NMOD] = {TP_W_Q, TP_W_K, TP_W_V, TP_W_O, TP_W_GATE, TP_W_UP, TP_W_DOWN};

void tp_decoder_opts_default(tp_decoder_opts *o) {
    memset(o, 0, sizeof *o);
    o->trainable = TP_TRAIN_LORA;
    o->lora.r = 8;
    o->lora.alpha = 16;
    o->lora.targets = (1u << TP_MOD_Q) | (1u << TP_MOD_K) | (1u << TP_MOD_V) | (1u << TP_MOD_O);
    o->matmul = TP_MM_F32;
    tp_liza_preset("delta_rule", &o->liza);
    o->liza.chunk = 64;
    o->mag.mode = TP_MAG_CONSTANT;
    o->mag.mu0 = 0.5;
    o->mag.mu1 = 1.0;
    o->mag.steps = 1000;
    o->mag.values[0] = 0.1;
    o->mag.values[1] = 0.5;
    o->mag.values[2] = 0.9;
    o->mag.nvalues = 3;
    o->mag.period = 100;
}

/* operator_mode presets of the Python TPTT package */
static const struct {
    const char *name;
    int order, alpha, beta, linear, trick;
} presets[] = {
    {"delta_rule", 1, TP_GATE_C, TP_GATE_K, 1, TP_TRICK_DT},
    {"gated_delta_rule", 1, TP_GATE_K, TP_GATE_K, 1, TP_TRICK_DT},
    {"delta_rule_v", 1, TP_GATE_C, TP_GATE_V, 1, TP_TRICK_DT},
    {"delta_rule_kv", 1, TP_GATE_C, TP_GATE_KV, 1, TP_TRICK_DT},
    {"delta_rule_gelu", 1, TP_GATE_C, TP_GATE_K, 0, TP_TRICK_DT},
    {"delta_product", 2, TP_GATE_C, TP_GATE_K, 1, TP_TRICK_DT},
    {"gated_delta_product", 2, TP_GATE_K, TP_GATE_K, 1, TP_TRICK_DT},
    {"delta_product_r", 2, TP_GATE_C, TP_GATE_K, 1, TP_TRICK_ROT},
    {"delta_product_c", 2, TP_GATE_C, TP_GATE_K, 1, TP_TRICK_RDT},
};

int tp_liza_preset(const char *name, tp_liza_opts *o) {
    for (size_t i = 0; i < sizeof presets / sizeof *presets; i++)
        if (!strcmp(name, presets[i].name)) {
            o->order = presets[i].order;
            o->alpha_gate = presets[i].alpha;
            o->beta_gate = presets[i].beta;
            o->linear = presets[i].linear;
            o->trick = presets[i].trick;
            snprintf(o->preset, sizeof o->preset, "%s", name);
            return 0;
        }
    return -1;
}

const char *tp_liza_preset_name(const tp_liza_opts *o) {
    for (size_t i = 0; i < sizeof presets / sizeof *presets; i++)
        if (o->order == presets[i].order && o->alpha_gate == presets[i].alpha && o->beta_gate == presets[i].beta &&
            o->linear == presets[i].linear && o->trick == presets[i].trick)
            return presets[i].name;
    return NULL;
}

double tp_mag_mu(const tp_mag_opts *o, int64_t step) {
    switch (o->mode) {
    case TP_MAG_GRADUAL: {
        double f = o->steps > 0 ? (double)(step < o->steps ? step : o->steps) / (double)o->steps : 1.0;
        return o->mu0 + (o->mu1 - o->mu0) * f;
    }
    case TP_MAG_CYCLIC:
        return o->nvalues > 0 ? o->values[(step / (o->period > 0 ? o->period : 1)) % o->nvalues] : o->mu0;
    default:
        return o->mu0;
    }
}

const char *tp_trainable_name(tp_trainable t) {
    return t == TP_TRAIN_ALL ? "all" : t == TP_TRAIN_PROJECTIONS ? "projections" : "lora";
}

int tp_lora_parse_targets(const char *list, unsigned *mask, tp_err *err) {
    *mask = 0;
    const char *p = list;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        int found = -1;
        for (int m = 0; m < TP_NMOD; m++)
            if (strlen(tp_module_names[m]) == n && !strncmp(p, tp_module_names[m], n)) found = m;
        if (found < 0)
            return tp_fail(err, TP_EINVAL,
                           "lora.target_modules: unknown module '%.*s' (expected q_proj, k_proj, v_proj, o_proj, "
                           "gate_proj, up_proj, down_proj)",
                           (int)n, p);
        *mask |= 1u << found;
        p += n;
        if (*p == ',') p++;
    }
    if (!*mask) return tp_fail(err, TP_EINVAL, "lora.target_modules: empty list");
    return TP_OK;
}

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
    acts *A;               /* L sets, or 1 with recompute */
    float *x_saved;        /* [L, N, D] layer inputs with recompute */
    float *x_res, *xf, *rstdf, *xL;
    float *d_res, *d_tmp, *d_q, *d_k, *d_v, *d_att, *d_g, *d_u, *d_h, *t_r, *xdrop, *tmp_o;
    float *d_qh, *d_kh, *d_vh, *d_beta, *d_la, *d_y, *d_o2, *mu_tok;
    float *logit_blk, *rope_cos, *rope_sin;
    double *inv_freq;
    tp_grad_hook hook;
    void *hook_ctx;
    const tp_batch *cur; /* the batch of the running step (dropout masks) */
};

void tp_decoder_set_grad_hook(tp_decoder *m, tp_grad_hook hook, void *ctx) {
    m->hook = hook;
    m->hook_ctx = ctx;
}
const tp_decoder_opts *tp_decoder_options(const tp_decoder *m) { return &m->o; }

size_t tp_decoder_nparams(const tp_decoder *m) { return m->nparams; }
const tp_param *tp_decoder_param(const tp_decoder *m, size_t i) { return i < m->nparams ? &m->params[i] : NULL; }
float *tp_decoder_theta(tp_decoder *m) { return m->theta; }
float *tp_decoder_grad(tp_decoder *m) { return m->grad; }
size_t tp_decoder_numel(const tp_decoder *m) { return m->numel; }
void tp_decoder_zero_grad(tp_decoder *m) { memset(m->grad, 0, m->numel * sizeof(float)); }
void tp_decoder_set_step(tp_decoder *m, int64_t step) { m->step = step; }

static tp_weight view_weight(const tp_tensor_view *v) {
    tp_weight w = {v->data, v->dtype, v->shape[0], v->ndim == 2 ? v->shape[1] : 1};
    return w;
}

/* Parameter table building: pass 1 registers names/shapes, pass 2 binds. */
static int add_param(tp_decoder *m, size_t *cap, const char *name, int ndim, int64_t d0, int64_t d1, int decay,
                     int is_lora, tp_err *err) {
    if (m->nparams == *cap) {
        size_t nc = *cap ? *cap * 2 : 64;
        tp_param *p = realloc(m->params, nc * sizeof *p);
        if (!p) return tp_fail(err, TP_ENOMEM, "out of memory");
        m->params = p;
        *cap = nc;
    }
    tp_param *p = &m->params[m->nparams++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "base_model.model.%s", name);
    p->ndim = ndim;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->numel = (size_t)d0 * (size_t)(ndim == 2 ? d1 : 1);
    p->offset = m->numel;
    p->decay = decay;
    p->is_lora = is_lora;
    int l;
    if (sscanf(name, "model.layers.%d.", &l) == 1) p->layer = l;
    else p->layer = !strcmp(name, "model.embed_tokens.weight") ? -1 : (int)m->cfg.layers;
    m->numel += (p->numel + 15) & ~(size_t)15; /* 64-byte aligned starts */
    return TP_OK;
}

static int is_trainable_weight(const tp_decoder *m, tp_weight_kind k) {
    if (m->o.trainable == TP_TRAIN_ALL) return 1;
    if (m->o.trainable != TP_TRAIN_PROJECTIONS) return 0;
    for (int j = 0; j < TP_NMOD; j++)
        if (module_kind[j] == k) return (m->o.lora.targets >> j) & 1;
    return 0;
}

static int build_params(tp_decoder *m, tp_err *err) {
    const tp_hf_model *b = m->base;
    size_t cap = 0;
    int rc;
    for (size_t i = 0; i < b->nweights; i++) {
        const tp_weight_desc *d = &b->desc[i];
        if (m->o.trainable != TP_TRAIN_LORA && is_trainable_weight(m, d->kind)) {
            int decay = d->ndim == 2 && d->kind != TP_W_EMBED;
            if ((rc = add_param(m, &cap, d->name, d->ndim, d->shape[0], d->shape[1], decay, 0, err))) return rc;
        }
        if (m->o.trainable == TP_TRAIN_LORA && d->layer >= 0) {
            for (int j = 0; j < TP_NMOD; j++) {
                if (module_kind[j] != d->kind || !((m->o.lora.targets >> j) & 1)) continue;
                char nm[TP_PARAM_NAME_MAX];
                size_t base_len = strlen(d->name) - strlen(".weight");
                snprintf(nm, sizeof nm, "%.*s.lora_A.weight", (int)base_len, d->name);
                if ((rc = add_param(m, &cap, nm, 2, m->o.lora.r, d->shape[1], 1, 1, err))) return rc;
                snprintf(nm, sizeof nm, "%.*s.lora_B.weight", (int)base_len, d->name);
                if ((rc = add_param(m, &cap, nm, 2, d->shape[0], m->o.lora.r, 1, 1, err))) return rc;
            }
        }
    }
    if (m->o.liza.enabled && m->o.mag.mode == TP_MAG_LEARNABLE)
        for (int64_t l = 0; l < m->cfg.layers; l++) {
            char nm[TP_PARAM_NAME_MAX];
            snprintf(nm, sizeof nm, "model.layers.%lld.self_attn.mag_logit", (long long)l);
            if ((rc = add_param(m, &cap, nm, 1, m->o.mag.vector ? m->cfg.hidden : 1, 0, 0, 0, err))) return rc;
        }
    m->theta = tp_calloc(m->numel ? m->numel : 1, sizeof(float), err);
    m->grad = tp_calloc(m->numel ? m->numel : 1, sizeof(float), err);
    return m->theta && m->grad ? TP_OK : TP_ENOMEM;
}

static tp_param *find_param(tp_decoder *m, const char *hf_name, const char *suffix) {
    char key[TP_PARAM_NAME_MAX + 32];
    snprintf(key, sizeof key, "base_model.model.%s%s", hf_name, suffix);
    for (size_t i = 0; i < m->nparams; i++)
        if (!strcmp(m->params[i].name, key)) return &m->params[i];
    return NULL;
}

/* Bind every weight to frozen data or its trainable fp32 copy; init LoRA. */
static int bind(tp_decoder *m, tp_err *err) {
    const tp_hf_model *b = m->base;
    const tp_model_config *c = &m->cfg;
    size_t nsmall = 0;
    for (size_t i = 0; i < b->nweights; i++)
        if (b->desc[i].ndim == 1) nsmall += (size_t)b->desc[i].shape[0];
    m->small = tp_calloc(nsmall ? nsmall : 1, sizeof(float), err);
    m->layers = tp_calloc((size_t)c->layers, sizeof *m->layers, err);
    if (!m->small || !m->layers) return TP_ENOMEM;
    float *sp = m->small;
    for (size_t i = 0; i < b->nweights; i++) {
        const tp_weight_desc *d = &b->desc[i];
        const tp_tensor_view *v = b->views[i];
        tp_param *p = find_param(m, d->name, "");
        float *val = NULL, *grad = NULL;
        if (p) { /* trainable full weight: fp32 copy of the stored values */
            val = m->theta + p->offset;
            grad = m->grad + p->offset;
            tp_to_f32(val, v->data, v->dtype, v->numel);
        } else if (d->ndim == 1) {
            val = sp;
            sp += d->shape[0];
            tp_to_f32(val, v->data, v->dtype, v->numel);
        }
        tp_weight w = p ? (tp_weight){val, TP_F32, d->shape[0], d->ndim == 2 ? d->shape[1] : 1} : view_weight(v);
        layer *L = d->layer >= 0 ? &m->layers[d->layer] : NULL;
        switch (d->kind) {
        case TP_W_EMBED: m->embed = w; m->dembed = grad; break;
        case TP_W_LM_HEAD: m->head = w; m->dhead = grad; break;
        case TP_W_NORM_FINAL: m->norm_final = val; m->dnorm_final = grad; break;
        case TP_W_NORM_IN: L->norm_in = val; L->dnorm_in = grad; break;
        case TP_W_NORM_POST: L->norm_post = val; L->dnorm_post = grad; break;
        case TP_W_Q_BIAS: L->m[TP_MOD_Q].bias = val; L->m[TP_MOD_Q].dbias = grad; break;
        case TP_W_K_BIAS: L->m[TP_MOD_K].bias = val; L->m[TP_MOD_K].dbias = grad; break;
        case TP_W_V_BIAS: L->m[TP_MOD_V].bias = val; L->m[TP_MOD_V].dbias = grad; break;
        default:
            for (int j = 0; j < TP_NMOD; j++) {
                if (module_kind[j] != d->kind) continue;
                lin *ln = &L->m[j];
                ln->w = w;
                ln->dw = grad;
                ln->out = d->shape[0];
                ln->in = d->shape[1];
                size_t base_len = strlen(d->name) - strlen(".weight");
                char hf[TP_PARAM_NAME_MAX];
                snprintf(hf, sizeof hf, "%.*s", (int)base_len, d->name);
                tp_param *pa = find_param(m, hf, ".lora_A.weight"), *pb = find_param(m, hf, ".lora_B.weight");
                if (pa && pb) {
                    ln->A = m->theta + pa->offset;
                    ln->dA = m->grad + pa->offset;
                    ln->B = m->theta + pb->offset;
                    ln->dB = m->grad + pb->offset;
                    /* A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform), B = 0;
                     * one RNG stream per parameter, so values do not depend on order */
                    tp_rng rng;
                    tp_rng_seed(&rng, m->o.seed, 0x10000 + (uint64_t)(pa - m->params));
                    double bound = 1.0 / sqrt((double)ln->in);
                    for (size_t e = 0; e < pa->numel; e++) ln->A[e] = (float)((2 * tp_rng_uniform(&rng) - 1) * bound);
                    if (m->o.lora.init_random) {
                        tp_rng_seed(&rng, m->o.seed, 0x10000 + (uint64_t)(pb - m->params));
                        double bb = 1.0 / sqrt((double)m->o.lora.r);
                        for (size_t e = 0; e < pb->numel; e++) ln->B[e] = (float)((2 * tp_rng_uniform(&rng) - 1) * bb);
                    }
                }
            }
        }
    }
    if (c->tie_embeddings) {
        m->head = m->embed;
        m->dhead = m->dembed;
    }
    for (int64_t l = 0; l < c->layers; l++) {
        char nm[TP_PARAM_NAME_MAX];
        snprintf(nm, sizeof nm, "model.layers.%lld.self_attn.mag_logit", (long long)l);
        tp_param *p = find_param(m, nm, "");
        if (!p) continue;
        m->layers[l].mag_logit = m->theta + p->offset;
        m->layers[l].dmag = m->grad + p->offset;
        float logit = (float)log(m->o.mag.mu0 / (1.0 - m->o.mag.mu0));
        for (size_t e = 0; e < p->numel; e++) m->layers[l].mag_logit[e] = logit;
    }
    return TP_OK;
}

int tp_decoder_create(const tp_hf_model *base, const tp_decoder_opts *o, tp_decoder **out, tp_err *err) {
    *out = NULL;
    if (o->trainable == TP_TRAIN_LORA && (o->lora.r < 1 || o->lora.r > 65536))
        return tp_fail(err, TP_EINVAL, "lora.r must be between 1 and 65536, got %d", o->lora.r);
    if (!(o->lora.dropout >= 0 && o->lora.dropout < 1))
        return tp_fail(err, TP_EINVAL, "lora.dropout must be in [0, 1), got %g", o->lora.dropout);
    if (o->liza.enabled) {
        if (o->liza.order < 1 || o->liza.order > 8)
            return tp_fail(err, TP_EINVAL, "liza.order must be between 1 and 8, got %d", o->liza.order);
        if (o->liza.chunk < 1) return tp_fail(err, TP_EINVAL, "liza.chunk_size must be positive, got %d", o->liza.chunk);
        if (base->cfg.head_dim > 512)
            return tp_fail(err, TP_EUNSUP, "liza: head_dim %lld is larger than the supported 512",
                           (long long)base->cfg.head_dim);
        if (o->mag.mode == TP_MAG_LEARNABLE && !(o->mag.mu0 > 0 && o->mag.mu0 < 1))
            return tp_fail(err, TP_EINVAL, "mag.mu0 must be strictly between 0 and 1 for mag.mode=learnable, got %g",
                           o->mag.mu0);
    }
    tp_decoder *m = tp_calloc(1, sizeof *m, err);
    if (!m) return TP_ENOMEM;
    m->base = base;
    m->cfg = base->cfg;
    m->o = *o;
    m->lora_scale = (float)(o->lora.rslora ? o->lora.alpha / sqrt((double)o->lora.r) : o->lora.alpha / o->lora.r);
    int rc = tp_matmul_create(o->matmul, &m->mm, err);
    if (rc == TP_OK) rc = build_params(m, err);
    if (rc == TP_OK) rc = bind(m, err);
    if (rc == TP_OK) {
        m->inv_freq = tp_calloc((size_t)m->cfg.head_dim / 2, sizeof(double), err);
        if (!m->inv_freq) rc = TP_ENOMEM;
        else
            tp_rope_inv_freq(m->inv_freq, m->cfg.head_dim, m->cfg.rope_theta, m->cfg.rope_llama3 ? m->cfg.rope_factor : 0,
                             m->cfg.rope_low_freq_factor, m->cfg.rope_high_freq_factor,
                             (double)m->cfg.rope_original_max_pos);
    }
    if (rc != TP_OK) {
        tp_decoder_destroy(m);
        return rc;
    }
    *out = m;
    return TP_OK;
}

void tp_decoder_destroy(tp_decoder *m) {
    if (!m) return;
    tp_matmul_destroy(m->mm);
    free(m->layers);
    free(m->small);
    free(m->params);
    free(m->theta);
    free(m->grad);
    if (m->A)
        for (int64_t i = 0; i < (m->o.recompute ? 1 : m->cfg.layers); i++) free(m->A[i].states);
    free(m->arena);
    free(m->A);
    free(m->inv_freq);
    free(m);
}

/* ---- activation memory ------------------------------------------------- */

static int ensure_acts(tp_decoder *m, int64_t N, int64_t T, tp_err *err) {
    if (N <= m->cap_n && T <= m->cap_T) return TP_OK;
    const tp_model_config *c = &m->cfg;
    int64_t D = c->hidden, F = c->ffn, qd = c->heads * c->head_dim, kvd = c->kv_heads * c->head_dim;
    int64_t L = c->layers, r = m->o.trainable == TP_TRAIN_LORA ? m->o.lora.r : 0, H = c->heads, Hkv = c->kv_heads;
    int64_t nsets = m->o.recompute ? 1 : L, lz = m->o.liza.enabled;
    int64_t maxin = F > D ? F : D;
    if (maxin < qd) maxin = qd;
    int64_t blk = (16 << 20) / c->vocab; /* logits block: ~64 MB */
    if (blk < 1) blk = 1;
    if (blk > N) blk = N;
    /* per set: the base layer, plus LiZA's feature maps, gates, output and
     * the stacked o_proj input/output */
    size_t per_set = (size_t)(N * (4 * D + 2 * qd + 2 * kvd + 2 * qd + kvd + 3 * F) + 2 * N + H * N +
                              TP_NMOD * N * r + N * r + N * qd) +
                     (size_t)(lz * N * (2 * qd + 3 * kvd + Hkv + 1 + 2 * D + 1));
    size_t total = per_set * (size_t)nsets + (size_t)(m->o.recompute ? L * N * D : 0) +
                   (size_t)(N * (4 * D + 1)) + /* x_res, xf, xL, rstdf, tmp_o (2N) */ (size_t)(N * D) +
                   (size_t)(N * (2 * D + 3 * qd + 2 * kvd + 3 * F + 2 * r + 2 * maxin + 2 * D)) +
                   (size_t)(lz * N * (2 * qd + 3 * kvd + Hkv + 1)) + (size_t)(blk * c->vocab) +
                   (size_t)(T * c->head_dim) + 64 * 64;
    if (m->A)
        for (int64_t i = 0; i < (m->o.recompute ? 1 : L); i++) free(m->A[i].states);
    free(m->arena);
    free(m->A);
    m->arena = malloc(total * sizeof(float));
    m->A = calloc((size_t)nsets, sizeof *m->A);
    if (!m->arena || !m->A) {
        free(m->arena);
        free(m->A);
        m->arena = NULL;
        m->A = NULL;
        m->cap_n = m->cap_T = 0;
        return tp_fail(err, TP_ENOMEM, "out of memory for activations (%.1f MiB for %lld tokens)",
                       (double)total * 4 / 1048576.0, (long long)N);
    }
    float *p = m->arena;
#define TAKE(ptr, count) (ptr = p, p += (size_t)(count))
    for (int64_t s = 0; s < nsets; s++) {
        acts *a = &m->A[s];
        TAKE(a->x_in, N * D); TAKE(a->a, N * D); TAKE(a->rstd1, N); TAKE(a->q, N * qd); TAKE(a->k, N * kvd);
        TAKE(a->v, N * kvd); TAKE(a->qr, N * qd); TAKE(a->kr, N * kvd); TAKE(a->att, 2 * N * qd);
        TAKE(a->lse, H * N); TAKE(a->x_mid, N * D); TAKE(a->bn, N * D); TAKE(a->rstd2, N); TAKE(a->g, N * F);
        TAKE(a->u, N * F); TAKE(a->h, N * F);
        for (int j = 0; j < TP_NMOD; j++) TAKE(a->xa[j], (j == TP_MOD_O ? 2 : 1) * N * r);
        if (lz) {
            TAKE(a->qh, N * qd); TAKE(a->kh, N * kvd); TAKE(a->vh, N * kvd); TAKE(a->beta, N * kvd);
            TAKE(a->la, N * Hkv); TAKE(a->y, N * qd); TAKE(a->rstd_y, N); TAKE(a->o2, 2 * N * D); TAKE(a->sc, N);
        }
    }
    m->x_saved = NULL;
    if (m->o.recompute) TAKE(m->x_saved, L * N * D);
    TAKE(m->x_res, N * D); TAKE(m->xf, N * D); TAKE(m->xL, N * D); TAKE(m->rstdf, N); TAKE(m->tmp_o, 2 * N * D);
    TAKE(m->d_res, N * D); TAKE(m->d_tmp, N * D); TAKE(m->d_q, N * qd); TAKE(m->d_att, 2 * N * qd);
    TAKE(m->d_k, N * kvd); TAKE(m->d_v, N * kvd); TAKE(m->d_g, N * F); TAKE(m->d_u, N * F); TAKE(m->d_h, N * F);
    TAKE(m->t_r, 2 * N * r); TAKE(m->xdrop, 2 * N * maxin); TAKE(m->d_o2, 2 * N * D);
    if (lz) {
        TAKE(m->d_qh, N * qd); TAKE(m->d_kh, N * kvd); TAKE(m->d_vh, N * kvd); TAKE(m->d_beta, N * kvd);
        TAKE(m->d_la, N * Hkv); TAKE(m->d_y, N * qd); TAKE(m->mu_tok, N);
    }
    TAKE(m->logit_blk, blk * c->vocab);
    TAKE(m->rope_cos, T * c->head_dim / 2); TAKE(m->rope_sin, T * c->head_dim / 2);
#undef TAKE
    if ((size_t)(p - m->arena) > total) { /* a sizing bug must never write past the arena */
        fprintf(stderr, "tptt: internal error: activation arena overflow\n");
        abort();
    }
    m->cap_n = N;
    m->cap_T = T;
    return TP_OK;
}

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
    if (m->o.lora.dropout <= 0) return x;
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
static double layer_mu(const tp_decoder *m, int l, const float **mu_logit) {
    *mu_logit = NULL;
    if (m->o.mag.mode == TP_MAG_LEARNABLE) {
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
        tp_attn_dims ad = {b->B, b->T, c->heads, c->kv_heads, d, c->sliding_window};
        if ((rc = tp_attn_fwd(&ad, A->qr, A->kr, A->v, b->doc_start, A->att, A->lse, err))) return rc;
    }
    /* o_proj input: [softmax output; normalised LiZA output] stacked, so one
     * product (and one LoRA) serves both branches */
    float *oin = A->att + (soft ? 0 : N * qd);
    int64_t orows = (soft ? N : 0) + (lz ? N : 0);
    if (lz) {
        const tp_liza_opts *lo = &m->o.liza;
        tp_gate_dims gd = {b->B, b->T, c->heads, c->kv_heads, d, lo->beta_gate, lo->alpha_gate};
        tp_liza_gates_fwd(&gd, A->q, A->k, A->v, b->doc_start, A->qh, A->kh, A->vh, A->beta, A->la);
        tp_liza_dims ld = {b->B, b->T, c->heads, c->kv_heads, d};
        tp_liza_cfg lc = {lo->order, lo->trick, lo->linear, lo->chunk};
        size_t ns = tp_liza_state_count(&ld, &lc, b->doc_start) * (size_t)(d * d);
        if (ns > A->states_cap) {
            float *np = realloc(A->states, ns * sizeof(float));
            if (!np) return tp_fail(err, TP_ENOMEM, "liza: out of memory for %zu chunk states", ns / (size_t)(d * d));
            A->states = np;
            A->states_cap = ns;
        }
        if ((rc = tp_liza_fwd(&ld, &lc, A->qh, A->kh, A->vh, A->beta, lo->alpha_gate == TP_GATE_C ? NULL : A->la,
                              b->doc_start, A->y, A->states, err)))
            return rc;
        /* RMS normalisation without weight over the H·d features */
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
    for (int64_t t = 0; t < N; t++) {
        if (b->ids[t] < 0 || b->ids[t] >= V)
            return tp_fail(err, TP_EINVAL, "batch: token id %d at row %lld, position %lld is outside [0, %lld)",
                           b->ids[t], (long long)(t / b->T), (long long)(t % b->T), (long long)V);
        if (b->labels[t] != -100 && (b->labels[t] < 0 || b->labels[t] >= V))
            return tp_fail(err, TP_EINVAL, "batch: label %d at row %lld, position %lld is outside [0, %lld) and not -100",
                           b->labels[t], (long long)(t / b->T), (long long)(t % b->T), (long long)V);
    }
    int rc = ensure_acts(m, N, b->T, err);
    if (rc) return rc;
    m->cur = b;
    tp_rope_tables(m->rope_cos, m->rope_sin, m->inv_freq, c->head_dim, b->T);
    embed_rows(&m->embed, b->ids, N, m->x_res);
    for (int64_t l = 0; l < L; l++) {
        if (m->o.recompute) memcpy(m->x_saved + l * N * D, m->x_res, (size_t)(N * D) * sizeof(float));
        if ((rc = layer_fwd(m, (int)l, &m->A[m->o.recompute ? 0 : l], m->x_res, b, err))) return rc;
    }
    memcpy(m->xL, m->x_res, (size_t)(N * D) * sizeof(float));
    tp_rmsnorm_fwd(m->xf, m->rstdf, m->xL, m->norm_final, N, D, (float)c->rms_eps);
    /* LM head + cross-entropy, a block of tokens at a time so [N, V] logits
     * never exist at once; the head's backward is fused in */
    int64_t blk = (16 << 20) / V;
    if (blk < 1) blk = 1;
    if (blk > N) blk = N;
    double total = 0;
    int64_t cnt_all = 0;
    float scale = backward && normalizer > 0 ? (float)(1.0 / normalizer) : 0.0f;
    for (int64_t t0 = 0; t0 < N; t0 += blk) {
        int64_t nb = t0 + blk <= N ? blk : N - t0;
        float *lg = m->logit_blk;
        if ((rc = tp_mm_xwt(m->mm, m->xf + t0 * D, nb, &m->head, lg, 0, err))) return rc;
        if (logits_out) memcpy(logits_out + t0 * V, lg, (size_t)(nb * V) * sizeof(float));
        int64_t cnt;
        total += tp_cross_entropy(backward ? lg : NULL, lg, b->labels + t0, nb, V, scale, &cnt);
        cnt_all += cnt;
        if (!backward) continue;
        if (m->dhead) tp_sgemm(1, 0, V, D, nb, 1.0f, lg, V, m->xf + t0 * D, D, 1.0f, m->dhead, D);
        if ((rc = tp_mm_dyw(m->mm, lg, nb, &m->head, m->d_tmp + t0 * D, 0, err))) return rc;
    }
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
