/* dataset.c - token shards: streaming writer, validating mmap reader, row
 * packing, and the deterministic distributed sampler (docs/data.md). */
#include "data/dataset.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/fsutil.h"
#include "util/rng.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "token shards are little-endian and mapped in place: a little-endian host is required"
#endif

#define SHARD_MAGIC "TPTTTOK1"
#define SHARD_VERSION 1u
#define SHARD_FLAG_MASK 1u
#define SHARD_HEADER 48u
#define MAX_TOKEN_ID 0x7fffffffu     /* ids are handed out as int32 */
#define MAX_VOCAB 0x80000000ull      /* vocab_hint <= 2^31 */
#define MAX_SEQ_LEN (1ll << 30)
#define MAX_WRITER_TOKENS (1ull << 60)
#define SAMPLER_STREAM 0x5a0000ull   /* rng stream of epoch e: SAMPLER_STREAM + e */

static uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* x rounded up to a multiple of 8; 0 on overflow. */
static int align8(uint64_t x, uint64_t *out) {
    if (x > UINT64_MAX - 7) return 0;
    *out = (x + 7) & ~(uint64_t)7;
    return 1;
}

/* ---- reader ------------------------------------------------------------ */

struct tp_dataset {
    char *path;
    tp_shard sh;
    int64_t seq_len, rows;
    int drop, pad;
    /* row r starts in document row_doc[r] (a kept one), row_skip[r] tokens in */
    uint64_t *row_doc, *row_skip;
    /* held-out split: documents whose hash falls below split_threshold are
     * the held-out side */
    int split_side;            /* -1: no split; TP_SPLIT_TRAIN or TP_SPLIT_HELDOUT */
    uint64_t split_seed, split_threshold;
};

static uint64_t split_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* the hash threshold of a held-out share in [0, 1) */
static uint64_t split_threshold(double share) { return (uint64_t)(share * 18446744073709551616.0); }

static int heldout(uint64_t seed, uint64_t threshold, uint64_t doc) {
    return split_mix(seed ^ split_mix(doc + 0x5851f42d4c957f2dULL)) < threshold;
}

int tp_dataset_doc_heldout(uint64_t seed, double share, uint64_t doc) {
    return heldout(seed, share >= 1 ? UINT64_MAX : split_threshold(share), doc);
}

static int doc_kept(const tp_dataset *d, uint64_t i) {
    uint64_t len = d->sh.offsets[i + 1] - d->sh.offsets[i];
    if (len == 0 || (d->drop && len > (uint64_t)d->seq_len)) return 0;
    if (d->split_side < 0) return 1;
    return heldout(d->split_seed, d->split_threshold, i) == (d->split_side == TP_SPLIT_HELDOUT);
}

/* Check the mapped image s->map (s->size bytes); fills the section pointers
 * and max_token. */
static int validate(const char *p, tp_shard *s, tp_err *err) {
    const uint8_t *b = s->map;
    if (s->size < SHARD_HEADER)
        return tp_fail(err, TP_EFORMAT, "%s: file is %zu bytes, shorter than the %u-byte token shard header", p,
                       s->size, SHARD_HEADER);
    if (memcmp(b, SHARD_MAGIC, 8) != 0)
        return tp_fail(err, TP_EFORMAT, "%s: magic: not a token shard (the file does not start with \"%s\")", p,
                       SHARD_MAGIC);
    uint32_t version = rd32(b + 8), flags = rd32(b + 12);
    uint64_t n_tokens = rd64(b + 16), n_docs = rd64(b + 24), vocab = rd64(b + 32), reserved = rd64(b + 40);
    if (version != SHARD_VERSION)
        return tp_fail(err, TP_EFORMAT, "%s: version %u is not supported (expected %u)", p, version, SHARD_VERSION);
    if (flags & ~SHARD_FLAG_MASK)
        return tp_fail(err, TP_EFORMAT, "%s: flags 0x%x has unknown bits set (only bit 0, label mask, is defined)", p,
                       flags);
    if (reserved != 0)
        return tp_fail(err, TP_EFORMAT, "%s: reserved field is %llu, expected 0", p, (unsigned long long)reserved);
    if (vocab > MAX_VOCAB)
        return tp_fail(err, TP_EFORMAT, "%s: vocab_hint %llu exceeds 2^31 (token ids are int32)", p,
                       (unsigned long long)vocab);
    int has_mask = (flags & SHARD_FLAG_MASK) != 0;
    uint64_t tok_bytes, tok_pad, off_count, off_bytes, mask_pad = 0, total;
    if (__builtin_mul_overflow(n_tokens, (uint64_t)4, &tok_bytes) || !align8(tok_bytes, &tok_pad) ||
        (has_mask && !align8(n_tokens, &mask_pad)))
        return tp_fail(err, TP_EFORMAT, "%s: n_tokens %llu overflows 64-bit section sizes", p,
                       (unsigned long long)n_tokens);
    if (__builtin_add_overflow(n_docs, (uint64_t)1, &off_count) ||
        __builtin_mul_overflow(off_count, (uint64_t)8, &off_bytes))
        return tp_fail(err, TP_EFORMAT, "%s: n_docs %llu overflows 64-bit section sizes", p,
                       (unsigned long long)n_docs);
    if (__builtin_add_overflow((uint64_t)SHARD_HEADER, tok_pad, &total) ||
        __builtin_add_overflow(total, off_bytes, &total) || __builtin_add_overflow(total, mask_pad, &total))
        return tp_fail(err, TP_EFORMAT, "%s: n_tokens %llu and n_docs %llu overflow 64-bit file sizes", p,
                       (unsigned long long)n_tokens, (unsigned long long)n_docs);
    if (total != (uint64_t)s->size)
        return tp_fail(err, TP_EFORMAT,
                       "%s: size: header declares %llu tokens and %llu documents%s (%llu bytes) but the file holds %zu "
                       "bytes",
                       p, (unsigned long long)n_tokens, (unsigned long long)n_docs, has_mask ? " with a label mask" : "",
                       (unsigned long long)total, s->size);
    s->n_tokens = n_tokens;
    s->n_docs = n_docs;
    s->vocab_hint = vocab;
    s->tokens = (const uint32_t *)(b + SHARD_HEADER);
    s->offsets = (const uint64_t *)(b + SHARD_HEADER + tok_pad);
    s->mask = has_mask ? b + SHARD_HEADER + tok_pad + off_bytes : NULL;
    for (uint64_t i = SHARD_HEADER + tok_bytes; i < SHARD_HEADER + tok_pad; i++)
        if (b[i])
            return tp_fail(err, TP_EFORMAT, "%s: padding after tokens (byte %llu) is not zero", p,
                           (unsigned long long)i);
    if (has_mask)
        for (uint64_t i = n_tokens; i < mask_pad; i++)
            if (s->mask[i])
                return tp_fail(err, TP_EFORMAT, "%s: padding after label_mask (byte %llu) is not zero", p,
                               (unsigned long long)(SHARD_HEADER + tok_pad + off_bytes + i));
    const uint64_t *off = s->offsets;
    if (off[0] != 0)
        return tp_fail(err, TP_EFORMAT, "%s: doc_offsets[0] is %llu, expected 0", p, (unsigned long long)off[0]);
    for (uint64_t i = 1; i <= n_docs; i++)
        if (off[i] < off[i - 1])
            return tp_fail(err, TP_EFORMAT, "%s: doc_offsets[%llu] = %llu is less than doc_offsets[%llu] = %llu "
                           "(must be non-decreasing)", p, (unsigned long long)i, (unsigned long long)off[i],
                           (unsigned long long)(i - 1), (unsigned long long)off[i - 1]);
    if (off[n_docs] != n_tokens)
        return tp_fail(err, TP_EFORMAT, "%s: doc_offsets[%llu] (the last) is %llu, expected n_tokens = %llu", p,
                       (unsigned long long)n_docs, (unsigned long long)off[n_docs], (unsigned long long)n_tokens);
    uint32_t mx = 0;
    for (uint64_t i = 0; i < n_tokens; i++) {
        uint32_t t = s->tokens[i];
        if (t > mx) mx = t;
    }
    if (n_tokens && (uint64_t)mx >= vocab) {
        uint64_t i = 0;
        while ((uint64_t)s->tokens[i] < vocab) i++;
        return tp_fail(err, TP_EFORMAT, "%s: tokens[%llu] = %u is not below vocab_hint %llu", p,
                       (unsigned long long)i, s->tokens[i], (unsigned long long)vocab);
    }
    s->max_token = mx;
    if (has_mask)
        for (uint64_t i = 0; i < n_tokens; i++)
            if (s->mask[i] > 1)
                return tp_fail(err, TP_EFORMAT, "%s: label_mask[%llu] is %u, expected 0 or 1", p,
                               (unsigned long long)i, s->mask[i]);
    return TP_OK;
}

int tp_shard_map(const char *path, tp_shard *s, tp_err *err) {
    memset(s, 0, sizeof *s);
    int rc = tp_map_readonly(path, &s->map, &s->size, err);
    if (rc != TP_OK) return rc; /* a file shorter than the header is reported by validate() */
    if ((rc = validate(path, s, err)) != TP_OK) tp_shard_unmap(s);
    return rc;
}

void tp_shard_unmap(tp_shard *s) {
    tp_unmap(s->map, s->size);
    memset(s, 0, sizeof *s);
}

/* Where each row starts. pack: the kept documents laid end to end, cut every
 * T tokens. pad: every kept document starts a row of its own (a longer one
 * fills ceil(len / T) rows). */
static int build_rows(tp_dataset *d, tp_err *err) {
    const uint64_t T = (uint64_t)d->seq_len, *off = d->sh.offsets;
    uint64_t total = 0, dropped = 0, rows = 0;
    for (uint64_t i = 0; i < d->sh.n_docs; i++) {
        uint64_t len = off[i + 1] - off[i];
        if (doc_kept(d, i)) {
            total += len;
            rows += len / T + (len % T != 0);
        } else if (len > 0) dropped++;
    }
    if (!d->pad) rows = total / T + (total % T != 0);
    if (rows == 0) {
        if (d->sh.n_tokens == 0)
            return tp_fail(err, TP_EINVAL, "%s: the shard holds no tokens (%llu documents, all empty)", d->path,
                           (unsigned long long)d->sh.n_docs);
        if (d->split_side >= 0)
            return tp_fail(err, TP_EINVAL, "%s: the %s side of the held-out split (eval.split) has no documents "
                           "(%llu in the shard)", d->path, d->split_side == TP_SPLIT_HELDOUT ? "held-out" : "training",
                           (unsigned long long)d->sh.n_docs);
        return tp_fail(err, TP_EINVAL,
                       "%s: no rows to train on: all %llu non-empty documents are longer than seq_len %lld and "
                       "long_docs=drop drops them",
                       d->path, (unsigned long long)dropped, (long long)d->seq_len);
    }
    if (rows > (uint64_t)INT64_MAX / 2 || rows > SIZE_MAX / sizeof(uint64_t))
        return tp_fail(err, TP_EUNSUP, "%s: %llu rows is too many", d->path, (unsigned long long)rows);
    d->row_doc = tp_malloc((size_t)rows * sizeof(uint64_t), err);
    d->row_skip = tp_malloc((size_t)rows * sizeof(uint64_t), err);
    if (!d->row_doc || !d->row_skip) return TP_ENOMEM;
    uint64_t s = 0, r = 0; /* s: stream offset of document i; rows < r start before s */
    for (uint64_t i = 0; i < d->sh.n_docs && r < rows; i++) {
        if (!doc_kept(d, i)) continue;
        uint64_t len = off[i + 1] - off[i];
        if (d->pad) {
            for (uint64_t k = 0; k < len; k += T, r++) {
                d->row_doc[r] = i;
                d->row_skip[r] = k;
            }
            continue;
        }
        for (; r < rows && r * T < s + len; r++) {
            d->row_doc[r] = i;
            d->row_skip[r] = r * T - s;
        }
        s += len;
    }
    d->rows = (int64_t)rows;
    return TP_OK;
}

int tp_dataset_open(const char *path, int64_t seq_len, int flags, tp_dataset **out, tp_err *err) {
    return tp_dataset_open_split(path, seq_len, flags, 0.0, 0, TP_SPLIT_TRAIN, out, err);
}

int tp_dataset_open_split(const char *path, int64_t seq_len, int flags, double share, uint64_t seed, int side,
                          tp_dataset **out, tp_err *err) {
    *out = NULL;
    if (!(share >= 0 && share < 1))
        return tp_fail(err, TP_EINVAL, "%s: held-out share %g is outside [0, 1)", path, share);
    if (seq_len < 1 || seq_len > MAX_SEQ_LEN)
        return tp_fail(err, TP_EINVAL, "%s: seq_len %lld is out of range (1 .. 2^30)", path, (long long)seq_len);
    if (flags & ~(TP_DATA_DROP_LONG | TP_DATA_PAD))
        return tp_fail(err, TP_EINVAL, "%s: unknown dataset flags 0x%x", path, (unsigned)flags);
    tp_dataset *d = tp_calloc(1, sizeof *d, err);
    if (!d) return TP_ENOMEM;
    d->seq_len = seq_len;
    d->split_side = share > 0 ? side : -1;
    d->split_seed = seed;
    d->split_threshold = split_threshold(share);
    d->drop = (flags & TP_DATA_DROP_LONG) != 0;
    d->pad = (flags & TP_DATA_PAD) != 0;
    int rc = (d->path = tp_strdup(path, err)) ? TP_OK : TP_ENOMEM;
    if (rc == TP_OK) rc = tp_shard_map(path, &d->sh, err);
    if (rc == TP_OK) rc = build_rows(d, err);
    if (rc != TP_OK) {
        tp_dataset_close(d);
        return rc;
    }
    *out = d;
    return TP_OK;
}

void tp_dataset_close(tp_dataset *d) {
    if (!d) return;
    tp_shard_unmap(&d->sh);
    free(d->row_doc);
    free(d->row_skip);
    free(d->path);
    free(d);
}

int64_t tp_dataset_rows(const tp_dataset *d) { return d->rows; }
int64_t tp_dataset_seq_len(const tp_dataset *d) { return d->seq_len; }
uint64_t tp_dataset_max_token(const tp_dataset *d) { return d->sh.max_token; }

void tp_dataset_row(const tp_dataset *d, int64_t row, int32_t *ids, int32_t *labels, int32_t *doc_start,
                    int32_t *pos) {
    if (row < 0 || row >= d->rows) {
        fprintf(stderr, "tptt: internal error: %s: row %lld requested, the dataset has %lld\n", d->path,
                (long long)row, (long long)d->rows);
        abort();
    }
    const int64_t T = d->seq_len;
    const uint32_t *tok = d->sh.tokens;
    const uint8_t *mask = d->sh.mask;
    int64_t t = 0;
    uint64_t i = d->row_doc[row], skip = d->row_skip[row];
    while (t < T && i < d->sh.n_docs) {
        if (!doc_kept(d, i)) {
            i++;
            continue;
        }
        uint64_t b = d->sh.offsets[i] + skip, len = d->sh.offsets[i + 1] - b; /* what is left of document i */
        int64_t take = (uint64_t)(T - t) < len ? T - t : (int64_t)len;
        for (int64_t j = 0; j < take; j++) {
            ids[t + j] = (int32_t)tok[b + (uint64_t)j];
            doc_start[t + j] = (int32_t)t;
            pos[t + j] = (int32_t)j;
            /* the chunk's last token is the document's last or the row's last */
            int next_trains = j + 1 < take && (!mask || mask[b + (uint64_t)j + 1]);
            labels[t + j] = next_trains ? (int32_t)tok[b + (uint64_t)j + 1] : -100;
        }
        t += take;
        i++;
        skip = 0;
        if (d->pad) break; /* one document (or piece of one) per row */
    }
    for (int64_t j = t; j < T; j++) { /* padding: a document of its own */
        ids[j] = 0;
        labels[j] = -100;
        doc_start[j] = (int32_t)t;
        pos[j] = (int32_t)(j - t);
    }
}

/* ---- sampler ----------------------------------------------------------- */

struct tp_sampler {
    int64_t rows, gb;
    uint64_t seed;
    int64_t *perm[2]; /* cached orders of epochs epoch[0], epoch[1] */
    int64_t epoch[2]; /* -1: empty slot */
    int victim;       /* slot the next computed epoch replaces */
};

int tp_sampler_create(int64_t rows, int64_t global_batch, uint64_t seed, tp_sampler **out, tp_err *err) {
    *out = NULL;
    int64_t prod;
    if (rows < 1) return tp_fail(err, TP_EINVAL, "sampler: the dataset has %lld rows, at least 1 needed", (long long)rows);
    if (global_batch < 1)
        return tp_fail(err, TP_EINVAL, "sampler: global batch %lld must be positive", (long long)global_batch);
    if (__builtin_mul_overflow(rows, global_batch, &prod) || prod > INT64_MAX / 4 ||
        (uint64_t)rows > SIZE_MAX / sizeof(int64_t))
        return tp_fail(err, TP_EINVAL, "sampler: %lld rows x global batch %lld is too large", (long long)rows,
                       (long long)global_batch);
    tp_sampler *s = tp_calloc(1, sizeof *s, err);
    if (!s) return TP_ENOMEM;
    s->rows = rows;
    s->gb = global_batch;
    s->seed = seed;
    s->epoch[0] = s->epoch[1] = -1;
    for (int k = 0; k < 2; k++) {
        s->perm[k] = tp_malloc((size_t)rows * sizeof(int64_t), err);
        if (!s->perm[k]) {
            tp_sampler_destroy(s);
            return TP_ENOMEM;
        }
    }
    *out = s;
    return TP_OK;
}

void tp_sampler_destroy(tp_sampler *s) {
    if (!s) return;
    free(s->perm[0]);
    free(s->perm[1]);
    free(s);
}

/* Uniform in [0, n), n >= 1, without modulo bias. */
static uint64_t below(tp_rng *r, uint64_t n) {
    uint64_t lim = (0 - n) % n; /* 2^64 mod n: values >= lim are a whole number of n-cycles */
    uint64_t x;
    do x = tp_rng_next(r);
    while (x < lim);
    return x % n;
}

static const int64_t *epoch_order(tp_sampler *s, int64_t e) {
    for (int k = 0; k < 2; k++)
        if (s->epoch[k] == e) {
            s->victim = 1 - k; /* keep the one just used */
            return s->perm[k];
        }
    int k = s->victim;
    int64_t *p = s->perm[k];
    for (int64_t i = 0; i < s->rows; i++) p[i] = i;
    tp_rng r;
    tp_rng_seed(&r, s->seed, SAMPLER_STREAM + (uint64_t)e);
    for (int64_t i = s->rows - 1; i > 0; i--) {
        int64_t j = (int64_t)below(&r, (uint64_t)i + 1);
        int64_t t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
    s->epoch[k] = e;
    s->victim = 1 - k;
    return p;
}

/* Position step*G + i of the endless sequence as (epoch, index in epoch),
 * without forming step*G (step = q*N + a, so step*G = q*N*G + a*G). A bad
 * argument is a caller bug: report it and abort. */
static void locate(const tp_sampler *s, int64_t step, int64_t i, int64_t *epoch, int64_t *idx) {
    int64_t q = step / s->rows, a = step % s->rows, qg;
    if (step < 0 || i < 0 || i >= s->gb || __builtin_mul_overflow(q, s->gb, &qg)) {
        fprintf(stderr, "tptt: internal error: sampler slot %lld of step %lld requested (global batch %lld)\n",
                (long long)i, (long long)step, (long long)s->gb);
        abort();
    }
    int64_t rem = a * s->gb + i; /* < N*G + G, bounded at create */
    *epoch = qg + rem / s->rows;
    *idx = rem % s->rows;
}

int64_t tp_sampler_row(tp_sampler *s, int64_t step, int64_t i) {
    int64_t e, idx;
    locate(s, step, i, &e, &idx);
    return epoch_order(s, e)[idx];
}

int64_t tp_sampler_epoch(const tp_sampler *s, int64_t step) {
    int64_t e, idx;
    locate(s, step, 0, &e, &idx);
    return e;
}

/* ---- writer ------------------------------------------------------------ */

struct tp_shard_writer {
    char *path, *tmp;
    FILE *fp;       /* the shard under its temporary name: header placeholder, then tokens */
    FILE *mfp;      /* label mask bytes (unlinked at creation, so nothing is left behind) */
    int with_mask, failed;
    uint64_t n_tokens;
    uint32_t max_token;
    uint64_t *offs; /* doc_offsets so far: n_offs = n_docs + 1 entries */
    size_t n_offs, cap_offs;
};

int tp_shard_writer_open(const char *path, int with_mask, tp_shard_writer **out, tp_err *err) {
    *out = NULL;
    tp_shard_writer *w = tp_calloc(1, sizeof *w, err);
    if (!w) return TP_ENOMEM;
    w->with_mask = with_mask != 0;
    w->cap_offs = 1024;
    w->path = tp_strdup(path, err);
    w->tmp = tp_tmp_name(path, err);
    w->offs = tp_malloc(w->cap_offs * sizeof *w->offs, err);
    if (!w->path || !w->tmp || !w->offs) {
        tp_shard_writer_abort(w);
        return TP_ENOMEM;
    }
    w->offs[w->n_offs++] = 0;
    w->fp = fopen(w->tmp, "w+b");
    if (!w->fp) {
        int rc = tp_fail(err, TP_EIO, "%s: cannot create: %s", w->tmp, strerror(errno));
        tp_shard_writer_abort(w);
        return rc;
    }
    setvbuf(w->fp, NULL, _IOFBF, 1 << 20);
    static const uint8_t zero[SHARD_HEADER];
    if (fwrite(zero, 1, sizeof zero, w->fp) != sizeof zero) {
        int rc = tp_fail(err, TP_EIO, "%s: write failed: %s", w->tmp, strerror(errno));
        tp_shard_writer_abort(w);
        return rc;
    }
    if (w->with_mask) {
        size_t n = strlen(path) + 48;
        char *mtmp = tp_malloc(n, err);
        if (!mtmp) {
            tp_shard_writer_abort(w);
            return TP_ENOMEM;
        }
        snprintf(mtmp, n, "%s.mask.tmp.%ld", path, (long)getpid());
        w->mfp = fopen(mtmp, "w+b");
        int e = errno;
        if (w->mfp) unlink(mtmp);
        free(mtmp);
        if (!w->mfp) {
            int rc = tp_fail(err, TP_EIO, "%s: cannot create the label-mask temporary file: %s", path, strerror(e));
            tp_shard_writer_abort(w);
            return rc;
        }
        setvbuf(w->mfp, NULL, _IOFBF, 1 << 20);
    }
    *out = w;
    return TP_OK;
}

int tp_shard_writer_add(tp_shard_writer *w, const uint32_t *tokens, const uint8_t *mask, size_t n, tp_err *err) {
    if (w->failed) return tp_fail(err, TP_EINVAL, "%s: an earlier write failed; the shard cannot be completed", w->path);
    if (mask && !w->with_mask)
        return tp_fail(err, TP_EINVAL, "%s: document %zu has a label mask but the shard was opened without one",
                       w->path, w->n_offs - 1);
    if (n > MAX_WRITER_TOKENS - w->n_tokens)
        return tp_fail(err, TP_EINVAL, "%s: more than 2^60 tokens", w->path);
    uint32_t mx = w->max_token;
    for (size_t j = 0; j < n; j++) {
        if (tokens[j] > MAX_TOKEN_ID)
            return tp_fail(err, TP_EINVAL, "%s: document %zu: token %zu is %u, above the largest id 2^31-1", w->path,
                           w->n_offs - 1, j, tokens[j]);
        if (tokens[j] > mx) mx = tokens[j];
        if (mask && mask[j] > 1)
            return tp_fail(err, TP_EINVAL, "%s: document %zu: mask[%zu] is %u, expected 0 or 1", w->path,
                           w->n_offs - 1, j, mask[j]);
    }
    if (w->n_offs == w->cap_offs) {
        size_t cap = w->cap_offs * 2;
        uint64_t *p = realloc(w->offs, cap * sizeof *p);
        if (!p) return tp_fail(err, TP_ENOMEM, "%s: out of memory for %zu document offsets", w->path, cap);
        w->offs = p;
        w->cap_offs = cap;
    }
    int ok = n == 0 || fwrite(tokens, sizeof *tokens, n, w->fp) == n;
    if (ok && w->with_mask) {
        if (mask) ok = n == 0 || fwrite(mask, 1, n, w->mfp) == n;
        else
            for (size_t j = 0; j < n && ok; j++) ok = fputc(1, w->mfp) != EOF;
    }
    if (!ok) {
        w->failed = 1;
        return tp_fail(err, TP_EIO, "%s: write failed: %s", w->tmp, strerror(errno));
    }
    w->max_token = mx;
    w->n_tokens += n;
    w->offs[w->n_offs++] = w->n_tokens;
    return TP_OK;
}

static int write_zeros(FILE *fp, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if (fputc(0, fp) == EOF) return 0;
    return 1;
}

int tp_shard_writer_close(tp_shard_writer *w, tp_err *err) {
    if (w->failed) {
        int rc = tp_fail(err, TP_EIO, "%s: not written: an earlier write failed", w->path);
        tp_shard_writer_abort(w);
        return rc;
    }
    uint64_t n_docs = w->n_offs - 1;
    uint64_t tok_bytes = w->n_tokens * 4;
    int ok = write_zeros(w->fp, (8 - tok_bytes % 8) % 8) &&
             fwrite(w->offs, sizeof *w->offs, w->n_offs, w->fp) == w->n_offs;
    if (ok && w->with_mask) {
        ok = fflush(w->mfp) == 0 && fseek(w->mfp, 0, SEEK_SET) == 0;
        uint8_t buf[1 << 14];
        uint64_t left = w->n_tokens;
        while (ok && left) {
            size_t k = left < sizeof buf ? (size_t)left : sizeof buf;
            ok = fread(buf, 1, k, w->mfp) == k && fwrite(buf, 1, k, w->fp) == k;
            left -= k;
        }
        ok = ok && write_zeros(w->fp, (8 - w->n_tokens % 8) % 8);
    }
    uint8_t h[SHARD_HEADER] = {0};
    uint32_t version = SHARD_VERSION, flags = w->with_mask ? SHARD_FLAG_MASK : 0;
    uint64_t vocab = w->n_tokens ? (uint64_t)w->max_token + 1 : 0;
    memcpy(h, SHARD_MAGIC, 8);
    memcpy(h + 8, &version, 4);
    memcpy(h + 12, &flags, 4);
    memcpy(h + 16, &w->n_tokens, 8);
    memcpy(h + 24, &n_docs, 8);
    memcpy(h + 32, &vocab, 8);
    ok = ok && fseek(w->fp, 0, SEEK_SET) == 0 && fwrite(h, 1, sizeof h, w->fp) == sizeof h;
    if (!ok) {
        int rc = tp_fail(err, TP_EIO, "%s: write failed: %s", w->tmp, strerror(errno));
        tp_shard_writer_abort(w);
        return rc;
    }
    FILE *fp = w->fp;
    w->fp = NULL;
    int rc = tp_fclose_synced(fp, w->tmp, err);
    if (rc == TP_OK) rc = tp_rename_synced(w->tmp, w->path, err);
    if (rc != TP_OK) {
        tp_shard_writer_abort(w); /* removes the temporary file */
        return rc;
    }
    free(w->tmp);
    w->tmp = NULL;
    tp_shard_writer_abort(w); /* frees the rest; nothing left to remove */
    return TP_OK;
}

void tp_shard_writer_abort(tp_shard_writer *w) {
    if (!w) return;
    if (w->fp) fclose(w->fp);
    if (w->mfp) fclose(w->mfp);
    if (w->tmp) unlink(w->tmp);
    free(w->tmp);
    free(w->path);
    free(w->offs);
    free(w);
}
