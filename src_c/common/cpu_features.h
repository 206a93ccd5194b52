/* cpu_features.h -- which SIMD targets this CPU (and OS) can run.
 *
 * Compiled only into the baseline-flagged _core module.  GCC/Clang's
 * __builtin_cpu_supports also checks that the OS saves the wide registers
 * (XCR0), so "supported" here means safe to execute.
 */
#ifndef FASTBN_CPU_FEATURES_H
#define FASTBN_CPU_FEATURES_H

static inline int fastbn_cpu_has_avx2(void)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static inline int fastbn_cpu_has_avx512(void)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

/* 1 when the kernels for that target were compiled into this build. */
static inline int fastbn_target_compiled(int target)
{
#if defined(FASTBN_X86_TARGETS) && FASTBN_X86_TARGETS
    return target >= 0 && target <= 2;
#else
    return target == 0;
#endif
}

#endif /* FASTBN_CPU_FEATURES_H */
