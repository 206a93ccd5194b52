"""Defects found reviewing the session-3 merge (functional fast path)."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("alias", ["running_var", "weight", "bias", "x_row"])
def test_training_running_mean_sharing_memory_with_another_argument_raises_and_writes_nothing(
        backend, alias):
    # The running statistics are written in place; one that shares memory
    # with running_var, weight, bias or x would be read after (or while)
    # being written, with a result that depends on the backend.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    running_var = np.ones(3, np.float32)
    weight = np.full(3, 2.0, np.float32)
    bias = np.full(3, 0.5, np.float32)
    shared = {"running_var": running_var, "weight": weight, "bias": bias, "x_row": x[0]}[alias]
    before = [a.copy() for a in (x, running_var, weight, bias)]
    with fastbn.use_backend(backend):
        with pytest.raises(ValueError, match="running_mean"):
            F.batch_norm(x, shared, running_var, weight, bias, training=True)
        with pytest.raises(ValueError, match="running_mean"):
            F.batch_norm_forward_train(x, weight, bias, running_mean=shared,
                                       running_var=running_var, momentum=0.1)
    for array, old in zip((x, running_var, weight, bias), before):
        np.testing.assert_array_equal(array, old)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_training_running_var_sharing_memory_with_x_raises(backend):
    x = np.random.default_rng(1).standard_normal((8, 3))
    running_mean = np.zeros(3)
    with fastbn.use_backend(backend):
        with pytest.raises(ValueError, match="running_var"):
            F.batch_norm(x, running_mean, x[1], training=True)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_eval_running_statistics_may_share_memory_as_nothing_is_written(backend):
    x = np.random.default_rng(2).standard_normal((8, 3))
    stats = np.full(3, 0.25)
    with fastbn.use_backend(backend):
        y = F.batch_norm(x, stats, stats, training=False)
    np.testing.assert_allclose(y, (x - 0.25) / np.sqrt(0.25 + 1e-5))
