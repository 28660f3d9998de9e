/* fsutil.h - growable strings and crash-safe file operations.
 *
 * Crash safety (FORMATS.md): files are written under a temporary name in the
 * same directory, fsync'ed, renamed into place, and the directory fsync'ed, so
 * a reader sees the old file or the complete new one, never a torn one. */
#ifndef TPTT_UTIL_FSUTIL_H
#define TPTT_UTIL_FSUTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include "util/err.h"

/* Growable NUL-terminated string. Allocation failure sets oom and makes later
 * appends no-ops, so callers check once at the end. */
typedef struct tp_strbuf {
    char *buf;
    size_t len, cap;
    int oom;
} tp_strbuf;

void tp_strbuf_init(tp_strbuf *s);
void tp_strbuf_free(tp_strbuf *s);
void tp_strbuf_puts(tp_strbuf *s, const char *str);
void tp_strbuf_putn(tp_strbuf *s, const char *str, size_t n);
void tp_strbuf_printf(tp_strbuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Append str as a quoted JSON string with escapes. */
void tp_strbuf_json_string(tp_strbuf *s, const char *str);
/* Same for str[0..n), which may contain NUL (written as \u0000). */
void tp_strbuf_json_stringn(tp_strbuf *s, const char *str, size_t n);

/* "<path>.tmp.<pid>" (caller frees). */
char *tp_tmp_name(const char *path, tp_err *err);
/* "<dir>/<name>" (caller frees). */
char *tp_path_join(const char *dir, const char *name, tp_err *err);
/* Directory part of path (caller frees); "." when there is none. */
char *tp_dirname(const char *path, tp_err *err);

/* fflush + fsync + fclose; reports errors naming path. Always closes fp. */
int tp_fclose_synced(FILE *fp, const char *path, tp_err *err);
/* rename(from, to) then fsync the directory holding to. */
int tp_rename_synced(const char *from, const char *to, tp_err *err);
/* fsync a directory. */
int tp_fsync_dir(const char *dir, tp_err *err);
/* Write a whole small file crash-safely (temp + fsync + rename). */
int tp_write_file_atomic(const char *path, const void *data, size_t n, tp_err *err);
/* Open a regular file for reading without ever blocking on a FIFO (the
 * type is checked before any read). Returns the descriptor (O_CLOEXEC), or a
 * negative TP_E* code with "<path>: cannot open: ..." or "<path>: not a
 * regular file (a FIFO)" in err. st receives fstat's result if not NULL. */
struct stat;
int tp_open_regular(const char *path, struct stat *st, tp_err *err);
/* Read a whole small file into a NUL-terminated buffer (caller frees). limit
 * bounds the size accepted. */
int tp_read_file(const char *path, size_t limit, char **out, size_t *len, tp_err *err);
/* mkdir -p. */
int tp_mkdir_p(const char *path, tp_err *err);
/* A directory a command may create or fill: path does not exist, or is an
 * empty directory. Otherwise an error naming it (never overwrite a user's
 * files). */
int tp_check_new_dir(const char *path, tp_err *err);
/* 1 if path exists (any type). */
int tp_exists(const char *path);
/* Size of a regular file in bytes, or -1. */
long long tp_file_size(const char *path);

/* Map a whole regular file read-only (PROT_READ, MAP_SHARED) and close the
 * descriptor (the mapping keeps the file alive). On success *map and *size
 * describe the file; a zero-size file is not mapped: *map = NULL, *size = 0.
 * On failure *map = NULL, *size = 0 and err names the file, one of
 * "<path>: cannot open: <strerror>", "<path>: cannot stat: <strerror>",
 * "<path>: not a regular file" or "<path>: cannot mmap <n> bytes: <strerror>"
 * (all TP_EIO). Release with tp_unmap. */
int tp_map_readonly(const char *path, const void **map, size_t *size, tp_err *err);
/* Undo tp_map_readonly; a NULL map (zero-size file) is a no-op. */
void tp_unmap(const void *map, size_t size);

#endif
