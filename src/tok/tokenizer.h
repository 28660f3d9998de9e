/* tokenizer.h - Hugging Face tokenizer.json (BPE) encode and decode.
 *
 * Supported (docs/tokenizer.md): model "BPE" with
 *   - SentencePiece-style pipelines (Mistral, Llama 2): normalizers Prepend,
 *     Replace, NFC/NFKC/NFD/NFKD, Sequence; optional Metaspace pre-tokenizer;
 *     byte_fallback <0xNN> tokens; decoders Replace, ByteFallback, Fuse,
 *     Strip, Metaspace, Sequence;
 *   - byte-level pipelines (Llama 3, Qwen2/3, GPT-2 style): Split (regex,
 *     PCRE2 with Unicode properties + JIT) and ByteLevel pre-tokenizers,
 *     ignore_merges, ByteLevel decoder.
 * Anything else in tokenizer.json (another model type, an unknown normalizer,
 * pre-tokenizer or decoder) is refused at load with a message naming the
 * file and the JSON path of the unsupported component.
 *
 * Added tokens (tokenizer.json "added_tokens") are split out of the raw text
 * before normalisation, leftmost-longest, honouring lstrip/rstrip/single_word;
 * like Hugging Face, special-token strings that appear literally in the text
 * (e.g. "<s>") are matched. The text between them goes through the pipeline.
 *
 * Input text is UTF-8 of any length; invalid sequences are replaced by U+FFFD
 * (one per maximal invalid subpart, as Python/Rust do) before encoding.
 *
 * BOS/EOS come from tokenizer_config.json (bos_token/eos_token, string or
 * {"content": ...}); whether encode adds them follows add_bos_token /
 * add_eos_token when present, else the post_processor's TemplateProcessing
 * "single" template when there is one, else no BOS/EOS is added.
 *
 * A tp_tokenizer is immutable after load except for its encode cache; use one
 * per thread (or serialise calls). */
#ifndef TPTT_TOK_TOKENIZER_H
#define TPTT_TOK_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"
#include "util/fsutil.h"

typedef struct tp_tokenizer tp_tokenizer;

/* Growable id list; zero-initialise, append with encode, free with
 * tp_ids_free. */
typedef struct tp_ids {
    int32_t *ids;
    size_t n, cap;
} tp_ids;
void tp_ids_free(tp_ids *v);
int tp_ids_push(tp_ids *v, int32_t id, tp_err *err);

/* Load DIR/tokenizer.json and, when present, DIR/tokenizer_config.json. DIR
 * may also name a tokenizer.json file directly (then tokenizer_config.json
 * is looked up beside it). */
int tp_tokenizer_load(const char *dir, tp_tokenizer **out, tp_err *err);
/* The same from tokenizer.json text in memory (label names it in errors; no
 * tokenizer_config.json). For the fuzz harness and tests. */
int tp_tokenizer_load_json(const char *label, const char *json, size_t len, tp_tokenizer **out, tp_err *err);
void tp_tokenizer_free(tp_tokenizer *t);

enum {
    TP_TOK_ADD_SPECIAL = 1, /* add BOS/EOS as tokenizer_config.json says */
};

/* Append the ids of text[0..n) to out (text need not be NUL-terminated and
 * may contain NUL bytes). Fails only on allocation failure. */
int tp_tokenizer_encode(tp_tokenizer *t, const char *text, size_t n, int flags, tp_ids *out, tp_err *err);

/* Append the decoded text of ids to out. skip_special drops added tokens
 * marked special. An id outside the vocabulary is an error naming it. */
int tp_tokenizer_decode(const tp_tokenizer *t, const int32_t *ids, size_t n, int skip_special, tp_strbuf *out,
                        tp_err *err);

/* Largest id + 1 over the model vocabulary and the added tokens. */
int32_t tp_tokenizer_vocab_size(const tp_tokenizer *t);
/* Id of an exact token string (added tokens first, then the vocabulary;
 * vocabulary strings as written in tokenizer.json), or -1. */
int32_t tp_tokenizer_token_id(const tp_tokenizer *t, const char *token);
/* BOS / EOS ids from tokenizer_config.json (-1 when none), and whether
 * TP_TOK_ADD_SPECIAL adds them. */
int32_t tp_tokenizer_bos_id(const tp_tokenizer *t);
int32_t tp_tokenizer_eos_id(const tp_tokenizer *t);
int tp_tokenizer_adds_bos(const tp_tokenizer *t);
int tp_tokenizer_adds_eos(const tp_tokenizer *t);
/* XXH64 over tokenizer.json and tokenizer_config.json bytes: identifies the
 * tokenizer for cache invalidation. */
uint64_t tp_tokenizer_digest(const tp_tokenizer *t);
/* "bpe-bytelevel" or "bpe-sentencepiece" (for logs). */
const char *tp_tokenizer_kind(const tp_tokenizer *t);

/* Write DIR/tokenizer.json for a byte-level vocabulary (id = byte value,
 * 256 ids; ByteLevel pre-tokenizer and decoder, BPE without merges). */
int tp_write_byte_tokenizer(const char *dir, tp_err *err);

/* Replace invalid UTF-8 in s[0..n) by U+FFFD (maximal subparts); appends the
 * result to out. Returns the number of replacements. */
size_t tp_utf8_sanitize(const char *s, size_t n, tp_strbuf *out);
/* 1 if s[0..n) is valid UTF-8 (no surrogates, no overlongs). */
int tp_utf8_valid(const char *s, size_t n);

#endif
