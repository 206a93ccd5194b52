/* optim_kernels.c -- optimizer kernels for one SIMD target (FASTBN_TARGET):
 * the multi-tensor work splitter, then both dtypes from optim_impl.h, then
 * the bfloat16 storage layouts (optim_bf16_impl.h). */
#include <math.h>
#include <stdlib.h>

#include "../common/fb_bf16.h"
#include "../common/fb_parallel.h"
#include "optim_kernels.h"

/* section: the multi-tensor work splitter ------------------------------------- */

/* What one kernel call passes to its per-chunk function. */
typedef struct optim_call {
    const fastbn_optim_batch *batch;
    const double *scalars;
    int flags;
    double factor;    /* scale */
    double *partials; /* reductions: one slot per chunk */
} optim_call;

/* Process elements [begin, end) of tensor t, which form global chunk `chunk`. */
typedef void (*optim_chunk_fn)(const optim_call *call, fb_index t, fb_index chunk,
                               fb_index begin, fb_index end);

static inline fb_index optim_n_chunks(const fastbn_optim_batch *batch)
{
    return batch->n_tensors ? batch->chunk_start[batch->n_tensors] : 0;
}

static int optim_batch_ok(const fastbn_optim_batch *batch)
{
    if (!batch || batch->n_tensors < 0 || batch->n_elements < 0)
        return 0;
    if (batch->n_tensors == 0)
        return 1;
    return batch->param && batch->size && batch->chunk_start && batch->chunk_start[0] == 0;
}

/* Last tensor whose first chunk is <= chunk (binary search over chunk_start). */
static fb_index optim_tensor_of_chunk(const fastbn_optim_batch *batch, fb_index chunk)
{
    fb_index low = 0, high = batch->n_tensors;
    while (high - low > 1) {
        const fb_index middle = low + (high - low) / 2;
        if (batch->chunk_start[middle] <= chunk)
            low = middle;
        else
            high = middle;
    }
    return low;
}

/* Run chunk_fn over every chunk of the batch: one parallel region, each
 * thread a contiguous share of the chunk list (equal counts).  Empty tensors
 * own no chunk and are skipped. */
static void optim_run(const optim_call *call, optim_chunk_fn chunk_fn, int num_threads)
{
    const fastbn_optim_batch *batch = call->batch;
    const fb_index n_chunks = optim_n_chunks(batch);
    if (n_chunks == 0)
        return;
    const int nt = fb_threads_for(batch->n_elements, num_threads);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        fb_index first, last;
        fb_split_range(n_chunks, fb_team_size(), fb_thread_id(), &first, &last);
        if (first < last) {
            fb_index t = optim_tensor_of_chunk(batch, first);
            for (fb_index chunk = first; chunk < last; ++chunk) {
                while (chunk >= batch->chunk_start[t + 1])
                    ++t;
                const fb_index begin = (chunk - batch->chunk_start[t]) * FASTBN_OPTIM_CHUNK;
                const fb_index end = begin + FASTBN_OPTIM_CHUNK < batch->size[t]
                                         ? begin + FASTBN_OPTIM_CHUNK : batch->size[t];
                chunk_fn(call, t, chunk, begin, end);
            }
        }
    }
}

/* section: storage ------------------------------------------------------------ */

/* Where a chunk's bfloat16 stores get their random bits (see fb_bf16.h):
 * element i of the chunk hashes word_base[0] + i for slots 0 and 1, and
 * word_base[w] + (i >> 1) for slot 2 (w = 1) and slot 3 (w = 2), where
 * word_base[w] = word key w + (low 32 bits of the chunk's first element
 * index, or of its first pair index); and, with master weights, the
 * bfloat16 parameter (offset to the chunk) that receives the rounded master
 * value.  Zero in the float kernels, which do not round. */
typedef struct fb_rounding {
    uint32_t word_base[3];
    uint16_t *param_copy;
} fb_rounding;

/* Plain float storage: the float32/float64 kernels. */
#define FB_PARAM_T FB_REAL
#define FB_GRAD_T FB_REAL
#define FB_STATE_T FB_REAL
#define FB_LOAD_PARAM(array, i) ((array)[i])
#define FB_LOAD_GRAD(array, i) ((array)[i])
#define FB_LOAD_STATE(array, i) ((array)[i])
#define FB_STORE_PARAM(array, i, value) ((array)[i] = (value))
#define FB_STORE_STATE(array, i, slot, value) ((array)[i] = (value))
#define FB_ROUNDS 0
#define FB_PAIRS 0
#define FB_INDEX_T fb_index

/* section: float32 ------------------------------------------------------------ */
#define FB_REAL float
#define FB_DTYPE f32
#define FB_SQRT sqrtf
#define FB_FABS fabsf
#include "optim_impl.h"
#undef FB_REAL
#undef FB_DTYPE
#undef FB_SQRT
#undef FB_FABS

/* section: float64 ------------------------------------------------------------ */
#define FB_REAL double
#define FB_DTYPE f64
#define FB_SQRT sqrt
#define FB_FABS fabs
#include "optim_impl.h"
#undef FB_REAL
#undef FB_DTYPE
#undef FB_SQRT
#undef FB_FABS

#undef FB_PARAM_T
#undef FB_GRAD_T
#undef FB_STATE_T
#undef FB_LOAD_PARAM
#undef FB_LOAD_GRAD
#undef FB_LOAD_STATE
#undef FB_STORE_PARAM
#undef FB_STORE_STATE
#undef FB_ROUNDS
#undef FB_PAIRS
#undef FB_INDEX_T

/* section: bfloat16 storage layouts -------------------------------------------- */
#include "optim_bf16_impl.h"

/* section: table -------------------------------------------------------------- */
const fastbn_optim_kernels FB_TARGETED(fastbn_optim_kernels) = {
    .step_f32 = {
        [FASTBN_OPTIM_FAMILY_SGD] = sgd_step_f32,
        [FASTBN_OPTIM_FAMILY_MOMENTUM] = momentum_step_f32,
        [FASTBN_OPTIM_FAMILY_RMSPROP] = rmsprop_step_f32,
        [FASTBN_OPTIM_FAMILY_ADAM] = adam_step_f32,
        [FASTBN_OPTIM_FAMILY_ADAGRAD] = adagrad_step_f32,
        [FASTBN_OPTIM_FAMILY_LION] = lion_step_f32,
        [FASTBN_OPTIM_FAMILY_NADAM] = nadam_step_f32,
        [FASTBN_OPTIM_FAMILY_RADAM] = radam_step_f32,
        [FASTBN_OPTIM_FAMILY_ADADELTA] = adadelta_step_f32,
        [FASTBN_OPTIM_FAMILY_ADAMAX] = adamax_step_f32,
        [FASTBN_OPTIM_FAMILY_LERP] = lerp_step_f32,
    },
    .step_f64 = {
        [FASTBN_OPTIM_FAMILY_SGD] = sgd_step_f64,
        [FASTBN_OPTIM_FAMILY_MOMENTUM] = momentum_step_f64,
        [FASTBN_OPTIM_FAMILY_RMSPROP] = rmsprop_step_f64,
        [FASTBN_OPTIM_FAMILY_ADAM] = adam_step_f64,
        [FASTBN_OPTIM_FAMILY_ADAGRAD] = adagrad_step_f64,
        [FASTBN_OPTIM_FAMILY_LION] = lion_step_f64,
        [FASTBN_OPTIM_FAMILY_NADAM] = nadam_step_f64,
        [FASTBN_OPTIM_FAMILY_RADAM] = radam_step_f64,
        [FASTBN_OPTIM_FAMILY_ADADELTA] = adadelta_step_f64,
        [FASTBN_OPTIM_FAMILY_ADAMAX] = adamax_step_f64,
        [FASTBN_OPTIM_FAMILY_LERP] = lerp_step_f64,
    },
    .sumsq_f32 = sumsq_f32,
    .sumsq_f64 = sumsq_f64,
    .maxabs_f32 = maxabs_f32,
    .maxabs_f64 = maxabs_f64,
    .scale_f32 = scale_f32,
    .scale_f64 = scale_f64,
    .step_bf16 = {
        FB_BF16_LAYOUT_TABLE(FASTBN_OPTIM_BF16_STATE, bs),
        FB_BF16_LAYOUT_TABLE(FASTBN_OPTIM_BF16_PARAMS, bp),
        FB_BF16_LAYOUT_TABLE(FASTBN_OPTIM_BF16_PARAMS_STATE, bpbs),
        FB_BF16_LAYOUT_TABLE(FASTBN_OPTIM_BF16_MASTER, mw),
        FB_BF16_LAYOUT_TABLE(FASTBN_OPTIM_BF16_MASTER_STATE, mwbs),
    },
    .round_bf16 = round_bf16,
};
