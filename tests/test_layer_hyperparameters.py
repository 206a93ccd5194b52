"""Layer hyperparameters assigned after construction, Parameter dtypes,
np.matrix inputs, and the clear-message cases of the layers."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import fastbn
import fastbn.functional as F
import fastbn.nn as nn
from fastbn import reference as R
from fastbn.parameter import Parameter
from _state_snapshot import assert_same_state, snapshot

BACKENDS = ("fast", "reference")
# np.matrix inputs are the point of two tests
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastbn.use_backend(request.param):
        yield request.param


def _x(shape=(4, 3, 2, 2), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- hyperparameters: the constructor's check on assignment too ---------------------

BAD_VALUES = [
    ("eps", 0.0, ValueError), ("eps", -1e-5, ValueError), ("eps", float("nan"), ValueError),
    ("eps", "1e-5", TypeError), ("momentum", -0.1, ValueError), ("momentum", 1.5, ValueError),
    ("momentum", "0.1", TypeError), ("axis", 2, ValueError), ("axis", 1.0, ValueError),
    ("track_running_stats", 1, TypeError), ("track_running_stats", None, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_VALUES)
def test_bad_hyperparameter_assignment_raises_the_constructors_error(name, value, error):
    with pytest.raises(error) as from_constructor:
        nn.BatchNorm2d(3, **{name: value})
    layer = nn.BatchNorm2d(3)
    before = getattr(layer, name)
    with pytest.raises(error) as from_assignment:
        setattr(layer, name, value)
    assert str(from_assignment.value) == str(from_constructor.value)
    assert str(from_assignment.value).startswith(f"{name}:")
    assert getattr(layer, name) == before


@pytest.mark.parametrize("name, value", [("eps", 0.0), ("momentum", -0.5)])
def test_rejected_assignment_keeps_training_forward_working(name, value, backend):
    layer = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=name):
        setattr(layer, name, value)
    layer(_x())          # used to raise "...this is a bug in fastbn's validation"
    assert int(layer.num_batches_tracked) == 1


def test_valid_assignments_take_effect_on_the_next_call(backend):
    x = _x()
    layer = nn.BatchNorm2d(3)
    layer.eps, layer.momentum = 0.5, 1.0
    y = layer(x)
    expected, _, _ = R.batch_norm_forward_train(x, None, None, 0.5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    # momentum 1: the running mean is the batch mean
    np.testing.assert_allclose(layer.running_mean, x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    layer.momentum = None
    assert layer.momentum is None
    layer(x)             # cumulative average over 2 batches
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("name", ("num_features", "affine", "dtype"))
def test_structural_hyperparameters_are_read_only(name):
    layer = nn.BatchNorm1d(3)
    before = getattr(layer, name)
    with pytest.raises(AttributeError, match=f"{name}: read-only after construction"):
        setattr(layer, name, before)
    assert getattr(layer, name) == before


def test_track_running_stats_false_after_construction_stops_the_update_as_in_torch(backend):
    layer = nn.BatchNorm1d(3)
    layer.track_running_stats = False
    before = snapshot(layer)
    x = _x((6, 3))
    layer(x)
    assert_same_state(before, snapshot(layer))
    layer.eval()   # the running statistics still exist, so eval uses them (torch's rule)
    np.testing.assert_allclose(layer(x), x / np.sqrt(1 + layer.eps), rtol=1e-6)


def test_assigned_hyperparameters_survive_deepcopy_and_repr():
    layer = nn.BatchNorm1d(3, dtype=np.float64)
    layer.eps, layer.momentum, layer.axis = 1e-3, None, -1
    clone = copy.deepcopy(layer)
    assert (clone.eps, clone.momentum, clone.axis, clone.dtype) == (1e-3, None, -1, np.float64)
    assert "eps=0.001, momentum=None" in repr(clone) and "axis=-1" in repr(clone)


# ---- axis: assignment re-derives the layout ----------------------------------------------


@pytest.mark.parametrize("first, second", [(1, -1), (-1, 1)])
def test_changing_axis_after_a_call_normalizes_over_the_new_axis(first, second, backend):
    x = _x((3, 4, 5, 4))
    layer = nn.BatchNorm2d(4, axis=first)
    layer(x)
    layer.axis = second
    y = layer(x)
    expected, _, _ = R.batch_norm_forward_train(x, None, None, 1e-5, axis=second)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    dy = _x((3, 4, 5, 4), seed=1)
    dx = layer.backward(dy)
    mean, invstd = R.batch_norm_forward_train(x, None, None, 1e-5, axis=second)[1:]
    expected_dx = R.batch_norm_backward(dy, x, mean, invstd, np.ones(4, np.float32),
                                        axis=second)[0]
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)


def test_fast_and_reference_layers_agree_after_an_axis_change():
    x = _x((3, 4, 5, 4))
    results = []
    for name in BACKENDS:
        with fastbn.use_backend(name):
            layer = nn.BatchNorm2d(4)
            layer(x)
            layer.axis = -1
            results.append((layer(x), layer.running_mean.copy(), layer.running_var.copy()))
    for fast, ref in zip(*results):
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


# ---- num_batches_tracked: None and read-only -----------------------------------------------


def test_num_batches_tracked_none_is_not_counted_as_in_torch(backend):
    layer = nn.BatchNorm1d(3)
    layer.num_batches_tracked = None
    x = _x((6, 3))
    layer(x)
    assert layer.num_batches_tracked is None
    np.testing.assert_allclose(layer.running_mean, 0.1 * x.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_num_batches_tracked_none_with_cumulative_average_raises_before_any_write(backend):
    layer = nn.BatchNorm1d(3, momentum=None)
    layer.num_batches_tracked = None
    before = snapshot(layer)
    with pytest.raises(ValueError, match="num_batches_tracked: .*momentum=None"):
        layer(_x((6, 3)))
    assert_same_state(before, snapshot(layer))


def test_read_only_num_batches_tracked_raises_before_the_running_stats_change(backend):
    layer = nn.BatchNorm1d(3)
    layer.num_batches_tracked.flags.writeable = False
    before = snapshot(layer)
    with pytest.raises(ValueError, match="num_batches_tracked: expected a writeable array"):
        layer(_x((6, 3)))
    assert_same_state(before, snapshot(layer))
    layer.eval()
    layer(_x((6, 3)))    # eval does not write the counter


@pytest.mark.parametrize("backend", ("fast", "reference"))
def test_kernels_bump_the_counter_together_with_the_running_stats(backend):
    kernels = fastbn._backend.kernels_for(backend)
    x = _x((6, 3))
    mean, var, counter = np.zeros(3, np.float32), np.ones(3, np.float32), np.array(4)
    y, saved_mean, _, x_read = kernels.train_forward(x, None, 6, 3, 1, None, None, 1e-5, mean,
                                                     var, 0.5, False, counter)
    assert int(counter) == 5 and x_read is x
    np.testing.assert_allclose(mean, 0.5 * x.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(saved_mean, x.mean(axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ("fast", "reference"))
def test_kernels_refuse_a_frozen_counter_writing_nothing(backend):
    kernels = fastbn._backend.kernels_for(backend)
    mean, var, frozen = np.zeros(3, np.float32), np.ones(3, np.float32), np.array(4)
    frozen.flags.writeable = False
    assert kernels.train_forward(_x((6, 3)), None, 6, 3, 1, None, None, 1e-5, mean, var, 0.5,
                                 False, frozen) is None
    assert int(frozen) == 4 and not mean.any() and (var == 1).all()


@pytest.mark.parametrize("backend", ("fast", "reference"))
def test_kernels_take_the_cumulative_average_factor_from_the_counter(backend):
    kernels = fastbn._backend.kernels_for(backend)
    x = _x((6, 3))
    mean, var, counter = np.zeros(3, np.float32), np.ones(3, np.float32), np.array(3)
    kernels.train_forward(x, None, 6, 3, 1, None, None, 1e-5, mean, var, None, False, counter)
    np.testing.assert_allclose(mean, x.mean(axis=0) / 4, rtol=1e-5, atol=1e-7)
    assert int(counter) == 4
    assert kernels.train_forward(x, None, 6, 3, 1, None, None, 1e-5, mean, var, None, False,
                                 None) is None


# ---- Parameter dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (">f4", "<f4", ">f8", "<f8"))
def test_parameter_keeps_the_precision_of_byte_swapped_floats(dtype):
    data = np.array([1 / 3, -2.5, 1e-30], dtype=dtype)
    param = Parameter(data)
    assert param.data.dtype == np.dtype(dtype).newbyteorder("=")
    assert param.data.dtype.isnative
    assert np.array_equal(param.data, data)      # values, bit for bit


@pytest.mark.parametrize("dtype", ("float16", "longdouble"))
def test_parameter_refuses_other_float_widths(dtype):
    if np.dtype(dtype).itemsize == 8:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(TypeError,
                       match=f"Parameter data: expected float32 or float64.*{np.dtype(dtype)}"):
        Parameter(np.zeros(3, dtype))


def test_parameter_keeps_bfloat16_data_without_copying():
    # bfloat16 parameters are for the optimizers that update them in place
    ml_dtypes = pytest.importorskip("ml_dtypes")
    data = np.arange(3).astype(ml_dtypes.bfloat16)
    param = Parameter(data)
    assert param.data is data
    with pytest.raises(TypeError, match="Parameter grad: expected dtype bfloat16"):
        Parameter(data, grad=np.zeros(3, np.float32))


@pytest.mark.parametrize("data", ([1, 2, 3], np.arange(3, dtype=np.int64), np.array([True, False])))
def test_parameter_turns_integer_and_bool_data_into_float32(data):
    param = Parameter(data)
    assert param.data.dtype == np.float32
    np.testing.assert_array_equal(param.data, np.asarray(data, dtype=np.float32))


def test_parameter_keeps_native_float_arrays_without_copying():
    data = np.zeros(3, np.float64)
    assert Parameter(data).data is data


# ---- np.matrix: both backends see a plain ndarray ----------------------------------------


def test_matrix_input_gives_the_same_result_on_both_backends():
    x = np.asarray(_x((5, 3)))
    dy = np.asarray(_x((5, 3), seed=2))
    results = {}
    for name in BACKENDS:
        with fastbn.use_backend(name):
            y, mean, invstd = F.batch_norm_forward_train(np.matrix(x))
            dx = F.batch_norm_backward(np.matrix(dy), np.matrix(x), mean, invstd)[0]
            layer = nn.BatchNorm1d(3)
            layer_y = layer(np.matrix(x))
            layer_dx = layer.backward(np.matrix(dy))
            results[name] = (y, dx, layer_y, layer_dx)
            assert all(type(value) is np.ndarray for value in results[name])
    expected = R.batch_norm_forward_train(x)[0]
    for fast, ref in zip(results["fast"], results["reference"]):
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["reference"][0], expected, rtol=1e-6)


def test_matrix_input_to_linear_is_a_plain_matmul():
    layer = nn.Linear(3, 2, rng=0)
    x = _x((4, 3))
    np.testing.assert_allclose(layer(np.matrix(x)), layer(x))


# ---- Linear grads and messages ------------------------------------------------------------


def test_float64_grad_on_a_float32_linear_raises_type_error(backend):
    layer = nn.Linear(3, 2, rng=0)
    layer(_x((4, 3)))
    layer.weight.grad = np.zeros((2, 3), np.float64)
    with pytest.raises(TypeError, match="weight.grad: expected dtype float32"):
        layer.backward(_x((4, 2)))
    assert not layer.weight.grad.any() and layer.bias.grad is None


def test_linear_backward_accumulates_both_grads():
    layer = nn.Linear(3, 2, rng=0)
    x, dy = _x((4, 3)), _x((4, 2), seed=1)
    layer(x)
    layer.backward(dy)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * dy.T @ x, rtol=1e-5)
    np.testing.assert_allclose(layer.bias.grad, 2 * dy.sum(axis=0), rtol=1e-5)


@pytest.mark.parametrize("dtype", ("nonsense", object(), "int32"))
def test_linear_with_a_bad_dtype_names_it(dtype):
    with pytest.raises(TypeError, match="dtype: expected float32 or float64, got"):
        nn.Linear(2, 3, dtype=dtype)


def test_cross_entropy_with_zero_classes_names_the_input():
    with pytest.raises(ValueError, match=r"input: .*at least one class.*\(2, 0\)"):
        nn.CrossEntropyLoss()(np.zeros((2, 0), np.float32), np.array([0, 0]))
