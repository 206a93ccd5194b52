"""The Optimizer interface: param groups, validation, state_dict, zero_grad,
closures, error messages (both backends)."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import fastbn
from fastbn import optim
from fastbn.parameter import Parameter

from test_optim_cases import (CASES, DTYPES, SHAPES, assert_snapshots_equal, make_optimizer,
                              make_params, set_grads, snapshot, train)

BACKENDS = ["fast", "reference"]


# section: construction and validation ---------------------------------------

@pytest.mark.parametrize("cls, kwargs, message", [
    (optim.SGD, dict(lr=-0.1), "lr: expected a value >= 0, got -0.1"),
    (optim.SGD, dict(momentum=-1.0), "momentum: expected a value >= 0, got -1.0"),
    (optim.SGD, dict(weight_decay=-1e-4), "weight_decay: expected a value >= 0"),
    (optim.SGD, dict(nesterov=True), "nesterov: Nesterov momentum expects momentum > 0 and dampening == 0"),
    (optim.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "got momentum=0.9, dampening=0.1"),
    (optim.Momentum, dict(momentum=1.0), "momentum: expected a value in [0.0, 1.0), got 1.0"),
    (optim.RMSprop, dict(eps=-1e-8), "eps: expected a value >= 0"),
    (optim.RMSprop, dict(alpha=-0.5), "alpha: expected a value >= 0"),
    (optim.Adam, dict(betas=(1.0, 0.999)), "betas[0]: expected a value in [0.0, 1.0), got 1.0"),
    (optim.Adam, dict(betas=(0.9, -0.1)), "betas[1]: expected a value in [0.0, 1.0), got -0.1"),
    (optim.Adam, dict(lr=float("nan")), "lr: expected a number, got nan"),
    (optim.AdamW, dict(weight_decay=-0.01), "weight_decay: expected a value >= 0"),
    (optim.Adagrad, dict(lr_decay=-1.0), "lr_decay: expected a value >= 0"),
    (optim.Adagrad, dict(initial_accumulator_value=-1.0), "initial_accumulator_value: expected a value >= 0"),
    (optim.Lion, dict(betas=(0.9, 1.5)), "betas[1]: expected a value in [0.0, 1.0), got 1.5"),
])
def test_invalid_hyperparameter_raises_value_error_naming_it(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(make_params([(3,)], np.float32), **kwargs)
    assert message in str(info.value)


def test_hyperparameter_of_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match=r"amsgrad: expected a bool, got str"):
        optim.Adam(make_params([(3,)], np.float32), amsgrad="yes")
    with pytest.raises(TypeError, match=r"betas: expected a pair"):
        optim.Adam(make_params([(3,)], np.float32), betas=0.9)
    with pytest.raises(TypeError, match=r"lr: expected a real number"):
        optim.SGD(make_params([(3,)], np.float32), lr="0.1")


def test_invalid_group_hyperparameter_names_the_group():
    params = make_params([(3,), (4,)], np.float32)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]: expected a value >= 0, got -1.0"):
        optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": -1.0}])


def test_hyperparameter_made_invalid_later_is_caught_at_step():
    params = make_params([(3,)], np.float32)
    params[0].grad = np.ones(3, np.float32)
    opt = optim.Adam(params)
    opt.param_groups[0]["betas"] = (0.9, 1.0)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\]\[1\]"):
        opt.step()


@pytest.mark.parametrize("params, error, message", [
    ([], ValueError, "params: expected at least one Parameter, got an empty list"),
    (Parameter(np.zeros(3)), TypeError, "params: expected an iterable"),
    ([np.zeros(3)], TypeError, r"param_groups\[0\]\['params'\]\[0\]: expected a fastbn.Parameter, got ndarray"),
    ([{"lr": 0.1}], ValueError, r"param_groups\[0\]: expected a 'params' entry"),
])
def test_bad_params_argument_is_rejected(params, error, message):
    with pytest.raises(error, match=message):
        optim.SGD(params)


def test_parameter_in_two_groups_or_twice_in_one_is_rejected():
    a, b = make_params([(3,), (3,)], np.float32)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": [a]}, {"params": [a, b]}])
    with pytest.raises(ValueError, match="appears more than once in the group"):
        optim.SGD([a, b, a])
    with pytest.raises(TypeError, match="set"):
        optim.SGD([{"params": {a, b}}])


def test_groups_take_defaults_and_keep_their_overrides():
    a, b = make_params([(3,), (3,)], np.float32)
    opt = optim.Adam([{"params": [a]}, {"params": b, "lr": 0.5, "amsgrad": True}], lr=0.01)
    assert opt.defaults == dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                amsgrad=False, maximize=False, bias_correction=True,
                                decoupled_weight_decay=False)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["params"] == [a]
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["amsgrad"] is True
    assert opt.param_groups[1]["params"] == [b]


def test_add_param_group_after_construction_trains_the_new_group():
    a, b = make_params([(3,), (5,)], np.float32)
    opt = optim.SGD([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 1.0})
    b.grad = np.ones(5, np.float32)
    before = b.data.copy()
    opt.step()
    np.testing.assert_array_equal(b.data, before - np.float32(1.0))


@pytest.mark.parametrize("defaults, expected", [
    (dict(cls=optim.SGD), dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                nesterov=False, maximize=False)),
    (dict(cls=optim.Momentum), dict(lr=1e-3, momentum=0.9, weight_decay=0.0, maximize=False)),
    (dict(cls=optim.RMSprop), dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                                    centered=False, maximize=False)),
    (dict(cls=optim.AdamW), dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                  amsgrad=False, maximize=False, bias_correction=True,
                                  decoupled_weight_decay=True)),
    (dict(cls=optim.Adagrad), dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                                    initial_accumulator_value=0.0, eps=1e-10, maximize=False)),
    (dict(cls=optim.Lion), dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)),
])
def test_defaults_follow_pytorch(defaults, expected):
    assert defaults["cls"](make_params([(2,)], np.float32)).defaults == expected


# section: step, gradients, closure -------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_params_without_grad_are_untouched_and_get_no_state(case, backend):
    params = make_params(SHAPES, np.float32)
    opt = make_optimizer(case, params)
    set_grads(params, 0)
    params[3].grad = None
    before = params[3].data.copy()
    grads = [None if p.grad is None else p.grad.copy() for p in params]
    with fastbn.use_backend(backend):
        opt.step()
    np.testing.assert_array_equal(params[3].data, before)
    if CASES[case][0] is optim.Adagrad:  # PyTorch's Adagrad creates its state up front
        assert opt.state[params[3]]["step"] == 0
    else:
        assert not opt.state.get(params[3])
    for param, grad in zip(params, grads):  # gradients are never modified
        if grad is not None:
            np.testing.assert_array_equal(param.grad, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_with_wrong_shape_or_dtype_names_the_parameter(backend):
    a, b, c = make_params([(3,), (4, 5), (6,)], np.float32)
    opt = optim.Adam([{"params": [a]}, {"params": [b, c]}])
    a.grad = np.ones(3, np.float32)
    b.grad = np.ones((5, 4), np.float32)
    with fastbn.use_backend(backend), pytest.raises(
            ValueError, match=r"param_groups\[1\]\['params'\]\[0\]\.grad: expected shape \(4, 5\) "
                              r"\(the shape of the parameter\), got \(5, 4\)"):
        opt.step()
    b.grad = np.ones((4, 5), np.float32)
    c.grad = np.ones(6, np.float64)
    with fastbn.use_backend(backend), pytest.raises(
            TypeError, match=r"param_groups\[1\]\['params'\]\[1\]\.grad: expected dtype float32 "
                             r"\(the dtype of the parameter\), got float64"):
        opt.step()
    c.grad = [1.0] * 6
    with fastbn.use_backend(backend), pytest.raises(TypeError, match=r"\[1\]\.grad: expected a numpy.ndarray"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_or_read_only_param_data_is_rejected(backend):
    (a,) = make_params([(4, 6)], np.float32)
    opt = optim.SGD([a], lr=0.1)
    a.data = np.zeros((6, 4), np.float32).T
    a.grad = np.ones((4, 6), np.float32)
    with fastbn.use_backend(backend), pytest.raises(ValueError, match=r"\.data: expected a C-contiguous array"):
        opt.step()
    a.data = np.zeros((4, 6), np.float32)
    a.data.flags.writeable = False
    with fastbn.use_backend(backend), pytest.raises(ValueError, match=r"\.data: expected a writeable array"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grad_gives_the_same_update(backend):
    a, b = make_params([(4, 6), (4, 6)], np.float32)
    b.data[...] = a.data
    grad = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    a.grad, b.grad = grad.T, np.ascontiguousarray(grad.T)
    opt = optim.Adam([a, b], lr=0.1)
    with fastbn.use_backend(backend):
        opt.step()
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_group_update_each_in_its_dtype(backend):
    a, = make_params([(9,)], np.float32)
    b, = make_params([(9,)], np.float64)
    a.grad, b.grad = np.ones(9, np.float32), np.ones(9, np.float64)
    opt = optim.Adam([a, b], lr=0.1)
    with fastbn.use_backend(backend):
        opt.step()
    assert a.data.dtype == np.float32 and b.data.dtype == np.float64
    assert opt.state[a]["exp_avg"].dtype == np.float32 and opt.state[b]["exp_avg"].dtype == np.float64
    np.testing.assert_allclose(opt.state[b]["exp_avg"], 0.1)


def test_step_calls_the_closure_first_and_returns_its_value():
    (a,) = make_params([(3,)], np.float32)
    opt = optim.SGD([a], lr=1.0)
    calls = []

    def closure():
        calls.append(a.data.copy())
        a.grad = np.ones(3, np.float32)
        return 42.0

    assert opt.step(closure) == 42.0
    np.testing.assert_array_equal(calls[0] - 1.0, a.data)
    assert opt.step() is None


def test_zero_grad_sets_none_or_zeros():
    a, b = make_params([(3,), (4,)], np.float32)
    opt = optim.SGD([a, b])
    a.grad, b.grad = np.ones(3, np.float32), np.ones(4, np.float32)
    grad = b.grad
    opt.zero_grad(set_to_none=False)
    assert grad is b.grad and not b.grad.any() and not a.grad.any()
    opt.zero_grad()
    assert a.grad is None and b.grad is None


# section: textbook Momentum -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_equals_sgd_with_lr_times_one_minus_beta(dtype):
    beta, lr = 0.9, 0.1
    params, twins = make_params(SHAPES, dtype), make_params(SHAPES, dtype)
    momentum = optim.Momentum(params, lr=lr, momentum=beta)
    sgd = optim.SGD(twins, lr=lr * (1 - beta), momentum=beta)
    for step in range(12):
        set_grads(params, step)
        set_grads(twins, step)
        momentum.step()
        sgd.step()
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for param, twin in zip(params, twins):
        np.testing.assert_allclose(param.data, twin.data, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(momentum.state[param]["momentum_buffer"],
                                   (1 - beta) * sgd.state[twin]["momentum_buffer"], rtol=rtol, atol=rtol)


def test_momentum_first_buffer_differs_from_sgd_with_dampening_beta():
    beta = 0.9
    (a,) = make_params([(5,)], np.float64)
    (b,) = make_params([(5,)], np.float64)
    grad = np.arange(1.0, 6.0)
    a.grad, b.grad = grad.copy(), grad.copy()
    momentum = optim.Momentum([a], lr=0.1, momentum=beta)
    dampened = optim.SGD([b], lr=0.1, momentum=beta, dampening=beta)
    momentum.step()
    dampened.step()
    np.testing.assert_allclose(momentum.state[a]["momentum_buffer"], (1 - beta) * grad)
    np.testing.assert_array_equal(dampened.state[b]["momentum_buffer"], grad)  # first step: b = g


# section: state dict -------------------------------------------------------------

def test_state_dict_has_pytorch_layout_and_key_names():
    params = make_params([(3,), (4,), (5,)], np.float32)
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], amsgrad=True)
    params[0].grad = np.ones(3, np.float32)
    params[2].grad = np.ones(5, np.float32)
    opt.step()
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups"}
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2]]
    assert saved["param_groups"][1]["lr"] == 0.5
    assert set(saved["state"]) == {0, 2}
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert saved["state"][0]["step"] == 1
    assert saved["state"][0]["exp_avg"] is not opt.state[params[0]]["exp_avg"]  # a copy


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip_then_training_equals_uninterrupted_bit_for_bit(case, dtype):
    params = make_params(SHAPES, dtype)
    uninterrupted = train(case, params, steps=12)
    expected = snapshot(params, uninterrupted)

    params = make_params(SHAPES, dtype)
    first = train(case, params, steps=6)
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    saved_params = [p.data.copy() for p in params]
    first.step()  # training on must not change what was saved
    resumed_params = make_params(SHAPES, dtype)
    for param, value in zip(resumed_params, saved_params):
        param.data[...] = value
    resumed = make_optimizer(case, resumed_params)
    resumed.load_state_dict(saved)
    train(case, resumed_params, steps=6, optimizer=resumed, first_step=6)
    assert_snapshots_equal(snapshot(resumed_params, resumed), expected)


def test_load_state_dict_rejects_mismatched_groups_and_shapes():
    a, b = make_params([(3,), (4,)], np.float32)
    opt = optim.Adam([a, b])
    a.grad = np.ones(3, np.float32)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=r"expected 1 parameters \(as this optimizer.s group 0 has\), got 2"):
        optim.Adam([a]).load_state_dict(saved)
    with pytest.raises(ValueError, match="expected 2 parameter groups"):
        optim.Adam([{"params": [a]}, {"params": [b]}]).load_state_dict(saved)
    c, d = make_params([(5,), (4,)], np.float32)
    with pytest.raises(ValueError, match=r"\['exp_avg'\]: expected shape \(5,\)"):
        optim.Adam([c, d]).load_state_dict(saved)
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})


def test_load_state_dict_refuses_state_of_another_precision_and_changes_nothing():
    a, = make_params([(3,)], np.float32)
    opt = optim.Adam([a], lr=0.1)
    saved = {"state": {0: {"step": 3, "exp_avg": np.ones(3), "exp_avg_sq": np.ones(3, np.float32)}},
             "param_groups": [{"lr": 0.25, "params": [0]}]}
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\]: expected dtype "
                                        r"float32 \(the parameter's; fastbn never casts state\), got float64"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.1 and len(opt.state) == 0


def test_load_state_dict_normalizes_step_and_byte_order_and_restores_hyperparameters():
    a, = make_params([(3,)], np.float32)
    opt = optim.Adam([a], lr=0.1)
    swapped = np.array([1.0, 2.0, 3.0], ">f4")
    saved = {"state": {0: {"step": np.float32(3.0), "exp_avg": swapped,
                           "exp_avg_sq": np.ones(3, np.float32)}},
             "param_groups": [{"lr": 0.25, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0,
                               "amsgrad": False, "params": [0]}]}
    opt.load_state_dict(saved)
    state = opt.state[a]
    assert state["step"] == 3 and type(state["step"]) is int
    assert state["exp_avg"].dtype == np.dtype("=f4") and state["exp_avg"].flags.c_contiguous
    np.testing.assert_array_equal(state["exp_avg"], [1.0, 2.0, 3.0])
    assert state["exp_avg"] is not swapped and state["exp_avg_sq"] is not saved["state"][0]["exp_avg_sq"]
    group = opt.param_groups[0]
    assert group["lr"] == 0.25 and group["betas"] == (0.5, 0.9) and group["params"] == [a]
    assert group["bias_correction"] is True  # missing keys take the defaults


def test_repr_lists_each_group():
    opt = optim.SGD(make_params([(3,)], np.float32), lr=0.5)
    text = repr(opt)
    assert text.startswith("SGD (") and "Parameter Group 0" in text and "lr: 0.5" in text


def test_nadam_mu_product_is_a_checked_float_in_the_state():
    params = make_params(SHAPES, np.float64)
    opt = make_optimizer("nadam", params)
    train("nadam", params, steps=3, optimizer=opt)
    saved = opt.state_dict()
    assert all(isinstance(entry["mu_product"], float) and 0 < entry["mu_product"] < 1
               for entry in saved["state"].values())
    bad = copy.deepcopy(saved)
    bad["state"][1]["mu_product"] = 1.5
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[1\]\['mu_product'\]: expected a float in \[0, 1\], got 1.5"):
        opt.load_state_dict(bad)
    bad["state"][1]["mu_product"] = "0.5"
    with pytest.raises(TypeError, match=r"\['mu_product'\]: expected a float in \[0, 1\]"):
        opt.load_state_dict(bad)
    opt.state[params[1]]["mu_product"] = -0.1
    before = {key: np.array(value, copy=True) for key, value in opt.state[params[3]].items()}
    with pytest.raises(ValueError, match=r"optimizer state 'mu_product' of param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    for key, value in opt.state[params[3]].items():
        np.testing.assert_array_equal(value, before[key])
