/* cmd_make_shard.c - `tptt make-shard`: token shards without a tokenizer (raw
 * bytes or JSONL token ids), for tests and demos, and `--info` to describe a
 * shard (format: docs/data.md). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "data/dataset.h"
#include "util/fsutil.h"

#define MAX_ID 2147483647ll

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt make-shard --bytes [--doc-sep blank|line|file] [--vocab V] -o OUT.tok FILE...\n"
            "       tptt make-shard --jsonl [--vocab V] -o OUT.tok FILE...\n"
            "       tptt make-shard --info [--seq-len N] FILE.tok\n"
            "       tptt make-shard --rows FIRST[:COUNT] [--seq-len N] [--packing pack|pad]\n"
            "                       [--long-docs split|drop] FILE.tok\n"
            "\n"
            "--bytes   each byte is a token (id = byte value, vocab_hint 256). Documents are\n"
            "          separated by blank lines (default; a document keeps its lines' newlines),\n"
            "          one per line (--doc-sep line; the newline is dropped, empty lines skipped)\n"
            "          or one per file (--doc-sep file). A file always ends a document.\n"
            "--jsonl   one document per line: {\"ids\": [int, ...], \"mask\": [0|1, ...]}; \"mask\"\n"
            "          is optional (missing = all 1); the shard has a label mask if any line has\n"
            "          one. Blank lines are skipped. vocab_hint = largest id + 1.\n"
            "--vocab V set vocab_hint to V (every token must be below it).\n"
            "--info    validate a shard and print its header, counts, and the rows it packs into\n"
            "          at --seq-len (default 512) with long_docs=split and drop.\n"
            "--rows    print rows FIRST .. FIRST+COUNT-1 (COUNT default 1) as the trainer sees them, as\n"
            "          a `tptt dump` batch: {\"input_ids\", \"labels\", \"doc_starts\"}.\n"
            "The shard is written under a temporary name, fsync'ed and renamed into place.\n");
}

/* ---- a document being built ------------------------------------------ */

typedef struct docbuf {
    uint32_t *ids;
    uint8_t *mask;
    size_t n, cap;
} docbuf;

static int doc_reserve(docbuf *d, size_t n) {
    if (n <= d->cap) return 0;
    size_t cap = d->cap ? d->cap : 4096;
    while (cap < n) cap *= 2;
    uint32_t *ids = realloc(d->ids, cap * sizeof *ids);
    if (!ids) return -1;
    d->ids = ids;
    uint8_t *mask = realloc(d->mask, cap);
    if (!mask) return -1;
    d->mask = mask;
    d->cap = cap;
    return 0;
}

static void doc_free(docbuf *d) {
    free(d->ids);
    free(d->mask);
    memset(d, 0, sizeof *d);
}

/* ---- output: writer + vocab_hint ----------------------------------------
 * The writer records vocab_hint = largest id + 1. When another value is
 * wanted (--bytes: 256, --vocab V), the shard is written under an
 * intermediate name, its vocab_hint field patched and fsync'ed, and only then
 * renamed to OUT, so OUT still appears whole or not at all. */

typedef struct output {
    const char *path;
    char *part;
    tp_shard_writer *w;
    uint64_t n_docs, n_tokens;
    uint32_t max_id;
} output;

static int out_open(output *o, const char *path, int with_mask, tp_err *err) {
    memset(o, 0, sizeof *o);
    o->path = path;
    char *dir = tp_dirname(path, err);
    if (!dir) return TP_ENOMEM;
    struct stat st;
    int isdir = stat(dir, &st) == 0 && S_ISDIR(st.st_mode);
    int rc = isdir ? TP_OK : tp_fail(err, TP_EIO, "%s: cannot create: directory %s does not exist", path, dir);
    free(dir);
    if (rc != TP_OK) return rc;
    size_t n = strlen(path) + 32;
    o->part = tp_malloc(n, err);
    if (!o->part) return TP_ENOMEM;
    snprintf(o->part, n, "%s.part.%ld", path, (long)getpid());
    rc = tp_shard_writer_open(o->part, with_mask, &o->w, err);
    if (rc != TP_OK) {
        free(o->part);
        o->part = NULL;
    }
    return rc;
}

static int out_add(output *o, const docbuf *d, int with_mask, tp_err *err) {
    int rc = tp_shard_writer_add(o->w, d->ids, with_mask ? d->mask : NULL, d->n, err);
    if (rc != TP_OK) return rc;
    for (size_t i = 0; i < d->n; i++)
        if (d->ids[i] > o->max_id) o->max_id = d->ids[i];
    o->n_docs++;
    o->n_tokens += d->n;
    return TP_OK;
}

static void out_abort(output *o) {
    if (o->w) tp_shard_writer_abort(o->w);
    o->w = NULL;
    if (o->part) {
        unlink(o->part);
        free(o->part);
        o->part = NULL;
    }
}

static int out_close(output *o, uint64_t vocab, tp_err *err) {
    if (o->n_tokens == 0) {
        out_abort(o);
        return tp_fail(err, TP_EINVAL, "%s: not written: the input holds no tokens", o->path);
    }
    tp_shard_writer *w = o->w;
    o->w = NULL;
    int rc = tp_shard_writer_close(w, err);
    if (rc == TP_OK && vocab != (uint64_t)o->max_id + 1) {
        FILE *fp = fopen(o->part, "r+b");
        if (!fp) rc = tp_fail(err, TP_EIO, "%s: cannot reopen: %s", o->part, strerror(errno));
        else {
            uint8_t v[8];
            memcpy(v, &vocab, 8); /* little-endian host (dataset.c checks) */
            if (fseek(fp, 32, SEEK_SET) != 0 || fwrite(v, 1, 8, fp) != 8) {
                rc = tp_fail(err, TP_EIO, "%s: write failed: %s", o->part, strerror(errno));
                fclose(fp);
            } else rc = tp_fclose_synced(fp, o->part, err);
        }
    }
    if (rc == TP_OK) rc = tp_rename_synced(o->part, o->path, err);
    if (rc != TP_OK) unlink(o->part);
    free(o->part);
    o->part = NULL;
    return rc;
}

/* ---- --bytes ------------------------------------------------------------ */

enum { SEP_BLANK, SEP_LINE, SEP_FILE };

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strchr(" \t\r\n\v\f", s[i]) || s[i] == 0) return 0;
    return 1;
}

static int append_bytes(docbuf *d, const char *s, size_t n, int64_t vocab, const char *file, long lineno,
                        tp_err *err) {
    if (doc_reserve(d, d->n + n)) return tp_fail(err, TP_ENOMEM, "%s: out of memory", file);
    for (size_t i = 0; i < n; i++) {
        uint8_t b = (uint8_t)s[i];
        if (vocab > 0 && b >= vocab)
            return tp_fail(err, TP_EINVAL, "%s:%ld: byte 0x%02x is not below --vocab %lld", file, lineno, b,
                           (long long)vocab);
        d->ids[d->n] = b;
        d->mask[d->n] = 1;
        d->n++;
    }
    return TP_OK;
}

static int flush_doc(output *o, docbuf *d, tp_err *err) {
    int rc = TP_OK;
    if (d->n) rc = out_add(o, d, 0, err);
    d->n = 0;
    return rc;
}

static int bytes_file(output *o, const char *file, int sep, int64_t vocab, docbuf *d, tp_err *err) {
    FILE *fp = fopen(file, "rb");
    if (!fp) return tp_fail(err, TP_EIO, "%s: cannot open: %s", file, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long lineno = 0;
    int rc = TP_OK;
    d->n = 0;
    while (rc == TP_OK && (len = getline(&line, &cap, fp)) >= 0) {
        lineno++;
        size_t n = (size_t)len;
        if (sep == SEP_LINE) {
            if (n && line[n - 1] == '\n') n--;
            if (n && line[n - 1] == '\r') n--;
            if (!n) continue;
            rc = append_bytes(d, line, n, vocab, file, lineno, err);
            if (rc == TP_OK) rc = flush_doc(o, d, err);
        } else if (sep == SEP_BLANK && is_blank(line, n)) {
            rc = flush_doc(o, d, err);
        } else {
            rc = append_bytes(d, line, n, vocab, file, lineno, err);
        }
    }
    if (rc == TP_OK && ferror(fp)) rc = tp_fail(err, TP_EIO, "%s: read failed: %s", file, strerror(errno));
    if (rc == TP_OK) rc = flush_doc(o, d, err);
    free(line);
    fclose(fp);
    return rc;
}

/* ---- --jsonl ------------------------------------------------------------ */

/* Parse one line into d (ids, mask; *has_mask says whether it had one).
 * Returns 1 for a blank line, 0 for a document, <0 with err filled. */
static int parse_jsonl_line(const char *file, long lineno, const char *line, size_t len, int64_t vocab, docbuf *d,
                            int *has_mask, tp_err *err) {
    d->n = 0;
    *has_mask = 0;
    if (strlen(line) != len) return tp_fail(err, TP_EFORMAT, "%s:%ld: line contains a NUL byte", file, lineno);
    if (is_blank(line, len)) return 1;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(line, &end, 0);
    if (!root)
        return tp_fail(err, TP_EFORMAT, "%s:%ld: not valid JSON (near column %ld)", file, lineno,
                       end ? (long)(end - line) + 1 : 1L);
    int rc = TP_OK;
    if (!is_blank(end, strlen(end))) {
        rc = tp_fail(err, TP_EFORMAT, "%s:%ld: trailing characters after the JSON value (column %ld)", file, lineno,
                     (long)(end - line) + 1);
        goto done;
    }
    if (!cJSON_IsObject(root)) {
        rc = tp_fail(err, TP_EFORMAT, "%s:%ld: expected a JSON object {\"ids\": [...], \"mask\": [...]}", file, lineno);
        goto done;
    }
    const cJSON *ids = NULL, *mask = NULL, *e;
    for (e = root->child; e; e = e->next) {
        const cJSON **slot = !strcmp(e->string, "ids") ? &ids : !strcmp(e->string, "mask") ? &mask : NULL;
        if (!slot) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%ld: unknown key \"%.64s\" (expected \"ids\" and optionally \"mask\")",
                         file, lineno, e->string);
            goto done;
        }
        if (*slot) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%ld: duplicate key \"%s\"", file, lineno, e->string);
            goto done;
        }
        *slot = e;
    }
    if (!ids) {
        rc = tp_fail(err, TP_EFORMAT, "%s:%ld: missing \"ids\"", file, lineno);
        goto done;
    }
    if (!cJSON_IsArray(ids)) {
        rc = tp_fail(err, TP_EFORMAT, "%s:%ld: \"ids\" is not an array", file, lineno);
        goto done;
    }
    size_t n = (size_t)cJSON_GetArraySize(ids);
    if (doc_reserve(d, n)) {
        rc = tp_fail(err, TP_ENOMEM, "%s:%ld: out of memory", file, lineno);
        goto done;
    }
    size_t i = 0;
    cJSON_ArrayForEach(e, ids) {
        double v = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (!(v >= 0 && v <= (double)MAX_ID) || v != floor(v)) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%ld: ids[%zu] is not an integer in [0, %lld]", file, lineno, i, MAX_ID);
            goto done;
        }
        if (vocab > 0 && v >= (double)vocab) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%ld: ids[%zu] = %.0f is not below --vocab %lld", file, lineno, i, v,
                         (long long)vocab);
            goto done;
        }
        d->ids[i] = (uint32_t)v;
        d->mask[i] = 1;
        i++;
    }
    d->n = n;
    if (mask) {
        if (!cJSON_IsArray(mask)) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%ld: \"mask\" is not an array", file, lineno);
            goto done;
        }
        size_t m = (size_t)cJSON_GetArraySize(mask);
        if (m != n) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%ld: \"mask\" has %zu entries but \"ids\" has %zu", file, lineno, m, n);
            goto done;
        }
        i = 0;
        cJSON_ArrayForEach(e, mask) {
            int bit;
            if (cJSON_IsBool(e)) bit = cJSON_IsTrue(e);
            else if (cJSON_IsNumber(e) && (e->valuedouble == 0 || e->valuedouble == 1)) bit = e->valuedouble == 1;
            else {
                rc = tp_fail(err, TP_EFORMAT, "%s:%ld: mask[%zu] is not 0 or 1", file, lineno, i);
                goto done;
            }
            d->mask[i++] = (uint8_t)bit;
        }
        *has_mask = 1;
    }
done:
    cJSON_Delete(root);
    return rc;
}

/* One pass over a JSONL file: with o == NULL only validate (and note whether
 * any line has a mask), else add every document to o. */
static int jsonl_file(output *o, const char *file, int64_t vocab, int with_mask, int *any_mask, docbuf *d,
                      tp_err *err) {
    FILE *fp = fopen(file, "rb");
    if (!fp) return tp_fail(err, TP_EIO, "%s: cannot open: %s", file, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long lineno = 0;
    int rc = TP_OK;
    while (rc == TP_OK && (len = getline(&line, &cap, fp)) >= 0) {
        lineno++;
        int has_mask;
        int r = parse_jsonl_line(file, lineno, line, (size_t)len, vocab, d, &has_mask, err);
        if (r < 0) rc = r;
        else if (r == 0) {
            if (has_mask) *any_mask = 1;
            if (o) rc = out_add(o, d, with_mask, err);
        }
    }
    if (rc == TP_OK && ferror(fp)) rc = tp_fail(err, TP_EIO, "%s: read failed: %s", file, strerror(errno));
    free(line);
    fclose(fp);
    return rc;
}

/* ---- --info ------------------------------------------------------------- */

static uint64_t le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static int info(const char *path, int64_t seq_len) {
    tp_err err = {0};
    tp_dataset *ds;
    if (tp_dataset_open(path, seq_len, 0, &ds, &err) != TP_OK) return tp_cli_error(err.msg);
    int64_t rows_split = tp_dataset_rows(ds);
    uint64_t max_tok = tp_dataset_max_token(ds);
    tp_dataset_close(ds);
    int64_t rows_drop = 0, pad_split = 0, pad_drop = 0;
    int rc = tp_dataset_open(path, seq_len, TP_DATA_DROP_LONG, &ds, &err);
    if (rc == TP_OK) {
        rows_drop = tp_dataset_rows(ds);
        tp_dataset_close(ds);
    } else if (rc != TP_EINVAL) return tp_cli_error(err.msg); /* EINVAL: every document dropped */
    if (tp_dataset_open(path, seq_len, TP_DATA_PAD, &ds, &err) == TP_OK) {
        pad_split = tp_dataset_rows(ds);
        tp_dataset_close(ds);
    }
    if (tp_dataset_open(path, seq_len, TP_DATA_PAD | TP_DATA_DROP_LONG, &ds, &err) == TP_OK) {
        pad_drop = tp_dataset_rows(ds);
        tp_dataset_close(ds);
    }

    /* The shard is valid: read its header and sections for the counts. */
    FILE *fp = fopen(path, "rb");
    uint8_t h[48];
    if (!fp || fread(h, 1, 48, fp) != 48) {
        if (fp) fclose(fp);
        snprintf(err.msg, sizeof err.msg, "%s: cannot read the header", path);
        return tp_cli_error(err.msg);
    }
    uint32_t version, flags;
    memcpy(&version, h + 8, 4);
    memcpy(&flags, h + 12, 4);
    uint64_t n_tokens = le64(h + 16), n_docs = le64(h + 24), vocab = le64(h + 32);
    uint64_t off_at = 48 + ((n_tokens * 4 + 7) & ~7ull);
    uint64_t empty = 0, longest = 0, longer = 0, prev = 0, masked0 = 0;
    int ok = fseek(fp, (long)off_at + 8, SEEK_SET) == 0;
    for (uint64_t i = 0; ok && i < n_docs; i++) {
        uint8_t b[8];
        ok = fread(b, 1, 8, fp) == 8;
        uint64_t o = le64(b), len = o - prev;
        prev = o;
        if (len == 0) empty++;
        if (len > longest) longest = len;
        if (len > (uint64_t)seq_len) longer++;
    }
    if (ok && (flags & 1)) {
        uint8_t buf[1 << 14];
        uint64_t left = n_tokens;
        while (ok && left) {
            size_t k = left < sizeof buf ? (size_t)left : sizeof buf;
            ok = fread(buf, 1, k, fp) == k;
            for (size_t j = 0; ok && j < k; j++) masked0 += buf[j] == 0;
            left -= k;
        }
    }
    fclose(fp);
    if (!ok) {
        snprintf(err.msg, sizeof err.msg, "%s: read failed", path);
        return tp_cli_error(err.msg);
    }
    printf("file         %s (%lld bytes)\n", path, tp_file_size(path));
    printf("format       TPTTTOK1 version %u, flags 0x%x (%s)\n", version, flags,
           (flags & 1) ? "label mask" : "no label mask");
    printf("tokens       %llu\n", (unsigned long long)n_tokens);
    printf("documents    %llu (%llu empty, longest %llu tokens, %llu longer than %lld)\n", (unsigned long long)n_docs,
           (unsigned long long)empty, (unsigned long long)longest, (unsigned long long)longer, (long long)seq_len);
    printf("vocab_hint   %llu (largest token id %llu)\n", (unsigned long long)vocab, (unsigned long long)max_tok);
    if (flags & 1)
        printf("label mask   %llu of %llu tokens are not trained on (mask 0)\n", (unsigned long long)masked0,
               (unsigned long long)n_tokens);
    printf("rows         %lld at seq_len %lld with long_docs=split, %lld with long_docs=drop\n",
           (long long)rows_split, (long long)seq_len, (long long)rows_drop);
    printf("padded rows  %lld with long_docs=split, %lld with long_docs=drop (packing=pad)\n", (long long)pad_split,
           (long long)pad_drop);
    return 0;
}

/* ---- --rows --------------------------------------------------------------- */

static void int_row(tp_strbuf *o, const int32_t *v, int64_t n) {
    tp_strbuf_puts(o, "[");
    for (int64_t i = 0; i < n; i++) tp_strbuf_printf(o, "%s%d", i ? "," : "", v[i]);
    tp_strbuf_puts(o, "]");
}

static int rows(const char *path, const char *spec, int64_t seq_len, int flags) {
    char msg[TP_ERR_LEN];
    long long first = 0, count = 1;
    const char *colon = strchr(spec, ':');
    char a[32];
    snprintf(a, sizeof a, "%.*s", colon ? (int)(colon - spec) : (int)strlen(spec), spec);
    if (tp_cli_int(a, 0, 1ll << 62, &first) || (colon && tp_cli_int(colon + 1, 1, 1 << 20, &count))) {
        fprintf(stderr, "tptt: make-shard: --rows must be FIRST or FIRST:COUNT (COUNT >= 1), got '%s'\n", spec);
        return 2;
    }
    tp_err err = {0};
    tp_dataset *ds;
    if (tp_dataset_open(path, seq_len, flags, &ds, &err) != TP_OK) return tp_cli_error(err.msg);
    if (first + count > tp_dataset_rows(ds)) {
        snprintf(msg, sizeof msg, "%s: rows %lld..%lld asked for, the shard packs into %lld rows at seq_len %lld", path,
                 first, first + count - 1, (long long)tp_dataset_rows(ds), (long long)seq_len);
        tp_dataset_close(ds);
        return tp_cli_error(msg);
    }
    size_t T = (size_t)seq_len;
    int32_t *buf = malloc(4 * T * sizeof *buf);
    tp_strbuf ids, lab, ds_;
    tp_strbuf_init(&ids);
    tp_strbuf_init(&lab);
    tp_strbuf_init(&ds_);
    for (long long r = first; buf && r < first + count; r++) {
        int32_t *id = buf, *lb = buf + T, *st = buf + 2 * T, *pos = buf + 3 * T;
        tp_dataset_row(ds, r, id, lb, st, pos);
        const char *sep = r > first ? "," : "";
        tp_strbuf_puts(&ids, sep);
        int_row(&ids, id, seq_len);
        tp_strbuf_puts(&lab, sep);
        int_row(&lab, lb, seq_len);
        tp_strbuf_printf(&ds_, "%s[0", sep); /* the distinct document starts, in order */
        for (size_t t = 1; t < T; t++)
            if (st[t] != st[t - 1]) tp_strbuf_printf(&ds_, ",%d", st[t]);
        tp_strbuf_puts(&ds_, "]");
    }
    tp_dataset_close(ds);
    int ok = buf && !ids.oom && !lab.oom && !ds_.oom;
    if (ok) printf("{\"input_ids\":[%s],\"labels\":[%s],\"doc_starts\":[%s]}\n", ids.buf, lab.buf, ds_.buf);
    free(buf);
    tp_strbuf_free(&ids);
    tp_strbuf_free(&lab);
    tp_strbuf_free(&ds_);
    return ok ? 0 : tp_cli_error("out of memory");
}

/* ---- main --------------------------------------------------------------- */

int tp_cmd_make_shard(int argc, char **argv) {
    static const struct option opts[] = {{"bytes", no_argument, 0, 'B'},       {"jsonl", no_argument, 0, 'J'},
                                         {"info", no_argument, 0, 'I'},        {"doc-sep", required_argument, 0, 'd'},
                                         {"vocab", required_argument, 0, 'v'}, {"seq-len", required_argument, 0, 's'},
                                         {"out", required_argument, 0, 'o'},   {"help", no_argument, 0, 'h'},
                                         {"rows", required_argument, 0, 'R'},  {"packing", required_argument, 0, 'p'},
                                         {"long-docs", required_argument, 0, 'l'}, {0, 0, 0, 0}};
    int mode = 0, sep = SEP_BLANK, sep_given = 0, flags = 0, flags_given = 0;
    const char *rows_spec = NULL;
    long long vocab = 0, seq_len = 512;
    const char *out_path = NULL;
    int ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "ho:", opts, NULL)) != -1) {
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'B':
        case 'J':
        case 'I':
        case 'R':
            if (mode && mode != ch) {
                fprintf(stderr, "tptt: make-shard: give only one of --bytes, --jsonl, --info, --rows\n");
                return 2;
            }
            mode = ch;
            if (ch == 'R') rows_spec = optarg;
            break;
        case 'p':
        case 'l':
            flags_given = 1;
            if (!strcmp(optarg, ch == 'p' ? "pad" : "drop")) flags |= ch == 'p' ? TP_DATA_PAD : TP_DATA_DROP_LONG;
            else if (strcmp(optarg, ch == 'p' ? "pack" : "split")) {
                fprintf(stderr, "tptt: make-shard: %s must be %s, got '%s'\n", ch == 'p' ? "--packing" : "--long-docs",
                        ch == 'p' ? "pack or pad" : "split or drop", optarg);
                return 2;
            }
            break;
        case 'd':
            sep_given = 1;
            if (!strcmp(optarg, "blank")) sep = SEP_BLANK;
            else if (!strcmp(optarg, "line")) sep = SEP_LINE;
            else if (!strcmp(optarg, "file")) sep = SEP_FILE;
            else {
                fprintf(stderr, "tptt: make-shard: --doc-sep must be blank, line or file, got '%s'\n", optarg);
                return 2;
            }
            break;
        case 'v':
            if (tp_cli_int(optarg, 1, MAX_ID + 1, &vocab)) {
                fprintf(stderr, "tptt: make-shard: --vocab must be an integer in [1, 2^31], got '%s'\n", optarg);
                return 2;
            }
            break;
        case 's':
            if (tp_cli_int(optarg, 1, 1 << 30, &seq_len)) {
                fprintf(stderr, "tptt: make-shard: --seq-len must be a positive integer, got '%s'\n", optarg);
                return 2;
            }
            break;
        case 'o': out_path = optarg; break;
        default:
            fprintf(stderr, "tptt: make-shard: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
    }
    if (!mode) {
        fprintf(stderr, "tptt: make-shard: one of --bytes, --jsonl, --info or --rows is required (see --help)\n");
        return 2;
    }
    if (mode == 'R') {
        if (optind != argc - 1 || out_path || vocab || sep_given) {
            fprintf(stderr, "tptt: make-shard: --rows takes one FILE.tok and only --seq-len, --packing, --long-docs\n");
            return 2;
        }
        return rows(argv[optind], rows_spec, seq_len, flags);
    }
    if (flags_given) {
        fprintf(stderr, "tptt: make-shard: --packing and --long-docs apply to --rows only\n");
        return 2;
    }
    if (mode == 'I') {
        if (optind != argc - 1 || out_path || vocab || sep_given) {
            fprintf(stderr, "tptt: make-shard: --info takes one FILE.tok and only --seq-len\n");
            return 2;
        }
        return info(argv[optind], seq_len);
    }
    if (!out_path || optind >= argc) {
        fprintf(stderr, "tptt: make-shard: need -o OUT.tok and at least one input FILE (see --help)\n");
        return 2;
    }
    if (sep_given && mode != 'B') {
        fprintf(stderr, "tptt: make-shard: --doc-sep applies to --bytes only\n");
        return 2;
    }
    tp_err err = {0};
    docbuf d = {0};
    int rc = TP_OK, any_mask = 0;
    /* Inputs are checked before anything is created, so a bad input leaves no file. */
    for (int i = optind; i < argc && rc == TP_OK; i++) {
        if (mode == 'J') rc = jsonl_file(NULL, argv[i], vocab, 0, &any_mask, &d, &err);
        else {
            FILE *fp = fopen(argv[i], "rb");
            if (!fp) rc = tp_fail(&err, TP_EIO, "%s: cannot open: %s", argv[i], strerror(errno));
            else fclose(fp);
        }
    }
    output o;
    memset(&o, 0, sizeof o);
    if (rc == TP_OK) rc = out_open(&o, out_path, any_mask, &err);
    for (int i = optind; i < argc && rc == TP_OK; i++) {
        if (mode == 'J') rc = jsonl_file(&o, argv[i], vocab, any_mask, &any_mask, &d, &err);
        else rc = bytes_file(&o, argv[i], sep, vocab, &d, &err);
    }
    if (rc == TP_OK) {
        uint64_t v = vocab ? (uint64_t)vocab : mode == 'B' ? 256 : (uint64_t)o.max_id + 1;
        rc = out_close(&o, v, &err);
    } else out_abort(&o);
    doc_free(&d);
    if (rc != TP_OK) return tp_cli_error(err.msg);
    printf("wrote %s: %llu documents, %llu tokens\n", out_path, (unsigned long long)o.n_docs,
           (unsigned long long)o.n_tokens);
    return 0;
}
