/* cmd_dump.c - `tptt dump`: one forward + backward written out for external
 * numerical checks (contract: docs/dump.md). */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "io/hf_model.h"
#include "io/safetensors.h"
#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "model/decoder.h"
#include "model/run_json.h"
#include "util/fsutil.h"
#include "util/jsonint.h"
#include "util/platform.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt dump --model DIR --batch BATCH.json --out OUT.safetensors [--set key=value ...]\n"
            "\n"
            "One forward and backward pass on BATCH.json; writes logits, loss, every trainable\n"
            "parameter and its gradient (<key>.grad) to OUT. Settings (docs/dump.md):\n"
            "  trainable=lora|projections|all  lora.r=8  lora.alpha=16  lora.dropout=0\n"
            "  lora.target_modules=q_proj,k_proj,v_proj,o_proj  lora.rslora=false\n"
            "  lora.init=default|random  compute.matmul=auto|f32|bf16  compute.recompute=false  seed=0\n"
            "  liza.enabled=false liza.preset=delta_rule liza.order liza.alpha_gate liza.beta_gate\n"
            "  liza.trick liza.linear liza.chunk_size=64 liza.base_scale_attn=false\n"
            "  mag.mode=constant|gradual|cyclic|learnable mag.mu0=0.5 mag.mu1 mag.steps mag.values\n"
            "  mag.period mag.learnable_shape=scalar|vector mag.cross_gate=false mag.step=0\n");
}

typedef struct dump_settings {
    tp_decoder_opts o;
    int matmul_auto;
    int64_t step; /* mag.step */
} dump_settings;

static int parse_bool(const char *v, int *out) {
    if (!strcmp(v, "true") || !strcmp(v, "1")) { *out = 1; return 0; }
    if (!strcmp(v, "false") || !strcmp(v, "0")) { *out = 0; return 0; }
    return -1;
}

static int parse_double(const char *v, double *out) {
    char *end;
    *out = strtod(v, &end);
    return (*v && !*end) ? 0 : -1;
}

static int parse_gate(const char *v, int *out) {
    static const char *const names[] = {"c", "k", "v", "kv"};
    for (int i = 0; i < 4; i++)
        if (!strcmp(v, names[i])) { *out = i; return 0; }
    return -1;
}

static int apply_liza_set(dump_settings *s, const char *key, const char *v, tp_err *err) {
    tp_liza_opts *lo = &s->o.liza;
    tp_mag_opts *mg = &s->o.mag;
    long long n;
    double x;
    int b;
    if (!strcmp(key, "liza.enabled")) {
        if (parse_bool(v, &b)) return tp_fail(err, TP_EINVAL, "--set liza.enabled=%s: expected true or false", v);
        lo->enabled = b;
    } else if (!strcmp(key, "liza.preset")) {
        if (tp_liza_preset(v, lo))
            return tp_fail(err, TP_EINVAL,
                           "--set liza.preset=%s: unknown operator mode (expected delta_rule, delta_rule_v, "
                           "delta_rule_kv, delta_rule_gelu, gated_delta_rule, delta_product, gated_delta_product, "
                           "delta_product_r, delta_product_c)", v);
    } else if (!strcmp(key, "liza.order")) {
        if (tp_cli_int(v, 1, 8, &n)) return tp_fail(err, TP_EINVAL, "--set liza.order=%s: expected an integer in [1, 8]", v);
        lo->order = (int)n;
    } else if (!strcmp(key, "liza.alpha_gate") || !strcmp(key, "liza.beta_gate")) {
        int g;
        if (parse_gate(v, &g)) return tp_fail(err, TP_EINVAL, "--set %s=%s: expected c, k, v or kv", key, v);
        if (key[5] == 'a') lo->alpha_gate = g; else lo->beta_gate = g;
    } else if (!strcmp(key, "liza.trick")) {
        if (!strcmp(v, "dt")) lo->trick = TP_TRICK_DT;
        else if (!strcmp(v, "rot")) lo->trick = TP_TRICK_ROT;
        else if (!strcmp(v, "rdt")) lo->trick = TP_TRICK_RDT;
        else return tp_fail(err, TP_EINVAL, "--set liza.trick=%s: expected dt, rot or rdt", v);
    } else if (!strcmp(key, "liza.linear")) {
        if (parse_bool(v, &b)) return tp_fail(err, TP_EINVAL, "--set liza.linear=%s: expected true or false", v);
        lo->linear = b;
    } else if (!strcmp(key, "liza.chunk_size")) {
        if (tp_cli_int(v, 1, 4096, &n)) return tp_fail(err, TP_EINVAL, "--set liza.chunk_size=%s: expected an integer in [1, 4096]", v);
        lo->chunk = (int)n;
    } else if (!strcmp(key, "liza.base_scale_attn")) {
        if (parse_bool(v, &b)) return tp_fail(err, TP_EINVAL, "--set liza.base_scale_attn=%s: expected true or false", v);
        lo->base_scale_attn = b;
    } else if (!strcmp(key, "mag.mode")) {
        static const char *const modes[] = {"constant", "gradual", "cyclic", "learnable"};
        int found = -1;
        for (int i = 0; i < 4; i++) if (!strcmp(v, modes[i])) found = i;
        if (found < 0) return tp_fail(err, TP_EINVAL, "--set mag.mode=%s: expected constant, gradual, cyclic or learnable", v);
        mg->mode = found;
    } else if (!strcmp(key, "mag.mu0") || !strcmp(key, "mag.mu1")) {
        if (parse_double(v, &x) || !(x >= 0 && x <= 1)) return tp_fail(err, TP_EINVAL, "--set %s=%s: expected a number in [0, 1]", key, v);
        if (key[6] == '0') mg->mu0 = x; else mg->mu1 = x;
    } else if (!strcmp(key, "mag.steps") || !strcmp(key, "mag.period") || !strcmp(key, "mag.step")) {
        if (tp_cli_int(v, !strcmp(key, "mag.step") ? 0 : 1, 1LL << 40, &n))
            return tp_fail(err, TP_EINVAL, "--set %s=%s: expected a %s integer", key, v, !strcmp(key, "mag.step") ? "non-negative" : "positive");
        if (!strcmp(key, "mag.steps")) mg->steps = n;
        else if (!strcmp(key, "mag.period")) mg->period = n;
        else s->step = n;
    } else if (!strcmp(key, "mag.values")) {
        mg->nvalues = 0;
        const char *p = v;
        while (*p) {
            char *end;
            x = strtod(p, &end);
            if (end == p || !(x >= 0 && x <= 1) || mg->nvalues == TP_MAG_MAX_VALUES || (*end && *end != ','))
                return tp_fail(err, TP_EINVAL, "--set mag.values=%s: expected up to %d comma-separated numbers in [0, 1]", v, TP_MAG_MAX_VALUES);
            mg->values[mg->nvalues++] = x;
            p = *end ? end + 1 : end;
        }
        if (!mg->nvalues) return tp_fail(err, TP_EINVAL, "--set mag.values: empty list");
    } else if (!strcmp(key, "mag.learnable_shape")) {
        if (!strcmp(v, "scalar")) mg->vector = 0;
        else if (!strcmp(v, "vector")) mg->vector = 1;
        else return tp_fail(err, TP_EINVAL, "--set mag.learnable_shape=%s: expected scalar or vector", v);
    } else if (!strcmp(key, "mag.cross_gate")) {
        if (parse_bool(v, &b)) return tp_fail(err, TP_EINVAL, "--set mag.cross_gate=%s: expected true or false", v);
        mg->cross_gate = b;
    } else {
        return tp_fail(err, TP_EINVAL,
                       "--set %s: unknown key (liza.*: enabled, preset, order, alpha_gate, beta_gate, trick, linear, "
                       "chunk_size, base_scale_attn; mag.*: mode, mu0, mu1, steps, values, period, learnable_shape, "
                       "cross_gate, step)", key);
    }
    return TP_OK;
}

static int apply_set(dump_settings *s, const char *kv, tp_err *err) {
    const char *eq = strchr(kv, '=');
    if (!eq) return tp_fail(err, TP_EINVAL, "--set '%s': expected key=value", kv);
    char key[64];
    snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
    const char *v = eq + 1;
    long long n;
    double x;
    int b;
    if (!strcmp(key, "trainable")) {
        if (!strcmp(v, "lora")) s->o.trainable = TP_TRAIN_LORA;
        else if (!strcmp(v, "projections")) s->o.trainable = TP_TRAIN_PROJECTIONS;
        else if (!strcmp(v, "all")) s->o.trainable = TP_TRAIN_ALL;
        else return tp_fail(err, TP_EINVAL, "--set trainable=%s: expected lora, projections or all", v);
    } else if (!strcmp(key, "lora.r")) {
        if (tp_cli_int(v, 1, 65536, &n)) return tp_fail(err, TP_EINVAL, "--set lora.r=%s: expected an integer in [1, 65536]", v);
        s->o.lora.r = (int)n;
    } else if (!strcmp(key, "lora.alpha")) {
        if (parse_double(v, &x) || !(x > 0)) return tp_fail(err, TP_EINVAL, "--set lora.alpha=%s: expected a positive number", v);
        s->o.lora.alpha = x;
    } else if (!strcmp(key, "lora.dropout")) {
        if (parse_double(v, &x) || !(x >= 0 && x < 1)) return tp_fail(err, TP_EINVAL, "--set lora.dropout=%s: expected a number in [0, 1)", v);
        s->o.lora.dropout = x;
    } else if (!strcmp(key, "lora.target_modules")) {
        return tp_lora_parse_targets(v, &s->o.lora.targets, err);
    } else if (!strcmp(key, "lora.rslora")) {
        if (parse_bool(v, &b)) return tp_fail(err, TP_EINVAL, "--set lora.rslora=%s: expected true or false", v);
        s->o.lora.rslora = b;
    } else if (!strcmp(key, "lora.init")) {
        if (!strcmp(v, "default")) s->o.lora.init_random = 0;
        else if (!strcmp(v, "random")) s->o.lora.init_random = 1;
        else return tp_fail(err, TP_EINVAL, "--set lora.init=%s: expected default or random", v);
    } else if (!strcmp(key, "compute.matmul")) {
        s->matmul_auto = !strcmp(v, "auto");
        if (!strcmp(v, "f32")) s->o.matmul = TP_MM_F32;
        else if (!strcmp(v, "bf16")) s->o.matmul = TP_MM_BF16;
        else if (!s->matmul_auto) return tp_fail(err, TP_EINVAL, "--set compute.matmul=%s: expected auto, f32 or bf16", v);
    } else if (!strcmp(key, "compute.recompute")) {
        if (parse_bool(v, &b)) return tp_fail(err, TP_EINVAL, "--set compute.recompute=%s: expected true or false", v);
        s->o.recompute = b;
    } else if (!strncmp(key, "liza.", 5) || !strncmp(key, "mag.", 4)) {
        return apply_liza_set(s, key, v, err);
    } else if (!strcmp(key, "seed")) {
        if (tp_cli_int(v, 0, 0x7fffffffffffffffLL, &n)) return tp_fail(err, TP_EINVAL, "--set seed=%s: expected a non-negative integer", v);
        s->o.seed = (uint64_t)n;
    } else {
        return tp_fail(err, TP_EINVAL,
                       "--set %s: unknown key (expected trainable, lora.r, lora.alpha, lora.dropout, "
                       "lora.target_modules, lora.rslora, lora.init, compute.matmul, compute.recompute, seed)",
                       key);
    }
    return TP_OK;
}

/* The batch, with defaults filled in. */
typedef struct batch_data {
    int64_t B, T;
    int32_t *ids, *labels, *doc_start, *pos;
    int64_t **starts;
    size_t *nstarts;
} batch_data;

static void batch_free(batch_data *d) {
    free(d->ids);
    free(d->labels);
    free(d->doc_start);
    free(d->pos);
    if (d->starts)
        for (int64_t r = 0; r < d->B; r++) free(d->starts[r]);
    free(d->starts);
    free(d->nstarts);
}

static int int_rows(const char *path, const cJSON *j, const char *field, int64_t *B, int64_t *T, int fixedT,
                    tp_err *err) {
    if (!cJSON_IsArray(j) || cJSON_GetArraySize(j) == 0)
        return tp_fail(err, TP_EFORMAT, "%s: \"%s\" must be a non-empty list of rows", path, field);
    *B = cJSON_GetArraySize(j);
    int64_t r = 0;
    const cJSON *row;
    cJSON_ArrayForEach(row, j) {
        if (!cJSON_IsArray(row))
            return tp_fail(err, TP_EFORMAT, "%s: \"%s\"[%lld] is not a list", path, field, (long long)r);
        int64_t n = cJSON_GetArraySize(row);
        if (fixedT && n != *T)
            return tp_fail(err, TP_EFORMAT, "%s: \"%s\"[%lld] has %lld entries, expected %lld", path, field,
                           (long long)r, (long long)n, (long long)*T);
        if (!fixedT && r == 0) *T = n;
        if (!fixedT && n != *T)
            return tp_fail(err, TP_EFORMAT, "%s: \"%s\" rows differ in length (%lld vs %lld); pad them", path, field,
                           (long long)n, (long long)*T);
        const cJSON *x;
        int64_t c = 0;
        cJSON_ArrayForEach(x, row) {
            int64_t xi;
            if (!tp_json_int(x, INT32_MIN, INT32_MAX, &xi))
                return tp_fail(err, TP_EFORMAT, "%s: \"%s\"[%lld][%lld] is not a 32-bit integer", path, field,
                               (long long)r, (long long)c);
            c++;
        }
        r++;
    }
    return TP_OK;
}

static int load_batch(const char *path, batch_data *d, tp_err *err) {
    memset(d, 0, sizeof *d);
    char *text;
    size_t len;
    int rc = tp_read_file(path, 1u << 30, &text, &len, err);
    if (rc) return rc;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        rc = tp_fail(err, TP_EFORMAT, "%s: not valid JSON (near byte %zu)", path, end ? (size_t)(end - text) : (size_t)0);
        free(text);
        return rc;
    }
    free(text);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(root, "input_ids");
    const cJSON *lab = cJSON_GetObjectItemCaseSensitive(root, "labels");
    const cJSON *docs = cJSON_GetObjectItemCaseSensitive(root, "doc_starts");
    for (const cJSON *e = root->child; e && rc == TP_OK; e = e->next)
        if (strcmp(e->string, "input_ids") && strcmp(e->string, "labels") && strcmp(e->string, "doc_starts"))
            rc = tp_fail(err, TP_EFORMAT, "%s: unknown field \"%s\" (expected input_ids, labels, doc_starts)", path,
                         e->string);
    int64_t B = 0, T = 0, B2;
    if (rc == TP_OK) rc = int_rows(path, ids, "input_ids", &B, &T, 0, err);
    if (rc == TP_OK && T == 0) rc = tp_fail(err, TP_EFORMAT, "%s: \"input_ids\" rows are empty", path);
    if (rc == TP_OK && lab) {
        rc = int_rows(path, lab, "labels", &B2, &T, 1, err);
        if (rc == TP_OK && B2 != B)
            rc = tp_fail(err, TP_EFORMAT, "%s: \"labels\" has %lld rows, \"input_ids\" %lld", path, (long long)B2, (long long)B);
    }
    if (rc == TP_OK && docs && (!cJSON_IsArray(docs) || cJSON_GetArraySize(docs) != B))
        rc = tp_fail(err, TP_EFORMAT, "%s: \"doc_starts\" must be a list of %lld rows", path, (long long)B);
    if (rc) { cJSON_Delete(root); return rc; }
    size_t N = (size_t)(B * T);
    d->B = B;
    d->T = T;
    d->ids = tp_calloc(N, sizeof(int32_t), err);
    d->labels = tp_calloc(N, sizeof(int32_t), err);
    d->doc_start = tp_calloc(N, sizeof(int32_t), err);
    d->pos = tp_calloc(N, sizeof(int32_t), err);
    d->starts = tp_calloc((size_t)B, sizeof *d->starts, err);
    d->nstarts = tp_calloc((size_t)B, sizeof *d->nstarts, err);
    if (!d->ids || !d->labels || !d->doc_start || !d->pos || !d->starts || !d->nstarts) rc = TP_ENOMEM;
    for (int64_t r = 0; r < B && rc == TP_OK; r++) {
        const cJSON *row = cJSON_GetArrayItem(ids, (int)r);
        for (int64_t t = 0; t < T; t++) d->ids[r * T + t] = (int32_t)cJSON_GetArrayItem(row, (int)t)->valuedouble;
        const cJSON *ds = docs ? cJSON_GetArrayItem(docs, (int)r) : NULL;
        if (ds && !cJSON_IsArray(ds)) {
            rc = tp_fail(err, TP_EFORMAT, "%s: \"doc_starts\"[%lld] is not a list", path, (long long)r);
            break;
        }
        size_t ns = ds ? (size_t)cJSON_GetArraySize(ds) : 1;
        d->starts[r] = tp_calloc(ns ? ns : 1, sizeof(int64_t), err);
        if (!d->starts[r]) { rc = TP_ENOMEM; break; }
        d->nstarts[r] = ns;
        for (size_t i = 0; ds && i < ns; i++) {
            const cJSON *x = cJSON_GetArrayItem(ds, (int)i);
            if (!tp_json_int(x, -(INT64_C(1) << 53), INT64_C(1) << 53, &d->starts[r][i])) {
                rc = tp_fail(err, TP_EFORMAT, "%s: \"doc_starts\"[%lld][%zu] is not an integer", path, (long long)r, i);
                break;
            }
        }
        if (rc) break;
        if ((rc = tp_batch_row_positions(d->starts[r], ns, T, d->doc_start + r * T, d->pos + r * T, err))) {
            tp_err_prefix(err, "%s: row %lld", path, (long long)r);
            break;
        }
        for (int64_t t = 0; t < T; t++) {
            if (lab) {
                d->labels[r * T + t] = (int32_t)cJSON_GetArrayItem(cJSON_GetArrayItem(lab, (int)r), (int)t)->valuedouble;
            } else { /* next token, -100 at the end and before a new document */
                int last = t == T - 1 || d->doc_start[r * T + t + 1] == t + 1;
                d->labels[r * T + t] = last ? -100 : d->ids[r * T + t + 1];
            }
        }
    }
    cJSON_Delete(root);
    return rc;
}

static cJSON *int_matrix(const int32_t *x, int64_t B, int64_t T) {
    cJSON *a = cJSON_CreateArray();
    for (int64_t r = 0; r < B; r++) {
        cJSON *row = cJSON_CreateArray();
        for (int64_t t = 0; t < T; t++) cJSON_AddItemToArray(row, cJSON_CreateNumber(x[r * T + t]));
        cJSON_AddItemToArray(a, row);
    }
    return a;
}

static int write_dump(const char *out, tp_decoder *m, const batch_data *bd, int64_t V, const float *logits,
                      float loss, const char *cfg_json, tp_err *err) {
    size_t np = tp_decoder_nparams(m), n = 2 + 2 * np;
    tp_st_spec *specs = tp_calloc(n, sizeof *specs, err);
    const void **data = tp_calloc(n, sizeof *data, err);
    char (*names)[TP_PARAM_NAME_MAX + 8] = tp_calloc(np, sizeof *names, err);
    if (!specs || !data || !names) { free(specs); free(data); free(names); return TP_ENOMEM; }
    specs[0] = (tp_st_spec){"logits", TP_F32, 3, {bd->B, bd->T, V}};
    data[0] = logits;
    specs[1] = (tp_st_spec){"loss", TP_F32, 0, {0}};
    data[1] = &loss;
    for (size_t i = 0; i < np; i++) {
        const tp_param *p = tp_decoder_param(m, i);
        snprintf(names[i], sizeof names[i], "%s.grad", p->name);
        specs[2 + i] = (tp_st_spec){p->name, TP_F32, p->ndim, {p->shape[0], p->shape[1]}};
        data[2 + i] = tp_decoder_theta(m) + p->offset;
        specs[2 + np + i] = (tp_st_spec){names[i], TP_F32, p->ndim, {p->shape[0], p->shape[1]}};
        data[2 + np + i] = tp_decoder_grad(m) + p->offset;
    }
    cJSON *bj = cJSON_CreateObject();
    cJSON_AddItemToObject(bj, "input_ids", int_matrix(bd->ids, bd->B, bd->T));
    cJSON_AddItemToObject(bj, "labels", int_matrix(bd->labels, bd->B, bd->T));
    cJSON *ds = cJSON_AddArrayToObject(bj, "doc_starts");
    for (int64_t r = 0; r < bd->B; r++) {
        cJSON *row = cJSON_CreateArray();
        for (size_t i = 0; i < bd->nstarts[r]; i++) cJSON_AddItemToArray(row, cJSON_CreateNumber((double)bd->starts[r][i]));
        cJSON_AddItemToArray(ds, row);
    }
    char *batch_json = cJSON_PrintUnformatted(bj);
    cJSON_Delete(bj);
    tp_kv meta[3] = {{"format", "pt"}, {"config", cfg_json}, {"batch", batch_json}};
    int rc = tp_st_write(out, specs, data, n, meta, 3, err);
    free(batch_json);
    free(specs);
    free(data);
    free(names);
    return rc;
}

int tp_cmd_dump(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'}, {"batch", required_argument, 0, 'b'},
                                         {"out", required_argument, 0, 'o'},   {"set", required_argument, 0, 's'},
                                         {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    const char *model = NULL, *batch = NULL, *out = NULL;
    dump_settings s;
    tp_decoder_opts_default(&s.o);
    s.matmul_auto = 1;
    s.step = 0;
    tp_err err = {0};
    int ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'm': model = optarg; break;
        case 'b': batch = optarg; break;
        case 'o': out = optarg; break;
        case 's':
            if (apply_set(&s, optarg, &err)) return tp_cli_error(err.msg);
            break;
        default:
            fprintf(stderr, "tptt: dump: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
    }
    if (!model || !batch || !out || optind != argc) {
        fprintf(stderr, "tptt: dump: --model, --batch and --out are required\n");
        usage(stderr);
        return 2;
    }
    tp_hf_model *hf = NULL;
    tp_decoder *m = NULL;
    batch_data bd;
    memset(&bd, 0, sizeof bd);
    float *logits = NULL;
    char *cfg_json = NULL;
    int rc = tp_hf_open(model, &hf, &err);
    if (rc == TP_OK) rc = load_batch(batch, &bd, &err);
    if (rc == TP_OK && s.matmul_auto) {
        tp_cpu_features cpu;
        tp_cpu_detect(&cpu);
        int all_bf16 = 1;
        for (size_t i = 0; i < hf->nweights; i++) all_bf16 &= hf->views[i]->dtype == TP_BF16;
        s.o.matmul = all_bf16 && cpu.avx512_bf16 ? TP_MM_BF16 : TP_MM_F32;
    }
    if (rc == TP_OK) rc = tp_decoder_create(hf, &s.o, &m, &err);
    if (rc == TP_OK) tp_decoder_set_step(m, s.step);
    double loss_sum = 0;
    int64_t count = 0;
    if (rc == TP_OK) {
        int64_t cnt = 0;
        for (int64_t i = 0; i < bd.B * bd.T; i++) cnt += bd.labels[i] != -100;
        if (cnt == 0) rc = tp_fail(&err, TP_EINVAL, "%s: the batch has no labelled tokens (every label is -100)", batch);
        logits = rc ? NULL : tp_malloc((size_t)(bd.B * bd.T * hf->cfg.vocab) * sizeof(float), &err);
        if (rc == TP_OK && !logits) rc = TP_ENOMEM;
        if (rc == TP_OK) {
            tp_batch b = {bd.B, bd.T, bd.ids, bd.labels, bd.doc_start, bd.pos, NULL};
            rc = tp_decoder_step(m, &b, (double)cnt, 1, logits, &loss_sum, &count, &err);
            if (rc) tp_err_prefix(&err, "%s", batch);
        }
    }
    size_t nparams = m ? tp_decoder_nparams(m) : 0;
    /* what really ran: bf16 only if some frozen product went through oneDNN */
    tp_mm_backend used = TP_MM_F32;
    if (tp_mm_backend_effective(s.o.matmul) == TP_MM_BF16 && hf)
        for (size_t i = 0; i < hf->nweights; i++)
            if (hf->views[i]->dtype == TP_BF16 && hf->desc[i].ndim == 2) used = TP_MM_BF16;
    if (rc == TP_OK) {
        cfg_json = tp_run_config_json(model, &hf->cfg, &s.o, used, s.step);
        rc = cfg_json ? write_dump(out, m, &bd, hf->cfg.vocab, logits, (float)(loss_sum / (double)count), cfg_json, &err)
                      : tp_fail(&err, TP_ENOMEM, "out of memory");
    }
    free(cfg_json);
    free(logits);
    batch_free(&bd);
    tp_decoder_destroy(m);
    tp_hf_close(hf);
    if (rc) return tp_cli_error(err.msg);
    printf("wrote %s: loss %.6f over %lld tokens, %zu trainable tensors (%s matmul)\n", out, loss_sum / (double)count,
           (long long)count, nparams, tp_mm_backend_name(used));
    return 0;
}
