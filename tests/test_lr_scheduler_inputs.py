"""fastbn.optim.lr_scheduler: optimizer lifetime, copies, call-order warnings,
learning rates given as 0-d arrays or tensors, legacy torch states, and
clear errors (issues 11 and 17)."""
import copy
import gc
import math
import pickle
import warnings
import weakref

import numpy as np
import pytest

from fastbn import schedules
from fastbn.optim import lr_scheduler as L

try:
    import torch
except ImportError:  # torch is optional: the tensor cases are skipped
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


class FakeOptimizer:
    """param_groups with 'lr' (and 'momentum'), and a step() method."""

    def __init__(self, lrs=(0.1,), momentum=0.9):
        self.defaults = {"lr": lrs[0], "momentum": momentum}
        self.param_groups = [{"params": [], "lr": lr, "momentum": momentum} for lr in lrs]
        self.steps = 0

    def step(self):
        self.steps += 1


def fastbn_adam(size=1000):
    fastbn = pytest.importorskip("fastbn")
    from fastbn.optim import Adam
    param = fastbn.Parameter(np.zeros(size, dtype=np.float32))
    param.grad = np.ones(size, dtype=np.float32)
    return Adam([param], lr=0.01)


def group_lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


# ---- 11.2: the scheduler does not keep its optimizer alive --------------------------------

SCHEDULER_BUILDERS = [
    ("StepLR", lambda o: L.StepLR(o, 3)),
    ("CosineAnnealingLR", lambda o: L.CosineAnnealingLR(o, 10)),
    ("OneCycleLR", lambda o: L.OneCycleLR(o, 0.1, total_steps=10)),
    ("CyclicLR", lambda o: L.CyclicLR(o, 0.001, 0.01, 4)),
    ("LambdaLR", lambda o: L.LambdaLR(o, lambda e: 0.9 ** e)),
]


@pytest.mark.parametrize("name, build", SCHEDULER_BUILDERS, ids=[b[0] for b in SCHEDULER_BUILDERS])
def test_optimizer_is_freed_without_the_cyclic_collector_once_unreferenced(name, build):
    gc.collect()
    gc.disable()
    try:
        optimizer = fastbn_adam()
        scheduler = build(optimizer)
        optimizer.step()
        scheduler.step()
        optimizer_ref = weakref.ref(optimizer)
        del optimizer, scheduler
        assert optimizer_ref() is None, "a reference cycle keeps the optimizer alive"
    finally:
        gc.enable()


def test_deepcopied_optimizer_steps_and_records_itself():
    optimizer = fastbn_adam(8)
    L.CosineAnnealingLR(optimizer, 10)
    clone = copy.deepcopy(optimizer)
    before = optimizer.param_groups[0]["params"][0].data.copy()
    clone.step()
    np.testing.assert_array_equal(optimizer.param_groups[0]["params"][0].data, before)
    assert not np.array_equal(clone.param_groups[0]["params"][0].data, before)
    assert getattr(clone, "_opt_called", False) and not getattr(optimizer, "_opt_called", False)


def test_deepcopied_scheduler_drives_its_own_copy_of_the_optimizer():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.CosineAnnealingLR(optimizer, 10)
    optimizer.step()
    scheduler.step()
    clone = copy.deepcopy(scheduler)
    assert clone.optimizer is not optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            clone.optimizer.step()
            clone.step()
    assert optimizer.steps == 1 and clone.optimizer.steps == 4
    assert group_lrs(optimizer) == [schedules.cosine(0.1, 10)(1)]
    assert group_lrs(clone.optimizer) == [schedules.cosine(0.1, 10)(4)]


def test_pickled_optimizer_keeps_a_working_step_wrapper():
    optimizer = FakeOptimizer([0.1])
    L.StepLR(optimizer, 3)
    clone = pickle.loads(pickle.dumps(optimizer))
    clone.step()
    assert clone.steps == 1 and clone._opt_called and optimizer.steps == 0


def test_step_wrapper_outliving_its_optimizer_raises_reference_error():
    optimizer = FakeOptimizer([0.1])
    L.StepLR(optimizer, 3)
    step = optimizer.step
    del optimizer
    gc.collect()
    with pytest.raises(ReferenceError, match="optimizer"):
        step()


# ---- call-order warnings, with a real fastbn optimizer -------------------------------------

HOW_TO = "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"


def test_scheduler_step_before_optimizer_step_warns_with_torch_guidance():
    optimizer = fastbn_adam(4)
    scheduler = L.StepLR(optimizer, 3)
    with pytest.warns(UserWarning, match=r"before `optimizer.step\(\)`") as record:
        scheduler.step()
    message = str(record[0].message)
    assert "opposite order" in message and "skipping the first value" in message and HOW_TO in message


def test_overridden_optimizer_step_warns_with_torch_guidance():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.StepLR(optimizer, 3)
    optimizer.step = FakeOptimizer([0.1]).step
    with pytest.warns(UserWarning, match="overridden") as record:
        scheduler.step()
    assert HOW_TO in str(record[0].message)


def test_no_call_order_warning_with_a_real_optimizer_stepped_first():
    optimizer = fastbn_adam(4)
    scheduler = L.CosineAnnealingLR(optimizer, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.step()
            scheduler.step()


# ---- 11 should-fix: learning rates as 0-d arrays and tensors ---------------------------------

def zero_d_values(value):
    """The same learning rate as a float, numpy scalar, 0-d array, 1-element array (and tensors)."""
    values = [value, np.float64(value), np.array(value), np.array([value])]
    if torch is not None:
        values += [torch.tensor(value, dtype=torch.float64), torch.tensor([value], dtype=torch.float64)]
    return values


def run_lrs(optimizer, scheduler, num_steps=12):
    lrs = [group_lrs(optimizer)]
    for _ in range(num_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(group_lrs(optimizer))
    return lrs


@pytest.mark.parametrize("build", [
    lambda o, v: L.CyclicLR(o, base_lr=v, max_lr=[v * 10, 0.5], step_size_up=3),
    lambda o, v: L.CyclicLR(o, 0.001, 0.01, 3, base_momentum=v * 8, max_momentum=[v * 9, 0.95]),
    lambda o, v: L.OneCycleLR(o, max_lr=[v, 0.2], total_steps=12),
    lambda o, v: L.CosineAnnealingLR(o, 5, eta_min=v / 10),
    lambda o, v: L.CosineAnnealingWarmRestarts(o, 3, 2, eta_min=v / 10),
    lambda o, v: L.ExponentialLR(o, gamma=v * 9),
    lambda o, v: L.ReduceLROnPlateau(o, min_lr=v),
], ids=["CyclicLR_lr", "CyclicLR_momentum", "OneCycleLR", "CosineAnnealingLR", "WarmRestarts",
        "ExponentialLR", "ReduceLROnPlateau"])
def test_hyperparameters_accept_one_element_arrays_and_tensors_as_floats(build):
    def lrs_with(value):
        optimizer = FakeOptimizer([0.1, 0.05])
        scheduler = build(optimizer, value)
        if isinstance(scheduler, L.ReduceLROnPlateau):
            lrs = []
            for _ in range(30):
                scheduler.step(1.0)
                lrs.append(group_lrs(optimizer))
            return lrs
        return run_lrs(optimizer, scheduler)

    expected = lrs_with(0.1)
    for value in zero_d_values(0.1)[1:]:
        lrs = lrs_with(value)
        assert lrs == expected
        assert all(type(lr) is float for row in lrs for lr in row)


@pytest.mark.parametrize("lr", zero_d_values(0.1)[1:], ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("build", [
    lambda o: L.StepLR(o, 2, 0.5),
    lambda o: L.CosineAnnealingLR(o, 6),
    lambda o: L.LambdaLR(o, lambda e: 1 / (1 + e)),
    lambda o: L.MultiplicativeLR(o, lambda e: 0.9),
], ids=["StepLR", "CosineAnnealingLR", "LambdaLR", "MultiplicativeLR"])
def test_group_lr_given_as_array_or_tensor_is_read_as_a_float(build, lr):
    expected_optimizer = FakeOptimizer([0.1])
    expected = run_lrs(expected_optimizer, build(expected_optimizer))
    optimizer = FakeOptimizer([0.1])
    optimizer.param_groups[0]["lr"] = lr
    scheduler = build(optimizer)
    lrs = run_lrs(optimizer, scheduler)
    assert lrs == expected
    assert type(optimizer.param_groups[0]["initial_lr"]) is float
    assert all(type(value) is float for value in scheduler.base_lrs + scheduler.get_last_lr())


@needs_torch
def test_multiplicative_lr_with_tensor_factors_stores_floats():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.MultiplicativeLR(optimizer, lambda e: torch.tensor(0.9, dtype=torch.float64))
    for step in range(1, 6):
        optimizer.step()
        scheduler.step()
        assert type(optimizer.param_groups[0]["lr"]) is float
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** step, rel=1e-15)


@pytest.mark.parametrize("value, error, message", [
    (np.array([0.1, 0.2]), ValueError, r"max_lr: expected a real number or an array with one element, got ndarray of shape \(2,\)"),
    (np.array(True), TypeError, r"max_lr: expected a real number"),
    (np.array(1 + 2j), TypeError, r"max_lr: expected a real number"),
    (np.array(np.inf), ValueError, r"max_lr: expected a finite real number, got inf"),
    ("0.1", TypeError, r"max_lr: expected a real number, got str"),
])
def test_bad_array_learning_rates_are_rejected_naming_the_argument(value, error, message):
    optimizer = FakeOptimizer([0.1])
    before = copy.deepcopy(optimizer.param_groups)
    with pytest.raises(error, match=message):
        L.OneCycleLR(optimizer, max_lr=value, total_steps=10)
    assert optimizer.param_groups == before


@needs_torch
def test_bad_tensor_learning_rates_are_rejected_naming_the_argument():
    with pytest.raises(ValueError, match=r"base_lr: expected .* one element, got Tensor of shape \(3,\)"):
        L.CyclicLR(FakeOptimizer([0.1]), torch.ones(3), 0.1)
    with pytest.raises(TypeError, match=r"eta_min: expected a real number, got Tensor of dtype torch.bool"):
        L.CosineAnnealingLR(FakeOptimizer([0.1]), 10, eta_min=torch.tensor(True))


def test_bad_group_lr_raises_and_leaves_the_optimizer_unchanged():
    optimizer = FakeOptimizer([0.1, 0.2])
    bad_lr = np.ones(2)
    optimizer.param_groups[1]["lr"] = bad_lr
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]: expected a real number or an array"):
        L.StepLR(optimizer, 3)
    assert [sorted(group) for group in optimizer.param_groups] == [["lr", "momentum", "params"]] * 2
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.param_groups[1]["lr"] is bad_lr
    assert "step" not in vars(optimizer)


# ---- 11 should-fix: OneCycleLR state saved by torch with the legacy 'anneal_func' key --------

def torch_one_cycle_legacy_state(strategy):
    """A torch OneCycleLR state as older torch versions saved it: the annealing
    function under 'anneal_func', no '_anneal_func_type'."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.5, total_steps=20, anneal_strategy=strategy)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    del scheduler._anneal_func_type
    state = scheduler.state_dict()
    state["anneal_func"] = getattr(torch.optim.lr_scheduler.OneCycleLR, f"_annealing_{strategy}")
    following = []
    scheduler._anneal_func_type = strategy
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        following.append(optimizer.param_groups[0]["lr"])
    return state, optimizer.state_dict(), following


@needs_torch
@pytest.mark.parametrize("strategy, other", [("cos", "linear"), ("linear", "cos")])
def test_one_cycle_loads_torch_legacy_anneal_func_state(strategy, other):
    state, _, torch_following = torch_one_cycle_legacy_state(strategy)
    assert "anneal_func" in state and "_anneal_func_type" not in state
    optimizer = FakeOptimizer([0.1])
    # Built with the other strategy: the loaded state must decide.
    scheduler = L.OneCycleLR(optimizer, 0.5, total_steps=20, anneal_strategy=other)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    scheduler.load_state_dict(state)
    assert scheduler._anneal_func_type == strategy
    assert "anneal_func" not in vars(scheduler)
    following = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        following.append(optimizer.param_groups[0]["lr"])
    np.testing.assert_allclose(following, torch_following, rtol=1e-12)


def test_one_cycle_legacy_anneal_func_is_mapped_by_name_and_unknown_ones_refused():
    def _annealing_linear(start, end, pct):
        return (end - start) * pct + start

    optimizer = FakeOptimizer([0.1])
    scheduler = L.OneCycleLR(optimizer, 0.5, total_steps=20)
    state = scheduler.state_dict()
    del state["_anneal_func_type"]
    state["anneal_func"] = _annealing_linear
    scheduler.load_state_dict(state)
    assert scheduler._anneal_func_type == "linear"
    state["anneal_func"] = lambda start, end, pct: start
    before = scheduler.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['anneal_func'\]: expected PyTorch's"):
        scheduler.load_state_dict(state)
    assert scheduler.state_dict() == before


# ---- 17 small: clear errors for non-finite periods, huge steps and bad user functions ----------

@pytest.mark.parametrize("build, message", [
    (lambda: schedules.cosine(math.inf, 10), r"init_lr: expected a finite real number, got inf"),
    (lambda: schedules.cosine(0.1, math.inf), r"T_max: expected a finite real number, got inf"),
    (lambda: schedules.cyclical(0.1, 1.0, step_size_up=math.inf), r"step_size_up: expected a finite"),
    (lambda: schedules.cyclical(0.1, 1.0, 10, step_size_down=math.inf), r"step_size_down: expected a finite"),
    (lambda: schedules.cyclical(0.1, math.inf), r"max_lr: expected a finite"),
    (lambda: schedules.step_decay(0.1, math.inf), r"step_size: expected a finite"),
    (lambda: schedules.linear(0.1, total_iters=-math.inf), r"total_iters: expected a finite"),
    (lambda: schedules.exponential_decay(0.1, math.inf), r"decay_rate: expected a finite"),
    (lambda: L.CosineAnnealingLR(FakeOptimizer(), math.inf), r"T_max: expected a finite"),
    (lambda: L.CyclicLR(FakeOptimizer(), 0.01, 0.1, step_size_up=math.inf), r"step_size_up: expected a finite"),
])
def test_non_finite_periods_and_rates_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_cyclic_lr_with_an_infinite_period_leaves_the_optimizer_unchanged():
    optimizer = FakeOptimizer([0.1])
    before = copy.deepcopy(optimizer.param_groups)
    with pytest.raises(ValueError, match="step_size_down"):
        L.CyclicLR(optimizer, 0.01, 0.1, 3, step_size_down=math.inf)
    assert optimizer.param_groups == before


@pytest.mark.parametrize("step", [2 ** 53 + 3, 2 ** 53 + 1, np.int64(2 ** 53 + 1), np.uint64(2 ** 64 - 1),
                                  2.0 ** 60, 10 ** 400])
def test_steps_beyond_2_to_the_53_are_rejected_by_call_and_at(step):
    schedule = schedules.cosine(0.1, 10)
    for evaluate in (schedule, schedule.at):
        with pytest.raises(ValueError, match=r"step: expected steps <= 2\*\*53"):
            evaluate(step)
    with pytest.raises(ValueError, match=r"step: expected steps <= 2\*\*53"):
        schedule(np.array([0, 2 ** 53 + 1], dtype=np.int64))


def test_step_2_to_the_53_itself_gives_the_same_value_from_call_and_at():
    for schedule in (schedules.cosine(0.1, 10), schedules.exponential_decay(0.1, 0.9999999),
                     schedules.cosine_warm_restarts(0.1, 3, 2)):
        assert schedule.at(2 ** 53) == schedule(2 ** 53) == schedule(float(2 ** 53))
        assert schedule.at(2 ** 53 - 5) == schedule(2 ** 53 - 5)


def test_warm_restarts_epoch_beyond_2_to_the_53_is_rejected():
    scheduler = L.CosineAnnealingWarmRestarts(FakeOptimizer(), 3)
    with pytest.raises(ValueError, match=r"epoch: expected a value <= 2\*\*53"):
        scheduler.step(2.0 ** 54)


@pytest.mark.parametrize("build, name", [
    (lambda: schedules.cosine_warm_restarts(0.1, 2, 10 ** 400), "T_mult"),
    (lambda: schedules.cosine_warm_restarts(0.1, 10 ** 400), "T_0"),
    (lambda: schedules.warm_restart_position(5, 2, 10 ** 400), "T_mult"),
    (lambda: L.CosineAnnealingWarmRestarts(FakeOptimizer(), 2, T_mult=10 ** 400), "T_mult"),
    (lambda: schedules.one_cycle(0.1, 10 ** 400), "total_steps"),
    (lambda: schedules.multistep(0.1, [3, 10 ** 400]), r"milestones\[1\]"),
])
def test_huge_integer_arguments_get_a_clear_message(build, name):
    with pytest.raises(ValueError, match=name + r": expected an int <= 2\*\*53 = 9007199254740992 .* got about 2\*\*1328"):
        build()


@pytest.mark.parametrize("bad", ["0.5", None, [0.5], math.nan])
def test_lr_lambda_returning_a_non_number_names_the_function_and_step(bad):
    error = ValueError if isinstance(bad, float) else TypeError
    message = r"the value returned by lr_lambda\(0\): expected a"
    with pytest.raises(error, match=message):
        schedules.lambda_schedule(0.1, lambda e: bad)(0)
    optimizer = FakeOptimizer([0.1])
    before = copy.deepcopy(optimizer.param_groups)
    with pytest.raises(error, match=message):
        L.LambdaLR(optimizer, lambda e: bad)
    assert optimizer.param_groups == before and "step" not in vars(optimizer)
    scheduler = L.MultiplicativeLR(optimizer, lambda e: bad)
    optimizer.step()
    with pytest.raises(error, match=r"the value returned by lr_lambda\(1\): expected a"):
        scheduler.step()
    with pytest.raises(error, match=r"the value returned by lr_lambda\(1\)"):
        schedules.multiplicative(0.1, lambda e: bad)(3)


def test_scale_fn_returning_a_string_names_scale_fn():
    with pytest.raises(TypeError, match=r"the value returned by scale_fn\(1\): expected a real number, got str"):
        schedules.cyclical(0.01, 0.1, 4, scale_fn=lambda x: "1")(2)
