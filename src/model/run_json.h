/* run_json.h - the JSON files that describe a run's model: the
 * checkpoint's config.json (FORMATS.md: the Python TPTT package's field
 * names, plus ours) and PEFT's adapter_config.json. Shared by `tptt dump`
 * and the trainer so both write the same thing. Results are malloc'ed
 * (caller frees); NULL on allocation failure. */
#ifndef TPTT_MODEL_RUN_JSON_H
#define TPTT_MODEL_RUN_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/matmul.h"
#include "model/decoder.h"
#include "model/hf_config.h"

/* used: the backend that really ran; step: the training step (MaG schedules).
 * The base is recorded as an absolute path ("base_model_name", the Python
 * TPTT package's field, and "base_model_path"); "mag_weight" is the μ the
 * model uses at `step`, "mag_mu0" the schedule's start. */
char *tp_run_config_json(const char *model_dir, const tp_model_config *mc, const tp_decoder_opts *o,
                         tp_mm_backend used, int64_t step);
/* The same with the base's Hub id ("base_model_hub_id", omitted when NULL/""). */
char *tp_run_config_json_hub(const char *model_dir, const char *hub_id, const tp_model_config *mc,
                             const tp_decoder_opts *o, tp_mm_backend used, int64_t step);
/* path made absolute (realpath when it exists, else joined to the working
 * directory); 0 on success, -1 when it does not fit in n. */
int tp_abs_path(const char *path, char *out, size_t n);
/* PEFT adapter_config.json for o's LoRA settings */
char *tp_adapter_config_json(const tp_decoder_opts *o, const char *base_model_path);

#endif
