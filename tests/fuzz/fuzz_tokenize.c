/* fuzz_tokenize.c - libFuzzer harness for the tokenizer pipelines: arbitrary
 * bytes (invalid UTF-8, NUL, special-token strings) are encoded with the
 * SentencePiece-style (Mistral) and byte-level (Qwen3) fixtures and decoded
 * back. Every id must be inside the vocabulary and decode must succeed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "tok/tokenizer.h"

static tp_tokenizer *toks[2];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *names[2] = {"mistral", "qwen3"};
    for (int i = 0; i < 2; i++) {
        char dir[1024];
        tp_err err;
        snprintf(dir, sizeof dir, "%s/tests/fixtures/tokenizers/%s", TPTT_SOURCE_DIR_DEFAULT, names[i]);
        if (tp_tokenizer_load(dir, &toks[i], &err)) {
            fprintf(stderr, "fuzz_tokenize: %s\n", err.msg);
            abort();
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    for (int i = 0; i < 2; i++) {
        tp_ids ids = {0};
        tp_err err = {0};
        tp_strbuf out;
        tp_strbuf_init(&out);
        if (tp_tokenizer_encode(toks[i], (const char *)data, size, i ? 0 : TP_TOK_ADD_SPECIAL, &ids, &err)) abort();
        for (size_t k = 0; k < ids.n; k++)
            if (ids.ids[k] < 0 || ids.ids[k] >= tp_tokenizer_vocab_size(toks[i])) abort();
        if (tp_tokenizer_decode(toks[i], ids.ids, ids.n, i, &out, &err)) abort();
        if (!tp_utf8_valid(out.buf ? out.buf : "", out.len)) abort();
        tp_strbuf_free(&out);
        tp_ids_free(&ids);
    }
    return 0;
}
