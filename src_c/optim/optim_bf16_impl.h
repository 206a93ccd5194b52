/* optim_bf16_impl.h -- float32 parameters with bfloat16 optimizer state.
 * Included by optim_kernels.c after the float32 section, whose per-chunk
 * functions it reuses: no optimizer formula is written twice.
 *
 * A chunk is processed in blocks of FB_BF16_BLOCK elements.  Each block's
 * state slots are widened into float32 scratch arrays (on the stack, in L1),
 * the family's float32 chunk function updates parameter and scratch state
 * exactly as the float32-state kernel would, and the scratch is narrowed
 * back into the bfloat16 state: stochastically, with one 64-bit draw per
 * element shared by its slots (16 bits each), or to nearest-even.  The draw
 * depends only on the tensor's key and the element's index, so results do
 * not depend on the thread count, the chunking or the block size.
 *
 * Memory traffic of Adam per element: 4+4 (param) + 4 (grad) + 2x(2+2)
 * (state) = 20 bytes instead of 28.
 */
#include "../common/fb_bf16.h"

/* Elements per block: 3 slots x 2 KB of float32 scratch plus 4 KB of random
 * bits stay in L1 next to the streams. */
#define FB_BF16_BLOCK ((fb_index)512)

FB_ALWAYS_INLINE void bf16state_chunk(const optim_call *call, fb_index t, fb_index chunk,
                                      fb_index begin, fb_index end, optim_chunk_fn f32_chunk)
{
    const fastbn_optim_batch *batch = call->batch;
    float scratch[FASTBN_OPTIM_MAX_STATE][FB_BF16_BLOCK];
    uint64_t random[FB_BF16_BLOCK];
    uint16_t *stored[FASTBN_OPTIM_MAX_STATE];
    void *scratch_pointer[FASTBN_OPTIM_MAX_STATE];
    void *param_pointer = NULL;
    const void *grad_pointer = NULL;
    /* A one-tensor batch whose state slots are the scratch arrays. */
    fastbn_optim_batch block = *batch;
    block.n_tensors = 1;
    block.param = &param_pointer;
    block.grad = batch->grad ? &grad_pointer : NULL;
    block.coefficients = batch->coefficients ? batch->coefficients + t * batch->coefficient_stride : NULL;
    for (int slot = 0; slot < FASTBN_OPTIM_MAX_STATE; ++slot) {
        stored[slot] = batch->state[slot] ? (uint16_t *)batch->state[slot][t] : NULL;
        scratch_pointer[slot] = stored[slot] ? scratch[slot] : NULL;
        block.state[slot] = batch->state[slot] ? &scratch_pointer[slot] : NULL;
    }
    optim_call block_call = *call;
    block_call.batch = &block;
    const uint64_t key = batch->rounding_key[t];
    const int stochastic = (call->flags & FASTBN_OPTIM_STOCHASTIC_ROUNDING) != 0;
    for (fb_index first = begin; first < end; first += FB_BF16_BLOCK) {
        const fb_index n = end - first < FB_BF16_BLOCK ? end - first : FB_BF16_BLOCK;
        param_pointer = (float *)batch->param[t] + first;
        if (batch->grad)
            grad_pointer = (const float *)batch->grad[t] + first;
        for (int slot = 0; slot < FASTBN_OPTIM_MAX_STATE; ++slot)
            if (stored[slot])
                fb_bf16_widen(stored[slot] + first, scratch[slot], n);
        f32_chunk(&block_call, 0, chunk, 0, n);
        if (stochastic)
            fb_bf16_fill_random(random, n, key, first);
        for (int slot = 0; slot < FASTBN_OPTIM_MAX_STATE; ++slot)
            if (stored[slot])
                fb_bf16_narrow_array(scratch[slot], stored[slot] + first, n, stochastic ? random : NULL, slot);
    }
}

/* One chunk function and one entry point per family: the entry point is the
 * float32 one's, with the bfloat16 chunk function and the key table. */
#define FB_BF16STATE_FAMILY(family, n_state, needs_coefficients, slots_missing)                      \
    static void family##_chunk_bf16state(const optim_call *call, fb_index t, fb_index chunk,         \
                                         fb_index begin, fb_index end)                               \
    {                                                                                                \
        bf16state_chunk(call, t, chunk, begin, end, family##_chunk_f32);                             \
    }                                                                                                \
    static int family##_step_bf16state(FASTBN_OPTIM_STEP_ARGS)                                       \
    {                                                                                                \
        if (batch && batch->n_tensors && (!batch->rounding_key || (slots_missing)))                  \
            return FASTBN_ERR_ARGUMENT;                                                              \
        return optim_step_f32(batch, scalars, flags, num_threads, family##_chunk_bf16state,          \
                              (n_state), (needs_coefficients));                                      \
    }

#define FB_FLAG(name) ((flags & FASTBN_OPTIM_##name) != 0)
FB_BF16STATE_FAMILY(sgd, FB_FLAG(MOMENTUM), FB_FLAG(MOMENTUM), 0)
FB_BF16STATE_FAMILY(momentum, 1, 0, 0)
FB_BF16STATE_FAMILY(rmsprop, 1, 0, (FB_FLAG(CENTERED) && !batch->state[1]) || (FB_FLAG(MOMENTUM) && !batch->state[2]))
FB_BF16STATE_FAMILY(adam, FB_FLAG(AMSGRAD) ? 3 : 2, 1, 0)
FB_BF16STATE_FAMILY(lion, 1, 0, 0)
#undef FB_FLAG

static int round_bf16(const float *src, uint16_t *dst, fb_index n, uint64_t key, int slot, int stochastic)
{
    uint64_t random[FB_BF16_BLOCK];
    if ((n > 0 && (!src || !dst)) || n < 0 || slot < 0 || slot >= FASTBN_OPTIM_MAX_STATE)
        return FASTBN_ERR_ARGUMENT;
    for (fb_index first = 0; first < n; first += FB_BF16_BLOCK) {
        const fb_index count = n - first < FB_BF16_BLOCK ? n - first : FB_BF16_BLOCK;
        if (stochastic)
            fb_bf16_fill_random(random, count, key, first);
        fb_bf16_narrow_array(src + first, dst + first, count, stochastic ? random : NULL, slot);
    }
    return FASTBN_OK;
}
