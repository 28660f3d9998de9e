#include "model/init_model.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "util/fsutil.h"
#include "util/rng.h"

void tp_init_opts_default(tp_init_opts *o) {
    memset(o, 0, sizeof *o);
    o->dtype = TP_BF16;
    o->shards = 1;
    o->seed = 0;
    o->std = 0.02;
    o->norm_std = 0.1;
}

static int is_norm(tp_weight_kind k) { return k == TP_W_NORM_IN || k == TP_W_NORM_POST || k == TP_W_NORM_FINAL; }

/* Values come in fixed blocks of INIT_BLOCK elements and block b of tensor
 * idx draws from its own stream, so any number of threads can fill blocks in
 * any order and the bytes never depend on the thread count. Block 0 uses
 * stream idx + 1, the stream of the whole tensor before blocks existed, so
 * tensors of one block kept their values. */
#define INIT_BLOCK ((uint64_t)1 << 20)
#define INIT_CHUNK 4096 /* floats converted at a time, on the stack */

static uint64_t block_stream(size_t idx, uint64_t b) { return ((uint64_t)idx + 1) | (b << 40); }

/* Fill k elements of block b of tensor idx, in the storage type, at out. */
static void fill_block(const tp_weight_desc *d, size_t idx, uint64_t b, size_t k, const tp_init_opts *o,
                       unsigned char *out) {
    tp_rng rng;
    tp_rng_seed(&rng, o->seed, block_stream(idx, b));
    size_t es = tp_dtype_size(o->dtype);
    float f[INIT_CHUNK];
    for (size_t off = 0; off < k; off += INIT_CHUNK) {
        size_t m = k - off < INIT_CHUNK ? k - off : INIT_CHUNK;
        for (size_t i = 0; i < m; i++)
            f[i] = is_norm(d->kind) ? (float)(1.0 + o->norm_std * tp_rng_normal(&rng))
                                    : (float)(o->std * tp_rng_normal(&rng));
        tp_from_f32(out + off * es, f, o->dtype, m);
    }
}

/* Stream tensor idx's values into the writer, `group` blocks at a time: the
 * threads fill the blocks of a group, then one write appends them in order.
 * obuf holds group * INIT_BLOCK elements of the storage type. */
static int write_tensor(tp_st_writer *w, const tp_weight_desc *d, size_t idx, const tp_init_opts *o,
                        unsigned char *obuf, uint64_t group, tp_err *err) {
    uint64_t n = (uint64_t)d->shape[0] * (uint64_t)(d->ndim == 2 ? d->shape[1] : 1);
    uint64_t nb = (n + INIT_BLOCK - 1) / INIT_BLOCK;
    size_t es = tp_dtype_size(o->dtype);
    for (uint64_t b0 = 0; b0 < nb; b0 += group) {
        long long gb = (long long)(nb - b0 < group ? nb - b0 : group);
#pragma omp parallel for schedule(dynamic, 1) if (gb > 1)
        for (long long j = 0; j < gb; j++) {
            uint64_t b = b0 + (uint64_t)j, first = b * INIT_BLOCK;
            size_t k = (size_t)(n - first < INIT_BLOCK ? n - first : INIT_BLOCK);
            fill_block(d, idx, b, k, o, obuf + (size_t)j * INIT_BLOCK * es);
        }
        uint64_t first = b0 * INIT_BLOCK, k = n - first < (uint64_t)gb * INIT_BLOCK ? n - first : (uint64_t)gb * INIT_BLOCK;
        int rc = tp_st_writer_write(w, obuf, (size_t)k * es, err);
        if (rc != TP_OK) return rc;
    }
    return TP_OK;
}

static int write_shard(const char *path, const tp_weight_desc *desc, size_t first, size_t count,
                       const tp_init_opts *o, tp_err *err) {
    tp_st_spec *specs = tp_calloc(count, sizeof *specs, err);
    if (!specs) return TP_ENOMEM;
    for (size_t i = 0; i < count; i++) {
        const tp_weight_desc *d = &desc[first + i];
        specs[i].name = d->name;
        specs[i].dtype = o->dtype;
        specs[i].ndim = d->ndim;
        specs[i].shape[0] = d->shape[0];
        specs[i].shape[1] = d->shape[1];
    }
    /* two blocks per thread keep every thread busy while a group is filled;
     * the group size changes the write sizes only, never the bytes */
    int threads = omp_get_max_threads();
    uint64_t group = threads < 1 ? 2 : threads > 8 ? 16 : (uint64_t)threads * 2;
    unsigned char *obuf = tp_malloc((size_t)(group * INIT_BLOCK) * tp_dtype_size(o->dtype), err);
    tp_st_writer *w = NULL;
    tp_kv meta = {"format", "pt"};
    int rc = !obuf ? TP_ENOMEM : tp_st_writer_open(path, specs, count, &meta, 1, &w, err);
    for (size_t i = 0; rc == TP_OK && i < count; i++)
        rc = write_tensor(w, &desc[first + i], first + i, o, obuf, group, err);
    if (w) {
        if (rc == TP_OK) rc = tp_st_writer_close(w, err);
        else tp_st_writer_abort(w);
    }
    free(obuf);
    free(specs);
    return rc;
}

static int cmp_desc_name(const void *a, const void *b) {
    return strcmp(((const tp_weight_desc *const *)a)[0]->name, ((const tp_weight_desc *const *)b)[0]->name);
}

static int write_index(const char *dir, const tp_weight_desc *desc, size_t n, const int *shard_of, int shards,
                       uint64_t total, tp_err *err) {
    const tp_weight_desc **sorted = tp_calloc(n, sizeof *sorted, err);
    if (!sorted) return TP_ENOMEM;
    for (size_t i = 0; i < n; i++) sorted[i] = &desc[i];
    qsort(sorted, n, sizeof *sorted, cmp_desc_name); /* HF writes weight_map sorted */
    tp_strbuf s;
    tp_strbuf_init(&s);
    tp_strbuf_printf(&s, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {\n",
                     (unsigned long long)total);
    for (size_t i = 0; i < n; i++) {
        int sh = shard_of[sorted[i] - desc];
        tp_strbuf_puts(&s, "    ");
        tp_strbuf_json_string(&s, sorted[i]->name);
        tp_strbuf_printf(&s, ": \"model-%05d-of-%05d.safetensors\"%s\n", sh + 1, shards, i + 1 < n ? "," : "");
    }
    tp_strbuf_puts(&s, "  }\n}\n");
    free(sorted);
    if (s.oom) { tp_strbuf_free(&s); return tp_fail(err, TP_ENOMEM, "out of memory"); }
    char *path = tp_path_join(dir, "model.safetensors.index.json", err);
    int rc = path ? tp_write_file_atomic(path, s.buf, s.len, err) : TP_ENOMEM;
    free(path);
    tp_strbuf_free(&s);
    return rc;
}

int tp_init_model(const tp_model_config *c, const tp_init_opts *o, const char *out_dir, tp_err *err) {
    int rc = tp_model_config_check("init-model", c, err);
    if (rc != TP_OK) return rc;
    size_t n = tp_model_weight_count(c);
    if (o->shards < 1 || (size_t)o->shards > n)
        return tp_fail(err, TP_EINVAL, "init-model: --shards must be between 1 and %zu (the tensor count), got %d", n,
                       o->shards);
    if ((rc = tp_mkdir_p(out_dir, err)) != TP_OK) return rc;
    char *cfg_path = tp_path_join(out_dir, "config.json", err);
    if (!cfg_path) return TP_ENOMEM;
    if (!o->force && tp_exists(cfg_path)) {
        rc = tp_fail(err, TP_EINVAL, "%s: a model is already there (use --force to overwrite)", out_dir);
        free(cfg_path);
        return rc;
    }
    remove(cfg_path); /* until the new weights are complete, there is no model here */
    tp_weight_desc *desc = tp_calloc(n, sizeof *desc, err);
    int *shard_of = tp_calloc(n, sizeof *shard_of, err);
    if (!desc || !shard_of) { rc = TP_ENOMEM; goto done; }
    tp_model_weights(c, desc);
    /* Split by bytes: shard s ends once the running total passes (s+1)/N of it,
     * keeping at least one tensor for every later shard. */
    uint64_t total = 0, run = 0;
    size_t es = tp_dtype_size(o->dtype);
    for (size_t i = 0; i < n; i++)
        total += (uint64_t)desc[i].shape[0] * (uint64_t)(desc[i].ndim == 2 ? desc[i].shape[1] : 1) * es;
    int sh = 0;
    for (size_t i = 0; i < n; i++) {
        shard_of[i] = sh;
        run += (uint64_t)desc[i].shape[0] * (uint64_t)(desc[i].ndim == 2 ? desc[i].shape[1] : 1) * es;
        size_t left = n - i - 1;
        if (sh + 1 < o->shards &&
            ((double)run >= (double)total * (sh + 1) / o->shards || left == (size_t)(o->shards - sh - 1)))
            sh++;
    }
    /* Remove files of a previous model with another layout, so the directory
     * never holds both an index and a single file. */
    char *old = tp_path_join(out_dir, o->shards > 1 ? "model.safetensors" : "model.safetensors.index.json", err);
    if (old) { remove(old); free(old); }
    size_t first = 0;
    for (int s = 0; s < o->shards && rc == TP_OK; s++) {
        size_t count = 0;
        while (first + count < n && shard_of[first + count] == s) count++;
        char name[64];
        if (o->shards == 1) snprintf(name, sizeof name, "model.safetensors");
        else snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, o->shards);
        char *path = tp_path_join(out_dir, name, err);
        rc = path ? write_shard(path, desc, first, count, o, err) : TP_ENOMEM;
        free(path);
        first += count;
    }
    if (rc == TP_OK && o->shards > 1) rc = write_index(out_dir, desc, n, shard_of, o->shards, total, err);
    if (rc == TP_OK) {
        /* config.json last: its presence marks a complete model */
        tp_model_config cc = *c;
        snprintf(cc.torch_dtype, sizeof cc.torch_dtype, "%s",
                 o->dtype == TP_BF16 ? "bfloat16" : o->dtype == TP_F16 ? "float16" : "float32");
        tp_strbuf s;
        tp_strbuf_init(&s);
        tp_model_config_to_json(&cc, &s);
        rc = s.oom ? tp_fail(err, TP_ENOMEM, "out of memory") : tp_write_file_atomic(cfg_path, s.buf, s.len, err);
        tp_strbuf_free(&s);
    }
done:
    free(desc);
    free(shard_of);
    free(cfg_path);
    return rc;
}
