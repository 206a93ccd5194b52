/* bn_span_impl.h -- template (FB_REAL, FB_DTYPE): the elementwise rewrite of
 * one contiguous span, which every batch-norm kernel ends in.  Included once
 * per dtype by bn_kernels.c, before the kernels that use it.
 *
 *   x == NULL:  out = act((in - m) * a + b)        (normalize: in = x, m = mean;
 *                                                   eval backward: in = dy,
 *                                                   m = b = 0)
 *   otherwise:  out = in * a + ((x - m) * b + d)   (training backward: in = dy,
 *                                                   m = saved mean)
 *
 * The mean is subtracted, never folded into the constant (x * a + (b - m * a)
 * cancels catastrophically when |m| >> the spread; see bn_relu_impl.h): one
 * subtraction per element, hidden under the memory traffic.
 *
 * With `relu` (fused batch norm + ReLU, bn_relu_impl.h): act is the ReLU;
 * in bn_span's training-backward form, `in` (dy) is first masked where
 * (x - m) * mask_scale + mask_shift <= 0.  Without: act is the identity and
 * the mask coefficients are ignored.
 *
 * bn_span takes scalar coefficients (a channels-first run: one channel);
 * bn_span_channels takes per-element coefficient arrays (a channels-last
 * row: element i belongs to channel i).
 *
 * `stream`: write with non-temporal stores.  For outputs far larger than the
 * caches, a normal store first reads the line it overwrites (a third memory
 * stream) and evicts input that a second pass still wants; a streaming store
 * does neither.  The caller decides (FB_BN_STREAM_BYTES) and issues
 * fb_stream_fence() before the data is handed on.
 *
 * out may equal in or x: every element is read before it is written.
 */

#if FB_BN_HAVE_VECTORS

#define FB_RVEC FB_TYPED(fb_rvec)
#define FB_RVEC_LEN FB_CAT(FB_RVEC_LEN, FB_DTYPE)

/* Elements before out + i is aligned for a streaming vector store; `len`
 * when out is not even aligned to its element size. */
static inline fb_index FB_TYPED(bn_stream_head)(const FB_REAL *out, fb_index len)
{
    const uintptr_t address = (uintptr_t)out, vector_bytes = sizeof(FB_RVEC);
    if (address % sizeof(FB_REAL))
        return len;
    const fb_index head = (fb_index)(((vector_bytes - address % vector_bytes) % vector_bytes)
                                     / sizeof(FB_REAL));
    return head < len ? head : len;
}

static void FB_TYPED(bn_span_stream)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                     fb_index len, FB_REAL m, FB_REAL a, FB_REAL b, FB_REAL d,
                                     int relu, FB_REAL mask_scale, FB_REAL mask_shift)
{
    const fb_index head = FB_TYPED(bn_stream_head)(out, len);
    fb_index i = 0;
    const FB_RVEC vm = FB_TYPED(fb_rvec_broadcast)(m);
    const FB_RVEC va = FB_TYPED(fb_rvec_broadcast)(a), vb = FB_TYPED(fb_rvec_broadcast)(b);
    if (!x) {
        for (; i < head; ++i)
            out[i] = FB_TYPED(bn_activate)((in[i] - m) * a + b, relu);
        for (; i + FB_RVEC_LEN <= len; i += FB_RVEC_LEN)
            FB_TYPED(fb_rvec_stream)(out + i, FB_TYPED(bn_activate_vec)(
                (FB_TYPED(fb_rvec_load)(in + i) - vm) * va + vb, relu));
        for (; i < len; ++i)
            out[i] = FB_TYPED(bn_activate)((in[i] - m) * a + b, relu);
        return;
    }
    const FB_RVEC vd = FB_TYPED(fb_rvec_broadcast)(d);
    const FB_RVEC vscale = FB_TYPED(fb_rvec_broadcast)(mask_scale);
    const FB_RVEC vshift = FB_TYPED(fb_rvec_broadcast)(mask_shift);
#define FB_GRAD(i) \
    (relu ? FB_TYPED(bn_relu_masked)(in[i], x[i], m, mask_scale, mask_shift) : in[i])
    for (; i < head; ++i)
        out[i] = FB_GRAD(i) * a + ((x[i] - m) * b + d);
    for (; i + FB_RVEC_LEN <= len; i += FB_RVEC_LEN) {
        const FB_RVEC xc = FB_TYPED(fb_rvec_load)(x + i) - vm;
        FB_RVEC g = FB_TYPED(fb_rvec_load)(in + i);
        if (relu)
            g = FB_TYPED(bn_relu_mask_vec)(g, xc, vscale, vshift);
        FB_TYPED(fb_rvec_stream)(out + i, g * va + (xc * vb + vd));
    }
    for (; i < len; ++i)
        out[i] = FB_GRAD(i) * a + ((x[i] - m) * b + d);
#undef FB_GRAD
}

static void FB_TYPED(bn_span_channels_stream)(FB_REAL *out, const FB_REAL *in,
                                              const FB_REAL *x, fb_index len,
                                              const FB_REAL *m, const FB_REAL *a,
                                              const FB_REAL *b, const FB_REAL *d, int relu)
{
    const fb_index head = FB_TYPED(bn_stream_head)(out, len);
    fb_index i = 0;
#define FB_LOAD(p) FB_TYPED(fb_rvec_load)(p)
    if (!x) {
        for (; i < head; ++i)
            out[i] = FB_TYPED(bn_activate)((in[i] - m[i]) * a[i] + b[i], relu);
        for (; i + FB_RVEC_LEN <= len; i += FB_RVEC_LEN)
            FB_TYPED(fb_rvec_stream)(out + i, FB_TYPED(bn_activate_vec)(
                (FB_LOAD(in + i) - FB_LOAD(m + i)) * FB_LOAD(a + i) + FB_LOAD(b + i), relu));
        for (; i < len; ++i)
            out[i] = FB_TYPED(bn_activate)((in[i] - m[i]) * a[i] + b[i], relu);
        return;
    }
    for (; i < head; ++i)
        out[i] = in[i] * a[i] + ((x[i] - m[i]) * b[i] + d[i]);
    for (; i + FB_RVEC_LEN <= len; i += FB_RVEC_LEN)
        FB_TYPED(fb_rvec_stream)(out + i, FB_LOAD(in + i) * FB_LOAD(a + i)
                                 + ((FB_LOAD(x + i) - FB_LOAD(m + i)) * FB_LOAD(b + i)
                                    + FB_LOAD(d + i)));
    for (; i < len; ++i)
        out[i] = in[i] * a[i] + ((x[i] - m[i]) * b[i] + d[i]);
#undef FB_LOAD
}

#undef FB_RVEC
#undef FB_RVEC_LEN
#define FB_BN_CAN_STREAM 1
#else
#define FB_BN_CAN_STREAM 0
#endif

static inline void FB_TYPED(bn_span)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                     fb_index len, FB_REAL m, FB_REAL a, FB_REAL b, FB_REAL d,
                                     int stream, int relu, FB_REAL mask_scale,
                                     FB_REAL mask_shift)
{
#if FB_BN_CAN_STREAM
    if (stream) {
        FB_TYPED(bn_span_stream)(out, in, x, len, m, a, b, d, relu, mask_scale, mask_shift);
        return;
    }
#else
    (void)stream;
#endif
    if (!x) {
#pragma omp simd
        for (fb_index i = 0; i < len; ++i)
            out[i] = FB_TYPED(bn_activate)((in[i] - m) * a + b, relu);
    } else if (!relu) {
#pragma omp simd
        for (fb_index i = 0; i < len; ++i)
            out[i] = in[i] * a + ((x[i] - m) * b + d);
    } else {
#pragma omp simd
        for (fb_index i = 0; i < len; ++i)
            out[i] = FB_TYPED(bn_relu_masked)(in[i], x[i], m, mask_scale, mask_shift) * a
                     + ((x[i] - m) * b + d);
    }
}

static inline void FB_TYPED(bn_span_channels)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                              fb_index len, const FB_REAL *restrict m,
                                              const FB_REAL *restrict a,
                                              const FB_REAL *restrict b,
                                              const FB_REAL *restrict d, int stream, int relu)
{
#if FB_BN_CAN_STREAM
    if (stream) {
        FB_TYPED(bn_span_channels_stream)(out, in, x, len, m, a, b, d, relu);
        return;
    }
#else
    (void)stream;
#endif
    if (!x) {
#pragma omp simd
        for (fb_index i = 0; i < len; ++i)
            out[i] = FB_TYPED(bn_activate)((in[i] - m[i]) * a[i] + b[i], relu);
    } else {
#pragma omp simd
        for (fb_index i = 0; i < len; ++i)
            out[i] = in[i] * a[i] + ((x[i] - m[i]) * b[i] + d[i]);
    }
}

#undef FB_BN_CAN_STREAM
