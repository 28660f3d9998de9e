/* export.c - merged / peft / titan exports (export.h, docs/export.md). */
#include "train/export.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/safetensors.h"
#include "model/run_json.h"

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

static int rm_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) return unlink(path);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", path, e->d_name) >= (int)sizeof p) continue;
        struct stat st;
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) rm_tree(p);
        else unlink(p);
    }
    closedir(d);
    return rmdir(path);
}

static const char *dtype_torch(tp_dtype t) {
    return t == TP_BF16 ? "bfloat16" : t == TP_F16 ? "float16" : "float32";
}

/* ---- weights ---------------------------------------------------------------- */

typedef struct wsrc {
    const tp_weight_desc *d;
    const tp_tensor_view *v;
    const tp_param *full, *la, *lb; /* trainable copy, or LoRA pair */
} wsrc;

static void bind_sources(const tp_hf_model *base, const tp_decoder *m, wsrc *w) {
    for (size_t i = 0; i < base->nweights; i++) {
        const tp_weight_desc *d = &base->desc[i];
        char key[TP_PARAM_NAME_MAX + 32];
        w[i] = (wsrc){d, base->views[i], NULL, NULL, NULL};
        snprintf(key, sizeof key, "base_model.model.%s", d->name);
        w[i].full = find(m, key);
        if (d->ndim == 2 && strlen(d->name) > 7) {
            size_t bl = strlen(d->name) - strlen(".weight");
            snprintf(key, sizeof key, "base_model.model.%.*s.lora_A.weight", (int)bl, d->name);
            w[i].la = find(m, key);
            snprintf(key, sizeof key, "base_model.model.%.*s.lora_B.weight", (int)bl, d->name);
            w[i].lb = find(m, key);
            if (!w[i].la || !w[i].lb) w[i].la = w[i].lb = NULL;
        }
    }
}

/* Write tensor w (its trained value) in dtype dt, a row at a time. */
static int write_weight(tp_st_writer *wr, const wsrc *w, const tp_decoder *m, double scale, tp_dtype dt,
                        float *row, void *out, tp_err *err) {
    const float *theta = tp_decoder_theta((tp_decoder *)m);
    int64_t rows = w->d->shape[0], cols = w->d->ndim == 2 ? w->d->shape[1] : 1;
    if (w->d->ndim == 1) { cols = rows; rows = 1; }
    size_t es = tp_dtype_size(w->v->dtype), os = tp_dtype_size(dt);
    for (int64_t r = 0; r < rows; r++) {
        if (w->full) memcpy(row, theta + w->full->offset + r * cols, (size_t)cols * sizeof(float));
        else tp_to_f32(row, (const char *)w->v->data + (size_t)(r * cols) * es, w->v->dtype, (size_t)cols);
        if (w->la) { /* W + s·B·A in fp32 */
            int64_t rk = w->la->shape[0];
            const float *A = theta + w->la->offset, *B = theta + w->lb->offset;
            for (int64_t k = 0; k < rk; k++) {
                float bk = (float)(scale * B[r * rk + k]);
                for (int64_t e = 0; e < cols; e++) row[e] += bk * A[k * cols + e];
            }
        }
        tp_from_f32(out, row, dt, (size_t)cols);
        int rc = tp_st_writer_write(wr, out, (size_t)cols * os, err);
        if (rc) return rc;
    }
    return TP_OK;
}

/* Merged weights (+ MaG logits for titan) in shards of at most shard_bytes. */
static int write_weights(const tp_hf_model *base, const tp_decoder *m, const wsrc *w, tp_dtype dt, int with_mag,
                         uint64_t shard_bytes, const char *dir, tp_strbuf *report, tp_err *err) {
    const tp_decoder_opts *o = tp_decoder_options(m);
    double scale = o->lora.rslora ? o->lora.alpha / sqrt((double)o->lora.r) : o->lora.alpha / o->lora.r;
    size_t nw = base->nweights, nmag = 0;
    const tp_param **mag = tp_calloc(tp_decoder_nparams(m) + 1, sizeof *mag, err);
    if (!mag) return TP_ENOMEM;
    for (size_t i = 0; with_mag && i < tp_decoder_nparams(m); i++)
        if (strstr(tp_decoder_param(m, i)->name, ".mag_logit")) mag[nmag++] = tp_decoder_param(m, i);
    size_t n = nw + nmag;
    tp_st_spec *specs = tp_calloc(n, sizeof *specs, err);
    int *shard = tp_calloc(n, sizeof *shard, err);
    int64_t maxcols = 1;
    for (size_t i = 0; i < nw; i++) maxcols = base->desc[i].shape[w[i].d->ndim == 2 ? 1 : 0] > maxcols
                                                   ? base->desc[i].shape[w[i].d->ndim == 2 ? 1 : 0] : maxcols;
    float *row = tp_malloc((size_t)maxcols * sizeof(float), err);
    void *out = tp_malloc((size_t)maxcols * sizeof(float), err);
    int rc = specs && shard && row && out ? TP_OK : TP_ENOMEM;
    /* shard assignment in tensor order */
    uint64_t total = 0, cur = 0;
    int nshards = 1;
    for (size_t i = 0; rc == TP_OK && i < n; i++) {
        if (i < nw) specs[i] = (tp_st_spec){base->desc[i].name, dt, base->desc[i].ndim,
                                           {base->desc[i].shape[0], base->desc[i].shape[1]}};
        else specs[i] = (tp_st_spec){mag[i - nw]->name + strlen("base_model.model."), TP_F32, 1,
                                     {mag[i - nw]->shape[0], 0}};
        uint64_t b;
        tp_st_spec_nbytes(&specs[i], &b);
        if (cur > 0 && cur + b > shard_bytes) { nshards++; cur = 0; }
        cur += b;
        total += b;
        shard[i] = nshards - 1;
    }
    cJSON *index = cJSON_CreateObject(), *wm = NULL;
    cJSON *md = cJSON_AddObjectToObject(index, "metadata");
    cJSON_AddNumberToObject(md, "total_size", (double)total);
    wm = cJSON_AddObjectToObject(index, "weight_map");
    tp_kv meta = {"format", "pt"};
    for (int s = 0; rc == TP_OK && s < nshards; s++) {
        char name[64];
        if (nshards == 1) snprintf(name, sizeof name, "model.safetensors");
        else snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, nshards);
        size_t first = 0, cnt = 0;
        while (first < n && shard[first] != s) first++;
        while (first + cnt < n && shard[first + cnt] == s) cnt++;
        char *path = tp_path_join(dir, name, err);
        tp_st_writer *wr = NULL;
        rc = path ? tp_st_writer_open(path, specs + first, cnt, &meta, 1, &wr, err) : TP_ENOMEM;
        free(path);
        for (size_t i = first; rc == TP_OK && i < first + cnt; i++) {
            cJSON_AddStringToObject(wm, specs[i].name, name);
            if (i < nw) rc = write_weight(wr, &w[i], m, scale, dt, row, out, err);
            else rc = tp_st_writer_write(wr, tp_decoder_theta((tp_decoder *)m) + mag[i - nw]->offset,
                                         mag[i - nw]->numel * sizeof(float), err);
        }
        if (wr) {
            if (rc == TP_OK) rc = tp_st_writer_close(wr, err);
            else tp_st_writer_abort(wr);
        }
    }
    if (rc == TP_OK && nshards > 1) {
        char *text = cJSON_Print(index), *path = tp_path_join(dir, "model.safetensors.index.json", err);
        rc = text && path ? tp_write_file_atomic(path, text, strlen(text), err) : TP_ENOMEM;
        free(text);
        free(path);
    }
    cJSON_Delete(index);
    if (rc == TP_OK)
        tp_strbuf_printf(report, "weights: %zu tensors, %.1f MB %s in %d file%s%s\n", n, (double)total / 1e6,
                         tp_dtype_name(dt), nshards, nshards == 1 ? "" : "s + index",
                         nmag ? " (with the MaG logits, F32)" : "");
    free(mag);
    free(specs);
    free(shard);
    free(row);
    free(out);
    return rc;
}

/* ---- config.json ----------------------------------------------------------- */

static int base_config(const tp_hf_model *base, cJSON **out, tp_err *err) {
    char *path = tp_path_join(base->dir, "config.json", err), *text = NULL;
    size_t len = 0;
    int rc = path ? tp_read_file(path, 1u << 24, &text, &len, err) : TP_ENOMEM;
    *out = rc ? NULL : cJSON_ParseWithLength(text, len);
    if (rc == TP_OK && !cJSON_IsObject(*out)) {
        cJSON_Delete(*out);
        *out = NULL;
        rc = tp_fail(err, TP_EFORMAT, "%s: not a JSON object", path);
    }
    free(path);
    free(text);
    return rc;
}

static void set_item(cJSON *obj, const char *key, cJSON *val) {
    if (cJSON_GetObjectItemCaseSensitive(obj, key)) cJSON_ReplaceItemInObjectCaseSensitive(obj, key, val);
    else cJSON_AddItemToObject(obj, key, val);
}

static int write_json(const char *dir, const char *name, cJSON *j, tp_err *err) {
    char *text = cJSON_Print(j), *path = tp_path_join(dir, name, err);
    int rc = text && path ? tp_write_file_atomic(path, text, strlen(text), err) : TP_ENOMEM;
    free(text);
    free(path);
    return rc;
}

static void titan_fields(cJSON *c, const tp_hf_model *base, const tp_decoder *m, const tp_export_opts *o) {
    static const char *const gates[] = {"c", "k", "v", "kv"}, *const tricks[] = {"dt", "rot", "rdt"};
    const tp_decoder_opts *d = tp_decoder_options(m);
    set_item(c, "model_type", cJSON_CreateString("tptt_titan"));
    const char *arch[] = {"TpttTitanForCausalLM"};
    set_item(c, "architectures", cJSON_CreateStringArray(arch, 1));
    cJSON *am = cJSON_CreateObject();
    cJSON_AddStringToObject(am, "AutoConfig", "configuration_tptt.TpttTitanConfig");
    cJSON_AddStringToObject(am, "AutoModelForCausalLM", "modeling_tptt.TpttTitanForCausalLM");
    set_item(c, "auto_map", am);
    set_item(c, "base_model_type", cJSON_CreateString(tp_arch_model_type(base->cfg.arch)));
    set_item(c, "base_architecture", cJSON_CreateString(tp_arch_class(base->cfg.arch)));
    cJSON *l = cJSON_CreateObject();
    cJSON_AddNumberToObject(l, "order", d->liza.order);
    cJSON_AddStringToObject(l, "alpha_gate", gates[d->liza.alpha_gate]);
    cJSON_AddStringToObject(l, "beta_gate", gates[d->liza.beta_gate]);
    cJSON_AddBoolToObject(l, "linear", d->liza.linear);
    cJSON_AddStringToObject(l, "trick", tricks[d->liza.trick]);
    cJSON_AddNumberToObject(l, "chunk_size", d->liza.chunk);
    cJSON_AddBoolToObject(l, "base_scale_attn", d->liza.base_scale_attn);
    set_item(c, "liza", l);
    cJSON *g = cJSON_CreateObject();
    int learn = d->mag.mode == TP_MAG_LEARNABLE;
    cJSON_AddStringToObject(g, "mode", learn ? "learnable" : "fixed");
    if (learn) cJSON_AddNullToObject(g, "mu");
    else cJSON_AddNumberToObject(g, "mu", tp_mag_mu(&d->mag, o->step));
    cJSON_AddStringToObject(g, "learnable_shape", d->mag.vector ? "vector" : "scalar");
    cJSON_AddBoolToObject(g, "cross_gate", d->mag.cross_gate);
    set_item(c, "mag", g);
    cJSON *e = cJSON_CreateObject();
    cJSON_AddNumberToObject(e, "step", (double)o->step);
    if (o->source) cJSON_AddStringToObject(e, "checkpoint", o->source);
    else cJSON_AddNullToObject(e, "checkpoint");
#ifdef TPTT_VERSION_STRING
    cJSON_AddStringToObject(e, "tptt_version", TPTT_VERSION_STRING);
#endif
    set_item(c, "tptt_export", e);
}

/* ---- the formats ----------------------------------------------------------- */

static int copy_side_files(const tp_hf_model *base, const char *dir, tp_err *err) {
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                        "special_tokens_map.json", "tokenizer.model"};
    int rc = TP_OK;
    for (size_t f = 0; rc == TP_OK && f < sizeof files / sizeof *files; f++) {
        char *from = tp_path_join(base->dir, files[f], err), *to = tp_path_join(dir, files[f], err);
        if (!from || !to) rc = TP_ENOMEM;
        else if (tp_exists(from)) rc = copy_file(from, to, err);
        free(from);
        free(to);
    }
    return rc;
}

static int write_peft(const tp_hf_model *base, const tp_decoder *m, const tp_export_opts *o, const char *dir,
                      tp_strbuf *report, tp_err *err) {
    size_t np = tp_decoder_nparams(m), n = 0;
    tp_st_spec *specs = tp_calloc(np + 1, sizeof *specs, err);
    const void **data = tp_calloc(np + 1, sizeof *data, err);
    if (!specs || !data) { free(specs); free(data); return TP_ENOMEM; }
    for (size_t i = 0; i < np; i++) {
        const tp_param *p = tp_decoder_param(m, i);
        if (!p->is_lora) continue;
        specs[n] = (tp_st_spec){p->name, TP_F32, 2, {p->shape[0], p->shape[1]}};
        data[n++] = tp_decoder_theta((tp_decoder *)m) + p->offset;
    }
    tp_kv meta = {"format", "pt"};
    char *path = tp_path_join(dir, "adapter_model.safetensors", err);
    int rc = path ? tp_st_write(path, specs, data, n, &meta, 1, err) : TP_ENOMEM;
    free(path);
    free(specs);
    free(data);
    char abs_base[PATH_MAX];
    const char *bid = o->base_id;
    if (!bid) bid = realpath(base->dir, abs_base) ? abs_base : base->dir;
    char *ac = rc ? NULL : tp_adapter_config_json(tp_decoder_options(m), bid);
    if (rc == TP_OK && !ac) rc = tp_fail(err, TP_ENOMEM, "out of memory");
    if (rc == TP_OK) {
        path = tp_path_join(dir, "adapter_config.json", err);
        rc = path ? tp_write_file_atomic(path, ac, strlen(ac), err) : TP_ENOMEM;
        free(path);
    }
    free(ac);
    if (rc == TP_OK)
        tp_strbuf_printf(report, "adapter: %zu LoRA tensors (F32), base_model_name_or_path %s\n", n, bid);
    return rc;
}

static int check_out_dir(const tp_hf_model *base, const char *out_dir, tp_err *err) {
    char a[PATH_MAX], b[PATH_MAX];
    if (realpath(out_dir, a) && realpath(base->dir, b) && !strcmp(a, b))
        return tp_fail(err, TP_EINVAL, "%s: is the base model's directory; export elsewhere", out_dir);
    return tp_check_new_dir(out_dir, err);
}

int tp_export(const tp_hf_model *base, const tp_decoder *m, const tp_export_opts *o, const char *out_dir,
              tp_strbuf *report, tp_err *err) {
    const tp_decoder_opts *d = tp_decoder_options(m);
    if (o->format == TP_EXPORT_PEFT && d->trainable != TP_TRAIN_LORA)
        return tp_fail(err, TP_EINVAL, "export: --format peft: this checkpoint trains %s (no LoRA adapter); use "
                       "--format merged", tp_trainable_name(d->trainable));
    if (o->format != TP_EXPORT_TITAN && d->liza.enabled && !o->drop_liza)
        return tp_fail(err, TP_EINVAL, "export: --format %s would drop this checkpoint's LiZA branch and MaG (the "
                       "Titan is not a plain %s model); use --format titan, or --drop-liza to export the base+LoRA "
                       "part alone", o->format == TP_EXPORT_PEFT ? "peft" : "merged",
                       o->format == TP_EXPORT_PEFT ? "PEFT" : "Hugging Face");
    if (o->format == TP_EXPORT_TITAN && !d->liza.enabled)
        return tp_fail(err, TP_EINVAL, "export: --format titan: this checkpoint has no LiZA branch; use --format "
                       "merged");
    int rc = check_out_dir(base, out_dir, err);
    if (rc) return rc;
    tp_dtype dt = TP_F32;
    if (o->dtype >= 0) dt = (tp_dtype)o->dtype;
    else
        for (size_t i = 0; i < base->nweights; i++)
            if (base->desc[i].ndim == 2) { dt = base->views[i]->dtype; break; }
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp-export-%d", out_dir, (int)getpid()) >= (int)sizeof tmp)
        return tp_fail(err, TP_EINVAL, "%s: path too long", out_dir);
    rm_tree(tmp);
    if ((rc = tp_mkdir_p(tmp, err))) return rc;
    wsrc *w = tp_calloc(base->nweights, sizeof *w, err);
    if (!w) rc = TP_ENOMEM;
    else bind_sources(base, m, w);
    if (rc == TP_OK && o->format == TP_EXPORT_PEFT) {
        rc = write_peft(base, m, o, tmp, report, err);
    } else if (rc == TP_OK) {
        rc = write_weights(base, m, w, dt, o->format == TP_EXPORT_TITAN, o->shard_bytes ? o->shard_bytes
                           : UINT64_C(5000000000), tmp, report, err);
        cJSON *c = NULL;
        if (rc == TP_OK) rc = base_config(base, &c, err);
        if (rc == TP_OK) {
            set_item(c, "torch_dtype", cJSON_CreateString(dtype_torch(dt)));
            if (o->format == TP_EXPORT_TITAN) titan_fields(c, base, m, o);
            rc = write_json(tmp, "config.json", c, err);
        }
        cJSON_Delete(c);
        if (rc == TP_OK) rc = copy_side_files(base, tmp, err);
        for (unsigned long f = 0; rc == TP_OK && o->format == TP_EXPORT_TITAN && f < tp_titan_nfiles; f++) {
            char *path = tp_path_join(tmp, tp_titan_files[f].name, err);
            rc = path ? tp_write_file_atomic(path, tp_titan_files[f].data, tp_titan_files[f].size, err) : TP_ENOMEM;
            free(path);
        }
        if (rc == TP_OK && o->format == TP_EXPORT_TITAN)
            tp_strbuf_printf(report, "modeling files: %lu (export/titan), model_type tptt_titan, μ %s\n",
                             tp_titan_nfiles, d->mag.mode == TP_MAG_LEARNABLE ? "learnable (per-layer logits)" : "fixed");
    }
    if (rc == TP_OK && d->liza.enabled && o->format != TP_EXPORT_TITAN)
        tp_strbuf_printf(report, "dropped: the LiZA branch (%s, order %d) and MaG (%s); this export is the base + "
                         "LoRA part only, not the trained Titan\n",
                         d->liza.preset[0] ? d->liza.preset : "custom", d->liza.order,
                         d->mag.mode == TP_MAG_LEARNABLE ? "learnable" : "scheduled");
    if (rc == TP_OK) rc = tp_fsync_dir(tmp, err);
    if (rc == TP_OK) {
        rmdir(out_dir); /* an empty directory may stand where the export goes */
        rc = tp_rename_synced(tmp, out_dir, err);
    }
    if (rc) rm_tree(tmp);
    free(w);
    return rc;
}

int tp_export_remove_stale(const char *out_dir) {
    char dir[PATH_MAX], prefix[PATH_MAX];
    const char *slash = strrchr(out_dir, '/');
    if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - out_dir), out_dir);
    else snprintf(dir, sizeof dir, ".");
    if (!dir[0]) snprintf(dir, sizeof dir, "/");
    if (snprintf(prefix, sizeof prefix, "%s.tmp-export-", slash ? slash + 1 : out_dir) >= (int)sizeof prefix) return -1;
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix))) continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= (int)sizeof p) continue;
        if (rm_tree(p) == 0) n++;
    }
    closedir(d);
    return n;
}

int tp_export_model(const tp_hf_model *base, tp_decoder *m, const char *out_dir, tp_err *err) {
    tp_export_opts o = {TP_EXPORT_MERGED, -1, 0, 1, NULL, 0, NULL};
    tp_strbuf rep;
    tp_strbuf_init(&rep);
    int rc = tp_export(base, m, &o, out_dir, &rep, err);
    if (rc == TP_OK && tp_decoder_options(m)->liza.enabled)
        fprintf(stderr, "tptt: notice: export.model_dir holds the base + LoRA only (LiZA and MaG dropped); "
                        "`tptt export CKPT --format titan` writes the Titan\n");
    tp_strbuf_free(&rep);
    return rc;
}
