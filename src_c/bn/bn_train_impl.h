/* bn_train_impl.h -- template (FB_REAL, FB_DTYPE): the training forward (batch
 * statistics, running-stat update, normalization), the training backward and
 * the eval-mode backward.  Included once per dtype by bn_kernels.c.
 *
 * All three are one pass shape (bn_plan.h): reduce chunks to per-channel
 * partial sums, finalize per-channel coefficients, rewrite the block with one
 * subtraction of the mean and one or two FMAs per value.  The split phases
 * (end of file): stats and backward_reduce are the same pass stopped after
 * the finalize, with the per-channel results in float64; apply and
 * backward_apply take the fused passes' coefficients and run the straight
 * walk of bn_affine_impl.h.
 *
 * Accumulators: float64, fed by short sums (at most 8 values) formed in the
 * input dtype.  The forward sums (x - center) and (x - center)^2 where center
 * is a value of the channel itself (its first one), so x - center is exact
 * for values near it.  Shifted sums are additive, so chunk partials combine
 * exactly like plain sums, and the cancellation in S2 - S1^2/n costs a
 * relative error of about eps64 * D^2 / var, where D = |center - mean|;
 * since center is one of the n values, D^2 <= n * var, so the error stays
 * below n * 1e-16 whatever the mean (float32 1e4 + N(0, 1) gets its variance
 * to ~1e-7 relative, the rounding of the short sums).
 */


typedef struct {
    int mode;                          /* enum fb_bn_mode */
    int reduce;                        /* 0: eval backward without dweight/dbias */
    int accumulate;                    /* add into dweight/dbias instead of overwriting */
    int stream;                        /* non-temporal stores for the output */
    int relu;                          /* fused ReLU (bn_relu_impl.h) */
    fb_index owned_block;              /* planar owned: channels reduced, then rewritten, together */
    fb_index short_block;              /* planar owned, short rows: channels per block, else 0 */
    const FB_REAL *x, *dy;
    FB_REAL *out;                      /* y (forward) or dx */
    const FB_REAL *weight, *bias;
    const FB_REAL *mean, *spread;      /* backward: saved mean, invstd; eval: running mean, var */
    FB_REAL *saved_mean, *saved_invstd, *running_mean, *running_var;
    FB_REAL *dweight, *dbias;
    double eps, momentum;
    /* split-phase reductions (FB_BN_STATS, FB_BN_BACKWARD_REDUCE):
     * per-channel statistics and sums cross the phase boundary in float64 */
    const double *phase_mean, *phase_invstd; /* IN: BACKWARD_REDUCE */
    double *phase_out1, *phase_out2;   /* OUT: STATS mean, m2; BACKWARD_REDUCE the sums */
    const FB_REAL *mask_weight;        /* relu backwards: the forward's weight, for the mask */
    /* workspace */
    double *sum1, *sum2;               /* per-chunk partials, see bn_plan.h for the indexing */
    double *totals;                    /* interleaved: per thread, 2 x channels channel sums */
    double *center;                    /* per channel: forward shift, or the backward's mean */
    FB_REAL *center_real;              /* the same in the input dtype (exactly: it is an input) */
    FB_REAL *coefficients;             /* per thread: 3 x (channels + FB_BN_WRAP_PAD) */
    FB_REAL *mask_scale, *mask_shift;  /* relu backwards: the forward's coefficients */
} FB_TYPED(bn_pass);

/* Per-channel coefficients of the rewrite (bn_span):
 *   forward:        y  = (x - k2) * k1 + k3            (k2: the mean, in FB_REAL)
 *   backward:       dx = dy * k1 + ((x - mean) * k2 + k3)   (mean: center_real)
 *   eval backward:  dx = (dy - k2) * k1 + k3 with k2 = k3 = 0
 * Each thread has its own set, so threads that share channels can all
 * compute them after one barrier instead of waiting for one another a second
 * time. */
typedef struct {
    FB_REAL *k1, *k2, *k3;
} FB_TYPED(bn_coefficients);

static FB_TYPED(bn_coefficients) FB_TYPED(bn_thread_coefficients)(const FB_TYPED(bn_pass) *pass,
                                                                  fb_index channels, int tid)
{
    FB_TYPED(bn_coefficients) coef;
    const fb_index stride = channels + FB_BN_WRAP_PAD;  /* wrapped (bn_span_wrap) */
    coef.k1 = pass->coefficients + (fb_index)3 * stride * tid;
    coef.k2 = coef.k1 + stride;
    coef.k3 = coef.k2 + stride;
    return coef;
}

/* ---- the gradient the backwards read ---------------------------------------- */

/* dy as the rewrites of the backwards read it where they do not mask it
 * themselves: dy itself, or, with relu, dy masked by the forward's ReLU
 * (bn_relu_impl.h), written into `staging` (at most FB_BN_RELU_BLOCK
 * values).  The planar reduction and the planar training rewrite mask in
 * their own loops instead (bn_lanes_grad, bn_span). */
/* `len` values of channel c at `offset` (planar). */
static inline const FB_REAL *FB_TYPED(bn_grad_span)(const FB_TYPED(bn_pass) *pass, fb_index c,
                                                    fb_index offset, fb_index len,
                                                    FB_REAL *staging)
{
    if (!pass->relu)
        return pass->dy + offset;
    FB_TYPED(bn_relu_mask)(staging, pass->dy + offset, pass->x + offset, len,
                           pass->center_real[c], pass->mask_scale[c], pass->mask_shift[c]);
    return staging;
}

/* `width` values of channels c0.. at `offset` (an interleaved row piece;
 * width <= FB_BN_MAX_GROUP_WIDTH <= FB_BN_RELU_BLOCK). */
static inline const FB_REAL *FB_TYPED(bn_grad_row)(const FB_TYPED(bn_pass) *pass, fb_index c0,
                                                   fb_index offset, fb_index width,
                                                   FB_REAL *staging)
{
    if (!pass->relu)
        return pass->dy + offset;
    FB_TYPED(bn_relu_mask_channels)(staging, pass->dy + offset, pass->x + offset, width,
                                    pass->center_real + c0, pass->mask_scale + c0,
                                    pass->mask_shift + c0);
    return staging;
}

/* ---- reductions over one contiguous run ----------------------------------- */

/* Lane l accumulates the values i of a run with i % FB_BN_LANES == l, in
 * short sums of FB_BN_SHORT_SUM values in the input dtype that are then added
 * to the float64 lane; the run's last len % FB_BN_LANES values go, in order,
 * to the scalar `rest`. */
#if FB_BN_HAVE_VECTORS

#define FB_RVEC FB_TYPED(fb_rvec)
#define FB_RVEC_LEN FB_CAT(FB_RVEC_LEN, FB_DTYPE)
#define FB_RVECS (FB_BN_LANES / FB_RVEC_LEN)

/* The planar statistics (bn_lanes_shifted_from: the statistics phase and
 * the training forward's first read) prefetch x this many bytes ahead of
 * the line they read, past the end of the run too (the bytes after a
 * channel's row piece are the next channel's, read next in an owned
 * block).  AVX-512 builds only, where it was measured: a Xeon (Sapphire
 * Rapids class, AVX512_BF16 and AMX exposed, 2 cores, 2 MiB L2 each, KVM),
 * float32, min of 6 alternated processes x 9 calls, out=, against the build
 * without: 2 threads, statistics (64,128,56,56) 2.55 -> 2.09 ms,
 * (32,64,112,112) 2.45 -> 2.01, training forward 4.94 -> 4.70 and 6.22 ->
 * 6.01 ms; 1 thread (64,128,56,56) statistics 6.00 -> 4.47, training
 * forward 10.77 -> 9.63 ms; (128,64,28,28) and (16,256,28,28), whose data
 * stays in L2/L3 across calls, unchanged (0.46-0.47, 0.23-0.24 ms).  512
 * bytes ahead gained less on the statistics (2.22, 2.16 ms), 2048 the same
 * as 1024.  The backward's sums (dy and x) did not gain from the same
 * prefetch of both arrays: (64,128,56,56) 8.93 -> 9.08 ms, (32,64,112,112)
 * 10.14 -> 10.30, (128,64,28,28) 1.65 -> 1.76 (1.69 when kept inside the
 * run, where the statistics lost their gain too), so they prefetch the
 * next row's piece instead (below).  On the AVX2 machine (Zen 3) the
 * hardware prefetchers kept up with these single-stream runs (see the turns
 * below), so the other builds have none either.  float64 takes the same one
 * prefetch per FB_BN_LANES values (every other 64-byte line; not measured
 * separately).  A prefetch changes no value. */
#if defined(__AVX512F__)
#define FB_BN_STATS_PREFETCH_BYTES 1024
#else
#define FB_BN_STATS_PREFETCH_BYTES 0
#endif

/* The backward's sums (bn_lanes_grad) prefetch instead the same piece of
 * the next row, one row of planes away (`ahead` values; 0: none), as the
 * bfloat16 reductions do (bn_bf16_impl.h), in the walks that read a
 * channel row by row (owned blocks, shared chunks).  AVX-512 builds only,
 * measured there as above, two runs: 2 threads, backward (64,128,56,56)
 * 11.18 -> 10.67 and 10.23 -> 9.25 ms, (32,64,112,112) 11.59 -> 10.67 and
 * 10.51 -> 9.54, (128,64,28,28) 1.76 -> 1.71, (16,256,28,28) and
 * (24,80,48,48) within 1 %; 1 thread (64,128,56,56) 21.70 -> 20.72 ms.
 * (The bfloat16 backward on that machine lost 20-25 % without its next-row
 * prefetch, 4.29 -> 5.27 ms, when it took 1024 bytes ahead instead.) */
#if defined(__AVX512F__)
#define FB_BN_GRAD_PREFETCH_NEXT_ROW 1
#else
#define FB_BN_GRAD_PREFETCH_NEXT_ROW 0
#endif

/* bn_lanes_grad's `ahead` for a run of row `row - 1` (planar walks). */
static inline fb_index FB_TYPED(bn_next_row_ahead)(const fb_bn_plan *plan, fb_index row)
{
    return FB_BN_GRAD_PREFETCH_NEXT_ROW && row < plan->outer ? plan->row_channels * plan->inner : 0;
}

/* a1 += x - center, a2 += (x - center)^2 */
FB_ALWAYS_INLINE void FB_TYPED(bn_lanes_shifted_from)(const FB_REAL *restrict x, fb_index i,
                                                  fb_index len, FB_REAL center,
                                                  fb_bn_lanes *restrict a1,
                                                  fb_bn_lanes *restrict a2)
{
    const FB_RVEC shift = FB_TYPED(fb_rvec_broadcast)(center);
    while (i + FB_BN_LANES <= len) {
        FB_RVEC b1[FB_RVECS], b2[FB_RVECS];
        for (int v = 0; v < FB_RVECS; ++v)
            b1[v] = b2[v] = FB_TYPED(fb_rvec_broadcast)(0);
        const fb_index stop = i + FB_BN_SHORT_SUM * FB_BN_LANES;
        for (; i + FB_BN_LANES <= len && i < stop; i += FB_BN_LANES) {
#if FB_BN_STATS_PREFETCH_BYTES > 0
            /* an address, not a pointer: it may lie past the end of x */
            __builtin_prefetch((const void *)((uintptr_t)(x + i) + FB_BN_STATS_PREFETCH_BYTES), 0, 3);
#endif
            for (int v = 0; v < FB_RVECS; ++v) {
                const FB_RVEC d = FB_TYPED(fb_rvec_load)(x + i + v * FB_RVEC_LEN) - shift;
                b1[v] += d;
                b2[v] += d * d;
            }
        }
        FB_TYPED(fb_flush)(a1, b1);
        FB_TYPED(fb_flush)(a2, b2);
    }
    for (; i < len; ++i) {
        const FB_REAL d = x[i] - center;
        a1->rest += (double)d;
        a2->rest += (double)(d * d);
    }
}

/* a1 += g, a2 += g * (x - center), g = dy, or with relu dy masked where
 * (x - center) * mask_scale + mask_shift <= 0 (bn_relu_impl.h; the backwards'
 * center is the forward's mean).  Always inlined, and
 * called with a constant relu, so the plain path carries no mask code.
 * `ahead` > 0: prefetch dy and x that many values ahead (timing only). */
FB_ALWAYS_INLINE void FB_TYPED(bn_lanes_grad)(const FB_REAL *restrict dy, const FB_REAL *restrict x,
                                          fb_index len, FB_REAL center, fb_bn_lanes *restrict a1,
                                          fb_bn_lanes *restrict a2, const int relu,
                                          FB_REAL mask_scale, FB_REAL mask_shift, fb_index ahead)
{
    const FB_RVEC shift = FB_TYPED(fb_rvec_broadcast)(center);
    const FB_RVEC vscale = FB_TYPED(fb_rvec_broadcast)(mask_scale);
    const FB_RVEC vshift = FB_TYPED(fb_rvec_broadcast)(mask_shift);
    fb_index i = 0;
    while (i + FB_BN_LANES <= len) {
        FB_RVEC b1[FB_RVECS], b2[FB_RVECS];
        for (int v = 0; v < FB_RVECS; ++v)
            b1[v] = b2[v] = FB_TYPED(fb_rvec_broadcast)(0);
        const fb_index stop = i + FB_BN_SHORT_SUM * FB_BN_LANES;
        for (; i + FB_BN_LANES <= len && i < stop; i += FB_BN_LANES) {
            if (ahead) {
                __builtin_prefetch(x + i + ahead, 0, 3);
                __builtin_prefetch(dy + i + ahead, 0, 3);
            }
            for (int v = 0; v < FB_RVECS; ++v) {
                const FB_RVEC d = FB_TYPED(fb_rvec_load)(x + i + v * FB_RVEC_LEN) - shift;
                FB_RVEC g = FB_TYPED(fb_rvec_load)(dy + i + v * FB_RVEC_LEN);
                if (relu)
                    g = FB_TYPED(bn_relu_mask_vec)(g, d, vscale, vshift);
                b1[v] += g;
                b2[v] += g * d;
            }
        }
        FB_TYPED(fb_flush)(a1, b1);
        FB_TYPED(fb_flush)(a2, b2);
    }
    for (; i < len; ++i) {
        const FB_REAL g = relu ? FB_TYPED(bn_relu_masked_scalar)(dy[i], x[i], center,
                                                                 mask_scale, mask_shift)
                               : dy[i];
        a1->rest += (double)g;
        a2->rest += (double)(g * (x[i] - center));
    }
}

#undef FB_RVEC
#undef FB_RVEC_LEN
#undef FB_RVECS

#else /* plain C lanes (no short sums): compilers without vector extensions */

FB_ALWAYS_INLINE void FB_TYPED(bn_lanes_shifted_from)(const FB_REAL *restrict x, fb_index i,
                                                  fb_index len, FB_REAL center,
                                                  fb_bn_lanes *restrict a1,
                                                  fb_bn_lanes *restrict a2)
{
    for (; i + FB_BN_LANES <= len; i += FB_BN_LANES)
        for (int l = 0; l < FB_BN_LANES; ++l) {
            const FB_REAL d = x[i + l] - center;
            a1->v[l] += (double)d;
            a2->v[l] += (double)(d * d);
        }
    for (; i < len; ++i) {
        const FB_REAL d = x[i] - center;
        a1->rest += (double)d;
        a2->rest += (double)(d * d);
    }
}

static inline void FB_TYPED(bn_lanes_grad)(const FB_REAL *restrict dy, const FB_REAL *restrict x,
                                           fb_index len, FB_REAL center, fb_bn_lanes *restrict a1,
                                           fb_bn_lanes *restrict a2, const int relu,
                                           FB_REAL mask_scale, FB_REAL mask_shift, fb_index ahead)
{
    (void)ahead;
    fb_index i = 0;
    for (; i + FB_BN_LANES <= len; i += FB_BN_LANES)
        for (int l = 0; l < FB_BN_LANES; ++l) {
            const FB_REAL g = relu ? FB_TYPED(bn_relu_masked_scalar)(dy[i + l], x[i + l],
                                                                     center, mask_scale,
                                                                     mask_shift)
                                   : dy[i + l];
            a1->v[l] += (double)g;
            a2->v[l] += (double)(g * (x[i + l] - center));
        }
    for (; i < len; ++i) {
        const FB_REAL g = relu ? FB_TYPED(bn_relu_masked_scalar)(dy[i], x[i], center,
                                                                 mask_scale, mask_shift)
                               : dy[i];
        a1->rest += (double)g;
        a2->rest += (double)(g * (x[i] - center));
    }
}

#endif

/* A whole run, from its first value. */
FB_ALWAYS_INLINE void FB_TYPED(bn_lanes_shifted)(const FB_REAL *restrict x, fb_index len,
                                             FB_REAL center, fb_bn_lanes *restrict a1,
                                             fb_bn_lanes *restrict a2)
{
    FB_TYPED(bn_lanes_shifted_from)(x, 0, len, center, a1, a2);
}


/* ---- several runs at once (planar statistics) ------------------------------
 * A planar reduction reads a channel's row pieces, H*W values each, one
 * after another; consecutive pieces are a sample apart in memory (C*H*W
 * values), so the hardware prefetcher follows one stream that restarts at
 * every row piece.  The statistics instead read FB_BN_STREAMS independent
 * runs in turns -- consecutive chunks of a channel (shared plan, owned
 * channels one at a time), or neighbouring channels of an owned block in
 * the same row -- so that many streams are in flight.  Each run keeps its
 * own lanes and is cut into exactly the short sums bn_lanes_shifted forms
 * (a turn is one whole short sum, FB_BN_BLOCK_VALUES values counted from
 * the run's start; a run's last turn is its remainder with the scalar
 * tail), so every sum is the one-run-at-a-time walk's, bit for bit: only
 * the order of the memory reads changes, and whether a shape takes turns
 * changes no value.
 * Measured (float32, 1 thread, min CPU time of 30 interleaved rounds
 * against the one-run walk, load 8.5 on the 2-core machine): statistics of
 * (32,128,56,56) 2.94 against 3.40 ms with four streams, 3.43 / 3.33 with
 * two, 2.87 / 3.33 with eight (blocks of four channels there: four);
 * (64,64,56,56) 3.02 / 3.53, training forward 5.74 / 6.18; (16,64,112,112)
 * (chunks of one channel in turns) 2.97 / 3.36.  Short rows lost:
 * (32,256,28,28), 3 KiB rows of blocks of 16 channels, whose row pieces
 * are already one 50 KiB stretch, 2.03 against 1.62 ms -- hence turns only
 * from FB_BN_STREAM_ROW_BYTES rows.  The backward's sums (dy and x, two
 * streams already) did not gain: (32,128,56,56) 5.09 / 5.09 ms with four,
 * 5.23 / 4.85 with two; the backward keeps the one-run walk.  Nor did the
 * split backward_reduce alone (no rewrite after it; session 9: the owned
 * blocks' channels in turns, dy and x of each a stream, every turn one
 * short sum, bits unchanged), (32,128,56,56) float32, 1 thread, min CPU time
 * of 25 rounds alternated with main's build (benchmarks/bn_phases.py
 * --against, load 5-5.4): four channels in turns 4.50 against 4.11 ms, two
 * 4.21 against 3.76 ms.  The final
 * build (25 rounds, load 5.7-5.9): 1 thread (32,128,56,56) statistics 3.01
 * / 3.42, training forward 5.55 / 5.84 ms, (16,64,112,112) 2.85 / 3.24 and
 * 5.56 / 5.91; 2 threads 1.59 / 1.89 and 2.84 / 3.04, 1.58 / 3.17 and
 * 3.06 / 3.98 (CPU time mins; the 2-thread medians were the scheduler's);
 * float64 statistics (32,64,56,56) 2.85 / 3.06, (16,32,112,112) 2.46 /
 * 2.91 ms.
 * The turns live in functions of their own (bn_owned_turns, not a branch
 * inside bn_owned_channels): with the branch inside, GCC contracted the
 * unchanged backward reduction of that walker into FMAs differently on
 * AVX2, and (16,6,2100) float64 dweight differed by one ulp between 1 and
 * 2 threads. */
#define FB_BN_BLOCK_VALUES ((fb_index)FB_BN_SHORT_SUM * FB_BN_LANES)

typedef struct {
    const FB_REAL *x;            /* the current run */
    fb_index i, len;             /* the next value of the run, its length */
    FB_REAL center;
    fb_bn_lanes *a1, *a2;
} FB_TYPED(bn_stream);

/* Whether this pass's reduction takes runs in turns (depends on the shape
 * and mode only; no value depends on it). */
static inline int FB_TYPED(bn_takes_turns)(const fb_bn_plan *plan,
                                           const FB_TYPED(bn_pass) *pass)
{
    return fb_bn_reduces_x(pass->mode)
        && plan->inner * (fb_index)sizeof(FB_REAL) >= FB_BN_STREAM_ROW_BYTES;
}

/* Whether the owned walk of this pass is bn_owned_paced: a training forward
 * (plain or ReLU) whose output is streamed, rows longer than the short ones
 * (see there; depends on the shape and mode only). */
static inline int FB_TYPED(bn_paces)(const FB_TYPED(bn_pass) *pass)
{
    return pass->mode == FB_BN_FORWARD && pass->reduce && pass->stream
        && pass->short_block == 0;
}

/* One turn: the stream's next short sum, or the rest of its run; returns
 * whether the run has values left. */
FB_ALWAYS_INLINE int FB_TYPED(bn_stream_turn)(FB_TYPED(bn_stream) *s)
{
    const fb_index stop = s->len - s->i > FB_BN_BLOCK_VALUES ? s->i + FB_BN_BLOCK_VALUES
                                                             : s->len;
    FB_TYPED(bn_lanes_shifted_from)(s->x, s->i, stop, s->center, s->a1, s->a2);
    s->i = stop;
    return stop < s->len;
}

FB_ALWAYS_INLINE void FB_TYPED(bn_stream_run)(FB_TYPED(bn_stream) *s, const FB_REAL *x,
                                              fb_index len)
{
    s->x = x;
    s->i = 0;
    s->len = len;
}

/* A rewrite paced by a reduction (bn_owned_paced): channel c, whose
 * coefficients are set, is rewritten a few KiB at a time from row r, value k
 * of the row, while the next channel is reduced.  `debt`: values reduced
 * since the last step. */
typedef struct {
    FB_TYPED(bn_coefficients) coef;
    FB_REAL *staging;
    fb_index c, r, k, debt;
} FB_TYPED(bn_paced);

/* A step of the paced rewrite follows every FB_BN_PACE_BYTES of values
 * reduced in turns (counted as whole turns, so about that many): 4 KiB,
 * between the 1 and 12.5 KiB pieces tried (bn_owned_paced).  Rows that do
 * not take turns step once per chunk (16 KiB of float32). */
#define FB_BN_PACE_BYTES ((fb_index)4096)

static void FB_TYPED(bn_paced_step)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                    FB_TYPED(bn_paced) *pace, fb_index values);

/* Chunks item0 .. item0 + count - 1 (count <= FB_BN_STREAMS; item =
 * c * chunks + k) in turns: sum1[g], sum2[g] are bn_reduce_planar's sums
 * of item0 + g, bit for bit.  With `pace`, a step of its rewrite follows
 * about every FB_BN_PACE_BYTES reduced (the reads and sums are unchanged). */
static void FB_TYPED(bn_reduce_chunks)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                       fb_index item0, int count, double *sum1, double *sum2,
                                       FB_TYPED(bn_paced) *pace)
{
    FB_TYPED(bn_stream) st[FB_BN_STREAMS];
    fb_bn_runs runs[FB_BN_STREAMS];
    fb_bn_lanes a1[FB_BN_STREAMS], a2[FB_BN_STREAMS];
    fb_index chan[FB_BN_STREAMS], offset, len;
    int live[FB_BN_STREAMS], active = 0;
    for (int g = 0; g < count; ++g) {
        const fb_index item = item0 + g, c = item / plan->chunks;
        chan[g] = c;
        fb_bn_lanes_zero(&a1[g]);
        fb_bn_lanes_zero(&a2[g]);
        st[g].a1 = &a1[g];
        st[g].a2 = &a2[g];
        st[g].center = pass->center_real[c];
        runs[g] = fb_bn_runs_start(plan->n, plan->row_channels, plan->inner, plan->chunk,
                                   item - c * plan->chunks);
        live[g] = fb_bn_runs_next(&runs[g], c, &offset, &len);
        if (live[g])
            FB_TYPED(bn_stream_run)(&st[g], pass->x + offset, len);
        active += live[g];
    }
    const fb_index pace_values = FB_BN_PACE_BYTES / (fb_index)sizeof(FB_REAL);
    while (active > 0) {
        for (int g = 0; g < count; ++g) {
            if (!live[g])
                continue;
            const int more = FB_TYPED(bn_stream_turn)(&st[g]);
            if (pace && (pace->debt += FB_BN_BLOCK_VALUES) >= pace_values) {
                FB_TYPED(bn_paced_step)(plan, pass, pace, pace->debt);
                pace->debt = 0;
            }
            if (more)
                continue;
            if (fb_bn_runs_next(&runs[g], chan[g], &offset, &len)) {
                FB_TYPED(bn_stream_run)(&st[g], pass->x + offset, len);
            } else {
                live[g] = 0;
                --active;
            }
        }
    }
    for (int g = 0; g < count; ++g) {
        sum1[g] = fb_bn_lanes_total(&a1[g]);
        sum2[g] = fb_bn_lanes_total(&a2[g]);
    }
}

/* Row r of owned channels c0 .. c0 + count - 1 (count <= FB_BN_STREAMS) in
 * turns: each channel's row piece cut where its chunks end (values p of
 * its sequence at multiples of chunk), the runs fed to its lanes a1[j],
 * a2[j] (j = c - cb, cb the block's first channel), and a chunk's lane
 * totals added to s1[j], s2[j] where it ends: bn_owned_channels' one-run
 * walk (bn_reduce_planar's runs and sums), bit for bit. */
static void FB_TYPED(bn_owned_row_turns)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                         fb_index r, fb_index cb, fb_index c0, int count,
                                         fb_bn_lanes *a1, fb_bn_lanes *a2, double *s1,
                                         double *s2)
{
    const fb_index inner = plan->inner, chunk = plan->chunk;
    const fb_index p0 = r * inner, p2 = p0 + inner;
    const fb_index cut0 = (p0 / chunk + 1) * chunk;
    FB_TYPED(bn_stream) st[FB_BN_STREAMS];
    fb_index start[FB_BN_STREAMS], cut[FB_BN_STREAMS];
    const FB_REAL *base[FB_BN_STREAMS];  /* value p of the channel at base + p */
    int live[FB_BN_STREAMS];
    for (int g = 0; g < count; ++g) {
        const fb_index c = c0 + g, j = c - cb;
        base[g] = pass->x + (r * plan->row_channels + c) * inner - p0;
        st[g].a1 = &a1[j];
        st[g].a2 = &a2[j];
        st[g].center = pass->center_real[c];
        start[g] = p0;
        cut[g] = cut0;
        FB_TYPED(bn_stream_run)(&st[g], base[g] + p0, fb_min_index(p2, cut0) - p0);
        live[g] = 1;
    }
    int active = count;
    while (active > 0) {
        for (int g = 0; g < count; ++g) {
            if (!live[g] || FB_TYPED(bn_stream_turn)(&st[g]))
                continue;
            const fb_index p = start[g] + st[g].len, j = c0 + g - cb;
            if (p == cut[g] || p == plan->n) {  /* a chunk ends */
                s1[j] += fb_bn_lanes_total(&a1[j]);
                s2[j] += fb_bn_lanes_total(&a2[j]);
                fb_bn_lanes_zero(&a1[j]);
                fb_bn_lanes_zero(&a2[j]);
            }
            cut[g] += chunk;
            if (p < p2) {
                start[g] = p;
                FB_TYPED(bn_stream_run)(&st[g], base[g] + p, fb_min_index(p2, cut[g]) - p);
            } else {
                live[g] = 0;
                --active;
            }
        }
    }
}

/* ---- reduce one work item -------------------------------------------------- */

/* The two sums of one chunk (item = c * chunks + k). */
static void FB_TYPED(bn_reduce_planar)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                       fb_index item, double *sum1, double *sum2)
{
    const fb_index c = item / plan->chunks, k = item - c * plan->chunks;
    const FB_REAL center = pass->center_real[c];
    fb_bn_lanes a1, a2;
    fb_bn_lanes_zero(&a1);
    fb_bn_lanes_zero(&a2);
    fb_bn_runs runs = fb_bn_runs_start(plan->n, plan->row_channels, plan->inner, plan->chunk,
                                       k);
    fb_index offset, len;
    if (fb_bn_reduces_x(pass->mode)) {
        while (fb_bn_runs_next(&runs, c, &offset, &len))
            FB_TYPED(bn_lanes_shifted)(pass->x + offset, len, center, &a1, &a2);
    } else if (pass->relu) {
        const FB_REAL mask_scale = pass->mask_scale[c], mask_shift = pass->mask_shift[c];
        while (fb_bn_runs_next(&runs, c, &offset, &len))
            FB_TYPED(bn_lanes_grad)(pass->dy + offset, pass->x + offset, len, center, &a1, &a2,
                                    1, mask_scale, mask_shift,
                                    FB_TYPED(bn_next_row_ahead)(plan, runs.row));
    } else {
        while (fb_bn_runs_next(&runs, c, &offset, &len))
            FB_TYPED(bn_lanes_grad)(pass->dy + offset, pass->x + offset, len, center, &a1, &a2,
                                    0, 0, 0, FB_TYPED(bn_next_row_ahead)(plan, runs.row));
    }
    *sum1 = fb_bn_lanes_total(&a1);
    *sum2 = fb_bn_lanes_total(&a2);
}

/* Channel c's totals: its chunks' sums added in chunk order, FB_BN_STREAMS
 * chunks at a time in turns (`turns`, bn_reduce_chunks) or one by one
 * (bn_reduce_planar); with `pace`, steps of that rewrite in between
 * (bn_owned_paced).  The one-channel reduction of the owned walks. */
static void FB_TYPED(bn_channel_totals)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                        fb_index c, int turns, FB_TYPED(bn_paced) *pace,
                                        double *t1, double *t2)
{
    const fb_index chunks = plan->chunks;
    double total1 = 0.0, total2 = 0.0;
    for (fb_index s = 0; s < chunks; s += turns ? FB_BN_STREAMS : 1) {
        double chunk1[FB_BN_STREAMS], chunk2[FB_BN_STREAMS];
        int count = 1;
        if (turns) {
            count = (int)fb_min_index(FB_BN_STREAMS, chunks - s);
            FB_TYPED(bn_reduce_chunks)(plan, pass, c * chunks + s, count, chunk1, chunk2, pace);
        } else {
            FB_TYPED(bn_reduce_planar)(plan, pass, c * chunks + s, chunk1, chunk2);
            if (pace)
                FB_TYPED(bn_paced_step)(plan, pass, pace, plan->chunk);
        }
        for (int g = 0; g < count; ++g) {
            total1 += chunk1[g];
            total2 += chunk2[g];
        }
    }
    *t1 = total1;
    *t2 = total2;
}

/* Rows are taken eight at a time (then four, then one): the rows'
 * deviations and products are summed pairwise in the input dtype, then
 * widened and added to the float64 partials once per eight rows.  For
 * float32 that is 16 values per AVX-512 operation instead of 8 and an
 * eighth of the conversions; center is a value of the input (or the saved
 * mean), so x - center is exact when x is near it, and a pairwise sum of
 * eight values adds at most ~3 ulp of relative error before the float64
 * accumulation takes over.  Eight rather than four: the partials s1, s2 are
 * loaded and stored once per step, and with four rows those accesses were
 * the hottest instructions of a (256, 512) float32 reduction (profiled);
 * eight halves them.  The backward's plain sums take eight rows too, with
 * the rows addressed as x0[c + j * C] and g0[c + j * C] from two pointers
 * (sixteen row pointers would not fit the general registers).  Measured
 * against four rows: two builds in two worker processes, alternated call by
 * call, 30 calls each, 1 thread, float32, min (load average 4.7-5.5): the
 * whole backward of (64, 4096) 222-231 -> 166-180 us, (96, 700) 58.8 ->
 * 45.4, (72, 3000) 192 -> 176, (128, 2000) 206 -> 195, (500, 200) 71.9 ->
 * 67.3, (8,28,28,24) 111 -> 104 us; (3000, 96), (1000, 300),
 * (8,28,28,100), (4,24,24,320) within +-8 % (the noise of those runs).
 * The ReLU backward keeps four rows: its dy rows are masked copies
 * (bn_grad_row), and eight staged rows would be twice the stack. */
#ifndef FB_BN_PREFETCH_MIN_BYTES
/* The backward's interleaved reduction walks four rows of dy and four of x
 * at once (eight of each since the eight-row step, see above; the prefetch
 * below was measured with four): eight streams, each only one row piece long
 * before it jumps four rows.  With row pieces of 512 B to 1 KiB (128-256 float32 channels) and
 * data that comes from L3 or memory, the hardware prefetchers did not keep
 * up: (5600, 256) float32 backward_reduce took 0.5-1.5 ms where the x-only
 * statistics of the same x took 0.17 ms (single thread, min of interleaved
 * rounds; the spread between runs was itself that wide).  Fetching the rows
 * FB_BN_PREFETCH_STEPS steps ahead into L2 (prefetcht1) brought it to
 * 0.31-0.47 ms, (8,28,28,256) from 0.47-1.1 to 0.31-0.43 ms and
 * (16,28,28,128) from 0.40-0.77 to 0.31-0.47 ms; the whole backward of those
 * shapes gained 5-56 % (two runs).  It lost where the pieces are shorter
 * or longer:
 * (32,28,28,64) float32 (256 B rows: four rows are one 1 KiB run the
 * prefetchers follow) went from 0.25-0.37 to 0.37-0.47 ms, (1024, 1024)
 * (2 KiB pieces) from 0.21-0.23 to 0.30-0.32 ms, and float64 (8,28,28,256)
 * (2 KiB rows) did not change.  Hence the piece range below, and only for
 * inputs (dy and x) of at least FB_BN_PREFETCH_MIN_BYTES: without
 * prefetching, (4000, 256) float32 (7.8 MiB of dy and x) reduced as fast
 * per byte as the x-only statistics, (4800, 256) (9.4 MiB) was already 2-4x
 * slower; the prefetch itself was measured only from 11 MiB ((5600, 256)).
 * Measured on a loaded 2-core AVX-512 machine (load average 7-8), so the
 * ranges are wide; a prefetch changes no value, only timing. */
#define FB_BN_PREFETCH_MIN_BYTES ((fb_index)8 << 20)
#define FB_BN_PREFETCH_MIN_PIECE ((fb_index)512)
#define FB_BN_PREFETCH_MAX_PIECE ((fb_index)1024)
/* Steps of four rows ahead (two of the eight-row steps): 16 rows, 16 KiB of each array at 1 KiB rows,
 * far enough to cover a memory latency at ~20 GB/s; 2 steps measured about
 * the same, 1 step and 2 steps with prefetcht0 were mixed (no clear gain). */
#define FB_BN_PREFETCH_STEPS ((fb_index)4)
/* The x-only reduction (training forward, statistics) of an x of at least
 * FB_BN_PREFETCH_MIN_BYTES fetches the rows this many bytes of row pieces
 * ahead into L2.  Without it the loop waited on its loads (profile: the
 * subtraction after each load of x held most samples) and reduced 24.5 MiB
 * channels-last arrays at ~15 GB/s, below NumPy's x.sum() of the same array.
 * Min thread CPU time of 3 interleaved rounds, 1 thread, float32, load 6-10:
 * statistics of (32,28,28,256) 3.0-3.1 ms without, 1.1-1.7 ms at 4 / 8 /
 * 16 KiB ahead; (16384, 256) 1.8-1.9 -> 0.55-0.86 ms; (32,56,56,64)
 * 1.2-2.0 -> 0.93-1.5 ms; (4096, 1024) and float64 (2000, 1000) 0.58-1.1
 * without, 0.48-1.2 with (no clear change).  The three distances did not
 * differ beyond the noise; 8 KiB is the middle one.  The backward's
 * reduction (two arrays) did not gain from the same distance-based prefetch
 * for all piece sizes (bwd of the same shapes within the noise), so it
 * keeps its own rule below. */
#define FB_BN_FWD_PREFETCH_BYTES ((fb_index)8192)
/* ... but only from an x of FB_BN_FWD_PREFETCH_MIN_BYTES: below it (the
 * sizes that stay in the 32 MiB L3 of a Zen 3 CCX between the layer that
 * wrote x and this one), the hardware prefetchers keep up and the software
 * prefetches only cost issue slots (profiled: 16 % of the samples of the
 * (32,14,14,512) statistics on the instruction after prefetcht1).  Zen 3,
 * AVX2, float32, in-process A/B of this threshold at 8 MiB (before) and 16
 * MiB, alternated call by call, min of 15 calls, load 1.2-1.9, statistics
 * alone at 1 / 2 threads: (32,14,14,512) 494 / 293 -> 425 / 250 us,
 * (6000, 512) 474 / 276 -> 381 / 226, (3000, 1000) 502 / 320 -> 449 / 289,
 * (128,28,28,24) 327 / 166 -> 295 / 151, (4,16,28,28,48) 290 / 154 ->
 * 257 / 141, (16,28,28,200) 355 / 208 -> 329 / 192, (40,28,28,96) and
 * (24,56,56,48) even; training forward 2-7 % faster on the same shapes.
 * From the DRAM sizes the prefetch was measured for ((32,56,56,64), 25.7
 * MB: 0.94 ms with, 1.41 without) it stays. */
#define FB_BN_FWD_PREFETCH_MIN_BYTES ((fb_index)16 << 20)
#endif
/* The backward's interleaved reduction (no ReLU) of dy and x of at least
 * FB_BN_PREFETCH_MIN_BYTES together, whose row pieces are at least this many
 * bytes, walks ONE row at a time: two sequential streams instead of the
 * eight-row step's sixteen short ones (a row piece of each of eight rows of
 * dy and x), which the hardware prefetchers of a Zen 3 core did not keep
 * fed from L3/memory.  The sums are added in a different grouping (each
 * value's term in double, more exact), fixed by the shape alone.  Measured
 * on Zen 3 (AVX2), float32, 1 thread, the two walks alternated call by call
 * in one process (same build, an experiment switch), min / median of 30
 * calls, load average 9-10: whole backward (32,28,28,64) 1.38 / 1.81 ms ->
 * 1.11 / 1.50, (32,56,56,64) 10.1 / 18.8 -> 9.6 / 14.3, (16,28,28,96)
 * 0.91 / 1.40 -> 0.82 / 1.15, (16,28,28,128) 1.02 / 1.81 -> 1.03 / 1.30,
 * (8,28,28,200) 0.74 / 1.03 -> 0.73 / 0.86, (32,28,28,256) 7.5 / 19.0 ->
 * 5.1 / 13.4, (32,14,14,512) 3.45 / 3.88 -> 2.87 / 3.27; backward_reduce
 * alone (16,28,28,200) 1.14 / 1.82 -> 1.04 / 1.18, (32,28,28,100) 1.58 /
 * 1.82 -> 1.13 / 1.26.  Narrower rows lost (the per-row load and store of
 * the double partials dominates): backward_reduce (16,56,56,48) (192 B
 * pieces) 0.91 / 1.33 -> 1.08 / 1.39, (64,56,56,16) 1.21 / 1.46 -> 1.33 /
 * 1.51.  Then two builds (bn_ab_builds.py, 1 thread, min of 12-20
 * alternated rounds, load 4-5), row walk from 256 B against none: backward
 * (32,28,28,64) 1.03 -> 1.15 ms and (16,28,28,96) 0.70 -> 0.81 ms (lost,
 * twice), (32,56,56,64) even (5.20 / 5.18), while (32,28,28,100) 2.30 ->
 * 1.89, (16,28,28,200) 2.37 -> 2.14, (32,28,28,256) 7.7 -> 5.3 and 6.5 ->
 * 5.1, (32,14,14,512) 2.88 -> 2.67 ms gained.  Hence 400 bytes (100 float32
 * channels) -- for that walk.  Since the walk forms 8-row short sums before
 * the float64 adds (bn_reduce_row_walk; the per-row float64 partials were
 * what narrow rows paid for), it also beats the eight-row step on narrow
 * rows: walk against eight-row step, same build with an experiment switch,
 * float32, 1 thread, min / median thread CPU time of 31 alternated calls
 * (load average 4.1-4.6): backward (32,56,56,64) 0.77 / 0.71 (another run
 * 0.66 / 0.71), (32,28,28,64) 0.94 / 0.96, (16,28,28,96) 0.96 / 0.92,
 * (16,56,56,48) 0.91 / 0.95, (8,28,28,32,32) 0.89 / 0.90, (64,56,56,16)
 * 0.95 / 0.98 (another run 1.07 / 1.01), (32,56,56,24) 1.10 / 0.94.  Then
 * two builds (bn_ab_builds.py --cpu, 1 thread, 15 alternated rounds, min /
 * median, load 3.6 with a test run beside it), walk from 64 bytes against
 * main: (24,56,56,48) 0.83 / 0.98, (32,56,56,64) 0.89 / 0.91 gained, but
 * (64,56,56,16) 1.20 / 1.16 and (40000, 32) 1.28 / 1.08 lost.  Hence 192
 * bytes now (48 float32 or 24 float64 channels, the narrowest rows that
 * gained in every run); narrower rows keep the eight-row step.  The final
 * rule (walk from 192 bytes, 8-row short sums under 2 KiB rows) against
 * main's (walk from 400 bytes, float64 adds every row), same build and
 * process, alternated call by call, 1 thread, min / median thread CPU time
 * of 41 calls (load 2.5-2.8), float32: (24,56,56,48) 0.96 / 0.86,
 * (10,56,56,60) 0.87 / 0.90, (32,56,56,64) 0.81 / 0.75, (8,56,56,80) 0.94
 * / 0.86, (16,28,28,200) 0.70 / 0.72, (9,30,30,333) 0.63 / 0.71, (6000,
 * 384) 0.80 / 0.68, (20000, 160) 0.63 / 0.63, (4,56,56,128) 0.77 / 0.79;
 * float64, 31 calls: (16,56,56,24) 0.90 / 0.92, (16,28,28,100) 0.64 /
 * 0.63, (8,28,28,200) 0.68 / 0.72, (30000, 40) 0.46 / 0.77.  Arrays under
 * FB_BN_PREFETCH_MIN_BYTES keep it too: the walk lost there (same switch,
 * 31 calls, load 4.1): (256, 512) 1.19 / 1.13, (3000, 96) 1.12 / 1.09,
 * (1000, 300) 1.09 / 1.10, (600, 200) 1.18 / 1.17, (64, 500) 1.12 / 1.15
 * ((8192, 64), 4 MiB, even).  float64 and 2 threads were not measured
 * apart (2-thread timings were dominated by the load).  Only where a row piece is the whole
 * row (width == C; channels-last rows of up to FB_BN_MAX_GROUP_WIDTH
 * channels): wider rows are reduced in groups of at most 512 channels, and
 * there the row walk reads a piece and jumps to the next row, which lost
 * (two builds alternated in two processes, 15 rounds, min, quiet, float32
 * backward, 1 thread): (4096, 1024) 3.43 -> 6.01 ms, (4000, 1000) 3.56 ->
 * 5.45, (3000, 2000) 5.47 -> 7.56, while (8192, 512) (whole rows) stayed
 * 3.57 / 3.59. */
#ifndef FB_BN_ROW_WALK_MIN_PIECE
#define FB_BN_ROW_WALK_MIN_PIECE ((fb_index)192)
#endif

/* Prefetches `rows` row pieces of `width` values (row stride C) from p into
 * L2 (see FB_BN_PREFETCH_MIN_BYTES).  Timing only: no value changes. */
static inline void FB_TYPED(bn_prefetch_rows)(const FB_REAL *p, fb_index rows, fb_index C,
                                              fb_index width)
{
    fb_prefetch_rows(p, rows, C * (fb_index)sizeof(FB_REAL), width * (fb_index)sizeof(FB_REAL));
}

/* Rows of C values whose stride is a multiple of 4 KiB: the same column of
 * every row falls in the same set of the L1 data cache (64 sets of 64-byte
 * lines, 8 ways on Zen 3 and on recent Intel cores).  The backward's
 * eight-row step reads the same column of eight dy rows and eight x rows
 * at once, 16 lines for one 8-way set: the lines are evicted before the
 * next vector reads their second half, and the reduction reads everything
 * twice from L2.  Measured (float32 backward, 1 thread, min over 40
 * alternated calls, ns per element, load average 6.5): C = 1024 0.67 and
 * C = 2048 0.66-0.72 against 0.43-0.46 for C = 1000 and 2000 with the same
 * rows.  For such strides the backward takes four rows per step (eight
 * lines per set).  Depends on the shape only: the sums stay independent of
 * the thread count. */
static inline int FB_TYPED(bn_rows_alias)(fb_index C)
{
    return C * (fb_index)sizeof(FB_REAL) % 4096 == 0;
}

/* The row walk (see FB_BN_ROW_WALK_MIN_PIECE): `rows` whole rows of C
 * values from dy and x, one row at a time, into the channel sums s1, s2.
 * Every FB_BN_WALK_GROUP rows form one short sum per channel in the input
 * dtype (b1, b2: the first row assigns, the next ones add, in row order),
 * added to the float64 sums once per group; rows past the last whole group
 * add their terms to the float64 sums one by one.  The groups count from the
 * row chunk's first row, so the sums depend on the shape only.
 * The walk first added every row's terms to the float64 sums (two float64
 * loads, adds and stores per value pair, with the conversions): the profile
 * of (16,28,28,200) float32 had its samples on the conversions, adds and
 * stores of the partials.  Measured against it on Zen 3 (AVX2), float32,
 * 1 thread, in one process, calls alternated with an experiment switch,
 * min / median thread CPU time of 21-25 calls (load average 3-5): whole
 * backward (16,28,28,200) 0.91 / 0.93 of the time, (32,14,14,512) 0.90 /
 * 0.95, (4,56,56,100) 0.85 / 0.83; backward_reduce alone (16,28,28,200)
 * 0.87 / 0.94, (64,28,28,160) 0.90 / 0.92, (4,56,56,100) 0.72 / 0.85.
 * The opaque pointer step between rows (FB_BN_WALK_OPAQUE) keeps GCC's -O3
 * from jamming two rows into one loop (unroll-and-jam): that build read four
 * streams per loop again and lost on the DRAM-sized shapes, backward_reduce
 * (64,28,28,160) 1.46x and (32,14,14,512) 1.22x the per-row walk's time
 * (the profile: nearly all samples on the load of x), where the same code
 * with the barrier gained. */
#ifndef FB_BN_WALK_GROUP
#define FB_BN_WALK_GROUP ((fb_index)8)
#endif
#if defined(__GNUC__)
#define FB_BN_WALK_OPAQUE(p, q) __asm__ volatile("" : "+r"(p), "+r"(q))
#else
#define FB_BN_WALK_OPAQUE(p, q) ((void)0)
#endif
/* Rows of at least this many bytes skip the short sums (every row is added
 * to the float64 sums, the walk as it was): with 2 KiB rows (512 float32
 * channels) the grouped walk did not gain in the two-build runs (1 / 2
 * threads, min of 15-31 alternated rounds, load 1.4-3.3): (32,14,14,512)
 * 1.01-1.23x / 1.13-1.16x the per-row walk's time at the minimum, (8192,
 * 512) 1.01-1.18x / 1.05-1.06x, where (16,28,28,200), (6000, 384) and the
 * 192-400 byte rows gained in most runs (one in-process run had
 * (32,14,14,512) at 0.90; the loss was not profiled). */
#ifndef FB_BN_WALK_GROUP_MAX_PIECE
#define FB_BN_WALK_GROUP_MAX_PIECE ((fb_index)2048)
#endif
/* `grouped`: form the short sums (rows under FB_BN_WALK_GROUP_MAX_PIECE
 * bytes), else add every row to the float64 sums. */
static void FB_TYPED(bn_reduce_row_walk)(const FB_REAL *restrict dy, const FB_REAL *restrict x,
                                         const FB_REAL *restrict center, fb_index C,
                                         fb_index rows, double *restrict s1,
                                         double *restrict s2, int grouped)
{
    FB_REAL b1[FB_BN_MAX_GROUP_WIDTH], b2[FB_BN_MAX_GROUP_WIDTH];  /* C <= the group width */
    fb_index q = 0;
    for (; grouped && q + FB_BN_WALK_GROUP <= rows; q += FB_BN_WALK_GROUP) {
        const FB_REAL *restrict x0 = x + q * C, *restrict g0 = dy + q * C;
#pragma omp simd
        for (fb_index c = 0; c < C; ++c) {
            b1[c] = g0[c];
            b2[c] = g0[c] * (x0[c] - center[c]);
        }
        for (fb_index t = 1; t < FB_BN_WALK_GROUP; ++t) {
            x0 += C;
            g0 += C;
            FB_BN_WALK_OPAQUE(x0, g0);
#pragma omp simd
            for (fb_index c = 0; c < C; ++c) {
                b1[c] += g0[c];
                b2[c] += g0[c] * (x0[c] - center[c]);
            }
        }
#pragma omp simd
        for (fb_index c = 0; c < C; ++c) {
            s1[c] += (double)b1[c];
            s2[c] += (double)b2[c];
        }
    }
    for (; q < rows; ++q) {
        const FB_REAL *restrict x0 = x + q * C, *restrict g0 = dy + q * C;
#pragma omp simd
        for (fb_index c = 0; c < C; ++c) {
            s1[c] += (double)g0[c];
            s2[c] += (double)(g0[c] * (x0[c] - center[c]));
        }
    }
}

/* Row chunk k of channels [c0, c0 + width): the partials of one channel
 * depend only on k and the channel, not on c0 or width, so any split of the
 * channels into pieces gives the same sums. */
static void FB_TYPED(bn_reduce_rows)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                     fb_index k, fb_index c0, fb_index width)
{
    const fb_index C = plan->channels;
    const fb_index r1 = fb_min_index(plan->outer, (k + 1) * plan->chunk);
    double *restrict s1 = pass->sum1 + k * C + c0;
    double *restrict s2 = pass->sum2 + k * C + c0;
    const FB_REAL *restrict center = pass->center_real + c0;
    for (fb_index c = 0; c < width; ++c)
        s1[c] = s2[c] = 0.0;
    fb_index r = k * plan->chunk;
    if (fb_bn_reduces_x(pass->mode)) {
        const fb_index piece_bytes = width * (fb_index)sizeof(FB_REAL);
        const fb_index ahead
            = fb_ceil_div(fb_ceil_div(FB_BN_FWD_PREFETCH_BYTES, piece_bytes), 8) * 8;
        const int prefetch
            = plan->outer * C * (fb_index)sizeof(FB_REAL) >= FB_BN_FWD_PREFETCH_MIN_BYTES;
        /* the eight differences on the FMA pipes (fb_sub_fma: same bits).
         * Per eight channels of eight rows the loop had 22 additions (8
         * differences, 10 in the two trees, 4 float64 adds) for 8
         * multiplies; the profile of (32,14,14,512) float32 statistics had its
         * samples on the adds and the conversions.  The loop alone, outside
         * the library (a copy compiled with the AVX2 flags, 1 thread, best of
         * 40 runs, bits checked equal), GB/s of x, 10 MB in L3: C = 64 34.4
         * -> 39.0, 200 31.7 -> 33.3, 320 35.3 -> 36.9, 512 37.6 -> 39.3;
         * 0.4 MB in L2: C = 200 42.5 -> 45.5, 512 45.9 -> 48.6. */
        const FB_REAL one = FB_TYPED(fb_opaque_one)();
        for (; r + 8 <= r1; r += 8) {
            if (prefetch && r + ahead + 8 <= plan->outer)
                FB_TYPED(bn_prefetch_rows)(pass->x + (r + ahead) * C + c0, 8, C, width);
            const FB_REAL *restrict x0 = pass->x + r * C + c0;
            const FB_REAL *restrict x1 = x0 + C, *restrict x2 = x1 + C, *restrict x3 = x2 + C;
            const FB_REAL *restrict x4 = x3 + C, *restrict x5 = x4 + C, *restrict x6 = x5 + C;
            const FB_REAL *restrict x7 = x6 + C;
#pragma omp simd
            for (fb_index c = 0; c < width; ++c) {
                const FB_REAL m = -center[c];
                const FB_REAL d0 = FB_TYPED(fb_sub_fma)(x0[c], one, m);
                const FB_REAL d1 = FB_TYPED(fb_sub_fma)(x1[c], one, m);
                const FB_REAL d2 = FB_TYPED(fb_sub_fma)(x2[c], one, m);
                const FB_REAL d3 = FB_TYPED(fb_sub_fma)(x3[c], one, m);
                const FB_REAL d4 = FB_TYPED(fb_sub_fma)(x4[c], one, m);
                const FB_REAL d5 = FB_TYPED(fb_sub_fma)(x5[c], one, m);
                const FB_REAL d6 = FB_TYPED(fb_sub_fma)(x6[c], one, m);
                const FB_REAL d7 = FB_TYPED(fb_sub_fma)(x7[c], one, m);
                s1[c] += (double)(((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7)));
                s2[c] += (double)(((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                                  + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)));
            }
        }
        for (; r + 4 <= r1; r += 4) {
            const FB_REAL *restrict x0 = pass->x + r * C + c0;
            const FB_REAL *restrict x1 = x0 + C, *restrict x2 = x1 + C, *restrict x3 = x2 + C;
#pragma omp simd
            for (fb_index c = 0; c < width; ++c) {
                const FB_REAL d0 = x0[c] - center[c], d1 = x1[c] - center[c];
                const FB_REAL d2 = x2[c] - center[c], d3 = x3[c] - center[c];
                s1[c] += (double)((d0 + d1) + (d2 + d3));
                s2[c] += (double)((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3));
            }
        }
        for (; r < r1; ++r) {
            const FB_REAL *restrict x0 = pass->x + r * C + c0;
#pragma omp simd
            for (fb_index c = 0; c < width; ++c) {
                const FB_REAL d0 = x0[c] - center[c];
                s1[c] += (double)d0;
                s2[c] += (double)(d0 * d0);
            }
        }
    } else {
        /* eight rows at a time, then four, then one; with relu four rows
         * at a time through a masked copy of dy (bn_grad_row) */
        FB_REAL staging[4][FB_BN_RELU_BLOCK];
        const fb_index piece_bytes = width * (fb_index)sizeof(FB_REAL);
        const fb_index ahead = 4 * FB_BN_PREFETCH_STEPS;
        const int large = 2 * plan->outer * C * (fb_index)sizeof(FB_REAL)
                          >= FB_BN_PREFETCH_MIN_BYTES;
        const int prefetch = piece_bytes >= FB_BN_PREFETCH_MIN_PIECE
            && piece_bytes <= FB_BN_PREFETCH_MAX_PIECE && large;
        /* pieces of large arrays that are whole rows (width == C: one
         * sequential stream each of dy and x): one row at a time
         * (bn_reduce_row_walk), see FB_BN_ROW_WALK_MIN_PIECE */
        const int row_walk = !pass->relu && large && width == C
                             && piece_bytes >= FB_BN_ROW_WALK_MIN_PIECE;
        if (row_walk) {
            FB_TYPED(bn_reduce_row_walk)(pass->dy + r * C, pass->x + r * C, center, C, r1 - r,
                                         s1, s2, piece_bytes < FB_BN_WALK_GROUP_MAX_PIECE);
            return;
        }
        if (!pass->relu && !FB_TYPED(bn_rows_alias)(C)) {
            /* eight rows at a time (see the comment before
             * FB_BN_PREFETCH_MIN_BYTES), every row addressed from one x and
             * one dy pointer */
            for (; r + 8 <= r1; r += 8) {
                const fb_index offset = r * C + c0;
                if (prefetch && r + ahead + 8 <= plan->outer) {
                    FB_TYPED(bn_prefetch_rows)(pass->x + offset + ahead * C, 8, C, width);
                    FB_TYPED(bn_prefetch_rows)(pass->dy + offset + ahead * C, 8, C, width);
                }
                const FB_REAL *restrict x0 = pass->x + offset;
                const FB_REAL *restrict g0 = pass->dy + offset;
#pragma omp simd
                for (fb_index c = 0; c < width; ++c) {
                    const FB_REAL d0 = x0[c] - center[c], d1 = x0[c + C] - center[c];
                    const FB_REAL d2 = x0[c + 2 * C] - center[c], d3 = x0[c + 3 * C] - center[c];
                    const FB_REAL d4 = x0[c + 4 * C] - center[c], d5 = x0[c + 5 * C] - center[c];
                    const FB_REAL d6 = x0[c + 6 * C] - center[c], d7 = x0[c + 7 * C] - center[c];
                    const FB_REAL e0 = g0[c], e1 = g0[c + C], e2 = g0[c + 2 * C];
                    const FB_REAL e3 = g0[c + 3 * C], e4 = g0[c + 4 * C], e5 = g0[c + 5 * C];
                    const FB_REAL e6 = g0[c + 6 * C], e7 = g0[c + 7 * C];
                    s1[c] += (double)(((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7)));
                    s2[c] += (double)(((e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3))
                                      + ((e4 * d4 + e5 * d5) + (e6 * d6 + e7 * d7)));
                }
            }
        }
        for (; r + 4 <= r1; r += 4) {
            const fb_index offset = r * C + c0;
            if (prefetch && r + ahead + 4 <= plan->outer) {
                FB_TYPED(bn_prefetch_rows)(pass->x + offset + ahead * C, 4, C, width);
                FB_TYPED(bn_prefetch_rows)(pass->dy + offset + ahead * C, 4, C, width);
            }
            const FB_REAL *restrict x0 = pass->x + offset;
            const FB_REAL *restrict x1 = x0 + C, *restrict x2 = x1 + C, *restrict x3 = x2 + C;
            const FB_REAL *restrict g0 = FB_TYPED(bn_grad_row)(pass, c0, offset, width, staging[0]);
            const FB_REAL *restrict g1 = FB_TYPED(bn_grad_row)(pass, c0, offset + C, width,
                                                               staging[1]);
            const FB_REAL *restrict g2 = FB_TYPED(bn_grad_row)(pass, c0, offset + 2 * C, width,
                                                               staging[2]);
            const FB_REAL *restrict g3 = FB_TYPED(bn_grad_row)(pass, c0, offset + 3 * C, width,
                                                               staging[3]);
#pragma omp simd
            for (fb_index c = 0; c < width; ++c) {
                const FB_REAL d0 = x0[c] - center[c], d1 = x1[c] - center[c];
                const FB_REAL d2 = x2[c] - center[c], d3 = x3[c] - center[c];
                s1[c] += (double)((g0[c] + g1[c]) + (g2[c] + g3[c]));
                s2[c] += (double)((g0[c] * d0 + g1[c] * d1) + (g2[c] * d2 + g3[c] * d3));
            }
        }
        for (; r < r1; ++r) {
            const FB_REAL *restrict x0 = pass->x + r * C + c0;
            const FB_REAL *restrict g0 = FB_TYPED(bn_grad_row)(pass, c0, r * C + c0, width,
                                                               staging[0]);
#pragma omp simd
            for (fb_index c = 0; c < width; ++c) {
                s1[c] += (double)g0[c];
                s2[c] += (double)(g0[c] * (x0[c] - center[c]));
            }
        }
    }
}

/* Work item k * groups + j of an interleaved plan. */
static void FB_TYPED(bn_reduce_interleaved)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                            fb_index item)
{
    const fb_index k = item / plan->groups, j = item - k * plan->groups;
    const fb_index c0 = j * plan->group_width;
    FB_TYPED(bn_reduce_rows)(plan, pass, k, c0,
                             fb_min_index(plan->channels, c0 + plan->group_width) - c0);
}

/* ---- per-channel coefficients ---------------------------------------------- */

/* bn_channel_sums_f32 / _f64: channel c's sums from its stored chunk
 * partials, added in chunk order starting from 0: the fixed order behind
 * thread-count independent results (the owned mode adds the same partials in
 * the same order on the fly). */
static void FB_TYPED(bn_channel_sums)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                      fb_index c, double *sum1, double *sum2)
{
    const fb_index channel_stride = plan->interleaved ? 1 : plan->chunks;
    const fb_index chunk_stride = plan->interleaved ? plan->channels : 1;
    const double *p1 = pass->sum1 + c * channel_stride, *p2 = pass->sum2 + c * channel_stride;
    double s1 = 0.0, s2 = 0.0;
    for (fb_index k = 0; k < plan->chunks; ++k) {
        s1 += p1[k * chunk_stride];
        s2 += p2[k * chunk_stride];
    }
    *sum1 = s1;
    *sum2 = s2;
}

/* The channel sums of every channel of an interleaved plan, into `total1`,
 * `total2`: the same additions in the same order as bn_channel_sums (chunk
 * order, from 0), done for all channels at once.  Walking one channel at a
 * time reads its partials at a stride of `channels` doubles (4 KiB for 512
 * channels: every read in the same L1 set) through a chain of dependent
 * additions; that took 40 % of a (256, 512) training forward. */
static void FB_TYPED(bn_interleaved_totals)(const fb_bn_plan *plan,
                                            const FB_TYPED(bn_pass) *pass, fb_index first,
                                            fb_index last, double *restrict total1,
                                            double *restrict total2)
{
    const fb_index C = plan->channels;
    for (fb_index c = first; c < last; ++c)
        total1[c] = total2[c] = 0.0;
    for (fb_index k = 0; k < plan->chunks; ++k) {
        const double *restrict p1 = pass->sum1 + k * C, *restrict p2 = pass->sum2 + k * C;
#pragma omp simd
        for (fb_index c = first; c < last; ++c) {
            total1[c] += p1[c];
            total2[c] += p2[c];
        }
    }
}

/* The training forward's rewrite coefficients (fused FORWARD and the apply phase
 * alike): y = (x - k2) * k1 + k3.  `relu`: the fused ReLU forward, whose
 * backward recomputes the mask as (x - k2) * k1 + bias from the statistics
 * it is given, so the shift is exactly bias. */
/* bn_forward_coefficients_f32, bn_forward_coefficients_f64 */
static inline void FB_TYPED(bn_forward_coefficients)(const FB_TYPED(bn_pass) *pass,
                                                     FB_TYPED(bn_coefficients) coef, fb_index c,
                                                     double mean, double invstd, int relu)
{
    /* m = the mean rounded to FB_REAL (the saved mean): x - m is exact for
     * x near the mean, so a large mean costs no precision, and a constant
     * channel (x == m) gives exactly bias */
    const FB_REAL mean_real = (FB_REAL)mean;
    coef.k2[c] = mean_real;
    if (relu) {
        FB_TYPED(bn_normalize_coefficients)(invstd, pass->weight, pass->bias, c, coef.k1 + c,
                                            coef.k3 + c);
    } else {
        /* the rounding of m is put back into the shift (in double):
         * y = (x - m) * s + (bias - (mean - m) * s) -- exact centering
         * without a second subtraction per element */
        const double s = (pass->weight ? (double)pass->weight[c] : 1.0) * invstd;
        coef.k1[c] = (FB_REAL)s;
        coef.k3[c] = (FB_REAL)((pass->bias ? (double)pass->bias[c] : 0.0)
                               - (mean - (double)mean_real) * s);
    }
}

/* The training backward's rewrite coefficients from its per-channel sums
 * (fused BACKWARD and the backward_apply phase alike):
 * dx = w*invstd/n * (n*dy - sum_dy - xhat*sum_dy_xhat) with
 * xhat = (x - mean) * invstd kept centered (expanding it in x would cancel
 * x * k2 against mean * k2 when |mean| >> the spread):
 * dx = dy * k1 + ((x - m) * k2 + k3), m = the mean rounded to FB_REAL
 * (center_real); `remainder` = mean - m, nonzero only for a float64 mean
 * that FB_REAL cannot hold (the split phases).  `inv_n` = 1 / n (see
 * bn_finalize). */
/* bn_backward_coefficients_f32, bn_backward_coefficients_f64 */
static inline void FB_TYPED(bn_backward_coefficients)(FB_TYPED(bn_coefficients) coef,
                                                      fb_index c, double w, double invstd,
                                                      double sum_dy, double sum_dy_xhat,
                                                      double inv_n, double remainder)
{
    const double a = w * invstd;
    const double b = -a * invstd * sum_dy_xhat * inv_n;
    coef.k1[c] = (FB_REAL)a;
    coef.k2[c] = (FB_REAL)b;
    coef.k3[c] = (FB_REAL)(remainder != 0.0 ? -a * sum_dy * inv_n - b * remainder
                                            : -a * sum_dy * inv_n);
}

/* bn_finalize_f32 / bn_finalize_f64: coefficients of channel c (sums s1,
 * s2) into *coefficients; with `owner`, also the outputs that exactly one
 * thread writes (saved statistics, running statistics, dweight, dbias).
 * Here and in bn_finalize_column_values (the same expressions as vector
 * loops) and bn_backward_coefficients, sums are multiplied by inv_n = 1 / n
 * rather than divided by n: a float64 vector division costs as much as a
 * square root, and the finalize of wide, short (N, C) arrays is bound by
 * them (at most one rounding more, in float64).  Except the variance: users
 * of the split phases compute it as m2 / n, which must be the fused
 * forward's variance bit for bit.
 * The coefficients come by pointer: passed by value, the three-pointer
 * struct was stored to the stack and reloaded as one wider load on every
 * call, a failed store forward per channel (~10 % of a (256, 512) float32
 * training forward, profiled). */
static void FB_TYPED(bn_finalize)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass, fb_index c,
                                  double s1, double s2,
                                  const FB_TYPED(bn_coefficients) *coefficients, int owner)
{
    const FB_TYPED(bn_coefficients) coef = *coefficients;
    const double n = (double)plan->n, inv_n = 1.0 / n;
    const double w = pass->weight ? (double)pass->weight[c] : 1.0;
    double invstd, dweight = 0.0;
    switch (pass->mode) {
    case FB_BN_FORWARD: {
        const double shifted_mean = s1 * inv_n;
        double var = (s2 - s1 * shifted_mean) / n;  /* m2 / n: see above */
        if (var < 0.0)  /* rounding on a (near-)constant channel; NaN passes through */
            var = 0.0;
        const double mean = pass->center[c] + shifted_mean;
        invstd = 1.0 / sqrt(var + pass->eps);
        /* with relu, the backward recomputes the ReLU mask from the saved
         * (rounded) statistics, so normalize with exactly those */
        FB_TYPED(bn_forward_coefficients)(pass, coef, c, mean,
                                          pass->relu ? (double)(FB_REAL)invstd : invstd,
                                          pass->relu);
        if (!owner)
            return;
        pass->saved_mean[c] = (FB_REAL)mean;
        pass->saved_invstd[c] = (FB_REAL)invstd;
        if (pass->running_mean) {
            const double m = pass->momentum;
            pass->running_mean[c] = (FB_REAL)((1.0 - m) * (double)pass->running_mean[c] + m * mean);
            pass->running_var[c] = (FB_REAL)((1.0 - m) * (double)pass->running_var[c]
                                             + m * var * (n / (n - 1.0)));
        }
        return;
    }
    case FB_BN_BACKWARD: {
        invstd = (double)pass->spread[c];
        dweight = s2 * invstd;
        FB_TYPED(bn_backward_coefficients)(coef, c, w, invstd, s1, dweight, inv_n, 0.0);
        break;
    }
    case FB_BN_STATS: {
        /* FORWARD's statistics before the division by n: m2 / n is
         * exactly FORWARD's var */
        const double shifted_mean = s1 * inv_n;
        double m2 = s2 - s1 * shifted_mean;
        if (m2 < 0.0)  /* rounding on a (near-)constant channel; NaN passes through */
            m2 = 0.0;
        if (owner) {
            pass->phase_out1[c] = pass->center[c] + shifted_mean;
            pass->phase_out2[c] = m2;
        }
        return;
    }
    case FB_BN_BACKWARD_REDUCE:
        if (owner) {
            /* s2 is around center = the mean rounded to the input dtype;
             * move it to the float64 mean (no-op when it is representable) */
            const double mean = pass->phase_mean[c];
            pass->phase_out1[c] = s1;
            pass->phase_out2[c] = pass->phase_invstd[c] * (s2 - s1 * (mean - pass->center[c]));
        }
        return;
    default: /* FB_BN_BACKWARD_EVAL */
        invstd = 1.0 / sqrt((double)pass->spread[c] + pass->eps);
        dweight = s2 * invstd;
        coef.k1[c] = (FB_REAL)(w * invstd);
        coef.k2[c] = 0;
        coef.k3[c] = 0;
        break;
    }
    if (!owner)
        return;
    if (pass->reduce && pass->dweight)
        pass->dweight[c] = (FB_REAL)((pass->accumulate ? (double)pass->dweight[c] : 0.0) + dweight);
    if (pass->reduce && pass->dbias)
        pass->dbias[c] = (FB_REAL)((pass->accumulate ? (double)pass->dbias[c] : 0.0) + s1);
}

/* bn_finalize_column_values_f32 / _f64: bn_finalize of channels [first, last) of
 * an interleaved plan from their channel totals t1, t2 (this thread's own
 * copy; overwritten), the owner of channels [owned_first, owned_last).  The
 * hot modes, FORWARD and BACKWARD, run as loops over the channels that the
 * compiler vectorizes: per channel the same expressions as bn_finalize, and
 * vector division and square root round correctly like the scalar ones, so
 * the bits are the same (the split phases' m2 / n still equals the forward's
 * var).  Channel by channel, the chain of dependent divisions and the square
 * root was 8-12 % of a (256, 512) float32 training forward (profiled).  The
 * split phases' reductions (STATS, BACKWARD_REDUCE) run as such loops too;
 * BACKWARD_EVAL calls bn_finalize per channel. */
static void FB_TYPED(bn_finalize_column_values)(const fb_bn_plan *plan,
                                                FB_TYPED(bn_pass) *pass, fb_index first,
                                                fb_index last, double *restrict t1,
                                                double *restrict t2,
                                                const FB_TYPED(bn_coefficients) *coefficients,
                                                fb_index owned_first, fb_index owned_last)
{
    const FB_TYPED(bn_coefficients) coef = *coefficients;
    FB_REAL *restrict k1 = coef.k1, *restrict k2 = coef.k2, *restrict k3 = coef.k3;
    const FB_REAL *restrict weight = pass->weight, *restrict bias = pass->bias;
    const double n = (double)plan->n, inv_n = 1.0 / n;
    owned_first = fb_max_index(owned_first, first);
    owned_last = fb_min_index(owned_last, last);
    if (pass->mode == FB_BN_FORWARD) {
        const double *restrict center = pass->center;
        const double eps = pass->eps;
        /* t1 := mean, t2 := var */
#pragma omp simd
        for (fb_index c = first; c < last; ++c) {
            const double shifted_mean = t1[c] * inv_n;
            double var = (t2[c] - t1[c] * shifted_mean) / n;  /* m2 / n exactly */
            var = var < 0.0 ? 0.0 : var;  /* rounding on a constant channel; NaN stays */
            t1[c] = center[c] + shifted_mean;
            t2[c] = var;
        }
        if (pass->running_mean) {
            FB_REAL *restrict running_mean = pass->running_mean;
            FB_REAL *restrict running_var = pass->running_var;
            const double m = pass->momentum;
#pragma omp simd
            for (fb_index c = owned_first; c < owned_last; ++c) {
                running_mean[c] = (FB_REAL)((1.0 - m) * (double)running_mean[c] + m * t1[c]);
                running_var[c] = (FB_REAL)((1.0 - m) * (double)running_var[c]
                                           + m * t2[c] * (n / (n - 1.0)));
            }
        }
        /* t2 := invstd, computed once per channel: the division and square
         * root in float64 are the costly part of this loop (on wide rows
         * with few of them, e.g. (64, 4096) float32, the finalize was ~16 %
         * of the training forward's kernel time, profiled, when the saved
         * invstd took its own division and square root) */
        if (pass->relu) {
            /* as bn_forward_coefficients with relu: from the rounded invstd */
#pragma omp simd
            for (fb_index c = first; c < last; ++c) {
                const double invstd = 1.0 / sqrt(t2[c] + eps);
                t2[c] = invstd;
                k2[c] = (FB_REAL)t1[c];
                k1[c] = (FB_REAL)((weight ? (double)weight[c] : 1.0) * (double)(FB_REAL)invstd);
                k3[c] = bias ? bias[c] : (FB_REAL)0;
            }
        } else {
#pragma omp simd
            for (fb_index c = first; c < last; ++c) {
                const double invstd = 1.0 / sqrt(t2[c] + eps);
                const double mean = t1[c];
                const FB_REAL mean_real = (FB_REAL)mean;
                const double s = (weight ? (double)weight[c] : 1.0) * invstd;
                t2[c] = invstd;
                k2[c] = mean_real;
                k1[c] = (FB_REAL)s;
                k3[c] = (FB_REAL)((bias ? (double)bias[c] : 0.0) - (mean - (double)mean_real) * s);
            }
        }
        FB_REAL *restrict saved_mean = pass->saved_mean, *restrict saved_invstd = pass->saved_invstd;
#pragma omp simd
        for (fb_index c = owned_first; c < owned_last; ++c) {
            saved_mean[c] = (FB_REAL)t1[c];
            saved_invstd[c] = (FB_REAL)t2[c];
        }
        return;
    }
    if (pass->mode == FB_BN_STATS) {
        /* the split phases' statistics, per channel the expressions of
         * bn_finalize (FORWARD's before the division by n), as a vector
         * loop: the scalar call per channel was ~27 % of batch_norm_stats
         * of (8, 4096) float32 (profiled) */
        const double *restrict center = pass->center;
        double *restrict mean = pass->phase_out1, *restrict m2 = pass->phase_out2;
#pragma omp simd
        for (fb_index c = owned_first; c < owned_last; ++c) {
            const double shifted_mean = t1[c] * inv_n;
            const double sum_sq = t2[c] - t1[c] * shifted_mean;
            mean[c] = center[c] + shifted_mean;
            m2[c] = sum_sq < 0.0 ? 0.0 : sum_sq;  /* as bn_finalize; NaN stays */
        }
        return;
    }
    if (pass->mode == FB_BN_BACKWARD_REDUCE) {
        /* as bn_finalize: t2 is around center = the mean rounded to the
         * input dtype; move it to the float64 mean */
        const double *restrict center = pass->center;
        const double *restrict phase_mean = pass->phase_mean;
        const double *restrict phase_invstd = pass->phase_invstd;
        double *restrict sum_dy = pass->phase_out1, *restrict sum_dy_xhat = pass->phase_out2;
#pragma omp simd
        for (fb_index c = owned_first; c < owned_last; ++c) {
            sum_dy[c] = t1[c];
            sum_dy_xhat[c] = phase_invstd[c] * (t2[c] - t1[c] * (phase_mean[c] - center[c]));
        }
        return;
    }
    if (pass->mode == FB_BN_BACKWARD) {
        const FB_REAL *restrict spread = pass->spread;
        /* t2 := dweight */
#pragma omp simd
        for (fb_index c = first; c < last; ++c) {
            const double invstd = (double)spread[c];
            const double dweight = t2[c] * invstd;
            t2[c] = dweight;
            FB_TYPED(bn_backward_coefficients)(coef, c, weight ? (double)weight[c] : 1.0, invstd,
                                               t1[c], dweight, inv_n, 0.0);
        }
        const int accumulate = pass->accumulate;
        FB_REAL *restrict dweight = pass->dweight, *restrict dbias = pass->dbias;
        if (dweight) {
#pragma omp simd
            for (fb_index c = owned_first; c < owned_last; ++c)
                dweight[c] = (FB_REAL)((accumulate ? (double)dweight[c] : 0.0) + t2[c]);
        }
        if (dbias) {
#pragma omp simd
            for (fb_index c = owned_first; c < owned_last; ++c)
                dbias[c] = (FB_REAL)((accumulate ? (double)dbias[c] : 0.0) + t1[c]);
        }
        return;
    }
    for (fb_index c = first; c < last; ++c)
        FB_TYPED(bn_finalize)(plan, pass, c, pass->reduce ? t1[c] : 0.0,
                              pass->reduce ? t2[c] : 0.0, coefficients,
                              c >= owned_first && c < owned_last);
}

/* bn_finalize_column_values, then the wrap pad of the coefficients it set
 * (bn_wrap_mirror): the interleaved rewrite walks flat channel-wrapping
 * spans (bn_span_wrap), so every coefficient of an interleaved plan is set
 * here and nowhere else, with its mirrors.  Whichever channel range a thread
 * finalizes and whichever spans it walks afterwards (one flat span of whole
 * rows when its team turned out smaller than planned, OMP_THREAD_LIMIT), the
 * pad it can read is filled; no caller decides it. */
static void FB_TYPED(bn_finalize_columns)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                          fb_index first, fb_index last, double *restrict t1,
                                          double *restrict t2,
                                          const FB_TYPED(bn_coefficients) *coefficients,
                                          fb_index owned_first, fb_index owned_last)
{
    FB_TYPED(bn_finalize_column_values)(plan, pass, first, last, t1, t2, coefficients,
                                        owned_first, owned_last);
    if (!fb_bn_rewrites(pass->mode))
        return;  /* no coefficients: the reduce-only phases */
    FB_TYPED(bn_wrap_mirror)(coefficients->k1, plan->channels, first, last);
    FB_TYPED(bn_wrap_mirror)(coefficients->k2, plan->channels, first, last);
    FB_TYPED(bn_wrap_mirror)(coefficients->k3, plan->channels, first, last);
}

/* ---- rewrite one work item ------------------------------------------------- */

static void FB_TYPED(bn_apply_rows)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                    FB_TYPED(bn_coefficients) coef, fb_index k, fb_index c0,
                                    fb_index width);

/* Rewrite `len` values of channel c at `offset` (a row piece of the owned
 * block walk); the same bn_span calls as bn_apply_item's for a run, which
 * keeps its own copy so the coefficients are set up once per chunk. */
static void FB_TYPED(bn_apply_run)(const FB_TYPED(bn_pass) *pass, FB_TYPED(bn_coefficients) coef,
                                   fb_index c, fb_index offset, fb_index len, FB_REAL *staging)
{
    /* forward: in = x centered on k2 (ReLU applied here when relu);
     * backward: in = dy with the x term, x centered on the saved mean;
     * eval backward: in = dy alone (k2 = 0).  The backwards read dy masked
     * with relu (in bn_span, or staged through bn_grad_span). */
    const int forward = fb_bn_normalizes(pass->mode);
    const FB_REAL *x_term = fb_bn_training_dx(pass->mode) ? pass->x : NULL;
    const FB_REAL a = coef.k1[c], b = coef.k2[c], d = coef.k3[c];
    const FB_REAL shift = x_term ? b : d;
    const FB_REAL m = x_term ? pass->center_real[c] : b;
    /* the training backward masks dy inside bn_span; only the eval
     * backward, whose rewrite does not read x, stages a masked copy */
    const int staged = pass->relu && pass->mode == FB_BN_BACKWARD_EVAL;
    const int span_relu = pass->relu && !staged;
    const FB_REAL mask_scale = span_relu && !forward ? pass->mask_scale[c] : 0;
    const FB_REAL mask_shift = span_relu && !forward ? pass->mask_shift[c] : 0;
    const fb_index step = staged ? FB_BN_RELU_BLOCK : len;
    for (fb_index s = 0; s < len; s += step) {
        const fb_index n = fb_min_index(step, len - s), at = offset + s;
        const FB_REAL *in = forward ? pass->x + at
                            : staged ? FB_TYPED(bn_grad_span)(pass, c, at, n, staging)
                                     : pass->dy + at;
        FB_TYPED(bn_span)(pass->out + at, in, x_term ? x_term + at : NULL, n, m, a, shift, d,
                          pass->stream, span_relu, mask_scale, mask_shift);
    }
}

/* At least `values` more values of the paced channel rewritten (all that
 * are left when fewer), row by row.  A step that ends inside a row ends
 * where the output reaches a 64-byte line (also a vector boundary), so the
 * steps split no line of a streamed output: a row is stored as one whole
 * bn_span of it would be.  Elementwise: no value depends on where the steps
 * end. */
static void FB_TYPED(bn_paced_step)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                    FB_TYPED(bn_paced) *pace, fb_index values)
{
    const fb_index inner = plan->inner;
    while (values > 0 && pace->r < plan->outer) {
        const fb_index base = (pace->r * plan->row_channels + pace->c) * inner;
        fb_index stop = pace->k + values;
        if (stop < inner) {
            const fb_index past = (fb_index)((uintptr_t)(pass->out + base + stop) % 64);
            if (past > 0)
                stop += (64 - past) / (fb_index)sizeof(FB_REAL);
        }
        stop = fb_min_index(stop, inner);
        FB_TYPED(bn_apply_run)(pass, pace->coef, pace->c, base + pace->k, stop - pace->k,
                               pace->staging);
        values -= stop - pace->k;
        pace->k = stop;
        if (pace->k == inner) {
            pace->k = 0;
            ++pace->r;
        }
    }
}

/* Rewrite one work item through bn_span (see bn_span_impl.h; out may equal x
 * or dy). */
static void FB_TYPED(bn_apply_item)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                    FB_TYPED(bn_coefficients) coef, fb_index item)
{
    /* forward: in = x centered on k2 (ReLU applied here when relu);
     * backward: in = dy with the x term, x centered on the saved mean;
     * eval backward: in = dy alone (k2 = 0).  The backwards read dy masked
     * with relu (in bn_span, or staged through bn_grad_span/bn_grad_row). */
    const int forward = fb_bn_normalizes(pass->mode);
    const FB_REAL *x_term = fb_bn_training_dx(pass->mode) ? pass->x : NULL;
    FB_REAL staging[FB_BN_RELU_BLOCK];
    if (!plan->interleaved) {
        const fb_index c = item / plan->chunks, k = item - c * plan->chunks;
        const FB_REAL a = coef.k1[c], b = coef.k2[c], d = coef.k3[c];
        const FB_REAL shift = x_term ? b : d;
        const FB_REAL m = x_term ? pass->center_real[c] : b;
        /* the training backward masks dy inside bn_span; only the eval
         * backward, whose rewrite does not read x, stages a masked copy */
        const int staged = pass->relu && pass->mode == FB_BN_BACKWARD_EVAL;
        const int span_relu = pass->relu && !staged;
        const FB_REAL mask_scale = span_relu && !forward ? pass->mask_scale[c] : 0;
        const FB_REAL mask_shift = span_relu && !forward ? pass->mask_shift[c] : 0;
        fb_bn_runs runs = fb_bn_runs_start(plan->n, plan->row_channels, plan->inner, plan->chunk,
                                           k);
        fb_index offset, len;
        while (fb_bn_runs_next(&runs, c, &offset, &len)) {
            const fb_index step = staged ? FB_BN_RELU_BLOCK : len;
            for (fb_index s = 0; s < len; s += step) {
                const fb_index n = fb_min_index(step, len - s), at = offset + s;
                const FB_REAL *in = forward ? pass->x + at
                                    : staged ? FB_TYPED(bn_grad_span)(pass, c, at, n, staging)
                                             : pass->dy + at;
                FB_TYPED(bn_span)(pass->out + at, in, x_term ? x_term + at : NULL, n, m, a,
                                  shift, d, pass->stream, span_relu, mask_scale, mask_shift);
            }
        }
        return;
    }
    const fb_index k = item / plan->groups, j = item - k * plan->groups;
    const fb_index c0 = j * plan->group_width;
    FB_TYPED(bn_apply_rows)(plan, pass, coef, k, c0,
                            fb_min_index(plan->channels, c0 + plan->group_width) - c0);
}

/* Row chunk k of channels [c0, c0 + width) of an interleaved plan.  When the
 * piece is whole rows it is one contiguous stretch, rewritten as one flat
 * span whose channel wraps (bn_span_wrap); otherwise row by row. */
static void FB_TYPED(bn_apply_rows)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                    FB_TYPED(bn_coefficients) coef, fb_index k, fb_index c0,
                                    fb_index width)
{
    const int forward = fb_bn_normalizes(pass->mode);
    const FB_REAL *x_term = fb_bn_training_dx(pass->mode) ? pass->x : NULL;
    FB_REAL staging[FB_BN_RELU_BLOCK];
    const fb_index C = plan->channels;
    const fb_index r0 = k * plan->chunk, r1 = fb_min_index(plan->outer, (k + 1) * plan->chunk);
    const FB_REAL *shift = x_term ? coef.k2 : coef.k3;
    const FB_REAL *m = x_term ? pass->center_real : coef.k2;
    /* the training backward masks dy in the span; the eval backward (x not
     * in its rewrite) stages a masked copy of each row */
    const int staged = pass->relu && pass->mode == FB_BN_BACKWARD_EVAL;
    const int span_relu = pass->relu && !staged;
    const fb_index rows = staged || width < C ? r1 - r0 : 1;
    const fb_index len = rows == 1 ? (r1 - r0) * width : width;
    fb_index r = r0;
    if (rows > 1 && !staged && !pass->stream) {
        /* pieces of rows: row r with row r + half, sharing the coefficient
         * loads (bn_span_wrap_pair), as bn_span_wrap does for whole rows,
         * split by the same rule */
        const fb_index half = FB_TYPED(bn_pair_half_rows)(rows, C, 1);
        for (; r < r0 + half; ++r) {
            const fb_index offset = r * C + c0;
            FB_TYPED(bn_span_wrap_pair)(pass->out + offset,
                                        (forward ? pass->x : pass->dy) + offset,
                                        x_term ? x_term + offset : NULL, width, half * C, c0, C,
                                        m, coef.k1, shift, coef.k3, pass->mask_scale,
                                        pass->mask_shift, span_relu);
        }
        r += half;
    }
    for (; r < r0 + rows; ++r) {
        const fb_index offset = r * C + c0;
        const FB_REAL *in = forward ? pass->x + offset
                          : staged ? FB_TYPED(bn_grad_row)(pass, c0, offset, width, staging)
                                   : pass->dy + offset;
        FB_TYPED(bn_span_wrap)(pass->out + offset, in, x_term ? x_term + offset : NULL, len, c0,
                               C, m, coef.k1, shift, coef.k3, pass->mask_scale,
                               pass->mask_shift, pass->stream, span_relu);
    }
}

/* Rewrites interleaved work items [first, last) (numbered k * groups + j),
 * newest row chunk first, each row chunk's items as ONE column range: their
 * groups are consecutive, so the range is one piece of every row, or whole
 * rows -- one flat span (bn_apply_rows).  Item by item, a row chunk of a
 * wide array was rewritten one group-wide piece of each row at a time, the
 * next group's pieces after all rows of the first: with the streamed output
 * of (4096, 1024) float32 (two 512-channel groups), the rewrite alone took
 * 1.9-2.6 ms against 0.81 ms for (8192, 512), whole rows, the same bytes
 * (min of 40 calls, 1 thread, load 5).  The groups exist for the
 * reduction's partials (FB_BN_MAX_GROUP_WIDTH); the rewrite needs none.
 * An output value does not depend on where its span starts (bn_span_wrap),
 * so the bits are those of the item-by-item rewrite.
 * Cached (not streamed) outputs too: rewriting item by item, newest first
 * (so a single row chunk, e.g. (64, 4096), would reread its last-reduced
 * groups from L2) was slower than the one column range, float32, 1 thread,
 * min of 25 alternated calls (load 8): backward (64, 4096) 158 against 134
 * us, (256, 2048) 376 / 331, (200, 1000) 120 / 94; training forward
 * (64, 4096) 121 / 103, (256, 2048) 237 / 188. */
/* Row chunk k of channels [c0, c1) of an interleaved plan, through
 * bn_apply_rows: in one piece, except for the ReLU eval backward, which
 * stages a masked copy of each row piece (at most FB_BN_RELU_BLOCK values,
 * one group). */
static void FB_TYPED(bn_apply_columns)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                       FB_TYPED(bn_coefficients) coef, fb_index k, fb_index c0,
                                       fb_index c1)
{
    const int staged = pass->relu && pass->mode == FB_BN_BACKWARD_EVAL;
    const fb_index step = staged ? plan->group_width : c1 - c0;
    for (fb_index c = c0; c < c1; c += step)
        FB_TYPED(bn_apply_rows)(plan, pass, coef, k, c, fb_min_index(c1, c + step) - c);
}

static void FB_TYPED(bn_apply_interleaved)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                           FB_TYPED(bn_coefficients) coef, fb_index first,
                                           fb_index last)
{
    const fb_index groups = plan->groups, width = plan->group_width;
    if (last <= first)
        return;
    for (fb_index k = (last - 1) / groups + 1; k-- > first / groups;) {
        const fb_index j0 = fb_max_index(first, k * groups) - k * groups;
        const fb_index j1 = fb_min_index(last, (k + 1) * groups) - k * groups;
        const fb_index c0 = j0 * width, c1 = fb_min_index(plan->channels, j1 * width);
        FB_TYPED(bn_apply_columns)(plan, pass, coef, k, c0, c1);
    }
}

/* One row of channel c (`len` values at `at`, a run of one chunk) into the
 * channel's lanes: bn_reduce_planar's calls for the same run (the same
 * sums; no prefetch: these rows are short). */
FB_ALWAYS_INLINE void FB_TYPED(bn_short_run)(const FB_TYPED(bn_pass) *pass, fb_index c,
                                             fb_index at, fb_index len, int reduces_x,
                                             fb_bn_lanes *a1, fb_bn_lanes *a2)
{
    const FB_REAL center = pass->center_real[c];
    if (reduces_x)
        FB_TYPED(bn_lanes_shifted)(pass->x + at, len, center, a1, a2);
    else if (pass->relu)
        FB_TYPED(bn_lanes_grad)(pass->dy + at, pass->x + at, len, center, a1, a2, 1,
                                pass->mask_scale[c], pass->mask_shift[c], 0);
    else
        FB_TYPED(bn_lanes_grad)(pass->dy + at, pass->x + at, len, center, a1, a2, 0, 0, 0, 0);
}

/* Rewrite row r of channels [c0, c1) (short rows): bn_apply_run's bn_span
 * call per row, with the mode's choices made once.  The ReLU eval backward
 * (staged dy) goes through bn_apply_run itself. */
static void FB_TYPED(bn_short_rewrite)(const fb_bn_plan *plan, const FB_TYPED(bn_pass) *pass,
                                       const FB_TYPED(bn_coefficients) *coefficients,
                                       fb_index r, fb_index c0, fb_index c1, FB_REAL *staging)
{
    const FB_TYPED(bn_coefficients) coef = *coefficients;
    const fb_index inner = plan->inner, base = r * plan->row_channels * inner;
    if (pass->relu && pass->mode == FB_BN_BACKWARD_EVAL) {
        for (fb_index c = c0; c < c1; ++c)
            FB_TYPED(bn_apply_run)(pass, coef, c, base + c * inner, inner, staging);
        return;
    }
    const int stream = pass->stream, relu = pass->relu;
    FB_REAL *out = pass->out + base;
    if (fb_bn_normalizes(pass->mode)) {
        /* y = act((x - k2) * k1 + k3) */
        const FB_REAL *x = pass->x + base;
        for (fb_index c = c0; c < c1; ++c)
            FB_TYPED(bn_span)(out + c * inner, x + c * inner, NULL, inner, coef.k2[c],
                              coef.k1[c], coef.k3[c], 0, stream, relu, 0, 0);
    } else if (fb_bn_training_dx(pass->mode)) {
        /* dx = g * k1 + ((x - m) * k2 + k3), g = dy masked with relu */
        const FB_REAL *dy = pass->dy + base, *x = pass->x + base;
        for (fb_index c = c0; c < c1; ++c)
            FB_TYPED(bn_span)(out + c * inner, dy + c * inner, x + c * inner, inner,
                              pass->center_real[c], coef.k1[c], coef.k2[c], coef.k3[c], stream,
                              relu, relu ? pass->mask_scale[c] : 0,
                              relu ? pass->mask_shift[c] : 0);
    } else {
        /* eval backward: dx = (dy - k2) * k1 + k3, k2 = k3 = 0 */
        const FB_REAL *dy = pass->dy + base;
        for (fb_index c = c0; c < c1; ++c)
            FB_TYPED(bn_span)(out + c * inner, dy + c * inner, NULL, inner, coef.k2[c],
                              coef.k1[c], coef.k3[c], 0, stream, 0, 0, 0);
    }
}

/* Planar owned channels with short rows (FB_BN_SHORT_ROW_BYTES): blocks of
 * pass->short_block channels, each walked sample by sample -- sample r's rows
 * of the block are one contiguous stretch -- reduced, finalized, then
 * rewritten the same way, newest sample first.  Every channel keeps its own
 * lanes; each row is one run of bn_reduce_planar's (cut in two where a chunk
 * ends inside it), fed to the same lanes in the same order, and the chunk
 * totals are added in chunk order from 0: bn_reduce_planar's sums, bit for
 * bit.  The rewrite is elementwise (bn_span per row), so the walk changes
 * no value. */
static void FB_TYPED(bn_owned_short_rows)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                          const FB_TYPED(bn_coefficients) *coef, int rewrite,
                                          fb_index first, fb_index last)
{
    const fb_index inner = plan->inner, chunk = plan->chunk, n = plan->n;
    const fb_index row_stride = plan->row_channels * inner;
    const int reduces_x = fb_bn_reduces_x(pass->mode);
    fb_bn_lanes a1[FB_BN_SHORT_BLOCK_MAX], a2[FB_BN_SHORT_BLOCK_MAX];
    double s1[FB_BN_SHORT_BLOCK_MAX], s2[FB_BN_SHORT_BLOCK_MAX];
    FB_REAL staging[FB_BN_RELU_BLOCK];
    for (fb_index c0 = first; c0 < last; c0 += pass->short_block) {
        const fb_index c1 = fb_min_index(last, c0 + pass->short_block), width = c1 - c0;
        for (fb_index j = 0; j < width; ++j) {
            s1[j] = s2[j] = 0.0;
            fb_bn_lanes_zero(&a1[j]);
            fb_bn_lanes_zero(&a2[j]);
        }
        for (fb_index r = 0; r < plan->outer && pass->reduce; ++r) {
            /* values [p0, p2) of every channel's sequence; a chunk ends at
             * `cut` (rows are shorter than a chunk: at most one end) */
            const fb_index p0 = r * inner, p2 = p0 + inner;
            const fb_index cut = (p0 / chunk + 1) * chunk;
            const fb_index at0 = r * row_stride + c0 * inner;
            if (cut < p2) {
                const fb_index head = cut - p0;
                for (fb_index j = 0; j < width; ++j) {
                    const fb_index at = at0 + j * inner;
                    FB_TYPED(bn_short_run)(pass, c0 + j, at, head, reduces_x, &a1[j], &a2[j]);
                    s1[j] += fb_bn_lanes_total(&a1[j]);
                    s2[j] += fb_bn_lanes_total(&a2[j]);
                    fb_bn_lanes_zero(&a1[j]);
                    fb_bn_lanes_zero(&a2[j]);
                    FB_TYPED(bn_short_run)(pass, c0 + j, at + head, inner - head, reduces_x,
                                           &a1[j], &a2[j]);
                }
            } else {
                for (fb_index j = 0; j < width; ++j)
                    FB_TYPED(bn_short_run)(pass, c0 + j, at0 + j * inner, inner, reduces_x,
                                           &a1[j], &a2[j]);
            }
            if (cut == p2 || p2 == n) {  /* a chunk ends with the row */
                for (fb_index j = 0; j < width; ++j) {
                    s1[j] += fb_bn_lanes_total(&a1[j]);
                    s2[j] += fb_bn_lanes_total(&a2[j]);
                    fb_bn_lanes_zero(&a1[j]);
                    fb_bn_lanes_zero(&a2[j]);
                }
            }
        }
        for (fb_index c = c0; c < c1; ++c)
            FB_TYPED(bn_finalize)(plan, pass, c, s1[c - c0], s2[c - c0], coef, 1);
        for (fb_index r = plan->outer; rewrite && r-- > 0;)
            FB_TYPED(bn_short_rewrite)(plan, pass, coef, r, c0, c1, staging);
    }
    if (pass->stream)
        fb_stream_fence();
}

/* The owned walks' common steps (bn_owned_turns, bn_owned_channels). */

/* Channel c's totals t1, t2 in: finalize it, then rewrite its chunks,
 * newest first (the likeliest to still be in L1/L2). */
static inline void FB_TYPED(bn_owned_channel_finish)(const fb_bn_plan *plan,
                                                    FB_TYPED(bn_pass) *pass,
                                                    const FB_TYPED(bn_coefficients) *coef,
                                                    int rewrite, fb_index c, double t1,
                                                    double t2)
{
    const fb_index chunks = plan->chunks;
    FB_TYPED(bn_finalize)(plan, pass, c, t1, t2, coef, 1);
    for (fb_index s = 0; s < chunks && rewrite; ++s)
        FB_TYPED(bn_apply_item)(plan, pass, *coef, (c + 1) * chunks - 1 - s);
}

/* Zero the sums and lanes of the block [c0, c1) (index c - c0). */
static inline void FB_TYPED(bn_owned_block_start)(fb_index c0, fb_index c1, fb_bn_lanes *a1,
                                                 fb_bn_lanes *a2, double *s1, double *s2)
{
    for (fb_index c = c0; c < c1; ++c) {
        s1[c - c0] = s2[c - c0] = 0.0;
        fb_bn_lanes_zero(&a1[c - c0]);
        fb_bn_lanes_zero(&a2[c - c0]);
    }
}

/* The block [c0, c1) reduced into s1, s2: finalize its channels, then
 * rewrite it, newest rows first (the likeliest to still be in L2).  Each
 * row piece is one run, not cut where chunks end: the rewrite is
 * elementwise, so the cut changes no value, but every run boundary inside
 * a cache line of the output is written with plain scalar stores between
 * streaming ones.  With the usual 16-byte-aligned arrays, (64,128,56,56)
 * float32 (cuts in 3 of 4 rows) took 6.70 ms for the split-phase apply and
 * 8.67 ms for the training forward with the cuts, 6.06 and 7.87 ms
 * without, 5.98 and 7.69 ms with 64-byte-aligned arrays (1 thread, min CPU
 * time of 8 interleaved rounds, real-time priority on a loaded 2-core
 * machine). */
static void FB_TYPED(bn_owned_block_finish)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                            const FB_TYPED(bn_coefficients) *coef, int rewrite,
                                            fb_index c0, fb_index c1, const double *s1,
                                            const double *s2, FB_REAL *staging)
{
    const fb_index inner = plan->inner, row_stride = plan->row_channels;
    for (fb_index c = c0; c < c1; ++c)
        FB_TYPED(bn_finalize)(plan, pass, c, s1[c - c0], s2[c - c0], coef, 1);
    for (fb_index r = plan->outer; rewrite && r-- > 0;)
        for (fb_index c = c0; c < c1; ++c)
            FB_TYPED(bn_apply_run)(pass, *coef, c, (r * row_stride + c) * inner, inner,
                                   staging);
}

/* Planar, many channels: this thread's channels, in blocks of
 * pass->owned_block neighbours: reduce a block, finalize it, rewrite it while
 * it is still in L2/L3; no barrier.  A block is walked row by row, each row
 * through all its channels, so memory is read (and written) in stretches of
 * block x inner values instead of one row piece of one channel at a time:
 * for (64,128,56,56) float32, reading 12.5 KiB pieces 1.6 MiB apart ran the
 * statistics at half the speed of one contiguous stretch per channel
 * (measured; see FB_BN_OWNED_STRETCH_BYTES).  Each channel's row pieces
 * are cut at its chunk boundaries into exactly the runs of fb_bn_runs, fed
 * to the same lanes in the same order, and its chunk partials are added in
 * chunk order from 0: the sums are bn_reduce_planar's, bit for bit.  The
 * rewrite calls bn_span once per row piece (bn_apply_item, per chunk run):
 * elementwise, the same values whatever the runs. */
/* bn_owned_channels for the statistics of long rows (bn_takes_turns): the
 * same blocks, sums and rewrites, the reduction in turns (FB_BN_STREAMS
 * chunks of a channel, or channels of a block row by row).  A separate
 * function, so that the one-run walk's code is left exactly as it was. */
static void FB_TYPED(bn_owned_turns)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                     const FB_TYPED(bn_coefficients) *coef, int rewrite,
                                     int team, int tid)
{
    const fb_index C = plan->channels;
    const fb_index width = pass->owned_block;
    fb_index first, last;
    fb_split_range(C, team, tid, &first, &last);
    fb_bn_lanes a1[FB_BN_OWNED_BLOCK_MAX], a2[FB_BN_OWNED_BLOCK_MAX];
    double s1[FB_BN_OWNED_BLOCK_MAX], s2[FB_BN_OWNED_BLOCK_MAX];
    FB_REAL staging[FB_BN_RELU_BLOCK];
    for (fb_index c0 = first; c0 < last; c0 += width) {
        const fb_index c1 = fb_min_index(last, c0 + width);
        if (width == 1) {  /* bn_owned_channels' chunk-by-chunk walk */
            double t1, t2;
            FB_TYPED(bn_channel_totals)(plan, pass, c0, 1, NULL, &t1, &t2);
            FB_TYPED(bn_owned_channel_finish)(plan, pass, coef, rewrite, c0, t1, t2);
            continue;
        }
        FB_TYPED(bn_owned_block_start)(c0, c1, a1, a2, s1, s2);
        for (fb_index r = 0; r < plan->outer; ++r)
            for (fb_index c = c0; c < c1; c += FB_BN_STREAMS)
                FB_TYPED(bn_owned_row_turns)(plan, pass, r, c0, c,
                                             (int)fb_min_index(FB_BN_STREAMS, c1 - c), a1, a2,
                                             s1, s2);
        FB_TYPED(bn_owned_block_finish)(plan, pass, coef, rewrite, c0, c1, s1, s2, staging);
    }
    if (pass->stream)
        fb_stream_fence();
}

/* The owned channels of a training forward whose output is streamed
 * (DRAM-sized arrays), one at a time: channel c is reduced while channel
 * c - 1, already finalized, is rewritten -- a few KiB of rewrite after
 * every few KiB read (bn_paced_step: from bn_reduce_chunks' turns when rows
 * take turns, else after each chunk of bn_reduce_planar) -- and the last
 * channel alone at the end.  The walks one block after the other read from
 * memory in their reductions and wrote to it in their rewrites, one at a
 * time; a core keeps more requests in flight when it does both at once.
 * The sums are those of bn_owned_turns / bn_owned_channels (the same runs,
 * turns, lanes and chunk order), and the rewrite is elementwise: only the
 * order of the memory accesses changes.  The two channels in flight (2 x
 * 784 KiB of x for a (64,128,56,56) float32 forward) stay in L2 where it is
 * large, else in L3.
 * Measured first as a standalone loop (128 channels of 64 x 3136 float32
 * values; the channel sum, then an AVX-512 streamed y = a x + b; 5 runs):
 * 2 threads 5.6-5.95 ms one channel after the other, 5.0-5.15 ms paced by
 * 1-4 KiB, 5.4-5.5 by 12.5 KiB; 1 thread 12.1-13.0 against 10.7-10.9 ms.
 * Then against the unpaced build (benchmarks/bn_ab_builds.py --axis 1 --out,
 * float32, min of 25 alternated rounds, load 1.0-1.3), training forward at
 * 2 / 1 threads: (64,128,56,56) 6.99 -> 5.74 / 14.4 -> 11.7 ms,
 * (32,64,112,112) (1.5 MiB channels: the previous one is re-read from L3)
 * 6.77 -> 6.49 / 13.5 -> 13.0, (256,64,28,28) (3 KiB rows, no turns) 3.56
 * -> 3.21 / 7.21 -> 6.27, (32,256,28,28) 1.38 -> 1.20 / 2.85 -> 2.50.  Only
 * the forward paces: the backward (dy and x, paced after each chunk) lost
 * on the largest shapes, (64,128,56,56) 11.1 -> 12.1 / 22.6 -> 23.1 ms and
 * (256,64,28,28) 5.39 -> 6.10 / 11.1 -> 12.2, with two 1.6 MiB channels of
 * two arrays in flight, where (32,256,28,28) gained (2.44 -> 2.17 / 4.96
 * -> 3.78). */
static void FB_TYPED(bn_owned_paced)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                     const FB_TYPED(bn_coefficients) *coef, int turns,
                                     int team, int tid)
{
    fb_index first, last;
    fb_split_range(plan->channels, team, tid, &first, &last);
    FB_REAL staging[FB_BN_RELU_BLOCK];
    FB_TYPED(bn_paced) pace;
    pace.coef = *coef;
    pace.staging = staging;
    for (fb_index c = first; c < last; ++c) {
        FB_TYPED(bn_paced) *paced = c > first ? &pace : NULL;
        double t1, t2;
        FB_TYPED(bn_channel_totals)(plan, pass, c, turns, paced, &t1, &t2);
        if (paced)  /* what is left of the previous channel */
            FB_TYPED(bn_paced_step)(plan, pass, paced, plan->n);
        FB_TYPED(bn_finalize)(plan, pass, c, t1, t2, coef, 1);
        pace.c = c;
        pace.r = pace.k = pace.debt = 0;
    }
    if (last > first)
        FB_TYPED(bn_paced_step)(plan, pass, &pace, plan->n);
    fb_stream_fence();
}

static void FB_TYPED(bn_owned_channels)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass,
                                        const FB_TYPED(bn_coefficients) *coef, int rewrite,
                                        int team, int tid)
{
    const fb_index C = plan->channels, inner = plan->inner, chunk = plan->chunk;
    const fb_index row_stride = plan->row_channels;  /* channels between rows */
    const fb_index width = pass->owned_block;
    fb_index first, last;
    fb_split_range(C, team, tid, &first, &last);
    if (pass->short_block > 0) {
        FB_TYPED(bn_owned_short_rows)(plan, pass, coef, rewrite, first, last);
        return;
    }
    fb_bn_lanes a1[FB_BN_OWNED_BLOCK_MAX], a2[FB_BN_OWNED_BLOCK_MAX];
    double s1[FB_BN_OWNED_BLOCK_MAX], s2[FB_BN_OWNED_BLOCK_MAX];
    FB_REAL staging[FB_BN_RELU_BLOCK];
    const int reduces_x = fb_bn_reduces_x(pass->mode);
    if (width == 1) {
        /* one channel at a time, chunk by chunk: the same runs and sums
         * with less bookkeeping per run, which short rows notice (the row
         * walk below cost (4,32,8,8) float32 ~4 us more per call, measured) */
        for (fb_index c = first; c < last; ++c) {
            double t1 = 0.0, t2 = 0.0;
            if (pass->reduce)
                FB_TYPED(bn_channel_totals)(plan, pass, c, 0, NULL, &t1, &t2);
            FB_TYPED(bn_owned_channel_finish)(plan, pass, coef, rewrite, c, t1, t2);
        }
        if (pass->stream)
            fb_stream_fence();
        return;
    }
    for (fb_index c0 = first; c0 < last; c0 += width) {
        const fb_index c1 = fb_min_index(last, c0 + width);
        FB_TYPED(bn_owned_block_start)(c0, c1, a1, a2, s1, s2);
        for (fb_index r = 0; r < plan->outer && pass->reduce; ++r) {
            /* row r of every channel: values [p0, p2) of its sequence, cut
             * where chunks end (cut0, cut0 + chunk, ...: rows may be longer
             * than a chunk); one division per row of the block */
            const fb_index p0 = r * inner, p2 = p0 + inner;
            const fb_index cut0 = (p0 / chunk + 1) * chunk;
            const fb_index next_row_ahead = FB_TYPED(bn_next_row_ahead)(plan, r + 1);
            for (fb_index c = c0; c < c1; ++c) {
                const fb_index j = c - c0;
                const FB_REAL center = pass->center_real[c];
                const fb_index base = (r * row_stride + c) * inner - p0;  /* value p at base + p */
                for (fb_index p = p0, cut = cut0; p < p2; cut += chunk) {
                    const fb_index stop = fb_min_index(p2, cut);
                    if (reduces_x)
                        FB_TYPED(bn_lanes_shifted)(pass->x + base + p, stop - p, center,
                                                   &a1[j], &a2[j]);
                    else if (pass->relu)
                        FB_TYPED(bn_lanes_grad)(pass->dy + base + p, pass->x + base + p,
                                                stop - p, center, &a1[j], &a2[j], 1,
                                                pass->mask_scale[c], pass->mask_shift[c],
                                                next_row_ahead);
                    else
                        FB_TYPED(bn_lanes_grad)(pass->dy + base + p, pass->x + base + p,
                                                stop - p, center, &a1[j], &a2[j], 0, 0, 0,
                                                next_row_ahead);
                    p = stop;
                    if (p == cut || p == plan->n) {  /* a chunk ends */
                        s1[j] += fb_bn_lanes_total(&a1[j]);
                        s2[j] += fb_bn_lanes_total(&a2[j]);
                        fb_bn_lanes_zero(&a1[j]);
                        fb_bn_lanes_zero(&a2[j]);
                    }
                }
            }
        }
        FB_TYPED(bn_owned_block_finish)(plan, pass, coef, rewrite, c0, c1, s1, s2, staging);
    }
    if (pass->stream)
        fb_stream_fence();
}

/* ---- the pass ------------------------------------------------------------- */

/* Body run by every thread of the team (or by the caller alone). */
static void FB_TYPED(bn_pass_body)(const fb_bn_plan *plan, FB_TYPED(bn_pass) *pass)
{
    const int team = fb_team_size(), tid = fb_thread_id();
    const FB_TYPED(bn_coefficients) coef = FB_TYPED(bn_thread_coefficients)(pass, plan->channels,
                                                                            tid);
    const int rewrite = fb_bn_rewrites(pass->mode);
    const int turns = FB_TYPED(bn_takes_turns)(plan, pass);
    if (plan->owned) {
        if (FB_TYPED(bn_paces)(pass))
            FB_TYPED(bn_owned_paced)(plan, pass, &coef, turns, team, tid);
        else if (turns)  /* long rows: never short ones (pass->short_block is 0) */
            FB_TYPED(bn_owned_turns)(plan, pass, &coef, rewrite, team, tid);
        else
            FB_TYPED(bn_owned_channels)(plan, pass, &coef, rewrite, team, tid);
        return;
    }
    if (plan->owned_columns) {
        /* interleaved, many channels: this thread's channels (whole cache
         * lines of them), every row: reduce, finalize, rewrite; no barrier */
        const fb_index C = plan->channels, unit = FB_BN_COLUMN_UNIT;
        fb_index first, last;
        fb_split_range(fb_ceil_div(C, unit), team, tid, &first, &last);
        first *= unit;
        last = fb_min_index(C, last * unit);
        for (fb_index k = 0; k < plan->chunks && pass->reduce; ++k)
            for (fb_index c0 = first; c0 < last; c0 += plan->group_width)
                FB_TYPED(bn_reduce_rows)(plan, pass, k, c0,
                                         fb_min_index(last, c0 + plan->group_width) - c0);
        double *totals = pass->totals + (fb_index)2 * C * tid;
        if (pass->reduce)
            FB_TYPED(bn_interleaved_totals)(plan, pass, first, last, totals, totals + C);
        FB_TYPED(bn_finalize_columns)(plan, pass, first, last, totals, totals + C, &coef,
                                      first, last);
        /* the whole owned range of each row at once (bn_apply_interleaved;
         * all of every row, one flat channel-wrapping span, when a team
         * smaller than planned left this thread every column: the pad is
         * filled by bn_finalize_columns) */
        for (fb_index k = plan->chunks; rewrite && k-- > 0;)
            FB_TYPED(bn_apply_columns)(plan, pass, coef, k, first, last);
        if (pass->stream)
            fb_stream_fence();
        return;
    }
    /* shared channels, block by block: one barrier per block */
    for (fb_index c0 = 0; c0 < plan->channels; c0 += plan->block_channels) {
        const fb_index c1 = fb_min_index(plan->channels, c0 + plan->block_channels);
        fb_index items_begin, items_end, first, last, owned_first, owned_last;
        fb_bn_block_items(plan, c0, c1, &items_begin, &items_end);
        fb_split_range(items_end - items_begin, team, tid, &first, &last);
        first += items_begin;
        last += items_begin;
        if (pass->reduce) {
            for (fb_index item = first; item < last; ++item) {
                if (plan->interleaved) {
                    FB_TYPED(bn_reduce_interleaved)(plan, pass, item);
                } else if (turns) {  /* FB_BN_STREAMS chunks in turns */
                    const int count = (int)fb_min_index(FB_BN_STREAMS, last - item);
                    FB_TYPED(bn_reduce_chunks)(plan, pass, item, count, pass->sum1 + item,
                                               pass->sum2 + item, NULL);
                    item += count - 1;
                } else {  /* planar partial index c * chunks + k == item */
                    FB_TYPED(bn_reduce_planar)(plan, pass, item, pass->sum1 + item,
                                               pass->sum2 + item);
                }
            }
#pragma omp barrier
        }
        /* every thread derives every coefficient of the block from the same
         * partials (identical values); one thread per channel writes outputs */
        fb_split_range(c1 - c0, team, tid, &owned_first, &owned_last);
        double *totals = pass->totals + (fb_index)2 * plan->channels * tid;
        if (pass->reduce && plan->interleaved)
            FB_TYPED(bn_interleaved_totals)(plan, pass, 0, plan->channels, totals,
                                            totals + plan->channels);
        if (plan->interleaved) {
            FB_TYPED(bn_finalize_columns)(plan, pass, c0, c1, totals, totals + plan->channels,
                                          &coef, c0 + owned_first, c0 + owned_last);
        } else {
            for (fb_index c = c0; c < c1; ++c) {
                double s1 = 0.0, s2 = 0.0;
                if (pass->reduce)
                    FB_TYPED(bn_channel_sums)(plan, pass, c, &s1, &s2);
                FB_TYPED(bn_finalize)(plan, pass, c, s1, s2, &coef,
                                      c >= c0 + owned_first && c < c0 + owned_last);
            }
        }
        /* newest first: the items this thread reduced last are the likeliest
         * to still be in its cache */
        if (plan->interleaved && rewrite)
            FB_TYPED(bn_apply_interleaved)(plan, pass, coef, first, last);
        else
            for (fb_index item = last; rewrite && item-- > first;)
                FB_TYPED(bn_apply_item)(plan, pass, coef, item);
    }
    if (pass->stream)
        fb_stream_fence();
}

/* Plan, allocate the workspace (O(channels x threads), plus the chunk
 * partials when threads share channels), run, free.
 * `streams`: arrays read by the reduction (sizes the cache blocks).
 * `row_channels`: as in bn_kernels.h (`channels` for a whole array). */
static int FB_TYPED(bn_run)(FB_TYPED(bn_pass) *pass, fb_index outer, fb_index channels,
                            fb_index row_channels, fb_index inner, int streams,
                            int num_threads)
{
    /* bytes moved: the reduction's input arrays, plus the output */
    const fb_index values = outer * channels * inner;
    int nt = fb_threads_for_bytes(values * (fb_index)sizeof(FB_REAL)
                                  * (streams + fb_bn_rewrites(pass->mode)), num_threads);
    /* by the size of the whole array: a channel range of a large one is
     * one of a sequence of calls that together write all of it */
    pass->stream = fb_bn_stream_output(outer, channels, row_channels, inner,
                                       (fb_index)sizeof(FB_REAL));
    fb_bn_plan plan;
    fb_bn_make_plan(&plan, outer, channels, row_channels, inner,
                    streams * (fb_index)sizeof(FB_REAL), nt);
    /* owned planar blocks: rows of at least FB_BN_OWNED_STRETCH_BYTES per
     * stretch, within FB_BN_OWNED_BLOCK_BYTES of streamed input */
    {
        const fb_index row_bytes = inner * (fb_index)sizeof(FB_REAL);
        pass->owned_block = fb_bn_owned_block_width(row_bytes, outer * row_bytes * streams,
                                                    fb_bn_rewrites(pass->mode));
        pass->short_block = fb_bn_short_block_width(row_bytes, outer * row_bytes * streams);
    }
    /* stored partials only where threads share channels; owners add theirs
     * on the fly */
    const fb_index partials = pass->reduce && !plan.owned ? fb_bn_partial_count(&plan) : 0;
    /* sum2 starts 2 KiB (mod 4 KiB) past sum1: the interleaved reduction
     * loads and stores s1[c], then s2[c], row after row, and at a distance
     * that is a multiple of 4 KiB the load of one waits on the store to the
     * other (4K aliasing).  Profiled on (256, 512) float32 training forward,
     * the instruction after that load was 30 % of the reduction's time. */
    const fb_index sum2_offset = partials ? fb_ceil_div(partials, 512) * 512 + 256 : 0;
    const fb_index totals = pass->reduce && plan.interleaved ? 2 * (fb_index)nt * channels : 0;
    /* per-channel arrays in FB_REAL are wrapped (bn_span_wrap) */
    const fb_index stride = channels + FB_BN_WRAP_PAD;
    /* relu backwards: the forward's coefficients, for the mask */
    const fb_index masks = pass->relu && !fb_bn_normalizes(pass->mode) ? 2 * stride : 0;
    const size_t bytes = (size_t)(sum2_offset + partials + totals + channels) * sizeof(double)
                       + (size_t)((3 * (fb_index)nt + 1) * stride + masks) * sizeof(FB_REAL);
    double *workspace = (double *)malloc(bytes);
    if (!workspace)
        return FASTBN_ERR_NOMEM;
    pass->sum1 = workspace;
    pass->sum2 = workspace + sum2_offset;
    pass->totals = pass->sum2 + partials;
    pass->center = pass->totals + totals;
    pass->center_real = (FB_REAL *)(pass->center + channels);
    pass->coefficients = pass->center_real + stride;
    pass->mask_scale = pass->coefficients + 3 * (fb_index)nt * stride;
    pass->mask_shift = pass->mask_scale + stride;
    /* one loop per source of the centers (each vectorizes; with the choice
     * made per channel, this setup was ~5 % of a (8, 4096) float32
     * backward, profiled); the restrict pointers live in this block only,
     * the pass reads the same memory through pass-> afterwards */
    {
        FB_REAL *restrict center_real = pass->center_real;
        if (fb_bn_reduces_x(pass->mode)) {
            const FB_REAL *restrict x = pass->x;
            for (fb_index c = 0; c < channels; ++c)
                center_real[c] = x[c * inner];  /* first value of channel c */
        } else if (pass->phase_mean) {
            const double *restrict phase_mean = pass->phase_mean;
#pragma omp simd
            for (fb_index c = 0; c < channels; ++c)
                center_real[c] = (FB_REAL)phase_mean[c];
        } else if (pass->mean) {
            const FB_REAL *restrict mean = pass->mean;
#pragma omp simd
            for (fb_index c = 0; c < channels; ++c)
                center_real[c] = mean[c];
        } else {
            for (fb_index c = 0; c < channels; ++c)
                center_real[c] = 0;
        }
        double *restrict center = pass->center;
#pragma omp simd
        for (fb_index c = 0; c < channels; ++c)
            center[c] = (double)center_real[c];
        for (fb_index c = 0; masks && c < channels; ++c) {
            /* as the forward computed them: from the saved mean and invstd
             * (training) or the running statistics (eval) */
            const double invstd = pass->phase_invstd ? pass->phase_invstd[c]
                : pass->mode == FB_BN_BACKWARD
                ? (double)pass->spread[c] : 1.0 / sqrt((double)pass->spread[c] + pass->eps);
            FB_TYPED(bn_normalize_coefficients)(invstd, pass->mask_weight, pass->bias, c,
                                                pass->mask_scale + c, pass->mask_shift + c);
        }
    }
    FB_TYPED(bn_wrap_extend)(pass->center_real, channels);
    if (masks) {
        FB_TYPED(bn_wrap_extend)(pass->mask_scale, channels);
        FB_TYPED(bn_wrap_extend)(pass->mask_shift, channels);
    }
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        FB_TYPED(bn_pass_body)(&plan, pass);
    } else {
        FB_TYPED(bn_pass_body)(&plan, pass);
    }
    free(workspace);
    return FASTBN_OK;
}

/* ---- entry points ---------------------------------------------------------- */

static int FB_TYPED(bn_train_forward)(FASTBN_BN_TRAIN_FORWARD_ARGS(FB_REAL))
{
    if (outer < 0 || channels <= 0 || inner < 0 || outer * inner < 2 || !x || !y
        || !saved_mean || !saved_invstd || (running_mean == NULL) != (running_var == NULL)
        || !(eps > 0))
        return FASTBN_ERR_ARGUMENT;
    FB_TYPED(bn_pass) pass = {0};
    pass.mode = FB_BN_FORWARD;
    pass.reduce = 1;
    pass.x = x;
    pass.out = y;
    pass.weight = weight;
    pass.bias = bias;
    pass.saved_mean = saved_mean;
    pass.saved_invstd = saved_invstd;
    pass.running_mean = running_mean;
    pass.running_var = running_var;
    pass.eps = eps;
    pass.momentum = momentum;
    pass.relu = relu;
    return FB_TYPED(bn_run)(&pass, outer, channels, channels, inner, 1, num_threads);
}

static int FB_TYPED(bn_backward)(FASTBN_BN_BACKWARD_ARGS(FB_REAL))
{
    if (outer < 0 || channels <= 0 || inner < 0 || !dy || !x || !dx || !mean || !invstd)
        return FASTBN_ERR_ARGUMENT;
    FB_TYPED(bn_pass) pass = {0};
    pass.mode = FB_BN_BACKWARD;
    pass.reduce = 1;
    pass.accumulate = accumulate;
    pass.dy = dy;
    pass.x = x;
    pass.out = dx;
    pass.weight = weight;
    pass.mean = mean;
    pass.spread = invstd;
    pass.bias = bias;
    pass.mask_weight = weight;
    pass.dweight = dweight;
    pass.dbias = dbias;
    pass.relu = relu;
    return FB_TYPED(bn_run)(&pass, outer, channels, channels, inner, 2, num_threads);
}

static int FB_TYPED(bn_backward_eval)(FASTBN_BN_BACKWARD_EVAL_ARGS(FB_REAL))
{
    const int reduce = dweight != NULL || dbias != NULL;
    if (outer < 0 || channels <= 0 || inner < 0 || !dy || !dx || !running_mean || !running_var
        || ((reduce || relu) && !x) || !(eps >= 0))
        return FASTBN_ERR_ARGUMENT;
    FB_TYPED(bn_pass) pass = {0};
    pass.mode = FB_BN_BACKWARD_EVAL;
    pass.reduce = reduce;
    pass.accumulate = accumulate;
    pass.dy = dy;
    pass.x = x;
    pass.out = dx;
    pass.weight = weight;
    pass.mean = running_mean;
    pass.spread = running_var;
    pass.bias = bias;
    pass.mask_weight = weight;
    pass.eps = eps;
    pass.dweight = dweight;
    pass.dbias = dbias;
    pass.relu = relu;
    return FB_TYPED(bn_run)(&pass, outer, channels, channels, inner, reduce ? 2 : 1,
                            num_threads);
}

/* ---- split-phase entry points ---------------------------------------------- */
/* The fused forward and backward cut at their per-channel sums (see
 * FASTBN_BN_STATS_ARGS and after in bn_kernels.h): the same passes, plans,
 * lanes and chunk order for the reductions, the same rewrite coefficients
 * for the rewrites, so composing the phases on one process reproduces the
 * fused kernels. */

/* The split phases' row stride: a sub-range only of a planar array. */
static inline int FB_TYPED(bn_rows_valid)(fb_index channels, fb_index row_channels,
                                          fb_index inner)
{
    return row_channels == channels || (row_channels > channels && inner > 1);
}

/* bn_stats_f32, bn_stats_f64 */
static int FB_TYPED(bn_stats)(FASTBN_BN_STATS_ARGS(FB_REAL))
{
    if (!FB_TYPED(bn_rows_valid)(channels, row_channels, inner))
        return FASTBN_ERR_ARGUMENT;
    if (outer < 0 || channels <= 0 || inner < 0 || outer * inner < 1 || !x || !mean || !m2)
        return FASTBN_ERR_ARGUMENT;
    FB_TYPED(bn_pass) pass = {0};
    pass.mode = FB_BN_STATS;
    pass.reduce = 1;
    pass.x = x;
    pass.phase_out1 = mean;
    pass.phase_out2 = m2;
    return FB_TYPED(bn_run)(&pass, outer, channels, row_channels, inner, 1, num_threads);
}

/* The split phases' rewrites (apply, backward_apply) need no reduction:
 * they run the eval forward's straight walk (bn_straight), one pass over the
 * arrays in memory order, with the coefficients the fused kernels derive for
 * the same statistics (bn_forward_coefficients, bn_backward_coefficients)
 * and the same bn_span / bn_span_wrap per element, so every value is what
 * the pass walk (bn_run) wrote before, bit for bit.  That walk is shaped
 * for a reduction followed by a rewrite from cache; without the reduction,
 * its blocks of channels revisited row by row (and their cuts inside cache
 * lines of a streamed output) only cost time.  (32,128,56,56) float32,
 * 1 thread, outputs allocated beforehand, min CPU time of 25 interleaved
 * rounds (benchmarks/bn_phases.py, load 5): apply 5.61 ms through the pass
 * walk, 5.07 ms straight (the eval forward: 4.78-4.89 ms); backward_apply
 * 8.68 -> 6.87 ms.
 * Walking the reduction's blocks in reverse instead (the last blocks it read
 * first, rows newest first, hoping to find them still cached) lost, session
 * 9: same shape, min CPU time of 25 rounds alternated with the straight
 * walk's build (load 2.8): apply 2.92 against 2.60 ms, stats + apply 5.37 /
 * 4.86, backward_apply 3.98 / 3.86, backward_reduce + backward_apply 7.75 /
 * 7.61 (fresh outputs: 9.61 / 9.40 and 12.49 / 12.20).  Little of a
 * streamed read survives in the caches here: the last K MiB of a 64 MiB
 * array, read (np.dot, 1 thread) right after the whole array or after
 * another 64 MiB one, took 0.030 / 0.034 ms (K = 1), 0.279 / 0.309 (8),
 * 0.621 / 0.668 (16).
 *
 * The geometry of the straight walk: a single channel (channels ==
 * row_channels == 1) is one contiguous sequence, walked as planar, as the
 * plans do (fb_bn_make_plan). */
static inline void FB_TYPED(bn_phase_geometry)(fb_index *outer, fb_index channels,
                                               fb_index row_channels, fb_index *inner)
{
    if (channels == 1 && row_channels == 1) {
        *inner *= *outer;
        *outer = 1;
    }
}

/* bn_apply_f32, bn_apply_f64 */
static int FB_TYPED(bn_apply)(FASTBN_BN_APPLY_ARGS(FB_REAL))
{
    if (!FB_TYPED(bn_rows_valid)(channels, row_channels, inner))
        return FASTBN_ERR_ARGUMENT;
    if (outer < 0 || channels <= 0 || inner < 0 || !x || !y || !mean || !invstd)
        return FASTBN_ERR_ARGUMENT;
    FB_TYPED(bn_phase_geometry)(&outer, channels, row_channels, &inner);
    /* k1, k2, k3, wrapped when channels-last (bn_span_wrap) */
    const fb_index stride = channels + FB_BN_WRAP_PAD;
    FB_REAL *coefficients = (FB_REAL *)malloc(3 * (size_t)stride * sizeof(FB_REAL));
    if (!coefficients)
        return FASTBN_ERR_NOMEM;
    const FB_TYPED(bn_coefficients) coef = {coefficients, coefficients + stride,
                                            coefficients + 2 * stride};
    FB_TYPED(bn_pass) pass = {0};   /* bn_forward_coefficients reads weight, bias */
    pass.weight = weight;
    pass.bias = bias;
    for (fb_index c = 0; c < channels; ++c)
        FB_TYPED(bn_forward_coefficients)(&pass, coef, c, mean[c], invstd[c], relu);
    if (inner == 1) {
        FB_TYPED(bn_wrap_extend)(coef.k1, channels);
        FB_TYPED(bn_wrap_extend)(coef.k2, channels);
        FB_TYPED(bn_wrap_extend)(coef.k3, channels);
    }
    /* y = act((x - k2) * k1 + k3), as the pass walk's forward rewrite */
    const FB_TYPED(bn_straight_coefficients) k = {coef.k2, coef.k1, coef.k3, NULL, NULL, NULL};
    /* x read, y written */
    FB_TYPED(bn_straight_all)(y, x, NULL, &k, outer, channels, row_channels, inner, relu, 2,
                              num_threads);
    free(coefficients);
    return FASTBN_OK;
}

/* bn_backward_reduce_f32, bn_backward_reduce_f64 */
static int FB_TYPED(bn_backward_reduce)(FASTBN_BN_BACKWARD_REDUCE_ARGS(FB_REAL))
{
    if (!FB_TYPED(bn_rows_valid)(channels, row_channels, inner))
        return FASTBN_ERR_ARGUMENT;
    if (outer < 0 || channels <= 0 || inner < 0 || !dy || !x || !mean || !invstd || !sum_dy
        || !sum_dy_xhat)
        return FASTBN_ERR_ARGUMENT;
    FB_TYPED(bn_pass) pass = {0};
    pass.mode = FB_BN_BACKWARD_REDUCE;
    pass.reduce = 1;
    pass.dy = dy;
    pass.x = x;
    pass.phase_mean = mean;
    pass.phase_invstd = invstd;
    pass.mask_weight = mask_weight;
    pass.bias = mask_bias;
    pass.relu = relu;
    pass.phase_out1 = sum_dy;
    pass.phase_out2 = sum_dy_xhat;
    return FB_TYPED(bn_run)(&pass, outer, channels, row_channels, inner, 2, num_threads);
}

/* bn_backward_apply_f32, bn_backward_apply_f64: the straight walk (see
 * bn_apply) with the training backward's rewrite dx = g * k1 + ((x - m) *
 * k2 + k3), m = the mean rounded to FB_REAL. */
static int FB_TYPED(bn_backward_apply)(FASTBN_BN_BACKWARD_APPLY_ARGS(FB_REAL))
{
    if (!FB_TYPED(bn_rows_valid)(channels, row_channels, inner))
        return FASTBN_ERR_ARGUMENT;
    if (outer < 0 || channels <= 0 || inner < 0 || !dy || !x || !dx || !mean || !invstd
        || !sum_dy || !sum_dy_xhat || !(count > 0))
        return FASTBN_ERR_ARGUMENT;
    FB_TYPED(bn_phase_geometry)(&outer, channels, row_channels, &inner);
    /* m, k1, k2, k3 and, with relu, the mask's scale and shift; wrapped
     * when channels-last (bn_span_wrap) */
    const fb_index stride = channels + FB_BN_WRAP_PAD;
    const int arrays = relu ? 6 : 4;
    FB_REAL *coefficients = (FB_REAL *)malloc((size_t)arrays * (size_t)stride * sizeof(FB_REAL));
    if (!coefficients)
        return FASTBN_ERR_NOMEM;
    FB_REAL *center = coefficients;
    const FB_TYPED(bn_coefficients) coef = {coefficients + stride, coefficients + 2 * stride,
                                            coefficients + 3 * stride};
    FB_REAL *mask_scale = relu ? coefficients + 4 * stride : NULL;
    FB_REAL *mask_shift = relu ? coefficients + 5 * stride : NULL;
    const double inv_count = 1.0 / count;
    for (fb_index c = 0; c < channels; ++c) {
        center[c] = (FB_REAL)mean[c];
        /* as the forward computed them, from the same mean and invstd */
        if (relu)
            FB_TYPED(bn_normalize_coefficients)(invstd[c], mask_weight, mask_bias, c,
                                                mask_scale + c, mask_shift + c);
        FB_TYPED(bn_backward_coefficients)(coef, c, weight ? (double)weight[c] : 1.0, invstd[c],
                                           sum_dy[c], sum_dy_xhat[c], inv_count,
                                           mean[c] - (double)center[c]);
    }
    if (inner == 1)
        for (int j = 0; j < arrays; ++j)
            FB_TYPED(bn_wrap_extend)(coefficients + j * stride, channels);
    const FB_TYPED(bn_straight_coefficients) k = {center, coef.k1, coef.k2, coef.k3, mask_scale,
                                                  mask_shift};
    /* dy and x read, dx written */
    FB_TYPED(bn_straight_all)(dx, dy, x, &k, outer, channels, row_channels, inner, relu, 3,
                              num_threads);
    free(coefficients);
    return FASTBN_OK;
}
