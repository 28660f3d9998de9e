/* cmd_train.c - `tptt train CONFIG.yaml [--set key=value]... [--resume auto|none|PATH]`
 * (run under mpirun/srun for several ranks; see docs/train.md). */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "dist/dist.h"
#include "train/config.h"
#include "train/trainer.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: [mpirun -np N] tptt train CONFIG.yaml [--set key=value]... [--resume auto|none|PATH]\n"
            "\n"
            "Fine-tunes the model of CONFIG.yaml (docs/config.md) with LiZA + MaG + LoRA, data parallel\n"
            "over the MPI ranks. --resume auto (default) continues from the newest valid checkpoint in\n"
            "run.dir. Exit status: 0 finished, 3 checkpointed on SIGUSR1/SIGTERM (not finished),\n"
            "1 error, 2 usage or configuration error.\n");
}

int tp_cmd_train(int argc, char **argv) {
    const char *config = NULL, *resume = "auto";
    const char *sets[256];
    int nsets = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--set") && i + 1 < argc) {
            if (nsets == 256) { fprintf(stderr, "tptt: train: too many --set options\n"); return 2; }
            sets[nsets++] = argv[++i];
        } else if (!strncmp(argv[i], "--set=", 6)) {
            if (nsets == 256) { fprintf(stderr, "tptt: train: too many --set options\n"); return 2; }
            sets[nsets++] = argv[i] + 6;
        } else if (!strcmp(argv[i], "--resume") && i + 1 < argc) {
            resume = argv[++i];
        } else if (!strncmp(argv[i], "--resume=", 9)) {
            resume = argv[i] + 9;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "tptt: train: unknown or incomplete option '%s' (see --help)\n", argv[i]);
            return 2;
        } else if (!config) {
            config = argv[i];
        } else {
            fprintf(stderr, "tptt: train: more than one config file given ('%s', '%s')\n", config, argv[i]);
            return 2;
        }
    }
    if (!config) {
        usage(stderr);
        return 2;
    }
    tp_train_install_signals();
    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    static tp_train_cfg cfg; /* large: keep it off the stack */
    int rc = tp_train_cfg_load(config, &cfg, &err);
    for (int i = 0; rc == TP_OK && i < nsets; i++) rc = tp_train_cfg_set(&cfg, sets[i], &err);
    int code;
    if (rc) {
        if (d.rank == 0) fprintf(stderr, "tptt: %s\n", err.msg);
        code = 2;
    } else {
        code = tp_train_run(&cfg, resume, &d);
    }
    tp_dist_finalize();
    return code;
}
