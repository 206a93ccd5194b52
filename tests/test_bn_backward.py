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


# ---- dweight_out / dbias_out ---------------------------------------------------

_BACKWARDS = {
    "train": (lambda M, dy, x, mean, invstd, rm, rv, w, b, **kw:
              M.batch_norm_backward(dy, x, mean, invstd, w, **kw)),
    "eval": (lambda M, dy, x, mean, invstd, rm, rv, w, b, **kw:
             M.batch_norm_backward_eval(dy, x, rm, rv, w, 1e-3, **kw)),
    "relu_train": (lambda M, dy, x, mean, invstd, rm, rv, w, b, **kw:
                   M.batch_norm_relu_backward(dy, x, mean, invstd, w, b, **kw)),
    "relu_eval": (lambda M, dy, x, mean, invstd, rm, rv, w, b, **kw:
                  M.batch_norm_relu_backward_eval(dy, x, rm, rv, w, b, 1e-3, **kw)),
}


def _gradient_problem(rng, shape, axis, dtype):
    dy, x, weight, mean, invstd, running_mean, running_var = make_backward_inputs(
        rng, shape, axis, dtype)
    bias = rng.standard_normal(shape[axis]).astype(dtype)
    return dy, x, mean, invstd, running_mean, running_var, weight, bias


@pytest.mark.parametrize("kind", sorted(_BACKWARDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 6, 5, 3), 1), ((4, 5, 3, 6), -1), ((16, 6), 1)])
def test_gradient_buffers_receive_the_reference_gradients(simd_target, kind, dtype, shape,
                                                          axis, rng):
    problem = _gradient_problem(rng, shape, axis, dtype)
    backward = _BACKWARDS[kind]
    inputs_before = [a.copy() for a in problem]
    dx_ref, dweight_ref, dbias_ref = backward(R, *problem, axis=axis)
    channels = shape[axis]
    for module in (F, R):
        dweight_out = np.full(channels, np.nan, dtype)
        dbias_out = np.full(channels, np.nan, dtype)
        dx, dweight, dbias = backward(module, *problem, axis=axis, dweight_out=dweight_out,
                                      dbias_out=dbias_out)
        assert dweight is dweight_out and dbias is dbias_out
        assert_close(dx, dx_ref, dtype, scale=SUM_SCALE)
        assert_close(dweight_out, dweight_ref, dtype, scale=SUM_SCALE)
        assert_close(dbias_out, dbias_ref, dtype, scale=SUM_SCALE)
        # only one buffer: the other gradient is a new array
        dbias_only = np.full(channels, np.nan, dtype)
        _, dweight_new, dbias = backward(module, *problem, axis=axis, dbias_out=dbias_only)
        assert dbias is dbias_only
        assert_close(dweight_new, dweight_ref, dtype, scale=SUM_SCALE)
        assert_close(dbias_only, dbias_ref, dtype, scale=SUM_SCALE)
    for before, after in zip(inputs_before, problem):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("kind", sorted(_BACKWARDS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_adds_the_gradients_to_the_buffers(simd_target, kind, dtype, rng):
    shape, axis = (4, 6, 5, 3), 1
    problem = _gradient_problem(rng, shape, axis, dtype)
    backward = _BACKWARDS[kind]
    dx_ref, dweight_ref, dbias_ref = backward(R, *problem, axis=axis)
    for module in (F, R):
        start_weight = rng.standard_normal(6).astype(dtype)
        start_bias = rng.standard_normal(6).astype(dtype)
        dweight_out, dbias_out = start_weight.copy(), start_bias.copy()
        dx, dweight, dbias = backward(module, *problem, axis=axis, dweight_out=dweight_out,
                                      dbias_out=dbias_out, accumulate=True)
        assert dweight is dweight_out and dbias is dbias_out
        assert_close(dx, dx_ref, dtype, scale=SUM_SCALE)
        assert_close(dweight_out, start_weight + dweight_ref, dtype, scale=SUM_SCALE)
        assert_close(dbias_out, start_bias + dbias_ref, dtype, scale=SUM_SCALE)
        # a gradient without a buffer is the plain gradient, not added to anything
        dweight_out = start_weight.copy()
        _, _, dbias_new = backward(module, *problem, axis=axis, dweight_out=dweight_out,
                                   accumulate=True)
        assert_close(dweight_out, start_weight + dweight_ref, dtype, scale=SUM_SCALE)
        assert_close(dbias_new, dbias_ref, dtype, scale=SUM_SCALE)


def test_accumulate_into_buffers_of_an_empty_batch_leaves_them_unchanged():
    x = np.zeros((0, 3, 4), np.float32)
    ones = np.ones(3, np.float32)
    dweight_out, dbias_out = np.full(3, 2.0, np.float32), np.full(3, 5.0, np.float32)
    F.batch_norm_backward(x, x, ones, ones, ones, dweight_out=dweight_out, dbias_out=dbias_out,
                          accumulate=True)
    np.testing.assert_array_equal(dweight_out, 2.0)
    np.testing.assert_array_equal(dbias_out, 5.0)
    F.batch_norm_backward_eval(x, x, ones, ones, ones, dweight_out=dweight_out)
    np.testing.assert_array_equal(dweight_out, 0.0)


def _bad_gradient_buffers(problem, dtype, kind):
    """(argument name, the bad buffer, exception type, message part); the
    overlaps are with arrays that `kind` reads."""
    dy, x, mean, invstd, running_mean, running_var, weight, bias = problem
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    channels = weight.shape[0]
    padded = np.zeros(2 * channels, dtype)
    yield "dweight_out", np.zeros(channels, other), TypeError, "dtype"
    yield "dweight_out", np.zeros(channels + 1, dtype), ValueError, "shape"
    yield "dweight_out", np.zeros((channels, 1), dtype), ValueError, "shape"
    yield "dweight_out", padded[::2], ValueError, "C-contiguous"
    read_only = np.zeros(channels, dtype)
    read_only.flags.writeable = False
    yield "dweight_out", read_only, ValueError, "writeable"
    yield "dweight_out", [0.0] * channels, TypeError, "ndarray"
    yield "dweight_out", weight, ValueError, "overlap"
    yield "dweight_out", running_var if kind.endswith("eval") else mean, ValueError, "overlap"
    yield "dbias_out", running_mean if kind.endswith("eval") else invstd, ValueError, "overlap"
    yield "dbias_out", dy.reshape(-1)[:channels], ValueError, "overlap"
    yield "dbias_out", x.reshape(-1)[:channels], ValueError, "overlap"
    if kind.startswith("relu"):
        yield "dbias_out", bias, ValueError, "overlap"
    yield "dbias_out", np.zeros(channels, other), TypeError, "dtype"


@pytest.mark.parametrize("kind", sorted(_BACKWARDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_bad_gradient_buffer_raises_naming_it_and_writes_nothing(kind, dtype, accumulate, rng):
    problem = _gradient_problem(rng, (4, 6, 5), 1, dtype)
    backward = _BACKWARDS[kind]
    for name, bad, error, message in _bad_gradient_buffers(problem, dtype, kind):
        good_name = "dbias_out" if name == "dweight_out" else "dweight_out"
        good = np.full(6, 7.0, dtype)
        dx_out = np.full(problem[1].shape, 3.0, dtype)
        snapshot = [a.copy() for a in problem] + [good.copy(), dx_out.copy()]
        bad_before = np.array(bad, copy=True)
        for module in (F, R):
            with pytest.raises(error, match=f"{name}.*{message}"):
                backward(module, *problem, axis=1, out=dx_out, accumulate=accumulate,
                         **{name: bad, good_name: good})
            for before, after in zip(snapshot, list(problem) + [good, dx_out]):
                np.testing.assert_array_equal(before, after)
            np.testing.assert_array_equal(np.asarray(bad), bad_before)


def test_gradient_buffers_of_a_bfloat16_backward_are_float32(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = rng.standard_normal((4, 6, 5)).astype(bf16)
    dy = rng.standard_normal((4, 6, 5)).astype(bf16)
    weight = rng.standard_normal(6).astype(np.float32)
    _, mean, invstd = R.batch_norm_forward_train(x, weight)
    dx_ref, dweight_ref, dbias_ref = R.batch_norm_backward(dy, x, mean, invstd, weight)
    for module in (F, R):
        dweight_out, dbias_out = np.ones(6, np.float32), np.ones(6, np.float32)
        dx, _, _ = module.batch_norm_backward(dy, x, mean, invstd, weight,
                                              dweight_out=dweight_out, dbias_out=dbias_out,
                                              accumulate=True)
        np.testing.assert_allclose(dx.astype(np.float32), dx_ref.astype(np.float32),
                                   rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(dweight_out, 1 + dweight_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dbias_out, 1 + dbias_ref, rtol=1e-4, atol=1e-4)
        with pytest.raises(TypeError, match="dweight_out.*float32"):
            module.batch_norm_backward(dy, x, mean, invstd, weight,
                                       dweight_out=np.zeros(6, bf16))


def test_gradient_buffers_may_not_share_memory_with_each_other_or_out(rng):
    problem = _gradient_problem(rng, (4, 6, 5), 1, np.float32)
    dy, x, mean, invstd = problem[:4]
    weight = problem[6]
    shared = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="dbias_out.*overlap"):
        F.batch_norm_backward(dy, x, mean, invstd, weight, dweight_out=shared, dbias_out=shared)
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match="dweight_out.*overlap"):
        F.batch_norm_backward(dy, x, mean, invstd, weight, out=out,
                              dweight_out=out.reshape(-1)[:6])
    np.testing.assert_array_equal(out, 0)


def test_accumulate_without_a_buffer_or_not_a_bool_is_refused(rng):
    problem = _gradient_problem(rng, (4, 6, 5), 1, np.float32)
    dy, x, mean, invstd = problem[:4]
    with pytest.raises(ValueError, match="accumulate.*dweight_out or dbias_out"):
        F.batch_norm_backward(dy, x, mean, invstd, accumulate=True)
    with pytest.raises(TypeError, match="accumulate.*bool"):
        F.batch_norm_backward(dy, x, mean, invstd, dweight_out=np.zeros(6, np.float32),
                              accumulate=1)


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
