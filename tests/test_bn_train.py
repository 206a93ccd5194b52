"""Training-mode batch norm (batch statistics, running-statistics update):
fast kernels vs the NumPy reference on every SIMD target, both layouts, both
dtypes, odd sizes and awkward memory layouts; every output and every mutated
buffer is compared."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import reference as R

from conftest import array_variants, assert_close

DTYPES = [np.float32, np.float64]
# (shape, axis): odd channel counts and sizes, rank 2 to 5, both geometries
# of the kernels (planar: inner > 1; interleaved: channels-last or (N, C))
CASES = [
    ((5, 1), 1), ((2, 7), 1), ((3, 4099), 1), ((1, 7, 2), 1), ((2, 1, 1), 1),
    ((4, 7, 9), 1), ((2, 3, 7, 9), 1), ((3, 2, 1, 1), 1), ((2, 5, 3, 4, 5), 1),
    ((4, 7), -1), ((3, 9, 7), -1), ((2, 7, 9, 3), -1), ((2, 3, 4, 5, 7), -1),
    ((1, 1, 4097), 1), ((4097, 1), -1), ((2, 4099), -1), ((1, 2, 4099), -1),
    ((16, 64, 40), 1), ((16, 40, 64), -1), ((3, 2, 150, 150), 1),   # above the serial threshold
]


def make_inputs(rng, shape, axis, dtype, affine=True):
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    weight = rng.standard_normal(channels).astype(dtype) if affine else None
    bias = rng.standard_normal(channels).astype(dtype) if affine else None
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = (rng.random(channels) + 0.5).astype(dtype)
    return x, weight, bias, running_mean, running_var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_train_matches_reference(simd_target, shape, axis, dtype, affine, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype, affine)
    x_before = x.copy()
    fast_stats = (running_mean.copy(), running_var.copy())
    reference_stats = (running_mean.copy(), running_var.copy())
    y, mean, invstd = F.batch_norm_forward_train(
        x, weight, bias, 1e-3, axis=axis, running_mean=fast_stats[0],
        running_var=fast_stats[1], momentum=0.3)
    y_ref, mean_ref, invstd_ref = R.batch_norm_forward_train(
        x, weight, bias, 1e-3, axis=axis, running_mean=reference_stats[0],
        running_var=reference_stats[1], momentum=0.3)
    assert y.shape == x.shape and mean.shape == invstd.shape == (shape[axis],)
    assert_close(y, y_ref, dtype, scale=4)
    assert_close(mean, mean_ref, dtype)
    assert_close(invstd, invstd_ref, dtype)
    assert_close(fast_stats[0], reference_stats[0], dtype)
    assert_close(fast_stats[1], reference_stats[1], dtype)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((6, 5, 3), -1), ((3, 4099), 1)])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0])
def test_batch_norm_training_updates_running_stats_like_reference(simd_target, shape, axis,
                                                                   dtype, momentum, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype)
    fast_mean, fast_var = running_mean.copy(), running_var.copy()
    y = F.batch_norm(x, fast_mean, fast_var, weight, bias, training=True, momentum=momentum,
                     axis=axis)
    y_ref = R.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                         momentum=momentum, axis=axis)
    assert_close(y, y_ref, dtype, scale=4)
    assert_close(fast_mean, running_mean, dtype)
    assert_close(fast_var, running_var, dtype)


def test_running_var_uses_unbiased_variance(rng):
    x = rng.standard_normal((5, 2, 3))
    running_mean, running_var = np.zeros(2), np.ones(2)
    F.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    np.testing.assert_allclose(running_var, x.var(axis=(0, 2), ddof=1), rtol=1e-12)
    np.testing.assert_allclose(running_mean, x.mean(axis=(0, 2)), rtol=1e-12)


def test_normalization_uses_biased_variance(rng):
    x = rng.standard_normal((5, 2, 3))
    y, mean, invstd = F.batch_norm_forward_train(x, eps=1e-5)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(x.var(axis=(0, 2)) + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2)), x.var(axis=(0, 2)) * invstd ** 2, rtol=1e-10)


def test_cumulative_average_is_momentum_one_over_batch_count(rng):
    batches = [rng.standard_normal((4, 3, 2)) for _ in range(3)]
    running_mean, running_var = np.zeros(3), np.ones(3)
    for count, batch in enumerate(batches, start=1):
        F.batch_norm(batch, running_mean, running_var, training=True, momentum=1.0 / count)
    means = [b.mean(axis=(0, 2)) for b in batches]
    variances = [b.var(axis=(0, 2), ddof=1) for b in batches]
    np.testing.assert_allclose(running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(running_var, np.mean(variances, axis=0), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_without_running_stats_uses_batch_statistics(simd_target, dtype, rng):
    x, weight, bias, _, _ = make_inputs(rng, (6, 4, 5), 1, dtype)
    y = F.batch_norm(x, None, None, weight, bias, training=False)
    y_ref, _, _ = R.batch_norm_forward_train(x, weight, bias)
    assert_close(y, y_ref, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_forward_train_accepts_any_memory_layout(simd_target, dtype, axis, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, (3, 5, 6, 7), axis, dtype)
    y_ref, mean_ref, invstd_ref = R.batch_norm_forward_train(x, weight, bias, axis=axis)
    for name, variant in array_variants(x):
        y, mean, invstd = F.batch_norm_forward_train(variant, weight, bias, axis=axis)
        assert_close(y, y_ref, dtype, scale=4)
        assert_close(mean, mean_ref, dtype)
        assert_close(invstd, invstd_ref, dtype)
    for name, variant in array_variants(weight.reshape(1, -1)):
        y, _, _ = F.batch_norm_forward_train(x, variant.reshape(-1), bias, axis=axis)
        assert_close(y, y_ref, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_running_stats_are_updated_in_place(simd_target, dtype, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, (4, 3, 5), 1, dtype)
    storage = np.zeros((2, 6), dtype)
    storage[0, ::2] = running_mean
    storage[1, ::-2] = running_var
    strided_mean, reversed_var = storage[0, ::2], storage[1, ::-2]
    assert not strided_mean.flags.c_contiguous and not reversed_var.flags.c_contiguous
    F.batch_norm(x, strided_mean, reversed_var, weight, bias, training=True, momentum=0.25)
    R.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=0.25)
    assert_close(storage[0, ::2], running_mean, dtype)
    assert_close(storage[1, ::-2], running_var, dtype)
    np.testing.assert_array_equal(storage[:, 1::2][0], 0)   # the gaps are untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_receives_the_training_result(simd_target, dtype, rng):
    x, weight, bias, _, _ = make_inputs(rng, (4, 3, 10), 1, dtype)
    out = np.full_like(x, np.nan)
    y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, out=out)
    assert y is out
    assert_close(out, R.batch_norm_forward_train(x, weight, bias)[0], dtype, scale=4)
    out2 = np.full_like(x, np.nan)
    assert F.batch_norm(x, None, None, weight, bias, training=True, out=out2) is out2
    assert_close(out2, out, dtype)


@pytest.mark.parametrize("axis", [1, -1])
def test_training_out_may_be_the_input(simd_target, axis, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, (16, 40, 64), axis, np.float32)
    expected = R.batch_norm_forward_train(x, weight, bias, axis=axis)
    y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, axis=axis, out=x)
    assert y is x
    assert_close(x, expected[0], np.float32, scale=4)
    assert_close(mean, expected[1], np.float32)


def test_training_out_overlapping_the_input_is_rejected(rng):
    buffer = rng.standard_normal((5, 3, 10)).astype(np.float32)
    with pytest.raises(ValueError, match="overlap"):
        F.batch_norm_forward_train(buffer[:4], out=buffer[1:])


@pytest.mark.parametrize("shape,axis", [((2, 3), 1), ((1, 3, 2), 1), ((2, 5), -1)])
def test_two_values_per_channel_are_enough(shape, axis, rng):
    x = rng.standard_normal(shape)
    y, mean, invstd = F.batch_norm_forward_train(x, axis=axis)
    assert_close(y, R.batch_norm_forward_train(x, axis=axis)[0], np.float64, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channel_normalizes_to_exactly_the_bias(simd_target, dtype):
    x = np.full((4, 2, 3), 7.0, dtype)
    y, mean, invstd = F.batch_norm_forward_train(x, None, np.array([0.5, -1.0], dtype))
    y_ref = R.batch_norm_forward_train(x, None, np.array([0.5, -1.0], dtype))[0]
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(mean, 7.0)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(1e-5), rtol=1e-6)
    # y = (x - mean) * scale + bias: the mean is subtracted (not folded into
    # the shift), so x - mean is exactly 0 and y is exactly the bias
    np.testing.assert_array_equal(y[:, 0], 0.5)
    np.testing.assert_array_equal(y[:, 1], -1.0)


def test_nan_in_a_channel_stays_in_that_channel():
    x = np.ones((4, 2, 3))
    x[1, 0, 2] = np.nan
    x[:, 1] = np.arange(12.0).reshape(4, 3)
    y, mean, invstd = F.batch_norm_forward_train(x)
    assert np.isnan(mean[0]) and np.isnan(y[:, 0]).all()
    assert np.isfinite(y[:, 1]).all()


def test_channels_without_values_give_empty_outputs():
    y, mean, invstd = F.batch_norm_forward_train(np.zeros((4, 0, 3), np.float32))
    assert y.shape == (4, 0, 3) and mean.shape == invstd.shape == (0,)


# ---- numerics --------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((64, 3, 32, 32), 1), ((64, 32, 32, 3), -1),
                                        ((200000, 1), 1), ((2, 1, 300, 300), 1)])
def test_large_mean_float32_variance_matches_float64(simd_target, shape, axis):
    rng = np.random.default_rng(7)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    x64 = x.astype(np.float64)
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    exact_var = x64.var(axis=reduce_axes)
    exact_mean = x64.mean(axis=reduce_axes)
    running_mean = np.zeros(shape[axis], np.float32)
    running_var = np.zeros(shape[axis], np.float32)
    _, mean, invstd = F.batch_norm_forward_train(x, axis=axis, eps=1e-5, momentum=1.0,
                                                 running_mean=running_mean,
                                                 running_var=running_var)
    variance = 1 / invstd.astype(np.float64) ** 2 - 1e-5
    np.testing.assert_allclose(variance, exact_var, rtol=1e-4)
    np.testing.assert_allclose(mean, exact_mean, rtol=1e-7)
    n = x.size // shape[axis]
    np.testing.assert_allclose(running_var, exact_var * n / (n - 1), rtol=1e-4)


def test_outlier_shift_keeps_the_variance_accurate():
    # the shift is the first value; make it a far outlier
    x = np.random.default_rng(3).standard_normal((1000, 2))
    x[0, 0] = 1e8
    _, mean, invstd = F.batch_norm_forward_train(x, axis=-1, eps=1e-300)
    np.testing.assert_allclose(1 / invstd ** 2, x.var(axis=0), rtol=1e-9)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)


# ---- determinism -----------------------------------------------------------

# above the serial threshold, each splitting the work differently:
DETERMINISM_CASES = [
    ((8, 64, 17, 19), 1),     # planar, many channels: channels split across threads
    ((16, 2, 64, 64), 1),     # planar, few channels: each channel split into chunks
    ((8, 5, 40, 40), 1),      # 1 thread owns channels, 2 threads share them: same bits
    ((4, 1, 100, 100), 1),    # a single channel
    ((64, 33, 37), -1),       # interleaved, channels-last
    ((40000, 3), 1),          # interleaved, few channels, (N, C)
    ((20, 4099), -1),         # interleaved, many channel groups
]


def _with_threads(threads, function):
    fastbn.set_num_threads(threads)
    try:
        return function()
    finally:
        fastbn.set_num_threads(None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", DETERMINISM_CASES)
def test_forward_train_is_bitwise_identical_for_1_and_2_threads(simd_target, dtype, shape, axis,
                                                                 rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype)

    def run():
        stats = (running_mean.copy(), running_var.copy())
        y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, axis=axis,
                                                     running_mean=stats[0],
                                                     running_var=stats[1])
        return y, mean, invstd, stats[0], stats[1]

    one, two = _with_threads(1, run), _with_threads(2, run)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


# ---- large outputs: non-temporal stores ---------------------------------------

# outputs of 8 MiB and more are written with streaming stores (aligned vector
# body, scalar head and tail); `out` one element off alignment exercises the head
STREAMING_CASES = [((4, 8, 256, 260), 1), ((4, 256, 260, 8), -1), ((2, 3, 700, 800), 1)]


def misaligned_like(array):
    storage = np.empty(array.size + 1, array.dtype)
    return storage[1:].reshape(array.shape)


@pytest.mark.parametrize("shape,axis", STREAMING_CASES)
def test_large_outputs_match_reference(simd_target, shape, axis):
    # the reference runs in float64 here: NumPy's float32 sums over 10^5+
    # strided values are less accurate than the kernels
    rng = np.random.default_rng(9)
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    assert x.nbytes >= 8 << 20
    f64 = [a.astype(np.float64) for a in (x, weight, bias, running_mean, running_var, dy)]
    x64, weight64, bias64, mean64, var64, dy64 = f64
    y_ref, mean_ref, invstd_ref = R.batch_norm_forward_train(x64, weight64, bias64, axis=axis)
    for out in (None, misaligned_like(x)):
        y, mean, invstd = F.batch_norm_forward_train(x, weight, bias, axis=axis, out=out)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-6)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, axis=axis,
                     out=misaligned_like(x))
    np.testing.assert_allclose(y, R.batch_norm(x64, mean64, var64, weight64, bias64, axis=axis),
                               rtol=1e-5, atol=1e-5)
    dx, dweight, _ = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                           out=misaligned_like(x))
    expected = R.batch_norm_backward(dy64, x64, mean.astype(np.float64),
                                     invstd.astype(np.float64), weight64, axis=axis)
    np.testing.assert_allclose(dx, expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dweight, expected[1], rtol=1e-5, atol=1e-2)
    dx, _, dbias = F.batch_norm_backward_eval(dy, x, running_mean, running_var, weight, axis=axis)
    expected = R.batch_norm_backward_eval(dy64, x64, mean64, var64, weight64, axis=axis)
    np.testing.assert_allclose(dx, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dbias, expected[2], rtol=1e-5, atol=1e-2)


def test_large_outputs_are_bitwise_identical_for_1_and_2_threads(simd_target):
    rng = np.random.default_rng(10)
    x, weight, bias, _, _ = make_inputs(rng, (1, 3, 1000, 1000), 1, np.float64)

    def run():
        return F.batch_norm_forward_train(x, weight, bias)

    for a, b in zip(_with_threads(1, run), _with_threads(2, run)):
        np.testing.assert_array_equal(a, b)
