/* tokenizer_impl.h - private to src/tok: the component types and the
 * tp_tokenizer struct shared by the loader (tokenizer_load.c: tokenizer.json
 * and tokenizer_config.json into these structs) and the pipelines
 * (tokenizer.c: encode, decode, free). Not an API. */
#ifndef TPTT_TOKENIZER_IMPL_H
#define TPTT_TOKENIZER_IMPL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>

#include "tok/bpe.h"
#include "tok/tokenizer.h"

#define MAX_STEPS 16

/* ---- components ---------------------------------------------------------- */

enum { N_PREPEND, N_REPLACE, N_UNICODE };
enum { P_SPLIT, P_BYTELEVEL, P_METASPACE };
enum { B_ISOLATED, B_REMOVED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };
enum { S_ALWAYS, S_FIRST, S_NEVER };
enum { D_REPLACE, D_BYTEFALLBACK, D_FUSE, D_STRIP, D_BYTELEVEL, D_METASPACE };

typedef struct regex {
    pcre2_code *code;
    pcre2_match_data *md;
} regex;

typedef struct norm_step {
    int kind;
    char *a, *b; /* Prepend: a; Replace: a -> b (a literal unless re.code) */
    size_t na, nb;
    regex re;
    int uopts; /* N_UNICODE: utf8proc options */
} norm_step;

typedef struct pre_step {
    int kind;
    regex re;     /* Split pattern; ByteLevel use_regex pattern */
    int behavior; /* Split */
    int add_prefix_space, use_regex; /* ByteLevel */
    char repl[8];                    /* Metaspace replacement (UTF-8) */
    int scheme, split;               /* Metaspace */
} pre_step;

typedef struct dec_step {
    int kind;
    char *a, *b; /* Replace a -> b; Strip: a = the character */
    size_t na, nb;
    int start, stop; /* Strip */
    int scheme;      /* Metaspace */
    char repl[8];
} dec_step;

typedef struct added_tok {
    char *content;
    size_t len;
    int32_t id;
    int special, lstrip, rstrip, single_word, normalized;
} added_tok;

/* Added tokens of one kind (normalized or not), by first byte, longest first. */
typedef struct matcher {
    const added_tok **tok;
    size_t n;
    uint32_t first[257]; /* tokens with first byte c: tok[first[c] .. first[c+1]) */
} matcher;

struct tp_tokenizer {
    char *path;
    tp_bpe *bpe;
    int byte_level;
    int sp_split; /* split pieces before "▁" after a non-"▁" (proven exact at load) */
    norm_step norm[MAX_STEPS];
    int nnorm;
    pre_step pre[MAX_STEPS];
    int npre;
    dec_step dec[MAX_STEPS];
    int ndec, has_decoder;
    added_tok *added;
    size_t nadded;
    int32_t *added_idx; /* [size]: index into added, or -1 */
    matcher raw_m, norm_m;
    /* id -> token string as written in tokenizer.json (for decode) */
    char *vstr;
    size_t *voff;
    uint32_t *vlen;
    int32_t nv;   /* model ids are < nv */
    int32_t size; /* vocab_size() */
    int32_t bos, eos;
    int add_bos, add_eos;
    uint64_t digest;
    int32_t b2c[256];
    int16_t c2b[512];
    /* work buffers */
    tp_strbuf clean, seg, piece;
    size_t *pieces, pieces_cap, *pieces2, pieces2_cap;
};

/* Length of the UTF-8 sequence a lead byte starts (1 for a stray byte). */
static inline size_t tp_tok_utf8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

/* Code point at s[i] (s[0..n)), its byte length in *len (>= 1); -1 if invalid. */
int32_t tp_tok_cp_at(const char *s, size_t n, size_t i, size_t *len);
/* GPT-2's byte <-> printable character map used by ByteLevel. */
void tp_tok_byte_level_map(int32_t b2c[256], int16_t c2b[512]);
/* Undo the byte map on s[0..n), appending to out; 0 (out unchanged) when a
 * character is outside it. */
int tp_tok_byte_level_unmap(const int16_t c2b[512], const char *s, size_t n, tp_strbuf *out);
/* Compile pat[0..n) (UTF-8, UCP; literal: no metacharacters) with JIT when
 * available; errors name file and where. r is freed by tp_tok_regex_free. */
int tp_tok_regex_compile(regex *r, const char *pat, size_t n, int literal, const char *file, const char *where,
                         tp_err *err);
void tp_tok_regex_free(regex *r);
/* The added token with this id, or NULL. */
const added_tok *tp_tok_added_by_id(const tp_tokenizer *t, int32_t id);

#endif
