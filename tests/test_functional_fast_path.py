"""The functional batch norm's one-crossing path: a valid call with plain
arguments runs one kernel method (`*_at`, geometry read from `axis`); every
result and every written buffer equals the validated path's (the one taken
when that method declines), and arguments it declines (numpy scalars,
overlapping `out`, odd axes) still get the validated path's result or error."""
import numpy as np
import pytest

import fastbn
from fastbn import _backend
from fastbn import functional as F

DTYPES = [np.float32, np.float64]
SHAPES = [((2, 4), 1), ((3, 5, 7), 1), ((3, 7, 5), -1), ((2, 3, 4, 5), 1)]


class _Recording:
    """Stands in for the active kernels object, recording each method called;
    with `decline`, the one-crossing methods answer None (the validated path)."""

    def __init__(self, kernels, decline=False):
        self._kernels, self.calls, self._decline = kernels, [], decline

    def __getattr__(self, name):
        method = getattr(self._kernels, name)

        def recorded(*args, **kwargs):
            self.calls.append(name)
            if self._decline and name.endswith("_at"):
                return None
            return method(*args, **kwargs)
        return recorded


def _run(kernels, call):
    token = _backend._current.set(kernels)
    try:
        return call()
    finally:
        _backend._current.reset(token)


def _problem(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    vectors = {name: rng.standard_normal(channels).astype(dtype)
               for name in ("running_mean", "weight", "bias", "mean")}
    vectors["running_var"] = rng.uniform(0.5, 2, channels).astype(dtype)
    vectors["invstd"] = rng.uniform(0.5, 2, channels).astype(dtype)
    return x, dy, vectors


def _calls(relu):
    suffix = "_relu" if relu else ""
    forward = getattr(F, f"batch_norm{suffix}")
    forward_train = getattr(F, f"batch_norm{suffix}_forward_train")
    backward = getattr(F, f"batch_norm{suffix}_backward")
    backward_eval = getattr(F, f"batch_norm{suffix}_backward_eval")
    extra = {"bias": None} if relu else {}

    def train(x, dy, v, axis):
        rm, rv = v["running_mean"].copy(), v["running_var"].copy()
        y = forward(x, rm, rv, v["weight"], v["bias"], training=True, momentum=0.25, axis=axis)
        return y, rm, rv

    def evaluate(x, dy, v, axis):
        return (forward(x, v["running_mean"], v["running_var"], v["weight"], v["bias"],
                        training=False, eps=1e-3, axis=axis),)

    def batch_stats_without_running_stats(x, dy, v, axis):
        return (forward(x, None, None, v["weight"], v["bias"], training=False, axis=axis),)

    def train_saving(x, dy, v, axis):
        rm, rv = v["running_mean"].copy(), v["running_var"].copy()
        return forward_train(x, v["weight"], v["bias"], axis=axis, running_mean=rm,
                             running_var=rv, momentum=0.5) + (rm, rv)

    def grad(x, dy, v, axis):
        if relu:
            extra["bias"] = v["bias"]
        return backward(dy, x, v["mean"], v["invstd"], v["weight"], axis=axis, **extra)

    def grad_eval(x, dy, v, axis):
        if relu:
            extra["bias"] = v["bias"]
        return backward_eval(dy, x, v["running_mean"], v["running_var"], v["weight"],
                             eps=1e-3, axis=axis, **extra)

    return [("train_forward_at", train), ("eval_forward_at", evaluate),
            ("train_forward_at", batch_stats_without_running_stats),
            ("train_forward_at", train_saving), ("backward_at", grad),
            ("backward_eval_at", grad_eval)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_valid_call_makes_one_kernel_call_and_matches_the_validated_path(shape, axis, dtype,
                                                                         relu):
    x, dy, v = _problem(shape, axis, dtype)
    for method, call in _calls(relu):
        fast = _Recording(_backend.FAST)
        results = _run(fast, lambda: call(x, dy, v, axis))
        assert fast.calls == [method]
        validated = _Recording(_backend.FAST, decline=True)
        expected = _run(validated, lambda: call(x, dy, v, axis))
        assert validated.calls[0] == method and len(validated.calls) == 2
        assert len(results) == len(expected)
        for got, want in zip(results, expected):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_scalar_eps_and_momentum_take_the_validated_path_with_the_same_result(dtype):
    x, _, v = _problem((6, 3), 1, dtype)
    results = []
    for eps, momentum in ((1e-3, 0.25), (np.float64(1e-3), np.float32(0.25))):
        rm, rv = v["running_mean"].copy(), v["running_var"].copy()
        y = F.batch_norm(x, rm, rv, v["weight"], v["bias"], training=True, momentum=momentum,
                         eps=eps)
        results.append((y, rm, rv))
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-13)


def test_out_aliasing_x_is_computed_in_place_on_both_paths():
    x, _, v = _problem((4, 3, 5), 1, np.float64)
    expected = F.batch_norm(x, v["running_mean"], v["running_var"], v["weight"], v["bias"])
    inplace = x.copy()
    y = F.batch_norm(inplace, v["running_mean"], v["running_var"], v["weight"], v["bias"],
                     out=inplace)
    assert y is inplace
    np.testing.assert_array_equal(inplace, expected)


def test_out_overlapping_a_running_statistic_is_refused_and_nothing_is_written():
    x, _, v = _problem((4, 3), 1, np.float64)
    buffer = np.zeros(12)
    rm = buffer[9:12]
    rv = np.ones(3)
    out = buffer.reshape(4, 3)
    rm[:] = 0.5
    before = buffer.copy()
    with pytest.raises(ValueError, match="out"):
        F.batch_norm(x, rm, rv, training=True, out=out)
    np.testing.assert_array_equal(buffer, before)


def test_backward_eval_with_out_x_raises_on_the_validated_path():
    x, dy, v = _problem((4, 3), 1, np.float64)
    with pytest.raises(ValueError, match="out"):
        F.batch_norm_backward_eval(dy, x, v["running_mean"], v["running_var"], out=x)


def test_backward_with_dy_of_another_shape_but_the_same_size_raises():
    x, dy, v = _problem((4, 3), 1, np.float64)
    with pytest.raises(ValueError, match="dy"):
        F.batch_norm_backward(dy.reshape(3, 4), x, v["mean"], v["invstd"])


def test_reference_backend_runs_the_validated_path_with_the_same_results():
    x, dy, v = _problem((5, 4, 3), 1, np.float64)
    with fastbn.use_backend("reference"):
        expected = F.batch_norm_backward(dy, x, v["mean"], v["invstd"], v["weight"])
    got = F.batch_norm_backward(dy, x, v["mean"], v["invstd"], v["weight"])
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
