/* rng.h - the project's deterministic random number generator.
 *
 * xoshiro256** seeded through splitmix64. Every random draw of a run (weight
 * init, LoRA init, data shuffling, dropout) comes from a tp_rng whose state is
 * four uint64 words, so it can be saved in a checkpoint and restored exactly.
 * Same seed, same sequence, on every platform. */
#ifndef TPTT_UTIL_RNG_H
#define TPTT_UTIL_RNG_H

#include <stdint.h>

typedef struct tp_rng {
    uint64_t s[4];
} tp_rng;

/* Seed from a 64-bit seed and a stream id (independent streams per purpose). */
void tp_rng_seed(tp_rng *r, uint64_t seed, uint64_t stream);
uint64_t tp_rng_next(tp_rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double tp_rng_uniform(tp_rng *r);
/* Standard normal (Box-Muller; consumes two uniforms per call). */
double tp_rng_normal(tp_rng *r);

#endif
