/* fuzz_config.c - libFuzzer harness for the config.json parser. */
#include <stdint.h>
#include <stdlib.h>

#include "model/hf_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tp_model_config c;
    tp_err err = {0};
    if (tp_model_config_parse("fuzz", (const char *)data, size, &c, &err) == TP_OK) {
        /* an accepted config must describe a consistent weight list */
        if (c.layers > 64) return 0; /* keep the allocation small */
        size_t n = tp_model_weight_count(&c);
        tp_weight_desc *w = calloc(n, sizeof *w);
        if (!w) return 0;
        tp_model_weights(&c, w);
        free(w);
    } else if (err.msg[0] == 0) {
        abort();
    }
    return 0;
}
