/* config.c - the training run's configuration: YAML file (libyaml document
 * API) plus `--set key=value` overrides, and the defaults (cross-field checks
 * and the resume digest: config_check.c). Keys, types, defaults:
 * docs/config.md.
 *
 * One key table drives everything: a key's section, dotted name, value kind
 * and range. The file walker and --set both end in apply_key(), so a value is
 * parsed the same way wherever it comes from (--set parses its value as a
 * one-line YAML document). Messages:
 *   file:  "<file>:<line>: <dotted.key>: expected <what>, got <what was found>"
 *   --set: "--set <dotted.key>: expected <what>, got <what was found>" */
#include "train/config.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <yaml.h>

#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "train/config_impl.h"
#include "util/fsutil.h"

#define CFG_MAX_BYTES (64u << 10) /* a config file is a few hundred bytes */

/* ---- the key table ----------------------------------------------------- */

enum { S_TOP, S_MODEL, S_RUN, S_LORA, S_LIZA, S_MAG, S_COMPUTE, S_DATA, S_BATCH, S_OPTIM, S_SCHED, S_CKPT,
       S_LOG, S_FAULTS, S_DIST, S_EXPORT, S_EVAL, S_ALPACA, S_CHAT, NSEC };
static const char *const sec_names[NSEC] = {"",        "model", "run",       "lora",       "liza",    "mag",
                                            "compute", "data",  "batch",     "optimizer",  "schedule", "checkpoint",
                                            "logging", "faults", "dist",     "export",    "eval",     "data.alpaca",
                                            "data.chat"};
/* the section a section is written inside (data.alpaca inside data) */
static const int sec_parent[NSEC] = {[S_ALPACA] = S_DATA, [S_CHAT] = S_DATA};

enum { K_INT, K_NUM, K_BOOL, K_ENUM, K_STR, K_TEXT, K_TARGETS, K_VALUES };

enum {
    KEY_MODEL_PATH, KEY_MODEL_HUB_ID, KEY_RUN_DIR, KEY_SEED, KEY_TRAINABLE,
    KEY_LORA_R, KEY_LORA_ALPHA, KEY_LORA_DROPOUT, KEY_LORA_TARGETS, KEY_LORA_RSLORA, KEY_LORA_INIT,
    KEY_LIZA_ENABLED, KEY_LIZA_PRESET, KEY_LIZA_ORDER, KEY_LIZA_ALPHA_GATE, KEY_LIZA_BETA_GATE, KEY_LIZA_TRICK,
    KEY_LIZA_LINEAR, KEY_LIZA_CHUNK, KEY_LIZA_BASE_SCALE,
    KEY_MAG_MODE, KEY_MAG_MU0, KEY_MAG_MU1, KEY_MAG_STEPS, KEY_MAG_VALUES, KEY_MAG_PERIOD, KEY_MAG_SHAPE,
    KEY_MAG_CROSS,
    KEY_COMPUTE_MATMUL, KEY_COMPUTE_RECOMPUTE,
    KEY_DATA_FORMAT, KEY_DATA_PATH, KEY_DATA_SEQ_LEN, KEY_DATA_LONG_DOCS, KEY_DATA_PACKING, KEY_DATA_TOKENIZER,
    KEY_DATA_CACHE, KEY_DATA_BAD, KEY_DATA_TEXT_FIELD, KEY_DATA_TXT_UNIT, KEY_DATA_ADD_BOS, KEY_DATA_ADD_EOS,
    KEY_ALPACA_PROMPT, KEY_ALPACA_PROMPT_NI, KEY_CHAT_SYSTEM, KEY_CHAT_USER, KEY_CHAT_ASSISTANT,
    KEY_BATCH_GLOBAL, KEY_BATCH_MICRO,
    KEY_OPT_LR, KEY_OPT_MIN_LR, KEY_OPT_WD, KEY_OPT_BETA1, KEY_OPT_BETA2, KEY_OPT_EPS, KEY_OPT_CLIP,
    KEY_SCHED_KIND, KEY_SCHED_WARMUP, KEY_SCHED_TOTAL, KEY_SCHED_EPOCHS,
    KEY_EVAL_PATH, KEY_EVAL_SPLIT, KEY_EVAL_EVERY, KEY_EVAL_MAX_ROWS,
    KEY_CKPT_EVERY, KEY_CKPT_KEEP, KEY_LOG_EVERY, KEY_FAULTS_BAD, KEY_DIST_BUCKET, KEY_EXPORT_DIR,
    NKEYS
};

const char *const tp_cfg_ch_trainable[] = {"lora", "projections", "all", NULL};
const char *const tp_cfg_ch_init[] = {"default", "random", "pissa", "pissa_niter_K", NULL}; /* K: 0..64 */
const char *const tp_cfg_ch_preset[] = {"delta_rule",      "delta_rule_v",        "delta_rule_kv",
                                        "delta_rule_gelu", "gated_delta_rule",    "delta_product",
                                        "gated_delta_product", "delta_product_r", "delta_product_c", NULL};
const char *const tp_cfg_ch_gate[] = {"c", "k", "v", "kv", NULL};        /* TP_GATE_* order */
const char *const tp_cfg_ch_trick[] = {"dt", "rot", "rdt", NULL};        /* TP_TRICK_* order */
const char *const tp_cfg_ch_mag_mode[] = {"constant", "gradual", "cyclic", "learnable", NULL}; /* TP_MAG_* */
const char *const tp_cfg_ch_shape[] = {"scalar", "vector", NULL};
const char *const tp_cfg_ch_matmul[] = {"auto", "f32", "bf16", NULL};
const char *const tp_cfg_ch_format[] = {"tokens", "text", "alpaca", "chat", NULL};
const char *const tp_cfg_ch_long_docs[] = {"split", "drop", NULL};
const char *const tp_cfg_ch_packing[] = {"pack", "pad", NULL};
const char *const tp_cfg_ch_bad[] = {"skip", "abort", NULL};
const char *const tp_cfg_ch_txt_unit[] = {"line", "paragraph", "document", NULL};
const char *const tp_cfg_ch_add_bos[] = {"auto", "true", "false", NULL};
const char *const tp_cfg_ch_sched[] = {"cosine", "linear", "constant", NULL}; /* TP_LR_* order */

typedef struct keydef {
    int sec;
    const char *dotted;
    int kind;
    long long imin, imax;        /* K_INT */
    double dmin, dmax;           /* K_NUM (±INFINITY: unbounded) */
    int lo_open, hi_open;        /* K_NUM: bound excluded */
    const char *const *choices;  /* K_ENUM */
    int required, nullable;      /* K_STR: null/"" means "not set" */
} keydef;

#define KI(id, s, d, lo, hi) [id] = {.sec = s, .dotted = d, .kind = K_INT, .imin = lo, .imax = hi}
#define KN(id, s, d, lo, lo_o, hi, hi_o) \
    [id] = {.sec = s, .dotted = d, .kind = K_NUM, .dmin = lo, .lo_open = lo_o, .dmax = hi, .hi_open = hi_o}
#define KB(id, s, d) [id] = {.sec = s, .dotted = d, .kind = K_BOOL}
#define KE(id, s, d, ch) [id] = {.sec = s, .dotted = d, .kind = K_ENUM, .choices = ch}
#define KIR(id, s, d, lo, hi) [id] = {.sec = s, .dotted = d, .kind = K_INT, .imin = lo, .imax = hi, .required = 1}
#define KS(id, s, d, req) [id] = {.sec = s, .dotted = d, .kind = K_STR, .required = req, .nullable = !(req)}
#define KT(id, s, d) [id] = {.sec = s, .dotted = d, .kind = K_TEXT}

static const keydef keys[NKEYS] = {
    KS(KEY_MODEL_PATH, S_MODEL, "model.path", 1),
    KS(KEY_MODEL_HUB_ID, S_MODEL, "model.hub_id", 0),
    KS(KEY_RUN_DIR, S_RUN, "run.dir", 1),
    KI(KEY_SEED, S_TOP, "seed", 0, 9007199254740992LL), /* 2^53: trainer_state.json holds it as a JSON number */
    KE(KEY_TRAINABLE, S_TOP, "trainable", tp_cfg_ch_trainable),
    KI(KEY_LORA_R, S_LORA, "lora.r", 1, 65536),
    KN(KEY_LORA_ALPHA, S_LORA, "lora.alpha", 0, 1, INFINITY, 0),
    KN(KEY_LORA_DROPOUT, S_LORA, "lora.dropout", 0, 0, 1, 1),
    [KEY_LORA_TARGETS] = {.sec = S_LORA, .dotted = "lora.target_modules", .kind = K_TARGETS},
    KB(KEY_LORA_RSLORA, S_LORA, "lora.rslora"),
    KE(KEY_LORA_INIT, S_LORA, "lora.init", tp_cfg_ch_init),
    KB(KEY_LIZA_ENABLED, S_LIZA, "liza.enabled"),
    KE(KEY_LIZA_PRESET, S_LIZA, "liza.preset", tp_cfg_ch_preset),
    KI(KEY_LIZA_ORDER, S_LIZA, "liza.order", 1, 8),
    KE(KEY_LIZA_ALPHA_GATE, S_LIZA, "liza.alpha_gate", tp_cfg_ch_gate),
    KE(KEY_LIZA_BETA_GATE, S_LIZA, "liza.beta_gate", tp_cfg_ch_gate),
    KE(KEY_LIZA_TRICK, S_LIZA, "liza.trick", tp_cfg_ch_trick),
    KB(KEY_LIZA_LINEAR, S_LIZA, "liza.linear"),
    KI(KEY_LIZA_CHUNK, S_LIZA, "liza.chunk_size", 1, 4096),
    KB(KEY_LIZA_BASE_SCALE, S_LIZA, "liza.base_scale_attn"),
    KE(KEY_MAG_MODE, S_MAG, "mag.mode", tp_cfg_ch_mag_mode),
    KN(KEY_MAG_MU0, S_MAG, "mag.mu0", 0, 0, 1, 0),
    KN(KEY_MAG_MU1, S_MAG, "mag.mu1", 0, 0, 1, 0),
    KI(KEY_MAG_STEPS, S_MAG, "mag.steps", 1, BIG),
    [KEY_MAG_VALUES] = {.sec = S_MAG, .dotted = "mag.values", .kind = K_VALUES, .dmin = 0, .dmax = 1},
    KI(KEY_MAG_PERIOD, S_MAG, "mag.period", 1, BIG),
    KE(KEY_MAG_SHAPE, S_MAG, "mag.learnable_shape", tp_cfg_ch_shape),
    KB(KEY_MAG_CROSS, S_MAG, "mag.cross_gate"),
    KE(KEY_COMPUTE_MATMUL, S_COMPUTE, "compute.matmul", tp_cfg_ch_matmul),
    KB(KEY_COMPUTE_RECOMPUTE, S_COMPUTE, "compute.recompute"),
    KE(KEY_DATA_FORMAT, S_DATA, "data.format", tp_cfg_ch_format),
    KS(KEY_DATA_PATH, S_DATA, "data.path", 1),
    KI(KEY_DATA_SEQ_LEN, S_DATA, "data.seq_len", 2, 1LL << 24),
    KE(KEY_DATA_LONG_DOCS, S_DATA, "data.long_docs", tp_cfg_ch_long_docs),
    KE(KEY_DATA_PACKING, S_DATA, "data.packing", tp_cfg_ch_packing),
    KS(KEY_DATA_TOKENIZER, S_DATA, "data.tokenizer", 0),
    KS(KEY_DATA_CACHE, S_DATA, "data.cache_dir", 0),
    KE(KEY_DATA_BAD, S_DATA, "data.bad_records", tp_cfg_ch_bad),
    KT(KEY_DATA_TEXT_FIELD, S_DATA, "data.text_field"),
    KE(KEY_DATA_TXT_UNIT, S_DATA, "data.txt_unit", tp_cfg_ch_txt_unit),
    KE(KEY_DATA_ADD_BOS, S_DATA, "data.add_bos", tp_cfg_ch_add_bos),
    KB(KEY_DATA_ADD_EOS, S_DATA, "data.add_eos"),
    KT(KEY_ALPACA_PROMPT, S_ALPACA, "data.alpaca.prompt"),
    KT(KEY_ALPACA_PROMPT_NI, S_ALPACA, "data.alpaca.prompt_no_input"),
    KT(KEY_CHAT_SYSTEM, S_CHAT, "data.chat.system"),
    KT(KEY_CHAT_USER, S_CHAT, "data.chat.user"),
    KT(KEY_CHAT_ASSISTANT, S_CHAT, "data.chat.assistant"),
    KIR(KEY_BATCH_GLOBAL, S_BATCH, "batch.global", 1, BIG),
    KI(KEY_BATCH_MICRO, S_BATCH, "batch.micro", 1, BIG),
    KN(KEY_OPT_LR, S_OPTIM, "optimizer.lr", 0, 0, INFINITY, 0),
    KN(KEY_OPT_MIN_LR, S_OPTIM, "optimizer.min_lr", 0, 0, INFINITY, 0),
    KN(KEY_OPT_WD, S_OPTIM, "optimizer.weight_decay", 0, 0, INFINITY, 0),
    KN(KEY_OPT_BETA1, S_OPTIM, "optimizer.beta1", 0, 0, 1, 1),
    KN(KEY_OPT_BETA2, S_OPTIM, "optimizer.beta2", 0, 0, 1, 1),
    KN(KEY_OPT_EPS, S_OPTIM, "optimizer.eps", 0, 0, INFINITY, 0),
    KN(KEY_OPT_CLIP, S_OPTIM, "optimizer.max_grad_norm", -INFINITY, 0, INFINITY, 0),
    KE(KEY_SCHED_KIND, S_SCHED, "schedule.kind", tp_cfg_ch_sched),
    KI(KEY_SCHED_WARMUP, S_SCHED, "schedule.warmup_steps", 0, BIG),
    KI(KEY_SCHED_TOTAL, S_SCHED, "schedule.total_steps", 1, BIG), /* this or schedule.epochs (load checks) */
    KN(KEY_SCHED_EPOCHS, S_SCHED, "schedule.epochs", 0, 1, 1e9, 0),
    KS(KEY_EVAL_PATH, S_EVAL, "eval.path", 0),
    KN(KEY_EVAL_SPLIT, S_EVAL, "eval.split", 0, 1, 1, 1),
    KI(KEY_EVAL_EVERY, S_EVAL, "eval.every", 0, BIG),
    KI(KEY_EVAL_MAX_ROWS, S_EVAL, "eval.max_rows", 0, BIG),
    KI(KEY_CKPT_EVERY, S_CKPT, "checkpoint.every", 0, BIG),
    KI(KEY_CKPT_KEEP, S_CKPT, "checkpoint.keep", 1, 1000000),
    KI(KEY_LOG_EVERY, S_LOG, "logging.every", 1, BIG),
    KI(KEY_FAULTS_BAD, S_FAULTS, "faults.max_bad_steps", 1, 1000000),
    KN(KEY_DIST_BUCKET, S_DIST, "dist.bucket_mb", 0, 1, 65536, 0),
    KS(KEY_EXPORT_DIR, S_EXPORT, "export.model_dir", 0),
};

/* The part of a dotted name after its section ("global" of "batch.global",
 * "prompt" of "data.alpaca.prompt"). */
static const char *leaf(int id) {
    return keys[id].sec == S_TOP ? keys[id].dotted : keys[id].dotted + strlen(sec_names[keys[id].sec]) + 1;
}

static const char *sec_leaf(int s) {
    return sec_parent[s] == S_TOP ? sec_names[s] : sec_names[s] + strlen(sec_names[sec_parent[s]]) + 1;
}

/* A section by its full dotted name ("data.alpaca"). */
static int find_section(const char *name) {
    for (int s = 1; s < NSEC; s++)
        if (!strcmp(name, sec_names[s])) return s;
    return -1;
}

/* A section written as `name:` inside section parent. */
static int find_child(int parent, const char *name) {
    for (int s = 1; s < NSEC; s++)
        if (sec_parent[s] == parent && !strcmp(name, sec_leaf(s))) return s;
    return -1;
}

static int find_key_in(int sec, const char *name) {
    for (int i = 0; i < NKEYS; i++)
        if (keys[i].sec == sec && !strcmp(leaf(i), name)) return i;
    return -1;
}

static int find_dotted(const char *dotted) {
    for (int i = 0; i < NKEYS; i++)
        if (!strcmp(keys[i].dotted, dotted)) return i;
    return -1;
}

/* "global, micro" (keys of a section) or the top-level names. */
static void list_names(int sec, char *buf, size_t n) {
    size_t len = 0;
    buf[0] = 0;
#define APPEND(str)                                                                          \
    do {                                                                                     \
        int w_ = snprintf(buf + len, n - len, "%s%s", len ? ", " : "", (str));               \
        if (w_ > 0) len = (size_t)w_ < n - len ? len + (size_t)w_ : n - 1;                   \
    } while (0)
    if (sec == S_TOP) { /* in file order of docs/config.md */
        static const int order[] = {S_MODEL, S_RUN, -KEY_SEED - 1, -KEY_TRAINABLE - 1, S_LORA, S_LIZA, S_MAG,
                                    S_COMPUTE, S_DATA, S_BATCH, S_OPTIM, S_SCHED, S_EVAL, S_CKPT, S_LOG,
                                    S_FAULTS, S_DIST, S_EXPORT};
        for (size_t i = 0; i < sizeof order / sizeof *order; i++)
            APPEND(order[i] >= 0 ? sec_names[order[i]] : keys[-order[i] - 1].dotted);
    } else {
        for (int i = 0; i < NKEYS; i++)
            if (keys[i].sec == sec) APPEND(leaf(i));
        for (int s = 1; s < NSEC; s++)
            if (sec_parent[s] == sec) APPEND(sec_leaf(s));
    }
#undef APPEND
}

/* ---- messages ------------------------------------------------------------ */

/* Where a value came from: a file (with lines) or a --set. */
typedef struct ctx {
    tp_train_cfg *c;
    tp_err *err;
    const char *file;         /* NULL: --set */
    yaml_document_t *doc;
    const char *text;         /* the YAML source (to see tags that equal the default, e.g. !!str) */
    size_t text_len;
    size_t key_line[NKEYS];   /* 1-based line where the file set the key, 0: not set */
    size_t sec_line[NSEC];
} ctx;

static size_t line_of(const yaml_node_t *n) { return n ? n->start_mark.line + 1 : 0; }

/* Copy s (len bytes) for a message: one line, printable, at most ~48 bytes. */
static void quote_text(const char *s, size_t len, char *out, size_t n) {
    size_t o = 0, i = 0;
    for (; i < len && o + 4 < n && i < 48; i++) {
        unsigned char ch = (unsigned char)s[i];
        out[o++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    if (i < len && o + 4 < n) { out[o++] = '.'; out[o++] = '.'; out[o++] = '.'; }
    out[o] = 0;
}

/* "<file>:<line>: <key>[<idx>]: <msg>" or "--set <key>[<idx>]: <msg>" */
__attribute__((format(printf, 5, 6))) static int fail_at(ctx *x, const yaml_node_t *at, const char *key, int idx,
                                                        const char *fmt, ...) {
    char msg[TP_ERR_LEN], ix[24] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (idx >= 0) snprintf(ix, sizeof ix, "[%d]", idx);
    if (x->file) return tp_fail(x->err, TP_EINVAL, "%s:%zu: %s%s: %s", x->file, line_of(at), key, ix, msg);
    return tp_fail(x->err, TP_EINVAL, "--set %s%s: %s", key, ix, msg);
}

static int is_null(const yaml_node_t *v) {
    if (v->type != YAML_SCALAR_NODE || v->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *s = (const char *)v->data.scalar.value;
    return !strcmp(s, "") || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

/* What was found, for "got ...". */
static void describe(const yaml_node_t *v, char *out, size_t n) {
    char q[64];
    if (v->type == YAML_MAPPING_NODE) snprintf(out, n, "a mapping");
    else if (v->type == YAML_SEQUENCE_NODE) snprintf(out, n, "a list");
    else if (v->type != YAML_SCALAR_NODE) snprintf(out, n, "nothing");
    else if (is_null(v)) snprintf(out, n, "null (no value)");
    else {
        quote_text((const char *)v->data.scalar.value, v->data.scalar.length, q, sizeof q);
        if (v->data.scalar.style == YAML_PLAIN_SCALAR_STYLE) snprintf(out, n, "'%s'", q);
        else snprintf(out, n, "the quoted string \"%s\"", q);
    }
}

/* Explicit tags (!!int, !foo) would change what a value means: refused. */
static int check_tag(ctx *x, const char *key, int idx, const yaml_node_t *v) {
    const char *def = v->type == YAML_SCALAR_NODE     ? YAML_DEFAULT_SCALAR_TAG
                      : v->type == YAML_SEQUENCE_NODE ? YAML_DEFAULT_SEQUENCE_TAG
                                                      : YAML_DEFAULT_MAPPING_TAG;
    /* libyaml gives an untagged node the default tag, so "!!str x" looks
     * like "x": the source text at the node tells them apart */
    int explicit_tag = x->text && v->start_mark.index < x->text_len && x->text[v->start_mark.index] == '!';
    if (v->tag && (strcmp((const char *)v->tag, def) || explicit_tag)) {
        char q[64];
        quote_text((const char *)v->tag, strlen((const char *)v->tag), q, sizeof q);
        return fail_at(x, v, key, idx, "YAML tags are not supported, found tag '%s'", q);
    }
    if (v->type == YAML_SCALAR_NODE && strlen((const char *)v->data.scalar.value) != v->data.scalar.length)
        return fail_at(x, v, key, idx, "the value contains a NUL character");
    return TP_OK;
}

/* ---- value parsing -------------------------------------------------------- */

/* 0: ok; -1: not a decimal integer; -2: out of int64 range */
static int parse_i64(const char *s, long long *out) {
    const char *p = s;
    if (*p == '+' || *p == '-') p++;
    if (!*p) return -1;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q)) return -1;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno == ERANGE) return -2;
    if (*end) return -1;
    *out = v;
    return 0;
}

/* 0: ok; -1: not a decimal number; -2: not finite (inf, nan, overflow) */
static int parse_f64(const char *s, double *out) {
    static const char *const nonfinite[] = {".inf", "+.inf", "-.inf", ".nan", "inf", "+inf", "-inf",
                                            "nan", "infinity", "+infinity", "-infinity", NULL};
    char low[16];
    size_t i = 0;
    for (; s[i] && i + 1 < sizeof low; i++) low[i] = (char)tolower((unsigned char)s[i]);
    low[i] = 0;
    if (!s[i])
        for (const char *const *p = nonfinite; *p; p++)
            if (!strcmp(low, *p)) return -2;
    if (!*s) return -1;
    for (const char *q = s; *q; q++)
        if (!isdigit((unsigned char)*q) && !strchr("+-.eE", *q)) return -1;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end) return -1;
    if (!isfinite(v)) return -2;
    *out = v;
    return 0;
}

/* "a positive integer", "an integer in [1, 8]", ... */
static void int_expect(const keydef *k, char *out, size_t n) {
    if (k->imax >= BIG) {
        if (k->imin == 0) snprintf(out, n, "a non-negative integer");
        else if (k->imin == 1) snprintf(out, n, "a positive integer");
        else snprintf(out, n, "an integer >= %lld", k->imin);
    } else {
        snprintf(out, n, "an integer in [%lld, %lld]", k->imin, k->imax);
    }
}

static void num_expect(double lo, int lo_open, double hi, int hi_open, char *out, size_t n) {
    if (isinf(lo) && isinf(hi)) snprintf(out, n, "a number");
    else if (lo == 0 && isinf(hi)) snprintf(out, n, "a %s number", lo_open ? "positive" : "non-negative");
    else snprintf(out, n, "a number in %c%g, %g%c", lo_open ? '(' : '[', lo, hi, hi_open ? ')' : ']');
}

static void enum_expect(const char *const *ch, char *out, size_t n) {
    size_t len = 0, cnt = 0;
    while (ch[cnt]) cnt++;
    out[0] = 0;
    for (size_t i = 0; i < cnt && len + 1 < n; i++) {
        int w = snprintf(out + len, n - len, "%s%s", i == 0 ? "" : i + 1 == cnt ? " or " : ", ", ch[i]);
        if (w > 0) len = (size_t)w < n - len ? len + (size_t)w : n - 1;
    }
    if (cnt == 1 && len + 1 < n) snprintf(out + len, n - len, " (the only value supported so far)");
}

#define UNQUOTE " (write numbers and booleans without quotes)"

/* A scalar for key (not null, not a list or mapping). */
static int need_scalar(ctx *x, int id, int idx, const yaml_node_t *v, const char *expect, const char **s) {
    char got[160];
    int rc = check_tag(x, keys[id].dotted, idx, v);
    if (rc) return rc;
    if (v->type != YAML_SCALAR_NODE || is_null(v)) {
        describe(v, got, sizeof got);
        return fail_at(x, v, keys[id].dotted, idx, "expected %s, got %s", expect, got);
    }
    *s = (const char *)v->data.scalar.value;
    return TP_OK;
}

static int get_int(ctx *x, int id, const yaml_node_t *v, long long *out) {
    const keydef *k = &keys[id];
    char exp[96], got[160];
    const char *s;
    int_expect(k, exp, sizeof exp);
    int rc = need_scalar(x, id, -1, v, exp, &s);
    if (rc) return rc;
    describe(v, got, sizeof got);
    if (v->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return fail_at(x, v, k->dotted, -1, "expected %s, got %s%s", exp, got, UNQUOTE);
    long long n = 0;
    int pr = parse_i64(s, &n);
    if (pr == 0 && n >= k->imin && n <= k->imax) { *out = n; return TP_OK; }
    if (pr != -1 && k->imax >= BIG && (pr == -2 || n > k->imax))
        return fail_at(x, v, k->dotted, -1, "expected %s of at most %lld, got %s", exp, k->imax, got);
    return fail_at(x, v, k->dotted, -1, "expected %s, got %s", exp, got);
}

/* One number in [lo, hi] from scalar text (plain style checked by caller). */
static int num_text(ctx *x, const yaml_node_t *at, const char *key, int idx, const char *s, const keydef *k,
                    double *out) {
    char exp[96], q[64];
    num_expect(k->dmin, k->lo_open, k->dmax, k->hi_open, exp, sizeof exp);
    quote_text(s, strlen(s), q, sizeof q);
    double d = 0;
    int pr = parse_f64(s, &d);
    if (pr == -2) return fail_at(x, at, key, idx, "expected a finite number, got '%s'", q);
    if (pr == 0 && (k->lo_open ? d > k->dmin : d >= k->dmin) && (k->hi_open ? d < k->dmax : d <= k->dmax)) {
        *out = d;
        return TP_OK;
    }
    return fail_at(x, at, key, idx, "expected %s, got '%s'", exp, q);
}

static int get_num(ctx *x, int id, const yaml_node_t *v, double *out) {
    const keydef *k = &keys[id];
    char exp[96], got[160];
    const char *s;
    num_expect(k->dmin, k->lo_open, k->dmax, k->hi_open, exp, sizeof exp);
    int rc = need_scalar(x, id, -1, v, exp, &s);
    if (rc) return rc;
    if (v->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) {
        describe(v, got, sizeof got);
        return fail_at(x, v, k->dotted, -1, "expected %s, got %s%s", exp, got, UNQUOTE);
    }
    return num_text(x, v, k->dotted, -1, s, k, out);
}

static int get_bool(ctx *x, int id, const yaml_node_t *v, int *out) {
    char got[160];
    const char *s;
    int rc = need_scalar(x, id, -1, v, "true or false", &s);
    if (rc) return rc;
    if (v->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && (!strcmp(s, "true") || !strcmp(s, "false"))) {
        *out = s[0] == 't';
        return TP_OK;
    }
    describe(v, got, sizeof got);
    return fail_at(x, v, keys[id].dotted, -1, "expected true or false, got %s%s", got,
                   v->data.scalar.style == YAML_PLAIN_SCALAR_STYLE ? "" : UNQUOTE);
}

static int get_enum(ctx *x, int id, const yaml_node_t *v, int *out) {
    char exp[256], got[160];
    const char *s;
    enum_expect(keys[id].choices, exp, sizeof exp);
    int rc = need_scalar(x, id, -1, v, exp, &s);
    if (rc) return rc;
    for (int i = 0; keys[id].choices[i]; i++)
        if (!strcmp(s, keys[id].choices[i])) { *out = i; return TP_OK; }
    describe(v, got, sizeof got);
    return fail_at(x, v, keys[id].dotted, -1, "expected %s, got %s", exp, got);
}

/* A path; null or "" means "not set" for optional keys. */
static int get_str(ctx *x, int id, const yaml_node_t *v, char *dst, size_t cap) {
    const keydef *k = &keys[id];
    char got[160];
    int rc = check_tag(x, k->dotted, -1, v);
    if (rc) return rc;
    if (v->type == YAML_SCALAR_NODE && (is_null(v) || v->data.scalar.length == 0)) {
        if (k->nullable) { dst[0] = 0; return TP_OK; }
        describe(v, got, sizeof got);
        return fail_at(x, v, k->dotted, -1, "expected a non-empty path, got %s", got);
    }
    if (v->type != YAML_SCALAR_NODE) {
        describe(v, got, sizeof got);
        return fail_at(x, v, k->dotted, -1, "expected a path (a string), got %s", got);
    }
    if (v->data.scalar.length >= cap)
        return fail_at(x, v, k->dotted, -1, "expected a path of at most %zu bytes, got %zu bytes", cap - 1,
                       v->data.scalar.length);
    memcpy(dst, v->data.scalar.value, v->data.scalar.length + 1);
    return TP_OK;
}

/* A string (templates, field names): any non-empty scalar, kept as written. */
static int get_text(ctx *x, int id, const yaml_node_t *v, char *dst, size_t cap) {
    const keydef *k = &keys[id];
    char got[160];
    int rc = check_tag(x, k->dotted, -1, v);
    if (rc) return rc;
    if (v->type != YAML_SCALAR_NODE || is_null(v) || v->data.scalar.length == 0) {
        describe(v, got, sizeof got);
        return fail_at(x, v, k->dotted, -1, "expected a non-empty string, got %s", got);
    }
    if (v->data.scalar.length >= cap)
        return fail_at(x, v, k->dotted, -1, "expected a string of at most %zu bytes, got %zu bytes", cap - 1,
                       v->data.scalar.length);
    memcpy(dst, v->data.scalar.value, v->data.scalar.length + 1);
    return TP_OK;
}

/* The items of a list value: a YAML list of scalars or one comma-separated
 * scalar. Calls item(x, at, idx, text, len, plain, arg) for each. */
typedef int (*item_fn)(ctx *x, int id, const yaml_node_t *at, int idx, const char *s, size_t len, int plain,
                       void *arg);

static int for_items(ctx *x, int id, const yaml_node_t *v, const char *one, const char *expect, item_fn fn,
                     void *arg) {
    const char *key = keys[id].dotted;
    char got[160];
    int rc = check_tag(x, key, -1, v);
    if (rc) return rc;
    if (v->type == YAML_SEQUENCE_NODE) {
        int idx = 0;
        const yaml_node_item_t *it = v->data.sequence.items.start;
        if (it == v->data.sequence.items.top)
            return fail_at(x, v, key, -1, "expected a non-empty list of %s, got an empty list", expect);
        for (; it < v->data.sequence.items.top; it++, idx++) {
            const yaml_node_t *e = yaml_document_get_node(x->doc, *it);
            if (!e) return fail_at(x, v, key, idx, "broken YAML document");
            if ((rc = check_tag(x, key, idx, e))) return rc;
            if (e->type != YAML_SCALAR_NODE || is_null(e)) {
                describe(e, got, sizeof got);
                return fail_at(x, e, key, idx, "expected %s, got %s", one, got);
            }
            if ((rc = fn(x, id, e, idx, (const char *)e->data.scalar.value, e->data.scalar.length,
                         e->data.scalar.style == YAML_PLAIN_SCALAR_STYLE, arg)))
                return rc;
        }
        return TP_OK;
    }
    if (v->type != YAML_SCALAR_NODE || is_null(v)) {
        describe(v, got, sizeof got);
        return fail_at(x, v, key, -1, "expected a list of %s (YAML list or comma-separated), got %s", expect, got);
    }
    const char *p = (const char *)v->data.scalar.value;
    for (int idx = 0;; idx++) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        while (n && isspace((unsigned char)*p)) { p++; n--; }
        while (n && isspace((unsigned char)p[n - 1])) n--;
        if ((rc = fn(x, id, v, idx, p, n, 1, arg))) return rc;
        if (!e) break;
        p = e + 1;
    }
    return TP_OK;
}

static int target_item(ctx *x, int id, const yaml_node_t *at, int idx, const char *s, size_t len, int plain,
                       void *arg) {
    (void)plain;
    unsigned *mask = arg;
    char q[64];
    quote_text(s, len, q, sizeof q);
    for (int m = 0; m < TP_NMOD; m++)
        if (strlen(tp_module_names[m]) == len && !memcmp(s, tp_module_names[m], len)) {
            if (*mask & (1u << m)) return fail_at(x, at, keys[id].dotted, idx, "'%s' is listed twice", q);
            *mask |= 1u << m;
            return TP_OK;
        }
    return fail_at(x, at, keys[id].dotted, idx,
                   "expected a module name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), "
                   "got '%s'", q);
}

typedef struct values_acc {
    double v[TP_MAG_MAX_VALUES];
    int n;
} values_acc;

static int value_item(ctx *x, int id, const yaml_node_t *at, int idx, const char *s, size_t len, int plain,
                      void *arg) {
    values_acc *a = arg;
    char buf[64], q[64];
    quote_text(s, len, q, sizeof q);
    if (!plain)
        return fail_at(x, at, keys[id].dotted, idx, "expected a number in [0, 1], got the quoted string \"%s\"%s", q,
                       UNQUOTE);
    if (a->n == TP_MAG_MAX_VALUES)
        return fail_at(x, at, keys[id].dotted, idx, "expected at most %d values", TP_MAG_MAX_VALUES);
    if (len >= sizeof buf) return fail_at(x, at, keys[id].dotted, idx, "expected a number in [0, 1], got '%s'", q);
    memcpy(buf, s, len);
    buf[len] = 0;
    return num_text(x, at, keys[id].dotted, idx, buf, &keys[id], &a->v[a->n++]);
}

/* ---- applying a value -------------------------------------------------- */

static int apply_key(ctx *x, int id, const yaml_node_t *v) {
    tp_train_cfg *c = x->c;
    long long n = 0;
    double d = 0;
    int b = 0, e = 0, rc;
    switch (keys[id].kind) {
    case K_INT:
        if ((rc = get_int(x, id, v, &n))) return rc;
        switch (id) {
        case KEY_SEED: c->dec.seed = (uint64_t)n; break;
        case KEY_LORA_R: c->dec.lora.r = (int)n; break;
        case KEY_LIZA_ORDER: c->dec.liza.order = (int)n; break;
        case KEY_LIZA_CHUNK: c->dec.liza.chunk = (int)n; break;
        case KEY_MAG_STEPS: c->dec.mag.steps = n; break;
        case KEY_MAG_PERIOD: c->dec.mag.period = n; break;
        case KEY_DATA_SEQ_LEN: c->data.seq_len = n; break;
        case KEY_BATCH_GLOBAL: c->global_batch = n; break;
        case KEY_BATCH_MICRO: c->micro_batch = n; break;
        case KEY_SCHED_WARMUP: c->sched.warmup_steps = n; break;
        case KEY_SCHED_TOTAL:
            c->sched.total_steps = n;
            if (!x->file) c->epochs = 0; /* --set replaces the file's schedule.epochs */
            break;
        case KEY_EVAL_EVERY: c->eval.every = n; break;
        case KEY_EVAL_MAX_ROWS: c->eval.max_rows = n; break;
        case KEY_CKPT_EVERY: c->ckpt_every = n; break;
        case KEY_CKPT_KEEP: c->ckpt_keep = (int)n; break;
        case KEY_LOG_EVERY: c->log_every = n; break;
        case KEY_FAULTS_BAD: c->max_bad_steps = (int)n; break;
        }
        return TP_OK;
    case K_NUM:
        if ((rc = get_num(x, id, v, &d))) return rc;
        switch (id) {
        case KEY_LORA_ALPHA: c->dec.lora.alpha = d; break;
        case KEY_LORA_DROPOUT: c->dec.lora.dropout = d; break;
        case KEY_MAG_MU0: c->dec.mag.mu0 = d; break;
        case KEY_MAG_MU1: c->dec.mag.mu1 = d; break;
        case KEY_OPT_LR: c->sched.peak_lr = d; break;
        case KEY_OPT_MIN_LR: c->sched.min_lr = d; break;
        case KEY_OPT_WD: c->weight_decay = d; break;
        case KEY_OPT_BETA1: c->adamw.beta1 = d; break;
        case KEY_OPT_BETA2: c->adamw.beta2 = d; break;
        case KEY_OPT_EPS: c->adamw.eps = d; break;
        case KEY_OPT_CLIP: c->max_grad_norm = d; break;
        case KEY_DIST_BUCKET: c->bucket_mb = d; break;
        case KEY_SCHED_EPOCHS:
            c->epochs = d;
            if (!x->file) c->sched.total_steps = 0; /* --set replaces the file's schedule.total_steps */
            break;
        case KEY_EVAL_SPLIT: c->eval.split = d; break;
        }
        return TP_OK;
    case K_BOOL:
        if ((rc = get_bool(x, id, v, &b))) return rc;
        switch (id) {
        case KEY_LORA_RSLORA: c->dec.lora.rslora = b; break;
        case KEY_LIZA_ENABLED: c->dec.liza.enabled = b; break;
        case KEY_LIZA_LINEAR: c->dec.liza.linear = b; break;
        case KEY_LIZA_BASE_SCALE: c->dec.liza.base_scale_attn = b; break;
        case KEY_MAG_CROSS: c->dec.mag.cross_gate = b; break;
        case KEY_COMPUTE_RECOMPUTE: c->dec.recompute = b; break;
        case KEY_DATA_ADD_EOS: c->data.add_eos = b; break;
        }
        return TP_OK;
    case K_ENUM:
        if (id == KEY_LORA_INIT && v->type == YAML_SCALAR_NODE &&
            !strncmp((const char *)v->data.scalar.value, "pissa_niter_", 12)) {
            const char *k = (const char *)v->data.scalar.value + 12;
            long long K = -1;
            char got[160];
            if ((rc = check_tag(x, keys[id].dotted, -1, v))) return rc;
            if (parse_i64(k, &K) != 0 || K < 0 || K > 64 || *k == '+' || *k == '-') {
                describe(v, got, sizeof got);
                return fail_at(x, v, keys[id].dotted, -1,
                               "expected default, random, pissa or pissa_niter_K with K an integer in [0, 64], got %s",
                               got);
            }
            c->dec.lora.init_random = 0;
            c->pissa = 1;
            c->pissa_niter = (int)K;
            return TP_OK;
        }
        if ((rc = get_enum(x, id, v, &e))) return rc;
        if (id == KEY_LORA_INIT && e == 3) { /* the literal "pissa_niter_K" */
            char got[160];
            describe(v, got, sizeof got);
            return fail_at(x, v, keys[id].dotted, -1, "expected pissa_niter_<K> with K an integer in [0, 64], got %s",
                           got);
        }
        switch (id) {
        case KEY_TRAINABLE: c->dec.trainable = (tp_trainable)e; break;
        case KEY_LORA_INIT:
            c->dec.lora.init_random = e == 1;
            c->pissa = e == 2;
            c->pissa_niter = -1;
            break;
        case KEY_LIZA_PRESET:
            if (tp_liza_preset(tp_cfg_ch_preset[e], &c->dec.liza))
                return fail_at(x, v, keys[id].dotted, -1, "preset '%s' is not known to the decoder", tp_cfg_ch_preset[e]);
            break;
        case KEY_LIZA_ALPHA_GATE: c->dec.liza.alpha_gate = e; break;
        case KEY_LIZA_BETA_GATE: c->dec.liza.beta_gate = e; break;
        case KEY_LIZA_TRICK: c->dec.liza.trick = e; break;
        case KEY_MAG_MODE: c->dec.mag.mode = e; break;
        case KEY_MAG_SHAPE: c->dec.mag.vector = e; break;
        case KEY_COMPUTE_MATMUL:
            c->matmul_auto = e == 0;
            c->dec.matmul = e == 2 ? TP_MM_BF16 : TP_MM_F32;
            break;
        case KEY_DATA_FORMAT: snprintf(c->data.format, sizeof c->data.format, "%s", tp_cfg_ch_format[e]); break;
        case KEY_DATA_LONG_DOCS: snprintf(c->data.long_docs, sizeof c->data.long_docs, "%s", tp_cfg_ch_long_docs[e]); break;
        case KEY_DATA_PACKING: snprintf(c->data.packing, sizeof c->data.packing, "%s", tp_cfg_ch_packing[e]); break;
        case KEY_DATA_BAD: snprintf(c->data.bad_records, sizeof c->data.bad_records, "%s", tp_cfg_ch_bad[e]); break;
        case KEY_DATA_TXT_UNIT: snprintf(c->data.txt_unit, sizeof c->data.txt_unit, "%s", tp_cfg_ch_txt_unit[e]); break;
        case KEY_DATA_ADD_BOS: snprintf(c->data.add_bos, sizeof c->data.add_bos, "%s", tp_cfg_ch_add_bos[e]); break;
        case KEY_SCHED_KIND:
            if (tp_lr_schedule_parse_kind(tp_cfg_ch_sched[e], &c->sched.kind))
                return fail_at(x, v, keys[id].dotted, -1, "kind '%s' is not known to the scheduler", tp_cfg_ch_sched[e]);
            break;
        }
        return TP_OK;
    case K_STR:
        switch (id) {
        case KEY_MODEL_PATH: return get_str(x, id, v, c->model_path, sizeof c->model_path);
        case KEY_RUN_DIR: return get_str(x, id, v, c->run_dir, sizeof c->run_dir);
        case KEY_DATA_PATH: return get_str(x, id, v, c->data.path, sizeof c->data.path);
        case KEY_DATA_TOKENIZER: return get_str(x, id, v, c->data.tokenizer, sizeof c->data.tokenizer);
        case KEY_DATA_CACHE: return get_str(x, id, v, c->data.cache_dir, sizeof c->data.cache_dir);
        case KEY_EXPORT_DIR: return get_str(x, id, v, c->export_dir, sizeof c->export_dir);
        case KEY_MODEL_HUB_ID: return get_str(x, id, v, c->hub_id, sizeof c->hub_id);
        case KEY_EVAL_PATH: return get_str(x, id, v, c->eval.path, sizeof c->eval.path);
        }
        return TP_OK;
    case K_TEXT:
        switch (id) {
        case KEY_DATA_TEXT_FIELD: return get_text(x, id, v, c->data.text_field, sizeof c->data.text_field);
        case KEY_ALPACA_PROMPT: return get_text(x, id, v, c->data.alpaca_prompt, sizeof c->data.alpaca_prompt);
        case KEY_ALPACA_PROMPT_NI:
            return get_text(x, id, v, c->data.alpaca_prompt_no_input, sizeof c->data.alpaca_prompt_no_input);
        case KEY_CHAT_SYSTEM: return get_text(x, id, v, c->data.chat_system, sizeof c->data.chat_system);
        case KEY_CHAT_USER: return get_text(x, id, v, c->data.chat_user, sizeof c->data.chat_user);
        case KEY_CHAT_ASSISTANT: return get_text(x, id, v, c->data.chat_assistant, sizeof c->data.chat_assistant);
        }
        return TP_OK;
    case K_TARGETS: {
        unsigned mask = 0;
        if ((rc = for_items(x, id, v, "a module name", "module names", target_item, &mask))) return rc;
        c->dec.lora.targets = mask;
        return TP_OK;
    }
    case K_VALUES: {
        values_acc a = {.n = 0};
        if ((rc = for_items(x, id, v, "a number in [0, 1]", "numbers in [0, 1]", value_item, &a))) return rc;
        memcpy(c->dec.mag.values, a.v, sizeof a.v);
        c->dec.mag.nvalues = a.n;
        return TP_OK;
    }
    }
    return TP_OK;
}

/* dec.liza.preset names the preset the five fields match, "" if none. */
static void sync_preset_name(tp_train_cfg *c) {
    const char *nm = tp_liza_preset_name(&c->dec.liza);
    snprintf(c->dec.liza.preset, sizeof c->dec.liza.preset, "%s", nm ? nm : "");
}

/* ---- defaults ----------------------------------------------------------- */

void tp_train_cfg_default(tp_train_cfg *c) {
    memset(c, 0, sizeof *c);
    tp_decoder_opts_default(&c->dec);
    c->dec.liza.enabled = 1; /* training runs convert the model by default */
    c->pissa_niter = -1;
    c->dec.matmul = TP_MM_F32;
    c->matmul_auto = 1;
    snprintf(c->data.format, sizeof c->data.format, "tokens");
    c->data.seq_len = 512;
    snprintf(c->data.long_docs, sizeof c->data.long_docs, "split");
    snprintf(c->data.packing, sizeof c->data.packing, "pack");
    snprintf(c->data.bad_records, sizeof c->data.bad_records, "skip");
    snprintf(c->data.text_field, sizeof c->data.text_field, "text");
    snprintf(c->data.txt_unit, sizeof c->data.txt_unit, "line");
    snprintf(c->data.add_bos, sizeof c->data.add_bos, "auto");
    c->data.add_eos = 1;
    snprintf(c->data.alpaca_prompt, sizeof c->data.alpaca_prompt, "%s", TP_ALPACA_PROMPT);
    snprintf(c->data.alpaca_prompt_no_input, sizeof c->data.alpaca_prompt_no_input, "%s", TP_ALPACA_PROMPT_NO_INPUT);
    snprintf(c->data.chat_system, sizeof c->data.chat_system, "%s", TP_CHAT_SYSTEM);
    snprintf(c->data.chat_user, sizeof c->data.chat_user, "%s", TP_CHAT_USER);
    snprintf(c->data.chat_assistant, sizeof c->data.chat_assistant, "%s", TP_CHAT_ASSISTANT);
    c->global_batch = 0; /* required */
    c->micro_batch = 1;
    c->adamw = TP_ADAMW_CFG_DEFAULT;
    c->weight_decay = 0;
    c->max_grad_norm = 1.0;
    c->sched = (tp_lr_schedule){.peak_lr = 2e-4, .min_lr = 0, .warmup_steps = 0, .total_steps = 0,
                                .kind = TP_LR_COSINE};
    c->ckpt_every = 100;
    c->ckpt_keep = 3;
    c->log_every = 1;
    c->max_bad_steps = 5;
    c->bucket_mb = 25;
    sync_preset_name(c);
}

/* ---- the file -------------------------------------------------------------- */

/* libyaml's error as "<where>: YAML syntax error: <problem> (...)" into tail. */
static void yaml_problem(const yaml_parser_t *p, const char *buf, size_t len, size_t *line, char *tail,
                         size_t n) {
    const char *prob = p->problem ? p->problem : "unknown error";
    if (p->error == YAML_READER_ERROR) {
        size_t off = p->problem_offset < len ? p->problem_offset : len, l = 1;
        for (size_t i = 0; i < off; i++) l += buf[i] == '\n';
        *line = l;
        if (p->problem_value >= 0)
            snprintf(tail, n, "cannot read the text: %s (byte 0x%02x at offset %zu)", prob,
                     (unsigned)p->problem_value & 0xffu, p->problem_offset);
        else
            snprintf(tail, n, "cannot read the text: %s (at offset %zu)", prob, p->problem_offset);
        return;
    }
    *line = p->problem_mark.line + 1;
    const char *hint = p->problem_mark.index < len && buf[p->problem_mark.index] == '\t'
                           ? " (a tab: YAML indents with spaces)"
                           : "";
    if (p->context)
        snprintf(tail, n, "YAML syntax error: %s (%s on line %zu)%s", prob, p->context, p->context_mark.line + 1,
                 hint);
    else
        snprintf(tail, n, "YAML syntax error: %s%s", prob, hint);
}

/* Walk one mapping: the top level (sec S_TOP) or a section. Keys first
 * (unknown, duplicate), then liza.preset, then the values in file order, so
 * the preset never overrides an explicit field. */
static int walk_mapping(ctx *x, int sec, const yaml_node_t *map) {
    char got[160], names[512], q[64];
    int rc;
    const char *where = sec == S_TOP ? "" : sec_names[sec];
    int preset_pair = -1;
    for (const yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        const yaml_node_t *k = yaml_document_get_node(x->doc, p->key);
        if (!k) return tp_fail(x->err, TP_EFORMAT, "%s: broken YAML document", x->file);
        if ((rc = check_tag(x, sec == S_TOP ? "(top level)" : where, -1, k))) return rc;
        if (k->type != YAML_SCALAR_NODE) {
            describe(k, got, sizeof got);
            return tp_fail(x->err, TP_EINVAL, "%s:%zu: %s%sexpected a key name, got %s", x->file, line_of(k),
                           where, *where ? ": " : "", got);
        }
        const char *name = (const char *)k->data.scalar.value;
        quote_text(name, k->data.scalar.length, q, sizeof q);
        int s = find_child(sec, name);
        int id = s >= 0 ? -1 : find_key_in(sec, name);
        if (s < 0 && id < 0) {
            list_names(sec, names, sizeof names);
            if (sec == S_TOP && find_dotted(name) >= 0 && strchr(name, '.'))
                return tp_fail(x->err, TP_EINVAL,
                               "%s:%zu: unknown key '%s' (dotted names are for --set; in the file write "
                               "'%.*s:' and the key indented below it)",
                               x->file, line_of(k), q, (int)(strchr(name, '.') - name), name);
            return tp_fail(x->err, TP_EINVAL, "%s:%zu: unknown key '%s%s%s' (expected one of: %s)", x->file,
                           line_of(k), where, *where ? "." : "", q, names);
        }
        size_t *seen = s >= 0 ? &x->sec_line[s] : &x->key_line[id];
        if (*seen)
            return tp_fail(x->err, TP_EINVAL, "%s:%zu: %s: duplicate key (first given on line %zu)", x->file,
                           line_of(k), s >= 0 ? sec_names[s] : keys[id].dotted, *seen);
        *seen = line_of(k);
        if (id == KEY_LIZA_PRESET) preset_pair = (int)(p - map->data.mapping.pairs.start);
    }
    if (preset_pair >= 0) {
        const yaml_node_t *v = yaml_document_get_node(x->doc, map->data.mapping.pairs.start[preset_pair].value);
        if (!v) return tp_fail(x->err, TP_EFORMAT, "%s: broken YAML document", x->file);
        if ((rc = apply_key(x, KEY_LIZA_PRESET, v))) return rc;
    }
    for (const yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        const yaml_node_t *k = yaml_document_get_node(x->doc, p->key);
        const yaml_node_t *v = yaml_document_get_node(x->doc, p->value);
        if (!k || !v) return tp_fail(x->err, TP_EFORMAT, "%s: broken YAML document", x->file);
        const char *name = (const char *)k->data.scalar.value;
        int s = find_child(sec, name);
        if (s >= 0) {
            if ((rc = check_tag(x, sec_names[s], -1, v))) return rc;
            if (v->type != YAML_MAPPING_NODE) {
                list_names(s, names, sizeof names);
                describe(v, got, sizeof got);
                return fail_at(x, v, sec_names[s], -1, "expected a mapping of %s keys (%s), got %s", sec_names[s],
                               names, got);
            }
            if ((rc = walk_mapping(x, s, v))) return rc;
            continue;
        }
        int id = find_key_in(sec, name);
        if (id == KEY_LIZA_PRESET) continue;
        if ((rc = apply_key(x, id, v))) return rc;
    }
    return TP_OK;
}

/* Load the first document; a second document or a syntax error anywhere in
 * the text is an error. *msg_line/tail describe a libyaml failure. */
static int load_yaml(const char *buf, size_t len, yaml_document_t *doc, size_t *line, char *tail, size_t n) {
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser)) { snprintf(tail, n, "out of memory"); return TP_ENOMEM; }
    yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
    int rc = TP_OK;
    if (!yaml_parser_load(&parser, doc)) {
        rc = parser.error == YAML_MEMORY_ERROR ? TP_ENOMEM : TP_EFORMAT;
        yaml_problem(&parser, buf, len, line, tail, n);
        yaml_parser_delete(&parser);
        return rc;
    }
    yaml_document_t more;
    if (!yaml_parser_load(&parser, &more)) {
        rc = parser.error == YAML_MEMORY_ERROR ? TP_ENOMEM : TP_EFORMAT;
        yaml_problem(&parser, buf, len, line, tail, n);
    } else {
        const yaml_node_t *r = yaml_document_get_root_node(&more);
        if (r) {
            rc = TP_EFORMAT;
            *line = r->start_mark.line + 1;
            snprintf(tail, n, "a second YAML document starts here (one document expected)");
        }
        yaml_document_delete(&more);
    }
    if (rc) yaml_document_delete(doc);
    yaml_parser_delete(&parser);
    return rc;
}

int tp_train_cfg_load(const char *path, tp_train_cfg *c, tp_err *err) {
    tp_train_cfg_default(c);
    if (!path || !*path) return tp_fail(err, TP_EINVAL, "config: no YAML file given");
    snprintf(c->source, sizeof c->source, "%s", path);
    char *buf = NULL;
    size_t len = 0;
    int rc = tp_read_file(path, CFG_MAX_BYTES, &buf, &len, err);
    if (rc) return rc;
    yaml_document_t doc;
    size_t line = 0;
    char tail[512];
    rc = load_yaml(buf, len, &doc, &line, tail, sizeof tail);
    if (rc) {
        free(buf);
        if (rc == TP_ENOMEM) return tp_fail(err, TP_ENOMEM, "%s: out of memory reading YAML", path);
        return tp_fail(err, rc, "%s:%zu: %s", path, line, tail);
    }
    ctx *x = tp_calloc(1, sizeof *x, err);
    if (!x) {
        yaml_document_delete(&doc);
        free(buf);
        return TP_ENOMEM;
    }
    x->c = c;
    x->err = err;
    x->file = path;
    x->doc = &doc;
    x->text = buf;
    x->text_len = len;
    const yaml_node_t *root = yaml_document_get_root_node(&doc);
    char got[160];
    if (!root) {
        rc = tp_fail(err, TP_EINVAL, "%s: the file is empty (expected a mapping of settings; see docs/config.md)",
                     path);
    } else if ((rc = check_tag(x, "(top level)", -1, root))) {
        /* message set */
    } else if (root->type != YAML_MAPPING_NODE) {
        describe(root, got, sizeof got);
        rc = tp_fail(err, TP_EINVAL, "%s:%zu: expected a mapping of settings at the top level, got %s", path,
                     line_of(root), got);
    } else {
        rc = walk_mapping(x, S_TOP, root);
    }
    if (rc == TP_OK) {
        char missing[512] = "";
        size_t ml = 0;
        int nmiss = 0;
        for (int i = 0; i < NKEYS; i++)
            if (keys[i].required && !x->key_line[i]) {
                int w = snprintf(missing + ml, sizeof missing - ml, "%s'%s'", nmiss ? ", " : "", keys[i].dotted);
                if (w > 0 && (size_t)w < sizeof missing - ml) ml += (size_t)w;
                nmiss++;
            }
        if (!x->key_line[KEY_SCHED_TOTAL] && !x->key_line[KEY_SCHED_EPOCHS]) {
            int w = snprintf(missing + ml, sizeof missing - ml, "%s'schedule.total_steps' (or 'schedule.epochs')",
                             nmiss ? ", " : "");
            if (w > 0 && (size_t)w < sizeof missing - ml) ml += (size_t)w;
            nmiss++;
        }
        if (nmiss)
            rc = tp_fail(err, TP_EINVAL, "%s: missing required key%s %s", path, nmiss > 1 ? "s" : "", missing);
        else if (x->key_line[KEY_SCHED_TOTAL] && x->key_line[KEY_SCHED_EPOCHS])
            rc = tp_fail(err, TP_EINVAL,
                         "%s:%zu: schedule.epochs: expected either schedule.total_steps (line %zu) or "
                         "schedule.epochs, not both",
                         path, x->key_line[KEY_SCHED_EPOCHS], x->key_line[KEY_SCHED_TOTAL]);
        else if (x->key_line[KEY_EVAL_PATH] && x->key_line[KEY_EVAL_SPLIT] && c->eval.path[0] && c->eval.split > 0)
            rc = tp_fail(err, TP_EINVAL,
                         "%s:%zu: eval.split: expected either eval.path (line %zu) or eval.split, not both", path,
                         x->key_line[KEY_EVAL_SPLIT], x->key_line[KEY_EVAL_PATH]);
    }
    sync_preset_name(c);
    free(x);
    yaml_document_delete(&doc);
    free(buf);
    return rc;
}

/* ---- --set ------------------------------------------------------------------ */

int tp_train_cfg_set(tp_train_cfg *c, const char *kv, tp_err *err) {
    char q[64], names[512];
    const char *eq = kv ? strchr(kv, '=') : NULL;
    if (!eq) {
        quote_text(kv ? kv : "", kv ? strlen(kv) : 0, q, sizeof q);
        return tp_fail(err, TP_EINVAL, "--set '%s': expected key=value", q);
    }
    const char *kb = kv, *ke = eq;
    while (kb < ke && isspace((unsigned char)*kb)) kb++;
    while (ke > kb && isspace((unsigned char)ke[-1])) ke--;
    char key[64];
    quote_text(kb, (size_t)(ke - kb), key, sizeof key);
    int id = (size_t)(ke - kb) < sizeof key ? find_dotted(key) : -1;
    if (id < 0) {
        const char *dot = strchr(key, '.');
        int s = find_section(key);
        if (s >= 0) {
            list_names(s, names, sizeof names);
            return tp_fail(err, TP_EINVAL, "--set %s: '%s' is a section; set one of its keys: %s.<key> with <key> "
                           "one of: %s", key, key, key, names);
        }
        if (dot) { /* the innermost section named: data.alpaca of data.alpaca.x, else data */
            char secname[64];
            const char *last = strrchr(key, '.');
            snprintf(secname, sizeof secname, "%.*s", (int)(last - key), key);
            if ((s = find_section(secname)) < 0) {
                snprintf(secname, sizeof secname, "%.*s", (int)(dot - key), key);
                s = find_section(secname);
            }
        }
        list_names(s >= 0 ? s : S_TOP, names, sizeof names);
        return tp_fail(err, TP_EINVAL, "--set %s: unknown key '%s' (expected one of: %s%s)", key, key, names,
                       s >= 0 ? "" : "; section keys are written section.key");
    }
    const char *val = eq + 1;
    int blank = 1;
    for (const char *p = val; *p; p++) blank &= isspace((unsigned char)*p) != 0;
    if (blank) val = "~";
    yaml_document_t doc;
    size_t line = 0;
    char tail[512];
    int rc = load_yaml(val, strlen(val), &doc, &line, tail, sizeof tail);
    if (rc) {
        quote_text(val, strlen(val), q, sizeof q);
        if (rc == TP_ENOMEM) return tp_fail(err, TP_ENOMEM, "--set %s: out of memory", key);
        return tp_fail(err, TP_EINVAL, "--set %s: cannot read the value '%s' as YAML: %s", key, q, tail);
    }
    ctx x = {.c = c, .err = err, .file = NULL, .doc = &doc, .text = val, .text_len = strlen(val)};
    const yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) rc = tp_fail(err, TP_EINVAL, "--set %s: empty value", key); /* comment only */
    else rc = apply_key(&x, id, root);
    if (rc == TP_OK) sync_preset_name(c);
    yaml_document_delete(&doc);
    return rc;
}
