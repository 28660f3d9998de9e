/* cmd_plot.c - `tptt plot METRICS.jsonl [METRICS.jsonl ...] -o loss.png
 * [--label NAME]...`: loss, validation loss (records with "val_loss", when
 * the run evaluated) and learning rate against the step, drawn by gnuplot
 * (Debian package gnuplot-nox). Several files: one colour per run, curves
 * named by --label (default: the run directory's name), one lr curve when
 * every run has the same schedule.
 *
 * No user string ever becomes gnuplot code (util/gnuplot.h): the script
 * holds only fixed text, numbers we formatted, and titles/labels reduced to a
 * safe character set; the data go inline as datablocks with fixed names. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "util/fsutil.h"
#include "util/gnuplot.h"

#define PLOT_MAX_RUNS 16
#define PLOT_USAGE "usage: tptt plot METRICS.jsonl [METRICS.jsonl ...] -o OUT.png [--label NAME]...\n"

/* Title/label text with every character outside a safe set replaced by
 * '?', so it cannot end the quoted gnuplot string. */
static void safe_title(char *dst, size_t n, const char *src) {
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)src; *p && k + 1 < n; p++) {
        int ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                 strchr("._-/+:, =", *p);
        dst[k++] = ok ? (char)*p : '?';
    }
    dst[k] = 0;
}

/* The default label of a metrics file: the name of its directory (the run
 * directory), or the file name when it has none. */
static void default_label(char *dst, size_t n, const char *path) {
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/') len--;
    const char *slash = NULL;
    for (size_t i = 0; i < len; i++)
        if (path[i] == '/') slash = path + i;
    if (!slash) { /* "metrics.jsonl": no directory in the path */
        snprintf(dst, n, "%.*s", (int)len, path);
        return;
    }
    size_t end = (size_t)(slash - path);
    while (end > 0 && path[end - 1] == '/') end--;
    size_t start = end;
    while (start > 0 && path[start - 1] != '/') start--;
    if (end == start || (end - start == 1 && path[start] == '.')) /* "/metrics.jsonl", "./metrics.jsonl" */
        snprintf(dst, n, "%s", slash + 1);
    else snprintf(dst, n, "%.*s", (int)(end - start), path + start);
}

typedef struct run_data {
    const char *path;
    char label[128];
    tp_strbuf data; /* "step loss lr" */
    tp_strbuf val;  /* "step val_loss" */
    tp_strbuf lr;   /* "step lr": to compare schedules */
    int points, vpoints, skipped;
} run_data;

/* Read one metrics file into r. 0, or 1 after a message on stderr. */
static int read_metrics(run_data *r) {
    tp_err err = {0};
    char *text;
    size_t len;
    if (tp_read_file(r->path, 1u << 30, &text, &len, &err)) {
        fprintf(stderr, "tptt: %s\n", err.msg);
        return 1;
    }
    int lineno = 0;
    for (char *line = text, *next; line && *line; line = next) {
        char *nl = strchr(line, '\n');
        int last = !nl;
        if (nl) *nl = 0;
        next = nl ? nl + 1 : NULL;
        lineno++;
        if (!line[strspn(line, " \t\r")]) continue;
        cJSON *j = cJSON_Parse(line);
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "step"), *lo = cJSON_GetObjectItemCaseSensitive(j, "loss"),
                    *lr = cJSON_GetObjectItemCaseSensitive(j, "lr");
        if (!j && last) {
            /* an append cut short (full disk, killed writer): not an error */
            fprintf(stderr, "tptt: note: %s:%d: truncated last line skipped\n", r->path, lineno);
            break;
        }
        const cJSON *vl = cJSON_GetObjectItemCaseSensitive(j, "val_loss");
        if (cJSON_IsObject(j) && cJSON_IsNumber(st) && cJSON_IsNumber(vl)) {
            tp_strbuf_printf(&r->val, "%.17g %.9g\n", st->valuedouble, vl->valuedouble);
            r->vpoints++;
            if (!lo) { /* a validation record of its own */
                cJSON_Delete(j);
                continue;
            }
        }
        if (cJSON_IsObject(j) && cJSON_IsNumber(st) && cJSON_IsNull(lo) && cJSON_IsNumber(lr)) {
            r->skipped++; /* a skipped step: no loss to draw */
            cJSON_Delete(j);
            continue;
        }
        if (!cJSON_IsObject(j) || !cJSON_IsNumber(st) || !cJSON_IsNumber(lo) || !cJSON_IsNumber(lr)) {
            fprintf(stderr, "tptt: %s:%d: expected a JSON object with numeric step, loss and lr\n", r->path, lineno);
            cJSON_Delete(j);
            free(text);
            return 1;
        }
        tp_strbuf_printf(&r->data, "%.17g %.9g %.9g\n", st->valuedouble, lo->valuedouble, lr->valuedouble);
        tp_strbuf_printf(&r->lr, "%.17g %.9g\n", st->valuedouble, lr->valuedouble);
        r->points++;
        cJSON_Delete(j);
    }
    free(text);
    if (!r->points) {
        fprintf(stderr, "tptt: %s: no metrics records with a loss\n", r->path);
        return 1;
    }
    return 0;
}

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "tptt: plot: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n" PLOT_USAGE);
    return 2;
}

int tp_cmd_plot(int argc, char **argv) {
    const char *in[PLOT_MAX_RUNS], *labels[PLOT_MAX_RUNS], *out = NULL;
    int nin = 0, nlabels = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf(PLOT_USAGE
                   "Draws loss (solid), validation loss (points, when the run evaluated) and learning rate\n"
                   "(dashed, right axis) against the step, with gnuplot, into a PNG.\n"
                   "  METRICS.jsonl  a run's metrics.jsonl; up to %d of them, one colour per run\n"
                   "  -o OUT.png     the image (written beside OUT and renamed into place)\n"
                   "  --label NAME   repeatable: the i-th names the curves of the i-th file\n"
                   "                 (default: the run directory's name; characters outside\n"
                   "                 [A-Za-z0-9._-/+:, =] are shown as '?')\n"
                   "Several runs with the same learning-rate schedule share one lr curve.\n",
                   PLOT_MAX_RUNS);
            return 0;
        } else if (!strcmp(argv[i], "-o")) {
            if (i + 1 >= argc) return usage_error("%s needs a value", argv[i]);
            if (out) return usage_error("%s given twice", argv[i]);
            out = argv[++i];
        } else if (!strcmp(argv[i], "--label")) {
            if (i + 1 >= argc) return usage_error("%s needs a value", argv[i]);
            if (nlabels == PLOT_MAX_RUNS) return usage_error("more than 16 labels (at '%s')", argv[i + 1]);
            labels[nlabels++] = argv[++i];
        } else if (argv[i][0] != '-') {
            if (nin == PLOT_MAX_RUNS) return usage_error("more than 16 metrics files (at '%s')", argv[i]);
            in[nin++] = argv[i];
        } else {
            return usage_error("unexpected argument '%s'", argv[i]);
        }
    }
    if (!nin || !out) {
        fprintf(stderr, PLOT_USAGE);
        return 2;
    }
    if (nlabels > nin) {
        fprintf(stderr, "tptt: plot: %d --label for %d metrics file%s\n" PLOT_USAGE, nlabels, nin, nin == 1 ? "" : "s");
        return 2;
    }
    run_data runs[PLOT_MAX_RUNS];
    memset(runs, 0, sizeof runs);
    int rc = 0;
    for (int i = 0; i < nin; i++) {
        run_data *r = &runs[i];
        r->path = in[i];
        tp_strbuf_init(&r->data);
        tp_strbuf_init(&r->val);
        tp_strbuf_init(&r->lr);
        char raw[256];
        if (i < nlabels) snprintf(raw, sizeof raw, "%s", labels[i]);
        else default_label(raw, sizeof raw, in[i]);
        safe_title(r->label, sizeof r->label, raw);
        if (!rc) rc = read_metrics(r);
    }
    /* one lr curve (the longest run's) when every run's (step, lr) series is
     * the start of it: the same schedule, some runs maybe stopped earlier */
    int same_lr = 1, longest = 0;
    for (int i = 1; i < nin && !rc; i++)
        if (runs[i].lr.len > runs[longest].lr.len) longest = i;
    for (int i = 0; i < nin && !rc; i++)
        if (strncmp(runs[i].lr.buf, runs[longest].lr.buf, runs[i].lr.len)) same_lr = 0;
    tp_strbuf s;
    tp_strbuf_init(&s);
    if (!rc) {
        char title[256];
        if (nin == 1) safe_title(title, sizeof title, in[0]);
        else {
            size_t k = 0;
            title[0] = 0;
            for (int i = 0; i < nin && k + 1 < sizeof title; i++)
                k += (size_t)snprintf(title + k, sizeof title - k, "%s%s", i ? " vs " : "", runs[i].label);
        }
        tp_strbuf_printf(&s,
                         "set terminal png size 1000,600 noenhanced\nset output\nset title 'tptt: %s'\n"
                         "set xlabel 'step'\nset ylabel 'loss'\nset y2label 'learning rate'\nset ytics nomirror\n"
                         "set y2tics\nset grid\nset key top right\n",
                         title);
        for (int i = 0; i < nin; i++) {
            tp_strbuf_printf(&s, "$r%d << EOD\n", i);
            tp_strbuf_puts(&s, runs[i].data.buf);
            tp_strbuf_puts(&s, "EOD\n");
            if (runs[i].vpoints) {
                tp_strbuf_printf(&s, "$v%d << EOD\n", i);
                tp_strbuf_puts(&s, runs[i].val.buf);
                tp_strbuf_puts(&s, "EOD\n");
            }
        }
        tp_strbuf_puts(&s, "plot ");
        for (int i = 0; i < nin; i++) {
            /* one run: the curves are "loss", "val_loss", "lr" as before */
            const char *lb = nin == 1 ? "" : runs[i].label, *sp = nin == 1 ? "" : " ";
            /* colours: one run loss 1, val_loss 2, lr 3; several: run i's curves in colour i+1, a shared lr black */
            tp_strbuf_printf(&s, "$r%d using 1:2 with lines lw 2 lc %d title '%s%sloss' axes x1y1, ", i, i + 1, lb, sp);
            if (runs[i].vpoints)
                tp_strbuf_printf(&s, "$v%d using 1:2 with linespoints lw 2 pt 7 lc %d title '%s%sval_loss' axes x1y1, ",
                                 i, nin == 1 ? 2 : i + 1, lb, sp);
        }
        if (same_lr)
            tp_strbuf_printf(&s, "$r%d using 1:3 with lines dt 2 lc %d title 'lr' axes x1y2\n", longest, nin == 1 ? 3 : 8);
        else
            for (int i = 0; i < nin; i++)
                tp_strbuf_printf(&s, "$r%d using 1:3 with lines dt 2 lc %d title '%s lr' axes x1y2%s", i, i + 1,
                                 runs[i].label, i + 1 < nin ? ", " : "\n");
    }
    for (int i = 0; i < nin; i++)
        if (runs[i].data.oom || runs[i].val.oom || runs[i].lr.oom) s.oom = 1;
    if (!rc && s.oom) {
        fprintf(stderr, "tptt: plot: out of memory\n");
        rc = 1;
    }
    tp_err err = {0};
    if (!rc && tp_gnuplot_png(s.buf, s.len, out, &err)) {
        fprintf(stderr, "tptt: plot: %s\n", err.msg);
        rc = 1;
    }
    if (!rc) {
        printf("wrote %s (", out);
        for (int i = 0; i < nin; i++) {
            if (nin > 1) printf("%s%s: ", i ? "; " : "", runs[i].label);
            printf("%d points%s", runs[i].points, runs[i].skipped ? ", skipped steps left out" : "");
            if (runs[i].vpoints) printf(", %d validation points", runs[i].vpoints);
        }
        printf(")\n");
    }
    tp_strbuf_free(&s);
    for (int i = 0; i < nin; i++) {
        tp_strbuf_free(&runs[i].data);
        tp_strbuf_free(&runs[i].val);
        tp_strbuf_free(&runs[i].lr);
    }
    return rc;
}
