/* fb_parallel.h -- the one OpenMP shim and the threading policy.
 *
 * With OpenMP (the build passes -fopenmp) these wrap the runtime; without it
 * they are serial stubs, so no other file ever branches on _OPENMP.  Kernels
 * write `#pragma omp parallel num_threads(nt) if (nt > 1)`: without OpenMP the
 * pragma is ignored and the body runs once with thread id 0 of 1.
 */
#ifndef FASTBN_PARALLEL_H
#define FASTBN_PARALLEL_H

#include "fastbn_common.h"

#ifdef _OPENMP
#include <omp.h>
#define FASTBN_HAVE_OPENMP 1
static inline int fb_thread_id(void) { return omp_get_thread_num(); }
static inline int fb_team_size(void) { return omp_get_num_threads(); }
static inline int fb_max_threads(void) { return omp_get_max_threads(); }
static inline void fb_set_max_threads(int n) { omp_set_num_threads(n); }
#else
#define FASTBN_HAVE_OPENMP 0
static inline int fb_thread_id(void) { return 0; }
static inline int fb_team_size(void) { return 1; }
static inline int fb_max_threads(void) { return 1; }
static inline void fb_set_max_threads(int n) { (void)n; }
#endif

/* Below this many elements a kernel runs serially: waking the team and the
 * closing barrier cost a few microseconds, about what one core needs to
 * stream 32K floats, so splitting smaller work only adds latency. */
#define FASTBN_SERIAL_ELEMENTS ((fb_index)32768)

/* Threads worth using for `work` elements when the caller allows `requested`:
 * at least FASTBN_SERIAL_ELEMENTS/2 elements per thread. */
static inline int fb_threads_for(fb_index work, int requested)
{
    if (requested <= 1 || work < FASTBN_SERIAL_ELEMENTS)
        return 1;
    fb_index useful = work / (FASTBN_SERIAL_ELEMENTS / 2);
    return useful < requested ? (int)useful : requested;
}

/* Contiguous share [*begin, *end) of `total` items for thread `tid` of `nt`,
 * sizes differing by at most one item. */
static inline void fb_split_range(fb_index total, int nt, int tid, fb_index *begin, fb_index *end)
{
    fb_index base = total / nt, extra = total % nt;
    fb_index start = tid * base + (tid < extra ? tid : extra);
    *begin = start;
    *end = start + base + (tid < extra ? 1 : 0);
}

#endif /* FASTBN_PARALLEL_H */
