/* optim_tool.c - test helper exposing src/train/optim to
 * tests/test_optim_torch.py, which replays the same run with PyTorch.
 *
 *   optim_tool run SPEC.json|-     a training loop over given gradients
 *   optim_tool lr KIND PEAK MIN WARMUP TOTAL STEP...
 *                                  tp_lr_at at each STEP, "%.17g" per line
 *
 * SPEC (JSON):
 *   {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8,        (defaults: torch's)
 *    "max_norm": 1.0,                                  (<= 0 or absent: no clipping)
 *    "schedule": {"kind": "cosine", "peak_lr": 1e-3, "min_lr": 0,
 *                 "warmup_steps": 2, "total_steps": 20},
 *    "weight_decay": [0.01, 0.0],                      (one per parameter group)
 *    "params": [{"group": 0, "init": [..]}, ...],      (float32 values)
 *    "grads": [[[..param 0..], [..param 1..], ...],    (one entry per step)
 *              ...]}
 * Step s (0-based) does what the trainer does: lr = tp_lr_at(s);
 * total_norm = sqrt(Σ_params tp_sum_squares(g)); coef = tp_clip_coef; g *= coef
 * (when clipping); tp_adamw_update(step s+1, its group's weight decay) per
 * parameter. Output per step:
 *   step S lr %.17g norm %.17g coef %.9g
 *   param I v0 v1 ...        (%.9g, round-trips float32; one line per param)
 *
 * Errors: "optim_tool: <message>" on stderr, exit 1. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/optim.h"
#include "util/fsutil.h"

static int die(const char *msg) {
    fprintf(stderr, "optim_tool: %s\n", msg);
    return 1;
}

static double num(const cJSON *o, const char *key, double dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

/* JSON array of numbers → newly allocated floats (caller frees); -1 and
 * *out NULL if not such an array */
static long floats(const cJSON *a, float **out) {
    *out = NULL;
    if (!cJSON_IsArray(a)) return -1;
    long n = cJSON_GetArraySize(a), i = 0;
    *out = malloc((size_t)(n ? n : 1) * sizeof **out);
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        if (!cJSON_IsNumber(e)) {
            free(*out);
            *out = NULL;
            return -1;
        }
        (*out)[i++] = (float)e->valuedouble;
    }
    return n;
}

/* non-empty JSON array of numbers → newly allocated doubles; -1 otherwise */
static long doubles(const cJSON *a, double **out) {
    *out = NULL;
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) < 1) return -1;
    long n = cJSON_GetArraySize(a), i = 0;
    *out = malloc((size_t)n * sizeof **out);
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        if (!cJSON_IsNumber(e)) {
            free(*out);
            *out = NULL;
            return -1;
        }
        (*out)[i++] = e->valuedouble;
    }
    return n;
}

static char *read_all(const char *path) {
    if (strcmp(path, "-")) {
        char *text;
        size_t len;
        tp_err err = {0};
        if (tp_read_file(path, (size_t)1 << 30, &text, &len, &err)) {
            fprintf(stderr, "optim_tool: %s\n", err.msg);
            return NULL;
        }
        return text;
    }
    tp_strbuf sb;
    tp_strbuf_init(&sb);
    char buf[65536];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, stdin)) > 0) tp_strbuf_putn(&sb, buf, k);
    tp_strbuf_puts(&sb, "");
    if (sb.oom) {
        tp_strbuf_free(&sb);
        return NULL;
    }
    return sb.buf;
}

static int parse_schedule(const cJSON *j, tp_lr_schedule *s) {
    tp_err err = {0};
    const cJSON *kind = cJSON_GetObjectItemCaseSensitive(j, "kind");
    if (!cJSON_IsString(kind) || tp_lr_schedule_parse_kind(kind->valuestring, &s->kind))
        return die("schedule.kind must be \"cosine\", \"linear\" or \"constant\"");
    s->peak_lr = num(j, "peak_lr", -1);
    s->min_lr = num(j, "min_lr", 0);
    s->warmup_steps = (int64_t)num(j, "warmup_steps", 0);
    s->total_steps = (int64_t)num(j, "total_steps", 0);
    if (tp_lr_schedule_validate(s, &err)) return die(err.msg);
    return 0;
}

static int run(const char *path) {
    char *text = read_all(path);
    if (!text) return 1;
    cJSON *j = cJSON_Parse(text);
    free(text);
    if (!j) return die("spec is not valid JSON");

    int rc = 1;
    long np = 0;
    float **p = NULL, **m = NULL, **v = NULL, **g = NULL;
    double *wd = NULL;
    long *len = NULL, *grp = NULL;
    tp_err err = {0};
    tp_adamw_cfg cfg = TP_ADAMW_CFG_DEFAULT;
    cfg.beta1 = num(j, "beta1", cfg.beta1);
    cfg.beta2 = num(j, "beta2", cfg.beta2);
    cfg.eps = num(j, "eps", cfg.eps);
    const double max_norm = num(j, "max_norm", 0);
    tp_lr_schedule sched;
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(j, "params");
    const cJSON *grads = cJSON_GetObjectItemCaseSensitive(j, "grads");
    long ngroups = 0;

    if (tp_adamw_cfg_validate(&cfg, &err)) {
        die(err.msg);
        goto out;
    }
    if (parse_schedule(cJSON_GetObjectItemCaseSensitive(j, "schedule"), &sched)) goto out;
    if ((ngroups = doubles(cJSON_GetObjectItemCaseSensitive(j, "weight_decay"), &wd)) < 1) {
        die("weight_decay must be a non-empty array of numbers");
        goto out;
    }
    if (!cJSON_IsArray(params) || !cJSON_IsArray(grads)) {
        die("params and grads must be arrays");
        goto out;
    }
    np = cJSON_GetArraySize(params);
    p = calloc((size_t)np + 1, sizeof *p);
    m = calloc((size_t)np + 1, sizeof *m);
    v = calloc((size_t)np + 1, sizeof *v);
    g = calloc((size_t)np + 1, sizeof *g);
    len = calloc((size_t)np + 1, sizeof *len);
    grp = calloc((size_t)np + 1, sizeof *grp);
    for (long i = 0; i < np; i++) {
        const cJSON *pi = cJSON_GetArrayItem(params, (int)i);
        grp[i] = (long)num(pi, "group", -1);
        if (grp[i] < 0 || grp[i] >= ngroups) {
            die("params[].group must index weight_decay");
            goto out;
        }
        if ((len[i] = floats(cJSON_GetObjectItemCaseSensitive(pi, "init"), &p[i])) < 0) {
            die("params[].init must be an array of numbers");
            goto out;
        }
        m[i] = calloc((size_t)len[i] + 1, sizeof(float));
        v[i] = calloc((size_t)len[i] + 1, sizeof(float));
    }

    const cJSON *gs;
    long step = 0;
    cJSON_ArrayForEach(gs, grads) {
        if (!cJSON_IsArray(gs) || cJSON_GetArraySize(gs) != np) {
            die("grads[step] must have one array per parameter");
            goto out;
        }
        for (long i = 0; i < np; i++) {
            free(g[i]);
            if (floats(cJSON_GetArrayItem(gs, (int)i), &g[i]) != len[i]) {
                die("grads[step][param] must match the parameter's length");
                goto out;
            }
        }
        const double lr = tp_lr_at(&sched, step);
        double sq = 0.0;
        for (long i = 0; i < np; i++) sq += tp_sum_squares(g[i], (size_t)len[i]);
        const double norm = sqrt(sq);
        const float coef = tp_clip_coef(norm, max_norm);
        printf("step %ld lr %.17g norm %.17g coef %.9g\n", step, lr, norm, (double)coef);
        for (long i = 0; i < np; i++) {
            if (max_norm > 0) tp_scale(g[i], (size_t)len[i], coef);
            tp_adamw_update(&cfg, step + 1, lr, wd[grp[i]], p[i], g[i], m[i], v[i], (size_t)len[i]);
            printf("param %ld", i);
            for (long k = 0; k < len[i]; k++) printf(" %.9g", (double)p[i][k]);
            putchar('\n');
        }
        step++;
    }
    rc = 0;
out:
    for (long i = 0; i < np; i++) free(p[i]), free(m[i]), free(v[i]), free(g[i]);
    free(p), free(m), free(v), free(g), free(len), free(grp), free(wd);
    cJSON_Delete(j);
    return rc;
}

static int lr_cmd(int argc, char **argv) {
    if (argc < 7) return die("usage: optim_tool lr KIND PEAK MIN WARMUP TOTAL STEP...");
    tp_lr_schedule s = {0};
    tp_err err = {0};
    if (tp_lr_schedule_parse_kind(argv[2], &s.kind)) return die("unknown schedule kind");
    s.peak_lr = strtod(argv[3], NULL);
    s.min_lr = strtod(argv[4], NULL);
    s.warmup_steps = strtoll(argv[5], NULL, 10);
    s.total_steps = strtoll(argv[6], NULL, 10);
    if (tp_lr_schedule_validate(&s, &err)) return die(err.msg);
    for (int i = 7; i < argc; i++) printf("%.17g\n", tp_lr_at(&s, strtoll(argv[i], NULL, 10)));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "run")) return run(argv[2]);
    if (argc >= 2 && !strcmp(argv[1], "lr")) return lr_cmd(argc, argv);
    fprintf(stderr, "usage: optim_tool run SPEC.json|- | optim_tool lr KIND PEAK MIN WARMUP TOTAL STEP...\n");
    return 2;
}
