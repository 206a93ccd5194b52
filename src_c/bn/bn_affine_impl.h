/* bn_affine_impl.h -- template (FB_REAL, FB_DTYPE): the per-channel map
 * y = (x - mean[c]) * scale[c] + shift[c] of the eval-mode forward, and the
 * straight walk it runs on, shared with the split phases' rewrites.
 * Included once per dtype by bn_kernels.c.
 *
 * Cost: one read and one write of x (streaming stores when y is large, see
 * bn_span_impl.h); one subtraction and one FMA per element.  Work is split into
 * equal contiguous element ranges, one per thread, whatever the layout, so a
 * single huge channel or a tiny spatial size still uses every thread.
 */

/* ---- straight rewrite over an element range -------------------------------
 * The rewrites that need no reduction first (the eval forward, and the split
 * phases apply and backward_apply, bn_train_impl.h) walk the array once in
 * memory order, through bn_span / bn_span_wrap with per-channel coefficients:
 *
 *   x == NULL:  out = act((in - m[c]) * a[c] + b[c])
 *   otherwise:  out = g * a[c] + ((x - m[c]) * b[c] + d[c]),  g = in, masked
 *               with relu where (x - m[c]) * ms[c] + mh[c] <= 0
 *
 * (the forms of bn_span_impl.h).  The array is viewed as (outer, channels,
 * inner) whose rows are `row_channels` channels apart (a channel sub-range of
 * a planar array, bn_kernels.h; row_channels == channels otherwise); channels-
 * last arrays (inner == 1) take no sub-range and their coefficient arrays are
 * wrapped (bn_span_wrap).  Elementwise, so any cut into ranges (threads)
 * gives the same values. */
typedef struct {
    const FB_REAL *m, *a, *b, *d;   /* d: NULL in the x == NULL form */
    const FB_REAL *ms, *mh;         /* relu mask of the x form, else NULL */
} FB_TYPED(bn_straight_coefficients);

/* Logical elements [begin, end), numbered as in a C-contiguous (outer,
 * channels, inner) array. */
static void FB_TYPED(bn_straight_range)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                        const FB_TYPED(bn_straight_coefficients) *k,
                                        fb_index channels, fb_index row_channels,
                                        fb_index inner, fb_index begin, fb_index end,
                                        int stream, int relu)
{
    if (inner == 1) {
        /* channels-last: one flat stretch, the channel wrapping */
        FB_TYPED(bn_span_wrap)(out + begin, in + begin, x ? x + begin : NULL, end - begin,
                               begin % channels, channels, k->m, k->a, k->b, k->d, k->ms, k->mh,
                               stream, relu);
        return;
    }
    /* channels-first rows of `inner` elements share one coefficient; logical
     * row q = r * channels + c is at (r * row_channels + c) * inner */
    const fb_index q = begin / inner;
    fb_index col = begin - q * inner, r = q / channels, c = q - r * channels;
    while (begin < end) {
        const fb_index len = fb_min_index(inner - col, end - begin);
        const fb_index offset = (r * row_channels + c) * inner + col;
        FB_TYPED(bn_span)(out + offset, in + offset, x ? x + offset : NULL, len, k->m[c],
                          k->a[c], k->b[c], k->d ? k->d[c] : (FB_REAL)0, stream, relu,
                          k->ms ? k->ms[c] : (FB_REAL)0, k->mh ? k->mh[c] : (FB_REAL)0);
        begin += len;
        col = 0;
        if (++c == channels) {
            c = 0;
            ++r;
        }
    }
}

/* The whole (outer, channels, inner) array on `nt` threads, each an equal
 * contiguous element range: a single huge channel or a tiny spatial size
 * still uses every thread. */
static void FB_TYPED(bn_straight)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                  const FB_TYPED(bn_straight_coefficients) *k, fb_index outer,
                                  fb_index channels, fb_index row_channels, fb_index inner,
                                  int stream, int relu, int nt)
{
    const fb_index total = outer * channels * inner;
    if (total <= 0)
        return;  /* (nothing to write; inner may be 0) */
    if (nt <= 1) {
        /* not even an if(0) region: libgomp's team setup costs ~0.3 us */
        FB_TYPED(bn_straight_range)(out, in, x, k, channels, row_channels, inner, 0, total,
                                    stream, relu);
        if (stream)
            fb_stream_fence();
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        fb_index begin, end;
        fb_split_range(total, fb_team_size(), fb_thread_id(), &begin, &end);
        FB_TYPED(bn_straight_range)(out, in, x, k, channels, row_channels, inner, begin, end,
                                    stream, relu);
        if (stream)
            fb_stream_fence();
    }
}

/* bn_straight over a whole array's written channels: streamed by
 * fb_bn_stream_output (by the size of the whole array: a channel range of a
 * large one is one of a sequence of calls that together write all of it),
 * on the threads that `arrays` arrays of its size (inputs read and output
 * written) call for. */
static void FB_TYPED(bn_straight_all)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                      const FB_TYPED(bn_straight_coefficients) *k,
                                      fb_index outer, fb_index channels, fb_index row_channels,
                                      fb_index inner, int relu, int arrays, int num_threads)
{
    const fb_index bytes = outer * channels * inner * (fb_index)sizeof(FB_REAL);
    FB_TYPED(bn_straight)(out, in, x, k, outer, channels, row_channels, inner,
                          fb_bn_stream_output(outer, channels, row_channels, inner,
                                              (fb_index)sizeof(FB_REAL)),
                          relu, fb_threads_for_bytes(arrays * bytes, num_threads));
}

/* ---- eval-mode forward ---------------------------------------------------- */

static int FB_TYPED(bn_eval_forward)(FASTBN_BN_EVAL_FORWARD_ARGS(FB_REAL))
{
    if (outer < 0 || channels <= 0 || inner < 0 || !x || !y || !running_mean || !running_var)
        return FASTBN_ERR_ARGUMENT;
    /* scale, shift and a copy of running_mean, each wrapped (channels +
     * FB_BN_WRAP_PAD long, the pad mirrored as soon as the entries are set:
     * bn_wrap_mirror), whatever the layout, so that any walk bn_straight
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
    /* a single channel is one contiguous sequence: one span, as the split
     * phases walk it (bn_phase_geometry, bn_train_impl.h), not `outer` spans
     * of `inner` values -- (262144, 1, 4) float32 took 3.0 ms row by row, 0.44
     * ms as one span (1 thread, min of 40 calls, load 2.6) */
    if (channels == 1) {
        inner *= outer;
        outer = 1;
    }
    const FB_TYPED(bn_straight_coefficients) k = {mean, scale, shift, NULL, NULL, NULL};
    /* x read, y written */
    FB_TYPED(bn_straight_all)(y, x, NULL, &k, outer, channels, channels, inner, relu, 2,
                              num_threads);
    free(coefficients);
    return FASTBN_OK;
}
