/* cmd_export.c - `tptt export`: a checkpoint as a merged Hugging Face model,
 * a PEFT adapter, or a Titan directory (docs/export.md). No MPI needed. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "infer/load.h"
#include "train/export.h"
#include "util/fsutil.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt export CKPT_OR_RUN_DIR --out DIR [--format merged|peft|titan] [--dtype bf16|f16|f32]\n"
            "                   [--shard-size 5GB] [--drop-liza] [--base-id ID] [--model BASE_DIR]\n"
            "\n"
            "  merged  base + LoRA folded (W + s*B*A in fp32, stored in --dtype, default the base's), safetensors\n"
            "          shards + index, config.json, tokenizer files: loads with AutoModelForCausalLM\n"
            "  peft    adapter_model.safetensors + adapter_config.json: loads with PeftModel on the base\n"
            "          (base_model_name_or_path: --base-id, default the absolute base path)\n"
            "  titan   merged weights + MaG parameters + config.json (model_type tptt_titan, auto_map) + the\n"
            "          modeling files: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)\n"
            "merged and peft of a checkpoint with LiZA are refused unless --drop-liza (they cannot hold it).\n"
            "DIR must not exist (or be empty); it appears complete or not at all.\n");
}

/* "5GB", "500MB", "1.5GiB", "123" (bytes) */
static int parse_size(const char *s, unsigned long long *out) {
    char *end;
    double x = strtod(s, &end);
    if (end == s || !(x > 0)) return -1;
    double mul = 1;
    if (!strcmp(end, "") || !strcmp(end, "B")) mul = 1;
    else if (!strcmp(end, "KB")) mul = 1e3;
    else if (!strcmp(end, "MB")) mul = 1e6;
    else if (!strcmp(end, "GB")) mul = 1e9;
    else if (!strcmp(end, "KiB")) mul = 1024.0;
    else if (!strcmp(end, "MiB")) mul = 1048576.0;
    else if (!strcmp(end, "GiB")) mul = 1073741824.0;
    else return -1;
    if (x * mul < 1024 || x * mul > 1e15) return -1;
    *out = (unsigned long long)(x * mul);
    return 0;
}

int tp_cmd_export(int argc, char **argv) {
    static const struct option opts[] = {
        {"out", required_argument, 0, 'o'},       {"format", required_argument, 0, 'f'},
        {"dtype", required_argument, 0, 'd'},     {"shard-size", required_argument, 0, 's'},
        {"drop-liza", no_argument, 0, 'D'},       {"base-id", required_argument, 0, 'b'},
        {"model", required_argument, 0, 'm'},     {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *out = NULL, *base_id = NULL, *model = NULL;
    tp_export_opts eo = {TP_EXPORT_MERGED, -1, 0, 0, NULL, 0, NULL};
    unsigned long long shard = 0;
    int ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'o': out = optarg; break;
        case 'b': base_id = optarg; break;
        case 'm': model = optarg; break;
        case 'D': eo.drop_liza = 1; break;
        case 'f':
            if (!strcmp(optarg, "merged")) eo.format = TP_EXPORT_MERGED;
            else if (!strcmp(optarg, "peft")) eo.format = TP_EXPORT_PEFT;
            else if (!strcmp(optarg, "titan")) eo.format = TP_EXPORT_TITAN;
            else { fprintf(stderr, "tptt: export: --format: expected merged, peft or titan, got '%s'\n", optarg); return 2; }
            break;
        case 'd':
            if (!strcmp(optarg, "bf16")) eo.dtype = TP_BF16;
            else if (!strcmp(optarg, "f16")) eo.dtype = TP_F16;
            else if (!strcmp(optarg, "f32")) eo.dtype = TP_F32;
            else { fprintf(stderr, "tptt: export: --dtype: expected bf16, f16 or f32, got '%s'\n", optarg); return 2; }
            break;
        case 's':
            if (parse_size(optarg, &shard)) {
                fprintf(stderr, "tptt: export: --shard-size: expected a size such as 5GB, 500MB or 2GiB (at least 1 KB), got '%s'\n", optarg);
                return 2;
            }
            break;
        default:
            fprintf(stderr, "tptt: export: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
    }
    if (optind != argc - 1 || !out) {
        fprintf(stderr, "tptt: export: expected one CKPT_OR_RUN_DIR and --out DIR\n");
        usage(stderr);
        return 2;
    }
    eo.shard_bytes = shard;
    eo.base_id = base_id;
    tp_err err = {0};
    tp_titan *ti = NULL;
    tp_load_opts lo = {model, argv[optind], TP_LOAD_MATMUL_F32};
    int rc = tp_titan_load(&lo, &ti, &err);
    if (rc == TP_OK && !ti->ckpt_dir[0] && eo.format != TP_EXPORT_MERGED)
        rc = tp_fail(&err, TP_EINVAL, "export: %s is a plain model (no checkpoint): only --format merged applies",
                     argv[optind]);
    tp_strbuf rep;
    tp_strbuf_init(&rep);
    if (rc == TP_OK) {
        eo.step = ti->step;
        eo.source = ti->ckpt_dir[0] ? ti->ckpt_dir : NULL;
        rc = tp_export(ti->hf, ti->dec, &eo, out, &rep, &err);
    }
    if (rc == TP_OK) {
        static const char *const names[] = {"merged", "peft", "titan"};
        printf("exported %s as %s to %s\n%s", ti->desc, names[eo.format], out, rep.buf ? rep.buf : "");
    }
    tp_strbuf_free(&rep);
    tp_titan_free(ti);
    return rc ? tp_cli_error(err.msg) : 0;
}
