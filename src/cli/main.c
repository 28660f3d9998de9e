/* main.c - the tptt command: dispatch to subcommands. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "util/platform.h"

#ifndef TPTT_VERSION
#define TPTT_VERSION "0.1.0"
#endif

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt <command> [options]\n"
            "\n"
            "commands:\n"
            "  init-model   write a Hugging Face-layout model with seeded random weights\n"
            "  inspect      describe a model directory and the memory one rank needs to train it\n"
            "  dump         one forward+backward on a batch, written out for numerical checks\n"
            "  make-shard   build a token shard from raw bytes or JSONL ids (tests, demos); --info FILE\n"
            "  tokenize     encode/decode JSONL text with a Hugging Face tokenizer.json\n"
            "  prepare-data tokenize a run's text/alpaca/chat data into its cache (train does it too)\n"
            "  train        fine-tune with LiZA + MaG + LoRA (run under mpirun for several ranks)\n"
            "  plot         draw loss and learning rate from metrics.jsonl, one run or several compared (gnuplot)\n"
            "  generate     run a trained Titan (or a base model) on prompts: text out, recurrent LiZA cache\n"
            "  eval         perplexity and MMLU of a trained Titan or a base model\n"
            "  export       a checkpoint as a merged HF model, a PEFT adapter or a Titan directory\n"
            "  adapter      LoRA surgery with ScaLAPACK: resize an adapter to rank R, convert a PiSSA adapter\n"
            "  version      print the version and the numeric libraries in use\n"
            "\n"
            "Run 'tptt <command> --help' for a command's options. Documentation: docs/.\n");
}

int tp_cli_error(const char *msg) {
    fprintf(stderr, "tptt: %s\n", msg);
    return 1;
}

int tp_cli_int(const char *s, long long lo, long long hi, long long *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int tp_cli_parse_config_args(int argc, char **argv, const char *cmd, void (*usage)(FILE *), tp_cli_config_args *a) {
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *val = NULL;
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
            usage(stdout);
            return 0;
        }
        int is_set = !strcmp(arg, "--set") || !strncmp(arg, "--set=", 6);
        int is_resume = a->resume && (!strcmp(arg, "--resume") || !strncmp(arg, "--resume=", 9));
        if (is_set || is_resume) {
            const char *eq = strchr(arg, '=');
            val = eq ? eq + 1 : i + 1 < argc ? argv[++i] : NULL;
        }
        if ((is_set || is_resume) && !val) {
            fprintf(stderr, "tptt: %s: %s needs a value (see --help)\n", cmd, arg);
            return 2;
        } else if (is_set) {
            if (a->nsets == TP_CLI_MAX_SETS) {
                fprintf(stderr, "tptt: %s: too many --set options\n", cmd);
                return 2;
            }
            a->sets[a->nsets++] = val;
        } else if (is_resume) {
            a->resume = val;
        } else if (arg[0] == '-') {
            fprintf(stderr, "tptt: %s: unknown or incomplete option '%s' (see --help)\n", cmd, arg);
            return 2;
        } else if (!a->config) {
            a->config = arg;
        } else {
            fprintf(stderr, "tptt: %s: more than one config file given ('%s', '%s')\n", cmd, a->config, arg);
            return 2;
        }
    }
    if (!a->config) {
        usage(stderr);
        return 2;
    }
    return -1;
}

int tp_cli_load_config(const tp_cli_config_args *a, tp_train_cfg *cfg, tp_err *err) {
    int rc = tp_train_cfg_load(a->config, cfg, err);
    for (int i = 0; rc == TP_OK && i < a->nsets; i++) rc = tp_train_cfg_set(cfg, a->sets[i], err);
    return rc;
}

int main(int argc, char **argv) {
    tp_maybe_reexec_for_blas(argc, argv);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "init-model")) return tp_cmd_init_model(argc - 1, argv + 1);
    if (!strcmp(cmd, "inspect")) return tp_cmd_inspect(argc - 1, argv + 1);
    if (!strcmp(cmd, "dump")) return tp_cmd_dump(argc - 1, argv + 1);
    if (!strcmp(cmd, "make-shard")) return tp_cmd_make_shard(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return tp_cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "prepare-data")) return tp_cmd_prepare_data(argc - 1, argv + 1);
    if (!strcmp(cmd, "train")) return tp_cmd_train(argc - 1, argv + 1);
    if (!strcmp(cmd, "plot")) return tp_cmd_plot(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate")) return tp_cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return tp_cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "export")) return tp_cmd_export(argc - 1, argv + 1);
    if (!strcmp(cmd, "adapter")) return tp_cmd_adapter(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        char buf[512];
        tp_platform_describe(buf, sizeof buf);
        printf("tptt %s\n%s\n", TPTT_VERSION, buf);
        return 0;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "tptt: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
