/* test_mmlu.c - MMLU data, prompts and metrics (src/eval/mmlu.h).
 *
 * - CSV directory layout: quoted fields with commas, doubled quotes and line
 *   breaks, CRLF / LF / CR line ends, a BOM, blank lines, text after a
 *   closing quote; subjects sorted, rows in order with their first line;
 *   rows with 5 or 7 fields, answer "E", NUL bytes, invalid UTF-8 skipped and
 *   counted with file:line warnings (the first 10 only); an empty file; the
 *   errors: unterminated quote (file:line), missing split directory, no
 *   files, no usable rows;
 * - JSONL: letter and index answers, missing subject, every kind of bad line;
 * - shots; prompts for 0, 1 and 2 shots against exact strings;
 * - HELM's em / pem / qem / pqem on hand-made continuations for golds A and B
 *   (values worked out from HELM's definitions) and tp_helm_normalize cases;
 * - the same normaliser and metrics in Python (tests/fixtures/mmlu/
 *   helm_ref.py, written from HELM's definitions) over the hand-made and
 *   2000 random strings, compared with the C results (skipped without
 *   /usr/bin/python3);
 * - mean and standard error. */
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eval/mmlu.h"
#include "test.h"
#include "util/fsutil.h"

static char tmp[256];

static const char *source_dir(void) {
    const char *s = getenv("TPTT_SOURCE_DIR");
    return s ? s : TPTT_SOURCE_DIR_DEFAULT;
}

static int has(const char *hay, const char *needle) { return hay && strstr(hay, needle) != NULL; }

static void write_file(const char *rel, const char *data, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmp, rel);
    char *dir = tp_dirname(path, NULL);
    CHECK(dir && tp_mkdir_p(dir, NULL) == TP_OK);
    free(dir);
    FILE *f = fopen(path, "wb");
    CHECK_MSG(f != NULL, "%s", path);
    if (!f) return;
    CHECK(fwrite(data, 1, n, f) == n);
    fclose(f);
}
static void write_str(const char *rel, const char *s) { write_file(rel, s, strlen(s)); }

static char *path_of(const char *rel) {
    static char p[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", tmp, rel);
    return p[k];
}

/* Run f with stderr captured into a string (caller frees). */
static char *captured;
static int stderr_fd = -1;
static void capture_begin(void) {
    fflush(stderr);
    stderr_fd = dup(2);
    int fd = open(path_of("stderr.txt"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    close(fd);
}
static void capture_end(void) {
    fflush(stderr);
    dup2(stderr_fd, 2);
    close(stderr_fd);
    free(captured);
    captured = NULL;
    size_t n = 0;
    CHECK(tp_read_file(path_of("stderr.txt"), 1 << 20, &captured, &n, NULL) == TP_OK);
}
static int count_lines_in(const char *s) {
    int k = 0;
    for (; s && *s; s++) k += *s == '\n';
    return k;
}

static int item_is(const tp_mmlu_item *it, const char *subject, const char *q, const char *a, const char *b,
                   const char *c, const char *d, int ans, int64_t line) {
    int ok = !strcmp(it->subject, subject) && !strcmp(it->question, q) && !strcmp(it->choices[0], a) &&
             !strcmp(it->choices[1], b) && !strcmp(it->choices[2], c) && !strcmp(it->choices[3], d) &&
             it->answer == ans && it->line == line;
    if (!ok)
        fprintf(stderr, "item: subject '%s' q '%s' [%s|%s|%s|%s] answer %d line %lld\n", it->subject, it->question,
                it->choices[0], it->choices[1], it->choices[2], it->choices[3], it->answer, (long long)it->line);
    return ok;
}

/* ---- CSV ------------------------------------------------------------------- */

static void test_csv(void) {
    /* physics: BOM, CRLF, quoted commas, doubled quotes, a line break inside
     * quotes, a 5-field row (line 5), answer E (line 6), a padded answer,
     * a blank line, no final newline. */
    const char phys[] = "\xEF\xBB\xBF"
                        "\"What is 1,2?\",one,\"two, three\",\"say \"\"hi\"\"\",four,A\r\n"
                        "\"Multi\r\nline\nquestion\",a,b,c,d, B \r\n"
                        "five,fields,only,here,C\r\n"
                        "bad,answer,letter,x,y,E\r\n"
                        "\r\n"
                        "last,w,x,y,z,D";
    write_file("data/dev/physics_dev.csv", phys, sizeof phys - 1);
    /* abstract_algebra: LF, empty fields, a quoted empty field, text after
     * a closing quote, a 7-field row (line 3), lone CR line end. */
    write_str("data/dev/abstract_algebra_dev.csv", "Q1,,\"\",c1,d1,C\n"
                                                   "Q2,\"a\"x,b,c,d,A\n"
                                                   "1,2,3,4,5,6,A\n"
                                                   "Q3,a,b,c,d,D\rQ4,a,b,c,d,B\n");
    write_str("data/dev/empty_dev.csv", "");
    write_str("data/dev/notes.txt", "not,a,csv\n");
    write_str("data/dev/physics_test.csv", "wrong,split,file,x,y,A\n"); /* not read for dev */
    write_str("data/test/physics_test.csv", "wrong,split,file,x,y,A\n");
    /* a NUL byte and invalid UTF-8 */
    const char zoo[] = "ok \xc3\xa9,a,b,c,d,A\nnul\0here,a,b,c,d,A\nbad \xff,a,b,c,d,B\n";
    write_file("data/dev/zoology_dev.csv", zoo, sizeof zoo - 1);

    tp_mmlu_set s = {0};
    int64_t skipped = -1;
    tp_err err = {0};
    capture_begin();
    int rc = tp_mmlu_read_dir(path_of("data"), "dev", &s, &skipped, &err);
    capture_end();
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK_MSG(skipped == 5, "skipped %lld", (long long)skipped);
    CHECK_MSG(s.n == 8, "n %zu", s.n);
    if (s.n == 8) {
        CHECK(item_is(&s.items[0], "abstract_algebra", "Q1", "", "", "c1", "d1", 2, 1));
        CHECK(item_is(&s.items[1], "abstract_algebra", "Q2", "ax", "b", "c", "d", 0, 2));
        CHECK(item_is(&s.items[2], "abstract_algebra", "Q3", "a", "b", "c", "d", 3, 4));
        CHECK(item_is(&s.items[3], "abstract_algebra", "Q4", "a", "b", "c", "d", 1, 5));
        CHECK(item_is(&s.items[4], "physics", "What is 1,2?", "one", "two, three", "say \"hi\"", "four", 0, 1));
        CHECK(item_is(&s.items[5], "physics", "Multi\r\nline\nquestion", "a", "b", "c", "d", 1, 2));
        CHECK(item_is(&s.items[6], "physics", "last", "w", "x", "y", "z", 3, 8));
        CHECK(item_is(&s.items[7], "zoology", "ok \xc3\xa9", "a", "b", "c", "d", 0, 1));
        CHECK(has(s.items[4].file, "/data/dev/physics_dev.csv"));
    }
    CHECK_MSG(has(captured, "abstract_algebra_dev.csv:3: skipped row: 7 fields, expected 6"), "%s", captured);
    CHECK_MSG(has(captured, "physics_dev.csv:5: skipped row: 5 fields, expected 6"), "%s", captured);
    CHECK_MSG(has(captured, "physics_dev.csv:6: skipped row: answer \"E\", expected A, B, C or D"), "%s", captured);
    CHECK_MSG(has(captured, "zoology_dev.csv:2: skipped row: field 1 holds a NUL byte"), "%s", captured);
    CHECK_MSG(has(captured, "zoology_dev.csv:3: skipped row: field 1 is not valid UTF-8"), "%s", captured);
    CHECK(count_lines_in(captured) == 5);

    /* shots */
    int got = -2;
    const tp_mmlu_item **sh = tp_mmlu_shots(&s, "physics", 5, &got);
    CHECK(got == 3 && sh && sh[0] == &s.items[4] && sh[2] == &s.items[6]);
    free(sh);
    sh = tp_mmlu_shots(&s, "abstract_algebra", 2, &got);
    CHECK(got == 2 && sh && sh[0] == &s.items[0] && sh[1] == &s.items[1]);
    free(sh);
    CHECK(tp_mmlu_shots(&s, "astronomy", 5, &got) == NULL && got == 0);
    CHECK(tp_mmlu_shots(&s, "physics", 0, &got) == NULL && got == 0);
    tp_mmlu_set_free(&s);
    CHECK(s.n == 0 && s.items == NULL);

    /* the test split of the same directory */
    rc = tp_mmlu_read_dir(path_of("data"), "test", &s, &skipped, &err);
    CHECK_MSG(rc == TP_OK && s.n == 1 && skipped == 0, "%s", err.msg);
    if (s.n == 1) CHECK(item_is(&s.items[0], "physics", "wrong", "split", "file", "x", "y", 0, 1));
    tp_mmlu_set_free(&s);

    /* errors */
    rc = tp_mmlu_read_dir(path_of("data"), "val", &s, &skipped, &err);
    CHECK_MSG(rc == TP_EIO && has(err.msg, "/data/val: cannot open the MMLU val directory"), "%s", err.msg);
    CHECK(s.n == 0 && s.items == NULL);
    rc = tp_mmlu_read_dir(path_of("nowhere"), "dev", &s, &skipped, &err);
    CHECK_MSG(rc == TP_EIO && has(err.msg, "nowhere/dev") && has(err.msg, "No such file"), "%s", err.msg);
    rc = tp_mmlu_read_dir(path_of("data"), "../data/dev", &s, &skipped, &err);
    CHECK_MSG(rc == TP_EINVAL && has(err.msg, "expected dev, test or val"), "%s", err.msg);

    write_str("unterm/dev/a_dev.csv", "q,a,b,c,d,A\n"
                                      "q2,a,b,c,d,B\n"
                                      "q3,\"open\nand never,closed,b,c,d,C\n");
    capture_begin();
    rc = tp_mmlu_read_dir(path_of("unterm"), "dev", &s, &skipped, &err);
    capture_end();
    CHECK_MSG(rc == TP_EFORMAT && has(err.msg, "unterm/dev/a_dev.csv:3: unterminated quoted field"), "%s",
              err.msg);
    CHECK(s.n == 0 && s.items == NULL);

    write_str("nofiles/dev/readme.txt", "x\n");
    rc = tp_mmlu_read_dir(path_of("nofiles"), "dev", &s, &skipped, &err);
    CHECK_MSG(rc == TP_EFORMAT && has(err.msg, "nofiles/dev: no <subject>_dev.csv files"), "%s", err.msg);

    write_str("allempty/dev/a_dev.csv", "");
    write_str("allempty/dev/b_dev.csv", "\n\r\n");
    rc = tp_mmlu_read_dir(path_of("allempty"), "dev", &s, &skipped, &err);
    CHECK_MSG(rc == TP_EFORMAT && has(err.msg, "allempty/dev: no usable questions in 2 files (0 rows skipped)"),
              "%s", err.msg);

    /* a directory named like a CSV file is an error naming it */
    CHECK(tp_mkdir_p(path_of("dirfile/dev/x_dev.csv"), NULL) == TP_OK);
    rc = tp_mmlu_read_dir(path_of("dirfile"), "dev", &s, &skipped, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "x_dev.csv"), "%s", err.msg);

    /* 12 bad rows: 10 listed, then one "more" line; all counted */
    tp_strbuf b;
    tp_strbuf_init(&b);
    tp_strbuf_puts(&b, "good,a,b,c,d,A\n");
    for (int i = 0; i < 12; i++) tp_strbuf_puts(&b, "bad,a,b,c,d,Z\n");
    write_str("many/test/m_test.csv", b.buf);
    tp_strbuf_free(&b);
    capture_begin();
    rc = tp_mmlu_read_dir(path_of("many"), "test", &s, &skipped, &err);
    capture_end();
    CHECK_MSG(rc == TP_OK && s.n == 1 && skipped == 12, "%s", err.msg);
    CHECK_MSG(count_lines_in(captured) == 11 && has(captured, "m_test.csv:11:") && !has(captured, "m_test.csv:12:") &&
                  has(captured, "more bad rows skipped"),
              "%s", captured);
    tp_mmlu_set_free(&s);
}

/* ---- JSONL ------------------------------------------------------------------- */

static void test_jsonl(void) {
    const char data[] =
        "\xEF\xBB\xBF{\"subject\": \"high_school_physics\", \"question\": \"Q1\", \"choices\": [\"a\", \"b\", \"c\", "
        "\"d\"], \"answer\": \"C\"}\n"
        "{\"question\": \"Q2\", \"choices\": [\"w\", \"x\", \"y\", \"z\"], \"answer\": 3}\r\n"
        "\n"
        "   \n"
        "{\"question\": \"Q3\", \"choices\": [\"a\", \"b\", \"c\"], \"answer\": 0}\n"
        "{\"question\": \"Q4\", \"choices\": [\"a\", \"b\", \"c\", \"d\"], \"answer\": 4}\n"
        "{\"question\": \"Q5\", \"choices\": [\"a\", \"b\", \"c\", \"d\"], \"answer\": \"E\"}\n"
        "{\"question\": \"Q\\u00006\", \"choices\": [\"a\", \"b\", \"c\", \"d\"], \"answer\": 1}\n"
        "{\"subject\": 7, \"question\": \"Q7\", \"choices\": [\"a\", \"b\", \"c\", \"d\"], \"answer\": 1}\n"
        "not json at all\n"
        "[1, 2]\n"
        "{\"question\": \"Q8\", \"choices\": [\"a\", \"b\", 3, \"d\"], \"answer\": 1}\n"
        "{\"subject\": null, \"question\": \"Q9 \\u00e9\", \"choices\": [\"a\", \"b\", \"c\", \"d\"], \"answer\": \" "
        "B\"}\n"
        "{\"question\": \"Q10\", \"choices\": [\"a\", \"b\", \"c\", \"d\"]}";
    write_file("q.jsonl", data, sizeof data - 1);
    tp_mmlu_set s = {0};
    int64_t skipped = -1;
    tp_err err = {0};
    capture_begin();
    int rc = tp_mmlu_read_jsonl(path_of("q.jsonl"), &s, &skipped, &err);
    capture_end();
    CHECK_MSG(rc == TP_OK, "%s", err.msg);
    CHECK_MSG(skipped == 9, "skipped %lld", (long long)skipped);
    CHECK_MSG(s.n == 3, "n %zu", s.n);
    if (s.n == 3) {
        CHECK(item_is(&s.items[0], "high_school_physics", "Q1", "a", "b", "c", "d", 2, 1));
        CHECK(item_is(&s.items[1], "all", "Q2", "w", "x", "y", "z", 3, 2));
        CHECK(item_is(&s.items[2], "all", "Q9 \xc3\xa9", "a", "b", "c", "d", 1, 13));
    }
    CHECK_MSG(has(captured, "q.jsonl:5: skipped record: field 'choices' is not an array of 4 strings"), "%s",
              captured);
    CHECK(has(captured, "q.jsonl:6: skipped record: field 'answer' is not 0..3"));
    CHECK(has(captured, "q.jsonl:7: skipped record: field 'answer'"));
    CHECK(has(captured, "q.jsonl:8: skipped record: field 'question' holds a NUL character"));
    CHECK(has(captured, "q.jsonl:9: skipped record: field 'subject' is not a string"));
    CHECK(has(captured, "q.jsonl:10: skipped record: invalid JSON"));
    CHECK(has(captured, "q.jsonl:11: skipped record: not a JSON object"));
    CHECK(has(captured, "q.jsonl:12: skipped record: field 'choices[2]' is not a string"));
    CHECK(has(captured, "q.jsonl:14: skipped record: field 'answer'"));
    tp_mmlu_set_free(&s);

    write_str("bad.jsonl", "\n{\"x\": 1}\n");
    capture_begin();
    rc = tp_mmlu_read_jsonl(path_of("bad.jsonl"), &s, &skipped, &err);
    capture_end();
    CHECK_MSG(rc == TP_EFORMAT && has(err.msg, "bad.jsonl: no usable MMLU records (1 skipped)"), "%s", err.msg);
    CHECK(s.n == 0 && s.items == NULL && skipped == 1);
    rc = tp_mmlu_read_jsonl(path_of("missing.jsonl"), &s, &skipped, &err);
    CHECK_MSG(rc != TP_OK && has(err.msg, "missing.jsonl"), "%s", err.msg);
}

/* ---- prompts ------------------------------------------------------------------- */

static void test_prompt(void) {
    tp_mmlu_item s1 = {"high_school_physics", "What is g?", {"9.8 m/s^2", "1 m/s", "0", "none"}, 0, NULL, 1};
    tp_mmlu_item s2 = {"high_school_physics", "Unit of force?", {"joule", "newton", "watt", "pascal"}, 1, NULL, 2};
    tp_mmlu_item q = {"high_school_physics", "What is c?", {"3e8 m/s", "1", "2", "3"}, 3, NULL, 1};
    const char *head = "The following are multiple choice questions (with answers) about high school physics.\n\n";
    const char *qtext = "What is c?\nA. 3e8 m/s\nB. 1\nC. 2\nD. 3\nAnswer:";
    const char *sh1 = "What is g?\nA. 9.8 m/s^2\nB. 1 m/s\nC. 0\nD. none\nAnswer: A\n\n";
    const char *sh2 = "Unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer: B\n\n";
    char want[2048];

    char *p = tp_mmlu_prompt(&q, NULL, 0);
    snprintf(want, sizeof want, "%s%s", head, qtext);
    CHECK_MSG(p && !strcmp(p, want), "got [%s]", p ? p : "(null)");
    free(p);

    const tp_mmlu_item *const one[1] = {&s1};
    p = tp_mmlu_prompt(&q, one, 1);
    snprintf(want, sizeof want, "%s%s%s", head, sh1, qtext);
    CHECK_MSG(p && !strcmp(p, want), "got [%s]", p ? p : "(null)");
    free(p);

    const tp_mmlu_item *const two[2] = {&s1, &s2};
    p = tp_mmlu_prompt(&q, two, 2);
    snprintf(want, sizeof want, "%s%s%s%s", head, sh1, sh2, qtext);
    CHECK_MSG(p && !strcmp(p, want), "got [%s]", p ? p : "(null)");
    /* spelled out once in full, as the model sees it */
    CHECK(p && !strcmp(p, "The following are multiple choice questions (with answers) about high school physics.\n"
                          "\n"
                          "What is g?\nA. 9.8 m/s^2\nB. 1 m/s\nC. 0\nD. none\nAnswer: A\n"
                          "\n"
                          "Unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer: B\n"
                          "\n"
                          "What is c?\nA. 3e8 m/s\nB. 1\nC. 2\nD. 3\nAnswer:"));
    free(p);

    CHECK(!strcmp(tp_mmlu_target(0), " A") && !strcmp(tp_mmlu_target(3), " D"));
    CHECK(tp_mmlu_target(4) == NULL && tp_mmlu_target(-1) == NULL);
}

/* ---- metrics ------------------------------------------------------------------- */

typedef struct mcase {
    const char *text;
    int gold;
    int em, pem, qem, pqem;
} mcase;

/* Worked out from HELM's definitions (mmlu.c): pred = strip(text); empty ->
 * 0; normalize("A") = "" (the article quirk), normalize("B") = "b". */
static const mcase mcases[] = {
    {"A", 0, 1, 1, 1, 1},
    {" A", 0, 1, 1, 1, 1},
    {"A.", 0, 0, 1, 1, 1},
    {" a", 0, 0, 0, 1, 1},
    {"(A)", 0, 0, 0, 1, 1},
    {"Answer: A", 0, 0, 1, 0, 1}, /* "Answer..." starts with "A"; normalises to "answer" */
    {"B", 0, 0, 0, 0, 1},         /* pqem: "" is a prefix of "b" */
    {"", 0, 0, 0, 0, 0},
    {" \n\t", 0, 0, 0, 0, 0},
    {"The answer is A", 0, 0, 0, 0, 1},
    {"A\n\nQuestion: next", 0, 0, 1, 0, 1},
    {"A", 1, 0, 0, 0, 0},
    {" A", 1, 0, 0, 0, 0},
    {"A.", 1, 0, 0, 0, 0},
    {" a", 1, 0, 0, 0, 0},
    {"(A)", 1, 0, 0, 0, 0},
    {"Answer: A", 1, 0, 0, 0, 0},
    {"B", 1, 1, 1, 1, 1},
    {"", 1, 0, 0, 0, 0},
    {"The answer is A", 1, 0, 0, 0, 0},
    {" B.", 1, 0, 1, 1, 1},
    {"(b)", 1, 0, 0, 1, 1},
    {"Because", 1, 0, 1, 0, 1},
    {"b c", 1, 0, 0, 0, 1},
    {"The B", 1, 0, 0, 1, 1},
    {"D\n", 3, 1, 1, 1, 1},
};

typedef struct ncase {
    const char *in, *out;
} ncase;
static const ncase ncases[] = {
    {"", ""},
    {"The  Answer, is: A!", "answer is"},
    {"an apple a day", "apple day"},
    {"a.b", "ab"},
    {"t.h.e cat", "cat"},
    {"_a_", ""},
    {"anathema THE then", "anathema then"},
    {"x\x0b" "a\x1c" "y", "x y"},
    {"\xc3\xa9" "a \xe2\x82\xac" "a", "\xc3\xa9" "a \xe2\x82\xac"}, /* é is a letter: "éa" stays; € is not: "€a" -> "€" */
    {"caf\xc3\xa9\xc2\xa0the\xe3\x80\x80" "end", "caf\xc3\xa9 end"}, /* NBSP and U+3000 are whitespace */
    {"x\xe2\x80\x8b" "a", "x\xe2\x80\x8b"},                      /* U+200B is neither space nor letter */
    {"\xff" "a\xff", "\xff \xff"},                                /* invalid bytes kept, not letters */
};

static void test_metrics(void) {
    for (size_t i = 0; i < sizeof mcases / sizeof *mcases; i++) {
        const mcase *c = &mcases[i];
        tp_mmlu_gen g = {-1, -1, -1, -1};
        tp_mmlu_gen_scores(c->text, strlen(c->text), c->gold, &g);
        CHECK_MSG(g.em == c->em && g.pem == c->pem && g.qem == c->qem && g.pqem == c->pqem,
                  "[%s] gold %c: em %d pem %d qem %d pqem %d, expected %d %d %d %d", c->text, 'A' + c->gold, g.em,
                  g.pem, g.qem, g.pqem, c->em, c->pem, c->qem, c->pqem);
    }
    tp_mmlu_gen g;
    tp_mmlu_gen_scores("A", 1, 4, &g);
    CHECK(g.em == 0 && g.pem == 0 && g.qem == 0 && g.pqem == 0);
    tp_mmlu_gen_scores(NULL, 0, 0, &g);
    CHECK(g.em == 0 && g.pqem == 0);
    tp_mmlu_gen_scores("A\0", 2, 0, &g); /* NUL is not whitespace: "A\0" != "A" */
    CHECK(g.em == 0 && g.pem == 1 && g.qem == 0 && g.pqem == 1);

    for (size_t i = 0; i < sizeof ncases / sizeof *ncases; i++) {
        char out[256];
        size_t n = tp_helm_normalize(ncases[i].in, strlen(ncases[i].in), out, sizeof out);
        CHECK_MSG(n == strlen(ncases[i].out) && !strcmp(out, ncases[i].out), "[%s] -> [%s], expected [%s]",
                  ncases[i].in, out, ncases[i].out);
    }
    /* snprintf-like truncation */
    char small[4] = "zzz";
    CHECK(tp_helm_normalize("Hello, World", 12, small, sizeof small) == 11 && !strcmp(small, "hel"));
    CHECK(tp_helm_normalize("Hello", 5, NULL, 0) == 5);
    small[0] = 'z';
    CHECK(tp_helm_normalize("the", 3, small, 1) == 0 && small[0] == 0);
}

/* ---- the Python reference ------------------------------------------------------- */

static uint64_t rng = 88172645463325252ull;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void test_python(void) {
    const char *py = "/usr/bin/python3";
    if (access(py, X_OK)) {
        printf("test_mmlu: %s missing: Python reference comparison skipped\n", py);
        return;
    }
    /* pieces for random strings: articles in every case, letters, punctuation,
     * ASCII and Unicode whitespace, non-ASCII letters, digits, symbols, a
     * combining mark, NUL (no non-ASCII capitals: only ASCII is lower-cased) */
    static const char *const pieces[] = {
        "a", "an", "the", "A", "An", "AN", "The", "THE", "b", "B", "c", "C", "d", "D", "x", "answer", "Answer", "is",
        "1", " ", " ", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", ".", ",", ":", "(", ")", "_",
        "-", "'", "\"", "!", "?", "`", "~", "\\", "\xc3\xa9", "\xcf\x89", "\xd9\xa3", "\xe2\x82\xac",
        "\xe2\x80\x94", "\xc2\xa0", "\xe3\x80\x80", "\xe2\x80\x83", "\xe2\x80\xa8", "\xc2\x85", "\xe2\x80\x8b",
        "\xcc\x81", "\xe4\xb8\x80", "\x01", "\xc2\xb2", "\xe3\x80\x87", "\xc2\xbd",
    };
    const size_t np = sizeof pieces / sizeof *pieces;
    enum { NRAND = 2000 };
    size_t nfixed = sizeof mcases / sizeof *mcases + sizeof ncases / sizeof *ncases - 1; /* \xff case is not UTF-8 */
    size_t total = nfixed + NRAND + 1;
    char **texts = calloc(total, sizeof *texts);
    size_t *lens = calloc(total, sizeof *lens);
    size_t t = 0;
    for (size_t i = 0; i < sizeof mcases / sizeof *mcases; i++) texts[t++] = strdup(mcases[i].text);
    for (size_t i = 0; i + 1 < sizeof ncases / sizeof *ncases; i++) texts[t++] = strdup(ncases[i].in);
    for (size_t i = 0; i < t; i++) lens[i] = strlen(texts[i]);
    for (int r = 0; r < NRAND; r++) {
        tp_strbuf b;
        tp_strbuf_init(&b);
        int k = (int)(next_rand() % 9);
        for (int j = 0; j < k; j++) tp_strbuf_puts(&b, pieces[next_rand() % np]);
        lens[t] = b.len;
        texts[t++] = b.buf ? b.buf : strdup("");
    }
    texts[t] = malloc(3); /* a NUL inside */
    memcpy(texts[t], "A\0b", 3);
    lens[t++] = 3;

    tp_strbuf in;
    tp_strbuf_init(&in);
    for (size_t i = 0; i < t; i++) {
        tp_strbuf_puts(&in, "{\"t\": ");
        tp_strbuf_json_stringn(&in, texts[i], lens[i]);
        tp_strbuf_puts(&in, "}\n");
    }
    write_str("cases.jsonl", in.buf);
    tp_strbuf_free(&in);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s %s/tests/fixtures/mmlu/helm_ref.py < %s > %s", py, source_dir(),
             path_of("cases.jsonl"), path_of("ref.jsonl"));
    int st = system(cmd);
    CHECK_MSG(st == 0, "%s: status %d", cmd, st);
    char *ref = NULL;
    size_t rn = 0;
    CHECK(tp_read_file(path_of("ref.jsonl"), 64 << 20, &ref, &rn, NULL) == TP_OK);
    size_t line = 0, mism = 0;
    for (char *p = ref; p && *p && line < t; line++) {
        char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        json_error_t je;
        json_t *o = json_loadb(p, len, JSON_ALLOW_NUL, &je);
        p = nl ? nl + 1 : p + len;
        CHECK_MSG(o != NULL, "line %zu: %s", line + 1, je.text);
        if (!o) continue;
        json_t *jn = json_object_get(o, "norm"), *js = json_object_get(o, "s");
        char out[1024];
        size_t n = tp_helm_normalize(texts[line], lens[line], out, sizeof out);
        int ok = json_is_string(jn) && n == json_string_length(jn) && !memcmp(out, json_string_value(jn), n);
        for (int g = 0; g < 4; g++) {
            tp_mmlu_gen s;
            tp_mmlu_gen_scores(texts[line], lens[line], g, &s);
            json_t *a = json_array_get(js, (size_t)g);
            int e[4];
            for (int m = 0; m < 4; m++) e[m] = (int)json_integer_value(json_array_get(a, (size_t)m));
            ok = ok && s.em == e[0] && s.pem == e[1] && s.qem == e[2] && s.pqem == e[3];
        }
        if (!ok && mism++ < 5) {
            tp_strbuf q;
            tp_strbuf_init(&q);
            tp_strbuf_json_stringn(&q, texts[line], lens[line]);
            fprintf(stderr, "python disagrees on %s: C norm [%s], Python [%s]\n", q.buf, out,
                    json_is_string(jn) ? json_string_value(jn) : "?");
            tp_strbuf_free(&q);
        }
        json_decref(o);
    }
    CHECK_MSG(line == t, "python answered %zu of %zu", line, t);
    CHECK_MSG(mism == 0, "%zu of %zu strings differ from the Python reference", mism, t);
    printf("test_mmlu: %zu strings agree with the Python reference (HELM normalize_text and metrics)\n", t - mism);
    free(ref);
    for (size_t i = 0; i < t; i++) free(texts[i]);
    free(texts);
    free(lens);
}

/* ---- statistics ---------------------------------------------------------------- */

static void test_stats(void) {
    double m = -1, se = -1;
    const double x[] = {1, 0, 1, 1};
    tp_mmlu_stats(x, 4, &m, &se);
    CHECK(fabs(m - 0.75) < 1e-15 && fabs(se - 0.25) < 1e-15); /* s^2 = 0.75/3 = 0.25, se = sqrt(0.25/4) */
    const double y[] = {2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0};
    tp_mmlu_stats(y, 8, &m, &se);
    CHECK(fabs(m - 5.0) < 1e-15 && fabs(se - sqrt(32.0 / 7.0 / 8.0)) < 1e-15);
    tp_mmlu_stats(x, 1, &m, &se);
    CHECK(m == 1.0 && se == 0.0);
    tp_mmlu_stats(NULL, 0, &m, &se);
    CHECK(m == 0.0 && se == 0.0);
    tp_mmlu_stats(x, 4, NULL, &se);
    CHECK(fabs(se - 0.25) < 1e-15);
}

int main(void) {
    snprintf(tmp, sizeof tmp, "/tmp/tptt_test_mmlu_XXXXXX");
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 2;
    }
    test_csv();
    test_jsonl();
    test_prompt();
    test_metrics();
    test_python();
    test_stats();
    free(captured);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    return tp_test_report("test_mmlu");
}
