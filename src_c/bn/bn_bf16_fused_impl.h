/* bn_bf16_fused_impl.h -- the fused rewrite of the bfloat16 batch-norm
 * kernels (AVX-512 build), included by bn_bf16_impl.h once per narrowing:
 *   FB_BN_BF16_FUSED_NAME     the function's name;
 *   FB_BN_BF16_FUSED_ATTR     its attributes (the AVX512_BF16 target for the
 *                             instruction form, empty otherwise);
 *   FB_BN_BF16_FUSED_NARROW   __m512 -> __m256i, bit-identical to
 *                             fb_bn_bf16_round lane by lane.
 * One run of elements [offset, offset + len): planar (`row` 0: every element
 * is channel c, coefficients broadcast) or a channels-last stretch of any
 * length (`row` 1: element i is channel (c + i) % C, coefficients loaded per
 * vector from the wrapped arrays, entry C + j == entry j % C, so one stretch
 * runs across row ends and pays a masked head and tail once, not per row).  The same
 * float32 operations as bn_bf16_compute / bn_bf16_compute_row followed by the
 * narrowing, in registers (no float32 block), with non-temporal stores when
 * p->stream (the output is not read again by the pass).  Same bits as
 * compute + narrow: widening is a 16-bit shift, sub/fma/mul are the IEEE
 * operations, the relu tests are the same ordered comparisons. */

#define FB_BN_BF16_CAT2(a, b) a##b
#define FB_BN_BF16_CAT(a, b) FB_BN_BF16_CAT2(a, b)
#define FB_BN_BF16_STEP FB_BN_BF16_CAT(FB_BN_BF16_FUSED_NAME, _step)
#define FB_BN_BF16_BODY FB_BN_BF16_CAT(FB_BN_BF16_FUSED_NAME, _body)

/* The float32 result of 16 elements at i (lanes outside `mask` read as 0 and
 * are not stored); with `row`, element i is channel c (wrapped arrays).
 * mode/relu/row are constants in every inlined copy. */
FB_BN_BF16_FUSED_ATTR
static inline __attribute__((always_inline)) __m512 FB_BN_BF16_STEP(
    const bn_bf16_pass *p, const uint16_t *restrict x, const uint16_t *restrict dy, fb_index c,
    fb_index i, int full, __mmask16 mask, const int mode, const int relu, const int row,
    __m512 m, __m512 k1, __m512 k2, __m512 k3, __m512 ms, __m512 mh)
{
    const __m512 zero = _mm512_setzero_ps();
    const int forward = mode == BN_BF16_FORWARD || mode == BN_BF16_EVAL_FORWARD;
    const int need_x = forward || mode == BN_BF16_BACKWARD || relu;
    if (row) {
#define FB_BN_BF16_COEF(a) (full ? _mm512_loadu_ps((a) + c) : _mm512_maskz_loadu_ps(mask, (a) + c))
        if (need_x)
            m = FB_BN_BF16_COEF(p->center);
        k1 = FB_BN_BF16_COEF(p->k1);
        if (forward || mode == BN_BF16_BACKWARD)
            k3 = FB_BN_BF16_COEF(p->k3);
        if (mode == BN_BF16_BACKWARD)
            k2 = FB_BN_BF16_COEF(p->k2);
        if (relu && !forward) {
            ms = FB_BN_BF16_COEF(p->mask_scale);
            mh = FB_BN_BF16_COEF(p->mask_shift);
        }
#undef FB_BN_BF16_COEF
    }
    const __m512 xc = need_x ? _mm512_sub_ps(full ? fb_bf16_widen16(x + i)
                                                  : fb_bf16_widen16_mask(x + i, mask), m)
                             : zero;
    if (forward) {
        const __m512 v = _mm512_fmadd_ps(xc, k1, k3);
        return relu ? _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero) : v;
    }
    __m512 g = full ? fb_bf16_widen16(dy + i) : fb_bf16_widen16_mask(dy + i, mask);
    if (relu)
        g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_fmadd_ps(xc, ms, mh),
                                                   _mm512_set1_ps(FLT_MIN), _CMP_GE_OQ), g);
    return mode == BN_BF16_BACKWARD ? _mm512_fmadd_ps(g, k1, _mm512_fmadd_ps(xc, k2, k3))
                                    : _mm512_mul_ps(g, k1);
}

/* Masked pieces up to the output's next 32-byte boundary and at the end,
 * full aligned vectors between, streamed over the run's whole lines when
 * p->stream: the loop bodies then have no branch (a per-vector
 * piece/mode/alignment decision measured ~2x slower on channels-last rows
 * of 128 channels). */
FB_BN_BF16_FUSED_ATTR
static inline __attribute__((always_inline)) void FB_BN_BF16_BODY(
    const bn_bf16_pass *p, fb_index offset, fb_index len, fb_index c, const int mode,
    const int relu, const int row)
{
    const uint16_t *restrict x = p->x ? p->x + offset : NULL;
    const uint16_t *restrict dy = p->dy ? p->dy + offset : NULL;
    uint16_t *restrict out = p->out + offset;
    const __m512 m = _mm512_set1_ps(p->center[c]), k1 = _mm512_set1_ps(p->k1[c]);
    const __m512 k2 = _mm512_set1_ps(p->k2[c]), k3 = _mm512_set1_ps(p->k3[c]);
    const __m512 ms = _mm512_set1_ps(p->mask_scale[c]), mh = _mm512_set1_ps(p->mask_shift[c]);
    const int stream = p->stream;
    /* row: cc is the channel of element i; a vector advances it by 16 % C
     * (cc + step < 2C: one subtraction), a head piece by its length */
    const fb_index channels = p->channels, step = row ? 16 % channels : 0;
    fb_index cc = c;
#define FB_BN_BF16_ADVANCE(count)                     \
    do {                                              \
        if (row && (count) == 16) {                   \
            cc += step;                               \
            if (cc >= channels)                       \
                cc -= channels;                       \
        } else if (row) {                             \
            cc = (cc + (count)) % channels;           \
        }                                             \
    } while (0)
    fb_index i = 0;
    if ((uintptr_t)out & 1u) {
        /* defensive (the bridge refuses unaligned outputs): an odd address never
         * reaches a 32-byte boundary in 2-byte steps: unaligned stores, no
         * streaming */
        for (; i + 16 <= len; i += 16) {
            const __m512 v = FB_BN_BF16_STEP(p, x, dy, cc, i, 1, 0xFFFF, mode, relu, row,
                                             m, k1, k2, k3, ms, mh);
            _mm256_storeu_si256((__m256i *)(out + i), FB_BN_BF16_FUSED_NARROW(v));
            FB_BN_BF16_ADVANCE(16);
        }
    } else {
        const fb_index misaligned = (fb_index)(((uintptr_t)out & 31u) / 2u);
        if (misaligned) {
            const fb_index piece = fb_min_index(len, 16 - misaligned);
            const __mmask16 mask = (__mmask16)((1u << piece) - 1u);
            const __m512 v = FB_BN_BF16_STEP(p, x, dy, cc, 0, 0, mask, mode, relu, row,
                                             m, k1, k2, k3, ms, mh);
            _mm256_mask_storeu_epi16(out, mask, FB_BN_BF16_FUSED_NARROW(v));
            FB_BN_BF16_ADVANCE(piece);
            i = piece;
        }
        /* streamed: only the run's whole lines (bn_bf16_whole_lines) */
        fb_index lines = i, lines_end = i;
        if (stream)
            bn_bf16_whole_lines(out, i, len, &lines, &lines_end);
        for (; i < lines; i += 16) { /* at most one vector: out + i is 32-byte aligned */
            _mm256_store_si256((__m256i *)(out + i), FB_BN_BF16_FUSED_NARROW(FB_BN_BF16_STEP(
                p, x, dy, cc, i, 1, 0xFFFF, mode, relu, row, m, k1, k2, k3, ms, mh)));
            FB_BN_BF16_ADVANCE(16);
        }
        for (; i < lines_end; i += 16) {
            _mm256_stream_si256((__m256i *)(out + i), FB_BN_BF16_FUSED_NARROW(FB_BN_BF16_STEP(
                p, x, dy, cc, i, 1, 0xFFFF, mode, relu, row, m, k1, k2, k3, ms, mh)));
            FB_BN_BF16_ADVANCE(16);
        }
        for (; i + 16 <= len; i += 16) {
            _mm256_store_si256((__m256i *)(out + i), FB_BN_BF16_FUSED_NARROW(FB_BN_BF16_STEP(
                p, x, dy, cc, i, 1, 0xFFFF, mode, relu, row, m, k1, k2, k3, ms, mh)));
            FB_BN_BF16_ADVANCE(16);
        }
    }
    if (i < len) {
        const __mmask16 mask = (__mmask16)((1u << (len - i)) - 1u);
        const __m512 v = FB_BN_BF16_STEP(p, x, dy, cc, i, 0, mask, mode, relu, row, m, k1, k2, k3, ms, mh);
        _mm256_mask_storeu_epi16(out + i, mask, FB_BN_BF16_FUSED_NARROW(v));
    }
#undef FB_BN_BF16_ADVANCE
}

FB_BN_BF16_FUSED_ATTR
static void FB_BN_BF16_FUSED_NAME(const bn_bf16_pass *p, fb_index offset, fb_index len,
                                  fb_index c, int row)
{
#define FB_BN_BF16_CASE(MODE)                                                     \
    case MODE:                                                                    \
        if (row && p->relu)       FB_BN_BF16_BODY(p, offset, len, c, MODE, 1, 1); \
        else if (row)             FB_BN_BF16_BODY(p, offset, len, c, MODE, 0, 1); \
        else if (p->relu)         FB_BN_BF16_BODY(p, offset, len, c, MODE, 1, 0); \
        else                      FB_BN_BF16_BODY(p, offset, len, c, MODE, 0, 0); \
        return;
    switch (p->mode) {
    FB_BN_BF16_CASE(BN_BF16_FORWARD)
    FB_BN_BF16_CASE(BN_BF16_EVAL_FORWARD)
    FB_BN_BF16_CASE(BN_BF16_BACKWARD)
    default: FB_BN_BF16_CASE(BN_BF16_BACKWARD_EVAL)
    }
#undef FB_BN_BF16_CASE
}

#undef FB_BN_BF16_STEP
#undef FB_BN_BF16_BODY
#undef FB_BN_BF16_FUSED_NAME
#undef FB_BN_BF16_FUSED_ATTR
#undef FB_BN_BF16_FUSED_NARROW
