/* test_safetensors.c - the C reader and writer (FORMATS.md): round trip,
 * zero-copy views into the map, header padding, the writer's guards, and the
 * reader's rejection of crafted in-memory images. The same rules are tested
 * from outside, on files, by test_bad_input.py. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/safetensors.h"
#include "test.h"
#include "util/fsutil.h"

static char dir[256];

static char *path_of(const char *name) {
    static char buf[512];
    snprintf(buf, sizeof buf, "%s/%s", dir, name);
    return buf;
}

static void test_roundtrip(void) {
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[4] = {0x3f80, 0x4000, 0xbf80, 0x0000};
    uint16_t h[3] = {0x3c00, 0x4000, 0x7bff};
    tp_st_spec s[4] = {{"w.a", TP_F32, 2, {2, 3}}, {"w.b", TP_BF16, 1, {4}}, {"w.h", TP_F16, 3, {1, 3, 1}},
                       {"w.empty", TP_F32, 1, {0}}};
    const void *data[4] = {a, b, h, NULL};
    tp_kv meta[1] = {{"format", "pt"}};
    tp_err err = {0};
    CHECK_MSG(tp_st_write(path_of("rt.safetensors"), s, data, 4, meta, 1, &err) == TP_OK, "%s", err.msg);
    tp_st_file *f;
    CHECK_MSG(tp_st_open(path_of("rt.safetensors"), &f, &err) == TP_OK, "%s", err.msg);
    if (!f) return;
    CHECK(tp_st_count(f) == 4);
    const tp_tensor_view *va = tp_st_find(f, "w.a"), *vb = tp_st_find(f, "w.b"), *vh = tp_st_find(f, "w.h");
    CHECK(va && vb && vh && !tp_st_find(f, "w.c") && tp_st_find(f, "w.empty"));
    if (!va || !vb || !vh) { tp_st_close(f); return; }
    CHECK(va->dtype == TP_F32 && va->ndim == 2 && va->shape[0] == 2 && va->shape[1] == 3 && va->numel == 6);
    CHECK(!memcmp(va->data, a, sizeof a) && !memcmp(vb->data, b, sizeof b) && !memcmp(vh->data, h, sizeof h));
    CHECK(vh->ndim == 3 && vh->shape[1] == 3 && vh->nbytes == 6);
    /* zero copy: views sit at their file offsets inside one mapping, and the
     * data section starts 8-aligned because the header is padded */
    CHECK((const char *)vb->data - (const char *)va->data == (long)(vb->offset - va->offset));
    CHECK(va->offset % 8 == 0 && va->offset == tp_st_at(f, 0)->offset);
    CHECK(tp_st_meta_count(f) == 1 && !strcmp(tp_st_meta_get(f, "format"), "pt") && !tp_st_meta_get(f, "x"));
    CHECK((long long)tp_st_file_size(f) == tp_file_size(path_of("rt.safetensors")));
    tp_st_close(f);
    /* no temporary file is left behind */
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path_of("rt.safetensors"), (long)getpid());
    CHECK(!tp_exists(tmp));
}

static void test_writer_guards(void) {
    tp_err err = {0};
    tp_st_spec s[1] = {{"x", TP_F32, 1, {4}}};
    float v[8] = {0};
    tp_st_writer *w;
    CHECK(tp_st_writer_open(path_of("short.safetensors"), s, 1, NULL, 0, &w, &err) == TP_OK);
    CHECK(tp_st_writer_write(w, v, 8, &err) == TP_OK);
    CHECK(tp_st_writer_close(w, &err) != TP_OK && strstr(err.msg, "only 8 of 16"));
    CHECK(!tp_exists(path_of("short.safetensors")));
    CHECK(tp_st_writer_open(path_of("long.safetensors"), s, 1, NULL, 0, &w, &err) == TP_OK);
    CHECK(tp_st_writer_write(w, v, 32, &err) != TP_OK && strstr(err.msg, "more than"));
    tp_st_writer_abort(w);
    CHECK(!tp_exists(path_of("long.safetensors")));
    tp_st_spec bad[1] = {{"x", TP_F32, 2, {-1, 4}}};
    CHECK(tp_st_writer_open(path_of("bad.safetensors"), bad, 1, NULL, 0, &w, &err) != TP_OK);
    CHECK(tp_st_write("/nonexistent-dir/x.safetensors", s, (const void *const[]){v}, 1, NULL, 0, &err) == TP_EIO);
    CHECK(strstr(err.msg, "/nonexistent-dir/x.safetensors") != NULL);
    /* streaming in pieces that straddle tensors */
    tp_st_spec two[2] = {{"p", TP_F32, 1, {3}}, {"q", TP_F32, 1, {5}}};
    float vals[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    CHECK(tp_st_writer_open(path_of("pieces.safetensors"), two, 2, NULL, 0, &w, &err) == TP_OK);
    CHECK(tp_st_writer_write(w, vals, 5 * 4, &err) == TP_OK);
    CHECK(tp_st_writer_write(w, vals + 5, 3 * 4, &err) == TP_OK);
    CHECK(tp_st_writer_close(w, &err) == TP_OK);
    tp_st_file *f;
    CHECK(tp_st_open(path_of("pieces.safetensors"), &f, &err) == TP_OK);
    if (f) {
        const float *q = tp_st_find(f, "q")->data;
        CHECK(q[0] == 4 && q[4] == 8);
        tp_st_close(f);
    }
}

/* Build an image: 8-byte length, header text, n data bytes. */
static uint8_t *image(const char *hdr, size_t ndata, size_t *size) {
    size_t hl = strlen(hdr);
    *size = 8 + hl + ndata;
    uint8_t *b = calloc(1, *size);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, hdr, hl);
    return b;
}

static void expect_reject(const char *hdr, size_t ndata, const char *needle) {
    size_t size;
    uint8_t *b = image(hdr, ndata, &size);
    tp_st_file *f = NULL;
    tp_err err = {0};
    int rc = tp_st_parse("img.safetensors", b, size, &f, &err);
    CHECK_MSG(rc != TP_OK && !f, "accepted: %s", hdr);
    CHECK_MSG(strstr(err.msg, needle) && strstr(err.msg, "img.safetensors"), "'%s' lacks '%s'", err.msg, needle);
    tp_st_close(f);
    free(b);
}

static void expect_accept(const char *hdr, size_t ndata) {
    size_t size;
    uint8_t *b = image(hdr, ndata, &size);
    tp_st_file *f = NULL;
    tp_err err = {0};
    CHECK_MSG(tp_st_parse("img", b, size, &f, &err) == TP_OK, "%s: %s", hdr, err.msg);
    tp_st_close(f);
    free(b);
}

static void test_parse_rules(void) {
    expect_accept("{}", 0);
    expect_accept("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}  ", 8);
    expect_accept("{\"z\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[4,6]},"
                  "\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 6);
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 7, "file holds 7");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 9, "file holds 9");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "need 12");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "gap");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "overlaps");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "duplicate");
    expect_reject("{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown dtype");
    expect_reject("{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, "not supported");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4,
                  "overflow");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape[0]");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "shape[0]");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "before begin");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "data_offsets");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "data_offsets");
    expect_reject("{\"a\":[1,2]}", 0, "not a JSON object");
    expect_reject("[]", 0, "not a JSON object");
    expect_reject("{\"a\":", 0, "not valid JSON");
    expect_reject("{} x", 0, "trailing");
    expect_reject("{\"\xff\":1}", 0, "UTF-8");
    expect_reject("{\"__metadata__\":{\"k\":1}}", 0, "metadata");
    expect_reject("{\"__metadata__\":[]}", 0, "__metadata__");
    /* length field problems */
    uint8_t small[4] = {0};
    tp_st_file *f = NULL;
    tp_err err = {0};
    CHECK(tp_st_parse("img", small, 4, &f, &err) != TP_OK && strstr(err.msg, "shorter"));
    uint8_t big[16] = {0x01, 0xe1, 0xf5, 0x05}; /* 100000001 */
    CHECK(tp_st_parse("img", big, 16, &f, &err) != TP_OK && strstr(err.msg, "100 MB"));
    uint8_t past[16] = {9};
    CHECK(tp_st_parse("img", past, 16, &f, &err) != TP_OK && strstr(err.msg, "past the end"));
    uint8_t huge[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    CHECK(tp_st_parse("img", huge, 16, &f, &err) != TP_OK && strstr(err.msg, "100 MB"));
}

static void test_open_errors(void) {
    tp_st_file *f;
    tp_err err = {0};
    CHECK(tp_st_open(path_of("missing.safetensors"), &f, &err) == TP_EIO && strstr(err.msg, "missing.safetensors"));
    CHECK(tp_st_open(dir, &f, &err) == TP_EIO && strstr(err.msg, "not a regular file"));
    tp_write_file_atomic(path_of("empty.safetensors"), "", 0, &err);
    CHECK(tp_st_open(path_of("empty.safetensors"), &f, &err) == TP_EFORMAT && strstr(err.msg, "shorter"));
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/tptt-test-st-XXXXXX");
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    test_roundtrip();
    test_writer_guards();
    test_parse_rules();
    test_open_errors();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
    return tp_test_report("test_safetensors");
}
