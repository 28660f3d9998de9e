/* decoder_build.c - building a decoder: options and presets, the parameter
 * table (one fp32 buffer of trainables), binding frozen weights from the
 * read-only mmap, and the activation arena. The math is in decoder.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/decoder_impl.h"
#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "kernels/ops.h"
#include "util/platform.h"
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

void tp_decoder_set_grad_hook(tp_decoder *m, tp_grad_hook hook, void *ctx) {
    m->hook = hook;
    m->hook_ctx = ctx;
}
const tp_decoder_opts *tp_decoder_options(const tp_decoder *m) { return &m->o; }
const tp_model_config *tp_decoder_config(const tp_decoder *m) { return &m->cfg; }

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
    if (o->inference) m->o.lora.dropout = 0;
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
        for (int64_t i = 0; i < m->nsets; i++) free(m->A[i].states);
    free(m->arena);
    free(m->A);
    free(m->inv_freq);
    free(m);
}

/* ---- activation memory ------------------------------------------------- */

int64_t tp_decoder_head_block(int64_t V, int64_t N) { return tp_head_block(V, N); }

uint64_t tp_decoder_arena_floats(const tp_model_config *c, int64_t N, int64_t T, int64_t lora_r, int liza,
                                 int recompute, int inference, uint64_t *saved) {
    int64_t D = c->hidden, F = c->ffn, qd = c->heads * c->head_dim, kvd = c->kv_heads * c->head_dim;
    int64_t L = c->layers, r = lora_r, H = c->heads, Hkv = c->kv_heads;
    /* inference keeps nothing for backward: one set, no gradient buffers */
    int64_t inf = inference != 0, gr = !inf, nsets = recompute || inf ? 1 : L, lz = liza != 0;
    int64_t maxin = F > D ? F : D;
    if (maxin < qd) maxin = qd;
    int64_t blk = tp_head_block(c->vocab, N);
    /* per set: the base layer, plus LiZA's feature maps, gates, output and
     * the stacked o_proj input/output */
    uint64_t per_set = (uint64_t)(N * (4 * D + 2 * qd + 2 * kvd + 2 * qd + kvd + 3 * F) + 2 * N + H * N +
                                  TP_NMOD * N * r + N * r + N * qd) +
                       (uint64_t)(lz * N * (2 * qd + 3 * kvd + Hkv + 1 + 2 * D + 1));
    uint64_t keep = per_set * (uint64_t)nsets + (uint64_t)(recompute && !inf ? L * N * D : 0);
    if (saved) *saved = keep;
    return keep + (uint64_t)(N * (4 * D + 1)) + /* x_res, xf, xL, rstdf, tmp_o (2N) */ (uint64_t)(N * D) +
           (uint64_t)(gr * N * (2 * D + 3 * qd + 2 * kvd + 3 * F + 2 * r + 2 * maxin + 2 * D)) +
           (uint64_t)(gr * lz * N * (2 * qd + 3 * kvd + Hkv + 1)) + (uint64_t)(blk * c->vocab) +
           (uint64_t)(T * c->head_dim) + 64 * 64;
}

int tp_decoder_ensure_acts(tp_decoder *m, int64_t N, int64_t T, tp_err *err) {
    if (N <= m->cap_n && T <= m->cap_T) return TP_OK;
    const int64_t n_tok = N;
    const tp_model_config *c = &m->cfg;
    int64_t D = c->hidden, F = c->ffn, qd = c->heads * c->head_dim, kvd = c->kv_heads * c->head_dim;
    int64_t L = c->layers, r = m->o.trainable == TP_TRAIN_LORA ? m->o.lora.r : 0, H = c->heads, Hkv = c->kv_heads;
    int64_t inf = m->o.inference, gr = !inf, nsets = m->o.recompute || inf ? 1 : L, lz = m->o.liza.enabled;
    int64_t maxin = F > D ? F : D;
    if (maxin < qd) maxin = qd;
    int64_t blk = tp_head_block(c->vocab, N);
    /* the layout below takes exactly this (checked after it); `tptt inspect`
     * predicts memory from the same function */
    size_t total = (size_t)tp_decoder_arena_floats(c, N, T, r, (int)lz, m->o.recompute, (int)inf, NULL);
    if (m->A)
        for (int64_t i = 0; i < m->nsets; i++) free(m->A[i].states);
    free(m->arena);
    free(m->A);
    m->arena = malloc(total * sizeof(float));
    tp_advise_huge(m->arena, total * sizeof(float));
    m->A = calloc((size_t)nsets, sizeof *m->A);
    m->nsets = m->A ? nsets : 0;
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
    if (m->o.recompute && !inf) TAKE(m->x_saved, L * N * D);
    TAKE(m->x_res, N * D); TAKE(m->xf, N * D); TAKE(m->xL, N * D); TAKE(m->rstdf, N); TAKE(m->tmp_o, 2 * N * D);
    if (!gr) N = 0; /* no gradient buffers (their pointers are never used) */
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
    m->cap_n = n_tok;
    m->cap_T = T;
    return TP_OK;
}
