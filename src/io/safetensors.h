/* safetensors.h - read and write the safetensors format (FORMATS.md).
 *
 * Reader: tp_st_open() maps the file read-only (MAP_SHARED, PROT_READ), so
 * ranks on one node share the page cache, and hands out typed views pointing
 * into the map: no tensor data is ever copied. Every rule of FORMATS.md is
 * checked before a view is handed out; a violation is a TP_EFORMAT error whose
 * message names the file and, where there is one, the tensor.
 *
 * Writer: tp_st_writer_* stream a file tensor by tensor (so a model larger than
 * memory can be written), into "<path>.tmp.<pid>", fsync'ed and renamed into
 * place on close. The header lists tensors in the order given, data offsets
 * tile the buffer in that order, and the header is padded with spaces so the
 * data starts at a multiple of 8.
 *
 * Ownership: a tp_st_file owns its map, names and views; they stay valid until
 * tp_st_close(). Views are in data-offset order. */
#ifndef TPTT_IO_SAFETENSORS_H
#define TPTT_IO_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "util/dtype.h"
#include "util/err.h"

#define TP_ST_MAX_DIMS 8
#define TP_ST_MAX_HEADER 100000000ull /* 100 MB, as the reference implementation */

typedef struct tp_tensor_view {
    const char *name;
    tp_dtype dtype;
    int ndim;
    int64_t shape[TP_ST_MAX_DIMS];
    uint64_t numel;
    uint64_t nbytes;
    uint64_t offset;  /* absolute byte offset of the data in the file */
    const void *data; /* read-only, inside the map; NULL for zero-sized tensors */
} tp_tensor_view;

typedef struct tp_kv {
    const char *key;
    const char *value;
} tp_kv;

typedef struct tp_st_file tp_st_file;

/* Open and validate a file. On success *out owns the read-only map. */
int tp_st_open(const char *path, tp_st_file **out, tp_err *err);

/* Validate an in-memory image of a whole file (label names it in errors).
 * Views point into buf, which must outlive the result. Used by tp_st_open
 * and by the fuzz harness. */
int tp_st_parse(const char *label, const uint8_t *buf, size_t size, tp_st_file **out, tp_err *err);

void tp_st_close(tp_st_file *f);

const char *tp_st_path(const tp_st_file *f);
uint64_t tp_st_file_size(const tp_st_file *f);
size_t tp_st_count(const tp_st_file *f);
const tp_tensor_view *tp_st_at(const tp_st_file *f, size_t i); /* offset order */
const tp_tensor_view *tp_st_find(const tp_st_file *f, const char *name); /* NULL if absent */
size_t tp_st_meta_count(const tp_st_file *f);
const tp_kv *tp_st_meta_at(const tp_st_file *f, size_t i);
const char *tp_st_meta_get(const tp_st_file *f, const char *key); /* NULL if absent */

/* Shape/type of one tensor to write. */
typedef struct tp_st_spec {
    const char *name;
    tp_dtype dtype;
    int ndim;
    int64_t shape[TP_ST_MAX_DIMS];
} tp_st_spec;

typedef struct tp_st_writer tp_st_writer;

/* Start a file holding specs[0..n) in that order, with string metadata. */
int tp_st_writer_open(const char *path, const tp_st_spec *specs, size_t n, const tp_kv *meta,
                      size_t nmeta, tp_st_writer **out, tp_err *err);
/* Append raw little-endian bytes; tensors are filled in spec order and a call
 * may cover part of a tensor or span several. */
int tp_st_writer_write(tp_st_writer *w, const void *bytes, size_t nbytes, tp_err *err);
/* Check every byte was written, fsync, rename into place. Frees w. */
int tp_st_writer_close(tp_st_writer *w, tp_err *err);
/* Drop the temporary file. Frees w. */
void tp_st_writer_abort(tp_st_writer *w);

/* One-shot: write n tensors whose bytes are data[i]. */
int tp_st_write(const char *path, const tp_st_spec *specs, const void *const *data, size_t n,
                const tp_kv *meta, size_t nmeta, tp_err *err);

/* Bytes of one tensor, checked (returns 0 and sets *out, or -1 on overflow). */
int tp_st_spec_nbytes(const tp_st_spec *s, uint64_t *out);

#endif
