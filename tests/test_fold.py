"""Inference: BatchNorm folding, model state_dict save/load, torch import."""
import numpy as np
import pytest

import fastbn
from fastbn import nn


def trained_looking_bn(features, dtype, rng, affine=True):
    """A BatchNorm1d with the non-trivial state training leaves behind."""
    bn = nn.BatchNorm1d(features, affine=affine, dtype=dtype)
    bn.running_mean[...] = rng.normal(0, 2, features)
    bn.running_var[...] = rng.uniform(0.1, 3.0, features)
    if affine:
        bn.weight.data[...] = rng.normal(1, 0.5, features)
        bn.bias.data[...] = rng.normal(0, 0.5, features)
    return bn.eval()


def mlp(dtype, rng, seed=0):
    return nn.Sequential(
        nn.Linear(8, 16, rng=seed, dtype=dtype), trained_looking_bn(16, dtype, rng), nn.ReLU(),
        nn.Linear(16, 12, bias=False, rng=seed + 1, dtype=dtype), trained_looking_bn(12, dtype, rng),
        nn.ReLU(), nn.Linear(12, 3, rng=seed + 2, dtype=dtype))


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False)])
def test_folded_linear_reproduces_linear_then_eval_batchnorm(rng, dtype, tolerance, bias, affine):
    linear = nn.Linear(8, 5, bias=bias, rng=0, dtype=dtype)
    bn = trained_looking_bn(5, dtype, rng, affine=affine)
    folded = nn.fold_batchnorm(linear, bn)
    x = rng.standard_normal((10, 8)).astype(dtype)
    expected = bn(linear(x))
    actual = folded(x)
    assert isinstance(folded, nn.Linear) and actual.dtype == dtype
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


def test_folded_weights_follow_the_documented_formula(rng):
    linear = nn.Linear(4, 3, rng=0, dtype=np.float64)
    linear.bias.data[...] = rng.standard_normal(3)
    bn = trained_looking_bn(3, np.float64, rng)
    folded = nn.fold_batchnorm(linear, bn)
    scale = bn.weight.data / np.sqrt(bn.running_var + bn.eps)
    np.testing.assert_allclose(folded.weight.data, linear.weight.data * scale[:, None], rtol=1e-15)
    np.testing.assert_allclose(folded.bias.data,
                               (linear.bias.data - bn.running_mean) * scale + bn.bias.data, rtol=1e-14)


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 5e-5), (np.float64, 1e-12)])
def test_folded_sequential_matches_the_eval_outputs_and_leaves_the_model_alone(rng, dtype, tolerance):
    model = mlp(dtype, rng)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    folded = nn.fold_batchnorm(model)
    assert [type(m).__name__ for m in folded] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert list(folded.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert not folded.training
    x = rng.standard_normal((32, 8)).astype(dtype)
    np.testing.assert_allclose(folded(x), model(x), rtol=tolerance, atol=tolerance)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_sequential_folding_keeps_unfoldable_batchnorms_and_recurses(rng):
    inner = nn.Sequential(nn.Linear(4, 4, rng=0, dtype=np.float64), trained_looking_bn(4, np.float64, rng))
    no_stats = nn.BatchNorm1d(4, track_running_stats=False, dtype=np.float64)
    model = nn.Sequential(inner, nn.Linear(4, 4, rng=1, dtype=np.float64), no_stats).eval()
    folded = nn.fold_batchnorm(model)
    assert [type(m).__name__ for m in folded[0]] == ["Linear"]
    assert isinstance(folded[2], nn.BatchNorm1d)
    x = rng.standard_normal((6, 4))
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_rejects_what_it_cannot_fold(rng):
    linear = nn.Linear(4, 3, rng=0)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nn.fold_batchnorm(linear, nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="expected 3 features"):
        nn.fold_batchnorm(linear, nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="bn: expected a fastbn.nn.BatchNorm1d"):
        nn.fold_batchnorm(linear, nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="bn: expected dtype float32"):
        nn.fold_batchnorm(linear, nn.BatchNorm1d(3, dtype=np.float64))
    with pytest.raises(TypeError, match="expected a Linear and a BatchNorm1d, or a Sequential"):
        nn.fold_batchnorm(nn.ReLU())


def test_model_state_dict_survives_save_and_load(tmp_path, rng):
    model = mlp(np.float32, rng, seed=0)
    path = tmp_path / "model.ckpt"
    fastbn.save(path, {"model": model, "epoch": 3})
    restored = mlp(np.float32, np.random.default_rng(99), seed=10)
    extra = fastbn.load_into(path, {"model": restored}, strict=False)
    assert extra["epoch"] == 3
    x = rng.standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_array_equal(restored.eval()(x), model(x))
    for key, value in fastbn.load(path)["model"].items():
        np.testing.assert_array_equal(value, model.state_dict()[key])


# ---- torch ------------------------------------------------------------------

def torch_and_fastbn_models(torch, rng):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Linear(16, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),
        torch.nn.Linear(12, 3))
    # a few training steps give non-trivial weights and running statistics
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(5):
        batch = torch.from_numpy(rng.normal(1.0, 2.0, (32, 8)).astype(np.float32))
        loss = reference(batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ours = nn.Sequential(nn.Linear(8, 16, rng=0), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 12, rng=0), nn.BatchNorm1d(12), nn.ReLU(),
                         nn.Linear(12, 3, rng=0))
    return reference, ours


def test_torch_state_dict_loads_and_gives_the_same_eval_outputs(rng):
    torch = pytest.importorskip("torch")
    reference, ours = torch_and_fastbn_models(torch, rng)
    ours.load_state_dict({k: v.detach().numpy() for k, v in reference.state_dict().items()})
    assert int(ours[1].num_batches_tracked) == 5
    x = rng.normal(1.0, 2.0, (64, 8)).astype(np.float32)
    reference.eval()
    ours.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nn.fold_batchnorm(ours)(x), expected, rtol=1e-4, atol=1e-4)


def test_torch_training_step_and_gradients_match_after_import(rng):
    torch = pytest.importorskip("torch")
    reference, ours = torch_and_fastbn_models(torch, rng)
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in reference.state_dict().items()})
    x = rng.normal(1.0, 2.0, (32, 8)).astype(np.float32)
    target = rng.integers(0, 3, 32)
    reference.train()
    ours.train()
    logits = reference(torch.from_numpy(x))
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(target))
    reference.zero_grad()
    torch_loss.backward()
    criterion = nn.CrossEntropyLoss()
    loss = criterion(ours(x), target)
    ours.zero_grad()
    ours.backward(criterion.backward())
    assert np.isclose(loss, torch_loss.item(), rtol=1e-5)
    torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    for name, param in ours.named_parameters():
        np.testing.assert_allclose(param.grad, torch_grads[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for key, value in reference.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
