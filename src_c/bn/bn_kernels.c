/* bn_kernels.c -- batch-norm kernels for one SIMD target (FASTBN_TARGET),
 * both dtypes from the same templates. */
#include <math.h>
#include <stdlib.h>

#include "../common/fb_parallel.h"
#include "bn_kernels.h"

/* section: float32 ---------------------------------------------------------- */
#define FB_REAL float
#define FB_DTYPE f32
#include "bn_affine_impl.h"
#undef FB_REAL
#undef FB_DTYPE

/* section: float64 ---------------------------------------------------------- */
#define FB_REAL double
#define FB_DTYPE f64
#include "bn_affine_impl.h"
#undef FB_REAL
#undef FB_DTYPE

/* section: table ------------------------------------------------------------ */
const fastbn_bn_kernels FB_TARGETED(fastbn_bn_kernels) = {
    .eval_forward_f32 = bn_eval_forward_f32,
    .eval_forward_f64 = bn_eval_forward_f64,
};
