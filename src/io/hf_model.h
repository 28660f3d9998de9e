/* hf_model.h - a Hugging Face model directory, opened read-only.
 *
 * Reads config.json, then model.safetensors or the shards named by
 * model.safetensors.index.json, maps every shard read-only and checks that
 * every tensor the config implies is present with the right shape and a
 * supported dtype. After a successful open, views[i] holds desc[i] for every
 * expected tensor.
 *
 * Ownership: the tp_hf_model owns its maps; views stay valid until
 * tp_hf_close(). */
#ifndef TPTT_IO_HF_MODEL_H
#define TPTT_IO_HF_MODEL_H

#include "io/safetensors.h"
#include "model/hf_config.h"

typedef struct tp_hf_model {
    char *dir;
    tp_model_config cfg;
    size_t nfiles;
    tp_st_file **files;      /* one per shard (one when unsharded) */
    int sharded;             /* opened through model.safetensors.index.json */
    size_t nweights;
    tp_weight_desc *desc;    /* expected tensors, tp_model_weights() order */
    const tp_tensor_view **views; /* views[i] holds desc[i] */
    const tp_st_file **owner;     /* the shard holding desc[i] */
    uint64_t weight_bytes;   /* bytes of the expected tensors */
    uint64_t file_bytes;     /* bytes of all safetensors files */
} tp_hf_model;

int tp_hf_open(const char *dir, tp_hf_model **out, tp_err *err);
void tp_hf_close(tp_hf_model *m);

#endif
