#include "io/hf_model.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/fsutil.h"

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++) k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

static int add_file(tp_hf_model *m, const char *path, tp_err *err) {
    tp_st_file **nf = realloc(m->files, (m->nfiles + 1) * sizeof *nf);
    if (!nf) return tp_fail(err, TP_ENOMEM, "out of memory");
    m->files = nf;
    int rc = tp_st_open(path, &m->files[m->nfiles], err);
    if (rc != TP_OK) return rc;
    m->file_bytes += tp_st_file_size(m->files[m->nfiles]);
    m->nfiles++;
    return TP_OK;
}

/* Open every shard named by the index and check each listed tensor is in
 * the shard the index names. */
static int open_index(tp_hf_model *m, const char *index_path, tp_err *err) {
    char *text;
    size_t len;
    int rc = tp_read_file(index_path, 64u << 20, &text, &len, err);
    if (rc != TP_OK) return rc;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        rc = tp_fail(err, TP_EFORMAT, "%s: not valid JSON (near byte %zu)", index_path,
                     end ? (size_t)(end - text) : (size_t)0);
        free(text);
        return rc;
    }
    free(text);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(root);
        return tp_fail(err, TP_EFORMAT, "%s: missing \"weight_map\" object", index_path);
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, wm) {
        if (!cJSON_IsString(e)) {
            rc = tp_fail(err, TP_EFORMAT, "%s: weight_map entry '%s' is not a file name", index_path, e->string);
            break;
        }
        const char *shard = e->valuestring;
        if (!shard[0] || strchr(shard, '/') || !strcmp(shard, "..")) {
            rc = tp_fail(err, TP_EFORMAT, "%s: weight_map entry '%s' names '%s', not a file in the model directory",
                         index_path, e->string, shard);
            break;
        }
        /* open each distinct shard once */
        size_t i;
        for (i = 0; i < m->nfiles; i++) {
            const char *p = tp_st_path(m->files[i]);
            const char *base = strrchr(p, '/');
            if (!strcmp(base ? base + 1 : p, shard)) break;
        }
        if (i == m->nfiles) {
            char *path = tp_path_join(m->dir, shard, err);
            if (!path) { rc = TP_ENOMEM; break; }
            if (!tp_exists(path)) {
                rc = tp_fail(err, TP_EIO, "%s: shard %s (holding tensor '%s') is missing", index_path, path,
                             e->string);
                free(path);
                break;
            }
            rc = add_file(m, path, err);
            free(path);
            if (rc != TP_OK) break;
        }
        if (!tp_st_find(m->files[i], e->string)) {
            rc = tp_fail(err, TP_EFORMAT, "%s: tensor '%s': the index places it in %s, which does not hold it",
                         index_path, e->string, tp_st_path(m->files[i]));
            break;
        }
    }
    cJSON_Delete(root);
    if (rc == TP_OK && m->nfiles == 0) rc = tp_fail(err, TP_EFORMAT, "%s: weight_map is empty", index_path);
    return rc;
}

int tp_hf_open(const char *dir, tp_hf_model **out, tp_err *err) {
    *out = NULL;
    tp_hf_model *m = tp_calloc(1, sizeof *m, err);
    if (!m) return TP_ENOMEM;
    int rc = TP_OK;
    char *index = NULL, *single = NULL;
    if (!(m->dir = tp_strdup(dir, err))) { rc = TP_ENOMEM; goto fail; }
    if ((rc = tp_model_config_load(dir, &m->cfg, err)) != TP_OK) goto fail;
    index = tp_path_join(dir, "model.safetensors.index.json", err);
    single = tp_path_join(dir, "model.safetensors", err);
    if (!index || !single) { rc = TP_ENOMEM; goto fail; }
    if (tp_exists(index)) {
        m->sharded = 1;
        rc = open_index(m, index, err);
    } else if (tp_exists(single)) {
        rc = add_file(m, single, err);
    } else {
        rc = tp_fail(err, TP_EIO, "%s: no model.safetensors or model.safetensors.index.json", dir);
    }
    if (rc != TP_OK) goto fail;
    /* a tensor in two shards is ambiguous */
    for (size_t i = 1; i < m->nfiles; i++)
        for (size_t j = 0; j < i; j++)
            for (size_t t = 0; t < tp_st_count(m->files[i]); t++) {
                const char *name = tp_st_at(m->files[i], t)->name;
                if (tp_st_find(m->files[j], name)) {
                    rc = tp_fail(err, TP_EFORMAT, "%s: tensor '%s' appears in both %s and %s", dir, name,
                                 tp_st_path(m->files[j]), tp_st_path(m->files[i]));
                    goto fail;
                }
            }
    m->nweights = tp_model_weight_count(&m->cfg);
    m->desc = tp_calloc(m->nweights, sizeof *m->desc, err);
    m->views = tp_calloc(m->nweights, sizeof *m->views, err);
    m->owner = tp_calloc(m->nweights, sizeof *m->owner, err);
    if (!m->desc || !m->views || !m->owner) { rc = TP_ENOMEM; goto fail; }
    tp_model_weights(&m->cfg, m->desc);
    for (size_t i = 0; i < m->nweights; i++) {
        const tp_weight_desc *d = &m->desc[i];
        for (size_t f = 0; f < m->nfiles && !m->views[i]; f++) {
            m->views[i] = tp_st_find(m->files[f], d->name);
            m->owner[i] = m->files[f];
        }
        char want[64], got[64];
        shape_str(want, sizeof want, d->ndim, d->shape);
        if (!m->views[i]) {
            rc = tp_fail(err, TP_EFORMAT, "%s: tensor '%s' is missing from %s (expected shape %s from config.json)",
                         dir, d->name, m->sharded ? "every shard of model.safetensors.index.json" : "model.safetensors",
                         want);
            goto fail;
        }
        const tp_tensor_view *v = m->views[i];
        int same = v->ndim == d->ndim;
        for (int k = 0; same && k < d->ndim; k++) same = v->shape[k] == d->shape[k];
        if (!same) {
            shape_str(got, sizeof got, v->ndim, v->shape);
            rc = tp_fail(err, TP_EFORMAT,
                         "%s: tensor '%s' has shape %s, expected %s from config.json (hidden_size=%lld, "
                         "intermediate_size=%lld, heads=%lld, kv_heads=%lld, head_dim=%lld, vocab_size=%lld)",
                         tp_st_path(m->owner[i]), d->name, got, want, (long long)m->cfg.hidden,
                         (long long)m->cfg.ffn, (long long)m->cfg.heads, (long long)m->cfg.kv_heads,
                         (long long)m->cfg.head_dim, (long long)m->cfg.vocab);
            goto fail;
        }
        m->weight_bytes += v->nbytes;
    }
    free(index);
    free(single);
    *out = m;
    return TP_OK;
fail:
    free(index);
    free(single);
    tp_hf_close(m);
    return rc;
}

void tp_hf_close(tp_hf_model *m) {
    if (!m) return;
    for (size_t i = 0; i < m->nfiles; i++) tp_st_close(m->files[i]);
    free(m->files);
    free(m->desc);
    free(m->views);
    free(m->owner);
    free(m->dir);
    free(m);
}
