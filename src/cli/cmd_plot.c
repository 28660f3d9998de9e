/* cmd_plot.c - `tptt plot metrics.jsonl -o loss.png`: loss and learning rate
 * against the step, drawn by gnuplot (Debian package gnuplot-nox). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "util/fsutil.h"

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
    char data[] = "/tmp/tptt-plot-XXXXXX";
    int fd = mkstemp(data);
    FILE *df = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!df) {
        free(text);
        return tp_cli_error("plot: cannot create a temporary data file");
    }
    int lineno = 0, points = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        lineno++;
        cJSON *j = cJSON_Parse(line);
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "step"), *lo = cJSON_GetObjectItemCaseSensitive(j, "loss"),
                    *lr = cJSON_GetObjectItemCaseSensitive(j, "lr");
        if (!cJSON_IsNumber(st) || !cJSON_IsNumber(lo) || !cJSON_IsNumber(lr)) {
            fprintf(stderr, "tptt: %s:%d: expected a JSON object with numeric step, loss and lr\n", in, lineno);
            cJSON_Delete(j);
            fclose(df);
            unlink(data);
            free(text);
            return 1;
        }
        fprintf(df, "%.17g %.9g %.9g\n", st->valuedouble, lo->valuedouble, lr->valuedouble);
        points++;
        cJSON_Delete(j);
    }
    fclose(df);
    free(text);
    if (!points) {
        unlink(data);
        fprintf(stderr, "tptt: %s: no metrics records\n", in);
        return 1;
    }
    FILE *gp = popen("gnuplot 2>&1", "w");
    if (!gp) {
        unlink(data);
        return tp_cli_error("plot: cannot run gnuplot (apt-get install gnuplot-nox)");
    }
    fprintf(gp,
            "set terminal png size 1000,600\nset output '%s'\nset title 'tptt: %s'\nset xlabel 'step'\n"
            "set ylabel 'loss'\nset y2label 'learning rate'\nset ytics nomirror\nset y2tics\nset grid\n"
            "set key top right\n"
            "plot '%s' using 1:2 with lines lw 2 title 'loss' axes x1y1, '' using 1:3 with lines dt 2 title 'lr' axes x1y2\n",
            out, in, data);
    int st = pclose(gp);
    unlink(data);
    if (st != 0 || tp_file_size(out) <= 0) {
        fprintf(stderr, "tptt: plot: gnuplot failed (is gnuplot installed? apt-get install gnuplot-nox)\n");
        return 1;
    }
    printf("wrote %s (%d points)\n", out, points);
    return 0;
}
