/* mmlu.c - MMLU questions, prompts and HELM's generative metrics (mmlu.h).
 *
 * Sources the formats and definitions follow (read, not copied):
 *
 * Prompt. hendrycks/test evaluate.py: gen_prompt = "The following are
 *   multiple choice questions (with answers) about{format_subject}.\n\n" +
 *   the shots, format_example = question + "\n{L}. {choice}" per choice +
 *   "\nAnswer:" + (shots) " {answer}\n\n". Its format_subject puts a space
 *   before every word, so the original prints "about  abstract algebra"
 *   (two spaces); lm-evaluation-harness (lm_eval/tasks/mmlu/default/
 *   mmlu_*.yaml "description") and lighteval (src/lighteval/tasks/
 *   default_prompts.py, mmlu_harness / mmlu_helm: subject.replace('_', ' '))
 *   use one space, as we do. lm-evaluation-harness strips the question
 *   ({{question.strip()}}); Hendrycks, HELM and lighteval do not, nor do we.
 *   HELM itself (stanford-crfm/helm, src/helm/benchmark/run_specs/
 *   lite_run_specs.py get_mmlu_spec: multiple_choice_joint adapter with
 *   input_noun "Question", output_noun "Answer") and lighteval's mmlu_helm
 *   put "Question: " before each question; this module uses the
 *   unprefixed form above.
 *
 * Log-likelihood. lm-evaluation-harness _default_template_yaml: doc_to_text
 *   ends in "Answer:", doc_to_choice ["A", "B", "C", "D"], target_delimiter
 *   " " (the TaskConfig default), fewshot_delimiter "\n\n", fewshot_config
 *   sampler first_n, fewshot_split dev: the continuations are " A" .. " D".
 *
 * Generative metrics. stanford-crfm/helm, src/helm/benchmark/metrics/
 *   evaluate_reference_metrics.py:
 *     normalize_text(t) = white_space_fix(remove_articles(remove_punc(lower(t))))
 *       remove_punc: drop every character of Python's string.punctuation
 *       remove_articles: re.sub(r"\b(a|an|the)\b", " ", t)
 *       white_space_fix: " ".join(t.split())
 *     exact_match(gold, pred)          = pred and gold.strip() == pred.strip()
 *     quasi_exact_match(gold, pred)    = pred and normalize_text(gold) == normalize_text(pred)
 *     prefix_exact_match(gold, pred)   = pred and pred.strip().startswith(gold.strip())
 *     quasi_prefix_exact_match(g, p)   = pred and normalize_text(p).startswith(normalize_text(g))
 *   and compute_reference_metrics strips every completion first
 *   (preds = [completion.text.strip() ...]), so an all-whitespace
 *   continuation is the empty prediction and scores 0 everywhere. (lighteval's
 *   ExactMatches tests `not pred` before stripping, so there " " would score
 *   pqem 1 for gold A; we follow HELM.) HELM's multiple_choice_joint adapter
 *   also maps the stripped prediction through output_mapping (letter ->
 *   choice text) and compares choice texts; we compare against the gold
 *   letter directly, as lighteval does with golds " A" .. " D".
 *
 *   Known quirk, kept on purpose: the article regex removes the letter "a",
 *   so normalize_text("A") == "". Hence for gold A, qem is 1 for any
 *   prediction that normalises to "" ("a", "A.", "(A)", "the"), and pqem is 1
 *   for every non-empty prediction ("" is a prefix of everything). Golds B, C,
 *   D normalise to "b", "c", "d".
 *
 * This normaliser matches Python on what Python's str methods do to
 * whitespace and word boundaries: whitespace is str.isspace() (ASCII \t \n
 * \v \f \r, 0x1c-0x1f, space, and U+0085, U+00A0, U+1680, U+2000-U+200A,
 * U+2028, U+2029, U+202F, U+205F, U+3000), a word character for \b is a
 * letter or number (Unicode categories L*, N*; '_' is punctuation and gone by
 * then). It differs in one place: only ASCII letters are lower-cased
 * (Python's str.lower() also folds non-ASCII capitals). */
#include "eval/mmlu.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tok/tokenizer.h"
#include "util/fsutil.h"

#define MMLU_WARN_MAX 10

/* ---- the set ------------------------------------------------------------- */

static void item_free(tp_mmlu_item *it) {
    free(it->subject);
    free(it->question);
    for (int j = 0; j < 4; j++) free(it->choices[j]);
    free(it->file);
}

void tp_mmlu_set_free(tp_mmlu_set *s) {
    if (!s) return;
    for (size_t i = 0; i < s->n; i++) item_free(&s->items[i]);
    free(s->items);
    s->items = NULL;
    s->n = 0;
}

typedef struct reader {
    tp_mmlu_set *out;
    size_t cap;
    int64_t skipped;
    int warned;
} reader;

static char *dupn(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

/* Append an item (copies every string). */
static int push_item(reader *r, const char *subject, const char *q, size_t qn, const char *const ch[4],
                     const size_t chn[4], int answer, const char *file, int64_t line, tp_err *err) {
    if (r->out->n == r->cap) {
        size_t nc = r->cap ? r->cap * 2 : 64;
        tp_mmlu_item *p = realloc(r->out->items, nc * sizeof *p);
        if (!p) return tp_fail(err, TP_ENOMEM, "mmlu: out of memory reading %s", file);
        r->out->items = p;
        r->cap = nc;
    }
    tp_mmlu_item it = {0};
    it.subject = strdup(subject);
    it.question = dupn(q, qn);
    for (int j = 0; j < 4; j++) it.choices[j] = dupn(ch[j], chn[j]);
    it.file = strdup(file);
    it.answer = answer;
    it.line = line;
    int ok = it.subject && it.question && it.file;
    for (int j = 0; j < 4; j++) ok = ok && it.choices[j];
    if (!ok) {
        item_free(&it);
        return tp_fail(err, TP_ENOMEM, "mmlu: out of memory reading %s", file);
    }
    r->out->items[r->out->n++] = it;
    return TP_OK;
}

static void skip_row(reader *r, const char *file, int64_t line, const char *what, const char *why) {
    r->skipped++;
    if (r->out->quiet) return;
    if (r->warned < MMLU_WARN_MAX)
        fprintf(stderr, "tptt: mmlu: %s:%lld: skipped %s: %s\n", file, (long long)line, what, why);
    else if (r->warned == MMLU_WARN_MAX)
        fprintf(stderr, "tptt: mmlu: more bad %ss skipped (not listed)\n", what);
    if (r->warned <= MMLU_WARN_MAX) r->warned++;
}

/* "A".."D" after trimming spaces (and tabs) -> 0..3, else -1. */
static int answer_letter(const char *s, size_t n) {
    while (n && (*s == ' ' || *s == '\t')) s++, n--;
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t')) n--;
    if (n != 1 || s[0] < 'A' || s[0] > 'D') return -1;
    return s[0] - 'A';
}

/* A short printable rendering of a bad answer for messages (cap >= 40). */
static void show(const char *s, size_t n, char *buf, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < n && i < 8; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7f) buf[k++] = (char)c;
        else k += (size_t)snprintf(buf + k, cap - k, "\\x%02x", c);
    }
    if (n > 8) memcpy(buf + k, "...", 3), k += 3;
    buf[k] = 0;
}

/* ---- CSV ------------------------------------------------------------------- */

typedef struct fieldbuf {
    char *b;
    size_t n, cap;
} fieldbuf;

static int fb_put(fieldbuf *f, const char *s, size_t n) {
    if (f->n + n + 1 > f->cap) {
        size_t nc = f->cap ? f->cap : 256;
        while (nc < f->n + n + 1) nc *= 2;
        char *p = realloc(f->b, nc);
        if (!p) return 0;
        f->b = p;
        f->cap = nc;
    }
    memcpy(f->b + f->n, s, n);
    f->n += n;
    f->b[f->n] = 0;
    return 1;
}

/* Line breaks in b[0..n): LF, CRLF and lone CR each count once. */
static int64_t count_lines(const char *b, size_t n, int cr_then_lf_follows) {
    int64_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (b[i] == '\n') k++;
        else if (b[i] == '\r' && !(i + 1 < n ? b[i + 1] == '\n' : cr_then_lf_follows)) k++;
    }
    return k;
}

static int parse_csv(reader *r, const char *path, const char *subject, const char *b, size_t n, tp_err *err) {
    fieldbuf f[6] = {{0}};
    int rc = TP_OK;
    size_t i = 0;
    int64_t line = 1;
    if (n >= 3 && (unsigned char)b[0] == 0xEF && (unsigned char)b[1] == 0xBB && (unsigned char)b[2] == 0xBF) i = 3;
    while (i < n) {
        /* blank line */
        if (b[i] == '\n' || b[i] == '\r') {
            if (b[i] == '\r' && i + 1 < n && b[i + 1] == '\n') i++;
            i++;
            line++;
            continue;
        }
        int64_t row_line = line;
        int nf = 0, oom = 0;
        for (int j = 0; j < 6; j++) f[j].n = 0;
        for (;;) {
            fieldbuf *fb = nf < 6 ? &f[nf] : NULL;
            if (i < n && b[i] == '"') {
                int64_t qline = line;
                i++;
                for (;;) {
                    const char *q = i < n ? memchr(b + i, '"', n - i) : NULL;
                    if (!q) {
                        rc = tp_fail(err, TP_EFORMAT,
                                     "%s:%lld: unterminated quoted field (the file ends inside the quotes)", path,
                                     (long long)qline);
                        goto done;
                    }
                    size_t k = (size_t)(q - (b + i));
                    line += count_lines(b + i, k, 0);
                    if (fb && !fb_put(fb, b + i, k)) oom = 1;
                    i += k + 1;
                    if (i < n && b[i] == '"') { /* "" -> " */
                        if (fb && !fb_put(fb, "\"", 1)) oom = 1;
                        i++;
                        continue;
                    }
                    break;
                }
            }
            /* unquoted text, or text after a closing quote (kept, as Python's csv does) */
            size_t s = i;
            while (i < n && b[i] != ',' && b[i] != '\n' && b[i] != '\r') i++;
            if (fb && i > s && !fb_put(fb, b + s, i - s)) oom = 1;
            if (fb && !fb->b && !fb_put(fb, "", 0)) oom = 1;
            nf++;
            if (i < n && b[i] == ',') {
                i++;
                continue;
            }
            if (i < n) {
                if (b[i] == '\r' && i + 1 < n && b[i + 1] == '\n') i++;
                i++;
                line++;
            }
            break;
        }
        if (oom) {
            rc = tp_fail(err, TP_ENOMEM, "mmlu: out of memory reading %s", path);
            goto done;
        }
        char why[160];
        if (nf != 6) {
            snprintf(why, sizeof why, "%d field%s, expected 6 (question,A,B,C,D,answer)", nf, nf == 1 ? "" : "s");
            skip_row(r, path, row_line, "row", why);
            continue;
        }
        int bad = 0;
        for (int j = 0; j < 6 && !bad; j++) {
            if (memchr(f[j].b, 0, f[j].n)) {
                snprintf(why, sizeof why, "field %d holds a NUL byte", j + 1);
                bad = 1;
            } else if (!tp_utf8_valid(f[j].b, f[j].n)) {
                snprintf(why, sizeof why, "field %d is not valid UTF-8", j + 1);
                bad = 1;
            }
        }
        int ans = bad ? -1 : answer_letter(f[5].b, f[5].n);
        if (!bad && ans < 0) {
            char shown[48];
            show(f[5].b, f[5].n, shown, sizeof shown);
            snprintf(why, sizeof why, "answer \"%s\", expected A, B, C or D", shown);
            bad = 1;
        }
        if (bad) {
            skip_row(r, path, row_line, "row", why);
            continue;
        }
        const char *ch[4] = {f[1].b, f[2].b, f[3].b, f[4].b};
        const size_t chn[4] = {f[1].n, f[2].n, f[3].n, f[4].n};
        rc = push_item(r, subject, f[0].b, f[0].n, ch, chn, ans, path, row_line, err);
        if (rc) goto done;
    }
done:
    for (int j = 0; j < 6; j++) free(f[j].b);
    return rc;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int tp_mmlu_read_dir(const char *dir, const char *split, tp_mmlu_set *out, int64_t *skipped, tp_err *err) {
    out->items = NULL;
    out->n = 0;
    if (skipped) *skipped = 0;
    if (!dir || !*dir) return tp_fail(err, TP_EINVAL, "mmlu: no data directory given");
    if (!split || !*split || strchr(split, '/') || strlen(split) > 200)
        return tp_fail(err, TP_EINVAL, "mmlu: split '%s': expected dev, test or val", split ? split : "");
    reader r = {out, 0, 0, 0};
    char *sub = tp_path_join(dir, split, err);
    if (!sub) return TP_ENOMEM;
    char suffix[256];
    snprintf(suffix, sizeof suffix, "_%s.csv", split);
    size_t sl = strlen(suffix);
    char **subjects = NULL;
    size_t ns = 0, cs = 0;
    int rc = TP_OK;

    DIR *d = opendir(sub);
    if (!d) {
        rc = tp_fail(err, TP_EIO, "%s: cannot open the MMLU %s directory: %s (expected DIR/%s/<subject>_%s.csv)", sub,
                     split, strerror(errno), split, split);
        goto out;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.' || len <= sl || strcmp(e->d_name + len - sl, suffix)) continue;
        if (ns == cs) {
            size_t nc = cs ? cs * 2 : 64;
            char **p = realloc(subjects, nc * sizeof *p);
            if (!p) {
                closedir(d);
                rc = tp_fail(err, TP_ENOMEM, "mmlu: out of memory listing %s", sub);
                goto out;
            }
            subjects = p;
            cs = nc;
        }
        subjects[ns] = dupn(e->d_name, len - sl);
        if (!subjects[ns]) {
            closedir(d);
            rc = tp_fail(err, TP_ENOMEM, "mmlu: out of memory listing %s", sub);
            goto out;
        }
        ns++;
    }
    closedir(d);
    if (!ns) {
        rc = tp_fail(err, TP_EFORMAT, "%s: no <subject>%s files", sub, suffix);
        goto out;
    }
    qsort(subjects, ns, sizeof *subjects, cmp_str);
    for (size_t k = 0; k < ns; k++) {
        char name[1024];
        snprintf(name, sizeof name, "%s%s", subjects[k], suffix);
        char *path = tp_path_join(sub, name, err);
        if (!path) {
            rc = TP_ENOMEM;
            goto out;
        }
        const void *map = NULL;
        size_t size = 0;
        rc = tp_map_readonly(path, &map, &size, err);
        if (!rc) {
            rc = parse_csv(&r, path, subjects[k], map, size, err);
            tp_unmap(map, size);
        }
        free(path);
        if (rc) goto out;
    }
    if (!out->n)
        rc = tp_fail(err, TP_EFORMAT, "%s: no usable questions in %zu file%s (%lld row%s skipped)", sub, ns,
                     ns == 1 ? "" : "s", (long long)r.skipped, r.skipped == 1 ? "" : "s");
out:
    for (size_t k = 0; k < ns; k++) free(subjects[k]);
    free(subjects);
    free(sub);
    if (skipped) *skipped = r.skipped;
    if (rc) tp_mmlu_set_free(out);
    return rc;
}

/* ---- JSONL ----------------------------------------------------------------- */

/* The string value of o, or NULL (why says what is wrong). */
static const char *jstr(json_t *v, const char *name, size_t *len, char *why, size_t nwhy) {
    if (!v) {
        snprintf(why, nwhy, "missing field '%s'", name);
        return NULL;
    }
    if (!json_is_string(v)) {
        snprintf(why, nwhy, "field '%s' is not a string", name);
        return NULL;
    }
    const char *s = json_string_value(v);
    *len = json_string_length(v);
    if (memchr(s, 0, *len)) {
        snprintf(why, nwhy, "field '%s' holds a NUL character", name);
        return NULL;
    }
    return s;
}

/* One record; 1 = pushed, 0 = bad (why filled), < 0 = error. */
static int jsonl_record(reader *r, const char *path, int64_t line, const char *rec, size_t n, char *why, size_t nwhy,
                        tp_err *err) {
    json_error_t je;
    json_t *root = json_loadb(rec, n, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        snprintf(why, nwhy, "invalid JSON: %s (column %d)", je.text, je.column);
        return 0;
    }
    int res = 0;
    if (!json_is_object(root)) {
        snprintf(why, nwhy, "not a JSON object");
        goto out;
    }
    size_t qn = 0, sn = 3, chn[4];
    const char *subject = "all", *ch[4];
    json_t *sv = json_object_get(root, "subject");
    if (sv && !json_is_null(sv)) {
        subject = jstr(sv, "subject", &sn, why, nwhy);
        if (!subject) goto out;
        if (!sn) {
            snprintf(why, nwhy, "field 'subject' is empty");
            goto out;
        }
    }
    const char *q = jstr(json_object_get(root, "question"), "question", &qn, why, nwhy);
    if (!q) goto out;
    json_t *cv = json_object_get(root, "choices");
    if (!json_is_array(cv) || json_array_size(cv) != 4) {
        snprintf(why, nwhy, "field 'choices' is not an array of 4 strings");
        goto out;
    }
    for (int j = 0; j < 4; j++) {
        char nm[16];
        snprintf(nm, sizeof nm, "choices[%d]", j);
        ch[j] = jstr(json_array_get(cv, (size_t)j), nm, &chn[j], why, nwhy);
        if (!ch[j]) goto out;
    }
    json_t *av = json_object_get(root, "answer");
    int ans = -1;
    if (json_is_integer(av)) {
        json_int_t a = json_integer_value(av);
        if (a >= 0 && a <= 3) ans = (int)a;
    } else if (json_is_string(av)) {
        ans = answer_letter(json_string_value(av), json_string_length(av));
    }
    if (ans < 0) {
        snprintf(why, nwhy, "field 'answer' is not 0..3 or \"A\"..\"D\"");
        goto out;
    }
    res = push_item(r, subject, q, qn, ch, chn, ans, path, line, err);
    if (!res) res = 1;
out:
    json_decref(root);
    return res;
}

int tp_mmlu_read_jsonl(const char *path, tp_mmlu_set *out, int64_t *skipped, tp_err *err) {
    out->items = NULL;
    out->n = 0;
    if (skipped) *skipped = 0;
    if (!path || !*path) return tp_fail(err, TP_EINVAL, "mmlu: no JSONL file given");
    reader r = {out, 0, 0, 0};
    const void *map = NULL;
    size_t size = 0;
    int rc = tp_map_readonly(path, &map, &size, err);
    if (rc) return rc;
    const char *b = map;
    size_t i = 0;
    if (size >= 3 && (unsigned char)b[0] == 0xEF && (unsigned char)b[1] == 0xBB && (unsigned char)b[2] == 0xBF) i = 3;
    int64_t line = 0;
    while (i < size) {
        line++;
        const char *nl = memchr(b + i, '\n', size - i);
        size_t end = nl ? (size_t)(nl - b) : size, len = end - i;
        const char *rec = b + i;
        i = nl ? end + 1 : size;
        if (len && rec[len - 1] == '\r') len--;
        size_t k = 0;
        while (k < len && (rec[k] == ' ' || rec[k] == '\t' || rec[k] == '\r')) k++;
        if (k == len) continue;
        char why[256];
        int res = jsonl_record(&r, path, line, rec, len, why, sizeof why, err);
        if (res < 0) {
            rc = res;
            break;
        }
        if (!res) skip_row(&r, path, line, "record", why);
    }
    tp_unmap(map, size);
    if (!rc && !out->n)
        rc = tp_fail(err, TP_EFORMAT, "%s: no usable MMLU records (%lld skipped)", path, (long long)r.skipped);
    if (skipped) *skipped = r.skipped;
    if (rc) tp_mmlu_set_free(out);
    return rc;
}

/* ---- shots and prompts ------------------------------------------------------ */

const tp_mmlu_item **tp_mmlu_shots(const tp_mmlu_set *dev, const char *subject, int k, int *got) {
    *got = 0;
    if (!dev || !subject || k <= 0) return NULL;
    const tp_mmlu_item **v = NULL;
    int m = 0;
    for (size_t i = 0; i < dev->n && m < k; i++) {
        if (strcmp(dev->items[i].subject, subject)) continue;
        if (!v) {
            v = calloc((size_t)k, sizeof *v);
            if (!v) {
                *got = -1;
                return NULL;
            }
        }
        v[m++] = &dev->items[i];
    }
    *got = m;
    return v;
}

static void put_question(tp_strbuf *s, const tp_mmlu_item *it) {
    tp_strbuf_puts(s, it->question);
    for (int j = 0; j < 4; j++) {
        char head[5] = {'\n', (char)('A' + j), '.', ' ', 0};
        tp_strbuf_puts(s, head);
        tp_strbuf_puts(s, it->choices[j]);
    }
    tp_strbuf_puts(s, "\nAnswer:");
}

char *tp_mmlu_prompt(const tp_mmlu_item *item, const tp_mmlu_item *const *shots, int nshots) {
    if (!item) return NULL;
    tp_strbuf s;
    tp_strbuf_init(&s);
    tp_strbuf_puts(&s, "The following are multiple choice questions (with answers) about ");
    size_t at = s.len;
    tp_strbuf_puts(&s, item->subject);
    if (!s.oom)
        for (size_t i = at; i < s.len; i++)
            if (s.buf[i] == '_') s.buf[i] = ' ';
    tp_strbuf_puts(&s, ".\n\n");
    for (int k = 0; k < nshots; k++) {
        const tp_mmlu_item *sh = shots[k];
        put_question(&s, sh);
        char tail[5] = {' ', (char)('A' + (sh->answer >= 0 && sh->answer < 4 ? sh->answer : 0)), '\n', '\n', 0};
        tp_strbuf_puts(&s, tail);
    }
    put_question(&s, item);
    if (s.oom) {
        tp_strbuf_free(&s);
        return NULL;
    }
    return s.buf;
}

const char *tp_mmlu_target(int choice) {
    static const char *const t[4] = {" A", " B", " C", " D"};
    return choice >= 0 && choice < 4 ? t[choice] : NULL;
}

/* ---- HELM normalisation and metrics ---------------------------------------- */

/* Python's string.punctuation. */
static int is_punct(unsigned char c) { return c < 0x80 && c > 0x20 && c != 0x7f && strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", c); }

/* str.isspace() */
static int cp_space(int32_t c) {
    if (c < 0x80) return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20);
    return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
           c == 0x202f || c == 0x205f || c == 0x3000;
}

/* \w after punctuation removal: letters and numbers. */
static int cp_word(int32_t c) {
    if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
        return 1;
    default:
        return 0;
    }
}

/* Next code point of s[i..n): its length (>= 1); an invalid byte is one
 * "code point" -1 (neither space nor word). */
static size_t next_cp(const char *s, size_t i, size_t n, int32_t *cp) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    utf8proc_int32_t v;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &v);
    if (k <= 0) {
        *cp = -1;
        return 1;
    }
    *cp = v;
    return (size_t)k;
}

typedef struct nout {
    char *out;
    size_t cap, len;
    int pending_space; /* whitespace (or a removed article) since the last byte written */
} nout;

static void nput(nout *o, const char *b, size_t n) {
    if (o->pending_space && o->len) {
        if (o->len + 1 < o->cap) o->out[o->len] = ' ';
        o->len++;
    }
    o->pending_space = 0;
    for (size_t k = 0; k < n; k++, o->len++)
        if (o->len + 1 < o->cap) o->out[o->len] = b[k];
}

size_t tp_helm_normalize(const char *in, size_t n, char *out, size_t cap) {
    nout o = {out, cap, 0, 0};
    /* The current run of word characters: while it may still be an article
     * (at most 3 ASCII letters) it is held in run[]; once it cannot, it is
     * written out and `flowing` is set. */
    char run[4];
    size_t rn = 0;
    int in_run = 0, flowing = 0;
    size_t i = 0;
    while (i <= n) {
        int32_t c = 0;
        size_t k = 0;
        int eos = i == n;
        if (!eos) {
            k = next_cp(in, i, n, &c);
            if (c >= 0 && c < 0x80 && is_punct((unsigned char)c)) { /* remove_punc (after lower) */
                i += k;
                continue;
            }
            if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
        }
        int word = !eos && c >= 0 && cp_word(c);
        if (word) {
            if (!in_run) {
                in_run = 1;
                flowing = 0;
                rn = 0;
            }
            if (!flowing) {
                if (c < 0x80 && rn < 3) {
                    run[rn++] = (char)c;
                    i += k;
                    continue;
                }
                nput(&o, run, rn); /* cannot be an article any more */
                flowing = 1;
            }
            char ch = (char)c;
            nput(&o, c < 0x80 ? &ch : in + i, c < 0x80 ? 1 : k);
            i += k;
            continue;
        }
        if (in_run) { /* the run ends: an article becomes a space */
            in_run = 0;
            if (!flowing) {
                int art = (rn == 1 && run[0] == 'a') || (rn == 2 && !memcmp(run, "an", 2)) ||
                          (rn == 3 && !memcmp(run, "the", 3));
                if (art) o.pending_space = 1;
                else nput(&o, run, rn);
            }
        }
        if (eos) break;
        if (c >= 0 && cp_space(c)) o.pending_space = 1;
        else nput(&o, in + i, k); /* other characters are kept */
        i += k;
    }
    if (cap) o.out[o.len < cap ? o.len : cap - 1] = 0;
    return o.len;
}

/* Python's str.strip(). */
static void py_strip(const char **s, size_t *n) {
    const char *p = *s;
    size_t m = *n, i = 0, start = m, end = m;
    while (i < m) {
        int32_t c;
        size_t k = next_cp(p, i, m, &c);
        if (c < 0 || !cp_space(c)) {
            if (start == m) start = i;
            end = i + k;
        }
        i += k;
    }
    *s = p + start;
    *n = end - start;
}

void tp_mmlu_gen_scores(const char *continuation, size_t n, int gold, tp_mmlu_gen *s) {
    s->em = s->pem = s->qem = s->pqem = 0;
    if (gold < 0 || gold > 3 || (!continuation && n)) return;
    const char *p = continuation ? continuation : "";
    py_strip(&p, &n); /* HELM strips every completion */
    if (!n) return;   /* `if not pred: return 0` */
    char g = (char)('A' + gold);
    s->em = n == 1 && p[0] == g;
    s->pem = p[0] == g;
    char ng[4], np[4];
    size_t lg = tp_helm_normalize(&g, 1, ng, sizeof ng); /* "" for A (the article quirk), else "b".."d" */
    size_t lp = tp_helm_normalize(p, n, np, sizeof np);
    s->qem = lp == lg && !memcmp(np, ng, lg);
    s->pqem = lp >= lg && !memcmp(np, ng, lg);
}

void tp_mmlu_stats(const double *x, size_t n, double *mean, double *stderr_) {
    double m = 0, se = 0;
    if (n) {
        for (size_t i = 0; i < n; i++) m += x[i];
        m /= (double)n;
    }
    if (n >= 2) {
        double ss = 0;
        for (size_t i = 0; i < n; i++) ss += (x[i] - m) * (x[i] - m);
        se = sqrt(ss / (double)(n - 1) / (double)n);
    }
    if (mean) *mean = m;
    if (stderr_) *stderr_ = se;
}
