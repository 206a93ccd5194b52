"""Batch-norm backward (training: batch statistics; eval: running statistics):
fast kernels vs the NumPy reference, finite differences, memory layouts,
`out=`, and bitwise determinism across thread counts."""
import os

import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import reference as R

from conftest import array_variants, assert_close
from test_bn_train import CASES, DETERMINISM_CASES, DTYPES, _with_threads

# dweight and dbias are sums over n values: their rounding grows with n
SUM_SCALE = 20


def make_backward_inputs(rng, shape, axis, dtype, affine=True):
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 2 - 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.standard_normal(channels).astype(dtype) if affine else None
    _, mean, invstd = R.batch_norm_forward_train(x, axis=axis) if x.size // channels > 1 else (
        None, x.mean(axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim)),
        np.ones(channels, dtype))
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = (rng.random(channels) + 0.5).astype(dtype)
    return dy, x, weight, mean, invstd, running_mean, running_var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_reference(simd_target, shape, axis, dtype, affine, rng):
    dy, x, weight, mean, invstd, _, _ = make_backward_inputs(rng, shape, axis, dtype, affine)
    before = [a.copy() for a in (dy, x, mean, invstd)]
    dx, dweight, dbias = F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = R.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    assert dx.shape == x.shape and dweight.shape == dbias.shape == (shape[axis],)
    assert_close(dx, dx_ref, dtype, scale=SUM_SCALE)
    assert_close(dweight, dweight_ref, dtype, scale=SUM_SCALE)
    assert_close(dbias, dbias_ref, dtype, scale=SUM_SCALE)
    for a, b in zip(before, (dy, x, mean, invstd)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_backward_matches_reference(simd_target, shape, axis, dtype, affine, rng):
    dy, x, weight, _, _, running_mean, running_var = make_backward_inputs(rng, shape, axis,
                                                                          dtype, affine)
    dx, dweight, dbias = F.batch_norm_backward_eval(dy, x, running_mean, running_var, weight,
                                                    1e-3, axis=axis)
    dx_ref, dweight_ref, dbias_ref = R.batch_norm_backward_eval(dy, x, running_mean, running_var,
                                                                weight, 1e-3, axis=axis)
    assert_close(dx, dx_ref, dtype)
    assert_close(dweight, dweight_ref, dtype, scale=SUM_SCALE)
    assert_close(dbias, dbias_ref, dtype, scale=SUM_SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_backward_accepts_any_memory_layout(simd_target, dtype, axis, rng):
    dy, x, weight, mean, invstd, running_mean, running_var = make_backward_inputs(
        rng, (3, 5, 6, 7), axis, dtype)
    expected = R.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    expected_eval = R.batch_norm_backward_eval(dy, x, running_mean, running_var, weight,
                                               axis=axis)
    for (_, x_variant), (_, dy_variant) in zip(array_variants(x), array_variants(dy)):
        for got, want in zip(F.batch_norm_backward(dy_variant, x_variant, mean, invstd, weight,
                                                   axis=axis), expected):
            assert_close(got, want, dtype, scale=SUM_SCALE)
        for got, want in zip(F.batch_norm_backward_eval(dy_variant, x_variant, running_mean,
                                                        running_var, weight, axis=axis),
                             expected_eval):
            assert_close(got, want, dtype, scale=SUM_SCALE)
    for _, variant in array_variants(invstd.reshape(1, -1)):
        got = F.batch_norm_backward(dy, x, mean, variant.reshape(-1), weight, axis=axis)
        assert_close(got[0], expected[0], dtype, scale=SUM_SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_out_receives_dx_and_may_be_dy(simd_target, dtype, rng):
    dy, x, weight, mean, invstd, running_mean, running_var = make_backward_inputs(
        rng, (8, 40, 128), 1, dtype)
    expected = R.batch_norm_backward(dy, x, mean, invstd, weight)
    out = np.full_like(x, np.nan)
    dx, _, _ = F.batch_norm_backward(dy, x, mean, invstd, weight, out=out)
    assert dx is out
    assert_close(out, expected[0], dtype, scale=SUM_SCALE)
    in_place = dy.copy()
    dx, dweight, _ = F.batch_norm_backward(in_place, x, mean, invstd, weight, out=in_place)
    assert dx is in_place
    assert_close(in_place, expected[0], dtype, scale=SUM_SCALE)
    assert_close(dweight, expected[1], dtype, scale=SUM_SCALE)
    expected_eval = R.batch_norm_backward_eval(dy, x, running_mean, running_var, weight)
    in_place = dy.copy()
    dx, _, dbias = F.batch_norm_backward_eval(in_place, x, running_mean, running_var, weight,
                                              out=in_place)
    assert dx is in_place
    assert_close(in_place, expected_eval[0], dtype)
    assert_close(dbias, expected_eval[2], dtype, scale=SUM_SCALE)


def test_eval_backward_out_may_not_be_x(rng):
    dy, x, weight, _, _, running_mean, running_var = make_backward_inputs(
        rng, (4, 3, 5), 1, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        F.batch_norm_backward_eval(dy, x, running_mean, running_var, weight, out=x)


def test_backward_of_an_empty_batch_has_zero_parameter_gradients():
    x = np.zeros((0, 3, 4), np.float32)
    ones = np.ones(3, np.float32)
    dx, dweight, dbias = F.batch_norm_backward(x, x, ones, ones, ones)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 0)
    dx, dweight, dbias = F.batch_norm_backward_eval(x, x, ones, ones, ones)
    np.testing.assert_array_equal(dweight, 0)


# ---- finite differences (float64) -------------------------------------------

def _numeric_gradient(function, array, step=1e-6):
    gradient = np.zeros_like(array)
    flat, grad_flat = array.reshape(-1), gradient.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + step
        plus = function()
        flat[i] = saved - step
        minus = function()
        flat[i] = saved
        grad_flat[i] = (plus - minus) / (2 * step)
    return gradient


@pytest.mark.parametrize("shape,axis", [((3, 4, 5), 1), ((4, 3, 2, 3), -1), ((2, 3), 1)])
def test_backward_matches_finite_differences(simd_target, shape, axis):
    rng = np.random.default_rng(11)
    channels = shape[axis]
    x = rng.standard_normal(shape) * 2 + 0.5
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    probe = rng.standard_normal(shape)      # loss = sum(y * probe), so dy = probe

    def loss():
        return float((F.batch_norm_forward_train(x, weight, bias, axis=axis)[0] * probe).sum())

    _, mean, invstd = F.batch_norm_forward_train(x, weight, bias, axis=axis)
    dx, dweight, dbias = F.batch_norm_backward(probe, x, mean, invstd, weight, axis=axis)
    np.testing.assert_allclose(dx, _numeric_gradient(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dweight, _numeric_gradient(loss, weight), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbias, _numeric_gradient(loss, bias), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape,axis", [((3, 4, 5), 1), ((4, 3, 2, 3), -1)])
def test_eval_backward_matches_finite_differences(simd_target, shape, axis):
    rng = np.random.default_rng(12)
    channels = shape[axis]
    x = rng.standard_normal(shape)
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    running_mean, running_var = rng.standard_normal(channels), rng.random(channels) + 0.5
    probe = rng.standard_normal(shape)

    def loss():
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, axis=axis)
        return float((y * probe).sum())

    dx, dweight, dbias = F.batch_norm_backward_eval(probe, x, running_mean, running_var, weight,
                                                    axis=axis)
    np.testing.assert_allclose(dx, _numeric_gradient(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dweight, _numeric_gradient(loss, weight), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbias, _numeric_gradient(loss, bias), rtol=1e-5, atol=1e-7)


def test_large_mean_float32_backward_stays_accurate():
    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal((64, 3, 16, 16))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    weight = np.ones(3, np.float32)
    _, mean, invstd = F.batch_norm_forward_train(x, weight)
    dx, dweight, dbias = F.batch_norm_backward(dy, x, mean, invstd, weight)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean64, invstd64 = mean.astype(np.float64), invstd.astype(np.float64)
    expected = R.batch_norm_backward(dy64, x64, mean64, invstd64, weight.astype(np.float64))
    np.testing.assert_allclose(dweight, expected[1], rtol=1e-4)
    np.testing.assert_allclose(dbias, expected[2], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(dx, expected[0], rtol=1e-3, atol=1e-3)


# ---- determinism -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", DETERMINISM_CASES)
def test_backward_is_bitwise_identical_for_1_and_2_threads(simd_target, dtype, shape, axis, rng):
    dy, x, weight, mean, invstd, running_mean, running_var = make_backward_inputs(
        rng, shape, axis, dtype)

    def run():
        return (F.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
                + F.batch_norm_backward_eval(dy, x, running_mean, running_var, weight, axis=axis))

    for a, b in zip(_with_threads(1, run), _with_threads(2, run)):
        np.testing.assert_array_equal(a, b)


def test_determinism_tests_really_run_two_threads():
    # with one thread the comparisons above would prove nothing
    if not fastbn.config_info()["openmp"] or (os.cpu_count() or 1) < 2:
        pytest.skip("needs OpenMP and 2 cores")
    assert _with_threads(2, fastbn.get_num_threads) == 2
