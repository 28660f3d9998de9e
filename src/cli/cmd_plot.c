/* cmd_plot.c - `tptt plot metrics.jsonl -o loss.png`: loss, validation loss
 * (records with "val_loss", when the run evaluated) and learning rate
 * against the step, drawn by gnuplot (Debian package gnuplot-nox).
 *
 * No user string ever becomes gnuplot code (util/gnuplot.h): the script
 * holds only fixed text, numbers we formatted, and a title reduced to a safe
 * character set; the data go inline as a datablock. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "util/fsutil.h"
#include "util/gnuplot.h"


/* Title text: the file name with every character outside a safe set
 * replaced by '?', so it cannot end the quoted gnuplot string. */
static void safe_title(char *dst, size_t n, const char *src) {
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)src; *p && k + 1 < n; p++) {
        int ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                 strchr("._-/+:, =", *p);
        dst[k++] = ok ? (char)*p : '?';
    }
    dst[k] = 0;
}

int tp_cmd_plot(int argc, char **argv) {
    const char *in = NULL, *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-o") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: tptt plot METRICS.jsonl -o OUT.png\n");
            return 0;
        } else if (!in && argv[i][0] != '-') in = argv[i];
        else {
            fprintf(stderr, "tptt: plot: unexpected argument '%s'\nusage: tptt plot METRICS.jsonl -o OUT.png\n", argv[i]);
            return 2;
        }
    }
    if (!in || !out) {
        fprintf(stderr, "usage: tptt plot METRICS.jsonl -o OUT.png\n");
        return 2;
    }
    tp_err err = {0};
    char *text;
    size_t len;
    if (tp_read_file(in, 1u << 30, &text, &len, &err)) return tp_cli_error(err.msg);
    char title[256];
    safe_title(title, sizeof title, in);
    tp_strbuf s;
    tp_strbuf_init(&s);
    tp_strbuf_printf(&s,
                     "set terminal png size 1000,600 noenhanced\nset output\nset title 'tptt: %s'\n"
                     "set xlabel 'step'\nset ylabel 'loss'\nset y2label 'learning rate'\nset ytics nomirror\n"
                     "set y2tics\nset grid\nset key top right\n$tptt << EOD\n",
                     title);
    int lineno = 0, points = 0, skipped = 0, vpoints = 0;
    tp_strbuf v; /* validation points: "step val_loss" */
    tp_strbuf_init(&v);
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
            fprintf(stderr, "tptt: note: %s:%d: truncated last line skipped\n", in, lineno);
            break;
        }
        const cJSON *vl = cJSON_GetObjectItemCaseSensitive(j, "val_loss");
        if (cJSON_IsObject(j) && cJSON_IsNumber(st) && cJSON_IsNumber(vl)) {
            tp_strbuf_printf(&v, "%.17g %.9g\n", st->valuedouble, vl->valuedouble);
            vpoints++;
            if (!lo) { /* a validation record of its own */
                cJSON_Delete(j);
                continue;
            }
        }
        if (cJSON_IsObject(j) && cJSON_IsNumber(st) && cJSON_IsNull(lo) && cJSON_IsNumber(lr)) {
            skipped++; /* a skipped step: no loss to draw */
            cJSON_Delete(j);
            continue;
        }
        if (!cJSON_IsObject(j) || !cJSON_IsNumber(st) || !cJSON_IsNumber(lo) || !cJSON_IsNumber(lr)) {
            fprintf(stderr, "tptt: %s:%d: expected a JSON object with numeric step, loss and lr\n", in, lineno);
            cJSON_Delete(j);
            tp_strbuf_free(&s);
            tp_strbuf_free(&v);
            free(text);
            return 1;
        }
        tp_strbuf_printf(&s, "%.17g %.9g %.9g\n", st->valuedouble, lo->valuedouble, lr->valuedouble);
        points++;
        cJSON_Delete(j);
    }
    free(text);
    tp_strbuf_puts(&s, "EOD\n");
    if (vpoints) {
        tp_strbuf_puts(&s, "$val << EOD\n");
        if (v.len) tp_strbuf_puts(&s, v.buf);
        tp_strbuf_puts(&s, "EOD\n");
    }
    int voom = v.oom;
    tp_strbuf_free(&v);
    tp_strbuf_puts(&s, "plot $tptt using 1:2 with lines lw 2 title 'loss' axes x1y1, ");
    if (vpoints) tp_strbuf_puts(&s, "$val using 1:2 with linespoints lw 2 pt 7 title 'val_loss' axes x1y1, ");
    tp_strbuf_puts(&s, "$tptt using 1:3 with lines dt 2 title 'lr' axes x1y2\n");
    if (s.oom || voom) {
        tp_strbuf_free(&s);
        return tp_cli_error("plot: out of memory");
    }
    if (!points) {
        tp_strbuf_free(&s);
        fprintf(stderr, "tptt: %s: no metrics records with a loss\n", in);
        return 1;
    }
    int rc = tp_gnuplot_png(s.buf, s.len, out, &err);
    tp_strbuf_free(&s);
    if (rc) {
        fprintf(stderr, "tptt: plot: %s\n", err.msg);
        return 1;
    }
    printf("wrote %s (%d points%s", out, points, skipped ? ", skipped steps left out" : "");
    if (vpoints) printf(", %d validation points", vpoints);
    printf(")\n");
    return 0;
}
