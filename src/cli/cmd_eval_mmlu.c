/* cmd_eval_mmlu.c - `tptt eval mmlu` (placeholder until the scorer lands). */
#include <stdio.h>

#include "cli/eval_common.h"

int tp_cmd_eval_mmlu(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "tptt: eval mmlu: not built yet\n");
    return 2;
}
