"""Eval-mode batch norm (running statistics): fast kernels vs the NumPy
reference on every SIMD target, both layouts, both dtypes, odd sizes and
awkward memory layouts; `out=` semantics."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F
from fastbn.reference import batch_norm as reference_batch_norm

from conftest import array_variants, assert_close

DTYPES = [np.float32, np.float64]
# (shape, axis): odd channel counts, odd element counts, 1-4 spatial dims
CASES = [
    ((5, 1), 1), ((2, 7), 1), ((3, 4097), 1), ((1, 7, 1), 1),
    ((4, 7, 9), 1), ((2, 3, 7, 9), 1), ((2, 5, 3, 4, 5), 1),
    ((4, 7), -1), ((3, 9, 7), -1), ((2, 7, 9, 3), -1), ((2, 3, 4, 5, 7), -1),
    ((1, 1, 4097), 1), ((4097, 1), -1), ((2, 4099, 3), -1),
    ((16, 64, 40), 1), ((16, 40, 64), -1),   # above the serial threshold
    # one channel of short rows, above the serial threshold: walked as one
    # contiguous span, split mid-row between threads
    ((50001, 1, 3), 1),
]


def make_inputs(rng, shape, axis, dtype, affine=True):
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = (rng.random(channels) + 0.2).astype(dtype)
    weight = rng.standard_normal(channels).astype(dtype) if affine else None
    bias = rng.standard_normal(channels).astype(dtype) if affine else None
    return x, running_mean, running_var, weight, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward_matches_reference(simd_target, shape, axis, dtype, affine, rng):
    x, mean, var, weight, bias = make_inputs(rng, shape, axis, dtype, affine)
    snapshot = [a.copy() for a in (x, mean, var) + ((weight, bias) if affine else ())]
    y = F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-3, axis=axis)
    expected = reference_batch_norm(x, mean, var, weight, bias, training=False, eps=1e-3, axis=axis)
    assert y.shape == x.shape
    assert_close(y, expected, dtype)
    # inputs (including the running statistics) are untouched in eval mode
    for before, after in zip(snapshot, (x, mean, var) + ((weight, bias) if affine else ())):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_eval_forward_accepts_any_memory_layout(simd_target, dtype, axis, rng):
    x, mean, var, weight, bias = make_inputs(rng, (3, 5, 6, 7), axis, dtype)
    expected = reference_batch_norm(x, mean, var, weight, bias, axis=axis)
    for name, variant in array_variants(x):
        y = F.batch_norm(variant, mean, var, weight, bias, axis=axis)
        assert_close(y, expected, dtype)
    for name, variant in array_variants(weight.reshape(1, -1)):
        y = F.batch_norm(x, mean, var, variant.reshape(-1), bias, axis=axis)
        assert_close(y, expected, dtype)


def test_eval_forward_is_the_affine_map_of_the_folded_coefficients(rng):
    x, mean, var, weight, bias = make_inputs(rng, (6, 4, 5), 1, np.float64)
    alpha = weight / np.sqrt(var + 1e-5)
    beta = bias - mean * alpha
    expected = x * alpha[None, :, None] + beta[None, :, None]
    assert_close(F.batch_norm(x, mean, var, weight, bias), expected, np.float64, scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_receives_the_result(simd_target, dtype, rng):
    x, mean, var, weight, bias = make_inputs(rng, (4, 3, 10), 1, dtype)
    out = np.full_like(x, np.nan)
    result = F.batch_norm(x, mean, var, weight, bias, out=out)
    assert result is out
    assert_close(out, reference_batch_norm(x, mean, var, weight, bias), dtype)


def test_out_may_be_the_input_for_an_in_place_update(rng):
    x, mean, var, weight, bias = make_inputs(rng, (4, 3, 10), 1, np.float32)
    expected = reference_batch_norm(x, mean, var, weight, bias)
    result = F.batch_norm(x, mean, var, weight, bias, out=x)
    assert result is x
    assert_close(x, expected, np.float32)


@pytest.mark.parametrize("bad_out,error", [
    (np.zeros((4, 3, 9), np.float32), ValueError),        # shape
    (np.zeros((4, 3, 10), np.float64), TypeError),        # dtype
    (np.zeros((4, 10, 3), np.float32).transpose(0, 2, 1), ValueError),  # not C-contiguous
    ([0.0], TypeError),                                   # not an array
])
def test_out_is_validated(bad_out, error, rng):
    x, mean, var, weight, bias = make_inputs(rng, (4, 3, 10), 1, np.float32)
    with pytest.raises(error, match="out"):
        F.batch_norm(x, mean, var, weight, bias, out=bad_out)


def test_out_overlapping_the_input_is_rejected(rng):
    buffer = rng.standard_normal((5, 3, 10)).astype(np.float32)
    x = buffer[:4]
    out = buffer[1:]
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        F.batch_norm(x, mean, var, out=out)


def test_readonly_out_is_rejected(rng):
    x, mean, var, weight, bias = make_inputs(rng, (4, 3, 10), 1, np.float32)
    out = np.empty_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        F.batch_norm(x, mean, var, out=out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_eval_forward_is_bitwise_identical_for_1_and_2_threads(dtype, axis, rng):
    x, mean, var, weight, bias = make_inputs(rng, (8, 33, 17, 19), axis, dtype)
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            results.append(F.batch_norm(x, mean, var, weight, bias, axis=axis))
        finally:
            fastbn.set_num_threads(None)
    np.testing.assert_array_equal(results[0], results[1])


def test_empty_batch_in_eval_returns_an_empty_array():
    x = np.zeros((0, 3, 4), np.float32)
    y = F.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32))
    assert y.shape == (0, 3, 4)
