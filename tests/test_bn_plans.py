"""The parallel plans of the batch-norm kernels on 2-D (N, C) and
channels-last inputs: the flat channel-wrapping rewrite (bn_span_wrap), the
vectorized channel sums, and the owned-columns plan (threads own channel
ranges, no barrier).  Every kernel against the NumPy reference on every SIMD
target, both dtypes, odd channel and row counts and sizes on both sides of
each threshold; results bit-identical for 1, 2 and 3 threads."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import reference as R

from conftest import assert_close

DTYPES = [np.float32, np.float64]

# (N, C) shapes: odd channel counts (1, 3, 17 and 63/65 around a vector
# multiple, 4097 past the 512-channel group width), odd row counts, and
# channel counts around 128/192 (the owned-columns threshold of an earlier
# plan, 64 channels per thread).
SHAPES_NC = [(2, 1), (3, 3), (33, 17), (2, 63), (33, 65), (3, 4097), (257, 127), (256, 128),
             (170, 191), (171, 192), (127, 257), (128, 256), (129, 256), (300, 600)]
# Shapes on both sides of the thread threshold (1 MiB moved per call: from
# 2049 x 64 float32 values the training forward runs on two threads, below it
# only the backward does), of the 64-row minimum row chunk (63/65 rows, 2047
# rows leaving a 63-row last chunk), and of the 8-then-4-then-1-row steps of
# the interleaved reduction (row counts 1..15 past a multiple of 8).
SHAPES_THREADS = [(63, 64), (65, 72), (2047, 64), (2049, 64), (1031, 136), (700, 400),
                  (129, 4097), (4, 30, 30, 150)]
# channels-last (N, H, W, C) and (N, D, H, W, C): the channel wraps inside a
# work item, and across the stretches of the threads.
SHAPES_CL = [(2, 5, 7, 3), (3, 4, 5, 17), (2, 9, 9, 63), (2, 6, 6, 129), (2, 2, 3, 4, 33)]
# The paired rewrite (first and second half of the rows together, then the
# halves' vector tails and the last rows; the half rounded to a whole number
# of vectors where enough rows allow): half-row counts just below and at the
# 64-element minimum (2 x 63, 2 x 64, 4 x 32), tails of 1..15 elements past a
# vector (5 x 33, 7 x 100), an odd last row (9 x 100, 3 x 3 x 3 x 50); past
# the 512-channel group width (7 x 1030: two 515-channel groups, an odd row
# count; whole rows on one thread -- pieces of rows pair when threads split a
# row chunk's groups, SHAPES_ALIGNMENT's (300, 1030)).
SHAPES_PAIRED = [(2, 63), (2, 64), (4, 32), (5, 33), (7, 100), (9, 100), (3, 3, 3, 50),
                 (7, 1030)]


def make(rng, shape, dtype, axis=-1):
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.normal(1.0, 0.5, channels).astype(dtype)
    bias = rng.normal(0.0, 0.5, channels).astype(dtype)
    running_mean = rng.normal(3.0, 0.5, channels).astype(dtype)
    running_var = (np.abs(rng.standard_normal(channels)) + 0.5).astype(dtype)
    # no value on the eval ReLU's edge: where (x - running_mean) * scale +
    # bias is within rounding of 0, whether the mask keeps dy depends on the
    # target's contraction of that expression (FMA or not), not on the plan
    # ((200, 8204) float32, seed 7: one value at -1.1e-9 kept by avx2,
    # masked by the reference and baseline)
    view = [1] * x.ndim
    view[axis] = channels
    scale = (weight.astype(np.float64) / np.sqrt(running_var.astype(np.float64) + 1e-5))
    scale = scale.reshape(view)
    pre = (x - running_mean.reshape(view).astype(np.float64)) * scale + bias.reshape(view)
    edge = np.abs(pre) < 1e-3
    x = np.where(edge, x + 0.05 * np.sign(scale), x).astype(dtype)
    return x, dy, weight, bias, running_mean, running_var


def run_all(module, x, dy, weight, bias, running_mean, running_var, axis=-1):
    """Every kernel family with the channels on `axis` (channels-last by
    default): forward and backward, training and eval, plain and fused with
    ReLU.  Returns every output and every mutated buffer."""
    rm, rv = running_mean.copy(), running_var.copy()
    y, mean, invstd = module.batch_norm_forward_train(x, weight, bias, 1e-5, axis=axis,
                                                      running_mean=rm, running_var=rv)
    y_eval = module.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                               axis=axis)
    dx, dweight, dbias = module.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    dx_eval = module.batch_norm_backward_eval(dy, x, running_mean, running_var, weight,
                                              axis=axis)
    yr, mean_r, invstd_r = module.batch_norm_relu_forward_train(x, weight, bias, axis=axis)
    dxr = module.batch_norm_relu_backward(dy, x, mean_r, invstd_r, weight, bias, axis=axis)
    dxr_eval = module.batch_norm_relu_backward_eval(dy, x, running_mean, running_var, weight,
                                                    bias, axis=axis)
    yr_eval = module.batch_norm_relu(x, running_mean, running_var, weight, bias,
                                     training=False, axis=axis)
    flat = [y, mean, invstd, rm, rv, y_eval, dx, dweight, dbias, yr, mean_r, invstd_r, yr_eval]
    for result in (dx_eval, dxr, dxr_eval):
        flat.extend(result if isinstance(result, tuple) else (result,))
    return [np.asarray(a) for a in flat if a is not None]


@pytest.fixture
def threads():
    yield fastbn.set_num_threads
    fastbn.set_num_threads(None)


def assert_kernels_match_the_reference(threads, inputs, dtype, axis):
    """Every output and mutated buffer of run_all on 1 and 2 threads is close
    to the reference's."""
    expected = run_all(R, *inputs, axis=axis)
    for count in (1, 2):
        threads(count)
        actual = run_all(F, *inputs, axis=axis)
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected):
            assert_close(got, want, dtype, scale=10)


def assert_bits_do_not_depend_on_the_thread_count(threads, inputs, axis):
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(run_all(F, *inputs, axis=axis))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


def assert_backward_matches_the_reference_for_1_2_3_threads(threads, inputs, dtype):
    """Every kernel of run_all on channels-last `inputs` matches the reference
    and is bit identical for 1, 2 and 3 threads; so are the split phases'
    backward sums (float64 sums of `dtype` terms: compared to the reference
    at the tolerance of `dtype`)."""
    assert_kernels_match_the_reference(threads, inputs, dtype, axis=-1)
    assert_bits_do_not_depend_on_the_thread_count(threads, inputs, axis=-1)
    x, dy, weight, bias, _, _ = inputs
    mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1)[1:]
    sums = []
    for count in (1, 2, 3):
        threads(count)
        sums.append(F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=-1))
    want = R.batch_norm_backward_reduce(dy, x, mean, invstd, axis=-1)
    for got, expected in zip(sums[0], want):
        assert_close(np.asarray(got).astype(dtype), np.asarray(expected).astype(dtype), dtype,
                     scale=10)
    for other in sums[1:]:
        for got, first in zip(other, sums[0]):
            np.testing.assert_array_equal(got, first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NC + SHAPES_CL + SHAPES_THREADS + SHAPES_PAIRED)
def test_channels_last_kernels_match_the_reference(simd_target, threads, shape, dtype, rng):
    assert_kernels_match_the_reference(threads, make(rng, shape, dtype), dtype, axis=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NC + SHAPES_CL + SHAPES_THREADS + SHAPES_PAIRED
                         + [(1024, 96), (64, 1000)])
def test_channels_last_results_are_bit_identical_for_1_2_and_3_threads(simd_target, threads,
                                                                       shape, dtype, rng):
    assert_bits_do_not_depend_on_the_thread_count(threads, make(rng, shape, dtype), axis=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 65), (128, 256), (300, 600), (2, 6, 6, 129)])
def test_split_phases_compose_to_the_fused_kernels_on_channels_last(simd_target, threads,
                                                                     shape, dtype, rng):
    x, dy, weight, bias, _, _ = make(rng, shape, dtype)
    axis = -1
    for count in (1, 2, 3):
        threads(count)
        y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=axis)
        n, mean64, m2 = F.batch_norm_stats(x, axis=axis)
        invstd64 = 1.0 / np.sqrt(m2 / n + 1e-5)
        np.testing.assert_array_equal(mean64.astype(dtype), mean)
        y_phases = F.batch_norm_apply(x, mean64, invstd64, weight, bias, axis=axis)
        np.testing.assert_array_equal(y_phases, y)
        dx, dweight, dbias = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
        sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
        dx_phases = F.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, n,
                                                axis=axis)
        np.testing.assert_array_equal(dx_phases, dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_unaligned_channels_last_input_and_output(simd_target, threads, offset, dtype, rng):
    """The flat rewrite's vector body starts at any alignment: arrays that
    begin 1 or 3 elements into a buffer give the reference's results."""
    shape = (70, 37)
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, dtype)
    size = x.size
    buffer = np.empty(size + offset, dtype)[offset:].reshape(shape)
    buffer[...] = x
    out = np.empty(size + offset, dtype)[offset:].reshape(shape)
    threads(2)
    y, mean, invstd = F.batch_norm_forward_train(buffer, weight, bias, 1e-5, axis=-1, out=out)
    want = R.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1)
    assert y is out
    assert_close(y, want[0], dtype, scale=10)
    y_eval = F.batch_norm(buffer, running_mean, running_var, weight, bias, training=False,
                          axis=-1, out=out)
    assert_close(y_eval, R.batch_norm(x, running_mean, running_var, weight, bias,
                                      training=False, axis=-1), dtype, scale=10)


def cached_rewrites_into(x, dy, weight, bias, running_mean, running_var, out_offset):
    """Every channels-last kernel that writes an array, each into an `out=`
    buffer starting `out_offset` elements past a 64-byte boundary (placed,
    below): the training and eval forwards, the training and eval backwards,
    and their fused ReLU forms.  Returns every output."""
    def out():
        return placed(np.zeros_like(x), out_offset)
    y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1, out=out())
    results = [y, mean, invstd]
    results.append(F.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                                axis=-1, out=out()))
    results.extend(F.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1, out=out()))
    results.extend(F.batch_norm_backward_eval(dy, x, running_mean, running_var, weight,
                                              axis=-1, out=out()))
    results.append(F.batch_norm_relu_forward_train(x, weight, bias, axis=-1, out=out())[0])
    results.extend(F.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=-1,
                                              out=out()))
    results.append(F.batch_norm_relu(x, running_mean, running_var, weight, bias,
                                     training=False, axis=-1, out=out()))
    results.extend(F.batch_norm_relu_backward_eval(dy, x, running_mean, running_var, weight,
                                                   bias, axis=-1, out=out()))
    return [np.array(a) for a in results]


# Cached (not streamed) channels-last rewrites start their vector stores at a
# vector boundary of the output (a scalar head before it), and pair rows a
# whole number of vectors apart when there are enough rows (else the plain
# half): odd and even channel counts, paired whole rows (70 x 37, 130 x 64,
# 9 x 100), a row chunk past 64 rows, rows shorter than a vector (66 x 3);
# and calls moving over 1 MiB, so that 2 threads really split the work
# (fb_threads_for_bytes): (300, 1030) has two 515-channel groups, whose
# pieces of rows a thread pairs (bn_apply_rows), (4099, 37) many row chunks.
SHAPES_ALIGNMENT = [(70, 37), (9, 100), (130, 64), (7, 1030), (3, 3, 3, 50), (66, 3),
                    (300, 1030), (4099, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_ALIGNMENT)
def test_channels_last_rewrites_give_the_same_bits_at_any_output_alignment(simd_target,
                                                                           threads, shape,
                                                                           dtype, rng):
    """Where the scalar head ends depends on the output's address, so every
    output value must be the same whether a vector or the head computes it:
    inputs and outputs starting 0, 1, 3, 5 or 7 elements past a 64-byte
    boundary give the same bits for 1 and 2 threads, and the reference's
    values."""
    x0, dy0, weight, bias, running_mean, running_var = make(rng, shape, dtype)
    expected = None
    for in_offset, out_offset in ((0, 0), (0, 1), (0, 3), (1, 0), (5, 7), (3, 3)):
        x, dy = placed(x0, in_offset), placed(dy0, in_offset)
        for count in (1, 2):
            threads(count)
            results = cached_rewrites_into(x, dy, weight, bias, running_mean, running_var,
                                           out_offset)
            if expected is None:
                expected = results
                want = cached_rewrites_into_reference(x0, dy0, weight, bias, running_mean,
                                                      running_var)
                assert len(want) == len(results)
                for got, value in zip(results, want):
                    assert_close(got, value, dtype, scale=10)
            for got, value in zip(results, expected):
                np.testing.assert_array_equal(got, value)


def cached_rewrites_into_reference(x, dy, weight, bias, running_mean, running_var):
    """The reference's values of cached_rewrites_into, in its order."""
    y, mean, invstd = R.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1)
    results = [y, mean, invstd]
    results.append(R.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                                axis=-1))
    results.extend(R.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1))
    results.extend(R.batch_norm_backward_eval(dy, x, running_mean, running_var, weight,
                                              axis=-1))
    results.append(R.batch_norm_relu_forward_train(x, weight, bias, axis=-1)[0])
    results.extend(R.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=-1))
    results.append(R.batch_norm_relu(x, running_mean, running_var, weight, bias,
                                     training=False, axis=-1))
    results.extend(R.batch_norm_relu_backward_eval(dy, x, running_mean, running_var, weight,
                                                   bias, axis=-1))
    return [np.asarray(a) for a in results]


def test_large_channels_last_output_streams_and_matches_the_reference(simd_target, threads, rng):
    """Above the streaming-store size (8 MiB outputs): the non-temporal path
    of the flat rewrite, 1 and 3 threads bit-identical."""
    shape, dtype = (8200, 260), np.float32
    x, dy, weight, bias, _, _ = make(rng, shape, dtype)
    outputs = []
    for count in (1, 3):
        threads(count)
        y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1)
        dx = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1)[0]
        outputs.append((y, mean, invstd, dx))
    for got, want in zip(outputs[1], outputs[0]):
        np.testing.assert_array_equal(got, want)
    want = R.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1)
    assert_close(outputs[0][0], want[0], dtype, scale=10)


# Large channels-last arrays (dy and x together at least 8 MiB): the
# backward's interleaved reduction walks one row at a time where a row is at
# least 192 bytes (FB_BN_ROW_WALK_MIN_PIECE) and at most 512 channels, in
# short sums of 8 rows counted from each row chunk's first row
# (bn_reduce_row_walk) for rows under 2 KiB (FB_BN_WALK_GROUP_MAX_PIECE; the
# float64 rows of 257 and 449 channels add every row), the eight-row step
# below 192 bytes.  N = 1 with odd sizes, 3-D; group tails of 1-7 rows and
# shorter last chunks.
SHAPES_ROW_WALK = [(1, 63, 67, 257), (2, 73, 73, 101), (2, 75, 71, 99), (2, 3, 21, 23, 449)]
# Around the 192-byte edge: float32 48 and 49 channels walk, 47 take the
# eight-row step; float64 24 and 25 walk, 23 take the step.
SHAPES_ROW_WALK_EDGE = [((1, 149, 147, 48), np.float32), ((3, 83, 87, 49), np.float32),
                        ((22311, 47), np.float32), ((21847, 24), np.float64),
                        ((3, 71, 99, 25), np.float64), ((22799, 23), np.float64)]


def check_row_walk(threads, inputs, dtype):
    """Every output and mutated buffer against the reference, and the same
    bits on 1, 2 and 3 threads; the split backward phases give the fused
    backward's bits."""
    expected = run_all(R, *inputs)
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(run_all(F, *inputs))
    for got, want in zip(results[0], expected):
        assert_close(got, want, dtype, scale=10)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)
    x, dy, weight = inputs[0], inputs[1], inputs[2]
    threads(2)
    _, mean, invstd = F.batch_norm_forward_train(x, weight, inputs[3], 1e-5, axis=-1)
    dx = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1)[0]
    sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=-1)
    dx_phases = F.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums,
                                            x.size // x.shape[-1], axis=-1)
    np.testing.assert_array_equal(dx_phases, dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_ROW_WALK)
def test_large_channels_last_row_walk_matches_the_reference_at_any_thread_count(
        simd_target, threads, shape, dtype, rng):
    check_row_walk(threads, make(rng, shape, dtype), dtype)


@pytest.mark.parametrize("shape,dtype", SHAPES_ROW_WALK_EDGE)
def test_row_walk_of_narrow_rows_matches_the_reference_at_any_thread_count(
        simd_target, threads, shape, dtype, rng):
    check_row_walk(threads, make(rng, shape, dtype), dtype)


def test_row_walk_sums_are_exact_for_exact_inputs(threads):
    """Integer-valued dy and x (exact in float32 short sums of 8 rows):
    dbias and dweight equal the exact sums, for a narrow (48-channel) and a
    wide (300-channel) large array, with group tails (21851 and 3511 rows),
    and for 2 KiB rows (512 channels), which add every row."""
    for shape in ((21851, 48), (3511, 300), (2053, 512)):
        rows, channels = shape
        r = np.arange(rows, dtype=np.int64)[:, None]
        c = np.arange(channels, dtype=np.int64)[None, :]
        x = ((r * 7 + c * 3) % 5).astype(np.float32)
        dy = ((r * 5 + c) % 7 - 3).astype(np.float32)
        mean = np.full(channels, 2.0, np.float32)
        invstd = np.ones(channels, np.float32)
        want_dbias = dy.astype(np.float64).sum(axis=0)
        want_dweight = (dy.astype(np.float64) * (x - 2.0)).sum(axis=0)
        for count in (1, 2, 3):
            threads(count)
            _, dweight, dbias = F.batch_norm_backward(dy, x, mean, invstd, axis=-1)
            np.testing.assert_array_equal(dbias, want_dbias.astype(np.float32))
            np.testing.assert_array_equal(dweight, want_dweight.astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 100), (5, 33), (4, 6, 6, 24), (7, 1030)])
def test_in_place_channels_last_rewrites_match_out_of_place(simd_target, threads, shape, dtype,
                                                           rng):
    """out=x (forward, eval) and out=dy (backward): the paired rewrite reads
    both halves' vectors before writing them, so in place equals out of place
    bit for bit."""
    x, dy, weight, bias, running_mean, running_var = make(rng, shape, dtype)
    threads(1)
    y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1)
    dx = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1)[0]
    y_eval = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, axis=-1)
    x_in, dy_in, x_eval = x.copy(), dy.copy(), x.copy()
    assert F.batch_norm_forward_train(x_in, weight, bias, 1e-5, axis=-1, out=x_in)[0] is x_in
    assert F.batch_norm_backward(dy_in, x, mean, invstd, weight, axis=-1, out=dy_in)[0] is dy_in
    F.batch_norm(x_eval, running_mean, running_var, weight, bias, training=False, axis=-1,
                 out=x_eval)
    np.testing.assert_array_equal(x_in, y)
    np.testing.assert_array_equal(dy_in, dx)
    np.testing.assert_array_equal(x_eval, y_eval)


# The backward's interleaved reduction prefetches rows ahead when dy and x
# together hold at least 8 MiB and a row piece is 512 B to 1 KiB: shapes on
# both sides of each bound (4096 x 256 float32 is exactly 8 MiB, 4095 x 256
# just below; 128 and 256 float32 channels are the piece bounds, 120 and 257
# just outside; float64 64 and 128 channels; a channels-last shape; 4100
# rows leave the last steps without rows 16 ahead to prefetch).
SHAPES_PREFETCH = [((4096, 256), np.float32), ((4095, 256), np.float32),
                   ((8200, 128), np.float32), ((8800, 120), np.float32),
                   ((4100, 257), np.float32), ((8200, 64), np.float64),
                   ((4100, 128), np.float64), ((4100, 129), np.float64),
                   ((16, 16, 16, 256), np.float32)]


@pytest.mark.parametrize("shape,dtype", SHAPES_PREFETCH)
def test_prefetching_backward_reduction_matches_the_reference_for_1_2_3_threads(
        simd_target, threads, shape, dtype, rng):
    """Prefetching changes no value: the backwards (plain and ReLU, with
    dweight and dbias from the reduction) match the reference and are bit
    identical for 1, 2 and 3 threads on either side of the thresholds."""
    x, dy, weight, bias, _, _ = make(rng, shape, dtype)
    mean, invstd = R.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1)[1:]
    mean, invstd = mean.astype(dtype), invstd.astype(dtype)
    want = R.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1)
    want_relu = R.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=-1)
    results = []
    for count in (1, 2, 3):
        threads(count)
        got = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1)
        got_relu = F.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=-1)
        results.append(list(got) + list(got_relu))
    for got, expected in zip(results[0], list(want) + list(want_relu)):
        assert_close(got, expected, dtype, scale=10)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)



# The interleaved backward's plain reduction steps eight rows, then four,
# then one inside each row chunk (max(64, ceil(4096 / group width),
# ceil(rows / 32)) rows: 125 at 33 channels, 64 from 65): chunks whose row
# count leaves every remainder mod 8 after at least one eight-row step
# (13 -> 5, 79 -> 7, 207 = 3 x 66 + 9 -> 2 and 1, 11 -> 3, 1031 x 65 =
# 16 x 64 + 7 -> 0 and 7, 12 -> 4, 14 and 30 -> 6; 2, 3: tiny batches, no
# eight-row step; several chunks: 207, 1031, (2, 9, 9, 33)), odd channel
# counts around vector widths (1 is planar), past the 512-channel group
# width (513), and channels-last (105 -> 1, 162 = 125 + 37 -> 5, 20 -> 4,
# 22 -> 6).
SHAPES_EIGHT_ROWS = [(2, 1), (3, 3), (2, 7), (3, 15), (13, 17), (79, 33), (207, 63),
                     (15, 65), (11, 513), (1031, 7), (1031, 65), (12, 17), (14, 33),
                     (30, 513), (3, 5, 7, 15), (2, 9, 9, 33), (2, 2, 5, 9), (2, 11, 1, 15)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_EIGHT_ROWS)
def test_eight_row_backward_reduction_matches_the_reference_for_1_2_3_threads(
        simd_target, threads, shape, dtype, rng):
    """The training backward (plain and ReLU: dx, dweight, dbias), its split
    reduction and every other kernel of run_all match the reference, and are
    bit identical for 1, 2 and 3 threads."""
    assert_backward_matches_the_reference_for_1_2_3_threads(threads, make(rng, shape, dtype),
                                                            dtype)

# Rows whose stride is a multiple of 4 KiB (bn_rows_alias: 1024 and 2048
# channels of either dtype, 512 of float64) take four-row backward steps:
# row counts leaving every remainder mod 4 (2, 7, 13 -> 1, 71 = 64 + 7 ->
# 0 and 3, 130 = 2 x 64 + 2 -> 2, 1027 -> 3, over 1 MiB: 2 and 3 threads
# share the row chunks), several groups, channels-last, and a stride that
# does not alias (1536 float32 channels: 6 KiB) next to one that does.
SHAPES_ALIASED_ROWS = [(2, 1024), (7, 512), (13, 1024), (71, 1024), (130, 2048),
                       (1027, 1024), (3, 4, 5, 512), (9, 1536)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_ALIASED_ROWS)
def test_four_row_backward_on_aliased_rows_matches_the_reference_for_1_2_3_threads(
        simd_target, threads, shape, dtype, rng):
    """Every kernel of run_all (the training backward plain and ReLU: dx,
    dweight, dbias; the forwards: y, saved and running statistics) matches
    the reference and is bit identical for 1, 2 and 3 threads, on rows whose
    stride is a multiple of 4 KiB; so do the split phases' backward sums."""
    assert_backward_matches_the_reference_for_1_2_3_threads(threads, make(rng, shape, dtype),
                                                            dtype)


# Interleaved rewrites of several 512-channel groups: each row chunk's work
# items of one thread are rewritten as one column range (whole rows, or one
# piece of each row when a thread's items start or end inside a row chunk).
# Shapes with 2-4 groups that move over 1 MiB (so 2 and 3 threads share row
# chunks and split them mid-chunk: 33 items of (701, 1030) over 2 or 3
# threads), odd row counts leaving a short last row chunk, channels-last
# with several groups, float64; and inputs of at least 8 MiB (the x-only
# reduction prefetches rows 8 KiB ahead; the output streams).
SHAPES_GROUPS = [((701, 1030), np.float32), ((701, 1030), np.float64),
                 ((333, 1600), np.float64), ((3, 17, 19, 1100), np.float32),
                 ((2100, 1100), np.float32), ((1100, 1000), np.float64)]
@pytest.mark.parametrize("shape,dtype", SHAPES_GROUPS)
def test_multi_group_rewrites_match_the_reference_and_are_thread_count_independent(
        simd_target, threads, shape, dtype, rng):
    """Every kernel family (run_all) on 1, 2 and 3 threads: each close to the
    reference, the 2- and 3-thread results bit-identical to 1 thread's."""
    inputs = make(rng, shape, dtype)
    expected = run_all(R, *inputs)
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(run_all(F, *inputs))
    assert len(results[0]) == len(expected)
    for got, want in zip(results[0], expected):
        assert_close(got, want, dtype, scale=10)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)


# The x-only reduction's prefetch (inputs of at least 8 MiB) with narrow
# rows (65 float32 channels: 260-byte rows, 32 rows ahead) and an odd row
# count that leaves the last steps nothing to prefetch, 1 to 8 rows past a
# multiple of 8, float64 with 3 channels-last dims.
SHAPES_FORWARD_PREFETCH = [((32803, 65), np.float32), ((32807, 64), np.float32),
                           ((4, 64, 65, 66), np.float64), ((8193, 256), np.float32)]


@pytest.mark.parametrize("shape,dtype", SHAPES_FORWARD_PREFETCH)
def test_prefetching_forward_reduction_matches_the_reference_for_1_2_3_threads(
        simd_target, threads, shape, dtype, rng):
    """Prefetching changes no value: the training forwards (plain and ReLU,
    with the running statistics) and the split statistics match the
    reference and are bit-identical for 1, 2 and 3 threads."""
    x, _, weight, bias, running_mean, running_var = make(rng, shape, dtype)
    want_rm, want_rv = running_mean.copy(), running_var.copy()
    want = R.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1, running_mean=want_rm,
                                      running_var=want_rv)
    want_relu = R.batch_norm_relu_forward_train(x, weight, bias, axis=-1)
    want_stats = R.batch_norm_stats(x, axis=-1)
    results = []
    for count in (1, 2, 3):
        threads(count)
        rm, rv = running_mean.copy(), running_var.copy()
        got = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=-1, running_mean=rm,
                                         running_var=rv)
        got_relu = F.batch_norm_relu_forward_train(x, weight, bias, axis=-1)
        stats = F.batch_norm_stats(x, axis=-1)
        assert stats[0] == want_stats[0]
        results.append(list(got) + [rm, rv] + list(got_relu) + list(stats[1:]))
    expected = list(want) + [want_rm, want_rv] + list(want_relu)
    for got, wanted in zip(results[0], expected):
        assert_close(got, wanted, dtype, scale=10)
    # mean and m2 come back in float64 from sums of the input dtype
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    for got, wanted in zip(results[0][len(expected):], want_stats[1:]):
        np.testing.assert_allclose(got, wanted, rtol=rtol, atol=rtol)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)


# ---- planar (channels-first, inner > 1) owned channels ----------------------
# Threads own whole channels from 4 per thread and walk them in blocks of
# neighbouring channels, row by row (bn_owned_channels), with rows of at
# least 48 KiB per block and at most 4 MiB of input per block, unless a
# channel's input fits in 32 KiB (then one channel at a time).  Shapes on
# each side: one channel per block (rows of 12289 float32 values = 48 KiB),
# blocks of 2-4 channels with 4096-value chunks ending mid-row (56 x 56 rows),
# blocks capped by the 4 MiB budget (300 rows of 20 x 20: 16 by row length,
# 8 or 4 by the budget), full 16-channel blocks of small rows with a partial
# last block (13, 37 channels), and channel counts just below and at the
# owned threshold for 2 and 3 threads (7/8, 11/12), and channels whose input
# fits the 32 KiB L1 (one channel at a time: (4, 32, 8, 8), (5, 37, 9, 9),
# 32 x 256 float32 values exactly 32 KiB) or just does not (33 x 256; the
# backwards stream two arrays).  The larger ones move over 1 MiB, so they
# really run on 2 and 3 threads.
SHAPES_PLANAR = [(2, 16, 12289), (4, 24, 56, 56), (3, 13, 56, 56), (300, 12, 20, 20),
                 (4, 32, 8, 8), (3, 13, 5, 7), (5, 37, 9, 9), (64, 7, 32, 32),
                 (64, 8, 32, 32), (48, 11, 24, 24), (48, 12, 24, 24), (32, 16, 16, 16),
                 (33, 16, 16, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_PLANAR)
def test_planar_owned_channel_blocks_match_the_reference(simd_target, threads, shape, dtype,
                                                         rng):
    assert_kernels_match_the_reference(threads, make(rng, shape, dtype, axis=1), dtype, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_PLANAR)
def test_planar_results_are_bit_identical_for_1_2_and_3_threads(simd_target, threads, shape,
                                                                dtype, rng):
    assert_bits_do_not_depend_on_the_thread_count(threads, make(rng, shape, dtype, axis=1),
                                                  axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 24, 56, 56), (300, 12, 20, 20), (5, 37, 9, 9)])
def test_planar_split_phases_compose_to_the_fused_owned_kernels(simd_target, threads, shape,
                                                                 dtype, rng):
    """The split phases run the same owned block walk, so stats + apply and
    backward_reduce + backward_apply equal the fused kernels bit for bit."""
    x, dy, weight, bias, _, _ = make(rng, shape, dtype, axis=1)
    for count in (1, 2, 3):
        threads(count)
        assert_planar_split_phases_compose(x, dy, weight, bias)


def assert_planar_split_phases_compose(x, dy, weight, bias):
    """stats + apply equal the fused training forward and backward_reduce +
    backward_apply the fused backward, bit for bit (channels on axis 1)."""
    y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=1)
    n, mean64, m2 = F.batch_norm_stats(x, axis=1)
    invstd64 = 1.0 / np.sqrt(m2 / n + 1e-5)
    np.testing.assert_array_equal(mean64.astype(x.dtype), mean)
    np.testing.assert_array_equal(F.batch_norm_apply(x, mean64, invstd64, weight, bias, axis=1),
                                  y)
    dx = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=1)[0]
    sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=1)
    np.testing.assert_array_equal(
        F.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, n, axis=1), dx)



# ---- planar short rows (bn_owned_short_rows) ---------------------------------
# Owned channels whose rows (one sample's values of one channel) are at most
# 640 bytes are walked sample by sample, blocks of up to 64 channels at once,
# at most 384 KiB of streamed input per block.  Row lengths HW = 1 (no
# planar walk: inner 1 is interleaved), 2, 3, 5, 9, 15, 17, 63, 64, 65 (all
# in the walk), 80 (exactly 640 bytes of float32; float64 not) and 161
# (past it for both); channel counts around the owned thresholds of 2 and 3
# threads (7/8, 11/12) and past one 64-channel block (150: 64, 64, 22 on one
# thread); blocks cut by the budget ((300, 40, 9): 18 channels of float32
# per backward block); a chunk (4096 values) ending inside a row ((700, 12,
# 7): value 4096 is in row 585) and at a row end ((300, 16, 4, 4)); tiny
# batches (1 and 2 samples, 1 channel); the ResNet-18 tail shapes.
SHAPES_SHORT = [(6, 9, 1, 1), (5, 8, 2), (3, 12, 3), (4, 11, 5), (2, 7, 3, 3), (3, 13, 15),
                (2, 12, 17), (3, 8, 63), (2, 9, 8, 8), (2, 12, 65), (3, 8, 80), (2, 9, 161),
                (4, 150, 5), (300, 40, 9),
                (700, 12, 7), (300, 16, 4, 4), (1, 24, 3, 3), (2, 16, 2), (3, 1, 5, 5),
                (32, 512, 2, 2), (32, 256, 7, 7), (8, 512, 4, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_SHORT)
def test_planar_short_rows_match_the_reference(simd_target, threads, shape, dtype, rng):
    assert_kernels_match_the_reference(threads, make(rng, shape, dtype, axis=1), dtype, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_SHORT)
def test_planar_short_rows_are_bit_identical_for_1_2_and_3_threads(simd_target, threads, shape,
                                                                   dtype, rng):
    """1 thread walks every channel sample by sample; 2 and 3 threads own
    channel ranges (or, under 4 channels per thread, share each channel's
    chunks, reduced channel by channel): the same bits."""
    assert_bits_do_not_depend_on_the_thread_count(threads, make(rng, shape, dtype, axis=1),
                                                  axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(700, 12, 7), (4, 150, 5), (2, 12, 17)])
def test_planar_short_rows_split_phases_compose_to_the_fused_kernels(simd_target, threads,
                                                                     shape, dtype, rng):
    x, dy, weight, bias, _, _ = make(rng, shape, dtype, axis=1)
    for count in (1, 2, 3):
        threads(count)
        assert_planar_split_phases_compose(x, dy, weight, bias)


def placed(array, offset):
    """A copy of `array` starting `offset` elements past a 64-byte boundary."""
    buffer = np.empty(array.size + 64, array.dtype)
    begin = (-buffer.ctypes.data // array.itemsize) % (64 // array.itemsize) + offset
    view = buffer[begin:begin + array.size].reshape(array.shape)
    view[...] = array
    return view


def test_planar_streamed_rewrite_gives_the_same_bits_at_any_alignment(simd_target, threads,
                                                                     rng):
    """Above the 8 MiB streaming size the owned block walk rewrites each row
    piece as one span, while the shared plan (3 threads: 11 channels are
    fewer than 4 per thread) cuts rows where chunks end (4356-value rows,
    4096-value chunks), and where the streaming stores start depends on the
    output's address.  Inputs and outputs starting 0, 1, 4 or 16 elements
    past a 64-byte boundary give the same bits for 1, 2 and 3 threads (the
    forward, the backward and the fused ReLU forward), and the reference's
    values."""
    shape, dtype = (48, 11, 66, 66), np.float32
    x0, dy0, weight, bias, _, _ = make(rng, shape, dtype, axis=1)
    want_y = R.batch_norm_forward_train(x0, weight, bias, 1e-5, axis=1)
    want_dx = R.batch_norm_backward(dy0, x0, want_y[1], want_y[2], weight, axis=1)
    expected = None
    for offset in (0, 1, 4, 16):
        x, dy = placed(x0, offset), placed(dy0, offset)
        for count in (1, 2, 3):
            threads(count)
            y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, 1e-5, axis=1,
                                                         out=placed(x0 * 0, offset))
            dx = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=1,
                                       out=placed(x0 * 0, offset))
            yr = F.batch_norm_relu_forward_train(x, weight, bias, axis=1,
                                                 out=placed(x0 * 0, offset))[0]
            results = [np.array(a) for a in (y, mean, invstd, *dx, yr)]
            if expected is None:
                expected = results
                assert_close(y, want_y[0], dtype, scale=10)
                for got, want in zip(dx, want_dx):
                    assert_close(got, want, dtype, scale=10)
                assert_close(yr, np.maximum(want_y[0], 0), dtype, scale=10)
            for got, want in zip(results, expected):
                np.testing.assert_array_equal(got, want)


# The thread decisions of interleaved passes, which change no value: wide
# rows with fewer than two minimum row chunks (127/128/129 rows,
# channels-last with 121 rows) split only channel groups between threads,
# and threads own column ranges only from
# 4096 channels each (8200 channels: owned on 2 threads, shared on 3;
# 12300: owned on 3; float64 of 12300 channels streams its output).  Every
# shape moves over 1 MiB, so the thread count really varies.
SHAPES_THREAD_DECISIONS = [((127, 2100), np.float32), ((128, 2100), np.float32),
                           ((129, 1100), np.float64), ((1, 11, 11, 2100), np.float32),
                           ((130, 8200), np.float32), ((129, 12300), np.float64)]


@pytest.mark.parametrize("shape,dtype", SHAPES_THREAD_DECISIONS)
def test_few_row_and_owned_column_plans_match_the_reference_for_1_2_3_threads(
        simd_target, threads, shape, dtype, rng):
    """Every kernel family (run_all) on 1, 2 and 3 threads on either side of
    the few-rows rule and of the owned-columns threshold: close to the
    reference, 2 and 3 threads bit-identical to 1 thread."""
    inputs = make(rng, shape, dtype)
    expected = run_all(R, *inputs)
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(run_all(F, *inputs))
    assert len(results[0]) == len(expected)
    for got, want in zip(results[0], expected):
        assert_close(got, want, dtype, scale=10)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)


SMALL_TEAM_SCRIPT = """
import sys
import numpy as np
import fastbn
from fastbn import functional as F
from fastbn import reference as R
sys.path.insert(0, {tests!r})
from conftest import assert_close
from test_bn_plans import make, run_all, run_phases


def both_ways(run, *args):
    # the call planned for 1 thread, then the one planned for 2 threads
    # (a team of one under OMP_THREAD_LIMIT=1)
    fastbn.set_num_threads(1)
    alone = run(*args)
    fastbn.set_num_threads(2)
    return run(*args), alone


try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None
if ml_dtypes is not None:
    from fastbn import _bn
    import test_bn_bf16 as B
for target in fastbn.available_simd_targets():
    fastbn.set_simd_target(target)
    # channel counts that are no multiple of a vector (2, 4, 8 or 16
    # values): vectors straddle the row ends, reading the wrap pad; wide
    # enough for the owned-columns plan on 2 threads (4096 channels each)
    for shape, dtype in (((200, 8204), np.float32), ((150, 8201), np.float64),
                         ((2, 10, 8, 8206), np.float32)):
        inputs = make(np.random.default_rng(7), shape, dtype)
        expected = run_all(R, *inputs)
        got, alone = both_ways(run_all, F, *inputs)
        assert len(got) == len(expected)
        for value, single, want in zip(got, alone, expected):
            assert_close(value, want, dtype, scale=10)
            np.testing.assert_array_equal(value, single)
        expected = run_phases(R, *inputs)
        got, alone = both_ways(run_phases, F, *inputs)
        assert len(got) == len(expected)
        for value, single, want in zip(got, alone, expected):
            if value.dtype == dtype:  # the rewrites (statistics and sums: float64)
                assert_close(value, want, dtype, scale=10)
            np.testing.assert_array_equal(value, single)
    if ml_dtypes is None:
        continue
    # bfloat16: every fused kernel, with and without ReLU, on exact sums
    # (512 rows), bit for bit against the NumPy twin
    shape = (512, 2100)
    inputs = B.make(np.random.default_rng(7), shape, True, dyadic=True)
    geo = B.geometry(shape, True)
    for relu in (False, True):
        expected = B.run_all(B.R, *inputs, geo, relu)
        got, alone = both_ways(B.run_all, _bn, *inputs, geo, relu)
        B.assert_same_bits(got, expected)
        B.assert_same_bits(alone, expected)
print("ok")
"""


def run_phases(module, x, dy, weight, bias, running_mean, running_var, axis=-1):
    """The split phases (statistics, apply, backward reduce and apply), plain
    and with the ReLU; every output, as arrays."""
    n, mean64, m2 = module.batch_norm_stats(x, axis=axis)
    invstd64 = 1.0 / np.sqrt(m2 / n + 1e-5)
    dtype = x.dtype
    mean, invstd = mean64.astype(dtype), invstd64.astype(dtype)
    flat = [mean64, m2]
    for relu_from in (None, (weight, bias)):
        flat.append(module.batch_norm_apply(x, mean64, invstd64, weight, bias, axis=axis,
                                            relu=relu_from is not None))
        sums = module.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis,
                                                 relu_from=relu_from)
        flat.extend(sums)
        flat.append(module.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, n,
                                                     axis=axis, relu_from=relu_from))
    return [np.asarray(a) for a in flat]


def test_owned_columns_plan_on_a_team_smaller_than_planned_matches_the_reference(tmp_path):
    """With OMP_THREAD_LIMIT=1 a call planned for 2 threads (8201-8206
    channels: the owned-columns plan) runs on a team of one, whose one thread owns
    every column and rewrites whole rows as one channel-wrapping span: every
    kernel family that can walk such a span (training and eval forward and
    backward, plain and with the fused ReLU, the split phases; and the
    bfloat16 kernels when ml_dtypes is installed), on every SIMD target, both
    dtypes, matches the reference and the 1-thread call bit for bit."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=root, OMP_THREAD_LIMIT="1")
    result = subprocess.run([sys.executable, "-c", SMALL_TEAM_SCRIPT.format(tests=tests)],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
