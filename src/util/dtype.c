#include "util/dtype.h"

#include <string.h>

size_t tp_dtype_size(tp_dtype t) { return t == TP_F32 ? 4 : 2; }

const char *tp_dtype_name(tp_dtype t) {
    switch (t) {
    case TP_F32: return "F32";
    case TP_F16: return "F16";
    case TP_BF16: return "BF16";
    }
    return "?";
}

int tp_dtype_parse(const char *s, tp_dtype *out) {
    if (!strcmp(s, "F32")) { *out = TP_F32; return 0; }
    if (!strcmp(s, "F16")) { *out = TP_F16; return 0; }
    if (!strcmp(s, "BF16")) { *out = TP_BF16; return 0; }
    static const char *known[] = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64",
                                  "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3",
                                  "F6_E3M2", "C64"};
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (!strcmp(s, known[i])) return 1;
    return -1;
}

float tp_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400u)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    union { uint32_t u; float f; } v = {.u = bits};
    return v.f;
}

uint16_t tp_f32_to_f16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    uint32_t x = v.u, sign = (x >> 16) & 0x8000u;
    int32_t exp = (int32_t)((x >> 23) & 0xffu);
    uint32_t mant = x & 0x7fffffu;
    if (exp == 255) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    int32_t e = exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) { /* subnormal or zero in half */
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++; /* may carry into exp: correct */
    return (uint16_t)half;
}

void tp_to_f32(float *dst, const void *src, tp_dtype t, size_t n) {
    if (n == 0) return; /* views of zero-sized tensors have data == NULL */
    const uint16_t *h = src;
    switch (t) {
    case TP_F32: memcpy(dst, src, n * sizeof(float)); break;
    case TP_BF16: for (size_t i = 0; i < n; i++) dst[i] = tp_bf16_to_f32(h[i]); break;
    case TP_F16: for (size_t i = 0; i < n; i++) dst[i] = tp_f16_to_f32(h[i]); break;
    }
}

void tp_from_f32(void *dst, const float *src, tp_dtype t, size_t n) {
    if (n == 0) return;
    uint16_t *h = dst;
    switch (t) {
    case TP_F32: memcpy(dst, src, n * sizeof(float)); break;
    case TP_BF16: for (size_t i = 0; i < n; i++) h[i] = tp_f32_to_bf16(src[i]); break;
    case TP_F16: for (size_t i = 0; i < n; i++) h[i] = tp_f32_to_f16(src[i]); break;
    }
}
