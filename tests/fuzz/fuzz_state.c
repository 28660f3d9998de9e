/* fuzz_state.c - libFuzzer harness for the trainer_state.json validator
 * (train/state.h): arbitrary bytes must give TP_OK with values inside the
 * expected ranges, or an error with a one-line message; never a crash, a
 * leak or undefined behaviour (huge numbers, nesting, duplicates). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "train/state.h"

static int64_t epoch_of(const void *ctx, int64_t step) {
    (void)ctx;
    return step / 10;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0;
    static const char *resume = "{\"batch\":{\"global\":4},\"seed\":5}";
    tp_state_expect x = {.dir = "/run/checkpoints/step-00000002", .global_batch = 4, .seq_len = 32,
                         .total_steps = 100, .rows = 40, .seed = 5, .epoch_of = epoch_of, .epoch_ctx = NULL,
                         .data_digest = "xxh3:0123456789abcdef", .resume_json = resume};
    tp_state_info info;
    tp_err err = {0};
    int rc = tp_train_state_check(text, &x, &info, &err);
    if (rc == TP_OK) {
        if (info.step != 2 || info.tokens_seen != 2 * 4 * 32 || info.consecutive_bad_steps < 0 || info.world_size < 0)
            abort();
    } else if (!err.msg[0] || strchr(err.msg, '\n')) {
        abort();
    }
    free(text);
    return 0;
}
