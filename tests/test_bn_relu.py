"""Fused batch norm + ReLU: the kernels against the reference (batch norm,
then ReLU) on every SIMD target, both layouts, both dtypes; bit-identical
results for 1 and 2 threads; the backward's ReLU mask is the forward's; the
BatchNormReLU layers against BatchNorm followed by ReLU."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn import nn
from fastbn import reference as R

from conftest import assert_close

DTYPES = [np.float32, np.float64]
# planar (inner > 1) and interleaved (channels-last or (N, C)) geometries,
# small (serial) and above the serial threshold (threaded, several chunks)
CASES = [
    ((6, 5), 1), ((7, 3, 9), 1), ((2, 5, 3, 4), 1), ((3, 4099), 1), ((16, 64, 40), 1),
    ((3, 2, 150, 150), 1), ((2, 3, 4, 5, 6), 1),
    ((6, 5), -1), ((3, 9, 7), -1), ((2, 7, 9, 3), -1), ((16, 40, 64), -1), ((4, 60, 60, 24), -1),
]


def make_inputs(rng, shape, axis, dtype, affine=True):
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    weight = rng.normal(1.0, 0.5, channels).astype(dtype) if affine else None
    bias = rng.normal(0.0, 0.5, channels).astype(dtype) if affine else None
    running_mean = rng.normal(0.5, 0.5, channels).astype(dtype)
    running_var = rng.uniform(2.0, 6.0, channels).astype(dtype)
    return x, weight, bias, running_mean, running_var


def backward_reference_with_forward_mask(dy, x, y, mean, invstd, weight, axis):
    """BN backward of dy masked by the FUSED forward's own output."""
    return R.batch_norm_backward(np.where(y > 0, dy, 0).astype(dy.dtype), x, mean, invstd,
                                 weight, axis=axis)


# ---- kernels vs reference ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_fused_training_forward_and_backward_match_batch_norm_then_relu(simd_target, shape, axis,
                                                                        dtype, affine, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype, affine)
    dy = rng.standard_normal(shape).astype(dtype)
    x_before, dy_before = x.copy(), dy.copy()
    fast_stats = (running_mean.copy(), running_var.copy())
    reference_stats = (running_mean.copy(), running_var.copy())
    y, mean, invstd = F.batch_norm_relu_forward_train(
        x, weight, bias, 1e-3, axis=axis, running_mean=fast_stats[0], running_var=fast_stats[1],
        momentum=0.3)
    y_ref, mean_ref, invstd_ref = R.batch_norm_relu_forward_train(
        x, weight, bias, 1e-3, axis=axis, running_mean=reference_stats[0],
        running_var=reference_stats[1], momentum=0.3)
    assert_close(y, y_ref, dtype, scale=4)
    assert np.all(y >= 0)
    assert_close(mean, mean_ref, dtype)
    assert_close(invstd, invstd_ref, dtype)
    for fast, expected in zip(fast_stats, reference_stats):
        assert_close(fast, expected, dtype)

    dx, dweight, dbias = F.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=axis)
    dx_ref, dweight_ref, dbias_ref = R.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias,
                                                                axis=axis)
    assert_close(dx, dx_ref, dtype, scale=10)
    assert_close(dweight, dweight_ref, dtype, scale=10)
    assert_close(dbias, dbias_ref, dtype, scale=10)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dy, dy_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_fused_eval_forward_and_backward_match_batch_norm_then_relu(simd_target, shape, axis,
                                                                    dtype, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    stats_before = running_mean.copy(), running_var.copy()
    y = F.batch_norm_relu(x, running_mean, running_var, weight, bias, axis=axis)
    y_ref = R.batch_norm_relu(x, running_mean, running_var, weight, bias, axis=axis)
    assert_close(y, y_ref, dtype, scale=4)
    np.testing.assert_array_equal(running_mean, stats_before[0])
    np.testing.assert_array_equal(running_var, stats_before[1])
    dx, dweight, dbias = F.batch_norm_relu_backward_eval(dy, x, running_mean, running_var,
                                                         weight, bias, 1e-5, axis=axis)
    expected = R.batch_norm_relu_backward_eval(dy, x, running_mean, running_var, weight, bias,
                                               1e-5, axis=axis)
    for actual, wanted in zip((dx, dweight, dbias), expected):
        assert_close(actual, wanted, dtype, scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 7, 9), 1), ((5, 6), -1), ((2, 3, 50, 50), 1)])
def test_fused_training_functional_updates_running_stats_like_reference(shape, axis, dtype, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype)
    fast_mean, fast_var = running_mean.copy(), running_var.copy()
    y = F.batch_norm_relu(x, fast_mean, fast_var, weight, bias, training=True, momentum=0.2,
                          axis=axis)
    y_ref = R.batch_norm_relu(x, running_mean, running_var, weight, bias, training=True,
                              momentum=0.2, axis=axis)
    assert_close(y, y_ref, dtype, scale=4)
    assert_close(fast_mean, running_mean, dtype)
    assert_close(fast_var, running_var, dtype)


# ---- the mask ---------------------------------------------------------------------

def biases_that_zero_a_grid_value(x, weight, mean, invstd, axis):
    """Per channel, the bias that puts the pre-activation of one of the
    channel's (repeated) grid values at 0 up to rounding: many elements then
    sit within an ulp of the ReLU's kink, on either side."""
    channels_last = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    value = np.median(channels_last, axis=0)
    exact = -((value.astype(np.float64) - mean) * invstd * weight)
    return exact.astype(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((64, 32, 24), 1), ((256, 40), -1), ((8, 30, 30, 16), -1)])
def test_backward_mask_is_exactly_the_forwards_output_sign(simd_target, shape, axis, dtype, rng):
    """The backward recomputes the mask; it must agree with the forward's
    output even for pre-activations within rounding of 0."""
    x, weight, _bias, _rm, _rv = make_inputs(rng, shape, axis, dtype)
    x = (np.round(x * 4) / 4).astype(dtype)     # values on a coarse grid, repeated
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, invstd = F.batch_norm_forward_train(x, weight, None, 1e-5, axis=axis)
    bias = biases_that_zero_a_grid_value(x, weight, mean, invstd, axis)
    y, mean, invstd = F.batch_norm_relu_forward_train(x, weight, bias, 1e-5, axis=axis)
    dx, dweight, dbias = F.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=axis)
    dx_ref, dweight_ref, dbias_ref = backward_reference_with_forward_mask(dy, x, y, mean, invstd,
                                                                          weight, axis)
    assert_close(dx, dx_ref, dtype, scale=10)
    assert_close(dweight, dweight_ref, dtype, scale=10)
    assert_close(dbias, dbias_ref, dtype, scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_eval_backward_mask_is_exactly_the_eval_forwards_output_sign(simd_target, axis, dtype, rng):
    shape = (32, 24, 40) if axis == 1 else (32, 40, 24)
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype)
    x = (np.round(x * 4) / 4).astype(dtype)
    running_mean = np.round(running_mean * 4) / 4
    bias = np.zeros_like(bias)
    dy = rng.standard_normal(shape).astype(dtype)
    y = F.batch_norm_relu(x, running_mean, running_var, weight, bias, axis=axis)
    dx, dweight, dbias = F.batch_norm_relu_backward_eval(dy, x, running_mean, running_var,
                                                         weight, bias, 1e-5, axis=axis)
    masked = np.where(y > 0, dy, 0).astype(dtype)
    expected = R.batch_norm_backward_eval(masked, x, running_mean, running_var, weight, 1e-5,
                                          axis=axis)
    for actual, wanted in zip((dx, dweight, dbias), expected):
        assert_close(actual, wanted, dtype, scale=10)


def test_relu_keeps_nan_and_blocks_its_gradient():
    x = np.array([[1.0, np.nan], [-1.0, 2.0], [0.5, 3.0]])
    running_mean, running_var = np.zeros(2), np.ones(2)
    y = F.batch_norm_relu(x, running_mean, running_var, eps=0.0)
    np.testing.assert_array_equal(y, [[1.0, np.nan], [0.0, 2.0], [0.5, 3.0]])
    dx, _dweight, _dbias = F.batch_norm_relu_backward_eval(np.ones_like(x), x, running_mean,
                                                           running_var, eps=0.0)
    np.testing.assert_array_equal(dx, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


# ---- threads, in place ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((8, 64, 40, 20), 1), ((8, 40, 20, 64), -1),
                                        ((2, 3, 150, 150), 1), ((4096, 24), -1)])
def test_fused_kernels_give_bit_identical_results_for_1_and_2_threads(simd_target, shape, axis,
                                                                      dtype, rng):
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            stats = running_mean.copy(), running_var.copy()
            y, mean, invstd = F.batch_norm_relu_forward_train(
                x, weight, bias, 1e-5, axis=axis, running_mean=stats[0], running_var=stats[1])
            backward = F.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=axis)
            y_eval = F.batch_norm_relu(x, running_mean, running_var, weight, bias, axis=axis)
            backward_eval = F.batch_norm_relu_backward_eval(dy, x, running_mean, running_var,
                                                            weight, bias, axis=axis)
        finally:
            fastbn.set_num_threads(None)
        results.append((y, mean, invstd, *stats, *backward, y_eval, *backward_eval))
    for single, double in zip(*results):
        np.testing.assert_array_equal(single, double)


@pytest.mark.parametrize("axis", [1, -1])
def test_fused_kernels_work_in_place(axis, rng):
    shape = (6, 5, 7) if axis == 1 else (6, 7, 5)
    x, weight, bias, running_mean, running_var = make_inputs(rng, shape, axis, np.float64)
    dy = rng.standard_normal(shape)
    y, mean, invstd = F.batch_norm_relu_forward_train(x, weight, bias, axis=axis)
    dx_expected = F.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias, axis=axis)[0]
    in_place = x.copy()
    F.batch_norm_relu_forward_train(in_place, weight, bias, axis=axis, out=in_place)
    np.testing.assert_array_equal(in_place, y)
    grad = dy.copy()
    F.batch_norm_relu_backward(grad, x, mean, invstd, weight, bias, axis=axis, out=grad)
    np.testing.assert_array_equal(grad, dx_expected)


def test_fused_functions_validate_like_batch_norm():
    x = np.zeros((4, 3), dtype=np.float32)
    vector = np.zeros(3, dtype=np.float32)
    for backend in ("fast", "reference"):
        with fastbn.use_backend(backend):
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                F.batch_norm_relu_forward_train(np.zeros((1, 3), np.float32))
            with pytest.raises(TypeError, match="bias"):
                F.batch_norm_relu_backward(x, x, vector, vector + 1, vector, np.zeros(3))
            with pytest.raises(ValueError, match="bias"):
                F.batch_norm_relu_backward(x, x, vector, vector + 1, vector,
                                           np.zeros(4, np.float32))
            with pytest.raises(ValueError, match="dy"):
                F.batch_norm_relu_backward(np.zeros((4, 2), np.float32), x, vector, vector + 1)


# ---- layers ----------------------------------------------------------------------------

@pytest.mark.parametrize("fused_cls, plain_cls, shape, axis", [
    (nn.BatchNormReLU1d, nn.BatchNorm1d, (16, 12), 1),
    (nn.BatchNormReLU1d, nn.BatchNorm1d, (8, 12, 10), 1),
    (nn.BatchNormReLU2d, nn.BatchNorm2d, (4, 12, 6, 5), 1),
    (nn.BatchNormReLU2d, nn.BatchNorm2d, (4, 6, 5, 12), -1),
    (nn.BatchNormReLU3d, nn.BatchNorm3d, (2, 12, 3, 4, 5), 1),
])
def test_batchnorm_relu_layer_equals_batchnorm_then_relu(fused_cls, plain_cls, shape, axis, rng):
    fused = fused_cls(12, momentum=0.2, axis=axis, dtype=np.float64)
    plain = nn.Sequential(plain_cls(12, momentum=0.2, axis=axis, dtype=np.float64), nn.ReLU())
    for layer in (fused, plain[0]):
        layer.weight.data[...] = np.linspace(0.5, 1.5, 12)
        layer.bias.data[...] = np.linspace(-0.5, 0.5, 12)
    for mode in ("train", "eval"):
        getattr(fused, mode)()
        getattr(plain, mode)()
        x = rng.standard_normal(shape)
        dy = rng.standard_normal(shape)
        fused.zero_grad()
        plain.zero_grad()
        np.testing.assert_allclose(fused(x), plain(x), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(fused.backward(dy), plain.backward(dy), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fused.weight.grad, plain[0].weight.grad, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fused.bias.grad, plain[0].bias.grad, rtol=1e-10, atol=1e-12)
        for key, value in plain[0].state_dict().items():
            np.testing.assert_allclose(fused.state_dict()[key], value, rtol=1e-12, err_msg=key)


def test_batchnorm_relu_layer_has_batchnorm_state_and_folds_to_linear_then_relu(rng):
    model = nn.Sequential(nn.Linear(5, 6, rng=0, dtype=np.float64),
                          nn.BatchNormReLU1d(6, dtype=np.float64), nn.Linear(6, 2, rng=1, dtype=np.float64))
    assert list(model[1].state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                           "num_batches_tracked"]
    model.train()
    for _ in range(3):
        model(rng.standard_normal((16, 5)))
    model.eval()
    folded = nn.fold_batchnorm(model)
    assert [type(m).__name__ for m in folded] == ["Linear", "ReLU", "Linear"]
    x = rng.standard_normal((7, 5))
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)
