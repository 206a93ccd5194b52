/* bn_kernels.h -- the batch-norm kernel family: signatures and the table of
 * function pointers, one table per SIMD target.
 *
 * Layout convention: every input is viewed as a C-contiguous array of shape
 * (outer, channels, inner).  Channels-first (N, C, *spatial) is
 * outer = N, inner = prod(spatial); channels-last (N, *spatial, C) is
 * outer = N * prod(spatial), inner = 1.  Per-channel vectors have `channels`
 * contiguous elements; optional ones (weight, bias) may be NULL.
 */
#ifndef FASTBN_BN_KERNELS_H
#define FASTBN_BN_KERNELS_H

#include "../common/fastbn_common.h"

/* Every kernel takes `relu`: nonzero fuses a ReLU after the batch norm
 * (bn_relu_impl.h).  The forwards then store max(y, 0); the backwards take
 * dy as the gradient of that ReLU's output and mask it where the
 * pre-activation y = (x - mean) * scale + bias (recomputed from x, `bias` and
 * the statistics) is <= 0, exactly where the forward stored 0. */

/* y = (x - running_mean[c]) * alpha[c] + bias[c],
 * alpha = weight / sqrt(running_var + eps): the mean is subtracted, not
 * folded into the constant, so a large mean costs no precision.  With
 * running_var + eps == 0: +-inf where x != running_mean, NaN where
 * x == running_mean (0 * inf).  y may equal x (in place). */
#define FASTBN_BN_EVAL_FORWARD_ARGS(real)                                          \
    const real *x, real *y, fb_index outer, fb_index channels, fb_index inner,     \
    const real *running_mean, const real *running_var, const real *weight,         \
    const real *bias, double eps, int relu, int num_threads

/* Training forward: per-channel batch mean and biased variance over the
 * outer * inner values of each channel (at least 2), then
 * y = (x - mean) * invstd * weight + bias with invstd = 1/sqrt(var + eps).
 * OUT saved_mean, saved_invstd (channels,).  IN-OUT running_mean/running_var
 * (both or neither): r = (1 - momentum) * r + momentum * stat, with the
 * UNBIASED variance for running_var.  y may equal x (in place). */
#define FASTBN_BN_TRAIN_FORWARD_ARGS(real)                                         \
    const real *x, real *y, fb_index outer, fb_index channels, fb_index inner,     \
    const real *weight, const real *bias, double eps, real *saved_mean,            \
    real *saved_invstd, real *running_mean, real *running_var, double momentum,    \
    int relu, int num_threads

/* Training backward with the forward's saved mean and invstd:
 * dbias = sum(dy), dweight = sum(dy * xhat), xhat = (x - mean) * invstd,
 * dx = weight * invstd / n * (n * dy - dbias - xhat * dweight).
 * dweight/dbias may be NULL (not wanted); with accumulate != 0 they are
 * added to, not overwritten.  dx may equal dy or x.  `bias` is read only
 * with relu (for the mask). */
#define FASTBN_BN_BACKWARD_ARGS(real)                                              \
    const real *dy, const real *x, real *dx, fb_index outer, fb_index channels,    \
    fb_index inner, const real *mean, const real *invstd, const real *weight,      \
    const real *bias, real *dweight, real *dbias, int accumulate, int relu,        \
    int num_threads

/* Eval-mode backward (running statistics were used in the forward):
 * invstd = 1/sqrt(running_var + eps), dx = dy * weight * invstd,
 * dweight = sum(dy * (x - running_mean) * invstd), dbias = sum(dy).
 * With dweight and dbias both NULL and no relu, x is not read (may be NULL).
 * `bias` is read only with relu (for the mask). */
#define FASTBN_BN_BACKWARD_EVAL_ARGS(real)                                         \
    const real *dy, const real *x, real *dx, fb_index outer, fb_index channels,    \
    fb_index inner, const real *running_mean, const real *running_var,             \
    const real *weight, const real *bias, double eps, real *dweight, real *dbias,  \
    int accumulate, int relu, int num_threads

/* ---- split phases ---------------------------------------------------------
 * The training forward and backward cut at their per-channel sums, so that
 * the sums of several parts of a batch (processes) can be combined in
 * between: stats, (merge), apply; backward_reduce, (add), backward_apply.
 * The reductions (stats, backward_reduce) are the fused kernels' passes and
 * plans; the rewrites (apply, backward_apply) compute the fused kernels'
 * coefficients and run the eval forward's straight walk (bn_affine_impl.h),
 * as they need no reduction first.  Results are bit-identical for any
 * thread count, and composing the phases on one part reproduces the fused
 * kernels.  Statistics and sums cross the phase
 * boundary as float64 (channels,) arrays.
 *
 * `row_channels` (>= channels): channels between consecutive outer rows, so
 * a phase can run over a channel sub-range of a larger planar array (inner >
 * 1): x/dy/out point at the range's first channel, `channels` is the range's
 * length, and channel c's values are at (row * row_channels + c) * inner +
 * col.  Each channel's results are those of the whole-array call, bit for
 * bit (the chunks depend on outer * inner only).  row_channels == channels
 * for a whole array; inner == 1 (interleaved) takes no sub-range. */

/* OUT mean and m2 = sum((x - mean)^2) of the outer * inner (>= 1) values of
 * each channel, accumulated in float64 around a value of the channel (the
 * training forward's reduction; m2 / n is exactly its biased variance). */
#define FASTBN_BN_STATS_ARGS(real)                                                 \
    const real *x, fb_index outer, fb_index channels, fb_index inner,              \
    fb_index row_channels, double *mean, double *m2, int num_threads

/* y = (x - mean) * invstd * weight + bias through the training forward's
 * rewrite (coefficients rounded once from float64); relu stores max(y, 0).
 * y may equal x. */
#define FASTBN_BN_APPLY_ARGS(real)                                                 \
    const real *x, real *y, fb_index outer, fb_index channels, fb_index inner,     \
    fb_index row_channels, const double *mean, const double *invstd,               \
    const real *weight, const real *bias,                                          \
    int relu, int num_threads

/* OUT sum_dy = sum(g), sum_dy_xhat = sum(g * (x - mean) * invstd) in float64
 * (the training backward's reduction), g = dy, or with relu dy masked where
 * the forward's pre-activation from (mean, invstd, mask_weight, mask_bias)
 * is <= 0. */
#define FASTBN_BN_BACKWARD_REDUCE_ARGS(real)                                       \
    const real *dy, const real *x, fb_index outer, fb_index channels,              \
    fb_index inner, fb_index row_channels, const double *mean,                     \
    const double *invstd, const real *mask_weight, const real *mask_bias,          \
    int relu, double *sum_dy, double *sum_dy_xhat, int num_threads

/* dx = weight * invstd / count * (count * g - sum_dy - xhat * sum_dy_xhat),
 * xhat = (x - mean) * invstd, g as in backward_reduce (count > 0: the values
 * per channel the sums were taken over, on all parts together).  dx may
 * equal dy or x. */
#define FASTBN_BN_BACKWARD_APPLY_ARGS(real)                                        \
    const real *dy, const real *x, real *dx, fb_index outer, fb_index channels,    \
    fb_index inner, fb_index row_channels, const double *mean,                     \
    const double *invstd, const real *weight,                                      \
    const double *sum_dy, const double *sum_dy_xhat, double count,                 \
    const real *mask_weight, const real *mask_bias, int relu, int num_threads

/* ---- the table ------------------------------------------------------------
 * Every entry point takes one fastbn_bn_call: the buffers as untyped
 * pointers (of the dtype the entry is indexed by; the split phases'
 * statistics and sums are float64 whatever the dtype), the geometry and the
 * scalars.  A kernel reads only the fields of its *_ARGS above, under the
 * same names, except: the training forward's saved_mean/saved_invstd are
 * `mean`/`invstd`, the split phases' float64 mean/invstd/m2 are
 * `phase_mean`/`phase_invstd`/`m2`, and `y`/`dx` are `out`.  Every other
 * field is ignored (bn_entry_impl.h unpacks the struct). */
typedef struct fastbn_bn_call {
    fb_index outer, channels, inner;
    fb_index row_channels;      /* split phases: see above; 0 means `channels` */
    const void *x;              /* IN: input (forwards), the forward's input (backwards) */
    const void *dy;             /* IN: gradient of the output (backwards) */
    void *out;                  /* OUT: y (forwards, apply) or dx (backwards) */
    const void *weight, *bias;  /* IN (channels,) or NULL */
    void *running_mean;         /* eval kernels IN, training forward IN-OUT (or NULL) */
    void *running_var;
    void *mean, *invstd;        /* training forward OUT (saved), backward IN */
    void *dweight, *dbias;      /* backwards OUT (channels,) or NULL */
    double *phase_mean;         /* float64 (channels,): stats OUT, other phases IN */
    const double *phase_invstd; /* IN: apply, backward_reduce, backward_apply */
    double *m2;                 /* stats OUT */
    double *sum_dy, *sum_dy_xhat; /* backward_reduce OUT, backward_apply IN */
    const void *mask_weight, *mask_bias; /* backward_reduce/apply IN, read with relu */
    double eps, momentum, count;
    int accumulate, relu, num_threads;
} fastbn_bn_call;

typedef int (*fastbn_bn_fn)(const fastbn_bn_call *call);

/* One array per kernel, indexed by enum fastbn_dtype; a NULL entry means
 * the dtype has no kernel (the bridge raises TypeError). */
typedef struct fastbn_bn_kernels {
    fastbn_bn_fn eval_forward[FB_N_DTYPES];
    fastbn_bn_fn train_forward[FB_N_DTYPES];
    fastbn_bn_fn backward[FB_N_DTYPES];
    fastbn_bn_fn backward_eval[FB_N_DTYPES];
    fastbn_bn_fn stats[FB_N_DTYPES];
    fastbn_bn_fn apply[FB_N_DTYPES];
    fastbn_bn_fn backward_reduce[FB_N_DTYPES];
    fastbn_bn_fn backward_apply[FB_N_DTYPES];
    /* float32 -> bfloat16 as the FB_DTYPE_BF16 kernels store (nearest-even,
     * bn_bf16_convert.h), with the AVX512_BF16 instruction when
     * `allow_instruction` and the CPU has it; returns 1 when it was used.
     * For tests of the two conversion paths. */
    int (*round_bf16)(const float *src, uint16_t *dst, fb_index n, int allow_instruction);
} fastbn_bn_kernels;

extern const fastbn_bn_kernels fastbn_bn_kernels_baseline;
#if defined(FASTBN_X86_TARGETS) && FASTBN_X86_TARGETS
extern const fastbn_bn_kernels fastbn_bn_kernels_avx2;
extern const fastbn_bn_kernels fastbn_bn_kernels_avx512;
#endif

static inline const fastbn_bn_kernels *fastbn_bn_kernels_for(int target)
{
#if defined(FASTBN_X86_TARGETS) && FASTBN_X86_TARGETS
    if (target == FASTBN_TARGET_AVX512)
        return &fastbn_bn_kernels_avx512;
    if (target == FASTBN_TARGET_AVX2)
        return &fastbn_bn_kernels_avx2;
#endif
    (void)target;
    return &fastbn_bn_kernels_baseline;
}

#endif /* FASTBN_BN_KERNELS_H */
