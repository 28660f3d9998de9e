/* cli.h - the tptt subcommands. Each returns the process exit code:
 * 0 success, 1 failure (message printed), 2 usage error. */
#ifndef TPTT_CLI_CLI_H
#define TPTT_CLI_CLI_H

#include <stdio.h>

#include "train/config.h"

int tp_cmd_init_model(int argc, char **argv);
int tp_cmd_inspect(int argc, char **argv);
int tp_cmd_dump(int argc, char **argv);
int tp_cmd_make_shard(int argc, char **argv);
int tp_cmd_tokenize(int argc, char **argv);
int tp_cmd_prepare_data(int argc, char **argv);
int tp_cmd_train(int argc, char **argv);
int tp_cmd_plot(int argc, char **argv);
int tp_cmd_generate(int argc, char **argv);
int tp_cmd_eval(int argc, char **argv);
int tp_cmd_export(int argc, char **argv);
int tp_cmd_adapter(int argc, char **argv);

/* Arguments of the config-driven commands (train, prepare-data):
 * "CONFIG.yaml [--set key=value]... [--resume R]" (--resume only when
 * a->resume is non-NULL on entry; it holds the default). */
#define TP_CLI_MAX_SETS 256
typedef struct tp_cli_config_args {
    const char *config;
    const char *sets[TP_CLI_MAX_SETS];
    int nsets;
    const char *resume;
} tp_cli_config_args;
/* Returns -1 to go on, else the exit code: 0 after --help (usage printed to
 * stdout), 2 on a usage error (message or usage on stderr). */
int tp_cli_parse_config_args(int argc, char **argv, const char *cmd, void (*usage)(FILE *), tp_cli_config_args *a);
/* Load a->config into cfg and apply the --set overrides in order. */
int tp_cli_load_config(const tp_cli_config_args *a, tp_train_cfg *cfg, tp_err *err);

/* Print "tptt: <msg>" to stderr and return 1. */
int tp_cli_error(const char *msg);
/* Parse a whole decimal integer in [lo, hi]; 0 on success. */
int tp_cli_int(const char *s, long long lo, long long hi, long long *out);

#endif
