/* bn_relu_impl.h -- template (FB_REAL, FB_DTYPE): what batch norm + ReLU adds
 * to the batch-norm kernels, so that the fused layer costs what batch norm
 * alone costs.  Included once per dtype by bn_kernels.c, before the span,
 * affine and training templates that use it.
 *
 * Forward: the rewrite's output goes through bn_activate (the ReLU) before
 * it is stored: y = max((x - mean) * scale + shift, 0), NaN passed through as
 * in torch.  No second pass over y.
 *
 * Backward: the ReLU's gradient mask is NOT stored or read: it is recomputed
 * from x, which the batch-norm backward reads anyway, as
 * (x - mean) * scale + shift > 0 with the forward's own mean and
 * coefficients (bn_relu_masked).  The planar reduction lanes and the planar
 * training rewrite mask dy in their own loops; the interleaved
 * (channels-last) row loops and the eval backward's rewrite, which does not
 * read x, first mask a row or a block of dy into a small stack buffer
 * (bn_relu_mask*).  Traffic: dy and x in, dx out, exactly the batch-norm
 * backward's; the unfused pair also reads y and writes and re-reads the
 * masked gradient.
 *
 * The mask is exactly the forward's output sign because both evaluate the
 * same expression, (x - mean) * scale + shift, on the same FB_REAL values:
 * mean is the saved mean (training) or running_mean (eval), which the
 * backward receives, scale comes from bn_normalize_coefficients on the same
 * double statistics (the fused training forward derives it from the ROUNDED
 * saved invstd, which is all the backward has), shift is the bias; and the
 * compiler contracts it the same way in both loops (one subtraction, then
 * one FMA on targets that have it, else a multiply and an add).
 */

#ifndef FB_BN_RELU_BLOCK
/* Values of dy staged (masked) at a time: 4 KiB of float64 on the stack,
 * small enough for L1, large enough to amortize the loop set-up. */
#define FB_BN_RELU_BLOCK ((fb_index)512)
/* an interleaved row piece (FB_BN_MAX_GROUP_WIDTH channels) fits one block */
typedef char fb_bn_relu_block_holds_a_row[FB_BN_MAX_GROUP_WIDTH <= FB_BN_RELU_BLOCK ? 1 : -1];
#endif

/* The coefficients of y = (x - mean) * scale + shift: scale = weight *
 * invstd, computed in double and rounded once; shift = bias.  The forwards'
 * coefficients (train and eval) and the backward's ReLU-mask coefficients.
 * Centering first, instead of folding the mean into the shift
 * (x * scale + (bias - mean * scale)), is what keeps large means accurate:
 * x - mean is exact for x near mean, where the folded form loses the
 * low bits of x * scale to the cancellation against the shift. */
static inline void FB_TYPED(bn_normalize_coefficients)(double invstd, const FB_REAL *weight,
                                                       const FB_REAL *bias, fb_index c,
                                                       FB_REAL *scale, FB_REAL *shift)
{
    *scale = (FB_REAL)((weight ? (double)weight[c] : 1.0) * invstd);
    *shift = bias ? bias[c] : (FB_REAL)0;
}

/* max(v, 0) when relu; NaN stays NaN (NaN < 0 is false). */
static inline FB_REAL FB_TYPED(bn_activate)(FB_REAL v, int relu)
{
    return relu && v < 0 ? (FB_REAL)0 : v;
}

/* dy, or 0 where the pre-activation (x - mean) * scale + shift is <= 0 (or
 * NaN). */
static inline FB_REAL FB_TYPED(bn_relu_masked)(FB_REAL dy, FB_REAL x, FB_REAL mean,
                                               FB_REAL scale, FB_REAL shift)
{
    return (x - mean) * scale + shift > 0 ? dy : (FB_REAL)0;
}

/* bn_relu_masked for scalar code (the reductions' run tails): the same
 * value, dy or +0, selected by clearing dy's bits rather than by a branch.
 * GCC compiled the conditional in those tails as a jump; on random signs
 * it is mispredicted about every other value, and short planar rows are
 * mostly tail: (128,64,3,3) float32 (rows of 9 values) took 780 us for the
 * ReLU backward against 240 us for the plain one (1 thread, thread CPU
 * time, mean of 3000 calls, load 2-4; the profile showed the tail's
 * out-of-line zeroing blocks). */
static inline FB_REAL FB_TYPED(bn_relu_masked_scalar)(FB_REAL dy, FB_REAL x, FB_REAL mean,
                                                      FB_REAL scale, FB_REAL shift)
{
    const FB_REAL pre = (x - mean) * scale + shift;
    FB_REAL_BITS bits;
    memcpy(&bits, &dy, sizeof bits);
    bits &= (FB_REAL_BITS)0 - (FB_REAL_BITS)(pre > 0);
    memcpy(&dy, &bits, sizeof bits);
    return dy;
}

#if FB_BN_HAVE_VECTORS
#define FB_RVEC FB_TYPED(fb_rvec)
FB_ALWAYS_INLINE FB_RVEC FB_TYPED(bn_activate_vec)(FB_RVEC v, int relu)
{
    if (!relu)
        return v;
    const FB_RVEC zero = FB_TYPED(fb_rvec_broadcast)(0);
    /* all-ones integer lanes where v < 0: clear those (-> +0.0); NaN lanes
     * compare false and stay NaN */
    const __typeof__(v < zero) negative = v < zero;
    return (FB_RVEC)((__typeof__(negative))v & ~negative);
}

/* bn_relu_masked on vectors, given the centered x - mean */
FB_ALWAYS_INLINE FB_RVEC FB_TYPED(bn_relu_mask_vec)(FB_RVEC dy, FB_RVEC centered, FB_RVEC scale,
                                                FB_RVEC shift)
{
    const FB_RVEC zero = FB_TYPED(fb_rvec_broadcast)(0);
    const FB_RVEC pre = centered * scale + shift;
    const __typeof__(pre > zero) keep = pre > zero;
    return (FB_RVEC)((__typeof__(keep))dy & keep);
}
#undef FB_RVEC
#endif

/* g = dy where the pre-activation (x - mean) * scale + shift is > 0, else 0
 * (one channel: planar runs).  g must not alias dy or x. */
static inline void FB_TYPED(bn_relu_mask)(FB_REAL *restrict g, const FB_REAL *restrict dy,
                                          const FB_REAL *restrict x, fb_index len,
                                          FB_REAL mean, FB_REAL scale, FB_REAL shift)
{
#pragma omp simd
    for (fb_index i = 0; i < len; ++i)
        g[i] = FB_TYPED(bn_relu_masked)(dy[i], x[i], mean, scale, shift);
}

/* The same along a channels-last row: element i belongs to channel i. */
static inline void FB_TYPED(bn_relu_mask_channels)(FB_REAL *restrict g,
                                                   const FB_REAL *restrict dy,
                                                   const FB_REAL *restrict x, fb_index len,
                                                   const FB_REAL *restrict mean,
                                                   const FB_REAL *restrict scale,
                                                   const FB_REAL *restrict shift)
{
#pragma omp simd
    for (fb_index i = 0; i < len; ++i)
        g[i] = FB_TYPED(bn_relu_masked)(dy[i], x[i], mean[i], scale[i], shift[i]);
}
