/* cmd_init_model.c - `tptt init-model`: write a random model (see init_model.h). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "model/init_model.h"
#include "tok/tokenizer.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt init-model --arch llama|mistral|qwen2 --layers N --hidden D --heads H --kv-heads K\n"
            "                       --ffn F --vocab V [--head-dim d] [--tie] [--sliding-window W]\n"
            "                       [--dtype bf16|f32|f16] [--shards N] [--seed S] [--init-std X]\n"
            "                       [--rope-theta X] [--byte-tokenizer] [--force] OUT_DIR\n"
            "\n"
            "Writes config.json and seeded random weights (model.safetensors, or N shards with\n"
            "model.safetensors.index.json). Matrices ~ N(0, init-std=0.02), norm weights ~ 1 + N(0, 0.1).\n");
}

int tp_cmd_init_model(int argc, char **argv) {
    static const struct option opts[] = {
        {"arch", required_argument, 0, 'a'},     {"layers", required_argument, 0, 'l'},
        {"hidden", required_argument, 0, 'D'},   {"heads", required_argument, 0, 'H'},
        {"kv-heads", required_argument, 0, 'K'}, {"ffn", required_argument, 0, 'F'},
        {"vocab", required_argument, 0, 'V'},    {"head-dim", required_argument, 0, 'd'},
        {"tie", no_argument, 0, 't'},            {"sliding-window", required_argument, 0, 'w'},
        {"dtype", required_argument, 0, 'T'},    {"shards", required_argument, 0, 's'},
        {"seed", required_argument, 0, 'S'},     {"init-std", required_argument, 0, 'x'},
        {"rope-theta", required_argument, 0, 'r'}, {"force", no_argument, 0, 'f'},
        {"byte-tokenizer", no_argument, 0, 'b'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    tp_model_config c;
    memset(&c, 0, sizeof c);
    c.rms_eps = 1e-5;
    c.rope_theta = 10000.0;
    c.bos_id = 1;
    c.eos_id = 2;
    tp_init_opts o;
    tp_init_opts_default(&o);
    int have_arch = 0, byte_tok = 0;
    long long v;
    char msg[256];
    optind = 1;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        const char *name = NULL;
        int64_t *dst = NULL;
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'a':
            if (tp_arch_parse(optarg, &c.arch) != 0) {
                snprintf(msg, sizeof msg, "init-model: --arch must be llama, mistral or qwen2, got '%s'", optarg);
                return tp_cli_error(msg);
            }
            have_arch = 1;
            continue;
        case 't': c.tie_embeddings = 1; continue;
        case 'f': o.force = 1; continue;
        case 'b': byte_tok = 1; continue;
        case 'T':
            if (!strcmp(optarg, "bf16")) o.dtype = TP_BF16;
            else if (!strcmp(optarg, "f32")) o.dtype = TP_F32;
            else if (!strcmp(optarg, "f16")) o.dtype = TP_F16;
            else {
                snprintf(msg, sizeof msg, "init-model: --dtype must be bf16, f32 or f16, got '%s'", optarg);
                return tp_cli_error(msg);
            }
            continue;
        case 'x':
        case 'r': {
            char *end;
            double x = strtod(optarg, &end);
            if (*end || !(x > 0)) {
                snprintf(msg, sizeof msg, "init-model: --%s must be a positive number, got '%s'",
                         ch == 'x' ? "init-std" : "rope-theta", optarg);
                return tp_cli_error(msg);
            }
            if (ch == 'x') o.std = x; else c.rope_theta = x;
            continue;
        }
        case 'S':
            if (tp_cli_int(optarg, 0, 0x7fffffffffffffffLL, &v)) {
                snprintf(msg, sizeof msg, "init-model: --seed must be a non-negative integer, got '%s'", optarg);
                return tp_cli_error(msg);
            }
            o.seed = (uint64_t)v;
            continue;
        case 's':
            if (tp_cli_int(optarg, 1, 100000, &v)) {
                snprintf(msg, sizeof msg, "init-model: --shards must be a positive integer, got '%s'", optarg);
                return tp_cli_error(msg);
            }
            o.shards = (int)v;
            continue;
        case 'l': name = "layers"; dst = &c.layers; break;
        case 'D': name = "hidden"; dst = &c.hidden; break;
        case 'H': name = "heads"; dst = &c.heads; break;
        case 'K': name = "kv-heads"; dst = &c.kv_heads; break;
        case 'F': name = "ffn"; dst = &c.ffn; break;
        case 'V': name = "vocab"; dst = &c.vocab; break;
        case 'd': name = "head-dim"; dst = &c.head_dim; break;
        case 'w': name = "sliding-window"; dst = &c.sliding_window; break;
        default:
            snprintf(msg, sizeof msg, "init-model: unknown or incomplete option '%s' (see --help)", argv[optind - 1]);
            fprintf(stderr, "tptt: %s\n", msg);
            return 2;
        }
        if (tp_cli_int(optarg, 1, 1LL << 31, &v)) {
            snprintf(msg, sizeof msg, "init-model: --%s must be a positive integer, got '%s'", name, optarg);
            return tp_cli_error(msg);
        }
        *dst = v;
    }
    if (optind != argc - 1) {
        fprintf(stderr, "tptt: init-model: expected exactly one OUT_DIR argument\n");
        usage(stderr);
        return 2;
    }
    const char *missing = !have_arch ? "--arch" : !c.layers ? "--layers" : !c.hidden ? "--hidden"
                        : !c.heads ? "--heads" : !c.ffn ? "--ffn" : !c.vocab ? "--vocab" : NULL;
    if (missing) {
        snprintf(msg, sizeof msg, "init-model: %s is required (see --help)", missing);
        return tp_cli_error(msg);
    }
    if (!c.kv_heads) c.kv_heads = c.heads;
    if (!c.head_dim) c.head_dim = c.hidden / c.heads;
    if (c.sliding_window && c.arch != TP_ARCH_MISTRAL)
        return tp_cli_error("init-model: --sliding-window is only supported with --arch mistral");
    c.qkv_bias = c.arch == TP_ARCH_QWEN2;
    c.max_pos = c.arch == TP_ARCH_LLAMA ? 2048 : 32768;
    if (c.vocab < 3) c.bos_id = c.eos_id = -1;
    tp_err err = {0};
    if (byte_tok && c.vocab < 256) return tp_cli_error("init-model: --byte-tokenizer needs --vocab 256 or more");
    if (tp_init_model(&c, &o, argv[optind], &err) != TP_OK) return tp_cli_error(err.msg);
    if (byte_tok && tp_write_byte_tokenizer(argv[optind], &err) != TP_OK) return tp_cli_error(err.msg);
    printf("wrote %s model to %s (%lld parameters, %s, %d file%s)\n", tp_arch_class(c.arch), argv[optind],
           (long long)tp_model_param_count(&c), tp_dtype_name(o.dtype), o.shards, o.shards > 1 ? "s + index" : "");
    return 0;
}
