/* optim_bf16_impl.h -- the bfloat16 storage layouts (fastbn_optim_bf16_layout).
 * Included by optim_kernels.c after the float sections: each layout
 * instantiates optim_impl.h's loops once more through optim_bf16_layout.h,
 * with bfloat16 loads (a 16-bit shift) and rounded stores inside the
 * vectorized loop, so no optimizer formula is written twice and memory is
 * crossed once.
 *
 * With bfloat16 param, grad and state, Adam's loop reads and writes two
 * elements per 32-bit word (optim_impl.h, FB_PAIRS): widening is one shift
 * or one mask per 16 elements, narrowing one shift and one bitwise select
 * per 32, where element-order vectors need 16/32-bit lane shuffles.
 *
 * Rounding is stochastic or nearest-even by the call's flag; the two are
 * separate instantiations, so the nearest-even loops compute no random bits.
 * The random bits of an element depend only on the tensor's key and the
 * element's index (fb_bf16.h), so results do not depend on the thread
 * count, the chunking or the SIMD target.
 *
 * Memory traffic of Adam per element (read + write):
 *   float32 state                4+4 param, 4 grad, 2x(4+4) state = 28 bytes
 *   bfloat16 state               4+4, 4, 2x(2+2)                  = 20 bytes
 *   bfloat16 param, grad, state  2+2, 2, 2x(2+2)                  = 14 bytes
 */

/* The random-bit source of elements [begin, ...) of tensor t (begin is a
 * multiple of the chunk size, so even: pair j of the chunk is pair
 * begin / 2 + j of the tensor). */
static inline fb_rounding fb_rounding_of(const fastbn_optim_batch *batch, fb_index t, fb_index begin)
{
    const uint64_t key = batch->rounding_key[t];
    const uint64_t high = (uint64_t)begin >> 32;
    fb_rounding rounding;
    rounding.word_base[0] = fb_bf16_word_key(key, 0, high) + (uint32_t)begin;
    for (int word = 1; word < 3; ++word)
        rounding.word_base[word] = fb_bf16_word_key(key, word, high) + (uint32_t)((uint64_t)begin >> 1);
    rounding.param_copy = batch->param_copy ? (uint16_t *)batch->param_copy[t] + begin : NULL;
    return rounding;
}

/* The 16 random bits of `slot` for element i of the chunk. */
FB_ALWAYS_INLINE uint32_t fb_bf16_increment(const fb_rounding rounding, int32_t i, int slot)
{
    if (!FB_BF16_PAIRED(slot))
        return fb_bf16_half(fb_bf16_hash32_open(rounding.word_base[0] + (uint32_t)i), slot & 1);
    const uint32_t open = fb_bf16_hash32_open(rounding.word_base[FB_BF16_WORD_OF(slot)] + ((uint32_t)i >> 1));
    return fb_bf16_half(open, i & 1);
}

/* `x` rounded to bfloat16 as slot `slot` of element i of the chunk. */
FB_ALWAYS_INLINE uint16_t fb_bf16_store(float x, const fb_rounding rounding, int32_t i, int slot,
                                        const int stochastic)
{
    if (!stochastic)
        return fb_f32_to_bf16_nearest(x);
    return fb_f32_to_bf16_stochastic(x, fb_bf16_increment(rounding, i, slot));
}

/* fb_bf16_store before the final shift: the bfloat16 in the top half. */
FB_ALWAYS_INLINE uint32_t fb_bf16_round_bits(float x, const fb_rounding rounding, int32_t i, int slot,
                                             const int stochastic)
{
    if (!stochastic)
        return fb_bf16_rounded_bits(x, fb_bf16_nearest_increment(x));
    return fb_bf16_rounded_bits(x, fb_bf16_increment(rounding, i, slot));
}

/* Pure bfloat16 storage read and written two elements per 32-bit word
 * (optim_impl.h's pair loops): element 2j is the low half of word j on a
 * little-endian machine; elsewhere the layouts keep the element loops. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define FB_PAIRS_POSSIBLE 1
#else
#define FB_PAIRS_POSSIBLE 0
#endif

FB_ALWAYS_INLINE uint32_t fb_pair_load(const uint16_t *array, int32_t j)
{
    uint32_t word;
    memcpy(&word, array + 2 * (fb_index)j, sizeof word);
    return word;
}

FB_ALWAYS_INLINE float fb_pair_low(uint32_t word)
{
    const uint32_t bits = word << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

FB_ALWAYS_INLINE float fb_pair_high(uint32_t word)
{
    const uint32_t bits = word & UINT32_C(0xFFFF0000);
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Store the top halves of `low_bits` (element 2j) and `high_bits` (2j + 1). */
FB_ALWAYS_INLINE void fb_pair_store(uint16_t *array, int32_t j, uint32_t low_bits, uint32_t high_bits)
{
    const uint32_t word = (high_bits & UINT32_C(0xFFFF0000)) | (low_bits >> 16);
    memcpy(array + 2 * (fb_index)j, &word, sizeof word);
}

/* Elements 2j (x0) and 2j + 1 (x1) rounded as `slot` and stored as word j.
 * The paired slots (2, 3) draw one word per pair: one hash serves both. */
FB_ALWAYS_INLINE void fb_pair_round_store(uint16_t *array, int32_t j, float x0, float x1,
                                          const fb_rounding rounding, int slot, const int stochastic)
{
    if (stochastic && FB_BF16_PAIRED(slot)) {
        const uint32_t open = fb_bf16_hash32_open(rounding.word_base[FB_BF16_WORD_OF(slot)] + (uint32_t)j);
        fb_pair_store(array, j, fb_bf16_rounded_bits(x0, fb_bf16_low(open)),
                      fb_bf16_rounded_bits(x1, fb_bf16_high(open)));
        return;
    }
    fb_pair_store(array, j, fb_bf16_round_bits(x0, rounding, 2 * j, slot, stochastic),
                  fb_bf16_round_bits(x1, rounding, 2 * j + 1, slot, stochastic));
}

/* Layout instantiations: FB_BF16_PARAM 0 float32 param and grad, 1 bfloat16
 * param and grad, 2 float32 master weights with bfloat16 grad and copy;
 * FB_BF16_STATE 0/1; FB_STOCHASTIC 0/1. */
#define FB_BF16_PARAM 0
#define FB_BF16_STATE 1
#define FB_STOCHASTIC 1
#define FB_DTYPE bs_sr
#include "optim_bf16_layout.h"
#define FB_STOCHASTIC 0
#define FB_DTYPE bs_rne
#include "optim_bf16_layout.h"
#undef FB_BF16_PARAM
#undef FB_BF16_STATE

#define FB_BF16_PARAM 1
#define FB_BF16_STATE 0
#define FB_STOCHASTIC 1
#define FB_DTYPE bp_sr
#include "optim_bf16_layout.h"
#define FB_STOCHASTIC 0
#define FB_DTYPE bp_rne
#include "optim_bf16_layout.h"
#undef FB_BF16_STATE
#define FB_BF16_STATE 1
#define FB_STOCHASTIC 1
#define FB_DTYPE bpbs_sr
#include "optim_bf16_layout.h"
#define FB_STOCHASTIC 0
#define FB_DTYPE bpbs_rne
#include "optim_bf16_layout.h"
#undef FB_BF16_PARAM
#undef FB_BF16_STATE

/* Master weights: the bfloat16 copy is always nearest-even, so with float32
 * state nothing is stochastic and one instantiation serves both flags. */
#define FB_BF16_PARAM 2
#define FB_BF16_STATE 0
#define FB_STOCHASTIC 0
#define FB_DTYPE mw
#include "optim_bf16_layout.h"
#undef FB_BF16_STATE
#define FB_BF16_STATE 1
#define FB_STOCHASTIC 1
#define FB_DTYPE mwbs_sr
#include "optim_bf16_layout.h"
#define FB_STOCHASTIC 0
#define FB_DTYPE mwbs_rne
#include "optim_bf16_layout.h"
#undef FB_BF16_PARAM
#undef FB_BF16_STATE

/* section: entry points ------------------------------------------------------------ */

static int bf16_step(FASTBN_OPTIM_STEP_ARGS, optim_chunk_fn stochastic_fn, optim_chunk_fn nearest_fn,
                     int n_state, int needs_coefficients, int needs_copy)
{
    if (batch && batch->n_tensors && (!batch->rounding_key || (needs_copy && !batch->param_copy)))
        return FASTBN_ERR_ARGUMENT;
    return optim_step_f32(batch, scalars, flags, num_threads,
                          (flags & FASTBN_OPTIM_STOCHASTIC_ROUNDING) ? stochastic_fn : nearest_fn,
                          n_state, needs_coefficients);
}

/* One entry point per (family, layout): the float32 checks and work
 * splitter with the layout's chunk functions. */
#define FB_BF16_STEP(family, layout, sr, rne, n_state, needs_coefficients, slots_missing, needs_copy)  \
    static int family##_step_##layout(FASTBN_OPTIM_STEP_ARGS)                                         \
    {                                                                                                 \
        if (batch && batch->n_tensors && (slots_missing))                                             \
            return FASTBN_ERR_ARGUMENT;                                                               \
        return bf16_step(batch, scalars, flags, num_threads, family##_chunk_##sr,                     \
                         family##_chunk_##rne, (n_state), (needs_coefficients), (needs_copy));        \
    }

#define FB_FLAG(name) ((flags & FASTBN_OPTIM_##name) != 0)
#define FB_BF16_FAMILIES(layout, sr, rne, needs_copy)                                                 \
    FB_BF16_STEP(sgd, layout, sr, rne, FB_FLAG(MOMENTUM), FB_FLAG(MOMENTUM), 0, needs_copy)           \
    FB_BF16_STEP(momentum, layout, sr, rne, 1, 0, 0, needs_copy)                                      \
    FB_BF16_STEP(rmsprop, layout, sr, rne, 1, 0,                                                      \
                 (FB_FLAG(CENTERED) && !batch->state[1]) || (FB_FLAG(MOMENTUM) && !batch->state[2]),  \
                 needs_copy)                                                                          \
    FB_BF16_STEP(adam, layout, sr, rne, FB_FLAG(AMSGRAD) ? 3 : 2, 1, 0, needs_copy)                   \
    FB_BF16_STEP(lion, layout, sr, rne, 1, 0, 0, needs_copy)
FB_BF16_FAMILIES(bs, bs_sr, bs_rne, 0)
FB_BF16_FAMILIES(bp, bp_sr, bp_rne, 0)
FB_BF16_FAMILIES(bpbs, bpbs_sr, bpbs_rne, 0)
FB_BF16_FAMILIES(mw, mw, mw, 1)
FB_BF16_FAMILIES(mwbs, mwbs_sr, mwbs_rne, 1)
#undef FB_FLAG

/* The table row of one layout. */
#define FB_BF16_LAYOUT_TABLE(index, layout)                         \
    [index] = {                                                     \
        [FASTBN_OPTIM_FAMILY_SGD] = sgd_step_##layout,              \
        [FASTBN_OPTIM_FAMILY_MOMENTUM] = momentum_step_##layout,    \
        [FASTBN_OPTIM_FAMILY_RMSPROP] = rmsprop_step_##layout,      \
        [FASTBN_OPTIM_FAMILY_ADAM] = adam_step_##layout,            \
        [FASTBN_OPTIM_FAMILY_LION] = lion_step_##layout,            \
    }

static int round_bf16(const float *src, uint16_t *dst, fb_index n, uint64_t key, int slot, int stochastic)
{
    if ((n > 0 && (!src || !dst)) || n < 0 || slot < 0 || slot > FB_BF16_PARAM_SLOT)
        return FASTBN_ERR_ARGUMENT;
    fb_bf16_round_array(src, dst, n, key, slot, 0, stochastic);
    return FASTBN_OK;
}
