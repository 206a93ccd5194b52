/* fb_cache.h -- the size of this CPU's L2 cache, for walks that size their
 * blocks to be re-read from it, and the software prefetch of row pieces.
 * Timing only: a block size or a prefetch decides the order of memory
 * accesses, never a sum (bn_plan.h).
 *
 * glibc answers sysconf(_SC_LEVEL2_CACHE_SIZE) from CPUID, which traps to
 * the hypervisor under virtualization (microseconds), so it is asked once
 * and the answer kept.  Unknown (another C library, or 0 from the query)
 * reads as 0, and callers keep their size rules for an unknown cache. */
#ifndef FASTBN_CACHE_H
#define FASTBN_CACHE_H

#include "fastbn_common.h"

#if defined(__GNUC__) && defined(__linux__)
#include <unistd.h>
#endif

/* L2 bytes of one core, 0 when unknown. */
static inline fb_index fb_l2_bytes(void)
{
#if defined(__GNUC__) && defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
    /* -1: not asked yet; several threads may ask at once and store the same
     * answer (relaxed atomics: no torn or racing plain accesses) */
    static long known = -1;
    long bytes = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (bytes < 0) {
        bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
        if (bytes < 0)
            bytes = 0;
        __atomic_store_n(&known, bytes, __ATOMIC_RELAXED);
    }
    return (fb_index)bytes;
#else
    return 0;
#endif
}

/* Fetches `rows` pieces of `piece_bytes` bytes, `stride_bytes` apart, from
 * p into L2 (prefetcht1): the channels-last reductions' rows ahead of the
 * ones they read, where short pieces of many rows at once are more streams
 * than the hardware prefetchers follow (bn_train_impl.h, before
 * FB_BN_PREFETCH_MIN_BYTES).  Timing only: no value changes. */
static inline void fb_prefetch_rows(const void *p, fb_index rows, fb_index stride_bytes,
                                    fb_index piece_bytes)
{
#if defined(__GNUC__)
    const char *row = (const char *)p;
    for (fb_index r = 0; r < rows; ++r, row += stride_bytes)
        for (fb_index b = 0; b < piece_bytes; b += 64)
            __builtin_prefetch(row + b, 0, 2);
#else
    (void)p;
    (void)rows;
    (void)stride_bytes;
    (void)piece_bytes;
#endif
}

#endif /* FASTBN_CACHE_H */
