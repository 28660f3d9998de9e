/* eval_common.h - options and the report shared by the `tptt eval` modes. */
#ifndef TPTT_CLI_EVAL_COMMON_H
#define TPTT_CLI_EVAL_COMMON_H

#include "dist/dist.h"
#include "infer/load.h"
#include "util/err.h"

typedef struct tp_eval_common {
    tp_load_opts load;
    const char *report; /* --report FILE.json or NULL */
} tp_eval_common;

/* getopt codes 'm' --model, 'c' --checkpoint, 'R' --report, 'M' --matmul:
 * returns 1 when ch was one of them, 0 when not, -1 on a usage error
 * (message printed). */
int tp_eval_common_option(int ch, const char *arg, tp_eval_common *c);
/* Rank 0: the JSON report as the last line of stdout and to --report. */
int tp_eval_write_report(const tp_dist *d, const tp_eval_common *c, const char *json, tp_err *err);

int tp_cmd_eval_mmlu(int argc, char **argv);
int tp_cmd_eval_passkey(int argc, char **argv);

#endif
