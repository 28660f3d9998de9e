/* byte_tokenizer.c - a tokenizer.json for byte-level models (token id =
 * byte value, 256 ids): Hugging Face's ByteLevel pre-tokenizer without its
 * regex, a BPE model without merges, the ByteLevel decoder. Tiny demo and
 * test models use it so their ids read as text with any HF tokenizer. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "tok/tokenizer.h"
#include "util/fsutil.h"

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to
 * 256, 257, ... in byte order. */
static unsigned byte_char(unsigned b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) return b;
    unsigned n = 0;
    for (unsigned x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) n++;
    return 256 + n;
}

static cJSON *byte_level(void) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", "ByteLevel");
    cJSON_AddBoolToObject(o, "add_prefix_space", 0);
    cJSON_AddBoolToObject(o, "trim_offsets", 0);
    cJSON_AddBoolToObject(o, "use_regex", 0);
    return o;
}

int tp_write_byte_tokenizer(const char *dir, tp_err *err) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddStringToObject(t, "version", "1.0");
    cJSON_AddNullToObject(t, "truncation");
    cJSON_AddNullToObject(t, "padding");
    cJSON_AddArrayToObject(t, "added_tokens");
    cJSON_AddNullToObject(t, "normalizer");
    cJSON_AddItemToObject(t, "pre_tokenizer", byte_level());
    cJSON_AddNullToObject(t, "post_processor");
    cJSON_AddItemToObject(t, "decoder", byte_level());
    cJSON *m = cJSON_AddObjectToObject(t, "model");
    cJSON_AddStringToObject(m, "type", "BPE");
    cJSON_AddNullToObject(m, "dropout");
    cJSON_AddNullToObject(m, "unk_token");
    cJSON_AddNullToObject(m, "continuing_subword_prefix");
    cJSON_AddNullToObject(m, "end_of_word_suffix");
    cJSON_AddBoolToObject(m, "fuse_unk", 0);
    cJSON_AddBoolToObject(m, "byte_fallback", 0);
    cJSON_AddBoolToObject(m, "ignore_merges", 0);
    cJSON *v = cJSON_AddObjectToObject(m, "vocab");
    for (unsigned b = 0; b < 256; b++) {
        unsigned c = byte_char(b);
        char s[4];
        if (c < 0x80) { s[0] = (char)c; s[1] = 0; }
        else { s[0] = (char)(0xC0 | (c >> 6)); s[1] = (char)(0x80 | (c & 0x3F)); s[2] = 0; }
        cJSON_AddNumberToObject(v, s, b);
    }
    cJSON_AddArrayToObject(m, "merges");
    char *text = cJSON_Print(t);
    cJSON_Delete(t);
    if (!text) return tp_fail(err, TP_ENOMEM, "out of memory");
    char *path = tp_path_join(dir, "tokenizer.json", err);
    int rc = path ? tp_write_file_atomic(path, text, strlen(text), err) : TP_ENOMEM;
    free(path);
    free(text);
    return rc;
}
