/* bn_bf16_convert.h -- float32 -> bfloat16 narrowing for the batch-norm
 * kernels: round-to-nearest-even with the semantics of the AVX512_BF16
 * conversion instruction (VCVTNEPS2BF16), in portable C and, where the
 * target and the CPU allow, with the instruction itself.  Both give the
 * same bits for every float32:
 *   - NaN: the top half with the quiet bit set (sign and the payload's top
 *     bits kept);
 *   - subnormal input (|x| < 2**-126, nonzero): a zero of the same sign
 *     (the instruction treats subnormal inputs as zero);
 *   - otherwise nearest-even on the bit pattern: add 0x7FFF plus the lowest
 *     kept bit, keep the top half.  Carries ripple into the exponent, so
 *     values past the largest finite bfloat16 (by at least half an ulp)
 *     become infinity and infinities stay infinite.
 * The subnormal rule is the one difference from fb_bf16.h's
 * fb_f32_to_bf16_nearest (the optimizers keep subnormals): batch norm
 * follows the instruction, so that the portable path matches it bit for bit
 * without patching the instruction's lanes.
 *
 * The instruction path exists only in the AVX-512 build of the kernels
 * (AVX512F/BW/VL are then guaranteed) and is taken when the CPU also reports
 * avx512bf16 at run time; it is compiled with a target attribute, so the
 * build needs no -mavx512bf16 flag and runs on CPUs without it.
 */
#ifndef FASTBN_BN_BF16_CONVERT_H
#define FASTBN_BN_BF16_CONVERT_H

#include <stdint.h>
#include <stdlib.h>

#include "../common/fastbn_common.h"
#include "../common/fb_bf16.h"

FB_BF16_INLINE uint16_t fb_bn_bf16_round(float x)
{
    const uint32_t bits = fb_bf16_bits_of(x);
    const uint32_t magnitude = bits & UINT32_C(0x7FFFFFFF);
    const uint16_t rounded = (uint16_t)((bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1u)) >> 16);
    const uint16_t quiet_nan = (uint16_t)((bits >> 16) | 0x0040u);
    const uint16_t signed_zero = (uint16_t)((bits >> 16) & 0x8000u);
    return magnitude > UINT32_C(0x7F800000) ? quiet_nan
         : magnitude < UINT32_C(0x00800000) ? signed_zero : rounded;
}

/* fb_bn_bf16_round on 16 lanes (fb_bf16.h's vector layer, AVX2 and AVX-512
 * builds): subnormal lanes become their sign's zero first, then the shared
 * nearest-even narrowing (a signed zero narrows to itself).  The scalar loop
 * it replaces is left to the compiler's vectorizer, whose 32 -> 16 bit
 * packing is not under our control; this one is (not timed on its own: the
 * kernels were measured as a whole). */
#if FB_BF16_HAVE_VECTOR16
#if defined(__AVX512F__) && defined(__AVX512BW__)
FB_BF16_INLINE __m256i fb_bn_bf16_narrow16(fb_bf16_v16 x)
{
    const __m512i bits = _mm512_castps_si512(x);
    const __mmask16 subnormal = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7F800000));
    const __m512i flushed = _mm512_mask_and_epi32(bits, subnormal, bits,
                                                  _mm512_set1_epi32((int)0x80000000u));
    return fb_bf16_narrow16_nearest(_mm512_castsi512_ps(flushed));
}
#else
FB_BF16_INLINE __m256 fb_bn_bf16_flush8(__m256 x)
{
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i zero_exponent = _mm256_cmpeq_epi32(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x7F800000)), _mm256_setzero_si256());
    /* keep every bit, or only the sign where the exponent is zero */
    const __m256i keep = _mm256_or_si256(_mm256_andnot_si256(zero_exponent, _mm256_set1_epi32(-1)),
                                         _mm256_set1_epi32((int)0x80000000u));
    return _mm256_castsi256_ps(_mm256_and_si256(bits, keep));
}

FB_BF16_INLINE __m256i fb_bn_bf16_narrow16(fb_bf16_v16 x)
{
    x.lo = fb_bn_bf16_flush8(x.lo);
    x.hi = fb_bn_bf16_flush8(x.hi);
    return fb_bf16_narrow16_nearest(x);
}
#endif

FB_BF16_INLINE fb_bf16_v16 fb_bn_bf16_load16_f32(const float *src)
{
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return _mm512_loadu_ps(src);
#else
    fb_bf16_v16 v;
    v.lo = _mm256_loadu_ps(src);
    v.hi = _mm256_loadu_ps(src + 8);
    return v;
#endif
}
#endif

static inline void fb_bn_bf16_narrow_portable(const float *restrict src, uint16_t *restrict dst,
                                              fb_index n)
{
    fb_index i = 0;
#if FB_BF16_HAVE_VECTOR16
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), fb_bn_bf16_narrow16(fb_bn_bf16_load16_f32(src + i)));
#endif
#pragma omp simd
    for (fb_index j = i; j < n; ++j)
        dst[j] = fb_bn_bf16_round(src[j]);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__) \
    && defined(__AVX512BW__) && defined(__AVX512VL__) && __GNUC__ >= 10
#define FB_BN_BF16_CAN_USE_INSTRUCTION 1
#include <immintrin.h>

__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
static void fb_bn_bf16_narrow_instruction(const float *restrict src, uint16_t *restrict dst,
                                          fb_index n)
{
    fb_index i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
        const __m256i converted = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, src + i));
        _mm256_mask_storeu_epi16(dst + i, tail, converted);
    }
}

/* FASTBN_BF16_INSTRUCTION=0 in the environment turns the instruction off,
 * so that tests can run the shift-and-add narrowing of the AVX-512 build on
 * a CPU that has the instruction (read per call: a kernel call is long). */
static inline int fb_bn_bf16_cpu_has_instruction(void)
{
    const char *off = getenv("FASTBN_BF16_INSTRUCTION");
    if (off && off[0] == '0' && off[1] == '\0')
        return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
}
#else
#define FB_BN_BF16_CAN_USE_INSTRUCTION 0
static inline int fb_bn_bf16_cpu_has_instruction(void) { return 0; }
#endif

/* dst[i] = fb_bn_bf16_round(src[i]); `instruction`: use the conversion
 * instruction (only when fb_bn_bf16_cpu_has_instruction() said so). */
static inline void fb_bn_bf16_narrow(const float *restrict src, uint16_t *restrict dst, fb_index n,
                                     int instruction)
{
#if FB_BN_BF16_CAN_USE_INSTRUCTION
    if (instruction) {
        fb_bn_bf16_narrow_instruction(src, dst, n);
        return;
    }
#else
    (void)instruction;
#endif
    fb_bn_bf16_narrow_portable(src, dst, n);
}

#endif /* FASTBN_BN_BF16_CONVERT_H */
