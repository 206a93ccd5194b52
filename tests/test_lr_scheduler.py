"""fastbn.optim.lr_scheduler: PyTorch's scheduler classes.

Oracles: the SEMANTICS.md vectors, independent closed forms written here,
fastbn.schedules (the classes must equal the pure functions step by step),
and torch.optim.lr_scheduler over long runs when torch is installed.
"""
import copy
import math
import pickle
import warnings

import numpy as np
import pytest

from fastbn import schedules
from fastbn.optim import lr_scheduler as L


class FakeOptimizer:
    """The duck-typed interface a scheduler drives: param_groups with 'lr'
    (plus 'momentum' or 'betas'), defaults, and a step() method."""

    def __init__(self, lrs=(0.1,), momentum=None, betas=None):
        extra = {}
        if momentum is not None:
            extra["momentum"] = momentum
        if betas is not None:
            extra["betas"] = tuple(betas)
        self.defaults = {"lr": lrs[0], **extra}
        self.param_groups = [{"params": [], "lr": lr, **extra} for lr in lrs]
        self.steps = 0

    def step(self):
        self.steps += 1


def group_lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


def group_momenta(optimizer):
    return [group["betas"][0] if "betas" in group else group.get("momentum")
            for group in optimizer.param_groups]


def run(optimizer, scheduler, num_steps):
    """lrs and momenta after construction and after each of `num_steps` steps."""
    lrs, momenta = [group_lrs(optimizer)], [group_momenta(optimizer)]
    for _ in range(num_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(group_lrs(optimizer))
        momenta.append(group_momenta(optimizer))
    return np.array(lrs, dtype=float), np.array(momenta, dtype=float)


def run_lrs(build, num_steps, lrs=(0.1,), **optimizer_kwargs):
    optimizer = FakeOptimizer(lrs, **optimizer_kwargs)
    return run(optimizer, build(optimizer), num_steps)[0]


# ---- SEMANTICS.md vectors (lr = 0.1; entry k = lr after k scheduler steps) ------------------

SEMANTICS_VECTORS = [
    ("CosineAnnealingLR", lambda o: L.CosineAnnealingLR(o, T_max=5, eta_min=0.01),
     [.1, .091406, .068906, .041094, .018594, .01, .018594]),
    ("CosineAnnealingWarmRestarts", lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
     [.1, .075, .025, .1, .093301, .075, .05, .025, .006699, .1]),
    ("LinearLR", lambda o: L.LinearLR(o), [.033333, .046667, .06, .073333, .086667, .1]),
    ("PolynomialLR", lambda o: L.PolynomialLR(o, total_iters=4, power=2), [.1, .05625, .025, .00625, 0]),
    ("CyclicLR", lambda o: L.CyclicLR(o, .01, .1, step_size_up=2, step_size_down=3),
     [.01, .055, .1, .07, .04, .01]),
    ("CyclicLR_triangular2", lambda o: L.CyclicLR(o, .01, .1, 2, mode="triangular2"),
     [.01, .055, .1, .055, .01, .0325, .055, .0325, .01, .02125]),
    ("CyclicLR_exp_range", lambda o: L.CyclicLR(o, .01, .1, 2, mode="exp_range", gamma=.9),
     [.01, .0505, .0829, .042805, .01, .036572]),
    ("OneCycleLR", lambda o: L.OneCycleLR(o, .1, total_steps=10),
     [.004, .052, .1, .095048, .081175, .061126, .038874, .018826, .004952, 4e-7]),
    ("SequentialLR", lambda o: L.SequentialLR(o, [L.LinearLR(o, .1, 1, 3), L.CosineAnnealingLR(o, 5)], [3]),
     [.01, .04, .07, .1, .090451, .065451, .034549, .009549, 0]),
]


@pytest.mark.parametrize("name, build, expected", SEMANTICS_VECTORS, ids=[v[0] for v in SEMANTICS_VECTORS])
def test_semantics_vector(name, build, expected):
    lrs = run_lrs(build, len(expected) - 1, momentum=0.9)[:, 0]
    np.testing.assert_allclose(lrs, expected, rtol=0, atol=6e-7)


def test_semantics_vector_reduce_lr_on_plateau():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.ReduceLROnPlateau(optimizer, patience=2, factor=0.5)
    lrs = [optimizer.param_groups[0]["lr"]]
    for metric in [1, .9] + [.95] * 6 + [.5]:
        scheduler.step(metric)
        lrs.append(optimizer.param_groups[0]["lr"])
    np.testing.assert_allclose(lrs, [.1, .1, .1, .1, .1, .05, .05, .05, .025, .025], rtol=1e-15)


# ---- long runs against independent closed forms ---------------------------------------------

N = 240
E = np.arange(N + 1)
BASES = (0.1, 0.035)


def closed(formula):
    return np.array([[formula(base, e) for base in BASES] for e in E])


CLOSED_FORMS = [
    ("LambdaLR", lambda o: L.LambdaLR(o, lambda e: 1 / (1 + 0.05 * e)),
     lambda b, e: b / (1 + 0.05 * e)),
    ("MultiplicativeLR", lambda o: L.MultiplicativeLR(o, lambda e: 0.99),
     lambda b, e: b * 0.99 ** e),
    ("StepLR", lambda o: L.StepLR(o, 30, 0.5), lambda b, e: b * 0.5 ** (e // 30)),
    ("MultiStepLR", lambda o: L.MultiStepLR(o, [20, 90, 90, 200], 0.3),
     lambda b, e: b * 0.3 ** sum(m <= e for m in [20, 90, 90, 200])),
    ("ConstantLR", lambda o: L.ConstantLR(o, 0.25, 40), lambda b, e: b * (0.25 if e < 40 else 1.0)),
    ("LinearLR", lambda o: L.LinearLR(o, 0.2, 0.9, 150), lambda b, e: b * (0.2 + 0.7 * min(e, 150) / 150)),
    ("ExponentialLR", lambda o: L.ExponentialLR(o, 0.98), lambda b, e: b * 0.98 ** e),
    ("PolynomialLR", lambda o: L.PolynomialLR(o, 180, 1.5), lambda b, e: b * (1 - min(e, 180) / 180) ** 1.5),
    ("CosineAnnealingLR", lambda o: L.CosineAnnealingLR(o, 70, 0.002),
     lambda b, e: 0.002 + (b - 0.002) * (1 + math.cos(math.pi * e / 70)) / 2),
    ("CosineAnnealingLR_eta_min_0", lambda o: L.CosineAnnealingLR(o, 40),
     lambda b, e: b * (1 + math.cos(math.pi * e / 40)) / 2),
    ("CosineAnnealingWarmRestarts", lambda o: L.CosineAnnealingWarmRestarts(o, 5, 3, 1e-4),
     None),  # cycles checked separately below
    ("SequentialLR", lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.1, 1.0, 20), L.ExponentialLR(o, 0.99),
                                                  L.ConstantLR(o, 0.5, 1000)], [20, 120]),
     lambda b, e: (b * (0.1 + 0.9 * e / 20) if e < 20 else
                   b * 0.99 ** (e - 20) if e < 120 else b * 0.5)),
    ("ChainedScheduler", lambda o: L.ChainedScheduler([L.ConstantLR(o, 0.5, 25), L.ExponentialLR(o, 0.99)]),
     lambda b, e: b * (0.5 if e < 25 else 1.0) * 0.99 ** e),
    ("ChainedScheduler_cosine_step", lambda o: L.ChainedScheduler([L.CosineAnnealingLR(o, 30, 0.001),
                                                                   L.StepLR(o, 50, 0.5)]),
     None),  # torch's recursive composition; checked against torch below
]


def warm_restarts_closed(b, e, T_0=5, T_mult=3, eta_min=1e-4):
    start, length = 0, T_0
    while e >= start + length:
        start, length = start + length, length * T_mult
    return eta_min + (b - eta_min) * (1 + math.cos(math.pi * (e - start) / length)) / 2


@pytest.mark.parametrize("name, build, formula", [c for c in CLOSED_FORMS if c[2] is not None],
                         ids=[c[0] for c in CLOSED_FORMS if c[2] is not None])
def test_long_run_matches_independent_closed_form(name, build, formula):
    lrs = run_lrs(build, N, BASES)
    np.testing.assert_allclose(lrs, closed(formula), rtol=1e-11, atol=1e-17)


def test_cosine_warm_restarts_long_run_matches_cycle_lengths():
    lrs = run_lrs(lambda o: L.CosineAnnealingWarmRestarts(o, 5, 3, 1e-4), N, BASES)
    np.testing.assert_allclose(lrs, closed(warm_restarts_closed), rtol=1e-11)
    restarts = [0, 5, 20, 65, 200]
    np.testing.assert_array_equal(lrs[restarts, 0], 0.1)


def cyclic_closed(base, peak, up, down, scale, e, by_cycle=True):
    total = up + down
    cycle = math.floor(1 + e / total)
    x = 1 + e / total - cycle
    position = x * total / up if x <= up / total else (1 - x) * total / down
    return base + (peak - base) * position * scale(cycle if by_cycle else e)


@pytest.mark.parametrize("mode, scale, by_cycle", [
    ("triangular", lambda c: 1.0, True),
    ("triangular2", lambda c: 0.5 ** (c - 1), True),
    ("exp_range", lambda e: 0.997 ** e, False),
])
def test_cyclic_lr_long_run_lr_and_momentum(mode, scale, by_cycle):
    optimizer = FakeOptimizer(BASES, momentum=0.5)
    scheduler = L.CyclicLR(optimizer, [0.01, 0.002], [0.1, 0.02], 17, 23, mode=mode, gamma=0.997)
    lrs, momenta = run(optimizer, scheduler, N)
    for column, (base, peak) in enumerate([(0.01, 0.1), (0.002, 0.02)]):
        expected = [cyclic_closed(base, peak, 17, 23, scale, e, by_cycle) for e in E]
        np.testing.assert_allclose(lrs[:, column], expected, rtol=1e-11)
        expected_momentum = [cyclic_closed(0.9, 0.8, 17, 23, scale, e, by_cycle) for e in E]
        np.testing.assert_allclose(momenta[:, column], expected_momentum, rtol=1e-11)


def test_cyclic_lr_custom_scale_fn_by_iterations():
    lrs = run_lrs(lambda o: L.CyclicLR(o, 0.01, 0.1, 10, scale_fn=lambda x: 1 / (1 + x / 50),
                                       scale_mode="iterations", cycle_momentum=False), N)
    expected = [cyclic_closed(0.01, 0.1, 10, 10, lambda x: 1 / (1 + x / 50), e, False) for e in E]
    np.testing.assert_allclose(lrs[:, 0], expected, rtol=1e-11)


def one_cycle_closed(e, total, pct, start, peak, end, three_phase=False, anneal="cos"):
    def interpolate(a, b, p):
        if anneal == "cos":
            return b + (a - b) * (1 + math.cos(math.pi * p)) / 2
        return a + (b - a) * p

    peak_step = pct * total - 1
    if e <= peak_step:
        return interpolate(start, peak, e / peak_step)
    if three_phase:
        back_step = 2 * pct * total - 2
        if e <= back_step:
            return interpolate(peak, start, (e - peak_step) / (back_step - peak_step))
        return interpolate(start, end, (e - back_step) / (total - 1 - back_step))
    return interpolate(peak, end, (e - peak_step) / (total - 1 - peak_step))


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_long_run_lr_and_momentum(anneal, three_phase):
    total = 300
    optimizer = FakeOptimizer(BASES, momentum=0.9)
    scheduler = L.OneCycleLR(optimizer, [1.0, 0.2], total, anneal_strategy=anneal, three_phase=three_phase)
    lrs, momenta = run(optimizer, scheduler, total - 1)
    steps = range(total)
    for column, peak in enumerate([1.0, 0.2]):
        expected = [one_cycle_closed(e, total, 0.3, peak / 25, peak, peak / 25e4, three_phase, anneal)
                    for e in steps]
        np.testing.assert_allclose(lrs[:, column], expected, rtol=1e-11)
    expected_momentum = [one_cycle_closed(e, total, 0.3, 0.95, 0.85, 0.95, three_phase, anneal) for e in steps]
    np.testing.assert_allclose(momenta[:, 0], expected_momentum, rtol=1e-11)
    assert lrs[89, 0] == pytest.approx(1.0) and momenta[89, 0] == pytest.approx(0.85)


def test_one_cycle_from_epochs_and_steps_per_epoch():
    optimizer = FakeOptimizer(momentum=0.9)
    scheduler = L.OneCycleLR(optimizer, 0.1, epochs=4, steps_per_epoch=25)
    assert scheduler.total_steps == 100


# ---- the classes equal the pure functions step by step -----------------------------------------

PURE_EQUIVALENTS = [
    (lambda o: L.LambdaLR(o, lambda e: 0.9 ** e), lambda b: schedules.lambda_schedule(b, lambda e: 0.9 ** e)),
    (lambda o: L.MultiplicativeLR(o, lambda e: 0.95), lambda b: schedules.multiplicative(b, lambda e: 0.95)),
    (lambda o: L.StepLR(o, 13, 0.7), lambda b: schedules.step_decay(b, 13, 0.7)),
    (lambda o: L.MultiStepLR(o, [5, 50, 50]), lambda b: schedules.multistep(b, [5, 50, 50])),
    (lambda o: L.ConstantLR(o, 0.1, 33), lambda b: schedules.constant_warmup(b, 0.1, 33)),
    (lambda o: L.LinearLR(o, 0.05, 0.5, 77), lambda b: schedules.linear(b, 0.05, 0.5, 77)),
    (lambda o: L.ExponentialLR(o, 0.97), lambda b: schedules.exponential_decay(b, 0.97)),
    (lambda o: L.PolynomialLR(o, 100, 2.0), lambda b: schedules.polynomial(b, 100, 2.0)),
    (lambda o: L.CosineAnnealingLR(o, 33, 0.003), lambda b: schedules.cosine(b, 33, 0.003)),
    (lambda o: L.CosineAnnealingWarmRestarts(o, 4, 2, 0.001), lambda b: schedules.cosine_warm_restarts(b, 4, 2, 0.001)),
    (lambda o: L.CyclicLR(o, 0.01, 0.1, 9, 4, "triangular2", cycle_momentum=False),
     lambda b: schedules.cyclical(0.01, 0.1, 9, 4, "triangular2")),
    (lambda o: L.OneCycleLR(o, 0.3, N + 1, cycle_momentum=False), lambda b: schedules.one_cycle(0.3, N + 1)),
    (lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.2, 1.0, 30), L.CosineAnnealingLR(o, 100, 1e-3)], [30]),
     lambda b: schedules.join([schedules.linear(b, 0.2, 1.0, 30), schedules.cosine(b, 100, 1e-3)], [30])),
]


@pytest.mark.parametrize("build, pure", PURE_EQUIVALENTS, ids=lambda x: "")
def test_scheduler_equals_its_pure_function_at_every_step(build, pure):
    optimizer = FakeOptimizer([0.1])
    lrs = run(optimizer, build(optimizer), N)[0][:, 0]
    expected = pure(0.1)(E)
    if isinstance(build(FakeOptimizer([0.1])), L.MultiplicativeLR):
        np.testing.assert_allclose(lrs, expected, rtol=1e-13)  # the pure form is a cumulative product
    else:
        np.testing.assert_array_equal(lrs, expected)


def test_cyclic_momentum_equals_the_swapped_pure_function():
    optimizer = FakeOptimizer(momentum=0.0)
    scheduler = L.CyclicLR(optimizer, 0.01, 0.1, 7, base_momentum=0.7, max_momentum=0.95)
    momenta = run(optimizer, scheduler, N)[1][:, 0]
    np.testing.assert_array_equal(momenta, schedules.cyclical(0.95, 0.7, 7)(E))


def test_one_cycle_momentum_equals_its_pure_function():
    optimizer = FakeOptimizer(betas=(0.9, 0.99))
    scheduler = L.OneCycleLR(optimizer, 0.1, N + 1, three_phase=True)
    momenta = run(optimizer, scheduler, N)[1][:, 0]
    np.testing.assert_array_equal(momenta, schedules.one_cycle_momentum(N + 1, three_phase=True)(E))


# ---- PyTorch as a second oracle ----------------------------------------------------------------

TORCH_CASES = [
    ("LambdaLR", lambda m, o: m.LambdaLR(o, lambda e: 0.97 ** e), "sgd", 200),
    ("LambdaLR_per_group", lambda m, o: m.LambdaLR(o, [lambda e: 0.97 ** e, lambda e: 1 / (1 + e)]), "sgd", 200),
    ("MultiplicativeLR", lambda m, o: m.MultiplicativeLR(o, lambda e: 0.98 if e % 3 else 1.01), "sgd", 200),
    ("StepLR", lambda m, o: m.StepLR(o, 7, 0.5), "sgd", 200),
    ("MultiStepLR", lambda m, o: m.MultiStepLR(o, [10, 40, 40, 90], 0.3), "sgd", 200),
    ("MultiStepLR_milestone_0", lambda m, o: m.MultiStepLR(o, [0, 3], 0.5), "sgd", 120),
    ("ConstantLR", lambda m, o: m.ConstantLR(o, 0.25, 20), "sgd", 200),
    ("LinearLR", lambda m, o: m.LinearLR(o, 0.1, 0.9, 60), "sgd", 200),
    ("ExponentialLR", lambda m, o: m.ExponentialLR(o, 0.98), "sgd", 300),
    ("PolynomialLR", lambda m, o: m.PolynomialLR(o, 80, 1.7), "sgd", 200),
    ("CosineAnnealingLR", lambda m, o: m.CosineAnnealingLR(o, 45, 0.001), "sgd", 300),
    ("CosineAnnealingLR_eta_min_0", lambda m, o: m.CosineAnnealingLR(o, 10), "sgd", 200),
    ("CosineAnnealingWarmRestarts", lambda m, o: m.CosineAnnealingWarmRestarts(o, 10, 2, 1e-4), "sgd", 300),
    ("CyclicLR_triangular", lambda m, o: m.CyclicLR(o, 0.01, 0.1, 10, 15), "sgd", 200),
    ("CyclicLR_triangular2", lambda m, o: m.CyclicLR(o, [0.01, 0.001], [0.1, 0.05], 8, mode="triangular2"), "sgd", 200),
    ("CyclicLR_exp_range", lambda m, o: m.CyclicLR(o, 0.01, 0.1, 12, mode="exp_range", gamma=0.99), "sgd", 200),
    ("CyclicLR_adam_betas", lambda m, o: m.CyclicLR(o, 0.001, 0.01, 9, base_momentum=0.85, max_momentum=0.95), "adam", 200),
    ("CyclicLR_scale_fn", lambda m, o: m.CyclicLR(o, 0.01, 0.1, 6, scale_fn=lambda c: 1 / c, scale_mode="cycle"), "sgd", 200),
    ("CyclicLR_no_momentum", lambda m, o: m.CyclicLR(o, 0.01, 0.1, 6, cycle_momentum=False), "plain", 200),
    ("OneCycleLR_cos", lambda m, o: m.OneCycleLR(o, [0.1, 0.05], 200), "sgd", 200),
    ("OneCycleLR_linear", lambda m, o: m.OneCycleLR(o, 0.1, 200, anneal_strategy="linear", pct_start=0.25), "sgd", 200),
    ("OneCycleLR_three_phase_adam", lambda m, o: m.OneCycleLR(o, 0.01, 150, three_phase=True), "adam", 150),
    ("SequentialLR", lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 0.1, 1.0, 10), m.CosineAnnealingLR(o, 50)], [10]), "sgd", 200),
    ("SequentialLR_three", lambda m, o: m.SequentialLR(o, [m.ConstantLR(o, 0.1, 5), m.ExponentialLR(o, 0.95),
                                                           m.StepLR(o, 10, 0.5)], [20, 70]), "sgd", 200),
    ("ChainedScheduler", lambda m, o: m.ChainedScheduler([m.ConstantLR(o, 0.5, 10), m.ExponentialLR(o, 0.98)]), "sgd", 200),
    ("ChainedScheduler_cosine_step", lambda m, o: m.ChainedScheduler([m.CosineAnnealingLR(o, 30, 0.001),
                                                                      m.StepLR(o, 25, 0.5)]), "sgd", 200),
    ("ChainedScheduler_warmup_cosine", lambda m, o: m.ChainedScheduler([m.LinearLR(o, 0.1, 1.0, 20),
                                                                        m.CosineAnnealingLR(o, 60)]), "sgd", 200),
    ("ChainedScheduler_poly_multistep", lambda m, o: m.ChainedScheduler([m.PolynomialLR(o, 150, 2.0),
                                                                         m.MultiStepLR(o, [30, 60])]), "sgd", 200),
]

TORCH_OPTIMIZER_KWARGS = {"sgd": dict(momentum=0.9), "adam": dict(betas=(0.9, 0.999)), "plain": {}}


def torch_run(build, kind, num_steps, lrs=BASES):
    torch = pytest.importorskip("torch")
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    if kind == "adam":
        optimizer = torch.optim.Adam(params, lr=lrs[0])
    else:
        optimizer = torch.optim.SGD(params, lr=lrs[0], **TORCH_OPTIMIZER_KWARGS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notices
        scheduler = build(torch.optim.lr_scheduler, optimizer)
        return run(optimizer, scheduler, num_steps)


def fastbn_run(build, kind, num_steps, lrs=BASES):
    optimizer = FakeOptimizer(lrs, **TORCH_OPTIMIZER_KWARGS[kind])
    return run(optimizer, build(L, optimizer), num_steps)


@pytest.mark.parametrize("name, build, kind, num_steps", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch_over_a_long_run(name, build, kind, num_steps):
    expected_lrs, expected_momenta = torch_run(build, kind, num_steps)
    lrs, momenta = fastbn_run(build, kind, num_steps)
    np.testing.assert_allclose(lrs, expected_lrs, rtol=1e-10, atol=1e-16)
    if kind != "plain":
        np.testing.assert_allclose(momenta, expected_momenta, rtol=1e-12)


def test_reduce_lr_on_plateau_matches_torch_with_noisy_metrics():
    rng = np.random.default_rng(7)
    metrics = np.exp(-np.arange(400) / 80) + 0.05 * rng.random(400)
    configs = [dict(), dict(mode="max", threshold_mode="abs", threshold=0.01, patience=3),
               dict(patience=4, cooldown=6, factor=0.5, min_lr=[1e-3, 1e-4]),
               dict(patience=0, factor=0.9, eps=1e-3)]
    torch = pytest.importorskip("torch")
    for config in configs:
        params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in BASES]
        torch_optimizer = torch.optim.SGD(params, lr=0.1)
        torch_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_optimizer, **config)
        optimizer = FakeOptimizer(BASES)
        scheduler = L.ReduceLROnPlateau(optimizer, **config)
        signed = -metrics if config.get("mode") == "max" else metrics
        for metric in signed:
            torch_scheduler.step(float(metric))
            scheduler.step(metric)
            assert group_lrs(optimizer) == [g["lr"] for g in torch_optimizer.param_groups]
            assert scheduler.get_last_lr() == torch_scheduler.get_last_lr()
            assert scheduler.num_bad_epochs == torch_scheduler.num_bad_epochs


def test_epoch_argument_uses_the_closed_form_like_torch():
    torch = pytest.importorskip("torch")
    for build in [lambda m, o: m.StepLR(o, 5, 0.5), lambda m, o: m.CosineAnnealingLR(o, 20, 0.01),
                  lambda m, o: m.LinearLR(o, 0.2, 1.0, 8), lambda m, o: m.MultiStepLR(o, [3, 9])]:
        torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        optimizer = FakeOptimizer([0.1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_scheduler = build(torch.optim.lr_scheduler, torch_optimizer)
            scheduler = build(L, optimizer)
            for epoch in [3, 7, 7, 12, 4, 30]:
                torch_optimizer.step()
                optimizer.step()
                torch_scheduler.step(epoch)
                scheduler.step(epoch)
                assert group_lrs(optimizer)[0] == pytest.approx(torch_optimizer.param_groups[0]["lr"], rel=1e-12)


def test_warm_restarts_fractional_epochs_match_torch():
    torch = pytest.importorskip("torch")
    torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch_scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(torch_optimizer, 3, 2, 0.001)
    optimizer = FakeOptimizer([0.1])
    scheduler = L.CosineAnnealingWarmRestarts(optimizer, 3, 2, 0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(25):
            for batch in range(4):
                value = epoch + batch / 4
                torch_scheduler.step(value)
                scheduler.step(value)
                assert group_lrs(optimizer)[0] == pytest.approx(torch_optimizer.param_groups[0]["lr"], rel=1e-12)
                assert scheduler.last_epoch == torch_scheduler.last_epoch


@pytest.mark.parametrize("build", [
    lambda m, o: m.StepLR(o, 3, 0.5, last_epoch=5), lambda m, o: m.MultiStepLR(o, [4, 6], last_epoch=5),
    lambda m, o: m.ConstantLR(o, 0.5, 6, last_epoch=5), lambda m, o: m.LinearLR(o, 0.5, 1.0, 10, last_epoch=5),
    lambda m, o: m.ExponentialLR(o, 0.9, last_epoch=5), lambda m, o: m.PolynomialLR(o, 10, last_epoch=5),
    lambda m, o: m.CosineAnnealingLR(o, 10, last_epoch=5), lambda m, o: m.LambdaLR(o, lambda e: 0.9 ** e, last_epoch=5),
    lambda m, o: m.CosineAnnealingWarmRestarts(o, 4, last_epoch=5),
])
def test_resuming_with_last_epoch_matches_torch(build):
    torch = pytest.importorskip("torch")
    torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    torch_optimizer.param_groups[0]["initial_lr"] = 0.1
    optimizer = FakeOptimizer([0.05])
    optimizer.param_groups[0]["initial_lr"] = 0.1
    expected = run(torch_optimizer, build(torch.optim.lr_scheduler, torch_optimizer), 30)[0]
    actual = run(optimizer, build(L, optimizer), 30)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_one_cycle_raises_on_the_same_step_as_torch():
    torch = pytest.importorskip("torch")
    torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    torch_scheduler = torch.optim.lr_scheduler.OneCycleLR(torch_optimizer, 0.1, total_steps=10)
    optimizer = FakeOptimizer(momentum=0.9)
    scheduler = L.OneCycleLR(optimizer, 0.1, total_steps=10)
    for _ in range(10):
        torch_optimizer.step()
        torch_scheduler.step()
        optimizer.step()
        scheduler.step()
    assert group_lrs(optimizer)[0] == pytest.approx(torch_optimizer.param_groups[0]["lr"], rel=1e-12)
    with pytest.raises(ValueError):
        torch_scheduler.step()
    with pytest.raises(ValueError, match=r"OneCycleLR: tried to step 11 times, but total_steps is 10"):
        scheduler.step()


# ---- behaviour details ---------------------------------------------------------------------------

def test_construction_sets_initial_lr_and_takes_step_zero():
    optimizer = FakeOptimizer([0.1, 0.02])
    scheduler = L.LinearLR(optimizer, start_factor=0.5)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.02]
    assert scheduler.base_lrs == [0.1, 0.02]
    assert scheduler.last_epoch == 0
    assert group_lrs(optimizer) == [0.05, 0.01] == scheduler.get_last_lr()


def test_initial_lr_of_an_earlier_scheduler_is_kept():
    optimizer = FakeOptimizer([0.1])
    L.StepLR(optimizer, 5)
    optimizer.param_groups[0]["lr"] = 0.5
    assert L.ExponentialLR(optimizer, 0.9).base_lrs == [0.1]


def test_get_last_lr_returns_a_copy():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.StepLR(optimizer, 5)
    scheduler.get_last_lr()[0] = 123.0
    assert scheduler.get_last_lr() == [0.1]


def test_param_groups_follow_their_own_base_lr():
    optimizer = FakeOptimizer([1.0, 0.1, 0.01])
    lrs = run(optimizer, L.StepLR(optimizer, 2, 0.5), 6)[0]
    np.testing.assert_allclose(lrs, np.outer(0.5 ** (np.arange(7) // 2), [1.0, 0.1, 0.01]), rtol=1e-15)


def test_manual_lr_change_composes_with_a_chainable_scheduler_like_torch():
    # Halving the lr by hand mid-run keeps the halving (the recursive form).
    optimizer = FakeOptimizer([0.1])
    scheduler = L.ExponentialLR(optimizer, 0.9)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    optimizer.param_groups[0]["lr"] /= 2
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** 4 / 2, rel=1e-14)


def test_closed_form_schedulers_ignore_manual_lr_changes():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.LambdaLR(optimizer, lambda e: 0.9 ** e)
    optimizer.param_groups[0]["lr"] = 5.0
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.09)


def test_cyclic_lr_sets_base_lr_and_max_momentum_at_construction():
    optimizer = FakeOptimizer([0.5, 0.5], betas=(0.9, 0.999))
    L.StepLR(optimizer, 3)  # leaves a stale 'initial_lr' of 0.5
    L.CyclicLR(optimizer, [0.01, 0.02], [0.1, 0.2], 4, base_momentum=0.8, max_momentum=0.95)
    assert group_lrs(optimizer) == [0.01, 0.02]
    for group in optimizer.param_groups:
        assert group["betas"] == (0.95, 0.999)
        assert (group["max_momentum"], group["base_momentum"]) == (0.95, 0.8)


def test_one_cycle_stores_its_bounds_in_the_param_groups():
    optimizer = FakeOptimizer([0.1], momentum=0.0)
    L.OneCycleLR(optimizer, 2.0, 100, div_factor=10.0, final_div_factor=100.0)
    group = optimizer.param_groups[0]
    assert (group["initial_lr"], group["max_lr"], group["min_lr"]) == (0.2, 2.0, 0.002)
    # The cosine anneal at pct=0 is 0.2 up to rounding, in torch as well.
    assert group["lr"] == pytest.approx(0.2, rel=1e-15) and group["momentum"] == 0.95


def test_adam_second_beta_is_left_alone():
    optimizer = FakeOptimizer(betas=(0.9, 0.98))
    scheduler = L.OneCycleLR(optimizer, 0.1, 50)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["betas"][1] == 0.98


def test_chained_scheduler_multiplies_the_factors():
    optimizer = FakeOptimizer([0.2])
    scheduler = L.ChainedScheduler([L.ConstantLR(optimizer, 0.1, 3), L.ExponentialLR(optimizer, 0.5)])
    lrs = run(optimizer, scheduler, 5)[0][:, 0]
    np.testing.assert_allclose(lrs, [0.02, 0.01, 0.005, 0.025, 0.0125, 0.00625], rtol=1e-14)
    assert scheduler.get_last_lr() == [lrs[-1]]


def test_sequential_lr_restarts_the_next_scheduler_at_the_milestone():
    optimizer = FakeOptimizer([1.0])
    scheduler = L.SequentialLR(optimizer, [L.ConstantLR(optimizer, 0.1, 100), L.ExponentialLR(optimizer, 0.5)], [2])
    lrs = run(optimizer, scheduler, 4)[0][:, 0]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 1.0, 0.5, 0.25], rtol=1e-15)


def test_reduce_lr_on_plateau_respects_min_lr_eps_and_cooldown():
    optimizer = FakeOptimizer([1.0, 0.01])
    scheduler = L.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, cooldown=1, min_lr=[0.3, 0.0], eps=0.006)
    history = []
    for metric in [1.0, 2.0, 2.0, 2.0, 2.0]:
        scheduler.step(metric)
        history.append(group_lrs(optimizer))
    # bad epochs at 2, 4 reduce (cooldown skips 3 and 5); the second group's
    # change 0.005 is below eps and skipped; min_lr clamps the first group.
    assert history == [[1.0, 0.01], [0.5, 0.01], [0.5, 0.01], [0.3, 0.01], [0.3, 0.01]]


# ---- resume from state_dict equals an uninterrupted run ------------------------------------------

RESUME_CASES = [case for case in TORCH_CASES if case[2] != "plain"] + [
    ("CyclicLR_no_momentum", lambda m, o: m.CyclicLR(o, 0.01, 0.1, 6, cycle_momentum=False), "plain", 200),
]


def copy_param_groups(source, target):
    for source_group, target_group in zip(source.param_groups, target.param_groups):
        params = target_group["params"]
        target_group.clear()
        target_group.update(copy.deepcopy({k: v for k, v in source_group.items() if k != "params"}))
        target_group["params"] = params


@pytest.mark.parametrize("name, build, kind, num_steps", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_from_state_dict_equals_uninterrupted_run(name, build, kind, num_steps):
    kwargs = TORCH_OPTIMIZER_KWARGS[kind]
    uninterrupted = fastbn_run(build, kind, num_steps)

    optimizer = FakeOptimizer(BASES, **kwargs)
    scheduler = build(L, optimizer)
    first = run(optimizer, scheduler, 37)
    saved_state = pickle.loads(pickle.dumps(scheduler.state_dict()))

    resumed_optimizer = FakeOptimizer(BASES, **kwargs)
    resumed = build(L, resumed_optimizer)
    copy_param_groups(optimizer, resumed_optimizer)  # what optimizer.load_state_dict restores
    resumed.load_state_dict(saved_state)
    second = run(resumed_optimizer, resumed, num_steps - 37)

    np.testing.assert_array_equal(np.concatenate([first[0], second[0][1:]]), uninterrupted[0])
    np.testing.assert_array_equal(np.concatenate([first[1], second[1][1:]]), uninterrupted[1])


def test_reduce_lr_on_plateau_resume_equals_uninterrupted_run():
    metrics = [1.0, 0.9, 0.95, 0.95, 0.95, 0.96, 0.97, 0.5, 0.6, 0.6, 0.6, 0.6]

    def play(scheduler, optimizer, values):
        out = []
        for value in values:
            scheduler.step(value)
            out.append(group_lrs(optimizer))
        return out

    optimizer = FakeOptimizer(BASES)
    uninterrupted = play(L.ReduceLROnPlateau(optimizer, patience=1, factor=0.5), optimizer, metrics)
    optimizer = FakeOptimizer(BASES)
    scheduler = L.ReduceLROnPlateau(optimizer, patience=1, factor=0.5)
    first = play(scheduler, optimizer, metrics[:5])
    state = pickle.loads(pickle.dumps(scheduler.state_dict()))
    resumed_optimizer = FakeOptimizer(BASES)
    copy_param_groups(optimizer, resumed_optimizer)
    resumed = L.ReduceLROnPlateau(resumed_optimizer)
    resumed.load_state_dict(state)
    assert first + play(resumed, resumed_optimizer, metrics[5:]) == uninterrupted


def test_state_dict_has_torch_keys_and_no_optimizer():
    optimizer = FakeOptimizer([0.1])
    state = L.StepLR(optimizer, 3).state_dict()
    assert set(state) == {"step_size", "gamma", "base_lrs", "last_epoch", "_step_count",
                          "_get_lr_called_within_step", "_is_initial", "_last_lr"}


def test_state_dict_is_a_copy():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.MultiStepLR(optimizer, [3, 6])
    state = scheduler.state_dict()
    state["base_lrs"][0] = 99.0
    state["milestones"][100] = 1
    assert scheduler.base_lrs == [0.1] and 100 not in scheduler.milestones


def test_lambda_state_keeps_callable_object_attributes_not_functions():
    class Decay:
        def __init__(self, rate):
            self.rate = rate

        def __call__(self, epoch):
            return self.rate ** epoch

    optimizer = FakeOptimizer([0.1, 0.1])
    scheduler = L.LambdaLR(optimizer, [Decay(0.5), lambda e: 1.0])
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [{"rate": 0.5}, None]
    other = L.LambdaLR(FakeOptimizer([0.1, 0.1]), [Decay(0.9), lambda e: 1.0])
    other.load_state_dict(state)
    assert other.lr_lambdas[0].rate == 0.5


# ---- warnings ------------------------------------------------------------------------------------

def test_no_warning_when_optimizer_steps_first():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.StepLR(optimizer, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            optimizer.step()
            scheduler.step()


def test_warns_when_scheduler_steps_before_optimizer():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.StepLR(optimizer, 3)
    with pytest.warns(UserWarning, match=r"`lr_scheduler.step\(\)` before `optimizer.step\(\)`"):
        scheduler.step()


def test_warns_when_optimizer_step_is_replaced_after_construction():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.StepLR(optimizer, 3)
    optimizer.step = FakeOptimizer([0.1]).step
    with pytest.warns(UserWarning, match="overridden"):
        scheduler.step()


def test_optimizer_without_step_method_is_driven_silently():
    class GroupsOnly:
        def __init__(self):
            self.param_groups = [{"lr": 0.1}]

    optimizer = GroupsOnly()
    scheduler = L.ExponentialLR(optimizer, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.05


def test_epoch_argument_is_deprecated():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.StepLR(optimizer, 3, 0.5)
    optimizer.step()
    with pytest.warns(UserWarning, match="epoch parameter"):
        scheduler.step(7)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_calling_get_lr_directly_warns_to_use_get_last_lr():
    optimizer = FakeOptimizer([0.1])
    scheduler = L.StepLR(optimizer, 3)
    with pytest.warns(UserWarning, match=r"get_last_lr\(\)"):
        scheduler.get_lr()


# ---- errors ----------------------------------------------------------------------------------------

def plain():
    return FakeOptimizer([0.1])


def with_momentum():
    return FakeOptimizer([0.1], momentum=0.9)


ERRORS = [
    (lambda: L.StepLR(plain(), 0), ValueError, r"step_size: expected an int >= 1, got 0"),
    (lambda: L.StepLR(plain(), -2), ValueError, r"step_size: expected an int >= 1, got -2"),
    (lambda: L.StepLR(plain(), 2.5), TypeError, r"step_size: expected an int, got float 2.5"),
    (lambda: L.StepLR(plain(), 3, gamma=-0.1), ValueError, r"gamma: expected a value >= 0, got -0.1"),
    (lambda: L.MultiStepLR(plain(), [30, 10]), ValueError, r"milestones: expected non-decreasing values, got \[30, 10\]"),
    (lambda: L.MultiStepLR(plain(), [-1, 10]), ValueError, r"milestones\[0\]: expected an int >= 0, got -1"),
    (lambda: L.ConstantLR(plain(), factor=1.5), ValueError, r"factor: expected a value in \[0.0, 1.0\], got 1.5"),
    (lambda: L.ConstantLR(plain(), total_iters=-1), ValueError, r"total_iters: expected an int >= 0, got -1"),
    (lambda: L.LinearLR(plain(), start_factor=0.0), ValueError, r"start_factor: expected a value in \(0.0, 1.0\], got 0.0"),
    (lambda: L.LinearLR(plain(), end_factor=1.5), ValueError, r"end_factor: expected a value in \[0.0, 1.0\]"),
    (lambda: L.LinearLR(plain(), total_iters=0), ValueError, r"total_iters: expected an int >= 1, got 0"),
    (lambda: L.ExponentialLR(plain(), gamma=-1), ValueError, r"gamma: expected a value >= 0"),
    (lambda: L.PolynomialLR(plain(), total_iters=0), ValueError, r"total_iters: expected an int >= 1, got 0"),
    (lambda: L.PolynomialLR(plain(), power=-1.0), ValueError, r"power: expected a value >= 0"),
    (lambda: L.CosineAnnealingLR(plain(), T_max=0), ValueError, r"T_max: expected a value > 0, got 0"),
    (lambda: L.CosineAnnealingWarmRestarts(plain(), T_0=0), ValueError, r"T_0: expected an int >= 1, got 0"),
    (lambda: L.CosineAnnealingWarmRestarts(plain(), T_0=2.0), TypeError, r"T_0: expected an int"),
    (lambda: L.CosineAnnealingWarmRestarts(plain(), T_0=2, T_mult=0), ValueError, r"T_mult: expected an int >= 1, got 0"),
    (lambda: L.CyclicLR(with_momentum(), 0.01, 0.1, step_size_up=-4), ValueError, r"step_size_up: expected a value > 0, got -4"),
    (lambda: L.CyclicLR(with_momentum(), 0.01, 0.1, step_size_up=0), ValueError, r"step_size_up: expected a value > 0, got 0"),
    (lambda: L.CyclicLR(with_momentum(), 0.01, 0.1, step_size_down=-1), ValueError, r"step_size_down: expected a value >= 0, got -1"),
    (lambda: L.CyclicLR(with_momentum(), 0.01, 0.1, mode="cosine"), ValueError, r"mode: expected one of \('triangular', 'triangular2', 'exp_range'\).*got 'cosine'"),
    (lambda: L.CyclicLR(with_momentum(), [0.01, 0.02], 0.1), ValueError, r"base_lr: expected one value per param group \(1\), got 2 values"),
    (lambda: L.CyclicLR(plain(), 0.01, 0.1), ValueError, r"CyclicLR: cycle_momentum=True needs an optimizer whose param groups have 'momentum'.*'betas'.*got param group keys \['lr', 'params'\]; pass cycle_momentum=False"),
    (lambda: L.OneCycleLR(plain(), 0.1, 100), ValueError, r"OneCycleLR: cycle_momentum=True needs"),
    (lambda: L.OneCycleLR(with_momentum(), 0.1, total_steps=0), ValueError, r"total_steps: expected an int >= 1, got 0"),
    (lambda: L.OneCycleLR(with_momentum(), 0.1, total_steps=-5), ValueError, r"total_steps: expected an int >= 1, got -5"),
    (lambda: L.OneCycleLR(with_momentum(), 0.1), ValueError, r"expected total_steps, or both epochs and steps_per_epoch"),
    (lambda: L.OneCycleLR(with_momentum(), 0.1, epochs=0, steps_per_epoch=5), ValueError, r"epochs: expected an int >= 1, got 0"),
    (lambda: L.OneCycleLR(with_momentum(), 0.1, 100, pct_start=1.5), ValueError, r"pct_start: expected a value in \[0.0, 1.0\], got 1.5"),
    (lambda: L.OneCycleLR(with_momentum(), 0.1, 100, anneal_strategy="cosine"), ValueError, r"anneal_strategy: expected one of \('cos', 'linear'\), got 'cosine'"),
    (lambda: L.OneCycleLR(with_momentum(), [0.1, 0.2], 100), ValueError, r"max_lr: expected one value per param group \(1\), got 2"),
    (lambda: L.LambdaLR(plain(), [lambda e: 1.0] * 2), ValueError, r"lr_lambda: expected 1 functions \(one per param group\), got 2"),
    (lambda: L.LambdaLR(plain(), 0.5), TypeError, r"lr_lambda: expected a function of the epoch, got float 0.5"),
    (lambda: L.MultiplicativeLR(plain(), None), TypeError, r"lr_lambda: expected a function"),
    (lambda: L.StepLR(object(), 3), TypeError, r"StepLR: optimizer: expected an optimizer whose `param_groups` is a non-empty list of dicts with an 'lr' entry"),
    (lambda: L.StepLR(plain(), 3, last_epoch=-2), ValueError, r"last_epoch: expected an int >= -1, got -2"),
    (lambda: L.StepLR(plain(), 3, last_epoch=4), KeyError, r"initial_lr"),
    (lambda: L.ReduceLROnPlateau(plain(), mode="minimum"), ValueError, r"mode: expected 'min' or 'max', got 'minimum'"),
    (lambda: L.ReduceLROnPlateau(plain(), threshold_mode="relative"), ValueError, r"threshold_mode: expected 'rel' or 'abs'"),
    (lambda: L.ReduceLROnPlateau(plain(), factor=1.0), ValueError, r"factor: expected a value in \[0.0, 1.0\), got 1.0"),
    (lambda: L.ReduceLROnPlateau(plain(), patience=-1), ValueError, r"patience: expected an int >= 0, got -1"),
    (lambda: L.ReduceLROnPlateau(plain(), min_lr=[0.1, 0.2]), ValueError, r"min_lr: expected one value per param group \(1\), got 2"),
    (lambda: L.ReduceLROnPlateau(plain()).step("loss"), TypeError, r"metrics: expected a number"),
]


@pytest.mark.parametrize("build, error, message", ERRORS, ids=[f"{i}" for i in range(len(ERRORS))])
def test_bad_arguments_raise_naming_the_argument(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_sequential_lr_errors():
    optimizer = plain()
    first, second = L.ConstantLR(optimizer), L.ExponentialLR(optimizer, 0.9)
    with pytest.raises(ValueError, match=r"milestones: expected strictly increasing values, got \[5, 5\]"):
        L.SequentialLR(optimizer, [first, second, L.StepLR(optimizer, 3)], [5, 5])
    with pytest.raises(ValueError, match=r"milestones: expected 1 values .* got 2"):
        L.SequentialLR(optimizer, [first, second], [3, 6])
    with pytest.raises(ValueError, match=r"schedulers: expected at least one scheduler"):
        L.SequentialLR(optimizer, [], [])
    with pytest.raises(ValueError, match=r"schedulers\[1\]: ReduceLROnPlateau is not supported"):
        L.SequentialLR(optimizer, [first, L.ReduceLROnPlateau(optimizer)], [3])
    with pytest.raises(ValueError, match=r"schedulers\[1\] \(StepLR\) drives a different optimizer"):
        L.SequentialLR(optimizer, [first, L.StepLR(plain(), 3)], [3])
    with pytest.raises(TypeError, match=r"schedulers\[0\]: expected a scheduler"):
        L.SequentialLR(optimizer, [0.5, first], [3])


def test_chained_scheduler_errors():
    with pytest.raises(ValueError, match=r"schedulers: expected at least one scheduler"):
        L.ChainedScheduler([])
    with pytest.raises(ValueError, match=r"schedulers\[1\] \(StepLR\) drives a different optimizer"):
        L.ChainedScheduler([L.StepLR(plain(), 2), L.StepLR(plain(), 3)])


def test_warm_restarts_rejects_negative_epoch():
    scheduler = L.CosineAnnealingWarmRestarts(plain(), 3)
    with pytest.raises(ValueError, match=r"epoch: expected a value >= 0, got -1"):
        scheduler.step(-1)


# ---- real fastbn optimizers ------------------------------------------------------------------------

def fastbn_optimizers():
    try:
        import fastbn
        from fastbn.optim import SGD, Adam
    except Exception as error:  # the optimizers (or the extension) are not built yet
        pytest.skip(f"fastbn optimizers not importable: {error}")
    return fastbn, SGD, Adam


def test_step_lr_drives_a_real_sgd_update():
    fastbn, SGD, _ = fastbn_optimizers()
    param = fastbn.Parameter(np.zeros(4))
    optimizer = SGD([param], lr=0.5)
    scheduler = L.StepLR(optimizer, 2, 0.5)
    expected_position = 0.0
    for _ in range(7):
        lr = optimizer.param_groups[0]["lr"]
        param.grad = np.ones(4)
        optimizer.step()
        scheduler.step()
        expected_position -= lr
        np.testing.assert_allclose(param.data, expected_position, rtol=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5 ** 3)


def test_cyclic_and_one_cycle_drive_real_momentum_and_betas():
    fastbn, SGD, Adam = fastbn_optimizers()
    sgd = SGD([fastbn.Parameter(np.zeros(3)), ], lr=0.1, momentum=0.9)
    adam = Adam([{"params": [fastbn.Parameter(np.zeros(3))], "lr": 1e-3},
                 {"params": [fastbn.Parameter(np.zeros(2))], "lr": 1e-4}])
    cyclic = L.CyclicLR(sgd, 0.01, 0.1, 5)
    one_cycle = L.OneCycleLR(adam, [1e-2, 1e-3], 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(1, 40):
            for optimizer in (sgd, adam):
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = np.ones_like(param.data)
                optimizer.step()
            cyclic.step()
            one_cycle.step()
            assert sgd.param_groups[0]["lr"] == schedules.cyclical(0.01, 0.1, 5)(step)
            assert sgd.param_groups[0]["momentum"] == schedules.cyclical(0.9, 0.8, 5)(step)
            for group, peak in zip(adam.param_groups, [1e-2, 1e-3]):
                assert group["lr"] == schedules.one_cycle(peak, 40)(step)
                assert group["betas"] == (schedules.one_cycle_momentum(40)(step), 0.999)
    resumed_sgd = SGD([fastbn.Parameter(np.zeros(3))], lr=0.1, momentum=0.9)
    resumed = L.CyclicLR(resumed_sgd, 0.01, 0.1, 5)
    resumed_sgd.load_state_dict(sgd.state_dict())
    resumed.load_state_dict(cyclic.state_dict())
    resumed_sgd.step()
    resumed.step()
    assert resumed_sgd.param_groups[0]["lr"] == schedules.cyclical(0.01, 0.1, 5)(40)


def test_constant_lr_with_factor_zero_restores_the_base_lr():
    # torch divides by zero here.
    lrs = run_lrs(lambda o: L.ConstantLR(o, factor=0.0, total_iters=3), 5)[:, 0]
    np.testing.assert_array_equal(lrs, [0, 0, 0, 0.1, 0.1, 0.1])


def test_one_cycle_zero_length_warmup_starts_at_the_peak():
    lrs = run_lrs(lambda o: L.OneCycleLR(o, 0.1, 10, pct_start=0.1), 9, momentum=0.9)[:, 0]
    assert lrs[0] == 0.1 and np.all(np.diff(lrs) < 0)


def test_a_copied_optimizer_steps_itself_not_the_original():
    optimizer = FakeOptimizer([0.1])
    L.StepLR(optimizer, 3)
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        clone.step()
        assert clone.steps == 1 and optimizer.steps == 0
