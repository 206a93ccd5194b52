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

/* Optimizer kernels: below this many elements a kernel runs serially:
 * waking the team and the closing barrier cost a few microseconds, about
 * what one core needs to stream 32K floats, so splitting smaller work only
 * adds latency. */
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

/* Batch-norm kernels: below this many bytes moved per call (bytes read plus
 * bytes written, counting each array once) a kernel runs on one thread, and
 * every thread gets at least half of it.  Measured on 2 cores (Zen 4 class
 * VM, 1 MiB L2 per core, libgomp), float32, best of 5-9 interleaved 1- vs
 * 2-thread blocks in one process, 1-thread time / 2-thread time:
 *
 *   bytes moved         ~100-200 KiB   ~500-770 KiB   ~1-3 MiB    ~8-12 MiB
 *   eval (N,C)/NCHW/NHWC  0.4-0.9        1.1-1.4        1.5-1.65    1.8-1.9
 *   train NCHW / NHWC     1.3 / 1.06     1.05 / 1.06    1.44 / 1.89  3.1 / 2.2
 *   backward NCHW / NHWC  1.2 / 0.45     1.5 / 1.3      1.9 / 1.6   >2
 *   train / bwd (N,64)    1.0 / 1.2      1.24 / 1.29    1.73 / 1.70  -
 *   train / bwd (N,256)   0.9 / 1.0      0.65 / 0.84    0.8-1.5 / 1.0-1.5
 *
 * Below ~1 MiB the best case gains at most ~1.3x, a few microseconds, while
 * the cost of a second thread is unbounded on a busy machine: when the
 * worker is descheduled, the caller spins at the closing barrier for a
 * scheduler slice.  With two other processes keeping both cores busy, the
 * median 2-thread call at 0.5-1 MiB took 10-100x its 1-thread time (up to
 * 15 ms for a 50 us call).  From 1 MiB, where a call takes >= 30 us on one
 * core, two threads gain 1.4-1.9x in the best case, so that is where they
 * start.  The threshold only chooses how many threads run a plan whose
 * chunks depend on the shape alone: results do not depend on it.  (Wide,
 * short (N, C) arrays keep two threads even with one row chunk: see
 * bn_plan.h after FB_BN_OWNED_COLUMNS_PER_THREAD.) */
#define FASTBN_PARALLEL_BYTES ((fb_index)1 << 20)

/* Threads worth using for a call moving `bytes` when the caller allows
 * `requested`: one below FASTBN_PARALLEL_BYTES, else at least
 * FASTBN_PARALLEL_BYTES / 2 per thread. */
static inline int fb_threads_for_bytes(fb_index bytes, int requested)
{
    if (requested <= 1 || bytes < FASTBN_PARALLEL_BYTES)
        return 1;
    const fb_index useful = bytes / (FASTBN_PARALLEL_BYTES / 2);
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
