/* cmd_inspect.c - `tptt inspect MODEL_DIR`: what a model is and what training it costs. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "io/hf_model.h"
#include "model/memory.h"
#include "util/platform.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt inspect [--json] [--seq-len N] [--micro-batch N] [--lora-rank R] [--lora-dropout] MODEL_DIR\n"
            "\n"
            "Validates the model directory (config.json, safetensors, shard index), prints its\n"
            "architecture, shapes, parameter count, dtypes, bytes on disk, and the memory one\n"
            "training rank needs: frozen weights mapped read-only (shared by the ranks of a node)\n"
            "versus private memory (trainables + AdamW state, activations, scratch). --lora-dropout:\n"
            "the run sets lora.dropout > 0 (one more buffer as wide as the LoRA input).\n");
}

static void human(char *buf, size_t n, double bytes) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (bytes >= 1024 && i < 4) { bytes /= 1024; i++; }
    snprintf(buf, n, i ? "%.2f %s" : "%.0f %s", bytes, u[i]);
}

static const char *dtype_summary(const tp_hf_model *m, char *buf, size_t n) {
    size_t cnt[3] = {0, 0, 0};
    for (size_t i = 0; i < m->nweights; i++) cnt[m->views[i]->dtype]++;
    size_t k = 0;
    buf[0] = 0;
    for (int t = 2; t >= 0; t--)
        if (cnt[t]) k += (size_t)snprintf(buf + k, n - k, "%s%s x%zu", k ? ", " : "", tp_dtype_name((tp_dtype)t), cnt[t]);
    return buf;
}

int tp_cmd_inspect(int argc, char **argv) {
    static const struct option opts[] = {{"json", no_argument, 0, 'j'},         {"seq-len", required_argument, 0, 's'},
                                         {"micro-batch", required_argument, 0, 'b'},
                                         {"lora-rank", required_argument, 0, 'r'}, {"lora-dropout", no_argument, 0, 'd'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int json = 0;
    tp_mem_opts mo;
    tp_mem_opts_default(&mo);
    long long v;
    int ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'j': json = 1; break;
        case 'd': mo.lora_dropout = 1; break;
        case 's':
        case 'b':
        case 'r':
            if (tp_cli_int(optarg, 1, 1 << 24, &v)) {
                fprintf(stderr, "tptt: inspect: --%s must be a positive integer, got '%s'\n",
                        ch == 's' ? "seq-len" : ch == 'b' ? "micro-batch" : "lora-rank", optarg);
                return 2;
            }
            if (ch == 's') mo.seq_len = v; else if (ch == 'b') mo.micro_batch = v; else mo.lora_rank = (int)v;
            break;
        default:
            fprintf(stderr, "tptt: inspect: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        return 2;
    }
    const char *dir = argv[optind];
    tp_err err = {0};
    tp_hf_model *m;
    if (tp_hf_open(dir, &m, &err) != TP_OK) return tp_cli_error(err.msg);
    const tp_model_config *c = &m->cfg;
    tp_cpu_features cpu;
    tp_cpu_detect(&cpu);
    int all_bf16 = 1;
    for (size_t i = 0; i < m->nweights; i++) all_bf16 &= m->views[i]->dtype == TP_BF16;
    mo.bf16_matmul = all_bf16 && cpu.avx512_bf16; /* what compute.matmul=auto picks */
    tp_mem_estimate e, er;
    tp_mem_estimate_compute(c, m->weight_bytes, &mo, &e);
    tp_mem_opts mr = mo;
    mr.recompute = 1;
    tp_mem_estimate_compute(c, m->weight_bytes, &mr, &er);
    uint64_t params = tp_model_param_count(c);
    char plat[512], dts[128];
    tp_platform_describe(plat, sizeof plat);
    dtype_summary(m, dts, sizeof dts);
    int64_t qd = c->heads * c->head_dim, kvd = c->kv_heads * c->head_dim;
    if (json) {
        printf("{\"architecture\":\"%s\",\"model_type\":\"%s\",\"layers\":%lld,\"hidden_size\":%lld,"
               "\"intermediate_size\":%lld,\"num_attention_heads\":%lld,\"num_key_value_heads\":%lld,"
               "\"head_dim\":%lld,\"vocab_size\":%lld,\"sliding_window\":%lld,\"tie_word_embeddings\":%s,"
               "\"qkv_bias\":%s,\"rope_theta\":%.17g,\"rope_scaling\":\"%s\",\"parameters\":%llu,"
               "\"tensors\":%zu,\"files\":%zu,\"sharded\":%s,\"file_bytes\":%llu,\"weight_bytes\":%llu,"
               "\"dtypes\":\"%s\",\"memory\":{\"seq_len\":%lld,\"micro_batch\":%lld,\"lora_rank\":%d,"
               "\"frozen_mapped_bytes\":%llu,\"trainable_params\":%llu,\"trainable_bytes\":%llu,"
               "\"activation_bytes\":%llu,\"activation_bytes_recompute\":%llu,\"scratch_bytes\":%llu,"
               "\"private_bytes\":%llu,\"private_bytes_recompute\":%llu}}\n",
               tp_arch_class(c->arch), tp_arch_model_type(c->arch), (long long)c->layers, (long long)c->hidden,
               (long long)c->ffn, (long long)c->heads, (long long)c->kv_heads, (long long)c->head_dim,
               (long long)c->vocab, (long long)c->sliding_window, c->tie_embeddings ? "true" : "false",
               c->qkv_bias ? "true" : "false", c->rope_theta, c->rope_llama3 ? "llama3" : "none",
               (unsigned long long)params, m->nweights, m->nfiles, m->sharded ? "true" : "false",
               (unsigned long long)m->file_bytes, (unsigned long long)m->weight_bytes, dts, (long long)mo.seq_len,
               (long long)mo.micro_batch, mo.lora_rank, (unsigned long long)e.frozen_bytes,
               (unsigned long long)e.trainable_params, (unsigned long long)e.trainable_bytes,
               (unsigned long long)e.activation_bytes, (unsigned long long)er.activation_bytes,
               (unsigned long long)e.scratch_bytes, (unsigned long long)e.private_bytes,
               (unsigned long long)er.private_bytes);
        tp_hf_close(m);
        return 0;
    }
    char b1[32], b2[32], b3[32], b4[32], b5[32], b6[32], b7[32];
    printf("model         %s\n", dir);
    printf("architecture  %s (model_type %s)\n", tp_arch_class(c->arch), tp_arch_model_type(c->arch));
    printf("layers        %lld   hidden %lld   ffn %lld   vocab %lld\n", (long long)c->layers, (long long)c->hidden,
           (long long)c->ffn, (long long)c->vocab);
    printf("attention     heads %lld, kv heads %lld (GQA group %lld), head_dim %lld, qkv bias %s\n",
           (long long)c->heads, (long long)c->kv_heads, (long long)(c->heads / c->kv_heads), (long long)c->head_dim,
           c->qkv_bias ? "yes" : "no");
    if (c->rope_llama3)
        printf("rope          theta %g, llama3 scaling factor %g (low %g, high %g, original %lld)\n", c->rope_theta,
               c->rope_factor, c->rope_low_freq_factor, c->rope_high_freq_factor, (long long)c->rope_original_max_pos);
    else
        printf("rope          theta %g, no scaling\n", c->rope_theta);
    if (c->sliding_window) printf("window        sliding window %lld tokens\n", (long long)c->sliding_window);
    else printf("window        none (full causal attention)\n");
    printf("embeddings    %s\n", c->tie_embeddings ? "tied (lm_head = embed_tokens)" : "untied (separate lm_head)");
    printf("shapes        embed_tokens [%lld, %lld]  q_proj [%lld, %lld]  k_proj/v_proj [%lld, %lld]  o_proj [%lld, %lld]\n"
           "              gate_proj/up_proj [%lld, %lld]  down_proj [%lld, %lld]  norms [%lld]%s\n",
           (long long)c->vocab, (long long)c->hidden, (long long)qd, (long long)c->hidden, (long long)kvd,
           (long long)c->hidden, (long long)c->hidden, (long long)qd, (long long)c->ffn, (long long)c->hidden,
           (long long)c->hidden, (long long)c->ffn, (long long)c->hidden, c->tie_embeddings ? "" : "  lm_head [V, D]");
    if (params >= 1000000000ull) printf("parameters    %llu (%.2f B)\n", (unsigned long long)params, (double)params / 1e9);
    else printf("parameters    %llu (%.2f M)\n", (unsigned long long)params, (double)params / 1e6);
    human(b1, sizeof b1, (double)m->file_bytes);
    human(b2, sizeof b2, (double)m->weight_bytes);
    printf("storage       %zu tensors, %s; %zu file%s%s, %s on disk (%s of weights)\n", m->nweights, dts, m->nfiles,
           m->nfiles > 1 ? "s" : "", m->sharded ? " via model.safetensors.index.json" : "", b1, b2);
    human(b1, sizeof b1, (double)e.frozen_bytes);
    human(b2, sizeof b2, (double)e.trainable_bytes);
    human(b3, sizeof b3, (double)e.activation_bytes);
    human(b4, sizeof b4, (double)er.activation_bytes);
    human(b5, sizeof b5, (double)e.scratch_bytes);
    human(b6, sizeof b6, (double)e.private_bytes);
    human(b7, sizeof b7, (double)er.private_bytes);
    printf("memory/rank   seq %lld x micro-batch %lld, LoRA r=%d on q,k,v,o%s, %s matmul:\n", (long long)mo.seq_len,
           (long long)mo.micro_batch, mo.lora_rank, mo.lora_dropout ? " with dropout" : "",
           mo.bf16_matmul ? "bf16" : "f32");
    char tl[96];
    snprintf(tl, sizeof tl, "trainables, grads, AdamW, rollback (%llu params)", (unsigned long long)e.trainable_params);
    printf("  %-52s %s\n", "frozen weights, mmap read-only (shared per node)", b1);
    printf("  %-52s %s\n", tl, b2);
    printf("  %-52s %s (%s with recompute)\n", "activations saved for backward", b3, b4);
    printf("  %-52s %s\n", "scratch (logits, one layer, matmul buffers)", b5);
    printf("  %-52s %s (%s with recompute)\n", "private total", b6, b7);
    printf("platform      %s\n", plat);
    tp_hf_close(m);
    return 0;
}
