/* tokenizer_load.c - tokenizer.json (and tokenizer_config.json) into the
 * structs of tokenizer_impl.h: every component checked and refused with the
 * file and the JSON path when unsupported (docs/tokenizer.md). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>
#define XXH_STATIC_LINKING_ONLY /* XXH64_state_t on the stack */
#include <xxhash.h>

#include "tok/tokenizer_impl.h"
#include "util/jsonint.h"

#define TOKENIZER_JSON_LIMIT (1ull << 30)

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
        tp_tok_utf8_len((unsigned char)r->valuestring[0]) != strlen(r->valuestring))
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
        if (!lit && (rc = tp_tok_regex_compile(&s->re, pat, s->na, 0, L->file, where, L->err))) return rc;
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
        return tp_tok_regex_compile(&s->re, pat, strlen(pat), lit, L->file, where, L->err);
    }
    if (ty && !strcmp(ty, "ByteLevel")) {
        s->kind = P_BYTELEVEL;
        s->add_prefix_space = get_bool(o, "add_prefix_space", 1);
        s->use_regex = get_bool(o, "use_regex", 1);
        t->npre++;
        t->byte_level = 1;
        return s->use_regex ? tp_tok_regex_compile(&s->re, GPT2_REGEX, strlen(GPT2_REGEX), 0, L->file, where, L->err) : TP_OK;
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
        int64_t start = 0, stop = 0;
        if (!cJSON_IsString(c) || tp_tok_utf8_len((unsigned char)c->valuestring[0]) != strlen(c->valuestring) ||
            !tp_json_int(a, 0, 1000000, &start) || !tp_json_int(b, 0, 1000000, &stop))
            return bad(L, where, "Strip: expected one-character \"content\" and non-negative \"start\", \"stop\"");
        s->kind = D_STRIP;
        if (!(s->a = dup_str(L, c->valuestring, &s->na))) return TP_ENOMEM;
        s->start = (int)start;
        s->stop = (int)stop;
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
    return tp_tok_byte_level_unmap(t->c2b, s, strlen(s), tmp);
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
        int64_t id;
        if (!tp_json_int(e, 0, 2000000000, &id)) return bad(L, "model.vocab", "expected non-negative integer ids");
        if ((int32_t)id > maxid) maxid = (int32_t)id;
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
        tp_tok_byte_level_map(t->b2c, t->c2b);
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

