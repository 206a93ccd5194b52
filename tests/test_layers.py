"""fastbn.nn layers: Linear, ReLU, Dropout, Flatten, Sequential, losses.

Gradients are checked against central finite differences in float64: for a
module f and a fixed random R, the scalar L(x) = sum(f(x) * R) has
dL/dx = f.backward(R) and dL/dtheta = the accumulated param.grad.
"""
import math

import numpy as np
import pytest

import fastbn
from fastbn import nn

FD_STEP = 1e-6


def numeric_gradient(function, array, step=FD_STEP):
    """Central differences of the scalar function() w.r.t. every element of
    `array` (perturbed in place)."""
    grad = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + step
        plus = function()
        flat[i] = original - step
        minus = function()
        flat[i] = original
        flat_grad[i] = (plus - minus) / (2 * step)
    return grad


def check_module_gradients(module, x, rng, rtol=1e-6, atol=1e-8):
    """Analytic input and parameter gradients of sum(module(x) * R) against
    finite differences."""
    weights = rng.standard_normal(module(x).shape)

    def scalar():
        return float(np.sum(module(x) * weights))

    module.zero_grad()
    module(x)
    dx = module.backward(weights)
    np.testing.assert_allclose(dx, numeric_gradient(scalar, x), rtol=rtol, atol=atol)
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        np.testing.assert_allclose(param.grad, numeric_gradient(scalar, param.data),
                                   rtol=rtol, atol=atol, err_msg=name)


# ---- Linear ------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_linear_gradients_match_finite_differences(rng, bias, shape):
    layer = nn.Linear(5, 4, bias=bias, rng=1, dtype=np.float64)
    check_module_gradients(layer, rng.standard_normal(shape), rng)


def test_linear_computes_x_times_weight_transposed_plus_bias(rng):
    layer = nn.Linear(3, 2, init="torch", rng=0)
    assert layer.weight.data.shape == (2, 3) and layer.weight.data.dtype == np.float32
    x = rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(layer(x), x @ layer.weight.data.T + layer.bias.data, rtol=1e-6)


def test_linear_backward_accumulates_until_zero_grad(rng):
    layer = nn.Linear(3, 2, rng=0, dtype=np.float64)
    x, dy = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    layer(x)
    layer.backward(dy)
    first = layer.weight.grad.copy(), layer.bias.grad.copy()
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * first[0])
    np.testing.assert_allclose(layer.bias.grad, 2 * first[1])
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_linear_init_is_reproducible_from_a_seed_or_generator():
    a = nn.Linear(20, 30, rng=7)
    b = nn.Linear(20, 30, rng=7)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    shared = np.random.default_rng(3)
    first, second = nn.Linear(20, 30, rng=shared), nn.Linear(20, 30, rng=shared)
    assert not np.array_equal(first.weight.data, second.weight.data)
    again = np.random.default_rng(3)
    np.testing.assert_array_equal(nn.Linear(20, 30, rng=again).weight.data, first.weight.data)


@pytest.mark.parametrize("init, expected_std", [
    ("kaiming", math.sqrt(2 / 400)),
    ("kaiming_uniform", math.sqrt(2 / 400)),
    ("xavier", math.sqrt(2 / (400 + 300))),
    ("xavier_normal", math.sqrt(2 / (400 + 300))),
    ("torch", math.sqrt(1 / (3 * 400))),
])
def test_linear_init_has_the_documented_scale(init, expected_std):
    layer = nn.Linear(400, 300, init=init, rng=0, dtype=np.float64)
    assert abs(layer.weight.data.std() - expected_std) < 0.02 * expected_std
    assert abs(layer.weight.data.mean()) < 0.02 * expected_std
    if init != "torch":
        assert not layer.bias.data.any()
    if init == "xavier":
        assert np.abs(layer.weight.data).max() <= math.sqrt(6 / 700)


def test_linear_rejects_wrong_dtype_width_and_init():
    layer = nn.Linear(3, 2, rng=0)
    with pytest.raises(TypeError, match="input: expected dtype float32"):
        layer(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"input: expected shape \(\*, 3\)"):
        layer(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="init: expected one of"):
        nn.Linear(3, 2, init="orthogonal")
    with pytest.raises(TypeError, match="rng"):
        nn.Linear(3, 2, rng="seed")
    with pytest.raises(RuntimeError, match="call forward first"):
        nn.Linear(3, 2, rng=0).backward(np.zeros((1, 2), dtype=np.float32))


# ---- ReLU, Dropout, Flatten ----------------------------------------------------

def test_relu_gradient_matches_finite_differences(rng):
    x = rng.standard_normal((5, 7))
    x[np.abs(x) < 1e-3] = 0.5          # keep finite differences away from the kink
    check_module_gradients(nn.ReLU(), x, rng)


def test_relu_passes_no_gradient_at_zero_and_keeps_nan():
    relu = nn.ReLU()
    y = relu(np.array([-1.0, 0.0, 2.0, np.nan]))
    np.testing.assert_array_equal(y, [0.0, 0.0, 2.0, np.nan])
    np.testing.assert_array_equal(relu.backward(np.ones(4)), [0.0, 0.0, 1.0, 0.0])


def test_dropout_is_identity_in_eval_and_scales_survivors_in_training(rng):
    x = rng.standard_normal((200, 50)).astype(np.float32)
    dropout = nn.Dropout(0.25, rng=0)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(dropout.backward(dy), np.where(kept, dy / 0.75, 0), rtol=1e-6)
    dropout.eval()
    assert dropout(x) is x
    assert dropout.backward(dy) is dy


def test_dropout_masks_are_reproducible_from_a_seed(rng):
    x = np.ones((30, 30))
    np.testing.assert_array_equal(nn.Dropout(0.5, rng=4)(x), nn.Dropout(0.5, rng=4)(x))
    assert not np.any(nn.Dropout(1.0, rng=0)(x))
    np.testing.assert_array_equal(nn.Dropout(0.0, rng=0)(x), x)
    with pytest.raises(ValueError, match=r"p: expected a value in \[0.0, 1.0\]"):
        nn.Dropout(1.5)


def test_flatten_round_trips_shapes(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    flatten = nn.Flatten()
    assert flatten(x).shape == (2, 60)
    assert flatten.backward(np.ones((2, 60))).shape == x.shape
    assert nn.Flatten(1, 2)(x).shape == (2, 12, 5)
    with pytest.raises(ValueError, match="do not select"):
        nn.Flatten(3, 1)(x)


# ---- Sequential --------------------------------------------------------------

def small_mlp(dtype=np.float64, rng=0):
    return nn.Sequential(nn.Linear(4, 6, rng=rng, dtype=dtype), nn.ReLU(),
                         nn.Linear(6, 3, rng=rng + 1, dtype=dtype))


def test_sequential_chains_forward_and_backward_in_reverse(rng):
    model = small_mlp()
    x = rng.standard_normal((5, 4))
    expected = model[2](model[1](model[0](x)))
    np.testing.assert_allclose(model(x), expected)
    check_module_gradients(model, x, rng)


def test_sequential_uses_torch_state_dict_keys_and_exposes_its_children():
    model = nn.Sequential(nn.Linear(4, 6, rng=0), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3, rng=1))
    assert list(model.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "3.weight", "3.bias"]
    assert [name for name, _ in model.named_parameters()] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert len(model) == 4 and isinstance(model[-1], nn.Linear)
    head = model[:2]
    assert isinstance(head, nn.Sequential) and head[0] is model[0]
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    with pytest.raises(TypeError, match="expected a fastbn.nn.Module"):
        nn.Sequential(nn.ReLU(), lambda x: x)


def test_sequential_state_dict_round_trips_through_load_state_dict(rng):
    source, target = small_mlp(np.float32, rng=0), small_mlp(np.float32, rng=5)
    target.load_state_dict({k: v.copy() for k, v in source.state_dict().items()})
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(target(x), source(x))


def test_sequential_with_batchnorm_gradients_match_finite_differences(rng):
    model = nn.Sequential(nn.Linear(3, 4, rng=0, dtype=np.float64),
                          nn.BatchNorm1d(4, dtype=np.float64), nn.ReLU(),
                          nn.Linear(4, 2, rng=1, dtype=np.float64))
    model[1].weight.data[...] = rng.uniform(0.5, 1.5, 4)
    model[1].bias.data[...] = rng.uniform(-0.5, 0.5, 4)
    x = rng.standard_normal((6, 3))
    # finite differences must not move the running statistics
    model[1].momentum = 0.0
    check_module_gradients(model, x, rng, rtol=1e-5, atol=1e-7)


def test_sequential_with_batchnorm_eval_gradients_match_finite_differences(rng):
    model = nn.Sequential(nn.Linear(3, 4, rng=0, dtype=np.float64),
                          nn.BatchNorm1d(4, dtype=np.float64), nn.ReLU())
    model[1].running_mean[...] = rng.standard_normal(4)
    model[1].running_var[...] = rng.uniform(0.5, 2.0, 4)
    model.eval()
    check_module_gradients(model, rng.standard_normal((5, 3)), rng)


# ---- losses ------------------------------------------------------------------

def test_cross_entropy_matches_the_log_softmax_formula(rng):
    logits = rng.standard_normal((6, 4))
    target = np.array([0, 3, 1, 1, 2, 0])
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(6), target]
    assert np.isclose(nn.CrossEntropyLoss()(logits, target), expected.mean(), rtol=1e-14)
    assert np.isclose(nn.CrossEntropyLoss(reduction="sum")(logits, target), expected.sum())
    np.testing.assert_allclose(nn.CrossEntropyLoss(reduction="none")(logits, target), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [-3e4, 3e4, 3e4]], dtype=dtype)
    criterion = nn.CrossEntropyLoss(reduction="none")
    losses = criterion(logits, np.array([0, 1]))
    assert losses.dtype == dtype
    np.testing.assert_allclose(losses, [0.0, math.log(2)], rtol=1e-6, atol=1e-6)
    grad = criterion.backward(np.ones(2, dtype=dtype))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, [[0, 0, 0], [0, -0.5, 0.5]], atol=1e-6)


@pytest.mark.parametrize("options", [dict(), dict(reduction="sum"), dict(label_smoothing=0.2),
                                     dict(ignore_index=2)])
def test_cross_entropy_gradient_matches_finite_differences(rng, options):
    logits = rng.standard_normal((5, 4))
    target = np.array([2, 0, 3, 2, 1])
    criterion = nn.CrossEntropyLoss(**options)
    criterion(logits, target)
    grad = criterion.backward(1.5)
    numeric = numeric_gradient(lambda: 1.5 * float(criterion(logits, target)), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_cross_entropy_accepts_class_probabilities(rng):
    logits = rng.standard_normal((4, 3))
    probabilities = rng.dirichlet(np.ones(3), size=4)
    criterion = nn.CrossEntropyLoss()
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert np.isclose(criterion(logits, probabilities), -(probabilities * log_probs).sum(1).mean())
    grad = criterion.backward()
    np.testing.assert_allclose(grad, numeric_gradient(lambda: float(criterion(logits, probabilities)),
                                                      logits), rtol=1e-6, atol=1e-9)


def test_cross_entropy_rejects_bad_targets():
    criterion = nn.CrossEntropyLoss()
    logits = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 3\)"):
        criterion(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="target: expected class indices of shape"):
        criterion(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="target: expected dtype float32"):
        criterion(logits, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"input: expected logits of shape \(N, C\)"):
        criterion(np.zeros(3, dtype=np.float32), np.array([0]))
    with pytest.raises(ValueError, match="reduction"):
        nn.CrossEntropyLoss(reduction="batchmean")
    with pytest.raises(RuntimeError, match="call forward"):
        nn.CrossEntropyLoss().backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_value_and_gradient(rng, reduction):
    prediction, target = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    criterion = nn.MSELoss(reduction)
    loss = criterion(prediction, target)
    squared = (prediction - target) ** 2
    np.testing.assert_allclose(loss, {"mean": squared.mean(), "sum": squared.sum(), "none": squared}[reduction])
    upstream = rng.standard_normal((3, 4)) if reduction == "none" else 0.7
    grad = criterion.backward(upstream)
    numeric = numeric_gradient(lambda: float(np.sum(criterion(prediction, target) * upstream)), prediction)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# ---- training ------------------------------------------------------------------

def test_small_mlp_with_batchnorm_reaches_90_percent_test_accuracy_in_5_epochs():
    from fastbn.demo.data import make_blobs_dataset
    data = make_blobs_dataset(num_samples=1000, seed=0).astype(np.float32)
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(64, 64, rng=rng), nn.BatchNorm1d(64), nn.ReLU(),
                          nn.Linear(64, 10, rng=rng))
    criterion = nn.CrossEntropyLoss()
    optimizer = fastbn.optim.Adam(model.parameters(), lr=3e-3)
    order = np.random.default_rng(1)
    for _epoch in range(5):
        model.train()
        losses = []
        for batch in np.array_split(order.permutation(len(data.y_train)), 25):
            loss = criterion(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            model.backward(criterion.backward())
            optimizer.step()
            losses.append(float(loss))
    model.eval()
    accuracy = (model(data.x_test).argmax(axis=1) == data.y_test).mean()
    assert np.mean(losses) < 0.5
    assert accuracy >= 0.9


@pytest.mark.parametrize("options", [dict(), dict(reduction="sum"), dict(reduction="none"),
                                     dict(label_smoothing=0.1), dict(ignore_index=1)])
def test_cross_entropy_and_its_gradient_match_torch(rng, options):
    torch = pytest.importorskip("torch")
    logits = rng.standard_normal((7, 5))
    target = np.array([1, 0, 4, 1, 3, 2, 1])
    criterion = nn.CrossEntropyLoss(**options)
    loss = criterion(logits, target)
    upstream = rng.standard_normal(7) if options.get("reduction") == "none" else 1.0
    grad = criterion.backward(upstream)
    t_logits = torch.from_numpy(logits).requires_grad_(True)
    t_loss = torch.nn.CrossEntropyLoss(**options)(t_logits, torch.from_numpy(target))
    t_loss.backward(torch.as_tensor(upstream) if np.ndim(upstream) else None)
    np.testing.assert_allclose(loss, t_loss.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_mse_loss_matches_torch(rng):
    torch = pytest.importorskip("torch")
    prediction, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    criterion = nn.MSELoss()
    loss = criterion(prediction, target)
    t_prediction = torch.from_numpy(prediction).requires_grad_(True)
    t_loss = torch.nn.MSELoss()(t_prediction, torch.from_numpy(target))
    t_loss.backward()
    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-14)
    np.testing.assert_allclose(criterion.backward(), t_prediction.grad.numpy(), rtol=1e-14)
