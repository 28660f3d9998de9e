/* run_json.h - the JSON files that describe a run's model: the
 * checkpoint's config.json (FORMATS.md: the Python TPTT package's field
 * names, plus ours) and PEFT's adapter_config.json. Shared by `tptt dump`
 * and the trainer so both write the same thing. Results are malloc'ed
 * (caller frees); NULL on allocation failure. */
#ifndef TPTT_MODEL_RUN_JSON_H
#define TPTT_MODEL_RUN_JSON_H

#include <stdint.h>

#include "kernels/matmul.h"
#include "model/decoder.h"
#include "model/hf_config.h"

/* used: the backend that really ran; step: the training step (MaG schedules) */
char *tp_run_config_json(const char *model_dir, const tp_model_config *mc, const tp_decoder_opts *o,
                         tp_mm_backend used, int64_t step);
/* PEFT adapter_config.json for o's LoRA settings */
char *tp_adapter_config_json(const tp_decoder_opts *o, const char *base_model_path);

#endif
