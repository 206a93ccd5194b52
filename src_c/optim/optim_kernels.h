/* optim_kernels.h -- the optimizer kernel family: fused multi-tensor updates
 * (SGD, Momentum, RMSprop, Adam/AdamW, Adagrad, Lion, NAdam, RAdam, Adadelta,
 * Adamax), the weight-averaging lerp of swa_utils and the gradient-norm
 * pieces of clip_grad_norm_, with one table of function pointers per SIMD
 * target.
 *
 * One call updates every tensor of a batch: n_tensors tuples (param, grad,
 * state...) of one dtype, each a C-contiguous buffer of size[i] elements.
 * Each tensor is cut into chunks of FASTBN_OPTIM_CHUNK elements (the last one
 * shorter); the chunks of all tensors form one work list that the threads of
 * a single parallel region split into contiguous, equal-count shares, so a
 * thousand small tensors and one huge tensor both keep every thread busy.
 * Chunk boundaries do not depend on the thread count, so every element is
 * computed by the same instructions whatever the split: results are
 * bit-identical for any number of threads.
 *
 * Scalar math (bias corrections, 1 - beta, decayed learning rates) is done by
 * the caller: `scalars` holds the group's values, `coefficients` (optional)
 * a row of per-tensor values for tensors whose step counters differ.
 */
#ifndef FASTBN_OPTIM_KERNELS_H
#define FASTBN_OPTIM_KERNELS_H

#include "../common/fastbn_common.h"

/* Elements per work chunk: 16 KB of float32 per stream, many vectors long,
 * and small enough that 2-8 threads get balanced shares of a 100K-element
 * tensor list. */
#define FASTBN_OPTIM_CHUNK ((fb_index)4096)

/* State slots a family uses (see each family's comment below). */
#define FASTBN_OPTIM_MAX_STATE 3

/* Per-tensor coefficients a family may take (NAdam and RAdam use 3). */
#define FASTBN_OPTIM_MAX_COEFFICIENTS 4

/* Option bits of `flags` (must equal fastbn/optim/_fused.py). */
enum fastbn_optim_flag {
    FASTBN_OPTIM_MAXIMIZE = 1 << 0,     /* g = -g first */
    FASTBN_OPTIM_WEIGHT_DECAY = 1 << 1, /* weight_decay != 0 */
    FASTBN_OPTIM_MOMENTUM = 1 << 2,     /* SGD / RMSprop momentum buffer in use */
    FASTBN_OPTIM_NESTEROV = 1 << 3,     /* SGD */
    FASTBN_OPTIM_CENTERED = 1 << 4,     /* RMSprop */
    FASTBN_OPTIM_AMSGRAD = 1 << 5,      /* Adam */
    FASTBN_OPTIM_DECOUPLED = 1 << 6,    /* Adam, NAdam, RAdam: decoupled weight decay */
    /* bfloat16 kernels: stochastic rounding of the stored state and of
     * bfloat16 parameters (nearest-even without it).  A high bit, clear of
     * the per-family options. */
    FASTBN_OPTIM_STOCHASTIC_ROUNDING = 1 << 16
};

typedef struct fastbn_optim_batch {
    fb_index n_tensors;
    fb_index n_elements;                       /* sum of size[] */
    void *const *param;                        /* [n_tensors] IN/OUT (or the gradients to scale) */
    const void *const *grad;                   /* [n_tensors] IN */
    void *const *state[FASTBN_OPTIM_MAX_STATE]; /* [n_tensors] IN/OUT each; NULL (or NULL
                                                  entries) where the slot is unused */
    const fb_index *size;                      /* [n_tensors] elements */
    const fb_index *chunk_start;               /* [n_tensors + 1] first chunk of each tensor */
    const double *coefficients;                /* [n_tensors][coefficient_stride] or NULL */
    fb_index coefficient_stride;
    /* bfloat16 kernels only: [n_tensors] generator key of each tensor
     * (fb_bf16_tensor_key of seed, step and position in its group). */
    const uint64_t *rounding_key;
    /* FASTBN_OPTIM_BF16_MASTER* layouts only: [n_tensors] the bfloat16
     * parameters, written with the nearest-even rounding of the updated
     * float32 master weights (which `param` holds). */
    void *const *param_copy;
} fastbn_optim_batch;

/* Every update kernel: (batch, group scalars, option flags, threads).
 *
 * sgd       scalars {lr, weight_decay, momentum}; coefficients {buffer decay,
 *           gradient weight} = {momentum, 1 - dampening}, or {0, 1} on a
 *           buffer's first step (the buffer holds zeros then, so b = g);
 *           state {momentum_buffer} when FASTBN_OPTIM_MOMENTUM.
 * momentum  scalars {lr, weight_decay, beta, 1 - beta}; state {momentum_buffer}.
 * rmsprop   scalars {lr, weight_decay, alpha, 1 - alpha, eps, momentum};
 *           state {square_avg, grad_avg (centered), momentum_buffer}.
 * adam      scalars {weight_decay, beta1, 1 - beta1, beta2, 1 - beta2,
 *           1 - lr * weight_decay}; coefficients {a, b}: param -= a * m /
 *           (sqrt(v) + b); state {exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad)}.
 * adagrad   scalars {weight_decay, eps}; coefficients {clr}; state {sum}.
 * lion      scalars {lr, weight_decay, beta1, 1 - beta1, beta2, 1 - beta2};
 *           state {exp_avg}.
 * nadam     scalars as adam; coefficients {grad weight, exp_avg weight, eps_hat}:
 *           param -= (cg * g + cm * m) / (sqrt(v) + eps_hat);
 *           state {exp_avg, exp_avg_sq}.
 * radam     scalars as adam; coefficients {a, b, adaptive}: adaptive != 0
 *           param -= a * m / (sqrt(v) + b), else param -= a * m;
 *           state {exp_avg, exp_avg_sq}.
 * adadelta  scalars {lr, weight_decay, rho, 1 - rho, eps};
 *           state {square_avg, acc_delta}.
 * adamax    scalars {weight_decay, beta1, 1 - beta1, beta2, eps};
 *           coefficients {lr / (1 - beta1**t)}; state {exp_avg, exp_inf}.
 * lerp      param[] (the averages) += w * (grad[] (current values) - param[]),
 *           torch.lerp's form; scalars {w, 1 - w}; no state, flags unused.
 */
#define FASTBN_OPTIM_STEP_ARGS \
    const fastbn_optim_batch *batch, const double *scalars, int flags, int num_threads

/* Sum of squares of every element of batch->param[] in float64: one partial
 * per chunk (`partials`, n_chunks doubles of workspace), added in chunk
 * order. */
#define FASTBN_OPTIM_SUMSQ_ARGS \
    const fastbn_optim_batch *batch, double *partials, double *result, int num_threads

/* Largest |x| over batch->param[] (nan if any element is nan). */
#define FASTBN_OPTIM_MAXABS_ARGS \
    const fastbn_optim_batch *batch, double *partials, double *result, int num_threads

/* batch->param[] *= factor (rounded to the dtype first). */
#define FASTBN_OPTIM_SCALE_ARGS const fastbn_optim_batch *batch, double factor, int num_threads

typedef int (*fastbn_optim_step_fn)(FASTBN_OPTIM_STEP_ARGS);

enum fastbn_optim_family {
    FASTBN_OPTIM_FAMILY_SGD = 0,
    FASTBN_OPTIM_FAMILY_MOMENTUM = 1,
    FASTBN_OPTIM_FAMILY_RMSPROP = 2,
    FASTBN_OPTIM_FAMILY_ADAM = 3,
    FASTBN_OPTIM_FAMILY_ADAGRAD = 4,
    FASTBN_OPTIM_FAMILY_LION = 5,
    FASTBN_OPTIM_FAMILY_NADAM = 6,
    FASTBN_OPTIM_FAMILY_RADAM = 7,
    FASTBN_OPTIM_FAMILY_ADADELTA = 8,
    FASTBN_OPTIM_FAMILY_ADAMAX = 9,
    FASTBN_OPTIM_FAMILY_LERP = 10,
    FASTBN_OPTIM_N_FAMILIES = 11
};

/* bfloat16 storage layouts: what is bfloat16 in a step_bf16 call (the
 * update itself is float32 arithmetic, as step_f32's, in every layout).
 *   STATE          float32 param and grad, bfloat16 state;
 *   PARAMS         bfloat16 param and grad (rounded like the state, slot 3
 *                  of the generator), float32 state;
 *   PARAMS_STATE   bfloat16 param, grad and state;
 *   MASTER         bfloat16 grad; `param` holds float32 master weights,
 *                  `param_copy` the bfloat16 parameters (nearest-even of
 *                  the master); float32 state;
 *   MASTER_STATE   as MASTER with bfloat16 state. */
enum fastbn_optim_bf16_layout {
    FASTBN_OPTIM_BF16_STATE = 0,
    FASTBN_OPTIM_BF16_PARAMS = 1,
    FASTBN_OPTIM_BF16_PARAMS_STATE = 2,
    FASTBN_OPTIM_BF16_MASTER = 3,
    FASTBN_OPTIM_BF16_MASTER_STATE = 4,
    FASTBN_OPTIM_BF16_N_LAYOUTS = 5
};

typedef struct fastbn_optim_kernels {
    fastbn_optim_step_fn step_f32[FASTBN_OPTIM_N_FAMILIES]; /* indexed by fastbn_optim_family */
    fastbn_optim_step_fn step_f64[FASTBN_OPTIM_N_FAMILIES];
    int (*sumsq_f32)(FASTBN_OPTIM_SUMSQ_ARGS);
    int (*sumsq_f64)(FASTBN_OPTIM_SUMSQ_ARGS);
    int (*maxabs_f32)(FASTBN_OPTIM_MAXABS_ARGS);
    int (*maxabs_f64)(FASTBN_OPTIM_MAXABS_ARGS);
    int (*scale_f32)(FASTBN_OPTIM_SCALE_ARGS);
    int (*scale_f64)(FASTBN_OPTIM_SCALE_ARGS);
    /* The bfloat16 layouts (indexed by fastbn_optim_bf16_layout): the
     * float32 update of the family (the same arithmetic as step_f32) on
     * widened values, each bfloat16 array stored back rounded
     * (batch->rounding_key, flag FASTBN_OPTIM_STOCHASTIC_ROUNDING).  NULL
     * for families without bfloat16 storage. */
    fastbn_optim_step_fn step_bf16[FASTBN_OPTIM_BF16_N_LAYOUTS][FASTBN_OPTIM_N_FAMILIES];
    /* dst = src rounded to bfloat16 exactly as those kernels store slot
     * `slot` (0-2 state, 3 parameter) of a tensor with generator key `key`. */
    int (*round_bf16)(const float *src, uint16_t *dst, fb_index n, uint64_t key, int slot,
                      int stochastic);
} fastbn_optim_kernels;

extern const fastbn_optim_kernels fastbn_optim_kernels_baseline;
#if defined(FASTBN_X86_TARGETS) && FASTBN_X86_TARGETS
extern const fastbn_optim_kernels fastbn_optim_kernels_avx2;
extern const fastbn_optim_kernels fastbn_optim_kernels_avx512;
#endif

static inline const fastbn_optim_kernels *fastbn_optim_kernels_for(int target)
{
#if defined(FASTBN_X86_TARGETS) && FASTBN_X86_TARGETS
    if (target == FASTBN_TARGET_AVX512)
        return &fastbn_optim_kernels_avx512;
    if (target == FASTBN_TARGET_AVX2)
        return &fastbn_optim_kernels_avx2;
#endif
    (void)target;
    return &fastbn_optim_kernels_baseline;
}

/* Chunks of a tensor of `size` elements. */
static inline fb_index fastbn_optim_chunks_of(fb_index size)
{
    return (size + FASTBN_OPTIM_CHUNK - 1) / FASTBN_OPTIM_CHUNK;
}

#endif /* FASTBN_OPTIM_KERNELS_H */
