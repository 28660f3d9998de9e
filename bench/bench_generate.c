/* bench_generate.c - inference speed and memory of a Titan ("Run the Titan"):
 * prefill and token-by-token decode through the inference cache
 * (tp_cache_feed) on a Llama-3.2-1B-shaped bf16 model (D=2048, F=8192, H=32,
 * Hkv=8, d=64, V=128256, tied embeddings, rope_theta 500000 with llama3
 * scaling), for two variants:
 *   softmax+LiZA  LiZA delta_product, MaG constant mu = 0.5: every layer keeps
 *                 a KV cache (fp32 K, V) beside the recurrent state;
 *   pure-linear   LiZA delta_product, mu = 1 constant, no cross gate: no KV
 *                 cache, so memory must not grow with the context.
 * Both decoders are built with o.inference = 1 and the matmul backend that
 * infer/load.c picks (bf16 via oneDNN when every weight is bf16 and the CPU
 * has AVX512_BF16, else f32), LoRA r = 8 on q,k,v,o as a checkpoint has.
 *
 *   bench_generate [--layers 2] [--contexts 1024,8192,32768]
 *                  [--linear-contexts 1024,8192,32768,131072] [--block 512]
 *                  [--decode 16] [--variants softmax,linear] [--model DIR]
 *                  [--bw-mib 2048] [--quick]
 *
 * Per (variant, context n):
 *   prefill   one tp_cache_feed of n random ids, blocks of --block tokens,
 *             only the last position's logits computed;
 *   decode    then --decode single-token feeds (greedy argmax fed back),
 *             each timed, the median reported (the machines we share are
 *             noisy); one untimed warm-up block and token per variant;
 *   memory    tp_cache_bytes, and from /proc/self/status the peak (VmHWM,
 *             reset before each context through /proc/self/clear_refs where
 *             the kernel allows it), current (VmRSS) and private (RssAnon)
 *             resident sets: frozen weights are a read-only file mapping, so
 *             they are resident but not private.
 *   bound     decode's memory-bandwidth bound: bytes read per token (every
 *             2-D weight of the layers in its stored dtype, the head (the
 *             embedding when tied), the LiZA states, and the KV cache at
 *             context n for layers that keep one) over the read bandwidth
 *             measured in this run (OpenMP sum over a --bw-mib buffer, best
 *             of 3), and the measured decode rate as a fraction of it.
 * Then: prefill(8k) against 8k x the decode step at 8k (target >= 10x), and
 * the pure-linear RSS at its largest context against its smallest (target:
 * within 5%).
 *
 * Without --model a model with --layers layers (the full 128k head always) is
 * written to a temporary directory under $TMPDIR (or /tmp) and removed at the
 * end; with --model DIR that model is used as it is (all its layers).
 * --quick: 2 layers, contexts 256,1024 for both variants, 4 decode steps, a
 * 1 GiB bandwidth buffer (a smoke run; ctest does not run it).
 *
 * Caveat: the bandwidth buffer must be several times the last-level cache
 * (printed); and with few layers a large L3 (260 MiB on the VMs we run on)
 * can keep part of the ~0.8 GB read per token, so decode may beat the DRAM
 * bound (meas/bound > 100%). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <omp.h>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define BW_X86 1
#endif

#include "infer/cache.h"
#include "infer/load.h"
#include "io/hf_model.h"
#include "kernels/matmul.h"
#include "model/decoder.h"
#include "model/init_model.h"
#include "util/platform.h"
#include "util/rng.h"

#define MAX_CTX 16

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- /proc/self/status ---------------------------------------------------- */

typedef struct mem_status {
    double hwm, rss, anon, file; /* MiB */
} mem_status;

static void read_status(mem_status *s) {
    memset(s, 0, sizeof *s);
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return;
    char line[256];
    long long kb;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "VmHWM: %lld kB", &kb) == 1) s->hwm = (double)kb / 1024.0;
        else if (sscanf(line, "VmRSS: %lld kB", &kb) == 1) s->rss = (double)kb / 1024.0;
        else if (sscanf(line, "RssAnon: %lld kB", &kb) == 1) s->anon = (double)kb / 1024.0;
        else if (sscanf(line, "RssFile: %lld kB", &kb) == 1) s->file = (double)kb / 1024.0;
    }
    fclose(f);
}

/* Reset VmHWM to the current RSS (Linux >= 4.0); 0 on success. */
static int reset_peak(void) {
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0) return -1;
    int ok = write(fd, "5", 1) == 1;
    close(fd);
    return ok ? 0 : -1;
}

/* ---- memory read bandwidth ------------------------------------------------ */

/* Sum of a[lo, hi): wide loads where the CPU has them (scalar loads reach
 * about half the bandwidth on the AVX-512 machines we run on, which would
 * make the bound too low and flatter the ratio). */
#ifdef BW_X86
__attribute__((target("avx512f"))) static uint64_t sum_avx512(const uint64_t *a, size_t lo, size_t hi) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512((const void *)(a + i)));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512((const void *)(a + i + 8)));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512((const void *)(a + i + 16)));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512((const void *)(a + i + 24)));
    }
    uint64_t r = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    for (; i < hi; i++) r += a[i];
    return r;
}
__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *a, size_t lo, size_t hi) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(a + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(a + i + 4)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(a + i + 8)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(a + i + 12)));
    }
    s0 = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, s0);
    uint64_t r = t[0] + t[1] + t[2] + t[3];
    for (; i < hi; i++) r += a[i];
    return r;
}
#endif
static uint64_t sum_scalar(const uint64_t *a, size_t lo, size_t hi) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    size_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        s0 += a[i];
        s1 += a[i + 1];
        s2 += a[i + 2];
        s3 += a[i + 3];
        s4 += a[i + 4];
        s5 += a[i + 5];
        s6 += a[i + 6];
        s7 += a[i + 7];
    }
    for (; i < hi; i++) s0 += a[i];
    return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
}

/* GB/s of a parallel read and sum over mib MiB (pages first touched by the
 * threads that read them), best of 3; *how names the loads used. */
static double read_bandwidth(size_t mib, const char **how) {
    uint64_t (*sum)(const uint64_t *, size_t, size_t) = sum_scalar;
    *how = "scalar";
#ifdef BW_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        sum = sum_avx512;
        *how = "avx512";
    } else if (__builtin_cpu_supports("avx2")) {
        sum = sum_avx2;
        *how = "avx2";
    }
#endif
    size_t n = (mib << 20) / sizeof(uint64_t);
    uint64_t *a = malloc(n * sizeof *a);
    if (!a) return 0;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i * 0x9E3779B97F4A7C15ull;
    double best = 1e30;
    uint64_t check = 0;
    for (int it = 0; it < 3; it++) {
        uint64_t total = 0;
        double t0 = now();
#pragma omp parallel reduction(+ : total)
        {
            size_t nt = (size_t)omp_get_num_threads(), k = (size_t)omp_get_thread_num();
            size_t lo = n / nt * k, hi = k + 1 == nt ? n : n / nt * (k + 1);
            total += sum(a, lo, hi);
        }
        double t = now() - t0;
        if (t < best) best = t;
        check ^= total;
    }
    free(a);
    if (check == 1) puts("(bandwidth checksum)"); /* keeps the sums alive */
    return (double)(n * sizeof(uint64_t)) / best / 1e9;
}

/* ---- helpers -------------------------------------------------------------- */

static int parse_list(const char *s, int64_t *out, int *n) {
    *n = 0;
    while (*s) {
        char *end;
        long long v = strtoll(s, &end, 10);
        if (end == s || v < 1 || *n == MAX_CTX) return -1;
        if (*end == 'k' || *end == 'K') {
            v *= 1024;
            end++;
        }
        out[(*n)++] = v;
        if (*end == ',') end++;
        else if (*end) return -1;
        s = end;
    }
    return *n ? 0 : -1;
}

/* The generated model's files, removed on SIGINT/SIGTERM too (unlink and
 * rmdir are async-signal-safe; the names are collected beforehand). */
#define MAX_TMP_FILES 16
static char tmp_dir[1024], tmp_files[MAX_TMP_FILES][1300];
static int n_tmp_files;

static void on_signal(int sig) {
    for (int i = 0; i < n_tmp_files; i++) unlink(tmp_files[i]);
    if (tmp_dir[0]) rmdir(tmp_dir);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void collect_tmp_files(void) {
    DIR *d = opendir(tmp_dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) && n_tmp_files < MAX_TMP_FILES)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            snprintf(tmp_files[n_tmp_files++], sizeof tmp_files[0], "%s/%s", tmp_dir, e->d_name);
    closedir(d);
}

static void remove_tmp(void) {
    if (!tmp_dir[0]) return;
    if (!n_tmp_files) collect_tmp_files();
    for (int i = 0; i < n_tmp_files; i++) unlink(tmp_files[i]);
    rmdir(tmp_dir);
}

static void print_loadavg(const char *when) {
    char buf[128] = "?";
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (!fgets(buf, sizeof buf, f)) snprintf(buf, sizeof buf, "?");
        buf[strcspn(buf, "\n")] = 0;
        fclose(f);
    }
    printf("load average %s: %s (other jobs on the machine skew every figure)\n", when, buf);
}

/* Bytes of the 2-D weights decode reads per token: every layer matrix and
 * the head (lm_head, or the embedding when tied); the embedding lookup of
 * one row is not counted. */
static double weight_bytes_per_token(const tp_hf_model *hf, double *layer_bytes, double *head_bytes) {
    *layer_bytes = *head_bytes = 0;
    for (size_t i = 0; i < hf->nweights; i++) {
        const tp_weight_desc *w = &hf->desc[i];
        if (w->ndim != 2) continue;
        double b = (double)w->shape[0] * (double)w->shape[1] * (double)tp_dtype_size(hf->views[i]->dtype);
        if (w->layer >= 0) *layer_bytes += b;
        else if (w->kind == TP_W_LM_HEAD || (w->kind == TP_W_EMBED && hf->cfg.tie_embeddings)) *head_bytes += b;
    }
    return *layer_bytes + *head_bytes;
}

static int32_t argmax(const float *x, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return (int32_t)b;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* median (sorts x) */
static double median(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

typedef struct result {
    int64_t ctx;
    double t_prefill, t_step, bytes, bound, cache_mib;
    mem_status mem;
} result;

/* ---- main ----------------------------------------------------------------- */

int main(int argc, char **argv) {
    tp_maybe_reexec_for_blas(argc, argv);
    int layers = 2, ndec = 16, quick = 0, run_soft = 1, run_lin = 1;
    int64_t block = 512;
    size_t bw_mib = 2048;
    int64_t ctx_s[MAX_CTX] = {1024, 8192, 32768}, ctx_l[MAX_CTX] = {1024, 8192, 32768, 131072};
    int nctx_s = 3, nctx_l = 4, lin_given = 0, no_lora = 0;
    const char *model = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--quick")) {
            quick = 1;
            continue;
        }
        if (!strcmp(a, "--no-lora")) { /* the LoRA overhead of unmerged adapters: run without them */
            no_lora = 1;
            continue;
        }
        if (!v) bad = 1;
        else if (!strcmp(a, "--layers")) bad = (layers = atoi(v)) < 1;
        else if (!strcmp(a, "--decode")) bad = (ndec = atoi(v)) < 1;
        else if (!strcmp(a, "--block")) bad = (block = atoll(v)) < 1;
        else if (!strcmp(a, "--bw-mib")) bad = (bw_mib = (size_t)atoll(v)) < 16;
        else if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--contexts")) {
            bad = parse_list(v, ctx_s, &nctx_s);
            if (!lin_given) {
                memcpy(ctx_l, ctx_s, sizeof ctx_s);
                nctx_l = nctx_s;
            }
        } else if (!strcmp(a, "--linear-contexts")) {
            bad = parse_list(v, ctx_l, &nctx_l);
            lin_given = 1;
        } else if (!strcmp(a, "--variants")) {
            run_soft = strstr(v, "softmax") != NULL;
            run_lin = strstr(v, "linear") != NULL;
            bad = !run_soft && !run_lin;
        } else bad = 1;
        if (bad) {
            fprintf(stderr,
                    "usage: bench_generate [--layers N] [--contexts LIST] [--linear-contexts LIST] [--block N]\n"
                    "                      [--decode N] [--variants softmax,linear] [--model DIR] [--bw-mib N] "
                    "[--no-lora] [--quick]\n"
                    "  LIST: comma-separated token counts, k = 1024 (e.g. 1k,8k,32k)\n");
            return 2;
        }
        i++;
    }
    if (quick) {
        layers = 2;
        ndec = 4;
        bw_mib = 1024;
        nctx_s = nctx_l = 2;
        ctx_s[0] = ctx_l[0] = 256;
        ctx_s[1] = ctx_l[1] = 1024;
    }

    char plat[512];
    tp_platform_describe(plat, sizeof plat);
    printf("platform: %s\n", plat);
    print_loadavg("at start");

    /* bandwidth first, then reset the peak so the buffer does not count */
    printf("measuring read bandwidth (%zu MiB, %d threads, best of 3)...\n", bw_mib, omp_get_max_threads());
    fflush(stdout);
    const char *bw_how;
    double bw = read_bandwidth(bw_mib, &bw_how);
    int can_reset = reset_peak() == 0;
    char l3[64] = "?";
    FILE *lf = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (lf) {
        if (!fgets(l3, sizeof l3, lf)) snprintf(l3, sizeof l3, "?");
        l3[strcspn(l3, "\n")] = 0;
        fclose(lf);
    }
    printf("memory read bandwidth: %.1f GB/s (%s loads over %zu MiB; L3 %s)\n", bw, bw_how, bw_mib, l3);

    tp_err err = {0};
    tp_hf_model *hf = NULL;
    if (!model) {
        const char *t = getenv("TMPDIR");
        if ((size_t)snprintf(tmp_dir, sizeof tmp_dir, "%s/tptt-bench-generate-XXXXXX", t && *t ? t : "/tmp") >=
                sizeof tmp_dir ||
            !mkdtemp(tmp_dir)) {
            fprintf(stderr, "bench_generate: mkdtemp %s: %s\n", tmp_dir, strerror(errno));
            return 1;
        }
        tp_model_config c = {0};
        c.arch = TP_ARCH_LLAMA;
        c.hidden = 2048; c.ffn = 8192; c.layers = layers; c.heads = 32; c.kv_heads = 8; c.head_dim = 64;
        c.vocab = 128256; c.tie_embeddings = 1; c.max_pos = 131072; c.rms_eps = 1e-5; c.rope_theta = 500000;
        c.rope_llama3 = 1; c.rope_factor = 32; c.rope_low_freq_factor = 1; c.rope_high_freq_factor = 4;
        c.rope_original_max_pos = 8192; c.bos_id = 128000; c.eos_id = 128001;
        snprintf(c.torch_dtype, sizeof c.torch_dtype, "bfloat16");
        tp_init_opts io;
        tp_init_opts_default(&io);
        io.dtype = TP_BF16;
        io.force = 1;
        printf("creating a %d-layer Llama-3.2-1B-shaped bf16 model in %s...\n", layers, tmp_dir);
        fflush(stdout);
        double t0 = now();
        if (tp_init_model(&c, &io, tmp_dir, &err)) {
            fprintf(stderr, "bench_generate: %s\n", err.msg);
            remove_tmp();
            return 1;
        }
        collect_tmp_files();
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        printf("  written in %.1f s\n", now() - t0);
        model = tmp_dir;
    }
    if (tp_hf_open(model, &hf, &err)) {
        fprintf(stderr, "bench_generate: %s\n", err.msg);
        remove_tmp();
        return 1;
    }
    const tp_model_config *mc = &hf->cfg;
    int64_t L = mc->layers, V = mc->vocab, kvd = mc->kv_heads * mc->head_dim;
    tp_mm_backend be = tp_titan_pick_matmul(hf, TP_LOAD_MATMUL_AUTO);
    double lbytes, hbytes, wbytes = weight_bytes_per_token(hf, &lbytes, &hbytes);
    /* LiZA states read per token: [Hkv, d, d] fp32 per layer */
    double sbytes = (double)L * (double)(mc->kv_heads * mc->head_dim * mc->head_dim) * 4.0;
    printf("\nmodel %s: %lld layers (of 16 in Llama-3.2-1B) + the full head; D=%lld F=%lld H=%lld Hkv=%lld d=%lld "
           "V=%lld, tied=%d\n",
           model, (long long)L, (long long)mc->hidden, (long long)mc->ffn, (long long)mc->heads,
           (long long)mc->kv_heads, (long long)mc->head_dim, (long long)V, mc->tie_embeddings);
    printf("matmul backend: %s (as infer/load.c picks it); prefill block %lld; %d timed decode steps; LoRA r=8 on "
           "q,k,v,o; LiZA delta_product, chunk 64\n",
           tp_mm_backend_name(tp_mm_backend_effective(be)), (long long)block, ndec);
    printf("decode reads per token: layers %.1f MB + head %.1f MB + LiZA states %.2f MB (+ KV cache at the "
           "context, softmax variant)\n",
           lbytes / 1e6, hbytes / 1e6, sbytes / 1e6);
    if (!can_reset) printf("note: /proc/self/clear_refs not writable: peak RSS is since the bandwidth test\n");
    printf("FIGURES ARE FOR %lld LAYERS + THE FULL HEAD (the 16-layer model reads %.0f MB per token of weights)\n",
           (long long)L, (lbytes / (double)L * 16 + hbytes) / 1e6);

    printf("\ncolumns: ctx = context tokens; prefill s and tok/s; decode ms/token and tok/s (median of %d steps);\n"
           "pf/dec = prefill tok/s / decode tok/s (= ctx x decode step / prefill time);\n"
           "read MB = bytes read per decode token; bound = bandwidth / read MB (tok/s); meas/bound = decode tok/s / "
           "bound;\n"
           "cache = tp_cache_bytes; peak = VmHWM during this context; rss = VmRSS after; anon = RssAnon (private) "
           "after; all MiB\n\n",
           ndec);
    printf("%-13s %7s %9s %9s %8s %8s %7s %8s %8s %6s %9s %8s %8s %8s\n", "variant", "ctx", "prefill s", "pf tok/s",
           "dec ms", "dec t/s", "pf/dec", "read MB", "bound", "meas/b", "cache", "peak", "rss", "anon");

    result res[2][MAX_CTX];
    int nres[2] = {0, 0};
    int rc = 0;
    int32_t *ids = NULL;
    float *logits = malloc((size_t)V * sizeof(float));
    double *steps = malloc((size_t)ndec * sizeof(double));
    int64_t maxctx = 0;
    for (int k = 0; k < nctx_s; k++) maxctx = ctx_s[k] > maxctx ? ctx_s[k] : maxctx;
    for (int k = 0; k < nctx_l; k++) maxctx = ctx_l[k] > maxctx ? ctx_l[k] : maxctx;
    ids = malloc((size_t)maxctx * sizeof(int32_t));
    if (!ids || !logits || !steps) {
        fprintf(stderr, "bench_generate: out of memory\n");
        rc = 1;
    }
    tp_rng rng;
    tp_rng_seed(&rng, 42, 7);
    for (int64_t t = 0; t < maxctx && !rc; t++) ids[t] = (int32_t)(tp_rng_next(&rng) % (uint64_t)V);

    static const char *const vname[2] = {"softmax+LiZA", "pure-linear"};
    for (int var = 0; var < 2 && !rc; var++) {
        if ((var == 0 && !run_soft) || (var == 1 && !run_lin)) continue;
        const int64_t *ctx = var ? ctx_l : ctx_s;
        int nctx = var ? nctx_l : nctx_s;
        tp_decoder_opts o;
        tp_decoder_opts_default(&o);
        o.inference = 1;
        o.matmul = be;
        o.liza.enabled = 1;
        if (no_lora) o.lora.targets = 0;
        tp_liza_preset("delta_product", &o.liza);
        o.mag.mode = TP_MAG_CONSTANT;
        o.mag.mu0 = var ? 1.0 : 0.5;
        o.mag.cross_gate = 0;
        tp_decoder *m = NULL;
        tp_infer_cache *c = NULL;
        if ((rc = tp_decoder_create(hf, &o, &m, &err))) break;
        /* warm-up: one block and one single token (oneDNN primitives, first
         * touch of the mapped weights and of the activation buffers) */
        if ((rc = tp_cache_create(m, block, &c, &err))) goto var_done;
        if (tp_cache_has_kv(c) != !var) printf("note: %s cache %s a KV cache\n", vname[var], var ? "HAS" : "lacks");
        {
            int64_t nw = block < maxctx ? block : maxctx;
            if ((rc = tp_cache_feed(c, ids, nw, NULL, logits, &err))) goto var_done;
            int32_t nx = argmax(logits, V);
            if ((rc = tp_cache_feed(c, &nx, 1, NULL, logits, &err))) goto var_done;
        }
        tp_cache_destroy(c);
        c = NULL;
        for (int k = 0; k < nctx && !rc; k++) {
            int64_t n = ctx[k];
            result *r = &res[var][nres[var]];
            r->ctx = n;
            if ((rc = tp_cache_create(m, block, &c, &err))) break;
            if ((rc = tp_cache_reserve(c, n + ndec, &err))) break;
            if (can_reset) reset_peak();
            double t0 = now();
            if ((rc = tp_cache_feed(c, ids, n, NULL, logits, &err))) break;
            r->t_prefill = now() - t0;
            int32_t nx = argmax(logits, V);
            for (int s = 0; s < ndec && !rc; s++) {
                t0 = now();
                rc = tp_cache_feed(c, &nx, 1, NULL, logits, &err);
                nx = argmax(logits, V);
                steps[s] = now() - t0;
            }
            if (rc) break;
            r->t_step = median(steps, ndec);
            read_status(&r->mem);
            r->cache_mib = (double)tp_cache_bytes(c) / 1048576.0;
            double kv = 0;
            for (int64_t l = 0; l < L; l++)
                if (tp_decoder_layer_softmax(m, (int)l)) kv += (double)n * (double)(2 * kvd * 4 + 4);
            r->bytes = wbytes + sbytes + kv;
            r->bound = bw * 1e9 / r->bytes;
            double dec = 1.0 / r->t_step;
            printf("%-13s %7lld %9.2f %9.1f %8.1f %8.2f %6.1fx %8.1f %8.2f %5.0f%% %9.1f %8.0f %8.0f %8.0f\n",
                   vname[var], (long long)n, r->t_prefill, (double)n / r->t_prefill, 1e3 * r->t_step, dec,
                   (double)n * r->t_step / r->t_prefill, r->bytes / 1e6, r->bound, 100.0 * dec / r->bound,
                   r->cache_mib, r->mem.hwm, r->mem.rss, r->mem.anon);
            fflush(stdout);
            nres[var]++;
            tp_cache_destroy(c);
            c = NULL;
        }
    var_done:
        tp_cache_destroy(c);
        tp_decoder_destroy(m);
    }
    if (rc) fprintf(stderr, "bench_generate: %s\n", err.msg);

    printf("\n");
    for (int var = 0; var < 2; var++)
        for (int k = 0; k < nres[var]; k++) {
            const result *r = &res[var][k];
            if (r->ctx != 8192) continue;
            double ratio = (double)r->ctx * r->t_step / r->t_prefill;
            printf("%s: prefill(8k) %.2f s vs 8k x decode step (%.1f ms) = %.1f s: %.1fx (target >= 10x: %s)\n",
                   vname[var], r->t_prefill, 1e3 * r->t_step, (double)r->ctx * r->t_step, ratio,
                   ratio >= 10 ? "met" : "NOT met");
        }
    if (nres[1] >= 2) {
        const result *lo = &res[1][0], *hi = &res[1][0];
        for (int k = 1; k < nres[1]; k++) {
            if (res[1][k].ctx < lo->ctx) lo = &res[1][k];
            if (res[1][k].ctx > hi->ctx) hi = &res[1][k];
        }
        double dp = 100.0 * (hi->mem.hwm / lo->mem.hwm - 1), dr = 100.0 * (hi->mem.rss / lo->mem.rss - 1);
        double da = 100.0 * (hi->mem.anon / lo->mem.anon - 1);
        printf("pure-linear: RSS at %lld vs at %lld tokens: peak %.0f vs %.0f MiB (%+.1f%%), current %.0f vs %.0f MiB "
               "(%+.1f%%), private %.0f vs %.0f MiB (%+.1f%%), cache %.2f vs %.2f MiB (target: within 5%%: %s)\n",
               (long long)hi->ctx, (long long)lo->ctx, hi->mem.hwm, lo->mem.hwm, dp, hi->mem.rss, lo->mem.rss, dr,
               hi->mem.anon, lo->mem.anon, da, hi->cache_mib, lo->cache_mib,
               dp <= 5 && dp >= -5 && dr <= 5 && dr >= -5 ? "met" : "NOT met");
    }
    print_loadavg("at end");
    free(ids);
    free(logits);
    free(steps);
    tp_hf_close(hf);
    remove_tmp();
    return rc ? 1 : 0;
}
