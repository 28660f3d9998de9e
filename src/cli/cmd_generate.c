/* cmd_generate.c - `tptt generate`: run a model or a trained Titan on
 * prompts (docs/generate.md). Prompts of an --input file are shared over the
 * MPI ranks (prompt i on rank i % world, with its own RNG stream, so the
 * output does not depend on the world size) and printed in input order. */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "dist/dist.h"
#include "infer/cache.h"
#include "infer/generate.h"
#include "infer/load.h"
#include "io/safetensors.h"
#include "tok/tokenizer.h"
#include "util/fsutil.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: [mpirun -np N] tptt generate (--checkpoint CKPT_OR_RUN_DIR [--model BASE_DIR] | --model DIR)\n"
            "                      (--prompt TEXT | --prompt-ids 1,2,3 | --input FILE.jsonl) [options]\n"
            "\n"
            "Prompts: --prompt TEXT (tokenized with the model's tokenizer.json, BOS as it says),\n"
            "  --prompt-ids 1,2,3, or --input FILE.jsonl with {\"prompt\": TEXT} or {\"ids\": [...]} per line.\n"
            "Output: one JSON line per prompt on stdout, in input order:\n"
            "  {\"ids\": [new ids], \"text\": ..., \"prompt_tokens\": n, \"new_tokens\": m, \"stop\": \"eos|length|stop_string\"}\n"
            "Options:\n"
            "  --max-new-tokens N      (default 64)\n"
            "  --temperature T         0 = greedy (default)\n"
            "  --top-k K  --top-p P  --repetition-penalty R  --seed S (same seed, same output)\n"
            "  --stop STRING           stop when the text contains STRING (repeatable; the text is cut before it)\n"
            "  --ignore-eos            do not stop at EOS (generation_config.json / tokenizer)\n"
            "  --stream                print the text on stderr as it is produced\n"
            "  --tokenizer DIR         tokenizer.json location (default: the base model directory)\n"
            "  --logits-out FILE.safetensors   logits of every generated position (one rank only):\n"
            "                          tensor \"logits.<i>\" [new_tokens, vocab] per prompt i\n"
            "  --prefill-block N       tokens per prefill block (default 512)\n"
            "  --matmul auto|f32|bf16  products with frozen weights (docs/decoder.md); auto: bf16 (oneDNN,\n"
            "                          activations rounded to bf16) for bf16 models on CPUs with AVX512_BF16\n");
}

typedef struct prompt {
    int32_t *ids;
    int64_t n;
} prompt;

typedef struct gen_state {
    tp_tokenizer *tok;
    const char *const *stops;
    int nstops;
    int stream;
    tp_ids out;            /* generated so far */
    size_t streamed;       /* bytes of text already printed */
    float *logits;         /* --logits-out rows */
    int64_t nlog, caplog, V;
    int want_logits;
    size_t cut;            /* text length up to the stop string */
    int cut_set;
} gen_state;

static int parse_id_list(const char *s, int64_t V, prompt *p, tp_err *err) {
    tp_ids v = {0};
    const char *q = s;
    while (*q) {
        char *end;
        long long x = strtoll(q, &end, 10);
        if (end == q || (*end && *end != ','))
            return tp_ids_free(&v), tp_fail(err, TP_EINVAL, "--prompt-ids: expected comma-separated integers, got '%s'", s);
        if (x < 0 || x >= V)
            return tp_ids_free(&v), tp_fail(err, TP_EINVAL, "--prompt-ids: id %lld at index %zu is outside the vocabulary [0, %lld)",
                                            x, v.n, (long long)V);
        if (tp_ids_push(&v, (int32_t)x, err)) return tp_ids_free(&v), TP_ENOMEM;
        q = *end ? end + 1 : end;
    }
    if (!v.n) return tp_fail(err, TP_EINVAL, "--prompt-ids: empty list");
    p->ids = v.ids;
    p->n = (int64_t)v.n;
    return TP_OK;
}

static int encode(tp_tokenizer *tok, const char *what, const char *text, size_t n, prompt *p, tp_err *err) {
    if (!tok) return tp_fail(err, TP_EINVAL, "%s: text prompts need a tokenizer.json (none beside the model; use --tokenizer DIR or ids)", what);
    tp_ids v = {0};
    int rc = tp_tokenizer_encode(tok, text, n, TP_TOK_ADD_SPECIAL, &v, err);
    if (rc == TP_OK && v.n == 0) rc = tp_fail(err, TP_EINVAL, "%s: the prompt encodes to no tokens", what);
    if (rc) return tp_ids_free(&v), rc;
    p->ids = v.ids;
    p->n = (int64_t)v.n;
    return TP_OK;
}

/* {"prompt": TEXT} or {"ids": [...]} per line; blank lines skipped */
static int read_input(const char *path, tp_tokenizer *tok, int64_t V, prompt **out, int64_t *np, tp_err *err) {
    char *text = NULL;
    size_t len = 0;
    int rc = tp_read_file(path, (size_t)1 << 30, &text, &len, err);
    if (rc) return rc;
    prompt *ps = NULL;
    int64_t n = 0, cap = 0, line = 0;
    for (size_t pos = 0; pos < len && rc == TP_OK;) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len, ll = end - pos;
        line++;
        const char *s = text + pos;
        pos = end + 1;
        size_t k = 0;
        while (k < ll && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r')) k++;
        if (k == ll) continue;
        json_error_t je;
        json_t *j = json_loadb(s, ll, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &je);
        if (!j || !json_is_object(j)) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%lld: expected a JSON object {\"prompt\": ...} or {\"ids\": [...]}%s%s",
                         path, (long long)line, j ? "" : ": ", j ? "" : je.text);
            json_decref(j);
            break;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            prompt *np2 = realloc(ps, (size_t)cap * sizeof *ps);
            if (!np2) { json_decref(j); rc = tp_fail(err, TP_ENOMEM, "out of memory"); break; }
            ps = np2;
        }
        prompt *p = &ps[n];
        memset(p, 0, sizeof *p);
        json_t *jp = json_object_get(j, "prompt"), *ji = json_object_get(j, "ids");
        char what[64];
        snprintf(what, sizeof what, "line %lld", (long long)line);
        if ((jp != NULL) == (ji != NULL)) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%lld: expected exactly one of \"prompt\" (a string) or \"ids\" (a list)",
                         path, (long long)line);
        } else if (jp) {
            if (!json_is_string(jp)) rc = tp_fail(err, TP_EFORMAT, "%s:%lld: \"prompt\": expected a string", path, (long long)line);
            else if ((rc = encode(tok, what, json_string_value(jp), json_string_length(jp), p, err))) tp_err_prefix(err, "%s", path);
        } else if (!json_is_array(ji) || json_array_size(ji) == 0) {
            rc = tp_fail(err, TP_EFORMAT, "%s:%lld: \"ids\": expected a non-empty list of token ids", path, (long long)line);
        } else {
            size_t m = json_array_size(ji);
            p->ids = tp_malloc(m * sizeof(int32_t), err);
            if (!p->ids) rc = TP_ENOMEM;
            for (size_t i = 0; rc == TP_OK && i < m; i++) {
                json_t *x = json_array_get(ji, i);
                if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) >= V)
                    rc = tp_fail(err, TP_EFORMAT, "%s:%lld: \"ids\"[%zu]: expected a token id in [0, %lld)", path,
                                 (long long)line, i, (long long)V);
                else p->ids[i] = (int32_t)json_integer_value(x);
            }
            p->n = (int64_t)m;
        }
        json_decref(j);
        if (rc) free(p->ids);
        else n++;
    }
    free(text);
    if (rc == TP_OK && n == 0) rc = tp_fail(err, TP_EFORMAT, "%s: no prompts (empty file)", path);
    if (rc) {
        for (int64_t i = 0; i < n; i++) free(ps[i].ids);
        free(ps);
        return rc;
    }
    *out = ps;
    *np = n;
    return TP_OK;
}

/* generation_config.json eos_token_id (an id or a list), else the
 * tokenizer's, else config.json's */
static int eos_ids(const char *base, const tp_tokenizer *tok, const tp_model_config *mc, int32_t *eos, int *neos,
                   tp_err *err) {
    *neos = 0;
    char *p = tp_path_join(base, "generation_config.json", err);
    if (!p) return TP_ENOMEM;
    if (tp_exists(p)) {
        char *text = NULL;
        size_t len = 0;
        int rc = tp_read_file(p, 1u << 20, &text, &len, err);
        if (rc) { free(p); return rc; }
        json_error_t je;
        json_t *j = json_loadb(text, len, 0, &je), *e = j ? json_object_get(j, "eos_token_id") : NULL;
        free(text);
        if (!j) rc = tp_fail(err, TP_EFORMAT, "%s: not valid JSON (%s)", p, je.text);
        if (e && json_is_integer(e)) eos[(*neos)++] = (int32_t)json_integer_value(e);
        else if (e && json_is_array(e)) {
            for (size_t i = 0; i < json_array_size(e) && *neos < 16; i++) {
                json_t *x = json_array_get(e, i);
                if (!json_is_integer(x)) { rc = tp_fail(err, TP_EFORMAT, "%s: eos_token_id[%zu]: expected an integer", p, i); break; }
                eos[(*neos)++] = (int32_t)json_integer_value(x);
            }
        } else if (e && !json_is_null(e)) {
            rc = tp_fail(err, TP_EFORMAT, "%s: eos_token_id: expected an integer or a list of integers", p);
        }
        json_decref(j);
        if (rc) { free(p); return rc; }
    }
    free(p);
    if (!*neos && tok && tp_tokenizer_eos_id(tok) >= 0) eos[(*neos)++] = tp_tokenizer_eos_id(tok);
    if (!*neos && mc->eos_id >= 0) eos[(*neos)++] = (int32_t)mc->eos_id;
    return TP_OK;
}

static int on_token(void *ctx, int32_t id, const float *logits, tp_err *err) {
    gen_state *g = ctx;
    if (tp_ids_push(&g->out, id, err)) return TP_ENOMEM;
    if (g->want_logits) {
        if (g->nlog == g->caplog) {
            int64_t cap = g->caplog ? 2 * g->caplog : 64;
            float *p = realloc(g->logits, (size_t)(cap * g->V) * sizeof(float));
            if (!p) return tp_fail(err, TP_ENOMEM, "out of memory keeping logits for --logits-out");
            g->logits = p;
            g->caplog = cap;
        }
        memcpy(g->logits + g->nlog * g->V, logits, (size_t)g->V * sizeof(float));
        g->nlog++;
    }
    if (!g->tok || (!g->stream && !g->nstops)) return 0;
    tp_strbuf t;
    tp_strbuf_init(&t);
    int rc = tp_tokenizer_decode(g->tok, g->out.ids, g->out.n, 1, &t, err);
    if (rc) { tp_strbuf_free(&t); return rc; }
    int stop = 0;
    for (int i = 0; i < g->nstops; i++) {
        const char *hit = t.len ? strstr(t.buf, g->stops[i]) : NULL;
        if (hit && (!g->cut_set || (size_t)(hit - t.buf) < g->cut)) {
            g->cut = (size_t)(hit - t.buf);
            g->cut_set = 1;
            stop = 1;
        }
    }
    if (g->stream) { /* hold back a trailing U+FFFD: the rest of a character may follow */
        size_t upto = stop ? g->cut : t.len;
        while (!stop && upto >= 3 && !memcmp(t.buf + upto - 3, "\xEF\xBF\xBD", 3)) upto -= 3;
        if (upto > g->streamed) {
            fwrite(t.buf + g->streamed, 1, upto - g->streamed, stderr);
            fflush(stderr);
            g->streamed = upto;
        }
    }
    tp_strbuf_free(&t);
    return stop;
}

static const char *stop_name(int s) { return s == TP_STOP_EOS ? "eos" : s == TP_STOP_STRING ? "stop_string" : "length"; }

/* the JSON line of one result */
static int result_line(gen_state *g, const prompt *p, const tp_gen_result *r, tp_strbuf *out, tp_err *err) {
    tp_strbuf_puts(out, "{\"ids\": [");
    for (int64_t i = 0; i < r->n; i++) tp_strbuf_printf(out, "%s%d", i ? ", " : "", r->ids[i]);
    tp_strbuf_puts(out, "], \"text\": ");
    if (g->tok) {
        tp_strbuf t;
        tp_strbuf_init(&t);
        int rc = tp_tokenizer_decode(g->tok, r->ids, (size_t)r->n, 1, &t, err);
        if (rc) { tp_strbuf_free(&t); return rc; }
        size_t n = g->cut_set && g->cut < t.len ? g->cut : t.len;
        tp_strbuf_json_stringn(out, t.buf ? t.buf : "", n);
        tp_strbuf_free(&t);
    } else {
        tp_strbuf_puts(out, "null");
    }
    tp_strbuf_printf(out, ", \"prompt_tokens\": %lld, \"new_tokens\": %lld, \"stop\": \"%s\"}\n", (long long)p->n,
                     (long long)r->n, stop_name(r->stop));
    return TP_OK;
}

int tp_cmd_generate(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},         {"checkpoint", required_argument, 0, 'c'},
        {"prompt", required_argument, 0, 'p'},        {"prompt-ids", required_argument, 0, 'i'},
        {"input", required_argument, 0, 'f'},         {"max-new-tokens", required_argument, 0, 'n'},
        {"temperature", required_argument, 0, 't'},   {"top-k", required_argument, 0, 'k'},
        {"top-p", required_argument, 0, 'P'},         {"repetition-penalty", required_argument, 0, 'r'},
        {"seed", required_argument, 0, 's'},          {"stop", required_argument, 0, 'S'},
        {"ignore-eos", no_argument, 0, 'E'},          {"stream", no_argument, 0, 'w'},
        {"tokenizer", required_argument, 0, 'T'},     {"logits-out", required_argument, 0, 'L'},
        {"prefill-block", required_argument, 0, 'B'}, {"matmul", required_argument, 0, 'M'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    tp_load_opts lo = {0};
    const char *prompt_text = NULL, *prompt_ids = NULL, *input = NULL, *tok_dir = NULL, *logits_out = NULL;
    const char *stops[64];
    int nstops = 0, ignore_eos = 0, stream = 0;
    long long max_new = 64, seed = 0, top_k = 0, block = 512;
    tp_sampler_opts so;
    tp_sampler_opts_default(&so);
    int ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        char *end = NULL;
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'm': lo.model = optarg; break;
        case 'c': lo.checkpoint = optarg; break;
        case 'p': prompt_text = optarg; break;
        case 'i': prompt_ids = optarg; break;
        case 'f': input = optarg; break;
        case 'T': tok_dir = optarg; break;
        case 'L': logits_out = optarg; break;
        case 'E': ignore_eos = 1; break;
        case 'M':
            if (!strcmp(optarg, "auto")) lo.matmul = TP_LOAD_MATMUL_AUTO;
            else if (!strcmp(optarg, "f32")) lo.matmul = TP_LOAD_MATMUL_F32;
            else if (!strcmp(optarg, "bf16")) lo.matmul = TP_LOAD_MATMUL_BF16;
            else { fprintf(stderr, "tptt: generate: --matmul: expected auto, f32 or bf16, got '%s'\n", optarg); return 2; }
            break;
        case 'w': stream = 1; break;
        case 'S':
            if (nstops == 64 || !optarg[0]) { fprintf(stderr, "tptt: generate: --stop: at most 64 non-empty strings\n"); return 2; }
            stops[nstops++] = optarg;
            break;
        case 'n':
            if (tp_cli_int(optarg, 1, 1 << 24, &max_new)) { fprintf(stderr, "tptt: generate: --max-new-tokens: expected an integer in [1, 16777216], got '%s'\n", optarg); return 2; }
            break;
        case 'B':
            if (tp_cli_int(optarg, 1, 1 << 16, &block)) { fprintf(stderr, "tptt: generate: --prefill-block: expected an integer in [1, 65536], got '%s'\n", optarg); return 2; }
            break;
        case 's':
            if (tp_cli_int(optarg, 0, INT64_MAX, &seed)) { fprintf(stderr, "tptt: generate: --seed: expected a non-negative integer, got '%s'\n", optarg); return 2; }
            break;
        case 'k':
            if (tp_cli_int(optarg, 0, INT32_MAX, &top_k)) { fprintf(stderr, "tptt: generate: --top-k: expected a non-negative integer, got '%s'\n", optarg); return 2; }
            break;
        case 't': case 'P': case 'r': {
            double x = strtod(optarg, &end);
            int ok = end != optarg && !*end && x == x;
            if (ch == 't' && ok && x >= 0 && x <= 1e6) so.temperature = x;
            else if (ch == 'P' && ok && x > 0 && x <= 1) so.top_p = x;
            else if (ch == 'r' && ok && x > 0 && x <= 1e6) so.repetition_penalty = x;
            else {
                fprintf(stderr, "tptt: generate: %s: expected %s, got '%s'\n",
                        ch == 't' ? "--temperature" : ch == 'P' ? "--top-p" : "--repetition-penalty",
                        ch == 't' ? "a number >= 0" : ch == 'P' ? "a number in (0, 1]" : "a positive number", optarg);
                return 2;
            }
            break;
        }
        default:
            fprintf(stderr, "tptt: generate: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
    }
    so.top_k = top_k;
    if (optind != argc) { fprintf(stderr, "tptt: generate: unexpected argument '%s' (see --help)\n", argv[optind]); return 2; }
    if (!lo.model && !lo.checkpoint) { fprintf(stderr, "tptt: generate: give --checkpoint DIR or --model DIR\n"); usage(stderr); return 2; }
    if (!!prompt_text + !!prompt_ids + !!input != 1) { fprintf(stderr, "tptt: generate: give exactly one of --prompt, --prompt-ids, --input\n"); return 2; }

    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    tp_titan *ti = NULL;
    tp_tokenizer *tok = NULL;
    prompt *ps = NULL;
    int64_t np = 0;
    int32_t eos[16];
    int neos = 0;
    int rc = tp_titan_load(&lo, &ti, &err);
    if (rc == TP_OK && logits_out && d.world > 1)
        rc = tp_fail(&err, TP_EINVAL, "--logits-out works with one rank (run without mpirun)");
    int64_t V = ti ? ti->hf->cfg.vocab : 0;
    if (rc == TP_OK) { /* the tokenizer is optional for id prompts */
        const char *td = tok_dir ? tok_dir : ti->base_dir;
        char *tj = tp_path_join(td, "tokenizer.json", &err);
        if (!tj) rc = TP_ENOMEM;
        else if (tok_dir || tp_exists(tj)) rc = tp_tokenizer_load(td, &tok, &err);
        free(tj);
        if (rc == TP_OK && tok && tp_tokenizer_vocab_size(tok) > V)
            fprintf(stderr, "tptt: warning: the tokenizer has %d ids, the model's vocabulary %lld\n",
                    tp_tokenizer_vocab_size(tok), (long long)V);
    }
    if (rc == TP_OK && !ignore_eos) rc = eos_ids(ti->base_dir, tok, &ti->hf->cfg, eos, &neos, &err);
    if (rc == TP_OK) {
        if (input) rc = read_input(input, tok, V, &ps, &np, &err);
        else {
            ps = tp_calloc(1, sizeof *ps, &err);
            rc = ps ? TP_OK : TP_ENOMEM;
            if (rc == TP_OK) rc = prompt_ids ? parse_id_list(prompt_ids, V, ps, &err) : encode(tok, "--prompt", prompt_text, strlen(prompt_text), ps, &err);
            if (rc == TP_OK) np = 1;
        }
    }
    rc = tp_dist_agree(&d, rc, &err);
    tp_infer_cache *cache = NULL;
    if (rc == TP_OK) rc = tp_cache_create(ti->dec, block, &cache, &err);
    if (rc == TP_OK && d.rank == 0) fprintf(stderr, "tptt: generate: %s; %lld prompt%s on %d rank%s\n", ti->desc,
                                            (long long)np, np == 1 ? "" : "s", d.world, d.world == 1 ? "" : "s");
    const tp_model_config *mc = ti ? &ti->hf->cfg : NULL;
    tp_strbuf lines;
    tp_strbuf_init(&lines);
    float **all_logits = logits_out && np ? tp_calloc((size_t)np, sizeof *all_logits, &err) : NULL;
    int64_t *nlog = logits_out && np ? tp_calloc((size_t)np, sizeof *nlog, &err) : NULL;
    if (rc == TP_OK && logits_out && (!all_logits || !nlog)) rc = TP_ENOMEM;
    for (int64_t i = d.rank; rc == TP_OK && i < np; i += d.world) {
        if (cache && tp_cache_has_kv(cache) && mc->sliding_window <= 0 && mc->max_pos > 0 && ps[i].n + max_new > mc->max_pos)
            fprintf(stderr, "tptt: warning: prompt %lld: %lld prompt + %lld new tokens exceed the model's "
                    "max_position_embeddings %lld (config.json); quality may degrade\n", (long long)i,
                    (long long)ps[i].n, max_new, (long long)mc->max_pos);
        gen_state g = {tok, stops, nstops, stream && d.world == 1, {0}, 0, NULL, 0, 0, V, logits_out != NULL, 0, 0};
        tp_gen_opts go = {so, max_new, eos, neos, on_token, &g};
        tp_rng rng;
        tp_rng_seed(&rng, (uint64_t)seed, (uint64_t)i);
        tp_gen_result res;
        rc = tp_generate(cache, ps[i].ids, ps[i].n, &go, &rng, &res, &err);
        if (rc == TP_OK && g.stream && tok) fputc('\n', stderr);
        if (rc == TP_OK) {
            tp_strbuf one;
            tp_strbuf_init(&one);
            rc = result_line(&g, &ps[i], &res, &one, &err);
            if (rc == TP_OK && d.world == 1) { fputs(one.buf, stdout); fflush(stdout); }
            else if (rc == TP_OK) tp_strbuf_puts(&lines, one.buf);
            tp_strbuf_free(&one);
        }
        if (rc == TP_OK && logits_out) { all_logits[i] = g.logits; nlog[i] = g.nlog; g.logits = NULL; }
        free(g.logits);
        tp_ids_free(&g.out);
        free(res.ids);
    }
    if (rc) tp_err_prefix(&err, "generate");
    rc = tp_dist_agree(&d, rc, &err);
    if (rc == TP_OK && d.world > 1) { /* rank r holds prompts r, r + world, ...: interleave */
        char *all = NULL;
        size_t *lens = tp_calloc((size_t)d.world, sizeof *lens, &err);
        rc = lens ? tp_dist_gather_text(&d, lines.buf ? lines.buf : "", lines.len, &all, lens, &err) : TP_ENOMEM;
        if (rc == TP_OK && d.rank == 0) {
            const char **cur = tp_calloc((size_t)d.world, sizeof *cur, &err);
            if (!cur) rc = TP_ENOMEM;
            size_t off = 0;
            for (int r = 0; cur && r < d.world; r++) { cur[r] = all + off; off += lens[r]; }
            for (int64_t i = 0; cur && i < np; i++) {
                const char *s = cur[i % d.world], *nl = strchr(s, '\n');
                fwrite(s, 1, (size_t)(nl - s) + 1, stdout);
                cur[i % d.world] = nl + 1;
            }
            free(cur);
            fflush(stdout);
        }
        free(all);
        free(lens);
    }
    if (rc == TP_OK && logits_out) {
        tp_st_spec *specs = tp_calloc((size_t)np, sizeof *specs, &err);
        const void **data = tp_calloc((size_t)np, sizeof *data, &err);
        char (*names)[32] = tp_calloc((size_t)np, sizeof *names, &err);
        rc = specs && data && names ? TP_OK : TP_ENOMEM;
        for (int64_t i = 0; rc == TP_OK && i < np; i++) {
            snprintf(names[i], sizeof names[i], "logits.%lld", (long long)i);
            specs[i] = (tp_st_spec){names[i], TP_F32, 2, {nlog[i], V}};
            data[i] = all_logits[i];
        }
        tp_kv meta[1] = {{"format", "pt"}};
        if (rc == TP_OK) rc = tp_st_write(logits_out, specs, data, (size_t)np, meta, 1, &err);
        free(specs);
        free(data);
        free(names);
    }
    tp_dist_report_failure(&d, rc, &err);
    for (int64_t i = 0; all_logits && i < np; i++) free(all_logits[i]);
    free(all_logits);
    free(nlog);
    tp_strbuf_free(&lines);
    for (int64_t i = 0; ps && i < np; i++) free(ps[i].ids);
    free(ps);
    tp_cache_destroy(cache);
    if (tok) tp_tokenizer_free(tok);
    tp_titan_free(ti);
    tp_dist_finalize();
    return rc == TP_OK ? 0 : 1;
}
