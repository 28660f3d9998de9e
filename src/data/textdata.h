/* textdata.h - text, Alpaca and chat data sets turned into a cached token
 * shard (docs/data.md, "Text data sets").
 *
 * tp_textdata_prepare is the step before tp_dataset_open: for data.format
 * text, alpaca or chat it tokenizes data.path once into a token shard in
 * data.cache_dir and reuses that shard while the source bytes, the tokenizer
 * and every option that changes tokens stay the same (they make up the
 * cache key). Every rank tokenizes the records that start in its byte slice
 * of the source (of a JSON array source: its slice of the elements); rank 0
 * merges the parts in rank order, so the shard is the same for any number of
 * ranks. Records that cannot be used (invalid JSON or UTF-8, a missing
 * field, a wrong type) are skipped and counted, or end the build
 * (data.bad_records: abort). */
#ifndef TPTT_DATA_TEXTDATA_H
#define TPTT_DATA_TEXTDATA_H

#include <stddef.h>
#include <stdint.h>

#include "dist/dist.h"
#include "tok/tokenizer.h"
#include "train/config.h"
#include "util/err.h"

/* Load the run's tokenizer: data.tokenizer, else model.path. */
int tp_textdata_tokenizer(const tp_train_cfg *c, tp_tokenizer **out, tp_err *err);

/* The token shard to train on (*out, caller frees): data.path itself for
 * format tokens (tok may then be NULL), else the cached shard, built when
 * missing or stale. Collective over d's ranks (no MPI call when d->world is
 * 1): every rank returns the same status; a rank that only learns of another
 * rank's failure gets an empty message (the failing rank's says what
 * happened). Rank 0 logs progress on stderr. */
int tp_textdata_prepare(const tp_train_cfg *c, tp_tokenizer *tok, const tp_dist *d, char **out, tp_err *err);

/* The validation shard of eval.path (*out, caller frees; *out = NULL and
 * TP_OK when eval.path is unset): tp_textdata_prepare with data.path
 * replaced by eval.path, so it is tokenized with the training data's format
 * and options and cached the same way. Collective like tp_textdata_prepare. */
int tp_textdata_prepare_eval(const tp_train_cfg *c, tp_tokenizer *tok, const tp_dist *d, char **out, tp_err *err);

/* ---- one record -> one document (used by prepare; exposed for tests) ---- */

enum { TP_TEXT_TEXT = 1, TP_TEXT_ALPACA, TP_TEXT_CHAT };
enum { TP_UNIT_LINE, TP_UNIT_PARAGRAPH, TP_UNIT_DOCUMENT };

typedef struct tp_textspec {
    const tp_data_cfg *dc;
    tp_tokenizer *tok;
    int format;       /* TP_TEXT_* */
    int txt;          /* format text from a .txt file: records are raw text */
    int unit;         /* TP_UNIT_* (.txt files) */
    int32_t bos, eos; /* ids added at a document's start / end, -1: none */
} tp_textspec;

/* Resolve data.* against the tokenizer (add_bos auto, BOS/EOS ids). Fails
 * when add_bos/add_eos ask for a token the tokenizer does not have. */
int tp_textspec_init(const tp_train_cfg *c, tp_tokenizer *tok, tp_textspec *s, tp_err *err);

/* A document: ids and, per id, 1 = trained on (label mask), 0 = not. */
typedef struct tp_textdoc {
    tp_ids ids;
    uint8_t *mask;
    size_t mask_cap;
} tp_textdoc;
void tp_textdoc_free(tp_textdoc *d);

enum { TP_REC_OK = 0, TP_REC_EMPTY = 1, TP_REC_BAD = 2 };
/* Build the document of one record: a JSONL line (without its newline) or,
 * for .txt sources, the text of one line/paragraph/file. EOS is appended
 * unless the document already ends with the EOS token. Returns TP_REC_OK,
 * TP_REC_EMPTY (no text: skipped without complaint), TP_REC_BAD (why says
 * what is wrong, e.g. "missing field 'output'"), or a negative TP_E* code
 * (allocation failure; err filled). doc is cleared first. */
int tp_textdoc_build(const tp_textspec *s, const char *rec, size_t n, tp_textdoc *doc, char *why, size_t nwhy,
                     tp_err *err);

#endif
