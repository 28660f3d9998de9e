#include "model/run_json.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "kernels/liza.h"
#include "kernels/liza_gates.h"

int tp_abs_path(const char *path, char *out, size_t n) {
    char buf[PATH_MAX];
    if (!path || !*path) return -1;
    if (realpath(path, buf)) return snprintf(out, n, "%s", buf) < (int)n ? 0 : -1;
    if (path[0] == '/') return snprintf(out, n, "%s", path) < (int)n ? 0 : -1;
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return -1;
    return snprintf(out, n, "%s/%s", cwd, path) < (int)n ? 0 : -1;
}

char *tp_run_config_json(const char *model_dir, const tp_model_config *mc, const tp_decoder_opts *o,
                         tp_mm_backend used, int64_t step) {
    return tp_run_config_json_hub(model_dir, NULL, mc, o, used, step);
}

/* config.json of a checkpoint of this run (FORMATS.md names) */
char *tp_run_config_json_hub(const char *model_dir, const char *hub_id, const tp_model_config *mc,
                             const tp_decoder_opts *o, tp_mm_backend used, int64_t step) {
    char abs[PATH_MAX + 1];
    if (tp_abs_path(model_dir, abs, sizeof abs) != 0) snprintf(abs, sizeof abs, "%s", model_dir);
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "model_type", "tptt");
    /* the Python TPTT package's name for the base, and ours: both the
     * absolute path (a run dir read from elsewhere still finds its base) */
    cJSON_AddStringToObject(c, "base_model_name", abs);
    cJSON_AddStringToObject(c, "base_model_path", abs);
    if (hub_id && *hub_id) cJSON_AddStringToObject(c, "base_model_hub_id", hub_id);
    cJSON_AddStringToObject(c, "base_model_architecture", tp_arch_class(mc->arch));
    static const char *const gates[] = {"c", "k", "v", "kv"}, *const tricks[] = {"dt", "rot", "rdt"};
    static const char *const modes[] = {"constant", "gradual", "cyclic", "learnable"};
    const tp_liza_opts *lo = &o->liza;
    const tp_mag_opts *mg = &o->mag;
    cJSON_AddBoolToObject(c, "liza_enabled", lo->enabled);
    const char *preset = tp_liza_preset_name(lo);
    if (preset) cJSON_AddStringToObject(c, "operator_mode", preset);
    else cJSON_AddNullToObject(c, "operator_mode");
    cJSON *rcfg = cJSON_AddObjectToObject(c, "recurrent_config");
    cJSON_AddNumberToObject(rcfg, "order", lo->order);
    cJSON_AddStringToObject(rcfg, "alpha_gate", gates[lo->alpha_gate]);
    cJSON_AddStringToObject(rcfg, "beta_gate", gates[lo->beta_gate]);
    cJSON_AddBoolToObject(rcfg, "linear", lo->linear);
    cJSON_AddStringToObject(rcfg, "trick", tricks[lo->trick]);
    cJSON_AddNumberToObject(c, "max_chunk_size", lo->chunk);
    cJSON_AddBoolToObject(c, "base_scale_attn", lo->base_scale_attn);
    /* ONE μ: "mag_weight" is the μ the model uses at this checkpoint's step
     * (the schedule's value there; learnable: σ of the initial logit, the
     * trained logits being in liza_model.safetensors); the schedule's start
     * is "mag_mu0" (readers take "mag_weight" as μ0 only when "mag_mu0" is
     * absent, as in checkpoints written before this rule) */
    cJSON_AddNumberToObject(c, "mag_weight", tp_mag_mu(mg, step));
    cJSON_AddNumberToObject(c, "mag_mu0", mg->mu0);
    cJSON_AddBoolToObject(c, "cross_gate", mg->cross_gate);
    cJSON_AddStringToObject(c, "mag_mode", modes[mg->mode]);
    cJSON_AddNumberToObject(c, "mag_mu1", mg->mu1);
    cJSON_AddNumberToObject(c, "mag_steps", (double)mg->steps);
    cJSON *vals = cJSON_AddArrayToObject(c, "mag_values");
    for (int i = 0; i < mg->nvalues; i++) cJSON_AddItemToArray(vals, cJSON_CreateNumber(mg->values[i]));
    cJSON_AddNumberToObject(c, "mag_period", (double)mg->period);
    cJSON_AddStringToObject(c, "mag_learnable_shape", mg->vector ? "vector" : "scalar");
    cJSON_AddNumberToObject(c, "mag_step", (double)step);
    cJSON_AddStringToObject(c, "trainable", tp_trainable_name(o->trainable));
    cJSON_AddStringToObject(c, "compute_matmul", tp_mm_backend_name(used));
    cJSON_AddBoolToObject(c, "recompute", o->recompute);
    cJSON_AddNumberToObject(c, "seed", (double)o->seed);
    cJSON *l = cJSON_AddObjectToObject(c, "lora_config");
    cJSON_AddStringToObject(l, "peft_type", "LORA");
    cJSON_AddNumberToObject(l, "r", o->lora.r);
    cJSON_AddNumberToObject(l, "lora_alpha", o->lora.alpha);
    cJSON_AddNumberToObject(l, "lora_dropout", o->lora.dropout);
    cJSON *t = cJSON_AddArrayToObject(l, "target_modules");
    for (int j = 0; j < TP_NMOD; j++)
        if ((o->lora.targets >> j) & 1) cJSON_AddItemToArray(t, cJSON_CreateString(tp_module_names[j]));
    cJSON_AddBoolToObject(l, "use_rslora", o->lora.rslora);
    cJSON_AddStringToObject(l, "init", o->lora.init_random ? "random" : "default");
    char *s = cJSON_PrintUnformatted(c);
    cJSON_Delete(c);
    return s;
}

char *tp_adapter_config_json(const tp_decoder_opts *o, const char *base_model_path) {
    /* keys sorted, as PEFT writes them */
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "base_model_name_or_path", base_model_path);
    cJSON_AddStringToObject(c, "bias", "none");
    cJSON_AddBoolToObject(c, "fan_in_fan_out", 0);
    cJSON_AddBoolToObject(c, "inference_mode", 1);
    cJSON_AddNumberToObject(c, "lora_alpha", o->lora.alpha);
    cJSON_AddNumberToObject(c, "lora_dropout", o->lora.dropout);
    cJSON_AddStringToObject(c, "peft_type", "LORA");
    cJSON_AddNumberToObject(c, "r", o->lora.r);
    cJSON *t = cJSON_AddArrayToObject(c, "target_modules");
    for (int j = 0; j < TP_NMOD; j++)
        if ((o->lora.targets >> j) & 1) cJSON_AddItemToArray(t, cJSON_CreateString(tp_module_names[j]));
    cJSON_AddStringToObject(c, "task_type", "CAUSAL_LM");
    cJSON_AddBoolToObject(c, "use_rslora", o->lora.rslora);
    char *s = cJSON_Print(c);
    cJSON_Delete(c);
    return s;
}
