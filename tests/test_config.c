/* test_config.c - config.json parsing (LIZA.md section 1): real configs of
 * public models against their published parameter counts, transformers'
 * defaults for absent fields, and clear errors for what we do not support. */
#include <stdlib.h>
#include <string.h>

#include "model/hf_config.h"
#include "test.h"

static int parse(const char *json, tp_model_config *c, tp_err *err) {
    return tp_model_config_parse("cfg.json", json, strlen(json), c, err);
}

static void fixture(const char *name, tp_model_config *c) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/tests/fixtures/configs", getenv("TPTT_SOURCE_DIR") ? getenv("TPTT_SOURCE_DIR") : TPTT_SOURCE_DIR_DEFAULT);
    /* tp_model_config_load wants <dir>/config.json: read the fixture directly */
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *text;
    size_t len;
    tp_err err = {0};
    int rc = tp_read_file(path, 1 << 20, &text, &len, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    if (rc) { memset(c, 0, sizeof *c); return; }
    rc = tp_model_config_parse(path, text, len, c, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    free(text);
}

static void test_real_models(void) {
    tp_model_config c;
    fixture("mistral-7b-v0.3.json", &c);
    CHECK(c.arch == TP_ARCH_MISTRAL);
    CHECK(c.hidden == 4096 && c.ffn == 14336 && c.layers == 32 && c.heads == 32 && c.kv_heads == 8);
    CHECK(c.head_dim == 128 && c.vocab == 32768 && c.sliding_window == 0 && !c.tie_embeddings && !c.qkv_bias);
    CHECK(c.rope_theta == 1e6 && c.rms_eps == 1e-5 && !c.rope_llama3);
    CHECK_MSG(tp_model_param_count(&c) == 7248023552ull, "%llu", (unsigned long long)tp_model_param_count(&c));

    fixture("llama-3.2-1b.json", &c);
    CHECK(c.arch == TP_ARCH_LLAMA && c.hidden == 2048 && c.ffn == 8192 && c.layers == 16);
    CHECK(c.heads == 32 && c.kv_heads == 8 && c.head_dim == 64 && c.vocab == 128256 && c.tie_embeddings);
    CHECK(c.rope_llama3 && c.rope_factor == 32 && c.rope_low_freq_factor == 1 && c.rope_high_freq_factor == 4);
    CHECK(c.rope_original_max_pos == 8192 && c.rope_theta == 500000.0 && c.bos_id == 128000);
    CHECK_MSG(tp_model_param_count(&c) == 1235814400ull, "%llu", (unsigned long long)tp_model_param_count(&c));

    fixture("qwen2.5-0.5b.json", &c);
    CHECK(c.arch == TP_ARCH_QWEN2 && c.hidden == 896 && c.ffn == 4864 && c.layers == 24 && c.heads == 14);
    CHECK(c.kv_heads == 2 && c.head_dim == 64 && c.vocab == 151936 && c.tie_embeddings && c.qkv_bias);
    CHECK(c.sliding_window == 0); /* ignored unless use_sliding_window */
    CHECK_MSG(tp_model_param_count(&c) == 494032768ull, "%llu", (unsigned long long)tp_model_param_count(&c));
}

#define BASE "\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100"

static void test_defaults(void) {
    tp_model_config c;
    tp_err err = {0};
    CHECK(parse("{\"architectures\":[\"LlamaForCausalLM\"]," BASE "}", &c, &err) == TP_OK);
    CHECK(c.kv_heads == 4 && c.head_dim == 16 && c.rms_eps == 1e-6 && c.rope_theta == 10000.0);
    CHECK(c.sliding_window == 0 && !c.tie_embeddings && !c.qkv_bias && c.max_pos == 2048 && !c.rope_llama3);
    CHECK(c.bos_id == -1 && c.eos_id == -1);

    /* Mistral: absent sliding_window is 4096 (MistralConfig default), null is none */
    CHECK(parse("{\"architectures\":[\"MistralForCausalLM\"]," BASE "}", &c, &err) == TP_OK);
    CHECK(c.sliding_window == 4096);
    CHECK(parse("{\"architectures\":[\"MistralForCausalLM\"],\"sliding_window\":null," BASE "}", &c, &err) == TP_OK);
    CHECK(c.sliding_window == 0);
    CHECK(parse("{\"architectures\":[\"MistralForCausalLM\"],\"sliding_window\":7,\"head_dim\":8," BASE "}", &c, &err) == TP_OK);
    CHECK(c.sliding_window == 7 && c.head_dim == 8);
    CHECK(parse("{\"architectures\":[\"MistralForCausalLM\"],\"head_dim\":null," BASE "}", &c, &err) == TP_OK);
    CHECK(c.head_dim == 16);

    /* Qwen2 always has q/k/v bias; eos may be a list */
    CHECK(parse("{\"architectures\":[\"Qwen2ForCausalLM\"],\"eos_token_id\":[7,8],\"num_key_value_heads\":2," BASE "}", &c, &err) == TP_OK);
    CHECK(c.qkv_bias && c.kv_heads == 2 && c.eos_id == 7);
    /* rope_scaling "default" means none */
    CHECK(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"rope_scaling\":{\"rope_type\":\"default\"}," BASE "}", &c, &err) == TP_OK);
    CHECK(!c.rope_llama3);
    /* old-style key "type" */
    CHECK(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"rope_scaling\":{\"type\":\"llama3\",\"factor\":8,"
                "\"low_freq_factor\":1,\"high_freq_factor\":4,\"original_max_position_embeddings\":8192}," BASE "}", &c, &err) == TP_OK);
    CHECK(c.rope_llama3 && c.rope_factor == 8);
}

static void expect_error(const char *json, int code, const char *needle) {
    tp_model_config c;
    tp_err err = {0};
    int rc = parse(json, &c, &err);
    CHECK_MSG(rc == code, "rc %d, want %d for %s", rc, code, json);
    CHECK_MSG(strstr(err.msg, needle) != NULL, "message '%s' lacks '%s'", err.msg, needle);
    CHECK_MSG(strstr(err.msg, "cfg.json") != NULL, "message '%s' lacks the file name", err.msg);
}

static void test_errors(void) {
    expect_error("{\"architectures\":[\"GPT2LMHeadModel\"]," BASE "}", TP_EUNSUP, "GPT2LMHeadModel");
    expect_error("{" BASE "}", TP_EFORMAT, "architectures");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"intermediate_size\":96,\"num_hidden_layers\":2,"
                 "\"num_attention_heads\":4,\"vocab_size\":100}", TP_EFORMAT, "hidden_size");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_act\":\"gelu\"," BASE "}", TP_EUNSUP, "gelu");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}," BASE "}",
                 TP_EUNSUP, "yarn");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":4}," BASE "}",
                 TP_EFORMAT, "low_freq_factor");
    expect_error("{\"architectures\":[\"Qwen2ForCausalLM\"],\"use_sliding_window\":true," BASE "}", TP_EUNSUP,
                 "use_sliding_window");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":true," BASE "}", TP_EUNSUP, "attention_bias");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"num_key_value_heads\":3," BASE "}", TP_EFORMAT,
                 "num_key_value_heads");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":\"64\",\"intermediate_size\":96,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100}", TP_EFORMAT, "hidden_size");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"head_dim\":15," BASE "}", TP_EFORMAT, "head_dim");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"rms_norm_eps\":0," BASE "}", TP_EFORMAT, "rms_norm_eps");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":-5,\"hidden_size\":64,\"intermediate_size\":96,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4}", TP_EFORMAT, "vocab_size");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"]," BASE, TP_EFORMAT, "JSON");
    expect_error("[1,2]", TP_EFORMAT, "object");
    /* found by fuzz_config: huge numbers must not be cast to int64 (UB) */
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,"
                 "\"low_freq_factor\":1,\"high_freq_factor\":4,\"original_max_position_embeddings\":1e300}," BASE "}",
                 TP_EFORMAT, "original_max_position_embeddings");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"bos_token_id\":1e300," BASE "}", TP_EFORMAT, "bos_token_id");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"num_hidden_layers\":1e300,\"hidden_size\":64,"
                 "\"intermediate_size\":96,\"num_attention_heads\":4,\"vocab_size\":100}", TP_EFORMAT, "num_hidden_layers");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"tie_word_embeddings\":1," BASE "}", TP_EFORMAT,
                 "tie_word_embeddings");
}

/* config.json written for a config parses back to the same config */
static void test_json_roundtrip(void) {
    tp_model_config c = {0}, d;
    c.arch = TP_ARCH_MISTRAL;
    c.hidden = 48; c.ffn = 80; c.layers = 3; c.heads = 6; c.kv_heads = 2; c.head_dim = 10; c.vocab = 77;
    c.max_pos = 512; c.rms_eps = 1e-5; c.rope_theta = 12345.5; c.sliding_window = 9; c.tie_embeddings = 1;
    c.bos_id = 1; c.eos_id = 2;
    c.rope_llama3 = 1; c.rope_factor = 8; c.rope_low_freq_factor = 1; c.rope_high_freq_factor = 4;
    c.rope_original_max_pos = 64;
    for (int a = 0; a < 3; a++) {
        c.arch = (tp_arch)a;
        c.qkv_bias = a == TP_ARCH_QWEN2;
        c.sliding_window = a == TP_ARCH_MISTRAL ? 9 : 0;
        tp_strbuf s;
        tp_strbuf_init(&s);
        tp_model_config_to_json(&c, &s);
        tp_err err = {0};
        CHECK_MSG(tp_model_config_parse("rt", s.buf, s.len, &d, &err) == TP_OK, "%s", err.msg);
        CHECK(d.arch == c.arch && d.hidden == c.hidden && d.ffn == c.ffn && d.layers == c.layers);
        CHECK(d.heads == c.heads && d.kv_heads == c.kv_heads && d.head_dim == c.head_dim && d.vocab == c.vocab);
        CHECK(d.rms_eps == c.rms_eps && d.rope_theta == c.rope_theta && d.sliding_window == c.sliding_window);
        CHECK(d.tie_embeddings == c.tie_embeddings && d.qkv_bias == c.qkv_bias && d.rope_llama3 == 1);
        CHECK(d.rope_factor == 8 && d.rope_original_max_pos == 64 && d.bos_id == 1 && d.eos_id == 2);
        tp_strbuf_free(&s);
    }
}

/* The weight list agrees with the parameter count and HF's names/shapes. */
static void test_weight_list(void) {
    tp_model_config c;
    tp_err err = {0};
    CHECK(parse("{\"architectures\":[\"Qwen2ForCausalLM\"],\"num_key_value_heads\":2,\"head_dim\":8," BASE "}", &c, &err) == TP_OK);
    size_t n = tp_model_weight_count(&c);
    CHECK(n == 2 + 2 * 12 + 1);
    tp_weight_desc *w = calloc(n, sizeof *w);
    tp_model_weights(&c, w);
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) total += (uint64_t)w[i].shape[0] * (uint64_t)(w[i].ndim == 2 ? w[i].shape[1] : 1);
    CHECK(total == tp_model_param_count(&c));
    CHECK(!strcmp(w[0].name, "model.embed_tokens.weight") && w[0].shape[0] == 100 && w[0].shape[1] == 64);
    CHECK(!strcmp(w[2].name, "model.layers.0.self_attn.q_proj.weight") && w[2].shape[0] == 32 && w[2].shape[1] == 64);
    CHECK(!strcmp(w[3].name, "model.layers.0.self_attn.k_proj.weight") && w[3].shape[0] == 16);
    CHECK(!strcmp(w[5].name, "model.layers.0.self_attn.q_proj.bias") && w[5].ndim == 1 && w[5].shape[0] == 32);
    CHECK(!strcmp(w[8].name, "model.layers.0.self_attn.o_proj.weight") && w[8].shape[0] == 64 && w[8].shape[1] == 32);
    CHECK(!strcmp(w[12].name, "model.layers.0.mlp.down_proj.weight") && w[12].shape[0] == 64 && w[12].shape[1] == 96);
    CHECK(!strcmp(w[n - 1].name, "lm_head.weight") && w[n - 1].kind == TP_W_LM_HEAD);
    CHECK(!strcmp(w[n - 2].name, "model.norm.weight"));
    free(w);
    c.tie_embeddings = 1;
    CHECK(tp_model_weight_count(&c) == n - 1);
}

int main(void) {
    test_real_models();
    test_defaults();
    test_errors();
    test_json_roundtrip();
    test_weight_list();
    return tp_test_report("test_config");
}
