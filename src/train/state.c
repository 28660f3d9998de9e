/* state.c - trainer_state.json of a checkpoint, validated before a resume
 * trusts any of it (train/state.h). */
#include "train/state.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/config.h"
#include "util/jsonint.h"

/* Keys of resume_config that differ between a checkpoint and this run. */
static int resume_mismatch(const char *ckpt_state, const char *now_json, char *msg, size_t n) {
    cJSON *st = cJSON_Parse(ckpt_state), *cur = cJSON_Parse(now_json);
    const cJSON *old = st ? cJSON_GetObjectItemCaseSensitive(st, "resume_config") : NULL;
    int bad = 0;
    size_t k = 0;
    msg[0] = 0;
    if (!old || !cur) {
        bad = 1;
        snprintf(msg, n, "trainer_state.json has no readable resume_config");
    } else {
        for (const cJSON *e = cur->child; e; e = e->next) {
            const cJSON *o = cJSON_GetObjectItemCaseSensitive(old, e->string);
            if (o && cJSON_Compare(o, e, 1)) continue;
            char *a = o ? cJSON_PrintUnformatted(o) : NULL, *b = cJSON_PrintUnformatted(e);
            k += (size_t)snprintf(msg + k, k < n ? n - k : 0, "%s%s: checkpoint %s, now %s", bad ? "; " : "", e->string,
                                  a ? a : "(absent)", b ? b : "?");
            free(a);
            free(b);
            bad = 1;
            if (k >= n) break;
        }
    }
    cJSON_Delete(st);
    cJSON_Delete(cur);
    return bad;
}

/* cJSON keeps duplicate keys; a trainer_state.json must not have any. */
static const char *dup_key(const cJSON *j) {
    for (const cJSON *a = j ? j->child : NULL; a; a = a->next) {
        if (cJSON_IsObject(j))
            for (const cJSON *b = a->next; b; b = b->next)
                if (a->string && b->string && !strcmp(a->string, b->string)) return a->string;
        const char *d = dup_key(a);
        if (d) return d;
    }
    return NULL;
}

/* An integer field in [lo, hi] (JSON number with no fraction). */
static int int_field(const char *file, const cJSON *obj, const char *prefix, const char *key, double lo, double hi,
                     int required, int64_t *out, tp_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) {
        if (!required) return 1;
        return tp_fail(err, TP_EFORMAT, "%s: field \"%s%s\" missing, expected an integer in [%.0f, %.0f]", file, prefix,
                       key, lo, hi);
    }
    if (!tp_json_int(v, (int64_t)lo, (int64_t)hi, out)) { /* the bounds are at most 2^53: exact */
        char *t = cJSON_PrintUnformatted(v);
        int rc = tp_fail(err, TP_EFORMAT, "%s: field \"%s%s\" is %.60s, expected an integer in [%.0f, %.0f]", file,
                         prefix, key, t ? t : "?", lo, hi);
        free(t);
        return rc;
    }
    return TP_OK;
}

#define MAX_COUNT 9007199254740992.0 /* 2^53: exact in a JSON number */

/* Validate trainer_state.json of checkpoint dir against the directory name,
 * the run config and the data set; fills step, tokens and the bad-step run. */
int tp_train_state_check(const char *text, const tp_state_expect *x, tp_state_info *out, tp_err *err) {
    const char *dir = x->dir;
    int64_t *step = &out->step, *tokens = &out->tokens_seen, *bad = &out->consecutive_bad_steps, *ws = &out->world_size;
    memset(out, 0, sizeof *out);
    char file[TP_PATH_MAX + 96];
    snprintf(file, sizeof file, "%s/trainer_state.json", dir);
    cJSON *j = cJSON_Parse(text);
    if (!j) return tp_fail(err, TP_EFORMAT, "%s: not valid JSON", file);
    int rc = TP_OK;
    const char *dk;
    int64_t v;
    const int64_t G = x->global_batch > 0 ? x->global_batch : 1, T = x->seq_len > 0 ? x->seq_len : 1;
    if (!cJSON_IsObject(j)) rc = tp_fail(err, TP_EFORMAT, "%s: expected a JSON object", file);
    else if ((dk = dup_key(j))) {
        cJSON *k = cJSON_CreateString(dk); /* printed escaped: a key may hold a newline */
        char *kp = k ? cJSON_PrintUnformatted(k) : NULL;
        rc = tp_fail(err, TP_EFORMAT, "%s: duplicate key %.200s", file, kp ? kp : "?");
        free(kp);
        cJSON_Delete(k);
    }
    if (rc == TP_OK) rc = int_field(file, j, "", "step", 0, MAX_COUNT / (double)(G * T), 1, step, err);
    if (rc == TP_OK) {
        const char *base = strrchr(dir, '/');
        base = base ? base + 1 : dir;
        long long ds;
        char *end;
        if (!strncmp(base, "step-", 5) && base[5] >= '0' && base[5] <= '9' && (ds = strtoll(base + 5, &end, 10), !*end) &&
            ds != *step)
            rc = tp_fail(err, TP_EFORMAT, "%s: field \"step\" is %lld but the directory is %s", file, (long long)*step,
                         base);
        else if (*step > x->total_steps)
            rc = tp_fail(err, TP_EINVAL, "%s: field \"step\" is %lld, past schedule.total_steps %lld", file,
                         (long long)*step, (long long)x->total_steps);
    }
    if (rc == TP_OK) rc = int_field(file, j, "", "tokens_seen", 0, MAX_COUNT, 1, tokens, err);
    if (rc == TP_OK && *tokens != *step * G * T)
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"tokens_seen\" is %lld, expected step x batch.global x data.seq_len = %lld",
                     file, (long long)*tokens, (long long)(*step * G * T));
    if (rc == TP_OK && (rc = int_field(file, j, "", "consecutive_bad_steps", 0, 2147483647.0, 0, bad, err)) == 1) {
        *bad = 0;
        rc = TP_OK;
    }
    *ws = 0;
    if (rc == TP_OK && (rc = int_field(file, j, "", "world_size", 1, 16777216.0, 0, ws, err)) == 1) rc = TP_OK;
    out->tokens_trained = -1;
    if (rc == TP_OK && (rc = int_field(file, j, "", "tokens_trained", 0, (double)*tokens, 0, &out->tokens_trained,
                                       err)) == 1) {
        out->tokens_trained = -1;
        rc = TP_OK;
    }
    if (rc == TP_OK && (rc = int_field(file, j, "", "epoch", 0, MAX_COUNT, 0, &v, err)) == 1) rc = TP_OK;
    else if (rc == TP_OK && x->epoch_of && v != x->epoch_of(x->epoch_ctx, *step))
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"epoch\" is %lld, step %lld of this data set is in epoch %lld", file,
                     (long long)v, (long long)*step, (long long)x->epoch_of(x->epoch_ctx, *step));
    const cJSON *cur = cJSON_GetObjectItemCaseSensitive(j, "data_cursor");
    if (rc == TP_OK && cur && !cJSON_IsObject(cur))
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"data_cursor\" must be an object", file);
    if (rc == TP_OK && cur) {
        struct { const char *key; int64_t want; const char *what; } f[] = {
            {"next_step", *step, "the checkpoint's step"},
            {"global_batch", G, "batch.global"},
            {"rows", x->rows, "the rows of the data set now (data file changed?)"},
            {"seed", (int64_t)x->seed, "seed of this run"},
        };
        for (size_t i = 0; i < sizeof f / sizeof *f && rc == TP_OK; i++) {
            rc = int_field(file, cur, "data_cursor.", f[i].key, 0, MAX_COUNT, 1, &v, err);
            if (rc == TP_OK && v != f[i].want)
                rc = tp_fail(err, TP_EFORMAT, "%s: field \"data_cursor.%s\" is %lld, expected %lld (%s)", file, f[i].key,
                             (long long)v, (long long)f[i].want, f[i].what);
        }
        const cJSON *dg = cJSON_GetObjectItemCaseSensitive(cur, "digest");
        if (rc == TP_OK && dg && !cJSON_IsString(dg))
            rc = tp_fail(err, TP_EFORMAT, "%s: field \"data_cursor.digest\" must be a string", file);
        else if (rc == TP_OK && dg && x->data_digest && x->data_digest[0] && strcmp(dg->valuestring, x->data_digest))
            rc = tp_fail(err, TP_EINVAL,
                         "%s: field \"data_cursor.digest\" is %.40s, the data set now has digest %s: the data changed "
                         "under the run (start a new run.dir or pass --resume none)",
                         file, dg->valuestring, x->data_digest);
    } else if (rc == TP_OK) {
        rc = tp_fail(err, TP_EFORMAT, "%s: field \"data_cursor\" missing", file);
    }
    const cJSON *pd = cJSON_GetObjectItemCaseSensitive(j, "pissa_base_digest");
    if (rc == TP_OK && x->pissa_digest && x->pissa_digest[0] && (!cJSON_IsString(pd) || strcmp(pd->valuestring, x->pissa_digest)))
        rc = tp_fail(err, TP_EINVAL,
                     "%s: field \"pissa_base_digest\" is %.40s, the residual base pissa-base now has digest %s: it "
                     "changed under the run (start a new run.dir or pass --resume none)",
                     file, cJSON_IsString(pd) ? pd->valuestring : "missing", x->pissa_digest);
    const cJSON *rng = cJSON_GetObjectItemCaseSensitive(j, "rng");
    if (rc == TP_OK && rng && !cJSON_IsArray(rng)) rc = tp_fail(err, TP_EFORMAT, "%s: field \"rng\" must be an array", file);
    for (const cJSON *e = rng ? rng->child : NULL; rc == TP_OK && e; e = e->next) {
        int64_t sd, st;
        if (!cJSON_IsObject(e)) rc = tp_fail(err, TP_EFORMAT, "%s: field \"rng\" entries must be objects", file);
        else if ((rc = int_field(file, e, "rng[].", "seed", 0, MAX_COUNT, 1, &sd, err)) == TP_OK &&
                 (rc = int_field(file, e, "rng[].", "step", 0, MAX_COUNT, 1, &st, err)) == TP_OK &&
                 (sd != (int64_t)x->seed || st != *step))
            rc = tp_fail(err, TP_EFORMAT, "%s: field \"rng[].seed/step\" is %lld/%lld, expected %lld/%lld", file,
                         (long long)sd, (long long)st, (long long)x->seed, (long long)*step);
    }
    cJSON_Delete(j);
    if (rc == TP_OK) {
        char why[900];
        if (x->resume_json && resume_mismatch(text, x->resume_json, why, sizeof why))
            rc = tp_fail(err, TP_EINVAL,
                         "%s: cannot resume, the run changed: %s (start a new run.dir or pass --resume none)", file, why);
    }
    return rc;
}

