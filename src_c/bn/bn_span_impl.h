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
 * bn_span_wrap takes per-channel coefficient arrays (a channels-last
 * stretch, see below).
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

/* Elements before out + i is on a vector boundary (where a streaming store
 * must start, and where a normal one does not straddle two cache lines);
 * `len` when out is not even aligned to its element size. */
static inline fb_index FB_TYPED(bn_store_head)(const FB_REAL *out, fb_index len)
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
    const fb_index head = FB_TYPED(bn_store_head)(out, len);
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

/* Rows of `channels` values that make a whole number of vectors: a stretch
 * that many rows (or a multiple) after an aligned one is aligned too. */
static inline fb_index FB_TYPED(bn_aligned_rows)(fb_index channels)
{
    const fb_index row_bytes = channels * (fb_index)sizeof(FB_REAL);
    const fb_index vector_bytes = (fb_index)sizeof(FB_RVEC);
    fb_index rows = 1;
    while ((rows * row_bytes) % vector_bytes)
        ++rows;
    return rows;
}

#undef FB_RVEC
#undef FB_RVEC_LEN
#define FB_BN_CAN_STREAM 1
#else
#define FB_BN_CAN_STREAM 0
static inline fb_index FB_TYPED(bn_aligned_rows)(fb_index channels)
{
    (void)channels;
    return 1;
}
#endif

/* Rows in the first half of a paired rewrite (bn_span_wrap_pair) of `rows`
 * rows: half of them, rounded down to a whole number of vectors
 * (bn_aligned_rows) so that both halves' stores are aligned, unless that
 * leaves fewer than `min_rows`: then the plain half, the second half's
 * stores unaligned.  The one rule for whole rows (bn_span_wrap) and pieces
 * of rows (bn_apply_rows, bn_train_impl.h). */
static inline fb_index FB_TYPED(bn_pair_half_rows)(fb_index rows, fb_index channels,
                                                   fb_index min_rows)
{
    const fb_index unit = FB_TYPED(bn_aligned_rows)(channels);
    const fb_index aligned = rows / 2 / unit * unit;
    return aligned >= min_rows ? aligned : rows / 2;
}

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

/* ---- channels-last stretches -----------------------------------------------
 * bn_span_wrap rewrites `len` consecutive elements of a channels-last array
 * (rows of `channels` values) whose first element belongs to channel c, as
 * ONE flat span: the channel index wraps around instead of the loop
 * restarting at every row.  Per-row loops pay a scalar head and tail on every
 * row (NumPy rows are only 16-byte aligned, and C is rarely a multiple of the
 * vector width), which measured ~1 ns/element against 0.23 for NCHW; the flat
 * walk pays them once per work item.  The coefficient arrays are WRAPPED:
 * length channels + FB_BN_WRAP_PAD with entry i == entry i % channels
 * (bn_wrap_mirror, below), so a full vector of coefficients starting at any channel
 * is one unaligned load.  The vector body and the scalar head and tail
 * evaluate the same expressions (same contraction), so a value does not
 * depend on where a stretch starts. */

/* The invariant every wrapped array keeps: pad entry channels + i mirrors
 * entry i % channels as soon as that entry is set.  A wrapping span reads a
 * pad entry only inside a vector whose elements belong to the channels the
 * entry mirrors, and it rewrites only channels whose coefficients were set,
 * so the pad it reads is always filled, whatever range of channels a thread
 * computed and whatever spans it then walks.  The code that sets entries
 * [first, last) of a wrapped array therefore calls bn_wrap_mirror right
 * after, rather than each caller of the walker deciding whether its spans
 * can wrap (a team smaller than planned once walked whole rows with the pad
 * unset). */
static inline void FB_TYPED(bn_wrap_mirror)(FB_REAL *coefficients, fb_index channels,
                                            fb_index first, fb_index last)
{
    for (fb_index i = 0; i < FB_BN_WRAP_PAD; ++i) {
        const fb_index c = i % channels;
        if (c >= first && c < last)
            coefficients[channels + i] = coefficients[c];
    }
}

/* All channels set: the whole pad. */
static inline void FB_TYPED(bn_wrap_extend)(FB_REAL *coefficients, fb_index channels)
{
    FB_TYPED(bn_wrap_mirror)(coefficients, channels, 0, channels);
}

#if FB_BN_HAVE_VECTORS
#define FB_RVEC FB_TYPED(fb_rvec)
#define FB_RVEC_LEN FB_CAT(FB_RVEC_LEN, FB_DTYPE)
#define FB_LOAD(p) FB_TYPED(fb_rvec_load)(p)

/* x == NULL: out = act((in - m) * a + b); else out = g * a + ((x - m) * b + d)
 * with g = in, or with mask, in masked where (x - m) * ms + mh <= 0.  Always
 * inlined with constant flags, so each variant is a tight loop. */
FB_ALWAYS_INLINE void FB_TYPED(bn_wrap_body)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                         fb_index len, fb_index c, fb_index channels,
                                         const FB_REAL *restrict m, const FB_REAL *restrict a,
                                         const FB_REAL *restrict b, const FB_REAL *restrict d,
                                         const FB_REAL *restrict ms, const FB_REAL *restrict mh,
                                         const int stream, const int relu, const int mask)
{
    fb_index i = 0;
    /* scalar up to a vector boundary of out, streamed or not: a vector store
     * that straddles two cache lines costs a second store on most cores, and
     * NumPy's arrays start 16 bytes past a page boundary.  Measured (AVX-512
     * Xeon, float32, 1 thread, min of 150 calls), eval forward of (777, 1000)
     * into an out= 16 bytes off a line: 365-386 us, 64-byte aligned: 218-227
     * us, the input's alignment making no difference (NumPy's multiply into
     * either: 213-220 us). */
    fb_index head = FB_TYPED(bn_store_head)(out, len);
    if (!stream && len - head < FB_RVEC_LEN)
        head = 0;  /* no whole vector after it: one unaligned vector beats a scalar row */
    const fb_index step = FB_RVEC_LEN % channels;  /* c + step < 2 * channels */
#define FB_SCALAR_STEP                                                                       do {                                                                                         if (!x) {                                                                                    out[i] = FB_TYPED(bn_activate)((in[i] - m[c]) * a[c] + b[c], relu);                  } else {                                                                                     const FB_REAL g = mask ? FB_TYPED(bn_relu_masked)(in[i], x[i], m[c], ms[c],                                                                mh[c])                                                        : in[i];                                                          out[i] = g * a[c] + ((x[i] - m[c]) * b[c] + d[c]);                                   }                                                                                        if (++c == channels)                                                                         c = 0;                                                                           } while (0)
    for (; i < head; ++i)
        FB_SCALAR_STEP;
    for (; i + FB_RVEC_LEN <= len; i += FB_RVEC_LEN) {
        FB_RVEC v;
        if (!x) {
            v = FB_TYPED(bn_activate_vec)((FB_LOAD(in + i) - FB_LOAD(m + c)) * FB_LOAD(a + c)
                                          + FB_LOAD(b + c), relu);
        } else {
            const FB_RVEC xc = FB_LOAD(x + i) - FB_LOAD(m + c);
            FB_RVEC g = FB_LOAD(in + i);
            if (mask)
                g = FB_TYPED(bn_relu_mask_vec)(g, xc, FB_LOAD(ms + c), FB_LOAD(mh + c));
            v = g * FB_LOAD(a + c) + (xc * FB_LOAD(b + c) + FB_LOAD(d + c));
        }
        if (stream)
            FB_TYPED(fb_rvec_stream)(out + i, v);
        else
            memcpy(out + i, &v, sizeof v);
        c += step;
        if (c >= channels)
            c -= channels;
    }
    for (; i < len; ++i)
        FB_SCALAR_STEP;
#undef FB_SCALAR_STEP
}

#ifndef FB_BN_IN_REGISTER
/* Keeps a loaded vector in a register: without it GCC folds the load into
 * both of its uses as a memory operand, loading each coefficient twice and
 * undoing the pairing below (seen in the profile of the paired loop). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__) || defined(__aarch64__))
#define FB_BN_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define FB_BN_IN_REGISTER(v) ((void)0)
#endif
#endif

/* The vector part of two stretches of `len` elements, the second `distance`
 * elements after the first (distance >= len, a multiple of channels), so
 * element i and element i + distance belong to the same channel:
 * each coefficient vector is loaded once for two output vectors.  In the
 * training backward's rewrite that is 4 coefficient loads and 4 data loads
 * per two vectors instead of 12 (the loads were the rewrite's bound: it was
 * 43 % of a (256, 512) float32 backward, profiled).  Each element is the same
 * expression as in bn_wrap_body, so the split changes no bit.  Returns the
 * elements done (a multiple of FB_RVEC_LEN, at most `len`); *c becomes the
 * channel of the first element not done. */
FB_ALWAYS_INLINE fb_index FB_TYPED(bn_wrap_pair_body)(FB_REAL *out, const FB_REAL *in,
                                                  const FB_REAL *x, fb_index len,
                                                  fb_index distance, fb_index *c_io,
                                                  fb_index channels,
                                                  const FB_REAL *restrict m,
                                                  const FB_REAL *restrict a,
                                                  const FB_REAL *restrict b,
                                                  const FB_REAL *restrict d,
                                                  const FB_REAL *restrict ms,
                                                  const FB_REAL *restrict mh,
                                                  const int relu, const int mask)
{
    fb_index i = 0, c = *c_io;
    const fb_index step = FB_RVEC_LEN % channels;
    for (; i + FB_RVEC_LEN <= len; i += FB_RVEC_LEN) {
        const fb_index j = i + distance;
        FB_RVEC vm = FB_LOAD(m + c), va = FB_LOAD(a + c), vb = FB_LOAD(b + c);
        FB_BN_IN_REGISTER(vm);
        FB_BN_IN_REGISTER(va);
        FB_BN_IN_REGISTER(vb);
        FB_RVEC v0, v1;
        if (!x) {
            v0 = FB_TYPED(bn_activate_vec)((FB_LOAD(in + i) - vm) * va + vb, relu);
            v1 = FB_TYPED(bn_activate_vec)((FB_LOAD(in + j) - vm) * va + vb, relu);
        } else {
            FB_RVEC vd = FB_LOAD(d + c);
            FB_BN_IN_REGISTER(vd);
            const FB_RVEC xc0 = FB_LOAD(x + i) - vm, xc1 = FB_LOAD(x + j) - vm;
            FB_RVEC g0 = FB_LOAD(in + i), g1 = FB_LOAD(in + j);
            if (mask) {
                FB_RVEC vms = FB_LOAD(ms + c), vmh = FB_LOAD(mh + c);
                FB_BN_IN_REGISTER(vms);
                FB_BN_IN_REGISTER(vmh);
                g0 = FB_TYPED(bn_relu_mask_vec)(g0, xc0, vms, vmh);
                g1 = FB_TYPED(bn_relu_mask_vec)(g1, xc1, vms, vmh);
            }
            v0 = g0 * va + (xc0 * vb + vd);
            v1 = g1 * va + (xc1 * vb + vd);
        }
        memcpy(out + i, &v0, sizeof v0);
        memcpy(out + j, &v1, sizeof v1);
        c += step;
        if (c >= channels)
            c -= channels;
    }
    *c_io = c;
    return i;
}

#undef FB_LOAD
#undef FB_RVEC
#undef FB_RVEC_LEN
#define FB_BN_CAN_PAIR 1
#else
#define FB_BN_CAN_PAIR 0
static inline void FB_TYPED(bn_wrap_body)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                          fb_index len, fb_index c, fb_index channels,
                                          const FB_REAL *m, const FB_REAL *a, const FB_REAL *b,
                                          const FB_REAL *d, const FB_REAL *ms, const FB_REAL *mh,
                                          int stream, int relu, int mask)
{
    (void)stream;
    for (fb_index i = 0; i < len; ++i) {
        if (!x) {
            out[i] = FB_TYPED(bn_activate)((in[i] - m[c]) * a[c] + b[c], relu);
        } else {
            const FB_REAL g = mask ? FB_TYPED(bn_relu_masked)(in[i], x[i], m[c], ms[c], mh[c])
                                   : in[i];
            out[i] = g * a[c] + ((x[i] - m[c]) * b[c] + d[c]);
        }
        if (++c == channels)
            c = 0;
    }
}
#endif

#ifndef FB_BN_PAIR_MIN
/* Elements per half from which bn_span_wrap pairs the halves: a few vectors
 * each, so the pair loop runs rather than only the halves' scalar tails. */
#define FB_BN_PAIR_MIN ((fb_index)64)
#endif

/* Two stretches of `len` elements of a cached (not streamed) output, both
 * starting at channel c, the second `distance` elements after the first
 * (distance >= len, a multiple of channels): the scalar heads of both up to
 * the first's vector boundary, then the rest rewritten together
 * (bn_wrap_pair_body), then the vectors' leftovers of each.  Every element
 * is computed as bn_span_wrap computes it. */
static void FB_TYPED(bn_span_wrap_pair)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                        fb_index len, fb_index distance, fb_index c,
                                        fb_index channels, const FB_REAL *m, const FB_REAL *a,
                                        const FB_REAL *b, const FB_REAL *d, const FB_REAL *ms,
                                        const FB_REAL *mh, int relu)
{
    fb_index done = 0;
#if FB_BN_CAN_PAIR
    /* both halves' elements up to the first half's first vector boundary,
     * scalar (bn_wrap_body of fewer elements than a vector), so the paired
     * stores of the first half are aligned, and those of the second when
     * `distance` is a whole number of vectors (bn_span_wrap and
     * bn_apply_rows pick such a distance when they can) */
    const fb_index head = FB_TYPED(bn_store_head)(out, len);
    if (head < len) {
#define FB_HEAD(at_, x_, relu_, mask_) \
    FB_TYPED(bn_wrap_body)(out + (at_), in + (at_), x_, head, c, channels, m, a, b, d, ms, mh, \
                           0, relu_, mask_)
        for (fb_index half = 0; half < 2 && head > 0; ++half) {
            const fb_index at = half * distance;
            if (!x)
                relu ? FB_HEAD(at, NULL, 1, 0) : FB_HEAD(at, NULL, 0, 0);
            else
                relu ? FB_HEAD(at, x + at, 0, 1) : FB_HEAD(at, x + at, 0, 0);
        }
#undef FB_HEAD
        c = (c + head) % channels;
        FB_REAL *const out_h = out + head;
        const FB_REAL *const in_h = in + head, *const x_h = x ? x + head : NULL;
#define FB_PAIR(x_, relu_, mask_) \
    FB_TYPED(bn_wrap_pair_body)(out_h, in_h, x_, len - head, distance, &c, channels, m, a, b, \
                                d, ms, mh, relu_, mask_)
        done = head + (!x ? (relu ? FB_PAIR(NULL, 1, 0) : FB_PAIR(NULL, 0, 0))
                          : (relu ? FB_PAIR(x_h, 0, 1) : FB_PAIR(x_h, 0, 0)));
#undef FB_PAIR
    }
#endif
    for (fb_index half = 0; half < 2; ++half) {
        const fb_index at = done + half * distance, rest = len - done;
        if (rest <= 0)
            break;
        if (!x)
            relu ? FB_TYPED(bn_wrap_body)(out + at, in + at, NULL, rest, c, channels, m, a, b, d,
                                          ms, mh, 0, 1, 0)
                 : FB_TYPED(bn_wrap_body)(out + at, in + at, NULL, rest, c, channels, m, a, b, d,
                                          ms, mh, 0, 0, 0);
        else
            relu ? FB_TYPED(bn_wrap_body)(out + at, in + at, x + at, rest, c, channels, m, a, b,
                                          d, ms, mh, 0, 0, 1)
                 : FB_TYPED(bn_wrap_body)(out + at, in + at, x + at, rest, c, channels, m, a, b,
                                          d, ms, mh, 0, 0, 0);
    }
}

/* The variants, each a loop of its own (constant flags). */
static void FB_TYPED(bn_span_wrap)(FB_REAL *out, const FB_REAL *in, const FB_REAL *x,
                                   fb_index len, fb_index c, fb_index channels,
                                   const FB_REAL *m, const FB_REAL *a, const FB_REAL *b,
                                   const FB_REAL *d, const FB_REAL *ms, const FB_REAL *mh,
                                   int stream, int relu)
{
#define FB_WRAP(x_, stream_, relu_, mask_) \
    FB_TYPED(bn_wrap_body)(out, in, x_, len, c, channels, m, a, b, d, ms, mh, stream_, relu_, mask_)
    /* cached outputs of at least two rows: the first and second halves of
     * the rows together (bn_span_wrap_pair, halves of bn_pair_half_rows of
     * at least FB_BN_PAIR_MIN elements), then the last rows.  (Streamed
     * outputs are bound by memory.) */
    const fb_index half = FB_TYPED(bn_pair_half_rows)(
        len / channels, channels, fb_ceil_div(FB_BN_PAIR_MIN, channels)) * channels;
    if (!stream && half >= FB_BN_PAIR_MIN) {
        FB_TYPED(bn_span_wrap_pair)(out, in, x, half, half, c, channels, m, a, b, d, ms, mh,
                                    relu);
        out += 2 * half;
        in += 2 * half;
        x = x ? x + 2 * half : NULL;
        len -= 2 * half;  /* the channel at 2 * half is c again */
    }
    if (!x) {
        if (stream)
            relu ? FB_WRAP(NULL, 1, 1, 0) : FB_WRAP(NULL, 1, 0, 0);
        else
            relu ? FB_WRAP(NULL, 0, 1, 0) : FB_WRAP(NULL, 0, 0, 0);
    } else {
        if (stream)
            relu ? FB_WRAP(x, 1, 0, 1) : FB_WRAP(x, 1, 0, 0);
        else
            relu ? FB_WRAP(x, 0, 0, 1) : FB_WRAP(x, 0, 0, 0);
    }
#undef FB_WRAP
}

#undef FB_BN_CAN_STREAM
#undef FB_BN_CAN_PAIR
