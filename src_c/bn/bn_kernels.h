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

/* y = x * alpha[c] + beta[c], alpha = weight / sqrt(running_var + eps),
 * beta = bias - running_mean * alpha.  y may equal x (in place). */
#define FASTBN_BN_EVAL_FORWARD_ARGS(real)                                          \
    const real *x, real *y, fb_index outer, fb_index channels, fb_index inner,     \
    const real *running_mean, const real *running_var, const real *weight,         \
    const real *bias, double eps, int num_threads

typedef struct fastbn_bn_kernels {
    int (*eval_forward_f32)(FASTBN_BN_EVAL_FORWARD_ARGS(float));
    int (*eval_forward_f64)(FASTBN_BN_EVAL_FORWARD_ARGS(double));
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
