/* optim_impl.h -- template (FB_REAL, FB_DTYPE, FB_SQRT, FB_FABS, and the
 * storage macros below): the per-chunk loops of every optimizer family and of
 * the gradient-norm pieces, and the kernel entry points built on optim_run().
 * Included once per dtype by optim_kernels.c, and once per bfloat16 storage
 * layout (FB_ROUNDS 1), which instantiates only the families that offer
 * bfloat16 (SGD, Momentum, RMSprop, Adam, Lion).
 *
 * Storage: the loops compute in FB_REAL and reach memory only through
 * FB_LOAD_PARAM / FB_LOAD_GRAD / FB_LOAD_STATE and FB_STORE_PARAM /
 * FB_STORE_STATE(array, i, slot, value), on arrays of FB_PARAM_T / FB_GRAD_T /
 * FB_STATE_T.  For the float dtypes they are plain accesses; for bfloat16
 * they widen (a shift) and round (an add and a shift, with the element's
 * random bits from `rounding`), inside the vectorized loop: one pass over
 * memory whatever the storage.  FB_INDEX_T, the index type of those loops
 * (a chunk has at most FASTBN_OPTIM_CHUNK elements), is 32-bit in the
 * bfloat16 layouts: their random bits hash a 32-bit counter, which a 64-bit
 * induction would have to narrow in every vector.
 *
 * Each loop is one pass over its tensors: every element of param, grad and
 * state is read once and written once, with at most one division and one
 * square root.  Options are compile-time constants of an always-inlined loop
 * (selected once per chunk by FB_SELECT*), so the vectorized body carries no
 * branches.  Arithmetic is in FB_REAL: the scalars are rounded to the dtype
 * once per chunk, as NumPy rounds a Python float meeting a float32 array.
 */

/* section: one tensor's chunk ---------------------------------------------------- */

/* Pointers to elements [begin, end) of tensor t and the dtype-rounded sign
 * of the gradient (-1 under maximize), shared by every family's chunk. */
typedef struct FB_TYPED(optim_view) {
    FB_PARAM_T *param;
    const FB_GRAD_T *grad;
    FB_STATE_T *state[FASTBN_OPTIM_MAX_STATE]; /* NULL where the slot is unused */
    const double *coefficients;                /* this tensor's row, or NULL */
    fb_index n;
    FB_REAL sign;
    fb_rounding rounding;                      /* bfloat16 layouts only */
} FB_TYPED(optim_view);

static inline FB_TYPED(optim_view) FB_TYPED(optim_view_of)(const optim_call *call, fb_index t,
                                                           fb_index begin, fb_index end)
{
    const fastbn_optim_batch *batch = call->batch;
    FB_TYPED(optim_view) view;
    view.param = (FB_PARAM_T *)batch->param[t] + begin;
    view.grad = batch->grad ? (const FB_GRAD_T *)batch->grad[t] + begin : NULL;
    for (int slot = 0; slot < FASTBN_OPTIM_MAX_STATE; ++slot) {
        FB_STATE_T *base = batch->state[slot] ? (FB_STATE_T *)batch->state[slot][t] : NULL;
        view.state[slot] = base ? base + begin : NULL;
    }
#if FB_ROUNDS
    view.rounding = fb_rounding_of(batch, t, begin);
#else
    view.rounding = (fb_rounding){{0, 0, 0}, NULL};
#endif
    view.coefficients = batch->coefficients ? batch->coefficients + t * batch->coefficient_stride : NULL;
    view.n = end - begin;
    view.sign = (call->flags & FASTBN_OPTIM_MAXIMIZE) ? (FB_REAL)-1 : (FB_REAL)1;
    return view;
}

/* section: SGD -------------------------------------------------------------- */

FB_ALWAYS_INLINE void FB_TYPED(sgd_loop)(FB_PARAM_T *restrict param, const FB_GRAD_T *restrict grad,
                                         FB_STATE_T *restrict buffer, fb_index n, FB_REAL sign,
                                         FB_REAL lr, FB_REAL weight_decay, FB_REAL momentum,
                                         FB_REAL buffer_decay, FB_REAL grad_weight,
                                         const int has_weight_decay, const int has_momentum,
                                         const int nesterov, const fb_rounding rounding)
{
#pragma omp simd
    for (FB_INDEX_T i = 0; i < n; ++i) {
        const FB_REAL p = FB_LOAD_PARAM(param, i);
        FB_REAL g = sign * FB_LOAD_GRAD(grad, i);
        if (has_weight_decay)
            g = g + weight_decay * p;
        FB_REAL direction = g;
        if (has_momentum) {
            const FB_REAL b = buffer_decay * FB_LOAD_STATE(buffer, i) + grad_weight * g;
            FB_STORE_STATE(buffer, i, 0, b);
            direction = nesterov ? g + momentum * b : b;
        }
        FB_STORE_PARAM(param, i, p - lr * direction);
    }
}

static void FB_TYPED(sgd_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    const int flags = call->flags;
    const FB_REAL lr = (FB_REAL)s[0], weight_decay = (FB_REAL)s[1], momentum = (FB_REAL)s[2];
    const int has_weight_decay = (flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0;
    (void)chunk;
    if (!(flags & FASTBN_OPTIM_MOMENTUM)) {
#define FB_SGD_PLAIN(wd) FB_TYPED(sgd_loop)(v.param, v.grad, NULL, v.n, v.sign, lr, weight_decay, 0, 0, 0, wd, 0, 0, \
                                                    v.rounding)
        FB_SELECT1(FB_SGD_PLAIN, has_weight_decay);
#undef FB_SGD_PLAIN
        return;
    }
    const FB_REAL buffer_decay = (FB_REAL)v.coefficients[0], grad_weight = (FB_REAL)v.coefficients[1];
#define FB_SGD_MOMENTUM(wd, nes) FB_TYPED(sgd_loop)(v.param, v.grad, v.state[0], v.n, v.sign, lr,       \
                                                    weight_decay, momentum, buffer_decay, grad_weight, \
                                                    wd, 1, nes, v.rounding)
    FB_SELECT2(FB_SGD_MOMENTUM, has_weight_decay, (flags & FASTBN_OPTIM_NESTEROV) != 0);
#undef FB_SGD_MOMENTUM
}

/* section: Momentum (textbook) ------------------------------------------------ */

FB_ALWAYS_INLINE void FB_TYPED(momentum_loop)(FB_PARAM_T *restrict param, const FB_GRAD_T *restrict grad,
                                              FB_STATE_T *restrict velocity, fb_index n, FB_REAL sign,
                                              FB_REAL lr, FB_REAL weight_decay, FB_REAL beta,
                                              FB_REAL one_minus_beta, const int has_weight_decay,
                                              const fb_rounding rounding)
{
#pragma omp simd
    for (FB_INDEX_T i = 0; i < n; ++i) {
        const FB_REAL p = FB_LOAD_PARAM(param, i);
        FB_REAL g = sign * FB_LOAD_GRAD(grad, i);
        if (has_weight_decay)
            g = g + weight_decay * p;
        const FB_REAL v = beta * FB_LOAD_STATE(velocity, i) + one_minus_beta * g;
        FB_STORE_STATE(velocity, i, 0, v);
        FB_STORE_PARAM(param, i, p - lr * v);
    }
}

static void FB_TYPED(momentum_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                     fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    (void)chunk;
#define FB_MOMENTUM(wd) FB_TYPED(momentum_loop)(v.param, v.grad, v.state[0], v.n, v.sign, (FB_REAL)s[0], \
                                                (FB_REAL)s[1], (FB_REAL)s[2], (FB_REAL)s[3], wd, v.rounding)
    FB_SELECT1(FB_MOMENTUM, (call->flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0);
#undef FB_MOMENTUM
}

/* section: RMSprop ------------------------------------------------------------ */

FB_ALWAYS_INLINE void FB_TYPED(rmsprop_loop)(FB_PARAM_T *restrict param, const FB_GRAD_T *restrict grad,
                                             FB_STATE_T *restrict square_avg, FB_STATE_T *restrict grad_avg,
                                             FB_STATE_T *restrict buffer, fb_index n, FB_REAL sign,
                                             FB_REAL lr, FB_REAL weight_decay, FB_REAL alpha,
                                             FB_REAL one_minus_alpha, FB_REAL eps, FB_REAL momentum,
                                             const int has_weight_decay, const int centered,
                                             const int has_momentum, const fb_rounding rounding)
{
#pragma omp simd
    for (FB_INDEX_T i = 0; i < n; ++i) {
        const FB_REAL p = FB_LOAD_PARAM(param, i);
        FB_REAL g = sign * FB_LOAD_GRAD(grad, i);
        if (has_weight_decay)
            g = g + weight_decay * p;
        const FB_REAL v = alpha * FB_LOAD_STATE(square_avg, i) + one_minus_alpha * (g * g);
        FB_STORE_STATE(square_avg, i, 0, v);
        FB_REAL denom;
        if (centered) {
            const FB_REAL mean = alpha * FB_LOAD_STATE(grad_avg, i) + one_minus_alpha * g;
            FB_STORE_STATE(grad_avg, i, 1, mean);
            denom = FB_SQRT(v - mean * mean) + eps;
        } else {
            denom = FB_SQRT(v) + eps;
        }
        if (has_momentum) {
            const FB_REAL b = momentum * FB_LOAD_STATE(buffer, i) + g / denom;
            FB_STORE_STATE(buffer, i, 2, b);
            FB_STORE_PARAM(param, i, p - lr * b);
        } else {
            FB_STORE_PARAM(param, i, p - lr * (g / denom));
        }
    }
}

static void FB_TYPED(rmsprop_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                    fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    const int flags = call->flags;
    (void)chunk;
#define FB_RMSPROP(wd, cen, mom) FB_TYPED(rmsprop_loop)(v.param, v.grad, v.state[0], v.state[1], v.state[2], \
                                                        v.n, v.sign, (FB_REAL)s[0], (FB_REAL)s[1],        \
                                                        (FB_REAL)s[2], (FB_REAL)s[3], (FB_REAL)s[4],      \
                                                        (FB_REAL)s[5], wd, cen, mom,      \
                                                        v.rounding)
    FB_SELECT3(FB_RMSPROP, (flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0, (flags & FASTBN_OPTIM_CENTERED) != 0,
               (flags & FASTBN_OPTIM_MOMENTUM) != 0);
#undef FB_RMSPROP
}

/* section: Adam / AdamW --------------------------------------------------------- */

/* param -= a * m / (sqrt(v) + b) is PyTorch's
 * param -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps) with the bias
 * corrections moved into a = lr * sqrt(bc2) / bc1 and b = eps * sqrt(bc2):
 * one square root and one division per element instead of two divisions. */
/* One element's Adam update: the new parameter; the new exp_avg,
 * exp_avg_sq and (amsgrad) max_exp_avg_sq in *m_out, *v_out, *largest_out.
 * Shared by the element loop and the pair loop of pure bfloat16 storage, so
 * both compute the same operations in the same order. */
FB_ALWAYS_INLINE FB_REAL FB_TYPED(adam_element)(FB_REAL g, FB_REAL p, FB_REAL m_old, FB_REAL v_old,
                                                FB_REAL largest, FB_REAL *m_out, FB_REAL *v_out,
                                                FB_REAL *largest_out, FB_REAL weight_decay,
                                                FB_REAL beta1, FB_REAL one_minus_beta1, FB_REAL beta2,
                                                FB_REAL one_minus_beta2, FB_REAL param_decay,
                                                FB_REAL step_size, FB_REAL eps_hat, const int l2,
                                                const int decoupled, const int amsgrad)
{
    if (l2)
        g = g + weight_decay * p;
    if (decoupled)
        p = p * param_decay;
    const FB_REAL m = beta1 * m_old + one_minus_beta1 * g;
    FB_REAL v = beta2 * v_old + one_minus_beta2 * (g * g);
    *m_out = m;
    *v_out = v;
    if (amsgrad) {
        v = largest > v ? largest : v;
        *largest_out = v;
    }
    return p - step_size * m / (FB_SQRT(v) + eps_hat);
}

FB_ALWAYS_INLINE void FB_TYPED(adam_loop)(FB_PARAM_T *restrict param, const FB_GRAD_T *restrict grad,
                                          FB_STATE_T *restrict exp_avg, FB_STATE_T *restrict exp_avg_sq,
                                          FB_STATE_T *restrict max_exp_avg_sq, fb_index n, FB_REAL sign,
                                          FB_REAL weight_decay, FB_REAL beta1, FB_REAL one_minus_beta1,
                                          FB_REAL beta2, FB_REAL one_minus_beta2, FB_REAL param_decay,
                                          FB_REAL step_size, FB_REAL eps_hat, const int l2,
                                          const int decoupled, const int amsgrad,
                                          const fb_rounding rounding)
{
#define FB_ADAM_ELEMENT(g, p, m_old, v_old, largest, m_out, v_out, largest_out)                     \
    FB_TYPED(adam_element)((g), (p), (m_old), (v_old), (largest), (m_out), (v_out), (largest_out), \
                           weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2,         \
                           param_decay, step_size, eps_hat, l2, decoupled, amsgrad)
    FB_INDEX_T first = 0;
#if defined(FB_ADAM_BS_AVX2) || defined(FB_ADAM_BS_AVX512)
#if defined(FB_ADAM_BS_AVX512)
#define FB_ADAM_BS_VECTOR fb_adam_bs_avx512
#define FB_ADAM_BPBS_VECTOR fb_adam_bpbs_avx512
#else
#define FB_ADAM_BS_VECTOR fb_adam_bs_avx2
#define FB_ADAM_BPBS_VECTOR fb_adam_bpbs_avx2
#endif
#if FB_ROUNDS && FB_BF16_STATE && FB_BF16_PARAM == 0
    if (!l2 && !amsgrad)
        first = FB_ADAM_BS_VECTOR(param, grad, exp_avg, exp_avg_sq, (int32_t)n, sign, beta1, one_minus_beta1,
                                  beta2, one_minus_beta2, param_decay, step_size, eps_hat, decoupled, rounding,
                                  FB_STOCHASTIC);
#endif
#if FB_ROUNDS && FB_BF16_STATE && FB_BF16_PARAM == 1 && FB_PAIRS
    if (!l2 && !amsgrad)
        first = FB_ADAM_BPBS_VECTOR(param, grad, exp_avg, exp_avg_sq, (int32_t)n, sign, beta1, one_minus_beta1,
                                    beta2, one_minus_beta2, param_decay, step_size, eps_hat, decoupled, rounding,
                                    FB_STOCHASTIC);
#endif
#undef FB_ADAM_BS_VECTOR
#undef FB_ADAM_BPBS_VECTOR
#endif
#if FB_PAIRS
    /* Pure bfloat16 storage: a 32-bit word holds elements 2j (low half) and
     * 2j + 1 (high half), widened by one shift and one mask and narrowed
     * back with one shift and one bitwise select -- no 16/32-bit lane
     * shuffles.  Each element still gets its own index's random bits; the
     * parameter's (and amsgrad's) word is drawn once per pair. */
    const FB_INDEX_T n_pairs = (FB_INDEX_T)(n / 2);
#pragma omp simd
    for (FB_INDEX_T j = first / 2; j < n_pairs; ++j) {
        const uint32_t pw = fb_pair_load(param, j), gw = fb_pair_load(grad, j);
        const uint32_t mw = fb_pair_load(exp_avg, j), vw = fb_pair_load(exp_avg_sq, j);
        const uint32_t xw = amsgrad ? fb_pair_load(max_exp_avg_sq, j) : 0u;
        FB_REAL m0, v0, x0 = 0, m1, v1, x1 = 0;
        const FB_REAL p0 = FB_ADAM_ELEMENT(sign * fb_pair_low(gw), fb_pair_low(pw), fb_pair_low(mw),
                                           fb_pair_low(vw), fb_pair_low(xw), &m0, &v0, &x0);
        const FB_REAL p1 = FB_ADAM_ELEMENT(sign * fb_pair_high(gw), fb_pair_high(pw), fb_pair_high(mw),
                                           fb_pair_high(vw), fb_pair_high(xw), &m1, &v1, &x1);
        fb_pair_round_store(exp_avg, j, m0, m1, rounding, 0, FB_STOCHASTIC);
        fb_pair_round_store(exp_avg_sq, j, v0, v1, rounding, 1, FB_STOCHASTIC);
        if (amsgrad)
            fb_pair_round_store(max_exp_avg_sq, j, x0, x1, rounding, 2, FB_STOCHASTIC);
        fb_pair_round_store(param, j, p0, p1, rounding, FB_BF16_PARAM_SLOT, FB_STOCHASTIC);
    }
    first = 2 * n_pairs;
#endif
#pragma omp simd
    for (FB_INDEX_T i = first; i < n; ++i) {
        FB_REAL m, v, largest = 0;
        const FB_REAL p = FB_ADAM_ELEMENT(sign * FB_LOAD_GRAD(grad, i), FB_LOAD_PARAM(param, i),
                                          FB_LOAD_STATE(exp_avg, i), FB_LOAD_STATE(exp_avg_sq, i),
                                          amsgrad ? FB_LOAD_STATE(max_exp_avg_sq, i) : (FB_REAL)0,
                                          &m, &v, &largest);
        FB_STORE_STATE(exp_avg, i, 0, m);
        FB_STORE_STATE(exp_avg_sq, i, 1, v);
        if (amsgrad)
            FB_STORE_STATE(max_exp_avg_sq, i, 2, largest);
        FB_STORE_PARAM(param, i, p);
    }
#undef FB_ADAM_ELEMENT
}

static void FB_TYPED(adam_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                 fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    const int flags = call->flags;
    const int has_weight_decay = (flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0;
    const int decoupled = has_weight_decay && (flags & FASTBN_OPTIM_DECOUPLED);
    (void)chunk;
#define FB_ADAM(l2, dec, ams) FB_TYPED(adam_loop)(v.param, v.grad, v.state[0], v.state[1], v.state[2],   \
                                                  v.n, v.sign, (FB_REAL)s[0], (FB_REAL)s[1],            \
                                                  (FB_REAL)s[2], (FB_REAL)s[3], (FB_REAL)s[4],          \
                                                  (FB_REAL)s[5], (FB_REAL)v.coefficients[0],            \
                                                  (FB_REAL)v.coefficients[1], l2, dec, ams,  \
                                                  v.rounding)
    FB_SELECT3(FB_ADAM, has_weight_decay && !decoupled, decoupled, (flags & FASTBN_OPTIM_AMSGRAD) != 0);
#undef FB_ADAM
}

#if !FB_ROUNDS /* the families without bfloat16 storage */

/* section: Adagrad -------------------------------------------------------------- */

FB_ALWAYS_INLINE void FB_TYPED(adagrad_loop)(FB_REAL *restrict param, const FB_REAL *restrict grad,
                                             FB_REAL *restrict state_sum, fb_index n, FB_REAL sign,
                                             FB_REAL weight_decay, FB_REAL eps, FB_REAL clr,
                                             const int has_weight_decay)
{
#pragma omp simd
    for (fb_index i = 0; i < n; ++i) {
        FB_REAL g = sign * grad[i];
        if (has_weight_decay)
            g = g + weight_decay * param[i];
        const FB_REAL total = state_sum[i] + g * g;
        state_sum[i] = total;
        param[i] = param[i] - clr * g / (FB_SQRT(total) + eps);
    }
}

static void FB_TYPED(adagrad_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                    fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    (void)chunk;
#define FB_ADAGRAD(wd) FB_TYPED(adagrad_loop)(v.param, v.grad, v.state[0], v.n, v.sign, (FB_REAL)s[0], \
                                              (FB_REAL)s[1], (FB_REAL)v.coefficients[0], wd)
    FB_SELECT1(FB_ADAGRAD, (call->flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0);
#undef FB_ADAGRAD
}

#endif /* !FB_ROUNDS */

/* section: Lion ----------------------------------------------------------------- */

FB_ALWAYS_INLINE void FB_TYPED(lion_loop)(FB_PARAM_T *restrict param, const FB_GRAD_T *restrict grad,
                                          FB_STATE_T *restrict exp_avg, fb_index n, FB_REAL sign,
                                          FB_REAL lr, FB_REAL weight_decay, FB_REAL beta1,
                                          FB_REAL one_minus_beta1, FB_REAL beta2,
                                          FB_REAL one_minus_beta2, const int has_weight_decay,
                                          const fb_rounding rounding)
{
#pragma omp simd
    for (FB_INDEX_T i = 0; i < n; ++i) {
        const FB_REAL g = sign * FB_LOAD_GRAD(grad, i);
        const FB_REAL m = FB_LOAD_STATE(exp_avg, i);
        const FB_REAL p = FB_LOAD_PARAM(param, i);
        const FB_REAL c = beta1 * m + one_minus_beta1 * g;
        /* sign(c) as np.sign: +-1, and c itself for +-0 and nan */
        FB_REAL direction = c > 0 ? (FB_REAL)1 : (c < 0 ? (FB_REAL)-1 : c);
        if (has_weight_decay)
            direction = direction + weight_decay * p;
        FB_STORE_PARAM(param, i, p - lr * direction);
        FB_STORE_STATE(exp_avg, i, 0, beta2 * m + one_minus_beta2 * g);
    }
}

static void FB_TYPED(lion_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                 fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    (void)chunk;
#define FB_LION(wd) FB_TYPED(lion_loop)(v.param, v.grad, v.state[0], v.n, v.sign, (FB_REAL)s[0],  \
                                        (FB_REAL)s[1], (FB_REAL)s[2], (FB_REAL)s[3],            \
                                        (FB_REAL)s[4], (FB_REAL)s[5], wd, v.rounding)
    FB_SELECT1(FB_LION, (call->flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0);
#undef FB_LION
}

#if !FB_ROUNDS /* the families without bfloat16 storage, and the float entry points */

/* section: NAdam ------------------------------------------------------------------- */

/* PyTorch's two addcdiv terms, (lr (1 - mu_t) / (1 - prod mu_1..t)) g and
 * (lr mu_{t+1} / (1 - prod mu_1..t+1)) m over sqrt(v / bc2) + eps, share one
 * denominator; with sqrt(bc2) moved into the coefficients (grad_weight,
 * avg_weight, eps_hat = eps sqrt(bc2)) the element needs one square root and
 * one division, as Adam's. */
FB_ALWAYS_INLINE void FB_TYPED(nadam_loop)(FB_REAL *restrict param, const FB_REAL *restrict grad,
                                           FB_REAL *restrict exp_avg, FB_REAL *restrict exp_avg_sq,
                                           fb_index n, FB_REAL sign, FB_REAL weight_decay,
                                           FB_REAL beta1, FB_REAL one_minus_beta1, FB_REAL beta2,
                                           FB_REAL one_minus_beta2, FB_REAL param_decay,
                                           FB_REAL grad_weight, FB_REAL avg_weight, FB_REAL eps_hat,
                                           const int l2, const int decoupled)
{
#pragma omp simd
    for (fb_index i = 0; i < n; ++i) {
        FB_REAL g = sign * grad[i];
        FB_REAL p = param[i];
        if (l2)
            g = g + weight_decay * p;
        if (decoupled)
            p = p * param_decay;
        const FB_REAL m = beta1 * exp_avg[i] + one_minus_beta1 * g;
        const FB_REAL v = beta2 * exp_avg_sq[i] + one_minus_beta2 * (g * g);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = p - (grad_weight * g + avg_weight * m) / (FB_SQRT(v) + eps_hat);
    }
}

static void FB_TYPED(nadam_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                  fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    const double *c = v.coefficients;
    const int flags = call->flags;
    const int has_weight_decay = (flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0;
    const int decoupled = has_weight_decay && (flags & FASTBN_OPTIM_DECOUPLED);
    (void)chunk;
#define FB_NADAM(l2, dec) FB_TYPED(nadam_loop)(v.param, v.grad, v.state[0], v.state[1], v.n, v.sign,    \
                                               (FB_REAL)s[0], (FB_REAL)s[1], (FB_REAL)s[2],            \
                                               (FB_REAL)s[3], (FB_REAL)s[4], (FB_REAL)s[5],            \
                                               (FB_REAL)c[0], (FB_REAL)c[1], (FB_REAL)c[2], l2, dec)
    FB_SELECT2(FB_NADAM, has_weight_decay && !decoupled, decoupled);
#undef FB_NADAM
}

/* section: RAdam ------------------------------------------------------------------- */

/* While the variance is tractable (rho_t > 5, decided per step by the caller
 * and passed as coefficient 2) the update is Adam's loop with
 * a = lr r_t sqrt(bc2) / bc1 and b = eps; before that it is plain momentum,
 * param -= (lr / bc1) m, with the second moment still tracked. */
FB_ALWAYS_INLINE void FB_TYPED(radam_momentum_loop)(FB_REAL *restrict param, const FB_REAL *restrict grad,
                                                    FB_REAL *restrict exp_avg, FB_REAL *restrict exp_avg_sq,
                                                    fb_index n, FB_REAL sign, FB_REAL weight_decay,
                                                    FB_REAL beta1, FB_REAL one_minus_beta1, FB_REAL beta2,
                                                    FB_REAL one_minus_beta2, FB_REAL param_decay,
                                                    FB_REAL step_size, const int l2, const int decoupled)
{
#pragma omp simd
    for (fb_index i = 0; i < n; ++i) {
        FB_REAL g = sign * grad[i];
        FB_REAL p = param[i];
        if (l2)
            g = g + weight_decay * p;
        if (decoupled)
            p = p * param_decay;
        const FB_REAL m = beta1 * exp_avg[i] + one_minus_beta1 * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = beta2 * exp_avg_sq[i] + one_minus_beta2 * (g * g);
        param[i] = p - step_size * m;
    }
}

static void FB_TYPED(radam_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                  fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    const double *c = v.coefficients;
    const int flags = call->flags;
    const int has_weight_decay = (flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0;
    const int decoupled = has_weight_decay && (flags & FASTBN_OPTIM_DECOUPLED);
    (void)chunk;
    if (c[2] != 0.0) {
#define FB_RADAM_ADAPTIVE(l2, dec) FB_TYPED(adam_loop)(v.param, v.grad, v.state[0], v.state[1], NULL, v.n,  \
                                                       v.sign, (FB_REAL)s[0], (FB_REAL)s[1],               \
                                                       (FB_REAL)s[2], (FB_REAL)s[3], (FB_REAL)s[4],        \
                                                       (FB_REAL)s[5], (FB_REAL)c[0], (FB_REAL)c[1],        \
                                                       l2, dec, 0, v.rounding)
        FB_SELECT2(FB_RADAM_ADAPTIVE, has_weight_decay && !decoupled, decoupled);
#undef FB_RADAM_ADAPTIVE
        return;
    }
#define FB_RADAM_MOMENTUM(l2, dec) FB_TYPED(radam_momentum_loop)(v.param, v.grad, v.state[0], v.state[1], v.n, \
                                                                 v.sign, (FB_REAL)s[0], (FB_REAL)s[1],        \
                                                                 (FB_REAL)s[2], (FB_REAL)s[3], (FB_REAL)s[4], \
                                                                 (FB_REAL)s[5], (FB_REAL)c[0], l2, dec)
    FB_SELECT2(FB_RADAM_MOMENTUM, has_weight_decay && !decoupled, decoupled);
#undef FB_RADAM_MOMENTUM
}

/* section: Adadelta ------------------------------------------------------------------ */

/* PyTorch's order: delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g,
 * two square roots (not one of the quotient) so the rounding matches. */
FB_ALWAYS_INLINE void FB_TYPED(adadelta_loop)(FB_REAL *restrict param, const FB_REAL *restrict grad,
                                              FB_REAL *restrict square_avg, FB_REAL *restrict acc_delta,
                                              fb_index n, FB_REAL sign, FB_REAL lr, FB_REAL weight_decay,
                                              FB_REAL rho, FB_REAL one_minus_rho, FB_REAL eps,
                                              const int has_weight_decay)
{
#pragma omp simd
    for (fb_index i = 0; i < n; ++i) {
        FB_REAL g = sign * grad[i];
        if (has_weight_decay)
            g = g + weight_decay * param[i];
        const FB_REAL sq = rho * square_avg[i] + one_minus_rho * (g * g);
        square_avg[i] = sq;
        const FB_REAL delta = FB_SQRT(acc_delta[i] + eps) / FB_SQRT(sq + eps) * g;
        acc_delta[i] = rho * acc_delta[i] + one_minus_rho * (delta * delta);
        param[i] = param[i] - lr * delta;
    }
}

static void FB_TYPED(adadelta_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                     fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    (void)chunk;
#define FB_ADADELTA(wd) FB_TYPED(adadelta_loop)(v.param, v.grad, v.state[0], v.state[1], v.n, v.sign,   \
                                                (FB_REAL)s[0], (FB_REAL)s[1], (FB_REAL)s[2],           \
                                                (FB_REAL)s[3], (FB_REAL)s[4], wd)
    FB_SELECT1(FB_ADADELTA, (call->flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0);
#undef FB_ADADELTA
}

/* section: Adamax ------------------------------------------------------------------- */

FB_ALWAYS_INLINE void FB_TYPED(adamax_loop)(FB_REAL *restrict param, const FB_REAL *restrict grad,
                                            FB_REAL *restrict exp_avg, FB_REAL *restrict exp_inf,
                                            fb_index n, FB_REAL sign, FB_REAL weight_decay,
                                            FB_REAL beta1, FB_REAL one_minus_beta1, FB_REAL beta2,
                                            FB_REAL eps, FB_REAL clr, const int has_weight_decay)
{
#pragma omp simd
    for (fb_index i = 0; i < n; ++i) {
        FB_REAL g = sign * grad[i];
        if (has_weight_decay)
            g = g + weight_decay * param[i];
        const FB_REAL m = beta1 * exp_avg[i] + one_minus_beta1 * g;
        exp_avg[i] = m;
        const FB_REAL decayed = beta2 * exp_inf[i];
        const FB_REAL magnitude = FB_FABS(g) + eps;
        /* torch.maximum: a nan on either side gives nan */
        const FB_REAL u = (decayed > magnitude || decayed != decayed) ? decayed : magnitude;
        exp_inf[i] = u;
        param[i] = param[i] - clr * (m / u);
    }
}

static void FB_TYPED(adamax_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                   fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    (void)chunk;
#define FB_ADAMAX(wd) FB_TYPED(adamax_loop)(v.param, v.grad, v.state[0], v.state[1], v.n, v.sign,        \
                                            (FB_REAL)s[0], (FB_REAL)s[1], (FB_REAL)s[2], (FB_REAL)s[3], \
                                            (FB_REAL)s[4], (FB_REAL)v.coefficients[0], wd)
    FB_SELECT1(FB_ADAMAX, (call->flags & FASTBN_OPTIM_WEIGHT_DECAY) != 0);
#undef FB_ADAMAX
}

/* section: weight averaging (lerp) ----------------------------------------------------- */

/* average += w (current - average), torch.lerp's two-sided form: below
 * w = 0.5 from the average, from the current value above it, so w = 1 gives
 * the current value exactly.  `param` holds the averages, `grad` the current
 * values (read only). */
FB_ALWAYS_INLINE void FB_TYPED(lerp_loop)(FB_REAL *restrict average, const FB_REAL *restrict current,
                                          fb_index n, FB_REAL weight, FB_REAL one_minus_weight,
                                          const int from_current)
{
#pragma omp simd
    for (fb_index i = 0; i < n; ++i) {
        const FB_REAL difference = current[i] - average[i];
        average[i] = from_current ? current[i] - difference * one_minus_weight
                                  : average[i] + weight * difference;
    }
}

static void FB_TYPED(lerp_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                 fb_index begin, fb_index end)
{
    const FB_TYPED(optim_view) v = FB_TYPED(optim_view_of)(call, t, begin, end);
    const double *s = call->scalars;
    const FB_REAL weight = (FB_REAL)s[0];
    (void)chunk;
#define FB_LERP(from_current) FB_TYPED(lerp_loop)(v.param, v.grad, v.n, weight, (FB_REAL)s[1], from_current)
    FB_SELECT1(FB_LERP, !(FB_FABS(weight) < (FB_REAL)0.5));
#undef FB_LERP
}

/* section: gradient norm and scaling ---------------------------------------------- */

/* Squares summed in float64 into 8 interleaved accumulators (lane j takes
 * elements j, j+8, ...): a fixed order that does not depend on the data's
 * alignment, which the vectorizer may map onto two 4-wide registers. */
static void FB_TYPED(sumsq_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                  fb_index begin, fb_index end)
{
    const FB_REAL *x = (const FB_REAL *)call->batch->param[t] + begin;
    const fb_index n = end - begin;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    fb_index i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; ++j) {
            const double value = (double)x[i + j];
            acc[j] += value * value;
        }
    }
    for (int j = 0; i < n; ++i, ++j) {
        const double value = (double)x[i];
        acc[j] += value * value;
    }
    call->partials[chunk] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static void FB_TYPED(maxabs_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                   fb_index begin, fb_index end)
{
    const FB_REAL *x = (const FB_REAL *)call->batch->param[t] + begin;
    FB_REAL largest = 0;
    int nan_seen = 0;
#pragma omp simd reduction(max : largest) reduction(| : nan_seen)
    for (fb_index i = 0; i < end - begin; ++i) {
        const FB_REAL magnitude = FB_FABS(x[i]);
        largest = magnitude > largest ? magnitude : largest;
        nan_seen |= magnitude != magnitude;
    }
    call->partials[chunk] = nan_seen ? (double)NAN : (double)largest;
}

static void FB_TYPED(scale_chunk)(const optim_call *call, fb_index t, fb_index chunk,
                                  fb_index begin, fb_index end)
{
    FB_REAL *x = (FB_REAL *)call->batch->param[t] + begin;
    const FB_REAL factor = (FB_REAL)call->factor;
    (void)chunk;
#pragma omp simd
    for (fb_index i = 0; i < end - begin; ++i)
        x[i] = x[i] * factor;
}

/* section: entry points ------------------------------------------------------------ */

static int FB_TYPED(optim_step)(FASTBN_OPTIM_STEP_ARGS, optim_chunk_fn chunk_fn, int n_state,
                                int needs_coefficients)
{
    if (!optim_batch_ok(batch) || !scalars || (needs_coefficients && batch->n_tensors && !batch->coefficients))
        return FASTBN_ERR_ARGUMENT;
    for (int slot = 0; slot < n_state; ++slot)
        if (batch->n_tensors && !batch->state[slot])
            return FASTBN_ERR_ARGUMENT;
    optim_call call = {batch, scalars, flags, 0.0, NULL};
    optim_run(&call, chunk_fn, num_threads);
    return FASTBN_OK;
}

static int FB_TYPED(sgd_step)(FASTBN_OPTIM_STEP_ARGS)
{
    const int momentum = (flags & FASTBN_OPTIM_MOMENTUM) != 0;
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(sgd_chunk), momentum, momentum);
}

static int FB_TYPED(momentum_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(momentum_chunk), 1, 0);
}

static int FB_TYPED(rmsprop_step)(FASTBN_OPTIM_STEP_ARGS)
{
    if (batch && batch->n_tensors && (((flags & FASTBN_OPTIM_CENTERED) && !batch->state[1])
                                      || ((flags & FASTBN_OPTIM_MOMENTUM) && !batch->state[2])))
        return FASTBN_ERR_ARGUMENT;
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(rmsprop_chunk), 1, 0);
}

static int FB_TYPED(adam_step)(FASTBN_OPTIM_STEP_ARGS)
{
    const int n_state = (flags & FASTBN_OPTIM_AMSGRAD) ? 3 : 2;
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(adam_chunk), n_state, 1);
}

static int FB_TYPED(adagrad_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(adagrad_chunk), 1, 1);
}

static int FB_TYPED(lion_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(lion_chunk), 1, 0);
}

static int FB_TYPED(nadam_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(nadam_chunk), 2, 1);
}

static int FB_TYPED(radam_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(radam_chunk), 2, 1);
}

static int FB_TYPED(adadelta_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(adadelta_chunk), 2, 0);
}

static int FB_TYPED(adamax_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(adamax_chunk), 2, 1);
}

static int FB_TYPED(lerp_step)(FASTBN_OPTIM_STEP_ARGS)
{
    return FB_TYPED(optim_step)(batch, scalars, flags, num_threads, FB_TYPED(lerp_chunk), 0, 0);
}

static int FB_TYPED(sumsq)(FASTBN_OPTIM_SUMSQ_ARGS)
{
    if (!optim_batch_ok(batch) || !result || (optim_n_chunks(batch) && !partials))
        return FASTBN_ERR_ARGUMENT;
    optim_call call = {batch, NULL, 0, 0.0, partials};
    optim_run(&call, FB_TYPED(sumsq_chunk), num_threads);
    double total = 0.0;
    for (fb_index c = 0; c < optim_n_chunks(batch); ++c)
        total += partials[c];
    *result = total;
    return FASTBN_OK;
}

static int FB_TYPED(maxabs)(FASTBN_OPTIM_MAXABS_ARGS)
{
    if (!optim_batch_ok(batch) || !result || (optim_n_chunks(batch) && !partials))
        return FASTBN_ERR_ARGUMENT;
    optim_call call = {batch, NULL, 0, 0.0, partials};
    optim_run(&call, FB_TYPED(maxabs_chunk), num_threads);
    double largest = 0.0;
    for (fb_index c = 0; c < optim_n_chunks(batch); ++c) {
        const double value = partials[c];
        if (value != value || value > largest)
            largest = value;
        if (largest != largest)
            break;
    }
    *result = largest;
    return FASTBN_OK;
}

static int FB_TYPED(scale)(FASTBN_OPTIM_SCALE_ARGS)
{
    if (!optim_batch_ok(batch))
        return FASTBN_ERR_ARGUMENT;
    optim_call call = {batch, NULL, 0, factor, NULL};
    optim_run(&call, FB_TYPED(scale_chunk), num_threads);
    return FASTBN_OK;
}

#endif /* !FB_ROUNDS */
