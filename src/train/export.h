/* export.h - write the trained model as a plain Hugging Face model directory:
 * every weight with its training applied (trainable full weights from theta,
 * LoRA merged as W + s·B·A), modified tensors in F32, untouched ones copied in
 * their stored dtype; config.json and tokenizer files copied from the base.
 * The LiZA branch and MaG are not part of a plain HF model: export is for
 * pretraining tiny bases (`trainable: all`) and for merged-LoRA checkpoints. */
#ifndef TPTT_TRAIN_EXPORT_H
#define TPTT_TRAIN_EXPORT_H

#include "io/hf_model.h"
#include "model/decoder.h"

int tp_export_model(const tp_hf_model *base, tp_decoder *m, const char *out_dir, tp_err *err);

#endif
