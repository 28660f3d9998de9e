/* cmd_eval_passkey.c - `tptt eval passkey`: long-context retrieval accuracy
 * per (context length, depth) (src/eval/passkey.h, docs/eval.md). */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/eval_common.h"
#include "eval/passkey.h"
#include "infer/cache.h"
#include "infer/generate.h"
#include "util/fsutil.h"
#include "util/gnuplot.h"
#include "util/rng.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: [mpirun -np N] tptt eval passkey (--checkpoint CK | --model DIR) [options]\n"
            "  --max-context N         lengths 1024, 2048, ... up to N tokens (default 8192)\n"
            "  --lengths L1,L2,...     explicit context lengths instead\n"
            "  --depths D1,D2,...      needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)\n"
            "  --trials K              keys per (length, depth) (default 3)\n"
            "  --seed S  --tokenizer DIR  --prefill-block N (default 512)\n"
            "  --png FILE.png          the accuracy per (length, depth) as a heat map (gnuplot)\n"
            "  --report FILE.json  --matmul auto|f32|bf16\n");
}

static int parse_list(const char *s, double *out, int max, int *n, double lo, double hi) {
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        double x = strtod(p, &end);
        if (end == p || !(x >= lo && x <= hi) || *n == max || (*end && *end != ',')) return -1;
        out[(*n)++] = x;
        p = *end ? end + 1 : end;
    }
    return *n ? 0 : -1;
}

/* accuracy per (length, depth) as an image: cells in index space, tics
 * labelled with the numbers themselves (only numbers we format reach gnuplot) */
static int heat_map(const char *out, const double *lengths, int nl, const double *depths, int nd, const int64_t *ok,
                    long long trials, tp_err *err) {
    tp_strbuf s;
    tp_strbuf_init(&s);
    tp_strbuf_puts(&s, "set terminal png size 900,560 noenhanced\nset output\n"
                       "set title 'passkey retrieval accuracy'\nset xlabel 'depth of the key in the context'\n"
                       "set ylabel 'context length (tokens)'\nset cbrange [0:1]\nset cblabel 'accuracy'\n"
                       "set palette defined (0 '#b2182b', 0.5 '#f7f7f7', 1 '#2166ac')\n"
                       "set xrange [-0.5:");
    tp_strbuf_printf(&s, "%d.5]\nset yrange [-0.5:%d.5]\nset xtics (", nd - 1, nl - 1);
    for (int k = 0; k < nd; k++) tp_strbuf_printf(&s, "%s'%.2f' %d", k ? ", " : "", depths[k], k);
    tp_strbuf_puts(&s, ")\nset ytics (");
    for (int l = 0; l < nl; l++) tp_strbuf_printf(&s, "%s'%lld' %d", l ? ", " : "", (long long)lengths[l], l);
    tp_strbuf_puts(&s, ")\n$acc << EOD\n");
    for (int l = 0; l < nl; l++)
        for (int k = 0; k < nd; k++) {
            int64_t c = 0;
            for (long long t = 0; t < trials; t++) c += ok[((int64_t)l * nd + k) * trials + t];
            tp_strbuf_printf(&s, "%d %d %.6f\n", k, l, (double)c / (double)trials);
        }
    tp_strbuf_puts(&s, "EOD\nplot $acc using 1:2:3 with image notitle, $acc using 1:2:(sprintf('%.2f', $3)) "
                       "with labels notitle\n");
    int rc = s.oom ? tp_fail(err, TP_ENOMEM, "out of memory") : tp_gnuplot_png(s.buf, s.len, out, err);
    tp_strbuf_free(&s);
    return rc;
}

int tp_cmd_eval_passkey(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},     {"checkpoint", required_argument, 0, 'c'},
        {"report", required_argument, 0, 'R'},    {"matmul", required_argument, 0, 'M'},
        {"max-context", required_argument, 0, 'x'}, {"lengths", required_argument, 0, 'L'},
        {"depths", required_argument, 0, 'D'},    {"trials", required_argument, 0, 't'},
        {"seed", required_argument, 0, 's'},      {"tokenizer", required_argument, 0, 'k'},
        {"prefill-block", required_argument, 0, 'B'}, {"png", required_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    tp_eval_common com = {0};
    double lengths[64], depths[64] = {0, 0.25, 0.5, 0.75, 1};
    int nl = 0, nd = 5;
    long long max_ctx = 8192, trials = 3, seed = 0, block = 512;
    const char *tok_dir = NULL, *png = NULL;
    int ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        int r = tp_eval_common_option(ch, optarg, &com);
        if (r < 0) return 2;
        if (r) continue;
        int bad = 0;
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'k': tok_dir = optarg; break;
        case 'P': png = optarg; break;
        case 'x': bad = tp_cli_int(optarg, 64, 1 << 24, &max_ctx); break;
        case 't': bad = tp_cli_int(optarg, 1, 10000, &trials); break;
        case 's': bad = tp_cli_int(optarg, 0, INT64_MAX, &seed); break;
        case 'B': bad = tp_cli_int(optarg, 1, 1 << 16, &block); break;
        case 'L': bad = parse_list(optarg, lengths, 64, &nl, 16, 1 << 24); break;
        case 'D': bad = parse_list(optarg, depths, 64, &nd, 0, 1); break;
        default:
            fprintf(stderr, "tptt: eval passkey: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
        if (bad) {
            fprintf(stderr, "tptt: eval passkey: bad value '%s' for %s (see --help)\n", optarg, argv[optind - 2]);
            return 2;
        }
    }
    if (optind != argc || (!com.load.model && !com.load.checkpoint)) {
        fprintf(stderr, "tptt: eval passkey: one of --checkpoint / --model is required\n");
        usage(stderr);
        return 2;
    }
    if (!nl)
        for (long long L = 1024; L <= max_ctx && nl < 64; L *= 2) lengths[nl++] = (double)L;
    if (!nl) { fprintf(stderr, "tptt: eval passkey: --max-context below 1024 and no --lengths\n"); return 2; }
    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    tp_titan *ti = NULL;
    tp_tokenizer *tok = NULL;
    tp_infer_cache *cache = NULL;
    int rc = tp_titan_load(&com.load, &ti, &err);
    if (rc == TP_OK) rc = tp_tokenizer_load(tok_dir ? tok_dir : ti->base_dir, &tok, &err);
    if (rc == TP_OK) rc = tp_cache_create(ti->dec, block, &cache, &err);
    rc = tp_dist_agree(&d, rc, &err);
    int64_t nitems = (int64_t)nl * nd * trials;
    int64_t *ok = rc ? NULL : tp_calloc((size_t)nitems, sizeof *ok, &err);
    if (rc == TP_OK && !ok) rc = TP_ENOMEM;
    if (rc == TP_OK && d.rank == 0)
        fprintf(stderr, "tptt: eval passkey: %s; %d lengths x %d depths x %lld keys\n", ti->desc, nl, nd, trials);
    int32_t eos[1];
    for (int64_t i = d.rank; rc == TP_OK && i < nitems; i += d.world) {
        int li = (int)(i / (nd * trials)), di = (int)((i / trials) % nd);
        tp_rng rng;
        tp_rng_seed(&rng, (uint64_t)seed, (uint64_t)i);
        uint32_t key = 10000 + (uint32_t)(tp_rng_next(&rng) % 90000);
        tp_ids p = {0};
        rc = tp_passkey_prompt(tok, (int64_t)lengths[li], depths[di], key, &p, &err);
        tp_gen_opts go = {{0, 0, 1, 1}, 8, eos, 0, NULL, NULL};
        tp_gen_result res = {0};
        if (rc == TP_OK) rc = tp_generate(cache, p.ids, (int64_t)p.n, &go, &rng, &res, &err);
        if (rc == TP_OK) {
            tp_strbuf t;
            tp_strbuf_init(&t);
            rc = tp_tokenizer_decode(tok, res.ids, (size_t)res.n, 1, &t, &err);
            if (rc == TP_OK) ok[i] = tp_passkey_correct(t.buf ? t.buf : "", t.len, key);
            tp_strbuf_free(&t);
        }
        free(res.ids);
        tp_ids_free(&p);
    }
    rc = tp_dist_agree(&d, rc, &err);
    for (int64_t i = 0; rc == TP_OK && d.world > 1 && i < nitems; i++) ok[i] = tp_dist_sum_i64(ok[i]);
    if (rc == TP_OK) {
        json_t *j = json_object(), *acc = json_array(), *jl = json_array(), *jd = json_array();
        int64_t total = 0;
        if (d.rank == 0) {
            fprintf(stderr, "%10s", "length");
            for (int k = 0; k < nd; k++) fprintf(stderr, "  depth %-4.2f", depths[k]);
            fputc('\n', stderr);
        }
        for (int l = 0; l < nl; l++) {
            json_t *row = json_array();
            json_array_append_new(jl, json_integer((json_int_t)lengths[l]));
            if (d.rank == 0) fprintf(stderr, "%10lld", (long long)lengths[l]);
            for (int k = 0; k < nd; k++) {
                int64_t s = 0;
                for (int64_t t = 0; t < trials; t++) s += ok[((int64_t)l * nd + k) * trials + t];
                total += s;
                json_array_append_new(row, json_real((double)s / (double)trials));
                if (d.rank == 0) fprintf(stderr, "  %10.2f", (double)s / (double)trials);
            }
            if (d.rank == 0) fputc('\n', stderr);
            json_array_append_new(acc, row);
        }
        for (int k = 0; k < nd; k++) json_array_append_new(jd, json_real(depths[k]));
        json_object_set_new(j, "mode", json_string("passkey"));
        json_object_set_new(j, "accuracy", json_real((double)total / (double)nitems));
        json_object_set_new(j, "lengths", jl);
        json_object_set_new(j, "depths", jd);
        json_object_set_new(j, "trials", json_integer(trials));
        json_object_set_new(j, "by_length_depth", acc);
        json_object_set_new(j, "model", json_string(ti->desc));
        json_object_set_new(j, "ranks", json_integer(d.world));
        char *s = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(10));
        json_decref(j);
        if (d.rank == 0) fprintf(stderr, "tptt: eval passkey: accuracy %.3f over %lld keys\n",
                                 (double)total / (double)nitems, (long long)nitems);
        rc = s ? tp_eval_write_report(&d, &com, s, &err) : tp_fail(&err, TP_ENOMEM, "out of memory");
        free(s);
        if (rc == TP_OK && png && d.rank == 0) rc = heat_map(png, lengths, nl, depths, nd, ok, trials, &err);
        if (rc == TP_OK && png && d.rank == 0) fprintf(stderr, "tptt: eval passkey: wrote %s\n", png);
    }
    tp_dist_report_failure(&d, rc, &err);
    free(ok);
    tp_cache_destroy(cache);
    if (tok) tp_tokenizer_free(tok);
    tp_titan_free(ti);
    tp_dist_finalize();
    return rc == TP_OK ? 0 : 1;
}
