/* cmd_eval.c - `tptt eval perplexity|mmlu`: evaluate a base model or a
 * trained Titan (docs/eval.md). Every mode prints a readable summary on
 * stderr and its JSON report as the last line of stdout (and to --report). */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/eval_common.h"
#include "data/textdata.h"
#include "dist/dist.h"
#include "eval/perplexity.h"
#include "infer/load.h"
#include "util/fsutil.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: [mpirun -np N] tptt eval perplexity (--checkpoint CK | --model DIR) --data FILE [options]\n"
            "       [mpirun -np N] tptt eval mmlu (--checkpoint CK | --model DIR) --data DIR_OR_JSONL [options]\n"
            "       [mpirun -np N] tptt eval passkey (--checkpoint CK | --model DIR) [--max-context N] [options]\n"
            "\n"
            "perplexity: loss and perplexity on a data file of the training formats.\n"
            "  --format auto|tokens|text|alpaca|chat  (auto: token shard by its magic, .txt text, JSONL by its\n"
            "                          first record: instruction -> alpaca, messages -> chat, else text)\n"
            "  --seq-len N (default 512)  --stride S (sliding windows per document; default 0: packed rows)\n"
            "  --micro-batch B (default 1)  --max-rows N  --cache-dir DIR (tokenized data; default\n"
            "                          $TMPDIR/tptt-eval-cache)  --tokenizer DIR\n"
            "mmlu, passkey: see 'tptt eval mmlu --help', 'tptt eval passkey --help'.\n"
            "common: --report FILE.json  --matmul auto|f32|bf16\n");
}

int tp_eval_common_option(int ch, const char *arg, tp_eval_common *c) {
    switch (ch) {
    case 'm': c->load.model = arg; return 1;
    case 'c': c->load.checkpoint = arg; return 1;
    case 'R': c->report = arg; return 1;
    case 'M':
        if (!strcmp(arg, "auto")) c->load.matmul = TP_LOAD_MATMUL_AUTO;
        else if (!strcmp(arg, "f32")) c->load.matmul = TP_LOAD_MATMUL_F32;
        else if (!strcmp(arg, "bf16")) c->load.matmul = TP_LOAD_MATMUL_BF16;
        else {
            fprintf(stderr, "tptt: eval: --matmul: expected auto, f32 or bf16, got '%s'\n", arg);
            return -1;
        }
        return 1;
    default: return 0;
    }
}

int tp_eval_write_report(const tp_dist *d, const tp_eval_common *c, const char *json, tp_err *err) {
    if (d->rank != 0) return TP_OK;
    printf("%s\n", json);
    fflush(stdout);
    if (!c->report) return TP_OK;
    size_t n = strlen(json);
    char *text = malloc(n + 2);
    if (!text) return tp_fail(err, TP_ENOMEM, "out of memory");
    memcpy(text, json, n);
    text[n] = '\n';
    int rc = tp_write_file_atomic(c->report, text, n + 1, err);
    free(text);
    return rc;
}

/* tokens by the shard magic, .txt text, JSONL (or a JSON array) by its first
 * record; only the file's first MiB is read, the data may be large */
static int detect_format(const char *path, char *fmt, size_t n, tp_err *err) {
    int fd = tp_open_regular(path, NULL, err);
    if (fd < 0) return fd;
    size_t cap = (size_t)1 << 20, len = 0;
    char *text = malloc(cap);
    if (!text) {
        close(fd);
        return tp_fail(err, TP_ENOMEM, "out of memory");
    }
    while (len < cap) {
        ssize_t got = read(fd, text + len, cap - len);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        len += (size_t)got;
    }
    close(fd);
    const char *pick = NULL;
    size_t pl = strlen(path);
    if (len >= 8 && !memcmp(text, "TPTTTOK1", 8)) pick = "tokens";
    else if (pl > 4 && !strcmp(path + pl - 4, ".txt")) pick = "text";
    else {
        size_t i = 0;
        while (i < len && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t')) i++;
        if (i < len && text[i] == '[') /* a JSON array source: its first element */
            for (i++; i < len && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t');) i++;
        json_error_t je;
        json_t *j = i < len && text[i] == '{' ? json_loadb(text + i, len - i, JSON_ALLOW_NUL | JSON_DISABLE_EOF_CHECK, &je)
                                              : NULL;
        if (json_is_object(j))
            pick = json_object_get(j, "instruction") ? "alpaca" : json_object_get(j, "messages") ? "chat" : "text";
        json_decref(j);
    }
    free(text);
    if (!pick)
        return tp_fail(err, TP_EFORMAT, "%s: cannot tell the data format (not a token shard, .txt or JSON records); "
                       "pass --format", path);
    snprintf(fmt, n, "%s", pick);
    return TP_OK;
}

static int cmd_perplexity(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"checkpoint", required_argument, 0, 'c'},
        {"report", required_argument, 0, 'R'},     {"matmul", required_argument, 0, 'M'},
        {"data", required_argument, 0, 'd'},       {"format", required_argument, 0, 'f'},
        {"seq-len", required_argument, 0, 'T'},    {"stride", required_argument, 0, 'S'},
        {"micro-batch", required_argument, 0, 'B'}, {"max-rows", required_argument, 0, 'N'},
        {"cache-dir", required_argument, 0, 'C'},  {"tokenizer", required_argument, 0, 'k'},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    tp_eval_common com = {0};
    const char *data = NULL, *format = "auto", *cache = NULL, *tok_dir = NULL;
    long long seq = 512, stride = 0, micro = 1, max_rows = 0;
    int ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        int r = tp_eval_common_option(ch, optarg, &com);
        if (r < 0) return 2;
        if (r) continue;
        long long *dst = NULL, lo = 0, hi = 0;
        const char *name = NULL;
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'd': data = optarg; continue;
        case 'f': format = optarg; continue;
        case 'C': cache = optarg; continue;
        case 'k': tok_dir = optarg; continue;
        case 'T': dst = &seq; lo = 2; hi = 1 << 20; name = "--seq-len"; break;
        case 'S': dst = &stride; lo = 0; hi = 1 << 20; name = "--stride"; break;
        case 'B': dst = &micro; lo = 1; hi = 1 << 16; name = "--micro-batch"; break;
        case 'N': dst = &max_rows; lo = 0; hi = INT64_MAX; name = "--max-rows"; break;
        default:
            fprintf(stderr, "tptt: eval perplexity: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
        if (tp_cli_int(optarg, lo, hi, dst)) {
            fprintf(stderr, "tptt: eval perplexity: %s: expected an integer in [%lld, %lld], got '%s'\n", name, lo, hi,
                    optarg);
            return 2;
        }
    }
    if (optind != argc || !data || (!com.load.model && !com.load.checkpoint)) {
        fprintf(stderr, "tptt: eval perplexity: --data and one of --checkpoint / --model are required\n");
        usage(stderr);
        return 2;
    }
    if (stride > seq) {
        fprintf(stderr, "tptt: eval perplexity: --stride %lld is larger than --seq-len %lld\n", stride, seq);
        return 2;
    }
    static const char *const formats[] = {"auto", "tokens", "text", "alpaca", "chat"};
    int fok = 0;
    for (int i = 0; i < 5; i++) fok |= !strcmp(format, formats[i]);
    if (!fok) {
        fprintf(stderr, "tptt: eval perplexity: --format: expected auto, tokens, text, alpaca or chat, got '%s'\n", format);
        return 2;
    }
    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    tp_titan *ti = NULL;
    tp_tokenizer *tok = NULL;
    char *shard = NULL;
    static tp_train_cfg cfg; /* data.* drive the same tokenization and cache as training */
    tp_train_cfg_default(&cfg);
    int rc = tp_titan_load(&com.load, &ti, &err);
    if (rc == TP_OK && (strlen(ti->base_dir) >= sizeof cfg.model_path || strlen(data) >= sizeof cfg.data.path))
        rc = tp_fail(&err, TP_EINVAL, "eval: a path is longer than %zu bytes", sizeof cfg.model_path - 1);
    if (rc == TP_OK) {
        memcpy(cfg.model_path, ti->base_dir, strlen(ti->base_dir) + 1);
        snprintf(cfg.data.path, sizeof cfg.data.path, "%s", data);
        cfg.data.seq_len = seq;
        if (tok_dir) snprintf(cfg.data.tokenizer, sizeof cfg.data.tokenizer, "%s", tok_dir);
        const char *tmp = getenv("TMPDIR");
        if (cache) snprintf(cfg.data.cache_dir, sizeof cfg.data.cache_dir, "%s", cache);
        else snprintf(cfg.data.cache_dir, sizeof cfg.data.cache_dir, "%s/tptt-eval-cache", tmp && *tmp ? tmp : "/tmp");
        if (!strcmp(format, "auto")) rc = detect_format(data, cfg.data.format, sizeof cfg.data.format, &err);
        else snprintf(cfg.data.format, sizeof cfg.data.format, "%s", format);
    }
    if (rc == TP_OK) rc = tp_train_cfg_check_data(&cfg, &err);
    if (rc == TP_OK && strcmp(cfg.data.format, "tokens")) rc = tp_textdata_tokenizer(&cfg, &tok, &err);
    if (tok) cfg.data.add_eos = tp_tokenizer_eos_id(tok) >= 0; /* as training would, where the tokenizer has one */
    if ((rc = tp_dist_agree(&d, rc, &err)) == TP_OK) rc = tp_textdata_prepare(&cfg, tok, &d, &shard, &err);
    tp_ppl_result res = {0};
    if (rc == TP_OK) {
        if (d.rank == 0) fprintf(stderr, "tptt: eval perplexity: %s\n", ti->desc);
        tp_ppl_opts po = {seq, stride, micro, max_rows, 0, 0};
        rc = tp_eval_perplexity(ti->dec, shard, &po, &d, &res, &err);
    }
    if (rc == TP_OK && res.tokens == 0)
        rc = tp_fail(&err, TP_EINVAL, "%s: no labelled tokens to evaluate (empty data, or every label masked)", data);
    if (rc == TP_OK) {
        double loss = res.loss_sum / (double)res.tokens, ppl = exp(loss);
        if (d.rank == 0)
            fprintf(stderr,
                    "tptt: eval perplexity: loss %.6f, perplexity %.4f over %lld tokens (%lld %s of %lld, %lld documents, "
                    "%d rank%s)\n",
                    loss, ppl, (long long)res.tokens, (long long)res.rows, stride ? "windows" : "rows", (long long)seq,
                    (long long)res.documents, d.world, d.world == 1 ? "" : "s");
        json_t *j = json_object();
        json_object_set_new(j, "mode", json_string("perplexity"));
        json_object_set_new(j, "loss", json_real(loss));
        json_object_set_new(j, "ppl", json_real(ppl));
        json_object_set_new(j, "tokens", json_integer(res.tokens));
        json_object_set_new(j, "documents", json_integer(res.documents));
        json_object_set_new(j, "rows", json_integer(res.rows));
        json_object_set_new(j, "seq_len", json_integer(seq));
        json_object_set_new(j, "stride", json_integer(stride));
        json_object_set_new(j, "data", json_string(data));
        json_object_set_new(j, "format", json_string(cfg.data.format));
        json_object_set_new(j, "model", json_string(ti->desc));
        json_object_set_new(j, "checkpoint", ti->ckpt_dir[0] ? json_string(ti->ckpt_dir) : json_null());
        json_object_set_new(j, "step", json_integer(ti->step));
        json_object_set_new(j, "ranks", json_integer(d.world));
        char *s = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(17));
        json_decref(j);
        rc = s ? tp_eval_write_report(&d, &com, s, &err) : tp_fail(&err, TP_ENOMEM, "out of memory");
        free(s);
    }
    tp_dist_report_failure(&d, rc, &err);
    free(shard);
    if (tok) tp_tokenizer_free(tok);
    tp_titan_free(ti);
    tp_dist_finalize();
    return rc == TP_OK ? 0 : 1;
}

int tp_cmd_eval(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "perplexity")) return cmd_perplexity(argc - 1, argv + 1);
    if (!strcmp(argv[1], "mmlu")) return tp_cmd_eval_mmlu(argc - 1, argv + 1);
    if (!strcmp(argv[1], "passkey")) return tp_cmd_eval_passkey(argc - 1, argv + 1);
    fprintf(stderr, "tptt: eval: unknown mode '%s' (expected perplexity, mmlu or passkey)\n", argv[1]);
    return 2;
}
