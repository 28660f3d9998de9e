/* test_infer.c - the incremental forward (infer/cache.h) against the
 * full-sequence forward of training (tp_decoder_step): for every LiZA preset,
 * order 3 with each trick, linear: false, learnable scalar and vector μ,
 * cross gate, base_scale_attn, pure-linear, sliding window, GQA and each
 * architecture, a prompt is prefilled in blocks that end mid-chunk, then the
 * rest is decoded token by token across several chunk boundaries; every
 * position's logits must equal the full forward's within 1e-5 relative.
 * Also: a pure-linear cache holds no KV cache and its memory does not grow
 * with the context; a sliding-window ring never grows past the window. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "infer/cache.h"
#include "infer/load.h"
#include "io/hf_model.h"
#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "test.h"
#include "test_model.h"
#include "util/rng.h"

static char dir[256];

static tp_hf_model *make_model(const char *name, tp_arch arch, int64_t heads, int64_t kv_heads, int64_t window) {
    tp_model_config c = {0};
    c.arch = arch;
    c.hidden = 32; c.ffn = 48; c.layers = 2; c.heads = heads; c.kv_heads = kv_heads; c.head_dim = 8; c.vocab = 41;
    c.rms_eps = 1e-5; c.rope_theta = 10000; c.tie_embeddings = arch == TP_ARCH_QWEN2; c.sliding_window = window;
    c.qkv_bias = arch == TP_ARCH_QWEN2; c.bos_id = c.eos_id = -1; c.max_pos = 128;
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return tp_test_model(path, &c, 0.3, 11);
}

#define T_ 37
#define P_ 10 /* prompt: ends inside the third chunk of 4 */

static double rel_err(const float *a, const float *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]);
        if (e > num) num = e;
        if (fabs((double)ref[i]) > den) den = fabs((double)ref[i]);
    }
    return den > 0 ? num / den : num;
}

/* Full forward logits vs prefill (blocks of `block`) + token-by-token decode. */
static void check_variant(const char *label, tp_hf_model *hf, tp_decoder_opts o, int64_t block) {
    tp_err err = {0};
    o.lora.init_random = 1;
    o.seed = 5;
    tp_decoder *full = NULL, *inf = NULL;
    int rc = tp_decoder_create(hf, &o, &full, &err);
    CHECK_MSG(rc == TP_OK, "%s: %s", label, err.msg);
    if (rc) return;
    float *theta = tp_decoder_theta(full);
    /* learnable μ: move the logits away from their init so each layer and
     * channel differs */
    for (size_t i = 0; i < tp_decoder_nparams(full); i++) {
        const tp_param *p = tp_decoder_param(full, i);
        if (!strstr(p->name, "mag_logit")) continue;
        for (size_t e = 0; e < p->numel; e++) theta[p->offset + e] += (float)(0.3 * sin((double)(e + 3 * i)));
    }
    int32_t ids[T_], labels[T_], ds[T_], pos[T_];
    tp_rng r;
    tp_rng_seed(&r, 9, 0);
    for (int t = 0; t < T_; t++) {
        ids[t] = (int32_t)(tp_rng_next(&r) % 41);
        labels[t] = -100;
        ds[t] = 0;
        pos[t] = t;
    }
    tp_batch b = {1, T_, ids, labels, ds, pos, NULL};
    float *ref = malloc((size_t)T_ * 41 * sizeof(float)), *got = malloc((size_t)T_ * 41 * sizeof(float));
    double ls;
    int64_t cnt;
    rc = tp_decoder_step(full, &b, 1.0, 0, ref, &ls, &cnt, &err);
    CHECK_MSG(rc == TP_OK, "%s: full forward: %s", label, err.msg);
    o.inference = 1;
    rc = rc ? rc : tp_decoder_create(hf, &o, &inf, &err);
    CHECK_MSG(rc == TP_OK, "%s: inference decoder: %s", label, err.msg);
    tp_infer_cache *c = NULL;
    if (rc == TP_OK) {
        memcpy(tp_decoder_theta(inf), theta, tp_decoder_numel(full) * sizeof(float));
        rc = tp_cache_create(inf, block, &c, &err);
        CHECK_MSG(rc == TP_OK, "%s: cache: %s", label, err.msg);
    }
    double worst = 0;
    for (int pass = 0; pass < 2 && rc == TP_OK; pass++) { /* the second pass reuses the cache after reset */
        tp_cache_reset(c);
        /* prefill: every prompt position's logits */
        rc = tp_cache_feed(c, ids, P_, got, NULL, &err);
        CHECK_MSG(rc == TP_OK, "%s: prefill: %s", label, err.msg);
        for (int t = 0; t < P_ && rc == TP_OK; t++) {
            double e = rel_err(got + t * 41, ref + t * 41, 41);
            if (e > worst) worst = e;
        }
        for (int t = P_; t < T_ && rc == TP_OK; t++) {
            rc = tp_cache_feed(c, ids + t, 1, NULL, got, &err);
            CHECK_MSG(rc == TP_OK, "%s: decode %d: %s", label, t, err.msg);
            double e = rel_err(got, ref + t * 41, 41);
            if (e > worst) worst = e;
        }
        CHECK(tp_cache_pos(c) == T_);
    }
    CHECK_MSG(worst <= 1e-5, "%s: decode logits differ from the full forward: max relative error %.3g", label, worst);
    if (getenv("TPTT_TEST_VERBOSE")) printf("%-40s max rel err %.2e\n", label, worst);
    tp_cache_destroy(c);
    tp_decoder_destroy(inf);
    tp_decoder_destroy(full);
    free(ref);
    free(got);
}

static tp_decoder_opts liza_opts(const char *preset) {
    tp_decoder_opts o;
    tp_decoder_opts_default(&o);
    o.liza.enabled = 1;
    tp_liza_preset(preset, &o.liza);
    o.liza.chunk = 4;
    o.mag.mu0 = 0.4;
    return o;
}

/* A pure-linear model keeps no KV cache: memory after 2000 tokens equals
 * memory after 10. A ring never grows past the window. */
static void check_memory(tp_hf_model *plain, tp_hf_model *win) {
    tp_err err = {0};
    tp_decoder_opts o = liza_opts("delta_product");
    o.mag.mu0 = 1.0;
    o.inference = 1;
    tp_decoder *m = NULL;
    tp_infer_cache *c = NULL;
    int rc = tp_decoder_create(plain, &o, &m, &err);
    if (rc == TP_OK) rc = tp_cache_create(m, 64, &c, &err);
    CHECK_MSG(rc == TP_OK, "pure-linear: %s", err.msg);
    if (rc == TP_OK) {
        CHECK(!tp_cache_has_kv(c));
        int32_t ids[64] = {0};
        float lg[41];
        rc = tp_cache_feed(c, ids, 10, NULL, lg, &err);
        size_t small = tp_cache_bytes(c);
        for (int i = 0; i < 40 && rc == TP_OK; i++) rc = tp_cache_feed(c, ids, 50, NULL, lg, &err);
        CHECK_MSG(rc == TP_OK, "pure-linear feed: %s", err.msg);
        CHECK_MSG(tp_cache_bytes(c) == small, "pure-linear cache grew from %zu to %zu bytes", small,
                  tp_cache_bytes(c));
        CHECK(tp_cache_pos(c) == 2010);
    }
    tp_cache_destroy(c);
    tp_decoder_destroy(m);
    m = NULL;
    c = NULL;
    tp_decoder_opts_default(&o);
    o.inference = 1;
    rc = tp_decoder_create(win, &o, &m, &err);
    if (rc == TP_OK) rc = tp_cache_create(m, 8, &c, &err);
    CHECK_MSG(rc == TP_OK, "window: %s", err.msg);
    if (rc == TP_OK) {
        int32_t ids[100] = {0};
        float lg[41];
        rc = tp_cache_feed(c, ids, 100, NULL, lg, &err);
        size_t at100 = tp_cache_bytes(c);
        for (int i = 0; i < 20 && rc == TP_OK; i++) rc = tp_cache_feed(c, ids, 1, NULL, lg, &err);
        CHECK_MSG(rc == TP_OK, "window feed: %s", err.msg);
        CHECK(tp_cache_has_kv(c));
        CHECK_MSG(tp_cache_bytes(c) == at100, "ring cache grew from %zu to %zu bytes", at100, tp_cache_bytes(c));
        /* 2 layers x 6 entries x (2 x kvd floats + a position) + LiZA-less scratch */
        CHECK_MSG(at100 <= (size_t)2 * 6 * (2 * 16 * 4 + 4), "ring holds %zu bytes, more than the window", at100);
    }
    tp_cache_destroy(c);
    tp_decoder_destroy(m);
}

/* A checkpoint's config.json: what tptt writes parses back to the same
 * options; every bad field is an error naming the file and the field. */
static void check_config(void) {
    static const char *good =
        "{\"model_type\":\"tptt\",\"base_model_name\":\"/m\",\"liza_enabled\":true,\"operator_mode\":null,"
        "\"recurrent_config\":{\"order\":3,\"alpha_gate\":\"kv\",\"beta_gate\":\"v\",\"linear\":false,\"trick\":\"rdt\"},"
        "\"max_chunk_size\":16,\"base_scale_attn\":true,\"mag_weight\":0.25,\"cross_gate\":true,\"mag_mode\":\"cyclic\","
        "\"mag_mu1\":0.75,\"mag_steps\":10,\"mag_values\":[0.1,0.9],\"mag_period\":5,\"mag_learnable_shape\":\"vector\","
        "\"mag_step\":42,\"mag_mu\":0.1,\"trainable\":\"lora\",\"lora_config\":{\"peft_type\":\"LORA\",\"r\":4,"
        "\"lora_alpha\":8,\"lora_dropout\":0.1,\"target_modules\":[\"q_proj\",\"down_proj\"],\"use_rslora\":true}}";
    tp_decoder_opts o;
    int64_t step = -1;
    char base[64];
    tp_err err = {0};
    int rc = tp_titan_parse_config("ck/config.json", good, strlen(good), &o, &step, base, sizeof base, &err);
    CHECK_MSG(rc == TP_OK, "good config: %s", err.msg);
    CHECK(step == 42 && !strcmp(base, "/m") && o.inference);
    CHECK(o.liza.enabled && o.liza.order == 3 && o.liza.alpha_gate == TP_GATE_KV && o.liza.beta_gate == TP_GATE_V);
    CHECK(!o.liza.linear && o.liza.trick == TP_TRICK_RDT && o.liza.chunk == 16 && o.liza.base_scale_attn);
    CHECK(o.mag.mode == TP_MAG_CYCLIC && o.mag.mu0 == 0.25 && o.mag.mu1 == 0.75 && o.mag.steps == 10);
    CHECK(o.mag.nvalues == 2 && o.mag.values[1] == 0.9 && o.mag.period == 5 && o.mag.vector && o.mag.cross_gate);
    CHECK(o.lora.r == 4 && o.lora.alpha == 8 && o.lora.rslora);
    CHECK(o.lora.targets == ((1u << TP_MOD_Q) | (1u << TP_MOD_DOWN)));
    CHECK(fabs(tp_mag_mu(&o.mag, step) - 0.1) < 1e-12); /* step 42, period 5: value 8 % 2 = 0 */
    static const struct { const char *from, *to, *field; } bad[] = {
        {"\"model_type\":\"tptt\"", "\"model_type\":\"llama\"", "model_type"},
        {"\"base_model_name\":\"/m\"", "\"base_model_name\":7", "base_model_name"},
        {"\"order\":3", "\"order\":9", "order"},
        {"\"order\":3", "\"order\":2.5", "order"},
        {"\"alpha_gate\":\"kv\"", "\"alpha_gate\":\"q\"", "alpha_gate"},
        {"\"trick\":\"rdt\"", "\"trick\":null", "trick"},
        {"\"linear\":false", "\"linear\":0", "linear"},
        {"\"max_chunk_size\":16", "\"max_chunk_size\":0", "max_chunk_size"},
        {"\"mag_weight\":0.25", "\"mag_weight\":1.5", "mag_weight"},
        {"\"mag_mode\":\"cyclic\"", "\"mag_mode\":\"wild\"", "mag_mode"},
        {"\"mag_values\":[0.1,0.9]", "\"mag_values\":[0.1,\"x\"]", "mag_values"},
        {"\"mag_step\":42", "\"mag_step\":-1", "mag_step"},
        {"\"mag_step\":42", "\"mag_step\":1e300", "mag_step"},
        {"\"trainable\":\"lora\"", "\"trainable\":\"some\"", "trainable"},
        {"\"r\":4", "\"r\":0", "\"r\""},
        {"\"target_modules\":[\"q_proj\",\"down_proj\"]", "\"target_modules\":[\"w_proj\"]", "target_modules"},
        {"\"recurrent_config\":{", "\"recurrent_confi\":{", "recurrent_config"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char text[2048];
        const char *at = strstr(good, bad[i].from);
        CHECK(at != NULL);
        if (!at) continue;
        snprintf(text, sizeof text, "%.*s%s%s", (int)(at - good), good, bad[i].to, at + strlen(bad[i].from));
        memset(&err, 0, sizeof err);
        rc = tp_titan_parse_config("ck/config.json", text, strlen(text), &o, &step, base, sizeof base, &err);
        CHECK_MSG(rc != TP_OK && strstr(err.msg, "ck/config.json") && strstr(err.msg, bad[i].field),
                  "bad %s: rc %d, message '%s'", bad[i].field, rc, err.msg);
    }
    rc = tp_titan_parse_config("ck/config.json", "[1", 2, &o, &step, base, sizeof base, &err);
    CHECK(rc != TP_OK && strstr(err.msg, "ck/config.json"));
}

int main(void) {
    check_config();
    snprintf(dir, sizeof dir, "/tmp/tptt_test_infer_%d", (int)getpid());
    tp_hf_model *llama = make_model("llama", TP_ARCH_LLAMA, 4, 2, 0);
    tp_hf_model *mistral = make_model("mistral", TP_ARCH_MISTRAL, 4, 1, 6);
    tp_hf_model *qwen = make_model("qwen", TP_ARCH_QWEN2, 2, 2, 0);
    tp_hf_model *mha = make_model("mha", TP_ARCH_LLAMA, 2, 2, 0);
    CHECK(llama && mistral && qwen && mha);
    if (!llama || !mistral || !qwen || !mha) return tp_test_report("test_infer");

    tp_decoder_opts o;
    tp_decoder_opts_default(&o);
    check_variant("llama base (no LiZA), GQA", llama, o, 4);
    check_variant("mistral base, sliding window 6", mistral, o, 3);
    check_variant("qwen2 base, bias, tied", qwen, o, 64);

    static const char *const presets[] = {"delta_rule", "gated_delta_rule", "delta_rule_v", "delta_rule_kv",
                                          "delta_rule_gelu", "delta_product", "gated_delta_product",
                                          "delta_product_r", "delta_product_c"};
    for (size_t i = 0; i < sizeof presets / sizeof *presets; i++) {
        char label[96];
        snprintf(label, sizeof label, "llama %s", presets[i]);
        check_variant(label, llama, liza_opts(presets[i]), 3);
    }
    static const int tricks[] = {TP_TRICK_DT, TP_TRICK_ROT, TP_TRICK_RDT};
    static const char *const trick_names[] = {"dt", "rot", "rdt"};
    for (int i = 0; i < 3; i++) {
        tp_decoder_opts x = liza_opts("gated_delta_product");
        x.liza.order = 3;
        x.liza.trick = tricks[i];
        char label[96];
        snprintf(label, sizeof label, "order 3, trick %s, gated", trick_names[i]);
        check_variant(label, llama, x, 5);
    }
    tp_decoder_opts x = liza_opts("delta_product");
    x.liza.order = 3;
    x.liza.linear = 0;
    x.liza.alpha_gate = TP_GATE_KV;
    check_variant("order 3, linear false, alpha kv", llama, x, 2);
    x = liza_opts("delta_rule_gelu");
    check_variant("linear false, prefill in one block", llama, x, 64);
    x = liza_opts("delta_rule");
    x.mag.mode = TP_MAG_LEARNABLE;
    check_variant("learnable scalar mu", llama, x, 3);
    x.mag.vector = 1;
    check_variant("learnable vector mu", llama, x, 3);
    x = liza_opts("delta_product");
    x.mag.cross_gate = 1;
    check_variant("cross gate", llama, x, 3);
    x = liza_opts("delta_product");
    x.liza.base_scale_attn = 1;
    check_variant("base_scale_attn", llama, x, 3);
    x = liza_opts("delta_product");
    x.mag.mu0 = 1.0;
    check_variant("pure linear (mu = 1)", llama, x, 3);
    x = liza_opts("delta_rule");
    x.mag.mode = TP_MAG_GRADUAL;
    x.mag.mu0 = 0.2;
    x.mag.mu1 = 0.9;
    check_variant("gradual mu at step 0", llama, x, 3);
    x = liza_opts("gated_delta_product");
    check_variant("mistral window 6 + LiZA", mistral, x, 3);
    x = liza_opts("delta_product_c");
    x.mag.cross_gate = 1;
    check_variant("qwen2 + LiZA + cross gate", qwen, x, 4);
    x = liza_opts("delta_rule_kv");
    check_variant("MHA (no GQA) + LiZA", mha, x, 1);
    x = liza_opts("delta_product");
    x.trainable = TP_TRAIN_PROJECTIONS;
    check_variant("trainable projections + LiZA", llama, x, 3);

    check_memory(llama, mistral);

    tp_hf_close(llama);
    tp_hf_close(mistral);
    tp_hf_close(qwen);
    tp_hf_close(mha);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "note: could not remove %s\n", dir);
    return tp_test_report("test_infer");
}
