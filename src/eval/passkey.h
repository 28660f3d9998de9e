/* passkey.h - the synthetic passkey retrieval test (Mohtashami & Jaggi,
 * "Landmark Attention", 2023; used by LongLoRA and most long-context work):
 * a random number hidden at a chosen depth of filler text, asked for at the
 * end. Prompt, in their wording:
 *   "There is an important info hidden inside a lot of irrelevant text. Find
 *    it and memorize them. I will quiz you about the important information
 *    there.\n" + filler x a + "The pass key is K. Remember it. K is the pass
 *    key.\n" + filler x b + "What is the pass key? The pass key is"
 * with filler "The grass is green. The sky is blue. The sun is yellow. Here
 * we go. There and back again.\n" and a + b chosen so the prompt has about
 * the asked number of tokens, a = round(depth * (a + b)). */
#ifndef TPTT_EVAL_PASSKEY_H
#define TPTT_EVAL_PASSKEY_H

#include <stddef.h>
#include <stdint.h>

#include "tok/tokenizer.h"
#include "util/err.h"

/* Token ids of the prompt for a context of about `length` tokens with key
 * hidden at depth (0 = start, 1 = end) into out (BOS as the tokenizer adds). */
int tp_passkey_prompt(tp_tokenizer *tok, int64_t length, double depth, uint32_t key, tp_ids *out, tp_err *err);

/* 1 when the first run of digits in text (n bytes) is exactly the key. */
int tp_passkey_correct(const char *text, size_t n, uint32_t key);

#endif
