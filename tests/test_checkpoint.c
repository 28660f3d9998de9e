/* test_checkpoint.c - src/train/checkpoint.c: write/retention/LATEST, exact
 * round trip into a fresh decoder, fallback past corrupt or incomplete
 * checkpoints (flipped byte, missing MANIFEST, bad LATEST), leftovers of
 * crashed writers, shape mismatches, and a kill test: a child writing
 * checkpoints in a loop is SIGKILLed at random moments; afterwards the newest
 * checkpoint found must always verify and load, never be torn.
 *
 * With TPTT_PEFT_DIR set it only writes one checkpoint for
 * tests/test_peft_files.py: base model in $TPTT_PEFT_DIR/base, run directory
 * $TPTT_PEFT_DIR/run (step 1), and exits. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "io/hf_model.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "test.h"
#include "test_model.h"
#include "train/checkpoint.h"
#include "util/fsutil.h"

static char dir[256];

static tp_hf_model *make_model(const char *path) {
    tp_model_config c = {0};
    c.arch = TP_ARCH_LLAMA;
    c.hidden = 24; c.ffn = 40; c.layers = 2; c.heads = 4; c.kv_heads = 2; c.head_dim = 6; c.vocab = 37;
    c.rms_eps = 1e-5; c.rope_theta = 10000; c.bos_id = c.eos_id = -1; c.max_pos = 64;
    return tp_test_model(path, &c, -1, 7);
}

/* LoRA (rank r) on every projection + LiZA with learnable per-channel MaG,
 * so both adapter_model and liza_model hold tensors. */
static tp_decoder_opts opts_for(int r) {
    tp_decoder_opts o;
    tp_decoder_opts_default(&o);
    o.lora.r = r;
    o.lora.alpha = 6;
    o.lora.targets = 0x7f;
    o.liza.enabled = 1;
    o.liza.chunk = 4;
    o.mag.mode = TP_MAG_LEARNABLE;
    o.mag.mu0 = 0.4;
    o.mag.vector = 1;
    return o;
}

static tp_decoder *make_decoder(tp_hf_model *hf, const tp_decoder_opts *o) {
    tp_decoder *m;
    tp_err err = {0};
    if (tp_decoder_create(hf, o, &m, &err)) { fprintf(stderr, "decoder: %s\n", err.msg); return NULL; }
    return m;
}

/* Deterministic contents for "pattern" p: every element distinct. */
static float val(int64_t p, int which, size_t e) {
    uint64_t x = (uint64_t)p * 0x9E3779B97F4A7C15ull + (uint64_t)which * 0xBF58476D1CE4E5B9ull + e * 0x94D049BB133111EBull;
    x ^= x >> 31;
    float f = (float)(x % 2000003) / 1000003.0f - 1.0f;
    return which == 2 ? f * f : f; /* v >= 0 */
}

static void fill(tp_decoder *m, float *am, float *av, int64_t p) {
    float *theta = tp_decoder_theta(m);
    for (size_t i = 0; i < tp_decoder_nparams(m); i++) {
        const tp_param *q = tp_decoder_param(m, i);
        for (size_t e = 0; e < q->numel; e++) {
            theta[q->offset + e] = val(p, 0, q->offset + e);
            am[q->offset + e] = val(p, 1, q->offset + e);
            av[q->offset + e] = val(p, 2, q->offset + e);
        }
    }
}

/* 1 when theta/m/v hold pattern p exactly (bit for bit). */
static int holds(tp_decoder *m, const float *am, const float *av, int64_t p) {
    const float *theta = tp_decoder_theta(m);
    for (size_t i = 0; i < tp_decoder_nparams(m); i++) {
        const tp_param *q = tp_decoder_param(m, i);
        for (size_t e = 0; e < q->numel; e++) {
            float a = val(p, 0, q->offset + e), b = val(p, 1, q->offset + e), c = val(p, 2, q->offset + e);
            if (memcmp(&theta[q->offset + e], &a, 4) || (am && memcmp(&am[q->offset + e], &b, 4)) ||
                (av && memcmp(&av[q->offset + e], &c, 4)))
                return 0;
        }
    }
    return 1;
}

static void put_num(tp_strbuf *s, double v) {
    char b[40];
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(b, sizeof b, "%.*g", prec, v);
        if (strtod(b, NULL) == v) break;
    }
    tp_strbuf_puts(s, b);
}

/* adapter_config.json as the trainer writes it (PEFT's LoraConfig fields,
 * keys sorted, indent 2, as PEFT's save_pretrained writes them). */
static char *adapter_config_json(const tp_decoder_opts *o, const char *base_model_path) {
    tp_strbuf s;
    tp_strbuf_init(&s);
    tp_strbuf_puts(&s, "{\n  \"base_model_name_or_path\": ");
    tp_strbuf_json_string(&s, base_model_path);
    tp_strbuf_puts(&s, ",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n"
                       "  \"lora_alpha\": ");
    put_num(&s, o->lora.alpha);
    tp_strbuf_puts(&s, ",\n  \"lora_dropout\": ");
    put_num(&s, o->lora.dropout);
    tp_strbuf_printf(&s, ",\n  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"target_modules\": [", o->lora.r);
    int first = 1;
    for (int j = 0; j < TP_NMOD; j++) {
        if (!((o->lora.targets >> j) & 1)) continue;
        tp_strbuf_printf(&s, "%s\n    \"%s\"", first ? "" : ",", tp_module_names[j]);
        first = 0;
    }
    tp_strbuf_printf(&s, "%s],\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_rslora\": %s\n}", first ? "" : "\n  ",
                     o->lora.rslora ? "true" : "false");
    if (s.oom) { tp_strbuf_free(&s); return NULL; }
    return s.buf;
}

static char cfg_json[] = "{\"model_type\": \"tptt\", \"operator_mode\": \"delta_rule\", \"mag_weight\": 0.4}";
static char adapter_json[4096];

static int write_ckpt(const char *run, tp_decoder *m, const float *am, const float *av, int64_t step, int keep,
                      tp_err *err) {
    char state[128];
    snprintf(state, sizeof state, "{\"step\": %lld, \"tokens\": %lld}", (long long)step, (long long)step * 1000);
    tp_ckpt_info info = {step, cfg_json, adapter_json, state};
    return tp_ckpt_write(run, m, am, av, &info, keep, err);
}

static void sh(const char *fmt, const char *a) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, fmt, a);
    if (system(cmd) != 0) fprintf(stderr, "command failed: %s\n", cmd);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Count entries of ckdir whose name starts with prefix. */
static int count_prefix(const char *ckdir, const char *prefix) {
    int n = 0;
    DIR *d = opendir(ckdir);
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (!strncmp(e->d_name, prefix, strlen(prefix))) n++;
    closedir(d);
    return n;
}

/* Count entries "<prefix>...-<pid>" of ckdir (a writer's own leftovers). */
static int count_suffix(const char *ckdir, const char *prefix, long pid) {
    char suf[32];
    int n = 0, ls = snprintf(suf, sizeof suf, "-%ld", pid);
    DIR *d = opendir(ckdir);
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        if (!strncmp(e->d_name, prefix, strlen(prefix)) && l > (size_t)ls && !strcmp(e->d_name + l - ls, suf)) n++;
    }
    closedir(d);
    return n;
}

static int read_text(const char *path, char *buf, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t k = fread(buf, 1, n - 1, f);
    buf[k] = 0;
    fclose(f);
    return (int)k;
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static void flip_byte(const char *path, long off_from_end) {
    FILE *f = fopen(path, "r+b");
    if (!f) return;
    fseek(f, -off_from_end, SEEK_END);
    int c = fgetc(f);
    fseek(f, -off_from_end, SEEK_END);
    fputc(c ^ 0x40, f);
    fclose(f);
}

static const char *base_of(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* ---- the unit tests ------------------------------------------------------ */

static void test_roundtrip_and_fallback(tp_hf_model *hf) {
    tp_decoder_opts o = opts_for(3);
    tp_decoder *m = make_decoder(hf, &o), *m2 = make_decoder(hf, &o);
    CHECK(m && m2);
    if (!m || !m2) return;
    size_t n = tp_decoder_numel(m);
    float *am = calloc(n, 4), *av = calloc(n, 4), *bm = calloc(n, 4), *bv = calloc(n, 4);
    int nlora = 0, nother = 0;
    for (size_t i = 0; i < tp_decoder_nparams(m); i++) tp_decoder_param(m, i)->is_lora ? nlora++ : nother++;
    CHECK(nlora == 2 * 7 * 2 && nother == 2);
    char run[300], ck[400], p[600], out[600], buf[4096];
    snprintf(run, sizeof run, "%s/run", dir);
    snprintf(ck, sizeof ck, "%s/checkpoints", run);
    tp_err err = {0};
    int64_t steps[3] = {3, 5, 7};
    for (int i = 0; i < 3; i++) {
        fill(m, am, av, steps[i]);
        int rc = write_ckpt(run, m, am, av, steps[i], 2, &err);
        CHECK_MSG(rc == TP_OK && err.msg[0] == 0, "write step %lld: %s", (long long)steps[i], err.msg);
    }
    snprintf(p, sizeof p, "%s/step-00000003", ck);
    CHECK_MSG(!tp_exists(p), "keep=2 must delete step 3");
    snprintf(p, sizeof p, "%s/step-00000005", ck);
    CHECK(is_dir(p));
    snprintf(p, sizeof p, "%s/step-00000007", ck);
    CHECK(is_dir(p));
    snprintf(p, sizeof p, "%s/LATEST", ck);
    CHECK(read_text(p, buf, sizeof buf) > 0 && !strcmp(buf, "step-00000007\n"));
    CHECK(count_prefix(ck, ".tmp-") == 0 && count_prefix(ck, ".old-") == 0 && count_prefix(ck, "LATEST.tmp") == 0);
    /* MANIFEST: 6 files, sorted, "<size> <16 hex> <name>" */
    snprintf(p, sizeof p, "%s/step-00000007/MANIFEST", ck);
    CHECK(read_text(p, buf, sizeof buf) > 0);
    {
        const char *want[] = {"adapter_config.json", "adapter_model.safetensors", "config.json",
                              "liza_model.safetensors", "optimizer.safetensors", "trainer_state.json"};
        char *line = buf;
        int ok = 1;
        for (int i = 0; i < 6 && ok; i++) {
            unsigned long long size;
            char hex[17], name[64];
            ok = line && sscanf(line, "%llu %16s %63s", &size, hex, name) == 3 && strlen(hex) == 16 &&
                 !strcmp(name, want[i]);
            char fp[700];
            snprintf(fp, sizeof fp, "%s/step-00000007/%s", ck, want[i]);
            ok = ok && tp_file_size(fp) == (long long)size;
            line = strchr(line, '\n');
            if (line) line++;
        }
        CHECK_MSG(ok && line && *line == 0, "MANIFEST:\n%s", buf);
    }
    snprintf(p, sizeof p, "%s/step-00000007/adapter_config.json", ck);
    CHECK(read_text(p, buf, sizeof buf) > 0 && !strcmp(buf, adapter_json));
    /* find + load into a fresh decoder */
    CHECK(tp_ckpt_find_latest(run, out, sizeof out, &err) == TP_OK);
    CHECK_MSG(!strncmp(out, ck, strlen(ck)) && !strcmp(base_of(out), "step-00000007") && err.msg[0] == 0, "%s / %s", out,
              err.msg);
    CHECK(tp_ckpt_find_latest(run, out, 10, &err) == TP_EINVAL);
    CHECK(tp_ckpt_find_latest(run, out, sizeof out, &err) == TP_OK);
    char *state = NULL;
    int rc = tp_ckpt_load(out, m2, bm, bv, &state, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK_MSG(holds(m2, bm, bv, 7), "loaded values differ from the ones written");
    CHECK(state && !strcmp(state, "{\"step\": 7, \"tokens\": 7000}"));
    free(state);
    state = NULL;
    /* moments and state are optional */
    CHECK(tp_ckpt_load(out, m2, NULL, NULL, NULL, &err) == TP_OK);

    /* rewrite an existing step (rerun after resume): replaced, nothing left over */
    fill(m, am, av, 107);
    rc = write_ckpt(run, m, am, av, 7, 2, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK(tp_ckpt_load(out, m2, bm, bv, NULL, &err) == TP_OK && holds(m2, bm, bv, 107));
    CHECK(count_prefix(ck, ".tmp-") == 0 && count_prefix(ck, ".old-") == 0);
    snprintf(p, sizeof p, "%s/step-00000005", ck);
    CHECK(is_dir(p));

    /* a flipped byte in step 7's adapter: verify names dir and file; fall back to 5 */
    snprintf(p, sizeof p, "%s/step-00000007/adapter_model.safetensors", ck);
    flip_byte(p, 3);
    snprintf(p, sizeof p, "%s/step-00000007", ck);
    rc = tp_ckpt_verify(p, &err);
    CHECK_MSG(rc != TP_OK && strstr(err.msg, "step-00000007") && strstr(err.msg, "adapter_model.safetensors") &&
                  strstr(err.msg, "checksum"),
              "%s", err.msg);
    printf("corrupt: %s\n", err.msg);
    fill(m2, bm, bv, 99);
    CHECK(tp_ckpt_load(p, m2, bm, bv, &state, &err) != TP_OK && state == NULL);
    CHECK_MSG(holds(m2, bm, bv, 99), "a failed load must not touch theta, m, v");
    rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_OK && !strcmp(base_of(out), "step-00000005"), "%s", err.msg);
    CHECK_MSG(strstr(err.msg, "step-00000007") && strstr(err.msg, "adapter_model.safetensors"), "%s", err.msg);
    printf("fallback: %s\n", err.msg);
    CHECK(tp_ckpt_load(out, m2, bm, bv, &state, &err) == TP_OK && holds(m2, bm, bv, 5));
    CHECK(state && strstr(state, "\"step\": 5"));
    free(state);
    state = NULL;

    /* a truncated file: size mismatch */
    fill(m, am, av, 7);
    CHECK(write_ckpt(run, m, am, av, 7, 2, &err) == TP_OK);
    snprintf(p, sizeof p, "%s/step-00000007/optimizer.safetensors", ck);
    CHECK(truncate(p, tp_file_size(p) - 8) == 0);
    rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_OK && !strcmp(base_of(out), "step-00000005") && strstr(err.msg, "optimizer.safetensors") &&
                  strstr(err.msg, "bytes"),
              "%s", err.msg);

    /* missing MANIFEST: never loaded */
    CHECK(write_ckpt(run, m, am, av, 7, 2, &err) == TP_OK);
    snprintf(p, sizeof p, "%s/step-00000007/MANIFEST", ck);
    CHECK(unlink(p) == 0);
    rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_OK && !strcmp(base_of(out), "step-00000005") && strstr(err.msg, "MANIFEST missing"), "%s",
              err.msg);
    snprintf(p, sizeof p, "%s/step-00000007", ck);
    CHECK(tp_ckpt_load(p, m2, bm, bv, NULL, &err) != TP_OK && strstr(err.msg, "MANIFEST"));
    /* MANIFEST that omits a required file / is malformed */
    CHECK(write_ckpt(run, m, am, av, 7, 2, &err) == TP_OK);
    snprintf(p, sizeof p, "%s/step-00000007/MANIFEST", ck);
    read_text(p, buf, sizeof buf);
    char *cut = strstr(buf, "trainer_state.json");
    CHECK(cut != NULL);
    if (cut) {
        while (cut > buf && cut[-1] != '\n') cut--;
        *cut = 0; /* drop the last line */
    }
    write_text(p, buf);
    snprintf(p, sizeof p, "%s/step-00000007", ck);
    CHECK(tp_ckpt_verify(p, &err) != TP_OK && strstr(err.msg, "does not list trainer_state.json"));
    snprintf(p, sizeof p, "%s/step-00000007/MANIFEST", ck);
    write_text(p, "12 zz adapter_model.safetensors\n");
    snprintf(p, sizeof p, "%s/step-00000007", ck);
    CHECK_MSG(tp_ckpt_verify(p, &err) != TP_OK && strstr(err.msg, "MANIFEST line 1"), "%s", err.msg);

    /* leftovers: .tmp-* dirs (even complete ones) are never used; those at or
     * below the step being written are removed, later ones kept */
    CHECK(write_ckpt(run, m, am, av, 7, 2, &err) == TP_OK);
    snprintf(p, sizeof p, "cp -r '%s/step-00000007' '%s/.tmp-step-00000011-4242'", ck, ck);
    CHECK(system(p) == 0);
    snprintf(p, sizeof p, "%s/.tmp-step-00000004-4242", ck);
    CHECK(mkdir(p, 0777) == 0);
    snprintf(p, sizeof p, "%s/.old-step-00000002-1", ck);
    CHECK(mkdir(p, 0777) == 0);
    snprintf(p, sizeof p, "%s/LATEST.tmp.4242", ck);
    write_text(p, "step-0000");
    rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_OK && !strcmp(base_of(out), "step-00000007") && err.msg[0] == 0, "%s", err.msg);
    fill(m, am, av, 9);
    CHECK(write_ckpt(run, m, am, av, 9, 2, &err) == TP_OK);
    CHECK(count_prefix(ck, ".tmp-step-00000011-4242") == 1 && count_prefix(ck, ".tmp-step-00000004") == 0 &&
          count_prefix(ck, ".old-") == 0 && count_prefix(ck, "LATEST.tmp") == 0);
    snprintf(p, sizeof p, "%s/step-00000005", ck);
    CHECK_MSG(!tp_exists(p), "retention after step 9");

    /* LATEST: truncated, garbage, missing, dangling -> scan finds step 9;
     * an older valid one named by LATEST wins (LATEST first) */
    snprintf(p, sizeof p, "%s/LATEST", ck);
    const char *bad[] = {"", "../../../etc\n", "step-00000042\n", "step-0000000", "step-9x\n", NULL};
    for (int i = 0; i < 6; i++) {
        if (bad[i]) write_text(p, bad[i]);
        else unlink(p);
        rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
        CHECK_MSG(rc == TP_OK && !strcmp(base_of(out), "step-00000009") && strstr(err.msg, "LATEST"),
                  "LATEST '%s': rc %d %s: %s", bad[i] ? bad[i] : "(none)", rc, out, err.msg);
    }
    write_text(p, "step-00000007\n");
    rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_OK && !strcmp(base_of(out), "step-00000007") && err.msg[0] == 0, "%s", err.msg);

    /* every candidate broken: TP_EIO listing each */
    snprintf(p, sizeof p, "%s/step-00000007/MANIFEST", ck);
    unlink(p);
    snprintf(p, sizeof p, "%s/step-00000009/config.json", ck);
    flip_byte(p, 1);
    rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_EIO && strstr(err.msg, "no valid checkpoint") && strstr(err.msg, "step-00000007") &&
                  strstr(err.msg, "step-00000009: config.json") && out[0] == 0,
              "%s", err.msg);
    printf("all broken: %s\n", err.msg);

    /* a decoder with another LoRA rank: error names the parameter and shapes */
    fill(m, am, av, 9);
    CHECK(write_ckpt(run, m, am, av, 9, 2, &err) == TP_OK);
    CHECK(tp_ckpt_find_latest(run, out, sizeof out, &err) == TP_OK);
    tp_decoder_opts o4 = opts_for(4);
    tp_decoder *m4 = make_decoder(hf, &o4);
    CHECK(m4 != NULL);
    if (m4) {
        size_t n4 = tp_decoder_numel(m4);
        float *cm = calloc(n4, 4), *cv = calloc(n4, 4);
        fill(m4, cm, cv, 55);
        rc = tp_ckpt_load(out, m4, cm, cv, &state, &err);
        CHECK_MSG(rc != TP_OK && strstr(err.msg, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") &&
                      strstr(err.msg, "[3, 24]") && strstr(err.msg, "[4, 24]") && state == NULL,
                  "%s", err.msg);
        printf("rank mismatch: %s\n", err.msg);
        CHECK(holds(m4, cm, cv, 55));
        free(cm);
        free(cv);
        tp_decoder_destroy(m4);
    }
    /* fewer targets: the extra tensors are an error; MaG off: mag_logit extra */
    tp_decoder_opts oq = opts_for(3);
    oq.lora.targets = 1u << TP_MOD_Q;
    tp_decoder_opts oc = opts_for(3);
    oc.mag.mode = TP_MAG_CONSTANT;
    tp_decoder_opts ov = opts_for(3);
    ov.mag.vector = 0;
    tp_decoder_opts *alt[3] = {&oq, &oc, &ov};
    const char *expect[3] = {"is not a parameter of the model", "mag_logit is not a parameter",
                             "mag_logit has shape [24], the model expects [1]"};
    for (int i = 0; i < 3; i++) {
        tp_decoder *ma = make_decoder(hf, alt[i]);
        CHECK(ma != NULL);
        if (!ma) continue;
        size_t na = tp_decoder_numel(ma);
        float *cm = calloc(na, 4), *cv = calloc(na, 4);
        rc = tp_ckpt_load(out, ma, cm, cv, NULL, &err);
        CHECK_MSG(rc != TP_OK && strstr(err.msg, expect[i]), "%s", err.msg);
        printf("mismatch %d: %s\n", i, err.msg);
        free(cm);
        free(cv);
        tp_decoder_destroy(ma);
    }
    /* the checkpoint has a param the model lacks -> "neither"; build one with MaG
     * constant and load it into the learnable decoder */
    tp_decoder *mc = make_decoder(hf, &oc);
    if (mc) {
        size_t nc = tp_decoder_numel(mc);
        float *cm = calloc(nc, 4), *cv = calloc(nc, 4);
        char run2[300];
        snprintf(run2, sizeof run2, "%s/run-nomag", dir);
        fill(mc, cm, cv, 1);
        CHECK(write_ckpt(run2, mc, cm, cv, 1, 1, &err) == TP_OK);
        CHECK(tp_ckpt_find_latest(run2, out, sizeof out, &err) == TP_OK);
        rc = tp_ckpt_load(out, m2, bm, bv, NULL, &err);
        CHECK_MSG(rc != TP_OK && strstr(err.msg, "mag_logit of the model is in neither"), "%s", err.msg);
        free(cm);
        free(cv);
        tp_decoder_destroy(mc);
    }

    free(am); free(av); free(bm); free(bv);
    tp_decoder_destroy(m);
    tp_decoder_destroy(m2);
}

static void test_no_checkpoint(void) {
    char run[300], p[400], out[600];
    tp_err err = {0};
    snprintf(run, sizeof run, "%s/empty-run", dir);
    int rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_EIO && strstr(err.msg, "no checkpoint") && strstr(err.msg, "empty-run/checkpoints"), "%s",
              err.msg);
    printf("none: %s\n", err.msg);
    snprintf(p, sizeof p, "%s/checkpoints/.tmp-step-00000001-77", run);
    CHECK(tp_mkdir_p(p, &err) == TP_OK);
    rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
    CHECK_MSG(rc == TP_EIO && strstr(err.msg, "no valid checkpoint") && strstr(err.msg, "no step-* directories"),
              "%s", err.msg);
    printf("none: %s\n", err.msg);
    snprintf(p, sizeof p, "%s/nonexistent", dir);
    CHECK(tp_ckpt_verify(p, &err) != TP_OK && strstr(err.msg, "nonexistent"));
}

/* Only full-weight trainables: no PEFT adapter files at all (MANIFEST
 * without them), and a MANIFEST listing one adapter file without the other
 * is refused. */
static void test_no_lora(tp_hf_model *hf) {
    tp_decoder_opts o = opts_for(3);
    o.trainable = TP_TRAIN_PROJECTIONS;
    o.lora.targets = 1u << TP_MOD_O;
    tp_decoder *m = make_decoder(hf, &o), *m2 = make_decoder(hf, &o);
    CHECK(m && m2);
    if (m && m2) {
        size_t n = tp_decoder_numel(m);
        float *am = calloc(n, 4), *av = calloc(n, 4);
        char run[300], out[600];
        snprintf(run, sizeof run, "%s/run-full", dir);
        tp_err err = {0};
        fill(m, am, av, 31);
        CHECK(write_ckpt(run, m, am, av, 31, 0, &err) == TP_OK);
        fill(m, am, av, 32);
        CHECK(write_ckpt(run, m, am, av, 32, 0, &err) == TP_OK);
        CHECK(tp_ckpt_find_latest(run, out, sizeof out, &err) == TP_OK && !strcmp(base_of(out), "step-00000032"));
        memset(am, 0, n * 4);
        memset(av, 0, n * 4);
        int rc = tp_ckpt_load(out, m2, am, av, NULL, &err);
        CHECK_MSG(rc == TP_OK && holds(m2, am, av, 32), "%s", err.msg);
        snprintf(out, sizeof out, "%s/checkpoints/step-00000031", run);
        CHECK_MSG(is_dir(out), "keep=0 keeps everything");
        char p[700], man[4096];
        struct stat sb;
        snprintf(p, sizeof p, "%s/adapter_model.safetensors", out);
        CHECK_MSG(stat(p, &sb) != 0, "no adapter_model.safetensors without LoRA");
        snprintf(p, sizeof p, "%s/adapter_config.json", out);
        CHECK_MSG(stat(p, &sb) != 0, "no adapter_config.json without LoRA");
        snprintf(p, sizeof p, "%s/MANIFEST", out);
        CHECK(read_text(p, man, sizeof man) > 0 && !strstr(man, "adapter"));
        /* a MANIFEST naming adapter_config.json alone */
        char forged[4200];
        snprintf(forged, sizeof forged, "2 0000000000000000 adapter_config.json\n%s", man);
        write_text(p, forged);
        rc = tp_ckpt_verify(out, &err);
        CHECK_MSG(rc != TP_OK && strstr(err.msg, "lists adapter_config.json but not adapter_model.safetensors"), "%s",
                  err.msg);
        free(am);
        free(av);
    }
    tp_decoder_destroy(m);
    tp_decoder_destroy(m2);
}

/* ---- kill test ----------------------------------------------------------- */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long long step_of(const char *path) { return atoll(base_of(path) + 5); }

static void test_kill(tp_hf_model *hf) {
    tp_decoder_opts o = opts_for(3);
    tp_decoder *m = make_decoder(hf, &o), *m2 = make_decoder(hf, &o);
    CHECK(m && m2);
    if (!m || !m2) return;
    size_t n = tp_decoder_numel(m);
    float *am = calloc(n, 4), *av = calloc(n, 4), *bm = calloc(n, 4), *bv = calloc(n, 4);
    char run[300], ck[400], out[600];
    tp_err err = {0};
    /* time one write */
    snprintf(run, sizeof run, "%s/kill-timing", dir);
    double t0 = now();
    for (int i = 1; i <= 3; i++) {
        fill(m, am, av, i);
        CHECK(write_ckpt(run, m, am, av, i, 2, &err) == TP_OK);
    }
    double tw = (now() - t0) / 3;
    snprintf(run, sizeof run, "%s/kill", dir);
    snprintf(ck, sizeof ck, "%s/checkpoints", run);
    unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();
    srand(seed);
    const int trials = 100;
    int none = 0, found_ok = 0, torn_tmp = 0, rewrites = 0, ahead = 0, bad = 0;
    long long prev = -1; /* newest step found after the previous kill (-1: none) */
    for (int t = 0; t < trials; t++) {
        if (t % 10 == 0) { /* fresh run directory now and then: kills before any checkpoint */
            sh("rm -rf '%s'", run);
            prev = -1;
        }
        long long start = prev < 0 ? 1 : (t % 3 == 2 ? prev : prev + 1); /* sometimes rewrite the newest */
        if (prev >= 0 && start == prev) rewrites++;
        int fds[2];
        if (pipe(fds) != 0) { CHECK(0); break; }
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            close(fds[0]);
            for (long long s = start; s < start + 100000; s++) {
                fill(m, am, av, s);
                tp_err e = {0};
                if (write_ckpt(run, m, am, av, s, 2, &e) != TP_OK) {
                    fprintf(stderr, "child: %s\n", e.msg);
                    _exit(3);
                }
                if (write(fds[1], &s, sizeof s) != (ssize_t)sizeof s) _exit(4);
            }
            _exit(0);
        }
        close(fds[1]);
        double delay;
        switch (t % 8) {
        case 0: delay = 0; break;
        case 1: delay = (rand() % 200) * 1e-6; break;                /* < 0.2 ms */
        case 2: delay = tw * (rand() % 1000) / 1000.0; break;       /* within the first write */
        default: delay = 3 * tw * (rand() % 1000) / 1000.0; break;  /* a few writes in */
        }
        if (delay > 0) {
            struct timespec ts = {(time_t)delay, (long)((delay - (time_t)delay) * 1e9)};
            nanosleep(&ts, NULL);
        }
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "trial %d: child status %d", t, status);
        long long s, done = -1;
        while (read(fds[0], &s, sizeof s) == (ssize_t)sizeof s) done = s;
        close(fds[0]);
        torn_tmp += count_suffix(ck, ".tmp-step-", (long)pid) > 0;
        int rc = tp_ckpt_find_latest(run, out, sizeof out, &err);
        long long least = done > prev ? done : prev;
        if (rc != TP_OK) {
            none++;
            CHECK_MSG(least < 0 && rc == TP_EIO, "trial %d: completed step %lld but find_latest: %s", t, least,
                      err.msg);
            continue;
        }
        long long got = step_of(out);
        if (got > done && done >= 0) ahead++;
        int ok = got >= least;
        CHECK_MSG(ok, "trial %d: found step %lld, but step %lld had completed", t, got, least);
        char *state = NULL;
        memset(bm, 0, n * 4);
        memset(bv, 0, n * 4);
        rc = tp_ckpt_load(out, m2, bm, bv, &state, &err);
        char want[128];
        snprintf(want, sizeof want, "{\"step\": %lld, \"tokens\": %lld}", got, got * 1000);
        int good = rc == TP_OK && holds(m2, bm, bv, got) && state && !strcmp(state, want);
        CHECK_MSG(good, "trial %d (delay %.2f ms): %s does not load intact: %s", t, delay * 1e3, out, err.msg);
        bad += !good || !ok;
        found_ok += good;
        free(state);
        prev = got;
    }
    printf("kill test (seed %u, one write %.2f ms): %d trials, %d loaded the newest complete checkpoint intact, "
           "%d killed before any checkpoint (none found), %d killed mid-write (left its .tmp-* dir), %d newer than the last reported "
           "(killed between LATEST and return), %d started by rewriting an existing step, %d bad\n",
           seed, tw * 1e3, trials, found_ok, none, torn_tmp, ahead, rewrites, bad);
    CHECK(none + found_ok == trials);
    free(am); free(av); free(bm); free(bv);
    tp_decoder_destroy(m);
    tp_decoder_destroy(m2);
}

/* ---- TPTT_PEFT_DIR: one checkpoint for test_peft_files.py ------------------ */

static int peft_mode(const char *outdir) {
    char base[600], run[600];
    snprintf(base, sizeof base, "%s/base", outdir);
    snprintf(run, sizeof run, "%s/run", outdir);
    tp_hf_model *hf = make_model(base);
    if (!hf) return 1;
    tp_decoder_opts o = opts_for(3);
    o.lora.targets = (1u << TP_MOD_Q) | (1u << TP_MOD_V) | (1u << TP_MOD_O) | (1u << TP_MOD_DOWN);
    o.lora.alpha = 6;
    o.lora.dropout = 0.05;
    o.mag.vector = 0;
    char *aj = adapter_config_json(&o, base);
    tp_decoder *m = make_decoder(hf, &o);
    if (!aj || !m) return 1;
    snprintf(adapter_json, sizeof adapter_json, "%s", aj);
    free(aj);
    size_t n = tp_decoder_numel(m);
    float *am = calloc(n, 4), *av = calloc(n, 4);
    fill(m, am, av, 1);
    tp_err err = {0};
    int rc = write_ckpt(run, m, am, av, 1, 2, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    free(am);
    free(av);
    tp_decoder_destroy(m);
    tp_hf_close(hf);
    return rc ? 1 : 0;
}

int main(void) {
    const char *peft = getenv("TPTT_PEFT_DIR");
    if (peft && *peft) return peft_mode(peft);
    snprintf(dir, sizeof dir, "/tmp/tptt-test-ckpt-XXXXXX");
    if (!mkdtemp(dir)) return 1;
    char base[300];
    snprintf(base, sizeof base, "%s/base", dir);
    tp_hf_model *hf = make_model(base);
    CHECK(hf != NULL);
    if (hf) {
        tp_decoder_opts o = opts_for(3);
        char *aj = adapter_config_json(&o, base);
        CHECK(aj != NULL);
        snprintf(adapter_json, sizeof adapter_json, "%s", aj ? aj : "{}");
        free(aj);
        test_roundtrip_and_fallback(hf);
        test_no_checkpoint();
        test_no_lora(hf);
        test_kill(hf);
        tp_hf_close(hf);
    }
    sh("rm -rf '%s'", dir);
    return tp_test_report("test_checkpoint");
}
