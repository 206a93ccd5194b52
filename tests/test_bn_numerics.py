"""Batch-norm accuracy when the channel mean is large compared with its spread,
and eval with ``running_var + eps == 0``.

The forwards compute ``(x - mean) * scale + shift``: ``x - mean`` is exact for
x near the mean, so a large mean costs no precision (the folded form
``x * scale + (bias - mean * scale)`` cancels two large numbers and loses the
low bits; torch's CPU kernel folds).  Every forward is compared with a
float64 computation on float32 data, on every SIMD target the CPU runs, both
layouts, and on the reference backend:

* with torch installed: the max abs error is no larger than torch's on the
  same data;
* always: the error is within a bound derived from float32 rounding
  (`rounding_bound`), and a constant channel gives exactly the bias.

The fused batch norm + ReLU training forward is the one exception to the
torch comparison: its backward recomputes the ReLU mask from the SAVED
(float32) mean, so the forward must normalize with that same rounded mean to
keep the mask exact at the kink.  Its error therefore includes the rounding
of the mean, ``|mean - float32(mean)| * |weight * invstd|`` (at most half an
ulp of the mean times the scale), which can exceed torch's on a given data
set; it is checked against that bound instead.
"""
import contextlib

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

try:
    import torch
except ImportError:  # torch is optional: the rounding bounds still apply
    torch = None

SHAPE = (16, 4, 24, 24)                        # NCHW; channels-last is its transpose
WEIGHT = np.array([0.5, 1.5, -2.0, 1.0], np.float32)
BIAS = np.array([0.25, -1.0, 3.0, 0.0], np.float32)
EPS = 1e-5
UNIT_ROUNDOFF = 2.0 ** -24                     # float32
# Bound on the error of one output, in units of u * (|xhat * weight| + |bias|):
# the rounding of the scale, of the shift and of the output (FMA or multiply +
# add), and the float32 short sums feeding the float64 statistics (~1e-7
# relative on the variance, see bn_train_impl.h), with a margin of 2.
ROUNDING_FACTOR = 8.0

IMPLEMENTATIONS = [f"fast-{target}" for target in fastbn.available_simd_targets()] + ["reference"]


@contextlib.contextmanager
def implementation(name):
    """Run the public API on the named SIMD target or on the reference."""
    if name == "reference":
        with fastbn.use_backend("reference"):
            yield
        return
    previous = fastbn.get_simd_target()
    fastbn.set_simd_target(name[len("fast-"):])
    try:
        yield
    finally:
        fastbn.set_simd_target(previous)


def make_data(kind):
    rng = np.random.default_rng(2024)
    if kind == "1e3+0.01N":
        return (1e3 + 0.01 * rng.standard_normal(SHAPE)).astype(np.float32)
    if kind == "1e4+N":
        return (1e4 + rng.standard_normal(SHAPE)).astype(np.float32)
    if kind == "const1000":
        return np.full(SHAPE, 1000.0, np.float32)
    if kind == "const1e4":
        return np.full(SHAPE, 1e4, np.float32)
    raise AssertionError(kind)


DATA = ["1e3+0.01N", "1e4+N", "const1000", "const1e4"]
CONSTANT = {"const1000", "const1e4"}


def to_layout(x, axis):
    return x if axis == 1 else np.ascontiguousarray(np.moveaxis(x, 1, -1))


def channel_view(a, axis):
    """(channels, values) view of an array in either layout."""
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def batch_statistics64(x, axis):
    values = channel_view(x, axis).astype(np.float64)
    mean = values.mean(axis=1)
    var = ((values - mean[:, None]) ** 2).mean(axis=1)
    return mean, var


def normalize64(x, mean, invstd, axis):
    """(x - mean) * invstd * weight + bias in float64 (the truth)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    per_channel = [np.asarray(v, np.float64).reshape(shape) for v in (mean, invstd, WEIGHT, BIAS)]
    mean, invstd, weight, bias = per_channel
    return (x.astype(np.float64) - mean) * invstd * weight + bias


def bias_array(axis):
    shape = [1] * len(SHAPE)
    shape[axis] = -1
    return BIAS.astype(np.float64).reshape(shape)


def channel_errors(y, truth, axis):
    return np.abs(channel_view(y.astype(np.float64) - truth, axis)).max(axis=1)


def rounding_bound(truth_pre_bias, axis):
    """Per-channel bound from float32 rounding: ROUNDING_FACTOR * u * max over
    the channel of (|xhat * weight| + |bias|)."""
    magnitude = channel_view(np.abs(truth_pre_bias), axis).max(axis=1) + np.abs(BIAS)
    return ROUNDING_FACTOR * UNIT_ROUNDOFF * magnitude


def torch_forward(x, axis, training, running_mean=None, running_var=None, relu=False):
    """torch's CPU batch norm on the same float32 data, in x's layout."""
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1) if axis == -1 else x))
    if axis == -1:
        xt = xt.contiguous(memory_format=torch.channels_last)
    rm = None if running_mean is None else torch.from_numpy(running_mean.copy())
    rv = None if running_var is None else torch.from_numpy(running_var.copy())
    y = torch.nn.functional.batch_norm(xt, rm, rv, torch.from_numpy(WEIGHT.copy()),
                                       torch.from_numpy(BIAS.copy()), training=training,
                                       momentum=0.1, eps=EPS)
    if relu:
        y = torch.relu(y)
    y = y.numpy()
    return y if axis == 1 else np.moveaxis(y, 1, -1)


def check_accuracy(y, truth, bound, axis, torch_y=None):
    errors = channel_errors(y, truth, axis)
    assert np.all(errors <= bound), f"errors {errors} exceed the rounding bound {bound}"
    if torch_y is not None:
        torch_error = channel_errors(torch_y, truth, axis).max()
        assert errors.max() <= torch_error, \
            f"max error {errors.max():.3g} is larger than torch's {torch_error:.3g}"


def expect_bias_on_constant_channels(y, axis, relu):
    expected = np.maximum(BIAS, 0) if relu else BIAS
    values = channel_view(y, axis)
    assert np.array_equal(values, np.broadcast_to(expected[:, None], values.shape)), \
        f"constant channels give {np.unique(values)}, not exactly {expected}"


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kind", DATA)
def test_training_forward_with_large_mean_is_as_accurate_as_torch(name, axis, kind):
    x = to_layout(make_data(kind), axis)
    mean, var = batch_statistics64(x, axis)
    invstd = 1 / np.sqrt(var + EPS)
    truth = normalize64(x, mean, invstd, axis)
    with implementation(name):
        y = F.batch_norm(x, None, None, WEIGHT, BIAS, training=True, eps=EPS, axis=axis)
        y_trained, saved_mean, _ = F.batch_norm_forward_train(x, WEIGHT, BIAS, EPS, axis=axis)
    np.testing.assert_array_equal(y_trained, y)
    # the saved mean is the float64 batch mean, rounded once
    np.testing.assert_array_equal(saved_mean, mean.astype(np.float32))
    if kind in CONSTANT:
        expect_bias_on_constant_channels(y, axis, relu=False)
    torch_y = torch_forward(x, axis, training=True) if torch is not None else None
    check_accuracy(y, truth, rounding_bound(truth - bias_array(axis), axis), axis, torch_y)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("relu", [False, True])
def test_eval_forward_with_large_running_mean_is_as_accurate_as_torch(name, axis, kind, relu):
    x = to_layout(make_data(kind), axis)
    mean, var = batch_statistics64(x, axis)
    running_mean = mean.astype(np.float32)                  # the channel mean
    running_var = np.maximum(var, 1e-4).astype(np.float32)
    invstd = 1 / np.sqrt(running_var.astype(np.float64) + np.float64(np.float32(EPS)))
    pre = normalize64(x, running_mean, invstd, axis)
    truth = np.maximum(pre, 0) if relu else pre
    function = F.batch_norm_relu if relu else F.batch_norm
    with implementation(name):
        y = function(x, running_mean, running_var, WEIGHT, BIAS, training=False, eps=EPS,
                     axis=axis)
    if kind in CONSTANT:
        expect_bias_on_constant_channels(y, axis, relu)
    torch_y = (torch_forward(x, axis, False, running_mean, running_var, relu)
               if torch is not None else None)
    check_accuracy(y, truth, rounding_bound(pre - bias_array(axis), axis), axis, torch_y)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kind", DATA)
def test_fused_relu_training_forward_error_is_at_most_the_saved_mean_rounding(name, axis, kind):
    x = to_layout(make_data(kind), axis)
    mean, var = batch_statistics64(x, axis)
    invstd = 1 / np.sqrt(var + EPS)
    pre = normalize64(x, mean, invstd, axis)
    with implementation(name):
        y, saved_mean, saved_invstd = F.batch_norm_relu_forward_train(x, WEIGHT, BIAS, EPS,
                                                                      axis=axis)
    np.testing.assert_array_equal(saved_mean, mean.astype(np.float32))
    if kind in CONSTANT:
        expect_bias_on_constant_channels(y, axis, relu=True)
    # normalizing with the float32 saved mean shifts every output by
    # (mean - saved_mean) * weight * invstd: at most half an ulp of the mean
    mean_rounding = np.abs(mean - saved_mean.astype(np.float64)) * np.abs(WEIGHT * invstd)
    assert np.all(mean_rounding <= np.spacing(saved_mean) / 2 * np.abs(WEIGHT * invstd))
    bound = rounding_bound(pre - bias_array(axis), axis) + mean_rounding
    errors = channel_errors(y, np.maximum(pre, 0), axis)
    assert np.all(errors <= bound), f"errors {errors} exceed {bound}"


@pytest.mark.parametrize("name", [n for n in IMPLEMENTATIONS if n != "reference"])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("relu", [False, True])
def test_large_mean_training_results_do_not_depend_on_thread_count(name, axis, relu):
    x = to_layout(make_data("1e3+0.01N"), axis)
    function = F.batch_norm_relu_forward_train if relu else F.batch_norm_forward_train
    results = []
    with implementation(name):
        for threads in (1, 2, 3):
            fastbn.set_num_threads(threads)
            try:
                results.append(function(x, WEIGHT, BIAS, EPS, axis=axis))
            finally:
                fastbn.set_num_threads(None)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("relu", [False, True])
def test_training_backward_with_large_mean_stays_centered(name, axis, relu):
    """dx = w*invstd/n * (n*dy - sum(dy) - xhat*sum(dy*xhat)) with
    xhat = (x - mean) * invstd: expanding xhat in x (x * invstd -
    mean * invstd) cancels two large terms when |mean| >> std."""
    x = to_layout(make_data("1e3+0.01N"), axis)
    dy = to_layout(np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32), axis)
    with implementation(name):
        forward = F.batch_norm_relu_forward_train if relu else F.batch_norm_forward_train
        _, mean, invstd = forward(x, WEIGHT, BIAS, EPS, axis=axis)
        if relu:
            dx, _, _ = F.batch_norm_relu_backward(dy, x, mean, invstd, WEIGHT, BIAS, axis=axis)
        else:
            dx, _, _ = F.batch_norm_backward(dy, x, mean, invstd, WEIGHT, axis=axis)
    xhat = channel_view(x, axis).astype(np.float64) - mean.astype(np.float64)[:, None]
    xhat *= invstd.astype(np.float64)[:, None]
    g = channel_view(dy, axis).astype(np.float64)
    if relu:
        g = np.where(xhat * WEIGHT[:, None] + BIAS[:, None] > 0, g, 0.0)
    n = xhat.shape[1]
    scale = (WEIGHT * invstd.astype(np.float64))[:, None]
    sum_g, sum_gx = g.sum(axis=1)[:, None], (g * xhat).sum(axis=1)[:, None]
    terms = [scale * g, scale * sum_g / n, scale * xhat * sum_gx / n]
    truth = terms[0] - terms[1] - terms[2]
    magnitude = sum(np.abs(t) for t in terms).max(axis=1)
    errors = np.abs(channel_view(dx, axis).astype(np.float64) - truth).max(axis=1)
    # a few roundings of terms of that magnitude (the folded form was off by
    # ~ u * |mean * invstd| * |that|, here 1e5 times more)
    assert np.all(errors <= 16 * UNIT_ROUNDOFF * magnitude), (errors, magnitude)


# ---- eval with running_var + eps == 0 ---------------------------------------

def zero_variance_inputs(axis):
    # channel 0: x == running_mean at two places; channel 2 has weight 0;
    # channel 3 has a negative weight; -0.0 against a +0.0 mean
    x = np.array([[0.5, 0.0, 2.0, -1.0],
                  [1.0, -0.0, 2.0, 3.0],
                  [-3.0, 5.0, -2.0, 3.0],
                  [1.0, 0.0, 7.0, 0.5]], np.float32)       # (N, C)
    x = np.repeat(x[:, :, None], 3, axis=2)                 # (N, C, L)
    running_mean = np.array([1.0, 0.0, 2.0, 3.0], np.float32)
    running_var = np.zeros(4, np.float32)
    weight = np.array([2.0, 1.0, 0.0, -0.5], np.float32)
    bias = np.array([0.5, -0.25, 1.0, 0.0], np.float32)
    return (x if axis == 1 else np.ascontiguousarray(np.moveaxis(x, 1, -1)),
            running_mean, running_var, weight, bias)


def zero_variance_expected(x, running_mean, weight, bias, axis, relu):
    """IEEE value of (x - mean) / sqrt(0) * weight + bias: +-inf where
    x != running_mean and weight != 0, NaN where x == running_mean (0 * inf)
    or weight == 0 (inf * 0)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    diff = x.astype(np.float64) - running_mean.reshape(shape)
    w = np.ones_like(running_mean) if weight is None else weight
    sign = np.sign(diff) * np.sign(w.reshape(shape))
    expected = np.where(sign > 0, np.inf, -np.inf)
    expected[(diff == 0) | (w.reshape(shape) == 0)] = np.nan
    if relu:
        expected = np.where(expected < 0, 0.0, expected)    # NaN passes through
    return expected.astype(np.float32)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_with_zero_variance_and_zero_eps_gives_inf_and_nan_at_the_mean(name, axis, relu,
                                                                            affine):
    x, running_mean, running_var, weight, bias = zero_variance_inputs(axis)
    if not affine:
        weight = bias = None
    function = F.batch_norm_relu if relu else F.batch_norm
    with implementation(name), np.errstate(divide="ignore", invalid="ignore"):
        y = function(x, running_mean, running_var, weight, bias, training=False, eps=0.0,
                     axis=axis)
    expected = zero_variance_expected(x, running_mean, weight, bias, axis, relu)
    assert np.isnan(expected).any() and np.isinf(expected).any()
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("relu", [False, True])
def test_eval_with_zero_variance_and_zero_eps_is_the_same_on_both_backends(axis, relu):
    x, running_mean, running_var, weight, bias = zero_variance_inputs(axis)
    function = F.batch_norm_relu if relu else F.batch_norm
    fast = function(x, running_mean, running_var, weight, bias, training=False, eps=0.0,
                    axis=axis)
    with fastbn.use_backend("reference"), np.errstate(divide="ignore", invalid="ignore"):
        reference = function(x, running_mean, running_var, weight, bias, training=False, eps=0.0,
                             axis=axis)
    # same values and NaN positions (assert_array_equal: NaN == NaN, -inf != inf)
    assert np.isnan(fast).any() and np.isinf(fast).any()
    np.testing.assert_array_equal(fast, reference)
