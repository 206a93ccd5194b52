"""PyTorch as a second oracle: fastbn's BatchNorm layers and functional batch
norm against torch.nn.BatchNorm*d / torch.nn.functional.batch_norm (outputs,
running statistics, num_batches_tracked, gradients), and state_dicts moving
between the two."""
import numpy as np
import pytest

import fastbn
from fastbn import functional as F

torch = pytest.importorskip("torch")

TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
TOLERANCE = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-9, atol=1e-9)}


def to_torch(array, requires_grad=False):
    tensor = torch.from_numpy(np.ascontiguousarray(array)).clone()
    return tensor.requires_grad_(requires_grad)


def assert_matches_torch(ours, theirs, dtype, scale=1.0):
    tolerance = TOLERANCE[dtype]
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=tolerance["rtol"] * scale,
                               atol=tolerance["atol"] * scale)


def torch_layer_like(layer):
    cls = {fastbn.BatchNorm1d: torch.nn.BatchNorm1d, fastbn.BatchNorm2d: torch.nn.BatchNorm2d,
           fastbn.BatchNorm3d: torch.nn.BatchNorm3d}[type(layer)]
    theirs = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                 track_running_stats=layer.track_running_stats,
                 dtype=TORCH_DTYPES[layer.dtype.type])
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()})
    return theirs


def channels_first(array, axis):
    """torch wants the channel axis at 1."""
    return array if axis == 1 or array.ndim == 2 else np.moveaxis(array, -1, 1)


def compare_step(layer, theirs, x, dy, dtype):
    axis = layer.axis
    y = layer(x)
    x_torch = to_torch(channels_first(x, axis), requires_grad=True)
    y_torch = theirs(x_torch)
    assert_matches_torch(channels_first(y, axis), y_torch, dtype, scale=4)
    dx = layer.backward(dy)
    (y_torch * to_torch(channels_first(dy, axis))).sum().backward()
    assert_matches_torch(channels_first(dx, axis), x_torch.grad, dtype, scale=10)
    if layer.affine:
        assert_matches_torch(layer.weight.grad, theirs.weight.grad, dtype, scale=10)
        assert_matches_torch(layer.bias.grad, theirs.bias.grad, dtype, scale=10)
    if layer.track_running_stats:
        assert_matches_torch(layer.running_mean, theirs.running_mean, dtype)
        assert_matches_torch(layer.running_var, theirs.running_var, dtype)
        assert int(layer.num_batches_tracked) == int(theirs.num_batches_tracked)


LAYERS = [
    (fastbn.BatchNorm1d, (8, 5), 1), (fastbn.BatchNorm1d, (4, 5, 7), 1),
    (fastbn.BatchNorm1d, (4, 7, 5), -1), (fastbn.BatchNorm2d, (4, 3, 7, 9), 1),
    (fastbn.BatchNorm2d, (4, 7, 9, 3), -1), (fastbn.BatchNorm2d, (16, 32, 14, 14), 1),
    (fastbn.BatchNorm2d, (2, 2, 1, 1), 1), (fastbn.BatchNorm3d, (2, 3, 4, 5, 6), 1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape,axis", LAYERS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_training_and_eval_match_torch(cls, shape, axis, dtype, momentum):
    rng = np.random.default_rng(21)
    channels = shape[axis]
    layer = cls(channels, momentum=momentum, axis=axis, dtype=dtype)
    layer.weight.data[:] = rng.standard_normal(channels)
    layer.bias.data[:] = rng.standard_normal(channels)
    theirs = torch_layer_like(layer)
    for training in (True, True, True, False, True, False):
        layer.train(training)
        theirs.train(training)
        x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        compare_step(layer, theirs, x, dy, dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_affine_and_tracking_options_match_torch(affine, track):
    rng = np.random.default_rng(22)
    layer = fastbn.BatchNorm2d(4, affine=affine, track_running_stats=track)
    theirs = torch_layer_like(layer)
    for training in (True, False, True):
        layer.train(training)
        theirs.train(training)
        x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        compare_step(layer, theirs, x, dy, np.float32)
    assert list(layer.state_dict()) == list(theirs.state_dict())


def test_torch_state_dict_loads_directly():
    rng = np.random.default_rng(23)
    theirs = torch.nn.BatchNorm2d(6)
    for _ in range(3):
        theirs(torch.from_numpy(rng.standard_normal((4, 6, 5, 5)).astype(np.float32)))
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    state = {key: value.numpy() for key, value in theirs.state_dict().items()}
    layer = fastbn.BatchNorm2d(6)
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 3
    theirs.eval()
    layer.eval()
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    assert_matches_torch(layer(x), theirs(torch.from_numpy(x)), np.float32)


def test_fastbn_state_dict_loads_into_torch():
    rng = np.random.default_rng(24)
    layer = fastbn.BatchNorm1d(3)
    for _ in range(2):
        layer(rng.standard_normal((5, 3)).astype(np.float32))
    theirs = torch.nn.BatchNorm1d(3)
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()})
    layer.eval()
    theirs.eval()
    x = rng.standard_normal((4, 3)).astype(np.float32)
    assert_matches_torch(layer(x), theirs(torch.from_numpy(x)), np.float32)


def test_torch_float64_state_dict_into_float32_layer_is_a_type_error():
    state = {k: v.double().numpy() if v.is_floating_point() else v.numpy()
             for k, v in torch.nn.BatchNorm1d(3).state_dict().items()}
    with pytest.raises(TypeError, match="float32"):
        fastbn.BatchNorm1d(3).load_state_dict(state)
    fastbn.BatchNorm1d(3, dtype=np.float64).load_state_dict(state)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_norm_matches_torch(dtype, training):
    rng = np.random.default_rng(25)
    x = (rng.standard_normal((6, 4, 3, 5)) + 1).astype(dtype)
    weight, bias = rng.standard_normal(4).astype(dtype), rng.standard_normal(4).astype(dtype)
    running_mean = rng.standard_normal(4).astype(dtype)
    running_var = (rng.random(4) + 0.5).astype(dtype)
    torch_mean, torch_var = to_torch(running_mean), to_torch(running_var)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.2, 1e-4)
    y_torch = torch.nn.functional.batch_norm(to_torch(x), torch_mean, torch_var, to_torch(weight),
                                             to_torch(bias), training, 0.2, 1e-4)
    assert_matches_torch(y, y_torch, dtype, scale=4)
    assert_matches_torch(running_mean, torch_mean, dtype)
    assert_matches_torch(running_var, torch_var, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_backward_matches_torch_autograd(dtype):
    rng = np.random.default_rng(26)
    x = (rng.standard_normal((8, 3, 6, 6)) * 2).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight, bias = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    y, mean, invstd = F.batch_norm_forward_train(x, weight, bias)
    dx, dweight, dbias = F.batch_norm_backward(dy, x, mean, invstd, weight)
    tensors = [to_torch(a, requires_grad=True) for a in (x, weight, bias)]
    y_torch = torch.nn.functional.batch_norm(tensors[0], None, None, tensors[1], tensors[2], True)
    (y_torch * to_torch(dy)).sum().backward()
    assert_matches_torch(y, y_torch, dtype, scale=4)
    for ours, tensor in zip((dx, dweight, dbias), tensors):
        assert_matches_torch(ours, tensor.grad, dtype, scale=10)
