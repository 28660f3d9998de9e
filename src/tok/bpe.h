/* bpe.h - the BPE model of a tokenizer.json: vocabulary, merge ranks, and
 * the merge loop of Hugging Face tokenizers (lowest rank first, leftmost on
 * ties), with a bounded cache of recently encoded pieces.
 *
 * Token strings are byte strings here. For byte-level tokenizers the loader
 * passes the raw bytes a vocabulary entry stands for (GPT-2's byte-to-char
 * map undone), so encoding works on the text's bytes directly; for
 * SentencePiece-style ones the entries are UTF-8 as written ("▁" included).
 *
 * Ownership: tp_bpe owns copies of every string it is given. Not
 * thread-safe (the cache). */
#ifndef TPTT_TOK_BPE_H
#define TPTT_TOK_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "tok/tokenizer.h"
#include "util/err.h"

typedef struct tp_bpe tp_bpe;

typedef struct tp_bpe_opts {
    int byte_level;     /* initial symbols are single bytes (else UTF-8 characters) */
    int byte_fallback;  /* unknown characters become <0xNN> tokens */
    int ignore_merges;  /* a piece that is itself a vocabulary entry is one token */
    int fuse_unk;       /* consecutive unknown characters give one unk token */
    int32_t unk_id;     /* -1: none (an unknown character is then dropped, as HF does) */
} tp_bpe_opts;

/* Create an empty model; add every vocabulary entry with tp_bpe_add_token,
 * then every merge in rank order with tp_bpe_add_merge, then tp_bpe_finish. */
int tp_bpe_create(const tp_bpe_opts *o, size_t vocab_hint, size_t merges_hint, tp_bpe **out, tp_err *err);
void tp_bpe_free(tp_bpe *b);
/* Fails (TP_EFORMAT) on a repeated string or id. */
int tp_bpe_add_token(tp_bpe *b, const char *s, size_t n, int32_t id, tp_err *err);
/* Merge of the entries a and b (byte strings as above), rank = call order.
 * Fails when either side or their concatenation is not in the vocabulary. */
int tp_bpe_add_merge(tp_bpe *b, const char *a, size_t na, const char *bb, size_t nb, tp_err *err);
/* Byte tables, unk checks; after this the model only encodes. */
int tp_bpe_finish(tp_bpe *b, tp_err *err);

/* Id of a string, or -1. */
int32_t tp_bpe_lookup(const tp_bpe *b, const char *s, size_t n);
/* 1 if some vocabulary entry contains byte string pat at an offset > 0 right
 * after a byte not starting pat (used to prove that splitting before pat is
 * exact). */
int tp_bpe_any_token_has_inner(const tp_bpe *b, const char *pat, size_t n);

/* Append the ids of one pre-tokenized piece s[0..n) to out. */
int tp_bpe_encode_piece(tp_bpe *b, const char *s, size_t n, tp_ids *out, tp_err *err);

#endif
