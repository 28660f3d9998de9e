/* test_model.h - a small random F32 model written to a directory and opened
 * (tp_init_model + tp_hf_open), for the C tests that need a real model
 * directory (std < 0: init-model's default std). The caller owns the returned model (tp_hf_close); NULL, with
 * the error on stderr, when either step fails. */
#ifndef TPTT_TESTS_TEST_MODEL_H
#define TPTT_TESTS_TEST_MODEL_H

#include <stdio.h>

#include "io/hf_model.h"
#include "model/init_model.h"

static inline tp_hf_model *tp_test_model(const char *path, const tp_model_config *c, double std, uint64_t seed) {
    tp_init_opts o;
    tp_init_opts_default(&o);
    o.dtype = TP_F32;
    if (std >= 0) o.std = std;
    o.seed = seed;
    o.force = 1;
    tp_err err = {0};
    if (tp_init_model(c, &o, path, &err)) { fprintf(stderr, "%s\n", err.msg); return NULL; }
    tp_hf_model *m;
    if (tp_hf_open(path, &m, &err)) { fprintf(stderr, "%s\n", err.msg); return NULL; }
    return m;
}

#endif
