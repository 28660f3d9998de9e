/* tokenizer.c - tokenizer.json loading and the encode/decode pipelines
 * (tokenizer.h). The behaviour of each component follows Hugging Face
 * tokenizers; docs/tokenizer.md lists what is supported and the choices made. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tok/tokenizer.h"

#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>
#define XXH_STATIC_LINKING_ONLY /* XXH64_state_t on the stack */
#include <xxhash.h>

#include "tok/bpe.h"

#define MAX_STEPS 16
#define TOKENIZER_JSON_LIMIT (1ull << 30)

/* ---- ids ---------------------------------------------------------------- */

void tp_ids_free(tp_ids *v) {
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

int tp_ids_push(tp_ids *v, int32_t id, tp_err *err) {
    if (v->n == v->cap) {
        size_t c = v->cap ? v->cap * 2 : 256;
        int32_t *p = realloc(v->ids, c * sizeof *p);
        if (!p) return tp_fail(err, TP_ENOMEM, "out of memory (%zu token ids)", c);
        v->ids = p;
        v->cap = c;
    }
    v->ids[v->n++] = id;
    return TP_OK;
}

/* ---- UTF-8 ------------------------------------------------------------------ */

/* Length of the valid sequence at s[0..n), or 0 with *bad = bytes of the
 * maximal invalid subpart (Unicode 3.9 / W3C "substitution of maximal
 * subparts", what Python and Rust's from_utf8_lossy do). */
static size_t utf8_step(const unsigned char *s, size_t n, size_t *bad) {
    unsigned c = s[0];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        *bad = 1;
        return 0;
    }
    size_t i = 1;
    for (; i <= need; i++) {
        if (i >= n) break;
        unsigned x = s[i];
        if (i == 1 ? (x < lo || x > hi) : (x < 0x80 || x > 0xBF)) break;
    }
    if (i == need + 1) return i;
    *bad = i;
    return 0;
}

int tp_utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0, bad; i < n;) {
        size_t k = utf8_step(p + i, n - i, &bad);
        if (!k) return 0;
        i += k;
    }
    return 1;
}

size_t tp_utf8_sanitize(const char *s, size_t n, tp_strbuf *out) {
    const unsigned char *p = (const unsigned char *)s;
    size_t reps = 0, run = 0, i = 0, bad;
    while (i < n) {
        size_t k = utf8_step(p + i, n - i, &bad);
        if (k) {
            i += k;
            continue;
        }
        tp_strbuf_putn(out, s + run, i - run);
        tp_strbuf_puts(out, "\xEF\xBF\xBD");
        reps++;
        i += bad;
        run = i;
    }
    tp_strbuf_putn(out, s + run, n - run);
    return reps;
}

static size_t utf8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

static int is_space_cp(int32_t c) {
    if (c == ' ' || (c >= 9 && c <= 13) || c == 0x85) return 1;
    if (c < 0x80) return 0;
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ZS || k == UTF8PROC_CATEGORY_ZL || k == UTF8PROC_CATEGORY_ZP;
}

static int is_word_cp(int32_t c) {
    if (c == '_') return 1;
    utf8proc_category_t k = utf8proc_category(c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) ||
           (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
}

/* Code point ending at s[end) (s valid UTF-8), and its start. */
static int32_t cp_before(const char *s, size_t end, size_t *start) {
    size_t i = end;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) i--;
    if (i > 0) i--;
    utf8proc_int32_t c = -1;
    utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(end - i), &c);
    *start = i;
    return c;
}

static int32_t cp_at(const char *s, size_t n, size_t i, size_t *len) {
    utf8proc_int32_t c = -1;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &c);
    *len = k > 0 ? (size_t)k : 1;
    return c;
}

/* GPT-2's byte <-> printable character map used by ByteLevel. */
static void byte_level_map(int32_t b2c[256], int16_t c2b[512]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        b2c[b] = keep ? b : 256 + n++;
    }
    for (int c = 0; c < 512; c++) c2b[c] = -1;
    for (int b = 0; b < 256; b++) c2b[b2c[b]] = (int16_t)b;
}

/* Undo the byte map on s[0..n); 0 when a character is outside it. */
static int byte_level_unmap(const int16_t c2b[512], const char *s, size_t n, tp_strbuf *out) {
    size_t start = out->len;
    for (size_t i = 0, k; i < n; i += k) {
        int32_t c = cp_at(s, n, i, &k);
        if (c < 0 || c >= 512 || c2b[c] < 0) {
            out->len = start;
            if (out->buf) out->buf[start] = 0;
            return 0;
        }
        char b = (char)c2b[c];
        tp_strbuf_putn(out, &b, 1);
    }
    return 1;
}

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

static int regex_compile(regex *r, const char *pat, size_t n, int literal, const char *file, const char *where,
                         tp_err *err) {
    int ec;
    PCRE2_SIZE eo;
    r->code = pcre2_compile((PCRE2_SPTR)pat, n, PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &ec, &eo, NULL);
    if (!r->code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return tp_fail(err, TP_EUNSUP, "%s: %s: cannot compile the regex at offset %zu: %s", file, where, (size_t)eo,
                       (char *)msg);
    }
    pcre2_jit_compile(r->code, PCRE2_JIT_COMPLETE); /* without JIT it still works, slower */
    r->md = pcre2_match_data_create_from_pattern(r->code, NULL);
    if (!r->md) return tp_fail(err, TP_ENOMEM, "out of memory");
    return TP_OK;
}

static void regex_free(regex *r) {
    if (r->md) pcre2_match_data_free(r->md);
    if (r->code) pcre2_code_free(r->code);
}

/* Next match in s[0..n) at or after *pos: 1 and its range, 0 when none, -1
 * when PCRE2 gives up (a resource limit) - never silently "no match", which
 * would change the tokens. Empty matches are skipped (they delimit nothing). */
static int regex_next(regex *r, const char *s, size_t n, size_t *pos, size_t *ms, size_t *me) {
    while (*pos <= n) {
        int rc = pcre2_match(r->code, (PCRE2_SPTR)s, n, *pos, PCRE2_NO_UTF_CHECK, r->md, NULL);
        if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) /* e.g. the JIT stack: the interpreter uses the heap */
            rc = pcre2_match(r->code, (PCRE2_SPTR)s, n, *pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, r->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) return 0;
        if (rc < 0) return -1;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(r->md);
        if (ov[1] > ov[0]) {
            *ms = ov[0], *me = ov[1];
            *pos = ov[1];
            return 1;
        }
        if (ov[0] >= n) return 0;
        *pos = ov[0] + utf8_len((unsigned char)s[ov[0]]);
    }
    return 0;
}

void tp_tokenizer_free(tp_tokenizer *t) {
    if (!t) return;
    tp_bpe_free(t->bpe);
    for (int i = 0; i < t->nnorm; i++) {
        free(t->norm[i].a), free(t->norm[i].b);
        regex_free(&t->norm[i].re);
    }
    for (int i = 0; i < t->npre; i++) regex_free(&t->pre[i].re);
    for (int i = 0; i < t->ndec; i++) free(t->dec[i].a), free(t->dec[i].b);
    for (size_t i = 0; i < t->nadded; i++) free(t->added[i].content);
    free(t->added);
    free(t->added_idx);
    free(t->raw_m.tok);
    free(t->norm_m.tok);
    free(t->vstr);
    free(t->voff);
    free(t->vlen);
    tp_strbuf_free(&t->clean);
    tp_strbuf_free(&t->seg);
    tp_strbuf_free(&t->piece);
    free(t->pieces);
    free(t->pieces2);
    free(t->path);
    free(t);
}

/* ---- loading ---------------------------------------------------------------- */

/* cJSON makes ~1M small allocations for a 150k-token tokenizer.json; they all
 * die together, so during a load cJSON allocates from an arena instead (10x
 * fewer malloc calls; under ASan with full unwinding, 1.5 s instead of 30 s).
 * The hooks are process-global: loading is not thread-safe. */
typedef struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    max_align_t data[];
} arena_block;
static arena_block *json_arena;

static void *arena_alloc(size_t n) {
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    arena_block *b = json_arena;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > (1u << 18) ? n : (1u << 20);
        b = malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->cap = cap, b->used = 0;
        if (json_arena && n > (1u << 18)) { /* keep filling the current block */
            b->next = json_arena->next;
            json_arena->next = b;
        } else {
            b->next = json_arena;
            json_arena = b;
        }
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    return p;
}

static void arena_free_one(void *p) { (void)p; }

static void arena_begin(void) {
    cJSON_Hooks h = {arena_alloc, arena_free_one};
    cJSON_InitHooks(&h);
}

static void arena_end(void) {
    cJSON_InitHooks(NULL);
    while (json_arena) {
        arena_block *n = json_arena->next;
        free(json_arena);
        json_arena = n;
    }
}

typedef struct loader {
    tp_tokenizer *t;
    const char *file;
    tp_err *err;
} loader;

static const char *jtype(const cJSON *o) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(ty) ? ty->valuestring : NULL;
}

static int bad(loader *L, const char *where, const char *what) {
    return tp_fail(L->err, TP_EFORMAT, "%s: %s: %s", L->file, where, what);
}

static int unsupported(loader *L, const char *where, const char *type) {
    return tp_fail(L->err, TP_EUNSUP,
                   "%s: %s: type '%s' is not supported (tptt supports BPE tokenizers: SentencePiece-style with "
                   "byte fallback and byte-level with Split/ByteLevel; see docs/tokenizer.md)",
                   L->file, where, type ? type : "(missing)");
}

static int get_bool(const cJSON *o, const char *k, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

static char *dup_str(loader *L, const char *s, size_t *n) {
    *n = strlen(s);
    char *d = malloc(*n + 1);
    if (!d) tp_fail(L->err, TP_ENOMEM, "out of memory");
    else memcpy(d, s, *n + 1);
    return d;
}

/* {"String": s} or {"Regex": r}: literal / regex text. */
static int pattern_of(loader *L, const cJSON *o, const char *where, const char **pat, int *literal) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "pattern");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(p, "String"), *r = cJSON_GetObjectItemCaseSensitive(p, "Regex");
    if (cJSON_IsString(s)) *pat = s->valuestring, *literal = 1;
    else if (cJSON_IsString(r)) *pat = r->valuestring, *literal = 0;
    else return bad(L, where, "expected \"pattern\": {\"String\": ...} or {\"Regex\": ...}");
    return TP_OK;
}

static int scheme_of(loader *L, const cJSON *o, const char *where, int *scheme) {
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "prepend_scheme");
    if (!s) {
        *scheme = get_bool(o, "add_prefix_space", 1) ? S_ALWAYS : S_NEVER;
        return TP_OK;
    }
    if (!cJSON_IsString(s)) return bad(L, where, "prepend_scheme: expected always, first or never");
    if (!strcmp(s->valuestring, "always")) *scheme = S_ALWAYS;
    else if (!strcmp(s->valuestring, "first")) *scheme = S_FIRST;
    else if (!strcmp(s->valuestring, "never")) *scheme = S_NEVER;
    else return bad(L, where, "prepend_scheme: expected always, first or never");
    return TP_OK;
}

static int replacement_of(loader *L, const cJSON *o, const char *where, char repl[8]) {
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(o, "replacement");
    if (!cJSON_IsString(r) || !r->valuestring[0] || strlen(r->valuestring) >= 8 ||
        utf8_len((unsigned char)r->valuestring[0]) != strlen(r->valuestring))
        return bad(L, where, "replacement: expected one character");
    snprintf(repl, 8, "%s", r->valuestring);
    return TP_OK;
}

/* A "Sequence" component: load every element of its array `key` with fn,
 * naming each by its JSON path. */
static int load_sequence(loader *L, const cJSON *o, const char *where, const char *key,
                         int (*fn)(loader *, const cJSON *, const char *)) {
    const cJSON *seq = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsArray(seq)) {
        char what[64];
        snprintf(what, sizeof what, "Sequence without \"%s\" array", key);
        return bad(L, where, what);
    }
    int i = 0;
    for (const cJSON *e = seq->child; e; e = e->next, i++) {
        char w[256];
        snprintf(w, sizeof w, "%s.%s[%d]", where, key, i);
        int rc = fn(L, e, w);
        if (rc) return rc;
    }
    return TP_OK;
}

static int load_normalizer(loader *L, const cJSON *o, const char *where) {
    tp_tokenizer *t = L->t;
    if (!o || cJSON_IsNull(o)) return TP_OK;
    const char *ty = jtype(o);
    if (ty && !strcmp(ty, "Sequence")) return load_sequence(L, o, where, "normalizers", load_normalizer);
    if (t->nnorm == MAX_STEPS) return bad(L, where, "too many normalizers");
    norm_step *s = &t->norm[t->nnorm];
    memset(s, 0, sizeof *s);
    t->nnorm++; /* counted before anything is allocated, so the free path sees it on every error */
    if (ty && !strcmp(ty, "Prepend")) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "prepend");
        if (!cJSON_IsString(p)) return bad(L, where, "Prepend: expected a \"prepend\" string");
        s->kind = N_PREPEND;
        if (!(s->a = dup_str(L, p->valuestring, &s->na))) return TP_ENOMEM;
    } else if (ty && !strcmp(ty, "Replace")) {
        const char *pat;
        int lit, rc;
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "content");
        if ((rc = pattern_of(L, o, where, &pat, &lit))) return rc;
        if (!cJSON_IsString(c)) return bad(L, where, "Replace: expected a \"content\" string");
        s->kind = N_REPLACE;
        if (!(s->a = dup_str(L, pat, &s->na)) || !(s->b = dup_str(L, c->valuestring, &s->nb))) return TP_ENOMEM;
        if (!lit && (rc = regex_compile(&s->re, pat, s->na, 0, L->file, where, L->err))) return rc;
        if (lit && !s->na) return bad(L, where, "Replace: empty pattern");
    } else if (ty && (!strcmp(ty, "NFC") || !strcmp(ty, "NFD") || !strcmp(ty, "NFKC") || !strcmp(ty, "NFKD"))) {
        s->kind = N_UNICODE;
        s->uopts = UTF8PROC_STABLE;
        s->uopts |= strchr(ty + 2, 'C') ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
        if (ty[2] == 'K') s->uopts |= UTF8PROC_COMPAT;
    } else {
        return unsupported(L, where, ty);
    }
    return TP_OK;
}

static const char *GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pre(loader *L, const cJSON *o, const char *where) {
    tp_tokenizer *t = L->t;
    if (!o || cJSON_IsNull(o)) return TP_OK;
    const char *ty = jtype(o);
    if (ty && !strcmp(ty, "Sequence")) return load_sequence(L, o, where, "pretokenizers", load_pre);
    if (t->npre == MAX_STEPS) return bad(L, where, "too many pre-tokenizers");
    if (t->npre && t->pre[t->npre - 1].kind == P_BYTELEVEL)
        return bad(L, where, "a pre-tokenizer after ByteLevel is not supported");
    pre_step *s = &t->pre[t->npre];
    memset(s, 0, sizeof *s);
    int rc;
    if (ty && !strcmp(ty, "Split")) {
        const char *pat;
        int lit;
        if ((rc = pattern_of(L, o, where, &pat, &lit))) return rc;
        if (get_bool(o, "invert", 0)) return bad(L, where, "Split with invert: true is not supported");
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(o, "behavior");
        const char *bs = cJSON_IsString(b) ? b->valuestring : "";
        if (!strcmp(bs, "Isolated")) s->behavior = B_ISOLATED;
        else if (!strcmp(bs, "Removed")) s->behavior = B_REMOVED;
        else if (!strcmp(bs, "MergedWithPrevious")) s->behavior = B_MERGED_PREV;
        else if (!strcmp(bs, "MergedWithNext")) s->behavior = B_MERGED_NEXT;
        else if (!strcmp(bs, "Contiguous")) s->behavior = B_CONTIGUOUS;
        else return bad(L, where, "behavior: expected Isolated, Removed, MergedWithPrevious, MergedWithNext or Contiguous");
        s->kind = P_SPLIT;
        t->npre++; /* counted before compiling so the free path sees it */
        return regex_compile(&s->re, pat, strlen(pat), lit, L->file, where, L->err);
    }
    if (ty && !strcmp(ty, "ByteLevel")) {
        s->kind = P_BYTELEVEL;
        s->add_prefix_space = get_bool(o, "add_prefix_space", 1);
        s->use_regex = get_bool(o, "use_regex", 1);
        t->npre++;
        t->byte_level = 1;
        return s->use_regex ? regex_compile(&s->re, GPT2_REGEX, strlen(GPT2_REGEX), 0, L->file, where, L->err) : TP_OK;
    }
    if (ty && !strcmp(ty, "Metaspace")) {
        s->kind = P_METASPACE;
        if ((rc = replacement_of(L, o, where, s->repl)) || (rc = scheme_of(L, o, where, &s->scheme))) return rc;
        s->split = get_bool(o, "split", 1);
        t->npre++;
        return TP_OK;
    }
    return unsupported(L, where, ty);
}

static int load_decoder(loader *L, const cJSON *o, const char *where) {
    tp_tokenizer *t = L->t;
    if (!o || cJSON_IsNull(o)) return TP_OK;
    t->has_decoder = 1;
    const char *ty = jtype(o);
    int rc;
    if (ty && !strcmp(ty, "Sequence")) return load_sequence(L, o, where, "decoders", load_decoder);
    if (t->ndec == MAX_STEPS) return bad(L, where, "too many decoders");
    dec_step *s = &t->dec[t->ndec];
    memset(s, 0, sizeof *s);
    t->ndec++; /* counted before anything is allocated, so the free path sees it on every error */
    if (ty && !strcmp(ty, "Replace")) {
        const char *pat;
        int lit;
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "content");
        if ((rc = pattern_of(L, o, where, &pat, &lit))) return rc;
        if (!lit) return bad(L, where, "Replace decoder with a Regex pattern is not supported");
        if (!cJSON_IsString(c) || !pat[0]) return bad(L, where, "Replace: expected a pattern and a \"content\" string");
        s->kind = D_REPLACE;
        if (!(s->a = dup_str(L, pat, &s->na)) || !(s->b = dup_str(L, c->valuestring, &s->nb))) return TP_ENOMEM;
    } else if (ty && !strcmp(ty, "ByteFallback")) {
        s->kind = D_BYTEFALLBACK;
    } else if (ty && !strcmp(ty, "Fuse")) {
        s->kind = D_FUSE;
    } else if (ty && !strcmp(ty, "Strip")) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "content");
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "start"), *b = cJSON_GetObjectItemCaseSensitive(o, "stop");
        if (!cJSON_IsString(c) || utf8_len((unsigned char)c->valuestring[0]) != strlen(c->valuestring) ||
            !cJSON_IsNumber(a) || !cJSON_IsNumber(b) || a->valuedouble < 0 || b->valuedouble < 0 ||
            a->valuedouble > 1e6 || b->valuedouble > 1e6)
            return bad(L, where, "Strip: expected one-character \"content\" and non-negative \"start\", \"stop\"");
        s->kind = D_STRIP;
        if (!(s->a = dup_str(L, c->valuestring, &s->na))) return TP_ENOMEM;
        s->start = (int)a->valuedouble;
        s->stop = (int)b->valuedouble;
    } else if (ty && !strcmp(ty, "ByteLevel")) {
        s->kind = D_BYTELEVEL;
    } else if (ty && !strcmp(ty, "Metaspace")) {
        s->kind = D_METASPACE;
        if ((rc = replacement_of(L, o, where, s->repl)) || (rc = scheme_of(L, o, where, &s->scheme))) return rc;
    } else {
        return unsupported(L, where, ty);
    }
    return TP_OK;
}

/* Vocabulary string of a model token, as given to the BPE model: raw bytes
 * for byte-level tokenizers (0 when a character is outside the byte map). */
static int model_bytes(tp_tokenizer *t, const char *s, tp_strbuf *tmp) {
    tmp->len = 0;
    if (!t->byte_level) {
        tp_strbuf_puts(tmp, s);
        return 1;
    }
    return byte_level_unmap(t->c2b, s, strlen(s), tmp);
}

/* Largest id + 1 accepted for n entries: dense ids with room for gaps. */
#define ID_SLACK(n) (2 * (int64_t)(n) + 1024)

static int keep_vstr(loader *L, int32_t id, const char *s, tp_strbuf *arena) {
    tp_tokenizer *t = L->t;
    if (id >= t->nv) return bad(L, "model.vocab", "token id beyond the vocabulary size");
    t->voff[id] = arena->len;
    t->vlen[id] = (uint32_t)strlen(s);
    tp_strbuf_puts(arena, s);
    return TP_OK;
}

static int load_model(loader *L, const cJSON *m) {
    tp_tokenizer *t = L->t;
    const char *ty = jtype(m);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab"),
                *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!ty && cJSON_IsArray(merges)) ty = "BPE";
    if (!ty || strcmp(ty, "BPE")) return unsupported(L, "model", ty);
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return bad(L, "model", "BPE model needs a \"vocab\" object and a \"merges\" array");
    const cJSON *drop = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (cJSON_IsNumber(drop) && drop->valuedouble != 0)
        return bad(L, "model.dropout", "BPE dropout is not supported (training data must be deterministic)");
    const char *ks[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, ks[i]);
        if (cJSON_IsString(v) && v->valuestring[0]) {
            char w[64];
            snprintf(w, sizeof w, "model.%s", ks[i]);
            return bad(L, w, "a non-empty value is not supported");
        }
    }
    int32_t maxid = -1;
    size_t nvocab = 0;
    for (const cJSON *e = vocab->child; e; e = e->next, nvocab++) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 2e9 || e->valuedouble != (int32_t)e->valuedouble)
            return bad(L, "model.vocab", "expected non-negative integer ids");
        if ((int32_t)e->valuedouble > maxid) maxid = (int32_t)e->valuedouble;
    }
    /* tables are indexed by id: a sparse id far beyond the number of entries
     * would make every rank allocate for ids that do not exist */
    if ((int64_t)maxid >= ID_SLACK(nvocab)) {
        char why[160];
        snprintf(why, sizeof why, "token id %ld with only %zu entries (ids must be below %lld)", (long)maxid, nvocab,
                 (long long)ID_SLACK(nvocab));
        return bad(L, "model.vocab", why);
    }
    t->nv = maxid + 1;
    t->voff = calloc((size_t)t->nv + 1, sizeof *t->voff);
    t->vlen = calloc((size_t)t->nv + 1, sizeof *t->vlen);
    if (!t->voff || !t->vlen) return tp_fail(L->err, TP_ENOMEM, "out of memory");
    for (int32_t i = 0; i < t->nv; i++) t->voff[i] = SIZE_MAX;
    tp_bpe_opts o = {.byte_level = t->byte_level,
                     .byte_fallback = get_bool(m, "byte_fallback", 0),
                     .ignore_merges = get_bool(m, "ignore_merges", 0),
                     .fuse_unk = get_bool(m, "fuse_unk", 0),
                     .unk_id = -1};
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(m, "unk_token");
    if (cJSON_IsString(unk)) {
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(vocab, unk->valuestring);
        if (!cJSON_IsNumber(u)) return bad(L, "model.unk_token", "not in the vocabulary");
        o.unk_id = (int32_t)u->valuedouble;
    }
    int rc = tp_bpe_create(&o, nvocab, (size_t)cJSON_GetArraySize(merges), &t->bpe, L->err);
    if (rc) return rc;
    tp_strbuf tmp, arena;
    tp_strbuf_init(&tmp);
    tp_strbuf_init(&arena);
    for (const cJSON *e = vocab->child; e && !rc; e = e->next) {
        int32_t id = (int32_t)e->valuedouble;
        if ((rc = keep_vstr(L, id, e->string, &arena))) break;
        /* a byte-level entry outside the byte map can never be produced */
        if (model_bytes(t, e->string, &tmp) && tmp.len && (rc = tp_bpe_add_token(t->bpe, tmp.buf, tmp.len, id, L->err)))
            tp_err_prefix(L->err, "%s: model.vocab '%s'", L->file, e->string);
    }
    size_t k = 0;
    tp_strbuf tb;
    tp_strbuf_init(&tb);
    for (const cJSON *e = merges->child; e && !rc; e = e->next, k++) {
        const char *a = NULL, *b = NULL;
        char *sp = NULL;
        if (cJSON_IsString(e)) { /* "a b" (older format) */
            sp = strchr(e->valuestring, ' ');
            if (sp && !strchr(sp + 1, ' ')) *sp = 0, a = e->valuestring, b = sp + 1;
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
                   cJSON_IsString(e->child->next)) {
            a = e->child->valuestring, b = e->child->next->valuestring;
        }
        if (!a) {
            char w[64];
            snprintf(w, sizeof w, "model.merges[%zu]", k);
            rc = bad(L, w, "expected \"a b\" or [\"a\", \"b\"]");
            break;
        }
        int ok = model_bytes(t, a, &tmp) && model_bytes(t, b, &tb);
        if (ok) rc = tp_bpe_add_merge(t->bpe, tmp.buf, tmp.len, tb.buf, tb.len, L->err);
        if (sp) *sp = ' ';
        if (!ok) rc = bad(L, "model.merges", "a merge uses a character outside the byte-level alphabet");
        else if (rc) tp_err_prefix(L->err, "%s: model.merges[%zu] ('%s' '%s')", L->file, k, a, b);
    }
    if (!rc) rc = tp_bpe_finish(t->bpe, L->err);
    t->vstr = arena.buf;
    if (arena.oom || tmp.oom || tb.oom) rc = tp_fail(L->err, TP_ENOMEM, "out of memory");
    tp_strbuf_free(&tmp);
    tp_strbuf_free(&tb);
    return rc;
}

static int cmp_added(const void *x, const void *y) {
    const added_tok *a = *(const added_tok *const *)x, *b = *(const added_tok *const *)y;
    unsigned char ca = (unsigned char)a->content[0], cb = (unsigned char)b->content[0];
    if (ca != cb) return ca < cb ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

static int build_matcher(tp_tokenizer *t, matcher *m, int normalized, tp_err *err) {
    m->tok = tp_calloc(t->nadded + 1, sizeof *m->tok, err);
    if (!m->tok) return TP_ENOMEM;
    for (size_t i = 0; i < t->nadded; i++)
        if (t->added[i].normalized == normalized) m->tok[m->n++] = &t->added[i];
    qsort(m->tok, m->n, sizeof *m->tok, cmp_added);
    size_t j = 0;
    for (int c = 0; c <= 256; c++) {
        while (j < m->n && (unsigned char)m->tok[j]->content[0] < c) j++;
        m->first[c] = (uint32_t)j;
    }
    return TP_OK;
}

static int load_added(loader *L, const cJSON *arr) {
    tp_tokenizer *t = L->t;
    if (!arr || cJSON_IsNull(arr)) return TP_OK;
    if (!cJSON_IsArray(arr)) return bad(L, "added_tokens", "expected an array");
    t->added = calloc((size_t)cJSON_GetArraySize(arr) + 1, sizeof *t->added);
    if (!t->added) return tp_fail(L->err, TP_ENOMEM, "out of memory");
    size_t i = 0;
    for (const cJSON *e = arr->child; e; e = e->next, i++) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id"), *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        char w[64];
        snprintf(w, sizeof w, "added_tokens[%zu]", i);
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > 2e9 || !cJSON_IsString(c) ||
            !c->valuestring[0])
            return bad(L, w, "expected {\"id\": non-negative integer, \"content\": non-empty string, ...}");
        added_tok *a = &t->added[t->nadded++];
        if (!(a->content = dup_str(L, c->valuestring, &a->len))) return TP_ENOMEM;
        a->id = (int32_t)id->valuedouble;
        if (a->id != id->valuedouble || (int64_t)a->id >= ID_SLACK((size_t)t->nv + (size_t)cJSON_GetArraySize(arr))) {
            char why[160];
            snprintf(why, sizeof why, "id %.0f is not an integer below %lld (vocabulary of %ld plus %d added tokens)",
                     id->valuedouble, (long long)ID_SLACK((size_t)t->nv + (size_t)cJSON_GetArraySize(arr)), (long)t->nv,
                     cJSON_GetArraySize(arr));
            return bad(L, w, why);
        }
        a->special = get_bool(e, "special", 0);
        a->lstrip = get_bool(e, "lstrip", 0);
        a->rstrip = get_bool(e, "rstrip", 0);
        a->single_word = get_bool(e, "single_word", 0);
        a->normalized = get_bool(e, "normalized", !a->special);
    }
    int rc = build_matcher(t, &t->raw_m, 0, L->err);
    return rc ? rc : build_matcher(t, &t->norm_m, 1, L->err);
}

static const added_tok *added_by_id(const tp_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->size && t->added_idx[id] >= 0 ? &t->added[t->added_idx[id]] : NULL;
}

int32_t tp_tokenizer_token_id(const tp_tokenizer *t, const char *token) {
    for (size_t i = 0; i < t->nadded; i++)
        if (!strcmp(t->added[i].content, token)) return t->added[i].id;
    size_t n = strlen(token);
    for (int32_t id = 0; id < t->nv; id++)
        if (t->voff[id] != SIZE_MAX && t->vlen[id] == n && !memcmp(t->vstr + t->voff[id], token, n)) return id;
    return -1;
}

/* bos_token / eos_token: "str", {"content": "str"} or null. */
static int special_of(loader *L, const cJSON *cfg, const char *key, const char *cfgfile, int32_t *id) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    *id = -1;
    if (cJSON_IsObject(v)) {
        v = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (!cJSON_IsString(v))
            return tp_fail(L->err, TP_EFORMAT, "%s: %s: expected {\"content\": string, ...}, the \"content\" is %s",
                           cfgfile, key, v ? "not a string" : "missing");
    }
    if (!v || cJSON_IsNull(v)) return TP_OK;
    if (!cJSON_IsString(v)) return tp_fail(L->err, TP_EFORMAT, "%s: %s: expected a string, {\"content\": ...} or null", cfgfile, key);
    *id = tp_tokenizer_token_id(L->t, v->valuestring);
    if (*id < 0)
        return tp_fail(L->err, TP_EFORMAT, "%s: %s '%s' is not a token of %s", cfgfile, key, v->valuestring, L->file);
    return TP_OK;
}

/* BOS/EOS that a TemplateProcessing "single" template adds, if any. */
static void template_specials(loader *L, const cJSON *pp, int32_t *first, int32_t *last) {
    const char *ty = jtype(pp);
    if (!ty) return;
    if (!strcmp(ty, "Sequence")) {
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(pp, "processors");
        for (const cJSON *e = cJSON_IsArray(seq) ? seq->child : NULL; e; e = e->next) template_specials(L, e, first, last);
        return;
    }
    if (strcmp(ty, "TemplateProcessing")) return;
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(pp, "single");
    if (!cJSON_IsArray(single) || !single->child) return;
    const cJSON *items[2] = {single->child, single->child};
    while (items[1]->next) items[1] = items[1]->next;
    for (int k = 0; k < 2; k++) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(items[k], "SpecialToken");
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(sp, "id");
        if (!cJSON_IsString(nm)) continue;
        int32_t id = tp_tokenizer_token_id(L->t, nm->valuestring);
        if (k == 0) *first = id;
        else *last = id;
    }
}

static int load_config(loader *L, const char *cfgpath, const cJSON *pp, XXH64_state_t *h) {
    tp_tokenizer *t = L->t;
    int32_t tb = -1, te = -1;
    template_specials(L, pp, &tb, &te);
    t->bos = tb, t->eos = te;
    t->add_bos = tb >= 0, t->add_eos = te >= 0;
    if (!cfgpath || !tp_exists(cfgpath)) return TP_OK;
    char *txt;
    size_t len;
    int rc = tp_read_file(cfgpath, 64u << 20, &txt, &len, L->err);
    if (rc) return rc;
    XXH64_update(h, txt, len);
    cJSON *cfg = cJSON_ParseWithLength(txt, len);
    free(txt);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return tp_fail(L->err, TP_EFORMAT, "%s: not a JSON object", cfgpath);
    }
    int32_t bos, eos;
    if (!(rc = special_of(L, cfg, "bos_token", cfgpath, &bos)) && !(rc = special_of(L, cfg, "eos_token", cfgpath, &eos))) {
        if (bos >= 0) t->bos = bos;
        if (eos >= 0) t->eos = eos;
        const cJSON *ab = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token"),
                    *ae = cJSON_GetObjectItemCaseSensitive(cfg, "add_eos_token");
        if ((ab && !cJSON_IsBool(ab) && !cJSON_IsNull(ab)) || (ae && !cJSON_IsBool(ae) && !cJSON_IsNull(ae)))
            rc = tp_fail(L->err, TP_EFORMAT, "%s: %s: expected true, false or null", cfgpath,
                         ab && !cJSON_IsBool(ab) && !cJSON_IsNull(ab) ? "add_bos_token" : "add_eos_token");
        if (cJSON_IsBool(ab)) t->add_bos = cJSON_IsTrue(ab);
        if (cJSON_IsBool(ae)) t->add_eos = cJSON_IsTrue(ae);
        if (t->add_bos && t->bos < 0) t->add_bos = 0;
        if (t->add_eos && t->eos < 0) t->add_eos = 0;
    }
    cJSON_Delete(cfg);
    return rc;
}

/* 0 if s[0..n) is valid UTF-8 (no overlong forms, surrogates or code points
 * above U+10FFFF), else 1 + the offset of the first bad byte. */
static size_t bad_utf8(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c < 0x80) { i++; continue; }
        size_t k = c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2 : c >= 0xF0 && c <= 0xF4 ? 3 : 0;
        if (!k || i + k >= n) return i + 1; /* bad lead byte, or the sequence runs past the end */
        unsigned lo = 0x80, hi = 0xBF;
        if (c == 0xE0) lo = 0xA0;
        else if (c == 0xED) hi = 0x9F;
        else if (c == 0xF0) lo = 0x90;
        else if (c == 0xF4) hi = 0x8F;
        if (p[i + 1] < lo || p[i + 1] > hi) return i + 1;
        for (size_t j = 2; j <= k; j++)
            if (p[i + j] < 0x80 || p[i + j] > 0xBF) return i + 1;
        i += k + 1;
    }
    return 0;
}

static int load_impl(const char *dir, const char *mem, size_t mem_len, tp_tokenizer **out, tp_err *err);

int tp_tokenizer_load(const char *dir, tp_tokenizer **out, tp_err *err) { return load_impl(dir, NULL, 0, out, err); }

int tp_tokenizer_load_json(const char *label, const char *json, size_t len, tp_tokenizer **out, tp_err *err) {
    return load_impl(label, json ? json : "", len, out, err);
}

/* mem != NULL: the tokenizer.json text itself (dir is its label; no
 * tokenizer_config.json is read). */
static int load_impl(const char *dir, const char *mem, size_t mem_len, tp_tokenizer **out, tp_err *err) {
    *out = NULL;
    size_t dl = strlen(dir);
    int is_file = mem || (dl >= 5 && !strcmp(dir + dl - 5, ".json"));
    char *jpath = is_file ? tp_strdup(dir, err) : tp_path_join(dir, "tokenizer.json", err);
    char *base = is_file ? tp_dirname(dir, err) : tp_strdup(dir, err);
    char *cpath = base ? tp_path_join(base, "tokenizer_config.json", err) : NULL;
    free(base);
    tp_tokenizer *t = tp_calloc(1, sizeof *t, err);
    char *txt = NULL;
    size_t len = 0;
    int arena_on = 0;
    cJSON *root = NULL;
    int rc = !jpath || !cpath || !t ? TP_ENOMEM : TP_OK;
    if (!rc) {
        t->path = jpath, jpath = NULL;
        t->bos = t->eos = -1;
        byte_level_map(t->b2c, t->c2b);
        tp_strbuf_init(&t->clean), tp_strbuf_init(&t->seg), tp_strbuf_init(&t->piece);
        if (!mem && !tp_exists(t->path))
            rc = tp_fail(err, TP_EIO, "%s: no such file (the tokenizer directory must hold a Hugging Face tokenizer.json)",
                         t->path);
    }
    if (!rc && mem) {
        if (!(txt = tp_malloc(mem_len + 1, err))) rc = TP_ENOMEM;
        else memcpy(txt, mem, mem_len), txt[mem_len] = 0, len = mem_len;
    } else if (!rc) {
        rc = tp_read_file(t->path, TOKENIZER_JSON_LIMIT, &txt, &len, err);
    }
    XXH64_state_t h;
    XXH64_reset(&h, 0);
    size_t badu = 0;
    if (!rc && (badu = bad_utf8(txt, len)) != 0)
        rc = tp_fail(err, TP_EFORMAT, "%s: invalid UTF-8 at byte %zu (tokenizer.json must be UTF-8 JSON)", t->path,
                     badu - 1);
    if (!rc) {
        XXH64_update(&h, txt, len);
        arena_begin();
        arena_on = 1;
        root = cJSON_ParseWithLength(txt, len);
        if (!cJSON_IsObject(root)) {
            const char *e = cJSON_GetErrorPtr();
            rc = tp_fail(err, TP_EFORMAT, "%s: not valid JSON (near byte %lld)", t->path,
                         e && e >= txt && e <= txt + len ? (long long)(e - txt) : -1ll);
        }
    }
    loader L = {t, t ? t->path : NULL, err};
    if (!rc) rc = load_normalizer(&L, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer");
    if (!rc) rc = load_pre(&L, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), "pre_tokenizer");
    if (!rc) rc = load_decoder(&L, cJSON_GetObjectItemCaseSensitive(root, "decoder"), "decoder");
    if (!rc) {
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "model");
        rc = cJSON_IsObject(m) ? load_model(&L, m) : bad(&L, "model", "missing");
    }
    if (!rc) rc = load_added(&L, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"));
    if (!rc) {
        const cJSON *pp = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
        const char *ty = jtype(pp);
        if (pp && !cJSON_IsNull(pp) && (!ty || (strcmp(ty, "TemplateProcessing") && strcmp(ty, "ByteLevel") && strcmp(ty, "Sequence"))))
            rc = unsupported(&L, "post_processor", ty);
        else
            rc = load_config(&L, mem ? NULL : cpath, pp, &h);
    }
    if (!rc) {
        t->digest = XXH64_digest(&h);
        t->size = t->nv;
        for (size_t i = 0; i < t->nadded; i++)
            if (t->added[i].id >= t->size) t->size = t->added[i].id + 1;
        if (!(t->added_idx = tp_malloc((size_t)t->size * sizeof *t->added_idx + 1, err))) rc = TP_ENOMEM;
        for (int32_t i = 0; !rc && i < t->size; i++) t->added_idx[i] = -1;
        for (size_t i = 0; !rc && i < t->nadded; i++) t->added_idx[t->added[i].id] = (int32_t)i;
        /* SentencePiece text without a pre-tokenizer is one long piece; if no
         * token holds "▁" right after another character, no merge can cross
         * such a point, and splitting there gives the same ids faster. */
        t->sp_split = !t->byte_level && t->npre == 0 && !tp_bpe_any_token_has_inner(t->bpe, "\xE2\x96\x81", 3);
    }
    cJSON_Delete(root);
    if (arena_on) arena_end();
    free(txt);
    free(jpath);
    free(cpath);
    if (rc) {
        tp_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return TP_OK;
}

/* ---- encode --------------------------------------------------------------- */

/* Leftmost-longest added token in s[from..n); returns the token and its
 * [*ms, *me) with lstrip/rstrip applied, or NULL. */
static const added_tok *match_added(const matcher *m, const char *s, size_t n, size_t from, size_t *ms, size_t *me) {
    if (!m->n) return NULL;
    for (size_t i = from; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        for (uint32_t j = m->first[c]; j < m->first[c + 1]; j++) {
            const added_tok *a = m->tok[j];
            if (a->len > n - i || memcmp(s + i, a->content, a->len)) continue;
            size_t st = i, en = i + a->len, k;
            if (a->single_word) {
                if (st > 0 && is_word_cp(cp_before(s, st, &k))) continue;
                if (en < n && is_word_cp(cp_at(s, n, en, &k))) continue;
            }
            while (a->lstrip && st > from && is_space_cp(cp_before(s, st, &k))) st = k;
            while (a->rstrip && en < n && is_space_cp(cp_at(s, n, en, &k))) en += k;
            *ms = st, *me = en;
            return a;
        }
    }
    return NULL;
}

static int push_piece(size_t **p, size_t *cap, size_t *np, size_t off, size_t len) {
    if (!len) return 0;
    if (*np + 2 > *cap) {
        size_t c = *cap ? *cap * 2 : 256;
        size_t *q = realloc(*p, c * sizeof *q);
        if (!q) return -1;
        *p = q, *cap = c;
    }
    (*p)[(*np)++] = off;
    (*p)[(*np)++] = len;
    return 0;
}

/* Normalise s[0..n) into t->seg (text the later steps read). */
static int normalize(tp_tokenizer *t, const char *s, size_t n, tp_err *err) {
    tp_strbuf *cur = &t->seg, *tmp = &t->piece;
    cur->len = 0;
    tp_strbuf_putn(cur, s, n);
    for (int i = 0; i < t->nnorm; i++) {
        norm_step *st = &t->norm[i];
        tmp->len = 0;
        if (st->kind == N_PREPEND) {
            if (!cur->len) continue;
            tp_strbuf_putn(tmp, st->a, st->na);
            tp_strbuf_putn(tmp, cur->buf, cur->len);
        } else if (st->kind == N_REPLACE) {
            size_t pos = 0, run = 0, ms, me;
            if (st->re.code) {
                int m;
                while ((m = regex_next(&st->re, cur->buf, cur->len, &pos, &ms, &me)) > 0) {
                    tp_strbuf_putn(tmp, cur->buf + run, ms - run);
                    tp_strbuf_putn(tmp, st->b, st->nb);
                    run = me;
                }
                if (m < 0)
                    return tp_fail(err, TP_EINVAL, "normalizer Replace: the regex hit a PCRE2 limit on %zu bytes of text",
                                   cur->len);
            } else {
                for (const char *p; (p = cur->len - run >= st->na ? memmem(cur->buf + run, cur->len - run, st->a, st->na) : NULL);) {
                    tp_strbuf_putn(tmp, cur->buf + run, (size_t)(p - (cur->buf + run)));
                    tp_strbuf_putn(tmp, st->b, st->nb);
                    run = (size_t)(p - cur->buf) + st->na;
                }
            }
            tp_strbuf_putn(tmp, cur->buf + run, cur->len - run);
        } else {
            int ascii = 1;
            for (size_t k = 0; k < cur->len && ascii; k++) ascii = (unsigned char)cur->buf[k] < 0x80;
            if (ascii) continue; /* every Unicode normal form leaves ASCII alone */
            utf8proc_uint8_t *dst = NULL;
            utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)cur->buf, (utf8proc_ssize_t)cur->len, &dst,
                                              (utf8proc_option_t)st->uopts);
            if (r < 0) {
                free(dst);
                return tp_fail(err, TP_EINVAL, "Unicode normalisation failed: %s", utf8proc_errmsg(r));
            }
            tp_strbuf_putn(tmp, (const char *)dst, (size_t)r);
            free(dst);
        }
        tp_strbuf swap = *cur;
        *cur = *tmp;
        *tmp = swap;
    }
    if (cur->oom || tmp->oom) return tp_fail(err, TP_ENOMEM, "out of memory");
    return TP_OK;
}

/* Split the pieces (offset, length pairs into t->seg) by one regex step. */
static int split_step(tp_tokenizer *t, regex *re, int behavior, size_t *np) {
    size_t n2 = 0;
    const char *s = t->seg.buf;
    for (size_t p = 0; p < *np; p += 2) {
        size_t off = t->pieces[p], len = t->pieces[p + 1], pos = 0, ms, me, run = 0;
        size_t pend_s = 0, pend_e = 0; /* Contiguous: the current run of matches */
        int pend = 0, m;
        while ((m = regex_next(re, s + off, len, &pos, &ms, &me)) > 0) {
            int fail = 0;
            switch (behavior) {
            case B_ISOLATED:
                fail = push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + run, ms - run) ||
                       push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + ms, me - ms);
                run = me;
                break;
            case B_REMOVED:
                fail = push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + run, ms - run);
                run = me;
                break;
            case B_MERGED_PREV:
                fail = push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + run, me - run);
                run = me;
                break;
            case B_MERGED_NEXT:
                fail = push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + run, ms - run);
                run = ms;
                break;
            default: /* Contiguous */
                if (pend && pend_e == ms) {
                    pend_e = me;
                } else {
                    if (pend) fail = push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + pend_s, pend_e - pend_s);
                    fail |= push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + run, ms - run);
                    pend = 1, pend_s = ms, pend_e = me;
                }
                run = me;
            }
            if (fail) return -1;
        }
        if (m < 0) return -2;
        if (pend && push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + pend_s, pend_e - pend_s)) return -1;
        if (push_piece(&t->pieces2, &t->pieces2_cap, &n2, off + run, len - run)) return -1;
    }
    size_t *sw = t->pieces, c = t->pieces_cap;
    t->pieces = t->pieces2, t->pieces_cap = t->pieces2_cap;
    t->pieces2 = sw, t->pieces2_cap = c;
    *np = n2;
    return 0;
}

/* Rewrite every piece through fn into fresh text (Metaspace, ByteLevel
 * prefix); pieces keep their order. */
static int rewrite_step(tp_tokenizer *t, const pre_step *st, int first_segment, size_t *np) {
    tp_strbuf *out = &t->piece;
    out->len = 0;
    size_t n2 = 0;
    for (size_t p = 0; p < *np; p += 2) {
        const char *s = t->seg.buf + t->pieces[p];
        size_t len = t->pieces[p + 1], start = out->len;
        if (st->kind == P_BYTELEVEL) {
            if (st->add_prefix_space && s[0] != ' ') tp_strbuf_putn(out, " ", 1);
            tp_strbuf_putn(out, s, len);
        } else { /* Metaspace: spaces -> replacement, maybe prepended */
            size_t rl = strlen(st->repl);
            int starts = len >= rl && !memcmp(s, st->repl, rl) ? 1 : s[0] == ' ';
            int at0 = first_segment && p == 0;
            if (!starts && (st->scheme == S_ALWAYS || (st->scheme == S_FIRST && at0))) tp_strbuf_putn(out, st->repl, rl);
            size_t run = 0;
            for (size_t k = 0; k < len; k++)
                if (s[k] == ' ') {
                    tp_strbuf_putn(out, s + run, k - run);
                    tp_strbuf_putn(out, st->repl, rl);
                    run = k + 1;
                }
            tp_strbuf_putn(out, s + run, len - run);
        }
        if (push_piece(&t->pieces2, &t->pieces2_cap, &n2, start, out->len - start)) return -1;
    }
    if (out->oom) return -1;
    tp_strbuf sw = t->seg;
    t->seg = *out;
    *out = sw;
    size_t *q = t->pieces, c = t->pieces_cap;
    t->pieces = t->pieces2, t->pieces_cap = t->pieces2_cap;
    t->pieces2 = q, t->pieces2_cap = c;
    *np = n2;
    return 0;
}

/* Pre-tokenize and BPE-encode t->seg[off..off+len). */
static int encode_normalized(tp_tokenizer *t, size_t off, size_t len, int first_segment, tp_ids *out, tp_err *err) {
    size_t np = 0;
    if (push_piece(&t->pieces, &t->pieces_cap, &np, off, len)) return tp_fail(err, TP_ENOMEM, "out of memory");
    for (int i = 0; i < t->npre; i++) {
        pre_step *st = &t->pre[i];
        int fail = 0;
        if (st->kind == P_SPLIT) fail = split_step(t, &st->re, st->behavior, &np);
        else {
            fail = rewrite_step(t, st, first_segment, &np);
            if (!fail && st->kind == P_BYTELEVEL && st->use_regex) fail = split_step(t, &st->re, B_ISOLATED, &np);
            if (!fail && st->kind == P_METASPACE && st->split) {
                /* split before every replacement character (MergedWithNext) */
                size_t n2 = 0, rl = strlen(st->repl);
                for (size_t p = 0; p < np && !fail; p += 2) {
                    const char *s = t->seg.buf + t->pieces[p];
                    size_t l = t->pieces[p + 1], run = 0;
                    for (size_t k = 1; k + rl <= l; k++)
                        if (!memcmp(s + k, st->repl, rl)) {
                            fail |= push_piece(&t->pieces2, &t->pieces2_cap, &n2, t->pieces[p] + run, k - run);
                            run = k;
                        }
                    fail |= push_piece(&t->pieces2, &t->pieces2_cap, &n2, t->pieces[p] + run, l - run);
                }
                size_t *q = t->pieces, c = t->pieces_cap;
                t->pieces = t->pieces2, t->pieces_cap = t->pieces2_cap;
                t->pieces2 = q, t->pieces2_cap = c;
                np = n2;
            }
        }
        if (fail == -2)
            return tp_fail(err, TP_EINVAL, "pre-tokenizer %d: the regex hit a PCRE2 limit on a piece of text", i);
        if (fail) return tp_fail(err, TP_ENOMEM, "out of memory");
    }
    for (size_t p = 0; p < np; p += 2) {
        const char *s = t->seg.buf + t->pieces[p];
        size_t l = t->pieces[p + 1], run = 0;
        if (t->sp_split) /* see tp_tokenizer_load */
            for (size_t k = 1; k + 3 <= l; k++)
                if (!memcmp(s + k, "\xE2\x96\x81", 3) && !(k >= 3 && !memcmp(s + k - 3, "\xE2\x96\x81", 3))) {
                    int rc = tp_bpe_encode_piece(t->bpe, s + run, k - run, out, err);
                    if (rc) return rc;
                    run = k;
                }
        int rc = tp_bpe_encode_piece(t->bpe, s + run, l - run, out, err);
        if (rc) return rc;
    }
    return TP_OK;
}

/* A stretch of raw text between added tokens. */
static int encode_segment(tp_tokenizer *t, const char *s, size_t n, int first_segment, tp_ids *out, tp_err *err) {
    if (!n) return TP_OK;
    int rc = normalize(t, s, n, err);
    if (rc) return rc;
    if (!t->norm_m.n) return encode_normalized(t, 0, t->seg.len, first_segment, out, err);
    /* normalized added tokens are matched in the normalised text; the
     * buffers are reused below, so work on a private copy */
    char *txt = malloc(t->seg.len + 1);
    if (!txt) return tp_fail(err, TP_ENOMEM, "out of memory");
    size_t len = t->seg.len, pos = 0, ms, me;
    memcpy(txt, t->seg.buf, len);
    const added_tok *a;
    while (!rc && (a = match_added(&t->norm_m, txt, len, pos, &ms, &me))) {
        t->seg.len = 0;
        tp_strbuf_putn(&t->seg, txt + pos, ms - pos);
        if (ms > pos) rc = encode_normalized(t, 0, t->seg.len, first_segment && pos == 0, out, err);
        if (!rc) rc = tp_ids_push(out, a->id, err);
        pos = me;
    }
    if (!rc && pos < len) {
        t->seg.len = 0;
        tp_strbuf_putn(&t->seg, txt + pos, len - pos);
        rc = encode_normalized(t, 0, t->seg.len, first_segment && pos == 0, out, err);
    }
    free(txt);
    return rc;
}

int tp_tokenizer_encode(tp_tokenizer *t, const char *text, size_t n, int flags, tp_ids *out, tp_err *err) {
    int rc = TP_OK;
    if (!tp_utf8_valid(text, n)) {
        t->clean.len = 0;
        tp_utf8_sanitize(text, n, &t->clean);
        if (t->clean.oom) return tp_fail(err, TP_ENOMEM, "out of memory");
        /* t->clean is not touched again below this point */
        return tp_tokenizer_encode(t, t->clean.buf, t->clean.len, flags, out, err);
    }
    if ((flags & TP_TOK_ADD_SPECIAL) && t->add_bos && (rc = tp_ids_push(out, t->bos, err))) return rc;
    size_t pos = 0, ms, me;
    const added_tok *a;
    while ((a = match_added(&t->raw_m, text, n, pos, &ms, &me))) {
        if ((rc = encode_segment(t, text + pos, ms - pos, pos == 0, out, err))) return rc;
        if ((rc = tp_ids_push(out, a->id, err))) return rc;
        pos = me;
    }
    if ((rc = encode_segment(t, text + pos, n - pos, pos == 0, out, err))) return rc;
    if ((flags & TP_TOK_ADD_SPECIAL) && t->add_eos && (rc = tp_ids_push(out, t->eos, err))) return rc;
    return TP_OK;
}

/* ---- decode --------------------------------------------------------------- */

/* A list of strings: (offset, length) pairs into one buffer. */
typedef struct strlist {
    tp_strbuf buf;
    size_t *p;
    size_t n, cap;
} strlist;

static int sl_add(strlist *l, const char *s, size_t n) {
    if (l->n + 2 > l->cap) {
        size_t c = l->cap ? l->cap * 2 : 64;
        size_t *q = realloc(l->p, c * sizeof *q);
        if (!q) return -1;
        l->p = q, l->cap = c;
    }
    l->p[l->n++] = l->buf.len;
    l->p[l->n++] = n;
    tp_strbuf_putn(&l->buf, s, n);
    return l->buf.oom ? -1 : 0;
}

static void sl_free(strlist *l) {
    tp_strbuf_free(&l->buf);
    free(l->p);
}

static int parse_byte_token(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static int flush_bytes(strlist *out, tp_strbuf *bytes) {
    int rc = 0;
    if (!bytes->len) return 0;
    if (tp_utf8_valid(bytes->buf, bytes->len)) rc = sl_add(out, bytes->buf, bytes->len);
    else
        for (size_t i = 0; i < bytes->len && !rc; i++) rc = sl_add(out, "\xEF\xBF\xBD", 3);
    bytes->len = 0;
    return rc;
}

static int dec_apply(const tp_tokenizer *t, const dec_step *d, const strlist *in, strlist *out) {
    int rc = 0;
    tp_strbuf tmp;
    tp_strbuf_init(&tmp);
    if (d->kind == D_FUSE || d->kind == D_BYTELEVEL) {
        for (size_t i = 0; i < in->n; i += 2) {
            const char *s = in->buf.buf + in->p[i];
            size_t n = in->p[i + 1];
            if (d->kind == D_FUSE || !byte_level_unmap(t->c2b, s, n, &tmp)) tp_strbuf_putn(&tmp, s, n);
        }
        rc = tmp.oom;
        if (d->kind == D_BYTELEVEL) {
            tp_strbuf lossy;
            tp_strbuf_init(&lossy);
            tp_utf8_sanitize(tmp.buf ? tmp.buf : "", tmp.len, &lossy);
            rc |= sl_add(out, lossy.buf ? lossy.buf : "", lossy.len) || lossy.oom;
            tp_strbuf_free(&lossy);
        } else {
            rc |= sl_add(out, tmp.buf ? tmp.buf : "", tmp.len);
        }
        tp_strbuf_free(&tmp);
        return rc ? -1 : 0;
    }
    for (size_t i = 0; i < in->n && !rc; i += 2) {
        const char *s = in->buf.buf + in->p[i];
        size_t n = in->p[i + 1];
        tmp.len = 0;
        switch (d->kind) {
        case D_REPLACE: {
            size_t run = 0;
            for (const char *p; (p = n - run >= d->na ? memmem(s + run, n - run, d->a, d->na) : NULL);) {
                tp_strbuf_putn(&tmp, s + run, (size_t)(p - (s + run)));
                tp_strbuf_putn(&tmp, d->b, d->nb);
                run = (size_t)(p - s) + d->na;
            }
            tp_strbuf_putn(&tmp, s + run, n - run);
            rc = sl_add(out, tmp.buf ? tmp.buf : "", tmp.len);
            break;
        }
        case D_BYTEFALLBACK: {
            int b = parse_byte_token(s, n);
            if (b >= 0) {
                char c = (char)b;
                tp_strbuf_putn(&tmp, &c, 1); /* tmp collects the run of byte tokens */
                /* keep collecting: peek ahead */
                size_t j = i + 2;
                for (; j < in->n; j += 2) {
                    int b2 = parse_byte_token(in->buf.buf + in->p[j], in->p[j + 1]);
                    if (b2 < 0) break;
                    c = (char)b2;
                    tp_strbuf_putn(&tmp, &c, 1);
                }
                rc = flush_bytes(out, &tmp);
                i = j - 2;
            } else {
                rc = sl_add(out, s, n);
            }
            break;
        }
        case D_STRIP: {
            size_t st = 0, en = n;
            for (int k = 0; k < d->start && st + d->na <= en && !memcmp(s + st, d->a, d->na); k++) st += d->na;
            for (int k = 0; k < d->stop && en >= st + d->na && !memcmp(s + en - d->na, d->a, d->na); k++) en -= d->na;
            rc = sl_add(out, s + st, en - st);
            break;
        }
        default: { /* D_METASPACE: HF drops every replacement of the first token */
            size_t rl = strlen(d->repl), run = 0;
            for (size_t k = 0; k + rl <= n; k++)
                if (!memcmp(s + k, d->repl, rl)) {
                    tp_strbuf_putn(&tmp, s + run, k - run);
                    if (!(i == 0 && d->scheme != S_NEVER)) tp_strbuf_putn(&tmp, " ", 1);
                    run = k + rl;
                    k += rl - 1;
                }
            tp_strbuf_putn(&tmp, s + run, n - run);
            rc = sl_add(out, tmp.buf ? tmp.buf : "", tmp.len);
        }
        }
    }
    tp_strbuf_free(&tmp);
    return rc;
}

int tp_tokenizer_decode(const tp_tokenizer *t, const int32_t *ids, size_t n, int skip_special, tp_strbuf *out,
                        tp_err *err) {
    strlist a = {0}, b = {0};
    tp_strbuf_init(&a.buf), tp_strbuf_init(&b.buf);
    int rc = TP_OK;
    for (size_t i = 0; i < n && !rc; i++) {
        const added_tok *at = added_by_id(t, ids[i]);
        if (at) {
            if (!(skip_special && at->special) && sl_add(&a, at->content, at->len)) rc = TP_ENOMEM;
        } else if (ids[i] >= 0 && ids[i] < t->nv && t->voff[ids[i]] != SIZE_MAX) {
            if (sl_add(&a, t->vstr + t->voff[ids[i]], t->vlen[ids[i]])) rc = TP_ENOMEM;
        } else {
            rc = tp_fail(err, TP_EINVAL, "token id %d (position %zu) is not in the vocabulary of %s", ids[i], i, t->path);
        }
    }
    for (int k = 0; k < t->ndec && !rc; k++) {
        b.n = 0, b.buf.len = 0;
        if (dec_apply(t, &t->dec[k], &a, &b)) rc = TP_ENOMEM;
        strlist s = a;
        a = b, b = s;
    }
    for (size_t i = 0; i < a.n && !rc; i += 2) {
        if (!t->has_decoder && i) tp_strbuf_putn(out, " ", 1);
        tp_strbuf_putn(out, a.buf.buf + a.p[i], a.p[i + 1]);
    }
    if (rc == TP_ENOMEM || out->oom) rc = tp_fail(err, TP_ENOMEM, "out of memory");
    sl_free(&a), sl_free(&b);
    return rc;
}

/* ---- accessors ------------------------------------------------------------ */

int32_t tp_tokenizer_vocab_size(const tp_tokenizer *t) { return t->size; }
int32_t tp_tokenizer_bos_id(const tp_tokenizer *t) { return t->bos; }
int32_t tp_tokenizer_eos_id(const tp_tokenizer *t) { return t->eos; }
int tp_tokenizer_adds_bos(const tp_tokenizer *t) { return t->add_bos; }
int tp_tokenizer_adds_eos(const tp_tokenizer *t) { return t->add_eos; }
uint64_t tp_tokenizer_digest(const tp_tokenizer *t) { return t->digest; }
const char *tp_tokenizer_kind(const tp_tokenizer *t) { return t->byte_level ? "bpe-bytelevel" : "bpe-sentencepiece"; }
