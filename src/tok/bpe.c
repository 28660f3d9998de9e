/* bpe.c - BPE vocabulary, merges and the merge loop (see bpe.h). */
#include "tok/bpe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#define CACHE_SLOTS (1u << 15)   /* power of two; cleared when half full */
#define CACHE_MAX_PIECE 256      /* longer pieces are not cached */
#define CACHE_MAX_ARENA (8u << 20)

typedef struct sym {
    int32_t id;
    int32_t prev, next; /* indices, -1 at the ends */
    int32_t alive;
} sym;

typedef struct merge_ent {
    int32_t rank, pos, new_id;
} merge_ent;

typedef struct cache_slot {
    uint64_t hash; /* 0 = empty */
    uint32_t key_off, key_len, ids_off, nids;
} cache_slot;

struct tp_bpe {
    tp_bpe_opts o;
    char *arena; /* token strings */
    size_t alen, acap;
    size_t *off;     /* [cap_ids] offset in arena, SIZE_MAX = no token */
    uint32_t *len;   /* [cap_ids] */
    int32_t cap_ids; /* ids are < cap_ids */
    int32_t *shash;  /* string table: slot -> id, -1 empty */
    size_t smask, ntok;
    uint64_t *mkey; /* merge table: (a << 32 | b) + 1, 0 empty */
    int32_t *mrank, *mnew;
    size_t mmask, nmerge;
    int32_t byte_id[256], byte_fb[256];
    /* work buffers */
    sym *syms;
    size_t syms_cap;
    merge_ent *heap;
    size_t heap_n, heap_cap;
    /* piece cache */
    cache_slot *cache;
    size_t cache_n;
    char *ckeys;
    int32_t *cids;
    size_t ckeys_len, ckeys_cap, cids_len, cids_cap;
};

static uint64_t str_hash(const char *s, size_t n) { return XXH3_64bits(s, n); }
static uint64_t pair_key(int32_t a, int32_t b) { return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1; }
static size_t pair_slot(uint64_t k, size_t mask) { /* splitmix64 finaliser: both halves reach the low bits */
    k ^= k >> 30;
    k *= 0xBF58476D1CE4E5B9ull;
    k ^= k >> 27;
    k *= 0x94D049BB133111EBull;
    return (size_t)(k ^ (k >> 31)) & mask;
}

static size_t pow2_at_least(size_t n) {
    size_t p = 1024;
    while (p < n) p <<= 1;
    return p;
}

int tp_bpe_create(const tp_bpe_opts *o, size_t vocab_hint, size_t merges_hint, tp_bpe **out, tp_err *err) {
    *out = NULL;
    tp_bpe *b = tp_calloc(1, sizeof *b, err);
    if (!b) return TP_ENOMEM;
    b->o = *o;
    size_t ss = pow2_at_least(2 * vocab_hint + 16), ms = pow2_at_least(2 * merges_hint + 16);
    b->shash = tp_malloc(ss * sizeof *b->shash, err);
    b->mkey = tp_calloc(ms, sizeof *b->mkey, err);
    b->mrank = tp_malloc(ms * sizeof *b->mrank, err);
    b->mnew = tp_malloc(ms * sizeof *b->mnew, err);
    b->cache = tp_calloc(CACHE_SLOTS, sizeof *b->cache, err);
    if (!b->shash || !b->mkey || !b->mrank || !b->mnew || !b->cache) {
        tp_bpe_free(b);
        return TP_ENOMEM;
    }
    memset(b->shash, 0xff, ss * sizeof *b->shash);
    b->smask = ss - 1;
    b->mmask = ms - 1;
    *out = b;
    return TP_OK;
}

void tp_bpe_free(tp_bpe *b) {
    if (!b) return;
    free(b->arena);
    free(b->off);
    free(b->len);
    free(b->shash);
    free(b->mkey);
    free(b->mrank);
    free(b->mnew);
    free(b->syms);
    free(b->heap);
    free(b->cache);
    free(b->ckeys);
    free(b->cids);
    free(b);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

int32_t tp_bpe_lookup(const tp_bpe *b, const char *s, size_t n) {
    for (size_t i = str_hash(s, n) & b->smask;; i = (i + 1) & b->smask) {
        int32_t id = b->shash[i];
        if (id < 0) return -1;
        if (b->len[id] == n && !memcmp(b->arena + b->off[id], s, n)) return id;
    }
}

static int rehash_strings(tp_bpe *b, tp_err *err) {
    size_t ns = (b->smask + 1) * 2;
    int32_t *t = tp_malloc(ns * sizeof *t, err);
    if (!t) return TP_ENOMEM;
    memset(t, 0xff, ns * sizeof *t);
    for (int32_t id = 0; id < b->cap_ids; id++) {
        if (b->off[id] == SIZE_MAX) continue;
        size_t i = str_hash(b->arena + b->off[id], b->len[id]) & (ns - 1);
        while (t[i] >= 0) i = (i + 1) & (ns - 1);
        t[i] = id;
    }
    free(b->shash);
    b->shash = t;
    b->smask = ns - 1;
    return TP_OK;
}

int tp_bpe_add_token(tp_bpe *b, const char *s, size_t n, int32_t id, tp_err *err) {
    if (id < 0) return tp_fail(err, TP_EFORMAT, "negative token id %d", id);
    if (n == 0) return tp_fail(err, TP_EFORMAT, "token id %d: empty token string", id);
    if (tp_bpe_lookup(b, s, n) >= 0)
        return tp_fail(err, TP_EFORMAT, "token string of id %d appears twice (also id %d)", id, tp_bpe_lookup(b, s, n));
    if (id >= b->cap_ids) {
        int32_t nc = b->cap_ids ? b->cap_ids : 1024;
        while (nc <= id) nc *= 2;
        size_t *off = realloc(b->off, (size_t)nc * sizeof *off);
        if (off) b->off = off;
        uint32_t *len = realloc(b->len, (size_t)nc * sizeof *len);
        if (len) b->len = len;
        if (!off || !len) return tp_fail(err, TP_ENOMEM, "out of memory");
        for (int32_t i = b->cap_ids; i < nc; i++) b->off[i] = SIZE_MAX, b->len[i] = 0;
        b->cap_ids = nc;
    }
    if (b->off[id] != SIZE_MAX) return tp_fail(err, TP_EFORMAT, "token id %d is given to two strings", id);
    if (grow((void **)&b->arena, &b->acap, b->alen + n, 1)) return tp_fail(err, TP_ENOMEM, "out of memory");
    memcpy(b->arena + b->alen, s, n);
    b->off[id] = b->alen;
    b->len[id] = (uint32_t)n;
    b->alen += n;
    if (++b->ntok * 2 > b->smask + 1) {
        int rc = rehash_strings(b, err);
        if (rc) return rc;
    }
    size_t i = str_hash(s, n) & b->smask;
    while (b->shash[i] >= 0) i = (i + 1) & b->smask;
    b->shash[i] = id;
    return TP_OK;
}

static int merge_find(const tp_bpe *b, int32_t a, int32_t c, int32_t *rank, int32_t *new_id) {
    uint64_t k = pair_key(a, c);
    for (size_t i = pair_slot(k, b->mmask);; i = (i + 1) & b->mmask) {
        if (b->mkey[i] == 0) return 0;
        if (b->mkey[i] == k) {
            *rank = b->mrank[i];
            *new_id = b->mnew[i];
            return 1;
        }
    }
}

static int rehash_merges(tp_bpe *b, tp_err *err) {
    size_t ns = (b->mmask + 1) * 2;
    uint64_t *k = tp_calloc(ns, sizeof *k, err);
    int32_t *r = tp_malloc(ns * sizeof *r, err), *nw = tp_malloc(ns * sizeof *nw, err);
    if (!k || !r || !nw) {
        free(k), free(r), free(nw);
        return TP_ENOMEM;
    }
    for (size_t i = 0; i <= b->mmask; i++) {
        if (!b->mkey[i]) continue;
        size_t j = pair_slot(b->mkey[i], ns - 1);
        while (k[j]) j = (j + 1) & (ns - 1);
        k[j] = b->mkey[i], r[j] = b->mrank[i], nw[j] = b->mnew[i];
    }
    free(b->mkey), free(b->mrank), free(b->mnew);
    b->mkey = k, b->mrank = r, b->mnew = nw;
    b->mmask = ns - 1;
    return TP_OK;
}

int tp_bpe_add_merge(tp_bpe *b, const char *a, size_t na, const char *c, size_t nc, tp_err *err) {
    int32_t ia = tp_bpe_lookup(b, a, na), ic = tp_bpe_lookup(b, c, nc);
    if (ia < 0 || ic < 0)
        return tp_fail(err, TP_EFORMAT, "merge %zu: its %s part is not in the vocabulary", b->nmerge,
                       ia < 0 ? "first" : "second");
    char stack[256], *cat = na + nc <= sizeof stack ? stack : malloc(na + nc);
    if (!cat) return tp_fail(err, TP_ENOMEM, "out of memory");
    memcpy(cat, a, na);
    memcpy(cat + na, c, nc);
    int32_t inew = tp_bpe_lookup(b, cat, na + nc);
    if (cat != stack) free(cat);
    if (inew < 0) return tp_fail(err, TP_EFORMAT, "merge %zu: the merged token is not in the vocabulary", b->nmerge);
    int32_t rank = (int32_t)b->nmerge++;
    if (b->nmerge * 2 > b->mmask + 1) {
        int rc = rehash_merges(b, err);
        if (rc) return rc;
    }
    /* a repeated pair takes its last rank: HF collects merges into a map */
    uint64_t k = pair_key(ia, ic);
    size_t i = pair_slot(k, b->mmask);
    while (b->mkey[i] && b->mkey[i] != k) i = (i + 1) & b->mmask;
    b->mkey[i] = k, b->mrank[i] = rank, b->mnew[i] = inew;
    return TP_OK;
}

int tp_bpe_finish(tp_bpe *b, tp_err *err) {
    for (int c = 0; c < 256; c++) {
        char ch = (char)c, fb[8];
        b->byte_id[c] = tp_bpe_lookup(b, &ch, 1);
        snprintf(fb, sizeof fb, "<0x%02X>", c);
        b->byte_fb[c] = tp_bpe_lookup(b, fb, 6);
    }
    if (b->o.unk_id >= 0 && (b->o.unk_id >= b->cap_ids || b->off[b->o.unk_id] == SIZE_MAX))
        return tp_fail(err, TP_EFORMAT, "model.unk_token (id %d) is not in the vocabulary", b->o.unk_id);
    return TP_OK;
}

int tp_bpe_any_token_has_inner(const tp_bpe *b, const char *pat, size_t n) {
    for (int32_t id = 0; id < b->cap_ids; id++) {
        if (b->off[id] == SIZE_MAX) continue;
        const char *s = b->arena + b->off[id];
        size_t len = b->len[id];
        for (size_t k = 1; k + n <= len; k++) {
            if (memcmp(s + k, pat, n)) continue;
            if (k < n || memcmp(s + k - n, pat, n)) return 1;
        }
    }
    return 0;
}

/* ---- merge loop ----------------------------------------------------------- */

static int heap_less(const merge_ent *x, const merge_ent *y) {
    return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static int heap_push(tp_bpe *b, merge_ent e) {
    if (grow((void **)&b->heap, &b->heap_cap, b->heap_n + 1, sizeof *b->heap)) return -1;
    size_t i = b->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &b->heap[p])) break;
        b->heap[i] = b->heap[p];
        i = p;
    }
    b->heap[i] = e;
    return 0;
}

static merge_ent heap_pop(tp_bpe *b) {
    merge_ent top = b->heap[0], last = b->heap[--b->heap_n];
    size_t i = 0, n = b->heap_n;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const merge_ent *best = &last;
        if (l < n && heap_less(&b->heap[l], best)) m = l, best = &b->heap[l];
        if (l + 1 < n && heap_less(&b->heap[l + 1], best)) m = l + 1;
        if (m == i) break;
        b->heap[i] = b->heap[m];
        i = m;
    }
    if (n) b->heap[i] = last;
    return top;
}

static size_t utf8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

/* Initial symbols of a piece (bpe.h: bytes, or characters with fallback). */
static int initial_symbols(tp_bpe *b, const char *s, size_t n, size_t *nsym) {
    if (grow((void **)&b->syms, &b->syms_cap, n + 1, sizeof *b->syms)) return -1;
    size_t k = 0;
    int prev_unk = 0;
    for (size_t i = 0; i < n;) {
        size_t cl = b->o.byte_level ? 1 : utf8_len((unsigned char)s[i]);
        if (i + cl > n) cl = n - i;
        int32_t id = cl == 1 ? b->byte_id[(unsigned char)s[i]] : tp_bpe_lookup(b, s + i, cl);
        if (id >= 0) {
            b->syms[k++].id = id;
            prev_unk = 0;
        } else {
            int all = b->o.byte_fallback;
            for (size_t j = 0; all && j < cl; j++) all = b->byte_fb[(unsigned char)s[i + j]] >= 0;
            if (all) {
                for (size_t j = 0; j < cl; j++) b->syms[k++].id = b->byte_fb[(unsigned char)s[i + j]];
                prev_unk = 0;
            } else if (b->o.unk_id >= 0) {
                if (!(b->o.fuse_unk && prev_unk)) b->syms[k++].id = b->o.unk_id;
                prev_unk = 1;
            }
        }
        i += cl;
    }
    for (size_t i = 0; i < k; i++) {
        b->syms[i].prev = (int32_t)i - 1;
        b->syms[i].next = i + 1 < k ? (int32_t)i + 1 : -1;
        b->syms[i].alive = 1;
    }
    *nsym = k;
    return 0;
}

static int merge_all(tp_bpe *b, size_t k) {
    b->heap_n = 0;
    int32_t rank, nid;
    for (size_t i = 0; i + 1 < k; i++)
        if (merge_find(b, b->syms[i].id, b->syms[i + 1].id, &rank, &nid) &&
            heap_push(b, (merge_ent){rank, (int32_t)i, nid}))
            return -1;
    while (b->heap_n) {
        merge_ent top = heap_pop(b);
        sym *cur = &b->syms[top.pos];
        if (!cur->alive || cur->next < 0) continue;
        sym *right = &b->syms[cur->next];
        /* a stale entry: the pair at pos changed since it was queued */
        if (!merge_find(b, cur->id, right->id, &rank, &nid) || nid != top.new_id) continue;
        cur->id = top.new_id;
        right->alive = 0;
        cur->next = right->next;
        if (right->next >= 0) b->syms[right->next].prev = top.pos;
        if (cur->prev >= 0 && merge_find(b, b->syms[cur->prev].id, cur->id, &rank, &nid) &&
            heap_push(b, (merge_ent){rank, cur->prev, nid}))
            return -1;
        if (cur->next >= 0 && merge_find(b, cur->id, b->syms[cur->next].id, &rank, &nid) &&
            heap_push(b, (merge_ent){rank, top.pos, nid}))
            return -1;
    }
    return 0;
}

/* ---- piece cache ------------------------------------------------------------ */

static void cache_clear(tp_bpe *b) {
    memset(b->cache, 0, CACHE_SLOTS * sizeof *b->cache);
    b->cache_n = b->ckeys_len = b->cids_len = 0;
}

static const cache_slot *cache_get(const tp_bpe *b, const char *s, size_t n, uint64_t h) {
    for (size_t i = h & (CACHE_SLOTS - 1);; i = (i + 1) & (CACHE_SLOTS - 1)) {
        const cache_slot *c = &b->cache[i];
        if (!c->hash) return NULL;
        if (c->hash == h && c->key_len == n && !memcmp(b->ckeys + c->key_off, s, n)) return c;
    }
}

static void cache_put(tp_bpe *b, const char *s, size_t n, uint64_t h, const int32_t *ids, size_t nids) {
    if (b->cache_n * 2 >= CACHE_SLOTS || b->ckeys_len + n > CACHE_MAX_ARENA || b->cids_len + nids > CACHE_MAX_ARENA)
        cache_clear(b);
    if (grow((void **)&b->ckeys, &b->ckeys_cap, b->ckeys_len + n, 1) ||
        grow((void **)&b->cids, &b->cids_cap, b->cids_len + nids, sizeof *b->cids))
        return; /* the cache is an optimisation only */
    size_t i = h & (CACHE_SLOTS - 1);
    while (b->cache[i].hash) i = (i + 1) & (CACHE_SLOTS - 1);
    memcpy(b->ckeys + b->ckeys_len, s, n);
    if (nids) memcpy(b->cids + b->cids_len, ids, nids * sizeof *ids); /* ids may be NULL when nothing was produced */
    b->cache[i] = (cache_slot){h, (uint32_t)b->ckeys_len, (uint32_t)n, (uint32_t)b->cids_len, (uint32_t)nids};
    b->ckeys_len += n;
    b->cids_len += nids;
    b->cache_n++;
}

int tp_bpe_encode_piece(tp_bpe *b, const char *s, size_t n, tp_ids *out, tp_err *err) {
    if (n == 0) return TP_OK;
    uint64_t h = 0;
    if (n <= CACHE_MAX_PIECE) {
        h = str_hash(s, n) | 1;
        const cache_slot *c = cache_get(b, s, n, h);
        if (c) {
            for (uint32_t i = 0; i < c->nids; i++)
                if (tp_ids_push(out, b->cids[c->ids_off + i], err)) return TP_ENOMEM;
            return TP_OK;
        }
    }
    size_t start = out->n;
    int32_t whole = b->o.ignore_merges ? tp_bpe_lookup(b, s, n) : -1;
    if (whole >= 0) {
        if (tp_ids_push(out, whole, err)) return TP_ENOMEM;
    } else {
        size_t k;
        if (initial_symbols(b, s, n, &k) || merge_all(b, k)) return tp_fail(err, TP_ENOMEM, "out of memory");
        for (int32_t i = k ? 0 : -1; i >= 0; i = b->syms[i].next)
            if (tp_ids_push(out, b->syms[i].id, err)) return TP_ENOMEM;
    }
    if (h) cache_put(b, s, n, h, out->n > start ? out->ids + start : NULL, out->n - start);
    return TP_OK;
}
