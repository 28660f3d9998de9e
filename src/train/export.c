#include "train/export.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "util/fsutil.h"

static const tp_param *find(const tp_decoder *m, const char *key) {
    for (size_t i = 0; i < tp_decoder_nparams(m); i++)
        if (!strcmp(tp_decoder_param(m, i)->name, key)) return tp_decoder_param(m, i);
    return NULL;
}

static int copy_file(const char *from, const char *to, tp_err *err) {
    char *text;
    size_t len;
    int rc = tp_read_file(from, 1u << 30, &text, &len, err);
    if (rc) return rc;
    rc = tp_write_file_atomic(to, text, len, err);
    free(text);
    return rc;
}

int tp_export_model(const tp_hf_model *base, tp_decoder *m, const char *out_dir, tp_err *err) {
    int rc = tp_mkdir_p(out_dir, err);
    if (rc) return rc;
    size_t n = base->nweights;
    tp_st_spec *specs = tp_calloc(n, sizeof *specs, err);
    const tp_param **full = tp_calloc(n, sizeof *full, err), **la = tp_calloc(n, sizeof *la, err),
                   **lb = tp_calloc(n, sizeof *lb, err);
    if (!specs || !full || !la || !lb) { rc = TP_ENOMEM; goto done; }
    const tp_decoder_opts *o = tp_decoder_options(m);
    double scale = o->lora.rslora ? o->lora.alpha / sqrt((double)o->lora.r) : o->lora.alpha / o->lora.r;
    for (size_t i = 0; i < n; i++) {
        const tp_weight_desc *d = &base->desc[i];
        char key[TP_PARAM_NAME_MAX + 32];
        snprintf(key, sizeof key, "base_model.model.%s", d->name);
        full[i] = find(m, key);
        if (d->ndim == 2 && strlen(d->name) > 7) {
            size_t bl = strlen(d->name) - strlen(".weight");
            snprintf(key, sizeof key, "base_model.model.%.*s.lora_A.weight", (int)bl, d->name);
            la[i] = find(m, key);
            snprintf(key, sizeof key, "base_model.model.%.*s.lora_B.weight", (int)bl, d->name);
            lb[i] = find(m, key);
        }
        int changed = full[i] || (la[i] && lb[i]);
        specs[i] = (tp_st_spec){d->name, changed ? TP_F32 : base->views[i]->dtype, d->ndim, {d->shape[0], d->shape[1]}};
    }
    char *path = tp_path_join(out_dir, "model.safetensors", err);
    tp_kv meta = {"format", "pt"};
    tp_st_writer *w = NULL;
    rc = path ? tp_st_writer_open(path, specs, n, &meta, 1, &w, err) : TP_ENOMEM;
    free(path);
    const float *theta = tp_decoder_theta(m);
    for (size_t i = 0; rc == TP_OK && i < n; i++) {
        const tp_weight_desc *d = &base->desc[i];
        const tp_tensor_view *v = base->views[i];
        if (full[i]) {
            rc = tp_st_writer_write(w, theta + full[i]->offset, full[i]->numel * sizeof(float), err);
        } else if (la[i] && lb[i]) { /* W + s·B·A, one output row at a time */
            int64_t out = d->shape[0], in = d->shape[1], r = la[i]->shape[0];
            float *row = tp_malloc((size_t)in * sizeof(float), err);
            if (!row) { rc = TP_ENOMEM; break; }
            const float *A = theta + la[i]->offset, *B = theta + lb[i]->offset;
            size_t es = tp_dtype_size(v->dtype);
            for (int64_t o2 = 0; o2 < out && rc == TP_OK; o2++) {
                tp_to_f32(row, (const char *)v->data + (size_t)(o2 * in) * es, v->dtype, (size_t)in);
                for (int64_t k = 0; k < r; k++) {
                    float bk = (float)(scale * B[o2 * r + k]);
                    for (int64_t e = 0; e < in; e++) row[e] += bk * A[k * in + e];
                }
                rc = tp_st_writer_write(w, row, (size_t)in * sizeof(float), err);
            }
            free(row);
        } else {
            rc = tp_st_writer_write(w, v->data, (size_t)v->nbytes, err);
        }
    }
    if (w) {
        if (rc == TP_OK) rc = tp_st_writer_close(w, err);
        else tp_st_writer_abort(w);
    }
    /* config and tokenizer files travel with the weights */
    static const char *const files[] = {"config.json", "tokenizer.json", "tokenizer_config.json",
                                        "generation_config.json", "special_tokens_map.json"};
    for (size_t f = 0; rc == TP_OK && f < sizeof files / sizeof *files; f++) {
        char *from = tp_path_join(base->dir, files[f], err), *to = tp_path_join(out_dir, files[f], err);
        if (!from || !to) rc = TP_ENOMEM;
        else if (tp_exists(from)) rc = copy_file(from, to, err);
        free(from);
        free(to);
    }
done:
    free(specs);
    free(full);
    free(la);
    free(lb);
    return rc;
}
