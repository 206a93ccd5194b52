/* fastbn_common.h -- types, status codes, naming macros and small inline
 * helpers shared by every kernel family.
 *
 * Kernels are plain C99: no Python API, no allocation inside loops, and an int
 * status as the return value (FASTBN_OK or a negative error).  Each family
 * source is compiled once per SIMD target (see setup.py), with FASTBN_TARGET
 * set to baseline/avx2/avx512; every kernel function is `static`, and only the
 * family's table of function pointers is exported, under a target-suffixed
 * name, so the copies never clash at link time.
 */
#ifndef FASTBN_COMMON_H
#define FASTBN_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* 64-bit indices everywhere: arrays over 2**31 elements must work. */
typedef int64_t fb_index;

enum fastbn_status {
    FASTBN_OK = 0,
    FASTBN_ERR_ARGUMENT = -1, /* a size or pointer the caller should have rejected */
    FASTBN_ERR_NOMEM = -2     /* O(C) workspace could not be allocated */
};

enum fastbn_simd_target {
    FASTBN_TARGET_BASELINE = 0,
    FASTBN_TARGET_AVX2 = 1,   /* AVX2 + FMA */
    FASTBN_TARGET_AVX512 = 2  /* AVX-512 F/BW/VL/DQ */
};

/* Element type of a kernel's buffers: the index into every per-dtype array
 * of function pointers. */
enum fastbn_dtype {
    FB_DTYPE_F32 = 0,
    FB_DTYPE_F64 = 1,
    FB_DTYPE_BF16 = 2, /* bfloat16 storage (uint16_t); per-channel vectors float32 */
    FB_N_DTYPES = 3
};

#define FB_CAT_(a, b) a##_##b
#define FB_CAT(a, b) FB_CAT_(a, b)

/* Name of a target-specific exported symbol, e.g. fastbn_bn_kernels_avx2. */
#ifdef FASTBN_TARGET
#define FB_TARGETED(name) FB_CAT(name, FASTBN_TARGET)
#endif

/* Name of a per-dtype static function inside an *_impl.h template, which is
 * included once with FB_REAL=float/FB_DTYPE=f32 and once with double/f64. */
#define FB_TYPED(name) FB_CAT(name, FB_DTYPE)

#if defined(__GNUC__)
#define FB_UNUSED __attribute__((unused))
#else
#define FB_UNUSED
#endif

/* Small helpers of the vector loops and the work plans: inlined even where
 * the compiler's size heuristics would not, so that each caller's
 * compile-time constants reach the loop. */
#if defined(__GNUC__) || defined(__clang__)
#define FB_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define FB_ALWAYS_INLINE static inline
#endif

/* A rarely taken path kept out of a vector loop, so the loop's registers
 * hold its own constants (not the rare path's). */
#if defined(__GNUC__) || defined(__clang__)
#define FB_COLD static __attribute__((noinline, cold))
#else
#define FB_COLD static
#endif

/* For scalar per-channel arithmetic whose bits must be the same on every
 * target (the baseline build has no FMA, the AVX2/AVX-512 builds do): GCC
 * contracts a * b + c into one fused multiply-add by default where the
 * target has it, which rounds once instead of twice, so a running-statistics
 * update came out one ulp apart between targets.  FB_NO_CONTRACT on the
 * function turns contraction off for GCC; clang honours the standard pragma
 * (written at the start of the function body as FB_NO_CONTRACT_BODY). */
#if defined(__GNUC__) && !defined(__clang__)
#define FB_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define FB_NO_CONTRACT_BODY
#elif defined(__clang__)
#define FB_NO_CONTRACT
#define FB_NO_CONTRACT_BODY _Pragma("STDC FP_CONTRACT OFF")
#else
#define FB_NO_CONTRACT
#define FB_NO_CONTRACT_BODY
#endif

static inline fb_index fb_ceil_div(fb_index a, fb_index b) { return (a + b - 1) / b; }
static inline fb_index fb_min_index(fb_index a, fb_index b) { return a < b ? a : b; }
static inline fb_index fb_max_index(fb_index a, fb_index b) { return a > b ? a : b; }

/* Call LOOP with its option arguments as literal 0/1, so each combination is
 * its own branch-free, vectorized instance. */
#define FB_SELECT1(LOOP, a) ((a) ? LOOP(1) : LOOP(0))
#define FB_SELECT2(LOOP, a, b) \
    ((a) ? ((b) ? LOOP(1, 1) : LOOP(1, 0)) : ((b) ? LOOP(0, 1) : LOOP(0, 0)))
#define FB_SELECT3(LOOP, a, b, c)                                                  \
    ((a) ? ((b) ? ((c) ? LOOP(1, 1, 1) : LOOP(1, 1, 0)) : ((c) ? LOOP(1, 0, 1) : LOOP(1, 0, 0))) \
         : ((b) ? ((c) ? LOOP(0, 1, 1) : LOOP(0, 1, 0)) : ((c) ? LOOP(0, 0, 1) : LOOP(0, 0, 0))))

#endif /* FASTBN_COMMON_H */
