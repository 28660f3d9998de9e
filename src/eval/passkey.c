/* passkey.c - passkey retrieval prompts and scoring (passkey.h). */
#include "eval/passkey.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/fsutil.h"

static const char *const INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and "
                                 "memorize them. I will quiz you about the important information there.\n";
static const char *const FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                                  "back again.\n";
static const char *const QUESTION = "What is the pass key? The pass key is";

static int64_t count_tokens(tp_tokenizer *tok, const char *s, int flags, tp_err *err) {
    tp_ids v = {0};
    int rc = tp_tokenizer_encode(tok, s, strlen(s), flags, &v, err);
    int64_t n = rc ? -1 : (int64_t)v.n;
    tp_ids_free(&v);
    return n;
}

int tp_passkey_prompt(tp_tokenizer *tok, int64_t length, double depth, uint32_t key, tp_ids *out, tp_err *err) {
    char needle[160];
    snprintf(needle, sizeof needle, "The pass key is %u. Remember it. %u is the pass key.\n", key, key);
    int64_t fixed = count_tokens(tok, INTRO, TP_TOK_ADD_SPECIAL, err), nf = count_tokens(tok, FILLER, 0, err),
            nn = count_tokens(tok, needle, 0, err), nq = count_tokens(tok, QUESTION, 0, err);
    if (fixed < 0 || nf < 0 || nn < 0 || nq < 0) return TP_ENOMEM;
    if (nf < 1) return tp_fail(err, TP_EINVAL, "passkey: the filler encodes to no tokens");
    int64_t reps = (length - fixed - nn - nq) / nf;
    if (reps < 0) reps = 0;
    int64_t before = (int64_t)llround(depth * (double)reps);
    tp_strbuf s;
    tp_strbuf_init(&s);
    tp_strbuf_puts(&s, INTRO);
    for (int64_t i = 0; i < reps; i++) {
        if (i == before) tp_strbuf_puts(&s, needle);
        tp_strbuf_puts(&s, FILLER);
    }
    if (before >= reps) tp_strbuf_puts(&s, needle);
    tp_strbuf_puts(&s, QUESTION);
    int rc = s.oom ? tp_fail(err, TP_ENOMEM, "out of memory") : TP_OK;
    if (rc == TP_OK) rc = tp_tokenizer_encode(tok, s.buf, s.len, TP_TOK_ADD_SPECIAL, out, err);
    tp_strbuf_free(&s);
    return rc;
}

int tp_passkey_correct(const char *text, size_t n, uint32_t key) {
    size_t i = 0;
    while (i < n && !(text[i] >= '0' && text[i] <= '9')) i++;
    if (i == n) return 0;
    char want[16];
    int wl = snprintf(want, sizeof want, "%u", key);
    size_t j = i;
    while (j < n && text[j] >= '0' && text[j] <= '9') j++;
    return (int)(j - i) == wl && !memcmp(text + i, want, (size_t)wl);
}
