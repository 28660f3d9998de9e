/* textdata.c - text/Alpaca/chat records -> token documents -> a cached token
 * shard, built in parallel over the ranks (docs/data.md, "Text data sets").
 *
 * JSONL records are parsed with jansson: strings keep "\u0000" (cJSON would
 * cut them there) and invalid UTF-8 is refused, which makes such a record
 * bad rather than silently altered. A source starting with '[' is one JSON
 * array of records, parsed whole by every rank. */
#include "data/textdata.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#define XXH_STATIC_LINKING_ONLY /* XXH64_state_t on the stack */
#include <xxhash.h>

#include "data/dataset.h"
#include "util/fsutil.h"
#include "util/jsonint.h"

#define TD_VERSION 2     /* part of the cache key: bump when the documents a source gives change */
#define TD_KEEP 10       /* bad-record line (record) numbers kept for the report */
#define TD_WHY 200       /* length of a bad record's reason */
#define SIDECAR_MAX (1u << 20)
#define TD_PROGRESS_S 10.0 /* rank 0 reports progress this often during a build */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strchr(" \t\r\n\v\f", s[i]) || s[i] == 0) return 0;
    return 1;
}

static int is_txt(const char *path) {
    size_t n = strlen(path);
    return n >= 4 && !strcasecmp(path + n - 4, ".txt");
}

/* ---- spec ----------------------------------------------------------------- */

static const char *tok_dir(const tp_train_cfg *c) { return c->data.tokenizer[0] ? c->data.tokenizer : c->model_path; }

int tp_textdata_tokenizer(const tp_train_cfg *c, tp_tokenizer **out, tp_err *err) {
    int rc = tp_tokenizer_load(tok_dir(c), out, err);
    if (rc != TP_OK) tp_err_prefix(err, "data.tokenizer");
    return rc;
}

int tp_textspec_init(const tp_train_cfg *c, tp_tokenizer *tok, tp_textspec *s, tp_err *err) {
    const tp_data_cfg *dc = &c->data;
    memset(s, 0, sizeof *s);
    s->dc = dc;
    s->tok = tok;
    s->format = !strcmp(dc->format, "text") ? TP_TEXT_TEXT : !strcmp(dc->format, "alpaca") ? TP_TEXT_ALPACA
              : !strcmp(dc->format, "chat") ? TP_TEXT_CHAT : 0;
    if (!s->format) return tp_fail(err, TP_EINVAL, "data.format '%s' is not a text format", dc->format);
    s->txt = s->format == TP_TEXT_TEXT && is_txt(dc->path);
    s->unit = !strcmp(dc->txt_unit, "paragraph") ? TP_UNIT_PARAGRAPH
            : !strcmp(dc->txt_unit, "document") ? TP_UNIT_DOCUMENT : TP_UNIT_LINE;
    int bos = !strcmp(dc->add_bos, "auto") ? tp_tokenizer_adds_bos(tok) : !strcmp(dc->add_bos, "true");
    s->bos = bos ? tp_tokenizer_bos_id(tok) : -1;
    if (bos && s->bos < 0)
        return tp_fail(err, TP_EINVAL,
                       "data.add_bos: %s, but the tokenizer %s has no BOS token (bos_token in tokenizer_config.json); "
                       "set data.add_bos: false",
                       dc->add_bos, tok_dir(c));
    s->eos = dc->add_eos ? tp_tokenizer_eos_id(tok) : -1;
    if (dc->add_eos && s->eos < 0)
        return tp_fail(err, TP_EINVAL,
                       "data.add_eos: true, but the tokenizer %s has no EOS token (eos_token in "
                       "tokenizer_config.json); set data.add_eos: false",
                       tok_dir(c));
    return TP_OK;
}

/* ---- documents -------------------------------------------------------------- */

void tp_textdoc_free(tp_textdoc *d) {
    tp_ids_free(&d->ids);
    free(d->mask);
    memset(d, 0, sizeof *d);
}

/* Room in the mask for every id. */
static int mask_fit(tp_textdoc *d, tp_err *err) {
    if (d->ids.n > d->mask_cap) {
        size_t cap = d->mask_cap ? d->mask_cap : 256;
        while (cap < d->ids.n) cap *= 2;
        uint8_t *p = realloc(d->mask, cap);
        if (!p) return tp_fail(err, TP_ENOMEM, "out of memory for a document of %zu tokens", d->ids.n);
        d->mask = p;
        d->mask_cap = cap;
    }
    return TP_OK;
}

static int push_id(tp_textdoc *d, int32_t id, uint8_t m, tp_err *err) {
    size_t at = d->ids.n;
    int rc = tp_ids_push(&d->ids, id, err);
    if (rc == TP_OK) rc = mask_fit(d, err);
    if (rc == TP_OK) d->mask[at] = m;
    return rc;
}

/* Encode s[0..n) on its own and append it with mask value m. */
static int piece(const tp_textspec *sp, tp_textdoc *d, const char *s, size_t n, uint8_t m, tp_err *err) {
    size_t at = d->ids.n;
    int rc = n ? tp_tokenizer_encode(sp->tok, s, n, 0, &d->ids, err) : TP_OK;
    if (rc == TP_OK) rc = mask_fit(d, err);
    if (rc == TP_OK) memset(d->mask + at, m, d->ids.n - at);
    return rc;
}

/* Append template t to out with each "{name}" placeholder of names replaced
 * by its value (values may hold any bytes, NUL included; they are never
 * searched for placeholders). */
static void render(tp_strbuf *out, const char *t, size_t tn, int k, const char *const *names,
                   const char *const *vals, const size_t *lens) {
    size_t i = 0, lit = 0;
    while (i < tn) {
        int hit = -1;
        if (t[i] == '{')
            for (int j = 0; j < k && hit < 0; j++)
                if (!strncmp(t + i, names[j], strlen(names[j]))) hit = j;
        if (hit < 0) {
            i++;
            continue;
        }
        tp_strbuf_putn(out, t + lit, i - lit);
        tp_strbuf_putn(out, vals[hit], lens[hit]);
        i += strlen(names[hit]);
        lit = i;
    }
    tp_strbuf_putn(out, t + lit, tn - lit);
}

static int oom_if(const tp_strbuf *b, tp_err *err) {
    return b->oom ? tp_fail(err, TP_ENOMEM, "out of memory rendering a template") : TP_OK;
}

static const char *json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* Field name of object o as a string. optional: absent or null gives
 * *s = NULL. Returns 0, or 1 with why filled. */
static int str_field(const json_t *o, const char *where, const char *name, int optional, const char **s, size_t *n,
                     char *why, size_t nwhy) {
    const json_t *v = json_object_get(o, name);
    *s = NULL;
    *n = 0;
    if (!v || (optional && json_is_null(v))) {
        if (optional) return 0;
        snprintf(why, nwhy, "missing field '%s%s'", where, name);
        return 1;
    }
    if (!json_is_string(v)) {
        snprintf(why, nwhy, "field '%s%s' is %s, expected a string", where, name, json_kind(v));
        return 1;
    }
    *s = json_string_value(v);
    *n = json_string_length(v);
    return 0;
}

/* EOS (mask 1) at the end, unless the document already ends with it (a
 * template or text that closes with the EOS token itself). */
static int end_doc(const tp_textspec *sp, tp_textdoc *d, tp_err *err) {
    if (sp->eos < 0 || (d->ids.n && d->ids.ids[d->ids.n - 1] == sp->eos)) return TP_OK;
    return push_id(d, sp->eos, 1, err);
}

static int build_text(const tp_textspec *sp, const char *s, size_t n, tp_textdoc *d, tp_err *err) {
    int rc = sp->bos >= 0 ? push_id(d, sp->bos, 1, err) : TP_OK;
    if (rc == TP_OK) rc = piece(sp, d, s, n, 1, err);
    return rc == TP_OK ? end_doc(sp, d, err) : rc;
}

/* [BOS] prompt | output [EOS]: prompt and output encoded separately, so the
 * trained span is exactly the output's tokens (and EOS). */
static int build_alpaca(const tp_textspec *sp, const json_t *o, tp_textdoc *d, char *why, size_t nwhy, tp_err *err) {
    const char *ins, *inp, *out;
    size_t nins, ninp, nout;
    if (str_field(o, "", "instruction", 0, &ins, &nins, why, nwhy) ||
        str_field(o, "", "input", 1, &inp, &ninp, why, nwhy) || str_field(o, "", "output", 0, &out, &nout, why, nwhy))
        return TP_REC_BAD;
    static const char *const names[] = {"{instruction}", "{input}"};
    const char *vals[] = {ins, inp ? inp : ""};
    size_t lens[] = {nins, ninp};
    const char *t = ninp ? sp->dc->alpaca_prompt : sp->dc->alpaca_prompt_no_input;
    tp_strbuf p;
    tp_strbuf_init(&p);
    render(&p, t, strlen(t), 2, names, vals, lens);
    int rc = oom_if(&p, err);
    if (rc == TP_OK && sp->bos >= 0) rc = push_id(d, sp->bos, 0, err);
    if (rc == TP_OK) rc = piece(sp, d, p.buf, p.len, 0, err);
    if (rc == TP_OK) rc = piece(sp, d, out, nout, 1, err);
    if (rc == TP_OK) rc = end_doc(sp, d, err);
    tp_strbuf_free(&p);
    return rc;
}

/* Each message rendered with its role's template and encoded on its own;
 * an assistant message is split at {content}: the part before (the role
 * header) is not trained, its content and the rest of the template (the
 * closing tag) are. */
static int build_chat(const tp_textspec *sp, const json_t *o, tp_textdoc *d, char *why, size_t nwhy, tp_err *err) {
    const json_t *msgs = json_object_get(o, "messages");
    if (!msgs) {
        snprintf(why, nwhy, "missing field 'messages'");
        return TP_REC_BAD;
    }
    if (!json_is_array(msgs)) {
        snprintf(why, nwhy, "field 'messages' is %s, expected an array", json_kind(msgs));
        return TP_REC_BAD;
    }
    size_t nm = json_array_size(msgs), assistants = 0;
    if (nm == 0) {
        snprintf(why, nwhy, "field 'messages' is an empty array");
        return TP_REC_BAD;
    }
    static const char *const roles[] = {"system", "user", "assistant"};
    int *role = tp_malloc(nm * sizeof *role, err);
    if (!role) return TP_ENOMEM;
    for (size_t i = 0; i < nm; i++) { /* the whole record is checked before anything is encoded */
        const json_t *m = json_array_get(msgs, i);
        char where[48];
        const char *r, *c;
        size_t nr, nc;
        snprintf(where, sizeof where, "messages[%zu].", i);
        if (!json_is_object(m)) {
            snprintf(why, nwhy, "messages[%zu] is %s, expected an object {\"role\", \"content\"}", i, json_kind(m));
            free(role);
            return TP_REC_BAD;
        }
        if (str_field(m, where, "role", 0, &r, &nr, why, nwhy) || str_field(m, where, "content", 0, &c, &nc, why, nwhy)) {
            free(role);
            return TP_REC_BAD;
        }
        role[i] = -1;
        for (int k = 0; k < 3; k++)
            if (nr == strlen(roles[k]) && !memcmp(r, roles[k], nr)) role[i] = k;
        if (role[i] < 0) {
            snprintf(why, nwhy, "messages[%zu].role is '%.40s', expected system, user or assistant", i, r);
            free(role);
            return TP_REC_BAD;
        }
        assistants += role[i] == 2;
    }
    if (!assistants) {
        snprintf(why, nwhy, "no assistant message (nothing to train on)");
        free(role);
        return TP_REC_BAD;
    }
    const char *tmpl[] = {sp->dc->chat_system, sp->dc->chat_user, sp->dc->chat_assistant};
    static const char *const names[] = {"{content}"};
    int rc = sp->bos >= 0 ? push_id(d, sp->bos, 0, err) : TP_OK;
    tp_strbuf b;
    tp_strbuf_init(&b);
    for (size_t i = 0; i < nm && rc == TP_OK; i++) {
        const json_t *cv = json_object_get(json_array_get(msgs, i), "content");
        const char *vals[] = {json_string_value(cv)};
        size_t lens[] = {json_string_length(cv)};
        const char *t = tmpl[role[i]];
        b.len = 0;
        if (role[i] != 2) {
            render(&b, t, strlen(t), 1, names, vals, lens);
            if ((rc = oom_if(&b, err)) == TP_OK) rc = piece(sp, d, b.buf, b.len, 0, err);
            continue;
        }
        const char *at = strstr(t, names[0]); /* present: checked with the config */
        size_t head = at ? (size_t)(at - t) : strlen(t);
        rc = piece(sp, d, t, head, 0, err);
        render(&b, t + head, strlen(t + head), 1, names, vals, lens);
        if (rc == TP_OK && (rc = oom_if(&b, err)) == TP_OK) rc = piece(sp, d, b.buf, b.len, 1, err);
    }
    if (rc == TP_OK) rc = end_doc(sp, d, err);
    tp_strbuf_free(&b);
    free(role);
    return rc;
}

static int build_json(const tp_textspec *sp, const json_t *root, tp_textdoc *doc, char *why, size_t nwhy,
                      tp_err *err);

int tp_textdoc_build(const tp_textspec *sp, const char *rec, size_t n, tp_textdoc *doc, char *why, size_t nwhy,
                     tp_err *err) {
    doc->ids.n = 0;
    why[0] = 0;
    if (sp->txt) {
        if (is_blank(rec, n)) return TP_REC_EMPTY;
        if (!tp_utf8_valid(rec, n)) {
            snprintf(why, nwhy, "invalid UTF-8");
            return TP_REC_BAD;
        }
        return build_text(sp, rec, n, doc, err);
    }
    json_error_t je;
    json_t *root = json_loadb(rec, n, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        if (json_error_code(&je) == json_error_invalid_utf8)
            snprintf(why, nwhy, "invalid UTF-8 (byte %d)", je.position);
        else
            snprintf(why, nwhy, "not valid JSON: %s (column %d)", je.text, je.column);
        return TP_REC_BAD;
    }
    int rc = build_json(sp, root, doc, why, nwhy, err);
    json_decref(root);
    return rc;
}

/* The document of one parsed record (a JSONL line, a JSON array element). */
static int build_json(const tp_textspec *sp, const json_t *root, tp_textdoc *doc, char *why, size_t nwhy,
                      tp_err *err) {
    int rc;
    doc->ids.n = 0;
    why[0] = 0;
    if (!json_is_object(root)) {
        snprintf(why, nwhy, "expected a JSON object, got %s", json_kind(root));
        rc = TP_REC_BAD;
    } else if (sp->format == TP_TEXT_ALPACA) {
        rc = build_alpaca(sp, root, doc, why, nwhy, err);
    } else if (sp->format == TP_TEXT_CHAT) {
        rc = build_chat(sp, root, doc, why, nwhy, err);
    } else {
        const char *s;
        size_t len;
        if (str_field(root, "", sp->dc->text_field, 0, &s, &len, why, nwhy)) rc = TP_REC_BAD;
        else rc = len ? build_text(sp, s, len, doc, err) : TP_REC_EMPTY;
    }
    return rc;
}

/* ---- the source: records and rank slices ------------------------------------ */

typedef struct src {
    const char *b;
    size_t n;
    int array;   /* a JSON array of records (first non-blank byte '['), not JSONL */
    json_t *arr; /* the parsed array while building */
} src;

static int is_json_array(const tp_textspec *sp, const src *s) {
    size_t i = 0;
    while (i < s->n && strchr(" \t\r\n", s->b[i]) && s->b[i]) i++;
    return !sp->txt && i < s->n && s->b[i] == '[';
}

/* Every rank parses the whole array (the same bytes: all ranks agree). */
static int parse_array(const char *file, src *s, tp_err *err) {
    json_error_t je;
    s->arr = json_loadb(s->b, s->n, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &je);
    if (!s->arr && json_error_code(&je) == json_error_out_of_memory)
        return tp_fail(err, TP_ENOMEM, "%s: out of memory parsing the JSON array", file);
    if (!s->arr)
        return tp_fail(err, TP_EFORMAT,
                       "%s:%d:%d: not valid JSON: %s (a source whose first non-blank character is '[' is read as one "
                       "JSON array of records)",
                       file, je.line, je.column, je.text);
    return TP_OK;
}

static size_t line_end(const src *s, size_t p) {
    const char *q = memchr(s->b + p, '\n', s->n - p);
    return q ? (size_t)(q - s->b) : s->n;
}

/* Start of the first line at or after byte a. */
static size_t line_at(const src *s, size_t a) {
    if (a == 0) return 0;
    if (a > s->n) return s->n;
    return line_end(s, a - 1) < s->n ? line_end(s, a - 1) + 1 : s->n;
}

static uint64_t count_newlines(const src *s, size_t a, size_t e) {
    uint64_t k = 0;
    for (const char *p = s->b + a, *end = s->b + e; p < end; k++) {
        p = memchr(p, '\n', (size_t)(end - p));
        if (!p) break;
        p++;
    }
    return k;
}

/* A line's text without "\n" or "\r\n". */
static size_t chomp(const src *s, size_t p, size_t e) { return e > p && s->b[e - 1] == '\r' ? e - 1 : e; }

/* ---- per-rank build ------------------------------------------------------------ */

/* What a rank reports; gathered by every rank (fixed size, no pointers). */
typedef struct stats {
    int64_t status;
    uint64_t records, docs, tokens, bad, empty;
    uint64_t bad_lines[TD_KEEP];
    char why[TD_WHY];     /* reason of this rank's first bad record */
    char msg[TP_ERR_LEN]; /* the error when status != TP_OK */
} stats;

typedef struct builder {
    const tp_textspec *sp;
    const char *file;
    int abort_bad, array;
    tp_shard_writer *w;
    tp_textdoc doc;
    stats st;
    tp_err *err;
    /* progress (rank 0): the slice's size in bytes and, for arrays, records */
    int report;
    double t0, t_last;
    size_t slice_bytes;
    uint64_t slice_recs;
} builder;

/* Rank 0, at most every TD_PROGRESS_S: how far its slice is (bytes done, or
 * for arrays records done; MB/s from the share of the slice's bytes). */
static void progress(builder *B, size_t bytes_done, uint64_t recs_done) {
    double t = now_s();
    if (!B->report || t - B->t_last < TD_PROGRESS_S) return;
    B->t_last = t;
    double mb = B->array && B->slice_recs ? 1e-6 * (double)B->slice_bytes * (double)recs_done / (double)B->slice_recs
                                          : 1e-6 * (double)bytes_done;
    double pct = B->array ? (B->slice_recs ? 100.0 * (double)recs_done / (double)B->slice_recs : 100.0)
                          : (B->slice_bytes ? 100.0 * (double)bytes_done / (double)B->slice_bytes : 100.0);
    if (B->array)
        fprintf(stderr, "tptt: data: rank 0: %llu of %llu records of its slice (%.0f%%), %.1f MB/s\n",
                (unsigned long long)recs_done, (unsigned long long)B->slice_recs, pct, mb / (t - B->t0));
    else
        fprintf(stderr, "tptt: data: rank 0: %llu records, %.1f of %.1f MB of its slice (%.0f%%), %.1f MB/s\n",
                (unsigned long long)recs_done, mb, 1e-6 * (double)B->slice_bytes, pct, mb / (t - B->t0));
}

/* One record: a JSONL line or .txt text (s, n) starting on line `no`, or
 * element `no` (from 1) of a JSON array (v); returns TP_OK to go on. */
static int record(builder *B, const char *s, size_t n, const json_t *v, uint64_t no) {
    char why[TD_WHY];
    B->st.records++;
    int r = v ? build_json(B->sp, v, &B->doc, why, sizeof why, B->err)
              : tp_textdoc_build(B->sp, s, n, &B->doc, why, sizeof why, B->err);
    if (r < 0) return r;
    if (r == TP_REC_EMPTY) {
        B->st.empty++;
        return TP_OK;
    }
    if (r == TP_REC_BAD) {
        if (B->st.bad < TD_KEEP) B->st.bad_lines[B->st.bad] = no;
        if (!B->st.bad++) snprintf(B->st.why, sizeof B->st.why, "%s", why);
        if (B->abort_bad)
            return tp_fail(B->err, TP_EFORMAT, "%s:%s%llu: %s (data.bad_records: abort; 'skip' skips such records)",
                           B->file, B->array ? " record " : "", (unsigned long long)no, why);
        return TP_OK;
    }
    const tp_ids *ids = &B->doc.ids;
    int rc = tp_shard_writer_add(B->w, (const uint32_t *)ids->ids, B->sp->format == TP_TEXT_TEXT ? NULL : B->doc.mask,
                                 ids->n, B->err);
    if (rc == TP_OK) {
        B->st.docs++;
        B->st.tokens += ids->n;
    }
    return rc;
}

/* The records starting in lines [L, Lnext) of the source; line numbers
 * start at first_line. */
static int scan(builder *B, const src *s, size_t L, size_t Lnext, uint64_t first_line) {
    const tp_textspec *sp = B->sp;
    int rc = TP_OK;
    uint64_t line = first_line;
    if (sp->txt && sp->unit == TP_UNIT_DOCUMENT) /* the whole file is one record, rank of byte 0 */
        return L == 0 && Lnext > 0 ? record(B, s->b, s->n, NULL, 1) : TP_OK;
    int prev_blank = 1; /* paragraphs: whether the line before p is blank */
    if (sp->txt && sp->unit == TP_UNIT_PARAGRAPH && L > 0 && L < Lnext) {
        const char *q = memrchr(s->b, '\n', L - 1);
        size_t ps = q ? (size_t)(q - s->b) + 1 : 0;
        prev_blank = is_blank(s->b + ps, L - 1 - ps);
    }
    for (size_t p = L; p < Lnext && rc == TP_OK; line++) {
        size_t e = line_end(s, p);
        int blank = is_blank(s->b + p, e - p);
        if (!sp->txt) {
            if (!blank) rc = record(B, s->b + p, e - p, NULL, line);
        } else if (sp->unit == TP_UNIT_LINE) {
            if (!blank) rc = record(B, s->b + p, chomp(s, p, e) - p, NULL, line);
        } else if (!blank && prev_blank) { /* a paragraph: this line to the next blank one */
            size_t last = e;
            for (size_t q = e; q < s->n;) {
                size_t qe = line_end(s, q + 1);
                if (is_blank(s->b + q + 1, qe - q - 1)) break;
                last = qe;
                q = qe;
            }
            rc = record(B, s->b + p, chomp(s, p, last) - p, NULL, line);
        }
        prev_blank = blank;
        p = e + 1;
        progress(B, (p < Lnext ? p : Lnext) - L, B->st.records);
    }
    return rc;
}

/* Elements [i0, i1) of a JSON array source; record numbers from 1. */
static int scan_array(builder *B, const json_t *arr, size_t i0, size_t i1) {
    int rc = TP_OK;
    for (size_t i = i0; i < i1 && rc == TP_OK; i++) {
        rc = record(B, NULL, 0, json_array_get(arr, i), (uint64_t)i + 1);
        progress(B, 0, (uint64_t)(i + 1 - i0));
    }
    return rc;
}

/* ---- cache key, paths, sidecar ------------------------------------------------- */

static void h_bytes(XXH64_state_t *h, const void *p, size_t n) {
    uint64_t len = n;
    XXH64_update(h, &len, sizeof len);
    if (n) XXH64_update(h, p, n);
}

static void h_str(XXH64_state_t *h, const char *s) { h_bytes(h, s, strlen(s)); }

/* XXH64 of everything the documents depend on. */
static uint64_t cache_key(const tp_textspec *sp, const src *s) {
    XXH64_state_t st, *h = &st;
    const tp_data_cfg *dc = sp->dc;
    int32_t v[6] = {TD_VERSION, sp->format, sp->txt, sp->txt ? sp->unit : -1, sp->bos, sp->eos};
    uint64_t dig = tp_tokenizer_digest(sp->tok);
    XXH64_reset(h, 0);
    h_str(h, "tptt textdata");
    XXH64_update(h, v, sizeof v);
    XXH64_update(h, &dig, sizeof dig);
    if (sp->format == TP_TEXT_TEXT && !sp->txt) h_str(h, dc->text_field);
    if (sp->format == TP_TEXT_ALPACA) {
        h_str(h, dc->alpaca_prompt);
        h_str(h, dc->alpaca_prompt_no_input);
    }
    if (sp->format == TP_TEXT_CHAT) {
        h_str(h, dc->chat_system);
        h_str(h, dc->chat_user);
        h_str(h, dc->chat_assistant);
    }
    h_bytes(h, s->b, s->n);
    return XXH64_digest(h);
}

static uint64_t j_u64(const cJSON *o, const char *name) {
    int64_t v;
    return tp_json_int(cJSON_GetObjectItemCaseSensitive(o, name), 0, INT64_C(1) << 53, &v) ? (uint64_t)v : UINT64_MAX;
}

/* The cached shard is usable: the sidecar names this key, its counts match
 * the shard, and the shard passes every reader check. In abort mode a shard
 * built with skipped records is not (the rebuild then fails on the first). */
static int cache_ok(const char *shard, const char *side, const char *hex, int abort_bad, uint64_t *docs,
                    uint64_t *toks) {
    char *txt = NULL;
    tp_err e;
    if (!tp_exists(shard) || !tp_exists(side) || tp_read_file(side, SIDECAR_MAX, &txt, NULL, &e) != TP_OK) return 0;
    cJSON *j = cJSON_Parse(txt);
    free(txt);
    const cJSON *k = j ? cJSON_GetObjectItemCaseSensitive(j, "key") : NULL;
    int ok = cJSON_IsString(k) && !strcmp(k->valuestring, hex) && !(abort_bad && j_u64(j, "skipped") != 0);
    uint64_t nd = j ? j_u64(j, "documents") : 0, nt = j ? j_u64(j, "tokens") : 0;
    cJSON_Delete(j);
    tp_shard sh;
    if (!ok || tp_shard_map(shard, &sh, &e) != TP_OK) return 0;
    ok = sh.n_docs == nd && sh.n_tokens == nt;
    tp_shard_unmap(&sh);
    *docs = nd;
    *toks = nt;
    return ok;
}

/* Write a small file under a name no other job uses, then rename it. */
static int write_unique(const char *path, const char *tag, const char *text, tp_err *err) {
    size_t n = strlen(path) + strlen(tag) + 16;
    char *tmp = tp_malloc(n, err);
    if (!tmp) return TP_ENOMEM;
    snprintf(tmp, n, "%s.%s.tmp", path, tag);
    FILE *fp = fopen(tmp, "wb");
    int rc = fp ? TP_OK : tp_fail(err, TP_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    if (rc == TP_OK && fputs(text, fp) == EOF) rc = tp_fail(err, TP_EIO, "%s: write failed: %s", tmp, strerror(errno));
    if (fp) {
        int rc2 = tp_fclose_synced(fp, tmp, err);
        if (rc == TP_OK) rc = rc2;
    }
    if (rc == TP_OK) rc = tp_rename_synced(tmp, path, err);
    if (rc != TP_OK) unlink(tmp);
    free(tmp);
    return rc;
}

/* ---- prepare ------------------------------------------------------------------- */

static char *part_name(const char *shard, const char *tag, int rank, tp_err *err) {
    size_t n = strlen(shard) + strlen(tag) + 32;
    char *p = tp_malloc(n, err);
    if (p) snprintf(p, n, "%s.part%d.%s", shard, rank, tag);
    return p;
}

/* Rank 0: concatenate the parts in rank order into the shard. */
static int merge(const char *shard, const char *tag, int world, int with_mask, tp_err *err) {
    size_t n = strlen(shard) + strlen(tag) + 16;
    char *tmp = tp_malloc(n, err);
    if (!tmp) return TP_ENOMEM;
    snprintf(tmp, n, "%s.%s", shard, tag);
    tp_shard_writer *w;
    int rc = tp_shard_writer_open(tmp, with_mask, &w, err);
    for (int r = 0; r < world && rc == TP_OK; r++) {
        char *part = part_name(shard, tag, r, err);
        tp_shard sh;
        rc = part ? tp_shard_map(part, &sh, err) : TP_ENOMEM;
        for (uint64_t i = 0; rc == TP_OK && i < sh.n_docs; i++) {
            uint64_t a = sh.offsets[i], len = sh.offsets[i + 1] - a;
            rc = tp_shard_writer_add(w, sh.tokens + a, sh.mask ? sh.mask + a : NULL, (size_t)len, err);
        }
        if (part && rc == TP_OK) tp_shard_unmap(&sh);
        free(part);
    }
    if (rc == TP_OK) rc = tp_shard_writer_close(w, err);
    else if (w) tp_shard_writer_abort(w);
    if (rc == TP_OK) rc = tp_rename_synced(tmp, shard, err);
    if (rc != TP_OK) unlink(tmp);
    free(tmp);
    return rc;
}

static char *sidecar_json(const tp_train_cfg *c, const tp_textspec *sp, const char *hex, const src *s,
                          const stats *t, int world, double secs) {
    char dig[24];
    snprintf(dig, sizeof dig, "%016llx", (unsigned long long)tp_tokenizer_digest(sp->tok));
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "version", TD_VERSION);
    cJSON_AddStringToObject(j, "key", hex);
    cJSON_AddStringToObject(j, "source", c->data.path);
    cJSON_AddNumberToObject(j, "source_bytes", (double)s->n);
    cJSON_AddStringToObject(j, "format", c->data.format);
    cJSON_AddStringToObject(j, "tokenizer", tok_dir(c));
    cJSON_AddStringToObject(j, "tokenizer_digest", dig);
    cJSON_AddNumberToObject(j, "records", (double)t->records);
    cJSON_AddNumberToObject(j, "documents", (double)t->docs);
    cJSON_AddNumberToObject(j, "tokens", (double)t->tokens);
    cJSON_AddNumberToObject(j, "empty", (double)t->empty);
    cJSON_AddNumberToObject(j, "skipped", (double)t->bad);
    cJSON *bl = cJSON_AddArrayToObject(j, s->array ? "bad_records" : "bad_lines");
    for (uint64_t i = 0; bl && i < t->bad && i < TD_KEEP; i++)
        cJSON_AddItemToArray(bl, cJSON_CreateNumber((double)t->bad_lines[i]));
    if (t->bad) {
        char first[TD_WHY + 32];
        snprintf(first, sizeof first, "%s %llu: %s", s->array ? "record" : "line", (unsigned long long)t->bad_lines[0],
                 t->why);
        cJSON_AddStringToObject(j, "first_bad", first);
    }
    cJSON_AddNumberToObject(j, "ranks", world);
    cJSON_AddNumberToObject(j, "seconds", secs);
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    return out;
}

/* Sum the ranks' stats in rank order: the first failure, the first bad lines. */
static void combine(const stats *all, int world, stats *t) {
    memset(t, 0, sizeof *t);
    for (int r = 0; r < world; r++) {
        const stats *a = &all[r];
        if (a->status != TP_OK && t->status == TP_OK) {
            t->status = a->status;
            memcpy(t->msg, a->msg, sizeof t->msg);
        }
        for (uint64_t i = 0; i < a->bad && i < TD_KEEP && t->bad + i < TD_KEEP; i++) t->bad_lines[t->bad + i] = a->bad_lines[i];
        if (a->bad && !t->bad) memcpy(t->why, a->why, sizeof t->why);
        t->records += a->records;
        t->docs += a->docs;
        t->tokens += a->tokens;
        t->bad += a->bad;
        t->empty += a->empty;
    }
}

static void report_bad(const char *file, int array, const stats *t) {
    char lines[128] = "";
    size_t k = 0;
    const char *unit = array ? "record" : "line";
    for (uint64_t i = 0; i < t->bad && i < TD_KEEP && k < sizeof lines; i++)
        k += (size_t)snprintf(lines + k, sizeof lines - k, "%s%llu", i ? ", " : "", (unsigned long long)t->bad_lines[i]);
    fprintf(stderr, "tptt: data: skipped %llu bad record%s of %llu in %s (%s%s %s%s): %s %llu: %s\n",
            (unsigned long long)t->bad, t->bad == 1 ? "" : "s", (unsigned long long)t->records, file, unit,
            t->bad == 1 ? "" : "s", lines, t->bad > TD_KEEP ? ", ..." : "", unit, (unsigned long long)t->bad_lines[0],
            t->why);
}

/* Every rank: tokenize the records of its slice into its part file (part
 * NULL: out of memory, reported after the collective). nls: world entries. */
static void build_part(const tp_textspec *sp, const tp_train_cfg *c, const tp_dist *d, const src *s, const char *part,
                       uint64_t *nls, stats *st) {
    tp_err err = {0};
    builder B = {.sp = sp, .file = c->data.path, .abort_bad = !strcmp(c->data.bad_records, "abort"), .err = &err,
                 .array = s->array, .report = d->rank == 0, .t0 = now_s()};
    B.t_last = B.t0;
    /* a JSON array: elements [rN/W, (r+1)N/W); else the lines that start in
     * bytes [rS/W, (r+1)S/W) */
    uint64_t N = s->arr ? json_array_size(s->arr) : s->n;
    size_t a0 = (size_t)((unsigned __int128)N * (unsigned)d->rank / (unsigned)d->world);
    size_t a1 = (size_t)((unsigned __int128)N * (unsigned)(d->rank + 1) / (unsigned)d->world);
    size_t L = s->arr ? a0 : line_at(s, a0), Lnext = s->arr ? a1 : line_at(s, a1);
    B.slice_recs = s->arr ? a1 - a0 : 0;
    B.slice_bytes = s->arr ? (size_t)((unsigned __int128)s->n * B.slice_recs / (N ? N : 1)) : Lnext - L;
    /* line numbers: each rank counts the newlines of its own lines, the
     * ranks before it give the offset */
    uint64_t nl = s->arr ? 0 : count_newlines(s, L, Lnext), base = 0;
    if (d->world > 1 && !s->arr) tp_dist_allgather(&nl, sizeof nl, nls);
    for (int r = 0; r < d->rank; r++) base += nls[r];
    int rc = part ? tp_shard_writer_open(part, sp->format != TP_TEXT_TEXT, &B.w, &err)
                  : tp_fail(&err, TP_ENOMEM, "out of memory");
    if (rc == TP_OK) rc = s->arr ? scan_array(&B, s->arr, L, Lnext) : scan(&B, s, L, Lnext, base + 1);
    if (B.w) {
        if (rc == TP_OK) rc = tp_shard_writer_close(B.w, &err);
        else tp_shard_writer_abort(B.w);
    }
    tp_textdoc_free(&B.doc);
    *st = B.st;
    st->status = rc;
    if (rc != TP_OK) snprintf(st->msg, sizeof st->msg, "%s", err.msg);
}

/* Rank 0: key, paths, whether the cached shard is usable; the plan every
 * rank receives is "R|B <tag> <shard path>" (R: reuse, B: build). */
static int plan_build(const tp_train_cfg *c, const tp_textspec *sp, const src *s, char **plan, char *hex,
                      uint64_t *docs, uint64_t *toks, tp_err *err) {
    const tp_data_cfg *dc = &c->data;
    const char *base = strrchr(dc->path, '/') ? strrchr(dc->path, '/') + 1 : dc->path;
    snprintf(hex, 17, "%016llx", (unsigned long long)cache_key(sp, s));
    char *cdir = dc->cache_dir[0] ? tp_strdup(dc->cache_dir, err) : tp_path_join(c->run_dir, "data-cache", err);
    size_t n = (cdir ? strlen(cdir) : 0) + strlen(base) + 200;
    char *shard = tp_malloc(n, err), *side = tp_malloc(n, err);
    *plan = tp_malloc(n + 200, err);
    int rc = cdir && shard && side && *plan ? tp_mkdir_p(cdir, err) : TP_ENOMEM;
    if (rc == TP_OK) {
        char host[64];
        snprintf(shard, n, "%s/%s.%s.tok", cdir, base, hex);
        snprintf(side, n, "%s/%s.%s.json", cdir, base, hex);
        if (gethostname(host, sizeof host) != 0) snprintf(host, sizeof host, "host");
        host[sizeof host - 1] = 0;
        for (char *p = host; *p; p++)
            if (*p == '/' || *p == '.' || *p == ' ') *p = '_';
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int reuse = cache_ok(shard, side, hex, !strcmp(dc->bad_records, "abort"), docs, toks);
        /* the tag makes temporary names unique across concurrent jobs */
        snprintf(*plan, n + 200, "%c %s-%ld-%llx %s", reuse ? 'R' : 'B', host, (long)getpid(),
                 (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec, shard);
    }
    free(cdir);
    free(shard);
    free(side);
    return rc;
}

/* Rank 0, after every part is written: the shard (parts merged in rank
 * order), the sidecar, the report. */
static int finish(const tp_train_cfg *c, const tp_textspec *sp, const tp_dist *d, const src *s, const char *shard,
                  const char *tag, const char *hex, const stats *t, double t0, tp_err *err) {
    int rc;
    char *p0 = part_name(shard, tag, 0, err);
    if (!p0) return TP_ENOMEM;
    if (d->world == 1) rc = tp_rename_synced(p0, shard, err);
    else rc = merge(shard, tag, d->world, sp->format != TP_TEXT_TEXT, err);
    free(p0);
    for (int r = 0; r < d->world; r++) {
        char *p = part_name(shard, tag, r, err);
        if (p) unlink(p);
        free(p);
    }
    size_t n = strlen(shard);
    char *side = rc == TP_OK ? tp_malloc(n + 8, err) : NULL;
    char *js = side ? sidecar_json(c, sp, hex, s, t, d->world, now_s() - t0) : NULL;
    if (side) snprintf(side, n + 8, "%.*s.json", (int)(n - 4), shard); /* <base>.<hex>.tok -> .json */
    if (rc == TP_OK) rc = js ? write_unique(side, tag, js, err) : tp_fail(err, TP_ENOMEM, "out of memory");
    free(js);
    free(side);
    if (rc != TP_OK) return rc;
    if (t->bad) report_bad(c->data.path, s->array, t);
    double secs = now_s() - t0;
    fprintf(stderr, "tptt: data: wrote %s: %llu document%s, %llu tokens from %llu record%s%s in %.1f s (%.0f tokens/s)\n",
            shard, (unsigned long long)t->docs, t->docs == 1 ? "" : "s", (unsigned long long)t->tokens,
            (unsigned long long)t->records, t->records == 1 ? "" : "s", t->empty ? " (empty ones skipped)" : "", secs,
            secs > 0 ? (double)t->tokens / secs : 0.0);
    return TP_OK;
}

int tp_textdata_prepare(const tp_train_cfg *c, tp_tokenizer *tok, const tp_dist *d, char **out, tp_err *err) {
    const tp_data_cfg *dc = &c->data;
    *out = NULL;
    if (!strcmp(dc->format, "tokens")) return (*out = tp_strdup(dc->path, err)) ? TP_OK : TP_ENOMEM;
    double t0 = now_s();
    tp_textspec sp;
    src s = {NULL, 0, 0, NULL};
    const void *map = NULL;
    char *plan = NULL, *shard = NULL, *part = NULL, hex[24] = "", tag[160] = "", mode = 0;
    uint64_t docs = 0, toks = 0, *nls = NULL;
    stats mine, *all = NULL, t;
    memset(&mine, 0, sizeof mine);
    /* every step that can fail on one rank is agreed on before the next
     * collective, so no rank is left waiting */
    int rc = tp_dist_agree(d, tp_textspec_init(c, tok, &sp, err), err);
    if (rc == TP_OK) rc = tp_dist_agree(d, tp_map_readonly(dc->path, &map, &s.n, err), err);
    s.b = map;
    s.array = rc == TP_OK && is_json_array(&sp, &s);
    if (rc == TP_OK)
        rc = tp_dist_agree(d, d->rank == 0 ? plan_build(c, &sp, &s, &plan, hex, &docs, &toks, err) : TP_OK, err);
    if (rc == TP_OK && d->world > 1) rc = tp_dist_agree(d, tp_dist_bcast_string(&plan, err), err);
    if (rc == TP_OK) {
        const char *sp2 = strchr(plan + 2, ' ');
        mode = plan[0];
        snprintf(tag, sizeof tag, "%.*s", (int)(sp2 - plan - 2), plan + 2);
        shard = tp_strdup(sp2 + 1, err);
        part = shard ? part_name(shard, tag, d->rank, err) : NULL;
        nls = tp_calloc((size_t)d->world, sizeof *nls, err);
        all = tp_calloc((size_t)d->world, sizeof *all, err);
        rc = tp_dist_agree(d, shard && part && nls && all ? TP_OK : TP_ENOMEM, err);
    }
    if (rc == TP_OK && mode == 'R') {
        if (d->rank == 0)
            fprintf(stderr, "tptt: data: reusing cached shard %s (%llu documents, %llu tokens from %s)\n", shard,
                    (unsigned long long)docs, (unsigned long long)toks, dc->path);
    } else if (rc == TP_OK) {
        if (d->rank == 0)
            fprintf(stderr, "tptt: data: tokenizing %s (%.1f MB%s, format %s) on %d rank%s ...\n", dc->path,
                    (double)s.n / 1e6, s.array ? ", a JSON array" : "", dc->format, d->world, d->world == 1 ? "" : "s");
        if (s.array) rc = tp_dist_agree(d, parse_array(dc->path, &s, err), err);
    }
    if (rc == TP_OK && mode == 'B') {
        build_part(&sp, c, d, &s, part, nls, &mine);
        json_decref(s.arr);
        s.arr = NULL;
        if (d->world > 1) tp_dist_allgather(&mine, sizeof mine, all);
        else all[0] = mine;
        combine(all, d->world, &t);
        if (t.status != TP_OK) rc = tp_fail(err, (int)t.status, "%s", t.msg);
        else if (t.docs == 0)
            rc = tp_fail(err, TP_EINVAL, "%s: no usable records (%llu record%s: %llu bad, %llu empty)%s%s", dc->path,
                         (unsigned long long)t.records, t.records == 1 ? "" : "s", (unsigned long long)t.bad,
                         (unsigned long long)t.empty,
                         t.bad ? "; the first bad one: " : "", t.bad ? t.why : "");
        if (rc != TP_OK) unlink(part);
        else rc = tp_dist_agree(d, d->rank == 0 ? finish(c, &sp, d, &s, shard, tag, hex, &t, t0, err) : TP_OK, err);
    }
    json_decref(s.arr);
    tp_unmap(map, s.n);
    free(plan);
    free(part);
    free(nls);
    free(all);
    if (rc == TP_OK) *out = shard;
    else free(shard);
    return rc;
}

int tp_textdata_prepare_eval(const tp_train_cfg *c, tp_tokenizer *tok, const tp_dist *d, char **out, tp_err *err) {
    *out = NULL;
    if (!c->eval.path[0]) return TP_OK;
    tp_train_cfg *ec = tp_malloc(sizeof *ec, err); /* large: keep it off the stack */
    if (!ec) return TP_ENOMEM;
    *ec = *c;
    snprintf(ec->data.path, sizeof ec->data.path, "%s", c->eval.path);
    int rc = tp_textdata_prepare(ec, tok, d, out, err);
    free(ec);
    return rc ? tp_err_prefix(err, "eval.path") : TP_OK;
}
