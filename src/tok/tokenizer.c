/* tokenizer.c - the encode/decode pipelines of a loaded tokenizer
 * (tokenizer.h; loading is tokenizer_load.c). The behaviour of each
 * component follows Hugging Face tokenizers; docs/tokenizer.md lists what is
 * supported and the choices made. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tok/tokenizer_impl.h"

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

int32_t tp_tok_cp_at(const char *s, size_t n, size_t i, size_t *len) {
    utf8proc_int32_t c = -1;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &c);
    *len = k > 0 ? (size_t)k : 1;
    return c;
}

/* GPT-2's byte <-> printable character map used by ByteLevel. */
void tp_tok_byte_level_map(int32_t b2c[256], int16_t c2b[512]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        b2c[b] = keep ? b : 256 + n++;
    }
    for (int c = 0; c < 512; c++) c2b[c] = -1;
    for (int b = 0; b < 256; b++) c2b[b2c[b]] = (int16_t)b;
}

/* Undo the byte map on s[0..n); 0 when a character is outside it. */
int tp_tok_byte_level_unmap(const int16_t c2b[512], const char *s, size_t n, tp_strbuf *out) {
    size_t start = out->len;
    for (size_t i = 0, k; i < n; i += k) {
        int32_t c = tp_tok_cp_at(s, n, i, &k);
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

int tp_tok_regex_compile(regex *r, const char *pat, size_t n, int literal, const char *file, const char *where,
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

void tp_tok_regex_free(regex *r) {
    if (r->md) pcre2_match_data_free(r->md);
    if (r->code) pcre2_code_free(r->code);
}

/* Next match in s[0..n) at or after *pos: 1 and its range, 0 when none, -1
 * when PCRE2 gives up (a resource limit) - never silently "no match", which
 * would change the tokens. Empty matches are skipped (they delimit nothing). */
static int tp_tok_regex_next(regex *r, const char *s, size_t n, size_t *pos, size_t *ms, size_t *me) {
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
        *pos = ov[0] + tp_tok_utf8_len((unsigned char)s[ov[0]]);
    }
    return 0;
}

const added_tok *tp_tok_added_by_id(const tp_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->size && t->added_idx[id] >= 0 ? &t->added[t->added_idx[id]] : NULL;
}

void tp_tokenizer_free(tp_tokenizer *t) {
    if (!t) return;
    tp_bpe_free(t->bpe);
    for (int i = 0; i < t->nnorm; i++) {
        free(t->norm[i].a), free(t->norm[i].b);
        tp_tok_regex_free(&t->norm[i].re);
    }
    for (int i = 0; i < t->npre; i++) tp_tok_regex_free(&t->pre[i].re);
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
                if (en < n && is_word_cp(tp_tok_cp_at(s, n, en, &k))) continue;
            }
            while (a->lstrip && st > from && is_space_cp(cp_before(s, st, &k))) st = k;
            while (a->rstrip && en < n && is_space_cp(tp_tok_cp_at(s, n, en, &k))) en += k;
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
                while ((m = tp_tok_regex_next(&st->re, cur->buf, cur->len, &pos, &ms, &me)) > 0) {
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
        while ((m = tp_tok_regex_next(re, s + off, len, &pos, &ms, &me)) > 0) {
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
            if (d->kind == D_FUSE || !tp_tok_byte_level_unmap(t->c2b, s, n, &tmp)) tp_strbuf_putn(&tmp, s, n);
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
        const added_tok *at = tp_tok_added_by_id(t, ids[i]);
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
