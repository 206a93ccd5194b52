"""Property-based tests (hypothesis) of batch normalization against the NumPy
reference: random shapes and ranks, channels-first and channels-last,
strided / negative-stride / transposed / read-only inputs, magnitudes from
1e-30 to 1e30 (within what the dtype can represent), constant channels,
+-inf and NaN (a NaN stays where it belongs: its element in eval mode, its
channel in training mode), random eps/momentum.

Zero-size dimensions are covered by tests/test_reliability_edge_cases.py,
which runs them in a subprocess (a crash there must not kill the suite).

Training-mode properties run once ``batch_norm(training=True)`` exists.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastbn
from fastbn import functional as F

from test_reliability_kernels import bn_training_available

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Largest and smallest data scales whose squares (the variance) the dtype holds.
SCALE_EXPONENTS = {np.float32: (-15, 15), np.float64: (-30, 30)}


# section: strategies --------------------------------------------------------------


@st.composite
def layouts(draw, array):
    """The same values in a memory layout a user may pass."""
    kind = draw(st.sampled_from(["contiguous", "strided", "negative", "transposed", "readonly"]))
    if kind == "strided":
        axis = draw(st.integers(0, array.ndim - 1))
        shape = list(array.shape)
        shape[axis] *= 2
        padded = np.full(shape, np.nan, array.dtype)
        index = [slice(None)] * array.ndim
        index[axis] = slice(None, None, 2)
        padded[tuple(index)] = array
        return padded[tuple(index)]
    if kind == "negative":
        axes = draw(st.lists(st.integers(0, array.ndim - 1), min_size=1, max_size=array.ndim, unique=True))
        flipped = np.ascontiguousarray(np.flip(array, axis=axes))
        return np.flip(flipped, axis=axes)
    if kind == "transposed":
        return np.asfortranarray(array)
    if kind == "readonly":
        copy = array.copy()
        copy.flags.writeable = False
        return copy
    return array


@st.composite
def bn_problems(draw, *, allow_special=True):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.sampled_from([1, -1]))
    channels = shape[axis]
    low, high = SCALE_EXPONENTS[dtype]
    scale = 10.0 ** draw(st.integers(low, high))
    offset = scale * draw(st.sampled_from([0.0, 1.0, -3.0, 1e3]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    broadcast = [1] * ndim
    broadcast[axis] = channels
    x = offset + scale * rng.standard_normal(shape)
    mean = offset + scale * rng.standard_normal(channels) * 0.1
    var = (scale ** 2) * (rng.random(channels) + 0.1)
    weight = rng.standard_normal(channels) if draw(st.booleans()) else None
    bias = rng.standard_normal(channels) if draw(st.booleans()) else None
    constant = draw(st.lists(st.integers(0, channels - 1), max_size=channels, unique=True))
    for c in constant:  # constant channels: zero variance
        index = [slice(None)] * ndim
        index[axis] = c
        x[tuple(index)] = offset
        var[c] = 0.0
    if allow_special and draw(st.booleans()):
        flat = x.reshape(-1)
        count = draw(st.integers(1, 3))
        for position in rng.integers(0, flat.size, count):
            flat[position] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1])) * max(scale ** 2, 1e-30)
    arrays = [x.astype(dtype), mean.astype(dtype), var.astype(dtype)]
    vectors = [None if v is None else v.astype(dtype) for v in (weight, bias)]
    return dict(x=arrays[0], mean=arrays[1], var=arrays[2], weight=vectors[0], bias=vectors[1],
                axis=axis, eps=float(eps), dtype=dtype, broadcast=tuple(broadcast))


def assert_matches_reference(fast, reference, problem):
    """NaN and inf exactly where the reference has them; finite values within
    a few ulps of the magnitudes involved (the fast path computes
    (x - m) * a + b with a = w / sqrt(v + eps) rounded to the dtype, whose
    rounding differs from the reference's (x - m) / s * w + b)."""
    dtype = problem["dtype"]
    assert fast.dtype == reference.dtype == np.dtype(dtype)
    assert fast.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(reference))
    np.testing.assert_array_equal(np.isposinf(fast), np.isposinf(reference))
    np.testing.assert_array_equal(np.isneginf(fast), np.isneginf(reference))
    shape = problem["broadcast"]
    weight = problem["weight"] if problem["weight"] is not None else np.ones(shape[problem["axis"]])
    bias = problem["bias"] if problem["bias"] is not None else np.zeros(shape[problem["axis"]])
    alpha = np.abs(weight.astype(np.float64)) / np.sqrt(problem["var"].astype(np.float64) + problem["eps"])
    x64 = problem["x"].astype(np.float64)
    scale = (np.abs(x64) * alpha.reshape(shape) + np.abs(problem["mean"].astype(np.float64) * alpha).reshape(shape)
             + np.abs(bias.astype(np.float64)).reshape(shape))
    finite = np.isfinite(reference) & np.isfinite(scale)
    tolerance = 16 * np.finfo(dtype).eps * scale + np.finfo(dtype).tiny
    with np.errstate(invalid="ignore"):
        error = np.abs(fast.astype(np.float64) - reference.astype(np.float64))
    assert np.all(error[finite] <= tolerance[finite]), float(np.max(error[finite] - tolerance[finite]))


# section: eval mode ---------------------------------------------------------------


@settings(max_examples=300, **SETTINGS)
@given(problem=bn_problems(), data=st.data())
def test_eval_forward_matches_reference_for_any_shape_layout_and_magnitude(problem, data):
    x = data.draw(layouts(problem["x"]))
    before = x.copy()
    args = (problem["mean"], problem["var"], problem["weight"], problem["bias"])
    with np.errstate(all="ignore"):
        fast = F.batch_norm(x, *args, eps=problem["eps"], axis=problem["axis"])
        with fastbn.use_backend("reference"):
            reference = F.batch_norm(x, *args, eps=problem["eps"], axis=problem["axis"])
    assert_matches_reference(fast, reference, problem)
    np.testing.assert_array_equal(x, before)  # input untouched (NaN positions included)


@settings(max_examples=60, **SETTINGS)
@given(problem=bn_problems())
def test_eval_forward_in_place_equals_out_of_place(problem):
    x = problem["x"].copy()
    args = (problem["mean"], problem["var"], problem["weight"], problem["bias"])
    with np.errstate(all="ignore"):
        expected = F.batch_norm(x, *args, eps=problem["eps"], axis=problem["axis"])
        result = F.batch_norm(x, *args, eps=problem["eps"], axis=problem["axis"], out=x)
    assert result is x
    np.testing.assert_array_equal(x, expected)


@settings(max_examples=60, **SETTINGS)
@given(problem=bn_problems(allow_special=False), data=st.data())
def test_nan_in_a_running_statistic_stays_in_its_channel(problem, data):
    channels = problem["mean"].shape[0]
    bad = data.draw(st.integers(0, channels - 1))
    which = data.draw(st.sampled_from(["mean", "var", "weight", "bias"]))
    vectors = {key: problem[key] for key in ("mean", "var", "weight", "bias")}
    if vectors[which] is None:
        vectors[which] = np.ones(channels, problem["dtype"])
    vectors[which] = vectors[which].copy()
    vectors[which][bad] = np.nan
    with np.errstate(all="ignore"):
        y = F.batch_norm(problem["x"], vectors["mean"], vectors["var"], vectors["weight"],
                         vectors["bias"], eps=problem["eps"], axis=problem["axis"])
    channel_of = np.indices(y.shape)[problem["axis"] % y.ndim]
    assert np.all(np.isnan(y[channel_of == bad]))
    assert not np.any(np.isnan(y[channel_of != bad]))


# section: training mode (once available) ------------------------------------------

training = pytest.mark.skipif(not bn_training_available(),
                              reason="batch_norm(training=True) not implemented yet")


def _by_channel(array, axis):
    """float64 view (C, n) of an array with the channel axis `axis`."""
    array = np.asarray(array, np.float64)
    return np.moveaxis(array, axis % array.ndim, 0).reshape(array.shape[axis], -1)


def _batch_statistics(x, axis, eps):
    """Exact (float64) per-channel mean, invstd and unbiased variance of x."""
    values = _by_channel(x, axis)
    mean = values.mean(axis=1)
    biased = ((values - mean[:, None]) ** 2).mean(axis=1)
    n = values.shape[1]
    return mean, 1.0 / np.sqrt(biased + eps), biased * n / max(n - 1, 1), values


def _assert_within(actual, expected, bound, name):
    actual64, expected64 = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual64.shape == expected64.shape, name
    error = np.abs(actual64 - expected64)
    assert np.all(error <= bound), (name, float(np.max(error - bound)))


ULPS = 64


@training
@settings(max_examples=120, **SETTINGS)
@given(problem=bn_problems(allow_special=False), data=st.data(),
       momentum=st.floats(0.0, 1.0))
def test_training_forward_matches_reference_and_updates_running_stats(problem, data, momentum):
    """Error bounds follow the operations: y = (x - mean) * invstd * w + b in
    the dtype costs a few ulps of (|x| + |mean|) * invstd * |w| + |b| (PyTorch's
    CPU kernel, like fastbn's, folds it into x * a + b); the variance a few
    ulps of itself plus the square of a few ulps of the data.  A computed
    mean is off by a few ulps of the mean of |x|, not of |mean| (the sum's
    rounding errors scale with the sum of |x|, and a mean near zero is the
    difference of large terms), so |x|'s channel mean stands in for |mean|.
    (Found by hypothesis: a float64 channel of values of order 1 whose
    running mean came out 7.1e-4 was 3.5e-16 off the reference against a
    bound of 1.0e-16 built from |mean|.)"""
    x = data.draw(layouts(problem["x"]))
    axis = problem["axis"]
    assume(x.size // x.shape[axis] > 1)
    outputs = {}
    for backend in ("fast", "reference"):
        mean, var = problem["mean"].copy(), problem["var"].copy()
        with fastbn.use_backend(backend), np.errstate(all="ignore"):
            y = F.batch_norm(x, mean, var, problem["weight"], problem["bias"], training=True,
                             momentum=momentum, eps=problem["eps"], axis=axis)
        outputs[backend] = (y, mean, var)
    dtype = problem["dtype"]
    u = ULPS * np.finfo(dtype).eps
    channels = x.shape[axis]
    weight = np.abs(problem["weight"]) if problem["weight"] is not None else np.ones(channels)
    bias = np.abs(problem["bias"]) if problem["bias"] is not None else np.zeros(channels)
    _, invstd, unbiased, values = _batch_statistics(x, axis, problem["eps"])
    mean_error_scale = np.mean(np.abs(values.astype(np.float64)), axis=1)  # >= |batch mean|
    shape = problem["broadcast"]
    y_scale = ((np.abs(x.astype(np.float64)) + mean_error_scale.reshape(shape)) * (invstd * weight).reshape(shape)
               + bias.reshape(shape))
    assert outputs["fast"][0].dtype == np.dtype(dtype)
    _assert_within(outputs["fast"][0], outputs["reference"][0], u * y_scale + u, "y")
    old_mean, old_var = np.abs(problem["mean"].astype(np.float64)), np.abs(problem["var"].astype(np.float64))
    _assert_within(outputs["fast"][1], outputs["reference"][1], u * (old_mean + mean_error_scale) + np.finfo(dtype).tiny,
                   "running_mean")
    data_ulp = u * np.max(np.abs(values), axis=1)
    _assert_within(outputs["fast"][2], outputs["reference"][2], u * (old_var + unbiased) + 4 * data_ulp ** 2,
                   "running_var")


@training
@settings(max_examples=120, **SETTINGS)
@given(problem=bn_problems(allow_special=False), data=st.data(), eval_mode=st.booleans())
def test_backward_matches_reference(problem, data, eval_mode):
    x = data.draw(layouts(problem["x"]))
    axis = problem["axis"]
    assume(x.size // x.shape[axis] > 1)
    dtype = problem["dtype"]
    rng = np.random.default_rng(x.size)
    dy = data.draw(layouts(rng.standard_normal(x.shape).astype(dtype)))
    weight, eps = problem["weight"], problem["eps"]
    results = {}
    for backend in ("fast", "reference"):
        with fastbn.use_backend(backend), np.errstate(all="ignore"):
            if eval_mode:
                results[backend] = F.batch_norm_backward_eval(dy, x, problem["mean"], problem["var"], weight,
                                                              eps, axis=axis)
            else:
                with fastbn.use_backend("reference"):
                    _, mean, invstd = F.batch_norm_forward_train(x, weight, problem["bias"], eps, axis=axis)
                results[backend] = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    u = ULPS * np.finfo(dtype).eps
    channels = x.shape[axis]
    w = np.abs(weight.astype(np.float64)) if weight is not None else np.ones(channels)
    if eval_mode:
        centre = problem["mean"].astype(np.float64)
        invstd = 1.0 / np.sqrt(problem["var"].astype(np.float64) + eps)
    else:
        centre, invstd, _, _ = _batch_statistics(x, axis, eps)
    xs, dys = _by_channel(x, axis), _by_channel(dy, axis)
    xhat_bound = (np.abs(xs) + np.abs(centre)[:, None]) * invstd[:, None]
    n = xs.shape[1]
    sum_dy = np.abs(dys).sum(axis=1)
    sum_dy_xhat = (np.abs(dys) * xhat_bound).sum(axis=1)
    dx_fast, dw_fast, db_fast = results["fast"]
    dx_ref, dw_ref, db_ref = results["reference"]
    assert dx_fast.dtype == dw_fast.dtype == db_fast.dtype == np.dtype(dtype)
    _assert_within(db_fast, db_ref, u * sum_dy + u, "dbias")
    _assert_within(dw_fast, dw_ref, u * sum_dy_xhat + u, "dweight")
    if eval_mode:
        dx_bound = u * (w * invstd)[:, None] * np.abs(dys)
    else:
        dx_bound = u * (w * invstd)[:, None] * (np.abs(dys) + (sum_dy[:, None] + xhat_bound * sum_dy_xhat[:, None]) / n)
    _assert_within(_by_channel(dx_fast, axis), _by_channel(dx_ref, axis), dx_bound + u, "dx")


@training
@settings(max_examples=60, **SETTINGS)
@given(problem=bn_problems(allow_special=False), data=st.data())
def test_training_nan_stays_within_its_channel(problem, data):
    x = problem["x"].copy()
    axis = problem["axis"] % x.ndim
    channels = x.shape[axis]
    bad = data.draw(st.integers(0, channels - 1))
    index = [0] * x.ndim
    index[axis] = bad
    x[tuple(index)] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    assume(x.size // channels > 1)
    mean, var = problem["mean"].copy(), problem["var"].copy()
    with np.errstate(all="ignore"):
        y = F.batch_norm(x, mean, var, problem["weight"], problem["bias"], training=True,
                         eps=problem["eps"], axis=problem["axis"])
    channel_of = np.indices(y.shape)[axis]
    assert not np.any(np.isnan(y[channel_of != bad]))
    others = np.arange(channels) != bad
    assert not np.any(np.isnan(mean[others])) and not np.any(np.isnan(var[others]))
    assert np.isnan(mean[bad]) or np.isinf(mean[bad])


@training
@settings(max_examples=40, **SETTINGS)
@given(dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2 ** 32 - 1),
       mean_value=st.sampled_from([1e4, -1e4, 1e6]))
def test_training_variance_is_accurate_for_data_with_a_large_mean(dtype, seed, mean_value):
    """float32 statistics are accumulated in float64 (never E[x^2] - E[x]^2 in float32)."""
    rng = np.random.default_rng(seed)
    x = (mean_value + rng.standard_normal((64, 3, 50))).astype(dtype)
    mean, var = np.zeros(3, dtype), np.ones(3, dtype)
    F.batch_norm(x, mean, var, training=True, momentum=1.0)
    exact = x.astype(np.float64).var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(var, exact, rtol=1e-3 if dtype == np.float32 else 1e-10)


# section: layers -------------------------------------------------------------------

def _bn_layer_class(ndim):
    nn = getattr(fastbn, "nn", None)
    names = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
    return getattr(nn, names[ndim], None) if nn is not None else None


layers = pytest.mark.skipif(_bn_layer_class(4) is None or not hasattr(_bn_layer_class(4), "backward"),
                            reason="fastbn.nn BatchNorm layers not available yet")


@layers
@settings(max_examples=80, **SETTINGS)
@given(dtype=st.sampled_from([np.float32, np.float64]), ndim=st.integers(2, 5),
       sizes=st.lists(st.integers(1, 5), min_size=5, max_size=5), axis=st.sampled_from([1, -1]),
       affine=st.booleans(), track=st.booleans(), momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
       steps=st.integers(1, 3), seed=st.integers(0, 2 ** 32 - 1))
def test_batch_norm_layers_match_reference_over_training_and_eval(dtype, ndim, sizes, axis, affine, track,
                                                                  momentum, steps, seed):
    shape = tuple(sizes[:ndim])
    channels = shape[axis]
    assume(int(np.prod(shape)) // channels > 1)
    results = {}
    for backend in ("fast", "reference"):
        rng = np.random.default_rng(seed)
        with fastbn.use_backend(backend):
            layer = _bn_layer_class(ndim)(channels, momentum=momentum, affine=affine,
                                          track_running_stats=track, axis=axis, dtype=dtype)
            if affine:
                layer.weight.data[...] = rng.standard_normal(channels)
                layer.bias.data[...] = rng.standard_normal(channels)
            outputs = []
            for _ in range(steps):
                x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
                layer.train()
                outputs.append(layer(x))
                outputs.append(layer.backward(rng.standard_normal(shape).astype(dtype)))
            layer.eval()
            outputs.append(layer((rng.standard_normal(shape) * 3 + 5).astype(dtype)))
            if affine:
                outputs += [layer.weight.grad, layer.bias.grad]
            outputs += [np.asarray(v) for v in layer.state_dict().values()]
        results[backend] = outputs
    tolerance = dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    assert len(results["fast"]) == len(results["reference"])
    for index, (fast, reference) in enumerate(zip(results["fast"], results["reference"])):
        assert fast.dtype == reference.dtype and fast.shape == reference.shape, index
        np.testing.assert_allclose(fast, reference, err_msg=str(index), **tolerance)
