/* bn_bf16_impl.h -- batch norm on bfloat16 activations: x, y, dy and dx in
 * bfloat16 (uint16_t storage); weight, bias, running statistics, saved
 * mean/invstd and dweight/dbias in float32 (torch's bf16 batch norm on CPU).
 * Included once by bn_kernels.c (per SIMD target); every function is static
 * and reached through the table's FB_DTYPE_BF16 entries.
 *
 * Numerics (the NumPy twin, fastbn/reference/_bf16_bn.py, does the same
 * operations):
 *   - bfloat16 is widened to float32 exactly (a 16-bit shift).
 *   - Statistics: per channel, sum(x - c) and sum((x - c)^2) around c = the
 *     channel's first value, d = x - c formed in float32 (exact); channels-
 *     first runs add FB_BN_BF16_SHORT_SUM values per lane in float32 (d * d
 *     by a float32 fused multiply-add) before the float64 lane takes them,
 *     as the float32 kernels do, and channels-last rows do the same for
 *     FB_BN_BF16_SHORT_SUM rows of each channel; the rows past the last
 *     group and the run tails add every d and its exact square to float64.
 *     mean = c + s1 / n, var = (s2 - s1 * (s1 / n)) / n (>= 0),
 *     invstd = 1 / sqrt(var + eps).
 *   - The backwards' sums, sum(g) and sum(g (x - m)): channels-first runs
 *     add FB_BN_BF16_SHORT_SUM values per lane in float32 (g (x - m) by a
 *     float32 fused multiply-add) before the float64 lane takes them, as
 *     the float32 kernels do; channels-last rows add every value to float64
 *     (g (x - m) exact there).  The twin sums both in float64 (pairwise):
 *     the same bits on exact sums.
 *   - Every rewrite is a function of the float32 per-channel values only
 *     (saved or running statistics, weight, bias), never of the float64 sums
 *     behind them:
 *       forward   y  = (x - m) * k1 + k3, m = saved/running mean,
 *                 k1 = f32(weight * invstd) (invstd the saved float32 one, or
 *                 1 / sqrt(running_var + eps) in float64), k3 = bias;
 *       backward  dx = g * k1 + ((x - m) * k2 + k3) with k1 = f32(w invstd),
 *                 k2 = f32(-k1' invstd sum(g xhat) / n), k3 = f32(-k1' sum(g) / n)
 *                 (k1' the unrounded float64 w * invstd);
 *       eval bwd  dx = g * k1.
 *     x - m is one float32 subtraction; every a * b + c is a float32 fused
 *     multiply-add (bn_bf16_fma: the instruction, or an exact emulation on
 *     targets without FMA), so every target computes the same float32
 *     value; it is then rounded to bfloat16 (bn_bf16_convert.h).
 *   - ReLU: the forward stores max(y, 0); the backwards keep dy where the
 *     recomputed pre-activation (x - m) * k1 + bias (the forward's float32
 *     value, bit for bit) is >= FLT_MIN, i.e. exactly where the stored
 *     bfloat16 output is > 0 (positive subnormals are stored as +0).
 *
 * Work plan: chunks fixed by the shape (bn_bf16_plan), never by the thread
 * count; per-chunk float64 partials added in chunk order, so every output is
 * bit-identical for any thread count.  Channels-first: items are
 * (channel, chunk of the channel's values), processed in cache blocks of
 * channels (reduce, finalize, rewrite the block while it is in L2); with
 * enough channels each thread owns whole channels and walks them in blocks
 * of neighbours, row by row (bn_bf16_owned_block), or, in the AVX-512 build
 * where it gains, one channel at a time with the previous channel's rewrite
 * paced row by row (bn_bf16_owned_paced), with the same runs and chunk
 * partials;
 * channels-last: items are chunks of rows, every item covering all channels.
 */

#include <float.h>

#include "bn_bf16_convert.h"
#include "../common/fb_bf16.h"   /* the AVX2 pair-order helpers */
#include "../common/fb_cache.h"  /* fb_prefetch_rows */

/* Values per planar chunk (8 KiB of bfloat16), at most this many chunks per
 * channel; float32 values staged per rewrite block (4 KiB on the stack). */
#define FB_BN_BF16_CHUNK ((fb_index)4096)
#define FB_BN_BF16_MAX_CHUNKS ((fb_index)1024)
#define FB_BN_BF16_MAX_ROW_CHUNKS ((fb_index)32)
#define FB_BN_BF16_BLOCK ((fb_index)1024)
#define FB_BN_BF16_LANES 16
/* Elements per work item of a pass without reduction (eval forward, eval
 * backward without parameter gradients), which walks the array linearly:
 * long contiguous streams keep the prefetchers ahead, where a channel's rows
 * (a few KiB each) would restart them every row. */
#define FB_BN_BF16_LINEAR ((fb_index)16384)
/* Planar cache block: bytes of streamed input per thread. */
#define FB_BN_BF16_BLOCK_BYTES ((fb_index)384 * 1024)
/* Owned planar blocks (bn_bf16_owned_block) take their width from
 * fb_bn_owned_block_width (bn_plan.h), as the float kernels' do, without its
 * L2 cap: with it, (64,128,56,56) bfloat16 on the Xeon (2 MiB L2), 2
 * threads, 25 alternated calls, p25: backward 10.41 -> 10.32 ms, training
 * forward 7.77 -> 7.76 ms (mins 8.71 -> 8.25, 7.30 -> 6.50, medians 10-25 %
 * above the mins): no clear gain.
 * The AVX2 build's training forward does not pace its rewrite as the
 * AVX-512 build's bn_bf16_owned_paced does (tried on Zen 3, out=, min of 15
 * alternated rounds, (64,128,56,56) / (32,64,112,112) / (256,64,28,28)):
 * channel by channel 2 threads 6.58 -> 6.89, 6.06 -> 6.67, 4.79 -> 5.58 ms;
 * block by block (this block's row r reduced, then the previous block's
 * row r rewritten) 6.34 -> 6.70, 5.95 -> 6.03, 4.90 -> 5.73 ms.  Its loops,
 * not the order of its memory traffic, bound it there: in L3 the eval
 * forward takes 0.23 ns and the training forward 0.39 ns per value, 1
 * thread, about its time from DRAM (0.34 / 0.47).
 * (The AVX-512 build's walk is measured at bn_bf16_owned_paced.) */

enum { BN_BF16_FORWARD = 0, BN_BF16_EVAL_FORWARD = 1, BN_BF16_BACKWARD = 2,
       BN_BF16_BACKWARD_EVAL = 3 };

typedef struct {
    int mode, reduce, relu, accumulate, instruction;
    int stream;             /* non-temporal stores for the output (fused path) */
    fb_index outer, channels, inner, n;
    int interleaved;
    fb_index chunk, chunks, block_channels;
    fb_index owned_block;   /* planar owned channels walked together (bn_bf16_owned_block) */
    int paced;              /* owned channels walked by bn_bf16_owned_paced (bn_bf16_paces) */
    int linear;             /* no reduction: items are flat element ranges */
    fb_index linear_items;
    const uint16_t *x, *dy;
    uint16_t *out;
    const float *weight, *bias;
    const float *stat_mean, *stat_spread; /* backward: saved mean, invstd; eval: running */
    float *saved_mean, *saved_invstd, *running_mean, *running_var;
    float *dweight, *dbias;
    double eps, momentum;
    double *sum1, *sum2;  /* partials: planar [c * chunks + k], interleaved [k * C + c] */
    /* per channel, C + FB_BN_WRAP_PAD entries (the pad mirrors the first
     * ones: bn_bf16_publish_coefficients) */
    float *center;        /* reduction center / rewrite mean m */
    float *k1, *k2, *k3;  /* rewrite coefficients */
    float *mask_scale, *mask_shift;
    float *pairs;         /* AVX2 channels-last: pair-order coefficient tables, or NULL */
} bn_bf16_pass;

static inline float bn_bf16_widen(uint16_t h) { return fb_bf16_to_f32(h); }

static inline double bn_bf16_weight(const bn_bf16_pass *p, fb_index c)
{
    return p->weight ? (double)p->weight[c] : 1.0;
}

/* ---- plan ------------------------------------------------------------------ */

static void bn_bf16_plan(bn_bf16_pass *p, fb_index outer, fb_index channels, fb_index inner,
                         int streams, int nt)
{
    if (channels == 1) { /* one contiguous sequence */
        inner *= outer;
        outer = 1;
    }
    p->outer = outer;
    p->channels = channels;
    p->inner = inner;
    p->n = outer * inner;
    p->interleaved = inner == 1 && channels > 1;
    if (!p->interleaved) {
        p->chunk = fb_max_index(FB_BN_BF16_CHUNK, fb_ceil_div(p->n, FB_BN_BF16_MAX_CHUNKS));
        p->chunks = p->n > 0 ? fb_ceil_div(p->n, p->chunk) : 0;
        const fb_index channel_bytes = p->n * 2 * streams;
        const fb_index budget = (fb_index)nt * FB_BN_BF16_BLOCK_BYTES;
        p->block_channels = channel_bytes > 0
            ? fb_min_index(channels, fb_max_index(1, budget / channel_bytes)) : channels;
        p->owned_block = fb_bn_owned_block_width(inner * 2, channel_bytes, 0);
    } else {
        p->chunk = fb_max_index(fb_ceil_div(FB_BN_BF16_CHUNK, channels),
                                fb_ceil_div(outer, FB_BN_BF16_MAX_ROW_CHUNKS));
        p->chunks = outer > 0 ? fb_ceil_div(outer, p->chunk) : 0;
        p->block_channels = channels;
    }
}

/* Contiguous runs of planar chunk k of channel c: fb_bn_runs (bn_plan.h). */

/* ---- elementwise pieces ----------------------------------------------------- */

/* a * b + c rounded once to float32 (a fused multiply-add), on every
 * target: the instruction where the target has FMA; otherwise the exact
 * product and sum in float64, rounded to odd (an inexact float64 result
 * with an even last bit steps one ulp towards the exact value), which then
 * rounds to float32 exactly as the fused operation does (float64 carries
 * more than 2 bits beyond float32). */
#if defined(__FMA__) || defined(__AVX512F__)
static inline float bn_bf16_fma(float a, float b, float c)
{
    return __builtin_fmaf(a, b, c);
}
#else
static inline float bn_bf16_fma(float a, float b, float c)
{
    const double product = (double)a * (double)b; /* exact */
    const double sum = product + (double)c;
    const double back = sum - product;
    const double error = (product - (sum - back)) + ((double)c - back);
    uint64_t bits;
    memcpy(&bits, &sum, sizeof bits);
    if (error != 0.0 && !(bits & 1u) && sum - sum == 0.0) /* inexact, even, finite */
        bits += (error > 0.0) == (sum > 0.0) ? 1 : (uint64_t)-1;
    double odd;
    memcpy(&odd, &bits, sizeof odd);
    return (float)odd;
}
#endif

/* The forward's float32 value (x - m) * k1 + k3 from xc = x - m. */
static inline float bn_bf16_affine(float xc, float k1, float k3)
{
    return bn_bf16_fma(xc, k1, k3);
}

/* g = dy, or 0 where the forward's stored output was not > 0. */
static inline float bn_bf16_grad(float dy, float xc, float ms, float mh, int relu)
{
    return relu && !(bn_bf16_affine(xc, ms, mh) >= FLT_MIN) ? 0.0f : dy;
}

static inline float bn_bf16_activate(float v, int relu)
{
    return relu && v < 0.0f ? 0.0f : v;
}

/* ---- reductions ------------------------------------------------------------- */

/* What a run reduction sums (bn_bf16_reduce_run, bn_bf16_reduce_vector). */
enum { BN_BF16_SUM_X = 0, BN_BF16_SUM_GRAD = 1, BN_BF16_SUM_GRAD_RELU = 2 };

/* Pairwise total of the fixed lanes (the same order on every target). */
static inline double bn_bf16_lanes_total(const double *a)
{
    double t[FB_BN_BF16_LANES / 2];
    for (int l = 0; l < FB_BN_BF16_LANES / 2; ++l)
        t[l] = a[l] + a[l + FB_BN_BF16_LANES / 2];
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

/* Short sums of the backwards' reductions: each of the 16 lanes of a run
 * adds this many of its values (one every 16) in float32 -- g, and
 * g * (x - m) as a float32 fused multiply-add -- before the float64 lane
 * takes the short sum, as the float32 kernels' lanes do (FB_BN_SHORT_SUM).
 * Each value widened to float64 on its own (the form before) cost the AVX2
 * loop 11.1 cycles per 16 values in L1 (two float32 -> float64 conversions
 * per 4 values and two float64 operations) and left the bfloat16 backward
 * compute-bound: with the short sums, backward into out=, 1 thread, CPU
 * time min of 15 rounds alternated with the float64 form (load 4.8-5.2),
 * (64,128,56,56) 12.59 -> 10.79 ms, (32,64,28,28) 810 -> 622 us,
 * (16,96,40,40) 1171 -> 911 us. */
#define FB_BN_BF16_SHORT_SUM 8

#if defined(__AVX2__)
#include <immintrin.h>
/* float64 lane arrangement {0,2,4,6}, {8,10,12,14}, {1,3,5,7}, {9,11,13,15}
 * (pair order, below) back to lane order */
static inline void bn_bf16_avx2_lanes(const __m256d *v, double *a)
{
    double t[16];
    for (int q = 0; q < 4; ++q)
        _mm256_storeu_pd(t + 4 * q, v[q]);
    for (int k = 0; k < 4; ++k) {
        a[2 * k] = t[k];
        a[8 + 2 * k] = t[4 + k];
        a[2 * k + 1] = t[8 + k];
        a[9 + 2 * k] = t[12 + k];
    }
}

#if defined(__FMA__)
#define BN_BF16_FMA8(a, b, c) _mm256_fmadd_ps(a, b, c)
#else /* the AVX-512 build has no -mfma: the VL form of the 256-bit FMA */
#define BN_BF16_FMA8(a, b, c) _mm256_maskz_fmadd_ps((__mmask8)0xFF, a, b, c)
#endif

/* float64 pair-order lanes += the float32 short sums of the even and odd
 * elements (lanes {0,2,..,14} and {1,3,..,15}) */
static inline void bn_bf16_flush_pairs(__m256 even, __m256 odd, __m256d *s)
{
    s[0] = _mm256_add_pd(s[0], _mm256_cvtps_pd(_mm256_castps256_ps128(even)));
    s[1] = _mm256_add_pd(s[1], _mm256_cvtps_pd(_mm256_extractf128_ps(even, 1)));
    s[2] = _mm256_add_pd(s[2], _mm256_cvtps_pd(_mm256_castps256_ps128(odd)));
    s[3] = _mm256_add_pd(s[3], _mm256_cvtps_pd(_mm256_extractf128_ps(odd, 1)));
}

/* The run reductions, one form for the AVX2 and the AVX-512 builds
 * (256-bit, so both run the code the tests run on an AVX2 machine): the full
 * vectors of the portable loop of bn_bf16_reduce_run, the same float32
 * short sums and float64 lanes, in pair order (16 bfloat16 loaded as 8
 * 32-bit words, fb_bf16_pair_even / _odd: a shift and a mask, no lane
 * shuffle).  The float32 operations are
 * the portable loop's, one by one (adds, and fused multiply-adds written as
 * such), so every target has the same bits.  `kind` (a constant at every
 * call): BN_BF16_SUM_X, the statistics' sum(d) and sum(d * d), d = x - c;
 * BN_BF16_SUM_GRAD, the backwards' sum(g) and sum(g * d), g = dy (with
 * BN_BF16_SUM_GRAD_RELU masked where the pre-activation d * ms + mh is
 * below FLT_MIN).
 * The statistics' float64 form before (every d widened, exact squares)
 * took 11.1 cycles per 16 values in L1 on Zen 3 (the conversions share one
 * lane-crossing unit), which left the bfloat16 training forward
 * compute-bound at one thread (11.4 ms against the eval forward's 6.5 ms
 * for the same rewrite, (64,128,56,56) into out=; 10.1 ms with the short
 * sums).  Two groups' short sums taken in alternation (to overlap their
 * chains of dependent adds; same sums) did not gain: training forward in
 * L3, 1 thread, 0.39-0.40 against 0.41-0.42 ns per value (Zen 3). */

FB_ALWAYS_INLINE fb_index bn_bf16_reduce_vector(const uint16_t *restrict dy,
                                                const uint16_t *restrict x, fb_index len,
                                                float center, float mask_scale,
                                                float mask_shift, const int kind,
                                                fb_index ahead, double *a1, double *a2)
{
    const __m256 m = _mm256_set1_ps(center), ms = _mm256_set1_ps(mask_scale);
    const __m256 mh = _mm256_set1_ps(mask_shift), smallest = _mm256_set1_ps(FLT_MIN);
    __m256d s1[4], s2[4];
    for (int q = 0; q < 4; ++q)
        s1[q] = s2[q] = _mm256_setzero_pd();
    fb_index i = 0;
    while (i + FB_BN_BF16_LANES <= len) {
        __m256 b1[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}; /* even, odd */
        __m256 b2[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        const fb_index stop = i + FB_BN_BF16_SHORT_SUM * FB_BN_BF16_LANES;
        for (; i + FB_BN_BF16_LANES <= len && i < stop; i += FB_BN_BF16_LANES) {
            if (ahead) {
                _mm_prefetch((const char *)(x + i + ahead), _MM_HINT_T0);
                if (kind != BN_BF16_SUM_X)
                    _mm_prefetch((const char *)(dy + i + ahead), _MM_HINT_T0);
            }
            const __m256i xw = _mm256_loadu_si256((const __m256i *)(x + i));
            const __m256 xc[2] = {_mm256_sub_ps(fb_bf16_pair_even(xw), m),
                                  _mm256_sub_ps(fb_bf16_pair_odd(xw), m)};
            __m256 g[2] = {xc[0], xc[1]};
            if (kind != BN_BF16_SUM_X) {
                const __m256i gw = _mm256_loadu_si256((const __m256i *)(dy + i));
                g[0] = fb_bf16_pair_even(gw);
                g[1] = fb_bf16_pair_odd(gw);
            }
            for (int e = 0; e < 2; ++e) {
                if (kind == BN_BF16_SUM_GRAD_RELU)
                    g[e] = _mm256_and_ps(_mm256_cmp_ps(BN_BF16_FMA8(xc[e], ms, mh), smallest,
                                                       _CMP_GE_OQ), g[e]);
                b1[e] = _mm256_add_ps(b1[e], g[e]);
                b2[e] = BN_BF16_FMA8(g[e], xc[e], b2[e]);
            }
        }
        bn_bf16_flush_pairs(b1[0], b1[1], s1);
        bn_bf16_flush_pairs(b2[0], b2[1], s2);
    }
    bn_bf16_avx2_lanes(s1, a1);
    bn_bf16_avx2_lanes(s2, a2);
    return i;
}
#define FB_BN_BF16_VECTOR_REDUCE 1
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* The AVX2 build's channels-last backward rows (below) widen 8 bfloat16 of
 * a 16-byte load in pair order. */
/* the even (pair-order shift) and odd (mask) float32 of 8 bfloat16 */
static inline __m128 bn_bf16_avx2_even4(__m128i w)
{
    return _mm_castsi128_ps(_mm_slli_epi32(w, 16));
}

static inline __m128 bn_bf16_avx2_odd4(__m128i w)
{
    return _mm_castsi128_ps(_mm_and_si128(w, _mm_set1_epi32((int)0xFFFF0000u)));
}

/* Channels-last backward sums of rows [r0, r1) when C <= this (and C a
 * multiple of 8): per channel s1[c] += g, s2[c] += g (x - m), row after row
 * -- the portable loop of bn_bf16_reduce_item, the same adds in the same
 * order (the float64 product of two float32 is exact: the fused
 * multiply-add is the product-then-add).  8 channels per 16-byte load in
 * pair order (even channels by a shift, odd ones by a mask), each 4 float32
 * converted with one vcvtps2pd, the sums kept in pair order on the stack
 * and put back in channel order at the end; two rows per load and store of
 * the sums.  What GCC made of the portable loop widened across 128-bit
 * lanes (vpmovzxwd ymm, vextracti128, vextractf128 beside every two
 * conversions, all on Zen 3's one lane-crossing unit) and loaded and stored
 * the sums once per row (perf, (64,56,56,128) backward, 1 thread: the
 * reduction 37 % of the samples, hottest on the sums' loads and stores and
 * the extracts). */
#define FB_BN_BF16_ROWS_AVX2_MAX ((fb_index)512)
/* where channel c sits in pair order: in each group of 8, the even channels
 * (0, 2, 4, 6) first, then the odd ones */
static inline fb_index bn_bf16_pair_position(fb_index c)
{
    return (c & ~(fb_index)7) + ((c & 1) ? 4 : 0) + ((c & 7) >> 1);
}
static void bn_bf16_rows_grad_avx2(const bn_bf16_pass *p, fb_index r0, fb_index r1,
                                   double *restrict s1, double *restrict s2)
{
    const fb_index C = p->channels;
    double t1[FB_BN_BF16_ROWS_AVX2_MAX], t2[FB_BN_BF16_ROWS_AVX2_MAX];
    float m[FB_BN_BF16_ROWS_AVX2_MAX], ms[FB_BN_BF16_ROWS_AVX2_MAX], mh[FB_BN_BF16_ROWS_AVX2_MAX];
    for (fb_index c = 0; c < C; ++c) { /* position of channel c in pair order */
        const fb_index q = bn_bf16_pair_position(c);
        t1[q] = t2[q] = 0.0;
        m[q] = p->center[c];
        ms[q] = p->relu ? p->mask_scale[c] : 0.0f;
        mh[q] = p->relu ? p->mask_shift[c] : 0.0f;
    }
    const int relu = p->relu;
    const __m128 smallest = _mm_set1_ps(FLT_MIN);
    fb_index r = r0;
    for (; r < r1; r += 2) {
        const int rows = r + 1 < r1 ? 2 : 1;
        const uint16_t *x = p->x + r * C, *dy = p->dy + r * C;
        for (fb_index c = 0; c < C; c += 8) {
            for (int e = 0; e < 2; ++e) { /* even, odd channels of c .. c + 7 */
                const fb_index q = c + 4 * e;
                const __m128 mq = _mm_loadu_ps(m + q);
                __m256d u1 = _mm256_loadu_pd(t1 + q), u2 = _mm256_loadu_pd(t2 + q);
                for (int k = 0; k < rows; ++k) {
                    const __m128i xw = _mm_loadu_si128((const __m128i *)(x + k * C + c));
                    const __m128i gw = _mm_loadu_si128((const __m128i *)(dy + k * C + c));
                    const __m128 xc = _mm_sub_ps(e ? bn_bf16_avx2_odd4(xw) : bn_bf16_avx2_even4(xw), mq);
                    __m128 g = e ? bn_bf16_avx2_odd4(gw) : bn_bf16_avx2_even4(gw);
                    if (relu)
                        g = _mm_and_ps(_mm_cmp_ps(_mm_fmadd_ps(xc, _mm_loadu_ps(ms + q), _mm_loadu_ps(mh + q)),
                                                  smallest, _CMP_GE_OQ), g);
                    const __m256d gd = _mm256_cvtps_pd(g);
                    u1 = _mm256_add_pd(u1, gd);
                    u2 = _mm256_fmadd_pd(gd, _mm256_cvtps_pd(xc), u2);
                }
                _mm256_storeu_pd(t1 + q, u1);
                _mm256_storeu_pd(t2 + q, u2);
            }
        }
    }
    for (fb_index c = 0; c < C; ++c) {
        const fb_index q = bn_bf16_pair_position(c);
        s1[c] = t1[q];
        s2[c] = t2[q];
    }
}
#define FB_BN_BF16_ROWS_GRAD_AVX2 1
#endif
#ifndef FB_BN_BF16_VECTOR_REDUCE
#define FB_BN_BF16_VECTOR_REDUCE 0
#endif
#ifndef FB_BN_BF16_ROWS_GRAD_AVX2
#define FB_BN_BF16_ROWS_GRAD_AVX2 0
#endif

/* *s1 += sum(g), *s2 += sum(g * d) over a run, d = x - center (float32):
 * g = d for the statistics (BN_BF16_SUM_X: sum(d) and sum(d * d)), g = dy
 * for the backwards, masked with the ReLU for BN_BF16_SUM_GRAD_RELU
 * (bn_bf16_grad).  `kind` is a constant at every call, so each kind
 * compiles to its own loop.  The vector builds take the whole vectors
 * (bn_bf16_reduce_vector, the same operations); the loop below does what
 * is left, and all of a run on the baseline. */
FB_ALWAYS_INLINE void bn_bf16_reduce_run(const uint16_t *restrict dy, const uint16_t *restrict x,
                                         fb_index len, float center, float mask_scale,
                                         float mask_shift, const int kind, fb_index ahead,
                                         double *s1, double *s2)
{
    (void)ahead;
    const int relu = kind == BN_BF16_SUM_GRAD_RELU;
    double a1[FB_BN_BF16_LANES], a2[FB_BN_BF16_LANES]; /* set by the vector loop, or zeroed */
    fb_index i = 0;
#if FB_BN_BF16_VECTOR_REDUCE
    i = bn_bf16_reduce_vector(dy, x, len, center, mask_scale, mask_shift, kind, ahead, a1, a2);
#else
    for (int l = 0; l < FB_BN_BF16_LANES; ++l)
        a1[l] = a2[l] = 0.0;
#endif
    while (i + FB_BN_BF16_LANES <= len) { /* short sums, see FB_BN_BF16_SHORT_SUM */
        float b1[FB_BN_BF16_LANES], b2[FB_BN_BF16_LANES];
        for (int l = 0; l < FB_BN_BF16_LANES; ++l)
            b1[l] = b2[l] = 0.0f;
        const fb_index stop = i + FB_BN_BF16_SHORT_SUM * FB_BN_BF16_LANES;
        for (; i + FB_BN_BF16_LANES <= len && i < stop; i += FB_BN_BF16_LANES) {
#pragma omp simd
            for (int l = 0; l < FB_BN_BF16_LANES; ++l) {
                const float d = bn_bf16_widen(x[i + l]) - center;
                const float g = kind == BN_BF16_SUM_X
                    ? d : bn_bf16_grad(bn_bf16_widen(dy[i + l]), d, mask_scale, mask_shift, relu);
                b1[l] += g;
                b2[l] = bn_bf16_fma(g, d, b2[l]);
            }
        }
        for (int l = 0; l < FB_BN_BF16_LANES; ++l) {
            a1[l] += (double)b1[l];
            a2[l] += (double)b2[l];
        }
    }
    double r1 = bn_bf16_lanes_total(a1), r2 = bn_bf16_lanes_total(a2);
    for (; i < len; ++i) { /* the tail: exact float64 products */
        const float d = bn_bf16_widen(x[i]) - center;
        const float g = kind == BN_BF16_SUM_X
            ? d : bn_bf16_grad(bn_bf16_widen(dy[i]), d, mask_scale, mask_shift, relu);
        r1 += (double)g;
        r2 += (double)g * (double)d;
    }
    *s1 += r1;
    *s2 += r2;
}

/* One planar run of channel c: *s1 += its sum, *s2 += its sum of squares
 * (forward) or of g (x - m) (backwards). */
static inline void bn_bf16_reduce_planar_run(const bn_bf16_pass *p, fb_index c, fb_index offset,
                                             fb_index len, fb_index ahead, double *s1,
                                             double *s2)
{
    if (p->mode == BN_BF16_FORWARD)
        bn_bf16_reduce_run(NULL, p->x + offset, len, p->center[c], 0.0f, 0.0f, BN_BF16_SUM_X,
                           ahead, s1, s2);
    else if (p->relu)
        bn_bf16_reduce_run(p->dy + offset, p->x + offset, len, p->center[c], p->mask_scale[c],
                           p->mask_shift[c], BN_BF16_SUM_GRAD_RELU, ahead, s1, s2);
    else
        bn_bf16_reduce_run(p->dy + offset, p->x + offset, len, p->center[c], 0.0f, 0.0f,
                           BN_BF16_SUM_GRAD, ahead, s1, s2);
}

static void bn_bf16_reduce_item(const bn_bf16_pass *p, fb_index item)
{
    const int forward = p->mode == BN_BF16_FORWARD;
    if (!p->interleaved) {
        const fb_index c = item / p->chunks, k = item - c * p->chunks;
        double s1 = 0.0, s2 = 0.0;
        fb_bn_runs runs = fb_bn_runs_start(p->n, p->channels, p->inner, p->chunk, k);
        fb_index offset, len;
        while (fb_bn_runs_next(&runs, c, &offset, &len)) {
            /* the channel's run in the next row, one row of planes away:
             * runs are short (one plane), too short for the hardware
             * prefetcher to follow the jump */
            const fb_index ahead = runs.row < p->outer && p->outer > 1
                ? p->channels * p->inner : 0;
            bn_bf16_reduce_planar_run(p, c, offset, len, ahead, &s1, &s2);
        }
        p->sum1[item] = s1;
        p->sum2[item] = s2;
        return;
    }
    /* rows [r0, r1) of every channel, accumulated per channel in row order */
    const fb_index C = p->channels;
    const fb_index r0 = item * p->chunk, r1 = fb_min_index(p->outer, r0 + p->chunk);
    double *restrict s1 = p->sum1 + item * C;
    double *restrict s2 = p->sum2 + item * C;
    const float *restrict center = p->center;
    const float *restrict ms = p->mask_scale;
    const float *restrict mh = p->mask_shift;
    for (fb_index c = 0; c < C; ++c)
        s1[c] = s2[c] = 0.0;
    /* The statistics: FB_BN_BF16_SHORT_SUM rows of each channel form a
     * float32 short sum of d (in row order) and of d * d (a chain of float32
     * fused multiply-adds, the same bits on every target), added to the
     * float64 sums once per group, as the float32 kernels' channels-last
     * reduction does (bn_reduce_rows); the rows past the last whole group
     * add each d and its exact square in float64.  Each d widened to float64
     * and squared there (the form before, 4 rows per load and store of the
     * sums) kept the bfloat16 training forward at the float32 kernel's time:
     * float32 time / bfloat16 time, out=, 1 thread, one process, medians of
     * 15 calls, two runs (Intel Xeon, avx512 build), before -> after:
     * (64,56,56,128) 1.09 -> 1.12-1.13, (32,28,28,256) 1.00-1.02 ->
     * 1.12-1.18, (4096, 1024) 1.06-1.11 -> 1.19-1.25, (32,56,56,64)
     * 1.08-1.14 -> 1.11-1.24.  The backward keeps one row per visit: the
     * grouping of its sums (x and dy of four rows per step) took more samples
     * than the row-by-row loop (perf, 1 thread, (64,56,56,128) backward:
     * 1914 against 1160). */
    const int relu = p->relu;
    fb_index r = r0;
#if FB_BN_BF16_ROWS_GRAD_AVX2
    if (!forward && C % 8 == 0 && C <= FB_BN_BF16_ROWS_AVX2_MAX) {
        bn_bf16_rows_grad_avx2(p, r0, r1, s1, s2);
        return;
    }
#endif
    /* rows FB_BN_FWD_PREFETCH_BYTES ahead into L2, for an x of at least
     * FB_BN_FWD_PREFETCH_MIN_BYTES, as the float kernels' statistics do
     * (bn_reduce_rows, bn_train_impl.h): eight rows per step are eight
     * short streams (a 256-byte row of 128 channels), and without it the
     * step waited on its loads of x (perf, (64,56,56,128) training forward,
     * 1 thread: a third of the reduction's samples on the first subtraction
     * after a load).  Two builds alternated (bn_ab_builds.py, out=, min of
     * 7-15 rounds, 1 / 2 threads): (64,56,56,128) 0.76-0.96x / 0.79-1.03x
     * the time over five / four runs (each run's pair of worker processes
     * places its arrays anew, which moved single runs by up to 20 %; e.g.
     * 15.9 -> 12.9 and 15.0 -> 14.4 ms at 1 thread), (64,56,56,64)
     * 0.89-0.97x at 2 threads; (128,28,28,256) and (8192, 4096) even.
     * 32 KiB ahead lost to 8 KiB (1.03x / 1.11x), and so did
     * the eight rows fetched as one range from the line holding them
     * (1.20x / 1.16x the time: per row, a row 16 bytes past a line leaves
     * its last line to the hardware; not looked into further).  The
     * backward's rows (bn_bf16_rows_grad_avx2, two rows of dy and x per
     * step) did not gain from the same prefetch: 0.94-1.04x the time. */
    const fb_index row_bytes = C * (fb_index)sizeof(uint16_t);
    const fb_index ahead = fb_ceil_div(fb_ceil_div(FB_BN_FWD_PREFETCH_BYTES, row_bytes),
                                       FB_BN_BF16_SHORT_SUM) * FB_BN_BF16_SHORT_SUM;
    const int prefetch = forward && p->outer * row_bytes >= FB_BN_FWD_PREFETCH_MIN_BYTES;
    for (; forward && r + FB_BN_BF16_SHORT_SUM <= r1; r += FB_BN_BF16_SHORT_SUM) {
        const uint16_t *restrict x = p->x + r * C;
        if (prefetch && r + ahead + FB_BN_BF16_SHORT_SUM <= p->outer)
            fb_prefetch_rows(x + ahead * C, FB_BN_BF16_SHORT_SUM, row_bytes, row_bytes);
#pragma omp simd
        for (fb_index c = 0; c < C; ++c) {
            /* written out row by row: GCC left a loop over the rows scalar */
            const float d0 = bn_bf16_widen(x[c]) - center[c];
            const float d1 = bn_bf16_widen(x[C + c]) - center[c];
            const float d2 = bn_bf16_widen(x[2 * C + c]) - center[c];
            const float d3 = bn_bf16_widen(x[3 * C + c]) - center[c];
            const float d4 = bn_bf16_widen(x[4 * C + c]) - center[c];
            const float d5 = bn_bf16_widen(x[5 * C + c]) - center[c];
            const float d6 = bn_bf16_widen(x[6 * C + c]) - center[c];
            const float d7 = bn_bf16_widen(x[7 * C + c]) - center[c];
            const float b1 = ((((((d0 + d1) + d2) + d3) + d4) + d5) + d6) + d7;
            float b2 = bn_bf16_fma(d0, d0, 0.0f);
            b2 = bn_bf16_fma(d1, d1, b2);
            b2 = bn_bf16_fma(d2, d2, b2);
            b2 = bn_bf16_fma(d3, d3, b2);
            b2 = bn_bf16_fma(d4, d4, b2);
            b2 = bn_bf16_fma(d5, d5, b2);
            b2 = bn_bf16_fma(d6, d6, b2);
            b2 = bn_bf16_fma(d7, d7, b2);
            s1[c] += (double)b1;
            s2[c] += (double)b2;
        }
    }
    for (; r < r1; ++r) {
        const uint16_t *restrict x = p->x + r * C;
        if (forward) {
#pragma omp simd
            for (fb_index c = 0; c < C; ++c) {
                const double d = (double)(bn_bf16_widen(x[c]) - center[c]);
                s1[c] += d;
                s2[c] += d * d;
            }
        } else {
            const uint16_t *restrict dy = p->dy + r * C;
#pragma omp simd
            for (fb_index c = 0; c < C; ++c) {
                const float xc = bn_bf16_widen(x[c]) - center[c];
                const float g = relu ? bn_bf16_grad(bn_bf16_widen(dy[c]), xc, ms[c], mh[c], 1)
                                     : bn_bf16_widen(dy[c]);
                s1[c] += (double)g;
                s2[c] += (double)g * (double)xc;
            }
        }
    }
}

/* ---- per-channel finalize --------------------------------------------------- */

/* FB_NO_CONTRACT: these scalars (statistics, running statistics, the
 * rewrite's coefficients) must have the same bits on every target, as the
 * NumPy twin computes them (no fused multiply-add). */
static FB_NO_CONTRACT void bn_bf16_finalize(bn_bf16_pass *p, fb_index c)
{
    FB_NO_CONTRACT_BODY
    double s1 = 0.0, s2 = 0.0;
    if (p->reduce) {
        const fb_index cs = p->interleaved ? 1 : p->chunks, ks = p->interleaved ? p->channels : 1;
        const double *p1 = p->sum1 + c * cs, *p2 = p->sum2 + c * cs;
        for (fb_index k = 0; k < p->chunks; ++k) {
            s1 += p1[k * ks];
            s2 += p2[k * ks];
        }
    }
    const double n = (double)p->n;
    const double w = bn_bf16_weight(p, c);
    switch (p->mode) {
    case BN_BF16_FORWARD: {
        const double shifted = s1 / n;
        double var = (s2 - s1 * shifted) / n;
        if (var < 0.0) /* rounding on a (near-)constant channel; NaN passes */
            var = 0.0;
        const double mean = (double)p->center[c] + shifted;
        const float saved_mean = (float)mean, saved_invstd = (float)(1.0 / sqrt(var + p->eps));
        p->saved_mean[c] = saved_mean;
        p->saved_invstd[c] = saved_invstd;
        if (p->running_mean) {
            const double m = p->momentum;
            p->running_mean[c] = (float)((1.0 - m) * (double)p->running_mean[c] + m * mean);
            p->running_var[c] = (float)((1.0 - m) * (double)p->running_var[c]
                                        + m * var * (n / (n - 1.0)));
        }
        p->center[c] = saved_mean; /* the rewrite's m */
        p->k1[c] = (float)(w * (double)saved_invstd);
        p->k3[c] = p->bias ? p->bias[c] : 0.0f;
        return;
    }
    case BN_BF16_BACKWARD: {
        const double invstd = (double)p->stat_spread[c];
        const double dweight = s2 * invstd;
        const double a = w * invstd;
        p->k1[c] = (float)a;
        p->k2[c] = (float)(-a * invstd * dweight / n);
        p->k3[c] = (float)(-a * s1 / n);
        if (p->dweight)
            p->dweight[c] = (float)((p->accumulate ? (double)p->dweight[c] : 0.0) + dweight);
        if (p->dbias)
            p->dbias[c] = (float)((p->accumulate ? (double)p->dbias[c] : 0.0) + s1);
        return;
    }
    case BN_BF16_BACKWARD_EVAL: {
        const double invstd = 1.0 / sqrt((double)p->stat_spread[c] + p->eps);
        if (p->reduce && p->dweight)
            p->dweight[c] = (float)((p->accumulate ? (double)p->dweight[c] : 0.0) + s2 * invstd);
        if (p->reduce && p->dbias)
            p->dbias[c] = (float)((p->accumulate ? (double)p->dbias[c] : 0.0) + s1);
        return;
    }
    default: /* eval forward: coefficients set before the pass */
        return;
    }
}

/* ---- rewrite ---------------------------------------------------------------- */

/* `len` (<= FB_BN_BF16_BLOCK) float32 results of elements at `offset` into
 * v; channel of element i: c (planar, cstep 0) or (c0 + i) % C (rows). */
static void bn_bf16_compute(const bn_bf16_pass *p, float *restrict v, fb_index offset,
                            fb_index len, fb_index c)
{
    const uint16_t *restrict x = p->x ? p->x + offset : NULL;
    const uint16_t *restrict dy = p->dy ? p->dy + offset : NULL;
    const float m = p->center[c], k1 = p->k1[c], k2 = p->k2[c], k3 = p->k3[c];
    const int relu = p->relu;
    switch (p->mode) {
    case BN_BF16_FORWARD:
    case BN_BF16_EVAL_FORWARD:
#pragma omp simd
        for (fb_index i = 0; i < len; ++i)
            v[i] = bn_bf16_activate(bn_bf16_affine(bn_bf16_widen(x[i]) - m, k1, k3), relu);
        return;
    case BN_BF16_BACKWARD: {
        const float ms = relu ? p->mask_scale[c] : 0.0f, mh = relu ? p->mask_shift[c] : 0.0f;
#pragma omp simd
        for (fb_index i = 0; i < len; ++i) {
            const float xc = bn_bf16_widen(x[i]) - m;
            const float g = bn_bf16_grad(bn_bf16_widen(dy[i]), xc, ms, mh, relu);
            v[i] = bn_bf16_fma(g, k1, bn_bf16_fma(xc, k2, k3));
        }
        return;
    }
    default: { /* eval backward */
        if (!relu) {
#pragma omp simd
            for (fb_index i = 0; i < len; ++i)
                v[i] = bn_bf16_widen(dy[i]) * k1;
            return;
        }
        const float ms = p->mask_scale[c], mh = p->mask_shift[c];
#pragma omp simd
        for (fb_index i = 0; i < len; ++i) {
            const float xc = bn_bf16_widen(x[i]) - m;
            const float g = bn_bf16_grad(bn_bf16_widen(dy[i]), xc, ms, mh, 1);
            v[i] = g * k1;
        }
        return;
    }
    }
}

/* One channels-last row piece: element i is channel c0 + i. */
static void bn_bf16_compute_row(const bn_bf16_pass *p, float *restrict v, fb_index offset,
                                fb_index len, fb_index c0)
{
    const uint16_t *restrict x = p->x ? p->x + offset : NULL;
    const uint16_t *restrict dy = p->dy ? p->dy + offset : NULL;
    const float *restrict m = p->center + c0, *restrict k1 = p->k1 + c0;
    const float *restrict k2 = p->k2 + c0, *restrict k3 = p->k3 + c0;
    const float *restrict ms = p->mask_scale + c0, *restrict mh = p->mask_shift + c0;
    const int relu = p->relu;
    switch (p->mode) {
    case BN_BF16_FORWARD:
    case BN_BF16_EVAL_FORWARD:
#pragma omp simd
        for (fb_index i = 0; i < len; ++i)
            v[i] = bn_bf16_activate(bn_bf16_affine(bn_bf16_widen(x[i]) - m[i], k1[i], k3[i]),
                                    relu);
        return;
    case BN_BF16_BACKWARD:
#pragma omp simd
        for (fb_index i = 0; i < len; ++i) {
            const float xc = bn_bf16_widen(x[i]) - m[i];
            const float g = relu ? bn_bf16_grad(bn_bf16_widen(dy[i]), xc, ms[i], mh[i], 1)
                                 : bn_bf16_widen(dy[i]);
            v[i] = bn_bf16_fma(g, k1[i], bn_bf16_fma(xc, k2[i], k3[i]));
        }
        return;
    default:
        if (!relu) {
#pragma omp simd
            for (fb_index i = 0; i < len; ++i)
                v[i] = bn_bf16_widen(dy[i]) * k1[i];
            return;
        }
#pragma omp simd
        for (fb_index i = 0; i < len; ++i) {
            const float xc = bn_bf16_widen(x[i]) - m[i];
            const float g = bn_bf16_grad(bn_bf16_widen(dy[i]), xc, ms[i], mh[i], 1);
            v[i] = g * k1[i];
        }
        return;
    }
}


/* ---- fused rewrite (AVX-512 build) ----------------------------------------- */

/* The whole 64-byte lines of output elements [i, end) (out + i on a 32-byte
 * boundary): [*lines, *lines_end), empty (both i) when there is none.  A
 * streamed rewrite stores only these non-temporally; the vector at most at
 * each end that shares a line with a neighbour gets a normal store, since a
 * line written partly with streaming and partly with normal stores costs a
 * round trip to memory (the Xeon, AVX-512 build, (2048,64,32) training
 * forward, 2 threads, output 48 bytes past a line: 45 ms, against 2.5 ms
 * on a line). */
static inline void bn_bf16_whole_lines(const uint16_t *out, fb_index i, fb_index end,
                                       fb_index *lines, fb_index *lines_end)
{
    const fb_index start = i + (((uintptr_t)(out + i) & 63u) ? 16 : 0);
    *lines = *lines_end = i;
    if (start + 32 <= end) {
        *lines = start;
        *lines_end = start + (end - start) / 32 * 32;
    }
}

/* Two instances of bn_bf16_fused_impl.h: with the conversion instruction
 * (CPU with AVX512_BF16) and with fb_bn_bf16_narrow16 (any AVX-512 CPU).
 * The compute-into-a-float32-block-then-narrow form it replaces stores and
 * reloads every value through L1 and costs an extra call per block. */
#if FB_BN_BF16_CAN_USE_INSTRUCTION
#define FB_BN_BF16_FUSED 1
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
static inline __m256i bn_bf16_narrow_instruction16(__m512 v)
{
    return (__m256i)_mm512_cvtneps_pbh(v);
}
#define FB_BN_BF16_FUSED_NAME bn_bf16_fused_run_instruction
#define FB_BN_BF16_FUSED_ATTR __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
#define FB_BN_BF16_FUSED_NARROW bn_bf16_narrow_instruction16
#include "bn_bf16_fused_impl.h"
#define FB_BN_BF16_FUSED_NAME bn_bf16_fused_run_shift
#define FB_BN_BF16_FUSED_ATTR
#define FB_BN_BF16_FUSED_NARROW fb_bn_bf16_narrow16
#include "bn_bf16_fused_impl.h"

static inline void bn_bf16_fused_run(const bn_bf16_pass *p, fb_index offset, fb_index len,
                                     fb_index c, int row)
{
    if (p->instruction)
        bn_bf16_fused_run_instruction(p, offset, len, c, row);
    else
        bn_bf16_fused_run_shift(p, offset, len, c, row);
}
#else
#define FB_BN_BF16_FUSED 0
#endif

#if !FB_BN_BF16_FUSED
/* Rewrite `len` values of channel c at `offset` (planar) through a float32
 * block and the narrowing loop, normal stores. */
static void bn_bf16_rewrite_generic(const bn_bf16_pass *p, fb_index offset, fb_index len, fb_index c)
{
    float v[FB_BN_BF16_BLOCK];
    for (fb_index s = 0; s < len; s += FB_BN_BF16_BLOCK) {
        const fb_index piece = fb_min_index(FB_BN_BF16_BLOCK, len - s);
        bn_bf16_compute(p, v, offset + s, piece, c);
        fb_bn_bf16_narrow(v, p->out + offset + s, piece, p->instruction);
    }
}
#endif

#if !FB_BN_BF16_FUSED && defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__) \
    && FB_BF16_HAVE_VECTOR16
#define FB_BN_BF16_FUSED_AVX2 1
#include "bn_bf16_fused_avx2.h"
#else
#define FB_BN_BF16_FUSED_AVX2 0
#endif

/* Rewrite `len` values of channel c at `offset` (planar). */
static inline void bn_bf16_rewrite_planar_run(const bn_bf16_pass *p, fb_index offset,
                                              fb_index len, fb_index c)
{
#if FB_BN_BF16_FUSED
    bn_bf16_fused_run(p, offset, len, c, 0);
#elif FB_BN_BF16_FUSED_AVX2
    bn_bf16_avx2_walk(p, offset, len, c, 0);
#else
    bn_bf16_rewrite_generic(p, offset, len, c);
#endif
}

/* Planar elements [begin, end) in memory order: consecutive rows (of
 * consecutive channels, channel of element e: (e / inner) % channels). */
static void bn_bf16_rewrite_stretch(const bn_bf16_pass *p, fb_index begin, fb_index end)
{
#if FB_BN_BF16_FUSED_AVX2
    bn_bf16_fused_stretch_avx2(p, begin, end);
#else
    for (fb_index i = begin; i < end;) {
        const fb_index row = i / p->inner, stop = fb_min_index(end, (row + 1) * p->inner);
        bn_bf16_rewrite_planar_run(p, i, stop - i, row % p->channels);
        i = stop;
    }
#endif
}

static void bn_bf16_rewrite_item(const bn_bf16_pass *p, fb_index item)
{
    float v[FB_BN_BF16_BLOCK];
    if (!p->interleaved) {
        const fb_index c = item / p->chunks, k = item - c * p->chunks;
        fb_bn_runs runs = fb_bn_runs_start(p->n, p->channels, p->inner, p->chunk, k);
        fb_index offset, len;
        while (fb_bn_runs_next(&runs, c, &offset, &len))
            bn_bf16_rewrite_planar_run(p, offset, len, c);
        return;
    }
    const fb_index C = p->channels;
    const fb_index r0 = item * p->chunk, r1 = fb_min_index(p->outer, r0 + p->chunk);
#if FB_BN_BF16_FUSED_AVX2
    bn_bf16_avx2_walk(p, r0 * C, (r1 - r0) * C, 0, 1);
    return;
#endif
#if FB_BN_BF16_FUSED
    bn_bf16_fused_run(p, r0 * C, (r1 - r0) * C, 0, 1); /* one stretch across row ends */
    return;
#endif
    for (fb_index r = r0; r < r1; ++r) {
        for (fb_index c0 = 0; c0 < C; c0 += FB_BN_BF16_BLOCK) {
            const fb_index piece = fb_min_index(FB_BN_BF16_BLOCK, C - c0);
            const fb_index offset = r * C + c0;
            bn_bf16_compute_row(p, v, offset, piece, c0);
            fb_bn_bf16_narrow(v, p->out + offset, piece, p->instruction);
        }
    }
}

/* Linear item: elements [item * FB_BN_BF16_LINEAR, ...) in memory order. */
static void bn_bf16_rewrite_linear(const bn_bf16_pass *p, fb_index item)
{
    float v[FB_BN_BF16_BLOCK];
    const fb_index total = p->outer * p->channels * p->inner;
    fb_index i = item * FB_BN_BF16_LINEAR;
    const fb_index end = fb_min_index(total, i + FB_BN_BF16_LINEAR);
    while (i < end) {
        if (p->interleaved) {
#if FB_BN_BF16_FUSED_AVX2
            bn_bf16_avx2_walk(p, i, end - i, 0, 1);
            return;
#endif
            const fb_index c0 = i % p->channels;
#if FB_BN_BF16_FUSED
            bn_bf16_fused_run(p, i, end - i, c0, 1); /* one stretch across row ends */
            return;
#endif
            fb_index len = fb_min_index(p->channels - c0, end - i);
            len = fb_min_index(len, FB_BN_BF16_BLOCK);
            bn_bf16_compute_row(p, v, i, len, c0);
            fb_bn_bf16_narrow(v, p->out + i, len, p->instruction);
            i += len;
        } else {
#if FB_BN_BF16_FUSED || FB_BN_BF16_FUSED_AVX2
            bn_bf16_rewrite_stretch(p, i, end);
            return;
#endif
            const fb_index row = i / p->inner, col = i - row * p->inner;
            fb_index len = fb_min_index(p->inner - col, end - i);
            len = fb_min_index(len, FB_BN_BF16_BLOCK);
            bn_bf16_compute(p, v, i, len, row % p->channels);
            fb_bn_bf16_narrow(v, p->out + i, len, p->instruction);
            i += len;
        }
    }
}

/* Channel c's coefficients, once set, copied to where the channels-last
 * rewrites read them: the wrapped entries C + j (j % C == c) of the
 * per-channel arrays (AVX-512 build, bn_bf16_fused_impl.h) or the pair
 * tables (AVX2 build, bn_bf16_fused_avx2.h).  Each channel writes only its
 * own entries, so the threads finalizing different channels may fill them
 * concurrently. */
static void bn_bf16_publish_coefficients(const bn_bf16_pass *p, fb_index c)
{
#if FB_BN_BF16_FUSED
    float *const arrays[6] = {p->center, p->k1, p->k2, p->k3, p->mask_scale, p->mask_shift};
    for (int which = 0; which < 6; ++which)
        for (fb_index t = c + p->channels; t < p->channels + FB_BN_WRAP_PAD; t += p->channels)
            arrays[which][t] = arrays[which][c];
#elif FB_BN_BF16_FUSED_AVX2
    if (!p->pairs)
        return;
    const fb_index C = p->channels, slots = BN_BF16_PAIR_SLOTS(C);
    const float value[BN_BF16_PAIR_TABLES] = {p->center[c], p->k1[c], p->k2[c], p->k3[c],
                                             p->mask_scale[c], p->mask_shift[c]};
    for (int which = 0; which < BN_BF16_PAIR_TABLES; ++which)
        for (fb_index t = c; t < C + 16; t += C)
            p->pairs[(2 * which + (t & 1)) * slots + t / 2] = value[which];
#else
    (void)p;
    (void)c;
#endif
}

/* ---- the pass --------------------------------------------------------------- */

/* Row r of owned planar channels [c0, c1), whose partials are zeroed, added
 * to them: row r of every channel of the range is one contiguous stretch of
 * (c1 - c0) * inner values, where one channel at a time reads row pieces of
 * inner values a whole row of planes apart (6 KiB pieces 800 KiB apart for
 * (64,128,56,56) bfloat16), which restarts the hardware prefetcher on every
 * piece.  Each channel's row piece is cut at its chunk boundaries into
 * exactly the runs of fb_bn_runs, each run's total added to its chunk's
 * partial in row order: the partials of bn_bf16_reduce_item, bit for bit,
 * and finalize adds them in chunk order as before. */
static void bn_bf16_owned_row(bn_bf16_pass *p, fb_index c0, fb_index c1, fb_index r)
{
    const fb_index C = p->channels, inner = p->inner, chunk = p->chunk, chunks = p->chunks;
    const fb_index p0 = r * inner, p2 = p0 + inner;
    const fb_index k0 = p0 / chunk;
    for (fb_index c = c0; c < c1; ++c) {
        const fb_index base = (r * C + c) * inner - p0; /* value q at base + q */
        fb_index k = k0;
        for (fb_index q = p0; q < p2; ++k) {
            const fb_index stop = fb_min_index(p2, (k + 1) * chunk);
            /* the same piece of the next row fetched ahead (into L1,
             * bn_bf16_reduce_vector): a row's stretch is a few tens of
             * KiB, and each jump to the next row restarts the hardware
             * prefetcher.  Zen 3 (AVX2), bfloat16, out=, two builds
             * alternated (bn_ab_builds.py, min of 15 rounds, two runs):
             * (64,128,56,56) training forward 0.85-0.88x the time at 1
             * and 2 threads, backward 0.91-0.98x; (16,256,28,28) and
             * (32,96,40,40) 0.63-1.01x.  Before, only the AVX-512 build
             * prefetched, and only outside the owned walk. */
            bn_bf16_reduce_planar_run(p, c, base + q, stop - q,
                                      r + 1 < p->outer ? C * inner : 0,
                                      &p->sum1[c * chunks + k], &p->sum2[c * chunks + k]);
            q = stop;
        }
    }
}

/* The chunk partials of channels [c0, c1) set to zero. */
static void bn_bf16_owned_zero(bn_bf16_pass *p, fb_index c0, fb_index c1)
{
    for (fb_index i = c0 * p->chunks; i < c1 * p->chunks; ++i)
        p->sum1[i] = p->sum2[i] = 0.0;
}

/* Row r of planar channels [c0, c1) rewritten: one stretch. */
static void bn_bf16_owned_rewrite_row(const bn_bf16_pass *p, fb_index c0, fb_index c1,
                                      fb_index r)
{
    bn_bf16_rewrite_stretch(p, (r * p->channels + c0) * p->inner,
                            (r * p->channels + c1) * p->inner);
}

/* Owned planar channels [c0, c1) walked together, row by row
 * (bn_bf16_owned_row), then rewritten, newest rows first (the likeliest to
 * be in cache). */
static void bn_bf16_owned_block(bn_bf16_pass *p, fb_index c0, fb_index c1)
{
    if (p->reduce) {
        bn_bf16_owned_zero(p, c0, c1);
        for (fb_index r = 0; r < p->outer; ++r)
            bn_bf16_owned_row(p, c0, c1, r);
    }
    for (fb_index c = c0; c < c1; ++c)
        bn_bf16_finalize(p, c);
    for (fb_index r = p->outer; r-- > 0;)
        bn_bf16_owned_rewrite_row(p, c0, c1, r);
}

/* Rows (one sample's plane of one channel) from which the paced walk pays:
 * below it, rewriting one short row of the previous channel per row reduced
 * costs more in calls than the overlap of reads and writes gains (measured
 * at bn_bf16_owned_paced). */
#define FB_BN_BF16_PACED_ROW_BYTES ((fb_index)2048)

/* Whether the owned walk is bn_bf16_owned_paced: a training forward or
 * backward (plain or ReLU) whose output is streamed, in the AVX-512 build,
 * with rows of at least FB_BN_BF16_PACED_ROW_BYTES and channels whose
 * streamed input does not fit in L1 (those are rewritten from L1 right
 * after their reduction) but two of which fit in 4/5 of this CPU's L2
 * (channel c streams in while channel c - 1 is rewritten from L2; measured
 * at bn_bf16_owned_paced: two channels of 1.6 MB in all, (64,128,56,56)
 * backward, gained, 4 % inside the limit on a 2 MiB L2; 2 MiB
 * ((16,16,128,128) backward) and 3.2 MB lost); depends on the
 * shape, mode, target and L2 size only, never on the thread count (and the
 * sums are the same in either walk). */
static int bn_bf16_paces(const bn_bf16_pass *p)
{
    const fb_index channel_bytes = p->n * 2 * (p->mode == BN_BF16_BACKWARD ? 2 : 1);
    return FB_BN_BF16_FUSED && p->reduce && p->stream
        && (p->mode == BN_BF16_FORWARD || p->mode == BN_BF16_BACKWARD)
        && p->inner * 2 >= FB_BN_BF16_PACED_ROW_BYTES && channel_bytes > FB_BN_OWNED_L1_BYTES
        && 5 * 2 * channel_bytes <= 4 * fb_l2_bytes();
}

/* Owned planar channels [first, last) one at a time: row r of channel c is
 * reduced, then row r of channel c - 1 (already finalized) rewritten, and
 * the last channel alone at the end -- the float kernels' bn_owned_paced
 * (reads and writes to memory at once: a core keeps more requests in
 * flight than when a block's reduction and its rewrite take turns).  The
 * same runs and partials as bn_bf16_owned_block (one channel wide); the
 * rewrite is elementwise, so only the order of the memory accesses
 * changes.
 * The Xeon (AVX-512 + AVX512_BF16, 2 MiB L2 per core), into out= on a line
 * boundary, two builds alternated (4 processes of 15 calls each), 25th
 * percentile, block walk -> paced, training forward / backward, 2 threads:
 * (64,128,56,56) 3.18 -> 2.86 / 6.62 -> 5.03 ms (1 thread 6.87 -> 5.87 /
 * 13.7 -> 10.4; output 16 bytes off a line 3.08 -> 2.69 / 5.68 -> 4.56),
 * (64,96,40,40) 1.11 -> 1.01 / 1.63 -> 1.41, (32,64,64,64) 0.83 -> 0.83 /
 * 1.30 -> 1.17, (32,64,48,64) 0.63 -> 0.63 / 0.96 -> 0.88, (64,32,32,64)
 * 0.45 -> 0.42 / 0.67 -> 0.59, (64,64,32,32) (2 KiB rows) 0.47 -> 0.46 /
 * 0.70 -> 0.63.  Below FB_BN_BF16_PACED_ROW_BYTES it lost: (2048,64,32)
 * 2.46 -> 2.81 / 2.62 -> 3.32, (256,64,16,16) backward 0.97 -> 1.02,
 * (128,256,8,8) backward 0.87 -> 0.94 (its forward gained, 0.89 -> 0.78);
 * and with channels in L1, (8,1024,32,32) backward 1.11 -> 1.18.  Nor
 * where two channels outgrow the L2 (the rewrite of channel c - 1 then
 * reads from L3): backward (8,64,224,224) (1.6 MB channels of x and dy)
 * 5.01 -> 6.82 ms, (16,16,128,128) (1 MiB) 0.60 -> 0.67; hence the 4/5 of
 * L2 in bn_bf16_paces.  (An
 * earlier trial read losses of 1.5-17x on such shapes: it wrote into
 * np.empty_like outputs 16 or 48 bytes off a line before a streamed run
 * kept its streaming stores to whole lines, and the two walks' outputs
 * landed at different offsets.)  Walking blocks of 2 or 4 channels so
 * (block b's row r, then block b - 1's) gained less or nothing.  The AVX2
 * build does not pace: on the same Xeon (FASTBN_SIMD=avx2) its training
 * forward lost at 2 threads ((64,128,56,56) 4.10 -> 4.25 ms, (64,96,40,40)
 * 1.40 -> 1.58) and on Zen 3 both orders lost (the note at
 * FB_BN_BF16_BLOCK_BYTES); its backward gained on the Xeon ((64,128,56,56)
 * 8.06 -> 6.55 ms, (64,96,40,40) 1.99 -> 2.00) but was not measured on
 * Zen 3, where the float kernels' paced backward lost (those AVX2 trials
 * also wrote into np.empty_like outputs). */
static void bn_bf16_owned_paced(bn_bf16_pass *p, fb_index first, fb_index last)
{
    for (fb_index c = first; c < last; ++c) {
        bn_bf16_owned_zero(p, c, c + 1);
        for (fb_index r = 0; r < p->outer; ++r) {
            bn_bf16_owned_row(p, c, c + 1, r);
            if (c > first)
                bn_bf16_owned_rewrite_row(p, c - 1, c, r);
        }
        bn_bf16_finalize(p, c);
    }
    if (last > first)
        for (fb_index r = p->outer; r-- > 0;)
            bn_bf16_owned_rewrite_row(p, last - 1, last, r);
}

/* Run by every thread of the team, or by the caller alone.  The work-sharing
 * loops of one block have the same bounds and a static schedule, so a thread
 * rewrites the items it reduced (from its own cache). */
static void bn_bf16_body_work(bn_bf16_pass *p)
{
    if (p->linear) {
#pragma omp for schedule(static)
        for (fb_index item = 0; item < p->linear_items; ++item)
            bn_bf16_rewrite_linear(p, item);
        return;
    }
    if (!p->interleaved && p->channels >= 4 * (fb_index)fb_team_size()
        && (p->owned_block > 1 || p->paced)) {
        fb_index first, last;
        fb_split_range(p->channels, fb_team_size(), fb_thread_id(), &first, &last);
        if (p->paced) {
            bn_bf16_owned_paced(p, first, last);
            return;
        }
        for (fb_index c0 = first; c0 < last; c0 += p->owned_block)
            bn_bf16_owned_block(p, c0, fb_min_index(last, c0 + p->owned_block));
        return;
    }
    if (!p->interleaved && p->channels >= 4 * (fb_index)fb_team_size()) {
        /* enough channels: each thread owns whole channels and reduces,
         * finalizes and rewrites one channel at a time, with no barrier (a
         * barrier per cache block waits for the slowest thread, costly on a
         * busy machine); the same partials in the same order as below */
#pragma omp for schedule(static)
        for (fb_index c = 0; c < p->channels; ++c) {
            for (fb_index k = 0; k < p->chunks && p->reduce; ++k)
                bn_bf16_reduce_item(p, c * p->chunks + k);
            bn_bf16_finalize(p, c);
            for (fb_index k = p->chunks; k-- > 0;) /* newest first: still in L2 */
                bn_bf16_rewrite_item(p, c * p->chunks + k);
        }
        return;
    }
    const fb_index per_channel = p->interleaved ? 0 : p->chunks;
    for (fb_index c0 = 0; c0 < p->channels; c0 += p->block_channels) {
        const fb_index c1 = fb_min_index(p->channels, c0 + p->block_channels);
        const fb_index first = p->interleaved ? 0 : c0 * per_channel;
        const fb_index last = p->interleaved ? p->chunks : c1 * per_channel;
        if (p->reduce) {
#pragma omp for schedule(static)
            for (fb_index item = first; item < last; ++item)
                bn_bf16_reduce_item(p, item);
        }
#pragma omp for schedule(static)
        for (fb_index c = c0; c < c1; ++c) {
            bn_bf16_finalize(p, c);
            bn_bf16_publish_coefficients(p, c);
        }
#pragma omp for schedule(static)
        for (fb_index item = first; item < last; ++item)
            bn_bf16_rewrite_item(p, item);
    }
}

static void bn_bf16_body(bn_bf16_pass *p)
{
    bn_bf16_body_work(p);
    if (p->stream)
        fb_stream_fence();
}

/* Plan, allocate, set the per-channel arrays the mode needs before the pass
 * (centers, eval coefficients, relu masks), run, free. */
static int bn_bf16_run(bn_bf16_pass *p, fb_index outer, fb_index channels, fb_index inner,
                       int streams, int num_threads)
{
    const fb_index total = outer * channels * inner;
    const int nt = fb_threads_for(total, num_threads);
    const fb_index first_of_channel = inner; /* stride between channel starts, before planning */
    bn_bf16_plan(p, outer, channels, inner, streams, nt);
    p->instruction = fb_bn_bf16_cpu_has_instruction();
    /* the float kernels' rule (fb_bn_stream_output, bn_plan.h): an output past
     * the last-level cache share, whose rows are whole 64-byte lines (or
     * channels-last: one flat stream), skips the read-for-ownership; only
     * the fused rewrites (AVX-512, AVX2) stream, each over its whole lines */
    p->stream = (FB_BN_BF16_FUSED || FB_BN_BF16_FUSED_AVX2)
        && fb_bn_stream_output(p->outer, channels, channels, p->inner, 2);
    p->paced = bn_bf16_paces(p);
    p->linear = !p->reduce;
    p->linear_items = fb_ceil_div(total, FB_BN_BF16_LINEAR);
    const fb_index partials = p->reduce ? channels * p->chunks : 0;
#if FB_BN_BF16_FUSED_AVX2
    const fb_index pair_floats = p->interleaved ? 2 * BN_BF16_PAIR_TABLES * BN_BF16_PAIR_SLOTS(channels) : 0;
#else
    const fb_index pair_floats = 0;
#endif
    /* per-channel arrays padded as the float kernels' (FB_BN_WRAP_PAD): entry
     * C + j mirrors entry j % C (bn_bf16_publish_coefficients) */
    const fb_index wrapped = channels + FB_BN_WRAP_PAD;
    double *work = (double *)malloc((size_t)(2 * partials) * sizeof(double)
                                    + (size_t)(6 * wrapped + pair_floats) * sizeof(float) + 64);
    if (!work)
        return FASTBN_ERR_NOMEM;
    p->sum1 = work;
    p->sum2 = work + partials;
    p->center = (float *)(work + 2 * partials);
    p->k1 = p->center + wrapped;
    p->k2 = p->k1 + wrapped;
    p->k3 = p->k2 + wrapped;
    p->mask_scale = p->k3 + wrapped;
    p->mask_shift = p->mask_scale + wrapped;
    p->pairs = pair_floats ? p->mask_shift + wrapped : NULL;
    for (fb_index c = 0; c < channels; ++c) {
        p->k1[c] = p->k2[c] = p->k3[c] = 0.0f;
        p->mask_scale[c] = p->mask_shift[c] = 0.0f;
        const float bias = p->bias ? p->bias[c] : 0.0f;
        switch (p->mode) {
        case BN_BF16_FORWARD:
            p->center[c] = p->n > 0 ? bn_bf16_widen(p->x[c * first_of_channel]) : 0.0f;
            break;
        case BN_BF16_EVAL_FORWARD: {
            const double invstd = 1.0 / sqrt((double)p->stat_spread[c] + p->eps);
            p->center[c] = p->stat_mean[c];
            p->k1[c] = (float)(bn_bf16_weight(p, c) * invstd);
            p->k3[c] = bias;
            break;
        }
        case BN_BF16_BACKWARD:
            p->center[c] = p->stat_mean[c];
            p->mask_scale[c] = (float)(bn_bf16_weight(p, c) * (double)p->stat_spread[c]);
            p->mask_shift[c] = bias;
            break;
        default: { /* eval backward */
            const double invstd = 1.0 / sqrt((double)p->stat_spread[c] + p->eps);
            p->center[c] = p->stat_mean[c];
            p->k1[c] = (float)(bn_bf16_weight(p, c) * invstd);
            p->mask_scale[c] = p->k1[c];
            p->mask_shift[c] = bias;
            break;
        }
        }
        bn_bf16_publish_coefficients(p, c); /* the reducing passes fill again after finalize */
    }
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        bn_bf16_body(p);
    } else {
        bn_bf16_body(p);
    }
    free(work);
    return FASTBN_OK;
}

/* ---- table entry points ----------------------------------------------------- */

static int bn_eval_forward_call_bf16(const fastbn_bn_call *c)
{
    if (c->outer < 0 || c->channels <= 0 || c->inner < 0 || !c->x || !c->out
        || !c->running_mean || !c->running_var)
        return FASTBN_ERR_ARGUMENT;
    bn_bf16_pass p = {0};
    p.mode = BN_BF16_EVAL_FORWARD;
    p.relu = c->relu;
    p.x = (const uint16_t *)c->x;
    p.out = (uint16_t *)c->out;
    p.weight = (const float *)c->weight;
    p.bias = (const float *)c->bias;
    p.stat_mean = (const float *)c->running_mean;
    p.stat_spread = (const float *)c->running_var;
    p.eps = c->eps;
    return bn_bf16_run(&p, c->outer, c->channels, c->inner, 1, c->num_threads);
}

static int bn_train_forward_call_bf16(const fastbn_bn_call *c)
{
    if (c->outer < 0 || c->channels <= 0 || c->inner < 0 || c->outer * c->inner < 2 || !c->x
        || !c->out || !c->mean || !c->invstd
        || (c->running_mean == NULL) != (c->running_var == NULL) || !(c->eps > 0))
        return FASTBN_ERR_ARGUMENT;
    bn_bf16_pass p = {0};
    p.mode = BN_BF16_FORWARD;
    p.reduce = 1;
    p.relu = c->relu;
    p.x = (const uint16_t *)c->x;
    p.out = (uint16_t *)c->out;
    p.weight = (const float *)c->weight;
    p.bias = (const float *)c->bias;
    p.saved_mean = (float *)c->mean;
    p.saved_invstd = (float *)c->invstd;
    p.running_mean = (float *)c->running_mean;
    p.running_var = (float *)c->running_var;
    p.eps = c->eps;
    p.momentum = c->momentum;
    return bn_bf16_run(&p, c->outer, c->channels, c->inner, 1, c->num_threads);
}

static int bn_backward_call_bf16(const fastbn_bn_call *c)
{
    if (c->outer < 0 || c->channels <= 0 || c->inner < 0 || !c->dy || !c->x || !c->out
        || !c->mean || !c->invstd)
        return FASTBN_ERR_ARGUMENT;
    bn_bf16_pass p = {0};
    p.mode = BN_BF16_BACKWARD;
    p.reduce = 1;
    p.accumulate = c->accumulate;
    p.relu = c->relu;
    p.dy = (const uint16_t *)c->dy;
    p.x = (const uint16_t *)c->x;
    p.out = (uint16_t *)c->out;
    p.weight = (const float *)c->weight;
    p.bias = (const float *)c->bias;
    p.stat_mean = (const float *)c->mean;
    p.stat_spread = (const float *)c->invstd;
    p.dweight = (float *)c->dweight;
    p.dbias = (float *)c->dbias;
    return bn_bf16_run(&p, c->outer, c->channels, c->inner, 2, c->num_threads);
}

static int bn_backward_eval_call_bf16(const fastbn_bn_call *c)
{
    const int reduce = c->dweight != NULL || c->dbias != NULL;
    if (c->outer < 0 || c->channels <= 0 || c->inner < 0 || !c->dy || !c->out
        || !c->running_mean || !c->running_var || ((reduce || c->relu) && !c->x)
        || !(c->eps >= 0))
        return FASTBN_ERR_ARGUMENT;
    bn_bf16_pass p = {0};
    p.mode = BN_BF16_BACKWARD_EVAL;
    p.reduce = reduce;
    p.accumulate = c->accumulate;
    p.relu = c->relu;
    p.dy = (const uint16_t *)c->dy;
    p.x = (const uint16_t *)c->x;
    p.out = (uint16_t *)c->out;
    p.weight = (const float *)c->weight;
    p.bias = (const float *)c->bias;
    p.stat_mean = (const float *)c->running_mean;
    p.stat_spread = (const float *)c->running_var;
    p.dweight = (float *)c->dweight;
    p.dbias = (float *)c->dbias;
    p.eps = c->eps;
    return bn_bf16_run(&p, c->outer, c->channels, c->inner, reduce || c->relu ? 2 : 1,
                       c->num_threads);
}

/* The narrowing itself, for tests: dst = round(src); `allow_instruction`
 * lets it use the instruction when the CPU has it.  Returns 1 when it did. */
static int bn_round_bf16(const float *src, uint16_t *dst, fb_index n, int allow_instruction)
{
    const int instruction = allow_instruction && fb_bn_bf16_cpu_has_instruction();
    fb_bn_bf16_narrow(src, dst, n, instruction);
    return instruction;
}
