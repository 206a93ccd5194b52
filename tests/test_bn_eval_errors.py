"""Bad input to eval-mode batch norm raises the same clear error on both
backends."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F

BACKENDS = ["fast", "reference"]


def good_args(channels=3, dtype=np.float32):
    x = np.ones((2, channels, 4), dtype)
    return x, np.zeros(channels, dtype), np.ones(channels, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,error,pattern", [
    (lambda x, m, v: F.batch_norm(x.astype(np.int32), m, v), TypeError, "input: expected dtype float32 or float64, got int32"),
    (lambda x, m, v: F.batch_norm(x.astype(np.complex64), m, v), TypeError, "input"),
    (lambda x, m, v: F.batch_norm("x", m, v), TypeError, "input"),
    (lambda x, m, v: F.batch_norm(x[0, 0], m, v), ValueError, "at least 2 dimensions"),
    (lambda x, m, v: F.batch_norm(x, m[:2], v), ValueError, "running_mean: expected a 1-D array with 3 elements"),
    (lambda x, m, v: F.batch_norm(x, m, v.astype(np.float64)), TypeError, "running_var: expected dtype float32"),
    (lambda x, m, v: F.batch_norm(x, m, v, weight=np.ones(4, np.float32)), ValueError, "weight"),
    (lambda x, m, v: F.batch_norm(x, m, v, bias=np.ones((3, 1), np.float32)), ValueError, "bias"),
    (lambda x, m, v: F.batch_norm(x, m, v, eps=-1.0), ValueError, "eps"),
    (lambda x, m, v: F.batch_norm(x, m, v, eps="1"), TypeError, "eps"),
    (lambda x, m, v: F.batch_norm(x, m, v, momentum=1.5), ValueError, "momentum"),
    (lambda x, m, v: F.batch_norm(x, m, v, axis=0), ValueError, "axis"),
    (lambda x, m, v: F.batch_norm(x, m, v, axis=1.0), TypeError, "axis"),
])
def test_bad_input_raises_a_clear_error_on_both_backends(backend, call, error, pattern):
    x, mean, var = good_args()
    with fastbn.use_backend(backend):
        with pytest.raises(error, match=pattern):
            call(x, mean, var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_mode_uses_batch_statistics_on_both_backends(backend):
    x, mean, var = good_args()
    x = x * np.arange(1, 9, dtype=np.float32).reshape(2, 1, 4)
    with fastbn.use_backend(backend):
        y = F.batch_norm(x, mean, var, training=True)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(mean, 0.1 * 4.5, rtol=1e-6)  # updated in place
