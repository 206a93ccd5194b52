"""Every public function of fastbn.functional has a twin in fastbn.reference
(bottleneck's slow/ idea): the same signature, the same results on random
inputs of every dtype, layout and odd shape, the same exception type on the
same bad input, and neither modifies its inputs except the documented
IN-OUT buffers (running statistics, `out`).

The arguments of each function come from ARGUMENTS, a registry keyed by
function name: a function added to ``functional.__all__`` without an entry
here fails `test_every_public_function_has_an_argument_builder`.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import fastbn.functional as F
from fastbn import reference as R

from conftest import TOLERANCE, assert_close

NAMES = tuple(F.__all__)
SHAPES = ((5, 3), (3, 3, 7), (2, 3, 5, 3))   # C = 3 on axis 1; moved last for axis -1
DTYPES = (np.float32, np.float64)
IN_OUT = ("running_mean", "running_var", "out")   # documented written buffers


def _x(rng, shape, axis, dtype, strided=False):
    if axis == -1:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    if strided:   # every other element of the first axis: not C-contiguous
        return (rng.standard_normal((2 * shape[0],) + shape[1:]) * 2 + 0.5).astype(dtype)[::2]
    return (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)


def _vector(rng, dtype, low, high):
    return rng.uniform(low, high, 3).astype(dtype)


def _forward(training, relu):
    def build(rng, x, dtype):
        args = (x, _vector(rng, dtype, -1, 1), _vector(rng, dtype, 0.5, 2),
                _vector(rng, dtype, 0.5, 1.5), _vector(rng, dtype, -0.5, 0.5), training, 0.1,
                1e-5)
        return args, {}
    return build


def _forward_train(rng, x, dtype):
    return ((x, _vector(rng, dtype, 0.5, 1.5), _vector(rng, dtype, -0.5, 0.5), 1e-5),
            dict(running_mean=_vector(rng, dtype, -1, 1), running_var=_vector(rng, dtype, 0.5, 2),
                 momentum=0.25))


def _backward(relu):
    def build(rng, x, dtype):
        mean = _vector(rng, dtype, -0.5, 0.5)
        invstd = _vector(rng, dtype, 0.5, 1.5)
        args = (np.ascontiguousarray(rng.standard_normal(x.shape).astype(dtype)), x, mean, invstd,
                _vector(rng, dtype, 0.5, 1.5))
        if relu:
            args += (_vector(rng, dtype, -0.5, 0.5),)
        return args, {}
    return build


def _backward_eval(relu):
    def build(rng, x, dtype):
        args = (rng.standard_normal(x.shape).astype(dtype), x, _vector(rng, dtype, -1, 1),
                _vector(rng, dtype, 0.5, 2), _vector(rng, dtype, 0.5, 1.5))
        if relu:
            args += (_vector(rng, dtype, -0.5, 0.5),)
        return args + (1e-5,), {}
    return build


def _stats(rng, x, dtype):
    return (x,), {}


def _merge_stats(rng, x, dtype):
    """Three parts, one of them empty; float64 statistics as they cross processes."""
    counts = np.array([x.size // 3, 0, 4])
    means = rng.normal(0.5, 2.0, (3, 3))
    m2s = rng.uniform(0.5, 4.0, (3, 3)) * counts[:, None]
    return (counts, means, m2s), {}


def _apply(rng, x, dtype):
    # mean in float64 (as merged), invstd in x's dtype: both are accepted
    return ((x, rng.uniform(-0.5, 1.0, 3), _vector(rng, dtype, 0.5, 1.5),
             _vector(rng, dtype, 0.5, 1.5), _vector(rng, dtype, -0.5, 0.5)),
            dict(relu=True))


def _backward_reduce(rng, x, dtype):
    return ((rng.standard_normal(x.shape).astype(dtype), x, rng.uniform(-0.5, 1.0, 3),
             _vector(rng, dtype, 0.5, 1.5)),
            dict(relu_from=(_vector(rng, dtype, 0.5, 1.5), _vector(rng, dtype, -0.5, 0.5))))


def _backward_apply(rng, x, dtype):
    args, kwargs = _backward_reduce(rng, x, dtype)
    count = 2 * (x.size // 3)   # this part and another of the same size
    sums = (rng.normal(0.0, 4.0, 3), rng.normal(0.0, 4.0, 3).astype(dtype))
    return args + (_vector(rng, dtype, 0.5, 1.5),) + sums + (count,), kwargs


ARGUMENTS = {
    "batch_norm": _forward(False, False),
    "batch_norm_relu": _forward(False, True),
    "batch_norm_forward_train": _forward_train,
    "batch_norm_relu_forward_train": _forward_train,
    "batch_norm_backward": _backward(False),
    "batch_norm_relu_backward": _backward(True),
    "batch_norm_backward_eval": _backward_eval(False),
    "batch_norm_relu_backward_eval": _backward_eval(True),
    "batch_norm_stats": _stats,
    "batch_norm_merge_stats": _merge_stats,
    "batch_norm_apply": _apply,
    "batch_norm_backward_reduce": _backward_reduce,
    "batch_norm_backward_apply": _backward_apply,
}
TRAINING_TOO = ("batch_norm", "batch_norm_relu")   # also called with training=True


def _cases():
    for name in NAMES:
        for dtype in DTYPES:
            for shape in SHAPES:
                for axis in (1, -1):
                    if axis == -1 and len(shape) == 2:
                        continue   # (N, C) is the same layout for both axes
                    for strided in (False, True):
                        yield pytest.param(name, dtype, shape, axis, strided,
                                           id=f"{name}-{np.dtype(dtype).name}-{shape}-"
                                              f"axis{axis}-{'strided' if strided else 'plain'}")


def _arguments(name, dtype, shape, axis, strided, seed=0, training=None):
    rng = np.random.default_rng(seed)
    x = _x(rng, shape, axis, dtype, strided)
    args, kwargs = ARGUMENTS[name](rng, x, dtype)
    if training is not None:
        args = args[:5] + (training,) + args[6:]
    if "axis" in inspect.signature(getattr(F, name)).parameters:
        kwargs = dict(kwargs, axis=axis)
    return args, kwargs


def _copies(args, kwargs):
    return ([np.copy(a) if isinstance(a, np.ndarray) else a for a in args],
            {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})


def _named(function, args, kwargs) -> dict:
    return dict(inspect.signature(function).bind(*args, **kwargs).arguments)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _assert_agree(fast_value, slow_value, dtype):
    """Same type, shape and dtype; values to the INPUT dtype's tolerance (a
    float64 statistic of float32 data is as accurate as the data)."""
    assert type(fast_value) is type(slow_value)
    if isinstance(fast_value, int):   # a count
        assert fast_value == slow_value
        return
    assert fast_value.shape == slow_value.shape and fast_value.dtype == slow_value.dtype
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(fast_value, slow_value, rtol=tolerance["rtol"] * 100,
                               atol=tolerance["atol"] * 100)


def test_every_public_function_has_an_argument_builder():
    assert sorted(ARGUMENTS) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_twin_has_the_identical_signature(name):
    assert name in R.__all__
    assert inspect.signature(getattr(R, name)) == inspect.signature(getattr(F, name))


@pytest.mark.parametrize("name, dtype, shape, axis, strided", list(_cases()))
def test_twins_agree_and_write_only_documented_buffers(name, dtype, shape, axis, strided):
    for training in ((False, True) if name in TRAINING_TOO else (None,)):
        args, kwargs = _arguments(name, dtype, shape, axis, strided, training=training)
        fast_args, fast_kwargs = _copies(args, kwargs)
        slow_args, slow_kwargs = _copies(args, kwargs)
        fast = _as_tuple(getattr(F, name)(*fast_args, **fast_kwargs))
        slow = _as_tuple(getattr(R, name)(*slow_args, **slow_kwargs))
        assert len(fast) == len(slow)
        for fast_value, slow_value in zip(fast, slow):
            _assert_agree(fast_value, slow_value, dtype)
        given = _named(getattr(F, name), args, kwargs)
        for side_args, side_kwargs in ((fast_args, fast_kwargs), (slow_args, slow_kwargs)):
            after = _named(getattr(F, name), side_args, side_kwargs)
            for key, value in given.items():
                if not isinstance(value, np.ndarray):
                    continue
                if key in IN_OUT:   # written the same way by both twins
                    assert_close(after[key], _named(getattr(F, name), fast_args,
                                                    fast_kwargs)[key], dtype, scale=100)
                else:
                    np.testing.assert_array_equal(after[key], value, err_msg=f"{name}: {key}")


def _bad_inputs(name):
    """(label, change(args, kwargs)) pairs, each making one argument bad."""
    def replace(index, value):
        def change(args, kwargs):
            args = list(args)
            args[index] = value(args[index]) if callable(value) else value
            return args, kwargs
        return change

    def keyword(key, value):
        def change(args, kwargs):
            return args, dict(kwargs, **{key: value(kwargs.get(key)) if callable(value) else value})
        return change

    if name in PHASE_BAD_INPUTS:
        yield from PHASE_BAD_INPUTS[name](replace, keyword)
        return
    x_index = 1 if "backward" in name else 0
    yield "x of ints", replace(x_index, lambda x: x.astype(np.int32))
    yield "x 1-D", replace(x_index, lambda x: x.ravel())
    yield "axis 0", keyword("axis", 0)
    yield "axis float", keyword("axis", 1.0)
    yield "out of float16", keyword("out", lambda _: np.empty((5, 3), np.float16))
    yield "out wrong shape", keyword("out", lambda _: np.empty((5, 4), np.float32))
    if "backward" in name:
        yield "dy of another shape", replace(0, lambda dy: dy[:-1])
        yield "mean of 4 channels", replace(2, lambda m: np.resize(m, 4))
        yield "weight of another dtype", replace(4, lambda w: w.astype(np.float16))
        if "eval" in name:   # eps is the last positional argument
            yield "eps negative", replace(-1, -1.0)
    else:
        yield "weight of 4 channels", replace(3 if "train" not in name else 1,
                                              lambda w: np.resize(w, 4))
        yield "eps string", replace(-1, "1e-5")   # eps is the last positional argument
        yield "eps negative", replace(-1, -1.0)
        if "train" in name:
            yield "running_var missing", keyword("running_var", None)
            yield "momentum above 1", keyword("momentum", 1.5)
            yield "one value per channel", replace(0, lambda x: x[:1])


def _bad_x(replace, index):
    yield "x of ints", replace(index, lambda x: x.astype(np.int32))
    yield "x 1-D", replace(index, lambda x: x.ravel())
    yield "x None", replace(index, None)


def _bad_axis(keyword):
    yield "axis 0", keyword("axis", 0)
    yield "axis float", keyword("axis", 1.0)
    yield "axis 3", keyword("axis", 3)


def _bad_phase_vectors(replace, first, names):
    for offset, label in enumerate(names):
        yield f"{label} of 4 channels", replace(first + offset, lambda v: np.resize(v, 4))
        yield f"{label} of ints", replace(first + offset, lambda v: v.astype(np.int32))
        yield f"{label} missing", replace(first + offset, None)


def _bad_stats(replace, keyword):
    yield from _bad_x(replace, 0)
    yield from _bad_axis(keyword)
    yield "x of float16", replace(0, lambda x: x.astype(np.float16))
    yield "x a string", replace(0, "x")


def _bad_merge_stats(replace, keyword):
    yield "counts of floats", replace(0, lambda c: c.astype(np.float64) + 0.5)
    yield "counts negative", replace(0, lambda c: c - 10 ** 6)
    yield "counts empty", replace(0, np.zeros(0, np.int64))
    yield "counts 2-D", replace(0, lambda c: c[:, None])
    yield "counts a number", replace(0, 3)
    yield "means of 2 parts", replace(1, lambda m: m[:2])
    yield "means 1-D", replace(1, lambda m: m[0])
    yield "m2s of another shape", replace(2, lambda m: m[:, :2])
    yield "m2s of ints", replace(2, lambda m: m.astype(np.int32))


def _bad_apply(replace, keyword):
    yield from _bad_x(replace, 0)
    yield from _bad_axis(keyword)
    yield from _bad_phase_vectors(replace, 1, ("mean", "invstd"))
    yield "weight of 4 channels", replace(3, lambda w: np.resize(w, 4))
    yield "bias of another dtype", replace(4, lambda b: b.astype(np.float16))
    yield "relu not a bool", keyword("relu", "yes")
    yield "out of float16", keyword("out", lambda _: np.empty((5, 3), np.float16))
    yield "out wrong shape", keyword("out", lambda _: np.empty((5, 4), np.float32))


def _bad_backward_reduce(replace, keyword):
    yield from _bad_x(replace, 1)
    yield from _bad_axis(keyword)
    yield "dy of another shape", replace(0, lambda dy: dy[:-1])
    yield "dy of another dtype", replace(0, lambda dy: dy.astype(np.float64))
    yield from _bad_phase_vectors(replace, 2, ("mean", "invstd"))
    yield "relu_from not a pair", keyword("relu_from", lambda pair: pair[0])
    yield "relu_from bias of 4 channels", keyword(
        "relu_from", lambda pair: (pair[0], np.resize(pair[1], 4)))


def _bad_backward_apply(replace, keyword):
    yield from _bad_backward_reduce(replace, keyword)
    yield "weight of another dtype", replace(4, lambda w: w.astype(np.float16))
    yield from _bad_phase_vectors(replace, 5, ("sum_dy", "sum_dy_xhat"))
    yield "count zero", replace(7, 0)
    yield "count float", replace(7, 30.0)
    yield "out of float16", keyword("out", lambda _: np.empty((5, 3), np.float16))


PHASE_BAD_INPUTS = {"batch_norm_stats": _bad_stats, "batch_norm_merge_stats": _bad_merge_stats,
                    "batch_norm_apply": _bad_apply,
                    "batch_norm_backward_reduce": _bad_backward_reduce,
                    "batch_norm_backward_apply": _bad_backward_apply}


@pytest.mark.parametrize("name", NAMES)
def test_twins_raise_the_same_exception_type_on_the_same_bad_input(name):
    checked = 0
    for label, change in _bad_inputs(name):
        raised = []
        for module in (F, R):
            args, kwargs = _arguments(name, np.float32, (5, 3), 1, False)
            args, kwargs = change(args, kwargs)
            with pytest.raises((TypeError, ValueError)) as error:
                getattr(module, name)(*args, **kwargs)
            raised.append((type(error.value), str(error.value)))
        assert raised[0] == raised[1], f"{name}, {label}"
        checked += 1
    assert checked >= 8
