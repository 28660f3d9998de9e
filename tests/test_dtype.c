/* test_dtype.c - fp16/bf16 conversions.
 * fp16: against the CPU's F16C instructions (vcvtps2ph/vcvtph2ps, round to
 * nearest even), over every half value and a dense sweep of floats.
 * bf16: against the definition: the nearer of the two bf16 neighbours, ties to
 * even, computed in double. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "test.h"
#include "util/dtype.h"

__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f) {
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}
__attribute__((target("f16c"))) static float hw_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

static uint32_t bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static void test_f16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float a = tp_f16_to_f32((uint16_t)h), b = hw_f16_to_f32((uint16_t)h);
        if (bits(a) != bits(b) && !(isnan(a) && isnan(b))) bad++;
    }
    CHECK_MSG(bad == 0, "%d halves decode differently from F16C", bad);
    bad = 0;
    uint32_t first = 0;
    for (uint64_t u = 0; u < 0x100000000ull; u += 61) { /* ~70M floats, every exponent */
        float f = from_bits((uint32_t)u);
        if (isnan(f)) continue;
        if (tp_f32_to_f16(f) != hw_f32_to_f16(f)) { if (!bad++) first = (uint32_t)u; }
    }
    CHECK_MSG(bad == 0, "%d floats encode differently from F16C (first 0x%08x)", bad, first);
    CHECK(isnan(tp_f16_to_f32(tp_f32_to_f16(NAN))));
}

static int bf16_ref(float f, uint16_t got) {
    uint32_t u = bits(f);
    uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
    /* past the largest finite value the next step is 2^128 (IEEE overflow rounding) */
    double vhi = (hi & 0x7fffffffu) == 0x7f800000u ? copysign(ldexp(1.0, 128), f) : (double)from_bits(hi);
    double dlo = fabs((double)f - (double)from_bits(lo)), dhi = fabs(vhi - (double)f);
    uint16_t want;
    if ((u & 0xffffu) == 0) want = (uint16_t)(u >> 16);
    else if (dlo < dhi) want = (uint16_t)(lo >> 16);
    else if (dhi < dlo) want = (uint16_t)(hi >> 16);
    else want = (uint16_t)(((lo >> 16) & 1) ? hi >> 16 : lo >> 16);
    return want == got;
}

static void test_bf16(void) {
    int bad = 0;
    uint32_t first = 0;
    for (uint64_t u = 0; u < 0x100000000ull; u += 53) {
        float f = from_bits((uint32_t)u);
        if (isnan(f) || isinf(f)) continue;
        if (!bf16_ref(f, tp_f32_to_bf16(f))) { if (!bad++) first = (uint32_t)u; }
    }
    CHECK_MSG(bad == 0, "%d floats round to bf16 wrongly (first 0x%08x)", bad, first);
    for (uint32_t h = 0; h < 65536; h++) {
        float f = tp_bf16_to_f32((uint16_t)h);
        if (!isnan(f)) CHECK(tp_f32_to_bf16(f) == h);
    }
    CHECK(isnan(tp_bf16_to_f32(tp_f32_to_bf16(NAN))));
    CHECK(tp_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(tp_f32_to_bf16(from_bits(0x3f808000u)) == 0x3f80); /* tie to even (down) */
    CHECK(tp_f32_to_bf16(from_bits(0x3f818000u)) == 0x3f82); /* tie to even (up) */
}

static void test_bulk(void) {
    float src[5] = {1.5f, -2.25f, 0.0f, 65504.0f, 1e-3f}, back[5];
    uint16_t h[5];
    tp_from_f32(h, src, TP_F16, 5);
    tp_to_f32(back, h, TP_F16, 5);
    for (int i = 0; i < 4; i++) CHECK(back[i] == src[i]);
    tp_from_f32(h, src, TP_BF16, 5);
    tp_to_f32(back, h, TP_BF16, 5);
    for (int i = 0; i < 3; i++) CHECK(back[i] == src[i]);
    tp_dtype t;
    CHECK(tp_dtype_parse("BF16", &t) == 0 && t == TP_BF16);
    CHECK(tp_dtype_parse("I64", &t) == 1);
    CHECK(tp_dtype_parse("F17", &t) == -1);
    CHECK(tp_dtype_size(TP_F32) == 4 && tp_dtype_size(TP_BF16) == 2);
}

int main(void) {
    test_f16();
    test_bf16();
    test_bulk();
    return tp_test_report("test_dtype");
}
