/* test_dataset.c - token shards and the sampler (docs/data.md).
 *
 * - writer -> file: the bytes equal an image built here independently from
 *   the format table (with and without a label mask, empty documents);
 * - reader: every row of every packing (pack/pad, split/drop, many seq_len)
 *   equals a straightforward re-implementation that builds the concatenated
 *   token stream (pad: each document padded to a multiple of seq_len) and
 *   cuts it; plus hand-checked small examples;
 * - every rejection on corrupted files (one-line message naming the file);
 * - writer abort/errors leave no temporary files;
 * - sampler: permutations per epoch, batches of consecutive positions, rank
 *   slices, seeds, resume from any step, epoch boundaries inside a batch, and
 *   the documented Fisher-Yates order (golden values from docs/data.md). */
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/dataset.h"
#include "test.h"
#include "util/fsutil.h"
#include "util/rng.h"

static char dir[256];

/* ---- documents and an independent shard image --------------------------- */

typedef struct docset {
    size_t n;
    size_t len[512];
    uint32_t *tok[512];
    uint8_t *mask[512]; /* NULL: all ones */
} docset;

static void docs_free(docset *s) {
    for (size_t i = 0; i < s->n; i++) {
        free(s->tok[i]);
        free(s->mask[i]);
    }
    memset(s, 0, sizeof *s);
}

static void docs_add(docset *s, const uint32_t *tok, const uint8_t *mask, size_t n) {
    size_t k = s->n++;
    s->len[k] = n;
    s->tok[k] = malloc(n * 4 + 4);
    memcpy(s->tok[k], tok, n * 4);
    s->mask[k] = NULL;
    if (mask) {
        s->mask[k] = malloc(n + 1);
        memcpy(s->mask[k], mask, n);
    }
}

/* ndocs random documents; lengths drawn around seq_len so that empty,
 * short, exactly seq_len and longer documents all occur. */
static void docs_random(docset *s, tp_rng *r, size_t ndocs, int64_t T, uint32_t vocab, int masks) {
    memset(s, 0, sizeof *s);
    uint32_t tok[2048];
    uint8_t mask[2048];
    for (size_t d = 0; d < ndocs; d++) {
        size_t n;
        switch (tp_rng_next(r) % 8) {
        case 0: n = 0; break;
        case 1: n = (size_t)T; break;
        case 2: n = (size_t)T + 1; break;
        case 3: n = (size_t)(tp_rng_next(r) % (uint64_t)(3 * T + 1)); break;
        case 4: n = 1; break;
        default: n = 1 + (size_t)(tp_rng_next(r) % (uint64_t)T); break;
        }
        if (n > 2048) n = 2048;
        for (size_t i = 0; i < n; i++) {
            tok[i] = (uint32_t)(tp_rng_next(r) % vocab);
            mask[i] = (uint8_t)(tp_rng_next(r) % 4 != 0);
        }
        /* some documents of a masked shard leave the mask out (all ones) */
        docs_add(s, tok, masks && tp_rng_next(r) % 3 ? mask : NULL, n);
    }
}

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* The shard file exactly as the format table in dataset.h describes it. */
static uint8_t *image(const docset *s, int with_mask, size_t *size) {
    size_t nt = 0;
    uint32_t mx = 0;
    for (size_t d = 0; d < s->n; d++) {
        nt += s->len[d];
        for (size_t i = 0; i < s->len[d]; i++)
            if (s->tok[d][i] > mx) mx = s->tok[d][i];
    }
    size_t tok_sec = (nt * 4 + 7) / 8 * 8, off_sec = (s->n + 1) * 8, mask_sec = with_mask ? (nt + 7) / 8 * 8 : 0;
    *size = 48 + tok_sec + off_sec + mask_sec;
    uint8_t *b = calloc(1, *size);
    memcpy(b, "TPTTTOK1", 8);
    put32(b + 8, 1);
    put32(b + 12, with_mask ? 1 : 0);
    put64(b + 16, nt);
    put64(b + 24, s->n);
    put64(b + 32, nt ? (uint64_t)mx + 1 : 0);
    size_t k = 0;
    for (size_t d = 0; d < s->n; d++) {
        put64(b + 48 + tok_sec + 8 * d, k);
        for (size_t i = 0; i < s->len[d]; i++, k++) {
            put32(b + 48 + 4 * k, s->tok[d][i]);
            if (with_mask) b[48 + tok_sec + off_sec + k] = s->mask[d] ? s->mask[d][i] : 1;
        }
    }
    put64(b + 48 + tok_sec + 8 * s->n, k);
    return b;
}

static int write_bytes(const char *path, const uint8_t *b, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    int ok = fwrite(b, 1, n, fp) == n;
    return fclose(fp) == 0 && ok ? 0 : -1;
}

static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)sz + 1);
    *n = fread(b, 1, (size_t)sz, fp);
    fclose(fp);
    return b;
}

static int write_shard(const char *path, const docset *s, int with_mask, tp_err *err) {
    tp_shard_writer *w;
    int rc = tp_shard_writer_open(path, with_mask, &w, err);
    if (rc) return rc;
    for (size_t d = 0; d < s->n; d++)
        if ((rc = tp_shard_writer_add(w, s->tok[d], with_mask ? s->mask[d] : NULL, s->len[d], err))) {
            tp_shard_writer_abort(w);
            return rc;
        }
    return tp_shard_writer_close(w, err);
}

/* Number of directory entries other than . and .. */
static int count_entries(const char *path) {
    DIR *dp = opendir(path);
    if (!dp) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dp)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(dp);
    return n;
}

/* ---- the reference packer ------------------------------------------------
 * Build the stream of kept documents' tokens (with each token's document
 * ordinal and mask; with pad, each document followed by padding up to a
 * multiple of T, the padding a document of its own), cut it every T tokens,
 * and derive each row's fields position by position from its neighbours. */

typedef struct ref_rows {
    int64_t rows, T;
    int32_t *ids, *labels, *ds, *pos; /* rows x T */
} ref_rows;

static void ref_pack(const docset *s, int64_t T, int drop, int pad, ref_rows *out) {
    size_t L = 0;
    for (size_t d = 0; d < s->n; d++) L += s->len[d] + (size_t)T;
    uint32_t *st = malloc(L * 4 + 4);
    int64_t *sd = malloc(L * 8 + 8);
    uint8_t *sm = malloc(L + 1);
    size_t k = 0;
    for (size_t d = 0; d < s->n; d++) {
        if (drop && (int64_t)s->len[d] > T) continue;
        for (size_t i = 0; i < s->len[d]; i++, k++) {
            st[k] = s->tok[d][i];
            sd[k] = (int64_t)d;
            sm[k] = s->mask[d] ? s->mask[d][i] : 1;
        }
        for (size_t i = s->len[d]; pad && i % (size_t)T; i++, k++) { /* padding, "document" -1-d */
            st[k] = 0;
            sd[k] = -1 - (int64_t)d;
            sm[k] = 0;
        }
    }
    L = k;
    out->T = T;
    out->rows = (int64_t)((L + (size_t)T - 1) / (size_t)T);
    size_t cells = (size_t)(out->rows * T) + 1;
    out->ids = malloc(cells * 4);
    out->labels = malloc(cells * 4);
    out->ds = malloc(cells * 4);
    out->pos = malloc(cells * 4);
    for (int64_t r = 0; r < out->rows; r++) {
        size_t base = (size_t)(r * T);
        int64_t n = (int64_t)(L - base) < T ? (int64_t)(L - base) : T;
        int32_t *ids = out->ids + r * T, *lab = out->labels + r * T, *ds = out->ds + r * T, *pos = out->pos + r * T;
        for (int64_t t = 0; t < T; t++) {
            if (t < n) {
                size_t g = base + (size_t)t;
                ids[t] = (int32_t)st[g];
                ds[t] = (t == 0 || sd[g] != sd[g - 1]) ? (int32_t)t : ds[t - 1];
                int same_doc_next = t + 1 < n && sd[g + 1] == sd[g];
                lab[t] = same_doc_next && sm[g + 1] ? (int32_t)st[g + 1] : -100;
            } else {
                ids[t] = 0;
                ds[t] = (int32_t)n;
                lab[t] = -100;
            }
            pos[t] = (int32_t)(t - ds[t]);
        }
    }
    free(st);
    free(sd);
    free(sm);
}

static void ref_free(ref_rows *r) {
    free(r->ids);
    free(r->labels);
    free(r->ds);
    free(r->pos);
}

/* Every row of the shard at path equals the reference; returns mismatches. */
static int compare_rows(const char *label, const char *path, const docset *s, int64_t T, int drop, int pad) {
    ref_rows ref;
    ref_pack(s, T, drop, pad, &ref);
    tp_dataset *d;
    tp_err err = {0};
    int rc = tp_dataset_open(path, T, (drop ? TP_DATA_DROP_LONG : 0) | (pad ? TP_DATA_PAD : 0), &d, &err);
    if (ref.rows == 0) {
        CHECK_MSG(rc == TP_EINVAL, "%s T=%lld drop=%d pad=%d: no rows must be refused, got %d", label, (long long)T, drop, pad,
                  rc);
        if (rc == TP_OK) tp_dataset_close(d);
        ref_free(&ref);
        return 0;
    }
    CHECK_MSG(rc == TP_OK, "%s: %s", label, err.msg);
    if (rc) {
        ref_free(&ref);
        return 1;
    }
    CHECK_MSG(tp_dataset_rows(d) == ref.rows, "%s T=%lld drop=%d pad=%d: %lld rows, expected %lld", label, (long long)T,
              drop, pad, (long long)tp_dataset_rows(d), (long long)ref.rows);
    CHECK(tp_dataset_seq_len(d) == T);
    int bad = 0;
    int32_t *ids = malloc((size_t)T * 4), *lab = malloc((size_t)T * 4), *ds = malloc((size_t)T * 4),
            *pos = malloc((size_t)T * 4);
    for (int64_t r = 0; r < ref.rows && r < tp_dataset_rows(d); r++) {
        tp_dataset_row(d, r, ids, lab, ds, pos);
        size_t o = (size_t)(r * T), nb = (size_t)T * 4;
        int ok = !memcmp(ids, ref.ids + o, nb) && !memcmp(lab, ref.labels + o, nb) && !memcmp(ds, ref.ds + o, nb) &&
                 !memcmp(pos, ref.pos + o, nb);
        if (!ok && bad++ < 3)
            fprintf(stderr, "%s T=%lld drop=%d pad=%d: row %lld differs from the reference\n", label, (long long)T, drop, pad,
                    (long long)r);
    }
    CHECK_MSG(bad == 0, "%s T=%lld drop=%d pad=%d: %d rows differ", label, (long long)T, drop, pad, bad);
    free(ids);
    free(lab);
    free(ds);
    free(pos);
    tp_dataset_close(d);
    ref_free(&ref);
    return bad;
}

/* ---- writer round trip + packing --------------------------------------- */

static void test_round_trip(void) {
    static const int64_t Ts[] = {1, 2, 3, 5, 8, 17, 64};
    tp_rng r;
    tp_rng_seed(&r, 42, 1);
    char path[512];
    snprintf(path, sizeof path, "%s/rt.tok", dir);
    for (int with_mask = 0; with_mask <= 1; with_mask++) {
        for (int trial = 0; trial < 6; trial++) {
            int64_t Tgen = Ts[trial % 7 + 1];
            docset s;
            docs_random(&s, &r, 1 + (size_t)(tp_rng_next(&r) % 60), Tgen, trial % 2 ? 50000 : 7, with_mask);
            tp_err err = {0};
            int rc = write_shard(path, &s, with_mask, &err);
            CHECK_MSG(rc == TP_OK, "%s", err.msg);
            size_t n_file, n_img;
            uint8_t *file = read_bytes(path, &n_file), *img = image(&s, with_mask, &n_img);
            CHECK_MSG(file && n_file == n_img && !memcmp(file, img, n_img),
                      "mask=%d trial %d: written file (%zu bytes) differs from the format image (%zu bytes)",
                      with_mask, trial, n_file, n_img);
            free(file);
            free(img);
            CHECK_MSG(count_entries(dir) == 1, "temporary files left after close: %d entries", count_entries(dir));
            char label[64];
            snprintf(label, sizeof label, "mask=%d trial %d", with_mask, trial);
            for (size_t t = 0; t < sizeof Ts / sizeof *Ts; t++)
                for (int drop = 0; drop <= 1; drop++)
                    for (int pad = 0; pad <= 1; pad++) compare_rows(label, path, &s, Ts[t], drop, pad);
            /* max token */
            tp_dataset *d;
            if (tp_dataset_open(path, 4, 0, &d, &err) == TP_OK) {
                uint32_t mx = 0;
                for (size_t i = 0; i < s.n; i++)
                    for (size_t j = 0; j < s.len[i]; j++)
                        if (s.tok[i][j] > mx) mx = s.tok[i][j];
                CHECK(tp_dataset_max_token(d) == mx);
                tp_dataset_close(d);
            }
            docs_free(&s);
        }
    }
    unlink(path);
}

/* The worked example of docs/data.md, checked by hand. */
static void test_small_example(void) {
    docset s = {0};
    uint32_t a[] = {1, 2, 3}, b[] = {4, 5}, c[] = {6, 7, 8, 9, 10};
    uint8_t cm[] = {1, 1, 0, 1, 1}; /* token 8 is not a target */
    docs_add(&s, a, NULL, 3);
    docs_add(&s, b, NULL, 0); /* an empty document: skipped */
    docs_add(&s, b, NULL, 2);
    docs_add(&s, c, cm, 5);
    char path[512];
    snprintf(path, sizeof path, "%s/small.tok", dir);
    tp_err err = {0};
    CHECK_MSG(write_shard(path, &s, 1, &err) == TP_OK, "%s", err.msg);
    tp_dataset *d;
    int32_t ids[8], lab[8], ds[8], pos[8]; /* seq_len 4 and 5 below */
    CHECK_MSG(tp_dataset_open(path, 4, 0, &d, &err) == TP_OK, "%s", err.msg);
    if (d) {
        static const int32_t e_ids[3][4] = {{1, 2, 3, 4}, {5, 6, 7, 8}, {9, 10, 0, 0}};
        static const int32_t e_lab[3][4] = {{2, 3, -100, -100}, {-100, 7, -100, -100}, {10, -100, -100, -100}};
        static const int32_t e_ds[3][4] = {{0, 0, 0, 3}, {0, 1, 1, 1}, {0, 0, 2, 2}};
        static const int32_t e_pos[3][4] = {{0, 1, 2, 0}, {0, 0, 1, 2}, {0, 1, 0, 1}};
        CHECK(tp_dataset_rows(d) == 3);
        CHECK(tp_dataset_max_token(d) == 10);
        for (int r = 0; r < 3 && r < tp_dataset_rows(d); r++) {
            tp_dataset_row(d, r, ids, lab, ds, pos);
            CHECK_MSG(!memcmp(ids, e_ids[r], 16), "split row %d ids", r);
            CHECK_MSG(!memcmp(lab, e_lab[r], 16), "split row %d labels: %d %d %d %d", r, lab[0], lab[1], lab[2],
                      lab[3]);
            CHECK_MSG(!memcmp(ds, e_ds[r], 16), "split row %d doc_start", r);
            CHECK_MSG(!memcmp(pos, e_pos[r], 16), "split row %d pos", r);
        }
        tp_dataset_close(d);
    }
    CHECK_MSG(tp_dataset_open(path, 4, 1, &d, &err) == TP_OK, "%s", err.msg);
    if (d) {
        static const int32_t e_ids[2][4] = {{1, 2, 3, 4}, {5, 0, 0, 0}};
        static const int32_t e_lab[2][4] = {{2, 3, -100, -100}, {-100, -100, -100, -100}};
        static const int32_t e_ds[2][4] = {{0, 0, 0, 3}, {0, 1, 1, 1}};
        static const int32_t e_pos[2][4] = {{0, 1, 2, 0}, {0, 0, 1, 2}};
        CHECK(tp_dataset_rows(d) == 2);
        for (int r = 0; r < 2 && r < tp_dataset_rows(d); r++) {
            tp_dataset_row(d, r, ids, lab, ds, pos);
            CHECK_MSG(!memcmp(ids, e_ids[r], 16), "drop row %d ids", r);
            CHECK_MSG(!memcmp(lab, e_lab[r], 16), "drop row %d labels", r);
            CHECK_MSG(!memcmp(ds, e_ds[r], 16), "drop row %d doc_start", r);
            CHECK_MSG(!memcmp(pos, e_pos[r], 16), "drop row %d pos", r);
        }
        tp_dataset_close(d);
    }
    for (int drop = 0; drop <= 1; drop++) { /* packing=pad: one document per row */
        CHECK_MSG(tp_dataset_open(path, 4, TP_DATA_PAD | (drop ? TP_DATA_DROP_LONG : 0), &d, &err) == TP_OK, "%s",
                  err.msg);
        if (!d) continue;
        static const int32_t e_ids[4][4] = {{1, 2, 3, 0}, {4, 5, 0, 0}, {6, 7, 8, 9}, {10, 0, 0, 0}};
        static const int32_t e_lab[4][4] = {
            {2, 3, -100, -100}, {5, -100, -100, -100}, {7, -100, 9, -100}, {-100, -100, -100, -100}};
        static const int32_t e_ds[4][4] = {{0, 0, 0, 3}, {0, 0, 2, 2}, {0, 0, 0, 0}, {0, 1, 1, 1}};
        static const int32_t e_pos[4][4] = {{0, 1, 2, 0}, {0, 1, 0, 1}, {0, 1, 2, 3}, {0, 0, 1, 2}};
        int want = drop ? 2 : 4;
        CHECK_MSG(tp_dataset_rows(d) == want, "pad drop=%d: %lld rows", drop, (long long)tp_dataset_rows(d));
        for (int r = 0; r < want && r < tp_dataset_rows(d); r++) {
            tp_dataset_row(d, r, ids, lab, ds, pos);
            CHECK_MSG(!memcmp(ids, e_ids[r], 16), "pad row %d ids", r);
            CHECK_MSG(!memcmp(lab, e_lab[r], 16), "pad row %d labels: %d %d %d %d", r, lab[0], lab[1], lab[2], lab[3]);
            CHECK_MSG(!memcmp(ds, e_ds[r], 16), "pad row %d doc_start", r);
            CHECK_MSG(!memcmp(pos, e_pos[r], 16), "pad row %d pos", r);
        }
        tp_dataset_close(d);
        d = NULL;
    }
    /* seq_len 5: document c exactly fills a row in drop mode (kept) */
    CHECK_MSG(tp_dataset_open(path, 5, 1, &d, &err) == TP_OK, "%s", err.msg);
    if (d) {
        CHECK(tp_dataset_rows(d) == 2);
        if (tp_dataset_rows(d) == 2) tp_dataset_row(d, 1, ids, lab, ds, pos); /* 1 2 3 4 5 | 6 7 8 9 10 */
        CHECK_MSG(ids[0] == 6 && lab[0] == 7 && lab[1] == -100 && lab[2] == 9 && lab[3] == 10, "%d %d %d %d %d", ids[0], lab[0], lab[1], lab[2], lab[3]);
        tp_dataset_close(d);
    }
    docs_free(&s);
    unlink(path);
}

/* ---- rejections ----------------------------------------------------------- */

static docset base_docs(void) {
    docset s = {0};
    uint32_t a[] = {3, 1, 4}, b[] = {1, 5, 9, 2, 6}, c[] = {5};
    uint8_t am[] = {1, 0, 1};
    docs_add(&s, a, am, 3);
    docs_add(&s, b, NULL, 5);
    docs_add(&s, c, NULL, 1); /* 9 tokens: odd, so the token section is padded */
    return s;
}

typedef void (*corrupt_fn)(uint8_t *b, size_t *n);
/* offsets in the base image (9 tokens, 3 docs, mask): tokens at 48, padding
 * 84..87, doc_offsets at 88 (4 x 8), mask at 120 (9 bytes + 7 padding) */
static void c_empty(uint8_t *b, size_t *n) { (void)b; *n = 0; }
static void c_short(uint8_t *b, size_t *n) { (void)b; *n = 47; }
static void c_magic(uint8_t *b, size_t *n) { (void)n; b[7] = '2'; }
static void c_version(uint8_t *b, size_t *n) { (void)n; put32(b + 8, 2); }
static void c_flags(uint8_t *b, size_t *n) { (void)n; put32(b + 12, 3); }
static void c_reserved(uint8_t *b, size_t *n) { (void)n; put64(b + 40, 1); }
static void c_ntok_overflow(uint8_t *b, size_t *n) { (void)n; put64(b + 16, 1ull << 62); }
static void c_ndoc_overflow(uint8_t *b, size_t *n) { (void)n; put64(b + 24, UINT64_MAX); }
static void c_ndoc_big(uint8_t *b, size_t *n) { (void)n; put64(b + 24, UINT64_MAX / 8); }
static void c_ntok_more(uint8_t *b, size_t *n) { (void)n; put64(b + 16, 12); }
static void c_ndoc_more(uint8_t *b, size_t *n) { (void)n; put64(b + 24, 4); }
static void c_truncated(uint8_t *b, size_t *n) { (void)b; *n -= 8; }
static void c_appended(uint8_t *b, size_t *n) { (void)b; *n += 8; }
static void c_off0(uint8_t *b, size_t *n) { (void)n; put64(b + 88, 1); }
static void c_off_decreasing(uint8_t *b, size_t *n) { (void)n; put64(b + 96, 9); } /* 0 9 8 9 */
static void c_off_last(uint8_t *b, size_t *n) { (void)n; put64(b + 112, 8); }
static void c_off_last_big(uint8_t *b, size_t *n) { (void)n; put64(b + 112, 10); }
static void c_token_vocab(uint8_t *b, size_t *n) { (void)n; put32(b + 48 + 4 * 5, 10); } /* vocab_hint 10 */
static void c_token_huge(uint8_t *b, size_t *n) { (void)n; put32(b + 48 + 4 * 8, 0xffffffffu); }
static void c_vocab_huge(uint8_t *b, size_t *n) { (void)n; put64(b + 32, (1ull << 31) + 1); }
static void c_tok_padding(uint8_t *b, size_t *n) { (void)n; b[86] = 1; }
static void c_mask_value(uint8_t *b, size_t *n) { (void)n; b[120 + 4] = 2; }
static void c_mask_padding(uint8_t *b, size_t *n) { (void)n; b[120 + 12] = 1; }
static void c_mask_flag_off(uint8_t *b, size_t *n) { (void)n; put32(b + 12, 0); } /* sizes no longer match */

static void test_rejections(void) {
    static const struct {
        const char *what;
        corrupt_fn fn;
        const char *keyword;
    } cases[] = {
        {"empty file", c_empty, "shorter than the 48-byte"},
        {"47 bytes", c_short, "shorter than the 48-byte"},
        {"bad magic", c_magic, "magic"},
        {"version 2", c_version, "version 2"},
        {"unknown flag bit", c_flags, "flags"},
        {"reserved field", c_reserved, "reserved"},
        {"n_tokens overflow", c_ntok_overflow, "overflow"},
        {"n_docs overflow", c_ndoc_overflow, "overflow"},
        {"n_docs size overflow", c_ndoc_big, "overflow"},
        {"n_tokens three more", c_ntok_more, "file holds"},
        {"n_docs one more", c_ndoc_more, "file holds"},
        {"truncated", c_truncated, "file holds"},
        {"trailing bytes", c_appended, "file holds"},
        {"mask flag cleared", c_mask_flag_off, "file holds"},
        {"doc_offsets[0] != 0", c_off0, "doc_offsets[0]"},
        {"doc_offsets decreasing", c_off_decreasing, "non-decreasing"},
        {"doc_offsets last < n_tokens", c_off_last, "n_tokens"},
        {"doc_offsets last > n_tokens", c_off_last_big, "n_tokens"},
        {"token >= vocab_hint", c_token_vocab, "tokens[5]"},
        {"token 2^32-1", c_token_huge, "vocab_hint"},
        {"vocab_hint > 2^31", c_vocab_huge, "2^31"},
        {"nonzero token padding", c_tok_padding, "padding"},
        {"mask value 2", c_mask_value, "label_mask[4]"},
        {"nonzero mask padding", c_mask_padding, "padding"},
    };
    docset s = base_docs();
    size_t n0;
    uint8_t *img = image(&s, 1, &n0);
    CHECK(n0 == 136);
    char path[512];
    snprintf(path, sizeof path, "%s/bad.tok", dir);
    tp_err err = {0};
    tp_dataset *d;
    /* positive control */
    write_bytes(path, img, n0);
    int rc = tp_dataset_open(path, 4, 0, &d, &err);
    CHECK_MSG(rc == TP_OK, "control: %s", err.msg);
    if (rc == TP_OK) tp_dataset_close(d);
    uint8_t *b = malloc(n0 + 64);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        memset(b, 0, n0 + 64);
        memcpy(b, img, n0);
        size_t n = n0;
        cases[i].fn(b, &n);
        write_bytes(path, b, n);
        memset(&err, 0, sizeof err);
        d = NULL;
        rc = tp_dataset_open(path, 4, 0, &d, &err);
        CHECK_MSG(rc == TP_EFORMAT, "%s: expected TP_EFORMAT, got %d (%s)", cases[i].what, rc, err.msg);
        CHECK_MSG(d == NULL, "%s: no dataset on failure", cases[i].what);
        CHECK_MSG(strstr(err.msg, path) != NULL, "%s: message does not name the file: %s", cases[i].what, err.msg);
        CHECK_MSG(strstr(err.msg, cases[i].keyword) != NULL, "%s: message lacks '%s': %s", cases[i].what,
                  cases[i].keyword, err.msg);
        CHECK_MSG(!strchr(err.msg, '\n'), "%s: message is not one line", cases[i].what);
        if (getenv("DATASET_VERBOSE")) fprintf(stderr, "[%s] %s\n", cases[i].what, err.msg);
        if (rc == TP_OK) tp_dataset_close(d);
    }
    free(b);
    /* not a file, missing file, bad seq_len, nothing to train on */
    rc = tp_dataset_open(dir, 4, 0, &d, &err);
    CHECK_MSG(rc == TP_EIO && strstr(err.msg, dir), "directory: %d %s", rc, err.msg);
    char missing[600];
    snprintf(missing, sizeof missing, "%s/missing.tok", dir);
    rc = tp_dataset_open(missing, 4, 0, &d, &err);
    CHECK_MSG(rc == TP_EIO && strstr(err.msg, missing) && strstr(err.msg, "cannot open"), "missing: %d %s", rc,
              err.msg);
    write_bytes(path, img, n0);
    rc = tp_dataset_open(path, 0, 0, &d, &err);
    CHECK_MSG(rc == TP_EINVAL && strstr(err.msg, "seq_len"), "seq_len 0: %d %s", rc, err.msg);
    rc = tp_dataset_open(path, 2, 1, &d, &err); /* every document is longer than 2 except [5] */
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    if (rc == TP_OK) {
        CHECK(tp_dataset_rows(d) == 1);
        tp_dataset_close(d);
    }
    docset one = {0};
    uint32_t t3[] = {1, 2, 3};
    docs_add(&one, t3, NULL, 3);
    docs_add(&one, t3, NULL, 0);
    free(img);
    img = image(&one, 0, &n0);
    write_bytes(path, img, n0);
    rc = tp_dataset_open(path, 2, 1, &d, &err);
    CHECK_MSG(rc == TP_EINVAL && strstr(err.msg, path) && strstr(err.msg, "no rows"), "all dropped: %d %s", rc,
              err.msg);
    docs_free(&one);
    free(img);
    docs_free(&s);
    unlink(path);
}

/* ---- writer errors, abort, empty shard ---------------------------------- */

static void test_writer(void) {
    char sub[512], path[600], bad[600];
    snprintf(sub, sizeof sub, "%s/w", dir);
    mkdir(sub, 0777);
    snprintf(path, sizeof path, "%s/out.tok", sub);
    tp_err err = {0};
    tp_shard_writer *w;
    uint32_t t[] = {1, 2, 3, 0x80000000u};
    uint8_t m[] = {1, 2, 1};
    /* abort after adding: nothing remains */
    CHECK(tp_shard_writer_open(path, 1, &w, &err) == TP_OK);
    CHECK(tp_shard_writer_add(w, t, NULL, 3, &err) == TP_OK);
    CHECK(count_entries(sub) >= 1);
    tp_shard_writer_abort(w);
    CHECK_MSG(count_entries(sub) == 0, "abort left %d files", count_entries(sub));
    /* rejected documents leave the writer usable */
    CHECK(tp_shard_writer_open(path, 0, &w, &err) == TP_OK);
    int rc = tp_shard_writer_add(w, t, NULL, 4, &err);
    CHECK_MSG(rc == TP_EINVAL && strstr(err.msg, path) && strstr(err.msg, "2^31"), "id 2^31: %d %s", rc, err.msg);
    rc = tp_shard_writer_add(w, t, m, 3, &err);
    CHECK_MSG(rc == TP_EINVAL && strstr(err.msg, "without"), "mask on a maskless shard: %d %s", rc, err.msg);
    CHECK(tp_shard_writer_add(w, t, NULL, 3, &err) == TP_OK);
    CHECK(tp_shard_writer_close(w, &err) == TP_OK);
    CHECK_MSG(count_entries(sub) == 1, "close left %d entries", count_entries(sub));
    CHECK(tp_file_size(path) == 48 + 16 + 16);
    CHECK(tp_shard_writer_open(path, 1, &w, &err) == TP_OK);
    rc = tp_shard_writer_add(w, t, m, 3, &err);
    CHECK_MSG(rc == TP_EINVAL && strstr(err.msg, "mask[1]"), "mask value 2: %d %s", rc, err.msg);
    tp_shard_writer_abort(w);
    CHECK(count_entries(sub) == 1); /* the earlier shard is untouched */
    /* overwriting replaces the file */
    docset s = base_docs();
    CHECK(write_shard(path, &s, 1, &err) == TP_OK);
    size_t n1, n2;
    uint8_t *f = read_bytes(path, &n1), *img = image(&s, 1, &n2);
    CHECK(f && n1 == n2 && !memcmp(f, img, n1));
    free(f);
    free(img);
    docs_free(&s);
    /* an empty shard is well-formed but has nothing to train on */
    CHECK(tp_shard_writer_open(path, 0, &w, &err) == TP_OK);
    CHECK(tp_shard_writer_close(w, &err) == TP_OK);
    docset e = {0};
    f = read_bytes(path, &n1);
    img = image(&e, 0, &n2);
    CHECK(f && n1 == 56 && n2 == 56 && !memcmp(f, img, 56));
    free(f);
    free(img);
    tp_dataset *d;
    rc = tp_dataset_open(path, 4, 0, &d, &err);
    CHECK_MSG(rc == TP_EINVAL && strstr(err.msg, "no tokens"), "empty shard: %d %s", rc, err.msg);
    /* a directory that does not exist */
    snprintf(bad, sizeof bad, "%s/nodir/x.tok", dir);
    rc = tp_shard_writer_open(bad, 0, &w, &err);
    CHECK_MSG(rc == TP_EIO && strstr(err.msg, "nodir"), "missing directory: %d %s", rc, err.msg);
    unlink(path);
    rmdir(sub);
}

/* ---- sampler -------------------------------------------------------------- */

/* The documented order (docs/data.md): Fisher-Yates from the last index down,
 * j uniform in [0, i] by rejection, rng stream 0x5a0000 + epoch. */
static void doc_shuffle(uint64_t seed, int64_t e, int64_t N, int64_t *p) {
    tp_rng r;
    tp_rng_seed(&r, seed, 0x5a0000 + (uint64_t)e);
    for (int64_t i = 0; i < N; i++) p[i] = i;
    for (int64_t i = N - 1; i >= 1; i--) {
        uint64_t n = (uint64_t)i + 1, x;
        do x = tp_rng_next(&r);
        while (x < (0 - n) % n);
        int64_t j = (int64_t)(x % n), t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
}

static void test_sampler(void) {
    tp_err err = {0};
    tp_sampler *s;
    CHECK(tp_sampler_create(0, 4, 1, &s, &err) == TP_EINVAL);
    CHECK(tp_sampler_create(10, 0, 1, &s, &err) == TP_EINVAL);

    /* golden: seed 1234, 10 rows (docs/data.md) */
    static const int64_t golden[3][10] = {
        {9, 5, 6, 0, 3, 1, 8, 4, 2, 7}, {5, 9, 2, 8, 0, 3, 4, 6, 1, 7}, {6, 8, 7, 0, 4, 2, 5, 3, 9, 1}};
    CHECK(tp_sampler_create(10, 4, 1234, &s, &err) == TP_OK);
    int64_t p[64];
    for (int e = 0; e < 3; e++) {
        doc_shuffle(1234, e, 10, p);
        CHECK_MSG(!memcmp(p, golden[e], sizeof p[0] * 10), "golden epoch %d", e);
        if (getenv("DATASET_VERBOSE")) {
            for (int i = 0; i < 10; i++) fprintf(stderr, "%lld ", (long long)p[i]);
            fprintf(stderr, "\n");
        }
    }
    for (int64_t step = 0; step < 7; step++)
        for (int64_t i = 0; i < 4; i++) {
            int64_t q = step * 4 + i;
            CHECK(tp_sampler_row(s, step, i) == golden[q / 10][q % 10]);
        }
    CHECK(tp_sampler_epoch(s, 2) == 0 && tp_sampler_epoch(s, 3) == 1 && tp_sampler_epoch(s, 5) == 2);
    tp_sampler_destroy(s);

    static const int64_t Ns[] = {1, 2, 7, 10, 33};
    static const int64_t Gs[] = {1, 3, 4, 8, 25, 50};
    for (size_t a = 0; a < sizeof Ns / sizeof *Ns; a++)
        for (size_t b = 0; b < sizeof Gs / sizeof *Gs; b++) {
            int64_t N = Ns[a], G = Gs[b];
            uint64_t seed = 7 + (uint64_t)a * 31 + b;
            int64_t steps = (6 * N + G - 1) / G + 2; /* at least six epochs */
            int64_t total = steps * G;
            int64_t *seq = malloc((size_t)total * 8), *perm = malloc((size_t)N * 8);
            CHECK(tp_sampler_create(N, G, seed, &s, &err) == TP_OK);
            for (int64_t st = 0; st < steps; st++)
                for (int64_t i = 0; i < G; i++) seq[st * G + i] = tp_sampler_row(s, st, i);
            int bad_perm = 0, bad_order = 0, bad_epoch = 0;
            /* consecutive positions; each epoch a permutation in the documented order */
            for (int64_t e = 0; (e + 1) * N <= total; e++) {
                doc_shuffle(seed, e, N, perm);
                char *seen = calloc((size_t)N, 1);
                for (int64_t k = 0; k < N; k++) {
                    int64_t row = seq[e * N + k];
                    if (row < 0 || row >= N || seen[row]++) bad_perm++;
                    if (row != perm[k]) bad_order++;
                }
                free(seen);
            }
            for (int64_t st = 0; st < steps; st++)
                if (tp_sampler_epoch(s, st) != st * G / N) bad_epoch++;
            CHECK_MSG(!bad_perm, "N=%lld G=%lld: an epoch is not a permutation", (long long)N, (long long)G);
            CHECK_MSG(!bad_order, "N=%lld G=%lld: order differs from the documented shuffle", (long long)N,
                      (long long)G);
            CHECK_MSG(!bad_epoch, "N=%lld G=%lld: tp_sampler_epoch", (long long)N, (long long)G);
            /* the order does not depend on the global batch: same as G=1 */
            tp_sampler *one;
            CHECK(tp_sampler_create(N, 1, seed, &one, &err) == TP_OK);
            int bad_g = 0;
            for (int64_t q = 0; q < total; q++) bad_g += tp_sampler_row(one, q, 0) != seq[q];
            tp_sampler_destroy(one);
            CHECK_MSG(!bad_g, "N=%lld G=%lld: differs from the G=1 sequence", (long long)N, (long long)G);
            /* rank slices: each rank has its own sampler, takes [r*G/W, (r+1)*G/W) */
            for (int64_t W = 1; W <= 4; W++) {
                int bad_slice = 0;
                char *cover = malloc((size_t)G);
                for (int64_t st = 0; st < steps; st++) {
                    memset(cover, 0, (size_t)G);
                    for (int64_t r = 0; r < W; r++) {
                        tp_sampler *rs;
                        CHECK(tp_sampler_create(N, G, seed, &rs, &err) == TP_OK);
                        for (int64_t i = r * G / W; i < (r + 1) * G / W; i++) {
                            if (cover[i]++) bad_slice++;
                            if (tp_sampler_row(rs, st, i) != seq[st * G + i]) bad_slice++;
                        }
                        tp_sampler_destroy(rs);
                    }
                    for (int64_t i = 0; i < G; i++) bad_slice += cover[i] != 1;
                }
                free(cover);
                CHECK_MSG(!bad_slice, "N=%lld G=%lld W=%lld: rank slices", (long long)N, (long long)G, (long long)W);
            }
            /* resume at any step: a fresh sampler gives the same rows */
            int bad_resume = 0;
            for (int64_t k = 0; k < steps; k++) {
                tp_sampler *rs;
                CHECK(tp_sampler_create(N, G, seed, &rs, &err) == TP_OK);
                for (int64_t st = k; st < steps; st++)
                    for (int64_t i = 0; i < G; i++) bad_resume += tp_sampler_row(rs, st, i) != seq[st * G + i];
                tp_sampler_destroy(rs);
            }
            CHECK_MSG(!bad_resume, "N=%lld G=%lld: resume", (long long)N, (long long)G);
            /* random access in any order on one sampler */
            tp_rng r;
            tp_rng_seed(&r, seed, 99);
            int bad_rand = 0;
            for (int k = 0; k < 500; k++) {
                int64_t st = (int64_t)(tp_rng_next(&r) % (uint64_t)steps), i = (int64_t)(tp_rng_next(&r) % (uint64_t)G);
                bad_rand += tp_sampler_row(s, st, i) != seq[st * G + i];
            }
            CHECK_MSG(!bad_rand, "N=%lld G=%lld: random access", (long long)N, (long long)G);
            tp_sampler_destroy(s);
            /* another seed gives another order (N >= 7: 1/5040 chance of a tie per epoch) */
            if (N >= 7) {
                CHECK(tp_sampler_create(N, G, seed + 1, &s, &err) == TP_OK);
                int same = 1;
                for (int64_t q = 0; q < 2 * N; q++) same &= tp_sampler_row(s, q / G, q % G) == seq[q];
                CHECK_MSG(!same, "N=%lld G=%lld: seeds %llu and %llu give the same order", (long long)N,
                          (long long)G, (unsigned long long)seed, (unsigned long long)seed + 1);
                tp_sampler_destroy(s);
                /* and consecutive epochs differ */
                CHECK(memcmp(seq, seq + N, (size_t)N * 8) != 0);
            }
            free(seq);
            free(perm);
        }

    /* an epoch boundary inside a global batch: N=10, G=4, step 2 = positions 8..11 */
    CHECK(tp_sampler_create(10, 4, 5, &s, &err) == TP_OK);
    doc_shuffle(5, 0, 10, p);
    doc_shuffle(5, 1, 10, p + 10);
    CHECK(tp_sampler_row(s, 2, 0) == p[8] && tp_sampler_row(s, 2, 1) == p[9]);
    CHECK(tp_sampler_row(s, 2, 2) == p[10] && tp_sampler_row(s, 2, 3) == p[11]);
    /* alternating between the two epochs of one step */
    CHECK(tp_sampler_row(s, 2, 3) == p[11] && tp_sampler_row(s, 2, 0) == p[8] && tp_sampler_row(s, 2, 2) == p[10]);
    CHECK(tp_sampler_epoch(s, 2) == 0);
    /* far steps do not overflow: step 10^15 of G=4 starts at position 4*10^15 */
    int64_t big = 1000000000000000ll;
    doc_shuffle(5, 4 * big / 10, 10, p);
    CHECK(tp_sampler_epoch(s, big) == 4 * big / 10 && tp_sampler_row(s, big, 1) == p[1]);
    tp_sampler_destroy(s);
    /* one step spanning three epochs: N=3, G=8 */
    CHECK(tp_sampler_create(3, 8, 11, &s, &err) == TP_OK);
    int64_t q3[9];
    for (int e = 0; e < 3; e++) doc_shuffle(11, e, 3, q3 + 3 * e);
    int ok = 1;
    for (int i = 0; i < 8; i++) ok &= tp_sampler_row(s, 0, i) == q3[i];
    CHECK(ok);
    CHECK(tp_sampler_epoch(s, 0) == 0 && tp_sampler_epoch(s, 1) == 2);
    tp_sampler_destroy(s);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/tptt-test-dataset-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_small_example();
    test_round_trip();
    test_rejections();
    test_writer();
    test_sampler();
    rmdir(dir);
    return tp_test_report("test_dataset");
}
