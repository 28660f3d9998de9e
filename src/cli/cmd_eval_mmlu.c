/* cmd_eval_mmlu.c - `tptt eval mmlu`: multiple-choice accuracy of a model or
 * a Titan, HELM's generative EM/PEM/QEM/PQEM (the paper's metrics) and the
 * lm-evaluation-harness log-likelihood accuracy from one pass; optionally
 * the base model on the same items (--compare). docs/eval.md. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/eval_common.h"
#include "eval/mmlu.h"
#include "eval/mmlu_score.h"
#include "infer/cache.h"
#include "util/fsutil.h"

static void usage(FILE *fp) {
    fprintf(fp,
            "usage: [mpirun -np N] tptt eval mmlu (--checkpoint CK | --model DIR) --data DIR_OR_JSONL [options]\n"
            "  --data DIR            the original layout: DIR/<split>/<subject>_<split>.csv, shots from DIR/dev/\n"
            "  --data FILE.jsonl     {\"subject\", \"question\", \"choices\": [4], \"answer\": 0-3 or A-D} per line;\n"
            "                        shots from --dev FILE.jsonl\n"
            "  --shots K             shots per prompt (default 1, as the paper), the first K dev items of the subject\n"
            "  --split test|val      (directory layout; default test)\n"
            "  --subjects a,b,...    only these subjects;  --max-items N  at most N items per subject\n"
            "  --gen-tokens N        greedy continuation length for EM/PEM/QEM/PQEM (default 5; cut at a newline)\n"
            "  --compare             also evaluate the checkpoint's base model on the same items: the paper's table\n"
            "  --items-out FILE.jsonl  every item: prompt ids, choice ids, log-likelihoods, continuation, scores\n"
            "  --report FILE.json  --matmul auto|f32|bf16  --tokenizer DIR  --prefill-block N\n");
}

static const char *const METRICS[] = {"acc", "em", "pem", "qem", "pqem"};
#define NMET 5

static void put_ids(tp_strbuf *s, const tp_ids *v) {
    tp_strbuf_putn(s, "[", 1);
    for (size_t i = 0; i < v->n; i++) tp_strbuf_printf(s, "%s%d", i ? "," : "", v->ids[i]);
    tp_strbuf_putn(s, "]", 1);
}

/* one model's fields of an item line */
static void put_result(tp_strbuf *s, const tp_mmlu_result *r, int gold) {
    tp_strbuf_puts(s, "\"ll\":[");
    for (int k = 0; k < 4; k++) tp_strbuf_printf(s, "%s%.17g", k ? "," : "", r->ll[k]);
    tp_strbuf_printf(s, "],\"pred\":\"%c\",\"acc\":%d,\"continuation_ids\":", 'A' + r->pred, r->pred == gold);
    put_ids(s, &r->cont);
    tp_strbuf_puts(s, ",\"continuation\":");
    tp_strbuf_json_stringn(s, r->text, r->text_len);
    tp_strbuf_printf(s, ",\"em\":%d,\"pem\":%d,\"qem\":%d,\"pqem\":%d", r->gen.em, r->gen.pem, r->gen.qem,
                     r->gen.pqem);
}

typedef struct model_run {
    tp_titan *ti;
    tp_infer_cache *cache;
} model_run;

/* per (model, metric): the 0/1 values of every item, item order */
typedef struct agg {
    double *v[2][NMET];
} agg;

static json_t *summary(const double *const *v, size_t n, char **subj, size_t nsub, const size_t *sub_of,
                       json_t **by_subject_out) {
    json_t *m = json_object(), *bys = json_object();
    double *means = calloc(nsub ? nsub : 1, sizeof *means), *x = calloc(n ? n : 1, sizeof *x);
    for (int k = 0; k < NMET && means && x; k++) {
        double mic, mics, mac, macs;
        tp_mmlu_stats(v[k], n, &mic, &mics);
        for (size_t s = 0; s < nsub; s++) {
            size_t cnt = 0;
            for (size_t i = 0; i < n; i++)
                if (sub_of[i] == s) x[cnt++] = v[k][i];
            double mean;
            tp_mmlu_stats(x, cnt, &mean, NULL);
            means[s] = mean;
            json_t *js = json_object_get(bys, subj[s]);
            if (!js) {
                js = json_object();
                json_object_set_new(js, "n", json_integer((json_int_t)cnt));
                json_object_set_new(bys, subj[s], js);
            }
            json_object_set_new(js, METRICS[k], json_real(mean));
        }
        tp_mmlu_stats(means, nsub, &mac, &macs);
        json_t *e = json_object();
        json_object_set_new(e, "micro", json_real(mic));
        json_object_set_new(e, "micro_stderr", json_real(mics));
        json_object_set_new(e, "macro", json_real(mac));
        json_object_set_new(e, "macro_stderr", json_real(macs));
        json_object_set_new(m, METRICS[k], e);
    }
    free(means);
    free(x);
    *by_subject_out = bys;
    return m;
}

int tp_cmd_eval_mmlu(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"checkpoint", required_argument, 0, 'c'},
        {"report", required_argument, 0, 'R'},     {"matmul", required_argument, 0, 'M'},
        {"data", required_argument, 0, 'd'},       {"dev", required_argument, 0, 'v'},
        {"shots", required_argument, 0, 'k'},      {"split", required_argument, 0, 'S'},
        {"subjects", required_argument, 0, 'u'},   {"max-items", required_argument, 0, 'n'},
        {"gen-tokens", required_argument, 0, 'g'}, {"compare", no_argument, 0, 'C'},
        {"items-out", required_argument, 0, 'o'},  {"tokenizer", required_argument, 0, 't'},
        {"prefill-block", required_argument, 0, 'B'}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    tp_eval_common com = {0};
    const char *data = NULL, *dev_path = NULL, *split = "test", *subjects = NULL, *items_out = NULL, *tok_dir = NULL;
    long long shots = 1, max_items = 0, gen_tokens = 5, block = 512;
    int compare = 0, ch;
    optind = 1;
    opterr = 0;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        int r = tp_eval_common_option(ch, optarg, &com);
        if (r < 0) return 2;
        if (r) continue;
        long long *dst = NULL, lo = 0, hi = 0;
        switch (ch) {
        case 'h': usage(stdout); return 0;
        case 'd': data = optarg; continue;
        case 'v': dev_path = optarg; continue;
        case 'S': split = optarg; continue;
        case 'u': subjects = optarg; continue;
        case 'o': items_out = optarg; continue;
        case 't': tok_dir = optarg; continue;
        case 'C': compare = 1; continue;
        case 'k': dst = &shots; lo = 0; hi = 64; break;
        case 'n': dst = &max_items; lo = 0; hi = INT64_MAX; break;
        case 'g': dst = &gen_tokens; lo = 1; hi = 256; break;
        case 'B': dst = &block; lo = 1; hi = 1 << 16; break;
        default:
            fprintf(stderr, "tptt: eval mmlu: unknown or incomplete option '%s' (see --help)\n", argv[optind - 1]);
            return 2;
        }
        if (tp_cli_int(optarg, lo, hi, dst)) {
            fprintf(stderr, "tptt: eval mmlu: %s: expected an integer in [%lld, %lld], got '%s'\n", argv[optind - 2],
                    lo, hi, optarg);
            return 2;
        }
    }
    if (optind != argc || !data || (!com.load.model && !com.load.checkpoint)) {
        fprintf(stderr, "tptt: eval mmlu: --data and one of --checkpoint / --model are required\n");
        usage(stderr);
        return 2;
    }
    tp_dist d;
    tp_err err = {0};
    if (tp_dist_init(&argc, &argv, &d, &err)) return tp_cli_error(err.msg);
    model_run mr[2] = {{0}};
    int nm = compare ? 2 : 1;
    tp_tokenizer *tok = NULL;
    tp_mmlu_set test = {0}, dev = {0};
    int64_t skipped = 0, dskipped = 0;
    size_t *sel = NULL, nsel = 0;
    int rc = tp_titan_load(&com.load, &mr[0].ti, &err);
    if (rc == TP_OK && compare && !mr[0].ti->ckpt_dir[0])
        rc = tp_fail(&err, TP_EINVAL, "--compare needs --checkpoint (the base is the checkpoint's)");
    if (rc == TP_OK && compare) {
        tp_load_opts bo = {mr[0].ti->base_dir, NULL, com.load.matmul};
        rc = tp_titan_load(&bo, &mr[1].ti, &err);
    }
    if (rc == TP_OK) rc = tp_tokenizer_load(tok_dir ? tok_dir : mr[0].ti->base_dir, &tok, &err);
    for (int i = 0; rc == TP_OK && i < nm; i++) rc = tp_cache_create(mr[i].ti->dec, block, &mr[i].cache, &err);
    if (rc == TP_OK) {
        size_t dl = strlen(data);
        int jsonl = (dl > 6 && !strcmp(data + dl - 6, ".jsonl")) || (dl > 5 && !strcmp(data + dl - 5, ".json"));
        test.quiet = dev.quiet = d.rank != 0;
        if (!jsonl) {
            rc = tp_mmlu_read_dir(data, split, &test, &skipped, &err);
            if (rc == TP_OK && shots > 0) rc = tp_mmlu_read_dir(data, dev_path ? dev_path : "dev", &dev, &dskipped, &err);
        } else {
            rc = tp_mmlu_read_jsonl(data, &test, &skipped, &err);
            if (rc == TP_OK && shots > 0 && !dev_path)
                rc = tp_fail(&err, TP_EINVAL, "%s: --shots %lld needs --dev FILE.jsonl (the items shots come from); "
                             "--shots 0 for zero-shot", data, shots);
            if (rc == TP_OK && shots > 0) rc = tp_mmlu_read_jsonl(dev_path, &dev, &dskipped, &err);
        }
    }
    /* selection: subjects filter, at most max_items per subject (file order) */
    const char **seen = NULL;
    int64_t *taken = NULL;
    size_t nseen = 0, seen_cap = 0;
    if (rc == TP_OK) {
        sel = tp_calloc(test.n ? test.n : 1, sizeof *sel, &err);
        if (!sel) rc = TP_ENOMEM;
        for (size_t i = 0; rc == TP_OK && i < test.n; i++) {
            const char *s = test.items[i].subject;
            if (subjects) {
                size_t sl = strlen(s);
                const char *p = subjects;
                int found = 0;
                while (*p && !found) {
                    const char *e = strchr(p, ',');
                    size_t n = e ? (size_t)(e - p) : strlen(p);
                    found = n == sl && !strncmp(p, s, n);
                    p += n + (e ? 1 : 0);
                }
                if (!found) continue;
            }
            if (max_items) { /* items taken per subject: a count per distinct subject */
                size_t k = 0;
                while (k < nseen && strcmp(seen[k], s)) k++;
                if (k == nseen) {
                    if (nseen == seen_cap) {
                        size_t nc = seen_cap ? 2 * seen_cap : 64;
                        const char **ns = realloc(seen, nc * sizeof *ns);
                        int64_t *nt = realloc(taken, nc * sizeof *nt);
                        if (ns) seen = ns;
                        if (nt) taken = nt;
                        if (!ns || !nt) { rc = tp_fail(&err, TP_ENOMEM, "out of memory"); break; }
                        seen_cap = nc;
                    }
                    seen[nseen] = s;
                    taken[nseen++] = 0;
                }
                if (taken[k] >= max_items) continue;
                taken[k]++;
            }
            sel[nsel++] = i;
        }
        if (rc == TP_OK && nsel == 0)
            rc = tp_fail(&err, TP_EINVAL, "%s: no items%s", data, subjects ? " for --subjects" : "");
        free(seen);
        free(taken);
    }
    rc = tp_dist_agree(&d, rc, &err);
    if (rc == TP_OK && d.rank == 0) {
        fprintf(stderr, "tptt: eval mmlu: %s\n", mr[0].ti->desc);
        if (compare) fprintf(stderr, "tptt: eval mmlu: compared with %s\n", mr[1].ti->desc);
        fprintf(stderr, "tptt: eval mmlu: %zu items, %lld-shot, %d rank%s%s\n", nsel, shots, d.world,
                d.world == 1 ? "" : "s", skipped || dskipped ? " (bad rows skipped: see the warnings)" : "");
    }
    /* short dev sets: one warning per subject (per run of its items in the
     * selection), from rank 0, which does not score every subject itself */
    for (size_t j = 0; rc == TP_OK && d.rank == 0 && shots > 0 && j < nsel; j++) {
        const char *subj = test.items[sel[j]].subject;
        if (j && !strcmp(subj, test.items[sel[j - 1]].subject)) continue;
        int got = 0;
        free(tp_mmlu_shots(&dev, subj, (int)shots, &got));
        if (got >= 0 && got < shots)
            fprintf(stderr, "tptt: warning: subject %s has %d dev item%s for %lld shots\n", subj, got,
                    got == 1 ? "" : "s", shots);
    }
    tp_strbuf lines;
    tp_strbuf_init(&lines);
    for (size_t j = d.rank; rc == TP_OK && j < nsel; j += d.world) {
        const tp_mmlu_item *it = &test.items[sel[j]];
        int got = 0;
        const tp_mmlu_item **sh = shots > 0 ? tp_mmlu_shots(&dev, it->subject, (int)shots, &got) : NULL;
        if (got < 0) { rc = tp_fail(&err, TP_ENOMEM, "out of memory"); break; }
        char *prompt = tp_mmlu_prompt(it, sh, got);
        free(sh);
        if (!prompt) { rc = tp_fail(&err, TP_ENOMEM, "out of memory"); break; }
        tp_mmlu_result res[2];
        memset(res, 0, sizeof res);
        for (int m = 0; rc == TP_OK && m < nm; m++)
            rc = tp_mmlu_score(mr[m].cache, tok, prompt, it->answer, (int)gen_tokens, &res[m], &err);
        if (rc == TP_OK) {
            tp_strbuf_printf(&lines, "{\"index\":%zu,\"subject\":", j);
            tp_strbuf_json_string(&lines, it->subject);
            tp_strbuf_printf(&lines, ",\"source\":");
            tp_strbuf_json_string(&lines, it->file);
            tp_strbuf_printf(&lines, ",\"line\":%lld,\"gold\":\"%c\",\"prompt_ids\":", (long long)it->line,
                             'A' + it->answer);
            put_ids(&lines, &res[0].prompt);
            tp_strbuf_puts(&lines, ",\"choice_ids\":[");
            for (int k = 0; k < 4; k++) {
                if (k) tp_strbuf_putn(&lines, ",", 1);
                put_ids(&lines, &res[0].choice[k]);
            }
            tp_strbuf_puts(&lines, "],");
            put_result(&lines, &res[0], it->answer);
            if (compare) {
                tp_strbuf_puts(&lines, ",\"base\":{");
                put_result(&lines, &res[1], it->answer);
                tp_strbuf_putn(&lines, "}", 1);
            }
            tp_strbuf_puts(&lines, "}\n");
            if (lines.oom) rc = tp_fail(&err, TP_ENOMEM, "out of memory");
        }
        for (int m = 0; m < nm; m++) tp_mmlu_result_free(&res[m]);
        free(prompt);
    }
    rc = tp_dist_agree(&d, rc, &err);
    char *all = NULL;
    size_t *lens = NULL;
    if (rc == TP_OK) {
        lens = tp_calloc((size_t)d.world, sizeof *lens, &err);
        rc = lens ? tp_dist_gather_text(&d, lines.buf ? lines.buf : "", lines.len, &all, lens, &err) : TP_ENOMEM;
    }
    if (rc == TP_OK && d.rank == 0) {
        /* rank r holds items r, r + world, ...: walk them in item order */
        const char **cur = tp_calloc((size_t)d.world, sizeof *cur, &err);
        agg A = {{{0}}};
        char **subj = tp_calloc(nsel, sizeof *subj, &err);
        size_t *sub_of = tp_calloc(nsel, sizeof *sub_of, &err), nsub = 0;
        for (int m = 0; m < nm; m++)
            for (int k = 0; k < NMET; k++) A.v[m][k] = tp_calloc(nsel, sizeof(double), &err);
        rc = cur && subj && sub_of ? TP_OK : TP_ENOMEM;
        for (int m = 0; m < nm; m++)
            for (int k = 0; k < NMET; k++) if (!A.v[m][k]) rc = TP_ENOMEM;
        size_t off = 0;
        for (int r = 0; cur && r < d.world; r++) { cur[r] = all + off; off += lens[r]; }
        FILE *io = NULL;
        if (rc == TP_OK && items_out && !(io = fopen(items_out, "w")))
            rc = tp_fail_sys(&err, TP_EIO, errno, "%s: cannot write (--items-out)", items_out);
        for (size_t j = 0; rc == TP_OK && j < nsel; j++) {
            const char *s = cur[j % d.world], *nl = strchr(s, '\n');
            cur[j % d.world] = nl + 1;
            if (io && fwrite(s, 1, (size_t)(nl - s) + 1, io) != (size_t)(nl - s) + 1)
                rc = tp_fail_sys(&err, TP_EIO, errno, "%s: write failed", items_out);
            json_error_t je;
            json_t *line = json_loadb(s, (size_t)(nl - s), 0, &je);
            const char *sn = json_string_value(json_object_get(line, "subject"));
            size_t si = 0;
            while (si < nsub && strcmp(subj[si], sn ? sn : "")) si++;
            if (si == nsub && !(subj[nsub++] = strdup(sn ? sn : ""))) rc = tp_fail(&err, TP_ENOMEM, "out of memory");
            sub_of[j] = si;
            for (int m = 0; m < nm; m++) {
                json_t *o = m ? json_object_get(line, "base") : line;
                for (int k = 0; k < NMET; k++) A.v[m][k][j] = (double)json_integer_value(json_object_get(o, METRICS[k]));
            }
            json_decref(line);
        }
        if (io && fclose(io) != 0 && rc == TP_OK) rc = tp_fail_sys(&err, TP_EIO, errno, "%s: write failed", items_out);
        if (rc == TP_OK) {
            json_t *rep = json_object(), *bys = NULL, *bbys = NULL;
            json_object_set_new(rep, "mode", json_string("mmlu"));
            json_object_set_new(rep, "shots", json_integer(shots));
            json_object_set_new(rep, "items", json_integer((json_int_t)nsel));
            json_object_set_new(rep, "subjects", json_integer((json_int_t)nsub));
            json_object_set_new(rep, "skipped_rows", json_integer(skipped + dskipped));
            json_object_set_new(rep, "model", json_string(mr[0].ti->desc));
            json_object_set_new(rep, "metrics", summary((const double *const *)A.v[0], nsel, subj, nsub, sub_of, &bys));
            json_object_set_new(rep, "by_subject", bys);
            fprintf(stderr, "%-40s %6s %8s %8s %8s %8s %8s\n", "subject", "n", "acc", "EM", "PEM", "QEM", "PQEM");
            const char *key;
            json_t *val;
            json_object_foreach(bys, key, val) {
                fprintf(stderr, "%-40.40s %6lld", key, (long long)json_integer_value(json_object_get(val, "n")));
                for (int k = 0; k < NMET; k++) fprintf(stderr, " %8.4f", json_real_value(json_object_get(val, METRICS[k])));
                fputc('\n', stderr);
            }
            json_t *met = json_object_get(rep, "metrics");
            for (int avg = 0; avg < 2; avg++) {
                fprintf(stderr, "%-40s %6zu", avg ? "macro average (over subjects)" : "micro average (over items)", nsel);
                for (int k = 0; k < NMET; k++)
                    fprintf(stderr, " %8.4f", json_real_value(json_object_get(json_object_get(met, METRICS[k]), avg ? "macro" : "micro")));
                fputc('\n', stderr);
            }
            if (compare) {
                json_object_set_new(rep, "base_model", json_string(mr[1].ti->desc));
                json_object_set_new(rep, "base_metrics",
                                    summary((const double *const *)A.v[1], nsel, subj, nsub, sub_of, &bbys));
                json_object_set_new(rep, "base_by_subject", bbys);
                json_t *diff = json_object();
                double *dd = calloc(nsel, sizeof *dd);
                fprintf(stderr, "\n%-10s %22s %22s %26s\n", "metric", "Titan (micro +- se)", "base (micro +- se)",
                        "Titan - base (paired se)");
                for (int k = 0; dd && k < NMET; k++) {
                    double mt, st, mb, sb, md, sd;
                    tp_mmlu_stats(A.v[0][k], nsel, &mt, &st);
                    tp_mmlu_stats(A.v[1][k], nsel, &mb, &sb);
                    for (size_t j = 0; j < nsel; j++) dd[j] = A.v[0][k][j] - A.v[1][k][j];
                    tp_mmlu_stats(dd, nsel, &md, &sd);
                    json_t *e = json_object();
                    json_object_set_new(e, "mean", json_real(md));
                    json_object_set_new(e, "stderr", json_real(sd));
                    json_object_set_new(diff, METRICS[k], e);
                    fprintf(stderr, "%-10s %13.4f +- %.4f %13.4f +- %.4f %17.4f +- %.4f\n", METRICS[k], mt, st, mb, sb,
                            md, sd);
                }
                free(dd);
                json_object_set_new(rep, "difference", diff);
            }
            json_object_set_new(rep, "ranks", json_integer(d.world));
            char *s = json_dumps(rep, JSON_COMPACT | JSON_REAL_PRECISION(10));
            json_decref(rep);
            rc = s ? tp_eval_write_report(&d, &com, s, &err) : tp_fail(&err, TP_ENOMEM, "out of memory");
            free(s);
        }
        for (size_t s = 0; s < nsub; s++) free(subj[s]);
        free(subj);
        free(sub_of);
        for (int m = 0; m < nm; m++)
            for (int k = 0; k < NMET; k++) free(A.v[m][k]);
        free(cur);
    }
    rc = tp_dist_agree(&d, rc, &err);
    tp_dist_report_failure(&d, rc, &err);
    free(all);
    free(lens);
    tp_strbuf_free(&lines);
    free(sel);
    tp_mmlu_set_free(&test);
    tp_mmlu_set_free(&dev);
    for (int m = 0; m < 2; m++) {
        tp_cache_destroy(mr[m].cache);
        tp_titan_free(mr[m].ti);
    }
    if (tok) tp_tokenizer_free(tok);
    tp_dist_finalize();
    return rc == TP_OK ? 0 : 1;
}
