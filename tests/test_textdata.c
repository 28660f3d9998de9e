/* test_textdata.c - text/Alpaca/chat records -> documents -> cached shards
 * (src/data/textdata.h, docs/data.md "Text data sets"), with the real
 * Mistral (SentencePiece, BOS) and Qwen3 (byte-level, ChatML) tokenizers of
 * tests/fixtures/tokenizers.
 *
 * - documents: the ids are [BOS] + encode(each piece) + [EOS] with the
 *   pieces and templates written out here (Stanford Alpaca, ChatML), the
 *   mask 0 on the prompt and 1 on the response; placeholders in values are
 *   not substituted; NUL survives; BOS/EOS options; no second EOS after a
 *   document that already ends with it;
 * - every kind of bad record gives its reason;
 * - prepare (one rank): .txt units, bad-record counts and line numbers in
 *   the sidecar, abort mode, no usable records, cache reuse (file untouched)
 *   and invalidation by the source bytes or a template;
 * - JSON array sources: the same shard as the records as JSONL, record
 *   numbers for bad elements, a broken file named with line and column.
 * The multi-rank build is tests/test_prepare_data.py. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/dataset.h"
#include "data/textdata.h"
#include "test.h"
#include "util/fsutil.h"

static char tmp[256];
static tp_tokenizer *mistral, *qwen;

static const char *source_dir(void) {
    const char *s = getenv("TPTT_SOURCE_DIR");
    return s ? s : TPTT_SOURCE_DIR_DEFAULT;
}

static int has(const char *hay, const char *needle) { return hay && strstr(hay, needle) != NULL; }

/* ---- expected documents ------------------------------------------------------ */

typedef struct want {
    int32_t ids[4096];
    uint8_t mask[4096];
    size_t n;
} want;

static void w_id(want *w, int32_t id, uint8_t m) {
    w->ids[w->n] = id;
    w->mask[w->n++] = m;
}

static void w_text(want *w, tp_tokenizer *t, const char *s, size_t n, uint8_t m) {
    tp_ids v = {0};
    tp_err err = {0};
    CHECK_MSG(tp_tokenizer_encode(t, s, n, 0, &v, &err) == TP_OK, "%s", err.msg);
    for (size_t i = 0; i < v.n && w->n < 4096; i++) w_id(w, v.ids[i], m);
    tp_ids_free(&v);
}
static void w_str(want *w, tp_tokenizer *t, const char *s, uint8_t m) { w_text(w, t, s, strlen(s), m); }

static void base_cfg(tp_train_cfg *c, const char *format, const char *tok) {
    tp_train_cfg_default(c);
    snprintf(c->data.format, sizeof c->data.format, "%s", format);
    snprintf(c->data.tokenizer, sizeof c->data.tokenizer, "%s/tests/fixtures/tokenizers/%s", source_dir(), tok);
    snprintf(c->model_path, sizeof c->model_path, "%s", tmp);
    snprintf(c->run_dir, sizeof c->run_dir, "%s/run", tmp);
}

/* Build the document of rec and compare it with w (mask compared if with_mask). */
static void expect_doc(const char *what, const tp_train_cfg *c, tp_tokenizer *t, const char *rec, size_t n,
                       const want *w, int with_mask) {
    tp_textspec sp;
    tp_textdoc d = {0};
    tp_err err = {0};
    char why[256];
    int rc = tp_textspec_init(c, t, &sp, &err);
    CHECK_MSG(rc == TP_OK, "%s: %s", what, err.msg);
    if (rc) return;
    rc = tp_textdoc_build(&sp, rec, n, &d, why, sizeof why, &err);
    CHECK_MSG(rc == TP_REC_OK, "%s: rc %d (%s %s)", what, rc, why, err.msg);
    int same = rc == TP_REC_OK && d.ids.n == w->n && !memcmp(d.ids.ids, w->ids, w->n * 4) &&
               (!with_mask || !memcmp(d.mask, w->mask, w->n));
    CHECK_MSG(same, "%s: document differs (%zu ids, expected %zu)", what, d.ids.n, w->n);
    if (!same)
        for (size_t i = 0; i < d.ids.n && i < w->n; i++)
            if (d.ids.ids[i] != w->ids[i] || d.mask[i] != w->mask[i]) {
                fprintf(stderr, "  first difference at %zu: id %d/%d mask %d/%d\n", i, d.ids.ids[i], w->ids[i],
                        d.mask[i], w->mask[i]);
                break;
            }
    tp_textdoc_free(&d);
}

static void expect_str(const char *what, const tp_train_cfg *c, tp_tokenizer *t, const char *rec, const want *w,
                       int with_mask) {
    expect_doc(what, c, t, rec, strlen(rec), w, with_mask);
}

#define ALPACA_HEAD                                                                                                 \
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a " \
    "response that appropriately completes the request.\n\n### Instruction:\n"
#define ALPACA_HEAD_NI                                                                                     \
    "Below is an instruction that describes a task. Write a response that appropriately completes the " \
    "request.\n\n### Instruction:\n"

static void test_alpaca(void) {
    tp_train_cfg c;
    base_cfg(&c, "alpaca", "mistral");
    want w = {0};
    /* Mistral adds BOS (<s> = 1); EOS </s> = 2 */
    w_id(&w, 1, 0);
    w_str(&w, mistral, ALPACA_HEAD "Say hi\n\n### Input:\nto Bob\n\n### Response:\n", 0);
    w_str(&w, mistral, "Hi Bob!", 1);
    w_id(&w, 2, 1);
    expect_str("alpaca with input", &c, mistral, "{\"instruction\":\"Say hi\",\"input\":\"to Bob\",\"output\":\"Hi Bob!\"}",
               &w, 1);
    CHECK(w.n > 20 && w.ids[0] == 1 && w.mask[0] == 0 && w.mask[w.n - 1] == 1);
    /* no input: missing, empty or null all take prompt_no_input */
    w.n = 0;
    w_id(&w, 1, 0);
    w_str(&w, mistral, ALPACA_HEAD_NI "Name a color.\n\n### Response:\n", 0);
    w_str(&w, mistral, "Blue \xc3\xa9\xe6\x97\xa5", 1); /* é日 */
    w_id(&w, 2, 1);
    expect_str("alpaca, input missing", &c, mistral, "{\"instruction\":\"Name a color.\",\"output\":\"Blue \\u00e9日\"}",
               &w, 1);
    expect_str("alpaca, input empty", &c, mistral,
               "{\"output\":\"Blue \\u00e9日\",\"input\":\"\",\"instruction\":\"Name a color.\",\"extra\":[1]}", &w, 1);
    expect_str("alpaca, input null", &c, mistral,
               " {\"instruction\":\"Name a color.\",\"input\":null,\"output\":\"Blue \\u00e9日\"}\r", &w, 1);
    /* custom template; braces that are no placeholder stay; values are never searched */
    snprintf(c.data.alpaca_prompt, sizeof c.data.alpaca_prompt, "{x} Q={instruction} [{input}] {instr}\n");
    snprintf(c.data.add_bos, sizeof c.data.add_bos, "false");
    c.data.add_eos = 0;
    w.n = 0;
    w_str(&w, mistral, "{x} Q={input} [{instruction}] {instr}\n", 0);
    w_text(&w, mistral, "a\0b", 3, 1); /* "\u0000" kept */
    expect_str("custom prompt, NUL, no BOS/EOS", &c, mistral,
               "{\"instruction\":\"{input}\",\"input\":\"{instruction}\",\"output\":\"a\\u0000b\"}", &w, 1);
    /* Qwen3 has no BOS: auto adds none, true is an error; EOS is <|im_end|> */
    base_cfg(&c, "alpaca", "qwen3");
    w.n = 0;
    w_str(&w, qwen, ALPACA_HEAD_NI "x\n\n### Response:\n", 0);
    w_str(&w, qwen, "y", 1);
    w_id(&w, tp_tokenizer_token_id(qwen, "<|im_end|>"), 1);
    CHECK(tp_tokenizer_token_id(qwen, "<|im_end|>") == 151645);
    expect_str("alpaca qwen3", &c, qwen, "{\"instruction\":\"x\",\"output\":\"y\"}", &w, 1);
    tp_textspec sp;
    tp_err err = {0};
    snprintf(c.data.add_bos, sizeof c.data.add_bos, "true");
    int rc = tp_textspec_init(&c, qwen, &sp, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "data.add_bos: true, but the tokenizer") && has(err.msg, "has no BOS token"),
              "%s", err.msg);
}

static void test_chat(void) {
    tp_train_cfg c;
    base_cfg(&c, "chat", "qwen3");
    const char *rec =
        "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"2+2?\"},"
        "{\"role\":\"assistant\",\"content\":\"4\"},{\"role\":\"user\",\"content\":\"And 3+3?\",\"name\":\"x\"},"
        "{\"role\":\"assistant\",\"content\":\"6, {content} stays\"}]}";
    want w = {0};
    w_str(&w, qwen, "<|im_start|>system\nBe brief.<|im_end|>\n", 0);
    w_str(&w, qwen, "<|im_start|>user\n2+2?<|im_end|>\n", 0);
    w_str(&w, qwen, "<|im_start|>assistant\n", 0);
    w_str(&w, qwen, "4<|im_end|>\n", 1);
    w_str(&w, qwen, "<|im_start|>user\nAnd 3+3?<|im_end|>\n", 0);
    w_str(&w, qwen, "<|im_start|>assistant\n", 0);
    w_str(&w, qwen, "6, {content} stays<|im_end|>\n", 1);
    w_id(&w, 151645, 1);
    expect_str("chat qwen3 ChatML", &c, qwen, rec, &w, 1);
    /* the special tokens are single added-token ids */
    CHECK_MSG(w.ids[0] == 151644 && w.n > 30, "first id %d", w.ids[0]);
    size_t trained = 0;
    for (size_t i = 0; i < w.n; i++) trained += w.mask[i];
    CHECK(trained > 4 && trained < w.n / 2);
    /* custom templates, no EOS */
    snprintf(c.data.chat_system, sizeof c.data.chat_system, "S:{content}|");
    snprintf(c.data.chat_user, sizeof c.data.chat_user, "U:{content}|");
    snprintf(c.data.chat_assistant, sizeof c.data.chat_assistant, "A:{content}</A>");
    c.data.add_eos = 0;
    w.n = 0;
    w_str(&w, qwen, "U:hi|", 0);
    w_str(&w, qwen, "A:", 0);
    w_str(&w, qwen, "yo</A>", 1);
    expect_str("chat custom templates", &c, qwen,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}", &w,
               1);
}

static void test_text(void) {
    tp_train_cfg c;
    base_cfg(&c, "text", "mistral");
    want w = {0};
    w_id(&w, 1, 1);
    w_str(&w, mistral, "Hello world.\nSecond line.", 1);
    w_id(&w, 2, 1);
    expect_str("text jsonl", &c, mistral, "{\"text\":\"Hello world.\\nSecond line.\",\"id\":7}", &w, 0);
    snprintf(c.data.text_field, sizeof c.data.text_field, "body");
    snprintf(c.data.add_bos, sizeof c.data.add_bos, "false");
    w.n = 0;
    w_str(&w, mistral, "Hello world.\nSecond line.", 1);
    w_id(&w, 2, 1);
    expect_str("text field body, no BOS", &c, mistral, "{\"body\":\"Hello world.\\nSecond line.\"}", &w, 0);
    tp_textspec sp;
    tp_textdoc d = {0};
    tp_err err = {0};
    char why[256];
    CHECK(tp_textspec_init(&c, mistral, &sp, &err) == TP_OK);
    CHECK(tp_textdoc_build(&sp, "{\"body\":\"\"}", 11, &d, why, sizeof why, &err) == TP_REC_EMPTY);
    tp_textdoc_free(&d);
}

/* EOS is appended unless the document already ends with the EOS token. */
static void test_eos_rule(void) {
    tp_train_cfg c;
    base_cfg(&c, "chat", "qwen3");
    const char *rec =
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}";
    want w = {0};
    /* default ChatML: the document ends with "<|im_end|>\n", so EOS follows */
    w_str(&w, qwen, "<|im_start|>user\nhi<|im_end|>\n", 0);
    w_str(&w, qwen, "<|im_start|>assistant\n", 0);
    w_str(&w, qwen, "yo<|im_end|>\n", 1);
    w_id(&w, 151645, 1);
    expect_str("ChatML ends with a newline: EOS appended", &c, qwen, rec, &w, 1);
    /* an assistant template that ends with <|im_end|>: no second one */
    snprintf(c.data.chat_assistant, sizeof c.data.chat_assistant, "<|im_start|>assistant\n{content}<|im_end|>");
    w.n = 0;
    w_str(&w, qwen, "<|im_start|>user\nhi<|im_end|>\n", 0);
    w_str(&w, qwen, "<|im_start|>assistant\n", 0);
    w_str(&w, qwen, "yo<|im_end|>", 1);
    CHECK(w.ids[w.n - 1] == 151645 && w.ids[w.n - 2] != 151645);
    expect_str("template ends with EOS: none added", &c, qwen, rec, &w, 1);
    /* alpaca: an output ending with the EOS string */
    base_cfg(&c, "alpaca", "mistral");
    w.n = 0;
    w_id(&w, 1, 0);
    w_str(&w, mistral, ALPACA_HEAD_NI "x\n\n### Response:\n", 0);
    w_str(&w, mistral, "y</s>", 1);
    CHECK(w.ids[w.n - 1] == 2);
    expect_str("alpaca output ends with </s>", &c, mistral, "{\"instruction\":\"x\",\"output\":\"y</s>\"}", &w, 1);
    /* text: ends with the EOS string, or with it followed by a space */
    base_cfg(&c, "text", "mistral");
    w.n = 0;
    w_id(&w, 1, 1);
    w_str(&w, mistral, "end</s>", 1);
    expect_str("text ends with </s>", &c, mistral, "{\"text\":\"end</s>\"}", &w, 0);
    w.n = 0;
    w_id(&w, 1, 1);
    w_str(&w, mistral, "end</s> ", 1);
    w_id(&w, 2, 1);
    CHECK(w.ids[w.n - 2] != 2);
    expect_str("text ends with </s> and a space", &c, mistral, "{\"text\":\"end</s> \"}", &w, 0);
}

static void expect_bad(const char *format, const char *field, const char *rec, size_t n, const char *need) {
    tp_train_cfg c;
    base_cfg(&c, format, "qwen3");
    if (field) snprintf(c.data.text_field, sizeof c.data.text_field, "%s", field);
    tp_textspec sp;
    tp_textdoc d = {0};
    tp_err err = {0};
    char why[256];
    CHECK(tp_textspec_init(&c, qwen, &sp, &err) == TP_OK);
    int rc = tp_textdoc_build(&sp, rec, n, &d, why, sizeof why, &err);
    CHECK_MSG(rc == TP_REC_BAD && has(why, need), "%s record %.60s: rc %d, why '%s', expected '%s'", format, rec, rc,
              why, need);
    tp_textdoc_free(&d);
}
#define BAD(f, rec, need) expect_bad(f, NULL, rec, sizeof rec - 1, need)

static void test_bad_records(void) {
    BAD("alpaca", "{\"instruction\":\"x\"}", "missing field 'output'");
    BAD("alpaca", "{\"output\":\"x\"}", "missing field 'instruction'");
    BAD("alpaca", "{\"instruction\":\"x\",\"output\":5}", "field 'output' is a number, expected a string");
    BAD("alpaca", "{\"instruction\":true,\"output\":\"y\"}", "field 'instruction' is a boolean, expected a string");
    BAD("alpaca", "{\"instruction\":\"x\",\"input\":[1],\"output\":\"y\"}", "field 'input' is an array");
    BAD("alpaca", "{\"instruction\":\"x\",\"output\":null}", "field 'output' is null, expected a string");
    BAD("alpaca", "{\"instruction\":\"x\",\"output\":\"y\"", "not valid JSON");
    BAD("alpaca", "{\"instruction\":\"x\",\"output\":\"caf\xc3\x28\"}", "invalid UTF-8");
    BAD("alpaca", "{\"instruction\":\"x\",\"output\":\"\\ud800\"}", "not valid JSON");
    BAD("alpaca", "{\"instruction\":\"a\",\"instruction\":\"b\",\"output\":\"c\"}", "duplicate");
    BAD("alpaca", "[1, 2]", "expected a JSON object, got an array");
    BAD("alpaca", "\"text\"", "not valid JSON");
    BAD("alpaca", "{\"instruction\":\"x\",\"output\":\"raw\ttab\"}", "not valid JSON"); /* control character */
    BAD("chat", "{\"msgs\":[]}", "missing field 'messages'");
    BAD("chat", "{\"messages\":\"hi\"}", "field 'messages' is a string, expected an array");
    BAD("chat", "{\"messages\":[]}", "field 'messages' is an empty array");
    BAD("chat", "{\"messages\":[1]}", "messages[0] is a number, expected an object");
    BAD("chat", "{\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}",
        "messages[0].role is 'bot', expected system, user or assistant");
    BAD("chat", "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", "no assistant message");
    BAD("chat", "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"assistant\"}]}",
        "missing field 'messages[1].content'");
    BAD("chat", "{\"messages\":[{\"role\":\"assistant\",\"content\":1}]}",
        "field 'messages[0].content' is a number, expected a string");
    BAD("text", "{\"txt\":\"x\"}", "missing field 'text'");
    expect_bad("text", "body", "{\"text\":\"x\"}", 12, "missing field 'body'");
}

/* ---- prepare, one rank ------------------------------------------------------------ */

static void put(const char *path, const char *s, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp || (n && fwrite(s, 1, n, fp) != n)) perror(path);
    if (fp) fclose(fp);
}

static char *read_all(const char *path) {
    char *b = NULL;
    tp_err err;
    if (tp_read_file(path, 1 << 20, &b, NULL, &err) != TP_OK) return NULL;
    return b;
}

static int prepare(const tp_train_cfg *c, tp_tokenizer *t, char **shard, tp_err *err) {
    tp_dist d = {.rank = 0, .world = 1};
    return tp_textdata_prepare(c, t, &d, shard, err);
}

/* The documents of a shard equal [BOS] + encode(texts[i]) + [EOS]. */
static void expect_shard(const char *what, const char *shard, tp_tokenizer *t, const char *const *texts, size_t n) {
    tp_shard sh;
    tp_err err = {0};
    int rc = tp_shard_map(shard, &sh, &err);
    CHECK_MSG(rc == TP_OK, "%s: %s", what, err.msg);
    if (rc) return;
    CHECK_MSG(sh.n_docs == n && sh.mask == NULL, "%s: %llu documents, expected %zu", what,
              (unsigned long long)sh.n_docs, n);
    for (size_t i = 0; i < n && i < sh.n_docs; i++) {
        want w = {0};
        w_id(&w, 1, 1);
        w_str(&w, t, texts[i], 1);
        w_id(&w, 2, 1);
        uint64_t a = sh.offsets[i], len = sh.offsets[i + 1] - a;
        int same = len == w.n;
        for (size_t k = 0; same && k < len; k++) same = (int32_t)sh.tokens[a + k] == w.ids[k];
        CHECK_MSG(same, "%s: document %zu is not [BOS] + encode(\"%s\") + [EOS]", what, i, texts[i]);
    }
    tp_shard_unmap(&sh);
}

static void test_txt_units(void) {
    char src[512];
    snprintf(src, sizeof src, "%s/notes.txt", tmp);
    const char text[] = "first line\r\n\n  \t\nsecond para l1\nl2\n\n\nthird\n";
    put(src, text, sizeof text - 1);
    static const char *const lines[] = {"first line", "second para l1", "l2", "third"};
    static const char *const paras[] = {"first line", "second para l1\nl2", "third"};
    const char *const whole[] = {text};
    const char *units[] = {"line", "paragraph", "document"};
    const char *const *expect[] = {lines, paras, whole};
    size_t counts[] = {4, 3, 1};
    for (int u = 0; u < 3; u++) {
        tp_train_cfg c;
        base_cfg(&c, "text", "mistral");
        snprintf(c.data.path, sizeof c.data.path, "%s", src);
        snprintf(c.data.txt_unit, sizeof c.data.txt_unit, "%s", units[u]);
        char *shard = NULL;
        tp_err err = {0};
        int rc = prepare(&c, mistral, &shard, &err);
        CHECK_MSG(rc == TP_OK, "%s: %s", units[u], err.msg);
        if (rc == TP_OK) expect_shard(units[u], shard, mistral, expect[u], counts[u]);
        free(shard);
    }
    /* invalid UTF-8 on line 3 of a .txt file: skipped, counted, line reported */
    const char bad[] = "good one\n\nbad \xff byte\nanother good\n";
    put(src, bad, sizeof bad - 1);
    tp_train_cfg c;
    base_cfg(&c, "text", "mistral");
    snprintf(c.data.path, sizeof c.data.path, "%s", src);
    char *shard = NULL;
    tp_err err = {0};
    int rc = prepare(&c, mistral, &shard, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    if (rc == TP_OK) {
        static const char *const good[] = {"good one", "another good"};
        expect_shard("txt with a bad line", shard, mistral, good, 2);
        char side[600];
        snprintf(side, sizeof side, "%.*s.json", (int)strlen(shard) - 4, shard);
        char *js = read_all(side);
        CHECK_MSG(has(js, "\"skipped\":\t1") && has(js, "\"bad_lines\":\t[3]") && has(js, "line 3: invalid UTF-8") &&
                      has(js, "\"records\":\t3"),
                  "sidecar: %s", js ? js : "(none)");
        free(js);
    }
    free(shard);
}

static long long mtime_ns(const char *path) {
    struct stat st;
    if (stat(path, &st)) return -1;
    return (long long)st.st_mtim.tv_sec * 1000000000ll + st.st_mtim.tv_nsec;
}

static void test_cache_and_errors(void) {
    char src[512], side[600];
    snprintf(src, sizeof src, "%s/a.jsonl", tmp);
    const char data[] = "{\"instruction\":\"a\",\"output\":\"b\"}\n\n{\"instruction\":\"c\"}\n"
                        "{\"instruction\":\"d\",\"input\":\"e\",\"output\":\"f\"}\n[]\n";
    put(src, data, sizeof data - 1);
    tp_train_cfg c;
    base_cfg(&c, "alpaca", "mistral");
    snprintf(c.data.path, sizeof c.data.path, "%s", src);
    snprintf(c.data.cache_dir, sizeof c.data.cache_dir, "%s/cache", tmp);
    char *s1 = NULL, *s2 = NULL, *s3 = NULL, *s4 = NULL;
    tp_err err = {0};
    int rc = prepare(&c, mistral, &s1, &err);
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    if (rc) return;
    CHECK_MSG(has(s1, "/cache/a.jsonl.") && has(s1, ".tok"), "%s", s1);
    snprintf(side, sizeof side, "%.*s.json", (int)strlen(s1) - 4, s1);
    char *js1 = read_all(side);
    CHECK_MSG(has(js1, "\"records\":\t4") && has(js1, "\"documents\":\t2") && has(js1, "\"skipped\":\t2") &&
                  has(js1, "\"bad_lines\":\t[3, 5]") && has(js1, "line 3: missing field 'output'"),
              "sidecar: %s", js1 ? js1 : "(none)");
    tp_shard sh;
    if (tp_shard_map(s1, &sh, &err) == TP_OK) {
        CHECK(sh.n_docs == 2 && sh.mask != NULL && sh.tokens[0] == 1 && sh.mask[0] == 0 &&
              sh.tokens[sh.offsets[1] - 1] == 2 && sh.mask[sh.offsets[1] - 1] == 1);
        tp_shard_unmap(&sh);
    }
    long long m1 = mtime_ns(s1), ms1 = mtime_ns(side);
    usleep(20000);
    /* the same inputs: reused, nothing rewritten */
    rc = prepare(&c, mistral, &s2, &err);
    CHECK_MSG(rc == TP_OK && s2 && !strcmp(s1, s2), "second prepare: %s", rc ? err.msg : s2);
    char *js2 = read_all(side);
    CHECK_MSG(mtime_ns(s1) == m1 && mtime_ns(side) == ms1 && js1 && js2 && !strcmp(js1, js2),
              "the cached shard or sidecar was rewritten");
    free(js2);
    /* a template option changes the key */
    tp_train_cfg c2 = c;
    snprintf(c2.data.alpaca_prompt_no_input, sizeof c2.data.alpaca_prompt_no_input, "Q: {instruction}\nA: ");
    rc = prepare(&c2, mistral, &s3, &err);
    CHECK_MSG(rc == TP_OK && s3 && strcmp(s1, s3), "template change: %s", rc ? err.msg : s3);
    /* so does another tokenizer, add_eos, ... */
    c2 = c;
    c2.data.add_eos = 0;
    free(s3);
    s3 = NULL;
    rc = prepare(&c2, mistral, &s3, &err);
    CHECK_MSG(rc == TP_OK && s3 && strcmp(s1, s3), "add_eos change: %s", rc ? err.msg : s3);
    /* ... and the source bytes (one byte changed: "b" -> "B") */
    char data2[sizeof data];
    memcpy(data2, data, sizeof data);
    data2[29] = 'B';
    put(src, data2, sizeof data2 - 1);
    rc = prepare(&c, mistral, &s4, &err);
    CHECK_MSG(rc == TP_OK && s4 && strcmp(s1, s4) && tp_exists(s1), "source change: %s", rc ? err.msg : s4);
    /* a damaged cached shard is rebuilt */
    put(src, data, sizeof data - 1);
    put(s1, "garbage", 7);
    free(s2);
    s2 = NULL;
    rc = prepare(&c, mistral, &s2, &err);
    CHECK_MSG(rc == TP_OK && s2 && !strcmp(s1, s2) && tp_file_size(s1) > 100, "damaged cache: %s", err.msg);
    /* abort mode: the first bad record, with its line; a cached shard built
     * with skipped records is not reused */
    snprintf(c.data.bad_records, sizeof c.data.bad_records, "abort");
    char *s5 = NULL;
    char need[700];
    snprintf(need, sizeof need, "%s:3: missing field 'output' (data.bad_records: abort", src);
    rc = prepare(&c, mistral, &s5, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, need), "abort mode: %s", err.msg);
    free(s5);
    /* nothing usable */
    put(src, "{}\n[]\n", 6); /* (a source starting with '[' would be a JSON array) */
    rc = prepare(&c2, mistral, &s5, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "no usable records") && has(err.msg, "2 bad"), "%s", err.msg);
    put(src, "", 0);
    rc = prepare(&c2, mistral, &s5, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "no usable records"), "%s", err.msg);
    /* format tokens: data.path itself, no tokenizer needed */
    tp_train_cfg_default(&c2);
    snprintf(c2.data.path, sizeof c2.data.path, "/x/y.tok");
    rc = prepare(&c2, NULL, &s5, &err);
    CHECK_MSG(rc == TP_OK && s5 && !strcmp(s5, "/x/y.tok"), "tokens format");
    free(s5);
    /* no temporary or part files are left in the cache */
    char cmd[700];
    snprintf(cmd, sizeof cmd, "ls -A %s/cache | grep -v -E '^a[.]jsonl[.][0-9a-f]{16}[.](tok|json)$' >/dev/null",
             tmp);
    CHECK_MSG(system(cmd) != 0, "stray files in %s/cache", tmp);
    free(js1);
    free(s1);
    free(s2);
    free(s3);
    free(s4);
}

/* Whole file as bytes (shards hold NULs); *n its length. */
static char *read_bin(const char *path, size_t *n) {
    char *b = NULL;
    tp_err err;
    *n = 0;
    if (!path || tp_read_file(path, 1 << 24, &b, n, &err) != TP_OK) return NULL;
    return b;
}

static void test_json_array(void) {
    char arr[512], jl[512], side[600];
    snprintf(arr, sizeof arr, "%s/recs.json", tmp);
    snprintf(jl, sizeof jl, "%s/recs.jsonl", tmp);
    /* the same five records: as one JSON array (with leading whitespace, elements
     * spread over lines) and as JSONL */
    const char a_txt[] = " \n[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"c\"},\n"
                         "  {\"instruction\": \"d\",\n   \"input\": \"e\", \"output\": \"f\\u0000g\"},\n  [],\n"
                         "  {\"instruction\": \"h\", \"output\": \"i\"}\n]\n";
    const char j_txt[] = "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\"}\n"
                         "{\"instruction\": \"d\", \"input\": \"e\", \"output\": \"f\\u0000g\"}\n[]\n"
                         "{\"instruction\": \"h\", \"output\": \"i\"}\n";
    put(arr, a_txt, sizeof a_txt - 1);
    put(jl, j_txt, sizeof j_txt - 1);
    tp_train_cfg c, cj;
    base_cfg(&c, "alpaca", "mistral");
    snprintf(c.data.cache_dir, sizeof c.data.cache_dir, "%s/cache-arr", tmp);
    cj = c;
    snprintf(c.data.path, sizeof c.data.path, "%s", arr);
    snprintf(cj.data.path, sizeof cj.data.path, "%s", jl);
    char *sa = NULL, *sj = NULL, *s2 = NULL;
    tp_err err = {0};
    int rc = prepare(&c, mistral, &sa, &err);
    CHECK_MSG(rc == TP_OK, "JSON array: %s", err.msg);
    rc = prepare(&cj, mistral, &sj, &err);
    CHECK_MSG(rc == TP_OK, "JSONL: %s", err.msg);
    size_t na, nj;
    char *ba = read_bin(sa, &na), *bj = read_bin(sj, &nj);
    CHECK_MSG(ba && bj && na == nj && na > 48 && !memcmp(ba, bj, na), "JSON array and JSONL shards differ");
    free(ba);
    free(bj);
    if (sa) {
        snprintf(side, sizeof side, "%.*s.json", (int)strlen(sa) - 4, sa);
        char *js = read_all(side);
        CHECK_MSG(has(js, "\"records\":\t5") && has(js, "\"documents\":\t3") && has(js, "\"bad_records\":\t[2, 4]") &&
                      has(js, "\"first_bad\":\t\"record 2: missing field 'output'\"") && !has(js, "bad_lines"),
                  "array sidecar: %s", js ? js : "(none)");
        free(js);
    }
    /* abort mode names the record */
    snprintf(c.data.bad_records, sizeof c.data.bad_records, "abort");
    char need[700];
    snprintf(need, sizeof need, "%s: record 2: missing field 'output' (data.bad_records: abort", arr);
    rc = prepare(&c, mistral, &s2, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, need), "array abort: %s", err.msg);
    /* a broken file: one error with line and column, whatever bad_records says */
    const char broken[] = "[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": }\n]\n";
    put(arr, broken, sizeof broken - 1);
    snprintf(c.data.bad_records, sizeof c.data.bad_records, "skip");
    snprintf(need, sizeof need, "%s:3:", arr);
    rc = prepare(&c, mistral, &s2, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, need) && has(err.msg, "not valid JSON") && has(err.msg, "one JSON array"),
              "broken array: %s", err.msg);
    const char dup[] = "[{\"instruction\": \"a\", \"output\": \"b\", \"output\": \"c\"}]";
    put(arr, dup, sizeof dup - 1);
    rc = prepare(&c, mistral, &s2, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "duplicate"), "duplicate key: %s", err.msg);
    put(arr, "[ ]", 3);
    rc = prepare(&c, mistral, &s2, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "no usable records (0 records"), "empty array: %s", err.msg);
    free(sa);
    free(sj);
}

int main(void) {
    const char *t = getenv("TMPDIR");
    snprintf(tmp, sizeof tmp, "%s/tptt-textdata-XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 2;
    }
    char dir[600];
    tp_err err = {0};
    snprintf(dir, sizeof dir, "%s/tests/fixtures/tokenizers/mistral", source_dir());
    if (tp_tokenizer_load(dir, &mistral, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    snprintf(dir, sizeof dir, "%s/tests/fixtures/tokenizers/qwen3", source_dir());
    if (tp_tokenizer_load(dir, &qwen, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    test_alpaca();
    test_chat();
    test_text();
    test_eos_rule();
    test_bad_records();
    test_txt_units();
    test_cache_and_errors();
    test_json_array();
    tp_tokenizer_free(mistral);
    tp_tokenizer_free(qwen);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    return tp_test_report("test_textdata");
}
