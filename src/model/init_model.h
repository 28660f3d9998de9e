/* init_model.h - write a Hugging Face-layout model with seeded random weights.
 *
 * Nothing can be downloaded where tests and demos run, so they make their own
 * base models. Weights: matrices, embeddings and biases ~ N(0, std); RMSNorm
 * weights ~ 1 + N(0, norm_std) (not exactly 1, so that a forward pass that
 * forgot a norm weight fails the oracle tests). Each block of 2^20 elements of
 * a tensor draws from its own RNG stream (seed, stream (tensor index + 1) |
 * (block << 40)), so the values depend neither on the sharding nor on the
 * number of OpenMP threads that generate them (blocks are filled in parallel). */
#ifndef TPTT_MODEL_INIT_MODEL_H
#define TPTT_MODEL_INIT_MODEL_H

#include <stdint.h>

#include "model/hf_config.h"
#include "util/dtype.h"
#include "util/err.h"

typedef struct tp_init_opts {
    tp_dtype dtype;   /* storage type of every tensor */
    int shards;       /* 1 = model.safetensors; >1 = shards + index */
    uint64_t seed;
    double std;       /* default 0.02 */
    double norm_std;  /* default 0.1 */
    int force;        /* overwrite an existing model in out_dir */
} tp_init_opts;

void tp_init_opts_default(tp_init_opts *o);

/* Write config.json and the weights of c into out_dir (created if needed). */
int tp_init_model(const tp_model_config *c, const tp_init_opts *o, const char *out_dir, tp_err *err);

#endif
