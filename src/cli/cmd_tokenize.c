/* cmd_tokenize.c - `tptt tokenize`: JSONL text -> ids (or ids -> text) with a
 * Hugging Face tokenizer.json, one output line per input line (docs/tokenizer.md). */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "tok/tokenizer.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: tptt tokenize --tokenizer DIR [--decode] [--special] [--field NAME] < in.jsonl > out.jsonl\n"
            "       tptt tokenize --tokenizer DIR --info\n"
            "\n"
            "Encode: each input line {\"text\": \"...\"} gives {\"ids\": [...]}. No BOS/EOS are added\n"
            "unless --special (then as tokenizer_config.json says); special-token strings written\n"
            "in the text (e.g. \"<s>\") are still matched, as Hugging Face does.\n"
            "Decode (--decode): each line {\"ids\": [...]} gives {\"text\": \"...\"}; special tokens are\n"
            "dropped unless --special.\n"
            "--tokenizer DIR  a directory with tokenizer.json (and tokenizer_config.json), e.g. a model dir\n"
            "--field NAME     the input field to encode (default \"text\")\n"
            "--info           print the tokenizer's kind, vocabulary size and BOS/EOS, then exit\n"
            "Invalid UTF-8 in the input is replaced by U+FFFD. A line that cannot be processed gives\n"
            "{\"error\": \"line N: ...\"} (the exit status is then 1); empty lines give empty lines.\n");
}

static int emit_error(tp_strbuf *o, long long line, const char *msg) {
    char m[TP_ERR_LEN + 64];
    snprintf(m, sizeof m, "line %lld: %s", line, msg);
    tp_strbuf_puts(o, "{\"error\":");
    tp_strbuf_json_string(o, m);
    tp_strbuf_puts(o, "}");
    return 1;
}

static int do_encode(tp_tokenizer *t, json_t *root, const char *field, int special, long long line, tp_ids *ids,
                     tp_strbuf *o) {
    tp_err err = {0};
    json_t *txt = json_object_get(root, field);
    if (!json_is_string(txt)) {
        char m[256];
        snprintf(m, sizeof m, "expected an object with a string field \"%.100s\"", field);
        return emit_error(o, line, m);
    }
    ids->n = 0;
    if (tp_tokenizer_encode(t, json_string_value(txt), json_string_length(txt), special ? TP_TOK_ADD_SPECIAL : 0, ids,
                            &err))
        return emit_error(o, line, err.msg);
    tp_strbuf_puts(o, "{\"ids\":[");
    for (size_t i = 0; i < ids->n; i++) { /* printf per id would dominate the run time */
        char buf[16], *e = buf + sizeof buf, *p = e;
        uint32_t v = (uint32_t)ids->ids[i];
        do *--p = (char)('0' + v % 10);
        while (v /= 10);
        if (i) *--p = ',';
        tp_strbuf_putn(o, p, (size_t)(e - p));
    }
    tp_strbuf_puts(o, "]}");
    return 0;
}

static int do_decode(tp_tokenizer *t, json_t *root, int special, long long line, tp_ids *ids, tp_strbuf *o) {
    tp_err err = {0};
    json_t *arr = json_object_get(root, "ids");
    if (!json_is_array(arr)) return emit_error(o, line, "expected an object with an \"ids\" array");
    ids->n = 0;
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX) {
            char m[128];
            snprintf(m, sizeof m, "ids[%zu]: expected a non-negative integer token id", i);
            return emit_error(o, line, m);
        }
        if (tp_ids_push(ids, (int32_t)json_integer_value(v), &err)) return emit_error(o, line, err.msg);
    }
    tp_strbuf text;
    tp_strbuf_init(&text);
    int rc = tp_tokenizer_decode(t, ids->ids, ids->n, !special, &text, &err);
    if (!rc) {
        tp_strbuf_puts(o, "{\"text\":");
        tp_strbuf_json_stringn(o, text.buf ? text.buf : "", text.len);
        tp_strbuf_puts(o, "}");
    }
    tp_strbuf_free(&text);
    return rc ? emit_error(o, line, err.msg) : 0;
}

int tp_cmd_tokenize(int argc, char **argv) {
    const char *dir = NULL, *field = "text";
    int decode = 0, special = 0, info = 0;
    static const struct option opts[] = {{"tokenizer", required_argument, 0, 't'}, {"decode", no_argument, 0, 'd'},
                                         {"special", no_argument, 0, 's'},        {"field", required_argument, 0, 'f'},
                                         {"info", no_argument, 0, 'i'},           {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 't': dir = optarg; break;
        case 'd': decode = 1; break;
        case 's': special = 1; break;
        case 'f': field = optarg; break;
        case 'i': info = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!dir || optind != argc) {
        usage(stderr);
        return 2;
    }
    tp_err err = {0};
    tp_tokenizer *t;
    if (tp_tokenizer_load(dir, &t, &err)) return tp_cli_error(err.msg);
    if (info) {
        printf("kind %s\nvocab_size %d\nbos %d%s\neos %d%s\n", tp_tokenizer_kind(t), tp_tokenizer_vocab_size(t),
               tp_tokenizer_bos_id(t), tp_tokenizer_adds_bos(t) ? " (added)" : "", tp_tokenizer_eos_id(t),
               tp_tokenizer_adds_eos(t) ? " (added)" : "");
        tp_tokenizer_free(t);
        return 0;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    long long lineno = 0, errors = 0;
    tp_ids ids = {0};
    tp_strbuf o, clean;
    tp_strbuf_init(&o);
    tp_strbuf_init(&clean);
    while ((n = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) n--;
        o.len = 0;
        if (n > 0) {
            /* JSON structure is ASCII, so replacing invalid UTF-8 first keeps it */
            clean.len = 0;
            tp_utf8_sanitize(line, (size_t)n, &clean);
            json_error_t je;
            json_t *root = clean.oom ? NULL : json_loadb(clean.buf, clean.len, JSON_ALLOW_NUL, &je);
            if (!root) errors += emit_error(&o, lineno, clean.oom ? "out of memory" : je.text);
            else if (!json_is_object(root)) errors += emit_error(&o, lineno, "expected a JSON object");
            else errors += decode ? do_decode(t, root, special, lineno, &ids, &o) : do_encode(t, root, field, special, lineno, &ids, &o);
            json_decref(root);
        }
        tp_strbuf_puts(&o, "\n");
        if (o.oom) {
            fprintf(stderr, "tptt: out of memory at line %lld\n", lineno);
            errors++;
            break;
        }
        if (fwrite(o.buf, 1, o.len, stdout) != o.len) {
            fprintf(stderr, "tptt: cannot write the output\n");
            errors++;
            break;
        }
    }
    free(line);
    tp_ids_free(&ids);
    tp_strbuf_free(&o);
    tp_strbuf_free(&clean);
    tp_tokenizer_free(t);
    if (fflush(stdout)) return tp_cli_error("cannot write the output");
    if (errors) fprintf(stderr, "tptt: %lld of %lld lines could not be processed\n", errors, lineno);
    return errors ? 1 : 0;
}
