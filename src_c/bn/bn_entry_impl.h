/* bn_entry_impl.h -- template: the table's entry points for one dtype
 * (FB_REAL, FB_DTYPE), each unpacking a fastbn_bn_call into its kernel's
 * arguments (the FASTBN_BN_*_ARGS of bn_kernels.h).  The kernels are static
 * and called from here only, so each is inlined into its entry point.
 *
 * FB_TYPED(name) expands to name_f32 / name_f64: bn_eval_forward_call_f32,
 * bn_train_forward_call_f32, bn_backward_call_f32, bn_backward_eval_call_f32,
 * bn_stats_call_f32, bn_apply_call_f32, bn_backward_reduce_call_f32,
 * bn_backward_apply_call_f32 (and the _f64 twins). */

#define FB_IN(field) ((const FB_REAL *)c->field)
#define FB_OUT(field) ((FB_REAL *)c->field)
/* the split phases' row stride, 0 meaning `channels` */
#define FB_ROWS(c) ((c)->row_channels ? (c)->row_channels : (c)->channels)

static int FB_TYPED(bn_eval_forward_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_eval_forward)(FB_IN(x), FB_OUT(out), c->outer, c->channels, c->inner,
                                     FB_IN(running_mean), FB_IN(running_var), FB_IN(weight),
                                     FB_IN(bias), c->eps, c->relu, c->num_threads);
}

static int FB_TYPED(bn_train_forward_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_train_forward)(FB_IN(x), FB_OUT(out), c->outer, c->channels, c->inner,
                                      FB_IN(weight), FB_IN(bias), c->eps, FB_OUT(mean),
                                      FB_OUT(invstd), FB_OUT(running_mean), FB_OUT(running_var),
                                      c->momentum, c->relu, c->num_threads);
}

static int FB_TYPED(bn_backward_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_backward)(FB_IN(dy), FB_IN(x), FB_OUT(out), c->outer, c->channels,
                                 c->inner, FB_IN(mean), FB_IN(invstd), FB_IN(weight), FB_IN(bias),
                                 FB_OUT(dweight), FB_OUT(dbias), c->accumulate, c->relu,
                                 c->num_threads);
}

static int FB_TYPED(bn_backward_eval_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_backward_eval)(FB_IN(dy), FB_IN(x), FB_OUT(out), c->outer, c->channels,
                                      c->inner, FB_IN(running_mean), FB_IN(running_var),
                                      FB_IN(weight), FB_IN(bias), c->eps, FB_OUT(dweight),
                                      FB_OUT(dbias), c->accumulate, c->relu, c->num_threads);
}

static int FB_TYPED(bn_stats_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_stats)(FB_IN(x), c->outer, c->channels, c->inner, FB_ROWS(c),
                              c->phase_mean, c->m2, c->num_threads);
}

static int FB_TYPED(bn_apply_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_apply)(FB_IN(x), FB_OUT(out), c->outer, c->channels, c->inner,
                              FB_ROWS(c), c->phase_mean, c->phase_invstd, FB_IN(weight),
                              FB_IN(bias), c->relu, c->num_threads);
}

static int FB_TYPED(bn_backward_reduce_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_backward_reduce)(FB_IN(dy), FB_IN(x), c->outer, c->channels, c->inner,
                                        FB_ROWS(c), c->phase_mean, c->phase_invstd,
                                        FB_IN(mask_weight), FB_IN(mask_bias), c->relu,
                                        c->sum_dy, c->sum_dy_xhat, c->num_threads);
}

static int FB_TYPED(bn_backward_apply_call)(const fastbn_bn_call *c)
{
    return FB_TYPED(bn_backward_apply)(FB_IN(dy), FB_IN(x), FB_OUT(out), c->outer, c->channels,
                                       c->inner, FB_ROWS(c), c->phase_mean, c->phase_invstd,
                                       FB_IN(weight), c->sum_dy, c->sum_dy_xhat, c->count,
                                       FB_IN(mask_weight), FB_IN(mask_bias), c->relu,
                                       c->num_threads);
}

#undef FB_IN
#undef FB_OUT
#undef FB_ROWS
