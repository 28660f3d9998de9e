/* dataset.h - training data as packed rows, and the distributed sampler.
 *
 * Token shard format (docs/data.md), little-endian, read with mmap:
 *   offset 0   char[8]  magic "TPTTTOK1"
 *          8   uint32   version (1)
 *         12   uint32   flags (bit 0: has label mask)
 *         16   uint64   n_tokens
 *         24   uint64   n_docs
 *         32   uint64   vocab_hint (max token id + 1, for checks)
 *         40   uint64   reserved (0)
 *         48   uint32   tokens[n_tokens]
 *              uint64   doc_offsets[n_docs + 1]   (doc i = tokens[off[i], off[i+1]))
 *              uint8    label_mask[n_tokens]      (if flags bit 0; 1 = train on
 *                                                  predicting this token)
 *   Sections are 8-byte aligned (zero padding after tokens / mask).
 *
 * Packing: documents are laid end to end and cut into rows of seq_len tokens
 * (pack), or each document starts a row of its own, padded (TP_DATA_PAD); a
 * document crossing a row end continues in the next row (long_docs=split)
 * or documents longer than seq_len are dropped (TP_DATA_DROP_LONG). Each row
 * records where its documents start; labels are the next token of the same
 * document (-100 at a document's last token, at the row's last position and
 * where the label mask is 0).
 *
 * The reader interface (tp_dataset) is what the trainer sees; text, JSONL and
 * instruction formats plug in by producing a token shard first
 * (data/textdata.h). */
#ifndef TPTT_DATA_DATASET_H
#define TPTT_DATA_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

/* A whole shard, mapped read-only and validated (every reader check of
 * docs/data.md; an empty shard is fine here), for code that walks its
 * documents. Release with tp_shard_unmap. */
typedef struct tp_shard {
    const uint32_t *tokens;
    const uint64_t *offsets; /* n_docs + 1 entries */
    const uint8_t *mask;     /* NULL: no label mask */
    uint64_t n_tokens, n_docs, vocab_hint, max_token;
    const void *map;
    size_t size;
} tp_shard;
int tp_shard_map(const char *path, tp_shard *s, tp_err *err);
void tp_shard_unmap(tp_shard *s);

typedef struct tp_dataset tp_dataset;

enum {
    TP_DATA_DROP_LONG = 1, /* long_docs=drop: leave out documents longer than seq_len */
    TP_DATA_PAD = 2,       /* packing=pad: one document per row, padded */
};

/* Open a token shard (mmap) and build the row index for seq_len; flags:
 * TP_DATA_* (0: pack, split long documents). */
int tp_dataset_open(const char *path, int64_t seq_len, int flags, tp_dataset **out, tp_err *err);
/* The same over one side of a deterministic held-out split: document i is
 * held out when a hash of (seed, i) falls in the lowest `share` of the
 * hash range (share in [0, 1); 0 = no split, everything on the training
 * side). Which documents are held out depends only on (seed, share, i), not
 * on seq_len, packing or the number of ranks, and the two sides never share
 * a document. */
enum { TP_SPLIT_TRAIN = 0, TP_SPLIT_HELDOUT = 1 };
int tp_dataset_open_split(const char *path, int64_t seq_len, int flags, double share, uint64_t seed, int side,
                          tp_dataset **out, tp_err *err);
/* Whether document doc is on the held-out side (tests, reports). */
int tp_dataset_doc_heldout(uint64_t seed, double share, uint64_t doc);
void tp_dataset_close(tp_dataset *d);
int64_t tp_dataset_rows(const tp_dataset *d);
int64_t tp_dataset_seq_len(const tp_dataset *d);
uint64_t tp_dataset_max_token(const tp_dataset *d); /* largest token id present */
/* Fill one row: ids[seq_len], labels[seq_len], doc_start[seq_len] (row-local
 * start of each token's document), pos[seq_len] (position within document).
 * Rows shorter than seq_len (the last) are padded with token 0, label -100,
 * as a document of their own. */
void tp_dataset_row(const tp_dataset *d, int64_t row, int32_t *ids, int32_t *labels, int32_t *doc_start, int32_t *pos);

/* Deterministic sampler: epoch e visits every row once in the order of a
 * Fisher-Yates shuffle seeded by (seed, e). Optimizer step s takes the
 * global_batch consecutive positions s*G .. s*G+G-1 of the endless sequence
 * epoch 0, epoch 1, ...; rank r of W takes the contiguous slice
 * [r*G/W, (r+1)*G/W) of it. The cursor is the step number alone, so resuming
 * needs nothing else. */
typedef struct tp_sampler tp_sampler;
int tp_sampler_create(int64_t rows, int64_t global_batch, uint64_t seed, tp_sampler **out, tp_err *err);
void tp_sampler_destroy(tp_sampler *s);
/* The row index of slot i (0 <= i < global_batch) of step s. */
int64_t tp_sampler_row(tp_sampler *s, int64_t step, int64_t i);
int64_t tp_sampler_epoch(const tp_sampler *s, int64_t step);

/* Writer used by tools and tests: documents appended one at a time. */
typedef struct tp_shard_writer tp_shard_writer;
int tp_shard_writer_open(const char *path, int with_mask, tp_shard_writer **out, tp_err *err);
/* mask may be NULL (all 1) when the shard has a mask. */
int tp_shard_writer_add(tp_shard_writer *w, const uint32_t *tokens, const uint8_t *mask, size_t n, tp_err *err);
int tp_shard_writer_close(tp_shard_writer *w, tp_err *err); /* fsync + atomic rename */
void tp_shard_writer_abort(tp_shard_writer *w);

#endif
