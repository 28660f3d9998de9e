/* jsonint.h - a JSON number (cJSON holds it as a double) to an integer.
 *
 * Every reader that takes an integer out of a file goes through this: it
 * checks that the number is finite, integral and in [lo, hi] BEFORE
 * converting, because converting a double outside the target type's range is
 * undefined behaviour in C (the fuzzers found it twice). Callers keep their
 * own error messages; this only answers yes or no. */
#ifndef TPTT_UTIL_JSONINT_H
#define TPTT_UTIL_JSONINT_H

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>

/* 1 and *out = x's value when x is a JSON number that is an integer in
 * [lo, hi] with |value| < 2^63; 0 otherwise, *out untouched. x may be
 * NULL. Numbers past 2^53 are not all exact in JSON: readers that need
 * exact values bound hi by 2^53 themselves. */
static inline int tp_json_int(const cJSON *x, int64_t lo, int64_t hi, int64_t *out) {
    if (!cJSON_IsNumber(x)) return 0;
    double v = x->valuedouble;
    if (!isfinite(v) || v != floor(v) || !(fabs(v) < 9223372036854775808.0)) return 0;
    int64_t i = (int64_t)v; /* |v| < 2^63: exact */
    if (i < lo || i > hi) return 0;
    *out = i;
    return 1;
}

#endif
