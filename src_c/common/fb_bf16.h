/* fb_bf16.h -- bfloat16 storage: widening to float32, narrowing by
 * round-to-nearest-even or by stochastic rounding, and the counter-based
 * generator that feeds stochastic rounding.
 *
 * bfloat16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa
 * bits), so widening is a 16-bit shift and is exact.  Narrowing adds a
 * rounding increment to the float32 bit pattern and keeps the top half:
 *   - nearest-even: 0x7FFF plus the lowest kept bit (ties go to even);
 *   - stochastic: 16 uniform random bits, so x rounds up with probability
 *     (dropped bits) / 2**16 and the rounding is unbiased.
 * Carries ripple into the exponent, which is exactly right: the largest
 * mantissa rounds up to the next power of two, and past the largest finite
 * bfloat16 to infinity.  Infinities have zero dropped bits and stay
 * infinite; a NaN is kept a quiet NaN explicitly (its payload may sit in the
 * dropped bits alone, and truncating it would give an infinity).
 *
 * The random bits come from a counter-based generator.  Each tensor has a
 * 64-bit key per step, mixed from (seed, step, position of the tensor in its
 * group) by SplitMix64's finalizer.  From it come three 32-bit word keys per
 * 2**32 elements (one 64-bit mix per chunk, not per element), and a word is
 * a 32-bit integer hash (two multiplies) of word_key + counter (low 32 bits;
 * the hash is built for consecutive integers).  A word feeds two 16-bit
 * roundings:
 *   slots 0, 1: state slots 0 and 1 share word 0, whose counter is the
 *               element index i: slot 0 takes its low half, slot 1 its high
 *               half;
 *   slot 2:     state slot 2 draws word 1, slot 3 (the parameter, for
 *               bfloat16 parameters) word 2, each a stream of its own whose
 *               counter is the pair index i >> 1: element i takes the low
 *               half when i is even, the high half when it is odd.
 * So pure bfloat16 Adam hashes three words per two elements (four with
 * amsgrad), not four, and no drawn half goes unused.  A given element at a
 * given step always gets the same bits whatever the thread count, chunking
 * or SIMD target, and a resumed run draws the same bits again.  The NumPy
 * reference (fastbn/optim/_bf16.py) computes the same numbers.
 *
 * Portable C99; the compiler vectorizes the loops of the callers.  The
 * AVX512_BF16 conversion instruction can only do nearest-even (and flushes
 * subnormals), so it is not used for stochastic rounding.
 */
#ifndef FASTBN_BF16_H
#define FASTBN_BF16_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define FB_BF16_INLINE static inline __attribute__((always_inline))
#else
#define FB_BF16_INLINE static inline
#endif

/* 2**64 / golden ratio: SplitMix64's counter increment. */
#define FB_BF16_GOLDEN UINT64_C(0x9E3779B97F4A7C15)

/* SplitMix64's output function: a bijection of 64-bit words whose outputs
 * for consecutive counters pass the usual statistical batteries. */
FB_BF16_INLINE uint64_t fb_bf16_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* The key of one tensor at one step. */
static inline uint64_t fb_bf16_tensor_key(uint64_t seed, uint64_t step, uint64_t position)
{
    uint64_t key = fb_bf16_mix64(seed + FB_BF16_GOLDEN);
    key = fb_bf16_mix64(key ^ step);
    return fb_bf16_mix64(key ^ position);
}

/* Rounding slot of the parameter (after the three state slots). */
#define FB_BF16_PARAM_SLOT 3

/* The key of word `word` (0-2) for the elements whose index >> 32 is `high`
 * of the tensor with `key`.  Chunks start at multiples of 4096, so a chunk
 * never straddles two values of `high`. */
static inline uint32_t fb_bf16_word_key(uint64_t key, int word, uint64_t high)
{
    return (uint32_t)fb_bf16_mix64(key + (4 * high + (uint64_t)word + 1) * FB_BF16_GOLDEN);
}

/* The word (0-2) a rounding slot (0-3) draws, and whether its counter is
 * the pair index (slots 2 and 3) rather than the element index. */
#define FB_BF16_WORD_OF(slot) ((slot) < 2 ? 0 : (slot) - 1)
#define FB_BF16_PAIRED(slot) ((slot) >= 2)

/* A 32-bit integer hash (xor-shift / multiply, two multiplies) with full
 * avalanche: every input bit flips each output bit with probability near
 * 1/2.  The final xor-shift, x ^ (x >> 16), changes only the low half, so
 * it is left to fb_bf16_low/fb_bf16_high: together they take two vector
 * operations (a shift, and one xor-and) instead of four. */
FB_BF16_INLINE uint32_t fb_bf16_hash32_open(uint32_t x)
{
    x ^= x >> 16;
    x *= UINT32_C(0x7FEB352D);
    x ^= x >> 15;
    x *= UINT32_C(0x846CA68B);
    return x;
}

/* Low and high 16 bits of the finished hash of the open word `open`. */
FB_BF16_INLINE uint32_t fb_bf16_low(uint32_t open)
{
    return (open ^ (open >> 16)) & UINT32_C(0xFFFF);
}

FB_BF16_INLINE uint32_t fb_bf16_high(uint32_t open)
{
    return open >> 16;
}

FB_BF16_INLINE uint32_t fb_bf16_hash32(uint32_t x)
{
    const uint32_t open = fb_bf16_hash32_open(x);
    return open ^ (open >> 16);
}

/* The 16 random bits of half `half` (0 low, 1 high) of the open word `open`. */
FB_BF16_INLINE uint32_t fb_bf16_half(uint32_t open, int half)
{
    return half ? fb_bf16_high(open) : fb_bf16_low(open);
}

FB_BF16_INLINE uint32_t fb_bf16_bits_of(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

FB_BF16_INLINE float fb_bf16_to_f32(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Narrow `x` with `increment` added below the kept half (see the header
 * comment); NaN stays a quiet NaN of the same sign: it takes no increment
 * (which could carry its payload into the sign) and gets the quiet bit.
 * Both cases are selected in 32 bits before the one shift, so a vectorizer
 * needs one unordered compare and one masked or for the NaN case and packs
 * one vector per 16 elements (setting the quiet bit after narrowing to 16
 * bits made GCC pack a second vector of quiet bits). */
FB_BF16_INLINE uint32_t fb_bf16_rounded_bits(float x, uint32_t increment)
{
    const int is_nan = x != x;
    const uint32_t bits = fb_bf16_bits_of(x);
    return is_nan ? bits | UINT32_C(0x00400000) : bits + increment;
}

/* The bfloat16 is the top half of fb_bf16_rounded_bits. */
FB_BF16_INLINE uint16_t fb_bf16_narrow(float x, uint32_t increment)
{
    return (uint16_t)(fb_bf16_rounded_bits(x, increment) >> 16);
}

/* fb_bf16_rounded_bits's increment for nearest-even. */
FB_BF16_INLINE uint32_t fb_bf16_nearest_increment(float x)
{
    return UINT32_C(0x7FFF) + ((fb_bf16_bits_of(x) >> 16) & 1u);
}

FB_BF16_INLINE uint16_t fb_f32_to_bf16_nearest(float x)
{
    return fb_bf16_narrow(x, fb_bf16_nearest_increment(x));
}

/* `random16` in [0, 2**16). */
FB_BF16_INLINE uint16_t fb_f32_to_bf16_stochastic(float x, uint32_t random16)
{
    return fb_bf16_narrow(x, random16);
}

/* section: vector widen / nearest-even narrow ---------------------------------- */

/* The same operations as fb_bf16_to_f32 and fb_f32_to_bf16_nearest on whole
 * vectors, for kernels that keep float32 values in registers (the batch-norm
 * rewrites): widening is the 16-bit left shift of zero-extended lanes;
 * narrowing adds 0x7FFF plus the lowest kept bit and keeps the top half, a
 * NaN lane taking the top half with the quiet bit instead.  Bit-identical to
 * the scalar forms lane by lane (subnormals kept, as there; a caller with
 * other subnormal rules applies them before narrowing).  16 lanes per call on
 * both targets: one vector on AVX-512, two on AVX2 (so the 16-bit halves pack
 * into one 256-bit store). */
#if defined(__AVX2__)
#include <immintrin.h>
/* fb_bf16_nearest_increment of 8 lanes (0x7FFF plus the lowest kept bit):
 * the one definition the batch-norm narrowing below and the optimizers'
 * rounding (optim_bf16_impl.h) share. */
FB_BF16_INLINE __m256i fb_bf16_nearest_increment8(__m256 x)
{
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 16),
                                         _mm256_set1_epi32(1));
    return _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FB_BF16_HAVE_VECTOR16 1
typedef __m512 fb_bf16_v16; /* 16 float32 lanes */

/* The same for 16 lanes. */
FB_BF16_INLINE __m512i fb_bf16_nearest_increment16(__m512 x)
{
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 16),
                                         _mm512_set1_epi32(1));
    return _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
}

FB_BF16_INLINE fb_bf16_v16 fb_bf16_widen16_mask(const uint16_t *src, __mmask16 mask)
{
    const __m256i h = _mm256_maskz_loadu_epi16(mask, src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

FB_BF16_INLINE fb_bf16_v16 fb_bf16_widen16(const uint16_t *src)
{
    const __m256i h = _mm256_loadu_si256((const __m256i *)src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

FB_BF16_INLINE __m256i fb_bf16_narrow16_nearest(fb_bf16_v16 x)
{
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, fb_bf16_nearest_increment16(x)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define FB_BF16_HAVE_VECTOR16 1
typedef struct { __m256 lo, hi; } fb_bf16_v16; /* lanes 0-7, 8-15 */

FB_BF16_INLINE __m256 fb_bf16_widen8_bits(__m128i h)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

FB_BF16_INLINE fb_bf16_v16 fb_bf16_widen16(const uint16_t *src)
{
    fb_bf16_v16 v;
    v.lo = fb_bf16_widen8_bits(_mm_loadu_si128((const __m128i *)src));
    v.hi = fb_bf16_widen8_bits(_mm_loadu_si128((const __m128i *)(src + 8)));
    return v;
}

/* 8 lanes of 32-bit results, each < 2**16 */
FB_BF16_INLINE __m256i fb_bf16_narrow8_bits(__m256 x)
{
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, fb_bf16_nearest_increment8(x)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

FB_BF16_INLINE __m256i fb_bf16_narrow16_nearest(fb_bf16_v16 x)
{
    /* packus works per 128-bit half: lo0-3 hi0-3 lo4-7 hi4-7; the permute
     * restores lane order */
    const __m256i packed = _mm256_packus_epi32(fb_bf16_narrow8_bits(x.lo), fb_bf16_narrow8_bits(x.hi));
    return _mm256_permute4x64_epi64(packed, 0xD8);
}
#else
#define FB_BF16_HAVE_VECTOR16 0
#endif

#if defined(__AVX2__)
#include <immintrin.h>
/* Pair order (the AVX2 loops of both kernel families): 16 bfloat16 loaded
 * as 8 32-bit words, word j holding element 2j (low half) and 2j + 1 (high
 * half).  The even elements widen with one shift and the odd ones with one
 * mask, with no lane shuffle; elementwise work on the two halves then packs
 * back in memory order with one shift and one 16-bit blend. */
FB_BF16_INLINE __m256 fb_bf16_pair_even(__m256i words)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
}

FB_BF16_INLINE __m256 fb_bf16_pair_odd(__m256i words)
{
    return _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* 16 bfloat16 in memory order from the even and the odd elements' 32-bit
 * words, each holding its bfloat16 in the top half */
FB_BF16_INLINE __m256i fb_bf16_pair_pack(__m256i even, __m256i odd)
{
    return _mm256_blend_epi16(_mm256_srli_epi32(even, 16), odd, 0xAA);
}
#endif

/* section: array helpers ------------------------------------------------------ */

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>

/* Nearest-even with the conversion instruction, 16 floats at a time.  The
 * instruction treats subnormal inputs as zero, so those lanes take the
 * portable result instead: the output is bit-identical to it. */
static inline void fb_bf16_narrow_nearest_avx512bf16(const float *restrict src, uint16_t *restrict dst,
                                                     int64_t n)
{
    const __m512i exponent = _mm512_set1_epi32(0x7F800000);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(src + i);
        const __m512i bits = _mm512_castps_si512(x);
        const __m256i converted = (__m256i)_mm512_cvtneps_pbh(x);
        const __mmask16 subnormal = _mm512_testn_epi32_mask(bits, exponent)
                                    & _mm512_test_epi32_mask(bits, magnitude);
        if (subnormal) {
            const __m512i increment = _mm512_add_epi32(
                _mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
            const __m256i portable = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, increment), 16));
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_mask_blend_epi16(subnormal, converted, portable));
        } else {
            _mm256_storeu_si256((__m256i *)(dst + i), converted);
        }
    }
    for (; i < n; ++i)
        dst[i] = fb_f32_to_bf16_nearest(src[i]);
}
#endif


/* dst[i] = src[i] rounded to bfloat16 as slot `slot` of elements
 * first .. first + n - 1 of the tensor with `key` (nearest-even when not
 * `stochastic`).  Any `first` and `n`: the word key is recomputed where the
 * index crosses a multiple of 2**32. */
static inline void fb_bf16_round_array(const float *restrict src, uint16_t *restrict dst, int64_t n,
                                       uint64_t key, int slot, int64_t first, int stochastic)
{
    if (!stochastic) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
        fb_bf16_narrow_nearest_avx512bf16(src, dst, n);
#else
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
            dst[i] = fb_f32_to_bf16_nearest(src[i]);
#endif
        return;
    }
    const int word = FB_BF16_WORD_OF(slot);
    int64_t done = 0;
    while (done < n) {
        const uint64_t index = (uint64_t)(first + done);
        const uint64_t to_boundary = (((index >> 32) + 1) << 32) - index;
        const int64_t count = (uint64_t)(n - done) < to_boundary ? n - done : (int64_t)to_boundary;
        const uint32_t word_key = fb_bf16_word_key(key, word, index >> 32);
        const uint32_t low = (uint32_t)index;
        const float *restrict s = src + done;
        uint16_t *restrict d = dst + done;
        if (FB_BF16_PAIRED(slot)) {
            /* the low 32 bits of (index + i) >> 1; low + i does not wrap
             * before the boundary */
            const uint32_t pair_base = word_key + ((uint32_t)(index >> 32) << 31);
#pragma omp simd
            for (int64_t i = 0; i < count; ++i) {
                const uint32_t element = low + (uint32_t)i;
                const uint32_t open = fb_bf16_hash32_open(pair_base + (element >> 1));
                d[i] = fb_f32_to_bf16_stochastic(s[i], fb_bf16_half(open, (int)(element & 1)));
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < count; ++i)
                d[i] = fb_f32_to_bf16_stochastic(s[i], fb_bf16_half(fb_bf16_hash32_open(word_key + low + (uint32_t)i),
                                                                    slot & 1));
        }
        done += count;
    }
}

#endif /* FASTBN_BF16_H */
