/* bench_decoder.c - forward+backward speed of a Llama-3.2-1B-shaped layer
 * stack (D=2048, F=8192, H=32, Hkv=8, d=64) with LoRA r=8 on q/k/v/o, for each
 * matmul backend, next to the raw GEMM rate of that backend on the same
 * shapes in the same run. GFLOP/s count only dense products with the frozen
 * weights (forward x·Wᵀ and backward dy·W), as the reference figure does.
 *
 *   bench_decoder [--layers 2] [--seq 512] [--iters 3] [--model DIR]
 *
 * Reference (this machine, PyTorch 1.13 fp32, 2 threads): two layers at seq
 * 512 in 1.64 s. Targets: <= 1.0 s with f32, <= 0.6 s with bf16. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "io/hf_model.h"
#include "kernels/matmul.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "util/platform.h"
#include "util/rng.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double peak_rss_mib(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_maxrss / 1024.0;
}

/* Raw rate: every frozen product of one layer's forward and backward, on
 * fp32 weights with sgemm or bf16 weights with oneDNN. */
static double raw_rate(tp_mm_backend be, const tp_model_config *c, int64_t n, int iters) {
    int64_t D = c->hidden, F = c->ffn, qd = c->heads * c->head_dim, kvd = c->kv_heads * c->head_dim;
    int64_t shapes[7][2] = {{qd, D}, {kvd, D}, {kvd, D}, {D, qd}, {F, D}, {F, D}, {D, F}};
    tp_matmul *mm;
    tp_err err;
    if (tp_matmul_create(be, &mm, &err)) return 0;
    size_t maxw = (size_t)(F * D);
    void *w = malloc(maxw * 4);
    float *x = malloc((size_t)(n * F) * 4), *y = malloc((size_t)(n * F) * 4);
    tp_rng r;
    tp_rng_seed(&r, 1, 1);
    for (size_t i = 0; i < maxw; i++) ((float *)w)[i] = (float)(tp_rng_uniform(&r) - 0.5);
    if (be == TP_MM_BF16) tp_from_f32(w, w, TP_BF16, maxw); /* in place, front half */
    for (int64_t i = 0; i < n * F; i++) x[i] = (float)(tp_rng_uniform(&r) - 0.5);
    /* best time of each product separately over several rounds: this
     * machine's timings are noisy, and a raw rate that is too low would
     * flatter the ratio */
    double flops = 0, total = 0;
    for (int s = 0; s < 7; s++) {
        tp_weight wt = {w, be == TP_MM_BF16 ? TP_BF16 : TP_F32, shapes[s][0], shapes[s][1]};
        for (int dir = 0; dir < 2; dir++) {
            double best = 1e30;
            for (int it = 0; it <= 2 * iters + 2; it++) {
                double t0 = now();
                if (dir == 0) tp_mm_xwt(mm, x, n, &wt, y, 0, &err);
                else tp_mm_dyw(mm, x, n, &wt, y, 0, &err);
                double t = now() - t0;
                if (it > 0 && t < best) best = t;
            }
            total += best;
            flops += 2.0 * (double)n * (double)(shapes[s][0] * shapes[s][1]);
        }
    }
    double best = total;
    free(w);
    free(x);
    free(y);
    tp_matmul_destroy(mm);
    return flops / best / 1e9;
}

int main(int argc, char **argv) {
    tp_maybe_reexec_for_blas(argc, argv);
    int layers = 2, iters = 3;
    int64_t seq = 512;
    const char *model = "/tmp/tptt-bench-1b-layers";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--layers")) layers = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seq")) seq = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--model")) model = argv[i + 1];
    }
    char plat[512];
    tp_platform_describe(plat, sizeof plat);
    printf("platform: %s\n", plat);
    tp_model_config c = {0};
    c.arch = TP_ARCH_LLAMA;
    c.hidden = 2048; c.ffn = 8192; c.layers = layers; c.heads = 32; c.kv_heads = 8; c.head_dim = 64;
    c.vocab = 512; /* small: the bench measures the layer stack */
    c.rms_eps = 1e-5; c.rope_theta = 500000; c.max_pos = 8192; c.bos_id = c.eos_id = -1;
    tp_err err = {0};
    tp_hf_model *hf = NULL;
    if (tp_hf_open(model, &hf, &err) != TP_OK || hf->cfg.layers != layers || hf->cfg.hidden != 2048) {
        tp_hf_close(hf);
        tp_init_opts o;
        tp_init_opts_default(&o);
        o.force = 1;
        printf("creating %s (%d layers, bf16)...\n", model, layers);
        if (tp_init_model(&c, &o, model, &err) || tp_hf_open(model, &hf, &err)) {
            fprintf(stderr, "bench_decoder: %s\n", err.msg);
            return 1;
        }
    }
    int64_t D = c.hidden, F = c.ffn, qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim;
    double layer_flops = 4.0 * (double)seq * (double)(qd * D + 2 * kvd * D + D * qd + 3 * D * F); /* fwd + bwd dx */
    double dense = layer_flops * layers;
    int32_t *ids = malloc((size_t)seq * 4), *lab = malloc((size_t)seq * 4), *ds = calloc((size_t)seq, 4),
            *pos = malloc((size_t)seq * 4);
    for (int64_t t = 0; t < seq; t++) {
        ids[t] = (int32_t)((t * 7) % c.vocab);
        lab[t] = t + 1 < seq ? (int32_t)(((t + 1) * 7) % c.vocab) : -100;
        pos[t] = (int32_t)t;
    }
    tp_batch b = {1, seq, ids, lab, ds, pos, NULL};
    printf("\nLlama-3.2-1B-shaped stack: %d layers, seq %lld, LoRA r=8 on q,k,v,o; dense GFLOP per step %.1f\n", layers,
           (long long)seq, dense / 1e9);
    printf("%-8s %10s %12s %12s %14s %10s %14s\n", "backend", "s/step", "tokens/s", "GFLOP/s", "raw GEMM GF/s", "ratio",
           "peak RSS MiB");
    for (int be = 0; be < 2; be++) {
        tp_decoder_opts o;
        tp_decoder_opts_default(&o);
        o.matmul = (tp_mm_backend)be;
        tp_decoder *m;
        if (tp_decoder_create(hf, &o, &m, &err)) {
            fprintf(stderr, "bench_decoder: %s\n", err.msg);
            return 1;
        }
        double best = 1e30, loss;
        int64_t cnt;
        for (int it = 0; it <= iters; it++) {
            double t0 = now();
            if (tp_decoder_step(m, &b, (double)(seq - 1), 1, NULL, &loss, &cnt, &err)) {
                fprintf(stderr, "bench_decoder: %s\n", err.msg);
                return 1;
            }
            double t = now() - t0;
            if (it > 0 && t < best) best = t;
        }
        tp_decoder_destroy(m);
        double rate = dense / best / 1e9, raw = raw_rate((tp_mm_backend)be, &c, seq, iters);
        printf("%-8s %10.3f %12.0f %12.1f %14.1f %9.0f%% %14.0f\n", tp_mm_backend_name((tp_mm_backend)be), best,
               (double)seq / best, rate, raw, 100.0 * rate / raw, peak_rss_mib());
        fflush(stdout);
    }
    printf("\nreference: PyTorch 1.13 fp32 (2 threads) 1.64 s/step (152 GFLOP/s) for 2 layers at seq 512;\n"
           "targets: f32 <= 1.0 s, bf16 <= 0.6 s, each >= 60%% of its raw GEMM rate.\n");
    free(ids);
    free(lab);
    free(ds);
    free(pos);
    tp_hf_close(hf);
    return 0;
}
