"""Shared cases for the optimizer tests: every optimizer x option, a training
loop with changing gradients and hyperparameters, and comparison helpers.
(Imported by the other test_optim*.py files; the checks here pin the case
table itself.)"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

import fastbn
from fastbn import optim
from fastbn.parameter import Parameter

DTYPES = (np.float32, np.float64)

# Shapes of the issue: 1, 7, 64, 1000, 4097 elements and a 2-D one.
SHAPES = ((1,), (7,), (64,), (1000,), (4097,), (33, 65))

# name -> (class, constructor keyword arguments)
CASES: Dict[str, tuple] = {
    "sgd": (optim.SGD, dict(lr=0.1)),
    "sgd_weight_decay": (optim.SGD, dict(lr=0.1, weight_decay=0.01)),
    "sgd_momentum": (optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd_dampening": (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3)),
    "sgd_nesterov_weight_decay": (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True,
                                                  weight_decay=0.01)),
    "sgd_maximize": (optim.SGD, dict(lr=0.1, momentum=0.8, maximize=True)),
    "momentum": (optim.Momentum, dict(lr=0.1, momentum=0.9)),
    "momentum_weight_decay_maximize": (optim.Momentum, dict(lr=0.1, momentum=0.8,
                                                            weight_decay=0.01, maximize=True)),
    "rmsprop": (optim.RMSprop, dict(lr=0.01)),
    "rmsprop_centered": (optim.RMSprop, dict(lr=0.01, centered=True)),
    "rmsprop_momentum": (optim.RMSprop, dict(lr=0.01, momentum=0.9)),
    "rmsprop_all_options": (optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True,
                                                weight_decay=0.01, maximize=True)),
    "adam": (optim.Adam, dict(lr=0.01)),
    "adam_amsgrad": (optim.Adam, dict(lr=0.01, amsgrad=True)),
    "adam_weight_decay": (optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    "adam_maximize": (optim.Adam, dict(lr=0.01, maximize=True)),
    "adam_no_bias_correction": (optim.Adam, dict(lr=0.01, bias_correction=False)),
    "adam_all_options": (optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                          amsgrad=True, maximize=True)),
    "adamw": (optim.AdamW, dict(lr=0.01)),
    "adamw_amsgrad_maximize": (optim.AdamW, dict(lr=0.01, amsgrad=True, maximize=True,
                                                 weight_decay=0.1)),
    "adagrad": (optim.Adagrad, dict(lr=0.1)),
    "adagrad_lr_decay_weight_decay": (optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.01)),
    "adagrad_initial_accumulator_maximize": (optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1,
                                                                 maximize=True)),
    "lion": (optim.Lion, dict(lr=0.01)),
    "lion_weight_decay_maximize": (optim.Lion, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    "nadam": (optim.NAdam, dict(lr=0.01)),
    "nadam_weight_decay": (optim.NAdam, dict(lr=0.01, weight_decay=0.01)),
    "nadam_decoupled_maximize": (optim.NAdam, dict(lr=0.01, weight_decay=0.1, maximize=True,
                                                   decoupled_weight_decay=True, momentum_decay=0.01)),
    "radam": (optim.RAdam, dict(lr=0.01)),
    # beta2 = 0.9 makes rho_t > 5 from step 6: both branches in the 12 steps
    "radam_weight_decay_early_rectification": (optim.RAdam, dict(lr=0.01, betas=(0.9, 0.9),
                                                                 weight_decay=0.01)),
    "radam_decoupled_maximize": (optim.RAdam, dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1,
                                                   decoupled_weight_decay=True, maximize=True)),
    "adadelta": (optim.Adadelta, dict(lr=1.0)),
    "adadelta_weight_decay_maximize": (optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-5,
                                                            weight_decay=0.01, maximize=True)),
    "adamax": (optim.Adamax, dict(lr=0.01)),
    "adamax_weight_decay_maximize": (optim.Adamax, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                                        weight_decay=0.1, maximize=True)),
}

STEPS = 12


def make_params(shapes: Sequence[tuple], dtype, seed: int = 0) -> List[Parameter]:
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(shape).astype(dtype)) for shape in shapes]


def make_optimizer(case: str, params: List[Parameter]):
    """Two param groups: the first four params with a group-specific lr, the rest."""
    cls, kwargs = CASES[case]
    split = min(4, len(params) - 1) if len(params) > 1 else 1
    groups = [{"params": params[:split], "lr": kwargs["lr"] * 0.5}]
    if params[split:]:
        groups.append({"params": params[split:]})
    return cls(groups, **kwargs)


def change_hyperparameters(optimizer, step: int) -> None:
    """What a scheduler does between steps: lr and momentum-like values move."""
    if step == 4:
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
            if "betas" in group:
                beta1, beta2 = group["betas"]
                group["betas"] = (beta1 * 0.95, beta2)
            if group.get("momentum", 0) > 0:
                group["momentum"] *= 0.9
    if step == 8:
        optimizer.param_groups[0]["lr"] *= 3.0


def set_grads(params: List[Parameter], step: int, seed: int = 1) -> None:
    """Fresh gradients each step; param 0 gets none before step 3 (its state,
    and Adam's step counter, start late) and param 2 none on every third step."""
    rng = np.random.default_rng(seed * 1000 + step)
    for index, param in enumerate(params):
        grad = rng.standard_normal(param.shape).astype(param.dtype)
        if (index == 0 and step < 3) or (index == 2 and step % 3 == 1):
            param.grad = None
        else:
            param.grad = grad


def train(case: str, params: List[Parameter], steps: int = STEPS, optimizer=None,
          first_step: int = 0):
    optimizer = optimizer if optimizer is not None else make_optimizer(case, params)
    for step in range(first_step, first_step + steps):
        change_hyperparameters(optimizer, step)
        set_grads(params, step)
        optimizer.step()
    return optimizer


def snapshot(params: List[Parameter], optimizer) -> Dict[str, np.ndarray]:
    """Every parameter and every state entry, by name."""
    values = {f"param{i}": p.data.copy() for i, p in enumerate(params)}
    for i, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            values[f"param{i}.{key}"] = np.array(value, copy=True)
    return values


def tolerances(dtype) -> dict:
    return dict(rtol=2e-5, atol=2e-6) if np.dtype(dtype) == np.float32 else dict(rtol=1e-12, atol=1e-13)


def assert_snapshots_close(actual: Dict[str, np.ndarray], expected: Dict[str, np.ndarray], dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        np.testing.assert_allclose(actual[name], expected[name], err_msg=name, **tolerances(dtype))


def assert_snapshots_equal(actual: Dict[str, np.ndarray], expected: Dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def run_case(case: str, dtype, shapes=SHAPES, backend: str = "fast"):
    params = make_params(shapes, dtype)
    with fastbn.use_backend(backend):
        optimizer = train(case, params)
    return snapshot(params, optimizer)


def test_every_case_builds_and_every_param_trains():
    for case in CASES:
        params = make_params(SHAPES, np.float64)
        before = [p.data.copy() for p in params]
        with fastbn.use_backend("reference"):
            train(case, params, steps=4)
        assert all(not np.array_equal(b, p.data) for b, p in zip(before, params)), case
