/* bn_bf16_fused_avx2.h -- the fused planar rewrite of the bfloat16
 * batch-norm kernels on the AVX2 target (included by bn_bf16_impl.h, AVX2
 * build without AVX-512 only).
 *
 * One planar run (every element of channel c, coefficients broadcast): the
 * float32 operations of bn_bf16_compute and the narrowing of fb_bn_bf16_round
 * in registers, 16 elements per step, with non-temporal stores when
 * p->stream.  The form it replaces computed a float32 block on the stack and
 * narrowed it in a second loop (vpmovzxwd widening, a lane-order vpermq per
 * 16 values, an NaN and subnormal select per vector) with normal stores,
 * whose read of every output line made the rewrite of (64,128,56,56) the
 * slowest part of the bfloat16 training forward (perf: the narrowing store
 * alone ~45 % of the rewrite's samples).
 *
 * Pair order: a 32-bit word j of 16 loaded bfloat16 holds elements 2j (low
 * half) and 2j + 1 (high half), so the even elements widen with one shift
 * and the odd ones with one mask -- no lane shuffle; the rounded results go
 * back the same way (the even results shifted down, one 16-bit blend), so
 * the output is in memory order.  The rewrite is elementwise with the
 * channel's coefficients broadcast, so the order in which lanes are computed
 * changes no value.
 *
 * Rounding: fb_bn_bf16_round's general form selects NaN and subnormal lanes
 * (compare, mask, blend per vector).  Outputs are rarely either, so one
 * compare per vector, |v| !>= FLT_MIN (true for NaN and for |v| < FLT_MIN,
 * zero included), decides per 16 elements; only a step holding such a lane
 * takes the general form.  Forward with ReLU tests the value before the
 * ReLU: a lane the ReLU zeroes from a normal negative value rounds to +0 by
 * the plain add as well (+0 + 0x7FFF stays below 0x10000), so the many
 * zeroed lanes do not send every step to the general form.  Same bits as
 * compute + narrow on every lane (tests/test_bn_bf16*.py against the twin).
 *
 * Tails shorter than 16, and the heads up to a streamed output's first
 * 32-byte boundary, take one vector step on staged copies (normal stores,
 * bn_bf16_avx2_staged), and a full vector in the same 64-byte line as such
 * a head or tail is stored normally too: a line written partly with
 * streaming and partly with normal stores costs a round trip to memory.  A
 * streamed output at an odd address goes through bn_bf16_compute +
 * fb_bn_bf16_narrow (never a streaming store). */

#include <immintrin.h>
#include <string.h>

/* the general narrowing of 8 lanes, the bfloat16 in the top half of each
 * 32-bit lane: fb_bn_bf16_round (subnormals to the sign's zero, NaN quiet) */
FB_ALWAYS_INLINE __m256i bn_bf16_avx2_round_general(__m256 v)
{
    const __m256 flushed = fb_bn_bf16_flush8(v);
    const __m256i bits = _mm256_castps_si256(flushed);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
    const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet),
                                                _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

/* The 16 narrowed results of a step holding a NaN or subnormal lane: out
 * of line, so that the loop's registers keep its own constants (inlined,
 * the general form's constants took four of the sixteen ymm registers and
 * GCC rebuilt 0x7FFF inside the loop, three instructions per 16 values). */
FB_COLD __m256i bn_bf16_avx2_pack_general(__m256 even, __m256 odd)
{
    return fb_bf16_pair_pack(bn_bf16_avx2_round_general(even), bn_bf16_avx2_round_general(odd));
}

/* nearest-even of 8 lanes that are neither NaN nor subnormal; `half`:
 * 0x7FFF in every lane, `one`: 1 (made once by the caller: GCC otherwise
 * rebuilt 0x7FFF in the loop, three instructions per 16 elements) */
FB_ALWAYS_INLINE __m256i bn_bf16_avx2_round_plain(__m256 v, __m256i half, __m256i one)
{
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    return _mm256_add_epi32(_mm256_add_epi32(bits, half), lsb);
}

/* The float32 results of 8 elements (xc = x - m, g = dy widened); *check
 * receives the value the special-lane test looks at. */
FB_ALWAYS_INLINE __m256 bn_bf16_avx2_value(__m256 xc, __m256 g, const int mode, const int relu, __m256 k1,
                                           __m256 k2, __m256 k3, __m256 ms, __m256 mh, __m256 *check)
{
    if (mode == BN_BF16_FORWARD || mode == BN_BF16_EVAL_FORWARD) {
        const __m256 v = _mm256_fmadd_ps(xc, k1, k3);
        *check = v;
        if (!relu)
            return v;
        return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ), v);
    }
    if (relu)
        g = _mm256_and_ps(_mm256_cmp_ps(_mm256_fmadd_ps(xc, ms, mh), _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ), g);
    const __m256 v = mode == BN_BF16_BACKWARD ? _mm256_fmadd_ps(g, k1, _mm256_fmadd_ps(xc, k2, k3))
                                              : _mm256_mul_ps(g, k1);
    *check = v;
    return v;
}

/* Pair-order coefficient tables of a channels-last pass
 * (bn_bf16_publish_coefficients sets them): for each of the six per-channel arrays (center, k1, k2, k3,
 * mask_scale, mask_shift) the sequence e[t] = a[t mod C], t < C + 16, split
 * into its even entries E[q] = e[2q] and odd ones O[q] = e[2q + 1].  A
 * vector of 16 elements from channel c then takes its even lanes (channels
 * c, c + 2, ..., wrapping past C) and its odd lanes with one load each --
 * E + c/2 and O + c/2 for even c, O + (c-1)/2 and E + (c+1)/2 for odd c --
 * where the coefficients loaded in channel order would need two shuffles
 * per half to reach pair order.  BN_BF16_PAIR_SLOTS(C) entries per half. */
#define BN_BF16_PAIR_SLOTS(C) ((C) / 2 + 9)
enum { BN_BF16_PAIR_CENTER = 0, BN_BF16_PAIR_K1, BN_BF16_PAIR_K2, BN_BF16_PAIR_K3,
       BN_BF16_PAIR_MS, BN_BF16_PAIR_MH, BN_BF16_PAIR_TABLES };

/* The even-lane (half 0) or odd-lane (half 1) coefficients of table `which`
 * for a vector starting at channel c. */
FB_ALWAYS_INLINE __m256 bn_bf16_avx2_pair_coef(const float *pairs, fb_index slots, int which, int half,
                                               fb_index c)
{
    const float *table = pairs + (fb_index)(2 * which) * slots;
    const fb_index odd_c = c & 1, h = c >> 1;
    /* half 0: E + h (even c) or O + h (odd c); half 1: O + h or E + h + 1 */
    const fb_index from_odd = half ^ (int)odd_c;
    return _mm256_loadu_ps(table + from_odd * slots + h + (half & odd_c));
}

/* Full vectors: elements [offset, offset + 16 * count), out + offset 32-byte
 * aligned when p->stream.  Planar (`row` 0): every element is channel c,
 * coefficients broadcast.  Channels-last (`row` 1): element offset + i is
 * channel (c + i) mod C, coefficients from the pair tables per vector. */
FB_ALWAYS_INLINE void bn_bf16_avx2_vectors(const bn_bf16_pass *p, fb_index offset, fb_index count,
                                           fb_index c, const int mode, const int relu, const int row)
{
    const int forward = mode == BN_BF16_FORWARD || mode == BN_BF16_EVAL_FORWARD;
    const int need_x = forward || mode == BN_BF16_BACKWARD || relu;
    const uint16_t *restrict x = p->x ? p->x + offset : NULL;
    const uint16_t *restrict dy = p->dy ? p->dy + offset : NULL;
    uint16_t *restrict out = p->out + offset;
    __m256 m[2], k1[2], k2[2], k3[2], ms[2], mh[2];
    if (!row) {
        m[0] = m[1] = _mm256_set1_ps(p->center[c]);
        k1[0] = k1[1] = _mm256_set1_ps(p->k1[c]);
        k2[0] = k2[1] = _mm256_set1_ps(p->k2[c]);
        k3[0] = k3[1] = _mm256_set1_ps(p->k3[c]);
        ms[0] = ms[1] = _mm256_set1_ps(p->mask_scale[c]);
        mh[0] = mh[1] = _mm256_set1_ps(p->mask_shift[c]);
    } else {
        for (int h = 0; h < 2; ++h)
            m[h] = k1[h] = k2[h] = k3[h] = ms[h] = mh[h] = _mm256_setzero_ps();
    }
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 smallest = _mm256_set1_ps(FLT_MIN);
    const __m256i round_half = _mm256_set1_epi32(0x7FFF), round_one = _mm256_set1_epi32(1);
    const int stream = p->stream;
    const fb_index len = 16 * count, C = p->channels;
    const float *pairs = p->pairs; /* loaded once: the stores may alias it */
    const fb_index slots = BN_BF16_PAIR_SLOTS(C);
    for (fb_index i = 0; i < len; i += 16) {
        if (row) {
            for (int h = 0; h < 2; ++h) {
                if (need_x)
                    m[h] = bn_bf16_avx2_pair_coef(pairs, slots, BN_BF16_PAIR_CENTER, h, c);
                k1[h] = bn_bf16_avx2_pair_coef(pairs, slots, BN_BF16_PAIR_K1, h, c);
                if (forward || mode == BN_BF16_BACKWARD)
                    k3[h] = bn_bf16_avx2_pair_coef(pairs, slots, BN_BF16_PAIR_K3, h, c);
                if (mode == BN_BF16_BACKWARD)
                    k2[h] = bn_bf16_avx2_pair_coef(pairs, slots, BN_BF16_PAIR_K2, h, c);
                if (relu && !forward) {
                    ms[h] = bn_bf16_avx2_pair_coef(pairs, slots, BN_BF16_PAIR_MS, h, c);
                    mh[h] = bn_bf16_avx2_pair_coef(pairs, slots, BN_BF16_PAIR_MH, h, c);
                }
            }
            c += 16;
            while (c >= C)
                c -= C;
        }
        const __m256i xw = need_x ? _mm256_loadu_si256((const __m256i *)(x + i)) : _mm256_setzero_si256();
        const __m256i gw = forward ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i *)(dy + i));
        __m256 check_even, check_odd;
        const __m256 xc_even = need_x ? _mm256_sub_ps(fb_bf16_pair_even(xw), m[0]) : _mm256_setzero_ps();
        const __m256 xc_odd = need_x ? _mm256_sub_ps(fb_bf16_pair_odd(xw), m[1]) : _mm256_setzero_ps();
        const __m256 even = bn_bf16_avx2_value(xc_even, fb_bf16_pair_even(gw), mode, relu, k1[0], k2[0], k3[0],
                                               ms[0], mh[0], &check_even);
        const __m256 odd = bn_bf16_avx2_value(xc_odd, fb_bf16_pair_odd(gw), mode, relu, k1[1], k2[1], k3[1],
                                              ms[1], mh[1], &check_odd);
        const __m256 special = _mm256_or_ps(
            _mm256_cmp_ps(_mm256_and_ps(check_even, magnitude), smallest, _CMP_NGE_UQ),
            _mm256_cmp_ps(_mm256_and_ps(check_odd, magnitude), smallest, _CMP_NGE_UQ));
        __m256i h;
        if (_mm256_testz_ps(special, special))
            h = fb_bf16_pair_pack(bn_bf16_avx2_round_plain(even, round_half, round_one),
                                  bn_bf16_avx2_round_plain(odd, round_half, round_one));
        else
            h = bn_bf16_avx2_pack_general(even, odd);
        if (stream)
            _mm256_stream_si256((__m256i *)(out + i), h);
        else
            _mm256_storeu_si256((__m256i *)(out + i), h);
    }
}

static void bn_bf16_avx2_vectors_any(const bn_bf16_pass *p, fb_index offset, fb_index count, fb_index c,
                                     int row)
{
#define FB_BN_BF16_AVX2_CASE(MODE)                                              \
    case MODE:                                                                  \
        if (row && p->relu)   bn_bf16_avx2_vectors(p, offset, count, c, MODE, 1, 1); \
        else if (row)         bn_bf16_avx2_vectors(p, offset, count, c, MODE, 0, 1); \
        else if (p->relu)     bn_bf16_avx2_vectors(p, offset, count, c, MODE, 1, 0); \
        else                  bn_bf16_avx2_vectors(p, offset, count, c, MODE, 0, 0); \
        return;
    switch (p->mode) {
    FB_BN_BF16_AVX2_CASE(BN_BF16_FORWARD)
    FB_BN_BF16_AVX2_CASE(BN_BF16_EVAL_FORWARD)
    FB_BN_BF16_AVX2_CASE(BN_BF16_BACKWARD)
    default: FB_BN_BF16_AVX2_CASE(BN_BF16_BACKWARD_EVAL)
    }
#undef FB_BN_BF16_AVX2_CASE
}

/* Elements of out + offset before its next 32-byte boundary (at most len;
 * len when out is at an odd address: no aligned store ever). */
static inline fb_index bn_bf16_avx2_head(const uint16_t *out, fb_index len)
{
    if ((uintptr_t)out & 1u)
        return len;
    return fb_min_index(len, (fb_index)(((32u - ((uintptr_t)out & 31u)) & 31u) / 2u));
}

/* Fewer than 16 elements at `offset` (channel c; channels-last with `row`)
 * as one vector step on zero-padded copies of x and dy, its first `len`
 * results copied out (normal stores): the full vectors' operations, so
 * their bits, where the generic path (a float32 block, then the narrowing
 * loop) cost ~10x as much per element: with 2 KiB rows at a 16-byte
 * offset, the heads and tails of the runs took 15 % of the bfloat16 eval
 * forward's samples for 1.6 % of its elements (perf, (16,64,32,32), 1
 * thread). */
static void bn_bf16_avx2_staged(const bn_bf16_pass *p, fb_index offset, fb_index len, fb_index c,
                                int row)
{
    uint16_t x[16] = {0}, dy[16] = {0}, out[16];
    bn_bf16_pass staged = *p;
    if (p->x) {
        memcpy(x, p->x + offset, (size_t)len * sizeof(uint16_t));
        staged.x = x;
    }
    if (p->dy) {
        memcpy(dy, p->dy + offset, (size_t)len * sizeof(uint16_t));
        staged.dy = dy;
    }
    staged.out = out;
    staged.stream = 0;
    bn_bf16_avx2_vectors_any(&staged, 0, 1, c, row);
    memcpy(p->out + offset, out, (size_t)len * sizeof(uint16_t));
}

/* Channels-last elements [begin, end) (element e is channel e mod C) with
 * the generic row pieces (compute_row + narrow, normal stores). */
static void bn_bf16_rows_generic(const bn_bf16_pass *p, fb_index begin, fb_index end)
{
    float v[FB_BN_BF16_BLOCK];
    for (fb_index i = begin; i < end;) {
        const fb_index c0 = i % p->channels;
        const fb_index len = fb_min_index(fb_min_index(p->channels - c0, end - i), FB_BN_BF16_BLOCK);
        bn_bf16_compute_row(p, v, i, len, c0);
        fb_bn_bf16_narrow(v, p->out + i, len, p->instruction);
        i += len;
    }
}

/* `len` elements at `offset`, planar (one run, all of channel c) or, with
 * `row`, channels-last (one flat walk over whole rows: element e is channel
 * e mod C, c unused; each vector's channel index wraps at row ends, the
 * pair tables hold C + 16 entries): when streamed, the elements before the
 * output's first 32-byte boundary and after its last one staged (normal
 * stores), a full vector in a 64-byte line with either stored normally,
 * the vectors of the whole lines between streamed, and all of them through
 * the generic path when the output is at an odd address (never a streaming
 * store); else every full vector with
 * unaligned stores and the tail staged.  The channels-last form it replaced
 * computed each row into a float32 block and narrowed it with normal
 * stores (perf, (64,56,56,128) training forward, 1 thread: the row compute
 * and narrowing ~54 % of the kernel's samples). */
static void bn_bf16_avx2_walk(const bn_bf16_pass *p, fb_index offset, fb_index len, fb_index c,
                              int row)
{
    const fb_index C = p->channels;
    const fb_index head = p->stream ? bn_bf16_avx2_head(p->out + offset, len) : 0;
    if (head >= 16) {
        if (row)
            bn_bf16_rows_generic(p, offset, offset + len);
        else
            bn_bf16_rewrite_generic(p, offset, len, c);
        return;
    }
    if (head)
        bn_bf16_avx2_staged(p, offset, head, row ? offset % C : c, row);
    const fb_index first = offset + head, count = (len - head) / 16, done = first + 16 * count;
    /* streamed: the vectors of whole lines (bn_bf16_whole_lines); the one
     * sharing a line with the staged head or tail is stored normally */
    fb_index lines = first, lines_end = done; /* unstreamed: all of them */
    if (p->stream) {
        bn_bf16_whole_lines(p->out, first, done, &lines, &lines_end);
        if (lines == lines_end) /* no whole line: all of them stored normally */
            lines = lines_end = done;
    }
    if (lines_end > lines)
        bn_bf16_avx2_vectors_any(p, lines, (lines_end - lines) / 16, row ? lines % C : c, row);
    if (lines > first || done > lines_end) {
        bn_bf16_pass plain = *p;
        plain.stream = 0;
        if (lines > first)
            bn_bf16_avx2_vectors_any(&plain, first, (lines - first) / 16, row ? first % C : c, row);
        if (done > lines_end)
            bn_bf16_avx2_vectors_any(&plain, lines_end, (done - lines_end) / 16,
                                     row ? lines_end % C : c, row);
    }
    if (done < offset + len)
        bn_bf16_avx2_staged(p, done, offset + len - done, row ? done % C : c, row);
}

/* Full vectors [i, stop) of a planar stretch (out + i 32-byte aligned,
 * stop - i a multiple of 16, inner >= 16), each with a streaming store when
 * p->stream: the vectors inside a row by bn_bf16_avx2_vectors_any, a vector
 * across a row end (at most two rows) computed by the generic path into a
 * staging vector. */
static void bn_bf16_stretch_vectors_avx2(const bn_bf16_pass *p, fb_index i, fb_index stop)
{
    const fb_index inner = p->inner, C = p->channels;
    while (i < stop) {
        const fb_index row = i / inner, row_end = (row + 1) * inner;
        const fb_index count = (fb_min_index(row_end, stop) - i) / 16;
        if (count) {
            bn_bf16_avx2_vectors_any(p, i, count, row % C, 0);
            i += 16 * count;
            continue;
        }
        float v[16];
        uint16_t staged[16] __attribute__((aligned(32)));
        const fb_index first = row_end - i;
        bn_bf16_compute(p, v, i, first, row % C);
        bn_bf16_compute(p, v + first, row_end, 16 - first, (row + 1) % C);
        fb_bn_bf16_narrow(v, staged, 16, p->instruction);
        const __m256i h = _mm256_load_si256((const __m256i *)staged);
        if (p->stream)
            _mm256_stream_si256((__m256i *)(p->out + i), h);
        else
            _mm256_store_si256((__m256i *)(p->out + i), h);
        i += 16;
    }
}

/* Elements [begin, end) of a planar array in memory order (consecutive rows
 * of consecutive channels), channel of element e: (e / inner) % channels.
 * With a streamed output every 32-byte piece of the whole 64-byte lines
 * between the first and the last boundary is one streaming store, also
 * where it straddles two rows (its values then computed by the generic path
 * into a staging vector); the pieces of the two partial lines at the ends
 * are normal stores: a row end inside a line, written by run-by-run
 * rewrites with a normal store beside streaming ones, cost a memory round
 * trip per row.  Measured with
 * the usual 16-byte-aligned arrays against 64-byte-aligned ones (whose rows
 * of whole lines never split a line), (64,128,56,56), 1 thread, min CPU time
 * of 18 interleaved calls, load 5: eval forward 10.3 against 8.8 ms,
 * training forward 18.3 against 14.6 ms, before this walk. */
static void bn_bf16_fused_stretch_avx2(const bn_bf16_pass *p, fb_index begin, fb_index end)
{
    const fb_index inner = p->inner, C = p->channels;
    fb_index i = begin;
    if (!p->stream || inner < 16) {
        while (i < end) {
            const fb_index row = i / inner, stop = fb_min_index(end, (row + 1) * inner);
            bn_bf16_avx2_walk(p, i, stop - i, row % C, 0);
            i = stop;
        }
        return;
    }
    const fb_index head = bn_bf16_avx2_head(p->out + begin, end - begin);
    const fb_index aligned_end = head < end - begin ? end - (end - begin - head) % 16 : begin + head;
    /* the head and the tail: normal stores, row by row */
    for (int side = 0; side < 2; ++side) {
        fb_index a = side ? aligned_end : begin;
        const fb_index b = side ? end : begin + head;
        while (a < b) {
            const fb_index row = a / inner, stop = fb_min_index(b, (row + 1) * inner);
            bn_bf16_rewrite_generic(p, a, stop - a, row % C);
            a = stop;
        }
    }
    /* between: streamed over the whole lines (bn_bf16_whole_lines); the
     * vector that shares a line with the head or the tail (at most one at
     * each end) is stored normally */
    i = begin + head;
    fb_index lines, lines_end;
    bn_bf16_whole_lines(p->out, i, aligned_end, &lines, &lines_end);
    bn_bf16_pass plain = *p;
    plain.stream = 0;
    bn_bf16_stretch_vectors_avx2(&plain, i, lines);
    bn_bf16_stretch_vectors_avx2(p, lines, lines_end);
    bn_bf16_stretch_vectors_avx2(&plain, lines_end, aligned_end);
}
