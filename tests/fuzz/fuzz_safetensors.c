/* fuzz_safetensors.c - libFuzzer harness for the safetensors header parser.
 * Any input is a whole file image; the parser must accept or reject it without
 * crashing, leaking or reading outside the buffer. Accepted files are read
 * back through every view so out-of-bounds views would be caught by ASan. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* a private copy: the parser must not rely on anything past size */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    tp_st_file *f = NULL;
    tp_err err = {0};
    if (tp_st_parse("fuzz", buf, size, &f, &err) == TP_OK) {
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < tp_st_count(f); i++) {
            const tp_tensor_view *v = tp_st_at(f, i);
            const uint8_t *p = v->data;
            for (uint64_t k = 0; k < v->nbytes; k++) sink ^= p[k];
            if (tp_st_find(f, v->name) == NULL) abort();
        }
        for (size_t i = 0; i < tp_st_meta_count(f); i++) (void)tp_st_meta_get(f, tp_st_meta_at(f, i)->key);
        (void)sink;
        tp_st_close(f);
    } else if (err.msg[0] == 0) {
        abort(); /* every rejection must say why */
    }
    free(buf);
    return 0;
}
