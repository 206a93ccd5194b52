"""fastbn.schedules: pure, vectorized schedule functions.

Each function is checked against an independent scalar closed form written
here with the math module, over long step ranges; plus the SEMANTICS.md
vectors, the scalar/array contract, composition and argument errors.
"""
import math

import numpy as np
import pytest

from fastbn import schedules

STEPS = np.arange(300)


def scalar_curve(function, steps=STEPS):
    return np.array([function(int(step)) for step in steps])


# ---- SEMANTICS.md vectors (lr = 0.1; entry k = value at step k) ------------------------

SEMANTICS_VECTORS = [
    ("cosine", lambda: schedules.cosine(0.1, T_max=5, eta_min=0.01),
     [.1, .091406, .068906, .041094, .018594, .01, .018594]),
    ("cosine_warm_restarts", lambda: schedules.cosine_warm_restarts(0.1, T_0=3, T_mult=2),
     [.1, .075, .025, .1, .093301, .075, .05, .025, .006699, .1]),
    ("linear", lambda: schedules.linear(0.1),
     [.033333, .046667, .06, .073333, .086667, .1]),
    ("polynomial", lambda: schedules.polynomial(0.1, total_iters=4, power=2),
     [.1, .05625, .025, .00625, 0]),
    ("cyclical", lambda: schedules.cyclical(.01, .1, step_size_up=2, step_size_down=3),
     [.01, .055, .1, .07, .04, .01]),
    ("cyclical_triangular2", lambda: schedules.cyclical(.01, .1, 2, mode="triangular2"),
     [.01, .055, .1, .055, .01, .0325, .055, .0325, .01, .02125]),
    ("cyclical_exp_range", lambda: schedules.cyclical(.01, .1, 2, mode="exp_range", gamma=.9),
     [.01, .0505, .0829, .042805, .01, .036572]),
    ("one_cycle", lambda: schedules.one_cycle(.1, total_steps=10),
     [.004, .052, .1, .095048, .081175, .061126, .038874, .018826, .004952, 4e-7]),
    ("join", lambda: schedules.join([schedules.linear(.1, .1, 1, 3), schedules.cosine(.1, 5)], [3]),
     [.01, .04, .07, .1, .090451, .065451, .034549, .009549, 0]),
]


@pytest.mark.parametrize("name, build, expected", SEMANTICS_VECTORS, ids=[v[0] for v in SEMANTICS_VECTORS])
def test_semantics_vector(name, build, expected):
    values = build()(np.arange(len(expected)))
    np.testing.assert_allclose(values, expected, rtol=0, atol=6e-7)


# ---- long runs against independent closed forms -------------------------------------------

def test_step_decay_multiplies_by_gamma_every_step_size_steps():
    expected = scalar_curve(lambda e: 0.5 * 0.3 ** (e // 7))
    np.testing.assert_allclose(schedules.step_decay(0.5, 7, 0.3)(STEPS), expected, rtol=1e-13)


def test_exponential_decay_continuous_and_staircase():
    smooth = scalar_curve(lambda e: 0.2 * 0.5 ** (e / 10))
    stairs = scalar_curve(lambda e: 0.2 * 0.5 ** math.floor(e / 10))
    np.testing.assert_allclose(schedules.exponential_decay(0.2, 0.5, 10)(STEPS), smooth, rtol=1e-13)
    np.testing.assert_allclose(schedules.exponential_decay(0.2, 0.5, 10, staircase=True)(STEPS),
                               stairs, rtol=1e-13)


def test_exponential_decay_default_decay_steps_is_per_step():
    np.testing.assert_allclose(schedules.exponential_decay(1.0, 0.97)(STEPS), 0.97 ** STEPS, rtol=1e-13)


def test_multistep_counts_passed_milestones_including_repeats():
    milestones = [10, 50, 50, 200]
    expected = scalar_curve(lambda e: 0.1 * 0.2 ** sum(m <= e for m in milestones))
    np.testing.assert_allclose(schedules.multistep(0.1, milestones, 0.2)(STEPS), expected, rtol=1e-13)


def test_constant_warmup_switches_to_init_lr_at_total_iters():
    expected = scalar_curve(lambda e: 0.3 * (0.25 if e < 17 else 1.0))
    np.testing.assert_allclose(schedules.constant_warmup(0.3, 0.25, 17)(STEPS), expected, rtol=1e-15)


def test_linear_ramps_then_holds_end_factor():
    expected = scalar_curve(lambda e: 0.3 * (0.1 + 0.7 * min(e, 40) / 40))
    np.testing.assert_allclose(schedules.linear(0.3, 0.1, 0.8, 40)(STEPS), expected, rtol=1e-13)


def test_warmup_goes_from_start_lr_to_peak_lr_then_stays():
    values = schedules.warmup(0.4, 20, start_lr=0.0)(STEPS)
    expected = scalar_curve(lambda e: 0.4 * min(e, 20) / 20)
    np.testing.assert_allclose(values, expected, rtol=1e-13, atol=1e-17)


def test_polynomial_reaches_zero_and_stays():
    expected = scalar_curve(lambda e: 0.1 * (1 - min(e, 123) / 123) ** 0.9)
    np.testing.assert_allclose(schedules.polynomial(0.1, 123, 0.9)(STEPS), expected, rtol=1e-12, atol=1e-18)
    assert np.all(schedules.polynomial(0.1, 123, 0.9)(np.arange(123, 300)) == 0)


def test_cosine_is_periodic_and_not_clamped_after_t_max():
    expected = scalar_curve(lambda e: 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * e / 37)) / 2)
    values = schedules.cosine(0.1, 37, 0.001)(STEPS)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    assert values[37] == pytest.approx(0.001) and values[74] == pytest.approx(0.1)


def reference_warm_restarts(init_lr, T_0, T_mult, eta_min, steps):
    values, T_cur, T_i = [], 0, T_0
    for _ in steps:
        values.append(eta_min + (init_lr - eta_min) * (1 + math.cos(math.pi * T_cur / T_i)) / 2)
        T_cur += 1
        if T_cur >= T_i:
            T_cur, T_i = T_cur - T_i, T_i * T_mult
    return np.array(values)


@pytest.mark.parametrize("T_0, T_mult", [(10, 1), (3, 2), (1, 3), (2, 5), (7, 4)])
def test_cosine_warm_restarts_matches_step_by_step_cycles(T_0, T_mult):
    steps = np.arange(2000)
    expected = reference_warm_restarts(0.1, T_0, T_mult, 1e-4, steps)
    np.testing.assert_allclose(schedules.cosine_warm_restarts(0.1, T_0, T_mult, 1e-4)(steps),
                               expected, rtol=1e-11)


def test_warm_restart_position_restarts_exactly_at_cycle_starts():
    # 2 * (5**n - 1) / 4 with T_0=2, T_mult=5: starts 0, 2, 12, 62, 312, 1562
    # (where a float logarithm alone lands just below the integer).
    starts = np.array([2, 12, 62, 312, 1562, 7812])
    T_cur, T_i = schedules.warm_restart_position(starts, T_0=2, T_mult=5)
    np.testing.assert_array_equal(T_cur, 0)
    np.testing.assert_array_equal(T_i, 2 * 5 ** np.arange(1, 7))
    T_cur, _ = schedules.warm_restart_position(starts - 1, T_0=2, T_mult=5)
    np.testing.assert_array_equal(T_cur, 2 * 5 ** np.arange(0, 6) - 1)


def test_warm_restart_position_accepts_fractional_epochs():
    T_cur, T_i = schedules.warm_restart_position([0.5, 3.25, 9.75], T_0=3, T_mult=2)
    np.testing.assert_allclose(T_cur, [0.5, 0.25, 0.75])
    np.testing.assert_array_equal(T_i, [3, 6, 12])


def reference_cyclical(base, peak, up, down, scale, step, scale_by_cycle):
    total = up + down
    cycle = math.floor(1 + step / total)
    x = 1 + step / total - cycle
    position = x / (up / total) if x <= up / total else (x - 1) / (up / total - 1)
    return base + (peak - base) * position * scale(cycle if scale_by_cycle else step)


@pytest.mark.parametrize("mode, scale, by_cycle", [
    ("triangular", lambda c: 1.0, True),
    ("triangular2", lambda c: 0.5 ** (c - 1), True),
    ("exp_range", lambda e: 0.995 ** e, False),
])
def test_cyclical_builtin_modes(mode, scale, by_cycle):
    values = schedules.cyclical(0.001, 0.01, 13, 29, mode=mode, gamma=0.995)(STEPS)
    expected = scalar_curve(lambda e: reference_cyclical(0.001, 0.01, 13, 29, scale, e, by_cycle))
    np.testing.assert_allclose(values, expected, rtol=1e-12)


@pytest.mark.parametrize("scale_mode", ["cycle", "iterations"])
def test_cyclical_custom_scale_fn_gets_ints(scale_mode):
    seen = []

    def scale_fn(x):
        seen.append(x)
        return 1.0 / (1.0 + 0.1 * x)

    values = schedules.cyclical(0.1, 1.0, 10, scale_fn=scale_fn, scale_mode=scale_mode)(STEPS)
    expected = scalar_curve(lambda e: reference_cyclical(0.1, 1.0, 10, 10, lambda x: 1.0 / (1.0 + 0.1 * x),
                                                         e, scale_mode == "cycle"))
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    assert all(type(x) is int for x in seen)


def test_cyclical_inverse_curve_is_the_momentum_cycle():
    lr = schedules.cyclical(0.01, 0.1, 5, 7)(STEPS)
    momentum = schedules.cyclical(0.95, 0.85, 5, 7)(STEPS)
    np.testing.assert_allclose((lr - 0.01) / 0.09, (0.95 - momentum) / 0.1, atol=1e-12)


def reference_one_cycle(step, total, pct, start, peak, end, anneal, three_phase):
    def cos_anneal(a, b, p):
        return b + (a - b) / 2 * (math.cos(math.pi * p) + 1)

    def lin_anneal(a, b, p):
        return (b - a) * p + a

    f = cos_anneal if anneal == "cos" else lin_anneal
    up_end = pct * total - 1
    if three_phase:
        down_end = 2 * pct * total - 2
        if step <= up_end:
            return f(start, peak, step / up_end)
        if step <= down_end:
            return f(peak, start, (step - up_end) / (down_end - up_end))
        return f(start, end, (step - down_end) / (total - 1 - down_end))
    if step <= up_end:
        return f(start, peak, step / up_end)
    return f(peak, end, (step - up_end) / (total - 1 - up_end))


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_phases(anneal, three_phase):
    total = 240  # peak at step 0.25 * 240 - 1 = 59
    steps = np.arange(total)
    values = schedules.one_cycle(0.5, total, 0.25, anneal, 20.0, 100.0, three_phase)(steps)
    expected = scalar_curve(lambda e: reference_one_cycle(e, total, 0.25, 0.025, 0.5, 0.00025, anneal,
                                                          three_phase), steps)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    assert values[59] == pytest.approx(0.5)
    assert values[-1] == pytest.approx(0.00025)


@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_momentum_moves_inversely(three_phase):
    total = 100
    steps = np.arange(total)
    momentum = schedules.one_cycle_momentum(total, 0.85, 0.95, 0.3, "cos", three_phase)(steps)
    end = 0.95
    expected = scalar_curve(lambda e: reference_one_cycle(e, total, 0.3, 0.95, 0.85, end, "cos",
                                                          three_phase), steps)
    np.testing.assert_allclose(momentum, expected, rtol=1e-12)
    assert momentum[29] == pytest.approx(0.85) and momentum[-1] == pytest.approx(0.95)


def test_one_cycle_allows_total_steps_and_rejects_beyond():
    schedule = schedules.one_cycle(0.1, 10)
    assert np.isfinite(schedule(10))
    with pytest.raises(ValueError, match=r"total_steps \(10\).*11"):
        schedule(11)


def test_one_cycle_zero_length_warmup_starts_at_the_peak():
    # pct_start * total_steps == 1: torch divides by zero here.
    values = schedules.one_cycle(0.1, 10, pct_start=0.1)(np.arange(10))
    assert values[0] == pytest.approx(0.1)
    assert np.all(np.diff(values) < 0)


def test_one_cycle_explicit_initial_and_min_lr():
    values = schedules.one_cycle(1.0, 20, initial_lr=0.5, min_lr=0.25)(np.array([0, 19]))
    np.testing.assert_allclose(values, [0.5, 0.25])


def test_lambda_schedule_calls_the_function_with_int_steps():
    calls = []

    def factor(epoch):
        calls.append(epoch)
        return 1.0 / (1 + epoch)

    values = schedules.lambda_schedule(0.2, factor)(np.arange(50))
    np.testing.assert_allclose(values, 0.2 / (1 + np.arange(50)), rtol=1e-15)
    assert calls == list(range(50)) and all(type(c) is int for c in calls)


def test_multiplicative_is_the_running_product_of_factors():
    values = schedules.multiplicative(0.3, lambda e: 0.9 if e % 2 else 1.01)(STEPS)
    expected, lr = [], 0.3
    for e in STEPS:
        if e > 0:
            lr *= 0.9 if e % 2 else 1.01
        expected.append(lr)
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_multiplicative_rejects_fractional_steps():
    with pytest.raises(ValueError, match="integer steps"):
        schedules.multiplicative(0.1, lambda e: 0.9)(1.5)


def test_join_restarts_each_piece_at_its_boundary():
    first, second, third = schedules.constant(1.0), schedules.exponential_decay(2.0, 0.5), schedules.constant(7.0)
    joined = schedules.join([first, second, third], [5, 8])
    np.testing.assert_array_equal(joined(np.arange(11)), [1, 1, 1, 1, 1, 2, 1, .5, 7, 7, 7])


def test_join_of_one_schedule_is_that_schedule():
    np.testing.assert_array_equal(schedules.join([schedules.cosine(0.1, 10)], [])(STEPS),
                                  schedules.cosine(0.1, 10)(STEPS))


# ---- the Schedule contract ------------------------------------------------------------------

ALL_SCHEDULES = [
    schedules.constant(0.1), schedules.constant_warmup(0.1), schedules.linear(0.1),
    schedules.warmup(0.1, 10), schedules.exponential_decay(0.1, 0.9), schedules.step_decay(0.1, 3),
    schedules.multistep(0.1, [2, 5]), schedules.polynomial(0.1), schedules.cosine(0.1, 10),
    schedules.cosine_warm_restarts(0.1, 3, 2), schedules.cyclical(0.01, 0.1, 4),
    schedules.one_cycle(0.1, 100), schedules.one_cycle_momentum(100),
    schedules.lambda_schedule(0.1, lambda e: 0.9 ** e), schedules.multiplicative(0.1, lambda e: 0.9),
    schedules.join([schedules.linear(0.1), schedules.cosine(0.1, 10)], [5]),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: s.name)
def test_scalar_step_gives_float_and_array_gives_same_values(schedule):
    steps = np.arange(60).reshape(6, 10)
    values = schedule(steps)
    assert isinstance(values, np.ndarray) and values.dtype == np.float64 and values.shape == (6, 10)
    scalars = [schedule(int(step)) for step in steps.ravel()]
    assert all(type(value) is float for value in scalars)
    np.testing.assert_array_equal(values.ravel(), scalars)
    assert schedule(np.int64(7)) == schedule(7) == schedule(7.0)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: s.name)
def test_input_steps_are_not_modified(schedule):
    steps = np.arange(30)
    before = steps.copy()
    schedule(steps)
    np.testing.assert_array_equal(steps, before)


def test_lists_of_steps_are_accepted():
    np.testing.assert_array_equal(schedules.step_decay(1.0, 2, 0.5)([0, 1, 2, 3, 4]), [1, 1, .5, .5, .25])


def test_repr_and_params_describe_the_schedule():
    schedule = schedules.cosine(0.1, 50, eta_min=0.001)
    assert repr(schedule) == "cosine(init_lr=0.1, T_max=50.0, eta_min=0.001)"
    assert schedule.params == {"init_lr": 0.1, "T_max": 50.0, "eta_min": 0.001}


@pytest.mark.parametrize("bad_step, error, message", [
    (-1, ValueError, r"step: expected steps >= 0, got -1"),
    (np.array([0, 3, -2]), ValueError, r"step: expected steps >= 0, got -2"),
    (float("nan"), ValueError, r"step: expected finite steps"),
    (True, TypeError, r"step: expected a real number"),
    ("3", TypeError, r"step: expected a real number"),
    (np.array([1 + 2j]), TypeError, r"step: expected a real number"),
])
def test_bad_steps_are_rejected(bad_step, error, message):
    with pytest.raises(error, match=message):
        schedules.cosine(0.1, 10)(bad_step)


@pytest.mark.parametrize("build, error, message", [
    (lambda: schedules.step_decay(0.1, -3), ValueError, r"step_size: expected a value > 0, got -3"),
    (lambda: schedules.step_decay(0.1, 0), ValueError, r"step_size: expected a value > 0, got 0"),
    (lambda: schedules.step_decay(0.1, 2, gamma=-0.5), ValueError, r"gamma: expected a value >= 0"),
    (lambda: schedules.exponential_decay(0.1, 0.9, decay_steps=0), ValueError, r"decay_steps: expected a value > 0"),
    (lambda: schedules.multistep(0.1, [5, 3]), ValueError, r"milestones: expected non-decreasing values, got \[5, 3\]"),
    (lambda: schedules.multistep(0.1, [1.5]), TypeError, r"milestones\[0\]: expected an int"),
    (lambda: schedules.multistep(0.1, 5), TypeError, r"milestones: expected a sequence of ints"),
    (lambda: schedules.linear(0.1, total_iters=0), ValueError, r"total_iters: expected a value > 0, got 0"),
    (lambda: schedules.polynomial(0.1, total_iters=-1), ValueError, r"total_iters: expected a value > 0"),
    (lambda: schedules.constant_warmup(0.1, factor=1.5), ValueError, r"factor: expected a value in \[0.0, 1.0\], got 1.5"),
    (lambda: schedules.cosine(0.1, T_max=0), ValueError, r"T_max: expected a value > 0, got 0"),
    (lambda: schedules.cosine_warm_restarts(0.1, T_0=0), ValueError, r"T_0: expected an int >= 1, got 0"),
    (lambda: schedules.cosine_warm_restarts(0.1, T_0=2, T_mult=0), ValueError, r"T_mult: expected an int >= 1"),
    (lambda: schedules.cyclical(0.1, 1.0, step_size_up=-5), ValueError, r"step_size_up: expected a value > 0, got -5"),
    (lambda: schedules.cyclical(0.1, 1.0, step_size_down=-1), ValueError, r"step_size_down: expected a value >= 0, got -1"),
    (lambda: schedules.cyclical(0.1, 1.0, mode="sawtooth"), ValueError, r"mode: expected one of .*'triangular'.* got 'sawtooth'"),
    (lambda: schedules.cyclical(0.1, 1.0, scale_fn=lambda x: 1.0, scale_mode="epochs"), ValueError, r"scale_mode: expected one of"),
    (lambda: schedules.cyclical(0.1, 1.0, scale_fn=3), TypeError, r"scale_fn: expected a callable"),
    (lambda: schedules.one_cycle(0.1, total_steps=0), ValueError, r"total_steps: expected an int >= 1, got 0"),
    (lambda: schedules.one_cycle(0.1, total_steps=10.5), TypeError, r"total_steps: expected an int"),
    (lambda: schedules.one_cycle(0.1, 10, pct_start=1.2), ValueError, r"pct_start: expected a value in \[0.0, 1.0\]"),
    (lambda: schedules.one_cycle(0.1, 10, anneal_strategy="cosine"), ValueError, r"anneal_strategy: expected one of \('cos', 'linear'\), got 'cosine'"),
    (lambda: schedules.one_cycle(0.1, 10, div_factor=0), ValueError, r"div_factor: expected a value > 0"),
    (lambda: schedules.lambda_schedule(0.1, 0.9), TypeError, r"lr_lambda: expected a function of the step"),
    (lambda: schedules.join([], []), ValueError, r"schedules: expected at least one schedule"),
    (lambda: schedules.join([schedules.constant(1), schedules.constant(2)], []), ValueError, r"boundaries: expected 1 values"),
    (lambda: schedules.join([schedules.constant(1)] * 3, [5, 5]), ValueError, r"boundaries: expected strictly increasing values, got \[5, 5\]"),
    (lambda: schedules.join([schedules.constant(1), 0.5], [3]), TypeError, r"schedules\[1\]: expected a function"),
    (lambda: schedules.warmup(0.0, 10), ValueError, r"peak_lr: expected a value > 0"),
    (lambda: schedules.cosine("0.1", 10), TypeError, r"init_lr: expected a real number"),
])
def test_bad_arguments_raise_with_the_argument_name(build, error, message):
    with pytest.raises(error, match=message):
        build()


# ---- Schedule.at: one step at a time, as schedulers evaluate --------------------------------------

@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: s.name)
def test_at_equals_call_at_every_step_across_blocks(schedule):
    steps = list(range(0, 100)) + [5, 300, 299, 3, 257, 256, 255]
    if schedule.name.startswith("one_cycle"):
        steps = [step for step in steps if step <= 100]  # total_steps
    assert [schedule.at(step) for step in steps] == [schedule(step) for step in steps]


def test_at_with_fractional_or_numpy_steps_falls_back_to_call():
    schedule = schedules.cosine(0.1, 10)
    assert schedule.at(2.5) == schedule(2.5)
    assert schedule.at(np.int64(7)) == schedule(7)


def test_at_respects_the_last_valid_step():
    schedule = schedules.one_cycle(0.1, 130)
    assert schedule.at(130) == schedule(130)
    with pytest.raises(ValueError, match=r"total_steps \(130\)"):
        schedule.at(131)


def test_at_never_calls_user_functions_ahead_of_time():
    calls = []

    def factor(epoch):
        calls.append(epoch)
        return 0.5

    for schedule in (schedules.lambda_schedule(1.0, factor),
                     schedules.cyclical(0.1, 1.0, 4, scale_fn=factor),
                     schedules.join([schedules.lambda_schedule(1.0, factor), schedules.constant(1.0)], [10])):
        calls.clear()
        schedule.at(3)
        assert len(calls) <= 1


def test_at_rejects_negative_steps_like_call():
    with pytest.raises(ValueError, match=r"step: expected steps >= 0, got -1"):
        schedules.cosine(0.1, 10).at(-1)


def test_warm_restart_position_is_exact_where_a_float_log_is_not():
    # log10(1000) = 2.9999999999999996 in floating point: epoch 111 with
    # T_0=1, T_mult=10 must still start the cycle of length 1000.
    T_cur, T_i = schedules.warm_restart_position([110, 111, 1111], T_0=1, T_mult=10)
    np.testing.assert_array_equal(T_cur, [99, 0, 0])
    np.testing.assert_array_equal(T_i, [100, 1000, 10000])
