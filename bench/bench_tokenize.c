/* bench_tokenize.c - encode throughput of tokenizer.json tokenizers on one
 * core (bench/README.md).
 *
 *   bench_tokenize [--min-mb N] TOKENIZER_DIR... [-- FILE...]
 *
 * The corpus is the given files (default: every file in
 * /usr/share/common-licenses and every /usr/share/doc/PACKAGE/copyright,
 * i.e. English prose), cut into documents at
 * blank lines; at least --min-mb MB (default 20) are encoded, cycling
 * through the corpus. Prints load time, MB/s, tokens/s and bytes/token for
 * each tokenizer; a decode pass checks the round trip on the first 2000
 * documents. */
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tok/tokenizer.h"
#include "util/fsutil.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct corpus {
    char *text;
    size_t len;
    size_t *doc; /* start, length pairs */
    size_t ndoc, cap;
} corpus;

static int add_file(corpus *c, const char *path) {
    char *t;
    size_t n;
    tp_err err;
    if (tp_read_file(path, 64u << 20, &t, &n, &err)) return 0; /* unreadable files are skipped */
    char *p = realloc(c->text, c->len + n + 1);
    if (!p) {
        free(t);
        return -1;
    }
    c->text = p;
    memcpy(c->text + c->len, t, n);
    free(t);
    size_t s = c->len, end = c->len + n;
    c->len = end;
    while (s < end) {
        char *q = memmem(c->text + s, end - s, "\n\n", 2);
        size_t e = q ? (size_t)(q - c->text) : end;
        if (e > s) {
            if (c->ndoc + 2 > c->cap) {
                c->cap = c->cap ? c->cap * 2 : 1024;
                size_t *d = realloc(c->doc, c->cap * sizeof *d);
                if (!d) return -1;
                c->doc = d;
            }
            c->doc[c->ndoc++] = s;
            c->doc[c->ndoc++] = e - s;
        }
        s = e + 2;
    }
    return 0;
}

int main(int argc, char **argv) {
    double min_mb = 20;
    int i = 1, ntok = 0;
    const char *toks[16];
    for (; i < argc && strcmp(argv[i], "--"); i++) {
        if (!strcmp(argv[i], "--min-mb") && i + 1 < argc) min_mb = atof(argv[++i]);
        else if (ntok < 16) toks[ntok++] = argv[i];
    }
    if (!ntok) {
        fprintf(stderr, "usage: bench_tokenize [--min-mb N] TOKENIZER_DIR... [-- FILE...]\n");
        return 2;
    }
    corpus c = {0};
    if (i < argc) {
        for (i++; i < argc; i++)
            if (add_file(&c, argv[i])) return 1;
    } else {
        const char *pats[] = {"/usr/share/common-licenses/*", "/usr/share/doc/*/copyright"};
        for (int k = 0; k < 2; k++) {
            glob_t g;
            if (glob(pats[k], 0, NULL, &g)) continue;
            for (size_t j = 0; j < g.gl_pathc; j++)
                if (add_file(&c, g.gl_pathv[j])) return 1;
            globfree(&g);
        }
    }
    if (!c.ndoc) {
        fprintf(stderr, "bench_tokenize: empty corpus\n");
        return 1;
    }
    size_t distinct = 0;
    for (size_t d = 0; d < c.ndoc; d += 2) distinct += c.doc[d + 1];
    printf("corpus: %zu documents, %.1f MB distinct text; encoding >= %.0f MB per tokenizer on one thread\n", c.ndoc / 2,
           (double)distinct / 1e6, min_mb);
    printf("%-40s %-18s %8s %9s %12s %11s %s\n", "tokenizer", "kind", "load s", "MB/s", "tokens/s", "bytes/token",
           "round trip");
    int status = 0;
    for (int k = 0; k < ntok; k++) {
        tp_err err;
        tp_tokenizer *t;
        double t0 = now();
        if (tp_tokenizer_load(toks[k], &t, &err)) {
            fprintf(stderr, "bench_tokenize: %s\n", err.msg);
            status = 1;
            continue;
        }
        double load = now() - t0;
        tp_ids ids = {0};
        size_t bytes = 0, tokens = 0;
        t0 = now();
        for (size_t d = 0; bytes < min_mb * 1e6; d = (d + 2) % c.ndoc) {
            ids.n = 0;
            if (tp_tokenizer_encode(t, c.text + c.doc[d], c.doc[d + 1], 0, &ids, &err)) {
                fprintf(stderr, "bench_tokenize: %s\n", err.msg);
                return 1;
            }
            bytes += c.doc[d + 1];
            tokens += ids.n;
        }
        double dt = now() - t0;
        /* round trip on a sample: decode(encode(x)) == x for plain prose */
        size_t same = 0, tried = 0;
        tp_strbuf out;
        tp_strbuf_init(&out);
        for (size_t d = 0; d < c.ndoc && tried < 2000; d += 2, tried++) {
            ids.n = 0;
            out.len = 0;
            if (tp_tokenizer_encode(t, c.text + c.doc[d], c.doc[d + 1], 0, &ids, &err) ||
                tp_tokenizer_decode(t, ids.ids, ids.n, 0, &out, &err))
                break;
            same += out.len == c.doc[d + 1] && !memcmp(out.buf, c.text + c.doc[d], out.len);
        }
        printf("%-40s %-18s %8.2f %9.2f %12.0f %11.2f %zu/%zu\n", toks[k], tp_tokenizer_kind(t), load,
               (double)bytes / 1e6 / dt, (double)tokens / dt, (double)bytes / (double)tokens, same, tried);
        tp_strbuf_free(&out);
        tp_ids_free(&ids);
        tp_tokenizer_free(t);
    }
    free(c.text);
    free(c.doc);
    return status;
}
