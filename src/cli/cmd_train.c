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
    static tp_cli_config_args a; /* large: keep it off the stack */
    memset(&a, 0, sizeof a);
    a.resume = "auto";
    int code = tp_cli_parse_config_args(argc, argv, "train", usage, &a);
    if (code >= 0) return code;
    tp_train_install_signals();
    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    static tp_train_cfg cfg; /* large: keep it off the stack */
    int rc = tp_cli_load_config(&a, &cfg, &err);
    if (rc) {
        if (d.rank == 0) fprintf(stderr, "tptt: %s\n", err.msg);
        code = 2;
    } else {
        code = tp_train_run(&cfg, a.resume, &d);
    }
    tp_dist_finalize();
    return code;
}
