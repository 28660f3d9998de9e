#include "model/hf_config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/jsonint.h"

static const char *const arch_class[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
static const char *const arch_type[] = {"llama", "mistral", "qwen2"};

const char *tp_arch_class(tp_arch a) { return arch_class[a]; }
const char *tp_arch_model_type(tp_arch a) { return arch_type[a]; }

int tp_arch_parse(const char *s, tp_arch *out) {
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, arch_type[i])) { *out = (tp_arch)i; return 0; }
    return -1;
}

/* Field readers: absent (or null when null_ok) keeps the default already in
 * *out; a present field of the wrong type is an error naming it. */
static int get_int(const char *label, const cJSON *root, const char *key, int required, int64_t *out,
                   tp_err *err) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!j || cJSON_IsNull(j)) {
        if (required) return tp_fail(err, TP_EFORMAT, "%s: required field \"%s\" is missing", label, key);
        return TP_OK;
    }
    if (!tp_json_int(j, -(INT64_C(1) << 53), INT64_C(1) << 53, out))
        return tp_fail(err, TP_EFORMAT, "%s: field \"%s\" must be an integer", label, key);
    return TP_OK;
}

static int get_num(const char *label, const cJSON *root, const char *key, double *out, tp_err *err) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!j || cJSON_IsNull(j)) return TP_OK;
    if (!cJSON_IsNumber(j)) return tp_fail(err, TP_EFORMAT, "%s: field \"%s\" must be a number", label, key);
    *out = j->valuedouble;
    return TP_OK;
}

static int get_bool(const char *label, const cJSON *root, const char *key, int *out, tp_err *err) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!j || cJSON_IsNull(j)) return TP_OK;
    if (!cJSON_IsBool(j)) return tp_fail(err, TP_EFORMAT, "%s: field \"%s\" must be true or false", label, key);
    *out = cJSON_IsTrue(j);
    return TP_OK;
}

/* bos/eos ids may be an integer or a list of integers (Llama 3.1). */
static int get_token_id(const char *label, const cJSON *root, const char *key, int64_t *out, tp_err *err) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    if (j && cJSON_IsArray(j)) j = cJSON_GetArrayItem(j, 0);
    if (!j || cJSON_IsNull(j)) return TP_OK;
    if (!tp_json_int(j, -(INT64_C(1) << 53), INT64_C(1) << 53, out))
        return tp_fail(err, TP_EFORMAT, "%s: field \"%s\" must be an integer or a list of integers", label, key);
    return TP_OK;
}

static int parse_rope_scaling(const char *label, const cJSON *root, tp_model_config *c, tp_err *err) {
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (!rs || cJSON_IsNull(rs)) return TP_OK;
    if (!cJSON_IsObject(rs)) return tp_fail(err, TP_EFORMAT, "%s: field \"rope_scaling\" must be an object or null", label);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!t) t = cJSON_GetObjectItemCaseSensitive(rs, "type");
    if (!cJSON_IsString(t))
        return tp_fail(err, TP_EFORMAT, "%s: field \"rope_scaling\" needs a string \"rope_type\" (or \"type\")", label);
    if (!strcmp(t->valuestring, "default")) return TP_OK;
    if (strcmp(t->valuestring, "llama3") != 0)
        return tp_fail(err, TP_EUNSUP, "%s: rope_scaling type \"%s\" is not supported (only \"llama3\" is)", label,
                       t->valuestring);
    static const char *const req[] = {"factor", "low_freq_factor", "high_freq_factor",
                                      "original_max_position_embeddings"};
    double v[4];
    for (int i = 0; i < 4; i++) {
        const cJSON *j = cJSON_GetObjectItemCaseSensitive(rs, req[i]);
        if (!cJSON_IsNumber(j))
            return tp_fail(err, TP_EFORMAT, "%s: rope_scaling (llama3) needs a numeric \"%s\"", label, req[i]);
        v[i] = j->valuedouble;
    }
    if (!(v[0] > 0) || !(v[1] > 0) || !(v[2] > v[1]) || !(v[3] >= 1 && v[3] <= 9.0e15))
        return tp_fail(err, TP_EFORMAT,
                       "%s: rope_scaling (llama3) needs factor > 0, original_max_position_embeddings > 0 and "
                       "high_freq_factor > low_freq_factor > 0",
                       label);
    c->rope_llama3 = 1;
    c->rope_factor = v[0];
    c->rope_low_freq_factor = v[1];
    c->rope_high_freq_factor = v[2];
    c->rope_original_max_pos = (int64_t)v[3];
    return TP_OK;
}

int tp_model_config_check(const char *label, const tp_model_config *c, tp_err *err) {
    struct { const char *name; int64_t v; } pos[] = {
        {"hidden_size", c->hidden}, {"intermediate_size", c->ffn}, {"num_hidden_layers", c->layers},
        {"num_attention_heads", c->heads}, {"num_key_value_heads", c->kv_heads}, {"head_dim", c->head_dim},
        {"vocab_size", c->vocab}};
    for (size_t i = 0; i < sizeof pos / sizeof *pos; i++)
        if (pos[i].v <= 0 || pos[i].v > (1ll << 31))
            return tp_fail(err, TP_EFORMAT, "%s: field \"%s\" must be a positive integer below 2^31, got %lld",
                           label, pos[i].name, (long long)pos[i].v);
    /* sizes that drive allocations before any tensor is looked at: bounded
     * far above every real model, so a typo cannot ask for terabytes */
    struct { const char *name; int64_t v, max; } lim[] = {
        {"num_hidden_layers", c->layers, 1024},      {"hidden_size", c->hidden, 1 << 18},
        {"intermediate_size", c->ffn, 1 << 20},      {"num_attention_heads", c->heads, 1 << 12},
        {"num_key_value_heads", c->kv_heads, 1 << 12}, {"head_dim", c->head_dim, 1 << 12},
        {"vocab_size", c->vocab, 1 << 24}};
    for (size_t i = 0; i < sizeof lim / sizeof *lim; i++)
        if (lim[i].v > lim[i].max)
            return tp_fail(err, TP_EFORMAT, "%s: field \"%s\" is %lld, more than the %lld this program accepts", label,
                           lim[i].name, (long long)lim[i].v, (long long)lim[i].max);
    if (c->heads % c->kv_heads)
        return tp_fail(err, TP_EFORMAT, "%s: num_attention_heads (%lld) must be a multiple of num_key_value_heads (%lld)",
                       label, (long long)c->heads, (long long)c->kv_heads);
    if (c->head_dim % 2)
        return tp_fail(err, TP_EFORMAT, "%s: head_dim (%lld) must be even for rotary embeddings", label,
                       (long long)c->head_dim);
    if (!(c->rms_eps > 0)) return tp_fail(err, TP_EFORMAT, "%s: field \"rms_norm_eps\" must be positive", label);
    if (!(c->rope_theta > 0)) return tp_fail(err, TP_EFORMAT, "%s: field \"rope_theta\" must be positive", label);
    if (c->sliding_window < 0)
        return tp_fail(err, TP_EFORMAT, "%s: field \"sliding_window\" must be positive or null", label);
    return TP_OK;
}

/* First key that appears twice in one object (at any depth), or NULL. */
static const char *dup_key(const cJSON *j, const cJSON *parent) {
    (void)parent;
    for (const cJSON *a = j ? j->child : NULL; a; a = a->next) {
        if (cJSON_IsObject(j))
            for (const cJSON *b = a->next; b; b = b->next)
                if (a->string && b->string && !strcmp(a->string, b->string)) return a->string;
        const char *d = dup_key(a, j);
        if (d) return d;
    }
    return NULL;
}

int tp_model_config_parse(const char *label, const char *json, size_t len, tp_model_config *out, tp_err *err) {
    memset(out, 0, sizeof *out);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root) {
        return tp_fail(err, TP_EFORMAT, "%s: not valid JSON (near byte %zu)", label,
                       end ? (size_t)(end - json) : (size_t)0);
    }
    int rc = TP_OK;
    tp_model_config *c = out;
    if (!cJSON_IsObject(root)) { rc = tp_fail(err, TP_EFORMAT, "%s: not a JSON object", label); goto done; }
    const char *dk = dup_key(root, NULL);
    if (dk) {
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"%s\" appears twice (Hugging Face would silently use the last one; "
                     "keep one)", label, dk);
        goto done;
    }
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const cJSON *a0 = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
    if (!cJSON_IsString(a0)) {
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"architectures\" must be a non-empty list of class names", label);
        goto done;
    }
    int found = 0;
    for (int i = 0; i < 3; i++)
        if (!strcmp(a0->valuestring, arch_class[i])) { c->arch = (tp_arch)i; found = 1; }
    if (!found) {
        rc = tp_fail(err, TP_EUNSUP,
                     "%s: architecture \"%s\" is not supported (expected LlamaForCausalLM, MistralForCausalLM or "
                     "Qwen2ForCausalLM)",
                     label, a0->valuestring);
        goto done;
    }
    /* transformers' defaults per architecture, for fields that may be absent */
    c->rms_eps = 1e-6;
    c->rope_theta = 10000.0;
    c->bos_id = c->eos_id = -1;
    c->max_pos = c->arch == TP_ARCH_LLAMA ? 2048 : c->arch == TP_ARCH_MISTRAL ? 4096 * 32 : 32768;
    c->sliding_window = c->arch == TP_ARCH_MISTRAL ? 4096 : 0;
    c->qkv_bias = c->arch == TP_ARCH_QWEN2;
    if ((rc = get_int(label, root, "hidden_size", 1, &c->hidden, err)) ||
        (rc = get_int(label, root, "intermediate_size", 1, &c->ffn, err)) ||
        (rc = get_int(label, root, "num_hidden_layers", 1, &c->layers, err)) ||
        (rc = get_int(label, root, "num_attention_heads", 1, &c->heads, err)) ||
        (rc = get_int(label, root, "vocab_size", 1, &c->vocab, err)))
        goto done;
    c->kv_heads = c->heads;
    c->head_dim = c->heads > 0 ? c->hidden / c->heads : 0;
    if ((rc = get_int(label, root, "num_key_value_heads", 0, &c->kv_heads, err)) ||
        (rc = get_int(label, root, "head_dim", 0, &c->head_dim, err)) ||
        (rc = get_int(label, root, "max_position_embeddings", 0, &c->max_pos, err)) ||
        (rc = get_num(label, root, "rms_norm_eps", &c->rms_eps, err)) ||
        (rc = get_num(label, root, "rope_theta", &c->rope_theta, err)) ||
        (rc = get_bool(label, root, "tie_word_embeddings", &c->tie_embeddings, err)) ||
        (rc = get_token_id(label, root, "bos_token_id", &c->bos_id, err)) ||
        (rc = get_token_id(label, root, "eos_token_id", &c->eos_id, err)) ||
        (rc = parse_rope_scaling(label, root, c, err)))
        goto done;
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (act && !cJSON_IsNull(act) && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0)) {
        rc = tp_fail(err, TP_EUNSUP, "%s: hidden_act \"%s\" is not supported (only \"silu\" is)", label,
                     cJSON_IsString(act) ? act->valuestring : "(not a string)");
        goto done;
    }
    if (c->arch == TP_ARCH_LLAMA) {
        int ab = 0, mb = 0;
        if ((rc = get_bool(label, root, "attention_bias", &ab, err)) ||
            (rc = get_bool(label, root, "mlp_bias", &mb, err)))
            goto done;
        if (ab || mb) {
            rc = tp_fail(err, TP_EUNSUP, "%s: %s=true is not supported for LlamaForCausalLM", label,
                         ab ? "attention_bias" : "mlp_bias");
            goto done;
        }
    }
    if (c->arch == TP_ARCH_MISTRAL) {
        const cJSON *sw = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
        if (sw && cJSON_IsNull(sw)) c->sliding_window = 0;
        else if ((rc = get_int(label, root, "sliding_window", 0, &c->sliding_window, err))) goto done;
        else if (sw && c->sliding_window <= 0) {
            rc = tp_fail(err, TP_EFORMAT, "%s: field \"sliding_window\" is %lld, expected a positive window or null "
                         "(no window)", label, (long long)c->sliding_window);
            goto done;
        }
    }
    if (c->arch == TP_ARCH_QWEN2) {
        int usw = 0;
        if ((rc = get_bool(label, root, "use_sliding_window", &usw, err))) goto done;
        if (usw) {
            rc = tp_fail(err, TP_EUNSUP, "%s: use_sliding_window=true is not supported for Qwen2ForCausalLM", label);
            goto done;
        }
    }
    const cJSON *td = cJSON_GetObjectItemCaseSensitive(root, "torch_dtype");
    if (cJSON_IsString(td)) snprintf(c->torch_dtype, sizeof c->torch_dtype, "%s", td->valuestring);
    rc = tp_model_config_check(label, c, err);
done:
    cJSON_Delete(root);
    return rc;
}

int tp_model_config_load(const char *dir, tp_model_config *out, tp_err *err) {
    char *path = tp_path_join(dir, "config.json", err);
    if (!path) return TP_ENOMEM;
    char *text;
    size_t len;
    int rc = tp_read_file(path, 16u << 20, &text, &len, err);
    if (rc == TP_OK) {
        rc = tp_model_config_parse(path, text, len, out, err);
        free(text);
    }
    free(path);
    return rc;
}

void tp_model_config_to_json(const tp_model_config *c, tp_strbuf *s) {
    tp_strbuf_printf(s, "{\n  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n", tp_arch_class(c->arch),
                     tp_arch_model_type(c->arch));
    tp_strbuf_printf(s,
                     "  \"hidden_size\": %lld,\n  \"intermediate_size\": %lld,\n  \"num_hidden_layers\": %lld,\n"
                     "  \"num_attention_heads\": %lld,\n  \"num_key_value_heads\": %lld,\n  \"head_dim\": %lld,\n"
                     "  \"vocab_size\": %lld,\n  \"max_position_embeddings\": %lld,\n",
                     (long long)c->hidden, (long long)c->ffn, (long long)c->layers, (long long)c->heads,
                     (long long)c->kv_heads, (long long)c->head_dim, (long long)c->vocab, (long long)c->max_pos);
    tp_strbuf_printf(s, "  \"rms_norm_eps\": %.17g,\n  \"rope_theta\": %.17g,\n  \"hidden_act\": \"silu\",\n",
                     c->rms_eps, c->rope_theta);
    if (c->rope_llama3)
        tp_strbuf_printf(s,
                         "  \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": %.17g, \"low_freq_factor\": "
                         "%.17g, \"high_freq_factor\": %.17g, \"original_max_position_embeddings\": %lld},\n",
                         c->rope_factor, c->rope_low_freq_factor, c->rope_high_freq_factor,
                         (long long)c->rope_original_max_pos);
    else
        tp_strbuf_puts(s, "  \"rope_scaling\": null,\n");
    if (c->arch == TP_ARCH_MISTRAL) {
        if (c->sliding_window) tp_strbuf_printf(s, "  \"sliding_window\": %lld,\n", (long long)c->sliding_window);
        else tp_strbuf_puts(s, "  \"sliding_window\": null,\n");
    }
    if (c->arch == TP_ARCH_QWEN2) tp_strbuf_puts(s, "  \"use_sliding_window\": false,\n");
    if (c->arch == TP_ARCH_LLAMA) tp_strbuf_puts(s, "  \"attention_bias\": false,\n  \"mlp_bias\": false,\n");
    if (c->bos_id >= 0) tp_strbuf_printf(s, "  \"bos_token_id\": %lld,\n", (long long)c->bos_id);
    if (c->eos_id >= 0) tp_strbuf_printf(s, "  \"eos_token_id\": %lld,\n", (long long)c->eos_id);
    if (c->torch_dtype[0]) tp_strbuf_printf(s, "  \"torch_dtype\": \"%s\",\n", c->torch_dtype);
    tp_strbuf_printf(s, "  \"tie_word_embeddings\": %s\n}\n", c->tie_embeddings ? "true" : "false");
}

size_t tp_model_weight_count(const tp_model_config *c) {
    size_t per_layer = 9 + (c->qkv_bias ? 3 : 0);
    return 2 + (size_t)c->layers * per_layer + (c->tie_embeddings ? 0 : 1);
}

static tp_weight_desc *put(tp_weight_desc *w, tp_weight_kind kind, int layer, int64_t d0, int64_t d1,
                           const char *fmt) {
    memset(w, 0, sizeof *w);
    w->kind = kind;
    w->layer = layer;
    w->ndim = d1 ? 2 : 1;
    w->shape[0] = d0;
    w->shape[1] = d1;
    if (layer >= 0) snprintf(w->name, sizeof w->name, "model.layers.%d.%s", layer, fmt);
    else snprintf(w->name, sizeof w->name, "%s", fmt);
    return w + 1;
}

void tp_model_weights(const tp_model_config *c, tp_weight_desc *w) {
    int64_t D = c->hidden, F = c->ffn, qd = c->heads * c->head_dim, kvd = c->kv_heads * c->head_dim;
    w = put(w, TP_W_EMBED, -1, c->vocab, D, "model.embed_tokens.weight");
    for (int l = 0; l < (int)c->layers; l++) {
        w = put(w, TP_W_NORM_IN, l, D, 0, "input_layernorm.weight");
        w = put(w, TP_W_Q, l, qd, D, "self_attn.q_proj.weight");
        w = put(w, TP_W_K, l, kvd, D, "self_attn.k_proj.weight");
        w = put(w, TP_W_V, l, kvd, D, "self_attn.v_proj.weight");
        if (c->qkv_bias) {
            w = put(w, TP_W_Q_BIAS, l, qd, 0, "self_attn.q_proj.bias");
            w = put(w, TP_W_K_BIAS, l, kvd, 0, "self_attn.k_proj.bias");
            w = put(w, TP_W_V_BIAS, l, kvd, 0, "self_attn.v_proj.bias");
        }
        w = put(w, TP_W_O, l, D, qd, "self_attn.o_proj.weight");
        w = put(w, TP_W_NORM_POST, l, D, 0, "post_attention_layernorm.weight");
        w = put(w, TP_W_GATE, l, F, D, "mlp.gate_proj.weight");
        w = put(w, TP_W_UP, l, F, D, "mlp.up_proj.weight");
        w = put(w, TP_W_DOWN, l, D, F, "mlp.down_proj.weight");
    }
    w = put(w, TP_W_NORM_FINAL, -1, D, 0, "model.norm.weight");
    if (!c->tie_embeddings) put(w, TP_W_LM_HEAD, -1, c->vocab, D, "lm_head.weight");
}

uint64_t tp_model_param_count(const tp_model_config *c) {
    uint64_t D = (uint64_t)c->hidden, F = (uint64_t)c->ffn, V = (uint64_t)c->vocab, L = (uint64_t)c->layers;
    uint64_t qd = (uint64_t)(c->heads * c->head_dim), kvd = (uint64_t)(c->kv_heads * c->head_dim);
    uint64_t layer = 2 * D + qd * D + 2 * kvd * D + D * qd + 3 * D * F + (c->qkv_bias ? qd + 2 * kvd : 0);
    return V * D + L * layer + D + (c->tie_embeddings ? 0 : V * D);
}
