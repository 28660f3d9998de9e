/* perplexity.c - loss over a token shard, packed rows or sliding windows
 * (perplexity.h). */
#include "eval/perplexity.h"

#include <stdlib.h>
#include <string.h>

#include "data/dataset.h"

typedef struct rows_buf {
    int64_t B, T, n; /* capacity in rows, tokens per row, rows filled */
    int32_t *ids, *labels, *ds, *pos;
} rows_buf;

static int flush(tp_decoder *m, rows_buf *rb, tp_ppl_result *r, tp_err *err) {
    if (!rb->n) return TP_OK;
    tp_batch b = {rb->n, rb->T, rb->ids, rb->labels, rb->ds, rb->pos, NULL};
    double sum = 0;
    int64_t cnt = 0;
    int rc = tp_decoder_step(m, &b, 1.0, 0, NULL, &sum, &cnt, err);
    if (rc) return rc;
    r->loss_sum += sum;
    r->tokens += cnt;
    r->rows += rb->n;
    rb->n = 0;
    return TP_OK;
}

/* One window of a document: tokens [begin, end) of doc, predicting targets
 * [first, end) (first > begin); the rest of the row is padding (a document
 * of its own, labels -100). */
static void window_row(rows_buf *rb, const uint32_t *doc, const uint8_t *mask, int64_t begin, int64_t end,
                       int64_t first) {
    int64_t T = rb->T, n = end - begin, o = rb->n * T;
    for (int64_t j = 0; j < T; j++) {
        int in = j < n;
        rb->ids[o + j] = in ? (int32_t)doc[begin + j] : 0;
        rb->ds[o + j] = in ? 0 : (int32_t)n;
        rb->pos[o + j] = (int32_t)(in ? j : j - n);
        int64_t tgt = begin + j + 1; /* the token position j predicts */
        int scored = in && tgt < end && tgt >= first && (!mask || mask[tgt]);
        rb->labels[o + j] = scored ? (int32_t)doc[tgt] : -100;
    }
    rb->n++;
}

int tp_eval_perplexity(tp_decoder *m, const char *shard, const tp_ppl_opts *o, const tp_dist *d, tp_ppl_result *r,
                       tp_err *err) {
    memset(r, 0, sizeof *r);
    if (o->seq_len < 2 || o->micro < 1 || o->stride < 0 || o->stride > o->seq_len || o->max_rows < 0 ||
        (o->split > 0 && o->stride > 0))
        return tp_fail(err, TP_EINVAL, "perplexity: bad options (seq_len %lld, stride %lld, micro %lld)",
                       (long long)o->seq_len, (long long)o->stride, (long long)o->micro);
    tp_shard s;
    int rc = tp_shard_map(shard, &s, err);
    if (rc) return rc;
    int64_t V = tp_decoder_config(m)->vocab;
    if (s.n_tokens && s.max_token >= (uint64_t)V)
        rc = tp_fail(err, TP_EFORMAT, "%s: token id %llu is outside the model's vocabulary [0, %lld)", shard,
                     (unsigned long long)s.max_token, (long long)V);
    r->documents = (int64_t)s.n_docs;
    rows_buf rb = {o->micro, o->seq_len, 0, NULL, NULL, NULL, NULL};
    size_t cells = (size_t)(o->micro * o->seq_len);
    if (rc == TP_OK) {
        rb.ids = tp_malloc(cells * 4 * sizeof(int32_t), err);
        if (!rb.ids) rc = TP_ENOMEM;
        else {
            rb.labels = rb.ids + cells;
            rb.ds = rb.labels + cells;
            rb.pos = rb.ds + cells;
        }
    }
    tp_dataset *ds = NULL;
    int64_t idx = 0; /* global row / window index */
    if (rc == TP_OK && o->stride == 0) {
        rc = o->split > 0 ? tp_dataset_open_split(shard, o->seq_len, 0, o->split, o->split_seed, TP_SPLIT_HELDOUT, &ds, err)
                          : tp_dataset_open(shard, o->seq_len, 0, &ds, err);
        int64_t rows = rc ? 0 : tp_dataset_rows(ds);
        if (o->max_rows && rows > o->max_rows) rows = o->max_rows;
        for (idx = d->rank; rc == TP_OK && idx < rows; idx += d->world) {
            int64_t off = rb.n * o->seq_len;
            tp_dataset_row(ds, idx, rb.ids + off, rb.labels + off, rb.ds + off, rb.pos + off);
            rb.n++;
            if (rb.n == rb.B) rc = flush(m, &rb, r, err);
        }
    } else if (rc == TP_OK) {
        int64_t T = o->seq_len, S = o->stride;
        for (uint64_t di = 0; rc == TP_OK && di < s.n_docs; di++) {
            const uint32_t *doc = s.tokens + s.offsets[di];
            const uint8_t *mask = s.mask ? s.mask + s.offsets[di] : NULL;
            int64_t n = (int64_t)(s.offsets[di + 1] - s.offsets[di]), prev_end = 1;
            for (int64_t begin = 0; rc == TP_OK && n >= 2; begin += S) {
                int64_t end = begin + T < n ? begin + T : n;
                if (o->max_rows && idx >= o->max_rows) break;
                if (idx++ % d->world == d->rank) {
                    window_row(&rb, doc, mask, begin, end, prev_end);
                    if (rb.n == rb.B) rc = flush(m, &rb, r, err);
                }
                prev_end = end;
                if (end == n) break;
            }
        }
    }
    if (rc == TP_OK) rc = flush(m, &rb, r, err);
    tp_dataset_close(ds);
    free(rb.ids);
    tp_shard_unmap(&s);
    /* every rank takes part in the sums, failed or not */
    rc = tp_dist_agree(d, rc, err);
    if (rc) return rc;
    r->loss_sum = tp_dist_sum_f64(r->loss_sum);
    r->tokens = tp_dist_sum_i64(r->tokens);
    r->rows = tp_dist_sum_i64(r->rows);
    return TP_OK;
}
