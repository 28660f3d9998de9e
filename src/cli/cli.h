/* cli.h - the tptt subcommands. Each returns the process exit code:
 * 0 success, 1 failure (message printed), 2 usage error. */
#ifndef TPTT_CLI_CLI_H
#define TPTT_CLI_CLI_H

int tp_cmd_init_model(int argc, char **argv);
int tp_cmd_inspect(int argc, char **argv);
int tp_cmd_dump(int argc, char **argv);
int tp_cmd_make_shard(int argc, char **argv);
int tp_cmd_tokenize(int argc, char **argv);
int tp_cmd_prepare_data(int argc, char **argv);
int tp_cmd_train(int argc, char **argv);
int tp_cmd_plot(int argc, char **argv);

/* Print "tptt: <msg>" to stderr and return 1. */
int tp_cli_error(const char *msg);
/* Parse a whole decimal integer in [lo, hi]; 0 on success. */
int tp_cli_int(const char *s, long long lo, long long hi, long long *out);

#endif
