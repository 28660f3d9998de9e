/* load.c - opening a model or a checkpoint for inference (load.h). */
#include "infer/load.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "train/checkpoint.h"
#include "util/fsutil.h"
#include "util/jsonint.h"
#include "util/platform.h"

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* ---- config.json of a checkpoint ------------------------------------------ */

static const cJSON *field(const cJSON *obj, const char *name) { return cJSON_GetObjectItemCaseSensitive(obj, name); }

static int want_bool(const char *path, const cJSON *obj, const char *name, int required, int *out, tp_err *err) {
    const cJSON *x = field(obj, name);
    if (!x && !required) return TP_OK;
    if (!cJSON_IsBool(x)) return tp_fail(err, TP_EFORMAT, "%s: field \"%s\": expected true or false", path, name);
    *out = cJSON_IsTrue(x);
    return TP_OK;
}

static int want_num(const char *path, const cJSON *obj, const char *name, int required, double lo, double hi,
                    double *out, tp_err *err) {
    const cJSON *x = field(obj, name);
    if (!x && !required) return TP_OK;
    if (!cJSON_IsNumber(x) || !(x->valuedouble >= lo && x->valuedouble <= hi))
        return tp_fail(err, TP_EFORMAT, "%s: field \"%s\": expected a number in [%g, %g]", path, name, lo, hi);
    *out = x->valuedouble;
    return TP_OK;
}

static int want_int(const char *path, const cJSON *obj, const char *name, int required, int64_t lo, int64_t hi,
                    int64_t *out, tp_err *err) {
    const cJSON *x = field(obj, name);
    if (!x && !required) return TP_OK;
    if (!tp_json_int(x, lo, hi, out))
        return tp_fail(err, TP_EFORMAT, "%s: field \"%s\": expected an integer in [%lld, %lld]", path, name,
                       (long long)lo, (long long)hi);
    return TP_OK;
}

static int want_enum(const char *path, const cJSON *obj, const char *name, const char *const *names, int count,
                     int *out, tp_err *err) {
    const cJSON *x = field(obj, name);
    if (cJSON_IsString(x))
        for (int i = 0; i < count; i++)
            if (!strcmp(x->valuestring, names[i])) {
                *out = i;
                return TP_OK;
            }
    char list[160] = "";
    for (int i = 0; i < count; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s\"%s\"", i ? ", " : "", names[i]);
    return tp_fail(err, TP_EFORMAT, "%s: field \"%s\": expected one of %s", path, name, list);
}

int tp_titan_parse_config(const char *path, const char *json, size_t len, tp_decoder_opts *o, int64_t *step,
                          char *base_name, size_t n, tp_err *err) {
    static const char *const gates[] = {"c", "k", "v", "kv"}, *const tricks[] = {"dt", "rot", "rdt"};
    static const char *const modes[] = {"constant", "gradual", "cyclic", "learnable"};
    static const char *const trainables[] = {"lora", "projections", "all"}, *const shapes[] = {"scalar", "vector"};
    tp_decoder_opts_default(o);
    const char *end = NULL;
    cJSON *c = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!c || !cJSON_IsObject(c)) {
        cJSON_Delete(c);
        return tp_fail(err, TP_EFORMAT, "%s: not a JSON object", path);
    }
    int rc = TP_OK, e = 0;
    int64_t i = 0;
    const cJSON *mt = field(c, "model_type");
    if (!cJSON_IsString(mt) || strcmp(mt->valuestring, "tptt"))
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"model_type\": expected \"tptt\" (a tptt checkpoint)", path);
    const cJSON *bn = field(c, "base_model_name");
    if (rc == TP_OK && (!cJSON_IsString(bn) || !bn->valuestring[0] || strlen(bn->valuestring) >= n))
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"base_model_name\": expected the base model's path", path);
    if (rc == TP_OK) snprintf(base_name, n, "%s", bn->valuestring);
    tp_liza_opts *lo = &o->liza;
    tp_mag_opts *mg = &o->mag;
    if (rc == TP_OK) rc = want_bool(path, c, "liza_enabled", 1, &lo->enabled, err);
    const cJSON *rcfg = field(c, "recurrent_config");
    if (rc == TP_OK && !cJSON_IsObject(rcfg))
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"recurrent_config\": expected an object", path);
    char rpath[TP_TITAN_PATH_MAX + 32];
    snprintf(rpath, sizeof rpath, "%s: recurrent_config", path);
    if (rc == TP_OK && (rc = want_int(rpath, rcfg, "order", 1, 1, 8, &i, err)) == TP_OK) lo->order = (int)i;
    if (rc == TP_OK && (rc = want_enum(rpath, rcfg, "alpha_gate", gates, 4, &e, err)) == TP_OK) lo->alpha_gate = e;
    if (rc == TP_OK && (rc = want_enum(rpath, rcfg, "beta_gate", gates, 4, &e, err)) == TP_OK) lo->beta_gate = e;
    if (rc == TP_OK) rc = want_bool(rpath, rcfg, "linear", 1, &lo->linear, err);
    if (rc == TP_OK && (rc = want_enum(rpath, rcfg, "trick", tricks, 3, &e, err)) == TP_OK) lo->trick = e;
    if (rc == TP_OK && (rc = want_int(path, c, "max_chunk_size", 1, 1, 4096, &i, err)) == TP_OK) lo->chunk = (int)i;
    if (rc == TP_OK) rc = want_bool(path, c, "base_scale_attn", 1, &lo->base_scale_attn, err);
    if (rc == TP_OK) {
        const char *p = tp_liza_preset_name(lo);
        snprintf(lo->preset, sizeof lo->preset, "%s", p ? p : "");
    }
    if (rc == TP_OK) rc = want_bool(path, c, "cross_gate", 1, &mg->cross_gate, err);
    if (rc == TP_OK && field(c, "mag_mode") && (rc = want_enum(path, c, "mag_mode", modes, 4, &e, err)) == TP_OK)
        mg->mode = e;
    /* μ0: "mag_mu0" where present; older checkpoints hold it in "mag_weight" */
    if (rc == TP_OK) rc = want_num(path, c, field(c, "mag_mu0") ? "mag_mu0" : "mag_weight", 1, 0, 1, &mg->mu0, err);
    if (rc == TP_OK) rc = want_num(path, c, "mag_mu1", 0, 0, 1, &mg->mu1, err);
    if (rc == TP_OK && (rc = want_int(path, c, "mag_steps", 0, 1, INT64_C(1) << 50, &mg->steps, err)) == TP_OK &&
        (rc = want_int(path, c, "mag_period", 0, 1, INT64_C(1) << 50, &mg->period, err)) == TP_OK) {
        const cJSON *vals = field(c, "mag_values");
        if (vals) {
            int nv = cJSON_IsArray(vals) ? cJSON_GetArraySize(vals) : -1;
            if (nv < 1 || nv > TP_MAG_MAX_VALUES)
                rc = tp_fail(err, TP_EFORMAT, "%s: field \"mag_values\": expected 1 to %d numbers in [0, 1]", path,
                             TP_MAG_MAX_VALUES);
            for (int k = 0; rc == TP_OK && k < nv; k++) {
                const cJSON *v = cJSON_GetArrayItem(vals, k);
                if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= 1))
                    rc = tp_fail(err, TP_EFORMAT, "%s: field \"mag_values\"[%d]: expected a number in [0, 1]", path, k);
                else mg->values[k] = v->valuedouble;
            }
            if (rc == TP_OK) mg->nvalues = nv;
        }
    }
    if (rc == TP_OK && field(c, "mag_learnable_shape") &&
        (rc = want_enum(path, c, "mag_learnable_shape", shapes, 2, &e, err)) == TP_OK)
        mg->vector = e;
    *step = 0;
    if (rc == TP_OK) rc = want_int(path, c, "mag_step", 0, 0, INT64_C(1) << 50, step, err);
    if (rc == TP_OK && (rc = want_enum(path, c, "trainable", trainables, 3, &e, err)) == TP_OK)
        o->trainable = (tp_trainable)e;
    const cJSON *lc = field(c, "lora_config");
    if (rc == TP_OK && !cJSON_IsObject(lc))
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"lora_config\": expected an object", path);
    snprintf(rpath, sizeof rpath, "%s: lora_config", path);
    if (rc == TP_OK && (rc = want_int(rpath, lc, "r", 1, 1, 65536, &i, err)) == TP_OK) o->lora.r = (int)i;
    if (rc == TP_OK) rc = want_num(rpath, lc, "lora_alpha", 1, 1e-30, 1e30, &o->lora.alpha, err);
    if (rc == TP_OK) rc = want_bool(rpath, lc, "use_rslora", 0, &o->lora.rslora, err);
    if (rc == TP_OK) {
        const cJSON *t = field(lc, "target_modules"), *s;
        unsigned mask = 0;
        if (!cJSON_IsArray(t) || cJSON_GetArraySize(t) < 1)
            rc = tp_fail(err, TP_EFORMAT, "%s: field \"target_modules\": expected a list of module names", rpath);
        cJSON_ArrayForEach(s, t) {
            if (rc) break;
            int found = -1;
            for (int m = 0; m < TP_NMOD && cJSON_IsString(s); m++)
                if (!strcmp(s->valuestring, tp_module_names[m])) found = m;
            if (found < 0)
                rc = tp_fail(err, TP_EFORMAT,
                             "%s: field \"target_modules\": expected q_proj, k_proj, v_proj, o_proj, gate_proj, "
                             "up_proj or down_proj", rpath);
            else mask |= 1u << found;
        }
        if (rc == TP_OK) o->lora.targets = mask;
    }
    cJSON_Delete(c);
    o->inference = 1;
    return rc;
}

/* ---- finding things ------------------------------------------------------- */

/* base_model_name: absolute, or relative to the current directory, or to a
 * directory above the checkpoint (runs are often started from a project
 * root that holds both). */
static int resolve_base(const char *cfg_path, const char *name, const char *ckpt_dir, char *out, size_t n,
                        tp_err *err) {
    if (name[0] == '/' || is_dir(name)) {
        if (!is_dir(name))
            return tp_fail(err, TP_EIO, "%s: base_model_name '%s' is not a directory; pass --model BASE_DIR", cfg_path,
                           name);
        snprintf(out, n, "%s", name);
        return TP_OK;
    }
    char up[TP_TITAN_PATH_MAX];
    snprintf(up, sizeof up, "%s", ckpt_dir);
    for (int depth = 0; depth < 16; depth++) {
        char *slash = strrchr(up, '/');
        if (!slash) break;
        *slash = 0;
        char cand[2 * TP_TITAN_PATH_MAX + 2];
        snprintf(cand, sizeof cand, "%s/%s", up[0] ? up : "", name);
        if (is_dir(cand) && strlen(cand) < n) {
            snprintf(out, n, "%s", cand);
            return TP_OK;
        }
    }
    return tp_fail(err, TP_EIO,
                   "%s: base_model_name '%s' not found (relative to the current directory or a directory above the "
                   "checkpoint); pass --model BASE_DIR",
                   cfg_path, name);
}

void tp_titan_free(tp_titan *t) {
    if (!t) return;
    tp_decoder_destroy(t->dec);
    tp_hf_close(t->hf);
    free(t);
}

tp_mm_backend tp_titan_pick_matmul(const tp_hf_model *hf, int want) {
    if (want == TP_LOAD_MATMUL_F32) return TP_MM_F32;
    if (want == TP_LOAD_MATMUL_BF16) return TP_MM_BF16;
    tp_cpu_features cpu;
    tp_cpu_detect(&cpu);
    int all_bf16 = 1;
    for (size_t i = 0; i < hf->nweights; i++)
        if (hf->desc[i].ndim == 2) all_bf16 &= hf->views[i]->dtype == TP_BF16;
    return all_bf16 && cpu.avx512_bf16 ? TP_MM_BF16 : TP_MM_F32;
}

static int open_plain(tp_titan *t, const char *dir, int matmul, tp_err *err) {
    if (strlen(dir) >= sizeof t->base_dir) return tp_fail(err, TP_EINVAL, "%s: path too long", dir);
    snprintf(t->base_dir, sizeof t->base_dir, "%s", dir);
    int rc = tp_hf_open(dir, &t->hf, err);
    if (rc) return rc;
    tp_decoder_opts o;
    tp_decoder_opts_default(&o);
    o.inference = 1;
    o.matmul = tp_titan_pick_matmul(t->hf, matmul);
    rc = tp_decoder_create(t->hf, &o, &t->dec, err);
    if (rc == TP_OK)
        snprintf(t->desc, sizeof t->desc, "%s model %s (no LiZA, no adapter)", tp_arch_class(t->hf->cfg.arch), dir);
    return rc;
}

/* json/len: the checkpoint's config.json, already read by the caller (only
 * its model_type was looked at); its fields are used once MANIFEST verifies */
static int open_checkpoint(tp_titan *t, const char *ck, const char *json, size_t len, const char *model_override,
                           int matmul, tp_err *err) {
    snprintf(t->ckpt_dir, sizeof t->ckpt_dir, "%s", ck);
    char *cfg_path = tp_path_join(ck, "config.json", err);
    if (!cfg_path) return TP_ENOMEM;
    int rc = tp_ckpt_verify(ck, err);
    tp_decoder_opts o;
    char base_name[TP_TITAN_PATH_MAX];
    if (rc == TP_OK) rc = tp_titan_parse_config(cfg_path, json, len, &o, &t->step, base_name, sizeof base_name, err);
    /* the directory name carries the step too: they must agree */
    const char *leaf = strrchr(ck, '/');
    leaf = leaf ? leaf + 1 : ck;
    long long named;
    char tail;
    if (rc == TP_OK && sscanf(leaf, "step-%lld%c", &named, &tail) == 1 && named != t->step)
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"mag_step\" is %lld but the directory is %s", cfg_path,
                     (long long)t->step, leaf);
    if (rc == TP_OK) {
        if (model_override) {
            if (strlen(model_override) >= sizeof t->base_dir) rc = tp_fail(err, TP_EINVAL, "--model: path too long");
            else snprintf(t->base_dir, sizeof t->base_dir, "%s", model_override);
        } else {
            rc = resolve_base(cfg_path, base_name, ck, t->base_dir, sizeof t->base_dir, err);
        }
    }
    if (rc == TP_OK) rc = tp_hf_open(t->base_dir, &t->hf, err);
    if (rc == TP_OK) {
        o.matmul = tp_titan_pick_matmul(t->hf, matmul);
        rc = tp_decoder_create(t->hf, &o, &t->dec, err);
        if (rc) tp_err_prefix(err, "%s", cfg_path);
    }
    if (rc == TP_OK) {
        tp_decoder_set_step(t->dec, t->step);
        rc = tp_ckpt_load(ck, t->dec, NULL, NULL, NULL, err);
        if (rc) tp_err_prefix(err, "checkpoint does not fit base %s", t->base_dir);
    }
    /* a diverged checkpoint must not generate quietly */
    for (size_t i = 0; rc == TP_OK && i < tp_decoder_nparams(t->dec); i++) {
        const tp_param *p = tp_decoder_param(t->dec, i);
        const float *v = tp_decoder_theta(t->dec) + p->offset;
        for (size_t e = 0; e < p->numel; e++)
            if (!isfinite(v[e])) {
                rc = tp_fail(err, TP_EFORMAT, "%s: tensor %s holds a non-finite value (element %zu); the run diverged",
                             ck, p->name, e);
                break;
            }
    }
    if (rc == TP_OK) {
        const tp_liza_opts *lo = &o.liza;
        char mu[64];
        if (o.mag.mode == TP_MAG_LEARNABLE) snprintf(mu, sizeof mu, "learnable %s", o.mag.vector ? "vector" : "scalar");
        else snprintf(mu, sizeof mu, "%g", tp_mag_mu(&o.mag, t->step));
        if (lo->enabled)
            snprintf(t->desc, sizeof t->desc, "checkpoint %s (step %lld) on %s: LiZA %s order %d, chunk %d, mu %s%s", ck,
                     (long long)t->step, t->base_dir, lo->preset[0] ? lo->preset : "custom", lo->order, lo->chunk, mu,
                     o.mag.cross_gate ? ", cross gate" : "");
        else
            snprintf(t->desc, sizeof t->desc, "checkpoint %s (step %lld) on %s: %s, no LiZA", ck, (long long)t->step,
                     t->base_dir, tp_trainable_name(o.trainable));
    }
    free(cfg_path);
    return rc;
}

int tp_titan_load(const tp_load_opts *o, tp_titan **out, tp_err *err) {
    *out = NULL;
    if (!o->model && !o->checkpoint) return tp_fail(err, TP_EINVAL, "give --model DIR or --checkpoint DIR");
    tp_titan *t = tp_calloc(1, sizeof *t, err);
    if (!t) return TP_ENOMEM;
    int rc;
    if (!o->checkpoint) {
        rc = open_plain(t, o->model, o->matmul, err);
    } else {
        const char *ck = o->checkpoint;
        char found[TP_TITAN_PATH_MAX];
        char *cks = tp_path_join(ck, "checkpoints", err), *cfg = tp_path_join(ck, "config.json", err);
        rc = cks && cfg ? TP_OK : TP_ENOMEM;
        if (rc == TP_OK && !is_dir(ck))
            rc = tp_fail(err, TP_EIO, "%s: no such checkpoint or run directory", ck);
        if (rc == TP_OK && is_dir(cks)) { /* a run directory: its newest complete checkpoint */
            rc = tp_ckpt_find_latest(ck, found, sizeof found, err);
            if (rc == TP_OK && err->msg[0]) fprintf(stderr, "tptt: warning: %s\n", err->msg);
            if (rc == TP_OK) err->msg[0] = 0;
            ck = found;
        } else if (rc == TP_OK && !tp_exists(cfg)) {
            rc = tp_fail(err, TP_EIO, "%s: not a checkpoint (no config.json) nor a run directory (no checkpoints/)", ck);
        }
        free(cks);
        free(cfg);
        if (rc == TP_OK) {
            /* a Hugging Face model directory (e.g. a merged export) loads as a plain model */
            char *cp = tp_path_join(ck, "config.json", err), *json = NULL;
            size_t len = 0;
            rc = cp ? tp_read_file(cp, 1u << 20, &json, &len, err) : TP_ENOMEM;
            int titan = 0;
            if (rc == TP_OK) {
                cJSON *j = cJSON_ParseWithLength(json, len);
                const cJSON *mt = j ? cJSON_GetObjectItemCaseSensitive(j, "model_type") : NULL;
                titan = cJSON_IsString(mt) && !strcmp(mt->valuestring, "tptt");
                cJSON_Delete(j);
            }
            if (rc == TP_OK)
                rc = titan ? open_checkpoint(t, ck, json, len, o->model, o->matmul, err) : open_plain(t, ck, o->matmul, err);
            free(json);
            free(cp);
        }
    }
    if (rc) {
        tp_titan_free(t);
        return rc;
    }
    *out = t;
    return TP_OK;
}
