/* test_decoder.c - the decoder's gradients against central finite
 * differences (each trainable set, each architecture, packed documents,
 * sliding window), recomputation giving bit-identical gradients, and
 * repeated runs giving bit-identical losses. The PyTorch oracle
 * (test_oracle_decoder.py) checks the values themselves. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/hf_model.h"
#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "test.h"
#include "test_model.h"
#include "util/rng.h"

static char dir[256];

static tp_hf_model *make_model(const char *name, tp_arch arch, int tie, int64_t window, int64_t head_dim) {
    tp_model_config c = {0};
    c.arch = arch;
    c.hidden = 24; c.ffn = 40; c.layers = 2; c.heads = 4; c.kv_heads = 2; c.head_dim = head_dim; c.vocab = 37;
    c.rms_eps = 1e-5; c.rope_theta = 10000; c.tie_embeddings = tie; c.sliding_window = window;
    c.qkv_bias = arch == TP_ARCH_QWEN2; c.bos_id = c.eos_id = -1; c.max_pos = 64;
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return tp_test_model(path, &c, 0.25, 7);
}

/* a 2-row batch; row 0 holds three documents */
#define B_ 2
#define T_ 13
static int32_t ids[B_ * T_], labels[B_ * T_], dstart[B_ * T_], pos[B_ * T_];

static void make_batch(tp_batch *b) {
    tp_rng r;
    tp_rng_seed(&r, 3, 0);
    for (int i = 0; i < B_ * T_; i++) ids[i] = (int32_t)(tp_rng_next(&r) % 37);
    int64_t s0[3] = {0, 5, 9}, s1[1] = {0};
    tp_err err;
    tp_batch_row_positions(s0, 3, T_, dstart, pos, &err);
    tp_batch_row_positions(s1, 1, T_, dstart + T_, pos + T_, &err);
    for (int i = 0; i < B_ * T_; i++) {
        int t = i % T_;
        labels[i] = (t == T_ - 1 || dstart[i + 1] == t + 1) ? -100 : ids[i + 1];
    }
    labels[3] = -100; /* an explicitly ignored position */
    *b = (tp_batch){B_, T_, ids, labels, dstart, pos, NULL};
}

static double loss_of(tp_decoder *m, const tp_batch *b) {
    double sum;
    int64_t cnt;
    tp_err err;
    tp_decoder_step(m, b, 1.0, 0, NULL, &sum, &cnt, &err);
    return sum / (double)cnt;
}

static void fd_check(const char *label, tp_hf_model *hf, tp_decoder_opts *o) {
    tp_decoder *m;
    tp_err err = {0};
    int rc = tp_decoder_create(hf, o, &m, &err);
    CHECK_MSG(rc == TP_OK, "%s: %s", label, err.msg);
    if (rc) return;
    tp_batch b;
    make_batch(&b);
    double sum;
    int64_t cnt;
    tp_decoder_zero_grad(m);
    CHECK(tp_decoder_step(m, &b, 1.0, 1, NULL, &sum, &cnt, &err) == TP_OK);
    /* gradient of the mean: the step was normalised by 1, rescale */
    size_t n = tp_decoder_numel(m);
    float *g = malloc(n * sizeof *g);
    memcpy(g, tp_decoder_grad(m), n * sizeof *g);
    float *theta = tp_decoder_theta(m);
    tp_rng r;
    tp_rng_seed(&r, 11, 0);
    int worst_ok = 1;
    double worst = 0;
    for (size_t pi = 0; pi < tp_decoder_nparams(m); pi++) {
        const tp_param *p = tp_decoder_param(m, pi);
        for (int trial = 0; trial < 3; trial++) {
            size_t e = p->offset + (size_t)(tp_rng_next(&r) % p->numel);
            float keep = theta[e];
            double h = 3e-3;
            theta[e] = (float)(keep + h);
            double lp = loss_of(m, &b);
            theta[e] = (float)(keep - h);
            double lm = loss_of(m, &b);
            theta[e] = keep;
            double fd = (lp - lm) / ((double)(float)(keep + h) - (double)(float)(keep - h));
            double an = g[e] / (double)cnt;
            double tol = 2e-3 + 3e-2 * fabs(fd);
            double dev = fabs(fd - an);
            if (dev / (1e-2 + fabs(fd)) > worst) worst = dev / (1e-2 + fabs(fd));
            if (dev > tol) {
                worst_ok = 0;
                fprintf(stderr, "%s: %s[%zu]: analytic %.6g, finite difference %.6g\n", label, p->name,
                        e - p->offset, an, fd);
            }
        }
    }
    CHECK_MSG(worst_ok, "%s: gradients disagree with finite differences", label);
    printf("%s: %zu tensors, worst relative deviation %.2e\n", label, tp_decoder_nparams(m), worst);
    /* recomputation gives the same gradients, bit for bit; so does a rerun */
    tp_decoder_opts o2 = *o;
    o2.recompute = 1;
    tp_decoder *m2;
    if (tp_decoder_create(hf, &o2, &m2, &err) == TP_OK) {
        double sum2, sum3;
        tp_decoder_zero_grad(m2);
        CHECK(tp_decoder_step(m2, &b, 1.0, 1, NULL, &sum2, &cnt, &err) == TP_OK);
        CHECK_MSG(sum2 == sum && !memcmp(g, tp_decoder_grad(m2), n * sizeof *g), "%s: recompute differs", label);
        tp_decoder_zero_grad(m2);
        CHECK(tp_decoder_step(m2, &b, 1.0, 1, NULL, &sum3, &cnt, &err) == TP_OK);
        CHECK_MSG(sum3 == sum && !memcmp(g, tp_decoder_grad(m2), n * sizeof *g), "%s: rerun differs", label);
        tp_decoder_destroy(m2);
    }
    free(g);
    tp_decoder_destroy(m);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/tptt-test-dec-XXXXXX");
    if (!mkdtemp(dir)) return 1;
    struct { const char *name; tp_arch arch; int tie; int64_t window, hd; } models[] = {
        {"llama", TP_ARCH_LLAMA, 0, 0, 6},  /* GQA, head_dim != D/H */
        {"mistral", TP_ARCH_MISTRAL, 0, 4, 6}, /* sliding window shorter than documents */
        {"qwen2", TP_ARCH_QWEN2, 1, 0, 6},  /* biases, tied embeddings */
    };
    for (int i = 0; i < 3; i++) {
        tp_hf_model *hf = make_model(models[i].name, models[i].arch, models[i].tie, models[i].window, models[i].hd);
        CHECK(hf != NULL);
        if (!hf) continue;
        tp_decoder_opts o;
        tp_decoder_opts_default(&o);
        char label[128];
        o.trainable = TP_TRAIN_ALL;
        snprintf(label, sizeof label, "%s/all", models[i].name);
        fd_check(label, hf, &o);
        o.trainable = TP_TRAIN_PROJECTIONS;
        o.lora.targets = 0x7f;
        snprintf(label, sizeof label, "%s/projections", models[i].name);
        fd_check(label, hf, &o);
        o.trainable = TP_TRAIN_LORA;
        o.lora.init_random = 1;
        o.lora.r = 3;
        o.lora.alpha = 2; /* keep the loss smooth enough for finite differences at h = 3e-3 */
        o.lora.rslora = i == 1;
        snprintf(label, sizeof label, "%s/lora", models[i].name);
        fd_check(label, hf, &o);
        o.lora.dropout = 0.3; /* masks must be the same in every pass */
        snprintf(label, sizeof label, "%s/lora+dropout", models[i].name);
        fd_check(label, hf, &o);
        o.lora.dropout = 0;
        /* LiZA + MaG variants (chunk 4 so chunk boundaries fall inside documents) */
        static const struct { const char *preset; int mode, vector, cross, bscale; double mu0; } lz[] = {
            {"delta_rule", TP_MAG_LEARNABLE, 0, 1, 0, 0.4},
            {"gated_delta_product", TP_MAG_LEARNABLE, 1, 0, 1, 0.6},
            {"delta_rule_gelu", TP_MAG_GRADUAL, 0, 0, 0, 0.2},
            {"delta_product_c", TP_MAG_CONSTANT, 0, 0, 0, 1.0}, /* pure linear */
        };
        for (int z = 0; z < 4; z++) {
            tp_decoder_opts oz = o;
            oz.liza.enabled = 1;
            tp_liza_preset(lz[z].preset, &oz.liza);
            oz.liza.chunk = 4;
            oz.liza.base_scale_attn = lz[z].bscale;
            oz.mag.mode = lz[z].mode;
            oz.mag.vector = lz[z].vector;
            oz.mag.cross_gate = lz[z].cross;
            oz.mag.mu0 = lz[z].mu0;
            if (i == 2 && z == 0) oz.trainable = TP_TRAIN_ALL; /* every weight with LiZA on */
            snprintf(label, sizeof label, "%s/liza-%s", models[i].name, lz[z].preset);
            fd_check(label, hf, &oz);
        }
        tp_hf_close(hf);
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return tp_test_report("test_decoder");
}
