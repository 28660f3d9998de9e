/* gnuplot.c - see gnuplot.h. */
#include "util/gnuplot.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "util/fsutil.h"

extern char **environ;

/* gnuplot with script on its stdin, stdout into out_fd, stderr into err_fd:
 * its exit status, -1 when it could not start or was killed */
static int run_gnuplot(const char *script, size_t len, int out_fd, int err_fd) {
    int in[2];
    if (pipe(in) != 0) return -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
    posix_spawn_file_actions_adddup2(&fa, err_fd, 2);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    char *argv[] = {"gnuplot", NULL};
    pid_t pid;
    int rc = posix_spawnp(&pid, "gnuplot", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(in[0]);
    if (rc != 0) {
        close(in[1]);
        return -1;
    }
    void (*old)(int) = signal(SIGPIPE, SIG_IGN);
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(in[1], script + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (size_t)w;
    }
    close(in[1]);
    signal(SIGPIPE, old);
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* the first non-blank line of f (gnuplot's complaint) */
static void first_line(FILE *f, char *buf, size_t n) {
    buf[0] = 0;
    rewind(f);
    while (fgets(buf, (int)n, f)) {
        buf[strcspn(buf, "\r\n")] = 0;
        char *s = buf;
        while (*s == ' ' || *s == '\t' || *s == '^') s++;
        if (*s) {
            memmove(buf, s, strlen(s) + 1);
            return;
        }
    }
    buf[0] = 0;
}

int tp_gnuplot_png(const char *script, size_t len, const char *out, tp_err *err) {
    char *tmp = tp_tmp_name(out, err);
    if (!tmp) return TP_ENOMEM;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    FILE *ef = tmpfile();
    if (fd < 0 || !ef) {
        int rc = tp_fail(err, TP_EIO, "%s: cannot create: %s", tmp, strerror(errno));
        if (fd >= 0) {
            close(fd);
            unlink(tmp);
        }
        if (ef) fclose(ef);
        free(tmp);
        return rc;
    }
    int st = run_gnuplot(script, len, fd, fileno(ef));
    int closed = close(fd);
    char msg[512];
    first_line(ef, msg, sizeof msg);
    fclose(ef);
    int rc = TP_OK;
    if (st != 0 || closed != 0 || tp_file_size(tmp) <= 0) {
        unlink(tmp);
        rc = st < 0 ? tp_fail(err, TP_EIO, "cannot run gnuplot (apt-get install gnuplot-nox)")
                    : tp_fail(err, TP_EIO, "gnuplot failed writing %s%s%s", out, msg[0] ? ": " : "", msg);
    } else if (rename(tmp, out) != 0) {
        rc = tp_fail(err, TP_EIO, "%s: cannot rename %s into place: %s", out, tmp, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return rc;
}
