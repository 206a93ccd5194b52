/* optim_bf16_layout.h -- one instantiation of optim_impl.h for a bfloat16
 * storage layout (see optim_bf16_impl.h): FB_BF16_PARAM, FB_BF16_STATE,
 * FB_STOCHASTIC and FB_DTYPE set by the includer; FB_STOCHASTIC and
 * FB_DTYPE are consumed (undefined) here.  No include guard: included once
 * per layout. */
#define FB_REAL float
#define FB_SQRT sqrtf
#define FB_FABS fabsf
#define FB_ROUNDS 1
#define FB_INDEX_T int32_t
#define FB_PAIRS (FB_BF16_PARAM == 1 && FB_BF16_STATE && FB_PAIRS_POSSIBLE)

#define FB_LOAD_WIDENED(array, i) fb_bf16_to_f32((array)[i])
#define FB_LOAD_PLAIN(array, i) ((array)[i])

#if FB_BF16_STATE
#define FB_STATE_T uint16_t
#define FB_LOAD_STATE FB_LOAD_WIDENED
#define FB_STORE_STATE(array, i, slot, value) \
    ((array)[i] = fb_bf16_store((value), rounding, (i), (slot), FB_STOCHASTIC))
#else
#define FB_STATE_T float
#define FB_LOAD_STATE FB_LOAD_PLAIN
#define FB_STORE_STATE(array, i, slot, value) ((array)[i] = (value))
#endif

#if FB_BF16_PARAM == 1
#define FB_PARAM_T uint16_t
#define FB_GRAD_T uint16_t
#define FB_LOAD_PARAM FB_LOAD_WIDENED
#define FB_LOAD_GRAD FB_LOAD_WIDENED
#define FB_STORE_PARAM(array, i, value) \
    ((array)[i] = fb_bf16_store((value), rounding, (i), FB_BF16_PARAM_SLOT, FB_STOCHASTIC))
#elif FB_BF16_PARAM == 2
#define FB_PARAM_T float
#define FB_GRAD_T uint16_t
#define FB_LOAD_PARAM FB_LOAD_PLAIN
#define FB_LOAD_GRAD FB_LOAD_WIDENED
#define FB_STORE_PARAM(array, i, value) \
    ((array)[i] = (value), rounding.param_copy[i] = fb_f32_to_bf16_nearest((array)[i]))
#else
#define FB_PARAM_T float
#define FB_GRAD_T float
#define FB_LOAD_PARAM FB_LOAD_PLAIN
#define FB_LOAD_GRAD FB_LOAD_PLAIN
#define FB_STORE_PARAM(array, i, value) ((array)[i] = (value))
#endif

#include "optim_impl.h"

#undef FB_REAL
#undef FB_SQRT
#undef FB_FABS
#undef FB_ROUNDS
#undef FB_INDEX_T
#undef FB_PAIRS
#undef FB_LOAD_WIDENED
#undef FB_LOAD_PLAIN
#undef FB_STATE_T
#undef FB_LOAD_STATE
#undef FB_STORE_STATE
#undef FB_PARAM_T
#undef FB_GRAD_T
#undef FB_LOAD_PARAM
#undef FB_LOAD_GRAD
#undef FB_STORE_PARAM
#undef FB_STOCHASTIC
#undef FB_DTYPE
