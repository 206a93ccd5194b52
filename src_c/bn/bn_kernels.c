/* bn_kernels.c -- batch-norm kernels for one SIMD target (FASTBN_TARGET),
 * both dtypes from the same templates. */
#include <math.h>
#include <stdlib.h>

#include "../common/fb_parallel.h"
#include "bn_kernels.h"
#include "bn_plan.h"
#include "bn_simd.h"

/* section: float32 ---------------------------------------------------------- */
#define FB_REAL float
#define FB_DTYPE f32
#include "bn_relu_impl.h"
#include "bn_span_impl.h"
#include "bn_affine_impl.h"
#include "bn_train_impl.h"
#undef FB_REAL
#undef FB_DTYPE

/* section: float64 ---------------------------------------------------------- */
#define FB_REAL double
#define FB_DTYPE f64
#include "bn_relu_impl.h"
#include "bn_span_impl.h"
#include "bn_affine_impl.h"
#include "bn_train_impl.h"
#undef FB_REAL
#undef FB_DTYPE

/* section: table ------------------------------------------------------------ */
const fastbn_bn_kernels FB_TARGETED(fastbn_bn_kernels) = {
    .eval_forward_f32 = bn_eval_forward_f32,
    .eval_forward_f64 = bn_eval_forward_f64,
    .train_forward_f32 = bn_train_forward_f32,
    .train_forward_f64 = bn_train_forward_f64,
    .backward_f32 = bn_backward_f32,
    .backward_f64 = bn_backward_f64,
    .backward_eval_f32 = bn_backward_eval_f32,
    .backward_eval_f64 = bn_backward_eval_f64,
    .stats_f32 = bn_stats_f32,
    .stats_f64 = bn_stats_f64,
    .apply_f32 = bn_apply_f32,
    .apply_f64 = bn_apply_f64,
    .backward_reduce_f32 = bn_backward_reduce_f32,
    .backward_reduce_f64 = bn_backward_reduce_f64,
    .backward_apply_f32 = bn_backward_apply_f32,
    .backward_apply_f64 = bn_backward_apply_f64,
};
