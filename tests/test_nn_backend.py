"""BatchNorm layers follow the backend switch: under
use_backend("reference") they run the NumPy reference (not the kernels) and
give the same results, running statistics and accumulated gradients."""
import numpy as np
import pytest

import fastbn
from fastbn import nn

from conftest import assert_close

LAYERS = [(nn.BatchNorm1d, (6, 5, 7)), (nn.BatchNorm2d, (4, 5, 3, 6)),
          (nn.BatchNormReLU2d, (4, 5, 3, 6)), (nn.BatchNorm3d, (2, 5, 2, 3, 4))]


@pytest.mark.parametrize("cls,shape", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_on_the_reference_backend_matches_the_fast_layer(cls, shape, dtype, axis, momentum, rng):
    if axis == -1:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    fast = cls(5, momentum=momentum, axis=axis, dtype=dtype)
    slow = cls(5, momentum=momentum, axis=axis, dtype=dtype)
    for layer in (fast, slow):
        layer.weight.data[:] = np.linspace(0.5, 1.5, 5)
        layer.bias.data[:] = np.linspace(-1, 1, 5)
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        for layer in (fast, slow):
            layer.train(step < 2)
        y_fast, dx_fast = fast(x), fast.backward(dy)
        with fastbn.use_backend("reference"):
            y_slow, dx_slow = slow(x), slow.backward(dy)
        assert_close(y_slow, y_fast, dtype, scale=10)
        assert_close(dx_slow, dx_fast, dtype, scale=100)
        for name in ("running_mean", "running_var"):
            assert_close(getattr(slow, name), getattr(fast, name), dtype, scale=10)
        assert int(slow.num_batches_tracked) == int(fast.num_batches_tracked)
        assert_close(slow.weight.grad, fast.weight.grad, dtype, scale=1000)
        assert_close(slow.bias.grad, fast.bias.grad, dtype, scale=1000)


def test_layer_under_the_reference_backend_calls_the_reference_kernels(monkeypatch, rng):
    from fastbn.reference import _kernels
    calls = []
    original = _kernels.REFERENCE.train_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_kernels.REFERENCE, "train_forward", spy)
    layer = nn.BatchNorm1d(3)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    layer(x)
    assert calls == []
    with fastbn.use_backend("reference"):
        layer(x)
    assert calls == [1]


class _CountingKernels:
    """Stands in for the active kernels object, recording each method called."""

    def __init__(self, kernels, calls):
        self._kernels, self._calls = kernels, calls

    def __getattr__(self, name):
        method = getattr(self._kernels, name)

        def counted(*args, **kwargs):
            self._calls.append(name)
            return method(*args, **kwargs)
        return counted


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("cls,shape", LAYERS)
def test_warm_layer_forward_and_backward_make_one_kernel_call_each(backend, cls, shape, rng):
    layer = cls(5)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    calls = []
    for training in (True, False):
        layer.train(training)
        with fastbn.use_backend(backend):
            layer(x), layer.backward(dy)    # warm: layout cached, grads exist
            token = fastbn._backend._current.set(
                _CountingKernels(fastbn._backend.current_kernels(), calls))
            try:
                layer(x)
                forward_calls, calls[:] = list(calls), []
                layer.backward(dy)
                backward_calls, calls[:] = list(calls), []
            finally:
                fastbn._backend._current.reset(token)
        assert forward_calls == ["train_forward" if training else "eval_forward"]
        assert backward_calls == ["backward" if training else "backward_eval"]
