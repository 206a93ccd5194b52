"""The optimizers (reference backend, and the fast one) against torch.optim:
pins the semantics (formulas, step order, state keys, first-step rules)."""
from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import optim

from test_optim_cases import (CASES, SHAPES, STEPS, change_hyperparameters, make_optimizer,
                              make_params, set_grads)

torch = pytest.importorskip("torch")

TORCH_CLASSES = {optim.SGD: "SGD", optim.RMSprop: "RMSprop", optim.Adam: "Adam",
                 optim.AdamW: "AdamW", optim.Adagrad: "Adagrad", optim.NAdam: "NAdam",
                 optim.RAdam: "RAdam", optim.Adadelta: "Adadelta", optim.Adamax: "Adamax"}
TORCH_CASES = [name for name, (cls, kwargs) in CASES.items()
               if cls in TORCH_CLASSES and kwargs.get("bias_correction", True)]


@pytest.fixture(autouse=True)
def torch_scalars_in_float64():
    """torch keeps NAdam's mu_product (and every ``step``) in the default
    dtype; float64 makes it the float fastbn keeps, so the comparisons can be
    tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def copy_grads(params, tensors) -> None:
    for param, tensor in zip(params, tensors):
        tensor.grad = None if param.grad is None else torch.from_numpy(param.grad.copy())


def torch_twin(case: str, params):
    """The same optimizer in torch, over float64 copies of `params`, same groups."""
    cls, kwargs = CASES[case]
    tensors = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    ours = make_optimizer(case, params)
    groups = []
    for group in ours.param_groups:
        members = [tensors[next(i for i, p in enumerate(params) if p is q)] for q in group["params"]]
        groups.append({"params": members, "lr": group["lr"]})
    twin = getattr(torch.optim, TORCH_CLASSES[cls])(groups, **kwargs)
    return ours, twin, tensors


def step_side_by_side(ours, twin, params, tensors, steps, *, first=0,
                      change_hyperparameters_too=True, torch_only=False) -> None:
    """Steps `twin` (and `ours`, unless `torch_only`) on the same gradients
    for steps first .. first + steps - 1."""
    for step in range(first, first + steps):
        if change_hyperparameters_too:
            change_hyperparameters(ours, step)
            change_hyperparameters(twin, step)
        set_grads(params, step)
        copy_grads(params, tensors)
        twin.step()
        if not torch_only:
            ours.step()


def assert_state_matches_torch(ours, twin, params, tensors, **tolerance) -> None:
    """Every parameter and every state buffer torch keeps, with the same keys."""
    for index, (param, tensor) in enumerate(zip(params, tensors)):
        np.testing.assert_allclose(param.data, tensor.detach().numpy(), err_msg=f"param {index}",
                                   **tolerance)
        theirs = twin.state.get(tensor, {})
        mine = ours.state.get(param, {})
        assert set(mine) == {key for key, value in theirs.items() if value is not None}, index
        for key, value in theirs.items():
            if key == "step":
                assert mine["step"] == int(value.item())
            elif value is not None:
                np.testing.assert_allclose(mine[key], value.numpy(),
                                           err_msg=f"param {index} state {key}", **tolerance)


def assert_resumes_from_torch_checkpoint(case, warm_steps, more_steps) -> None:
    """torch trains `warm_steps`, its state_dict loads into ours, and both
    continue alike for `more_steps`."""
    params = make_params(SHAPES, np.float64)
    ours, twin, tensors = torch_twin(case, params)
    step_side_by_side(ours, twin, params, tensors, warm_steps, torch_only=True,
                      change_hyperparameters_too=False)
    for param, tensor in zip(params, tensors):
        param.data[...] = tensor.detach().numpy()
    ours.load_state_dict(twin.state_dict())
    step_side_by_side(ours, twin, params, tensors, more_steps, first=warm_steps,
                      change_hyperparameters_too=False)
    for param, tensor in zip(params, tensors):
        np.testing.assert_allclose(param.data, tensor.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("case", TORCH_CASES)
def test_matches_torch_optim_for_every_state_buffer(case, backend):
    params = make_params(SHAPES, np.float64)
    ours, twin, tensors = torch_twin(case, params)
    with fastbn.use_backend(backend):
        step_side_by_side(ours, twin, params, tensors, STEPS)
    assert_state_matches_torch(ours, twin, params, tensors, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["adam_amsgrad", "rmsprop_all_options", "sgd_momentum", "adagrad"])
def test_torch_state_dict_loads_and_training_continues_like_torch(case):
    assert_resumes_from_torch_checkpoint(case, warm_steps=5, more_steps=4)


def test_momentum_matches_torch_sgd_with_scaled_lr():
    beta, lr = 0.9, 0.1
    params = make_params(SHAPES, np.float64)
    tensors = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    ours = optim.Momentum(params, lr=lr, momentum=beta)
    twin = torch.optim.SGD(tensors, lr=lr * (1 - beta), momentum=beta)
    step_side_by_side(ours, twin, params, tensors, STEPS, change_hyperparameters_too=False)
    for param, tensor in zip(params, tensors):
        np.testing.assert_allclose(param.data, tensor.detach().numpy(), rtol=1e-10, atol=1e-12)
        # torch's buffer is b = sum of beta^k g; ours is v = (1 - beta) * b
        np.testing.assert_allclose(ours.state[param]["momentum_buffer"],
                                   (1 - beta) * twin.state[tensor]["momentum_buffer"].numpy(),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    params = make_params(SHAPES, np.float64)
    set_grads(params, 5)
    tensors = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    copy_grads(params, tensors)
    norm = optim.clip_grad_norm_(params, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    assert norm == pytest.approx(float(expected), rel=1e-12)
    for param, tensor in zip(params, tensors):
        if param.grad is not None:
            np.testing.assert_allclose(param.grad, tensor.grad.numpy(), rtol=1e-12)


NEW_CASES = [name for name, (cls, _) in CASES.items()
             if cls in (optim.NAdam, optim.RAdam, optim.Adadelta, optim.Adamax)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", NEW_CASES)
def test_new_optimizers_match_torch_over_100_steps(case, dtype):
    params = make_params(SHAPES, dtype)
    ours, twin, tensors = torch_twin(case, params)
    step_side_by_side(ours, twin, params, tensors, 100)
    assert all(param.data.dtype == dtype for param in params)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    assert_state_matches_torch(ours, twin, params, tensors, **tolerance)


@pytest.mark.parametrize("case", ["nadam_decoupled_maximize", "radam_weight_decay_early_rectification",
                                  "adadelta", "adamax_weight_decay_maximize"])
def test_new_optimizers_load_torch_state_and_continue_like_torch(case):
    assert_resumes_from_torch_checkpoint(case, warm_steps=5, more_steps=7)
