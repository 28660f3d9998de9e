/* cmd_prepare_data.c - `tptt prepare-data CONFIG.yaml [--set key=value]...`:
 * the data step of `tptt train` alone (tokenize into the cache, or find the
 * cached shard; eval.path's too), so a large data set can be prepared on
 * many ranks before training; prints the shard paths (docs/data.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "data/textdata.h"
#include "dist/dist.h"
#include "train/config.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: [mpirun -np N] tptt prepare-data CONFIG.yaml [--set key=value]...\n"
            "\n"
            "Runs the data step of `tptt train CONFIG.yaml` alone: for data.format text, alpaca or\n"
            "chat, tokenizes data.path into data.cache_dir (in parallel over the MPI ranks) unless\n"
            "a cached shard for the same source, tokenizer and options exists, and eval.path the\n"
            "same way when it is set. Prints the token shard's path on stdout (then eval.path's\n"
            "shard on a second line). Only the data.* and eval.path keys (and model.path, run.dir\n"
            "for their defaults) are used.\n");
}

int tp_cmd_prepare_data(int argc, char **argv) {
    static tp_cli_config_args a; /* large: keep it off the stack */
    memset(&a, 0, sizeof a);
    int code = tp_cli_parse_config_args(argc, argv, "prepare-data", usage, &a);
    if (code >= 0) return code;
    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    static tp_train_cfg cfg; /* large: keep it off the stack */
    int rc = tp_cli_load_config(&a, &cfg, &err);
    if (rc == TP_OK) rc = tp_train_cfg_check_data(&cfg, &err);
    if (rc != TP_OK) {
        if (d.rank == 0) fprintf(stderr, "tptt: %s\n", err.msg);
        tp_dist_finalize();
        return 2;
    }
    tp_tokenizer *tok = NULL;
    char *shard = NULL;
    if (strcmp(cfg.data.format, "tokens")) rc = tp_textdata_tokenizer(&cfg, &tok, &err);
    char *eval_shard = NULL;
    if ((rc = tp_dist_agree(&d, rc, &err)) == TP_OK) rc = tp_textdata_prepare(&cfg, tok, &d, &shard, &err);
    if (rc == TP_OK) rc = tp_textdata_prepare_eval(&cfg, tok, &d, &eval_shard, &err);
    tp_dist_report_failure(&d, rc, &err);
    if (rc == TP_OK && d.rank == 0) {
        printf("%s\n", shard);
        if (eval_shard) printf("%s\n", eval_shard);
    }
    if (tok) tp_tokenizer_free(tok);
    free(shard);
    free(eval_shard);
    tp_dist_finalize();
    return rc == TP_OK ? 0 : 1;
}
