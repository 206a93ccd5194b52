"""BatchNorm1d/2d/3d layers: construction, torch's rank and batch-size rules,
training/eval semantics, running statistics, num_batches_tracked and
accumulated gradients, compared step by step against a twin built on the
NumPy reference functions."""
import numpy as np
import pytest

import fastbn
from fastbn import reference as R
from fastbn.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

from conftest import array_variants, assert_close

DTYPES = [np.float32, np.float64]
SUM_SCALE = 20


class ReferenceBatchNorm:
    """What a BatchNorm layer must do, written with the reference functions."""

    def __init__(self, layer):
        self.layer_like = layer
        state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
        self.weight, self.bias = state.get("weight"), state.get("bias")
        self.running_mean, self.running_var = state.get("running_mean"), state.get("running_var")
        self.count = int(state.get("num_batches_tracked", 0))
        self.weight_grad = self.bias_grad = None
        self.saved = None

    def forward(self, x, training):
        layer = self.layer_like
        if training or self.running_mean is None:
            update = training and self.running_mean is not None
            momentum = 0.0
            if update:
                self.count += 1
                momentum = 1.0 / self.count if layer.momentum is None else layer.momentum
            y, mean, invstd = R.batch_norm_forward_train(
                x, self.weight, self.bias, layer.eps, axis=layer.axis,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None, momentum=momentum)
            self.saved = ("train", x, mean, invstd)
        else:
            y = R.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             training=False, eps=layer.eps, axis=layer.axis)
            self.saved = ("eval", x)
        return y

    def backward(self, dy):
        layer = self.layer_like
        if self.saved[0] == "train":
            _, x, mean, invstd = self.saved
            dx, dweight, dbias = R.batch_norm_backward(dy, x, mean, invstd, self.weight,
                                                       axis=layer.axis)
        else:
            x = self.saved[1]
            dx, dweight, dbias = R.batch_norm_backward_eval(
                dy, x, self.running_mean, self.running_var, self.weight, layer.eps,
                axis=layer.axis)
        if self.weight is not None:
            self.weight_grad = dweight if self.weight_grad is None else self.weight_grad + dweight
            self.bias_grad = dbias if self.bias_grad is None else self.bias_grad + dbias
        return dx

    def assert_matches(self, layer, dtype):
        if self.weight is not None:
            assert_close(layer.weight.grad, self.weight_grad, dtype, scale=SUM_SCALE)
            assert_close(layer.bias.grad, self.bias_grad, dtype, scale=SUM_SCALE)
        else:
            assert layer.weight is None and layer.bias is None
        if self.running_mean is not None:
            assert_close(layer.running_mean, self.running_mean, dtype)
            assert_close(layer.running_var, self.running_var, dtype)
            assert layer.num_batches_tracked.dtype == np.int64
            assert layer.num_batches_tracked.shape == ()
            assert int(layer.num_batches_tracked) == self.count
        else:
            assert layer.running_mean is None and layer.num_batches_tracked is None


LAYER_SHAPES = [
    (BatchNorm1d, (6, 5), 1), (BatchNorm1d, (4, 5, 7), 1), (BatchNorm1d, (4, 7, 5), -1),
    (BatchNorm1d, (2, 1), 1), (BatchNorm1d, (3, 4099), -1),
    (BatchNorm2d, (2, 3, 7, 9), 1), (BatchNorm2d, (2, 7, 9, 3), -1), (BatchNorm2d, (2, 5, 1, 1), 1),
    (BatchNorm2d, (1, 4, 1, 2), 1), (BatchNorm2d, (16, 8, 16, 20), 1),
    (BatchNorm3d, (2, 3, 4, 5, 6), 1), (BatchNorm3d, (2, 4, 5, 6, 3), -1),
]


def _steps(rng, shape, dtype, count):
    return [((rng.standard_normal(shape) * 2 + 1).astype(dtype),
             rng.standard_normal(shape).astype(dtype)) for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,shape,axis", LAYER_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_steps_match_the_reference(simd_target, cls, shape, axis, dtype, momentum, rng):
    layer = cls(shape[axis], momentum=momentum, axis=axis, dtype=dtype)
    layer.weight.data[:] = rng.standard_normal(shape[axis])
    layer.bias.data[:] = rng.standard_normal(shape[axis])
    twin = ReferenceBatchNorm(layer)
    for x, dy in _steps(rng, shape, dtype, 3):
        assert_close(layer(x), twin.forward(x, True), dtype, scale=4)
        assert_close(layer.backward(dy), twin.backward(dy), dtype, scale=SUM_SCALE)
        twin.assert_matches(layer, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_train_eval_switching_matches_the_reference(simd_target, dtype, affine, track, axis, rng):
    shape = (4, 3, 5, 6) if axis == 1 else (4, 5, 6, 3)
    layer = BatchNorm2d(3, eps=1e-3, momentum=0.3, affine=affine, track_running_stats=track,
                        axis=axis, dtype=dtype)
    twin = ReferenceBatchNorm(layer)
    for training in (True, True, False, True, False, False):
        layer.train(training)
        for x, dy in _steps(rng, shape, dtype, 1):
            assert_close(layer(x), twin.forward(x, training), dtype, scale=4)
            assert_close(layer.backward(dy), twin.backward(dy), dtype, scale=SUM_SCALE)
            twin.assert_matches(layer, dtype)


def test_eval_mode_uses_running_stats_and_updates_nothing(rng):
    layer = BatchNorm1d(4)
    layer(rng.standard_normal((8, 4)).astype(np.float32))
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    layer.eval()
    x = rng.standard_normal((1, 4)).astype(np.float32)     # one sample is fine in eval
    y = layer(x)
    expected = R.batch_norm(x, state["running_mean"], state["running_var"], state["weight"],
                            state["bias"])
    assert_close(y, expected, np.float32)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


def test_without_running_stats_eval_uses_batch_statistics(rng):
    layer = BatchNorm1d(4, track_running_stats=False).eval()
    x = rng.standard_normal((8, 4)).astype(np.float32)
    assert_close(layer(x), R.batch_norm_forward_train(x, layer.weight.data, layer.bias.data)[0],
                 np.float32, scale=4)
    assert list(layer.state_dict()) == ["weight", "bias"]


def test_momentum_none_is_a_cumulative_average(rng):
    layer = BatchNorm1d(3, momentum=None, dtype=np.float64)
    batches = [rng.standard_normal((10, 3)) for _ in range(4)]
    for batch in batches:
        layer(batch)
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-12)
    np.testing.assert_allclose(layer.running_var,
                               np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-12)
    assert int(layer.num_batches_tracked) == 4


def test_backward_accumulates_into_existing_grads(rng):
    layer = BatchNorm2d(3)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer(x)
    layer.backward(dy)
    first_weight_grad = layer.weight.grad
    once = (layer.weight.grad.copy(), layer.bias.grad.copy())
    layer.backward(dy)
    assert layer.weight.grad is first_weight_grad          # in place, like torch's .grad
    assert_close(layer.weight.grad, 2 * once[0], np.float32)
    assert_close(layer.bias.grad, 2 * once[1], np.float32)
    layer.zero_grad()
    layer.backward(dy)
    assert_close(layer.weight.grad, once[0], np.float32)


def test_backward_combines_with_unusual_grads(rng):
    layer = BatchNorm1d(3)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer(x)
    layer.backward(dy)
    expected = (layer.weight.grad.copy(), layer.bias.grad.copy())
    layer.zero_grad()
    strided = np.zeros(6, np.float32)
    layer.weight.grad = strided[::2]        # a view: accumulated through numpy
    layer.backward(dy)
    assert_close(strided[::2], expected[0], np.float32)
    assert_close(layer.bias.grad, expected[1], np.float32)
    layer.weight.grad = np.zeros(3, np.float64)
    with pytest.raises(TypeError, match="weight.grad"):
        layer.backward(dy)


def test_affine_false_has_no_parameters_and_backward_still_returns_dx(rng):
    layer = BatchNorm1d(3, affine=False)
    assert layer.weight is None and list(layer.parameters()) == []
    x = rng.standard_normal((5, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer(x)
    _, mean, invstd = R.batch_norm_forward_train(x)
    assert_close(layer.backward(dy), R.batch_norm_backward(dy, x, mean, invstd)[0], np.float32,
                 scale=SUM_SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_accepts_any_memory_layout(simd_target, dtype, rng):
    layer = BatchNorm2d(5, dtype=dtype)
    x = rng.standard_normal((3, 5, 6, 7)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y_ref, mean, invstd = R.batch_norm_forward_train(x, layer.weight.data, layer.bias.data)
    dx_ref = R.batch_norm_backward(dy, x, mean, invstd, layer.weight.data)[0]
    for (_, x_variant), (_, dy_variant) in zip(array_variants(x), array_variants(dy)):
        assert_close(layer(x_variant), y_ref, dtype, scale=4)
        assert_close(layer.backward(dy_variant), dx_ref, dtype, scale=SUM_SCALE)


def test_same_shape_cache_does_not_skip_checks_for_new_shapes(rng):
    layer = BatchNorm2d(3)
    layer(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(rng.standard_normal((2, 4, 4, 4)).astype(np.float32))
    with pytest.raises(TypeError, match="dtype"):
        layer(rng.standard_normal((2, 3, 4, 4)))


# ---- construction and errors -------------------------------------------------

def test_defaults_follow_torch():
    layer = BatchNorm2d(4)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (
        1e-5, 0.1, True, True)
    assert isinstance(layer.weight, fastbn.Parameter) and layer.weight.grad is None
    np.testing.assert_array_equal(layer.weight.data, 1)
    np.testing.assert_array_equal(layer.bias.data, 0)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert layer.num_batches_tracked.dtype == np.int64 and layer.num_batches_tracked.shape == ()
    assert all(a.dtype == np.float32 for a in (layer.weight.data, layer.running_var))
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                        "num_batches_tracked"]
    assert layer.training
    assert repr(layer) == ("BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, "
                           "track_running_stats=True)")
    assert repr(BatchNorm1d(2, axis=-1, dtype=np.float64, momentum=None)).endswith(
        "momentum=None, affine=True, track_running_stats=True, axis=-1, dtype=float64)")


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(num_features=0), ValueError, "num_features"),
    (dict(num_features=2.5), TypeError, "num_features"),
    (dict(num_features=3, eps=0.0), ValueError, "eps"),
    (dict(num_features=3, momentum=1.5), ValueError, "momentum"),
    (dict(num_features=3, axis=2), ValueError, "axis"),
    (dict(num_features=3, dtype=np.int32), TypeError, "dtype"),
    (dict(num_features=3, dtype="nonsense"), TypeError, "dtype"),
    (dict(num_features=3, affine=1), TypeError, "affine"),
])
def test_bad_constructor_arguments_are_rejected(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        BatchNorm2d(**kwargs)


@pytest.mark.parametrize("cls,shape,message", [
    (BatchNorm1d, (2, 3, 4, 5), r"^expected 2D or 3D input \(got 4D input\)$"),
    (BatchNorm1d, (3,), r"^expected 2D or 3D input \(got 1D input\)$"),
    (BatchNorm2d, (2, 3, 4), r"^expected 4D input \(got 3D input\)$"),
    (BatchNorm3d, (2, 3, 4, 5), r"^expected 5D input \(got 4D input\)$"),
])
def test_wrong_rank_uses_torch_message(cls, shape, message):
    with pytest.raises(ValueError, match=message):
        cls(3)(np.zeros(shape, np.float32))


def test_channel_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"expected 4 channels \(num_features\) on axis 1, got 3"):
        BatchNorm2d(4)(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected 4 channels \(num_features\) on axis -1, got 5"):
        BatchNorm2d(4, axis=-1)(np.zeros((2, 3, 4, 5), np.float32))


def test_one_value_per_channel_in_training_is_rejected_before_any_update():
    layer = BatchNorm1d(3)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size \(1, 3\)"):
        layer(np.ones((1, 3), np.float32))
    assert int(layer.num_batches_tracked) == 0
    layer(np.ones((1, 3, 2), np.float32))      # (1, C, 2) has two values per channel
    assert int(layer.num_batches_tracked) == 1


def test_input_dtype_must_match_the_layer():
    with pytest.raises(TypeError, match="input: expected dtype float32 .*got float64"):
        BatchNorm1d(3)(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="input: expected dtype float32 or float64"):
        BatchNorm1d(3)(np.zeros((4, 3), np.int64))
    stateless = BatchNorm1d(3, affine=False, track_running_stats=False)
    assert stateless(np.arange(12.0).reshape(4, 3)).dtype == np.float64


def test_backward_needs_a_forward_and_a_matching_dy():
    layer = BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.zeros((4, 3), np.float32))
    layer(np.arange(12, dtype=np.float32).reshape(4, 3))
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 3\)"):
        layer.backward(np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="dy: expected dtype float32"):
        layer.backward(np.zeros((4, 3)))


def test_tampered_state_is_caught_not_read_out_of_bounds(rng):
    layer = BatchNorm1d(3)
    layer.running_var = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="running_var: expected a 1-D array with 3 elements"):
        layer(rng.standard_normal((4, 3)).astype(np.float32))
    layer.running_var = np.ones(3, np.float32)
    layer.running_var.flags.writeable = False
    with pytest.raises(ValueError, match="running_var: expected a writeable array"):
        layer(rng.standard_normal((4, 3)).astype(np.float32))


def test_reset_running_stats_and_parameters(rng):
    layer = BatchNorm1d(3)
    layer(rng.standard_normal((4, 3)).astype(np.float32))
    layer.weight.data[:] = 5
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    np.testing.assert_array_equal(layer.weight.data, 1)
    assert int(layer.num_batches_tracked) == 0


def test_load_state_dict_without_num_batches_tracked_keeps_the_count(rng):
    layer = BatchNorm1d(3)
    layer(rng.standard_normal((4, 3)).astype(np.float32))
    state = {k: v.copy() for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    assert layer.load_state_dict(state).missing_keys == []
    assert int(layer.num_batches_tracked) == 1


def test_num_batches_tracked_of_another_integer_dtype_still_counts(rng):
    layer = BatchNorm1d(3)
    layer.num_batches_tracked = np.array(5, np.int32)
    layer(rng.standard_normal((4, 3)).astype(np.float32))
    assert int(layer.num_batches_tracked) == 6 and layer.num_batches_tracked.dtype == np.int32
