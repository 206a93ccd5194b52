"""BatchNorm layers follow the backend switch: under
use_backend("reference") they run the NumPy reference (not the kernels) and
give the same results, running statistics and accumulated gradients."""
import numpy as np
import pytest

import fastbn
from fastbn import nn
from fastbn import reference as R

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
