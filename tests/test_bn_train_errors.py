"""Bad input to the training forward and the backwards raises the same clear
error, with the same message, on both backends, before anything is mutated."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F

BACKENDS = ["fast", "reference"]


def arrays(channels=3, dtype=np.float32):
    x = np.arange(2 * channels * 4, dtype=dtype).reshape(2, channels, 4)
    return dict(x=x, mean=np.zeros(channels, dtype), var=np.ones(channels, dtype),
                w=np.ones(channels, dtype), dy=np.ones_like(x))


def readonly(array):
    array = array.copy()
    array.flags.writeable = False
    return array


FORWARD_ERRORS = [
    (lambda a: F.batch_norm(a["x"].astype(np.int64), a["mean"], a["var"], training=True),
     TypeError, "input: expected dtype float32 or float64, got int64"),
    (lambda a: F.batch_norm(a["x"], a["mean"], a["var"], a["w"].astype(np.float64), training=True),
     TypeError, "weight: expected dtype float32"),
    (lambda a: F.batch_norm(a["x"][0, 0], None, None, training=True),
     ValueError, "at least 2 dimensions"),
    (lambda a: F.batch_norm(a["x"], a["mean"][:2], a["var"], training=True),
     ValueError, "running_mean: expected a 1-D array with 3 elements"),
    (lambda a: F.batch_norm(a["x"][:1, :, :1], a["mean"], a["var"], training=True),
     ValueError, r"Expected more than 1 value per channel when training, got input size \(1, 3, 1\)"),
    (lambda a: F.batch_norm(a["x"][:1, :, 0], None, None, training=True),
     ValueError, r"Expected more than 1 value per channel when training, got input size \(1, 3\)"),
    (lambda a: F.batch_norm(a["x"][:1, :, 0], None, None, training=False),
     ValueError, "Expected more than 1 value per channel"),
    (lambda a: F.batch_norm(a["x"][:0], a["mean"], a["var"], training=True),
     ValueError, r"non-empty batch.*\(0, 3, 4\)"),
    (lambda a: F.batch_norm(a["x"], a["mean"], a["var"], training=True, eps=0.0),
     ValueError, "eps: expected a value > 0 when batch statistics are used"),
    (lambda a: F.batch_norm(a["x"], None, None, training=False, eps=0.0),
     ValueError, "eps: expected a value > 0"),
    (lambda a: F.batch_norm(a["x"], a["mean"], a["var"], training=True, eps=float("nan")),
     ValueError, "eps"),
    (lambda a: F.batch_norm(a["x"], a["mean"], a["var"], training=True, momentum=None),
     ValueError, "momentum: None"),
    (lambda a: F.batch_norm(a["x"], a["mean"], a["var"], training=True, momentum=-0.1),
     ValueError, "momentum"),
    (lambda a: F.batch_norm(a["x"], a["mean"], None, training=True),
     ValueError, "running_var: expected an array because running_mean was given"),
    (lambda a: F.batch_norm(a["x"], None, a["var"], training=False),
     ValueError, "running_mean: expected an array because running_var was given"),
    (lambda a: F.batch_norm(a["x"], readonly(a["mean"]), a["var"], training=True),
     ValueError, "running_mean: expected a writeable array"),
    (lambda a: F.batch_norm(a["x"], a["mean"], a["var"], training=True, axis=0),
     ValueError, "axis"),
    (lambda a: F.batch_norm(a["x"], a["mean"], a["var"], training=True,
                            out=np.empty((2, 3, 5), np.float32)),
     ValueError, "out: expected shape"),
    (lambda a: F.batch_norm_forward_train(a["x"].astype(np.complex64)),
     TypeError, "input"),
    (lambda a: F.batch_norm_forward_train(a["x"], eps=-1e-5),
     ValueError, "eps"),
    (lambda a: F.batch_norm_forward_train(a["x"], running_mean=a["mean"]),
     ValueError, "running_var"),
    (lambda a: F.batch_norm_forward_train(a["x"], running_mean=a["mean"], running_var=a["var"],
                                          momentum=None),
     ValueError, "momentum"),
    (lambda a: F.batch_norm_forward_train(a["x"], a["w"][:, None]),
     ValueError, "weight: expected a 1-D array"),
    (lambda a: F.batch_norm_forward_train(a["x"], out=readonly(a["x"])),
     ValueError, "read-only"),
]

BACKWARD_ERRORS = [
    (lambda a: F.batch_norm_backward(a["dy"][:1], a["x"], a["mean"], a["var"], a["w"]),
     ValueError, r"dy: expected shape \(2, 3, 4\)"),
    (lambda a: F.batch_norm_backward(a["dy"].astype(np.float64), a["x"], a["mean"], a["var"]),
     TypeError, "dy: expected dtype float32 \\(the dtype of x\\), got float64"),
    (lambda a: F.batch_norm_backward(a["dy"], a["x"].astype(np.int32), a["mean"], a["var"]),
     TypeError, "x: expected dtype float32 or float64"),
    (lambda a: F.batch_norm_backward(a["dy"], a["x"], None, a["var"]),
     TypeError, "mean: expected a 1-D array with 3 elements"),
    (lambda a: F.batch_norm_backward(a["dy"], a["x"], a["mean"], a["var"][:1]),
     ValueError, "invstd: expected a 1-D array with 3 elements"),
    (lambda a: F.batch_norm_backward(a["dy"], a["x"], a["mean"], a["var"], a["w"][:2]),
     ValueError, "weight"),
    (lambda a: F.batch_norm_backward(a["dy"], a["x"][0, 0], a["mean"], a["var"]),
     ValueError, "x: expected at least 2 dimensions"),
    (lambda a: F.batch_norm_backward(a["dy"], a["x"], a["mean"], a["var"], axis=0),
     ValueError, "axis"),
    (lambda a: F.batch_norm_backward(a["dy"], a["x"], a["mean"], a["var"],
                                     out=np.empty((2, 3, 4), np.float64)),
     TypeError, "out"),
    (lambda a: F.batch_norm_backward_eval(a["dy"], a["x"], a["mean"], a["var"], eps=-1.0),
     ValueError, "eps: expected a value >= 0"),
    (lambda a: F.batch_norm_backward_eval(a["dy"], a["x"], a["mean"], None),
     TypeError, "running_var"),
    (lambda a: F.batch_norm_backward_eval(a["dy"], a["x"], a["mean"].astype(np.float64), a["var"]),
     TypeError, "running_mean: expected dtype float32"),
    (lambda a: F.batch_norm_backward_eval([1.0], a["x"], a["mean"], a["var"]),
     ValueError, "dy: expected shape"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,error,pattern", FORWARD_ERRORS + BACKWARD_ERRORS)
def test_bad_input_raises_a_clear_error_on_both_backends(backend, call, error, pattern):
    inputs = arrays()
    snapshot = {name: array.copy() for name, array in inputs.items()}
    with fastbn.use_backend(backend):
        with pytest.raises(error, match=pattern):
            call(inputs)
    for name, array in inputs.items():   # nothing was mutated on the way to the error
        np.testing.assert_array_equal(array, snapshot[name])


@pytest.mark.parametrize("call,error,pattern", FORWARD_ERRORS + BACKWARD_ERRORS)
def test_both_backends_raise_the_same_message(call, error, pattern):
    messages = []
    for backend in BACKENDS:
        with fastbn.use_backend(backend):
            with pytest.raises(error) as caught:
                call(arrays())
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_training_call_leaves_running_stats_untouched(backend):
    inputs = arrays()
    mean, var = inputs["mean"], inputs["var"]
    with fastbn.use_backend(backend):
        with pytest.raises(ValueError):
            F.batch_norm(inputs["x"], mean, var, inputs["w"][:2], training=True)
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(var, 1)
