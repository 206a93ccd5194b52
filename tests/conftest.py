"""Shared fixtures: every SIMD target this machine can run, thread counts,
and array variants (strided, negative-stride, read-only) for fast-vs-reference
comparisons."""
import numpy as np
import pytest

import fastbn

TOLERANCE = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
             np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12)}


def assert_close(actual, expected, dtype=None, scale=1.0):
    """Compare fast output to the reference with the per-dtype tolerance."""
    dtype = np.dtype(dtype or np.asarray(expected).dtype)
    tol = TOLERANCE[dtype]
    assert np.asarray(actual).dtype == dtype, f"dtype {np.asarray(actual).dtype} != {dtype}"
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


@pytest.fixture(params=fastbn.available_simd_targets())
def simd_target(request):
    """Run the test once per SIMD target this CPU supports."""
    previous = fastbn.get_simd_target()
    fastbn.set_simd_target(request.param)
    try:
        yield request.param
    finally:
        fastbn.set_simd_target(previous)


@pytest.fixture(params=[1, 2])
def num_threads(request):
    fastbn.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        fastbn.set_num_threads(None)


@pytest.fixture
def restore_config():
    """Yields the thread count at the start; restores it and the SIMD target.
    (Restored explicitly: set_num_threads(None) does not undo an earlier
    set_num_threads(1) in the OpenMP runtime.)"""
    target, threads = fastbn.get_simd_target(), fastbn.get_num_threads()
    yield threads
    fastbn.set_simd_target(target)
    fastbn.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def array_variants(array):
    """The same values in memory layouts a user may pass (name, array)."""
    yield "contiguous", array
    padded = np.zeros(array.shape[:-1] + (array.shape[-1] * 2,), dtype=array.dtype)
    padded[..., ::2] = array
    yield "strided", padded[..., ::2]
    flipped = np.ascontiguousarray(array[::-1])
    yield "negative_stride", flipped[::-1]
    readonly = array.copy()
    readonly.flags.writeable = False
    yield "readonly", readonly
    yield "fortran", np.asfortranarray(array)
