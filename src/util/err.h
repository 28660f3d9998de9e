/* err.h - status codes and the error message every fallible call fills.
 *
 * Convention (SQLite style): a function that can fail returns TP_OK (0) or a
 * negative TP_E* code and, on failure, writes a one-line human message into
 * the caller's tp_err. The message names the file and the field/tensor and
 * says what was expected. The CLI prints it and exits non-zero. */
#ifndef TPTT_UTIL_ERR_H
#define TPTT_UTIL_ERR_H

#include <stddef.h>

enum {
    TP_OK = 0,
    TP_EIO = -1,      /* open/read/write/mmap/fsync failed */
    TP_EFORMAT = -2,  /* file contents violate a format contract */
    TP_EINVAL = -3,   /* bad argument or configuration value */
    TP_EUNSUP = -4,   /* valid but unsupported (architecture, dtype, ...) */
    TP_ENOMEM = -5,   /* allocation failed */
};

#define TP_ERR_LEN 1024

typedef struct tp_err {
    int code;
    int sys_errno; /* errno of the failed system call (tp_fail_sys), else 0: lets a caller tell a full disk
                      (ENOSPC, EDQUOT, EFBIG) from other failures without reading the message */
    char msg[TP_ERR_LEN];
} tp_err;

/* Fill err (if non-NULL) with a printf-style message and return code
 * (sys_errno becomes 0). */
int tp_fail(tp_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same for a failed system call: the message gets ": strerror(e)"
 * appended and sys_errno = e. */
int tp_fail_sys(tp_err *err, int code, int e, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* 1 if err records a full disk or file-size limit (ENOSPC, EDQUOT, EFBIG) */
int tp_err_is_disk_full(const tp_err *err);

/* Prefix an existing message: "<prefix>: <old message>" (code and sys_errno
 * kept). Returns err->code. */
int tp_err_prefix(tp_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Allocation helpers that report TP_ENOMEM through err. */
void *tp_malloc(size_t n, tp_err *err);
void *tp_calloc(size_t count, size_t size, tp_err *err);
char *tp_strdup(const char *s, tp_err *err);

#endif
