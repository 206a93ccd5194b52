"""The bridge's per-dtype kernel table: a dtype without a kernel is a
TypeError naming the dtype, raised before any buffer is touched (the phase
functions have no kernel-ready check of their own, so the table lookup is
what stands between a float16 array and a kernel reading it as float64)."""
import numpy as np
import pytest

from fastbn import _bn


def test_stats_of_float16_input_raises_type_error_naming_the_dtype():
    x = np.ones((4, 3), np.float16)
    with pytest.raises(TypeError, match="float32 or float64, got float16"):
        _bn.stats(x, 4, 3, 1)


def test_apply_of_int_input_raises_type_error_and_leaves_out_untouched():
    x = np.ones((4, 3), np.int32)
    out = np.full((4, 3), 7, np.int32)
    vector = np.zeros(3)
    with pytest.raises(TypeError, match="float32 or float64, got int32"):
        _bn.apply(x, out, 4, 3, 1, vector, vector, None, None)
    np.testing.assert_array_equal(out, 7)


def test_backward_reduce_of_float16_input_raises_type_error():
    dy = np.ones((4, 3), np.float16)
    vector = np.zeros(3)
    with pytest.raises(TypeError, match="batch_norm_backward_reduce"):
        _bn.backward_reduce(dy, dy, 4, 3, 1, vector, vector)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stats_runs_the_kernel_of_the_input_dtype(dtype):
    # a dtype picked from the wrong slot would read the buffer as the other
    # width and give a different mean
    x = np.arange(12, dtype=dtype).reshape(4, 3)
    mean, m2 = _bn.stats(x, 4, 3, 1)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(m2, ((x - x.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-12)
