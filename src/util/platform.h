/* platform.h - what the CPU and the numeric libraries offer, and picking the
 * best BLAS kernels without the user knowing.
 *
 * Debian's OpenBLAS 0.3.21 detects AVX-512 Zen CPUs as Haswell; forcing the
 * SkylakeX kernels (OPENBLAS_CORETYPE) doubles sgemm. The variable is read when
 * libopenblas loads, i.e. before main(), so tptt sets it and re-executes itself
 * once at start-up (before MPI_Init, so mpirun never sees a new process). */
#ifndef TPTT_UTIL_PLATFORM_H
#define TPTT_UTIL_PLATFORM_H

#include <stddef.h>

typedef struct tp_cpu_features {
    int avx2, avx512f, avx512bw, avx512_bf16;
} tp_cpu_features;

void tp_cpu_detect(tp_cpu_features *f);

/* Before anything else in main(): if the CPU has AVX-512 and
 * OPENBLAS_CORETYPE is unset, set it to SKYLAKEX; if OMP_WAIT_POLICY is unset,
 * set it to PASSIVE; if either changed, exec /proc/self/exe with the same argv
 * (both are read when the libraries load). Returns only if no re-exec
 * happened or it failed (then the libraries' defaults apply). TPTT_NO_REEXEC
 * disables it. */
void tp_maybe_reexec_for_blas(int argc, char **argv);

/* Advise the kernel to back the 2 MiB-aligned part of a large, not yet
 * touched buffer [p, p + bytes) with transparent huge pages (Linux
 * MADV_HUGEPAGE; a no-op below 4 MiB, elsewhere, or where THP is off).
 * Rows of one head lie H·d floats apart in the activations, so a chunk's
 * rows touch a new 4 KiB page each; with huge pages the LiZA kernel ran
 * 4-10% faster (bench/README.md). Advice only: nothing to check or free. */
void tp_advise_huge(void *p, size_t bytes);

/* One line describing the BLAS core, oneDNN ISA, OpenMP threads and CPU flags. */
void tp_platform_describe(char *buf, unsigned long n);

#endif
