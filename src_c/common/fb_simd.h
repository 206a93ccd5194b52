/* fb_simd.h -- the vector layer of the kernels: float64 accumulator lanes
 * for reductions in a fixed order, vectors in the input dtype (short sums,
 * elementwise rewrites), widening, and non-temporal stores.  Compiled once
 * per SIMD target; the widths follow the target's flags.
 * FASTBN_NO_VECTOR_EXTENSIONS (compile flag) selects the plain-C fallback,
 * to test it with GCC.  The batch-norm kernels are its users today (hence the
 * FB_BN_ lane constants); the optimizer kernels' elementwise loops are
 * vectorized by the compiler (`#pragma omp simd`) and need none of it.
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stdint.h>
#include <string.h>

#include "fastbn_common.h"

/* Independent accumulators per reduction: enough to hide the FP-add latency
 * (4 cycles x 2 pipes x 4 doubles per AVX2 vector = 32 lanes would saturate;
 * 16 per sum, two sums, keeps 8 vectors in flight without spilling). */
#define FB_BN_LANES 16
/* Planar lanes first sum 8 values each in the input dtype (8 x 16 = 128
 * values of a run), then add that into their float64 lane: float32 does 8
 * values per AVX2 operation instead of 4, and a float32 sum of 8 values is
 * off by at most ~8 ulp before float64 takes over. */
#define FB_BN_SHORT_SUM 8

/* The lanes as GCC/Clang vector-extension types: exact control over which
 * value goes to which accumulator (the auto-vectorizer spills 16 scalar
 * lanes).  Other compilers get plain C lanes (no short sums). */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(FASTBN_NO_VECTOR_EXTENSIONS)
#define FB_BN_HAVE_VECTORS 1
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define FB_BN_VEC 8
#elif defined(__AVX__)
#define FB_BN_VEC 4
#else
#define FB_BN_VEC 2 /* SSE2: the baseline's native width */
#endif
#define FB_BN_VECS (FB_BN_LANES / FB_BN_VEC)
typedef double fb_vec_d __attribute__((vector_size(FB_BN_VEC * sizeof(double))));
/* "real" vectors: the same width in the input dtype (2 * FB_BN_VEC floats or
 * FB_BN_VEC doubles), used for the in-dtype short sums */
typedef float fb_rvec_f32 __attribute__((vector_size(FB_BN_VEC * sizeof(double))));
typedef double fb_rvec_f64 __attribute__((vector_size(FB_BN_VEC * sizeof(double))));
#define FB_RVEC_LEN_f32 (2 * FB_BN_VEC)
#define FB_RVEC_LEN_f64 (FB_BN_VEC)
/* `rest` takes the values of each run's tail (len % FB_BN_LANES). */
typedef struct { fb_vec_d v[FB_BN_VECS]; double rest; } fb_bn_lanes;

FB_ALWAYS_INLINE fb_rvec_f32 fb_rvec_load_f32(const float *p)
{
    fb_rvec_f32 v;
    memcpy(&v, p, sizeof v);
    return v;
}
FB_ALWAYS_INLINE fb_rvec_f64 fb_rvec_load_f64(const double *p)
{
    fb_rvec_f64 v;
    memcpy(&v, p, sizeof v);
    return v;
}
FB_ALWAYS_INLINE fb_rvec_f32 fb_rvec_broadcast_f32(float value)
{
    fb_rvec_f32 v;
    for (int l = 0; l < FB_RVEC_LEN_f32; ++l)
        v[l] = value;
    return v;
}
FB_ALWAYS_INLINE fb_rvec_f64 fb_rvec_broadcast_f64(double value)
{
    fb_rvec_f64 v;
    for (int l = 0; l < FB_RVEC_LEN_f64; ++l)
        v[l] = value;
    return v;
}

/* Non-temporal store of one vector; p is aligned to the vector size. */
FB_ALWAYS_INLINE void fb_rvec_stream_f32(float *p, fb_rvec_f32 v)
{
#if defined(__AVX512F__)
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    _mm256_stream_ps(p, (__m256)v);
#elif defined(__SSE2__)
    _mm_stream_ps(p, (__m128)v);
#else
    memcpy(p, &v, sizeof v);
#endif
}
FB_ALWAYS_INLINE void fb_rvec_stream_f64(double *p, fb_rvec_f64 v)
{
#if defined(__AVX512F__)
    _mm512_stream_pd(p, (__m512d)v);
#elif defined(__AVX__)
    _mm256_stream_pd(p, (__m256d)v);
#elif defined(__SSE2__)
    _mm_stream_pd(p, (__m128d)v);
#else
    memcpy(p, &v, sizeof v);
#endif
}

/* Widen float lanes into double lanes and add them: float lane l of vector v
 * goes to double lane v * FB_RVEC_LEN + l.  The conversion instruction is
 * spelled out: GCC 12 lowers __builtin_convertvector(float -> double)
 * through the stack. */
FB_ALWAYS_INLINE void fb_widen_add(fb_vec_d *low, fb_vec_d *high, fb_rvec_f32 v)
{
#if defined(__AVX512F__)
    const __m512 w = (__m512)v;
    *low += (fb_vec_d)_mm512_cvtps_pd(_mm512_castps512_ps256(w));
    *high += (fb_vec_d)_mm512_cvtps_pd(
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1)));
#elif defined(__AVX__)
    const __m256 w = (__m256)v;
    *low += (fb_vec_d)_mm256_cvtps_pd(_mm256_castps256_ps128(w));
    *high += (fb_vec_d)_mm256_cvtps_pd(_mm256_extractf128_ps(w, 1));
#elif defined(__SSE2__)
    const __m128 w = (__m128)v;
    *low += (fb_vec_d)_mm_cvtps_pd(w);
    *high += (fb_vec_d)_mm_cvtps_pd(_mm_movehl_ps(w, w));
#else
    for (int l = 0; l < FB_BN_VEC; ++l) {
        (*low)[l] += (double)v[l];
        (*high)[l] += (double)v[FB_BN_VEC + l];
    }
#endif
}

/* Add short in-dtype lane sums into the float64 lanes. */
FB_ALWAYS_INLINE void fb_flush_f32(fb_bn_lanes *a, const fb_rvec_f32 *b)
{
    for (int v = 0; v < FB_BN_LANES / FB_RVEC_LEN_f32; ++v)
        fb_widen_add(&a->v[2 * v], &a->v[2 * v + 1], b[v]);
}
FB_ALWAYS_INLINE void fb_flush_f64(fb_bn_lanes *a, const fb_rvec_f64 *b)
{
    for (int v = 0; v < FB_BN_LANES / FB_RVEC_LEN_f64; ++v)
        a->v[v] += b[v];
}
#else
#define FB_BN_HAVE_VECTORS 0
typedef struct { double v[FB_BN_LANES]; double rest; } fb_bn_lanes;
#endif

/* x - c on the multiply-add pipes: fb_sub_fma_f32(x, one, minus_c), with
 * `one` from fb_opaque_one_f32() and minus_c = -c.  A reduction that centers
 * every value before summing it (x - c, then sums of the differences and of
 * their squares) has about three additions per multiplication, and a Zen 3
 * core runs additions on two pipes and multiply-adds on two others: the
 * additions are the bottleneck while the FMA pipes idle.  fma(x, 1, -c) rounds
 * the exact x - c once, exactly as the subtraction does (same bits), but
 * issues on the FMA pipes.  `one` is hidden from the compiler behind an
 * empty asm so that it does not fold the multiply-add back into a
 * subtraction.  Targets without FMA add -c (also exactly x - c). */
#if defined(__FMA__) && (defined(__GNUC__) || defined(__clang__))
#include <math.h>
FB_ALWAYS_INLINE float fb_opaque_one_f32(void)
{
    float one = 1.0f;
    __asm__("" : "+x"(one));
    return one;
}
FB_ALWAYS_INLINE double fb_opaque_one_f64(void)
{
    double one = 1.0;
    __asm__("" : "+x"(one));
    return one;
}
FB_ALWAYS_INLINE float fb_sub_fma_f32(float x, float one, float minus_c)
{
    return fmaf(x, one, minus_c);
}
FB_ALWAYS_INLINE double fb_sub_fma_f64(double x, double one, double minus_c)
{
    return fma(x, one, minus_c);
}
#else
FB_ALWAYS_INLINE float fb_opaque_one_f32(void)
{
    return 1.0f;
}
FB_ALWAYS_INLINE double fb_opaque_one_f64(void)
{
    return 1.0;
}
FB_ALWAYS_INLINE float fb_sub_fma_f32(float x, float one, float minus_c)
{
    (void)one;
    return x + minus_c;
}
FB_ALWAYS_INLINE double fb_sub_fma_f64(double x, double one, double minus_c)
{
    (void)one;
    return x + minus_c;
}
#endif

/* Orders this thread's non-temporal stores before whatever follows (the end
 * of the parallel region, the return to Python). */
static inline void fb_stream_fence(void)
{
#if FB_BN_HAVE_VECTORS && defined(__SSE2__)
    _mm_sfence();
#endif
}

FB_ALWAYS_INLINE void fb_bn_lanes_zero(fb_bn_lanes *a)
{
    memset(a, 0, sizeof *a);
}

/* Sum of the lanes in lane order, then the tails. */
FB_ALWAYS_INLINE double fb_bn_lanes_total(const fb_bn_lanes *a)
{
    double lanes[FB_BN_LANES], total = 0.0;
    memcpy(lanes, a->v, sizeof lanes);
    for (int l = 0; l < FB_BN_LANES; ++l)
        total += lanes[l];
    return total + a->rest;
}

#endif /* FASTBN_SIMD_H */
