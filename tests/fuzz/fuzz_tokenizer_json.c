/* fuzz_tokenizer_json.c - libFuzzer harness for the tokenizer.json loader:
 * arbitrary bytes (broken JSON, invalid UTF-8, huge or sparse ids, bad
 * regexes, deep nesting) must load or fail with a one-line message, never
 * crash, leak or allocate by an id read from the input. A tokenizer that
 * loads must encode and decode a short text with ids inside its vocabulary. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tok/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tp_tokenizer *t = NULL;
    tp_err err = {0};
    if (tp_tokenizer_load_json("fuzz/tokenizer.json", (const char *)data, size, &t, &err) != TP_OK) {
        if (!err.msg[0] || strchr(err.msg, '\n')) abort();
        return 0;
    }
    tp_ids ids = {0};
    if (tp_tokenizer_encode(t, "hello world ab", 14, TP_TOK_ADD_SPECIAL, &ids, &err) == TP_OK) {
        for (size_t k = 0; k < ids.n; k++)
            if (ids.ids[k] < 0 || ids.ids[k] >= tp_tokenizer_vocab_size(t)) abort();
        tp_strbuf out;
        tp_strbuf_init(&out);
        (void)tp_tokenizer_decode(t, ids.ids, ids.n, 0, &out, &err);
        tp_strbuf_free(&out);
    }
    tp_ids_free(&ids);
    tp_tokenizer_free(t);
    return 0;
}
