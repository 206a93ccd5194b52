"""clip_grad_norm_: global norm (float64, fixed chunk order), PyTorch's
coefficient rule, fast kernel against the reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastbn
from fastbn.optim import clip_grad_norm_
from fastbn.parameter import Parameter

BACKENDS = ["fast", "reference"]
SHAPES = ((1,), (7,), (64,), (1000,), (4097,), (33, 65), (70001,))


def params_with_grads(dtype=np.float32, shapes=SHAPES, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    params = []
    for shape in shapes:
        param = Parameter(np.zeros(shape, dtype))
        param.grad = (scale * rng.standard_normal(shape)).astype(dtype)
        params.append(param)
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_is_the_float64_l2_norm_of_all_gradients(dtype, backend):
    params = params_with_grads(dtype)
    expected = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params))
    with fastbn.use_backend(backend):
        norm = clip_grad_norm_(params, max_norm=1e9)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipping_matches_reference_on_every_simd_target(dtype, norm_type, target, restore_config):
    fastbn.set_simd_target(target)
    fast, reference = params_with_grads(dtype), params_with_grads(dtype)
    norm = clip_grad_norm_(fast, max_norm=1.0, norm_type=norm_type)
    with fastbn.use_backend("reference"):
        expected = clip_grad_norm_(reference, max_norm=1.0, norm_type=norm_type)
    assert norm == pytest.approx(expected, rel=1e-12)
    coef = 1.0 / (expected + 1e-6)
    for a, b in zip(fast, reference):
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-6 if dtype == np.float32 else 1e-14)
        np.testing.assert_allclose(np.abs(a.grad).max(), np.abs(b.grad / coef).max() * coef, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_below_max_norm_are_left_untouched(backend):
    params = params_with_grads(scale=1e-3)
    before = [p.grad.copy() for p in params]
    with fastbn.use_backend(backend):
        norm = clip_grad_norm_(params, max_norm=100.0)
    assert norm < 100
    for param, grad in zip(params, before):
        np.testing.assert_array_equal(param.grad, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_gradients_have_norm_max_norm(backend):
    params = params_with_grads(np.float64)
    with fastbn.use_backend(backend):
        clip_grad_norm_(params, max_norm=2.5)
        assert clip_grad_norm_(params, max_norm=1e9) == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_params_without_grad(backend):
    params = params_with_grads(np.float32) + params_with_grads(np.float64, seed=1)
    params[2].grad = None
    params.append(Parameter(np.zeros(3)))
    expected = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params if p.grad is not None))
    with fastbn.use_backend(backend):
        assert clip_grad_norm_(params, max_norm=1.0) == pytest.approx(expected, rel=1e-12)
        assert clip_grad_norm_([Parameter(np.zeros(3))], max_norm=1.0) == 0.0


def test_one_and_two_threads_give_identical_bits(restore_config):
    if fastbn.get_num_threads() < 2:
        pytest.skip("needs 2 threads")
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        params = params_with_grads(np.float32, shapes=SHAPES + ((300, 400),))
        norm = clip_grad_norm_(params, max_norm=1.0)
        results.append((norm, [p.grad for p in params]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_norm_raises_only_when_asked(backend):
    params = params_with_grads(np.float32)
    params[3].grad[5] = np.nan
    with fastbn.use_backend(backend):
        assert math.isnan(clip_grad_norm_(params, max_norm=1.0))
        assert math.isnan(clip_grad_norm_(params, max_norm=1.0, norm_type=math.inf))
        with pytest.raises(RuntimeError, match="non-finite"):
            clip_grad_norm_(params, max_norm=1.0, error_if_nonfinite=True)
        params[3].grad[5] = np.inf
        assert clip_grad_norm_(params, max_norm=1.0, norm_type=math.inf) == math.inf


def test_single_parameter_and_bad_arguments():
    (param,) = params_with_grads(np.float64, shapes=((4,),))
    param.grad[:] = [3.0, 4.0, 0.0, 0.0]
    assert clip_grad_norm_(param, max_norm=10.0) == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"norm_type: expected 2.0 or inf, got 1.0"):
        clip_grad_norm_(param, 1.0, norm_type=1.0)
    with pytest.raises(TypeError, match=r"parameters\[0\]: expected a fastbn.Parameter"):
        clip_grad_norm_([np.zeros(3)], 1.0)
    with pytest.raises(TypeError, match="max_norm: expected a real number"):
        clip_grad_norm_(param, "1")


def bf16_params(shapes=SHAPES, scale=1.0, seed=3):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    params = params_with_grads(np.float32, shapes, scale, seed)
    for param in params:
        param.data = param.data.astype(ml_dtypes.bfloat16)
        param.grad = param.grad.astype(ml_dtypes.bfloat16)
    return params


def bf16_bits(array):
    return np.ascontiguousarray(array).view(np.uint16)


@pytest.mark.parametrize("target", fastbn.available_simd_targets())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_bf16_grads_are_clipped_in_float32_and_rounded_to_nearest_even(norm_type, backend, target,
                                                                         restore_config):
    # Oracle: the norm of the exact float32 values of the gradients (float64
    # sum), then each element times float32(coef), rounded to nearest-even.
    fastbn.set_simd_target(target)
    params = bf16_params(scale=0.5)
    widened = [p.grad.astype(np.float32) for p in params]
    if math.isinf(norm_type):
        expected_norm = max(float(np.max(np.abs(w))) for w in widened)
    else:
        expected_norm = math.sqrt(sum(float(np.dot(w.astype(np.float64).ravel(), w.astype(np.float64).ravel()))
                                      for w in widened))
    coef = np.float32(1.0 / (expected_norm + 1e-6))
    with fastbn.use_backend(backend):
        norm = clip_grad_norm_(params, max_norm=1.0, norm_type=norm_type)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    for param, w in zip(params, widened):
        assert param.grad.dtype == param.data.dtype
        expected = (w * coef).astype(param.grad.dtype)
        np.testing.assert_array_equal(bf16_bits(param.grad), bf16_bits(expected))


def test_bf16_grads_mixed_with_float32_match_the_reference_bit_for_bit():
    mixed = bf16_params(shapes=((7,), (4097,)), scale=2.0) + params_with_grads(np.float32, shapes=((1000,),))
    twin = bf16_params(shapes=((7,), (4097,)), scale=2.0) + params_with_grads(np.float32, shapes=((1000,),))
    norm = clip_grad_norm_(mixed, max_norm=0.5)
    with fastbn.use_backend("reference"):
        expected = clip_grad_norm_(twin, max_norm=0.5)
    assert norm == pytest.approx(expected, rel=1e-12)
    for a, b in zip(mixed[:2], twin[:2]):
        np.testing.assert_array_equal(bf16_bits(a.grad), bf16_bits(b.grad))
    np.testing.assert_allclose(mixed[2].grad, twin[2].grad, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_bf16_norm_raises_and_leaves_the_grads_unchanged(backend):
    params = bf16_params()
    params[2].grad[5] = np.nan
    before = [bf16_bits(p.grad).copy() for p in params]
    with fastbn.use_backend(backend):
        with pytest.raises(RuntimeError, match="non-finite"):
            clip_grad_norm_(params, max_norm=1.0, error_if_nonfinite=True)
    for param, old in zip(params, before):
        np.testing.assert_array_equal(bf16_bits(param.grad), old)


def test_float16_grad_is_refused_naming_the_parameter_and_dtypes():
    params = params_with_grads(np.float32, shapes=((3,), (4,)))
    params[1].grad = params[1].grad.astype(np.float16)
    with pytest.raises(TypeError, match=r"parameters\[1\]\.grad: expected a float32, float64 or bfloat16"):
        clip_grad_norm_(params, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_listed_twice_is_scaled_twice_in_bf16_as_in_float32(backend):
    # torch (and the float32 path) scale each listed entry, so a gradient
    # listed twice is scaled by coef twice; the bfloat16 one rounds after each
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = Parameter(np.zeros(4, ml_dtypes.bfloat16))
    bf16.grad = np.full(4, 2.0, ml_dtypes.bfloat16)
    fp32 = Parameter(np.zeros(4, np.float32))
    fp32.grad = np.full(4, 2.0, np.float32)
    with fastbn.use_backend(backend):
        norm_bf16 = clip_grad_norm_([bf16, bf16], 1.0)
        norm_fp32 = clip_grad_norm_([fp32, fp32], 1.0)
    assert norm_bf16 == norm_fp32 == pytest.approx(math.sqrt(32.0))
    coef = np.float32(1.0 / (math.sqrt(32.0) + 1e-6))
    once = (np.float32(2.0) * coef).astype(ml_dtypes.bfloat16)
    twice = (once.astype(np.float32) * coef).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bf16.grad.astype(np.float32), np.full(4, twice, np.float32))
    np.testing.assert_allclose(fp32.grad, 2.0 * coef * coef, rtol=1e-6)
