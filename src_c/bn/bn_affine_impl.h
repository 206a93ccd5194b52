/* bn_affine_impl.h -- template (FB_REAL, FB_DTYPE): the per-channel map
 * y = (x - mean[c]) * scale[c] + shift[c] of the eval-mode forward.
 * Included once per dtype by bn_kernels.c.
 *
 * Cost: one read and one write of x (streaming stores when y is large, see
 * bn_span_impl.h); one subtraction and one FMA per element.  Work is split into
 * equal contiguous element ranges, one per thread, whatever the layout, so a
 * single huge channel or a tiny spatial size still uses every thread.
 */

/* ---- affine map over an element range ------------------------------------ */

/* Elements [begin, end) of the (outer, channels, inner) array. */
static void FB_TYPED(bn_affine_range)(const FB_REAL *x, FB_REAL *y,
                                      const FB_REAL *restrict mean,
                                      const FB_REAL *restrict scale,
                                      const FB_REAL *restrict shift,
                                      fb_index channels, fb_index inner,
                                      fb_index begin, fb_index end, int stream, int relu)
{
    if (inner == 1) {
        /* channels-last: one flat stretch, the channel wrapping (bn_span_wrap;
         * the coefficient arrays are wrapped) */
        FB_TYPED(bn_span_wrap)(y + begin, x + begin, NULL, end - begin, begin % channels,
                               channels, mean, scale, shift, NULL, NULL, NULL, stream, relu);
    } else {
        /* channels-first rows of `inner` elements share one coefficient */
        fb_index row = begin / inner, col = begin - row * inner;
        while (begin < end) {
            const fb_index len = fb_min_index(inner - col, end - begin);
            const fb_index c = row % channels, offset = row * inner + col;
            FB_TYPED(bn_span)(y + offset, x + offset, NULL, len, mean[c], scale[c], shift[c], 0,
                              stream, relu, 0, 0);
            begin += len;
            col = 0;
            ++row;
        }
    }
}

/* The whole array, in parallel when it is large enough. */
static void FB_TYPED(bn_affine)(const FB_REAL *x, FB_REAL *y, const FB_REAL *mean,
                                const FB_REAL *scale, const FB_REAL *shift,
                                fb_index outer, fb_index channels,
                                fb_index inner, int relu, int num_threads)
{
    const fb_index total = outer * channels * inner;
    /* bytes moved: x read, y written */
    const int nt = fb_threads_for_bytes(2 * total * (fb_index)sizeof(FB_REAL), num_threads);
    const int stream = total * (fb_index)sizeof(FB_REAL) >= FB_BN_STREAM_BYTES;
    if (nt <= 1) {
        /* not even an if(0) region: libgomp's team setup costs ~0.3 us */
        FB_TYPED(bn_affine_range)(x, y, mean, scale, shift, channels, inner, 0, total, stream,
                                  relu);
        if (stream)
            fb_stream_fence();
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        fb_index begin, end;
        fb_split_range(total, fb_team_size(), fb_thread_id(), &begin, &end);
        FB_TYPED(bn_affine_range)(x, y, mean, scale, shift, channels, inner, begin, end,
                                  stream, relu);
        if (stream)
            fb_stream_fence();
    }
}

/* ---- eval-mode forward ---------------------------------------------------- */

static int FB_TYPED(bn_eval_forward)(FASTBN_BN_EVAL_FORWARD_ARGS(FB_REAL))
{
    if (outer < 0 || channels <= 0 || inner < 0 || !x || !y || !running_mean || !running_var)
        return FASTBN_ERR_ARGUMENT;
    /* scale, shift and a copy of running_mean, each wrapped (channels +
     * FB_BN_WRAP_PAD long, the pad mirrored as soon as the entries are set:
     * bn_wrap_mirror), whatever the layout, so that any walk bn_affine_range
     * takes may wrap */
    const fb_index stride = channels + FB_BN_WRAP_PAD;
    FB_REAL *coefficients = (FB_REAL *)malloc(3 * (size_t)stride * sizeof(FB_REAL));
    if (!coefficients)
        return FASTBN_ERR_NOMEM;
    FB_REAL *scale = coefficients, *shift = coefficients + stride;
    FB_REAL *mean = coefficients + 2 * stride;
    /* running_var + eps == 0 gives scale = +-inf (NaN with weight 0): y is
     * then +-inf where x != running_mean and NaN where x == running_mean
     * (0 * inf), the IEEE value of (x - mean) / sqrt(var + eps) * weight +
     * bias -- as the reference computes it; no special case */
    for (fb_index c = 0; c < channels; ++c)
        FB_TYPED(bn_normalize_coefficients)(1.0 / sqrt((double)running_var[c] + eps), weight,
                                            bias, c, scale + c, shift + c);
    memcpy(mean, running_mean, (size_t)channels * sizeof(FB_REAL));
    FB_TYPED(bn_wrap_extend)(mean, channels);
    FB_TYPED(bn_wrap_extend)(scale, channels);
    FB_TYPED(bn_wrap_extend)(shift, channels);
    FB_TYPED(bn_affine)(x, y, mean, scale, shift, outer, channels, inner, relu,
                        num_threads);
    free(coefficients);
    return FASTBN_OK;
}
