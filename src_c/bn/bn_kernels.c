/* bn_kernels.c -- batch-norm kernels for one SIMD target (FASTBN_TARGET),
 * both dtypes from the same templates. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../common/fb_parallel.h"
#include "bn_kernels.h"
#include "bn_plan.h"
#include "../common/fb_simd.h"

/* section: float32 ---------------------------------------------------------- */
#define FB_REAL float
#define FB_REAL_BITS uint32_t  /* same size as FB_REAL (bn_relu_masked_scalar) */
#define FB_DTYPE f32
#include "bn_relu_impl.h"
#include "bn_span_impl.h"
#include "bn_affine_impl.h"
#include "bn_train_impl.h"
#include "bn_entry_impl.h"
#undef FB_REAL
#undef FB_REAL_BITS
#undef FB_DTYPE

/* section: float64 ---------------------------------------------------------- */
#define FB_REAL double
#define FB_REAL_BITS uint64_t
#define FB_DTYPE f64
#include "bn_relu_impl.h"
#include "bn_span_impl.h"
#include "bn_affine_impl.h"
#include "bn_train_impl.h"
#include "bn_entry_impl.h"
#undef FB_REAL
#undef FB_REAL_BITS
#undef FB_DTYPE

/* section: bfloat16 activations, float32 per-channel vectors ----------------- */
#include "bn_bf16_impl.h"

/* section: table ------------------------------------------------------------ */
/* bfloat16 (FB_DTYPE_BF16): the fused kernels; the split phases stay NULL. */
const fastbn_bn_kernels FB_TARGETED(fastbn_bn_kernels) = {
    .eval_forward = {[FB_DTYPE_F32] = bn_eval_forward_call_f32,
        [FB_DTYPE_F64] = bn_eval_forward_call_f64,
        [FB_DTYPE_BF16] = bn_eval_forward_call_bf16},
    .train_forward = {[FB_DTYPE_F32] = bn_train_forward_call_f32,
        [FB_DTYPE_F64] = bn_train_forward_call_f64,
        [FB_DTYPE_BF16] = bn_train_forward_call_bf16},
    .backward = {[FB_DTYPE_F32] = bn_backward_call_f32,
        [FB_DTYPE_F64] = bn_backward_call_f64,
        [FB_DTYPE_BF16] = bn_backward_call_bf16},
    .backward_eval = {[FB_DTYPE_F32] = bn_backward_eval_call_f32,
        [FB_DTYPE_F64] = bn_backward_eval_call_f64,
        [FB_DTYPE_BF16] = bn_backward_eval_call_bf16},
    .stats = {[FB_DTYPE_F32] = bn_stats_call_f32,
        [FB_DTYPE_F64] = bn_stats_call_f64},
    .apply = {[FB_DTYPE_F32] = bn_apply_call_f32,
        [FB_DTYPE_F64] = bn_apply_call_f64},
    .backward_reduce = {[FB_DTYPE_F32] = bn_backward_reduce_call_f32,
        [FB_DTYPE_F64] = bn_backward_reduce_call_f64},
    .backward_apply = {[FB_DTYPE_F32] = bn_backward_apply_call_f32,
        [FB_DTYPE_F64] = bn_backward_apply_call_f64},
    .round_bf16 = bn_round_bf16,
};
