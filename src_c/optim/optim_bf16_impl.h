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

/* Whether any of the chunk's scalars is NaN (see fb_adam_bpbs_avx2): the hand-written
 * loops below take the NaN-safe rounding everywhere when one is. */
FB_ALWAYS_INLINE int fb_adam_scalar_nan(float sign, float beta1, float one_minus_beta1, float beta2,
                                        float one_minus_beta2, float param_decay, float step_size, float eps_hat)
{
    const float scalars[] = {sign, beta1, one_minus_beta1, beta2, one_minus_beta2, param_decay, step_size, eps_hat};
    int scalar_nan = 0;
    for (int s = 0; s < (int)(sizeof scalars / sizeof scalars[0]); ++s)
        scalar_nan |= scalars[s] != scalars[s];
    return scalar_nan;
}

/* The hand-written loops' scalars, broadcast once per chunk: a struct `name`
 * of `vector` members and its constructor name##_of (`set1` broadcasts). */
#define FB_ADAM_VECTOR_CONSTANTS(name, vector, set1)                                                            \
    typedef struct {                                                                                            \
        vector sign, beta1, one_minus_beta1, beta2, one_minus_beta2, param_decay, step_size, eps_hat;           \
    } name;                                                                                                     \
    FB_ALWAYS_INLINE name name##_of(float sign, float beta1, float one_minus_beta1, float beta2,                \
                                    float one_minus_beta2, float param_decay, float step_size, float eps_hat)   \
    {                                                                                                           \
        name k;                                                                                                 \
        k.sign = set1(sign);                                                                                    \
        k.beta1 = set1(beta1);                                                                                  \
        k.one_minus_beta1 = set1(one_minus_beta1);                                                              \
        k.beta2 = set1(beta2);                                                                                  \
        k.one_minus_beta2 = set1(one_minus_beta2);                                                              \
        k.param_decay = set1(param_decay);                                                                      \
        k.step_size = set1(step_size);                                                                          \
        k.eps_hat = set1(eps_hat);                                                                              \
        return k;                                                                                               \
    }

/* An entry point `name` of a hand-written loop: param and grad of type
 * `element`, the state bfloat16; it does the leading whole vectors and
 * returns how many elements that was (the generic loop does the rest).
 * One specialization of `loop` per case (a NaN scalar: every block takes
 * the NaN-safe rounding; sign +1: no multiply by the sign), chosen once per
 * call, so the constants reach the inlined loop. */
#define FB_ADAM_VECTOR_ENTRY(name, element, loop, constants)                                                    \
    FB_ALWAYS_INLINE int32_t name(element *restrict param, const element *restrict grad,                        \
                                  uint16_t *restrict exp_avg, uint16_t *restrict exp_avg_sq, int32_t n,         \
                                  float sign, float beta1, float one_minus_beta1, float beta2,                  \
                                  float one_minus_beta2, float param_decay, float step_size, float eps_hat,     \
                                  const int decoupled, const fb_rounding rounding, const int stochastic)        \
    {                                                                                                           \
        const constants k = constants##_of(sign, beta1, one_minus_beta1, beta2, one_minus_beta2, param_decay,   \
                                           step_size, eps_hat);                                                 \
        if (fb_adam_scalar_nan(sign, beta1, one_minus_beta1, beta2, one_minus_beta2, param_decay, step_size,    \
                               eps_hat))                                                                        \
            return loop(param, grad, exp_avg, exp_avg_sq, n, k, decoupled, rounding, stochastic, 1, 1);         \
        if (sign == 1.0f)                                                                                       \
            return loop(param, grad, exp_avg, exp_avg_sq, n, k, decoupled, rounding, stochastic, 0, 0);         \
        return loop(param, grad, exp_avg, exp_avg_sq, n, k, decoupled, rounding, stochastic, 1, 0);             \
    }

/* section: AVX2 Adam with bfloat16 state ---------------------------------------- */

/* Adam's element loop with float32 param and grad and bfloat16 state, by
 * hand for AVX2 (AdamW and plain Adam; L2 weight decay and amsgrad keep the
 * compiler-vectorized loop).  What the compiler made of the generic loop is
 * bound by Zen 3's vector pipes, not by the divider: per 16 elements the
 * float32 update takes ~42 pipe-cycles, the bfloat16 widening, rounding and
 * narrowing ~64 more (llvm-mca -mcpu=znver3 on adam_chunk_bs_sr: 106; the
 * loop measured 0.91 ns per element in L2 against 0.43 for float32 state).
 * The widening with vpmovzxwd (a load and a shuffle, three pipe-cycles each
 * there), the truncating mask before vpackusdw and the lane-order vpermq are
 * what this loop does not do: each 16 bfloat16 of a state array are widened
 * with one unpack per 8 lanes, which puts elements {0-3, 8-11} in one vector
 * and {4-7, 12-15} in the other ("unpack order"); param and grad are loaded
 * and stored in that order with 128-bit halves (free on the load ports), and
 * vpackusdw of the two rounded vectors gives the elements back in memory
 * order.  The random words are those of the generic loop: element i hashes
 * word_base[0] + i (the counter vectors follow the unpack order), slot 0
 * takes the low half, slot 1 the high half.  The float32 arithmetic is the
 * float32 kernel's on this target, operation for operation (GCC contracts
 * beta1 * m + (1 - beta1) * g to fma(m, beta1, (1 - beta1) * g), the same
 * for v, and AdamW's p * decay - q to one fmsub), so the update is
 * bit-identical to it (tests/test_optim_bf16_params.py checks).
 * The NaN select of the rounding (compare, or, blend per vector) cost about
 * 0.2 ns of 0.9 per element in L2; only a 32-element block whose gradient
 * holds a NaN pays for it (see fb_adam_bs_avx2_loop for why the gradient
 * decides).  Measured on Zen 3 (32768 elements in L2, one thread, min of 100
 * rounds, load average 7-9): bfloat16 state 0.88 -> 0.81 ns per element with
 * stochastic rounding, 0.76 -> 0.68 nearest-even; pure bfloat16 (the pair
 * loop below) 0.95 -> 0.89 and 0.86 -> 0.73; float32 state 0.43.
 * The loops are bound by the vector pipes, not by memory or the divider
 * (perf annotate: the samples pile up behind vsqrtps/vdivps, whose pipe the
 * multiplies share; llvm-mca -mcpu=znver3 puts pipes 0-2 at 34-42 of the 44
 * cycles per 32 elements), so what follows takes vector operations out of
 * them with the same bits: no multiply by a +1 gradient sign, the NaN test
 * on the gradient once per 32 elements, and (bfloat16 state) the counters'
 * high halves broadcast instead of shifted.  Same harness, min of 60
 * interleaved rounds, load 5-6: bfloat16 state 0.715 -> 0.637 ns per
 * element, pure bfloat16 0.669 -> 0.589 (stochastic).  Tried and dropped:
 * the high-half broadcast in the pure bfloat16 loop (0.61 -> 0.70 ns, with
 * 16 or 32 elements per iteration); element order in the bfloat16-state
 * loop (plain float32 loads and stores, a vpermq per state vector in and
 * out: 0.648 -> 0.708); 32 elements per iteration in the pure bfloat16 loop
 * (no change).  The AVX-512 target has its own loops (below). */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define FB_ADAM_BS_AVX2 1

/* 8 float32 of elements {k..k+3, k+8..k+11} (unpack order from k). */
FB_ALWAYS_INLINE __m256 fb_avx2_load_split(const float *p)
{
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(p + 8), 1);
}

FB_ALWAYS_INLINE void fb_avx2_store_split(float *p, __m256 x)
{
    _mm_storeu_ps(p, _mm256_castps256_ps128(x));
    _mm_storeu_ps(p + 8, _mm256_extractf128_ps(x, 1));
}

/* 32-bit bit patterns with the bfloat16 in the top half: fb_bf16_rounded_bits
 * lane by lane, shifted down. */
FB_ALWAYS_INLINE __m256i fb_avx2_round16(__m256 x, __m256i increment)
{
    const __m256i bits = _mm256_castps_si256(x);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 sum = _mm256_castsi256_ps(_mm256_add_epi32(bits, increment));
    const __m256 quiet = _mm256_castsi256_ps(_mm256_or_si256(bits, _mm256_set1_epi32(0x00400000)));
    return _mm256_srli_epi32(_mm256_castps_si256(_mm256_blendv_ps(sum, quiet, nan)), 16);
}

/* fb_avx2_round16 of lanes known not to be NaN. */
FB_ALWAYS_INLINE __m256i fb_avx2_add16(__m256 x, __m256i increment)
{
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x), increment), 16);
}

/* fb_bf16_hash32_open of 8 counters x, given x >> 16 (`x_high`): within a
 * chunk the high halves of the counters change at most once (a chunk is 4096
 * elements, the low halves count up from any start), so the loops below pass
 * one broadcast of them and shift per lane only in the iteration where the
 * counters cross a multiple of 2**16 (fb_avx2_counter_high). */
FB_ALWAYS_INLINE __m256i fb_avx2_hash_open_high(__m256i x, __m256i x_high)
{
    x = _mm256_xor_si256(x, x_high);
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7FEB352D));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    return _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68B));
}

FB_ALWAYS_INLINE __m256i fb_avx2_hash_open(__m256i x)
{
    return fb_avx2_hash_open_high(x, _mm256_srli_epi32(x, 16));
}

/* Whether the counters first .. first + span - 1 (mod 2**32) share their
 * high 16 bits; if so, *cached_high / *high_vector hold them (broadcast),
 * refreshed when they changed.  A scalar test and a predictable branch per
 * iteration, instead of one vector shift per counter vector: worth 1-2% of
 * the bfloat16-state loop in L2 (0.66 -> 0.65 ns per element, three runs of
 * 50 interleaved rounds, load 3; 5% at load 6), and a loss in the pure
 * bfloat16 loop (see above), which keeps the shifts.  The tests' 70001- and
 * 90300-element tensors cross a multiple of 2**16 at every step. */
FB_ALWAYS_INLINE int fb_avx2_counter_high(uint32_t first, uint32_t span, uint32_t *cached_high,
                                          __m256i *high_vector)
{
    const uint32_t high = first >> 16;
    if (high != (uint32_t)(first + (span - 1)) >> 16)
        return 0;
    if (high != *cached_high) {
        *cached_high = high;
        *high_vector = _mm256_set1_epi32((int)high);
    }
    return 1;
}

FB_ADAM_VECTOR_CONSTANTS(fb_avx2_adam_constants, __m256, _mm256_set1_ps)

/* One Adam (or AdamW, `decoupled`) step of 8 lanes, the operations of the
 * float32 kernel on this target (see above): the new parameter; the new
 * moments in *m_out and *v_out.  `grad` before the sign; `negate` 0 when the
 * sign is +1, whose product g * 1 is g bit for bit (a NaN comes out quiet
 * with its payload either way: the next product quiets it alike), so that
 * multiply is left out. */
FB_ALWAYS_INLINE __m256 fb_avx2_adam8(const fb_avx2_adam_constants *k, __m256 grad, __m256 p, __m256 m_old,
                                      __m256 v_old, const int decoupled, const int negate, __m256 *m_out,
                                      __m256 *v_out)
{
    const __m256 g = negate ? _mm256_mul_ps(grad, k->sign) : grad;
    const __m256 m = _mm256_fmadd_ps(m_old, k->beta1, _mm256_mul_ps(g, k->one_minus_beta1));
    const __m256 v = _mm256_fmadd_ps(v_old, k->beta2, _mm256_mul_ps(_mm256_mul_ps(g, g), k->one_minus_beta2));
    const __m256 q = _mm256_div_ps(_mm256_mul_ps(m, k->step_size), _mm256_add_ps(_mm256_sqrt_ps(v), k->eps_hat));
    *m_out = m;
    *v_out = v;
    return decoupled ? _mm256_fmsub_ps(p, k->param_decay, q) : _mm256_sub_ps(p, q);
}

/* The 16-bit increments of 8 elements' m (low half) and v (high half) from
 * their open word (fb_bf16_low / fb_bf16_high). */
FB_ALWAYS_INLINE void fb_avx2_split_open(__m256i open, __m256i *low, __m256i *high)
{
    *high = _mm256_srli_epi32(open, 16);
    *low = _mm256_and_si256(_mm256_xor_si256(open, *high), _mm256_set1_epi32(0xFFFF));
}

/* 16 bfloat16 in memory order from two rounded vectors in unpack order
 * ({0-3, 8-11} and {4-7, 12-15}): the plain add of the increments when no
 * lane needs the NaN select (`plain`), fb_avx2_round16 otherwise.  The
 * pair-order twin is fb_avx2_pair_round below. */
FB_ALWAYS_INLINE __m256i fb_avx2_unpack_round(__m256 first, __m256 second, __m256i first_increment,
                                              __m256i second_increment, const int plain)
{
    if (plain)
        return _mm256_packus_epi32(fb_avx2_add16(first, first_increment), fb_avx2_add16(second, second_increment));
    return _mm256_packus_epi32(fb_avx2_round16(first, first_increment), fb_avx2_round16(second, second_increment));
}

/* NaN lanes of m and v: m and v are float32 results of widened bfloat16
 * state (low 16 bits zero), the gradient and the chunk's scalars; a NaN
 * result is quiet (x86 arithmetic never returns a signaling NaN) and its
 * payload is an operand's or the default NaN's.  So unless a scalar or the
 * gradient lane is NaN (a float32 gradient may carry payload bits in its low
 * half), a NaN m or v has zero low 16 bits and the plain add of the
 * increment (< 2**16) gives fb_bf16_rounded_bits's quiet-NaN select bit for
 * bit: one unordered compare per two gradient vectors decides for 32
 * elements whether the select is needed (it was one compare per m and v
 * vector before, after the update). */
FB_ALWAYS_INLINE int32_t fb_adam_bs_avx2_loop(float *restrict param, const float *restrict grad,
                                              uint16_t *restrict exp_avg, uint16_t *restrict exp_avg_sq,
                                              int32_t n, const fb_avx2_adam_constants k, const int decoupled,
                                              const fb_rounding rounding, const int stochastic, const int negate,
                                              const int scalar_nan)
{
    const __m256i zero = _mm256_setzero_si256();
    /* the counters of elements {0-3, 8-11} and {4-7, 12-15} of the first block */
    __m256i counter_a = _mm256_add_epi32(_mm256_set1_epi32((int)rounding.word_base[0]),
                                         _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11));
    __m256i counter_b = _mm256_add_epi32(counter_a, _mm256_set1_epi32(4));
    const __m256i counter_step = _mm256_set1_epi32(16);
    uint32_t cached_high = ~(uint32_t)0;  /* no counter's high half (those are < 2**16) */
    __m256i high_vector = zero;
    const int32_t end = n - n % 32;
    for (int32_t i = 0; i < end; i += 32) {
        /* two blocks of 16: four independent square-root / division chains
         * in flight (with one block per iteration the loop waited on them) */
        __m256 m_half[4], v_half[4], p_half[4], g_half[4];
        for (int h = 0; h < 4; ++h) {
            const int32_t at = i + 16 * (h >> 1) + 4 * (h & 1);
            const __m256i m16 = _mm256_loadu_si256((const __m256i *)(exp_avg + i + 16 * (h >> 1)));
            const __m256i v16 = _mm256_loadu_si256((const __m256i *)(exp_avg_sq + i + 16 * (h >> 1)));
            const __m256 m_old = _mm256_castsi256_ps((h & 1) ? _mm256_unpackhi_epi16(zero, m16)
                                                              : _mm256_unpacklo_epi16(zero, m16));
            const __m256 v_old = _mm256_castsi256_ps((h & 1) ? _mm256_unpackhi_epi16(zero, v16)
                                                              : _mm256_unpacklo_epi16(zero, v16));
            g_half[h] = fb_avx2_load_split(grad + at);
            p_half[h] = fb_avx2_adam8(&k, g_half[h], fb_avx2_load_split(param + at), m_old, v_old, decoupled,
                                      negate, &m_half[h], &v_half[h]);
        }
        __m256i m_inc[4], v_inc[4];
        if (stochastic) {
            __m256i open[4];
            if (fb_avx2_counter_high(rounding.word_base[0] + (uint32_t)i, 32, &cached_high, &high_vector)) {
                open[0] = fb_avx2_hash_open_high(counter_a, high_vector);
                open[1] = fb_avx2_hash_open_high(counter_b, high_vector);
                open[2] = fb_avx2_hash_open_high(_mm256_add_epi32(counter_a, counter_step), high_vector);
                open[3] = fb_avx2_hash_open_high(_mm256_add_epi32(counter_b, counter_step), high_vector);
            } else {
                open[0] = fb_avx2_hash_open(counter_a);
                open[1] = fb_avx2_hash_open(counter_b);
                open[2] = fb_avx2_hash_open(_mm256_add_epi32(counter_a, counter_step));
                open[3] = fb_avx2_hash_open(_mm256_add_epi32(counter_b, counter_step));
            }
            for (int h = 0; h < 4; ++h)
                fb_avx2_split_open(open[h], &m_inc[h], &v_inc[h]);
            counter_a = _mm256_add_epi32(counter_a, _mm256_set1_epi32(32));
            counter_b = _mm256_add_epi32(counter_b, _mm256_set1_epi32(32));
        } else {
            for (int h = 0; h < 4; ++h) {
                m_inc[h] = fb_bf16_nearest_increment8(m_half[h]);
                v_inc[h] = fb_bf16_nearest_increment8(v_half[h]);
            }
        }
        int plain = !scalar_nan;
        if (plain) {
            const __m256 nan = _mm256_or_ps(_mm256_cmp_ps(g_half[0], g_half[1], _CMP_UNORD_Q),
                                            _mm256_cmp_ps(g_half[2], g_half[3], _CMP_UNORD_Q));
            plain = _mm256_testz_ps(nan, nan);
        }
        for (int b = 0; b < 2; ++b) {
            const int32_t at = i + 16 * b;
            const int h = 2 * b;
            _mm256_storeu_si256((__m256i *)(exp_avg + at),
                                fb_avx2_unpack_round(m_half[h], m_half[h + 1], m_inc[h], m_inc[h + 1], plain));
            _mm256_storeu_si256((__m256i *)(exp_avg_sq + at),
                                fb_avx2_unpack_round(v_half[h], v_half[h + 1], v_inc[h], v_inc[h + 1], plain));
            fb_avx2_store_split(param + at, p_half[h]);
            fb_avx2_store_split(param + at + 4, p_half[h + 1]);
        }
    }
    return end;
}

FB_ADAM_VECTOR_ENTRY(fb_adam_bs_avx2, float, fb_adam_bs_avx2_loop, fb_avx2_adam_constants)

/* Pure bfloat16 Adam (param, grad and state bfloat16) in the pair layout of
 * optim_impl.h's FB_PAIRS loop: a 32-bit word j holds elements 2j (low
 * half) and 2j + 1 (high half); widening is a shift or a mask, narrowing a
 * shift and one 16-bit blend.  The random words are the pair loop's: slots
 * 0 and 1 hash word_base[0] + element index (even and odd elements are two
 * counter vectors), the parameter hashes word_base[2] + pair index once per
 * pair.  NaN lanes take the plain rounding unless a scalar is NaN (see
 * fb_adam_bpbs_avx2).  Plain Adam and AdamW; the first 2 * (n / 16 * 8)
 * elements, returned. */
FB_ALWAYS_INLINE __m256i fb_avx2_pair_round(__m256 even, __m256 odd, __m256i even_increment,
                                            __m256i odd_increment, const int any_nan)
{
    if (!any_nan)
        return fb_bf16_pair_pack(_mm256_add_epi32(_mm256_castps_si256(even), even_increment),
                                   _mm256_add_epi32(_mm256_castps_si256(odd), odd_increment));
    return fb_bf16_pair_pack(_mm256_slli_epi32(fb_avx2_round16(even, even_increment), 16),
                               _mm256_slli_epi32(fb_avx2_round16(odd, odd_increment), 16));
}

FB_ALWAYS_INLINE int32_t fb_adam_bpbs_avx2_loop(uint16_t *restrict param, const uint16_t *restrict grad,
                                                uint16_t *restrict exp_avg, uint16_t *restrict exp_avg_sq,
                                                int32_t n, const fb_avx2_adam_constants k, const int decoupled,
                                                const fb_rounding rounding, const int stochastic,
                                                const int negate, const int any_nan)
{
    __m256i counter_even = _mm256_add_epi32(_mm256_set1_epi32((int)rounding.word_base[0]),
                                            _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
    __m256i counter_pair = _mm256_add_epi32(_mm256_set1_epi32((int)rounding.word_base[2]),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i one = _mm256_set1_epi32(1);
    const int32_t end = n - n % 16;
    for (int32_t i = 0; i < end; i += 16) {
        const __m256i pw = _mm256_loadu_si256((const __m256i *)(param + i));
        const __m256i gw = _mm256_loadu_si256((const __m256i *)(grad + i));
        const __m256i mw = _mm256_loadu_si256((const __m256i *)(exp_avg + i));
        const __m256i vw = _mm256_loadu_si256((const __m256i *)(exp_avg_sq + i));
        __m256 m_out[2], v_out[2], p_out[2];
        for (int h = 0; h < 2; ++h) {
#define FB_HALF(w) (h ? fb_bf16_pair_odd(w) : fb_bf16_pair_even(w))
            p_out[h] = fb_avx2_adam8(&k, FB_HALF(gw), FB_HALF(pw), FB_HALF(mw), FB_HALF(vw), decoupled, negate,
                                     &m_out[h], &v_out[h]);
#undef FB_HALF
        }
        __m256i m_inc[2], v_inc[2], p_inc[2];
        if (stochastic) {
            fb_avx2_split_open(fb_avx2_hash_open(counter_even), &m_inc[0], &v_inc[0]);
            fb_avx2_split_open(fb_avx2_hash_open(_mm256_add_epi32(counter_even, one)), &m_inc[1], &v_inc[1]);
            fb_avx2_split_open(fb_avx2_hash_open(counter_pair), &p_inc[0], &p_inc[1]);
            counter_even = _mm256_add_epi32(counter_even, _mm256_set1_epi32(16));
            counter_pair = _mm256_add_epi32(counter_pair, _mm256_set1_epi32(8));
        } else {
            for (int h = 0; h < 2; ++h) {
                m_inc[h] = fb_bf16_nearest_increment8(m_out[h]);
                v_inc[h] = fb_bf16_nearest_increment8(v_out[h]);
                p_inc[h] = fb_bf16_nearest_increment8(p_out[h]);
            }
        }
        _mm256_storeu_si256((__m256i *)(exp_avg + i), fb_avx2_pair_round(m_out[0], m_out[1], m_inc[0], m_inc[1], any_nan));
        _mm256_storeu_si256((__m256i *)(exp_avg_sq + i),
                            fb_avx2_pair_round(v_out[0], v_out[1], v_inc[0], v_inc[1], any_nan));
        _mm256_storeu_si256((__m256i *)(param + i), fb_avx2_pair_round(p_out[0], p_out[1], p_inc[0], p_inc[1], any_nan));
    }
    return end;
}

/* NaN lanes need no test here: every value this loop rounds is a float32
 * operation's result on widened bfloat16 (low 16 bits zero) and the chunk's
 * scalars.  With finite (non-NaN) scalars a NaN result is an input's NaN
 * propagated or the default NaN (0xFFC00000): either way quiet (x86
 * arithmetic never returns a signaling NaN) with zero low 16 bits.  The
 * increment (at most 0xFFFF, stochastic or nearest-even) then cannot carry
 * into the kept half, which already has the quiet bit: the plain add gives
 * fb_bf16_rounded_bits's quiet-NaN select bit for bit.  A NaN scalar may
 * carry any payload bits, so a chunk with one takes the select everywhere
 * (the Python API refuses NaN hyperparameters; the C entry points do not).
 * The test it drops (three compares, two ors and a branch per 16 elements):
 * ResNet-50's parameter list, 1 thread, min of 18 steps interleaved with the
 * session's base build (load 4.6), 27.7 -> 24.7 ms (float32 Adam 32.6). */
FB_ADAM_VECTOR_ENTRY(fb_adam_bpbs_avx2, uint16_t, fb_adam_bpbs_avx2_loop, fb_avx2_adam_constants)
#endif

/* section: AVX-512 Adam with bfloat16 state --------------------------------------- */

/* The two loops above for 16 float32 lanes (AVX-512F/BW), with the same
 * random words, the same float32 operations and the same NaN rules, so the
 * same bits (the tests compare every target with the reference rounding).
 * The compiler's generic loops on this target take a NaN select on every
 * rounded vector and a shift before every narrowing; here the select runs
 * only for a block whose gradient holds a NaN in the bfloat16-state loop
 * (see fb_adam_bs_avx2_loop) and only for a NaN scalar in the pure
 * bfloat16 loop (see fb_adam_bpbs_avx2), m and v split one hash, narrowing takes the high 16-bit words of two
 * vectors with one two-source permute, and the pure bfloat16 loop works in
 * pair order (fb_bf16.h) with 512-bit words.  The square root and the
 * division (the 512-bit divider) stay the floor of every Adam loop here.
 * Measured on a Xeon (Sapphire Rapids class, 2 cores, KVM), one tensor of
 * 65536 elements (in L2), 1 thread, min of 5 rounds of 400 steps, per
 * element, the AVX2 build timed in the same process as the control, three
 * runs: bfloat16 state 0.73-0.76 -> 0.67-0.70 ns, pure bfloat16 0.81-0.82
 * -> 0.71-0.73 (AVX2 build 0.84-0.86 before and after; float32 Adam 0.63).
 * ResNet-50's list (25.6M parameters) is memory-bound there and did not
 * move beyond that machine's noise (bfloat16 state, 2 threads, min 14.0 ms
 * with either loop); a software prefetch 1024 elements ahead in the
 * bfloat16-state loop did not either; 256 elements ahead did on a later
 * machine (FB_ADAM_PREFETCH_ELEMENTS below). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FB_ADAM_BS_AVX512 1

/* Both loops below prefetch every array this many elements ahead (into L1;
 * within the chunk).  One core alone does not keep enough reads in flight
 * for these loops' mix of streams and arithmetic: on a Xeon with AVX512_BF16
 * (Sapphire Rapids class, 2 cores, KVM), ResNet-50's list (161 tensors,
 * 25.6M parameters), min of 9 steps alternated with the other optimizers,
 * two runs per build, against the build without: 2 threads, bfloat16 state
 * 12.55 / 12.61 -> 11.01 / 10.79 ms, pure bfloat16 9.84 / 9.68 -> 8.15 /
 * 7.85 ms (float32 Adam, with no prefetch, 14.2-14.9 ms in the same runs:
 * 1.31-1.34x and 1.79-1.87x it); 1 thread 23.7-24.0 -> 20.4-20.8 and
 * 18.6-18.7 -> 14.9-15.3 ms.  128 elements ahead gained about half of that,
 * 384 the same as 256, 512 less on the pure loop, 1024 nothing, 2048 lost
 * 5-7 % (the earlier note's 1024 elements, on another machine, moved
 * nothing).  Timing only: a prefetch changes no value. */
#define FB_ADAM_PREFETCH_ELEMENTS 256

/* Prefetch into L1 the `bytes` bytes from `p`, a line at a time (an address
 * computation: the last line may lie past the array's end). */
FB_ALWAYS_INLINE void fb_adam_prefetch(const void *p, int bytes)
{
    for (int b = 0; b < bytes; b += 64)
        _mm_prefetch((const char *)((uintptr_t)p + (uintptr_t)b), _MM_HINT_T0);
}

FB_ADAM_VECTOR_CONSTANTS(fb_avx512_adam_constants, __m512, _mm512_set1_ps)

/* fb_avx2_adam8 on 16 lanes: the same operations. */
FB_ALWAYS_INLINE __m512 fb_avx512_adam16(const fb_avx512_adam_constants *k, __m512 grad, __m512 p,
                                         __m512 m_old, __m512 v_old, const int decoupled, const int negate,
                                         __m512 *m_out, __m512 *v_out)
{
    const __m512 g = negate ? _mm512_mul_ps(grad, k->sign) : grad;
    const __m512 m = _mm512_fmadd_ps(m_old, k->beta1, _mm512_mul_ps(g, k->one_minus_beta1));
    const __m512 v = _mm512_fmadd_ps(v_old, k->beta2, _mm512_mul_ps(_mm512_mul_ps(g, g), k->one_minus_beta2));
    const __m512 q = _mm512_div_ps(_mm512_mul_ps(m, k->step_size), _mm512_add_ps(_mm512_sqrt_ps(v), k->eps_hat));
    *m_out = m;
    *v_out = v;
    return decoupled ? _mm512_fmsub_ps(p, k->param_decay, q) : _mm512_sub_ps(p, q);
}

/* fb_bf16_hash32_open of 16 counters. */
FB_ALWAYS_INLINE __m512i fb_avx512_hash_open(__m512i x)
{
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x7FEB352D));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    return _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68B));
}

/* fb_bf16_low / fb_bf16_high of 16 open words. */
FB_ALWAYS_INLINE void fb_avx512_split_open(__m512i open, __m512i *low, __m512i *high)
{
    *high = _mm512_srli_epi32(open, 16);
    /* (open ^ high) & 0xFFFF: truth table of a ^ b and c */
    *low = _mm512_ternarylogic_epi32(open, *high, _mm512_set1_epi32(0xFFFF), 0x28);
}

/* fb_bf16_rounded_bits of 16 lanes: the plain add when no lane needs the
 * NaN select (`plain`). */
FB_ALWAYS_INLINE __m512i fb_avx512_rounded_bits(__m512 x, __m512i increment, const int plain)
{
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i sum = _mm512_add_epi32(bits, increment);
    if (plain)
        return sum;
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(sum, nan, bits, _mm512_set1_epi32(0x00400000));
}

/* 32 bfloat16 in element order: the high 16-bit words of `first` (elements
 * 0-15) and `second` (16-31). */
FB_ALWAYS_INLINE __m512i fb_avx512_high_words(__m512i first, __m512i second)
{
    const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                               31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_permutex2var_epi16(first, odd_words, second);
}

/* fb_adam_bs_avx2_loop on 16 lanes, in element order: element i hashes
 * word_base[0] + i, m takes the low half and v the high half. */
FB_ALWAYS_INLINE int32_t fb_adam_bs_avx512_loop(float *restrict param, const float *restrict grad,
                                                uint16_t *restrict exp_avg, uint16_t *restrict exp_avg_sq,
                                                int32_t n, const fb_avx512_adam_constants k, const int decoupled,
                                                const fb_rounding rounding, const int stochastic,
                                                const int negate, const int scalar_nan)
{
    __m512i counter = _mm512_add_epi32(_mm512_set1_epi32((int)rounding.word_base[0]),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i sixteen = _mm512_set1_epi32(16);
    const int32_t end = n - n % 32;
    for (int32_t i = 0; i < end; i += 32) {
        if (i + FB_ADAM_PREFETCH_ELEMENTS < n) { /* this iteration's 32 elements of each array */
            fb_adam_prefetch(param + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *param);
            fb_adam_prefetch(grad + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *grad);
            fb_adam_prefetch(exp_avg + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *exp_avg);
            fb_adam_prefetch(exp_avg_sq + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *exp_avg_sq);
        }
        __m512 m[2], v[2], g[2];
        for (int h = 0; h < 2; ++h) {
            const int32_t at = i + 16 * h;
            g[h] = _mm512_loadu_ps(grad + at);
            const __m512 p = fb_avx512_adam16(&k, g[h], _mm512_loadu_ps(param + at),
                                              fb_bf16_widen16(exp_avg + at), fb_bf16_widen16(exp_avg_sq + at),
                                              decoupled, negate, &m[h], &v[h]);
            _mm512_storeu_ps(param + at, p);
        }
        __m512i m_inc[2], v_inc[2];
        for (int h = 0; h < 2; ++h) {
            if (stochastic) {
                fb_avx512_split_open(fb_avx512_hash_open(counter), &m_inc[h], &v_inc[h]);
                counter = _mm512_add_epi32(counter, sixteen);
            } else {
                m_inc[h] = fb_bf16_nearest_increment16(m[h]);
                v_inc[h] = fb_bf16_nearest_increment16(v[h]);
            }
        }
        const int plain = !scalar_nan && !_mm512_cmp_ps_mask(g[0], g[1], _CMP_UNORD_Q);
        __m512i mb[2], vb[2];
        for (int h = 0; h < 2; ++h) {
            mb[h] = plain ? fb_avx512_rounded_bits(m[h], m_inc[h], 1) : fb_avx512_rounded_bits(m[h], m_inc[h], 0);
            vb[h] = plain ? fb_avx512_rounded_bits(v[h], v_inc[h], 1) : fb_avx512_rounded_bits(v[h], v_inc[h], 0);
        }
        _mm512_storeu_si512((void *)(exp_avg + i), fb_avx512_high_words(mb[0], mb[1]));
        _mm512_storeu_si512((void *)(exp_avg_sq + i), fb_avx512_high_words(vb[0], vb[1]));
    }
    return end;
}

FB_ADAM_VECTOR_ENTRY(fb_adam_bs_avx512, float, fb_adam_bs_avx512_loop, fb_avx512_adam_constants)

/* fb_adam_bpbs_avx2_loop on 16 lanes: 32 elements per iteration in pair
 * order (a 512-bit load of 32 bfloat16 is 16 words; the even elements widen
 * with a shift, the odd ones with a mask), NaN lanes as there. */
FB_ALWAYS_INLINE __m512i fb_avx512_pair_round(__m512 even, __m512 odd, __m512i even_increment,
                                              __m512i odd_increment, const int any_nan)
{
    const __m512i even_bits = fb_avx512_rounded_bits(even, even_increment, !any_nan);
    const __m512i odd_bits = fb_avx512_rounded_bits(odd, odd_increment, !any_nan);
    return _mm512_mask_blend_epi16((__mmask32)0xAAAAAAAAu, _mm512_srli_epi32(even_bits, 16), odd_bits);
}

FB_ALWAYS_INLINE int32_t fb_adam_bpbs_avx512_loop(uint16_t *restrict param, const uint16_t *restrict grad,
                                                  uint16_t *restrict exp_avg, uint16_t *restrict exp_avg_sq,
                                                  int32_t n, const fb_avx512_adam_constants k, const int decoupled,
                                                  const fb_rounding rounding, const int stochastic,
                                                  const int negate, const int any_nan)
{
    const __m512i high_mask = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512i counter_even = _mm512_add_epi32(
        _mm512_set1_epi32((int)rounding.word_base[0]),
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
    __m512i counter_pair = _mm512_add_epi32(_mm512_set1_epi32((int)rounding.word_base[2]),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i one = _mm512_set1_epi32(1);
    const int32_t end = n - n % 32;
    for (int32_t i = 0; i < end; i += 32) {
        if (i + FB_ADAM_PREFETCH_ELEMENTS < n) { /* this iteration's 32 elements of each array */
            fb_adam_prefetch(param + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *param);
            fb_adam_prefetch(grad + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *grad);
            fb_adam_prefetch(exp_avg + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *exp_avg);
            fb_adam_prefetch(exp_avg_sq + i + FB_ADAM_PREFETCH_ELEMENTS, 32 * sizeof *exp_avg_sq);
        }
        const __m512i pw = _mm512_loadu_si512((const void *)(param + i));
        const __m512i gw = _mm512_loadu_si512((const void *)(grad + i));
        const __m512i mw = _mm512_loadu_si512((const void *)(exp_avg + i));
        const __m512i vw = _mm512_loadu_si512((const void *)(exp_avg_sq + i));
        __m512 m_out[2], v_out[2], p_out[2];
        for (int h = 0; h < 2; ++h) {
#define FB_HALF(w) _mm512_castsi512_ps(h ? _mm512_and_si512((w), high_mask) : _mm512_slli_epi32((w), 16))
            p_out[h] = fb_avx512_adam16(&k, FB_HALF(gw), FB_HALF(pw), FB_HALF(mw), FB_HALF(vw), decoupled, negate,
                                        &m_out[h], &v_out[h]);
#undef FB_HALF
        }
        __m512i m_inc[2], v_inc[2], p_inc[2];
        if (stochastic) {
            fb_avx512_split_open(fb_avx512_hash_open(counter_even), &m_inc[0], &v_inc[0]);
            fb_avx512_split_open(fb_avx512_hash_open(_mm512_add_epi32(counter_even, one)), &m_inc[1], &v_inc[1]);
            fb_avx512_split_open(fb_avx512_hash_open(counter_pair), &p_inc[0], &p_inc[1]);
            counter_even = _mm512_add_epi32(counter_even, _mm512_set1_epi32(32));
            counter_pair = _mm512_add_epi32(counter_pair, _mm512_set1_epi32(16));
        } else {
            for (int h = 0; h < 2; ++h) {
                m_inc[h] = fb_bf16_nearest_increment16(m_out[h]);
                v_inc[h] = fb_bf16_nearest_increment16(v_out[h]);
                p_inc[h] = fb_bf16_nearest_increment16(p_out[h]);
            }
        }
        _mm512_storeu_si512((void *)(exp_avg + i),
                            fb_avx512_pair_round(m_out[0], m_out[1], m_inc[0], m_inc[1], any_nan));
        _mm512_storeu_si512((void *)(exp_avg_sq + i),
                            fb_avx512_pair_round(v_out[0], v_out[1], v_inc[0], v_inc[1], any_nan));
        _mm512_storeu_si512((void *)(param + i),
                            fb_avx512_pair_round(p_out[0], p_out[1], p_inc[0], p_inc[1], any_nan));
    }
    return end;
}

FB_ADAM_VECTOR_ENTRY(fb_adam_bpbs_avx512, uint16_t, fb_adam_bpbs_avx512_loop, fb_avx512_adam_constants)
#endif

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
