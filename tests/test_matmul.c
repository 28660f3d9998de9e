/* test_matmul.c - products with frozen 16-bit weights (kernels/matmul).
 * Small-n x·Wᵀ kernel, on every ISA path this CPU can run (tp_mm_force_isa):
 * against a reference that converts the weight with tp_bf16_to_f32 /
 * tp_f16_to_f32 and multiplies in double; awkward shapes (cols not multiples of
 * the vector width, odd rows, several row blocks); overwrite and accumulate;
 * bitwise independence from the OpenMP thread count. And the bf16 backend on a
 * CPU without oneDNN bf16 (forced): falls back to f32, says so once, and gives
 * the f32 backend's results. With --onednn-avx2 (run as a child process with
 * ONEDNN_MAX_CPU_ISA=AVX2) it checks that oneDNN itself refuses bf16 there, so
 * the fallback is what an AVX2 CPU gets without any forcing. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/matmul.h"
#include "test.h"
#include "util/dtype.h"
#include "util/rng.h"

static void fill(float *a, size_t n, tp_rng *r) {
    for (size_t i = 0; i < n; i++) a[i] = (float)(2.0 * tp_rng_uniform(r) - 1.0);
}

/* y0 (+)= x·Wᵀ in double (x rounded to bf16 first with round_x); scale[i, r] = Σ|x w| (+ |y0|): the error bound of an
 * fp32 sum is relative to it, not to a result that may cancel to ~0. */
static void reference(const float *x, int64_t n, const uint16_t *w, tp_dtype dt, int64_t rows, int64_t cols,
                      const float *y0, int accumulate, int round_x, double *ref, double *scale) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t r = 0; r < rows; r++) {
            double s = 0, a = 0;
            for (int64_t c = 0; c < cols; c++) {
                uint16_t h = w[r * cols + c];
                double wv = dt == TP_BF16 ? (double)tp_bf16_to_f32(h) : (double)tp_f16_to_f32(h);
                double xv = round_x ? (double)tp_bf16_to_f32(tp_f32_to_bf16(x[i * cols + c])) : (double)x[i * cols + c];
                s += xv * wv;
                a += fabs(xv * wv);
            }
            if (accumulate) {
                s += y0[i * rows + r];
                a += fabs(y0[i * rows + r]);
            }
            ref[i * rows + r] = s;
            scale[i * rows + r] = a;
        }
}

static const int64_t COLS[] = {1, 7, 33, 257, 1000};
static const int64_t ROWS[] = {1, 3, 37}; /* 37: three row blocks, remainder rows */
/* 1..9: every group size and several groups; 33, 65: past the small-n limits
 * of the backends (TP_MM_SMALL_N_*), i.e. oneDNN and convert+sgemm */
static const int64_t NS[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 65};

/* Every shape, every n of NS, dtype, accumulate on the current ISA; via tp_mm_xwt of
 * the given matmul and via tp_mm_xwt_small directly. */
static void check_small(tp_matmul *mm, const char *what) {
    tp_rng rng;
    tp_rng_seed(&rng, 42, 7);
    const char *isa = tp_mm_isa_name(tp_mm_isa_current());
    for (int di = 0; di < 2; di++) {
        tp_dtype dt = di ? TP_F16 : TP_BF16;
        for (size_t ci = 0; ci < sizeof COLS / sizeof *COLS; ci++)
            for (size_t ri = 0; ri < sizeof ROWS / sizeof *ROWS; ri++) {
                int64_t rows = ROWS[ri], cols = COLS[ci];
                float *wf = malloc((size_t)(rows * cols) * sizeof(float));
                uint16_t *w = malloc((size_t)(rows * cols) * sizeof(uint16_t));
                fill(wf, (size_t)(rows * cols), &rng);
                tp_from_f32(w, wf, dt, (size_t)(rows * cols));
                tp_weight wt = {w, dt, rows, cols};
                for (size_t ni = 0; ni < sizeof NS / sizeof *NS; ni++)
                    for (int acc = 0; acc < 2; acc++)
                        for (int direct = 0; direct < 2; direct++) {
                            int64_t n = NS[ni];
                            float *x = malloc((size_t)(n * cols) * sizeof(float));
                            float *y = malloc((size_t)(n * rows) * sizeof(float));
                            float *y0 = malloc((size_t)(n * rows) * sizeof(float));
                            double *ref = malloc((size_t)(n * rows) * sizeof(double));
                            double *scale = malloc((size_t)(n * rows) * sizeof(double));
                            fill(x, (size_t)(n * cols), &rng);
                            fill(y0, (size_t)(n * rows), &rng);
                            memcpy(y, y0, (size_t)(n * rows) * sizeof(float));
                            /* oneDNN (bf16 backend, larger n) rounds activations to bf16 */
                            int round_x = !direct && tp_matmul_backend(mm) == TP_MM_BF16 && dt == TP_BF16 &&
                                          n > TP_MM_SMALL_N_BF16;
                            reference(x, n, w, dt, rows, cols, y0, acc, round_x, ref, scale);
                            tp_err err = {0};
                            int rc = direct ? tp_mm_xwt_small(x, n, &wt, y, acc, &err)
                                            : tp_mm_xwt(mm, x, n, &wt, y, acc, &err);
                            double worst = 0;
                            for (int64_t k = 0; k < n * rows; k++) {
                                double e = fabs((double)y[k] - ref[k]) / (scale[k] > 0 ? scale[k] : 1.0);
                                if (!(e <= worst)) worst = e; /* NaN counts as worst */
                            }
                            CHECK_MSG(rc == TP_OK && worst <= 1e-5,
                                      "%s isa=%s %s rows=%lld cols=%lld n=%lld acc=%d %s: rc %d, rel err %.3g", what,
                                      isa, tp_dtype_name(dt), (long long)rows, (long long)cols, (long long)n, acc,
                                      direct ? "xwt_small" : "xwt", rc, worst);
                            free(x);
                            free(y);
                            free(y0);
                            free(ref);
                            free(scale);
                        }
                free(wf);
                free(w);
            }
    }
}

/* Same bits with 1 and 3 threads (ROW_BLOCK rows per work item, fixed order). */
static void check_threads(void) {
    int64_t rows = 301, cols = 515, n = 5;
    tp_rng rng;
    tp_rng_seed(&rng, 3, 3);
    float *wf = malloc((size_t)(rows * cols) * sizeof(float)), *x = malloc((size_t)(n * cols) * sizeof(float));
    uint16_t *w = malloc((size_t)(rows * cols) * sizeof(uint16_t));
    float *y1 = malloc((size_t)(n * rows) * sizeof(float)), *y3 = malloc((size_t)(n * rows) * sizeof(float));
    fill(wf, (size_t)(rows * cols), &rng);
    fill(x, (size_t)(n * cols), &rng);
    tp_from_f32(w, wf, TP_BF16, (size_t)(rows * cols));
    tp_weight wt = {w, TP_BF16, rows, cols};
    tp_err err;
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    tp_mm_xwt_small(x, n, &wt, y1, 0, &err);
    omp_set_num_threads(3);
    tp_mm_xwt_small(x, n, &wt, y3, 0, &err);
    omp_set_num_threads(saved);
    CHECK_MSG(!memcmp(y1, y3, (size_t)(n * rows) * sizeof(float)), "isa=%s: 1 and 3 threads differ",
              tp_mm_isa_name(tp_mm_isa_current()));
    free(wf);
    free(x);
    free(w);
    free(y1);
    free(y3);
}

/* The bf16 backend forced to "no oneDNN bf16" (as on an AVX2 CPU): creation
 * succeeds, reports f32, prints the notice once, and both products (large n,
 * the sgemm path; small n, the kernel) equal the f32 backend's bit for bit. */
static void check_bf16_fallback(void) {
    tp_mm_force_isa(TP_ISA_AVX2);
    fflush(stderr);
    char path[] = "/tmp/test_matmul_XXXXXX";
    int fd = mkstemp(path), saved = dup(2);
    CHECK(fd >= 0 && saved >= 0);
    dup2(fd, 2);
    tp_matmul *a = NULL, *b = NULL, *f = NULL;
    tp_err err = {0};
    int rc1 = tp_matmul_create(TP_MM_BF16, &a, &err), rc2 = tp_matmul_create(TP_MM_BF16, &b, &err);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char text[1024] = {0};
    ssize_t got = pread(fd, text, sizeof text - 1, 0);
    close(fd);
    unlink(path);
    const char *line = "tptt: notice: compute.matmul=bf16: oneDNN has no bf16 matmul on this CPU (no AVX512_BF16); "
                       "using f32 sgemm\n";
    CHECK_MSG(got == (ssize_t)strlen(line) && !strcmp(text, line), "stderr was '%s'", text);
    CHECK(rc1 == TP_OK && rc2 == TP_OK);
    CHECK(tp_matmul_create(TP_MM_F32, &f, &err) == TP_OK);
    CHECK(a && tp_matmul_backend(a) == TP_MM_F32);
    CHECK(tp_mm_backend_effective(TP_MM_BF16) == TP_MM_F32);
    if (!a || !f) goto out;
    int64_t rows = 67, cols = 129;
    tp_rng rng;
    tp_rng_seed(&rng, 5, 5);
    float *wf = malloc((size_t)(rows * cols) * sizeof(float));
    uint16_t *w = malloc((size_t)(rows * cols) * sizeof(uint16_t));
    float *x = malloc((size_t)(100 * cols) * sizeof(float)), *dy = malloc((size_t)(100 * rows) * sizeof(float));
    float *ya = malloc((size_t)(100 * cols) * sizeof(float)), *yf = malloc((size_t)(100 * cols) * sizeof(float));
    fill(wf, (size_t)(rows * cols), &rng);
    fill(x, (size_t)(100 * cols), &rng);
    fill(dy, (size_t)(100 * rows), &rng);
    tp_from_f32(w, wf, TP_BF16, (size_t)(rows * cols));
    tp_weight wt = {w, TP_BF16, rows, cols};
    int64_t ns[] = {1, 100}; /* the kernel; sgemm (n > TP_MM_SMALL_N_F32) */
    for (int k = 0; k < 2; k++) {
        int64_t n = ns[k];
        int ra = tp_mm_xwt(a, x, n, &wt, ya, 0, &err), rf = tp_mm_xwt(f, x, n, &wt, yf, 0, &err);
        CHECK_MSG(ra == TP_OK && rf == TP_OK && !memcmp(ya, yf, (size_t)(n * rows) * sizeof(float)),
                  "xwt n=%lld: forced-fallback bf16 differs from f32", (long long)n);
        ra = tp_mm_dyw(a, dy, n, &wt, ya, 0, &err);
        rf = tp_mm_dyw(f, dy, n, &wt, yf, 0, &err);
        CHECK_MSG(ra == TP_OK && rf == TP_OK && !memcmp(ya, yf, (size_t)(n * cols) * sizeof(float)),
                  "dyw n=%lld: forced-fallback bf16 differs from f32", (long long)n);
    }
    free(wf);
    free(w);
    free(x);
    free(dy);
    free(ya);
    free(yf);
out:
    tp_matmul_destroy(a);
    tp_matmul_destroy(b);
    tp_matmul_destroy(f);
    tp_mm_force_isa(-1);
}

/* Child: oneDNN limited to AVX2 by its own variable; nothing forced here. */
static int onednn_avx2_child(void) {
    tp_matmul *mm = NULL;
    tp_err err = {0};
    CHECK(tp_mm_backend_effective(TP_MM_BF16) == TP_MM_F32);
    CHECK(tp_matmul_create(TP_MM_BF16, &mm, &err) == TP_OK && tp_matmul_backend(mm) == TP_MM_F32);
    tp_matmul_destroy(mm);
    return tp_test_report("test_matmul --onednn-avx2");
}

static void check_onednn_avx2(const char *self) {
    pid_t pid = fork();
    if (pid == 0) {
        setenv("ONEDNN_MAX_CPU_ISA", "AVX2", 1);
        setenv("DNNL_MAX_CPU_ISA", "AVX2", 1);
        execl(self, self, "--onednn-avx2", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid);
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child with ONEDNN_MAX_CPU_ISA=AVX2 failed (status %d)", st);
}

/* tp_mm_to_bf16 gives tp_f32_to_bf16's bits on every ISA: every exponent
 * with random mantissas, ties (both parities), NaN payloads, ±inf, ±0,
 * subnormals and the largest finite values (which round to inf), at lengths
 * that leave tails */
static void check_to_bf16(void) {
    size_t n = 256 * 4099 + 37;
    uint32_t *bits = malloc(n * sizeof *bits);
    uint16_t *got = malloc(n * sizeof *got);
    if (!bits || !got) { CHECK(0); free(bits); free(got); return; }
    uint64_t st = 99;
    for (size_t i = 0; i < n; i++) {
        st = st * 6364136223846793005ULL + 1442695040888963407ULL;
        uint32_t r = (uint32_t)(st >> 32), e = (uint32_t)(i % 256) << 23, sign = (r & 1u) << 31;
        switch (i % 7) {
        case 0: bits[i] = sign | e | (r >> 9); break;                        /* any value of that exponent */
        case 1: bits[i] = sign | e | ((r >> 9) & ~0xffffu) | 0x8000u; break; /* a tie */
        case 2: bits[i] = sign | 0x7f800000u | ((r >> 9) | 1u); break;        /* NaN (payload, sign) */
        case 3: bits[i] = sign | (r >> 9); break;                             /* subnormal or zero */
        case 4: bits[i] = sign | 0x7f7f8000u | ((r >> 9) & 0x7fffu); break;  /* rounds to inf or not */
        case 5: bits[i] = i & 8 ? 0x7f800000u : 0xff800000u; break;           /* ±inf */
        default: bits[i] = sign | e | 0x7fffu; break;                         /* just below a tie */
        }
    }
    const float *f = (const float *)(const void *)bits;
    for (int isa = TP_ISA_AVX512; isa >= TP_ISA_SCALAR; isa--) {
        if (tp_mm_force_isa(isa) != (tp_mm_isa)isa) continue;
        size_t lens[] = {0, 1, 15, 16, 17, 16383, 16385, n};
        for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
            memset(got, 0xa5, n * sizeof *got);
            tp_mm_to_bf16(got, f, lens[k]);
            size_t bad = 0, first = 0;
            for (size_t i = 0; i < lens[k]; i++)
                if (got[i] != tp_f32_to_bf16(f[i]) && bad++ == 0) first = i;
            CHECK_MSG(bad == 0, "isa %s n %zu: %zu values differ, first %08x -> %04x, want %04x",
                      tp_mm_isa_name((tp_mm_isa)isa), lens[k], bad, bits[first], got[first],
                      tp_f32_to_bf16(f[first]));
            CHECK(lens[k] == n || got[lens[k]] == 0xa5a5); /* nothing written past n */
        }
    }
    tp_mm_force_isa(-1);
    free(bits);
    free(got);
}

/* The f32 backend's weight conversion, on a bf16 weight past the 16 MB above
 * which it streams (AVX2/AVX-512): dY·W is bit for bit tp_sgemm of the weight
 * converted with tp_bf16_to_f32 (x·Wᵀ widens through the same weight_f32,
 * and n <= 64 would take the small-n kernel instead). Odd shape: a
 * remainder after the last 8 lanes, signed subnormals among the weights. */
static void check_large_convert(const char *what) {
    const int64_t rows = 2053, cols = 2047, n = 3, sz = rows * cols;
    uint16_t *w = malloc((size_t)sz * sizeof *w);
    float *wf = malloc((size_t)sz * sizeof *wf), *x = malloc((size_t)(n * rows) * sizeof *x);
    float *got = malloc((size_t)(n * cols) * sizeof *got), *want = malloc((size_t)(n * cols) * sizeof *want);
    tp_matmul *mm = NULL;
    tp_err err = {0};
    if (!w || !wf || !x || !got || !want || tp_matmul_create(TP_MM_F32, &mm, &err) != TP_OK) {
        CHECK(0);
    } else {
        tp_rng r;
        tp_rng_seed(&r, 11, 0);
        for (int64_t i = 0; i < sz; i++) /* finite (a NaN would make every output NaN), some subnormal */
            w[i] = i % 97 ? tp_f32_to_bf16((float)(2.0 * tp_rng_uniform(&r) - 1.0)) : (uint16_t)(0x8000 | (i & 0x7f));
        for (int64_t i = 0; i < sz; i++) wf[i] = tp_bf16_to_f32(w[i]);
        fill(x, (size_t)(n * rows), &r);
        tp_weight W = {w, TP_BF16, rows, cols};
        int rc = tp_mm_dyw(mm, x, n, &W, got, 0, &err);
        tp_sgemm(0, 0, n, cols, rows, 1.0f, x, rows, wf, cols, 0.0f, want, cols);
        CHECK_MSG(rc == TP_OK && !memcmp(got, want, (size_t)(n * cols) * sizeof(float)),
                  "%s: dY·W with a %lld x %lld bf16 weight differs from sgemm of its scalar conversion", what,
                  (long long)rows, (long long)cols);
    }
    tp_matmul_destroy(mm);
    free(w);
    free(wf);
    free(x);
    free(got);
    free(want);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--onednn-avx2")) return onednn_avx2_child();
    check_to_bf16();
    /* the environment must not pick the path: each is forced below */
    if (getenv("TPTT_ISA")) printf("note: TPTT_ISA=%s caps the paths tested\n", getenv("TPTT_ISA"));
    check_bf16_fallback();
    tp_mm_isa hw = tp_mm_force_isa(-1);
    for (int isa = TP_ISA_AVX512; isa >= TP_ISA_SCALAR; isa--) {
        if (tp_mm_force_isa(isa) != (tp_mm_isa)isa) {
            printf("skip isa %s: this CPU (or TPTT_ISA) allows at most %s\n", tp_mm_isa_name((tp_mm_isa)isa),
                   tp_mm_isa_name(hw));
            continue;
        }
        int before = tp_test_fail;
        for (int be = 0; be < 2; be++) {
            tp_matmul *mm = NULL;
            tp_err err = {0};
            if (tp_matmul_create(be ? TP_MM_BF16 : TP_MM_F32, &mm, &err) != TP_OK) {
                CHECK_MSG(0, "tp_matmul_create: %s", err.msg);
                continue;
            }
            check_small(mm, be ? "backend bf16" : "backend f32");
            tp_matmul_destroy(mm);
        }
        check_threads();
        check_large_convert(tp_mm_isa_name((tp_mm_isa)isa));
        printf("isa %s: %s\n", tp_mm_isa_name((tp_mm_isa)isa), tp_test_fail == before ? "ok" : "FAILED");
    }
    tp_mm_force_isa(-1);
    check_onednn_avx2("/proc/self/exe");
    return tp_test_report("test_matmul");
}
