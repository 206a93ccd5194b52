/* bn_plan.h -- how a batch-norm pass over an (outer, channels, inner) array is
 * cut into work items, shared by the training forward and both backwards.
 *
 * Determinism: every per-channel sum is a sum of per-CHUNK partials added in
 * chunk order, and the chunk boundaries depend only on the shape, never on
 * the thread count.  Threads only decide WHO computes a chunk, so results are
 * bit-identical for 1, 2 or 64 threads.
 *
 * Two geometries:
 *
 *   planar (inner > 1, e.g. NCHW): channel c is `outer` contiguous rows of
 *     `inner` values.  Its n = outer * inner values, read as one sequence, are
 *     cut into chunks of `chunk` values (a chunk may span rows); one work item
 *     is (channel, chunk), numbered c * chunks + k.  With enough channels
 *     (FB_BN_OWNED_CHANNELS_PER_THREAD per thread) every thread OWNS a
 *     contiguous range of channels and, a block of neighbouring channels at a
 *     time (walked row by row, bn_train_impl.h), reduces their chunks,
 *     finalizes them and rewrites them while they are still in L2/L3: no
 *     barrier at all, and the data comes from DRAM about once.  (A training
 *     forward whose output is streamed, rows longer than the short ones,
 *     goes one channel at a time, and rewrites the previous channel while
 *     it reduces the next one: bn_owned_paced.)  With few
 *     channels, the chunks of each channel are shared by all threads instead,
 *     in cache blocks of channels: all chunks of a block are reduced, one
 *     barrier, every thread derives the block's coefficients (its own copy),
 *     then rewrites exactly the chunks it reduced (second read from its own
 *     L2).  Barriers are kept few on purpose: a barrier waits for the slowest
 *     thread, and on a busy machine a descheduled thread costs a whole
 *     scheduler time slice.
 *
 *   interleaved (inner == 1, e.g. NHWC or (N, C)): row r holds one value of
 *     every channel.  A work item is (row chunk k, channel group j), numbered
 *     k * groups + j; it owns partial sums for the group's channels.  Every
 *     channel needs every row, so there is one block (the whole array, one
 *     barrier); the rewrite walks the items in reverse so the rows read
 *     last, still cached, are rewritten first.
 *     Tried and dropped: column blocks ("cache balancing", oneDNN's TODO for
 *     channels-last) -- the pass run on ranges of channels of about 8 MiB
 *     of streamed input each (all rows, pieces of >= 512 bytes on 64-byte
 *     lines), so that a block's rewrite would find it in L3.  Same bits
 *     (the row walk keyed on the row, not the piece), much slower: Zen 3,
 *     float32, 1 thread, min of 31 calls, with / without, backward
 *     (32,14,14,512) 9.6 / 4.0 ms (2 threads 5.0 / 2.0), (32,14,14,496)
 *     7.4 / 3.0, (8192, 1008) 19.5 / 8.3; training forward (8192, 1008)
 *     8.4 / 5.3.  The profile had the rewrite waiting on its loads of x:
 *     the blocks did not stay cached (with power-of-two rows the pieces of
 *     a block of W of the C channels fall in W / C of the cache sets, so a
 *     block fits only if the whole array does), and the reduction read
 *     memory one short piece per row.
 *
 * Partial sums live in two arrays of channels * chunks doubles, indexed
 * c * chunks + k (planar) or k * channels + c (interleaved).
 */
#ifndef FASTBN_BN_PLAN_H
#define FASTBN_BN_PLAN_H

#include "../common/fb_cache.h"
#include "../common/fb_parallel.h"

/* Planar chunk: 4096 values (16 KiB of float32) amortize the per-chunk
 * bookkeeping, and a 56x56 channel of a 64-image batch still splits into ~50
 * chunks, so two threads share even a single channel evenly. */
#define FB_BN_CHUNK_VALUES ((fb_index)4096)
/* Caps the partial-sum workspace at 2 x 1024 doubles per channel. */
#define FB_BN_MAX_CHUNKS_PER_CHANNEL ((fb_index)1024)
/* Interleaved: at most 32 row chunks, so the workspace stays 512 bytes per
 * channel while still giving 16+ items per thread on a 2-core machine. */
#define FB_BN_MAX_ROW_CHUNKS ((fb_index)32)
/* Interleaved: at least this many rows per chunk.  Every row chunk costs
 * 2 x channels float64 partials, zeroed, written and read back for the
 * channel totals: with 8-row chunks, (256, 512) float32 spent ~20 % of its
 * training forward on them (memset 8 %, totals 11 %, profiled), as many
 * bytes of partials as half the input.  At 64 rows they are 1/8 of a
 * float32 input's bytes at most. */
#define FB_BN_MIN_ROW_CHUNK ((fb_index)64)
/* Interleaved: channels per work item; 512 doubles x 2 sums = 8 KiB of
 * partials, which stay in L1 while the rows stream past. */
#define FB_BN_MAX_GROUP_WIDTH ((fb_index)512)
/* Outputs of at least this many bytes are written with non-temporal stores:
 * well past the ~12-16 MiB of L3 a core gets in practice, where y would be
 * evicted before anyone reads it, and where a normal store's read of the old
 * line costs a third memory stream.  Smaller outputs stay in cache for the
 * next layer. */
#define FB_BN_STREAM_BYTES ((fb_index)8 << 20)

/* Whether the output of a walk over an (outer, row_channels, inner) array,
 * `channels` of them written, is streamed: FB_BN_STREAM_BYTES of output,
 * and every written row a whole number of 64-byte lines (or one flat span,
 * all channels of an interleaved row).  A row end inside a line leaves that
 * line written partly with non-temporal and partly with normal stores, and
 * each such line costs a round trip to memory: eval forward of float32, 1
 * thread, streamed, ns per element by row length: 49 values 6.3, 196 1.21,
 * 300 0.68, 1000 0.53, against 0.27-0.29 for rows of 256 or 784 values
 * ((21,2048,7,7): 13.8 ms against 1.56 ms for (20,2048,7,7), just under the
 * size threshold).  Such rows are written with normal stores instead. */
static inline int fb_bn_stream_output(fb_index outer, fb_index channels, fb_index row_channels,
                                      fb_index inner, fb_index itemsize)
{
    if (outer * row_channels * inner * itemsize < FB_BN_STREAM_BYTES)
        return 0;
    const fb_index row_bytes = (inner == 1 ? channels : inner) * itemsize;
    if (inner == 1 && channels == row_channels)
        return 1;
    return row_bytes % 64 == 0;
}

/* Planar: channels per thread from which threads own whole channels (no
 * barriers); the imbalance is then at most one channel in four. */
#define FB_BN_OWNED_CHANNELS_PER_THREAD 4
/* Planar cache block: bytes of streamed input per thread (x, or dy and x)
 * reduced before being rewritten.  Below the 512 KiB L2 of a Zen3 core, so
 * the rewrite reads from L2 (lines that spill still sit in the L3). */
#define FB_BN_BLOCK_BYTES_PER_THREAD ((fb_index)384 * 1024)

/* Channels-last rewrites walk a work item as one flat span whose channel
 * index wraps (bn_span_wrap); their per-channel coefficient arrays carry this
 * many extra entries repeating the first ones, so one vector of coefficients
 * (at most 64 bytes = 16 float32) starting at any channel is one load.  The
 * pad is filled where the entries are set (bn_wrap_mirror, bn_span_impl.h),
 * never by the walker's callers. */
#define FB_BN_WRAP_PAD ((fb_index)16)

/* Interleaved, several threads: from this many channels per thread, every
 * thread OWNS a range of channels (columns) over all rows and reduces,
 * finalizes and rewrites it alone -- no barrier.  Below it, the shared plan
 * (row chunks split across threads, one barrier) runs.  Owned pieces of a
 * row must be long for the prefetchers: measured on 2 cores (fastbn bench,
 * float32, medians of interleaved rounds, two alternating runs), with owned
 * columns from 64 channels per thread the channels-last training forward of
 * (16,28,28,200) took 2.40-2.44 ms and of (32,14,14,512) 2.48-3.34 ms, with
 * the shared plan 1.06-1.11 and 1.21-1.29 ms (backward: 3.8-5.2 against
 * 1.7 and 2.4-2.5 ms); (4096, 1024) was equal or better shared, (8192,
 * 4096) equal within noise.  From 1024 channels per thread the owned plan
 * still lost: two builds differing only in this constant (1024 against no
 * owned columns), alternated call by call in two worker processes, 2
 * threads, float32, 5th percentile of 150 calls each (load average 6-9):
 * training forward of (128, 2048) 132 against 103 us, (256, 2048) 271 / 182,
 * (256, 4096) 385 / 302, (512, 2048) 685 / 340, (2,14,14,2048) 470 / 306;
 * backward of (128, 2048) 165 / 133, (256, 2048) 352 / 213, (256, 4096) 610
 * / 443, (512, 2048) 658 / 462 (1 thread, the same plan in both builds,
 * within 0.86-1.15).  So threads own columns only from 4096 channels each
 * (16 KiB pieces of every float32 row, past the 4096 channels of the
 * (N, C) shapes measured), where nothing showed either plan ahead.  Calls
 * under 1 MiB run on one thread anyway (fb_threads_for_bytes). */
#define FB_BN_OWNED_COLUMNS_PER_THREAD 4096
/* Interleaved reductions over few rows keep both threads.  Tried: one
 * thread below 128 rows (fewer than two minimum row chunks).  Measured
 * against this on a quiet machine (2 threads, float32, 10th percentile of
 * 200 calls, two alternating runs): one thread was slower, training forward
 * (64, 4096) 103-137 against 90-104 us, (100, 3000) 107-131 against 89-94,
 * backward (100, 3000) 151-191 against 127-135, (120, 2048) 149-155
 * against 104-107; so it was dropped. */

/* Owned column ranges start at multiples of 16 channels (a 64-byte line of
 * float32), so no two threads write the same line of a row. */
#define FB_BN_COLUMN_UNIT ((fb_index)16)

/* Planar owned channels (bn_owned_channels) are reduced and rewritten in
 * blocks of neighbouring channels, walked row by row, so that memory moves
 * in stretches of at least FB_BN_OWNED_STRETCH_BYTES.  Measured on
 * (64,128,56,56) float32, 1 thread, min CPU time of 4 interleaved rounds on
 * a loaded 2-core machine: the statistics alone took 9.1 ms one channel at
 * a time (12.5 KiB row pieces), 5.4 / 4.9 / 5.3 ms with blocks of 2 / 4 / 8
 * channels (25 / 50 / 100 KiB stretches); the training forward 15.3 ms,
 * then 10.9 / 10.5 / 11.9 ms; one contiguous 800 KiB channel (shape
 * (1,128,448,448)) took 4.4 ms.  Eight channels (6.4 MiB to re-read) lost
 * to four (3.2 MiB): the block must stay well inside the L3 share of a
 * core, hence FB_BN_OWNED_BLOCK_BYTES. */
#define FB_BN_OWNED_BLOCK_MAX ((fb_index)16)
#define FB_BN_OWNED_STRETCH_BYTES ((fb_index)48 * 1024)
#define FB_BN_OWNED_BLOCK_BYTES ((fb_index)4 << 20)
/* A channel whose streamed input fits in the 32 KiB L1 is rewritten from L1
 * right after its reduction, one channel at a time: with 16-channel blocks,
 * (8,256,14,14) float32 (6.3 KiB channels) took 0.163 ms for the training
 * forward against 0.145 (backward 0.192 against 0.157), while
 * (16,64,28,28) float32 (49 KiB channels) went from 0.250 to 0.162 ms
 * (min CPU time of 6 interleaved rounds, 1 thread). */
#define FB_BN_OWNED_L1_BYTES ((fb_index)32 * 1024)
/* The bfloat16 family's owned walk (bn_bf16_impl.h) uses the same rule. */

/* Planar statistics of rows of at least FB_BN_STREAM_ROW_BYTES read
 * FB_BN_STREAMS runs in turns (bn_train_impl.h, "several runs at once",
 * with the measurements): 12.5 KiB rows gained, 3 KiB rows lost.  Changes
 * the order of the memory reads only, never a sum. */
#define FB_BN_STREAMS 4
#define FB_BN_STREAM_ROW_BYTES ((fb_index)8 * 1024)

/* Channels per owned planar block: enough for stretches of
 * FB_BN_OWNED_STRETCH_BYTES of `row_bytes`-byte row pieces, within
 * FB_BN_OWNED_BLOCK_BYTES of streamed input (`channel_bytes` per channel),
 * at most FB_BN_OWNED_BLOCK_MAX; 1 when a channel fits in L1.  When the
 * block is `reread` (rewritten after its reduction) and the L2 of this CPU
 * holds at least one channel, only as many channels as it holds: the
 * rewrite then reads from L2, not L3.  On the Xeon (2 MiB L2) the
 * backward's owned blocks (dy and x) took, float32, 2 threads, min of 25
 * alternated calls with the width forced: (64,128,56,56) 11.63 ms at the
 * rule's 2 channels (3.1 MiB) against 10.66 at 1 (1.6 MiB), 12.79 at 4;
 * (256,64,28,28) 5.81 (2) / 5.46 (1) / 6.02 (4); (32,256,28,28) 2.22 at
 * 16 channels (3.2 MiB) against 1.96-2.03 at 1-8; (16,128,56,56) 1.96 (2) /
 * 1.88 (1).  Where a channel does not fit (a Zen 3 core's 512 KiB L2 and
 * the larger of those shapes), the rule is the one measured there, with the
 * block in L3; smaller channels get L2-sized blocks there too (e.g. 2
 * channels instead of 16 for (32,256,28,28): not measured on Zen 3).
 * Depends on the shape and the CPU, never on the thread count (and no sum
 * depends on the width). */
static inline fb_index fb_bn_owned_block_width(fb_index row_bytes, fb_index channel_bytes,
                                               int reread)
{
    fb_index width = row_bytes > 0 ? fb_ceil_div(FB_BN_OWNED_STRETCH_BYTES, row_bytes) : 1;
    const fb_index l2 = reread ? fb_l2_bytes() : 0;
    if (channel_bytes > 0)
        width = fb_min_index(width, FB_BN_OWNED_BLOCK_BYTES / channel_bytes);
    if (channel_bytes > 0 && channel_bytes <= l2)
        width = fb_min_index(width, l2 / channel_bytes);
    if (channel_bytes <= FB_BN_OWNED_L1_BYTES)
        width = 1;
    return fb_max_index(1, fb_min_index(width, FB_BN_OWNED_BLOCK_MAX));
}

/* Short planar rows: rows (the values of one sample and channel) of at most
 * FB_BN_SHORT_ROW_BYTES, e.g. the 4x4 and 7x7 maps at the end of a ResNet.
 * Owned channels with such rows are walked sample by sample
 * (bn_owned_short_rows, bn_train_impl.h): each sample's piece of a block of
 * channels is one contiguous stretch, where the channel-by-channel walk read
 * one short row every channels x inner values.  Profiled on (32,512,4,4)
 * float32 backward, 1 thread (load 8): 47 % of the time in the planar
 * reduction, nearly all of it on the instructions after the loads of dy and
 * x, which came from L3 one 64-byte row at a time, 32 KiB apart (all in the
 * same L1 set, the same few L2 sets).  The sums are the channel walk's, bit
 * for bit (same runs, lanes and chunk order), only the order of the memory
 * accesses changes.
 * The limit: float32, 1 thread, min thread CPU time of 60-100 rounds
 * alternating with the channel walk (load 5-7; an A/A run of one build
 * against itself differed by up to 5 % in the mins): rows of 16-144 values
 * gained, e.g. training forward / backward (32,512,4,4) 391 / 331 against
 * 565 / 371 us, (32,256,7,7) 307 / 345 against 360 / 381, (128,64,3,3)
 * 163 / 236 against 200 / 229 (the ReLU backward gained most: the branch of
 * bn_relu_masked_scalar), (16,128,12,12) 107 / 174 against 121 / 210 us;
 * (32,64,10,10) forward 81 against 91, backward even (109 against 105).
 * At 14x14 (784 bytes) it was mixed: (32,256,14,14) forward 1233 against
 * 1663 us, but (64,64,14,14) backward 617 against 550 (three channels per
 * block, by the L2 budget below, against the channel walk's sixteen), so
 * 14x14 float32 rows stay with the channel walk. */
#define FB_BN_SHORT_ROW_BYTES ((fb_index)640)
/* Channels walked together by the short-row walk: each keeps two lane sets
 * (fb_bn_lanes, 144-192 bytes by target) on the stack, at most 64 x 2 x 192
 * bytes = 24 KiB; and at most FB_BN_BLOCK_BYTES_PER_THREAD of streamed
 * input per block, so the rewrite can find it in L2. */
#define FB_BN_SHORT_BLOCK_MAX ((fb_index)64)

/* Channels per block of the short-row walk, or 0 when rows are longer than
 * FB_BN_SHORT_ROW_BYTES (the channel walk runs).  `channel_bytes`: streamed
 * input per channel.  Depends on the shape only. */
static inline fb_index fb_bn_short_block_width(fb_index row_bytes, fb_index channel_bytes)
{
    if (row_bytes <= 0 || row_bytes > FB_BN_SHORT_ROW_BYTES)
        return 0;
    const fb_index width = channel_bytes > 0
        ? FB_BN_BLOCK_BYTES_PER_THREAD / channel_bytes : FB_BN_SHORT_BLOCK_MAX;
    return fb_max_index(1, fb_min_index(width, FB_BN_SHORT_BLOCK_MAX));
}

typedef struct fb_bn_plan {
    fb_index outer, channels, inner;
    fb_index row_channels;   /* planar: channels between outer rows (>= channels) */
    fb_index n;              /* values per channel */
    int interleaved;         /* inner == 1 */
    int owned;               /* planar, many channels: threads own whole channels */
    int owned_columns;       /* interleaved, many channels: threads own channel ranges */
    fb_index chunk;          /* planar: values per chunk; interleaved: rows per chunk */
    fb_index chunks;         /* chunks per channel (planar) or row chunks (interleaved) */
    fb_index group_width;    /* interleaved: channels per work item */
    fb_index groups;         /* interleaved: channel groups */
    fb_index block_channels; /* planar: channels per cache block; interleaved: all */
} fb_bn_plan;

/* `row_channels`: channels between consecutive outer rows (`channels` for a
 * whole array, more for a channel sub-range of a planar one, bn_kernels.h).
 * `streamed_bytes_per_value`: bytes read per value in the reduction (x: one
 * array; backward: dy and x).  `num_threads` only decides who computes what
 * (owned channels or shared chunks, block sizes), never the chunk boundaries
 * or the order of any sum. */
static inline void fb_bn_make_plan(fb_bn_plan *plan, fb_index outer, fb_index channels,
                                   fb_index row_channels, fb_index inner,
                                   fb_index streamed_bytes_per_value, int num_threads)
{
    if (channels == 1 && row_channels == 1) {
        /* a single channel is one contiguous sequence: always planar */
        inner *= outer;
        outer = 1;
    }
    plan->outer = outer;
    plan->channels = channels;
    plan->row_channels = row_channels;
    plan->inner = inner;
    plan->n = outer * inner;
    plan->interleaved = inner == 1 && channels > 1;
    plan->owned = !plan->interleaved
        && channels >= (fb_index)FB_BN_OWNED_CHANNELS_PER_THREAD * num_threads;
    plan->owned_columns = plan->interleaved && num_threads > 1
        && channels >= (fb_index)FB_BN_OWNED_COLUMNS_PER_THREAD * num_threads;
    if (!plan->interleaved) {
        plan->chunk = fb_max_index(FB_BN_CHUNK_VALUES,
                                   fb_ceil_div(plan->n, FB_BN_MAX_CHUNKS_PER_CHANNEL));
        plan->chunks = fb_ceil_div(plan->n, plan->chunk);
        plan->group_width = 1;
        plan->groups = channels;
        const fb_index channel_bytes = plan->n * streamed_bytes_per_value;
        const fb_index budget = (fb_index)num_threads * FB_BN_BLOCK_BYTES_PER_THREAD;
        plan->block_channels = channel_bytes > 0
            ? fb_min_index(channels, fb_max_index(1, budget / channel_bytes)) : channels;
    } else {
        plan->groups = fb_ceil_div(channels, FB_BN_MAX_GROUP_WIDTH);
        plan->group_width = fb_ceil_div(channels, plan->groups);
        plan->chunk = fb_max_index(fb_max_index(fb_ceil_div(FB_BN_CHUNK_VALUES,
                                                            plan->group_width),
                                                FB_BN_MIN_ROW_CHUNK),
                                   fb_ceil_div(outer, FB_BN_MAX_ROW_CHUNKS));
        plan->chunks = fb_ceil_div(outer, plan->chunk);
        plan->block_channels = channels;
    }
}

/* Work items of the block starting at channel c0: [*first, *last). */
static inline void fb_bn_block_items(const fb_bn_plan *plan, fb_index c0, fb_index c1,
                                     fb_index *first, fb_index *last)
{
    if (plan->interleaved) {
        *first = 0;
        *last = plan->chunks * plan->groups;
    } else {
        *first = c0 * plan->chunks;
        *last = c1 * plan->chunks;
    }
}

/* Walks the contiguous runs (row pieces) of planar chunk k of a channel, for
 * any planar pass (the float kernels' plans and the bfloat16 family's):
 *     fb_bn_runs runs = fb_bn_runs_start(n, channels, inner, chunk, k);
 *     while (fb_bn_runs_next(&runs, c, &offset, &len)) ...
 * n values per channel, chunks of `chunk` values; one division per chunk,
 * none per run. */
typedef struct { fb_index row, col, remaining, channels, inner; } fb_bn_runs;

static inline fb_bn_runs fb_bn_runs_start(fb_index n, fb_index channels, fb_index inner,
                                          fb_index chunk, fb_index k)
{
    fb_bn_runs runs;
    const fb_index begin = k * chunk;
    runs.row = begin / inner;
    runs.col = begin - runs.row * inner;
    runs.remaining = fb_min_index(n, begin + chunk) - begin;
    runs.channels = channels;
    runs.inner = inner;
    return runs;
}

static inline int fb_bn_runs_next(fb_bn_runs *runs, fb_index c, fb_index *offset,
                                  fb_index *len)
{
    if (runs->remaining <= 0)
        return 0;
    *len = fb_min_index(runs->inner - runs->col, runs->remaining);
    *offset = (runs->row * runs->channels + c) * runs->inner + runs->col;
    runs->remaining -= *len;
    runs->col = 0;
    ++runs->row;
    return 1;
}

/* What a pass computes (see bn_train_impl.h). */
enum fb_bn_mode {
    FB_BN_FORWARD = 0,       /* batch statistics, then y = (x - mean) * scale + shift */
    FB_BN_BACKWARD = 1,      /* sums of dy and dy * (x - mean), then dx (3 coefficients) */
    FB_BN_BACKWARD_EVAL = 2, /* optional sums for dweight/dbias, dx = dy * scale */
    /* The split phases' reductions (the fused FORWARD and BACKWARD stopped
     * at their per-channel sums, for statistics combined across processes;
     * their rewrites, apply and backward_apply, need no pass: they run the
     * straight walk of bn_affine_impl.h): */
    FB_BN_STATS = 3,           /* FORWARD's reduction; outputs mean and m2, no rewrite */
    FB_BN_BACKWARD_REDUCE = 4  /* BACKWARD's reduction; outputs the two sums, no rewrite */
};

/* The reduction sums x - center (FORWARD, STATS), not dy terms. */
static inline int fb_bn_reduces_x(int mode)
{
    return mode == FB_BN_FORWARD || mode == FB_BN_STATS;
}

/* The rewrite normalizes x (y), rather than producing dx from dy. */
static inline int fb_bn_normalizes(int mode)
{
    return mode == FB_BN_FORWARD;
}

/* The rewrite is the training backward's dx = dy * k1 + (x * k2 + k3). */
static inline int fb_bn_training_dx(int mode)
{
    return mode == FB_BN_BACKWARD;
}

/* The pass writes an array (the reduce-only phases do not). */
static inline int fb_bn_rewrites(int mode)
{
    return mode != FB_BN_STATS && mode != FB_BN_BACKWARD_REDUCE;
}

/* Doubles of partial-sum workspace per sum. */
static inline fb_index fb_bn_partial_count(const fb_bn_plan *plan)
{
    return plan->channels * plan->chunks;
}

#endif /* FASTBN_BN_PLAN_H */
