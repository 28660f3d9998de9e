#include "util/platform.h"

#include <cblas.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cpuid.h>

void tp_cpu_detect(tp_cpu_features *f) {
    memset(f, 0, sizeof *f);
    __builtin_cpu_init();
    f->avx2 = !!__builtin_cpu_supports("avx2");
    f->avx512f = !!__builtin_cpu_supports("avx512f");
    f->avx512bw = !!__builtin_cpu_supports("avx512bw");
    unsigned a, b, c, d;
    /* AVX512_BF16: CPUID leaf 7 sub-leaf 1, EAX bit 5 */
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f->avx512_bf16 = (a >> 5) & 1;
    /* the OS must also save the AVX-512 state, which cpu_supports checks for avx512f */
    if (!f->avx512f) f->avx512_bf16 = 0;
}

void tp_maybe_reexec_for_blas(int argc, char **argv) {
    (void)argc;
    if (getenv("TPTT_NO_REEXEC")) return;
    int change = 0;
    tp_cpu_features f;
    tp_cpu_detect(&f);
    if (!getenv("OPENBLAS_CORETYPE") && f.avx512f && f.avx512bw) {
        setenv("OPENBLAS_CORETYPE", "SKYLAKEX", 1);
        change = 1;
    }
    /* libgomp's default wait policy (spin a while, then sleep) made a tiny
     * training step 40x slower than either explicit policy on a 2-vCPU VM;
     * PASSIVE also behaves when MPI ranks outnumber cores */
    if (!getenv("OMP_WAIT_POLICY")) {
        setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
        change = 1;
    }
    if (!change) return;
    setenv("TPTT_NO_REEXEC", "1", 1); /* never loop */
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the libraries' defaults */
}

static const char *isa_name(dnnl_cpu_isa_t isa) {
    switch ((int)isa) {
    case dnnl_cpu_isa_all: return "all";
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    default: return "other";
    }
}

/* OPENBLAS_VERSION is " OpenBLAS 0.3.21 ": keep the number only */
static const char *blas_version(void) {
    static char v[32];
    const char *s = OPENBLAS_VERSION, *p = strstr(s, "OpenBLAS");
    snprintf(v, sizeof v, "%s", p ? p + 9 : s);
    for (char *q = v + strlen(v); q > v && q[-1] == ' '; q--) q[-1] = 0;
    return v;
}

void tp_platform_describe(char *buf, unsigned long n) {
    tp_cpu_features f;
    tp_cpu_detect(&f);
    const dnnl_version_t *v = dnnl_version();
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    /* oneDNN reports "all" when no limit is set: it dispatches to the best the
     * CPU has, which for bf16 matmul is avx512_core_bf16 when present */
    const char *eff = isa == dnnl_cpu_isa_all
                          ? (f.avx512_bf16 ? "avx512_core_bf16" : f.avx512f ? "avx512_core" : f.avx2 ? "avx2" : "sse41")
                          : isa_name(isa);
    snprintf(buf, n, "OpenBLAS %s, core %s (OPENBLAS_CORETYPE=%s); oneDNN %d.%d.%d ISA %s; OpenMP threads %d (OMP_WAIT_POLICY=%s); CPU avx2=%d avx512f=%d avx512_bf16=%d",
             blas_version(), openblas_get_corename(), getenv("OPENBLAS_CORETYPE") ? getenv("OPENBLAS_CORETYPE") : "unset",
             v->major, v->minor, v->patch, eff, omp_get_max_threads(),
             getenv("OMP_WAIT_POLICY") ? getenv("OMP_WAIT_POLICY") : "unset", f.avx2, f.avx512f, f.avx512_bf16);
}

void tp_advise_huge(void *p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (!p || bytes < 2 * huge) return;
    uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (e > a) (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}
