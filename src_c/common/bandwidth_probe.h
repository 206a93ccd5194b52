/* bandwidth_probe.h -- the roofline for memory-bound kernels: how fast this
 * machine copies an array far larger than its caches, with the same thread
 * count the kernels use.  The pass dst += 0.5 * src moves 3 x n x 8 bytes
 * (two reads, one write; dst is read anyway, so no write-allocate read), the
 * count fastbn.bench divides by; a kernel's "bytes that must move" count no
 * write-allocate read either (training forward: x read once, y written). */
#ifndef FASTBN_BANDWIDTH_PROBE_H
#define FASTBN_BANDWIDTH_PROBE_H

#include <time.h>

#include "fb_parallel.h"

static double fb_probe_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Best wall time (seconds) of `repeats` parallel passes dst += 0.5 * src. */
static double fastbn_stream_probe(double *dst, const double *src, fb_index n, int num_threads,
                                int repeats)
{
    double best = 1e300;
    const int nt = num_threads > 0 ? num_threads : 1;
    for (int r = 0; r < repeats; ++r) {
        double start = fb_probe_now();
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            fb_index begin, end;
            fb_split_range(n, fb_team_size(), fb_thread_id(), &begin, &end);
#pragma omp simd
            for (fb_index i = begin; i < end; ++i)
                dst[i] += 0.5 * src[i];
        }
        double elapsed = fb_probe_now() - start;
        if (elapsed < best)
            best = elapsed;
    }
    return best;
}

#endif /* FASTBN_BANDWIDTH_PROBE_H */
