#include "util/fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

void tp_strbuf_init(tp_strbuf *s) { memset(s, 0, sizeof *s); }

void tp_strbuf_free(tp_strbuf *s) {
    free(s->buf);
    memset(s, 0, sizeof *s);
}

static int reserve(tp_strbuf *s, size_t extra) {
    if (s->oom) return 0;
    if (s->len + extra + 1 <= s->cap) return 1;
    size_t cap = s->cap ? s->cap : 256;
    while (cap < s->len + extra + 1) cap *= 2;
    char *p = realloc(s->buf, cap);
    if (!p) { s->oom = 1; return 0; }
    s->buf = p;
    s->cap = cap;
    return 1;
}

void tp_strbuf_putn(tp_strbuf *s, const char *str, size_t n) {
    if (!reserve(s, n)) return;
    memcpy(s->buf + s->len, str, n);
    s->len += n;
    s->buf[s->len] = 0;
}

void tp_strbuf_puts(tp_strbuf *s, const char *str) { tp_strbuf_putn(s, str, strlen(str)); }

void tp_strbuf_printf(tp_strbuf *s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !reserve(s, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(s->buf + s->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    s->len += (size_t)n;
}

void tp_strbuf_json_string(tp_strbuf *s, const char *str) { tp_strbuf_json_stringn(s, str, strlen(str)); }

void tp_strbuf_json_stringn(tp_strbuf *s, const char *str, size_t n) {
    tp_strbuf_puts(s, "\"");
    const unsigned char *p = (const unsigned char *)str, *end = p + n, *run = p;
    for (; p < end; p++) {
        if (*p >= 0x20 && *p != '"' && *p != '\\') continue;
        tp_strbuf_putn(s, (const char *)run, (size_t)(p - run));
        run = p + 1;
        switch (*p) {
        case '"': tp_strbuf_puts(s, "\\\""); break;
        case '\\': tp_strbuf_puts(s, "\\\\"); break;
        case '\n': tp_strbuf_puts(s, "\\n"); break;
        case '\t': tp_strbuf_puts(s, "\\t"); break;
        case '\r': tp_strbuf_puts(s, "\\r"); break;
        default: tp_strbuf_printf(s, "\\u%04x", *p);
        }
    }
    tp_strbuf_putn(s, (const char *)run, (size_t)(p - run));
    tp_strbuf_puts(s, "\"");
}

char *tp_tmp_name(const char *path, tp_err *err) {
    size_t n = strlen(path) + 32;
    char *t = tp_malloc(n, err);
    if (t) snprintf(t, n, "%s.tmp.%ld", path, (long)getpid());
    return t;
}

char *tp_path_join(const char *dir, const char *name, tp_err *err) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = tp_malloc(n, err);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

char *tp_dirname(const char *path, tp_err *err) {
    const char *slash = strrchr(path, '/');
    if (!slash) return tp_strdup(".", err);
    if (slash == path) return tp_strdup("/", err);
    size_t n = (size_t)(slash - path);
    char *d = tp_malloc(n + 1, err);
    if (d) { memcpy(d, path, n); d[n] = 0; }
    return d;
}

int tp_fclose_synced(FILE *fp, const char *path, tp_err *err) {
    int rc = TP_OK;
    if (fflush(fp) != 0) rc = tp_fail_sys(err, TP_EIO, errno, "%s: write failed", path);
    else if (fsync(fileno(fp)) != 0) rc = tp_fail_sys(err, TP_EIO, errno, "%s: fsync failed", path);
    if (fclose(fp) != 0 && rc == TP_OK) rc = tp_fail_sys(err, TP_EIO, errno, "%s: close failed", path);
    return rc;
}

int tp_fsync_dir(const char *dir, tp_err *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return tp_fail_sys(err, TP_EIO, errno, "%s: cannot open directory", dir);
    int rc = TP_OK;
    if (fsync(fd) != 0 && errno != EINVAL) rc = tp_fail_sys(err, TP_EIO, errno, "%s: fsync failed", dir);
    close(fd);
    return rc;
}

int tp_rename_synced(const char *from, const char *to, tp_err *err) {
    if (rename(from, to) != 0)
        return tp_fail_sys(err, TP_EIO, errno, "cannot rename %s to %s", from, to);
    char *dir = tp_dirname(to, err);
    if (!dir) return TP_ENOMEM;
    int rc = tp_fsync_dir(dir, err);
    free(dir);
    return rc;
}

int tp_write_file_atomic(const char *path, const void *data, size_t n, tp_err *err) {
    char *tmp = tp_tmp_name(path, err);
    if (!tmp) return TP_ENOMEM;
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        int rc = tp_fail_sys(err, TP_EIO, errno, "%s: cannot create", tmp);
        free(tmp);
        return rc;
    }
    int rc = TP_OK;
    if (n && fwrite(data, 1, n, fp) != n) rc = tp_fail_sys(err, TP_EIO, errno, "%s: write failed", tmp);
    if (rc == TP_OK) rc = tp_fclose_synced(fp, tmp, err);
    else fclose(fp);
    if (rc == TP_OK) rc = tp_rename_synced(tmp, path, err);
    if (rc != TP_OK) unlink(tmp);
    free(tmp);
    return rc;
}

int tp_open_regular(const char *path, struct stat *st, tp_err *err) {
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
     * writer forever; it is cleared again for the regular file */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return tp_fail_sys(err, TP_EIO, errno, "%s: cannot open", path);
    struct stat s;
    if (fstat(fd, &s) != 0) {
        int e = errno;
        close(fd);
        return tp_fail_sys(err, TP_EIO, e, "%s: cannot stat", path);
    }
    if (!S_ISREG(s.st_mode)) {
        close(fd);
        return tp_fail(err, TP_EIO, "%s: not a regular file (%s)", path,
                       S_ISDIR(s.st_mode) ? "a directory" : S_ISFIFO(s.st_mode) ? "a FIFO" :
                       S_ISSOCK(s.st_mode) ? "a socket" : S_ISCHR(s.st_mode) || S_ISBLK(s.st_mode) ? "a device" : "special file");
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl != -1) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    if (st) *st = s;
    return fd;
}

int tp_read_file(const char *path, size_t limit, char **out, size_t *len, tp_err *err) {
    *out = NULL;
    struct stat st;
    int fd = tp_open_regular(path, &st, err);
    if (fd < 0) return fd;
    FILE *fp = fdopen(fd, "rb");
    if (!fp) {
        close(fd);
        return tp_fail_sys(err, TP_ENOMEM, errno, "%s: cannot open", path);
    }
    if ((unsigned long long)st.st_size > limit) {
        fclose(fp);
        return tp_fail(err, TP_EFORMAT, "%s: file is %lld bytes, larger than the %zu accepted", path,
                       (long long)st.st_size, limit);
    }
    size_t n = (size_t)st.st_size;
    char *buf = tp_malloc(n + 1, err);
    if (!buf) { fclose(fp); return TP_ENOMEM; }
    size_t got = fread(buf, 1, n, fp);
    int bad = ferror(fp);
    fclose(fp);
    if (bad || got != n) {
        free(buf);
        return tp_fail(err, TP_EIO, "%s: read failed", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return TP_OK;
}

int tp_mkdir_p(const char *path, tp_err *err) {
    char *p = tp_strdup(path, err);
    if (!p) return TP_ENOMEM;
    for (char *s = p + 1;; s++) {
        if (*s == '/' || *s == 0) {
            char c = *s;
            *s = 0;
            if (mkdir(p, 0777) != 0 && errno != EEXIST) {
                int rc = tp_fail_sys(err, TP_EIO, errno, "%s: cannot create directory", p);
                free(p);
                return rc;
            }
            *s = c;
            if (!c) break;
        }
    }
    struct stat st;
    int ok = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    free(p);
    return ok ? TP_OK : tp_fail(err, TP_EIO, "%s: exists and is not a directory", path);
}

int tp_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

long long tp_file_size(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
    return (long long)st.st_size;
}

int tp_map_readonly(const char *path, const void **map, size_t *size, tp_err *err) {
    *map = NULL;
    *size = 0;
    struct stat st;
    int fd = tp_open_regular(path, &st, err);
    if (fd < 0) return fd;
    size_t n = (size_t)st.st_size;
    void *m = NULL;
    if (n > 0) {
        m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            return tp_fail_sys(err, TP_EIO, e, "%s: cannot mmap %zu bytes", path, n);
        }
    }
    close(fd); /* the mapping keeps the file alive */
    *map = m;
    *size = n;
    return TP_OK;
}

void tp_unmap(const void *map, size_t size) {
    if (map) munmap((void *)map, size);
}

int tp_check_new_dir(const char *path, tp_err *err) {
    struct stat st;
    if (stat(path, &st) != 0) {
        if (errno == ENOENT) return TP_OK;
        return tp_fail_sys(err, TP_EIO, errno, "%s", path);
    }
    if (!S_ISDIR(st.st_mode)) return tp_fail(err, TP_EIO, "%s: exists and is not a directory", path);
    DIR *d = opendir(path);
    if (!d) return tp_fail_sys(err, TP_EIO, errno, "%s", path);
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
    closedir(d);
    if (!empty) return tp_fail(err, TP_EIO, "%s: exists and is not empty; write into a new directory", path);
    return TP_OK;
}
