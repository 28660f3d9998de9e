/* test_config_yaml.c - the training run's YAML configuration (train/config.h,
 * docs/config.md): defaults, a full round trip of every key, each class of
 * error with its file:line: key prefix, --set overrides, the cross-field
 * checks, the resume JSON, and a mutation loop that must never crash. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/liza.h"
#include "kernels/liza_gates.h"
#include "train/config.h"
#include "test.h"

static char tmpdir[256], model_dir[320], run_dir[320], data_file[320], yaml_path[320];

static const char *source_dir(void) {
    const char *s = getenv("TPTT_SOURCE_DIR");
    return s ? s : TPTT_SOURCE_DIR_DEFAULT;
}

/* Write text to <tmpdir>/<name>; returns the path (static buffer). */
static const char *put(const char *name, const char *text, size_t len) {
    snprintf(yaml_path, sizeof yaml_path, "%s/%s", tmpdir, name);
    FILE *fp = fopen(yaml_path, "wb");
    if (!fp) { perror(yaml_path); exit(2); }
    if (len && fwrite(text, 1, len, fp) != len) { perror(yaml_path); exit(2); }
    fclose(fp);
    return yaml_path;
}
static const char *put_s(const char *name, const char *text) { return put(name, text, strlen(text)); }

static int has(const char *hay, const char *needle) { return strstr(hay, needle) != NULL; }

/* A file of the source tree (caller frees), or NULL. */
static char *read_text(const char *rel) {
    char path[700];
    snprintf(path, sizeof path, "%s/%s", source_dir(), rel);
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    char *buf = malloc(1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, fp) : 0;
    fclose(fp);
    if (buf) buf[n] = 0;
    return buf;
}

/* ---- a valid config with every key set to a non-default value -------- */

static char full_yaml[4096];

static void make_full_yaml(void) {
    snprintf(full_yaml, sizeof full_yaml,
             "# every key, none at its default\n"
             "model:\n"
             "  path: %s\n"
             "run:\n"
             "  dir: %s\n"
             "seed: 1234\n"
             "trainable: projections\n"
             "lora:\n"
             "  r: 16\n"
             "  alpha: 32.5\n"
             "  dropout: 0.05\n"
             "  target_modules: [q_proj, v_proj, gate_proj, down_proj]\n"
             "  rslora: true\n"
             "  init: random\n"
             "liza:\n"
             "  order: 2           # before the preset in the file, still wins\n"
             "  enabled: false\n"
             "  preset: gated_delta_rule\n"
             "  alpha_gate: v\n"
             "  beta_gate: kv\n"
             "  trick: rot\n"
             "  linear: false\n"
             "  chunk_size: 32\n"
             "  base_scale_attn: true\n"
             "mag:\n"
             "  mode: cyclic\n"
             "  mu0: 0.25\n"
             "  mu1: 0.75\n"
             "  steps: 500\n"
             "  values:\n"
             "    - 0.2\n"
             "    - 0.4\n"
             "    - 0.6\n"
             "    - 0.8\n"
             "  period: 50\n"
             "  learnable_shape: vector\n"
             "  cross_gate: true\n"
             "compute:\n"
             "  matmul: bf16\n"
             "  recompute: true\n"
             "data:\n"
             "  format: tokens\n"
             "  path: '%s'\n"
             "  seq_len: 1024\n"
             "  long_docs: drop\n"
             "  tokenizer: /tok\n"
             "  cache_dir: \"/cache dir\"\n"
             "  packing: pad\n"
             "  bad_records: abort\n"
             "  text_field: body\n"
             "  txt_unit: paragraph\n"
             "  add_bos: false\n"
             "  add_eos: false\n"
             "  alpaca:\n"
             "    prompt: \"Q: {instruction} / {input}\\nA: \"\n"
             "    prompt_no_input: 'Q: {instruction}'\n"
             "  chat:\n"
             "    system: \"[S]{content}\"\n"
             "    user: |\n"
             "      [U]{content}\n"
             "    assistant: \"[A]{content}</s>\"\n"
             "batch:\n"
             "  global: 32\n"
             "  micro: 2\n"
             "optimizer:\n"
             "  lr: 1.0e-3\n"
             "  min_lr: 1e-5\n"
             "  weight_decay: 0.01\n"
             "  beta1: 0.8\n"
             "  beta2: 0.95\n"
             "  eps: 1e-6\n"
             "  max_grad_norm: -1\n"
             "schedule:\n"
             "  kind: linear\n"
             "  warmup_steps: 10\n"
             "  total_steps: 200\n"
             "checkpoint:\n"
             "  every: 0\n"
             "  keep: 5\n"
             "logging:\n"
             "  every: 10\n"
             "faults:\n"
             "  max_bad_steps: 2\n"
             "dist:\n"
             "  bucket_mb: 12.5\n"
             "export:\n"
             "  model_dir: /export/out\n",
             model_dir, run_dir, data_file);
}

static void check_full(const tp_train_cfg *c) {
    const tp_decoder_opts *o = &c->dec;
    CHECK(!strcmp(c->model_path, model_dir));
    CHECK(!strcmp(c->run_dir, run_dir));
    CHECK(o->seed == 1234);
    CHECK(o->trainable == TP_TRAIN_PROJECTIONS);
    CHECK(o->lora.r == 16 && o->lora.alpha == 32.5 && o->lora.dropout == 0.05);
    CHECK(o->lora.targets == ((1u << TP_MOD_Q) | (1u << TP_MOD_V) | (1u << TP_MOD_GATE) | (1u << TP_MOD_DOWN)));
    CHECK(o->lora.rslora == 1 && o->lora.init_random == 1);
    CHECK(o->liza.enabled == 0);
    CHECK_MSG(o->liza.order == 2, "order %d (explicit field must win over the preset)", o->liza.order);
    CHECK(o->liza.alpha_gate == TP_GATE_V && o->liza.beta_gate == TP_GATE_KV);
    CHECK(o->liza.trick == TP_TRICK_ROT && o->liza.linear == 0);
    CHECK(o->liza.chunk == 32 && o->liza.base_scale_attn == 1);
    CHECK_MSG(o->liza.preset[0] == 0, "preset '%s' (fields match no preset)", o->liza.preset);
    CHECK(o->mag.mode == TP_MAG_CYCLIC && o->mag.mu0 == 0.25 && o->mag.mu1 == 0.75 && o->mag.steps == 500);
    CHECK(o->mag.nvalues == 4 && o->mag.values[0] == 0.2 && o->mag.values[1] == 0.4 && o->mag.values[2] == 0.6 &&
          o->mag.values[3] == 0.8);
    CHECK(o->mag.period == 50 && o->mag.vector == 1 && o->mag.cross_gate == 1);
    CHECK(c->matmul_auto == 0 && o->matmul == TP_MM_BF16 && o->recompute == 1);
    CHECK(!strcmp(c->data.format, "tokens") && !strcmp(c->data.path, data_file));
    CHECK(c->data.seq_len == 1024 && !strcmp(c->data.long_docs, "drop"));
    CHECK(!strcmp(c->data.tokenizer, "/tok") && !strcmp(c->data.cache_dir, "/cache dir"));
    CHECK(!strcmp(c->data.packing, "pad") && !strcmp(c->data.bad_records, "abort"));
    CHECK(!strcmp(c->data.text_field, "body") && !strcmp(c->data.txt_unit, "paragraph"));
    CHECK(!strcmp(c->data.add_bos, "false") && c->data.add_eos == 0);
    CHECK_MSG(!strcmp(c->data.alpaca_prompt, "Q: {instruction} / {input}\nA: "), "%s", c->data.alpaca_prompt);
    CHECK(!strcmp(c->data.alpaca_prompt_no_input, "Q: {instruction}"));
    CHECK(!strcmp(c->data.chat_system, "[S]{content}") && !strcmp(c->data.chat_user, "[U]{content}\n"));
    CHECK(!strcmp(c->data.chat_assistant, "[A]{content}</s>"));
    CHECK(c->global_batch == 32 && c->micro_batch == 2);
    CHECK(c->sched.peak_lr == 1e-3 && c->sched.min_lr == 1e-5 && c->weight_decay == 0.01);
    CHECK(c->adamw.beta1 == 0.8 && c->adamw.beta2 == 0.95 && c->adamw.eps == 1e-6);
    CHECK(c->max_grad_norm == -1);
    CHECK(c->sched.kind == TP_LR_LINEAR && c->sched.warmup_steps == 10 && c->sched.total_steps == 200);
    CHECK(c->ckpt_every == 0 && c->ckpt_keep == 5 && c->log_every == 10);
    CHECK(c->max_bad_steps == 2 && c->bucket_mb == 12.5);
    CHECK(!strcmp(c->export_dir, "/export/out"));
}

static void test_defaults(void) {
    tp_train_cfg c;
    tp_train_cfg_default(&c);
    const tp_decoder_opts *o = &c.dec;
    CHECK(c.model_path[0] == 0 && c.run_dir[0] == 0 && c.data.path[0] == 0 && c.export_dir[0] == 0);
    CHECK(o->seed == 0 && o->trainable == TP_TRAIN_LORA);
    CHECK(o->lora.r == 8 && o->lora.alpha == 16 && o->lora.dropout == 0 && !o->lora.rslora && !o->lora.init_random);
    CHECK(o->lora.targets == 0xfu); /* q, k, v, o */
    CHECK(o->liza.enabled == 1);
    CHECK(o->liza.order == 1 && o->liza.alpha_gate == TP_GATE_C && o->liza.beta_gate == TP_GATE_K);
    CHECK(o->liza.trick == TP_TRICK_DT && o->liza.linear == 1 && o->liza.chunk == 64 && !o->liza.base_scale_attn);
    CHECK(!strcmp(o->liza.preset, "delta_rule"));
    CHECK(o->mag.mode == TP_MAG_CONSTANT && o->mag.mu0 == 0.5 && o->mag.mu1 == 1.0 && o->mag.steps == 1000);
    CHECK(o->mag.nvalues == 3 && o->mag.values[0] == 0.1 && o->mag.values[1] == 0.5 && o->mag.values[2] == 0.9);
    CHECK(o->mag.period == 100 && !o->mag.vector && !o->mag.cross_gate);
    CHECK(c.matmul_auto == 1 && o->recompute == 0);
    CHECK(!strcmp(c.data.format, "tokens") && c.data.seq_len == 512 && !strcmp(c.data.long_docs, "split"));
    CHECK(c.data.tokenizer[0] == 0 && c.data.cache_dir[0] == 0);
    CHECK(!strcmp(c.data.packing, "pack") && !strcmp(c.data.bad_records, "skip"));
    CHECK(!strcmp(c.data.text_field, "text") && !strcmp(c.data.txt_unit, "line"));
    CHECK(!strcmp(c.data.add_bos, "auto") && c.data.add_eos == 1);
    /* the Stanford Alpaca prompts and ChatML, written out here independently */
    CHECK(!strcmp(c.data.alpaca_prompt,
                  "Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                  "### Input:\n{input}\n\n### Response:\n"));
    CHECK(!strcmp(c.data.alpaca_prompt_no_input,
                  "Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"));
    CHECK(!strcmp(c.data.chat_system, "<|im_start|>system\n{content}<|im_end|>\n"));
    CHECK(!strcmp(c.data.chat_user, "<|im_start|>user\n{content}<|im_end|>\n"));
    CHECK(!strcmp(c.data.chat_assistant, "<|im_start|>assistant\n{content}<|im_end|>\n"));
    CHECK(c.global_batch == 0 && c.micro_batch == 1);
    CHECK(c.sched.peak_lr == 2e-4 && c.sched.min_lr == 0 && c.weight_decay == 0);
    CHECK(c.adamw.beta1 == 0.9 && c.adamw.beta2 == 0.999 && c.adamw.eps == 1e-8 && c.max_grad_norm == 1.0);
    CHECK(c.sched.kind == TP_LR_COSINE && c.sched.warmup_steps == 0 && c.sched.total_steps == 0);
    CHECK(c.ckpt_every == 100 && c.ckpt_keep == 3 && c.log_every == 1 && c.max_bad_steps == 5);
    CHECK(c.bucket_mb == 25);

    /* a minimal file: only the required keys, everything else default */
    char text[2048];
    snprintf(text, sizeof text,
             "model: {path: %s}\nrun: {dir: %s}\ndata: {path: %s}\nbatch: {global: 8}\nschedule: {total_steps: 50}\n",
             model_dir, run_dir, data_file);
    tp_train_cfg m;
    tp_err err = {0};
    int rc = tp_train_cfg_load(put_s("min.yaml", text), &m, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK(!strcmp(m.source, yaml_path));
    c.global_batch = 8;
    c.sched.total_steps = 50;
    snprintf(c.model_path, sizeof c.model_path, "%s", model_dir);
    snprintf(c.run_dir, sizeof c.run_dir, "%s", run_dir);
    snprintf(c.data.path, sizeof c.data.path, "%s", data_file);
    snprintf(c.source, sizeof c.source, "%s", m.source);
    CHECK_MSG(!memcmp(&c, &m, sizeof c), "minimal file differs from defaults + required keys");
    rc = tp_train_cfg_check(&m, 4, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
}

static void test_full(void) {
    tp_train_cfg c;
    tp_err err = {0};
    int rc = tp_train_cfg_load(put_s("full.yaml", full_yaml), &c, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    check_full(&c);
    rc = tp_train_cfg_check(&c, 2, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);

    /* the preset fills the fields the file leaves alone, wherever it stands */
    char text[1024];
    snprintf(text, sizeof text,
             "model: {path: /m}\nrun: {dir: /r}\ndata: {path: /d}\nbatch: {global: 8}\nschedule: {total_steps: 5}\n"
             "liza:\n  order: 3\n  preset: gated_delta_product\n");
    rc = tp_train_cfg_load(put_s("preset.yaml", text), &c, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK(c.dec.liza.order == 3 && c.dec.liza.alpha_gate == TP_GATE_K && c.dec.liza.beta_gate == TP_GATE_K);
    CHECK(c.dec.liza.enabled == 1 && c.dec.liza.preset[0] == 0);
    snprintf(text, sizeof text,
             "model: {path: /m}\nrun: {dir: /r}\ndata: {path: /d}\nbatch: {global: 8}\nschedule: {total_steps: 5}\n"
             "liza: {preset: delta_product_c}\n");
    rc = tp_train_cfg_load(put_s("preset.yaml", text), &c, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK(c.dec.liza.order == 2 && c.dec.liza.trick == TP_TRICK_RDT && !strcmp(c.dec.liza.preset, "delta_product_c"));

    /* comma-string lists, null optional strings, anchors/aliases, document markers */
    snprintf(text, sizeof text,
             "---\nmodel: {path: &p /m}\nrun: {dir: *p}\ndata: {path: /d, tokenizer: ~, cache_dir: }\n"
             "batch: {global: 8}\nschedule: {total_steps: 5}\n"
             "lora: {target_modules: 'up_proj, o_proj'}\nmag:\n  values: 0.3, 0.7\n...\n");
    rc = tp_train_cfg_load(put_s("forms.yaml", text), &c, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK(!strcmp(c.run_dir, "/m") && c.data.tokenizer[0] == 0 && c.data.cache_dir[0] == 0);
    CHECK(c.dec.lora.targets == ((1u << TP_MOD_UP) | (1u << TP_MOD_O)));
    CHECK(c.dec.mag.nvalues == 2 && c.dec.mag.values[0] == 0.3 && c.dec.mag.values[1] == 0.7);

    /* the example of docs/config.md (kept identical in tests/fixtures/yaml) */
    char path[600];
    snprintf(path, sizeof path, "%s/tests/fixtures/yaml/example.yaml", source_dir());
    rc = tp_train_cfg_load(path, &c, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK(c.global_batch == 64 && c.micro_batch == 2 && c.sched.total_steps == 2000 && c.dec.lora.r == 16);

    /* docs/config.md shows the same example */
    char *doc = read_text("docs/config.md"), *fix = read_text("tests/fixtures/yaml/example.yaml");
    const char *ex = doc ? strstr(doc, "## Example") : NULL;
    ex = ex ? strstr(ex, "```yaml\n") : NULL;
    CHECK_MSG(ex && fix && !strncmp(ex + 8, fix, strlen(fix)) && !strncmp(ex + 8 + strlen(fix), "```", 3),
              "the example of docs/config.md differs from tests/fixtures/yaml/example.yaml");
    free(doc);
    free(fix);

    /* the shipped run configs (every .yaml in conf/) all load */
    snprintf(path, sizeof path, "%s/conf", source_dir());
    DIR *dir = opendir(path);
    int nconf = 0;
    for (struct dirent *de; dir && (de = readdir(dir));) {
        size_t n = strlen(de->d_name);
        if (n < 6 || strcmp(de->d_name + n - 5, ".yaml")) continue;
        char conf[900];
        snprintf(conf, sizeof conf, "%s/%s", path, de->d_name);
        rc = tp_train_cfg_load(conf, &c, &err);
        CHECK_MSG(rc == TP_OK, "%s", err.msg);
        nconf++;
    }
    if (dir) closedir(dir);
    printf("conf/*.yaml: %d loaded\n", nconf);
}

/* ---- errors ------------------------------------------------------------------ */

#define BASE                                                       \
    "model:\n  path: /m\nrun:\n  dir: /r\ndata:\n  path: /d\nbatch:\n" \
    "  global: 8\nschedule:\n  total_steps: 100\n"
/* BASE is 10 lines: appended text starts on line 11 */

typedef struct err_case {
    const char *text;
    int line;            /* expected line (0: message has no line) */
    const char *need[3]; /* substrings the message must contain */
} err_case;

static const err_case err_cases[] = {
    /* unknown keys */
    {"model:\n  path: /m\nbatch:\n  global: 8\n  globl: 3\n", 5,
     {"unknown key 'batch.globl' (expected one of: global, micro)"}},
    {BASE "optimizer:\n  lrr: 1\n", 12, {"unknown key 'optimizer.lrr'", "lr, min_lr, weight_decay"}},
    {BASE "modle: {}\n", 11, {"unknown key 'modle'", "expected one of: model, run, seed, trainable, lora"}},
    {BASE "lora.r: 4\n", 11, {"unknown key 'lora.r'", "'lora:'"}},
    {BASE "liza:\n  [a]: 1\n", 12, {"liza: expected a key name, got a list"}},
    /* wrong types */
    {BASE "lora:\n  r: two\n", 12, {"lora.r: expected an integer in [1, 65536], got 'two'"}},
    {BASE "seed: [1, 2]\n", 11, {"seed: expected a non-negative integer, got a list"}},
    {BASE "trainable: {a: 1}\n", 11, {"trainable: expected lora, projections or all, got a mapping"}},
    {BASE "lora: 5\n", 11, {"lora: expected a mapping of lora keys", "got '5'"}},
    {BASE "compute:\n", 11, {"compute: expected a mapping", "got null"}},
    {"model:\n  path: /m\nbatch:\n  global: 8\n  micro: two\n", 5,
     {"batch.micro: expected a positive integer, got 'two'"}},
    {BASE "logging:\n  every: \"2\"\n", 12,
     {"logging.every: expected a positive integer, got the quoted string \"2\" (write numbers"}},
    {BASE "liza:\n  enabled: yes\n", 12, {"liza.enabled: expected true or false, got 'yes'"}},
    {BASE "liza:\n  linear: \"true\"\n", 12, {"liza.linear: expected true or false", "quoted"}},
    {BASE "trainable: everything\n", 11, {"trainable: expected lora, projections or all, got 'everything'"}},
    {BASE "liza:\n  preset: delta\n", 12, {"liza.preset: expected delta_rule,", "got 'delta'"}},
    {BASE "liza:\n  trick: 1\n", 12, {"liza.trick: expected dt, rot or rdt, got '1'"}},
    {BASE "mag:\n  values: [0.1,\n    x]\n", 13, {"mag.values[1]: expected a number in [0, 1], got 'x'"}},
    {BASE "mag:\n  values: [0.1, [0.2]]\n", 12, {"mag.values[1]: expected a number in [0, 1], got a list"}},
    {BASE "mag:\n  values: []\n", 12, {"mag.values: expected a non-empty list"}},
    {BASE "mag:\n  values: [0.1, \"0.2\"]\n", 12, {"mag.values[1]:", "quoted string"}},
    {BASE "lora:\n  target_modules:\n    - q_proj\n    - x_proj\n", 14,
     {"lora.target_modules[1]: expected a module name", "got 'x_proj'"}},
    {BASE "lora:\n  target_modules: q_proj,v_proj,q_proj\n", 12, {"lora.target_modules[2]: 'q_proj' is listed twice"}},
    {BASE "lora:\n  target_modules: q_proj,,v_proj\n", 12, {"lora.target_modules[1]:", "got ''"}},
    {BASE "lora:\n  target_modules: {a: 1}\n", 12, {"lora.target_modules: expected a list of module names"}},
    {BASE "export:\n  model_dir: [a]\n", 12, {"export.model_dir: expected a path (a string), got a list"}},
    {"model:\n  path:\n", 2, {"model.path: expected a non-empty path, got null"}},
    {"model:\n  path: ''\n", 2, {"model.path: expected a non-empty path"}},
    {BASE "seed: !!int 5\n", 11, {"seed: YAML tags are not supported", "tag:yaml.org,2002:int"}},
    {"run:\n  dir: \"a\\0b\"\n", 2, {"run.dir: the value contains a NUL character"}},
    /* out of range */
    {BASE "lora:\n  dropout: 1\n", 12, {"lora.dropout: expected a number in [0, 1), got '1'"}},
    {BASE "lora:\n  alpha: 0\n", 12, {"lora.alpha: expected a positive number, got '0'"}},
    {BASE "liza:\n  order: 9\n", 12, {"liza.order: expected an integer in [1, 8], got '9'"}},
    {BASE "liza:\n  chunk_size: 0\n", 12, {"liza.chunk_size: expected an integer in [1, 4096], got '0'"}},
    {BASE "seed: -1\n", 11, {"seed: expected a non-negative integer, got '-1'"}},
    {BASE "seed: 99999999999999999999\n", 11,
     {"seed: expected a non-negative integer of at most", "99999999999999999999"}},
    {BASE "seed: 1.5\n", 11, {"seed: expected a non-negative integer, got '1.5'"}},
    {BASE "optimizer:\n  beta2: 1.0\n", 12, {"optimizer.beta2: expected a number in [0, 1), got '1.0'"}},
    {BASE "optimizer:\n  lr: -1e-4\n", 12, {"optimizer.lr: expected a non-negative number, got '-1e-4'"}},
    {BASE "checkpoint:\n  keep: 0\n", 12, {"checkpoint.keep: expected an integer in [1, 1000000], got '0'"}},
    {BASE "checkpoint:\n  every: -5\n", 12, {"checkpoint.every: expected a non-negative integer, got '-5'"}},
    {BASE "dist:\n  bucket_mb: 0\n", 12, {"dist.bucket_mb: expected a number in (0, 65536], got '0'"}},
    {"data:\n  seq_len: 1\n", 2, {"data.seq_len: expected an integer in [2, 16777216], got '1'"}},
    {"data:\n  format: json\n", 2, {"data.format: expected tokens, text, alpaca or chat, got 'json'"}},
    {"data:\n  packing: fill\n", 2, {"data.packing: expected pack or pad, got 'fill'"}},
    {"data:\n  bad_records: warn\n", 2, {"data.bad_records: expected skip or abort, got 'warn'"}},
    {"data:\n  txt_unit: page\n", 2, {"data.txt_unit: expected line, paragraph or document, got 'page'"}},
    {"data:\n  add_bos: yes\n", 2, {"data.add_bos: expected auto, true or false, got 'yes'"}},
    {"data:\n  add_eos: 1\n", 2, {"data.add_eos: expected true or false, got '1'"}},
    {"data:\n  text_field: \"\"\n", 2, {"data.text_field: expected a non-empty string, got"}},
    {"data:\n  alpaca:\n    prompt: ~\n", 3, {"data.alpaca.prompt: expected a non-empty string, got null"}},
    {"data:\n  alpaca:\n    prompt: [a]\n", 3, {"data.alpaca.prompt: expected a non-empty string, got a list"}},
    {"data:\n  alpaca:\n    promt: x\n", 3,
     {"unknown key 'data.alpaca.promt' (expected one of: prompt, prompt_no_input)"}},
    {"data:\n  alpaca: x\n", 2,
     {"data.alpaca: expected a mapping of data.alpaca keys (prompt, prompt_no_input), got 'x'"}},
    {"data:\n  chat: {user: a, user: b}\n", 2, {"data.chat.user: duplicate key"}},
    {"data:\n  foo: 1\n", 2, {"unknown key 'data.foo' (expected one of:", "add_eos, alpaca, chat)"}},
    {"alpaca:\n  prompt: x\n", 1, {"unknown key 'alpaca'"}},
    {"data:\n  long_docs: truncate\n", 2, {"data.long_docs: expected split or drop, got 'truncate'"}},
    {BASE "mag:\n  values: [0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]\n", 12,
     {"mag.values[32]: expected at most 32 values"}},
    {BASE "mag:\n  mu0: 1.5\n", 12, {"mag.mu0: expected a number in [0, 1], got '1.5'"}},
    {BASE "schedule2: 1\n", 11, {"unknown key 'schedule2'"}},
    {"schedule:\n  total_steps: 0\n", 2, {"schedule.total_steps: expected a positive integer, got '0'"}},
    {"schedule:\n  kind: cosine_with_restarts\n", 2, {"schedule.kind: expected cosine, linear or constant"}},
    /* NaN / inf */
    {BASE "optimizer:\n  lr: .nan\n", 12, {"optimizer.lr: expected a finite number, got '.nan'"}},
    {BASE "optimizer:\n  max_grad_norm: -.inf\n", 12, {"optimizer.max_grad_norm: expected a finite number"}},
    {BASE "optimizer:\n  eps: 1e999\n", 12, {"optimizer.eps: expected a finite number, got '1e999'"}},
    {BASE "optimizer:\n  eps: 0x10\n", 12, {"optimizer.eps: expected a non-negative number, got '0x10'"}},
    /* duplicates */
    {BASE "batch:\n  micro: 2\n", 11, {"batch: duplicate key (first given on line 7)"}},
    {BASE "seed: 1\nseed: 2\n", 12, {"seed: duplicate key (first given on line 11)"}},
    {"lora:\n  r: 4\n  alpha: 8\n  r: 4\n", 4, {"lora.r: duplicate key (first given on line 2)"}},
    /* top level */
    {"- a\n- b\n", 1, {"expected a mapping of settings at the top level, got a list"}},
    {"hello\n", 1, {"expected a mapping of settings at the top level, got 'hello'"}},
    {"---\n", 2, {"expected a mapping of settings at the top level, got null"}},
    {"", 0, {"the file is empty"}},
    {"# nothing here\n\n", 0, {"the file is empty"}},
    /* YAML syntax */
    {BASE "lora:\n  r: [4\n", 13, {"YAML syntax error:", "flow sequence"}},
    {"model:\n  path: /m\n run: 1\n", 3, {"YAML syntax error:"}},
    {"model:\n\tpath: /m\n", 2, {"YAML syntax error: found character that cannot start any token", "a tab"}},
    {"model: {path: /m}\nrun: \"abc\n", 3, {"YAML syntax error:", "quoted scalar"}},
    {BASE "seed: *nope\n", 11, {"YAML syntax error:", "undefined alias"}},
    {BASE "---\nseed: 1\n", 12, {"a second YAML document starts here"}},
    {BASE "seed: \xff\xfe\n", 11, {"cannot read the text:", "invalid"}},
    /* missing required keys */
    {"model:\n  path: /m\nrun:\n  dir: /r\ndata:\n  path: /d\nschedule:\n  total_steps: 100\n", 0,
     {"missing required key 'batch.global'"}},
    {"seed: 3\n", 0, {"missing required keys 'model.path', 'run.dir', 'data.path', 'batch.global', "
                      "'schedule.total_steps'"}},
};

static void test_errors(void) {
    tp_train_cfg c;
    for (size_t i = 0; i < sizeof err_cases / sizeof *err_cases; i++) {
        const err_case *e = &err_cases[i];
        tp_err err = {0};
        char name[32];
        snprintf(name, sizeof name, "err%02zu.yaml", i);
        const char *path = put_s(name, e->text);
        int rc = tp_train_cfg_load(path, &c, &err);
        CHECK_MSG(rc != TP_OK, "case %zu: accepted:\n%s", i, e->text);
        if (rc == TP_OK) continue;
        if (getenv("TPTT_SHOW_MESSAGES")) printf("%s\n", err.msg); /* for docs/config.md */
        CHECK_MSG(err.code == rc, "case %zu: err.code %d vs rc %d", i, err.code, rc);
        CHECK_MSG(!strchr(err.msg, '\n'), "case %zu: message has a newline: %s", i, err.msg);
        char prefix[400];
        if (e->line) snprintf(prefix, sizeof prefix, "%s:%d: ", path, e->line);
        else snprintf(prefix, sizeof prefix, "%s: ", path);
        CHECK_MSG(!strncmp(err.msg, prefix, strlen(prefix)), "case %zu: expected prefix '%s', got: %s", i, prefix,
                      err.msg);
        for (int k = 0; k < 3 && e->need[k]; k++)
            CHECK_MSG(has(err.msg, e->need[k]), "case %zu: '%s' not in: %s", i, e->need[k], err.msg);
    }
    /* an unreadable path names the file */
    tp_err err = {0};
    char path[400];
    snprintf(path, sizeof path, "%s/nope.yaml", tmpdir);
    int rc = tp_train_cfg_load(path, &c, &err);
    CHECK(rc != TP_OK && has(err.msg, path) && has(err.msg, "cannot open"));
    rc = tp_train_cfg_load(tmpdir, &c, &err);
    CHECK(rc != TP_OK && has(err.msg, tmpdir));
}

/* ---- --set --------------------------------------------------------------------- */

static int set_ok(tp_train_cfg *c, const char *kv) {
    tp_err err = {0};
    int rc = tp_train_cfg_set(c, kv, &err);
    CHECK_MSG(rc == TP_OK, "--set %s: %s", kv, err.msg);
    return rc == TP_OK;
}

static void set_err(tp_train_cfg *c, const char *kv, const char *prefix, const char *need) {
    tp_err err = {0};
    int rc = tp_train_cfg_set(c, kv, &err);
    if (getenv("TPTT_SHOW_MESSAGES")) printf("%s\n", err.msg);
    CHECK_MSG(rc != TP_OK, "--set %s accepted", kv);
    CHECK_MSG(!strncmp(err.msg, prefix, strlen(prefix)), "--set %s: expected prefix '%s', got: %s", kv, prefix,
              err.msg);
    CHECK_MSG(!need || has(err.msg, need), "--set %s: '%s' not in: %s", kv, need, err.msg);
    CHECK_MSG(!strchr(err.msg, '\n'), "--set %s: newline in message", kv);
}

static void test_set(void) {
    tp_train_cfg c;
    tp_train_cfg_default(&c);
    if (set_ok(&c, "lora.r=4")) CHECK(c.dec.lora.r == 4);
    if (set_ok(&c, " lora.alpha = 7.5 ")) CHECK(c.dec.lora.alpha == 7.5);
    if (set_ok(&c, "lora.target_modules=q_proj,o_proj")) CHECK(c.dec.lora.targets == 0x9u);
    if (set_ok(&c, "lora.target_modules=[k_proj, up_proj]"))
        CHECK(c.dec.lora.targets == ((1u << TP_MOD_K) | (1u << TP_MOD_UP)));
    if (set_ok(&c, "mag.values=0.3,0.7")) CHECK(c.dec.mag.nvalues == 2 && c.dec.mag.values[1] == 0.7);
    if (set_ok(&c, "mag.values=[0.1, 0.2, 1]")) CHECK(c.dec.mag.nvalues == 3 && c.dec.mag.values[2] == 1.0);
    if (set_ok(&c, "optimizer.lr=3e-4")) CHECK(c.sched.peak_lr == 3e-4);
    if (set_ok(&c, "optimizer.min_lr=1e-6")) CHECK(c.sched.min_lr == 1e-6);
    if (set_ok(&c, "schedule.kind=constant")) CHECK(c.sched.kind == TP_LR_CONSTANT);
    if (set_ok(&c, "schedule.total_steps=77")) CHECK(c.sched.total_steps == 77);
    if (set_ok(&c, "liza.order=3")) CHECK(c.dec.liza.order == 3 && c.dec.liza.preset[0] == 0);
    /* --set applies in order: a preset replaces the five fields */
    if (set_ok(&c, "liza.preset=delta_product"))
        CHECK(c.dec.liza.order == 2 && !strcmp(c.dec.liza.preset, "delta_product"));
    if (set_ok(&c, "liza.alpha_gate=k")) CHECK(!strcmp(c.dec.liza.preset, "gated_delta_product"));
    if (set_ok(&c, "liza.enabled=false")) CHECK(c.dec.liza.enabled == 0);
    if (set_ok(&c, "compute.matmul=bf16")) CHECK(c.matmul_auto == 0 && c.dec.matmul == TP_MM_BF16);
    if (set_ok(&c, "compute.matmul=auto")) CHECK(c.matmul_auto == 1);
    if (set_ok(&c, "model.path=/some/where")) CHECK(!strcmp(c.model_path, "/some/where"));
    if (set_ok(&c, "data.path='/a b/c.tok'")) CHECK(!strcmp(c.data.path, "/a b/c.tok"));
    if (set_ok(&c, "data.tokenizer=/tok")) CHECK(!strcmp(c.data.tokenizer, "/tok"));
    if (set_ok(&c, "data.tokenizer=")) CHECK(c.data.tokenizer[0] == 0);
    if (set_ok(&c, "data.format=chat")) CHECK(!strcmp(c.data.format, "chat"));
    if (set_ok(&c, "data.packing=pad")) CHECK(!strcmp(c.data.packing, "pad"));
    if (set_ok(&c, "data.add_bos=true")) CHECK(!strcmp(c.data.add_bos, "true"));
    if (set_ok(&c, "data.alpaca.prompt=\"{instruction}|{input}\\n\""))
        CHECK(!strcmp(c.data.alpaca_prompt, "{instruction}|{input}\n"));
    if (set_ok(&c, "data.chat.assistant=<A>{content}</A>")) CHECK(!strcmp(c.data.chat_assistant, "<A>{content}</A>"));
    if (set_ok(&c, "seed=9007199254740992")) CHECK(c.dec.seed == 9007199254740992ull);
    set_err(&c, "seed=9007199254740993", "--set seed: ", "at most 9007199254740992, got '9007199254740993'");
    if (set_ok(&c, "trainable=all")) CHECK(c.dec.trainable == TP_TRAIN_ALL);
    if (set_ok(&c, "optimizer.max_grad_norm=0")) CHECK(c.max_grad_norm == 0);
    if (set_ok(&c, "batch.global=48 # a comment")) CHECK(c.global_batch == 48);

    tp_train_cfg before = c;
    set_err(&c, "lora.r=x", "--set lora.r: ", "expected an integer in [1, 65536], got 'x'");
    set_err(&c, "lora.r=", "--set lora.r: ", "got null");
    set_err(&c, "batch.globl=3", "--set batch.globl: ", "unknown key 'batch.globl' (expected one of: global, micro)");
    set_err(&c, "foo=3", "--set foo: ", "expected one of: model, run, seed");
    set_err(&c, "lora=3", "--set lora: ", "is a section");
    set_err(&c, "lora.r", "--set 'lora.r': ", "expected key=value");
    set_err(&c, "mag.values=[0.1, 0.2", "--set mag.values: ", "cannot read the value");
    set_err(&c, "mag.values=[0.1,[0.2]]", "--set mag.values[1]: ", "got a list");
    set_err(&c, "mag.values=0.1,2", "--set mag.values[1]: ", "expected a number in [0, 1], got '2'");
    set_err(&c, "lora.target_modules=q_proj,z", "--set lora.target_modules[1]: ", "got 'z'");
    set_err(&c, "liza.enabled=yes", "--set liza.enabled: ", "expected true or false, got 'yes'");
    set_err(&c, "optimizer.lr=nan", "--set optimizer.lr: ", "finite");
    set_err(&c, "model.path=", "--set model.path: ", "expected a non-empty path");
    set_err(&c, "model.path={a: b}", "--set model.path: ", "got a mapping");
    set_err(&c, "seed=1\n---\n2", "--set seed: ", "second YAML document");
    set_err(&c, "data.format=json", "--set data.format: ", "expected tokens, text, alpaca or chat, got 'json'");
    set_err(&c, "data.alpaca.promt=x", "--set data.alpaca.promt: ",
            "unknown key 'data.alpaca.promt' (expected one of: prompt, prompt_no_input)");
    set_err(&c, "data.chat=x", "--set data.chat: ", "is a section");
    set_err(&c, "data.chat.user=", "--set data.chat.user: ", "expected a non-empty string");
    CHECK_MSG(!memcmp(&before, &c, sizeof c), "a failed --set changed the configuration");
    tp_err err = {0};
    CHECK(tp_train_cfg_set(&c, NULL, &err) != TP_OK && err.msg[0]);

    /* --set after a file: overrides exactly the one key */
    tp_train_cfg f;
    int rc = tp_train_cfg_load(put_s("full.yaml", full_yaml), &f, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    set_ok(&f, "checkpoint.keep=7");
    CHECK(f.ckpt_keep == 7);
    f.ckpt_keep = 5;
    check_full(&f);
}

/* ---- check() ------------------------------------------------------------------- */

static void check_err(const tp_train_cfg *c, int world, const char *need) {
    tp_err err = {0};
    int rc = tp_train_cfg_check(c, world, &err);
    if (getenv("TPTT_SHOW_MESSAGES")) printf("%s\n", err.msg);
    CHECK_MSG(rc != TP_OK, "check accepted (expected '%s')", need);
    CHECK_MSG(has(err.msg, need), "'%s' not in: %s", need, err.msg);
    CHECK_MSG(!strchr(err.msg, '\n'), "newline in: %s", err.msg);
}

static void test_check(void) {
    tp_train_cfg base, c;
    tp_err err = {0};
    int rc = tp_train_cfg_load(put_s("full.yaml", full_yaml), &base, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    rc = tp_train_cfg_check(&base, 1, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    rc = tp_train_cfg_check(&base, 16, &err); /* 32 = 16 x 2 */
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    check_err(&base, 3, "batch.global (32) must be a multiple of ranks (3) x batch.micro (2)");
    check_err(&base, 32, "batch.global (32) must be a multiple of ranks (32) x batch.micro (2)");
    check_err(&base, 0, "world size");

    c = base; c.global_batch = 6; c.micro_batch = 1;
    check_err(&c, 4, "batch.global (6) must be a multiple of ranks (4) x batch.micro (1)");
    c = base; c.global_batch = 0;
    check_err(&c, 1, "batch.global: not set");
    c = base; c.micro_batch = 0;
    check_err(&c, 1, "batch.micro must be positive");
    c = base; c.dec.liza.chunk = 0;
    check_err(&c, 1, "liza.chunk_size must be between 1 and 4096, got 0");
    c = base; c.dec.liza.chunk = -3;
    check_err(&c, 1, "liza.chunk_size");
    c = base; c.sched.warmup_steps = 300;
    check_err(&c, 1, "schedule.warmup_steps (300) > schedule.total_steps (200)");
    c = base; c.sched.min_lr = 0.1;
    check_err(&c, 1, "optimizer.min_lr (0.1) must not exceed optimizer.lr (0.001)");
    c = base; c.dec.mag.mode = TP_MAG_LEARNABLE; c.dec.mag.mu0 = 1.0;
    check_err(&c, 1, "mag.mu0 must be strictly between 0 and 1 with mag.mode: learnable");
    c.dec.mag.mu0 = 0.0;
    check_err(&c, 1, "mag.mu0 must be strictly between 0 and 1");
    c.dec.mag.mu0 = 0.3;
    rc = tp_train_cfg_check(&c, 1, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    c = base; c.dec.lora.r = 0;
    check_err(&c, 1, "lora.r must be between 1 and 65536, got 0");
    c = base; c.dec.lora.targets = 0;
    check_err(&c, 1, "lora.target_modules");
    c = base; c.model_path[0] = 0;
    check_err(&c, 1, "model.path: not set");
    c = base; snprintf(c.model_path, sizeof c.model_path, "%s/absent", tmpdir);
    char need[600];
    snprintf(need, sizeof need, "model.path: %s/absent: no such directory", tmpdir);
    check_err(&c, 1, need);
    c = base; snprintf(c.model_path, sizeof c.model_path, "%s", data_file);
    check_err(&c, 1, "not a directory");
    c = base; c.run_dir[0] = 0;
    check_err(&c, 1, "run.dir: not set");
    c = base; snprintf(c.run_dir, sizeof c.run_dir, "%s", data_file);
    check_err(&c, 1, "run.dir:");
    c = base; c.data.path[0] = 0;
    check_err(&c, 1, "data.path: not set");
    c = base; snprintf(c.data.path, sizeof c.data.path, "%s/none.tok", tmpdir);
    snprintf(need, sizeof need, "data.path: %s/none.tok: no such file", tmpdir);
    check_err(&c, 1, need);
    c = base; snprintf(c.data.path, sizeof c.data.path, "%s", model_dir);
    check_err(&c, 1, "is a directory");
    c = base; snprintf(c.data.format, sizeof c.data.format, "json");
    check_err(&c, 1, "data.format must be tokens, text, alpaca or chat, got 'json'");
    c = base; snprintf(c.data.packing, sizeof c.data.packing, "x");
    check_err(&c, 1, "data.packing must be pack or pad");
    /* text formats: templates need their placeholders */
    tp_train_cfg_default(&c);
    snprintf(c.model_path, sizeof c.model_path, "%s", model_dir);
    snprintf(c.run_dir, sizeof c.run_dir, "%s", run_dir);
    snprintf(c.data.path, sizeof c.data.path, "%s", data_file);
    c.global_batch = 4;
    c.sched.total_steps = 3;
    tp_train_cfg t = c;
    for (int f = 0; f < 3; f++) {
        snprintf(t.data.format, sizeof t.data.format, "%s", f == 0 ? "text" : f == 1 ? "alpaca" : "chat");
        rc = tp_train_cfg_check(&t, 1, &err);
        CHECK_MSG(rc == TP_OK, "%s: %s", t.data.format, err.msg);
    }
    snprintf(c.data.format, sizeof c.data.format, "alpaca"); /* templates are checked for every text format */
    t = c; snprintf(t.data.alpaca_prompt, sizeof t.data.alpaca_prompt, "{instruction} and no input");
    check_err(&t, 1, "data.alpaca.prompt: the template must contain {input} exactly once, found 0");
    t = c; snprintf(t.data.alpaca_prompt, sizeof t.data.alpaca_prompt, "{instruction}{input}{instruction}");
    check_err(&t, 1, "data.alpaca.prompt: the template must contain {instruction} exactly once, found 2");
    t = c; snprintf(t.data.alpaca_prompt_no_input, sizeof t.data.alpaca_prompt_no_input, "{instruction}{input}");
    check_err(&t, 1, "data.alpaca.prompt_no_input: the template must not contain {input}");
    t = c; snprintf(t.data.chat_user, sizeof t.data.chat_user, "user: {Content}");
    check_err(&t, 1, "data.chat.user: the template must contain {content} exactly once, found 0");
    t = c; snprintf(t.data.chat_assistant, sizeof t.data.chat_assistant, "{content}{content}");
    check_err(&t, 1, "data.chat.assistant: the template must contain {content} exactly once, found 2");
    t = c; t.data.text_field[0] = 0;
    check_err(&t, 1, "data.text_field: empty");
    t = c; snprintf(t.data.format, sizeof t.data.format, "text"); t.model_path[0] = 0;
    rc = tp_train_cfg_check_data(&t, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "data.tokenizer: not set and no model.path"), "%s", err.msg);
    c = base; c.data.seq_len = 1;
    check_err(&c, 1, "data.seq_len must be >= 2, got 1");
    c = base; snprintf(c.data.long_docs, sizeof c.data.long_docs, "x");
    check_err(&c, 1, "data.long_docs");
    c = base; c.adamw.beta1 = 1.0;
    check_err(&c, 1, "optimizer.beta1 must be in [0, 1), got 1");
    c = base; c.adamw.eps = -1;
    check_err(&c, 1, "optimizer.eps must be a finite number >= 0, got -1");
    c = base; c.sched.total_steps = 0;
    check_err(&c, 1, "schedule.total_steps: not set");
    c = base; c.sched.peak_lr = 0.0 / 0.0;
    check_err(&c, 1, "optimizer.lr");
    c = base; c.weight_decay = -0.1;
    check_err(&c, 1, "optimizer.weight_decay");
    c = base; c.max_grad_norm = -3; /* no clipping: fine */
    rc = tp_train_cfg_check(&c, 1, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    c = base; c.ckpt_keep = 0;
    check_err(&c, 1, "checkpoint.keep");
    c = base; c.log_every = 0;
    check_err(&c, 1, "logging.every");
    c = base; c.max_bad_steps = 0;
    check_err(&c, 1, "faults.max_bad_steps");
    c = base; c.bucket_mb = 0;
    check_err(&c, 1, "dist.bucket_mb");
    c = base; c.dec.mag.nvalues = 0;
    check_err(&c, 1, "mag.values");
    c = base; c.dec.liza.order = 0;
    check_err(&c, 1, "liza.order");
    c = base; c.dec.lora.dropout = 1;
    check_err(&c, 1, "lora.dropout");
}

/* ---- resume JSON ------------------------------------------------------------ */

static void test_resume_json(void) {
    tp_train_cfg a, b;
    tp_err err = {0};
    int rc = tp_train_cfg_load(put_s("full.yaml", full_yaml), &a, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    rc = tp_train_cfg_load(put_s("full2.yaml", full_yaml), &b, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    char *ja = tp_train_cfg_resume_json(&a), *jb = tp_train_cfg_resume_json(&b);
    CHECK(ja && jb && !strcmp(ja, jb));
    /* what may change on resume */
    const char *same[] = {"logging.every=1",      "checkpoint.every=5",     "checkpoint.keep=1",
                          "schedule.total_steps=999", "optimizer.lr=5e-4",  "schedule.warmup_steps=0",
                          "optimizer.weight_decay=0", "run.dir=/elsewhere", "dist.bucket_mb=1",
                          "faults.max_bad_steps=9", "compute.matmul=f32",   "compute.recompute=false",
                          "mag.mu0=0.9",           "export.model_dir=/x",   "batch.micro=4",
                          "lora.dropout=0.2",      "data.cache_dir=/c",     "data.bad_records=skip",
                          /* format tokens: the text options do not matter */
                          "data.tokenizer=/t2",    "data.add_bos=true",     "data.add_eos=true",
                          "data.alpaca.prompt='{instruction}{input}'",     "data.chat.user=u{content}",
                          "data.text_field=t",     "data.txt_unit=line"};
    for (size_t i = 0; i < sizeof same / sizeof *same; i++) {
        tp_train_cfg c = a;
        set_ok(&c, same[i]);
        char *j = tp_train_cfg_resume_json(&c);
        CHECK_MSG(j && ja && !strcmp(j, ja), "%s changed the resume JSON", same[i]);
        free(j);
    }
    /* what may not */
    const char *differ[] = {"lora.r=8",          "lora.alpha=1",        "lora.target_modules=q_proj",
                            "lora.rslora=false", "trainable=lora",      "seed=1",
                            "model.path=/other", "data.path=/other",    "data.seq_len=2048",
                            "data.long_docs=split", "batch.global=64",  "liza.enabled=true",
                            "liza.order=1",      "liza.alpha_gate=c",   "liza.beta_gate=k",
                            "liza.trick=dt",     "liza.linear=true",    "liza.chunk_size=64",
                            "liza.base_scale_attn=false", "mag.mode=constant", "mag.learnable_shape=scalar",
                            "mag.cross_gate=false", "data.packing=pack",  "data.format=text"};
    for (size_t i = 0; i < sizeof differ / sizeof *differ; i++) {
        tp_train_cfg c = a;
        set_ok(&c, differ[i]);
        char *j = tp_train_cfg_resume_json(&c);
        CHECK_MSG(j && ja && strcmp(j, ja), "%s did not change the resume JSON", differ[i]);
        free(j);
    }
    /* canonical form, locked */
    tp_train_cfg d;
    tp_train_cfg_default(&d);
    set_ok(&d, "model.path=/m");
    set_ok(&d, "data.path=/d.tok");
    set_ok(&d, "batch.global=8");
    char *jd = tp_train_cfg_resume_json(&d);
    const char *want =
        "{\"batch\":{\"global\":8},\"data\":{\"format\":\"tokens\",\"long_docs\":\"split\",\"path\":\"/d.tok\","
        "\"seq_len\":512},\"liza\":{\"alpha_gate\":\"c\",\"base_scale_attn\":false,\"beta_gate\":\"k\","
        "\"chunk_size\":64,\"enabled\":true,\"linear\":true,\"order\":1,\"trick\":\"dt\"},\"lora\":{\"alpha\":16,"
        "\"r\":8,\"rslora\":false,\"target_modules\":[\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\"]},\"mag\":{"
        "\"cross_gate\":false,\"learnable_shape\":\"scalar\",\"mode\":\"constant\"},\"model\":{\"path\":\"/m\"},"
        "\"seed\":0,\"trainable\":\"lora\"}";
    CHECK_MSG(jd && !strcmp(jd, want), "resume JSON:\n%s", jd ? jd : "(null)");
    /* data.packing appears only when not the default "pack": the JSON above is
     * the one of checkpoints written before the key existed, which must resume */
    tp_train_cfg dp = d;
    set_ok(&dp, "data.packing=pad");
    char *jp = tp_train_cfg_resume_json(&dp);
    CHECK_MSG(jp && has(jp, "\"long_docs\":\"split\",\"packing\":\"pad\",\"path\":\"/d.tok\""), "packing=pad: %s",
              jp ? jp : "(null)");
    free(jp);
    /* text formats: every option that changes the tokens breaks a resume;
     * the cache and the bad-record policy do not */
    static const char *const fmts[] = {"data.format=text", "data.format=alpaca", "data.format=chat"};
    static const char *const tdiff[3][5] = {
        {"data.text_field=body", "data.txt_unit=document", "data.tokenizer=/t", "data.add_bos=false", "data.add_eos=false"},
        {"data.alpaca.prompt='{instruction}:{input}'", "data.alpaca.prompt_no_input='{instruction}:'", "data.tokenizer=/t",
         "data.add_bos=true", "data.add_eos=false"},
        {"data.chat.system=s{content}", "data.chat.user=u{content}", "data.chat.assistant=a{content}",
         "data.tokenizer=/t", "data.add_bos=true"}};
    for (int f = 0; f < 3; f++) {
        tp_train_cfg e = d;
        set_ok(&e, fmts[f]);
        char *je = tp_train_cfg_resume_json(&e);
        for (int i = 0; i < 5; i++) {
            tp_train_cfg g = e;
            set_ok(&g, tdiff[f][i]);
            char *j = tp_train_cfg_resume_json(&g);
            CHECK_MSG(j && je && strcmp(j, je), "%s: %s did not change the resume JSON", fmts[f], tdiff[f][i]);
            free(j);
        }
        for (int i = 0; i < 2; i++) {
            tp_train_cfg g = e;
            set_ok(&g, i ? "data.bad_records=abort" : "data.cache_dir=/elsewhere");
            char *j = tp_train_cfg_resume_json(&g);
            CHECK_MSG(j && je && !strcmp(j, je), "%s: cache_dir/bad_records changed the resume JSON", fmts[f]);
            free(j);
        }
        free(je);
    }
    char *doc = read_text("docs/config.md");
    CHECK_MSG(doc && has(doc, want), "docs/config.md does not show the resume JSON example");
    free(doc);
    /* valid JSON with the largest seed written exactly (2^53: trainer_state.json holds it as a JSON number) */
    set_ok(&d, "seed=9007199254740992");
    free(jd);
    jd = tp_train_cfg_resume_json(&d);
    cJSON *p = jd ? cJSON_Parse(jd) : NULL;
    CHECK(p != NULL && jd && has(jd, "\"seed\":9007199254740992"));
    cJSON_Delete(p);
    free(jd);
    free(ja);
    free(jb);
}

/* ---- mutations: never crash, always a one-line message ------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void test_mutations(void) {
    static const char alphabet[] = ":-[]{},#&*!|>'\"\n \t%@`?~.0123456789abcdefxyz\\\xff\xc3\x80";
    size_t n = strlen(full_yaml);
    char *buf = malloc(n + 64);
    if (!buf) { CHECK(0); return; }
    int accepted = 0, rejected = 0, bad = 0;
    /* TPTT_CFG_MUTATIONS=N [TPTT_CFG_SEED=S]: a longer run */
    int iters = getenv("TPTT_CFG_MUTATIONS") ? atoi(getenv("TPTT_CFG_MUTATIONS")) : 600;
    if (getenv("TPTT_CFG_SEED")) rng_state = strtoull(getenv("TPTT_CFG_SEED"), NULL, 0) | 1;
    for (int it = 0; it < iters; it++) {
        size_t len = n;
        memcpy(buf, full_yaml, n);
        int mode = it % 5;
        if (mode == 0) { /* truncation */
            len = (size_t)(rnd() % (n + 1));
        } else if (mode == 1) { /* random byte flips */
            int k = 1 + (int)(rnd() % 4);
            for (int j = 0; j < k; j++) buf[rnd() % n] = (char)(rnd() & 0xff);
        } else if (mode == 2) { /* YAML-significant characters */
            int k = 1 + (int)(rnd() % 3);
            for (int j = 0; j < k; j++) buf[rnd() % n] = alphabet[rnd() % (sizeof alphabet - 1)];
        } else if (mode == 3) { /* delete a span */
            size_t a = rnd() % n, b = a + rnd() % 40;
            if (b > n) b = n;
            memmove(buf + a, buf + b, n - b);
            len = n - (b - a);
        } else { /* insert a few characters */
            size_t a = rnd() % n;
            int k = 1 + (int)(rnd() % 8);
            memmove(buf + a + k, buf + a, n - a);
            for (int j = 0; j < k; j++) buf[a + j] = alphabet[rnd() % (sizeof alphabet - 1)];
            len = n + (size_t)k;
        }
        tp_train_cfg c;
        tp_err err = {0};
        int rc = tp_train_cfg_load(put("mut.yaml", buf, len), &c, &err);
        if (rc == TP_OK) {
            accepted++;
            tp_train_cfg_check(&c, 2, &err);
            free(tp_train_cfg_resume_json(&c));
        } else {
            rejected++;
            if (!err.msg[0] || strchr(err.msg, '\n') || err.code != rc) {
                bad++;
                fprintf(stderr, "mutation %d: rc %d, message '%s'\n", it, rc, err.msg);
            }
        }
    }
    CHECK_MSG(bad == 0, "%d mutations without a proper message", bad);
    CHECK(iters < 600 || (accepted > 0 && rejected > 100));
    printf("mutations: %d accepted, %d rejected\n", accepted, rejected);

    /* pathological nesting and sizes: an error, not a crash */
    size_t deep = 5000;
    char *d = malloc(2 * deep + 16);
    if (d) {
        memcpy(d, "seed: ", 6);
        memset(d + 6, '[', deep);
        memset(d + 6 + deep, ']', deep);
        d[6 + 2 * deep] = '\n';
        tp_train_cfg c;
        tp_err err = {0};
        int rc = tp_train_cfg_load(put("mut.yaml", d, 7 + 2 * deep), &c, &err);
        CHECK_MSG(rc != TP_OK && has(err.msg, "seed: expected a non-negative integer, got a list"), "%s", err.msg);
        memset(d, '{', 2 * deep);
        rc = tp_train_cfg_load(put("mut.yaml", d, 2 * deep), &c, &err);
        CHECK_MSG(rc != TP_OK && has(err.msg, "YAML syntax error"), "%s", err.msg);
        free(d);
    }
    d = malloc((64u << 10) + 2);
    if (d) { /* over the 64 KiB limit */
        memset(d, '#', (64u << 10) + 1);
        tp_train_cfg c;
        tp_err err = {0};
        int rc = tp_train_cfg_load(put("mut.yaml", d, (64u << 10) + 1), &c, &err);
        CHECK_MSG(rc != TP_OK && has(err.msg, "larger than"), "%s", err.msg);
        free(d);
    }

    /* --set with random values for every key */
    static const char *const keys[] = {"seed", "trainable", "lora.r", "lora.target_modules", "mag.values",
                                       "liza.preset", "optimizer.lr", "model.path", "data.tokenizer", "liza.enabled"};
    tp_train_cfg c;
    tp_train_cfg_default(&c);
    for (int it = 0; it < 400; it++) {
        char kv[96];
        int p = snprintf(kv, sizeof kv, "%s=", keys[it % 10]);
        int k = (int)(rnd() % 12);
        for (int j = 0; j < k; j++) kv[p++] = alphabet[rnd() % (sizeof alphabet - 1)];
        kv[p] = 0;
        tp_err err = {0};
        int rc = tp_train_cfg_set(&c, kv, &err);
        if (rc != TP_OK) CHECK_MSG(err.msg[0] && !strchr(err.msg, '\n') && !strncmp(err.msg, "--set ", 6),
                                   "--set '%s': bad message '%s'", kv, err.msg);
    }
    free(buf);
}

/* ---- eval.*, schedule.epochs, model.hub_id --------------------------------- */

static void test_eval_epochs(void) {
    tp_train_cfg c;
    tp_err err = {0};
    char text[2048];
    snprintf(text, sizeof text,
             "model: {path: %s, hub_id: org/base-1B}\nrun: {dir: %s}\ndata: {path: %s}\nbatch: {global: 8}\n"
             "schedule: {epochs: 2.5}\neval: {split: 0.05, every: 10, max_rows: 7}\n",
             model_dir, run_dir, data_file);
    int rc = tp_train_cfg_load(put_s("ev.yaml", text), &c, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK(c.epochs == 2.5 && c.sched.total_steps == 0 && c.eval.split == 0.05 && c.eval.every == 10 &&
          c.eval.max_rows == 7 && !c.eval.path[0] && !strcmp(c.hub_id, "org/base-1B"));
    rc = tp_train_cfg_check(&c, 2, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    /* total_steps = ceil(epochs * rows / global) */
    CHECK(tp_train_cfg_total_steps(&c, 100) == 32); /* 2.5 * 100 / 8 = 31.25 */
    CHECK(tp_train_cfg_total_steps(&c, 1) == 1);
    /* the resume digest holds what decides total_steps and the training rows */
    char *j = tp_train_cfg_resume_json(&c);
    CHECK_MSG(j && has(j, "\"schedule\":{\"epochs\":2.5}") && has(j, "\"eval\":{\"split\":0.05}"), "%s", j ? j : "");
    free(j);
    tp_train_cfg t = c;
    t.epochs = 0;
    t.sched.total_steps = 10;
    t.eval.split = 0;
    t.eval.every = t.eval.max_rows = 0;
    j = tp_train_cfg_resume_json(&t);
    CHECK_MSG(j && !has(j, "epochs") && !has(j, "eval"), "%s", j ? j : ""); /* older checkpoints keep resuming */
    free(j);
    /* --set of one replaces the other */
    CHECK(tp_train_cfg_set(&c, "schedule.total_steps=40", &err) == TP_OK && c.epochs == 0 && c.sched.total_steps == 40);
    CHECK(tp_train_cfg_set(&c, "schedule.epochs=1", &err) == TP_OK && c.epochs == 1 && c.sched.total_steps == 0);
    CHECK(tp_train_cfg_total_steps(&c, 20) == 3);
    CHECK(tp_train_cfg_set(&c, "eval.path=", &err) == TP_OK && !c.eval.path[0]);
    rc = tp_train_cfg_set(&c, "eval.split=1", &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "--set eval.split: expected a number in (0, 1), got '1'"), "%s", err.msg);
    rc = tp_train_cfg_set(&c, "schedule.epochs=0", &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "schedule.epochs: expected a number in (0, 1e+09]"), "%s", err.msg);
    /* file: both schedule keys, both eval sources */
    snprintf(text, sizeof text,
             "model: {path: /m}\nrun: {dir: /r}\ndata: {path: /d}\nbatch: {global: 8}\n"
             "schedule:\n  total_steps: 5\n  epochs: 2\n");
    rc = tp_train_cfg_load(put_s("ev.yaml", text), &c, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, ":7: schedule.epochs: expected either schedule.total_steps (line 6)"),
              "%s", err.msg);
    snprintf(text, sizeof text,
             "model: {path: /m}\nrun: {dir: /r}\ndata: {path: /d}\nbatch: {global: 8}\nschedule: {epochs: 2}\n"
             "eval:\n  path: /e\n  split: 0.1\n");
    rc = tp_train_cfg_load(put_s("ev.yaml", text), &c, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, ":8: eval.split: expected either eval.path (line 7) or eval.split"), "%s",
              err.msg);
    snprintf(text, sizeof text, "model: {path: /m}\nrun: {dir: /r}\ndata: {path: /d}\nbatch: {global: 8}\n");
    rc = tp_train_cfg_load(put_s("ev.yaml", text), &c, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "missing required key 'schedule.total_steps' (or 'schedule.epochs')"), "%s",
              err.msg);
    snprintf(text, sizeof text, "eval:\n  evry: 3\n");
    rc = tp_train_cfg_load(put_s("ev.yaml", text), &c, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "unknown key 'eval.evry' (expected one of: path, split, every, max_rows)"),
              "%s", err.msg);
    /* cross checks */
    tp_train_cfg_default(&c);
    snprintf(c.model_path, sizeof c.model_path, "%s", model_dir);
    snprintf(c.run_dir, sizeof c.run_dir, "%s", run_dir);
    snprintf(c.data.path, sizeof c.data.path, "%s", data_file);
    c.global_batch = 8;
    c.epochs = 1;
    c.sched.total_steps = 3;
    rc = tp_train_cfg_check(&c, 1, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "set one of them, not both"), "%s", err.msg);
    c.sched.total_steps = 0;
    c.sched.warmup_steps = 50; /* unknown total: checked by the trainer once the rows are known */
    rc = tp_train_cfg_check(&c, 1, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    c.eval.every = 5;
    rc = tp_train_cfg_check(&c, 1, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "eval.every: set, but there is nothing to evaluate"), "%s", err.msg);
    snprintf(c.eval.path, sizeof c.eval.path, "%s/none.tok", tmpdir);
    rc = tp_train_cfg_check(&c, 1, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "eval.path: ") && has(err.msg, "no such file"), "%s", err.msg);
    snprintf(c.eval.path, sizeof c.eval.path, "%s", data_file);
    rc = tp_train_cfg_check(&c, 1, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    char p[400];
    snprintf(p, sizeof p, "%s/ev.yaml", tmpdir);
    unlink(p);
}

int main(void) {
    const char *t = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/tptt-cfg-XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 2; }
    snprintf(model_dir, sizeof model_dir, "%s/model", tmpdir);
    snprintf(run_dir, sizeof run_dir, "%s/run", tmpdir);
    snprintf(data_file, sizeof data_file, "%s/train.tok", tmpdir);
    if (mkdir(model_dir, 0755)) { perror(model_dir); return 2; }
    FILE *fp = fopen(data_file, "wb");
    if (!fp) { perror(data_file); return 2; }
    fclose(fp);
    make_full_yaml();

    test_defaults();
    test_full();
    test_errors();
    test_set();
    test_check();
    test_resume_json();
    test_mutations();
    test_eval_epochs();

    /* clean up the temp dir (files this test wrote) */
    char p[400];
    const char *files[] = {"min.yaml", "full.yaml", "full2.yaml", "preset.yaml", "forms.yaml", "mut.yaml", "train.tok"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(p, sizeof p, "%s/%s", tmpdir, files[i]);
        unlink(p);
    }
    for (size_t i = 0; i < sizeof err_cases / sizeof *err_cases; i++) {
        snprintf(p, sizeof p, "%s/err%02zu.yaml", tmpdir, i);
        unlink(p);
    }
    rmdir(model_dir);
    rmdir(tmpdir);
    return tp_test_report("test_config_yaml");
}
