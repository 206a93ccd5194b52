"""Split-phase batch norm (stats, merge, apply, backward_reduce,
backward_apply): every primitive against its NumPy twin on every SIMD target,
both layouts and dtypes; the statistics against float64 NumPy; merged slice
statistics against the whole batch's; the phases composed against the fused
training forward and backward (also with ReLU); bit-identical results for
1, 2 and 3 threads; the same errors on both backends; inputs untouched."""
import inspect

import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import reference as R

from conftest import array_variants, assert_close

DTYPES = [np.float32, np.float64]
PHASES = ["batch_norm_stats", "batch_norm_merge_stats", "batch_norm_apply",
          "batch_norm_backward_reduce", "batch_norm_backward_apply"]
# odd geometries (C = 1, C = 3, 2 values per channel, channels-last C = 17)
# and ones above the thread threshold (1 MiB moved per call, so > 262144
# float32 values for the statistics alone): planar with few channels
# (threads share chunks), planar with many (threads own channels), interleaved
SMALL_CASES = [
    ((4, 1, 5), 1), ((9, 1), 1), ((5, 3, 7), 1), ((2, 3), 1), ((1, 3, 2), 1), ((2, 17), -1),
    ((6, 5, 17), -1), ((3, 2, 2, 3), -1),
]
THREADED_CASES = [((8, 3, 110, 110), 1), ((4, 40, 45, 40), 1), ((160, 48, 37), -1),
                  ((100, 90, 33), -1)]
CASES = SMALL_CASES + THREADED_CASES
TIGHT = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-13}


def channel_shape(shape, axis):
    return tuple(size if i == axis % len(shape) else 1 for i, size in enumerate(shape))


def reduce_axes(shape, axis):
    return tuple(i for i in range(len(shape)) if i != axis % len(shape))


def make_inputs(rng, shape, axis, dtype):
    """x, dy, weight, bias with an offset mean so the shift matters."""
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.normal(1.0, 0.5, channels).astype(dtype)
    bias = rng.normal(0.0, 0.5, channels).astype(dtype)
    return x, dy, weight, bias


def statistics(x, axis, eps=1e-5):
    """Mean and invstd (float64) through the fast phases."""
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    return count, mean, 1.0 / np.sqrt(m2 / count + eps)


def assert_sums_close(actual, expected, terms, dtype):
    """Per-channel float64 sums of `terms` (an array of the summed values):
    error bounded by the input dtype's rounding of each term."""
    assert actual.dtype == np.float64
    # one bound for the whole array: conservative for every channel
    bound = 16 * np.finfo(dtype).eps * np.abs(terms).sum()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound + 1e-300)


def assert_stats_close(mean, m2, mean_expected, m2_expected, x):
    """The mean to the input dtype's rounding of the values (absolute: a
    mean near 0 has no relative accuracy), m2 relative (a sum of squares)."""
    rtol = TIGHT[x.dtype]
    np.testing.assert_allclose(mean, mean_expected, rtol=rtol, atol=rtol * np.abs(x).max())
    np.testing.assert_allclose(m2, m2_expected, rtol=10 * rtol)


@pytest.fixture
def threads():
    """Set the kernel thread count; restored afterwards."""
    yield fastbn.set_num_threads
    fastbn.set_num_threads(None)


# ---- (a) each primitive vs its reference twin (and (g) inputs untouched) ---------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_stats_match_reference(simd_target, shape, axis, dtype, rng):
    x = make_inputs(rng, shape, axis, dtype)[0]
    x_before = x.copy()
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    count_ref, mean_ref, m2_ref = R.batch_norm_stats(x, axis=axis)
    assert type(count) is int and count == count_ref == x.size // shape[axis]
    assert mean.dtype == m2.dtype == np.float64 and mean.shape == m2.shape == (shape[axis],)
    assert_stats_close(mean, m2, mean_ref, m2_ref, x)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_apply_matches_reference(simd_target, shape, axis, dtype, affine, relu, rng):
    x, _, weight, bias = make_inputs(rng, shape, axis, dtype)
    weight, bias = (weight, bias) if affine else (None, None)
    _, mean, invstd = statistics(x, axis)
    inputs = (x, mean, invstd, weight, bias)
    before = [None if a is None else a.copy() for a in inputs]
    y = F.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis, relu=relu)
    y_ref = R.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis, relu=relu)
    assert_close(y, y_ref, dtype, scale=2)
    if relu:
        assert np.all(y >= 0)
    for array, copy in zip(inputs, before):
        if array is not None:
            np.testing.assert_array_equal(array, copy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_backward_reduce_matches_reference(simd_target, shape, axis, dtype, relu, rng):
    x, dy, weight, bias = make_inputs(rng, shape, axis, dtype)
    _, mean, invstd = statistics(x, axis)
    relu_from = (weight, bias) if relu else None
    inputs = (dy, x, mean, invstd, weight, bias)
    before = [a.copy() for a in inputs]
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis,
                                                       relu_from=relu_from)
    sum_dy_ref, sum_dy_xhat_ref = R.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis,
                                                               relu_from=relu_from)
    xhat = (x.astype(np.float64) - mean.reshape(channel_shape(shape, axis))) \
        * invstd.reshape(channel_shape(shape, axis))
    assert_sums_close(sum_dy, sum_dy_ref, dy, dtype)
    assert_sums_close(sum_dy_xhat, sum_dy_xhat_ref, dy * xhat, dtype)
    for array, copy in zip(inputs, before):
        np.testing.assert_array_equal(array, copy)


@pytest.mark.parametrize("shape,axis", [((40, 5, 50), 1), ((8, 3, 50, 50), 1), ((400, 5), -1)])
def test_backward_reduce_centers_on_the_float64_mean_not_its_float32_rounding(simd_target,
                                                                              shape, axis, rng):
    """The float32 reduction runs around the mean rounded to float32; the
    float64 mean's remainder (here 0.4 ulp of 1e4) must be accounted for."""
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = (1.0 + rng.standard_normal(shape)).astype(np.float32)  # sum(dy) ~ n: remainder shows
    channels = shape[axis]
    ulp = np.spacing(np.float32(1e4)).astype(np.float64)
    mean = np.full(channels, 1e4) + 0.4 * ulp
    assert np.all(mean.astype(np.float32).astype(np.float64) != mean)
    invstd = np.full(channels, 0.9)
    sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    sums_ref = R.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    xhat = (x.astype(np.float64) - 1e4) * 0.9
    assert_sums_close(sums[0], sums_ref[0], dy, np.float32)
    assert_sums_close(sums[1], sums_ref[1], dy * xhat, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_backward_apply_matches_reference(simd_target, shape, axis, dtype, affine, relu, rng):
    x, dy, weight, bias = make_inputs(rng, shape, axis, dtype)
    count, mean, invstd = statistics(x, axis)
    relu_from = (weight if affine else None, bias if affine else None) if relu else None
    weight = weight if affine else None
    sums = R.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis, relu_from=relu_from)
    inputs = (dy, x, mean, invstd, *sums)
    before = [a.copy() for a in inputs]
    dx = F.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, count, axis=axis,
                                     relu_from=relu_from)
    dx_ref = R.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, count, axis=axis,
                                         relu_from=relu_from)
    assert_close(dx, dx_ref, dtype, scale=10)
    for array, copy in zip(inputs, before):
        np.testing.assert_array_equal(array, copy)


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_merge_matches_reference(parts, rng):
    counts = rng.integers(1, 50, parts)
    means = rng.normal(3.0, 2.0, (parts, 7))
    m2s = rng.uniform(0.0, 10.0, (parts, 7)) * counts[:, None]
    before = (counts.copy(), means.copy(), m2s.copy())
    count, mean, m2 = F.batch_norm_merge_stats(counts, means, m2s)
    count_ref, mean_ref, m2_ref = R.batch_norm_merge_stats(counts, means, m2s)
    assert type(count) is int and count == count_ref == counts.sum()
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-14)
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-13)
    for array, copy in zip((counts, means, m2s), before):
        np.testing.assert_array_equal(array, copy)


def test_merge_of_two_parts_follows_chans_formula():
    count, mean, m2 = F.batch_norm_merge_stats([2, 3], [[1.0], [4.0]], [[0.5], [2.0]])
    delta = 4.0 - 1.0
    assert count == 5
    np.testing.assert_allclose(mean, [1.0 + delta * 3 / 5], rtol=1e-15)
    np.testing.assert_allclose(m2, [0.5 + 2.0 + delta ** 2 * 2 * 3 / 5], rtol=1e-15)


@pytest.mark.parametrize("name", PHASES)
def test_reference_twin_has_the_same_signature(name):
    assert inspect.signature(getattr(F, name)) == inspect.signature(getattr(R, name))
    assert name in F.__all__ and name in R.__all__


KERNEL_METHODS = {"batch_norm_stats": "stats", "batch_norm_merge_stats": "merge_stats",
                  "batch_norm_apply": "apply", "batch_norm_backward_reduce": "backward_reduce",
                  "batch_norm_backward_apply": "backward_apply"}


@pytest.mark.parametrize("name", PHASES)
def test_reference_backend_runs_the_reference_kernels(name, monkeypatch):
    from fastbn.reference._kernels import REFERENCE
    seen = []
    original = getattr(REFERENCE, KERNEL_METHODS[name])

    def spy(*args, **kwargs):
        seen.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(REFERENCE, KERNEL_METHODS[name], spy)
    x = np.ones((2, 3, 4))
    vector = np.ones(3)
    calls = {
        "batch_norm_stats": lambda: F.batch_norm_stats(x),
        "batch_norm_merge_stats": lambda: F.batch_norm_merge_stats([8], [vector], [vector]),
        "batch_norm_apply": lambda: F.batch_norm_apply(x, vector, vector),
        "batch_norm_backward_reduce": lambda: F.batch_norm_backward_reduce(x, x, vector, vector),
        "batch_norm_backward_apply": lambda: F.batch_norm_backward_apply(
            x, x, vector, vector, None, vector, vector, 8),
    }
    calls[name]()
    assert seen == []
    with fastbn.use_backend("reference"):
        calls[name]()
    assert len(seen) == 1


# ---- (b) statistics vs float64 NumPy ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_stats_are_the_float64_mean_and_biased_variance_times_count(simd_target, shape, axis,
                                                                     dtype, rng):
    x = make_inputs(rng, shape, axis, dtype)[0]
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    axes = reduce_axes(shape, axis)
    x64 = x.astype(np.float64)
    assert_stats_close(mean, m2 / count, x64.mean(axis=axes), x64.var(axis=axes), x)


@pytest.mark.parametrize("shape,axis", [((8, 3, 50, 50), 1), ((48, 48, 17), -1)])
def test_stats_of_float32_with_a_large_mean_keep_the_variance(simd_target, shape, axis, rng):
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m2 / count, x64.var(axis=reduce_axes(shape, axis)), rtol=1e-5)


def test_constant_channel_has_zero_m2():
    x = np.full((3, 2, 5), 7.25, np.float32)
    count, mean, m2 = F.batch_norm_stats(x)
    assert count == 15
    np.testing.assert_array_equal(mean, [7.25, 7.25])
    np.testing.assert_array_equal(m2, [0.0, 0.0])


@pytest.mark.parametrize("stats", [F.batch_norm_stats, R.batch_norm_stats])
def test_stats_of_a_batch_without_values_have_count_zero(stats):
    count, mean, m2 = stats(np.empty((0, 3, 4), np.float32))
    assert count == 0
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(m2, np.zeros(3))


def test_stats_of_a_single_value_per_channel_are_that_value():
    x = np.array([[1.5, -2.0, 3.0]], np.float64)
    count, mean, m2 = F.batch_norm_stats(x)
    assert count == 1
    np.testing.assert_array_equal(mean, x[0])
    np.testing.assert_array_equal(m2, np.zeros(3))


@pytest.mark.parametrize("axis", [1, -1])
def test_stats_accept_any_memory_layout(simd_target, axis, rng):
    x = make_inputs(rng, (6, 5, 9), axis, np.float32)[0]
    expected = F.batch_norm_stats(x, axis=axis)
    for name, variant in array_variants(x):
        count, mean, m2 = F.batch_norm_stats(variant, axis=axis)
        assert count == expected[0], name
        np.testing.assert_allclose(mean, expected[1], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(m2, expected[2], rtol=1e-5, err_msg=name)


# ---- (c) merging the statistics of slices ----------------------------------------


def slices_along_batch(x, axis, sizes):
    """Consecutive slices of x along axis 0 (the batch), of the given sizes."""
    bounds = np.cumsum([0] + list(sizes))
    assert bounds[-1] == x.shape[0]
    return [x[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]


SLICINGS = [((8, 3, 50, 50), 1, [1, 7]), ((8, 3, 50, 50), 1, [3, 3, 2]),
            ((5, 3, 7), 1, [1, 1, 3]), ((48, 48, 17), -1, [1, 20, 27]),
            ((6, 5, 17), -1, [2, 4]), ((4, 1, 5), 1, [1, 1, 1, 1])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,sizes", SLICINGS)
def test_merged_stats_of_slices_equal_stats_of_the_whole_batch(simd_target, shape, axis, sizes,
                                                              dtype, rng):
    x = make_inputs(rng, shape, axis, dtype)[0]
    parts = [F.batch_norm_stats(part, axis=axis) for part in slices_along_batch(x, axis, sizes)]
    counts, means, m2s = zip(*parts)
    count, mean, m2 = F.batch_norm_merge_stats(counts, np.stack(means), np.stack(m2s))
    whole = F.batch_norm_stats(x, axis=axis)
    assert count == whole[0]
    assert_stats_close(mean, m2, whole[1], whole[2], x)


def test_merge_depends_only_on_the_parts_and_their_order(rng):
    counts = [5, 0, 1, 12]
    means = rng.normal(0.0, 3.0, (4, 6))
    means[1] = np.nan  # an empty part's statistics are never read
    m2s = rng.uniform(0.0, 4.0, (4, 6))
    first = F.batch_norm_merge_stats(counts, means, m2s)
    again = F.batch_norm_merge_stats(list(counts), [row.copy() for row in means], m2s.copy())
    assert first[0] == again[0] == 18
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[2], again[2])
    assert np.all(np.isfinite(first[1])) and np.all(np.isfinite(first[2]))
    without_empty = F.batch_norm_merge_stats([5, 1, 12], means[[0, 2, 3]], m2s[[0, 2, 3]])
    np.testing.assert_array_equal(first[1], without_empty[1])
    np.testing.assert_array_equal(first[2], without_empty[2])
    reordered = F.batch_norm_merge_stats([12, 1, 5], means[[3, 2, 0]], m2s[[3, 2, 0]])
    np.testing.assert_allclose(reordered[1], first[1], rtol=1e-14)
    np.testing.assert_allclose(reordered[2], first[2], rtol=1e-13)


@pytest.mark.parametrize("merge", [F.batch_norm_merge_stats, R.batch_norm_merge_stats])
def test_merging_one_part_returns_it(merge, rng):
    mean, m2 = rng.standard_normal(4), rng.uniform(0, 1, 4)
    count, merged_mean, merged_m2 = merge(np.array([9]), mean[None], m2[None])
    assert count == 9
    np.testing.assert_array_equal(merged_mean, mean)
    np.testing.assert_array_equal(merged_m2, m2)


@pytest.mark.parametrize("merge", [F.batch_norm_merge_stats, R.batch_norm_merge_stats])
def test_merging_only_empty_parts_gives_count_zero(merge):
    count, mean, m2 = merge([0, 0], np.full((2, 3), np.nan), np.full((2, 3), np.nan))
    assert count == 0
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(m2, np.zeros(3))


# ---- (d) the phases composed equal the fused kernels -----------------------------


def assert_tight(actual, expected, dtype):
    rtol = TIGHT[np.dtype(dtype)]
    assert np.asarray(actual).dtype == np.asarray(expected).dtype
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_stats_then_apply_equal_the_fused_training_forward(simd_target, shape, axis, dtype,
                                                          affine, rng):
    x, _, weight, bias = make_inputs(rng, shape, axis, dtype)
    weight, bias = (weight, bias) if affine else (None, None)
    eps = 1e-3
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    y = F.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis)
    y_fused, saved_mean, saved_invstd = F.batch_norm_forward_train(x, weight, bias, eps,
                                                                   axis=axis)
    assert_tight(y, y_fused, dtype)
    assert_tight(mean.astype(dtype), saved_mean, dtype)
    assert_tight(invstd.astype(dtype), saved_invstd, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_reduce_then_apply_equal_the_fused_backward(simd_target, shape, axis, dtype,
                                                            affine, rng):
    x, dy, weight, _ = make_inputs(rng, shape, axis, dtype)
    weight = weight if affine else None
    _, saved_mean, saved_invstd = F.batch_norm_forward_train(x, weight, None, axis=axis)
    count = x.size // shape[axis]
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy, x, saved_mean, saved_invstd,
                                                       axis=axis)
    dx = F.batch_norm_backward_apply(dy, x, saved_mean, saved_invstd, weight, sum_dy,
                                     sum_dy_xhat, count, axis=axis)
    dx_fused, dweight, dbias = F.batch_norm_backward(dy, x, saved_mean, saved_invstd, weight,
                                                     axis=axis)
    assert_tight(dx, dx_fused, dtype)
    assert_tight(sum_dy.astype(dtype), dbias, dtype)
    assert_tight(sum_dy_xhat.astype(dtype), dweight, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_phases_with_relu_equal_the_fused_batch_norm_relu(simd_target, shape, axis, dtype, rng):
    x, dy, weight, bias = make_inputs(rng, shape, axis, dtype)
    count = x.size // shape[axis]
    y_fused, saved_mean, saved_invstd = F.batch_norm_relu_forward_train(x, weight, bias,
                                                                        axis=axis)
    # the fused ReLU forward normalizes with the statistics rounded to x's
    # dtype (so its backward recomputes the same mask): apply them as given
    y = F.batch_norm_apply(x, saved_mean, saved_invstd, weight, bias, axis=axis, relu=True)
    assert_tight(y, y_fused, dtype)
    relu_from = (weight, bias)
    sums = F.batch_norm_backward_reduce(dy, x, saved_mean, saved_invstd, axis=axis,
                                        relu_from=relu_from)
    dx = F.batch_norm_backward_apply(dy, x, saved_mean, saved_invstd, weight, *sums, count,
                                     axis=axis, relu_from=relu_from)
    dx_fused, dweight, dbias = F.batch_norm_relu_backward(dy, x, saved_mean, saved_invstd,
                                                          weight, bias, axis=axis)
    assert_tight(dx, dx_fused, dtype)
    assert_tight(sums[0].astype(dtype), dbias, dtype)
    assert_tight(sums[1].astype(dtype), dweight, dtype)
    # the mask is the applied forward's: no gradient where y is 0
    masked = y == 0
    np.testing.assert_array_equal(
        F.batch_norm_backward_reduce(np.where(masked, dy, 0).astype(dtype), x, saved_mean,
                                     saved_invstd, axis=axis, relu_from=relu_from)[0],
        np.zeros(shape[axis]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,sizes", SLICINGS)
def test_phases_over_slices_give_the_full_batch_forward_and_backward(simd_target, shape, axis,
                                                                    sizes, dtype, rng):
    """What SyncBatchNorm does across processes, done across slices."""
    x, dy, weight, bias = make_inputs(rng, shape, axis, dtype)
    eps = 1e-3
    x_parts = slices_along_batch(x, axis, sizes)
    dy_parts = slices_along_batch(dy, axis, sizes)
    counts, means, m2s = zip(*[F.batch_norm_stats(part, axis=axis) for part in x_parts])
    count, mean, m2 = F.batch_norm_merge_stats(counts, np.stack(means), np.stack(m2s))
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    y = np.concatenate([F.batch_norm_apply(part, mean, invstd, weight, bias, axis=axis)
                        for part in x_parts])
    sums = [F.batch_norm_backward_reduce(d, part, mean, invstd, axis=axis)
            for d, part in zip(dy_parts, x_parts)]
    sum_dy = np.sum([s[0] for s in sums], axis=0)
    sum_dy_xhat = np.sum([s[1] for s in sums], axis=0)
    dx = np.concatenate([F.batch_norm_backward_apply(d, part, mean, invstd, weight, sum_dy,
                                                     sum_dy_xhat, count, axis=axis)
                         for d, part in zip(dy_parts, x_parts)])
    y_full, saved_mean, saved_invstd = R.batch_norm_forward_train(x, weight, bias, eps,
                                                                  axis=axis)
    dx_full, dweight, dbias = R.batch_norm_backward(dy, x, saved_mean, saved_invstd, weight,
                                                    axis=axis)
    assert_close(y, y_full, dtype, scale=2)
    assert_close(dx, dx_full, dtype, scale=10)
    assert_close(sum_dy.astype(dtype), dbias, dtype, scale=10)
    assert_close(sum_dy_xhat.astype(dtype), dweight, dtype, scale=10)


# ---- (e) bit-identical for any thread count --------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", THREADED_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_every_phase_is_bitwise_identical_for_1_2_and_3_threads(simd_target, threads, shape,
                                                               axis, dtype, relu, rng):
    x, dy, weight, bias = make_inputs(rng, shape, axis, dtype)
    relu_from = (weight, bias) if relu else None
    results = []
    for count in (1, 2, 3):
        threads(count)
        n, mean, m2 = F.batch_norm_stats(x, axis=axis)
        invstd = 1.0 / np.sqrt(m2 / n + 1e-5)
        y = F.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis, relu=relu)
        sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis, relu_from=relu_from)
        dx = F.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, n, axis=axis,
                                         relu_from=relu_from)
        results.append((mean, m2, y, *sums, dx))
    for other in results[1:]:
        for expected, actual in zip(results[0], other):
            np.testing.assert_array_equal(actual, expected)


def offset_view(values, offset):
    """`values` copied into a C-contiguous view `offset` elements into a
    fresh buffer: offset 1 puts a float32 array 4 bytes past NumPy's
    16-byte alignment, so vector and streaming stores start mid-line."""
    buffer = np.empty(values.size + offset, values.dtype)
    view = buffer[offset:].reshape(values.shape)
    view[...] = values
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((3, 7, 331, 331), 1), ((5, 3, 57, 61), 1),
                                        ((2, 93, 101, 3), -1), ((4099, 33), -1),
                                        ((7, 1, 1000), 1), ((300, 1), 1)])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("relu", [False, True])
def test_the_rewrites_straight_walk_is_bitwise_identical_for_1_2_and_3_threads(
        simd_target, threads, shape, axis, offset, dtype, relu, rng):
    """apply and backward_apply walk the array in memory order, cut into one
    element range per thread (mid-row, mid-cache-line), with streaming
    stores from 8 MiB ((3, 7, 331, 331) float32 is 9.2 MB): every split and
    alignment gives the same bits, and the reference's values."""
    x, dy, weight, bias = make_inputs(rng, shape, axis, dtype)
    x, dy = offset_view(x, offset), offset_view(dy, offset)
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    invstd = 1.0 / np.sqrt(m2 / count + 1e-5)
    relu_from = (weight, bias) if relu else None
    sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis, relu_from=relu_from)
    results = []
    for threads_used in (1, 2, 3):
        threads(threads_used)
        results.append((F.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis, relu=relu),
                        F.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, count,
                                                    axis=axis, relu_from=relu_from)))
    for other in results[1:]:
        for expected, actual in zip(results[0], other):
            np.testing.assert_array_equal(actual, expected)
    y, dx = results[0]
    assert_close(y, R.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis, relu=relu))
    assert_close(dx, R.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, count,
                                                 axis=axis, relu_from=relu_from),
                 scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES + [((3, 7, 331, 331), 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_apply_with_running_statistics_is_the_eval_forward_bit_for_bit(simd_target, shape, axis,
                                                                      dtype, relu, rng):
    """The apply runs the eval forward's walk and, for a mean the input dtype
    holds exactly, its coefficients: scale = weight * invstd rounded once,
    shift = bias."""
    x, _, weight, bias = make_inputs(rng, shape, axis, dtype)
    channels = shape[axis]
    running_mean = rng.normal(3.0, 1.0, channels).astype(dtype)
    running_var = rng.uniform(0.5, 4.0, channels).astype(dtype)
    eps = 1e-5
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    y = F.batch_norm_apply(x, running_mean.astype(np.float64), invstd, weight, bias, axis=axis,
                           relu=relu)
    evaluate = F.batch_norm_relu if relu else F.batch_norm
    expected = evaluate(x, running_mean, running_var, weight, bias, eps=eps, axis=axis)
    np.testing.assert_array_equal(y, expected)


def test_large_arrays_compose_like_the_fused_kernels_on_any_thread_count(simd_target, threads,
                                                                         rng):
    """Above the streaming-store size (8 MiB outputs)."""
    shape, axis, dtype = (4, 8, 256, 260), 1, np.float32
    x, dy, weight, bias = make_inputs(rng, shape, axis, dtype)
    outputs = []
    for count in (1, 3):
        threads(count)
        n, mean, m2 = F.batch_norm_stats(x, axis=axis)
        invstd = 1.0 / np.sqrt(m2 / n + 1e-5)
        y = F.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis)
        y_fused, saved_mean, saved_invstd = F.batch_norm_forward_train(x, weight, bias,
                                                                       axis=axis)
        assert_tight(y, y_fused, dtype)
        sums = F.batch_norm_backward_reduce(dy, x, saved_mean, saved_invstd, axis=axis)
        dx = F.batch_norm_backward_apply(dy, x, saved_mean, saved_invstd, weight, *sums, n,
                                         axis=axis)
        assert_tight(dx, F.batch_norm_backward(dy, x, saved_mean, saved_invstd, weight,
                                               axis=axis)[0], dtype)
        outputs.append((mean, m2, y, *sums, dx))
    for expected, actual in zip(*outputs):
        np.testing.assert_array_equal(actual, expected)


# ---- out=, dtypes of the statistics, empty inputs --------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_statistics_in_the_input_dtype_give_the_same_result_as_float64(simd_target, dtype,
                                                                       axis, rng):
    x, dy, weight, bias = make_inputs(rng, (6, 5, 9), axis, dtype)
    _, mean, invstd = statistics(x, axis)
    mean, invstd = mean.astype(dtype), invstd.astype(dtype)
    mean64, invstd64 = mean.astype(np.float64), invstd.astype(np.float64)
    np.testing.assert_array_equal(F.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis),
                                  F.batch_norm_apply(x, mean64, invstd64, weight, bias,
                                                     axis=axis))
    sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    np.testing.assert_array_equal(sums, F.batch_norm_backward_reduce(dy, x, mean64, invstd64,
                                                                     axis=axis))
    np.testing.assert_array_equal(
        F.batch_norm_backward_apply(dy, x, mean, invstd, weight, sums[0].astype(dtype),
                                    sums[1].astype(dtype), 54, axis=axis),
        F.batch_norm_backward_apply(dy, x, mean64, invstd64, weight,
                                    sums[0].astype(dtype).astype(np.float64),
                                    sums[1].astype(dtype).astype(np.float64), 54, axis=axis))


@pytest.mark.parametrize("module", [F, R])
def test_apply_writes_into_out_and_may_be_in_place(module, rng):
    x, _, weight, bias = make_inputs(rng, (4, 3, 6), 1, np.float32)
    _, mean, invstd = statistics(x, 1)
    expected = F.batch_norm_apply(x, mean, invstd, weight, bias)
    out = np.empty_like(x)
    assert module.batch_norm_apply(x, mean, invstd, weight, bias, out=out) is out
    assert_close(out, expected, np.float32)
    assert module.batch_norm_apply(x, mean, invstd, weight, bias, out=x) is x
    assert_close(x, expected, np.float32)


@pytest.mark.parametrize("module", [F, R])
@pytest.mark.parametrize("in_place", ["dy", "x"])
def test_backward_apply_may_write_into_dy_or_x(module, in_place, rng):
    x, dy, weight, _ = make_inputs(rng, (5, 17), -1, np.float64)
    count, mean, invstd = statistics(x, -1)
    sums = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=-1)
    expected = F.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, count, axis=-1)
    target = dy if in_place == "dy" else x
    result = module.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, count,
                                              axis=-1, out=target)
    assert result is target
    assert_close(result, expected, np.float64)


@pytest.mark.parametrize("module", [F, R])
def test_phases_on_an_empty_batch(module):
    x = np.empty((0, 3, 4), np.float32)
    vector = np.ones(3)
    assert module.batch_norm_apply(x, vector, vector).shape == x.shape
    sum_dy, sum_dy_xhat = module.batch_norm_backward_reduce(x, x, vector, vector)
    np.testing.assert_array_equal(sum_dy, np.zeros(3))
    np.testing.assert_array_equal(sum_dy_xhat, np.zeros(3))
    dx = module.batch_norm_backward_apply(x, x, vector, vector, None, vector, vector, 5)
    assert dx.shape == x.shape and dx.dtype == np.float32


# ---- (f) bad input: the same error on both backends ------------------------------


def _bad_calls():
    x = np.ones((4, 3, 5), np.float32)
    v64 = np.ones(3)
    v32 = np.ones(3, np.float32)
    readonly = np.empty_like(x)
    readonly.flags.writeable = False
    return [
        ("stats int input", lambda m: m.batch_norm_stats(np.ones((4, 3), np.int32)),
         TypeError, "input: expected dtype"),
        ("stats 1-D", lambda m: m.batch_norm_stats(np.ones(4)), ValueError, "at least 2"),
        ("stats axis", lambda m: m.batch_norm_stats(x, axis=0), ValueError, "axis"),
        ("merge float counts", lambda m: m.batch_norm_merge_stats([1.5], [v64], [v64]),
         TypeError, "counts: expected integers"),
        ("merge negative count", lambda m: m.batch_norm_merge_stats([2, -1], [v64, v64],
                                                                    [v64, v64]),
         ValueError, "counts: expected counts >= 0"),
        ("merge no parts", lambda m: m.batch_norm_merge_stats([], np.ones((0, 3)),
                                                              np.ones((0, 3))),
         ValueError, "counts: expected a 1-D array"),
        ("merge means rows", lambda m: m.batch_norm_merge_stats([1, 2], [v64], [v64]),
         ValueError, r"means: expected shape \(2, C\)"),
        ("merge m2s shape", lambda m: m.batch_norm_merge_stats([1], [v64], [np.ones(4)]),
         ValueError, "m2s: expected shape"),
        ("merge counts type", lambda m: m.batch_norm_merge_stats(3, [v64], [v64]),
         TypeError, "counts: expected a 1-D sequence"),
        ("apply mean missing", lambda m: m.batch_norm_apply(x, None, v64), TypeError,
         "mean: expected a 1-D array with 3"),
        ("apply invstd length", lambda m: m.batch_norm_apply(x, v64, np.ones(4)), ValueError,
         "invstd: expected a 1-D array with 3"),
        ("apply float32 mean for float64 x",
         lambda m: m.batch_norm_apply(x.astype(np.float64), v32, v64), TypeError,
         "mean: expected dtype float64"),
        ("apply weight dtype", lambda m: m.batch_norm_apply(x, v64, v64, v64), TypeError,
         "weight: expected dtype float32"),
        ("apply relu type", lambda m: m.batch_norm_apply(x, v64, v64, relu="yes"), TypeError,
         "relu: expected a bool"),
        ("apply out read-only", lambda m: m.batch_norm_apply(x, v64, v64, out=readonly),
         ValueError, "out: expected a writeable"),
        ("apply out not contiguous",
         lambda m: m.batch_norm_apply(x, v64, v64, out=np.empty((5, 3, 4), np.float32).T),
         ValueError, "out: expected a C-contiguous"),
        ("reduce dy shape", lambda m: m.batch_norm_backward_reduce(x[:2], x, v64, v64),
         ValueError, "dy: expected shape"),
        ("reduce dy dtype",
         lambda m: m.batch_norm_backward_reduce(x.astype(np.float64), x, v64, v64),
         TypeError, "dy: expected dtype float32"),
        ("reduce relu_from not a pair",
         lambda m: m.batch_norm_backward_reduce(x, x, v64, v64, relu_from=v32), TypeError,
         "relu_from: expected None or a"),
        ("reduce relu_from bias length",
         lambda m: m.batch_norm_backward_reduce(x, x, v64, v64,
                                                relu_from=(None, np.ones(2, np.float32))),
         ValueError, r"relu_from\[1\] \(bias\): expected a 1-D array"),
        ("apply-backward count zero",
         lambda m: m.batch_norm_backward_apply(x, x, v64, v64, None, v64, v64, 0), ValueError,
         "count: expected an int >= 1"),
        ("apply-backward count float",
         lambda m: m.batch_norm_backward_apply(x, x, v64, v64, None, v64, v64, 20.0),
         TypeError, "count: expected an int"),
        ("apply-backward sum missing",
         lambda m: m.batch_norm_backward_apply(x, x, v64, v64, None, None, v64, 20), TypeError,
         "sum_dy: expected a 1-D array"),
        ("apply-backward out overlaps x",
         lambda m: m.batch_norm_backward_apply(x[:2], x[2:], v64, v64, None, v64, v64, 10,
                                               out=x[1:3]),
         ValueError, "out: must not overlap"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("label,call,error,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_the_same_error_on_both_backends(label, call, error, pattern):
    messages = []
    for module in (F, R):
        with pytest.raises(error, match=pattern) as raised:
            call(module)
        messages.append(str(raised.value))
    with fastbn.use_backend("reference"), pytest.raises(error, match=pattern):
        call(F)
    assert messages[0] == messages[1]


def test_rejected_apply_leaves_out_untouched():
    x = np.ones((4, 3, 5), np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(TypeError):
        F.batch_norm_apply(x, np.ones(3), np.ones(3), np.ones(3), out=out)
    np.testing.assert_array_equal(out, np.full_like(x, 7.0))
