"""Property-based tests (hypothesis) of every optimizer and of
clip_grad_norm_ against the NumPy reference: random hyperparameters, dtypes,
parameter shapes (zero-size ones included), gradient layouts (strided,
negative strides, Fortran order, read-only), magnitudes from 1e-30 to 1e30
(to 1e15 for float32 gradients, whose squares must stay finite), +-inf and NaN
in gradients (a NaN stays in its own element), several steps with gradients
missing now and then."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from fastbn import optim
from fastbn.parameter import Parameter

from test_property_bn import layouts

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

GRAD_EXPONENTS = {np.float32: (-30, 15), np.float64: (-30, 30)}
# float32 parameters enter squares through weight decay (g + wd * param): same cap
PARAM_EXPONENTS = {np.float32: (-30, 15), np.float64: (-30, 30)}

unit = st.floats(0.0, 0.999)
positive_lr = st.one_of(st.just(0.0), st.floats(1e-6, 10.0))
decay = st.one_of(st.just(0.0), st.floats(1e-6, 1.0))
epsilon = st.floats(1e-12, 0.1)


@st.composite
def optimizers(draw):
    """(class, keyword arguments) with random valid hyperparameters."""
    name = draw(st.sampled_from(["sgd", "momentum", "rmsprop", "adam", "adamw", "adagrad", "lion"]))
    maximize = draw(st.booleans())
    if name == "sgd":
        momentum = draw(st.one_of(st.just(0.0), unit))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
        return optim.SGD, dict(lr=draw(positive_lr), momentum=momentum, dampening=dampening,
                               weight_decay=draw(decay), nesterov=nesterov, maximize=maximize)
    if name == "momentum":
        return optim.Momentum, dict(lr=draw(positive_lr), momentum=draw(unit),
                                    weight_decay=draw(decay), maximize=maximize)
    if name == "rmsprop":
        centered = draw(st.booleans())
        # centered: sqrt(v - gbar**2) of a nearly constant gradient is a
        # difference of rounded squares; alpha >= 0.5 keeps it well away from 0
        alpha = draw(st.floats(0.5, 0.999) if centered else unit)
        return optim.RMSprop, dict(lr=draw(positive_lr), alpha=alpha, eps=draw(epsilon),
                                   weight_decay=draw(decay), momentum=draw(st.one_of(st.just(0.0), unit)),
                                   centered=centered, maximize=maximize)
    if name in ("adam", "adamw"):
        cls = optim.Adam if name == "adam" else optim.AdamW
        return cls, dict(lr=draw(positive_lr), betas=(draw(unit), draw(unit)), eps=draw(epsilon),
                         weight_decay=draw(decay), amsgrad=draw(st.booleans()), maximize=maximize,
                         bias_correction=draw(st.booleans()))
    if name == "adagrad":
        return optim.Adagrad, dict(lr=draw(positive_lr), lr_decay=draw(decay), weight_decay=draw(decay),
                                   initial_accumulator_value=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
                                   eps=draw(epsilon), maximize=maximize)
    return optim.Lion, dict(lr=draw(positive_lr), betas=(draw(unit), draw(unit)),
                            weight_decay=draw(decay), maximize=maximize)


shapes = st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple)


@st.composite
def training_runs(draw, *, allow_special=True):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    param_shapes = draw(st.lists(shapes, min_size=1, max_size=3))
    low, high = PARAM_EXPONENTS[dtype]
    param_scale = 10.0 ** draw(st.integers(low, high))
    low, high = GRAD_EXPONENTS[dtype]
    grad_scale = 10.0 ** draw(st.integers(low, high))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    initial = [(param_scale * rng.standard_normal(shape)).astype(dtype) for shape in param_shapes]
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        grads = []
        for shape in param_shapes:
            if draw(st.integers(0, 4)) == 0:
                grads.append(None)
                continue
            grad = (grad_scale * rng.standard_normal(shape)).astype(dtype)
            if allow_special and grad.size and draw(st.integers(0, 3)) == 0:
                grad.reshape(-1)[rng.integers(0, grad.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            grads.append(draw(layouts(grad)) if grad.ndim else grad)
        steps.append(grads)
    return dtype, initial, steps


def run(cls, kwargs, initial, steps, backend):
    params = [Parameter(array.copy()) for array in initial]
    with fastbn.use_backend(backend), np.errstate(all="ignore"):
        opt = cls(params, **kwargs)
        for grads in steps:
            for param, grad in zip(params, grads):
                param.grad = grad
            opt.step()
    return params, opt


def assert_same_specials(actual, expected, name):
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{name}: NaN positions")
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=f"{name}: +inf positions")
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=f"{name}: -inf positions")


def assert_close_elementwise(actual, expected, magnitude, dtype, name, ulps=64):
    """|actual - expected| <= ulps * eps * magnitude (+ the smallest normal)."""
    assert actual.dtype == expected.dtype == np.dtype(dtype), name
    assert actual.shape == expected.shape, name
    assert_same_specials(actual, expected, name)
    finite = np.isfinite(expected) & np.isfinite(magnitude)
    with np.errstate(all="ignore"):
        error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    bound = ulps * np.finfo(dtype).eps * magnitude + np.finfo(dtype).tiny
    assert np.all(error[finite] <= bound[finite]), (name, float(np.max((error - bound)[finite])))


def _finite_max(array):
    finite = np.abs(array[np.isfinite(array)].astype(np.float64))
    return float(finite.max()) if finite.size else 0.0


@settings(max_examples=300, **SETTINGS)
@given(optimizer=optimizers(), run_data=training_runs())
def test_every_optimizer_matches_reference_on_random_problems(optimizer, run_data):
    cls, kwargs = optimizer
    dtype, initial, steps = run_data
    fast_params, fast_opt = run(cls, kwargs, initial, steps, "fast")
    ref_params, ref_opt = run(cls, kwargs, initial, steps, "reference")
    for index, (fast, ref, start) in enumerate(zip(fast_params, ref_params, initial)):
        # Rounding errors scale with every value the parameter passed through:
        # the start, the end, and each step's update (O(lr) for the normalized
        # optimizers; O(lr * |g|) for SGD/Momentum, twice that with Nesterov).
        magnitude = np.abs(start.astype(np.float64)) + np.abs(ref.data.astype(np.float64))
        if cls in (optim.SGD, optim.Momentum):
            gradient_sum = sum(_finite_max(grads[index]) for grads in steps if grads[index] is not None)
            per_step = 2 * gradient_sum + kwargs.get("weight_decay", 0) * _finite_max(magnitude)
        else:
            per_step = 1 + 2 * kwargs.get("weight_decay", 0) * _finite_max(magnitude)
        magnitude = magnitude + kwargs["lr"] * len(steps) * per_step
        assert_close_elementwise(fast.data, ref.data, magnitude, dtype, f"param{index}")
        fast_state, ref_state = fast_opt.state.get(fast, {}), ref_opt.state.get(ref, {})
        assert fast_state.keys() == ref_state.keys(), index
        for key, value in ref_state.items():
            if key == "step":
                assert fast_state[key] == value
                continue
            scale = np.abs(value.astype(np.float64)) + _finite_max(value)
            assert_close_elementwise(fast_state[key], value, scale, dtype, f"param{index}.{key}")


@settings(max_examples=150, **SETTINGS)
@given(optimizer=optimizers(), run_data=training_runs(allow_special=False), data=st.data())
def test_a_nan_gradient_element_poisons_only_its_own_element(optimizer, run_data, data):
    cls, kwargs = optimizer
    dtype, initial, steps = run_data
    sizes = [array.size for array in initial]
    if not any(sizes):
        return
    target = data.draw(st.sampled_from([i for i, size in enumerate(sizes) if size]))
    position = data.draw(st.integers(0, sizes[target] - 1))
    grad = np.ones(initial[target].shape, dtype)
    grad.reshape(-1)[position] = np.nan
    steps = [[grad if i == target else g for i, g in enumerate(grads)] for grads in steps[:1]]
    clean = [[np.ones_like(grad) if i == target else g for i, g in enumerate(grads)] for grads in steps]
    poisoned, _ = run(cls, kwargs, initial, steps, "fast")
    healthy, _ = run(cls, kwargs, initial, clean, "fast")
    for index, (bad, good) in enumerate(zip(poisoned, healthy)):
        bad_flat, good_flat = bad.data.reshape(-1), good.data.reshape(-1)
        others = np.ones(bad_flat.size, bool)
        if index == target:
            others[position] = False
            assert np.isnan(bad_flat[position]) or kwargs["lr"] == 0
        np.testing.assert_array_equal(bad_flat[others], good_flat[others])


@st.composite
def gradient_sets(draw):
    count = draw(st.integers(0, 4))
    grads = []
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    for _ in range(count):
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        low, high = GRAD_EXPONENTS[dtype]
        scale = 10.0 ** draw(st.integers(low, high))
        grad = (scale * rng.standard_normal(draw(shapes))).astype(dtype)
        if grad.size and draw(st.integers(0, 4)) == 0:
            grad.reshape(-1)[rng.integers(0, grad.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        grads.append(grad)
    return grads


@settings(max_examples=200, **SETTINGS)
@given(grads=gradient_sets(), max_norm=st.floats(1e-6, 1e6), norm_type=st.sampled_from([2.0, np.inf]))
def test_clip_grad_norm_matches_reference(grads, max_norm, norm_type):
    results = {}
    for backend in ("fast", "reference"):
        params = [Parameter(np.zeros_like(g), grad=g.copy()) for g in grads]
        with fastbn.use_backend(backend), np.errstate(all="ignore"):
            norm = optim.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        results[backend] = (norm, [p.grad for p in params])
    fast_norm, ref_norm = results["fast"][0], results["reference"][0]
    assert isinstance(fast_norm, float)
    if np.isnan(ref_norm):
        assert np.isnan(fast_norm)
    else:
        np.testing.assert_allclose(fast_norm, ref_norm, rtol=1e-12, atol=0)
    for index, (fast, ref) in enumerate(zip(results["fast"][1], results["reference"][1])):
        magnitude = np.abs(ref.astype(np.float64)) + _finite_max(ref)
        assert_close_elementwise(fast, ref, magnitude, fast.dtype.type, f"grad{index}", ulps=4)
