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


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_layer_with_running_var_assigned_the_running_mean_array_raises_and_changes_nothing(
        backend):
    x = np.random.default_rng(3).standard_normal((8, 3)).astype(np.float32)
    layer = fastbn.nn.BatchNorm1d(3)
    layer.running_var = layer.running_mean
    shared = layer.running_mean.copy()
    counter = int(layer.num_batches_tracked)
    with fastbn.use_backend(backend):
        with pytest.raises(ValueError, match="running_mean: .*running_var"):
            layer(x)
    np.testing.assert_array_equal(layer.running_mean, shared)
    assert int(layer.num_batches_tracked) == counter


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_interleaved_running_statistics_that_share_no_element_are_updated(backend):
    # their byte ranges meet but no element is shared: valid, and the
    # kernels must not refuse what the validators accept
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3))
    buffer = np.empty(6)
    expected_mean = 0.9 * 0.0 + 0.1 * x.mean(axis=0)
    expected_var = 0.9 * 1.0 + 0.1 * x.var(axis=0, ddof=1)
    with fastbn.use_backend(backend):
        buffer[0::2], buffer[1::2] = 0.0, 1.0
        F.batch_norm(x, buffer[0::2], buffer[1::2], training=True)
        np.testing.assert_allclose(buffer[0::2], expected_mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(buffer[1::2], expected_var, rtol=1e-12)
        layer = fastbn.nn.BatchNorm1d(3)
        buffer32 = np.empty(6, np.float32)
        buffer32[0::2], buffer32[1::2] = 0.0, 1.0
        layer.running_mean, layer.running_var = buffer32[0::2], buffer32[1::2]
        layer(x.astype(np.float32))
        np.testing.assert_allclose(buffer32[0::2], expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(buffer32[1::2], expected_var, rtol=1e-5)
