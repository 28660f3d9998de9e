/* cmd_adapter.c - `tptt adapter resize | convert-pissa`: LoRA rank surgery on
 * the ScaLAPACK SVD (src/linalg/svd.h, docs/linalg.md).
 *
 * Input: a checkpoint step-* directory (its MANIFEST is verified), a run
 * directory (its newest complete checkpoint) or a PEFT adapter directory
 * (adapter_model.safetensors + adapter_config.json, e.g. `tptt export
 * --format peft`). Output: a PEFT adapter directory written crash-safely
 * (a temporary directory renamed into place), by rank 0; every rank of an
 * mpirun shares the SVDs. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <dirent.h>

#include "cli/cli.h"
#include "dist/dist.h"
#include "io/safetensors.h"
#include "linalg/svd.h"
#include "train/checkpoint.h"
#include "util/fsutil.h"
#include "util/jsonint.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt adapter resize CKPT --rank R --out DIR [--alpha A] [--block N]\n"
            "       tptt adapter convert-pissa CKPT [--initial INIT] --out DIR [--rank R] [--block N]\n"
            "\n"
            "CKPT is a checkpoint step-* directory, a run directory (newest complete checkpoint) or a PEFT\n"
            "adapter directory. Run under mpirun to share the SVDs over ranks (ScaLAPACK).\n"
            "\n"
            "  resize         SVD of each module's s*B*A, keep the top R components: a rank-R PEFT adapter.\n"
            "                 lora_alpha is chosen so the LoRA scale s stays the same (alpha' = s*R, or\n"
            "                 s*sqrt(R) with use_rslora) unless --alpha is given; the kept Frobenius energy\n"
            "                 of every module is printed and written to DIR/resize_report.json.\n"
            "                 R >= the adapter's rank reproduces s*B*A (zero components pad above min(r, in, out)).\n"
            "  convert-pissa  a PiSSA-trained adapter as a plain LoRA on the ORIGINAL base: dW = s*(B*A - B0*A0)\n"
            "                 with A0, B0 the PiSSA initialisation in INIT (an adapter directory; default: the\n"
            "                 run's pissa-init, kept by the trainer beside its pissa-base), as PEFT\n"
            "                 does: rank 2r, A' = [A; -A0], B' = [B, B0], lora_alpha doubled (x sqrt(2) with\n"
            "                 use_rslora) so s stays; with --rank R the result is truncated to rank R by SVD.\n"
            "  --block N      ScaLAPACK block size (default 64)\n");
}

typedef struct lmod {
    char *prefix; /* tensor name without ".lora_A.weight" */
    int64_t r, in, out;
    float *A, *B;
} lmod;

typedef struct adapter {
    char dir[PATH_MAX];
    cJSON *cfg;
    int r, rslora;
    double alpha, scale;
    lmod *mods;
    size_t n;
} adapter;

static void adapter_free(adapter *a) {
    for (size_t i = 0; i < a->n; i++) {
        free(a->mods[i].prefix);
        free(a->mods[i].A);
        free(a->mods[i].B);
    }
    free(a->mods);
    cJSON_Delete(a->cfg);
    memset(a, 0, sizeof *a);
}

static int has_file(const char *dir, const char *name) {
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return tp_exists(p);
}

/* The adapter directory a CKPT argument names. */
static int resolve(const char *path, char *out, size_t n, tp_err *err) {
    if (has_file(path, "adapter_model.safetensors")) {
        if (has_file(path, "MANIFEST")) {
            int rc = tp_ckpt_verify(path, err);
            if (rc) return rc;
        }
        snprintf(out, n, "%s", path);
        return TP_OK;
    }
    if (has_file(path, "checkpoints")) return tp_ckpt_find_latest(path, out, n, err);
    return tp_fail(err, TP_EINVAL, "%s: no adapter_model.safetensors here (expected a checkpoint step-* directory, "
                   "a run directory or a PEFT adapter directory)", path);
}

static const char SUF_A[] = ".lora_A.weight", SUF_B[] = ".lora_B.weight";

static int load_adapter(const char *path, adapter *a, tp_err *err) {
    memset(a, 0, sizeof *a);
    int rc = resolve(path, a->dir, sizeof a->dir, err);
    if (rc) return rc;
    char cpath[PATH_MAX + 32], spath[PATH_MAX + 32];
    snprintf(cpath, sizeof cpath, "%s/adapter_config.json", a->dir);
    snprintf(spath, sizeof spath, "%s/adapter_model.safetensors", a->dir);
    char *text = NULL;
    size_t len = 0;
    rc = tp_read_file(cpath, 1 << 24, &text, &len, err);
    if (rc) return rc;
    a->cfg = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(a->cfg)) return tp_fail(err, TP_EFORMAT, "%s: not a JSON object", cpath);
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(a->cfg, "r"),
                *al = cJSON_GetObjectItemCaseSensitive(a->cfg, "lora_alpha"),
                *rs = cJSON_GetObjectItemCaseSensitive(a->cfg, "use_rslora"),
                *pt = cJSON_GetObjectItemCaseSensitive(a->cfg, "peft_type");
    if (pt && !(cJSON_IsString(pt) && !strcmp(pt->valuestring, "LORA")))
        return tp_fail(err, TP_EUNSUP, "%s: field \"peft_type\": expected \"LORA\"", cpath);
    int64_t rank = 0;
    if (!tp_json_int(r, 1, 65536, &rank))
        return tp_fail(err, TP_EFORMAT, "%s: field \"r\": expected a positive integer", cpath);
    if (!cJSON_IsNumber(al) || !isfinite(al->valuedouble) || al->valuedouble == 0)
        return tp_fail(err, TP_EFORMAT, "%s: field \"lora_alpha\": expected a non-zero number", cpath);
    for (int k = 0; k < 2; k++) {
        const char *key = k ? "alpha_pattern" : "rank_pattern";
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(a->cfg, key);
        if (p && !cJSON_IsNull(p) && !(cJSON_IsObject(p) && !p->child))
            return tp_fail(err, TP_EUNSUP, "%s: field \"%s\": per-module ranks/alphas are not supported", cpath, key);
    }
    a->r = (int)rank;
    a->alpha = al->valuedouble;
    a->rslora = cJSON_IsTrue(rs);
    a->scale = a->rslora ? a->alpha / sqrt(a->r) : a->alpha / a->r;

    tp_st_file *f = NULL;
    rc = tp_st_open(spath, &f, err);
    if (rc) return rc;
    size_t nt = tp_st_count(f);
    a->mods = tp_calloc(nt ? nt : 1, sizeof *a->mods, err);
    if (!a->mods) rc = TP_ENOMEM;
    for (size_t i = 0; rc == TP_OK && i < nt; i++) {
        const tp_tensor_view *va = tp_st_at(f, i);
        size_t ln = strlen(va->name), ls = sizeof SUF_A - 1;
        if (ln > ls && !strcmp(va->name + ln - ls, SUF_B)) continue;
        if (ln <= ls || strcmp(va->name + ln - ls, SUF_A)) {
            rc = tp_fail(err, TP_EUNSUP, "%s: tensor '%s' is not a LoRA A/B matrix (only lora_A/lora_B weights are "
                         "supported)", spath, va->name);
            break;
        }
        lmod *m = &a->mods[a->n];
        m->prefix = tp_calloc(ln - ls + 1, 1, err);
        char *bname = tp_calloc(ln + 1, 1, err);
        if (!m->prefix || !bname) { free(bname); rc = TP_ENOMEM; break; }
        memcpy(m->prefix, va->name, ln - ls);
        a->n++;
        snprintf(bname, ln + 1, "%s%s", m->prefix, SUF_B);
        const tp_tensor_view *vb = tp_st_find(f, bname);
        free(bname);
        if (!vb) {
            rc = tp_fail(err, TP_EFORMAT, "%s: tensor '%s' has no matching '%s%s'", spath, va->name, m->prefix, SUF_B);
            break;
        }
        if (va->ndim != 2 || vb->ndim != 2 || va->shape[0] != a->r || vb->shape[1] != a->r) {
            rc = tp_fail(err, TP_EFORMAT, "%s: module '%s': lora_A %s[%lld, %lld], lora_B %s[%lld, %lld]: expected "
                         "[r, in] and [out, r] with r = %d (adapter_config.json)", spath, m->prefix,
                         va->ndim == 2 ? "" : "(not 2-D) ", (long long)va->shape[0], (long long)va->shape[1],
                         vb->ndim == 2 ? "" : "(not 2-D) ", (long long)vb->shape[0], (long long)vb->shape[1], a->r);
            break;
        }
        m->r = a->r;
        m->in = va->shape[1];
        m->out = vb->shape[0];
        m->A = tp_malloc(sizeof(float) * (size_t)(m->r * m->in + 1), err);
        m->B = tp_malloc(sizeof(float) * (size_t)(m->out * m->r + 1), err);
        if (!m->A || !m->B) { rc = TP_ENOMEM; break; }
        tp_to_f32(m->A, va->data, va->dtype, (size_t)va->numel);
        tp_to_f32(m->B, vb->data, vb->dtype, (size_t)vb->numel);
    }
    if (rc == TP_OK && a->n == 0) rc = tp_fail(err, TP_EFORMAT, "%s: holds no lora_A/lora_B tensors", spath);
    tp_st_close(f);
    return rc;
}


/* Write the adapter (new A/B per module, rank R, alpha) and an optional report into out_dir. */
static int write_adapter(const adapter *src, float *const *As, float *const *Bs, int R, double alpha,
                         const char *report, const char *out_dir, tp_err *err) {
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp-%ld", out_dir, (long)getpid());
    int rc = tp_mkdir_p(tmp, err);
    if (rc) return rc;
    size_t n = src->n;
    tp_st_spec *specs = tp_calloc(2 * n, sizeof *specs, err);
    const void **data = tp_calloc(2 * n, sizeof *data, err);
    char **names = tp_calloc(2 * n, sizeof *names, err);
    if (!specs || !data || !names) rc = TP_ENOMEM;
    for (size_t i = 0; rc == TP_OK && i < n; i++) {
        const lmod *m = &src->mods[i];
        size_t l = strlen(m->prefix) + sizeof SUF_A;
        names[2 * i] = tp_malloc(l, err);
        names[2 * i + 1] = tp_malloc(l, err);
        if (!names[2 * i] || !names[2 * i + 1]) { rc = TP_ENOMEM; break; }
        snprintf(names[2 * i], l, "%s%s", m->prefix, SUF_A);
        snprintf(names[2 * i + 1], l, "%s%s", m->prefix, SUF_B);
        specs[2 * i] = (tp_st_spec){names[2 * i], TP_F32, 2, {R, m->in}};
        specs[2 * i + 1] = (tp_st_spec){names[2 * i + 1], TP_F32, 2, {m->out, R}};
        data[2 * i] = As[i];
        data[2 * i + 1] = Bs[i];
    }
    char path[PATH_MAX + 64];
    if (rc == TP_OK) {
        tp_kv meta = {"format", "pt"};
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", tmp);
        rc = tp_st_write(path, specs, data, 2 * n, &meta, 1, err);
    }
    if (rc == TP_OK) {
        cJSON *c = cJSON_Duplicate(src->cfg, 1);
        char *s = NULL;
        if (c) {
            cJSON_ReplaceItemInObjectCaseSensitive(c, "r", cJSON_CreateNumber(R));
            cJSON_ReplaceItemInObjectCaseSensitive(c, "lora_alpha", cJSON_CreateNumber(alpha));
            s = cJSON_Print(c);
            cJSON_Delete(c);
        }
        if (!s) rc = tp_fail(err, TP_ENOMEM, "out of memory");
        snprintf(path, sizeof path, "%s/adapter_config.json", tmp);
        if (rc == TP_OK) rc = tp_write_file_atomic(path, s, strlen(s), err);
        free(s);
    }
    if (rc == TP_OK && report) {
        snprintf(path, sizeof path, "%s/resize_report.json", tmp);
        rc = tp_write_file_atomic(path, report, strlen(report), err);
    }
    if (rc == TP_OK && tp_exists(out_dir) && rmdir(out_dir) != 0)
        rc = tp_fail(err, TP_EIO, "%s: cannot replace: %s", out_dir, strerror(errno));
    if (rc == TP_OK) rc = tp_rename_synced(tmp, out_dir, err);
    if (rc != TP_OK) {
        const char *files[] = {"adapter_model.safetensors", "adapter_config.json", "resize_report.json"};
        for (size_t i = 0; i < 3; i++) {
            snprintf(path, sizeof path, "%s/%s", tmp, files[i]);
            unlink(path);
        }
        rmdir(tmp);
    }
    for (size_t i = 0; names && i < 2 * n; i++) free(names[i]);
    free(names);
    free(specs);
    free(data);
    return rc;
}

/* Truncate every module of (a, with factors As/Bs of rank r) to rank R at scale s_new; energies
 * into the report; results into A2/B2 (allocated). */
static int truncate_all(tp_la *la, const adapter *a, float *const *As, float *const *Bs, int64_t r, double scale,
                        int R, double s_new, float **A2, float **B2, cJSON *mods, double *tot_kept, double *tot_all,
                        const tp_dist *d, tp_err *err) {
    int rc = TP_OK;
    for (size_t i = 0; rc == TP_OK && i < a->n; i++) {
        const lmod *m = &a->mods[i];
        int64_t k = r < m->in ? r : m->in;
        if (m->out < k) k = m->out;
        A2[i] = tp_calloc((size_t)R * m->in, sizeof(float), err);
        B2[i] = tp_calloc((size_t)m->out * R, sizeof(float), err);
        double *sv = tp_calloc((size_t)k, sizeof(double), err), energy = 0;
        rc = tp_dist_agree(d, A2[i] && B2[i] && sv ? TP_OK : tp_fail(err, TP_ENOMEM, "out of memory"), err);
        if (rc == TP_OK)
            rc = tp_lora_truncate(la, As[i], Bs[i], r, m->in, m->out, scale, R, s_new, A2[i], B2[i], &energy, sv,
                                  m->prefix, err);
        if (rc == TP_OK) {
            double all = 0, kept = 0;
            for (int64_t j = 0; j < k; j++) {
                all += sv[j] * sv[j];
                if (j < R) kept += sv[j] * sv[j];
            }
            *tot_all += all;
            *tot_kept += kept;
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "module", m->prefix);
            cJSON *sh = cJSON_AddArrayToObject(o, "shape");
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)m->out));
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)m->in));
            cJSON_AddNumberToObject(o, "energy", energy);
            cJSON_AddNumberToObject(o, "frobenius_norm", sqrt(all));
            cJSON *svs = cJSON_AddArrayToObject(o, "singular_values");
            for (int64_t j = 0; j < k; j++) cJSON_AddItemToArray(svs, cJSON_CreateNumber(sv[j]));
            cJSON_AddItemToArray(mods, o);
        }
        free(sv);
    }
    return rc;
}

static int run_cmd(int convert, const char *ckpt, const char *init, const char *out_dir, int R, double alpha_opt,
                   int block, const tp_dist *d, tp_err *err) {
    adapter a = {0}, a0 = {0};
    tp_la *la = NULL;
    float **As = NULL, **Bs = NULL, **A2 = NULL, **B2 = NULL;
    cJSON *rep = NULL;
    char *report = NULL;
    int rc = load_adapter(ckpt, &a, err);
    char found[PATH_MAX + 16];
    if (rc == TP_OK && convert && !init) {
        /* a PiSSA run's adapter names run.dir/pissa-base as its base; the
         * trainer kept the initial adapter beside it, run.dir/pissa-init */
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(a.cfg, "base_model_name_or_path");
        const char *bp = cJSON_IsString(b) ? b->valuestring : "";
        size_t bl = strlen(bp);
        if (bl > 11 && !strcmp(bp + bl - 11, "/pissa-base") && bl - 11 < PATH_MAX) {
            snprintf(found, sizeof found, "%.*s/pissa-init", (int)(bl - 11), bp);
            init = found;
        }
        if (!init || !has_file(init, "adapter_model.safetensors"))
            rc = tp_fail(err, TP_EINVAL, "%s: no PiSSA initial adapter found (its base is '%s', not a run's "
                         "pissa-base with pissa-init beside it); give --initial INIT", a.dir, bp);
        else if (d->rank == 0)
            fprintf(stderr, "tptt: adapter convert-pissa: initial adapter %s\n", init);
    }
    if (rc == TP_OK && convert) {
        rc = load_adapter(init, &a0, err);
        if (rc == TP_OK && (a0.n != a.n || a0.r != a.r || fabs(a0.scale - a.scale) > 1e-12 * fabs(a.scale)))
            rc = tp_fail(err, TP_EINVAL, "%s: initial adapter has %zu modules, rank %d, scale %g; the trained one "
                         "%zu, %d, %g: not its PiSSA initialisation", a0.dir, a0.n, a0.r, a0.scale, a.n, a.r, a.scale);
        for (size_t i = 0; rc == TP_OK && i < a.n; i++)
            if (strcmp(a.mods[i].prefix, a0.mods[i].prefix) || a.mods[i].in != a0.mods[i].in ||
                a.mods[i].out != a0.mods[i].out)
                rc = tp_fail(err, TP_EINVAL, "%s: module %zu is '%s' [%lld, %lld]; the trained adapter's is '%s' "
                             "[%lld, %lld]", a0.dir, i, a0.mods[i].prefix, (long long)a0.mods[i].out,
                             (long long)a0.mods[i].in, a.mods[i].prefix, (long long)a.mods[i].out,
                             (long long)a.mods[i].in);
    }
    if (rc == TP_OK && !convert && R < 1) rc = tp_fail(err, TP_EINVAL, "adapter resize: --rank is required");
    if ((rc = tp_dist_agree(d, rc, err)) != TP_OK) goto out;
    size_t n = a.n;
    As = tp_calloc(n, sizeof *As, err);
    Bs = tp_calloc(n, sizeof *Bs, err);
    A2 = tp_calloc(n, sizeof *A2, err);
    B2 = tp_calloc(n, sizeof *B2, err);
    rc = As && Bs && A2 && B2 ? TP_OK : TP_ENOMEM;
    int64_t r = a.r;
    double scale = a.scale, alpha_new;
    if (convert) {
        /* ΔW = s·(B·A − B0·A0) = s·[B, B0]·[A; −A0]: rank 2r, the same scale */
        r = 2 * (int64_t)a.r;
        for (size_t i = 0; rc == TP_OK && i < n; i++) {
            const lmod *m = &a.mods[i], *m0 = &a0.mods[i];
            As[i] = tp_malloc(sizeof(float) * (size_t)(r * m->in), err);
            Bs[i] = tp_malloc(sizeof(float) * (size_t)(m->out * r), err);
            if (!As[i] || !Bs[i]) { rc = TP_ENOMEM; break; }
            memcpy(As[i], m->A, sizeof(float) * (size_t)(a.r * m->in));
            for (int64_t j = 0; j < a.r * m->in; j++) As[i][a.r * m->in + j] = -m0->A[j];
            for (int64_t o = 0; o < m->out; o++) {
                memcpy(Bs[i] + o * r, m->B + o * a.r, sizeof(float) * (size_t)a.r);
                memcpy(Bs[i] + o * r + a.r, m0->B + o * a.r, sizeof(float) * (size_t)a.r);
            }
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            As[i] = a.mods[i].A;
            Bs[i] = a.mods[i].B;
        }
    }
    if ((rc = tp_dist_agree(d, rc, err)) != TP_OK) goto out;
    int Rout = convert && R < 1 ? (int)r : R;
    /* the new alpha keeps the scale: s = alpha'/R (alpha'/sqrt(R) with rslora) */
    alpha_new = alpha_opt != 0 ? alpha_opt : (a.rslora ? scale * sqrt((double)Rout) : scale * Rout);
    double s_new = a.rslora ? alpha_new / sqrt((double)Rout) : alpha_new / Rout;
    if (convert && R < 1) {
        /* PEFT's conversion: the concatenated factors as they are */
        for (size_t i = 0; i < n; i++) {
            A2[i] = As[i];
            B2[i] = Bs[i];
            As[i] = Bs[i] = NULL;
        }
        if (d->rank == 0) rc = write_adapter(&a, A2, B2, Rout, alpha_new, NULL, out_dir, err);
        rc = tp_dist_agree(d, rc, err);
        if (rc == TP_OK && d->rank == 0)
            printf("tptt: adapter convert-pissa: %zu modules, rank %d -> %d (dW = s*(B*A - B0*A0)), lora_alpha %g -> "
                   "%g (scale %g), written to %s\n", n, a.r, Rout, a.alpha, alpha_new, s_new, out_dir);
        goto out;
    }
    rc = tp_la_create(block, &la, err);
    if (rc) goto out;
    rep = cJSON_CreateObject();
    cJSON *mods = cJSON_CreateArray();
    double kept = 0, all = 0;
    rc = truncate_all(la, &a, As, Bs, r, scale, Rout, s_new, A2, B2, mods, &kept, &all, d, err);
    int np, pr, pc;
    tp_la_info(la, &np, &pr, &pc, NULL);
    if (rc == TP_OK) {
        cJSON_AddStringToObject(rep, "source", a.dir);
        if (convert) cJSON_AddStringToObject(rep, "initial", a0.dir);
        cJSON_AddStringToObject(rep, "operation", convert ? "convert-pissa" : "resize");
        cJSON_AddNumberToObject(rep, "rank_from", (double)r);
        cJSON_AddNumberToObject(rep, "rank_to", Rout);
        cJSON_AddNumberToObject(rep, "lora_alpha_from", a.alpha);
        cJSON_AddNumberToObject(rep, "lora_alpha_to", alpha_new);
        cJSON_AddNumberToObject(rep, "scale_from", scale);
        cJSON_AddNumberToObject(rep, "scale_to", s_new);
        cJSON_AddBoolToObject(rep, "use_rslora", a.rslora);
        cJSON_AddNumberToObject(rep, "total_energy", all > 0 ? kept / all : 1.0);
        double mn = 1;
        for (cJSON *o = mods->child; o; o = o->next) {
            double e = cJSON_GetObjectItemCaseSensitive(o, "energy")->valuedouble;
            if (e < mn) mn = e;
        }
        cJSON_AddNumberToObject(rep, "min_energy", mn);
        cJSON_AddNumberToObject(rep, "ranks", np);
        char grid[32];
        snprintf(grid, sizeof grid, "%dx%d", pr, pc);
        cJSON_AddStringToObject(rep, "grid", grid);
        cJSON_AddItemToObject(rep, "modules", mods);
        mods = NULL;
        report = cJSON_Print(rep);
        if (!report) rc = tp_fail(err, TP_ENOMEM, "out of memory");
        if (rc == TP_OK && d->rank == 0) {
            for (cJSON *o = cJSON_GetObjectItemCaseSensitive(rep, "modules")->child; o; o = o->next)
                printf("%s energy %.6f\n", cJSON_GetObjectItemCaseSensitive(o, "module")->valuestring,
                       cJSON_GetObjectItemCaseSensitive(o, "energy")->valuedouble);
            printf("tptt: adapter %s: %zu modules, rank %lld -> %d, lora_alpha %g -> %g (scale %g -> %g), retained "
                   "energy %.6f overall, %.6f at least (%d rank%s, grid %s), written to %s\n",
                   convert ? "convert-pissa" : "resize", n, (long long)r, Rout, a.alpha, alpha_new, scale, s_new,
                   all > 0 ? kept / all : 1.0, mn, np, np == 1 ? "" : "s", grid, out_dir);
        }
    }
    cJSON_Delete(mods);
    if (rc == TP_OK && d->rank == 0) rc = write_adapter(&a, A2, B2, Rout, alpha_new, report, out_dir, err);
    rc = tp_dist_agree(d, rc, err);
out:
    for (size_t i = 0; i < a.n; i++) {
        if (convert) {
            if (As) free(As[i]);
            if (Bs) free(Bs[i]);
        }
        if (A2) free(A2[i]);
        if (B2) free(B2[i]);
    }
    free(As);
    free(Bs);
    free(A2);
    free(B2);
    free(report);
    cJSON_Delete(rep);
    tp_la_destroy(la);
    adapter_free(&a);
    adapter_free(&a0);
    return rc;
}

int tp_cmd_adapter(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    int convert = !strcmp(sub, "convert-pissa");
    if (!convert && strcmp(sub, "resize")) {
        fprintf(stderr, "tptt: adapter: unknown subcommand '%s' (expected resize or convert-pissa)\n", sub);
        return 2;
    }
    static const struct option opts[] = {{"rank", required_argument, 0, 'r'},  {"out", required_argument, 0, 'o'},
                                         {"alpha", required_argument, 0, 'a'}, {"initial", required_argument, 0, 'i'},
                                         {"block", required_argument, 0, 'b'}, {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *out = NULL, *init = NULL;
    long long R = 0, block = 0;
    double alpha = 0;
    int c;
    optind = 1;
    opterr = 0;
    argc--;
    argv++;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        char *end;
        switch (c) {
        case 'h': usage(stdout); return 0;
        case 'r':
            if (tp_cli_int(optarg, 1, 1 << 20, &R)) {
                fprintf(stderr, "tptt: adapter %s: --rank: expected a positive integer, got '%s'\n", sub, optarg);
                return 2;
            }
            break;
        case 'b':
            if (tp_cli_int(optarg, 1, 4096, &block)) {
                fprintf(stderr, "tptt: adapter %s: --block: expected an integer in 1..4096, got '%s'\n", sub, optarg);
                return 2;
            }
            break;
        case 'a':
            errno = 0;
            alpha = strtod(optarg, &end);
            if (errno || *end || !isfinite(alpha) || alpha == 0) {
                fprintf(stderr, "tptt: adapter %s: --alpha: expected a non-zero number, got '%s'\n", sub, optarg);
                return 2;
            }
            break;
        case 'o': out = optarg; break;
        case 'i': init = optarg; break;
        default:
            fprintf(stderr, "tptt: adapter %s: unknown or incomplete option '%s' (see --help)\n", sub, argv[optind - 1]);
            return 2;
        }
    }
    if (optind + 1 != argc || !out || (!convert && R < 1)) {
        fprintf(stderr, "tptt: adapter %s: %s\n", sub,
                optind + 1 != argc ? "expected one CKPT argument"
                : !out             ? "--out DIR is required"
                                   : "--rank R is required");
        usage(stderr);
        return 2;
    }
    if (convert && alpha != 0) {
        fprintf(stderr, "tptt: adapter convert-pissa: --alpha is not supported (the scale is kept)\n");
        return 2;
    }
    const char *ckpt = argv[optind];
    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    int rc = d.rank == 0 ? tp_check_new_dir(out, &err) : TP_OK;
    rc = tp_dist_agree(&d, rc, &err);
    if (rc == TP_OK) rc = run_cmd(convert, ckpt, init, out, (int)R, alpha, (int)block, &d, &err);
    tp_dist_report_failure(&d, rc, &err);
    tp_dist_finalize();
    return rc == TP_OK ? 0 : 1;
}
