/* config_impl.h - private to src/train/config*.c: the enumerated values of
 * the configuration keys (NULL-terminated, in the order of the matching
 * TP_* enums where one exists), shared by the parser (config.c) and the
 * cross-field checks (config_check.c). */
#ifndef TPTT_CONFIG_IMPL_H
#define TPTT_CONFIG_IMPL_H

#define BIG (1LL << 53) /* "no upper bound" for counts (exact in double and JSON) */

extern const char *const tp_cfg_ch_trainable[];
extern const char *const tp_cfg_ch_init[];
extern const char *const tp_cfg_ch_preset[];
extern const char *const tp_cfg_ch_gate[];
extern const char *const tp_cfg_ch_trick[];
extern const char *const tp_cfg_ch_mag_mode[];
extern const char *const tp_cfg_ch_shape[];
extern const char *const tp_cfg_ch_matmul[];
extern const char *const tp_cfg_ch_format[];
extern const char *const tp_cfg_ch_long_docs[];
extern const char *const tp_cfg_ch_packing[];
extern const char *const tp_cfg_ch_bad[];
extern const char *const tp_cfg_ch_txt_unit[];
extern const char *const tp_cfg_ch_add_bos[];
extern const char *const tp_cfg_ch_sched[];

#endif
