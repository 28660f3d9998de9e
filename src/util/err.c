#include "util/err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A message is one line whatever it quotes from a file or the command line:
 * control characters (a newline inside a quoted field name, ...) become '?'. */
static void one_line(char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) *s = '?';
}

int tp_fail(tp_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        one_line(err->msg);
        err->code = code;
        err->sys_errno = 0;
    }
    return code;
}

int tp_fail_sys(tp_err *err, int code, int e, const char *fmt, ...) {
    if (err) {
        char head[TP_ERR_LEN];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(head, sizeof head, fmt, ap);
        va_end(ap);
        tp_fail(err, code, "%s: %s", head, strerror(e));
        err->sys_errno = e;
    }
    return code;
}

int tp_err_is_disk_full(const tp_err *err) {
    return err && (err->sys_errno == ENOSPC || err->sys_errno == EDQUOT || err->sys_errno == EFBIG);
}

int tp_err_prefix(tp_err *err, const char *fmt, ...) {
    if (!err) return TP_EINVAL;
    char old[TP_ERR_LEN];
    memcpy(old, err->msg, sizeof old);
    char pre[TP_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    size_t lp = strnlen(pre, sizeof pre), n = 0;
    char out[TP_ERR_LEN];
    /* assemble by hand: truncation of a long message is fine and expected */
    for (size_t i = 0; i < lp && n + 1 < sizeof out; i++) out[n++] = pre[i];
    for (const char *s = ": "; *s && n + 1 < sizeof out; s++) out[n++] = *s;
    for (size_t i = 0; old[i] && n + 1 < sizeof out; i++) out[n++] = old[i];
    out[n] = 0;
    one_line(out);
    memcpy(err->msg, out, n + 1);
    return err->code;
}

void *tp_malloc(size_t n, tp_err *err) {
    void *p = malloc(n ? n : 1);
    if (!p) tp_fail(err, TP_ENOMEM, "out of memory allocating %zu bytes", n);
    return p;
}

void *tp_calloc(size_t count, size_t size, tp_err *err) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) tp_fail(err, TP_ENOMEM, "out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

char *tp_strdup(const char *s, tp_err *err) {
    size_t n = strlen(s) + 1;
    char *p = tp_malloc(n, err);
    if (p) memcpy(p, s, n);
    return p;
}
