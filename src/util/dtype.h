/* dtype.h - element types of tensors in files and scalar conversions.
 *
 * Supported storage types are the three safetensors dtypes our models use:
 * F32, F16, BF16. Conversions round to nearest even (what torch does). */
#ifndef TPTT_UTIL_DTYPE_H
#define TPTT_UTIL_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum tp_dtype { TP_F32 = 0, TP_F16 = 1, TP_BF16 = 2 } tp_dtype;

size_t tp_dtype_size(tp_dtype t);
const char *tp_dtype_name(tp_dtype t); /* "F32", "F16", "BF16" */
/* Parse a safetensors dtype string. Returns 0 and sets *out for supported
 * types, 1 for a known safetensors dtype we do not support (F64, I32, ...),
 * -1 for a string that is no safetensors dtype at all. */
int tp_dtype_parse(const char *s, tp_dtype *out);

static inline float tp_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline uint16_t tp_f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* quiet NaN */
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}

float tp_f16_to_f32(uint16_t h);
uint16_t tp_f32_to_f16(float f);

/* Convert n elements of type t at src to fp32. */
void tp_to_f32(float *dst, const void *src, tp_dtype t, size_t n);
/* Convert n fp32 values to type t (rounding to nearest even). */
void tp_from_f32(void *dst, const float *src, tp_dtype t, size_t n);

#endif
