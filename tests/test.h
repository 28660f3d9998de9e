/* test.h - the smallest test harness: CHECK records a failure and goes on;
 * main returns tp_test_report(), which prints "N passed, N failed". */
#ifndef TPTT_TESTS_TEST_H
#define TPTT_TESTS_TEST_H

#include <stdio.h>

static int tp_test_pass, tp_test_fail;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (cond) tp_test_pass++;                                                    \
        else {                                                                       \
            tp_test_fail++;                                                          \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_MSG(cond, ...)                                                  \
    do {                                                                      \
        if (cond) tp_test_pass++;                                             \
        else {                                                                \
            tp_test_fail++;                                                   \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)

static inline int tp_test_report(const char *name) {
    printf("%s: %d passed, %d failed\n", name, tp_test_pass, tp_test_fail);
    return tp_test_fail ? 1 : 0;
}

#endif
